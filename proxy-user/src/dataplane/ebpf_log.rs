//! aya-log: the eBPF program's log lines arrive through a ring buffer and are handed to
//! the `log` facade, which `telemetry` forwards into `tracing`.
use std::os::fd::{AsFd, BorrowedFd};

use aya::Ebpf;
use aya_log::EbpfLogger;

use super::DataplaneError;

/// The eBPF global aya-log-ebpf reads to skip disabled levels inside the kernel.
pub(super) const LEVEL_GLOBAL: &str = aya_log::LEVEL;

/// aya-log's level numbering: 0 = off, 1 = error … 5 = trace (as `log`'s `LevelFilter`).
pub(super) fn aya_level(filter: log::LevelFilter) -> u8 {
    filter as usize as u8
}

/// Owns the log ring; call [`Self::flush`] whenever its fd is readable.
pub struct EbpfLogDrain {
    logger: EbpfLogger<&'static dyn log::Log>,
}

impl EbpfLogDrain {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            logger: EbpfLogger::init(ebpf).map_err(DataplaneError::Log)?,
        })
    }

    pub fn flush(&mut self) {
        self.logger.flush();
    }
}

impl AsFd for EbpfLogDrain {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.logger.as_fd()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels_match_aya_log_numbering() {
        // aya-log-common: Error = 1 … Trace = 5; 0 disables everything.
        assert_eq!(super::aya_level(log::LevelFilter::Off), 0);
        assert_eq!(super::aya_level(log::LevelFilter::Error), 1);
        assert_eq!(super::aya_level(log::LevelFilter::Warn), 2);
        assert_eq!(super::aya_level(log::LevelFilter::Debug), 4);
        assert_eq!(super::aya_level(log::LevelFilter::Trace), 5);
    }
}

//! The XDP data plane as seen from userspace.
mod attach;
mod counters;
mod ebpf_log;
mod object;
mod records;
mod testrun;

use std::ffi::CString;

use aya::{Ebpf, EbpfLoader, programs::Xdp};
use proxy_common::{EDGE_XDP_PROGRAM, FLOOR_XDP_PROGRAM, PACKET_RECORDS_MAP};

pub use attach::{AttachedMode, XdpModeChoice};
pub use counters::{CounterSnapshot, DataplaneCounters};
pub use ebpf_log::EbpfLogDrain;
pub use records::{PacketRecords, RecordTally};
pub use testrun::{TestRunOutcome, XdpTestRunner, XdpVerdict};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the eBPF object into the kernel failed (edgeproxy needs root and a kernel with BTF and XDP)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program {0:?} (was it built from another version?)")]
    ProgramMissing(&'static str),
    #[error("the eBPF object has no map {0:?} (or it was already taken)")]
    MapMissing(&'static str),
    #[error("program {name:?}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name:?}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("interface name {0:?} contains a NUL byte")]
    BadInterfaceName(String),
    #[error("attaching XDP to {iface} failed: {reasons}")]
    Attach { iface: String, reasons: String },
    #[error("enabling BPF run-time statistics: {0}")]
    Stats(#[source] aya::sys::SyscallError),
    #[error("aya-log: {0}")]
    Log(#[source] aya_log::Error),
}

/// Cumulative run count and run time of a program, as the kernel measures them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_count: u64,
    pub run_time_ns: u64,
}

impl ProgramStats {
    pub fn since(&self, earlier: &ProgramStats) -> ProgramStats {
        ProgramStats {
            run_count: self.run_count.saturating_sub(earlier.run_count),
            run_time_ns: self.run_time_ns.saturating_sub(earlier.run_time_ns),
        }
    }

    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_count > 0).then(|| self.run_time_ns as f64 / self.run_count as f64)
    }
}

/// Turns on the kernel's per-program run-time accounting (BPF_ENABLE_STATS) for as long
/// as the returned fd is open; unlike the `kernel.bpf_stats_enabled` sysctl, nothing is
/// left switched on if the process dies.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, DataplaneError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(DataplaneError::Stats)
}

/// Which programs to load. Loading only what is needed keeps test-run users from
/// paying for programs they never run.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Highest aya-log level the eBPF side emits (lower levels are skipped in the kernel).
    pub ebpf_log_level: log::LevelFilter,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ebpf_log_level: log::LevelFilter::Warn,
        }
    }
}

/// The loaded eBPF object: programs, maps, and the XDP attachment if any.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Option<AttachedMode>,
}

impl Dataplane {
    /// Loads the embedded object and both programs into the kernel (not attached yet).
    pub fn load(opts: LoadOptions) -> Result<Self, DataplaneError> {
        let level = ebpf_log::aya_level(opts.ebpf_log_level);
        let ebpf = EbpfLoader::new()
            .override_global(ebpf_log::LEVEL_GLOBAL, &level, false)
            .load(object::EBPF_OBJECT)
            .map_err(DataplaneError::Load)?;
        let mut dp = Self {
            ebpf,
            attached: None,
        };
        for name in [EDGE_XDP_PROGRAM, FLOOR_XDP_PROGRAM] {
            dp.xdp_mut(name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(dp)
    }

    fn xdp_mut(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::ProgramMissing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::ProgramMissing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Attaches `edge_xdp` to `iface` (resolved in the calling thread's network namespace).
    /// The attachment lives as long as this `Dataplane`.
    pub fn attach(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<AttachedMode, DataplaneError> {
        let name =
            CString::new(iface).map_err(|_| DataplaneError::BadInterfaceName(iface.into()))?;
        let prog = self.xdp_mut(EDGE_XDP_PROGRAM)?;
        let mode = attach::attach_with_fallback(prog, &name, iface, choice)?;
        self.attached = Some(mode);
        Ok(mode)
    }

    pub fn attached_mode(&self) -> Option<AttachedMode> {
        self.attached
    }

    /// Handle for reading the per-CPU counters (summed over CPUs).
    pub fn counters(&self) -> Result<DataplaneCounters<'_>, DataplaneError> {
        DataplaneCounters::new(&self.ebpf)
    }

    /// Takes the packet record ring buffer; there is one consumer per ring.
    pub fn take_records(&mut self) -> Result<PacketRecords, DataplaneError> {
        let map = self
            .ebpf
            .take_map(PACKET_RECORDS_MAP)
            .ok_or(DataplaneError::MapMissing(PACKET_RECORDS_MAP))?;
        PacketRecords::new(map)
    }

    /// Takes the aya-log ring buffer; its lines go to `log` and from there to `tracing`.
    pub fn take_logger(&mut self) -> Result<EbpfLogDrain, DataplaneError> {
        EbpfLogDrain::new(&mut self.ebpf)
    }

    /// Kernel run-time statistics of `edge_xdp` (zero unless BPF stats are enabled, see
    /// [`enable_run_time_stats`]).
    pub fn program_stats(&self) -> Result<ProgramStats, DataplaneError> {
        let info =
            self.xdp(EDGE_XDP_PROGRAM)?
                .info()
                .map_err(|source| DataplaneError::Program {
                    name: EDGE_XDP_PROGRAM,
                    source,
                })?;
        Ok(ProgramStats {
            run_count: info.run_count(),
            run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// Runs `edge_xdp` (or the floor program) on crafted packets through BPF_PROG_TEST_RUN.
    pub fn test_runner(&self, program: &'static str) -> Result<XdpTestRunner<'_>, DataplaneError> {
        Ok(XdpTestRunner::new(self.xdp(program)?, program))
    }
}

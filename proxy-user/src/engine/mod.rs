//! The receive engine: UDP log sockets read by one of two backends behind one small
//! trait, so the log pipeline (and its tests) run the same on both.
//!
//! - [`uring::IoUringBackend`]: multishot `recvmsg` on every socket into a provided
//!   buffer ring of pre-registered buffers, recycled as soon as the callback returns: no
//!   syscall per datagram and no allocation in steady state.
//! - [`epoll::EpollBackend`]: `epoll_wait` + `recvmmsg` batches into preallocated
//!   buffers, for hosts where io_uring is disabled or lacks a feature.
//!
//! `auto` probes io_uring (the `kernel.io_uring_disabled` sysctl, ring set-up, buffer
//! rings) and falls back to epoll with the reason.
pub mod epoll;
pub mod socket;
pub mod uring;

use std::{io, net::SocketAddr, str::FromStr, time::Duration};

/// One received datagram, borrowed from the backend's buffer for the callback's duration.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    pub payload: &'a [u8],
    pub source: Option<SocketAddr>,
    /// Index of the socket it arrived on.
    pub socket: usize,
    /// The datagram was longer than the receive buffer and was cut.
    pub truncated: bool,
}

/// Counters a backend keeps (per worker; summed for reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub datagrams: u64,
    pub bytes: u64,
    pub truncated: u64,
    /// io_uring only: the buffer ring was empty when a datagram was ready (it stays in
    /// the socket queue and is read after the re-arm; counted, not lost).
    pub buffer_ring_empty: u64,
    pub errors: u64,
}

impl BackendStats {
    pub fn add(&mut self, o: &BackendStats) {
        self.datagrams += o.datagrams;
        self.bytes += o.bytes;
        self.truncated += o.truncated;
        self.buffer_ring_empty += o.buffer_ring_empty;
        self.errors += o.errors;
    }
}

/// What a poll reports: a datagram, or that watched fd number `n` became readable.
#[derive(Clone, Copy, Debug)]
pub enum Event<'a> {
    Datagram(Datagram<'a>),
    Ready(usize),
}

pub trait ReceiveBackend {
    /// Waits up to `timeout` for datagrams and hands each to `on`. Returns how many.
    fn poll(&mut self, timeout: Duration, on: &mut dyn FnMut(Datagram<'_>)) -> io::Result<usize> {
        self.poll_events(timeout, &mut |e| {
            if let Event::Datagram(d) = e {
                on(d);
            }
        })
    }

    /// Like `poll`, also reporting readiness of the fds given to [`ReceiveBackend::watch`].
    fn poll_events(
        &mut self,
        timeout: Duration,
        on: &mut dyn FnMut(Event<'_>),
    ) -> io::Result<usize>;

    /// Also wait for `fd` to become readable (a BPF ring buffer, say); reported as
    /// `Event::Ready(n)` with `n` the order of `watch` calls. The fd must outlive the backend.
    fn watch(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize>;
    fn stats(&self) -> BackendStats;
    fn name(&self) -> &'static str;
    /// Whether a busy worker should sleep a short quantum between non-blocking passes
    /// instead of waiting to be woken (measured per backend: it pays for epoll, whose
    /// sockets simply queue meanwhile; a multishot io_uring receive under DEFER_TASKRUN
    /// only makes progress while the task waits in the ring, and got slower).
    fn coalesce_when_busy(&self) -> bool {
        false
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    #[default]
    Auto,
    IoUring,
    Epoll,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(Self::IoUring),
            "epoll" => Ok(Self::Epoll),
            other => Err(format!(
                "unknown engine {other:?}: expected auto, io_uring or epoll"
            )),
        }
    }
}

/// Sizes of one worker's receive path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveConfig {
    /// Largest datagram kept whole (longer ones are cut and counted).
    pub buffer_size: usize,
    /// Buffers in the io_uring buffer ring (a power of two), or the recvmmsg batch.
    pub buffers: u16,
}

impl Default for ReceiveConfig {
    fn default() -> Self {
        Self {
            buffer_size: 9 * 1024,
            buffers: 1024,
        }
    }
}

/// Opens the chosen backend over `sockets`. With `Auto`, io_uring is tried first and
/// the reason for falling back to epoll is returned alongside.
pub fn open(
    choice: BackendChoice,
    sockets: Vec<std::net::UdpSocket>,
    cfg: ReceiveConfig,
) -> io::Result<(Box<dyn ReceiveBackend + Send>, Option<String>)> {
    match choice {
        BackendChoice::Epoll => Ok((Box::new(epoll::EpollBackend::new(sockets, cfg)?), None)),
        BackendChoice::IoUring => Ok((Box::new(uring::IoUringBackend::new(sockets, cfg)?), None)),
        BackendChoice::Auto => {
            if let Some(reason) = uring::unavailable() {
                return Ok((
                    Box::new(epoll::EpollBackend::new(sockets, cfg)?),
                    Some(reason),
                ));
            }
            let clones: Vec<std::net::UdpSocket> = sockets
                .iter()
                .map(std::net::UdpSocket::try_clone)
                .collect::<io::Result<_>>()?;
            match uring::IoUringBackend::new(sockets, cfg) {
                Ok(b) => Ok((Box::new(b), None)),
                Err(e) => Ok((
                    Box::new(epoll::EpollBackend::new(clones, cfg)?),
                    Some(format!("io_uring set-up failed: {e}")),
                )),
            }
        }
    }
}

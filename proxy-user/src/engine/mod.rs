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

use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    str::FromStr,
    time::{Duration, Instant},
};

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
    /// Datagrams still queued when the stop drain ran out of time ([`STOP_DRAIN`]): read
    /// off the socket and counted here, not processed (and not in `datagrams`).
    pub left_at_stop: u64,
}

impl BackendStats {
    pub fn add(&mut self, o: &BackendStats) {
        self.datagrams += o.datagrams;
        self.bytes += o.bytes;
        self.truncated += o.truncated;
        self.buffer_ring_empty += o.buffer_ring_empty;
        self.errors += o.errors;
        self.left_at_stop += o.left_at_stop;
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

    /// Ends receiving for good (at stop, or before the sockets go to a new backend): arms
    /// no new receive, hands `on` every datagram the backend already took off a socket,
    /// then reads each socket's queue until it is empty (see [`drain_queues`] for what
    /// `deadline` bounds). Failures are logged and counted, never fatal: a stop must
    /// still produce its summary. Only `stats` and `name` are meaningful afterwards.
    fn finish(&mut self, deadline: Instant, on: &mut dyn FnMut(Datagram<'_>));
}

/// How long a stopping worker keeps processing what its sockets still hold. Past it the
/// rest is read off and counted (`left_at_stop`) for as long again; whatever a socket
/// still holds after that (only if datagrams keep arriving, which
/// [`socket::refuse_new`] prevents) is logged as a warning.
pub const STOP_DRAIN: Duration = Duration::from_secs(2);

/// Reads every socket until `recvmmsg` finds it empty: datagrams go to `on` until
/// `deadline`, then are only counted in `left_at_stop` until `deadline + STOP_DRAIN`.
/// A socket that fails is counted in `errors` and left.
pub(crate) fn drain_queues(
    sockets: &[std::net::UdpSocket],
    batch: &mut socket::RecvBatch,
    stats: &mut BackendStats,
    deadline: Instant,
    on: &mut dyn FnMut(Datagram<'_>),
) {
    let give_up = deadline + STOP_DRAIN;
    for (idx, s) in sockets.iter().enumerate() {
        let fd = s.as_raw_fd();
        loop {
            let now = Instant::now();
            let r = if now < deadline {
                batch.recv(fd, idx, stats, on)
            } else if now < give_up {
                // Read to count, not to process: the data stays out of `datagrams`.
                let mut scratch = BackendStats::default();
                let r = batch.recv(fd, idx, &mut scratch, &mut |_| {});
                stats.left_at_stop += scratch.datagrams;
                stats.errors += scratch.errors;
                r
            } else {
                tracing::warn!(
                    socket = idx,
                    "datagrams still queued after the stop drain; closing with them"
                );
                break;
            };
            match r {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(socket = idx, error = %e, "reading a socket at stop failed");
                    break;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use std::{
        net::UdpSocket,
        time::{Duration, Instant},
    };

    use super::*;

    /// A loopback socket with `n` datagrams queued on it (and the sender, to send more).
    fn queued(n: usize) -> (UdpSocket, UdpSocket) {
        let rx = socket::udp_reuseport("127.0.0.1:0".parse().unwrap(), Some(1 << 20)).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        for i in 0..n {
            tx.send(format!("datagram {i}").as_bytes()).unwrap();
        }
        (rx, tx)
    }

    #[test]
    fn drain_processes_until_the_deadline_then_counts_what_is_left() {
        let (rx, _tx) = queued(300);
        let mut batch = socket::RecvBatch::new(64, 2048);
        let mut stats = BackendStats::default();
        let mut seen = 0;
        let later = Instant::now() + Duration::from_secs(5);
        drain_queues(
            std::slice::from_ref(&rx),
            &mut batch,
            &mut stats,
            later,
            &mut |_| {
                seen += 1;
            },
        );
        assert_eq!((seen, stats.datagrams, stats.left_at_stop), (300, 300, 0));

        // Past the deadline: read off and counted, not processed.
        let (rx, _tx) = queued(300);
        let mut stats = BackendStats::default();
        let mut seen = 0;
        drain_queues(
            std::slice::from_ref(&rx),
            &mut batch,
            &mut stats,
            Instant::now(),
            &mut |_| {
                seen += 1;
            },
        );
        assert_eq!((seen, stats.datagrams, stats.left_at_stop), (0, 0, 300));
    }

    #[test]
    fn a_refusing_socket_keeps_its_queue_and_counts_new_arrivals_as_drops() {
        let (rx, tx) = queued(10);
        let drops = socket::kernel_drops(&rx).unwrap();
        socket::refuse_new(&rx).unwrap();
        for _ in 0..7 {
            tx.send(b"late").unwrap();
        }
        let mut batch = socket::RecvBatch::new(64, 2048);
        let mut stats = BackendStats::default();
        let mut got = Vec::new();
        while batch
            .recv(rx.as_raw_fd(), 0, &mut stats, &mut |d| {
                got.push(d.payload.to_vec())
            })
            .unwrap()
            > 0
        {}
        assert_eq!(got.len(), 10, "the queue is still read whole");
        assert!(got.iter().all(|p| p.starts_with(b"datagram")));
        assert_eq!(socket::kernel_drops(&rx).unwrap() - drops, 7);
    }

    /// Whatever a backend took off the sockets, or they still hold, comes out of
    /// `finish`: after a poll that left receives armed and more datagrams queued.
    fn finish_hands_over_everything(choice: BackendChoice, buffers: u16) {
        let (rx, tx) = queued(500);
        let cfg = ReceiveConfig {
            buffer_size: 2048,
            buffers,
        };
        let (mut b, _) = open(choice, vec![rx], cfg).unwrap();
        let mut seen = 0;
        b.poll(Duration::from_millis(50), &mut |_| seen += 1)
            .unwrap();
        for i in 0..500 {
            tx.send(format!("more {i}").as_bytes()).unwrap();
        }
        b.finish(Instant::now() + STOP_DRAIN, &mut |_| seen += 1);
        let s = b.stats();
        assert_eq!(
            (seen, s.datagrams, s.left_at_stop, s.errors),
            (1000, 1000, 0, 0),
            "{s:?}"
        );
    }

    #[test]
    fn finish_hands_over_everything_epoll() {
        finish_hands_over_everything(BackendChoice::Epoll, 64);
    }

    #[test]
    fn finish_hands_over_everything_io_uring() {
        if let Some(why) = uring::unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        // Fewer buffers than datagrams: the receive ends with ENOBUFS midway. More: it
        // stays armed, and its completions outnumber the completion queue (overflow).
        finish_hands_over_everything(BackendChoice::IoUring, 64);
        finish_hands_over_everything(BackendChoice::IoUring, 1024);
    }
}

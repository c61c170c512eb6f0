//! io_uring backend: one multishot `recvmsg` per socket, reading into a provided buffer
//! ring. A completion names the buffer it filled; the datagram is handed to the caller
//! in place and the buffer goes straight back into the ring.
//!
//! The ring is created with SINGLE_ISSUER and DEFER_TASKRUN when the kernel has them,
//! so a backend must be created on the worker thread that polls it.
use std::{
    io,
    net::UdpSocket,
    os::fd::AsRawFd,
    ptr::NonNull,
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use io_uring::{IoUring, cqueue, opcode, types};

use super::{
    BackendStats, Datagram, ReceiveBackend, ReceiveConfig,
    socket::{RecvBatch, sockaddr},
};
use crate::mapping::Mapping;

const BGID: u16 = 1;
/// `struct io_uring_recvmsg_out` precedes the name and payload in each buffer.
const RECVMSG_OUT: usize = 16;
const NAME_LEN: usize = size_of::<libc::sockaddr_storage>();

/// Why io_uring cannot be used here, if it cannot.
pub fn unavailable() -> Option<String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        && v.trim() == "2"
    {
        return Some("io_uring is disabled (kernel.io_uring_disabled=2)".into());
    }
    IoUring::new(2)
        .err()
        .map(|e| format!("io_uring set-up failed: {e}"))
}

/// Submits what is queued and waits up to `timeout` for a completion; running out of
/// time, a signal, or a full completion queue (EBUSY: reap first) are not errors.
pub(crate) fn submit_and_wait<
    S: io_uring::squeue::EntryMarker,
    C: io_uring::cqueue::EntryMarker,
>(
    ring: &IoUring<S, C>,
    timeout: std::time::Duration,
) -> io::Result<()> {
    submit_and_wait_batch(ring, timeout, None)
}

/// Submits what is queued and reaps what has completed, never sleeping: a busy poll.
/// Unlike a wait with a zero timeout, no timer is armed; with deferred task work the
/// kernel still runs it (that is what posts a socket operation's completion), which
/// asking for events (`GETEVENTS`) with a minimum of none does.
pub(crate) fn submit_and_reap<
    S: io_uring::squeue::EntryMarker,
    C: io_uring::cqueue::EntryMarker,
>(
    ring: &mut IoUring<S, C>,
) -> io::Result<()> {
    const IORING_ENTER_GETEVENTS: u32 = 1;
    let to_submit = u32::try_from(ring.submission().len()).unwrap_or(u32::MAX);
    // SAFETY: no argument is passed (the kernel reads none without EXT_ARG or a sigmask).
    let r = unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)
    };
    match r {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A batch to wait for: `events` completions, or what came in within `usec` µs of the
/// wait's start (io_uring's minimum wait, `IORING_FEAT_MIN_TIMEOUT`, kernel 6.12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    pub events: usize,
    pub usec: u32,
}

/// [`submit_and_wait`], but with `batch` the kernel does not wake the thread for each
/// completion (deferred task work wakes it at `events`), and `usec` µs after the wait
/// began it returns with whatever came in; with nothing in by then it wakes at the
/// first, as without. Only on a ring with deferred task work: without it, kernels
/// have waited for all `events` after the minimum (liburing issue 1477).
pub(crate) fn submit_and_wait_batch<
    S: io_uring::squeue::EntryMarker,
    C: io_uring::cqueue::EntryMarker,
>(
    ring: &IoUring<S, C>,
    timeout: std::time::Duration,
    batch: Option<Batch>,
) -> io::Result<()> {
    let ts = types::Timespec::from(timeout);
    let (want, usec) = batch.map_or((1, 0), |b| (b.events, b.usec));
    let args = types::SubmitArgs::new().timespec(&ts).min_wait_usec(usec);
    match ring.submitter().submit_with_args(want, &args) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A provided-buffer ring: the ring entries in an mmapped, page-aligned region, the
/// buffers in one allocation owned here.
pub(crate) struct BufRing {
    entries: NonNull<types::BufRingEntry>,
    /// The region `entries` points into.
    _ring: Mapping,
    count: u16,
    tail: u16,
    buf_size: usize,
    data: Vec<u8>,
}

impl BufRing {
    pub(crate) fn new(count: u16, buf_size: usize) -> io::Result<Self> {
        let mut r = Self::empty(count, buf_size)?;
        for bid in 0..count {
            r.push(bid);
        }
        r.publish();
        Ok(r)
    }

    /// A ring of `count` entries and `count` buffers, none handed to the kernel yet.
    pub(crate) fn empty(count: u16, buf_size: usize) -> io::Result<Self> {
        if !count.is_power_of_two() {
            return Err(io::Error::other(
                "the buffer ring size must be a power of two",
            ));
        }
        let ring_bytes =
            (usize::from(count) * size_of::<types::BufRingEntry>()).next_multiple_of(4096);
        let ring = Mapping::new(ring_bytes, false)?;
        Ok(Self {
            entries: ring.ptr().cast(),
            _ring: ring,
            count,
            tail: 0,
            buf_size,
            data: vec![0u8; usize::from(count) * buf_size],
        })
    }

    pub(crate) fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.count - 1));
        // SAFETY: idx < count, inside the mapping; only this thread writes entries, and
        // the kernel reads an entry only after the tail that covers it is published.
        let e = unsafe { &mut *self.entries.as_ptr().add(idx) };
        e.set_addr(self.data[usize::from(bid) * self.buf_size..].as_ptr() as u64);
        e.set_len(self.buf_size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    pub(crate) fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the ring (io_uring's buf
        // ring layout); it is a u16 the kernel reads atomically.
        let tail =
            unsafe { &*(types::BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    pub(crate) fn buf(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.buf_size;
        &self.data[start..start + len.min(self.buf_size)]
    }

    /// The address of the ring entries, for `register_buf_ring_with_flags`.
    pub(crate) fn ring_addr(&self) -> u64 {
        self.entries.as_ptr() as u64
    }
}

pub struct IoUringBackend {
    ring: IoUring,
    sockets: Vec<UdpSocket>,
    armed: Vec<bool>,
    /// The template every multishot recvmsg uses (only the lengths matter); boxed so its
    /// address stays put while operations are in flight.
    msghdr: Box<libc::msghdr>,
    bufs: BufRing,
    stats: BackendStats,
    /// Watched fds and whether their multishot poll is armed.
    watched: Vec<(std::os::fd::RawFd, bool)>,
    buffer_size: usize,
    /// `finish` ran: no receive is armed again.
    finished: bool,
}

/// user_data of watched-fd polls: this bit set, the watch index below it.
const WATCH_TAG: u64 = 1 << 63;
/// user_data of the cancellations `finish` sends (their completions carry no data).
const CANCEL_TAG: u64 = 1 << 62;

// SAFETY: the raw pointers inside (ring entries, msghdr) point into memory this value
// owns; it is used by one thread at a time (moving it between threads is allowed; for
// SINGLE_ISSUER rings the caller creates it on the thread that polls it).
unsafe impl Send for IoUringBackend {}

impl IoUringBackend {
    pub fn new(sockets: Vec<UdpSocket>, cfg: ReceiveConfig) -> io::Result<Self> {
        let entries = (sockets.len() as u32 * 2).next_power_of_two().max(8);
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let bufs = BufRing::new(cfg.buffers, RECVMSG_OUT + NAME_LEN + cfg.buffer_size)?;
        // SAFETY: the region is page-aligned, `cfg.buffers` entries long, and outlives the
        // registration (unregistered in Drop before the BufRing is dropped).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring_addr(),
                cfg.buffers,
                BGID,
                0,
            )?;
        }
        // SAFETY: msghdr is plain data; all-zero is a valid value.
        let mut msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        msghdr.msg_namelen = NAME_LEN as libc::socklen_t;
        let armed = vec![false; sockets.len()];
        Ok(Self {
            ring,
            sockets,
            armed,
            msghdr,
            bufs,
            stats: BackendStats::default(),
            watched: Vec::new(),
            buffer_size: cfg.buffer_size,
            finished: false,
        })
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: every operation pushed refers to fds and memory owned by self (or, for
        // watched fds, guaranteed by the caller of `watch` to outlive the backend).
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above; the queue was just flushed.
            unsafe { self.ring.submission().push(sqe) }
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
        Ok(())
    }

    /// Hands `on` every completion posted so far and recycles the buffers; returns the
    /// datagrams among them.
    fn reap(&mut self, on: &mut dyn FnMut(super::Event<'_>)) -> usize {
        let Self {
            ring,
            armed,
            msghdr,
            bufs,
            stats,
            watched,
            ..
        } = self;
        let mut n = 0;
        let mut recycled = false;
        for cqe in ring.completion() {
            let flags = cqe.flags();
            if cqe.user_data() & CANCEL_TAG != 0 {
                // The cancelled receive's own last completion says it ended.
                continue;
            }
            if cqe.user_data() & WATCH_TAG != 0 {
                // A multishot poll on a watched fd: readiness, not data. It is re-armed on
                // the next pass once the kernel ends it (no MORE flag).
                let w = (cqe.user_data() & !WATCH_TAG) as usize;
                if !cqueue::more(flags)
                    && let Some(entry) = watched.get_mut(w)
                {
                    entry.1 = false;
                }
                if cqe.result() >= 0 {
                    on(super::Event::Ready(w));
                } else if cqe.result() != -libc::ECANCELED {
                    stats.errors += 1;
                }
                continue;
            }
            let idx = cqe.user_data() as usize;
            if !cqueue::more(flags)
                && let Some(a) = armed.get_mut(idx)
            {
                *a = false;
            }
            let res = cqe.result();
            if res < 0 {
                if -res == libc::ECANCELED {
                    // Ended by `finish`: what it left is still in the socket.
                } else if -res == libc::ENOBUFS {
                    stats.buffer_ring_empty += 1;
                } else {
                    stats.errors += 1;
                }
                continue;
            }
            let Some(bid) = cqueue::buffer_select(flags) else {
                stats.errors += 1;
                continue;
            };
            if let Ok(out) = types::RecvMsgOut::parse(bufs.buf(bid, res as usize), msghdr) {
                let payload = out.payload_data();
                let truncated = out.is_payload_truncated();
                stats.datagrams += 1;
                stats.bytes += payload.len() as u64;
                stats.truncated += u64::from(truncated);
                on(super::Event::Datagram(Datagram {
                    payload,
                    source: sockaddr(out.name_data()),
                    socket: idx,
                    truncated,
                }));
                n += 1;
            } else {
                stats.errors += 1;
            }
            bufs.push(bid);
            recycled = true;
        }
        if recycled {
            bufs.publish();
        }
        n
    }

    /// A multishot receive keeps taking datagrams into the buffer ring until it ends:
    /// cancels each and reaps until each has posted its last completion, handing `on`
    /// the data completions before it (dropping the ring would discard them).
    fn end_receives(
        &mut self,
        deadline: Instant,
        on: &mut dyn FnMut(Datagram<'_>),
    ) -> io::Result<()> {
        for i in 0..self.sockets.len() {
            if self.armed[i] {
                let sqe = opcode::AsyncCancel::new(i as u64)
                    .build()
                    .user_data(CANCEL_TAG);
                self.push(&sqe)?;
            }
        }
        let mut data = |e: super::Event<'_>| {
            if let super::Event::Datagram(d) = e {
                on(d);
            }
        };
        // Completions posted before the stop, whatever is still armed.
        self.reap(&mut data);
        while self.armed.iter().any(|a| *a) && Instant::now() < deadline {
            submit_and_wait(&self.ring, Duration::from_millis(10))?;
            self.reap(&mut data);
        }
        if self.armed.iter().any(|a| *a) {
            tracing::warn!("a cancelled io_uring receive did not end within the stop drain");
        }
        // Completions that found the completion queue full wait in the kernel's overflow
        // list (a receive that ended that way was never cancelled above): flush them.
        while Instant::now() < deadline {
            submit_and_reap(&mut self.ring)?;
            if self.reap(&mut data) == 0 && !self.ring.submission().cq_overflow() {
                break;
            }
        }
        Ok(())
    }

    fn arm(&mut self) -> io::Result<()> {
        for i in 0..self.watched.len() {
            if !self.watched[i].1 {
                let sqe = opcode::PollAdd::new(types::Fd(self.watched[i].0), libc::POLLIN as u32)
                    .multi(true)
                    .build()
                    .user_data(WATCH_TAG | i as u64);
                self.push(&sqe)?;
                self.watched[i].1 = true;
            }
        }
        for i in 0..self.sockets.len() {
            if self.armed[i] || self.finished {
                continue;
            }
            // The socket and the msghdr outlive the operation: both are owned by self,
            // and the ring (dropped first) cancels it.
            let sqe = opcode::RecvMsgMulti::new(
                types::Fd(self.sockets[i].as_raw_fd()),
                &*self.msghdr,
                BGID,
            )
            .build()
            .user_data(i as u64);
            self.push(&sqe)?;
            self.armed[i] = true;
        }
        Ok(())
    }
}

impl ReceiveBackend for IoUringBackend {
    fn watch(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        self.watched.push((fd, false));
        Ok(self.watched.len() - 1)
    }

    fn poll_events(
        &mut self,
        timeout: Duration,
        on: &mut dyn FnMut(super::Event<'_>),
    ) -> io::Result<usize> {
        self.arm()?;
        submit_and_wait(&self.ring, timeout)?;
        Ok(self.reap(on))
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn finish(&mut self, deadline: Instant, on: &mut dyn FnMut(Datagram<'_>)) {
        self.finished = true;
        if let Err(e) = self.end_receives(deadline, on) {
            tracing::warn!(error = %e, "ending the io_uring receives at stop failed");
        }
        // What no receive took is still in the sockets; read it directly.
        let mut batch = RecvBatch::new(64, self.buffer_size);
        super::drain_queues(&self.sockets, &mut batch, &mut self.stats, deadline, on);
    }
}

impl Drop for IoUringBackend {
    fn drop(&mut self) {
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
    }
}

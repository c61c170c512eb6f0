//! The io_uring backend: one SQE per operation (a connect is linked to its timeout), the
//! pool a provided buffer ring the kernel picks from, and on workers with a zero-copy
//! receive queue, its area (a ring with 32-byte completions, which carry the offsets).
use std::{io, os::fd::RawFd, time::Duration};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::{
    BufId, Op, Ops,
    zcrx::{ZcSpec, Zcrx},
};
use crate::engine::uring::{Batch, BufRing};

const BGID: u16 = 7;

pub struct UringOps<C: Cqe = cqueue::Entry> {
    ring: IoUring<squeue::Entry, C>,
    /// The ring runs task work deferred (DEFER_TASKRUN).
    deferred: bool,
    /// The batch the next wait gathers (bulk traffic on a kernel with minimum waits).
    batch: Option<Batch>,
    bufs: Option<Pool>,
    /// Declared after the ring: the ring closes (releasing the queue) first.
    zc: Option<Zcrx>,
}

/// A completion queue entry: the 16-byte one, or the 32-byte one whose extra bytes carry
/// a zero-copy receive's area offset.
pub trait Cqe: cqueue::EntryMarker {
    /// user_data, result, flags, and the first extra word (0 without one).
    fn parts(&self) -> (u64, i32, u32, u64);
}

impl Cqe for cqueue::Entry {
    fn parts(&self) -> (u64, i32, u32, u64) {
        (self.user_data(), self.result(), self.flags(), 0)
    }
}

impl Cqe for cqueue::Entry32 {
    fn parts(&self) -> (u64, i32, u32, u64) {
        (
            self.user_data(),
            self.result(),
            self.flags(),
            self.big_cqe()[0],
        )
    }
}

/// The buffer pool: a provided buffer ring holding only a few buffers at a time, the
/// rest on a last-in first-out free list. The kernel takes ring buffers in FIFO order,
/// so posting the whole pool would cycle through all of it (cold in cache); posting the
/// buffers just returned keeps the working set small (16 buffers moved 11% more than
/// 128 over eight streams). When receives find the ring empty, more are posted.
struct Pool {
    ring: BufRing,
    free: Vec<u16>,
    /// Buffers in the ring that the kernel has not consumed yet.
    posted: u16,
    /// How many to keep posted: doubles when receives found none, halves after a quiet
    /// stretch, between [`HOT`] and the pool size.
    target: u16,
    count: u16,
    quiet_waits: u32,
}

const HOT: u16 = 16;
/// Waits without an empty-ring receive before the posted target halves.
const SHRINK_AFTER: u32 = 4096;

impl Pool {
    fn top_up(&mut self) {
        let mut pushed = false;
        while self.posted < self.target {
            let Some(bid) = self.free.pop() else { break };
            self.ring.push(bid);
            self.posted += 1;
            pushed = true;
        }
        if pushed {
            self.ring.publish();
        }
    }

    /// Accounts one wait's completions: buffers the kernel consumed, receives that found
    /// the ring empty.
    fn saw(&mut self, consumed: u16, empty: bool) {
        self.posted = self.posted.saturating_sub(consumed);
        if empty {
            self.target = (self.target * 2).min(self.count);
            self.quiet_waits = 0;
        } else {
            self.quiet_waits += 1;
            if self.quiet_waits >= SHRINK_AFTER {
                self.quiet_waits = 0;
                self.target = (self.target / 2).max(HOT.min(self.count));
            }
        }
    }
}

/// What io_uring lacks here for TCP forwarding, if anything (kernel switch, set-up, or
/// an opcode the worker needs).
pub fn unavailable() -> Option<String> {
    if let Some(why) = crate::engine::uring::unavailable() {
        return Some(why);
    }
    let probe = match opcodes() {
        Ok(p) => p,
        Err(why) => return Some(why),
    };
    let needed = [
        ("AcceptMulti", opcode::AcceptMulti::CODE),
        ("Connect", opcode::Connect::CODE),
        ("LinkTimeout", opcode::LinkTimeout::CODE),
        ("Recv", opcode::Recv::CODE),
        ("Send", opcode::Send::CODE),
        ("PollAdd", opcode::PollAdd::CODE),
        ("AsyncCancel", opcode::AsyncCancel2::CODE),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, code)| !probe.is_supported(*code))
        .map(|(name, _)| *name)
        .collect();
    (!missing.is_empty()).then(|| format!("io_uring lacks {}", missing.join(", ")))
}

/// The io_uring opcodes this kernel has (read through a throw-away ring), or why they
/// could not be read.
pub fn opcodes() -> Result<io_uring::Probe, String> {
    let ring = IoUring::new(2).map_err(|e| format!("io_uring set-up failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring opcode probe failed: {e}"))?;
    Ok(probe)
}

/// Why zero-copy receive (RecvZc) cannot be issued here, if it cannot.
pub fn recv_zc_unavailable() -> Option<String> {
    match opcodes() {
        Err(why) => Some(why),
        Ok(p) if !p.is_supported(opcode::RecvZc::CODE) => {
            Some("the kernel lacks io_uring RecvZc (Linux 6.15 or later)".into())
        }
        Ok(_) => None,
    }
}

/// Why provided buffer rings cannot be used here, if they cannot.
pub fn buffer_ring_unavailable() -> Option<String> {
    let ring = match IoUring::new(2) {
        Ok(r) => r,
        Err(e) => return Some(format!("io_uring set-up failed: {e}")),
    };
    crate::doctor::buffer_ring_probe(&ring)
        .err()
        .map(|e| format!("provided buffer rings are not supported: {e}"))
}

impl UringOps {
    /// A ring (SINGLE_ISSUER and DEFER_TASKRUN when available) and, when `pool` is
    /// `Some((count, size))`, a provided buffer ring of `count` buffers of `size` bytes.
    pub fn new(pool: Option<(u16, usize)>) -> io::Result<Self> {
        let (ring, deferred) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(16_384)
            .build(4096)
        {
            Ok(r) => (r, true),
            Err(_) => (IoUring::builder().setup_cqsize(16_384).build(4096)?, false),
        };
        let mut ops = Self {
            ring,
            deferred,
            batch: None,
            bufs: None,
            zc: None,
        };
        if let Some((count, size)) = pool {
            ops.add_pool(count, size)?;
        }
        Ok(ops)
    }
}

impl UringOps<cqueue::Entry32> {
    /// A ring with 32-byte completions and the zero-copy receive queue `zc` registered
    /// on it (the kernel's error when it refuses), plus the pool as in [`UringOps::new`].
    pub fn with_zero_copy(pool: Option<(u16, usize)>, zc: ZcSpec) -> io::Result<Self> {
        // Each receive posts a completion per chunk, which cannot overflow into the
        // kernel's backlog (the receive ends with ENOSPC instead): the largest queue.
        let context = |what: &str| {
            let what = what.to_owned();
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        let ring = IoUring::<squeue::Entry, cqueue::Entry32>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_cqsize(65_536)
            .build(4096)
            .map_err(context(
                "setting up an io_uring ring with 32-byte completions (single issuer, deferred task work)",
            ))?;
        let zc =
            Zcrx::register(&ring, zc).map_err(context("the kernel refused a zero-copy queue"))?;
        let mut ops = Self {
            ring,
            deferred: true,
            batch: None,
            bufs: None,
            zc: Some(zc),
        };
        if let Some((count, size)) = pool {
            ops.add_pool(count, size)
                .map_err(context("the buffer pool beside the zero-copy queue"))?;
        }
        Ok(ops)
    }
}

impl<C: Cqe> UringOps<C> {
    fn entry(&self, op: Op) -> Vec<squeue::Entry> {
        match op {
            Op::RecvZc { fd, len } => vec![
                opcode::RecvZc::new(types::Fd(fd), len)
                    .ifq(self.zc.as_ref().map_or(u32::MAX, |z| z.id))
                    .build(),
            ],
            Op::SendMsg { fd, msg } => vec![
                opcode::SendMsg::new(types::Fd(fd), msg)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build(),
            ],
            Op::AcceptMulti { fd } => vec![
                opcode::AcceptMulti::new(types::Fd(fd))
                    .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
                    .build(),
            ],
            Op::Recv {
                fd,
                buf,
                len,
                flags,
            } => vec![
                opcode::Recv::new(types::Fd(fd), buf, len)
                    .flags(flags)
                    .build(),
            ],
            Op::RecvPooled { fd, len } => vec![
                opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), len)
                    .buf_group(BGID)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT),
            ],
            Op::Send { fd, buf, len } => vec![
                opcode::Send::new(types::Fd(fd), buf, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build(),
            ],
            Op::Connect {
                fd,
                addr,
                addr_len,
                timeout,
                timeout_user_data,
                ..
            } => vec![
                opcode::Connect::new(types::Fd(fd), addr, addr_len)
                    .build()
                    .flags(squeue::Flags::IO_LINK),
                // `timeout` lives in the connection, which outlives both operations.
                opcode::LinkTimeout::new(timeout)
                    .build()
                    .user_data(timeout_user_data),
            ],
            Op::Poll { fd, events } => {
                vec![opcode::PollAdd::new(types::Fd(fd), events).build()]
            }
            Op::CancelFd { fd } => vec![
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build(),
            ],
        }
    }
}

impl<C: Cqe> Ops for UringOps<C> {
    fn push(&mut self, op: Op, user_data: u64) -> bool {
        let zero_copy = matches!(op, Op::RecvZc { .. });
        if zero_copy && self.zc.is_none() {
            tracing::error!("zero-copy receive without a registered queue");
            return false;
        }
        let mut entries = self.entry(op);
        entries[0] = entries[0].clone().user_data(user_data);
        // All entries of one operation (a linked pair) go in together or not at all.
        let room = |ring: &mut IoUring<squeue::Entry, C>| {
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        if room(&mut self.ring) < entries.len() {
            self.flush();
            if room(&mut self.ring) < entries.len() {
                tracing::error!("io_uring submission queue full; operation dropped");
                return false;
            }
        }
        // SAFETY: every operation refers to fds and memory its worker owns until the
        // operation completed (connections live in boxes freed only once none of their
        // operations is in flight; pooled buffers live as long as the ring). There is
        // room for all of them (checked above), so none fails alone.
        let queued = entries
            .iter()
            .all(|e| unsafe { self.ring.submission().push(e) }.is_ok());
        if !queued {
            tracing::error!("io_uring submission queue full; operation dropped");
        }
        // Only a queued receive may have its completions read as zero-copy chunks.
        if queued
            && zero_copy
            && let Some(zc) = self.zc.as_mut()
        {
            zc.issued(user_data);
        }
        queued
    }

    fn flush(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::warn!(error = %e, "io_uring submit");
        }
    }

    fn can_gather(&self) -> bool {
        // Deferred task work wakes the thread at the batch, not at each completion, and
        // the kernel must know minimum waits (an older one rejects the field).
        self.deferred && self.ring.params().is_feature_min_timeout()
    }

    fn gather(&mut self, batch: Option<Batch>) {
        self.batch = batch.filter(|_| self.can_gather());
    }

    fn wait(&mut self, timeout: Duration, out: &mut Vec<(u64, i32, u32)>) {
        if let Some(p) = self.bufs.as_mut() {
            p.top_up();
        }
        if let Some(z) = self.zc.as_mut() {
            z.publish();
        }
        let mut batch = self.batch;
        if batch.is_some() {
            // What completes as it is submitted (a poll on a socket that is ready) is
            // work already here: no reason to wait for company.
            self.flush();
            if !self.ring.completion().is_empty() {
                batch = None;
            }
        }
        let waited = if timeout.is_zero() {
            crate::engine::uring::submit_and_reap(&mut self.ring)
        } else {
            crate::engine::uring::submit_and_wait_batch(&self.ring, timeout, batch)
        };
        if let Err(e) = waited {
            tracing::error!(error = %e, "io_uring wait");
        }
        let first = out.len();
        let zc = &mut self.zc;
        out.extend(self.ring.completion().map(|c| {
            let (ud, res, flags, extra) = c.parts();
            match zc.as_mut() {
                Some(z) if z.owns(ud) => {
                    let (res, flags) = z.translate(ud, res, flags, extra);
                    (ud, res, flags)
                }
                _ => (ud, res, flags),
            }
        }));
        // A wait that reaped nothing says nothing about buffer pressure: a busy-polling
        // worker makes thousands of them in a lull, which would otherwise count as quiet
        // waits and shrink the posted buffers after every pause.
        if let Some(p) = self.bufs.as_mut().filter(|_| out.len() > first) {
            let new = &out[first..];
            let consumed = new
                .iter()
                .filter(|c| super::buffer_select(c.2).is_some())
                .count();
            let empty = new.iter().any(|c| c.1 == -libc::ENOBUFS);
            p.saw(u16::try_from(consumed).unwrap_or(u16::MAX), empty);
        }
    }

    fn buf(&self, bid: BufId, len: usize) -> &[u8] {
        match bid {
            BufId::Pool(bid) => self.bufs.as_ref().map_or(&[], |p| p.ring.buf(bid, len)),
            BufId::Zc(id) => self.zc.as_ref().map_or(&[], |z| z.data(id, len)),
        }
    }

    fn recycle(&mut self, bid: BufId) {
        match bid {
            BufId::Pool(bid) => {
                if let Some(p) = self.bufs.as_mut() {
                    p.free.push(bid);
                }
            }
            BufId::Zc(id) => {
                if let Some(z) = self.zc.as_mut() {
                    z.give_back(id);
                }
            }
        }
    }

    fn has_pool(&self) -> bool {
        self.bufs.is_some()
    }

    fn buffers_available(&self) -> bool {
        self.bufs
            .as_ref()
            .is_some_and(|p| p.posted > 0 || !p.free.is_empty())
    }

    fn add_pool(&mut self, count: u16, size: usize) -> io::Result<()> {
        if self.bufs.is_some() {
            return Err(io::Error::other("the buffer pool exists already"));
        }
        let ring = BufRing::empty(count, size)?;
        // SAFETY: page-aligned ring region owned by this value; unregistered in Drop
        // before it is freed.
        unsafe {
            self.ring
                .submitter()
                .register_buf_ring_with_flags(ring.ring_addr(), count, BGID, 0)?;
        }
        let mut pool = Pool {
            ring,
            // Buffer 0 on top.
            free: (0..count).rev().collect(),
            posted: 0,
            target: HOT.min(count),
            count,
            quiet_waits: 0,
        };
        pool.top_up();
        self.bufs = Some(pool);
        Ok(())
    }

    fn forget(&mut self, _fd: RawFd) {}

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

impl<C: Cqe> Drop for UringOps<C> {
    fn drop(&mut self) {
        if self.bufs.is_some() {
            let _ = self.ring.submitter().unregister_buf_ring(BGID);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Empty polls (a busy-polling worker's lulls) leave the posted-buffer target alone;
    /// only waits that reaped completions count towards shrinking it.
    #[test]
    fn empty_polls_do_not_shrink_the_posted_buffers() {
        if let Some(why) = unavailable() {
            assert!(
                std::env::var("CI").is_err(),
                "CI forbids skipping: io_uring is not usable: {why}"
            );
            eprintln!("skipped: io_uring is not usable here: {why}");
            return;
        }
        let mut ops = UringOps::new(Some((128, 4096))).unwrap();
        ops.bufs.as_mut().unwrap().target = 128;
        let mut out = Vec::new();
        for _ in 0..SHRINK_AFTER + 10 {
            ops.wait(Duration::ZERO, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(ops.bufs.as_ref().unwrap().target, 128);
    }
}

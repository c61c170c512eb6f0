//! The operations a TCP worker asks of its event backend, and the two backends that carry
//! them out: io_uring (each operation is one SQE, each result one CQE) and epoll (the
//! same operations emulated with non-blocking syscalls on readiness, for kernels where
//! io_uring is disabled or lacks an opcode). The worker's connection state machines see
//! the same completions either way: `(user_data, result, flags)`, with io_uring's flag
//! bits for "more to come" (multishot accept, zero-copy receive) and "buffer selected",
//! and the backend's own bit for a zero-copy chunk ([`F_ZC`]).
use std::{os::fd::RawFd, time::Duration};

use io_uring::types;

pub use crate::engine::uring::Batch;

pub mod epoll;
pub mod uring;
pub mod zcrx;

/// io_uring's CQE flag bits (kernel ABI), also produced by the epoll backend.
pub const F_BUFFER: u32 = 1;
pub const F_MORE: u32 = 2;
/// Set by the io_uring backend (not the kernel) on a zero-copy receive's data
/// completion: the upper 16 bits then name a chunk of the zero-copy area.
pub const F_ZC: u32 = 1 << 14;
const BUFFER_SHIFT: u32 = 16;

/// Whether a multishot operation stays armed after this completion.
pub fn more(flags: u32) -> bool {
    flags & F_MORE != 0
}

/// The pool buffer a receive with buffer selection filled, if any.
pub fn buffer_select(flags: u32) -> Option<u16> {
    (flags & F_BUFFER != 0).then_some((flags >> BUFFER_SHIFT) as u16)
}

/// Memory a receive completed into: a buffer of the pool, or a chunk of the zero-copy
/// receive area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufId {
    Pool(u16),
    Zc(u16),
}

/// The memory a receive's completion names, if any.
pub fn received_buffer(flags: u32) -> Option<BufId> {
    if flags & F_ZC != 0 {
        return Some(BufId::Zc((flags >> BUFFER_SHIFT) as u16));
    }
    buffer_select(flags).map(BufId::Pool)
}

/// One operation; each completes exactly once (a multishot accept once per connection,
/// with [`F_MORE`] while it stays armed). Pointers must stay valid until completion.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Accept connections (non-blocking, close-on-exec) until cancelled or an error.
    AcceptMulti { fd: RawFd },
    /// Receive into `buf`: with `MSG_PEEK` without consuming, with `MSG_WAITALL` until
    /// `len` bytes, end of file or an error.
    Recv {
        fd: RawFd,
        buf: *mut u8,
        len: u32,
        flags: i32,
    },
    /// Receive up to `len` bytes into a buffer of the backend's pool (`-ENOBUFS` when
    /// none is free); the completion names it ([`buffer_select`]).
    RecvPooled { fd: RawFd, len: u32 },
    /// Zero-copy receive (io_uring only, on a worker with a registered queue): up to
    /// `len` bytes, one completion per chunk with [`F_MORE`] ([`received_buffer`] names
    /// it), then a last completion without: 0 after `len` bytes or at end of file, or
    /// an error.
    RecvZc { fd: RawFd, len: u32 },
    /// Send (never raising SIGPIPE); may complete with fewer bytes than asked.
    Send { fd: RawFd, buf: *const u8, len: u32 },
    /// `sendmsg` of the iovecs `msg` names (never raising SIGPIPE): the zero-copy path
    /// sends several chunks at once. io_uring only.
    SendMsg { fd: RawFd, msg: *const libc::msghdr },
    /// Connect, with a timeout that completes separately as `timeout_user_data`:
    /// `-ETIME` when it fired (the connect then completes with `-ECANCELED`),
    /// `-ECANCELED` when the connect finished first.
    Connect {
        fd: RawFd,
        addr: *const libc::sockaddr,
        addr_len: u32,
        /// Read when the operation is submitted (io_uring); lives in the connection.
        timeout: *const types::Timespec,
        timeout_after: Duration,
        timeout_user_data: u64,
    },
    /// Completes once `fd` is ready for `events` (`POLLIN`, `POLLOUT`).
    Poll { fd: RawFd, events: u32 },
    /// Cancels every operation on `fd` (each completes with `-ECANCELED`); the cancel
    /// completes too. Issue it while `fd` is still open.
    CancelFd { fd: RawFd },
}

/// An event backend: operations in, completions out.
pub trait Ops {
    /// Queues `op`; false (logged) when it could not be queued.
    fn push(&mut self, op: Op, user_data: u64) -> bool;
    /// Hands queued operations to the kernel now (before an fd they name is closed).
    fn flush(&mut self);
    /// Waits up to `timeout` for at least one completion; appends what completed. A zero
    /// `timeout` never sleeps: it reaps what has completed (a busy poll).
    fn wait(&mut self, timeout: Duration, out: &mut Vec<(u64, i32, u32)>);
    /// Whether waits can gather completions ([`Ops::gather`]).
    fn can_gather(&self) -> bool {
        false
    }
    /// With `Some(batch)` (bulk traffic), the next waits gather completions (see
    /// [`Batch`]) instead of waking at each; `None` wakes at each. Ignored where
    /// [`Ops::can_gather`] is false.
    fn gather(&mut self, _batch: Option<Batch>) {}
    /// The first `len` bytes of buffer or chunk `bid`.
    fn buf(&self, bid: BufId, len: usize) -> &[u8];
    /// Returns buffer or chunk `bid` (a chunk goes back to the NIC).
    fn recycle(&mut self, bid: BufId);
    /// Whether a buffer pool exists.
    fn has_pool(&self) -> bool;
    /// Whether a pooled receive issued now could find a buffer.
    fn buffers_available(&self) -> bool;
    /// Creates the buffer pool (`count` buffers of `size` bytes) when there is none yet:
    /// a reload switching to the buffers path.
    fn add_pool(&mut self, count: u16, size: usize) -> std::io::Result<()>;
    /// `fd` is about to be closed: forget whatever is known about it (no operation on it
    /// may be in flight).
    fn forget(&mut self, fd: RawFd);
    fn name(&self) -> &'static str;
}

#[cfg(test)]
mod tests;

//! The epoll backend: the worker's operations carried out as non-blocking syscalls when
//! their fd is ready. Each fd is registered once, edge-triggered, for both directions;
//! the backend remembers whether the fd was last found readable / writable and tries
//! queued operations while it is, so a steady stream costs one syscall per operation and
//! no `epoll_ctl` per operation. Completions look like io_uring's (see the module above).
use std::{
    collections::{HashMap, VecDeque},
    io,
    os::fd::{BorrowedFd, RawFd},
    time::{Duration, Instant},
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::{BUFFER_SHIFT, BufId, F_BUFFER, F_MORE, Op, Ops};

pub struct EpollOps {
    epoll: Epoll,
    fds: HashMap<RawFd, FdState>,
    /// Fds with operations to try now.
    dirty: Vec<RawFd>,
    /// Completions not handed out yet.
    done: Vec<(u64, i32, u32)>,
    /// Connects in progress and when they time out.
    connecting: Vec<(Instant, RawFd)>,
    pool: Option<BufPool>,
    events: Vec<EpollEvent>,
}

#[derive(Default)]
struct FdState {
    reads: VecDeque<Pending>,
    writes: VecDeque<Pending>,
    /// Last known readiness; cleared by EAGAIN (or a poll, see `push`), set by events.
    readable: bool,
    writable: bool,
    registered: bool,
    queued: bool,
}

struct Pending {
    user_data: u64,
    op: Op,
    /// Bytes received so far (MSG_WAITALL).
    so_far: usize,
    /// The connect was issued and is in progress.
    started: bool,
}

/// Buffers handed out last-in first-out: the one just returned is the one still in cache.
struct BufPool {
    data: Vec<u8>,
    size: usize,
    free: Vec<u16>,
}

impl BufPool {
    fn new(count: u16, size: usize) -> Self {
        Self {
            data: vec![0; usize::from(count) * size],
            size,
            free: (0..count).rev().collect(),
        }
    }

    /// The start of buffer `bid`, without a reference over the others (sends may be
    /// reading them).
    fn ptr(&mut self, bid: u16) -> *mut u8 {
        let offset = usize::from(bid) * self.size;
        assert!(
            offset + self.size <= self.data.len(),
            "buffer {bid} out of the pool"
        );
        // SAFETY: in bounds (checked above); `Vec::as_mut_ptr` creates no reference to
        // the elements.
        unsafe { self.data.as_mut_ptr().add(offset) }
    }
}

// SAFETY: the raw pointers in queued operations point into memory of the worker that
// owns this backend; both live and die on that worker's thread.
unsafe impl Send for EpollOps {}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn would_block(e: i32) -> bool {
    e == libc::EAGAIN || e == libc::EWOULDBLOCK
}

impl EpollOps {
    /// An epoll instance and, when `pool` is `Some((count, size))`, `count` buffers of
    /// `size` bytes for pooled receives.
    pub fn new(pool: Option<(u16, usize)>) -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            fds: HashMap::new(),
            dirty: Vec::new(),
            done: Vec::new(),
            connecting: Vec::new(),
            pool: pool.map(|(count, size)| BufPool::new(count, size)),
            events: vec![EpollEvent::empty(); 256],
        })
    }

    fn mark(&mut self, fd: RawFd) {
        if let Some(st) = self.fds.get_mut(&fd)
            && !st.queued
        {
            st.queued = true;
            self.dirty.push(fd);
        }
    }

    fn register(&mut self, fd: RawFd) -> io::Result<()> {
        let st = self.fds.entry(fd).or_default();
        if st.registered {
            return Ok(());
        }
        // SAFETY: the worker keeps `fd` open while operations on it are queued and
        // calls `forget` before closing it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        self.epoll
            .add(borrowed, EpollEvent::new(flags, fd as u64))?;
        // Optimistic: the first attempt tells; the registration reports the current
        // state as an event anyway.
        st.registered = true;
        st.readable = true;
        st.writable = true;
        Ok(())
    }

    /// Completes `p`, and its timeout (cancelled: the connect ended first) when it is a
    /// connect.
    fn complete(&mut self, p: &Pending, res: i32, flags: u32) {
        self.done.push((p.user_data, res, flags));
        if let Op::Connect {
            timeout_user_data, ..
        } = p.op
        {
            self.done.push((timeout_user_data, -libc::ECANCELED, 0));
        }
    }

    fn process(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &fd in &dirty {
            let Some(st) = self.fds.get_mut(&fd) else {
                continue;
            };
            st.queued = false;
            self.try_reads(fd);
            self.try_writes(fd);
        }
        // Keep the allocation.
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn try_reads(&mut self, fd: RawFd) {
        loop {
            let Some(st) = self.fds.get_mut(&fd) else {
                return;
            };
            if !st.readable {
                return;
            }
            let Some(mut p) = st.reads.pop_front() else {
                return;
            };
            match self.attempt_read(fd, &mut p) {
                Attempt::Done(res, flags, stays) => {
                    self.done.push((p.user_data, res, flags));
                    if stays && let Some(st) = self.fds.get_mut(&fd) {
                        st.reads.push_front(p);
                    }
                }
                Attempt::Blocked => {
                    if let Some(st) = self.fds.get_mut(&fd) {
                        st.readable = false;
                        st.reads.push_front(p);
                    }
                    return;
                }
            }
        }
    }

    fn attempt_read(&mut self, fd: RawFd, p: &mut Pending) -> Attempt {
        match p.op {
            Op::AcceptMulti { .. } => loop {
                // SAFETY: plain accept4 on a listening socket the worker owns; the new
                // fd is handed to the worker in the completion.
                let n = unsafe {
                    libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                    )
                };
                if n >= 0 {
                    return Attempt::Done(n, F_MORE, true);
                }
                match errno() {
                    e if would_block(e) => return Attempt::Blocked,
                    // A handshake aborted before we took it: take the next one.
                    libc::ECONNABORTED | libc::EINTR => continue,
                    // The multishot ends; the worker re-arms it.
                    e => return Attempt::Done(-e, 0, false),
                }
            },
            Op::Recv {
                buf, len, flags, ..
            } => {
                let peek = flags & libc::MSG_PEEK != 0;
                let all = flags & libc::MSG_WAITALL != 0 && !peek;
                loop {
                    let want = len as usize - p.so_far;
                    // SAFETY: `buf` has room for `len` bytes (the worker's header buffer,
                    // alive until this completes); `so_far < len`.
                    let n = unsafe {
                        libc::recv(
                            fd,
                            buf.add(p.so_far).cast(),
                            want,
                            (flags & libc::MSG_PEEK) | libc::MSG_DONTWAIT,
                        )
                    };
                    if n < 0 {
                        let e = errno();
                        if e == libc::EINTR {
                            continue;
                        }
                        if would_block(e) {
                            return Attempt::Blocked;
                        }
                        return Attempt::Done(
                            if p.so_far > 0 { p.so_far as i32 } else { -e },
                            0,
                            false,
                        );
                    }
                    p.so_far += n as usize;
                    if !all || n == 0 || p.so_far == len as usize {
                        return Attempt::Done(p.so_far as i32, 0, false);
                    }
                }
            }
            Op::RecvPooled { len, .. } => {
                let Some(pool) = self.pool.as_mut() else {
                    return Attempt::Done(-libc::ENOBUFS, 0, false);
                };
                let Some(bid) = pool.free.pop() else {
                    return Attempt::Done(-libc::ENOBUFS, 0, false);
                };
                let want = (len as usize).min(pool.size);
                let ptr = pool.ptr(bid);
                let n = loop {
                    // SAFETY: `ptr` starts a pool buffer of `pool.size >= want` bytes that
                    // nobody else holds (it was just taken from the free list).
                    let n = unsafe { libc::recv(fd, ptr.cast(), want, libc::MSG_DONTWAIT) };
                    if n >= 0 || errno() != libc::EINTR {
                        break n;
                    }
                };
                if n > 0 {
                    return Attempt::Done(
                        n as i32,
                        F_BUFFER | u32::from(bid) << BUFFER_SHIFT,
                        false,
                    );
                }
                let e = errno();
                pool.free.push(bid);
                match n {
                    0 => Attempt::Done(0, 0, false),
                    _ if would_block(e) => Attempt::Blocked,
                    _ => Attempt::Done(-e, 0, false),
                }
            }
            Op::Poll { .. } => Attempt::Done(libc::POLLIN.into(), 0, false),
            _ => Attempt::Done(-libc::EINVAL, 0, false),
        }
    }

    fn try_writes(&mut self, fd: RawFd) {
        loop {
            let Some(st) = self.fds.get_mut(&fd) else {
                return;
            };
            if !st.writable {
                return;
            }
            let Some(mut p) = st.writes.pop_front() else {
                return;
            };
            match self.attempt_write(fd, &mut p) {
                Attempt::Done(res, flags, _) => self.complete(&p, res, flags),
                Attempt::Blocked => {
                    if let Some(st) = self.fds.get_mut(&fd) {
                        st.writable = false;
                        st.writes.push_front(p);
                    }
                    return;
                }
            }
        }
    }

    fn attempt_write(&mut self, fd: RawFd, p: &mut Pending) -> Attempt {
        match p.op {
            Op::Send { buf, len, .. } => sent(|| {
                // SAFETY: `buf` holds `len` bytes that stay put until this completes.
                unsafe {
                    libc::send(
                        fd,
                        buf.cast(),
                        len as usize,
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                }
            }),
            Op::SendMsg { msg, .. } => sent(|| {
                // SAFETY: `msg` and the iovecs it names stay put until this completes.
                unsafe { libc::sendmsg(fd, msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) }
            }),
            Op::Connect {
                addr,
                addr_len,
                timeout_after,
                ..
            } if !p.started => {
                // SAFETY: `addr` points at a socket address of `addr_len` bytes in the
                // connection, alive until this completes.
                let r = unsafe { libc::connect(fd, addr, addr_len) };
                if r == 0 {
                    return Attempt::Done(0, 0, false);
                }
                match errno() {
                    libc::EINPROGRESS | libc::EINTR => {
                        p.started = true;
                        self.connecting.push((Instant::now() + timeout_after, fd));
                        Attempt::Blocked
                    }
                    e => Attempt::Done(-e, 0, false),
                }
            }
            Op::Connect { .. } => {
                self.connecting.retain(|&(_, f)| f != fd);
                // SAFETY: `fd` is a socket the worker owns.
                let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
                match nix::sys::socket::getsockopt(
                    &borrowed,
                    nix::sys::socket::sockopt::SocketError,
                ) {
                    Ok(0) => Attempt::Done(0, 0, false),
                    Ok(e) => Attempt::Done(-e, 0, false),
                    Err(e) => Attempt::Done(-(e as i32), 0, false),
                }
            }
            Op::Poll { .. } => Attempt::Done(libc::POLLOUT.into(), 0, false),
            _ => Attempt::Done(-libc::EINVAL, 0, false),
        }
    }

    /// Connects past their timeout: the connect completes with `-ECANCELED`, its timeout
    /// with `-ETIME`, as io_uring's linked timeout does.
    fn expire(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.connecting.len() {
            let (deadline, fd) = self.connecting[i];
            if deadline > now {
                i += 1;
                continue;
            }
            self.connecting.swap_remove(i);
            let Some(st) = self.fds.get_mut(&fd) else {
                continue;
            };
            let Some(at) = st
                .writes
                .iter()
                .position(|p| matches!(p.op, Op::Connect { .. }))
            else {
                continue;
            };
            let Some(p) = st.writes.remove(at) else {
                continue;
            };
            self.done.push((p.user_data, -libc::ECANCELED, 0));
            if let Op::Connect {
                timeout_user_data, ..
            } = p.op
            {
                self.done.push((timeout_user_data, -libc::ETIME, 0));
            }
        }
    }

    fn cancel(&mut self, fd: RawFd) -> i32 {
        self.connecting.retain(|&(_, f)| f != fd);
        let Some(st) = self.fds.remove(&fd) else {
            return -libc::ENOENT;
        };
        if st.registered {
            // SAFETY: `fd` is still open (cancels are issued before closing).
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = self.epoll.delete(borrowed);
        }
        let n = st.reads.len() + st.writes.len();
        for p in st.reads.iter().chain(st.writes.iter()) {
            self.complete(p, -libc::ECANCELED, 0);
        }
        n as i32
    }
}

/// The outcome of a non-blocking send syscall, retried on EINTR.
fn sent(mut call: impl FnMut() -> isize) -> Attempt {
    loop {
        let n = call();
        if n >= 0 {
            return Attempt::Done(n as i32, 0, false);
        }
        match errno() {
            libc::EINTR => continue,
            e if would_block(e) => return Attempt::Blocked,
            e => return Attempt::Done(-e, 0, false),
        }
    }
}

enum Attempt {
    /// Result, flags, and whether the operation stays queued (multishot).
    Done(i32, u32, bool),
    Blocked,
}

impl Ops for EpollOps {
    fn push(&mut self, op: Op, user_data: u64) -> bool {
        let fd = match op {
            Op::CancelFd { fd } => {
                let n = self.cancel(fd);
                self.done.push((user_data, n, 0));
                return true;
            }
            Op::RecvZc { .. } => {
                tracing::error!("zero-copy receive needs the io_uring engine");
                return false;
            }
            Op::AcceptMulti { fd }
            | Op::Recv { fd, .. }
            | Op::RecvPooled { fd, .. }
            | Op::Send { fd, .. }
            | Op::SendMsg { fd, .. }
            | Op::Connect { fd, .. }
            | Op::Poll { fd, .. } => fd,
        };
        if let Err(e) = self.register(fd) {
            tracing::error!(error = %e, fd, "epoll registration");
            return false;
        }
        let reads = match op {
            Op::AcceptMulti { .. } | Op::Recv { .. } | Op::RecvPooled { .. } => true,
            Op::Poll { events, .. } => events & libc::POLLIN as u32 != 0,
            _ => false,
        };
        if let Op::Poll { events, .. } = op {
            // The worker's own syscalls (splice) do not go through here, so the flags
            // may be stale either way: ask the kernel. Ready → done at once; not ready →
            // wait for the next edge (the fd is registered already, so anything that
            // arrives from now on raises one).
            let mut pfd = libc::pollfd {
                fd,
                events: events as i16,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let r = unsafe { libc::poll(&mut pfd, 1, 0) };
            if r > 0 && pfd.revents != 0 {
                self.done.push((user_data, i32::from(pfd.revents), 0));
                return true;
            }
        }
        let Some(st) = self.fds.get_mut(&fd) else {
            return false;
        };
        if let Op::Poll { .. } = op {
            if reads {
                st.readable = false;
            } else {
                st.writable = false;
            }
        }
        let p = Pending {
            user_data,
            op,
            so_far: 0,
            started: false,
        };
        if reads {
            st.reads.push_back(p);
        } else {
            st.writes.push_back(p);
        }
        self.mark(fd);
        true
    }

    fn flush(&mut self) {}

    fn wait(&mut self, timeout: Duration, out: &mut Vec<(u64, i32, u32)>) {
        self.process();
        let now = Instant::now();
        self.expire(now);
        let timeout = if self.done.is_empty() {
            self.connecting
                .iter()
                .map(|&(d, _)| d.saturating_duration_since(now))
                .fold(timeout, Duration::min)
        } else {
            Duration::ZERO
        };
        // Rounded up: a connect due in 0.3 ms must not spin on a zero timeout.
        let ms = u16::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(u16::MAX);
        let n = match self.epoll.wait(&mut self.events, EpollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait");
                0
            }
        };
        for i in 0..n {
            let ev = self.events[i];
            let fd = ev.data() as RawFd;
            let f = ev.events();
            let Some(st) = self.fds.get_mut(&fd) else {
                continue;
            };
            let trouble = f.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP);
            if trouble || f.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP) {
                st.readable = true;
            }
            if trouble || f.contains(EpollFlags::EPOLLOUT) {
                st.writable = true;
            }
            self.mark(fd);
        }
        self.process();
        self.expire(Instant::now());
        out.append(&mut self.done);
    }

    fn buf(&self, bid: BufId, len: usize) -> &[u8] {
        let BufId::Pool(bid) = bid else { return &[] };
        self.pool.as_ref().map_or(&[], |p| {
            let start = usize::from(bid) * p.size;
            &p.data[start..start + len.min(p.size)]
        })
    }

    fn recycle(&mut self, bid: BufId) {
        if let BufId::Pool(bid) = bid
            && let Some(p) = self.pool.as_mut()
        {
            p.free.push(bid);
        }
    }

    fn has_pool(&self) -> bool {
        self.pool.is_some()
    }

    fn buffers_available(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| !p.free.is_empty())
    }

    fn add_pool(&mut self, count: u16, size: usize) -> io::Result<()> {
        if self.pool.is_some() {
            return Err(io::Error::other("the buffer pool exists already"));
        }
        self.pool = Some(BufPool::new(count, size));
        Ok(())
    }

    fn forget(&mut self, fd: RawFd) {
        // Nothing should be queued on it; if something is, it completes as cancelled
        // rather than vanishing (a connection waiting on it would never be freed).
        if self
            .fds
            .get(&fd)
            .is_some_and(|st| !st.reads.is_empty() || !st.writes.is_empty())
        {
            tracing::error!(
                fd,
                "operations still queued on an fd being closed; cancelled"
            );
        }
        self.cancel(fd);
    }

    fn name(&self) -> &'static str {
        "epoll"
    }
}

//! epoll backend: level-triggered readiness, then `recvmmsg` batches into buffers
//! allocated once, until the socket is empty.
use std::{io, net::UdpSocket, os::fd::AsRawFd, time::Duration};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::{BackendStats, Datagram, ReceiveBackend, ReceiveConfig, socket::sockaddr};

pub struct EpollBackend {
    epoll: Epoll,
    sockets: Vec<UdpSocket>,
    buf_size: usize,
    batch: usize,
    data: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    stats: BackendStats,
    watched: usize,
}

/// epoll data of watched fds: this bit set, the watch index below it.
const WATCH_TAG: u64 = 1 << 63;

// SAFETY: the raw pointers in `iovs`/`hdrs` point into `data`/`names`/`iovs`, which this
// value owns and never reallocates; it is used by one thread at a time.
unsafe impl Send for EpollBackend {}

impl EpollBackend {
    pub fn new(sockets: Vec<UdpSocket>, cfg: ReceiveConfig) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, s) in sockets.iter().enumerate() {
            epoll.add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        }
        let batch = usize::from(cfg.buffers).clamp(1, 256);
        // SAFETY: sockaddr_storage and mmsghdr are plain data; all-zero is valid.
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut b = Self {
            epoll,
            sockets,
            buf_size: cfg.buffer_size,
            batch,
            data: vec![0u8; batch * cfg.buffer_size],
            names: vec![zero_name; batch],
            iovs: Vec::with_capacity(batch),
            // SAFETY: as above.
            hdrs: (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect(),
            stats: BackendStats::default(),
            watched: 0,
        };
        for i in 0..batch {
            b.iovs.push(libc::iovec {
                iov_base: b.data[i * b.buf_size..].as_mut_ptr().cast(),
                iov_len: b.buf_size,
            });
        }
        for i in 0..batch {
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
            h.msg_name = (&raw mut b.names[i]).cast();
        }
        Ok(b)
    }

    fn drain(&mut self, idx: usize, on: &mut dyn FnMut(super::Event<'_>)) -> io::Result<usize> {
        let fd = self.sockets[idx].as_raw_fd();
        let mut total = 0;
        loop {
            for h in &mut self.hdrs {
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_hdr.msg_flags = 0;
            }
            // SAFETY: `hdrs` holds `batch` initialised headers pointing into owned buffers.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    self.batch as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(total);
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.stats.errors += 1;
                return Err(e);
            }
            let n = n as usize;
            for i in 0..n {
                let h = &self.hdrs[i];
                let len = (h.msg_len as usize).min(self.buf_size);
                let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                // SAFETY: names[i] is a sockaddr_storage; the kernel wrote msg_namelen bytes.
                let name = unsafe {
                    std::slice::from_raw_parts(
                        (&raw const self.names[i]).cast::<u8>(),
                        (h.msg_hdr.msg_namelen as usize).min(size_of::<libc::sockaddr_storage>()),
                    )
                };
                let payload = &self.data[i * self.buf_size..i * self.buf_size + len];
                self.stats.datagrams += 1;
                self.stats.bytes += len as u64;
                self.stats.truncated += u64::from(truncated);
                on(super::Event::Datagram(Datagram {
                    payload,
                    source: sockaddr(name),
                    socket: idx,
                    truncated,
                }));
            }
            total += n;
            if n < self.batch {
                return Ok(total);
            }
        }
    }
}

impl ReceiveBackend for EpollBackend {
    fn watch(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        // SAFETY: the caller guarantees the fd outlives the backend.
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let n = self.watched;
        self.epoll.add(
            bfd,
            EpollEvent::new(EpollFlags::EPOLLIN, WATCH_TAG | n as u64),
        )?;
        self.watched += 1;
        Ok(n)
    }

    fn poll_events(
        &mut self,
        timeout: Duration,
        on: &mut dyn FnMut(super::Event<'_>),
    ) -> io::Result<usize> {
        let mut events = [EpollEvent::empty(); 16];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let ready = match self.epoll.wait(&mut events, EpollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let mut n = 0;
        for ev in &events[..ready] {
            if ev.data() & WATCH_TAG != 0 {
                on(super::Event::Ready((ev.data() & !WATCH_TAG) as usize));
            } else {
                n += self.drain(ev.data() as usize, on)?;
            }
        }
        Ok(n)
    }

    fn stats(&self) -> BackendStats {
        self.stats
    }

    fn name(&self) -> &'static str {
        "epoll"
    }

    fn coalesce_when_busy(&self) -> bool {
        true
    }
}

//! epoll backend: level-triggered readiness, then `recvmmsg` batches into buffers
//! allocated once, until the socket is empty.
use std::{
    io,
    net::UdpSocket,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::{BackendStats, Datagram, ReceiveBackend, ReceiveConfig, socket::RecvBatch};

pub struct EpollBackend {
    epoll: Epoll,
    sockets: Vec<UdpSocket>,
    batch: RecvBatch,
    stats: BackendStats,
    watched: usize,
}

/// epoll data of watched fds: this bit set, the watch index below it.
const WATCH_TAG: u64 = 1 << 63;

impl EpollBackend {
    pub fn new(sockets: Vec<UdpSocket>, cfg: ReceiveConfig) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, s) in sockets.iter().enumerate() {
            epoll.add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        }
        Ok(Self {
            epoll,
            sockets,
            batch: RecvBatch::new(usize::from(cfg.buffers).clamp(1, 256), cfg.buffer_size),
            stats: BackendStats::default(),
            watched: 0,
        })
    }

    fn drain(&mut self, idx: usize, on: &mut dyn FnMut(super::Event<'_>)) -> io::Result<usize> {
        let fd = self.sockets[idx].as_raw_fd();
        let mut total = 0;
        loop {
            let n = self.batch.recv(fd, idx, &mut self.stats, &mut |d| {
                on(super::Event::Datagram(d));
            })?;
            total += n;
            if n < self.batch.batch() {
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

    fn finish(&mut self, deadline: Instant, on: &mut dyn FnMut(Datagram<'_>)) {
        // Nothing is taken off a socket between polls: the queues are all there is.
        super::drain_queues(
            &self.sockets,
            &mut self.batch,
            &mut self.stats,
            deadline,
            on,
        );
    }
}

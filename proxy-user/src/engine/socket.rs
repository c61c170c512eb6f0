//! UDP log sockets: one per worker per listener, all bound to the same address with
//! SO_REUSEPORT so the kernel spreads datagrams over workers.
use std::{io, net::SocketAddr, os::fd::AsRawFd};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
};

pub fn udp_reuseport(addr: SocketAddr, rcvbuf: Option<usize>) -> io::Result<std::net::UdpSocket> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if let Some(n) = rcvbuf {
        // As root the limit (net.core.rmem_max) does not apply; otherwise the kernel caps it.
        if setsockopt(&fd, sockopt::RcvBufForce, &n).is_err() {
            setsockopt(&fd, sockopt::RcvBuf, &n)?;
        }
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Datagrams the kernel dropped on this socket (receive queue full): SK_MEMINFO_DROPS
/// from SO_MEMINFO. Measured, so "loss: 0" can be a statement.
pub fn kernel_drops(sock: &std::net::UdpSocket) -> io::Result<u32> {
    const SK_MEMINFO_VARS: usize = 9;
    const SK_MEMINFO_DROPS: usize = 8;
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[SK_MEMINFO_DROPS])
}

/// Makes the socket refuse every datagram that arrives from now on, counted by the kernel
/// as a drop (SK_MEMINFO_DROPS): a classic BPF socket filter that accepts nothing. What
/// is already queued stays readable, so a stopping worker drains a queue that can only
/// shrink, and nothing arriving meanwhile goes uncounted when the socket closes.
pub fn refuse_new(sock: &std::net::UdpSocket) -> io::Result<()> {
    // `ret #0`: keep zero bytes of the packet, i.e. drop it.
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `code`, both alive for the call; the kernel copies them.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Preallocated `recvmmsg` buffers: one batch of datagrams per call, no allocation after
/// `new`. The epoll backend reads with it, and every backend drains its sockets with it
/// at stop.
pub struct RecvBatch {
    buf_size: usize,
    data: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs`/`hdrs` point into `data`/`names`/`iovs`, heap
// buffers this value owns and never reallocates; it is used by one thread at a time.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(batch: usize, buf_size: usize) -> Self {
        let batch = batch.max(1);
        // SAFETY: sockaddr_storage and mmsghdr are plain data; all-zero is valid.
        let zero_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut b = Self {
            buf_size,
            data: vec![0u8; batch * buf_size],
            names: vec![zero_name; batch],
            iovs: Vec::with_capacity(batch),
            // SAFETY: as above.
            hdrs: (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect(),
        };
        for i in 0..batch {
            b.iovs.push(libc::iovec {
                iov_base: b.data[i * buf_size..].as_mut_ptr().cast(),
                iov_len: buf_size,
            });
        }
        for i in 0..batch {
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_iov = &mut b.iovs[i];
            h.msg_iovlen = 1;
            h.msg_name = (&raw mut b.names[i]).cast();
        }
        b
    }

    pub fn batch(&self) -> usize {
        self.hdrs.len()
    }

    /// One non-blocking `recvmmsg` on `fd` (socket number `idx`): each datagram goes to
    /// `on` and into `stats`. Returns how many; 0 when the queue is empty.
    pub fn recv(
        &mut self,
        fd: std::os::fd::RawFd,
        idx: usize,
        stats: &mut super::BackendStats,
        on: &mut dyn FnMut(super::Datagram<'_>),
    ) -> io::Result<usize> {
        for h in &mut self.hdrs {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
        }
        let n = loop {
            // SAFETY: `hdrs` holds initialised headers pointing into owned buffers.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    self.hdrs.len() as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => {}
                _ => {
                    stats.errors += 1;
                    return Err(e);
                }
            }
        };
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
            stats.datagrams += 1;
            stats.bytes += len as u64;
            stats.truncated += u64::from(truncated);
            on(super::Datagram {
                payload,
                source: sockaddr(name),
                socket: idx,
                truncated,
            });
        }
        Ok(n)
    }
}

/// A `sockaddr_storage` as filled in by the kernel, back to a `SocketAddr`.
pub fn sockaddr(bytes: &[u8]) -> Option<SocketAddr> {
    if bytes.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([bytes[0], bytes[1]]);
    match i32::from(family) {
        libc::AF_INET if bytes.len() >= 16 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let ip = std::net::Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
            Some(SocketAddr::from((ip, port)))
        }
        libc::AF_INET6 if bytes.len() >= 28 => {
            let port = u16::from_be_bytes([bytes[2], bytes[3]]);
            let mut a = [0u8; 16];
            a.copy_from_slice(&bytes[8..24]);
            Some(SocketAddr::from((std::net::Ipv6Addr::from(a), port)))
        }
        _ => None,
    }
}

/// The kernel's UDP counters for this network namespace (`/proc/net/snmp` `Udp:` and
/// `/proc/net/snmp6` `Udp6…`), by name. Deltas over a run show loss no socket saw:
/// `NoPorts` (nothing listening), `InCsumErrors`, and `RcvbufErrors` (socket overflow,
/// which the per-socket SO_MEMINFO counts also see).
pub fn udp_counters() -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(snmp) = std::fs::read_to_string("/proc/net/snmp") {
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp: ")).collect();
        if let [names, values] = udp[..] {
            for (n, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if let Ok(v) = v.parse() {
                    out.insert(format!("udp.{n}"), v);
                }
            }
        }
    }
    if let Ok(snmp6) = std::fs::read_to_string("/proc/net/snmp6") {
        for l in snmp6.lines() {
            let mut it = l.split_whitespace();
            if let (Some(n), Some(v)) = (it.next(), it.next())
                && let Some(rest) = n.strip_prefix("Udp6")
                && let Ok(v) = v.parse()
            {
                out.insert(format!("udp6.{rest}"), v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn udp_counters_are_read() {
        let c = super::udp_counters();
        assert!(
            c.contains_key("udp.InDatagrams") && c.contains_key("udp.RcvbufErrors"),
            "{c:?}"
        );
        assert!(c.contains_key("udp6.InDatagrams"), "{c:?}");
    }
}

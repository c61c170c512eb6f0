//! Socket set-up for the forwarder: listeners (one per worker, `SO_REUSEPORT`), upstream
//! sockets, and the options applied to every connection.
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, getpeername, getsockname,
    listen, setsockopt, socket, sockopt,
};

fn family(addr: SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// A non-blocking listening socket on `addr`, shared with the other workers' through
/// `SO_REUSEPORT` (the kernel spreads new connections over them).
pub fn listener(addr: SocketAddr) -> io::Result<OwnedFd> {
    let fd = stream_socket(addr)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(4096).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

/// The classic BPF program that picks, in a `SO_REUSEPORT` group, the socket of the
/// worker that owns the rx queue a connection's SYN arrived on: `queues[i]` is worker
/// `i`'s queue (if it has one), and worker `i`'s listener is the group's `i`-th socket.
/// Other queues get an index past the group, which makes the kernel fall back to its
/// hash.
pub fn queue_steering_program(queues: &[Option<u32>]) -> Vec<libc::sock_filter> {
    const SKF_AD_OFF: i32 = -0x1000;
    const SKF_AD_QUEUE: i32 = 8;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // The skb records rx queue q as q + 1 (skb_record_rx_queue); 0 means none.
    let mut prog = vec![stmt(
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        (SKF_AD_OFF + SKF_AD_QUEUE) as u32,
    )];
    for (i, q) in queues.iter().enumerate() {
        let Some(q) = q else { continue };
        prog.push(libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: q + 1,
        });
        prog.push(stmt(libc::BPF_RET | libc::BPF_K, i as u32));
    }
    prog.push(stmt(libc::BPF_RET | libc::BPF_K, u32::MAX));
    prog
}

/// Attaches [`queue_steering_program`] to `fd`'s `SO_REUSEPORT` group.
pub fn steer_by_rx_queue(fd: &OwnedFd, queues: &[Option<u32>]) -> io::Result<()> {
    let mut prog = queue_steering_program(queues);
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| io::Error::other("too many queues"))?,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: a valid socket; `fprog` and the program it points to live across the call
    // (the kernel copies the program).
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking socket to connect to `addr` with.
pub fn upstream_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let fd = stream_socket(addr)?;
    setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    Ok(fd)
}

/// A non-blocking, close-on-exec TCP socket of `addr`'s family.
fn stream_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    Ok(socket(
        family(addr),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

/// Takes ownership of a descriptor the kernel returned (an accepted connection).
pub fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by accept and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Forwarded bytes should leave as they arrive: Nagle would hold small writes back
/// behind unacknowledged data and add a round trip to request/response traffic.
pub fn no_delay(fd: &OwnedFd) -> io::Result<()> {
    setsockopt(fd, sockopt::TcpNoDelay, &true).map_err(io::Error::from)
}

/// Fixes the kernel's send buffer of `fd` at `bytes` (the kernel doubles the value for
/// its bookkeeping and clamps it at `net.core.wmem_max`), which ends its autotuning.
pub fn cap_send_buffer(fd: &OwnedFd, bytes: usize) -> io::Result<()> {
    setsockopt(fd, sockopt::SndBuf, &bytes).map_err(io::Error::from)
}

/// Sets the congestion control of `fd` (TCP_CONGESTION). Before the connection is
/// established, or it does not take fully: BBR marks a socket as needing pacing when the
/// handshake completes, and a later switch keeps the pacing.
pub fn set_congestion(fd: &OwnedFd, name: &str) -> io::Result<()> {
    setsockopt(fd, sockopt::TcpCongestion, &std::ffi::OsString::from(name)).map_err(io::Error::from)
}

/// Makes the next close send a reset instead of a FIN (SO_LINGER with a zero timeout).
pub fn reset_on_close(fd: &OwnedFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(e) = setsockopt(fd, sockopt::Linger, &l) {
        tracing::debug!(error = %e, "SO_LINGER");
    }
}

/// Half-close: no more bytes will be sent on `fd` (the peer reads EOF).
pub fn shutdown_write(fd: &OwnedFd) {
    // ENOTCONN after a peer reset is expected and harmless.
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
}

fn to_std(a: Option<SockaddrStorage>) -> Option<SocketAddr> {
    let a = a?;
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
}

pub fn peer_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    to_std(getpeername::<SockaddrStorage>(fd.as_raw_fd()).ok())
}

pub fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    to_std(getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok())
}

/// A pipe for one direction of the splice path, its capacity set to `size` (the kernel
/// rounds up to pages; without CAP_SYS_RESOURCE it is capped by pipe-max-size).
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    pub capacity: usize,
}

impl Pipe {
    pub fn new(size: usize) -> io::Result<Self> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        // Refused (an unprivileged user over pipe-user-pages-soft): keep whatever the
        // kernel gave; splice moves at most what fits, the size is only an upper bound.
        let capacity = nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size as i32))
            .or_else(|_| nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_GETPIPE_SZ))
            .map_or(4096, |c| c as usize);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

/// One non-blocking `splice(2)` of up to `len` bytes from `from` to `to` (one of them a
/// pipe). `Ok(0)` is end of file on a socket source.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain syscall on descriptors the caller owns; null offsets (pipes and
        // sockets have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        // A signal is no reason to end a connection.
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The IP addresses of interface `name` (of this network namespace).
pub fn addresses_of(name: &str) -> Vec<std::net::IpAddr> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    list.filter(|ifa| ifa.interface_name == name)
        .filter_map(|ifa| ifa.address.as_ref().and_then(ip_of))
        .collect()
}

/// The IP address of an interface address entry (IPv4 or IPv6; none for others).
fn ip_of(a: &SockaddrStorage) -> Option<std::net::IpAddr> {
    a.as_sockaddr_in()
        .map(|v4| std::net::IpAddr::V4(v4.ip()))
        .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
}

/// The interfaces a listener on `addr` receives from: those holding its address, or
/// every interface for a wildcard address.
pub fn interfaces_of(addr: SocketAddr) -> Vec<String> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for ifa in list {
        let holds =
            addr.ip().is_unspecified() || ifa.address.as_ref().and_then(ip_of) == Some(addr.ip());
        if holds && !out.contains(&ifa.interface_name) {
            out.push(ifa.interface_name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The congestion control set on an upstream socket before it connects is the one
    /// the connection runs; a name the kernel lacks is refused, not ignored.
    #[test]
    fn congestion_control_set_before_connecting_is_kept() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let addr = l.local_addr().expect("address");
        let fd = upstream_socket(addr).expect("socket");
        set_congestion(&fd, "reno").expect("reno is always built in");
        let sa = SockaddrStorage::from(addr);
        match nix::sys::socket::connect(fd.as_raw_fd(), &sa) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
            Err(e) => panic!("connect: {e}"),
        }
        let (_peer, _) = l.accept().expect("accept");
        let name =
            nix::sys::socket::getsockopt(&fd, sockopt::TcpCongestion).expect("TCP_CONGESTION");
        assert_eq!(name.to_string_lossy().trim_end_matches('\0'), "reno");
        let other = upstream_socket(addr).expect("socket");
        let e = set_congestion(&other, "no_such_cc").expect_err("an unknown name");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    }

    #[test]
    fn the_steering_program_maps_each_recorded_queue_to_its_worker() {
        let p = queue_steering_program(&[Some(8), None, Some(3)]);
        let shape: Vec<(u32, u8, u8, u32)> = p
            .iter()
            .map(|i| (u32::from(i.code), i.jt, i.jf, i.k))
            .collect();
        let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
        let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
        let ret = libc::BPF_RET | libc::BPF_K;
        assert_eq!(
            shape,
            vec![
                (ld, 0, 0, (-0x1000i32 + 8) as u32), // A = skb->queue_mapping
                (jeq, 0, 1, 9),                      // rx queue 8 is recorded as 9
                (ret, 0, 0, 0),                      // → worker 0
                (jeq, 0, 1, 4),                      // rx queue 3 → worker 2
                (ret, 0, 0, 2),
                (ret, 0, 0, u32::MAX), // anything else: the kernel's hash
            ]
        );
    }

    /// The kernel takes the program on a `SO_REUSEPORT` group, and connections whose
    /// queue matches no worker (loopback records none) still reach a listener.
    #[test]
    fn the_kernel_accepts_the_steering_program_and_unmatched_connections_fall_back() {
        let a = listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = local_addr(&a).unwrap();
        let b = listener(addr).unwrap();
        steer_by_rx_queue(&a, &[Some(8), Some(9)]).expect("SO_ATTACH_REUSEPORT_CBPF");
        let _clients: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        let mut accepted = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while accepted < 4 && std::time::Instant::now() < deadline {
            for l in [&a, &b] {
                if let Ok(fd) = nix::sys::socket::accept(l.as_raw_fd()) {
                    drop(adopt(fd));
                    accepted += 1;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(accepted, 4);
    }
}

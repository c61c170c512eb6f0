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
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The interfaces a listener on `addr` receives from: those holding its address, or
/// every interface for a wildcard address.
/// The IP addresses of interface `name` (of this network namespace).
pub fn addresses_of(name: &str) -> Vec<std::net::IpAddr> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    list.filter(|ifa| ifa.interface_name == name)
        .filter_map(|ifa| {
            let a = ifa.address?;
            a.as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
        })
        .collect()
}

pub fn interfaces_of(addr: SocketAddr) -> Vec<String> {
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for ifa in list {
        let holds = addr.ip().is_unspecified()
            || ifa.address.as_ref().is_some_and(|a| {
                a.as_sockaddr_in()
                    .map(|v4| std::net::IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
                    == Some(addr.ip())
            });
        if holds && !out.contains(&ifa.interface_name) {
            out.push(ifa.interface_name);
        }
    }
    out
}

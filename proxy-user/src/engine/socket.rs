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

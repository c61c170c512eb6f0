//! Which peers are on this host: a connection to one of this host's addresses goes over
//! loopback, so its peer is microseconds away (see `TcpSettings::local_congestion` and
//! `local_sndbuf`); and the system's congestion control, which every other connection runs.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::policy::prefix::Prefix;

/// How often a worker reads this host's addresses again. They change rarely, and a
/// stale view costs only a send buffer fixed or left to autotuning.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// The addresses the kernel treats as this host's: each interface address, and for an
/// IPv4 address on a loopback interface its whole prefix (the kernel adds a local route
/// for it: with 10.200.0.1/24 on `lo`, 10.200.0.12 is this host too).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalAddresses {
    nets: Vec<Prefix>,
}

impl LocalAddresses {
    /// This host's addresses now (in the calling thread's network namespace).
    pub fn read() -> io::Result<Self> {
        let mut found = Vec::new();
        for a in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Some(ip) = a.address.as_ref().and_then(ip_of) else {
                continue;
            };
            let loopback = a
                .flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
            let prefix = a.netmask.as_ref().and_then(ip_of).map(prefix_len);
            found.push((ip, loopback, prefix));
        }
        Ok(Self::from_interfaces(found))
    }

    /// From (address, on a loopback interface, prefix length) triples.
    fn from_interfaces(addrs: impl IntoIterator<Item = (IpAddr, bool, Option<u8>)>) -> Self {
        let mut nets: Vec<Prefix> = addrs
            .into_iter()
            .map(|(ip, loopback, prefix)| match (ip, loopback, prefix) {
                (IpAddr::V4(_), true, Some(len)) => Prefix::host(ip).truncate(len.min(32)),
                _ => Prefix::host(ip),
            })
            .collect();
        nets.sort_unstable();
        nets.dedup();
        Self { nets }
    }

    /// Whether a connection between `local` and `peer` stays on this host: the peer is a
    /// loopback address, our own, one of this host's (as read), or the unspecified
    /// address, which Linux connects to this host.
    pub fn stays_on_this_host(&self, local: SocketAddr, peer: SocketAddr) -> bool {
        peer.ip().to_canonical() == local.ip().to_canonical() || self.is_this_host(peer.ip())
    }

    /// Whether a connection to `peer` would stay on this host, known before it connects:
    /// a loopback address, the unspecified address, or one of this host's (as read).
    pub fn is_this_host(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        peer.is_loopback()
            || peer.is_unspecified()
            || self.nets.iter().any(|net| net.contains_ip(peer))
    }
}

/// The system's congestion control (`net.ipv4.tcp_congestion_control` of this network
/// namespace): what connections run that edgeproxy gives none.
pub fn system_congestion() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The congestion controls this kernel has registered
/// (`net.ipv4.tcp_available_congestion_control`; a module not loaded yet is missing
/// until `modprobe tcp_<name>`); `None` when the list cannot be read.
pub fn available_congestion() -> Option<Vec<String>> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .ok()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
}

fn ip_of(s: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

fn prefix_len(mask: IpAddr) -> u8 {
    match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
        IpAddr::V6(m) => u128::from(m).leading_ones() as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("literal")
    }

    #[test]
    fn peers_on_this_host_are_loopback_or_our_own_address() {
        let none = LocalAddresses::default();
        for (local, peer, here) in [
            ("127.0.0.1:80", "127.0.0.1:5000", true),
            ("127.0.0.1:80", "127.0.0.2:5000", true),
            ("10.1.2.3:80", "127.0.0.1:5000", true),
            ("10.1.2.3:80", "10.1.2.3:5000", true),
            ("10.1.2.3:80", "10.1.2.4:5000", false),
            // An upstream configured as 0.0.0.0 or [::] is this host.
            ("127.0.0.1:80", "0.0.0.0:5000", true),
            ("[::1]:80", "[::]:5000", true),
            ("[::1]:80", "[::1]:5000", true),
            ("[fd00:200::1]:80", "[fd00:200::1]:5000", true),
            ("[fd00:200::1]:80", "[fd00:200::2]:5000", false),
            // A dual-stack listener sees IPv4 clients as mapped addresses.
            ("[::ffff:10.1.2.3]:80", "[::ffff:10.1.2.3]:5000", true),
            ("[::ffff:10.1.2.3]:80", "[::ffff:127.0.0.1]:5000", true),
            ("[::ffff:10.1.2.3]:80", "[::ffff:10.9.9.9]:5000", false),
        ] {
            assert_eq!(
                none.stays_on_this_host(at(local), at(peer)),
                here,
                "{local} ↔ {peer}"
            );
        }
    }

    /// Another of this host's addresses than the one a connection uses is this host; on
    /// a loopback interface an IPv4 address brings its whole prefix, elsewhere only
    /// itself, and IPv6 addresses only themselves.
    #[test]
    fn other_addresses_of_this_host_and_loopback_prefixes_are_this_host() {
        let host = LocalAddresses::from_interfaces([
            (ip("127.0.0.1"), true, Some(8)),
            (ip("10.200.0.1"), true, Some(24)),
            (ip("192.0.2.10"), false, Some(24)),
            (ip("198.51.100.7"), false, Some(24)),
            (ip("fd00:200::1"), true, Some(64)),
            (ip("2001:db8::5"), false, Some(64)),
        ]);
        let local = at("192.0.2.10:443");
        for (peer, here) in [
            ("198.51.100.7:5000", true),
            ("198.51.100.8:5000", false),
            ("192.0.2.11:5000", false),
            ("10.200.0.12:5000", true),
            ("10.200.0.255:5000", true),
            ("10.200.1.12:5000", false),
            ("[::ffff:10.200.0.12]:5000", true),
            ("[fd00:200::1]:5000", true),
            ("[fd00:200::2]:5000", false),
            ("[2001:db8::5]:5000", true),
            ("[2001:db8::6]:5000", false),
        ] {
            assert_eq!(host.stays_on_this_host(local, at(peer)), here, "{peer}");
            // An upstream is judged before it connects, with no local address yet.
            assert_eq!(host.is_this_host(at(peer).ip()), here, "{peer}");
        }
        for (peer, here) in [
            ("127.0.0.2", true),
            ("::1", true),
            ("0.0.0.0", true),
            ("::", true),
            ("::ffff:127.0.0.1", true),
            ("192.0.2.10", true),
            ("203.0.113.9", false),
        ] {
            assert_eq!(host.is_this_host(ip(peer)), here, "{peer}");
        }
    }

    /// Read from the machine: loopback is there, and a documentation address is not.
    #[test]
    fn this_hosts_addresses_are_read() {
        let host = LocalAddresses::read().expect("getifaddrs");
        assert!(
            host.nets.contains(&"127.0.0.0/8".parse().expect("literal")),
            "{host:?}: lo's prefix"
        );
        assert!(!host.stays_on_this_host(at("192.0.2.1:80"), at("203.0.113.9:80")));
    }
}

//! IPv4/IPv6 prefixes as operators write them (`10.0.0.0/8`, `2001:db8::/32`, or a bare
//! address for a host route), normalised and checked.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prefix {
    V4 { addr: u32, len: u8 },
    V6 { addr: u128, len: u8 },
}

impl Prefix {
    pub fn family(&self) -> u8 {
        match self {
            Prefix::V4 { .. } => 4,
            Prefix::V6 { .. } => 6,
        }
    }

    pub fn prefix_len(&self) -> u8 {
        match *self {
            Prefix::V4 { len, .. } | Prefix::V6 { len, .. } => len,
        }
    }

    /// Whether `addr` (family 4: first four bytes used) lies inside this prefix.
    pub fn contains(&self, family: u8, addr: &[u8; 16]) -> bool {
        match *self {
            Prefix::V4 { addr: net, len } if family == 4 => {
                let a = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
                a & mask32(len) == net
            }
            Prefix::V6 { addr: net, len } if family == 6 => {
                u128::from_be_bytes(*addr) & mask128(len) == net
            }
            _ => false,
        }
    }

    /// The host route of `ip`: /32 or /128.
    pub fn host(ip: IpAddr) -> Prefix {
        match ip {
            IpAddr::V4(a) => Prefix::V4 {
                addr: u32::from(a),
                len: 32,
            },
            IpAddr::V6(a) => Prefix::V6 {
                addr: u128::from(a),
                len: 128,
            },
        }
    }

    /// Whether `ip` lies inside this prefix (an address of the other family never does).
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        let host = Prefix::host(ip);
        host.family() == self.family() && host.truncate(self.prefix_len()) == *self
    }

    /// The prefix one bit shorter (None for /0): walking parents finds covering prefixes.
    pub fn parent(&self) -> Option<Prefix> {
        match *self {
            Prefix::V4 { addr, len } if len > 0 => Some(Prefix::V4 {
                addr: addr & mask32(len - 1),
                len: len - 1,
            }),
            Prefix::V6 { addr, len } if len > 0 => Some(Prefix::V6 {
                addr: addr & mask128(len - 1),
                len: len - 1,
            }),
            _ => None,
        }
    }

    /// Shortened to `len` bits (which must not exceed the current length).
    pub fn truncate(&self, len: u8) -> Prefix {
        match *self {
            Prefix::V4 { addr, .. } => Prefix::V4 {
                addr: addr & mask32(len),
                len,
            },
            Prefix::V6 { addr, .. } => Prefix::V6 {
                addr: addr & mask128(len),
                len,
            },
        }
    }
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_s, len_s) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address or prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_s {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        let p = match addr {
            IpAddr::V4(a) => Prefix::V4 {
                addr: u32::from(a),
                len,
            },
            IpAddr::V6(a) => Prefix::V6 {
                addr: u128::from(a),
                len,
            },
        };
        let net = p.truncate(len);
        if net != p {
            return Err(format!("{s:?} has host bits set; the network is {net}"));
        }
        Ok(p)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Prefix::V4 { addr, len } => write!(f, "{}/{len}", Ipv4Addr::from(addr)),
            Prefix::V6 { addr, len } => write!(f, "{}/{len}", Ipv6Addr::from(addr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_normalised_prefixes_and_rejects_host_bits() {
        assert_eq!(
            "10.0.0.0/8".parse(),
            Ok(Prefix::V4 {
                addr: 0x0a00_0000,
                len: 8
            })
        );
        assert_eq!(
            "192.0.2.1".parse::<Prefix>().map(|p| p.prefix_len()),
            Ok(32)
        );
        assert_eq!(
            "2001:db8::/32".parse::<Prefix>().map(|p| p.to_string()),
            Ok("2001:db8::/32".into())
        );
        let e = "192.0.2.1/24".parse::<Prefix>().unwrap_err();
        assert!(e.contains("host bits") && e.contains("192.0.2.0/24"), "{e}");
        assert!(
            "10.0.0.0/33"
                .parse::<Prefix>()
                .unwrap_err()
                .contains("0..=32")
        );
        assert!("fd00::/129".parse::<Prefix>().is_err());
        assert!("example.com".parse::<Prefix>().is_err());
    }

    #[test]
    fn contains_and_parent() {
        let p: Prefix = "10.1.0.0/16".parse().unwrap();
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 1, 200, 3]);
        assert!(p.contains(4, &a));
        assert!(!p.contains(6, &a), "family must match");
        a[1] = 2;
        assert!(!p.contains(4, &a));
        assert_eq!(p.parent().unwrap().to_string(), "10.0.0.0/15");
        assert!(p.contains_ip("10.1.200.3".parse().unwrap()));
        assert!(!p.contains_ip("10.2.0.1".parse().unwrap()));
        assert!(
            !p.contains_ip("::a01:c803".parse().unwrap()),
            "family must match"
        );
        let zero: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(zero.contains(4, &a));
        assert_eq!(zero.parent(), None);
        let v6: Prefix = "fd00:200::/32".parse().unwrap();
        let b = "fd00:200::7".parse::<Ipv6Addr>().unwrap().octets();
        assert!(v6.contains(6, &b));
    }
}

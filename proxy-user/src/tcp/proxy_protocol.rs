//! PROXY protocol v1 (text) and v2 (binary) as specified by HAProxy
//! (`doc/proxy-protocol.txt`): the header edgeproxy sends to an upstream so it sees the
//! real client, and the header it accepts from a proxy in front of it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line the specification allows, CRLF included.
pub const V1_MAX: usize = 107;
/// The longest v2 header accepted (TLVs included); a longer one is refused as malformed.
/// HAProxy accepts the same order of size.
pub const MAX_HEADER: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The endpoints a header carries: `None` for v1 `UNKNOWN`, v2 `LOCAL` and v2 families
/// other than TCP over IPv4/IPv6 (the receiver then uses the connection's own addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed to decide.
    Incomplete,
    /// A complete header of `len` bytes.
    Header {
        len: usize,
        version: Version,
        endpoints: Option<Endpoints>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
}

impl ProxyHeaderError {
    /// The counter name in reports.
    pub fn reason(self) -> &'static str {
        match self {
            ProxyHeaderError::NotProxy => "proxy_header_missing",
            ProxyHeaderError::BadV1(_) | ProxyHeaderError::BadV2(_) => "proxy_header_malformed",
            ProxyHeaderError::TooLong => "proxy_header_too_long",
        }
    }
}

/// Both addresses in one family, as the specification requires: an IPv4 address paired
/// with an IPv6 one is written in its IPv4-mapped IPv6 form.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

/// Appends the header announcing a TCP connection from `src` to `dst`.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    let (src, dst) = same_family(src, dst);
    match version {
        Version::V1 => {
            use std::io::Write as _;
            let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            // Writing into a Vec cannot fail.
            let _ = write!(
                out,
                "PROXY {proto} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            );
        }
        Version::V2 => {
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21); // version 2, command PROXY
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11); // AF_INET, STREAM
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let octets = |a: IpAddr| match a {
                        IpAddr::V6(a) => a.octets(),
                        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                    };
                    out.push(0x21); // AF_INET6, STREAM
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&octets(s));
                    out.extend_from_slice(&octets(d));
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
}

/// Parses a header at the start of `buf` (which may hold more: the client's first bytes).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    const V1_PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(Parsed::Incomplete)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return parse_v1(buf);
    }
    Err(ProxyHeaderError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::BadV1("no CRLF within 107 bytes"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[..cr]).map_err(|_| ProxyHeaderError::BadV1("not ASCII"))?;
    let len = cr + 2;
    let mut f = line.split(' ');
    f.next(); // "PROXY"
    let proto = f.next().ok_or(ProxyHeaderError::BadV1("no protocol"))?;
    let v4 = match proto {
        "UNKNOWN" => {
            return Ok(Parsed::Header {
                len,
                version: Version::V1,
                endpoints: None,
            });
        }
        "TCP4" => true,
        "TCP6" => false,
        _ => {
            return Err(ProxyHeaderError::BadV1(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    let ip = |s: Option<&str>| -> Result<IpAddr, ProxyHeaderError> {
        let s = s.ok_or(ProxyHeaderError::BadV1("missing address"))?;
        if v4 {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        } else {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        }
        .map_err(|_| ProxyHeaderError::BadV1("address does not match the protocol"))
    };
    // Ports: decimal, no sign, no leading zero (u16::from_str would take "+80" and "080").
    let port = |s: Option<&str>| -> Result<u16, ProxyHeaderError> {
        let s = s.ok_or(ProxyHeaderError::BadV1("missing port"))?;
        let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits || (s.len() > 1 && s.starts_with('0')) {
            return Err(ProxyHeaderError::BadV1("bad port"));
        }
        s.parse()
            .map_err(|_| ProxyHeaderError::BadV1("port out of range"))
    };
    let (sip, dip) = (ip(f.next())?, ip(f.next())?);
    let (sport, dport) = (port(f.next())?, port(f.next())?);
    if f.next().is_some() {
        return Err(ProxyHeaderError::BadV1("trailing fields"));
    }
    Ok(Parsed::Header {
        len,
        version: Version::V1,
        endpoints: Some(Endpoints {
            source: SocketAddr::new(sip, sport),
            destination: SocketAddr::new(dip, dport),
        }),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::BadV2("version is not 2"));
    }
    let local = match ver_cmd & 0xf {
        0 => true,
        1 => false,
        _ => return Err(ProxyHeaderError::BadV2("command is not LOCAL or PROXY")),
    };
    let fam = buf[13];
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Err(ProxyHeaderError::TooLong);
    }
    let need = match fam {
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        0x00 => 0,
        _ => return Err(ProxyHeaderError::BadV2("unknown address family")),
    };
    if len - 16 < need {
        return Err(ProxyHeaderError::BadV2(
            "address block shorter than its family",
        ));
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let a = &buf[16..len];
    let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
    let endpoints = match fam {
        _ if local => None,
        0x11 => Some(Endpoints {
            source: SocketAddr::new(IpAddr::from([a[0], a[1], a[2], a[3]]), port(8)),
            destination: SocketAddr::new(IpAddr::from([a[4], a[5], a[6], a[7]]), port(10)),
        }),
        0x21 => {
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Some(Endpoints {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            })
        }
        // UDP and unix sockets carry no TCP endpoint: the connection's own addresses apply.
        _ => None,
    };
    Ok(Parsed::Header {
        len,
        version: Version::V2,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_bytes_follow_the_specification() {
        let mut out = Vec::new();
        encode(
            Version::V1,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
            &mut out,
        );
        // The example of section 2.1.
        assert_eq!(out, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        out.clear();
        encode(
            Version::V1,
            sa("[fd00:200::1]:1000"),
            sa("[fd00:200::2]:80"),
            &mut out,
        );
        assert_eq!(out, b"PROXY TCP6 fd00:200::1 fd00:200::2 1000 80\r\n");
        // Mixed families go out as IPv6, the IPv4 one mapped.
        out.clear();
        encode(
            Version::V1,
            sa("10.200.0.1:1"),
            sa("[fd00:200::2]:2"),
            &mut out,
        );
        assert_eq!(out, b"PROXY TCP6 ::ffff:10.200.0.1 fd00:200::2 1 2\r\n");
    }

    #[test]
    fn v2_bytes_follow_the_specification() {
        let mut out = Vec::new();
        encode(
            Version::V2,
            sa("10.200.0.1:40000"),
            sa("10.200.0.2:8080"),
            &mut out,
        );
        let mut want = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        want.extend_from_slice(&[10, 200, 0, 1, 10, 200, 0, 2]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&8080u16.to_be_bytes());
        assert_eq!(out, want);
        out.clear();
        encode(
            Version::V2,
            sa("[fd00:200::1]:1"),
            sa("[fd00:200::2]:2"),
            &mut out,
        );
        assert_eq!(out.len(), 16 + 36);
        assert_eq!(&out[12..16], &[0x21, 0x21, 0x00, 0x24]);
        assert_eq!(&out[16..18], &[0xfd, 0x00]);
        assert_eq!(&out[48..52], &[0, 1, 0, 2]);
    }

    #[test]
    fn every_encoded_header_parses_back_from_every_prefix() {
        let pairs = [
            ("10.200.0.1:40000", "10.200.0.2:8080"),
            ("[fd00:200::1]:1", "[fd00:200::2]:65535"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
        ];
        for v in [Version::V1, Version::V2] {
            for (s, d) in pairs {
                let mut h = Vec::new();
                encode(v, sa(s), sa(d), &mut h);
                for cut in 0..h.len() {
                    assert_eq!(parse(&h[..cut]), Ok(Parsed::Incomplete), "{v:?} cut {cut}");
                }
                // Followed by payload, the header's length is exact.
                let mut with = h.clone();
                with.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(
                    parse(&with),
                    Ok(Parsed::Header {
                        len: h.len(),
                        version: v,
                        endpoints: Some(Endpoints {
                            source: sa(s),
                            destination: sa(d)
                        })
                    })
                );
            }
        }
    }

    #[test]
    fn unknown_local_and_other_families_carry_no_endpoints() {
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Header {
                len: 15,
                version: Version::V1,
                endpoints: None
            })
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nxyz"),
            Ok(Parsed::Header {
                len: 35,
                version: Version::V1,
                endpoints: None
            })
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert!(matches!(
            parse(&local),
            Ok(Parsed::Header {
                len: 16,
                endpoints: None,
                ..
            })
        ));
        // A TCP4 header with a TLV after the addresses: the TLV is skipped.
        let mut tlv = Vec::new();
        encode(Version::V2, sa("1.2.3.4:5"), sa("6.7.8.9:10"), &mut tlv);
        tlv[15] += 4;
        tlv.extend_from_slice(&[0x04, 0x00, 0x01, 0xaa]);
        assert!(matches!(
            parse(&tlv),
            Ok(Parsed::Header {
                len: 32,
                endpoints: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn malformed_headers_are_refused_with_a_reason() {
        let bad: [&[u8]; 12] = [
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c",
            b"\r\n\r\n\0\r\nQUIT\n\x22\x11\x00\x0c",
        ];
        for b in bad {
            assert!(parse(b).is_err(), "{:?}", String::from_utf8_lossy(b));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyHeaderError::BadV1(_))));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyHeaderError::TooLong));
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x21, 0x00, 0x0c]);
        assert!(matches!(parse(&short), Err(ProxyHeaderError::BadV2(_))));
        assert_eq!(parse(b"X").unwrap_err().reason(), "proxy_header_missing");
    }

    #[test]
    fn random_bytes_never_panic_and_never_claim_more_than_given() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for _ in 0..20_000 {
            let mut b = vec![0u8; rng.random_range(0..200)];
            rng.fill(&mut b[..]);
            if rng.random_bool(0.5) {
                let p: &[u8] = if rng.random_bool(0.5) {
                    b"PROXY TCP4 "
                } else {
                    &V2_SIGNATURE
                };
                let n = p.len().min(b.len());
                b[..n].copy_from_slice(&p[..n]);
            }
            if let Ok(Parsed::Header { len, .. }) = parse(&b) {
                assert!(len <= b.len());
            }
        }
    }
}

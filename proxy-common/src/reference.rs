//! The reference classifier: what the XDP program must compute for a packet, written
//! plainly over a byte slice. Tests run the XDP program (through BPF_PROG_TEST_RUN)
//! and this function on the same bytes and require identical answers, so any change
//! to parsing semantics is made here first and in `proxy-ebpf` second.

use crate::ProtoClass;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags parsed at most (802.1ad outer + 802.1Q inner). A packet with more is `NonIp`.
pub const MAX_VLAN_TAGS: usize = 2;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_MIN_HLEN: usize = 4;

pub const IPV6_EXT_HOP_BY_HOP: u8 = 0;
pub const IPV6_EXT_ROUTING: u8 = 43;
pub const IPV6_EXT_FRAGMENT: u8 = 44;
pub const IPV6_EXT_DEST_OPTS: u8 = 60;
/// IPv6 extension headers skipped at most. A longer chain is malformed: letting it
/// through unparsed would let a sender hide its ports from port rules.
pub const MAX_IPV6_EXT: usize = 6;
/// Bytes of IPv6 extension headers accepted at most (same reason).
pub const MAX_IPV6_EXT_BYTES: usize = 512;

/// What the data plane learns about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classification {
    pub class: ProtoClass,
    /// 4, 6, or 0 for non-IP and malformed frames.
    pub family: u8,
    /// The L4 protocol number (after IPv6 extension headers); 0 when not IP.
    pub l4_proto: u8,
    /// IPv4 addresses use the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// True for TCP and UDP with a complete header (not for non-first fragments).
    pub has_ports: bool,
    /// Host byte order; zero unless `has_ports`.
    pub src_port: u16,
    pub dst_port: u16,
    /// Offset of the L4 header in the frame (meaningful when `has_ports`).
    pub l4_off: usize,
}

impl Classification {
    const fn of(class: ProtoClass) -> Self {
        Self {
            class,
            family: 0,
            l4_proto: 0,
            src: [0; 16],
            dst: [0; 16],
            has_ports: false,
            src_port: 0,
            dst_port: 0,
            l4_off: 0,
        }
    }
}

fn be16(p: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(off)?, *p.get(off + 1)?]))
}

/// Classifies an Ethernet frame exactly as `edge_xdp` does.
pub fn classify(p: &[u8]) -> Classification {
    classify_inner(p).unwrap_or(Classification::of(ProtoClass::Malformed))
}

fn classify_inner(p: &[u8]) -> Option<Classification> {
    let mut off = ETH_HLEN - 2;
    let mut ethertype = be16(p, off)?;
    off += 2;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = be16(p, off + 2)?;
        off += 4;
    }
    match ethertype {
        ETH_P_ARP => Some(Classification::of(ProtoClass::Arp)),
        ETH_P_IP => ipv4(p, off),
        ETH_P_IPV6 => ipv6(p, off),
        _ => Some(Classification::of(ProtoClass::NonIp)),
    }
}

fn ipv4(p: &[u8], off: usize) -> Option<Classification> {
    if p.len() < off + IPV4_MIN_HLEN {
        return None;
    }
    let vihl = p[off];
    if vihl >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(vihl & 0x0f) * 4;
    if hlen < IPV4_MIN_HLEN || p.len() < off + hlen {
        return None;
    }
    let mut c = Classification::of(ProtoClass::Ipv4Other);
    c.family = 4;
    c.l4_proto = p[off + 9];
    c.src[..4].copy_from_slice(&p[off + 12..off + 16]);
    c.dst[..4].copy_from_slice(&p[off + 16..off + 20]);
    let frag_off = be16(p, off + 6)? & 0x1fff;
    if frag_off != 0 {
        // Only the first fragment carries the L4 header.
        return Some(c);
    }
    l4(
        p,
        off + hlen,
        c,
        [ProtoClass::Tcp4, ProtoClass::Udp4, ProtoClass::Icmp4],
        IPPROTO_ICMP,
    )
}

fn ipv6(p: &[u8], off: usize) -> Option<Classification> {
    if p.len() < off + IPV6_HLEN || p[off] >> 4 != 6 {
        return None;
    }
    let mut c = Classification::of(ProtoClass::Ipv6Other);
    c.family = 6;
    c.src.copy_from_slice(&p[off + 8..off + 24]);
    c.dst.copy_from_slice(&p[off + 24..off + 40]);
    let mut next = p[off + 6];
    let mut l4_off = off + IPV6_HLEN;
    let mut non_first_fragment = false;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS => {
                let len = (usize::from(*p.get(l4_off + 1)?) + 1) * 8;
                next = p[l4_off];
                l4_off += len;
            }
            IPV6_EXT_FRAGMENT => {
                if p.len() < l4_off + 8 {
                    return None;
                }
                next = p[l4_off];
                non_first_fragment |= be16(p, l4_off + 2)? >> 3 != 0;
                l4_off += 8;
            }
            _ => break,
        }
        if l4_off - (off + IPV6_HLEN) > MAX_IPV6_EXT_BYTES {
            return None;
        }
    }
    if matches!(
        next,
        IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS | IPV6_EXT_FRAGMENT
    ) {
        return None;
    }
    c.l4_proto = next;
    if non_first_fragment {
        return Some(c);
    }
    l4(
        p,
        l4_off,
        c,
        [ProtoClass::Tcp6, ProtoClass::Udp6, ProtoClass::Icmp6],
        IPPROTO_ICMPV6,
    )
}

/// `classes` is `[tcp, udp, icmp]` for the address family; `c` carries the L3 facts and
/// the family's "other" class.
fn l4(
    p: &[u8],
    off: usize,
    mut c: Classification,
    classes: [ProtoClass; 3],
    icmp_proto: u8,
) -> Option<Classification> {
    let [tcp, udp, icmp] = classes;
    let (class, min_len) = match c.l4_proto {
        IPPROTO_TCP => (tcp, TCP_MIN_HLEN),
        IPPROTO_UDP => (udp, UDP_HLEN),
        x if x == icmp_proto => (icmp, ICMP_MIN_HLEN),
        _ => return Some(c),
    };
    if p.len() < off + min_len {
        return None;
    }
    c.class = class;
    c.l4_off = off;
    if class != icmp {
        c.has_ports = true;
        c.src_port = be16(p, off)?;
        c.dst_port = be16(p, off + 2)?;
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet header with `ethertype`, then `rest`, into a fixed buffer.
    fn frame(ethertype: u16, rest: &[u8], buf: &mut [u8; 128]) -> usize {
        buf[..12].fill(0x02);
        buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
        buf[14..14 + rest.len()].copy_from_slice(rest);
        14 + rest.len()
    }

    const UDP4: [u8; 28] = [
        0x45,
        0,
        0,
        28,
        0,
        0,
        0,
        0,
        64,
        IPPROTO_UDP,
        0,
        0,
        10,
        200,
        0,
        1,
        10,
        200,
        0,
        2, // IPv4
        0x13,
        0x88,
        0x02,
        0x02,
        0,
        8,
        0,
        0, // UDP 5000 -> 514
    ];

    #[test]
    fn udp4_ports_in_host_order() {
        let mut b = [0; 128];
        let n = frame(ETH_P_IP, &UDP4, &mut b);
        let c = classify(&b[..n]);
        assert_eq!(c.class, ProtoClass::Udp4);
        assert_eq!((c.src_port, c.dst_port), (5000, 514));
    }

    #[test]
    fn every_truncation_of_udp4_is_malformed() {
        let mut b = [0; 128];
        let n = frame(ETH_P_IP, &UDP4, &mut b);
        for cut in 0..n {
            assert_eq!(
                classify(&b[..cut]).class,
                ProtoClass::Malformed,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn non_first_fragment_is_ipv4_other_without_ports() {
        let mut hdr = UDP4;
        hdr[6] = 0x00;
        hdr[7] = 0x10; // offset 16 * 8 bytes
        let mut b = [0; 128];
        let n = frame(ETH_P_IP, &hdr, &mut b);
        let c = classify(&b[..n]);
        assert_eq!(c.class, ProtoClass::Ipv4Other);
        assert!(!c.has_ports);
        assert_eq!(c.l4_proto, IPPROTO_UDP);
        assert_eq!(&c.src[..4], &[10, 200, 0, 1]);
    }

    #[test]
    fn vlan_tags_are_skipped_up_to_two() {
        // frame() writes the outer ethertype (802.1ad); then outer TCI, inner 802.1Q
        // type, inner TCI, IPv4 type, the IPv4 packet.
        let mut b = [0; 128];
        let mut full = [0u8; 8 + 28];
        full[..2].copy_from_slice(&[0x00, 0x64]);
        full[2..4].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        full[4..6].copy_from_slice(&[0x00, 0xc8]);
        full[6..8].copy_from_slice(&ETH_P_IP.to_be_bytes());
        full[8..].copy_from_slice(&UDP4);
        let n = frame(ETH_P_8021AD, &full, &mut b);
        assert_eq!(classify(&b[..n]).class, ProtoClass::Udp4);

        // A third tag is not parsed: the frame is not IP as far as we are concerned.
        let mut three = [0u8; 12 + 28];
        three[..2].copy_from_slice(&[0, 1]);
        three[2..4].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        three[4..6].copy_from_slice(&[0, 2]);
        three[6..8].copy_from_slice(&ETH_P_8021Q.to_be_bytes());
        three[8..10].copy_from_slice(&[0, 3]);
        three[10..12].copy_from_slice(&ETH_P_IP.to_be_bytes());
        three[12..].copy_from_slice(&UDP4);
        let n = frame(ETH_P_8021AD, &three, &mut b);
        assert_eq!(classify(&b[..n]).class, ProtoClass::NonIp);
    }

    #[test]
    fn ipv6_needs_a_whole_header_and_version_6() {
        let mut v6 = [0u8; 40 + 8];
        v6[0] = 0x60;
        v6[6] = IPPROTO_UDP;
        v6[40..44].copy_from_slice(&[0, 53, 0x14, 0x14]);
        let mut b = [0; 128];
        let n = frame(ETH_P_IPV6, &v6, &mut b);
        let c = classify(&b[..n]);
        assert_eq!(
            (c.class, c.src_port, c.dst_port),
            (ProtoClass::Udp6, 53, 5140)
        );
        assert_eq!(classify(&b[..14 + 39]).class, ProtoClass::Malformed);
        b[14] = 0x40;
        assert_eq!(classify(&b[..n]).class, ProtoClass::Malformed);
    }

    #[test]
    fn class_table_is_consistent() {
        for (i, c) in ProtoClass::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(ProtoClass::from_u32(i as u32), Some(*c));
        }
        assert_eq!(ProtoClass::from_u32(ProtoClass::COUNT), None);
    }
}

#[cfg(test)]
mod ipv6_ext_tests {
    use super::*;

    /// IPv6 header with `next`, then `ext` bytes, then an 8-byte UDP header 53 -> 5140.
    fn v6(next: u8, ext: &[u8], buf: &mut [u8; 1024]) -> usize {
        buf[..12].fill(2);
        buf[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        buf[14] = 0x60;
        buf[14 + 6] = next;
        let l4 = 14 + 40 + ext.len();
        buf[54..l4].copy_from_slice(ext);
        buf[l4..l4 + 8].copy_from_slice(&[0, 53, 0x14, 0x14, 0, 8, 0, 0]);
        l4 + 8
    }

    #[test]
    fn extension_chain_is_skipped() {
        let mut b = [0u8; 1024];
        // hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP
        let mut ext = [0u8; 24];
        ext[0] = IPV6_EXT_DEST_OPTS;
        ext[1] = 0;
        ext[8] = IPPROTO_UDP;
        ext[9] = 1;
        let n = v6(IPV6_EXT_HOP_BY_HOP, &ext, &mut b);
        let c = classify(&b[..n]);
        assert_eq!(
            (c.class, c.src_port, c.dst_port, c.l4_off),
            (ProtoClass::Udp6, 53, 5140, 14 + 40 + 24)
        );
    }

    #[test]
    fn fragments_first_keeps_ports_later_do_not() {
        let mut b = [0u8; 1024];
        let mut frag = [IPPROTO_UDP, 0, 0, 1, 0, 0, 0, 7]; // offset 0, M=1
        let n = v6(IPV6_EXT_FRAGMENT, &frag, &mut b);
        assert_eq!(classify(&b[..n]).class, ProtoClass::Udp6);
        frag[2..4].copy_from_slice(&(185u16 << 3).to_be_bytes());
        let n = v6(IPV6_EXT_FRAGMENT, &frag, &mut b);
        let c = classify(&b[..n]);
        assert_eq!(
            (c.class, c.l4_proto, c.has_ports),
            (ProtoClass::Ipv6Other, IPPROTO_UDP, false)
        );
    }

    #[test]
    fn too_many_or_too_long_extensions_are_malformed() {
        let mut b = [0u8; 1024];
        let mut ext = [0u8; 8 * (MAX_IPV6_EXT + 1)];
        for i in 0..=MAX_IPV6_EXT {
            ext[i * 8] = if i == MAX_IPV6_EXT {
                IPPROTO_UDP
            } else {
                IPV6_EXT_DEST_OPTS
            };
        }
        let n = v6(IPV6_EXT_DEST_OPTS, &ext, &mut b);
        assert_eq!(
            classify(&b[..n]).class,
            ProtoClass::Malformed,
            "one header too many"
        );
        let n = v6(IPV6_EXT_DEST_OPTS, &ext[8..], &mut b);
        assert_eq!(
            classify(&b[..n]).class,
            ProtoClass::Udp6,
            "exactly the maximum is fine"
        );

        let mut long = [0u8; 8 * 66];
        long[1] = 65; // 66 * 8 = 528 bytes > 512
        long[0] = IPPROTO_UDP;
        let n = v6(IPV6_EXT_HOP_BY_HOP, &long, &mut b);
        assert_eq!(classify(&b[..n]).class, ProtoClass::Malformed);
    }
}

//! Header parsing, the eBPF twin of `proxy_common::reference::classify` (tests hold the
//! two to identical answers). Every read is bounds-checked by [`Packet::read`] /
//! [`Packet::require`] as a pointer comparison against `data_end`, the form the
//! verifier turns into a known packet range.
use proxy_common::{
    ProtoClass,
    reference::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ICMP_MIN_HLEN,
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN, IPV6_EXT_DEST_OPTS,
        IPV6_EXT_FRAGMENT, IPV6_EXT_HOP_BY_HOP, IPV6_EXT_ROUTING, IPV6_HLEN, MAX_IPV6_EXT,
        MAX_IPV6_EXT_BYTES, MAX_VLAN_TAGS, TCP_MIN_HLEN, UDP_HLEN,
    },
};

/// The packet is truncated or has an impossible field.
pub struct Malformed;

/// Direct packet access (the linear part, for TC) of a hook.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
}

pub struct Parsed {
    pub class: ProtoClass,
    pub family: u8,
    pub l4_proto: u8,
    pub has_ports: bool,
    pub src_port: u16,
    pub dst_port: u16,
    pub l4_off: usize,
    /// The UDP header's length field (UDP only): captures stop there, not at the end of
    /// the frame, so Ethernet padding never reaches the log pipeline.
    pub udp_len: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl Parsed {
    #[inline(always)]
    pub const fn of(class: ProtoClass) -> Self {
        Self {
            class,
            family: 0,
            l4_proto: 0,
            has_ports: false,
            src_port: 0,
            dst_port: 0,
            l4_off: 0,
            udp_len: 0,
            src: [0; 16],
            dst: [0; 16],
        }
    }
}

pub struct Packet<'a, F: Frame> {
    frame: &'a F,
}

impl<'a, F: Frame> Packet<'a, F> {
    pub fn new(frame: &'a F) -> Self {
        Self { frame }
    }

    /// Reads `N` bytes at `off`, or fails if they are not all inside the frame.
    #[inline(always)]
    pub fn read<const N: usize>(&self, off: usize) -> Result<[u8; N], Malformed> {
        let start = self.frame.data();
        if start + off + N > self.frame.data_end() {
            return Err(Malformed);
        }
        // SAFETY: [start + off, start + off + N) lies inside the packet, checked above;
        // `[u8; N]` has alignment 1.
        Ok(unsafe { *((start + off) as *const [u8; N]) })
    }

    #[inline(always)]
    fn be16(&self, off: usize) -> Result<u16, Malformed> {
        self.read::<2>(off).map(u16::from_be_bytes)
    }

    /// Fails unless `len` bytes at `off` are inside the frame.
    #[inline(always)]
    fn require(&self, off: usize, len: usize) -> Result<(), Malformed> {
        if self.frame.data() + off + len > self.frame.data_end() {
            return Err(Malformed);
        }
        Ok(())
    }
}

#[inline(always)]
pub fn parse<F: Frame>(pkt: &Packet<F>) -> Result<Parsed, Malformed> {
    let mut off = ETH_HLEN;
    let mut ethertype = pkt.be16(ETH_HLEN - 2)?;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = pkt.be16(off + 2)?;
        off += 4;
    }
    match ethertype {
        ETH_P_ARP => Ok(Parsed::of(ProtoClass::Arp)),
        ETH_P_IP => ipv4(pkt, off),
        ETH_P_IPV6 => ipv6(pkt, off),
        _ => Ok(Parsed::of(ProtoClass::NonIp)),
    }
}

#[inline(always)]
fn ipv4<F: Frame>(pkt: &Packet<F>, off: usize) -> Result<Parsed, Malformed> {
    let hdr = pkt.read::<IPV4_MIN_HLEN>(off)?;
    if hdr[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let hlen = usize::from(hdr[0] & 0x0f) * 4;
    if hlen < IPV4_MIN_HLEN {
        return Err(Malformed);
    }
    pkt.require(off, hlen)?;
    let mut p = Parsed::of(ProtoClass::Ipv4Other);
    p.family = 4;
    p.l4_proto = hdr[9];
    p.src[..4].copy_from_slice(&hdr[12..16]);
    p.dst[..4].copy_from_slice(&hdr[16..20]);
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0 {
        // Only the first fragment carries the L4 header.
        return Ok(p);
    }
    let l4_off = off + hlen;
    match hdr[9] {
        IPPROTO_TCP => ports::<TCP_MIN_HLEN, F>(pkt, l4_off, p, ProtoClass::Tcp4),
        IPPROTO_UDP => ports::<UDP_HLEN, F>(pkt, l4_off, p, ProtoClass::Udp4),
        IPPROTO_ICMP => present::<ICMP_MIN_HLEN, F>(pkt, l4_off, p, ProtoClass::Icmp4),
        _ => Ok(p),
    }
}

#[inline(always)]
fn ipv6<F: Frame>(pkt: &Packet<F>, off: usize) -> Result<Parsed, Malformed> {
    let hdr = pkt.read::<IPV6_HLEN>(off)?;
    if hdr[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let mut p = Parsed::of(ProtoClass::Ipv6Other);
    p.family = 6;
    p.src.copy_from_slice(&hdr[8..24]);
    p.dst.copy_from_slice(&hdr[24..40]);
    let ext_start = off + IPV6_HLEN;
    let mut next = hdr[6];
    let mut l4_off = ext_start;
    let mut non_first_fragment = false;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS => {
                let h = pkt.read::<2>(l4_off)?;
                next = h[0];
                l4_off += (usize::from(h[1]) + 1) * 8;
            }
            IPV6_EXT_FRAGMENT => {
                let h = pkt.read::<8>(l4_off)?;
                next = h[0];
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    non_first_fragment = true;
                }
                l4_off += 8;
            }
            _ => break,
        }
        if l4_off - ext_start > MAX_IPV6_EXT_BYTES {
            return Err(Malformed);
        }
    }
    if matches!(
        next,
        IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS | IPV6_EXT_FRAGMENT
    ) {
        return Err(Malformed);
    }
    p.l4_proto = next;
    if non_first_fragment {
        return Ok(p);
    }
    match next {
        IPPROTO_TCP => ports::<TCP_MIN_HLEN, F>(pkt, l4_off, p, ProtoClass::Tcp6),
        IPPROTO_UDP => ports::<UDP_HLEN, F>(pkt, l4_off, p, ProtoClass::Udp6),
        IPPROTO_ICMPV6 => present::<ICMP_MIN_HLEN, F>(pkt, l4_off, p, ProtoClass::Icmp6),
        _ => Ok(p),
    }
}

/// An L4 header of at least `MIN` bytes whose first four bytes are the ports. The whole
/// minimum header is read through one checked pointer: reading fields through separately
/// derived pointers lets LLVM fold the checks in a way the verifier cannot follow.
#[inline(always)]
fn ports<const MIN: usize, F: Frame>(
    pkt: &Packet<F>,
    off: usize,
    mut p: Parsed,
    class: ProtoClass,
) -> Result<Parsed, Malformed> {
    let b = pkt.read::<MIN>(off)?;
    p.class = class;
    p.has_ports = true;
    p.src_port = u16::from_be_bytes([b[0], b[1]]);
    p.dst_port = u16::from_be_bytes([b[2], b[3]]);
    p.l4_off = off;
    if MIN == UDP_HLEN {
        p.udp_len = u16::from_be_bytes([b[4], b[5]]);
    }
    Ok(p)
}

#[inline(always)]
fn present<const MIN: usize, F: Frame>(
    pkt: &Packet<F>,
    off: usize,
    mut p: Parsed,
    class: ProtoClass,
) -> Result<Parsed, Malformed> {
    pkt.require(off, MIN)?;
    p.class = class;
    p.l4_off = off;
    Ok(p)
}

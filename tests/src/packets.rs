//! Crafted Ethernet frames for BPF_PROG_TEST_RUN tests and benchmarks.
//!
//! Builders produce well-formed frames (IPv4 header checksum, lengths); tests make
//! malformed ones by truncating or overwriting bytes.
use std::net::{Ipv4Addr, Ipv6Addr};

use proxy_common::reference::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP,
};

pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The transport part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    Tcp {
        sport: u16,
        dport: u16,
    },
    /// A TCP segment with data (PSH|ACK).
    TcpData {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// ICMP (IPv4) or ICMPv6, echo request.
    Icmp,
    /// Any other protocol number with a raw body.
    Other {
        proto: u8,
        body: Vec<u8>,
    },
}

impl L4 {
    pub fn udp(sport: u16, dport: u16, payload_len: usize) -> Self {
        L4::Udp {
            sport,
            dport,
            payload: vec![0xab; payload_len],
        }
    }

    fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Tcp { .. } | L4::TcpData { .. } => IPPROTO_TCP,
            L4::Icmp if v6 => IPPROTO_ICMPV6,
            L4::Icmp => IPPROTO_ICMP,
            L4::Other { proto, .. } => *proto,
        }
    }

    fn bytes(&self, v6: bool) -> Vec<u8> {
        match self {
            L4::Udp {
                sport,
                dport,
                payload,
            } => {
                let mut b = Vec::with_capacity(8 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                b.extend_from_slice(&[0, 0]); // checksum: optional for IPv4, unchecked here
                b.extend_from_slice(payload);
                b
            }
            L4::Tcp { sport, dport } => {
                let mut b = Vec::with_capacity(20);
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes()); // seq
                b.extend_from_slice(&0u32.to_be_bytes()); // ack
                b.extend_from_slice(&[5 << 4, 0x02]); // data offset 5, SYN
                b.extend_from_slice(&64240u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                b
            }
            L4::TcpData {
                sport,
                dport,
                payload,
            } => {
                let mut b = Vec::with_capacity(20 + payload.len());
                b.extend_from_slice(&sport.to_be_bytes());
                b.extend_from_slice(&dport.to_be_bytes());
                b.extend_from_slice(&1u32.to_be_bytes()); // seq
                b.extend_from_slice(&1u32.to_be_bytes()); // ack
                b.extend_from_slice(&[5 << 4, 0x18]); // data offset 5, PSH|ACK
                b.extend_from_slice(&64240u16.to_be_bytes());
                b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                b.extend_from_slice(payload);
                b
            }
            L4::Icmp => {
                let ty = if v6 { 128 } else { 8 };
                vec![ty, 0, 0, 0, 0, 1, 0, 1]
            }
            L4::Other { body, .. } => body.clone(),
        }
    }
}

/// IPv4 header knobs beyond addresses.
#[derive(Clone, Debug, Default)]
pub struct Ipv4Extra {
    /// Raw option bytes; padded with zeros (end of options) to a multiple of 4.
    pub options: Vec<u8>,
    /// Fragment offset in 8-byte units (non-zero: not the first fragment).
    pub frag_offset: u16,
    pub more_fragments: bool,
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4: &L4, extra: &Ipv4Extra) -> Vec<u8> {
    let mut opts = extra.options.clone();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    let hlen = 20 + opts.len();
    let body = l4.bytes(false);
    let total = (hlen + body.len()) as u16;
    let mut h = Vec::with_capacity(hlen + body.len());
    h.push(0x40 | (hlen / 4) as u8);
    h.push(0);
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&0x1234u16.to_be_bytes());
    let flags_frag = (u16::from(extra.more_fragments) << 13) | (extra.frag_offset & 0x1fff);
    h.extend_from_slice(&flags_frag.to_be_bytes());
    h.push(64);
    h.push(l4.proto(false));
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&opts);
    let csum = checksum(&h[..hlen]);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h.extend_from_slice(&body);
    h
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, l4: &L4) -> Vec<u8> {
    let body = l4.bytes(true);
    let mut h = Vec::with_capacity(40 + body.len());
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.push(l4.proto(true));
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&body);
    h
}

/// An Ethernet frame with optional VLAN tags `(tpid, vid)` (outermost first).
pub fn ethernet(vlans: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    for &(tpid, vid) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn eth_ipv4(l4: &L4) -> Vec<u8> {
    ethernet(
        &[],
        ETH_P_IP,
        &ipv4(
            Ipv4Addr::new(10, 200, 0, 1),
            Ipv4Addr::new(10, 200, 0, 2),
            l4,
            &Ipv4Extra::default(),
        ),
    )
}

pub fn eth_ipv6(l4: &L4) -> Vec<u8> {
    ethernet(
        &[],
        ETH_P_IPV6,
        &ipv6(
            "fd00:200::1".parse().expect("literal"),
            "fd00:200::2".parse().expect("literal"),
            l4,
        ),
    )
}

pub fn arp_request() -> Vec<u8> {
    let mut body = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    body.extend_from_slice(&SRC_MAC);
    body.extend_from_slice(&[10, 200, 0, 1]);
    body.extend_from_slice(&[0; 6]);
    body.extend_from_slice(&[10, 200, 0, 2]);
    ethernet(&[], ETH_P_ARP, &body)
}

/// 802.1ad outer + 802.1Q inner tag.
pub fn qinq(frame_ethertype: u16, payload: &[u8]) -> Vec<u8> {
    ethernet(
        &[(ETH_P_8021AD, 100), (ETH_P_8021Q, 200)],
        frame_ethertype,
        payload,
    )
}

/// RFC 1071 one's-complement checksum.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let p = ipv4(
            Ipv4Addr::new(10, 200, 0, 1),
            Ipv4Addr::new(10, 200, 0, 2),
            &L4::udp(1, 2, 10),
            &Ipv4Extra {
                options: vec![1, 1, 1],
                ..Default::default()
            },
        );
        assert_eq!(p[0], 0x46, "IHL 6 with 3 option bytes padded to 4");
        assert_eq!(checksum(&p[..24]), 0, "a correct header sums to zero");
    }
}

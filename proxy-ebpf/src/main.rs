//! edgeproxy's XDP data plane.
//!
//! The `#[xdp]` entry is thin: it calls [`try_edge_xdp`], and a parse error becomes an
//! explicit, counted class (`Malformed`) with a pass verdict, never a crash or a misread.
//! Every header read goes through [`Packet::read`], which bounds-checks against
//! `data_end` in a form the verifier can follow.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{PerCpuArray, RingBuf},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use proxy_common::{
    Counter, DataplaneStat, PACKET_RECORDS_BYTES, PacketRecord, ProtoClass,
    reference::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ICMP_MIN_HLEN,
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_MIN_HLEN, IPV6_HLEN,
        MAX_VLAN_TAGS, TCP_MIN_HLEN, UDP_HLEN,
    },
};

#[map(name = "PROTO_COUNTERS")]
static PROTO_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(ProtoClass::COUNT, 0);

#[map(name = "DATAPLANE_STATS")]
static DATAPLANE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DataplaneStat::COUNT, 0);

#[map(name = "PACKET_RECORDS")]
static PACKET_RECORDS: RingBuf = RingBuf::with_byte_size(PACKET_RECORDS_BYTES, 0);

/// The packet could not be parsed: a header ran past the end of the frame or had an
/// impossible field.
struct Malformed;

struct Parsed {
    class: ProtoClass,
    src_port: u16,
    dst_port: u16,
}

impl Parsed {
    const fn of(class: ProtoClass) -> Self {
        Self {
            class,
            src_port: 0,
            dst_port: 0,
        }
    }
}

struct Packet<'a> {
    ctx: &'a XdpContext,
}

impl Packet<'_> {
    /// Reads `N` bytes at `off`, or fails if they are not all inside the frame.
    #[inline(always)]
    fn read<const N: usize>(&self, off: usize) -> Result<[u8; N], Malformed> {
        let start = self.ctx.data();
        let end = self.ctx.data_end();
        if start + off + N > end {
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

    /// Fails unless `len` bytes at `off` are inside the frame. Written as a pointer
    /// comparison against `data_end` (never as a length comparison) because that is the
    /// form the verifier turns into a known packet range.
    #[inline(always)]
    fn require(&self, off: usize, len: usize) -> Result<(), Malformed> {
        if self.ctx.data() + off + len > self.ctx.data_end() {
            return Err(Malformed);
        }
        Ok(())
    }
}

#[xdp]
pub fn edge_xdp(ctx: XdpContext) -> u32 {
    let wire_len = (ctx.data_end() - ctx.data()) as u32;
    let parsed = match try_edge_xdp(&ctx) {
        Ok(parsed) => parsed,
        Err(Malformed) => {
            debug!(&ctx, "malformed packet: {} bytes", wire_len);
            Parsed::of(ProtoClass::Malformed)
        }
    };
    count(parsed.class, wire_len);
    push_record(&ctx, &parsed, wire_len);
    xdp_action::XDP_PASS
}

/// The benchmark floor: the cheapest possible XDP program, loaded and run the same way.
#[xdp]
pub fn xdp_pass_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn try_edge_xdp(ctx: &XdpContext) -> Result<Parsed, Malformed> {
    let pkt = Packet { ctx };
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
        ETH_P_IP => ipv4(&pkt, off),
        ETH_P_IPV6 => ipv6(&pkt, off),
        _ => Ok(Parsed::of(ProtoClass::NonIp)),
    }
}

#[inline(always)]
fn ipv4(pkt: &Packet, off: usize) -> Result<Parsed, Malformed> {
    let hdr = pkt.read::<IPV4_MIN_HLEN>(off)?;
    if hdr[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let hlen = usize::from(hdr[0] & 0x0f) * 4;
    if hlen < IPV4_MIN_HLEN {
        return Err(Malformed);
    }
    pkt.require(off, hlen)?;
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0 {
        // Only the first fragment carries the L4 header.
        return Ok(Parsed::of(ProtoClass::Ipv4Other));
    }
    let l4_off = off + hlen;
    match hdr[9] {
        IPPROTO_TCP => ports::<TCP_MIN_HLEN>(pkt, l4_off, ProtoClass::Tcp4),
        IPPROTO_UDP => ports::<UDP_HLEN>(pkt, l4_off, ProtoClass::Udp4),
        IPPROTO_ICMP => present::<ICMP_MIN_HLEN>(pkt, l4_off, ProtoClass::Icmp4),
        _ => Ok(Parsed::of(ProtoClass::Ipv4Other)),
    }
}

#[inline(always)]
fn ipv6(pkt: &Packet, off: usize) -> Result<Parsed, Malformed> {
    pkt.require(off, IPV6_HLEN)?;
    let hdr = pkt.read::<8>(off)?;
    if hdr[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let l4_off = off + IPV6_HLEN;
    match hdr[6] {
        IPPROTO_TCP => ports::<TCP_MIN_HLEN>(pkt, l4_off, ProtoClass::Tcp6),
        IPPROTO_UDP => ports::<UDP_HLEN>(pkt, l4_off, ProtoClass::Udp6),
        IPPROTO_ICMPV6 => present::<ICMP_MIN_HLEN>(pkt, l4_off, ProtoClass::Icmp6),
        _ => Ok(Parsed::of(ProtoClass::Ipv6Other)),
    }
}

/// An L4 header of at least `MIN` bytes whose first four bytes are the ports.
#[inline(always)]
fn ports<const MIN: usize>(
    pkt: &Packet,
    off: usize,
    class: ProtoClass,
) -> Result<Parsed, Malformed> {
    pkt.require(off, MIN)?;
    let p = pkt.read::<4>(off)?;
    Ok(Parsed {
        class,
        src_port: u16::from_be_bytes([p[0], p[1]]),
        dst_port: u16::from_be_bytes([p[2], p[3]]),
    })
}

#[inline(always)]
fn present<const MIN: usize>(
    pkt: &Packet,
    off: usize,
    class: ProtoClass,
) -> Result<Parsed, Malformed> {
    pkt.require(off, MIN)?;
    Ok(Parsed::of(class))
}

#[inline(always)]
fn count(class: ProtoClass, wire_len: u32) {
    if let Some(c) = PROTO_COUNTERS.get_ptr_mut(class as u32) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; XDP does not nest on
        // one CPU, so nothing else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(wire_len);
        }
    }
}

#[inline(always)]
fn bump(stat: DataplaneStat) {
    if let Some(v) = DATAPLANE_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: as in `count`, a per-CPU slot only this invocation writes.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
fn push_record(ctx: &XdpContext, parsed: &Parsed, wire_len: u32) {
    let Some(mut entry) = PACKET_RECORDS.reserve::<PacketRecord>(0) else {
        // A full ring never affects the verdict: the record is dropped and counted.
        bump(DataplaneStat::RingbufFull);
        return;
    };
    entry.write(PacketRecord {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        wire_len,
        ifindex: ctx.ingress_ifindex() as u32,
        rx_queue: ctx.rx_queue_index(),
        class: parsed.class as u32,
        src_port: parsed.src_port,
        dst_port: parsed.dst_port,
        _pad: 0,
    });
    entry.submit(0);
    bump(DataplaneStat::RecordsPushed);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! Everything the XDP program and userspace must agree on: map names and sizes,
//! `#[repr(C)]` records, and the protocol classes the data plane counts.
//!
//! Both sides depend on this crate so the layouts cannot drift. The pure-Rust
//! [`reference`] classifier states what the XDP program must compute; tests run
//! both on the same packets and compare.
#![no_std]

pub mod reference;

/// Name of the XDP program in the eBPF object.
pub const EDGE_XDP_PROGRAM: &str = "edge_xdp";
/// An XDP program that returns `XDP_PASS` and does nothing else: the floor for benchmarks.
pub const FLOOR_XDP_PROGRAM: &str = "xdp_pass_floor";

/// Per-CPU array of [`Counter`], indexed by [`ProtoClass`].
pub const PROTO_COUNTERS_MAP: &str = "PROTO_COUNTERS";
/// Per-CPU array of `u64`, indexed by [`DataplaneStat`].
pub const DATAPLANE_STATS_MAP: &str = "DATAPLANE_STATS";
/// Ring buffer of [`PacketRecord`].
pub const PACKET_RECORDS_MAP: &str = "PACKET_RECORDS";
/// Size of the packet record ring buffer in bytes (a power of two, a multiple of the page size).
pub const PACKET_RECORDS_BYTES: u32 = 1 << 21;

/// What the data plane recognised a packet as. The discriminant is the index into
/// [`PROTO_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtoClass {
    /// Not IP and not ARP (LLDP, unknown ethertypes, …).
    NonIp = 0,
    Arp = 1,
    /// IPv4 with an L4 protocol we do not parse, or a non-first fragment.
    Ipv4Other = 2,
    Tcp4 = 3,
    Udp4 = 4,
    Icmp4 = 5,
    /// IPv6 with an L4 protocol we do not parse (or behind extension headers, for now).
    Ipv6Other = 6,
    Tcp6 = 7,
    Udp6 = 8,
    Icmp6 = 9,
    /// Truncated or inconsistent headers.
    Malformed = 10,
}

impl ProtoClass {
    pub const COUNT: u32 = 11;
    pub const ALL: [ProtoClass; Self::COUNT as usize] = [
        ProtoClass::NonIp,
        ProtoClass::Arp,
        ProtoClass::Ipv4Other,
        ProtoClass::Tcp4,
        ProtoClass::Udp4,
        ProtoClass::Icmp4,
        ProtoClass::Ipv6Other,
        ProtoClass::Tcp6,
        ProtoClass::Udp6,
        ProtoClass::Icmp6,
        ProtoClass::Malformed,
    ];

    pub const fn from_u32(v: u32) -> Option<Self> {
        if v < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// Short stable name used in reports, metrics and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            ProtoClass::NonIp => "non_ip",
            ProtoClass::Arp => "arp",
            ProtoClass::Ipv4Other => "ipv4_other",
            ProtoClass::Tcp4 => "tcp4",
            ProtoClass::Udp4 => "udp4",
            ProtoClass::Icmp4 => "icmp4",
            ProtoClass::Ipv6Other => "ipv6_other",
            ProtoClass::Tcp6 => "tcp6",
            ProtoClass::Udp6 => "udp6",
            ProtoClass::Icmp6 => "icmp6",
            ProtoClass::Malformed => "malformed",
        }
    }
}

/// Packets and bytes (wire length) seen, one per CPU per [`ProtoClass`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Data-plane events that are not per-protocol. The discriminant is the index into
/// [`DATAPLANE_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataplaneStat {
    /// A record was written to [`PACKET_RECORDS_MAP`].
    RecordsPushed = 0,
    /// The ring buffer had no room: the record was dropped, the packet's verdict was not affected.
    RingbufFull = 1,
}

impl DataplaneStat {
    pub const COUNT: u32 = 2;
    pub const ALL: [DataplaneStat; Self::COUNT as usize] =
        [DataplaneStat::RecordsPushed, DataplaneStat::RingbufFull];

    pub const fn name(self) -> &'static str {
        match self {
            DataplaneStat::RecordsPushed => "records_pushed",
            DataplaneStat::RingbufFull => "ringbuf_full",
        }
    }
}

/// One record per packet pushed into [`PACKET_RECORDS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketRecord {
    /// `bpf_ktime_get_ns()` when the program ran (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub wire_len: u32,
    pub ifindex: u32,
    pub rx_queue: u32,
    /// A [`ProtoClass`] discriminant.
    pub class: u32,
    /// L4 ports in host byte order; zero when the class has none.
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u32,
}

// The record layout is part of the ABI between the two sides: pin its size.
const _: () = assert!(core::mem::size_of::<PacketRecord>() == 32);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: these are `#[repr(C)]`, contain only integers and have no implicit padding
    // (sizes are asserted above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PacketRecord {}
}

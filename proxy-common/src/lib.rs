//! Everything the XDP program and userspace must agree on: map names and sizes,
//! `#[repr(C)]` records, and the protocol classes the data plane counts.
//!
//! Both sides depend on this crate so the layouts cannot drift. The pure-Rust
//! [`reference`] classifier states what the XDP program must compute; tests run
//! both on the same packets and compare.
#![no_std]

pub mod policy;
pub mod reference;

/// Name of the XDP program in the eBPF object.
pub const EDGE_XDP_PROGRAM: &str = "edge_xdp";
/// The same logic as a TC ingress classifier (tcx where available).
pub const EDGE_TC_PROGRAM: &str = "edge_tc";
/// An XDP program that returns `XDP_PASS` and does nothing else: the floor for benchmarks.
pub const FLOOR_XDP_PROGRAM: &str = "xdp_pass_floor";

/// Per-CPU array of [`Counter`], indexed by [`ProtoClass`].
pub const PROTO_COUNTERS_MAP: &str = "PROTO_COUNTERS";
/// Per-CPU array of `u64`, indexed by [`DataplaneStat`].
pub const DATAPLANE_STATS_MAP: &str = "DATAPLANE_STATS";
/// Ring buffer of sampled and captured packets: a [`policy::RecordHeader`] then data.
pub const RECORDS_MAP: &str = "RECORDS";
/// Size of the record ring buffer in bytes (a power of two, a multiple of the page size).
pub const RECORDS_BYTES: u32 = 1 << 22;
/// Array-of-maps holding one record ring per CPU (when the kernel allows ring buffers
/// as inner maps); an empty slot makes that CPU use [`RECORDS_MAP`].
pub const RECORD_RINGS_MAP: &str = "RECORD_RINGS";
/// CPUs the per-CPU ring array covers; a machine with more uses the shared ring.
pub const RECORD_RINGS_MAX_CPUS: u32 = 256;
/// Size of each per-CPU ring.
pub const RECORD_RING_PER_CPU_BYTES: u32 = 1 << 21;
/// Unread bytes whose crossing makes the data plane wake the record consumer (once per
/// crossing, not per record above it); below that the consumer finds records on its
/// poll timeout ([`RECORDS_POLL_MS`]). A wake-up is an irq_work and a self-IPI, which
/// under virtualisation cost the producing CPU about 27 µs each (measured: 5.2 wake-ups
/// per 1,000 records at a 64 KiB threshold added ~120 ns to every captured packet). A
/// quarter of a per-CPU ring: ~1,500 captures of a 256-byte bucket per wake-up, with
/// three quarters left for the consumer to wake up in.
pub const RECORDS_WAKEUP_BYTES: u32 = RECORD_RING_PER_CPU_BYTES / 4;
/// The record consumer's poll timeout: the most a record waits when traffic is light.
pub const RECORDS_POLL_MS: u16 = 10;

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
    /// A record (sample or capture) was written to [`RECORDS_MAP`].
    RecordsPushed = 0,
    /// The ring buffer had no room: the record was dropped and counted here. A sampled
    /// packet still passes; a packet that should have been captured is passed instead
    /// of dropped, so it can still reach a socket.
    RingbufFull = 1,
    /// A `capture` rule matched a packet that is not UDP: passed, not captured.
    CaptureNotUdp = 2,
    /// A captured payload was longer than the rule's (or the record's) maximum.
    CaptureTruncated = 3,
    /// Copying bytes out of the packet failed (should never happen; counted to prove it).
    LoadBytesFailed = 4,
    /// A record submit woke the ring's consumer (an irq_work and a self-IPI): how often
    /// the data plane interrupts userspace, to compare with records pushed.
    RecordWakeups = 5,
}

/// Entries of [`DATAPLANE_STATS_MAP`]: room beyond [`DataplaneStat::COUNT`] so a counter
/// added later does not change the pinned map's layout (a pinned map whose size differs
/// cannot be reused by a newer edgeproxy; see `IncompatiblePins`).
pub const DATAPLANE_STATS_SLOTS: u32 = 16;
const _: () = assert!(DataplaneStat::COUNT <= DATAPLANE_STATS_SLOTS);

impl DataplaneStat {
    pub const COUNT: u32 = 6;
    pub const ALL: [DataplaneStat; Self::COUNT as usize] = [
        DataplaneStat::RecordsPushed,
        DataplaneStat::RingbufFull,
        DataplaneStat::CaptureNotUdp,
        DataplaneStat::CaptureTruncated,
        DataplaneStat::LoadBytesFailed,
        DataplaneStat::RecordWakeups,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DataplaneStat::RecordsPushed => "records_pushed",
            DataplaneStat::RingbufFull => "ringbuf_full",
            DataplaneStat::CaptureNotUdp => "capture_not_udp",
            DataplaneStat::CaptureTruncated => "capture_truncated",
            DataplaneStat::LoadBytesFailed => "load_bytes_failed",
            DataplaneStat::RecordWakeups => "record_wakeups",
        }
    }
}

const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: these are `#[repr(C)]`, contain only integers and have no implicit padding
    // (sizes are asserted next to each type), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::policy::RuleSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::policy::RuleAction {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::policy::PolicyState {}
}

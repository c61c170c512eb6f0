//! The policy ABI: how userspace lays a compiled policy out in maps and how the XDP
//! program reads it.
//!
//! Evaluation is a bitmap intersection, bounded whatever the policy: each match
//! dimension (source prefix, destination prefix, protocol, destination port, source
//! port) maps the packet's value to the set of rules that accept it, and the first rule
//! in all five sets wins. Prefix sets come from LPM tries whose entries already include
//! the rules of every covering (shorter) prefix, so one longest-prefix lookup is enough.
//!
//! Everything exists twice, once per *slot*. The program reads
//! [`PolicyState::active_slot`] once per packet and then only that slot's entries; the
//! loader fills the other slot completely and flips the index with one map update, so
//! no packet ever sees half a policy.

/// Most rules one policy can have (the width of [`RuleSet`]).
pub const MAX_RULES: u32 = 256;
pub const RULE_WORDS: usize = (MAX_RULES / 64) as usize;
pub const SLOTS: u32 = 2;

/// Action indices after the rules, per slot.
pub const DEFAULT_ACTION: u32 = MAX_RULES;
pub const MALFORMED_ACTION: u32 = MAX_RULES + 1;
pub const NON_IP_ACTION: u32 = MAX_RULES + 2;
pub const ACTIONS_PER_SLOT: u32 = MAX_RULES + 3;

/// Port tables: one entry per port plus [`NO_PORT`] for packets without ports (ICMP,
/// other protocols, non-first fragments): only rules without a port condition match them.
pub const NO_PORT: u32 = 65536;
pub const PORT_ENTRIES: u32 = 65537;
pub const PROTO_ENTRIES: u32 = 256;

/// Largest snap length of a `sample` rule (bytes of the frame copied into the record).
pub const MAX_SNAP: u32 = 256;
/// Largest captured UDP payload of a `capture` rule.
pub const MAX_CAPTURE: u32 = 4096;

pub const POLICY_STATE_MAP: &str = "POLICY_STATE";
pub const SRC_V4_MAP: &str = "SRC_V4";
pub const DST_V4_MAP: &str = "DST_V4";
pub const SRC_V6_MAP: &str = "SRC_V6";
pub const DST_V6_MAP: &str = "DST_V6";
pub const PROTO_RULES_MAP: &str = "PROTO_RULES";
pub const DPORT_RULES_MAP: &str = "DPORT_RULES";
pub const SPORT_RULES_MAP: &str = "SPORT_RULES";
pub const RULE_ACTIONS_MAP: &str = "RULE_ACTIONS";
pub const RULE_COUNTERS_MAP: &str = "RULE_COUNTERS";
pub const VERDICT_COUNTERS_MAP: &str = "VERDICT_COUNTERS";
/// Per slot: packets classified by that slot's policy.
pub const SLOT_COUNTERS_MAP: &str = "SLOT_COUNTERS";

/// Most LPM entries one policy may need per map (the parser's `max_prefixes` default,
/// plus the `/0` entry).
pub const MAX_LPM_PER_POLICY: u32 = 131_072;
/// LPM capacity per map: while a load is in flight three generations coexist (the
/// active one, the rollback target, and the new one, written before the old is deleted).
pub const DEFAULT_LPM_ENTRIES: u32 = 3 * MAX_LPM_PER_POLICY;

/// LPM key data: a tag byte, then the address. The stored prefix length is `8 + prefix`
/// so the tag is always part of the match. Each load writes its prefixes under a fresh
/// tag (never the two in use), so nothing has to be deleted before the flip; entries of
/// retired tags are deleted after it.
pub type LpmV4 = [u8; 5];
pub type LpmV6 = [u8; 17];

/// A set of rule indices.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleSet {
    pub words: [u64; RULE_WORDS],
}

impl RuleSet {
    pub const EMPTY: RuleSet = RuleSet {
        words: [0; RULE_WORDS],
    };

    #[inline(always)]
    pub fn insert(&mut self, rule: u32) {
        self.words[(rule / 64) as usize % RULE_WORDS] |= 1u64 << (rule % 64);
    }

    #[inline(always)]
    pub fn contains(&self, rule: u32) -> bool {
        self.words[(rule / 64) as usize % RULE_WORDS] & (1u64 << (rule % 64)) != 0
    }

    #[inline(always)]
    pub fn union(&mut self, other: &RuleSet) {
        for i in 0..RULE_WORDS {
            self.words[i] |= other.words[i];
        }
    }

    #[inline(always)]
    pub fn intersect(&mut self, other: &RuleSet) {
        for i in 0..RULE_WORDS {
            self.words[i] &= other.words[i];
        }
    }

    /// The lowest rule index in the set: the first match.
    #[inline(always)]
    pub fn first(&self) -> Option<u32> {
        for i in 0..RULE_WORDS {
            let w = self.words[i];
            if w != 0 {
                return Some(i as u32 * 64 + w.trailing_zeros());
            }
        }
        None
    }
}

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActionKind {
    Pass = 0,
    Drop = 1,
    /// Pass, and with probability `sample_threshold / 2^32` push the first `snap_len`
    /// bytes of the frame into the record ring.
    Sample = 2,
    /// Push the UDP payload (up to `capture_max` bytes) into the record ring, then drop
    /// or pass the packet (`capture_then_drop`). Non-UDP packets are passed, not captured.
    Capture = 3,
}

impl ActionKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Pass),
            1 => Some(Self::Drop),
            2 => Some(Self::Sample),
            3 => Some(Self::Capture),
            _ => None,
        }
    }
}

/// What a matching rule (or the default / malformed / non-IP action) does.
/// An all-zero entry (no policy loaded yet) passes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleAction {
    /// Sample when `bpf_get_prandom_u32() < sample_threshold`; `1 << 32` samples all.
    pub sample_threshold: u64,
    pub kind: u8,
    pub capture_then_drop: u8,
    pub snap_len: u16,
    pub capture_max: u16,
    pub _pad: [u8; 10],
}

const _: () = assert!(core::mem::size_of::<RuleAction>() == 24);
const _: () = assert!(core::mem::size_of::<PolicyState>() == 24);

/// The one entry of [`POLICY_STATE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// 0 or 1: which slot's arrays (protocol, ports, actions) and LPM tag are in force.
    pub active_slot: u32,
    /// The LPM tag of each slot's prefixes (0: none loaded).
    pub lpm_tag: [u8; SLOTS as usize],
    /// 1 while entries of retired tags may remain (set by the flip, cleared after the
    /// clean-up); a load first finishes an interrupted clean-up.
    pub cleanup_pending: u8,
    pub _pad: u8,
    /// Generation number of the policy in each slot (0 = never loaded).
    pub generation: [u64; SLOTS as usize],
}

/// What happened to a packet, for [`VERDICT_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Pass = 0,
    /// Dropped by a `drop` rule or the default action.
    DropPolicy = 1,
    /// Dropped because the `malformed` action says so.
    DropMalformed = 2,
    /// Captured, then dropped.
    DropCaptured = 3,
    /// Passed by a `sample` rule (whether or not this packet was sampled).
    PassSampleRule = 4,
    /// Captured, then passed.
    PassCaptured = 5,
    /// A capture rule matched but the record could not be written (ring full, not UDP):
    /// passed so the datagram can still reach a socket.
    PassCaptureFailed = 6,
}

impl Verdict {
    pub const COUNT: u32 = 7;
    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Verdict::Pass,
        Verdict::DropPolicy,
        Verdict::DropMalformed,
        Verdict::DropCaptured,
        Verdict::PassSampleRule,
        Verdict::PassCaptured,
        Verdict::PassCaptureFailed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::DropPolicy => "drop_policy",
            Verdict::DropMalformed => "drop_malformed",
            Verdict::DropCaptured => "drop_captured",
            Verdict::PassSampleRule => "pass_sample_rule",
            Verdict::PassCaptured => "pass_captured",
            Verdict::PassCaptureFailed => "pass_capture_failed",
        }
    }

    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Verdict::DropPolicy | Verdict::DropMalformed | Verdict::DropCaptured
        )
    }
}

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Sample = 1,
    Capture = 2,
}

/// Header of every record in the ring buffer; `cap_len` bytes of data follow it (the
/// frame's first bytes for a sample, the UDP payload for a capture).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE: a jiffy's resolution; the
    /// precise clock cost 15–20 ns per record, a sixth of a capture's XDP time, and
    /// userspace stamps messages with its own receive time).
    pub ts_ns: u64,
    /// Generation of the policy that classified the packet.
    pub generation: u64,
    pub ifindex: u32,
    pub rx_queue: u32,
    /// Rule index, or [`DEFAULT_ACTION`] / [`MALFORMED_ACTION`] / [`NON_IP_ACTION`].
    pub rule: u32,
    pub wire_len: u32,
    /// Bytes of data after the header.
    pub cap_len: u32,
    /// Bytes the rule wanted but the packet (or the record bucket) did not have.
    pub truncated: u32,
    /// A [`RecordKind`].
    pub kind: u8,
    /// A [`Verdict`].
    pub verdict: u8,
    /// A [`crate::ProtoClass`].
    pub class: u8,
    /// 4, 6, or 0 (not IP / malformed).
    pub family: u8,
    pub l4_proto: u8,
    pub slot: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: [u8; 6],
    /// IPv4 addresses use the first four bytes.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

pub const RECORD_HEADER_LEN: usize = core::mem::size_of::<RecordHeader>();
const _: () = assert!(RECORD_HEADER_LEN == 88);

impl Verdict {
    pub const fn from_u8(v: u8) -> Option<Self> {
        if (v as u32) < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }
}

/// Fixed record sizes (header + data room) the program reserves: the ring buffer
/// needs a constant size per reservation, so captures use the smallest bucket that fits.
pub const SAMPLE_RECORD_LEN: usize = RECORD_HEADER_LEN + MAX_SNAP as usize;
pub const CAPTURE_BUCKETS: [usize; 3] = [256, 1024, MAX_CAPTURE as usize];

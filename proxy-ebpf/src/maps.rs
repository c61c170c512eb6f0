//! Every map the data plane uses. None is declared pinned: the daemon passes pin paths
//! at load time, and test loads stay private to their process.
use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    btf_maps::{ArrayOfMaps, RingBuf as BtfRingBuf},
    macros::{btf_map, map},
    maps::{Array, LpmTrie, PerCpuArray, RingBuf},
};
use proxy_common::{
    Counter, DATAPLANE_STATS_SLOTS, DataplaneStat, ProtoClass, RECORD_RING_PER_CPU_BYTES,
    RECORD_RINGS_MAX_CPUS, RECORDS_BYTES,
    policy::{
        ACTIONS_PER_SLOT, DEFAULT_LPM_ENTRIES, LpmV4, LpmV6, PORT_ENTRIES, PROTO_ENTRIES,
        PolicyState, RuleAction, RuleSet, SLOTS, Verdict,
    },
};

#[map(name = "PROTO_COUNTERS")]
pub static PROTO_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(ProtoClass::COUNT, 0);

#[map(name = "DATAPLANE_STATS")]
pub static DATAPLANE_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(DATAPLANE_STATS_SLOTS, 0);

#[map(name = "VERDICT_COUNTERS")]
pub static VERDICT_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(Verdict::COUNT, 0);

#[map(name = "SLOT_COUNTERS")]
pub static SLOT_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(SLOTS, 0);

#[map(name = "RULE_COUNTERS")]
pub static RULE_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(SLOTS * ACTIONS_PER_SLOT, 0);

#[map(name = "RECORDS")]
pub static RECORDS: RingBuf = RingBuf::with_byte_size(RECORDS_BYTES, 0);

/// One ring per CPU, filled by userspace when the kernel supports ring buffers as inner
/// maps; a CPU without an entry uses `RECORDS`.
#[btf_map(name = "RECORD_RINGS")]
pub static RECORD_RINGS: ArrayOfMaps<
    BtfRingBuf<u8, { RECORD_RING_PER_CPU_BYTES as usize }>,
    { RECORD_RINGS_MAX_CPUS as usize },
> = ArrayOfMaps::new();

#[map(name = "POLICY_STATE")]
pub static POLICY_STATE: Array<PolicyState> = Array::with_max_entries(1, 0);

#[map(name = "SRC_V4")]
pub static SRC_V4: LpmTrie<LpmV4, RuleSet> =
    LpmTrie::with_max_entries(DEFAULT_LPM_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "DST_V4")]
pub static DST_V4: LpmTrie<LpmV4, RuleSet> =
    LpmTrie::with_max_entries(DEFAULT_LPM_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "SRC_V6")]
pub static SRC_V6: LpmTrie<LpmV6, RuleSet> =
    LpmTrie::with_max_entries(DEFAULT_LPM_ENTRIES, BPF_F_NO_PREALLOC);
#[map(name = "DST_V6")]
pub static DST_V6: LpmTrie<LpmV6, RuleSet> =
    LpmTrie::with_max_entries(DEFAULT_LPM_ENTRIES, BPF_F_NO_PREALLOC);

// The loader writes these through mmap (a 65537-entry port table per slot would take
// 65537 syscalls otherwise); the flip of POLICY_STATE is a syscall and orders the writes.
#[map(name = "PROTO_RULES")]
pub static PROTO_RULES: Array<RuleSet> =
    Array::with_max_entries(SLOTS * PROTO_ENTRIES, BPF_F_MMAPABLE);
#[map(name = "DPORT_RULES")]
pub static DPORT_RULES: Array<RuleSet> =
    Array::with_max_entries(SLOTS * PORT_ENTRIES, BPF_F_MMAPABLE);
#[map(name = "SPORT_RULES")]
pub static SPORT_RULES: Array<RuleSet> =
    Array::with_max_entries(SLOTS * PORT_ENTRIES, BPF_F_MMAPABLE);

#[map(name = "RULE_ACTIONS")]
pub static RULE_ACTIONS: Array<RuleAction> =
    Array::with_max_entries(SLOTS * ACTIONS_PER_SLOT, BPF_F_MMAPABLE);

#[inline(always)]
pub fn add(map: &PerCpuArray<Counter>, index: u32, bytes: u32) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array; XDP does not nest on one CPU, so
        // nothing else writes it concurrently.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
        }
    }
}

#[inline(always)]
pub fn bump(stat: DataplaneStat) {
    if let Some(v) = DATAPLANE_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: as in `add`.
        unsafe { *v += 1 };
    }
}

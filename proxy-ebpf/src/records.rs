//! Sampled and captured packets into the record ring. Reservations have a constant size
//! (the verifier's rule), so captures pick the smallest bucket that fits. A full ring
//! never changes the verdict logic beyond what the caller decides: it is counted.
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns, bpf_ringbuf_query},
};
use proxy_common::{
    DataplaneStat,
    policy::{CAPTURE_BUCKETS, MAX_SNAP, RecordHeader, RecordKind},
};

use crate::{
    hook::Hook,
    maps::{RECORD_RINGS, RECORDS, bump},
    parse::Parsed,
};

/// Unread bytes in the ring at which a submit wakes the consumer.
const WAKEUP_BYTES: u64 = proxy_common::RECORDS_WAKEUP_BYTES as u64;

#[repr(C)]
struct Record<const N: usize> {
    hdr: RecordHeader,
    data: [u8; N],
}

/// What the header needs besides the parsed packet.
pub struct RecordMeta {
    pub kind: RecordKind,
    pub rule: u32,
    pub verdict: u8,
    pub slot: u8,
    pub generation: u64,
}

/// Copies `len` (≤ `N`) bytes at `off` of the frame into a reserved record and submits it.
/// Returns false (and counts why) when the ring is full.
#[inline(always)]
fn push<const N: usize, H: Hook>(
    ctx: &H,
    p: &Parsed,
    meta: &RecordMeta,
    off: usize,
    len: usize,
    truncated: u32,
) -> bool {
    // This CPU's ring when userspace installed one, else the shared ring.
    // SAFETY: bpf_get_smp_processor_id has no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let size = size_of::<Record<N>>();
    let (entry, avail) = match RECORD_RINGS.get(cpu) {
        Some(ring) => (
            ring.reserve_bytes(size, 0),
            // SAFETY: an inner-map lookup returns the map itself; the helper only reads it.
            unsafe {
                bpf_ringbuf_query(
                    core::ptr::from_ref(ring).cast_mut().cast(),
                    u64::from(BPF_RB_AVAIL_DATA),
                )
            },
        ),
        None => (
            RECORDS.reserve_bytes(size, 0),
            RECORDS.query(u64::from(BPF_RB_AVAIL_DATA)),
        ),
    };
    let Some(mut entry) = entry else {
        bump(DataplaneStat::RingbufFull);
        return false;
    };
    let rec = entry.as_mut_ptr().cast::<Record<N>>();
    // Clamp in a form the verifier can follow: the copy never exceeds the data room.
    let len = if len > N { N } else { len };
    let copied = if len == 0 {
        0
    } else {
        // SAFETY: `rec` is an exclusive reservation of `size_of::<Record<N>>()` bytes and
        // `len <= N` bytes are written into its `data` array.
        let rc = unsafe { ctx.load_bytes(off as u32, (&raw mut (*rec).data).cast(), len as u32) };
        if rc != 0 {
            bump(DataplaneStat::LoadBytesFailed);
            0
        } else {
            len
        }
    };
    // SAFETY: `rec` is valid for writes (see above); the header is written whole.
    unsafe {
        (&raw mut (*rec).hdr).write(RecordHeader {
            ts_ns: bpf_ktime_get_coarse_ns(),
            generation: meta.generation,
            ifindex: ctx.ifindex(),
            rx_queue: ctx.rx_queue(),
            rule: meta.rule,
            wire_len: ctx.wire_len(),
            cap_len: copied as u32,
            truncated,
            kind: meta.kind as u8,
            verdict: meta.verdict,
            class: p.class as u8,
            family: p.family,
            l4_proto: p.l4_proto,
            slot: meta.slot,
            src_port: p.src_port,
            dst_port: p.dst_port,
            _pad: [0; 6],
            src_addr: p.src,
            dst_addr: p.dst,
        });
    }
    // Waking the consumer per record costs more than the rest of the program; wake it
    // once, when this record makes the waiting data cross the batch threshold (`avail`
    // already counts it), and let its poll timeout pick up smaller amounts. Waking on
    // every record above the threshold would wake a consumer that is already draining
    // once per record.
    let record = size as u64 + 8; // the ring's own 8-byte record header
    let flags = if avail >= WAKEUP_BYTES && avail < WAKEUP_BYTES + record {
        bump(DataplaneStat::RecordWakeups);
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    };
    entry.submit(flags);
    bump(DataplaneStat::RecordsPushed);
    true
}

/// The first `snap_len` bytes of the frame.
#[inline(always)]
pub fn sample<H: Hook>(ctx: &H, p: &Parsed, meta: &RecordMeta, snap_len: u16) -> bool {
    let wire = ctx.wire_len() as usize;
    let want = usize::from(snap_len).min(MAX_SNAP as usize);
    let len = if want > wire { wire } else { want };
    push::<{ MAX_SNAP as usize }, H>(ctx, p, meta, 0, len, 0)
}

/// The UDP payload, up to `max` bytes. The caller checked the packet is UDP.
#[inline(always)]
pub fn capture<H: Hook>(ctx: &H, p: &Parsed, meta: &RecordMeta, max: u16) -> bool {
    let wire = ctx.wire_len() as usize;
    let payload_off = p.l4_off + 8;
    let available = wire
        .saturating_sub(payload_off)
        .min(usize::from(p.udp_len).saturating_sub(8));
    let len = available.min(usize::from(max));
    let truncated = (available - len) as u32;
    if truncated != 0 {
        bump(DataplaneStat::CaptureTruncated);
    }
    if len <= CAPTURE_BUCKETS[0] {
        push::<{ CAPTURE_BUCKETS[0] }, H>(ctx, p, meta, payload_off, len, truncated)
    } else if len <= CAPTURE_BUCKETS[1] {
        push::<{ CAPTURE_BUCKETS[1] }, H>(ctx, p, meta, payload_off, len, truncated)
    } else {
        push::<{ CAPTURE_BUCKETS[2] }, H>(ctx, p, meta, payload_off, len, truncated)
    }
}

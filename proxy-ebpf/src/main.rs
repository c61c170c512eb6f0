//! edgeproxy's data plane: the same per-packet logic on two hooks.
//!
//! `edge_xdp` (XDP, native or generic) and `edge_tc` (TC ingress, tcx where available;
//! for NICs whose zero-copy receive excludes XDP) are thin: [`edge`] parses
//! ([`parse`]), picks the first matching rule of the active policy slot ([`policy`]),
//! counts, then acts (pass, drop, sample or capture into the record ring, [`records`]).
//! A parse error is an explicit, counted class (`Malformed`) that gets the policy's
//! `malformed` action, never a crash or a misread.
#![no_std]
#![no_main]

mod hook;
mod maps;
mod parse;
mod policy;
mod records;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_get_prandom_u32,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use proxy_common::{
    DataplaneStat, ProtoClass,
    policy::{ActionKind, MALFORMED_ACTION, NON_IP_ACTION, RecordKind, RuleAction, Verdict},
    reference::IPPROTO_UDP,
};

use crate::{
    hook::Hook,
    maps::{
        POLICY_STATE, PROTO_COUNTERS, RULE_ACTIONS, RULE_COUNTERS, SLOT_COUNTERS, VERDICT_COUNTERS,
        add, bump,
    },
    parse::{Packet, Parsed},
    records::RecordMeta,
};

#[xdp]
pub fn edge_xdp(ctx: XdpContext) -> u32 {
    if edge(&ctx).is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// Headers made linear for direct access (an IPv6 extension chain fits).
const TC_PULL: u32 = 640;

#[classifier]
fn edge_tc(ctx: TcContext) -> i32 {
    // Direct access only sees the linear part; a failed pull (a shorter packet) is fine,
    // the parser then bounds-checks against what is there.
    let want = if ctx.len() < TC_PULL {
        ctx.len()
    } else {
        TC_PULL
    };
    let _ = ctx.pull_data(want);
    if edge(&ctx).is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Classify, count and act on one packet; the hook maps the verdict to its return code.
#[inline(always)]
fn edge<H: Hook>(ctx: &H) -> Verdict {
    let pkt = Packet::new(ctx);
    let wire_len = ctx.wire_len();
    // One read of the slot index per packet; everything below uses only that slot.
    let (slot, tag, generation) = match POLICY_STATE.get(0) {
        Some(s) => {
            let slot = s.active_slot & 1;
            (slot, s.lpm_tag[slot as usize], s.generation[slot as usize])
        }
        None => (0, 0, 0),
    };
    let (parsed, idx) = match parse::parse(&pkt) {
        Ok(p) => {
            let idx = match p.class {
                ProtoClass::NonIp | ProtoClass::Arp => NON_IP_ACTION,
                _ => policy::first_match(slot, tag, &p),
            };
            (p, idx)
        }
        Err(parse::Malformed) => {
            debug!(ctx, "malformed packet: {} bytes", wire_len);
            (Parsed::of(ProtoClass::Malformed), MALFORMED_ACTION)
        }
    };
    add(&PROTO_COUNTERS, parsed.class as u32, wire_len);
    add(&SLOT_COUNTERS, slot, wire_len);
    let action_index = policy::action_index(slot, idx);
    add(&RULE_COUNTERS, action_index, wire_len);
    let action = RULE_ACTIONS.get(action_index).copied().unwrap_or_default();
    let verdict = act(ctx, &parsed, &action, idx, slot, generation);
    add(&VERDICT_COUNTERS, verdict as u32, wire_len);
    verdict
}

#[inline(always)]
fn act<H: Hook>(
    ctx: &H,
    p: &Parsed,
    action: &RuleAction,
    rule: u32,
    slot: u32,
    generation: u64,
) -> Verdict {
    let meta = |kind, verdict: Verdict| RecordMeta {
        kind,
        rule,
        verdict: verdict as u8,
        slot: slot as u8,
        generation,
    };
    match ActionKind::from_u8(action.kind) {
        Some(ActionKind::Drop) if rule == MALFORMED_ACTION => Verdict::DropMalformed,
        Some(ActionKind::Drop) => Verdict::DropPolicy,
        Some(ActionKind::Sample) => {
            // SAFETY: bpf_get_prandom_u32 has no preconditions.
            let r = u64::from(unsafe { bpf_get_prandom_u32() });
            if r < action.sample_threshold {
                records::sample(
                    ctx,
                    p,
                    &meta(RecordKind::Sample, Verdict::PassSampleRule),
                    action.snap_len,
                );
            }
            Verdict::PassSampleRule
        }
        Some(ActionKind::Capture) => {
            if !p.has_ports || p.l4_proto != IPPROTO_UDP {
                bump(DataplaneStat::CaptureNotUdp);
                return Verdict::PassCaptureFailed;
            }
            let then = if action.capture_then_drop != 0 {
                Verdict::DropCaptured
            } else {
                Verdict::PassCaptured
            };
            if records::capture(ctx, p, &meta(RecordKind::Capture, then), action.capture_max) {
                then
            } else {
                Verdict::PassCaptureFailed
            }
        }
        // Pass, and anything unknown (a newer loader's action): never drop by accident.
        _ => Verdict::Pass,
    }
}

/// The benchmark floor: the cheapest possible XDP program, loaded and run the same way.
#[xdp]
pub fn xdp_pass_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

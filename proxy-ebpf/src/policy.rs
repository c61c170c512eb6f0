//! Policy evaluation: five lookups and an intersection, whatever the policy's size.
use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::policy::{
    ACTIONS_PER_SLOT, DEFAULT_ACTION, NO_PORT, PORT_ENTRIES, PROTO_ENTRIES, RULE_WORDS, RuleSet,
};

use crate::{
    maps::{DPORT_RULES, DST_V4, DST_V6, PROTO_RULES, SPORT_RULES, SRC_V4, SRC_V6},
    parse::Parsed,
};

/// Index into this slot's actions: the first rule matching on every dimension, or
/// [`DEFAULT_ACTION`]. A missing entry anywhere (no policy loaded) means no rule matches.
/// `tag` selects the slot's LPM entries.
#[inline(always)]
pub fn first_match(slot: u32, tag: u8, p: &Parsed) -> u32 {
    let slot_byte = tag;
    let (src, dst) = if p.family == 4 {
        let mut s = [slot_byte, 0, 0, 0, 0];
        let mut d = s;
        s[1..].copy_from_slice(&p.src[..4]);
        d[1..].copy_from_slice(&p.dst[..4]);
        (
            SRC_V4.get(&Key::new(8 + 32, s)),
            DST_V4.get(&Key::new(8 + 32, d)),
        )
    } else {
        let mut s = [0u8; 17];
        s[0] = slot_byte;
        let mut d = s;
        s[1..].copy_from_slice(&p.src);
        d[1..].copy_from_slice(&p.dst);
        (
            SRC_V6.get(&Key::new(8 + 128, s)),
            DST_V6.get(&Key::new(8 + 128, d)),
        )
    };
    let (Some(src), Some(dst)) = (src, dst) else {
        return DEFAULT_ACTION;
    };
    let (dport, sport) = if p.has_ports {
        (u32::from(p.dst_port), u32::from(p.src_port))
    } else {
        (NO_PORT, NO_PORT)
    };
    let proto = PROTO_RULES.get(slot * PROTO_ENTRIES + u32::from(p.l4_proto));
    let dport = DPORT_RULES.get(slot * PORT_ENTRIES + dport);
    let sport = SPORT_RULES.get(slot * PORT_ENTRIES + sport);
    let (Some(proto), Some(dport), Some(sport)) = (proto, dport, sport) else {
        return DEFAULT_ACTION;
    };
    let mut m = RuleSet::EMPTY;
    for i in 0..RULE_WORDS {
        m.words[i] = src.words[i] & dst.words[i] & proto.words[i] & dport.words[i] & sport.words[i];
    }
    first_set(&m).unwrap_or(DEFAULT_ACTION)
}

/// Index of the action entry for `slot`.
#[inline(always)]
pub fn action_index(slot: u32, idx: u32) -> u32 {
    slot * ACTIONS_PER_SLOT + idx
}

/// Lowest set bit, without relying on a count-trailing-zeros instruction BPF lacks.
#[inline(always)]
fn first_set(m: &RuleSet) -> Option<u32> {
    for i in 0..RULE_WORDS {
        let w = m.words[i];
        if w != 0 {
            return Some(i as u32 * 64 + ctz64(w));
        }
    }
    None
}

#[inline(always)]
fn ctz64(mut w: u64) -> u32 {
    let mut n = 0;
    if w & 0xffff_ffff == 0 {
        n += 32;
        w >>= 32;
    }
    if w & 0xffff == 0 {
        n += 16;
        w >>= 16;
    }
    if w & 0xff == 0 {
        n += 8;
        w >>= 8;
    }
    if w & 0xf == 0 {
        n += 4;
        w >>= 4;
    }
    if w & 0x3 == 0 {
        n += 2;
        w >>= 2;
    }
    if w & 0x1 == 0 {
        n += 1;
    }
    n
}

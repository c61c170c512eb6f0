//! What the data plane must decide for a packet, computed the plain way: walk the rules
//! of the *source* policy in order. Independent of [`super::compile`]'s bitmaps, so
//! differential tests against the XDP program check the compiler as well as the parser.
use proxy_common::{
    ProtoClass,
    policy::{DEFAULT_ACTION, MALFORMED_ACTION, NON_IP_ACTION, Verdict},
    reference::{Classification, IPPROTO_UDP},
};

use super::model::{Action, Policy, Rule};

/// Index of the action that applies: a rule index, or DEFAULT/MALFORMED/NON_IP.
pub fn first_match(policy: &Policy, c: &Classification) -> u32 {
    match c.class {
        ProtoClass::Malformed => MALFORMED_ACTION,
        ProtoClass::NonIp | ProtoClass::Arp => NON_IP_ACTION,
        _ => policy
            .rules
            .iter()
            .position(|r| matches(r, c))
            .map_or(DEFAULT_ACTION, |i| i as u32),
    }
}

pub fn action(policy: &Policy, index: u32) -> &Action {
    match index {
        DEFAULT_ACTION => &policy.default,
        MALFORMED_ACTION => &policy.malformed,
        NON_IP_ACTION => &policy.non_ip,
        i => &policy.rules[i as usize].action,
    }
}

/// The verdict, assuming the record ring has room (a full ring turns a capture into
/// `PassCaptureFailed`, which tests provoke separately).
pub fn verdict(policy: &Policy, c: &Classification, index: u32) -> Verdict {
    match action(policy, index) {
        Action::Pass => Verdict::Pass,
        Action::Drop if index == MALFORMED_ACTION => Verdict::DropMalformed,
        Action::Drop => Verdict::DropPolicy,
        Action::Sample { .. } => Verdict::PassSampleRule,
        Action::Capture { .. } if !c.has_ports || c.l4_proto != IPPROTO_UDP => {
            Verdict::PassCaptureFailed
        }
        Action::Capture {
            then_drop: true, ..
        } => Verdict::DropCaptured,
        Action::Capture {
            then_drop: false, ..
        } => Verdict::PassCaptured,
    }
}

fn matches(r: &Rule, c: &Classification) -> bool {
    let addr_ok = |list: &[super::Prefix], a: &[u8; 16]| {
        list.is_empty() || list.iter().any(|p| p.contains(c.family, a))
    };
    let port_ok = |list: &[super::PortRange], port: u16| {
        list.is_empty() || (c.has_ports && list.iter().any(|r| r.contains(port)))
    };
    addr_ok(&r.src, &c.src)
        && addr_ok(&r.dst, &c.dst)
        && (r.protos.is_empty() || r.protos.contains(&c.l4_proto))
        && port_ok(&r.dst_ports, c.dst_port)
        && port_ok(&r.src_ports, c.src_port)
}

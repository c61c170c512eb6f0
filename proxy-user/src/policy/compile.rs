//! Policy → map contents for one slot (see `proxy_common::policy` for the layout).
//!
//! Prefix dimensions: every distinct prefix becomes an LPM entry whose rule set is its
//! own rules plus those of every covering prefix plus the rules with no condition on
//! that dimension; a `/0` entry always exists, so a lookup never misses. A longest-prefix
//! lookup therefore returns exactly the rules whose prefix list covers the address.
use proxy_common::policy::{
    ACTIONS_PER_SLOT, ActionKind, DEFAULT_ACTION, MALFORMED_ACTION, NO_PORT, NON_IP_ACTION,
    PORT_ENTRIES, PROTO_ENTRIES, RuleAction, RuleSet,
};

use super::{
    model::{Action, Policy, PortRange, Rule},
    prefix::Prefix,
};

/// Everything one slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub src_v4: Vec<(Prefix, RuleSet)>,
    pub dst_v4: Vec<(Prefix, RuleSet)>,
    pub src_v6: Vec<(Prefix, RuleSet)>,
    pub dst_v6: Vec<(Prefix, RuleSet)>,
    /// `PROTO_ENTRIES` sets, by IP protocol number.
    pub proto: Vec<RuleSet>,
    /// `PORT_ENTRIES` sets, by port; `NO_PORT` for packets without ports.
    pub dport: Vec<RuleSet>,
    pub sport: Vec<RuleSet>,
    /// `ACTIONS_PER_SLOT` entries: rules, then default, malformed, non-IP.
    pub actions: Vec<RuleAction>,
}

pub fn compile(p: &Policy) -> CompiledPolicy {
    let zero4 = Prefix::V4 { addr: 0, len: 0 };
    let zero6 = Prefix::V6 { addr: 0, len: 0 };
    let mut actions = vec![RuleAction::default(); ACTIONS_PER_SLOT as usize];
    for (i, r) in p.rules.iter().enumerate() {
        actions[i] = rule_action(&r.action);
    }
    actions[DEFAULT_ACTION as usize] = rule_action(&p.default);
    actions[MALFORMED_ACTION as usize] = rule_action(&p.malformed);
    actions[NON_IP_ACTION as usize] = rule_action(&p.non_ip);
    CompiledPolicy {
        src_v4: prefix_dimension(&p.rules, zero4, |r| &r.src),
        dst_v4: prefix_dimension(&p.rules, zero4, |r| &r.dst),
        src_v6: prefix_dimension(&p.rules, zero6, |r| &r.src),
        dst_v6: prefix_dimension(&p.rules, zero6, |r| &r.dst),
        proto: proto_dimension(&p.rules),
        dport: port_dimension(&p.rules, |r| &r.dst_ports),
        sport: port_dimension(&p.rules, |r| &r.src_ports),
        actions,
    }
}

pub fn rule_action(a: &Action) -> RuleAction {
    let mut ra = RuleAction::default();
    match a {
        Action::Pass => ra.kind = ActionKind::Pass as u8,
        Action::Drop => ra.kind = ActionKind::Drop as u8,
        Action::Sample { rate, snap } => {
            ra.kind = ActionKind::Sample as u8;
            ra.sample_threshold = rate.threshold;
            ra.snap_len = *snap;
        }
        Action::Capture { max, then_drop } => {
            ra.kind = ActionKind::Capture as u8;
            ra.capture_max = *max;
            ra.capture_then_drop = u8::from(*then_drop);
        }
    }
    ra
}

fn prefix_dimension(
    rules: &[Rule],
    zero: Prefix,
    select: impl Fn(&Rule) -> &Vec<Prefix>,
) -> Vec<(Prefix, RuleSet)> {
    let family = zero.family();
    let mut any = RuleSet::EMPTY;
    let mut pairs: Vec<(Prefix, Option<u32>)> = vec![(zero, None)];
    for (i, r) in rules.iter().enumerate() {
        let list = select(r);
        if list.is_empty() {
            any.insert(i as u32);
        }
        pairs.extend(
            list.iter()
                .filter(|p| p.family() == family)
                .map(|p| (*p, Some(i as u32))),
        );
    }
    // Sorted by (network, length), a prefix comes after every prefix covering it, and
    // the prefixes covering it are exactly the chain on the stack when it is reached.
    pairs.sort_unstable_by_key(|(p, _)| *p);
    let mut out: Vec<(Prefix, RuleSet)> = Vec::with_capacity(pairs.len());
    let mut stack: Vec<(Prefix, RuleSet)> = Vec::new();
    let mut i = 0;
    while i < pairs.len() {
        let p = pairs[i].0;
        let mut own = RuleSet::EMPTY;
        while i < pairs.len() && pairs[i].0 == p {
            if let Some(rule) = pairs[i].1 {
                own.insert(rule);
            }
            i += 1;
        }
        while let Some((top, _)) = stack.last() {
            if covers(top, &p) {
                break;
            }
            stack.pop();
        }
        let mut set = own;
        set.union(&any);
        if let Some((_, parent)) = stack.last() {
            set.union(parent);
        }
        stack.push((p, set));
        out.push((p, set));
    }
    out
}

/// Whether `outer` contains every address of `inner`.
fn covers(outer: &Prefix, inner: &Prefix) -> bool {
    outer.family() == inner.family()
        && outer.prefix_len() <= inner.prefix_len()
        && inner.truncate(outer.prefix_len()) == *outer
}

fn proto_dimension(rules: &[Rule]) -> Vec<RuleSet> {
    let mut v = vec![RuleSet::EMPTY; PROTO_ENTRIES as usize];
    for (i, r) in rules.iter().enumerate() {
        if r.protos.is_empty() {
            v.iter_mut().for_each(|s| s.insert(i as u32));
        } else {
            for &p in &r.protos {
                v[usize::from(p)].insert(i as u32);
            }
        }
    }
    v
}

fn port_dimension(rules: &[Rule], select: impl Fn(&Rule) -> &Vec<PortRange>) -> Vec<RuleSet> {
    let mut v = vec![RuleSet::EMPTY; PORT_ENTRIES as usize];
    for (i, r) in rules.iter().enumerate() {
        let ranges = select(r);
        if ranges.is_empty() {
            // No condition: matches every port and packets without ports.
            v.iter_mut().for_each(|s| s.insert(i as u32));
        } else {
            for range in ranges {
                for port in range.lo..=range.hi {
                    v[usize::from(port)].insert(i as u32);
                }
            }
        }
    }
    debug_assert_eq!(v.len(), NO_PORT as usize + 1);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse::{PolicyLimits, parse_policy};

    #[test]
    fn covering_prefixes_and_wildcards_are_folded_in() {
        let p = parse_policy(
            "t",
            r#"
[[rule]]
src = "10.0.0.0/8"
action = "drop"
[[rule]]
src = "10.1.0.0/16"
action = "pass"
[[rule]]
action = "pass"
[[rule]]
src = "fd00::/8"
action = "drop"
"#,
            &PolicyLimits::default(),
        )
        .unwrap();
        let c = compile(&p);
        let get = |s: &str| {
            c.src_v4
                .iter()
                .find(|(q, _)| q.to_string() == s)
                .map(|(_, set)| *set)
                .unwrap()
        };
        let members = |set: RuleSet| (0..4).filter(|&i| set.contains(i)).collect::<Vec<_>>();
        assert_eq!(members(get("0.0.0.0/0")), vec![2], "only the wildcard rule");
        assert_eq!(members(get("10.0.0.0/8")), vec![0, 2]);
        assert_eq!(
            members(get("10.1.0.0/16")),
            vec![0, 1, 2],
            "includes the covering /8"
        );
        assert_eq!(c.src_v4.len(), 3);
        assert_eq!(
            members(
                c.src_v6
                    .iter()
                    .find(|(q, _)| q.prefix_len() == 8)
                    .unwrap()
                    .1
            ),
            vec![2, 3]
        );
        assert_eq!(members(c.dport[NO_PORT as usize]), vec![0, 1, 2, 3]);
    }
}

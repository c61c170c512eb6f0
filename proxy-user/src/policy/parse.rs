//! Policy TOML → [`Policy`], with every problem reported as `file:line:column: reason`.
//! Nothing here touches a map: a policy that fails here changes nothing.
use std::{collections::HashSet, ops::Range};

use serde::Deserialize;
use toml::{Spanned, Value};

use super::{
    model::{Action, Policy, PortRange, Rate, Rule},
    prefix::Prefix,
    scan::{Excess, MAX_LIST_ELEMENTS, first_excess},
};
use crate::diagnostics::{Collector as Ctx, FileErrors};
use proxy_common::policy::{MAX_CAPTURE, MAX_LPM_PER_POLICY, MAX_RULES, MAX_SNAP};

/// Operator-settable bounds, checked before anything is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyLimits {
    pub max_rules: usize,
    /// Distinct prefixes per address family and per direction (source / destination).
    pub max_prefixes: usize,
    pub max_snap: u16,
    pub max_capture: u16,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self {
            max_rules: MAX_RULES as usize,
            max_prefixes: MAX_LPM_PER_POLICY as usize - 1,
            max_snap: MAX_SNAP as u16,
            max_capture: MAX_CAPTURE as u16,
        }
    }
}

impl PolicyLimits {
    /// Limits above what the data plane was built for are refused, not clamped.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_rules == 0 || self.max_rules > MAX_RULES as usize {
            return Err(format!("max_rules must be 1..={MAX_RULES}"));
        }
        if self.max_prefixes == 0 || self.max_prefixes >= MAX_LPM_PER_POLICY as usize {
            return Err(format!(
                "max_prefixes must be 1..={} (the data plane's LPM capacity)",
                MAX_LPM_PER_POLICY - 1
            ));
        }
        if self.max_snap == 0 || u32::from(self.max_snap) > MAX_SNAP {
            return Err(format!("max_snap must be 1..={MAX_SNAP}"));
        }
        if self.max_capture == 0 || u32::from(self.max_capture) > MAX_CAPTURE {
            return Err(format!("max_capture must be 1..={MAX_CAPTURE}"));
        }
        Ok(())
    }
}

pub const DEFAULT_SNAP: u16 = 128;
pub const DEFAULT_CAPTURE_MAX: u16 = 2048;

/// Every problem found in a policy file.
pub type PolicyError = FileErrors;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<Spanned<String>>,
    malformed: Option<Spanned<String>>,
    non_ip: Option<Spanned<String>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    src: Option<Spanned<Value>>,
    dst: Option<Spanned<Value>>,
    proto: Option<Spanned<Value>>,
    dst_port: Option<Spanned<Value>>,
    src_port: Option<Spanned<Value>>,
    action: Spanned<String>,
    rate: Option<Spanned<String>>,
    snap: Option<Spanned<i64>>,
    capture_max: Option<Spanned<i64>>,
    then: Option<Spanned<String>>,
}

/// Parses an operator's policy file. A file that states nothing (no rule, no `default`,
/// nothing dropped) is refused: it would pass every packet, which an empty or
/// commented-out file rarely means.
pub fn parse_policy(file: &str, src: &str, limits: &PolicyLimits) -> Result<Policy, PolicyError> {
    parse(file, src, limits, Unstated::Refuse)
}

/// Parses a source edgeproxy stored when it loaded it (`slot{N}.toml`). It was valid
/// then, and may state nothing: it may have been loaded before such files were refused.
pub fn parse_stored_policy(
    file: &str,
    src: &str,
    limits: &PolicyLimits,
) -> Result<Policy, PolicyError> {
    parse(file, src, limits, Unstated::Accept)
}

/// What to do with a policy that states nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unstated {
    Refuse,
    Accept,
}

fn parse(
    file: &str,
    src: &str,
    limits: &PolicyLimits,
    unstated: Unstated,
) -> Result<Policy, PolicyError> {
    let mut cx = Ctx::new(file, src);
    // Before `toml` builds anything: its memory grows with every table and element.
    match first_excess(src, limits.max_rules, MAX_LIST_ELEMENTS) {
        Some(Excess::Rules { at }) => {
            cx.err(at..at, too_many_rules(limits));
            return Err(cx.errors());
        }
        Some(Excess::Elements { at }) => {
            cx.err(
                at..at,
                format!(
                    "too many list elements: a policy file may hold at most {MAX_LIST_ELEMENTS} \
                     (write port ranges as \"lo-hi\")"
                ),
            );
            return Err(cx.errors());
        }
        None => {}
    }
    let raw: RawPolicy = match toml::from_str(src) {
        Ok(r) => r,
        Err(e) => {
            cx.toml(&e);
            return Err(cx.errors());
        }
    };
    let default = special(&mut cx, raw.default.as_ref(), "default");
    let malformed = special(&mut cx, raw.malformed.as_ref(), "malformed");
    let non_ip = special(&mut cx, raw.non_ip.as_ref(), "non_ip");

    let mut rules = Vec::with_capacity(raw.rule.len());
    let mut names = HashSet::new();
    // Distinct prefixes per (family, direction): what the LPM tries must hold.
    let mut prefix_sets: [HashSet<Prefix>; 4] = Default::default();
    for (i, spanned) in raw.rule.iter().enumerate() {
        let span = spanned.span();
        if i == limits.max_rules {
            cx.err(span.clone(), too_many_rules(limits));
            break;
        }
        let Some(rule) = rule(&mut cx, i, spanned.get_ref(), limits) else {
            continue;
        };
        if !names.insert(rule.name.clone()) {
            cx.err(span.clone(), format!("duplicate rule name {:?}", rule.name));
        }
        for (dir, list) in [(0, &rule.src), (1, &rule.dst)] {
            for p in list {
                let set = &mut prefix_sets[dir * 2 + usize::from(p.family() == 6)];
                set.insert(*p);
                if set.len() == limits.max_prefixes + 1 {
                    cx.err(
                        span.clone(),
                        format!(
                            "too many IPv{} {} prefixes: the limit is {} (max_prefixes)",
                            p.family(),
                            if dir == 0 { "source" } else { "destination" },
                            limits.max_prefixes
                        ),
                    );
                }
            }
        }
        rules.push(rule);
    }
    if unstated == Unstated::Refuse
        && raw.rule.is_empty()
        && raw.default.is_none()
        && malformed == Action::Pass
        && non_ip == Action::Pass
    {
        cx.err(
            0..0,
            "the file states no rule and no default; loading it would pass every packet. \
             To mean that, write default = \"pass\"",
        );
    }
    cx.finish(Policy {
        default,
        malformed,
        non_ip,
        rules,
    })
}

fn too_many_rules(limits: &PolicyLimits) -> String {
    format!(
        "too many rules: the limit is {} (max_rules)",
        limits.max_rules
    )
}

/// `default`, `malformed`, `non_ip`: pass or drop (default pass).
fn special(cx: &mut Ctx, v: Option<&Spanned<String>>, key: &str) -> Action {
    match v.map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("pass", _)) => Action::Pass,
        Some(("drop", _)) => Action::Drop,
        Some((other, span)) => {
            cx.err(
                span,
                format!("{key} must be \"pass\" or \"drop\", not {other:?}"),
            );
            Action::Pass
        }
    }
}

fn rule(cx: &mut Ctx, index: usize, r: &RawRule, limits: &PolicyLimits) -> Option<Rule> {
    let errors_before = cx.count();
    let name = r
        .name
        .as_ref()
        .map(|n| n.get_ref().clone())
        .unwrap_or_else(|| format!("rule{}", index + 1));
    let src = r
        .src
        .as_ref()
        .map(|v| prefixes(cx, v, "src"))
        .unwrap_or_default();
    let dst = r
        .dst
        .as_ref()
        .map(|v| prefixes(cx, v, "dst"))
        .unwrap_or_default();
    let protos = r.proto.as_ref().map(|v| protos(cx, v)).unwrap_or_default();
    let dst_ports = r
        .dst_port
        .as_ref()
        .map(|v| ports(cx, v, "dst_port"))
        .unwrap_or_default();
    let src_ports = r
        .src_port
        .as_ref()
        .map(|v| ports(cx, v, "src_port"))
        .unwrap_or_default();

    let has_ports = r.dst_port.is_some() || r.src_port.is_some();
    if has_ports && !protos.is_empty() && !protos.iter().any(|p| *p == 6 || *p == 17) {
        let span = r.proto.as_ref().map(|p| p.span()).unwrap_or(0..0);
        cx.err(
            span,
            "ports only exist for tcp and udp: add one of them to proto or remove the ports",
        );
    }

    let kind = r.action.get_ref().as_str();
    let forbid = |cx: &mut Ctx, present: Option<Range<usize>>, field: &str, needs: &str| {
        if let Some(span) = present {
            cx.err(
                span,
                format!("{field} only applies to action = \"{needs}\" (this rule is {kind:?})"),
            );
        }
    };
    let action = match kind {
        "pass" | "drop" | "sample" | "capture" => {
            if kind != "sample" {
                forbid(cx, r.rate.as_ref().map(|v| v.span()), "rate", "sample");
                forbid(cx, r.snap.as_ref().map(|v| v.span()), "snap", "sample");
            }
            if kind != "capture" {
                forbid(
                    cx,
                    r.capture_max.as_ref().map(|v| v.span()),
                    "capture_max",
                    "capture",
                );
                forbid(cx, r.then.as_ref().map(|v| v.span()), "then", "capture");
            }
            match kind {
                "pass" => Action::Pass,
                "drop" => Action::Drop,
                "sample" => sample(cx, r, limits),
                _ => {
                    if !protos.is_empty() && !protos.contains(&17) {
                        let span = r.proto.as_ref().map(|p| p.span()).unwrap_or(0..0);
                        cx.err(span, "capture takes UDP payloads: proto must include udp");
                    }
                    capture(cx, r, limits)
                }
            }
        }
        other => {
            cx.err(
                r.action.span(),
                format!("unknown action {other:?}: expected pass, drop, sample or capture"),
            );
            Action::Pass
        }
    };
    (cx.count() == errors_before).then_some(Rule {
        name,
        src,
        dst,
        protos,
        dst_ports,
        src_ports,
        action,
    })
}

fn sample(cx: &mut Ctx, r: &RawRule, limits: &PolicyLimits) -> Action {
    let rate = match &r.rate {
        None => {
            cx.err(
                r.action.span(),
                "action = \"sample\" needs a rate, such as rate = \"1/1000\" or \"0.01%\"",
            );
            None
        }
        Some(s) => match Rate::parse(s.get_ref()) {
            Ok(rate) => Some(rate),
            Err(e) => {
                cx.err(s.span(), e);
                None
            }
        },
    };
    let snap = match &r.snap {
        None => DEFAULT_SNAP.min(limits.max_snap),
        Some(s) => match u16::try_from(*s.get_ref()) {
            Ok(v) if v >= 1 && v <= limits.max_snap => v,
            _ => {
                cx.err(
                    s.span(),
                    format!("snap must be 1..={} bytes (max_snap)", limits.max_snap),
                );
                0
            }
        },
    };
    match rate {
        Some(rate) => Action::Sample { rate, snap },
        None => Action::Pass,
    }
}

fn capture(cx: &mut Ctx, r: &RawRule, limits: &PolicyLimits) -> Action {
    let max = match &r.capture_max {
        None => DEFAULT_CAPTURE_MAX.min(limits.max_capture),
        Some(s) => match u16::try_from(*s.get_ref()) {
            Ok(v) if v >= 1 && v <= limits.max_capture => v,
            _ => {
                cx.err(
                    s.span(),
                    format!(
                        "capture_max must be 1..={} bytes (max_capture)",
                        limits.max_capture
                    ),
                );
                0
            }
        },
    };
    let then_drop = match r.then.as_ref().map(|t| (t.get_ref().as_str(), t.span())) {
        None | Some(("drop", _)) => true,
        Some(("pass", _)) => false,
        Some((other, span)) => {
            cx.err(
                span,
                format!("then must be \"drop\" or \"pass\", not {other:?}"),
            );
            true
        }
    };
    Action::Capture { max, then_drop }
}

/// A string or an array of strings; an empty array is an error (it would match nothing).
fn list<'v>(
    cx: &mut Ctx,
    v: &'v Spanned<Value>,
    field: &str,
    what: &str,
) -> Vec<(usize, &'v Value)> {
    match v.get_ref() {
        Value::Array(a) if a.is_empty() => {
            cx.err(
                v.span(),
                format!("{field} = [] matches nothing; remove {field} to match any {what}"),
            );
            Vec::new()
        }
        Value::Array(a) => a.iter().enumerate().collect(),
        one => vec![(0, one)],
    }
}

fn at(index: usize, v: &Spanned<Value>) -> String {
    if matches!(v.get_ref(), Value::Array(_)) {
        format!(" (element {})", index + 1)
    } else {
        String::new()
    }
}

fn prefixes(cx: &mut Ctx, v: &Spanned<Value>, field: &str) -> Vec<Prefix> {
    let mut out = Vec::new();
    for (i, item) in list(cx, v, field, "address") {
        match item {
            Value::String(s) => match s.parse::<Prefix>() {
                Ok(p) => out.push(p),
                Err(e) => cx.err(v.span(), format!("{field}{}: {e}", at(i, v))),
            },
            other => cx.err(
                v.span(),
                format!(
                    "{field}{}: expected a prefix string, found {}",
                    at(i, v),
                    other.type_str()
                ),
            ),
        }
    }
    out.sort();
    out.dedup();
    out
}

fn protos(cx: &mut Ctx, v: &Spanned<Value>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, item) in list(cx, v, "proto", "protocol") {
        let p = match item {
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "tcp" => Some(6),
                "udp" => Some(17),
                "icmp" => Some(1),
                "icmpv6" | "ipv6-icmp" => Some(58),
                _ => None,
            },
            Value::Integer(n) => u8::try_from(*n).ok(),
            _ => None,
        };
        match p {
            Some(p) => out.push(p),
            None => cx.err(
                v.span(),
                format!(
                    "proto{}: expected tcp, udp, icmp, icmpv6 or a protocol number 0..=255, found {item}",
                    at(i, v)
                ),
            ),
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn ports(cx: &mut Ctx, v: &Spanned<Value>, field: &str) -> Vec<PortRange> {
    let mut out: Vec<PortRange> = Vec::new();
    for (i, item) in list(cx, v, field, "port") {
        let range = match item {
            Value::Integer(n) => u16::try_from(*n).ok().map(|p| PortRange { lo: p, hi: p }),
            Value::String(s) => parse_range(s),
            _ => None,
        };
        match range {
            Some(r) if r.lo <= r.hi => out.push(r),
            Some(r) => cx.err(
                v.span(),
                format!(
                    "{field}{}: range {}-{} is reversed; write {}-{}",
                    at(i, v),
                    r.lo,
                    r.hi,
                    r.hi,
                    r.lo
                ),
            ),
            None => cx.err(
                v.span(),
                format!(
                    "{field}{}: expected a port 0..=65535 or a range \"lo-hi\", found {item}",
                    at(i, v)
                ),
            ),
        }
    }
    out.sort();
    for w in out.windows(2) {
        if w[1].lo <= w[0].hi {
            cx.err(
                v.span(),
                format!("{field}: {} and {} overlap; merge them", w[0], w[1]),
            );
        }
    }
    out
}

fn parse_range(s: &str) -> Option<PortRange> {
    let s = s.trim();
    match s.split_once('-') {
        Some((a, b)) => Some(PortRange {
            lo: a.trim().parse().ok()?,
            hi: b.trim().parse().ok()?,
        }),
        None => {
            let p = s.parse().ok()?;
            Some(PortRange { lo: p, hi: p })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Policy, PolicyError> {
        parse_policy("p.toml", src, &PolicyLimits::default())
    }

    #[test]
    fn a_full_policy_parses() {
        let p = parse(
            r#"
default = "drop"
[[rule]]
name = "dns"
proto = ["udp", 6]
dst_port = [53, "5300-5301"]
src = ["10.0.0.0/8", "fd00::/8"]
action = "sample"
rate = "0.01%"
[[rule]]
proto = "udp"
dst_port = 514
action = "capture"
then = "pass"
"#,
        )
        .expect("valid");
        assert_eq!(p.default, Action::Drop);
        assert_eq!(p.malformed, Action::Pass);
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].protos, vec![6, 17]);
        assert_eq!(p.rules[0].dst_ports.len(), 2);
        assert!(matches!(
            p.rules[0].action,
            Action::Sample {
                snap: DEFAULT_SNAP,
                ..
            }
        ));
        assert_eq!(p.rules[1].name, "rule2");
        assert_eq!(
            p.rules[1].action,
            Action::Capture {
                max: DEFAULT_CAPTURE_MAX,
                then_drop: false
            }
        );
    }

    #[test]
    fn a_file_that_states_nothing_is_refused() {
        for src in [
            "",
            "# every rule commented out\n# [[rule]]\n# action = \"drop\"\n",
            "malformed = \"pass\"\n",
        ] {
            let e = parse(src).expect_err(src);
            assert_eq!(
                e.to_string(),
                "p.toml:1:1: the file states no rule and no default; loading it would pass \
                 every packet. To mean that, write default = \"pass\""
            );
        }
    }

    #[test]
    fn a_file_that_states_what_passes_needs_no_rule() {
        let p = parse("default = \"pass\"\n").expect("an explicit pass-all");
        assert!(p.rules.is_empty());
        assert_eq!(p.default, Action::Pass);
        assert_eq!(
            parse("default = \"drop\"\n").expect("drop all").default,
            Action::Drop
        );
        assert_eq!(
            parse("non_ip = \"drop\"\n").expect("drop non-IP").non_ip,
            Action::Drop
        );
    }

    #[test]
    fn a_stored_source_may_state_nothing() {
        let p = parse_stored_policy("stored", "", &PolicyLimits::default())
            .expect("stored before empty files were refused");
        assert!(p.rules.is_empty());
        assert_eq!(p.default, Action::Pass);
    }

    #[test]
    fn rules_past_the_limit_are_refused_before_toml_reads_them() {
        let limits = PolicyLimits {
            max_rules: 2,
            ..PolicyLimits::default()
        };
        // No action and a syntax error after them: neither is reached.
        let headers = "[[rule]]\n[[rule]]\n# the third\n[[rule]]\nnot toml\n";
        let e = parse_policy("p.toml", headers, &limits).expect_err("three rules");
        assert_eq!(
            e.to_string(),
            "p.toml:4:1: too many rules: the limit is 2 (max_rules)"
        );
        let inline = "rule = [{action = \"pass\"}, {action = \"pass\"}, {action = \"pass\"}]\n[";
        let e = parse_policy("p.toml", inline, &limits).expect_err("three inline rules");
        assert_eq!(
            e.to_string(),
            format!(
                "p.toml:1:{}: too many rules: the limit is 2 (max_rules)",
                inline.rfind('{').expect("third") + 1
            )
        );
    }

    #[test]
    fn rule_headers_in_strings_are_no_rules() {
        let limits = PolicyLimits {
            max_rules: 1,
            ..PolicyLimits::default()
        };
        let src =
            "# [[rule]]\n[[rule]]\nname = \"\"\"\n[[rule]]\n[[rule]]\"\"\"\naction = \"pass\"\n";
        let p = parse_policy("p.toml", src, &limits).expect("one rule");
        assert_eq!(p.rules[0].name, "[[rule]]\n[[rule]]");
    }

    #[test]
    fn lists_past_the_element_limit_are_refused_before_toml_reads_them() {
        // Ports one at a time: 2 bytes an element, 4 MB in all, a syntax error after.
        let mut src = String::from("[[rule]]\naction = \"drop\"\nproto = \"tcp\"\ndst_port = [");
        src.push_str(&"1,".repeat(2_000_000));
        src.push_str("]\nnot toml\n");
        let e = parse(&src).expect_err("too many elements");
        assert_eq!(e.diagnostics.len(), 1, "{e}");
        assert_eq!(e.diagnostics[0].line, 4);
        assert!(
            e.diagnostics[0]
                .message
                .starts_with("too many list elements: a policy file may hold at most "),
            "{e}"
        );
    }
}

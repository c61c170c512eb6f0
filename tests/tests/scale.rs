//! 100,000 prefixes: the operator path (TOML text → parse → compile → batch load) must
//! accept them, and the XDP program must then pick the same rule as the reference for
//! addresses drawn from them. Loading three such policies in a row makes the third reuse
//! the first one's slot, which must be cleaned completely (a stale longer prefix left
//! behind would win the longest-prefix lookup).
use std::fmt::Write as _;

use edgeproxy_testbed::{
    packets::{self, Ipv4Extra, L4},
    policy_util,
    privilege::require_root,
};
use proxy_common::{EDGE_XDP_PROGRAM, policy::MAX_RULES, reference};
use proxy_user::{
    dataplane::{Dataplane, LoadOptions, RecordTally},
    policy::{Policy, reference as policy_ref},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const PREFIXES: usize = 100_000;
const RULES: usize = 4;

/// A policy whose rules sample (1/1, so records name the rule) traffic from 25,000
/// distinct IPv4 prefixes each, plus its source text.
fn big_policy(rng: &mut StdRng) -> (Policy, String, Vec<(u32, u8)>) {
    let mut seen = std::collections::HashSet::new();
    let mut prefixes = Vec::with_capacity(PREFIXES);
    while prefixes.len() < PREFIXES {
        let len = rng.random_range(16..=32u8);
        let addr = rng.random::<u32>() & (u32::MAX << (32 - u32::from(len)));
        if seen.insert((addr, len)) {
            prefixes.push((addr, len));
        }
    }
    let mut text = String::new();
    for r in 0..RULES {
        let _ = write!(
            text,
            "[[rule]]\nname = \"r{r}\"\naction = \"sample\"\nrate = \"1/1\"\nsnap = 1\nsrc = ["
        );
        for (addr, len) in &prefixes[r * PREFIXES / RULES..(r + 1) * PREFIXES / RULES] {
            let _ = write!(text, "\"{}/{len}\",", std::net::Ipv4Addr::from(*addr));
        }
        text.push_str("]\n");
    }
    (policy_util::policy(&text), text, prefixes)
}

#[test]
fn a_hundred_thousand_prefixes_load_and_match_like_the_reference() {
    if !require_root("a_hundred_thousand_prefixes_load_and_match_like_the_reference") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(edgeproxy_testbed::seed());
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
    let mut loader = policy_util::loader(&mut dp);
    let mut records = dp.take_records().expect("records");
    let runner = dp.test_runner(EDGE_XDP_PROGRAM).expect("runner");

    let (first, first_text, first_prefixes) = big_policy(&mut rng);
    let mut reports = Vec::new();
    reports.push(loader.load(&first, &first_text).expect("load 1"));
    for n in 2..=3 {
        let (p, t, _) = big_policy(&mut rng);
        reports.push(loader.load(&p, &t).expect("load"));
        if n == 3 {
            // Slot reuse: the third policy sits where the first was.
            assert_eq!(reports[2].slot, reports[0].slot);
            check(&runner, &mut records, &p, &mut rng, &first_prefixes);
        }
    }
    for r in &reports {
        eprintln!(
            "generation {} slot {}: {} LPM entries, compile {:.1} ms, apply {:.1} ms, cleanup after the flip {:.1} ms",
            r.generation,
            r.slot,
            r.lpm_entries,
            r.compile.as_secs_f64() * 1e3,
            r.apply.as_secs_f64() * 1e3,
            r.cleanup.as_secs_f64() * 1e3
        );
        assert!(
            r.lpm_entries > PREFIXES,
            "all prefixes loaded (plus the /0 entries)"
        );
    }
}

/// Addresses inside the active policy's prefixes, inside the replaced policy's prefixes,
/// and random: the XDP program's matched rule (from the record) must equal the reference.
fn check(
    runner: &proxy_user::dataplane::XdpTestRunner<'_>,
    records: &mut proxy_user::dataplane::Records,
    policy: &Policy,
    rng: &mut StdRng,
    stale: &[(u32, u8)],
) {
    let active: Vec<(u32, u8)> = policy
        .rules
        .iter()
        .flat_map(|r| r.src.iter())
        .filter_map(|p| match *p {
            proxy_user::policy::Prefix::V4 { addr, len } => Some((addr, len)),
            _ => None,
        })
        .collect();
    let mut tally = RecordTally::default();
    for i in 0..6000 {
        let (addr, len) = match i % 3 {
            0 => active[rng.random_range(0..active.len())],
            1 => stale[rng.random_range(0..stale.len())],
            _ => (rng.random(), 32),
        };
        let host = if len == 32 {
            0
        } else {
            rng.random::<u32>() & (u32::MAX >> len)
        };
        let src = std::net::Ipv4Addr::from(addr | host);
        let pkt = packets::ethernet(
            &[],
            reference::ETH_P_IP,
            &packets::ipv4(
                src,
                "10.200.0.2".parse().expect("literal"),
                &L4::udp(1, 2, 8),
                &Ipv4Extra::default(),
            ),
        );
        let want = policy_ref::first_match(policy, &reference::classify(&pkt));
        runner.run(&pkt, 1).expect("test run");
        let mut got = None;
        records.drain(&mut tally, |r| got = Some(r.header.rule));
        assert_eq!(got, (want < MAX_RULES).then_some(want), "source {src}");
    }
}

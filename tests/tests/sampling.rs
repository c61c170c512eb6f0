//! Sampling precision: the XDP program samples with `bpf_get_prandom_u32() < threshold`.
//! BPF_PROG_TEST_RUN with a repeat count runs the program n times on one packet, and
//! the pushed-record counter says how many times it sampled.
//!
//! The count is Binomial(n, p). The test accepts mean ± 6 standard deviations: a correct
//! implementation fails it with probability about 2e-9, while an off-by-a-factor rate
//! (or a threshold that truncates 0.001% to zero) fails it with certainty.
use edgeproxy_testbed::{
    packets::{self, L4},
    policy_util,
    privilege::require_root,
};
use proxy_common::{DataplaneStat, EDGE_XDP_PROGRAM};
use proxy_user::dataplane::{Dataplane, LoadOptions, RecordTally};

fn sampled(rate: &str, runs: u32) -> u64 {
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
    policy_util::load(
        &mut policy_util::loader(&mut dp),
        &format!("[[rule]]\naction = \"sample\"\nrate = \"{rate}\"\nsnap = 16\n"),
    );
    let mut records = dp.take_records().expect("records");
    let runner = dp.test_runner(EDGE_XDP_PROGRAM).expect("runner");
    let pkt = packets::eth_ipv4(&L4::udp(1000, 53, 20));
    // Runs in chunks, draining between them, so the ring never fills.
    let chunk = 1_000_000u32;
    let mut done = 0;
    let mut tally = RecordTally::default();
    while done < runs {
        let n = chunk.min(runs - done);
        runner.run(&pkt, n).expect("test run");
        records.drain(&mut tally, |_| {});
        done += n;
    }
    let snap = dp
        .counters()
        .expect("counters")
        .snapshot()
        .expect("snapshot");
    assert_eq!(
        snap.stat(DataplaneStat::RingbufFull),
        0,
        "the ring must not fill"
    );
    assert_eq!(
        tally.samples,
        snap.stat(DataplaneStat::RecordsPushed),
        "every pushed record drained"
    );
    snap.stat(DataplaneStat::RecordsPushed)
}

fn within_six_sigma(count: u64, n: f64, p: f64) {
    let mean = n * p;
    let sd = (n * p * (1.0 - p)).sqrt();
    let (lo, hi) = (mean - 6.0 * sd, mean + 6.0 * sd);
    eprintln!("{count} samples; expected {mean:.0}, accepted [{lo:.0}, {hi:.0}]");
    assert!(
        (lo..=hi).contains(&(count as f64)),
        "{count} outside [{lo:.0}, {hi:.0}]"
    );
}

#[test]
fn one_in_a_thousand_over_a_million_packets() {
    if !require_root("one_in_a_thousand_over_a_million_packets") {
        return;
    }
    // n = 1e6, p = 1e-3: mean 1000, sd 31.6 -> [810, 1190].
    within_six_sigma(sampled("1/1000", 1_000_000), 1e6, 1e-3);
}

#[test]
fn a_thousandth_of_a_percent_is_honoured() {
    if !require_root("a_thousandth_of_a_percent_is_honoured") {
        return;
    }
    // 0.001% -> threshold 42950 of 2^32; n = 1e7: mean 100.0, sd 10 -> [40, 160].
    let p = 42_950.0 / 4_294_967_296.0;
    within_six_sigma(sampled("0.001%", 10_000_000), 1e7, p);
}

/// A full ring never changes a verdict it should not: samples are dropped and counted,
/// and a capture that cannot be written passes the packet instead of dropping it.
#[test]
fn a_full_ring_is_counted_and_never_drops_what_it_could_not_capture() {
    if !require_root("a_full_ring_is_counted_and_never_drops_what_it_could_not_capture") {
        return;
    }
    use proxy_common::policy::Verdict;
    use proxy_user::dataplane::{RingMode, XdpVerdict};
    const RUNS: u32 = 50_000;
    for (rule, full_verdict) in [
        (
            "action = \"sample\"\nrate = \"1/1\"\nsnap = 256\n",
            Verdict::PassSampleRule,
        ),
        (
            "action = \"capture\"\nthen = \"drop\"\n",
            Verdict::PassCaptureFailed,
        ),
    ] {
        let mut dp = Dataplane::load(LoadOptions {
            rings: RingMode::Shared,
            ..LoadOptions::default()
        })
        .expect("load");
        policy_util::load(
            &mut policy_util::loader(&mut dp),
            &format!("[[rule]]\nproto = \"udp\"\n{rule}"),
        );
        let pkt = packets::eth_ipv4(&L4::udp(1000, 514, 64));
        // Nothing drains: the ring fills long before RUNS.
        let out = dp
            .test_runner(EDGE_XDP_PROGRAM)
            .expect("runner")
            .run(&pkt, RUNS)
            .expect("run");
        let s = dp
            .counters()
            .expect("counters")
            .snapshot()
            .expect("snapshot");
        let pushed = s.stat(DataplaneStat::RecordsPushed);
        let full = s.stat(DataplaneStat::RingbufFull);
        eprintln!("{rule:?}: {pushed} pushed, {full} ring-full");
        assert!(pushed > 0 && full > 0, "the ring filled");
        assert_eq!(
            pushed + full,
            u64::from(RUNS),
            "every run either pushed or counted"
        );
        assert_eq!(
            out.verdict,
            XdpVerdict::Pass,
            "the last run (ring full) passes the packet"
        );
        if full_verdict == Verdict::PassCaptureFailed {
            assert_eq!(
                s.verdict(Verdict::PassCaptureFailed).packets,
                full,
                "uncaptured ones passed"
            );
            assert_eq!(
                s.verdict(Verdict::DropCaptured).packets,
                pushed,
                "captured ones were dropped"
            );
        } else {
            // Sampled or not, a sample rule passes every packet.
            assert_eq!(s.verdict(Verdict::PassSampleRule).packets, u64::from(RUNS));
        }
    }
}

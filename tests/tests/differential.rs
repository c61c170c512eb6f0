//! Differential testing of the XDP program against the reference (proxy-common's
//! parser + proxy-user's first-match evaluator over the *source* policy, which shares
//! nothing with the bitmap compiler): for every generated packet under every generated
//! policy, the XDP verdict, the matched rule and any record's bytes must be what the
//! reference says. 25,000 packets × 4 policies per run (100,000); `EDGEPROXY_LONG=1`
//! (`cargo xtask test --long`) runs 250,000 × 4.
use edgeproxy_testbed::{generate::Gen, privilege::require_root};
use proxy_common::{
    EDGE_TC_PROGRAM, EDGE_XDP_PROGRAM,
    policy::{MAX_RULES, RecordKind, Verdict},
    reference::{self, Classification, IPPROTO_UDP},
};
use proxy_user::{
    dataplane::{Dataplane, LoadOptions, RecordTally, XdpVerdict},
    policy::{Action, Policy, Rate, loader::PolicyLoader, reference as policy_ref},
};

const POLICIES: usize = 4;

fn packets_per_policy() -> usize {
    if std::env::var_os("EDGEPROXY_LONG").is_some() {
        250_000
    } else {
        25_000
    }
}

/// The same matching, every rule turned into "sample everything": every packet that
/// matches a rule leaves a record naming the rule.
fn shadow(p: &Policy) -> Policy {
    let mut s = p.clone();
    for r in &mut s.rules {
        r.action = Action::Sample {
            rate: Rate::parse("1/1").expect("literal"),
            snap: 1,
        };
    }
    s.default = Action::Pass;
    s.malformed = Action::Pass;
    s.non_ip = Action::Pass;
    s
}

fn expected_capture(pkt: &[u8], c: &Classification, max: u16) -> Vec<u8> {
    let off = c.l4_off + 8;
    let udp_len = usize::from(u16::from_be_bytes([pkt[c.l4_off + 4], pkt[c.l4_off + 5]]));
    let available = pkt.len().saturating_sub(off).min(udp_len.saturating_sub(8));
    pkt[off..off + available.min(usize::from(max))].to_vec()
}

#[test]
fn xdp_agrees_with_reference_on_generated_packets_and_policies() {
    if !require_root("xdp_agrees_with_reference_on_generated_packets_and_policies") {
        return;
    }
    let checked = differential(EDGE_XDP_PROGRAM, POLICIES, packets_per_policy());
    assert!(checked >= 2 * 100_000);
}

/// The TC twin runs the same code on a different hook; a smaller run proves the glue
/// (pull, verdict mapping, skb byte loads for captures).
#[test]
fn tc_agrees_with_reference_on_generated_packets_and_policies() {
    if !require_root("tc_agrees_with_reference_on_generated_packets_and_policies") {
        return;
    }
    differential(EDGE_TC_PROGRAM, 2, packets_per_policy() / 2);
}

/// Returns the number of test runs compared.
fn differential(program: &'static str, policies: usize, n: usize) -> u64 {
    let mut g = Gen::new(edgeproxy_testbed::seed());
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
    let mut loader = PolicyLoader::new(dp.take_policy_maps().expect("maps"), None);
    let mut records = dp.take_records().expect("records");
    let runner = dp.test_runner(program).expect("runner");
    let counters = dp.counters().expect("counters");
    let mut checked = 0u64;
    let mut skipped = 0u64;

    for round in 0..policies {
        let policy = g.policy(if round == 0 { MAX_RULES as usize } else { 40 });
        let packets: Vec<Vec<u8>> = (0..n).map(|_| g.packet()).collect();

        // Pass 1: the real policy. Verdict per packet, record contents, verdict totals.
        loader.load(&policy, "").expect("load policy");
        let before = counters.snapshot().expect("snapshot");
        let mut want_verdicts = [0u64; Verdict::COUNT as usize];
        let mut tally = RecordTally::default();
        for pkt in &packets {
            let c = reference::classify(pkt);
            let idx = policy_ref::first_match(&policy, &c);
            let want = policy_ref::verdict(&policy, &c, idx);
            if !(program == EDGE_TC_PROGRAM && kernel_refuses_skb(pkt)) {
                want_verdicts[want as usize] += 1;
            }
            let out = match runner.run(pkt, 1) {
                Ok(out) => out,
                Err(e) if program == EDGE_TC_PROGRAM && kernel_refuses_skb(pkt) => {
                    // Not a data-plane decision: the kernel's skb test-run rejects the
                    // input (EINVAL). The XDP differential covers these frames.
                    let _ = e;
                    skipped += 1;
                    continue;
                }
                Err(e) => panic!("test run of {} bytes {pkt:02x?}: {e}", pkt.len()),
            };
            let got_drop = out.verdict == XdpVerdict::Drop;
            assert_eq!(
                got_drop,
                want.is_drop(),
                "verdict for {pkt:02x?}: want {want:?} (action {idx}) {c:?}"
            );
            let mut seen = 0;
            records.drain(&mut tally, |r| {
                seen += 1;
                assert_eq!(r.header.rule, idx, "record rule for {pkt:02x?}");
                match policy_ref::action(&policy, idx) {
                    Action::Sample { snap, .. } => {
                        assert_eq!(r.header.kind, RecordKind::Sample as u8);
                        assert_eq!(
                            r.data,
                            &pkt[..pkt.len().min(usize::from(*snap))],
                            "snap bytes"
                        );
                    }
                    Action::Capture { max, .. } => {
                        assert_eq!(r.header.kind, RecordKind::Capture as u8);
                        assert_eq!(
                            r.data,
                            expected_capture(pkt, &c, *max),
                            "captured payload of {pkt:02x?}"
                        );
                        assert_eq!(r.header.l4_proto, IPPROTO_UDP);
                    }
                    other => panic!("record for a {other:?} action"),
                }
                assert_eq!(
                    (
                        r.header.class,
                        r.header.src_port,
                        r.header.dst_port,
                        r.header.family
                    ),
                    (c.class as u8, c.src_port, c.dst_port, c.family)
                );
                assert_eq!(&r.header.src_addr, &c.src);
                assert_eq!(&r.header.dst_addr, &c.dst);
            });
            let want_record = matches!(
                want,
                Verdict::PassSampleRule | Verdict::PassCaptured | Verdict::DropCaptured
            );
            assert_eq!(
                seen,
                usize::from(want_record),
                "records for {pkt:02x?} ({want:?})"
            );
            checked += 1;
        }
        let d = counters.snapshot().expect("snapshot").since(&before);
        for v in Verdict::ALL {
            assert_eq!(
                d.verdict(v).packets,
                want_verdicts[v as usize],
                "round {round}: {} total",
                v.name()
            );
        }

        // Pass 2: the shadow policy. The record (or its absence) names the matched rule.
        let sh = shadow(&policy);
        loader.load(&sh, "").expect("load shadow");
        for pkt in &packets {
            let c = reference::classify(pkt);
            let idx = policy_ref::first_match(&policy, &c);
            if runner.run(pkt, 1).is_err() {
                assert!(
                    program == EDGE_TC_PROGRAM && kernel_refuses_skb(pkt),
                    "test run of {pkt:02x?}"
                );
                continue;
            }
            let mut got = None;
            records.drain(&mut tally, |r| got = Some(r.header.rule));
            let want = (idx < MAX_RULES).then_some(idx);
            assert_eq!(got, want, "matched rule for {pkt:02x?} {c:?}");
            checked += 1;
        }
    }
    assert_eq!(tally_bad(&mut records), 0);
    eprintln!(
        "{program}: {checked} test runs compared with the reference ({skipped} refused by the kernel's skb test-run)"
    );
    assert!(skipped * 20 < checked, "too many skipped: {skipped}");
    checked
}

/// Frames the kernel's skb test-run refuses: an IPv4/IPv6 ethertype with less than the
/// fixed network header after the Ethernet header.
fn kernel_refuses_skb(pkt: &[u8]) -> bool {
    match u16::from_be_bytes([pkt[12], pkt[13]]) {
        0x0800 => pkt.len() < 14 + 20,
        0x86dd => pkt.len() < 14 + 40,
        _ => false,
    }
}

fn tally_bad(records: &mut proxy_user::dataplane::Records) -> u64 {
    let mut t = RecordTally::default();
    records.drain(&mut t, |_| {});
    t.bad
}

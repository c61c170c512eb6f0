//! Atomic policy swap under continuous traffic. Policies A and B both sample every
//! datagram to PORT, but under different rule indices (B has a never-matching rule
//! first). Every record names the generation that classified the packet, so a packet
//! classified by a mix of slots (A's rule bitmaps with B's actions, say) would show up as
//! a record whose rule does not match its generation's policy. The receiver must get
//! every datagram: no allowed packet is lost across dozens of flips.
use std::{collections::HashMap, net::UdpSocket, time::Duration};

use edgeproxy_testbed::{netns::VethPair, policy_util, privilege::require_root, traffic};
use proxy_common::policy::Verdict;
use proxy_user::dataplane::{Dataplane, HookChoice, LoadOptions, RecordTally};

const PORT: u16 = 6000;
const N: u64 = 20_000;

#[test]
fn every_packet_is_classified_by_exactly_one_generation() {
    if !require_root("every_packet_is_classified_by_exactly_one_generation") {
        return;
    }
    let a = format!(
        "[[rule]]\nname = \"a\"\nproto = \"udp\"\ndst_port = {PORT}\naction = \"sample\"\nrate = \"1/1\"\nsnap = 32\n"
    );
    let b = format!(
        "[[rule]]\nname = \"never\"\nsrc = \"192.0.2.0/24\"\naction = \"drop\"\n\
         [[rule]]\nname = \"b\"\nproto = \"udp\"\ndst_port = {PORT}\naction = \"sample\"\nrate = \"1/1\"\nsnap = 32\n"
    );
    let pair = VethPair::create().expect("veth pair");
    pair.a.run(|| {
        let sock = UdpSocket::bind((pair.a_v4, PORT)).expect("bind");
        sock.set_nonblocking(true).expect("nonblocking");
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &(64 << 20))
            .expect("SO_RCVBUFFORCE");
        let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
        let mut loader = policy_util::loader(&mut dp);
        // generation -> the rule index its policy samples under
        let mut rule_of: HashMap<u64, u32> = HashMap::new();
        rule_of.insert(policy_util::load(&mut loader, &a).generation, 0);
        dp.attach(pair.a_if, HookChoice::Auto).expect("attach");
        let mut records = dp.take_records().expect("records");
        let counters = dp.counters().expect("counters");
        let before = counters.snapshot().expect("snapshot");

        let mut per_generation: HashMap<u64, u64> = HashMap::new();
        let mut tally = RecordTally::default();
        let mut mismatches = 0u64;
        let mut drain = |records: &mut proxy_user::dataplane::Records,
                         rule_of: &HashMap<u64, u32>| {
            records.drain(&mut tally, |r| {
                *per_generation.entry(r.header.generation).or_default() += 1;
                if rule_of.get(&r.header.generation) != Some(&r.header.rule) {
                    mismatches += 1;
                }
            });
        };
        let mut flips = 0;
        std::thread::scope(|s| {
            let sender = s.spawn(|| traffic::send_udp(&pair.b, (pair.a_v4, PORT).into(), N, 48));
            while !sender.is_finished() {
                let (text, rule) = if flips % 2 == 0 { (&b, 1) } else { (&a, 0) };
                let r = policy_util::load(&mut loader, text);
                rule_of.insert(r.generation, rule);
                flips += 1;
                drain(&mut records, &rule_of);
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(sender.join().expect("sender").expect("send"), N);
        });
        std::thread::sleep(Duration::from_millis(300));
        drain(&mut records, &rule_of);

        let mut got = 0u64;
        let mut buf = [0u8; 256];
        while sock.recv(&mut buf).is_ok() {
            got += 1;
        }
        let d = counters.snapshot().expect("snapshot").since(&before);
        eprintln!("{flips} flips; records per generation: {per_generation:?}");
        assert_eq!(
            mismatches, 0,
            "records whose rule does not belong to their generation"
        );
        assert_eq!(
            tally.samples, N,
            "one record per datagram, over all generations"
        );
        assert_eq!(d.verdict(Verdict::PassSampleRule).packets, N);
        assert_eq!(d.verdict(Verdict::DropPolicy).packets, 0);
        assert_eq!(got, N, "no allowed datagram lost across {flips} swaps");
        assert!(
            flips >= 10,
            "the swaps must overlap the traffic ({flips} flips)"
        );
        assert!(
            per_generation.len() >= 5,
            "traffic seen by several generations: {per_generation:?}"
        );
    });
}

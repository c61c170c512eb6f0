//! The XDP program on crafted packets through BPF_PROG_TEST_RUN (no network): the class
//! it counts, the record it pushes, its verdict and output bytes, checked against the
//! reference classifier in proxy-common and against hand-written expectations.
use edgeproxy_testbed::{
    packets::{self, Ipv4Extra, L4},
    policy_util,
    privilege::require_root,
};
use proxy_common::{
    DataplaneStat, EDGE_XDP_PROGRAM, FLOOR_XDP_PROGRAM, ProtoClass,
    policy::RecordHeader,
    reference::{self, ETH_P_IP, ETH_P_IPV6},
};
use proxy_user::dataplane::{Dataplane, LoadOptions, RecordTally, XdpVerdict};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Every IP packet matches the one rule and is sampled with its whole frame (≤ 256 B).
const SAMPLE_ALL: &str = "[[rule]]\naction = \"sample\"\nrate = \"1/1\"\nsnap = 256\n";

/// IPv6 UDP 53 -> 5140 behind extension headers `(type, length)`; a fragment header
/// carries `frag_units` as its offset.
fn v6_ext(exts: &[(u8, usize)], frag_units: u16) -> Vec<u8> {
    let base = packets::ipv6(
        "fd00:200::1".parse().unwrap(),
        "fd00:200::2".parse().unwrap(),
        &L4::udp(53, 5140, 4),
    );
    let mut chain = Vec::new();
    for (i, &(kind, len)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(17, |e| e.0);
        let mut h = vec![next, (len / 8 - 1) as u8];
        if kind == 44 {
            h[1] = 0;
            h.extend_from_slice(&(frag_units << 3).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 1]);
        }
        h.resize(len, 0);
        chain.extend_from_slice(&h);
    }
    let mut ip = base[..40].to_vec();
    ip[6] = exts[0].0;
    ip.extend_from_slice(&chain);
    ip.extend_from_slice(&base[40..]);
    packets::ethernet(&[], ETH_P_IPV6, &ip)
}

/// Hand-written cases: the expected class is stated, not derived.
fn crafted() -> Vec<(&'static str, Vec<u8>, ProtoClass, u16, u16)> {
    use ProtoClass::*;
    let v4 = |l4: &L4, extra: &Ipv4Extra| {
        packets::ipv4(
            "10.200.0.1".parse().unwrap(),
            "10.200.0.2".parse().unwrap(),
            l4,
            extra,
        )
    };
    let v6 = |l4: &L4| {
        packets::ipv6(
            "fd00:200::1".parse().unwrap(),
            "fd00:200::2".parse().unwrap(),
            l4,
        )
    };
    let mut ipv4_bad_version = packets::eth_ipv4(&L4::udp(1, 2, 4));
    ipv4_bad_version[14] = 0x55;
    let mut ipv4_ihl_too_small = packets::eth_ipv4(&L4::udp(1, 2, 4));
    ipv4_ihl_too_small[14] = 0x44;
    let mut ipv4_ihl_past_end = packets::eth_ipv4(&L4::Other {
        proto: 99,
        body: vec![],
    });
    ipv4_ihl_past_end[14] = 0x4f;
    vec![
        (
            "udp4",
            packets::eth_ipv4(&L4::udp(5000, 514, 32)),
            Udp4,
            5000,
            514,
        ),
        (
            "tcp4",
            packets::eth_ipv4(&L4::Tcp {
                sport: 40000,
                dport: 443,
            }),
            Tcp4,
            40000,
            443,
        ),
        ("icmp4", packets::eth_ipv4(&L4::Icmp), Icmp4, 0, 0),
        (
            "gre4",
            packets::eth_ipv4(&L4::Other {
                proto: 47,
                body: vec![0; 8],
            }),
            Ipv4Other,
            0,
            0,
        ),
        (
            "udp6",
            packets::eth_ipv6(&L4::udp(5001, 5140, 0)),
            Udp6,
            5001,
            5140,
        ),
        (
            "tcp6",
            packets::eth_ipv6(&L4::Tcp {
                sport: 1234,
                dport: 80,
            }),
            Tcp6,
            1234,
            80,
        ),
        ("icmp6", packets::eth_ipv6(&L4::Icmp), Icmp6, 0, 0),
        ("arp", packets::arp_request(), Arp, 0, 0),
        (
            "lldp",
            packets::ethernet(&[], 0x88cc, &[0; 32]),
            NonIp,
            0,
            0,
        ),
        (
            "udp4 behind 802.1ad+802.1Q",
            packets::qinq(ETH_P_IP, &v4(&L4::udp(7, 8, 1), &Ipv4Extra::default())),
            Udp4,
            7,
            8,
        ),
        (
            "tcp6 behind one 802.1Q tag",
            packets::ethernet(
                &[(0x8100, 5)],
                ETH_P_IPV6,
                &v6(&L4::Tcp {
                    sport: 9,
                    dport: 10,
                }),
            ),
            Tcp6,
            9,
            10,
        ),
        (
            "udp4 with 40 bytes of IP options",
            packets::ethernet(
                &[],
                ETH_P_IP,
                &v4(
                    &L4::udp(11, 12, 3),
                    &Ipv4Extra {
                        options: vec![1; 40],
                        ..Default::default()
                    },
                ),
            ),
            Udp4,
            11,
            12,
        ),
        (
            "non-first IPv4 fragment has no ports",
            packets::ethernet(
                &[],
                ETH_P_IP,
                &v4(
                    &L4::udp(11, 12, 3),
                    &Ipv4Extra {
                        frag_offset: 185,
                        ..Default::default()
                    },
                ),
            ),
            Ipv4Other,
            0,
            0,
        ),
        (
            "first IPv4 fragment keeps its ports",
            packets::ethernet(
                &[],
                ETH_P_IP,
                &v4(
                    &L4::udp(13, 14, 3),
                    &Ipv4Extra {
                        more_fragments: true,
                        ..Default::default()
                    },
                ),
            ),
            Udp4,
            13,
            14,
        ),
        ("IPv4 version 5", ipv4_bad_version, Malformed, 0, 0),
        ("IPv4 IHL 4", ipv4_ihl_too_small, Malformed, 0, 0),
        ("IPv4 IHL past the end", ipv4_ihl_past_end, Malformed, 0, 0),
        (
            "truncated UDP4 header",
            packets::eth_ipv4(&L4::udp(1, 2, 0))[..14 + 20 + 7].to_vec(),
            Malformed,
            0,
            0,
        ),
        (
            "truncated TCP6 header",
            packets::eth_ipv6(&L4::Tcp { sport: 1, dport: 2 })[..14 + 40 + 19].to_vec(),
            Malformed,
            0,
            0,
        ),
        (
            "truncated IPv6 header",
            packets::eth_ipv6(&L4::Icmp)[..14 + 39].to_vec(),
            Malformed,
            0,
            0,
        ),
        (
            "VLAN tag cut short",
            packets::ethernet(&[(0x8100, 5)], ETH_P_IP, &[])[..16].to_vec(),
            Malformed,
            0,
            0,
        ),
        (
            "bare Ethernet header, IPv4 type",
            packets::ethernet(&[], ETH_P_IP, &[]),
            Malformed,
            0,
            0,
        ),
        (
            "udp6 behind hop-by-hop and a first fragment",
            v6_ext(&[(0, 8), (44, 8)], 0),
            Udp6,
            53,
            5140,
        ),
        (
            "udp6 non-first fragment: no ports",
            v6_ext(&[(44, 8)], 100),
            Ipv6Other,
            0,
            0,
        ),
        (
            "udp6 behind 7 extension headers",
            v6_ext(&[(60, 8); 7], 0),
            Malformed,
            0,
            0,
        ),
        (
            "udp6 behind a 24-byte destination-options header",
            v6_ext(&[(60, 24)], 0),
            Udp6,
            53,
            5140,
        ),
    ]
}

fn drain_all(records: &mut proxy_user::dataplane::Records) -> Vec<(RecordHeader, Vec<u8>)> {
    let mut out = Vec::new();
    let mut tally = RecordTally::default();
    records.drain(&mut tally, |r| out.push((r.header, r.data.to_vec())));
    assert_eq!(tally.bad, 0);
    out
}

#[test]
fn crafted_packets_are_counted_sampled_and_passed_unchanged() {
    if !require_root("crafted_packets_are_counted_sampled_and_passed_unchanged") {
        return;
    }
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
    policy_util::load(&mut policy_util::loader(&mut dp), SAMPLE_ALL);
    let mut records = dp.take_records().expect("ring buffer");
    let runner = dp.test_runner(EDGE_XDP_PROGRAM).expect("runner");
    let counters = dp.counters().expect("counters");
    for (name, pkt, class, sport, dport) in crafted() {
        // The reference must agree with the hand-written expectation…
        assert_eq!(
            reference::classify(&pkt).class,
            class,
            "reference on {name}"
        );
        let before = counters.snapshot().expect("snapshot");
        let out = runner.run(&pkt, 1).expect("test run");
        let delta = counters.snapshot().expect("snapshot").since(&before);
        // …and the XDP program must count exactly that one packet in that class.
        assert_eq!(out.verdict, XdpVerdict::Pass, "{name}");
        assert_eq!(out.packet, pkt, "{name}: output bytes unchanged");
        assert_eq!(delta.total().packets, 1, "{name}: one packet counted");
        assert_eq!(
            delta.class(class).packets,
            1,
            "{name}: counted as {}",
            class.name()
        );
        assert_eq!(
            delta.class(class).bytes,
            pkt.len() as u64,
            "{name}: wire bytes"
        );
        // IP packets (even malformed ones never reach rules) are sampled whole.
        let recs = drain_all(&mut records);
        let is_ip = !matches!(
            class,
            ProtoClass::NonIp | ProtoClass::Arp | ProtoClass::Malformed
        );
        assert_eq!(recs.len(), usize::from(is_ip), "{name}: records");
        if let Some((h, data)) = recs.first() {
            assert_eq!(h.class, class as u8, "{name}: record class");
            assert_eq!((h.src_port, h.dst_port), (sport, dport), "{name}: ports");
            assert_eq!(h.wire_len, pkt.len() as u32, "{name}: record length");
            assert_eq!(
                data.as_slice(),
                &pkt[..pkt.len().min(256)],
                "{name}: snap bytes"
            );
            assert_ne!(h.ts_ns, 0, "{name}: timestamped");
            assert_eq!(h.generation, 1, "{name}: first policy generation");
        }
    }
}

/// Valid packets truncated at every byte offset, and random bytes: the XDP program and
/// the reference must agree on class for every one, and on class and ports for the
/// sampled (IP) ones.
#[test]
fn xdp_agrees_with_reference_on_truncated_and_random_packets() {
    if !require_root("xdp_agrees_with_reference_on_truncated_and_random_packets") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(edgeproxy_testbed::seed());

    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for (_, pkt, ..) in crafted() {
        for cut in 14..=pkt.len() {
            inputs.push(pkt[..cut].to_vec());
        }
    }
    for _ in 0..3000 {
        let len = rng.random_range(14..=160);
        let mut p: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Bias towards the interesting ethertypes so random bytes reach L3/L4 parsing.
        let et: u16 =
            [ETH_P_IP, ETH_P_IPV6, 0x8100, 0x88a8, 0x0806, rng.random()][rng.random_range(0..6)];
        p[12..14].copy_from_slice(&et.to_be_bytes());
        if len > 14 && rng.random_bool(0.7) {
            p[14] = if et == ETH_P_IPV6 {
                0x60
            } else {
                0x40 | rng.random_range(0..16u8)
            };
        }
        inputs.push(p);
    }

    let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
    policy_util::load(&mut policy_util::loader(&mut dp), SAMPLE_ALL);
    let mut records = dp.take_records().expect("ring buffer");
    let runner = dp.test_runner(EDGE_XDP_PROGRAM).expect("runner");
    let counters = dp.counters().expect("counters");
    let mut expected = [0u64; ProtoClass::COUNT as usize];
    for p in &inputs {
        let out = runner.run(p, 1).expect("test run");
        assert_eq!(out.verdict, XdpVerdict::Pass);
        let want = reference::classify(p);
        expected[want.class as usize] += 1;
        for (h, _) in drain_all(&mut records) {
            assert_eq!(
                (h.class, h.src_port, h.dst_port),
                (want.class as u8, want.src_port, want.dst_port),
                "packet {p:02x?}"
            );
        }
    }
    let snap = counters.snapshot().expect("snapshot");
    for class in ProtoClass::ALL {
        assert_eq!(
            snap.class(class).packets,
            expected[class as usize],
            "{} total",
            class.name()
        );
    }
}

#[test]
fn floor_program_passes_and_repeat_reports_time() {
    if !require_root("floor_program_passes_and_repeat_reports_time") {
        return;
    }
    let dp = Dataplane::load(LoadOptions::default()).expect("load");
    let pkt = packets::eth_ipv4(&L4::udp(1, 2, 18));
    for prog in [FLOOR_XDP_PROGRAM, EDGE_XDP_PROGRAM] {
        let out = dp
            .test_runner(prog)
            .expect("runner")
            .run(&pkt, 1000)
            .expect("run");
        assert_eq!(out.verdict, XdpVerdict::Pass, "{prog}");
        assert_eq!(out.packet, pkt, "{prog}");
        assert!(out.mean_ns > 0, "{prog}: the kernel reports a duration");
    }
    // A frame shorter than an Ethernet header is refused by the kernel, not misread.
    let err = dp
        .test_runner(EDGE_XDP_PROGRAM)
        .expect("runner")
        .run(&pkt[..13], 1);
    assert!(err.is_err(), "13-byte frame must be rejected");
}

/// The record ring is consumed in place and its space published back in batches: over
/// three ring-fuls of captures, drained every 1,000 records, the data plane never finds
/// it full and every payload arrives once, in order, byte for byte.
#[test]
fn the_record_ring_is_reused_drain_after_drain_without_loss() {
    if !require_root("the_record_ring_is_reused_drain_after_drain_without_loss") {
        return;
    }
    // One CPU, so one per-CPU ring holds every record in the order it was written.
    let cpu = proxy_user::cpus::allowed()[0];
    let mut one = nix::sched::CpuSet::new();
    one.set(cpu).expect("a CPU");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pin");
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
    policy_util::load(
        &mut policy_util::loader(&mut dp),
        "[[rule]]\nproto = \"udp\"\ndst_port = 514\naction = \"capture\"\n",
    );
    let mut records = dp.take_records().expect("ring buffer");
    let runner = dp.test_runner(EDGE_XDP_PROGRAM).expect("runner");
    let counters = dp.counters().expect("counters");
    let before = counters.snapshot().expect("snapshot");
    // A 100-byte payload takes a 256-byte bucket: 352 bytes a record with both headers,
    // so three of the largest ring (the shared one) are about 36,000 records.
    let total = 3 * proxy_common::RECORDS_BYTES as usize / 352 + 1;
    let frame = |seq: u32| {
        let mut payload = vec![b'x'; 100];
        payload[..4].copy_from_slice(&seq.to_le_bytes());
        let l4 = L4::Udp {
            sport: 40000,
            dport: 514,
            payload,
        };
        packets::ethernet(
            &[],
            ETH_P_IP,
            &packets::ipv4(
                "10.200.0.1".parse().unwrap(),
                "10.200.0.2".parse().unwrap(),
                &l4,
                &Ipv4Extra::default(),
            ),
        )
    };
    let mut next = 0u32;
    let check = |records: &mut proxy_user::dataplane::Records, next: &mut u32| {
        for (_, data) in drain_all(records) {
            assert_eq!(data.len(), 100);
            let seq = u32::from_le_bytes(data[..4].try_into().unwrap());
            assert_eq!(seq, *next, "records out of order or lost");
            *next += 1;
        }
    };
    for seq in 0..total as u32 {
        runner.run(&frame(seq), 1).expect("test run");
        if seq % 1000 == 999 {
            check(&mut records, &mut next);
        }
    }
    check(&mut records, &mut next);
    let delta = counters.snapshot().expect("snapshot").since(&before);
    assert_eq!(
        delta.stat(DataplaneStat::RingbufFull),
        0,
        "the ring filled up"
    );
    assert_eq!(next as usize, total, "every capture drained");
    // Drained every 352 KB, the ring never held the wake-up threshold: no wake-up.
    assert_eq!(delta.stat(DataplaneStat::RecordWakeups), 0);
    // A consumer asleep in poll() on the empty ring: records below the threshold leave
    // it asleep; the one that crosses it wakes it, once.
    use std::os::fd::{AsRawFd as _, BorrowedFd};
    let raw: Vec<i32> = records.fds().iter().map(|fd| fd.as_raw_fd()).collect();
    let poller = std::thread::spawn(move || {
        // SAFETY: the fds belong to `records`, which outlives this thread (joined below
        // before it is dropped).
        let fds: Vec<BorrowedFd<'_>> = raw
            .iter()
            .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
            .collect();
        let mut polled: Vec<nix::poll::PollFd<'_>> = fds
            .iter()
            .map(|fd| nix::poll::PollFd::new(*fd, nix::poll::PollFlags::POLLIN))
            .collect();
        let t = std::time::Instant::now();
        let n = nix::poll::poll(&mut polled, nix::poll::PollTimeout::from(5000u16)).expect("poll");
        (n, t.elapsed())
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = counters.snapshot().expect("snapshot");
    let threshold = proxy_common::RECORDS_WAKEUP_BYTES as usize / 352;
    for seq in 0..(threshold - 10) as u32 {
        runner.run(&frame(next + seq), 1).expect("test run");
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!poller.is_finished(), "woken below the threshold");
    for seq in (threshold - 10) as u32..(threshold + 10) as u32 {
        runner.run(&frame(next + seq), 1).expect("test run");
    }
    let (ready, waited) = poller.join().expect("poller");
    assert!(
        ready > 0 && waited < std::time::Duration::from_millis(4000),
        "not woken: {ready} after {waited:?}"
    );
    let delta = counters.snapshot().expect("snapshot").since(&before);
    assert_eq!(
        delta.stat(DataplaneStat::RecordWakeups),
        1,
        "one crossing, one wake-up"
    );
    check(&mut records, &mut next);
    assert_eq!(next as usize, total + threshold + 10);
}

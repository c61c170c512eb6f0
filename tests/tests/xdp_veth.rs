//! Real traffic through a veth pair: the XDP program attached in namespace `a` must count
//! exactly the datagrams sent from namespace `b`, and userspace must drain exactly one
//! ring-buffer record per datagram.
use std::{net::SocketAddr, time::Duration};

use edgeproxy_testbed::{netns::VethPair, policy_util, privilege::require_root, traffic};
use proxy_common::{DataplaneStat, ProtoClass};
use proxy_user::dataplane::{Dataplane, HookChoice, LoadOptions, RecordTally, RingMode};

/// Every UDP datagram to PORT is sampled (rate 1/1), so records must match datagrams 1:1.
fn sample_all_to_port() -> String {
    format!(
        "[[rule]]\nproto = \"udp\"\ndst_port = {PORT}\naction = \"sample\"\nrate = \"1/1\"\nsnap = 64\n"
    )
}

const N: u64 = 1000;
const PORT: u16 = 5140;

fn count_datagrams(v6: bool, rings: RingMode) {
    let pair = VethPair::create().expect("veth pair");
    let dst: SocketAddr = if v6 {
        (pair.a_v6, PORT).into()
    } else {
        (pair.a_v4, PORT).into()
    };
    let class = if v6 {
        ProtoClass::Udp6
    } else {
        ProtoClass::Udp4
    };

    pair.a.run(|| {
        let mut dp = Dataplane::load(LoadOptions {
            rings,
            ..LoadOptions::default()
        })
        .expect("load");
        // This kernel allows ring buffers as inner maps: auto must pick per-CPU rings.
        let want = if rings == RingMode::Shared {
            RingMode::Shared
        } else {
            RingMode::PerCpu
        };
        assert_eq!(dp.ring_mode(), want);
        let mut loader = policy_util::loader(&mut dp);
        policy_util::load(&mut loader, &sample_all_to_port());
        dp.attach(pair.a_if, HookChoice::Auto).expect("attach");
        let mut records = dp.take_records().expect("ring buffer");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if want == RingMode::PerCpu {
            assert!(
                records.ring_count() > cpus,
                "a ring per CPU plus the shared one"
            );
        } else {
            assert_eq!(records.ring_count(), 1);
        }
        let counters = dp.counters().expect("counters");

        let sent = traffic::send_udp(&pair.b, dst, N, 64).expect("send");
        assert_eq!(sent, N);

        let counted = traffic::wait_for(Duration::from_secs(5), || {
            let n = counters.snapshot().expect("snapshot").class(class).packets;
            (n >= N).then_some(n)
        })
        .unwrap_or_else(|| {
            panic!(
                "{} counter stayed below {N}: {:?}",
                class.name(),
                counters.snapshot().expect("snapshot").class(class)
            )
        });
        assert_eq!(counted, N, "exactly N {} packets counted", class.name());

        let mut tally = RecordTally::default();
        let mut to_port = 0u64;
        traffic::wait_for(Duration::from_secs(5), || {
            records.drain(&mut tally, |r| {
                if r.header.class == class as u8 && r.header.dst_port == PORT {
                    // The snap is the frame's first 64 bytes.
                    assert_eq!(r.data.len(), 64);
                    to_port += 1;
                }
            });
            (to_port >= N).then_some(())
        });
        assert_eq!(to_port, N, "one record per datagram to port {PORT}");
        if want == RingMode::PerCpu {
            let per_ring = records.drained_per_ring();
            assert_eq!(per_ring[0], 0, "nothing in the shared ring: {per_ring:?}");
            assert_eq!(
                per_ring[1..].iter().sum::<u64>(),
                tally.total(),
                "{per_ring:?}"
            );
        }
        assert_eq!(tally.bad, 0);

        let snap = counters.snapshot().expect("snapshot");
        assert_eq!(snap.stat(DataplaneStat::RingbufFull), 0, "ring never full");
        assert_eq!(
            snap.stat(DataplaneStat::RecordsPushed),
            N,
            "records only for the sampled datagrams"
        );
        let udp = snap.class(class);
        // 64-byte payload + 8 UDP + 20/40 IP + 14 Ethernet
        let wire = 64 + 8 + if v6 { 40 } else { 20 } + 14;
        assert_eq!(udp.bytes, N * wire, "bytes are wire lengths");
    });
}

#[test]
fn veth_counts_every_udp4_datagram_and_drains_one_record_each() {
    if !require_root("veth_counts_every_udp4_datagram_and_drains_one_record_each") {
        return;
    }
    count_datagrams(false, RingMode::Auto);
}

#[test]
fn veth_counts_every_udp4_datagram_with_a_shared_ring() {
    if !require_root("veth_counts_every_udp4_datagram_with_a_shared_ring") {
        return;
    }
    count_datagrams(false, RingMode::Shared);
}

#[test]
fn veth_counts_every_udp6_datagram_and_drains_one_record_each() {
    if !require_root("veth_counts_every_udp6_datagram_and_drains_one_record_each") {
        return;
    }
    count_datagrams(true, RingMode::PerCpu);
}

#[test]
fn generic_mode_attach_counts_too() {
    if !require_root("generic_mode_attach_counts_too") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    pair.a.run(|| {
        let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
        let mode = dp.attach(pair.a_if, HookChoice::Generic).expect("attach");
        assert_eq!(mode.name(), "generic");
        let counters = dp.counters().expect("counters");
        traffic::send_udp(&pair.b, (pair.a_v4, PORT).into(), 100, 16).expect("send");
        let n = traffic::wait_for(Duration::from_secs(5), || {
            let n = counters
                .snapshot()
                .expect("snapshot")
                .class(ProtoClass::Udp4)
                .packets;
            (n >= 100).then_some(n)
        });
        assert_eq!(n, Some(100));
    });
}

#[test]
fn attaching_to_a_missing_interface_is_a_clear_error() {
    if !require_root("attaching_to_a_missing_interface_is_a_clear_error") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    pair.a.run(|| {
        let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
        let err = dp
            .attach("nosuchif0", HookChoice::Auto)
            .expect_err("must fail");
        let msg = format!("{err}");
        assert!(
            msg.contains("nosuchif0"),
            "error names the interface: {msg}"
        );
    });
}

/// Loopback has no native XDP support: `auto` must fall back (to generic XDP) and say so.
#[test]
fn auto_falls_back_where_native_xdp_is_unsupported() {
    if !require_root("auto_falls_back_where_native_xdp_is_unsupported") {
        return;
    }
    let ns = edgeproxy_testbed::netns::Netns::create().expect("netns");
    ns.run(|| {
        let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
        let native = dp.attach("lo", HookChoice::Native);
        assert!(native.is_err(), "lo must refuse native XDP");
        let mode = dp.attach("lo", HookChoice::Auto).expect("auto attach");
        assert_eq!(mode.name(), "generic");
    });
}

/// The TC hook counts and enforces like XDP on real traffic.
#[test]
fn tc_hook_counts_and_drops() {
    if !require_root("tc_hook_counts_and_drops") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    pair.a.run(|| {
        let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
        policy_util::load(
            &mut policy_util::loader(&mut dp),
            "[[rule]]\nproto = \"udp\"\ndst_port = 7000\naction = \"drop\"\n",
        );
        let mode = dp.attach(pair.a_if, HookChoice::Tc).expect("attach tc");
        assert_eq!(mode.name(), "tc");
        let counters = dp.counters().expect("counters");
        traffic::send_udp(&pair.b, (pair.a_v4, 7000).into(), 300, 16).expect("send");
        traffic::send_udp(&pair.b, (pair.a_v4, 7001).into(), 200, 16).expect("send");
        let snap = traffic::wait_for(Duration::from_secs(5), || {
            let s = counters.snapshot().expect("snapshot");
            (s.class(ProtoClass::Udp4).packets >= 500).then_some(s)
        })
        .expect("counted");
        assert_eq!(snap.class(ProtoClass::Udp4).packets, 500);
        assert_eq!(
            snap.verdict(proxy_common::policy::Verdict::DropPolicy)
                .packets,
            300
        );
    });
}

//! Stopping under load: 1,500 datagrams of 8 KiB sent from a veth peer, SIGTERM right
//! after the last send. Whatever was queued in the sockets (or already taken into an
//! io_uring buffer) at that moment must come out of the exit summary as processed,
//! dropped (SO_MEMINFO) or explicitly left at stop: `sent = processed + drops + left`,
//! on both engines, every round.
use std::{net::UdpSocket, time::Duration};

use edgeproxy_testbed::{
    netns::VethPair, privilege::require_root, scratch::ScratchDir, start_logs, try_stop_and_collect,
};

const PORT: u16 = 5516;
const DATAGRAMS: u64 = 1_500;
const SIZE: usize = 8 * 1024;
const ROUNDS: usize = 5;
/// SIGTERM to exit, at most: the stop drain is capped (2 s of processing) well below it.
const STOP_LIMIT: Duration = Duration::from_secs(15);

#[test]
fn datagrams_queued_at_sigterm_are_counted_io_uring() {
    if require_root("datagrams_queued_at_sigterm_are_counted_io_uring") {
        queued_at_sigterm("io_uring");
    }
}

#[test]
fn datagrams_queued_at_sigterm_are_counted_epoll() {
    if require_root("datagrams_queued_at_sigterm_are_counted_epoll") {
        queued_at_sigterm("epoll");
    }
}

/// One round's figures, from the summary.
struct Round {
    processed: u64,
    drops: u64,
    left: u64,
    device: u64,
    stop: Duration,
}

fn queued_at_sigterm(engine: &str) {
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[engine]\nkind = \"{engine}\"\n[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = 1\n",
            pair.a_v4
        ),
    );
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let r = one_round(&pair, &cfg);
        let missing = DATAGRAMS as i64 - (r.processed + r.drops + r.left + r.device) as i64;
        eprintln!(
            "{engine} round {round}: sent {DATAGRAMS}, processed {}, drops {}, left at stop {}, device drops {}, missing {missing}, stop took {:?}",
            r.processed, r.drops, r.left, r.device, r.stop
        );
        rounds.push((r, missing));
    }
    for (i, (r, missing)) in rounds.iter().enumerate() {
        assert_eq!(
            *missing, 0,
            "{engine} round {i}: sent = processed + drops + left at stop, exactly"
        );
        assert!(
            r.stop < STOP_LIMIT,
            "{engine} round {i}: stop took {:?}",
            r.stop
        );
    }
}

fn one_round(pair: &VethPair, cfg: &std::path::Path) -> Round {
    let child = start_logs(&pair.a, cfg);
    let before = pair.device_drops().expect("device counters");
    pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..DATAGRAMS {
            let head = format!("<14>1 - h app - - - stop {i} ");
            let mut msg = head.into_bytes();
            msg.resize(SIZE, b'x');
            s.send_to(&msg, (pair.a_v4, PORT)).expect("send");
        }
    });
    let t = std::time::Instant::now();
    let (status, out) = try_stop_and_collect(child).expect("stop edgeproxy");
    let stop = t.elapsed();
    assert!(status.success(), "edgeproxy failed ({status}): {out}");
    let device = pair.device_drops().expect("device counters") - before;
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    let s = &summary["summary"];
    Round {
        processed: s["counts"]["datagrams"].as_u64().expect("datagrams"),
        drops: s["kernel_drops"].as_u64().expect("drops"),
        // Absent before the stop accounting existed.
        left: s["left_at_stop"].as_u64().unwrap_or(0),
        device,
        stop,
    }
}

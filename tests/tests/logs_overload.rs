//! Overload far beyond what one worker can take: every datagram the sender got out is
//! accounted for — processed, dropped at the socket (SO_MEMINFO, reported by edgeproxy),
//! or dropped by the veth device (its counters) — exactly; and edgeproxy does not crash.
use std::net::UdpSocket;

use edgeproxy_testbed::{
    netns::VethPair, privilege::require_root, scratch::ScratchDir, start_edgeproxy,
    stop_and_collect,
};

const PORT: u16 = 5515;

#[test]
fn overload_is_accounted_for_exactly() {
    if !require_root("overload_is_accounted_for_exactly") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{}:{PORT}\"\nrcvbuf = 65536\n[window]\nseconds = 0.5\n",
            pair.a_v4
        ),
    );
    let mut args = vec![
        std::ffi::OsString::from("logs"),
        "--workers".into(),
        "1".into(),
        "--duration".into(),
        "60".into(),
        "--config".into(),
    ];
    args.push(cfg.clone().into());
    let child = start_edgeproxy(&pair.a, args);
    let before = pair.device_drops().expect("device counters");
    let sent: u64 = pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let mut ok = 0;
        for i in 0..300_000u64 {
            let msg = format!("<14>1 - h app - - - flood {i} {}", "x".repeat(64));
            if s.send_to(msg.as_bytes(), (pair.a_v4, PORT)).is_ok() {
                ok += 1;
            }
        }
        ok
    });
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let hwm_kib = edgeproxy_testbed::tcp::peak_rss_kib(child.pid().as_raw()).unwrap_or(0);
    // Exits 0: edgeproxy survived the flood.
    let out = stop_and_collect(child);
    let after = pair.device_drops().expect("device counters");
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    let s = &summary["summary"];
    let processed = s["counts"]["messages"].as_u64().expect("messages");
    let socket_drops = s["kernel_drops"].as_u64().expect("drops");
    let device = after - before;
    eprintln!(
        "sent {sent}: processed {processed}, socket drops {socket_drops}, device drops {device}; peak RSS {hwm_kib} KiB"
    );
    assert!(
        socket_drops + device > 0,
        "the flood must overload something, or this test tests nothing"
    );
    assert_eq!(
        processed + socket_drops + device,
        sent,
        "sent = processed + counted drops, exactly"
    );
    assert!(
        hwm_kib < 512 * 1024,
        "memory stays bounded under overload ({hwm_kib} KiB)"
    );
    assert!(s["window_close_lag"]["windows"].as_u64().unwrap_or(0) > 0);
    // The per-listener figure and the kernel's own UDP counter agree with the total.
    assert_eq!(
        s["kernel_drops_by_listener"][format!("{}:{PORT}", pair.a_v4)],
        socket_drops
    );
    assert_eq!(
        s["kernel_udp_counters_delta"]["udp.RcvbufErrors"], socket_drops,
        "{s}"
    );
}

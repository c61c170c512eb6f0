//! Overload far beyond what one worker can take: every datagram the sender got out is
//! accounted for — processed, dropped at the socket (SO_MEMINFO, reported by edgeproxy),
//! or dropped by the veth device (its counters) — exactly; and edgeproxy does not crash.
use std::{io::Read, net::UdpSocket, process::Stdio};

use edgeproxy_testbed::{
    Reaped, edgeproxy_bin, netns::VethPair, privilege::require_root, scratch::ScratchDir,
    wait_for_line,
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
    let mut child = Reaped(Some(
        pair.a
            .command(edgeproxy_bin().expect("binary"))
            .args(["logs", "--workers", "1", "--duration", "60", "--config"])
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    ));
    let (ok, log) = wait_for_line(child.0.as_mut().expect("child"), "log pipeline started");
    assert!(ok, "{log:?}");
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
    let hwm_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", child.pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let mut c = child.take();
    let mut out = String::new();
    c.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert!(
        c.wait().expect("wait").success(),
        "edgeproxy survived the flood"
    );
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

//! The data plane survives the daemon: `kill -9` of `edgeproxy run` leaves the XDP
//! program dropping per policy; a restart re-adopts the pinned link and counters carry
//! on; `edgeproxy detach` removes everything and traffic flows again.
use std::{
    net::UdpSocket,
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use edgeproxy_testbed::{
    Reaped, edgeproxy_bin,
    netns::VethPair,
    privilege::require_root,
    scratch::{PinRoot, ScratchDir},
    traffic, wait_for_line,
};

const DROP_PORT: u16 = 7000;
const OPEN_PORT: u16 = 7001;

fn spawn_run(
    pair: &VethPair,
    hook: &str,
    root: &Path,
    state: &Path,
    policy: Option<&Path>,
) -> Reaped {
    let bin = edgeproxy_bin().expect("binary");
    let mut cmd = pair.a.command(&bin);
    cmd.args([
        "run",
        "--iface",
        pair.a_if,
        "--hook",
        hook,
        "--json",
        "--pin-root",
    ])
    .arg(root)
    .arg("--state-dir")
    .arg(state);
    if let Some(p) = policy {
        cmd.arg("--policy").arg(p);
    }
    let mut child = Reaped(Some(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    ));
    let (ok, lines) = wait_for_line(child.0.as_mut().expect("child"), "XDP attached");
    assert!(ok, "edgeproxy did not attach: {lines:?}");
    child
}

/// Datagrams waiting on `sock` (drained).
fn received(sock: &UdpSocket) -> u64 {
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = [0u8; 2048];
    let mut n = 0;
    while sock.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

fn stop(mut child: Reaped) -> serde_json::Value {
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out: std::process::Output = Child::wait_with_output(child.take()).expect("wait");
    assert!(out.status.success(), "edgeproxy exited with {}", out.status);
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

#[test]
fn xdp_kill_9_keeps_policy_restart_readopts_detach_removes() {
    if require_root("xdp_kill_9_keeps_policy_restart_readopts_detach_removes") {
        lifecycle("native");
    }
}

/// The TC hook (tcx on this kernel) under the same lifecycle.
#[test]
fn tc_kill_9_keeps_policy_restart_readopts_detach_removes() {
    if require_root("tc_kill_9_keeps_policy_restart_readopts_detach_removes") {
        lifecycle("tc");
    }
}

fn lifecycle(hook: &str) {
    let pair = VethPair::create().expect("veth pair");
    let root = PinRoot::new().expect("pin root");
    let dir = ScratchDir::new().expect("scratch");
    let state = dir.path().join("state");
    let policy = dir.file(
        "drop.toml",
        &format!("[[rule]]\nname = \"block\"\nproto = \"udp\"\ndst_port = {DROP_PORT}\naction = \"drop\"\n"),
    );
    let (blocked, open) = pair.a.run(|| {
        let b = UdpSocket::bind((pair.a_v4, DROP_PORT)).expect("bind");
        let o = UdpSocket::bind((pair.a_v4, OPEN_PORT)).expect("bind");
        for s in [&b, &o] {
            s.set_nonblocking(true).expect("nonblocking");
            // Room for every datagram a step sends before it reads (as root: FORCE).
            nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))
                .expect("SO_RCVBUFFORCE");
        }
        (b, o)
    });
    let send = |port, n| traffic::send_udp(&pair.b, (pair.a_v4, port).into(), n, 32).expect("send");

    let mut first = spawn_run(&pair, hook, root.path(), &state, Some(&policy));
    send(DROP_PORT, 200);
    send(OPEN_PORT, 200);
    assert_eq!(
        (received(&blocked), received(&open)),
        (0, 200),
        "policy enforced"
    );

    // kill -9: no clean-up runs, the pinned link keeps the program attached.
    nix::sys::signal::kill(first.pid(), nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = first.take().wait();
    send(DROP_PORT, 300);
    send(OPEN_PORT, 300);
    assert_eq!(
        (received(&blocked), received(&open)),
        (0, 300),
        "still enforced with no daemon running"
    );

    // Restart without --policy: adopts the link, keeps the policy, counters continue.
    let second = spawn_run(&pair, hook, root.path(), &state, None);
    send(DROP_PORT, 100);
    assert_eq!(received(&blocked), 0);
    let report = stop(second);
    assert_eq!(report["hook"], "adopted");
    assert_eq!(
        report["counters"]["verdicts"]["drop_policy"]["packets"], 600,
        "drops counted before the kill, while no daemon ran, and after the restart"
    );
    // This run's own figures (and its rate) cover only what it saw.
    assert_eq!(
        report["counters_this_run"]["verdicts"]["drop_policy"]["packets"], 100,
        "this run's counts: {report}"
    );
    let elapsed = report["elapsed_s"].as_f64().expect("elapsed");
    let rate = report["packets_per_s"].as_f64().expect("rate");
    let this_run = report["packets_this_run"]
        .as_f64()
        .expect("this run's packets");
    assert!(
        (100.0..600.0).contains(&this_run),
        "this run's packets, not the lifetime's: {this_run}"
    );
    assert!(
        (rate - this_run / elapsed).abs() < 1e-6 * rate.max(1.0),
        "the rate is this run's packets over this run's time: {rate} vs {this_run}/{elapsed}"
    );
    // SIGTERM leaves the data plane attached too.
    send(DROP_PORT, 10);
    assert_eq!(received(&blocked), 0, "still attached after a clean exit");

    // policy show reads the pinned state and the stored source.
    let bin = edgeproxy_bin().expect("binary");
    let show = pair
        .a
        .command(&bin)
        .args([
            "policy",
            "show",
            "--json",
            "--iface",
            pair.a_if,
            "--pin-root",
        ])
        .arg(root.path())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("policy show");
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(show["generation"], 1);
    assert_eq!(show["rules"][0]["name"], "block");
    assert_eq!(show["rules"][0]["packets"], 610);

    let out = pair
        .a
        .command(&bin)
        .args(["detach", pair.a_if, "--json", "--pin-root"])
        .arg(root.path())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(d["link_detached"], true);
    assert!(!root.path().join(pair.a_if).exists(), "pins removed");
    send(DROP_PORT, 50);
    assert_eq!(received(&blocked), 50, "traffic flows after detach");
}

/// Maps pinned by an edgeproxy with another layout: a counters map is started afresh
/// (counts reset, the upgrade goes on); any other map stops the load, naming the map,
/// the difference and the way out, instead of a generic load error.
#[test]
fn pins_with_another_map_layout_reset_counters_and_refuse_the_rest() {
    use proxy_common::{
        DATAPLANE_STATS_MAP, DATAPLANE_STATS_SLOTS, PROTO_COUNTERS_MAP, policy::POLICY_STATE_MAP,
    };
    use proxy_user::dataplane::{Dataplane, DataplaneError, LoadOptions};
    if !require_root("pins_with_another_map_layout_reset_counters_and_refuse_the_rest") {
        return;
    }
    let root = PinRoot::new().expect("pin root");
    let dir = root.path().join("layout");
    let opts = || LoadOptions {
        pin_dir: Some(dir.clone()),
        ..LoadOptions::default()
    };
    drop(Dataplane::load(opts()).expect("first load pins the maps"));
    drop(Dataplane::load(opts()).expect("a second load reuses them"));
    // Another map pinned under `name`, as an edgeproxy with another layout would leave.
    let replace = |name: &str| {
        let other = aya::maps::MapData::from_pin(dir.join(PROTO_COUNTERS_MAP)).expect("open pin");
        std::fs::remove_file(dir.join(name)).expect("unpin");
        other.pin(dir.join(name)).expect("pin");
    };
    replace(DATAPLANE_STATS_MAP);
    drop(Dataplane::load(opts()).expect("a counters map of another layout is replaced"));
    let stats = aya::maps::MapData::from_pin(dir.join(DATAPLANE_STATS_MAP)).expect("open pin");
    assert_eq!(
        stats.info().expect("info").max_entries(),
        DATAPLANE_STATS_SLOTS,
        "a fresh stats map is pinned"
    );
    replace(POLICY_STATE_MAP);
    let err = match Dataplane::load(opts()) {
        Ok(_) => panic!("a policy map of another layout was reused"),
        Err(e) => e,
    };
    assert!(
        matches!(err, DataplaneError::IncompatiblePins { .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(POLICY_STATE_MAP), "{text}");
    assert!(text.contains("edgeproxy detach"), "{text}");
}

//! The `edgeproxy run` binary, as an operator runs it, inside a namespace.
use std::{process::Stdio, time::Duration};

use edgeproxy_testbed::{
    Reaped, edgeproxy_bin, netns::VethPair, privilege::require_root, scratch::ScratchDir, traffic,
    wait_for_line,
};

#[test]
fn edgeproxy_run_reports_exact_counts_as_json() {
    if !require_root("edgeproxy_run_reports_exact_counts_as_json") {
        return;
    }
    let bin = edgeproxy_bin().expect("edgeproxy binary");
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let policy = dir.file(
        "p.toml",
        "[[rule]]\nname = \"syslog\"\nproto = \"udp\"\ndst_port = 9999\naction = \"sample\"\nrate = \"1/1\"\nsnap = 64\n",
    );
    let mut child = Reaped(Some(
        pair.a
            .command(&bin)
            .args([
                "run",
                "--ephemeral",
                "--iface",
                pair.a_if,
                "--duration",
                "60",
                "--json",
                "--policy",
            ])
            .arg(&policy)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgeproxy"),
    ));
    let (attached, lines) = wait_for_line(child.0.as_mut().expect("child"), "XDP attached");
    assert!(attached, "edgeproxy never attached: {lines:?}");

    traffic::send_udp(&pair.b, (pair.a_v4, 9999).into(), 500, 100).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = child.take().wait_with_output().expect("wait");
    assert!(out.status.success(), "edgeproxy exited with {}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["hook"], "native");
    assert_eq!(report["counters"]["classes"]["udp4"]["packets"], 500);
    assert_eq!(
        report["counters"]["classes"]["udp4"]["bytes"],
        500 * (100 + 8 + 20 + 14)
    );
    assert_eq!(
        report["counters"]["verdicts"]["pass_sample_rule"]["packets"],
        500
    );
    assert_eq!(report["records"]["by_class"]["udp4"], 500);
    assert_eq!(report["records"]["samples"], 500);
    assert_eq!(report["counters"]["stats"]["ringbuf_full"], 0);
}

#[test]
fn edgeproxy_run_on_a_missing_interface_fails_with_one_clear_line() {
    if !require_root("edgeproxy_run_on_a_missing_interface_fails_with_one_clear_line") {
        return;
    }
    let bin = edgeproxy_bin().expect("edgeproxy binary");
    let pair = VethPair::create().expect("veth pair");
    let out = pair
        .a
        .command(&bin)
        .args([
            "run",
            "--ephemeral",
            "--iface",
            "nosuch0",
            "--duration",
            "1",
        ])
        .output()
        .expect("run edgeproxy");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("edgeproxy: error: attaching to nosuch0"),
        "stderr: {err}"
    );
}

//! The `edgeproxy run` binary, as an operator runs it, inside a namespace.
use std::{process::Stdio, time::Duration};

use edgeproxy_testbed::{edgeproxy_bin, netns::VethPair, privilege::require_root, traffic};

#[test]
fn edgeproxy_run_reports_exact_counts_as_json() {
    if !require_root("edgeproxy_run_reports_exact_counts_as_json") {
        return;
    }
    let bin = edgeproxy_bin().expect("edgeproxy binary");
    let pair = VethPair::create().expect("veth pair");
    let mut child = pair
        .a
        .command(&bin)
        .args(["run", "--iface", pair.a_if, "--duration", "60", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn edgeproxy");
    // Kill the child whatever happens below, so a failed assertion never leaks it.
    struct Reap(Option<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let mut reap = Reap(Some(child));

    // Wait until the program is attached (the daemon logs it) before sending.
    let attached = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let done = line.contains("XDP attached");
            lines.push(line);
            if done {
                return (true, lines);
            }
        }
        (false, lines)
    })
    .join()
    .expect("stderr reader");
    assert!(attached.0, "edgeproxy never attached: {:?}", attached.1);

    traffic::send_udp(&pair.b, (pair.a_v4, 9999).into(), 500, 100).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let child = reap.0.take().expect("child");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "edgeproxy exited with {}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["xdp_mode"], "native");
    assert_eq!(report["counters"]["classes"]["udp4"]["packets"], 500);
    assert_eq!(
        report["counters"]["classes"]["udp4"]["bytes"],
        500 * (100 + 8 + 20 + 14)
    );
    assert_eq!(report["records"]["by_class"]["udp4"], 500);
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
        .args(["run", "--iface", "nosuch0", "--duration", "1"])
        .output()
        .expect("run edgeproxy");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("edgeproxy: error: attaching to nosuch0"),
        "stderr: {err}"
    );
}

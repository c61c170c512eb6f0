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

/// TCP forwarding inside `run` that cannot start (a route on an address this host does
/// not have) stops the whole daemon at once with the reason, instead of running on
/// without forwarding until the end.
#[test]
fn edgeproxy_run_stops_at_once_when_forwarding_cannot_start() {
    if !require_root("edgeproxy_run_stops_at_once_when_forwarding_cannot_start") {
        return;
    }
    let bin = edgeproxy_bin().expect("edgeproxy binary");
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let cfg = dir.file(
        "run.toml",
        "[[route]]\nlisten = \"10.200.99.99:8080\"\nupstreams = [\"10.200.0.1:9\"]\n",
    );
    let t = std::time::Instant::now();
    let out = pair
        .a
        .command(&bin)
        .args([
            "run",
            "--ephemeral",
            "--iface",
            pair.a_if,
            "--duration",
            "30",
        ])
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run edgeproxy");
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {err}");
    assert!(
        err.contains("listening on 10.200.99.99:8080"),
        "stderr: {err}"
    );
    assert!(
        took < Duration::from_secs(15),
        "stopped after {took:?}, not at once"
    );
}

/// HTTP sampling: the policy samples TCP port 8080; the report's top paths are the
/// request lines that real clients sent through the interface, counted exactly.
#[test]
fn sampled_http_request_lines_appear_in_the_report() {
    if !require_root("sampled_http_request_lines_appear_in_the_report") {
        return;
    }
    http_sampling(false);
}

/// The same with the log pipeline in the daemon (`run --listen`): its workers, not the
/// drain thread, read the rings, and the report still has the request lines.
#[test]
fn sampled_http_request_lines_appear_in_the_report_with_logs() {
    if !require_root("sampled_http_request_lines_appear_in_the_report_with_logs") {
        return;
    }
    http_sampling(true);
}

fn http_sampling(with_logs: bool) {
    use std::io::{Read, Write};
    let bin = edgeproxy_bin().expect("edgeproxy binary");
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let policy = dir.file(
        "p.toml",
        "[[rule]]\nname = \"web\"\nproto = \"tcp\"\ndst_port = 8080\naction = \"sample\"\nrate = \"100%\"\nsnap = 200\n",
    );
    let server = pair
        .a
        .run(|| std::net::TcpListener::bind((pair.a_v4, 8080)))
        .expect("listen");
    let served = std::thread::spawn(move || {
        for _ in 0..10 {
            let (mut s, _) = server.accept().expect("accept");
            let mut req = Vec::new();
            let mut b = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).expect("read");
                assert!(n > 0, "request cut");
                req.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .expect("respond");
        }
    });
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
            .args(
                with_logs
                    .then(|| ["--listen".to_owned(), format!("{}:5514", pair.a_v4)])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgeproxy"),
    ));
    let (attached, lines) = wait_for_line(child.0.as_mut().expect("child"), "XDP attached");
    assert!(attached, "edgeproxy never attached: {lines:?}");
    let requests = [
        (6, "GET /index.html HTTP/1.1\r\nHost: site.test\r\n\r\n"),
        (
            3,
            "POST /api/items?id=1 HTTP/1.1\r\nHost: site.test\r\nContent-Length: 0\r\n\r\n",
        ),
        (1, "GET /other HTTP/1.0\r\n\r\n"),
    ];
    for (n, req) in requests {
        for _ in 0..n {
            let mut s = pair
                .b
                .run(|| std::net::TcpStream::connect((pair.a_v4, 8080)))
                .expect("connect");
            s.write_all(req.as_bytes()).expect("send");
            let mut resp = Vec::new();
            s.read_to_end(&mut resp).expect("response");
            assert!(resp.starts_with(b"HTTP/1.1 204"));
        }
    }
    served.join().expect("server");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = child.take().wait_with_output().expect("wait");
    assert!(out.status.success(), "edgeproxy exited with {}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // With the pipeline, its window reports (the default stdout sink) and its summary
    // line come first, then the run report.
    let report = if with_logs {
        let at = stdout
            .find("{\"summary\"")
            .expect("the pipeline's summary line");
        let (_, rest) = stdout[at..].split_once('\n').expect("a report after it");
        rest
    } else {
        &stdout
    };
    let report: serde_json::Value = serde_json::from_str(report).expect("JSON report");
    let http = &report["http"];
    assert_eq!(http["requests"], 10, "{http}");
    assert_eq!(
        http["top_paths"],
        serde_json::json!([
            {"host": "site.test", "path": "/index.html", "count": 6},
            {"host": "site.test", "path": "/api/items", "count": 3},
            {"host": "", "path": "/other", "count": 1},
        ]),
        "{http}"
    );
    assert_eq!(http["methods"]["POST"], 3);
    // Every TCP segment to port 8080 was sampled (handshakes, ACKs, FINs too): only the
    // ones carrying a request line count as requests.
    assert!(http["tcp_samples"].as_u64().unwrap_or(0) > 10, "{http}");
}

//! Connections beyond what the proxy may hold. Out of file descriptors: it raises its
//! soft limit to the hard one, sizes a connection budget from it, refuses connections
//! beyond it cleanly and counted (`fd_limit`), never fails half-built ones, and logs the
//! refusals as a few lines, not one per connection. At twice a route's own limit: exact
//! counts, no line per refusal. Peak memory measured in both.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use edgeproxy_testbed::{
    ChildSetup,
    privilege::require_root,
    scratch::ScratchDir,
    tcp::{Upstream, connect, echo, namespace},
    try_start_edgeproxy_set_until, try_stop_and_collect,
};

const CLIENTS: usize = 300;
/// What the proxy is started with: like a shell's default soft limit, far below what
/// 300 connections need (6 descriptors each), and a hard limit it may raise it to.
const NOFILE: (u64, u64) = (256, 1024);

/// One client: a connection that echoes (served) or is closed or reset at once (refused).
fn served(mut s: TcpStream) -> (bool, TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    if s.write_all(b"ping\n").is_err() {
        return (false, s);
    }
    let mut buf = [0u8; 5];
    let ok = s.read_exact(&mut buf).is_ok() && &buf == b"ping\n";
    (ok, s)
}

#[test]
fn connections_beyond_the_descriptor_limit_are_refused_and_counted() {
    if !require_root("connections_beyond_the_descriptor_limit_are_refused_and_counted") {
        return;
    }
    let ns = namespace().expect("namespace");
    let dir = ScratchDir::new().expect("scratch");
    let _up =
        Upstream::spawn(&ns, "10.200.0.1:7601".parse().expect("addr"), echo()).expect("upstream");
    let cfg = dir.file(
        "proxy.toml",
        "[[route]]\nname = \"r\"\nlisten = \"10.200.0.1:7600\"\nupstreams = [\"10.200.0.1:7601\"]\n",
    );
    let stats = dir.path().join("stats.json");
    let args: Vec<std::ffi::OsString> = vec![
        "proxy".into(),
        "--json".into(),
        "--config".into(),
        cfg.into(),
        "--stats-file".into(),
        stats.into(),
    ];
    let (proxy, log) = try_start_edgeproxy_set_until(
        &ns,
        args,
        ChildSetup::Nofile(NOFILE.0, NOFILE.1),
        "TCP forwarding started",
    )
    .expect("start proxy");
    let listen: SocketAddr = "10.200.0.1:7600".parse().expect("addr");
    // Every client is held open until all have tried, so the budget stays full.
    let mut held = Vec::new();
    let mut served_n = 0usize;
    for _ in 0..CLIENTS {
        let Ok(s) = connect(&ns, listen) else {
            continue;
        };
        let (ok, s) = served(s);
        served_n += usize::from(ok);
        held.push(s);
    }
    // Freed places are taken again: a connection after the others closed is served.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (again, _s) = served(connect(&ns, listen).expect("connect"));
    assert!(again, "a connection after the others closed is served");
    drop(_s);
    std::thread::sleep(Duration::from_millis(300));
    let hwm_kib = edgeproxy_testbed::tcp::peak_rss_kib(proxy.pid().as_raw()).unwrap_or(0);
    let (status, out) = try_stop_and_collect(proxy).expect("stop");
    assert!(status.success(), "{status}: {out}");
    let lines = log
        .wait_for("no line has this", Duration::from_millis(500))
        .expect_err("all lines");
    let report: serde_json::Value = serde_json::from_str(&out).expect("report JSON");
    let capacity = report["connection_capacity"].as_u64().expect("capacity");
    let route = &report["routes"][0];
    let fd_limit = route["refused"]["fd_limit"].as_u64().unwrap_or(0);
    let socket_error = route["refused"]["socket_error"].as_u64().unwrap_or(0)
        + route["errors"]["socket_error"].as_u64().unwrap_or(0);
    let refusal_lines = lines
        .iter()
        .filter(|l| l.contains("file-descriptor limit allows"))
        .count();
    println!(
        "fd limit: RLIMIT_NOFILE {NOFILE:?} raised; capacity {capacity}; {CLIENTS} clients: served {served_n}, \
         refused fd_limit {fd_limit}, socket errors {socket_error}; {refusal_lines} refusal log lines, {} log lines in all; peak RSS {hwm_kib} KiB",
        lines.len()
    );
    assert!(
        hwm_kib > 0 && hwm_kib < 256 * 1024,
        "memory stays bounded: {hwm_kib} KiB"
    );
    // 1,024 descriptors less the 256 kept and those open at start, six per connection:
    // from the soft limit it was started with (256) there would be no room at all.
    assert!(
        (100..=128).contains(&capacity),
        "capacity sized from the raised limit: {capacity}"
    );
    assert_eq!(
        served_n as u64, capacity,
        "exactly the budget is served: {route}"
    );
    assert_eq!(
        fd_limit,
        CLIENTS as u64 - capacity,
        "every other client refused, counted: {route}"
    );
    assert_eq!(socket_error, 0, "no connection failed half-built: {route}");
    assert!(
        refusal_lines <= 3,
        "refusals are throttled, not one line each: {refusal_lines}"
    );
}

/// A route's own limit at twice its capacity: exactly `max_connections` served, the rest
/// reset at accept and counted `route_limit`, no warning per refusal, memory flat.
#[test]
fn a_route_at_twice_its_connection_limit_refuses_and_counts_exactly() {
    if !require_root("a_route_at_twice_its_connection_limit_refuses_and_counts_exactly") {
        return;
    }
    const LIMIT: u64 = 100;
    let ns = namespace().expect("namespace");
    let dir = ScratchDir::new().expect("scratch");
    let _up =
        Upstream::spawn(&ns, "10.200.0.1:7611".parse().expect("addr"), echo()).expect("upstream");
    let cfg = dir.file(
        "proxy.toml",
        &format!(
            "[[route]]\nname = \"r\"\nlisten = \"10.200.0.1:7610\"\nupstreams = [\"10.200.0.1:7611\"]\nmax_connections = {LIMIT}\n"
        ),
    );
    let args: Vec<std::ffi::OsString> = vec![
        "proxy".into(),
        "--json".into(),
        "--config".into(),
        cfg.into(),
    ];
    let (proxy, log) =
        edgeproxy_testbed::try_start_edgeproxy_until(&ns, args, "TCP forwarding started")
            .expect("start proxy");
    let listen: SocketAddr = "10.200.0.1:7610".parse().expect("addr");
    let mut held = Vec::new();
    let mut served_n = 0u64;
    for _ in 0..2 * LIMIT {
        let Ok(s) = connect(&ns, listen) else {
            continue;
        };
        let (ok, s) = served(s);
        served_n += u64::from(ok);
        held.push(s);
    }
    let hwm_kib = edgeproxy_testbed::tcp::peak_rss_kib(proxy.pid().as_raw()).unwrap_or(0);
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (status, out) = try_stop_and_collect(proxy).expect("stop");
    assert!(status.success(), "{status}: {out}");
    let lines = log
        .wait_for("no line has this", Duration::from_millis(300))
        .expect_err("all lines");
    let report: serde_json::Value = serde_json::from_str(&out).expect("report JSON");
    let route = &report["routes"][0];
    let refused = route["refused"]["route_limit"].as_u64().unwrap_or(0);
    println!(
        "route limit {LIMIT}: {} clients: served {served_n}, refused route_limit {refused}; {} log lines after start; peak RSS {hwm_kib} KiB",
        2 * LIMIT,
        lines.len()
    );
    assert_eq!(served_n, LIMIT, "exactly the limit served: {route}");
    assert_eq!(refused, LIMIT, "the rest refused and counted: {route}");
    assert!(lines.len() <= 3, "no line per refusal: {lines:?}");
    assert!(hwm_kib > 0 && hwm_kib < 256 * 1024, "{hwm_kib} KiB");
}

//! kill -9 under traffic, then a restart: what `edgeproxy logs` took into a TCP sink's
//! spool survives the crash and is delivered by the next start; `edgeproxy proxy` serves
//! again on the same address at once. (`run`'s data plane surviving kill -9 is
//! tests/tests/lifecycle.rs.)
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpListener,
    time::Duration,
};

use edgeproxy_testbed::{
    netns::VethPair,
    privilege::require_root,
    scratch::ScratchDir,
    start_logs, stop_and_collect,
    tcp::{Upstream, connect, echo, namespace, start_proxy},
    traffic,
};
use nix::sys::signal::{Signal, kill};

const PORT: u16 = 5514;
const DOWNSTREAM: u16 = 10601;
const MESSAGES: u64 = 1000;

#[test]
fn a_spooled_batch_survives_kill_9_and_the_next_start_delivers_it() {
    if !require_root("a_spooled_batch_survives_kill_9_and_the_next_start_delivers_it") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = 0.2\n\
             [[sink]]\nkind = \"tcp\"\naddress = \"{}:{DOWNSTREAM}\"\nspool_dir = \"{}\"\n\
             format = \"json\"\nwhat = \"raw\"\n",
            pair.a_v4,
            pair.b_v4,
            dir.path().join("spool").display()
        ),
    );
    // The downstream is down: everything goes to the spool.
    let first = start_logs(&pair.a, &cfg);
    traffic::send_numbered_syslog(
        &pair.b,
        (pair.a_v4, PORT).into(),
        0..MESSAGES,
        "",
        Duration::from_millis(10),
    )
    .expect("send");
    // Several windows later every message is in the spool; then the crash.
    std::thread::sleep(Duration::from_millis(1000));
    let mut first = first;
    kill(first.pid(), Signal::SIGKILL).expect("SIGKILL");
    let _ = first.take().wait();
    // The downstream comes up; the next start finds the spool and sends it.
    let listener = pair
        .b
        .run(|| TcpListener::bind((pair.b_v4, DOWNSTREAM)).expect("listen"));
    let reader = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read");
        got
    });
    let second = start_logs(&pair.a, &cfg);
    std::thread::sleep(Duration::from_millis(800));
    let out = stop_and_collect(second);
    let got = reader.join().expect("reader");
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for l in String::from_utf8_lossy(&got).lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
        let n: u64 = v["msg"]
            .as_str()
            .and_then(|m| m.strip_prefix("msg "))
            .and_then(|n| n.parse().ok())
            .expect("msg N");
        *seen.entry(n).or_default() += 1;
    }
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    let st = &summary["summary"]["sinks"][0]["stats"];
    let duplicates: u64 = seen.values().map(|c| c - 1).sum();
    println!(
        "crash and restart: {MESSAGES} sent before kill -9, {} delivered after the restart ({duplicates} duplicates); second run's sink: {st}",
        seen.len()
    );
    assert_eq!(
        seen.len() as u64,
        MESSAGES,
        "every message taken before the crash"
    );
    assert_eq!(duplicates, 0, "none was sent before the crash");
    assert_eq!(
        st["pending_at_start"], MESSAGES,
        "the spool the crash left: {st}"
    );
    assert_eq!(st["pending"], 0, "{st}");
    assert_eq!(st["delivered"], MESSAGES, "{st}");
}

#[test]
fn the_proxy_serves_again_right_after_kill_9() {
    if !require_root("the_proxy_serves_again_right_after_kill_9") {
        return;
    }
    let ns = namespace().expect("namespace");
    let dir = ScratchDir::new().expect("scratch");
    let _up =
        Upstream::spawn(&ns, "10.200.0.1:7801".parse().expect("addr"), echo()).expect("upstream");
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        "[[route]]\nlisten = \"10.200.0.1:7800\"\nupstreams = [\"10.200.0.1:7801\"]\n",
    )
    .expect("config");
    let stats = dir.path().join("stats.json");
    let listen = "10.200.0.1:7800".parse().expect("addr");
    let (mut first, _log) = start_proxy(&ns, &cfg, &stats, &[], &[]).expect("start");
    // Under traffic: a connection open and moving bytes when the process dies.
    let mut c = connect(&ns, listen).expect("connect");
    c.write_all(b"one").expect("write");
    let mut b = [0u8; 3];
    c.read_exact(&mut b).expect("echo");
    kill(first.pid(), Signal::SIGKILL).expect("SIGKILL");
    let _ = first.take().wait();
    // The open connection ends (the kernel closes the dead process's sockets).
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let ended = matches!(c.read(&mut b), Ok(0) | Err(_));
    assert!(ended, "the client's connection ended with the process");
    let (second, _log) = start_proxy(&ns, &cfg, &stats, &[], &[]).expect("restart");
    let mut c = connect(&ns, listen).expect("connect after restart");
    c.write_all(b"two").expect("write");
    c.read_exact(&mut b).expect("echo");
    assert_eq!(&b, b"two");
    drop(c);
    let (status, out) = edgeproxy_testbed::try_stop_and_collect(second).expect("stop");
    assert!(status.success(), "{status}: {out}");
}

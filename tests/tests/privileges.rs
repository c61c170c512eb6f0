//! Least privilege, read from `/proc/PID/task/*/status` of the running daemon: with
//! `[daemon] user`, `logs` and `proxy` run every thread as that user with no capability
//! once their sockets are bound, and `no_new_privs` is set either way.
use std::{
    io::{Read, Write},
    net::UdpSocket,
    os::unix::fs::MetadataExt,
    time::Duration,
};

use edgeproxy_testbed::{
    netns::VethPair,
    privilege::require_root,
    scratch::ScratchDir,
    stop_and_collect,
    tcp::{Upstream, connect, echo, namespace},
    try_start_edgeproxy_as_is_until, try_stop_and_collect,
};
use proxy_user::privileges::{ThreadStatus, parse_status};

const NOBODY: u32 = 65534;
const PORT: u16 = 5514;

/// Every thread of process `pid`.
fn threads(pid: u32) -> Vec<ThreadStatus> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir") {
        let e = e.expect("entry");
        let tid: u32 = e
            .file_name()
            .to_str()
            .and_then(|s| s.parse().ok())
            .expect("tid");
        let text = std::fs::read_to_string(e.path().join("status")).expect("status");
        out.push(parse_status(tid, &text));
    }
    out
}

fn assert_dropped(pid: u32, what: &str) {
    let ts = threads(pid);
    assert!(ts.len() > 1, "{what}: workers are threads: {ts:?}");
    for t in &ts {
        assert_eq!(t.uids, vec![NOBODY; 4], "{what}: thread {} uids", t.tid);
        assert_eq!(t.gids, vec![NOBODY; 4], "{what}: thread {} gids", t.tid);
        assert_eq!(
            (t.cap_effective, t.cap_permitted),
            (0, 0),
            "{what}: thread {} capabilities",
            t.tid
        );
        assert!(t.no_new_privs, "{what}: thread {} no_new_privs", t.tid);
    }
    println!(
        "{what}: {} threads, each uid/gid {NOBODY}, CapEff 0, CapPrm 0, NoNewPrivs 1",
        ts.len()
    );
}

#[test]
fn logs_drops_to_the_configured_user_after_binding() {
    if !require_root("logs_drops_to_the_configured_user_after_binding") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let spool = dir.path().join("spool");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            // Port 514 needs privileges to bind: bound before the drop.
            "[daemon]\nuser = \"nobody\"\n[[listener]]\naddress = \"{}:{PORT}\"\n\
             [[listener]]\naddress = \"{}:514\"\n[window]\nseconds = 0.2\n\
             [[sink]]\nkind = \"stdout\"\n\
             [[sink]]\nkind = \"tcp\"\naddress = \"127.0.0.1:9\"\nspool_dir = \"{}\"\n",
            pair.a_v4,
            pair.a_v4,
            spool.display()
        ),
    );
    let (child, _log) = try_start_edgeproxy_as_is_until(
        &pair.a,
        [
            std::ffi::OsStr::new("logs"),
            "--duration".as_ref(),
            "60".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ],
        "log pipeline started",
    )
    .expect("start logs");
    let pid = child.pid().as_raw() as u32;
    assert_dropped(pid, "edgeproxy logs");
    pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for (i, port) in [PORT, 514].iter().cycle().take(100).enumerate() {
            s.send_to(
                format!("<14>1 - h app - - - m {i}").as_bytes(),
                (pair.a_v4, *port),
            )
            .expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(600));
    let out = stop_and_collect(child);
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    assert_eq!(summary["summary"]["counts"]["messages"], 100, "{summary}");
    assert_eq!(
        summary["summary"]["privileges"]["uid"], NOBODY,
        "the report says who it ran as: {summary}"
    );
    assert_eq!(summary["summary"]["privileges"]["capabilities"], "0");
    // The spool it created before the drop belongs to the user it writes as after.
    let meta = std::fs::metadata(&spool).expect("spool dir");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o700));
}

#[test]
fn proxy_drops_to_the_configured_user_and_still_forwards() {
    if !require_root("proxy_drops_to_the_configured_user_and_still_forwards") {
        return;
    }
    let ns = namespace().expect("namespace");
    let dir = ScratchDir::new().expect("scratch");
    let _up =
        Upstream::spawn(&ns, "10.200.0.1:7701".parse().expect("addr"), echo()).expect("upstream");
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        "[daemon]\nuser = \"nobody\"\n[[route]]\nlisten = \"10.200.0.1:443\"\nupstreams = [\"10.200.0.1:7701\"]\n",
    )
    .expect("config");
    // The stats file's directory must be writable by the user it drops to.
    let stats_dir = dir.path().join("run");
    std::fs::create_dir(&stats_dir).expect("stats dir");
    std::os::unix::fs::chown(&stats_dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    let stats = stats_dir.join("stats.json");
    let (proxy, _log) = try_start_edgeproxy_as_is_until(
        &ns,
        [
            std::ffi::OsStr::new("proxy"),
            "--json".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--stats-file".as_ref(),
            stats.as_os_str(),
        ],
        "TCP forwarding started",
    )
    .expect("start proxy");
    assert_dropped(proxy.pid().as_raw() as u32, "edgeproxy proxy");
    let mut c = connect(&ns, "10.200.0.1:443".parse().expect("addr")).expect("connect");
    c.write_all(b"hello").expect("write");
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).expect("echo");
    assert_eq!(&buf, b"hello");
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let (status, out) = try_stop_and_collect(proxy).expect("stop");
    assert!(status.success(), "{status}: {out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("report");
    assert_eq!(report["privileges"]["uid"], NOBODY, "{report}");
    assert_eq!(report["privileges"]["no_new_privs"], true, "{report}");
}

#[test]
fn by_default_a_root_daemon_drops_to_nobody_and_root_is_kept_only_when_asked() {
    if !require_root("by_default_a_root_daemon_drops_to_nobody_and_root_is_kept_only_when_asked") {
        return;
    }
    let dir = ScratchDir::new().expect("scratch");
    let bin = edgeproxy_testbed::edgeproxy_bin().expect("binary");
    let cfg = dir.file(
        "bad.toml",
        "[daemon]\nuser = \"no-such-user-edgeproxy\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n",
    );
    let out = std::process::Command::new(&bin)
        .args(["logs", "--duration", "1", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no user named \"no-such-user-edgeproxy\""),
        "{err}"
    );
    let cfg = dir.file(
        "plain.toml",
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[sink]]\nkind = \"stdout\"\n",
    );
    let summary = |extra: &[&str]| -> (serde_json::Value, String) {
        let out = std::process::Command::new(&bin)
            .args(["logs", "--duration", "0.3"])
            .args(extra)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v = serde_json::from_str(text.lines().last().expect("summary")).expect("json");
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // Nothing said: the default drops to nobody.
    let (v, err) = summary(&[]);
    assert_eq!(v["summary"]["privileges"]["uid"], NOBODY, "{v}");
    assert_eq!(v["summary"]["privileges"]["capabilities"], "0", "{v}");
    assert!(err.contains("dropped privileges"), "{err}");
    // Asked for root: root, said as such, no_new_privs still set.
    let (v, err) = summary(&["--user", "root"]);
    assert_eq!(v["summary"]["privileges"]["uid"], 0, "{v}");
    assert_eq!(v["summary"]["privileges"]["no_new_privs"], true, "{v}");
    assert!(err.contains("root, as asked"), "{err}");
}

#[test]
fn a_drop_that_leaves_the_stats_directory_unwritable_fails_the_start() {
    if !require_root("a_drop_that_leaves_the_stats_directory_unwritable_fails_the_start") {
        return;
    }
    let ns = namespace().expect("namespace");
    let dir = ScratchDir::new().expect("scratch");
    let cfg = dir.file(
        "proxy.toml",
        "[[route]]\nlisten = \"10.200.0.1:7702\"\nupstreams = [\"10.200.0.1:7703\"]\n",
    );
    // The scratch directory is root's: nobody cannot write the stats file there.
    let out = ns
        .command(edgeproxy_testbed::edgeproxy_bin().expect("binary"))
        .args(["proxy", "--duration", "5", "--config"])
        .arg(&cfg)
        .arg("--stats-file")
        .arg(dir.path().join("stats.json"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not writable") && err.contains("nobody"),
        "{err}"
    );
}

/// `edgeproxy run --ephemeral` on the pair's first interface, once it has attached.
fn spawn_run(pair: &VethPair, extra: &[&str]) -> edgeproxy_testbed::Reaped {
    let bin = edgeproxy_testbed::edgeproxy_bin().expect("binary");
    let mut child = edgeproxy_testbed::Reaped(Some(
        pair.a
            .command(&bin)
            .args(["run", "--ephemeral", "--iface", pair.a_if])
            .args(["--duration", "60", "--json"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn"),
    ));
    let (attached, lines) =
        edgeproxy_testbed::wait_for_line(child.0.as_mut().expect("child"), "XDP attached");
    assert!(attached, "{lines:?}");
    child
}

/// `run` keeps root (its maps need CAP_BPF) but only the capabilities it needs: every
/// thread's effective, permitted and bounding sets are exactly CAP_NET_BIND_SERVICE,
/// CAP_NET_ADMIN, CAP_IPC_LOCK, CAP_SYS_ADMIN, CAP_PERFMON and CAP_BPF, and it still
/// filters and counts.
#[test]
fn run_keeps_only_the_capabilities_it_needs() {
    if !require_root("run_keeps_only_the_capabilities_it_needs") {
        return;
    }
    use proxy_user::privileges::{Daemon, cap, needed};
    let pair = VethPair::create().expect("veth pair");
    let mut child = spawn_run(&pair, &[]);
    let want: u64 = needed(Daemon::Run).iter().map(|c| 1u64 << c).sum();
    assert_eq!(
        want,
        [
            cap::NET_BIND_SERVICE,
            cap::NET_ADMIN,
            cap::IPC_LOCK,
            cap::SYS_ADMIN,
            cap::PERFMON,
            cap::BPF
        ]
        .iter()
        .map(|c| 1u64 << c)
        .sum::<u64>()
    );
    let pid = child.pid().as_raw() as u32;
    for t in threads(pid) {
        assert_eq!(t.uids, vec![0; 4], "thread {}", t.tid);
        assert_eq!(
            (t.cap_effective, t.cap_permitted),
            (want, want),
            "thread {}: {:x}",
            t.tid,
            t.cap_effective
        );
        assert!(t.no_new_privs, "thread {}", t.tid);
    }
    let bounding = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapBnd");
    assert_eq!(bounding, want, "bounding set {bounding:x}");
    edgeproxy_testbed::traffic::send_udp(&pair.b, (pair.a_v4, 9999).into(), 100, 64).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = child.take().wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert_eq!(
        report["counters"]["classes"]["udp4"]["packets"], 100,
        "{report}"
    );
    println!("edgeproxy run: every thread uid 0 with CapEff = CapPrm = CapBnd = {want:x}");
}

/// With `--bpf-stats` (BPF_ENABLE_STATS is CAP_SYS_ADMIN's), `run` under the same set
/// reports the program's cost.
#[test]
fn run_with_bpf_stats_measures_under_the_same_capabilities() {
    if !require_root("run_with_bpf_stats_measures_under_the_same_capabilities") {
        return;
    }
    use proxy_user::privileges::{Daemon, needed};
    let pair = VethPair::create().expect("veth pair");
    let mut child = spawn_run(&pair, &["--bpf-stats"]);
    let want: u64 = needed(Daemon::Run).iter().map(|c| 1u64 << c).sum();
    for t in threads(child.pid().as_raw() as u32) {
        assert_eq!(t.cap_effective, want, "thread {}", t.tid);
    }
    // The statistics are switched on just after the attach is logged.
    std::thread::sleep(Duration::from_millis(500));
    edgeproxy_testbed::traffic::send_udp(&pair.b, (pair.a_v4, 9999).into(), 50, 64).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let out = child.take().wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert!(
        report["xdp_cost"]["run_count"].as_u64() >= Some(50),
        "measured: {report}"
    );
}

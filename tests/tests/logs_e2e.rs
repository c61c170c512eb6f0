//! `edgeproxy logs` with real clients: util-linux `logger` (RFC 5424 and RFC 3164 over
//! UDP, IPv4 and IPv6) and a duplicate-heavy sender of our own. Summed over windows the
//! counts must be exact: every message decoded in its format, counted under its key,
//! duplicates counted per message, and the kernel must have dropped nothing.
use std::{collections::HashMap, io::Read, net::UdpSocket};

use edgeproxy_testbed::{
    netns::VethPair, privilege::require_root, scratch::ScratchDir, start_edgeproxy, start_logs,
    stop_and_collect, tools,
};

const PORT: u16 = 5514;

/// `edgeproxy logs --config CFG` in `ns`, with its log to wait on.
fn start_logs_logged(
    ns: &edgeproxy_testbed::netns::Netns,
    cfg: &std::path::Path,
) -> (edgeproxy_testbed::Reaped, edgeproxy_testbed::LogLines) {
    edgeproxy_testbed::try_start_edgeproxy_logged(
        ns,
        [
            std::ffi::OsStr::new("logs"),
            "--duration".as_ref(),
            "60".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ],
    )
    .expect("start edgeproxy")
}

#[test]
fn logger_and_duplicates_are_counted_exactly_io_uring() {
    if require_root("logger_and_duplicates_are_counted_exactly_io_uring") {
        logger_and_duplicates("io_uring");
    }
}

#[test]
fn logger_and_duplicates_are_counted_exactly_epoll() {
    if require_root("logger_and_duplicates_are_counted_exactly_epoll") {
        logger_and_duplicates("epoll");
    }
}

fn logger_and_duplicates(engine: &str) {
    tools::run("logger", ["--version"])
        .expect("util-linux logger (cargo xtask test installs bsdutils)");
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let lines: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    let file = dir.file("lines.txt", &lines);

    let child = start_edgeproxy(
        &pair.a,
        [
            "logs",
            "--engine",
            engine,
            "--window",
            "1",
            "--duration",
            "60",
            "--listen",
            &format!("{}:{PORT}", pair.a_v4),
            "--listen",
            &format!("[{}]:{PORT}", pair.a_v6),
        ],
    );

    let logger = |server: String, proto: &str, tag: &str| {
        let out = pair
            .b
            .command("logger")
            .args([
                "--server",
                &server,
                "--port",
                &PORT.to_string(),
                "--udp",
                proto,
                "-t",
                tag,
                "-f",
            ])
            .arg(&file)
            .output()
            .expect("logger");
        assert!(
            out.status.success(),
            "logger: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    logger(pair.a_v4.to_string(), "--rfc5424", "app5424");
    logger(pair.a_v4.to_string(), "--rfc3164", "app3164");
    logger(pair.a_v6.to_string(), "--rfc5424", "app6");
    // Ten distinct messages, 200 times each, interleaved.
    pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..2000 {
            let msg = format!("<14>1 - sender dupapp - - - repeated message {}", i % 10);
            s.send_to(msg.as_bytes(), (pair.a_v4, PORT)).expect("send");
            if i % 32 == 31 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = stop_and_collect(child);

    let mut records = 0u64;
    let mut by_app: HashMap<String, u64> = HashMap::new();
    let mut dup: HashMap<String, u64> = HashMap::new();
    let mut summary = None;
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        if v.get("summary").is_some() {
            summary = Some(v["summary"].clone());
            continue;
        }
        records += v["records"].as_u64().expect("records");
        for k in v["keys"].as_array().expect("keys") {
            *by_app
                .entry(k["app"].as_str().unwrap_or("-").to_owned())
                .or_default() += k["count"].as_u64().expect("count");
        }
        for m in v["top_messages"].as_array().expect("top") {
            let text = m["message"].as_str().expect("message");
            if text.starts_with("repeated message") {
                *dup.entry(text.to_owned()).or_default() += m["count"].as_u64().expect("count");
            }
        }
    }
    let s = summary.expect("summary line");
    assert_eq!(s["kernel_drops"], 0, "{s}");
    assert_eq!(records, 5000, "every message in some window");
    assert_eq!(s["counts"]["messages"], 5000);
    assert_eq!(s["counts"]["rfc5424"], 4000);
    assert_eq!(s["counts"]["rfc3164"], 1000);
    assert_eq!(by_app.get("app5424"), Some(&1000));
    assert_eq!(by_app.get("app3164"), Some(&1000));
    assert_eq!(by_app.get("app6"), Some(&1000));
    assert_eq!(by_app.get("dupapp"), Some(&2000));
    assert_eq!(dup.len(), 10, "{dup:?}");
    assert!(
        dup.values().all(|&n| n == 200),
        "each duplicate counted 200 times: {dup:?}"
    );
    for w in s["workers"].as_array().expect("workers") {
        assert_eq!(w["engine"], engine);
    }
}

/// From a configuration file: windows go to a file sink that rotates by size, and every
/// record is in some file, exactly once.
#[test]
fn config_file_with_a_rotating_file_sink() {
    if !require_root("config_file_with_a_rotating_file_sink") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let out_path = dir.path().join("out/agg.jsonl");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[engine]\nkind = \"epoll\"\n[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = 0.2\nkey = [\"app\"]\n\
             [[sink]]\nkind = \"file\"\npath = \"{}\"\nrotate_bytes = 4096\nkeep = 1000\n",
            pair.a_v4,
            out_path.display()
        ),
    );
    let child = start_logs(&pair.a, &cfg);
    pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..3000 {
            let msg = format!("<14>1 - h app{} - - - message {i}", i % 3);
            s.send_to(msg.as_bytes(), (pair.a_v4, PORT)).expect("send");
            if i % 100 == 99 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(800));
    let out = stop_and_collect(child);
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    assert_eq!(summary["summary"]["sinks"][0]["failures"], 0);
    assert_eq!(summary["summary"]["counts"]["messages"], 3000);
    // Every rotated file plus the current one: all windows, each record once.
    let mut files = 0;
    let mut records = 0u64;
    for e in std::fs::read_dir(out_path.parent().expect("dir"))
        .expect("read dir")
        .flatten()
    {
        files += 1;
        for line in std::fs::read_to_string(e.path()).expect("read").lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            records += v["records"].as_u64().expect("records");
        }
    }
    assert_eq!(
        records, 3000,
        "every record in exactly one window in one file"
    );
    assert!(files > 1, "the sink rotated ({files} files)");
}

/// A TCP upstream that is down when traffic starts and comes up a second later: the
/// windows meanwhile are spooled on disk and replayed, in order, before newer ones.
#[test]
fn tcp_sink_outage_is_spooled_and_replayed_in_order_json() {
    if !require_root("tcp_sink_outage_is_spooled_and_replayed_in_order_json") {
        return;
    }
    tcp_sink_outage("json");
}

/// The same outage with RFC 5424 octet-counted output carrying both the raw messages and
/// the window reports: every message arrives once, in order, with its header fields and
/// the sender as `origin`, and each window report after its own raw messages.
#[test]
fn tcp_sink_outage_is_spooled_and_replayed_in_order_rfc5424() {
    if !require_root("tcp_sink_outage_is_spooled_and_replayed_in_order_rfc5424") {
        return;
    }
    tcp_sink_outage("rfc5424");
}

fn tcp_sink_outage(format: &str) {
    const UPSTREAM: u16 = 6514;
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let what = if format == "json" { "windows" } else { "both" };
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = 0.2\n\
             [[sink]]\nkind = \"tcp\"\naddress = \"{}:{UPSTREAM}\"\nspool_dir = \"{}\"\n\
             format = \"{format}\"\nwhat = \"{what}\"\n",
            pair.a_v4,
            pair.b_v4,
            dir.path().join("spool").display()
        ),
    );
    let child = start_logs(&pair.a, &cfg);
    let send = |from: u64, to: u64| {
        pair.b.run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            for i in from..to {
                s.send_to(
                    format!("<14>1 - h app - - - message {i}").as_bytes(),
                    (pair.a_v4, PORT),
                )
                .expect("send");
                if i % 50 == 49 {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        })
    };
    send(0, 1500); // upstream down: spooled
    std::thread::sleep(std::time::Duration::from_millis(500));
    let listener = pair
        .b
        .run(|| std::net::TcpListener::bind((pair.b_v4, UPSTREAM)).expect("listen"));
    let reader = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut bytes = Vec::new();
        conn.read_to_end(&mut bytes).expect("read upstream");
        bytes
    });
    send(1500, 3000); // upstream up: replay, then live
    std::thread::sleep(std::time::Duration::from_millis(800));
    let out = stop_and_collect(child);
    let bytes = reader.join().expect("reader");
    let mut windows: Vec<serde_json::Value> = Vec::new();
    let mut raw_seen: Vec<u64> = Vec::new();
    if format == "json" {
        for l in String::from_utf8(bytes).expect("utf-8").lines() {
            windows.push(serde_json::from_str(l).expect("JSON line"));
        }
    } else {
        use proxy_user::logs::{decode::decode, framing::Frames};
        let mut raw_before_window = 0u64;
        for f in Frames::new(&bytes, usize::MAX) {
            assert_eq!(f.truncated, 0);
            let r = decode(f.bytes, 0);
            assert_eq!(
                r.format.name(),
                "rfc5424",
                "{:?}",
                String::from_utf8_lossy(f.bytes)
            );
            if r.msgid == Some("window") {
                assert_eq!(r.app_name.as_deref(), Some("edgeproxy"));
                let w: serde_json::Value = serde_json::from_str(&r.message).expect("report");
                let before: u64 = windows
                    .iter()
                    .map(|w| w["records"].as_u64().expect("records"))
                    .sum();
                assert!(
                    raw_before_window >= before + w["records"].as_u64().expect("records"),
                    "a window report follows its raw messages"
                );
                windows.push(w);
                continue;
            }
            assert_eq!(
                (
                    r.facility,
                    r.severity,
                    r.hostname.as_deref(),
                    r.app_name.as_deref()
                ),
                (Some(1), Some(6), Some("h"), Some("app"))
            );
            assert_eq!(
                r.structured_data,
                Some(format!("[origin ip=\"{}\"]", pair.b_v4).as_str())
            );
            let n: u64 = r
                .message
                .strip_prefix("message ")
                .and_then(|n| n.parse().ok())
                .expect("message N");
            raw_seen.push(n);
            raw_before_window += 1;
        }
        assert_eq!(
            raw_seen,
            (0..3000).collect::<Vec<u64>>(),
            "every raw message once, in order"
        );
    }
    let mut records = 0u64;
    let mut last_start = i64::MIN;
    for v in &windows {
        records += v["records"].as_u64().expect("records");
        let start = v["window_start_ns"].as_i64().expect("start");
        assert!(start >= last_start, "windows arrive in order");
        last_start = start;
    }
    assert_eq!(records, 3000, "nothing lost across the outage");
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    let stats = &summary["summary"]["sinks"][0]["stats"];
    assert!(
        stats["taken"].as_u64().expect("taken") > 0,
        "the sink took batches: {stats}"
    );
    assert_eq!(
        stats["delivered"], stats["taken"],
        "everything taken was confirmed: {stats}"
    );
    assert_eq!(stats["pending"], 0, "{stats}");
    assert_eq!(stats["spool_dropped"], 0);
}

/// SIGHUP reloads: window length, key and sink change at a boundary, a listener is added
/// and another removed; every message sent to an open listener is counted exactly once,
/// and each window is keyed the way the configuration in force said.
#[test]
fn sighup_reload_changes_key_window_sink_and_listeners_without_loss() {
    if !require_root("sighup_reload_changes_key_window_sink_and_listeners_without_loss") {
        return;
    }
    const P1: u16 = 5530;
    const P2: u16 = 5531;
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let file_a = dir.path().join("a.jsonl");
    let file_b = dir.path().join("b.jsonl");
    let conf = |listeners: &[u16], key: &str, window: &str, sink: &std::path::Path| {
        let mut t = String::new();
        for p in listeners {
            t.push_str(&format!("[[listener]]\naddress = \"{}:{p}\"\n", pair.a_v4));
        }
        t.push_str(&format!("[window]\nseconds = {window}\nkey = [\"{key}\"]\n[[sink]]\nkind = \"file\"\npath = \"{}\"\n", sink.display()));
        t
    };
    let cfg = dir.file("edgeproxy.toml", &conf(&[P1], "app", "0.2", &file_a));
    let (child, log) = start_logs_logged(&pair.a, &cfg);
    let send = |port: u16, app: &str, n: u64| {
        pair.b.run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            for i in 0..n {
                s.send_to(
                    format!("<14>1 - h{port} {app} - - - m {i}").as_bytes(),
                    (pair.a_v4, port),
                )
                .expect("send");
                if i % 50 == 49 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
            }
        })
    };
    let hup = |text: String| {
        std::fs::write(&cfg, text).expect("write config");
        nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
        // The reload itself, not a guess of how long it takes on a loaded machine; then
        // past its boundary (at least 50 ms on, at the end of a window of ≤ 0.3 s).
        log.wait_for("configuration reloaded", std::time::Duration::from_secs(20))
            .expect("the configuration is reloaded");
        std::thread::sleep(std::time::Duration::from_millis(900));
    };
    send(P1, "alpha", 500);
    hup(conf(&[P1, P2], "host", "0.3", &file_b));
    send(P1, "beta", 500);
    send(P2, "beta", 500);
    hup(conf(&[P2], "host", "0.3", &file_b));
    send(P2, "gamma", 300);
    send(P1, "lost", 200); // no listener any more: refused by the kernel, never accepted
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = stop_and_collect(child);
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    assert_eq!(summary["summary"]["counts"]["messages"], 1800, "{summary}");
    let windows = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    };
    let (a, b) = (windows(&file_a), windows(&file_b));
    let records = |w: &[serde_json::Value]| {
        w.iter()
            .map(|v| v["records"].as_u64().expect("records"))
            .sum::<u64>()
    };
    assert_eq!(
        records(&a) + records(&b),
        1800,
        "every message in exactly one window of one sink"
    );
    assert_eq!(
        records(&a),
        500,
        "before the first reload everything went to sink A"
    );
    for v in &a {
        for k in v["keys"].as_array().expect("keys") {
            assert!(
                k["app"].is_string() && k["host"].is_null(),
                "keyed by app before the reload: {k}"
            );
        }
    }
    let mut hosts = std::collections::HashMap::new();
    for v in &b {
        for k in v["keys"].as_array().expect("keys") {
            assert!(
                k["host"].is_string() && k["app"].is_null(),
                "keyed by host after: {k}"
            );
            *hosts
                .entry(k["host"].as_str().expect("host").to_owned())
                .or_insert(0u64) += k["count"].as_u64().expect("count");
        }
    }
    assert_eq!(hosts.get(&format!("h{P1}")), Some(&500), "{hosts:?}");
    assert_eq!(hosts.get(&format!("h{P2}")), Some(&800), "{hosts:?}");
    // The summary keeps the counters of sinks that reloads replaced: their windows add
    // up to the windows written to the two files.
    let sinks = summary["summary"]["sinks"].as_array().expect("sinks");
    let windows_of = |p: &std::path::Path| -> u64 {
        sinks
            .iter()
            .filter(|s| s["sink"] == format!("file {}", p.display()))
            .map(|s| s["windows"].as_u64().expect("windows"))
            .sum()
    };
    assert_eq!(
        (windows_of(&file_a), windows_of(&file_b)),
        (a.len() as u64, b.len() as u64),
        "every sink generation in the summary: {sinks:?}"
    );
    assert_eq!(sinks.len(), 3, "one entry per generation: {sinks:?}");
}

/// The configuration file replaced by rename (as editors and config managers do) is
/// picked up without a signal.
#[test]
fn file_watch_reloads_a_replaced_configuration() {
    if !require_root("file_watch_reloads_a_replaced_configuration") {
        return;
    }
    const P: u16 = 5540;
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let conf = |key: &str| {
        format!(
            "[[listener]]\naddress = \"{}:{P}\"\n[window]\nseconds = 0.2\nkey = [\"{key}\"]\n",
            pair.a_v4
        )
    };
    let cfg = dir.file("edgeproxy.toml", &conf("app"));
    let (child, log) = start_logs_logged(&pair.a, &cfg);
    let tmp = dir.file("edgeproxy.toml.new", &conf("host"));
    std::fs::rename(&tmp, &cfg).expect("rename");
    // Wait for the reload itself (not a guess of how long it takes on a loaded machine),
    // then past its boundary: at least 50 ms on, at the end of a 0.2 s window.
    log.wait_for("configuration reloaded", std::time::Duration::from_secs(20))
        .expect("the rename is seen and the file reloaded");
    std::thread::sleep(std::time::Duration::from_millis(600));
    pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..100 {
            s.send_to(
                format!("<14>1 - hw app - - - m {i}").as_bytes(),
                (pair.a_v4, P),
            )
            .expect("send");
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = stop_and_collect(child);
    let mut keyed_by_host = 0;
    for line in out.lines().filter(|l| !l.contains("\"summary\"")) {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        for k in v["keys"].as_array().expect("keys") {
            assert!(
                k["host"].is_string() && k["app"].is_null(),
                "the new key is in force: {k}"
            );
            keyed_by_host += k["count"].as_u64().expect("count");
        }
    }
    assert_eq!(keyed_by_host, 100);
}

/// Both ingest paths at once: datagrams to one port are captured by the XDP program (and
/// dropped before any socket), datagrams to another arrive on a socket; edgeproxy logs
/// counts each exactly, tagged with the sender's address either way.
#[test]
fn captured_and_socket_datagrams_enter_the_same_pipeline() {
    if !require_root("captured_and_socket_datagrams_enter_the_same_pipeline") {
        return;
    }
    both_ingest_paths(false);
}

/// The same with one daemon: `edgeproxy run --config` attaches the data plane and runs
/// the log pipeline, whose workers drain the rings of the data plane it just loaded.
#[test]
fn run_with_logs_is_one_daemon_for_both_ingest_paths() {
    if !require_root("run_with_logs_is_one_daemon_for_both_ingest_paths") {
        return;
    }
    both_ingest_paths(true);
}

/// `n` datagrams from the far end of `pair`, `datagram(i)` naming each one's port and
/// text, paced (2 ms every 50) so no socket or ring overflows.
fn send_paced(pair: &VethPair, n: u64, datagram: impl Fn(u64) -> (u16, String) + Sync) {
    pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for i in 0..n {
            let (port, text) = datagram(i);
            s.send_to(text.as_bytes(), (pair.a_v4, port)).expect("send");
            if i % 50 == 49 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    });
}

fn both_ingest_paths(one_daemon: bool) {
    use edgeproxy_testbed::{policy_util, scratch::PinRoot};
    use proxy_user::dataplane::{Dataplane, HookChoice, LoadOptions};
    const CAP: u16 = 5600;
    const SOCK: u16 = 5601;
    let pair = VethPair::create().expect("veth pair");
    let root = PinRoot::new().expect("pin root");
    let dir = ScratchDir::new().expect("scratch");
    let pin_dir = root.path().join(pair.a_if);
    let policy = format!(
        "[[rule]]\nproto = \"udp\"\ndst_port = {CAP}\naction = \"capture\"\nthen = \"drop\"\n"
    );
    let mut _dp = None;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if one_daemon {
        let policy_file = dir.file("policy.toml", &policy);
        let cfg = dir.file(
            "edgeproxy.toml",
            &format!(
                "[[listener]]\naddress = \"{}:{SOCK}\"\n[window]\nseconds = 0.3\n",
                pair.a_v4
            ),
        );
        for a in [
            "run",
            "--iface",
            pair.a_if,
            "--ephemeral",
            "--duration",
            "60",
        ] {
            args.push(a.into());
        }
        args.extend(["--policy".into(), policy_file.into()]);
        args.extend(["--config".into(), cfg.into()]);
    } else {
        _dp = Some(pair.a.run(|| {
            let mut dp = Dataplane::load(LoadOptions {
                pin_dir: Some(pin_dir.clone()),
                ..LoadOptions::default()
            })
            .expect("load");
            policy_util::load(&mut policy_util::loader(&mut dp), &policy);
            dp.attach(pair.a_if, HookChoice::Native).expect("attach");
            dp
        }));
        for a in ["logs", "--window", "0.3", "--duration", "60"] {
            args.push(a.into());
        }
        args.extend(["--capture-from".into(), pin_dir.clone().into()]);
        args.extend(["--listen".into(), format!("{}:{SOCK}", pair.a_v4).into()]);
    }
    let child = start_edgeproxy(&pair.a, args);
    send_paced(&pair, 2000, |i| {
        let (port, app) = if i % 2 == 0 {
            (CAP, "cap")
        } else {
            (SOCK, "sock")
        };
        (port, format!("<14>1 - h {app} - - - m {i}"))
    });
    std::thread::sleep(std::time::Duration::from_millis(800));
    let out = stop_and_collect(child);
    let mut by_app: HashMap<String, u64> = HashMap::new();
    let mut summary = None;
    // `run` prints its own report after the pipeline's summary line.
    for line in out.lines() {
        if summary.is_some() {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        if v.get("summary").is_some() {
            summary = Some(v);
            continue;
        }
        for k in v["keys"].as_array().expect("keys") {
            *by_app
                .entry(k["app"].as_str().unwrap_or("-").to_owned())
                .or_default() += k["count"].as_u64().expect("count");
        }
    }
    let s = &summary.expect("summary")["summary"];
    assert_eq!(s["counts"]["captured"], 1000, "{s}");
    assert_eq!(s["counts"]["messages"], 2000, "{s}");
    assert_eq!(by_app.get("cap"), Some(&1000));
    assert_eq!(by_app.get("sock"), Some(&1000));
    for w in s["workers"].as_array().expect("workers") {
        assert_eq!(w["errors"], 0, "{w}");
    }
    if one_daemon {
        // The data plane's report follows, its record tally taken from the pipeline.
        let report = out.split_once("\"summary\"").map_or("", |(_, r)| r);
        assert!(
            report.contains("records pushed 1000 / drained 1000 /"),
            "the run report: {report}"
        );
    }
}

/// Raw routing: one file sink takes every message as a JSON line (`what = "raw"`), a
/// second takes raw lines and window reports (`what = "both"`). Each message appears
/// exactly once per raw sink with its decoded fields and sender, and in the `both` file
/// a window report never precedes the raw lines it counts. A third takes both as
/// traditional syslog text lines (`format = "text"`).
#[test]
fn raw_messages_are_routed_to_sinks_exactly_once() {
    if !require_root("raw_messages_are_routed_to_sinks_exactly_once") {
        return;
    }
    const N: u64 = 3000;
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let raw_path = dir.path().join("raw.jsonl");
    let both_path = dir.path().join("both.jsonl");
    let text_path = dir.path().join("both.log");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = 0.2\nkey = [\"app\"]\n\
             [[sink]]\nkind = \"file\"\nwhat = \"raw\"\npath = \"{}\"\n\
             [[sink]]\nkind = \"file\"\nwhat = \"both\"\npath = \"{}\"\n\
             [[sink]]\nkind = \"file\"\nwhat = \"both\"\nformat = \"text\"\npath = \"{}\"\n",
            pair.a_v4,
            raw_path.display(),
            both_path.display(),
            text_path.display()
        ),
    );
    let child = start_logs(&pair.a, &cfg);
    pair.b.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        // Pairs of messages per datagram (newline-framed), alternating RFC 5424 and 3164.
        for i in (0..N).step_by(2) {
            let d = format!(
                "<{}>1 2026-11-24T10:00:00Z h{} app{} 42 ID7 - raw {i}\n<13>Nov 24 10:00:00 bsd app3: raw {}",
                8 * 16 + (i % 8),
                i % 5,
                i % 3,
                i + 1
            );
            s.send_to(d.as_bytes(), (pair.a_v4, PORT)).expect("send");
            if i % 100 == 98 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(800));
    let out = stop_and_collect(child);
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("summary")).expect("json");
    let s = &summary["summary"];
    assert_eq!(s["counts"]["messages"], N, "{s}");
    for sink in s["sinks"].as_array().expect("sinks") {
        assert_eq!(sink["raw_lines"], N, "{sink}");
        assert_eq!(sink["failures"], 0, "{sink}");
    }
    assert_eq!(
        s["sinks"][0]["windows"], 0,
        "a raw-only sink takes no windows"
    );

    let check_raw = |v: &serde_json::Value, seen: &mut Vec<bool>| {
        let msg = v["msg"].as_str().expect("msg");
        let i: u64 = msg.strip_prefix("raw ").expect("raw i").parse().expect("i");
        assert!(!seen[i as usize], "message {i} twice");
        seen[i as usize] = true;
        assert_eq!(v["source"], pair.b_v4.to_string());
        assert_eq!(v["captured"], false);
        assert!(v["received_ns"].as_i64().expect("received_ns") > 0);
        if i.is_multiple_of(2) {
            assert_eq!(v["format"], "rfc5424", "{v}");
            assert_eq!(v["facility"], 16);
            assert_eq!(v["severity"], i % 8);
            assert_eq!(v["host"], format!("h{}", i % 5));
            assert_eq!(v["app"], format!("app{}", i % 3));
            assert_eq!(v["procid"], "42");
            assert_eq!(v["msgid"], "ID7");
            assert_eq!(v["ts_ns"], 1_795_514_400_000_000_000i64, "{v}");
        } else {
            assert_eq!(v["format"], "rfc3164", "{v}");
            assert_eq!(
                (v["facility"].clone(), v["severity"].clone()),
                (1.into(), 5.into())
            );
            assert_eq!(v["host"], "bsd");
            assert_eq!(v["app"], "app3");
        }
    };
    let mut seen = vec![false; N as usize];
    for line in std::fs::read_to_string(&raw_path)
        .expect("raw file")
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        check_raw(&v, &mut seen);
    }
    assert!(seen.iter().all(|&b| b), "every message in the raw sink");

    let mut seen = vec![false; N as usize];
    let (mut raw_before, mut counted, mut windows) = (0u64, 0u64, 0);
    for line in std::fs::read_to_string(&both_path)
        .expect("both file")
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        if v.get("msg").is_some() {
            check_raw(&v, &mut seen);
            raw_before += 1;
        } else {
            windows += 1;
            counted += v["records"].as_u64().expect("records");
            assert!(
                counted <= raw_before,
                "a window report ({counted} counted so far) came before its raw lines ({raw_before})"
            );
        }
    }
    assert!(seen.iter().all(|&b| b), "every message in the both sink");
    assert_eq!(counted, N);
    assert!(windows > 0);

    // Text lines: `TIMESTAMP HOST app[pid]: MSG`, window reports tagged edgeproxy[PID].
    let mut seen = vec![false; N as usize];
    let (mut raw_before, mut counted) = (0u64, 0u64);
    for line in std::fs::read_to_string(&text_path)
        .expect("text file")
        .lines()
    {
        let (time, rest) = line.split_once(' ').expect("timestamp");
        let (host, rest) = rest.split_once(' ').expect("host");
        let (tag, msg) = rest.split_once(": ").expect("tag");
        if let Some(report) = msg.strip_prefix("window ") {
            assert!(tag.starts_with("edgeproxy["), "{line}");
            let v: serde_json::Value = serde_json::from_str(report).expect("report JSON");
            counted += v["records"].as_u64().expect("records");
            assert!(counted <= raw_before, "a window line before its raw lines");
            continue;
        }
        let i: u64 = msg.strip_prefix("raw ").expect("raw i").parse().expect("i");
        assert!(!seen[i as usize], "message {i} twice in the text sink");
        seen[i as usize] = true;
        raw_before += 1;
        if i.is_multiple_of(2) {
            assert_eq!(time, "2026-11-24T10:00:00.000000Z", "{line}");
            assert_eq!(host, format!("h{}", i % 5), "{line}");
            assert_eq!(tag, format!("app{}[42]", i % 3), "{line}");
        } else {
            assert!(time.ends_with("-11-24T10:00:00.000000Z"), "{line}");
            assert_eq!((host, tag), ("bsd", "app3"), "{line}");
        }
    }
    assert!(seen.iter().all(|&b| b), "every message in the text sink");
    assert_eq!(counted, N);
}

/// A pinned data plane's record rings have one reader across processes (an flock on the
/// pin directory), so captured datagrams are never split between two of them: a `run`
/// that reads the rings, with or without its own pipeline, keeps `logs --capture-from`
/// from starting; `run --leave-records` says when nobody reads them and lets the
/// pipeline read every capture; a `run` started while a pipeline reads them leaves them
/// to it and takes them over when it stops; a pipeline whose data plane is detached
/// exits with an error.
#[test]
fn a_pinned_record_ring_has_one_reader_across_processes() {
    use edgeproxy_testbed::{scratch::PinRoot, try_start_edgeproxy_until};
    if !require_root("a_pinned_record_ring_has_one_reader_across_processes") {
        return;
    }
    const CAP: u16 = 5610;
    const SOCK: u16 = 5611;
    const N: u64 = 600;
    let pair = VethPair::create().expect("veth pair");
    let root = PinRoot::new().expect("pin root");
    let dir = ScratchDir::new().expect("scratch");
    let pin_dir = root.path().join(pair.a_if);
    let policy = dir.file(
        "policy.toml",
        &format!(
            "[[rule]]\nproto = \"udp\"\ndst_port = {CAP}\naction = \"capture\"\nthen = \"drop\"\n"
        ),
    );
    let run_args = |extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = ["run", "--iface", pair.a_if, "--json"]
            .into_iter()
            .map(Into::into)
            .collect();
        a.extend(["--pin-root".into(), root.path().into()]);
        a.extend(["--state-dir".into(), dir.path().join("state").into()]);
        a.extend(["--policy".into(), policy.clone().into()]);
        a.extend(["--duration".into(), "60".into()]);
        a.extend(extra.iter().map(Into::into));
        a
    };
    let logs_args = |seconds: &str| -> Vec<std::ffi::OsString> {
        vec![
            "logs".into(),
            "--window".into(),
            "0.3".into(),
            "--duration".into(),
            seconds.into(),
            "--capture-from".into(),
            pin_dir.clone().into(),
            "--listen".into(),
            format!("{}:{SOCK}", pair.a_v4).into(),
        ]
    };
    let send = || {
        send_paced(&pair, N, |i| (CAP, format!("<14>1 - h cap - - - m {i}")));
        std::thread::sleep(std::time::Duration::from_millis(800));
    };
    let captured = |out: &str| -> u64 {
        let summary = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v.get("summary").is_some())
            .expect("summary line");
        summary["summary"]["counts"]["captured"]
            .as_u64()
            .expect("captured")
    };
    let report =
        |out: &str| -> serde_json::Value { serde_json::from_str(out).expect("JSON report") };

    // 1. A `run` reads the rings: a pipeline in another process is refused, by name.
    let (run, _log) =
        try_start_edgeproxy_until(&pair.a, run_args(&[]), "reading the record rings").expect("run");
    let refused = pair
        .a
        .command(edgeproxy_testbed::edgeproxy_bin().expect("binary"))
        // Bounded: a second reader that wrongly starts ends by itself.
        .args(logs_args("3"))
        .output()
        .expect("logs");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a second reader started: {err}");
    assert!(err.contains("read by another process"), "{err}");
    send();
    let r = report(&stop_and_collect(run));
    assert_eq!(
        r["records"]["captures"], N,
        "the run read every capture: {r}"
    );

    // A `run` with its own log pipeline keeps the rings through its workers' split.
    let (run, _log) = try_start_edgeproxy_until(
        &pair.a,
        run_args(&["--listen", &format!("{}:{}", pair.a_v4, SOCK + 1)]),
        "log pipeline started",
    )
    .expect("run --listen");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let refused = pair
        .a
        .command(edgeproxy_testbed::edgeproxy_bin().expect("binary"))
        .args(logs_args("3"))
        .output()
        .expect("logs");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a second reader started beside a pipeline: {err}"
    );
    assert!(err.contains("read by another process"), "{err}");
    let (status, _) = edgeproxy_testbed::try_stop_and_collect(run).expect("stop");
    assert!(status.success());

    // 2. `run --leave-records`: it says so when nobody reads the rings (full rings pass
    // what they should capture); then the pipeline elsewhere reads every capture.
    let (run, log) = try_start_edgeproxy_until(
        &pair.a,
        run_args(&["--leave-records"]),
        "leaving the record rings",
    )
    .expect("run --leave-records");
    log.wait_for(
        "no process reads the record rings",
        std::time::Duration::from_secs(10),
    )
    .expect("the unread rings are reported");
    let logs = start_edgeproxy(&pair.a, logs_args("60"));
    send();
    assert_eq!(captured(&stop_and_collect(logs)), N);

    // 3. A `run` started while that pipeline reads them leaves them to it.
    let logs = start_edgeproxy(&pair.a, logs_args("60"));
    let r = report(&stop_and_collect(run));
    assert_eq!(
        r["records"]["total"], 0,
        "--leave-records read nothing: {r}"
    );
    let (run, log) = try_start_edgeproxy_until(
        &pair.a,
        run_args(&[]),
        "another process reads the record rings",
    )
    .expect("run beside a reader");
    send();
    assert_eq!(captured(&stop_and_collect(logs)), N);
    // 4. When that reader stops, the run takes the rings over and reads what follows.
    log.wait_for(
        "the other reader of the record rings is gone",
        std::time::Duration::from_secs(10),
    )
    .expect("the run takes the rings back");
    send();
    let r = report(&stop_and_collect(run));
    assert_eq!(r["records"]["captures"], N, "only what came after: {r}");
    assert_eq!(
        r["records"]["other_reader_drains"], 0,
        "a silent resync: {r}"
    );
    // The pinned counters span the runs: every datagram was captured once.
    assert_eq!(
        r["counters"]["stats"]["records_pushed"],
        4 * N,
        "the data plane captured them: {r}"
    );

    // 5. A pipeline reading another process's pinned rings stops, with an error, when
    // that data plane is detached (a new one would pin new rings it would never read).
    let (run, _log) = try_start_edgeproxy_until(
        &pair.a,
        run_args(&["--leave-records"]),
        "leaving the record rings",
    )
    .expect("run --leave-records");
    let (mut logs, log) =
        try_start_edgeproxy_until(&pair.a, logs_args("60"), "log pipeline started").expect("logs");
    let (status, out) = edgeproxy_testbed::try_stop_and_collect(run).expect("stop run");
    assert!(status.success(), "{out}");
    let detach = pair
        .a
        .command(edgeproxy_testbed::edgeproxy_bin().expect("binary"))
        .args(["detach", pair.a_if, "--pin-root"])
        .arg(root.path())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .expect("detach");
    assert!(detach.status.success(), "{detach:?}");
    log.wait_for(
        "was detached or pinned anew",
        std::time::Duration::from_secs(10),
    )
    .expect("the pipeline notices");
    let child = logs.0.as_mut().expect("child");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pipeline kept running"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success(), "it stops with an error");
}

//! `edgeproxy proxy` end to end, in a namespace per test: real sockets on both sides of
//! the proxy, upstream servers with scripted behaviour, the proxy's counters read from
//! its stats file. Covers the copy paths (buffers and splice), half-close, resets, retry
//! and ejection, limits, the balancing algorithms, health checks, PROXY v1/v2, reloads,
//! idle timeout, graceful drain and memory under a slow reader.
use std::{
    hash::Hasher as _,
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use edgeproxy_testbed::{
    LogLines, Reaped,
    netns::{Netns, VethPair},
    privilege::require_root,
    scratch::ScratchDir,
    tcp::{
        Handler, Upstream, connect, connect_from, echo, identify, namespace, read_line, read_some,
        rss_kib, start_proxy, upstream_stats, wait_stats,
    },
    try_stop_and_collect,
};
use proxy_user::tcp::proxy_protocol;
use rand::{RngCore, SeedableRng};

thread_local! {
    /// The engine this test thread runs edgeproxy on (set by the generated tests).
    static ENGINE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("io_uring") };
}

/// Every scenario runs on both engines: `NAME::io_uring` and `NAME::epoll`.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn io_uring() {
                super::ENGINE.set("io_uring");
                super::$name();
            }
            #[test]
            fn epoll() {
                super::ENGINE.set("epoll");
                super::$name();
            }
        }
    )*};
}

on_both_engines!(
    hundred_megabytes_each_way_buffers,
    hundred_megabytes_each_way_splice,
    half_close_and_resets_propagate_buffers,
    half_close_and_resets_propagate_splice,
    upstream_dying_mid_stream_ends_the_client_connection,
    refused_upstreams_are_retried_then_ejected,
    connect_timeout_moves_on_to_the_next_upstream,
    connection_limits_refuse_and_count,
    balancing_distributions_follow_each_algorithm,
    maglev_keeps_clients_when_an_upstream_is_removed,
    health_checks_eject_and_recover_an_upstream,
    proxy_protocol_is_sent_accepted_and_checked,
    reload_keeps_open_connections_on_their_upstream,
    reload_changes_the_copy_path_for_new_connections,
    idle_connections_are_closed_and_counted,
    sigterm_drains_open_connections_then_resets_at_the_deadline,
    a_second_sigterm_cuts_the_drain_short,
    a_dying_worker_drains_the_others_and_one_sigterm_cuts_that,
    slow_client_bounds_memory_buffers,
    slow_client_bounds_memory_splice,
    run_forwards_the_routes_of_its_configuration,
    zero_copy_falls_back_with_the_reason_and_require_refuses_to_start,
    send_buffers_are_fixed_for_peers_on_this_host_only,
    peers_on_this_host_get_local_congestion,
    bulk_transfers_make_waits_gather_splice,
    bulk_transfers_make_waits_poll_by_default,
    short_connections_ending_every_way_leave_nothing_open,
    admin_endpoint_serves_the_counters_to_a_scraper,
    routes_coming_and_going_under_traffic_leave_the_others_whole,
    busy_polling_forwards_whole_and_counts,
);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address literal")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

/// A namespace, a scratch directory and a running proxy on `config`.
struct Bed {
    ns: Netns,
    dir: ScratchDir,
    cfg: PathBuf,
    stats: PathBuf,
    proxy: Option<Reaped>,
    log: Option<LogLines>,
}

impl Bed {
    fn new() -> Self {
        Self::inside(namespace().expect("namespace"))
    }

    /// A bed whose proxy runs in `ns`.
    fn inside(ns: Netns) -> Self {
        let dir = ScratchDir::new().expect("scratch");
        let cfg = dir.path().join("proxy.toml");
        let stats = dir.path().join("stats.json");
        Self {
            ns,
            dir,
            cfg,
            stats,
            proxy: None,
            log: None,
        }
    }

    fn start(&mut self, config: &str, args: &[&str]) {
        self.start_with_env(config, args, &[]);
    }

    fn start_with_env(&mut self, config: &str, args: &[&str], env: &[(&str, &str)]) {
        let config = format!("[engine]\nkind = \"{}\"\n{config}", ENGINE.get());
        std::fs::write(&self.cfg, config).expect("write config");
        let (p, log) =
            start_proxy(&self.ns, &self.cfg, &self.stats, args, env).expect("start proxy");
        self.proxy = Some(p);
        self.log = Some(log);
    }

    /// Replaces the configuration file and waits for the reload to be logged.
    fn reload(&self, config: &str) {
        let tmp = self.dir.path().join("proxy.toml.new");
        let config = format!("[engine]\nkind = \"{}\"\n{config}", ENGINE.get());
        std::fs::write(&tmp, config).expect("write config");
        std::fs::rename(&tmp, &self.cfg).expect("replace config");
        self.log
            .as_ref()
            .expect("running")
            .wait_for("configuration reloaded", Duration::from_secs(10))
            .expect("reload logged");
    }

    fn upstream(&self, addr: &str, h: Handler) -> Upstream {
        Upstream::spawn(&self.ns, sa(addr), h).expect("upstream")
    }

    fn stats_when(&self, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        wait_stats(&self.stats, Duration::from_secs(10), ready).expect("stats")
    }

    /// The routes once `accepted` connections were accepted in all and none is open.
    fn settled(&self, accepted: u64) -> serde_json::Value {
        self.stats_when(|r| {
            r.as_array().is_some_and(|a| {
                a.iter().map(|r| num(r, "accepted")).sum::<u64>() == accepted
                    && a.iter().all(|r| num(r, "active") == 0)
            })
        })
    }

    /// SIGTERM; the final JSON report.
    fn stop(&mut self) -> serde_json::Value {
        let (status, out) =
            try_stop_and_collect(self.proxy.take().expect("running")).expect("stop");
        assert!(status.success(), "edgeproxy failed ({status}): {out}");
        let report: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("report {e}: {out}"));
        assert_eq!(report["engine"], ENGINE.get(), "the engine asked for");
        report
    }
}

fn route(listen: &str, upstreams: &[&str], extra: &str) -> String {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[route]]\nname = \"r\"\nlisten = \"{listen}\"\nupstreams = [{}]\n{extra}\n",
        ups.join(", ")
    )
}

fn copy_section(copy: &str) -> String {
    format!("[tcp]\ncopy = \"{copy}\"\n")
}

/// Sends `msg` through an echoing route and checks it comes back whole.
fn echoes(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, msg);
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

fn set_reset_on_close(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s.as_fd(), nix::sys::socket::sockopt::Linger, &l)
        .expect("SO_LINGER");
}

// --- 100 MB each way ------------------------------------------------------------------

const BIG: u64 = 100 * 1024 * 1024;

/// Writes `len` seeded random bytes to `w`; returns their digest.
fn send_random(w: &mut impl Write, seed: u64, len: u64) -> std::io::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        h.write(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(h.finish())
}

/// Reads `r` to EOF; returns (bytes, digest).
fn drain_digest(r: &mut impl Read) -> std::io::Result<(u64, u64)> {
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = read_some(r, &mut buf)?;
        if n == 0 {
            return Ok((total, h.finish()));
        }
        h.write(&buf[..n]);
        total += n as u64;
    }
}

fn hundred_megabytes_each_way(copy: &str) {
    let mut bed = Bed::new();
    let (tx, rx) = mpsc::channel::<(u64, u64, u64)>();
    let tx = Mutex::new(tx);
    // The upstream sends 100 MB while it receives 100 MB, then reports what it got.
    let _up = bed.upstream(
        "10.200.0.1:7001",
        Arc::new(move |s: TcpStream| {
            let mut w = s.try_clone().expect("clone");
            let sender = std::thread::spawn(move || {
                let d = send_random(&mut w, 2, BIG).expect("upstream send");
                w.shutdown(Shutdown::Write).expect("shutdown");
                d
            });
            let mut r = s;
            let (n, got) = drain_digest(&mut r).expect("upstream receive");
            let sent = sender.join().expect("sender");
            let _ = tx.lock().expect("lock").send((n, got, sent));
        }),
    );
    bed.start(
        &format!(
            "{}{}",
            copy_section(copy),
            route("10.200.0.1:7000", &["10.200.0.1:7001"], "")
        ),
        &[],
    );
    let started = Instant::now();
    let s = connect(&bed.ns, sa("10.200.0.1:7000")).expect("connect");
    let mut w = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let d = send_random(&mut w, 1, BIG).expect("client send");
        w.shutdown(Shutdown::Write).expect("shutdown");
        d
    });
    let mut r = s;
    let (down_n, down_digest) = drain_digest(&mut r).expect("client receive");
    let up_digest = sender.join().expect("sender");
    let (up_n, up_got, down_sent) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("upstream report");
    drop(r);
    println!(
        "{copy}: 100 MB each way in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!((up_n, down_n), (BIG, BIG), "byte counts");
    assert_eq!(up_got, up_digest, "client → upstream checksum");
    assert_eq!(down_digest, down_sent, "upstream → client checksum");
    let routes = bed.settled(1);
    let u = upstream_stats(&routes, "r", "10.200.0.1:7001").expect("upstream stats");
    assert_eq!(
        (num(u, "bytes_up"), num(u, "bytes_down")),
        (BIG, BIG),
        "{u}"
    );
    let report = bed.stop();
    assert_eq!(report["copy"], copy);
    // zero_copy is off (the default): no interface was probed for it.
    assert_eq!(report["zero_copy"], serde_json::json!([]), "{report}");
}

fn hundred_megabytes_each_way_buffers() {
    if require_root("hundred_megabytes_each_way_buffers") {
        hundred_megabytes_each_way("buffers");
    }
}

fn hundred_megabytes_each_way_splice() {
    if require_root("hundred_megabytes_each_way_splice") {
        hundred_megabytes_each_way("splice");
    }
}

// --- half-close and resets ------------------------------------------------------------

fn half_close_and_resets(copy: &str) {
    let mut bed = Bed::new();
    let (tx, rx) = mpsc::channel::<String>();
    let tx = Arc::new(Mutex::new(tx));
    let report = move |m: String| {
        let _ = tx.lock().expect("lock").send(m);
    };
    // 7101: reads to EOF, then answers with the count (client half-closed first).
    let _a = bed.upstream(
        "10.200.0.1:7101",
        Arc::new(|mut s: TcpStream| {
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read");
            s.write_all(format!("got {}", all.len()).as_bytes())
                .expect("write");
        }),
    );
    // 7102: sends 1 MB and half-closes first, then reads what the client sends after.
    let r2 = report.clone();
    let _b = bed.upstream(
        "10.200.0.1:7102",
        Arc::new(move |mut s: TcpStream| {
            s.write_all(&vec![7u8; 1 << 20]).expect("write");
            s.shutdown(Shutdown::Write).expect("shutdown");
            let mut all = Vec::new();
            let r = s.read_to_end(&mut all);
            r2(format!(
                "after eof {} {:?}",
                all.len(),
                r.err().map(|e| e.kind())
            ));
        }),
    );
    // 7103: reads 10 bytes, then resets.
    let _c = bed.upstream(
        "10.200.0.1:7103",
        Arc::new(|mut s: TcpStream| {
            let mut b = [0u8; 10];
            let _ = s.read_exact(&mut b);
            set_reset_on_close(&s);
        }),
    );
    // 7104: reads until an error; reports how it ended.
    let r4 = report.clone();
    let _d = bed.upstream(
        "10.200.0.1:7104",
        Arc::new(move |mut s: TcpStream| {
            let mut all = Vec::new();
            let r = s.read_to_end(&mut all);
            r4(format!("client end {:?}", r.err().map(|e| e.kind())));
        }),
    );
    // 7106 (IPv6): echo.
    let _e = bed.upstream("[::1]:7106", echo());
    let config = format!(
        "{}{}{}{}{}{}",
        copy_section(copy),
        route("10.200.0.1:7001", &["10.200.0.1:7101"], "name = \"a\"")
            .replace("name = \"r\"\n", ""),
        route("10.200.0.1:7002", &["10.200.0.1:7102"], "name = \"b\"")
            .replace("name = \"r\"\n", ""),
        route("10.200.0.1:7003", &["10.200.0.1:7103"], "name = \"c\"")
            .replace("name = \"r\"\n", ""),
        route("10.200.0.1:7004", &["10.200.0.1:7104"], "name = \"d\"")
            .replace("name = \"r\"\n", ""),
        route("[::1]:7006", &["[::1]:7106"], "name = \"e\"").replace("name = \"r\"\n", ""),
    );
    bed.start(&config, &[]);

    // Client half-closes first; the response still arrives, then EOF.
    let mut s = connect(&bed.ns, sa("10.200.0.1:7001")).expect("connect a");
    s.write_all(&vec![1u8; 1 << 20]).expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read answer");
    assert_eq!(answer, format!("got {}", 1 << 20));

    // Upstream half-closes first; the client still sends afterwards.
    let mut s = connect(&bed.ns, sa("10.200.0.1:7002")).expect("connect b");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to EOF");
    assert_eq!(got.len(), 1 << 20);
    s.write_all(&[9u8; 5000]).expect("write after EOF");
    s.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).expect("report"),
        "after eof 5000 None"
    );

    // The upstream resets: the client sees a reset, not an EOF.
    let mut s = connect(&bed.ns, sa("10.200.0.1:7003")).expect("connect c");
    s.write_all(b"0123456789").expect("write");
    let mut b = [0u8; 16];
    let e = read_some(&mut s, &mut b).expect_err("a reset, not data or EOF");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");

    // The client resets: the upstream sees a reset.
    let s = connect(&bed.ns, sa("10.200.0.1:7004")).expect("connect d");
    (&s).write_all(b"hello").expect("write");
    std::thread::sleep(Duration::from_millis(100));
    set_reset_on_close(&s);
    drop(s);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).expect("report"),
        "client end Some(ConnectionReset)"
    );

    // IPv6 on both sides.
    let mut s = connect(&bed.ns, sa("[::1]:7006")).expect("connect e");
    s.write_all(b"over v6").expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut back = String::new();
    s.read_to_string(&mut back).expect("read");
    assert_eq!(back, "over v6");

    let routes = bed.settled(5);
    let errs = |route: &str, up: &str| {
        upstream_stats(&routes, route, up).expect("upstream")["errors"].clone()
    };
    assert_eq!(
        errs("c", "10.200.0.1:7103")["upstream_reset"],
        1,
        "{routes}"
    );
    assert_eq!(errs("d", "10.200.0.1:7104")["client_reset"], 1, "{routes}");
    assert_eq!(
        errs("a", "10.200.0.1:7101"),
        serde_json::json!({}),
        "a clean close is no error"
    );
    assert_eq!(errs("b", "10.200.0.1:7102"), serde_json::json!({}));
    bed.stop();
}

fn half_close_and_resets_propagate_buffers() {
    if require_root("half_close_and_resets_propagate_buffers") {
        half_close_and_resets("buffers");
    }
}

fn half_close_and_resets_propagate_splice() {
    if require_root("half_close_and_resets_propagate_splice") {
        half_close_and_resets("splice");
    }
}

/// An upstream that goes away mid-stream (closes with unread data, as a killed process
/// does): the client's transfer ends with an error instead of hanging, and the proxy
/// holds nothing afterwards.
fn upstream_dying_mid_stream_ends_the_client_connection() {
    if !require_root("upstream_dying_mid_stream_ends_the_client_connection") {
        return;
    }
    let mut bed = Bed::new();
    let _up = bed.upstream(
        "10.200.0.1:7201",
        Arc::new(|mut s: TcpStream| {
            let mut b = vec![0u8; 1 << 20];
            let _ = s.read_exact(&mut b);
            // Dropped with the rest unread: the kernel answers with a reset.
        }),
    );
    bed.start(&route("10.200.0.1:7200", &["10.200.0.1:7201"], ""), &[]);
    let mut s = connect(&bed.ns, sa("10.200.0.1:7200")).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let started = Instant::now();
    let r = send_random(&mut s, 3, 200 << 20);
    assert!(r.is_err(), "200 MB went through a dead upstream");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the client hung"
    );
    drop(s);
    let routes = bed.settled(1);
    let u = upstream_stats(&routes, "r", "10.200.0.1:7201").expect("upstream");
    assert_eq!(num(u, "active"), 0);
    assert_eq!(u["errors"]["upstream_reset"], 1, "{u}");
    bed.stop();
}

// --- connect failures, retry, ejection, timeouts ---------------------------------------

fn refused_upstreams_are_retried_then_ejected() {
    if !require_root("refused_upstreams_are_retried_then_ejected") {
        return;
    }
    let mut bed = Bed::new();
    let _b = bed.upstream("10.200.0.1:7302", identify("b"));
    let config = format!(
        "{}{}",
        route(
            "10.200.0.1:7300",
            &["10.200.0.1:7301", "10.200.0.1:7302"],
            "eject_after = 2\neject_seconds = 60"
        ),
        route("10.200.0.1:7310", &["10.200.0.1:7311"], "")
            .replace("name = \"r\"", "name = \"dead\""),
    );
    bed.start(&config, &[]);
    for k in 0..10 {
        let mut s = connect(&bed.ns, sa("10.200.0.1:7300")).expect("connect");
        assert_eq!(read_line(&mut s).expect("id"), "b", "connection {k}");
    }
    // Nothing listens behind "dead": the client is reset, the reason counted.
    let mut s = connect(&bed.ns, sa("10.200.0.1:7310")).expect("connect");
    let mut b = [0u8; 4];
    assert!(
        matches!(read_some(&mut s, &mut b), Ok(0) | Err(_)),
        "no upstream: no data"
    );
    drop(s);
    let routes = bed.settled(11);
    let a = upstream_stats(&routes, "r", "10.200.0.1:7301").expect("a");
    let refused = a["errors"]["connect_refused"].as_u64().unwrap_or(0);
    // Two workers may each try before the ejection lands.
    assert!((2..=3).contains(&refused), "{a}");
    assert_eq!(a["healthy"], false, "{a}");
    assert_eq!(a["ejections"], 1, "{a}");
    let dead = routes
        .as_array()
        .expect("routes")
        .iter()
        .find(|r| r["name"] == "dead")
        .expect("dead");
    assert_eq!(dead["refused"]["no_upstream"], 1, "{dead}");
    bed.stop();
}

fn connect_timeout_moves_on_to_the_next_upstream() {
    if !require_root("connect_timeout_moves_on_to_the_next_upstream") {
        return;
    }
    let mut bed = Bed::new();
    // 10.200.1.0/24 leads into a veth whose peer has no address: ARP is never
    // answered, the SYN never leaves, connects can only time out.
    let n = bed.ns.name().to_owned();
    let ip_n = |args: &[&str]| {
        let mut all = vec!["-n", n.as_str()];
        all.extend_from_slice(args);
        edgeproxy_testbed::tools::run("ip", all).expect("ip");
    };
    ip_n(&["link", "add", "bh0", "type", "veth", "peer", "name", "bh1"]);
    ip_n(&["link", "set", "bh0", "up"]);
    ip_n(&["link", "set", "bh1", "up"]);
    ip_n(&["route", "add", "10.200.1.0/24", "dev", "bh0"]);
    let _ok = bed.upstream("10.200.0.1:7402", identify("ok"));
    bed.start(
        &route(
            "10.200.0.1:7400",
            &["10.200.1.2:80", "10.200.0.1:7402"],
            "connect_timeout = 0.2\neject_after = 0",
        ),
        &["--workers", "1"],
    );
    let started = Instant::now();
    for _ in 0..4 {
        let mut s = connect(&bed.ns, sa("10.200.0.1:7400")).expect("connect");
        assert_eq!(read_line(&mut s).expect("id"), "ok");
    }
    // Round robin sends 2 of 4 to the black hole first: two timeouts of 0.2 s.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let routes = bed.settled(4);
    let dead = upstream_stats(&routes, "r", "10.200.1.2:80").expect("dead");
    assert_eq!(dead["errors"]["connect_timeout"], 2, "{dead}");
    bed.stop();
}

// --- limits -----------------------------------------------------------------------------

fn connection_limits_refuse_and_count() {
    if !require_root("connection_limits_refuse_and_count") {
        return;
    }
    let mut bed = Bed::new();
    let _a = bed.upstream("10.200.0.1:7501", identify("a"));
    let _b = bed.upstream("10.200.0.1:7502", identify("b"));
    let config = format!(
        "{}[[route]]\nname = \"u\"\nlisten = \"10.200.0.1:7510\"\n[[route.upstream]]\naddress = \"10.200.0.1:7501\"\nmax_connections = 1\n[[route.upstream]]\naddress = \"10.200.0.1:7502\"\nmax_connections = 1\n",
        route(
            "10.200.0.1:7500",
            &["10.200.0.1:7501"],
            "max_connections = 3"
        ),
    );
    bed.start(&config, &[]);
    let refused = |bed: &Bed, addr: &str| {
        let mut s = connect(&bed.ns, sa(addr)).expect("connect");
        let mut b = [0u8; 4];
        match read_some(&mut s, &mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    // Route limit: three held, the fourth refused; one closes, a new one gets in.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = connect(&bed.ns, sa("10.200.0.1:7500")).expect("connect");
            assert_eq!(read_line(&mut s).expect("id"), "a");
            s
        })
        .collect();
    assert!(
        refused(&bed, "10.200.0.1:7500"),
        "a fourth connection got through"
    );
    held.pop();
    bed.stats_when(|r| num(&r[0], "active") == 2 && r[0]["refused"]["route_limit"] == 1);
    let mut s = connect(&bed.ns, sa("10.200.0.1:7500")).expect("connect");
    assert_eq!(read_line(&mut s).expect("id"), "a");
    // Upstream limits: one each, the third refused.
    let mut ids: Vec<String> = Vec::new();
    let mut held2 = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&bed.ns, sa("10.200.0.1:7510")).expect("connect");
        ids.push(read_line(&mut s).expect("id"));
        held2.push(s);
    }
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    assert!(
        refused(&bed, "10.200.0.1:7510"),
        "a third connection got through"
    );
    let routes = bed.stats_when(|r| {
        r.as_array().is_some_and(|a| {
            a.iter()
                .any(|r| r["name"] == "r" && r["refused"]["route_limit"] == 1)
                && a.iter()
                    .any(|r| r["name"] == "u" && r["refused"]["upstream_limit"] == 1)
        })
    });
    assert!(routes.is_array());
    drop((held, held2, s));
    bed.stop();
}

// --- balancing --------------------------------------------------------------------------

fn ids_of(bed: &Bed, listen: &str, n: usize, hold: bool) -> (Vec<String>, Vec<TcpStream>) {
    let mut ids = Vec::new();
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = connect(&bed.ns, sa(listen)).expect("connect");
        ids.push(read_line(&mut s).expect("id"));
        if hold {
            held.push(s);
        }
    }
    (ids, held)
}

fn count(ids: &[String], id: &str) -> usize {
    ids.iter().filter(|i| *i == id).count()
}

fn balancing_distributions_follow_each_algorithm() {
    if !require_root("balancing_distributions_follow_each_algorithm") {
        return;
    }
    let mut bed = Bed::new();
    let ups: Vec<Upstream> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, id)| bed.upstream(&format!("10.200.0.1:76{:02}", i + 1), identify(id)))
        .collect();
    let weighted = |name: &str, listen: &str, balance: &str, weights: &[u32]| {
        let mut s = format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbalance = \"{balance}\"\n"
        );
        for (i, w) in weights.iter().enumerate() {
            s += &format!(
                "[[route.upstream]]\naddress = \"10.200.0.1:76{:02}\"\nweight = {w}\n",
                i + 1
            );
        }
        s
    };
    let config = [
        weighted("rr", "10.200.0.1:7600", "round_robin", &[1, 2, 3]),
        weighted("lc", "10.200.0.1:7610", "least_conn", &[1, 1, 2]),
        weighted("mg", "10.200.0.1:7620", "maglev", &[1, 1, 1, 1]),
    ]
    .concat();
    // One worker: the per-worker balancer state is then the whole picture, so the
    // round-robin counts are exact.
    bed.start(&config, &["--workers", "1"]);

    let (ids, _) = ids_of(&bed, "10.200.0.1:7600", 60, false);
    assert_eq!(
        [count(&ids, "a"), count(&ids, "b"), count(&ids, "c")],
        [10, 20, 30],
        "round robin"
    );

    // Least connections with every connection held: loads stay proportional to weights.
    let (ids, held) = ids_of(&bed, "10.200.0.1:7610", 40, true);
    assert_eq!(
        [count(&ids, "a"), count(&ids, "b"), count(&ids, "c")],
        [10, 10, 20],
        "least conn"
    );
    drop(held);

    // Maglev: the same client address always lands on the same upstream; 200 addresses
    // spread over the four.
    let mut owner = std::collections::HashMap::new();
    for k in 0..200u32 {
        let from = ip(&format!("10.200.0.{}", 10 + k % 200));
        for _ in 0..2 {
            let mut s = connect_from(&bed.ns, from, sa("10.200.0.1:7620")).expect("connect");
            let id = read_line(&mut s).expect("id");
            let first = owner.entry(from).or_insert_with(|| id.clone());
            assert_eq!(*first, id, "client {from} moved");
        }
    }
    let shares: Vec<usize> = ["a", "b", "c", "d"]
        .iter()
        .map(|id| owner.values().filter(|v| v == id).count())
        .collect();
    println!("maglev shares of 200 clients: {shares:?}");
    assert!(shares.iter().all(|&s| (25..=75).contains(&s)), "{shares:?}");
    drop(ups);
    bed.stop();
}

/// Removing one of five upstreams by reload moves its clients and (almost) only them.
fn maglev_keeps_clients_when_an_upstream_is_removed() {
    if !require_root("maglev_keeps_clients_when_an_upstream_is_removed") {
        return;
    }
    let mut bed = Bed::new();
    let ids = ["a", "b", "c", "d", "e"];
    let _ups: Vec<Upstream> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| bed.upstream(&format!("10.200.0.1:77{:02}", i + 1), identify(id)))
        .collect();
    let config = |n: usize| {
        let addrs: Vec<String> = (0..n)
            .map(|i| format!("10.200.0.1:77{:02}", i + 1))
            .collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        route("10.200.0.1:7700", &refs, "balance = \"maglev\"")
    };
    bed.start(&config(5), &[]);
    let clients: Vec<IpAddr> = (0..240u32)
        .map(|k| ip(&format!("10.200.0.{}", 10 + k)))
        .collect();
    let map = |bed: &Bed| -> Vec<String> {
        clients
            .iter()
            .map(|&c| {
                let mut s = connect_from(&bed.ns, c, sa("10.200.0.1:7700")).expect("connect");
                read_line(&mut s).expect("id")
            })
            .collect()
    };
    let before = map(&bed);
    bed.reload(&config(4)); // "e" removed
    let after = map(&bed);
    let on_e = before.iter().filter(|i| *i == "e").count();
    let moved_needlessly = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b != "e" && b != a)
        .count();
    assert!(after.iter().all(|i| i != "e"));
    println!(
        "maglev reload 5 → 4: {on_e} of {} clients were on the removed upstream; {moved_needlessly} others moved",
        clients.len()
    );
    assert!(on_e > 0);
    assert!(
        moved_needlessly * 100 <= clients.len() * 3,
        "{moved_needlessly} moved needlessly"
    );
    bed.stop();
}

// --- health ------------------------------------------------------------------------------

fn health_checks_eject_and_recover_an_upstream() {
    if !require_root("health_checks_eject_and_recover_an_upstream") {
        return;
    }
    let mut bed = Bed::new();
    let _a = bed.upstream("10.200.0.1:7801", identify("a"));
    let b = bed.upstream("10.200.0.1:7802", identify("b"));
    bed.start(
        &route(
            "10.200.0.1:7800",
            &["10.200.0.1:7801", "10.200.0.1:7802"],
            "eject_after = 0\n[route.health]\ninterval = 0.1\ntimeout = 0.2\nrise = 2\nfall = 2",
        ),
        &["--workers", "1"],
    );
    let healthy = |routes: &serde_json::Value| {
        upstream_stats(routes, "r", "10.200.0.1:7802").map(|u| u["healthy"] == true)
    };
    let (ids, _) = ids_of(&bed, "10.200.0.1:7800", 10, false);
    assert_eq!(count(&ids, "b"), 5);
    drop(b); // b stops listening
    let t = Instant::now();
    bed.stats_when(|r| healthy(r) == Some(false));
    println!("down after {:?}", t.elapsed());
    let (ids, _) = ids_of(&bed, "10.200.0.1:7800", 10, false);
    assert_eq!(count(&ids, "a"), 10, "an ejected upstream got traffic");
    let _b = bed.upstream("10.200.0.1:7802", identify("b"));
    let t = Instant::now();
    bed.stats_when(|r| healthy(r) == Some(true));
    println!("up again after {:?}", t.elapsed());
    let (ids, _) = ids_of(&bed, "10.200.0.1:7800", 10, false);
    assert_eq!(count(&ids, "b"), 5, "a recovered upstream got no traffic");
    let routes = bed.settled(30);
    let u = upstream_stats(&routes, "r", "10.200.0.1:7802").expect("b");
    // Health checks took it out, so no client connect ever failed on it.
    assert_eq!(u["errors"], serde_json::json!({}), "{u}");
    bed.stop();
}

// --- PROXY protocol ------------------------------------------------------------------------

/// An upstream that reads a PROXY header (whatever its version), then reports its exact
/// bytes followed by the first payload bytes.
fn header_reporter(tx: mpsc::Sender<(Vec<u8>, Vec<u8>)>) -> Handler {
    let tx = Mutex::new(tx);
    Arc::new(move |mut s: TcpStream| {
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        let len = loop {
            if s.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            buf.push(b[0]);
            match proxy_protocol::parse(&buf) {
                Ok(proxy_protocol::Parsed::Header { len, .. }) => break len,
                Ok(proxy_protocol::Parsed::Incomplete) => {}
                Err(_) => return,
            }
        };
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let _ = tx.lock().expect("lock").send((buf[..len].to_vec(), rest));
    })
}

fn proxy_protocol_is_sent_accepted_and_checked() {
    if !require_root("proxy_protocol_is_sent_accepted_and_checked") {
        return;
    }
    let mut bed = Bed::new();
    let (tx, rx) = mpsc::channel();
    let _up = bed.upstream("10.200.0.1:7901", header_reporter(tx));
    let section = |name: &str, listen: &str, extra: &str| {
        route(listen, &["10.200.0.1:7901"], extra)
            .replace("name = \"r\"", &format!("name = \"{name}\""))
    };
    let config = [
        section("v1", "10.200.0.1:7910", "send_proxy = \"v1\""),
        section("v2", "10.200.0.1:7920", "send_proxy = \"v2\""),
        section(
            "chain",
            "10.200.0.1:7930",
            "accept_proxy = true\nsend_proxy = \"v2\"",
        ),
    ]
    .concat();
    bed.start(&config, &[]);
    let client = ip("10.200.0.77");

    for (listen, version) in [
        ("10.200.0.1:7910", proxy_protocol::Version::V1),
        ("10.200.0.1:7920", proxy_protocol::Version::V2),
    ] {
        let mut s = connect_from(&bed.ns, client, sa(listen)).expect("connect");
        let me = s.local_addr().expect("local");
        s.write_all(b"payload").expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let (header, rest) = rx.recv_timeout(Duration::from_secs(10)).expect("header");
        let mut want = Vec::new();
        proxy_protocol::encode(version, me, sa(listen), &mut want);
        assert_eq!(header, want, "{version:?} header bytes");
        if version == proxy_protocol::Version::V1 {
            assert_eq!(
                String::from_utf8_lossy(&header),
                format!(
                    "PROXY TCP4 10.200.0.77 10.200.0.1 {} {}\r\n",
                    me.port(),
                    sa(listen).port()
                )
            );
        }
        assert_eq!(rest, b"payload");
    }

    // Behind another proxy: its v1 and v2 headers are accepted and their source passed on.
    for version in [proxy_protocol::Version::V1, proxy_protocol::Version::V2] {
        let claimed = sa("10.200.9.9:5555");
        let mut s = connect(&bed.ns, sa("10.200.0.1:7930")).expect("connect");
        let mut hdr = Vec::new();
        proxy_protocol::encode(version, claimed, sa("10.200.0.1:7930"), &mut hdr);
        hdr.extend_from_slice(b"behind");
        s.write_all(&hdr).expect("write");
        s.shutdown(Shutdown::Write).expect("shutdown");
        let (header, rest) = rx.recv_timeout(Duration::from_secs(10)).expect("header");
        match proxy_protocol::parse(&header) {
            Ok(proxy_protocol::Parsed::Header {
                endpoints: Some(e),
                version: proxy_protocol::Version::V2,
                ..
            }) => {
                assert_eq!(e.source, claimed);
                assert_eq!(e.destination, sa("10.200.0.1:7930"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rest, b"behind", "{version:?}");
    }

    // Malformed and missing headers close the connection and are counted.
    for bad in [
        &b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n"[..],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = connect(&bed.ns, sa("10.200.0.1:7930")).expect("connect");
        s.write_all(bad).expect("write");
        let mut b = [0u8; 4];
        assert!(matches!(read_some(&mut s, &mut b), Ok(0) | Err(_)));
    }
    let routes = bed.stats_when(|r| {
        r.as_array().is_some_and(|a| {
            a.iter().any(|r| {
                r["name"] == "chain"
                    && r["refused"]["proxy_header_malformed"] == 1
                    && r["refused"]["proxy_header_missing"] == 1
            })
        })
    });
    assert!(routes.is_array());
    assert!(
        rx.try_recv().is_err(),
        "a refused connection reached the upstream"
    );
    bed.stop();
}

// --- many short connections, every way of ending ------------------------------------------

/// Half-closes at once, then reads the client's bytes to EOF.
fn fin_first() -> Handler {
    Arc::new(|mut s: TcpStream| {
        let _ = s.shutdown(Shutdown::Write);
        let _ = std::io::copy(&mut s, &mut std::io::sink());
    })
}

/// Reads once, then resets.
fn reset_after_first_read() -> Handler {
    Arc::new(|mut s: TcpStream| {
        let mut b = [0u8; 1000];
        let _ = s.read(&mut b);
        set_reset_on_close(&s);
    })
}

/// Closes without reading (what arrives later is answered with a reset).
fn close_unread() -> Handler {
    Arc::new(drop)
}

/// One client connection doing `action` on `route` (index into the routes below).
/// Returns an error message when an echo came back wrong.
fn short_connection(rng: &mut rand::rngs::StdRng, route: usize) -> Result<(), String> {
    use rand::Rng as _;
    let listen = sa(&format!("10.200.0.1:{}", 7601 + route));
    let mut s = edgeproxy_testbed::tcp::connect_here(ip("10.200.0.1"), listen)
        .map_err(|e| format!("connect to {listen}: {e}"))?;
    let mut payload = vec![0u8; rng.random_range(0..64 * 1024)];
    rng.fill_bytes(&mut payload);
    let chain = route == 4;
    let mut sent = Vec::new();
    if chain {
        if rng.random_range(0..4) == 0 {
            sent.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        } else {
            let version = if rng.random() {
                proxy_protocol::Version::V1
            } else {
                proxy_protocol::Version::V2
            };
            proxy_protocol::encode(version, sa("10.200.9.9:5555"), listen, &mut sent);
        }
    }
    sent.extend_from_slice(&payload);
    match rng.random_range(0..4) {
        // Sends, half-closes, reads to the end.
        0 | 1 => {
            let wrote = s.write_all(&sent).is_ok();
            let _ = s.shutdown(Shutdown::Write);
            let mut back = Vec::new();
            let read = s.read_to_end(&mut back);
            let valid_chain = chain && !sent.starts_with(b"GET");
            if route == 0 && (!wrote || read.is_err() || back != payload) {
                return Err(format!(
                    "echo route: wrote {wrote}, read {read:?}, {} of {} bytes back",
                    back.len(),
                    payload.len()
                ));
            }
            if valid_chain && read.is_ok() && !back.ends_with(&payload) {
                return Err(format!("chain route: {} bytes back", back.len()));
            }
        }
        // Sends, then resets.
        2 => {
            let _ = s.write_all(&sent);
            set_reset_on_close(&s);
        }
        // Connects and closes.
        _ => {}
    }
    Ok(())
}

/// Many short connections at once through routes whose clients and upstreams end in
/// every way (FIN first from either side, resets, closing unread, no data, bad PROXY
/// headers), on both copy paths (a reload switches midway): the proxy keeps running,
/// accepts every connection, ends every one, echoes come back whole, and it exits
/// cleanly. A worker panic on such a connection was found this way.
fn short_connections_ending_every_way_leave_nothing_open() {
    if !require_root("short_connections_ending_every_way_leave_nothing_open") {
        return;
    }
    const THREADS: u64 = 8;
    const EACH: u64 = 100;
    let seed: u64 = rand::random();
    eprintln!("short connections: seed {seed}");
    let mut bed = Bed::new();
    let _ups = [
        bed.upstream("10.200.0.1:7651", echo()),
        bed.upstream("10.200.0.1:7652", fin_first()),
        bed.upstream("10.200.0.1:7653", reset_after_first_read()),
        bed.upstream("10.200.0.1:7654", close_unread()),
    ];
    let routes = [
        ("echo", 7601, 7651, ""),
        ("fin_first", 7602, 7652, "send_proxy = \"v1\""),
        ("reset", 7603, 7653, "send_proxy = \"v2\""),
        ("close_unread", 7604, 7654, ""),
        (
            "chain",
            7605,
            7651,
            "accept_proxy = true\nsend_proxy = \"v2\"",
        ),
    ]
    .map(|(name, listen, up, extra)| {
        route(
            &format!("10.200.0.1:{listen}"),
            &[&format!("10.200.0.1:{up}")],
            extra,
        )
        .replace("name = \"r\"", &format!("name = \"{name}\""))
    })
    .concat();
    bed.start(&format!("{}{routes}", copy_section("splice")), &[]);
    let mut made = 0;
    for (phase, label) in ["splice", "splice, then buffers"].into_iter().enumerate() {
        let ns = &bed.ns;
        let clients = move || -> Vec<String> {
            ns.run(|| {
                std::thread::scope(|scope| {
                    let handles: Vec<_> = (0..THREADS)
                        .map(|t| {
                            scope.spawn(move || {
                                let mut rng = rand::rngs::StdRng::seed_from_u64(
                                    seed ^ (t + THREADS * phase as u64).wrapping_mul(0x9e37_79b9),
                                );
                                let mut failures = Vec::new();
                                for i in 0..EACH {
                                    let route = (i % 5) as usize;
                                    if let Err(e) = short_connection(&mut rng, route) {
                                        failures.push(format!("{label}, thread {t}, #{i}: {e}"));
                                    }
                                }
                                failures
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .flat_map(|h| h.join().expect("client thread"))
                        .collect()
                })
            })
        };
        let failures = std::thread::scope(|s| {
            let traffic = s.spawn(clients);
            if phase > 0 {
                // In the middle of the traffic: open connections keep their path.
                std::thread::sleep(Duration::from_millis(100));
                bed.reload(&format!("{}{routes}", copy_section("buffers")));
            }
            traffic.join().expect("clients")
        });
        assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
        made += THREADS * EACH;
    }
    let routes = wait_stats(&bed.stats, Duration::from_secs(20), |r| {
        r.as_array().is_some_and(|a| {
            a.iter().map(|r| num(r, "accepted")).sum::<u64>() == made
                && a.iter().all(|r| num(r, "active") == 0)
        })
    })
    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let refused_chain = routes
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "chain"))
        .map_or(0, |r| num(&r["refused"], "proxy_header_missing"));
    assert!(refused_chain > 0, "seed {seed}: bad headers were refused");
    let report = bed.stop();
    let workers = report["workers"].as_array().expect("workers");
    for w in workers {
        assert_eq!(num(w, "left_open"), 0, "seed {seed}: {w}");
    }
    let streams = |k| workers.iter().map(|w| num(w, k)).sum::<u64>();
    assert!(
        streams("splice_streams") > 0 && streams("buffer_streams") > 0,
        "both copy paths carried connections: {workers:?}"
    );
}

/// Ten reloads that add and remove a route while clients stream through another one
/// and keep trying the coming-and-going one: every connection of the kept route is
/// echoed whole, the other's connections are refused or whole (never cut), and nothing
/// is left open. Removed listeners give their slots to the re-added ones.
fn routes_coming_and_going_under_traffic_leave_the_others_whole() {
    if !require_root("routes_coming_and_going_under_traffic_leave_the_others_whole") {
        return;
    }
    let mut bed = Bed::new();
    let _up = bed.upstream("10.200.0.1:7751", echo());
    let kept = route("10.200.0.1:7701", &["10.200.0.1:7751"], "");
    let coming = route("10.200.0.1:7702", &["10.200.0.1:7751"], "")
        .replace("name = \"r\"", "name = \"coming\"");
    bed.start(&format!("{kept}{coming}"), &[]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let ns = &bed.ns;
    let (kept_done, failures) = std::thread::scope(|s| {
        let client = |port: u16, seed: u64| {
            let stop = &stop;
            s.spawn(move || {
                ns.run(|| {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    let (mut whole, mut failures) = (0u64, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Acquire) {
                        let to = sa(&format!("10.200.0.1:{port}"));
                        let Ok(mut c) = edgeproxy_testbed::tcp::connect_here(ip("10.200.0.1"), to)
                        else {
                            if port == 7701 {
                                failures.push(format!("{port}: connect refused"));
                            }
                            continue;
                        };
                        let mut payload = vec![0u8; 1 + (rng.next_u32() % 100_000) as usize];
                        rng.fill_bytes(&mut payload);
                        let wrote = c.write_all(&payload).is_ok();
                        let _ = c.shutdown(Shutdown::Write);
                        let mut back = Vec::new();
                        let read = c.read_to_end(&mut back);
                        if wrote && read.is_ok() && back == payload {
                            whole += 1;
                        } else if port == 7701 || !back.is_empty() {
                            // The kept route must never fail; the other may refuse a
                            // connection (its listener closing) but never cut one short.
                            failures.push(format!(
                                "{port}: wrote {wrote}, read {read:?}, {} of {} bytes",
                                back.len(),
                                payload.len()
                            ));
                        }
                    }
                    (whole, failures)
                })
            })
        };
        let kept_clients: Vec<_> = (0..3).map(|k| client(7701, k)).collect();
        let coming_client = client(7702, 99);
        for i in 0..10 {
            std::thread::sleep(Duration::from_millis(150));
            let config = if i % 2 == 0 {
                kept.clone()
            } else {
                format!("{kept}{coming}")
            };
            bed.reload(&config);
        }
        std::thread::sleep(Duration::from_millis(150));
        stop.store(true, std::sync::atomic::Ordering::Release);
        let mut kept_done = 0;
        let mut failures = Vec::new();
        for h in kept_clients {
            let (n, f) = h.join().expect("kept client");
            kept_done += n;
            failures.extend(f);
        }
        let (_, f) = coming_client.join().expect("coming client");
        failures.extend(f);
        (kept_done, failures)
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(kept_done > 0, "the kept route carried connections");
    let routes = bed.stats_when(|r| {
        r.as_array()
            .is_some_and(|a| a.iter().all(|r| num(r, "active") == 0))
    });
    let kept_stats = routes
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "r"))
        .expect("kept route");
    assert_eq!(num(kept_stats, "accepted"), kept_done, "{kept_stats}");
    let report = bed.stop();
    for w in report["workers"].as_array().expect("workers") {
        assert_eq!(num(w, "left_open"), 0, "{w}");
    }
}

// --- admin endpoint ---------------------------------------------------------------------

/// One HTTP/1.1 request to the admin endpoint inside `ns`: (status line, body).
fn admin_get(ns: &Netns, addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = connect(ns, addr).expect("connect to the admin endpoint");
    s.write_all(request.as_bytes()).expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let (head, body) = out.split_once("\r\n\r\n").expect("a response head");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the one sample named `series` (name and labels) in a scrape.
fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `--admin`: a Prometheus scrape shows the connection just made (accepted, bytes both
/// ways, its connect latency), /healthz answers, and an address the host does not have
/// fails the start with the reason.
fn admin_endpoint_serves_the_counters_to_a_scraper() {
    if !require_root("admin_endpoint_serves_the_counters_to_a_scraper") {
        return;
    }
    let mut bed = Bed::new();
    let _up = bed.upstream("10.200.0.1:7981", echo());
    bed.start(
        &route("10.200.0.1:7980", &["10.200.0.1:7981"], ""),
        &["--admin", "10.200.0.1:7990"],
    );
    let admin = sa("10.200.0.1:7990");
    let mut c = connect(&bed.ns, sa("10.200.0.1:7980")).expect("connect");
    echoes(&mut c, &[3u8; 5000]);
    drop(c);
    bed.settled(1);
    // Workers publish their own counters every sweep (100 ms): the connection shows there
    // too, summed over the workers' CPUs.
    let summed = |body: &str, name: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body) = admin_get(&bed.ns, admin, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        if summed(&body, "edgeproxy_tcp_worker_connections_total{") == 1
            || Instant::now() > deadline
        {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        summed(&body, "edgeproxy_tcp_worker_connections_total{"),
        1,
        "{body}"
    );
    assert_eq!(
        summed(&body, "edgeproxy_tcp_worker_streams_total{"),
        1,
        "one stream, on whichever copy path"
    );
    let route = r#"{route="r",listen="10.200.0.1:7980"}"#;
    let up = r#"route="r",upstream="10.200.0.1:7981""#;
    assert_eq!(
        sample(&body, &format!("edgeproxy_tcp_route_accepted_total{route}")),
        Some(1),
        "{body}"
    );
    assert_eq!(
        sample(&body, &format!("edgeproxy_tcp_route_active{route}")),
        Some(0)
    );
    for direction in ["up", "down"] {
        assert_eq!(
            sample(
                &body,
                &format!("edgeproxy_tcp_upstream_bytes_total{{{up},direction=\"{direction}\"}}")
            ),
            Some(5000),
            "{direction}"
        );
    }
    assert_eq!(
        sample(
            &body,
            &format!("edgeproxy_tcp_upstream_connect_seconds_count{{{up}}}")
        ),
        Some(1)
    );
    assert_eq!(
        sample(
            &body,
            &format!("edgeproxy_tcp_upstream_connect_seconds_bucket{{{up},le=\"+Inf\"}}")
        ),
        Some(1)
    );
    assert_eq!(
        admin_get(&bed.ns, admin, "GET /healthz HTTP/1.1\r\n\r\n"),
        ("HTTP/1.1 200 OK".to_string(), "ok\n".to_string())
    );
    let (status, _) = admin_get(&bed.ns, admin, "GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    bed.stop();

    // An address this host does not have: no start, and the reason.
    let out = bed
        .ns
        .command(edgeproxy_testbed::edgeproxy_bin().expect("binary"))
        .args([
            "proxy",
            "--admin",
            "10.200.99.99:7990",
            "--duration",
            "5",
            "--config",
        ])
        .arg(&bed.cfg)
        .output()
        .expect("run edgeproxy proxy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("admin endpoint: binding 10.200.99.99:7990"),
        "{err}"
    );
}

// --- lifecycle: reload, idle, drain, memory ------------------------------------------------

fn reload_keeps_open_connections_on_their_upstream() {
    if !require_root("reload_keeps_open_connections_on_their_upstream") {
        return;
    }
    let mut bed = Bed::new();
    let a = bed.upstream("10.200.0.1:8001", identify("a"));
    let _b = bed.upstream("10.200.0.1:8002", identify("b"));
    bed.start(&route("10.200.0.1:8000", &["10.200.0.1:8001"], ""), &[]);
    let mut old = connect(&bed.ns, sa("10.200.0.1:8000")).expect("connect");
    assert_eq!(read_line(&mut old).expect("id"), "a");
    bed.reload(&route("10.200.0.1:8000", &["10.200.0.1:8002"], ""));
    let mut new = connect(&bed.ns, sa("10.200.0.1:8000")).expect("connect");
    assert_eq!(read_line(&mut new).expect("id"), "b");
    // The old connection still talks to a.
    old.write_all(b"still a").expect("write");
    let mut back = [0u8; 7];
    old.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"still a");
    assert_eq!(a.accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
    drop((old, new));
    bed.stop();
}

/// A reload changing `[tcp] copy` moves new connections to the new path (the buffer pool
/// is created then) while the open one keeps streaming through its pipes.
fn reload_changes_the_copy_path_for_new_connections() {
    if !require_root("reload_changes_the_copy_path_for_new_connections") {
        return;
    }
    let mut bed = Bed::new();
    let _up = bed.upstream("10.200.0.1:8011", echo());
    let routes = route("10.200.0.1:8010", &["10.200.0.1:8011"], "");
    bed.start(
        &format!("{}{routes}", copy_section("splice")),
        &["--workers", "1"],
    );
    let mut old = connect(&bed.ns, sa("10.200.0.1:8010")).expect("connect");
    echoes(&mut old, b"through pipes");
    bed.reload(&format!("{}{routes}", copy_section("buffers")));
    let mut new = connect(&bed.ns, sa("10.200.0.1:8010")).expect("connect");
    echoes(&mut new, b"through pooled buffers");
    echoes(&mut old, b"still through pipes");
    drop((old, new));
    bed.settled(2);
    let report = bed.stop();
    let w = &report["workers"][0];
    assert_eq!(
        (num(w, "splice_streams"), num(w, "buffer_streams")),
        (1, 1),
        "{w}"
    );
    // Round trips of a few bytes never make a wait gather completions.
    assert_eq!(num(w, "gathering_waits"), 0, "{w}");
}

fn idle_connections_are_closed_and_counted() {
    if !require_root("idle_connections_are_closed_and_counted") {
        return;
    }
    let mut bed = Bed::new();
    let _a = bed.upstream("10.200.0.1:8101", identify("a"));
    bed.start(
        &route(
            "10.200.0.1:8100",
            &["10.200.0.1:8101"],
            "idle_timeout = 0.3",
        ),
        &[],
    );
    let mut s = connect(&bed.ns, sa("10.200.0.1:8100")).expect("connect");
    assert_eq!(read_line(&mut s).expect("id"), "a");
    let t = Instant::now();
    let mut b = [0u8; 4];
    assert_eq!(read_some(&mut s, &mut b).expect("EOF"), 0);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    drop(s);
    let routes = bed.settled(1);
    assert_eq!(
        upstream_stats(&routes, "r", "10.200.0.1:8101").expect("a")["errors"]["idle_timeout"],
        1
    );
    bed.stop();
}

fn sigterm_drains_open_connections_then_resets_at_the_deadline() {
    if !require_root("sigterm_drains_open_connections_then_resets_at_the_deadline") {
        return;
    }
    let mut bed = Bed::new();
    let _a = bed.upstream("10.200.0.1:8201", echo());
    bed.start(
        &format!(
            "[tcp]\ndrain_seconds = 1.5\n{}",
            route("10.200.0.1:8200", &["10.200.0.1:8201"], "")
        ),
        &["--admin", "10.200.0.1:8290"],
    );
    let admin = sa("10.200.0.1:8290");
    let get = |path: &str| admin_get(&bed.ns, admin, &format!("GET {path} HTTP/1.1\r\n\r\n"));
    assert_eq!(
        get("/ready"),
        ("HTTP/1.1 200 OK".to_string(), "ready\n".to_string())
    );
    let mut finishing = connect(&bed.ns, sa("10.200.0.1:8200")).expect("connect");
    let mut lingering = connect(&bed.ns, sa("10.200.0.1:8200")).expect("connect");
    for s in [&mut finishing, &mut lingering] {
        s.write_all(b"ping").expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).expect("echo");
    }
    let mut proxy = bed.proxy.take().expect("running");
    nix::sys::signal::kill(proxy.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    // No new connections…
    assert!(
        connect(&bed.ns, sa("10.200.0.1:8200")).is_err(),
        "accepted while draining"
    );
    // …the admin endpoint still answers: not ready, and the drain in the counters.
    assert_eq!(
        get("/ready"),
        (
            "HTTP/1.1 503 Service Unavailable".to_string(),
            "draining\n".to_string()
        )
    );
    let (status, body) = get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        sample(
            &body,
            r#"edgeproxy_tcp_route_active{route="r",listen="10.200.0.1:8200"}"#
        ),
        Some(2),
        "{body}"
    );
    for (phase, want) in [("serving", 0), ("draining", 1)] {
        assert_eq!(
            sample(&body, &format!("edgeproxy_tcp_phase{{phase=\"{phase}\"}}")),
            Some(want),
            "{body}"
        );
    }
    // …but open ones keep working and finish normally.
    finishing.write_all(b"still").expect("write while draining");
    let mut b = [0u8; 5];
    finishing.read_exact(&mut b).expect("echo while draining");
    finishing.shutdown(Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    finishing.read_to_end(&mut rest).expect("clean EOF");
    // The other one never ends by itself: reset at the deadline.
    let e = read_some(&mut lingering, &mut b).expect_err("reset at the deadline");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    let at = t.elapsed();
    assert!(
        at >= Duration::from_millis(1400) && at < Duration::from_secs(4),
        "reset after {at:?}"
    );
    let child = proxy.take();
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    let u = &report["routes"][0]["upstreams"][0];
    assert_eq!(u["errors"]["drain_deadline"], 1, "{u}");
    assert_eq!(u["connections"], 2);
}

/// A second SIGTERM during a long drain resets what is still open at once (counted as
/// a drain deadline) and the daemon exits cleanly, instead of waiting out the deadline.
fn a_second_sigterm_cuts_the_drain_short() {
    if !require_root("a_second_sigterm_cuts_the_drain_short") {
        return;
    }
    let mut bed = Bed::new();
    let _a = bed.upstream("10.200.0.1:8221", echo());
    bed.start(
        &format!(
            "[tcp]\ndrain_seconds = 60\n{}",
            route("10.200.0.1:8220", &["10.200.0.1:8221"], "")
        ),
        &[],
    );
    let mut lingering = connect(&bed.ns, sa("10.200.0.1:8220")).expect("connect");
    echoes(&mut lingering, b"ping");
    let mut proxy = bed.proxy.take().expect("running");
    nix::sys::signal::kill(proxy.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    std::thread::sleep(Duration::from_millis(300));
    // Draining, and the open connection still works…
    echoes(&mut lingering, b"still");
    // …until the second signal.
    nix::sys::signal::kill(proxy.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let t = Instant::now();
    let mut b = [0u8; 1];
    let e = read_some(&mut lingering, &mut b).expect_err("reset by the second signal");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let out = proxy.take().wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    let u = &report["routes"][0]["upstreams"][0];
    assert_eq!(u["errors"]["drain_deadline"], 1, "{u}");
}

/// A worker that dies makes the others drain, and the daemon then exits with an error
/// (for its supervisor to restart it). The daemon began that drain itself, so the first
/// SIGTERM during it cuts it; before, it took two. The worker panics on purpose: debug
/// builds (these tests run them) read `EDGEPROXY_FAULT_PANIC_WORKER_SECS`.
fn a_dying_worker_drains_the_others_and_one_sigterm_cuts_that() {
    if !require_root("a_dying_worker_drains_the_others_and_one_sigterm_cuts_that") {
        return;
    }
    let mut bed = Bed::new();
    let _a = bed.upstream("10.200.0.1:8231", echo());
    bed.start_with_env(
        &format!(
            "[tcp]\ndrain_seconds = 60\n{}",
            route("10.200.0.1:8230", &["10.200.0.1:8231"], "")
        ),
        &["--workers", "2"],
        &[("EDGEPROXY_FAULT_PANIC_WORKER_SECS", "1")],
    );
    // Each connection is hashed to one worker's listener: 16 land on both but for
    // one chance in 2^15.
    let conns: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut c = connect(&bed.ns, sa("10.200.0.1:8230")).expect("connect");
            echoes(&mut c, b"ping");
            c
        })
        .collect();
    let log = bed.log.as_ref().expect("running");
    log.wait_for("the other workers drain", Duration::from_secs(10))
        .expect("the first worker panicked");
    // The dead worker's connections were closed; the others still work, draining.
    let mut alive: Vec<TcpStream> = conns
        .into_iter()
        .filter_map(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            c.write_all(b"still").ok()?;
            let mut back = [0u8; 5];
            c.read_exact(&mut back).ok()?;
            (&back == b"still").then_some(c)
        })
        .collect();
    let survivors = alive.len();
    assert!(
        (1..16).contains(&survivors),
        "{survivors} of 16 connections outlived their worker"
    );
    let mut proxy = bed.proxy.take().expect("running");
    nix::sys::signal::kill(proxy.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let t = Instant::now();
    for c in &mut alive {
        let e = read_some(c, &mut [0u8; 1]).expect_err("reset by the one signal");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let out = proxy.take().wait_with_output().expect("wait");
    assert!(!out.status.success(), "a worker died: {}", out.status);
}

/// A client that reads slowly while its upstream writes as fast as it can: the proxy
/// stops reading from the upstream (bytes in flight stay bounded by socket buffers) and
/// its memory does not grow with the transfer.
fn slow_client(copy: &str) {
    let mut bed = Bed::new();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let _up = bed.upstream(
        "10.200.0.1:8301",
        Arc::new(move |mut s: TcpStream| {
            let chunk = vec![5u8; 64 * 1024];
            while s.write_all(&chunk).is_ok() {
                counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }),
    );
    bed.start(
        &format!(
            "[tcp]\ncopy = \"{copy}\"\nbuffers = 256\nbuffer_size = 16384\n{}",
            route("10.200.0.1:8300", &["10.200.0.1:8301"], "")
        ),
        &[],
    );
    let pid = bed.proxy.as_ref().expect("running").pid().as_raw();
    let mut s = connect(&bed.ns, sa("10.200.0.1:8300")).expect("connect");
    let mut buf = vec![0u8; 64 * 1024];
    s.read_exact(&mut buf).expect("first bytes");
    let rss_start = rss_kib(pid).expect("rss");
    let mut read = buf.len() as u64;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        read += read_some(&mut s, &mut buf).expect("read") as u64;
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_end = rss_kib(pid).expect("rss");
    let in_flight = sent
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(read);
    println!(
        "{copy}: client read {} KiB in 3 s; upstream got {} KiB out; in flight {} KiB; proxy RSS {} → {} KiB",
        read / 1024,
        sent.load(std::sync::atomic::Ordering::Relaxed) / 1024,
        in_flight / 1024,
        rss_start,
        rss_end
    );
    // Socket buffers on both hops (tcp_rmem/tcp_wmem maxima) are the only slack.
    assert!(
        in_flight < 48 << 20,
        "{in_flight} bytes in flight: no backpressure"
    );
    // 256 buffers × 16 KiB per worker is the most the copy path can touch.
    assert!(
        rss_end < rss_start + 2 * 4096 + 8192,
        "RSS {rss_start} → {rss_end} KiB"
    );
    drop(s);
    bed.stop();
}

fn slow_client_bounds_memory_buffers() {
    if require_root("slow_client_bounds_memory_buffers") {
        slow_client("buffers");
    }
}

fn slow_client_bounds_memory_splice() {
    if require_root("slow_client_bounds_memory_splice") {
        slow_client("splice");
    }
}

/// One daemon: `edgeproxy run --config` with `[[route]]`s forwards them beside the data
/// plane and the log pipeline, follows a reload that adds a route (warning that a
/// changed buffer size needs a restart), and its report carries the TCP summary.
fn run_forwards_the_routes_of_its_configuration() {
    if !require_root("run_forwards_the_routes_of_its_configuration") {
        return;
    }
    let bed = Bed::new();
    let _a = bed.upstream("10.200.0.1:8301", echo());
    let _b = bed.upstream("10.200.0.1:8303", echo());
    let logs = bed.dir.path().join("windows.jsonl");
    let base = format!(
        "[engine]\nkind = \"{}\"\ndata_cpus = [0]\n[[listener]]\naddress = \"10.200.0.1:8514\"\n\
         [[sink]]\nkind = \"file\"\npath = \"{}\"\n",
        ENGINE.get(),
        logs.display()
    );
    let first = format!(
        "{base}{}",
        route("10.200.0.1:8300", &["10.200.0.1:8301"], "")
    );
    std::fs::write(&bed.cfg, &first).expect("config");
    let (child, log) = edgeproxy_testbed::try_start_edgeproxy_until(
        &bed.ns,
        [
            std::ffi::OsStr::new("run"),
            "--ephemeral".as_ref(),
            "--iface".as_ref(),
            "lo".as_ref(),
            "--json".as_ref(),
            "--config".as_ref(),
            bed.cfg.as_os_str(),
            "--stats-file".as_ref(),
            bed.stats.as_os_str(),
        ],
        "TCP forwarding started",
    )
    .expect("edgeproxy run with routes");
    let exchange = |addr: &str, msg: &[u8]| {
        let mut s = connect(&bed.ns, sa(addr)).expect("connect through run");
        s.write_all(msg).expect("write");
        s.shutdown(Shutdown::Write).expect("half-close");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read to EOF");
        assert_eq!(back, msg, "echoed through {addr}");
    };
    exchange("10.200.0.1:8300", b"through the one daemon");
    // The live counters, as with `edgeproxy proxy --stats-file`.
    bed.settled(1);

    let tmp = bed.dir.path().join("proxy.toml.new");
    let second = format!(
        "[tcp]\nbuffer_size = 16384\n{first}{}",
        route("10.200.0.1:8302", &["10.200.0.1:8303"], "name = \"r2\"")
            .replace("name = \"r\"\n", "")
    );
    std::fs::write(&tmp, second).expect("config");
    std::fs::rename(&tmp, &bed.cfg).expect("replace config");
    log.wait_for("take effect after a restart", Duration::from_secs(10))
        .expect("buffer size change warned");
    log.wait_for("configuration reloaded", Duration::from_secs(10))
        .expect("routes reloaded");
    exchange("10.200.0.1:8302", b"a route added by a reload");
    exchange("10.200.0.1:8300", b"and the first one still");

    let (status, out) = try_stop_and_collect(child).expect("stop");
    assert!(status.success(), "edgeproxy run failed ({status}): {out}");
    // The log pipeline's summary line, then the run report.
    let at = out.find("{\"summary\"").expect("pipeline summary");
    let (_, report) = out[at..].split_once('\n').expect("run report");
    let report: serde_json::Value = serde_json::from_str(report).expect("report JSON");
    assert_eq!(report["iface"], "lo", "the data plane's report");
    assert_eq!(
        report["tcp"]["engine"],
        ENGINE.get(),
        "the engine asked for"
    );
    let routes = report["tcp"]["routes"].as_array().expect("tcp routes");
    let by_name = |n: &str| {
        routes
            .iter()
            .find(|r| r["name"] == n)
            .unwrap_or_else(|| panic!("route {n} in {routes:?}"))
    };
    assert_eq!(num(by_name("r"), "accepted"), 2, "{routes:?}");
    assert_eq!(num(by_name("r2"), "accepted"), 1, "{routes:?}");
    assert_eq!(
        num(&by_name("r")["upstreams"][0], "bytes_up"),
        (b"through the one daemon".len() + b"and the first one still".len()) as u64
    );
}

/// `[tcp] zero_copy` on an interface that cannot do it (loopback: no queue-management
/// ops; this machine has no NIC that can): with `auto` every worker asks, is refused for
/// the reason the kernel (or the engine) gives, and forwards through the copy path; with
/// `require` edgeproxy does not start and says why.
fn zero_copy_falls_back_with_the_reason_and_require_refuses_to_start() {
    if !require_root("zero_copy_falls_back_with_the_reason_and_require_refuses_to_start") {
        return;
    }
    let epoll = ENGINE.get() == "epoll";
    let expected = if epoll {
        "needs the io_uring engine"
    } else {
        "the kernel refused a zero-copy queue"
    };
    let zc = |mode: &str| {
        format!(
            "[tcp]\nzero_copy = \"{mode}\"\nzero_copy_interface = \"lo\"\nzero_copy_queues = [0, 1]\n{}",
            route("10.200.0.1:7000", &["10.200.0.1:7001"], "")
        )
    };
    let mut bed = Bed::new();
    let _up = bed.upstream("10.200.0.1:7001", echo());
    // Two workers whatever this machine has: two queues, and steering between them.
    bed.start(&zc("auto"), &["--workers", "2"]);
    let mut s = connect(&bed.ns, sa("10.200.0.1:7000")).expect("connect");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut w = s.try_clone().expect("clone");
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).expect("send");
        w.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("echo");
    writer.join().expect("writer");
    assert!(
        back == data,
        "{} of {} bytes echoed in order",
        back.len(),
        data.len()
    );
    bed.settled(1);
    let report = bed.stop();
    let workers = report["workers"].as_array().expect("workers");
    assert!(!workers.is_empty());
    for w in workers {
        let why = w["zero_copy_refused"].as_str().unwrap_or("");
        assert!(why.contains(expected), "{w}");
        if !epoll {
            assert!(
                why.contains("os error 95"),
                "EOPNOTSUPP from the kernel: {why}"
            );
        }
        assert_eq!(w["zero_copy_queue"], serde_json::Value::Null, "{w}");
        assert_eq!(num(w, "zero_copy_streams"), 0, "{w}");
    }
    assert_eq!(report["zero_copy"][0]["used"], false, "{report}");
    // With io_uring, both workers planned a queue before the kernel refused them, so the
    // route's listeners took the program that steers connections by rx queue (loopback
    // records no queue: the kernel's hash picked, as the echo above shows).
    let steered = if epoll {
        serde_json::json!([])
    } else {
        serde_json::json!(["r"])
    };
    assert_eq!(report["steered_by_rx_queue"], steered, "{report}");

    // require: no start, and the reason on stderr.
    let mut bed = Bed::new();
    let config = format!("[engine]\nkind = \"{}\"\n{}", ENGINE.get(), zc("require"));
    std::fs::write(&bed.cfg, config).expect("write config");
    match start_proxy(&bed.ns, &bed.cfg, &bed.stats, &["--workers", "2"], &[]) {
        Ok((p, _)) => {
            bed.proxy = Some(p);
            panic!("edgeproxy started without the zero-copy queue it was required to have");
        }
        Err(e) => {
            let e = format!("{e:#}");
            assert!(
                e.contains("zero_copy = \\\"require\\\"") || e.contains("zero_copy = \"require\""),
                "{e}"
            );
            assert!(e.contains(expected), "{e}");
        }
    }
}

// --- socket options --------------------------------------------------------------------

/// `(local, peer, detail line)` of every established TCP socket in `ns`, from `ss` with
/// `detail` (`-m`: memory, `-i`: TCP internals), which prints one indented line per socket.
fn established(ns: &Netns, detail: &str) -> Vec<(SocketAddr, SocketAddr, String)> {
    let out = ns
        .command("ss")
        .args(["-H", "-t", detail, "-n", "state", "established"])
        .output()
        .expect("ss (iproute2) runs");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut found = Vec::new();
    let mut ends: Option<(SocketAddr, SocketAddr)> = None;
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            let (local, peer) = ends
                .take()
                .unwrap_or_else(|| panic!("details alone: {text}"));
            found.push((local, peer, line.trim().to_owned()));
        } else if !line.trim().is_empty() {
            let addrs: Vec<SocketAddr> = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            assert_eq!(addrs.len(), 2, "a socket line of ss: {line:?}");
            ends = Some((addrs[0], addrs[1]));
        }
    }
    found
}

/// `(local, peer, send buffer)` of every established TCP socket in `ns`.
fn send_buffers(ns: &Netns) -> Vec<(SocketAddr, SocketAddr, u64)> {
    established(ns, "-m")
        .into_iter()
        .map(|(local, peer, line)| {
            let tb = line
                .split("skmem:(")
                .nth(1)
                .and_then(|m| m.split([',', ')']).find_map(|f| f.strip_prefix("tb")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no tb in {line:?}"));
            (local, peer, tb)
        })
        .collect()
}

/// `(local, peer, congestion control)` of every established TCP socket in `ns` (the
/// first word of `ss -i`'s line).
fn congestion_controls(ns: &Netns) -> Vec<(SocketAddr, SocketAddr, String)> {
    established(ns, "-i")
        .into_iter()
        .map(|(local, peer, line)| {
            let cc = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            (local, peer, cc)
        })
        .collect()
}

/// The send buffer `local_sndbuf = bytes` gives a socket: doubled by the kernel after
/// `net.core.wmem_max` clamps it.
fn fixed_send_buffer(bytes: u64) -> u64 {
    let max: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
        .expect("wmem_max")
        .trim()
        .parse()
        .expect("wmem_max is a number");
    2 * bytes.min(max)
}

/// With the system's congestion control everywhere (`local_congestion = ""`; with it,
/// see the next test), connections to a peer on this host (a loopback upstream, a
/// client on one of our own addresses) get the fixed `local_sndbuf`; a client on another
/// host keeps the kernel's autotuning, and `local_sndbuf = 0` (reloaded) leaves every
/// new connection to it.
fn send_buffers_are_fixed_for_peers_on_this_host_only() {
    if !require_root("send_buffers_are_fixed_for_peers_on_this_host_only") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let VethPair {
        a, b, a_v4, b_v4, ..
    } = pair;
    let mut bed = Bed::inside(a);
    // Another prefix on this host's loopback: each of its addresses is this host too.
    edgeproxy_testbed::tools::run(
        "ip",
        [
            "-n",
            bed.ns.name(),
            "addr",
            "add",
            "10.200.77.1/24",
            "dev",
            "lo",
        ],
    )
    .expect("ip addr add");
    let other_local = ip("10.200.77.12");
    let up = sa("127.0.0.1:8101");
    let listen = SocketAddr::new(a_v4.into(), 8100);
    let _echo = bed.upstream(&up.to_string(), echo());
    let routes = route(&listen.to_string(), &[&up.to_string()], "");
    bed.start(
        &format!("[tcp]\nlocal_sndbuf = 262144\nlocal_congestion = \"\"\n{routes}"),
        &["--workers", "1"],
    );
    let fixed = fixed_send_buffer(262_144);
    let mut here = connect_from(&bed.ns, a_v4.into(), listen).expect("connect from this host");
    let mut there = connect_from(&b, b_v4.into(), listen).expect("connect from the other host");
    let mut prefix = connect_from(&bed.ns, other_local, listen).expect("connect from lo's prefix");
    echoes(&mut here, b"ping");
    echoes(&mut there, b"ping");
    echoes(&mut prefix, b"ping");
    let socks = send_buffers(&bed.ns);
    let proxy_side = |peer_ip: IpAddr| -> Vec<u64> {
        socks
            .iter()
            .filter(|(l, p, _)| *l == listen && p.ip() == peer_ip)
            .map(|s| s.2)
            .collect()
    };
    assert_eq!(
        proxy_side(a_v4.into()),
        [fixed],
        "client on this host: {socks:?}"
    );
    assert_eq!(
        proxy_side(other_local),
        [fixed],
        "client from another of this host's addresses: {socks:?}"
    );
    let remote = proxy_side(b_v4.into());
    assert_eq!(remote.len(), 1, "{socks:?}");
    assert_ne!(
        remote[0], fixed,
        "a client on another host keeps autotuning: {socks:?}"
    );
    let upstream_side: Vec<u64> = socks.iter().filter(|s| s.1 == up).map(|s| s.2).collect();
    assert_eq!(
        upstream_side,
        [fixed, fixed, fixed],
        "loopback upstream: {socks:?}"
    );

    // Off: a new connection from this host keeps the kernel's autotuning on both sides.
    drop((here, there, prefix));
    bed.settled(3);
    bed.reload(&format!(
        "[tcp]\nlocal_sndbuf = 0\nlocal_congestion = \"\"\n{routes}"
    ));
    let mut again = connect_from(&bed.ns, a_v4.into(), listen).expect("connect");
    echoes(&mut again, b"ping");
    let socks = send_buffers(&bed.ns);
    let proxied: Vec<u64> = socks
        .iter()
        .filter(|(l, p, _)| *l == listen || *p == up)
        .map(|s| s.2)
        .collect();
    assert_eq!(proxied.len(), 2, "{socks:?}");
    assert!(
        proxied.iter().all(|&tb| tb != fixed),
        "local_sndbuf = 0: {socks:?}"
    );
    drop(again);
    bed.settled(4);
    let report = bed.stop();
    // Two clients and their two upstream sockets, and the third client's upstream.
    assert_eq!(
        num(&report["workers"][0], "local_send_buffers"),
        5,
        "{report}"
    );
}

/// Sockets to peers on this host run `local_congestion` and keep autotuning: an upstream
/// socket to this host is given it before it connects, a client on this host keeps it
/// from its listener; an upstream on another host keeps the system's, a client from
/// another host is switched back to it. `local_congestion = ""` (reloaded) gives every
/// new connection the system's, and peers on this host the fixed `local_sndbuf`.
fn peers_on_this_host_get_local_congestion() {
    if !require_root("peers_on_this_host_get_local_congestion") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let VethPair {
        a, b, a_v4, b_v4, ..
    } = pair;
    let mut bed = Bed::inside(a);
    let read = |what: &str| -> String {
        let out = bed
            .ns
            .command("cat")
            .arg(format!("/proc/sys/net/ipv4/{what}"))
            .output()
            .expect("cat runs");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let system = read("tcp_congestion_control");
    // One the namespace does not use by default, so the two can be told apart.
    let available = read("tcp_available_congestion_control");
    let cc = available
        .split_whitespace()
        .find(|&n| n != system)
        .unwrap_or_else(|| {
            panic!("this kernel has one congestion control ({available}): nothing to tell apart")
        })
        .to_owned();
    assert!(!system.is_empty() && !cc.is_empty(), "{system:?} {cc:?}");
    let local_up = sa("127.0.0.1:8111");
    let remote_up = SocketAddr::new(b_v4.into(), 8112);
    let _echo = bed.upstream(&local_up.to_string(), echo());
    let _remote = Upstream::spawn(&b, remote_up, echo()).expect("upstream in the other namespace");
    let (to_local, to_remote) = (
        SocketAddr::new(a_v4.into(), 8110),
        SocketAddr::new(a_v4.into(), 8113),
    );
    let routes = format!(
        "[[route]]\nname = \"here\"\nlisten = \"{to_local}\"\nupstreams = [\"{local_up}\"]\n[[route]]\nname = \"there\"\nlisten = \"{to_remote}\"\nupstreams = [\"{remote_up}\"]\n"
    );
    bed.start(
        &format!("[tcp]\nlocal_sndbuf = 262144\nlocal_congestion = {cc:?}\n{routes}"),
        &["--workers", "1"],
    );
    let fixed = fixed_send_buffer(262_144);
    let mut here = connect_from(&bed.ns, a_v4.into(), to_local).expect("connect");
    let mut there = connect_from(&bed.ns, a_v4.into(), to_remote).expect("connect");
    let mut from_afar =
        connect_from(&b, b_v4.into(), to_local).expect("connect from the other host");
    echoes(&mut here, b"ping");
    echoes(&mut there, b"ping");
    echoes(&mut from_afar, b"ping");
    let socks = congestion_controls(&bed.ns);
    let of = |pick: &dyn Fn(&(SocketAddr, SocketAddr, String)) -> bool| -> Vec<&str> {
        let mut v: Vec<&str> = socks
            .iter()
            .filter(|s| pick(s))
            .map(|s| s.2.as_str())
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(
        of(&|s| s.1 == local_up),
        [cc.as_str(), cc.as_str()],
        "upstream sockets to this host: {socks:?}"
    );
    assert_eq!(
        of(&|s| s.1 == remote_up),
        [system.as_str()],
        "upstream on another host: {socks:?}"
    );
    assert_eq!(
        of(&|s| (s.0 == to_local || s.0 == to_remote) && s.1.ip() == IpAddr::from(a_v4)),
        [cc.as_str(), cc.as_str()],
        "clients on this host: {socks:?}"
    );
    assert_eq!(
        of(&|s| s.0 == to_local && s.1.ip() == IpAddr::from(b_v4)),
        [system.as_str()],
        "a client from another host: {socks:?}"
    );
    // Running `local_congestion`, they keep autotuning: no fixed send buffer.
    let buffers = send_buffers(&bed.ns);
    let local_sides: Vec<u64> = buffers
        .iter()
        .filter(|(l, p, _)| *p == local_up || (*l == to_local && p.ip() == IpAddr::from(a_v4)))
        .map(|s| s.2)
        .collect();
    assert_eq!(local_sides.len(), 3, "{buffers:?}");
    assert!(local_sides.iter().all(|&tb| tb != fixed), "{buffers:?}");

    // "": the system's for new connections, and the fixed send buffer for local peers.
    drop((here, there, from_afar));
    bed.settled(3);
    bed.reload(&format!(
        "[tcp]\nlocal_sndbuf = 262144\nlocal_congestion = \"\"\n{routes}"
    ));
    let mut again = connect_from(&bed.ns, a_v4.into(), to_local).expect("connect");
    echoes(&mut again, b"ping");
    let socks = congestion_controls(&bed.ns);
    let proxied: Vec<&str> = socks
        .iter()
        .filter(|s| s.1 == local_up || s.0 == to_local)
        .map(|s| s.2.as_str())
        .collect();
    assert_eq!(
        proxied,
        [system.as_str(), system.as_str()],
        "local_congestion = \"\": {socks:?}"
    );
    let buffers = send_buffers(&bed.ns);
    let proxied: Vec<u64> = buffers
        .iter()
        .filter(|(l, p, _)| *p == local_up || *l == to_local)
        .map(|s| s.2)
        .collect();
    assert_eq!(proxied, [fixed, fixed], "{buffers:?}");
    drop(again);
    bed.settled(4);
    let report = bed.stop();
    let w = &report["workers"][0];
    // Two upstream sockets to this host and two clients on it; the client from the
    // other host switched back; after the reload, the two fixed send buffers.
    assert_eq!(num(w, "local_congestion"), 4, "{w}");
    assert_eq!(num(w, "system_congestion_restored"), 1, "{w}");
    assert_eq!(num(w, "local_congestion_errors"), 0, "{w}");
    assert_eq!(num(w, "local_send_buffers"), 2, "{w}");
}

/// With `bulk_poll_usec = 0`, bulk transfers make io_uring's waits gather completions
/// where the kernel can (the worker reports whether); epoll's never. With it (the
/// default), they poll instead and never gather. The upstream stalls first so that,
/// once it reads, passes move whole pipes. (The buffers path keeps one 32 KiB buffer per
/// direction in flight and each completion wakes the worker, so its passes rarely reach
/// a bulk pass's 64 KiB: it seldom gathers, and measured no gain from it.) Round trips
/// of a few bytes never gather: `reload_changes_the_copy_path_for_new_connections`.
/// `bulk_poll_usec`: `None` leaves the default.
fn bulk_transfer_waits(copy: &str, connections: usize, bulk_poll_usec: Option<u32>) {
    const SIZE: u64 = 16 << 20;
    let each = SIZE / connections as u64;
    let mut bed = Bed::new();
    let _up = bed.upstream(
        "10.200.0.1:8201",
        Arc::new(|mut s: TcpStream| {
            std::thread::sleep(Duration::from_millis(300));
            let (n, _) = drain_digest(&mut s).expect("upstream receive");
            let _ = s.write_all(&n.to_be_bytes());
        }),
    );
    bed.start(
        &format!(
            "{}{}{}",
            copy_section(copy),
            bulk_poll_usec.map_or(String::new(), |u| format!("bulk_poll_usec = {u}\n")),
            route("10.200.0.1:8200", &["10.200.0.1:8201"], "")
        ),
        &["--workers", "1"],
    );
    let clients: Vec<_> = (0..connections)
        .map(|i| {
            let mut s = connect(&bed.ns, sa("10.200.0.1:8200")).expect("connect");
            std::thread::spawn(move || {
                send_random(&mut s, 3 + i as u64, each).expect("send");
                s.shutdown(Shutdown::Write).expect("shutdown");
                let mut got = [0u8; 8];
                s.read_exact(&mut got).expect("the upstream's count");
                u64::from_be_bytes(got)
            })
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().expect("client"), each);
    }
    bed.settled(connections as u64);
    let report = bed.stop();
    let w = &report["workers"][0];
    if bulk_poll_usec != Some(0) {
        // Whether a poll is answered within 200 µs depends on how busy the machine is
        // (the worker unit test checks that with 10 ms); that the worker polled does not.
        assert!(
            num(w, "busy_poll_hits") + num(w, "busy_poll_sleeps") > 0,
            "no wait polled: {w}"
        );
        assert_eq!(num(w, "gathering_waits"), 0, "{w}");
        return;
    }
    assert_eq!(
        (num(w, "busy_poll_hits"), num(w, "busy_poll_sleeps")),
        (0, 0),
        "{w}"
    );
    let supported = w["gathering_supported"]
        .as_bool()
        .expect("gathering_supported");
    if ENGINE.get() == "epoll" {
        assert!(!supported, "{w}");
    }
    if supported {
        assert!(num(w, "gathering_waits") > 0, "no wait gathered: {w}");
    } else {
        assert_eq!(num(w, "gathering_waits"), 0, "{w}");
        println!(
            "{copy}: this worker cannot gather completions ({})",
            ENGINE.get()
        );
    }
}

/// `busy_poll_usec`: a daemon whose worker polls before it sleeps moves 16 MB each way
/// whole, counts waits answered while polling, and never gathers (a polling worker does
/// not sleep through completions).
fn busy_polling_forwards_whole_and_counts() {
    if !require_root("busy_polling_forwards_whole_and_counts") {
        return;
    }
    const SIZE: u64 = 16 << 20;
    const DOWN_SEED: u64 = 9;
    let mut bed = Bed::new();
    let _up = bed.upstream(
        "10.200.0.1:8211",
        Arc::new(|mut s: TcpStream| {
            let (n, digest) = drain_digest(&mut s).expect("upstream receive");
            let _ = s.write_all(&n.to_be_bytes());
            let _ = s.write_all(&digest.to_be_bytes());
            let _ = send_random(&mut s, DOWN_SEED, SIZE);
        }),
    );
    bed.start(
        &format!(
            "[tcp]\ncopy = \"splice\"\nbusy_poll_usec = 1000\n{}",
            route("10.200.0.1:8210", &["10.200.0.1:8211"], "")
        ),
        &["--workers", "1"],
    );
    let mut s = connect(&bed.ns, sa("10.200.0.1:8210")).expect("connect");
    let sent = send_random(&mut s, 5, SIZE).expect("send");
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut head = [0u8; 16];
    s.read_exact(&mut head)
        .expect("the upstream's count and digest");
    let word = |i: usize| u64::from_be_bytes(head[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    assert_eq!((word(0), word(1)), (SIZE, sent), "upload");
    let want = send_random(&mut std::io::sink(), DOWN_SEED, SIZE).expect("digest");
    assert_eq!(
        drain_digest(&mut s).expect("download"),
        (SIZE, want),
        "download"
    );
    bed.settled(1);
    let report = bed.stop();
    let w = &report["workers"][0];
    assert!(
        num(w, "busy_poll_hits") > 0,
        "no wait was answered while polling: {w}"
    );
    assert_eq!(num(w, "gathering_waits"), 0, "{w}");
}

fn bulk_transfers_make_waits_gather_splice() {
    if require_root("bulk_transfers_make_waits_gather_splice") {
        bulk_transfer_waits("splice", 1, Some(0));
    }
}

fn bulk_transfers_make_waits_poll_by_default() {
    if require_root("bulk_transfers_make_waits_poll_by_default") {
        bulk_transfer_waits("splice", 1, None);
    }
}

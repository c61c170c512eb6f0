//! `cargo xtask bench tcp`: edgeproxy's TCP forwarding against direct connections (the
//! limit), HAProxy, nginx `stream` and socat, each configured as a plain one-upstream TCP
//! forwarder on one core (CPU 1), with the same clients and servers on CPU 0, in the same
//! run, rounds interleaved so drift hits everyone alike:
//!
//! - throughput: iperf3, one stream and eight, received bits/s, and the proxy's CPU
//!   seconds per GB moved;
//! - request/response latency: 16 persistent connections each sending 64 bytes to an
//!   echo server and waiting for them, percentiles of the round trip;
//! - connection rate: 8 clients each connecting, exchanging 64 bytes and closing;
//! - light load: one connection doing 1,000 paced round trips a second, the proxy's
//!   share of its core and the round-trip percentiles (what idling between events
//!   costs, e.g. busy polling).
//!
//! The peers are the Debian packages `cargo xtask bench` unpacks into target/peers.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edgeproxy_testbed::{Reaped, netns::Netns, scratch::ScratchDir, tcp::namespace};

use super::{
    Spread,
    peers::{peer_library_path, peers_root},
    spread,
};

const ROUNDS: usize = 3;
const SECONDS: u64 = 3;
const SERVER: &str = "10.200.0.1";
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 5300;
/// CPU the proxy under test runs on; clients and servers run on the other.
const PROXY_CPU: usize = 1;
const CLIENT_CPU: usize = 0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proxy {
    Direct,
    Edgeproxy,
    EdgeproxyBuffers,
    /// edgeproxy on the epoll engine (the fallback where io_uring is not usable).
    EdgeproxyEpoll,
    /// edgeproxy with the system's congestion control and `local_sndbuf = 0`: the
    /// kernel's autotuning on every socket (against edgeproxy-systemcc, what the fixed
    /// send buffer does for a socket that paces; with `local_congestion` no socket here
    /// gets one).
    EdgeproxyAutotuned,
    /// edgeproxy with `bulk_poll_usec = 0`: under bulk traffic a wait gathers
    /// completions (`coalesce_usec`) instead of polling; the default before 2026-12-02.
    EdgeproxyGather,
    /// edgeproxy with `local_congestion = ""`: the system's congestion control (BBR
    /// here, which paces) on its sockets, as every other proxy here has, and so the
    /// fixed `local_sndbuf`.
    EdgeproxySystemCc,
    /// edgeproxy with `busy_poll_usec = 200`: a worker polls for completions that long
    /// before it sleeps.
    EdgeproxyBusyPoll,
    Haproxy,
    /// HAProxy with the send buffers edgeproxy gives peers on this host
    /// (`tune.sndbuf.client` and `.server`; every peer here is on this host).
    HaproxySndbuf,
    /// HAProxy with `busy-polling` (its poller never sleeps): against
    /// edgeproxy-busypoll.
    HaproxyBusyPoll,
    Nginx,
    Socat,
}

impl Proxy {
    const ALL: [Proxy; 13] = [
        Proxy::Direct,
        Proxy::Edgeproxy,
        Proxy::EdgeproxyBuffers,
        Proxy::EdgeproxyEpoll,
        Proxy::EdgeproxyAutotuned,
        Proxy::EdgeproxyGather,
        Proxy::EdgeproxySystemCc,
        Proxy::EdgeproxyBusyPoll,
        Proxy::Haproxy,
        Proxy::HaproxySndbuf,
        Proxy::HaproxyBusyPoll,
        Proxy::Nginx,
        Proxy::Socat,
    ];

    fn name(self) -> &'static str {
        match self {
            Proxy::Direct => "direct",
            Proxy::Edgeproxy => "edgeproxy",
            Proxy::EdgeproxyBuffers => "edgeproxy-buffers",
            Proxy::EdgeproxyEpoll => "edgeproxy-epoll",
            Proxy::EdgeproxyAutotuned => "edgeproxy-autotuned",
            Proxy::EdgeproxyGather => "edgeproxy-gather",
            Proxy::EdgeproxySystemCc => "edgeproxy-systemcc",
            Proxy::EdgeproxyBusyPoll => "edgeproxy-busypoll",
            Proxy::Haproxy => "haproxy",
            Proxy::HaproxySndbuf => "haproxy-sndbuf",
            Proxy::HaproxyBusyPoll => "haproxy-busypoll",
            Proxy::Nginx => "nginx",
            Proxy::Socat => "socat",
        }
    }

    /// Listening port for traffic to `upstream_port`.
    fn port(self, upstream_port: u16) -> u16 {
        match self {
            Proxy::Direct => upstream_port,
            _ => upstream_port + 10 * (self as u16),
        }
    }
}

fn pin_to(cmd: &mut Command, cpu: usize) {
    // SAFETY: runs in the forked child before exec; sched_setaffinity is a plain syscall.
    unsafe {
        cmd.pre_exec(move || {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).map_err(std::io::Error::from)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .map_err(std::io::Error::from)
        });
    }
}

fn pin_self(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

struct Bench {
    ns: Netns,
    dir: ScratchDir,
    peers: PathBuf,
}

impl Bench {
    fn peer(&self, bin: &str) -> Command {
        let mut c = self.ns.command(self.peers.join(bin));
        c.env("LD_LIBRARY_PATH", peer_library_path(&self.peers));
        c
    }

    fn versions(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for (bin, arg) in [
            ("usr/sbin/haproxy", "-v"),
            ("usr/sbin/nginx", "-v"),
            ("usr/bin/socat", "-V"),
            ("usr/bin/iperf3", "-v"),
        ] {
            let o = self
                .peer(bin)
                .arg(arg)
                .output()
                .with_context(|| format!("running {bin}"))?;
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            if !o.status.success() {
                bail!("{bin} {arg} failed ({}): {text}", o.status);
            }
            let line = text
                .lines()
                .find(|l| l.contains("version") || l.starts_with("iperf"))
                .unwrap_or("?")
                .trim()
                .to_owned();
            out.push(line);
        }
        Ok(out)
    }

    /// Starts `p` forwarding to both upstream ports; waits until it accepts. Returns
    /// its processes (none for direct).
    fn start(&self, p: Proxy) -> anyhow::Result<Vec<Reaped>> {
        let ups = [IPERF_PORT, ECHO_PORT];
        let children = match p {
            Proxy::Direct => return Ok(Vec::new()),
            Proxy::Edgeproxy
            | Proxy::EdgeproxyBuffers
            | Proxy::EdgeproxyEpoll
            | Proxy::EdgeproxyAutotuned
            | Proxy::EdgeproxyGather
            | Proxy::EdgeproxySystemCc
            | Proxy::EdgeproxyBusyPoll => {
                let copy = if p == Proxy::EdgeproxyBuffers {
                    "buffers"
                } else {
                    "auto"
                };
                let engine = if p == Proxy::EdgeproxyEpoll {
                    "epoll"
                } else {
                    "io_uring"
                };
                let mut cfg = format!(
                    "[engine]\nkind = \"{engine}\"\ndata_cpus = [{PROXY_CPU}]\n[tcp]\ncopy = \"{copy}\"\n"
                );
                if p == Proxy::EdgeproxyAutotuned {
                    cfg += "local_sndbuf = 0\nlocal_congestion = \"\"\n";
                }
                if p == Proxy::EdgeproxyGather {
                    cfg += "bulk_poll_usec = 0\n";
                }
                if p == Proxy::EdgeproxySystemCc {
                    cfg += "local_congestion = \"\"\n";
                }
                if p == Proxy::EdgeproxyBusyPoll {
                    cfg += "busy_poll_usec = 200\n";
                }
                for u in ups {
                    cfg += &format!(
                        "[[route]]\nlisten = \"{SERVER}:{}\"\nupstreams = [\"{SERVER}:{u}\"]\nidle_timeout = 120\n",
                        p.port(u)
                    );
                }
                let path = self.dir.file("edgeproxy.toml", &cfg);
                let (child, _log) = edgeproxy_testbed::try_start_edgeproxy_until(
                    &self.ns,
                    [
                        std::ffi::OsStr::new("proxy"),
                        "--config".as_ref(),
                        path.as_os_str(),
                    ],
                    "TCP forwarding started",
                )?;
                vec![child]
            }
            Proxy::Haproxy | Proxy::HaproxySndbuf | Proxy::HaproxyBusyPoll => {
                let tune = match p {
                    Proxy::HaproxySndbuf => {
                        "  tune.sndbuf.client 262144\n  tune.sndbuf.server 262144\n"
                    }
                    Proxy::HaproxyBusyPoll => "  busy-polling\n",
                    _ => "",
                };
                let mut cfg = format!(
                    "global\n  nbthread 1\n  maxconn 8000\n{tune}defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n"
                );
                for u in ups {
                    cfg += &format!(
                        "listen fwd{u}\n  bind {SERVER}:{}\n  server s1 {SERVER}:{u}\n",
                        p.port(u)
                    );
                }
                let path = self.dir.file("haproxy.cfg", &cfg);
                let mut c = self.peer("usr/sbin/haproxy");
                c.arg("-db").arg("-f").arg(&path);
                vec![self.spawn(c)?]
            }
            Proxy::Nginx => {
                let module = self
                    .peers
                    .join("usr/lib/nginx/modules/ngx_stream_module.so");
                let mut cfg = format!(
                    "load_module {};\nworker_processes 1;\nmaster_process off;\ndaemon off;\npid {};\nerror_log stderr warn;\nevents {{ worker_connections 8000; }}\nstream {{\n",
                    module.display(),
                    self.dir.path().join("nginx.pid").display()
                );
                for u in ups {
                    cfg += &format!(
                        "  server {{ listen {SERVER}:{}; proxy_pass {SERVER}:{u}; proxy_timeout 120s; }}\n",
                        p.port(u)
                    );
                }
                cfg += "}\n";
                let path = self.dir.file("nginx.conf", &cfg);
                let mut c = self.peer("usr/sbin/nginx");
                c.arg("-e")
                    .arg("stderr")
                    .arg("-p")
                    .arg(self.dir.path())
                    .arg("-c")
                    .arg(&path);
                vec![self.spawn(c)?]
            }
            Proxy::Socat => {
                // One socat per port (each forks a child per connection).
                let mut all = Vec::new();
                for u in ups {
                    let mut c = self.peer("usr/bin/socat");
                    c.arg(format!(
                        "TCP-LISTEN:{},bind={SERVER},fork,reuseaddr,backlog=4096",
                        p.port(u)
                    ))
                    .arg(format!("TCP:{SERVER}:{u}"));
                    all.push(self.spawn(c)?);
                }
                all
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for u in ups {
            let addr: SocketAddr = format!("{SERVER}:{}", p.port(u)).parse()?;
            while self.ns.run(|| TcpStream::connect(addr)).is_err() {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(self.dir.path().join("peer.log"))
                        .unwrap_or_default();
                    bail!("{} does not accept on {addr}: {log}", p.name());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(children)
    }

    fn spawn(&self, mut c: Command) -> anyhow::Result<Reaped> {
        pin_to(&mut c, PROXY_CPU);
        let log = std::fs::File::create(self.dir.path().join("peer.log"))?;
        Ok(Reaped(Some(
            c.stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("spawning a peer")?,
        )))
    }
}

/// CPU seconds of `pid` and its reaped children.
fn cpu_with_children(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = (11..=14)
        .filter_map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / super::ticks_per_s()
}

/// iperf3 through `port`: received bits/s.
/// Received bits per second of an iperf3 run through `port`; `reverse` (`-R`): the
/// server sends, so a proxy writes to the client.
fn iperf(b: &Bench, port: u16, streams: u32, reverse: bool) -> anyhow::Result<f64> {
    let mut c = b.peer("usr/bin/iperf3");
    c.args([
        "-c",
        SERVER,
        "-p",
        &port.to_string(),
        "-t",
        &SECONDS.to_string(),
        "-J",
        "-P",
    ])
    .arg(streams.to_string());
    if reverse {
        c.arg("-R");
    }
    pin_to(&mut c, CLIENT_CPU);
    let out = c.output().context("iperf3 client")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 gave no received rate")
}

/// [`iperf`], tried up to three times: the one iperf3 server serves every run in turn,
/// and a run can fail when it still winds down the one before (seen once through nginx
/// in the third round: "control socket has closed unexpectedly"), which would throw away
/// the whole bench. Each retry is printed.
fn iperf_retrying(
    b: &Bench,
    name: &str,
    port: u16,
    streams: u32,
    reverse: bool,
) -> anyhow::Result<f64> {
    let mut attempt = 1;
    loop {
        match iperf(b, port, streams, reverse) {
            Ok(bps) => return Ok(bps),
            Err(e) if attempt < 3 => {
                eprintln!("bench tcp: {name} iperf3 -P {streams} failed ({e:#}); again in 1 s");
                std::thread::sleep(Duration::from_secs(1));
                attempt += 1;
            }
            Err(e) => return Err(e.context(format!("{name} iperf3 -P {streams}, 3 attempts"))),
        }
    }
}

/// An echo server on CPU 0: one thread per connection, 64-byte messages.
fn echo_server(ns: &Netns, stop: Arc<AtomicBool>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let listener = ns.run(|| TcpListener::bind((SERVER, ECHO_PORT)))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        pin_self(CLIENT_CPU);
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    std::thread::spawn(move || {
                        pin_self(CLIENT_CPU);
                        let mut buf = [0u8; 64];
                        while s.read_exact(&mut buf).is_ok() {
                            if s.write_all(&buf).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }))
}

/// 16 persistent connections doing 64-byte round trips: round-trip times in µs.
fn latency(ns: &Netns, port: u16) -> anyhow::Result<Vec<u32>> {
    let addr: SocketAddr = format!("{SERVER}:{port}").parse()?;
    let until = Instant::now() + Duration::from_secs(SECONDS);
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let s = ns.run(|| TcpStream::connect(addr));
            std::thread::spawn(move || -> anyhow::Result<Vec<u32>> {
                pin_self(CLIENT_CPU);
                let mut s = s?;
                s.set_nodelay(true)?;
                let mut rtts = Vec::with_capacity(100_000);
                let mut buf = [7u8; 64];
                while Instant::now() < until {
                    let t = Instant::now();
                    s.write_all(&buf)?;
                    s.read_exact(&mut buf)?;
                    rtts.push(t.elapsed().as_micros() as u32);
                }
                Ok(rtts)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
    }
    all.sort_unstable();
    Ok(all)
}

/// Round trips a second of the light load.
const LIGHT_RATE: u32 = 1_000;

/// One connection doing [`LIGHT_RATE`] paced 64-byte round trips a second: round-trip
/// times in µs. What a proxy costs while traffic is light (busy polling's price).
fn paced(ns: &Netns, port: u16) -> anyhow::Result<Vec<u32>> {
    let addr: SocketAddr = format!("{SERVER}:{port}").parse()?;
    let s = ns.run(|| TcpStream::connect(addr));
    std::thread::spawn(move || -> anyhow::Result<Vec<u32>> {
        pin_self(CLIENT_CPU);
        let mut s = s?;
        s.set_nodelay(true)?;
        let total = LIGHT_RATE * SECONDS as u32;
        let mut rtts = Vec::with_capacity(total as usize);
        let mut buf = [5u8; 64];
        let started = Instant::now();
        for i in 0..total {
            let due = started + Duration::from_secs(u64::from(i)) / LIGHT_RATE;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let t = Instant::now();
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
            rtts.push(t.elapsed().as_micros() as u32);
        }
        rtts.sort_unstable();
        Ok(rtts)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client panicked"))?
}

/// 8 clients connecting, exchanging 64 bytes and closing: connections per second.
fn connection_rate(ns: &Netns, port: u16) -> anyhow::Result<f64> {
    let addr: SocketAddr = format!("{SERVER}:{port}").parse()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(SECONDS);
    let handles: Vec<_> = (0..8u8)
        .map(|k| {
            let ns_file = std::fs::File::open(format!("/run/netns/{}", ns.name()));
            std::thread::spawn(move || -> anyhow::Result<u64> {
                pin_self(CLIENT_CPU);
                nix::sched::setns(ns_file?, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let from: std::net::IpAddr = format!("10.200.0.{}", 10 + k).parse()?;
                let mut n = 0;
                let mut buf = [1u8; 64];
                while Instant::now() < until {
                    let mut s = edgeproxy_testbed::tcp::connect_here(from, addr)?;
                    s.write_all(&buf)?;
                    s.read_exact(&mut buf)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Busy and total jiffies of the client and the proxy core, from /proc/stat.
struct CoreBusy([(u64, u64); 2]);

impl CoreBusy {
    fn read() -> [(u64, u64); 2] {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        [CLIENT_CPU, PROXY_CPU].map(|cpu| {
            super::proc_stat_line(&stat, &format!("cpu{cpu}")).map_or((0, 0), |v| {
                let total: u64 = v.iter().take(8).sum();
                // idle and iowait are the 4th and 5th fields.
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                (total - idle, total)
            })
        })
    }

    fn start() -> Self {
        Self(Self::read())
    }

    /// (client core, proxy core) busy fractions since `start`.
    fn finish(&self) -> (f64, f64) {
        let now = Self::read();
        let frac = |k: usize| {
            let busy = now[k].0.saturating_sub(self.0[k].0) as f64;
            let total = now[k].1.saturating_sub(self.0[k].1) as f64;
            if total > 0.0 { busy / total } else { 0.0 }
        };
        (frac(0), frac(1))
    }
}

fn pct(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((q * sorted.len() as f64) as usize).min(sorted.len() - 1)]
}

#[derive(Default)]
struct Results {
    tput1: Vec<f64>,
    tput8: Vec<f64>,
    /// The reverse direction (`iperf3 -R`), one and eight streams.
    rev1: Vec<f64>,
    rev8: Vec<f64>,
    cpu_per_gb: Vec<f64>,
    /// Busy share of the client core and of the proxy core during the 1- and 8-stream
    /// runs: shows which side bounds the throughput.
    busy1: Vec<(f64, f64)>,
    busy8: Vec<(f64, f64)>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    conn_rate: Vec<f64>,
    /// Under the light load: the proxy's share of a core, and round-trip percentiles.
    light_busy: Vec<f64>,
    light_p50: Vec<f64>,
    light_p99: Vec<f64>,
}

pub fn tcp_peers() -> anyhow::Result<()> {
    let peers = peers_root();
    for bin in [
        "usr/sbin/haproxy",
        "usr/sbin/nginx",
        "usr/bin/socat",
        "usr/bin/iperf3",
    ] {
        if !peers.join(bin).exists() {
            bail!(
                "{bin} is not unpacked under {}: run `cargo xtask bench tcp`, which unpacks the peers",
                peers.display()
            );
        }
    }
    let b = Bench {
        ns: namespace()?,
        dir: ScratchDir::new()?,
        peers,
    };
    // Many short connections: reuse TIME_WAIT ports and widen the ephemeral range (in
    // this namespace only), above the listening ports used here (all below 10000).

    b.ns.run(|| -> std::io::Result<()> {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000")
    })
    .context("namespace sysctls")?;
    let versions = b.versions()?;
    println!(
        "bench tcp: each proxy on CPU {PROXY_CPU} with one upstream, clients and servers on CPU {CLIENT_CPU}; {ROUNDS} rounds interleaved, {SECONDS} s per point"
    );
    for v in &versions {
        println!("  {v}");
    }
    let system_cc =
        b.ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control"))
            .context("the namespace's congestion control")?;
    println!(
        "  congestion control: {} (the system's) on every socket, except edgeproxy's (all to peers on this host here): reno (local_congestion, with autotuned send buffers; edgeproxy-systemcc and edgeproxy-autotuned keep the system's)",
        system_cc.trim()
    );
    println!(
        "  edgeproxy: 1 io_uring worker, default copy path (auto = splice); edgeproxy-buffers: provided buffers (32 KiB); edgeproxy-epoll: the epoll engine, splice"
    );
    println!(
        "  haproxy: nbthread 1, mode tcp; nginx: 1 worker, stream proxy_pass; socat: fork per connection"
    );
    let mut iperf_server = {
        let mut c = b.peer("usr/bin/iperf3");
        c.args(["-s", "-B", SERVER, "-p", &IPERF_PORT.to_string()]);
        pin_to(&mut c, CLIENT_CPU);
        Reaped(Some(
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("iperf3 server")?,
        ))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let echo = echo_server(&b.ns, Arc::clone(&stop))?;
    std::thread::sleep(Duration::from_millis(300));

    let mut results: Vec<Results> = Proxy::ALL.iter().map(|_| Results::default()).collect();
    for round in 0..ROUNDS {
        for (i, &p) in Proxy::ALL.iter().enumerate() {
            let children = b
                .start(p)
                .with_context(|| format!("starting {}", p.name()))?;
            let cpu = || -> f64 {
                children
                    .iter()
                    .map(|c| cpu_with_children(c.pid().as_raw()))
                    .sum()
            };
            let cpu0 = cpu();
            let r = &mut results[i];
            let cores = CoreBusy::start();
            let bps = iperf_retrying(&b, p.name(), p.port(IPERF_PORT), 1, false)?;
            r.busy1.push(cores.finish());
            let cpu1 = cpu();
            r.tput1.push(bps);
            if !children.is_empty() {
                let gb = bps * SECONDS as f64 / 8e9;
                r.cpu_per_gb.push((cpu1 - cpu0) / gb.max(1e-9));
            }
            let cores = CoreBusy::start();
            r.tput8
                .push(iperf_retrying(&b, p.name(), p.port(IPERF_PORT), 8, false)?);
            r.busy8.push(cores.finish());
            for (streams, into) in [(1, &mut r.rev1), (8, &mut r.rev8)] {
                into.push(iperf_retrying(
                    &b,
                    p.name(),
                    p.port(IPERF_PORT),
                    streams,
                    true,
                )?);
            }
            let rtts = latency(&b.ns, p.port(ECHO_PORT))
                .with_context(|| format!("{} latency", p.name()))?;
            r.p50.push(f64::from(pct(&rtts, 0.50)));
            r.p99.push(f64::from(pct(&rtts, 0.99)));
            r.p999.push(f64::from(pct(&rtts, 0.999)));
            r.conn_rate.push(
                connection_rate(&b.ns, p.port(ECHO_PORT))
                    .with_context(|| format!("{} connection rate", p.name()))?,
            );
            let (cpu0, t0) = (cpu(), Instant::now());
            let rtts = paced(&b.ns, p.port(ECHO_PORT))
                .with_context(|| format!("{} light load", p.name()))?;
            if !children.is_empty() {
                r.light_busy
                    .push((cpu() - cpu0) / t0.elapsed().as_secs_f64());
            }
            r.light_p50.push(f64::from(pct(&rtts, 0.50)));
            r.light_p99.push(f64::from(pct(&rtts, 0.99)));
            drop(children);
            eprintln!("bench tcp: round {} {} done", round + 1, p.name());
        }
    }
    stop.store(true, Ordering::Release);
    let _ = echo.join();
    drop(iperf_server.0.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));

    let show = |s: &Spread, scale: f64| {
        format!(
            "{:.1}/{:.1}/{:.1}",
            s.min / scale,
            s.median / scale,
            s.max / scale
        )
    };
    println!(
        "{:<17} {:>20} {:>20} {:>12} {:>16} {:>16} {:>16} {:>20}",
        "proxy",
        "1 stream Gbit/s",
        "8 streams Gbit/s",
        "CPU-s/GB",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "conn/s"
    );
    let mut medians = Vec::new();
    for (p, r) in Proxy::ALL.iter().zip(&results) {
        let t1 = spread(r.tput1.clone());
        let t8 = spread(r.tput8.clone());
        let p50 = spread(r.p50.clone());
        let p99 = spread(r.p99.clone());
        let p999 = spread(r.p999.clone());
        let cr = spread(r.conn_rate.clone());
        // socat's forked children are only counted once reaped, after the run.
        let cpu = if r.cpu_per_gb.is_empty() || *p == Proxy::Socat {
            "-".to_owned()
        } else {
            format!("{:.3}", spread(r.cpu_per_gb.clone()).median)
        };
        println!(
            "{:<17} {:>20} {:>20} {:>12} {:>16} {:>16} {:>16} {:>20}",
            p.name(),
            show(&t1, 1e9),
            show(&t8, 1e9),
            cpu,
            show(&p50, 1.0),
            show(&p99, 1.0),
            show(&p999, 1.0),
            show(&cr, 1.0)
        );
        medians.push((*p, t1.median, t8.median, p99.median, cr.median));
    }
    let get = |p: Proxy| {
        medians
            .iter()
            .find(|m| m.0 == p)
            .copied()
            .context("missing row")
    };
    let (direct, ours, haproxy) = (
        get(Proxy::Direct)?,
        get(Proxy::Edgeproxy)?,
        get(Proxy::Haproxy)?,
    );
    let buffers = get(Proxy::EdgeproxyBuffers)?;
    let epoll = get(Proxy::EdgeproxyEpoll)?;
    let autotuned = get(Proxy::EdgeproxyAutotuned)?;
    let haproxy_sndbuf = get(Proxy::HaproxySndbuf)?;
    let gather = get(Proxy::EdgeproxyGather)?;
    let system_cc = get(Proxy::EdgeproxySystemCc)?;
    let busypoll = get(Proxy::EdgeproxyBusyPoll)?;
    let haproxy_busypoll = get(Proxy::HaproxyBusyPoll)?;
    println!("(min/median/max over {ROUNDS} rounds)");
    println!(
        "core busy during the throughput runs (medians, client core {CLIENT_CPU} / proxy core {PROXY_CPU}; a client core near 100% bounds every proxy alike):"
    );
    for (p, r) in Proxy::ALL.iter().zip(&results) {
        let busy = |v: &[(f64, f64)]| {
            let c = spread(v.iter().map(|x| x.0 * 100.0).collect()).median;
            let q = spread(v.iter().map(|x| x.1 * 100.0).collect()).median;
            format!("{c:.0}% / {q:.0}%")
        };
        // Throughput per busy proxy core (all work on CPU 1 counts: the proxy's own
        // and the kernel's on its behalf) — what the proxy would move if its core were
        // the limit, an extrapolation reported beside the measured throughput.
        let per_core = |t: &[f64], b: &[(f64, f64)]| {
            let v: Vec<f64> = t
                .iter()
                .zip(b)
                .filter(|(_, b)| b.1 > 0.05)
                .map(|(t, b)| t / 1e9 / b.1)
                .collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", spread(v).median)
            }
        };
        println!(
            "  {:<17} 1 stream {:>11}   8 streams {:>11}   Gbit/s per busy proxy core: {:>5} / {:>5}",
            p.name(),
            busy(&r.busy1),
            busy(&r.busy8),
            per_core(&r.tput1, &r.busy1),
            per_core(&r.tput8, &r.busy8)
        );
    }
    println!(
        "reverse direction (iperf3 -R: the server sends, the proxy writes to the client), Gbit/s min/median/max:"
    );
    for (p, r) in Proxy::ALL.iter().zip(&results) {
        println!(
            "  {:<19} 1 stream {:>16}   8 streams {:>16}",
            p.name(),
            show(&spread(r.rev1.clone()), 1e9),
            show(&spread(r.rev8.clone()), 1e9)
        );
    }
    let reverse = |p: Proxy| -> (f64, f64) {
        let r = &results[Proxy::ALL
            .iter()
            .position(|&q| q == p)
            .expect("every proxy is in ALL")];
        (spread(r.rev1.clone()).median, spread(r.rev8.clone()).median)
    };
    let ours_rev = reverse(Proxy::Edgeproxy);
    let against = |p: Proxy| {
        let b = reverse(p);
        format!(
            "1 stream {:.2}, 8 streams {:.2}",
            ours_rev.0 / b.0,
            ours_rev.1 / b.1
        )
    };
    println!(
        "ratios (medians), reverse direction: edgeproxy / direct: {}; edgeproxy / haproxy: {}; edgeproxy / edgeproxy-systemcc: {}",
        against(Proxy::Direct),
        against(Proxy::Haproxy),
        against(Proxy::EdgeproxySystemCc)
    );
    println!(
        "light load ({LIGHT_RATE} paced 64-byte round trips a second on one connection; medians): the proxy's share of its core, p50 / p99 µs:"
    );
    for (p, r) in Proxy::ALL.iter().zip(&results) {
        // socat's forked children are only counted once reaped.
        let busy = if r.light_busy.is_empty() || *p == Proxy::Socat {
            "-".to_owned()
        } else {
            format!("{:.1}%", spread(r.light_busy.clone()).median * 100.0)
        };
        println!(
            "  {:<19} {:>7}   {:>5.0} / {:>5.0}",
            p.name(),
            busy,
            spread(r.light_p50.clone()).median,
            spread(r.light_p99.clone()).median
        );
    }
    println!(
        "ratios (medians): edgeproxy / direct: 1 stream {:.2}, 8 streams {:.2}; edgeproxy / haproxy: 1 stream {:.2}, 8 streams {:.2}, connections/s {:.2}; p99 edgeproxy {:.0} µs vs haproxy {:.0} µs",
        ours.1 / direct.1,
        ours.2 / direct.2,
        ours.1 / haproxy.1,
        ours.2 / haproxy.2,
        ours.4 / haproxy.4,
        ours.3,
        haproxy.3
    );
    println!(
        "ratios (medians): edgeproxy-buffers / direct: 1 stream {:.2}, 8 streams {:.2}; / haproxy: 1 stream {:.2}, 8 streams {:.2}",
        buffers.1 / direct.1,
        buffers.2 / direct.2,
        buffers.1 / haproxy.1,
        buffers.2 / haproxy.2
    );
    // Medians of `a` over those of `b`: throughput (one and eight streams), p99 and
    // connections per second.
    let versus = |a: (Proxy, f64, f64, f64, f64), b: (Proxy, f64, f64, f64, f64)| {
        format!(
            "1 stream {:.2}, 8 streams {:.2}, p99 {:.2}, connections/s {:.2}",
            a.1 / b.1,
            a.2 / b.2,
            a.3 / b.3,
            a.4 / b.4
        )
    };
    println!(
        "ratios (medians): edgeproxy-epoll / edgeproxy (io_uring): {}",
        versus(epoll, ours)
    );
    println!(
        "ratios (medians): send buffers fixed for peers on this host, with the system's congestion control: edgeproxy-systemcc / edgeproxy-autotuned: {}; haproxy-sndbuf / haproxy: {}; edgeproxy / haproxy-sndbuf: {}",
        versus(system_cc, autotuned),
        versus(haproxy_sndbuf, haproxy),
        versus(ours, haproxy_sndbuf)
    );
    println!(
        "ratios (medians): polling instead of gathering under bulk traffic: edgeproxy / edgeproxy-gather: {}",
        versus(ours, gather)
    );
    println!(
        "ratios (medians): local_congestion (reno, autotuned send buffers) instead of the system's congestion control (fixed send buffers): edgeproxy / edgeproxy-systemcc: {}; edgeproxy-systemcc / direct: 1 stream {:.2}, 8 streams {:.2}",
        versus(ours, system_cc),
        system_cc.1 / direct.1,
        system_cc.2 / direct.2
    );
    println!(
        "ratios (medians): busy polling: edgeproxy-busypoll / direct: 1 stream {:.2}, 8 streams {:.2}; edgeproxy-busypoll / haproxy-busypoll: {}; edgeproxy-busypoll / edgeproxy: {}; haproxy-busypoll / haproxy: {}",
        busypoll.1 / direct.1,
        busypoll.2 / direct.2,
        versus(busypoll, haproxy_busypoll),
        versus(busypoll, ours),
        versus(haproxy_busypoll, haproxy)
    );
    // The forwarding issue's targets, judged on this run's medians.
    for (a, b) in [(ours, haproxy), (busypoll, haproxy_busypoll)] {
        // (what, the ratio, its floor): p99 as the other's over ours, so ≥ 1 is no worse.
        let judged: Vec<String> = [
            ("1 stream ≥ 0.90 of direct", a.1 / direct.1, 0.9),
            ("8 streams ≥ 0.90 of direct", a.2 / direct.2, 0.9),
            ("1 stream ≥ 1.2×", a.1 / b.1, 1.2),
            ("8 streams ≥ 1.2×", a.2 / b.2, 1.2),
            ("p99 no worse", b.3 / a.3, 1.0),
        ]
        .iter()
        .map(|&(what, ratio, floor)| {
            let verdict = if ratio >= floor { "met" } else { "MISSED" };
            format!("{what} {verdict} ({ratio:.3})")
        })
        .collect();
        println!(
            "targets, {} against {}: {}",
            a.0.name(),
            b.0.name(),
            judged.join("; ")
        );
    }
    Ok(())
}

//! edgeproxy against rsyslog (imudp) and syslog-ng (udp `syslog()` source), each a
//! receiver on one core writing every message to a file, fed the same traffic by the same
//! generator in the same run.
//!
//! Both peers are Debian packages that conflict with each other (each provides
//! `system-log-daemon`), so `cargo xtask bench` unpacks them and their libraries side by
//! side into a private prefix (`EDGEPROXY_PEERS`, default `target/peers`) instead of
//! installing them: the machine's own logger is left alone.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edgeproxy_testbed::{netns::VethPair, scratch::ScratchDir};

use super::logs::{GENERATOR_CPU, capture_daemon_args, flood, loss_pct, rate_label};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Receiver {
    Edgeproxy,
    /// edgeproxy with the epoll engine.
    EdgeproxyEpoll,
    /// edgeproxy taking the datagrams from its XDP capture rule instead of a socket.
    EdgeproxyXdp,
    /// edgeproxy (io_uring) writing JSON lines instead of syslog text lines.
    EdgeproxyJson,
    Rsyslog,
    SyslogNg,
}

impl Receiver {
    const ALL: [Receiver; 6] = [
        Receiver::Edgeproxy,
        Receiver::EdgeproxyEpoll,
        Receiver::EdgeproxyXdp,
        Receiver::EdgeproxyJson,
        Receiver::Rsyslog,
        Receiver::SyslogNg,
    ];

    fn name(self) -> &'static str {
        match self {
            Receiver::Edgeproxy => "edgeproxy",
            Receiver::EdgeproxyEpoll => "edgeproxy-epoll",
            Receiver::EdgeproxyXdp => "edgeproxy-xdp",
            Receiver::EdgeproxyJson => "edgeproxy-json",
            Receiver::Rsyslog => "rsyslog",
            Receiver::SyslogNg => "syslog-ng",
        }
    }
}

/// Where `cargo xtask bench` unpacked the peers: `$EDGEPROXY_PEERS`, else target/peers.
pub(super) use edgeproxy_testbed::peers::{library_path as peer_library_path, root as peers_root};

/// Where the unpacked peers live, and how to run them from there.
struct Peers {
    root: PathBuf,
}

impl Peers {
    fn locate() -> anyhow::Result<Self> {
        let root = peers_root();
        if !root.join("usr/sbin/rsyslogd").exists() || !root.join("usr/sbin/syslog-ng").exists() {
            bail!(
                "rsyslog and syslog-ng are not unpacked under {}: run `cargo xtask bench logs`, which unpacks them",
                root.display()
            );
        }
        Ok(Self { root })
    }

    fn ld_library_path(&self) -> std::ffi::OsString {
        peer_library_path(&self.root)
    }

    fn command(&self, r: Receiver) -> Command {
        let bin = match r {
            Receiver::Rsyslog => self.root.join("usr/sbin/rsyslogd"),
            _ => self.root.join("usr/sbin/syslog-ng"),
        };
        let mut c = Command::new(bin);
        c.env("LD_LIBRARY_PATH", self.ld_library_path());
        c
    }

    fn rsyslog_modules(&self) -> PathBuf {
        self.root.join("usr/lib/x86_64-linux-gnu/rsyslog")
    }

    fn syslog_ng_modules(&self) -> PathBuf {
        self.root.join("usr/lib/syslog-ng/3.38")
    }

    /// The version line of each peer; a binary that does not run is an error here, not
    /// a silent zero in the table.
    fn versions(&self) -> anyhow::Result<(String, String)> {
        let first_line = |mut c: Command, what: &str| -> anyhow::Result<String> {
            let out = c.output().with_context(|| format!("running {what}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                bail!("{what} failed ({}): {text}", out.status);
            }
            text.lines()
                .next()
                .map(|l| l.trim_end_matches("compiled with:").trim().to_owned())
                .with_context(|| format!("{what} printed no version"))
        };
        let mut rs = self.command(Receiver::Rsyslog);
        rs.arg("-v");
        let mut sng = self.command(Receiver::SyslogNg);
        sng.arg("--module-path")
            .arg(self.syslog_ng_modules())
            .arg("--version");
        Ok((
            first_line(rs, "rsyslogd -v")?,
            first_line(sng, "syslog-ng --version")?,
        ))
    }
}

struct Point {
    sent: u64,
    written: u64,
    /// The receiver process's user + system time.
    cpu_s: f64,
    /// edgeproxy-xdp only.
    xdp: Option<XdpCost>,
    /// Softirq and hardirq time on the generator's CPU over the flood: the kernel's
    /// receive work for this receiver (the socket stack up to the receive queue, or the
    /// XDP program and its wake-ups).
    softirq_s: f64,
}

/// Runs the receivers named in `only` (all of them when empty): every one at every rate.
pub fn logs_peers(only: &[String]) -> anyhow::Result<()> {
    const SECONDS: f64 = 3.0;
    for name in only {
        if !Receiver::ALL.iter().any(|r| r.name() == name) {
            let known: Vec<&str> = Receiver::ALL.iter().map(|r| r.name()).collect();
            bail!("unknown receiver {name:?} (known: {})", known.join(", "));
        }
    }
    let chosen: Vec<Receiver> = Receiver::ALL
        .into_iter()
        .filter(|r| only.is_empty() || only.iter().any(|n| n == r.name()))
        .collect();
    let peers = Peers::locate()?;
    let (rs, sng) = peers.versions()?;
    println!(
        "bench logs (peers): each receiver on CPU 0 writing every message to a file, generator on CPU 1, {SECONDS} s per point"
    );
    println!("  rsyslog: {rs} (imudp, omfile, default template)");
    println!("  syslog-ng: {sng} (syslog() udp source, file destination)");
    println!(
        "  edgeproxy: io_uring, 1 worker, raw messages to a file sink as syslog text lines (format = \"text\", like rsyslog's file)"
    );
    println!("  edgeproxy-epoll: the same with the epoll engine");
    println!(
        "  edgeproxy-xdp: the same, fed by an XDP capture rule (edgeproxy run --config); its CPU includes the XDP program's kernel run time (BPF stats)"
    );
    println!("  edgeproxy-json: io_uring, raw messages as JSON lines (the richer format)");
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>8} {:>12} {:>12} {:>14} {:>16}",
        "receiver",
        "offered/s",
        "sent",
        "written",
        "loss",
        "written/s",
        "CPU-s/M",
        "lines/CPU-s",
        "+softirq lines/s"
    );
    // The flat-out point of each receiver.
    struct AtMax {
        r: Receiver,
        per_s: f64,
        per_cpu: f64,
        per_cpu_with_softirq: f64,
        lost: u64,
    }
    let mut at_max: Vec<AtMax> = Vec::new();
    for rate in [100_000u64, 250_000, 0] {
        for &r in &chosen {
            let p = point(&peers, r, rate, SECONDS)
                .with_context(|| format!("{} at {rate}/s", r.name()))?;
            let per_s = p.written as f64 / SECONDS;
            println!(
                "{:<16} {:>10} {:>10} {:>10} {:>7.2}% {:>12.0} {:>12.3} {:>14.0} {:>16.0}{}",
                r.name(),
                rate_label(rate),
                p.sent,
                p.written,
                loss_pct(p.sent, p.written),
                per_s,
                1e6 / p.per_cpu().max(1e-9),
                p.per_cpu(),
                p.per_cpu_with_softirq(),
                p.xdp
                    .as_ref()
                    .map(|x| format!(
                        "  (XDP {:.0} ns/packet, {:.1} wake-ups per 1,000 records)",
                        x.ns_per_packet, x.wakeups_per_1000
                    ))
                    .unwrap_or_default()
            );
            anyhow::ensure!(
                p.written <= p.sent,
                "{} wrote {} lines for {} sent: the output holds something else",
                r.name(),
                p.written,
                p.sent
            );
            if rate == 0 {
                at_max.push(AtMax {
                    r,
                    per_s,
                    per_cpu: p.per_cpu(),
                    per_cpu_with_softirq: p.per_cpu_with_softirq(),
                    lost: p.sent - p.written,
                });
            }
        }
    }
    let is_peer = |r: Receiver| matches!(r, Receiver::Rsyslog | Receiver::SyslogNg);
    let best_by = |key: fn(&AtMax) -> f64| {
        at_max
            .iter()
            .filter(|p| is_peer(p.r))
            .max_by(|a, b| key(a).total_cmp(&key(b)))
    };
    let (Some(best_rate), Some(best_cpu), Some(best_all)) = (
        best_by(|p| p.per_s),
        best_by(|p| p.per_cpu),
        best_by(|p| p.per_cpu_with_softirq),
    ) else {
        println!("(no peer ran: no ratios)\n");
        return Ok(());
    };
    for p in at_max.iter().filter(|p| !is_peer(p.r)) {
        let what = match p.r {
            Receiver::EdgeproxyXdp => ", XDP run time included",
            Receiver::EdgeproxyJson => " (JSON lines)",
            _ => "",
        };
        println!(
            "flat out: {} writes {:.2}x the lines/s of the best peer ({}) and takes {:.2}x the lines per CPU-second of the best peer ({}){what}; {:.2}x ({}) counting everyone's softirq receive work",
            p.r.name(),
            p.per_s / best_rate.per_s.max(1e-9),
            best_rate.r.name(),
            p.per_cpu / best_cpu.per_cpu.max(1e-9),
            best_cpu.r.name(),
            p.per_cpu_with_softirq / best_all.per_cpu_with_softirq.max(1e-9),
            best_all.r.name(),
        );
    }
    if at_max
        .iter()
        .any(|p| p.r == Receiver::Edgeproxy && p.lost == 0)
    {
        println!(
            "(edgeproxy lost nothing flat out: its written/s is the generator's limit, not its own; lines per CPU-second is the capacity comparison)"
        );
    }
    println!(
        "(written = lines in the receiver's output file after a clean stop; loss = sent - written; CPU-s/M = CPU seconds per million lines written, the inverse of lines/CPU-s = written over the receiver process's user+system time from /proc over the flood and until its output settled (start-up excluded for all), plus the XDP program's run time for edgeproxy-xdp, without the kernel's softirq receive work on the generator's CPU; +softirq = written over the process's time plus that CPU's softirq time (/proc/stat, tick-sampled), which for edgeproxy-xdp holds the XDP program)\n"
    );
    Ok(())
}

/// The XDP program's share of an edgeproxy-xdp point (BPF run-time statistics).
struct XdpCost {
    run_time_s: f64,
    ns_per_packet: f64,
    /// Consumer wake-ups the program forced per thousand records.
    wakeups_per_1000: f64,
}

impl Point {
    /// Lines per CPU-second of the receiver, counting the XDP program for edgeproxy-xdp
    /// but no one's softirq receive work.
    fn per_cpu(&self) -> f64 {
        let xdp = self.xdp.as_ref().map_or(0.0, |x| x.run_time_s);
        self.written as f64 / (self.cpu_s + xdp).max(1e-9)
    }

    /// Lines per CPU-second counting everyone's kernel receive work (the softirq on the
    /// generator's CPU, which for edgeproxy-xdp is where the XDP program runs).
    fn per_cpu_with_softirq(&self) -> f64 {
        self.written as f64 / (self.cpu_s + self.softirq_s).max(1e-9)
    }
}

/// One receiver at one offered rate, on a fresh veth pair.
fn point(peers: &Peers, r: Receiver, rate: u64, seconds: f64) -> anyhow::Result<Point> {
    const PORT: u16 = 5560;
    let pair = VethPair::create()?;
    let dir = ScratchDir::new()?;
    let out = dir.path().join("out.log");
    let addr = pair.a_v4;
    let mut cmd = match r {
        Receiver::Edgeproxy | Receiver::EdgeproxyEpoll | Receiver::EdgeproxyJson => {
            let engine = if r == Receiver::EdgeproxyEpoll {
                "epoll"
            } else {
                "io_uring"
            };
            let format = if r == Receiver::EdgeproxyJson {
                "json"
            } else {
                "text"
            };
            let cfg = dir.file(
                "edgeproxy.toml",
                &format!(
                    "[engine]\nkind = \"{engine}\"\ndata_cpus = [0]\n\
                     [[listener]]\naddress = \"{addr}:{PORT}\"\nrcvbuf = 8388608\n\
                     [window]\nseconds = 1\n\
                     [[sink]]\nkind = \"file\"\npath = \"{}\"\nwhat = \"raw\"\nformat = \"{format}\"\nfsync = \"never\"\n",
                    out.display()
                ),
            );
            let mut c = pair.a.command(edgeproxy_testbed::edgeproxy_bin()?);
            // As root, like the peers it is compared with.
            c.args(["logs", "--user", "root", "--duration", "300", "--config"])
                .arg(cfg);
            c
        }
        Receiver::EdgeproxyXdp => {
            let args = capture_daemon_args(
                &dir,
                &pair,
                PORT,
                &format!(
                    "[[sink]]\nkind = \"file\"\npath = \"{}\"\nwhat = \"raw\"\nformat = \"text\"\nfsync = \"never\"\n",
                    out.display()
                ),
            );
            let mut c = pair.a.command(edgeproxy_testbed::edgeproxy_bin()?);
            c.args(args);
            c
        }
        Receiver::Rsyslog => {
            let cfg = dir.file(
                "rsyslog.conf",
                &format!(
                    "global(workDirectory=\"{}\")\n\
                     module(load=\"imudp\")\n\
                     input(type=\"imudp\" address=\"{addr}\" port=\"{PORT}\" rcvbufSize=\"8m\")\n\
                     *.* action(type=\"omfile\" file=\"{}\")\n",
                    dir.path().display(),
                    out.display()
                ),
            );
            let mut c = peers.command(r);
            c.arg("-n")
                .arg("-f")
                .arg(cfg)
                .arg("-i")
                .arg(dir.path().join("rsyslogd.pid"))
                .arg("-M")
                .arg(peers.rsyslog_modules());
            // `command` builds a plain Command; enter the namespace the same way the
            // harness does for its own.
            pair.a.wrap(c)
        }
        Receiver::SyslogNg => {
            let cfg = dir.file(
                "syslog-ng.conf",
                &format!(
                    "@version: 3.38\n\
                     options {{ threaded(yes); use_dns(no); use_fqdn(no); keep_hostname(yes); stats_freq(0); }};\n\
                     source s {{ syslog(ip(\"{addr}\") port({PORT}) transport(\"udp\") so_rcvbuf(8388608)); }};\n\
                     destination d {{ file(\"{}\"); }};\n\
                     log {{ source(s); destination(d); }};\n",
                    out.display()
                ),
            );
            let mut c = peers.command(r);
            c.arg("--foreground")
                .arg("--no-caps")
                .arg("--module-path")
                .arg(peers.syslog_ng_modules())
                .arg("--cfgfile")
                .arg(cfg)
                .arg("--pidfile")
                .arg(dir.path().join("syslog-ng.pid"))
                .arg("--control")
                .arg(dir.path().join("syslog-ng.ctl"))
                .arg("--persist-file")
                .arg(dir.path().join("syslog-ng.persist"));
            pair.a.wrap(c)
        }
    };
    // SAFETY: runs in the forked child before exec and only calls sched_setaffinity(2),
    // which is async-signal-safe; every thread the receiver starts inherits CPU 0.
    unsafe {
        cmd.pre_exec(|| {
            let mut set = nix::sched::CpuSet::new();
            set.set(0).map_err(std::io::Error::from)?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .map_err(std::io::Error::from)
        });
    }
    let log = std::fs::File::create(dir.path().join("receiver.log"))?;
    let stdout_path = dir.path().join("stdout");
    let mut child = edgeproxy_testbed::Reaped(Some(
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_path)?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", r.name()))?,
    ));
    let pid = child.pid();
    let bound = if r == Receiver::EdgeproxyXdp {
        PORT + 1
    } else {
        PORT
    };
    wait_bound(&pair, bound, &dir, Duration::from_secs(10))?;
    let cpu_before = process_cpu_s(pid.as_raw())?;
    let softirq_before = softirq_s(GENERATOR_CPU)?;
    let sent = flood(&pair, PORT, rate, seconds)?;
    // The receive softirq runs in the generator's sends: over the flood, not the settle.
    let softirq_s = softirq_s(GENERATOR_CPU)? - softirq_before;
    settle(&out, Duration::from_millis(1500), Duration::from_secs(30));
    let cpu_s = process_cpu_s(pid.as_raw())? - cpu_before;
    let mut xdp = None;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = child.take().wait()?;
    let is_ours = !matches!(r, Receiver::Rsyslog | Receiver::SyslogNg);
    if !status.success() && is_ours {
        bail!(
            "edgeproxy exited with {status}: {}",
            std::fs::read_to_string(dir.path().join("receiver.log")).unwrap_or_default()
        );
    }
    if r == Receiver::EdgeproxyXdp {
        // The run report (pretty JSON after the pipeline's summary line) holds the XDP
        // program's kernel run time over the run; packets only ran it during the flood.
        let text = std::fs::read_to_string(&stdout_path)?;
        let report = text
            .split_once('\n')
            .map(|(_, rest)| rest)
            .context("no run report")?;
        let v: serde_json::Value = serde_json::from_str(report).context("the run report")?;
        let ns = v["xdp_cost"]["run_time_ns"]
            .as_u64()
            .context("xdp_cost.run_time_ns in the run report")?;
        let runs = v["xdp_cost"]["run_count"]
            .as_u64()
            .context("xdp_cost.run_count in the run report")?;
        let stat = |name: &str| {
            v["counters"]["stats"][name]
                .as_u64()
                .with_context(|| format!("counters.stats.{name} in the run report"))
        };
        let wakeups =
            stat("record_wakeups")? as f64 * 1000.0 / stat("records_pushed")?.max(1) as f64;
        xdp = Some(XdpCost {
            run_time_s: ns as f64 / 1e9,
            ns_per_packet: ns as f64 / runs.max(1) as f64,
            wakeups_per_1000: wakeups,
        });
    }
    let written = std::fs::read(&out)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .with_context(|| {
            format!(
                "{} wrote no output file; its log: {}",
                r.name(),
                std::fs::read_to_string(dir.path().join("receiver.log")).unwrap_or_default()
            )
        })?;
    Ok(Point {
        sent,
        written,
        cpu_s,
        xdp,
        softirq_s,
    })
}

/// Waits until a UDP socket in `pair.a` is bound to `port` (read from the namespace's own
/// /proc/net/udp), so no datagram is sent before the receiver can take it.
fn wait_bound(pair: &VethPair, port: u16, dir: &ScratchDir, limit: Duration) -> anyhow::Result<()> {
    let needle = format!(":{port:04X} ");
    let start = Instant::now();
    loop {
        let bound = pair.a.run(|| {
            std::fs::read_to_string("/proc/thread-self/net/udp")
                .map(|t| t.lines().skip(1).any(|l| l.contains(&needle)))
                .unwrap_or(false)
        });
        if bound {
            // Sockets are bound before every receiver's input thread runs its loop.
            std::thread::sleep(Duration::from_millis(300));
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!(
                "the receiver never bound UDP port {port}; its log: {}",
                std::fs::read_to_string(dir.path().join("receiver.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `path` has not grown for `quiet` (the receiver caught up), at most `limit`.
fn settle(path: &Path, quiet: Duration, limit: Duration) {
    let start = Instant::now();
    let mut last = (0u64, Instant::now());
    while start.elapsed() < limit {
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        if len != last.0 {
            last = (len, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Seconds one CPU has spent in softirq and hardirq context since boot (/proc/stat, in
/// USER_HZ units; without IRQ time accounting, as here, sampled at the tick, so a 3 s
/// point carries a few percent of noise). Hardirq counts too: the XDP program's consumer
/// wake-up runs as an irq_work.
fn softirq_s(cpu: usize) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields = super::proc_stat_line(&stat, &format!("cpu{cpu}"))?;
    // user nice system idle iowait irq softirq …
    let ticks = fields.get(5).context("irq field in /proc/stat")?
        + fields.get(6).context("softirq field in /proc/stat")?;
    Ok(ticks as f64 / super::ticks_per_s())
}

/// User + system CPU seconds of a whole process (all its threads), from /proc.
pub(super) fn process_cpu_s(pid: i32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let sticks: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    Ok((ticks + sticks) as f64 / super::ticks_per_s())
}

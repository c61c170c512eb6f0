//! `cargo xtask bench [xdp]`: every figure next to a baseline measured in the same run,
//! because timings on a shared machine drift.
//!
//! Suite `xdp`:
//! 1. ns/packet through BPF_PROG_TEST_RUN for the floor (an empty XDP_PASS program from
//!    the same object) and for `edge_xdp` with no policy, one rule, 100,000 prefixes and a
//!    sampling rule; interleaved run by run; min/median/max and the ratio to the floor.
//! 2. Time to apply a 100,000-prefix policy (compile, apply up to the flip, clean-up).
//! 3. Kernel run time per packet (BPF_ENABLE_STATS) under real veth traffic.
//! 4. Drop rate against xdp-filter and an nftables netdev-ingress rule with the same match,
//!    each receiving the same bounded trafgen burst on a fresh veth pair.
use std::{fmt::Write as _, process::ExitCode, time::Instant};

use anyhow::{Context as _, bail};
use edgeproxy_testbed::{
    netns::{VethPair, mac_string},
    packets::{self, Ipv4Extra, L4},
    policy_util,
    scratch::ScratchDir,
    traffic,
};
use proxy_common::{EDGE_XDP_PROGRAM, FLOOR_XDP_PROGRAM, policy::Verdict, reference::ETH_P_IP};
use proxy_user::dataplane::{
    Dataplane, HookChoice, LoadOptions, RecordTally, enable_run_time_stats,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

struct Options {
    runs: usize,
    repeat: u32,
    burst: u64,
    suites: Vec<String>,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 15,
        // Per test-run call; the record ring is drained between calls.
        repeat: 20_000,
        burst: 2_000_000,
        suites: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> anyhow::Result<u64> {
        v.and_then(|v| v.parse().ok())
            .filter(|&n: &u64| n > 0)
            .ok_or_else(|| anyhow::anyhow!("{what} needs a positive number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => o.runs = num(args.next(), "--runs")? as usize,
            "--repeat" => o.repeat = num(args.next(), "--repeat")? as u32,
            "--burst" => o.burst = num(args.next(), "--burst")?,
            "xdp" | "logs-decode" | "logs" => o.suites.push(a),
            other => bail!(
                "unknown argument {other:?} (suites: xdp, logs-decode, logs; options: --runs N, --repeat N, --burst N)"
            ),
        }
    }
    if o.suites.is_empty() {
        o.suites = vec!["xdp".into(), "logs-decode".into(), "logs".into()];
    }
    Ok(o)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let o = parse_args()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("benchmarks need root (BPF_PROG_TEST_RUN, namespaces, XDP)");
    }
    if o.suites.iter().any(|s| s == "xdp") {
        test_run_scenarios(&o)?;
        apply_time()?;
        veth_cost()?;
        drop_rates(&o)?;
    }
    if o.suites.iter().any(|s| s == "logs-decode") {
        logs_decode(&o)?;
    }
    if o.suites.iter().any(|s| s == "logs") {
        logs_pipeline()?;
    }
    Ok(())
}

/// Decoding throughput on one core: edgeproxy's zero-copy decoder against syslog_loose
/// (the parser Vector uses), on the same corpus, interleaved run by run.
fn logs_decode(o: &Options) -> anyhow::Result<()> {
    use proxy_user::logs::decode::decode;
    let mut rng = StdRng::seed_from_u64(11);
    let apps = ["nginx", "sshd", "kernel", "api", "cron"];
    let lines: Vec<String> = (0..100_000)
        .map(|i| {
            let app = apps[i % apps.len()];
            let pid = rng.random_range(1..65535);
            let n: u32 = rng.random();
            if i % 2 == 0 {
                format!("<{}>1 2026-11-24T02:43:{:02}.{:06}Z edge{} {app} {pid} ID{} - request {n} served in {} ms", 8 + i % 8, i % 60, n % 1_000_000, i % 16, i % 100, n % 997)
            } else {
                format!("<{}>Nov 24 02:43:{:02} edge{} {app}[{pid}]: request {n} served in {} ms", 8 + i % 8, i % 60, i % 16, n % 997)
            }
        })
        .collect();
    let rx = 1_795_315_380_000_000_000i64;
    let bytes: usize = lines.iter().map(String::len).sum();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut sink = 0usize;
    for round in 0..=o.runs.min(9) {
        let t = Instant::now();
        for l in &lines {
            let r = decode(l.as_bytes(), rx);
            sink += r.message.len() + usize::from(r.severity.unwrap_or(0));
        }
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for l in &lines {
            let m = syslog_loose::parse_message(l, syslog_loose::Variant::Either);
            sink += m.msg.len() + m.severity.map_or(0, |s| s as usize);
        }
        let b = t.elapsed().as_secs_f64();
        if round > 0 {
            ours.push(lines.len() as f64 / a);
            theirs.push(lines.len() as f64 / b);
        }
    }
    let (a, b) = (spread(ours), spread(theirs));
    println!(
        "bench logs-decode: {} lines ({} MB, half RFC 5424, half RFC 3164), one core, {} interleaved runs (checksum {sink})",
        lines.len(),
        bytes / 1_000_000,
        o.runs.min(9)
    );
    println!(
        "{:<28} {:>12} {:>14} {:>12}",
        "decoder", "min lines/s", "median lines/s", "max lines/s"
    );
    println!(
        "{:<28} {:>12.0} {:>14.0} {:>12.0}",
        "edgeproxy (zero-copy)", a.min, a.median, a.max
    );
    println!(
        "{:<28} {:>12.0} {:>14.0} {:>12.0}",
        "syslog_loose 0.23", b.min, b.median, b.max
    );
    println!(
        "ratio edgeproxy/syslog_loose (medians): {:.2}x\n",
        a.median / b.median.max(1.0)
    );
    Ok(())
}

struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    Spread {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

/// 100,000 distinct IPv4 prefixes in four rules, and a source address inside one.
fn hundred_k_policy() -> (String, std::net::Ipv4Addr) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut seen = std::collections::HashSet::new();
    let mut text = String::new();
    let mut inside = std::net::Ipv4Addr::UNSPECIFIED;
    for r in 0..4 {
        let _ = write!(
            text,
            "[[rule]]\nname = \"r{r}\"\naction = \"drop\"\nsrc = ["
        );
        let mut n = 0;
        while n < 25_000 {
            let len = rng.random_range(16..=32u8);
            let addr = rng.random::<u32>() & (u32::MAX << (32 - u32::from(len)));
            if seen.insert((addr, len)) {
                let _ = write!(text, "\"{}/{len}\",", std::net::Ipv4Addr::from(addr));
                if r == 3 && n == 12_345 {
                    inside = std::net::Ipv4Addr::from(addr | 1);
                }
                n += 1;
            }
        }
        text.push_str("]\n");
    }
    // Matching packets would be dropped by r3; the measured packet is passed by a final
    // rule only if it misses, so the figure is the full-depth lookup either way.
    (text, inside)
}

fn test_run_scenarios(o: &Options) -> anyhow::Result<()> {
    let (big, inside) = hundred_k_policy();
    let scenarios: Vec<(&str, &str, Option<String>)> = vec![
        ("floor (empty XDP_PASS)", FLOOR_XDP_PROGRAM, None),
        ("edge_xdp, no policy", EDGE_XDP_PROGRAM, Some(String::new())),
        (
            "edge_xdp, 1 rule",
            EDGE_XDP_PROGRAM,
            Some("[[rule]]\nproto = \"udp\"\ndst_port = 514\naction = \"pass\"\n".into()),
        ),
        ("edge_xdp, 100k prefixes", EDGE_XDP_PROGRAM, Some(big)),
        (
            "edge_xdp, sample 1/1000",
            EDGE_XDP_PROGRAM,
            Some(
                "[[rule]]\nproto = \"udp\"\naction = \"sample\"\nrate = \"1/1000\"\nsnap = 64\n"
                    .into(),
            ),
        ),
    ];
    let pkt = packets::ethernet(
        &[],
        ETH_P_IP,
        &packets::ipv4(
            inside,
            "10.200.0.2".parse()?,
            &L4::udp(40000, 514, 64 - 14 - 20 - 8),
            &Ipv4Extra::default(),
        ),
    );
    let mut planes = Vec::new();
    for (_, _, policy) in &scenarios {
        let mut dp = Dataplane::load(LoadOptions::default())?;
        if let Some(p) = policy.as_deref().filter(|p| !p.is_empty()) {
            policy_util::load(&mut policy_util::loader(&mut dp), p);
        }
        let records = dp.take_records()?;
        planes.push((dp, records));
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
    let mut tally = RecordTally::default();
    for round in 0..=o.runs {
        for (i, (_, prog, _)) in scenarios.iter().enumerate() {
            let (dp, records) = &mut planes[i];
            let ns = dp.test_runner(prog)?.run(&pkt, o.repeat)?.mean_ns as f64;
            records.drain(&mut tally, |_| {});
            if round > 0 {
                samples[i].push(ns); // round 0 warms up
            }
        }
    }
    println!(
        "bench xdp: BPF_PROG_TEST_RUN, {}-byte UDP/IPv4 frame, {} runs x {} repeats, interleaved",
        pkt.len(),
        o.runs,
        o.repeat
    );
    println!(
        "{:<28} {:>8} {:>10} {:>8} {:>12}",
        "program", "min ns", "median ns", "max ns", "vs floor"
    );
    let floor = spread(samples[0].clone()).median.max(1.0);
    for ((name, ..), s) in scenarios.iter().zip(samples) {
        let s = spread(s);
        println!(
            "{:<28} {:>8.0} {:>10.0} {:>8.0} {:>11.2}x",
            name,
            s.min,
            s.median,
            s.max,
            s.median / floor
        );
    }
    let full: u64 = planes
        .iter()
        .map(|(dp, _)| {
            dp.counters()
                .and_then(|c| c.snapshot())
                .map(|s| s.stat(proxy_common::DataplaneStat::RingbufFull))
                .unwrap_or(0)
        })
        .sum();
    println!(
        "records drained during the runs: {}; ring-full drops: {full}\n",
        tally.total()
    );
    Ok(())
}

fn apply_time() -> anyhow::Result<()> {
    let (text, _) = hundred_k_policy();
    let policy = policy_util::policy(&text);
    let mut dp = Dataplane::load(LoadOptions::default())?;
    let mut loader = policy_util::loader(&mut dp);
    let mut parse = Vec::new();
    let mut compile = Vec::new();
    let mut apply = Vec::new();
    let mut cleanup = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let p = policy_util::policy(&text);
        parse.push(t.elapsed().as_secs_f64() * 1e3);
        drop(p);
        let r = loader
            .load(&policy, &text)
            .context("loading 100k prefixes")?;
        compile.push(r.compile.as_secs_f64() * 1e3);
        apply.push(r.apply.as_secs_f64() * 1e3);
        cleanup.push(r.cleanup.as_secs_f64() * 1e3);
    }
    println!("bench xdp: applying a 100,000-prefix policy, 7 loads (target: apply < 100 ms)");
    println!(
        "{:<34} {:>8} {:>10} {:>8}",
        "phase", "min ms", "median ms", "max ms"
    );
    for (name, v) in [
        ("parse + validate (TOML)", parse),
        ("compile", compile),
        ("apply (write slot + flip)", apply),
        ("clean-up after the flip", cleanup),
    ] {
        let s = spread(v);
        println!(
            "{:<34} {:>8.1} {:>10.1} {:>8.1}",
            name, s.min, s.median, s.max
        );
    }
    println!();
    Ok(())
}

fn veth_cost() -> anyhow::Result<()> {
    let pair = VethPair::create()?;
    let n = 200_000u64;
    let result = pair.a.run(|| -> anyhow::Result<Vec<(&str, f64, u64)>> {
        let mut out = Vec::new();
        for (name, policy) in [
            ("no policy", None),
            (
                "1 rule (pass)",
                Some("[[rule]]\nproto = \"udp\"\ndst_port = 9\naction = \"pass\"\n"),
            ),
            (
                "sample 1/100",
                Some(
                    "[[rule]]\nproto = \"udp\"\naction = \"sample\"\nrate = \"1/100\"\nsnap = 64\n",
                ),
            ),
        ] {
            let mut dp = Dataplane::load(LoadOptions::default())?;
            if let Some(p) = policy {
                policy_util::load(&mut policy_util::loader(&mut dp), p);
            }
            dp.attach(pair.a_if, HookChoice::Native)?;
            let _stats = enable_run_time_stats()?;
            let before = dp.program_stats()?;
            traffic::send_udp(&pair.b, (pair.a_v4, 9).into(), n, 18)?;
            let d = dp.program_stats()?.since(&before);
            out.push((name, d.ns_per_run().unwrap_or(0.0), d.run_count));
        }
        Ok(out)
    })?;
    println!(
        "bench xdp: kernel run time per packet under veth traffic (BPF_ENABLE_STATS, {n} datagrams each)"
    );
    for (name, ns, runs) in result {
        println!("{name:<20} {ns:>8.1} ns/packet over {runs} runs");
    }
    println!();
    Ok(())
}

/// softirq + system CPU time of the whole machine, in nanoseconds (from /proc/stat).
fn cpu_ns() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let to_ns = |ticks: u64| ticks * 1_000_000_000 / hz.max(1);
    // user nice system idle iowait irq softirq
    Ok((
        to_ns(*f.get(6).unwrap_or(&0)),
        to_ns(*f.get(2).unwrap_or(&0)),
    ))
}

/// The first line of `program args` that mentions a version. xdp-filter and trafgen exit
/// non-zero after printing theirs, so the text is checked, not the status.
fn tool_version(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| {
            format!("{program} is needed for the drop comparison (cargo xtask bench installs it)")
        })?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| l.chars().any(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .with_context(|| format!("{program} {args:?} printed no version: {text:?}"))
}

#[derive(Clone, Copy, Debug)]
enum Dropper {
    Edgeproxy,
    XdpFilter,
    Nftables,
}

fn drop_rates(o: &Options) -> anyhow::Result<()> {
    let versions = [
        tool_version("xdp-filter", &["load", "--version"])?,
        tool_version("nft", &["--version"])?,
        tool_version("trafgen", &["-v"])?,
    ];
    println!(
        "bench xdp: dropping UDP to port 7000 on veth, {} frames from trafgen per mechanism ({})",
        o.burst,
        versions.join("; ")
    );
    println!(
        "{:<12} {:>12} {:>14} {:>18} {:>16}",
        "mechanism", "dropped", "drop rate pps", "softirq ns/packet", "vs edgeproxy"
    );
    let libxdp_dir = std::path::Path::new("/sys/fs/bpf/xdp");
    let libxdp_existed = libxdp_dir.exists();
    let mut rows = Vec::new();
    for d in [Dropper::Edgeproxy, Dropper::XdpFilter, Dropper::Nftables] {
        rows.push((d, drop_one(d, o.burst)?));
    }
    if !libxdp_existed {
        // xdp-filter (libxdp) creates it; leave the machine as we found it.
        let _ = std::fs::remove_dir(libxdp_dir);
    }
    let ours = rows[0].1;
    for (d, (dropped, pps, ns)) in rows {
        println!(
            "{:<12} {:>12} {:>14.0} {:>18.1} {:>15.2}x",
            format!("{d:?}").to_lowercase(),
            dropped,
            pps,
            ns,
            pps / ours.1.max(1.0)
        );
    }
    println!(
        "(drop rate: packets the mechanism dropped per second of the burst; higher is better)"
    );
    Ok(())
}

/// Returns (dropped packets, dropped per second, softirq ns per dropped packet).
fn drop_one(d: Dropper, burst: u64) -> anyhow::Result<(u64, f64, f64)> {
    let pair = VethPair::create()?;
    let dir = ScratchDir::new()?;
    let conf = dir.file(
        "udp.trafgen",
        &format!(
            "{{ eth(da={}, sa={}), ipv4(saddr={}, daddr={}, ttl=64), udp(sp=4000, dp=7000), fill(0x41, 18) }}\n",
            mac_string(&pair.a_mac),
            mac_string(&pair.b_mac),
            pair.b_v4,
            pair.a_v4
        ),
    );
    let run_in_a = |args: &[&str]| -> anyhow::Result<()> {
        let out = pair.a.command(args[0]).args(&args[1..]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let mut dp = None;
    match d {
        Dropper::Edgeproxy => {
            let mut p = pair.a.run(|| -> anyhow::Result<Dataplane> {
                let mut p = Dataplane::load(LoadOptions::default())?;
                policy_util::load(
                    &mut policy_util::loader(&mut p),
                    "[[rule]]\nproto = \"udp\"\ndst_port = 7000\naction = \"drop\"\n",
                );
                p.attach(pair.a_if, HookChoice::Native)?;
                Ok(p)
            })?;
            let _ = p.take_records()?;
            dp = Some(p);
        }
        Dropper::XdpFilter => {
            run_in_a(&["xdp-filter", "load", "-m", "native", pair.a_if])?;
            run_in_a(&["xdp-filter", "port", "-p", "udp", "-m", "dst", "7000"])?;
        }
        Dropper::Nftables => {
            let rules = dir.file(
                "drop.nft",
                &format!(
                    "table netdev epbench {{\n  chain ingress {{\n    type filter hook ingress device \"{}\" priority -500;\n    udp dport 7000 counter drop\n  }}\n}}\n",
                    pair.a_if
                ),
            );
            run_in_a(&["nft", "-f", rules.to_str().context("utf8 path")?])?;
        }
    }
    let (soft0, _) = cpu_ns()?;
    let t = Instant::now();
    let out = pair
        .b
        .command("trafgen")
        // --qdisc-path: backpressure instead of failing with EAGAIN when veth is full.
        .args(["--dev", pair.b_if, "--cpus", "1", "--qdisc-path", "--num"])
        .arg(burst.to_string())
        .arg("--conf")
        .arg(&conf)
        .output()?;
    let elapsed = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "trafgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (soft1, _) = cpu_ns()?;
    let dropped = match d {
        Dropper::Edgeproxy => {
            dp.as_ref()
                .context("data plane")?
                .counters()?
                .snapshot()?
                .verdict(Verdict::DropPolicy)
                .packets
        }
        Dropper::XdpFilter => {
            let out = pair.a.command("xdp-filter").arg("status").output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let n = parse_xdp_filter_dropped(&text)
                .with_context(|| format!("reading xdp-filter status:\n{text}"))?;
            let _ = pair
                .a
                .command("xdp-filter")
                .args(["unload", "--all"])
                .output();
            let _ = pair
                .a
                .command("xdp-filter")
                .args(["unload", pair.a_if])
                .output();
            n
        }
        Dropper::Nftables => {
            let out = pair
                .a
                .command("nft")
                .args(["list", "table", "netdev", "epbench"])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split("counter packets ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("reading the nft counter:\n{text}"))?
        }
    };
    drop(dp);
    let soft = soft1.saturating_sub(soft0) as f64;
    Ok((
        dropped,
        dropped as f64 / elapsed,
        soft / dropped.max(1) as f64,
    ))
}

/// The XDP_DROP packet count in `xdp-filter status` output.
fn parse_xdp_filter_dropped(text: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.trim_start().starts_with("XDP_DROP"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
}

/// `edgeproxy logs` with one worker pinned to CPU 0 and a sendmmsg generator pinned to
/// CPU 1 (two cores: each side gets one), at fixed offered rates and flat out: lines
/// processed per CPU-second of the whole edgeproxy process, and loss (socket drops /
/// sent), for io_uring and epoll in the same run.
fn logs_pipeline() -> anyhow::Result<()> {
    const SECONDS: f64 = 3.0;
    println!(
        "bench logs: edgeproxy logs, 1 worker on CPU 0, generator on CPU 1, {SECONDS} s per point, 100-byte RFC 5424 lines"
    );
    println!(
        "{:<9} {:>12} {:>12} {:>12} {:>10} {:>16}",
        "engine", "offered/s", "sent", "processed", "loss", "lines per CPU-s"
    );
    for engine in ["io_uring", "epoll"] {
        for rate in [100_000u64, 300_000, 0] {
            let (sent, processed, drops, cpu) = logs_point(engine, rate, SECONDS)?;
            println!(
                "{:<9} {:>12} {:>12} {:>12} {:>9.2}% {:>16.0}",
                engine,
                if rate == 0 {
                    "max".to_owned()
                } else {
                    rate.to_string()
                },
                sent,
                processed,
                100.0 * drops as f64 / sent.max(1) as f64,
                processed as f64 / cpu.max(1e-9)
            );
            anyhow::ensure!(
                processed + drops == sent,
                "accounting: sent {sent} != processed {processed} + drops {drops}"
            );
        }
    }
    println!("(accounting checked at every point: sent = processed + socket drops)\n");
    Ok(())
}

fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// One measurement: returns (sent, processed, socket drops, edgeproxy CPU seconds).
fn logs_point(engine: &str, rate: u64, seconds: f64) -> anyhow::Result<(u64, u64, u64, f64)> {
    use std::{io::Read as _, os::fd::AsRawFd as _};
    const PORT: u16 = 5555;
    let pair = VethPair::create()?;
    let dir = ScratchDir::new()?;
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!("[engine]\nkind = \"{engine}\"\ndata_cpus = [0]\n[[listener]]\naddress = \"{}:{PORT}\"\nrcvbuf = 8388608\n[window]\nseconds = 1\n", pair.a_v4),
    );
    let mut child = edgeproxy_testbed::Reaped(Some(
        pair.a
            .command(edgeproxy_testbed::edgeproxy_bin()?)
            .args(["logs", "--duration", "120", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    ));
    let (ok, log) = edgeproxy_testbed::wait_for_line(
        child.0.as_mut().context("child")?,
        "log pipeline started",
    );
    anyhow::ensure!(ok, "edgeproxy did not start: {log:?}");
    let sent = pair.b.run(|| -> anyhow::Result<u64> {
        pin_to(1);
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.connect((pair.a_v4, PORT))?;
        const BATCH: usize = 64;
        let msgs: Vec<Vec<u8>> = (0..BATCH)
            .map(|i| {
                format!("<14>1 2026-11-24T02:43:00Z edge{i} app 1 - - request served in {i} ms ok")
                    .into_bytes()
            })
            .collect();
        let mut iovs: Vec<libc::iovec> = msgs
            .iter()
            .map(|m| libc::iovec {
                iov_base: m.as_ptr() as *mut _,
                iov_len: m.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; all-zero is valid; each points at one iovec above.
        let mut hdrs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (h, iov) in hdrs.iter_mut().zip(iovs.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
        }
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            if rate > 0 {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                if sent >= due {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    continue;
                }
            }
            // SAFETY: `hdrs` holds BATCH initialised headers pointing at live buffers; the
            // socket is connected, so no addresses are needed.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), hdrs.as_mut_ptr(), BATCH as u32, 0) };
            if n > 0 {
                sent += n as u64;
            }
        }
        Ok(sent)
    })?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM)?;
    let mut c = child.take();
    let mut out = String::new();
    let read = c.stdout.take().map(|mut so| so.read_to_string(&mut out));
    // Reap before looking at what was read, so no early return leaves a zombie.
    c.wait()?;
    read.context("no stdout pipe")??;
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().context("no summary")?)?;
    let s = &summary["summary"];
    Ok((
        sent,
        s["counts"]["messages"].as_u64().unwrap_or(0),
        s["kernel_drops"].as_u64().unwrap_or(0),
        s["process_cpu_s"].as_f64().unwrap_or(0.0),
    ))
}

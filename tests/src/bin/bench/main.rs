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
    /// `logs-peers` only: the receivers to run (names as printed); empty runs them all.
    receivers: Vec<String>,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 15,
        // Per test-run call; the record ring is drained between calls.
        repeat: 20_000,
        burst: 2_000_000,
        suites: Vec::new(),
        receivers: Vec::new(),
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
            "--receivers" => {
                let list = args
                    .next()
                    .context("--receivers needs a comma-separated list")?;
                o.receivers = list.split(',').map(str::to_owned).collect();
            }
            "xdp" | "logs-decode" | "logs" | "logs-peers" | "tcp" => o.suites.push(a),
            other => bail!(
                "unknown argument {other:?} (suites: xdp, logs-decode, logs, logs-peers, tcp; options: --runs N, --repeat N, --burst N, --receivers A,B for logs-peers)"
            ),
        }
    }
    if o.suites.is_empty() {
        o.suites = vec![
            "xdp".into(),
            "logs-decode".into(),
            "logs".into(),
            "tcp".into(),
        ];
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

mod logs;
mod peers;
mod tcp;

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
        logs::logs_decode(&o)?;
    }
    if o.suites.iter().any(|s| s == "logs") {
        logs::logs_pipeline()?;
    }
    // `logs` includes the peer comparison; `logs-peers` runs it alone.
    if o.suites.iter().any(|s| s == "logs" || s == "logs-peers") {
        peers::logs_peers(&o.receivers)?;
    }
    if o.suites.iter().any(|s| s == "tcp") {
        tcp::tcp_peers()?;
    }
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

/// Repeats per run of the capture scenario: 5,000 records (352 bytes each with a 64-byte
/// frame) fit the smallest record ring, a 2 MiB per-CPU one.
const CAPTURE_REPEAT: u32 = 5_000;

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
            "edge_xdp, capture",
            EDGE_XDP_PROGRAM,
            Some("[[rule]]\nproto = \"udp\"\ndst_port = 514\naction = \"capture\"\n".into()),
        ),
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
            // A capture run writes a record per repeat: at most what the record ring
            // holds between drains, or a full ring's cheaper failure path is measured.
            let repeat = if scenarios[i].0.contains("capture") {
                o.repeat.min(CAPTURE_REPEAT)
            } else {
                o.repeat
            };
            let ns = dp.test_runner(prog)?.run(&pkt, repeat)?.mean_ns as f64;
            records.drain(&mut tally, |_| {});
            if round > 0 {
                samples[i].push(ns); // round 0 warms up
            }
        }
    }
    println!(
        "bench xdp: BPF_PROG_TEST_RUN, {}-byte UDP/IPv4 frame, {} runs x {} repeats (capture: at most {CAPTURE_REPEAT}, what the record ring holds), interleaved",
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
    let f = proc_stat_line(&std::fs::read_to_string("/proc/stat")?, "cpu")?;
    let to_ns = |ticks: u64| (ticks as f64 * 1e9 / ticks_per_s()) as u64;
    // user nice system idle iowait irq softirq
    Ok((
        to_ns(*f.get(6).unwrap_or(&0)),
        to_ns(*f.get(2).unwrap_or(&0)),
    ))
}

/// The counters of the /proc/stat line `name` (`cpu`: the whole machine; `cpuN`: one
/// CPU), in USER_HZ ticks: user nice system idle iowait irq softirq steal …
fn proc_stat_line(stat: &str, name: &str) -> anyhow::Result<Vec<u64>> {
    stat.lines()
        .find_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')))
        .with_context(|| format!("no {name} line in /proc/stat"))?
        .split_whitespace()
        .map(|v| v.parse().context("a /proc/stat field"))
        .collect()
}

/// USER_HZ: the unit of the tick counters in /proc.
fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
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

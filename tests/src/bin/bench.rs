//! `cargo xtask bench [SUITE]`: benchmarks that report ratios against a baseline measured
//! in the same run, because timings on a shared machine drift.
//!
//! Suite `xdp`: ns/packet of `edge_xdp` through BPF_PROG_TEST_RUN against the floor (an
//! empty XDP_PASS program loaded from the same object the same way), interleaved run by
//! run so drift hits both alike; min/median/max over the runs and the median ratio.
use std::process::ExitCode;

use anyhow::bail;
use edgeproxy_testbed::packets::{self, L4};
use proxy_common::{DataplaneStat, EDGE_XDP_PROGRAM, FLOOR_XDP_PROGRAM};
use proxy_user::dataplane::{Dataplane, LoadOptions, RecordTally};

struct Options {
    suites: Vec<String>,
    runs: usize,
    repeat: u32,
}

fn parse_args() -> anyhow::Result<Options> {
    let mut o = Options {
        suites: Vec::new(),
        runs: 15,
        // Per test-run call; small enough that the record ring (drained between calls)
        // never fills, so the figure is for the normal path, not the ring-full path.
        repeat: 20_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                o.runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow::anyhow!("--runs needs a positive number"))?
            }
            "--repeat" => {
                o.repeat = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow::anyhow!("--repeat needs a positive number"))?
            }
            "xdp" => o.suites.push(a),
            other => {
                bail!("unknown argument {other:?} (suites: xdp; options: --runs N, --repeat N)")
            }
        }
    }
    if o.suites.is_empty() {
        o.suites.push("xdp".into());
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
        bail!("benchmarks need root (BPF_PROG_TEST_RUN)");
    }
    for s in &o.suites {
        match s.as_str() {
            "xdp" => xdp(&o)?,
            _ => unreachable!("validated in parse_args"),
        }
    }
    Ok(())
}

#[derive(Debug)]
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

fn xdp(o: &Options) -> anyhow::Result<()> {
    let mut dp = Dataplane::load(LoadOptions::default())?;
    let mut records = dp.take_records()?;
    let pkt = packets::eth_ipv4(&L4::udp(40000, 514, 64 - 14 - 20 - 8));
    let mut floor = Vec::with_capacity(o.runs);
    let mut edge = Vec::with_capacity(o.runs);
    let mut tally = RecordTally::default();
    {
        let floor_runner = dp.test_runner(FLOOR_XDP_PROGRAM)?;
        let edge_runner = dp.test_runner(EDGE_XDP_PROGRAM)?;
        // One warm-up pair, not recorded.
        floor_runner.run(&pkt, o.repeat)?;
        edge_runner.run(&pkt, o.repeat)?;
        records.drain(&mut tally, |_| {});
        for _ in 0..o.runs {
            floor.push(floor_runner.run(&pkt, o.repeat)?.mean_ns as f64);
            edge.push(edge_runner.run(&pkt, o.repeat)?.mean_ns as f64);
            records.drain(&mut tally, |_| {});
        }
    }
    let full = dp.counters()?.snapshot()?.stat(DataplaneStat::RingbufFull);
    let f = spread(floor);
    let e = spread(edge);
    println!(
        "bench xdp: BPF_PROG_TEST_RUN, {}-byte UDP/IPv4 frame, {} runs x {} repeats, interleaved",
        pkt.len(),
        o.runs,
        o.repeat
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9}",
        "program", "min ns", "median ns", "max ns"
    );
    println!(
        "{:<28} {:>9.0} {:>9.0} {:>9.0}",
        "floor (empty XDP_PASS)", f.min, f.median, f.max
    );
    println!(
        "{:<28} {:>9.0} {:>9.0} {:>9.0}",
        "edge_xdp (count + record)", e.min, e.median, e.max
    );
    println!(
        "ratio edge_xdp/floor (medians): {:.2}x; edge_xdp adds {:.0} ns/packet over the floor",
        e.median / f.median.max(1.0),
        e.median - f.median
    );
    println!(
        "records drained during the bench: {}; dropped because the ring was full: {full}",
        tally.total()
    );
    Ok(())
}

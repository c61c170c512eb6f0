//! Suites `logs-decode` and `logs`: the decoder against syslog_loose, the pipeline at
//! fixed offered rates on each engine, and edgeproxy against rsyslog and syslog-ng
//! receiving the same traffic.
use std::time::Instant;

use anyhow::Context as _;
use edgeproxy_testbed::{netns::VethPair, scratch::ScratchDir};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{Options, spread};

/// Decoding throughput on one core: edgeproxy's zero-copy decoder against syslog_loose
/// (the parser Vector uses), on the same corpus, interleaved run by run.
pub fn logs_decode(o: &Options) -> anyhow::Result<()> {
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

/// `edgeproxy logs` with one worker pinned to CPU 0 and a sendmmsg generator pinned to
/// CPU 1 (two cores: each side gets one), at fixed offered rates and flat out: lines
/// processed per CPU-second of the whole edgeproxy process, and loss (socket drops /
/// sent), for io_uring and epoll in the same run.
pub fn logs_pipeline() -> anyhow::Result<()> {
    const SECONDS: f64 = 3.0;
    println!(
        "bench logs: edgeproxy logs, 1 worker on CPU 0, generator on CPU 1, {SECONDS} s per point, 100-byte RFC 5424 lines"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>10} {:>14} {:>16}",
        "engine", "offered/s", "sent", "processed", "loss", "processed/s", "lines per CPU-s"
    );
    // One line per datagram (how syslog senders send), then 8 per datagram: the same
    // lines with an eighth of the receive syscalls, which lets one generator core offer
    // more than 1 M lines/s and shows what the pipeline itself sustains on one core.
    for (engine, lines, rates) in [
        ("io_uring", 1usize, [100_000u64, 300_000, 0]),
        ("epoll", 1, [100_000, 300_000, 0]),
        ("io_uring", 8, [125_000, 150_000, 0]),
        ("epoll", 8, [125_000, 150_000, 0]),
    ] {
        for rate in rates {
            let (sent, processed, drops, cpu) = logs_point(engine, rate, SECONDS, lines)?;
            let label = if lines == 1 {
                engine.to_owned()
            } else {
                format!("{engine} x{lines}")
            };
            println!(
                "{:<12} {:>12} {:>12} {:>12} {:>9.2}% {:>14.0} {:>16.0}",
                label,
                rate_label(rate * lines as u64),
                sent,
                processed,
                loss_pct(sent, sent - drops),
                processed as f64 / SECONDS,
                processed as f64 / cpu.max(1e-9)
            );
            anyhow::ensure!(
                processed + drops == sent,
                "accounting: sent {sent} != processed {processed} + drops {drops}"
            );
        }
    }
    println!("(accounting checked at every point: sent = processed + socket drops)\n");
    capture_path(SECONDS)
}

/// The capture path: the same generator and lines, but a `capture` policy rule hands
/// each datagram to the pipeline through the data plane's record ring (and drops it
/// before any socket); one `edgeproxy run --config` daemon, one worker on CPU 0.
fn capture_path(seconds: f64) -> anyhow::Result<()> {
    println!(
        "bench logs (capture path): edgeproxy run --config, XDP capture rule -> record ring -> 1 worker on CPU 0; generator on CPU 1"
    );
    println!(
        "{:<9} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>16} {:>12}",
        "path",
        "offered/s",
        "sent",
        "processed",
        "loss",
        "ring full",
        "device",
        "lines per CPU-s",
        "XDP ns/pkt"
    );
    for rate in [100_000u64, 300_000, 0] {
        let p = capture_point(rate, seconds)?;
        println!(
            "{:<9} {:>12} {:>12} {:>12} {:>9.2}% {:>10} {:>10} {:>16.0} {:>12.0}",
            "capture",
            rate_label(rate),
            p.sent,
            p.processed,
            loss_pct(p.sent, p.processed),
            p.ring_full,
            p.device,
            p.processed as f64 / p.cpu_s.max(1e-9),
            p.xdp_ns
        );
        anyhow::ensure!(
            p.processed + p.ring_full + p.device == p.sent,
            "accounting: sent {} != captured {} + ring full {} + device drops {}",
            p.sent,
            p.processed,
            p.ring_full,
            p.device
        );
    }
    println!(
        "(accounting checked at every point: sent = captured + records dropped because the ring was full + veth device drops (before XDP); lines per CPU-s counts the daemon's CPU from the pipeline's start; the XDP program runs in the sender's softirq here, outside it as the socket path's kernel receive work is, and its own cost per packet is the last column)\n"
    );
    Ok(())
}

struct CapturePoint {
    sent: u64,
    processed: u64,
    ring_full: u64,
    device: u64,
    cpu_s: f64,
    xdp_ns: f64,
}

fn capture_point(rate: u64, seconds: f64) -> anyhow::Result<CapturePoint> {
    const PORT: u16 = 5557;
    let pair = VethPair::create()?;
    let dir = ScratchDir::new()?;
    let args = capture_daemon_args(&dir, &pair, PORT, "");
    let child = edgeproxy_testbed::try_start_edgeproxy(&pair.a, args)?;
    let device_before = pair.device_drops()?;
    let sent = flood(&pair, PORT, rate, seconds)?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let device = pair.device_drops()? - device_before;
    let (_, out) = edgeproxy_testbed::try_stop_and_collect(child)?;
    let (summary_line, report) = out
        .split_once("{\"summary\"")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .context("no pipeline summary")?;
    let summary: serde_json::Value = serde_json::from_str(&format!("{{\"summary\"{summary_line}"))?;
    let report: serde_json::Value = serde_json::from_str(report).context("the run report")?;
    let s = &summary["summary"];
    Ok(CapturePoint {
        sent,
        processed: s["counts"]["captured"].as_u64().unwrap_or(0),
        ring_full: report["counters"]["stats"]["ringbuf_full"]
            .as_u64()
            .context("ringbuf_full in the run report")?,
        device,
        xdp_ns: report["xdp_cost"]["ns_per_packet"]
            .as_f64()
            .unwrap_or(f64::NAN),
        // From the pipeline's start: loading and verifying the XDP program is not
        // receive work.
        cpu_s: s["pipeline_cpu_s"]
            .as_f64()
            .context("pipeline_cpu_s in the summary")?,
    })
}

/// The CPU the generator runs on; the veth pair's receive softirq runs there too.
pub const GENERATOR_CPU: usize = 1;

/// Pins the calling thread; the figures that name a CPU would be wrong otherwise.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| anyhow::anyhow!("pinning the generator to CPU {cpu}: {e}"))
}

/// One measurement at `rate` datagrams/s of `lines` lines each: returns (lines sent,
/// lines processed, lines in socket drops, edgeproxy CPU seconds).
fn logs_point(
    engine: &str,
    rate: u64,
    seconds: f64,
    lines: usize,
) -> anyhow::Result<(u64, u64, u64, f64)> {
    const PORT: u16 = 5555;
    let pair = VethPair::create()?;
    let dir = ScratchDir::new()?;
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!("[engine]\nkind = \"{engine}\"\ndata_cpus = [0]\n[[listener]]\naddress = \"{}:{PORT}\"\nrcvbuf = 8388608\n[window]\nseconds = 1\n", pair.a_v4),
    );
    let mut args: Vec<std::ffi::OsString> = vec!["logs".into(), "--duration".into(), "120".into()];
    args.extend(["--config".into(), cfg.into()]);
    let child = edgeproxy_testbed::try_start_edgeproxy(&pair.a, args)?;
    let sent = flood_lines(&pair, PORT, rate, seconds, lines)?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (_, out) = edgeproxy_testbed::try_stop_and_collect(child)?;
    let summary: serde_json::Value =
        serde_json::from_str(out.lines().last().context("no summary")?)?;
    let s = &summary["summary"];
    let per = lines as u64;
    Ok((
        sent * per,
        s["counts"]["messages"].as_u64().unwrap_or(0),
        s["kernel_drops"].as_u64().unwrap_or(0) * per,
        s["process_cpu_s"].as_f64().unwrap_or(0.0),
    ))
}

/// Sends 100-byte RFC 5424 lines from the `b` side of `pair` to `a:port` with sendmmsg in
/// batches of 64, from a thread pinned to CPU 1, at `rate` lines/s (0: flat out) for
/// `seconds`. Returns the number of datagrams the kernel accepted.
pub fn flood(pair: &VethPair, port: u16, rate: u64, seconds: f64) -> anyhow::Result<u64> {
    flood_lines(pair, port, rate, seconds, 1)
}

/// [`flood`] with `lines` newline-separated lines per datagram, at `rate` datagrams/s.
pub fn flood_lines(
    pair: &VethPair,
    port: u16,
    rate: u64,
    seconds: f64,
    lines: usize,
) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    pair.b.run(|| -> anyhow::Result<u64> {
        pin_to(GENERATOR_CPU)?;
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.connect((pair.a_v4, port))?;
        const BATCH: usize = 64;
        let msgs: Vec<Vec<u8>> = (0..BATCH)
            .map(|i| {
                (0..lines)
                    .map(|k| {
                        format!(
                            "<14>1 2026-11-24T02:43:00Z edge{i} app 1 - - request served in {} ms ok",
                            i + k
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
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
    })
}

/// An offered rate for the tables (0 means flat out).
pub fn rate_label(rate: u64) -> String {
    if rate == 0 {
        "max".to_owned()
    } else {
        rate.to_string()
    }
}

/// Percentage of `sent` that did not arrive as `got`.
pub fn loss_pct(sent: u64, got: u64) -> f64 {
    100.0 * sent.saturating_sub(got) as f64 / sent.max(1) as f64
}

/// Arguments for an `edgeproxy run` daemon in `pair.a` (ephemeral, BPF stats on, JSON
/// report) whose XDP program captures UDP to `port` and drops it, feeding a one-worker
/// pipeline on CPU 0 (io_uring, 1 s windows). The pipeline needs a listener: the one
/// on `port + 1` receives nothing. `sinks` (TOML) is appended to its configuration.
pub fn capture_daemon_args(
    dir: &ScratchDir,
    pair: &VethPair,
    port: u16,
    sinks: &str,
) -> Vec<std::ffi::OsString> {
    let policy = dir.file(
        "policy.toml",
        &format!(
            "[[rule]]\nproto = \"udp\"\ndst_port = {port}\naction = \"capture\"\nthen = \"drop\"\n"
        ),
    );
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[engine]\nkind = \"io_uring\"\ndata_cpus = [0]\n[[listener]]\naddress = \"{}:{}\"\n[window]\nseconds = 1\n{sinks}",
            pair.a_v4,
            port + 1
        ),
    );
    let mut args: Vec<std::ffi::OsString> = [
        "run",
        "--iface",
        pair.a_if,
        "--ephemeral",
        "--json",
        "--bpf-stats",
        "--duration",
        "300",
    ]
    .into_iter()
    .map(Into::into)
    .collect();
    args.extend(["--policy".into(), policy.into()]);
    args.extend(["--config".into(), cfg.into()]);
    args
}

//! `cargo xtask demo`: two namespaces joined by a veth pair; `edgeproxy run` attached in
//! one, a traffic mix sent from the other (UDP over IPv4 and IPv6, TCP connections with
//! data, ICMP echo), then edgeproxy's own report next to what was sent, and clean-up.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{ExitCode, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edgeproxy_testbed::{
    edgeproxy_bin,
    netns::VethPair,
    packets,
    scratch::{PinRoot, ScratchDir},
    traffic,
};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
};

const UDP4: u64 = 20_000;
const UDP6: u64 = 5_000;
const DNS: u64 = 10_000;
const TCP_CONNS: u64 = 200;
const BLOCKED_SYNS: u64 = 20;
const ICMP: u64 = 100;
const PAYLOAD: usize = 200;

/// The demo's operator policy.
const POLICY: &str = r#"# edgeproxy demo policy: first match wins; anything else passes.
default = "pass"

[[rule]]
name = "block-telnet"
proto = "tcp"
dst_port = 23
action = "drop"

[[rule]]
name = "syslog"
proto = "udp"
dst_port = 514
action = "capture"
capture_max = 2048
then = "drop"

[[rule]]
name = "dns"
proto = "udp"
dst_port = 53
action = "sample"
rate = "1/100"
snap = 128

[[rule]]
name = "web"
proto = "tcp"
dst_port = 8080
action = "sample"
rate = "10%"
snap = 128
"#;

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root (network namespaces and XDP)");
    }
    let bin = edgeproxy_bin()?;
    let pair = VethPair::create()?;
    println!(
        "demo: namespace {} [{} {} {}] <== veth ==> namespace {} [{} {}]",
        pair.a.name(),
        pair.a_if,
        pair.a_v4,
        pair.a_v6,
        pair.b.name(),
        pair.b_if,
        pair.b_v4
    );
    println!(
        "demo: edgeproxy attaches XDP to {} with the policy below and handles what arrives from {}",
        pair.a_if,
        pair.b.name()
    );
    println!(
        "{}",
        POLICY
            .lines()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let root = PinRoot::new()?;
    let dir = ScratchDir::new()?;
    let policy = dir.file("demo-policy.toml", POLICY);
    let state = dir.path().join("state");
    let place = |cmd: &mut std::process::Command| {
        cmd.arg("--pin-root")
            .arg(root.path())
            .arg("--state-dir")
            .arg(&state);
    };
    let mut run = pair.a.command(&bin);
    run.args([
        "run",
        "--iface",
        pair.a_if,
        "--json",
        "--bpf-stats",
        "--policy",
    ])
    .arg(&policy);
    place(&mut run);
    let mut child = run
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("edgeproxy stderr")?;
    let (attached_tx, attached_rx) = mpsc::channel();
    let log_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  edgeproxy | {line}");
            if line.contains("XDP attached") {
                let _ = attached_tx.send(());
            }
        }
    });
    if attached_rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("edgeproxy did not attach within 20 s");
    }

    // A TCP server in namespace a so connections carry real handshakes and data.
    let listener = pair.a.run(|| TcpListener::bind((pair.a_v4, 8080)))?;
    listener.set_nonblocking(true)?;
    let server = std::thread::spawn(move || serve(listener, TCP_CONNS, Duration::from_secs(30)));

    let started = Instant::now();
    traffic::send_udp(&pair.b, (pair.a_v4, 514).into(), UDP4, PAYLOAD)?;
    traffic::send_udp(&pair.b, (pair.a_v6, 514).into(), UDP6, PAYLOAD)?;
    traffic::send_udp(&pair.b, (pair.a_v4, 53).into(), DNS, 40)?;
    pair.b.run(|| -> anyhow::Result<()> {
        for _ in 0..TCP_CONNS {
            let mut s =
                TcpStream::connect_timeout(&(pair.a_v4, 8080).into(), Duration::from_secs(5))?;
            s.write_all(b"GET /demo HTTP/1.1\r\nHost: edge\r\n\r\n")?;
        }
        for _ in 0..BLOCKED_SYNS {
            // Dropped by policy: the SYN is never answered.
            let r = TcpStream::connect_timeout(&(pair.a_v4, 23).into(), Duration::from_millis(20));
            anyhow::ensure!(r.is_err(), "telnet must be blocked");
        }
        ping(pair.a_v4, ICMP)
    })?;
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let send_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let mut show = std::process::Command::new(&bin);
    show.args(["policy", "show", "--iface", pair.a_if]);
    place(&mut show);
    let show = show.output()?;
    println!(
        "\n$ edgeproxy policy show --iface {}   (while the daemon runs)",
        pair.a_if
    );
    print!("{}", String::from_utf8_lossy(&show.stdout));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("edgeproxy stdout")?
        .read_to_string(&mut out)?;
    let status = child.wait()?;
    let _ = log_thread.join();
    if !status.success() {
        bail!("edgeproxy exited with {status}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&out).context("edgeproxy's JSON report")?;
    print_report(&report, served, send_time);
    let mut detach = std::process::Command::new(&bin);
    detach.args(["detach", pair.a_if]);
    place(&mut detach);
    let detach = detach.output()?;
    println!(
        "\n$ edgeproxy detach {}   (edgeproxy had exited; the data plane ran on until now)",
        pair.a_if
    );
    print!("{}", String::from_utf8_lossy(&detach.stdout));
    anyhow::ensure!(
        detach.status.success(),
        "detach failed: {}",
        String::from_utf8_lossy(&detach.stderr)
    );
    drop(pair);
    drop(root);
    println!("demo: namespaces, veth and pins removed; nothing left behind");
    Ok(())
}

/// Accepts `n` connections and reads each to EOF; gives up after `limit`.
fn serve(listener: TcpListener, n: u64, limit: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + limit;
    let mut served = 0;
    while served < n {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut sink = Vec::new();
                s.read_to_end(&mut sink)?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("only {served} of {n} TCP connections arrived");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(served)
}

/// ICMP echo requests through a raw socket (no dependency on a ping binary).
fn ping(dst: Ipv4Addr, n: u64) -> anyhow::Result<()> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::empty(),
        SockProtocol::Icmp,
    )
    .context("raw ICMP socket")?;
    let addr = SockaddrIn::from(SocketAddrV4::new(dst, 0));
    for seq in 0..n {
        let mut msg = vec![8u8, 0, 0, 0, 0x12, 0x34];
        msg.extend_from_slice(&(seq as u16).to_be_bytes());
        msg.extend_from_slice(&[0x5a; 32]);
        let c = packets::checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
        sendto(fd.as_raw_fd(), &msg, &addr, MsgFlags::empty()).context("sending ICMP echo")?;
        if seq % 32 == 31 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(())
}

fn print_report(r: &serde_json::Value, served: u64, send_time: Duration) {
    let classes = &r["counters"]["classes"];
    let verdicts = &r["counters"]["verdicts"];
    let get = |c: &str| classes[c]["packets"].as_u64().unwrap_or(0);
    let verdict = |v: &str| verdicts[v]["packets"].as_u64().unwrap_or(0);
    println!();
    println!(
        "edgeproxy report: hook {} on {}, {:.2} s",
        r["hook"].as_str().unwrap_or("?"),
        r["iface"].as_str().unwrap_or("?"),
        r["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<10} {:>10} {:>10} {:>12}",
        "class", "sent", "counted", "bytes"
    );
    let sent: [(&str, Option<u64>); 6] = [
        ("udp4", Some(UDP4 + DNS)),
        ("udp6", Some(UDP6)),
        ("tcp4", None),
        ("icmp4", Some(ICMP)),
        ("arp", None),
        ("icmp6", None),
    ];
    for (class, n) in sent {
        println!(
            "{:<10} {:>10} {:>10} {:>12}",
            class,
            n.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            get(class),
            classes[class]["bytes"].as_u64().unwrap_or(0)
        );
    }
    println!("\n{:<22} {:>10}", "verdict", "packets");
    for v in [
        "pass",
        "drop_policy",
        "drop_captured",
        "pass_sample_rule",
        "pass_captured",
        "pass_capture_failed",
        "drop_malformed",
    ] {
        if verdict(v) > 0 {
            println!("{:<22} {:>10}", v, verdict(v));
        }
    }
    let captures = r["records"]["captures"].as_u64().unwrap_or(0);
    let samples = r["records"]["samples"].as_u64().unwrap_or(0);
    println!(
        "\ncaptured syslog datagrams drained: {captures} of {} sent ({} lost); samples drained: {samples}; ring-full drops: {}",
        UDP4 + UDP6,
        (UDP4 + UDP6) as i64 - captures as i64,
        r["counters"]["stats"]["ringbuf_full"]
    );
    println!(
        "samples: dns at 1/100 of {DNS} datagrams plus web at 10% of its {} segments: expected about {:.0}",
        get("tcp4"),
        DNS as f64 / 100.0 + get("tcp4").saturating_sub(BLOCKED_SYNS * 2) as f64 / 10.0
    );
    println!(
        "web: {served} connections served through the sample rule; telnet: {} SYNs dropped by policy",
        verdict("drop_policy")
    );
    let total_packets: u64 = classes
        .as_object()
        .map(|m| m.values().filter_map(|v| v["packets"].as_u64()).sum())
        .unwrap_or(0);
    println!(
        "perf: {} packets in {:.2} s of paced sending; XDP program cost {} ns/packet (kernel BPF stats over {} runs)",
        total_packets,
        send_time.as_secs_f64(),
        r["xdp_cost"]["ns_per_packet"]
            .as_f64()
            .map_or_else(|| "?".to_owned(), |v| format!("{v:.1}")),
        r["xdp_cost"]["run_count"]
    );
}

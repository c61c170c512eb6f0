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
use edgeproxy_testbed::{edgeproxy_bin, netns::VethPair, packets, traffic};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
};

const UDP4: u64 = 20_000;
const UDP6: u64 = 5_000;
const TCP_CONNS: u64 = 200;
const ICMP: u64 = 100;
const PAYLOAD: usize = 200;

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
        "demo: edgeproxy attaches XDP to {} and counts what arrives from {}",
        pair.a_if,
        pair.b.name()
    );

    let mut child = pair
        .a
        .command(&bin)
        .args(["run", "--iface", pair.a_if, "--json", "--bpf-stats"])
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
    pair.b.run(|| -> anyhow::Result<()> {
        for _ in 0..TCP_CONNS {
            let mut s =
                TcpStream::connect_timeout(&(pair.a_v4, 8080).into(), Duration::from_secs(5))?;
            s.write_all(&[b'q'; 100])?;
        }
        ping(pair.a_v4, ICMP)
    })?;
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    let send_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));

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
    drop(pair);
    println!("demo: namespaces and veth removed; nothing left behind");
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
    let records = &r["records"]["by_class"];
    let get = |c: &str| classes[c]["packets"].as_u64().unwrap_or(0);
    println!();
    println!(
        "edgeproxy report: XDP {} mode on {}, {:.2} s",
        r["xdp_mode"].as_str().unwrap_or("?"),
        r["iface"].as_str().unwrap_or("?"),
        r["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<11} {:>10} {:>10} {:>12} {:>10}",
        "class", "sent", "counted", "bytes", "records"
    );
    let sent: [(&str, Option<u64>); 6] = [
        ("udp4", Some(UDP4)),
        ("udp6", Some(UDP6)),
        ("tcp4", None),
        ("icmp4", Some(ICMP)),
        ("arp", None),
        ("icmp6", None),
    ];
    for (class, n) in sent {
        println!(
            "{:<11} {:>10} {:>10} {:>12} {:>10}",
            class,
            n.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            get(class),
            classes[class]["bytes"].as_u64().unwrap_or(0),
            records[class].as_u64().unwrap_or(0)
        );
    }
    let other: u64 = ["non_ip", "ipv4_other", "tcp6", "ipv6_other", "malformed"]
        .iter()
        .map(|c| get(c))
        .sum();
    println!("{:<11} {:>10} {:>10}", "other", "-", other);
    println!(
        "tcp4: {served} connections served ({} segments seen on ingress, handshakes and data)",
        get("tcp4")
    );
    let total_packets: u64 = classes
        .as_object()
        .map(|m| m.values().filter_map(|v| v["packets"].as_u64()).sum())
        .unwrap_or(0);
    println!(
        "records drained {} of {} pushed; ring full drops {}",
        r["records"]["total"],
        r["counters"]["stats"]["records_pushed"],
        r["counters"]["stats"]["ringbuf_full"]
    );
    let lost4 = UDP4 as i64 - get("udp4") as i64;
    let lost6 = UDP6 as i64 - get("udp6") as i64;
    println!("loss: udp4 {lost4}, udp6 {lost6} (sent - counted, measured)");
    println!(
        "perf: {} packets in {:.2} s of sending ({:.0} pkt/s offered, paced); XDP cost {} ns/packet (kernel BPF stats over {} runs)",
        total_packets,
        send_time.as_secs_f64(),
        total_packets as f64 / send_time.as_secs_f64().max(1e-9),
        r["xdp_cost"]["ns_per_packet"]
            .as_f64()
            .map_or_else(|| "?".to_owned(), |v| format!("{v:.1}")),
        r["xdp_cost"]["run_count"]
    );
}

//! The TCP sink against a real rsyslog (imtcp, writing each message to a file) that is
//! stopped, killed or paused while messages flow: every message sent to edgeproxy is in
//! rsyslog's file (duplicates counted and printed, none lost), and edgeproxy's summary
//! says each was delivered. The figures printed here are the ones in docs/reliability.md.
use std::{
    collections::BTreeMap,
    net::UdpSocket,
    path::Path,
    time::{Duration, Instant},
};

use edgeproxy_testbed::{
    Reaped, netns::VethPair, peers, privilege::require_root, scratch::ScratchDir, start_logs,
    stop_and_collect,
};
use nix::sys::signal::{Signal, kill};

const PORT: u16 = 5514;
const RSYSLOG_PORT: u16 = 10514;
const TICK: Duration = Duration::from_millis(20);

/// How much traffic and how long an outage: short by default (3,000 messages at 500/s,
/// 0.5 s windows, rsyslog away 1 s); with `EDGEPROXY_LONG=1` (`cargo xtask test --long`)
/// the hostile run's own figures: 10,000 at 250/s, 2 s windows, away 15 s.
struct Shape {
    messages: u64,
    per_tick: u64,
    window_s: f64,
    away: Duration,
}

fn shape() -> Shape {
    if std::env::var_os("EDGEPROXY_LONG").is_some() {
        Shape {
            messages: 10_000,
            per_tick: 5,
            window_s: 2.0,
            away: Duration::from_secs(15),
        }
    } else {
        Shape {
            messages: 3000,
            per_tick: 10,
            window_s: 0.5,
            away: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGTERM, then a new rsyslog a second later.
    Stop,
    /// SIGKILL, then a new rsyslog a second later.
    Kill,
    /// SIGSTOP for two seconds, then SIGCONT.
    Pause,
}

struct Rsyslog {
    child: Reaped,
}

impl Rsyslog {
    fn start(pair: &VethPair, dir: &Path, out: &Path) -> Self {
        let conf = dir.join("rsyslog.conf");
        // A direct main queue: each message is written to the file by the thread that
        // read it, before it reads more, so what rsyslog read is never only in memory.
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{dir}\")\n\
                 main_queue(queue.type=\"Direct\")\n\
                 module(load=\"imtcp\")\n\
                 input(type=\"imtcp\" address=\"{addr}\" port=\"{RSYSLOG_PORT}\")\n\
                 template(name=\"m\" type=\"string\" string=\"%msg%\\n\")\n\
                 *.* action(type=\"omfile\" file=\"{out}\" template=\"m\")\n",
                dir = dir.display(),
                addr = pair.b_v4,
                out = out.display()
            ),
        )
        .expect("rsyslog.conf");
        let mut cmd = pair
            .b
            .wrap(peers::rsyslogd(&conf, &dir.join("rsyslogd.pid")));
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = Reaped(Some(cmd.spawn().expect("start rsyslogd")));
        let addr = (pair.b_v4, RSYSLOG_PORT);
        let up = pair.b.run(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        assert!(up, "rsyslog listens on {addr:?}");
        Self { child }
    }

    fn signal(&self, s: Signal) {
        kill(self.child.pid(), s).expect("signal rsyslogd");
    }

    fn wait(mut self) {
        let status = self.child.take().wait().expect("wait rsyslogd");
        let _ = status;
    }
}

fn delivery_through_rsyslog(fault: Fault) {
    let Shape {
        messages,
        per_tick,
        window_s,
        away,
    } = shape();
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let out = dir.path().join("rsyslog.out");
    let mut rsyslog = Some(Rsyslog::start(&pair, dir.path(), &out));
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = {window_s}\n\
             [[sink]]\nkind = \"tcp\"\naddress = \"{}:{RSYSLOG_PORT}\"\nspool_dir = \"{}\"\n\
             format = \"rfc5424\"\nwhat = \"raw\"\n",
            pair.a_v4,
            pair.b_v4,
            dir.path().join("spool").display()
        ),
    );
    let edgeproxy = start_logs(&pair.a, &cfg);
    let target = (pair.a_v4, PORT);
    let sender = {
        let b = &pair.b;
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                b.run(|| {
                    let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    let mut next = Instant::now();
                    for i in 0..messages {
                        s.send_to(format!("<14>1 - h app - - - msg {i}").as_bytes(), target)
                            .expect("send");
                        if i % per_tick == per_tick - 1 {
                            next += TICK;
                            std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        }
                    }
                })
            });
            std::thread::sleep(Duration::from_secs(2));
            let r = rsyslog.take().expect("rsyslog");
            match fault {
                Fault::Stop | Fault::Kill => {
                    r.signal(if matches!(fault, Fault::Stop) {
                        Signal::SIGTERM
                    } else {
                        Signal::SIGKILL
                    });
                    r.wait();
                    std::thread::sleep(away);
                    rsyslog = Some(Rsyslog::start(&pair, dir.path(), &out));
                }
                Fault::Pause => {
                    r.signal(Signal::SIGSTOP);
                    std::thread::sleep(away * 2);
                    r.signal(Signal::SIGCONT);
                    rsyslog = Some(r);
                }
            }
            sender.join()
        })
    };
    sender.expect("sender");
    std::thread::sleep(Duration::from_secs(1));
    let summary = stop_and_collect(edgeproxy);
    // rsyslog writes what it read before it exits on SIGTERM.
    let r = rsyslog.take().expect("rsyslog");
    r.signal(Signal::SIGTERM);
    r.wait();

    let text = std::fs::read_to_string(&out).expect("rsyslog's file");
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    for l in text.lines() {
        let n: u64 = l
            .trim()
            .strip_prefix("msg ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a whole message in rsyslog's file: {l:?}"));
        *seen.entry(n).or_default() += 1;
    }
    let lines = seen.values().sum::<u64>();
    let unique = seen.len() as u64;
    let missing: Vec<u64> = (0..messages).filter(|n| !seen.contains_key(n)).collect();
    let v: serde_json::Value =
        serde_json::from_str(summary.lines().last().expect("summary")).expect("summary JSON");
    let sink = &v["summary"]["sinks"][0];
    let st = &sink["stats"];
    println!(
        "delivery rsyslog {fault:?} (window {window_s} s, away {away:?}): sent {messages}, received {} by edgeproxy, in rsyslog's file {lines} \
         ({unique} unique, {} duplicates, {} missing); sink: taken {}, delivered {}, pending {}, \
         resent {}, spool_dropped {}, connections {}, connections_lost {}",
        v["summary"]["counts"]["messages"],
        lines - unique,
        missing.len(),
        st["taken"],
        st["delivered"],
        st["pending"],
        st["resent"],
        st["spool_dropped"],
        st["connections"],
        st["connections_lost"],
    );
    assert_eq!(
        v["summary"]["counts"]["messages"], messages,
        "edgeproxy received every datagram: {v}"
    );
    assert!(
        missing.is_empty(),
        "{} messages never reached rsyslog's file (first {:?}): {sink}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(st["taken"], messages, "{sink}");
    assert_eq!(st["delivered"], messages, "{sink}");
    assert_eq!(st["pending"], 0, "{sink}");
    assert_eq!(sink["raw_lines_failed"], 0, "{sink}");
    if !matches!(fault, Fault::Pause) {
        assert!(
            st["connections_lost"].as_u64() >= Some(1),
            "the sink saw its connection go: {sink}"
        );
    }
}

#[test]
fn tcp_sink_loses_nothing_when_rsyslog_stops() {
    if !require_root("tcp_sink_loses_nothing_when_rsyslog_stops")
        || !peers::require_rsyslog("tcp_sink_loses_nothing_when_rsyslog_stops")
    {
        return;
    }
    delivery_through_rsyslog(Fault::Stop);
}

#[test]
fn tcp_sink_loses_nothing_when_rsyslog_is_killed() {
    if !require_root("tcp_sink_loses_nothing_when_rsyslog_is_killed")
        || !peers::require_rsyslog("tcp_sink_loses_nothing_when_rsyslog_is_killed")
    {
        return;
    }
    delivery_through_rsyslog(Fault::Kill);
}

#[test]
fn tcp_sink_loses_nothing_when_rsyslog_pauses() {
    if !require_root("tcp_sink_loses_nothing_when_rsyslog_pauses")
        || !peers::require_rsyslog("tcp_sink_loses_nothing_when_rsyslog_pauses")
    {
        return;
    }
    delivery_through_rsyslog(Fault::Pause);
}

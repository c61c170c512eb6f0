//! The receive engine on both backends with real traffic: every datagram exactly once,
//! with its source; and, with a deliberately tiny io_uring buffer ring, the
//! ring-exhausted path re-arms and accounts exactly (received + kernel drops = sent).
use std::{
    collections::HashSet,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use edgeproxy_testbed::{netns::VethPair, privilege::require_root};
use proxy_user::engine::{self, BackendChoice, ReceiveConfig, socket};

const PORT: u16 = 5514;

/// Sends `n` datagrams `msg <i>` from namespace b, paced, while polling in namespace a.
fn run(
    choice: BackendChoice,
    v6: bool,
    n: u64,
    cfg: ReceiveConfig,
) -> (HashSet<u64>, u64, u64, engine::BackendStats, &'static str) {
    let pair = VethPair::create().expect("veth pair");
    let dst: SocketAddr = if v6 {
        (pair.a_v6, PORT).into()
    } else {
        (pair.a_v4, PORT).into()
    };
    let src_ip = if v6 {
        std::net::IpAddr::V6(pair.b_v6)
    } else {
        std::net::IpAddr::V4(pair.b_v4)
    };
    pair.a.run(|| {
        let sockets: Vec<UdpSocket> = (0..2)
            .map(|_| socket::udp_reuseport(dst, Some(16 << 20)).expect("socket"))
            .collect();
        let probes: Vec<UdpSocket> = sockets
            .iter()
            .map(|s| s.try_clone().expect("clone"))
            .collect();
        let (mut backend, reason) = engine::open(choice, sockets, cfg).expect("open backend");
        assert_eq!(reason, None, "no fallback expected on this kernel");
        let mut seen = HashSet::new();
        let mut dups = 0u64;
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                pair.b.run(|| {
                    let sock =
                        UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" }).expect("bind");
                    for i in 0..n {
                        sock.send_to(format!("msg {i}").as_bytes(), dst)
                            .expect("send");
                        if i % 32 == 31 {
                            std::thread::sleep(Duration::from_micros(500));
                        }
                    }
                })
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut idle_since = None;
            while Instant::now() < deadline {
                let got = backend
                    .poll(Duration::from_millis(20), &mut |d| {
                        assert_eq!(d.source.map(|a| a.ip()), Some(src_ip));
                        let i: u64 = std::str::from_utf8(d.payload)
                            .ok()
                            .and_then(|s| s.strip_prefix("msg "))
                            .and_then(|s| s.parse().ok())
                            .expect("payload");
                        if !seen.insert(i) {
                            dups += 1;
                        }
                    })
                    .expect("poll");
                if sender.is_finished() && got == 0 {
                    let t = *idle_since.get_or_insert_with(Instant::now);
                    if t.elapsed() > Duration::from_millis(300) {
                        break;
                    }
                } else {
                    idle_since = None;
                }
            }
            sender.join().expect("sender");
        });
        let drops: u64 = probes
            .iter()
            .map(|s| u64::from(socket::kernel_drops(s).expect("SO_MEMINFO")))
            .sum();
        (seen, dups, drops, backend.stats(), backend.name())
    })
}

fn exact(choice: BackendChoice, v6: bool, want: &str) {
    let n = 20_000;
    let (seen, dups, drops, stats, name) = run(
        choice,
        v6,
        n,
        ReceiveConfig {
            buffer_size: 2048,
            buffers: 256,
        },
    );
    assert_eq!(name, want);
    assert_eq!(dups, 0, "no datagram twice");
    assert_eq!(drops, 0, "the kernel dropped nothing");
    assert_eq!(seen.len() as u64, n, "every datagram once");
    assert_eq!(stats.datagrams, n);
    assert_eq!(stats.errors, 0);
}

#[test]
fn io_uring_receives_every_datagram_once_v4() {
    if require_root("io_uring_receives_every_datagram_once_v4") {
        exact(BackendChoice::IoUring, false, "io_uring");
    }
}

#[test]
fn io_uring_receives_every_datagram_once_v6() {
    if require_root("io_uring_receives_every_datagram_once_v6") {
        exact(BackendChoice::IoUring, true, "io_uring");
    }
}

#[test]
fn epoll_receives_every_datagram_once_v4() {
    if require_root("epoll_receives_every_datagram_once_v4") {
        exact(BackendChoice::Epoll, false, "epoll");
    }
}

#[test]
fn epoll_receives_every_datagram_once_v6() {
    if require_root("epoll_receives_every_datagram_once_v6") {
        exact(BackendChoice::Epoll, true, "epoll");
    }
}

#[test]
fn auto_picks_io_uring_here() {
    if require_root("auto_picks_io_uring_here") {
        exact(BackendChoice::Auto, false, "io_uring");
    }
}

/// Four buffers for a burst: the multishot receive stops with ENOBUFS, the datagrams wait
/// in the socket queue, the backend re-arms after recycling and reads them.
#[test]
fn io_uring_buffer_ring_exhaustion_loses_nothing_silently() {
    if !require_root("io_uring_buffer_ring_exhaustion_loses_nothing_silently") {
        return;
    }
    let n = 5_000;
    let (seen, dups, drops, stats, _) = run(
        BackendChoice::IoUring,
        false,
        n,
        ReceiveConfig {
            buffer_size: 256,
            buffers: 4,
        },
    );
    assert_eq!(dups, 0);
    assert_eq!(
        seen.len() as u64 + drops,
        n,
        "received + kernel drops = sent"
    );
    assert!(
        stats.buffer_ring_empty > 0,
        "the exhausted path ran ({stats:?})"
    );
}

/// A watched fd (a pipe here, a BPF ring buffer in the daemon) is reported as
/// `Event::Ready` on each backend, again after it was drained and written to once more,
/// and its readiness is never mistaken for a datagram or counted as an error.
fn watched_fd_readiness(choice: BackendChoice) {
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsRawFd as _;
    let sock = socket::udp_reuseport("127.0.0.1:0".parse().expect("addr"), None).expect("socket");
    let (backend, _) = engine::open(choice, vec![sock], ReceiveConfig::default()).expect("open");
    let mut backend = backend;
    let (mut rx, mut tx) = std::io::pipe().expect("pipe");
    let _unrelated = backend.watch(rx.as_raw_fd()).expect("watch");
    for round in 0..3 {
        tx.write_all(b"x").expect("write");
        let mut ready = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while ready == 0 && Instant::now() < deadline {
            let datagrams = backend
                .poll_events(Duration::from_millis(50), &mut |e| match e {
                    engine::Event::Ready(0) => ready += 1,
                    other => panic!("unexpected event {other:?}"),
                })
                .expect("poll");
            assert_eq!(datagrams, 0);
        }
        assert!(ready > 0, "round {round}: readiness reported");
        let mut b = [0u8; 8];
        assert_eq!(rx.read(&mut b).expect("read"), 1);
    }
    assert_eq!(backend.stats().errors, 0, "{:?}", backend.stats());
    assert_eq!(backend.stats().datagrams, 0);
}

#[test]
fn io_uring_reports_watched_fd_readiness() {
    watched_fd_readiness(BackendChoice::IoUring);
}

#[test]
fn epoll_reports_watched_fd_readiness() {
    watched_fd_readiness(BackendChoice::Epoll);
}

//! The TCP sink against real loopback sockets: an outage, a downstream that closes, one
//! that resets with unread data, one that stops reading, and a crash of the sink itself.
use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{
    Sink, TcpSink,
    spool::{Framing, Spool},
    tcp::spool_name,
};
use crate::config::OutputFormat;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ep-tcp-sink-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn line(i: u64) -> Vec<u8> {
    format!("{{\"n\":{i}}}\n").into_bytes()
}

/// Numbers of the JSON lines in `bytes`, in order (a torn last line is ignored).
fn numbers(bytes: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| {
            l.strip_prefix("{\"n\":")?
                .strip_suffix('}')
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// Ticks the sink until `done` or two seconds pass.
fn tick_until(s: &mut TcpSink, mut done: impl FnMut(&TcpSink) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !done(s) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(25));
        s.tick().unwrap();
    }
}

/// Accepts one connection on another thread and reads it to the end.
fn read_next(listener: &TcpListener) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        got
    })
}

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn an_outage_is_spooled_and_replayed_in_order() {
    let dir = scratch("outage");
    let addr = free_addr(); // the upstream is down at first
    let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    for i in 0..3 {
        s.write(&line(i), 1).unwrap();
        s.end_window().unwrap();
    }
    assert_eq!((s.stats().taken, s.stats().pending), (3, 3));
    let listener = TcpListener::bind(addr).unwrap();
    std::thread::sleep(Duration::from_millis(550));
    for i in 3..5 {
        s.write(&line(i), 1).unwrap();
        s.end_window().unwrap();
    }
    let reader = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        BufReader::new(conn)
            .lines()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    });
    s.close(Duration::from_secs(2)).unwrap();
    let got = reader.join().unwrap();
    assert_eq!(
        got,
        (0..5).map(|i| format!("{{\"n\":{i}}}")).collect::<Vec<_>>(),
        "all, in order"
    );
    let st = s.stats();
    assert_eq!(
        (st.delivered, st.pending),
        (5, 0),
        "the downstream closed after our FIN: all confirmed"
    );
    assert_eq!(
        std::fs::metadata(dir.join(spool_name(addr, OutputFormat::Json)))
            .unwrap()
            .len(),
        0,
        "spool emptied"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_full_spool_drops_whole_batches_and_counts_them() {
    let dir = scratch("full");
    let addr = free_addr();
    let mut s = TcpSink::open(addr, &dir, 20, OutputFormat::Json).unwrap();
    for i in 0..5 {
        s.write(format!("line-{i}\n").as_bytes(), 1).unwrap();
    }
    // A batch of three records that does not fit is dropped whole.
    s.write(b"aa\nb\nc\n", 3).unwrap();
    let st = s.stats();
    assert_eq!(
        (st.taken, st.spool_dropped, st.pending),
        (2, 6, 2),
        "7-byte lines in a 20-byte spool, then a 7-byte batch of 3"
    );
    s.close(Duration::from_millis(50)).unwrap();
    drop(s);
    // Reopened, the spool's records are counted from its contents.
    let s = TcpSink::open(addr, &dir, 20, OutputFormat::Json).unwrap();
    assert_eq!(s.stats().pending, 2);
    std::fs::remove_dir_all(dir).unwrap();
}

/// The defect a hostile run found: the downstream closes (rsyslog stopped), and the
/// next batch was written into the closed connection, answered by RST, and counted as
/// delivered. Now the close is seen before the write and nothing is lost.
#[test]
fn a_downstream_that_closes_loses_nothing() {
    let dir = scratch("closes");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    s.write(&line(0), 1).unwrap();
    let (mut first, _) = listener.accept().unwrap();
    let mut got = vec![0u8; 64];
    let n = first.read(&mut got).unwrap();
    got.truncate(n);
    // Read, then closed cleanly: like a downstream stopped between two batches.
    drop(first);
    std::thread::sleep(Duration::from_millis(50));
    let second = read_next(&listener);
    for i in 1..4 {
        s.write(&line(i), 1).unwrap();
    }
    s.close(Duration::from_secs(2)).unwrap();
    got.extend(second.join().unwrap());
    let seen = numbers(&got);
    for i in 0..4 {
        assert!(
            seen.contains(&i),
            "record {i} reached the downstream: {seen:?}"
        );
    }
    let st = s.stats();
    assert_eq!(st.pending, 0, "{st:?}");
    assert_eq!(st.delivered, 4, "{st:?}");
    assert!(st.connections_lost >= 1, "{st:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A downstream that dies with bytes it acknowledged but never read resets the
/// connection: those bytes are sent again on the next connection.
#[test]
fn a_reset_with_unread_bytes_resends_them() {
    let dir = scratch("reset");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    s.write(&line(0), 1).unwrap();
    let (first, _) = listener.accept().unwrap();
    // Acknowledged by the kernel, never read by the application, and checks over 80 ms
    // find the connection open: not long enough to confirm it...
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(20));
        s.tick().unwrap();
    }
    assert_eq!(s.stats().delivered, 0, "not confirmed yet");
    // ...and the application dies: closing with unread bytes sends RST.
    drop(first);
    std::thread::sleep(Duration::from_millis(30));
    let second = read_next(&listener);
    s.write(&line(1), 1).unwrap();
    s.close(Duration::from_secs(2)).unwrap();
    let got = second.join().unwrap();
    assert_eq!(numbers(&got), vec![0, 1], "record 0 sent again, then 1");
    let st = s.stats();
    assert_eq!((st.delivered, st.pending, st.resent), (2, 0, 1), "{st:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A downstream that stops reading (SIGSTOP): the sink never blocks, the spool holds
/// what the socket cannot, and everything arrives once, in order, when it reads again.
#[test]
fn a_downstream_that_stops_reading_gets_everything_later() {
    let dir = scratch("pause");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut s = TcpSink::open(addr, &dir, 256 << 20, OutputFormat::Json).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let (mut conn, _): (TcpStream, _) = listener.accept().unwrap();
        rx.recv().unwrap(); // paused until told
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        got
    });
    let pad = "x".repeat(1000);
    let started = Instant::now();
    let total = 40_000u64; // ~40 MB: more than both sockets' buffers hold
    for i in 0..total {
        let rec = format!("{{\"n\":{i},\"pad\":\"{pad}\"}}\n");
        s.write(rec.as_bytes(), 1).unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "writing never waited on the paused downstream"
    );
    assert!(
        s.stats().pending > total / 2,
        "most of it waits in the spool: {:?}",
        s.stats()
    );
    tx.send(()).unwrap();
    tick_until(&mut s, |s| s.stats().pending == 0);
    s.close(Duration::from_secs(5)).unwrap();
    let got = reader.join().unwrap();
    let seen: Vec<u64> = String::from_utf8_lossy(&got)
        .lines()
        .map(|l| {
            l.strip_prefix("{\"n\":")
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse().ok())
                .expect("whole record")
        })
        .collect();
    assert_eq!(seen, (0..total).collect::<Vec<_>>(), "once each, in order");
    let st = s.stats();
    assert_eq!(
        (st.delivered, st.pending, st.resent, st.connections),
        (total, 0, 0, 1),
        "{st:?}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A crash of edgeproxy (the sink dropped without closing) keeps every unconfirmed
/// batch on disk; the next start sends it.
#[test]
fn unconfirmed_batches_survive_a_crash() {
    let dir = scratch("crash");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    {
        let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
        s.write(&line(7), 1).unwrap();
        s.end_window().unwrap();
        // Dropped here without close: as kill -9 would leave it.
    }
    let (mut first, _) = listener.accept().unwrap();
    let mut got = Vec::new();
    first.read_to_end(&mut got).unwrap();
    let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    assert_eq!(s.stats().pending, 1, "the batch was still unconfirmed");
    let second = read_next(&listener);
    s.write(&line(8), 1).unwrap();
    s.close(Duration::from_secs(2)).unwrap();
    got.extend(second.join().unwrap());
    assert_eq!(numbers(&got), vec![7, 7, 8], "at-least-once: 7 sent again");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn spool_offsets_survive_compaction() {
    let dir = scratch("compact");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.spool");
    let mut sp = Spool::open(&path, u64::MAX, Framing::Lines).unwrap();
    let big = vec![b'a'; 5 << 20];
    assert!(sp.append(&big, 1).unwrap());
    assert!(sp.append(&big, 1).unwrap());
    assert!(sp.append(b"tail\n", 1).unwrap());
    // Confirming the first two cuts 10 MiB from the file; offsets stay logical.
    assert_eq!(sp.confirm(10 << 20), 2);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 5);
    let mut buf = [0u8; 16];
    let n = sp.read_at(10 << 20, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"tail\n");
    assert_eq!((sp.records(), sp.bytes()), (1, 5));
    assert_eq!(sp.confirm(sp.end()), 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A listener whose accept queue is full drops further SYNs: a connect to it hangs like
/// one to a black-holed host, on loopback.
fn black_hole() -> (std::os::fd::OwnedFd, Vec<TcpStream>, SocketAddr) {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, socket,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let addr: SocketAddr = nix::sys::socket::getsockname::<SockaddrIn>(fd.as_raw_fd())
        .unwrap()
        .to_string()
        .parse()
        .unwrap();
    // Fill the queue (never accepted); further SYNs are dropped.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        let s = socket2_free_connect(addr);
        fillers.extend(s);
    }
    (fd, fillers, addr)
}

/// A connect that gives up after 200 ms (the queue may already be full).
fn socket2_free_connect(addr: SocketAddr) -> Option<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
}

#[test]
fn a_downstream_that_never_answers_never_holds_the_writer() {
    let dir = scratch("blackhole");
    let (_listener, _fillers, addr) = black_hole();
    // The address does hold connects (else this test would prove nothing).
    let t = Instant::now();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err());
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        s.write(&line(1), 1).unwrap();
        s.tick().unwrap();
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = s.stats();
    assert!(
        slowest < Duration::from_millis(50),
        "a write never waits on the connect: slowest {slowest:?}"
    );
    assert!(st.connect_failures >= 1, "the connect timed out: {st:?}");
    assert_eq!(st.delivered, 0, "{st:?}");
    assert_eq!(st.pending, st.taken, "all of it waits in the spool: {st:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_downstream_that_drops_every_connection_is_retried_with_backoff() {
    let dir = scratch("backoff");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acceptor = {
        let stop = std::sync::Arc::clone(&stop);
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((c, _)) = listener.accept() {
                    n += 1;
                    drop(c); // closes at once, reading nothing
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    s.write(&line(1), 1).unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1600) {
        std::thread::sleep(Duration::from_millis(20));
        s.tick().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let accepted = acceptor.join().unwrap();
    let st = s.stats();
    // 100 + 200 + 400 + 800 ms of backoff fit in 1.6 s: about five connections, where
    // reconnecting at every 20 ms tick would make eighty.
    assert!(
        (2..=8).contains(&st.connections),
        "backed off: {st:?}, accepted {accepted}"
    );
    assert_eq!(st.delivered, 0, "nothing was read: {st:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn one_spool_file_serves_one_sink() {
    let dir = scratch("lock");
    let addr = free_addr();
    let first = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    let Err(e) = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json) else {
        panic!("a second sink opened the same spool");
    };
    assert!(e.to_string().contains("in use by another sink"), "{e}");
    drop(first);
    TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).expect("free again once closed");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_record_torn_by_a_crash_is_cut_and_the_whole_ones_are_sent() {
    let dir = scratch("torn");
    std::fs::create_dir_all(&dir).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::fs::write(
        dir.join(spool_name(addr, OutputFormat::Json)),
        b"{\"n\":1}\n{\"n\":2}\n{\"n\":3",
    )
    .unwrap();
    let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
    let st = s.stats();
    assert_eq!(
        (st.pending_at_start, st.torn_bytes_at_start),
        (2, 6),
        "{st:?}"
    );
    let reader = read_next(&listener);
    s.write(&line(4), 1).unwrap();
    s.close(Duration::from_secs(2)).unwrap();
    assert_eq!(numbers(&reader.join().unwrap()), vec![1, 2, 4]);
    std::fs::remove_dir_all(dir).unwrap();
}

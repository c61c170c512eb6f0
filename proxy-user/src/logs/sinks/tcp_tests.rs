//! The TCP sink against real loopback sockets: an outage, a downstream that closes, one
//! that resets with unread data, one that stops reading, and a crash of the sink itself.
use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use super::{Sink, TcpSink, spool::Spool, tcp::spool_name};
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
    // Acknowledged by the kernel, never read by the application, and checks over 150 ms
    // find the connection open: not long enough to confirm it...
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(25));
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
    let mut sp = Spool::open(&path, u64::MAX).unwrap();
    let big = vec![b'a'; 5 << 20];
    assert!(sp.append(&big, 1).unwrap());
    assert!(sp.append(&big, 1).unwrap());
    assert!(sp.append(b"tail\n", 1).unwrap());
    // Confirming the first two cuts 10 MiB from the file; offsets stay logical.
    assert_eq!(sp.confirm(10 << 20).unwrap(), 2);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 5);
    let mut buf = [0u8; 16];
    let n = sp.read_at(10 << 20, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"tail\n");
    assert_eq!((sp.records(), sp.bytes()), (1, 5));
    assert_eq!(sp.confirm(sp.end()).unwrap(), 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

//! Records over TCP (JSON lines or octet-counted RFC 5424) with a delivery guarantee
//! plain TCP does not give by itself.
//!
//! Every batch goes to the [`Spool`] first and is sent from there, never blocking the
//! merger: the socket is non-blocking and what it cannot take now waits on disk. A batch
//! leaves the spool only once it is *confirmed*:
//! - the downstream's TCP acknowledged all of it, and the connection was still open (no
//!   FIN, no RST) at a check at least [`CONFIRM_AFTER`] later; or
//! - the downstream closed the connection cleanly (FIN) after acknowledging it: a peer
//!   that closes with unread data sends RST instead, so a FIN means it read everything
//!   it acknowledged.
//!
//! A connection found closed or reset (before a write, not after) is replaced and every
//! unconfirmed batch is sent again, from the first unconfirmed batch boundary: delivery
//! is at-least-once. What TCP cannot show — a downstream that acknowledged, then died
//! before its application read the bytes — is the one gap; see docs/reliability.md.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use super::{Sink, spool::Spool};
use crate::config::OutputFormat;

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// How often the connection is checked and the spool pumped between batches.
const TICK_EVERY: Duration = Duration::from_millis(20);
/// Bytes the downstream acknowledged are confirmed only once the connection has stayed
/// open this long after: a downstream that dies with them unread resets the connection
/// well within it, unless it had stopped reading for longer.
const CONFIRM_AFTER: Duration = Duration::from_millis(200);
/// At most one acknowledgement sample per period is kept per connection.
const ACK_SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Bytes read from the spool per write.
const CHUNK: usize = 256 << 10;
/// At shutdown, how long to wait for the downstream to take and confirm the spool.
pub const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// Counters of one TCP sink, in records unless named otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSinkStats {
    /// Taken into the spool.
    pub taken: u64,
    /// Confirmed by the downstream and removed from the spool.
    pub delivered: u64,
    /// Sent again on a new connection after one was lost (possible duplicates).
    pub resent: u64,
    /// Batches that did not fit in the spool, dropped whole.
    pub spool_dropped: u64,
    /// Taken but neither confirmed nor dropped: still in the spool.
    pub pending: u64,
    /// Left in the spool by an earlier run (a crash, or a stop the downstream did not
    /// confirm): `taken + pending_at_start = delivered + spool_dropped + pending`.
    pub pending_at_start: u64,
    pub connections: u64,
    /// Connections found closed or reset by the downstream, or failed on write.
    pub connections_lost: u64,
}

pub struct TcpSink {
    address: SocketAddr,
    spool: Spool,
    conn: Option<Conn>,
    next_attempt: Instant,
    next_tick: Instant,
    /// Highest logical spool offset ever written to a connection.
    sent_high: u64,
    stats: TcpSinkStats,
    chunk: Vec<u8>,
    /// A full spool drops every batch until the downstream is back: one line per period.
    full_warn: crate::limits::Throttle,
}

/// One connection and how far the spool went out on it.
struct Conn {
    stream: TcpStream,
    /// Logical spool offset up to which bytes were written to this connection.
    sent: u64,
    /// What the downstream had acknowledged at earlier checks, oldest first: (when,
    /// logical offset), one entry per [`ACK_SAMPLE_EVERY`] at most.
    acked: std::collections::VecDeque<(Instant, u64)>,
    /// The latest acknowledged offset seen (for a clean close whose queue is gone).
    acked_latest: u64,
    /// Bytes read from the spool and not yet fully written: `[pos..]` starts at `sent`.
    pending: std::ops::Range<usize>,
}

impl Conn {
    /// Records that the downstream had acknowledged up to `offset` at `now`.
    fn note_acked(&mut self, now: Instant, offset: u64) {
        if offset <= self.acked_latest {
            return;
        }
        self.acked_latest = offset;
        match self.acked.back_mut() {
            // Within one sampling period the newer offset replaces the last one, which
            // keeps its (earlier) time: confirmation waits for the later one anyway.
            Some((t, o)) if now.duration_since(*t) < ACK_SAMPLE_EVERY => *o = offset,
            _ => self.acked.push_back((now, offset)),
        }
    }

    /// The offset every byte before which was acknowledged at least [`CONFIRM_AFTER`]
    /// ago, on a connection still open now; 0 when none is yet.
    fn confirmable(&mut self, now: Instant) -> u64 {
        let mut upto = 0;
        while let Some(&(t, o)) = self.acked.front() {
            if now.duration_since(t) < CONFIRM_AFTER {
                break;
            }
            upto = o;
            self.acked.pop_front();
        }
        upto
    }
}

/// What a check of the connection found.
enum Peer {
    Open,
    /// FIN: the downstream closed after reading what it acknowledged.
    Closed,
    /// RST or another error: what it acknowledged may not have been read.
    Failed(io::Error),
}

impl TcpSink {
    pub fn open(
        address: SocketAddr,
        spool_dir: &Path,
        max_spool_bytes: u64,
        format: OutputFormat,
    ) -> io::Result<Self> {
        crate::fsmode::create_private_dir(spool_dir)?;
        // One spool per upstream and format, so a format change never replays the other.
        let spool = Spool::open(
            &spool_dir.join(spool_name(address, format)),
            max_spool_bytes,
        )?;
        let stats = TcpSinkStats {
            pending: spool.records(),
            pending_at_start: spool.records(),
            ..TcpSinkStats::default()
        };
        Ok(Self {
            address,
            spool,
            conn: None,
            next_attempt: Instant::now(),
            next_tick: Instant::now(),
            sent_high: 0,
            stats,
            chunk: vec![0; CHUNK],
            full_warn: crate::limits::Throttle::new(Duration::from_secs(5)),
        })
    }

    pub fn stats(&self) -> TcpSinkStats {
        TcpSinkStats {
            pending: self.spool.records(),
            ..self.stats
        }
    }

    /// Checks the connection: confirms what it allows, drops it when it is gone.
    fn check(&mut self) -> io::Result<()> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        let state = peer_state(&mut c.stream);
        let acked_now = unacknowledged(&c.stream)
            .ok()
            .map(|q| c.sent.saturating_sub(q));
        let now = Instant::now();
        let upto = match &state {
            Peer::Open => {
                if let Some(a) = acked_now {
                    c.note_acked(now, a);
                }
                c.confirmable(now)
            }
            Peer::Closed => acked_now.unwrap_or(c.acked_latest),
            Peer::Failed(_) => 0,
        };
        self.stats.delivered += self.spool.confirm(upto)?;
        match state {
            Peer::Open => {}
            Peer::Closed => self.lose("the downstream closed the connection"),
            Peer::Failed(e) => self.lose(&format!("the connection failed: {e}")),
        }
        Ok(())
    }

    fn lose(&mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            let unconfirmed = self.spool.records();
            tracing::warn!(upstream = %self.address, reason = why, unconfirmed,
                "tcp sink: connection lost; unconfirmed records will be sent again");
            self.stats.connections_lost += 1;
            self.sent_high = self.sent_high.max(c.sent);
            // Reconnect at once (a restarted downstream is back); refusals back off.
            self.next_attempt = Instant::now();
        }
    }

    /// A connection when one exists or can be made now (rate-limited retries); a new
    /// one starts at the first unconfirmed batch.
    fn connect(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        let stream = match TcpStream::connect_timeout(&self.address, CONNECT_TIMEOUT)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(upstream = %self.address, error = %e, "tcp sink: upstream unreachable");
                self.next_attempt = Instant::now() + RETRY_EVERY;
                return false;
            }
        };
        let _ = stream.set_nodelay(true);
        let start = self.spool.confirmed();
        self.stats.resent += self.spool.records_before(self.sent_high);
        self.stats.connections += 1;
        tracing::info!(upstream = %self.address, "tcp sink connected");
        self.conn = Some(Conn {
            stream,
            sent: start,
            acked: std::collections::VecDeque::new(),
            acked_latest: start,
            pending: 0..0,
        });
        true
    }

    /// Writes what the socket takes now, from the spool, without waiting.
    fn pump(&mut self) -> io::Result<()> {
        if self.spool.end()
            == self
                .conn
                .as_ref()
                .map_or(self.spool.confirmed(), |c| c.sent)
            || !self.connect()
        {
            return Ok(());
        }
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Ok(());
            };
            if c.pending.is_empty() {
                if c.sent == self.spool.end() {
                    return Ok(());
                }
                let n = self.spool.read_at(c.sent, &mut self.chunk)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "spool shorter than its batches",
                    ));
                }
                c.pending = 0..n;
            }
            match c.stream.write(&self.chunk[c.pending.clone()]) {
                Ok(n) => {
                    c.pending.start += n;
                    c.sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.lose(&format!("write failed: {e}"));
                    return Ok(());
                }
            }
        }
    }

    /// Everything sent and acknowledged on an open connection.
    fn all_acknowledged(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| {
            c.sent == self.spool.end() && unacknowledged(&c.stream).is_ok_and(|q| q == 0)
        })
    }

    /// Sends what waits and half-closes: a downstream that then closes has read every
    /// byte, so all of it is confirmed. Whatever is not stays in the spool for the
    /// next start.
    fn drain(&mut self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        while self.spool.records() > 0 && Instant::now() < deadline {
            self.check()?;
            self.pump()?;
            if self.all_acknowledged() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(mut c) = self.conn.take() {
            // Half-close and wait only when something is unconfirmed: a downstream that
            // keeps its side open must not hold a shutdown for nothing.
            if self.spool.records() > 0
                && c.sent == self.spool.end()
                && c.stream.shutdown(std::net::Shutdown::Write).is_ok()
            {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if wait_for_close(&mut c.stream, remaining.max(Duration::from_millis(100))) {
                    self.stats.delivered += self.spool.confirm(c.sent)?;
                }
            }
        }
        self.spool.sync()
    }
}

/// Reads until the downstream closes (true) or `limit` passes or it fails (false).
fn wait_for_close(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !readable(stream, left) {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
}

fn readable(stream: &TcpStream, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Whether the downstream closed, failed, or is still there. A syslog downstream sends
/// nothing; anything it does send is read and discarded so it cannot fill the buffer.
fn peer_state(stream: &mut TcpStream) -> Peer {
    if let Ok(Some(e)) = stream.take_error() {
        return Peer::Failed(e);
    }
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Peer::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Peer::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Peer::Failed(e),
        }
    }
}

/// Bytes written but not yet acknowledged by the downstream (sent or not).
fn unacknowledged(stream: &TcpStream) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

pub(super) fn spool_name(address: SocketAddr, format: OutputFormat) -> String {
    format!(
        "tcp-{}-{}.spool",
        address.to_string().replace([':', '[', ']'], "_"),
        format.name()
    )
}

impl Sink for TcpSink {
    /// Into the spool (dropped whole and counted when it does not fit), then out as
    /// far as the connection takes it now.
    fn write(&mut self, bytes: &[u8], records: u64) -> io::Result<()> {
        if self.spool.append(bytes, records)? {
            self.stats.taken += records;
        } else {
            self.stats.spool_dropped += records;
            if let Some(held) = self.full_warn.allow(Instant::now()) {
                tracing::warn!(upstream = %self.address, records, similar_since_last = held,
                    "tcp sink: spool full (max_spool_bytes); batch dropped (counted as spool_dropped)");
            }
        }
        self.check()?;
        self.pump()
    }

    fn end_window(&mut self) -> io::Result<()> {
        self.check()?;
        self.pump()?;
        self.next_tick = Instant::now() + TICK_EVERY;
        self.spool.sync()
    }

    fn tick(&mut self) -> io::Result<()> {
        if Instant::now() < self.next_tick {
            return Ok(());
        }
        self.next_tick = Instant::now() + TICK_EVERY;
        self.check()?;
        self.pump()
    }

    fn close(&mut self, drain: Duration) -> io::Result<()> {
        self.drain(drain)
    }

    fn name(&self) -> String {
        format!("tcp {}", self.address)
    }

    fn stats(&self) -> serde_json::Value {
        let s = TcpSink::stats(self);
        serde_json::json!({
            "taken": s.taken,
            "delivered": s.delivered,
            "pending": s.pending,
            "pending_at_start": s.pending_at_start,
            "resent": s.resent,
            "spool_dropped": s.spool_dropped,
            "spool_bytes": self.spool.bytes(),
            "connections": s.connections,
            "connections_lost": s.connections_lost,
        })
    }
}

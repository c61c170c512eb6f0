//! Records over TCP (JSON lines or octet-counted RFC 5424) with a delivery guarantee
//! plain TCP does not give by itself.
//!
//! Every batch goes to the [`Spool`] first and is sent from there, never blocking the
//! merger: the connect and the socket are non-blocking, what the socket cannot take now
//! waits on disk, and one call sends at most [`PUMP_MAX`]. A batch leaves the spool only
//! once it is *confirmed*:
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

use super::{
    Sink,
    spool::{Framing, Spool},
};
use crate::{config::OutputFormat, limits::Throttle};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Retries after a refused connect or a connection that died before confirming
/// anything back off from this to [`RETRY_MAX`], doubling.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the connection is checked and the spool pumped between batches.
const TICK_EVERY: Duration = Duration::from_millis(20);
/// Bytes the downstream acknowledged are confirmed only once the connection has stayed
/// open this long after: a downstream that dies with them unread resets the connection
/// well within it, unless it had stopped reading for longer.
pub(super) const CONFIRM_AFTER: Duration = Duration::from_millis(200);
/// At most one acknowledgement sample per period is kept per connection.
const ACK_SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Bytes read from the spool per write.
const CHUNK: usize = 256 << 10;
/// Bytes one call sends at most, so catching up a large backlog never holds the merger.
const PUMP_MAX: u64 = 4 << 20;
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
    /// Bytes of a record cut short by a crash at the spool's end, cut off at start.
    pub torn_bytes_at_start: u64,
    pub connections: u64,
    /// Connections found closed or reset by the downstream, or failed on write.
    pub connections_lost: u64,
    /// Connects refused, failed or timed out.
    pub connect_failures: u64,
}

pub struct TcpSink {
    address: SocketAddr,
    spool: Spool,
    link: Link,
    next_attempt: Instant,
    /// The wait before the next retry (doubles while connections fail).
    retry: Duration,
    next_tick: Instant,
    /// Highest logical spool offset ever written to a connection.
    sent_high: u64,
    stats: TcpSinkStats,
    chunk: Vec<u8>,
    /// A full spool drops every batch until the downstream is back: one line per period.
    full_warn: Throttle,
    /// Likewise for an unreachable downstream and for sending errors.
    down_warn: Throttle,
}

/// Where the connection to the downstream stands.
enum Link {
    Down,
    Connecting { stream: TcpStream, since: Instant },
    Up(Conn),
}

/// One connection and how far the spool went out on it.
struct Conn {
    stream: TcpStream,
    /// Logical spool offset up to which bytes were written to this connection.
    sent: u64,
    /// Records sent again on this connection are counted up to here.
    resent_counted: u64,
    /// What the downstream had acknowledged at earlier checks, oldest first.
    acked: std::collections::VecDeque<AckSample>,
    /// The latest acknowledged offset seen (for a clean close whose queue is gone).
    acked_latest: u64,
    /// Something was confirmed on this connection (it is worth reconnecting at once).
    confirmed_any: bool,
    /// Bytes read from the spool and not yet fully written: `[pos..]` starts at `sent`.
    pending: std::ops::Range<usize>,
}

/// The downstream had acknowledged up to `offset` by `last` (first seen at `first`;
/// samples within [`ACK_SAMPLE_EVERY`] of `first` are merged into one).
#[derive(Clone, Copy, Debug)]
struct AckSample {
    first: Instant,
    last: Instant,
    offset: u64,
}

impl Conn {
    fn new(stream: TcpStream, start: u64) -> Self {
        Self {
            stream,
            sent: start,
            resent_counted: start,
            acked: std::collections::VecDeque::new(),
            acked_latest: start,
            confirmed_any: false,
            pending: 0..0,
        }
    }

    /// Records that the downstream had acknowledged up to `offset` at `now`.
    fn note_acked(&mut self, now: Instant, offset: u64) {
        if offset <= self.acked_latest {
            return;
        }
        self.acked_latest = offset;
        match self.acked.back_mut() {
            Some(s) if now.duration_since(s.first) < ACK_SAMPLE_EVERY => {
                s.last = now;
                s.offset = offset;
            }
            _ => self.acked.push_back(AckSample {
                first: now,
                last: now,
                offset,
            }),
        }
    }

    /// The offset every byte before which was acknowledged at least [`CONFIRM_AFTER`]
    /// ago, on a connection still open now; 0 when none is yet.
    fn confirmable(&mut self, now: Instant) -> u64 {
        let mut upto = 0;
        while let Some(s) = self.acked.front().copied() {
            if now.duration_since(s.last) < CONFIRM_AFTER {
                break;
            }
            upto = s.offset;
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
        let framing = match format {
            OutputFormat::Rfc5424 => Framing::OctetCounted,
            OutputFormat::Json | OutputFormat::Text => Framing::Lines,
        };
        let path = spool_dir.join(spool_name(address, format));
        let spool = Spool::open(&path, max_spool_bytes, framing)?;
        let r = spool.recovered;
        if r.torn_bytes > 0 {
            tracing::warn!(spool = %path.display(), bytes = r.torn_bytes,
                "the spool ended in a record cut short (a crash while writing it): cut off");
        }
        if r.records > 0 {
            tracing::info!(spool = %path.display(), records = r.records,
                "records an earlier run left unconfirmed: sending them first");
        }
        let stats = TcpSinkStats {
            pending_at_start: r.records,
            torn_bytes_at_start: r.torn_bytes,
            ..TcpSinkStats::default()
        };
        Ok(Self {
            address,
            spool,
            link: Link::Down,
            next_attempt: Instant::now(),
            retry: RETRY_MIN,
            next_tick: Instant::now(),
            sent_high: 0,
            stats,
            chunk: vec![0; CHUNK],
            full_warn: Throttle::new(Duration::from_secs(5)),
            down_warn: Throttle::new(Duration::from_secs(5)),
        })
    }

    pub fn stats(&self) -> TcpSinkStats {
        TcpSinkStats {
            pending: self.spool.records(),
            ..self.stats
        }
    }

    fn confirm(&mut self, upto: u64) {
        let n = self.spool.confirm(upto);
        self.stats.delivered += n;
        if n > 0 {
            self.retry = RETRY_MIN;
            if let Link::Up(c) = &mut self.link {
                c.confirmed_any = true;
            }
        }
    }

    /// Checks the connection: finishes a connect, confirms what the rules allow, and
    /// drops a connection that is gone.
    fn check(&mut self) {
        self.finish_connect();
        let Link::Up(c) = &mut self.link else {
            return;
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
        self.confirm(upto);
        match state {
            Peer::Open => {}
            Peer::Closed => self.lose("the downstream closed the connection"),
            Peer::Failed(e) => self.lose(&format!("the connection failed: {e}")),
        }
    }

    fn lose(&mut self, why: &str) {
        let Link::Up(c) = std::mem::replace(&mut self.link, Link::Down) else {
            return;
        };
        let unconfirmed = self.spool.records();
        if let Some(held) = self.down_warn.allow(Instant::now()) {
            tracing::warn!(upstream = %self.address, reason = why, unconfirmed, similar_since_last = held,
                "tcp sink: connection lost; unconfirmed records will be sent again");
        }
        self.stats.connections_lost += 1;
        self.sent_high = self.sent_high.max(c.sent);
        // A connection that confirmed something was worth having: reconnect at once (a
        // restarted downstream is back). One that confirmed nothing backs off, so a
        // downstream that accepts and drops every connection is not hammered.
        if c.confirmed_any {
            self.retry = RETRY_MIN;
            self.next_attempt = Instant::now();
        } else {
            self.back_off();
        }
    }

    fn back_off(&mut self) {
        self.next_attempt = Instant::now() + self.retry;
        self.retry = (self.retry * 2).min(RETRY_MAX);
    }

    /// Starts a non-blocking connect when none is up and it is time to try.
    fn start_connect(&mut self) {
        if !matches!(self.link, Link::Down) || Instant::now() < self.next_attempt {
            return;
        }
        match connect_nonblocking(self.address) {
            Ok(stream) => {
                self.link = Link::Connecting {
                    stream,
                    since: Instant::now(),
                }
            }
            Err(e) => self.connect_failed(&e),
        }
        self.finish_connect();
    }

    fn connect_failed(&mut self, e: &io::Error) {
        self.stats.connect_failures += 1;
        if let Some(held) = self.down_warn.allow(Instant::now()) {
            tracing::warn!(upstream = %self.address, error = %e, similar_since_last = held,
                pending = self.spool.records(), "tcp sink: downstream unreachable; records wait in the spool");
        }
        self.link = Link::Down;
        self.back_off();
    }

    /// A connect in progress: up when the socket is writable without error, failed on
    /// an error or after [`CONNECT_TIMEOUT`]. Never waits.
    fn finish_connect(&mut self) {
        let Link::Connecting { stream, since } = &self.link else {
            return;
        };
        let outcome = if writable_now(stream) {
            match stream.take_error() {
                Ok(None) => Ok(true),
                Ok(Some(e)) | Err(e) => Err(e),
            }
        } else if since.elapsed() >= CONNECT_TIMEOUT {
            Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
        } else {
            Ok(false)
        };
        match outcome {
            Ok(false) => {}
            Err(e) => self.connect_failed(&e),
            Ok(true) => {
                let Link::Connecting { stream, .. } = std::mem::replace(&mut self.link, Link::Down)
                else {
                    return;
                };
                self.stats.connections += 1;
                tracing::info!(upstream = %self.address, "tcp sink connected");
                // A new connection starts at the first unconfirmed batch.
                self.link = Link::Up(Conn::new(stream, self.spool.confirmed()));
            }
        }
    }

    /// Writes what the socket takes now, from the spool, up to [`PUMP_MAX`], without
    /// waiting.
    fn pump(&mut self) -> io::Result<()> {
        let unsent = match &self.link {
            Link::Up(c) => c.sent < self.spool.end(),
            _ => self.spool.records() > 0,
        };
        if !unsent {
            return Ok(());
        }
        self.start_connect();
        let mut budget = PUMP_MAX;
        loop {
            let Link::Up(c) = &mut self.link else {
                return Ok(());
            };
            if c.pending.is_empty() {
                if c.sent == self.spool.end() || budget == 0 {
                    break;
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
                    budget = budget.saturating_sub(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.lose(&format!("write failed: {e}"));
                    return Ok(());
                }
            }
        }
        // Records whose batch went out again on this connection, having gone out before.
        if let Link::Up(c) = &mut self.link {
            let to = c.sent.min(self.sent_high);
            if to > c.resent_counted {
                self.stats.resent += self.spool.records_ending_in(c.resent_counted, to);
                c.resent_counted = to;
            }
        }
        Ok(())
    }

    /// Everything sent and acknowledged on an open connection.
    fn all_acknowledged(&self) -> bool {
        match &self.link {
            Link::Up(c) => {
                c.sent == self.spool.end() && unacknowledged(&c.stream).is_ok_and(|q| q == 0)
            }
            _ => false,
        }
    }

    /// Check and pump, with errors logged (throttled) rather than returned: the batch
    /// that triggered them is safe in the spool either way.
    fn service(&mut self) {
        self.check();
        if let Err(e) = self.pump()
            && let Some(held) = self.down_warn.allow(Instant::now())
        {
            tracing::warn!(upstream = %self.address, error = %e, similar_since_last = held,
                "tcp sink: sending from the spool failed; records stay in it");
        }
    }

    /// Sends what waits; once all of it is acknowledged, half-closes: a downstream that
    /// then closes has read every byte, so all of it is confirmed. Whatever is not stays
    /// in the spool for the next start (which sends it first).
    fn drain(&mut self, limit: Duration) -> io::Result<()> {
        let deadline = Instant::now() + limit;
        while self.spool.records() > 0 && Instant::now() < deadline {
            self.service();
            if self.all_acknowledged() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let acknowledged = self.all_acknowledged();
        if let Link::Up(mut c) = std::mem::replace(&mut self.link, Link::Down)
            && self.spool.records() > 0
            && acknowledged
            && c.stream.shutdown(std::net::Shutdown::Write).is_ok()
        {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if wait_for_close(&mut c.stream, remaining.max(Duration::from_millis(100))) {
                let sent = c.sent;
                self.confirm(sent);
            }
        }
        // What was confirmed leaves the file, so the next start sends only the rest.
        self.spool.cut_confirmed();
        self.spool.sync()
    }
}

/// A TCP socket connecting to `addr` without waiting (EINPROGRESS is the normal case):
/// non-blocking, close-on-exec and without Nagle, like the forwarder's upstream sockets.
fn connect_nonblocking(addr: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{SockaddrStorage, connect};
    let fd = crate::tcp::socket::upstream_socket(addr)?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}

fn poll_one(stream: &TcpStream, events: libc::c_short, limit: Duration) -> libc::c_short {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
        pfd.revents
    } else {
        0
    }
}

/// Writable (or failed) now: a connect in progress has finished.
fn writable_now(stream: &TcpStream) -> bool {
    poll_one(stream, libc::POLLOUT, Duration::ZERO) != 0
}

/// Reads until the downstream closes (true) or `limit` passes or it fails (false).
fn wait_for_close(stream: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || poll_one(stream, libc::POLLIN, left) == 0 {
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
    /// far as the connection takes it now. Once the spool holds the batch, nothing
    /// after can fail it.
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
        self.service();
        Ok(())
    }

    fn end_window(&mut self) -> io::Result<()> {
        self.service();
        self.next_tick = Instant::now() + TICK_EVERY;
        self.spool.sync()
    }

    fn tick(&mut self) -> io::Result<()> {
        if Instant::now() < self.next_tick {
            return Ok(());
        }
        self.next_tick = Instant::now() + TICK_EVERY;
        self.service();
        Ok(())
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
            "torn_bytes_at_start": s.torn_bytes_at_start,
            "resent": s.resent,
            "spool_dropped": s.spool_dropped,
            "spool_bytes": self.spool.bytes(),
            "connections": s.connections,
            "connections_lost": s.connections_lost,
            "connect_failures": s.connect_failures,
        })
    }
}

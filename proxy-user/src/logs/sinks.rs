//! Where window reports and raw messages go, already encoded (JSON lines or octet-counted
//! RFC 5424, see [`super::encode`]); each sink flushes (and, per its policy, fsyncs)
//! after every window, so a crash loses at most the window in flight.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::config::{FsyncPolicy, OutputFormat, SinkConfig};

pub trait Sink: Send {
    /// Writes `records` complete encoded records, as one chunk.
    fn write(&mut self, bytes: &[u8], records: u64) -> io::Result<()>;
    /// End of a window: flush, and fsync if the policy says so.
    fn end_window(&mut self) -> io::Result<()>;
    fn name(&self) -> String;
    /// Sink-specific counters for the summary.
    fn stats(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

pub fn open(cfg: &SinkConfig, format: OutputFormat) -> io::Result<Box<dyn Sink>> {
    Ok(match cfg {
        SinkConfig::Stdout => Box::new(StdoutSink),
        SinkConfig::Tcp {
            address,
            spool_dir,
            max_spool_bytes,
        } => Box::new(TcpSink::open(
            *address,
            spool_dir,
            *max_spool_bytes,
            format,
        )?),
        SinkConfig::File {
            path,
            rotate_bytes,
            rotate_every,
            keep,
            fsync,
        } => Box::new(FileSink::open(
            path,
            *rotate_bytes,
            *rotate_every,
            *keep,
            *fsync,
        )?),
    })
}

pub struct StdoutSink;

impl Sink for StdoutSink {
    fn write(&mut self, bytes: &[u8], _records: u64) -> io::Result<()> {
        io::stdout().lock().write_all(bytes)
    }
    fn end_window(&mut self) -> io::Result<()> {
        io::stdout().lock().flush()
    }
    fn name(&self) -> String {
        "stdout".into()
    }
}

/// A file rotated by size and/or age: `path` is renamed to `path.1`, older
/// ones shift up, and beyond `keep` they are deleted.
pub struct FileSink {
    path: PathBuf,
    file: io::BufWriter<File>,
    written: u64,
    opened: Instant,
    rotate_bytes: Option<u64>,
    rotate_every: Option<Duration>,
    keep: usize,
    fsync: FsyncPolicy,
}

impl FileSink {
    pub fn open(
        path: &Path,
        rotate_bytes: Option<u64>,
        rotate_every: Option<Duration>,
        keep: usize,
        fsync: FsyncPolicy,
    ) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file: io::BufWriter::new(file),
            written,
            opened: Instant::now(),
            rotate_bytes,
            rotate_every,
            keep,
            fsync,
        })
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = io::BufWriter::new(file);
        self.written = 0;
        self.opened = Instant::now();
        Ok(())
    }

    fn due(&self) -> bool {
        self.rotate_bytes.is_some_and(|b| self.written >= b)
            || self
                .rotate_every
                .is_some_and(|d| self.opened.elapsed() >= d)
    }
}

impl Sink for FileSink {
    fn write(&mut self, bytes: &[u8], _records: u64) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn end_window(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.fsync == FsyncPolicy::Window {
            self.file.get_ref().sync_data()?;
        }
        // Rotation happens between windows, so a window is never split across files.
        if self.due() {
            self.rotate()?;
        }
        Ok(())
    }

    fn name(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// Records over TCP (JSON lines or octet-counted RFC 5424). While the upstream is
/// unreachable, batches go to an on-disk spool (fsynced per window) and are replayed in
/// order, before anything newer, once it accepts connections again. Delivery is
/// at-least-once: a crash during a replay resends the unacknowledged tail. A batch that
/// does not fit in the spool is dropped whole, its records counted (`spool_dropped`).
pub struct TcpSink {
    address: std::net::SocketAddr,
    conn: Option<std::net::TcpStream>,
    spool_path: PathBuf,
    spool: File,
    spool_bytes: u64,
    /// Records in the spool (counted on open by splitting it as the receive path does).
    spool_records: u64,
    max_spool_bytes: u64,
    next_attempt: Instant,
    pub spooled: u64,
    pub spool_dropped: u64,
    pub replayed: u64,
}

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_EVERY: Duration = Duration::from_millis(500);

impl TcpSink {
    pub fn open(
        address: std::net::SocketAddr,
        spool_dir: &Path,
        max_spool_bytes: u64,
        format: OutputFormat,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(spool_dir)?;
        // One spool per upstream and format, so a format change never replays the other.
        let spool_path = spool_dir.join(spool_name(address, format));
        let spool = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&spool_path)?;
        let spool_bytes = spool.metadata()?.len();
        let spool_records = if spool_bytes == 0 {
            0
        } else {
            super::framing::Frames::new(&std::fs::read(&spool_path)?, usize::MAX).count() as u64
        };
        Ok(Self {
            address,
            conn: None,
            spool_path,
            spool,
            spool_bytes,
            spool_records,
            max_spool_bytes,
            next_attempt: Instant::now(),
            spooled: 0,
            spool_dropped: 0,
            replayed: 0,
        })
    }

    /// A connection, if one exists or can be made now (rate-limited retries).
    fn connected(&mut self) -> Option<&mut std::net::TcpStream> {
        if self.conn.is_none() && Instant::now() >= self.next_attempt {
            match std::net::TcpStream::connect_timeout(&self.address, CONNECT_TIMEOUT) {
                Ok(c) => {
                    let _ = c.set_write_timeout(Some(WRITE_TIMEOUT));
                    let _ = c.set_nodelay(true);
                    tracing::info!(upstream = %self.address, "tcp sink connected");
                    self.conn = Some(c);
                }
                Err(e) => {
                    tracing::debug!(upstream = %self.address, error = %e, "tcp sink: upstream unreachable");
                    self.next_attempt = Instant::now() + RETRY_EVERY;
                }
            }
        }
        self.conn.as_mut()
    }

    fn send(&mut self, bytes: &[u8]) -> bool {
        let Some(c) = self.connected() else {
            return false;
        };
        if c.write_all(bytes).is_ok() {
            return true;
        }
        tracing::warn!(upstream = %self.address, "tcp sink: connection lost; spooling");
        self.conn = None;
        self.next_attempt = Instant::now() + RETRY_EVERY;
        false
    }

    /// Appends a batch to the spool, or drops and counts it when it does not fit.
    fn spool_batch(&mut self, bytes: &[u8], records: u64) -> io::Result<()> {
        if self.spool_bytes + bytes.len() as u64 > self.max_spool_bytes {
            self.spool_dropped += records;
            return Ok(());
        }
        self.spool.write_all(bytes)?;
        self.spool_bytes += bytes.len() as u64;
        self.spool_records += records;
        self.spooled += records;
        Ok(())
    }

    /// Sends the whole spool, in order; empties it only once all of it was written.
    fn replay(&mut self) -> io::Result<()> {
        if self.spool_bytes == 0 || self.connected().is_none() {
            return Ok(());
        }
        let data = std::fs::read(&self.spool_path)?;
        if !self.send(&data) {
            return Ok(());
        }
        self.replayed += self.spool_records;
        self.spool.set_len(0)?;
        self.spool.sync_data()?;
        self.spool_bytes = 0;
        self.spool_records = 0;
        Ok(())
    }
}

fn spool_name(address: std::net::SocketAddr, format: OutputFormat) -> String {
    format!(
        "tcp-{}-{}.spool",
        address.to_string().replace([':', '[', ']'], "_"),
        format.name()
    )
}

impl Sink for TcpSink {
    /// Sent, or spooled when the upstream is down or older records wait.
    fn write(&mut self, bytes: &[u8], records: u64) -> io::Result<()> {
        // Order: nothing new goes out while older records wait in the spool.
        self.replay()?;
        if self.spool_bytes == 0 && self.send(bytes) {
            return Ok(());
        }
        self.spool_batch(bytes, records)
    }

    fn end_window(&mut self) -> io::Result<()> {
        if self.spool_bytes > 0 {
            self.spool.sync_data()?;
        }
        if let Some(c) = self.conn.as_mut() {
            let _ = c.flush();
        }
        self.replay()
    }

    fn name(&self) -> String {
        format!("tcp {}", self.address)
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "spooled": self.spooled,
            "replayed": self.replayed,
            "spool_dropped": self.spool_dropped,
            "spool_bytes": self.spool_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ep-sink-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn rotates_by_size_between_windows_and_keeps_n() {
        let d = tmp();
        let path = d.join("out/agg.jsonl");
        let mut s = FileSink::open(&path, Some(100), None, 2, FsyncPolicy::Window).unwrap();
        for w in 0..5 {
            for i in 0..3 {
                s.write(
                    format!("{{\"w\":{w},\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(20)).as_bytes(),
                    1,
                )
                .unwrap();
            }
            s.end_window().unwrap();
        }
        // Each window is 3 lines > 100 bytes: every window rotates; 2 kept, the rest deleted.
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.is_empty(), "rotated after the last window");
        let one = std::fs::read_to_string(d.join("out/agg.jsonl.1")).unwrap();
        let two = std::fs::read_to_string(d.join("out/agg.jsonl.2")).unwrap();
        assert!(
            one.lines().all(|l| l.contains("\"w\":4")),
            "newest in .1: {one}"
        );
        assert!(two.lines().all(|l| l.contains("\"w\":3")), "{two}");
        assert_eq!(one.lines().count(), 3, "a window is never split");
        assert!(!d.join("out/agg.jsonl.3").exists());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn appends_without_rotation_and_survives_reopen() {
        let d = tmp();
        let path = d.join("agg.jsonl");
        for round in 0..2 {
            let mut s = FileSink::open(&path, None, None, 5, FsyncPolicy::Never).unwrap();
            s.write(format!("{{\"round\":{round}}}\n").as_bytes(), 1)
                .unwrap();
            s.end_window().unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"round\":0}\n{\"round\":1}\n"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn rotates_by_age() {
        let d = tmp();
        let path = d.join("agg.jsonl");
        let mut s = FileSink::open(
            &path,
            None,
            Some(Duration::from_millis(1)),
            1,
            FsyncPolicy::Never,
        )
        .unwrap();
        s.write(b"{}\n", 1).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        s.end_window().unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("agg.jsonl.1")).unwrap(),
            "{}\n"
        );
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[cfg(test)]
mod tcp_tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn an_outage_is_spooled_and_replayed_in_order() {
        let dir = std::env::temp_dir().join(format!("ep-tcp-sink-{}", std::process::id()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener); // the upstream is down at first
        let mut s = TcpSink::open(addr, &dir, 1 << 20, OutputFormat::Json).unwrap();
        for i in 0..3 {
            s.write(format!("{{\"n\":{i}}}\n").as_bytes(), 1).unwrap();
            s.end_window().unwrap();
        }
        assert_eq!(s.spooled, 3);
        // The upstream comes back on the same port.
        let listener = std::net::TcpListener::bind(addr).unwrap();
        std::thread::sleep(RETRY_EVERY);
        for i in 3..5 {
            s.write(format!("{{\"n\":{i}}}\n").as_bytes(), 1).unwrap();
            s.end_window().unwrap();
        }
        drop(s);
        let (conn, _) = listener.accept().unwrap();
        let got: Vec<String> = BufReader::new(conn).lines().map(Result::unwrap).collect();
        assert_eq!(
            got,
            (0..5).map(|i| format!("{{\"n\":{i}}}")).collect::<Vec<_>>(),
            "all, in order"
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
    fn a_full_spool_drops_and_counts() {
        let dir = std::env::temp_dir().join(format!("ep-tcp-full-{}", std::process::id()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let mut s = TcpSink::open(addr, &dir, 20, OutputFormat::Json).unwrap();
        for i in 0..5 {
            s.write(format!("line-{i}\n").as_bytes(), 1).unwrap();
        }
        // A batch of three records that does not fit is dropped whole.
        s.write(b"aa\nb\nc\n", 3).unwrap();
        assert_eq!(
            (s.spooled, s.spool_dropped),
            (2, 6),
            "7-byte lines in a 20-byte spool, then a 7-byte batch of 3"
        );
        drop(s);
        // Reopened, the spool's records are counted from its contents.
        let s = TcpSink::open(addr, &dir, 20, OutputFormat::Json).unwrap();
        assert_eq!(s.spool_records, 2);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

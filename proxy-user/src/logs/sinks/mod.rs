//! Where window reports and raw messages go, already encoded (JSON lines or octet-counted
//! RFC 5424, see [`super::encode`]); each sink flushes (and, per its policy, fsyncs)
//! after every window, so a crash loses at most the window in flight. The TCP sink
//! ([`tcp`]) keeps every batch in its spool ([`spool`]) until the downstream confirmed it.
use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::config::{FsyncPolicy, OutputFormat, SinkConfig};

mod spool;
mod tcp;
#[cfg(test)]
mod tcp_tests;

pub use tcp::{CLOSE_DRAIN, TcpSink, TcpSinkStats};

pub trait Sink: Send {
    /// Writes `records` complete encoded records, as one chunk.
    fn write(&mut self, bytes: &[u8], records: u64) -> io::Result<()>;
    /// End of a window: flush, and fsync if the policy says so.
    fn end_window(&mut self) -> io::Result<()>;
    /// Called often by the merger between batches: work a sink does on its own time
    /// (the TCP sink checks its connection and sends what waits).
    fn tick(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The sink is retired (shutdown or reload): finish what it can within `drain`.
    fn close(&mut self, drain: Duration) -> io::Result<()> {
        let _ = drain;
        self.end_window()
    }
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
    /// Unbuffered: a write the disk refuses fails for the batch it belongs to, never
    /// later for lines already counted as taken (raw batches are 64 KiB anyway).
    file: File,
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
        // Explicit modes whatever the umask (0750 / 0640: a log shipper in the group may
        // read), and a directory others could write into is refused: they could swap the
        // file for a symbolic link that edgeproxy then appends to.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsmode::create_dir_with(dir, crate::fsmode::LOG_DIR_MODE)?;
        }
        let file = crate::fsmode::open_append_with(path, false, crate::fsmode::LOG_FILE_MODE)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
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
        self.file.sync_all()?;
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
        let file =
            crate::fsmode::open_append_with(&self.path, false, crate::fsmode::LOG_FILE_MODE)?;
        self.file = file;
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
        if let Err(e) = self.file.write_all(bytes) {
            // Disk full mid-batch: cut what part of it went in, so the file holds whole
            // records and the batch counts as not taken.
            let _ = self.file.set_len(self.written);
            return Err(e);
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn end_window(&mut self) -> io::Result<()> {
        if self.fsync == FsyncPolicy::Window {
            self.file.sync_data()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        use std::os::unix::fs::DirBuilderExt as _;
        let d =
            std::env::temp_dir().join(format!("ep-sink-{}-{}", std::process::id(), rand_suffix()));
        // An explicit mode: another test may run under umask 000 meanwhile.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    /// Under umask 000 the sink's directory is 0750 and its files 0640, also after a
    /// rotation; a directory every user can write into is refused.
    #[test]
    fn modes_hold_under_umask_000_and_a_writable_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tmp();
        let path = d.join("logs/agg.jsonl");
        crate::fsmode::with_umask(0, || {
            let mut s = FileSink::open(&path, Some(1), None, 2, FsyncPolicy::Never).unwrap();
            s.write(b"{}\n", 1).unwrap();
            s.end_window().unwrap();
        });
        assert_eq!(
            (
                mode(&d.join("logs")),
                mode(&path),
                mode(&d.join("logs/agg.jsonl.1"))
            ),
            (0o750, 0o640, 0o640)
        );
        std::fs::set_permissions(d.join("logs"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = FileSink::open(&path, None, None, 1, FsyncPolicy::Never)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("is writable by every user"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
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

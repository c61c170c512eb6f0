//! The TCP sink's on-disk queue: every batch is appended here before it is sent, and
//! leaves only once the downstream confirmed it, so neither a lost connection nor a
//! crash of edgeproxy loses a batch that was taken.
//!
//! Positions are *logical* offsets that only grow: the first byte ever appended is 0.
//! Confirmed bytes are cut from the front of the file (emptied, or rewritten when the
//! confirmed prefix grows large), which moves `head` but never a logical offset.
use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

/// A confirmed prefix at least this long is cut even while later batches wait, so a
/// healthy connection under steady traffic keeps the file small.
const COMPACT_AT: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Batch {
    /// Logical offset one past the batch's last byte.
    end: u64,
    records: u64,
}

pub struct Spool {
    path: PathBuf,
    file: File,
    /// Logical offset of the file's first byte.
    head: u64,
    /// Logical offset one past the file's last byte.
    end: u64,
    /// Logical offset where the first unconfirmed batch starts (`end` when none waits);
    /// bytes in `[head, confirmed)` are confirmed but not yet cut from the file.
    confirmed: u64,
    /// Unconfirmed batches in order; the first starts at `confirmed`.
    batches: VecDeque<Batch>,
    max_bytes: u64,
    unsynced: bool,
}

impl Spool {
    /// Opens (creating, mode 0600) the spool at `path`. A file left by an earlier run is
    /// one batch of unconfirmed records, counted by splitting it as the receive path does.
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = crate::fsmode::open_private_append(path, true)?;
        let len = file.metadata()?.len();
        let mut batches = VecDeque::new();
        if len > 0 {
            let records =
                crate::logs::framing::Frames::new(&std::fs::read(path)?, usize::MAX).count();
            batches.push_back(Batch {
                end: len,
                records: records as u64,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            head: 0,
            end: len,
            confirmed: 0,
            batches,
            max_bytes,
            unsynced: false,
        })
    }

    /// Appends one batch; `false` (nothing written) when it would pass `max_bytes`.
    pub fn append(&mut self, bytes: &[u8], records: u64) -> io::Result<bool> {
        if self.bytes() + bytes.len() as u64 > self.max_bytes {
            return Ok(false);
        }
        if bytes.is_empty() {
            return Ok(true);
        }
        if let Err(e) = self.file.write_all(bytes) {
            // A short write (disk full) leaves a torn batch: cut it so the file stays
            // whole batches, and report the failure to the caller, who counts it.
            let _ = self.file.set_len(self.end - self.head);
            return Err(e);
        }
        self.end += bytes.len() as u64;
        self.batches.push_back(Batch {
            end: self.end,
            records,
        });
        self.unsynced = true;
        Ok(true)
    }

    /// Reads bytes from logical offset `at` into `buf`; 0 at the end.
    pub fn read_at(&self, at: u64, buf: &mut [u8]) -> io::Result<usize> {
        debug_assert!(at >= self.head);
        let want = buf.len().min((self.end - at) as usize);
        self.file.read_at(&mut buf[..want], at - self.head)
    }

    /// Drops every batch that ends at or before `upto`; returns the records dropped.
    pub fn confirm(&mut self, upto: u64) -> io::Result<u64> {
        let mut records = 0;
        while let Some(b) = self.batches.front().copied().filter(|b| b.end <= upto) {
            records += b.records;
            self.confirmed = b.end;
            self.batches.pop_front();
        }
        if records == 0 {
            return Ok(0);
        }
        let first = self.confirmed;
        if self.batches.is_empty() {
            self.file.set_len(0)?;
            self.file.sync_data()?;
            self.head = self.end;
            self.unsynced = false;
        } else if first - self.head >= COMPACT_AT {
            self.compact(first)?;
        }
        Ok(records)
    }

    /// Rewrites the file without the bytes before logical offset `from`: written to a
    /// new file, synced, then renamed over the old one, so a crash keeps one of the two.
    fn compact(&mut self, from: u64) -> io::Result<()> {
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".compact");
        let tmp_path = PathBuf::from(tmp_name);
        let mut tmp = crate::fsmode::create_private_file(&tmp_path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut at = from;
        while at < self.end {
            let n = self.read_at(at, &mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "spool shorter than its batches",
                ));
            }
            tmp.write_all(&buf[..n])?;
            at += n as u64;
        }
        tmp.sync_data()?;
        std::fs::rename(&tmp_path, &self.path)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)?;
        self.head = from;
        self.unsynced = false;
        Ok(())
    }

    /// Makes appended batches durable (once per window, not per batch).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Logical offset where the first unconfirmed batch starts (a batch boundary).
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes of unconfirmed batches.
    pub fn bytes(&self) -> u64 {
        self.end - self.confirmed()
    }

    /// Records of unconfirmed batches.
    pub fn records(&self) -> u64 {
        self.batches.iter().map(|b| b.records).sum()
    }

    /// Records of unconfirmed batches that start before logical offset `at`.
    pub fn records_before(&self, at: u64) -> u64 {
        let mut start = self.confirmed();
        let mut n = 0;
        for b in &self.batches {
            if start >= at {
                break;
            }
            n += b.records;
            start = b.end;
        }
        n
    }
}

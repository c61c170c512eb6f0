//! The TCP sink's on-disk queue: every batch is appended here before it is sent, and
//! leaves only once the downstream confirmed it, so neither a lost connection nor a
//! crash of edgeproxy loses a batch that was taken.
//!
//! Positions are *logical* offsets that only grow: the first byte ever appended is 0.
//! Confirmed bytes are cut from the front of the file (emptied, or rewritten when the
//! confirmed prefix grows large), which moves `head` but never a logical offset. One
//! spool file belongs to one sink: it is locked (`flock`) while open.
use std::{
    collections::VecDeque,
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, Write},
    os::{fd::AsRawFd, unix::fs::FileExt},
    path::{Path, PathBuf},
};

/// A confirmed prefix is cut while later batches wait once it is at least this long and
/// at least as long as what is left to copy, so a healthy connection keeps the file
/// small and draining a large backlog copies each byte a bounded number of times.
const COMPACT_AT: u64 = 8 << 20;
/// A file left by an earlier run is split into batches of about this size on open, so
/// its first part can be confirmed before the whole of it was acknowledged.
const REOPEN_BATCH: u64 = 1 << 20;

/// How records are delimited in the spool (the sink's output format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One record per line (JSON lines, text).
    Lines,
    /// RFC 6587 octet counting: `LEN SP MSG`, no separator.
    OctetCounted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Batch {
    /// Logical offset one past the batch's last byte.
    end: u64,
    records: u64,
}

/// What was found in a file left by an earlier run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub records: u64,
    /// Bytes after the last whole record (a write cut short by a crash), cut off.
    pub torn_bytes: u64,
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
    pub recovered: Recovered,
}

/// Takes the spool's lock, or says who holds it.
fn lock(file: &File, path: &Path) -> io::Result<()> {
    // SAFETY: flock on a valid descriptor; it only sets the lock.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "spool {} is in use by another sink or edgeproxy process ({e}); give each its own spool_dir",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Whole records at the start of `r` and where the last one ends, with batch ends every
/// [`REOPEN_BATCH`] bytes; streamed, so a large spool is never read into memory at once.
fn scan(r: impl Read, framing: Framing) -> io::Result<(u64, Vec<Batch>)> {
    let mut r = BufReader::with_capacity(1 << 16, r);
    let mut whole_end = 0u64;
    let mut batches = Vec::new();
    let mut batch = Batch { end: 0, records: 0 };
    let mut at = 0u64;
    let push = |end: u64, batches: &mut Vec<Batch>, batch: &mut Batch, last: bool| {
        batch.records += u64::from(!last);
        batch.end = end;
        if last || end - batches.last().map_or(0, |b: &Batch| b.end) >= REOPEN_BATCH {
            if batch.records > 0 {
                batches.push(*batch);
            }
            *batch = Batch { end, records: 0 };
        }
    };
    loop {
        match framing {
            Framing::Lines => {
                let mut line = Vec::new();
                let n = r.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                at += n as u64;
            }
            Framing::OctetCounted => {
                let mut header = Vec::new();
                let n = r.read_until(b' ', &mut header)?;
                let len = std::str::from_utf8(&header[..n.saturating_sub(1)])
                    .ok()
                    .filter(|_| header.last() == Some(&b' '))
                    .and_then(|s| s.parse::<u64>().ok());
                let Some(len) = len else { break };
                let skipped = io::copy(&mut (&mut r).take(len), &mut io::sink())?;
                if skipped < len {
                    break;
                }
                at += n as u64 + len;
            }
        }
        whole_end = at;
        push(at, &mut batches, &mut batch, false);
    }
    push(whole_end, &mut batches, &mut batch, true);
    Ok((whole_end, batches))
}

impl Spool {
    /// Opens (creating, mode 0600) and locks the spool at `path`. A file left by an
    /// earlier run holds unconfirmed records: they are counted, and a record cut short by
    /// a crash at the end is cut off (counted in `recovered.torn_bytes`).
    pub fn open(path: &Path, max_bytes: u64, framing: Framing) -> io::Result<Self> {
        let mut file = crate::fsmode::open_private_append(path, true)?;
        lock(&file, path)?;
        let len = file.metadata()?.len();
        let mut recovered = Recovered::default();
        let mut batches = VecDeque::new();
        if len > 0 {
            file.rewind()?;
            let (whole, found) = scan(&mut file, framing)?;
            if whole < len {
                file.set_len(whole)?;
                recovered.torn_bytes = len - whole;
            }
            recovered.records = found.iter().map(|b| b.records).sum();
            batches.extend(found);
        }
        let end = len - recovered.torn_bytes;
        Ok(Self {
            path: path.to_owned(),
            file,
            head: 0,
            end,
            confirmed: 0,
            batches,
            max_bytes,
            unsynced: false,
            recovered,
        })
    }

    /// Appends one batch; `false` (nothing written) when it would pass `max_bytes`.
    pub fn append(&mut self, bytes: &[u8], records: u64) -> io::Result<bool> {
        if self.bytes() + bytes.len() as u64 > self.max_bytes {
            return Ok(false);
        }
        if bytes.is_empty() || records == 0 {
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
    /// They are dropped (and returned) even if cutting them from the file then fails:
    /// that only leaves confirmed bytes on disk, logged, never a miscount.
    pub fn confirm(&mut self, upto: u64) -> u64 {
        let mut records = 0;
        while let Some(b) = self.batches.front().copied().filter(|b| b.end <= upto) {
            records += b.records;
            self.confirmed = b.end;
            self.batches.pop_front();
        }
        if records > 0 {
            let left = self.end - self.confirmed;
            let prefix = self.confirmed - self.head;
            if self.batches.is_empty() || (prefix >= COMPACT_AT && prefix >= left) {
                self.cut_confirmed();
            }
        }
        records
    }

    /// Removes the confirmed prefix from the file: emptied when nothing else waits,
    /// otherwise rewritten without it. Best effort: a failure is logged and the bytes
    /// stay (a restart would send them again).
    pub fn cut_confirmed(&mut self) {
        if self.confirmed == self.head {
            return;
        }
        let result = if self.batches.is_empty() {
            self.file.set_len(0).map(|()| {
                self.head = self.end;
                // Durable later (the next sync); the emptying itself is what counts now.
                self.unsynced = true;
            })
        } else {
            self.compact(self.confirmed)
        };
        if let Err(e) = result {
            tracing::warn!(spool = %self.path.display(), error = %e,
                "could not cut confirmed records from the spool; they stay on disk");
        }
    }

    /// Rewrites the file without the bytes before logical offset `from`: written to a
    /// new file, synced, then renamed over the old one, so a crash keeps one of the two.
    fn compact(&mut self, from: u64) -> io::Result<()> {
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(".compact");
        let tmp_path = PathBuf::from(tmp_name);
        let copied = (|| -> io::Result<File> {
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
            Ok(tmp)
        })();
        let tmp = match copied {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        lock(&tmp, &tmp_path)?;
        if let Err(e) = std::fs::rename(&tmp_path, &self.path) {
            let _ = std::fs::remove_file(&tmp_path);
            return Err(e);
        }
        drop(tmp);
        // The renamed file, opened for appending (the descriptor above was write-only),
        // and locked before anything else can take it.
        let file = crate::fsmode::open_private_append(&self.path, true)?;
        lock(&file, &self.path)?;
        self.file = file;
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
        self.end - self.confirmed
    }

    /// Records of unconfirmed batches.
    pub fn records(&self) -> u64 {
        self.batches.iter().map(|b| b.records).sum()
    }

    /// Records of unconfirmed batches that end after `from` and at or before `to`.
    pub fn records_ending_in(&self, from: u64, to: u64) -> u64 {
        self.batches
            .iter()
            .filter(|b| b.end > from && b.end <= to)
            .map(|b| b.records)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_record_is_cut_on_open_and_batches_are_rebuilt() {
        let lines = b"{\"a\":1}\n{\"a\":2}\n{\"a\":";
        let (end, b) = scan(&lines[..], Framing::Lines).unwrap();
        assert_eq!(end, 16);
        assert_eq!(
            b,
            vec![Batch {
                end: 16,
                records: 2
            }]
        );
        let octets = b"5 <14>a5 <14>b7 <14>";
        let (end, b) = scan(&octets[..], Framing::OctetCounted).unwrap();
        assert_eq!(end, 14);
        assert_eq!(b.iter().map(|b| b.records).sum::<u64>(), 2);
        let big: Vec<u8> = (0..300_000)
            .flat_map(|i| format!("{i:07}\n").into_bytes())
            .collect();
        let (end, b) = scan(&big[..], Framing::Lines).unwrap();
        assert_eq!(end, big.len() as u64);
        assert!(b.len() >= 2, "split near {REOPEN_BATCH} bytes: {}", b.len());
        assert_eq!(b.iter().map(|b| b.records).sum::<u64>(), 300_000);
        assert!(b.windows(2).all(|w| w[0].end < w[1].end));
    }
}

//! The record rings (samples and captures), read in place from their mmapped pages: the
//! callback sees the header and the data slice without a copy.
//!
//! Not aya's `RingBuf`, for one reason measured under load: it publishes the consumer
//! position after every record, and the data plane reads that position on every
//! reservation (and again for the wake-up threshold), so each record moved a cache line
//! between the consumer's core and the producer's. [`RecordRing`] publishes it once per
//! [`PUBLISH_BYTES`] consumed and at the end of every drain.
use std::{
    os::fd::{AsFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence},
};

use aya::maps::{Map, MapData};
use proxy_common::{
    ProtoClass, RECORDS_MAP,
    policy::{RECORD_HEADER_LEN, RecordHeader, RecordKind},
};

use super::DataplaneError;
use crate::mapping::Mapping;

/// Consumed bytes after which a drain publishes its position even if more records wait:
/// the producer never sees more than this much of the ring still taken.
pub const PUBLISH_BYTES: usize = 64 * 1024;

/// The kernel's record header (`struct bpf_ringbuf_hdr`): a length word with these two
/// flag bits, then the page offset the kernel uses to find the map.
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HDR_LEN: usize = 8;

/// One BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`), read in place by one reader (see
/// [`RingReaderLock`] for pinned rings).
pub struct RecordRing {
    /// The map, for its fd (`None` only for the tests' rings in plain memory).
    map: Option<MapData>,
    /// The consumer page: `consumer_pos` at offset 0, the only thing we write.
    consumer: Mapping,
    /// The producer page (`producer_pos` at offset 0) and then the data pages, mapped
    /// twice in a row by the kernel so a record that wraps reads as one slice.
    producer: Mapping,
    page: usize,
    size: usize,
    /// Where the next record starts; ahead of the published position mid-drain.
    pos: usize,
    /// Drains that found the published position moved by someone else (another
    /// process reading the same pinned ring).
    followed: u64,
    /// Times a position or record length made no sense and reading skipped to the
    /// producer's position (the records in between are lost).
    skipped: u64,
}

impl RecordRing {
    pub fn new(map: MapData) -> Result<Self, DataplaneError> {
        let io = DataplaneError::RecordRing;
        let info = map.info().map_err(|source| DataplaneError::Map {
            name: RECORDS_MAP,
            source,
        })?;
        if !matches!(info.map_type(), Ok(aya::maps::MapType::RingBuf)) {
            return Err(io(std::io::Error::other(
                "the map is not a BPF ring buffer",
            )));
        }
        let size = info.max_entries() as usize;
        let page = crate::mapping::page_size();
        if !size.is_power_of_two() || !size.is_multiple_of(page) {
            return Err(io(std::io::Error::other(format!(
                "ring of {size} bytes: not a power-of-two multiple of the page size"
            ))));
        }
        let fd = map.fd().as_fd();
        let consumer = Mapping::shared(fd, page, 0, true).map_err(io)?;
        let producer = Mapping::shared(fd, page + 2 * size, page, false).map_err(io)?;
        Ok(Self::from_parts(Some(map), consumer, producer, page, size))
    }

    /// `producer` must be `page + 2 * size` bytes laid out as the kernel maps a ring:
    /// the producer page, then the data pages twice.
    fn from_parts(
        map: Option<MapData>,
        consumer: Mapping,
        producer: Mapping,
        page: usize,
        size: usize,
    ) -> Self {
        assert!(consumer.len() >= page && producer.len() >= page + 2 * size);
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            size,
            pos: 0,
            followed: 0,
            skipped: 0,
        };
        // A pinned ring may have been read before: start where its last reader stopped
        // (`follow` checks that position before anything is read at it).
        ring.resync();
        ring
    }

    /// Takes up the shared position as ours without counting it as another reader's
    /// doing: for a reader that has just become the ring's one reader.
    pub fn resync(&mut self) {
        self.pos = self.consumer_pos().load(Ordering::Acquire);
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page is mapped for this value's life and starts with the
        // kernel's `unsigned long consumer_pos`, page-aligned.
        unsafe { self.consumer.ptr().cast::<AtomicUsize>().as_ref() }
    }

    fn producer_pos(&self) -> &AtomicUsize {
        // SAFETY: as above, for the producer page's `producer_pos`.
        unsafe { self.producer.ptr().cast::<AtomicUsize>().as_ref() }
    }

    fn data(&self) -> NonNull<u8> {
        // SAFETY: the producer mapping is `page + 2 * size` bytes long.
        unsafe { self.producer.ptr().add(self.page) }
    }

    /// Hands every committed record to `f` in order, up to the first one still being
    /// written and at most one ring's worth per call (so a producer faster than `f`
    /// cannot keep the caller here forever); returns how many it handed over.
    /// Discarded records are skipped.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let Some(mut end) = self.follow() else {
            return 0;
        };
        let mut n = 0;
        let mut published = self.pos;
        let mut consumed = 0;
        while consumed < self.size {
            if self.pos == end {
                if self.pos != published {
                    self.consumer_pos().store(self.pos, Ordering::Release);
                    published = self.pos;
                }
                // Order the store above before the producer position's reload, so a
                // producer checking our position for a wake-up and this reload cannot
                // both miss (this only matters to a producer using the kernel's default
                // wake-up; ours names its flags, and the poll timeout covers the rest).
                fence(Ordering::SeqCst);
                end = self.producer_pos().load(Ordering::Acquire);
                // The producer is held back by the *shared* position: if another
                // reader moved it, `end` may now be more than a ring ahead of us. Stop;
                // the next drain's `follow` sorts it out.
                let ahead = end.wrapping_sub(self.pos);
                if ahead == 0 || ahead > self.size {
                    break;
                }
            }
            // Invariant here: 0 < end - pos <= size, and pos is a multiple of 8.
            let off = self.pos & (self.size - 1);
            // SAFETY: `off < size`, so the 8-byte header lies in the data mapping; it is
            // 8-byte aligned (positions are multiples of 8, checked by `follow` and
            // kept by steps of multiples of 8), and the kernel commits it with an xchg
            // that this Acquire load pairs with, making the record's bytes visible.
            let header = unsafe { self.data().add(off).cast::<AtomicU32>().as_ref() }
                .load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                break;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            let step = (len + HDR_LEN).next_multiple_of(8);
            if step > self.size || step > end.wrapping_sub(self.pos) {
                // A record running past what the producer committed: not a record
                // header at all. Never read past the ring; start again at `end`.
                self.skip_to(end, "a record runs past the producer's position");
                published = self.pos;
                break;
            }
            if header & DISCARD_BIT == 0 {
                // SAFETY: `off + 8 + len <= off + step <= 2 * size` (`off < size`, `step
                // <= size`): inside the data pages, which are mapped twice in a row. The
                // record is committed, and the producer will not reuse it before a
                // position past it is published, which happens only after `f` returns.
                let bytes = unsafe {
                    std::slice::from_raw_parts(self.data().add(off + HDR_LEN).as_ptr(), len)
                };
                f(bytes);
                n += 1;
            }
            self.pos = self.pos.wrapping_add(step);
            consumed += step;
            if self.pos.wrapping_sub(published) >= PUBLISH_BYTES {
                self.consumer_pos().store(self.pos, Ordering::Release);
                published = self.pos;
            }
        }
        if self.pos != published {
            self.consumer_pos().store(self.pos, Ordering::Release);
        }
        n
    }

    /// Checks our position against the shared one and the producer's before reading;
    /// returns the producer's position, or `None` when there is nothing to read. One
    /// reader publishes what it read at the end of every drain, so the shared position
    /// differs from ours only when another process reads the same pinned ring (which
    /// [`RingReaderLock`] prevents between edgeproxy processes): follow it rather than
    /// fight over it. Records may then be lost, repeated or torn between the two.
    fn follow(&mut self) -> Option<usize> {
        // The shared position first: the producer never passes it by more than a ring,
        // and loaded in this order `shared <= end` unless the shared one is corrupt.
        let shared = self.consumer_pos().load(Ordering::Acquire);
        let end = self.producer_pos().load(Ordering::Acquire);
        if shared != self.pos {
            self.followed += 1;
            if self.followed.is_power_of_two() {
                tracing::warn!(
                    times = self.followed,
                    "record ring: another process is reading this ring too; records are split between the readers"
                );
            }
            self.pos = shared;
        }
        let why = if !self.pos.is_multiple_of(8) {
            "the ring's consumer position is not 8-byte aligned"
        } else if end.wrapping_sub(self.pos) > self.size {
            // Either ahead of the producer (wrapping) or more than a ring behind it.
            "the ring's consumer position is not within a ring of the producer's"
        } else {
            return (end != self.pos).then_some(end);
        };
        // Loaded shared-first, a valid position is never ahead of `end`: this one is
        // corrupt, and the producer, held back by it, needs it put right, even backwards.
        self.skip_to(end, why);
        self.consumer_pos().store(end, Ordering::Release);
        None
    }

    /// Moves to the producer's position; the shared position only forward (another
    /// reader may have published past `end`, and the slots behind it may already hold
    /// the next lap's records).
    fn skip_to(&mut self, end: usize, why: &'static str) {
        self.skipped += 1;
        if self.skipped.is_power_of_two() {
            tracing::error!(
                times = self.skipped,
                why,
                "record ring: skipping to the producer's position"
            );
        }
        self.pos = end;
        let shared = self.consumer_pos();
        let mut cur = shared.load(Ordering::Acquire);
        // `end` is ahead of `cur` when the distance from `cur` is at most a ring.
        while end.wrapping_sub(cur) <= self.size && cur != end {
            match shared.compare_exchange(cur, end, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
    }

    /// How often this reader found another reader's position, and how often it had to
    /// skip ahead.
    fn irregularities(&self) -> (u64, u64) {
        (self.followed, self.skipped)
    }

    /// Readable when the ring holds unread data (the data plane wakes pollers only when
    /// it crosses the threshold, see `RECORDS_WAKEUP_BYTES`).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.map.as_ref().map(|m| m.fd().as_fd())
    }
}

/// How long a would-be reader of pinned rings waits for one that is stopping to let go.
pub const RING_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// One reader at a time for a pinned data plane's record rings: a ring has one consumer
/// position, so two processes reading it would split (or repeat) its records between
/// them. An flock on the pin directory decides who reads, held for the reader's life. A
/// log pipeline (`run --config`, `logs --capture-from`) must get it or not start;
/// `edgeproxy run` without one reads the rings only for its record tally and HTTP
/// request lines, so it leaves them, with a warning, to a reader that already has them
/// and takes them when that reader stops (`--leave-records` makes it not try).
pub struct RingReaderLock {
    dir: std::fs::File,
    path: std::path::PathBuf,
}

impl RingReaderLock {
    pub fn open(pin_dir: &std::path::Path) -> Result<Self, DataplaneError> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(pin_dir)
            .map_err(|source| DataplaneError::RingLock {
                dir: pin_dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            dir,
            path: pin_dir.to_path_buf(),
        })
    }

    /// Takes the lock if no other process holds it.
    pub fn try_take(&self) -> Result<bool, DataplaneError> {
        self.flock_nb(libc::LOCK_EX)
    }

    /// `flock(op | LOCK_NB)`: whether it was granted (`false`: someone holds it).
    fn flock_nb(&self, op: libc::c_int) -> Result<bool, DataplaneError> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock on a descriptor this value owns; no memory is involved.
        if unsafe { libc::flock(self.dir.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(DataplaneError::RingLock {
                dir: self.path.clone(),
                source: e,
            })
        }
    }

    /// Tries to take the lock for up to `patience` (a reader that is stopping lets go
    /// of it); whether it got it.
    pub fn wait_to_take(&self, patience: std::time::Duration) -> Result<bool, DataplaneError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            if self.try_take()? {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Whether the pin directory this lock was taken on is still the one at its path.
    /// `edgeproxy detach` removes it, and a new `run` pins new rings under a new
    /// directory of the same name: a reader of the old ones then reads rings nothing
    /// writes to any more.
    pub fn is_current(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        match (self.dir.metadata(), std::fs::metadata(&self.path)) {
            (Ok(held), Ok(now)) => held.dev() == now.dev() && held.ino() == now.ino(),
            _ => false,
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Takes the lock to keep (see [`Self::wait_to_take`]); an error naming the
    /// directory if another process keeps it.
    pub fn take_for_life(self, patience: std::time::Duration) -> Result<Self, DataplaneError> {
        if self.wait_to_take(patience)? {
            Ok(self)
        } else {
            Err(DataplaneError::RingsTaken { dir: self.path })
        }
    }

    /// Whether another process holds the lock (reads the rings), without taking it: a
    /// shared lock is refused while someone holds the exclusive one.
    pub fn held_elsewhere(&self) -> Result<bool, DataplaneError> {
        if self.flock_nb(libc::LOCK_SH)? {
            self.flock_nb(libc::LOCK_UN)?;
            return Ok(false);
        }
        Ok(true)
    }
}

/// One record as the ring holds it.
pub struct RecordView<'a> {
    pub header: RecordHeader,
    /// `header.cap_len` bytes: the frame's first bytes (sample) or the UDP payload (capture).
    pub data: &'a [u8],
}

/// The record rings: one per CPU, or the one shared ring (see [`super::RingMode`]).
pub struct Records {
    /// Index 0 is the shared ring; per-CPU rings, when installed, follow in CPU order.
    rings: Vec<RecordRing>,
    /// The CPU whose packets each ring holds (`None`: the shared ring).
    cpus: Vec<Option<u32>>,
    per_ring: Vec<u64>,
    /// Kept while these rings are read for the whole run (every part of a split holds it).
    reader: Option<std::sync::Arc<RingReaderLock>>,
}

impl Records {
    /// `cpus` names the CPU of each ring (`None` entries: the shared ring).
    pub(super) fn new(
        maps: Vec<Map>,
        cpus: Option<Vec<Option<u32>>>,
    ) -> Result<Self, DataplaneError> {
        let rings = maps
            .into_iter()
            .map(|m| match m {
                Map::RingBuf(data) => RecordRing::new(data),
                _ => Err(DataplaneError::RecordRing(std::io::Error::other(
                    "the map is not a BPF ring buffer",
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let per_ring = vec![0; rings.len()];
        // Unless told otherwise: the shared ring first, then one per CPU in order.
        let cpus = cpus.unwrap_or_else(|| {
            (0..rings.len())
                .map(|i| i.checked_sub(1).map(|c| c as u32))
                .collect()
        });
        Ok(Self {
            rings,
            cpus,
            per_ring,
            reader: None,
        })
    }

    /// Takes up each ring's shared position silently: for a reader that has just become
    /// the rings' one reader (after waiting for another to let go).
    pub fn resync(&mut self) {
        for r in &mut self.rings {
            r.resync();
        }
    }

    /// The lock these rings are read under, if they hold one.
    pub fn reader(&self) -> Option<std::sync::Arc<RingReaderLock>> {
        self.reader.clone()
    }

    /// Keeps `lock` (taken for life) as long as these rings, or any part of them, live.
    pub fn hold(mut self, lock: RingReaderLock) -> Self {
        self.reader = Some(std::sync::Arc::new(lock));
        self
    }

    /// Records drained from each ring so far (index 0: the shared ring).
    pub fn drained_per_ring(&self) -> &[u64] {
        &self.per_ring
    }

    /// Rings opened elsewhere (the pinned rings of a running data plane): the shared
    /// ring and per-CPU rings by CPU.
    pub fn from_rings(
        shared: MapData,
        per_cpu: Vec<(u32, MapData)>,
    ) -> Result<Self, DataplaneError> {
        let (cpus, maps): (Vec<Option<u32>>, Vec<Map>) = std::iter::once((None, shared))
            .chain(per_cpu.into_iter().map(|(c, m)| (Some(c), m)))
            .map(|(c, m)| (c, Map::RingBuf(m)))
            .unzip();
        Self::new(maps, Some(cpus))
    }

    /// Splits the rings among `consumers`, `assign` naming the consumer of each ring by
    /// its CPU (`None`: the shared ring), so that every ring has exactly one reader.
    /// Consumers given no ring get `None`.
    pub fn split(
        self,
        consumers: usize,
        assign: impl Fn(Option<u32>) -> usize,
    ) -> Vec<Option<Records>> {
        let mut out: Vec<Option<Records>> = (0..consumers).map(|_| None).collect();
        for (ring, cpu) in self.rings.into_iter().zip(self.cpus) {
            let i = assign(cpu).min(consumers.saturating_sub(1));
            let r = out[i].get_or_insert_with(|| Records {
                rings: Vec::new(),
                cpus: Vec::new(),
                per_ring: Vec::new(),
                reader: self.reader.clone(),
            });
            r.rings.push(ring);
            r.cpus.push(cpu);
            r.per_ring.push(0);
        }
        out
    }

    pub fn ring_count(&self) -> usize {
        self.rings.len()
    }

    /// Hands the records now in the rings to `f` (at most a ring's worth of each per
    /// call); returns how many there were. Records
    /// that do not parse (a mismatched eBPF object) are counted in `tally.bad`, never misread.
    pub fn drain(&mut self, tally: &mut RecordTally, mut f: impl FnMut(&RecordView<'_>)) -> usize {
        let mut n = 0;
        for (ring, count) in self.rings.iter_mut().zip(self.per_ring.iter_mut()) {
            let (followed, skipped) = ring.irregularities();
            let drained = ring.drain(|bytes| match parse_record(bytes) {
                Some(view) => {
                    tally.add(&view.header);
                    f(&view);
                }
                None => tally.bad += 1,
            });
            n += drained;
            *count += drained as u64;
            let (followed_now, skipped_now) = ring.irregularities();
            tally.other_reader += followed_now - followed;
            tally.skips += skipped_now - skipped;
        }
        n
    }

    /// One fd per ring, readable when the data plane woke its consumer.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.rings.iter().filter_map(RecordRing::fd).collect()
    }
}

pub fn parse_record(bytes: &[u8]) -> Option<RecordView<'_>> {
    if bytes.len() < RECORD_HEADER_LEN {
        return None;
    }
    // SAFETY: at least RECORD_HEADER_LEN bytes are present; RecordHeader is `#[repr(C)]`
    // plain integers and arrays, valid for any bit pattern; read_unaligned needs no alignment.
    let header = unsafe { bytes.as_ptr().cast::<RecordHeader>().read_unaligned() };
    let data = bytes.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + header.cap_len as usize)?;
    Some(RecordView { header, data })
}

/// Records drained, by kind and class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordTally {
    pub samples: u64,
    pub captures: u64,
    pub by_class: [u64; ProtoClass::COUNT as usize],
    /// Records with an unknown kind or class, or too short to hold their header and data.
    pub bad: u64,
    /// Drains that found another process reading the same ring (records split between
    /// the readers).
    pub other_reader: u64,
    /// Times reading skipped to the producer's position over something that was not a
    /// record (records lost, number unknown).
    pub skips: u64,
}

impl RecordTally {
    fn add(&mut self, h: &RecordHeader) {
        match (h.kind, ProtoClass::from_u32(u32::from(h.class))) {
            (k, Some(c)) if k == RecordKind::Sample as u8 => {
                self.samples += 1;
                self.by_class[c as usize] += 1;
            }
            (k, Some(c)) if k == RecordKind::Capture as u8 => {
                self.captures += 1;
                self.by_class[c as usize] += 1;
            }
            _ => self.bad += 1,
        }
    }

    pub fn class(&self, class: ProtoClass) -> u64 {
        self.by_class[class as usize]
    }

    pub fn total(&self) -> u64 {
        self.samples + self.captures + self.bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring in plain memory laid out as the kernel maps one (the data pages written
    /// twice, as the double mapping shows them), with a producer written here.
    struct FakeRing {
        ring: RecordRing,
        prod: usize,
    }

    const PAGE: usize = 4096;
    const SIZE: usize = 4 * PAGE;

    impl FakeRing {
        fn new(start: usize) -> Self {
            let consumer = Mapping::new(PAGE, false).unwrap();
            let producer = Mapping::new(PAGE + 2 * SIZE, false).unwrap();
            let mut f = Self {
                ring: RecordRing::from_parts(None, consumer, producer, PAGE, SIZE),
                prod: start,
            };
            f.set_consumer(start);
            f.ring.resync();
            f.publish();
            f
        }

        fn byte(&mut self, pos: usize, b: u8) {
            let off = pos & (SIZE - 1);
            let data = self.ring.data().as_ptr();
            // SAFETY: `off < SIZE` and the data area is `2 * SIZE` bytes.
            unsafe {
                *data.add(off) = b;
                *data.add(off + SIZE) = b;
            }
        }

        /// Appends a record (header then `payload`), committed unless `busy`.
        fn push(&mut self, payload: &[u8], discard: bool, busy: bool) {
            let mut len = payload.len() as u32;
            if discard {
                len |= DISCARD_BIT;
            }
            if busy {
                len |= BUSY_BIT;
            }
            let pos = self.prod;
            for (i, b) in len.to_le_bytes().into_iter().chain([0; 4]).enumerate() {
                self.byte(pos + i, b);
            }
            for (i, &b) in payload.iter().enumerate() {
                self.byte(pos + HDR_LEN + i, b);
            }
            self.prod += (payload.len() + HDR_LEN).next_multiple_of(8);
            self.publish();
        }

        fn publish(&self) {
            self.ring.producer_pos().store(self.prod, Ordering::Release);
        }

        fn set_consumer(&self, pos: usize) {
            self.ring.consumer_pos().store(pos, Ordering::Release);
        }

        fn shared(&self) -> usize {
            self.ring.consumer_pos().load(Ordering::Acquire)
        }

        fn drain(&mut self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            self.ring.drain(|b| out.push(b.to_vec()));
            out
        }
    }

    fn payload(i: usize) -> Vec<u8> {
        (0..(i * 37) % 300 + 1).map(|k| (i + k) as u8).collect()
    }

    #[test]
    fn records_come_out_in_order_across_many_laps_and_the_position_is_published() {
        // Started near the end of a lap so records wrap in the first pass too.
        let mut f = FakeRing::new(SIZE - 24);
        let mut next = 0;
        for round in 0..40 {
            let mut want = Vec::new();
            while f.prod - f.shared() < SIZE - 400 {
                let discard = next % 7 == 3;
                f.push(&payload(next), discard, false);
                if !discard {
                    want.push(payload(next));
                }
                next += 1;
            }
            assert_eq!(f.drain(), want, "round {round}");
            assert_eq!(f.shared(), f.prod, "everything read is published");
        }
        assert_eq!(f.ring.irregularities(), (0, 0));
    }

    #[test]
    fn a_record_being_written_stops_the_drain_until_it_is_committed() {
        let mut f = FakeRing::new(0);
        f.push(b"one", false, false);
        let busy_at = f.prod;
        f.push(b"two", false, true);
        f.push(b"three", false, false);
        assert_eq!(f.drain(), vec![b"one".to_vec()]);
        assert_eq!(f.shared(), busy_at);
        // Commit "two": clear its busy bit.
        f.byte(busy_at + 3, 0);
        assert_eq!(f.drain(), vec![b"two".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn another_reader_moving_the_position_is_followed_and_counted() {
        let mut f = FakeRing::new(0);
        for i in 0..10 {
            f.push(&payload(i), false, false);
        }
        // Another process read the first three and published that.
        let three: usize = (0..3)
            .map(|i| (payload(i).len() + HDR_LEN).next_multiple_of(8))
            .sum();
        f.set_consumer(three);
        assert_eq!(f.drain(), (3..10).map(payload).collect::<Vec<_>>());
        assert_eq!(f.ring.irregularities(), (1, 0));
    }

    #[test]
    fn nonsense_positions_and_lengths_skip_to_the_producer_without_reading_past_it() {
        let mut f = FakeRing::new(0);
        f.push(b"fine", false, false);
        // A length running past what was committed.
        let bad = f.prod;
        f.push(&[7; 16], false, false);
        for (i, b) in 5000u32.to_le_bytes().into_iter().enumerate() {
            f.byte(bad + i, b);
        }
        assert_eq!(f.drain(), vec![b"fine".to_vec()]);
        assert_eq!(f.ring.irregularities(), (0, 1));
        assert_eq!(f.shared(), f.prod, "skipped to the producer");
        f.push(b"after", false, false);
        assert_eq!(f.drain(), vec![b"after".to_vec()]);
        // A misaligned shared position, and one ahead of the producer (corrupt): both
        // are put right to the producer's position, the second backwards.
        f.push(b"lost", false, false);
        f.set_consumer(f.shared() + 4);
        assert!(f.drain().is_empty());
        assert_eq!(f.shared(), f.prod);
        f.set_consumer(f.prod + 64);
        assert!(f.drain().is_empty());
        assert_eq!(
            f.shared(),
            f.prod,
            "the producer is not left behind a bogus position"
        );
        f.push(b"again", false, false);
        assert_eq!(f.drain(), vec![b"again".to_vec()]);
        // More than a ring behind.
        f.push(b"x", false, false);
        f.set_consumer(f.prod.wrapping_sub(2 * SIZE));
        assert!(f.drain().is_empty());
        assert_eq!(f.shared(), f.prod);
    }

    #[test]
    fn no_position_past_a_record_is_published_before_it_is_handed_over() {
        let mut f = FakeRing::new(0);
        // While a record is in the callback the producer must not be told it is free
        // (it would overwrite it): the position published stays behind it.
        for i in 0..20 {
            f.push(&payload(i), false, false);
        }
        let start = f.shared();
        let consumer = f.ring.consumer_pos() as *const AtomicUsize;
        let mut seen = Vec::new();
        f.ring.drain(|_| {
            // SAFETY: the consumer page outlives the drain.
            seen.push(unsafe { &*consumer }.load(Ordering::Acquire));
        });
        assert!(
            seen.iter().all(|&p| p == start),
            "published mid-record: {seen:?}"
        );
        assert_eq!(f.shared(), f.prod);
    }

    fn bytes_of(h: &RecordHeader, data: &[u8]) -> Vec<u8> {
        // SAFETY: RecordHeader is repr(C) plain data without padding (size asserted in
        // proxy-common); viewing it as bytes is sound.
        let hb = unsafe {
            std::slice::from_raw_parts((h as *const RecordHeader).cast::<u8>(), RECORD_HEADER_LEN)
        };
        let mut v = hb.to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn records_parse_header_and_exactly_cap_len_bytes() {
        let h = RecordHeader {
            kind: RecordKind::Capture as u8,
            class: ProtoClass::Udp4 as u8,
            cap_len: 5,
            dst_port: 514,
            ..Default::default()
        };
        let mut b = bytes_of(&h, b"hello");
        b.extend_from_slice(&[0; 11]); // the rest of the reserved bucket
        let v = parse_record(&b).expect("parses");
        assert_eq!(v.data, b"hello");
        assert_eq!(v.header.dst_port, 514);
        assert!(parse_record(&b[..RECORD_HEADER_LEN - 1]).is_none());
        assert!(
            parse_record(&b[..RECORD_HEADER_LEN + 4]).is_none(),
            "cap_len past the end"
        );
    }

    #[test]
    fn tally_counts_kinds_and_unknowns() {
        let mut t = RecordTally::default();
        t.add(&RecordHeader {
            kind: 1,
            class: ProtoClass::Tcp4 as u8,
            ..Default::default()
        });
        t.add(&RecordHeader {
            kind: 2,
            class: ProtoClass::Udp6 as u8,
            ..Default::default()
        });
        t.add(&RecordHeader {
            kind: 9,
            ..Default::default()
        });
        assert_eq!((t.samples, t.captures, t.bad, t.total()), (1, 1, 1, 3));
        assert_eq!(t.class(ProtoClass::Udp6), 1);
    }
}

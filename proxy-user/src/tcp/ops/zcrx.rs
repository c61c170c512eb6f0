//! io_uring zero-copy receive (ZCRX): one rx queue of a NIC bound to a memory area this
//! worker registered. The NIC writes payload straight into the area; a `RecvZc`
//! completion names where (offset, length), and once the bytes were forwarded the chunk
//! goes back to the NIC through the refill ring. Data that reaches the socket through
//! another queue is copied into the area by the kernel, so a receive stays correct for
//! any TCP socket; it is zero-copy for the flows steered to the registered queue.
//!
//! Needs a driver with queue-management ops and header/data split (bnxt_en, gve,
//! mlx5_core, fbnic): veth, loopback and virtio_net refuse the registration
//! (`EOPNOTSUPP`), and the worker falls back to the configured copy path with that reason.
use std::{
    collections::{HashSet, VecDeque},
    io,
    os::fd::AsRawFd,
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use io_uring::{IoUring, cqueue, squeue, types};

use super::{F_MORE, F_ZC};
use crate::mapping::{Mapping, page_size};

/// `IORING_REGISTER_ZCRX_IFQ` (kernel ABI).
const IORING_REGISTER_ZCRX_IFQ: libc::c_long = 32;

/// Where a worker's zero-copy queue lives and how much memory it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZcSpec {
    pub ifindex: u32,
    pub rxq: u32,
    /// Bytes of receive memory (page multiple): the NIC's page pool for the queue plus
    /// what connections hold until it is forwarded.
    pub area_bytes: usize,
    /// Refill ring entries (a power of two).
    pub refill_entries: u32,
}

/// Chunks outstanding at once: ids travel in the upper 16 bits of the completion flags.
pub const MAX_CHUNKS: usize = 1 << 16;

/// Received chunks the worker still holds, by id.
#[derive(Default)]
pub(super) struct Chunks {
    slots: Vec<Option<(u64, u32)>>,
    free: Vec<u16>,
}

impl Chunks {
    /// Records a chunk at area offset `off`; `None` when [`MAX_CHUNKS`] are held.
    pub(super) fn take(&mut self, off: u64, len: u32) -> Option<u16> {
        if let Some(id) = self.free.pop() {
            self.slots[usize::from(id)] = Some((off, len));
            return Some(id);
        }
        if self.slots.len() >= MAX_CHUNKS {
            return None;
        }
        self.slots.push(Some((off, len)));
        u16::try_from(self.slots.len() - 1).ok()
    }

    pub(super) fn get(&self, id: u16) -> Option<(u64, u32)> {
        self.slots.get(usize::from(id)).copied().flatten()
    }

    /// Forgets chunk `id`, returning where it was (`None` when it is not held).
    pub(super) fn give(&mut self, id: u16) -> Option<(u64, u32)> {
        let slot = self.slots.get_mut(usize::from(id))?;
        let chunk = slot.take()?;
        self.free.push(id);
        Some(chunk)
    }

    pub(super) fn held(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// Byte offsets of the refill ring's head, tail and entries in its region.
#[derive(Clone, Copy, Debug)]
pub(super) struct RingOffsets {
    pub head: u32,
    pub tail: u32,
    pub rqes: u32,
}

/// The user-space producer side of the refill ring (the kernel consumes it when the
/// queue's page pool needs buffers). Entries that do not fit wait here, in order.
pub(super) struct RefillRing {
    head: NonNull<AtomicU32>,
    tail: NonNull<AtomicU32>,
    rqes: NonNull<types::io_uring_zcrx_rqe>,
    entries: u32,
    tail_local: u32,
    waiting: VecDeque<types::io_uring_zcrx_rqe>,
}

impl RefillRing {
    /// # Safety
    /// `base` points to memory that holds the ring as `offsets` describe (byte offsets
    /// of head, tail and the entries), with room for `entries` (a power of two) entries,
    /// and outlives the value.
    pub(super) unsafe fn new(base: NonNull<u8>, offsets: RingOffsets, entries: u32) -> Self {
        // SAFETY: in bounds of the region by the caller's contract.
        let at = |off: u32| unsafe { base.add(off as usize) };
        // SAFETY: as above; the kernel reads head/tail as u32 written atomically.
        let tail_local =
            unsafe { at(offsets.tail).cast::<AtomicU32>().as_ref() }.load(Ordering::Acquire);
        Self {
            head: at(offsets.head).cast(),
            tail: at(offsets.tail).cast(),
            rqes: at(offsets.rqes).cast(),
            entries,
            tail_local,
            waiting: VecDeque::new(),
        }
    }

    /// Queues `rqe` and hands the kernel all that fit.
    pub(super) fn push(&mut self, rqe: types::io_uring_zcrx_rqe) {
        self.waiting.push_back(rqe);
        self.publish();
    }

    /// Moves waiting entries into the ring as far as there is room; returns how many.
    pub(super) fn publish(&mut self) -> usize {
        if self.waiting.is_empty() {
            return 0;
        }
        // SAFETY: head lives in the region (see `new`); the kernel writes it.
        let head = unsafe { self.head.as_ref() }.load(Ordering::Acquire);
        let room = self
            .entries
            .saturating_sub(self.tail_local.wrapping_sub(head));
        let n = (room as usize).min(self.waiting.len());
        for rqe in self.waiting.drain(..n) {
            let slot = (self.tail_local & (self.entries - 1)) as usize;
            // SAFETY: slot < entries, within the ring (see `new`); the kernel does not
            // read it before the tail store below publishes it.
            unsafe { self.rqes.add(slot).write(rqe) };
            self.tail_local = self.tail_local.wrapping_add(1);
        }
        if n > 0 {
            // SAFETY: as for head.
            unsafe { self.tail.as_ref() }.store(self.tail_local, Ordering::Release);
        }
        n
    }

    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// A registered zero-copy receive queue and the chunks of it the worker holds.
pub struct Zcrx {
    /// The ifq id `RecvZc` names.
    pub id: u32,
    token: u64,
    refill: RefillRing,
    chunks: Chunks,
    /// `RecvZc` operations in flight (by user_data): their completions carry offsets.
    ops: HashSet<u64>,
    // Declared last: dropped after the refill ring that points into it (kept for that,
    // never read).
    _region: Mapping,
    area: Mapping,
}

/// Bytes the refill ring region needs for `entries` entries (head and tail on their own
/// cache lines, then the entries), rounded up to pages.
fn region_bytes(entries: u32) -> usize {
    let page = page_size();
    (256 + entries as usize * std::mem::size_of::<types::io_uring_zcrx_rqe>()).div_ceil(page) * page
}

impl Zcrx {
    /// Registers `spec`'s rx queue with `ring` (which needs DEFER_TASKRUN and 32-byte
    /// completions). The kernel's error when it refuses: EOPNOTSUPP for drivers without
    /// queue-management ops, ENODEV for no such interface, EINVAL for a queue out of
    /// range or a ring without the set-up above.
    pub fn register<C: cqueue::EntryMarker>(
        ring: &IoUring<squeue::Entry, C>,
        spec: ZcSpec,
    ) -> io::Result<Self> {
        if !spec.refill_entries.is_power_of_two() || !spec.area_bytes.is_multiple_of(page_size()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let area = Mapping::new(spec.area_bytes, true)?;
        let region = Mapping::new(region_bytes(spec.refill_entries), true)?;
        // SAFETY: plain-data kernel ABI structs; all-zero is their documented default.
        let (mut area_reg, mut region_desc, mut reg): (
            types::io_uring_zcrx_area_reg,
            types::io_uring_region_desc,
            types::io_uring_zcrx_ifq_reg,
        ) = unsafe { (std::mem::zeroed(), std::mem::zeroed(), std::mem::zeroed()) };
        area_reg.addr = area.ptr().as_ptr() as u64;
        area_reg.len = area.len() as u64;
        region_desc.user_addr = region.ptr().as_ptr() as u64;
        region_desc.size = region.len() as u64;
        region_desc.flags = types::IORING_MEM_REGION_TYPE_USER;
        reg.if_idx = spec.ifindex;
        reg.if_rxq = spec.rxq;
        reg.rq_entries = spec.refill_entries;
        reg.area_ptr = &raw mut area_reg as u64;
        reg.region_ptr = &raw mut region_desc as u64;
        // The kernel writes the layout back into `reg` (and the token into `area_reg`),
        // so it is passed as a mutable pointer (the io-uring crate's `register_ifq` takes
        // a shared reference, through which a write would not be sound to read back).
        // SAFETY: a valid io_uring fd; `reg` and what it points to live across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                ring.as_raw_fd(),
                IORING_REGISTER_ZCRX_IFQ,
                &raw mut reg,
                1,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::ENOMEM) => {
                    "; without CAP_IPC_LOCK the area counts against RLIMIT_MEMLOCK (LimitMEMLOCK= in systemd)"
                }
                Some(libc::EPERM) => "; registering a queue needs CAP_NET_ADMIN",
                _ => "",
            };
            return Err(if hint.is_empty() {
                e
            } else {
                io::Error::new(e.kind(), format!("{e}{hint}"))
            });
        }
        // The kernel wrote back the ring's layout, its entry count and the area token.
        let entries = reg.rq_entries;
        let end = reg.offsets.rqes as usize
            + entries as usize * std::mem::size_of::<types::io_uring_zcrx_rqe>();
        if !entries.is_power_of_two() || end > region.len() {
            return Err(io::Error::other(format!(
                "the kernel laid out a refill ring of {entries} entries ending at byte {end} of a {}-byte region",
                region.len()
            )));
        }
        let offsets = RingOffsets {
            head: reg.offsets.head,
            tail: reg.offsets.tail,
            rqes: reg.offsets.rqes,
        };
        let end = end
            .max(offsets.head as usize + 4)
            .max(offsets.tail as usize + 4);
        if end > region.len() {
            return Err(io::Error::other(
                "the kernel's refill ring head/tail lie outside the region",
            ));
        }
        // SAFETY: the region is ours for as long as `region` lives, which outlives the
        // refill ring (field order), and the kernel's offsets were checked to fit it.
        let refill = unsafe { RefillRing::new(region.ptr(), offsets, entries) };
        Ok(Self::assemble(
            reg.zcrx_id,
            area_reg.rq_area_token,
            refill,
            region,
            area,
        ))
    }

    fn assemble(id: u32, token: u64, refill: RefillRing, region: Mapping, area: Mapping) -> Self {
        Self {
            id,
            token,
            refill,
            chunks: Chunks::default(),
            ops: HashSet::new(),
            _region: region,
            area,
        }
    }

    /// A `RecvZc` operation with `user_data` was issued: its completions carry offsets.
    pub fn issued(&mut self, user_data: u64) {
        self.ops.insert(user_data);
    }

    /// Whether a completion belongs to a `RecvZc` operation.
    pub fn owns(&self, user_data: u64) -> bool {
        self.ops.contains(&user_data)
    }

    /// Rewrites a `RecvZc` completion for the worker: data completions name a chunk
    /// (`F_ZC` and its id in the upper 16 bits); the last one (no `F_MORE`) ends the
    /// operation. A chunk that cannot be held (table full, or an offset outside the
    /// area, which would be a kernel ABI mismatch) is returned at once and the
    /// completion becomes an error, so the connection ends instead of losing bytes.
    pub fn translate(&mut self, user_data: u64, res: i32, flags: u32, extra: u64) -> (i32, u32) {
        if flags & F_MORE == 0 {
            self.ops.remove(&user_data);
        }
        let Ok(len) = u32::try_from(res) else {
            return (res, flags & F_MORE);
        };
        if len == 0 {
            return (0, flags & F_MORE);
        }
        let off = extra & !types::IORING_ZCRX_AREA_MASK;
        let area_id = extra >> types::IORING_ZCRX_AREA_SHIFT;
        if area_id != 0 || off + u64::from(len) > self.area.len() as u64 {
            tracing::error!(
                off,
                area_id,
                len,
                area = self.area.len(),
                "zero-copy receive named memory outside the area"
            );
            return (-libc::EIO, flags & F_MORE);
        }
        match self.chunks.take(off, len) {
            Some(id) => (res, (flags & F_MORE) | F_ZC | (u32::from(id) << 16)),
            None => {
                tracing::warn!(
                    held = MAX_CHUNKS,
                    "zero-copy chunk table full: the chunk goes back unread and its connection ends"
                );
                self.refill.push(self.rqe(off, len));
                (-libc::ENOBUFS, flags & F_MORE)
            }
        }
    }

    fn rqe(&self, off: u64, len: u32) -> types::io_uring_zcrx_rqe {
        // SAFETY: plain-data kernel ABI struct; all-zero is a valid value.
        let mut rqe: types::io_uring_zcrx_rqe = unsafe { std::mem::zeroed() };
        rqe.off = off | self.token;
        rqe.len = len;
        rqe
    }

    /// The first `len` bytes of chunk `id` (empty when it is not held).
    pub fn data(&self, id: u16, len: usize) -> &[u8] {
        let Some((off, have)) = self.chunks.get(id) else {
            return &[];
        };
        let len = len.min(have as usize);
        // SAFETY: `translate` checked that off + have lies inside the area, which lives
        // as long as self; the kernel wrote the bytes before posting the completion and
        // does not reuse the chunk until it is given back.
        unsafe { std::slice::from_raw_parts(self.area.ptr().as_ptr().add(off as usize), len) }
    }

    /// Gives chunk `id` back to the NIC.
    pub fn give_back(&mut self, id: u16) {
        if let Some((off, len)) = self.chunks.give(id) {
            let rqe = self.rqe(off, len);
            self.refill.push(rqe);
        }
    }

    /// Retries refill entries that found the ring full (call once per wait).
    pub fn publish(&mut self) {
        self.refill.publish();
    }

    pub fn held(&self) -> usize {
        self.chunks.held()
    }
}

/// Asks the kernel to register a zero-copy receive queue on rx queue 0 of interface
/// `index` (a 64 KiB area) with a throw-away ring, then releases it. Ok only where the
/// NIC and its configuration can do it; otherwise the kernel's error.
pub fn register_probe(index: u32) -> io::Result<()> {
    let ring = IoUring::<squeue::Entry, cqueue::Entry32>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)?;
    let zc = Zcrx::register(
        &ring,
        ZcSpec {
            ifindex: index,
            rxq: 0,
            area_bytes: 64 * 1024,
            refill_entries: 64,
        },
    )?;
    // Closing the ring releases the queue before its memory goes.
    drop(ring);
    drop(zc);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_reused_and_bounded() {
        let mut c = Chunks::default();
        let a = c.take(0, 10).unwrap();
        let b = c.take(4096, 20).unwrap();
        assert_ne!(a, b);
        assert_eq!(c.get(b), Some((4096, 20)));
        assert_eq!(c.give(a), Some((0, 10)));
        assert_eq!(c.give(a), None, "a chunk is given back once");
        assert_eq!(c.take(8192, 5), Some(a), "a freed id is reused");
        assert_eq!(c.held(), 2);
        while c.take(0, 1).is_some() {}
        assert_eq!(c.held(), MAX_CHUNKS);
        c.give(7);
        assert_eq!(c.take(0, 1), Some(7));
        assert_eq!(c.take(0, 1), None);
    }

    /// A region laid out like the kernel's (head, tail, then entries), with the kernel's
    /// consumer side simulated by moving head.
    struct FakeRegion {
        mem: Vec<u64>,
        offsets: RingOffsets,
    }

    impl FakeRegion {
        fn new(entries: usize) -> Self {
            let offsets = RingOffsets {
                head: 0,
                tail: 64,
                rqes: 128,
            };
            Self {
                mem: vec![0; (128 + entries * 16) / 8],
                offsets,
            }
        }
        fn base(&mut self) -> NonNull<u8> {
            NonNull::new(self.mem.as_mut_ptr().cast()).unwrap()
        }
        fn word(&self, byte: usize) -> u32 {
            // SAFETY: test memory, aligned.
            unsafe {
                self.mem
                    .as_ptr()
                    .cast::<u8>()
                    .add(byte)
                    .cast::<u32>()
                    .read()
            }
        }
        fn set_head(&mut self, v: u32) {
            // SAFETY: test memory, aligned.
            unsafe { self.mem.as_mut_ptr().cast::<u32>().write(v) }
        }
        fn rqe(&self, slot: usize) -> (u64, u32) {
            let w = 16 + slot * 2;
            (self.mem[w], self.mem[w + 1] as u32)
        }
    }

    fn rqe(off: u64, len: u32) -> types::io_uring_zcrx_rqe {
        // SAFETY: plain-data struct; zero is valid.
        let mut r: types::io_uring_zcrx_rqe = unsafe { std::mem::zeroed() };
        r.off = off;
        r.len = len;
        r
    }

    /// A queue as `register` would leave it, over our own memory instead of a NIC's.
    fn fake_zcrx(area_bytes: usize, entries: u32) -> Zcrx {
        let area = Mapping::new(area_bytes, true).unwrap();
        let region = Mapping::new(region_bytes(entries), true).unwrap();
        let offsets = RingOffsets {
            head: 0,
            tail: 64,
            rqes: 128,
        };
        // SAFETY: the region holds `entries` entries after 128 bytes and outlives it.
        let refill = unsafe { RefillRing::new(region.ptr(), offsets, entries) };
        Zcrx::assemble(0, 3 << types::IORING_ZCRX_AREA_SHIFT, refill, region, area)
    }

    #[test]
    fn completions_become_chunks_and_chunks_go_back_with_the_area_token() {
        let mut z = fake_zcrx(64 * 1024, 8);
        // SAFETY: inside the area.
        unsafe { z.area.ptr().add(8192).write_bytes(0xab, 100) };
        z.issued(42);
        assert!(z.owns(42));
        let (res, flags) = z.translate(42, 100, F_MORE, 8192);
        assert_eq!(res, 100);
        assert_eq!(flags & (F_MORE | F_ZC), F_MORE | F_ZC);
        let Some(super::super::BufId::Zc(id)) = super::super::received_buffer(flags) else {
            panic!("a zero-copy chunk, flags {flags:#x}");
        };
        assert_eq!(z.data(id, 4096), &[0xab; 100][..]);
        assert_eq!(z.held(), 1);
        z.give_back(id);
        assert_eq!(z.held(), 0);
        // SAFETY: the fake region: tail at 64, first entry at 128.
        let (tail, off, len) = unsafe {
            let b = z._region.ptr().as_ptr();
            (
                b.add(64).cast::<u32>().read(),
                b.add(128).cast::<u64>().read(),
                b.add(136).cast::<u32>().read(),
            )
        };
        assert_eq!((tail, off, len), (1, 8192 | (3 << 48), 100));
        // The last completion (no F_MORE) ends the operation: res 0 stays 0.
        assert_eq!(z.translate(42, 0, 0, 0), (0, 0));
        assert!(!z.owns(42));
        // An error passes through.
        z.issued(43);
        assert_eq!(
            z.translate(43, -libc::ECANCELED, 0, 0),
            (-libc::ECANCELED, 0)
        );
    }

    #[test]
    fn offsets_outside_the_area_become_errors_not_reads() {
        let mut z = fake_zcrx(8192, 8);
        z.issued(1);
        assert_eq!(z.translate(1, 100, F_MORE, 8150).0, -libc::EIO);
        assert_eq!(
            z.translate(1, 100, F_MORE, 1 << 48).0,
            -libc::EIO,
            "another area"
        );
        assert_eq!(z.held(), 0);
    }

    #[test]
    fn refill_entries_wait_for_room_and_keep_their_order() {
        let mut region = FakeRegion::new(4);
        let base = region.base();
        // SAFETY: the fake region holds 4 entries at the offsets given and outlives ring.
        let mut ring = unsafe { RefillRing::new(base, region.offsets, 4) };
        for i in 0..6u64 {
            ring.push(rqe(i * 4096, 100 + i as u32));
        }
        assert_eq!(region.word(64), 4, "the tail published the 4 that fit");
        assert_eq!(ring.waiting(), 2);
        assert_eq!(region.rqe(0), (0, 100));
        assert_eq!(region.rqe(3), (3 * 4096, 103));
        // The kernel consumes three entries: two waiting ones go in, wrapping around.
        region.set_head(3);
        assert_eq!(ring.publish(), 2);
        assert_eq!(region.word(64), 6);
        assert_eq!(region.rqe(0), (4 * 4096, 104));
        assert_eq!(region.rqe(1), (5 * 4096, 105));
        assert_eq!(ring.waiting(), 0);
        assert_eq!(ring.publish(), 0);
    }
}

/// A stand-in for the kernel's side of `RecvZc` over a plain backend, for tests of the
/// worker's zero-copy state machine on machines without a capable NIC: it receives into
/// pool buffers and copies each piece into a chunk of an emulated area (what the kernel's
/// copy fallback does), posts pieces of at most `piece` bytes with `F_MORE`, then the
/// last completion: 0 once the asked length arrived or at end of file, or the error.
#[cfg(test)]
pub(crate) mod emulation {
    use std::{
        collections::HashMap,
        os::fd::RawFd,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::super::{BufId, F_MORE, F_ZC, Op, Ops, buffer_select};

    const EMU: u64 = 1 << 61;

    pub struct ZcEmulation {
        inner: Box<dyn Ops>,
        piece: u32,
        recv_len: u32,
        chunks: Vec<Option<Vec<u8>>>,
        free: Vec<u16>,
        /// Inner receive user_data → (the worker's user_data, fd, bytes still asked).
        recvs: HashMap<u64, (u64, RawFd, u32)>,
        /// The most bytes held in chunks at once, and the most iovecs one sendmsg carried.
        pub held_max: Arc<AtomicUsize>,
        pub iov_max: Arc<AtomicUsize>,
        /// Every `n`-th receive ends at once with ENOSPC or ENOMEM (alternately),
        /// consuming nothing (as the
        /// kernel's does when the completion queue is full).
        pub fail_every: Option<u32>,
        issued: u32,
        failed: Vec<u64>,
        failures: u32,
        held_bytes: usize,
    }

    impl ZcEmulation {
        /// `inner` needs a buffer pool.
        /// `inner`'s pool buffers hold `recv_len` bytes: a receive takes up to that much,
        /// posted as pieces of `piece` bytes.
        pub fn new(inner: Box<dyn Ops>, piece: u32, recv_len: u32) -> Self {
            Self {
                inner,
                piece,
                recv_len,
                chunks: Vec::new(),
                free: Vec::new(),
                recvs: HashMap::new(),
                held_max: Arc::default(),
                iov_max: Arc::default(),
                fail_every: None,
                issued: 0,
                failed: Vec::new(),
                failures: 0,
                held_bytes: 0,
            }
        }

        fn recv(&mut self, ud: u64, fd: RawFd, left: u32) -> bool {
            self.issued += 1;
            if self
                .fail_every
                .is_some_and(|n| self.issued.is_multiple_of(n))
            {
                self.failed.push(ud);
                return true;
            }
            self.recvs.insert(ud | EMU, (ud, fd, left));
            let len = left.min(self.recv_len);
            self.inner.push(Op::RecvPooled { fd, len }, ud | EMU)
        }

        fn held(&self) -> usize {
            self.chunks.len() - self.free.len()
        }
    }

    impl Ops for ZcEmulation {
        fn push(&mut self, op: Op, user_data: u64) -> bool {
            match op {
                Op::RecvZc { fd, len } => self.recv(user_data, fd, len),
                Op::SendMsg { msg, .. } => {
                    // SAFETY: the worker's message, valid until the send completes.
                    let n = unsafe { (*msg).msg_iovlen };
                    self.iov_max.fetch_max(n, Ordering::Relaxed);
                    self.inner.push(op, user_data)
                }
                other => self.inner.push(other, user_data),
            }
        }
        fn flush(&mut self) {
            self.inner.flush();
        }
        fn wait(&mut self, timeout: Duration, out: &mut Vec<(u64, i32, u32)>) {
            let mut got = Vec::new();
            for ud in self.failed.drain(..) {
                self.failures += 1;
                let errno = if self.failures.is_multiple_of(2) {
                    libc::ENOMEM
                } else {
                    libc::ENOSPC
                };
                out.push((ud, -errno, 0));
            }
            self.inner.wait(timeout, &mut got);
            for (iud, res, flags) in got {
                let Some((ud, fd, left)) = self.recvs.remove(&iud) else {
                    out.push((iud, res, flags));
                    continue;
                };
                if res <= 0 {
                    out.push((ud, res, 0));
                    continue;
                }
                let bid = buffer_select(flags).expect("a pooled receive names its buffer");
                let data = self.inner.buf(BufId::Pool(bid), res as usize).to_vec();
                self.inner.recycle(BufId::Pool(bid));
                for piece in data.chunks(self.piece as usize) {
                    let id = match self.free.pop() {
                        Some(id) => {
                            self.chunks[usize::from(id)] = Some(piece.to_vec());
                            id
                        }
                        None => {
                            self.chunks.push(Some(piece.to_vec()));
                            (self.chunks.len() - 1) as u16
                        }
                    };
                    self.held_bytes += piece.len();
                    self.held_max.fetch_max(self.held_bytes, Ordering::Relaxed);
                    out.push((
                        ud,
                        piece.len() as i32,
                        F_MORE | F_ZC | (u32::from(id) << 16),
                    ));
                }
                let left = left - res as u32;
                if left == 0 {
                    out.push((ud, 0, 0));
                } else if !self.recv(ud, fd, left) {
                    out.push((ud, -libc::EIO, 0));
                }
            }
        }
        fn buf(&self, bid: BufId, len: usize) -> &[u8] {
            match bid {
                BufId::Zc(id) => self
                    .chunks
                    .get(usize::from(id))
                    .and_then(Option::as_deref)
                    .map_or(&[], |c| &c[..len.min(c.len())]),
                pool => self.inner.buf(pool, len),
            }
        }
        fn recycle(&mut self, bid: BufId) {
            match bid {
                BufId::Zc(id) => {
                    let slot = &mut self.chunks[usize::from(id)];
                    let chunk = slot.take();
                    assert!(chunk.is_some(), "chunk {id} given back twice");
                    self.held_bytes -= chunk.map_or(0, |c| c.len());
                    self.free.push(id);
                }
                pool => self.inner.recycle(pool),
            }
        }
        fn has_pool(&self) -> bool {
            self.inner.has_pool()
        }
        fn buffers_available(&self) -> bool {
            self.inner.buffers_available()
        }
        fn add_pool(&mut self, count: u16, size: usize) -> std::io::Result<()> {
            self.inner.add_pool(count, size)
        }
        fn forget(&mut self, fd: RawFd) {
            self.inner.forget(fd);
        }
        fn name(&self) -> &'static str {
            self.inner.name()
        }
    }

    impl Drop for ZcEmulation {
        fn drop(&mut self) {
            // Every chunk went back: nothing the worker held leaked.
            if !std::thread::panicking() {
                assert_eq!(self.held(), 0, "zero-copy chunks never given back");
            }
        }
    }
}

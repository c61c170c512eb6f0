//! Owned memory mappings, unmapped on drop: anonymous memory the kernel is given by
//! address (buffer rings, zero-copy receive areas), and views of memory a file
//! descriptor exposes (BPF ring buffers).
use std::{io, num::NonZeroUsize, os::fd::BorrowedFd, ptr::NonNull};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, mmap_anonymous};

/// The kernel's page size: the unit of every mapping (and of a zero-copy area's chunks).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// `len` bytes of private anonymous read-write memory (page-aligned); with
    /// `populate`, faulted in now rather than on first touch.
    pub(crate) fn new(len: usize, populate: bool) -> io::Result<Self> {
        let n = NonZeroUsize::new(len).ok_or_else(|| io::Error::other("zero length"))?;
        let flags = if populate {
            MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE
        } else {
            MapFlags::MAP_PRIVATE
        };
        // SAFETY: a fresh private anonymous mapping, owned by the value.
        let ptr = unsafe {
            mmap_anonymous(None, n, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, flags)
        }?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// `len` bytes of what `fd` maps at `offset`, shared with the kernel; writable only
    /// with `writable`.
    pub(crate) fn shared(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: usize,
        writable: bool,
    ) -> io::Result<Self> {
        let n = NonZeroUsize::new(len).ok_or_else(|| io::Error::other("zero length"))?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        let offset = i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        // SAFETY: a new shared mapping of the fd's memory, owned by the value; the kernel
        // checks the length, offset and protection against what the fd allows.
        let ptr = unsafe { mmap(None, n, prot, MapFlags::MAP_SHARED, fd, offset) }?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: a Mapping owns its pages like a Box owns its memory; what the pages are shared
// with (the kernel) does not depend on which thread holds the value.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in `new` or `shared`. Whoever registered
        // it with the kernel released it first, or the kernel pinned what it uses, so
        // this only removes our view of it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

//! What aya 0.16 does not offer: map batch operations (one syscall per few thousand
//! LPM entries instead of one per entry), mmapped arrays (plain memory writes), and link
//! update/detach on a pinned link without unpinning it.
//! Each unsafe block is a single syscall or pointer access with its reason stated.
use std::{
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{Map, MapData};

use crate::mapping::Mapping;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `union bpf_attr`, batch variant (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The `MapData` inside the `Map` variants edgeproxy uses.
pub fn into_map_data(map: Map) -> Option<MapData> {
    match map {
        Map::Array(m) | Map::LpmTrie(m) | Map::PerCpuArray(m) | Map::RingBuf(m) => Some(m),
        _ => None,
    }
}

fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised bpf_attr prefix of the size passed; the
    // buffers it points to are live for the call and sized by the caller for `count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Entries per batch syscall.
const BATCH: usize = 8192;

/// Runs `cmd` over `n` entries in chunks of [`BATCH`]; `fill` points the attribute at
/// the chunk starting at the given entry.
fn batched(
    cmd: libc::c_long,
    map: &MapData,
    n: usize,
    mut fill: impl FnMut(&mut BatchAttr, usize),
) -> io::Result<()> {
    let mut done = 0;
    while done < n {
        let count = (n - done).min(BATCH);
        let mut attr = BatchAttr {
            count: count as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        fill(&mut attr, done);
        bpf_batch(cmd, &mut attr)?;
        done += count;
    }
    Ok(())
}

/// Inserts or replaces `keys.len() / key_size` entries, one syscall per chunk.
pub fn update_batch(
    map: &MapData,
    keys: &[u8],
    values: &[u8],
    key_size: usize,
    value_size: usize,
) -> io::Result<()> {
    let n = keys.len() / key_size;
    assert_eq!(values.len(), n * value_size, "one value per key");
    batched(BPF_MAP_UPDATE_BATCH, map, n, |attr, at| {
        attr.keys = keys[at * key_size..].as_ptr() as u64;
        attr.values = values[at * value_size..].as_ptr() as u64;
    })
}

pub fn delete_batch(map: &MapData, keys: &[u8], key_size: usize) -> io::Result<()> {
    batched(
        BPF_MAP_DELETE_BATCH,
        map,
        keys.len() / key_size,
        |attr, at| {
            attr.keys = keys[at * key_size..].as_ptr() as u64;
        },
    )
}

/// Every key in the map, `key_size` bytes each, concatenated.
pub fn all_keys(map: &MapData, key_size: usize, value_size: usize) -> io::Result<Vec<u8>> {
    const CHUNK: usize = 4096;
    let mut keys = Vec::new();
    let mut kbuf = vec![0u8; CHUNK * key_size];
    let mut vbuf = vec![0u8; CHUNK * value_size];
    let mut token = vec![0u8; key_size];
    let mut first = true;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_mut_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: kbuf.as_mut_ptr() as u64,
            values: vbuf.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        let res = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        keys.extend_from_slice(&kbuf[..got * key_size]);
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// A `BPF_F_MMAPABLE` array map mapped into this process. Writes are plain stores,
/// visible to the BPF program; callers publish them with a later syscall.
pub struct MmapArray<T> {
    /// Declared before the map: unmapped first.
    memory: Mapping,
    entries: u32,
    stride: usize,
    _map: MapData,
    _t: PhantomData<T>,
}

impl<T: Copy> MmapArray<T> {
    pub fn new(map: MapData) -> io::Result<Self> {
        let info = map.info().map_err(io::Error::other)?;
        if info.value_size() as usize != size_of::<T>() {
            return Err(io::Error::other(format!(
                "map value size {} != {} (mismatched eBPF object)",
                info.value_size(),
                size_of::<T>()
            )));
        }
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(io::Error::other("map was not created with BPF_F_MMAPABLE"));
        }
        let stride = size_of::<T>().next_multiple_of(8);
        let page = crate::mapping::page_size();
        let len = (stride * info.max_entries() as usize).next_multiple_of(page);
        // Shared read-write is what BPF_F_MMAPABLE is for; the length is the kernel's
        // array size rounded to pages.
        let memory = Mapping::shared(map.fd().as_fd(), len, 0, true)?;
        Ok(Self {
            memory,
            entries: info.max_entries(),
            stride,
            _map: map,
            _t: PhantomData,
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn set(&mut self, index: u32, value: T) {
        assert!(
            index < self.entries,
            "index {index} out of {}",
            self.entries
        );
        // SAFETY: index < entries, so the element lies inside the mapping; elements are
        // 8-byte aligned (stride) in a page-aligned mapping and T's alignment is ≤ 8.
        unsafe {
            self.memory
                .ptr()
                .as_ptr()
                .add(index as usize * self.stride)
                .cast::<T>()
                .write_volatile(value)
        }
    }

    pub fn get(&self, index: u32) -> T {
        assert!(
            index < self.entries,
            "index {index} out of {}",
            self.entries
        );
        // SAFETY: as in `set`.
        unsafe {
            self.memory
                .ptr()
                .as_ptr()
                .add(index as usize * self.stride)
                .cast::<T>()
                .read_volatile()
        }
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf_cmd<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` for `cmd`, of the
    // size passed; pointers inside it (if any) are live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A,
            size_of::<A>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned BPF object (here: a link) without touching the pin.
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf_cmd(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program behind a BPF link (BPF_LINK_UPDATE).
pub fn link_update(
    link: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf_cmd(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a BPF link from its hook even while other holders (a pin, a process) remain.
pub fn link_detach(link: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let mut attr = LinkDetach {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf_cmd(BPF_LINK_DETACH, &mut attr).map(drop)
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// Creates a standalone BPF ring buffer of `bytes` (aya 0.16 creates other map types,
/// not ring buffers).
pub fn create_ringbuf(bytes: u32, name: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_RINGBUF,
        key_size: 0,
        value_size: 0,
        max_entries: bytes,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
    };
    let fd = bpf_cmd(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new file descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// Deletes one element (aya 0.16 has no delete for arrays of maps).
pub fn delete_elem(map: &MapData, key: &[u8]) -> io::Result<()> {
    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = Elem {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: 0,
        flags: 0,
    };
    bpf_cmd(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

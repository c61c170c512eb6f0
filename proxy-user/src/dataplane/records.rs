//! The record ring (samples and captures), read in place: aya hands out a guard over
//! the mmapped ring, the callback sees the header and the data slice without a copy,
//! and the record is released when the guard drops.
use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{Map, MapData, RingBuf};
use proxy_common::{
    ProtoClass, RECORDS_MAP,
    policy::{RECORD_HEADER_LEN, RecordHeader, RecordKind},
};

use super::DataplaneError;

/// One record as the ring holds it.
pub struct RecordView<'a> {
    pub header: RecordHeader,
    /// `header.cap_len` bytes: the frame's first bytes (sample) or the UDP payload (capture).
    pub data: &'a [u8],
}

/// The record rings: one per CPU, or the one shared ring (see [`super::RingMode`]).
pub struct Records {
    /// Index 0 is the shared ring; per-CPU rings, when installed, follow in CPU order.
    rings: Vec<RingBuf<MapData>>,
    /// The CPU whose packets each ring holds (`None`: the shared ring).
    cpus: Vec<Option<u32>>,
    per_ring: Vec<u64>,
}

impl Records {
    /// `cpus` names the CPU of each ring (`None` entries: the shared ring).
    pub(super) fn new(
        maps: Vec<Map>,
        cpus: Option<Vec<Option<u32>>>,
    ) -> Result<Self, DataplaneError> {
        let rings = maps
            .into_iter()
            .map(|m| {
                RingBuf::try_from(m).map_err(|source| DataplaneError::Map {
                    name: RECORDS_MAP,
                    source,
                })
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
        })
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

    /// Hands every record now in the rings to `f`; returns how many there were. Records
    /// that do not parse (a mismatched eBPF object) are counted in `tally.bad`, never misread.
    pub fn drain(&mut self, tally: &mut RecordTally, mut f: impl FnMut(&RecordView<'_>)) -> usize {
        let mut n = 0;
        for (ring, count) in self.rings.iter_mut().zip(self.per_ring.iter_mut()) {
            while let Some(item) = ring.next() {
                n += 1;
                *count += 1;
                match parse_record(&item) {
                    Some(view) => {
                        tally.add(&view.header);
                        f(&view);
                    }
                    None => tally.bad += 1,
                }
            }
        }
        n
    }

    /// One fd per ring, readable when the data plane woke its consumer.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.rings.iter().map(AsFd::as_fd).collect()
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

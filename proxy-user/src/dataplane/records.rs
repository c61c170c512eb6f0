//! The packet record ring buffer, read in place (aya hands out a guard over the
//! mmapped ring; the record is released when the guard drops).
use std::os::fd::{AsFd, BorrowedFd};

use aya::maps::{Map, MapData, RingBuf};
use proxy_common::{PACKET_RECORDS_MAP, PacketRecord, ProtoClass};

use super::DataplaneError;

pub struct PacketRecords {
    ring: RingBuf<MapData>,
}

impl PacketRecords {
    pub(super) fn new(map: Map) -> Result<Self, DataplaneError> {
        let ring = RingBuf::try_from(map).map_err(|source| DataplaneError::Map {
            name: PACKET_RECORDS_MAP,
            source,
        })?;
        Ok(Self { ring })
    }

    /// Hands every record now in the ring to `f`, returning how many there were.
    /// Records of an unexpected size (a mismatched eBPF object) are counted in `tally`
    /// as `bad_size`, never misread.
    pub fn drain(&mut self, tally: &mut RecordTally, mut f: impl FnMut(&PacketRecord)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            n += 1;
            match parse_record(&item) {
                Some(rec) => {
                    tally.add(&rec);
                    f(&rec);
                }
                None => tally.bad_size += 1,
            }
        }
        n
    }
}

impl AsFd for PacketRecords {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

fn parse_record(bytes: &[u8]) -> Option<PacketRecord> {
    if bytes.len() != size_of::<PacketRecord>() {
        return None;
    }
    // SAFETY: the length is exactly that of `PacketRecord`, a `#[repr(C)]` plain-integer
    // struct for which any bit pattern is valid; `read_unaligned` needs no alignment.
    Some(unsafe { bytes.as_ptr().cast::<PacketRecord>().read_unaligned() })
}

/// Records drained, by class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordTally {
    pub by_class: [u64; ProtoClass::COUNT as usize],
    pub bad_class: u64,
    pub bad_size: u64,
}

impl RecordTally {
    fn add(&mut self, rec: &PacketRecord) {
        match ProtoClass::from_u32(rec.class) {
            Some(c) => self.by_class[c as usize] += 1,
            None => self.bad_class += 1,
        }
    }

    pub fn class(&self, class: ProtoClass) -> u64 {
        self.by_class[class as usize]
    }

    pub fn total(&self) -> u64 {
        self.by_class.iter().sum::<u64>() + self.bad_class + self.bad_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_only_at_their_exact_size() {
        let rec = PacketRecord {
            ts_ns: 7,
            wire_len: 60,
            ifindex: 3,
            rx_queue: 1,
            class: ProtoClass::Udp6 as u32,
            src_port: 53,
            dst_port: 5140,
            _pad: 0,
        };
        // SAFETY: PacketRecord is repr(C) plain integers without padding (size asserted
        // in proxy-common); viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const PacketRecord).cast::<u8>(),
                size_of::<PacketRecord>(),
            )
        };
        assert_eq!(parse_record(bytes), Some(rec));
        assert_eq!(parse_record(&bytes[..31]), None);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(parse_record(&longer), None);
    }

    #[test]
    fn tally_counts_unknown_classes_separately() {
        let mut t = RecordTally::default();
        t.add(&PacketRecord {
            class: ProtoClass::Tcp4 as u32,
            ..Default::default()
        });
        t.add(&PacketRecord {
            class: 99,
            ..Default::default()
        });
        assert_eq!(t.class(ProtoClass::Tcp4), 1);
        assert_eq!(t.bad_class, 1);
        assert_eq!(t.total(), 2);
    }
}

//! Per-CPU counters, read and summed over every possible CPU.
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use proxy_common::{Counter, DATAPLANE_STATS_MAP, DataplaneStat, PROTO_COUNTERS_MAP, ProtoClass};
use serde::Serialize;

use super::DataplaneError;

/// Reads the data plane's counters. Cheap to keep around; each [`Self::snapshot`] is
/// one syscall per map entry.
pub struct DataplaneCounters<'a> {
    protos: PerCpuArray<&'a MapData, Counter>,
    stats: PerCpuArray<&'a MapData, u64>,
}

impl<'a> DataplaneCounters<'a> {
    pub(super) fn new(ebpf: &'a Ebpf) -> Result<Self, DataplaneError> {
        let protos = ebpf
            .map(PROTO_COUNTERS_MAP)
            .ok_or(DataplaneError::MapMissing(PROTO_COUNTERS_MAP))?;
        let stats = ebpf
            .map(DATAPLANE_STATS_MAP)
            .ok_or(DataplaneError::MapMissing(DATAPLANE_STATS_MAP))?;
        Ok(Self {
            protos: PerCpuArray::try_from(protos).map_err(|source| DataplaneError::Map {
                name: PROTO_COUNTERS_MAP,
                source,
            })?,
            stats: PerCpuArray::try_from(stats).map_err(|source| DataplaneError::Map {
                name: DATAPLANE_STATS_MAP,
                source,
            })?,
        })
    }

    pub fn snapshot(&self) -> Result<CounterSnapshot, DataplaneError> {
        let mut snap = CounterSnapshot::default();
        for class in ProtoClass::ALL {
            let per_cpu =
                self.protos
                    .get(&(class as u32), 0)
                    .map_err(|source| DataplaneError::Map {
                        name: PROTO_COUNTERS_MAP,
                        source,
                    })?;
            let total = &mut snap.by_class[class as usize];
            for c in per_cpu.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        for stat in DataplaneStat::ALL {
            let per_cpu =
                self.stats
                    .get(&(stat as u32), 0)
                    .map_err(|source| DataplaneError::Map {
                        name: DATAPLANE_STATS_MAP,
                        source,
                    })?;
            snap.stats[stat as usize] = per_cpu.iter().sum();
        }
        Ok(snap)
    }
}

/// Counter totals at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    by_class: [Counter; ProtoClass::COUNT as usize],
    stats: [u64; DataplaneStat::COUNT as usize],
}

impl CounterSnapshot {
    pub fn class(&self, class: ProtoClass) -> Counter {
        self.by_class[class as usize]
    }

    pub fn stat(&self, stat: DataplaneStat) -> u64 {
        self.stats[stat as usize]
    }

    pub fn total(&self) -> Counter {
        self.by_class
            .iter()
            .fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            })
    }

    /// Counts accumulated since `earlier` (counters only grow while the maps live).
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        let mut d = *self;
        for (now, then) in d.by_class.iter_mut().zip(earlier.by_class.iter()) {
            now.packets -= then.packets;
            now.bytes -= then.bytes;
        }
        for (now, then) in d.stats.iter_mut().zip(earlier.stats.iter()) {
            *now -= then;
        }
        d
    }

    pub fn to_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Pb {
            packets: u64,
            bytes: u64,
        }
        let classes: serde_json::Map<String, serde_json::Value> = ProtoClass::ALL
            .iter()
            .map(|&c| {
                let v = self.class(c);
                (
                    c.name().to_owned(),
                    serde_json::json!(Pb {
                        packets: v.packets,
                        bytes: v.bytes
                    }),
                )
            })
            .collect();
        let stats: serde_json::Map<String, serde_json::Value> = DataplaneStat::ALL
            .iter()
            .map(|&s| (s.name().to_owned(), self.stat(s).into()))
            .collect();
        serde_json::json!({ "classes": classes, "stats": stats })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(udp4: (u64, u64), tcp6: (u64, u64), full: u64) -> CounterSnapshot {
        let mut s = CounterSnapshot::default();
        s.by_class[ProtoClass::Udp4 as usize] = Counter {
            packets: udp4.0,
            bytes: udp4.1,
        };
        s.by_class[ProtoClass::Tcp6 as usize] = Counter {
            packets: tcp6.0,
            bytes: tcp6.1,
        };
        s.stats[DataplaneStat::RingbufFull as usize] = full;
        s
    }

    #[test]
    fn since_and_total() {
        let a = snap((10, 1000), (1, 80), 0);
        let b = snap((15, 1600), (3, 240), 2);
        let d = b.since(&a);
        assert_eq!(
            d.class(ProtoClass::Udp4),
            Counter {
                packets: 5,
                bytes: 600
            }
        );
        assert_eq!(
            d.class(ProtoClass::Tcp6),
            Counter {
                packets: 2,
                bytes: 160
            }
        );
        assert_eq!(d.stat(DataplaneStat::RingbufFull), 2);
        assert_eq!(
            b.total(),
            Counter {
                packets: 18,
                bytes: 1840
            }
        );
    }

    #[test]
    fn json_names_every_class_and_stat() {
        let j = snap((5, 500), (0, 0), 1).to_json();
        for c in ProtoClass::ALL {
            assert!(j["classes"][c.name()]["packets"].is_u64(), "{}", c.name());
        }
        assert_eq!(j["classes"]["udp4"]["bytes"], 500);
        assert_eq!(j["stats"]["ringbuf_full"], 1);
        assert_eq!(j["stats"]["records_pushed"], 0);
    }
}

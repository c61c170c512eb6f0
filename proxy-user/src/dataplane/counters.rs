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

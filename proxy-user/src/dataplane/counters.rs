//! Per-CPU counters, read and summed over every possible CPU.
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use proxy_common::{
    Counter, DATAPLANE_STATS_MAP, DataplaneStat, PROTO_COUNTERS_MAP, ProtoClass,
    policy::{SLOT_COUNTERS_MAP, SLOTS, VERDICT_COUNTERS_MAP, Verdict},
};
use serde::Serialize;

use super::DataplaneError;

/// Reads the data plane's counters. Cheap to keep around; each [`Self::snapshot`] is
/// one syscall per map entry.
pub struct DataplaneCounters<'a> {
    protos: PerCpuArray<&'a MapData, Counter>,
    stats: PerCpuArray<&'a MapData, u64>,
    verdicts: PerCpuArray<&'a MapData, Counter>,
    slots: PerCpuArray<&'a MapData, Counter>,
}

fn per_cpu<'a, V: aya::Pod>(
    ebpf: &'a Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<&'a MapData, V>, DataplaneError> {
    let map = ebpf.map(name).ok_or(DataplaneError::MapMissing(name))?;
    PerCpuArray::try_from(map).map_err(|source| DataplaneError::Map { name, source })
}

/// Sum of one per-CPU entry over all CPUs.
fn sum_counter(
    map: &PerCpuArray<&MapData, Counter>,
    name: &'static str,
    index: u32,
) -> Result<Counter, DataplaneError> {
    let per_cpu = map
        .get(&index, 0)
        .map_err(|source| DataplaneError::Map { name, source })?;
    Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    }))
}

impl<'a> DataplaneCounters<'a> {
    pub(super) fn new(ebpf: &'a Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            protos: per_cpu(ebpf, PROTO_COUNTERS_MAP)?,
            stats: per_cpu(ebpf, DATAPLANE_STATS_MAP)?,
            verdicts: per_cpu(ebpf, VERDICT_COUNTERS_MAP)?,
            slots: per_cpu(ebpf, SLOT_COUNTERS_MAP)?,
        })
    }

    pub fn snapshot(&self) -> Result<CounterSnapshot, DataplaneError> {
        let mut snap = CounterSnapshot::default();
        for class in ProtoClass::ALL {
            snap.by_class[class as usize] =
                sum_counter(&self.protos, PROTO_COUNTERS_MAP, class as u32)?;
        }
        for v in Verdict::ALL {
            snap.verdicts[v as usize] =
                sum_counter(&self.verdicts, VERDICT_COUNTERS_MAP, v as u32)?;
        }
        for slot in 0..SLOTS {
            snap.slots[slot as usize] = sum_counter(&self.slots, SLOT_COUNTERS_MAP, slot)?;
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
    verdicts: [Counter; Verdict::COUNT as usize],
    slots: [Counter; SLOTS as usize],
    stats: [u64; DataplaneStat::COUNT as usize],
}

impl CounterSnapshot {
    pub fn class(&self, class: ProtoClass) -> Counter {
        self.by_class[class as usize]
    }

    pub fn verdict(&self, v: Verdict) -> Counter {
        self.verdicts[v as usize]
    }

    /// Packets classified by the policy in `slot` (0 or 1).
    pub fn slot(&self, slot: u32) -> Counter {
        self.slots[(slot & 1) as usize]
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
        let pairs = d
            .by_class
            .iter_mut()
            .zip(earlier.by_class.iter())
            .chain(d.verdicts.iter_mut().zip(earlier.verdicts.iter()))
            .chain(d.slots.iter_mut().zip(earlier.slots.iter()));
        for (now, then) in pairs {
            now.packets = now.packets.wrapping_sub(then.packets);
            now.bytes = now.bytes.wrapping_sub(then.bytes);
        }
        for (now, then) in d.stats.iter_mut().zip(earlier.stats.iter()) {
            *now = now.wrapping_sub(*then);
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
        let verdicts: serde_json::Map<String, serde_json::Value> = Verdict::ALL
            .iter()
            .map(|&v| {
                let c = self.verdict(v);
                (
                    v.name().to_owned(),
                    serde_json::json!(Pb {
                        packets: c.packets,
                        bytes: c.bytes
                    }),
                )
            })
            .collect();
        serde_json::json!({ "classes": classes, "verdicts": verdicts, "stats": stats })
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

//! Human-readable and JSON reports of what the data plane counted.
use std::{fmt::Write as _, time::Duration};

use proxy_common::{DataplaneStat, ProtoClass, policy::Verdict};

use crate::dataplane::{AttachedMode, CounterSnapshot, ProgramStats, RecordTally};

/// Everything one `edgeproxy run` saw.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub iface: String,
    pub mode: AttachedMode,
    pub elapsed: Duration,
    pub counters: CounterSnapshot,
    pub records: RecordTally,
    /// Kernel-measured run time of the XDP program over the run, when requested.
    pub xdp_cost: Option<ProgramStats>,
}

impl RunSummary {
    /// A fixed-width table: one row per protocol class that saw traffic, then totals.
    pub fn table(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "edgeproxy on {} (hook {}), {:.1} s",
            self.iface, self.mode, secs
        );
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>14} {:>12} {:>12}",
            "class", "packets", "bytes", "records", "pkt/s"
        );
        for class in ProtoClass::ALL {
            let c = self.counters.class(class);
            let r = self.records.class(class);
            if c.packets == 0 && r == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "{:<12} {:>12} {:>14} {:>12} {:>12.0}",
                class.name(),
                c.packets,
                c.bytes,
                r,
                c.packets as f64 / secs
            );
        }
        let t = self.counters.total();
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>14} {:>12} {:>12.0}",
            "total",
            t.packets,
            t.bytes,
            self.records.total(),
            t.packets as f64 / secs
        );
        for v in Verdict::ALL {
            let c = self.counters.verdict(v);
            if c.packets > 0 {
                let _ = writeln!(
                    s,
                    "verdict {:<20} {:>12} packets {:>14} bytes",
                    v.name(),
                    c.packets,
                    c.bytes
                );
            }
        }
        let _ = writeln!(
            s,
            "records pushed {} / drained {} / dropped because the ring was full {}",
            self.counters.stat(DataplaneStat::RecordsPushed),
            self.records.total(),
            self.counters.stat(DataplaneStat::RingbufFull),
        );
        if let Some(cost) = self.xdp_cost {
            match cost.ns_per_run() {
                Some(ns) => {
                    let _ = writeln!(
                        s,
                        "XDP program cost: {ns:.1} ns/packet over {} runs (kernel BPF stats)",
                        cost.run_count
                    );
                }
                None => {
                    let _ = writeln!(s, "XDP program cost: no runs recorded");
                }
            }
        }
        s
    }

    pub fn json(&self) -> serde_json::Value {
        let records: serde_json::Map<String, serde_json::Value> = ProtoClass::ALL
            .iter()
            .map(|&c| (c.name().to_owned(), self.records.class(c).into()))
            .collect();
        serde_json::json!({
            "iface": self.iface,
            "hook": self.mode.name(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "counters": self.counters.to_json(),
            "records": {
                "by_class": records,
                "total": self.records.total(),
                "samples": self.records.samples,
                "captures": self.records.captures,
                "bad": self.records.bad,
            },
            "xdp_cost": self.xdp_cost.map(|c| serde_json::json!({
                "run_count": c.run_count,
                "run_time_ns": c.run_time_ns,
                "ns_per_packet": c.ns_per_run(),
            })),
        })
    }
}

//! Human-readable and JSON reports of what the data plane counted.
pub mod http;
pub mod prometheus;

use std::{fmt::Write as _, time::Duration};

use proxy_common::{DataplaneStat, ProtoClass, policy::Verdict};

use crate::dataplane::{AttachedMode, CounterSnapshot, ProgramStats, RecordTally};

/// Everything one `edgeproxy run` saw.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub iface: String,
    pub mode: AttachedMode,
    pub elapsed: Duration,
    /// The data plane's counters at the end: since it was loaded, which for an adopted
    /// data plane includes earlier runs.
    pub counters: CounterSnapshot,
    /// The same when this run started: rates and the table are over this run only.
    pub counters_at_start: CounterSnapshot,
    pub records: RecordTally,
    /// Kernel-measured run time of the XDP program over the run, when requested.
    pub xdp_cost: Option<ProgramStats>,
    /// HTTP request lines found in sampled TCP snippets.
    pub http: http::HttpSamples,
}

/// Top paths shown in reports.
const TOP_PATHS: usize = 10;

impl RunSummary {
    /// What the data plane counted during this run.
    pub fn this_run(&self) -> CounterSnapshot {
        self.counters.since(&self.counters_at_start)
    }

    /// A fixed-width table: one row per protocol class that saw traffic, then totals.
    pub fn table(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let run = self.this_run();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "edgeproxy on {} (hook {}), {:.1} s; counts are this run's",
            self.iface, self.mode, secs
        );
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>14} {:>12} {:>12}",
            "class", "packets", "bytes", "records", "pkt/s"
        );
        for class in ProtoClass::ALL {
            let c = run.class(class);
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
        let t = run.total();
        let _ = writeln!(
            s,
            "{:<12} {:>12} {:>14} {:>12} {:>12.0}",
            "total",
            t.packets,
            t.bytes,
            self.records.total(),
            t.packets as f64 / secs
        );
        let lifetime = self.counters.total();
        if lifetime.packets != t.packets {
            let _ = writeln!(
                s,
                "since the data plane was loaded (earlier runs too): {} packets, {} bytes",
                lifetime.packets, lifetime.bytes
            );
        }
        for v in Verdict::ALL {
            let c = run.verdict(v);
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
            run.stat(DataplaneStat::RecordsPushed),
            self.records.total(),
            run.stat(DataplaneStat::RingbufFull),
        );
        let r = &self.records;
        if r.bad + r.other_reader + r.skips > 0 {
            let _ = writeln!(
                s,
                "record ring irregularities: {} records that did not parse, {} drains that found another reader, {} skips to the producer",
                r.bad, r.other_reader, r.skips
            );
        }
        if self.http.requests > 0 {
            let _ = writeln!(
                s,
                "HTTP request lines in {} sampled TCP snippets: {} ({} cut short by the snap length)",
                self.http.tcp_samples, self.http.requests, self.http.truncated
            );
            for (host, path, n) in self.http.top(TOP_PATHS) {
                let _ = writeln!(s, "  {n:>10}  {host}{path}");
            }
        }
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
            "counters_this_run": self.this_run().to_json(),
            "packets_this_run": self.this_run().total().packets,
            "packets_per_s": self.this_run().total().packets as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "records": {
                "by_class": records,
                "total": self.records.total(),
                "samples": self.records.samples,
                "captures": self.records.captures,
                "bad": self.records.bad,
                "other_reader_drains": self.records.other_reader,
                "skips": self.records.skips,
            },
            "http": self.http.json(TOP_PATHS),
            "xdp_cost": self.xdp_cost.map(|c| serde_json::json!({
                "run_count": c.run_count,
                "run_time_ns": c.run_time_ns,
                "ns_per_packet": c.ns_per_run(),
            })),
        })
    }
}

/// The TCP forwarder's final report as a table: one line per route, one per upstream.
pub fn tcp_table(s: &crate::tcp::TcpSummary) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let conns: u64 = s.workers.iter().map(|w| w.connections).sum();
    let waits: u64 = s.workers.iter().map(|w| w.buffer_waits).sum();
    let local: u64 = s.workers.iter().map(|w| w.local_send_buffers).sum();
    let cc: u64 = s.workers.iter().map(|w| w.local_congestion).sum();
    let cc_errors: u64 = s.workers.iter().map(|w| w.local_congestion_errors).sum();
    let restored: u64 = s.workers.iter().map(|w| w.system_congestion_restored).sum();
    let _ = writeln!(
        out,
        "TCP forwarding: {} workers on {}, copy path {}, {conns} connections, {waits} buffer waits, {local} send buffers fixed for peers on this host, {cc} sockets to peers on this host on local_congestion ({restored} clients from other hosts switched back, {cc_errors} settings refused), {:.1} s",
        s.workers.len(),
        s.engine,
        s.copy,
        s.elapsed_s
    );
    if let Some(why) = &s.engine_fallback {
        let _ = writeln!(out, "io_uring not used: {why}");
    }
    let hits: u64 = s.workers.iter().map(|w| w.busy_poll_hits).sum();
    let sleeps: u64 = s.workers.iter().map(|w| w.busy_poll_sleeps).sum();
    if hits + sleeps > 0 {
        let _ = writeln!(
            out,
            "polling (busy_poll_usec; bulk_poll_usec under bulk traffic): {hits} waits found completions while polling, {sleeps} polls ran out and slept"
        );
    }
    for z in &s.zero_copy {
        let _ = writeln!(
            out,
            "zero-copy receive on {} (route {}): {}: {}",
            z.iface,
            z.route,
            if z.used { "used" } else { "not used" },
            z.reason
        );
    }
    for w in &s.workers {
        match (&w.zero_copy_queue, &w.zero_copy_refused) {
            (Some(q), _) => {
                let _ = writeln!(
                    out,
                    "worker on CPU {}: zero-copy rx queue {q}, {} connections, {} bytes received zero-copy",
                    w.cpu, w.zero_copy_streams, w.zero_copy_bytes
                );
            }
            (None, Some(why)) => {
                let _ = writeln!(out, "worker on CPU {}: no zero-copy queue: {why}", w.cpu);
            }
            (None, None) => {}
        }
    }
    let num =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let txt = |v: &serde_json::Value, k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
    for r in s.routes.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "route {} listen {} balance {} : accepted {} active {} refused {}",
            r.get("name").and_then(|v| v.as_str()).unwrap_or("?"),
            r.get("listen").and_then(|v| v.as_str()).unwrap_or("?"),
            r.get("balance").and_then(|v| v.as_str()).unwrap_or("?"),
            num(r, "accepted"),
            num(r, "active"),
            txt(r, "refused"),
        );
        for u in r
            .get("upstreams")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let lat = u.get("connect_latency").cloned().unwrap_or_default();
            let _ = writeln!(
                out,
                "  upstream {:<24} {:<9} connections {:>8} bytes up {:>12} down {:>12} connect p50 < {} µs p99 < {} µs errors {}",
                u.get("address").and_then(|v| v.as_str()).unwrap_or("?"),
                if u.get("healthy")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false)
                {
                    "healthy"
                } else {
                    "DOWN"
                },
                num(u, "connections"),
                num(u, "bytes_up"),
                num(u, "bytes_down"),
                txt(&lat, "p50_us_below"),
                txt(&lat, "p99_us_below"),
                txt(u, "errors"),
            );
        }
    }
    out
}

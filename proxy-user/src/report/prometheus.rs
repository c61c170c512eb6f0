//! The TCP counters in the Prometheus text exposition format (0.0.4), as the admin
//! endpoint's `/metrics` serves them. Every reason is exported, zeros included, so that
//! rates work from the first scrape; routes and upstreams are those of the routes in
//! force (a reload that keeps a route name or an upstream address keeps its counters).
use std::{fmt::Write as _, sync::atomic::Ordering};

use crate::tcp::{Lifecycle, Routes, WorkerStats, stats::Reason};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family: its HELP/TYPE header, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Self {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Self { out, name }
    }

    /// A sample `name{labels} value`; `suffix` for a histogram's `_bucket`, `_sum`,
    /// `_count`.
    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                escape_label(v, self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Seconds from microseconds, as a decimal (no exponent).
fn seconds(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

/// Appends the metrics of forwarding in `phase`, of `routes` and of the workers (as they
/// last published them) to `out`.
pub fn tcp(phase: Lifecycle, routes: &Routes, workers: &[WorkerStats], out: &mut String) {
    let mut f = Family::new(
        out,
        "edgeproxy_tcp_phase",
        "gauge",
        "1 for the phase forwarding is in: starting, serving, draining (after SIGTERM) or stopped.",
    );
    for p in Lifecycle::ALL {
        f.sample("", &[("phase", p.name())], u8::from(p == phase));
    }
    let route_labels = |r: &crate::tcp::Route| (r.spec.name.clone(), r.spec.listen.to_string());
    type RouteValue = fn(&crate::tcp::stats::RouteStats) -> u64;
    let per_route: [(&'static str, &str, &str, RouteValue); 2] = [
        (
            "edgeproxy_tcp_route_active",
            "gauge",
            "Connections of the route open now.",
            |s| s.active.load(Ordering::Relaxed),
        ),
        (
            "edgeproxy_tcp_route_accepted_total",
            "counter",
            "Connections accepted on the route's listener (refused ones included).",
            |s| s.accepted.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in per_route {
        let mut f = Family::new(out, name, kind, help);
        for r in &routes.routes {
            let (route, listen) = route_labels(r);
            let labels = [("route", route.as_str()), ("listen", listen.as_str())];
            f.sample("", &labels, value(&r.stats));
        }
    }
    let mut f = Family::new(
        out,
        "edgeproxy_tcp_route_refused_total",
        "counter",
        "Connections the route refused or ended before choosing an upstream, by reason.",
    );
    for r in &routes.routes {
        let (name, listen) = route_labels(r);
        for reason in Reason::ALL {
            let labels = [
                ("route", name.as_str()),
                ("listen", listen.as_str()),
                ("reason", reason.name()),
            ];
            f.sample("", &labels, r.stats.refused.get(reason));
        }
    }

    let upstreams = || {
        routes.routes.iter().flat_map(|r| {
            r.pool
                .upstreams
                .iter()
                .map(move |u| (r.spec.name.as_str(), u.address.to_string(), u))
        })
    };
    type UpstreamValue = fn(&crate::tcp::pool::Upstream) -> u64;
    let per_upstream: [(&'static str, &str, &str, UpstreamValue); 4] = [
        (
            "edgeproxy_tcp_upstream_healthy",
            "gauge",
            "1 while the upstream takes connections (health checks, passive ejection).",
            |u| u64::from(u.healthy()),
        ),
        (
            "edgeproxy_tcp_upstream_active",
            "gauge",
            "Connections to the upstream open now.",
            |u| u.active.load(Ordering::Relaxed),
        ),
        (
            "edgeproxy_tcp_upstream_connections_total",
            "counter",
            "Connections established to the upstream.",
            |u| u.stats.connections.load(Ordering::Relaxed),
        ),
        (
            "edgeproxy_tcp_upstream_ejections_total",
            "counter",
            "Times passive ejection took the upstream out.",
            |u| u.stats.ejections.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in per_upstream {
        let mut f = Family::new(out, name, kind, help);
        for (route, addr, u) in upstreams() {
            f.sample("", &[("route", route), ("upstream", &addr)], value(u));
        }
    }
    let mut f = Family::new(
        out,
        "edgeproxy_tcp_upstream_bytes_total",
        "counter",
        "Bytes forwarded: up is client to upstream, down is upstream to client.",
    );
    for (route, addr, u) in upstreams() {
        for (direction, bytes) in [("up", &u.stats.bytes_up), ("down", &u.stats.bytes_down)] {
            let labels = [
                ("route", route),
                ("upstream", &addr),
                ("direction", direction),
            ];
            f.sample("", &labels, bytes.load(Ordering::Relaxed));
        }
    }
    let mut f = Family::new(
        out,
        "edgeproxy_tcp_upstream_errors_total",
        "counter",
        "Connections to the upstream that failed or ended abnormally, by reason.",
    );
    for (route, addr, u) in upstreams() {
        for reason in Reason::ALL {
            let labels = [
                ("route", route),
                ("upstream", &addr),
                ("reason", reason.name()),
            ];
            f.sample("", &labels, u.stats.errors.get(reason));
        }
    }
    let mut f = Family::new(
        out,
        "edgeproxy_tcp_upstream_connect_seconds",
        "histogram",
        "Time to connect to the upstream (power-of-two microsecond buckets).",
    );
    for (route, addr, u) in upstreams() {
        let h = &u.stats.connect_latency;
        let mut cumulative = 0;
        for (bound, n) in h.buckets() {
            cumulative += n;
            let le = bound.map_or_else(|| "+Inf".to_string(), seconds);
            let labels = [("route", route), ("upstream", &addr), ("le", &le)];
            f.sample("_bucket", &labels, cumulative);
        }
        let labels = [("route", route), ("upstream", addr.as_str())];
        f.sample("_sum", &labels, seconds(h.sum_us()));
        f.sample("_count", &labels, cumulative);
    }
    workers_of(workers, out);
}

/// The workers' own counters, labelled by the CPU each is pinned to.
fn workers_of(workers: &[WorkerStats], out: &mut String) {
    type WorkerValue = fn(&WorkerStats) -> u64;
    let per_worker: [(&'static str, &str, WorkerValue); 14] = [
        (
            "edgeproxy_tcp_worker_connections_total",
            "Connections the worker accepted.",
            |w| w.connections,
        ),
        (
            "edgeproxy_tcp_worker_buffer_waits_total",
            "Times a direction found the buffer pool empty and waited (memory bound at work).",
            |w| w.buffer_waits,
        ),
        (
            "edgeproxy_tcp_worker_local_send_buffers_total",
            "Sockets to peers on this host whose send buffer was fixed (local_sndbuf).",
            |w| w.local_send_buffers,
        ),
        (
            "edgeproxy_tcp_worker_local_congestion_total",
            "Sockets to peers on this host that run local_congestion (upstreams set before connecting, clients from their listener).",
            |w| w.local_congestion,
        ),
        (
            "edgeproxy_tcp_worker_local_congestion_errors_total",
            "Times the kernel refused a congestion-control setting (an upstream or listener keeps the system's, a client from another host keeps local_congestion).",
            |w| w.local_congestion_errors,
        ),
        (
            "edgeproxy_tcp_worker_system_congestion_restored_total",
            "Clients from other hosts accepted with local_congestion and switched back to the system's congestion control.",
            |w| w.system_congestion_restored,
        ),
        (
            "edgeproxy_tcp_worker_gathering_waits_total",
            "Waits that gathered completions after bulk traffic (coalesce_usec, with bulk_poll_usec = 0).",
            |w| w.gathering_waits,
        ),
        (
            "edgeproxy_tcp_worker_busy_poll_hits_total",
            "Waits whose completions came in while the worker polled (busy_poll_usec, bulk_poll_usec).",
            |w| w.busy_poll_hits,
        ),
        (
            "edgeproxy_tcp_worker_busy_poll_sleeps_total",
            "Polls that ran out of time and slept (busy_poll_usec, bulk_poll_usec).",
            |w| w.busy_poll_sleeps,
        ),
        (
            "edgeproxy_tcp_worker_cancel_retries_total",
            "Closing connections that cancelled their operations again (0 normally).",
            |w| w.cancel_retries,
        ),
        (
            "edgeproxy_tcp_worker_closed_with_listener_total",
            "Connections accepted just as a reload or the drain closed their listener.",
            |w| w.closed_with_listener,
        ),
        (
            "edgeproxy_tcp_worker_zero_copy_bytes_total",
            "Client bytes received through the zero-copy queue.",
            |w| w.zero_copy_bytes,
        ),
        (
            "edgeproxy_tcp_worker_zero_copy_waits_total",
            "Times a zero-copy direction waited for chunks to come back.",
            |w| w.zero_copy_waits,
        ),
        (
            "edgeproxy_tcp_worker_zero_copy_retries_total",
            "Zero-copy receives the kernel ended for lack of room, issued again.",
            |w| w.zero_copy_retries,
        ),
    ];
    let cpus: Vec<String> = workers.iter().map(|w| w.cpu.to_string()).collect();
    for (name, help, value) in per_worker {
        let mut f = Family::new(out, name, "counter", help);
        for (w, cpu) in workers.iter().zip(&cpus) {
            f.sample("", &[("cpu", cpu)], value(w));
        }
    }
    let mut f = Family::new(
        out,
        "edgeproxy_tcp_worker_streams_total",
        "counter",
        "Connections that streamed, by copy path.",
    );
    for (w, cpu) in workers.iter().zip(&cpus) {
        for (path, n) in [
            ("splice", w.splice_streams),
            ("buffers", w.buffer_streams),
            ("zero_copy", w.zero_copy_streams),
        ] {
            f.sample("", &[("cpu", cpu), ("path", path)], n);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tcp::stats::Reason;

    fn routes() -> Routes {
        let cfg = crate::config::parse_config(
            "t.toml",
            "[[route]]\nname = \"we \\\"b\\\\\"\nlisten = \"127.0.0.1:8000\"\n\
             upstreams = [\"127.0.0.1:8001\", \"127.0.0.1:8002\"]\n",
        )
        .unwrap();
        Routes::build(&cfg.routes, cfg.tcp.clone(), None)
    }

    /// The value of the one sample line starting with `prefix` (name and labels).
    fn value<'a>(text: &'a str, prefix: &str) -> &'a str {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
            .collect();
        assert_eq!(lines.len(), 1, "{prefix}: {lines:?}");
        &lines[0][prefix.len() + 1..]
    }

    #[test]
    fn counters_labels_and_histograms_follow_the_format() {
        let routes = routes();
        let r = &routes.routes[0];
        r.stats.accepted.store(5, Ordering::Relaxed);
        r.stats.active.store(2, Ordering::Relaxed);
        r.stats.refused.add(Reason::ProxyHeaderMissing, 3);
        let u = &r.pool.upstreams[1];
        u.stats.bytes_up.store(1000, Ordering::Relaxed);
        u.stats.bytes_down.store(7, Ordering::Relaxed);
        u.stats.errors.add(Reason::ConnectRefused, 4);
        u.stats.connect_latency.record(Duration::from_micros(100));
        u.stats.connect_latency.record(Duration::from_micros(300));
        u.stats.connect_latency.record(Duration::from_secs(100));
        let worker = WorkerStats {
            cpu: 3,
            connections: 9,
            splice_streams: 6,
            buffer_streams: 2,
            buffer_waits: 11,
            ..WorkerStats::default()
        };
        let mut text = String::new();
        tcp(Lifecycle::Draining, &routes, &[worker], &mut text);
        for (phase, want) in [
            ("starting", "0"),
            ("serving", "0"),
            ("draining", "1"),
            ("stopped", "0"),
        ] {
            assert_eq!(
                value(&text, &format!("edgeproxy_tcp_phase{{phase=\"{phase}\"}}")),
                want,
                "{phase}"
            );
        }

        // The name's quote and backslash are escaped.
        let route = r#"route="we \"b\\",listen="127.0.0.1:8000""#;
        assert_eq!(
            value(
                &text,
                &format!("edgeproxy_tcp_route_accepted_total{{{route}}}")
            ),
            "5"
        );
        assert_eq!(
            value(&text, &format!("edgeproxy_tcp_route_active{{{route}}}")),
            "2"
        );
        let refused = format!("edgeproxy_tcp_route_refused_total{{{route},reason=");
        assert_eq!(
            value(&text, &format!("{refused}\"proxy_header_missing\"}}")),
            "3"
        );
        // Zeros too, for every reason.
        assert_eq!(value(&text, &format!("{refused}\"route_limit\"}}")), "0");
        assert_eq!(
            text.lines().filter(|l| l.starts_with(&refused)).count(),
            Reason::ALL.len()
        );

        let up = r#"route="we \"b\\",upstream="127.0.0.1:8002""#;
        let bytes = format!("edgeproxy_tcp_upstream_bytes_total{{{up},direction=");
        assert_eq!(value(&text, &format!("{bytes}\"up\"}}")), "1000");
        assert_eq!(value(&text, &format!("{bytes}\"down\"}}")), "7");
        let errors = format!("edgeproxy_tcp_upstream_errors_total{{{up},reason=");
        assert_eq!(value(&text, &format!("{errors}\"connect_refused\"}}")), "4");
        assert_eq!(
            value(&text, &format!("edgeproxy_tcp_upstream_healthy{{{up}}}")),
            "1"
        );

        // Buckets are cumulative, bounds in seconds, ending at +Inf = _count.
        let bucket = format!("edgeproxy_tcp_upstream_connect_seconds_bucket{{{up},le=");
        assert_eq!(value(&text, &format!("{bucket}\"0.000064\"}}")), "0");
        assert_eq!(value(&text, &format!("{bucket}\"0.000128\"}}")), "1");
        assert_eq!(value(&text, &format!("{bucket}\"0.000512\"}}")), "2");
        assert_eq!(value(&text, &format!("{bucket}\"16.777216\"}}")), "2");
        assert_eq!(value(&text, &format!("{bucket}\"+Inf\"}}")), "3");
        let h = "edgeproxy_tcp_upstream_connect_seconds";
        assert_eq!(value(&text, &format!("{h}_count{{{up}}}")), "3");
        assert_eq!(value(&text, &format!("{h}_sum{{{up}}}")), "100.0004");
        let mut last = 0;
        for l in text.lines().filter(|l| l.starts_with(&bucket)) {
            let n: u64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(n >= last, "{l}");
            last = n;
        }

        // The workers' counters, by CPU (and copy path).
        assert_eq!(
            value(&text, "edgeproxy_tcp_worker_connections_total{cpu=\"3\"}"),
            "9"
        );
        assert_eq!(
            value(&text, "edgeproxy_tcp_worker_buffer_waits_total{cpu=\"3\"}"),
            "11"
        );
        let streams = "edgeproxy_tcp_worker_streams_total{cpu=\"3\",path=";
        assert_eq!(value(&text, &format!("{streams}\"splice\"}}")), "6");
        assert_eq!(value(&text, &format!("{streams}\"buffers\"}}")), "2");
        assert_eq!(value(&text, &format!("{streams}\"zero_copy\"}}")), "0");

        // Each family is declared once, before its samples; every line is a comment or
        // `name{labels} value` with a numeric value.
        for name in [
            "edgeproxy_tcp_route_active",
            "edgeproxy_tcp_upstream_connect_seconds",
        ] {
            assert_eq!(
                text.lines()
                    .filter(|l| *l == format!("# TYPE {name} gauge")
                        || *l == format!("# TYPE {name} histogram"))
                    .count(),
                1
            );
        }
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "{l}");
        }
    }
}

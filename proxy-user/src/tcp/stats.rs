//! Counters of the TCP forwarder: every connection that ends other than by both sides
//! closing cleanly ends through one typed [`Reason`], counted per route or upstream.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Why a connection was refused or ended abnormally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The route was at `max_connections` (the client is reset at once).
    RouteLimit,
    /// Every usable upstream was at its `max_connections`.
    UpstreamLimit,
    /// No healthy upstream (or every one failed to connect).
    NoUpstream,
    ProxyHeaderMissing,
    ProxyHeaderMalformed,
    ProxyHeaderTooLong,
    /// The client closed before sending a complete PROXY header.
    ProxyHeaderEof,
    /// The client did not send a complete PROXY header within `proxy_header_timeout`.
    ProxyHeaderTimeout,
    ConnectRefused,
    ConnectTimeout,
    ConnectError,
    /// The upstream reset the connection (propagated to the client as a reset).
    UpstreamReset,
    /// The client reset the connection (propagated to the upstream as a reset).
    ClientReset,
    IdleTimeout,
    /// Still open when the drain deadline passed at shutdown.
    DrainDeadline,
    /// Any other socket error (accept, recv, send, splice), with the error logged.
    SocketError,
    /// No file descriptor for the connection: refused at accept because the connections
    /// open reached what `RLIMIT_NOFILE` allows (see [`crate::limits`]), or the kernel
    /// answered EMFILE/ENFILE for its socket or pipes.
    FdLimit,
}

impl Reason {
    pub const ALL: [Reason; 17] = [
        Reason::RouteLimit,
        Reason::UpstreamLimit,
        Reason::NoUpstream,
        Reason::ProxyHeaderMissing,
        Reason::ProxyHeaderMalformed,
        Reason::ProxyHeaderTooLong,
        Reason::ProxyHeaderEof,
        Reason::ProxyHeaderTimeout,
        Reason::ConnectRefused,
        Reason::ConnectTimeout,
        Reason::ConnectError,
        Reason::UpstreamReset,
        Reason::ClientReset,
        Reason::IdleTimeout,
        Reason::DrainDeadline,
        Reason::SocketError,
        Reason::FdLimit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::RouteLimit => "route_limit",
            Reason::UpstreamLimit => "upstream_limit",
            Reason::NoUpstream => "no_upstream",
            Reason::ProxyHeaderMissing => "proxy_header_missing",
            Reason::ProxyHeaderMalformed => "proxy_header_malformed",
            Reason::ProxyHeaderTooLong => "proxy_header_too_long",
            Reason::ProxyHeaderEof => "proxy_header_eof",
            Reason::ProxyHeaderTimeout => "proxy_header_timeout",
            Reason::ConnectRefused => "connect_refused",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::ConnectError => "connect_error",
            Reason::UpstreamReset => "upstream_reset",
            Reason::ClientReset => "client_reset",
            Reason::IdleTimeout => "idle_timeout",
            Reason::DrainDeadline => "drain_deadline",
            Reason::SocketError => "socket_error",
            Reason::FdLimit => "fd_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
pub struct ReasonCounts([AtomicU64; Reason::ALL.len()]);

impl ReasonCounts {
    pub fn add(&self, r: Reason, n: u64) {
        self.0[r.index()].fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self, r: Reason) -> u64 {
        self.0[r.index()].load(Ordering::Relaxed)
    }
    /// Non-zero counts by name.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for r in Reason::ALL {
            let n = self.get(r);
            if n != 0 {
                m.insert(r.name().into(), n.into());
            }
        }
        serde_json::Value::Object(m)
    }
}

/// Connect latencies in power-of-two microsecond buckets (bucket `i` holds latencies
/// below 2^i µs; the last one everything longer), so recording is one atomic add.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; Self::BUCKETS],
    /// Every recorded latency added up, in microseconds (Prometheus' `_sum`).
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub const BUCKETS: usize = 26; // up to 2^25 µs ≈ 33 s

    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = ((u64::BITS - us.leading_zeros()) as usize).min(Self::BUCKETS - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// Each bucket's upper bound in microseconds (latencies below it; `None` for the
    /// last, which takes everything longer) and its count.
    pub fn buckets(&self) -> impl Iterator<Item = (Option<u64>, u64)> + '_ {
        self.buckets.iter().enumerate().map(|(i, b)| {
            let bound = (i + 1 < Self::BUCKETS).then_some(1u64 << i);
            (bound, b.load(Ordering::Relaxed))
        })
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(1u64 << i);
            }
        }
        None
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count(),
            "p50_us_below": self.quantile_us(0.5),
            "p90_us_below": self.quantile_us(0.9),
            "p99_us_below": self.quantile_us(0.99),
            "max_us_below": self.quantile_us(1.0),
        })
    }
}

/// Per route.
#[derive(Debug, Default)]
pub struct RouteStats {
    pub active: AtomicU64,
    /// Accepted connections (refused ones included, counted again under `refused`).
    pub accepted: AtomicU64,
    /// Connections refused or ended by the route itself, by reason.
    pub refused: ReasonCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_and_indexed_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let names: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    #[test]
    fn histogram_quantiles_are_bucket_bounds() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for _ in 0..98 {
            h.record(Duration::from_micros(100)); // bucket < 128
        }
        h.record(Duration::from_millis(5)); // < 8192
        h.record(Duration::from_secs(100)); // the last bucket
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_us(0.5), Some(128));
        assert_eq!(h.quantile_us(0.98), Some(128));
        assert_eq!(h.quantile_us(0.99), Some(8192));
        assert_eq!(h.quantile_us(1.0), Some(1 << 25));
        h.record(Duration::ZERO);
        assert_eq!(h.quantile_us(0.0), Some(1));
        assert_eq!(h.sum_us(), 98 * 100 + 5_000 + 100_000_000);
        let b: Vec<(Option<u64>, u64)> = h.buckets().collect();
        assert_eq!(b.len(), LatencyHistogram::BUCKETS);
        assert_eq!(b[0], (Some(1), 1));
        assert_eq!(b[7], (Some(128), 98));
        assert_eq!(b[13], (Some(8192), 1));
        assert_eq!(b[25], (None, 1));
        assert_eq!(b.iter().map(|(_, c)| c).sum::<u64>(), h.count());
    }
}

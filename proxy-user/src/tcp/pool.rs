//! Upstream pools: the upstreams of one route, their health and their counters. Shared
//! (through `Arc`) by every worker and the health checker; everything mutable is atomic,
//! so a worker never takes a lock to pick or account for an upstream.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::stats::{LatencyHistogram, Reason, ReasonCounts};

/// Most upstreams one route may have (the per-connection "already tried" set is a
/// fixed-size bit set).
pub const MAX_UPSTREAMS: usize = 256;

#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub connections: AtomicU64,
    /// Client → upstream.
    pub bytes_up: AtomicU64,
    /// Upstream → client.
    pub bytes_down: AtomicU64,
    pub connect_latency: LatencyHistogram,
    pub errors: ReasonCounts,
    /// Times passive ejection took this upstream out.
    pub ejections: AtomicU64,
}

#[derive(Debug)]
pub struct Upstream {
    pub address: SocketAddr,
    /// As written in the configuration (a name, or the address itself).
    pub configured: String,
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
    pub active: AtomicU64,
    pub stats: UpstreamStats,
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the pool's epoch when passive ejection took it out (0 = not).
    ejected_at_ms: AtomicU64,
}

impl Upstream {
    pub fn new(address: SocketAddr, configured: String, weight: u32, max_connections: u32) -> Self {
        Self {
            address,
            configured,
            weight,
            max_connections,
            active: AtomicU64::new(0),
            stats: UpstreamStats::default(),
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            ejected_at_ms: AtomicU64::new(0),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn at_limit(&self) -> bool {
        self.max_connections != 0
            && self.active.load(Ordering::Relaxed) >= u64::from(self.max_connections)
    }
}

#[derive(Debug)]
pub struct UpstreamPool {
    pub upstreams: Vec<Arc<Upstream>>,
    /// Consecutive connect failures that eject an upstream (0 = never).
    pub eject_after: u32,
    /// How long an ejected upstream stays out when no active health check brings it back.
    pub eject_for: Duration,
    /// Bumped whenever an upstream's health changes (balancers rebuild their tables).
    generation: AtomicU64,
    epoch: Instant,
}

impl UpstreamPool {
    pub fn new(upstreams: Vec<Arc<Upstream>>, eject_after: u32, eject_for: Duration) -> Self {
        Self {
            upstreams,
            eject_after,
            eject_for,
            generation: AtomicU64::new(1),
            epoch: Instant::now(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Marks upstream `i` up or down; returns whether that changed anything.
    pub fn set_health(&self, i: usize, up: bool, why: &str) -> bool {
        let u = &self.upstreams[i];
        if u.healthy.swap(up, Ordering::AcqRel) == up {
            return false;
        }
        if up {
            u.consecutive_failures.store(0, Ordering::Relaxed);
            u.ejected_at_ms.store(0, Ordering::Relaxed);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        if up {
            tracing::info!(upstream = %u.address, why, "upstream up");
        } else {
            tracing::warn!(upstream = %u.address, why, "upstream down");
        }
        true
    }

    pub fn connect_succeeded(&self, i: usize, latency: Duration) {
        let u = &self.upstreams[i];
        u.consecutive_failures.store(0, Ordering::Relaxed);
        u.stats.connect_latency.record(latency);
    }

    /// Counts a failed connect; ejects the upstream after `eject_after` in a row.
    pub fn connect_failed(&self, i: usize, reason: Reason) {
        let u = &self.upstreams[i];
        u.stats.errors.add(reason, 1);
        let n = u.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.eject_after != 0
            && n >= self.eject_after
            && self.set_health(i, false, "passive ejection: consecutive connect failures")
        {
            u.stats.ejections.fetch_add(1, Ordering::Relaxed);
            let ms = self.epoch.elapsed().as_millis().max(1) as u64;
            u.ejected_at_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Brings back upstreams whose passive ejection has lasted `eject_for` (used for
    /// routes without active health checks, which otherwise decide).
    pub fn expire_ejections(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        for (i, u) in self.upstreams.iter().enumerate() {
            let at = u.ejected_at_ms.load(Ordering::Relaxed);
            if at != 0 && now.saturating_sub(at) >= self.eject_for.as_millis() as u64 {
                self.set_health(i, true, "ejection expired");
            }
        }
    }
}

/// Upstreams already tried for one connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tried([u64; MAX_UPSTREAMS / 64]);

impl Tried {
    pub fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    pub fn contains(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, eject_after: u32) -> UpstreamPool {
        UpstreamPool::new(
            (0..n)
                .map(|i| {
                    let a: SocketAddr = format!("10.200.0.{}:80", i + 1).parse().unwrap();
                    Arc::new(Upstream::new(a, a.to_string(), 1, 0))
                })
                .collect(),
            eject_after,
            Duration::ZERO,
        )
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let p = pool(2, 3);
        let g = p.generation();
        p.connect_failed(0, Reason::ConnectRefused);
        p.connect_failed(0, Reason::ConnectRefused);
        p.connect_succeeded(0, Duration::from_micros(50));
        p.connect_failed(0, Reason::ConnectRefused);
        p.connect_failed(0, Reason::ConnectTimeout);
        assert!(p.upstreams[0].healthy(), "two in a row do not eject");
        p.connect_failed(0, Reason::ConnectRefused);
        assert!(!p.upstreams[0].healthy());
        assert!(p.generation() > g);
        let s = &p.upstreams[0].stats;
        assert_eq!(s.ejections.load(Ordering::Relaxed), 1);
        assert_eq!(s.errors.get(Reason::ConnectRefused), 4);
        assert_eq!(s.errors.get(Reason::ConnectTimeout), 1);
        // eject_for = 0: the next expiry pass brings it back.
        p.expire_ejections();
        assert!(p.upstreams[0].healthy());
        assert!(p.upstreams[1].healthy());
    }

    #[test]
    fn eject_after_zero_never_ejects() {
        let p = pool(1, 0);
        for _ in 0..100 {
            p.connect_failed(0, Reason::ConnectRefused);
        }
        assert!(p.upstreams[0].healthy());
    }

    #[test]
    fn tried_is_a_set() {
        let mut t = Tried::default();
        for i in [0, 63, 64, 255] {
            assert!(!t.contains(i));
            t.insert(i);
            assert!(t.contains(i));
        }
        assert!(!t.contains(1) && !t.contains(128));
    }
}

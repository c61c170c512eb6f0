//! Upstream selection: smooth weighted round robin (nginx's), weighted least connections,
//! and Maglev consistent hashing on the client address (Eisenbud et al., NSDI 2016, with
//! weights as in Katran). Each worker owns its [`Balancer`]; health and connection counts
//! come from the shared [`UpstreamPool`].
use std::{net::IpAddr, str::FromStr, sync::atomic::Ordering};

use super::pool::{Tried, UpstreamPool};

/// Maglev lookup table size: a prime ≥ 65,537 keeps the remapping on a change within a
/// fraction of a percent of the ideal 1/N.
pub const MAGLEV_TABLE_SIZE: usize = 65_537;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    #[default]
    RoundRobin,
    LeastConn,
    Maglev,
}

impl FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round_robin" => Ok(Self::RoundRobin),
            "least_conn" => Ok(Self::LeastConn),
            "maglev" => Ok(Self::Maglev),
            other => Err(format!(
                "balance must be \"round_robin\", \"least_conn\" or \"maglev\", not {other:?}"
            )),
        }
    }
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::LeastConn => "least_conn",
            Algorithm::Maglev => "maglev",
        }
    }
}

/// Why no upstream could be picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoPick {
    /// Healthy, untried upstreams exist but all are at their connection limit.
    AllAtLimit,
    /// No healthy upstream is left untried.
    NoHealthy,
}

pub struct Balancer {
    algorithm: Algorithm,
    /// Smooth weighted round robin: each upstream's current weight.
    current: Vec<i64>,
    /// Least connections: where the tie-breaking scan starts.
    next: usize,
    /// Maglev: the table and the pool generation it was built for.
    maglev: Option<(u64, Maglev)>,
}

impl Balancer {
    pub fn new(algorithm: Algorithm, upstreams: usize) -> Self {
        Self {
            algorithm,
            current: vec![0; upstreams],
            next: 0,
            maglev: None,
        }
    }

    pub fn pick(
        &mut self,
        pool: &UpstreamPool,
        client: IpAddr,
        tried: &Tried,
    ) -> Result<usize, NoPick> {
        let ups = &pool.upstreams;
        let candidate = |i: usize| ups[i].healthy() && !tried.contains(i);
        let usable = |i: usize| candidate(i) && !ups[i].at_limit();
        let picked = match self.algorithm {
            Algorithm::RoundRobin => {
                let mut total = 0i64;
                let mut best: Option<usize> = None;
                for i in (0..ups.len()).filter(|&i| usable(i)) {
                    self.current[i] += i64::from(ups[i].weight);
                    total += i64::from(ups[i].weight);
                    if best.is_none_or(|b| self.current[i] > self.current[b]) {
                        best = Some(i);
                    }
                }
                if let Some(b) = best {
                    self.current[b] -= total;
                }
                best
            }
            Algorithm::LeastConn => {
                let n = ups.len();
                let mut best: Option<(usize, u64)> = None;
                for k in 0..n {
                    let i = (self.next + k) % n;
                    if !usable(i) {
                        continue;
                    }
                    let active = ups[i].active.load(Ordering::Relaxed);
                    // active_i / w_i < active_b / w_b, without division.
                    let better = best.is_none_or(|(b, ab)| {
                        u128::from(active) * u128::from(ups[b].weight)
                            < u128::from(ab) * u128::from(ups[i].weight)
                    });
                    if better {
                        best = Some((i, active));
                    }
                }
                self.next = (self.next + 1) % n.max(1);
                best.map(|(i, _)| i)
            }
            Algorithm::Maglev => {
                let generation = pool.generation();
                if self.maglev.as_ref().is_none_or(|(g, _)| *g != generation) {
                    let entries: Vec<(usize, String, u32)> = ups
                        .iter()
                        .enumerate()
                        .filter(|(_, u)| u.healthy())
                        .map(|(i, u)| (i, u.address.to_string(), u.weight))
                        .collect();
                    self.maglev = Some((generation, Maglev::build(&entries, MAGLEV_TABLE_SIZE)));
                }
                self.maglev
                    .as_ref()
                    .and_then(|(_, m)| m.lookup(hash_ip(client), usable))
            }
        };
        picked.ok_or_else(|| {
            if (0..ups.len()).any(candidate) {
                NoPick::AllAtLimit
            } else {
                NoPick::NoHealthy
            }
        })
    }
}

/// A Maglev lookup table: slot → upstream index.
pub struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table for `(upstream index, stable key, weight)` entries. An upstream's
    /// permutation depends only on its key, so removing one moves (close to) only the
    /// slots it owned. Weights: each round an upstream earns `weight / max weight` of a
    /// turn and takes a slot per whole turn earned.
    pub fn build(entries: &[(usize, String, u32)], size: usize) -> Self {
        let mut table = vec![u32::MAX; size];
        let entries: Vec<&(usize, String, u32)> = entries.iter().filter(|e| e.2 > 0).collect();
        if entries.is_empty() {
            return Self { table: Vec::new() };
        }
        let m = size as u64;
        let perm: Vec<(u64, u64)> = entries
            .iter()
            .map(|(_, key, _)| {
                let offset = hash_bytes(key.as_bytes(), 0x6d61676c) % m;
                let skip = hash_bytes(key.as_bytes(), 0x65763131) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_w = u64::from(entries.iter().map(|e| e.2).max().unwrap_or(1));
        let mut next = vec![0u64; entries.len()];
        let mut credit = vec![0u64; entries.len()];
        let mut filled = 0;
        while filled < size {
            for (k, e) in entries.iter().enumerate() {
                credit[k] += u64::from(e.2);
                if credit[k] < max_w {
                    continue;
                }
                credit[k] -= max_w;
                let (offset, skip) = perm[k];
                loop {
                    let c = ((offset + next[k] * skip) % m) as usize;
                    next[k] += 1;
                    if table[c] == u32::MAX {
                        table[c] = e.0 as u32;
                        filled += 1;
                        break;
                    }
                }
                if filled == size {
                    break;
                }
            }
        }
        Self { table }
    }

    /// The upstream for `hash`; when that one is not `usable` (tried, at its limit), the
    /// next slots in the table are taken in order, so the fallback is stable too.
    pub fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let start = (hash % self.table.len() as u64) as usize;
        (0..self.table.len())
            .map(|k| self.table[(start + k) % self.table.len()] as usize)
            .find(|&i| usable(i))
    }

    pub fn owner(&self, hash: u64) -> Option<usize> {
        self.lookup(hash, |_| true)
    }
}

/// FNV-1a then a 64-bit finaliser (MurmurHash3's fmix64): stable across processes and
/// releases, unlike std's hasher.
fn hash_bytes(b: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => hash_bytes(&a.octets(), 4),
        IpAddr::V6(a) => hash_bytes(&a.octets(), 6),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr},
        sync::Arc,
        time::Duration,
    };

    use super::*;
    use crate::tcp::pool::Upstream;

    fn pool(weights: &[u32], limits: &[u32]) -> UpstreamPool {
        UpstreamPool::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, &w)| {
                    let a: SocketAddr = format!("10.200.1.{}:80", i + 1).parse().unwrap();
                    Arc::new(Upstream::new(
                        a,
                        a.to_string(),
                        w,
                        limits.get(i).copied().unwrap_or(0),
                    ))
                })
                .collect(),
            0,
            Duration::ZERO,
        )
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(
            0x0a00_0000 + i.wrapping_mul(2_654_435_761) % 0x00ff_ffff,
        ))
    }

    fn counts(b: &mut Balancer, p: &UpstreamPool, picks: u32) -> Vec<u32> {
        let mut c = vec![0; p.upstreams.len()];
        for k in 0..picks {
            c[b.pick(p, client(k), &Tried::default()).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_follows_weights_exactly_and_smoothly() {
        let p = pool(&[1, 2, 3], &[]);
        let mut b = Balancer::new(Algorithm::RoundRobin, 3);
        let seq: Vec<usize> = (0..6)
            .map(|k| b.pick(&p, client(k), &Tried::default()).unwrap())
            .collect();
        // nginx's smooth sequence for weights 1, 2, 3: never three of one in a row.
        assert_eq!(seq, [2, 1, 0, 2, 1, 2]);
        assert_eq!(counts(&mut b, &p, 600), [100, 200, 300]);
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_by_weight() {
        let p = pool(&[1, 1, 2], &[]);
        p.upstreams[0].active.store(5, Ordering::Relaxed);
        p.upstreams[1].active.store(3, Ordering::Relaxed);
        p.upstreams[2].active.store(7, Ordering::Relaxed); // 3.5 per weight unit
        let mut b = Balancer::new(Algorithm::LeastConn, 3);
        assert_eq!(b.pick(&p, client(0), &Tried::default()), Ok(1));
        p.upstreams[1].active.store(4, Ordering::Relaxed);
        assert_eq!(b.pick(&p, client(0), &Tried::default()), Ok(2));
        // Ties rotate instead of always hitting the first.
        for u in &p.upstreams {
            u.active.store(0, Ordering::Relaxed);
        }
        let c = counts(&mut b, &p, 300);
        assert!(c.iter().all(|&n| n >= 90), "{c:?}");
    }

    #[test]
    fn limits_and_tries_are_respected_and_reported() {
        for alg in [
            Algorithm::RoundRobin,
            Algorithm::LeastConn,
            Algorithm::Maglev,
        ] {
            let p = pool(&[1, 1], &[1, 0]);
            let mut b = Balancer::new(alg, 2);
            p.upstreams[0].active.store(1, Ordering::Relaxed);
            for k in 0..50 {
                assert_eq!(b.pick(&p, client(k), &Tried::default()), Ok(1), "{alg:?}");
            }
            let mut t = Tried::default();
            t.insert(1);
            assert_eq!(
                b.pick(&p, client(0), &t),
                Err(NoPick::AllAtLimit),
                "{alg:?}"
            );
            p.set_health(0, false, "test");
            assert_eq!(b.pick(&p, client(0), &t), Err(NoPick::NoHealthy), "{alg:?}");
            p.set_health(0, true, "test");
            p.upstreams[0].active.store(0, Ordering::Relaxed);
            assert_eq!(b.pick(&p, client(0), &t), Ok(0), "{alg:?}");
        }
    }

    #[test]
    fn maglev_table_shares_follow_weights() {
        let entries: Vec<(usize, String, u32)> =
            (0..5).map(|i| (i, format!("10.0.0.{i}:80"), 1)).collect();
        let m = Maglev::build(&entries, MAGLEV_TABLE_SIZE);
        let mut share = [0usize; 5];
        for &i in &m.table {
            share[i as usize] += 1;
        }
        // Equal weights: every upstream owns ⌊M/N⌋ or ⌈M/N⌉ slots.
        let lo = MAGLEV_TABLE_SIZE / 5;
        assert!(share.iter().all(|&s| s == lo || s == lo + 1), "{share:?}");
        let weighted = Maglev::build(
            &[(0, "a:1".into(), 1), (1, "b:1".into(), 3)],
            MAGLEV_TABLE_SIZE,
        );
        let b = weighted.table.iter().filter(|&&i| i == 1).count() as f64;
        let frac = b / MAGLEV_TABLE_SIZE as f64;
        assert!((frac - 0.75).abs() < 0.01, "{frac}");
    }

    /// Removing one of N upstreams must move about 1/N of the clients (those it owned)
    /// and almost none of the others. Measured over 200,000 client addresses.
    #[test]
    fn maglev_removal_remaps_close_to_one_nth() {
        const N: usize = 10;
        let entries: Vec<(usize, String, u32)> = (0..N)
            .map(|i| (i, format!("10.200.2.{i}:8080"), 1))
            .collect();
        let before = Maglev::build(&entries, MAGLEV_TABLE_SIZE);
        let removed = 3;
        let rest: Vec<_> = entries.iter().filter(|e| e.0 != removed).cloned().collect();
        let after = Maglev::build(&rest, MAGLEV_TABLE_SIZE);
        let keys = 200_000u32;
        let (mut moved, mut moved_needlessly) = (0u32, 0u32);
        for k in 0..keys {
            let h = hash_ip(client(k));
            let (a, b) = (before.owner(h).unwrap(), after.owner(h).unwrap());
            if a != b {
                moved += 1;
                if a != removed {
                    moved_needlessly += 1;
                }
            }
        }
        let frac = f64::from(moved) / f64::from(keys);
        let needless = f64::from(moved_needlessly) / f64::from(keys);
        println!(
            "maglev: removing 1 of {N} remapped {:.2}% of keys ({:.2}% not on the removed one)",
            frac * 100.0,
            needless * 100.0
        );
        assert!((frac - 1.0 / N as f64).abs() < 0.02, "remapped {frac}");
        assert!(needless < 0.02, "moved needlessly {needless}");
    }

    #[test]
    fn maglev_picks_are_stable_per_client_and_spread() {
        let p = pool(&[1, 1, 1, 1], &[]);
        let mut b = Balancer::new(Algorithm::Maglev, 4);
        let mut other = Balancer::new(Algorithm::Maglev, 4);
        for k in 0..1000 {
            let c = client(k);
            assert_eq!(
                b.pick(&p, c, &Tried::default()),
                other.pick(&p, c, &Tried::default())
            );
        }
        let c = counts(&mut b, &p, 40_000);
        assert!(c.iter().all(|&n| (9_000..11_000).contains(&n)), "{c:?}");
        // An unhealthy upstream's clients move; (almost all of) the others' stay.
        let owner: Vec<usize> = (0..10_000)
            .map(|k| b.pick(&p, client(k), &Tried::default()).unwrap())
            .collect();
        p.set_health(2, false, "test");
        let mut needless = 0;
        for (k, &o) in owner.iter().enumerate() {
            let now = b.pick(&p, client(k as u32), &Tried::default()).unwrap();
            assert_ne!(now, 2);
            needless += u32::from(o != 2 && now != o);
        }
        assert!(
            needless < 300,
            "{needless} of 10,000 clients moved off a healthy upstream"
        );
    }
}

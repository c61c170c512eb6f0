//! Tumbling-window aggregation. Each worker owns a [`LogWindow`] (no locks on the hot
//! path); at window close the partial windows are merged with [`LogWindow::merge`].
//!
//! Keys and messages are identified by a 64-bit hash, so a record whose key was already
//! seen in the window costs a hash and a map lookup, no allocation; the key's fields are
//! copied once, when it first appears. (Two different keys colliding in 64 bits would be
//! counted together; at a billion keys a window the chance is about 3%: acceptable for
//! counts, and why nothing security-relevant is decided here.)
//!
//! Memory is bounded: at most `max_keys` distinct keys and `max_messages` distinct
//! messages are tracked per window; beyond that records are still counted (in
//! `overflow_keys` / `overflow_messages`), just not broken down. Top-K uses the
//! Space-Saving algorithm: K counters, and every item whose true count exceeds N/K is
//! guaranteed to be among them with an over-estimate of at most N/K.
use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
};

use super::decode::LogRecord;

/// Which record fields make up the aggregation key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub host: bool,
    pub app: bool,
    pub severity: bool,
    pub facility: bool,
    pub source: bool,
}

impl Default for KeySpec {
    /// host + app + severity
    fn default() -> Self {
        Self {
            host: true,
            app: true,
            severity: true,
            facility: false,
            source: false,
        }
    }
}

/// A key's fields, owned (copied once per key per window).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub host: Option<String>,
    pub app: Option<String>,
    pub severity: Option<u8>,
    pub facility: Option<u8>,
    pub source: Option<std::net::IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    pub key: u64,
    pub message: String,
    pub count: u64,
    pub first_ns: i64,
    pub last_ns: i64,
}

/// Space-Saving top-K over 64-bit item ids.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    /// id -> (count, error)
    counters: HashMap<u64, (u64, u64), FixedState>,
    /// Ids that held the minimum count `min` when the counters were last scanned: the
    /// eviction candidates. Counts only grow and newcomers enter above `min`, so a
    /// candidate still at `min` is a true minimum; one that grew is skipped. This makes
    /// an eviction O(1) amortised instead of a scan of K counters per new item.
    candidates: Vec<u64>,
    min: u64,
}

impl PartialEq for TopK {
    fn eq(&self, other: &Self) -> bool {
        // The candidate cache is an acceleration, not part of the summary.
        self.k == other.k && self.counters == other.counters
    }
}

impl Eq for TopK {}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k: k.max(1),
            counters: HashMap::with_capacity_and_hasher(k + 1, FixedState),
            candidates: Vec::new(),
            min: 0,
        }
    }

    pub fn add(&mut self, id: u64, n: u64) {
        if let Some(c) = self.counters.get_mut(&id) {
            c.0 += n;
            return;
        }
        if self.counters.len() < self.k {
            self.counters.insert(id, (n, 0));
            return;
        }
        // Replace a smallest counter; the newcomer inherits its count as error.
        loop {
            let Some(victim) = self.candidates.pop() else {
                self.rescan();
                continue;
            };
            if self.counters.get(&victim).is_some_and(|c| c.0 == self.min) {
                self.counters.remove(&victim);
                self.counters.insert(id, (self.min + n, self.min));
                return;
            }
        }
    }

    fn rescan(&mut self) {
        self.min = self.counters.values().map(|c| c.0).min().unwrap_or(0);
        let min = self.min;
        self.candidates.clear();
        self.candidates.extend(
            self.counters
                .iter()
                .filter(|(_, c)| c.0 == min)
                .map(|(&id, _)| id),
        );
    }

    /// The estimate and maximum over-estimate of one item ((0, 0) when not tracked).
    pub fn estimate(&self, id: u64) -> (u64, u64) {
        self.counters.get(&id).copied().unwrap_or((0, 0))
    }

    /// Items by estimated count, largest first: (id, estimate, maximum over-estimate).
    pub fn top(&self) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<(u64, u64, u64)> = self
            .counters
            .iter()
            .map(|(&id, &(c, e))| (id, c, e))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Merges another summary (of a disjoint part of the stream): sums shared items,
    /// keeps the K largest. Error bounds add.
    pub fn merge(&mut self, other: &TopK) {
        self.candidates.clear();
        for (&id, &(c, e)) in &other.counters {
            let entry = self.counters.entry(id).or_insert((0, 0));
            entry.0 += c;
            entry.1 += e;
        }
        if self.counters.len() > self.k {
            let mut v = self.top();
            v.truncate(self.k);
            self.counters = v
                .into_iter()
                .map(|(id, c, e)| (id, (c, e)))
                .collect::<HashMap<_, _, FixedState>>();
        }
    }
}

/// A deterministic hasher (FNV-1a, 64-bit): ids must agree across workers to merge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedState;

impl BuildHasher for FixedState {
    type Hasher = Fnv;
    fn build_hasher(&self) -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowLimits {
    pub max_keys: usize,
    pub max_messages: usize,
    pub top_k: usize,
    /// Longest message text kept per de-duplicated message.
    pub max_message_len: usize,
}

impl Default for WindowLimits {
    fn default() -> Self {
        Self {
            max_keys: 10_000,
            max_messages: 10_000,
            top_k: 20,
            max_message_len: 512,
        }
    }
}

/// One worker's (or, after merging, the whole node's) view of one window.
#[derive(Clone, Debug)]
pub struct LogWindow {
    spec: KeySpec,
    limits: WindowLimits,
    pub start_ns: i64,
    pub records: u64,
    pub keys: HashMap<u64, (Key, u64), FixedState>,
    pub messages: HashMap<u64, Dedup, FixedState>,
    pub overflow_keys: u64,
    pub overflow_messages: u64,
    /// Space-Saving over the messages that overflowed `messages` (see `top_messages()`).
    pub top_messages: TopK,
}

impl LogWindow {
    pub fn new(spec: KeySpec, limits: WindowLimits, start_ns: i64) -> Self {
        Self {
            spec,
            limits,
            start_ns,
            records: 0,
            keys: HashMap::with_hasher(FixedState),
            messages: HashMap::with_hasher(FixedState),
            overflow_keys: 0,
            overflow_messages: 0,
            top_messages: TopK::new(limits.top_k),
        }
    }

    fn key_id(&self, r: &LogRecord<'_>, source: Option<std::net::IpAddr>) -> u64 {
        let mut h = FixedState.build_hasher();
        let s = self.spec;
        // Field tags keep "host=a app=bc" distinct from "host=ab app=c".
        if s.host {
            h.write(&[1]);
            h.write(r.hostname.as_deref().unwrap_or("").as_bytes());
        }
        if s.app {
            h.write(&[2]);
            h.write(r.app_name.as_deref().unwrap_or("").as_bytes());
        }
        if s.severity {
            h.write(&[3, r.severity.unwrap_or(0xff)]);
        }
        if s.facility {
            h.write(&[4, r.facility.unwrap_or(0xff)]);
        }
        if s.source {
            h.write(&[5]);
            match source {
                Some(std::net::IpAddr::V4(a)) => h.write(&a.octets()),
                Some(std::net::IpAddr::V6(a)) => h.write(&a.octets()),
                None => {}
            }
        }
        h.finish()
    }

    fn key_of(&self, r: &LogRecord<'_>, source: Option<std::net::IpAddr>) -> Key {
        let s = self.spec;
        Key {
            host: s
                .host
                .then(|| r.hostname.as_deref().map(str::to_owned))
                .flatten(),
            app: s
                .app
                .then(|| r.app_name.as_deref().map(str::to_owned))
                .flatten(),
            severity: s.severity.then_some(r.severity).flatten(),
            facility: s.facility.then_some(r.facility).flatten(),
            source: s.source.then_some(source).flatten(),
        }
    }

    /// Counts one decoded record received at `now_ns` from `source`.
    pub fn add(&mut self, r: &LogRecord<'_>, source: Option<std::net::IpAddr>, now_ns: i64) {
        self.records += 1;
        let key = self.key_id(r, source);
        if let Some(e) = self.keys.get_mut(&key) {
            e.1 += 1;
        } else if self.keys.len() < self.limits.max_keys {
            let k = self.key_of(r, source);
            self.keys.insert(key, (k, 1));
        } else {
            self.overflow_keys += 1;
        }
        let mut h = FixedState.build_hasher();
        h.write(&key.to_ne_bytes());
        h.write(r.message.as_bytes());
        let msg = h.finish();
        if let Some(d) = self.messages.get_mut(&msg) {
            d.count += 1;
            d.first_ns = d.first_ns.min(now_ns);
            d.last_ns = d.last_ns.max(now_ns);
        } else if self.messages.len() < self.limits.max_messages {
            let text: String = r
                .message
                .chars()
                .take(self.limits.max_message_len)
                .collect();
            self.messages.insert(
                msg,
                Dedup {
                    key,
                    message: text,
                    count: 1,
                    first_ns: now_ns,
                    last_ns: now_ns,
                },
            );
        } else {
            self.overflow_messages += 1;
            self.top_messages.add(msg, 1);
        }
    }

    /// Folds another worker's window for the same period into this one.
    pub fn merge(&mut self, other: &LogWindow) {
        self.records += other.records;
        self.overflow_keys += other.overflow_keys;
        self.overflow_messages += other.overflow_messages;
        for (&id, (k, n)) in &other.keys {
            if let Some(e) = self.keys.get_mut(&id) {
                e.1 += n;
            } else if self.keys.len() < self.limits.max_keys {
                self.keys.insert(id, (k.clone(), *n));
            } else {
                self.overflow_keys += n;
            }
        }
        for (&id, d) in &other.messages {
            if let Some(e) = self.messages.get_mut(&id) {
                e.count += d.count;
                e.first_ns = e.first_ns.min(d.first_ns);
                e.last_ns = e.last_ns.max(d.last_ns);
            } else if self.messages.len() < self.limits.max_messages {
                self.messages.insert(id, d.clone());
            } else {
                self.overflow_messages += d.count;
                self.top_messages.add(id, d.count);
            }
        }
        self.top_messages.merge(&other.top_messages);
    }

    /// An empty window with the same settings and start (the merge target).
    pub fn clone_empty(&self) -> LogWindow {
        LogWindow::new(self.spec, self.limits, self.start_ns)
    }

    /// The K most frequent messages, largest first: (id, estimate, maximum over-estimate).
    /// Messages in the exact table count exactly (plus, after a merge, whatever another
    /// worker could only summarise); the Space-Saving summary covers only what overflowed
    /// the table, so the common case costs no summary update per record.
    pub fn top_messages(&self) -> Vec<(u64, u64, u64)> {
        let mut v: Vec<(u64, u64, u64)> = self
            .messages
            .iter()
            .map(|(&id, d)| {
                let (est, err) = self.top_messages.estimate(id);
                (id, d.count + est, err)
            })
            .collect();
        v.extend(
            self.top_messages
                .top()
                .into_iter()
                .filter(|(id, ..)| !self.messages.contains_key(id)),
        );
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(self.limits.top_k.max(1));
        v
    }

    /// Records by key, largest first.
    pub fn counts(&self) -> Vec<(&Key, u64)> {
        let mut v: Vec<(&Key, u64)> = self.keys.values().map(|(k, n)| (k, *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::decode::decode;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn line(host: &str, app: &str, sev: u8, msg: &str) -> String {
        format!("<{}>Nov 24 02:43:00 {host} {app}: {msg}", 8 + sev)
    }

    #[test]
    fn counts_dedup_first_and_last_seen() {
        let mut w = LogWindow::new(KeySpec::default(), WindowLimits::default(), 0);
        let lines = [
            (line("a", "nginx", 6, "GET /"), 10),
            (line("a", "nginx", 6, "GET /"), 30),
            (line("a", "nginx", 3, "boom"), 20),
            (line("b", "nginx", 6, "GET /"), 40),
            (line("a", "nginx", 6, "GET /"), 5),
        ];
        for (l, t) in &lines {
            w.add(&decode(l.as_bytes(), 0), None, *t);
        }
        assert_eq!(w.records, 5);
        let counts = w.counts();
        assert_eq!(counts[0].1, 3);
        assert_eq!(counts[0].0.host.as_deref(), Some("a"));
        assert_eq!(counts[0].0.severity, Some(6));
        assert_eq!(counts.len(), 3);
        let get = |host: &str| {
            w.messages
                .values()
                .find(|d| d.message == "GET /" && w.keys[&d.key].0.host.as_deref() == Some(host))
                .cloned()
                .unwrap()
        };
        let d = get("a");
        assert_eq!((d.count, d.first_ns, d.last_ns), (3, 5, 30));
        assert_eq!(
            get("b").count,
            1,
            "same text under another key is another message"
        );
    }

    #[test]
    fn memory_is_bounded_and_overflow_counted() {
        let limits = WindowLimits {
            max_keys: 3,
            max_messages: 2,
            ..WindowLimits::default()
        };
        let mut w = LogWindow::new(KeySpec::default(), limits, 0);
        for i in 0..10 {
            w.add(
                &decode(
                    line(&format!("h{i}"), "x", 6, &format!("m{i}")).as_bytes(),
                    0,
                ),
                None,
                0,
            );
        }
        assert_eq!(w.keys.len(), 3);
        assert_eq!(w.overflow_keys, 7);
        assert_eq!(w.messages.len(), 2);
        assert_eq!(w.overflow_messages, 8);
        assert_eq!(w.records, 10, "every record counted");
    }

    /// Top messages come from the exact table (no error) and, for what overflowed it,
    /// from the Space-Saving summary (with its bound); a heavy hitter that arrives after
    /// the table filled is still ranked first, and merging two workers keeps both parts.
    #[test]
    fn top_messages_combine_exact_counts_and_the_overflow_summary() {
        let limits = WindowLimits {
            max_messages: 2,
            top_k: 3,
            ..WindowLimits::default()
        };
        let msg = |m: &str| line("h", "a", 6, m);
        let mut w = LogWindow::new(KeySpec::default(), limits, 0);
        for _ in 0..60 {
            w.add(&decode(msg("first").as_bytes(), 0), None, 0);
        }
        w.add(&decode(msg("second").as_bytes(), 0), None, 0);
        for i in 0..100 {
            w.add(&decode(msg("heavy").as_bytes(), 0), None, 0);
            // Rare overflowed messages churn the summary's other counters.
            w.add(&decode(msg(&format!("rare {i}")).as_bytes(), 0), None, 0);
        }
        let top = w.top_messages();
        assert_eq!(top.len(), 3);
        let heavy = top[0];
        assert!(heavy.1 >= 100 && heavy.1 - heavy.2 <= 100, "{top:?}");
        let exact: Vec<(u64, u64)> = top[1..].iter().map(|t| (t.1, t.2)).collect();
        assert!(
            exact.contains(&(60, 0)),
            "'first' counts exactly, with no error: {top:?}"
        );
        // The merge of two such windows ranks the heavy hitter first with the summed count.
        let mut m = w.clone_empty();
        m.merge(&w);
        m.merge(&w);
        let merged = m.top_messages();
        assert!(merged[0].1 >= 200, "{merged:?}");
        assert_eq!(merged[0].0, heavy.0);
    }

    /// Every eviction takes a counter holding the current minimum (what Space-Saving
    /// requires), though the minimum is found from a cached candidate list.
    #[test]
    fn evictions_take_a_true_minimum() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut t = TopK::new(8);
        for _ in 0..50_000 {
            let id = rng.random_range(0..40u64);
            let n = rng.random_range(1..4u64);
            let full = t.counters.len() == t.k;
            let min = t.counters.values().map(|c| c.0).min().unwrap_or(0);
            let fresh = !t.counters.contains_key(&id);
            t.add(id, n);
            if full && fresh {
                assert_eq!(t.counters[&id], (min + n, min));
                assert_eq!(t.counters.len(), t.k);
            }
        }
    }

    /// Space-Saving's guarantee on a skewed stream: every item more frequent than N/K is
    /// reported, its estimate is at least its true count and at most true + N/K.
    #[test]
    fn top_k_guarantee_on_a_zipf_like_stream() {
        let mut rng = StdRng::seed_from_u64(3);
        let k = 20;
        let mut top = TopK::new(k);
        let mut truth: HashMap<u64, u64> = HashMap::new();
        let n = 200_000u64;
        for _ in 0..n {
            // Item i with probability ~ 1/(i+1).
            let x: f64 = rng.random();
            let id = (1.0 / (x * 0.999 + 0.001)) as u64;
            top.add(id, 1);
            *truth.entry(id).or_default() += 1;
        }
        let reported = top.top();
        for (&id, &t) in &truth {
            let hit = reported.iter().find(|r| r.0 == id);
            if t > n / k as u64 {
                let (_, est, err) = *hit.unwrap_or_else(|| panic!("item {id} ({t} > N/K) missing"));
                assert!(
                    est >= t && est <= t + err && err <= n / k as u64,
                    "{id}: true {t} est {est} err {err}"
                );
            }
            if let Some(&(_, est, err)) = hit {
                assert!(
                    est >= t && est - err <= t,
                    "{id}: true {t} est {est} err {err}"
                );
            }
        }
    }

    /// Splitting a stream across workers and merging gives the same counts and dedup as
    /// one window over the whole stream.
    #[test]
    fn merging_worker_windows_equals_one_window() {
        let mut rng = StdRng::seed_from_u64(9);
        let lines: Vec<(String, i64)> = (0..5000)
            .map(|i| {
                (
                    line(
                        &format!("h{}", rng.random_range(0..7)),
                        "app",
                        rng.random_range(0..8),
                        &format!("m{}", rng.random_range(0..40)),
                    ),
                    i,
                )
            })
            .collect();
        let mut whole = LogWindow::new(KeySpec::default(), WindowLimits::default(), 0);
        let mut parts = [
            LogWindow::new(KeySpec::default(), WindowLimits::default(), 0),
            LogWindow::new(KeySpec::default(), WindowLimits::default(), 0),
        ];
        for (i, (l, t)) in lines.iter().enumerate() {
            let r = decode(l.as_bytes(), 0);
            whole.add(&r, None, *t);
            parts[i % 2].add(&r, None, *t);
        }
        let (a, b) = parts.split_at_mut(1);
        a[0].merge(&b[0]);
        let merged = &a[0];
        assert_eq!(merged.records, whole.records);
        assert_eq!(merged.counts(), whole.counts());
        let norm = |w: &LogWindow| {
            let mut v: Vec<(u64, u64, i64, i64)> = w
                .messages
                .iter()
                .map(|(&id, d)| (id, d.count, d.first_ns, d.last_ns))
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(norm(merged), norm(&whole));
    }
}

//! TCP stream forwarding on the io_uring engine (epoll where io_uring is not usable):
//! routes (listen address → upstream pool), one `SO_REUSEPORT` listener per worker with
//! multishot accept, a connect with a timeout (retried on another upstream before any
//! byte reached the client), then a copy of each direction until both are closed,
//! through pooled buffers or `splice`, or for client bytes on a NIC queue registered for
//! io_uring zero-copy receive, straight from that queue's memory.
//!
//! - [`worker`]: the per-CPU event loop and the per-connection state machines.
//! - [`ops`]: the operations a worker issues, carried out by io_uring or by epoll;
//!   [`ops::zcrx`]: the zero-copy receive queue.
//! - [`pool`] / [`balance`]: upstream health and counters; round robin, least
//!   connections, Maglev.
//! - [`health`]: active TCP health checks and the expiry of passive ejections.
//! - [`proxy_protocol`]: PROXY v1/v2 encoding and parsing.
//! - [`stats`]: counters, drop reasons, connect latency histograms.
pub mod balance;
pub mod health;
pub mod local;
pub mod ops;
pub mod pool;
pub mod proxy_protocol;
pub mod socket;
pub mod stats;
pub mod worker;

use std::{
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use balance::Algorithm;
use pool::{Upstream, UpstreamPool};
use stats::RouteStats;

/// How bytes are moved between the two sockets of a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CopyMode {
    /// Splice (measured faster), else provided buffers when pipes cannot be made.
    #[default]
    Auto,
    /// recv into a buffer from the worker's provided buffer ring, send from it.
    Buffers,
    /// splice through a pipe per direction (the payload never enters user space).
    Splice,
}

impl FromStr for CopyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "buffers" => Ok(Self::Buffers),
            "splice" => Ok(Self::Splice),
            other => Err(format!(
                "copy must be \"auto\", \"buffers\" or \"splice\", not {other:?}"
            )),
        }
    }
}

/// Whether client bytes are received through an io_uring zero-copy queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZeroCopyMode {
    #[default]
    Off,
    /// Use it where the queue can be registered; otherwise the copy path, with the
    /// kernel's reason logged and reported.
    Auto,
    /// Refuse to start without it.
    Require,
}

impl FromStr for ZeroCopyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            "require" => Ok(Self::Require),
            other => Err(format!(
                "zero_copy must be \"off\", \"auto\" or \"require\", not {other:?}"
            )),
        }
    }
}

/// Zero-copy receive: an rx queue of `interface` per worker, steered to by the operator
/// (flow rules), registered with the worker's ring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZeroCopySettings {
    pub mode: ZeroCopyMode,
    pub interface: Option<String>,
    /// One rx queue per worker, in the order of the data CPUs.
    pub queues: Vec<u32>,
    /// Receive memory per worker, bytes.
    pub area_bytes: usize,
    /// Refill ring entries per worker (a power of two).
    pub refill_entries: u32,
}

impl ZeroCopySettings {
    pub const DEFAULT_AREA_MIB: usize = 64;
    pub const DEFAULT_REFILL_ENTRIES: u32 = 8192;
}

/// Settings shared by every route.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpSettings {
    pub copy: CopyMode,
    /// Size of one provided buffer: the most one direction of a connection holds.
    pub buffer_size: usize,
    /// Provided buffers per worker (a power of two): bounds the memory of all
    /// connections together; a direction waits (counted) when none is free.
    pub buffers: u16,
    /// Pipe capacity per direction on the splice path.
    pub pipe_size: usize,
    /// Send buffer of connections whose peer is on this host and which run the system's
    /// congestion control (`local_congestion` off or refused; 0: the kernel's autotuning
    /// for every connection).
    pub local_sndbuf: usize,
    /// Congestion control of connections to peers on this host: upstream sockets get it
    /// before they connect, clients from their listener (`None`: the system's,
    /// `net.ipv4.tcp_congestion_control`). Such sockets keep autotuning.
    pub local_congestion: Option<String>,
    /// Under bulk traffic, how long a worker's wait may gather completions before it
    /// handles the first (µs; 0: wake at each; io_uring on kernels ≥ 6.12).
    pub coalesce_usec: u32,
    /// How long a worker with nothing to do polls for completions before it sleeps (µs;
    /// 0: it sleeps at once). Polling spends its core to save the wake-ups.
    pub busy_poll_usec: u32,
    /// The same, but only within a millisecond of a pass that moved bulk traffic (µs;
    /// 0: never, and bulk waits gather for `coalesce_usec` instead).
    pub bulk_poll_usec: u32,
    /// How long open connections may finish after SIGTERM before they are reset.
    pub drain: Duration,
    /// Fixed at start: a reload does not register or release queues.
    pub zero_copy: ZeroCopySettings,
}

impl Default for TcpSettings {
    fn default() -> Self {
        Self {
            copy: CopyMode::Auto,
            // Measured (one iperf3 stream through loopback, 2026-12-01): 32 KiB moved
            // 16–17 Gbit/s, 64 KiB only 9.5–10. A 64 KiB send is one MSS (65,483 on
            // loopback) plus a 53-byte segment, which doubles the packets and wake-ups
            // downstream; 32 KiB fits one segment and stays in cache.
            buffer_size: 32 * 1024,
            // 4 MiB per worker: the bound on what all connections of a worker hold at
            // once. (128 also moved 6–12% more than 512 over eight streams while io_uring
            // still posted the whole pool; it now posts a hot subset, see ops::uring.)
            buffers: 128,
            // 256 KiB moved 4–10% more than 64 KiB (same run) with a third less proxy
            // CPU: fewer splice calls per byte and fewer short tail segments.
            pipe_size: 256 * 1024,
            // A peer on this host is microseconds away, so 256 KiB (doubled by the
            // kernel after clamping at net.core.wmem_max: 416–512 KiB) never limits its
            // window, and what the proxy writes
            // leaves at once, in the proxy's own system call and on its core, instead of
            // queueing behind the window and going out later from the ACK path on the
            // peer's core (which on loopback also reorders segments). Measured with one
            // iperf3 stream through loopback (2026-12-01): 17.6–22.2 Gbit/s against
            // 13.7–15.7 with autotuning, eight streams 15.2–15.8 against 12.5–15.1, the
            // reverse direction 17.9–19.0 against 15.4–16.1. All of that with BBR, the
            // system's here: with reno on both sides (`local_congestion`) autotuning
            // moved more (one stream 29.8–31.7 against 18.5–20.7 fixed, reverse
            // 29.3–31.2 against 19.1–19.7; 2026-12-02), so only sockets that run the
            // system's get it.
            local_sndbuf: 256 * 1024,
            // reno, because a connection within this host crosses no link and loses
            // nothing, so a congestion control earns it nothing, but BBR (a common
            // system default, and this machine's) paces every connection, and pacing
            // arms a timer per burst, costly in a VM. iperf3 through loopback with BBR
            // as the system's (2026-12-02, four alternating rounds of 4 s): reno (and
            // autotuning) on both of the proxy's sides 29.1–33.3 Gbit/s on one stream,
            // 23.7–24.3 on eight, 30.7–32.3 and 23.9–25.5 in reverse, against 16.4–19.4,
            // 16.7–20.9, 15.1–19.2 and 15.6–21.1 with the system's (and the fixed
            // send buffer). See the README's section on it.
            local_congestion: Some("reno".to_owned()),
            // 20 µs: eight alternating manual pairs of eight iperf3 streams
            // (2026-12-01): +15% when the worker would otherwise sleep and be woken
            // ~7,000 times a second, -2% when it is busy anyway; only passes that
            // forwarded a full segment or more make the next wait gather, so
            // interactive traffic still wakes the worker at once.
            coalesce_usec: 20,
            // Off, as HAProxy's `busy-polling`: a polling worker keeps its core busy
            // whenever traffic is light (see the README's busy polling section).
            busy_poll_usec: 0,
            // 200 µs, only while bulk traffic flows: one iperf3 stream through loopback,
            // eight alternating rounds (2026-12-02), median 18.75 Gbit/s against 16.40
            // gathering (0.95 and 0.83 of direct's 19.71), at ~1.6× the proxy CPU of
            // that transfer; 1,000 and 5,000 paced 64-byte round trips/s never trigger
            // it (proxy CPU 43 and 174 ticks/5 s against 41 and 167 off, against 143 and
            // 459 with `busy_poll_usec = 200`).
            bulk_poll_usec: 200,
            drain: Duration::from_secs(30),
            // 64 MiB: the NIC's page pool for the queue (a few thousand pages) plus
            // what connections hold; the selftests' 8,192-entry refill ring.
            zero_copy: ZeroCopySettings {
                area_bytes: ZeroCopySettings::DEFAULT_AREA_MIB << 20,
                refill_entries: ZeroCopySettings::DEFAULT_REFILL_ENTRIES,
                ..ZeroCopySettings::default()
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// As written (a name is resolved when the configuration is loaded).
    pub configured: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// 0 = unlimited.
    pub max_connections: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSpec {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down upstream up.
    pub rise: u32,
    /// Consecutive failures that take an up upstream down.
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub name: String,
    pub listen: SocketAddr,
    pub upstreams: Vec<UpstreamSpec>,
    pub balance: Algorithm,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// 0 = unlimited.
    pub max_connections: u32,
    pub send_proxy: Option<proxy_protocol::Version>,
    pub accept_proxy: bool,
    /// With `accept_proxy`: how long a client has to send its whole PROXY header.
    pub proxy_header_timeout: Duration,
    pub eject_after: u32,
    pub eject_for: Duration,
    pub health: Option<HealthSpec>,
}

/// A route as the workers use it: its spec, pool and counters.
#[derive(Debug)]
pub struct Route {
    pub spec: RouteSpec,
    pub pool: UpstreamPool,
    pub stats: Arc<RouteStats>,
}

/// One immutable set of routes; a reload publishes a new one.
#[derive(Debug)]
pub struct Routes {
    pub generation: u64,
    pub routes: Vec<Arc<Route>>,
    pub settings: TcpSettings,
}

impl Routes {
    /// Builds routes from specs, keeping from `previous` the counters of routes with the
    /// same name and the upstreams (health, counters) with the same address, weight and
    /// limit, so a reload neither resets statistics nor forgets an ejection.
    pub fn build(specs: &[RouteSpec], settings: TcpSettings, previous: Option<&Routes>) -> Self {
        let routes = specs
            .iter()
            .map(|spec| {
                let old = previous.and_then(|p| p.routes.iter().find(|r| r.spec.name == spec.name));
                let upstreams = spec
                    .upstreams
                    .iter()
                    .map(|u| {
                        old.and_then(|r| {
                            r.pool.upstreams.iter().find(|o| {
                                o.address == u.address
                                    && o.weight == u.weight
                                    && o.max_connections == u.max_connections
                            })
                        })
                        .map_or_else(
                            || {
                                Arc::new(Upstream::new(
                                    u.address,
                                    u.configured.clone(),
                                    u.weight,
                                    u.max_connections,
                                ))
                            },
                            Arc::clone,
                        )
                    })
                    .collect();
                Arc::new(Route {
                    spec: spec.clone(),
                    pool: UpstreamPool::new(upstreams, spec.eject_after, spec.eject_for),
                    stats: old.map_or_else(Default::default, |r| Arc::clone(&r.stats)),
                })
            })
            .collect();
        Self {
            generation: previous.map_or(1, |p| p.generation + 1),
            routes,
            settings,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        self.routes
            .iter()
            .map(|r| {
                let s = &r.stats;
                serde_json::json!({
                    "name": r.spec.name,
                    "listen": r.spec.listen.to_string(),
                    "balance": r.spec.balance.name(),
                    "active": s.active.load(Ordering::Relaxed),
                    "accepted": s.accepted.load(Ordering::Relaxed),
                    "refused": s.refused.json(),
                    "upstreams": r.pool.upstreams.iter().map(|u| serde_json::json!({
                        "address": u.address.to_string(),
                        "configured": u.configured,
                        "weight": u.weight,
                        "healthy": u.healthy(),
                        "active": u.active.load(Ordering::Relaxed),
                        "connections": u.stats.connections.load(Ordering::Relaxed),
                        "bytes_up": u.stats.bytes_up.load(Ordering::Relaxed),
                        "bytes_down": u.stats.bytes_down.load(Ordering::Relaxed),
                        "ejections": u.stats.ejections.load(Ordering::Relaxed),
                        "connect_latency": u.stats.connect_latency.json(),
                        "errors": u.stats.errors.json(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect()
    }
}

/// The routes workers follow: replaced as a whole on reload.
pub struct SharedRoutes {
    current: Mutex<Arc<Routes>>,
    generation: AtomicU64,
    /// What each worker reports back.
    workers: Mutex<Vec<Arc<WorkerBoard>>>,
    /// Where forwarding is in its life ([`Lifecycle`]), for readiness probes.
    lifecycle: AtomicU8,
    /// Set by a second stop signal: draining workers reset what is still open now
    /// instead of at the drain deadline.
    drain_cut: AtomicBool,
    /// Connections open across workers against what the descriptor limit allows.
    pub budget: crate::limits::ConnectionBudget,
}

/// Where TCP forwarding is in its life: what `/ready` answers.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Binding listeners and starting workers.
    Starting = 0,
    /// Every worker accepts.
    Serving = 1,
    /// Stopping: listeners closed, open connections finishing (up to the drain deadline).
    Draining = 2,
    /// Every worker has ended (or forwarding never started).
    Stopped = 3,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 4] = [
        Lifecycle::Starting,
        Lifecycle::Serving,
        Lifecycle::Draining,
        Lifecycle::Stopped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Starting => "starting",
            Lifecycle::Serving => "serving",
            Lifecycle::Draining => "draining",
            Lifecycle::Stopped => "stopped",
        }
    }
}

/// What one worker reports back to the control thread.
#[derive(Debug, Default)]
pub struct WorkerBoard {
    /// The generation of routes it applied (so a reload can be confirmed).
    pub applied: AtomicU64,
    /// Its counters as it last published them (every sweep, for `/metrics`).
    pub stats: Mutex<WorkerStats>,
}

impl SharedRoutes {
    pub fn new(routes: Routes) -> Arc<Self> {
        Arc::new(Self {
            generation: AtomicU64::new(routes.generation),
            current: Mutex::new(Arc::new(routes)),
            workers: Mutex::new(Vec::new()),
            lifecycle: AtomicU8::new(Lifecycle::Starting as u8),
            drain_cut: AtomicBool::new(false),
            budget: crate::limits::ConnectionBudget::new(0),
        })
    }

    pub fn lifecycle(&self) -> Lifecycle {
        match self.lifecycle.load(Ordering::Acquire) {
            0 => Lifecycle::Starting,
            1 => Lifecycle::Serving,
            2 => Lifecycle::Draining,
            _ => Lifecycle::Stopped,
        }
    }

    /// Ends the drain now: workers reset their open connections (counted as
    /// `drain_deadline`) at their next sweep.
    pub fn cut_drain(&self) {
        self.drain_cut.store(true, Ordering::Release);
    }

    pub fn drain_cut(&self) -> bool {
        self.drain_cut.load(Ordering::Acquire)
    }

    /// Moves forward to `to`, never back (a worker that starts draining after forwarding
    /// stopped leaves it stopped).
    pub fn advance(&self, to: Lifecycle) {
        self.lifecycle.fetch_max(to as u8, Ordering::AcqRel);
    }

    /// The counters every worker last published.
    pub fn worker_stats(&self) -> Vec<WorkerStats> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|w| w.stats.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// A worker's board, starting at the generation it was built from.
    pub fn register_worker(&self, generation: u64) -> Arc<WorkerBoard> {
        let slot = Arc::new(WorkerBoard {
            applied: AtomicU64::new(generation),
            stats: Mutex::default(),
        });
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&slot));
        slot
    }

    /// Waits (up to `limit`) until every worker applied `generation`; whether they did.
    pub fn wait_applied(&self, generation: u64, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let done = self
                .workers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .all(|w| w.applied.load(Ordering::Acquire) >= generation);
            if done {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Cheap check for workers: has anything been published since `seen`?
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn latest(&self) -> Arc<Routes> {
        Arc::clone(&self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Publishes routes built from `specs` (counters and health carried over).
    pub fn publish(&self, specs: &[RouteSpec], settings: TcpSettings) -> Arc<Routes> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let next = Arc::new(Routes::build(specs, settings, Some(&cur)));
        *cur = Arc::clone(&next);
        self.generation.store(next.generation, Ordering::Release);
        next
    }
}

pub use worker::{TcpSummary, WorkerStats, run};

//! Receive → frame → decode → aggregate, on pinned workers; windows merged at close.
//!
//! Each worker thread is pinned to one data CPU, owns its sockets (one SO_REUSEPORT
//! socket per listener) and its receive backend, and keeps a partial [`LogWindow`]. At
//! each window boundary it sends the partial window through a bounded channel (a slow
//! consumer blocks the worker, and the kernel's socket queues absorb, then count, the
//! excess — nothing is dropped unaccounted); the merger combines the partials of one
//! window once every worker has reported it.
use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::{
    aggregate::{KeySpec, LogWindow, WindowLimits},
    decode::{Format, decode},
    encode::{RawMessage, Rfc5424Encoder},
    framing::Frames,
};
use crate::config::OutputFormat;
use crate::engine::{self, BackendChoice, BackendStats, ReceiveConfig, socket};
use crate::report::http::HttpSamples;

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub listeners: Vec<SocketAddr>,
    /// CPUs to run one worker each on.
    pub data_cpus: Vec<usize>,
    pub backend: BackendChoice,
    pub receive: ReceiveConfig,
    pub rcvbuf: Option<usize>,
    pub window: Duration,
    pub key: KeySpec,
    pub limits: WindowLimits,
    /// Longest message kept; longer ones are cut and counted.
    pub max_message: usize,
    /// Pin directory of a running data plane whose captured datagrams also enter the
    /// pipeline (from its record rings), tagged with their source address.
    pub capture_from: Option<std::path::PathBuf>,
    /// Messages (partial windows, raw batches) each worker may have queued for the
    /// merger; a worker whose queue is full waits, and its sockets absorb (then count)
    /// the excess.
    pub merger_queue: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            listeners: Vec::new(),
            data_cpus: crate::cpus::default_data_cpus(),
            backend: BackendChoice::Auto,
            receive: ReceiveConfig::default(),
            rcvbuf: Some(8 << 20),
            window: Duration::from_secs(10),
            key: KeySpec::default(),
            limits: WindowLimits::default(),
            max_message: 8192,
            capture_from: None,
            merger_queue: 16,
        }
    }
}

/// The configuration in force, swapped whole on reload. Workers switch to a new
/// snapshot exactly at `effective_from_ns`, a window boundary on the old grid, so all of
/// them change window length, key or listeners at the same boundary and the window in
/// progress completes under the settings it started with.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub pipeline: PipelineConfig,
    pub sinks: Vec<crate::config::SinkSpec>,
    pub effective_from_ns: i64,
}

/// Where the control thread publishes snapshots and workers pick them up (a lock taken
/// once per window close, never per message).
pub struct SharedConfig(std::sync::Mutex<Arc<Snapshot>>);

impl SharedConfig {
    pub fn new(pipeline: PipelineConfig, sinks: Vec<crate::config::SinkSpec>) -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(Arc::new(Snapshot {
            generation: 0,
            pipeline,
            sinks,
            effective_from_ns: 0,
        }))))
    }

    pub fn latest(&self) -> Arc<Snapshot> {
        Arc::clone(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Publishes a new configuration, effective from the first boundary of the current
    /// window grid at least `margin` from now. Worker count changes need a restart.
    pub fn publish(
        &self,
        mut pipeline: PipelineConfig,
        sinks: Vec<crate::config::SinkSpec>,
        margin: Duration,
    ) -> Arc<Snapshot> {
        let mut cur = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pipeline.data_cpus != cur.pipeline.data_cpus {
            tracing::warn!(
                "data_cpus changes need a restart; keeping {:?}",
                cur.pipeline.data_cpus
            );
            pipeline.data_cpus = cur.pipeline.data_cpus.clone();
        }
        let win = cur.pipeline.window.as_nanos().max(1) as i64;
        let anchor = cur.effective_from_ns;
        let at = now_ns() + margin.as_nanos() as i64;
        let effective_from_ns = anchor + (at - anchor).div_euclid(win) * win + win;
        let next = Arc::new(Snapshot {
            generation: cur.generation + 1,
            pipeline,
            sinks,
            effective_from_ns,
        });
        *cur = Arc::clone(&next);
        next
    }
}

/// Message-level accounting of one worker for one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MessageCounts {
    pub datagrams: u64,
    /// Datagrams that came from the data plane's capture rings (also in `datagrams`).
    pub captured: u64,
    /// Sample records in the rings (not log traffic; counted, skipped).
    pub samples_skipped: u64,
    /// Ring records that did not parse (a data plane from another version); dropped.
    pub records_bad: u64,
    /// Drains that found another process reading the same record ring.
    pub ring_other_reader: u64,
    /// Times reading a ring skipped over something that was not a record.
    pub ring_skips: u64,
    pub messages: u64,
    pub rfc5424: u64,
    pub rfc3164: u64,
    pub json: u64,
    pub plain: u64,
    pub invalid_utf8: u64,
    pub truncated: u64,
}

impl MessageCounts {
    fn add(&mut self, o: &MessageCounts) {
        self.datagrams += o.datagrams;
        self.captured += o.captured;
        self.samples_skipped += o.samples_skipped;
        self.records_bad += o.records_bad;
        self.ring_other_reader += o.ring_other_reader;
        self.ring_skips += o.ring_skips;
        self.messages += o.messages;
        self.rfc5424 += o.rfc5424;
        self.rfc3164 += o.rfc3164;
        self.json += o.json;
        self.plain += o.plain;
        self.invalid_utf8 += o.invalid_utf8;
        self.truncated += o.truncated;
    }
}

/// What workers send the merger, in order per worker.
pub enum ToMerger {
    Partial(Box<Partial>),
    Raw(RawBatch),
}

/// Raw messages of one worker, encoded in each format a sink of `generation` wants.
pub struct RawBatch {
    /// The configuration the messages were received under: they go to its sinks.
    pub generation: u64,
    pub records: u64,
    /// The messages in each format of [`OutputFormat::ALL`] a sink wants (`None`: none does).
    pub encoded: [Option<Vec<u8>>; OutputFormat::ALL.len()],
}

impl RawBatch {
    fn bytes(&self, format: OutputFormat) -> Option<&[u8]> {
        self.encoded[format.index()].as_deref()
    }

    fn len(&self) -> usize {
        self.encoded.iter().flatten().map(Vec::len).sum()
    }
}

/// Raw messages of one worker, batched so a sink write (and a channel send) covers many.
struct RawOut {
    batch: RawBatch,
    rfc5424: Rfc5424Encoder,
    out: mpsc::SyncSender<ToMerger>,
}

const RAW_BATCH: usize = 64 * 1024;

impl RawOut {
    /// `None` when no sink of `snap` takes raw messages.
    fn new(snap: &Snapshot, out: &mpsc::SyncSender<ToMerger>) -> Option<Self> {
        let batch = RawBatch {
            generation: snap.generation,
            records: 0,
            encoded: OutputFormat::ALL.map(|f| {
                snap.sinks
                    .iter()
                    .any(|s| s.what.raw() && s.format == f)
                    .then(|| Vec::with_capacity(RAW_BATCH + 4096))
            }),
        };
        batch.encoded.iter().any(Option::is_some).then(|| RawOut {
            batch,
            rfc5424: Rfc5424Encoder::default(),
            out: out.clone(),
        })
    }

    fn add(&mut self, m: &RawMessage<'_, '_>) {
        let b = &mut self.batch;
        for (f, out) in OutputFormat::ALL.iter().zip(&mut b.encoded) {
            let Some(out) = out.as_mut() else { continue };
            match f {
                OutputFormat::Json => super::encode::json(m, out),
                OutputFormat::Rfc5424 => self.rfc5424.message(m, out),
                OutputFormat::Text => super::encode::text(m, out),
            }
        }
        b.records += 1;
        if b.len() >= RAW_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.records == 0 {
            return;
        }
        let b = &mut self.batch;
        let fresh = RawBatch {
            generation: b.generation,
            records: 0,
            encoded: std::array::from_fn(|i| {
                b.encoded[i]
                    .as_ref()
                    .map(|_| Vec::with_capacity(RAW_BATCH + 4096))
            }),
        };
        let full = std::mem::replace(b, fresh);
        // A closed channel means the merger is gone (shutdown); nothing to deliver to.
        let _ = self.out.send(ToMerger::Raw(full));
    }
}

/// Everything a worker accumulates per window; both ingest paths (sockets and capture
/// rings) feed it through [`Acc::add`].
struct Acc {
    window: LogWindow,
    counts: MessageCounts,
    raw: Option<RawOut>,
}

impl Acc {
    fn add(
        &mut self,
        rec: &super::decode::LogRecord<'_>,
        source: Option<std::net::IpAddr>,
        rx: i64,
        truncated: bool,
        captured: bool,
    ) {
        count_message(&mut self.counts, rec, truncated);
        self.window.add(rec, source, rx);
        if let Some(raw) = self.raw.as_mut() {
            raw.add(&RawMessage {
                rec,
                source,
                received_ns: rx,
                captured,
            });
        }
    }
}

/// One worker's share of one window.
pub struct Partial {
    pub worker: usize,
    pub window: LogWindow,
    pub counts: MessageCounts,
    /// How late the worker closed the window after its boundary (timer jitter).
    pub close_lag_ns: i64,
}

/// A window, merged over all workers.
pub struct WindowReport {
    pub start_ns: i64,
    pub window: LogWindow,
    pub counts: MessageCounts,
    /// The latest any worker closed this window after its boundary.
    pub close_lag_max_ns: i64,
}

pub struct WorkerSummary {
    pub worker: usize,
    pub cpu: usize,
    pub backend: &'static str,
    pub fallback_reason: Option<String>,
    pub stats: BackendStats,
    pub kernel_drops: u64,
    /// Of `kernel_drops`, those counted once the stop began: datagrams that arrived after
    /// the sockets were closed to new ones ([`socket::refuse_new`]), or overflowed meanwhile.
    pub drops_at_stop: u64,
    /// SO_MEMINFO drops of this worker's socket for each listener (sockets a reload
    /// closed included).
    pub drops_by_listener: Vec<(SocketAddr, u64)>,
    /// HTTP request lines in the TCP samples this worker drained.
    pub http: HttpSamples,
}

/// What a pipeline run ends with, for the caller's report.
pub struct PipelineOutcome {
    pub counts: MessageCounts,
    /// HTTP request lines in the TCP samples the workers drained (`run --logs`: the
    /// workers, not the drain thread, read the rings).
    pub http: HttpSamples,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Where captured datagrams come from, if anywhere.
pub enum CaptureSource {
    /// No capture ingest.
    None,
    /// The pinned rings of a data plane run by another process (`logs --capture-from`),
    /// or the configuration's `capture_from`.
    Pinned(std::path::PathBuf),
    /// The rings of a data plane in this process (`run` with the log pipeline).
    Rings(crate::dataplane::Records),
}

/// The running workers, and the lock their capture rings are read under (pinned rings).
pub struct Workers {
    pub handles: Vec<thread::JoinHandle<io::Result<WorkerSummary>>>,
    pub ring_reader: Option<Arc<crate::dataplane::RingReaderLock>>,
}

/// Starts one worker per data CPU. Partials go to `out`; workers stop when `stop` is set
/// (after sending their last partial window).
pub fn spawn(
    shared: &Arc<SharedConfig>,
    captures: CaptureSource,
    out: mpsc::SyncSender<ToMerger>,
    stop: Arc<AtomicBool>,
) -> io::Result<Workers> {
    let snap = shared.latest();
    let cfg = &snap.pipeline;
    let workers = cfg.data_cpus.len().max(1);
    // Another process's data plane (pinned) is watched for replacement (`ring_reader`);
    // our own is not.
    let (records, ring_reader) = match captures {
        CaptureSource::None => (None, None),
        CaptureSource::Rings(r) => (Some(r), None),
        CaptureSource::Pinned(dir) => {
            // One reader per ring: wait briefly for a reader that is stopping, refuse
            // if another keeps them.
            if !dir.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no data plane is pinned in {} (`edgeproxy run --iface IFACE` pins it under --pin-root/IFACE)",
                        dir.display()
                    ),
                ));
            }
            let lock = crate::dataplane::RingReaderLock::open(&dir)
                .and_then(|l| l.take_for_life(crate::dataplane::RING_LOCK_PATIENCE))
                .map_err(io::Error::other)?;
            let (per_cpu, shared_ring) =
                crate::dataplane::open_pinned_rings(&dir).map_err(|e| {
                    io::Error::other(format!(
                        "opening the capture rings in {}: {e}",
                        dir.display()
                    ))
                })?;
            let records = crate::dataplane::Records::from_rings(shared_ring, per_cpu)
                .map_err(io::Error::other)?
                .hold(lock);
            let reader = records.reader();
            (Some(records), reader)
        }
    };
    // Ring of CPU c to the worker pinned on c if there is one, else to c mod workers; the
    // shared fallback ring to worker 0. Every ring has exactly one consumer.
    let per_worker = match records {
        Some(r) => {
            let split = r.split(workers, |cpu| match cpu {
                None => 0,
                Some(c) => cfg
                    .data_cpus
                    .iter()
                    .position(|&d| d == c as usize)
                    .unwrap_or(c as usize % workers),
            });
            tracing::info!(
                rings_per_worker = ?split.iter().map(|r| r.as_ref().map_or(0, |r| r.ring_count())).collect::<Vec<_>>(),
                "capture rings assigned"
            );
            split
        }
        None => (0..workers).map(|_| None).collect(),
    };
    let mut handles = Vec::new();
    for ((worker, &cpu), records) in cfg.data_cpus.iter().enumerate().zip(per_worker) {
        // Sockets are bound here, so a bad address fails the start, not a worker later.
        let sockets = bind_all(&cfg.listeners, cfg.rcvbuf, &mut Vec::new())?;
        let shared = Arc::clone(shared);
        let out = out.clone();
        let stop = Arc::clone(&stop);
        handles.push(
            thread::Builder::new()
                .name(format!("ep-worker-{worker}"))
                .spawn(move || worker_loop(worker, cpu, sockets, records, &shared, &out, &stop))?,
        );
    }
    Ok(Workers {
        handles,
        ring_reader,
    })
}

/// One socket per listener, re-using (duplicating) those already open in `have`.
fn bind_all(
    listeners: &[SocketAddr],
    rcvbuf: Option<usize>,
    have: &mut Vec<(SocketAddr, std::net::UdpSocket)>,
) -> io::Result<Vec<(SocketAddr, std::net::UdpSocket)>> {
    listeners
        .iter()
        .map(|a| match have.iter().position(|(h, _)| h == a) {
            Some(i) => Ok((*a, have.swap_remove(i).1)),
            None => socket::udp_reuseport(*a, rcvbuf).map(|s| (*a, s)),
        })
        .collect()
}

fn open_backend(
    cfg: &PipelineConfig,
    sockets: &[(SocketAddr, std::net::UdpSocket)],
) -> io::Result<(Box<dyn engine::ReceiveBackend + Send>, Option<String>)> {
    let dups = sockets
        .iter()
        .map(|(_, s)| s.try_clone())
        .collect::<io::Result<Vec<_>>>()?;
    engine::open(cfg.backend, dups, cfg.receive)
}

fn worker_loop(
    worker: usize,
    cpu: usize,
    mut sockets: Vec<(SocketAddr, std::net::UdpSocket)>,
    mut records: Option<crate::dataplane::Records>,
    shared: &SharedConfig,
    out: &mpsc::SyncSender<ToMerger>,
    stop: &AtomicBool,
) -> io::Result<WorkerSummary> {
    crate::cpus::pin(cpu);
    let mut snap = shared.latest();
    // Created on this thread: an io_uring ring with SINGLE_ISSUER belongs to its creator.
    let (mut backend, fallback_reason) = open_backend(&snap.pipeline, &sockets)?;
    let ring_fds: Vec<std::os::fd::RawFd> = records.as_ref().map_or_else(Vec::new, |r| {
        use std::os::fd::AsRawFd as _;
        r.fds().iter().map(|f| f.as_raw_fd()).collect()
    });
    for fd in &ring_fds {
        backend.watch(*fd)?;
    }
    let mut stats = BackendStats::default();
    let mut win_ns = snap.pipeline.window.as_nanos().max(1) as i64;
    let mut start = grid(&snap, win_ns, now_ns());
    let new_raw = |snap: &Snapshot| RawOut::new(snap, out);
    let mut acc = Acc {
        window: LogWindow::new(snap.pipeline.key, snap.pipeline.limits, start),
        counts: MessageCounts::default(),
        raw: new_raw(&snap),
    };
    let mut busy = false;
    let mut http = HttpSamples::default();
    // SO_MEMINFO drops of sockets a reload closed, and the total when the stop began.
    let mut retired_drops: Vec<(SocketAddr, u64)> = Vec::new();
    let mut drops_before_stop = 0;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let now = now_ns();
        let until_close = Duration::from_nanos((start + win_ns - now).max(0) as u64);
        let timeout = until_close.min(Duration::from_millis(10));
        let n = if stopping {
            // The last read: sockets closed to new datagrams (the kernel counts those as
            // drops), then everything the backend or the queues hold, bounded in time.
            drops_before_stop = sockets.iter().map(|(_, s)| drops_of(s)).sum();
            refuse_new(worker, sockets.iter());
            finish(&mut *backend, &snap.pipeline, &mut acc)
        } else if busy {
            // Under load, let the sockets queue for a quantum and take everything at
            // once: being woken per datagram costs an IPI and a context switch, more
            // than the datagrams each wake-up brings. Idle, readiness wakes us as usual.
            thread::sleep(BUSY_QUANTUM.min(until_close));
            drain_sockets(&mut *backend, &snap.pipeline, &mut acc)?
        } else {
            receive(&mut *backend, timeout, &snap.pipeline, &mut acc)?
        };
        busy = n >= BUSY_BATCH && backend.coalesce_when_busy();
        if let Some(r) = records.as_mut() {
            // Readiness only wakes the poll; records below the wake-up threshold are read
            // on every pass anyway (a memory load when the ring is empty).
            drain_captures(r, &snap.pipeline, &mut acc, &mut http);
        }
        let now = now_ns();
        if now >= start + win_ns || stopping {
            let mut next = grid(&snap, win_ns, now);
            let latest = shared.latest();
            let switch =
                latest.generation != snap.generation && start + win_ns >= latest.effective_from_ns;
            if switch && latest.pipeline.listeners != snap.pipeline.listeners {
                // Finish what the old backend and sockets hold, into the closing window,
                // then rebuild. Sockets of dropped listeners refuse new datagrams first, so
                // nothing reaches them between the drain and their closing uncounted.
                let dropped = |(a, _): &&(SocketAddr, _)| !latest.pipeline.listeners.contains(a);
                refuse_new(worker, sockets.iter().filter(dropped));
                finish(&mut *backend, &snap.pipeline, &mut acc);
                retired_drops.extend(
                    sockets
                        .iter()
                        .filter(dropped)
                        .map(|(a, s)| (*a, drops_of(s))),
                );
                sockets = bind_all(
                    &latest.pipeline.listeners,
                    latest.pipeline.rcvbuf,
                    &mut sockets,
                )?;
                stats.add(&backend.stats());
                backend = open_backend(&latest.pipeline, &sockets)?.0;
                for fd in &ring_fds {
                    backend.watch(*fd)?;
                }
                tracing::info!(worker, listeners = ?latest.pipeline.listeners, "listeners changed");
            }
            // Raw lines of this window go out before its aggregate.
            if let Some(raw) = acc.raw.as_mut() {
                raw.flush();
            }
            let c = std::mem::take(&mut acc.counts);
            // A final partial cut short by a stop is not late.
            let close_lag_ns = (now - (start + win_ns)).max(0);
            if switch {
                snap = latest;
                win_ns = snap.pipeline.window.as_nanos().max(1) as i64;
                next = grid(&snap, win_ns, now);
                acc.raw = new_raw(&snap);
            }
            let done = std::mem::replace(
                &mut acc.window,
                LogWindow::new(snap.pipeline.key, snap.pipeline.limits, next),
            );
            if out
                .send(ToMerger::Partial(Box::new(Partial {
                    worker,
                    window: done,
                    counts: c,
                    close_lag_ns,
                })))
                .is_err()
            {
                break;
            }
            start = next;
        }
        if stopping {
            break;
        }
    }
    stats.add(&backend.stats());
    let mut drops_by_listener: Vec<(SocketAddr, u64)> =
        sockets.iter().map(|(a, s)| (*a, drops_of(s))).collect();
    let drops_now: u64 = drops_by_listener.iter().map(|(_, d)| d).sum();
    drops_by_listener.extend(retired_drops);
    Ok(WorkerSummary {
        worker,
        cpu,
        backend: backend.name(),
        fallback_reason,
        stats,
        kernel_drops: drops_by_listener.iter().map(|(_, d)| d).sum(),
        drops_at_stop: drops_now.saturating_sub(drops_before_stop),
        drops_by_listener,
        http,
    })
}

/// Closes each socket to new datagrams ([`socket::refuse_new`]) before its last drain.
fn refuse_new<'a>(
    worker: usize,
    sockets: impl Iterator<Item = &'a (SocketAddr, std::net::UdpSocket)>,
) {
    for (a, s) in sockets {
        if let Err(e) = socket::refuse_new(s) {
            tracing::warn!(worker, listener = %a, error = %e,
                "could not close a socket to new datagrams before its last drain; some arriving meanwhile may go uncounted");
        }
    }
}

fn drops_of(s: &std::net::UdpSocket) -> u64 {
    socket::kernel_drops(s).map_or(0, u64::from)
}

/// Ends the backend's receiving ([`engine::ReceiveBackend::finish`]): everything it or
/// the sockets still hold is processed into `acc`, within [`engine::STOP_DRAIN`]; what
/// is left past that is counted in the backend's `left_at_stop`. Returns the datagrams
/// processed.
fn finish(backend: &mut dyn engine::ReceiveBackend, cfg: &PipelineConfig, acc: &mut Acc) -> usize {
    let before = backend.stats().datagrams;
    let mut batch_rx = None;
    backend.finish(std::time::Instant::now() + engine::STOP_DRAIN, &mut |d| {
        ingest(acc, cfg, &mut batch_rx, d)
    });
    usize::try_from(backend.stats().datagrams - before).unwrap_or(usize::MAX)
}

/// A pass that brought at least this many datagrams means the sockets are busy: the
/// worker then sleeps a quantum between passes instead of waiting to be woken.
const BUSY_BATCH: usize = 16;
/// How long a busy worker lets datagrams queue (the most it adds to their latency; the
/// socket buffers hold far more than a quantum of traffic).
const BUSY_QUANTUM: Duration = Duration::from_micros(200);

/// The start of the window containing `t`, on the grid of `snap` (anchored where that
/// snapshot took effect, so every worker computes the same boundaries).
fn grid(snap: &Snapshot, win_ns: i64, t: i64) -> i64 {
    snap.effective_from_ns + (t - snap.effective_from_ns).div_euclid(win_ns) * win_ns
}

/// Capture records from the data plane's rings, read in place, into `window`.
/// Samples (not log datagrams) go to `http`, which looks for HTTP request lines in the
/// TCP ones, as the drain thread does when no pipeline reads the rings.
fn drain_captures(
    records: &mut crate::dataplane::Records,
    cfg: &PipelineConfig,
    acc: &mut Acc,
    http: &mut HttpSamples,
) {
    use proxy_common::policy::RecordKind;
    let mut tally = crate::dataplane::RecordTally::default();
    // One clock read per drain: the records were waiting together.
    let mut batch_rx = None;
    records.drain(&mut tally, |r| {
        if r.header.kind != RecordKind::Capture as u8 {
            acc.counts.samples_skipped += 1;
            http.add(&r.header, r.data);
            return;
        }
        let source = match r.header.family {
            4 => Some(std::net::IpAddr::from([
                r.header.src_addr[0],
                r.header.src_addr[1],
                r.header.src_addr[2],
                r.header.src_addr[3],
            ])),
            6 => Some(std::net::IpAddr::from(r.header.src_addr)),
            _ => None,
        };
        acc.counts.datagrams += 1;
        acc.counts.captured += 1;
        let rx = *batch_rx.get_or_insert_with(now_ns);
        for frame in Frames::new(r.data, cfg.max_message) {
            let rec = decode(frame.bytes, rx);
            acc.add(
                &rec,
                source,
                rx,
                frame.truncated > 0 || r.header.truncated > 0,
                true,
            );
        }
    });
    acc.counts.records_bad += tally.bad;
    acc.counts.ring_other_reader += tally.other_reader;
    acc.counts.ring_skips += tally.skips;
}

fn count_message(counts: &mut MessageCounts, rec: &super::decode::LogRecord<'_>, truncated: bool) {
    counts.messages += 1;
    match rec.format {
        Format::Rfc5424 => counts.rfc5424 += 1,
        Format::Rfc3164 => counts.rfc3164 += 1,
        Format::Json => counts.json += 1,
        Format::Plain => counts.plain += 1,
    }
    counts.invalid_utf8 += u64::from(rec.invalid_utf8);
    counts.truncated += u64::from(truncated);
}

/// One poll of the backend: frame, decode and count every datagram into `window`.
fn receive(
    backend: &mut dyn engine::ReceiveBackend,
    timeout: Duration,
    cfg: &PipelineConfig,
    acc: &mut Acc,
) -> io::Result<usize> {
    // One clock read per batch: the completions of one poll were all ready together.
    let mut batch_rx = None;
    backend.poll(timeout, &mut |d| ingest(acc, cfg, &mut batch_rx, d))
}

/// One datagram from a socket: framed, decoded and counted into `acc`, stamped with the
/// batch's receive time (`batch_rx`, read on the first datagram).
fn ingest(
    acc: &mut Acc,
    cfg: &PipelineConfig,
    batch_rx: &mut Option<i64>,
    d: engine::Datagram<'_>,
) {
    acc.counts.datagrams += 1;
    let rx = *batch_rx.get_or_insert_with(now_ns);
    for frame in Frames::new(d.payload, cfg.max_message) {
        let rec = decode(frame.bytes, rx);
        acc.add(
            &rec,
            d.source.map(|s| s.ip()),
            rx,
            frame.truncated > 0 || d.truncated,
            false,
        );
    }
}

/// Non-blocking passes until one brings nothing; returns the datagrams taken.
fn drain_sockets(
    backend: &mut dyn engine::ReceiveBackend,
    cfg: &PipelineConfig,
    acc: &mut Acc,
) -> io::Result<usize> {
    let mut n = 0;
    loop {
        let k = receive(backend, Duration::ZERO, cfg, acc)?;
        if k == 0 {
            return Ok(n);
        }
        n += k;
    }
}

/// The sinks in force, each with what it takes and its counters.
struct SinkSet {
    generation: u64,
    /// HOSTNAME of window reports in RFC 5424.
    host: String,
    encoder: Rfc5424Encoder,
    sinks: Vec<OpenSink>,
    /// The configuration these sinks were opened from (reopened if a reload fails).
    snapshot: Arc<Snapshot>,
    /// Summaries of sinks closed by reloads, for the final summary.
    retired: Vec<serde_json::Value>,
}

struct OpenSink {
    sink: Box<dyn super::sinks::Sink>,
    what: crate::config::SinkContent,
    format: OutputFormat,
    windows: u64,
    raw_lines: u64,
    /// Raw lines a failing sink did not take (each failure also counts in `failures`).
    raw_lines_failed: u64,
    failures: u64,
    /// A sink that fails keeps failing (disk full, downstream gone): one line per period.
    warn: crate::limits::Throttle,
}

impl OpenSink {
    /// Counts a failure (and the raw lines it did not take) and logs it, throttled.
    fn failed(&mut self, what: &str, e: &io::Error, lines: u64) {
        self.failures += 1;
        self.raw_lines_failed += lines;
        if let Some(held) = self.warn.allow(std::time::Instant::now()) {
            tracing::error!(sink = %self.sink.name(), error = %e, lines, similar_since_last = held, "{what}");
        }
    }
}

impl SinkSet {
    fn open(snap: &Arc<Snapshot>) -> io::Result<Self> {
        let sinks = snap
            .sinks
            .iter()
            .map(|spec| {
                super::sinks::open(&spec.sink, spec.format).map(|sink| OpenSink {
                    sink,
                    what: spec.what,
                    format: spec.format,
                    windows: 0,
                    raw_lines: 0,
                    raw_lines_failed: 0,
                    failures: 0,
                    warn: crate::limits::Throttle::new(Duration::from_secs(5)),
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Self {
            generation: snap.generation,
            snapshot: Arc::clone(snap),
            host: super::encode::local_hostname(),
            encoder: Rfc5424Encoder::default(),
            sinks,
            retired: Vec::new(),
        })
    }

    /// Switches to a reloaded sink list once windows reach its boundary (`None`: now).
    /// The old sinks are closed first (a TCP sink hands its spool to its successor on the
    /// same file) and their counters kept for the summary; if the new list fails to open,
    /// the old one is opened again.
    fn follow(&mut self, shared: &SharedConfig, window_start: Option<i64>) {
        let latest = shared.latest();
        if latest.generation == self.generation
            || window_start.is_some_and(|w| w < latest.effective_from_ns)
        {
            return;
        }
        let mut retired = std::mem::take(&mut self.retired);
        retired.extend(self.close(RELOAD_DRAIN));
        let reopened = match SinkSet::open(&latest) {
            Ok(new) => {
                tracing::info!(generation = latest.generation, "sinks reloaded");
                Some(new)
            }
            Err(e) => {
                tracing::error!(error = %e, "reloaded sinks failed to open; reopening the old ones");
                SinkSet::open(&self.snapshot)
                    .inspect_err(
                        |e| tracing::error!(error = %e, "the old sinks failed to open again"),
                    )
                    .ok()
            }
        };
        match reopened {
            Some(new) => *self = new,
            None => self.sinks.clear(),
        }
        self.generation = latest.generation;
        self.retired = retired;
    }

    /// Closes every sink (each finishes what it can within `drain`) and returns their
    /// summaries.
    fn close(&mut self, drain: Duration) -> Vec<serde_json::Value> {
        for s in &mut self.sinks {
            if let Err(e) = s.sink.close(drain) {
                s.failed("sink failed to close", &e, 0);
            }
        }
        let out = self.summary_of_open();
        self.sinks.clear();
        out
    }

    /// Lets each sink do its own work between batches (a failure is counted, not fatal).
    fn tick(&mut self) {
        for s in &mut self.sinks {
            if let Err(e) = s.sink.tick() {
                s.failed("sink failed", &e, 0);
            }
        }
    }

    fn window(&mut self, line: &str) {
        let now = now_ns();
        let encoded = OutputFormat::ALL.map(|f| {
            let wanted = self.sinks.iter().any(|s| s.what.windows() && s.format == f);
            let mut out = Vec::new();
            match f {
                _ if !wanted => {}
                OutputFormat::Json => out = format!("{line}\n").into_bytes(),
                OutputFormat::Rfc5424 => self.encoder.window(line, now, &self.host, &mut out),
                OutputFormat::Text => super::encode::text_window(line, now, &self.host, &mut out),
            }
            out
        });
        for s in self.sinks.iter_mut() {
            if !s.what.windows() {
                // Raw-only sinks end the window too: the file sink syncs and rotates
                // there, the TCP sink syncs its spool.
                if let Err(e) = s.sink.end_window() {
                    s.failed("sink failed to end a window", &e, 0);
                }
                continue;
            }
            let bytes = &encoded[s.format.index()];
            match s.sink.write(bytes, 1).and_then(|()| s.sink.end_window()) {
                Ok(()) => s.windows += 1,
                Err(e) => s.failed("sink failed to take a window", &e, 0),
            }
        }
    }

    fn raw(&mut self, batch: &RawBatch) {
        let n = batch.records;
        for s in self.sinks.iter_mut().filter(|s| s.what.raw()) {
            let Some(bytes) = batch.bytes(s.format) else {
                // Only when reloads outran the merger (sinks skipped a generation whose
                // workers encoded other formats): counted, never silent.
                s.failures += 1;
                s.raw_lines_failed += n;
                tracing::error!(sink = %s.sink.name(), format = s.format.name(), lines = n,
                    "raw lines were encoded for another configuration's formats");
                continue;
            };
            match s.sink.write(bytes, n) {
                Ok(()) => s.raw_lines += n,
                Err(e) => s.failed("sink failed to take raw lines", &e, n),
            }
        }
    }

    fn summary_of_open(&self) -> Vec<serde_json::Value> {
        self.sinks
            .iter()
            .map(|s| {
                serde_json::json!({
                    "sink": s.sink.name(), "format": s.format.name(), "windows": s.windows,
                    "raw_lines": s.raw_lines, "raw_lines_failed": s.raw_lines_failed,
                    "failures": s.failures, "stats": s.sink.stats(),
                    "generation": self.generation,
                })
            })
            .collect()
    }
}

/// How long a sink retired by a reload may take to hand over (its spool stays either way).
const RELOAD_DRAIN: Duration = Duration::from_millis(250);

/// Raw batches encoded under a configuration whose sinks are not in force yet (a worker
/// crossed the reload boundary before the merger closed the last old window). They wait
/// here, in order, up to a bound; past it the sinks switch early rather than grow memory.
struct HeldRaw {
    batches: std::collections::VecDeque<RawBatch>,
    bytes: usize,
}

const MAX_HELD_RAW_BYTES: usize = 64 << 20;

impl HeldRaw {
    fn take(&mut self, b: RawBatch, shared: &SharedConfig, sinks: &mut SinkSet) {
        if b.generation <= sinks.generation && self.batches.is_empty() {
            sinks.raw(&b);
            return;
        }
        self.bytes += b.len();
        self.batches.push_back(b);
        if self.bytes > MAX_HELD_RAW_BYTES {
            tracing::warn!(
                held_bytes = self.bytes,
                "raw lines of a reloaded configuration piled up; switching sinks before the boundary"
            );
            sinks.follow(shared, None);
        }
        self.release(sinks);
    }

    /// Writes the batches whose sinks are now in force.
    fn release(&mut self, sinks: &mut SinkSet) {
        while let Some(b) = self.batches.front() {
            if b.generation > sinks.generation {
                break;
            }
            self.bytes -= b.len();
            if let Some(b) = self.batches.pop_front() {
                sinks.raw(&b);
            }
        }
    }
}

/// Merges partial windows into whole ones. Each worker sends its partials in window
/// order but may skip windows (a worker that fell more than a window behind closes one
/// and starts on the current grid), so a window is complete once every worker has sent
/// a partial for it *or a later one*; completion is then monotone and windows leave in
/// order. At shutdown the rest goes out as it is.
pub struct WindowMerger {
    /// The latest window start each worker has reported.
    latest: Vec<i64>,
    pending: BTreeMap<i64, WindowReport>,
}

impl WindowMerger {
    pub fn new(workers: usize) -> Self {
        Self {
            latest: vec![i64::MIN; workers.max(1)],
            pending: BTreeMap::new(),
        }
    }

    /// Adds a partial; returns the windows now complete, oldest first.
    pub fn add(&mut self, p: Partial) -> Vec<WindowReport> {
        let start = p.window.start_ns;
        let entry = self.pending.entry(start).or_insert_with(|| WindowReport {
            start_ns: start,
            window: p.window.clone_empty(),
            counts: MessageCounts::default(),
            close_lag_max_ns: 0,
        });
        entry.window.merge(&p.window);
        entry.counts.add(&p.counts);
        entry.close_lag_max_ns = entry.close_lag_max_ns.max(p.close_lag_ns);
        if let Some(l) = self.latest.get_mut(p.worker) {
            *l = (*l).max(start);
        }
        let done_up_to = self.latest.iter().copied().min().unwrap_or(i64::MIN);
        let later = self.pending.split_off(&done_up_to.saturating_add(1));
        std::mem::replace(&mut self.pending, later)
            .into_values()
            .collect()
    }

    /// Everything still pending (at shutdown).
    pub fn flush(&mut self) -> Vec<WindowReport> {
        std::mem::take(&mut self.pending).into_values().collect()
    }
}

impl WindowReport {
    /// One JSON object per window: totals, counts by key, top messages and keys.
    pub fn json(&self) -> serde_json::Value {
        let w = &self.window;
        let keys: Vec<serde_json::Value> = w
            .counts()
            .into_iter()
            .map(|(k, n)| {
                serde_json::json!({
                    "host": k.host, "app": k.app, "severity": k.severity,
                    "facility": k.facility, "source": k.source.map(|s| s.to_string()), "count": n,
                })
            })
            .collect();
        let top: Vec<serde_json::Value> = w
            .top_messages()
            .into_iter()
            .filter_map(|(id, est, err)| {
                w.messages.get(&id).map(|d| {
                    serde_json::json!({
                        "message": d.message, "count": d.count, "estimate": est, "max_error": err,
                        "first_ns": d.first_ns, "last_ns": d.last_ns,
                    })
                })
            })
            .collect();
        serde_json::json!({
            "window_start_ns": self.start_ns,
            "close_lag_max_us": self.close_lag_max_ns / 1000,
            "records": w.records,
            "counts": self.counts,
            "overflow_keys": w.overflow_keys,
            "overflow_messages": w.overflow_messages,
            "keys": keys,
            "top_messages": top,
        })
    }
}

/// Runs the pipeline until `stop` is set: every merged window goes, as one JSON line, to
/// every sink; then a summary line (per-worker engine and counters, kernel drops, sink
/// results) is printed on stdout. A failing sink is counted and logged, never fatal.
pub fn run_with_sinks(
    shared: &Arc<SharedConfig>,
    captures: CaptureSource,
    stop: Arc<AtomicBool>,
    on_started: Option<crate::privileges::OnStarted>,
) -> anyhow::Result<PipelineOutcome> {
    use anyhow::Context as _;
    let first = shared.latest();
    let cfg = &first.pipeline;
    anyhow::ensure!(
        !cfg.listeners.is_empty(),
        "no log listener: give --listen ADDR or a config file"
    );
    anyhow::ensure!(!cfg.data_cpus.is_empty(), "no data CPU");
    let mut sinks = SinkSet::open(&first).context("opening the sinks")?;
    // Room for a few windows per worker before a worker waits on the merger.
    let (tx, rx) = mpsc::sync_channel(cfg.data_cpus.len() * cfg.merger_queue.max(1));
    let udp_before = socket::udp_counters();
    // The process may have done other work before (in `run`, loading and verifying the
    // data plane): the pipeline's own share is measured from here.
    let cpu_at_start = process_cpu_s();
    let captures = match (captures, &cfg.capture_from) {
        (CaptureSource::None, Some(dir)) => CaptureSource::Pinned(dir.clone()),
        (c, _) => c,
    };
    let Workers {
        handles,
        ring_reader,
    } = spawn(shared, captures, tx, Arc::clone(&stop))?;
    // Sockets bound and sinks open: what needed privileges is done. A failure stops the
    // workers and is returned once they have ended.
    let start_error = on_started.and_then(|f| f().err());
    if start_error.is_some() {
        stop.store(true, Ordering::Release);
    } else {
        tracing::info!(workers = handles.len(), listeners = ?cfg.listeners, "log pipeline started");
    }
    // Pinned rings read from another process's data plane: if that data plane is
    // detached and pinned anew, these rings receive nothing any more. Stop with an
    // error (a supervisor's restart then reads the new ones) rather than read on.
    let mut replaced: Option<std::path::PathBuf> = None;
    let mut next_check = std::time::Instant::now();
    let mut merger = WindowMerger::new(handles.len());
    let mut total = MessageCounts::default();
    let mut lags: Vec<i64> = Vec::new();
    let mut held = HeldRaw {
        batches: Default::default(),
        bytes: 0,
    };
    let mut emit = |r: WindowReport, total: &mut MessageCounts, sinks: &mut SinkSet| {
        sinks.follow(shared, Some(r.start_ns));
        total.add(&r.counts);
        lags.push(r.close_lag_max_ns);
        sinks.window(&r.json().to_string());
    };
    // The channel closes when every worker has exited (each drops its sender).
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ToMerger::Partial(p)) => {
                for r in merger.add(*p) {
                    emit(r, &mut total, &mut sinks);
                }
                held.release(&mut sinks);
            }
            Ok(ToMerger::Raw(b)) => held.take(b, shared, &mut sinks),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        sinks.tick();
        if let Some(lock) = &ring_reader
            && replaced.is_none()
            && std::time::Instant::now() >= next_check
        {
            next_check = std::time::Instant::now() + Duration::from_secs(1);
            if !lock.is_current() {
                tracing::error!(
                    dir = %lock.path().display(),
                    "the data plane whose record rings this pipeline reads was detached or pinned anew: stopping"
                );
                replaced = Some(lock.path().to_path_buf());
                stop.store(true, Ordering::Release);
            }
        }
    }
    for r in merger.flush() {
        emit(r, &mut total, &mut sinks);
    }
    drop(emit);
    if !held.batches.is_empty() {
        sinks.follow(shared, None);
        held.release(&mut sinks);
    }
    let mut workers = Vec::new();
    let mut http = HttpSamples::default();
    let mut drops = 0;
    let mut drops_at_stop = 0;
    let mut left_at_stop = 0;
    let mut by_listener: BTreeMap<String, u64> = BTreeMap::new();
    for h in handles {
        let s = h
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        drops += s.kernel_drops;
        drops_at_stop += s.drops_at_stop;
        left_at_stop += s.stats.left_at_stop;
        http.merge(&s.http);
        for (a, d) in &s.drops_by_listener {
            *by_listener.entry(a.to_string()).or_default() += d;
        }
        if let Some(reason) = &s.fallback_reason {
            tracing::warn!(worker = s.worker, %reason, "engine fell back to epoll");
        }
        workers.push(serde_json::json!({
            "worker": s.worker, "cpu": s.cpu, "engine": s.backend,
            "fallback_reason": s.fallback_reason,
            "datagrams": s.stats.datagrams, "bytes": s.stats.bytes,
            "truncated": s.stats.truncated, "buffer_ring_empty": s.stats.buffer_ring_empty,
            "errors": s.stats.errors, "kernel_drops": s.kernel_drops,
            "kernel_drops_at_stop": s.drops_at_stop, "left_at_stop": s.stats.left_at_stop,
        }));
    }
    let mut summaries = std::mem::take(&mut sinks.retired);
    summaries.extend(sinks.close(super::sinks::CLOSE_DRAIN));
    let sinks = summaries;
    let udp_after = socket::udp_counters();
    let cpu_s = process_cpu_s();
    let udp_delta: BTreeMap<&String, u64> = udp_after
        .iter()
        .map(|(k, v)| (k, v.saturating_sub(udp_before.get(k).copied().unwrap_or(0))))
        .filter(|(k, v)| *v > 0 || k.contains("Errors") || k.contains("NoPorts"))
        .collect();
    lags.sort_unstable();
    let pct = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
            / 1000
    };
    let jitter = serde_json::json!({
        "windows": lags.len(), "p50_us": pct(0.5), "p99_us": pct(0.99), "max_us": lags.last().copied().unwrap_or(0) / 1000,
    });
    println!(
        "{}",
        serde_json::json!({"summary": {
            "counts": total, "kernel_drops": drops, "kernel_drops_at_stop": drops_at_stop,
            "left_at_stop": left_at_stop, "kernel_drops_by_listener": by_listener,
            "kernel_udp_counters_delta": udp_delta, "workers": workers, "sinks": sinks,
            "window_close_lag": jitter, "process_cpu_s": cpu_s,
            "pipeline_cpu_s": cpu_s - cpu_at_start,
            "privileges": crate::privileges::status(),
        }})
    );
    if let Some(e) = start_error {
        return Err(e);
    }
    // After the summary, so what was read is still accounted for.
    if let Some(dir) = replaced {
        anyhow::bail!(
            "the data plane pinned in {} was detached or replaced while this pipeline read its record rings; start the pipeline again to read the new ones",
            dir.display()
        );
    }
    Ok(PipelineOutcome {
        counts: total,
        http,
    })
}

/// User + system CPU seconds of this whole process so far.
fn process_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(worker: usize, start_ns: i64, records: u64) -> Partial {
        let mut window = LogWindow::new(KeySpec::default(), WindowLimits::default(), start_ns);
        window.records = records;
        Partial {
            worker,
            window,
            counts: MessageCounts::default(),
            close_lag_ns: 0,
        }
    }

    /// A worker that skips a window (it fell behind) must not hold that window back
    /// until shutdown, and windows must still leave in order.
    #[test]
    fn windows_leave_in_order_when_a_worker_skips_one() {
        let mut m = WindowMerger::new(2);
        let starts = |v: Vec<WindowReport>| -> Vec<(i64, u64)> {
            v.iter().map(|r| (r.start_ns, r.window.records)).collect()
        };
        assert!(m.add(partial(0, 10, 1)).is_empty());
        assert_eq!(starts(m.add(partial(1, 10, 2))), [(10, 3)]);
        // Worker 1 reports 20 and 30; worker 0 skips 20 and reports 30.
        assert!(m.add(partial(1, 20, 4)).is_empty());
        assert!(m.add(partial(1, 30, 8)).is_empty());
        assert_eq!(starts(m.add(partial(0, 30, 16))), [(20, 4), (30, 24)]);
        assert!(m.flush().is_empty());
        // At shutdown whatever is pending goes out, oldest first.
        assert!(m.add(partial(0, 40, 1)).is_empty());
        assert!(m.add(partial(0, 50, 1)).is_empty());
        assert_eq!(starts(m.flush()), [(40, 1), (50, 1)]);
    }
}

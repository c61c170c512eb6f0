//! `edgeproxy run`: load, attach, drain the packet records and the eBPF log until told
//! to stop, then report. The drain runs on its own thread (poll on both ring fds); the
//! caller's async context only waits for the stop condition. With the log pipeline in
//! the same process, its pinned workers drain the record rings instead (captured
//! datagrams go straight into its windows) and the drain thread keeps the eBPF log.
use std::{
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use std::path::PathBuf;

use crate::{
    dataplane::{
        Dataplane, EbpfLogDrain, HookChoice, LoadOptions, RecordTally, Records, RingReaderLock,
    },
    policy::{Policy, loader::PolicyLoader},
    report::{RunSummary, http::HttpSamples},
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub iface: String,
    pub mode: HookChoice,
    pub load: LoadOptions,
    /// Log a one-line progress summary this often.
    pub progress_every: Option<Duration>,
    /// Measure the XDP program's kernel run time per packet (BPF_ENABLE_STATS).
    pub bpf_stats: bool,
    /// A validated policy (and its source text) to load before attaching.
    pub policy: Option<(Policy, String)>,
    /// Where the policy loader keeps each slot's source (`policy show` reads it).
    pub store_dir: Option<PathBuf>,
    /// Leave the record rings to another process (`logs --capture-from`).
    pub leave_records: bool,
}

/// The log pipeline to run beside the data plane: its configuration and the stop flag
/// its control thread sets.
pub struct LogPipeline {
    pub shared: Arc<crate::logs::pipeline::SharedConfig>,
    pub stop: Arc<AtomicBool>,
}

/// How long the drain thread sleeps in poll(): the data plane only wakes it once a batch
/// of records is waiting, so this bounds how long a lone record waits.
const DRAIN_POLL_MS: u16 = proxy_common::RECORDS_POLL_MS;

/// Runs until `stop` resolves. Detaches (by dropping the data plane) before returning.
pub async fn run(
    opts: RunOptions,
    stop: impl Future<Output = ()>,
    logs: Option<LogPipeline>,
) -> anyhow::Result<RunSummary> {
    // The policy store is checked (and created, 0700) before anything changes: a store
    // others can write into is refused rather than written to.
    if let (Some(dir), Some(_)) = (&opts.store_dir, &opts.policy) {
        crate::fsmode::create_private_subdir(dir)
            .with_context(|| format!("policy store {}", dir.display()))?;
    }
    // One reader per ring (see RingReaderLock), decided before anything changes in the
    // live data plane: a pipeline refused here must not have swapped the program, the
    // policy or the rings of the one that reads them.
    let access = ring_access(&opts, logs.is_some())?;
    let mut dp = Dataplane::load(opts.load.clone()).context("loading the XDP data plane")?;
    if let Some((policy, text)) = &opts.policy {
        let mut loader = PolicyLoader::new(dp.take_policy_maps()?, opts.store_dir.clone());
        let r = loader.load(policy, text).context("loading the policy")?;
        tracing::info!(
            generation = r.generation,
            slot = r.slot,
            rules = policy.rules.len(),
            apply_ms = r.apply.as_secs_f64() * 1e3,
            "policy loaded"
        );
    }
    let mode = dp
        .attach(&opts.iface, opts.mode)
        .with_context(|| format!("attaching to {}", opts.iface))?;
    // Pinned counters outlive the daemon: an adopted data plane's hold earlier runs too.
    // Read as soon as this run holds the data plane, so "this run" starts here.
    let counters_at_start = dp.counters()?.snapshot()?;
    let records = dp.take_records()?;
    let rings = match access {
        RingAccess::Private => DrainRings::Reading(records),
        RingAccess::Reading(lock) => DrainRings::Reading(records.hold(lock)),
        RingAccess::Waiting(lock) => DrainRings::Waiting(records, lock),
        RingAccess::Leaving(lock) => DrainRings::Leaving(lock),
    };
    let logger = dp.take_logger()?;
    let stats_fd = if opts.bpf_stats {
        Some(crate::dataplane::enable_run_time_stats()?)
    } else {
        None
    };
    let stats_before = dp.program_stats()?;
    let started = Instant::now();

    let (rings, pipeline) = match (logs, rings) {
        (Some(LogPipeline { shared, stop }), DrainRings::Reading(records)) => {
            let h = thread::Builder::new()
                .name("ep-logs".into())
                .spawn(move || {
                    crate::logs::pipeline::run_with_sinks(
                        &shared,
                        crate::logs::pipeline::CaptureSource::Rings(records),
                        stop,
                        None,
                    )
                })
                .context("spawning the log pipeline")?;
            (DrainRings::None, Some(h))
        }
        // `ring_access` gives a pipeline the rings or fails the start.
        (Some(_), _) => anyhow::bail!("internal error: a log pipeline without the record rings"),
        (None, rings) => (rings, None),
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let drain = {
        let stopping = Arc::clone(&stopping);
        thread::Builder::new()
            .name("ep-drain".into())
            .spawn(move || drain_loop(rings, logger, &stopping))
            .context("spawning the drain thread")?
    };

    let counters = dp.counters()?;
    tokio::pin!(stop);
    let mut ticker = opts.progress_every.map(tokio::time::interval);
    let mut last = counters.snapshot()?;
    // A pipeline that ends on its own (it failed to start, e.g. a listener address in
    // use) ends the run with its error rather than leaving a half daemon.
    let mut check = tokio::time::interval(Duration::from_millis(200));
    loop {
        let tick = async {
            match ticker.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut stop => break,
            _ = check.tick(), if pipeline.as_ref().is_some_and(|h| h.is_finished()) => break,
            () = tick => {
                let now = counters.snapshot()?;
                let d = now.since(&last);
                tracing::info!(
                    packets = d.total().packets,
                    bytes = d.total().bytes,
                    total_packets = now.total().packets,
                    "progress"
                );
                last = now;
            }
        }
    }

    stopping.store(true, Ordering::Release);
    let (mut records, mut http) = drain
        .join()
        .map_err(|_| anyhow::anyhow!("the drain thread panicked"))??;
    if let Some(h) = pipeline {
        let outcome = h
            .join()
            .map_err(|_| anyhow::anyhow!("the log pipeline panicked"))?
            .context("the log pipeline")?;
        // The pipeline's workers read the rings: its counts are the record tally, and
        // its HTTP request lines are the report's.
        records.captures = outcome.counts.captured;
        records.samples = outcome.counts.samples_skipped;
        records.bad = outcome.counts.records_bad;
        records.other_reader = outcome.counts.ring_other_reader;
        records.skips = outcome.counts.ring_skips;
        http.merge(&outcome.http);
    }
    let xdp_cost = match stats_fd {
        Some(_fd) => Some(dp.program_stats()?.since(&stats_before)),
        None => None,
    };
    let summary = RunSummary {
        iface: opts.iface,
        mode,
        elapsed: started.elapsed(),
        counters: counters.snapshot()?,
        counters_at_start,
        records,
        xdp_cost,
        http,
    };
    Ok(summary)
}

/// Who reads the record rings in this process, decided before the data plane loads.
enum RingAccess {
    /// Ephemeral: nobody else can open them.
    Private,
    /// Ours, the lock held for the run.
    Reading(RingReaderLock),
    /// Another process reads them; the drain thread takes them if it lets go.
    Waiting(RingReaderLock),
    /// `--leave-records`: not ours to read; the drain thread only warns when nobody does.
    Leaving(RingReaderLock),
}

fn ring_access(opts: &RunOptions, pipeline: bool) -> anyhow::Result<RingAccess> {
    let Some(dir) = &opts.load.pin_dir else {
        return Ok(RingAccess::Private);
    };
    crate::fsmode::create_private_subdir(dir)
        .with_context(|| format!("pin directory {}", dir.display()))?;
    let lock = RingReaderLock::open(dir)?;
    if pipeline {
        let lock = lock.take_for_life(crate::dataplane::RING_LOCK_PATIENCE)?;
        tracing::info!("reading the record rings (their one reader)");
        return Ok(RingAccess::Reading(lock));
    }
    if opts.leave_records {
        tracing::info!("leaving the record rings to another reader (--leave-records)");
        return Ok(RingAccess::Leaving(lock));
    }
    if lock.wait_to_take(crate::dataplane::RING_LOCK_PATIENCE)? {
        tracing::info!("reading the record rings (their one reader)");
        Ok(RingAccess::Reading(lock))
    } else {
        tracing::warn!(
            dir = %dir.display(),
            "another process reads the record rings; leaving them to it until it stops (no record tally or HTTP request lines here meanwhile)"
        );
        Ok(RingAccess::Waiting(lock))
    }
}

/// The drain thread's view of the rings.
enum DrainRings {
    /// The pipeline reads them, or there are none.
    None,
    Reading(Records),
    /// Another process reads them; taken over (and resynchronised) when it lets go.
    Waiting(Records, RingReaderLock),
    /// `--leave-records`.
    Leaving(RingReaderLock),
}

/// How often a `--leave-records` run checks that someone reads the rings.
const LEAVING_CHECK: Duration = Duration::from_secs(5);

fn drain_loop(
    mut rings: DrainRings,
    mut logger: EbpfLogDrain,
    stopping: &AtomicBool,
) -> anyhow::Result<(RecordTally, HttpSamples)> {
    let mut tally = RecordTally::default();
    let mut http = HttpSamples::default();
    // The first look after a while: the other reader may be starting too.
    let mut next_look = Instant::now() + LEAVING_CHECK;
    let mut unread = false;
    loop {
        // Read the flag before the final drain so records that arrived before the stop
        // request are always counted.
        let stop = stopping.load(Ordering::Acquire);
        rings = match rings {
            DrainRings::Waiting(mut records, lock) => {
                if lock.try_take()? {
                    tracing::info!("the other reader of the record rings is gone: reading them");
                    records.resync();
                    DrainRings::Reading(records.hold(lock))
                } else {
                    DrainRings::Waiting(records, lock)
                }
            }
            DrainRings::Leaving(lock) if Instant::now() >= next_look => {
                next_look = Instant::now() + LEAVING_CHECK;
                let read = lock.held_elsewhere()?;
                if !read && !unread {
                    tracing::warn!(
                        "--leave-records, but no process reads the record rings: once they fill, packets to capture are passed (ringbuf_full counts them)"
                    );
                } else if read && unread {
                    tracing::info!("the record rings have a reader again");
                }
                unread = !read;
                DrainRings::Leaving(lock)
            }
            other => other,
        };
        let records = match &mut rings {
            DrainRings::Reading(r) => Some(r),
            _ => None,
        };
        {
            let mut fds: Vec<PollFd<'_>> = records
                .as_deref()
                .map(Records::fds)
                .unwrap_or_default()
                .into_iter()
                .chain(std::iter::once(logger.as_fd()))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            let timeout = if stop {
                PollTimeout::ZERO
            } else {
                PollTimeout::from(DRAIN_POLL_MS)
            };
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll on the ring buffers"),
            }
        }
        if let Some(r) = records {
            r.drain(&mut tally, |v| http.add(&v.header, v.data));
        }
        logger.flush();
        if stop {
            return Ok((tally, http));
        }
    }
}

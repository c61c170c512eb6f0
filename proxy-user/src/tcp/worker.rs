//! One forwarding worker per data CPU, pinned, owning its event backend (an io_uring ring,
//! or epoll where io_uring is not usable; see [`super::ops`]): multishot accept on its own
//! `SO_REUSEPORT` listener per route, then per connection a small state machine (PROXY
//! header in → connect with a timeout → PROXY header out → two copy directions), each
//! step one operation and one completion.
//!
//! Each direction is its own state machine, as in linkerd2-proxy's `duplex`: it reads
//! only once the previous chunk is fully written, so a slow reader stops the reads on
//! the other side (TCP backpressure) and a connection never holds more than one buffer
//! (or one pipe) per direction. EOF on one side becomes `shutdown(SHUT_WR)` on the other
//! while the other direction keeps flowing; a reset becomes a reset; both closed ends it.
//!
//! A connection is freed only when none of its operations is in flight: aborting
//! cancels them (by fd) and closes once the last completion is in.
//!
//! On a worker with a zero-copy receive queue, the client → upstream direction of the
//! connections it steers there receives chunks of the queue's memory (one multishot
//! receive of at most a buffer's worth at a time) and sends them with `sendmsg`; the
//! chunks go back to the NIC once sent.
use std::{
    collections::VecDeque,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use io_uring::types;
use nix::sys::socket::SockaddrLike as _;

use super::{
    CopyMode, Lifecycle, Route, SharedRoutes, ZeroCopyMode, ZeroCopySettings,
    balance::{Balancer, NoPick},
    local::{self, LocalAddresses},
    ops::{self, Batch, Op, Ops, epoll::EpollOps, uring::UringOps, zcrx::ZcSpec},
    pool::Tried,
    proxy_protocol::{self, Parsed},
    socket::{self, Pipe},
    stats::Reason,
};
use crate::engine::BackendChoice;
/// user_data of listener operations: this bit, then the listener index.
const LISTENER: u64 = 1 << 63;
/// user_data of listener cancellations (nothing to do on completion).
const LISTENER_CANCEL: u64 = 1 << 62;
/// A listener's accepts carry its tag (bits 32..62) beside its index (bits 0..32): a
/// reload may give a closed listener's index to a new one while accepts of the old one
/// still complete, and those must not be taken for the new route's. Tags wrap within it.
const LISTENER_TAG_MASK: u32 = (1 << 30) - 1;

// Connection operations: user_data = slot << 8 | op.
const OP_HDR_PEEK: u8 = 1;
const OP_HDR_READ: u8 = 2;
const OP_CONNECT: u8 = 3;
const OP_CONNECT_TIMEOUT: u8 = 4;
const OP_HDR_SEND: u8 = 5;
const OP_RECV: u8 = 6; // + direction
const OP_SEND: u8 = 8; // + direction
const OP_POLL_IN: u8 = 10; // + direction
const OP_POLL_OUT: u8 = 12; // + direction
const OP_CANCEL: u8 = 14;

/// How often idle connections and the drain deadline are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// A closing connection whose operations have not all completed this long after it
/// cancelled them cancels them again (the first cancellation may not have been queued).
const CANCEL_AGAIN_AFTER: Duration = Duration::from_secs(1);
/// How long a listener rests after an accept error before accepting again.
const ACCEPT_REST: Duration = Duration::from_millis(100);
/// The longest a worker waits in the ring before looking at reloads and the stop flag.
const WAIT: Duration = Duration::from_millis(50);
/// Bytes forwarded in one pass that make the waits of the next `BULK_HOLD` poll
/// (`[tcp] bulk_poll_usec`), or with that off the next wait gather completions (see
/// `Ops::gather`): one full loopback segment. A pass of interactive traffic moves far
/// less (16 connections of 64-byte round trips: about 1 KiB), so only bulk transfers
/// poll or wait for company. 32 KiB and 128 KiB measured alike (for gathering).
const BULK_PASS_BYTES: u64 = 64 * 1024;
/// Completions a wait gathers under bulk traffic (at most; no more than are in flight),
/// for at most `[tcp] coalesce_usec`. Without it each arrival of data wakes the worker,
/// and on a host where the receiving core pays for that wake-up (an IPI; a VM exit in a
/// guest) that is much of what a proxy costs it. 8 and 16 measured alike.
const BULK_EVENTS: usize = 8;
/// How long after a pass that moved bulk traffic waits poll for `[tcp] bulk_poll_usec`.
/// A polling worker's passes are short (it handles completions as they come), so many
/// passes of a stream move less than `BULK_PASS_BYTES`; polling only after a bulk pass
/// itself barely polled (one iperf3 stream, 2026-12-02: the worker slept 6,500–8,200
/// times in 4 s, as often as when gathering, against 860–3,700 with 1 ms). The price
/// after a transfer ends is one more millisecond of polling.
const BULK_HOLD: Duration = Duration::from_millis(1);

/// Rounds (a write of what the pipe holds, then a read into it) the splice pump gives
/// one direction before the other connections get their turn: at the ~30 KiB a splice
/// moves under bulk load, about half a MiB. Eight iperf3 streams through one worker
/// settle in one of two modes for a whole run: the worker sleeps now and then (19–20
/// Gbit/s here, its core ~60% busy) or never does, its splices then costing twice as
/// much per byte (13–16 Gbit/s, 96% busy). 64 rounds once looked like it avoided the
/// second mode (none of 12 manual runs, against 10 of 24 with 16), but a later batch
/// with 64 ended in it 5 times in 8 and the next none in 8 (2026-12-02): which mode a
/// run lands in follows the machine's state at the time, not this number.
const SPLICE_PUMP_ROUNDS: usize = 16;

/// Direction 0 copies client → upstream, direction 1 upstream → client.
const UP: usize = 0;
const DOWN: usize = 1;

/// The copy path in use (after the `auto` probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPath {
    Buffers,
    Splice,
}

impl CopyPath {
    pub fn name(self) -> &'static str {
        match self {
            CopyPath::Buffers => "buffers",
            CopyPath::Splice => "splice",
        }
    }
}

/// The event backend TCP workers run on (after the `auto` probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    IoUring,
    Epoll,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::IoUring => "io_uring",
            Engine::Epoll => "epoll",
        }
    }
}

/// `auto` takes io_uring when it has everything the worker needs, else epoll (with the
/// reason); an explicit `io_uring` that is not usable is an error.
pub fn resolve_engine(choice: BackendChoice) -> anyhow::Result<(Engine, Option<String>)> {
    choose_engine(choice, ops::uring::unavailable())
}

/// The choice itself, given why io_uring is not usable (if it is not).
fn choose_engine(
    choice: BackendChoice,
    uring_unavailable: Option<String>,
) -> anyhow::Result<(Engine, Option<String>)> {
    match (choice, uring_unavailable) {
        (BackendChoice::Epoll, _) => Ok((Engine::Epoll, None)),
        (BackendChoice::IoUring, None) | (BackendChoice::Auto, None) => Ok((Engine::IoUring, None)),
        (BackendChoice::IoUring, Some(why)) => {
            anyhow::bail!("engine = \"io_uring\" is not usable here: {why}")
        }
        (BackendChoice::Auto, Some(why)) => Ok((Engine::Epoll, Some(why))),
    }
}

/// Why the buffers path cannot run on `engine`, if it cannot (epoll keeps its own pool).
fn buffers_unavailable(engine: Engine) -> Option<String> {
    match engine {
        Engine::IoUring => ops::uring::buffer_ring_unavailable(),
        Engine::Epoll => None,
    }
}

pub fn resolve_copy(mode: CopyMode, engine: Engine) -> anyhow::Result<(CopyPath, Option<String>)> {
    match mode {
        CopyMode::Splice => Ok((CopyPath::Splice, None)),
        CopyMode::Buffers => match buffers_unavailable(engine) {
            None => Ok((CopyPath::Buffers, None)),
            Some(why) => anyhow::bail!("copy = \"buffers\" is not possible here: {why}"),
        },
        // Splice measured faster and cheaper per byte (`cargo xtask bench tcp`), and its
        // memory is per connection (one pipe per direction) rather than a shared pool.
        CopyMode::Auto => match Pipe::new(64 * 1024) {
            Ok(_) => Ok((CopyPath::Splice, None)),
            Err(e) => match buffers_unavailable(engine) {
                None => Ok((
                    CopyPath::Buffers,
                    Some(format!("pipes for splice cannot be created: {e}")),
                )),
                Some(why) => anyhow::bail!(
                    "no copy path: pipes for splice cannot be created ({e}) and {why}"
                ),
            },
        },
    }
}

/// What one worker did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WorkerStats {
    pub cpu: usize,
    pub connections: u64,
    /// Times a direction found the buffer ring empty and waited for a buffer (memory
    /// bound at work; counted, nothing lost).
    pub buffer_waits: u64,
    /// Connections still open when the worker ended (0 unless the drain gave up).
    pub left_open: usize,
    /// Closing connections that cancelled their operations again because the first
    /// cancellation could not be queued (a full submission queue; 0 normally).
    pub cancel_retries: u64,
    /// Connections whose accept completed just after a reload or the drain closed their
    /// listener: closed at once (the route is gone; the kernel resets the rest of such a
    /// listener's queue).
    pub closed_with_listener: u64,
    /// Connections that streamed through splice and through pooled buffers (a reload
    /// can change the path for new connections).
    pub splice_streams: u64,
    pub buffer_streams: u64,
    /// Sockets to peers on this host whose send buffer was fixed at `local_sndbuf`.
    pub local_send_buffers: u64,
    /// Sockets to peers on this host that run `local_congestion` (upstreams: set before
    /// connecting; clients: from their listener), and the times the kernel refused a
    /// setting (the first of a worker is logged): an upstream or listener keeps the
    /// system's, a client from another host keeps `local_congestion`.
    pub local_congestion: u64,
    pub local_congestion_errors: u64,
    /// Clients from other hosts accepted with `local_congestion` (from the listener)
    /// and switched back to the system's.
    pub system_congestion_restored: u64,
    /// Whether this worker's waits can gather completions (io_uring with deferred task
    /// work on a kernel with minimum waits, 6.12).
    pub gathering_supported: bool,
    /// Waits that asked the kernel to gather completions because the pass before moved
    /// bulk traffic (`[tcp] coalesce_usec`).
    pub gathering_waits: u64,
    /// With `[tcp] busy_poll_usec`, or `bulk_poll_usec` under bulk traffic: waits whose
    /// completions came in while polling, and polls that ran out of time and slept.
    pub busy_poll_hits: u64,
    pub busy_poll_sleeps: u64,
    /// The rx queue this worker registered for zero-copy receive, or why it has none
    /// (when `[tcp] zero_copy` asked for one).
    pub zero_copy_queue: Option<u32>,
    pub zero_copy_refused: Option<String>,
    /// Connections whose client bytes came through the zero-copy queue, and those bytes.
    pub zero_copy_streams: u64,
    pub zero_copy_bytes: u64,
    /// Times a zero-copy direction waited for chunks to come back (half the area held),
    /// and receives the kernel ended for lack of room and that were issued again.
    pub zero_copy_waits: u64,
    pub zero_copy_retries: u64,
}

/// A worker's zero-copy receive queue to register, or why it gets none.
#[derive(Clone, Debug)]
pub enum ZcPlan {
    Off,
    Register {
        spec: ZcSpec,
        iface: String,
        /// The interface's addresses: connections to them receive through the queue.
        addrs: Vec<IpAddr>,
        /// Several workers have queues: listeners steer by rx queue.
        steering: bool,
    },
    Refused(String),
}

/// With zero-copy queues on several workers, a connection must be accepted by the worker
/// whose queue its packets arrive on (another worker could not read them, not even on
/// the copy path): each route's `SO_REUSEPORT` group gets a program that picks the
/// socket by rx queue (worker `i`'s listener is the group's `i`-th, as they were opened
/// in worker order). A group that refuses the program fails the start. Returns the
/// routes steered.
fn steer_zero_copy(
    plans: &[ZcPlan],
    listeners: &[Vec<(OwnedFd, Arc<Route>)>],
) -> anyhow::Result<Vec<String>> {
    let queues: Vec<Option<u32>> = plans
        .iter()
        .map(|p| match p {
            ZcPlan::Register { spec, .. } => Some(spec.rxq),
            _ => None,
        })
        .collect();
    let steering = plans
        .iter()
        .any(|p| matches!(p, ZcPlan::Register { steering: true, .. }));
    let mut steered_routes = Vec::new();
    if !steering {
        return Ok(steered_routes);
    }
    let Some(first) = listeners.first() else {
        return Ok(steered_routes);
    };
    for (fd, route) in first {
        socket::steer_by_rx_queue(fd, &queues).with_context(|| {
            format!(
                "route {}: steering connections to the workers that own their rx queues (zero-copy receive on several workers)",
                route.spec.name
            )
        })?;
        tracing::info!(route = %route.spec.name, queues = ?queues, "connections steered to workers by rx queue");
        steered_routes.push(route.spec.name.clone());
    }
    Ok(steered_routes)
}

/// One [`ZcPlan`] per worker from `[tcp] zero_copy`; with `require`, an error instead
/// of any refusal known before the kernel is asked.
pub fn plan_zero_copy(
    z: &ZeroCopySettings,
    engine: Engine,
    workers: usize,
    recv_zc_unavailable: Option<&str>,
) -> anyhow::Result<Vec<ZcPlan>> {
    if z.mode == ZeroCopyMode::Off {
        return Ok(vec![ZcPlan::Off; workers]);
    }
    let common = || -> Result<(String, u32, Vec<IpAddr>), String> {
        if engine != Engine::IoUring {
            return Err("zero-copy receive needs the io_uring engine (the engine is epoll)".into());
        }
        if let Some(why) = recv_zc_unavailable {
            return Err(why.to_owned());
        }
        let iface = z.interface.clone().ok_or("no tcp.zero_copy_interface")?;
        let index = nix::net::if_::if_nametoindex(iface.as_str())
            .map_err(|e| format!("no interface named {iface:?}: {e}"))?;
        let addrs = socket::addresses_of(&iface);
        Ok((iface, index, addrs))
    };
    let plans: Vec<ZcPlan> = match common() {
        Err(why) => vec![ZcPlan::Refused(why); workers],
        Ok((iface, ifindex, addrs)) => (0..workers)
            .map(|i| match z.queues.get(i) {
                Some(&rxq) => ZcPlan::Register {
                    spec: ZcSpec {
                        ifindex,
                        rxq,
                        area_bytes: z.area_bytes,
                        refill_entries: z.refill_entries,
                    },
                    iface: iface.clone(),
                    addrs: addrs.clone(),
                    steering: workers > 1,
                },
                None => ZcPlan::Refused(format!(
                    "tcp.zero_copy_queues names {} rx queues for {workers} workers",
                    z.queues.len()
                )),
            })
            .collect(),
    };
    if z.mode == ZeroCopyMode::Require
        && let Some(ZcPlan::Refused(why)) = plans.iter().find(|p| matches!(p, ZcPlan::Refused(_)))
    {
        anyhow::bail!("zero_copy = \"require\": {why}");
    }
    Ok(plans)
}

/// Zero-copy receive for one route's interface: what the probe found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ZeroCopyStatus {
    pub route: String,
    pub iface: String,
    /// Whether the interface could do it (driver, kernel opcode).
    pub capable: bool,
    /// Whether workers received this interface's connections through zero-copy queues
    /// (`[tcp] zero_copy`; each worker's queue or refusal is in its stats).
    pub used: bool,
    pub reason: String,
}

/// Probes io_uring zero-copy receive for every route's interfaces and logs each result:
/// what an operator needs to decide on `[tcp] zero_copy`.
pub fn probe_zero_copy(
    routes: &super::Routes,
    recv_zc_unavailable: Option<&str>,
) -> Vec<ZeroCopyStatus> {
    let mut out = Vec::new();
    for r in &routes.routes {
        for iface in socket::interfaces_of(r.spec.listen) {
            let (driver_ok, why) = crate::doctor::zero_copy_receive_on(&iface);
            let (capable, reason) = match recv_zc_unavailable {
                Some(kernel) => (false, kernel.to_owned()),
                None => (driver_ok, why),
            };
            tracing::info!(route = %r.spec.name, iface = %iface, capable, reason = %reason, "zero-copy receive probe");
            out.push(ZeroCopyStatus {
                route: r.spec.name.clone(),
                iface,
                capable,
                used: false,
                reason,
            });
        }
    }
    out
}

#[derive(Debug, serde::Serialize)]
pub struct TcpSummary {
    /// io_uring or epoll, and why not io_uring when `auto` fell back.
    pub engine: &'static str,
    pub engine_fallback: Option<String>,
    pub copy: &'static str,
    pub zero_copy: Vec<ZeroCopyStatus>,
    /// Routes whose connections go to the worker owning their rx queue (zero-copy
    /// receive on several workers).
    pub steered_by_rx_queue: Vec<String>,
    pub workers: Vec<WorkerStats>,
    pub routes: serde_json::Value,
    pub elapsed_s: f64,
    /// Connections that fit in the file-descriptor limit (0: no limit could be read).
    pub connection_capacity: u64,
    /// Who the workers ran as (after any drop to `[daemon] user`).
    pub privileges: crate::privileges::Status,
}

struct Listener {
    fd: OwnedFd,
    route: Arc<Route>,
    /// Tells this listener's accept completions from those of an earlier listener at
    /// the same index (see [`LISTENER_TAG_MASK`]).
    tag: u32,
    /// Connections reach the worker that owns the rx queue they arrived on (needed for
    /// zero-copy receive with several workers: a queue's pages are readable only through
    /// its own worker's ring).
    steered: bool,
    armed: bool,
    /// After an accept error (EMFILE, ENFILE, ENOMEM) the listener rests until then
    /// instead of failing again at once in a tight loop.
    rest_until: Option<Instant>,
    /// The congestion control this listener hands its connections when edgeproxy set
    /// it (`local_congestion`); `None`: the system's.
    congestion: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    ReadHeader,
    Connecting,
    SendHeader,
    Streaming,
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirState {
    /// An operation of this direction is in flight.
    Busy,
    /// Waiting for a free provided buffer.
    Starved,
    /// EOF seen and propagated.
    Done,
}

struct Dir {
    state: DirState,
    /// Buffers path: the buffer being written (id, written so far, length).
    held: Option<(u16, usize, usize)>,
    /// Splice path: the pipe and how many bytes sit in it.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// Zero-copy receive path (client → upstream on a worker with a zero-copy queue).
    zc: Option<Box<ZcDir>>,
    eof: bool,
}

impl Dir {
    fn new() -> Self {
        Self {
            state: DirState::Busy,
            held: None,
            pipe: None,
            in_pipe: 0,
            zc: None,
            eof: false,
        }
    }
}

/// How long a zero-copy receive that found the area empty waits before it is retried.
const ZC_NOMEM_BACKOFF: Duration = Duration::from_millis(10);

/// Chunks one zero-copy send may carry.
const ZC_IOV: usize = 16;

/// A direction that receives through the zero-copy queue: the chunks received and not
/// yet forwarded, in order (a receive asks for at most one buffer's worth, and the next
/// is issued only once all of it was sent: the same bound and backpressure as the
/// buffers path), and the message of the send in flight.
struct ZcDir {
    chunks: VecDeque<(u16, u32)>,
    /// Bytes of the first chunk already sent.
    sent: usize,
    /// What the receive in flight asked for, and what it delivered so far.
    asked: u32,
    got: u32,
    receiving: bool,
    sending: bool,
    /// The message of the send in flight, in an allocation of its own that is reached
    /// only through this pointer: the backend reads it after the direction has been
    /// borrowed again, which must not invalidate the pointer it was given.
    send: std::ptr::NonNull<ZcMessage>,
}

/// A `sendmsg` message and the iovecs it names.
struct ZcMessage {
    iov: [libc::iovec; ZC_IOV],
    msg: libc::msghdr,
}

impl ZcDir {
    fn new() -> Self {
        let send = Box::new(ZcMessage {
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; ZC_IOV],
            // SAFETY: plain-data C struct; all-zero is a valid empty message.
            msg: unsafe { std::mem::zeroed() },
        });
        Self {
            chunks: VecDeque::new(),
            sent: 0,
            asked: 0,
            got: 0,
            receiving: false,
            sending: false,
            send: std::ptr::NonNull::from(Box::leak(send)),
        }
    }
}

impl Drop for ZcDir {
    fn drop(&mut self) {
        // SAFETY: leaked from a Box in `new` and freed only here; the connection (and
        // with it this direction) is dropped only once no operation is in flight, so no
        // backend still reads the message.
        drop(unsafe { Box::from_raw(self.send.as_ptr()) });
    }
}

struct Conn {
    route: Arc<Route>,
    client: OwnedFd,
    upstream: Option<OwnedFd>,
    /// The upstream whose `active` count this connection holds.
    upstream_idx: Option<usize>,
    /// Where the connection comes from (the PROXY header's source when accepted).
    client_addr: SocketAddr,
    /// Where the client connected to (the PROXY header's destination when accepted).
    local_addr: SocketAddr,
    tried: Tried,
    phase: Phase,
    inflight: u32,
    last_active: Instant,
    connect_started: Instant,
    sockaddr: nix::sys::socket::SockaddrStorage,
    timeout: types::Timespec,
    /// PROXY header: read in (accept_proxy) or written out (send_proxy).
    hdr: Vec<u8>,
    hdr_done: usize,
    hdr_parsed: Option<(usize, Option<proxy_protocol::Endpoints>)>,
    dirs: [Dir; 2],
    /// The client reached an address of the worker's zero-copy interface: its bytes are
    /// received through the zero-copy queue.
    zero_copy: bool,
    /// Sides to reset when the connection is finally closed.
    reset_client: bool,
    reset_upstream: bool,
}

impl Conn {
    fn src(&self, d: usize) -> RawFd {
        if d == UP {
            self.client.as_raw_fd()
        } else {
            self.upstream.as_ref().map_or(-1, AsRawFd::as_raw_fd)
        }
    }
    fn dst(&self, d: usize) -> RawFd {
        self.src(1 - d)
    }
}

/// The reason when the source side of direction `d` failed with `e`.
fn src_reason(d: usize, e: i32) -> Reason {
    match (e, d) {
        (libc::ECONNRESET, UP) => Reason::ClientReset,
        (libc::ECONNRESET, _) => Reason::UpstreamReset,
        _ => Reason::SocketError,
    }
}

/// The reason when writing direction `d` to its destination failed with `e`.
fn dst_reason(d: usize, e: i32) -> Reason {
    match (e, d) {
        (libc::ECONNRESET | libc::EPIPE, UP) => Reason::UpstreamReset,
        (libc::ECONNRESET | libc::EPIPE, _) => Reason::ClientReset,
        _ => Reason::SocketError,
    }
}

/// This host's addresses; on failure (logged) only loopback and a connection's own
/// address count as this host.
fn read_host_addresses() -> LocalAddresses {
    LocalAddresses::read().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read this host's addresses (getifaddrs)");
        LocalAddresses::default()
    })
}

struct Worker {
    ops: Box<dyn Ops>,
    buf_size: usize,
    pipe_size: usize,
    local_sndbuf: usize,
    /// `[tcp] local_congestion` (`None`: the system's default).
    local_congestion: Option<String>,
    /// The system's congestion control, read with `host`: what a client from another
    /// host is switched back to when its listener hands out `local_congestion`.
    system_congestion: Option<String>,
    /// Bytes forwarded since the last wait: bulk traffic when ≥ [`BULK_PASS_BYTES`].
    moved_this_pass: u64,
    /// `[tcp] coalesce_usec` (0: never).
    coalesce_usec: u32,
    /// This host's addresses, read again every `local::REFRESH_EVERY`.
    host: LocalAddresses,
    host_read: Instant,
    /// `[tcp] busy_poll_usec` (zero: sleep at once).
    busy_poll: Duration,
    /// `[tcp] bulk_poll_usec` (zero: bulk waits gather instead).
    bulk_poll: Duration,
    /// Until when waits poll for `bulk_poll` (a pass moved bulk traffic `BULK_HOLD` before).
    bulk_until: Instant,
    /// Completions the connections' operations in flight will still post.
    conn_ops: usize,
    copy: CopyPath,
    /// The copy mode configured (`copy` is what it resolved to), to see reloads change it.
    copy_mode: CopyMode,
    engine: Engine,
    listeners: Vec<Option<Listener>>,
    /// The tag the next listener opened gets.
    next_listener_tag: u32,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<u32>,
    starved: VecDeque<(u32, usize)>,
    balancers: Vec<(Arc<Route>, Balancer)>,
    shared: Arc<SharedRoutes>,
    generation: u64,
    /// Where this worker tells the control thread which generation it applied and
    /// publishes its counters for `/metrics`.
    board: Arc<super::WorkerBoard>,
    idle_sweep: Instant,
    now: Instant,
    /// Addresses of the zero-copy interface (empty without a registered queue).
    zc_addrs: Vec<IpAddr>,
    /// Several workers have zero-copy queues: connections must be steered to theirs.
    zc_needs_steering: bool,
    /// Zero-copy chunks the connections hold, and the most they may: half the area's
    /// pages (one chunk pins a page), the rest left to the NIC's page pool.
    zc_held: usize,
    zc_budget: usize,
    /// Directions with new chunks, sent once the whole batch of completions is in (so
    /// one sendmsg carries several chunks).
    zc_pending: Vec<(u32, usize)>,
    /// Directions waiting to receive again: over the budget, or after a receive the
    /// kernel ended for lack of room (ENOSPC: completion queue; ENOMEM: area).
    zc_waiting: VecDeque<(u32, usize)>,
    /// Directions whose receive found the area empty (ENOMEM), retried after a pause.
    zc_nomem: VecDeque<(u32, usize)>,
    zc_nomem_until: Instant,
    /// Zero-copy receives that failed with EFAULT (logged at powers of two).
    zc_efaults: u64,
    /// Warnings that can repeat per connection (accept errors, sockets and pipes that
    /// cannot be made, refusals at the descriptor limit): one line per period each.
    accept_warn: crate::limits::Throttle,
    socket_warn: crate::limits::Throttle,
    fd_limit_warn: crate::limits::Throttle,
    stats: WorkerStats,
    completions: Vec<(u64, i32, u32)>,
    /// Debug builds only: when this worker panics on purpose (see [`FAULT_PANIC_WORKER`]).
    #[cfg(debug_assertions)]
    panic_at: Option<Instant>,
}

/// How often a repeated per-connection warning may be logged.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// EMFILE or ENFILE: out of file descriptors, for the process or the system.
fn fd_exhausted(errno: i32) -> bool {
    errno == libc::EMFILE || errno == libc::ENFILE
}

fn fd_reason(e: &io::Error) -> Reason {
    if e.raw_os_error().is_some_and(fd_exhausted) {
        Reason::FdLimit
    } else {
        Reason::SocketError
    }
}

/// Debug builds only (the end-to-end tests run them): seconds after which the first
/// worker panics, for the tests of what a worker's death does to the daemon. No input
/// can make a worker panic on purpose, and release builds do not read this.
#[cfg(debug_assertions)]
pub const FAULT_PANIC_WORKER: &str = "EDGEPROXY_FAULT_PANIC_WORKER_SECS";

impl Worker {
    fn new(
        cpu: usize,
        engine: Engine,
        copy: CopyPath,
        shared: Arc<SharedRoutes>,
        listeners: Vec<(OwnedFd, Arc<Route>)>,
        zc: ZcPlan,
    ) -> io::Result<Self> {
        let routes = shared.latest();
        let settings = &routes.settings;
        let pool = (copy == CopyPath::Buffers).then_some((settings.buffers, settings.buffer_size));
        let plain = || -> io::Result<Box<dyn Ops>> {
            Ok(match engine {
                Engine::IoUring => Box::new(UringOps::new(pool)?),
                Engine::Epoll => Box::new(EpollOps::new(pool)?),
            })
        };
        let zc_needs_steering = matches!(zc, ZcPlan::Register { steering: true, .. });
        let zc_budget = match &zc {
            // Half the pages, and never more chunks than the backend can name.
            ZcPlan::Register { spec, .. } => {
                (spec.area_bytes / crate::mapping::page_size() / 2).min(ops::zcrx::MAX_CHUNKS / 2)
            }
            _ => 0,
        };
        let (ops, zc_queue, zc_refused, zc_addrs) = match zc {
            ZcPlan::Off => (plain()?, None, None, Vec::new()),
            ZcPlan::Refused(why) => {
                tracing::warn!(cpu, reason = %why, "zero-copy receive not used");
                (plain()?, None, Some(why), Vec::new())
            }
            ZcPlan::Register {
                spec, iface, addrs, ..
            } => match UringOps::with_zero_copy(pool, spec) {
                Ok(o) => {
                    tracing::info!(cpu, iface = %iface, rxq = spec.rxq, "zero-copy receive queue registered");
                    (Box::new(o) as Box<dyn Ops>, Some(spec.rxq), None, addrs)
                }
                Err(e) => {
                    let why = format!("zero-copy receive on rx queue {} of {iface}: {e}", spec.rxq);
                    if settings.zero_copy.mode == ZeroCopyMode::Require {
                        return Err(io::Error::other(format!("zero_copy = \"require\": {why}")));
                    }
                    tracing::warn!(cpu, reason = %why, "zero-copy receive not used");
                    (plain()?, None, Some(why), Vec::new())
                }
            },
        };
        let now = Instant::now();
        let gathering_supported = ops.can_gather();
        let initial_listeners = listeners.len() as u32;
        let mut worker = Self {
            ops,
            buf_size: settings.buffer_size,
            pipe_size: settings.pipe_size,
            local_sndbuf: settings.local_sndbuf,
            local_congestion: settings.local_congestion.clone(),
            system_congestion: local::system_congestion(),
            moved_this_pass: 0,
            coalesce_usec: settings.coalesce_usec,
            host: read_host_addresses(),
            host_read: Instant::now(),
            busy_poll: Duration::from_micros(settings.busy_poll_usec.into()),
            bulk_poll: Duration::from_micros(settings.bulk_poll_usec.into()),
            bulk_until: Instant::now(),
            conn_ops: 0,
            copy,
            copy_mode: settings.copy,
            engine,
            listeners: listeners
                .into_iter()
                .zip(0..)
                .map(|((fd, route), tag)| {
                    Some(Listener {
                        fd,
                        route,
                        tag,
                        // Opened in worker order before any worker started: see
                        // `steer_zero_copy`.
                        steered: true,
                        armed: false,
                        rest_until: None,
                        congestion: None,
                    })
                })
                .collect(),
            next_listener_tag: initial_listeners,
            conns: Vec::new(),
            free: Vec::new(),
            starved: VecDeque::new(),
            balancers: Vec::new(),
            generation: routes.generation,
            board: shared.register_worker(routes.generation),
            shared,
            idle_sweep: now,
            now,
            zc_budget: zc_budget.max(1),
            zc_addrs,
            zc_needs_steering,
            zc_held: 0,
            zc_pending: Vec::new(),
            zc_waiting: VecDeque::new(),
            zc_nomem: VecDeque::new(),
            zc_nomem_until: now,
            zc_efaults: 0,
            accept_warn: crate::limits::Throttle::new(WARN_EVERY),
            socket_warn: crate::limits::Throttle::new(WARN_EVERY),
            fd_limit_warn: crate::limits::Throttle::new(WARN_EVERY),
            stats: WorkerStats {
                cpu,
                zero_copy_queue: zc_queue,
                zero_copy_refused: zc_refused,
                gathering_supported,
                ..WorkerStats::default()
            },
            completions: Vec::with_capacity(1024),
            #[cfg(debug_assertions)]
            panic_at: None,
        };
        worker.sync_listener_congestion();
        Ok(worker)
    }

    fn conn(&mut self, slot: u32) -> &mut Conn {
        self.conns[slot as usize]
            .as_deref_mut()
            .expect("a completion names a live connection")
    }

    fn submit(&mut self, slot: u32, op: u8, what: Op) {
        // A connect completes twice: itself and its timeout.
        let completions = if matches!(what, Op::Connect { .. }) {
            2
        } else {
            1
        };
        if self.ops.push(what, user_data(slot, op)) {
            self.conn(slot).inflight += completions;
            self.conn_ops += completions as usize;
        } else {
            // Nothing will complete for it: a connection waiting on it would wait forever
            // (the backend logged why). Closed, but not freed here — the caller may still
            // look at it; the sweep frees it once nothing is in flight.
            self.begin_abort(slot, Some(Reason::SocketError), true, true);
        }
    }

    fn run(mut self, stop: &[&AtomicBool]) -> WorkerStats {
        let mut drain_deadline: Option<Instant> = None;
        loop {
            self.now = Instant::now();
            if self.shared.generation() != self.generation {
                self.follow_reload();
            }
            #[cfg(debug_assertions)]
            if self.panic_at.is_some_and(|t| self.now >= t) {
                panic!("{FAULT_PANIC_WORKER}: this worker panics as asked");
            }
            if drain_deadline.is_none() && stop.iter().any(|s| s.load(Ordering::Acquire)) {
                let drain = self.shared.latest().settings.drain;
                drain_deadline = Some(self.now + drain);
                self.shared.advance(Lifecycle::Draining);
                for li in 0..self.listeners.len() {
                    self.close_listener(li);
                }
                tracing::debug!(cpu = self.stats.cpu, open = self.open(), "worker draining");
            }
            if let Some(deadline) = drain_deadline.as_mut()
                && *deadline > self.now
                && self.shared.drain_cut()
            {
                *deadline = self.now;
            }
            if self.now.duration_since(self.idle_sweep) >= SWEEP_EVERY {
                self.idle_sweep = self.now;
                self.sweep(drain_deadline);
                self.publish_stats();
            }
            if let Some(deadline) = drain_deadline {
                if self.open() == 0 {
                    break;
                }
                if self.now > deadline + Duration::from_secs(5) {
                    tracing::error!(
                        open = self.open(),
                        "connections did not close after the drain deadline"
                    );
                    break;
                }
            }
            self.arm_listeners();
            self.now = Instant::now();
            self.complete_all();
            self.flush_zc();
            self.feed_starved();
        }
        self.stats.left_open = self.open();
        self.publish_stats();
        self.stats.clone()
    }

    /// Copies the counters to where `/metrics` reads them (per sweep, not per event).
    fn publish_stats(&self) {
        *self.board.stats.lock().unwrap_or_else(|p| p.into_inner()) = self.stats.clone();
    }

    fn open(&self) -> usize {
        self.conns.len() - self.free.len()
    }

    fn complete_all(&mut self) {
        let mut batch = std::mem::take(&mut self.completions);
        batch.clear();
        let bulk = self.moved_this_pass >= BULK_PASS_BYTES;
        if bulk {
            self.bulk_until = self.now + BULK_HOLD;
        }
        let poll = if self.now < self.bulk_until {
            self.busy_poll.max(self.bulk_poll)
        } else {
            self.busy_poll
        };
        // Company can come only from operations in flight: with one or none, wake at it.
        // A polling worker never sleeps through completions, so it has none to gather.
        let events = self.conn_ops.min(BULK_EVENTS);
        let gather = (bulk && self.coalesce_usec > 0 && events > 1 && poll.is_zero())
            .then_some(Batch {
                events,
                usec: self.coalesce_usec,
            })
            .filter(|_| self.stats.gathering_supported);
        self.stats.gathering_waits += u64::from(gather.is_some());
        self.ops.gather(gather);
        self.moved_this_pass = 0;
        if !self.busy_poll(poll, &mut batch) {
            self.ops.wait(WAIT, &mut batch);
        }
        for &(ud, res, flags) in &batch {
            if ud & LISTENER_CANCEL != 0 {
                continue;
            }
            if ud & LISTENER != 0 {
                let (li, tag) = (ud as u32, (ud >> 32) as u32 & LISTENER_TAG_MASK);
                self.on_accept(li as usize, tag, res, flags);
            } else {
                self.on_conn((ud >> 8) as u32, (ud & 0xff) as u8, res, flags);
            }
        }
        self.completions = batch;
    }

    /// `[tcp] busy_poll_usec` (and `bulk_poll_usec` under bulk traffic): reaps
    /// completions without sleeping until some come in (true) or `budget` is up (false:
    /// the caller sleeps). A sleeping worker is woken
    /// by an interrupt from the core that completed its operation, which under
    /// virtualisation is an exit to the hypervisor on both cores; a polling one just
    /// finds the completion. The price: every wait that finds nothing spends up to the
    /// whole time polling, so light traffic keeps the core busy.
    fn busy_poll(&mut self, budget: Duration, batch: &mut Vec<(u64, i32, u32)>) -> bool {
        if budget.is_zero() {
            return false;
        }
        let start = Instant::now();
        loop {
            self.ops.wait(Duration::ZERO, batch);
            if !batch.is_empty() {
                self.stats.busy_poll_hits += 1;
                return true;
            }
            if start.elapsed() >= budget {
                self.stats.busy_poll_sleeps += 1;
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn arm_listeners(&mut self) {
        for li in 0..self.listeners.len() {
            let Some(l) = &self.listeners[li] else {
                continue;
            };
            if l.armed || l.rest_until.is_some_and(|t| self.now < t) {
                continue;
            }
            let fd = l.fd.as_raw_fd();
            let ud = LISTENER | u64::from(l.tag) << 32 | li as u64;
            if self.ops.push(Op::AcceptMulti { fd }, ud)
                && let Some(l) = self.listeners[li].as_mut()
            {
                l.armed = true;
            }
        }
    }

    fn close_listener(&mut self, li: usize) {
        let Some(l) = self.listeners[li].take() else {
            return;
        };
        let fd = l.fd.as_raw_fd();
        if l.armed {
            self.ops.push(Op::CancelFd { fd }, LISTENER_CANCEL);
            // The cancellation must reach the kernel while the fd still names the
            // socket; the accept keeps the socket alive until it completes.
            self.ops.flush();
        }
        self.ops.forget(fd);
        drop(l);
    }

    /// A reload: listeners on addresses that stay keep their socket and take the new
    /// route (new connections use the new pool; open ones keep theirs), new addresses are
    /// bound, removed ones closed.
    fn follow_reload(&mut self) {
        let routes = self.shared.latest();
        self.generation = routes.generation;
        // New connections get the new pipe size and copy path; a buffer pool, once it
        // exists, keeps its size (the control thread warns when that changed).
        self.pipe_size = routes.settings.pipe_size;
        self.local_sndbuf = routes.settings.local_sndbuf;
        self.local_congestion
            .clone_from(&routes.settings.local_congestion);
        self.coalesce_usec = routes.settings.coalesce_usec;
        self.busy_poll = Duration::from_micros(routes.settings.busy_poll_usec.into());
        self.bulk_poll = Duration::from_micros(routes.settings.bulk_poll_usec.into());
        if routes.settings.copy != self.copy_mode {
            self.change_copy(routes.settings.copy, &routes.settings);
        }
        let mut keep = vec![false; self.listeners.len()];
        for r in &routes.routes {
            let at = self.listeners.iter().position(|l| {
                l.as_ref()
                    .is_some_and(|l| l.route.spec.listen == r.spec.listen)
            });
            match at {
                Some(li) => {
                    if let Some(l) = self.listeners[li].as_mut() {
                        l.route = Arc::clone(r);
                    }
                    keep[li] = true;
                }
                None => match socket::listener(r.spec.listen) {
                    Ok(fd) => {
                        if self.zc_needs_steering {
                            tracing::warn!(route = %r.spec.name, "a route added by a reload is not steered by rx queue: it uses the copy path, and its flows must not be sent to zero-copy queues before a restart");
                        }
                        let tag = self.next_listener_tag;
                        self.next_listener_tag = tag.wrapping_add(1) & LISTENER_TAG_MASK;
                        let l = Listener {
                            fd,
                            route: Arc::clone(r),
                            tag,
                            // Listeners open in each worker's own order after a reload,
                            // so the group's order is not the workers': no steering.
                            steered: !self.zc_needs_steering,
                            armed: false,
                            rest_until: None,
                            congestion: None,
                        };
                        // The index of one a reload closed, else a new one: the
                        // vector does not grow with routes coming and going.
                        match self.listeners.iter().position(Option::is_none) {
                            Some(li) => {
                                self.listeners[li] = Some(l);
                                keep[li] = true;
                            }
                            None => {
                                self.listeners.push(Some(l));
                                keep.push(true);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(route = %r.spec.name, listen = %r.spec.listen, error = %e, "cannot listen; the route is not served")
                    }
                },
            }
        }
        for (li, k) in keep.into_iter().enumerate() {
            if !k {
                self.close_listener(li);
            }
        }
        self.balancers
            .retain(|(r, _)| routes.routes.iter().any(|n| Arc::ptr_eq(n, r)));
        self.sync_listener_congestion();
        self.board
            .applied
            .store(routes.generation, Ordering::Release);
    }

    /// A reload changed `[tcp] copy`: new connections take the new path (open ones keep
    /// theirs); the buffers path gets its pool now if the worker started without one.
    fn change_copy(&mut self, mode: CopyMode, settings: &super::TcpSettings) {
        let path = match resolve_copy(mode, self.engine) {
            Ok((path, _)) => path,
            Err(e) => {
                tracing::error!(error = %e, "reload: keeping the copy path {}", self.copy.name());
                return;
            }
        };
        if path == CopyPath::Buffers && !self.ops.has_pool() {
            if let Err(e) = self.ops.add_pool(settings.buffers, settings.buffer_size) {
                tracing::error!(error = %e, "reload: no buffer pool, keeping the copy path {}", self.copy.name());
                return;
            }
            self.buf_size = settings.buffer_size;
        }
        tracing::info!(
            cpu = self.stats.cpu,
            from = self.copy.name(),
            to = path.name(),
            "copy path for new connections"
        );
        self.copy_mode = mode;
        self.copy = path;
    }

    fn sweep(&mut self, drain_deadline: Option<Instant>) {
        if self.now.duration_since(self.host_read) >= local::REFRESH_EVERY {
            self.host = read_host_addresses();
            self.system_congestion = local::system_congestion();
            self.host_read = self.now;
        }
        let past_deadline = drain_deadline.is_some_and(|d| self.now >= d);
        for slot in 0..self.conns.len() as u32 {
            let Some(c) = self.conns[slot as usize].as_deref() else {
                continue;
            };
            if c.phase == Phase::Closing {
                // One whose last operation could not even be queued.
                if c.inflight == 0 {
                    self.finish_if_idle(slot);
                } else if self.now.duration_since(c.last_active) > CANCEL_AGAIN_AFTER {
                    self.cancel_in_flight(slot);
                }
                continue;
            }
            if past_deadline {
                self.abort(slot, Some(Reason::DrainDeadline), true, true);
            } else if c.phase == Phase::ReadHeader
                && self.now.duration_since(c.connect_started) > c.route.spec.proxy_header_timeout
            {
                // `connect_started` is the accept time until the header is complete.
                self.abort(slot, Some(Reason::ProxyHeaderTimeout), false, false);
            } else if c.phase != Phase::Connecting
                && self.now.duration_since(c.last_active) > c.route.spec.idle_timeout
            {
                self.abort(slot, Some(Reason::IdleTimeout), false, false);
            }
        }
    }

    fn on_accept(&mut self, li: usize, tag: u32, res: i32, flags: u32) {
        let Some(l) = self
            .listeners
            .get_mut(li)
            .and_then(Option::as_mut)
            .filter(|l| l.tag == tag)
        else {
            if res >= 0 {
                // Accepted as a reload or the drain closed the listener: its route is
                // gone, so the worker counts it.
                drop(socket::adopt(res));
                self.stats.closed_with_listener += 1;
            }
            return;
        };
        if !ops::more(flags) {
            l.armed = false;
        }
        if res < 0 {
            if res != -libc::ECANCELED {
                let reason = if fd_exhausted(-res) {
                    Reason::FdLimit
                } else {
                    Reason::SocketError
                };
                l.route.stats.refused.add(reason, 1);
                l.rest_until = Some(self.now + ACCEPT_REST);
                if let Some(held) = self.accept_warn.allow(self.now) {
                    tracing::warn!(error = %io::Error::from_raw_os_error(-res), listen = %l.route.spec.listen,
                        similar_since_last = held, "accept failed");
                }
            }
            return;
        }
        let route = Arc::clone(&l.route);
        let steered = l.steered;
        let inherited = l.congestion.clone();
        let fd = socket::adopt(res);
        route.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.connections += 1;
        let active = route.stats.active.fetch_add(1, Ordering::AcqRel) + 1;
        if route.spec.max_connections != 0 && active > u64::from(route.spec.max_connections) {
            route.stats.active.fetch_sub(1, Ordering::AcqRel);
            route.stats.refused.add(Reason::RouteLimit, 1);
            socket::reset_on_close(&fd);
            return;
        }
        // A place in the descriptor budget for its sockets and pipes, released when the
        // connection is freed: refused cleanly here rather than failing half-built.
        if !self.shared.budget.try_take() {
            route.stats.active.fetch_sub(1, Ordering::AcqRel);
            route.stats.refused.add(Reason::FdLimit, 1);
            socket::reset_on_close(&fd);
            if let Some(held) = self.fd_limit_warn.allow(self.now) {
                tracing::warn!(
                    capacity = self.shared.budget.capacity(),
                    similar_since_last = held,
                    "connection refused: as many connections are open as the file-descriptor limit allows (counted as fd_limit)"
                );
            }
            return;
        }
        if let Err(e) = socket::no_delay(&fd) {
            tracing::debug!(error = %e, "TCP_NODELAY on a client socket");
        }
        let peer = socket::peer_addr(&fd);
        let local = socket::local_addr(&fd);
        let (Some(peer), Some(local)) = (peer, local) else {
            // The client is already gone (reset before we looked).
            route.stats.active.fetch_sub(1, Ordering::AcqRel);
            self.shared.budget.release();
            route.stats.refused.add(Reason::ClientReset, 1);
            return;
        };
        self.tune_client(&fd, inherited.as_deref(), local, peer);
        let accept_proxy = route.spec.accept_proxy;
        let conn = Box::new(Conn {
            route,
            client: fd,
            upstream: None,
            upstream_idx: None,
            client_addr: peer,
            local_addr: local,
            tried: Tried::default(),
            phase: if accept_proxy {
                Phase::ReadHeader
            } else {
                Phase::Connecting
            },
            inflight: 0,
            last_active: self.now,
            connect_started: self.now,
            sockaddr: nix::sys::socket::SockaddrStorage::from(peer),
            timeout: types::Timespec::new(),
            hdr: if accept_proxy {
                vec![0; proxy_protocol::MAX_HEADER]
            } else {
                Vec::new()
            },
            hdr_done: 0,
            hdr_parsed: None,
            dirs: [Dir::new(), Dir::new()],
            // A PROXY header is read with a plain receive, which cannot read pages of a
            // zero-copy queue: such routes stay on the copy path.
            zero_copy: steered && !accept_proxy && self.zc_addrs.contains(&local.ip()),
            reset_client: false,
            reset_upstream: false,
        });
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s as usize] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        if accept_proxy {
            self.peek_header(slot);
        } else {
            self.connect(slot);
        }
    }

    fn on_conn(&mut self, slot: u32, op: u8, res: i32, flags: u32) {
        let Some(c) = self
            .conns
            .get_mut(slot as usize)
            .and_then(|c| c.as_deref_mut())
        else {
            tracing::error!(slot, op, "completion for a freed connection");
            return;
        };
        // A multishot operation (zero-copy receive) stays in flight while F_MORE is set.
        if !ops::more(flags) {
            // Debug builds stop at an accounting error; release builds must not wrap to
            // u32::MAX, which would keep the connection open forever.
            debug_assert!(
                c.inflight > 0 && self.conn_ops > 0,
                "completion with none in flight"
            );
            c.inflight = c.inflight.saturating_sub(1);
            self.conn_ops = self.conn_ops.saturating_sub(1);
        }
        if c.phase == Phase::Closing {
            // A receive that completed anyway returns its buffer at once.
            if (op == OP_RECV || op == OP_RECV + 1)
                && res > 0
                && let Some(bid) = ops::received_buffer(flags)
            {
                self.ops.recycle(bid);
            }
            self.finish_if_idle(slot);
            return;
        }
        // Directions and their operations: op - OP_RECV (or OP_SEND, ...) is the direction.
        let zc = |base: u8| c.dirs[usize::from(op - base)].zc.is_some();
        match op {
            OP_RECV | 7 if zc(OP_RECV) => {
                self.on_zc_recv(slot, usize::from(op - OP_RECV), res, flags)
            }
            OP_SEND | 9 if zc(OP_SEND) => self.on_zc_sent(slot, usize::from(op - OP_SEND), res),
            OP_HDR_PEEK => self.on_header_peek(slot, res),
            OP_HDR_READ => self.on_header_read(slot, res),
            OP_CONNECT => self.on_connect(slot, res),
            OP_CONNECT_TIMEOUT | OP_CANCEL => {}
            OP_HDR_SEND => self.on_header_sent(slot, res),
            OP_RECV | 7 => self.on_recv(slot, usize::from(op - OP_RECV), res, flags),
            OP_SEND | 9 => self.on_sent(slot, usize::from(op - OP_SEND), res),
            OP_POLL_IN | 11 => self.splice_pump(slot, usize::from(op - OP_POLL_IN)),
            OP_POLL_OUT | 13 => self.splice_pump(slot, usize::from(op - OP_POLL_OUT)),
            _ => tracing::error!(op, "unknown operation"),
        }
    }

    // --- PROXY header from the client -------------------------------------------------

    fn peek_header(&mut self, slot: u32) {
        let c = self.conn(slot);
        let len = c.hdr.len() - c.hdr_done;
        self.recv_header(slot, len, libc::MSG_PEEK, OP_HDR_PEEK);
    }

    /// Receives up to `len` header bytes into the unfilled rest of the header buffer.
    fn recv_header(&mut self, slot: u32, len: usize, flags: i32, op: u8) {
        let c = self.conn(slot);
        let have = c.hdr_done;
        let what = Op::Recv {
            fd: c.client.as_raw_fd(),
            buf: c.hdr[have..].as_mut_ptr(),
            len: len as u32,
            flags,
        };
        self.submit(slot, op, what);
    }

    /// The client closed or failed before its PROXY header was complete.
    fn header_failed(&mut self, slot: u32, res: i32) {
        let reason = if res == 0 {
            Reason::ProxyHeaderEof
        } else {
            src_reason(UP, -res)
        };
        self.abort(slot, Some(reason), false, false);
    }

    /// Peeked `res` more bytes: if they complete a header, read exactly the header;
    /// otherwise consume them (all header) and peek again, which waits for more.
    fn on_header_peek(&mut self, slot: u32, res: i32) {
        if res <= 0 {
            return self.header_failed(slot, res);
        }
        let c = self.conn(slot);
        let seen = c.hdr_done + res as usize;
        let take = match proxy_protocol::parse(&c.hdr[..seen]) {
            Ok(Parsed::Header { len, endpoints, .. }) => {
                c.hdr_parsed = Some((len, endpoints));
                len - c.hdr_done
            }
            Ok(Parsed::Incomplete) if seen < c.hdr.len() => res as usize,
            Ok(Parsed::Incomplete) => {
                return self.abort(slot, Some(Reason::ProxyHeaderTooLong), true, false);
            }
            Err(e) => {
                let reason = match e {
                    proxy_protocol::ProxyHeaderError::NotProxy => Reason::ProxyHeaderMissing,
                    proxy_protocol::ProxyHeaderError::TooLong => Reason::ProxyHeaderTooLong,
                    _ => Reason::ProxyHeaderMalformed,
                };
                tracing::debug!(client = %c.client_addr, error = %e, "PROXY header refused");
                return self.abort(slot, Some(reason), true, false);
            }
        };
        self.recv_header(slot, take, libc::MSG_WAITALL, OP_HDR_READ);
    }

    fn on_header_read(&mut self, slot: u32, res: i32) {
        if res <= 0 {
            return self.header_failed(slot, res);
        }
        let now = self.now;
        let c = self.conn(slot);
        c.hdr_done += res as usize;
        c.last_active = now;
        match c.hdr_parsed {
            Some((len, endpoints)) if c.hdr_done >= len => {
                if let Some(e) = endpoints {
                    c.client_addr = e.source;
                    c.local_addr = e.destination;
                }
                c.hdr = Vec::new();
                c.hdr_done = 0;
                c.phase = Phase::Connecting;
                self.connect(slot);
            }
            _ => self.peek_header(slot),
        }
    }

    // --- connecting --------------------------------------------------------------------

    fn balancer(&mut self, route: &Arc<Route>) -> &mut Balancer {
        let i = match self
            .balancers
            .iter()
            .position(|(r, _)| Arc::ptr_eq(r, route))
        {
            Some(i) => i,
            None => {
                self.balancers.push((
                    Arc::clone(route),
                    Balancer::new(route.spec.balance, route.pool.upstreams.len()),
                ));
                self.balancers.len() - 1
            }
        };
        &mut self.balancers[i].1
    }

    /// Picks an upstream not tried yet and starts connecting to it (or refuses the
    /// connection with the reason when none is left).
    fn connect(&mut self, slot: u32) {
        let (route, client, tried) = {
            let c = self.conn(slot);
            (Arc::clone(&c.route), c.client_addr.ip(), c.tried)
        };
        let picked = self.balancer(&route).pick(&route.pool, client, &tried);
        let i = match picked {
            Ok(i) => i,
            Err(no) => {
                let reason = match no {
                    NoPick::AllAtLimit => Reason::UpstreamLimit,
                    NoPick::NoHealthy => Reason::NoUpstream,
                };
                return self.abort(slot, Some(reason), true, false);
            }
        };
        let upstream = &route.pool.upstreams[i];
        let fd = match socket::upstream_socket(upstream.address) {
            Ok(fd) => fd,
            Err(e) => {
                if let Some(held) = self.socket_warn.allow(self.now) {
                    tracing::warn!(error = %e, similar_since_last = held, "creating an upstream socket");
                }
                let reason = fd_reason(&e);
                return self.abort(slot, Some(reason), true, false);
            }
        };
        self.tune_upstream_on_this_host(&fd, upstream.address);
        upstream.active.fetch_add(1, Ordering::AcqRel);
        // Read the clock for the latency itself: the loop's `now` is per batch.
        let now = Instant::now();
        let c = self.conn(slot);
        c.tried.insert(i);
        c.upstream_idx = Some(i);
        c.sockaddr = nix::sys::socket::SockaddrStorage::from(upstream.address);
        c.timeout = types::Timespec::from(route.spec.connect_timeout);
        c.connect_started = now;
        c.phase = Phase::Connecting;
        let what = Op::Connect {
            fd: fd.as_raw_fd(),
            addr: c.sockaddr.as_ptr(),
            addr_len: c.sockaddr.len(),
            timeout: &c.timeout,
            timeout_after: route.spec.connect_timeout,
            timeout_user_data: user_data(slot, OP_CONNECT_TIMEOUT),
        };
        c.upstream = Some(fd);
        self.submit(slot, OP_CONNECT, what);
    }

    /// An upstream socket to this host, before it connects: `local_congestion`, and
    /// where that is not set (off, or refused), a fixed `local_sndbuf`. A socket that
    /// paces (BBR) moved more with the fixed buffer, one that does not (reno) with
    /// autotuning (README: congestion control to peers on this host).
    fn tune_upstream_on_this_host(&mut self, fd: &OwnedFd, peer: SocketAddr) {
        if !self.host.is_this_host(peer.ip()) {
            return;
        }
        if let Some(name) = &self.local_congestion {
            match socket::set_congestion(fd, name) {
                Ok(()) => {
                    self.stats.local_congestion += 1;
                    return;
                }
                Err(e) => {
                    if self.stats.local_congestion_errors == 0 {
                        tracing::warn!(error = %e, congestion = %name, "tcp.local_congestion refused; such connections keep the system's default (counted as local_congestion_errors)");
                    }
                    self.stats.local_congestion_errors += 1;
                }
            }
        }
        self.fix_send_buffer(fd);
    }

    /// A client's socket, once accepted. From a listener handing out `local_congestion`,
    /// a client on this host keeps it (and autotuning), one from another host is
    /// switched to the system's (BBR sets its pacing up then, as at a handshake). A
    /// client on this host whose socket runs the system's gets a fixed `local_sndbuf`.
    fn tune_client(
        &mut self,
        fd: &OwnedFd,
        inherited: Option<&str>,
        local: SocketAddr,
        peer: SocketAddr,
    ) {
        let here = self.host.stays_on_this_host(local, peer);
        match inherited {
            Some(_) if here => self.stats.local_congestion += 1,
            Some(name) => {
                let Some(system) = self.system_congestion.as_deref().filter(|&s| s != name) else {
                    return;
                };
                match socket::set_congestion(fd, system) {
                    Ok(()) => self.stats.system_congestion_restored += 1,
                    Err(e) => {
                        if self.stats.local_congestion_errors == 0 {
                            tracing::warn!(error = %e, congestion = %name, system = %system, "a client from another host could not be switched back to the system's congestion control (counted as local_congestion_errors)");
                        }
                        self.stats.local_congestion_errors += 1;
                    }
                }
            }
            None if here => self.fix_send_buffer(fd),
            None => {}
        }
    }

    /// `local_sndbuf` on a socket to a peer on this host that runs the system's
    /// congestion control (see `TcpSettings::local_sndbuf`).
    fn fix_send_buffer(&mut self, fd: &OwnedFd) {
        if self.local_sndbuf == 0 {
            return;
        }
        match socket::cap_send_buffer(fd, self.local_sndbuf) {
            Ok(()) => self.stats.local_send_buffers += 1,
            Err(e) => tracing::debug!(error = %e, "SO_SNDBUF on a connection within this host"),
        }
    }

    /// Gives every listener `local_congestion`, so that clients on this host are never
    /// paced (the kernel sets pacing up at the handshake, before the accept), or with
    /// it off the system's back. Only where the system's is known: a client from another
    /// host must be switched back to it.
    fn sync_listener_congestion(&mut self) {
        let Some(system) = self.system_congestion.clone() else {
            return;
        };
        for l in self.listeners.iter_mut().flatten() {
            if l.congestion == self.local_congestion {
                continue;
            }
            let name = self.local_congestion.as_deref().unwrap_or(&system);
            match socket::set_congestion(&l.fd, name) {
                Ok(()) => l.congestion.clone_from(&self.local_congestion),
                Err(e) => {
                    tracing::warn!(error = %e, congestion = %name, listen = %l.route.spec.listen, "congestion control of a listener (counted as local_congestion_errors)");
                    self.stats.local_congestion_errors += 1;
                }
            }
        }
    }

    fn on_connect(&mut self, slot: u32, res: i32) {
        let now = Instant::now();
        let c = self.conn(slot);
        let Some(i) = c.upstream_idx else { return };
        let route = Arc::clone(&c.route);
        if res < 0 {
            let reason = match -res {
                libc::ECANCELED => Reason::ConnectTimeout,
                libc::ECONNREFUSED => Reason::ConnectRefused,
                _ => Reason::ConnectError,
            };
            tracing::debug!(upstream = %route.pool.upstreams[i].address, reason = reason.name(), "connect failed");
            if let Some(fd) = c.upstream.take() {
                self.ops.forget(fd.as_raw_fd());
            }
            let c = self.conn(slot);
            c.upstream_idx = None;
            route.pool.upstreams[i]
                .active
                .fetch_sub(1, Ordering::AcqRel);
            route.pool.connect_failed(i, reason);
            // Nothing was sent to the client yet: try another upstream.
            return self.connect(slot);
        }
        route
            .pool
            .connect_succeeded(i, now.duration_since(c.connect_started));
        let c = self.conn(slot);
        route.pool.upstreams[i]
            .stats
            .connections
            .fetch_add(1, Ordering::Relaxed);
        c.last_active = now;
        match route.spec.send_proxy {
            Some(v) => {
                c.hdr.clear();
                proxy_protocol::encode(v, c.client_addr, c.local_addr, &mut c.hdr);
                c.hdr_done = 0;
                c.phase = Phase::SendHeader;
                self.send_header(slot);
            }
            None => self.stream(slot),
        }
    }

    fn send_header(&mut self, slot: u32) {
        let c = self.conn(slot);
        let rest = &c.hdr[c.hdr_done..];
        let what = Op::Send {
            fd: c.dst(UP),
            buf: rest.as_ptr(),
            len: rest.len() as u32,
        };
        self.submit(slot, OP_HDR_SEND, what);
    }

    fn on_header_sent(&mut self, slot: u32, res: i32) {
        if res < 0 {
            return self.abort(slot, Some(dst_reason(UP, -res)), true, false);
        }
        let c = self.conn(slot);
        c.hdr_done += res as usize;
        if c.hdr_done < c.hdr.len() {
            return self.send_header(slot);
        }
        c.hdr = Vec::new();
        self.stream(slot);
    }

    // --- copying -----------------------------------------------------------------------

    fn stream(&mut self, slot: u32) {
        let copy = self.copy;
        match copy {
            CopyPath::Splice => self.stats.splice_streams += 1,
            CopyPath::Buffers => self.stats.buffer_streams += 1,
        }
        let pipe_size = self.pipe_size;
        let c = self.conn(slot);
        c.phase = Phase::Streaming;
        let zc_up = c.zero_copy;
        if zc_up {
            c.dirs[UP].zc = Some(Box::new(ZcDir::new()));
            self.stats.zero_copy_streams += 1;
        }
        let c = self.conn(slot);
        if copy == CopyPath::Splice {
            for d in [UP, DOWN] {
                if c.dirs[d].zc.is_some() {
                    continue;
                }
                match Pipe::new(pipe_size) {
                    Ok(p) => c.dirs[d].pipe = Some(p),
                    Err(e) => {
                        if let Some(held) = self.socket_warn.allow(self.now) {
                            tracing::warn!(error = %e, similar_since_last = held, "creating a splice pipe");
                        }
                        let reason = fd_reason(&e);
                        return self.abort(slot, Some(reason), true, true);
                    }
                }
            }
        }
        for d in [UP, DOWN] {
            match copy {
                _ if d == UP && zc_up => self.zc_recv(slot, d),
                CopyPath::Buffers => self.recv(slot, d),
                CopyPath::Splice => self.splice_pump(slot, d),
            }
            // Pumping a direction can end the connection, and so free its slot.
            if !self.is_streaming(slot) {
                return;
            }
        }
    }

    /// The connection in `slot` is still allocated and streaming.
    fn is_streaming(&self, slot: u32) -> bool {
        self.conns
            .get(slot as usize)
            .and_then(|c| c.as_deref())
            .is_some_and(|c| c.phase == Phase::Streaming)
    }

    fn recv(&mut self, slot: u32, d: usize) {
        let size = self.buf_size as u32;
        let c = self.conn(slot);
        c.dirs[d].state = DirState::Busy;
        let what = Op::RecvPooled {
            fd: c.src(d),
            len: size,
        };
        self.submit(slot, OP_RECV + d as u8, what);
    }

    fn on_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        if res == -libc::ENOBUFS {
            self.stats.buffer_waits += 1;
            self.conn(slot).dirs[d].state = DirState::Starved;
            self.starved.push_back((slot, d));
            return;
        }
        if res < 0 {
            return self.recv_failed(slot, d, res);
        }
        if res == 0 {
            return self.end_direction(slot, d);
        }
        let Some(ops::BufId::Pool(bid)) = ops::received_buffer(flags) else {
            tracing::error!("a receive completed without a buffer");
            return self.abort(slot, Some(Reason::SocketError), true, true);
        };
        let now = self.now;
        let c = self.conn(slot);
        c.dirs[d].held = Some((bid, 0, res as usize));
        c.last_active = now;
        self.send(slot, d);
    }

    fn send(&mut self, slot: u32, d: usize) {
        let buf_size = self.buf_size;
        let c = self.conns[slot as usize]
            .as_deref()
            .expect("a live connection");
        let Some((bid, off, len)) = c.dirs[d].held else {
            return;
        };
        let data = self.ops.buf(ops::BufId::Pool(bid), buf_size);
        let Some(rest) = data.get(off..len) else {
            tracing::error!(bid, off, len, "a held buffer is shorter than its data");
            return self.abort(slot, Some(Reason::SocketError), true, true);
        };
        let what = Op::Send {
            fd: c.dst(d),
            buf: rest.as_ptr(),
            len: rest.len() as u32,
        };
        self.submit(slot, OP_SEND + d as u8, what);
    }

    fn on_sent(&mut self, slot: u32, d: usize, res: i32) {
        if res < 0 {
            return self.send_failed(slot, d, res);
        }
        self.count_sent(slot, d, res as u64);
        let c = self.conn(slot);
        let Some((bid, off, len)) = c.dirs[d].held else {
            return;
        };
        let off = off + res as usize;
        if off < len {
            c.dirs[d].held = Some((bid, off, len));
            return self.send(slot, d);
        }
        c.dirs[d].held = None;
        self.recycle(bid);
        self.recv(slot, d);
    }

    /// The source of direction `d` failed with `-res`: a reset is passed on as a reset
    /// to the other side; any other error resets both.
    fn recv_failed(&mut self, slot: u32, d: usize, res: i32) {
        let reset = -res == libc::ECONNRESET;
        let (rc, ru) = if d == UP {
            (false, reset)
        } else {
            (reset, false)
        };
        self.abort(slot, Some(src_reason(d, -res)), rc || !reset, ru || !reset);
    }

    /// The destination of direction `d` failed with `-res`: reset the side we were
    /// reading from (both on an error other than a reset).
    fn send_failed(&mut self, slot: u32, d: usize, res: i32) {
        let reset = matches!(-res, libc::ECONNRESET | libc::EPIPE);
        let (rc, ru) = if d == UP {
            (reset, false)
        } else {
            (false, reset)
        };
        self.abort(slot, Some(dst_reason(d, -res)), rc || !reset, ru || !reset);
    }

    /// `n` bytes of direction `d` reached their destination.
    fn count_sent(&mut self, slot: u32, d: usize, n: u64) {
        self.moved_this_pass += n;
        let now = self.now;
        let c = self.conn(slot);
        c.last_active = now;
        if let Some(i) = c.upstream_idx {
            let u = &c.route.pool.upstreams[i];
            let counter = if d == UP {
                &u.stats.bytes_up
            } else {
                &u.stats.bytes_down
            };
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    // --- zero-copy receive -------------------------------------------------------------

    fn zc_recv(&mut self, slot: u32, d: usize) {
        let size = self.buf_size as u32;
        let c = self.conn(slot);
        c.dirs[d].state = DirState::Busy;
        let fd = c.src(d);
        let Some(z) = c.dirs[d].zc.as_deref_mut() else {
            return;
        };
        z.asked = size;
        z.got = 0;
        z.receiving = true;
        self.submit(slot, OP_RECV + d as u8, Op::RecvZc { fd, len: size });
    }

    /// A zero-copy receive completed: a chunk (with F_MORE), or its end — 0 once it
    /// delivered what it asked for (receive again once sent) or at end of file. What it
    /// brought is sent once the whole batch of completions is in ([`Self::flush_zc`]).
    fn on_zc_recv(&mut self, slot: u32, d: usize, res: i32, flags: u32) {
        if res < 0 && !ops::more(flags) && matches!(-res, libc::ENOSPC | libc::ENOMEM) {
            // The kernel ended the receive for lack of room without consuming anything:
            // a full completion queue is drained by the next batch, so receive again
            // then; an empty area refills only as chunks come back or the NIC recycles
            // pages, so wait a little first (not a tight loop).
            self.stats.zero_copy_retries += 1;
            let now = self.now;
            let c = self.conn(slot);
            c.dirs[d].state = DirState::Starved;
            if let Some(z) = c.dirs[d].zc.as_deref_mut() {
                z.receiving = false;
            }
            if -res == libc::ENOMEM {
                self.zc_nomem.push_back((slot, d));
                self.zc_nomem_until = now + ZC_NOMEM_BACKOFF;
            } else {
                self.zc_pending.push((slot, d));
            }
            return;
        }
        if res < 0 {
            if -res == libc::EFAULT {
                // Pages of a zero-copy queue reached a worker that cannot read them: a
                // flow was steered to a queue but not to its worker (see the README).
                self.zc_efaults += 1;
                if self.zc_efaults.is_power_of_two() {
                    tracing::warn!(
                        cpu = self.stats.cpu,
                        times = self.zc_efaults,
                        "zero-copy receive: EFAULT (a flow on another worker's zero-copy queue?)"
                    );
                }
            }
            return self.recv_failed(slot, d, res);
        }
        let more = ops::more(flags);
        let chunk = ops::received_buffer(flags);
        if res > 0 {
            self.stats.zero_copy_bytes += res as u64;
        }
        let now = self.now;
        let Some(c) = self.conns[slot as usize].as_deref_mut() else {
            return;
        };
        c.last_active = now;
        let Some(z) = c.dirs[d].zc.as_deref_mut() else {
            return;
        };
        if res > 0 {
            let Some(ops::BufId::Zc(id)) = chunk else {
                tracing::error!(flags, "a zero-copy receive completed without a chunk");
                return self.abort(slot, Some(Reason::SocketError), true, true);
            };
            z.chunks.push_back((id, res as u32));
            z.got = z.got.saturating_add(res as u32);
            self.zc_held += 1;
        }
        if !more {
            z.receiving = false;
            if res == 0 && z.got < z.asked {
                c.dirs[d].eof = true;
            }
        }
        self.zc_pending.push((slot, d));
    }

    /// After a batch of completions: sends what the zero-copy directions received, then
    /// lets waiting directions receive again while the chunk budget allows.
    fn flush_zc(&mut self) {
        let retry = std::mem::take(&mut self.zc_waiting);
        let pending = std::mem::take(&mut self.zc_pending);
        let nomem = if self.now >= self.zc_nomem_until {
            std::mem::take(&mut self.zc_nomem)
        } else {
            VecDeque::new()
        };
        for (slot, d) in pending.iter().copied().chain(retry).chain(nomem) {
            let live = self
                .conns
                .get(slot as usize)
                .and_then(|c| c.as_deref())
                .is_some_and(|c| c.phase == Phase::Streaming && c.dirs[d].zc.is_some());
            if live {
                self.zc_next(slot, d);
            }
        }
        self.zc_pending = pending;
        self.zc_pending.clear();
    }

    /// What a zero-copy direction does next: send what it holds; else, with nothing in
    /// flight, receive again or propagate end of file.
    fn zc_next(&mut self, slot: u32, d: usize) {
        let c = self.conn(slot);
        let eof = c.dirs[d].eof;
        let Some(z) = c.dirs[d].zc.as_deref() else {
            return;
        };
        if z.sending || (z.chunks.is_empty() && z.receiving) {
            return;
        }
        if !z.chunks.is_empty() {
            self.zc_send(slot, d);
        } else if eof {
            self.end_direction(slot, d);
        } else if self.zc_held >= self.zc_budget {
            // The area is half held by connections: the NIC needs the rest. Received
            // again once chunks come back (counted once per wait, not per re-check).
            let dir = &mut self.conn(slot).dirs[d];
            let already = dir.state == DirState::Starved;
            dir.state = DirState::Starved;
            if !already {
                self.stats.zero_copy_waits += 1;
            }
            self.zc_waiting.push_back((slot, d));
        } else {
            self.zc_recv(slot, d);
        }
    }

    /// Sends the held chunks (up to [`ZC_IOV`]) straight from the zero-copy area.
    fn zc_send(&mut self, slot: u32, d: usize) {
        let Some(c) = self.conns[slot as usize].as_deref_mut() else {
            return;
        };
        let fd = c.dst(d);
        let Some(z) = c.dirs[d].zc.as_deref_mut() else {
            return;
        };
        let m = z.send.as_ptr();
        let mut n = 0;
        for (i, &(id, len)) in z.chunks.iter().take(ZC_IOV).enumerate() {
            let data = self.ops.buf(ops::BufId::Zc(id), len as usize);
            let skip = if i == 0 { z.sent } else { 0 };
            let Some(rest) = data.get(skip..).filter(|_| data.len() == len as usize) else {
                tracing::error!(
                    id,
                    len,
                    skip,
                    have = data.len(),
                    "a zero-copy chunk is not where it was"
                );
                return self.abort(slot, Some(Reason::SocketError), true, true);
            };
            // SAFETY: `m` is this direction's own message (see `ZcDir::send`); no send
            // is in flight (`sending` is false), so nothing else reads it now.
            unsafe {
                (*m).iov[i] = libc::iovec {
                    iov_base: rest.as_ptr().cast_mut().cast(),
                    iov_len: rest.len(),
                };
            }
            n += 1;
        }
        // SAFETY: as above. The message and its iovecs stay put until the send completes
        // (freed with the direction, which outlives its operations), and so do the
        // chunks they point into (held until then).
        let msg = unsafe {
            (*m).msg = std::mem::zeroed();
            (*m).msg.msg_iov = (&raw mut (*m).iov).cast();
            (*m).msg.msg_iovlen = n;
            &raw const (*m).msg
        };
        z.sending = true;
        self.submit(slot, OP_SEND + d as u8, Op::SendMsg { fd, msg });
    }

    fn on_zc_sent(&mut self, slot: u32, d: usize, res: i32) {
        if res < 0 {
            return self.send_failed(slot, d, res);
        }
        self.count_sent(slot, d, res as u64);
        let Some(c) = self.conns[slot as usize].as_deref_mut() else {
            return;
        };
        let Some(z) = c.dirs[d].zc.as_deref_mut() else {
            return;
        };
        z.sending = false;
        let mut left = res as usize;
        while let Some(&(id, len)) = z.chunks.front() {
            let rest = len as usize - z.sent;
            if left < rest {
                z.sent += left;
                break;
            }
            left -= rest;
            z.sent = 0;
            z.chunks.pop_front();
            self.ops.recycle(ops::BufId::Zc(id));
            self.zc_held -= 1;
        }
        self.zc_next(slot, d);
    }

    fn recycle(&mut self, bid: u16) {
        self.ops.recycle(ops::BufId::Pool(bid));
    }

    /// Re-issues the receives that found no buffer, once the pool has some again (not
    /// before: they would only find none, in a busy loop).
    fn feed_starved(&mut self) {
        if !self.ops.buffers_available() {
            return;
        }
        for _ in 0..self.starved.len() {
            let Some((slot, d)) = self.starved.pop_front() else {
                break;
            };
            let live = self
                .conns
                .get(slot as usize)
                .and_then(|c| c.as_deref())
                .is_some_and(|c| {
                    // A zero-copy direction waits in its own queue (and may have taken
                    // over the slot of a connection that waited here).
                    c.phase == Phase::Streaming
                        && c.dirs[d].state == DirState::Starved
                        && c.dirs[d].zc.is_none()
                });
            if live {
                self.recv(slot, d);
            }
        }
    }

    /// The splice path: move what the pipe holds to the destination, then refill it from
    /// the source, until one of them would block (then poll it) or EOF.
    fn splice_pump(&mut self, slot: u32, d: usize) {
        let mut moved = 0;
        self.splice_pump_counting(slot, d, &mut moved);
        self.moved_this_pass += moved;
    }

    fn splice_pump_counting(&mut self, slot: u32, d: usize, moved: &mut u64) {
        let now = self.now;
        for _ in 0..SPLICE_PUMP_ROUNDS {
            let c = self.conn(slot);
            if c.phase != Phase::Streaming {
                return;
            }
            let (src, dst) = (c.src(d), c.dst(d));
            let dir = &mut c.dirs[d];
            let Some(pipe) = dir.pipe.as_ref() else {
                return;
            };
            if dir.in_pipe > 0 {
                match socket::splice(pipe.read.as_raw_fd(), dst, dir.in_pipe) {
                    Ok(n) => {
                        dir.in_pipe -= n;
                        c.last_active = now;
                        *moved += n as u64;
                        if let Some(i) = c.upstream_idx {
                            let s = &c.route.pool.upstreams[i].stats;
                            let counter = if d == UP { &s.bytes_up } else { &s.bytes_down };
                            counter.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return self.poll(slot, d, false);
                    }
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(0);
                        let reset = matches!(errno, libc::ECONNRESET | libc::EPIPE);
                        let (rc, ru) = if d == UP {
                            (reset, false)
                        } else {
                            (false, reset)
                        };
                        return self.abort(
                            slot,
                            Some(dst_reason(d, errno)),
                            rc || !reset,
                            ru || !reset,
                        );
                    }
                }
            }
            if dir.eof {
                return self.end_direction(slot, d);
            }
            match socket::splice(src, pipe.write.as_raw_fd(), pipe.capacity) {
                Ok(0) => dir.eof = true,
                Ok(n) => {
                    dir.in_pipe = n;
                    c.last_active = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.poll(slot, d, true);
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(0);
                    let reset = errno == libc::ECONNRESET;
                    let (rc, ru) = if d == UP {
                        (false, reset)
                    } else {
                        (reset, false)
                    };
                    return self.abort(
                        slot,
                        Some(src_reason(d, errno)),
                        rc || !reset,
                        ru || !reset,
                    );
                }
            }
        }
        // Fairness: other connections get their turn; this one is ready again at once.
        let readable = self.conn(slot).dirs[d].in_pipe == 0;
        self.poll(slot, d, readable);
    }

    fn poll(&mut self, slot: u32, d: usize, readable: bool) {
        let c = self.conn(slot);
        c.dirs[d].state = DirState::Busy;
        let (fd, events, op) = if readable {
            (c.src(d), libc::POLLIN, OP_POLL_IN)
        } else {
            (c.dst(d), libc::POLLOUT, OP_POLL_OUT)
        };
        self.submit(
            slot,
            op + d as u8,
            Op::Poll {
                fd,
                events: events as u32,
            },
        );
    }

    /// EOF on the source of direction `d`: half-close its destination; the connection
    /// ends when both directions have.
    fn end_direction(&mut self, slot: u32, d: usize) {
        let c = self.conn(slot);
        if let Some(dst) = if d == UP {
            c.upstream.as_ref()
        } else {
            Some(&c.client)
        } {
            socket::shutdown_write(dst);
        }
        c.dirs[d].state = DirState::Done;
        if c.dirs[1 - d].state == DirState::Done {
            c.phase = Phase::Closing;
            self.finish_if_idle(slot);
        }
    }

    // --- ending ------------------------------------------------------------------------

    /// Ends the connection abnormally: counts `reason` (on the upstream once one was
    /// chosen, else on the route), cancels what is in flight, and closes (resetting the
    /// sides asked for) once nothing is.
    fn abort(
        &mut self,
        slot: u32,
        reason: Option<Reason>,
        reset_client: bool,
        reset_upstream: bool,
    ) {
        self.begin_abort(slot, reason, reset_client, reset_upstream);
        self.finish_if_idle(slot);
    }

    /// [`Self::abort`] up to the cancellations, leaving the connection allocated.
    fn begin_abort(
        &mut self,
        slot: u32,
        reason: Option<Reason>,
        reset_client: bool,
        reset_upstream: bool,
    ) {
        let now = self.now;
        let c = self.conn(slot);
        if c.phase == Phase::Closing {
            return;
        }
        c.phase = Phase::Closing;
        c.last_active = now;
        c.reset_client = reset_client;
        c.reset_upstream = reset_upstream;
        if let Some(reason) = reason {
            match c.upstream_idx {
                Some(i) => c.route.pool.upstreams[i].stats.errors.add(reason, 1),
                None => c.route.stats.refused.add(reason, 1),
            }
        }
        if c.inflight > 0 {
            self.cancel_fds(slot);
        }
    }

    /// Cancels every operation on the connection's sockets. A cancellation that cannot
    /// be queued (a full submission queue) fails nothing here: the sweep tries again.
    fn cancel_fds(&mut self, slot: u32) {
        let c = self.conn(slot);
        let fds: Vec<RawFd> = std::iter::once(c.client.as_raw_fd())
            .chain(c.upstream.as_ref().map(AsRawFd::as_raw_fd))
            .collect();
        for fd in fds {
            self.submit(slot, OP_CANCEL, Op::CancelFd { fd });
        }
        // Cancel while the fds still name these sockets.
        self.ops.flush();
    }

    /// A closing connection still waiting for operations long after cancelling them:
    /// cancels them again, so that one lost cancellation cannot hold its sockets open.
    fn cancel_in_flight(&mut self, slot: u32) {
        let now = self.now;
        let c = self.conn(slot);
        c.last_active = now;
        tracing::warn!(
            client = %c.client_addr,
            in_flight = c.inflight,
            "a closing connection still has operations in flight; cancelling them again"
        );
        self.stats.cancel_retries += 1;
        self.cancel_fds(slot);
    }

    /// Closes and frees a closing connection once none of its operations is in flight.
    fn finish_if_idle(&mut self, slot: u32) {
        let c = self.conn(slot);
        if c.phase != Phase::Closing || c.inflight > 0 {
            return;
        }
        let Some(c) = self.conns[slot as usize].take() else {
            return;
        };
        self.free.push(slot);
        self.ops.forget(c.client.as_raw_fd());
        if let Some(u) = &c.upstream {
            self.ops.forget(u.as_raw_fd());
        }
        if c.reset_client {
            socket::reset_on_close(&c.client);
        }
        if let Some(u) = &c.upstream
            && c.reset_upstream
        {
            socket::reset_on_close(u);
        }
        for d in &c.dirs {
            if let Some((bid, _, _)) = d.held {
                self.recycle(bid);
            }
            for &(id, _) in d.zc.iter().flat_map(|z| z.chunks.iter()) {
                self.ops.recycle(ops::BufId::Zc(id));
                self.zc_held -= 1;
            }
        }
        c.route.stats.active.fetch_sub(1, Ordering::AcqRel);
        self.shared.budget.release();
        if let Some(i) = c.upstream_idx {
            c.route.pool.upstreams[i]
                .active
                .fetch_sub(1, Ordering::AcqRel);
        }
        drop(c); // closes both sockets (and the pipes)
    }
}

/// Stops the other workers when this one panics. A worker that died has closed its
/// listeners and dropped its connections; rather than serve on with a share of the
/// workers gone (and say so only at exit), the others drain and the daemon exits with an
/// error, for its supervisor to restart it.
struct HaltOnPanic(Arc<AtomicBool>);

impl Drop for HaltOnPanic {
    fn drop(&mut self) {
        if thread::panicking() {
            tracing::error!("a TCP worker panicked: the other workers drain and stop");
            self.0.store(true, Ordering::Release);
        }
    }
}

/// user_data of a connection's operation.
fn user_data(slot: u32, op: u8) -> u64 {
    u64::from(slot) << 8 | u64::from(op)
}

/// Runs the forwarder on `cpus` (one pinned worker each) until `stop` is set, then
/// drains: listeners close, open connections get `drain` to finish, the rest are reset.
/// Marks forwarding [`Lifecycle::Stopped`] when dropped.
struct StoppedOnExit(Arc<SharedRoutes>);

impl Drop for StoppedOnExit {
    fn drop(&mut self) {
        self.0.advance(Lifecycle::Stopped);
    }
}

pub fn run(
    shared: Arc<SharedRoutes>,
    cpus: &[usize],
    engine: BackendChoice,
    stop: Arc<AtomicBool>,
    on_started: Option<crate::privileges::OnStarted>,
) -> anyhow::Result<TcpSummary> {
    // However this ends (including a start that fails), readiness then says stopped.
    let _stopped = StoppedOnExit(Arc::clone(&shared));
    let (engine, engine_fallback) = resolve_engine(engine)?;
    if let Some(why) = &engine_fallback {
        tracing::warn!(reason = %why, "TCP forwarding falls back to epoll");
    }
    let started = Instant::now();
    let routes = shared.latest();
    size_connection_budget(&shared)?;
    let (copy, why) = resolve_copy(routes.settings.copy, engine)?;
    if let Some(why) = why {
        tracing::warn!(reason = %why, "copying through provided buffers");
    }
    // Asked of the kernel once for both: the probe a start with zero_copy on reports,
    // and the plan. Off (the default) asks nothing: `doctor` says what the host can do.
    let zero_copy_on = routes.settings.zero_copy.mode != ZeroCopyMode::Off;
    let recv_zc_unavailable = if zero_copy_on {
        ops::uring::recv_zc_unavailable()
    } else {
        None
    };
    let mut zero_copy = if zero_copy_on {
        probe_zero_copy(&routes, recv_zc_unavailable.as_deref())
    } else {
        Vec::new()
    };
    let plans = plan_zero_copy(
        &routes.settings.zero_copy,
        engine,
        cpus.len(),
        recv_zc_unavailable.as_deref(),
    )?;
    tracing::info!(
        engine = engine.name(),
        copy = copy.name(),
        workers = cpus.len(),
        routes = routes.routes.len(),
        "TCP forwarding"
    );
    // Every socket is bound before any worker starts: an address in use fails the start.
    let mut listeners = Vec::with_capacity(cpus.len());
    for _ in cpus {
        let mut mine = Vec::new();
        for r in &routes.routes {
            let fd = socket::listener(r.spec.listen).with_context(|| {
                format!("route {}: listening on {}", r.spec.name, r.spec.listen)
            })?;
            mine.push((fd, Arc::clone(r)));
        }
        listeners.push(mine);
    }
    let steered_by_rx_queue = steer_zero_copy(&plans, &listeners)?;
    let halt = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::new();
    for (index, ((&cpu, mine), zc)) in cpus.iter().zip(listeners).zip(plans).enumerate() {
        let shared = Arc::clone(&shared);
        let stop = Arc::clone(&stop);
        let halt = Arc::clone(&halt);
        let ready = ready_tx.clone();
        handles.push(
            thread::Builder::new()
                .name(format!("ep-tcp-{cpu}"))
                .spawn(move || {
                    crate::cpus::pin(cpu);
                    #[allow(unused_mut)] // set only in debug builds
                    let mut worker = match Worker::new(cpu, engine, copy, shared, mine, zc) {
                        Ok(w) => w,
                        Err(e) => {
                            let _ = ready.send(Err(format!("worker on CPU {cpu}: {e}")));
                            return WorkerStats::default();
                        }
                    };
                    #[cfg(not(debug_assertions))]
                    let _ = index;
                    #[cfg(debug_assertions)]
                    if index == 0 {
                        worker.panic_at = std::env::var(FAULT_PANIC_WORKER)
                            .ok()
                            .and_then(|s| s.parse::<f64>().ok())
                            .and_then(|s| Duration::try_from_secs_f64(s).ok())
                            .map(|after| Instant::now() + after);
                    }
                    let _ = ready.send(Ok(()));
                    let _halt_on_panic = HaltOnPanic(Arc::clone(&halt));
                    // Stop when asked, or when another worker failed to start or died.
                    worker.run(&[&stop, &halt])
                })
                .context("spawning a TCP worker")?,
        );
    }
    drop(ready_tx);
    let mut failure = None;
    for _ in 0..handles.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a TCP worker ended before starting".into()),
        }
    }
    // Every listener is bound and every worker ready: what needed privileges is done.
    if failure.is_none()
        && let Some(Err(e)) = on_started.map(|f| f())
    {
        failure = Some(format!("{e:#}"));
    }
    match &failure {
        Some(_) => halt.store(true, Ordering::Release),
        None => {
            shared.advance(Lifecycle::Serving);
            tracing::info!(workers = cpus.len(), "TCP forwarding started");
        }
    }
    let mut workers = Vec::new();
    let mut panicked = 0;
    for h in handles {
        match h.join() {
            Ok(w) => workers.push(w),
            Err(_) => panicked += 1,
        }
    }
    if panicked > 0 {
        anyhow::bail!(
            "{panicked} TCP worker(s) panicked (the message is above); the others drained and stopped"
        );
    }
    if let Some(e) = failure {
        anyhow::bail!("TCP forwarding could not start: {e}");
    }
    let zc = &routes.settings.zero_copy;
    let registered = workers.iter().any(|w| w.zero_copy_queue.is_some());
    for z in &mut zero_copy {
        z.used = registered && zc.interface.as_deref() == Some(z.iface.as_str());
    }
    Ok(TcpSummary {
        engine: engine.name(),
        engine_fallback,
        copy: copy.name(),
        zero_copy,
        steered_by_rx_queue,
        workers,
        routes: shared.latest().json(),
        elapsed_s: started.elapsed().as_secs_f64(),
        connection_capacity: shared.budget.capacity(),
        privileges: crate::privileges::status(),
    })
}

/// Sizes the connection budget from the descriptor limit (raised at start) and says so.
fn size_connection_budget(shared: &SharedRoutes) -> anyhow::Result<()> {
    use crate::limits::{FDS_PER_CONNECTION, RESERVED_FDS, connection_capacity, nofile, open_fds};
    let n = nofile().map_err(|e| anyhow::anyhow!("reading RLIMIT_NOFILE: {e}"))?;
    let open = open_fds();
    let capacity = connection_capacity(n.soft, open);
    anyhow::ensure!(
        capacity > 0,
        "the file-descriptor limit ({} open files, {open} in use) leaves no room for a proxied connection ({FDS_PER_CONNECTION} each, {RESERVED_FDS} kept for the rest): raise it (ulimit -n, or LimitNOFILE= in the systemd unit)",
        n.soft
    );
    shared.budget.set_capacity(capacity);
    tracing::info!(
        connections = capacity,
        open_files_limit = n.soft,
        per_connection = FDS_PER_CONNECTION,
        reserved = RESERVED_FDS,
        "TCP connections limited by the file-descriptor limit (beyond it: refused, counted as fd_limit)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_epoll_with_the_reason_and_explicit_io_uring_does_not() {
        let why = || Some("io_uring is disabled (kernel.io_uring_disabled=2)".to_owned());
        let (e, reason) = choose_engine(BackendChoice::Auto, why()).unwrap();
        assert_eq!(e, Engine::Epoll);
        assert!(reason.unwrap().contains("io_uring_disabled"));
        assert_eq!(
            choose_engine(BackendChoice::Auto, None).unwrap(),
            (Engine::IoUring, None)
        );
        let err = choose_engine(BackendChoice::IoUring, why()).unwrap_err();
        assert!(err.to_string().contains("not usable here"), "{err}");
        // epoll when asked, whatever io_uring can do.
        for u in [None, why()] {
            assert_eq!(
                choose_engine(BackendChoice::Epoll, u).unwrap(),
                (Engine::Epoll, None)
            );
        }
        // The buffers path needs no io_uring on epoll.
        assert_eq!(buffers_unavailable(Engine::Epoll), None);
    }

    /// The worker's zero-copy direction over the emulated queue (no NIC here can register
    /// one): every byte arrives in order, end of file is propagated as a half-close while
    /// the other direction keeps flowing, chunks are all given back (the emulation
    /// asserts it when the worker ends), and a direction holds at most one buffer's
    /// worth of chunks.
    #[test]
    fn zero_copy_direction_forwards_in_order_half_closes_and_returns_every_chunk() {
        use std::io::{Read, Write};

        use crate::tcp::ops::zcrx::emulation::ZcEmulation;
        const PIECE: usize = 3000;
        const BUDGET: usize = 2;
        for engine in engines() {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let tw = TestWorker::start(engine, "", move |w, addr| {
                let mut emu =
                    ZcEmulation::new(backend(engine, Some((16, 16_384))), PIECE as u32, 16_384);
                emu.fail_every = Some(7);
                ready_tx
                    .send((Arc::clone(&emu.held_max), Arc::clone(&emu.iov_max)))
                    .unwrap();
                w.ops = Box::new(emu);
                w.zc_addrs = vec![addr.ip()];
                // A small chunk budget, so that receives wait for chunks to return.
                w.zc_budget = BUDGET;
            });
            let (addr, upstream, buf_size) =
                (tw.addr, tw.upstream.try_clone().unwrap(), tw.buf_size);
            let (held_max, iov_max) = ready_rx.recv().unwrap();
            // Three connections at once, so that one's held chunks make another wait.
            const CONNS: u32 = 3;
            let data = |k: u32| -> Vec<u8> {
                (0..1_000_000u32)
                    .map(|i| (i.wrapping_mul(7 + k) % 251) as u8)
                    .collect()
            };
            let reply: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
            let server = {
                let reply = reply.clone();
                thread::spawn(move || {
                    let mut served = Vec::new();
                    for _ in 0..CONNS {
                        let (mut s, _) = upstream.accept().unwrap();
                        let reply = reply.clone();
                        served.push(thread::spawn(move || {
                            // The first 4 bytes name the connection.
                            let mut got = Vec::new();
                            // Slowly at first: the proxy's sends back up against a full
                            // socket.
                            let mut first = [0u8; 1000];
                            for _ in 0..20 {
                                thread::sleep(Duration::from_millis(5));
                                let n = s.read(&mut first).unwrap();
                                got.extend_from_slice(&first[..n]);
                            }
                            s.read_to_end(&mut got).unwrap(); // ends at the propagated EOF
                            s.write_all(&reply).unwrap();
                            got
                        }));
                    }
                    let got = served
                        .into_iter()
                        .map(|h| h.join().unwrap())
                        .collect::<Vec<_>>();
                    // One more connection, reset by the upstream mid-stream while the
                    // proxy still holds chunks of it: they must all come back.
                    let (mut s, _) = upstream.accept().unwrap();
                    let mut some = [0u8; 1000];
                    s.read_exact(&mut some).unwrap();
                    // Not reading: the socket fills and the proxy's send waits holding
                    // chunks when the reset comes.
                    thread::sleep(Duration::from_millis(300));
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
                        .unwrap();
                    drop(s);
                    got
                })
            };
            let clients: Vec<_> = (0..CONNS)
                .map(|k| {
                    thread::spawn(move || {
                        let mut c = std::net::TcpStream::connect(addr).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        c.write_all(&k.to_be_bytes()).unwrap();
                        c.write_all(&data(k)).unwrap();
                        c.shutdown(std::net::Shutdown::Write).unwrap();
                        let mut back = Vec::new();
                        c.read_to_end(&mut back).unwrap();
                        back
                    })
                })
                .collect();
            for c in clients {
                let back = c.join().unwrap();
                assert!(
                    back == reply,
                    "{engine:?}: reply {} of {}",
                    back.len(),
                    reply.len()
                );
            }
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            // Sends until the reset comes back through the proxy.
            let chunk = vec![7u8; 64 * 1024];
            let reset = (0..1000).any(|_| c.write_all(&chunk).is_err());
            assert!(reset, "{engine:?}: the upstream's reset reached the client");
            let got = server.join().unwrap();
            // The worker's end also checks that every chunk came back.
            let stats = tw.stop();
            let mut total = 0;
            for g in &got {
                let k = u32::from_be_bytes(g[..4].try_into().unwrap());
                let want = data(k);
                assert!(
                    g[4..] == want[..],
                    "{engine:?}: connection {k}: {} of {} bytes, in order: false",
                    g.len() - 4,
                    want.len()
                );
                total += g.len() as u64;
            }
            assert_eq!(stats.zero_copy_streams, u64::from(CONNS) + 1, "{engine:?}");
            assert!(stats.zero_copy_bytes >= total, "{engine:?}");
            let most = held_max.load(Ordering::Relaxed);
            assert!(
                most <= CONNS as usize * buf_size,
                "{engine:?}: {most} bytes held in chunks at once, more than one {buf_size}-byte buffer per connection"
            );
            assert!(
                iov_max.load(Ordering::Relaxed) > 1,
                "{engine:?}: a sendmsg carried several chunks"
            );
            assert!(stats.zero_copy_retries > 0, "{engine:?}: ENOSPC retried");
            assert!(
                stats.zero_copy_waits > 0,
                "{engine:?}: the chunk budget held receives back"
            );
        }
    }

    #[test]
    fn a_worker_that_panics_halts_the_others_and_one_that_returns_does_not() {
        let halt = Arc::new(AtomicBool::new(false));
        let spawn = |fail: bool| {
            let halt = Arc::clone(&halt);
            thread::spawn(move || {
                let _guard = HaltOnPanic(halt);
                assert!(!fail, "a worker bug");
            })
        };
        assert!(spawn(false).join().is_ok());
        assert!(!halt.load(Ordering::Acquire));
        assert!(spawn(true).join().is_err());
        assert!(halt.load(Ordering::Acquire));
    }

    /// A backend that meddles: it holds back every batch carrying a completion of
    /// operation `hold_after.0` (of any connection) for `hold_after.1`, and refuses the
    /// first `refuse_cancels` cancellations as a full submission queue would.
    struct Meddling {
        inner: Box<dyn Ops>,
        hold_after: Option<(u8, Duration)>,
        refuse_cancels: usize,
        /// Counts waits that did not sleep (zero timeout) and brought completions.
        answered_polls: Option<Arc<std::sync::atomic::AtomicU64>>,
    }

    impl Meddling {
        /// `engine`'s backend, passed through untouched until a test sets a field.
        fn around(engine: Engine) -> Self {
            Self {
                inner: backend(engine, None),
                hold_after: None,
                refuse_cancels: 0,
                answered_polls: None,
            }
        }
    }

    impl Ops for Meddling {
        fn push(&mut self, op: Op, user_data: u64) -> bool {
            if matches!(op, Op::CancelFd { .. }) && self.refuse_cancels > 0 {
                self.refuse_cancels -= 1;
                return false;
            }
            self.inner.push(op, user_data)
        }
        fn flush(&mut self) {
            self.inner.flush();
        }
        fn wait(&mut self, timeout: Duration, out: &mut Vec<(u64, i32, u32)>) {
            let before = out.len();
            self.inner.wait(timeout, out);
            if let Some(n) = &self.answered_polls
                && timeout.is_zero()
                && out.len() > before
            {
                n.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((op, hold)) = self.hold_after
                && out[before..]
                    .iter()
                    .any(|&(ud, _, _)| ud & LISTENER == 0 && (ud & 0xff) as u8 == op)
            {
                thread::sleep(hold);
            }
        }
        fn buf(&self, bid: ops::BufId, len: usize) -> &[u8] {
            self.inner.buf(bid, len)
        }
        fn recycle(&mut self, bid: ops::BufId) {
            self.inner.recycle(bid);
        }
        fn has_pool(&self) -> bool {
            self.inner.has_pool()
        }
        fn buffers_available(&self) -> bool {
            self.inner.buffers_available()
        }
        fn add_pool(&mut self, count: u16, size: usize) -> io::Result<()> {
            self.inner.add_pool(count, size)
        }
        fn forget(&mut self, fd: RawFd) {
            self.inner.forget(fd);
        }
        fn name(&self) -> &'static str {
            self.inner.name()
        }
    }

    /// A worker on `engine` (splice path) for one route from `addr` to `upstream` (a
    /// listener the test accepts on) with `extra` route settings, `setup` applied to it
    /// (and its address) on its thread before it runs; it runs until [`Self::stop`].
    struct TestWorker {
        addr: SocketAddr,
        upstream: std::net::TcpListener,
        buf_size: usize,
        stop: Arc<AtomicBool>,
        worker: thread::JoinHandle<WorkerStats>,
    }

    impl TestWorker {
        fn start(
            engine: Engine,
            extra: &str,
            setup: impl FnOnce(&mut Worker, SocketAddr) + Send + 'static,
        ) -> Self {
            let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let up_addr = upstream.local_addr().unwrap();
            let listen = socket::listener("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = socket::local_addr(&listen).unwrap();
            let cfg = crate::config::parse_config(
                "t.toml",
                &format!("[[route]]\nlisten = \"{addr}\"\nupstreams = [\"{up_addr}\"]\n{extra}\n"),
            )
            .unwrap();
            let buf_size = cfg.tcp.buffer_size;
            let shared = SharedRoutes::new(super::super::Routes::build(
                &cfg.routes,
                cfg.tcp.clone(),
                None,
            ));
            let route = Arc::clone(&shared.latest().routes[0]);
            let stop = Arc::new(AtomicBool::new(false));
            let worker = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut w = Worker::new(
                        0,
                        engine,
                        CopyPath::Splice,
                        shared,
                        vec![(listen, route)],
                        ZcPlan::Off,
                    )
                    .unwrap();
                    setup(&mut w, addr);
                    w.run(&[&stop])
                })
            };
            Self {
                addr,
                upstream,
                buf_size,
                stop,
                worker,
            }
        }

        /// Stops the worker; its stats.
        fn stop(self) -> WorkerStats {
            self.stop.store(true, Ordering::Release);
            self.worker.join().expect("the worker did not panic")
        }
    }

    /// A fresh backend of `engine` (with a buffer pool of `pool` = (count, size)).
    fn backend(engine: Engine, pool: Option<(u16, usize)>) -> Box<dyn Ops> {
        match engine {
            Engine::IoUring => Box::new(UringOps::new(pool).unwrap()),
            Engine::Epoll => Box::new(EpollOps::new(pool).unwrap()),
        }
    }

    /// One `read`, retried when interrupted. This thread made rings (the engine probe):
    /// their teardown interrupts a socket read with a timeout once, as a signal would.
    fn read_some(r: &mut impl std::io::Read, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match r.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn engines() -> Vec<Engine> {
        let mut engines = vec![Engine::Epoll];
        if ops::uring::unavailable().is_none() {
            engines.push(Engine::IoUring);
        }
        engines
    }

    /// Routes that come and go reuse the listener slots reloads closed (the vector does
    /// not grow with churn), and an accept that completes for an earlier listener at a
    /// reused index is not taken for the new route: the connection is closed, uncounted.
    /// (The same reloads also carry `busy_poll_usec` and `bulk_poll_usec` to the worker.)
    #[test]
    fn reloads_reuse_closed_listener_slots_and_drop_stale_accepts() {
        use std::os::fd::{IntoRawFd as _, RawFd};
        for engine in engines() {
            let listen_a = socket::listener("127.0.0.1:0".parse().unwrap()).unwrap();
            let a = socket::local_addr(&listen_a).unwrap();
            // Another loopback address on the same port: free, since the port is ours.
            let b = SocketAddr::new("127.0.0.2".parse().unwrap(), a.port());
            let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let up_addr = up.local_addr().unwrap();
            let config = |with_b: bool| {
                let mut text = format!(
                    "[[route]]\nname = \"a\"\nlisten = \"{a}\"\nupstreams = [\"{up_addr}\"]\n"
                );
                if with_b {
                    text += &format!(
                        "[[route]]\nname = \"b\"\nlisten = \"{b}\"\nupstreams = [\"{up_addr}\"]\n"
                    );
                }
                crate::config::parse_config("t.toml", &text).unwrap()
            };
            let (only_a, with_b) = (config(false), config(true));
            let shared = SharedRoutes::new(super::super::Routes::build(
                &only_a.routes,
                only_a.tcp.clone(),
                None,
            ));
            let route_a = Arc::clone(&shared.latest().routes[0]);
            let mut w = Worker::new(
                0,
                engine,
                CopyPath::Splice,
                Arc::clone(&shared),
                vec![(listen_a, route_a)],
                ZcPlan::Off,
            )
            .unwrap();
            let tag_of = |w: &Worker, li: usize| w.listeners[li].as_ref().map(|l| l.tag);
            let mut tags = Vec::new();
            for _ in 0..10 {
                shared.publish(&with_b.routes, with_b.tcp.clone());
                w.follow_reload();
                assert_eq!(w.listeners.len(), 2, "{engine:?}");
                tags.push(tag_of(&w, 1).expect("b listens"));
                shared.publish(&only_a.routes, only_a.tcp.clone());
                w.follow_reload();
                assert!(w.listeners[1].is_none(), "{engine:?}");
            }
            tags.dedup();
            assert_eq!(tags.len(), 10, "{engine:?}: each b gets its own tag");
            // Busy polling follows reloads too, both ways.
            let mut polling = only_a.tcp.clone();
            polling.busy_poll_usec = 500;
            polling.bulk_poll_usec = 0;
            shared.publish(&only_a.routes, polling);
            w.follow_reload();
            assert_eq!(
                (w.busy_poll, w.bulk_poll),
                (Duration::from_micros(500), Duration::ZERO),
                "{engine:?}"
            );
            shared.publish(&only_a.routes, only_a.tcp.clone());
            w.follow_reload();
            assert_eq!(
                (w.busy_poll, w.bulk_poll),
                (Duration::ZERO, Duration::from_micros(200)),
                "{engine:?}"
            );
            // b once more, at index 1; an accept of the b before it completes now.
            shared.publish(&with_b.routes, with_b.tcp.clone());
            w.follow_reload();
            let stale_tag = tags[9];
            assert_ne!(tag_of(&w, 1), Some(stale_tag));
            let mut client = std::net::TcpStream::connect(up_addr).unwrap();
            let (accepted, _) = up.accept().unwrap();
            let fd: RawFd = accepted.into_raw_fd();
            w.on_accept(1, stale_tag, fd, 0);
            let route_b = Arc::clone(&shared.latest().routes[1]);
            assert_eq!(
                route_b.stats.accepted.load(Ordering::Relaxed),
                0,
                "{engine:?}"
            );
            assert_eq!(w.open(), 0, "{engine:?}");
            assert_eq!(w.stats.closed_with_listener, 1, "{engine:?}");
            // The stale connection was closed: its peer reads EOF.
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let eof = read_some(&mut client, &mut [0u8; 1]);
            assert!(matches!(eof, Ok(0)), "{engine:?}: {eof:?}");
        }
    }

    /// A closing connection whose cancellations could not be queued cancels again from
    /// the sweep, instead of holding its sockets (and its client) open for good.
    #[test]
    fn a_lost_cancellation_is_retried_and_the_connection_closes() {
        for engine in engines() {
            // Idle connections are closed after 0.2 s; both cancellations (client and
            // upstream socket) of that close are refused.
            let w = TestWorker::start(engine, "idle_timeout = 0.2", move |w, _| {
                w.ops = Box::new(Meddling {
                    refuse_cancels: 2,
                    ..Meddling::around(engine)
                });
            });
            let mut c = std::net::TcpStream::connect(w.addr).unwrap();
            let (_held, _) = w.upstream.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let t = Instant::now();
            let end = read_some(&mut c, &mut [0u8; 1]);
            let took = t.elapsed();
            let stats = w.stop();
            assert!(
                matches!(end, Ok(0)),
                "{engine:?}: the idle connection was closed ({end:?} after {took:?})"
            );
            assert!(took >= CANCEL_AGAIN_AFTER, "{engine:?}: {took:?}");
            assert!(stats.cancel_retries >= 1, "{engine:?}: {stats:?}");
            assert_eq!(stats.left_open, 0, "{engine:?}");
        }
    }

    /// A client that sends half a PROXY header and goes silent is closed after
    /// `proxy_header_timeout` (not `idle_timeout`) and counted.
    #[test]
    fn a_half_proxy_header_is_closed_at_the_header_timeout() {
        for engine in engines() {
            let (tx, rx) = std::sync::mpsc::channel();
            let w = TestWorker::start(
                engine,
                "accept_proxy = true\nproxy_header_timeout = 0.2\nidle_timeout = 60",
                move |w, _| tx.send(Arc::clone(&w.shared)).unwrap(),
            );
            let shared = rx.recv().unwrap();
            let mut c = std::net::TcpStream::connect(w.addr).unwrap();
            std::io::Write::write_all(&mut c, b"PROXY TCP4 192.0.2.1 ").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let t = Instant::now();
            let end = read_some(&mut c, &mut [0u8; 1]);
            let took = t.elapsed();
            let _ = w.stop();
            assert!(
                matches!(end, Ok(0)),
                "{engine:?}: closed ({end:?} after {took:?})"
            );
            assert!(took < Duration::from_secs(2), "{engine:?}: {took:?}");
            let route = &shared.latest().routes[0];
            assert_eq!(
                route.stats.refused.get(Reason::ProxyHeaderTimeout),
                1,
                "{engine:?}: counted"
            );
        }
    }

    /// A worker on `extra` whose backend counts, below the worker, waits that brought
    /// completions without sleeping: a worker that slept briefly instead of polling gets
    /// none.
    fn counting_answered_polls(
        engine: Engine,
        extra: &str,
    ) -> (TestWorker, Arc<std::sync::atomic::AtomicU64>) {
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&answered);
        let w = TestWorker::start(engine, extra, move |w, _| {
            w.ops = Box::new(Meddling {
                answered_polls: Some(counter),
                ..Meddling::around(engine)
            });
        });
        (w, answered)
    }

    /// `busy_poll_usec`: completions that come in while the worker polls are handled
    /// without it sleeping (counted), bytes intact; with 0 the worker never polls.
    #[test]
    fn busy_polling_handles_completions_that_come_while_polling() {
        const ROUNDS: u8 = 100;
        for engine in engines() {
            for poll_usec in [0u32, 10_000] {
                let (w, answered) = counting_answered_polls(
                    engine,
                    &format!("[tcp]\nbusy_poll_usec = {poll_usec}"),
                );
                round_trips(engine, &w, ROUNDS);
                let stats = w.stop();
                let answered = answered.load(Ordering::Relaxed);
                if poll_usec == 0 {
                    assert_eq!(
                        (stats.busy_poll_hits, stats.busy_poll_sleeps, answered),
                        (0, 0, 0),
                        "{engine:?}"
                    );
                } else {
                    assert_eq!(answered, stats.busy_poll_hits, "{engine:?}: {stats:?}");
                    // Each round trip is a few completions well within 10 ms of the
                    // last; allow for a loaded machine stalling half of them.
                    assert!(
                        stats.busy_poll_hits >= u64::from(ROUNDS) / 2,
                        "{engine:?}: {stats:?}"
                    );
                }
            }
        }
    }

    /// `rounds` round trips of 64 bytes through `w`, echoed by its upstream, checked.
    fn round_trips(engine: Engine, w: &TestWorker, rounds: u8) {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(w.addr).unwrap();
        let (mut up, _) = w.upstream.accept().unwrap();
        let echo = thread::spawn(move || {
            let mut buf = [0u8; 64];
            for _ in 0..rounds {
                up.read_exact(&mut buf).unwrap();
                up.write_all(&buf).unwrap();
            }
        });
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for i in 0..rounds {
            c.write_all(&[i; 64]).unwrap();
            let mut back = [0u8; 64];
            // read_exact retries an interrupted read itself.
            c.read_exact(&mut back)
                .unwrap_or_else(|e| panic!("{engine:?}: round {i}: {e}"));
            assert_eq!(back, [i; 64], "{engine:?}");
        }
        echo.join().unwrap();
    }

    /// `bulk_poll_usec`: a bulk transfer makes the worker poll (waits answered while
    /// polling, counted below the worker as in the test above); round trips of a few
    /// bytes never do, and with 0 neither does the bulk transfer.
    #[test]
    fn bulk_traffic_and_only_bulk_traffic_makes_the_worker_poll() {
        use std::io::{Read as _, Write as _};
        const SIZE: usize = 8 << 20;
        for engine in engines() {
            for (bulk_poll_usec, bulk) in [(10_000u32, true), (10_000, false), (0, true)] {
                let (w, answered) = counting_answered_polls(
                    engine,
                    &format!("[tcp]\nbulk_poll_usec = {bulk_poll_usec}"),
                );
                if bulk {
                    let mut c = std::net::TcpStream::connect(w.addr).unwrap();
                    let (mut up, _) = w.upstream.accept().unwrap();
                    // The upstream stalls first, so that passes then move whole pipes.
                    let reader = thread::spawn(move || {
                        thread::sleep(Duration::from_millis(100));
                        let mut got = Vec::new();
                        up.read_to_end(&mut got).unwrap();
                        got
                    });
                    let sent: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
                    c.write_all(&sent).unwrap();
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                    assert!(reader.join().unwrap() == sent, "{engine:?}: bytes differ");
                } else {
                    round_trips(engine, &w, 100);
                }
                let stats = w.stop();
                let answered = answered.load(Ordering::Relaxed);
                let case = format!("{engine:?}, bulk_poll_usec {bulk_poll_usec}, bulk {bulk}");
                if bulk_poll_usec > 0 && bulk {
                    assert!(stats.busy_poll_hits > 0, "{case}: {stats:?}");
                    assert_eq!(answered, stats.busy_poll_hits, "{case}: {stats:?}");
                    assert_eq!(stats.gathering_waits, 0, "{case}: {stats:?}");
                } else {
                    assert_eq!(
                        (stats.busy_poll_hits, stats.busy_poll_sleeps, answered),
                        (0, 0, 0),
                        "{case}"
                    );
                }
            }
        }
    }

    /// Regression: a connection whose client and upstream have both finished by the time
    /// its PROXY header is sent (the last operation in flight) ends while its directions
    /// are first pumped; the pump of the second must not look for it. This was a worker
    /// panic on short connections through `send_proxy` routes.
    #[test]
    fn a_connection_that_ends_as_it_starts_streaming_is_freed_once() {
        use std::io::{Read, Write};
        for engine in engines() {
            // Both ends are done before the worker learns the header went out.
            let w = TestWorker::start(engine, "send_proxy = \"v1\"", move |w, _| {
                w.ops = Box::new(Meddling {
                    hold_after: Some((OP_HDR_SEND, Duration::from_millis(100))),
                    ..Meddling::around(engine)
                });
            });
            let (addr, upstream) = (w.addr, w.upstream.try_clone().unwrap());
            const CONNS: usize = 3;
            let server = thread::spawn(move || {
                (0..CONNS)
                    .map(|_| {
                        let (mut s, _) = upstream.accept().unwrap();
                        s.shutdown(std::net::Shutdown::Write).unwrap();
                        let mut got = Vec::new();
                        s.read_to_end(&mut got).unwrap();
                        got
                    })
                    .collect::<Vec<_>>()
            });
            let mut want = Vec::new();
            for _ in 0..CONNS {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                let mut expected = Vec::new();
                proxy_protocol::encode(
                    proxy_protocol::Version::V1,
                    c.local_addr().unwrap(),
                    addr,
                    &mut expected,
                );
                expected.extend_from_slice(b"all at once");
                want.push(expected);
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                c.write_all(b"all at once").unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut back = Vec::new();
                c.read_to_end(&mut back).unwrap();
                assert!(back.is_empty(), "{engine:?}");
            }
            let got = server.join().unwrap();
            let stats = w.stop();
            assert_eq!(got, want, "{engine:?}");
            assert_eq!(stats.connections, CONNS as u64, "{engine:?}");
            assert_eq!(stats.left_open, 0, "{engine:?}");
        }
    }
}

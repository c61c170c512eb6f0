//! The daemon configuration: TOML, every field optional with an embedded default, so
//! the daemon runs with no file at all. `edgeproxy config check FILE` reports every
//! problem as file:line:column, like `policy check`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use crate::{
    diagnostics::{Collector, FileErrors},
    engine::{BackendChoice, ReceiveConfig},
    logs::{
        aggregate::{KeySpec, WindowLimits},
        pipeline::PipelineConfig,
    },
    tcp::{
        CopyMode, HealthSpec, RouteSpec, TcpSettings, UpstreamSpec, ZeroCopyMode, ZeroCopySettings,
        balance::Algorithm, pool::MAX_UPSTREAMS, proxy_protocol::Version as ProxyVersion,
    },
};

/// The configuration with no file: what `edgeproxy logs` uses by default.
pub const DEFAULTS: &str = r#"# edgeproxy defaults (every key may be overridden)
[engine]
kind = "auto"            # auto | io_uring | epoll
buffer_size = 9216       # largest datagram kept whole
buffers = 1024           # io_uring buffer ring entries (a power of two) / recvmmsg batch
merger_queue = 16        # windows/raw batches a worker may have queued for the merger
# data_cpus = [0, 1]     # default: the CPUs this process may use, within its CPU quota

[[listener]]
address = "0.0.0.0:514"
rcvbuf = 8388608

[[listener]]
address = "[::]:514"
rcvbuf = 8388608

[window]
seconds = 10
key = ["host", "app", "severity"]   # any of host, app, severity, facility, source
top_k = 20
max_keys = 10000
max_messages = 10000
max_message_len = 8192

[[sink]]
kind = "stdout"
what = "windows"
format = "json"

# TCP forwarding: used by `edgeproxy proxy`, and by `run` once the file has routes.
[tcp]
copy = "auto"              # auto (= splice) | splice | buffers
buffer_size = 32768        # buffers path: one provided buffer, the most one direction holds
buffers = 128              # buffers path: provided buffers per worker (a power of two)
pipe_size = 262144         # splice path: pipe capacity per direction
local_sndbuf = 262144      # send buffer of connections to peers on this host (0 = autotuning)
local_congestion = "reno"  # congestion control of connections to peers on this host ("" = the system's)
coalesce_usec = 20         # io_uring, bulk traffic: a wait gathers completions this long (0 = never)
busy_poll_usec = 0         # poll for completions this long before sleeping (0 = never)
bulk_poll_usec = 200       # the same, only within 1 ms of bulk traffic (0 = never: gather instead)
drain_seconds = 30         # after SIGTERM, open connections may finish this long
zero_copy = "off"          # off | auto | require (io_uring zero-copy receive; see the README)

# [[route]]
# listen = "0.0.0.0:8080"
# upstreams = ["10.0.0.1:80", "10.0.0.2:80"]

# [daemon]
# user = "nobody"          # who logs and proxy become once bound ("root" keeps root)
"#;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub sinks: Vec<SinkSpec>,
    /// TCP forwarding: settings shared by every route, and the routes.
    pub tcp: TcpSettings,
    pub routes: Vec<RouteSpec>,
    pub daemon: DaemonSettings,
}

/// `[daemon]`: who the daemon runs as once it has bound its sockets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Drop to this user after start (`None`: keep the user it was started as).
    pub user: Option<String>,
    /// Its group (default: the user's primary group).
    pub group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

/// A sink and what it receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkSpec {
    pub what: SinkContent,
    pub format: OutputFormat,
    pub sink: SinkConfig,
}

/// How a sink frames what it writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// RFC 5424 messages with RFC 6587 octet counting (`LEN SP <PRI>1 …`), the framing
    /// syslog receivers (rsyslog imtcp/imptcp, syslog-ng `syslog()`) accept over TCP.
    Rfc5424,
    /// Traditional syslog file lines (`TIMESTAMP HOST app[pid]: MSG`), the lines
    /// rsyslog's and syslog-ng's file destinations write; newline-delimited over TCP.
    Text,
}

impl OutputFormat {
    pub const ALL: [OutputFormat; 3] = [
        OutputFormat::Json,
        OutputFormat::Rfc5424,
        OutputFormat::Text,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Json => "json",
            OutputFormat::Rfc5424 => "rfc5424",
            OutputFormat::Text => "text",
        }
    }

    /// Position in [`OutputFormat::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Window reports, every raw message, or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SinkContent {
    #[default]
    Windows,
    Raw,
    Both,
}

impl SinkContent {
    pub fn windows(self) -> bool {
        matches!(self, SinkContent::Windows | SinkContent::Both)
    }
    pub fn raw(self) -> bool {
        matches!(self, SinkContent::Raw | SinkContent::Both)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkConfig {
    Stdout,
    /// Newline JSON to a TCP upstream, spooled on disk while it is down.
    Tcp {
        address: SocketAddr,
        spool_dir: PathBuf,
        max_spool_bytes: u64,
    },
    File {
        path: PathBuf,
        rotate_bytes: Option<u64>,
        rotate_every: Option<Duration>,
        keep: usize,
        fsync: FsyncPolicy,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Leave it to the kernel.
    Never,
    /// After each window's output (default): at most one window lost on power failure.
    Window,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    engine: Option<Spanned<RawEngine>>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    window: Option<Spanned<RawWindow>>,
    #[serde(default)]
    sink: Vec<Spanned<RawSink>>,
    tcp: Option<Spanned<RawTcp>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    daemon: Option<Spanned<RawDaemon>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    copy: Option<Spanned<String>>,
    buffer_size: Option<Spanned<i64>>,
    buffers: Option<Spanned<i64>>,
    pipe_size: Option<Spanned<i64>>,
    local_sndbuf: Option<Spanned<i64>>,
    local_congestion: Option<Spanned<String>>,
    coalesce_usec: Option<Spanned<i64>>,
    busy_poll_usec: Option<Spanned<i64>>,
    bulk_poll_usec: Option<Spanned<i64>>,
    drain_seconds: Option<Spanned<f64>>,
    zero_copy: Option<Spanned<String>>,
    zero_copy_interface: Option<Spanned<String>>,
    zero_copy_queues: Option<Spanned<Vec<Spanned<i64>>>>,
    zero_copy_area_mib: Option<Spanned<i64>>,
    zero_copy_refill_entries: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<Spanned<String>>,
    listen: Spanned<String>,
    upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    upstream: Vec<Spanned<RawUpstream>>,
    balance: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<f64>>,
    idle_timeout: Option<Spanned<f64>>,
    max_connections: Option<Spanned<i64>>,
    send_proxy: Option<Spanned<String>>,
    accept_proxy: Option<bool>,
    proxy_header_timeout: Option<Spanned<f64>>,
    eject_after: Option<Spanned<i64>>,
    eject_seconds: Option<Spanned<f64>>,
    health: Option<Spanned<RawHealth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<Spanned<f64>>,
    timeout: Option<Spanned<f64>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    kind: Option<Spanned<String>>,
    buffer_size: Option<Spanned<i64>>,
    buffers: Option<Spanned<i64>>,
    merger_queue: Option<Spanned<i64>>,
    data_cpus: Option<Spanned<Vec<i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: Spanned<String>,
    rcvbuf: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    seconds: Option<Spanned<f64>>,
    key: Option<Spanned<Vec<String>>>,
    top_k: Option<Spanned<i64>>,
    max_keys: Option<Spanned<i64>>,
    max_messages: Option<Spanned<i64>>,
    max_message_len: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    kind: Spanned<String>,
    what: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    spool_dir: Option<Spanned<String>>,
    max_spool_bytes: Option<Spanned<i64>>,
    rotate_bytes: Option<Spanned<i64>>,
    rotate_seconds: Option<Spanned<i64>>,
    keep: Option<Spanned<i64>>,
    fsync: Option<Spanned<String>>,
}

/// One of a few named values (the first is the default when the key is absent), or a
/// located error naming them all (and the default).
fn choice<T: Copy>(
    cx: &mut Collector<'_>,
    v: Option<&Spanned<String>>,
    what: &str,
    options: &[(&str, T)],
) -> T {
    let Some(v) = v else {
        return options[0].1;
    };
    if let Some(&(_, t)) = options
        .iter()
        .find(|(name, _)| *name == v.get_ref().as_str())
    {
        return t;
    }
    let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
    let (last, rest) = names
        .split_last()
        .map_or(("", &[][..]), |(l, r)| (l.as_str(), r));
    let listed = if rest.is_empty() {
        last.to_owned()
    } else {
        format!("{} or {last}", rest.join(", "))
    };
    cx.err(
        v.span(),
        format!("{what} must be {listed}, not {:?}", v.get_ref()),
    );
    options[0].1
}

/// [`int`], and a power of two.
fn power_of_two(
    cx: &mut Collector<'_>,
    v: &Spanned<i64>,
    what: &str,
    lo: i64,
    hi: i64,
) -> Option<i64> {
    let n = int(cx, v, what, lo, hi)?;
    if (n as u64).is_power_of_two() {
        Some(n)
    } else {
        cx.err(v.span(), format!("{what} must be a power of two, not {n}"));
        None
    }
}

/// An integer within `lo..=hi`, or a located error.
fn int(cx: &mut Collector<'_>, v: &Spanned<i64>, what: &str, lo: i64, hi: i64) -> Option<i64> {
    let n = *v.get_ref();
    if (lo..=hi).contains(&n) {
        Some(n)
    } else {
        cx.err(v.span(), format!("{what} must be {lo}..={hi}, not {n}"));
        None
    }
}

/// Seconds as a duration within `lo..=hi`, or a located error.
fn seconds(
    cx: &mut Collector<'_>,
    v: &Spanned<f64>,
    what: &str,
    lo: f64,
    hi: f64,
) -> Option<Duration> {
    let s = *v.get_ref();
    if (lo..=hi).contains(&s) {
        Duration::try_from_secs_f64(s).ok()
    } else {
        cx.err(
            v.span(),
            format!("{what} must be {lo}..={hi} seconds, not {s}"),
        );
        None
    }
}

/// `host:port` or `[v6]:port` as given, or a name resolved now (the first address the
/// resolver returns; a reload resolves again).
fn resolve(cx: &mut Collector<'_>, v: &Spanned<String>, what: &str) -> Option<SocketAddr> {
    let text = v.get_ref();
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Some(a);
    }
    lookup(cx, v, what)
}

#[cfg(not(fuzzing))]
fn lookup(cx: &mut Collector<'_>, v: &Spanned<String>, what: &str) -> Option<SocketAddr> {
    let text = v.get_ref();
    use std::net::ToSocketAddrs as _;
    match text.to_socket_addrs() {
        Ok(mut it) => match it.next() {
            Some(a) => Some(a),
            None => {
                cx.err(v.span(), format!("{what} {text:?} resolves to no address"));
                None
            }
        },
        Err(e) => {
            cx.err(
                v.span(),
                format!("{what} {text:?} is not an address:port or a resolvable name:port ({e})"),
            );
            None
        }
    }
}

/// Fuzzing builds (`cargo fuzz` passes `--cfg fuzzing`) look no name up: a resolver
/// query per input would make the fuzzer slow and its results depend on the network.
#[cfg(fuzzing)]
fn lookup(cx: &mut Collector<'_>, v: &Spanned<String>, what: &str) -> Option<SocketAddr> {
    let text = v.get_ref();
    cx.err(
        v.span(),
        format!("{what} {text:?}: no name lookups when fuzzing"),
    );
    None
}

/// `[tcp]`; `workers` is how many data CPUs the engine section names, if it does
/// (zero-copy receive needs a queue for each when required).
fn parse_tcp(
    cx: &mut Collector<'_>,
    raw: Option<&Spanned<RawTcp>>,
    workers: Option<usize>,
) -> TcpSettings {
    let mut t = TcpSettings::default();
    let Some(raw) = raw else { return t };
    let table = raw.span();
    let raw = raw.get_ref();
    if let Some(c) = &raw.copy {
        match c.get_ref().parse::<CopyMode>() {
            Ok(m) => t.copy = m,
            Err(m) => cx.err(c.span(), format!("tcp.{m}")),
        }
    }
    if let Some(v) = &raw.buffer_size
        && let Some(n) = int(cx, v, "tcp.buffer_size", 1024, 1 << 20)
    {
        t.buffer_size = n as usize;
    }
    if let Some(v) = &raw.buffers
        && let Some(n) = power_of_two(cx, v, "tcp.buffers", 2, 32_768)
    {
        t.buffers = n as u16;
    }
    if let Some(v) = &raw.pipe_size
        && let Some(n) = int(cx, v, "tcp.pipe_size", 4096, 1 << 20)
    {
        t.pipe_size = n as usize;
    }
    if let Some(v) = &raw.coalesce_usec
        && let Some(n) = int(cx, v, "tcp.coalesce_usec", 0, 1000)
    {
        t.coalesce_usec = n as u32;
    }
    if let Some(v) = &raw.busy_poll_usec
        && let Some(n) = int(cx, v, "tcp.busy_poll_usec", 0, 10_000)
    {
        t.busy_poll_usec = n as u32;
    }
    if let Some(v) = &raw.bulk_poll_usec
        && let Some(n) = int(cx, v, "tcp.bulk_poll_usec", 0, 10_000)
    {
        t.bulk_poll_usec = n as u32;
    }
    if let Some(v) = &raw.local_sndbuf
        && let Some(n) = int(cx, v, "tcp.local_sndbuf", 0, 1 << 30)
    {
        if (1..4096).contains(&n) {
            cx.err(
                v.span(),
                format!("tcp.local_sndbuf must be 0 (autotuning) or 4096..=1073741824, not {n}"),
            );
        } else {
            t.local_sndbuf = n as usize;
        }
    }
    if let Some(v) = &raw.local_congestion {
        t.local_congestion = congestion(cx, v);
    }
    if let Some(v) = &raw.drain_seconds
        && let Some(d) = seconds(cx, v, "tcp.drain_seconds", 0.0, 86_400.0)
    {
        t.drain = d;
    }
    parse_zero_copy(cx, raw, table, workers, &mut t.zero_copy);
    t
}

/// `tcp.local_congestion`: "" is the system's default (`None`); a name must be one the
/// kernel has, so that a typo fails the load instead of every connect. Unchecked when
/// the kernel's list cannot be read (then a failing name is counted per connection).
fn congestion(cx: &mut Collector<'_>, v: &Spanned<String>) -> Option<String> {
    let name = v.get_ref();
    if name.is_empty() {
        return None;
    }
    // TCP_CA_NAME_MAX is 16 with the terminating NUL.
    if name.len() > 15 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        cx.err(
            v.span(),
            format!("tcp.local_congestion must be \"\" (the system's) or a congestion control's name (up to 15 of a-z, 0-9, _), not {name:?}"),
        );
        return None;
    }
    if let Some(list) = crate::tcp::local::available_congestion()
        && !list.iter().any(|a| a == name)
    {
        cx.err(
            v.span(),
            format!(
                "tcp.local_congestion = {name:?}: this kernel has no such congestion control (it has: {}; a module may need `modprobe tcp_{name}`)",
                list.join(" ")
            ),
        );
        return None;
    }
    Some(name.clone())
}

fn parse_zero_copy(
    cx: &mut Collector<'_>,
    raw: &RawTcp,
    table: std::ops::Range<usize>,
    workers: Option<usize>,
    z: &mut ZeroCopySettings,
) {
    if let Some(m) = &raw.zero_copy {
        match m.get_ref().parse::<ZeroCopyMode>() {
            Ok(mode) => z.mode = mode,
            Err(e) => cx.err(m.span(), format!("tcp.{e}")),
        }
    }
    if let Some(i) = &raw.zero_copy_interface {
        let name = i.get_ref();
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ']) {
            cx.err(
                i.span(),
                format!("tcp.zero_copy_interface {name:?} is not an interface name"),
            );
        } else {
            z.interface = Some(name.clone());
        }
    }
    if let Some(q) = &raw.zero_copy_queues {
        for v in q.get_ref() {
            if let Some(n) = int(cx, v, "tcp.zero_copy_queues entry", 0, 65_535) {
                let n = n as u32;
                if z.queues.contains(&n) {
                    cx.err(
                        v.span(),
                        format!(
                            "tcp.zero_copy_queues names rx queue {n} twice (one queue per worker)"
                        ),
                    );
                } else {
                    z.queues.push(n);
                }
            }
        }
    }
    if let Some(v) = &raw.zero_copy_area_mib
        && let Some(n) = int(cx, v, "tcp.zero_copy_area_mib", 1, 16_384)
    {
        z.area_bytes = (n as usize) << 20;
    }
    if let Some(v) = &raw.zero_copy_refill_entries
        && let Some(n) = power_of_two(cx, v, "tcp.zero_copy_refill_entries", 64, 32_768)
    {
        z.refill_entries = n as u32;
    }
    if z.mode != ZeroCopyMode::Off {
        let span = raw.zero_copy.as_ref().map_or(table, |m| m.span());
        if z.interface.is_none() {
            cx.err(span.clone(), "tcp.zero_copy needs tcp.zero_copy_interface (the NIC whose rx queues the workers take over)".to_owned());
        }
        if z.queues.is_empty() {
            cx.err(span, "tcp.zero_copy needs tcp.zero_copy_queues (one rx queue per worker, steered to by flow rules)".to_owned());
        } else if z.mode == ZeroCopyMode::Require
            && let Some(workers) = workers
            && z.queues.len() < workers
            && let Some(q) = &raw.zero_copy_queues
        {
            // `proxy --workers` can still change the count; the start checks again.
            cx.err(
                q.span(),
                format!(
                    "tcp.zero_copy = \"require\" needs an rx queue per worker: tcp.zero_copy_queues names {} for {workers} data CPUs",
                    z.queues.len()
                ),
            );
        }
    }
}

fn parse_route(cx: &mut Collector<'_>, r: &Spanned<RawRoute>) -> Option<RouteSpec> {
    let span = r.span();
    let r = r.get_ref();
    let listen = match r.listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            cx.err(
                r.listen.span(),
                format!(
                    "route.listen {:?} is not an address:port (IPv6 as [addr]:port)",
                    r.listen.get_ref()
                ),
            );
            None
        }
    };
    let mut upstreams = Vec::new();
    for u in r.upstreams.iter().flat_map(|l| l.get_ref()) {
        if let Some(address) = resolve(cx, u, "upstream") {
            upstreams.push(UpstreamSpec {
                configured: u.get_ref().clone(),
                address,
                weight: 1,
                max_connections: 0,
            });
        }
    }
    for u in &r.upstream {
        let u = u.get_ref();
        if let Some(address) = resolve(cx, &u.address, "upstream") {
            upstreams.push(UpstreamSpec {
                configured: u.address.get_ref().clone(),
                address,
                weight: u
                    .weight
                    .as_ref()
                    .and_then(|v| int(cx, v, "upstream.weight", 1, 1000))
                    .unwrap_or(1) as u32,
                max_connections: u
                    .max_connections
                    .as_ref()
                    .and_then(|v| int(cx, v, "upstream.max_connections", 0, 10_000_000))
                    .unwrap_or(0) as u32,
            });
        }
    }
    if upstreams.is_empty() && r.upstreams.is_none() && r.upstream.is_empty() {
        cx.err(
            span.clone(),
            "a route needs upstreams = [\"host:port\", …] or [[route.upstream]] tables",
        );
    }
    if upstreams.len() > MAX_UPSTREAMS {
        cx.err(
            span.clone(),
            format!("a route may have at most {MAX_UPSTREAMS} upstreams"),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for u in &upstreams {
        if !seen.insert(u.address) {
            cx.err(
                span.clone(),
                format!("upstream {} appears twice", u.address),
            );
        }
    }
    let balance = match &r.balance {
        Some(b) => match b.get_ref().parse::<Algorithm>() {
            Ok(a) => a,
            Err(m) => {
                cx.err(b.span(), m);
                Algorithm::RoundRobin
            }
        },
        None => Algorithm::RoundRobin,
    };
    let send_proxy = match &r.send_proxy {
        None => None,
        Some(v) => match v.get_ref().as_str() {
            "v1" => Some(ProxyVersion::V1),
            "v2" => Some(ProxyVersion::V2),
            other => {
                cx.err(
                    v.span(),
                    format!("send_proxy must be \"v1\" or \"v2\", not {other:?}"),
                );
                None
            }
        },
    };
    let secs = |cx: &mut Collector<'_>,
                v: &Option<Spanned<f64>>,
                what: &str,
                lo: f64,
                hi: f64,
                d: Duration| {
        v.as_ref()
            .and_then(|v| seconds(cx, v, what, lo, hi))
            .unwrap_or(d)
    };
    let connect_timeout = secs(
        cx,
        &r.connect_timeout,
        "route.connect_timeout",
        0.001,
        3600.0,
        Duration::from_secs(5),
    );
    let idle_timeout = secs(
        cx,
        &r.idle_timeout,
        "route.idle_timeout",
        0.001,
        30.0 * 86_400.0,
        Duration::from_secs(300),
    );
    // A PROXY header is one small packet from a load balancer: a client that sends half
    // of one and goes silent must not hold a connection until idle_timeout.
    let proxy_header_timeout = secs(
        cx,
        &r.proxy_header_timeout,
        "route.proxy_header_timeout",
        0.001,
        3600.0,
        Duration::from_secs(5),
    );
    let eject_for = secs(
        cx,
        &r.eject_seconds,
        "route.eject_seconds",
        0.0,
        86_400.0,
        Duration::from_secs(10),
    );
    let health = r.health.as_ref().map(|h| {
        let h = h.get_ref();
        let interval = secs(
            cx,
            &h.interval,
            "health.interval",
            0.01,
            3600.0,
            Duration::from_secs(2),
        );
        let timeout = secs(
            cx,
            &h.timeout,
            "health.timeout",
            0.001,
            3600.0,
            Duration::from_secs(1),
        );
        HealthSpec {
            interval,
            timeout,
            rise: h
                .rise
                .as_ref()
                .and_then(|v| int(cx, v, "health.rise", 1, 100))
                .unwrap_or(2) as u32,
            fall: h
                .fall
                .as_ref()
                .and_then(|v| int(cx, v, "health.fall", 1, 100))
                .unwrap_or(3) as u32,
        }
    });
    let listen = listen?;
    Some(RouteSpec {
        name: r
            .name
            .as_ref()
            .map_or_else(|| listen.to_string(), |n| n.get_ref().clone()),
        listen,
        upstreams,
        balance,
        connect_timeout,
        idle_timeout,
        max_connections: r
            .max_connections
            .as_ref()
            .and_then(|v| int(cx, v, "route.max_connections", 0, 10_000_000))
            .unwrap_or(0) as u32,
        send_proxy,
        accept_proxy: r.accept_proxy.unwrap_or(false),
        proxy_header_timeout,
        eject_after: r
            .eject_after
            .as_ref()
            .and_then(|v| int(cx, v, "route.eject_after", 0, 1000))
            .unwrap_or(3) as u32,
        eject_for,
        health,
    })
}

/// Parses and validates a configuration; an absent key keeps its default.
pub fn parse_config(file: &str, src: &str) -> Result<Config, FileErrors> {
    let defaults = Config::defaults();
    let mut cx = Collector::new(file, src);
    let raw: Raw = match toml::from_str(src) {
        Ok(r) => r,
        Err(e) => {
            cx.toml(&e);
            return Err(cx.errors());
        }
    };
    let mut p = defaults.pipeline.clone();
    let allowed = crate::cpus::allowed();
    if let Some(e) = &raw.engine {
        let e = e.get_ref();
        if let Some(k) = &e.kind {
            match k.get_ref().parse::<BackendChoice>() {
                Ok(b) => p.backend = b,
                Err(m) => cx.err(k.span(), m),
            }
        }
        if let Some(v) = &e.buffer_size
            && let Some(n) = int(&mut cx, v, "engine.buffer_size", 512, 65_535)
        {
            p.receive.buffer_size = n as usize;
        }
        if let Some(v) = &e.buffers
            && let Some(n) = power_of_two(&mut cx, v, "engine.buffers", 1, 32_768)
        {
            p.receive.buffers = n as u16;
        }
        if let Some(v) = &e.merger_queue
            && let Some(n) = int(&mut cx, v, "engine.merger_queue", 1, 4096)
        {
            p.merger_queue = n as usize;
        }
        if let Some(cpus) = &e.data_cpus {
            let list = cpus.get_ref();
            let outside: Vec<i64> = list
                .iter()
                .copied()
                .filter(|&c| usize::try_from(c).map_or(true, |c| !allowed.contains(&c)))
                .collect();
            if list.is_empty() || !outside.is_empty() {
                cx.err(
                    cpus.span(),
                    format!(
                        "engine.data_cpus must list CPUs this process may run on ({}: its affinity mask){}",
                        crate::cpus::list(&allowed),
                        if outside.is_empty() {
                            String::new()
                        } else {
                            format!("; not allowed: {outside:?}")
                        }
                    ),
                );
            } else {
                p.data_cpus = list.iter().map(|&c| c as usize).collect();
            }
        }
    }
    if !raw.listener.is_empty() {
        p.listeners.clear();
        for l in &raw.listener {
            let l = l.get_ref();
            match l.address.get_ref().parse::<SocketAddr>() {
                Ok(a) if p.listeners.contains(&a) => {
                    cx.err(l.address.span(), format!("listener {a} appears twice"))
                }
                Ok(a) => p.listeners.push(a),
                Err(_) => cx.err(
                    l.address.span(),
                    format!(
                        "{:?} is not an address:port (IPv6 as [addr]:port)",
                        l.address.get_ref()
                    ),
                ),
            }
            if let Some(v) = &l.rcvbuf
                && let Some(n) = int(&mut cx, v, "listener.rcvbuf", 4096, 1 << 30)
            {
                p.rcvbuf = Some(n as usize);
            }
        }
    }
    if let Some(w) = &raw.window {
        let w = w.get_ref();
        if let Some(s) = &w.seconds {
            match Duration::try_from_secs_f64(*s.get_ref()) {
                Ok(d) if d >= Duration::from_millis(100) => p.window = d,
                _ => cx.err(s.span(), "window.seconds must be at least 0.1"),
            }
        }
        if let Some(k) = &w.key {
            let mut spec = KeySpec {
                host: false,
                app: false,
                severity: false,
                facility: false,
                source: false,
            };
            for name in k.get_ref() {
                match name.as_str() {
                    "host" => spec.host = true,
                    "app" => spec.app = true,
                    "severity" => spec.severity = true,
                    "facility" => spec.facility = true,
                    "source" => spec.source = true,
                    other => cx.err(k.span(), format!("unknown key field {other:?}: expected host, app, severity, facility or source")),
                }
            }
            p.key = spec;
        }
        let mut lim = p.limits;
        for (v, what, slot) in [
            (&w.top_k, "window.top_k", &mut lim.top_k),
            (&w.max_keys, "window.max_keys", &mut lim.max_keys),
            (
                &w.max_messages,
                "window.max_messages",
                &mut lim.max_messages,
            ),
        ] {
            if let Some(v) = v
                && let Some(n) = int(&mut cx, v, what, 1, 10_000_000)
            {
                *slot = n as usize;
            }
        }
        if let Some(v) = &w.max_message_len
            && let Some(n) = int(&mut cx, v, "window.max_message_len", 64, 1 << 20)
        {
            p.max_message = n as usize;
            lim.max_message_len = lim.max_message_len.min(n as usize);
        }
        p.limits = lim;
    }
    let mut sinks = if raw.sink.is_empty() {
        defaults.sinks
    } else {
        Vec::new()
    };
    for s in &raw.sink {
        let s = s.get_ref();
        let what = choice(
            &mut cx,
            s.what.as_ref(),
            "what",
            &[
                ("windows", SinkContent::Windows),
                ("raw", SinkContent::Raw),
                ("both", SinkContent::Both),
            ],
        );
        let format = choice(
            &mut cx,
            s.format.as_ref(),
            "format",
            &[
                ("json", OutputFormat::Json),
                ("rfc5424", OutputFormat::Rfc5424),
                ("text", OutputFormat::Text),
            ],
        );
        let push = |sinks: &mut Vec<SinkSpec>, sink| sinks.push(SinkSpec { what, format, sink });
        match s.kind.get_ref().as_str() {
            "stdout" => push(&mut sinks, SinkConfig::Stdout),
            "file" => {
                let Some(path) = &s.path else {
                    cx.err(s.kind.span(), "a file sink needs path = \"…\"");
                    continue;
                };
                let fsync = choice(
                    &mut cx,
                    s.fsync.as_ref(),
                    "fsync",
                    &[
                        ("window", FsyncPolicy::Window),
                        ("never", FsyncPolicy::Never),
                    ],
                );
                push(
                    &mut sinks,
                    SinkConfig::File {
                        path: PathBuf::from(path.get_ref()),
                        rotate_bytes: s
                            .rotate_bytes
                            .as_ref()
                            .and_then(|v| int(&mut cx, v, "sink.rotate_bytes", 4096, i64::MAX))
                            .map(|n| n as u64),
                        rotate_every: s
                            .rotate_seconds
                            .as_ref()
                            .and_then(|v| int(&mut cx, v, "sink.rotate_seconds", 1, 365 * 86_400))
                            .map(|n| Duration::from_secs(n as u64)),
                        keep: s
                            .keep
                            .as_ref()
                            .and_then(|v| int(&mut cx, v, "sink.keep", 0, 10_000))
                            .unwrap_or(5) as usize,
                        fsync,
                    },
                );
            }
            "tcp" => {
                let Some(addr) = &s.address else {
                    cx.err(s.kind.span(), "a tcp sink needs address = \"host:port\"");
                    continue;
                };
                let Ok(address) = addr.get_ref().parse::<SocketAddr>() else {
                    cx.err(
                        addr.span(),
                        format!("{:?} is not an address:port", addr.get_ref()),
                    );
                    continue;
                };
                let spool_dir = s.spool_dir.as_ref().map_or_else(
                    || PathBuf::from("/var/lib/edgeproxy/spool"),
                    |d| PathBuf::from(d.get_ref()),
                );
                let max_spool_bytes = s
                    .max_spool_bytes
                    .as_ref()
                    .and_then(|v| int(&mut cx, v, "sink.max_spool_bytes", 4096, i64::MAX))
                    .unwrap_or(1 << 30) as u64;
                push(
                    &mut sinks,
                    SinkConfig::Tcp {
                        address,
                        spool_dir,
                        max_spool_bytes,
                    },
                );
            }
            other => cx.err(
                s.kind.span(),
                format!("unknown sink kind {other:?}: expected stdout, file or tcp"),
            ),
        }
    }
    if p.listeners.is_empty() {
        cx.err(0..0, "no listener");
    }
    // Only data CPUs the file names: the default (the allowed CPUs) depends on the host.
    let named_cpus = raw
        .engine
        .as_ref()
        .and_then(|e| e.get_ref().data_cpus.as_ref())
        .map(|_| p.data_cpus.len());
    let tcp = parse_tcp(&mut cx, raw.tcp.as_ref(), named_cpus);
    let mut routes: Vec<RouteSpec> = Vec::new();
    for r in &raw.route {
        if let Some(spec) = parse_route(&mut cx, r) {
            if routes.iter().any(|o| o.listen == spec.listen) {
                cx.err(
                    r.get_ref().listen.span(),
                    format!("two routes listen on {}", spec.listen),
                );
            } else if routes.iter().any(|o| o.name == spec.name) {
                cx.err(r.span(), format!("two routes are named {:?}", spec.name));
            } else {
                routes.push(spec);
            }
        }
    }
    let daemon = raw
        .daemon
        .as_ref()
        .map(|d| {
            let d = d.get_ref();
            let name = |v: &Option<Spanned<String>>, key: &str, cx: &mut Collector| {
                v.as_ref().and_then(|s| {
                    let n = s.get_ref().trim();
                    if n.is_empty() {
                        cx.err(s.span(), format!("daemon.{key} must name a {key}"));
                        None
                    } else {
                        Some(n.to_owned())
                    }
                })
            };
            DaemonSettings {
                user: name(&d.user, "user", &mut cx),
                group: name(&d.group, "group", &mut cx),
            }
        })
        .unwrap_or_default();
    cx.finish(Config {
        pipeline: p,
        sinks,
        tcp,
        routes,
        daemon,
    })
}

impl Config {
    /// The embedded defaults, parsed (they are tested to parse).
    pub fn defaults() -> Config {
        Config {
            pipeline: PipelineConfig {
                listeners: vec![
                    "0.0.0.0:514".parse().expect("literal"),
                    "[::]:514".parse().expect("literal"),
                ],
                receive: ReceiveConfig::default(),
                window: Duration::from_secs(10),
                key: KeySpec::default(),
                limits: WindowLimits::default(),
                ..PipelineConfig::default()
            },
            sinks: vec![SinkSpec {
                what: SinkContent::Windows,
                format: OutputFormat::Json,
                sink: SinkConfig::Stdout,
            }],
            tcp: TcpSettings::default(),
            routes: Vec::new(),
            daemon: DaemonSettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_defaults_parse_to_the_defaults() {
        let c = parse_config("defaults", DEFAULTS).expect("defaults parse");
        let d = Config::defaults();
        assert_eq!(c.pipeline.listeners, d.pipeline.listeners);
        assert_eq!(c.pipeline.window, d.pipeline.window);
        assert_eq!(c.pipeline.key, d.pipeline.key);
        assert_eq!(c.pipeline.receive, d.pipeline.receive);
        assert_eq!(c.sinks, d.sinks);
        assert_eq!(c.tcp, d.tcp);
        assert_eq!(c.tcp, TcpSettings::default());
        assert!(c.routes.is_empty());
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = parse_config("empty", "").expect("empty parses");
        assert_eq!(c.pipeline.listeners, Config::defaults().pipeline.listeners);
    }

    #[test]
    fn data_cpus_are_checked_against_the_affinity_mask_not_counted_from_zero() {
        // Under a mask of just the highest CPU (as `taskset -c N` or a cpuset gives),
        // that CPU is accepted and CPU 0 is not, and the default takes only it.
        let last = *crate::cpus::allowed().last().expect("a CPU");
        std::thread::spawn(move || {
            crate::cpus::pin(last);
            let ok = parse_config("c", &format!("[engine]\ndata_cpus = [{last}]\n"))
                .expect("the allowed CPU");
            assert_eq!(ok.pipeline.data_cpus, vec![last]);
            let defaults = parse_config("c", "").expect("defaults");
            assert_eq!(defaults.pipeline.data_cpus.len(), 1);
            if last != 0 {
                let e = parse_config("c", "[engine]\ndata_cpus = [0]\n")
                    .expect_err("CPU 0 is outside the mask")
                    .to_string();
                assert!(
                    e.contains(&format!("({last}: its affinity mask); not allowed: [0]")),
                    "{e}"
                );
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn overrides_apply() {
        let c = parse_config(
            "c",
            "[engine]\nkind = \"epoll\"\nbuffers = 64\nmerger_queue = 8\n[[listener]]\naddress = \"127.0.0.1:5514\"\n[window]\nseconds = 2.5\nkey = [\"app\", \"source\"]\n[[sink]]\nkind = \"file\"\npath = \"/tmp/x.jsonl\"\nrotate_bytes = 1048576\nfsync = \"never\"\n",
        )
        .expect("valid");
        assert_eq!(c.pipeline.backend, BackendChoice::Epoll);
        assert_eq!(c.pipeline.receive.buffers, 64);
        assert_eq!(c.pipeline.merger_queue, 8);
        assert_eq!(
            c.pipeline.listeners,
            vec!["127.0.0.1:5514".parse().unwrap()]
        );
        assert_eq!(c.pipeline.window, Duration::from_millis(2500));
        assert!(c.pipeline.key.app && c.pipeline.key.source && !c.pipeline.key.host);
        assert!(matches!(
            &c.sinks[0].sink,
            SinkConfig::File {
                rotate_bytes: Some(1_048_576),
                fsync: FsyncPolicy::Never,
                keep: 5,
                ..
            }
        ));
    }

    #[test]
    fn sinks_say_what_they_take() {
        let c = parse_config(
            "c",
            "[[sink]]\nkind = \"stdout\"\n[[sink]]\nkind = \"stdout\"\nwhat = \"raw\"\nformat = \"rfc5424\"\n[[sink]]\nkind = \"stdout\"\nwhat = \"both\"\nformat = \"json\"\n[[sink]]\nkind = \"stdout\"\nwhat = \"windows\"\nformat = \"text\"\n",
        )
        .expect("valid");
        let what: Vec<SinkContent> = c.sinks.iter().map(|s| s.what).collect();
        assert_eq!(
            what,
            [
                SinkContent::Windows,
                SinkContent::Raw,
                SinkContent::Both,
                SinkContent::Windows
            ]
        );
        assert_eq!(
            what.iter()
                .map(|w| (w.windows(), w.raw()))
                .collect::<Vec<_>>(),
            [(true, false), (false, true), (true, true), (true, false)]
        );
        let formats: Vec<OutputFormat> = c.sinks.iter().map(|s| s.format).collect();
        assert_eq!(
            formats,
            [
                OutputFormat::Json,
                OutputFormat::Rfc5424,
                OutputFormat::Json,
                OutputFormat::Text
            ]
        );
    }

    #[test]
    fn routes_parse_with_defaults_and_overrides() {
        let c = parse_config(
            "c",
            "[tcp]\ncopy = \"splice\"\ndrain_seconds = 2.5\nlocal_sndbuf = 0\nlocal_congestion = \"\"\ncoalesce_usec = 0\nbusy_poll_usec = 150\nbulk_poll_usec = 0\n[[route]]\nlisten = \"127.0.0.1:8080\"\nupstreams = [\"127.0.0.1:9000\", \"localhost:9001\"]\n[[route]]\nname = \"web\"\nlisten = \"[::1]:443\"\nbalance = \"maglev\"\nconnect_timeout = 0.5\nmax_connections = 100\nsend_proxy = \"v2\"\naccept_proxy = true\n[[route.upstream]]\naddress = \"[::1]:8443\"\nweight = 3\nmax_connections = 10\n[route.health]\ninterval = 0.5\n",
        )
        .expect("valid");
        assert_eq!(c.tcp.copy, CopyMode::Splice);
        assert_eq!(c.tcp.drain, Duration::from_millis(2500));
        assert_eq!(c.tcp.local_sndbuf, 0, "0 turns it off");
        let defaults = parse_config("c", "").expect("empty");
        assert_eq!(defaults.tcp.local_sndbuf, 256 * 1024);
        assert_eq!(c.tcp.local_congestion, None, "\"\" is the system's");
        assert_eq!(defaults.tcp.local_congestion.as_deref(), Some("reno"));
        assert_eq!((c.tcp.coalesce_usec, defaults.tcp.coalesce_usec), (0, 20));
        assert_eq!(
            (c.tcp.busy_poll_usec, defaults.tcp.busy_poll_usec),
            (150, 0)
        );
        assert_eq!(
            (c.tcp.bulk_poll_usec, defaults.tcp.bulk_poll_usec),
            (0, 200)
        );
        let [a, b] = &c.routes[..] else {
            panic!("{:?}", c.routes)
        };
        assert_eq!(a.name, "127.0.0.1:8080");
        assert_eq!(a.balance, Algorithm::RoundRobin);
        assert_eq!(a.connect_timeout, Duration::from_secs(5));
        assert_eq!(a.eject_after, 3);
        assert!(a.health.is_none() && a.send_proxy.is_none() && !a.accept_proxy);
        // A name is resolved at load; what was written is kept for reports.
        assert_eq!(a.upstreams[1].configured, "localhost:9001");
        assert!(a.upstreams[1].address.ip().is_loopback());
        assert_eq!(b.name, "web");
        assert_eq!(b.balance, Algorithm::Maglev);
        assert_eq!(b.send_proxy, Some(ProxyVersion::V2));
        assert!(b.accept_proxy);
        assert_eq!(
            (b.upstreams[0].weight, b.upstreams[0].max_connections),
            (3, 10)
        );
        let h = b.health.as_ref().expect("health");
        assert_eq!(
            (h.interval, h.rise, h.fall),
            (Duration::from_millis(500), 2, 3)
        );
    }

    #[test]
    fn route_problems_are_located() {
        let cases: [(&str, &str); 14] = [
            (
                "[[route]]\nlisten = \"1.2.3.4\"\nupstreams = [\"127.0.0.1:1\"]\n",
                "c:2:10: route.listen \"1.2.3.4\" is not an address:port",
            ),
            (
                "[[route]]\nlisten = \"127.0.0.1:1\"\n",
                "c:1:1: a route needs upstreams",
            ),
            (
                "[[route]]\nlisten = \"127.0.0.1:1\"\nupstreams = [\"no-such-host.invalid:80\"]\n",
                "c:3:14: upstream \"no-such-host.invalid:80\" is not an address:port or a resolvable name:port",
            ),
            (
                "[[route]]\nlisten = \"127.0.0.1:1\"\nupstreams = [\"127.0.0.1:2\"]\nbalance = \"random\"\n",
                "c:4:11: balance must be",
            ),
            (
                "[[route]]\nlisten = \"127.0.0.1:1\"\nupstreams = [\"127.0.0.1:2\"]\nsend_proxy = \"v3\"\n",
                "c:4:14: send_proxy must be \"v1\" or \"v2\"",
            ),
            (
                "[[route]]\nlisten = \"127.0.0.1:1\"\nupstreams = [\"127.0.0.1:2\"]\n[[route]]\nlisten = \"127.0.0.1:1\"\nupstreams = [\"127.0.0.1:3\"]\n",
                "c:5:10: two routes listen on 127.0.0.1:1",
            ),
            (
                "[tcp]\nbuffers = 1000\n",
                "c:2:11: tcp.buffers must be a power of two",
            ),
            (
                "[tcp]\nlocal_sndbuf = 100\n",
                "c:2:16: tcp.local_sndbuf must be 0 (autotuning) or 4096..=1073741824, not 100",
            ),
            (
                "[tcp]\nlocal_congestion = \"re no\"\n",
                "c:2:20: tcp.local_congestion must be \"\" (the system's) or a congestion control's name",
            ),
            (
                "[tcp]\nlocal_congestion = \"no_such_cc\"\n",
                "c:2:20: tcp.local_congestion = \"no_such_cc\": this kernel has no such congestion control (it has: ",
            ),
            (
                "[tcp]\ncoalesce_usec = 5000\n",
                "c:2:17: tcp.coalesce_usec must be 0..=1000, not 5000",
            ),
            (
                "[tcp]\nbusy_poll_usec = 20000\n",
                "c:2:18: tcp.busy_poll_usec must be 0..=10000, not 20000",
            ),
            (
                "[tcp]\nbulk_poll_usec = -5\n",
                "c:2:18: tcp.bulk_poll_usec must be 0..=10000, not -5",
            ),
            (
                "[tcp]\nlocal_sndbuf = -1\n",
                "c:2:16: tcp.local_sndbuf must be 0..=1073741824, not -1",
            ),
        ];
        for (src, want) in cases {
            let e = parse_config("c", src).expect_err(src).to_string();
            assert!(e.starts_with(want), "{src:?}: {e}");
        }
    }

    /// reno is always built in, and the system's own default is always available.
    #[test]
    fn local_congestion_takes_a_congestion_control_the_kernel_has() {
        let system = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .expect("the system's congestion control");
        for name in ["reno", system.trim()] {
            let c =
                parse_config("c", &format!("[tcp]\nlocal_congestion = {name:?}\n")).expect("valid");
            assert_eq!(c.tcp.local_congestion.as_deref(), Some(name));
        }
    }

    #[test]
    fn zero_copy_settings_parse_and_their_problems_are_located() {
        let c = parse_config(
            "c",
            "[tcp]\nzero_copy = \"require\"\nzero_copy_interface = \"eth1\"\nzero_copy_queues = [8, 9]\nzero_copy_area_mib = 128\nzero_copy_refill_entries = 4096\n",
        )
        .unwrap();
        let z = &c.tcp.zero_copy;
        assert_eq!(z.mode, crate::tcp::ZeroCopyMode::Require);
        assert_eq!(z.interface.as_deref(), Some("eth1"));
        assert_eq!(z.queues, vec![8, 9]);
        assert_eq!((z.area_bytes, z.refill_entries), (128 << 20, 4096));
        let off = parse_config("c", "").unwrap().tcp.zero_copy;
        assert_eq!(off.mode, crate::tcp::ZeroCopyMode::Off, "off unless asked");
        let cases: [(&str, &[&str]); 5] = [
            (
                "[tcp]\nzero_copy = \"yes\"\n",
                &["c:2:13: tcp.zero_copy must be \"off\", \"auto\" or \"require\""],
            ),
            (
                "[tcp]\nzero_copy = \"auto\"\n",
                &[
                    "c:2:13: tcp.zero_copy needs tcp.zero_copy_interface",
                    "c:2:13: tcp.zero_copy needs tcp.zero_copy_queues",
                ],
            ),
            (
                "[tcp]\nzero_copy_queues = [1, 2, 1]\n",
                &["c:2:27: tcp.zero_copy_queues names rx queue 1 twice"],
            ),
            (
                "[tcp]\nzero_copy_refill_entries = 1000\n",
                &["c:2:28: tcp.zero_copy_refill_entries must be a power of two"],
            ),
            (
                "[engine]\ndata_cpus = [0, 0]\n[tcp]\nzero_copy = \"require\"\nzero_copy_interface = \"eth1\"\nzero_copy_queues = [4]\n",
                &["c:6:20: tcp.zero_copy = \"require\" needs an rx queue per worker"],
            ),
        ];
        for (src, want) in cases {
            let e = parse_config("c", src).expect_err(src).to_string();
            for w in want {
                assert!(e.contains(w), "{src:?}: {e}");
            }
        }
    }

    #[test]
    fn every_problem_is_located() {
        let cases: [(&str, &str); 12] = [
            (
                "[engine]\nmerger_queue = 0\n",
                "c:2:16: engine.merger_queue must be 1..=4096, not 0",
            ),
            (
                "[[sink]]\nkind = \"tcp\"\naddress = \"127.0.0.1:1\"\nformat = \"gelf\"\n",
                "c:4:10: format must be \"json\", \"rfc5424\" or \"text\"",
            ),
            (
                "[[sink]]\nkind = \"stdout\"\nwhat = \"everything\"\n",
                "c:3:8: what must be \"windows\", \"raw\" or \"both\"",
            ),
            (
                "[engine]\nkind = \"kqueue\"\n",
                "c:2:8: unknown engine \"kqueue\"",
            ),
            (
                "[engine]\nbuffers = 100\n",
                "c:2:11: engine.buffers must be a power of two",
            ),
            (
                "[engine]\ndata_cpus = [9999]\n",
                "c:2:13: engine.data_cpus must list CPUs",
            ),
            (
                "[[listener]]\naddress = \"514\"\n",
                "c:2:11: \"514\" is not an address:port",
            ),
            (
                "[window]\nseconds = 0\n",
                "c:2:11: window.seconds must be at least 0.1",
            ),
            (
                "[window]\nkey = [\"hostname\"]\n",
                "c:2:7: unknown key field \"hostname\"",
            ),
            (
                "[[sink]]\nkind = \"kafka\"\n",
                "c:2:8: unknown sink kind \"kafka\"",
            ),
            (
                "[[sink]]\nkind = \"file\"\n",
                "c:2:8: a file sink needs path",
            ),
            ("[windw]\nseconds = 1\n", "c:1:2: unknown field `windw`"),
        ];
        for (src, want) in cases {
            let e = parse_config("c", src).expect_err(src).to_string();
            assert!(e.starts_with(want), "{src:?}: {e}");
        }
    }
}

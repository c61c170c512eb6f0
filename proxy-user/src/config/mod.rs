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
};

/// The configuration with no file: what `edgeproxy logs` uses by default.
pub const DEFAULTS: &str = r#"# edgeproxy defaults (every key may be overridden)
[engine]
kind = "auto"            # auto | io_uring | epoll
buffer_size = 9216       # largest datagram kept whole
buffers = 1024           # io_uring buffer ring entries (a power of two) / recvmmsg batch
merger_queue = 16        # windows/raw batches a worker may have queued for the merger
# data_cpus = [0, 1]     # default: every online CPU

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
"#;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub sinks: Vec<SinkSpec>,
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
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Json => "json",
            OutputFormat::Rfc5424 => "rfc5424",
        }
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
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
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
            && let Some(n) = int(&mut cx, v, "engine.buffers", 1, 32_768)
        {
            if (n as u64).is_power_of_two() {
                p.receive.buffers = n as u16;
            } else {
                cx.err(
                    v.span(),
                    format!("engine.buffers must be a power of two, not {n}"),
                );
            }
        }
        if let Some(v) = &e.merger_queue
            && let Some(n) = int(&mut cx, v, "engine.merger_queue", 1, 4096)
        {
            p.merger_queue = n as usize;
        }
        if let Some(cpus) = &e.data_cpus {
            let list = cpus.get_ref();
            if list.is_empty() || list.iter().any(|&c| c < 0 || c as usize >= online) {
                cx.err(
                    cpus.span(),
                    format!(
                        "engine.data_cpus must list CPUs in 0..{online} (this host's online CPUs)"
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
    cx.finish(Config { pipeline: p, sinks })
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
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = parse_config("empty", "").expect("empty parses");
        assert_eq!(c.pipeline.listeners, Config::defaults().pipeline.listeners);
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
            "[[sink]]\nkind = \"stdout\"\n[[sink]]\nkind = \"stdout\"\nwhat = \"raw\"\nformat = \"rfc5424\"\n[[sink]]\nkind = \"stdout\"\nwhat = \"both\"\nformat = \"json\"\n[[sink]]\nkind = \"stdout\"\nwhat = \"windows\"\n",
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
                OutputFormat::Json
            ]
        );
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
                "c:4:10: format must be \"json\" or \"rfc5424\"",
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

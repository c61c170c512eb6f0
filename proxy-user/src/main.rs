//! `edgeproxy`: the daemon and operator CLI.
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use proxy_user::{
    cli::{self, DEFAULT_PIN_ROOT, DEFAULT_STATE_ROOT, Output, Paths},
    daemon::{self, RunOptions},
    dataplane::{HookChoice, LoadOptions, RingMode},
    policy::PolicyLimits,
    telemetry,
};

#[derive(Parser)]
#[command(
    name = "edgeproxy",
    version,
    about = "eBPF-accelerated edge proxy and log aggregator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where pins and policy state live (one directory per interface under each root).
#[derive(Args, Clone)]
struct Place {
    /// bpffs directory holding one sub-directory of pins per interface.
    #[arg(long, default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Directory holding each interface's stored policy sources.
    #[arg(long, default_value = DEFAULT_STATE_ROOT)]
    state_dir: PathBuf,
}

#[derive(Args, Clone)]
struct Limits {
    /// Most rules a policy may have (at most 256).
    #[arg(long, default_value_t = PolicyLimits::default().max_rules)]
    max_rules: usize,
    /// Most distinct prefixes per family and direction.
    #[arg(long, default_value_t = PolicyLimits::default().max_prefixes)]
    max_prefixes: usize,
    /// Largest sample snap length in bytes (at most 256).
    #[arg(long, default_value_t = PolicyLimits::default().max_snap)]
    max_snap: u16,
    /// Largest capture in bytes (at most 4096).
    #[arg(long, default_value_t = PolicyLimits::default().max_capture)]
    max_capture: u16,
}

impl Limits {
    fn get(&self) -> anyhow::Result<PolicyLimits> {
        let l = PolicyLimits {
            max_rules: self.max_rules,
            max_prefixes: self.max_prefixes,
            max_snap: self.max_snap,
            max_capture: self.max_capture,
        };
        l.validate().map_err(anyhow::Error::msg)?;
        Ok(l)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Attach the XDP data plane to an interface, drain samples and captures until
    /// SIGINT/SIGTERM or --duration, then print a report. Pinned by default: the data
    /// plane keeps running after edgeproxy exits and a restart re-adopts it.
    Run {
        /// Interface to attach to (in this process's network namespace).
        #[arg(long)]
        iface: String,
        /// auto (native XDP, else generic XDP, else TC; each fallback logged with its
        /// reason), native, generic or tc.
        #[arg(long, alias = "xdp-mode", default_value = "auto")]
        hook: HookChoice,
        /// Load this policy before attaching (otherwise the pinned policy, or pass-all).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Pin nothing and detach on exit.
        #[arg(long)]
        ephemeral: bool,
        /// Record rings: auto (one per CPU when the kernel allows ring buffers as inner
        /// maps, else shared, the reason logged), per-cpu or shared.
        #[arg(long, default_value = "auto")]
        rings: RingMode,
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        limits: Limits,
        /// Stop after this many seconds (default: run until signalled).
        #[arg(long)]
        duration: Option<f64>,
        /// Log a progress line this often, in seconds (0 = never).
        #[arg(long, default_value_t = 0.0)]
        progress: f64,
        /// Print the final report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Measure the XDP program's kernel run time per packet while running
        /// (BPF_ENABLE_STATS; switched off again when edgeproxy exits).
        #[arg(long)]
        bpf_stats: bool,
        /// Also run the log pipeline in this process (listeners, windows, sinks from
        /// --config or the embedded defaults); its workers drain the data plane's record
        /// rings, so captured datagrams enter it directly.
        #[arg(long)]
        logs: bool,
        /// Log pipeline configuration file (implies --logs; reloaded on SIGHUP or change);
        /// its `[[route]]`s, if any, are forwarded too.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log listener address (repeatable; implies --logs; replaces the configured ones).
        #[arg(long)]
        listen: Vec<std::net::SocketAddr>,
        /// With routes: rewrite the TCP counters to this file as JSON four times a second.
        #[arg(long)]
        stats_file: Option<PathBuf>,
        /// With routes: serve the TCP counters at http://ADDR/metrics (Prometheus text
        /// format) and a liveness check at /healthz.
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Do not read the record rings: another process does (`edgeproxy logs
        /// --capture-from`). A ring has one reader; without this flag a pinned run reads
        /// them unless another reader already holds them.
        #[arg(long, conflicts_with_all = ["logs", "config", "listen", "ephemeral"])]
        leave_records: bool,
    },
    /// Receive, decode and aggregate UDP syslog on pinned workers; one JSON line per
    /// window on stdout, then a summary with exact accounting.
    Logs {
        /// Configuration file (default: the embedded defaults, see `config defaults`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (repeatable; replaces the configured listeners).
        #[arg(long)]
        listen: Vec<std::net::SocketAddr>,
        /// auto (io_uring, falling back to epoll with the reason), io_uring or epoll.
        #[arg(long)]
        engine: Option<proxy_user::engine::BackendChoice>,
        /// Number of workers, taking engine.data_cpus in turn (default: one per allowed CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Window length in seconds.
        #[arg(long)]
        window: Option<f64>,
        /// Also ingest the datagrams captured by the data plane pinned in this directory
        /// (e.g. /sys/fs/bpf/edgeproxy/eth0): its record rings are drained by the workers.
        #[arg(long)]
        capture_from: Option<PathBuf>,
        /// Stop after this many seconds (default: until SIGINT/SIGTERM).
        #[arg(long)]
        duration: Option<f64>,
        /// Become this user once listeners are bound (default: `[daemon] user`, else
        /// `nobody` when started as root; `root` keeps root).
        #[arg(long)]
        user: Option<String>,
    },
    /// Forward TCP: every `[[route]]` of the configuration (listen address → upstream
    /// pool) on pinned io_uring workers, with health checks, limits and PROXY protocol,
    /// until SIGINT/SIGTERM (then drain) or --duration; SIGHUP or a change of the file
    /// reloads the routes. Prints per-route and per-upstream counters at the end.
    Proxy {
        /// Configuration file with `[[route]]` tables (see the README).
        #[arg(long)]
        config: PathBuf,
        /// Number of workers, taking engine.data_cpus in turn (default: one per data CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Stop after this many seconds (default: until SIGINT/SIGTERM).
        #[arg(long)]
        duration: Option<f64>,
        /// Rewrite this file with the counters as JSON four times a second (atomically).
        #[arg(long)]
        stats_file: Option<PathBuf>,
        /// Serve the counters at http://ADDR/metrics (Prometheus text format) and a
        /// liveness check at /healthz.
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
        /// Become this user once listeners are bound (default: `[daemon] user`, else
        /// `nobody` when started as root; `root` keeps root).
        #[arg(long)]
        user: Option<String>,
        /// Print the final report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Daemon configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage the operator policy of a running (pinned) data plane.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// What this host supports: kernel, BTF, bpffs, io_uring features, CPUs, and per
    /// interface the driver, XDP modes (with --probe-xdp) and zero-copy receive.
    Doctor {
        /// Attach and detach an inert XDP program on every interface to test native and
        /// generic mode (some drivers briefly reset the link).
        #[arg(long)]
        probe_xdp: bool,
        #[arg(long)]
        json: bool,
    },
    /// Detach the pinned data plane from an interface and remove its pins and state.
    Detach {
        iface: String,
        #[command(flatten)]
        place: Place,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE: every problem as file:line:column.
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the embedded defaults (a complete, commented configuration).
    Defaults,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate FILE and load it atomically (inactive slot, then one flip).
    Load {
        file: PathBuf,
        #[arg(long)]
        iface: String,
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        limits: Limits,
        #[arg(long)]
        json: bool,
    },
    /// Validate FILE without touching anything.
    Check {
        file: PathBuf,
        #[command(flatten)]
        limits: Limits,
        #[arg(long)]
        json: bool,
    },
    /// Active rules, generation, and per-rule packet/byte counters.
    Show {
        #[arg(long)]
        iface: String,
        #[command(flatten)]
        place: Place,
        #[arg(long)]
        json: bool,
    },
    /// What loading FILE would change.
    Diff {
        file: PathBuf,
        #[arg(long)]
        iface: String,
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        limits: Limits,
        #[arg(long)]
        json: bool,
    },
    /// Make the previous generation active again.
    Rollback {
        #[arg(long)]
        iface: String,
        #[command(flatten)]
        place: Place,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeproxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{name} must be a non-negative number of seconds"))
}

fn print(out: Output, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&out.json)?);
    } else {
        print!("{}", out.text);
    }
    Ok(())
}

/// Daemons raise their soft file-descriptor limit to the hard one: the usual 1,024 holds
/// under 200 proxied connections.
fn raise_open_files_limit() {
    match proxy_user::limits::raise_nofile() {
        Ok(n) if n.soft > n.started_with => tracing::info!(
            from = n.started_with,
            to = n.soft,
            "raised the open-files limit (RLIMIT_NOFILE) to the hard limit"
        ),
        Ok(n) => tracing::info!(
            open_files_limit = n.soft,
            "open-files limit (RLIMIT_NOFILE)"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-files limit (RLIMIT_NOFILE)")
        }
    }
}

fn paths(place: &Place, iface: &str) -> Paths {
    Paths::new(&place.pin_root, &place.state_dir, iface)
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init("info")?;
    if matches!(
        cli.command,
        Command::Run { .. } | Command::Logs { .. } | Command::Proxy { .. }
    ) {
        raise_open_files_limit();
        // Before any thread starts, so that every thread inherits both.
        if let Err(e) = proxy_user::privileges::forbid_new_privileges() {
            tracing::warn!(error = %e, "could not set no_new_privs");
        }
        use proxy_user::privileges::Daemon;
        let mode = match &cli.command {
            Command::Run { .. } => Daemon::Run,
            Command::Logs { .. } => Daemon::Logs,
            _ => Daemon::Proxy,
        };
        let keep = proxy_user::privileges::needed(mode);
        proxy_user::privileges::keep_only(&keep)
            .context("keeping only the capabilities this daemon needs")?;
        tracing::debug!(
            ?keep,
            "capabilities kept (every other one dropped for good)"
        );
    }
    match cli.command {
        Command::Run {
            iface,
            hook,
            policy,
            ephemeral,
            rings,
            place,
            limits,
            duration,
            progress,
            json,
            bpf_stats,
            logs,
            config,
            listen,
            stats_file,
            admin,
            leave_records,
        } => {
            let duration = duration.map(|d| seconds("duration", d)).transpose()?;
            let logs = (logs || config.is_some() || !listen.is_empty()).then_some(LogSetup {
                config,
                overrides: LogOverrides {
                    listen,
                    engine: None,
                    workers: None,
                    window: None,
                    capture_from: None,
                },
            });
            let progress = seconds("progress", progress)?;
            let policy = policy
                .map(|p| cli::policy::read_policy(&p, &limits.get()?))
                .transpose()?;
            let paths = paths(&place, &iface);
            let opts = RunOptions {
                mode: hook,
                load: LoadOptions {
                    ebpf_log_level: telemetry::max_log_level(),
                    pin_dir: (!ephemeral).then(|| paths.pin_dir.clone()),
                    rings,
                },
                progress_every: (!progress.is_zero()).then_some(progress),
                bpf_stats,
                policy,
                store_dir: (!ephemeral).then(|| paths.store_dir.clone()),
                iface,
                leave_records,
            };
            run(
                opts,
                logs,
                duration,
                json,
                ephemeral,
                &paths.pin_dir,
                TcpOutputs { stats_file, admin },
            )
        }
        Command::Policy { command } => match command {
            PolicyCommand::Load {
                file,
                iface,
                place,
                limits,
                json,
            } => print(
                cli::policy::load(&paths(&place, &iface), &file, &limits.get()?)?,
                json,
            ),
            PolicyCommand::Check { file, limits, json } => {
                print(cli::policy::check(&file, &limits.get()?)?, json)
            }
            PolicyCommand::Show { iface, place, json } => {
                print(cli::policy::show(&paths(&place, &iface))?, json)
            }
            PolicyCommand::Diff {
                file,
                iface,
                place,
                limits,
                json,
            } => print(
                cli::policy::diff(&paths(&place, &iface), &file, &limits.get()?)?,
                json,
            ),
            PolicyCommand::Rollback { iface, place, json } => {
                print(cli::policy::rollback(&paths(&place, &iface))?, json)
            }
        },
        Command::Config { command } => match command {
            ConfigCommand::Check { file, json } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let c = proxy_user::config::parse_config(&file.display().to_string(), &text)?;
                let out = Output {
                    text: format!(
                        "{}: ok: {} listeners, {} workers, {:.1} s windows, {} sinks\n",
                        file.display(),
                        c.pipeline.listeners.len(),
                        c.pipeline.data_cpus.len(),
                        c.pipeline.window.as_secs_f64(),
                        c.sinks.len()
                    ),
                    json: serde_json::json!({"ok": true, "listeners": c.pipeline.listeners.len(), "sinks": c.sinks.len()}),
                };
                print(out, json)
            }
            ConfigCommand::Defaults => {
                print!("{}", proxy_user::config::DEFAULTS);
                Ok(())
            }
        },
        Command::Logs {
            config,
            listen,
            engine,
            workers,
            window,
            capture_from,
            duration,
            user,
        } => {
            let overrides = LogOverrides {
                listen,
                engine,
                workers,
                window: window.map(|w| seconds("window", w)).transpose()?,
                capture_from,
            };
            logs_command(
                config,
                overrides,
                duration.map(|d| seconds("duration", d)).transpose()?,
                user,
            )
        }
        Command::Proxy {
            config,
            workers,
            duration,
            stats_file,
            admin,
            user,
            json,
        } => proxy_command(
            config,
            workers,
            duration.map(|d| seconds("duration", d)).transpose()?,
            TcpOutputs { stats_file, admin },
            user,
            json,
        ),
        Command::Doctor { probe_xdp, json } => {
            let report = proxy_user::doctor::probe(probe_xdp);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(())
        }
        Command::Detach { iface, place, json } => {
            print(cli::policy::detach(&paths(&place, &iface))?, json)
        }
    }
}

fn read_config(path: &Path) -> anyhow::Result<proxy_user::config::Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(proxy_user::config::parse_config(
        &path.display().to_string(),
        &text,
    )?)
}

/// `edgeproxy proxy`: TCP forwarding on pinned workers; the control thread handles
/// signals, reloads, health checks and the stats file.
fn proxy_command(
    config: PathBuf,
    workers: Option<usize>,
    duration: Option<Duration>,
    outputs: TcpOutputs,
    user: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    use proxy_user::tcp::{Routes, SharedRoutes};
    let cfg = read_config(&config)?;
    // The stats file is rewritten through a sibling file: its directory must stay
    // writable after the drop.
    let writable: Vec<PathBuf> = outputs.stats_file.iter().map(|f| parent_dir(f)).collect();
    let drop_to = privilege_drop(user.as_deref(), &cfg.daemon, None, writable)?;
    anyhow::ensure!(
        !cfg.routes.is_empty(),
        "{}: no [[route]]: nothing to forward",
        config.display()
    );
    let mut cpus = cfg.pipeline.data_cpus.clone();
    if let Some(n) = workers {
        anyhow::ensure!(n > 0, "--workers must be at least 1");
        cpus = proxy_user::cpus::cycle(&cpus, n);
    }
    let shared = SharedRoutes::new(Routes::build(&cfg.routes, cfg.tcp.clone(), None));
    let publish_to = std::sync::Arc::clone(&shared);
    let path = config.clone();
    let reload = move |why: &str| match read_config(&path) {
        Ok(c) => publish_routes(&publish_to, &c, why, false),
        Err(e) => tracing::error!("{why}: configuration rejected, keeping the running one: {e:#}"),
    };
    let background = tcp_background(std::sync::Arc::clone(&shared), outputs)?;
    let stop = start_control(
        Some(config),
        duration,
        Box::new(reload),
        background,
        Some(std::sync::Arc::clone(&shared)),
    )?;
    let summary = proxy_user::tcp::run(shared, &cpus, cfg.pipeline.backend, stop, drop_to)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", proxy_user::report::tcp_table(&summary));
    }
    Ok(())
}

/// Re-reads the routes of `path` and publishes them to the TCP workers; logs once every
/// worker serves them (they look every pass). `edgeproxy proxy` refuses a file without
/// routes (`allow_none` false); inside `run` that stops forwarding but keeps the rest.
fn publish_routes(
    shared: &proxy_user::tcp::SharedRoutes,
    c: &proxy_user::config::Config,
    why: &str,
    allow_none: bool,
) {
    if c.routes.is_empty() && !allow_none {
        tracing::error!("{why}: configuration rejected (no [[route]]), keeping the running one");
        return;
    }
    let before = shared.latest().settings.clone();
    if (before.buffers, before.buffer_size) != (c.tcp.buffers, c.tcp.buffer_size) {
        tracing::warn!(
            "{why}: [tcp] buffers and buffer_size do not resize a buffer pool that exists (they take effect after a restart); copy, pipe_size and drain_seconds apply to new connections now"
        );
    }
    if before.zero_copy != c.tcp.zero_copy {
        tracing::warn!(
            "{why}: [tcp] zero_copy settings take effect after a restart (workers register their rx queues at start)"
        );
    }
    let r = shared.publish(&c.routes, c.tcp.clone());
    let applied = shared.wait_applied(r.generation, Duration::from_secs(2));
    tracing::info!(
        generation = r.generation,
        routes = r.routes.len(),
        applied,
        "{why}: configuration reloaded"
    );
}

/// Where the live TCP counters go, besides the final report.
#[derive(Default)]
struct TcpOutputs {
    /// Rewritten as JSON four times a second.
    stats_file: Option<PathBuf>,
    /// The admin endpoint's address (`/metrics`, `/healthz`).
    admin: Option<std::net::SocketAddr>,
}

/// What the control thread runs for TCP forwarding: the health checks and, if asked for,
/// the stats file and the admin endpoint (bound here, so a bad address fails the start).
fn tcp_background(
    shared: std::sync::Arc<proxy_user::tcp::SharedRoutes>,
    outputs: TcpOutputs,
) -> anyhow::Result<Vec<Background>> {
    let mut background: Vec<Background> = vec![Box::pin(proxy_user::tcp::health::run(
        std::sync::Arc::clone(&shared),
    ))];
    if let Some(addr) = outputs.admin {
        let listener = proxy_user::admin::bind(addr)?;
        background.push(Box::pin(proxy_user::admin::serve(
            listener,
            std::sync::Arc::clone(&shared),
        )));
    }
    if let Some(file) = outputs.stats_file {
        background.push(stats_writer(shared, file));
    }
    Ok(background)
}

/// Rewrites the routes' counters to `file` as JSON four times a second.
fn stats_writer(
    shared: std::sync::Arc<proxy_user::tcp::SharedRoutes>,
    file: PathBuf,
) -> Background {
    Box::pin(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let body = serde_json::json!({"routes": shared.latest().json()});
            if let Err(e) = write_atomically(&file, body.to_string().as_bytes()) {
                tracing::warn!(file = %file.display(), error = %e, "writing the stats file");
            }
        }
    })
}

/// Replaces `path` with `bytes` by writing a sibling file and renaming it over. Mode
/// 0640 whatever the umask: monitoring reads it, as a member of the file's group (the
/// counters name upstreams, so not everyone); only edgeproxy writes it.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    proxy_user::fsmode::replace_file(path, bytes, STATS_FILE_MODE)
}

/// The stats file's mode (see [`write_atomically`]).
const STATS_FILE_MODE: u32 = 0o640;

/// Command-line settings that take precedence over the configuration file (also after
/// a reload).
struct LogOverrides {
    listen: Vec<std::net::SocketAddr>,
    engine: Option<proxy_user::engine::BackendChoice>,
    workers: Option<usize>,
    window: Option<Duration>,
    capture_from: Option<PathBuf>,
}

fn log_config(
    base: &proxy_user::config::Config,
    o: &LogOverrides,
) -> anyhow::Result<(
    proxy_user::logs::pipeline::PipelineConfig,
    Vec<proxy_user::config::SinkSpec>,
)> {
    let mut cfg = base.pipeline.clone();
    if !o.listen.is_empty() {
        cfg.listeners = o.listen.clone();
    }
    if let Some(e) = o.engine {
        cfg.backend = e;
    }
    if o.capture_from.is_some() {
        cfg.capture_from.clone_from(&o.capture_from);
    }
    if let Some(w) = o.window {
        anyhow::ensure!(!w.is_zero(), "--window must be positive");
        cfg.window = w;
    }
    if let Some(n) = o.workers {
        anyhow::ensure!(n > 0, "--workers must be at least 1");
        cfg.data_cpus = proxy_user::cpus::cycle(&cfg.data_cpus, n);
    }
    Ok((cfg, base.sinks.clone()))
}

/// The configuration file, or the embedded defaults without one.
fn read_config_or_defaults(path: Option<&Path>) -> anyhow::Result<proxy_user::config::Config> {
    path.map_or_else(|| Ok(proxy_user::config::Config::defaults()), read_config)
}

/// The log pipeline's configuration source: a file (or the embedded defaults) and the
/// command-line settings that override it, re-applied on every reload.
struct LogSetup {
    config: Option<PathBuf>,
    overrides: LogOverrides,
}

/// `edgeproxy logs`: the pipeline on the main thread's merger, a control thread for
/// signals: SIGINT/SIGTERM/--duration stop, SIGHUP reloads the configuration file.
fn logs_command(
    config: Option<PathBuf>,
    overrides: LogOverrides,
    duration: Option<Duration>,
    user: Option<String>,
) -> anyhow::Result<()> {
    use proxy_user::logs::pipeline::{CaptureSource, run_with_sinks};
    let base = read_config_or_defaults(config.as_deref())?;
    // A file sink rotates by renaming in its directory: it must stay writable.
    let writable: Vec<PathBuf> = base
        .sinks
        .iter()
        .filter_map(|s| match &s.sink {
            proxy_user::config::SinkConfig::File { path, .. } => Some(parent_dir(path)),
            _ => None,
        })
        .collect();
    let capture = overrides
        .capture_from
        .as_ref()
        .or(base.pipeline.capture_from.as_ref())
        .map(|d| format!("the data plane's record rings in {}", d.display()));
    let drop_to = privilege_drop(user.as_deref(), &base.daemon, capture.as_deref(), writable)?;
    let (shared, stop) = start_log_control(
        LogSetup { config, overrides },
        &base,
        duration,
        None,
        TcpOutputs::default(),
    )?;
    run_with_sinks(&shared, CaptureSource::None, stop, drop_to).map(|_| ())
}

/// `--user`, else `[daemon] user`, else `nobody` when started as root (root is kept
/// only when asked, or when `needs_bpf` says the daemon reads BPF maps): resolved now,
/// so an unknown user fails the start before anything is bound; what edgeproxy creates
/// from here on belongs to that user; the drop runs once the sockets are bound.
fn privilege_drop(
    cli: Option<&str>,
    d: &proxy_user::config::DaemonSettings,
    needs_bpf: Option<&str>,
    writable: Vec<PathBuf>,
) -> anyhow::Result<Option<proxy_user::privileges::OnStarted>> {
    use proxy_user::privileges::{self, Plan};
    match privileges::plan(cli, d.user.as_deref(), d.group.as_deref(), needs_bpf)? {
        Plan::Keep(why) if nix::unistd::geteuid().is_root() && !why.contains("as asked") => {
            tracing::warn!("running as root with every capability: {why}");
            Ok(None)
        }
        Plan::Keep(why) => {
            tracing::info!("privileges: {why}");
            Ok(None)
        }
        Plan::Drop(target) => {
            proxy_user::fsmode::set_owner(target.uid, target.gid);
            Ok(Some(privileges::on_started(target, writable)))
        }
    }
}

/// The directory a file is in (`.` for a bare name).
fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Loads the log configuration and starts the control thread for it.
/// `base` is the configuration file as read (or the defaults); each reload reads it once
/// for both the log pipeline and the routes.
fn start_log_control(
    setup: LogSetup,
    base: &proxy_user::config::Config,
    duration: Option<Duration>,
    routes: Option<std::sync::Arc<proxy_user::tcp::SharedRoutes>>,
    outputs: TcpOutputs,
) -> anyhow::Result<(
    std::sync::Arc<proxy_user::logs::pipeline::SharedConfig>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
)> {
    use proxy_user::logs::pipeline::SharedConfig;
    let LogSetup { config, overrides } = setup;
    let (cfg, sinks) = log_config(base, &overrides)?;
    let shared = SharedConfig::new(cfg, sinks);
    let publish_to = std::sync::Arc::clone(&shared);
    let path = config.clone();
    let reload_routes = routes.clone();
    let reload = move |why: &str| {
        let base = match read_config_or_defaults(path.as_deref()) {
            Ok(base) => base,
            Err(e) => {
                return tracing::error!(
                    "{why}: configuration rejected, keeping the running one: {e:#}"
                );
            }
        };
        match log_config(&base, &overrides) {
            Ok((cfg, sinks)) => {
                let s = publish_to.publish(cfg, sinks, Duration::from_millis(50));
                tracing::info!(
                    generation = s.generation,
                    effective_from_ns = s.effective_from_ns,
                    "{why}: configuration reloaded"
                );
            }
            Err(e) => {
                tracing::error!("{why}: configuration rejected, keeping the running one: {e:#}")
            }
        }
        if let Some(routes) = &reload_routes {
            publish_routes(routes, &base, why, true);
        }
    };
    let background = routes
        .clone()
        .map(|r| tcp_background(r, outputs))
        .transpose()?
        .unwrap_or_default();
    let stop = start_control(config, duration, Box::new(reload), background, routes)?;
    Ok((shared, stop))
}

/// Work the control thread runs beside signal handling (health checks, stats files).
type Background = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Starts the control thread (tokio): SIGINT, SIGTERM or `duration` set the returned
/// stop flag; SIGHUP or a change of `config` call `reload` (which logs and keeps the
/// running configuration when the file is bad); `background` runs until stop or, with
/// `forwarding`, until it has drained: the admin endpoint and the stats file show the
/// drain, and `/ready` says so; a second SIGINT or SIGTERM then cuts the drain short.
fn start_control(
    config: Option<PathBuf>,
    duration: Option<Duration>,
    reload: Box<dyn Fn(&str) + Send>,
    background: Vec<Background>,
    forwarding: Option<std::sync::Arc<proxy_user::tcp::SharedRoutes>>,
) -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let stop = Arc::new(AtomicBool::new(false));
    let control_stop = Arc::clone(&stop);
    // The workers start only once the handlers are in place: a SIGHUP or a file change
    // in between would otherwise kill the process (SIGHUP's default) or go unseen.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new().name("ep-control".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "control runtime");
                control_stop.store(true, Ordering::Release);
                return;
            }
        };
        rt.block_on(async {
            let stop = stop_signal(duration);
            tokio::pin!(stop);
            // One poll installs the SIGINT/SIGTERM handlers before we report ready.
            let mut stopped = tokio::select! {
                biased;
                () = &mut stop => true,
                () = std::future::ready(()) => false,
            };
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let watch = config.as_deref().and_then(|p| match ConfigWatch::new(p) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the configuration file; SIGHUP still reloads");
                    None
                }
            });
            let tasks: Vec<tokio::task::JoinHandle<()>> = background.into_iter().map(tokio::spawn).collect();
            let _ = ready_tx.send(());
            // A drain the daemon began itself (a worker died; in `run`, the data plane or
            // forwarding failed) has had no signal yet: the first one cuts it.
            let draining = || {
                forwarding.as_ref().is_some_and(|r| {
                    matches!(r.lifecycle(), proxy_user::tcp::Lifecycle::Draining | proxy_user::tcp::Lifecycle::Stopped)
                })
            };
            let mut cut_at_once = false;
            while !stopped {
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let changed = async {
                    match &watch {
                        Some(w) => w.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = &mut stop => {
                        stopped = true;
                        // Read before this thread sets the stop flag: after, a normal
                        // drain would look the same.
                        cut_at_once = draining();
                    }
                    () = hangup => reload("SIGHUP"),
                    () = changed => reload("file changed"),
                    () = tokio::time::sleep(Duration::from_millis(50)), if forwarding.is_some() => {
                        stopped = draining();
                    }
                }
            }
            control_stop.store(true, Ordering::Release);
            if let Some(routes) = &forwarding {
                // A second SIGINT or SIGTERM cuts the drain short.
                let again = stop_signal(None);
                tokio::pin!(again);
                let mut cut = false;
                if cut_at_once {
                    tracing::warn!("stopping while already draining: open connections are reset now, not at the drain deadline");
                    routes.cut_drain();
                    cut = true;
                }
                while routes.lifecycle() != proxy_user::tcp::Lifecycle::Stopped {
                    tokio::select! {
                        () = &mut again, if !cut => {
                            tracing::warn!("stopping again: open connections are reset now, not at the drain deadline");
                            routes.cut_drain();
                            cut = true;
                        }
                        () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
            for t in tasks {
                t.abort();
            }
        });
        control_stop.store(true, Ordering::Release);
    })?;
    // An error means the thread ended before getting ready (it logged why and set stop).
    let _ = ready_rx.recv_timeout(Duration::from_secs(10));
    Ok(stop)
}

/// Watches a configuration file (through its directory: editors replace files by
/// renaming, which a watch on the file itself would miss).
struct ConfigWatch {
    fd: tokio::io::unix::AsyncFd<InotifyFd>,
    name: std::ffi::OsString,
}

/// nix's Inotify implements AsFd; tokio's AsyncFd wants AsRawFd.
struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

impl ConfigWatch {
    fn new(path: &Path) -> anyhow::Result<Self> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .context("the configuration path has no file name")?
            .to_owned();
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        ino.add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO,
        )?;
        Ok(Self {
            // SAFETY: the inotify fd is owned by the InotifyFd moved into the AsyncFd; it
            // stays open, and as_raw_fd returns that same fd, until the AsyncFd is dropped.
            fd: unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    InotifyFd(ino),
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| anyhow::anyhow!("registering the configuration watch: {e}"))?,
            name,
        })
    }

    /// Resolves when the file was written or replaced.
    async fn changed(&self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    if events
                        .iter()
                        .any(|e| e.name.as_deref() == Some(self.name.as_os_str()))
                    {
                        return;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => {
                    tracing::warn!(error = %e, "configuration watch failed; SIGHUP still reloads");
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Resolves on SIGINT, SIGTERM or after `duration` (if given), logging which; a signal
/// that cannot be watched is logged and the others still apply. The handlers are
/// installed when this is called, not when the future is first polled: a signal during
/// start-up (loading and verifying the data plane takes a while) then stops the daemon
/// cleanly rather than killing it. Call it inside the runtime.
fn stop_signal(duration: Option<Duration>) -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, signal = name, "cannot watch this signal");
                    std::future::pending::<()>().await;
                }
            }
        };
        let timer = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait(int, "SIGINT") => tracing::info!("SIGINT: stopping"),
            () = wait(term, "SIGTERM") => tracing::info!("SIGTERM: stopping"),
            () = timer => {}
        }
    }
}

fn run(
    opts: RunOptions,
    logs: Option<LogSetup>,
    duration: Option<Duration>,
    json: bool,
    ephemeral: bool,
    pin_dir: &Path,
    outputs: TcpOutputs,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let iface = opts.iface.clone();
    // The `[[route]]`s of the configuration file, if any, are forwarded by TCP workers
    // on the data CPUs beside the log pipeline's.
    let base = logs
        .as_ref()
        .map(|l| read_config_or_defaults(l.config.as_deref()))
        .transpose()?;
    if let Some(user) = base.as_ref().and_then(|c| c.daemon.user.as_deref())
        && user != "root"
    {
        anyhow::bail!(
            "[daemon] user = {user:?}: `run` keeps root, because reading its data plane's maps needs CAP_BPF; the drop applies to `edgeproxy logs` and `edgeproxy proxy` (docs/security.md)"
        );
    }
    let tcp_setup = base.as_ref().filter(|c| !c.routes.is_empty()).map(|c| {
        let routes = proxy_user::tcp::SharedRoutes::new(proxy_user::tcp::Routes::build(
            &c.routes,
            c.tcp.clone(),
            None,
        ));
        (routes, c.pipeline.data_cpus.clone(), c.pipeline.backend)
    });
    anyhow::ensure!(
        (outputs.stats_file.is_none() && outputs.admin.is_none()) || tcp_setup.is_some(),
        "--stats-file and --admin serve TCP counters: the --config file has no [[route]]"
    );
    // With the log pipeline, its control thread owns the signals (stop and reload) and
    // the data plane follows its stop flag.
    let pipeline = logs
        .zip(base.as_ref())
        .map(|(setup, base)| {
            let routes = tcp_setup.as_ref().map(|(r, ..)| std::sync::Arc::clone(r));
            start_log_control(setup, base, duration, routes, outputs)
                .map(|(shared, stop)| daemon::LogPipeline { shared, stop })
        })
        .transpose()?;
    let stop_flag = pipeline.as_ref().map(|p| std::sync::Arc::clone(&p.stop));
    let tcp = match (tcp_setup, &stop_flag) {
        (Some((routes, cpus, engine)), Some(stop)) => {
            let stop = std::sync::Arc::clone(stop);
            Some(
                std::thread::Builder::new()
                    .name("ep-tcp-main".into())
                    .spawn(move || {
                        let ended =
                            proxy_user::tcp::run(routes, &cpus, engine, std::sync::Arc::clone(&stop), None);
                        if let Err(e) = &ended {
                            // Forwarding could not start or a worker died: the whole
                            // daemon stops now and exits with this error, rather than
                            // run on without forwarding and say so only at the end.
                            tracing::error!(error = %format!("{e:#}"), "TCP forwarding failed; stopping");
                            stop.store(true, Ordering::Release);
                        }
                        ended
                    })
                    .context("spawning TCP forwarding")?,
            )
        }
        _ => None,
    };
    let tcp_flag = stop_flag.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let summary = rt.block_on(async move {
        match stop_flag {
            Some(flag) => {
                let stop = async move {
                    while !flag.load(Ordering::Acquire) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                daemon::run(opts, stop, pipeline).await
            }
            None => daemon::run(opts, stop_signal(duration), None).await,
        }
    });
    // However the data plane ended, forwarding stops (and drains) with it.
    if let Some(flag) = &tcp_flag {
        flag.store(true, Ordering::Release);
    }
    let tcp = tcp
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("TCP forwarding panicked"))?
                .context("TCP forwarding")
        })
        .transpose();
    let (summary, tcp) = (summary?, tcp?);
    if !ephemeral {
        tracing::info!(
            pins = %pin_dir.display(),
            "the data plane stays attached; `edgeproxy detach {iface}` removes it"
        );
    }
    if json {
        let mut v = summary.json();
        if let Some(t) = &tcp {
            v["tcp"] = serde_json::to_value(t)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", summary.table());
        if let Some(t) = &tcp {
            print!("{}", proxy_user::report::tcp_table(t));
        }
    }
    Ok(())
}

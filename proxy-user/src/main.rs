//! `edgeproxy`: the daemon and operator CLI.
use std::{process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_user::{
    daemon::{self, RunOptions},
    dataplane::{LoadOptions, XdpModeChoice},
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

#[derive(Subcommand)]
enum Command {
    /// Attach the XDP data plane to an interface, count traffic by protocol and drain the
    /// per-packet records until SIGINT/SIGTERM or --duration, then print a report.
    Run {
        /// Interface to attach to (in this process's network namespace).
        #[arg(long)]
        iface: String,
        /// auto (native, falling back to generic with a logged reason), native or generic.
        #[arg(long, default_value = "auto")]
        xdp_mode: XdpModeChoice,
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

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init("info")?;
    match cli.command {
        Command::Run {
            iface,
            xdp_mode,
            duration,
            progress,
            json,
            bpf_stats,
        } => {
            let duration = duration.map(|d| seconds("duration", d)).transpose()?;
            let progress = seconds("progress", progress)?;
            let opts = RunOptions {
                iface,
                mode: xdp_mode,
                load: LoadOptions {
                    ebpf_log_level: telemetry::max_log_level(),
                },
                progress_every: (!progress.is_zero()).then_some(progress),
                bpf_stats,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the control runtime")?;
            let summary = rt.block_on(async move {
                let stop = async move {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot watch SIGTERM");
                            return;
                        }
                    };
                    let timer = async {
                        match duration {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
                        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                        () = timer => {}
                    }
                };
                daemon::run(opts, stop).await
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary.json())?);
            } else {
                print!("{}", summary.table());
            }
            Ok(())
        }
    }
}

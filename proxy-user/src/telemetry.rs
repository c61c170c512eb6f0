//! `tracing` set-up for the binary. `log` records (aya, and the eBPF program's lines via
//! aya-log) are bridged into `tracing` so one filter and one format cover everything.
use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init(default_filter: &str) -> anyhow::Result<()> {
    // `try_init` also installs the `log` → `tracing` bridge (tracing-subscriber's
    // default `tracing-log` feature).
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .try_init()?;
    Ok(())
}

/// The most verbose level any `tracing` directive enables, for the eBPF side's filter.
pub fn max_log_level() -> log::LevelFilter {
    tracing_log::AsLog::as_log(&tracing::level_filters::LevelFilter::current())
}

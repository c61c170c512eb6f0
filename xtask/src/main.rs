//! `cargo xtask <command>`: the only entry point a fresh machine needs.
//!
//! Runs on the preinstalled stable Rust. Every command that needs more (the pinned
//! userspace toolchain, the pinned nightly with rust-src, bpf-linker, a mounted bpffs,
//! apt packages) bootstraps it first, idempotently, saying what it does.
mod bootstrap;
mod cmd;
mod fuzz;
mod test;
mod testbed;
mod toolchains;

use std::{path::PathBuf, process::ExitCode};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  bootstrap        install what building and testing need (idempotent)
  build            bootstrap, then build everything (userspace + eBPF object), release
  test [--long]    bootstrap, fmt check, clippy (userspace, eBPF, xtask), build, unit and
                   privileged end-to-end tests, then 15 s of each fuzz target; --long runs
                   the long randomized suites
  fuzz [TARGET] [--seconds N]
                   fuzz every parser of outside input (or TARGET), N s each (default 300);
                   installs cargo-fuzz; see docs/fuzzing.md
  demo             bootstrap, build, run edgeproxy on a namespace topology with traffic
  bench [SUITE]    bootstrap, build, run benchmarks (SUITE: xdp, logs-decode, logs, logs-peers, tcp; default: all;
                   logs-peers --receivers edgeproxy-xdp,rsyslog runs some receivers only)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bootstrap") => bootstrap::run(&bootstrap::Needs::default()).map(|_| ()),
        Some("build") => build(),
        Some("test") => test::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("demo") => testbed::run(testbed::Driver::Demo, &args[1..]),
        Some("bench") => testbed::run(testbed::Driver::Bench, &args[1..]),
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown command {other:?}\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build() -> anyhow::Result<()> {
    let tc = bootstrap::run(&bootstrap::Needs::default())?;
    cmd::cargo(&tc.user, ["build", "--locked", "--release", "--bins"])
        .say("build edgeproxy and the eBPF object (release)")
        .run()
}

/// The repository root (xtask lives in <root>/xtask).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

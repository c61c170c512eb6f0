//! Fuzzing (fuzz/): a libFuzzer target per parser of outside input, run by cargo-fuzz.
//!
//! `cargo xtask test` ends with a short run of every target; `cargo xtask fuzz [TARGET]
//! [--seconds N]` is the long one. Each run starts from the committed seeds
//! (fuzz/corpus/TARGET) copied into target/fuzz/corpus/TARGET, where libFuzzer adds
//! what it finds, so the committed corpus is never written; crashes go to
//! target/fuzz/artifacts/TARGET.
//!
//! The toolchain is the userspace one (1.99.1) with `RUSTC_BOOTSTRAP=1` for the
//! sanitizer flags, not the pinned nightly: that nightly is 1.98 and cannot compile
//! aya-obj 0.6 (it uses `Option::map_or_default`, stable from 1.99), nor meets the
//! workspace's rust-version.
use std::{fs, path::Path, time::Instant};

use anyhow::{Context as _, bail};

use crate::{
    bootstrap::{self, Needs},
    cmd::{Cmd, cargo},
    toolchains::Toolchains,
};

/// cargo-fuzz release installed by the bootstrap (`cargo install --locked`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The targets (fuzz/fuzz_targets/NAME.rs), in the order they run.
pub const TARGETS: &[&str] = &[
    "syslog_framing",
    "log_decode",
    "proxy_protocol",
    "policy_toml",
    "config_toml",
    "admin_http",
    "http_sample",
];
/// Seconds per target in `cargo xtask test`.
pub const SHORT_SECONDS: u64 = 15;
/// Seconds per target for `cargo xtask fuzz` without `--seconds`.
const LONG_SECONDS: u64 = 300;
/// Where the build, the working corpora and the crashes go (under the repository root).
const TARGET_DIR: &str = "target/fuzz";
/// 16 codegen units rather than cargo-fuzz's 1: a cold build in about half the time, at
/// some cost in executions per second.
const CODEGEN_UNITS: &str = "16";

const USAGE: &str = "cargo xtask fuzz [TARGET] [--seconds N]";

/// `cargo xtask fuzz [TARGET] [--seconds N]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut seconds = LONG_SECONDS;
    let mut only: Option<&str> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let n = it.next().context("--seconds needs a number")?;
                seconds = n
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .with_context(|| format!("--seconds {n:?}: not a positive number"))?;
            }
            t if TARGETS.contains(&t) => only = TARGETS.iter().copied().find(|&k| k == t),
            other => bail!(
                "unknown argument {other:?}\nusage: {USAGE}\ntargets: {}",
                TARGETS.join(", ")
            ),
        }
    }
    let tc = bootstrap::run(&Needs::default())?;
    let targets: Vec<&str> = match only {
        Some(t) => vec![t],
        None => TARGETS.to_vec(),
    };
    fuzz(&tc, &targets, seconds)
}

/// The short run at the end of `cargo xtask test`.
pub fn short(tc: &Toolchains) -> anyhow::Result<()> {
    fuzz(tc, TARGETS, SHORT_SECONDS)
}

fn fuzz(tc: &Toolchains, targets: &[&str], seconds: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_cargo_fuzz(tc)?;
    let mut build: Vec<&str> = vec!["fuzz", "build"];
    build.extend(common_args());
    if let [one] = targets {
        build.push(one);
    }
    fuzz_cargo(tc, &build)
        .say("build the fuzz targets (fuzz/; AddressSanitizer, libFuzzer)")
        .run()?;
    let mut outcomes = Vec::new();
    for &t in targets {
        let o = run_target(tc, t, seconds)?;
        if let Some(path) = &o.crash {
            bail!(
                "fuzz target {t} failed; the input is {path}\nreproduce: RUSTC_BOOTSTRAP=1 cargo +{} fuzz run {} {t} {path}",
                tc.user,
                common_args().join(" ")
            );
        }
        outcomes.push(o);
    }
    println!("fuzz: {seconds} s per target, 0 crashes");
    println!(
        "{:<16} {:>12} {:>9} {:>7} {:>6}",
        "target", "executions", "exec/s", "corpus", "cov"
    );
    for o in &outcomes {
        println!(
            "{:<16} {:>12} {:>9} {:>7} {:>6}",
            o.target, o.execs, o.exec_per_s, o.corpus, o.cov
        );
    }
    println!(
        "fuzz: {} targets in {:.0} s (build included)",
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--target-dir target/fuzz --codegen-units 16`: the same for build and run, so a run
/// rebuilds nothing.
fn common_args() -> [&'static str; 4] {
    ["--target-dir", TARGET_DIR, "--codegen-units", CODEGEN_UNITS]
}

fn fuzz_cargo(tc: &Toolchains, args: &[&str]) -> Cmd {
    // The sanitizer and coverage flags are unstable (-Z): allowed on this stable.
    cargo(&tc.user, args).env("RUSTC_BOOTSTRAP", "1")
}

/// Installs cargo-fuzz unless `cargo fuzz --version` already names the pinned release.
fn ensure_cargo_fuzz(tc: &Toolchains) -> anyhow::Result<()> {
    if let Ok(v) = Cmd::new("cargo", ["fuzz", "--version"]).output() {
        if v.split_whitespace().any(|w| w == CARGO_FUZZ_VERSION) {
            return Ok(());
        }
        eprintln!("xtask: found {}, need {CARGO_FUZZ_VERSION}", v.trim());
    }
    cargo(
        &tc.user,
        [
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
            "--force",
        ],
    )
    .say(format!(
        "install cargo-fuzz {CARGO_FUZZ_VERSION} (builds and runs the fuzz targets; about 30 s)"
    ))
    .run()
    .context("could not install cargo-fuzz: is crates.io reachable?")
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    target: String,
    execs: u64,
    exec_per_s: u64,
    /// Inputs in the working corpus at the end.
    corpus: u64,
    /// Coverage points (libFuzzer's `cov`).
    cov: u64,
    /// The input that crashed, hung or ran out of memory.
    crash: Option<String>,
}

impl Outcome {
    /// Reads one line of libFuzzer's stderr.
    fn add_line(&mut self, line: &str) {
        if let Some(path) = line
            .split_once("Test unit written to ")
            .map(|(_, p)| p.trim())
        {
            self.crash = Some(path.to_owned());
        } else if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            self.execs = v.trim().parse().unwrap_or(self.execs);
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            self.exec_per_s = v.trim().parse().unwrap_or(self.exec_per_s);
        } else if line.starts_with('#') && line.contains("DONE") {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                let next = words.clone().next().unwrap_or("");
                match w {
                    "cov:" => self.cov = next.parse().unwrap_or(self.cov),
                    "corp:" => {
                        let n = next.split('/').next().unwrap_or("");
                        self.corpus = n.parse().unwrap_or(self.corpus);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A line worth echoing: everything but the per-input progress lines.
fn worth_echoing(line: &str) -> bool {
    !(line.starts_with('#')
        && matches!(
            line.split_whitespace().nth(1),
            Some("NEW" | "REDUCE" | "pulse" | "RELOAD")
        ))
}

fn run_target(tc: &Toolchains, target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let root = crate::root();
    let corpus = root.join(TARGET_DIR).join("corpus").join(target);
    let artifacts = root.join(TARGET_DIR).join("artifacts").join(target);
    copy_seeds(&root.join("fuzz/corpus").join(target), &corpus)?;
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    let mut args: Vec<String> = ["fuzz", "run"].map(String::from).to_vec();
    args.extend(common_args().map(String::from));
    args.push(target.to_owned());
    args.push(corpus.display().to_string());
    args.push("--".to_owned());
    args.extend([
        format!("-max_total_time={seconds}"),
        "-rss_limit_mb=2048".to_owned(),
        // One input taking this long is a hang, reported as a crash.
        "-timeout=10".to_owned(),
        "-print_final_stats=1".to_owned(),
        // After cargo-fuzz's own (fuzz/artifacts): the last one counts.
        format!("-artifact_prefix={}/", artifacts.display()),
    ]);
    let mut o = Outcome {
        target: target.to_owned(),
        ..Outcome::default()
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut in_dictionary = false;
    let ok = fuzz_cargo(tc, &args)
        .say(format!(
            "fuzz {target} for {seconds} s (corpus {})",
            corpus.display()
        ))
        .run_stderr(|l| {
            o.add_line(l);
            // libFuzzer's closing dictionary of useful byte strings: one line each.
            if l.starts_with("###### Recommended dictionary") {
                in_dictionary = true;
            } else if l.starts_with("###### End of recommended dictionary") {
                in_dictionary = false;
                return false;
            }
            !in_dictionary && worth_echoing(l)
        })?;
    if !ok && o.crash.is_none() {
        o.crash = Some(format!(
            "(none written: see the output above; artifacts go to {})",
            artifacts.display()
        ));
    }
    Ok(o)
}

/// Copies the committed seeds into the working corpus (adding to what earlier runs
/// found there).
fn copy_seeds(seeds: &Path, corpus: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let entries = fs::read_dir(seeds).with_context(|| format!("reading {}", seeds.display()))?;
    for e in entries {
        let e = e?;
        if e.file_type()?.is_file() {
            let to = corpus.join(e.file_name());
            fs::copy(e.path(), &to)
                .with_context(|| format!("copying {} to {}", e.path().display(), to.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_output() {
        let mut o = Outcome::default();
        for l in [
            "#2\tINITED cov: 92 ft: 134 corp: 4/816b exec/s: 0 rss: 43Mb",
            "#682179\tDONE   cov: 101 ft: 160 corp: 37/2411b lim: 4096 exec/s: 75797 rss: 45Mb",
            "Done 682179 runs in 9 second(s)",
            "stat::number_of_executed_units: 682179",
            "stat::average_exec_per_sec:     75797",
        ] {
            o.add_line(l);
        }
        assert_eq!(
            o,
            Outcome {
                execs: 682_179,
                exec_per_s: 75_797,
                corpus: 37,
                cov: 101,
                ..Outcome::default()
            }
        );
        o.add_line("artifact_prefix='/r/target/fuzz/artifacts/t/'; Test unit written to /r/target/fuzz/artifacts/t/crash-f93a");
        assert_eq!(
            o.crash.as_deref(),
            Some("/r/target/fuzz/artifacts/t/crash-f93a")
        );
    }

    #[test]
    fn hides_progress_lines_only() {
        assert!(!worth_echoing(
            "#1024\tNEW    cov: 99 ft: 150 corp: 20/1b lim: 4 exec/s: 0 rss: 4Mb L: 3/3 MS: 1 CopyPart-"
        ));
        assert!(!worth_echoing("#65536\tpulse  cov: 99 ft: 150 corp: 20/1b"));
        assert!(worth_echoing("#2\tINITED cov: 92 ft: 134 corp: 4/816b"));
        assert!(worth_echoing("==12== ERROR: libFuzzer: deadly signal"));
    }
}

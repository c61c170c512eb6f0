//! `cargo xtask test`: everything CI checks, in the order that fails fastest.
use anyhow::bail;

use crate::{
    bootstrap::{self, Needs},
    cmd::cargo,
};

/// Tools the privileged tests call.
pub const TEST_TOOLS: &[(&str, &str)] = &[("ip", "iproute2"), ("logger", "bsdutils")];

#[derive(Default, Debug, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; …` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut long = false;
    for a in args {
        match a.as_str() {
            "--long" => long = true,
            other => bail!("unknown option {other:?} for `cargo xtask test` (known: --long)"),
        }
    }
    let tc = bootstrap::run(&Needs {
        privileged: true,
        apt: TEST_TOOLS,
    })?;
    let xtask_manifest = crate::root().join("xtask/Cargo.toml");
    // Real counterparts the end-to-end tests run against (rsyslog as a TCP sink's
    // downstream…), unpacked from Debian packages next to the build, not installed.
    let peers = crate::root().join("target/peers");
    bootstrap::ensure_peers(&peers)?;

    cargo(&tc.user, ["fmt", "--all", "--", "--check"])
        .say("check formatting (workspace)")
        .run()?;
    cargo(&tc.user, ["fmt", "--manifest-path"])
        .arg(&xtask_manifest)
        .arg("--")
        .arg("--check")
        .say("check formatting (xtask)")
        .run()?;
    cargo(
        &tc.user,
        [
            "clippy",
            "--locked",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )
    .say("clippy: userspace, common, testbed (builds the eBPF object on the way)")
    .run()?;
    cargo(
        &tc.ebpf,
        [
            "clippy",
            "--locked",
            "--package",
            "proxy-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
    )
    .say("clippy: the XDP program (bpfel-unknown-none)")
    .run()?;
    cargo(
        &tc.user,
        ["clippy", "--locked", "--all-targets", "--manifest-path"],
    )
    .arg(&xtask_manifest)
    .arg("--")
    .arg("-D")
    .arg("warnings")
    .say("clippy: xtask")
    .run()?;
    cargo(&tc.user, ["build", "--locked", "--bins"])
        .say("build edgeproxy and the eBPF object it embeds")
        .run()?;

    let mut tally = Tally::default();
    let mut tests = cargo(&tc.user, ["test", "--locked"])
        .env("EDGEPROXY_PEERS", &peers)
        .say("unit tests, then privileged end-to-end tests (namespaces, veth, XDP, test-run)");
    if long {
        tests = tests.env("EDGEPROXY_LONG", "1");
    }
    let result = tests.run_tee(|l| tally.add_line(l));
    let xtask_result = cargo(&tc.user, ["test", "--locked", "--manifest-path"])
        .arg(&xtask_manifest)
        .say("xtask's own unit tests")
        .run_tee(|l| tally.add_line(l));
    let leaks = leaked_namespaces();
    println!(
        "summary: {} passed, {} failed, {} ignored",
        tally.passed, tally.failed, tally.ignored
    );
    result?;
    xtask_result?;
    if !leaks.is_empty() {
        bail!("tests left network namespaces behind: {}", leaks.join(", "));
    }
    if tally.passed == 0 {
        bail!("no test ran");
    }
    // Last: it needs nothing above, and a failing suite is reported before it.
    crate::fuzz::short(&tc)
}

/// Namespaces named by the testbed (`ept<pid>x<n>`) still present after the run.
fn leaked_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ept"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.15s");
        t.add_line(
            "test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("test foo ... ok");
        assert_eq!(
            t,
            Tally {
                passed: 13,
                failed: 3,
                ignored: 1
            }
        );
    }
}

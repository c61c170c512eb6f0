//! External programs: always argument vectors (never a shell string), with a version
//! check that fails with one clear sentence when the tool is missing or too old.
use std::{
    ffi::OsStr,
    process::{Command, Output},
    sync::OnceLock,
};

use anyhow::{Context as _, bail};

/// Runs `program args…`, failing with its stderr when it exits non-zero.
pub fn run<I, S>(program: &str, args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {program} (is it installed and on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Checks once per process that iproute2's `ip` is present and new enough for
/// `ip link add … netns …` (iproute2 ≥ 5.0).
pub fn require_iproute2() -> anyhow::Result<()> {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    CHECK
        .get_or_init(|| {
            let out = run("ip", ["-V"]).map_err(|e| format!("{e:#}"))?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let version = parse_iproute2_version(&text).ok_or_else(|| {
                format!("cannot read the iproute2 version from `ip -V`: {text:?}")
            })?;
            if version < (5, 0) {
                return Err(format!(
                    "iproute2 {}.{} is too old: need 5.0 or newer (apt-get install iproute2)",
                    version.0, version.1
                ));
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `ip utility, iproute2-6.1.0, libbpf 1.1.2` → (6, 1). Older releases print
/// `iproute2-ss200127` (a date), which is before 5.0.
fn parse_iproute2_version(s: &str) -> Option<(u32, u32)> {
    let rest = s.split("iproute2-").nth(1)?;
    if rest.starts_with("ss") {
        return Some((4, 0));
    }
    let mut it = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iproute2_versions() {
        assert_eq!(
            parse_iproute2_version("ip utility, iproute2-6.1.0, libbpf 1.1.2\n"),
            Some((6, 1))
        );
        assert_eq!(
            parse_iproute2_version("ip utility, iproute2-ss200127\n"),
            Some((4, 0))
        );
        assert_eq!(parse_iproute2_version("something else"), None);
    }
}

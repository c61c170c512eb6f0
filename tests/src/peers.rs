//! Real counterparts from Debian packages, unpacked (not installed) under `target/peers`
//! by the xtask (`cargo xtask test` and `cargo xtask bench`): rsyslog, syslog-ng, HAProxy…
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Where the peers are unpacked: `$EDGEPROXY_PEERS`, else `target/peers`.
pub fn root() -> PathBuf {
    std::env::var_os("EDGEPROXY_PEERS").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/peers")
                .to_path_buf()
        },
        PathBuf::from,
    )
}

/// LD_LIBRARY_PATH for binaries unpacked under `root`.
pub fn library_path(root: &Path) -> std::ffi::OsString {
    std::env::join_paths(
        [
            "usr/lib/syslog-ng",
            "usr/lib/x86_64-linux-gnu",
            "lib/x86_64-linux-gnu",
        ]
        .iter()
        .map(|d| root.join(d)),
    )
    .unwrap_or_default()
}

/// Whether rsyslog is unpacked; otherwise says why the test skips (or, under CI, fails:
/// the xtask unpacks it, so its absence there is a harness bug).
pub fn require_rsyslog(test: &str) -> bool {
    if rsyslogd_path().is_file() {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    let why = format!(
        "rsyslog is not unpacked under {} (`cargo xtask test` unpacks it)",
        root().display()
    );
    if in_ci {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

fn rsyslogd_path() -> PathBuf {
    root().join("usr/sbin/rsyslogd")
}

/// `rsyslogd -n -f CONF -i PIDFILE -M MODULES` (foreground), libraries from the peers.
pub fn rsyslogd(conf: &Path, pidfile: &Path) -> Command {
    let root = root();
    let mut c = Command::new(rsyslogd_path());
    c.env("LD_LIBRARY_PATH", library_path(&root))
        .arg("-n")
        .arg("-f")
        .arg(conf)
        .arg("-i")
        .arg(pidfile)
        .arg("-M")
        .arg(root.join("usr/lib/x86_64-linux-gnu/rsyslog"));
    c
}

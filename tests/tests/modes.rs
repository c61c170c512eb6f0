//! Modes of what edgeproxy creates, whatever the umask it is started under, and what an
//! unprivileged local user can then do to it (issue 18, defect 3).
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use edgeproxy_testbed::{
    ChildSetup, edgeproxy_bin,
    netns::VethPair,
    privilege::require_root,
    scratch::{PinRoot, ScratchDir},
    stop_and_collect, try_start_edgeproxy_set_until,
};

const POLICY: &str =
    "[[rule]]\nname = \"syslog\"\nproto = \"udp\"\ndst_port = 5514\naction = \"pass\"\n";

/// `path` and, for a directory, everything under it, with their permission bits.
fn modes(path: &Path) -> Vec<(PathBuf, u32)> {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    let mut out = vec![(path.to_owned(), meta.mode() & 0o7777)];
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for e in entries {
            out.extend(modes(&e));
        }
    }
    out
}

/// `program args…` as user and group 65534 (nobody) with no supplementary groups.
fn as_nobody(program: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            program,
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs")
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// `edgeproxy run` under umask 000 with a pinned data plane, a stored policy, a file
/// sink, a TCP sink's spool and a stats file: every directory and file it creates has an
/// explicit mode, and user nobody can neither unlink the pinned link (which would detach
/// the filter) nor append to the stored policy nor read the spool or the logs.
#[test]
fn umask_000_leaves_nothing_to_other_users() {
    if require_root("umask_000_leaves_nothing_to_other_users") {
        leaves_nothing_to_other_users(0o000);
    }
}

/// The same under the usual umask 022, which left logs, spool and stored policies
/// readable by every user.
#[test]
fn umask_022_leaves_nothing_to_other_users() {
    if require_root("umask_022_leaves_nothing_to_other_users") {
        leaves_nothing_to_other_users(0o022);
    }
}

fn leaves_nothing_to_other_users(umask: libc::mode_t) {
    let pair = VethPair::create().expect("veth pair");
    let root = PinRoot::new().expect("pin root");
    let dir = ScratchDir::new().expect("scratch");
    let state = dir.path().join("state");
    let spool = dir.path().join("spool");
    let logs = dir.path().join("logs/out");
    let log_file = logs.join("windows.jsonl");
    let stats = dir.path().join("stats.json");
    let policy = dir.file("policy.toml", POLICY);
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{a}:5514\"\n[window]\nseconds = 0.2\n\
             [[sink]]\nkind = \"file\"\npath = \"{}\"\n\
             [[sink]]\nkind = \"tcp\"\naddress = \"{b}:6514\"\nspool_dir = \"{}\"\n\
             [[route]]\nname = \"r\"\nlisten = \"{a}:8300\"\nupstreams = [\"{b}:9\"]\n",
            log_file.display(),
            spool.display(),
            a = pair.a_v4,
            b = pair.b_v4,
        ),
    );
    let mut args: Vec<std::ffi::OsString> = ["run", "--iface", pair.a_if, "--duration", "60"]
        .iter()
        .map(Into::into)
        .collect();
    for (flag, value) in [
        ("--pin-root", root.path()),
        ("--state-dir", &state),
        ("--policy", &policy),
        ("--config", &cfg),
        ("--stats-file", &stats),
    ] {
        args.extend([flag.into(), value.into()]);
    }
    let (child, _log) = try_start_edgeproxy_set_until(
        &pair.a,
        args,
        ChildSetup::Umask(umask),
        "log pipeline started",
    )
    .expect("edgeproxy run under the umask");
    eprintln!("umask {umask:03o}:");
    let pin_dir = root.path().join(pair.a_if);
    let store = state.join(pair.a_if);
    let link = pin_dir.join("link_xdp");
    // The stats file is first written within 250 ms; the rest exists once started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(stats.exists() && link.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let slot = std::fs::read_dir(&store)
        .expect("the policy store")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "toml"))
        .expect("a stored policy");

    let mut seen = Vec::new();
    for top in [
        &pin_dir,
        &state,
        &spool,
        logs.parent().expect("logs"),
        &stats,
    ] {
        seen.extend(modes(top));
    }
    for (p, m) in &seen {
        eprintln!("{m:04o} {}", p.display());
    }
    for (p, m) in &seen {
        assert_eq!(
            m & 0o022,
            0,
            "{} is writable by others: {m:04o}",
            p.display()
        );
        let private = [&pin_dir, &state, &spool, &dir.path().join("logs")];
        if private.iter().any(|d| p.starts_with(d)) {
            assert_eq!(
                m & 0o007,
                0,
                "{} is open to every user: {m:04o}",
                p.display()
            );
        }
    }
    // The modes themselves, as documented in the README.
    assert_eq!(mode_of(&pin_dir), 0o700);
    assert_eq!(mode_of(&link), 0o600);
    assert_eq!(mode_of(&state), 0o700);
    assert_eq!(mode_of(&store), 0o700);
    assert_eq!(mode_of(&slot), 0o600);
    assert_eq!(mode_of(&spool), 0o700);
    assert_eq!(mode_of(&logs), 0o750);
    assert_eq!(mode_of(&log_file), 0o640);
    assert_eq!(mode_of(&stats), 0o640);

    let before = std::fs::read(&slot).expect("stored policy");
    let rm = as_nobody("rm", &["-f".as_ref(), link.as_os_str()]);
    assert!(
        !rm.status.success() && link.exists(),
        "nobody removed {}: {}",
        link.display(),
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(
        String::from_utf8_lossy(&rm.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    let append = as_nobody("tee", &["-a".as_ref(), slot.as_os_str()]);
    assert!(
        !append.status.success(),
        "nobody opened {} for appending",
        slot.display()
    );
    assert!(
        String::from_utf8_lossy(&append.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&append.stderr)
    );
    assert_eq!(std::fs::read(&slot).expect("stored policy"), before);
    let spool_file = std::fs::read_dir(&spool)
        .expect("spool")
        .map(|e| e.expect("entry").path())
        .next()
        .expect("a spool file");
    // 0640 files are for the group (root's here), not for nobody.
    for private in [&log_file, &spool_file, &slot, &stats] {
        let read = as_nobody("cat", &[private.as_os_str()]);
        assert!(!read.status.success(), "nobody read {}", private.display());
    }
    stop_and_collect(child);
}

/// A state directory every user can write into (left so by an earlier run under umask
/// 000) is refused at start with the path and the fix, before anything is pinned.
#[test]
fn a_world_writable_state_directory_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_root("a_world_writable_state_directory_is_refused_at_start") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let root = PinRoot::new().expect("pin root");
    let dir = ScratchDir::new().expect("scratch");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let policy = dir.file("policy.toml", POLICY);
    let out = pair
        .a
        .command(edgeproxy_bin().expect("edgeproxy binary"))
        .args(["run", "--iface", pair.a_if, "--duration", "5"])
        .arg("--pin-root")
        .arg(root.path())
        .arg("--state-dir")
        .arg(&state)
        .arg("--policy")
        .arg(&policy)
        .output()
        .expect("run edgeproxy");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {err}");
    let want = format!(
        "{} is writable by every user (mode 0777): refusing to use it; `chmod go-w {}`",
        state.display(),
        state.display()
    );
    assert!(err.contains(&want), "stderr: {err}");
    assert!(
        !root.path().join(pair.a_if).exists(),
        "nothing pinned before the refusal"
    );
    assert!(!state.join(pair.a_if).exists(), "nothing created in it");
}

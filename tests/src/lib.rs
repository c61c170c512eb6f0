//! The testbed: everything privileged end-to-end tests, the demo and the benchmarks
//! share.
//!
//! - [`netns`]: network namespaces and veth pairs with unique names, cleaned up on drop
//!   (also when a test panics), and a sweep of leftovers from killed runs.
//! - [`privilege`]: the root check; skipping is allowed only outside CI, with a reason.
//! - [`packets`]: a builder for crafted Ethernet frames (VLAN, IPv4/IPv6, TCP/UDP/ICMP).
//! - [`traffic`]: bounded UDP senders.
//! - [`tools`]: external programs run with argument vectors and version checks.
//!
//! Only loopback and addresses inside namespaces created here (10.200.0.0/16,
//! fd00:200::/32) are ever used.
pub mod generate;
pub mod netns;
pub mod packets;
pub mod peers;
pub mod policy_util;
pub mod privilege;
pub mod scratch;
pub mod tcp;
pub mod tools;
pub mod traffic;

use std::path::PathBuf;

/// The seed for a randomized test: `$EDGEPROXY_SEED` to replay a run, else random.
/// Printed either way, so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("EDGEPROXY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set EDGEPROXY_SEED to replay)");
    seed
}

/// The `edgeproxy` binary next to the running test or tool (target/<profile>/edgeproxy),
/// or `$EDGEPROXY_BIN`. `cargo xtask test` builds it before the tests run.
pub fn edgeproxy_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("EDGEPROXY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<tool>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("edgeproxy");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "the edgeproxy binary was not found next to {}; build it first (cargo xtask test does) or set EDGEPROXY_BIN",
        exe.display()
    )
}

/// A spawned child killed (and reaped) on drop, so a failed assertion never leaks it.
pub struct Reaped(pub Option<std::process::Child>);

impl Reaped {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.as_ref().map_or(0, |c| c.id() as i32))
    }

    pub fn take(&mut self) -> std::process::Child {
        self.0.take().expect("child already taken")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads `child`'s stderr until a line containing `needle` (returns true) or EOF (false);
/// the lines read are returned when it never came, and the rest keeps being drained on a
/// background thread so the child never blocks on a full pipe. (A child that neither
/// prints the line nor exits fails after 5 minutes rather than hanging the test.)
pub fn wait_for_line(child: &mut std::process::Child, needle: &str) -> (bool, Vec<String>) {
    let Some(stderr) = child.stderr.take() else {
        return (false, vec!["no stderr pipe".into()]);
    };
    match LogLines::follow(stderr).wait_for(needle, std::time::Duration::from_secs(300)) {
        Ok(line) => (true, vec![line]),
        Err(seen) => (false, seen),
    }
}

/// A child's stderr, line by line, read on a background thread (so the child never
/// blocks on a full pipe) for a test to wait on later lines.
pub struct LogLines(std::sync::mpsc::Receiver<String>);

impl LogLines {
    fn follow(stderr: std::process::ChildStderr) -> Self {
        use std::io::BufRead as _;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Nobody listening any more: keep draining regardless.
                let _ = tx.send(line);
            }
        });
        Self(rx)
    }

    /// The next line containing `needle` within `limit`, or every line seen if none did.
    pub fn wait_for(
        &self,
        needle: &str,
        limit: std::time::Duration,
    ) -> Result<String, Vec<String>> {
        let deadline = std::time::Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => return Err(seen),
            }
        }
    }
}

/// `edgeproxy ARGS…` started inside `ns` with piped output, returned once its log says
/// "log pipeline started" (within 30 s), with its log to follow; an error with its log
/// otherwise.
pub fn try_start_edgeproxy_logged<I, S>(
    ns: &netns::Netns,
    args: I,
) -> anyhow::Result<(Reaped, LogLines)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    try_start_edgeproxy_until(ns, args, "log pipeline started")
}

/// `edgeproxy ARGS…` started inside `ns` with piped output, returned once its log has a
/// line containing `ready` (within 30 s), with its log to follow.
pub fn try_start_edgeproxy_until<I, S>(
    ns: &netns::Netns,
    args: I,
    ready: &str,
) -> anyhow::Result<(Reaped, LogLines)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    try_start_edgeproxy_env_until(ns, args, &[], ready)
}

/// [`try_start_edgeproxy_until`] with `env` added to the child's environment.
pub fn try_start_edgeproxy_env_until<I, S>(
    ns: &netns::Netns,
    args: I,
    env: &[(&str, &str)],
    ready: &str,
) -> anyhow::Result<(Reaped, LogLines)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = ns.command(edgeproxy_bin()?);
    cmd.args(as_root_unless_asked(args))
        .envs(env.iter().copied());
    spawn_until(cmd, ready)
}

/// What the child is given before it starts, as a shell or a systemd unit would.
#[derive(Clone, Copy, Debug)]
pub enum ChildSetup {
    /// `RLIMIT_NOFILE` (soft, hard): `ulimit -n`, `LimitNOFILE=`.
    Nofile(u64, u64),
    /// The umask: `umask 000`, `UMask=`.
    Umask(libc::mode_t),
}

/// [`try_start_edgeproxy_env_until`] with `setup` applied in the child before it starts.
pub fn try_start_edgeproxy_set_until<I, S>(
    ns: &netns::Netns,
    args: I,
    setup: ChildSetup,
    ready: &str,
) -> anyhow::Result<(Reaped, LogLines)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    use std::os::unix::process::CommandExt as _;
    let mut cmd = ns.command(edgeproxy_bin()?);
    cmd.args(as_root_unless_asked(args));
    // SAFETY: runs in the forked child before exec and only calls setrlimit(2) or
    // umask(2), both async-signal-safe; `setup` is copied into the closure.
    unsafe {
        cmd.pre_exec(move || {
            match setup {
                ChildSetup::Nofile(soft, hard) => {
                    let limit = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                ChildSetup::Umask(mask) => {
                    libc::umask(mask);
                }
            }
            Ok(())
        });
    }
    spawn_until(cmd, ready)
}

/// `edgeproxy ARGS…` exactly as given (no `--user root` added), for the tests of what the
/// daemon runs as; returns once its log has a line containing `ready`.
pub fn try_start_edgeproxy_as_is_until<I, S>(
    ns: &netns::Netns,
    args: I,
    ready: &str,
) -> anyhow::Result<(Reaped, LogLines)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = ns.command(edgeproxy_bin()?);
    cmd.args(args);
    spawn_until(cmd, ready)
}

/// `logs` and `proxy` drop to `nobody` by default when started as root; the harness's
/// daemons keep root unless a test asks (`--user`), since their scratch directories
/// (stats files, file sinks) are root's. tests/tests/privileges.rs tests the default.
pub fn as_root_unless_asked<I, S>(args: I) -> Vec<std::ffi::OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut v: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let daemon = v.first().is_some_and(|a| a == "logs" || a == "proxy");
    if daemon && !v.iter().any(|a| a == "--user") {
        v.splice(1..1, ["--user".into(), "root".into()]);
    }
    v
}

/// Starts `cmd` with piped output; returns once its log has a line containing `ready`.
fn spawn_until(mut cmd: std::process::Command, ready: &str) -> anyhow::Result<(Reaped, LogLines)> {
    let mut child = Reaped(Some(
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    ));
    let stderr = child
        .0
        .as_mut()
        .and_then(|c| c.stderr.take())
        .ok_or_else(|| anyhow::anyhow!("no stderr pipe"))?;
    let log = LogLines::follow(stderr);
    if let Err(seen) = log.wait_for(ready, std::time::Duration::from_secs(30)) {
        anyhow::bail!("edgeproxy did not start: {seen:?}");
    }
    Ok((child, log))
}

/// [`try_start_edgeproxy_logged`] without the log.
pub fn try_start_edgeproxy<I, S>(ns: &netns::Netns, args: I) -> anyhow::Result<Reaped>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    try_start_edgeproxy_logged(ns, args).map(|(child, _log)| child)
}

/// [`try_start_edgeproxy`] for tests: panics on failure.
pub fn start_edgeproxy<I, S>(ns: &netns::Netns, args: I) -> Reaped
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    try_start_edgeproxy(ns, args).expect("start edgeproxy")
}

/// `edgeproxy logs --duration 60 --config CFG` inside `ns`, started (see
/// [`start_edgeproxy`]).
pub fn start_logs(ns: &netns::Netns, cfg: &std::path::Path) -> Reaped {
    let mut args = vec![
        std::ffi::OsString::from("logs"),
        "--duration".into(),
        "60".into(),
        "--config".into(),
    ];
    args.push(cfg.into());
    start_edgeproxy(ns, args)
}

/// SIGTERM, then the exit status and everything the child printed on stdout. The child
/// is reaped before any read error is returned.
pub fn try_stop_and_collect(
    mut child: Reaped,
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    use std::io::Read as _;
    nix::sys::signal::kill(child.pid(), nix::sys::signal::Signal::SIGTERM)?;
    let mut c = child.take();
    let mut out = String::new();
    let read = c.stdout.take().map(|mut so| so.read_to_string(&mut out));
    let status = c.wait()?;
    anyhow::Context::context(read, "no stdout pipe")??;
    Ok((status, out))
}

/// [`try_stop_and_collect`] for tests: panics unless the child exited 0.
pub fn stop_and_collect(child: Reaped) -> String {
    let (status, out) = try_stop_and_collect(child).expect("stop edgeproxy");
    assert!(status.success(), "edgeproxy failed ({status}): {out}");
    out
}

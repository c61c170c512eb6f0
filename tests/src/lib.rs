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
pub mod policy_util;
pub mod privilege;
pub mod scratch;
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
/// the lines read are returned for error messages, and the rest keeps being drained on a
/// background thread so the child never blocks on a full pipe.
pub fn wait_for_line(child: &mut std::process::Child, needle: &str) -> (bool, Vec<String>) {
    use std::io::BufRead;
    let Some(stderr) = child.stderr.take() else {
        return (false, vec!["no stderr pipe".into()]);
    };
    let mut reader = std::io::BufReader::new(stderr);
    let mut lines = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return (false, lines),
            Ok(_) => {
                let done = line.contains(needle);
                lines.push(line.trim_end().to_owned());
                if done {
                    std::thread::spawn(move || {
                        let mut sink = String::new();
                        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                            sink.clear();
                        }
                    });
                    return (true, lines);
                }
            }
        }
    }
}

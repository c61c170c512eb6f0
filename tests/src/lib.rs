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
pub mod netns;
pub mod packets;
pub mod privilege;
pub mod tools;
pub mod traffic;

use std::path::PathBuf;

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

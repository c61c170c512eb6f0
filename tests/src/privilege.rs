//! Privileged tests need root (namespaces, XDP, BPF). Outside CI a test without root
//! skips with a printed reason; under `CI=true` it fails instead, so CI can never pass
//! by skipping.

/// Returns true when the test may run. Prints why when it may not; panics in CI.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if in_ci {
        panic!("{test}: needs root (network namespaces, XDP, BPF) and CI=true forbids skipping");
    }
    eprintln!(
        "SKIPPED {test}: needs root (network namespaces, XDP, BPF); run `sudo cargo xtask test`"
    );
    false
}

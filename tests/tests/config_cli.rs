//! `edgeproxy config check|defaults` as an operator runs them (no privileges needed).
use edgeproxy_testbed::{edgeproxy_bin, scratch::ScratchDir};

fn edgeproxy(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(edgeproxy_bin().expect("binary"))
        .args(args)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn defaults_are_a_valid_configuration() {
    let dir = ScratchDir::new().expect("scratch");
    let (ok, defaults, err) = edgeproxy(&["config", "defaults"]);
    assert!(ok, "{err}");
    let f = dir.file("defaults.toml", &defaults);
    let (ok, out, err) = edgeproxy(&["config", "check", f.to_str().expect("utf8")]);
    assert!(ok, "{err}");
    assert!(out.contains("ok: 2 listeners"), "{out}");
}

#[test]
fn a_bad_configuration_is_rejected_with_every_location() {
    let dir = ScratchDir::new().expect("scratch");
    let f = dir.file(
        "bad.toml",
        "[engine]\nkind = \"kqueue\"\n[[listener]]\naddress = \"nowhere\"\n[window]\nseconds = 0\n",
    );
    let (ok, _, err) = edgeproxy(&["config", "check", f.to_str().expect("utf8")]);
    assert!(!ok);
    let p = f.display().to_string();
    for want in [
        format!("{p}:2:8: unknown engine \"kqueue\""),
        format!("{p}:4:11: \"nowhere\" is not an address:port"),
        format!("{p}:6:11: window.seconds must be at least 0.1"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in {err}");
    }
}

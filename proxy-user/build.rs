//! Builds the XDP program (proxy-ebpf) for bpfel-unknown-none with the pinned nightly
//! and leaves the object in OUT_DIR, where `dataplane::object` embeds it.
use std::{fs, path::Path};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // `cargo fuzz` builds the parsers' fuzz targets (fuzz/) with `--cfg fuzzing`. They
    // never load the data plane: its object is left empty instead of built (the eBPF
    // build was a minute of a cold fuzz build).
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
        let object = Path::new(&out).join("proxy-ebpf");
        fs::write(&object, b"").with_context(|| format!("writing {}", object.display()))?;
        return Ok(());
    }
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    // proxy-ebpf compiles proxy-common's sources too; aya-build only watches proxy-ebpf.
    println!("cargo::rerun-if-changed=../proxy-common/src");
    let toolchain = pinned_channel(&toolchain_file)?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!("building the eBPF program with {toolchain} failed; `cargo xtask bootstrap` installs the toolchain, rust-src and bpf-linker")
    })
}

/// The `channel = "…"` line of proxy-ebpf/rust-toolchain.toml: one pin for xtask and us.
fn pinned_channel(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| anyhow!("no channel = \"…\" line in {}", path.display()))
}

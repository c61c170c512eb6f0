//! Idempotent set-up of everything the build and the tests need. Each step checks
//! first and only then acts, saying what it does; a second run does nothing and takes a
//! second or two. Failures end in one sentence naming what is wrong and what to do.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    cmd::{Cmd, cargo, which},
    toolchains::{self, BPF_LINKER_VERSION, Toolchains},
};

/// What a command needs beyond toolchains.
#[derive(Default)]
pub struct Needs {
    /// Root, BTF, bpffs: anything that loads BPF or makes namespaces.
    pub privileged: bool,
    /// `(binary, Debian package)` pairs, installed only when the binary is missing.
    pub apt: &'static [(&'static str, &'static str)],
}

pub fn run(needs: &Needs) -> anyhow::Result<Toolchains> {
    let started = Instant::now();
    let mut acted = false;
    eprintln!("xtask: bootstrap: checking toolchains, bpf-linker, kernel and tools");
    if needs.privileged {
        require_root()?;
        check_kernel()?;
    }
    let tc = toolchains::pinned()?;
    if which("rustup").is_none() {
        bail!("rustup is not on PATH: install rustup (https://rustup.rs) and run this again");
    }
    acted |= ensure_toolchain(&tc.user, &["clippy", "rustfmt"])?;
    acted |= ensure_toolchain(&tc.ebpf, &["rust-src", "clippy", "rustfmt"])?;
    acted |= ensure_bpf_linker(&tc)?;
    if needs.privileged || is_root() {
        acted |= ensure_bpffs()?;
    }
    acted |= ensure_apt(needs.apt)?;
    eprintln!(
        "xtask: bootstrap: {} in {:.1} s",
        if acted { "done" } else { "nothing to do" },
        started.elapsed().as_secs_f64()
    );
    Ok(tc)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn require_root() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "this needs root (it loads XDP programs and creates network namespaces): run it as root, e.g. `sudo -E cargo xtask …`"
        );
    }
    Ok(())
}

fn check_kernel() -> anyhow::Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): edgeproxy needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    if !Path::new("/proc/sys/net/core/bpf_jit_enable").exists() {
        bail!(
            "this kernel has no BPF support (/proc/sys/net/core/bpf_jit_enable is missing): edgeproxy needs CONFIG_BPF_SYSCALL and CONFIG_BPF_JIT"
        );
    }
    Ok(())
}

/// Installs `name` with `components` unless present. Returns whether it acted.
fn ensure_toolchain(name: &str, components: &[&str]) -> anyhow::Result<bool> {
    let list = Cmd::new("rustup", ["toolchain", "list"]).output()?;
    let installed = list.lines().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|t| t.starts_with(&format!("{name}-")))
    });
    if !installed {
        Cmd::new(
            "rustup",
            ["toolchain", "install", name, "--profile", "minimal", "--component", &components.join(",")],
        )
        .say(format!("install the pinned toolchain {name} (with {})", components.join(", ")))
        .run()
        .with_context(|| format!("could not install Rust toolchain {name}: is the Rust distribution server reachable?"))?;
        return Ok(true);
    }
    let have = Cmd::new(
        "rustup",
        ["component", "list", "--installed", "--toolchain", name],
    )
    .output()?;
    let missing: Vec<&str> = components
        .iter()
        .copied()
        .filter(|c| {
            !have
                .lines()
                .any(|l| l == *c || l.starts_with(&format!("{c}-")))
        })
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let mut args = vec!["component", "add", "--toolchain", name];
    args.extend(&missing);
    Cmd::new("rustup", args)
        .say(format!("add {} to {name}", missing.join(", ")))
        .run()
        .with_context(|| format!("could not add {} to {name}", missing.join(", ")))?;
    Ok(true)
}

/// bpf-linker must be the pinned version and must run (it loads the nightly's libLLVM
/// at run time, so a changed or removed nightly breaks it). Builds it otherwise.
fn ensure_bpf_linker(tc: &Toolchains) -> anyhow::Result<bool> {
    if let Some(path) = which("bpf-linker") {
        if let Ok(v) = Cmd::new(&path, ["--version"]).output() {
            if v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
                return Ok(false);
            }
            eprintln!(
                "xtask: found {} ({}), need {BPF_LINKER_VERSION}",
                path.display(),
                v.trim()
            );
        } else {
            eprintln!(
                "xtask: {} does not run (its libLLVM is gone?); rebuilding",
                path.display()
            );
        }
    }
    let sysroot = PathBuf::from(
        Cmd::new(
            "rustc",
            [format!("+{}", tc.ebpf).as_str(), "--print", "sysroot"],
        )
        .output()?
        .trim(),
    );
    let vv = Cmd::new("rustc", [format!("+{}", tc.ebpf).as_str(), "-vV"]).output()?;
    let major = toolchains::llvm_major(&vv).ok_or_else(|| {
        anyhow!(
            "cannot read the LLVM version of {} from `rustc -vV`",
            tc.ebpf
        )
    })?;
    link_libllvm(&sysroot)?;
    // The prefix is the nightly's sysroot: bpf-linker's RUNPATH points into it, and it
    // stays as long as the toolchain does.
    cargo(
        &tc.user,
        [
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--locked",
            "--force",
        ],
    )
    .env("LLVM_PREFIX", &sysroot)
    .say(format!(
        "build bpf-linker {BPF_LINKER_VERSION} against {}'s libLLVM {major} (about a minute)",
        tc.ebpf
    ))
    .run()
    .context("could not build bpf-linker: is crates.io reachable?")?;
    if which("bpf-linker").is_none() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(true)
}

/// bpf-linker links `-lLLVM`; rustup ships only the versioned file. Adds the plain name.
fn link_libllvm(sysroot: &Path) -> anyhow::Result<()> {
    let lib = sysroot.join("lib");
    let plain = lib.join("libLLVM.so");
    if plain.exists() {
        return Ok(());
    }
    let versioned = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.file_name())
        .find(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        .ok_or_else(|| {
            anyhow!(
                "no libLLVM.so.* in {}: this nightly does not ship LLVM as a shared library",
                lib.display()
            )
        })?;
    eprintln!(
        "xtask: link {} -> {}",
        plain.display(),
        versioned.to_string_lossy()
    );
    std::os::unix::fs::symlink(&versioned, &plain)
        .with_context(|| format!("creating {}", plain.display()))
}

fn ensure_bpffs() -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    if mounted {
        return Ok(false);
    }
    fs::create_dir_all("/sys/fs/bpf").ok();
    Cmd::new("mount", ["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .say("mount the BPF filesystem at /sys/fs/bpf (pinned maps and programs live there)")
        .run()
        .context("could not mount bpffs at /sys/fs/bpf")?;
    Ok(true)
}

/// Installs the Debian packages whose binaries are missing.
pub fn ensure_apt(wanted: &[(&str, &str)]) -> anyhow::Result<bool> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|&(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    require_root()?;
    Cmd::new("apt-get", ["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .say(format!(
            "apt-get update (to install {})",
            missing.join(", ")
        ))
        .run()
        .context("apt-get update failed: are the Debian mirrors reachable?")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    Cmd::new("apt-get", args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .say(format!("install {}", missing.join(", ")))
        .run()
        .with_context(|| format!("could not install {}", missing.join(", ")))?;
    for (bin, pkg) in wanted {
        if which(bin).is_none() {
            bail!("{pkg} was installed but {bin} is still not on PATH");
        }
    }
    Ok(true)
}

/// The benchmarks' peers, with the libraries they need that a minimal Debian lacks:
/// rsyslog and syslog-ng (logs), HAProxy, nginx with its stream module, socat and iperf3
/// (TCP). They are unpacked side by side into `prefix` rather than installed: rsyslog
/// and syslog-ng conflict as packages (both provide `system-log-daemon`), and installing
/// HAProxy or nginx would start system services; the machine is left alone.
pub const PEER_PACKAGES: &[&str] = &[
    "rsyslog",
    "syslog-ng-core",
    "libestr0",
    "libfastjson4",
    "libivykis0",
    "libpcre3",
    "libnet1",
    "libwrap0",
    "haproxy",
    "liblua5.3-0",
    "libopentracing-c-wrapper0",
    "libopentracing1",
    "nginx",
    "libnginx-mod-stream",
    "socat",
    "iperf3",
    "libiperf0",
    "libsctp1",
];

/// Downloads and unpacks [`PEER_PACKAGES`] into `prefix` unless a previous run did.
pub fn ensure_peers(prefix: &Path) -> anyhow::Result<bool> {
    let stamp = prefix.join(".unpacked");
    let want = PEER_PACKAGES.join("\n");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(false);
    }
    require_root()?;
    for tool in ["apt-get", "dpkg-deb"] {
        if which(tool).is_none() {
            bail!("{tool} is not on PATH: the log benchmark's peers come from Debian packages");
        }
    }
    let debs = prefix.join(".debs");
    let _ = fs::remove_dir_all(&debs);
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let download = |update: bool| -> anyhow::Result<()> {
        if update {
            Cmd::new("apt-get", ["update", "-q"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .say("apt-get update (to download the benchmark's peers)")
                .run()
                .context("apt-get update failed: are the Debian mirrors reachable?")?;
        }
        let mut args = vec!["download", "-q"];
        args.extend(PEER_PACKAGES);
        Cmd::new("apt-get", args)
            .dir(&debs)
            .say(format!(
                "download {} (unpacked into {}, not installed)",
                PEER_PACKAGES.join(", "),
                prefix.display()
            ))
            .run()
    };
    // Without package lists (a fresh machine) the download fails; update once and retry.
    if download(false).is_err() {
        download(true).context("could not download the benchmark's peers")?;
    }
    let mut files: Vec<PathBuf> = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    files.sort();
    if files.len() != PEER_PACKAGES.len() {
        bail!(
            "apt-get download gave {} packages for {} asked ({})",
            files.len(),
            PEER_PACKAGES.len(),
            debs.display()
        );
    }
    for deb in &files {
        Cmd::new("dpkg-deb", ["-x"])
            .arg(deb)
            .arg(prefix)
            .say(format!(
                "unpack {}",
                deb.file_name().unwrap_or_default().to_string_lossy()
            ))
            .run()?;
    }
    fs::remove_dir_all(&debs).ok();
    fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(true)
}

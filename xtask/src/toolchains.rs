//! The pinned toolchains. The eBPF nightly is read from proxy-ebpf/rust-toolchain.toml
//! (proxy-user/build.rs reads the same file), so there is one place to change it.
use anyhow::{Context as _, anyhow};

/// Userspace (aya 0.16 needs rustc ≥ 1.98 on the stable channel).
pub const USER_TOOLCHAIN: &str = "1.99.1";
/// bpf-linker release, built against the eBPF nightly's own libLLVM.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Clone, Debug)]
pub struct Toolchains {
    pub user: String,
    pub ebpf: String,
}

pub fn pinned() -> anyhow::Result<Toolchains> {
    let path = crate::root().join("proxy-ebpf/rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let ebpf =
        parse_channel(&text).ok_or_else(|| anyhow!("no channel = \"…\" in {}", path.display()))?;
    Ok(Toolchains {
        user: USER_TOOLCHAIN.to_owned(),
        ebpf,
    })
}

fn parse_channel(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .find(|v| !v.is_empty())
}

/// The LLVM major version from `rustc -vV` (`LLVM version: 22.1.2`).
pub fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_channel_line() {
        let t = "# comment\n[toolchain]\nchannel = \"nightly-2026-06-01\"\ncomponents = [\"rust-src\"]\n";
        assert_eq!(parse_channel(t).as_deref(), Some("nightly-2026-06-01"));
        assert_eq!(parse_channel("[toolchain]\n"), None);
    }

    #[test]
    fn reads_llvm_major() {
        let vv =
            "rustc 1.98.0-nightly (14210df0e 2026-05-31)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }
}

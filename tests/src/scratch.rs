//! Per-test directories: a scratch directory for files, and a bpffs pin root, both
//! unique and removed on drop (a pin root is detached first, so no XDP link outlives a
//! failing test).
use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new() -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(unique("ept"));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `/sys/fs/bpf/ept<pid>x<n>`: where a test's `edgeproxy run` pins its data plane.
pub struct PinRoot(PathBuf);

impl PinRoot {
    pub fn new() -> anyhow::Result<Self> {
        sweep_stale();
        let p = Path::new("/sys/fs/bpf").join(unique("ept"));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        remove_pin_root(&self.0);
    }
}

fn remove_pin_root(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if let Err(err) = proxy_user::dataplane::detach_pinned(&e.path()) {
                eprintln!("warning: cleaning {}: {err}", e.path().display());
            }
        }
    }
    let _ = std::fs::remove_dir(root);
}

/// Pin roots of test processes that no longer exist (killed runs).
fn sweep_stale() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("ept")
                .and_then(|r| r.split('x').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                remove_pin_root(&e.path());
            }
        }
    });
}

//! Operator commands beyond `run`: policy management and detach. Each returns what it
//! would print, as text and as JSON, so tests check the same output operators read.
pub mod policy;

use std::path::{Path, PathBuf};

/// Where an interface's pins and policy store live.
#[derive(Clone, Debug)]
pub struct Paths {
    pub pin_dir: PathBuf,
    pub store_dir: PathBuf,
}

impl Paths {
    pub fn new(pin_root: &Path, state_root: &Path, iface: &str) -> Self {
        Self {
            pin_dir: pin_root.join(iface),
            store_dir: state_root.join(iface),
        }
    }
}

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/edgeproxy";
pub const DEFAULT_STATE_ROOT: &str = "/run/edgeproxy";

/// A command's result: the human text and the same facts as JSON.
pub struct Output {
    pub text: String,
    pub json: serde_json::Value,
}

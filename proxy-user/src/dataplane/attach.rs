//! XDP attach with an explicit, logged fallback from native (driver) to generic mode.
use std::{ffi::CStr, fmt, str::FromStr};

use aya::programs::{Xdp, XdpMode, xdp::XdpLinkId};

use super::DataplaneError;

/// What the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native if the driver supports it, otherwise generic (with the reason logged).
    #[default]
    Auto,
    Native,
    Generic,
}

impl FromStr for XdpModeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" | "driver" | "drv" => Ok(Self::Native),
            "generic" | "skb" => Ok(Self::Generic),
            other => Err(format!(
                "unknown XDP mode {other:?}: expected auto, native or generic"
            )),
        }
    }
}

/// What the kernel accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
    /// A pinned link from an earlier run was re-used (its mode is whatever it was).
    Adopted,
}

impl AttachedMode {
    pub const fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Adopted => "adopted",
        }
    }
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub(super) fn attach_with_fallback(
    prog: &mut Xdp,
    name: &CStr,
    iface: &str,
    choice: XdpModeChoice,
) -> Result<(AttachedMode, XdpLinkId), DataplaneError> {
    let order: &[AttachedMode] = match choice {
        XdpModeChoice::Auto => &[AttachedMode::Native, AttachedMode::Generic],
        XdpModeChoice::Native => &[AttachedMode::Native],
        XdpModeChoice::Generic => &[AttachedMode::Generic],
    };
    let mut reasons = Vec::new();
    for &mode in order {
        let flags = match mode {
            AttachedMode::Native => XdpMode::Driver,
            _ => XdpMode::Skb,
        };
        match prog.attach(name, flags) {
            Ok(link) => {
                if !reasons.is_empty() {
                    tracing::warn!(iface, mode = mode.name(), fallback_reason = %reasons.join("; "), "XDP attached in fallback mode");
                } else {
                    tracing::info!(iface, mode = mode.name(), "XDP attached");
                }
                return Ok((mode, link));
            }
            Err(e) => {
                let reason = format!("{} mode: {}", mode.name(), error_chain(&e));
                tracing::debug!(iface, %reason, "XDP attach attempt failed");
                reasons.push(reason);
            }
        }
    }
    Err(DataplaneError::Attach {
        iface: iface.to_owned(),
        reasons: reasons.join("; "),
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_parse_and_unknown_is_explained() {
        assert_eq!("auto".parse(), Ok(XdpModeChoice::Auto));
        assert_eq!("native".parse(), Ok(XdpModeChoice::Native));
        assert_eq!("drv".parse(), Ok(XdpModeChoice::Native));
        assert_eq!("skb".parse(), Ok(XdpModeChoice::Generic));
        let err = "offload".parse::<XdpModeChoice>().unwrap_err();
        assert!(
            err.contains("offload") && err.contains("auto, native or generic"),
            "{err}"
        );
    }
}

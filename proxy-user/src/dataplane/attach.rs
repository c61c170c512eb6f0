//! Hook choice: native XDP, generic XDP, or TC ingress (tcx where the kernel has it),
//! with an explicit, logged fallback in `auto` mode.
use std::{fmt, str::FromStr};

/// What the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HookChoice {
    /// Native XDP, else generic XDP, else TC ingress; each fallback logged with its reason.
    #[default]
    Auto,
    Native,
    Generic,
    /// TC ingress: for NICs whose io_uring zero-copy receive cannot share the device
    /// with an XDP program.
    Tc,
}

impl HookChoice {
    /// The hooks to try, in order.
    pub fn order(self) -> &'static [AttachedMode] {
        match self {
            HookChoice::Auto => &[
                AttachedMode::Native,
                AttachedMode::Generic,
                AttachedMode::Tc,
            ],
            HookChoice::Native => &[AttachedMode::Native],
            HookChoice::Generic => &[AttachedMode::Generic],
            HookChoice::Tc => &[AttachedMode::Tc],
        }
    }
}

impl FromStr for HookChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" | "driver" | "drv" | "xdp" => Ok(Self::Native),
            "generic" | "skb" => Ok(Self::Generic),
            "tc" | "tcx" => Ok(Self::Tc),
            other => Err(format!(
                "unknown hook {other:?}: expected auto, native, generic or tc"
            )),
        }
    }
}

/// What the kernel accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
    Tc,
    /// A pinned link from an earlier run was re-used (its hook is whatever it was).
    Adopted,
}

impl AttachedMode {
    pub const fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Tc => "tc",
            AttachedMode::Adopted => "adopted",
        }
    }

    /// The pin file of this hook's link in a pin directory (bpffs forbids dots in names).
    pub const fn link_pin(self) -> &'static str {
        match self {
            AttachedMode::Tc => "link_tc",
            _ => "link_xdp",
        }
    }
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
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
    fn hook_names_parse_and_unknown_is_explained() {
        assert_eq!("auto".parse(), Ok(HookChoice::Auto));
        assert_eq!("native".parse(), Ok(HookChoice::Native));
        assert_eq!("drv".parse(), Ok(HookChoice::Native));
        assert_eq!("skb".parse(), Ok(HookChoice::Generic));
        assert_eq!("tc".parse(), Ok(HookChoice::Tc));
        let err = "offload".parse::<HookChoice>().unwrap_err();
        assert!(
            err.contains("offload") && err.contains("auto, native, generic or tc"),
            "{err}"
        );
        assert_eq!(HookChoice::Auto.order().last(), Some(&AttachedMode::Tc));
    }
}

//! A validated policy: what `policy check` accepts and everything downstream consumes.
use std::fmt;

use super::prefix::Prefix;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Applies to IP packets no rule matches.
    pub default: Action,
    /// Applies to frames that fail to parse (truncated, impossible fields).
    pub malformed: Action,
    /// Applies to ARP and other non-IP frames (rules only ever match IP).
    pub non_ip: Action,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    /// Empty: any source. Prefixes of both families may be mixed.
    pub src: Vec<Prefix>,
    pub dst: Vec<Prefix>,
    /// IP protocol numbers; empty: any.
    pub protos: Vec<u8>,
    /// Empty: any (including packets without ports).
    pub dst_ports: Vec<PortRange>,
    pub src_ports: Vec<PortRange>,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    Sample { rate: Rate, snap: u16 },
    Capture { max: u16, then_drop: bool },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Pass => f.write_str("pass"),
            Action::Drop => f.write_str("drop"),
            Action::Sample { rate, snap } => write!(f, "sample {rate} snap {snap}"),
            Action::Capture { max, then_drop } => write!(
                f,
                "capture up to {max} bytes then {}",
                if *then_drop { "drop" } else { "pass" }
            ),
        }
    }
}

/// A sampling probability, kept as the 32-bit threshold the data plane compares
/// `bpf_get_prandom_u32()` against, plus the operator's spelling for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Sample iff random < threshold; `1 << 32` means every packet.
    pub threshold: u64,
    pub text: String,
}

impl Rate {
    pub fn probability(&self) -> f64 {
        self.threshold as f64 / (1u64 << 32) as f64
    }

    /// `1/N` or `P%` (down to 0.001%, and anything whose threshold is at least 1).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let p =
            if let Some(pct) = t.strip_suffix('%') {
                let v: f64 = pct.trim().parse().map_err(|_| {
                    format!("rate {s:?}: expected 1/N or a percentage such as 0.01%")
                })?;
                if !(v > 0.0 && v <= 100.0) {
                    return Err(format!("rate {s:?}: a percentage must be in (0, 100]"));
                }
                v / 100.0
            } else if let Some((one, n)) = t.split_once('/') {
                if one.trim() != "1" {
                    return Err(format!("rate {s:?}: write 1/N (for example 1/1000)"));
                }
                let n: u64 =
                    n.trim().parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        format!("rate {s:?}: N in 1/N must be a positive integer")
                    })?;
                1.0 / n as f64
            } else {
                return Err(format!(
                    "rate {s:?}: expected 1/N or a percentage such as 0.01%"
                ));
            };
        let threshold = (p * (1u64 << 32) as f64).round() as u64;
        if threshold == 0 {
            return Err(format!(
                "rate {s:?} is below what a 32-bit random draw can express (about 1/4294967296)"
            ));
        }
        Ok(Rate {
            threshold: threshold.min(1u64 << 32),
            text: t.to_owned(),
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_map_to_thresholds() {
        assert_eq!(Rate::parse("1/1").unwrap().threshold, 1 << 32);
        assert_eq!(Rate::parse("100%").unwrap().threshold, 1 << 32);
        assert_eq!(Rate::parse("1/1000").unwrap().threshold, 4_294_967);
        // 0.001% = 1e-5 of 2^32 = 42949.67 -> 42950: honoured, not rounded to zero.
        assert_eq!(Rate::parse("0.001%").unwrap().threshold, 42_950);
        assert!(Rate::parse("0%").is_err());
        assert!(Rate::parse("150%").is_err());
        assert!(Rate::parse("1/0").is_err());
        assert!(Rate::parse("2/10").is_err());
        assert!(Rate::parse("0.0000000001%").unwrap_err().contains("below"));
        assert!(Rate::parse("often").is_err());
    }
}

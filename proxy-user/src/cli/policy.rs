//! `edgeproxy policy load|check|show|diff|rollback` and `edgeproxy detach`.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, bail};
use proxy_common::policy::{DEFAULT_ACTION, MALFORMED_ACTION, NON_IP_ACTION};

use super::{Output, Paths};
use crate::{
    dataplane::detach_pinned,
    policy::{
        Policy, PolicyLimits, Rule,
        loader::{PolicyLoader, PolicyMaps},
        parse_policy, parse_stored_policy, read_policy_file,
    },
};

/// Reads (bounded) and validates an operator's policy file (`policy check`, `load`,
/// `diff`, `run --policy`); the error lists every problem as file:line:col.
pub fn read_policy(path: &Path, limits: &PolicyLimits) -> anyhow::Result<(Policy, String)> {
    let text = read_policy_file(path)?;
    let policy = parse_policy(&path.display().to_string(), &text, limits)?;
    Ok((policy, text))
}

fn open_loader(paths: &Paths) -> anyhow::Result<PolicyLoader> {
    if !paths.pin_dir.exists() {
        bail!(
            "no edgeproxy data plane is pinned at {} (start `edgeproxy run --iface …` first)",
            paths.pin_dir.display()
        );
    }
    let maps = PolicyMaps::open_pinned(&paths.pin_dir).with_context(|| {
        format!(
            "opening the pinned policy maps in {}",
            paths.pin_dir.display()
        )
    })?;
    Ok(PolicyLoader::new(maps, Some(paths.store_dir.clone())))
}

fn prefix_count(p: &Policy) -> usize {
    p.rules.iter().map(|r| r.src.len() + r.dst.len()).sum()
}

pub fn check(path: &Path, limits: &PolicyLimits) -> anyhow::Result<Output> {
    let (p, _) = read_policy(path, limits)?;
    Ok(Output {
        text: format!(
            "{}: ok: {} rules, {} prefixes; default {}, malformed {}, non_ip {}\n",
            path.display(),
            p.rules.len(),
            prefix_count(&p),
            p.default,
            p.malformed,
            p.non_ip
        ),
        json: serde_json::json!({"ok": true, "rules": p.rules.len(), "prefixes": prefix_count(&p)}),
    })
}

pub fn load(paths: &Paths, path: &Path, limits: &PolicyLimits) -> anyhow::Result<Output> {
    // Validate before opening anything: a bad file changes nothing.
    let (policy, text) = read_policy(path, limits)?;
    let mut loader = open_loader(paths)?;
    let r = loader.load(&policy, &text)?;
    Ok(Output {
        text: format!(
            "loaded {} as generation {} (slot {}): {} rules, {} LPM entries; compile {:.1} ms, apply {:.1} ms, clean-up after the flip {:.1} ms\n",
            path.display(),
            r.generation,
            r.slot,
            policy.rules.len(),
            r.lpm_entries,
            r.compile.as_secs_f64() * 1e3,
            r.apply.as_secs_f64() * 1e3,
            r.cleanup.as_secs_f64() * 1e3
        ),
        json: serde_json::json!({
            "generation": r.generation,
            "slot": r.slot,
            "rules": policy.rules.len(),
            "lpm_entries": r.lpm_entries,
            "compile_ms": r.compile.as_secs_f64() * 1e3,
            "apply_ms": r.apply.as_secs_f64() * 1e3,
            "cleanup_ms": r.cleanup.as_secs_f64() * 1e3,
        }),
    })
}

pub fn rollback(paths: &Paths) -> anyhow::Result<Output> {
    let mut loader = open_loader(paths)?;
    let s = loader.rollback()?;
    let slot = s.active_slot & 1;
    let generation = s.generation[slot as usize];
    Ok(Output {
        text: format!("rolled back: generation {generation} (slot {slot}) is active\n"),
        json: serde_json::json!({"generation": generation, "slot": slot}),
    })
}

pub fn show(paths: &Paths) -> anyhow::Result<Output> {
    let loader = open_loader(paths)?;
    let state = loader.state()?;
    let slot = state.active_slot & 1;
    let generation = state.generation[slot as usize];
    let previous = state.generation[(1 - slot) as usize];
    let counters = loader.rule_counters(slot)?;
    let source = loader.stored_source(slot);
    let policy = source
        .as_deref()
        .and_then(|t| parse_stored_policy("stored", t, &PolicyLimits::default()).ok());
    let mut text = String::new();
    if generation == 0 {
        let _ = writeln!(text, "no policy loaded: every packet passes");
    } else {
        let _ = writeln!(
            text,
            "active: generation {generation} (slot {slot}); {}",
            if previous == 0 {
                "no previous generation".to_owned()
            } else {
                format!("previous generation {previous} kept for rollback")
            }
        );
    }
    let _ = writeln!(
        text,
        "{:>4}  {:<24} {:<40} {:>12} {:>14}",
        "#", "rule", "action", "packets", "bytes"
    );
    let mut rows = Vec::new();
    let mut row = |idx: u32, name: String, action: String| {
        let c = counters[idx as usize];
        let _ = writeln!(
            text,
            "{:>4}  {:<24} {:<40} {:>12} {:>14}",
            if idx < DEFAULT_ACTION {
                idx.to_string()
            } else {
                "-".into()
            },
            name,
            action,
            c.packets,
            c.bytes
        );
        rows.push(serde_json::json!({"index": idx, "name": name, "action": action, "packets": c.packets, "bytes": c.bytes}));
    };
    if let Some(p) = &policy {
        for (i, r) in p.rules.iter().enumerate() {
            row(i as u32, r.name.clone(), r.action.to_string());
        }
        row(DEFAULT_ACTION, "default".into(), p.default.to_string());
        row(
            MALFORMED_ACTION,
            "malformed".into(),
            p.malformed.to_string(),
        );
        row(NON_IP_ACTION, "non_ip".into(), p.non_ip.to_string());
    } else {
        for (idx, name) in [
            (DEFAULT_ACTION, "default"),
            (MALFORMED_ACTION, "malformed"),
            (NON_IP_ACTION, "non_ip"),
        ] {
            row(idx, name.into(), "(source not stored)".into());
        }
    }
    Ok(Output {
        text,
        json: serde_json::json!({
            "generation": generation,
            "slot": slot,
            "previous_generation": previous,
            "rules": rows,
        }),
    })
}

/// One difference between the active policy and a candidate file.
fn describe(r: &Rule) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "any".to_owned()
        } else {
            v.join(",")
        }
    };
    let pfx =
        |v: &[crate::policy::Prefix]| list(&v.iter().map(ToString::to_string).collect::<Vec<_>>());
    let ports = |v: &[crate::policy::PortRange]| {
        list(&v.iter().map(ToString::to_string).collect::<Vec<_>>())
    };
    format!(
        "src {} dst {} proto {} dport {} sport {} -> {}",
        pfx(&r.src),
        pfx(&r.dst),
        list(&r.protos.iter().map(ToString::to_string).collect::<Vec<_>>()),
        ports(&r.dst_ports),
        ports(&r.src_ports),
        r.action
    )
}

pub fn diff(paths: &Paths, path: &Path, limits: &PolicyLimits) -> anyhow::Result<Output> {
    let (new, _) = read_policy(path, limits)?;
    let loader = open_loader(paths)?;
    let slot = loader.state()?.active_slot & 1;
    let old = match loader.stored_source(slot) {
        Some(t) => parse_stored_policy("active policy", &t, &PolicyLimits::default())?,
        None => Policy {
            default: crate::policy::Action::Pass,
            malformed: crate::policy::Action::Pass,
            non_ip: crate::policy::Action::Pass,
            rules: Vec::new(),
        },
    };
    let mut changes: Vec<serde_json::Value> = Vec::new();
    let mut text = String::new();
    let mut note = |kind: &str, name: &str, detail: String| {
        let _ = writeln!(text, "{kind} {name}: {detail}");
        changes.push(serde_json::json!({"change": kind, "rule": name, "detail": detail}));
    };
    for (key, a, b) in [
        ("default", &old.default, &new.default),
        ("malformed", &old.malformed, &new.malformed),
        ("non_ip", &old.non_ip, &new.non_ip),
    ] {
        if a != b {
            note("~", key, format!("{a} -> {b}"));
        }
    }
    for (i, r) in old.rules.iter().enumerate() {
        match new.rules.iter().position(|n| n.name == r.name) {
            None => note("-", &r.name, describe(r)),
            Some(j) => {
                let n = &new.rules[j];
                if n != r {
                    note("~", &r.name, format!("{} => {}", describe(r), describe(n)));
                }
                if i != j {
                    // First match wins: a move changes which rule sees a packet.
                    note(">", &r.name, format!("moved from position {i} to {j}"));
                }
            }
        }
    }
    for r in &new.rules {
        if !old.rules.iter().any(|o| o.name == r.name) {
            note("+", &r.name, describe(r));
        }
    }
    if changes.is_empty() {
        text.push_str("no changes\n");
    }
    Ok(Output {
        text,
        json: serde_json::json!({"changes": changes}),
    })
}

pub fn detach(paths: &Paths) -> anyhow::Result<Output> {
    let r = detach_pinned(&paths.pin_dir)?;
    let store_removed = match std::fs::remove_dir_all(&paths.store_dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("removing {}", paths.store_dir.display())),
    };
    let text = if r.link_detached || r.pins_removed > 0 {
        format!(
            "detached: link {}, {} pins removed from {}\n",
            if r.link_detached {
                "detached"
            } else {
                "was not pinned"
            },
            r.pins_removed,
            paths.pin_dir.display()
        )
    } else {
        format!(
            "nothing pinned at {}: nothing to detach\n",
            paths.pin_dir.display()
        )
    };
    Ok(Output {
        text,
        json: serde_json::json!({"link_detached": r.link_detached, "pins_removed": r.pins_removed, "store_removed": store_removed}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A file under the temporary directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str, text: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("ep-cli-policy-{}-{name}.toml", std::process::id()));
            std::fs::write(&path, text).expect("write");
            Self(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn check_refuses_a_file_that_states_nothing() {
        let f = Scratch::new("empty", "# every rule commented out\n");
        let Err(e) = check(&f.0, &PolicyLimits::default()) else {
            panic!("a file that states nothing was accepted");
        };
        assert_eq!(
            format!("{e:#}"),
            format!(
                "{}:1:1: the file states no rule and no default; loading it would pass every \
                 packet. To mean that, write default = \"pass\"",
                f.0.display()
            )
        );
        std::fs::write(&f.0, "default = \"pass\"\n").expect("write");
        let out = check(&f.0, &PolicyLimits::default()).expect("an explicit pass-all");
        assert!(
            out.text.ends_with(
                ": ok: 0 rules, 0 prefixes; default pass, malformed pass, non_ip pass\n"
            ),
            "{}",
            out.text
        );
    }

    #[test]
    fn an_oversized_policy_file_is_refused_before_it_is_read() {
        let f = Scratch::new("huge", "");
        // Sparse: 50 MiB that take no disk and, refused from the size, no reading.
        std::fs::File::options()
            .write(true)
            .open(&f.0)
            .and_then(|h| h.set_len(50 << 20))
            .expect("sparse file");
        let Err(e) = read_policy(&f.0, &PolicyLimits::default()) else {
            panic!("a file over the cap was accepted");
        };
        let want = format!(
            "{} is 52428800 bytes; a policy file may be at most ",
            f.0.display()
        );
        assert!(format!("{e:#}").starts_with(&want), "{e:#}");
    }
}

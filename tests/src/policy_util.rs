//! Loading policy text into a test's own (unpinned) data plane.
use proxy_user::{
    dataplane::Dataplane,
    policy::{
        Policy, PolicyLimits,
        loader::{LoadReport, PolicyLoader},
        parse_policy,
    },
};

/// Parses `toml` (panicking with the diagnostics if it is invalid: tests write valid ones).
pub fn policy(toml: &str) -> Policy {
    parse_policy("test.toml", toml, &PolicyLimits::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// A loader over `dp`'s policy maps (no store).
pub fn loader(dp: &mut Dataplane) -> PolicyLoader {
    PolicyLoader::new(dp.take_policy_maps().expect("policy maps"), None)
}

pub fn load(loader: &mut PolicyLoader, toml: &str) -> LoadReport {
    loader.load(&policy(toml), toml).expect("load policy")
}

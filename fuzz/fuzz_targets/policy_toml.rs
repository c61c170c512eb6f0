//! An operator's policy file: the pre-scan, `toml`, validation, then compilation.
//! Input: one byte choosing the limits (so the pre-scan's refusals are reached with
//! small files), then the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_user::policy::{compile::compile, parse::PolicyLimits, parse::parse_policy};

fuzz_target!(|data: &[u8]| {
    let Some((&b, text)) = data.split_first() else {
        return;
    };
    let Ok(src) = std::str::from_utf8(text) else {
        return;
    };
    let mut limits = PolicyLimits::default();
    if b & 0x80 != 0 {
        limits.max_rules = usize::from(b & 0x07) + 1;
        limits.max_prefixes = usize::from(b >> 3 & 0x07) + 1;
    }
    assert!(limits.validate().is_ok());
    match parse_policy("fuzz.toml", src, &limits) {
        Ok(p) => {
            assert!(p.rules.len() <= limits.max_rules);
            let _ = compile(&p);
        }
        Err(e) => {
            assert!(!e.diagnostics.is_empty(), "refused without a reason");
            for d in &e.diagnostics {
                assert!(d.line >= 1 && d.column >= 1);
                assert!(d.line <= src.matches('\n').count() + 1, "line past the end");
            }
            let _ = e.to_string();
        }
    }
});

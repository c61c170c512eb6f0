//! The configuration file (engine, listeners, window, sinks, TCP routes). Built with
//! `--cfg fuzzing`, the parser resolves no host names (no DNS lookups while fuzzing).
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_user::config::parse_config;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match parse_config("fuzz.toml", src) {
        Ok(_) => {}
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

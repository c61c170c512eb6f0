//! A frame sampled by the data plane: its TCP payload, then the HTTP/1.x request line
//! and Host header the report counts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_user::report::http::{request_line, tcp_payload};

fn inside(outer: &[u8], inner: &[u8]) -> bool {
    let (s, e) = (
        outer.as_ptr() as usize,
        outer.as_ptr() as usize + outer.len(),
    );
    let p = inner.as_ptr() as usize;
    p >= s && p + inner.len() <= e
}

fuzz_target!(|data: &[u8]| {
    if let Some(payload) = tcp_payload(data) {
        assert!(inside(data, payload));
        assert!(data.ends_with(payload), "payload is not the frame's tail");
    }
    // Samples are also read without the frame around them.
    for payload in [tcp_payload(data), Some(data)].into_iter().flatten() {
        let Some(r) = request_line(payload) else {
            continue;
        };
        assert!(payload.starts_with(r.method.as_bytes()));
        assert!(inside(payload, r.path.as_bytes()));
        assert!(!r.path.bytes().any(|b| b.is_ascii_control()));
        if let Some(h) = r.host {
            assert!(inside(payload, h.as_bytes()));
        }
    }
});

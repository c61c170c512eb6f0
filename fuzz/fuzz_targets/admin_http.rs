//! A request head sent to the admin endpoint (`GET /metrics HTTP/1.1` …): the parser
//! that decides what it answers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_user::admin::request_line;

fuzz_target!(|data: &[u8]| {
    let Some((method, path)) = request_line(data) else {
        return;
    };
    assert!(
        data.starts_with(method.as_bytes()),
        "method is not the head's first word"
    );
    assert!(path.starts_with('/'));
    assert!(!path.contains('?'), "query string kept in the path");
    assert!(!path.bytes().any(|b| b.is_ascii_control() || b == b' '));
    let (s, e) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
    let p = path.as_ptr() as usize;
    assert!(
        p >= s && p + path.len() <= e,
        "path is not part of the head"
    );
});

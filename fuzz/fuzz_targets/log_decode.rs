//! One received line through the decoder (RFC 5424, RFC 3164, JSON lines, plain), then
//! through the three sink encoders: the JSON line must be valid JSON, the text form one
//! line, the RFC 5424 form one octet-counted frame that decodes again as RFC 5424.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use proxy_user::logs::{
    decode::{Format, decode},
    encode::{self, RawMessage, Rfc5424Encoder},
    framing::Frames,
};

/// 2026-12-08T00:00:00Z: RFC 3164 timestamps (no year) are placed near it.
const RECEIVED_NS: i64 = 1_796_688_000_000_000_000;

fn inside(input: &[u8], field: &str) -> bool {
    let (s, e) = (
        input.as_ptr() as usize,
        input.as_ptr() as usize + input.len(),
    );
    let p = field.as_ptr() as usize;
    p >= s && p + field.len() <= e
}

fuzz_target!(|data: &[u8]| {
    let rec = decode(data, RECEIVED_NS);
    for f in [rec.procid, rec.msgid, rec.structured_data]
        .into_iter()
        .flatten()
    {
        assert!(inside(data, f), "a borrowed field is not part of the input");
    }
    if rec.format != Format::Json {
        assert!(rec.facility.is_none_or(|f| f <= 23));
    }
    assert!(rec.severity.is_none_or(|s| s <= 7));

    let m = RawMessage {
        rec: &rec,
        source: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
        received_ns: RECEIVED_NS,
        captured: false,
    };
    let mut out = Vec::new();
    encode::json(&m, &mut out);
    assert_eq!(out.last(), Some(&b'\n'));
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&out) {
        panic!(
            "JSON sink line is not JSON ({e}): {}",
            String::from_utf8_lossy(&out)
        );
    }

    out.clear();
    encode::text(&m, &mut out);
    assert_eq!(
        out.iter().filter(|&&b| b == b'\n').count(),
        1,
        "text form is not one line"
    );
    assert_eq!(out.last(), Some(&b'\n'));

    out.clear();
    Rfc5424Encoder::default().message(&m, &mut out);
    let frames: Vec<_> = Frames::new(&out, usize::MAX).collect();
    assert_eq!(frames.len(), 1, "RFC 5424 form is not one frame");
    let back = decode(frames[0].bytes, RECEIVED_NS);
    assert_eq!(back.format, Format::Rfc5424);
    if rec.format != Format::Json {
        assert_eq!(back.facility, Some(rec.facility.unwrap_or(1)));
        assert_eq!(back.severity, Some(rec.severity.unwrap_or(5)));
    }
});

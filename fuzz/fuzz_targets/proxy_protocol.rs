//! PROXY protocol v1/v2 headers at the start of a client's first bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_user::tcp::proxy_protocol::{MAX_HEADER, Parsed, V1_MAX, Version, encode, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = parse(data) else { return };
    let Parsed::Header {
        len,
        version,
        endpoints,
    } = parsed
    else {
        return;
    };
    assert!(len <= data.len(), "header longer than the input");
    match version {
        Version::V1 => assert!(len <= V1_MAX),
        Version::V2 => assert!((16..=MAX_HEADER).contains(&len)),
    }
    // The header alone parses the same: nothing after it was looked at.
    assert_eq!(parse(&data[..len]), Ok(parsed));
    // What we send for those endpoints parses back to them.
    if let Some(e) = endpoints {
        let mut out = Vec::new();
        encode(version, e.source, e.destination, &mut out);
        match parse(&out) {
            Ok(Parsed::Header {
                len: l,
                version: v,
                endpoints: Some(back),
            }) => {
                assert_eq!((l, v), (out.len(), version));
                assert_eq!(back, e, "round trip changed the endpoints");
            }
            other => panic!("our own header for {e:?} parses as {other:?}"),
        }
    }
});

//! The zero-copy decoder against syslog_loose (Vector's parser) on RFC 5424 lines, where
//! both implement the same grammar: every header field and the message must agree.
//! Header values are realistic (`[A-Za-z0-9._]`): syslog_loose rejects some printable
//! characters RFC 5424 allows in HOSTNAME (':' for one), where we follow the RFC.
//! (Not privileged: pure parsing.)
use proxy_user::logs::decode::{Format, decode};
use rand::{Rng, SeedableRng, rngs::StdRng};

#[test]
fn rfc5424_fields_agree_with_syslog_loose() {
    let mut rng = StdRng::seed_from_u64(edgeproxy_testbed::seed());
    let word = |rng: &mut StdRng, n: usize| -> String {
        (0..rng.random_range(1..=n))
            .map(|_| rng.random_range(b'!'..=b'~') as char)
            .filter(|c| !matches!(c, '[' | ']' | '"' | '-' | '=' | '\\'))
            .collect()
    };
    let ident = |rng: &mut StdRng, n: usize| -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._";
        (0..rng.random_range(1..=n))
            .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
            .collect()
    };
    let mut compared = 0;
    for _ in 0..20_000 {
        let (host, app, pid, msgid) = (
            ident(&mut rng, 20),
            ident(&mut rng, 12),
            ident(&mut rng, 6),
            ident(&mut rng, 8),
        );
        if [&host, &app, &pid, &msgid].iter().any(|s| s.is_empty()) {
            continue;
        }
        let sd = if rng.random_bool(0.5) {
            "-".to_owned()
        } else {
            format!("[id@1 k=\"{}\"]", word(&mut rng, 8))
        };
        let msg = format!("{} {}", word(&mut rng, 20), word(&mut rng, 20));
        let pri = rng.random_range(0..192u16);
        let line = format!(
            "<{pri}>1 2026-11-24T02:43:{:02}.{:03}Z {host} {app} {pid} {msgid} {sd} {msg}",
            rng.random_range(0..60),
            rng.random_range(0..1000)
        );
        let ours = decode(line.as_bytes(), 0);
        let theirs = syslog_loose::parse_message(&line, syslog_loose::Variant::RFC5424);
        assert_eq!(ours.format, Format::Rfc5424);
        assert_eq!(ours.hostname.as_deref(), theirs.hostname, "{line}");
        assert_eq!(ours.app_name.as_deref(), theirs.appname, "{line}");
        assert_eq!(ours.msgid, theirs.msgid, "{line}");
        // RFC 5424: MSG is everything after the one SP that ends STRUCTURED-DATA, leading
        // and trailing spaces included; syslog_loose trims them. A deliberate difference.
        assert_eq!(ours.message.trim(), theirs.msg, "{line}");
        if msg.trim() == msg {
            assert_eq!(ours.message, theirs.msg, "{line}");
        }
        assert_eq!(
            ours.severity.map(u32::from),
            theirs.severity.map(|s| s as u32),
            "{line}"
        );
        assert_eq!(
            ours.facility.map(u32::from),
            theirs.facility.map(|f| f as u32),
            "{line}"
        );
        let their_ts = theirs
            .timestamp
            .map(|t| t.timestamp_nanos_opt().unwrap_or_default());
        assert_eq!(ours.timestamp, their_ts, "{line}");
        compared += 1;
    }
    assert!(compared > 15_000);
}

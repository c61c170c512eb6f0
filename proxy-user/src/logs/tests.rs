//! Decoder tests: the RFCs' own examples, real-world forms, and randomized checks.
use std::borrow::Cow;

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    decode::{Format, decode},
    framing::Frames,
    time::parse_rfc3339,
};

const RX: i64 = 1_795_315_380_000_000_000; // 2026-11-24T02:43:00Z

fn ts(s: &str) -> Option<i64> {
    parse_rfc3339(s)
}

#[test]
fn rfc5424_section_6_5_examples() {
    let r = decode(b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - \xEF\xBB\xBF'su root' failed for lonvick on /dev/pts/8", RX);
    assert_eq!(r.format, Format::Rfc5424);
    assert_eq!((r.facility, r.severity), (Some(4), Some(2)));
    assert_eq!(r.timestamp, ts("2003-10-11T22:14:15.003Z"));
    assert_eq!(r.hostname.as_deref(), Some("mymachine.example.com"));
    assert_eq!(r.app_name.as_deref(), Some("su"));
    assert_eq!(
        (r.procid, r.msgid, r.structured_data),
        (None, Some("ID47"), None)
    );
    assert_eq!(
        r.message, "'su root' failed for lonvick on /dev/pts/8",
        "BOM stripped"
    );

    let r = decode(b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts.", RX);
    assert_eq!((r.facility, r.severity), (Some(20), Some(5)));
    assert_eq!(r.timestamp, ts("2003-08-24T12:14:15.000003Z"));
    assert_eq!((r.procid, r.msgid), (Some("8710"), None));
    assert_eq!(r.message, "%% It's time to make the do-nuts.");

    let r = decode(br#"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"] An application event log entry..."#, RX);
    assert_eq!(
        r.structured_data,
        Some(r#"[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]"#)
    );
    assert_eq!(r.message, "An application event log entry...");

    let r = decode(br#"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"][examplePriority@32473 class="high"]"#, RX);
    assert_eq!(
        r.structured_data,
        Some(
            r#"[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"][examplePriority@32473 class="high"]"#
        )
    );
    assert_eq!(r.message, "");
}

#[test]
fn rfc5424_escapes_and_nilvalues() {
    let r = decode(br#"<13>1 - - - - - [a@1 k="x\]y\"z\\"] after"#, RX);
    assert_eq!(r.timestamp, None);
    assert_eq!(r.hostname, None);
    assert_eq!(r.structured_data, Some(r#"[a@1 k="x\]y\"z\\"]"#));
    assert_eq!(r.message, "after");
}

#[test]
fn rfc3164_section_5_4_examples() {
    let r = decode(
        b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
        RX,
    );
    assert_eq!(r.format, Format::Rfc3164);
    assert_eq!((r.facility, r.severity), (Some(4), Some(2)));
    assert_eq!(
        r.timestamp,
        ts("2026-10-11T22:14:15Z"),
        "year inferred from receive time"
    );
    assert_eq!(r.hostname.as_deref(), Some("mymachine"));
    assert_eq!(r.app_name.as_deref(), Some("su"));
    assert_eq!(r.message, "'su root' failed for lonvick on /dev/pts/8");

    let r = decode(b"<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!", RX);
    assert_eq!(r.hostname.as_deref(), Some("10.0.0.99"));
    assert_eq!(r.app_name, None);
    assert_eq!(r.message, "Use the BFG!");
    assert_eq!(
        r.timestamp,
        ts("2026-02-05T17:32:18Z"),
        "February seen in November: this year's"
    );

    // The RFC's odd forms: decoded without panicking, priority always kept.
    let r = decode(b"<0>1990 Oct 22 10:52:01 TZ-6 scapegoat.dmz.example.org 10.1.2.3 sched[0]: That's All Folks!", RX);
    assert_eq!((r.facility, r.severity), (Some(0), Some(0)));
    assert_eq!(
        r.message,
        "1990 Oct 22 10:52:01 TZ-6 scapegoat.dmz.example.org 10.1.2.3 sched[0]: That's All Folks!"
    );
}

#[test]
fn real_world_forms() {
    // logger(1) without a hostname, with a pid.
    let r = decode(b"<13>Nov 24 02:42:59 alice[4242]: hello", RX);
    assert_eq!(
        (r.hostname.as_deref(), r.app_name.as_deref(), r.procid),
        (None, Some("alice"), Some("4242"))
    );
    assert_eq!(r.message, "hello");
    // systemd / rsyslog forwarding.
    let r = decode(
        b"<30>Nov 24 02:42:58 edge1 systemd[1]: Started Session 7 of User root.",
        RX,
    );
    assert_eq!(
        (r.hostname.as_deref(), r.app_name.as_deref(), r.procid),
        (Some("edge1"), Some("systemd"), Some("1"))
    );
    // nginx via syslog.
    let r = decode(br#"<190>Nov 24 02:42:57 web1 nginx: 10.0.0.1 - - [24/Nov/2026:02:42:57 +0000] "GET /health HTTP/1.1" 200 2"#, RX);
    assert_eq!(
        (r.facility, r.severity, r.app_name.as_deref()),
        (Some(23), Some(6), Some("nginx"))
    );
    assert!(r.message.starts_with("10.0.0.1 - - ["));
    // Kernel messages.
    let r = decode(
        b"<4>Nov 24 02:42:56 edge1 kernel: [12345.678901] eth0: link up",
        RX,
    );
    assert_eq!(
        (r.severity, r.app_name.as_deref()),
        (Some(4), Some("kernel"))
    );
    assert_eq!(r.message, "[12345.678901] eth0: link up");
    // Cisco IOS: sequence number, '*', fractional seconds, colon after the time.
    let r = decode(
        b"<189>123: *Mar  1 18:46:11.123: %SYS-5-CONFIG_I: Configured from console by vty0",
        RX,
    );
    assert_eq!((r.facility, r.severity), (Some(23), Some(5)));
    assert_eq!(r.timestamp, ts("2026-03-01T18:46:11.123Z"));
    assert_eq!(r.app_name.as_deref(), Some("%SYS-5-CONFIG_I"));
    assert_eq!(r.message, "Configured from console by vty0");
    // JSON lines from applications.
    let r = decode(br#"{"ts":"2026-11-24T02:42:55Z","level":"warn","service":"api","host":"pod-7","msg":"slow \"query\"","ms":812}"#, RX);
    assert_eq!(r.format, Format::Json);
    assert_eq!(
        (r.severity, r.hostname.as_deref(), r.app_name.as_deref()),
        (Some(4), Some("pod-7"), Some("api"))
    );
    assert_eq!(r.timestamp, ts("2026-11-24T02:42:55Z"));
    assert_eq!(r.message, "slow \"query\"");
    assert!(
        matches!(r.message, Cow::Owned(_)),
        "escaped strings are unescaped into an owned string"
    );
    let r = decode(
        br#"{"time":1795315375.5,"severity":3,"message":"boom"}"#,
        RX,
    );
    assert_eq!(
        (r.severity, r.timestamp),
        (Some(3), Some(1_795_315_375_500_000_000))
    );
    // Not JSON after all: plain.
    let r = decode(b"{not json", RX);
    assert_eq!((r.format, r.message.as_ref()), (Format::Plain, "{not json"));
    let r = decode(b"just text", RX);
    assert_eq!(
        (r.format, r.severity, r.message.as_ref()),
        (Format::Plain, None, "just text")
    );
}

#[test]
fn invalid_utf8_is_kept_lossily_and_flagged() {
    let r = decode(b"<13>1 - h a - - - caf\xE9 au lait", RX);
    assert!(r.invalid_utf8);
    assert_eq!(r.message, "caf\u{FFFD} au lait");
    let r = decode(b"<13>Nov 24 02:42:59 h a: ok", RX);
    assert!(!r.invalid_utf8);
    assert!(
        matches!(r.message, Cow::Borrowed(_)),
        "valid messages are not copied"
    );
}

#[test]
fn priorities_out_of_range_are_not_priorities() {
    assert_eq!(decode(b"<192>1 - - - - - - x", RX).format, Format::Plain);
    assert_eq!(decode(b"<>x", RX).format, Format::Plain);
    assert_eq!(decode(b"<1234>x", RX).format, Format::Plain);
    assert_eq!(decode(b"<191>x", RX).severity, Some(7));
}

/// Random bytes, and random mutations of valid lines, never panic, and the message of a
/// line without a recognised header is the whole line.
#[test]
fn random_input_never_panics() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let seeds: [&[u8]; 4] = [
        b"<34>1 2003-10-11T22:14:15.003Z host app 1 ID [a@1 k=\"v\"] msg",
        b"<13>Nov 24 02:42:59 host app[1]: msg",
        br#"{"msg":"x","level":"info"}"#,
        b"<189>123: *Mar  1 18:46:11.123: %SYS-5-X: y",
    ];
    for i in 0..100_000 {
        let mut b: Vec<u8> = if i % 2 == 0 {
            (0..rng.random_range(0..80)).map(|_| rng.random()).collect()
        } else {
            seeds[i % seeds.len()].to_vec()
        };
        for _ in 0..rng.random_range(0..4) {
            if !b.is_empty() {
                let j = rng.random_range(0..b.len());
                match rng.random_range(0..3) {
                    0 => b[j] = rng.random(),
                    1 => b.truncate(j),
                    _ => {
                        const SPECIAL: &[u8] = b" []\"\\<>:";
                        b.insert(j, SPECIAL[rng.random_range(0..SPECIAL.len())]);
                    }
                }
            }
        }
        let r = decode(&b, RX);
        if r.format == Format::Plain && r.severity.is_none() && !r.invalid_utf8 {
            assert_eq!(
                r.message.as_bytes(),
                &b[..],
                "an unrecognised line is its own message"
            );
        }
        for f in Frames::new(&b, 64) {
            assert!(f.bytes.len() <= 64);
            let _ = decode(f.bytes, RX);
        }
    }
}

/// Lines built from random fields decode back to those fields.
#[test]
fn rfc5424_round_trip() {
    let mut rng = StdRng::seed_from_u64(42);
    let word = |rng: &mut StdRng, n: usize| -> String {
        (0..rng.random_range(1..=n))
            .map(|_| rng.random_range(b'!'..=b'~') as char)
            .filter(|&c| c != '[' && c != '-' && c != '"' && c != ']')
            .collect::<String>()
    };
    for _ in 0..10_000 {
        let (fac, sev) = (rng.random_range(0..24u8), rng.random_range(0..8u8));
        let host = word(&mut rng, 20);
        let app = word(&mut rng, 12);
        let msg = format!("{} {}", word(&mut rng, 30), word(&mut rng, 30));
        if host.is_empty() || app.is_empty() {
            continue;
        }
        let line = format!(
            "<{}>1 2026-11-24T02:43:00.5Z {host} {app} 77 - [x@1 a=\"b\"] {msg}",
            fac * 8 + sev
        );
        let r = decode(line.as_bytes(), RX);
        assert_eq!((r.facility, r.severity), (Some(fac), Some(sev)), "{line}");
        assert_eq!(r.hostname.as_deref(), Some(host.as_str()), "{line}");
        assert_eq!(r.app_name.as_deref(), Some(app.as_str()), "{line}");
        assert_eq!(r.message, msg, "{line}");
        assert_eq!(r.timestamp, ts("2026-11-24T02:43:00.5Z"));
    }
}

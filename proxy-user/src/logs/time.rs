//! Timestamps found in log lines, as Unix nanoseconds (UTC), without allocation.

const NANOS: i64 = 1_000_000_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn digits(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u32, |acc, &b| {
        acc.checked_mul(10)?.checked_add(u32::from(b - b'0'))
    })
}

fn valid(m: u32, d: u32, h: u32, mi: u32, s: u32) -> bool {
    (1..=12).contains(&m) && (1..=31).contains(&d) && h < 24 && mi < 60 && s <= 60
}

/// RFC 3339 as RFC 5424 uses it: `2003-08-24T05:14:15.000003-07:00`, `…Z`.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, m, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (h, mi, sec) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if !valid(m, d, h, mi, sec) {
        return None;
    }
    let mut i = 19;
    let mut frac: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                frac = frac * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = (i - start).min(9);
        if n == 0 {
            return None;
        }
        frac *= 10i64.pow(9 - n as u32);
    }
    let offset_secs: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = i64::from(digits(&b[i + 1..i + 3])?);
            let om = i64::from(digits(&b[i + 4..i + 6])?);
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(i64::from(y), m, d);
    let secs =
        days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(sec) - offset_secs;
    // Nanoseconds in an i64 reach from 1677 to 2262: a time outside has no timestamp
    // (it overflowed: a panic in debug builds, a wrapped time in release ones).
    secs.checked_mul(NANOS)?.checked_add(frac)
}

/// How far in the future a year-less timestamp may lie (sender clock ahead).
pub const FUTURE_SKEW_NS: i64 = 7 * 86_400 * NANOS;

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// RFC 3164's `Mmm dd hh:mm:ss` (day space- or zero-padded), optionally with fractional
/// seconds. Returns the timestamp and the bytes consumed. The year is not in the line:
/// the latest year that puts the time no more than [`FUTURE_SKEW_NS`] after
/// `received_ns` is chosen — logs describe the past, give or take clock skew (so a
/// December line received on 1 January belongs to the previous year, and a 1 January
/// line received seconds before midnight on 31 December to the next). No zone: UTC.
pub fn parse_bsd(b: &[u8], received_ns: i64) -> Option<(i64, usize)> {
    if b.len() < 15 || b[3] != b' ' || b[6] != b' ' || b[9] != b':' || b[12] != b':' {
        return None;
    }
    let month = &b[0..3];
    let m = MONTHS
        .iter()
        .position(|mm| mm.eq_ignore_ascii_case(month))? as u32
        + 1;
    let day = if b[4] == b' ' {
        digits(&b[5..6])?
    } else {
        digits(&b[4..6])?
    };
    let (h, mi, s) = (digits(&b[7..9])?, digits(&b[10..12])?, digits(&b[13..15])?);
    if !valid(m, day, h, mi, s) {
        return None;
    }
    let mut used = 15;
    let mut frac: i64 = 0;
    if b.get(15) == Some(&b'.') {
        let start = 16;
        let mut i = start;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 9 {
            frac = frac * 10 + i64::from(b[i] - b'0');
            i += 1;
        }
        if i > start {
            frac *= 10i64.pow(9 - (i - start) as u32);
            used = i;
        }
    }
    let rx_year = year_of(received_ns.div_euclid(NANOS));
    let best = [rx_year + 1, rx_year, rx_year - 1]
        .into_iter()
        .map(|y| {
            let secs = days_from_civil(y, m, day) * 86_400
                + i64::from(h) * 3600
                + i64::from(mi) * 60
                + i64::from(s);
            secs * NANOS + frac
        })
        .find(|&t| t <= received_ns + FUTURE_SKEW_NS)?;
    Some((best, used))
}

/// The Gregorian year of a Unix time in seconds.
pub fn year_of(secs: i64) -> i64 {
    civil_from_days(secs.div_euclid(86_400)).0
}

/// Unix nanoseconds as RFC 3339 UTC with microseconds (`2026-11-24T10:00:00.000000Z`),
/// the form RFC 5424 TIMESTAMP allows (at most six fractional digits).
pub fn format_rfc3339_micros(ns: i64, out: &mut Vec<u8>) {
    let secs = ns.div_euclid(NANOS);
    let micros = ns.rem_euclid(NANOS) / 1000;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // Digits are written by hand: this runs once per message for text and RFC 5424
    // sinks, where `write!` with padding was a tenth of the worker's time. Every i64 of
    // nanoseconds falls in years 1677–2262 (both ends are tested): four digits.
    let year = y as u32;
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut b[0..4], year);
    put_digits(&mut b[5..7], m);
    put_digits(&mut b[8..10], d);
    // tod and micros are non-negative and below 86,400 and 1,000,000.
    let tod = tod as u32;
    put_digits(&mut b[11..13], tod / 3600);
    put_digits(&mut b[14..16], tod % 3600 / 60);
    put_digits(&mut b[17..19], tod % 60);
    put_digits(&mut b[20..26], micros as u32);
    out.extend_from_slice(&b);
}

/// `n`'s last `dst.len()` decimal digits, zero-padded, into `dst`.
fn put_digits(dst: &mut [u8], mut n: u32) {
    for c in dst.iter_mut().rev() {
        *c = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// The inverse of [`days_from_civil`] (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_round_trips_through_the_parser() {
        let mut out = Vec::new();
        format_rfc3339_micros(1_795_514_400_000_000_000, &mut out);
        assert_eq!(out, b"2026-11-24T10:00:00.000000Z");
        // Leap days, century rules, before 1970, microsecond truncation.
        let mut x: i64 = 0x2545_f491_4f6c_dd1d;
        for t in [
            0i64,
            951_782_400_123_456_000,
            4_107_456_000_000_001_000,
            -2_208_988_800_999_999_000,
        ]
        .into_iter()
        .chain((0..10_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.rem_euclid(8_000_000_000_000_000_000) - 2_000_000_000_000_000_000
        })) {
            out.clear();
            format_rfc3339_micros(t, &mut out);
            let s = std::str::from_utf8(&out).expect("ascii");
            assert_eq!(parse_rfc3339(s), Some(t - t.rem_euclid(1000)), "{s}");
            // The hand-written digits against std's padded formatting.
            let secs = t.div_euclid(NANOS);
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            let tod = secs.rem_euclid(86_400);
            let want = format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
                tod / 3600,
                tod % 3600 / 60,
                tod % 60,
                t.rem_euclid(NANOS) / 1000
            );
            assert_eq!(s, want);
        }
        // The ends of i64: years 1677 and 2262, still four digits.
        for (t, want) in [
            (i64::MIN, "1677-09-21T00:12:43.145224Z"),
            (i64::MAX, "2262-04-11T23:47:16.854775Z"),
        ] {
            out.clear();
            format_rfc3339_micros(t, &mut out);
            assert_eq!(std::str::from_utf8(&out).expect("ascii"), want);
        }
    }

    #[test]
    fn rfc3339_examples_from_rfc5424() {
        // 2003-10-11T22:14:15.003Z
        assert_eq!(
            parse_rfc3339("2003-10-11T22:14:15.003Z"),
            Some(1_065_910_455_003_000_000)
        );
        // -07:00 is seven hours behind UTC: 05:14:15-07:00 is 12:14:15Z = 1061727255.
        assert_eq!(
            parse_rfc3339("2003-08-24T05:14:15.000003-07:00"),
            Some(1_061_727_255 * NANOS + 3_000)
        );
        assert_eq!(
            parse_rfc3339("1985-04-12T23:20:50.52Z"),
            Some(482_196_050 * NANOS + 520_000_000)
        );
        for bad in [
            "2003-13-11T22:14:15Z",
            "2003-10-11T22:14:15",
            "2003-10-11T22:14:15.Z",
            "-",
            "2003-10-11T22:14:15+0700",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_outside_the_i64_nanosecond_range_is_no_timestamp() {
        // Found by the log_decode fuzz target (a JSON line's "ts"): year 865 overflowed.
        assert_eq!(parse_rfc3339("0865-12-08T10:00:00.123Z"), None);
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59.999999999Z"), None);
        assert_eq!(parse_rfc3339("1677-09-21T00:12:43.5Z"), None);
        assert_eq!(
            parse_rfc3339("1677-09-21T00:12:44Z"),
            Some(-9_223_372_036 * NANOS)
        );
        assert_eq!(
            parse_rfc3339("2262-04-11T23:47:16.854775807Z"),
            Some(i64::MAX)
        );
        assert_eq!(parse_rfc3339("2262-04-11T23:47:16.854775808Z"), None);
        let line = br#"{"msg":"m","ts":"0865-12-08T10:00:00.123Z"}"#;
        assert_eq!(crate::logs::decode::decode(line, 0).timestamp, None);
    }

    #[test]
    fn bsd_timestamps_pick_the_latest_year_not_in_the_future() {
        let rx = parse_rfc3339("2026-11-24T02:43:00Z").unwrap();
        let (t, used) = parse_bsd(b"Nov 24 02:42:59 host", rx).unwrap();
        assert_eq!(used, 15);
        assert_eq!(t, rx - NANOS);
        // Received on 1 January: a 31 December line is from last year.
        let jan1 = parse_rfc3339("2027-01-01T00:00:05Z").unwrap();
        let (t, _) = parse_bsd(b"Dec 31 23:59:59", jan1).unwrap();
        assert_eq!(t, parse_rfc3339("2026-12-31T23:59:59Z").unwrap());
        // A sender a few seconds ahead across New Year: next year.
        let dec31 = parse_rfc3339("2026-12-31T23:59:58Z").unwrap();
        let (t, _) = parse_bsd(b"Jan  1 00:00:03", dec31).unwrap();
        assert_eq!(t, parse_rfc3339("2027-01-01T00:00:03Z").unwrap());
        // Months ahead is not skew: last year.
        let (t, _) = parse_bsd(b"Mar  1 00:00:00", rx).unwrap();
        assert_eq!(t, parse_rfc3339("2026-03-01T00:00:00Z").unwrap());
        // Space-padded day and fractional seconds (Cisco).
        let (t, used) = parse_bsd(
            b"Mar  1 18:46:11.123: %SYS",
            parse_rfc3339("2026-03-02T00:00:00Z").unwrap(),
        )
        .unwrap();
        assert_eq!(used, 19);
        assert_eq!(t, parse_rfc3339("2026-03-01T18:46:11.123Z").unwrap());
        assert_eq!(parse_bsd(b"Foo 24 02:42:59", rx), None);
    }

    #[test]
    fn year_of_boundaries() {
        assert_eq!(year_of(0), 1970);
        assert_eq!(
            year_of(parse_rfc3339("2000-02-29T12:00:00Z").unwrap() / NANOS),
            2000
        );
        assert_eq!(
            year_of(parse_rfc3339("2026-12-31T23:59:59Z").unwrap() / NANOS),
            2026
        );
        assert_eq!(
            year_of(parse_rfc3339("2027-01-01T00:00:00Z").unwrap() / NANOS),
            2027
        );
    }
}

//! What sinks write, in either output format: raw messages and window reports as JSON
//! lines, or as RFC 5424 messages framed with RFC 6587 octet counting (`LEN SP MSG`, no
//! newline), which syslog receivers take over TCP and which survives newlines inside
//! messages.
use std::{io::Write as _, net::IpAddr};

use super::{decode::LogRecord, time::format_rfc3339_micros};

/// One received message with what the pipeline knows about its arrival.
pub struct RawMessage<'r, 'a> {
    pub rec: &'r LogRecord<'a>,
    pub source: Option<IpAddr>,
    pub received_ns: i64,
    /// It came through the data plane's capture ring rather than a socket.
    pub captured: bool,
}

/// Appends `m` as one JSON line: `received_ns`, `ts_ns`, `source`, `captured`,
/// `format`, `facility`, `severity`, `host`, `app`, `procid`, `msgid`,
/// `structured_data` (RFC 5424's, as received), `msg`, in that
/// order, absent ones omitted. Written by hand: this runs once per message for raw
/// sinks, where serde's generic path was the largest user-space cost; a test holds the
/// output byte-for-byte to serde_json's.
pub fn json(m: &RawMessage<'_, '_>, out: &mut Vec<u8>) {
    let r = m.rec;
    out.extend_from_slice(b"{\"received_ns\":");
    int(m.received_ns, out);
    if let Some(ts) = r.timestamp {
        out.extend_from_slice(b",\"ts_ns\":");
        int(ts, out);
    }
    if let Some(ip) = m.source {
        out.extend_from_slice(b",\"source\":\"");
        address(ip, out);
        out.push(b'"');
    }
    out.extend_from_slice(if m.captured {
        b",\"captured\":true"
    } else {
        b",\"captured\":false"
    });
    out.extend_from_slice(b",\"format\":\"");
    out.extend_from_slice(r.format.name().as_bytes());
    out.push(b'"');
    if let Some(f) = r.facility {
        out.extend_from_slice(b",\"facility\":");
        int(f, out);
    }
    if let Some(v) = r.severity {
        out.extend_from_slice(b",\"severity\":");
        int(v, out);
    }
    for (name, value) in [
        (&b",\"host\":"[..], r.hostname.as_deref()),
        (b",\"app\":", r.app_name.as_deref()),
        (b",\"procid\":", r.procid),
        (b",\"msgid\":", r.msgid),
        // RFC 5424 STRUCTURED-DATA as received (`-`, none, is omitted).
        (
            b",\"structured_data\":",
            r.structured_data.filter(|sd| *sd != "-"),
        ),
        (b",\"msg\":", Some(&*r.message)),
    ] {
        if let Some(v) = value {
            out.extend_from_slice(name);
            string(v, out);
        }
    }
    out.extend_from_slice(b"}\n");
}

fn int(n: impl itoa::Integer, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// An address as `Display` writes it; IPv4 without the formatting machinery.
fn address(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                int(*o, out);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A JSON string as serde_json writes it: `"` and `\\` escaped, control characters as
/// `\\n`, `\\t`… or `\\u00XX`, everything else (UTF-8 included) as is.
fn string(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// Facility `user`, severity `notice`: what RFC 3164 §4.3.3 has relays assume when a
/// message carries no PRI.
const DEFAULT_FACILITY: u8 = 1;
const DEFAULT_SEVERITY: u8 = 5;

/// Header field limits from RFC 5424 §6 (HOSTNAME, APP-NAME, PROCID, MSGID).
const MAX_HOST: usize = 255;
const MAX_APP: usize = 48;
const MAX_PROCID: usize = 128;
const MAX_MSGID: usize = 32;

/// Encodes RFC 5424 frames; keeps a scratch buffer so steady state allocates nothing.
#[derive(Default)]
pub struct Rfc5424Encoder {
    scratch: Vec<u8>,
}

impl Rfc5424Encoder {
    /// Appends `m` as one octet-counted RFC 5424 message. Fields the original lacks get
    /// defaults (PRI 13, the receive time, the sender's address as HOSTNAME); header
    /// fields are cut to RFC 5424's lengths and anything outside PRINTUSASCII becomes
    /// `_`. The sender's address is added as `[origin ip="…"]` unless the message
    /// already has an `origin` element. MSG is the decoded text without a BOM.
    pub fn message(&mut self, m: &RawMessage<'_, '_>, out: &mut Vec<u8>) {
        let r = m.rec;
        let s = &mut self.scratch;
        s.clear();
        let facility = r.facility.filter(|f| *f <= 23).unwrap_or(DEFAULT_FACILITY);
        let severity = r.severity.filter(|v| *v <= 7).unwrap_or(DEFAULT_SEVERITY);
        s.push(b'<');
        int(u16::from(facility) * 8 + u16::from(severity), s);
        s.extend_from_slice(b">1 ");
        time_and_host(m, s);
        s.push(b' ');
        header_field(r.app_name.as_deref().unwrap_or("-"), MAX_APP, s);
        s.push(b' ');
        header_field(r.procid.unwrap_or("-"), MAX_PROCID, s);
        s.push(b' ');
        header_field(r.msgid.unwrap_or("-"), MAX_MSGID, s);
        s.push(b' ');
        let sd = r.structured_data.filter(|sd| *sd != "-");
        if let Some(sd) = sd {
            s.extend_from_slice(sd.as_bytes());
        }
        let has_origin = sd.is_some_and(|sd| sd.contains("[origin ") || sd.contains("[origin]"));
        match m.source {
            Some(ip) if !has_origin => {
                s.extend_from_slice(b"[origin ip=\"");
                address(ip, s);
                s.extend_from_slice(b"\"]");
            }
            _ if sd.is_none() => s.push(b'-'),
            _ => {}
        }
        if !r.message.is_empty() {
            s.push(b' ');
            s.extend_from_slice(r.message.as_bytes());
        }
        frame(s, out);
    }

    /// Appends a window report (its JSON) as one octet-counted RFC 5424 message from
    /// `host`, APP-NAME `edgeproxy`, MSGID `window`, facility syslog, severity info.
    pub fn window(&mut self, report_json: &str, now_ns: i64, host: &str, out: &mut Vec<u8>) {
        let s = &mut self.scratch;
        s.clear();
        s.extend_from_slice(b"<46>1 ");
        format_rfc3339_micros(now_ns, s);
        s.push(b' ');
        header_field(host, MAX_HOST, s);
        let _ = write!(s, " edgeproxy {} window - ", std::process::id());
        s.extend_from_slice(report_json.as_bytes());
        frame(s, out);
    }
}

/// Appends `m` as one line of a traditional syslog file, the way rsyslog's default file
/// template (`RSYSLOG_FileFormat`) writes it: `TIMESTAMP HOST TAG MSG`. TIMESTAMP is RFC
/// 3339 with microseconds (the message's own, else the receive time), HOST the message's
/// hostname, else the sender's address, else `-`; TAG is `app[procid]:` (`app:` without
/// a PROCID; absent without an APP-NAME). Header fields keep PRINTUSASCII only, and
/// control characters in MSG are escaped as rsyslog does (`#` and three octal digits,
/// so a newline is `#012`): one message is always one line.
pub fn text(m: &RawMessage<'_, '_>, out: &mut Vec<u8>) {
    let r = m.rec;
    time_and_host(m, out);
    if let Some(app) = r.app_name.as_deref().filter(|a| !a.is_empty()) {
        out.push(b' ');
        header_field(app, MAX_APP, out);
        if let Some(pid) = r.procid.filter(|p| !p.is_empty()) {
            out.push(b'[');
            header_field(pid, MAX_PROCID, out);
            out.push(b']');
        }
        out.push(b':');
    }
    out.push(b' ');
    escape_controls(&r.message, out);
    out.push(b'\n');
}

/// `TIMESTAMP HOST`, shared by the RFC 5424 and text forms: the message's own time
/// (else the receive time) with microseconds, its hostname, else the sender's address,
/// else NILVALUE.
fn time_and_host(m: &RawMessage<'_, '_>, out: &mut Vec<u8>) {
    format_rfc3339_micros(m.rec.timestamp.unwrap_or(m.received_ns), out);
    out.push(b' ');
    match (m.rec.hostname.as_deref(), m.source) {
        (Some(h), _) => header_field(h, MAX_HOST, out),
        (None, Some(ip)) => address(ip, out),
        (None, None) => out.push(b'-'),
    }
}

/// A window report (its JSON) as one text line from `host`, tag `edgeproxy[PID]:`.
pub fn text_window(report_json: &str, now_ns: i64, host: &str, out: &mut Vec<u8>) {
    format_rfc3339_micros(now_ns, out);
    out.push(b' ');
    header_field(host, MAX_HOST, out);
    let _ = write!(out, " edgeproxy[{}]: window ", std::process::id());
    escape_controls(report_json, out);
    out.push(b'\n');
}

/// Control characters as `#` and three octal digits (rsyslog's escape); the rest as is.
fn escape_controls(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    // Most messages have no control character: skip eight clean bytes at a time.
    let mut i = 0;
    while let Some(word) = bytes.get(i..i + 8) {
        let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
        if has_control(w) {
            break;
        }
        i += 8;
    }
    let mut start = 0;
    for (j, &c) in bytes.iter().enumerate().skip(i) {
        if c < 0x20 || c == 0x7f {
            out.extend_from_slice(&bytes[start..j]);
            out.extend_from_slice(&[b'#', b'0' + (c >> 6), b'0' + ((c >> 3) & 7), b'0' + (c & 7)]);
            start = j + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Whether any byte of `w` is below 0x20 or is 0x7f. Exact when none is (the borrow in
/// the subtraction only propagates above a byte that is flagged itself), which is all
/// the skip above relies on.
fn has_control(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let del = w ^ (ONES * 0x7f);
    let is_del = del.wrapping_sub(ONES) & !del & HIGH;
    below_space | is_del != 0
}

/// RFC 6587 octet counting: `LEN SP MSG`.
fn frame(msg: &[u8], out: &mut Vec<u8>) {
    int(msg.len(), out);
    out.push(b' ');
    out.extend_from_slice(msg);
}

/// A header field: PRINTUSASCII only (others become `_`), at most `max` characters,
/// NILVALUE when empty.
fn header_field(v: &str, max: usize, out: &mut Vec<u8>) {
    if v.is_empty() {
        out.push(b'-');
        return;
    }
    // The usual case, copied whole: short enough and nothing to replace.
    if v.len() <= max && v.bytes().all(|b| b.is_ascii_graphic()) {
        out.extend_from_slice(v.as_bytes());
        return;
    }
    for c in v.chars().take(max) {
        out.push(if c.is_ascii_graphic() { c as u8 } else { b'_' });
    }
}

/// This machine's host name for the RFC 5424 HOSTNAME of window reports.
pub fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "-".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::{decode::decode, framing::Frames};

    const RX: i64 = 1_795_514_400_000_000_000; // 2026-11-24T10:00:00Z

    /// `line` decoded as received from `source` at RX, then written by `write`.
    fn encoded_with(
        line: &[u8],
        source: Option<IpAddr>,
        write: impl FnOnce(&RawMessage<'_, '_>, &mut Vec<u8>),
    ) -> Vec<u8> {
        let rec = decode(line, RX);
        let mut out = Vec::new();
        let m = RawMessage {
            rec: &rec,
            source,
            received_ns: RX,
            captured: false,
        };
        write(&m, &mut out);
        out
    }

    fn encode(line: &[u8], source: Option<IpAddr>) -> Vec<u8> {
        encoded_with(line, source, |m, out| {
            Rfc5424Encoder::default().message(m, out)
        })
    }

    #[test]
    fn rfc5424_input_keeps_its_header_and_gains_an_origin() {
        let ip: IpAddr = "10.200.0.2".parse().unwrap();
        let out = encode(
            b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\"] An application event",
            Some(ip),
        );
        let body = "<165>1 2003-10-11T22:14:15.003000Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\"][origin ip=\"10.200.0.2\"] An application event";
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{} {body}", body.len())
        );
        // An existing origin element is not duplicated; NILVALUE SD stays NILVALUE
        // without a source.
        let out = encode(b"<13>1 - h a - - [origin ip=\"192.0.2.1\"] x", Some(ip));
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with(" h a - - [origin ip=\"192.0.2.1\"] x")
        );
        let out = encode(b"<13>1 - h a - - - x", None);
        let body = "<13>1 2026-11-24T10:00:00.000000Z h a - - - x";
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{} {body}", body.len())
        );
    }

    #[test]
    fn bsd_and_plain_input_get_defaults_and_clean_header_fields() {
        // RFC 3164 with a tag and pid: facility/severity kept, year-less time resolved.
        let out = encode(
            b"<34>Oct 11 22:14:15 mymachine su[42]: 'su root' failed",
            None,
        );
        let s = String::from_utf8(out).unwrap();
        let body = s.split_once(' ').unwrap().1;
        assert_eq!(
            body,
            "<34>1 2026-10-11T22:14:15.000000Z mymachine su 42 - - 'su root' failed"
        );
        // Plain text: PRI 13, received time, the source as HOSTNAME.
        let out = encode(b"just text", Some("fd00:200::2".parse::<IpAddr>().unwrap()));
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s.split_once(' ').unwrap().1,
            "<13>1 2026-11-24T10:00:00.000000Z fd00:200::2 - - - [origin ip=\"fd00:200::2\"] just text"
        );
        // JSON input whose app has spaces and non-ASCII, longer than APP-NAME allows.
        let app = format!("my app é{}", "x".repeat(60));
        let line = format!("{{\"app\":\"{app}\",\"msg\":\"m\"}}");
        let s = String::from_utf8(encode(line.as_bytes(), None)).unwrap();
        let fields: Vec<&str> = s.split(' ').collect();
        assert_eq!(fields[4].len(), MAX_APP, "{s}");
        assert!(fields[4].starts_with("my_app__xx"), "{s}");
    }

    #[test]
    fn frames_round_trip_through_our_own_receive_path() {
        // Many messages, some with newlines inside: split back by octet counting and
        // decoded to the same fields.
        let inputs: Vec<String> = (0..200)
            .map(|i| match i % 3 {
                0 => format!(
                    "<{}>1 2026-11-24T09:00:00Z host{i} app{i} {i} M{i} - line {i}\nsecond line",
                    i % 192
                ),
                1 => format!("<{}>Nov 24 09:00:00 host{i} app{i}[{i}]: bsd {i}", i % 192),
                _ => format!(
                    "{{\"host\":\"h{i}\",\"app\":\"a{i}\",\"level\":\"warn\",\"msg\":\"json {i}\"}}"
                ),
            })
            .collect();
        let mut enc = Rfc5424Encoder::default();
        let mut out = Vec::new();
        let recs: Vec<LogRecord<'_>> = inputs.iter().map(|l| decode(l.as_bytes(), RX)).collect();
        for rec in &recs {
            enc.message(
                &RawMessage {
                    rec,
                    source: None,
                    received_ns: RX,
                    captured: false,
                },
                &mut out,
            );
        }
        let back: Vec<LogRecord<'_>> = Frames::new(&out, usize::MAX)
            .map(|f| {
                assert_eq!(f.truncated, 0);
                decode(f.bytes, RX)
            })
            .collect();
        assert_eq!(back.len(), recs.len());
        for (a, b) in recs.iter().zip(&back) {
            assert_eq!(b.format, super::super::decode::Format::Rfc5424);
            assert_eq!(
                (a.facility.unwrap_or(1), a.severity.unwrap_or(5)),
                (b.facility.unwrap(), b.severity.unwrap())
            );
            assert_eq!(a.timestamp.or(Some(RX)), b.timestamp);
            assert_eq!(a.hostname, b.hostname);
            assert_eq!(a.app_name, b.app_name);
            assert_eq!(a.procid, b.procid);
            assert_eq!(a.msgid, b.msgid);
            assert_eq!(a.message, b.message);
        }
    }

    /// The hand-written JSON is byte-for-byte what serde_json writes for the same fields,
    /// over the decoder's real outputs and strings full of characters that need escapes.
    #[test]
    fn json_lines_match_serde_json() {
        #[derive(serde::Serialize)]
        struct RawLine<'a> {
            received_ns: i64,
            #[serde(skip_serializing_if = "Option::is_none")]
            ts_ns: Option<i64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            source: Option<IpAddr>,
            captured: bool,
            format: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            facility: Option<u8>,
            #[serde(skip_serializing_if = "Option::is_none")]
            severity: Option<u8>,
            #[serde(skip_serializing_if = "Option::is_none")]
            host: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            app: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            procid: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            msgid: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            structured_data: Option<&'a str>,
            msg: &'a str,
        }
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(5);
        let alphabet: Vec<char> = "ab \"\\\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é€😀/<>"
            .chars()
            .collect();
        let sources: [Option<IpAddr>; 4] = [
            None,
            Some("10.200.0.2".parse().unwrap()),
            Some("0.0.0.0".parse().unwrap()),
            Some("fd00:200::2".parse().unwrap()),
        ];
        for i in 0..5000u32 {
            let text: String = (0..rng.random_range(0..40))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let line = match i % 4 {
                0 if i % 8 == 0 => format!(
                    "<{}>1 2026-11-24T10:00:00Z h{i} app - ID{i} [ex@32473 iut=\"{i}\" q=\"a\\\"b\"][b@1] {text}",
                    i % 192
                ),
                0 => format!(
                    "<{}>1 2026-11-24T10:00:00Z h{i} app - ID{i} - {text}",
                    i % 192
                ),
                1 => format!("<{}>Nov 24 10:00:00 host app[{i}]: {text}", i % 192),
                2 => format!(
                    "{{\"host\":\"h\",\"msg\":{}}}",
                    serde_json::to_string(&text).unwrap()
                ),
                _ => text.clone(),
            };
            let rec = decode(line.as_bytes(), RX);
            let m = RawMessage {
                rec: &rec,
                source: sources[i as usize % 4],
                received_ns: RX + i64::from(i),
                captured: i % 2 == 0,
            };
            let mut ours = Vec::new();
            json(&m, &mut ours);
            let mut theirs = serde_json::to_vec(&RawLine {
                received_ns: m.received_ns,
                ts_ns: rec.timestamp,
                source: m.source,
                captured: m.captured,
                format: rec.format.name(),
                facility: rec.facility,
                severity: rec.severity,
                host: rec.hostname.as_deref(),
                app: rec.app_name.as_deref(),
                procid: rec.procid,
                msgid: rec.msgid,
                structured_data: rec.structured_data.filter(|sd| *sd != "-"),
                msg: &rec.message,
            })
            .unwrap();
            theirs.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs),
                "input {line:?}"
            );
        }
    }

    #[test]
    fn json_lines_keep_rfc5424_structured_data() {
        let rec = decode(
            br#"<14>1 2026-11-24T10:00:00Z h app 7 ID [ex@32473 iut="3" eventSource="App"] hi"#,
            RX,
        );
        let m = RawMessage {
            rec: &rec,
            source: None,
            received_ns: RX,
            captured: false,
        };
        let mut out = Vec::new();
        json(&m, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["structured_data"], r#"[ex@32473 iut="3" eventSource="App"]"#,
            "{v}"
        );
        assert_eq!(v["msg"], "hi");
    }

    fn text_line(line: &[u8], source: Option<IpAddr>) -> String {
        String::from_utf8(encoded_with(line, source, text)).unwrap()
    }

    #[test]
    fn text_lines_are_traditional_syslog_file_lines() {
        let ip: IpAddr = "10.200.0.2".parse().unwrap();
        // RFC 5424: its time, host, app[procid]: and MSG (SD is not part of MSG).
        assert_eq!(
            text_line(
                b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog 77 ID47 [exampleSDID@32473 iut=\"3\"] An application event",
                Some(ip),
            ),
            "2003-10-11T22:14:15.003000Z mymachine.example.com evntslog[77]: An application event\n"
        );
        // RFC 3164 with tag and pid; year-less time resolved against the receive time.
        assert_eq!(
            text_line(
                b"<34>Oct 11 22:14:15 mymachine su[42]: 'su root' failed",
                None
            ),
            "2026-10-11T22:14:15.000000Z mymachine su[42]: 'su root' failed\n"
        );
        // Plain text: receive time, the sender as host, no tag.
        assert_eq!(
            text_line(b"just text", Some(ip)),
            "2026-11-24T10:00:00.000000Z 10.200.0.2 just text\n"
        );
        assert_eq!(
            text_line(b"just text", None),
            "2026-11-24T10:00:00.000000Z - just text\n"
        );
        // An app without PROCID; control characters escaped the way rsyslog does, so a
        // message is always one line.
        assert_eq!(
            text_line(b"<13>1 - h app - - - a\tb\x7fc", None),
            "2026-11-24T10:00:00.000000Z h app: a#011b#177c\n"
        );
        let json = "{\"host\":\"web 1\",\"app\":\"api\",\"msg\":\"two\\nlines\"}";
        assert_eq!(
            text_line(json.as_bytes(), Some(ip)),
            "2026-11-24T10:00:00.000000Z web_1 api: two#012lines\n"
        );
    }

    #[test]
    fn control_escapes_match_a_byte_by_byte_reference() {
        use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
        fn reference(s: &str) -> Vec<u8> {
            let mut out = Vec::new();
            for &c in s.as_bytes() {
                if c < 0x20 || c == 0x7f {
                    out.extend_from_slice(format!("#{c:03o}").as_bytes());
                } else {
                    out.push(c);
                }
            }
            out
        }
        // The word test against the byte test, around every boundary it must get right.
        let edges = [0x00u8, 0x01, 0x1f, 0x20, 0x21, 0x7e, 0x7f, 0x80, 0xc3, 0xff];
        let mut rng = StdRng::seed_from_u64(5424);
        for _ in 0..20_000 {
            let bytes: [u8; 8] = std::array::from_fn(|_| {
                if rng.random_bool(0.5) {
                    edges[rng.random_range(0..edges.len())]
                } else {
                    rng.random()
                }
            });
            let want = bytes.iter().any(|&c| c < 0x20 || c == 0x7f);
            assert_eq!(has_control(u64::from_le_bytes(bytes)), want, "{bytes:x?}");
        }
        // Whole messages: controls (or none) anywhere, UTF-8 included, every length
        // around the eight-byte steps.
        for len in 0..40 {
            for _ in 0..200 {
                let s: String = (0..len)
                    .map(|_| match rng.random_range(0..20) {
                        0 => char::from(rng.random_range(0..0x20u8)),
                        1 => '\u{7f}',
                        2 => 'é',
                        _ => char::from(rng.random_range(0x20..0x7fu8)),
                    })
                    .collect();
                let mut out = Vec::new();
                escape_controls(&s, &mut out);
                assert_eq!(out, reference(&s), "{s:?}");
            }
        }
    }

    #[test]
    fn header_fields_are_cut_and_cleaned_on_either_path() {
        let field = |v: &str, max: usize| {
            let mut out = Vec::new();
            header_field(v, max, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(field("host-1.example", 48), "host-1.example");
        assert_eq!(field("", 48), "-");
        assert_eq!(field("abcdef", 4), "abcd");
        assert_eq!(field("a b\tc", 48), "a_b_c");
        assert_eq!(field("hé", 48), "h_");
        assert_eq!(field("a\u{7f}", 48), "a_");
    }

    #[test]
    fn window_reports_are_text_lines_too() {
        let mut out = Vec::new();
        text_window("{\"total\":3}", RX, "edge 1", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "2026-11-24T10:00:00.000000Z edge_1 edgeproxy[{}]: window {{\"total\":3}}\n",
                std::process::id()
            )
        );
    }

    #[test]
    fn window_reports_are_framed_messages() {
        let mut out = Vec::new();
        Rfc5424Encoder::default().window("{\"total\":3}", RX, "edge 1", &mut out);
        let s = String::from_utf8(out).unwrap();
        let (len, body) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), body.len());
        assert_eq!(
            body,
            format!(
                "<46>1 2026-11-24T10:00:00.000000Z edge_1 edgeproxy {} window - {{\"total\":3}}",
                std::process::id()
            )
        );
        let back = decode(body.as_bytes(), RX);
        assert_eq!(back.message, "{\"total\":3}");
        assert_eq!(back.msgid, Some("window"));
    }
}

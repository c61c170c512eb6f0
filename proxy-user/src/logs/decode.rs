//! Log line decoding, zero-copy: header fields borrow from the datagram; the message is
//! borrowed unless it is not valid UTF-8, in which case it is kept lossily and flagged.
//!
//! Formats, detected per line: RFC 5424 (`<PRI>1 …`), RFC 3164 (`<PRI>Mmm dd hh:mm:ss …`,
//! with or without a hostname, Cisco-style sequence numbers and `*` markers), JSON lines
//! (`{…}` with the usual field names), and plain text (everything else).
use std::borrow::Cow;

use serde::Deserialize;

use super::time::{parse_bsd, parse_rfc3339};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Rfc5424,
    Rfc3164,
    Json,
    Plain,
}

impl Format {
    pub const fn name(self) -> &'static str {
        match self {
            Format::Rfc5424 => "rfc5424",
            Format::Rfc3164 => "rfc3164",
            Format::Json => "json",
            Format::Plain => "plain",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord<'a> {
    pub format: Format,
    pub facility: Option<u8>,
    pub severity: Option<u8>,
    /// Unix nanoseconds, UTC (RFC 3164 and plain lines carry no zone: read as UTC).
    pub timestamp: Option<i64>,
    pub hostname: Option<Cow<'a, str>>,
    pub app_name: Option<Cow<'a, str>>,
    pub procid: Option<&'a str>,
    pub msgid: Option<&'a str>,
    /// RFC 5424 structured data as sent (`[id k="v"]…`), unparsed.
    pub structured_data: Option<&'a str>,
    pub message: Cow<'a, str>,
    /// The message was not valid UTF-8 and was kept lossily.
    pub invalid_utf8: bool,
}

impl<'a> LogRecord<'a> {
    fn plain(format: Format, msg: &'a [u8]) -> Self {
        let (message, invalid_utf8) = text(msg);
        Self {
            format,
            facility: None,
            severity: None,
            timestamp: None,
            hostname: None,
            app_name: None,
            procid: None,
            msgid: None,
            structured_data: None,
            message,
            invalid_utf8,
        }
    }
}

fn text(b: &[u8]) -> (Cow<'_, str>, bool) {
    match std::str::from_utf8(b) {
        Ok(s) => (Cow::Borrowed(s), false),
        Err(_) => (String::from_utf8_lossy(b), true),
    }
}

fn nil_or(s: &str) -> Option<&str> {
    (s != "-" && !s.is_empty()).then_some(s)
}

/// `<PRI>` at the start: (facility, severity, bytes consumed).
fn pri(b: &[u8]) -> Option<(u8, u8, usize)> {
    if b.first() != Some(&b'<') {
        return None;
    }
    let digits = b[1..].iter().take_while(|c| c.is_ascii_digit()).count();
    if !(1..=3).contains(&digits) || b.get(1 + digits) != Some(&b'>') {
        return None;
    }
    let v: u16 = std::str::from_utf8(&b[1..1 + digits]).ok()?.parse().ok()?;
    (v <= 191).then(|| ((v / 8) as u8, (v % 8) as u8, digits + 2))
}

/// Splits off one space-terminated field.
fn field(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == b' ').unwrap_or(b.len());
    let f = std::str::from_utf8(&b[..end]).ok()?;
    Some((f, b.get(end + 1..).unwrap_or(&[])))
}

pub fn decode(line: &[u8], received_ns: i64) -> LogRecord<'_> {
    if let Some((facility, severity, n)) = pri(line) {
        let rest = &line[n..];
        let mut rec = if rest.starts_with(b"1 ") {
            rfc5424(&rest[2..]).unwrap_or_else(|| LogRecord::plain(Format::Rfc5424, &rest[2..]))
        } else {
            rfc3164(rest, received_ns)
        };
        rec.facility = Some(facility);
        rec.severity = Some(severity);
        return rec;
    }
    if line.first() == Some(&b'{')
        && let Some(rec) = json(line)
    {
        return rec;
    }
    LogRecord::plain(Format::Plain, line)
}

fn rfc5424(b: &[u8]) -> Option<LogRecord<'_>> {
    let (ts, b) = field(b)?;
    let (host, b) = field(b)?;
    let (app, b) = field(b)?;
    let (procid, b) = field(b)?;
    let (msgid, b) = field(b)?;
    let (sd, b) = structured_data(b)?;
    let mut msg = b;
    if let Some(rest) = msg.strip_prefix(b"\xEF\xBB\xBF") {
        msg = rest;
    }
    let (message, invalid_utf8) = text(msg);
    Some(LogRecord {
        format: Format::Rfc5424,
        facility: None,
        severity: None,
        timestamp: nil_or(ts).and_then(parse_rfc3339),
        hostname: nil_or(host).map(Cow::Borrowed),
        app_name: nil_or(app).map(Cow::Borrowed),
        procid: nil_or(procid),
        msgid: nil_or(msgid),
        structured_data: sd,
        message,
        invalid_utf8,
    })
}

/// `-` or one or more `[…]` elements (param values may contain escaped `\]` `\"` `\\`).
fn structured_data(b: &[u8]) -> Option<(Option<&str>, &[u8])> {
    if b.first() == Some(&b'-') && matches!(b.get(1), None | Some(b' ')) {
        return Some((None, b.get(2..).unwrap_or(&[])));
    }
    let mut i = 0;
    while b.get(i) == Some(&b'[') {
        let mut in_quotes = false;
        i += 1;
        loop {
            match *b.get(i)? {
                b'\\' if in_quotes => i += 2,
                b'"' => {
                    in_quotes = !in_quotes;
                    i += 1;
                }
                b']' if !in_quotes => {
                    i += 1;
                    break;
                }
                _ => i += 1,
            }
        }
    }
    if i == 0 {
        return None;
    }
    let sd = std::str::from_utf8(&b[..i]).ok()?;
    let rest = match b.get(i) {
        None => &[][..],
        Some(b' ') => &b[i + 1..],
        Some(_) => return None,
    };
    Some((Some(sd), rest))
}

fn rfc3164(b: &[u8], received_ns: i64) -> LogRecord<'_> {
    let mut b = b;
    // Cisco: "123: *Mar  1 18:46:11.123: …" (sequence number, then '*' or '.' markers).
    let seq = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if seq > 0 && b.get(seq) == Some(&b':') && b.get(seq + 1) == Some(&b' ') {
        b = &b[seq + 2..];
    }
    if matches!(b.first(), Some(b'*' | b'.')) {
        b = &b[1..];
    }
    let mut rec = LogRecord::plain(Format::Rfc3164, b);
    let Some((ts, used)) = parse_bsd(b, received_ns) else {
        return rec;
    };
    rec.timestamp = Some(ts);
    let mut rest = &b[used..];
    if let Some(r) = rest.strip_prefix(b":") {
        rest = r; // Cisco puts a colon after the time
    }
    rest = rest.strip_prefix(b" ").unwrap_or(rest);
    // HOSTNAME TAG: MSG, or TAG: MSG without a hostname, or HOSTNAME MSG without a tag.
    let (first, after_first) = field(rest).unwrap_or(("", rest));
    let (host, tag_part) = if is_tag(first) {
        (None, rest)
    } else {
        (Some(first), after_first)
    };
    let (app, procid, msg) = match field(tag_part) {
        Some((tag, msg)) if is_tag(tag) => {
            let tag = tag.trim_end_matches(':');
            match tag.split_once('[') {
                Some((app, pid)) => (Some(app), Some(pid.trim_end_matches(']')), msg),
                None => (Some(tag), None, msg),
            }
        }
        _ => (None, None, tag_part),
    };
    rec.hostname = host.filter(|h| !h.is_empty()).map(Cow::Borrowed);
    rec.app_name = app.filter(|a| !a.is_empty()).map(Cow::Borrowed);
    rec.procid = procid;
    let (message, invalid) = text(msg);
    rec.message = message;
    rec.invalid_utf8 = invalid;
    rec
}

/// `app:` or `app[pid]:` (what RFC 3164 calls the TAG).
fn is_tag(s: &str) -> bool {
    s.len() > 1 && (s.ends_with(':') || (s.contains('[') && s.ends_with("]:")))
}

#[derive(Deserialize)]
struct JsonLine<'a> {
    #[serde(borrow, alias = "hostname", alias = "host_name")]
    host: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        alias = "appname",
        alias = "app_name",
        alias = "service",
        alias = "program"
    )]
    app: Option<Cow<'a, str>>,
    #[serde(alias = "severity", alias = "lvl")]
    level: Option<serde_json::Value>,
    #[serde(borrow, alias = "message", alias = "log")]
    msg: Option<Cow<'a, str>>,
    #[serde(alias = "time", alias = "timestamp", alias = "@timestamp")]
    ts: Option<serde_json::Value>,
}

fn json(line: &[u8]) -> Option<LogRecord<'_>> {
    let j: JsonLine<'_> = serde_json::from_slice(line).ok()?;
    let severity = match &j.level {
        Some(serde_json::Value::Number(n)) => n.as_u64().filter(|&v| v <= 7).map(|v| v as u8),
        Some(serde_json::Value::String(s)) => severity_by_name(s),
        _ => None,
    };
    let timestamp = match &j.ts {
        Some(serde_json::Value::String(s)) => parse_rfc3339(s),
        // Seconds or milliseconds since the epoch, by magnitude.
        Some(serde_json::Value::Number(n)) => n.as_f64().map(|v| {
            if v > 1e11 {
                (v * 1e6) as i64
            } else {
                (v * 1e9) as i64
            }
        }),
        _ => None,
    };
    let (message, invalid_utf8) = match j.msg {
        Some(m) => (m, false),
        None => text(line),
    };
    Some(LogRecord {
        format: Format::Json,
        facility: None,
        severity,
        timestamp,
        hostname: j.host,
        app_name: j.app,
        procid: None,
        msgid: None,
        structured_data: None,
        message,
        invalid_utf8,
    })
}

pub fn severity_by_name(s: &str) -> Option<u8> {
    Some(match s.to_ascii_lowercase().as_str() {
        "emerg" | "emergency" | "panic" => 0,
        "alert" => 1,
        "crit" | "critical" | "fatal" => 2,
        "err" | "error" => 3,
        "warn" | "warning" => 4,
        "notice" => 5,
        "info" | "informational" | "information" => 6,
        "debug" | "trace" => 7,
        _ => return None,
    })
}

//! HTTP/1.x request lines in sampled packets: the data plane samples the first bytes of
//! frames on the TCP ports the policy names; this finds the TCP payload, reads the
//! request line (method, path) and the `Host` header when the snippet holds them, and
//! keeps counts per (host, path) with bounded memory for the report's top paths.
use std::collections::HashMap;

use proxy_common::policy::{RecordHeader, RecordKind};

const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// Distinct (host, path) pairs kept; requests for others are counted under `other`.
pub const MAX_PATHS: usize = 10_000;
/// Longest path kept (snippets are short anyway); longer ones are cut.
const MAX_PATH: usize = 256;

/// One request line found in a snippet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    /// The path without its query string.
    pub path: &'a str,
    pub host: Option<&'a str>,
    /// The snippet ended inside the request line (path may be cut).
    pub truncated: bool,
}

/// The TCP payload of an Ethernet frame (VLAN tags, IPv4 with options, IPv6 without
/// extension headers), or `None` when it is not an unfragmented TCP segment.
pub fn tcp_payload(frame: &[u8]) -> Option<&[u8]> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    off += 2;
    for _ in 0..2 {
        if ethertype == 0x8100 || ethertype == 0x88a8 {
            ethertype = u16::from_be_bytes([*frame.get(off + 2)?, *frame.get(off + 3)?]);
            off += 4;
        }
    }
    let ip = frame.get(off..)?;
    let tcp = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x1fff;
            if *ip.get(9)? != 6 || ihl < 20 || frag != 0 {
                return None;
            }
            ip.get(ihl..)?
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            ip.get(40..)?
        }
        _ => return None,
    };
    let doff = usize::from(tcp.get(12)? >> 4) * 4;
    if doff < 20 {
        return None;
    }
    tcp.get(doff..)
}

/// Parses an HTTP/1.x request line (and Host header) at the start of `payload`.
pub fn request_line(payload: &[u8]) -> Option<RequestLine<'_>> {
    let sp = payload.iter().take(8).position(|&b| b == b' ')?;
    let method = std::str::from_utf8(&payload[..sp]).ok()?;
    if !METHODS.contains(&method) {
        return None;
    }
    let rest = &payload[sp + 1..];
    let line_end = rest.windows(2).position(|w| w == b"\r\n");
    let line = &rest[..line_end.unwrap_or(rest.len())];
    let (target, version) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    if let Some(v) = version
        && v != b"HTTP/1.1"
        && v != b"HTTP/1.0"
    {
        return None;
    }
    let target = std::str::from_utf8(target).ok()?;
    if target.is_empty() || target.bytes().any(|b| b.is_ascii_control()) {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target);
    let truncated = line_end.is_none() || version.is_none();
    let host = line_end.and_then(|e| {
        rest[e + 2..]
            .split(|&b| b == b'\n')
            .take_while(|l| !l.is_empty() && *l != b"\r")
            .find_map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                let colon = l.iter().position(|&b| b == b':')?;
                if !l[..colon].eq_ignore_ascii_case(b"host") {
                    return None;
                }
                std::str::from_utf8(&l[colon + 1..]).ok().map(str::trim)
            })
    });
    Some(RequestLine {
        method,
        path,
        host,
        truncated,
    })
}

/// Counts of request lines seen in samples, bounded by [`MAX_PATHS`].
#[derive(Clone, Debug, Default)]
pub struct HttpSamples {
    /// TCP samples looked at.
    pub tcp_samples: u64,
    pub requests: u64,
    /// Request lines cut by the snippet length (raise the rule's `snap`).
    pub truncated: u64,
    /// Requests whose (host, path) did not fit in the table.
    pub other: u64,
    pub methods: HashMap<String, u64>,
    paths: HashMap<(String, String), u64>,
}

impl HttpSamples {
    /// Looks at one record: only TCP samples count.
    pub fn add(&mut self, header: &RecordHeader, frame: &[u8]) {
        if header.kind != RecordKind::Sample as u8 || header.l4_proto != 6 {
            return;
        }
        self.tcp_samples += 1;
        let Some(r) = tcp_payload(frame).and_then(request_line) else {
            return;
        };
        self.requests += 1;
        self.truncated += u64::from(r.truncated);
        *self.methods.entry(r.method.to_owned()).or_default() += 1;
        let path: String = r.path.chars().take(MAX_PATH).collect();
        self.count_path((r.host.unwrap_or("").to_owned(), path), 1);
    }

    /// `n` more requests for `key`; a new key that does not fit in the table goes to
    /// `other`.
    fn count_path(&mut self, key: (String, String), n: u64) {
        if let Some(have) = self.paths.get_mut(&key) {
            *have += n;
        } else if self.paths.len() < MAX_PATHS {
            self.paths.insert(key, n);
        } else {
            self.other += n;
        }
    }

    /// Adds another worker's counts; (host, path) pairs beyond [`MAX_PATHS`] go to `other`.
    pub fn merge(&mut self, o: &HttpSamples) {
        self.tcp_samples += o.tcp_samples;
        self.requests += o.requests;
        self.truncated += o.truncated;
        self.other += o.other;
        for (m, n) in &o.methods {
            *self.methods.entry(m.clone()).or_default() += n;
        }
        for (k, n) in &o.paths {
            self.count_path(k.clone(), *n);
        }
    }

    /// The `k` most requested (host, path, count), most first (ties by name).
    pub fn top(&self, k: usize) -> Vec<(&str, &str, u64)> {
        let mut v: Vec<(&str, &str, u64)> = self
            .paths
            .iter()
            .map(|((h, p), &n)| (h.as_str(), p.as_str(), n))
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)).then(a.1.cmp(b.1)));
        v.truncate(k);
        v
    }

    pub fn json(&self, k: usize) -> serde_json::Value {
        serde_json::json!({
            "tcp_samples": self.tcp_samples,
            "requests": self.requests,
            "truncated": self.truncated,
            "other": self.other,
            "methods": self.methods,
            "top_paths": self.top(k).iter().map(|(h, p, n)| serde_json::json!({"host": h, "path": p, "count": n})).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_v4(payload: &[u8], vlan: bool) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        // IPv4 with 4 bytes of options (IHL 6), protocol TCP.
        let mut ip = vec![
            0x46, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 200, 0, 1, 10, 200, 0, 2,
        ];
        ip.extend_from_slice(&[1, 1, 1, 0]);
        f.extend_from_slice(&ip);
        let mut tcp = vec![0u8; 24];
        tcp[12] = 6 << 4; // data offset 6 (one option word)
        f.extend_from_slice(&tcp);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn request_lines_and_hosts_are_found() {
        let p = b"GET /api/v1/items?id=7 HTTP/1.1\r\nUser-Agent: x\r\nhost: example.test\r\n\r\n";
        let frame = frame_v4(p, true);
        let r = request_line(tcp_payload(&frame).unwrap()).unwrap();
        assert_eq!(
            r,
            RequestLine {
                method: "GET",
                path: "/api/v1/items",
                host: Some("example.test"),
                truncated: false
            }
        );
        // Cut inside the path: the path so far, flagged.
        let r = request_line(b"POST /upload/very/lo").unwrap();
        assert_eq!(
            (r.method, r.path, r.truncated, r.host),
            ("POST", "/upload/very/lo", true, None)
        );
        for not_http in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"GET / HTTP/2.0\r\n",
            b"get / HTTP/1.1\r\n",
            b"GET \x01 HTTP/1.1\r\n",
            b"",
        ] {
            assert_eq!(request_line(not_http), None, "{not_http:?}");
        }
    }

    #[test]
    fn only_unfragmented_tcp_payloads_are_read() {
        let mut udp = frame_v4(b"GET / HTTP/1.1\r\n", false);
        udp[14 + 9] = 17;
        assert_eq!(tcp_payload(&udp), None);
        let mut frag = frame_v4(b"GET / HTTP/1.1\r\n", false);
        frag[14 + 7] = 8;
        assert_eq!(tcp_payload(&frag), None);
        assert_eq!(tcp_payload(&[0u8; 20]), None);
    }

    #[test]
    fn top_paths_are_counted_and_bounded() {
        let h = RecordHeader {
            kind: RecordKind::Sample as u8,
            l4_proto: 6,
            ..Default::default()
        };
        let mut s = HttpSamples::default();
        for (n, path) in [(5, "/a"), (3, "/b"), (1, "/c")] {
            for _ in 0..n {
                s.add(
                    &h,
                    &frame_v4(
                        format!("GET {path} HTTP/1.1\r\nHost: h\r\n").as_bytes(),
                        false,
                    ),
                );
            }
        }
        s.add(&h, &frame_v4(b"\x16\x03\x01", false));
        let capture = RecordHeader {
            kind: RecordKind::Capture as u8,
            ..h
        };
        s.add(&capture, &frame_v4(b"GET /x HTTP/1.1\r\n", false));
        assert_eq!((s.tcp_samples, s.requests), (10, 9));
        assert_eq!(s.top(2), [("h", "/a", 5), ("h", "/b", 3)]);
        assert_eq!(s.methods["GET"], 9);
        for i in 0..MAX_PATHS + 5 {
            s.add(
                &h,
                &frame_v4(format!("GET /{i} HTTP/1.1\r\n").as_bytes(), false),
            );
        }
        assert_eq!(s.paths.len(), MAX_PATHS);
        assert_eq!(s.other, 8);
    }

    #[test]
    fn workers_samples_merge_into_one_report() {
        let h = RecordHeader {
            kind: RecordKind::Sample as u8,
            l4_proto: 6,
            ..Default::default()
        };
        let get = |path: &str| {
            frame_v4(
                format!("GET {path} HTTP/1.1\r\nHost: h\r\n").as_bytes(),
                false,
            )
        };
        let (mut a, mut b) = (HttpSamples::default(), HttpSamples::default());
        a.add(&h, &get("/a"));
        a.add(&h, &get("/b"));
        b.add(&h, &get("/b"));
        b.add(&h, &frame_v4(b"POST /c HTTP/1.0\r\n\r\n", false));
        b.add(&h, &frame_v4(b"\x16\x03\x01", false));
        a.merge(&b);
        assert_eq!((a.tcp_samples, a.requests, a.other), (5, 4, 0));
        assert_eq!(a.top(3), [("h", "/b", 2), ("", "/c", 1), ("h", "/a", 1)]);
        assert_eq!((a.methods["GET"], a.methods["POST"]), (3, 1));
        // A full table takes no new pair from a merge: it goes to `other`, counted.
        let mut full = HttpSamples::default();
        for i in 0..MAX_PATHS {
            full.add(&h, &get(&format!("/{i}")));
        }
        full.merge(&a);
        assert_eq!(full.paths.len(), MAX_PATHS);
        assert_eq!(full.other, 4);
        assert_eq!(full.requests, MAX_PATHS as u64 + 4);
    }
}

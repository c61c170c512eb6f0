//! Splitting a datagram (or stream chunk) into messages: RFC 6587 octet counting
//! (`<len> <msg>`) when the buffer starts with a length, otherwise newline-separated
//! (a trailing `\r` or NUL is trimmed; empty lines are skipped).

/// One message and whether it had to be cut at the configured maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub bytes: &'a [u8],
    /// Bytes beyond the maximum that were dropped from this message.
    pub truncated: usize,
}

pub struct Frames<'a> {
    rest: &'a [u8],
    max_len: usize,
}

impl<'a> Frames<'a> {
    pub fn new(buf: &'a [u8], max_len: usize) -> Self {
        Self { rest: buf, max_len }
    }

    fn cut(&self, msg: &'a [u8]) -> Frame<'a> {
        let keep = msg.len().min(self.max_len);
        Frame {
            bytes: &msg[..keep],
            truncated: msg.len() - keep,
        }
    }
}

/// `123 ` at the start of `b`: the octet count and the header length. Only lengths that
/// fit in the buffer count, so a plain line that happens to start with a number and a
/// space ("404 not found") is not mistaken for a frame unless it really could be one.
fn octet_count(b: &[u8]) -> Option<(usize, usize)> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 9 || b.get(digits) != Some(&b' ') || b[0] == b'0' {
        return None;
    }
    let n: usize = std::str::from_utf8(&b[..digits]).ok()?.parse().ok()?;
    let header = digits + 1;
    // A framed message starts with '<' (a PRI) in every sender we know.
    (b.len() >= header + n && n > 0 && b.get(header) == Some(&b'<')).then_some((n, header))
}

impl<'a> Iterator for Frames<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            if let Some((n, header)) = octet_count(self.rest) {
                let msg = &self.rest[header..header + n];
                self.rest = &self.rest[header + n..];
                // Separators between framed messages are tolerated.
                while let Some((&c, tail)) = self.rest.split_first() {
                    if c == b'\n' || c == b'\r' || c == b' ' {
                        self.rest = tail;
                    } else {
                        break;
                    }
                }
                return Some(self.cut(msg));
            }
            let (line, rest) = match memchr_nl(self.rest) {
                Some(i) => (&self.rest[..i], &self.rest[i + 1..]),
                None => (self.rest, &[][..]),
            };
            self.rest = rest;
            let mut line = line;
            while let Some((&last, head)) = line.split_last() {
                if last == b'\r' || last == 0 {
                    line = head;
                } else {
                    break;
                }
            }
            if !line.is_empty() {
                return Some(self.cut(line));
            }
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(b: &[u8]) -> Vec<&[u8]> {
        Frames::new(b, 1 << 20).map(|f| f.bytes).collect()
    }

    #[test]
    fn newline_separated_with_crlf_nul_and_blank_lines() {
        assert_eq!(
            frames(b"<13>a\r\n\n<14>b\0\n<15>c"),
            vec![&b"<13>a"[..], b"<14>b", b"<15>c"]
        );
        assert!(frames(b"\n\n").is_empty());
    }

    #[test]
    fn octet_counted_frames() {
        assert_eq!(frames(b"5 <13>a6 <14>bc"), vec![&b"<13>a"[..], b"<14>bc"]);
        // A count that overruns the buffer is not a frame: the line is taken as text.
        assert_eq!(frames(b"99 <13>short"), vec![&b"99 <13>short"[..]]);
        // A plain line starting with a number is text.
        assert_eq!(frames(b"404 not found\n"), vec![&b"404 not found"[..]]);
    }

    #[test]
    fn oversize_messages_are_cut_and_counted() {
        let f: Vec<Frame> = Frames::new(b"<13>abcdef\n<13>x", 6).collect();
        assert_eq!(
            f[0],
            Frame {
                bytes: b"<13>ab",
                truncated: 4
            }
        );
        assert_eq!(
            f[1],
            Frame {
                bytes: b"<13>x",
                truncated: 0
            }
        );
    }
}

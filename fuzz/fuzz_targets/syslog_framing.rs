//! RFC 6587 octet counting and newline framing of a datagram or stream chunk.
//! Input: one byte choosing the maximum message length, then the buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proxy_user::logs::framing::Frames;

fuzz_target!(|data: &[u8]| {
    let (max_len, buf) = match data.split_first() {
        // 255: the default maximum (8 KiB); otherwise small maxima, 0 included.
        Some((&255, rest)) => (8192, rest),
        Some((&b, rest)) => (usize::from(b), rest),
        None => (8192, data),
    };
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    // Frames come in order, never overlap, and lie inside the input.
    let mut cursor = start;
    let mut total = 0usize;
    for f in Frames::new(buf, max_len) {
        let p = f.bytes.as_ptr() as usize;
        assert!(p >= cursor, "frame before the end of the previous one");
        assert!(f.bytes.len() <= max_len, "frame longer than the maximum");
        assert!(f.bytes.len() + f.truncated > 0, "empty message");
        let msg_end = p + f.bytes.len() + f.truncated;
        assert!(msg_end <= end, "frame reaches past the input");
        cursor = msg_end;
        total += f.bytes.len() + f.truncated;
    }
    assert!(total <= buf.len());
});

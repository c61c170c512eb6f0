//! Bounded traffic generators. Every loop has a fixed count; senders pace themselves so
//! a veth's receive ring (a few hundred frames) never overflows, which would make exact
//! counts flaky for reasons that have nothing to do with the code under test.
use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::Netns;

/// Frames sent back to back before a pause.
const BURST: u64 = 32;
const PAUSE: Duration = Duration::from_millis(1);

/// Sends exactly `count` UDP datagrams of `payload_len` bytes from inside `ns` to `dst`.
/// Returns the number the kernel accepted (always `count` unless an error is returned).
pub fn send_udp(
    ns: &Netns,
    dst: SocketAddr,
    count: u64,
    payload_len: usize,
) -> anyhow::Result<u64> {
    ns.run(|| {
        let bind: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let sock = UdpSocket::bind(bind).context("binding the sender socket")?;
        let payload = vec![b'x'; payload_len];
        for i in 0..count {
            sock.send_to(&payload, dst)
                .with_context(|| format!("sending datagram {i} to {dst}"))?;
            if (i + 1).is_multiple_of(BURST) {
                thread::sleep(PAUSE);
            }
        }
        Ok(count)
    })
}

/// Polls `f` every 10 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

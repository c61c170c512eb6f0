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

/// Sends the RFC 5424 messages `msg N` (then `suffix`) for every N in `numbers` from
/// inside `ns` to `dst`, pausing `pause` after every hundred: numbered messages a test
/// can find again one by one in what a sink wrote.
pub fn send_numbered_syslog(
    ns: &Netns,
    dst: SocketAddr,
    numbers: std::ops::Range<u64>,
    suffix: &str,
    pause: Duration,
) -> anyhow::Result<()> {
    ns.run(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").context("binding the sender socket")?;
        for i in numbers {
            sock.send_to(
                format!("<14>1 - h app - - - msg {i}{suffix}").as_bytes(),
                dst,
            )
            .with_context(|| format!("sending message {i} to {dst}"))?;
            if i % 100 == 99 {
                thread::sleep(pause);
            }
        }
        Ok(())
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

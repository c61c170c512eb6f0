//! The same scenarios against both backends, on loopback sockets: the worker must not be
//! able to tell them apart.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use io_uring::types;
use nix::sys::socket::{SockaddrLike as _, SockaddrStorage};

use super::{BufId, Op, Ops, buffer_select, epoll::EpollOps, more, uring::UringOps};
use crate::tcp::socket;

fn backends() -> Vec<Box<dyn Ops>> {
    let mut v: Vec<Box<dyn Ops>> = vec![Box::new(EpollOps::new(Some((2, 4096))).unwrap())];
    if super::uring::unavailable().is_none() {
        v.push(Box::new(UringOps::new(Some((2, 4096))).unwrap()));
    }
    v
}

/// Completions until every one of `want` arrived (or `limit`), keyed by user_data.
fn collect(ops: &mut dyn Ops, want: &[u64], limit: Duration) -> Vec<(u64, i32, u32)> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while Instant::now() < deadline
        && !want
            .iter()
            .all(|w| got.iter().any(|g: &(u64, i32, u32)| g.0 == *w))
    {
        ops.wait(Duration::from_millis(10), &mut got);
    }
    got
}

fn result(got: &[(u64, i32, u32)], ud: u64) -> (i32, u32) {
    got.iter()
        .find(|g| g.0 == ud)
        .map(|g| (g.1, g.2))
        .unwrap_or_else(|| panic!("no completion for {ud}: {got:?}"))
}

struct Target {
    addr: SockaddrStorage,
    timeout: types::Timespec,
}

fn connect_op(fd: i32, t: &Target, after: Duration) -> Op {
    Op::Connect {
        fd,
        addr: t.addr.as_ptr(),
        addr_len: t.addr.len(),
        timeout: &t.timeout,
        timeout_after: after,
        timeout_user_data: 2,
    }
}

fn target(addr: SocketAddr, after: Duration) -> Target {
    Target {
        addr: SockaddrStorage::from(addr),
        timeout: types::Timespec::from(after),
    }
}

#[test]
fn accept_connect_send_receive_and_eof() {
    for mut ops in backends() {
        let name = ops.name();
        let listener = socket::listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket::local_addr(&listener).unwrap();
        assert!(ops.push(
            Op::AcceptMulti {
                fd: listener.as_raw_fd()
            },
            10
        ));
        let client = socket::upstream_socket(addr).unwrap();
        let t = target(addr, Duration::from_secs(2));
        assert!(ops.push(
            connect_op(client.as_raw_fd(), &t, Duration::from_secs(2)),
            1
        ));
        let got = collect(&mut *ops, &[1, 2, 10], Duration::from_secs(2));
        assert_eq!(result(&got, 1).0, 0, "{name}: connect {got:?}");
        assert_eq!(
            result(&got, 2).0,
            -libc::ECANCELED,
            "{name}: the timeout is cancelled"
        );
        let (accepted, flags) = result(&got, 10);
        assert!(
            accepted >= 0 && more(flags),
            "{name}: accept {accepted} {flags}"
        );
        let server = socket::adopt(accepted);

        let msg = b"hello through the backend";
        assert!(ops.push(
            Op::Send {
                fd: client.as_raw_fd(),
                buf: msg.as_ptr(),
                len: msg.len() as u32
            },
            3
        ));
        assert!(ops.push(
            Op::RecvPooled {
                fd: server.as_raw_fd(),
                len: 4096
            },
            4
        ));
        let got = collect(&mut *ops, &[3, 4], Duration::from_secs(2));
        assert_eq!(result(&got, 3).0, msg.len() as i32, "{name}: sent");
        let (n, flags) = result(&got, 4);
        let bid = buffer_select(flags).unwrap_or_else(|| panic!("{name}: no buffer {flags}"));
        assert_eq!(ops.buf(BufId::Pool(bid), n as usize), msg, "{name}");
        ops.recycle(BufId::Pool(bid));

        // Half-close: the receive sees end of file (0, no buffer held).
        nix::sys::socket::shutdown(client.as_raw_fd(), nix::sys::socket::Shutdown::Write).unwrap();
        assert!(ops.push(
            Op::RecvPooled {
                fd: server.as_raw_fd(),
                len: 4096
            },
            5
        ));
        let got = collect(&mut *ops, &[5], Duration::from_secs(2));
        assert_eq!(result(&got, 5).0, 0, "{name}: EOF");

        // Cancelling the listener ends its multishot accept.
        assert!(ops.push(
            Op::CancelFd {
                fd: listener.as_raw_fd()
            },
            11
        ));
        ops.flush();
        let got = collect(&mut *ops, &[10, 11], Duration::from_secs(2));
        let (res, flags) = result(&got, 10);
        assert_eq!((res, more(flags)), (-libc::ECANCELED, false), "{name}");
        for fd in [listener.as_raw_fd(), client.as_raw_fd(), server.as_raw_fd()] {
            ops.forget(fd);
        }
    }
}

#[test]
fn refused_and_timed_out_connects() {
    for mut ops in backends() {
        let name = ops.name();
        // Refused: a port nobody listens on (bound, then closed).
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let s = socket::upstream_socket(addr).unwrap();
        let t = target(addr, Duration::from_secs(2));
        assert!(ops.push(connect_op(s.as_raw_fd(), &t, Duration::from_secs(2)), 1));
        let got = collect(&mut *ops, &[1, 2], Duration::from_secs(3));
        assert_eq!(result(&got, 1).0, -libc::ECONNREFUSED, "{name}");
        assert_eq!(result(&got, 2).0, -libc::ECANCELED, "{name}");
        ops.forget(s.as_raw_fd());

        // Timed out: a listener whose accept queue is full drops further SYNs.
        let full = socket::listener("127.0.0.1:0".parse().unwrap()).unwrap();
        nix::sys::socket::listen(&full, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
        let addr = socket::local_addr(&full).unwrap();
        let _queued: Vec<TcpStream> = (0..2)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
            .collect();
        let s = socket::upstream_socket(addr).unwrap();
        let t = target(addr, Duration::from_millis(300));
        let started = Instant::now();
        assert!(ops.push(connect_op(s.as_raw_fd(), &t, Duration::from_millis(300)), 1));
        let got = collect(&mut *ops, &[1, 2], Duration::from_secs(3));
        assert_eq!(result(&got, 1).0, -libc::ECANCELED, "{name}: {got:?}");
        assert_eq!(result(&got, 2).0, -libc::ETIME, "{name}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{name}: timed out after {took:?}"
        );
        ops.forget(s.as_raw_fd());
    }
}

/// Completes once `fd` has something to read.
fn poll_readable(fd: &impl AsRawFd) -> Op {
    Op::Poll {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN as u32,
    }
}

/// A connected pair on loopback: (ours, the peer as a std stream).
fn pair() -> (std::os::fd::OwnedFd, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    ours.set_nonblocking(true).unwrap();
    let (peer, _) = l.accept().unwrap();
    (std::os::fd::OwnedFd::from(ours), peer)
}

#[test]
fn poll_waits_for_data_and_cancel_ends_pending_operations() {
    for mut ops in backends() {
        let name = ops.name();
        let (ours, mut peer) = pair();
        assert!(ops.push(poll_readable(&ours), 1));
        let got = collect(&mut *ops, &[1], Duration::from_millis(100));
        assert!(
            got.is_empty(),
            "{name}: polled readable with nothing to read: {got:?}"
        );
        peer.write_all(b"x").unwrap();
        let got = collect(&mut *ops, &[1], Duration::from_secs(2));
        assert!(result(&got, 1).0 & i32::from(libc::POLLIN) != 0, "{name}");

        // PEEK leaves the byte; WAITALL waits for the whole length.
        let mut hdr = [0u8; 4];
        assert!(ops.push(
            Op::Recv {
                fd: ours.as_raw_fd(),
                buf: hdr.as_mut_ptr(),
                len: 4,
                flags: libc::MSG_PEEK
            },
            2
        ));
        let got = collect(&mut *ops, &[2], Duration::from_secs(2));
        assert_eq!(result(&got, 2).0, 1, "{name}: peeked");
        // A poll on an fd that already holds data completes at once (no new data will
        // come to raise an edge: a sender blocked on a full window sends nothing).
        assert!(ops.push(
            Op::Poll {
                fd: ours.as_raw_fd(),
                events: libc::POLLIN as u32
            },
            9
        ));
        let got = collect(&mut *ops, &[9], Duration::from_secs(2));
        assert!(
            result(&got, 9).0 & i32::from(libc::POLLIN) != 0,
            "{name}: {got:?}"
        );
        assert!(ops.push(
            Op::Recv {
                fd: ours.as_raw_fd(),
                buf: hdr.as_mut_ptr(),
                len: 4,
                flags: libc::MSG_WAITALL
            },
            3
        ));
        let got = collect(&mut *ops, &[3], Duration::from_millis(100));
        assert!(got.is_empty(), "{name}: WAITALL returned early: {got:?}");
        peer.write_all(b"yzw").unwrap();
        let got = collect(&mut *ops, &[3], Duration::from_secs(2));
        assert_eq!(result(&got, 3).0, 4, "{name}");
        assert_eq!(&hdr, b"xyzw", "{name}");

        // Both pooled buffers held: the next receive finds none.
        peer.write_all(&[7u8; 3000]).unwrap();
        let mut held = Vec::new();
        for ud in [4, 5] {
            assert!(ops.push(
                Op::RecvPooled {
                    fd: ours.as_raw_fd(),
                    len: 1000
                },
                ud
            ));
            let got = collect(&mut *ops, &[ud], Duration::from_secs(2));
            let (n, flags) = result(&got, ud);
            assert!(n > 0, "{name}: {n}");
            held.push(buffer_select(flags).expect("a buffer"));
        }
        assert!(ops.push(
            Op::RecvPooled {
                fd: ours.as_raw_fd(),
                len: 1000
            },
            6
        ));
        let got = collect(&mut *ops, &[6], Duration::from_secs(2));
        assert_eq!(result(&got, 6).0, -libc::ENOBUFS, "{name}");
        for bid in held {
            ops.recycle(BufId::Pool(bid));
        }

        // A receive waiting on an idle socket ends with the cancel.
        let mut rest = vec![0u8; 4096];
        let view = ours_stream(&ours);
        while (&*view).read(&mut rest).is_ok_and(|n| n > 0) {}
        assert!(ops.push(
            Op::RecvPooled {
                fd: ours.as_raw_fd(),
                len: 1000
            },
            7
        ));
        let got = collect(&mut *ops, &[7], Duration::from_millis(100));
        assert!(got.is_empty(), "{name}: {got:?}");
        assert!(ops.push(
            Op::CancelFd {
                fd: ours.as_raw_fd()
            },
            8
        ));
        ops.flush();
        let got = collect(&mut *ops, &[7, 8], Duration::from_secs(2));
        assert_eq!(result(&got, 7).0, -libc::ECANCELED, "{name}");
        ops.forget(ours.as_raw_fd());
        peer.shutdown(Shutdown::Both).ok();
    }
}

/// A borrowed std view of `fd` for draining it in the test (not closed on drop).
fn ours_stream(fd: &std::os::fd::OwnedFd) -> std::mem::ManuallyDrop<TcpStream> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `fd` is an open TCP socket that outlives the returned view, which is never
    // dropped (so it never closes the descriptor).
    std::mem::ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd.as_raw_fd()) })
}

/// epoll only (io_uring keeps kernel-side operations until they complete): an fd
/// forgotten with an operation still queued completes it as cancelled instead of
/// dropping it, so the connection waiting on it can still be freed.
#[test]
fn epoll_forget_with_a_queued_operation_cancels_it() {
    let mut ops = EpollOps::new(Some((2, 4096))).unwrap();
    let (ours, _peer) = pair();
    assert!(ops.push(
        Op::RecvPooled {
            fd: ours.as_raw_fd(),
            len: 1000
        },
        1
    ));
    let got = collect(&mut ops, &[1], Duration::from_millis(50));
    assert!(got.is_empty(), "{got:?}");
    ops.forget(ours.as_raw_fd());
    let got = collect(&mut ops, &[1], Duration::from_secs(1));
    assert_eq!(result(&got, 1).0, -libc::ECANCELED);
}

/// The zero-copy path sends its chunks with one sendmsg: every iovec arrives, in order.
#[test]
fn sendmsg_sends_every_iovec_in_order() {
    for mut ops in backends() {
        let name = ops.name();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let parts: [&[u8]; 3] = [b"first chunk, ", b"second, ", b"and the third"];
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr().cast_mut().cast(),
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: plain-data C struct; all-zero is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        assert!(ops.push(
            Op::SendMsg {
                fd: client.as_raw_fd(),
                msg: &raw const msg,
            },
            7
        ));
        let got = collect(&mut *ops, &[7], Duration::from_secs(2));
        let total: usize = parts.iter().map(|p| p.len()).sum();
        assert_eq!(result(&got, 7).0, total as i32, "{name}: {got:?}");
        let mut buf = vec![0; total];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(buf, parts.concat(), "{name}");
    }
}

/// Zero-copy receive is refused (not silently dropped) where no queue is registered:
/// on epoll, and on an io_uring backend made without one.
#[test]
fn zero_copy_receive_without_a_queue_is_refused() {
    for mut ops in backends() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(
            !ops.push(
                Op::RecvZc {
                    fd: client.as_raw_fd(),
                    len: 4096
                },
                9
            ),
            "{}",
            ops.name()
        );
    }
}

/// A gathering wait (io_uring, bulk traffic): a lone completion comes out after the
/// minimum, not at once and not at the timeout; one that completed as it was submitted
/// comes out at once; completions arriving within the minimum come out together; with
/// nothing in by the minimum the first to come ends the wait; without a batch the first
/// ends it. Epoll cannot gather.
#[test]
fn a_gathering_wait_holds_completions_only_for_its_minimum() {
    use super::Batch;
    let epoll = EpollOps::new(None).unwrap();
    assert!(!epoll.can_gather(), "epoll cannot gather");
    if let Some(why) = super::uring::unavailable() {
        assert!(
            std::env::var_os("CI").is_none(),
            "io_uring must be usable in CI: {why}"
        );
        println!("skipped: io_uring unavailable here ({why})");
        return;
    }
    let min_wait = io_uring::IoUring::new(2)
        .unwrap()
        .params()
        .is_feature_min_timeout();
    let mut ops = UringOps::new(None).unwrap();
    assert_eq!(ops.can_gather(), min_wait, "gathers where the kernel can");
    if !min_wait {
        println!("skipped: this kernel has no minimum waits (6.12)");
        return;
    }
    let pairs: Vec<_> = (0..8).map(|_| pair()).collect();
    let poll = |ops: &mut UringOps, i: usize| {
        assert!(ops.push(
            Op::Poll {
                fd: pairs[i].0.as_raw_fd(),
                events: libc::POLLIN as u32
            },
            i as u64
        ));
    };
    let drain = |i: usize| {
        let mut b = [0u8; 16];
        let _ = ours_stream(&pairs[i].0).read(&mut b);
    };
    // Writes to `which` peers after `after`, from another thread, while we wait.
    let write_later = |which: Vec<usize>, after: Duration| {
        let peers: Vec<TcpStream> = which
            .iter()
            .map(|&i| pairs[i].1.try_clone().unwrap())
            .collect();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            for mut p in peers {
                p.write_all(b"x").unwrap();
            }
        })
    };
    let batch = |events, usec| Some(Batch { events, usec });
    let mut got = Vec::new();

    // A lone completion arriving within the minimum (100 ms): held until the minimum,
    // then handed over.
    ops.gather(batch(8, 100_000));
    poll(&mut ops, 0);
    let writer = write_later(vec![0], Duration::from_millis(5));
    let started = Instant::now();
    ops.wait(Duration::from_secs(5), &mut got);
    let waited = started.elapsed();
    writer.join().unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        waited >= Duration::from_millis(90),
        "not gathered: {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "held until the timeout");
    drain(0);

    // Work that completed as it was submitted (a poll on a ready socket) is not held.
    ops.gather(batch(8, 2_000_000));
    (&pairs[0].1).write_all(b"x").unwrap();
    poll(&mut ops, 0);
    let started = Instant::now();
    got.clear();
    ops.wait(Duration::from_secs(5), &mut got);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "held ready work"
    );
    drain(0);

    // Eight arriving within a long minimum: one wait hands over all of them.
    ops.gather(batch(8, 2_000_000));
    for i in 0..8 {
        poll(&mut ops, i);
    }
    let writer = write_later((0..8).collect(), Duration::from_millis(5));
    got.clear();
    ops.wait(Duration::from_secs(5), &mut got);
    writer.join().unwrap();
    assert_eq!(got.len(), 8, "not gathered together: {got:?}");
    (0..8).for_each(drain);

    // Nothing by the minimum (1 ms): the first completion after it ends the wait.
    ops.gather(batch(8, 1000));
    poll(&mut ops, 1);
    poll(&mut ops, 2);
    let writer = write_later(vec![1], Duration::from_millis(50));
    let started = Instant::now();
    got.clear();
    ops.wait(Duration::from_secs(5), &mut got);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "held until the timeout"
    );
    writer.join().unwrap();
    drain(1);

    // No batch: the first completion ends the wait, even with a long minimum before.
    ops.gather(batch(8, 2_000_000));
    ops.gather(None);
    poll(&mut ops, 1);
    let writer = write_later(vec![1], Duration::from_millis(5));
    let started = Instant::now();
    got.clear();
    ops.wait(Duration::from_secs(5), &mut got);
    let waited = started.elapsed();
    writer.join().unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        waited < Duration::from_secs(1),
        "still gathering: {waited:?}"
    );
    // The poll on peer 2 is still pending: one more write ends it.
    (&pairs[2].1).write_all(b"x").unwrap();
    got.clear();
    ops.wait(Duration::from_secs(5), &mut got);
    assert_eq!(got.len(), 1, "{got:?}");
}

/// A zero-timeout wait (a busy poll) never sleeps, and alone still brings completions —
/// on io_uring those of socket operations are posted by deferred task work, which only a
/// wait that asks for events runs.
#[test]
fn zero_timeout_waits_reap_without_sleeping() {
    for mut ops in backends() {
        let name = ops.name();
        let (ours, mut peer) = pair();
        assert!(ops.push(poll_readable(&ours), 1));
        // Nothing can complete: a thousand polls return at once (were each to sleep even
        // the shortest epoll timeout, 1 ms, they would take a second).
        let mut got = Vec::new();
        let started = Instant::now();
        for _ in 0..1000 {
            ops.wait(Duration::ZERO, &mut got);
        }
        let took = started.elapsed();
        assert!(got.is_empty(), "{name}: {got:?}");
        assert!(took < Duration::from_millis(500), "{name}: {took:?}");
        peer.write_all(b"x").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.is_empty() && Instant::now() < deadline {
            ops.wait(Duration::ZERO, &mut got);
        }
        assert_eq!(got.first().map(|c| c.0), Some(1), "{name}: {got:?}");
        ops.forget(ours.as_raw_fd());
    }
}

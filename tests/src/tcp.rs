//! TCP peers for forwarding tests: upstream servers with a chosen behaviour, clients
//! bound to chosen source addresses, and the proxy started on a configuration, all
//! inside a namespace created by the test (loopback there carries 10.200.0.0/24).
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{LogLines, Reaped, netns::Netns, tools};

/// A namespace whose loopback also owns 10.200.0.0/24 (every address in it is local),
/// so upstreams and clients can use distinct addresses.
pub fn namespace() -> anyhow::Result<Netns> {
    let ns = Netns::create()?;
    tools::run(
        "ip",
        ["-n", ns.name(), "addr", "add", "10.200.0.1/24", "dev", "lo"],
    )?;
    Ok(ns)
}

/// What an upstream does with each connection (on its own thread).
pub type Handler = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// Echoes everything back, then half-closes when the client did.
pub fn echo() -> Handler {
    Arc::new(|mut s: TcpStream| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    })
}

/// Writes `id` as one line, then echoes.
pub fn identify(id: &str) -> Handler {
    let id = format!("{id}\n");
    let echo = echo();
    Arc::new(move |mut s: TcpStream| {
        if s.write_all(id.as_bytes()).is_ok() {
            echo(s);
        }
    })
}

/// An upstream server on `addr` inside `ns`; stops accepting on drop.
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn spawn(ns: &Netns, addr: SocketAddr, handler: Handler) -> anyhow::Result<Self> {
        let listener = ns
            .run(|| TcpListener::bind(addr))
            .with_context(|| format!("upstream listening on {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let acceptor = {
            let (stop, accepted) = (Arc::clone(&stop), Arc::clone(&accepted));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let _ = s.set_nonblocking(false);
                            let h = Arc::clone(&handler);
                            std::thread::spawn(move || h(s));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Ok(Self {
            addr,
            accepted,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

/// A blocking client connection to `to` from `from` (any port), inside `ns`.
pub fn connect_from(ns: &Netns, from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    ns.run(|| connect_here(from, to))
}

/// A blocking client connection from `from` in the calling thread's namespace (with a
/// 30 s read timeout, so a broken peer fails the caller instead of hanging it).
pub fn connect_here(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(from, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

pub fn connect(ns: &Netns, to: SocketAddr) -> std::io::Result<TcpStream> {
    let from: IpAddr = if to.is_ipv4() {
        "10.200.0.1".parse().expect("literal")
    } else {
        "::1".parse().expect("literal")
    };
    connect_from(ns, from, to)
}

/// One `read`, retried when a signal interrupts it. A socket read with a timeout (every
/// client here has one) is not restarted after a signal, nor after the process was
/// stopped or frozen and resumed: it fails with `Interrupted` (as `read_exact` and
/// `read_to_end` already retry).
pub fn read_some(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads one `\n`-terminated line (an upstream's id).
pub fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if read_some(s, &mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
}

/// `edgeproxy proxy --config CFG --stats-file STATS ARGS…` inside `ns` with `env` added
/// to its environment, started.
pub fn start_proxy(
    ns: &Netns,
    cfg: &Path,
    stats: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(Reaped, LogLines)> {
    let mut all: Vec<std::ffi::OsString> = vec!["proxy".into(), "--json".into(), "--config".into()];
    all.push(cfg.into());
    all.push("--stats-file".into());
    all.push(stats.into());
    all.extend(args.iter().map(Into::into));
    crate::try_start_edgeproxy_env_until(ns, all, env, "TCP forwarding started")
}

/// The stats file's routes once `ready` holds for them (polled up to `limit`).
pub fn wait_stats(
    stats: &Path,
    limit: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(stats)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            if ready(&v["routes"]) {
                return Ok(v["routes"].clone());
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("stats never matched within {limit:?}; last: {last}")
}

/// The upstream entry `addr` of route `name` in a routes JSON array.
pub fn upstream_stats<'a>(
    routes: &'a serde_json::Value,
    name: &str,
    addr: &str,
) -> Option<&'a serde_json::Value> {
    routes.as_array()?.iter().find(|r| r["name"] == name)?["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["address"] == addr)
}

/// Resident memory of process `pid` in KiB (VmRSS).
pub fn rss_kib(pid: i32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident memory of process `pid` in KiB (VmHWM).
pub fn peak_rss_kib(pid: i32) -> anyhow::Result<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: i32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

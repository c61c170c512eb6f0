//! The admin endpoint on the control thread: a small HTTP/1.1 server for scrapers and
//! probes. `GET /metrics` serves the TCP counters in the Prometheus text format,
//! `GET /healthz` answers `ok` while the control thread runs (liveness), `GET /ready`
//! answers 200 only while forwarding accepts connections — 503 while it starts, drains
//! after SIGTERM (the endpoint keeps serving through the drain) and after it stopped —
//! so a load balancer in front takes the node out before its listeners close. One request per
//! connection; request heads are bounded in size and time, and so is the number of
//! clients served at once (more are closed at once, not queued).
use std::{sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    report::prometheus,
    tcp::{Lifecycle, SharedRoutes},
};

/// The longest request head read (request line and headers).
const HEAD_LIMIT: usize = 8 * 1024;
/// How long a client may take to send its request head, and to take the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once.
const MAX_CLIENTS: usize = 32;

/// Binds the endpoint's listener (at start, so a bad address fails the daemon with the
/// reason instead of a warning later).
pub fn bind(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("admin endpoint: binding {addr}: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| anyhow::anyhow!("admin endpoint: {addr}: {e}"))?;
    Ok(l)
}

/// Serves `listener` until the runtime ends.
pub async fn serve(listener: std::net::TcpListener, routes: Arc<SharedRoutes>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin endpoint: not serving");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin endpoint: /metrics, /healthz, /ready");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds, most likely: rest rather than spin.
                tracing::warn!(error = %e, "admin endpoint: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "admin endpoint: too many clients; closed");
            continue;
        };
        let routes = Arc::clone(&routes);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = answer(stream, &routes).await {
                tracing::debug!(%peer, error = %e, "admin endpoint: client");
            }
        });
    }
}

/// Reads one request head and writes the response.
async fn answer(stream: TcpStream, routes: &SharedRoutes) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_LIMIT {
            let n = read(&stream, &mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(head.windows(4).any(|w| w == b"\r\n\r\n"))
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
    let response = if complete {
        respond(&head, routes)
    } else {
        Response::text(400, "Bad Request", "request head too long or cut\n")
    };
    tokio::time::timeout(CLIENT_TIMEOUT, write_all(&stream, &response.bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response"))??;
    // Our FIN ends the response (`Connection: close`).
    stream.into_std()?.shutdown(std::net::Shutdown::Write)
}

async fn read(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra_header: Option<&'static str>,
    body: String,
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra_header: None,
            body: body.to_string(),
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if let Some(h) = self.extra_header {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// The response to a complete request head.
fn respond(head: &[u8], routes: &SharedRoutes) -> Response {
    let Some((method, path)) = request_line(head) else {
        return Response::text(400, "Bad Request", "malformed request line\n");
    };
    let mut response = match path {
        "/metrics" | "/healthz" | "/ready" if !matches!(method, "GET" | "HEAD") => {
            let mut r = Response::text(405, "Method Not Allowed", "GET or HEAD\n");
            r.extra_header = Some("Allow: GET, HEAD");
            r
        }
        "/metrics" => {
            let mut body = String::with_capacity(16 * 1024);
            prometheus::tcp(
                routes.lifecycle(),
                &routes.latest(),
                &routes.worker_stats(),
                &mut body,
            );
            Response {
                content_type: prometheus::CONTENT_TYPE,
                body,
                ..Response::text(200, "OK", "")
            }
        }
        "/healthz" => Response::text(200, "OK", "ok\n"),
        "/ready" => match routes.lifecycle() {
            // `run` keeps going when a reload removes every route, listening on nothing.
            Lifecycle::Serving if routes.latest().routes.is_empty() => {
                Response::text(503, "Service Unavailable", "no routes\n")
            }
            Lifecycle::Serving => Response::text(200, "OK", "ready\n"),
            other => Response::text(503, "Service Unavailable", &format!("{}\n", other.name())),
        },
        _ => Response::text(404, "Not Found", "/metrics, /healthz or /ready\n"),
    };
    response.head_only = method == "HEAD";
    response
}

/// The method and the path (without a query string) of a complete HTTP/1.x request
/// line: the sampled-request parser's, which also serves the reports. Public for the
/// fuzz target (`fuzz/fuzz_targets/admin_http.rs`).
pub fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    crate::report::http::request_line(head)
        .filter(|r| !r.truncated && r.path.starts_with('/'))
        .map(|r| (r.method, r.path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::Routes;

    fn shared() -> Arc<SharedRoutes> {
        let cfg = crate::config::parse_config(
            "t.toml",
            "[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:8000\"\nupstreams = [\"127.0.0.1:8001\"]\n",
        )
        .unwrap();
        SharedRoutes::new(Routes::build(&cfg.routes, cfg.tcp.clone(), None))
    }

    fn text(r: &Response) -> String {
        String::from_utf8(r.bytes()).unwrap()
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        assert_eq!(
            request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            request_line(b"HEAD /healthz?verbose=1 HTTP/1.0\r\n\r\n"),
            Some(("HEAD", "/healthz"))
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"\r\n\r\n",
            b"\xff /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(request_line(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn each_path_and_method_gets_its_status() {
        let routes = shared();
        let metrics = text(&respond(b"GET /metrics HTTP/1.1\r\n\r\n", &routes));
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("Content-Type: text/plain; version=0.0.4"));
        let (head, body) = metrics.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(body.contains("edgeproxy_tcp_route_accepted_total{route=\"r\""));

        let head_only = text(&respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &routes));
        let (head, body) = head_only.split_once("\r\n\r\n").unwrap();
        assert!(body.is_empty());
        assert!(!head.contains("Content-Length: 0\r\n"), "{head}");

        let health = text(&respond(b"GET /healthz HTTP/1.1\r\n\r\n", &routes));
        assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok\n"));
        // Ready only while serving: not while starting, draining or after.
        let ready = |routes: &SharedRoutes| text(&respond(b"GET /ready HTTP/1.1\r\n\r\n", routes));
        assert!(
            ready(&routes).starts_with("HTTP/1.1 503 ")
                && ready(&routes).ends_with("\r\n\r\nstarting\n")
        );
        routes.advance(Lifecycle::Serving);
        assert!(
            ready(&routes).starts_with("HTTP/1.1 200 OK\r\n")
                && ready(&routes).ends_with("\r\n\r\nready\n")
        );
        // Serving no route (a `run` reload removed them all) is not ready either.
        let specs: Vec<_> = routes
            .latest()
            .routes
            .iter()
            .map(|r| r.spec.clone())
            .collect();
        let settings = routes.latest().settings.clone();
        routes.publish(&[], settings.clone());
        assert!(ready(&routes).ends_with("\r\n\r\nno routes\n"));
        assert!(ready(&routes).starts_with("HTTP/1.1 503 "));
        routes.publish(&specs, settings);
        assert!(ready(&routes).starts_with("HTTP/1.1 200 OK\r\n"));
        routes.advance(Lifecycle::Draining);
        assert!(
            ready(&routes).starts_with("HTTP/1.1 503 ")
                && ready(&routes).ends_with("\r\n\r\ndraining\n")
        );
        routes.advance(Lifecycle::Serving);
        assert!(ready(&routes).ends_with("draining\n"), "never back");
        routes.advance(Lifecycle::Stopped);
        assert!(
            ready(&routes).starts_with("HTTP/1.1 503 ")
                && ready(&routes).ends_with("\r\n\r\nstopped\n")
        );
        let post = text(&respond(b"POST /metrics HTTP/1.1\r\n\r\n", &routes));
        assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"));
        let missing = text(&respond(b"GET / HTTP/1.1\r\n\r\n", &routes));
        assert!(missing.starts_with("HTTP/1.1 404 "));
        let bad = text(&respond(b"nonsense\r\n\r\n", &routes));
        assert!(bad.starts_with("HTTP/1.1 400 "));
    }

    /// Over a real socket: a scrape, a client that sends nothing and one that sends an
    /// endless head do not stop the next scrape.
    #[test]
    fn a_scrape_over_tcp_survives_bad_clients() {
        use std::io::{Read as _, Write as _};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = shared();
        let server = std::thread::spawn(move || {
            rt.block_on(async {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), serve(listener, routes)).await;
            });
        });
        let scrape = || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            out
        };
        assert!(scrape().contains("edgeproxy_tcp_upstream_connect_seconds_count"));
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        let mut endless = std::net::TcpStream::connect(addr).unwrap();
        endless.write_all(&[b'x'; HEAD_LIMIT + 10]).unwrap();
        let mut out = String::new();
        endless
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        endless.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(scrape().starts_with("HTTP/1.1 200 OK\r\n"));
        drop(server); // ends with the runtime's timeout
    }
}

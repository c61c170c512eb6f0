//! aya-log: a line logged by the XDP program arrives in userspace through `log` and
//! `tracing`, and the kernel-side level filter suppresses disabled levels.
//! (Its own test binary: it installs a process-wide subscriber.)
use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use edgeproxy_testbed::{
    packets::{self, L4},
    privilege::require_root,
};
use proxy_common::EDGE_XDP_PROGRAM;
use proxy_user::dataplane::{Dataplane, LoadOptions};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

#[test]
fn ebpf_log_lines_reach_tracing_and_respect_the_level() {
    if !require_root("ebpf_log_lines_reach_tracing_and_respect_the_level") {
        return;
    }
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    // 14 + 19 bytes: an IPv4 header cut one byte short: malformed, logged at debug.
    let pkt = packets::eth_ipv4(&L4::udp(1, 2, 0))[..14 + 19].to_vec();
    let run = |level: log::LevelFilter| {
        let mut dp = Dataplane::load(LoadOptions {
            ebpf_log_level: level,
            ..LoadOptions::default()
        })
        .expect("load");
        let mut logger = dp.take_logger().expect("logger");
        dp.test_runner(EDGE_XDP_PROGRAM)
            .expect("runner")
            .run(&pkt, 1)
            .expect("run");
        logger.flush();
    };

    run(log::LevelFilter::Warn);
    assert!(
        !captured.text().contains("malformed packet"),
        "debug lines must be filtered in the kernel at warn: {}",
        captured.text()
    );
    run(log::LevelFilter::Debug);
    let text = captured.text();
    assert!(
        text.contains("malformed packet: 33 bytes"),
        "captured: {text}"
    );
    assert!(text.contains("DEBUG"), "at debug level: {text}");
}

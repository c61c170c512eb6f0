//! Policy actions with real traffic through a veth pair, and the operator CLI against a
//! pinned data plane.
use std::{net::UdpSocket, time::Duration};

use edgeproxy_testbed::{
    edgeproxy_bin,
    netns::VethPair,
    policy_util,
    privilege::require_root,
    scratch::{PinRoot, ScratchDir},
};
use proxy_common::policy::{RecordKind, Verdict};
use proxy_user::dataplane::{Dataplane, HookChoice, LoadOptions, RecordTally};

fn big_rcvbuf(s: &UdpSocket) {
    s.set_nonblocking(true).expect("nonblocking");
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20))
        .expect("rcvbuf");
}

fn drain_socket(s: &UdpSocket) -> u64 {
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while s.recv(&mut buf).is_ok() {
        n += 1;
    }
    n
}

/// Captures carry the exact UDP payload (truncated at capture_max, with the cut counted),
/// the sender's address, and the packet is dropped or passed as the rule says.
fn capture(then: &str) {
    let pair = VethPair::create().expect("veth pair");
    let policy = format!(
        "[[rule]]\nname = \"syslog\"\nproto = \"udp\"\ndst_port = 514\naction = \"capture\"\ncapture_max = 1024\nthen = \"{then}\"\n"
    );
    // Payloads of distinct content and sizes, some longer than capture_max.
    let payloads: Vec<Vec<u8>> = (0..100)
        .map(|i| {
            format!("<13>msg {i} ")
                .into_bytes()
                .into_iter()
                .chain(std::iter::repeat_n(b'a' + (i % 26) as u8, i * 13))
                .collect()
        })
        .collect();
    pair.a.run(|| {
        let sock = UdpSocket::bind((pair.a_v4, 514)).expect("bind");
        big_rcvbuf(&sock);
        let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
        policy_util::load(&mut policy_util::loader(&mut dp), &policy);
        dp.attach(pair.a_if, HookChoice::Auto).expect("attach");
        let mut records = dp.take_records().expect("records");
        pair.b.run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            for p in &payloads {
                s.send_to(p, (pair.a_v4, 514)).expect("send");
            }
        });
        let got = drain_socket(&sock);
        let mut captured = Vec::new();
        let mut tally = RecordTally::default();
        records.drain(&mut tally, |r| {
            assert_eq!(r.header.kind, RecordKind::Capture as u8);
            assert_eq!(&r.header.src_addr[..4], &pair.b_v4.octets());
            assert_eq!(r.header.dst_port, 514);
            captured.push((r.data.to_vec(), r.header.truncated));
        });
        assert_eq!(captured.len(), payloads.len(), "one capture per datagram");
        // Each CPU's ring is in order, but veth's receive work can move between CPUs in
        // the middle of the burst (it follows the sender's thread), and the rings are
        // drained one after the other: put the captures back in send order by the
        // index each payload starts with (a capture without one fails below).
        let index = |data: &[u8]| -> usize {
            std::str::from_utf8(data.get(8..).unwrap_or_default())
                .unwrap_or_default()
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX)
        };
        captured.sort_by_key(|(data, _)| index(data));
        for (p, (data, truncated)) in payloads.iter().zip(&captured) {
            let keep = p.len().min(1024);
            assert_eq!(data.as_slice(), &p[..keep], "captured bytes");
            assert_eq!(*truncated as usize, p.len() - keep, "truncation is counted");
        }
        let snap = dp
            .counters()
            .expect("counters")
            .snapshot()
            .expect("snapshot");
        if then == "drop" {
            assert_eq!(got, 0, "captured datagrams are dropped");
            assert_eq!(snap.verdict(Verdict::DropCaptured).packets, 100);
        } else {
            assert_eq!(got, 100, "captured datagrams also pass");
            assert_eq!(snap.verdict(Verdict::PassCaptured).packets, 100);
        }
    });
}

#[test]
fn capture_then_drop_delivers_payloads_only_to_the_ring() {
    if require_root("capture_then_drop_delivers_payloads_only_to_the_ring") {
        capture("drop");
    }
}

#[test]
fn capture_then_pass_delivers_to_both() {
    if require_root("capture_then_pass_delivers_to_both") {
        capture("pass");
    }
}

#[test]
fn sample_rule_samples_real_tcp_and_passes_it() {
    if !require_root("sample_rule_samples_real_tcp_and_passes_it") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    pair.a.run(|| {
        let listener = std::net::TcpListener::bind((pair.a_v4, 8080)).expect("listen");
        let mut dp = Dataplane::load(LoadOptions::default()).expect("load");
        policy_util::load(
            &mut policy_util::loader(&mut dp),
            "[[rule]]\nproto = \"tcp\"\ndst_port = 8080\naction = \"sample\"\nrate = \"100%\"\nsnap = 128\n",
        );
        dp.attach(pair.a_if, HookChoice::Auto).expect("attach");
        let mut records = dp.take_records().expect("records");
        pair.b.run(|| {
            use std::io::Write;
            let mut c = std::net::TcpStream::connect((pair.a_v4, 8080)).expect("connect");
            c.write_all(b"GET /edge HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        });
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut conn, &mut buf).expect("read");
        assert!(buf[..n].starts_with(b"GET /edge"), "the connection works through the sample rule");
        std::thread::sleep(Duration::from_millis(100));
        let mut saw_request = false;
        let mut tally = RecordTally::default();
        records.drain(&mut tally, |r| {
            assert_eq!(r.header.dst_port, 8080);
            if r.data.windows(9).any(|w| w == b"GET /edge") {
                saw_request = true;
            }
        });
        assert!(tally.samples >= 3, "SYN, ACK and data segments sampled ({})", tally.samples);
        assert!(saw_request, "the sampled snippet contains the HTTP request line");
    });
}

/// Broken policy files through `edgeproxy policy load`: each fails with file:line:col and
/// a reason, and the active generation stays what it was.
#[test]
fn bad_policies_are_rejected_and_change_nothing() {
    if !require_root("bad_policies_are_rejected_and_change_nothing") {
        return;
    }
    let root = PinRoot::new().expect("pin root");
    let dir = ScratchDir::new().expect("scratch");
    let state = dir.path().join("state");
    let _dp = Dataplane::load(LoadOptions {
        pin_dir: Some(root.path().join("x0")),
        ..LoadOptions::default()
    })
    .expect("pinned load");
    let bin = edgeproxy_bin().expect("binary");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(&bin)
            .args(args)
            .arg("--iface")
            .arg("x0")
            .arg("--pin-root")
            .arg(root.path())
            .arg("--state-dir")
            .arg(&state)
            .output()
            .expect("run edgeproxy");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = dir.file("good.toml", "default = \"pass\"\n[[rule]]\nname = \"dns\"\nproto = \"udp\"\ndst_port = 53\naction = \"drop\"\n");
    let (ok, _, err) = cli(&["policy", "load", good.to_str().expect("utf8")]);
    assert!(ok, "{err}");
    let generation = || {
        let (ok, out, err) = cli(&["policy", "show", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("json")["generation"].clone()
    };
    assert_eq!(generation(), 1);

    let too_many: String = (0..257)
        .map(|i| format!("[[rule]]\nname = \"r{i}\"\naction = \"pass\"\n"))
        .collect();
    let table: Vec<(&str, String, &str)> = vec![
        ("syntax", "[[rule]\naction = \"drop\"\n".into(), ":1:"),
        ("unknown field", "[[rule]]\nactoin = \"drop\"\n".into(), ":2:1: unknown field `actoin`"),
        ("missing action", "[[rule]]\nproto = \"udp\"\n".into(), "missing field `action`"),
        ("host bits", "[[rule]]\nsrc = \"10.0.0.1/8\"\naction = \"drop\"\n".into(), ":2:7: src: \"10.0.0.1/8\" has host bits set; the network is 10.0.0.0/8"),
        ("prefix length", "[[rule]]\ndst = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\naction = \"drop\"\n".into(), ":2:7: dst (element 2): \"10.0.0.0/33\": prefix length must be 0..=32"),
        ("reversed ports", "[[rule]]\nproto = \"tcp\"\ndst_port = \"2000-1000\"\naction = \"drop\"\n".into(), ":3:12: dst_port: range 2000-1000 is reversed"),
        ("overlapping ports", "[[rule]]\nproto = \"tcp\"\ndst_port = [\"1000-2000\", 1500]\naction = \"drop\"\n".into(), ":3:12: dst_port: 1000-2000 and 1500 overlap"),
        ("ports on icmp", "[[rule]]\nproto = \"icmp\"\ndst_port = 80\naction = \"drop\"\n".into(), ":2:9: ports only exist for tcp and udp"),
        ("sample without rate", "[[rule]]\naction = \"sample\"\n".into(), ":2:10: action = \"sample\" needs a rate"),
        ("rate too small", "[[rule]]\naction = \"sample\"\nrate = \"0.00000000001%\"\n".into(), ":3:8: rate \"0.00000000001%\" is below"),
        ("snap too long", "[[rule]]\naction = \"sample\"\nrate = \"1/10\"\nsnap = 1000\n".into(), ":4:8: snap must be 1..=256"),
        ("rate on drop", "[[rule]]\naction = \"drop\"\nrate = \"1/10\"\n".into(), ":3:8: rate only applies to action = \"sample\""),
        ("capture tcp", "[[rule]]\nproto = \"tcp\"\naction = \"capture\"\n".into(), ":2:9: capture takes UDP payloads"),
        ("unknown action", "[[rule]]\naction = \"reject\"\n".into(), ":2:10: unknown action \"reject\""),
        ("unknown proto", "[[rule]]\nproto = \"sctpx\"\naction = \"drop\"\n".into(), ":2:9: proto: expected tcp, udp, icmp, icmpv6"),
        ("default sample", "default = \"sample\"\n".into(), ":1:11: default must be \"pass\" or \"drop\""),
        ("duplicate names", "[[rule]]\nname = \"a\"\naction = \"drop\"\n[[rule]]\nname = \"a\"\naction = \"pass\"\n".into(), ":4:1: duplicate rule name \"a\""),
        ("empty list", "[[rule]]\nsrc = []\naction = \"drop\"\n".into(), ":2:7: src = [] matches nothing"),
        ("too many rules", too_many, ":769:1: too many rules: the limit is 256"),
    ];
    for (what, text, want) in &table {
        let f = dir.file("bad.toml", text);
        let (ok, _, err) = cli(&["policy", "load", f.to_str().expect("utf8")]);
        assert!(!ok, "{what}: must be rejected");
        assert!(
            err.contains(&format!("{}{want}", f.display())) || err.contains(want),
            "{what}: stderr {err:?} lacks {want:?}"
        );
        assert!(
            err.contains(&f.display().to_string()),
            "{what}: names the file: {err}"
        );
        assert_eq!(
            generation(),
            1,
            "{what}: the active generation is unchanged"
        );
        let (ok, _, _) = cli(&["policy", "check", f.to_str().expect("utf8")]);
        assert!(!ok, "{what}: policy check agrees");
    }
    // diff and rollback on top.
    let next = dir.file("next.toml", "default = \"drop\"\n[[rule]]\nname = \"web\"\nproto = \"tcp\"\ndst_port = 443\naction = \"pass\"\n[[rule]]\nname = \"dns\"\nproto = \"udp\"\ndst_port = 53\naction = \"pass\"\n");
    let (ok, out, err) = cli(&["policy", "diff", next.to_str().expect("utf8")]);
    assert!(ok, "{err}");
    assert!(out.contains("~ default: pass -> drop"), "{out}");
    assert!(out.contains("+ web:"), "{out}");
    assert!(
        out.contains("~ dns:") && out.contains("> dns: moved from position 0 to 1"),
        "{out}"
    );
    let (ok, _, err) = cli(&["policy", "load", next.to_str().expect("utf8")]);
    assert!(ok, "{err}");
    assert_eq!(generation(), 2);
    let (ok, out, err) = cli(&["policy", "rollback"]);
    assert!(ok, "{err}");
    assert!(out.contains("generation 1"), "{out}");
    assert_eq!(generation(), 1);
}

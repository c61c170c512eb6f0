//! Sinks that take only raw messages still end every window: a raw file sink rotates by
//! size (and syncs) like a window sink does.
use std::time::Duration;

use edgeproxy_testbed::{
    netns::VethPair, privilege::require_root, scratch::ScratchDir, start_logs, stop_and_collect,
    traffic,
};

const PORT: u16 = 5517;
const MESSAGES: u64 = 2000;

#[test]
fn a_raw_only_file_sink_rotates_and_keeps_every_line() {
    if !require_root("a_raw_only_file_sink_rotates_and_keeps_every_line") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let out = dir.path().join("raw/raw.log");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = 0.2\n\
             [[sink]]\nkind = \"file\"\npath = \"{}\"\nwhat = \"raw\"\nformat = \"text\"\n\
             rotate_bytes = 20000\nkeep = 100\n",
            pair.a_v4,
            out.display()
        ),
    );
    let child = start_logs(&pair.a, &cfg);
    traffic::send_numbered_syslog(
        &pair.b,
        (pair.a_v4, PORT).into(),
        0..MESSAGES,
        "",
        Duration::from_millis(30),
    )
    .expect("send");
    std::thread::sleep(Duration::from_millis(600));
    let summary = stop_and_collect(child);
    let mut files = 0;
    let mut lines = 0u64;
    for e in std::fs::read_dir(dir.path().join("raw")).expect("sink dir") {
        let text = std::fs::read_to_string(e.expect("entry").path()).expect("read");
        files += 1;
        lines += text.lines().count() as u64;
    }
    println!("raw file sink: {MESSAGES} messages in {files} files, {lines} lines");
    assert!(
        files > 1,
        "the raw sink rotated: {files} file(s); {summary}"
    );
    assert_eq!(lines, MESSAGES, "every line in exactly one file");
}

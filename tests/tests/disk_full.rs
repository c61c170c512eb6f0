//! A file sink on a full disk (a 256 KiB tmpfs): every raw message is either in the file,
//! whole, or counted as not taken (`raw_lines_failed`); the failure is logged a few
//! times, not once per batch; the daemon keeps running and exits cleanly.
use std::{path::PathBuf, time::Duration};

use edgeproxy_testbed::{
    netns::VethPair, privilege::require_root, scratch::ScratchDir, tools, traffic,
    try_start_edgeproxy_until, try_stop_and_collect,
};

const PORT: u16 = 5516;
const MESSAGES: u64 = 5000;

/// A small tmpfs mounted for the test, unmounted on drop (even when the test fails).
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf) -> Self {
        std::fs::create_dir_all(&at).expect("mount point");
        tools::run(
            "mount",
            ["-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"]
                .iter()
                .map(std::ffi::OsStr::new)
                .chain([at.as_os_str()]),
        )
        .expect("mount a tmpfs");
        Self(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = tools::run("umount", [self.0.as_os_str()]);
    }
}

#[test]
fn a_full_disk_loses_no_line_silently() {
    if !require_root("a_full_disk_loses_no_line_silently") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let dir = ScratchDir::new().expect("scratch");
    let disk = SmallDisk::mount(dir.path().join("small"));
    let out = disk.0.join("raw.log");
    let cfg = dir.file(
        "edgeproxy.toml",
        &format!(
            "[[listener]]\naddress = \"{}:{PORT}\"\n[window]\nseconds = 0.2\n\
             [[sink]]\nkind = \"file\"\npath = \"{}\"\nwhat = \"raw\"\nformat = \"text\"\n",
            pair.a_v4,
            out.display()
        ),
    );
    let args: Vec<std::ffi::OsString> = vec![
        "logs".into(),
        "--duration".into(),
        "60".into(),
        "--config".into(),
        cfg.into(),
    ];
    let (child, log) =
        try_start_edgeproxy_until(&pair.a, args, "log pipeline started").expect("start logs");
    let pad = "x".repeat(150);
    traffic::send_numbered_syslog(
        &pair.b,
        (pair.a_v4, PORT).into(),
        0..MESSAGES,
        &format!(" {pad}"),
        Duration::from_millis(10),
    )
    .expect("send");
    std::thread::sleep(Duration::from_millis(800));
    let (status, stdout) = try_stop_and_collect(child).expect("stop");
    assert!(status.success(), "{status}: {stdout}");
    let lines = log
        .wait_for("no line has this", Duration::from_millis(300))
        .expect_err("all lines");
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("summary")).expect("json");
    let sink = &v["summary"]["sinks"][0];
    let taken = sink["raw_lines"].as_u64().expect("raw_lines");
    let failed = sink["raw_lines_failed"].as_u64().expect("raw_lines_failed");
    let text = std::fs::read_to_string(&out).expect("the file");
    let in_file = text.lines().count() as u64;
    let whole = text.lines().all(|l| l.contains(&pad));
    let logged = lines.iter().filter(|l| l.contains("sink failed")).count();
    println!(
        "disk full: {MESSAGES} messages, {taken} in the file ({in_file} lines, whole {whole}), {failed} counted not taken, {} failures, {logged} log lines",
        sink["failures"]
    );
    assert_eq!(v["summary"]["counts"]["messages"], MESSAGES, "{v}");
    assert!(failed > 0, "the disk filled: {sink}");
    assert_eq!(
        taken + failed,
        MESSAGES,
        "every message taken or counted: {sink}"
    );
    assert_eq!(in_file, taken, "what was counted taken is in the file");
    assert!(whole, "no torn line in the file");
    assert!(logged <= 3, "throttled: {logged} lines");
}

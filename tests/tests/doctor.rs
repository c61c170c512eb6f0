//! `edgeproxy doctor --probe-xdp` inside a namespace with a veth pair: the probes run
//! for real (never on the host's own interfaces).
use edgeproxy_testbed::{edgeproxy_bin, netns::VethPair, privilege::require_root};

#[test]
fn doctor_reports_what_this_host_supports() {
    if !require_root("doctor_reports_what_this_host_supports") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let out = pair
        .a
        .command(edgeproxy_bin().expect("binary"))
        .args(["doctor", "--json", "--probe-xdp"])
        .output()
        .expect("doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(r["kernel"]["btf"], true);
    assert_eq!(r["bpffs_mounted"], true);
    assert_eq!(r["io_uring"]["setup"], serde_json::json!({"Ok": null}));
    assert_eq!(
        r["io_uring"]["buffer_rings"],
        serde_json::json!({"Ok": null})
    );
    assert_eq!(
        r["cpus"]["count"],
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let iface = |name: &str| {
        r["interfaces"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing: {r}"))
    };
    let epa = iface(pair.a_if);
    assert_eq!(
        epa["xdp_native"],
        serde_json::json!({"Ok": null}),
        "veth has native XDP"
    );
    assert_eq!(epa["xdp_generic"], serde_json::json!({"Ok": null}));
    assert_eq!(
        epa["zero_copy_receive"][0], false,
        "veth cannot do zero-copy receive"
    );
    let why = epa["zero_copy_receive"][1].as_str().unwrap_or("");
    assert!(
        why.contains("the kernel refused a zero-copy queue") && why.contains("os error 95"),
        "the kernel's own answer (EOPNOTSUPP) is the reason: {why}"
    );
    let lo = iface("lo");
    assert!(
        lo["xdp_native"]["Err"].is_string(),
        "loopback has no native XDP: {lo}"
    );
    assert_eq!(lo["xdp_generic"], serde_json::json!({"Ok": null}));
}

/// The zero-copy receive registration probe asks the kernel for real, inside a namespace:
/// no such interface → ENODEV (so the request itself passed the kernel's checks of the
/// ring set-up and the refill region, which come first), a veth → EOPNOTSUPP.
#[test]
fn zero_copy_queue_registration_is_refused_by_the_kernel_for_the_reason_given() {
    if !require_root("zero_copy_queue_registration_is_refused_by_the_kernel_for_the_reason_given") {
        return;
    }
    let pair = VethPair::create().expect("veth pair");
    let (missing, veth) = pair.a.run(|| {
        let idx = nix::net::if_::if_nametoindex(pair.a_if).expect("veth index");
        (
            proxy_user::tcp::ops::zcrx::register_probe(99_999),
            proxy_user::tcp::ops::zcrx::register_probe(idx),
        )
    });
    assert_eq!(
        missing.map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENODEV)),
        "an interface index that does not exist"
    );
    assert_eq!(
        veth.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EOPNOTSUPP)),
        "veth has no queue-management ops"
    );
}

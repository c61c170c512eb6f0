//! `edgeproxy doctor`: what this host supports and why a fallback would be chosen.
//! Every line is measured here (a file read, a syscall, a real probe). Zero-copy receive
//! per interface is judged by driver, and where the driver cannot do it, by the kernel's
//! answer to a queue registration (not attempted where it could succeed: it restarts the
//! queue); the reason says which.
use std::{fs, path::Path};

use serde::Serialize;

/// A probe that may not have run (`None`), succeeded, or failed with the reason.
pub type ProbeResult = Option<Result<(), String>>;

#[derive(Debug, Serialize)]
pub struct DoctorReport {
    pub kernel: Kernel,
    pub bpffs_mounted: bool,
    pub io_uring: IoUring,
    pub cpus: Cpus,
    pub congestion: Congestion,
    pub open_files: OpenFiles,
    pub interfaces: Vec<Interface>,
}

/// The file-descriptor limit and what it allows a daemon started now.
#[derive(Debug, Serialize)]
pub struct OpenFiles {
    /// `RLIMIT_NOFILE` of this process (soft, hard): what a daemon started the same way
    /// inherits.
    pub soft: u64,
    pub hard: u64,
    /// Proxied connections that fit once the daemon raised the soft limit to the hard
    /// one (as it does at start).
    pub connection_capacity: u64,
}

fn open_files() -> OpenFiles {
    use crate::limits::{connection_capacity, nofile, reachable_soft_limit};
    let (soft, hard) = nofile().map_or((0, 0), |n| (n.soft, n.hard));
    OpenFiles {
        soft,
        hard,
        // About what a daemon has open when it sizes its budget (stdio, the eBPF log,
        // listeners); everything opened later is within the reserve.
        connection_capacity: connection_capacity(reachable_soft_limit(hard), 16),
    }
}

/// TCP congestion control in this network namespace (`[tcp] local_congestion` picks one
/// for connections to peers on this host).
#[derive(Debug, Serialize)]
pub struct Congestion {
    /// `net.ipv4.tcp_congestion_control`: what every other connection runs.
    pub system: Option<String>,
    /// `net.ipv4.tcp_available_congestion_control`.
    pub available: Vec<String>,
    /// Whether the system's paces every connection (BBR does, without an `fq` qdisc
    /// through TCP's own timers), and what that means for upstreams on this host.
    pub pacing_note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Kernel {
    pub release: String,
    pub btf: bool,
    pub bpf_jit: Option<u32>,
    pub bpf_stats_sysctl: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct IoUring {
    /// `kernel.io_uring_disabled`: 0 enabled, 1 root/group only, 2 disabled.
    pub disabled_sysctl: Option<u32>,
    /// A ring could be created (the reason when not).
    pub setup: Result<(), String>,
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub coop_taskrun: bool,
    pub fast_poll: bool,
    pub opcodes: Vec<(&'static str, bool)>,
    /// Multishot receive is a flag, not an opcode, so the opcode probe cannot see it:
    /// judged by kernel version (6.0+).
    pub multishot_recv_by_kernel_version: bool,
    /// Provided buffer rings could be registered.
    pub buffer_rings: Result<(), String>,
    /// TCP forwarding's `auto` engine takes io_uring (else epoll, for this reason).
    pub tcp_forwarding: Result<(), String>,
}

#[derive(Debug, Serialize)]
pub struct Cpus {
    pub online: String,
    /// What this process may use (affinity, cgroup quota).
    pub count: usize,
    /// The affinity mask as a CPU list: the CPUs `data_cpus` may name.
    pub allowed: String,
    /// Running under a hypervisor (the `hypervisor` CPU flag).
    pub virtualized: bool,
    /// The cpuidle driver (`haltpoll` polls a while before halting a guest CPU).
    pub idle_driver: Option<String>,
    /// `haltpoll.guest_halt_poll_ns`: how long an idle guest CPU polls (0: it halts).
    pub guest_halt_poll_ns: Option<u64>,
    /// Whether `[tcp] busy_poll_usec` is worth its CPU here, and why.
    pub busy_poll_advice: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Interface {
    pub name: String,
    pub driver: String,
    pub mtu: Option<u32>,
    pub operstate: String,
    /// Native and generic XDP attach results, when probed (`--probe-xdp`).
    pub xdp_native: ProbeResult,
    pub xdp_generic: ProbeResult,
    /// Zero-copy receive (io_uring RecvZc): judged by driver, with the reason.
    pub zero_copy_receive: (bool, String),
}

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

fn read_u32(p: impl AsRef<Path>) -> Option<u32> {
    read_trim(p)?.parse().ok()
}

/// Drivers that implement the netdev queue-management ops io_uring zero-copy receive
/// needs (with header/data split and flow steering) as of Linux 6.18.
const ZCRX_DRIVERS: [&str; 4] = ["bnxt_en", "gve", "mlx5_core", "fbnic"];
/// Drivers (as this module names them) without queue-management ops, which refuse a
/// zero-copy registration before touching any queue: asking the kernel is harmless.
const NO_QUEUE_OPS: [&str; 13] = [
    "loopback",
    "virtual",
    "virtio_net",
    "veth",
    "ifb",
    "dummy",
    "bridge",
    "tun",
    "vxlan",
    "macvlan",
    "ipvlan",
    "wireguard",
    "bonding",
];

pub fn probe(probe_xdp: bool) -> DoctorReport {
    // Interfaces of this process's network namespace (if_nameindex follows it; sysfs
    // shows the namespace it was mounted in, so it is only trusted when indexes agree).
    let mut interfaces = Vec::new();
    if let Ok(list) = nix::net::if_::if_nameindex() {
        let mut found: Vec<(u32, String)> = list
            .iter()
            .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
            .collect();
        found.sort();
        for (index, name) in found {
            interfaces.push(interface(&name, index, probe_xdp));
        }
    }
    DoctorReport {
        kernel: Kernel {
            release: read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            bpf_jit: read_u32("/proc/sys/net/core/bpf_jit_enable"),
            bpf_stats_sysctl: read_u32("/proc/sys/kernel/bpf_stats_enabled"),
        },
        bpffs_mounted: fs::read_to_string("/proc/mounts").is_ok_and(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
            })
        }),
        io_uring: io_uring(),
        cpus: cpus(),
        congestion: congestion(),
        open_files: open_files(),
        interfaces,
    }
}

fn congestion() -> Congestion {
    use crate::tcp::local;
    let system = local::system_congestion();
    Congestion {
        pacing_note: system.as_deref().and_then(pacing_note),
        available: local::available_congestion().unwrap_or_default(),
        system,
    }
}

/// BBR (every version) paces each connection; on a connection within this host that
/// only costs timers (measured: eight streams through loopback 14–21 Gbit/s paced
/// against 19–20 with reno to the upstream, README: congestion control).
fn pacing_note(system: &str) -> Option<String> {
    system.starts_with("bbr").then(|| {
        format!(
            "{system} paces every connection; edgeproxy's sockets to peers on this host run tcp.local_congestion (default reno) instead"
        )
    })
}

fn cpus() -> Cpus {
    let virtualized = fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
    });
    let idle_driver = read_trim("/sys/devices/system/cpu/cpuidle/current_driver");
    let guest_halt_poll_ns = read_trim("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .and_then(|v| v.parse().ok());
    Cpus {
        online: read_trim("/sys/devices/system/cpu/online").unwrap_or_default(),
        count: crate::cpus::quota(),
        allowed: crate::cpus::list(&crate::cpus::allowed()),
        virtualized,
        busy_poll_advice: busy_poll_advice(virtualized, idle_driver.as_deref(), guest_halt_poll_ns),
        idle_driver,
        guest_halt_poll_ns,
    }
}

/// Busy polling pays where waking a sleeping worker is dear: a guest whose idle CPUs
/// halt, so that each wake-up is an exit to the hypervisor (measured here: one stream
/// 1.10–1.17× with `busy_poll_usec = 200` before bulk transfers polled by default; at
/// 1,000 round trips a second, p50 152 against 190 µs). A guest that polls before halting
/// (haltpoll with a poll time) and bare metal wake cheaply.
fn busy_poll_advice(
    virtualized: bool,
    idle_driver: Option<&str>,
    guest_halt_poll_ns: Option<u64>,
) -> Option<String> {
    if !virtualized {
        return None;
    }
    let why = match (idle_driver, guest_halt_poll_ns) {
        (Some("haltpoll"), Some(0)) => "haltpoll with guest_halt_poll_ns=0",
        (Some("haltpoll"), _) => return None,
        _ => "no idle driver polls before halting",
    };
    Some(format!(
        "a virtual machine whose idle CPUs halt at once ({why}): every wake-up of a sleeping TCP worker is an exit to the hypervisor; bulk transfers poll already ([tcp] bulk_poll_usec), and busy_poll_usec = 200 trades CPU for latency under light traffic too (README: busy polling)"
    ))
}

fn io_uring() -> IoUring {
    use io_uring::{IoUring as Ring, Probe, opcode};
    let mut caps = IoUring {
        disabled_sysctl: read_u32("/proc/sys/kernel/io_uring_disabled"),
        setup: Ok(()),
        single_issuer: false,
        defer_taskrun: false,
        coop_taskrun: false,
        fast_poll: false,
        opcodes: Vec::new(),
        multishot_recv_by_kernel_version: kernel_at_least(6, 0),
        buffer_rings: Err("not probed".into()),
        tcp_forwarding: crate::tcp::ops::uring::unavailable().map_or(Ok(()), Err),
    };
    let ring: Ring = match Ring::new(8) {
        Ok(r) => r,
        Err(e) => {
            caps.setup = Err(e.to_string());
            return caps;
        }
    };
    caps.fast_poll = ring.params().is_feature_fast_poll();
    caps.single_issuer = Ring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_single_issuer()
        .build(8)
        .is_ok();
    caps.defer_taskrun = Ring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
        .is_ok();
    caps.coop_taskrun = Ring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_coop_taskrun()
        .build(8)
        .is_ok();
    let mut probe = Probe::new();
    if ring.submitter().register_probe(&mut probe).is_ok() {
        caps.opcodes = vec![
            ("recv", probe.is_supported(opcode::RecvMulti::CODE)),
            ("recvmsg", probe.is_supported(opcode::RecvMsgMulti::CODE)),
            ("send_zc", probe.is_supported(opcode::SendZc::CODE)),
            ("splice", probe.is_supported(opcode::Splice::CODE)),
            (
                "provide_buffers",
                probe.is_supported(opcode::ProvideBuffers::CODE),
            ),
            ("recv_zc", probe.is_supported(opcode::RecvZc::CODE)),
        ];
    }
    caps.buffer_rings = buffer_ring_probe(&ring);
    caps
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = read_trim("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
}

/// Registers (then unregisters) a one-page provided-buffer ring.
pub(crate) fn buffer_ring_probe(ring: &io_uring::IoUring) -> Result<(), String> {
    let bufs = crate::engine::uring::BufRing::empty(8, 64).map_err(|e| e.to_string())?;
    // SAFETY: the ring region is page-aligned, holds 8 entries, and stays mapped until
    // it is unregistered right below (`bufs` drops after).
    let r = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(bufs.ring_addr(), 8, 7, 0)
    }
    .map_err(|e| e.to_string());
    if r.is_ok() {
        let _ = ring.submitter().unregister_buf_ring(7);
    }
    r
}

/// Whether io_uring zero-copy receive could serve interface `name` (of this process's
/// network namespace), with the reason: judged by its driver, and where that says no,
/// by the kernel's answer to a registration.
pub fn zero_copy_receive_on(name: &str) -> (bool, String) {
    let index = nix::net::if_::if_nametoindex(name).unwrap_or(0);
    interface(name, index, false).zero_copy_receive
}

fn interface(name: &str, index: u32, probe_xdp: bool) -> Interface {
    let base = Path::new("/sys/class/net").join(name);
    let sysfs_is_ours = read_u32(base.join("ifindex")) == Some(index);
    // sysfs shows the namespace it was mounted in; ethtool answers for ours.
    let driver = if !sysfs_is_ours {
        Some(match ethtool_driver(name) {
            Some(d) if d == "veth" => "virtual (veth or similar)".to_owned(),
            Some(d) => d,
            None if name == "lo" => "loopback".to_owned(),
            None => "unknown (sysfs shows another network namespace)".to_owned(),
        })
    } else {
        None
    };
    let driver = driver.unwrap_or_else(|| {
        fs::read_link(base.join("device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .unwrap_or_else(|| {
                if name == "lo" {
                    "loopback".into()
                } else if base.join("veth").exists()
                    || read_trim(base.join("iflink")) != read_trim(base.join("ifindex"))
                {
                    "virtual (veth or similar)".into()
                } else {
                    "virtual".into()
                }
            })
    });
    let zero_copy_receive =
        zero_copy_judgement(&driver, || crate::tcp::ops::zcrx::register_probe(index));
    let (xdp_native, xdp_generic) = if probe_xdp {
        xdp_probe(name)
    } else {
        (None, None)
    };
    Interface {
        name: name.to_owned(),
        driver,
        mtu: sysfs_is_ours.then(|| read_u32(base.join("mtu"))).flatten(),
        operstate: if sysfs_is_ours {
            read_trim(base.join("operstate")).unwrap_or_default()
        } else {
            "unknown".into()
        },
        xdp_native,
        xdp_generic,
        zero_copy_receive,
    }
}

/// The driver of interface `name` as ethtool reports it (`ETHTOOL_GDRVINFO`), answered
/// for this process's network namespace.
fn ethtool_driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 3;
    /// `struct ethtool_drvinfo` (kernel ABI).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    // SAFETY: plain-data C struct; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return None;
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: a fresh socket, closed on drop.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just opened and is owned here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL with an ifreq naming the interface and pointing at a drvinfo
    // buffer of the size the kernel writes; both live across the call.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            SIOCETHTOOL,
            &raw mut ifr,
        )
    };
    if r < 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    let d = String::from_utf8_lossy(&info.driver[..end]).into_owned();
    (!d.is_empty()).then_some(d)
}

/// Whether zero-copy receive could work with `driver`, and why: known capable drivers
/// yes (not asked: a registration restarts a queue); drivers known to lack the ops are
/// asked of the kernel (`ask_kernel`, which refuses them before touching anything);
/// other drivers are not asked.
fn zero_copy_judgement(
    driver: &str,
    ask_kernel: impl FnOnce() -> std::io::Result<()>,
) -> (bool, String) {
    if ZCRX_DRIVERS.contains(&driver) {
        // Not asked of the kernel here: registering takes over (restarts) an rx queue.
        (
            true,
            format!(
                "driver {driver} implements queue management (needs header/data split and flow steering configured; cannot share the device with XDP: use --hook tc)"
            ),
        )
    } else if !NO_QUEUE_OPS.iter().any(|d| driver.starts_with(d)) {
        // A physical driver we do not know: a registration could take over (restart) its
        // rx queue 0 if it can after all, so the kernel is not asked here.
        (
            false,
            format!(
                "driver {driver} is not known to implement the queue-management ops zero-copy receive needs (known: {}); not asked of the kernel, since a registration restarts a queue where it succeeds: try [tcp] zero_copy = \"auto\"",
                ZCRX_DRIVERS.join(", ")
            ),
        )
    } else {
        // Asking the kernel is harmless where the driver cannot do it: it refuses before
        // touching a queue. Its answer is the reason shown.
        let kernel = match ask_kernel() {
            Ok(()) => "the kernel accepted a zero-copy queue anyway (released again)".to_owned(),
            Err(e) => format!("the kernel refused a zero-copy queue on rx queue 0: {e}"),
        };
        (
            false,
            format!(
                "{kernel}; driver {driver} lacks the queue-management ops zero-copy receive needs (supported: {})",
                ZCRX_DRIVERS.join(", ")
            ),
        )
    }
}

/// Attaches the benchmark floor (XDP_PASS, touches nothing) natively, then generically,
/// detaching each at once. Some drivers reset the link when an XDP program is attached,
/// which is why this runs only on request.
fn xdp_probe(name: &str) -> (ProbeResult, ProbeResult) {
    use aya::programs::{Xdp, XdpMode};
    let mut ebpf = match aya::Ebpf::load(crate::dataplane::object_bytes()) {
        Ok(e) => e,
        Err(e) => return (Some(Err(e.to_string())), Some(Err(e.to_string()))),
    };
    let Some(Ok(prog)) = ebpf
        .program_mut(proxy_common::FLOOR_XDP_PROGRAM)
        .map(<&mut Xdp>::try_from)
    else {
        return (Some(Err("no floor program".into())), None);
    };
    if let Err(e) = prog.load() {
        return (Some(Err(e.to_string())), None);
    }
    let Ok(cname) = std::ffi::CString::new(name) else {
        return (None, None);
    };
    let mut attempt = |mode| match prog.attach(&cname, mode) {
        Ok(id) => {
            let _ = prog.detach(id);
            Ok(())
        }
        Err(e) => Err(crate::dataplane::error_chain(&e)),
    };
    (Some(attempt(XdpMode::Driver)), Some(attempt(XdpMode::Skb)))
}

impl DoctorReport {
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let yes = |b: bool| if b { "yes" } else { "no" };
        let res = |r: &Result<(), String>| match r {
            Ok(()) => "yes".to_owned(),
            Err(e) => format!("no ({e})"),
        };
        let mut s = String::new();
        let k = &self.kernel;
        let _ = writeln!(
            s,
            "kernel       {} ; BTF {} ; BPF JIT {} ; bpffs mounted {}",
            k.release,
            yes(k.btf),
            k.bpf_jit.map_or("?".into(), |v| v.to_string()),
            yes(self.bpffs_mounted)
        );
        let u = &self.io_uring;
        let _ = writeln!(
            s,
            "io_uring     setup {} ; io_uring_disabled={} ; SINGLE_ISSUER {} ; DEFER_TASKRUN {} ; COOP_TASKRUN {} ; fast poll {} ; buffer rings {}",
            res(&u.setup),
            u.disabled_sysctl.map_or("?".into(), |v| v.to_string()),
            yes(u.single_issuer),
            yes(u.defer_taskrun),
            yes(u.coop_taskrun),
            yes(u.fast_poll),
            res(&u.buffer_rings)
        );
        let ops: Vec<String> = u
            .opcodes
            .iter()
            .map(|(n, ok)| format!("{n} {}", yes(*ok)))
            .collect();
        let _ = writeln!(
            s,
            "             opcodes: {} ; multishot receive {} (by kernel version)",
            ops.join(" ; "),
            yes(u.multishot_recv_by_kernel_version)
        );
        let _ = writeln!(
            s,
            "tcp engine   {}",
            match &u.tcp_forwarding {
                Ok(()) => "io_uring (every operation the TCP worker needs is supported)".to_owned(),
                Err(why) => format!("epoll, because {why}"),
            }
        );
        let _ = writeln!(
            s,
            "cpus         {} online, this process may use {} ({} usable)",
            self.cpus.online, self.cpus.allowed, self.cpus.count
        );
        let c = &self.cpus;
        let _ = writeln!(
            s,
            "cpu idle     virtualized {} ; idle driver {} ; guest_halt_poll_ns {}{}",
            yes(c.virtualized),
            c.idle_driver.as_deref().unwrap_or("none"),
            c.guest_halt_poll_ns.map_or("-".into(), |v| v.to_string()),
            c.busy_poll_advice
                .as_ref()
                .map_or(String::new(), |a| format!("\n             {a}"))
        );
        let f = &self.open_files;
        let _ = writeln!(
            s,
            "open files   limit {} (hard {}); daemons raise it to the hard limit at start: room for {} proxied connections ({} descriptors each), more are refused and counted as fd_limit",
            f.soft,
            f.hard,
            f.connection_capacity,
            crate::limits::FDS_PER_CONNECTION
        );
        let cc = &self.congestion;
        let _ = writeln!(
            s,
            "tcp cc       system {} ; available {}{}",
            cc.system.as_deref().unwrap_or("?"),
            cc.available.join(" "),
            cc.pacing_note
                .as_ref()
                .map_or(String::new(), |n| format!("\n             {n}"))
        );
        for i in &self.interfaces {
            let xdp = match (&i.xdp_native, &i.xdp_generic) {
                (Some(n), Some(g)) => format!("XDP native {} ; generic {}", res(n), res(g)),
                _ => "XDP not probed (--probe-xdp)".into(),
            };
            let _ = writeln!(
                s,
                "iface {:<8} driver {} ; mtu {} ; {} ; {} ; zero-copy receive {} ({})",
                i.name,
                i.driver,
                i.mtu.map_or("?".into(), |m| m.to_string()),
                i.operstate,
                xdp,
                yes(i.zero_copy_receive.0),
                i.zero_copy_receive.1
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_is_noted_for_bbr_only() {
        assert!(pacing_note("bbr").is_some_and(|n| n.contains("local_congestion")));
        assert!(pacing_note("bbr3").is_some());
        assert_eq!(pacing_note("cubic"), None);
        assert_eq!(pacing_note("reno"), None);
    }

    #[test]
    fn busy_polling_is_advised_only_where_idle_guest_cpus_halt_at_once() {
        assert_eq!(busy_poll_advice(false, None, None), None, "bare metal");
        assert_eq!(busy_poll_advice(false, Some("haltpoll"), Some(0)), None);
        assert_eq!(
            busy_poll_advice(true, Some("haltpoll"), Some(200_000)),
            None,
            "a guest that polls before halting wakes cheaply"
        );
        let a = busy_poll_advice(true, Some("haltpoll"), Some(0)).expect("advised");
        assert!(
            a.contains("guest_halt_poll_ns=0") && a.contains("busy_poll_usec"),
            "{a}"
        );
        for driver in [None, Some("acpi_idle")] {
            let a = busy_poll_advice(true, driver, None).expect("advised");
            assert!(a.contains("no idle driver polls"), "{a}");
        }
    }

    #[test]
    fn the_kernel_is_asked_about_zero_copy_only_for_drivers_that_cannot_do_it() {
        let never = || -> std::io::Result<()> { panic!("the kernel was asked") };
        let (ok, why) = zero_copy_judgement("mlx5_core", never);
        assert!(ok, "{why}");
        let (ok, why) = zero_copy_judgement("ixgbe", never);
        assert!(!ok && why.contains("not asked of the kernel"), "{why}");
        let (ok, why) =
            zero_copy_judgement("unknown (sysfs shows another network namespace)", never);
        assert!(!ok && why.contains("not asked"), "{why}");
        let refused = || Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        for d in ["loopback", "virtio_net", "virtual (veth or similar)"] {
            let (ok, why) = zero_copy_judgement(d, refused);
            assert!(!ok && why.contains("os error 95"), "{d}: {why}");
        }
    }
}

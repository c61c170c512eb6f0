//! Network namespaces and veth pairs for tests.
//!
//! Names are unique per process and per call (`ept<pid>x<n>`), so tests run in parallel.
//! Dropping a [`Netns`] deletes it, which also destroys the veth ends inside it; drop
//! runs during unwinding, so a failing test cleans up too. A process killed outright
//! cannot run drop: the first namespace a later process creates sweeps away every
//! `ept…` namespace whose owning pid no longer exists.
use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::Context as _;
use nix::sched::{CloneFlags, setns};

use crate::tools::{self, require_iproute2};

const PREFIX: &str = "ept";
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by this test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create() -> anyhow::Result<Self> {
        require_iproute2()?;
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}x{n}", std::process::id());
        tools::run("ip", ["netns", "add", &name])?;
        let ns = Self { name };
        tools::run("ip", ["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread that has entered this namespace (network namespaces are per
    /// thread, so the rest of the process is unaffected). Panics propagate.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A command whose process starts inside this network namespace. Unlike
    /// `ip netns exec`, only the network namespace changes: `ip netns exec` also makes a
    /// new mount namespace with a fresh /sys, which hides bpffs at /sys/fs/bpf.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.wrap(Command::new(program))
    }

    /// `cmd`, made to start inside this network namespace (see [`Netns::command`]).
    pub fn wrap(&self, mut cmd: Command) -> Command {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
        // which is async-signal-safe; `file` is moved in and outlives the call.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = tools::run("ip", ["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

/// Deletes `ept<pid>x<n>` namespaces whose process is gone (killed test runs).
fn sweep_stale() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('x').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = tools::run("ip", ["netns", "del", &name]);
            }
        }
    });
}

/// Two namespaces joined by a veth pair with IPv4 and IPv6 addresses:
/// `a` (`epa`, 10.200.S.1, fd00:200:0:S::1) ↔ `b` (`epb`, 10.200.S.2, fd00:200:0:S::2).
#[derive(Debug)]
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
    pub a_if: &'static str,
    pub b_if: &'static str,
    pub a_v4: Ipv4Addr,
    pub b_v4: Ipv4Addr,
    pub a_v6: Ipv6Addr,
    pub b_v6: Ipv6Addr,
    /// Fixed, locally administered MACs so crafted frames (trafgen) can address them.
    pub a_mac: [u8; 6],
    pub b_mac: [u8; 6],
}

/// `aa:bb:…` for `ip link set … address` and trafgen.
pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl VethPair {
    /// Packets the two veth devices dropped (rx_dropped + tx_dropped on both ends, from
    /// `ip -j -s link`): a full veth ring drops before XDP or any socket sees a packet.
    pub fn device_drops(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for (ns, dev) in [(&self.a, self.a_if), (&self.b, self.b_if)] {
            let out = tools::run(
                "ip",
                ["-n", ns.name(), "-j", "-s", "link", "show", "dev", dev],
            )?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let s = &v[0]["stats64"];
            total +=
                s["rx"]["dropped"].as_u64().unwrap_or(0) + s["tx"]["dropped"].as_u64().unwrap_or(0);
        }
        Ok(total)
    }

    pub fn create() -> anyhow::Result<Self> {
        let a = Netns::create()?;
        let b = Netns::create()?;
        // One /24 per pair keeps addresses readable in captures; namespaces isolate them anyway.
        let s = (NEXT.load(Ordering::Relaxed) % 250 + 1) as u8;
        let pair = Self {
            a,
            b,
            a_if: "epa",
            b_if: "epb",
            a_v4: Ipv4Addr::new(10, 200, s, 1),
            b_v4: Ipv4Addr::new(10, 200, s, 2),
            a_v6: Ipv6Addr::new(0xfd00, 0x200, 0, u16::from(s), 0, 0, 0, 1),
            b_v6: Ipv6Addr::new(0xfd00, 0x200, 0, u16::from(s), 0, 0, 0, 2),
            a_mac: [0x02, 0xe9, 0, 0, s, 1],
            b_mac: [0x02, 0xe9, 0, 0, s, 2],
        };
        // Created directly inside the namespaces: no name ever appears in the host's.
        tools::run(
            "ip",
            [
                "link",
                "add",
                pair.a_if,
                "netns",
                pair.a.name(),
                "type",
                "veth",
                "peer",
                "name",
                pair.b_if,
                "netns",
                pair.b.name(),
            ],
        )
        .context("creating the veth pair")?;
        for (ns, ifname, v4, v6, mac) in [
            (&pair.a, pair.a_if, pair.a_v4, pair.a_v6, pair.a_mac),
            (&pair.b, pair.b_if, pair.b_v4, pair.b_v6, pair.b_mac),
        ] {
            let n = ns.name();
            tools::run(
                "ip",
                ["-n", n, "link", "set", ifname, "address", &mac_string(&mac)],
            )?;
            tools::run(
                "ip",
                ["-n", n, "addr", "add", &format!("{v4}/24"), "dev", ifname],
            )?;
            tools::run(
                "ip",
                [
                    "-n",
                    n,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    ifname,
                    "nodad",
                ],
            )?;
            tools::run("ip", ["-n", n, "link", "set", ifname, "up"])?;
        }
        Ok(pair)
    }
}

/// Namespaces this process created that still exist (for leak checks).
pub fn live_namespaces_of_this_process() -> Vec<String> {
    let prefix = format!("{PREFIX}{}x", std::process::id());
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

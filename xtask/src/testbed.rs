//! `cargo xtask demo` and `cargo xtask bench`: build in release, then run one of the
//! testbed's drivers (tests/src/bin/), which own the topology, traffic and reporting.
use crate::{
    bootstrap::{self, Needs},
    cmd::{Cmd, cargo},
    test::TEST_TOOLS,
};

/// The bench also compares against peers and drives trafgen.
const BENCH_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("xdp-filter", "xdp-tools"),
    ("nft", "nftables"),
    ("trafgen", "netsniff-ng"),
];

/// A driver binary of the `edgeproxy-testbed` crate.
#[derive(Clone, Copy)]
pub enum Driver {
    Demo,
    Bench,
}

impl Driver {
    const fn bin(self) -> &'static str {
        match self {
            Driver::Demo => "demo",
            Driver::Bench => "bench",
        }
    }
}

pub fn run(driver: Driver, args: &[String]) -> anyhow::Result<()> {
    let tc = bootstrap::run(&Needs {
        privileged: true,
        apt: match driver {
            Driver::Demo => TEST_TOOLS,
            Driver::Bench => BENCH_TOOLS,
        },
    })?;
    cargo(
        &tc.user,
        [
            "build",
            "--locked",
            "--release",
            "--bins",
            "-p",
            "proxy-user",
            "-p",
            "edgeproxy-testbed",
        ],
    )
    .say(format!(
        "build edgeproxy and the {} driver (release)",
        driver.bin()
    ))
    .run()?;
    let bin = crate::root().join("target/release").join(driver.bin());
    let peers = crate::root().join("target/peers");
    let wants_peers = args.is_empty()
        || args
            .iter()
            .any(|a| matches!(a.as_str(), "logs" | "logs-peers" | "tcp"));
    if matches!(driver, Driver::Bench) && wants_peers {
        bootstrap::ensure_peers(&peers)?;
    }
    Cmd::new(bin, args)
        .env("EDGEPROXY_PEERS", &peers)
        .say(format!("run the {}", driver.bin()))
        .run()
}

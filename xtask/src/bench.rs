//! `cargo xtask bench [SUITE]`: build in release, then run the testbed's benchmark
//! driver, which measures every figure against a baseline in the same run.
use crate::{
    bootstrap::{self, Needs},
    cmd::{Cmd, cargo},
    test::TEST_TOOLS,
};

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let tc = bootstrap::run(&Needs {
        privileged: true,
        apt: TEST_TOOLS,
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
    .say("build edgeproxy and the benchmark driver (release)")
    .run()?;
    let bin = crate::root().join("target/release/bench");
    Cmd::new(bin, args).say("run the benchmarks").run()
}

//! `cargo xtask demo`: build, then run the testbed's demo driver (namespace topology,
//! edgeproxy attached, traffic, report, clean-up).
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
    .say("build edgeproxy and the demo driver (release)")
    .run()?;
    let bin = crate::root().join("target/release/demo");
    Cmd::new(bin, args).say("run the demo").run()
}

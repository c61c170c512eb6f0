//! BPF_PROG_TEST_RUN: run a loaded XDP program on a packet buffer in the kernel, with
//! no network, and read back the verdict, the output packet and the time per run.
use std::fmt;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};

use super::DataplaneError;

/// Largest output the kernel may hand back (an XDP test frame is at most a page).
const MAX_OUT: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpVerdict {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Unknown(u32),
}

impl XdpVerdict {
    pub const fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::Aborted,
            1 => Self::Drop,
            2 => Self::Pass,
            3 => Self::Tx,
            4 => Self::Redirect,
            other => Self::Unknown(other),
        }
    }
}

impl fmt::Display for XdpVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Aborted => f.write_str("XDP_ABORTED"),
            Self::Drop => f.write_str("XDP_DROP"),
            Self::Pass => f.write_str("XDP_PASS"),
            Self::Tx => f.write_str("XDP_TX"),
            Self::Redirect => f.write_str("XDP_REDIRECT"),
            Self::Unknown(v) => write!(f, "unknown({v})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutcome {
    pub verdict: XdpVerdict,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Mean kernel time per run, as measured by the kernel around the program.
    pub mean_ns: u64,
}

/// The program a runner drives: XDP, or the TC twin whose return codes are translated
/// into XDP terms (TC_ACT_OK → pass, TC_ACT_SHOT → drop).
pub(super) enum Prog<'a> {
    Xdp(&'a Xdp),
    Tc(&'a SchedClassifier),
}

pub struct XdpTestRunner<'a> {
    prog: Prog<'a>,
    name: &'static str,
}

impl<'a> XdpTestRunner<'a> {
    pub(super) fn new(prog: Prog<'a>, name: &'static str) -> Self {
        Self { prog, name }
    }

    /// Runs the program `repeat` times (at least once) on `packet`. The kernel rejects
    /// packets shorter than an Ethernet header (14 bytes) with EINVAL.
    pub fn run(&self, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, DataplaneError> {
        let mut out = vec![0u8; MAX_OUT];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        };
        let res: TestRunResult = match self.prog {
            Prog::Xdp(p) => p.test_run(opts),
            Prog::Tc(p) => p.test_run(opts),
        }
        .map_err(|source| DataplaneError::Program {
            name: self.name,
            source,
        })?;
        out.truncate((res.data_size_out as usize).min(MAX_OUT));
        let verdict = match self.prog {
            Prog::Xdp(_) => XdpVerdict::from_u32(res.return_value),
            Prog::Tc(_) => match res.return_value {
                0 => XdpVerdict::Pass,
                2 => XdpVerdict::Drop,
                other => XdpVerdict::Unknown(other),
            },
        };
        Ok(TestRunOutcome {
            verdict,
            packet: out,
            mean_ns: u64::try_from(res.duration.as_nanos()).unwrap_or(u64::MAX),
        })
    }
}

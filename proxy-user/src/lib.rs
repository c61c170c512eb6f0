//! edgeproxy userspace: loads and drives the XDP data plane and reports what it sees.
//!
//! - [`dataplane`]: load the eBPF object, attach it, read counters, drain the packet
//!   record ring buffer, run the program on crafted packets (BPF_PROG_TEST_RUN).
//! - [`report`]: counter tables and JSON for operators.
//! - [`telemetry`]: `tracing` set-up, including eBPF log lines from aya-log.
pub mod admin;
pub mod cli;
pub mod config;
pub mod cpus;
pub mod daemon;
pub mod dataplane;
pub mod diagnostics;
pub mod doctor;
pub mod engine;
pub mod fsmode;
pub mod limits;
pub mod logs;
pub(crate) mod mapping;
pub mod policy;
pub mod privileges;
pub mod report;
pub mod tcp;
pub mod telemetry;

//! Operator policy: read a file, bounded ([`file`]), parse and validate ([`parse`]),
//! compile to map contents ([`compile`]), evaluate the way the data plane must
//! ([`reference`]), and load into the inactive slot with one atomic flip ([`loader`]).
pub mod compile;
pub mod file;
pub mod loader;
pub mod model;
pub mod parse;
pub mod prefix;
pub mod reference;
mod scan;

pub use file::{MAX_POLICY_BYTES, PolicyFileError, read_policy_file};
pub use model::{Action, Policy, PortRange, Rate, Rule};
pub use parse::{PolicyError, PolicyLimits, parse_policy, parse_stored_policy};
pub use prefix::Prefix;

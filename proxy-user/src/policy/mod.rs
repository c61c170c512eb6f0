//! Operator policy: parse and validate ([`parse`]), compile to map contents
//! ([`compile`]), evaluate the way the data plane must ([`reference`]), and load into
//! the inactive slot with one atomic flip ([`loader`]).
pub mod compile;
pub mod loader;
pub mod model;
pub mod parse;
pub mod prefix;
pub mod reference;

pub use model::{Action, Policy, PortRange, Rate, Rule};
pub use parse::{PolicyError, PolicyLimits, parse_policy};
pub use prefix::Prefix;

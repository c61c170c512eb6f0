//! The log pipeline. Today: framing ([`framing`]), decoding ([`decode`]) and window
//! aggregation ([`aggregate`]) of log
//! datagrams, zero-copy; aggregation, sinks and the io_uring receive path follow.
pub mod aggregate;
pub mod decode;
pub mod encode;
pub mod framing;
pub mod pipeline;
pub mod sinks;
pub mod time;

#[cfg(test)]
mod tests;

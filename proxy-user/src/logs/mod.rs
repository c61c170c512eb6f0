//! The log pipeline. Today: framing ([`framing`]) and decoding ([`decode`]) of log
//! datagrams, zero-copy; aggregation, sinks and the io_uring receive path follow.
pub mod decode;
pub mod framing;
pub mod time;

#[cfg(test)]
mod tests;

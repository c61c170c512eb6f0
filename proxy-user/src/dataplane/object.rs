//! The eBPF object, built by build.rs with the pinned nightly and embedded so the
//! binary is self-contained.

/// Bytes of the compiled proxy-ebpf ELF object, aligned as aya requires.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

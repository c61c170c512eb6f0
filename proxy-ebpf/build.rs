//! Linking this crate needs the `bpf-linker` binary, which cargo cannot track as a
//! dependency: rebuild when the binary on PATH changes.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

// Rebuild the eBPF object when the linker changes: bpf-linker is what turns the
// crate into the object the loader embeds.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}

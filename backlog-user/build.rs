// Builds the eBPF object (nightly, bpfel-unknown-none, bpf-linker) into OUT_DIR,
// where kernel/mod.rs embeds it.
//
// Without the `ebpf` feature (the library alone, as tests/ and xtask use it) or with
// AYA_BUILD_SKIP=1 it skips that (for working on the pure user-space parts without the
// BPF toolchain); an empty object is left in its place and the tracer then refuses to
// start with a line saying so.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        || std::env::var_os("CARGO_FEATURE_EBPF").is_none();
    if skip {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("backlog");
        std::fs::write(out, [])?;
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "backlog-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../backlog-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

//! Builds the eBPF programs (crates/ebpf-programs) for bpfel-unknown-none with aya-build, so
//! `include_bytes!` in src/ebpf embeds them. Needs bpf-linker 0.10.4 and the rust-src
//! component (`make deps` installs both). The BPF build alone gets `RUSTC_BOOTSTRAP=1`, which
//! `-Z build-std=core` needs on a stable toolchain: it is set in this build script's own
//! environment, which only the nested cargo inherits.

use std::path::PathBuf;

fn main() {
    if let Err(e) = build() {
        // A failure here names what is missing instead of a bare "build script failed".
        eprintln!("svcplane-dataplane: building the eBPF programs failed: {e:#}");
        eprintln!("  (bpf-linker 0.10.4 and rust-src are needed: run `make deps`)");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let programs = manifest.join("../ebpf-programs");
    let programs = programs.canonicalize()?;
    let root_dir = programs
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", programs.display()))?;
    // bpf-linker lives in cargo's bin directory, which a non-login CI shell may not have on PATH.
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        let bin = home.join("bin");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        if !dirs.contains(&bin) {
            dirs.push(bin);
            // SAFETY: single-threaded build script, before any thread is spawned.
            unsafe { std::env::set_var("PATH", std::env::join_paths(dirs)?) };
        }
    }
    // SAFETY: as above. Scoped: only this build script and the cargo it spawns see it.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    // The toolchain building svcplane builds the programs too (stable 1.95 + rust-src).
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "svcplane-ebpf-programs",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

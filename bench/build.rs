//! Embeds the reference programs built by `cargo xtask bench` (bench-ebpf's
//! objects in target/bpfel-unknown-none/release, or INBOUND_BENCH_EBPF_DIR).
//!
//! Without them (a plain `cargo build -p bench`, clippy) empty objects are
//! embedded and the overhead measurement refuses to run, saying how to build.

use std::{env, fs, path::PathBuf};

/// bench-ebpf's binaries, one per reference (see src/reference.rs).
const OBJECTS: [&str; 4] = [
    "ref-floor",
    "ref-lpm-counter",
    "ref-hash-counter",
    "ref-lpm-events",
];

fn main() {
    println!("cargo:rerun-if-env-changed=INBOUND_BENCH_EBPF_DIR");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = env::var_os("INBOUND_BENCH_EBPF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
                        .join("../target")
                });
            target.join("bpfel-unknown-none/release")
        });
    for name in OBJECTS {
        let object = dir.join(name);
        let embedded = out.join(format!("{name}.o"));
        // Watching a missing file makes cargo rerun this script until it appears.
        println!("cargo:rerun-if-changed={}", object.display());
        if object.exists() {
            fs::copy(&object, &embedded)
                .unwrap_or_else(|e| panic!("copying eBPF object {}: {e}", object.display()));
        } else {
            fs::write(&embedded, b"").expect("writing empty eBPF placeholder");
        }
    }
}

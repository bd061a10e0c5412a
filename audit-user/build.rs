//! Embeds the kernel program built by `cargo xtask build`
//! (target/bpfel-unknown-none/release/audit-ebpf, or INBOUND_AUDIT_EBPF_OBJECT).
//!
//! Without it (a plain `cargo build` before any xtask build, clippy in CI) an
//! empty object is embedded and the agent refuses to start, saying how to build.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=INBOUND_AUDIT_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("audit-ebpf.o");
    let object = env::var_os("INBOUND_AUDIT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
                        .join("../target")
                });
            target.join("bpfel-unknown-none/release/audit-ebpf")
        });
    // Watching a missing file makes cargo rerun this script until it appears.
    println!("cargo:rerun-if-changed={}", object.display());
    if object.exists() {
        fs::copy(&object, &out)
            .unwrap_or_else(|e| panic!("copying eBPF object {}: {e}", object.display()));
    } else {
        fs::write(&out, b"").expect("writing empty eBPF placeholder");
    }
}

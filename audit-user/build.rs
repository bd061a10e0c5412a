//! Embeds the kernel program built by `cargo xtask build`
//! (target/bpfel-unknown-none/release/audit-ebpf, or INBOUND_AUDIT_EBPF_OBJECT),
//! and the git commit that `--version` prints.
//!
//! Without it (a plain `cargo build` before any xtask build, clippy in CI) an
//! empty object is embedded and the agent refuses to start, saying how to build.

use std::{env, fs, path::PathBuf, process::Command};

/// `VERSION (commit abc1234)`; a build outside git (a source tarball) says so
/// instead of failing, and INBOUND_AUDIT_GIT_COMMIT can name the commit there.
fn version_with_commit() -> String {
    let version = env::var("CARGO_PKG_VERSION").expect("cargo sets it");
    let commit = env::var("INBOUND_AUDIT_GIT_COMMIT").ok().or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    });
    match commit {
        Some(commit) => format!("{version} (commit {commit})"),
        None => format!("{version} (commit unknown: not built from git)"),
    }
}

/// Reruns this script when HEAD moves (a commit or a checkout), so the
/// embedded commit follows it. In a worktree HEAD and the branch refs live in
/// different directories, hence both.
fn watch_git_head() {
    let Some(out) = Command::new("git")
        .args([
            "rev-parse",
            "--path-format=absolute",
            "--git-dir",
            "--git-common-dir",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let dirs: Vec<PathBuf> = text.lines().map(PathBuf::from).collect();
    let Some(git_dir) = dirs.first() else {
        return;
    };
    let head = git_dir.join("HEAD");
    println!("cargo:rerun-if-changed={}", head.display());
    let reference = fs::read_to_string(&head).unwrap_or_default();
    if let Some(reference) = reference.trim().strip_prefix("ref: ") {
        for dir in &dirs {
            let path = dir.join(reference);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
        if let Some(common) = dirs.get(1) {
            println!(
                "cargo:rerun-if-changed={}",
                common.join("packed-refs").display()
            );
        }
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=INBOUND_AUDIT_GIT_COMMIT");
    println!(
        "cargo:rustc-env=INBOUND_AUDIT_VERSION={}",
        version_with_commit()
    );
    watch_git_head();
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

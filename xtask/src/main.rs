//! Build, run, package and test inbound-audit: `cargo xtask build|run|deb|test|lint|bench`.
//!
//! The kernel program (and the bench's reference programs, bench-ebpf) needs a
//! nightly toolchain with rust-src and bpf-linker built against the same LLVM
//! major as rustc; both are set up here on first use (see
//! ../shared/notes/ebpf-toolchain.md for why each step is as it is).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

const NIGHTLY: &str = "nightly";
const BPF_TARGET: &str = "bpfel-unknown-none";
/// The kernel program.
const AUDIT_EBPF: &str = "audit-ebpf";
/// The bench's reference programs, built like the kernel program.
const BENCH_EBPF: &str = "bench-ebpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker must link the LLVM whose major version rustc uses (22 here).
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
const CARGO_DEB_VERSION: &str = "3.8.0";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel program and the release binary target/release/inbound-audit.
    Build,
    /// Build, then run the agent (as root) with the default config; extra args go to `agent`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, then the Debian package target/debian/inbound-audit_<version>_amd64.deb
    /// (cargo-deb, from the release binary), checked with lintian.
    Deb,
    /// Build and package, then run every test: unit, property and the root end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// rustfmt check and clippy with warnings denied.
    Lint,
    /// Build, then run the benchmark suite (as root); writes bench/results/latest.md
    /// and .json. `--quick` is a smoke run; `--only sizes,churn` runs some measurements.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Fuzz the query and policy parsers with libFuzzer (cargo fuzz, nightly).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (query_request, policy_request or cluster_entries).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Build => build(&root).map(|_| ()),
        Task::Run { args } => {
            let binary = build(&root)?;
            require_root("run the agent")?;
            let cgroup = args
                .iter()
                .position(|a| a == "--cgroup")
                .and_then(|i| args.get(i + 1))
                .map(|c| c.to_string_lossy().into_owned());
            // Attaching at the cgroup2 root counts every process on the host:
            // say so, and how to undo it, before doing it.
            println!(
                "the agent attaches to {}; the programs stay attached after it stops: \
                 detach them with `{} cleanup`",
                cgroup
                    .as_deref()
                    .unwrap_or("the cgroup2 root (every process; narrow it with --cgroup DIR)"),
                binary.display()
            );
            let mut command = Command::new(binary);
            command.arg("agent").args(args);
            run(&mut command)
        }
        Task::Deb => deb(&root, &build(&root)?).map(|_| ()),
        Task::Test { args } => {
            ensure_test_packages()?;
            let binary = build(&root)?;
            // The package test (tests/tests/package.rs) installs this one.
            let package = deb(&root, &binary)?;
            let object = ebpf_object(&root);
            let mut command = cargo(&root);
            command
                .args([
                    "test",
                    "--release",
                    "--workspace",
                    "--exclude",
                    "audit-ebpf",
                    // The benchmark suite runs with `cargo xtask bench` only.
                    "--exclude",
                    "bench",
                    "--exclude",
                    "bench-ebpf",
                ])
                .args(args)
                .env("INBOUND_AUDIT_EBPF_OBJECT", &object)
                .env("INBOUND_AUDIT_BIN", &binary)
                .env("INBOUND_AUDIT_DEB", &package);
            if let Some(exim) = ensure_exim(&root) {
                command.env("INBOUND_AUDIT_EXIM", exim);
            }
            run(&mut command)
        }
        Task::Fuzz { seconds, target } => fuzz(&root, seconds, target.as_deref()),
        Task::Bench { args } => {
            let binary = build(&root)?;
            require_root("run the benchmarks")?;
            // The reference programs the bench measures ours against, built
            // the same way; the bench embeds them (bench/build.rs).
            run(&mut nightly_ebpf_cargo(&root, "build", &[BENCH_EBPF])?)
                .context("building the bench's reference programs (bench-ebpf)")?;
            // The runner is its own crate (bench/, not a default member), so
            // `cargo test` never builds it or criterion.
            let mut command = cargo(&root);
            command
                .args(["run", "--release", "--package", "bench", "--bin", "bench"])
                .args(["--", "run", "--agent"])
                .arg(&binary)
                .args(args)
                .env("INBOUND_BENCH_EBPF_DIR", ebpf_release_dir(&root));
            run(&mut command)
        }
        Task::Lint => {
            run(cargo(&root).args(["fmt", "--all", "--", "--check"]))?;
            run(cargo(&root).args([
                "clippy",
                "--workspace",
                "--exclude",
                "audit-ebpf",
                "--exclude",
                "bench-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            let mut ebpf = nightly_ebpf_cargo(&root, "clippy", &[AUDIT_EBPF, BENCH_EBPF])?;
            ebpf.args(["--", "-D", "warnings"]);
            run(&mut ebpf)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Where the eBPF crates' release objects land.
fn ebpf_release_dir(root: &Path) -> PathBuf {
    target_dir(root).join(BPF_TARGET).join("release")
}

fn ebpf_object(root: &Path) -> PathBuf {
    ebpf_release_dir(root).join(AUDIT_EBPF)
}

/// Builds everything; returns the path of the release binary.
fn build(root: &Path) -> Result<PathBuf> {
    run(&mut nightly_ebpf_cargo(root, "build", &[AUDIT_EBPF])?)
        .context("building the kernel program (audit-ebpf)")?;

    let object = ebpf_object(root);
    let mut user = cargo(root);
    user.args(["build", "--release", "--package", "audit-user"])
        .env("INBOUND_AUDIT_EBPF_OBJECT", &object);
    run(&mut user).context("building the agent (audit-user)")?;
    let binary = target_dir(root).join("release/inbound-audit");
    println!(
        "built {} with {} embedded",
        binary.display(),
        object.display()
    );
    Ok(binary)
}

/// `cargo +nightly SUBCOMMAND` for eBPF crates, with bpf-linker on PATH.
fn nightly_ebpf_cargo(root: &Path, subcommand: &str, packages: &[&str]) -> Result<Command> {
    ensure_rust_src()?;
    let linker_dir = ensure_bpf_linker(root)?;
    let path = std::env::join_paths(std::iter::once(linker_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    let mut command = Command::new("cargo");
    command
        .current_dir(root)
        .arg(format!("+{NIGHTLY}"))
        .arg(subcommand);
    for package in packages {
        command.args(["--package", package]);
    }
    command
        .args(["--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .env("PATH", &path);
    clean_toolchain_env(&mut command);
    Ok(command)
}

fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}

/// Cargo and rustup export variables to the xtask process that would pin the
/// nested nightly build to this (stable) toolchain, or replace the bpf target's
/// rustflags (RUSTFLAGS silently drops target-cpu=v3).
fn clean_toolchain_env(command: &mut Command) {
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO",
    ] {
        command.env_remove(var);
    }
}

fn ensure_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("running rustup (is it installed?)")?;
    if !installed.status.success() {
        bail!(
            "rustup has no `{NIGHTLY}` toolchain: {}",
            String::from_utf8_lossy(&installed.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    println!("adding rust-src to the {NIGHTLY} toolchain (needed for -Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// Builds bpf-linker once into target/tools, linked against the nightly
/// toolchain's own libLLVM so no system LLVM package is needed.
fn ensure_bpf_linker(root: &Path) -> Result<PathBuf> {
    let tools = target_dir(root).join("tools");
    let install_root = tools.join(format!("bpf-linker-{BPF_LINKER_VERSION}"));
    let bin_dir = install_root.join("bin");
    if bin_dir.join("bpf-linker").exists() {
        return Ok(bin_dir);
    }
    let sysroot = Command::new("rustc")
        .arg(format!("+{NIGHTLY}"))
        .args(["--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("asking the nightly rustc for its sysroot")?;
    if !sysroot.status.success() {
        bail!(
            "rustc +{NIGHTLY} --print sysroot failed: {}",
            String::from_utf8_lossy(&sysroot.stderr)
        );
    }
    let sysroot_lib = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim()).join("lib");
    let llvm = std::fs::read_dir(&sysroot_lib)
        .with_context(|| format!("reading {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
            })
        })
        .with_context(|| format!("no libLLVM in {}", sysroot_lib.display()))?;
    let prefix = tools.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;

    println!(
        "building bpf-linker {BPF_LINKER_VERSION} against {} (once, about a minute)",
        llvm.display()
    );
    let mut install = cargo(root);
    install
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
            "--root",
        ])
        .arg(&install_root)
        .env("LLVM_PREFIX", &prefix);
    run(&mut install).context("building bpf-linker")?;
    Ok(bin_dir)
}

/// Packages the release binary `binary` (no rebuild) with cargo-deb: man pages
/// and completions are generated from the binary's own clap definition into
/// target/release/deb-assets, where audit-user's [package.metadata.deb] takes
/// them. lintian errors fail the build; its warnings are printed.
fn deb(root: &Path, binary: &Path) -> Result<PathBuf> {
    let assets = binary
        .parent()
        .context("the release binary has a directory")?
        .join("deb-assets");
    if assets.exists() {
        std::fs::remove_dir_all(&assets)
            .with_context(|| format!("removing {}", assets.display()))?;
    }
    let man = assets.join("man");
    run(Command::new(binary)
        .args(["generate", "man"])
        .arg(&man)
        .stdout(std::process::Stdio::null()))?;
    run(Command::new(binary)
        .args(["generate", "completions"])
        .arg(assets.join("completions"))
        .stdout(std::process::Stdio::null()))?;
    // Debian installs man pages compressed; -n keeps the archive reproducible.
    for entry in std::fs::read_dir(&man)? {
        run(Command::new("gzip").args(["-9nf"]).arg(entry?.path()))?;
    }

    let tools = target_dir(root)
        .join("tools")
        .join(format!("cargo-deb-{CARGO_DEB_VERSION}"));
    let cargo_deb = tools.join("bin/cargo-deb");
    if !cargo_deb.exists() {
        println!(
            "installing cargo-deb {CARGO_DEB_VERSION} into {} (once)",
            tools.display()
        );
        run(cargo(root)
            .args([
                "install",
                &format!("cargo-deb@{CARGO_DEB_VERSION}"),
                "--locked",
                "--root",
            ])
            .arg(&tools))?;
    }
    let out_dir = target_dir(root).join("debian");
    std::fs::create_dir_all(&out_dir)?;
    let output = Command::new(&cargo_deb)
        .current_dir(root)
        .args(["--package", "audit-user", "--no-build", "--output"])
        .arg(&out_dir)
        .output()
        .context("running cargo-deb")?;
    if !output.status.success() {
        bail!(
            "cargo-deb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let package = PathBuf::from(
        String::from_utf8(output.stdout)?
            .lines()
            .last()
            .context("cargo-deb printed no package path")?
            .trim(),
    );
    println!("built {}", package.display());
    if Command::new("lintian").arg("--version").output().is_ok() {
        // Root is how the tests run; lintian only warns about it.
        run(Command::new("lintian")
            .args(["--fail-on", "error", "--allow-root"])
            .arg(&package))
        .context("lintian found errors in the package")?;
    } else {
        println!("lintian is not installed: the package was not checked (apt-get install lintian)");
    }
    Ok(package)
}

const FUZZ_TARGETS: [&str; 3] = ["query_request", "policy_request", "cluster_entries"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs each fuzz target for `seconds` from the committed seeds (fuzz/seeds)
/// plus a corpus kept under target/, then prints the executions each made.
fn fuzz(root: &Path, seconds: u64, only: Option<&str>) -> Result<()> {
    let tools = target_dir(root)
        .join("tools")
        .join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    if !tools.join("bin/cargo-fuzz").exists() {
        println!(
            "installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once)",
            tools.display()
        );
        run(cargo(root)
            .args([
                "install",
                &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
                "--locked",
                "--root",
            ])
            .arg(&tools))?;
    }
    let path = std::env::join_paths(std::iter::once(tools.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let targets: Vec<&str> = match only {
        Some(target) if FUZZ_TARGETS.contains(&target) => vec![target],
        Some(target) => bail!(
            "unknown fuzz target {target}; targets: {}",
            FUZZ_TARGETS.join(", ")
        ),
        None => FUZZ_TARGETS.to_vec(),
    };
    let mut summary = Vec::new();
    for target in targets {
        let corpus = target_dir(root).join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let log = target_dir(root).join(format!("fuzz-{target}.log"));
        println!("fuzzing {target} for {seconds} s (log: {})", log.display());
        let mut command = Command::new("cargo");
        command
            .current_dir(root.join("fuzz"))
            .arg(format!("+{NIGHTLY}"))
            .args(["fuzz", "run", "-O", target])
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // A request over this could only test the length check again.
            .args([
                "-max_len=8192",
                "-timeout=5",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ])
            .env("PATH", &path)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?);
        clean_toolchain_env(&mut command);
        let status = command.status().context("running cargo fuzz")?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let runs = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("Done ")
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "?".into());
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            bail!(
                "fuzz target {target} failed ({status}); the crash input is under fuzz/artifacts/{target}/\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        summary.push(format!(
            "{target}: {runs} executions in {seconds} s, no crash, hang or leak"
        ));
    }
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// Debian packages the adapter tests drive for real: a Lua host with
/// LuaSocket, and Postfix (installed, never started as a service: the tests run
/// private instances), Redis and its Sentinel (the cluster tests start private
/// instances), Prometheus (with promtool) and tmux for the metrics and `top`
/// tests; rspamd (never started as a service) for the plugin test; lintian
/// checks the package. Installed when missing and we can;
/// otherwise those tests skip and say so. INBOUND_AUDIT_NO_APT=1 leaves the
/// system alone.
const TEST_PACKAGES: [&str; 9] = [
    "lua5.4",
    "lua-socket",
    "postfix",
    "redis-server",
    "redis-sentinel",
    "lintian",
    "prometheus",
    "tmux",
    "rspamd",
];

fn ensure_test_packages() -> Result<()> {
    let missing: Vec<&str> = TEST_PACKAGES
        .into_iter()
        .filter(|package| {
            let status = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output();
            !matches!(status, Ok(out) if String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if std::env::var_os("INBOUND_AUDIT_NO_APT").is_some()
        || require_root("install packages").is_err()
    {
        println!(
            "not installing {} (tests that need them will skip)",
            missing.join(" ")
        );
        return Ok(());
    }
    println!(
        "installing the packages the adapter tests use: {}",
        missing.join(" ")
    );
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// An Exim binary for the ${readsocket} test. Exim and Postfix are both mail
/// transport agents and cannot be installed together, so unless Exim is the
/// system's MTA, Debian's exim4-daemon-light is unpacked (not installed) under
/// target/tools and run through a wrapper. Its binary insists on its compiled-in
/// user, so that system user is created. None: the Exim test skips.
fn ensure_exim(root: &Path) -> Option<PathBuf> {
    if Path::new("/usr/sbin/exim4").exists() {
        return Some("/usr/sbin/exim4".into());
    }
    let dir = target_dir(root).join("tools").join("exim");
    let wrapper = dir.join("exim");
    if wrapper.exists() {
        return Some(wrapper);
    }
    if std::env::var_os("INBOUND_AUDIT_NO_APT").is_some() || require_root("unpack Exim").is_err() {
        return None;
    }
    let unpack = || -> Result<()> {
        std::fs::create_dir_all(&dir)?;
        let download = |dir: &Path| {
            Command::new("apt-get")
                .args(["download", "-qq", "exim4-daemon-light", "libidn12"])
                .current_dir(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !download(&dir) {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            if !download(&dir) {
                bail!("apt-get download exim4-daemon-light libidn12 failed");
            }
        }
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "deb") {
                run(Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&path)
                    .arg(dir.join("root")))?;
            }
        }
        let has_user = Command::new("id")
            .args(["-u", "Debian-exim"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_user {
            run(Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "Debian-exim",
            ]))?;
        }
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nLD_LIBRARY_PATH={lib} exec {exim} \"$@\"\n",
                lib = dir.join("root/usr/lib/x86_64-linux-gnu").display(),
                exim = dir.join("root/usr/sbin/exim4").display()
            ),
        )?;
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        Ok(())
    };
    match unpack() {
        Ok(()) => Some(wrapper),
        Err(e) => {
            println!("no Exim for the ${{readsocket}} test ({e:#}); it will skip");
            None
        }
    }
}

fn require_root(what: &str) -> Result<()> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        bail!("to {what} you need root (eBPF needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON); run as root");
    }
    Ok(())
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

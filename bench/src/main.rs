//! The benchmark runner behind `cargo xtask bench`.
//!
//! `bench run --agent PATH [--quick] [--only LIST]` runs the suite against the
//! real agent binary and writes bench/results/latest.{md,json} (quick.* for
//! --quick, partial.* for --only). `serve`, `hold` and `round-trips` are the
//! helper processes it spawns (a server in the bench cgroup, holders of client
//! connections, a policy client in a process of its own).

mod agent;
mod env;
mod kernel;
mod latency;
mod net;
mod policy;
mod reference;
mod report;
mod scenarios {
    pub mod alternatives;
    pub mod churn;
    pub mod cluster;
    pub mod criterion;
    pub mod hostile;
    pub mod mailhost;
    pub mod metrics;
    pub mod overhead;
    pub mod policy;
    pub mod refusal;
    pub mod show_all;
    pub mod sizes;
    pub mod windows;
}

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::{env::BenchCgroup, report::Report};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "inbound-audit benchmark suite (run it with `cargo xtask bench`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the suite and write the results.
    Run(RunArgs),
    /// (helper) Hold every connection accepted on ADDR until the peer closes.
    #[command(hide = true)]
    Serve {
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
    },
    /// (helper) Time policy round trips on two sockets from a process of its
    /// own pinned to CPU, alternating batches; prints `p50 p99 p50 p99` in ns.
    #[command(hide = true)]
    RoundTrips {
        #[arg(long)]
        first: PathBuf,
        #[arg(long)]
        second: PathBuf,
        #[arg(long)]
        batches: usize,
        #[arg(long)]
        cpu: usize,
    },
    /// (helper) Open connections from 127.10.x.y sources and hold them.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        per_ip: usize,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The agent binary (target/release/inbound-audit).
    #[arg(long)]
    agent: PathBuf,
    /// A smoke run in well under a minute: small sizes, few rounds. Writes quick.{md,json}.
    #[arg(long)]
    quick: bool,
    /// Only these measurements (comma-separated): criterion, sizes, windows, hostile, alternatives, overhead, churn, cluster, refusal, mailhost, show_all, metrics, policy.
    /// Writes partial.{md,json}.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the results go.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What every measurement needs.
pub struct Ctx {
    pub agent_binary: PathBuf,
    pub cgroup: BenchCgroup,
    pub quick: bool,
    pub workspace: PathBuf,
    pub target_dir: PathBuf,
}

type Scenario = fn(&Ctx, &mut Report) -> Result<()>;

const SCENARIOS: [(&str, Scenario); 13] = [
    ("criterion", scenarios::criterion::run),
    ("sizes", scenarios::sizes::run),
    ("windows", scenarios::windows::run),
    ("hostile", scenarios::hostile::run),
    ("alternatives", scenarios::alternatives::run),
    ("overhead", scenarios::overhead::run),
    ("churn", scenarios::churn::run),
    ("cluster", scenarios::cluster::run),
    ("refusal", scenarios::refusal::run),
    ("mailhost", scenarios::mailhost::run),
    ("show_all", scenarios::show_all::run),
    ("metrics", scenarios::metrics::run),
    ("policy", scenarios::policy::run),
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Serve { listen } => net::serve(&listen).map(|()| ExitCode::SUCCESS),
        Cmd::RoundTrips {
            first,
            second,
            batches,
            cpu,
        } => policy::print_round_trips(&first, &second, batches, cpu).map(|()| ExitCode::SUCCESS),
        Cmd::Hold {
            to,
            first,
            count,
            per_ip,
        } => net::hold(to, first, count, per_ip).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("bench: {e:#}");
        ExitCode::FAILURE
    })
}

fn run(args: RunArgs) -> Result<ExitCode> {
    if !env::is_root() {
        bail!("the benchmarks load eBPF programs and move processes between cgroups: run as root");
    }
    if !net::executable(&args.agent) {
        bail!(
            "{} is not an executable (build it with `cargo xtask build`)",
            args.agent.display()
        );
    }
    for name in &args.only {
        if !SCENARIOS.iter().any(|(n, _)| n == name) {
            bail!("unknown measurement {name:?}");
        }
    }
    let started = Instant::now();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench lives in the workspace")
        .to_path_buf();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let fd_limit = env::raise_fd_limit();
    let scratch = std::env::temp_dir().join(format!("inbound-audit-bench-{}", std::process::id()));
    net::install_helper(&scratch)?;
    remove_stale_state(&args.agent);

    let mode = if args.quick {
        "quick"
    } else if !args.only.is_empty() {
        "partial"
    } else {
        "full"
    };
    let command = format!(
        "cargo xtask bench{}{}",
        if args.quick { " --quick" } else { "" },
        if args.only.is_empty() {
            String::new()
        } else {
            format!(" --only {}", args.only.join(","))
        }
    );
    let mut report = Report::new(env::Machine::describe(&workspace), mode, command);
    println!(
        "bench: {} run on {} ({} cores, load {}), open-file limit {fd_limit}",
        mode, report.machine.cpu_model, report.machine.cores, report.machine.load_average_at_start
    );
    let ctx = Ctx {
        agent_binary: args.agent.clone(),
        cgroup: BenchCgroup::create()?,
        quick: args.quick,
        workspace: workspace.clone(),
        target_dir,
    };

    let mut failed = Vec::new();
    for (name, scenario) in SCENARIOS {
        if !args.only.is_empty() && !args.only.iter().any(|n| n == name) {
            continue;
        }
        let t = Instant::now();
        println!("== {name}");
        if let Err(e) = scenario(&ctx, &mut report) {
            eprintln!("bench: {name} failed: {e:#}");
            report.target(
                &format!("{name}: measurement completed"),
                format!("failed: {e}"),
                f64::NAN,
                "completes",
                false,
            );
            failed.push(name);
        }
        println!("== {name} took {:.0} s", t.elapsed().as_secs_f64());
    }
    if args.quick {
        report.note(
            "Quick run: small sizes and few rounds, for checking the suite works; figures are \
             not comparable with the targets (sizes and connection counts are below them).",
        );
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    report.load_average_at_end = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();

    let out = args.out.unwrap_or_else(|| workspace.join("bench/results"));
    let stem = match mode {
        "full" => "latest",
        other => other,
    };
    let dir = out.join(".staging");
    report.write(&dir)?;
    for ext in ["md", "json"] {
        std::fs::rename(
            dir.join(format!("latest.{ext}")),
            out.join(format!("{stem}.{ext}")),
        )?;
    }
    let _ = std::fs::remove_dir(&dir);
    println!("\n{}", report.targets_markdown());
    println!(
        "results: {} ({:.0} s)",
        out.join(format!("{stem}.md")).display(),
        report.duration_secs
    );
    drop(ctx);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Pinned state and cgroups left by a bench run that was killed (its pid is
/// gone): detached and removed, so they cost nothing and count nothing.
fn remove_stale_state(agent: &Path) {
    let alive = |name: &str| {
        name.split('-')
            .nth(3)
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("inbound-audit-bench-") && !alive(&name) {
                println!("bench: removing stale pinned state {name}");
                let _ = std::process::Command::new(agent)
                    .args(["cleanup", "--pin-dir"])
                    .arg(entry.path())
                    .stdout(std::process::Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(root) = inbound_audit::kernel::cgroup::cgroup2_root() {
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("inbound-audit-bench-") && !alive(&name) {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }
}

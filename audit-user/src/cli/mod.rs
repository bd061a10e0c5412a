//! The command line: one file per subcommand, this one dispatching.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use inbound_audit::{config, kernel::loader};

mod agent;
mod cleanup;
mod query;
mod report;
mod top;

#[derive(Parser)]
#[command(
    name = "inbound-audit",
    version,
    about = "Live inbound session counts per CIDR, from the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel program and serve queries (needs root or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON).
    Agent(Box<agent::AgentArgs>),
    /// Send one request to a running agent and print its answer.
    Query(query::QueryArgs),
    /// Print every monitor's windows and the live sessions per service for a network.
    Show {
        #[arg(long, default_value = config::DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
        /// An IP or network: 203.0.113.9, 203.0.113.0/24, 2001:db8::/64.
        network: String,
    },
    /// Print the agent's counters (repairs, lost events, saturation, ...).
    Stats {
        #[arg(long, default_value = config::DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
    },
    /// A live view of the busiest networks per service (--once: print it once).
    Top(top::TopArgs),
    /// Detach the kernel programs and remove all pinned state.
    Cleanup {
        #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

/// Parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => agent::run(*args),
        Command::Query(args) => query::run(args),
        Command::Show { socket, network } => {
            report::run_report(&socket, &format!("show {network}"))
        }
        Command::Stats { socket } => report::run_report(&socket, "stats"),
        Command::Top(args) => top::run(args),
        Command::Cleanup { pin_dir } => cleanup::run(&pin_dir),
    }
}

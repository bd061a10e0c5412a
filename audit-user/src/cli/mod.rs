//! The command line: one file per subcommand, this one dispatching. `command()`
//! is the whole clap definition, which the man pages and shell completions are
//! generated from (the hidden `generate` subcommand, run at package time).

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, Parser, Subcommand};
use inbound_audit::{config, kernel::loader};

mod agent;
mod cleanup;
mod generate;
mod query;
mod report;
mod show_all;
mod top;

/// The version with the commit it was built from (build.rs).
const VERSION: &str = env!("INBOUND_AUDIT_VERSION");

/// Shown after the subcommands in `--help` and in inbound-audit(8).
const EXAMPLES: &str = "\
Examples:
  inbound-audit agent --service SMTP=25,587         # count, serve queries (as root)
  inbound-audit query 'msys.audit.inbound_session_count(\"203.0.113.0/24\", \"SMTP\")'
  inbound-audit query --client 203.0.113.9 'ac:inbound_session_count(\"/24\")'
  inbound-audit show 203.0.113.0/24                 # every monitor and service for a network
  inbound-audit show all > tracked.csv              # every tracked IP as CSV (Momentum's show all)
  inbound-audit stats                               # the agent's counters
  inbound-audit cleanup                             # detach the programs, remove pinned state

Environment:
  RUST_LOG  log filter for the agent, e.g. debug or inbound_audit=debug [default: info]";

#[derive(Parser)]
#[command(
    name = "inbound-audit",
    version = VERSION,
    about = "Live inbound session counts per CIDR, from the kernel",
    long_about = "Live inbound session counts per CIDR, from the kernel.\n\n\
        An eBPF program counts every accepted TCP connection per remote IP; the \
        agent answers Momentum-style queries (msys.audit.inbound_session_count, \
        ac:inbound_session_count, the Sieve audit_* forms) on a Unix socket, and \
        Postfix policy delegation.",
    after_help = EXAMPLES
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel program and serve queries (root, or CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_CHOWN CAP_SETPCAP)
    Agent(Box<agent::AgentArgs>),
    /// Send one request to a running agent and print its answer (exit 0 OK, 1 ERR, 2 no agent)
    Query(query::QueryArgs),
    /// Print every monitor's windows and the live sessions per service for a network, or for every IP (all)
    #[command(
        after_help = "Examples:\n  inbound-audit show 203.0.113.9\n  inbound-audit show 2001:db8::/64\n  \
            inbound-audit show all > tracked.csv   # CSV: a header, then one row per tracked IP"
    )]
    Show {
        /// The agent's query socket
        #[arg(long, value_name = "PATH", default_value = config::DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
        /// An IP or network: 203.0.113.9, 203.0.113.0/24, 2001:db8::/64; or `all`: every
        /// tracked IP, one CSV row each, streamed (this node only)
        network: String,
        /// The fleet's sums, then one row per node (needs clustering).
        #[arg(long, conflicts_with = "node")]
        cluster: bool,
        /// One node's own view, by its cluster name.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// Print the agent's counters (kernel_sessions moves at reconcile passes only)
    #[command(
        after_help = "Example:\n  inbound-audit stats --socket /run/inbound-audit/audit.sock"
    )]
    Stats {
        /// The agent's query socket
        #[arg(long, value_name = "PATH", default_value = config::DEFAULT_SOCKET_PATH)]
        socket: PathBuf,
    },
    /// A live view of the busiest networks per service (--once: print it once)
    Top(top::TopArgs),
    /// Detach the kernel programs and remove all pinned state (stop the agent first)
    #[command(
        after_help = "Example:\n  inbound-audit cleanup --pin-dir /sys/fs/bpf/inbound-audit"
    )]
    Cleanup {
        /// bpffs directory of the pinned maps and links
        #[arg(long, value_name = "DIR", default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Write the man pages or shell completions (used when packaging)
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

/// The whole command line definition, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => agent::run(*args),
        Command::Query(args) => query::run(args),
        Command::Show {
            socket,
            network,
            cluster,
            node,
        } if network == "all" => {
            if cluster || node.is_some() {
                let mut cli = command();
                let show = cli
                    .find_subcommand_mut("show")
                    .expect("show is a subcommand");
                show.clone()
                    .bin_name("inbound-audit show")
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        "show all is this node's counts only: --cluster and --node do not apply",
                    )
                    .exit();
            }
            show_all::run(&socket)
        }
        Command::Show {
            socket,
            network,
            cluster,
            node,
        } => {
            let scope = match (cluster, node) {
                (true, _) => " cluster".to_string(),
                (false, Some(node)) => format!(" node {node}"),
                (false, None) => String::new(),
            };
            report::run_report(&socket, &format!("show {network}{scope}"))
        }
        Command::Stats { socket } => report::run_report(&socket, "stats"),
        Command::Top(args) => top::run(args),
        Command::Cleanup { pin_dir } => cleanup::run(&pin_dir),
        Command::Generate(args) => generate::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help_of(path: &[&str]) -> String {
        let mut command = command();
        let mut current = &mut command;
        for name in path {
            current = current
                .find_subcommand_mut(name)
                .unwrap_or_else(|| panic!("no subcommand {name}"));
        }
        current.render_long_help().to_string()
    }

    #[test]
    fn definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn version_names_the_commit() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")), "{VERSION}");
        assert!(VERSION.contains("commit "), "{VERSION}");
        let rendered = command().render_version();
        assert!(rendered.contains("(commit "), "{rendered}");
    }

    /// The defaults the help states are the ones the code uses.
    #[test]
    fn agent_help_states_the_real_defaults() {
        let help = help_of(&["agent"]);
        let defaults = config::Config::default();
        for expected in [
            config::DEFAULT_CONFIG_PATH.to_string(),
            config::DEFAULT_SOCKET_PATH.to_string(),
            loader::DEFAULT_PIN_DIR.to_string(),
            config::DEFAULT_STATE_DIR.to_string(),
            format!("[default: {}]", config::DEFAULT_MAX_CLIENTS),
            format!("[default: {}]", defaults.reconcile_interval.as_secs()),
            "RUST_LOG".to_string(),
            "Examples:".to_string(),
        ] {
            assert!(
                help.contains(&expected),
                "agent --help lacks {expected}:\n{help}"
            );
        }
        assert_eq!(defaults.socket, PathBuf::from(config::DEFAULT_SOCKET_PATH));
        assert_eq!(defaults.state_dir, PathBuf::from(config::DEFAULT_STATE_DIR));
        assert_eq!(defaults.pin_dir, PathBuf::from(loader::DEFAULT_PIN_DIR));
        let services: Vec<String> = defaults.services.iter().map(|s| format!("{s:?}")).collect();
        assert_eq!(services.len(), 1, "{services:?}");
    }

    /// One line per flag: a person scans the list without wrapped paragraphs.
    #[test]
    fn every_flag_has_a_one_line_help() {
        fn walk(command: &clap::Command, path: &str) {
            for arg in command.get_arguments() {
                if let Some(help) = arg.get_help() {
                    let text = help.to_string();
                    assert!(
                        !text.contains('\n'),
                        "{path} --{}: help spans lines: {text}",
                        arg.get_id()
                    );
                } else if !matches!(arg.get_id().as_str(), "help" | "version") {
                    panic!("{path} {} has no help", arg.get_id());
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        walk(&command(), "inbound-audit");
    }

    /// The conffile the package installs works as shipped.
    #[test]
    fn shipped_config_file_is_accepted() {
        let text = include_str!("../../../packaging/inbound-audit.toml");
        let shipped = config::Config::from_toml(text).expect("packaging/inbound-audit.toml");
        shipped.validate().unwrap();
        shipped.check_references().unwrap();
        assert_eq!(shipped.socket_group.as_deref(), Some("mail"));
        assert_eq!(shipped.socket, PathBuf::from(config::DEFAULT_SOCKET_PATH));
        assert_eq!(shipped.services, config::Config::default().services);
    }

    #[test]
    fn top_level_help_ends_with_examples() {
        let help = command().render_long_help().to_string();
        let examples = help.find("Examples:").expect("examples in --help");
        let commands = help.find("Commands:").expect("commands in --help");
        assert!(examples > commands, "{help}");
        assert!(
            !help.contains("generate"),
            "the generate subcommand is hidden: {help}"
        );
    }
}

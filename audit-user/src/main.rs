//! `inbound-audit`: the agent and its command-line client.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use inbound_audit::{
    agent::{self, AgentOptions},
    config::{self, Config},
    kernel::loader,
    serving::client,
};

#[derive(Parser)]
#[command(
    name = "inbound-audit",
    version,
    about = "Live inbound session counts per CIDR, from the kernel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the kernel program and serve queries (needs root or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON).
    Agent(Box<AgentArgs>),
    /// Send one request to a running agent and print its answer.
    Query(QueryArgs),
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
    /// Detach the kernel programs and remove all pinned state.
    Cleanup {
        #[arg(long, default_value = loader::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct AgentArgs {
    /// TOML config file (default: /etc/inbound-audit/inbound-audit.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A service: NAME=PORT[,PORT...]; repeatable; replaces the config's services.
    #[arg(long = "service", value_name = "NAME=PORTS")]
    services: Vec<String>,
    /// Query socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Group owning the query socket (name or gid).
    #[arg(long)]
    socket_group: Option<String>,
    /// cgroup v2 directory to watch (default: the cgroup2 root, i.e. every process).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Most simultaneous query clients.
    #[arg(long)]
    max_clients: Option<config::PositiveCount>,
    /// A time-windowed monitor "W,N" (N windows of W seconds); repeatable;
    /// replaces the config's monitors.
    #[arg(long = "monitor", value_name = "W,N")]
    monitors: Vec<String>,
    /// Directory for the monitor state saved on shutdown.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve Postfix policy delegation (check_policy_service) on this socket.
    #[arg(long)]
    policy_socket: Option<PathBuf>,
    /// Group owning the policy socket (Postfix's smtpd runs as user postfix).
    #[arg(long)]
    policy_socket_group: Option<String>,
    /// Seconds between reconcile passes against the kernel's socket records.
    #[arg(long, value_name = "SECS")]
    reconcile_interval: Option<config::PositiveSecs>,
    /// Remove the pinned programs and maps on exit instead of counting on.
    #[arg(long)]
    detach_on_exit: bool,
}

#[derive(clap::Args)]
struct QueryArgs {
    #[arg(long, default_value = config::DEFAULT_SOCKET_PATH)]
    socket: PathBuf,
    /// The connecting client that relative forms (/24, no cidr) refer to: IP[:PORT].
    #[arg(long)]
    client: Option<String>,
    /// The request, e.g. 'msys.audit.inbound_session_count("10.0.0.0/8", "SMTP")'.
    request: String,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => match run_agent(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("inbound-audit: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Query(args) => run_query(args),
        Command::Show { socket, network } => run_report(&socket, &format!("show {network}")),
        Command::Stats { socket } => run_report(&socket, "stats"),
        Command::Cleanup { pin_dir } => match loader::cleanup(&pin_dir) {
            Ok(removed) => {
                println!(
                    "removed {} pinned objects from {}",
                    removed.len(),
                    pin_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("inbound-audit: cleanup of {}: {e}", pin_dir.display());
                ExitCode::FAILURE
            }
        },
    }
}

/// The configuration: the file, then the flags over it. Run again on SIGHUP.
fn build_config(args: &AgentArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None if std::path::Path::new(config::DEFAULT_CONFIG_PATH).exists() => {
            Config::from_file(std::path::Path::new(config::DEFAULT_CONFIG_PATH))?
        }
        None => Config::default(),
    };
    if !args.services.is_empty() {
        config.services = args
            .services
            .iter()
            .map(|s| config::parse_service_flag(s))
            .collect::<Result<_, _>>()?;
    }
    if let Some(socket) = args.socket.clone() {
        config.socket = socket;
    }
    if let Some(group) = args.socket_group.clone() {
        config.socket_group = Some(group);
    }
    if let Some(cgroup) = args.cgroup.clone() {
        config.cgroup = Some(cgroup);
    }
    if let Some(pin_dir) = args.pin_dir.clone() {
        config.pin_dir = pin_dir;
    }
    if let Some(max) = args.max_clients {
        config.max_clients = max.0;
    }
    if !args.monitors.is_empty() {
        config.monitors = args
            .monitors
            .iter()
            .map(|m| m.parse())
            .collect::<Result<_, inbound_audit::domain::MonitorSpecError>>()?;
    }
    if let Some(path) = args.policy_socket.clone() {
        config.policy_socket = Some(path);
    }
    if let Some(group) = args.policy_socket_group.clone() {
        config.policy_socket_group = Some(group);
    }
    if let Some(dir) = args.state_dir.clone() {
        config.state_dir = dir;
    }
    if let Some(secs) = args.reconcile_interval {
        config.reconcile_interval = secs.0;
    }
    config.validate()?;
    config.check_references()?;
    Ok(config)
}

fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    let detach_on_exit = args.detach_on_exit;
    let reload: agent::ConfigSource =
        Box::new(move || build_config(&args).map_err(|e| e.to_string()));
    agent::run(AgentOptions {
        config,
        detach_on_exit,
        reload: Some(reload),
    })?;
    Ok(())
}

fn run_report(socket: &std::path::Path, request: &str) -> ExitCode {
    match client::query_report(socket, request) {
        Ok(Ok(lines)) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Ok(Err(error_line)) => {
            println!("{error_line}");
            ExitCode::from(1)
        }
        Err(e) => unreachable_agent(socket, &e),
    }
}

fn unreachable_agent(socket: &std::path::Path, error: &std::io::Error) -> ExitCode {
    eprintln!(
        "inbound-audit: cannot reach the agent at {}: {error}\n\
         Is it running? Start it with `inbound-audit agent` (or `cargo xtask run`), \
         or point --socket at its socket.",
        socket.display()
    );
    ExitCode::from(2)
}

fn run_query(args: QueryArgs) -> ExitCode {
    let request = client::with_client(args.client.as_deref(), &args.request);
    match client::query(&args.socket, &request) {
        Ok(answer) => {
            println!("{answer}");
            if answer.starts_with("OK") {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => unreachable_agent(&args.socket, &e),
    }
}

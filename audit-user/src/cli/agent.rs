//! `inbound-audit agent`: the configuration from the file and the flags, then
//! the agent until SIGTERM.

use std::{path::PathBuf, process::ExitCode};

use inbound_audit::{
    agent::{self, AgentOptions},
    config::{self, Config},
};

#[derive(clap::Args, Clone)]
pub struct AgentArgs {
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
    /// Serve Prometheus metrics over HTTP at ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds between reconcile passes against the kernel's socket records.
    #[arg(long, value_name = "SECS")]
    reconcile_interval: Option<config::PositiveSecs>,
    /// Remove the pinned programs and maps on exit instead of counting on.
    #[arg(long)]
    detach_on_exit: bool,
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
    if let Some(addr) = args.metrics_listen {
        config.metrics_listen = Some(addr);
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

/// Runs the agent; a refused start is printed and exits 1.
pub fn run(args: AgentArgs) -> ExitCode {
    match run_agent(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inbound-audit: {e}");
            ExitCode::FAILURE
        }
    }
}

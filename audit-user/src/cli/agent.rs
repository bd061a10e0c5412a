//! `inbound-audit agent`: the configuration from the file and the flags, then
//! the agent until SIGTERM.

use std::{path::PathBuf, process::ExitCode};

use inbound_audit::{
    agent::{self, AgentOptions},
    config::{self, Config},
};

/// Shown after the flags in `agent --help` and the man page.
const AGENT_EXAMPLES: &str = "\
Flags override the config file; SIGHUP reads both again, SIGTERM stops the agent
(the kernel programs stay attached and keep counting; `inbound-audit cleanup`
detaches them). Log verbosity: RUST_LOG=debug (default: info).

Examples:
  inbound-audit agent --config /etc/inbound-audit/inbound-audit.toml
  inbound-audit agent --service SMTP=25,587 --monitor 60,1 --monitor 300,6
  inbound-audit agent --cgroup /sys/fs/cgroup/unified/system.slice/postfix.service \\
      --socket-group mail --policy-socket /var/spool/postfix/inbound-audit/policy.sock";

#[derive(clap::Args, Clone)]
#[command(after_help = AGENT_EXAMPLES)]
pub struct AgentArgs {
    /// TOML config file [default: /etc/inbound-audit/inbound-audit.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A service NAME=PORT[,PORT...], repeatable, replacing the config's [services] [default: SMTP=25,465,587]
    #[arg(long = "service", value_name = "NAME=PORTS")]
    services: Vec<String>,
    /// Query socket [default: /run/inbound-audit/audit.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Group owning the query socket, name or gid [default: the agent's own group]
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// cgroup v2 directory whose sessions are counted [default: the cgroup2 root, every process]
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned maps and links [default: /sys/fs/bpf/inbound-audit]
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// Most query clients connected at once [default: 1024]
    #[arg(long, value_name = "N")]
    max_clients: Option<config::PositiveCount>,
    /// A monitor of N windows of W seconds, repeatable, replacing the config's monitors [default: none]
    #[arg(long = "monitor", value_name = "W,N")]
    monitors: Vec<String>,
    /// Directory of the monitor state saved on shutdown [default: /var/lib/inbound-audit]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Serve Postfix policy delegation (check_policy_service) on this socket [default: none]
    #[arg(long, value_name = "PATH")]
    policy_socket: Option<PathBuf>,
    /// Group owning the policy socket; Postfix's smtpd runs as postfix [default: the agent's group]
    #[arg(long, value_name = "GROUP")]
    policy_socket_group: Option<String>,
    /// Serve Prometheus metrics over HTTP at ADDR/metrics, e.g. 127.0.0.1:9464 [default: off]
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Seconds between reconcile passes against the kernel's socket records [default: 10]
    #[arg(long, value_name = "SECS")]
    reconcile_interval: Option<config::PositiveSecs>,
    /// Fleet-wide counts through this Redis (redis://, rediss://, redis+sentinel://host:port/primary) [default: `[cluster] redis`, else off]
    #[arg(long, value_name = "URL")]
    cluster_redis: Option<config::RedisUrl>,
    /// This node's name in the fleet [default: `[cluster] node`, else the host name]
    #[arg(long, value_name = "NAME")]
    node: Option<config::NodeName>,
    /// On exit, detach the programs and remove the pinned maps instead of counting on
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
    if let Some(url) = args.cluster_redis.clone() {
        match &mut config.cluster {
            Some(cluster) => cluster.redis = url,
            None => config.cluster = Some(config::ClusterConfig::with_redis(url)?),
        }
    }
    if let Some(node) = &args.node {
        match &mut config.cluster {
            Some(cluster) => cluster.node = node.0.clone(),
            None => anyhow::bail!(
                "--node needs clustering: --cluster-redis URL or [cluster] in the config"
            ),
        }
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

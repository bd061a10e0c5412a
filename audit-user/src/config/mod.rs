//! Agent configuration: a TOML file, overridden by command-line flags.
//!
//! `file` declares the file's keys and defaults, `values` the rule of each
//! kind of value, `limits` the policy limits, `error` how a refusal names
//! the key and its position. What no single key can check (names, clashes,
//! references between keys) is checked here, after the flags.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use audit_common::MAX_SERVICES;

mod cluster;
mod error;
mod file;
pub mod kernel_limits;
mod limits;
mod lua_policy;
mod values;

pub use cluster::{ClusterConfig, NodeName, RedisUrl};
pub use error::{ConfigError, Position};
pub use limits::{check_action, ActionError, LimitConfig, LimitCount, LimitError};
pub use lua_policy::LuaPolicyConfig;
pub use values::{PositiveCount, PositiveSecs, ValueError};

use crate::domain::{Limit, MonitorSpec, ServicePorts, CLUSTER_SERVICE};
use error::invalid;
use file::ConfigFile;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/inbound-audit/inbound-audit.toml";
pub const DEFAULT_SOCKET_PATH: &str = "/run/inbound-audit/audit.sock";
pub const DEFAULT_MAX_CLIENTS: usize = 1024;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/inbound-audit";
/// Service names are stored NUL-padded in a 32-byte kernel map value.
const MAX_SERVICE_NAME_LEN: usize = 31;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub services: Vec<ServicePorts>,
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    /// cgroup v2 directory to watch; None = the cgroup2 root (every process).
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub max_clients: usize,
    pub reconcile_interval: Duration,
    /// Time-windowed monitors ("W,N"), in configuration order.
    pub monitors: Vec<MonitorSpec>,
    /// Most (IP, window, series) entries one monitor holds; past it new IPs are
    /// counted as dropped.
    pub max_tracked_ips_per_monitor: usize,
    /// Where monitor state is saved on shutdown and read back on start.
    pub state_dir: PathBuf,
    /// Postfix policy delegation socket; None: no policy server.
    pub policy_socket: Option<PathBuf>,
    pub policy_socket_mode: u32,
    /// Postfix's smtpd runs as user postfix: give it the socket's group.
    pub policy_socket_group: Option<String>,
    pub policy_limits: Vec<Limit>,
    /// How long a client may stay connected without starting a request.
    pub client_idle_timeout: Duration,
    /// How long one request may take from its first byte to its LF.
    pub request_timeout: Duration,
    pub access: Access,
    /// Kernel per-IP entries per family (set when the maps are created).
    pub max_tracked_ips: u32,
    /// Kernel SOCKETS records: seeded sessions (and those accepted while the
    /// agent seeds) tracked at once; accepted sessions use socket storage.
    pub max_tracked_sessions: u32,
    /// Size of the kernel's session-event ring buffer (set when the maps are created).
    pub event_ring_bytes: u32,
    /// Fleet-wide counts through Redis; None: clustering is off.
    pub cluster: Option<ClusterConfig>,
    /// `[[kernel_limits]]`: SYNs the kernel refuses, in order (the first full one refuses).
    pub kernel_limits: Vec<kernel_limits::KernelLimitConfig>,
    /// Where `/metrics` is served over HTTP (Prometheus text format); None: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Momentum-style Lua policy scripts and their bounds.
    pub lua_policy: LuaPolicyConfig,
}

/// Which local users may use the query socket, from its peer credentials.
/// Root is always allowed. Empty query lists: whoever can open the socket (its
/// mode and group decide). `add` (writes) needs the add lists; empty: root only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub query_uids: Vec<u32>,
    pub query_gids: Vec<u32>,
    pub add_uids: Vec<u32>,
    pub add_gids: Vec<u32>,
}

impl Access {
    pub fn allows(&self, uid: Option<u32>, gid: Option<u32>, writes: bool) -> bool {
        if uid == Some(0) {
            return true;
        }
        let member = |uids: &[u32], gids: &[u32]| {
            uid.is_some_and(|u| uids.contains(&u)) || gid.is_some_and(|g| gids.contains(&g))
        };
        let may_add = member(&self.add_uids, &self.add_gids);
        if writes {
            return may_add;
        }
        (self.query_uids.is_empty() && self.query_gids.is_empty())
            || may_add
            || member(&self.query_uids, &self.query_gids)
    }
}

impl Default for Config {
    fn default() -> Self {
        ConfigFile::default().into()
    }
}

impl Config {
    /// Reads `path`; keys it does not set keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, Path::new(""))
    }

    fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: ConfigFile = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let at = e.inner().span().map(|span| Position::of(text, span.start));
                let reason = e.inner().message().to_string();
                // The path serde was at: `max_clients`, `services.SMTP[0]`,
                // `policy_limits[1]`; "." when the text itself is not TOML.
                match e.path().to_string() {
                    key if key == "." => ConfigError::Parse {
                        path: path.to_path_buf(),
                        at,
                        reason,
                    },
                    key => ConfigError::Invalid {
                        key,
                        reason,
                        file: None,
                        at,
                    }
                    .in_file(path),
                }
            })?;
        let config = Config::from(file);
        config.validate().map_err(|e| e.in_file(path))?;
        Ok(config)
    }

    /// Checks what refers to other keys (a policy limit's service and
    /// monitor), once flags have had their say: a flag may add the monitor a
    /// file's limit names.
    pub fn check_references(&self) -> Result<(), ConfigError> {
        for (i, limit) in self.policy_limits.iter().enumerate() {
            let key = format!("policy_limits[{i}]");
            if limit.rule().cluster && self.cluster.is_none() {
                return Err(invalid(
                    &key,
                    "scope = \"cluster\" needs clustering ([cluster] or --cluster-redis)",
                ));
            }
            match limit {
                Limit::Sessions {
                    service: Some(service),
                    ..
                } if !self.services.iter().any(|s| &s.name == service) => {
                    return Err(invalid(
                        &key,
                        format!("service {service:?} is not configured"),
                    ));
                }
                Limit::Windowed { monitor, .. } if !self.monitors.contains(monitor) => {
                    return Err(invalid(
                        &key,
                        format!("monitor \"{monitor}\" is not configured"),
                    ));
                }
                _ => {}
            }
        }
        for (i, limit) in self.kernel_limits.iter().enumerate() {
            if !self.services.iter().any(|s| s.name == limit.service) {
                return Err(invalid(
                    &format!("kernel_limits[{i}]"),
                    format!("service {:?} is not configured", limit.service),
                ));
            }
        }
        Ok(())
    }

    /// Makes the settings that only a restart can change (sockets, cgroup,
    /// pinned state, table sizes) equal to `running`'s; returns their keys
    /// where they differed.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut kept = Vec::new();
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if self.$field != running.$field {
                    kept.push(stringify!($field));
                    self.$field = running.$field.clone();
                }
            )*};
        }
        keep!(
            socket,
            socket_mode,
            socket_group,
            policy_socket,
            policy_socket_mode,
            policy_socket_group,
            cgroup,
            pin_dir,
            max_clients,
            max_tracked_ips,
            max_tracked_sessions,
            event_ring_bytes,
            state_dir,
            cluster,
            metrics_listen
        );
        // The interpreters and their queue are made once, at start.
        let (workers, queue) = (running.lua_policy.workers, running.lua_policy.queue);
        if self.lua_policy.workers != workers {
            kept.push("lua_policy_workers");
            self.lua_policy.workers = workers;
        }
        if self.lua_policy.queue != queue {
            kept.push("lua_policy_queue");
            self.lua_policy.queue = queue;
        }
        kept
    }

    /// The monitor state file.
    pub fn monitor_state_path(&self) -> PathBuf {
        self.state_dir.join("monitors.state")
    }

    /// Checks what the file format alone cannot: names, port clashes, counts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.services.is_empty() {
            return Err(invalid("services", "at least one service is needed"));
        }
        if self.services.len() > MAX_SERVICES {
            return Err(invalid(
                "services",
                format!(
                    "{} services configured, at most {MAX_SERVICES}",
                    self.services.len()
                ),
            ));
        }
        let mut owner: HashMap<u16, &str> = HashMap::new();
        for service in &self.services {
            let key = format!("services.{}", service.name);
            validate_service_name(&service.name).map_err(|reason| invalid(&key, reason))?;
            if service.name == CLUSTER_SERVICE {
                return Err(invalid(
                    &key,
                    "inbound_cidr is the cluster-wide view, not a local service",
                ));
            }
            if service.ports.is_empty() {
                return Err(invalid(&key, "a service needs at least one port"));
            }
            for &port in &service.ports {
                if let Some(other) = owner.insert(port, &service.name) {
                    if other != service.name {
                        return Err(invalid(
                            &key,
                            format!("port {port} is also assigned to service {other}"),
                        ));
                    }
                }
            }
        }
        for (i, monitor) in self.monitors.iter().enumerate() {
            if self.monitors[..i].contains(monitor) {
                return Err(invalid(
                    "monitors",
                    format!("\"{monitor}\" is configured twice"),
                ));
            }
        }
        if self.kernel_limits.len() > audit_common::MAX_KERNEL_LIMITS {
            return Err(invalid(
                "kernel_limits",
                format!(
                    "{} limits configured, at most {} (the kernel program's fixed table)",
                    self.kernel_limits.len(),
                    audit_common::MAX_KERNEL_LIMITS
                ),
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(invalid("socket", "empty path"));
        }
        check_action(&self.lua_policy.fail_action)
            .map_err(|e| invalid("lua_policy_fail_action", e.to_string()))?;

        Ok(())
    }

    /// The service a local port belongs to.
    pub fn service_of_port(&self, port: u16) -> Option<&str> {
        self.services
            .iter()
            .find(|s| s.ports.contains(&port))
            .map(|s| s.name.as_str())
    }
}

/// Parses a `--service NAME=PORT[,PORT...]` flag.
pub fn parse_service_flag(text: &str) -> Result<ServicePorts, ConfigError> {
    let key = format!("--service {text}");
    let (name, ports) = text
        .split_once('=')
        .ok_or_else(|| invalid(&key, "expected NAME=PORT[,PORT...]"))?;
    let ports = ports
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| invalid(&key, format!("`{p}` is not a port in 1..=65535")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    validate_service_name(name).map_err(|reason| invalid(&key, reason))?;
    Ok(ServicePorts {
        name: name.to_string(),
        ports,
    })
}

fn validate_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SERVICE_NAME_LEN {
        return Err(format!(
            "service names are 1 to {MAX_SERVICE_NAME_LEN} bytes"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(format!(
            "service name `{name}` may only use letters, digits, _ - ."
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_smtp_ports() {
        let config = Config::default();
        assert_eq!(config.services[0].to_string(), "SMTP=25,465,587");
        assert_eq!(config.service_of_port(587), Some("SMTP"));
        assert_eq!(config.service_of_port(2525), None);
    }

    #[test]
    fn file_overrides_defaults() {
        let config = Config::from_toml(
            r#"
            socket = "/tmp/x.sock"
            socket_mode = "0640"
            max_clients = 10
            event_ring_bytes = 65536
            [services]
            SMTP = [25, 2525]
            Control = [2025]
            "#,
        )
        .unwrap();
        assert_eq!(config.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(config.socket_mode, 0o640);
        assert_eq!(config.max_clients, 10);
        assert_eq!(config.event_ring_bytes, 65536);
        assert_eq!(
            config.services,
            vec![
                ServicePorts {
                    name: "Control".into(),
                    ports: vec![2025]
                },
                ServicePorts {
                    name: "SMTP".into(),
                    ports: vec![25, 2525]
                },
            ]
        );
    }

    #[test]
    fn bad_config_names_the_key() {
        let cases = [
            ("[services]\nSMTP = [70000]", "services.SMTP"),
            ("[services]\nSMTP = [25]\nECStream = [25]", "services."),
            ("max_clients = 0", "max_clients"),
            ("socket_mode = \"999\"", "socket_mode"),
            ("reconcile_interval_secs = -1", "reconcile_interval_secs"),
            ("[services]\ninbound_cidr = [25]", "services.inbound_cidr"),
            ("[services]\n\"bad name\" = [25]", "services.bad name"),
            ("monitors = [\"60\"]", "monitors"),
            ("monitors = [\"60,1\", \"60, 1\"]", "monitors"),
            (
                "max_tracked_ips_per_monitor = 0",
                "max_tracked_ips_per_monitor",
            ),
            ("event_ring_bytes = 5000", "event_ring_bytes"),
            ("event_ring_bytes = 2048", "event_ring_bytes"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err:?}");
        }
        let err = Config::from_toml("sockett = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sockett"), "{err}");
    }

    #[test]
    fn errors_give_the_key_the_reason_and_where() {
        let error = |text: &str| Config::from_toml(text).unwrap_err();
        for (text, key, line, column, reason) in [
            (
                "max_clients = \"lots\"",
                "max_clients",
                1,
                15,
                "invalid type: string \"lots\", expected a positive whole number",
            ),
            (
                "socket = \"/x\"\n\n[services]\nSMTP = [25, 70000]",
                "services.SMTP[1]",
                4,
                13,
                "port 70000 is not in 1..=65535",
            ),
            (
                "socket = \"/x\"\n[[policy_limits]]\ncount = \"sessions\"\nmax = 1\naction = \"hello world\"",
                "policy_limits[0]",
                2,
                1,
                "`action` \"hello world\": `hello` is not an access(5) action",
            ),
            (
                "request_timeout_secs = 5\nclient_idle_timeout_secs = -5",
                "client_idle_timeout_secs",
                2,
                28,
                "-5 is not a positive number of seconds",
            ),
        ] {
            match error(text) {
                ConfigError::Invalid {
                    key: k,
                    reason: r,
                    file: None,
                    at: Some(at),
                } => {
                    assert_eq!((k.as_str(), at), (key, Position { line, column }), "{text}");
                    assert!(r.starts_with(reason), "{text}: {r}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let message = error("max_clients = \"lots\"").to_string();
        assert!(
            message.starts_with("config key `max_clients` (line 1, column 15): invalid type"),
            "{message}"
        );
        // Not TOML: no key to name, but where toml gave up.
        let unterminated =
            error("socket_mode = \"0660\"\nsocket = \"/run/x.sock\nmax_clients = 3\n");
        assert!(
            matches!(
                &unterminated,
                ConfigError::Parse { at: Some(Position { line: 2, column }), reason, .. }
                    if *column > 10 && reason.contains("string")
            ),
            "{unterminated:?}"
        );
        assert!(
            unterminated.to_string().contains("line 2, column"),
            "{unterminated}"
        );
    }

    #[test]
    fn errors_from_a_file_name_it() {
        let dir =
            std::env::temp_dir().join(format!("inbound-audit-unit-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        fs::write(&path, "socket = \"/x\"\nevent_ring_bytes = 5000\n").unwrap();
        let value = Config::from_file(&path).unwrap_err().to_string();
        fs::write(&path, "[services]\n\"bad name\" = [25]\n").unwrap();
        let across = Config::from_file(&path).unwrap_err().to_string();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            value,
            format!(
                "config key `event_ring_bytes` ({}, line 2, column 20): 5000 is not a power of two between 4096 and 1073741824",
                path.display()
            )
        );
        assert!(
            across.starts_with(&format!(
                "config key `services.bad name` ({}): ",
                path.display()
            )),
            "{across}"
        );
    }

    #[test]
    fn limits_may_name_monitors_that_flags_add() {
        let mut config = Config::from_toml(
            "[[policy_limits]]\ncount = \"connections\"\nmonitor = \"60,1\"\nmax = 5\naction = \"reject\"\n",
        )
        .unwrap();
        let err = config.check_references().unwrap_err().to_string();
        assert!(
            err.contains("policy_limits[0]") && err.contains("60,1"),
            "{err}"
        );
        config.monitors = vec!["60,1".parse().unwrap()];
        config.check_references().unwrap();
    }

    #[test]
    fn access_lists() {
        let config = Config::from_toml(
            "[access]\nquery_users = [1000, \"root\"]\nadd_groups = [\"root\", 50]\n",
        )
        .unwrap();
        let access = &config.access;
        assert_eq!(access.query_uids, vec![1000, 0]);
        assert_eq!(access.add_gids, vec![0, 50]);
        assert!(access.allows(Some(0), Some(999), true), "root always");
        assert!(access.allows(Some(1000), Some(1000), false));
        assert!(!access.allows(Some(1000), Some(1000), true));
        assert!(
            access.allows(Some(1001), Some(50), true),
            "add implies query"
        );
        assert!(access.allows(Some(1001), Some(50), false));
        assert!(!access.allows(Some(1002), Some(1002), false));
        assert!(!access.allows(None, None, false));
        let open = Access::default();
        assert!(open.allows(Some(1234), Some(1234), false));
        assert!(!open.allows(Some(1234), Some(1234), true));
        let err = Config::from_toml("[access]\nadd_users = [\"no-such-user-here\"]").unwrap_err();
        assert!(err.to_string().contains("access.add_users"), "{err}");
        let err = Config::from_toml("request_timeout_secs = 0").unwrap_err();
        assert!(err.to_string().contains("request_timeout_secs"), "{err}");
    }

    #[test]
    fn service_flags() {
        assert_eq!(
            parse_service_flag("Control=2025,2026").unwrap(),
            ServicePorts {
                name: "Control".into(),
                ports: vec![2025, 2026]
            }
        );
        for bad in ["SMTP", "SMTP=", "SMTP=0", "SMTP=25,x", "=25", "a b=25"] {
            assert!(parse_service_flag(bad).is_err(), "{bad}");
        }
    }
}

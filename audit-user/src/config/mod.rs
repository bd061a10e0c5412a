//! Agent configuration: a TOML file, overridden by command-line flags.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use audit_common::MAX_SERVICES;

mod limits;

pub use limits::LimitConfig;

use crate::domain::{Limit, MonitorSpec, MonitorSpecError, ServicePorts, DEFAULT_PIN_DIR};
use crate::sys::users::{group_id, user_id};
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/inbound-audit/inbound-audit.toml";
pub const DEFAULT_SOCKET_PATH: &str = "/run/inbound-audit/audit.sock";
pub const DEFAULT_MAX_CLIENTS: usize = 1024;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/inbound-audit";
/// Service names are stored NUL-padded in a 32-byte kernel map value.
const MAX_SERVICE_NAME_LEN: usize = 31;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

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
        Self {
            services: vec![ServicePorts {
                name: "SMTP".into(),
                ports: vec![25, 465, 587],
            }],
            socket: DEFAULT_SOCKET_PATH.into(),
            socket_mode: 0o660,
            socket_group: None,
            cgroup: None,
            pin_dir: DEFAULT_PIN_DIR.into(),
            max_clients: DEFAULT_MAX_CLIENTS,
            reconcile_interval: Duration::from_secs(10),
            monitors: Vec::new(),
            max_tracked_ips_per_monitor: 1_000_000,
            state_dir: DEFAULT_STATE_DIR.into(),
            policy_socket: None,
            policy_socket_mode: 0o660,
            policy_socket_group: None,
            policy_limits: Vec::new(),
            client_idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            access: Access::default(),
            max_tracked_ips: 1 << 20,
            max_tracked_sessions: 1 << 20,
            event_ring_bytes: 4 << 20,
        }
    }
}

/// The file's shape. Unknown keys are refused so a typo is not silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    services: Option<HashMap<String, Vec<i64>>>,
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    cgroup: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    max_clients: Option<i64>,
    reconcile_interval_secs: Option<i64>,
    monitors: Option<Vec<String>>,
    max_tracked_ips_per_monitor: Option<i64>,
    state_dir: Option<PathBuf>,
    policy_socket: Option<PathBuf>,
    policy_socket_mode: Option<String>,
    policy_socket_group: Option<String>,
    policy_limits: Option<Vec<LimitConfig>>,
    client_idle_timeout_secs: Option<i64>,
    request_timeout_secs: Option<i64>,
    access: Option<AccessFile>,
    max_tracked_ips: Option<i64>,
    max_tracked_sessions: Option<i64>,
    event_ring_bytes: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessFile {
    #[serde(default)]
    query_users: Vec<IdOrName>,
    #[serde(default)]
    query_groups: Vec<IdOrName>,
    #[serde(default)]
    add_users: Vec<IdOrName>,
    #[serde(default)]
    add_groups: Vec<IdOrName>,
}

/// A user or group as a number or a name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IdOrName {
    Id(i64),
    Name(String),
}

impl IdOrName {
    fn resolve(&self, key: &str, lookup: fn(&str) -> Option<u32>) -> Result<u32, ConfigError> {
        match self {
            IdOrName::Id(id) => {
                u32::try_from(*id).map_err(|_| invalid(key, format!("{id} is not a valid id")))
            }
            IdOrName::Name(name) => {
                lookup(name).ok_or_else(|| invalid(key, format!("no such user or group {name:?}")))
            }
        }
    }
}

fn resolve_all(
    key: &str,
    ids: &[IdOrName],
    lookup: fn(&str) -> Option<u32>,
) -> Result<Vec<u32>, ConfigError> {
    ids.iter().map(|id| id.resolve(key, lookup)).collect()
}

impl Config {
    /// Reads `path` on top of the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.message().to_string(),
        })?;
        let mut config = Config::default();
        if let Some(services) = file.services {
            let mut list = Vec::new();
            for (name, ports) in services {
                let key = format!("services.{name}");
                let ports = ports
                    .into_iter()
                    .map(|p| {
                        u16::try_from(p)
                            .ok()
                            .filter(|&p| p != 0)
                            .ok_or_else(|| invalid(&key, format!("port {p} is not in 1..=65535")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                list.push(ServicePorts { name, ports });
            }
            // HashMap order is random; slots are assigned in this order.
            list.sort_by(|a, b| a.name.cmp(&b.name));
            config.services = list;
        }
        if let Some(socket) = file.socket {
            config.socket = socket;
        }
        if let Some(mode) = file.socket_mode {
            config.socket_mode =
                parse_mode(&mode).map_err(|reason| invalid("socket_mode", reason))?;
        }
        config.socket_group = file.socket_group.or(config.socket_group);
        config.cgroup = file.cgroup.or(config.cgroup);
        if let Some(pin_dir) = file.pin_dir {
            config.pin_dir = pin_dir;
        }
        if let Some(max) = file.max_clients {
            config.max_clients = usize::try_from(max)
                .ok()
                .filter(|&m| m > 0)
                .ok_or_else(|| invalid("max_clients", format!("{max} is not a positive number")))?;
        }
        if let Some(secs) = file.reconcile_interval_secs {
            config.reconcile_interval = u64::try_from(secs)
                .ok()
                .filter(|&s| s > 0)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    invalid(
                        "reconcile_interval_secs",
                        format!("{secs} is not a positive number of seconds"),
                    )
                })?;
        }
        if let Some(monitors) = file.monitors {
            config.monitors = monitors
                .iter()
                .map(|m| {
                    m.parse()
                        .map_err(|e: MonitorSpecError| invalid("monitors", e.to_string()))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(cap) = file.max_tracked_ips_per_monitor {
            config.max_tracked_ips_per_monitor = usize::try_from(cap)
                .ok()
                .filter(|&c| c > 0)
                .ok_or_else(|| {
                    invalid(
                        "max_tracked_ips_per_monitor",
                        format!("{cap} is not a positive number"),
                    )
                })?;
        }
        if let Some(dir) = file.state_dir {
            config.state_dir = dir;
        }
        config.policy_socket = file.policy_socket.or(config.policy_socket);
        if let Some(mode) = file.policy_socket_mode {
            config.policy_socket_mode =
                parse_mode(&mode).map_err(|reason| invalid("policy_socket_mode", reason))?;
        }
        config.policy_socket_group = file.policy_socket_group.or(config.policy_socket_group);
        if let Some(limits) = file.policy_limits {
            config.policy_limits = limits
                .into_iter()
                .enumerate()
                .map(|(i, limit)| {
                    limit
                        .check()
                        .map_err(|reason| invalid(&format!("policy_limits[{i}]"), reason))
                })
                .collect::<Result<_, _>>()?;
        }
        let seconds = |key: &str, value: i64| {
            u64::try_from(value)
                .ok()
                .filter(|&s| s > 0)
                .map(Duration::from_secs)
                .ok_or_else(|| invalid(key, format!("{value} is not a positive number of seconds")))
        };
        if let Some(secs) = file.client_idle_timeout_secs {
            config.client_idle_timeout = seconds("client_idle_timeout_secs", secs)?;
        }
        if let Some(secs) = file.request_timeout_secs {
            config.request_timeout = seconds("request_timeout_secs", secs)?;
        }
        let table_size = |key: &str, value: i64| {
            u32::try_from(value)
                .ok()
                .filter(|&n| n > 0 && n <= 1 << 26)
                .ok_or_else(|| invalid(key, format!("{value} is not between 1 and {}", 1u32 << 26)))
        };
        if let Some(n) = file.max_tracked_ips {
            config.max_tracked_ips = table_size("max_tracked_ips", n)?;
        }
        if let Some(n) = file.max_tracked_sessions {
            config.max_tracked_sessions = table_size("max_tracked_sessions", n)?;
        }
        if let Some(n) = file.event_ring_bytes {
            // The kernel wants a power of two and a multiple of the page size.
            config.event_ring_bytes = u32::try_from(n)
                .ok()
                .filter(|n| n.is_power_of_two() && (4096..=1 << 30).contains(n))
                .ok_or_else(|| {
                    invalid(
                        "event_ring_bytes",
                        format!("{n} is not a power of two between 4096 and {}", 1u32 << 30),
                    )
                })?;
        }
        if let Some(access) = file.access {
            config.access = Access {
                query_uids: resolve_all("access.query_users", &access.query_users, user_id)?,
                query_gids: resolve_all("access.query_groups", &access.query_groups, group_id)?,
                add_uids: resolve_all("access.add_users", &access.add_users, user_id)?,
                add_gids: resolve_all("access.add_groups", &access.add_groups, group_id)?,
            };
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks what refers to other keys (a policy limit's service and
    /// monitor), once flags have had their say: a flag may add the monitor a
    /// file's limit names.
    pub fn check_references(&self) -> Result<(), ConfigError> {
        for (i, limit) in self.policy_limits.iter().enumerate() {
            let key = format!("policy_limits[{i}]");
            if let Some(service) = &limit.service {
                if !self.services.iter().any(|s| &s.name == service) {
                    return Err(invalid(
                        &key,
                        format!("service {service:?} is not configured"),
                    ));
                }
            }
            if let Some(monitor) = &limit.monitor {
                if !self.monitors.contains(monitor) {
                    return Err(invalid(
                        &key,
                        format!("monitor \"{monitor}\" is not configured"),
                    ));
                }
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
            state_dir
        );
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
            if service.name == "inbound_cidr" {
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
        if self.socket.as_os_str().is_empty() {
            return Err(invalid("socket", "empty path"));
        }
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

fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|&m| m <= 0o777)
        .ok_or_else(|| format!("`{text}` is not an octal file mode like \"0660\""))
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
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

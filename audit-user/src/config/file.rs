//! The file's shape: every key with its type, which holds its rule, and its
//! default, in one place. Unknown keys are refused so a typo is not silently
//! ignored. Reading the file yields a whole [`Config`]; nothing is merged.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    cluster::ClusterConfig,
    kernel_limits::KernelLimitEntry,
    limits::PolicyLimit,
    lua_policy::LuaPolicyConfig,
    values::{
        FileMode, Gid, Monitor, Port, PositiveCount, PositiveSecs, RingBytes, TableSize, Uid,
    },
    Access, Config, DEFAULT_MAX_CLIENTS, DEFAULT_SOCKET_PATH, DEFAULT_STATE_DIR,
};
use crate::domain::{ServicePorts, DEFAULT_PIN_DIR, DEFAULT_SERVICE};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ConfigFile {
    services: Services,
    socket: PathBuf,
    socket_mode: FileMode,
    socket_group: Option<String>,
    cgroup: Option<PathBuf>,
    pin_dir: PathBuf,
    max_clients: PositiveCount,
    reconcile_interval_secs: PositiveSecs,
    monitors: Vec<Monitor>,
    max_tracked_ips_per_monitor: PositiveCount,
    state_dir: PathBuf,
    policy_socket: Option<PathBuf>,
    policy_socket_mode: FileMode,
    policy_socket_group: Option<String>,
    policy_limits: Vec<PolicyLimit>,
    client_idle_timeout_secs: PositiveSecs,
    request_timeout_secs: PositiveSecs,
    access: AccessFile,
    max_tracked_ips: TableSize,
    max_tracked_sessions: TableSize,
    event_ring_bytes: RingBytes,
    cluster: Option<ClusterConfig>,
    kernel_limits: Vec<KernelLimitEntry>,
    metrics_listen: Option<std::net::SocketAddr>,
    lua_policy_scripts: Vec<PathBuf>,
    lua_policy_fail_action: String,
    lua_policy_timeout_ms: PositiveCount,
    lua_policy_max_instructions: PositiveCount,
    lua_policy_max_memory_mb: PositiveCount,
    lua_policy_workers: PositiveCount,
    lua_policy_queue: PositiveCount,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            services: Services(vec![ServicePorts {
                name: DEFAULT_SERVICE.into(),
                ports: vec![25, 465, 587],
            }]),
            socket: DEFAULT_SOCKET_PATH.into(),
            socket_mode: FileMode(0o660),
            socket_group: None,
            cgroup: None,
            pin_dir: DEFAULT_PIN_DIR.into(),
            max_clients: PositiveCount(DEFAULT_MAX_CLIENTS),
            reconcile_interval_secs: PositiveSecs(Duration::from_secs(10)),
            monitors: Vec::new(),
            max_tracked_ips_per_monitor: PositiveCount(1_000_000),
            state_dir: DEFAULT_STATE_DIR.into(),
            policy_socket: None,
            policy_socket_mode: FileMode(0o660),
            policy_socket_group: None,
            policy_limits: Vec::new(),
            client_idle_timeout_secs: PositiveSecs(Duration::from_secs(300)),
            request_timeout_secs: PositiveSecs(Duration::from_secs(10)),
            access: AccessFile::default(),
            max_tracked_ips: TableSize(1 << 20),
            max_tracked_sessions: TableSize(1 << 20),
            event_ring_bytes: RingBytes(4 << 20),
            cluster: None,
            kernel_limits: Vec::new(),
            metrics_listen: None,
            lua_policy_scripts: Vec::new(),
            lua_policy_fail_action: "dunno".into(),
            lua_policy_timeout_ms: PositiveCount(1000),
            lua_policy_max_instructions: PositiveCount(10_000_000),
            lua_policy_max_memory_mb: PositiveCount(64),
            lua_policy_workers: PositiveCount(2),
            lua_policy_queue: PositiveCount(1024),
        }
    }
}

/// `[services]`: NAME = [PORT, ...]. Slots are assigned in name order, which
/// the map gives; names are checked with the flags' in `Config::validate`.
#[derive(Debug, Deserialize)]
#[serde(from = "BTreeMap<String, Vec<Port>>")]
struct Services(Vec<ServicePorts>);

impl From<BTreeMap<String, Vec<Port>>> for Services {
    fn from(map: BTreeMap<String, Vec<Port>>) -> Self {
        Self(
            map.into_iter()
                .map(|(name, ports)| ServicePorts {
                    name,
                    ports: ports.into_iter().map(|p| p.0).collect(),
                })
                .collect(),
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AccessFile {
    query_users: Vec<Uid>,
    query_groups: Vec<Gid>,
    add_users: Vec<Uid>,
    add_groups: Vec<Gid>,
}

impl From<ConfigFile> for Config {
    fn from(file: ConfigFile) -> Self {
        let uids = |ids: Vec<Uid>| ids.into_iter().map(|id| id.0).collect();
        let gids = |ids: Vec<Gid>| ids.into_iter().map(|id| id.0).collect();
        Config {
            services: file.services.0,
            socket: file.socket,
            socket_mode: file.socket_mode.0,
            socket_group: file.socket_group,
            cgroup: file.cgroup,
            pin_dir: file.pin_dir,
            max_clients: file.max_clients.0,
            reconcile_interval: file.reconcile_interval_secs.0,
            monitors: file.monitors.into_iter().map(|m| m.0).collect(),
            max_tracked_ips_per_monitor: file.max_tracked_ips_per_monitor.0,
            state_dir: file.state_dir,
            policy_socket: file.policy_socket,
            policy_socket_mode: file.policy_socket_mode.0,
            policy_socket_group: file.policy_socket_group,
            policy_limits: file.policy_limits.into_iter().map(|l| l.0).collect(),
            client_idle_timeout: file.client_idle_timeout_secs.0,
            request_timeout: file.request_timeout_secs.0,
            access: Access {
                query_uids: uids(file.access.query_users),
                query_gids: gids(file.access.query_groups),
                add_uids: uids(file.access.add_users),
                add_gids: gids(file.access.add_groups),
            },
            max_tracked_ips: file.max_tracked_ips.0,
            max_tracked_sessions: file.max_tracked_sessions.0,
            event_ring_bytes: file.event_ring_bytes.0,
            cluster: file.cluster,
            kernel_limits: file.kernel_limits.into_iter().map(|l| l.0).collect(),
            metrics_listen: file.metrics_listen,
            lua_policy: LuaPolicyConfig {
                scripts: file.lua_policy_scripts,
                fail_action: file.lua_policy_fail_action,
                timeout: Duration::from_millis(file.lua_policy_timeout_ms.0 as u64),
                max_instructions: file.lua_policy_max_instructions.0 as u64,
                max_memory: file.lua_policy_max_memory_mb.0.saturating_mul(1 << 20),
                workers: file.lua_policy_workers.0,
                queue: file.lua_policy_queue.0,
            },
        }
    }
}

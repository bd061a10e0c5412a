//! `[cluster]`: where Redis is and who this node is. Without the table (and
//! without `--cluster-redis`) clustering is off.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::values::{PositiveSecs, ValueError};
use crate::domain::valid_node_name;

/// Clustering's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ClusterFile")]
pub struct ClusterConfig {
    pub redis: RedisUrl,
    /// This node's name in the fleet; default: the host name.
    pub node: String,
    /// A file whose first line is the Redis password; never logged.
    pub password_file: Option<PathBuf>,
    /// The CA certificate (PEM) a `rediss://` server's is verified against;
    /// default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM, its chain after it) and its private key,
    /// for a `rediss://` server that verifies clients (`tls-auth-clients`).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Several fleets may share one Redis under different prefixes.
    pub key_prefix: String,
    /// A node silent this long no longer counts, and cluster answers older
    /// than this are refused.
    pub node_ttl: Duration,
}

pub const DEFAULT_KEY_PREFIX: &str = "inbound-audit";
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(5);

impl ClusterConfig {
    /// `--cluster-redis URL` without a `[cluster]` table: the defaults.
    pub fn with_redis(redis: RedisUrl) -> Result<Self, ValueError> {
        Ok(Self {
            redis,
            node: host_node_name()?,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            node_ttl: DEFAULT_NODE_TTL,
        })
    }
}

/// The table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    redis: RedisUrl,
    node: Option<NodeName>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    key_prefix: Option<KeyPrefix>,
    node_ttl_secs: Option<PositiveSecs>,
}

impl TryFrom<ClusterFile> for ClusterConfig {
    type Error = ValueError;

    fn try_from(file: ClusterFile) -> Result<Self, ValueError> {
        Ok(Self {
            redis: file.redis,
            node: match file.node {
                Some(node) => node.0,
                None => host_node_name()?,
            },
            password_file: file.password_file,
            ca_file: file.ca_file,
            cert_file: file.cert_file,
            key_file: file.key_file,
            key_prefix: file
                .key_prefix
                .map_or_else(|| DEFAULT_KEY_PREFIX.to_string(), |p| p.0),
            node_ttl: file.node_ttl_secs.map_or(DEFAULT_NODE_TTL, |s| s.0),
        })
    }
}

/// `redis://`, `rediss://` (TLS), `unix://`, `redis+sentinel://` or
/// `rediss+sentinel://` (TLS to the sentinels and the primary); whether it connects is
/// found out at run time (Redis may come later than the agent).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct RedisUrl(pub String);

impl TryFrom<String> for RedisUrl {
    type Error = ValueError;

    fn try_from(url: String) -> Result<Self, ValueError> {
        if [
            "redis://",
            "rediss://",
            "unix://",
            "redis+sentinel://",
            "rediss+sentinel://",
        ]
        .iter()
        .any(|scheme| url.starts_with(scheme) && url.len() > scheme.len())
        {
            Ok(Self(url))
        } else {
            Err(ValueError::RedisUrl(
                "expected redis://host:port/db, rediss://, unix:///path, \
                 redis+sentinel://host:port/primary or rediss+sentinel://"
                    .into(),
            ))
        }
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        Self::try_from(text.to_string())
    }
}

/// A URL may carry a password: only the part after it is shown.
impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (scheme, rest) = self.0.split_once("://").unwrap_or(("", &self.0));
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        write!(f, "{scheme}://{rest}")
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct NodeName(pub String);

impl TryFrom<String> for NodeName {
    type Error = ValueError;

    fn try_from(name: String) -> Result<Self, ValueError> {
        if valid_node_name(&name) {
            Ok(Self(name))
        } else {
            Err(ValueError::NodeName(name))
        }
    }
}

impl std::str::FromStr for NodeName {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        Self::try_from(text.to_string())
    }
}

#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
struct KeyPrefix(String);

impl TryFrom<String> for KeyPrefix {
    type Error = ValueError;

    fn try_from(prefix: String) -> Result<Self, ValueError> {
        // The same characters as node names, and `:` to nest under a site's own.
        let valid = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if valid {
            Ok(Self(prefix))
        } else {
            Err(ValueError::KeyPrefix(prefix))
        }
    }
}

/// The host name, as this node's default name.
fn host_node_name() -> Result<String, ValueError> {
    let name = nix::unistd::gethostname()
        .ok()
        .and_then(|n| n.into_string().ok())
        .unwrap_or_default();
    // A fully qualified host name keeps its first label only when that alone is valid.
    if valid_node_name(&name) {
        Ok(name)
    } else {
        Err(ValueError::NodeName(format!(
            "{name} (the host name; set `node`)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn cluster_table() {
        let config = Config::from_toml(
            "[cluster]\nredis = \"redis://:pw@127.0.0.1:6379/0\"\nnode = \"mx1\"\nnode_ttl_secs = 3\n",
        )
        .unwrap();
        let cluster = config.cluster.clone().unwrap();
        assert_eq!(cluster.node, "mx1");
        assert_eq!(cluster.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(cluster.node_ttl, Duration::from_secs(3));
        // The password in the URL never shows.
        assert_eq!(format!("{:?}", cluster.redis), "redis://127.0.0.1:6379/0");
        assert!(!format!("{config:?}").contains("pw"));
        assert!(Config::from_toml("").unwrap().cluster.is_none());
    }

    #[test]
    fn bad_cluster_keys_are_named() {
        for (text, key) in [
            ("[cluster]\nredis = \"http://x\"", "cluster.redis"),
            (
                "[cluster]\nredis = \"redis://x\"\nnode = \"mx 1\"",
                "cluster.node",
            ),
            (
                "[cluster]\nredis = \"redis://x\"\nkey_prefix = \"a b\"",
                "cluster.key_prefix",
            ),
            (
                "[cluster]\nredis = \"redis://x\"\nnode_ttl_secs = 0",
                "cluster.node_ttl_secs",
            ),
            (
                "[cluster]\nredis = \"redis://x\"\npassword = \"x\"",
                "password",
            ),
            ("[cluster]\nnode = \"mx1\"", "redis"),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err}");
        }
    }
}

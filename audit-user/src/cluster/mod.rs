//! Fleet-wide counts (Momentum's cluster view) through Redis.
//!
//! Every node publishes its own counts to Redis and follows every other
//! node's, merging them into a local [`Fleet`]; a cluster answer is this
//! node's local index plus the fleet's sum, both in memory, so the query path
//! never waits on Redis. Per node, under `<prefix>:node:<name>:`:
//! - `hb`: the heartbeat (run epoch, last batch, a beat counter), with a TTL;
//! - `snap`: a full snapshot of the node's counts as of one batch;
//! - `log`: a stream of batches of changed counts, one entry per publish.
//!
//! and `<prefix>:nodes`, the set of node names. Entries hold absolute counts
//! ([`wire`]), so replays are harmless and a reader that misses a batch (a
//! gap in the sequence) reloads the snapshot. A node restarted under a new
//! epoch replaces its earlier share; one whose heartbeat stops moving for
//! `node_ttl` leaves the sum.
//!
//! Why this shape and not per-prefix hashes summed in Redis: answers for any
//! prefix length and for one node's own view come from memory in
//! microseconds, and Redis being slow or gone cannot slow a query. The cost
//! is that every node reads every other node's stream (N² fan-out), which
//! the README's sizing section puts in numbers.

mod fleet;
mod link;
mod local;
mod node;
pub mod wire;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, RwLock, RwLockReadGuard,
    },
    time::{Duration, Instant},
};

pub use fleet::{Fleet, NodeShare};
pub use link::{read_password, read_pem, Pem, Target, TargetError};
pub use node::{run, LocalShare, Settings};

/// How this node talks to Redis, from `[cluster]`: the password file is read
/// and the URL checked now, so a mistake refuses the start.
pub fn settings(config: &crate::config::ClusterConfig) -> Result<Settings, TargetError> {
    let password = config
        .password_file
        .as_deref()
        .map(read_password)
        .transpose()?;
    let mut target = Target::parse(&config.redis.0, password.as_deref())?;
    let tls = target.uses_tls();
    for (key, path) in [
        ("ca_file", &config.ca_file),
        ("cert_file", &config.cert_file),
        ("key_file", &config.key_file),
    ] {
        // A TLS file next to a URL in the clear is a mistake, not a wish for
        // no TLS: refused, so the start does not quietly go unencrypted.
        if let (Some(path), false) = (path, tls) {
            return Err(TargetError::TlsWithoutTls {
                key,
                path: path.clone(),
            });
        }
    }
    if let Some(path) = &config.ca_file {
        target = target.with_root_cert(read_pem("ca_file", path, Pem::Certificates)?);
    }
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            target = target.with_identity(
                read_pem("cert_file", cert, Pem::Certificates)?,
                read_pem("key_file", key, Pem::PrivateKey)?,
            );
        }
        (Some(_), None) => {
            return Err(TargetError::HalfIdentity {
                given: "cert_file",
                missing: "key_file",
            })
        }
        (None, Some(_)) => {
            return Err(TargetError::HalfIdentity {
                given: "key_file",
                missing: "cert_file",
            })
        }
        (None, None) => {}
    }
    Ok(Settings::new(
        target,
        &config.node,
        &config.key_prefix,
        config.node_ttl,
    ))
}

/// The fleet view is older than `node_ttl`: Redis has not answered for that
/// long, so the other nodes' counts can no longer be vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no fleet data for {age_secs} s (node_ttl_secs {ttl_secs}): Redis unreachable")]
pub struct Unavailable {
    pub age_secs: u64,
    pub ttl_secs: u64,
}

/// Counters for `stats`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub batches_published: AtomicU64,
    pub snapshots_published: AtomicU64,
    pub publish_errors: AtomicU64,
    pub follow_errors: AtomicU64,
    pub snapshots_loaded: AtomicU64,
    /// Entries (or whole keys) read from Redis and refused as malformed.
    pub refused: AtomicU64,
}

impl ClusterStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What queries read: the merged fleet, and whether it is fresh enough.
pub struct ClusterView {
    node: String,
    ttl: Duration,
    started: Instant,
    fleet: RwLock<Fleet>,
    synced_at: Mutex<Option<Instant>>,
    pub stats: ClusterStats,
}

impl ClusterView {
    pub fn new(node: &str, ttl: Duration) -> Self {
        Self {
            node: node.to_string(),
            ttl,
            started: Instant::now(),
            fleet: RwLock::new(Fleet::default()),
            synced_at: Mutex::new(None),
            stats: ClusterStats::default(),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The other nodes' counts, while the last complete round with Redis is
    /// younger than `node_ttl`.
    pub fn fleet(&self) -> Result<RwLockReadGuard<'_, Fleet>, Unavailable> {
        let age = self.sync_age();
        match age {
            Some(age) if age < self.ttl => Ok(self.read()),
            _ => Err(Unavailable {
                age_secs: age.map_or(u64::MAX, |a| a.as_secs()),
                ttl_secs: self.ttl.as_secs(),
            }),
        }
    }

    /// Time since the last complete round with Redis; None before the first.
    pub fn sync_age(&self) -> Option<Duration> {
        self.synced_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())
    }

    /// How long ago each live node was last heard from.
    pub fn node_ages(&self) -> Vec<(String, Duration)> {
        let now = self.clock();
        let fleet = self.read();
        fleet
            .node_names()
            .filter_map(|name| {
                let share = fleet.node(name)?;
                Some((name.to_string(), now.saturating_sub(share.alive_at)))
            })
            .collect()
    }

    /// Entries held for the other nodes (their shares, the sum not counted).
    pub fn entries(&self) -> usize {
        self.read().entries()
    }

    /// Monotonic time since the view was made: node liveness is judged on
    /// this node's own clock, never by comparing clocks across hosts.
    fn clock(&self) -> Duration {
        self.started.elapsed()
    }

    /// The fleet whatever its age, for the rounds' own reads (queries go
    /// through [`ClusterView::fleet`], which checks freshness).
    fn read(&self) -> RwLockReadGuard<'_, Fleet> {
        self.fleet.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Fleet> {
        self.fleet.write().unwrap_or_else(|p| p.into_inner())
    }

    fn synced(&self) {
        *self.synced_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn settings(table: &str) -> Result<super::Settings, super::TargetError> {
        let config = Config::from_toml(&format!("[cluster]\nnode = \"mx1\"\n{table}")).unwrap();
        super::settings(config.cluster.as_ref().unwrap())
    }

    #[test]
    fn a_ca_file_needs_a_tls_url() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis+sentinel://127.0.0.1:26379/ia",
        ] {
            let err = settings(&format!(
                "redis = \"{url}\"\nca_file = \"/nonexistent/ca.pem\""
            ))
            .err()
            .unwrap_or_else(|| panic!("{url} with a ca_file was accepted"))
            .to_string();
            assert!(
                err.contains("cluster.ca_file") && err.contains("rediss://"),
                "{err}"
            );
        }
        // With rediss:// the file is read at once: a missing one is named.
        let err =
            settings("redis = \"rediss://127.0.0.1:6379/0\"\nca_file = \"/nonexistent/ca.pem\"")
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(settings("redis = \"redis://127.0.0.1:6379/0\"").is_ok());
    }

    #[test]
    fn a_client_certificate_needs_its_key_a_tls_url_and_pem_files() {
        let dir = std::env::temp_dir().join(format!("ia-cluster-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (empty, junk) = (dir.join("empty.pem"), dir.join("junk.pem"));
        std::fs::write(&empty, "").unwrap();
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let tls = "redis = \"rediss://127.0.0.1:6379/0\"\n";
        let error = |table: String| match settings(&table) {
            Ok(_) => panic!("accepted: {table}"),
            Err(e) => e.to_string(),
        };

        for (given, missing) in [("cert_file", "key_file"), ("key_file", "cert_file")] {
            let err = error(format!("{tls}{given} = \"{}\"", junk.display()));
            assert!(
                err.contains(&format!("cluster.{given} is set without cluster.{missing}")),
                "{err}"
            );
        }
        let both = |cert: &std::path::Path, key: &std::path::Path| {
            format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"",
                cert.display(),
                key.display()
            )
        };
        let err = error(format!(
            "redis = \"redis://127.0.0.1:6379/0\"\n{}",
            both(&junk, &junk)
        ));
        assert!(
            err.contains("cluster.cert_file") && err.contains("rediss://"),
            "{err}"
        );
        let err = error(format!("{tls}{}", both(&empty, &junk)));
        assert!(
            err.contains("cluster.cert_file") && err.contains("holds no PEM certificate"),
            "{err}"
        );
        let err = error(format!("{tls}{}", both(&dir.join("missing.pem"), &junk)));
        assert!(
            err.starts_with("cannot read cluster.cert_file") && err.contains("missing.pem"),
            "{err}"
        );
        let err = error(format!("{tls}ca_file = \"{}\"", junk.display()));
        assert!(
            err.contains("cluster.ca_file") && err.contains("holds no PEM certificate"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

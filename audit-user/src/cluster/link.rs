//! The connection to Redis: one multiplexed connection, dropped on any error
//! and made again on the next use. Under Sentinel every new connection asks
//! the sentinels for the current primary, so a failover is followed by the
//! next reconnect. (The redis crate's ConnectionManager reconnects to the
//! address it started with, which after a failover is the old primary.)

use std::time::Duration;

use redis::{
    aio::MultiplexedConnection,
    sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType},
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo,
    IntoConnectionInfo, RedisConnectionInfo, TlsCertificates, TlsMode,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// Why the Redis URL or password cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("redis URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot read cluster.{key} {path}: {source}")]
    TlsFile {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cluster.{key} {path}: {reason}")]
    TlsPem {
        key: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "cluster.{key} {path} is set, but only rediss:// and rediss+sentinel:// URLs \
         use TLS (redis://, unix:// and redis+sentinel:// connect in the clear)"
    )]
    TlsWithoutTls {
        key: &'static str,
        path: std::path::PathBuf,
    },
    #[error(
        "cluster.{given} is set without cluster.{missing}: a client certificate \
         needs its private key, and the key its certificate"
    )]
    HalfIdentity {
        given: &'static str,
        missing: &'static str,
    },
    #[error("cannot read the Redis password file {path}: {source}")]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Where Redis is.
#[derive(Clone)]
pub enum Target {
    /// `redis://[user:password@]host:port/db`, or `rediss://` with TLS
    /// (`tls`, Some just then, says what is verified and shown).
    Direct {
        info: ConnectionInfo,
        tls: Option<Box<Tls>>,
    },
    /// `redis+sentinel://[user:password@]host:port[,host:port...]/primary[/db]`:
    /// the sentinels, the name they know the primary by, and how to log in to
    /// it; `rediss+sentinel://`: TLS (`tls`) to the sentinels and the primary.
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        primary: String,
        redis: RedisConnectionInfo,
        tls: Option<Box<Tls>>,
    },
}

/// What a TLS connection checks and shows: the server's certificate
/// against `root_cert` (PEM) or else the system's roots, and `identity` (a
/// client certificate and its key) to a server that asks for one.
#[derive(Clone, Default)]
pub struct Tls {
    root_cert: Option<Vec<u8>>,
    identity: Option<ClientTlsConfig>,
}

impl Tls {
    /// None: the defaults (the system's roots, no client certificate).
    fn certificates(&self) -> Option<TlsCertificates> {
        (self.root_cert.is_some() || self.identity.is_some()).then(|| TlsCertificates {
            client_tls: self.identity.clone(),
            root_cert: self.root_cert.clone(),
        })
    }
}

impl std::fmt::Debug for Target {
    // Never prints a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Direct { info, .. } => {
                let scheme = match info.addr() {
                    ConnectionAddr::TcpTls { .. } => "rediss",
                    ConnectionAddr::Unix(_) => "unix",
                    _ => "redis",
                };
                write!(f, "{scheme}://{}", info.addr())
            }
            Target::Sentinel {
                sentinels,
                primary,
                tls,
                ..
            } => {
                let addrs: Vec<String> = sentinels.iter().map(|s| s.addr().to_string()).collect();
                let scheme = if tls.is_some() { "rediss" } else { "redis" };
                write!(f, "{scheme}+sentinel://{}/{primary}", addrs.join(","))
            }
        }
    }
}

impl Target {
    /// Parses the configured URL; `password` (from the password file) replaces
    /// any password in it.
    pub fn parse(url: &str, password: Option<&str>) -> Result<Self, TargetError> {
        let invalid = |reason: &str| TargetError::Url {
            // The URL may hold a password: only its scheme is repeated.
            url: url.split("://").next().unwrap_or("").to_string() + "://…",
            reason: reason.to_string(),
        };
        let sentinel = [("redis+sentinel://", false), ("rediss+sentinel://", true)]
            .into_iter()
            .find_map(|(scheme, tls)| Some((url.strip_prefix(scheme)?, tls)));
        if let Some((rest, tls)) = sentinel {
            let (auth, rest) = match rest.rsplit_once('@') {
                Some((auth, rest)) => (Some(auth), rest),
                None => (None, rest),
            };
            let (hosts, path) = rest
                .split_once('/')
                .ok_or_else(|| invalid("needs /primary-name after the sentinels"))?;
            let (primary, db) = match path.split_once('/') {
                Some((primary, db)) => (
                    primary,
                    db.parse::<i64>()
                        .map_err(|_| invalid("the database is not a number"))?,
                ),
                None => (path, 0),
            };
            if primary.is_empty() {
                return Err(invalid("the primary's name is empty"));
            }
            let sentinels = hosts
                .split(',')
                .map(|host| {
                    let scheme = if tls { "rediss" } else { "redis" };
                    format!("{scheme}://{host}")
                        .into_connection_info()
                        .map_err(|_| invalid("a sentinel is not host:port"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            // `user`, `user:password` or `:password`, percent-decoded as in
            // redis:// URLs: the redis crate reads it from one of those. A
            // user named without a password (the password in password_file)
            // is still that user.
            let mut redis = match auth {
                Some(auth) => format!("redis://{auth}@localhost/")
                    .into_connection_info()
                    .map_err(|_| invalid("the user or password is not valid in a URL"))?
                    .redis_settings()
                    .clone(),
                None => RedisConnectionInfo::default(),
            }
            .set_db(db);
            if let Some(password) = password {
                redis = redis.set_password(password);
            }
            return Ok(Target::Sentinel {
                sentinels,
                primary: primary.to_string(),
                redis,
                tls: tls.then(Box::default),
            });
        }
        if !["redis://", "rediss://", "unix://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(invalid(
                "expected redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel://",
            ));
        }
        let mut info = url
            .into_connection_info()
            .map_err(|e| invalid(&e.to_string()))?;
        if let Some(password) = password {
            let redis = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis);
        }
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        Ok(Target::Direct {
            info,
            tls: tls.then(Box::default),
        })
    }

    /// The TLS settings, for a URL with TLS (None in the clear).
    fn tls_mut(&mut self) -> Option<&mut Tls> {
        match self {
            Target::Direct { tls, .. } | Target::Sentinel { tls, .. } => tls.as_deref_mut(),
        }
    }

    /// Verifies the server (and under Sentinel, the sentinels) against this
    /// CA certificate (PEM) instead of the system's roots; no change to a
    /// target in the clear.
    pub fn with_root_cert(mut self, pem: Vec<u8>) -> Self {
        if let Some(tls) = self.tls_mut() {
            tls.root_cert = Some(pem);
        }
        self
    }

    /// Shows this client certificate (chain) and key, both PEM, to a server
    /// that verifies its clients; no change to a target in the clear.
    pub fn with_identity(mut self, cert: Vec<u8>, key: Vec<u8>) -> Self {
        if let Some(tls) = self.tls_mut() {
            tls.identity = Some(ClientTlsConfig {
                client_cert: cert,
                client_key: key,
            });
        }
        self
    }

    /// Whether the URL asks for TLS.
    pub fn uses_tls(&self) -> bool {
        match self {
            Target::Direct { tls, .. } | Target::Sentinel { tls, .. } => tls.is_some(),
        }
    }
}

/// What a TLS file named by `[cluster]` must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pem {
    /// One certificate or more (a CA, or a client certificate and its chain).
    Certificates,
    /// One private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Reads the PEM file of `cluster.<key>` and checks that it holds what
/// `want` says, so a wrong or empty file refuses the start, naming the key,
/// rather than failing every connection later.
pub fn read_pem(
    key: &'static str,
    path: &std::path::Path,
    want: Pem,
) -> Result<Vec<u8>, TargetError> {
    let pem = std::fs::read(path).map_err(|source| TargetError::TlsFile {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| TargetError::TlsPem {
        key,
        path: path.to_path_buf(),
        reason,
    };
    match want {
        Pem::Certificates => {
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("not a PEM certificate ({e})")))?;
            if certs.is_empty() {
                return Err(invalid("holds no PEM certificate".into()));
            }
        }
        Pem::PrivateKey => {
            // The error never quotes the key.
            PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|_| invalid("holds no PEM private key".into()))?;
        }
    }
    Ok(pem)
}

/// Reads a password file: its first line, without the line break.
pub fn read_password(path: &std::path::Path) -> Result<String, TargetError> {
    let text = std::fs::read_to_string(path).map_err(|source| TargetError::PasswordFile {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// A Sentinel client logging in to the primary as `redis` says; with `tls`,
/// speaking TLS to the sentinels and to the primary they name, each
/// verified (and shown a certificate) as it says.
fn sentinel_client(
    sentinels: &[ConnectionInfo],
    primary: &str,
    redis: &RedisConnectionInfo,
    tls: Option<&Tls>,
) -> redis::RedisResult<SentinelClient> {
    let addrs = sentinels.iter().map(|s| s.addr().clone());
    let mut builder = SentinelClientBuilder::new(addrs, primary, SentinelServerType::Master)?
        .set_client_to_redis_db(redis.db());
    if let Some(user) = redis.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = redis.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(tls) = tls {
        builder = builder
            .set_client_to_sentinel_tls_mode(TlsMode::Secure)
            .set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(certificates) = tls.certificates() {
            builder = builder
                .set_client_to_sentinel_certificates(certificates.clone())
                .set_client_to_redis_certificates(certificates);
        }
    }
    builder.build()
}

/// A connection made on demand.
pub struct Link {
    target: Target,
    config: AsyncConnectionConfig,
    timeout: Duration,
    connection: Option<MultiplexedConnection>,
}

impl Link {
    /// `timeout` bounds connecting and every answer: a stopped Redis makes
    /// a round fail after it, never hang.
    pub fn new(target: Target, timeout: Duration) -> Self {
        // rustls needs one crypto provider for the process; a second install
        // (another Link) is refused harmlessly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            target,
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            timeout,
            connection: None,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The connection, made now if there is none.
    pub async fn get(&mut self) -> redis::RedisResult<&mut MultiplexedConnection> {
        if self.connection.is_none() {
            let client = match &self.target {
                Target::Direct { info, tls } => match tls.as_deref().and_then(Tls::certificates) {
                    None => Client::open(info.clone())?,
                    Some(certificates) => Client::build_with_tls(info.clone(), certificates)?,
                },
                Target::Sentinel {
                    sentinels,
                    primary,
                    redis,
                    tls,
                } => {
                    let mut sentinel = sentinel_client(sentinels, primary, redis, tls.as_deref())?;
                    let connect = sentinel.async_get_client();
                    // Asking the sentinels has no timeout of its own.
                    tokio::time::timeout(self.timeout, connect)
                        .await
                        .map_err(|_| {
                            redis::RedisError::from(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "asking the sentinels for the primary timed out",
                            ))
                        })??
                }
            };
            let connection = client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            self.connection = Some(connection);
        }
        Ok(self.connection.as_mut().expect("set above"))
    }

    /// Forgets the connection after an error; the next use makes a new one.
    pub fn broken(&mut self) {
        self.connection = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str, password: Option<&str>) -> (Vec<String>, String, RedisConnectionInfo) {
        match Target::parse(url, password).unwrap() {
            Target::Sentinel {
                sentinels,
                primary,
                redis,
                ..
            } => (
                sentinels.iter().map(|s| s.addr().to_string()).collect(),
                primary,
                redis,
            ),
            Target::Direct { .. } => panic!("{url} is not a sentinel URL"),
        }
    }

    #[test]
    fn sentinel_urls() {
        let (hosts, primary, redis) =
            sentinel("redis+sentinel://h1:26379,h2:26380/mymaster/2", None);
        assert_eq!(hosts, ["h1:26379", "h2:26380"]);
        assert_eq!(primary, "mymaster");
        assert_eq!(
            (redis.db(), redis.username(), redis.password()),
            (2, None, None)
        );
        // A user without a password in the URL keeps its name: the
        // password comes from password_file.
        let (_, _, redis) = sentinel("redis+sentinel://inbound-audit@h1:26379/ia", Some("s3cret"));
        assert_eq!(
            (redis.username(), redis.password()),
            (Some("inbound-audit"), Some("s3cret"))
        );
        let (_, _, redis) = sentinel("redis+sentinel://u:p%40ss@h1:26379/ia", None);
        assert_eq!(
            (redis.username(), redis.password()),
            (Some("u"), Some("p@ss"))
        );
        let (_, _, redis) = sentinel("redis+sentinel://:pw@h1:26379/ia", Some("file"));
        assert_eq!((redis.username(), redis.password()), (None, Some("file")));
        for bad in [
            "redis+sentinel://h1:26379",
            "redis+sentinel://h1:26379//0",
            "redis+sentinel://h1:26379/ia/x",
        ] {
            assert!(Target::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn rediss_sentinel_urls_use_tls_to_sentinels_and_primary() {
        let target =
            Target::parse("rediss+sentinel://u@h1:26379,h2:26380/ia/1", Some("pw")).unwrap();
        assert!(target.uses_tls());
        assert_eq!(
            format!("{target:?}"),
            "rediss+sentinel://h1:26379,h2:26380/ia"
        );
        let Target::Sentinel {
            sentinels, redis, ..
        } = &target
        else {
            panic!("{target:?}");
        };
        assert!(sentinels
            .iter()
            .all(|s| matches!(s.addr(), ConnectionAddr::TcpTls { .. })));
        assert_eq!((redis.db(), redis.username()), (1, Some("u")));
        let clear = Target::parse("redis+sentinel://h1:26379/ia", None).unwrap();
        assert!(!clear.uses_tls());
        assert_eq!(format!("{clear:?}"), "redis+sentinel://h1:26379/ia");
        assert!(Target::parse("rediss://h1:6380/0", None)
            .unwrap()
            .uses_tls());
        assert!(!Target::parse("redis://h1:6379/0", None).unwrap().uses_tls());
    }

    #[test]
    fn errors_and_debug_never_show_the_password() {
        let target = Target::parse("redis+sentinel://u:hunter2@h1:26379/ia", None).unwrap();
        assert!(!format!("{target:?}").contains("hunter2"));
        let target = Target::parse("redis://u:hunter2@h1:6379/0", None).unwrap();
        assert!(!format!("{target:?}").contains("hunter2"));
        let err = Target::parse("redis+sentinel://u:hunter2@h1:26379", None).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

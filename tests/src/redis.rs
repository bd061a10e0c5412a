//! A private redis-server (and the ports for it) for the cluster tests: its
//! own directory, no persistence, on a loopback port below the ephemeral
//! range; killed and removed when dropped.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A private redis-server on a loopback port below the ephemeral range.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    extra: Vec<String>,
    /// Serve TLS only, on `port`.
    tls: bool,
    /// With TLS: refuse clients without a certificate signed by the CA.
    verify_clients: bool,
}

/// The PEM files of a TLS Redis, in its directory: the CA that signed the
/// server's certificate (and the client's), and a client certificate and key.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Redis {
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("ia-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = Self {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls: false,
            verify_clients: false,
        };
        redis.spawn();
        Some(redis)
    }

    /// A redis-server that speaks TLS only, with a certificate for 127.0.0.1
    /// made here by openssl, signed by a CA of its own: `(server, CA PEM)`.
    pub fn start_tls() -> Option<(Self, Vec<u8>)> {
        let (redis, files) = Self::start_tls_with(false)?;
        let ca = std::fs::read(files.ca).expect("CA");
        Some((redis, ca))
    }

    /// As [`start_tls`](Self::start_tls), but only clients showing a
    /// certificate signed by that CA get in (`tls-auth-clients yes`); one
    /// such certificate is made for the test.
    pub fn start_mtls() -> Option<(Self, TlsFiles)> {
        Self::start_tls_with(true)
    }

    fn start_tls_with(verify_clients: bool) -> Option<(Self, TlsFiles)> {
        let mut redis = Self::start()?;
        redis.kill();
        let dir = redis.dir.clone();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        // A certificate signed by the CA: `name`.pem and `name`.key.
        let signed = |name: &str, subject: &str, extensions: &str| {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            let ext = format!("{name}.ext");
            std::fs::write(dir.join(&ext), extensions).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.pem"),
            ]);
        };
        signed("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\n");
        signed(
            "client",
            "/CN=inbound-audit",
            "extendedKeyUsage=clientAuth\n",
        );
        redis.tls = true;
        redis.verify_clients = verify_clients;
        redis.spawn();
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        Some((redis, files))
    }

    pub fn spawn(&mut self) {
        let port = self.port.to_string();
        let ports: Vec<&str> = if self.tls {
            vec![
                "--port",
                "0",
                "--tls-port",
                &port,
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                if self.verify_clients { "yes" } else { "no" },
            ]
        } else {
            vec!["--port", &port]
        };
        let child = Command::new("redis-server")
            .current_dir(&self.dir)
            .args(&ports)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One redis-cli command as the default user (over TLS, trusting the
    /// test's CA, when the server speaks TLS); its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if self.tls {
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(self.dir.join("ca.pem"));
            if self.verify_clients {
                command
                    .arg("--cert")
                    .arg(self.dir.join("client.pem"))
                    .arg("--key")
                    .arg(self.dir.join("client.key"));
            }
        }
        let out = command.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A redis-sentinel watching `primary` under the name `name`, with quorum 1
/// and a short `down-after-milliseconds`, so a test's failover takes seconds.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    pub name: String,
    conf: PathBuf,
    /// Speaks TLS only: the directory of the primary's PEM files.
    tls: Option<PathBuf>,
}

impl Sentinel {
    /// None (saying why) where redis-sentinel is not installed.
    pub fn start(primary: &Redis, name: &str, down_after_ms: u32) -> Option<Self> {
        if Command::new("redis-sentinel")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: redis-sentinel is not installed (apt-get install redis-sentinel)");
            return None;
        }
        let port = free_port();
        // The sentinel rewrites its configuration file: one of its own.
        let conf = primary.dir.join(format!("sentinel-{port}.conf"));
        // Beside a TLS primary, TLS only: to its clients (with the primary's
        // certificate, made for 127.0.0.1) and to the primary.
        // It verifies its clients where the primary does (and shows the
        // primary its own certificate, which has no usage restriction).
        let listen = if primary.tls {
            let verify = if primary.verify_clients { "yes" } else { "no" };
            format!(
                "port 0\ntls-port {port}\ntls-cert-file server.pem\ntls-key-file server.key\n\
                 tls-ca-cert-file ca.pem\ntls-replication yes\ntls-auth-clients {verify}\n"
            )
        } else {
            format!("port {port}\n")
        };
        std::fs::write(
            &conf,
            format!(
                "{listen}bind 127.0.0.1\ndir {}\n\
                 sentinel monitor {name} 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds {name} {down_after_ms}\n\
                 sentinel failover-timeout {name} 5000\n",
                primary.dir.display(),
                primary.port
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-sentinel")
            .current_dir(&primary.dir)
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-sentinel");
        let sentinel = Self {
            child,
            port,
            name: name.to_string(),
            conf,
            tls: primary.tls.then(|| primary.dir.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-sentinel did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(sentinel)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if let Some(dir) = &self.tls {
            // The test's client certificate, for a sentinel that asks.
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(dir.join("ca.pem"))
                .arg("--cert")
                .arg(dir.join("client.pem"))
                .arg("--key")
                .arg(dir.join("client.key"));
        }
        let out = command.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port of the primary the sentinel names now.
    pub fn primary_port(&self) -> Option<u16> {
        let answer = self.cli(&["SENTINEL", "get-master-addr-by-name", &self.name]);
        answer.lines().nth(1)?.trim().parse().ok()
    }

    /// Replicas the sentinel knows and holds up (neither down nor disconnected).
    pub fn healthy_replicas(&self) -> usize {
        // `--no-raw`-free output: one field per line, `flags` then its value.
        let answer = self.cli(&["SENTINEL", "replicas", &self.name]);
        let lines: Vec<&str> = answer.lines().map(str::trim).collect();
        lines
            .windows(2)
            .filter(|w| w[0] == "flags" && w[1] == "slave")
            .count()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port below the ephemeral range, never one handed out
/// before by this process (servers restart on theirs).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 1_000) as u16 * 8;
    loop {
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(port < 32_768, "no free port below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

//! The real agent binary under test, and a lean client for its query socket.

use std::{
    collections::HashMap,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::env;

/// Kernel table sizes for every bench agent: room for 1M synthetic IPs plus
/// the real connections. The pinned maps keep the sizes they were created
/// with, so the pre-filling loader and the agent must agree on them.
pub const TABLE_SIZE: u32 = 1 << 21;

/// One agent process with its own socket, pin directory and log.
pub struct BenchAgent {
    binary: PathBuf,
    child: Option<Child>,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    /// The network namespace it runs in (`/run/netns/NAME`, entered by nsenter); None: ours.
    netns: Option<String>,
}

impl BenchAgent {
    /// The pin directory of the agent named `name` (unique to this run).
    pub fn pin_dir_for(name: &str) -> PathBuf {
        PathBuf::from(format!(
            "/sys/fs/bpf/inbound-audit-bench-{}-{name}",
            std::process::id()
        ))
    }

    /// Prepares (does not start) an agent watching `cgroup` for `services`
    /// (`NAME=PORT[,PORT...]`). Its reconciler runs the two quick passes after
    /// start-up and then once an hour: the measurements see the event path
    /// alone, and the churn run proves counts stay exact without repairs.
    pub fn new(binary: &Path, name: &str, cgroup: &Path, services: &[String]) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("inbound-audit-bench-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // The socket directory must not be world-writable (the agent refuses it).
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "# written by the benchmark runner\n\
                 max_tracked_ips = {TABLE_SIZE}\n\
                 max_tracked_sessions = {TABLE_SIZE}\n\
                 max_tracked_ips_per_monitor = {TABLE_SIZE}\n\
                 max_clients = 4096\n"
            ),
        )?;
        let socket = dir.join("audit.sock");
        let pin_dir = Self::pin_dir_for(name);
        let mut args = vec![
            "agent".to_string(),
            "--config".into(),
            config.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--cgroup".into(),
            cgroup.display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--reconcile-interval".into(),
            "3600".into(),
        ];
        for service in services {
            args.push("--service".into());
            args.push(service.clone());
        }
        Ok(Self {
            binary: binary.to_path_buf(),
            child: None,
            socket,
            pin_dir,
            dir,
            args,
            netns: None,
        })
    }

    /// Runs the agent (from its next start) inside the namespace at `path`:
    /// kernel limits attach there.
    pub fn in_netns(&mut self, path: String) {
        self.netns = Some(path);
    }

    /// The config file the agent reads (at start and on SIGHUP).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("bench.toml")
    }

    /// Appends `text` to the config file, for the next start or reload.
    pub fn append_config(&self, text: &str) -> Result<()> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.config_path())?;
        file.write_all(text.as_bytes())?;
        Ok(())
    }

    /// SIGHUP: the agent reloads its config file.
    pub fn reload(&self) -> Result<()> {
        let pid = self.pid().context("agent not running")?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        Ok(())
    }

    /// Starts the agent and waits until it answers queries.
    pub fn start(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = match &self.netns {
            Some(path) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net={path}")).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if inbound_audit::serving::client::query(&self.socket, "stats").is_ok() {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!(
                    "the agent exited with {status} before serving:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!("the agent did not serve within 180 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// More agent flags, for the next start.
    pub fn add_args(&mut self, args: &[&str]) {
        self.args.extend(args.iter().map(ToString::to_string));
    }

    /// The agent's --state-dir (where it saves and loads the monitor windows).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGTERM and wait; the kernel programs stay attached (pinned).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("agent exited with {status}:\n{}", self.log_text());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Detaches the programs and removes the pinned maps, with the agent's own
    /// `cleanup` command.
    pub fn cleanup_pins(&self) -> Result<()> {
        let status = Command::new(&self.binary)
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!(
                "inbound-audit cleanup --pin-dir {} failed",
                self.pin_dir.display()
            );
        }
        Ok(())
    }

    /// Waits until the agent has finished its start-up work (loading the
    /// pinned records, the quick reconcile passes): its CPU use over the last
    /// second stays under 2 % of a core, at least `min` after start.
    pub fn wait_quiet(&self, min: Duration) -> Result<Duration> {
        let pid = self.pid().context("agent not running")?;
        let start = Instant::now();
        std::thread::sleep(min);
        let mut last = env::cpu_seconds(pid).unwrap_or(0.0);
        loop {
            std::thread::sleep(Duration::from_millis(1000));
            let now = env::cpu_seconds(pid).context("agent gone")?;
            if now - last < 0.02 {
                return Ok(start.elapsed());
            }
            last = now;
            if start.elapsed() > Duration::from_secs(300) {
                bail!("the agent stayed busy for 300 s");
            }
        }
    }

    pub fn client(&self) -> Result<QueryClient> {
        QueryClient::connect(&self.socket)
    }

    /// The agent's `stats` counters.
    pub fn stats(&self) -> Result<HashMap<String, String>> {
        let lines = inbound_audit::serving::client::query_report(&self.socket, "stats")?
            .map_err(|e| anyhow::anyhow!("stats: {e}"))?;
        Ok(lines
            .iter()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    pub fn stat_u64(&self, name: &str) -> Result<u64> {
        self.stats()?
            .get(name)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no numeric `{name}` in the agent's stats"))
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.cleanup_pins();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One persistent connection to the query socket, with no buffering layer in
/// the way: the request is one write, the answer is read straight into a
/// reused buffer. Its own cost is part of every socket figure, so it is kept
/// to what an MTA's client would at least pay.
pub struct QueryClient {
    stream: UnixStream,
    buffer: Vec<u8>,
    pending: usize,
}

impl QueryClient {
    pub fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            buffer: vec![0; 4096],
            pending: 0,
        })
    }

    /// Sends `request` (which must end in LF) and returns the count of an
    /// `OK <n>` answer.
    pub fn count(&mut self, request: &[u8]) -> Result<u64> {
        self.stream.write_all(request)?;
        let line = self.read_line()?;
        let text = std::str::from_utf8(line)?;
        text.strip_prefix("OK ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected answer {text:?}"))
    }

    /// The next answer line, without LF.
    fn read_line(&mut self) -> Result<&[u8]> {
        loop {
            if let Some(end) = self.buffer[..self.pending].iter().position(|&b| b == b'\n') {
                // One request is in flight at a time, so nothing follows the LF.
                self.pending = 0;
                return Ok(&self.buffer[..end]);
            }
            if self.pending == self.buffer.len() {
                bail!("answer longer than {} bytes", self.buffer.len());
            }
            let n = self.stream.read(&mut self.buffer[self.pending..])?;
            if n == 0 {
                bail!("the agent closed the connection");
            }
            self.pending += n;
        }
    }
}

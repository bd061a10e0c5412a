//! A private Postfix instance (Debian's `postfix` package) for the tests and
//! the bench: its own config directory, queue and log under one directory,
//! listening on one loopback address, started inside a given cgroup (so the
//! agent watching that cgroup counts its sessions), optionally inside a
//! network namespace. Errors come back as io::Error with Postfix's own log in
//! the message, so a test can panic with it and the bench can report it.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

pub const POSTFIX: &str = "/usr/sbin/postfix";
/// Postfix's load generator (same package).
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// Debian 12's master.cf with the `smtp inet` line on `@LISTEN@`.
const MASTER_CF: &str = include_str!("../fixtures/postfix/master.cf");

/// The policy socket, relative to the queue directory: smtpd runs chrooted
/// there (Debian's default), and every Postfix daemon's working directory is
/// the queue directory, so `unix:inbound-audit/policy.sock` works chrooted or
/// not. The directory is root's (0755), as README.md suggests.
pub const POLICY_DIR_IN_QUEUE: &str = "inbound-audit";
pub const POLICY_IN_QUEUE: &str = "inbound-audit/policy.sock";

/// Why Postfix cannot run here, if it cannot (a test says SKIPPED with it).
pub fn unavailable() -> Option<String> {
    if Path::new(POSTFIX).exists() {
        None
    } else {
        Some(format!(
            "{POSTFIX} is missing; install Debian's postfix package \
             (DEBIAN_FRONTEND=noninteractive apt-get install -y postfix)"
        ))
    }
}

/// A private Postfix instance under `dir`: conf/, queue/, data/, maillog.
pub struct Postfix {
    dir: PathBuf,
    pub listen: SocketAddr,
    cgroup_dir: PathBuf,
    /// The namespace master runs in (entered by nsenter); None: ours.
    netns: Option<String>,
    /// main.cf's restrictions in place of the README's two checks, with
    /// `@POLICY@` for the policy target (see `with_restrictions`).
    restrictions: Option<String>,
    /// `postfix start-fg` (postfix-script, the parent of master).
    child: Option<Child>,
}

impl Postfix {
    pub fn conf(&self) -> PathBuf {
        self.dir.join("conf")
    }

    pub fn queue(&self) -> PathBuf {
        self.dir.join("queue")
    }

    pub fn maillog_path(&self) -> PathBuf {
        self.dir.join("maillog")
    }

    /// The policy socket's absolute path.
    pub fn policy_socket(&self) -> PathBuf {
        self.queue().join(POLICY_IN_QUEUE)
    }

    pub fn maillog(&self) -> String {
        std::fs::read_to_string(self.maillog_path()).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- Postfix maillog ({}) ---\n{}--- postfix start-fg output ---\n{}",
            self.maillog_path().display(),
            self.maillog(),
            std::fs::read_to_string(self.dir.join("start-fg.out")).unwrap_or_default()
        )
    }

    /// Writes the config (`policy` as the check_policy_service target, if
    /// any) and lets `postfix check` create the queue directory (the agent's
    /// policy socket goes into it, so this comes first). `netns`: where
    /// `start` runs master; `listen` is an address there.
    pub fn configure(
        dir: &Path,
        listen: SocketAddr,
        cgroup_dir: &Path,
        netns: Option<&NetNs>,
        policy: Option<&str>,
    ) -> io::Result<Self> {
        let postfix = Self {
            dir: dir.to_path_buf(),
            listen,
            cgroup_dir: cgroup_dir.to_path_buf(),
            netns: netns.map(|ns| ns.path()),
            restrictions: None,
            child: None,
        };
        // Postfix's daemons run as user postfix: the path must be searchable
        // whatever the umask.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        for sub in ["conf", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // data_directory must belong to mail_owner, or `postfix check` warns.
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .output()?;
        if !chown.status.success() {
            return Err(io::Error::other(format!("chown postfix data: {chown:?}")));
        }
        std::fs::write(
            postfix.conf().join("master.cf"),
            MASTER_CF.replace("@LISTEN@", &listen.to_string()),
        )?;
        postfix.write_main_cf(policy, "")?;
        postfix.run(&["check"])?;
        let policy_dir = postfix.queue().join(POLICY_DIR_IN_QUEUE);
        std::fs::create_dir_all(&policy_dir)?;
        std::fs::set_permissions(&policy_dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(postfix)
    }

    /// Rewrites main.cf with `restrictions` (e.g. a README block checking
    /// every phase, `@POLICY@` standing for the socket) instead of the
    /// README's checks at RCPT and END-OF-MESSAGE.
    pub fn with_restrictions(mut self, restrictions: &str) -> io::Result<Self> {
        self.restrictions = Some(restrictions.to_string());
        self.write_main_cf(Some(&format!("unix:{POLICY_IN_QUEUE}")), "")?;
        Ok(self)
    }

    /// main.cf with `policy` as the check_policy_service target at RCPT and
    /// END-OF-MESSAGE, or in the restrictions `with_restrictions` set (None:
    /// no policy check), plus `extra` lines.
    pub fn write_main_cf(&self, policy: Option<&str>, extra: &str) -> io::Result<()> {
        let dir = self.dir.display();
        let host = self.listen.ip();
        let checks = match (policy, &self.restrictions) {
            (Some(policy), Some(restrictions)) => {
                format!("{}\n", restrictions.replace("@POLICY@", policy))
            }
            (Some(policy), None) => format!(
                "smtpd_recipient_restrictions =\n    check_policy_service {policy}\n\
                 smtpd_end_of_data_restrictions =\n    check_policy_service {policy}\n\
                 smtpd_policy_service_default_action = DUNNO\n\
                 smtpd_policy_service_timeout = 10s\n\
                 smtpd_policy_service_max_idle = 300s\n"
            ),
            (None, _) => String::new(),
        };
        let text = format!(
            "# A private instance for the tests and the bench (Postfix does not allow\n\
             # comments after a value, only on lines of their own).\n\
             compatibility_level = 3.6\n\
             queue_directory = {dir}/queue\n\
             data_directory = {dir}/data\n\
             # Postfix 3.4+: log to a file through postlogd; no syslog needed.\n\
             maillog_file = {dir}/maillog\n\
             maillog_file_prefixes = {dir}\n\
             myhostname = postfix-test.invalid\n\
             mydestination =\n\
             alias_maps =\n\
             alias_database =\n\
             inet_interfaces = {host}\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             # No DNS here: never look up the client's name.\n\
             smtpd_peername_lookup = no\n\
             # Accepted test mail is thrown away, not relayed.\n\
             default_transport = discard\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             # From here on as in README.md (## Postfix).\n\
             {checks}\
             {extra}"
        );
        std::fs::write(self.conf().join("main.cf"), text)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = match &self.netns {
            Some(path) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net={path}")).arg(POSTFIX);
                command
            }
            None => Command::new(POSTFIX),
        };
        command.arg("-c").arg(self.conf()).args(args);
        command
    }

    /// `postfix -c conf ARGS`, which must succeed. Postfix writes its errors to
    /// the maillog (stderr only when it is a terminal).
    pub fn run(&self, args: &[&str]) -> io::Result<Output> {
        let output = self.command(args).output()?;
        if !output.status.success() {
            return Err(io::Error::other(format!(
                "postfix {args:?} failed: {output:?}\n{}",
                self.logs()
            )));
        }
        Ok(output)
    }

    /// `postfix start-fg` inside the cgroup, so the sockets of master's
    /// listener (and smtpd's accepted sessions) belong to it; returns once
    /// `ready` (e.g. an SMTP banner read from a probe address) holds.
    pub fn start(&mut self, mut ready: impl FnMut(&Self) -> bool) -> io::Result<()> {
        let out = std::fs::File::create(self.dir.join("start-fg.out"))?;
        let mut command = self.command(&["start-fg"]);
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        crate::join_cgroup_on_exec(&mut command, &self.cgroup_dir);
        self.child = Some(command.spawn()?);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().expect("started").try_wait()? {
                return Err(io::Error::other(format!(
                    "postfix start-fg exited with {status}\n{}",
                    self.logs()
                )));
            }
            if ready(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "Postfix did not answer on {} within 20 s\n{}",
                    self.listen,
                    self.logs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A readiness probe for `start`: an SMTP session from `source` that gets
    /// the banner and a 221 to QUIT. Run from the namespace Postfix is in.
    pub fn answers(&self, source: IpAddr) -> bool {
        Smtp::try_open(source, self.listen).is_ok_and(|mut probe| {
            probe
                .try_command("QUIT")
                .is_ok_and(|bye| bye.starts_with("221 "))
        })
    }

    /// `postfix stop`, then waits for master to exit. Falls back to killing
    /// everything in the cgroup. Returns whether the ordinary stop sufficed.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = self.command(&["stop"]).output();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut graceful = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                graceful = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !graceful {
            // master runs in a session of its own; its children are in its
            // process group, and all of them are in the cgroup.
            let _ = std::fs::write(self.cgroup_dir.join("cgroup.kill"), "1");
            if let Some(pid) = std::fs::read_to_string(self.queue().join("pid/master.pid"))
                .ok()
                .and_then(|text| text.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on master's process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The cgroup can be removed only once every Postfix process is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let procs =
                std::fs::read_to_string(self.cgroup_dir.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        graceful
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.stop();
    }
}

/// A blocking SMTP client session.
pub struct Smtp {
    reader: BufReader<TcpStream>,
}

impl Smtp {
    /// Connects from `source` and reads the 220 banner.
    pub fn try_open(source: IpAddr, server: SocketAddr) -> io::Result<Self> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&server.into(), Duration::from_secs(2))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut session = Self {
            reader: BufReader::new(stream),
        };
        let banner = session.try_reply()?;
        if !banner.starts_with("220 ") {
            return Err(io::Error::other(format!("banner {banner:?}")));
        }
        Ok(session)
    }

    pub fn open(source: &str, server: SocketAddr) -> Self {
        let ip: IpAddr = source.parse().expect("an IP address");
        Self::try_open(ip, server)
            .unwrap_or_else(|e| panic!("SMTP session from {source} to {server}: {e}"))
    }

    /// The client side's socket (its local address names the session).
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// One reply's last line ("" when the server closed the connection).
    pub fn try_reply(&mut self) -> io::Result<String> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(String::new());
            }
            let line = line.trim_end().to_string();
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line);
            }
        }
    }

    pub fn reply(&mut self) -> String {
        self.try_reply()
            .unwrap_or_else(|e| panic!("reading an SMTP reply: {e}"))
    }

    pub fn try_command(&mut self, line: &str) -> io::Result<String> {
        self.reader
            .get_mut()
            .write_all(format!("{line}\r\n").as_bytes())?;
        self.try_reply()
    }

    pub fn command(&mut self, line: &str) -> String {
        self.try_command(line)
            .unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// EHLO and MAIL FROM (both must pass), then RCPT TO: its reply.
    pub fn rcpt(&mut self) -> String {
        let ehlo = self.command("EHLO client.example");
        assert!(ehlo.starts_with("250 "), "EHLO: {ehlo}");
        let mail = self.command("MAIL FROM:<a@example.org>");
        assert!(mail.starts_with("250 "), "MAIL FROM: {mail}");
        self.command("RCPT TO:<b@example.net>")
    }

    /// Whether the server has closed the connection (EOF or a reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut rest = String::new();
        match self.reader.read_line(&mut rest) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        }
    }

    pub fn quit(mut self) {
        let bye = self.command("QUIT");
        assert!(bye.starts_with("221 "), "QUIT: {bye}");
    }
}

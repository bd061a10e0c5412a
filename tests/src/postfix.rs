//! A private Postfix instance for end-to-end tests (Debian's `postfix`
//! package): its own config directory, queue and log, on a loopback port,
//! inside the test's cgroup, with `check_policy_service` pointing at the
//! agent's policy socket; and a blocking SMTP client.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::TestCgroup;

pub const POSTFIX: &str = "/usr/sbin/postfix";

/// Debian 12's master.cf with the `smtp inet` line on `@LISTEN@`.
const MASTER_CF: &str = include_str!("../fixtures/postfix/master.cf");

/// The policy socket, relative to the queue directory (see tests/tests/postfix.rs).
pub const POLICY_DIR_IN_QUEUE: &str = "inbound-audit";
pub const POLICY_IN_QUEUE: &str = "inbound-audit/policy.sock";

/// Readiness probes come from a network no limit or assertion looks at.
pub const PROBE_SOURCE: &str = "127.0.9.9";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A private Postfix instance under `dir`: conf/, queue/, data/, maillog.
pub struct Postfix {
    dir: PathBuf,
    pub port: u16,
    cgroup_dir: PathBuf,
    /// The restrictions block of main.cf, with @POLICY@ for the socket.
    restrictions: String,
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

    /// Writes the config and lets `postfix check` create the queue directory
    /// (the agent's policy socket goes into it, so this comes first).
    pub fn configure(dir: &Path, port: u16, cgroup: &TestCgroup, restrictions: &str) -> Self {
        let postfix = Self {
            dir: dir.to_path_buf(),
            port,
            cgroup_dir: cgroup.path().to_path_buf(),
            restrictions: restrictions.to_string(),
            child: None,
        };
        // Postfix's daemons run as user postfix: the path must be searchable
        // whatever the umask.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["conf", "queue", "data"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // data_directory must belong to mail_owner, or `postfix check` warns.
        let chown = Command::new("chown")
            .arg("postfix")
            .arg(dir.join("data"))
            .output()
            .expect("run chown");
        assert!(chown.status.success(), "chown postfix data: {chown:?}");
        std::fs::write(
            postfix.conf().join("master.cf"),
            MASTER_CF.replace("@LISTEN@", &format!("127.0.0.1:{port}")),
        )
        .unwrap();
        postfix.write_main_cf(&format!("unix:{POLICY_IN_QUEUE}"), "");
        postfix.run(&["check"]);
        let policy_dir = postfix.queue().join(POLICY_DIR_IN_QUEUE);
        std::fs::create_dir(&policy_dir).unwrap();
        std::fs::set_permissions(&policy_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        postfix
    }

    /// main.cf with `policy` as the check_policy_service target, plus `extra` lines.
    pub fn write_main_cf(&self, policy: &str, extra: &str) {
        let dir = self.dir.display();
        let text = format!(
            "# A private instance for tests/tests/postfix.rs (Postfix does not allow\n\
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
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             # No DNS here: never look up the client's name.\n\
             smtpd_peername_lookup = no\n\
             # Accepted test mail is thrown away, not relayed.\n\
             default_transport = discard\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             # From here on as in README.md.\n\
             {restrictions}\n\
             {extra}",
            restrictions = self.restrictions.replace("@POLICY@", policy)
        );
        std::fs::write(self.conf().join("main.cf"), text).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(POSTFIX);
        command.arg("-c").arg(self.conf()).args(args);
        command
    }

    /// `postfix -c conf ARGS`, which must succeed. Postfix writes its errors to
    /// the maillog (stderr only when it is a terminal).
    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().expect("run postfix");
        assert!(
            output.status.success(),
            "postfix {args:?} failed: {output:?}\n{}",
            self.logs()
        );
        output
    }

    /// `postfix start-fg` inside the cgroup, so the sockets of master's
    /// listener (and smtpd's accepted sessions) belong to it; returns once
    /// smtpd answers with its banner.
    pub fn start(&mut self) {
        let out = std::fs::File::create(self.dir.join("start-fg.out")).unwrap();
        let mut command = self.command(&["start-fg"]);
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        crate::join_cgroup_on_exec(&mut command, &self.cgroup_dir);
        self.child = Some(command.spawn().expect("start postfix"));
        let server = SocketAddr::new(ip("127.0.0.1"), self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postfix start-fg exited with {status}\n{}", self.logs());
            }
            if let Ok(mut probe) = Smtp::try_open(ip(PROBE_SOURCE), server) {
                assert!(probe.command("QUIT").starts_with("221 "));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Postfix did not answer on {server} within 20 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
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
    pub fn try_open(source: IpAddr, server: SocketAddr) -> std::io::Result<Self> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&server.into(), Duration::from_secs(2))?;
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut session = Self {
            reader: BufReader::new(stream),
        };
        let banner = session.reply();
        if !banner.starts_with("220 ") {
            return Err(std::io::Error::other(format!("banner {banner:?}")));
        }
        Ok(session)
    }

    pub fn open(source: &str, server: SocketAddr) -> Self {
        Self::try_open(ip(source), server)
            .unwrap_or_else(|e| panic!("SMTP session from {source} to {server}: {e}"))
    }

    /// One reply's last line ("" when the server closed the connection).
    pub fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return String::new(),
                Ok(_) => {}
                Err(e) => panic!("reading an SMTP reply: {e}"),
            }
            let line = line.trim_end().to_string();
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }

    pub fn command(&mut self, line: &str) -> String {
        let stream = self.reader.get_mut();
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("sending {line:?}: {e}"));
        self.reply()
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
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    pub fn quit(mut self) {
        let bye = self.command("QUIT");
        assert!(bye.starts_with("221 "), "QUIT: {bye}");
    }
}

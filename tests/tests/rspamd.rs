//! End to end with Debian's rspamd: the plugin `contrib/rspamd/inbound_audit.lua`,
//! installed as README.md says (plugins.d/, an `inbound_audit` section including
//! local.d/inbound_audit.conf, taken from the README with smaller limits), in a
//! private rspamd started by the test (its own config, database and run
//! directories, a loopback port below 32768, its own cgroup so that every
//! worker is gone afterwards). The real agent counts real connections held
//! open to a test server; `rspamc --ip` scans a message as if from that client.
//!
//! Needs root and eBPF (`require_ebpf!`), and `rspamd`/`rspamc` (Debian's
//! `rspamd` package; `cargo xtask test` installs it); says `SKIPPED` without them.
//! rspamd's log is printed when the test fails.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    connect_from, join_cgroup_on_exec, redis::free_port, require_ebpf, Agent, AgentOptions,
    TempDir, TestCgroup, TestServer,
};

const RSPAMD: &str = "/usr/bin/rspamd";
const RSPAMC: &str = "/usr/bin/rspamc";
/// The system user Debian's package runs rspamd's workers as.
const RSPAMD_USER: &str = "_rspamd";

const PLUGIN: &str = include_str!("../../contrib/rspamd/inbound_audit.lua");

const MESSAGE: &str = "From: sender@example.org\r\nTo: rcpt@example.net\r\n\
Subject: inbound-audit rspamd test\r\nMessage-ID: <rspamd-test@example.org>\r\n\r\nHello.\r\n";

/// The plugin's timeout in this test: the frozen-agent case waits this long.
const TIMEOUT_SECS: &str = "0.5";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A README block that starts at the line `first` and ends before the closing fence.
fn readme_block(first: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find(first)
        .unwrap_or_else(|| panic!("README has no {first:?}"));
    let end = start + readme[start..].find("```").expect("the block's end");
    readme[start..end].to_string()
}

/// A private rspamd: `dir` holds rspamd.conf, plugins.d/, local.d/, db/, run/
/// and rspamd.log.
struct Rspamd {
    dir: PathBuf,
    port: u16,
    cgroup: TestCgroup,
    child: Option<Child>,
}

impl Rspamd {
    /// Writes the configuration: rspamd's top level is the test's own (one
    /// normal worker, no controller, no Redis, no DNS, only this plugin), the
    /// plugin's part is the README's.
    fn configure(dir: &Path, local_conf: &str) -> Self {
        let port = free_port();
        for sub in ["plugins.d", "local.d", "db", "run"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("plugins.d/inbound_audit.lua"), PLUGIN).unwrap();
        std::fs::write(dir.join("local.d/inbound_audit.conf"), local_conf).unwrap();
        // A handful of suffixes: compiling the full public suffix list takes
        // rspamd most of its start-up time.
        std::fs::write(dir.join("tld.dat"), "com\norg\nnet\nexample\n").unwrap();
        let section = readme_block("inbound_audit {\n");
        let d = dir.display();
        std::fs::write(
            dir.join("rspamd.conf"),
            format!(
                "options {{\n\
                 \x20 pidfile = \"{d}/run/rspamd.pid\";\n\
                 \x20 # C modules (chartable, dkim, regexp, fuzzy_check) off: no rules to load.\n\
                 \x20 filters = \"\";\n\
                 \x20 url_tld = \"{d}/tld.dat\";\n\
                 \x20 hs_cache_dir = \"{d}/db\";\n\
                 \x20 # No DNS here.\n\
                 \x20 dns {{ nameserver = [\"127.0.0.1:1\"]; timeout = 0.1s; retransmits = 0; }}\n\
                 }}\n\
                 logging {{ type = \"file\"; filename = \"{d}/rspamd.log\"; level = \"info\"; }}\n\
                 worker \"normal\" {{ bind_socket = \"127.0.0.1:{port}\"; count = 1; }}\n\
                 # Debian's rspamd.conf has this try_path; here it is the only one.\n\
                 modules {{ path = \"$LOCAL_CONFDIR/plugins.d/\"; }}\n\
                 # As in /etc/rspamd/rspamd.conf.local (README.md, rspamd).\n\
                 {section}"
            ),
        )
        .unwrap();
        let chown = Command::new("chown")
            .arg("-R")
            .arg(format!("{RSPAMD_USER}:{RSPAMD_USER}"))
            .arg(dir.join("db"))
            .arg(dir.join("run"))
            .output()
            .expect("run chown");
        assert!(chown.status.success(), "chown: {chown:?}");
        Self {
            dir: dir.to_path_buf(),
            port,
            cgroup: TestCgroup::new("rspamd-daemon"),
            child: None,
        }
    }

    fn log(&self) -> String {
        format!(
            "--- rspamd.log ---\n{}--- rspamd's output ---\n{}",
            std::fs::read_to_string(self.dir.join("rspamd.log")).unwrap_or_default(),
            std::fs::read_to_string(self.dir.join("rspamd.out")).unwrap_or_default()
        )
    }

    /// `rspamd -f` (in the foreground: the test owns the main process) inside
    /// its cgroup; returns once the worker answers `/ping`.
    fn start(&mut self) {
        let out = std::fs::File::create(self.dir.join("rspamd.out")).unwrap();
        let mut command = Command::new(RSPAMD);
        command
            .args(["-f", "-u", RSPAMD_USER, "-g", RSPAMD_USER, "-c"])
            .arg(self.dir.join("rspamd.conf"))
            .arg("--var")
            .arg(format!("LOCAL_CONFDIR={}", self.dir.display()))
            .arg("--var")
            .arg(format!("DBDIR={}/db", self.dir.display()))
            .arg("--var")
            .arg(format!("RUNDIR={}/run", self.dir.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        join_cgroup_on_exec(&mut command, self.cgroup.path());
        self.child = Some(command.spawn().expect("start rspamd"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("rspamd exited with {status}\n{}", self.log());
            }
            if self.ping() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rspamd did not answer /ping on port {} within 60 s\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ping(&self) -> bool {
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut answer = String::new();
        stream
            .write_all(b"GET /ping HTTP/1.0\r\n\r\n")
            .and_then(|()| stream.read_to_string(&mut answer))
            .is_ok()
            && answer.contains("pong")
    }

    /// `rspamc -h 127.0.0.1:PORT --ip CLIENT -j message.eml`: the symbols and
    /// their scores rspamd gave the message.
    fn scan(&self, client: &str) -> serde_json::Value {
        let message = self.dir.join("message.eml");
        std::fs::write(&message, MESSAGE).unwrap();
        let output = Command::new(RSPAMC)
            .arg("-h")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--ip", client, "-j"])
            .arg(&message)
            .output()
            .expect("run rspamc");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "rspamc failed: {output:?}\n{}",
            self.log()
        );
        let json = &stdout[stdout.find('{').unwrap_or(0)..];
        let reply: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("rspamc said {stdout:?}: {e}\n{}", self.log()));
        assert!(
            reply.get("symbols").is_some(),
            "no symbols in rspamd's reply {reply}\n{}",
            self.log()
        );
        reply
    }

    /// SIGTERM to the main process, which stops its workers; anything left in
    /// the cgroup after 10 s is killed. Returns whether SIGTERM sufficed.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut graceful = false;
        while Instant::now() < deadline {
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            let procs = std::fs::read_to_string(self.cgroup.path().join("cgroup.procs"))
                .unwrap_or_default();
            if exited && procs.trim().is_empty() {
                graceful = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !graceful {
            let _ = std::fs::write(self.cgroup.path().join("cgroup.kill"), "1");
            let _ = child.kill();
            let _ = child.wait();
        }
        graceful
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
        self.stop();
    }
}

/// The symbol's score and options, if rspamd inserted it.
fn symbol(reply: &serde_json::Value, name: &str) -> Option<(f64, Vec<String>)> {
    let symbol = reply["symbols"].get(name)?;
    let options = symbol["options"]
        .as_array()
        .map(|o| o.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    Some((symbol["score"].as_f64().expect("a score"), options))
}

fn assert_no_audit_symbols(reply: &serde_json::Value, rspamd: &Rspamd) {
    let symbols = reply["symbols"].as_object().unwrap();
    assert!(
        symbols
            .keys()
            .all(|name| !name.starts_with("INBOUND_AUDIT")),
        "unexpected symbols: {reply}\n{}",
        rspamd.log()
    );
}

#[test]
fn rspamd_scores_clients_over_the_limits_and_fails_open() {
    require_ebpf!();
    for binary in [RSPAMD, RSPAMC] {
        if !Path::new(binary).exists() {
            eprintln!("SKIPPED (no {binary}): apt-get install rspamd, or run `cargo xtask test`, which installs it");
            return;
        }
    }
    // The test server on IPv4 and IPv6 loopback, both SMTP; rspamd's workers
    // run as _rspamd: the socket's group lets them in, as the README says.
    let cgroup = TestCgroup::new("rspamd");
    let server = TestServer::start(
        env!("CARGO_BIN_EXE_test-server"),
        &cgroup,
        &["127.0.0.1:0", "[::1]:0"],
    );
    let mut agent = Agent::start(AgentOptions {
        name: "rspamd",
        cgroup: &cgroup,
        services: vec![format!("SMTP={},{}", server.ports[0], server.ports[1])],
        extra_args: ["--monitor", "60,1", "--socket-group", RSPAMD_USER]
            .map(String::from)
            .to_vec(),
    });
    let smtp = SocketAddr::new(ip("127.0.0.1"), server.ports[0]);
    let smtp_v6 = SocketAddr::new(ip("::1"), server.ports[1]);

    // The README's local.d/inbound_audit.conf with this agent's socket and
    // smaller limits: above 2 sessions per /24, above 3 connections per /32 in
    // the minute and the one before. A third rule asks for a monitor the agent
    // does not have: its ERR must cost nothing but a log line.
    let conf = readme_block("# /etc/rspamd/local.d/inbound_audit.conf")
        .replace(
            "/run/inbound-audit/audit.sock",
            agent.socket.to_str().unwrap(),
        )
        .replace("timeout = 1.0;", &format!("timeout = {TIMEOUT_SECS};"))
        .replace("max = 10;", "max = 2;")
        .replace("max = 30;", "max = 3;");
    assert!(
        conf.contains("max = 2;")
            && conf.contains("max = 3;")
            && conf.contains(&format!("timeout = {TIMEOUT_SECS};")),
        "the README's example moved:\n{conf}"
    );
    let conf = conf.replace(
        "symbols {\n",
        "symbols {\n  INBOUND_AUDIT_RECEPTIONS {\n    count = \"receptions\";\n    \
         monitor = \"300,6\";\n    max = 0;\n    score = 1.0;\n  }\n",
    );
    let dir = TempDir::new("rspamd-instance");
    let mut rspamd = Rspamd::configure(dir.path(), &conf);
    rspamd.start();

    // Three live sessions from one /24: over 2.
    let busy: Vec<_> = (0..3)
        .map(|_| connect_from(ip("127.0.0.81"), smtp))
        .collect();
    agent.expect_count("127.0.0.0/24", "SMTP", 3);
    let reply = rspamd.scan("127.0.0.81");
    assert_eq!(
        symbol(&reply, "INBOUND_AUDIT_SESSIONS"),
        Some((5.0, vec!["127.0.0.0/24=3".to_string()])),
        "{reply}\n{}",
        rspamd.log()
    );
    assert_eq!(symbol(&reply, "INBOUND_AUDIT_CONNECTIONS"), None);

    // IPv6: three sessions from ::1, counted in its /64.
    let busy_v6: Vec<_> = (0..3).map(|_| connect_from(ip("::1"), smtp_v6)).collect();
    agent.expect_count("::/64", "SMTP", 3);
    let reply = rspamd.scan("::1");
    assert_eq!(
        symbol(&reply, "INBOUND_AUDIT_SESSIONS"),
        Some((5.0, vec!["::/64=3".to_string()])),
        "{reply}\n{}",
        rspamd.log()
    );

    // Another /24 with one session and one connection: nothing.
    let quiet = connect_from(ip("127.0.1.82"), smtp);
    agent.expect_count("127.0.1.0/24", "SMTP", 1);
    assert_no_audit_symbols(&rspamd.scan("127.0.1.82"), &rspamd);

    // Four connections from one IP in this minute (and the one before): over 3.
    for _ in 0..4 {
        drop(connect_from(ip("127.0.2.83"), smtp));
    }
    agent.expect(
        "@127.0.2.83 msys.audit.connections(\"60,1\", {cidr=\"/32\", endv=1})",
        "OK 4",
    );
    agent.expect_count("127.0.2.0/24", "SMTP", 0);
    let reply = rspamd.scan("127.0.2.83");
    assert_eq!(
        symbol(&reply, "INBOUND_AUDIT_CONNECTIONS"),
        Some((3.0, vec!["127.0.2.83/32=4".to_string()])),
        "{reply}\n{}",
        rspamd.log()
    );
    assert_eq!(symbol(&reply, "INBOUND_AUDIT_SESSIONS"), None);
    let log = rspamd.log();
    assert!(
        log.contains("INBOUND_AUDIT_RECEPTIONS: the agent answered \"ERR unknown_monitor"),
        "the ERR answer is not logged\n{log}"
    );

    // The agent stopped (SIGSTOP): no answer within the timeout; no symbol,
    // and rspamd still answers.
    agent.freeze();
    let reply = rspamd.scan("127.0.0.81");
    agent.signal(libc::SIGCONT);
    assert_no_audit_symbols(&reply, &rspamd);
    assert!(
        rspamd.log().contains("(IO timeout); no symbol"),
        "the timeout is not logged\n{}",
        rspamd.log()
    );

    // The agent gone (its socket removed): the same.
    agent.stop();
    let reply = rspamd.scan("127.0.0.81");
    assert_no_audit_symbols(&reply, &rspamd);
    assert!(
        rspamd.log().contains("(cannot connect to the host: "),
        "the missing socket is not logged\n{}",
        rspamd.log()
    );

    assert!(
        rspamd.stop(),
        "rspamd did not stop on SIGTERM\n{}",
        rspamd.log()
    );
    drop((busy, busy_v6, quiet));
}

/// `rspamadm -v configtest` on Debian's own /etc/rspamd/rspamd.conf (the
/// system's rspamd files only read), with
/// LOCAL_CONFDIR (normally /etc/rspamd) a scratch directory holding the
/// README's install: plugins.d/inbound_audit.lua, rspamd.conf.local and
/// local.d/inbound_audit.conf. Returns what rspamadm printed.
fn configtest(dir: &Path, local_conf: &str) -> String {
    for sub in ["plugins.d", "local.d", "db", "system-db"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("plugins.d/inbound_audit.lua"), PLUGIN).unwrap();
    std::fs::write(
        dir.join("rspamd.conf.local"),
        readme_block("# /etc/rspamd/rspamd.conf.local\n"),
    )
    .unwrap();
    std::fs::write(dir.join("local.d/inbound_audit.conf"), local_conf).unwrap();
    // rspamadm writes a hyperscan cache file into its compiled-in database
    // directory (/var/lib/rspamd, the system instance's) whatever DBDIR says:
    // in a mount namespace of its own, a scratch directory stands in for it.
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("mount --bind \"$0\" {SYSTEM_DBDIR} && exec \"$@\""))
        .arg(dir.join("system-db"))
        .arg(RSPAMADM)
        .arg(format!("--var=LOCAL_CONFDIR={}", dir.display()))
        .arg(format!("--var=DBDIR={}/db", dir.display()))
        .args(["-v", "configtest", "-c", DEBIAN_CONF])
        .output()
        .expect("run rspamadm");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

const RSPAMADM: &str = "/usr/bin/rspamadm";
const DEBIAN_CONF: &str = "/etc/rspamd/rspamd.conf";
const SYSTEM_DBDIR: &str = "/var/lib/rspamd";

#[test]
fn the_readme_install_loads_under_debians_config_and_bad_values_name_their_key() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED (not root): rspamadm runs in a mount namespace of its own, which needs root"
        );
        return;
    }
    for file in [RSPAMADM, DEBIAN_CONF, SYSTEM_DBDIR] {
        if !Path::new(file).exists() {
            eprintln!("SKIPPED (no {file}): apt-get install rspamd, or run `cargo xtask test`, which installs it");
            return;
        }
    }
    let dir = TempDir::new("rspamd-configtest");
    let readme_conf = readme_block("# /etc/rspamd/local.d/inbound_audit.conf");
    let output = configtest(dir.path(), &readme_conf);
    let plugin_path = format!(
        "init lua module inbound_audit from {}/plugins.d",
        dir.path().display()
    );
    for expected in [
        plugin_path.as_str(),
        "registered symbol INBOUND_AUDIT_SESSIONS with weight 5.00",
        "registered symbol INBOUND_AUDIT_CONNECTIONS with weight 3.00",
        "group inbound_audit",
        "syntax OK",
    ] {
        assert!(output.contains(expected), "no {expected:?} in:\n{output}");
    }
    assert!(!output.contains("bad config"), "{output}");

    // Each bad value disables the plugin (no symbol at all) with an error
    // naming its key; the rest of rspamd's configuration is still fine.
    for (bad, key) in [
        (
            "max = 10;",
            "max = -1;",
            "symbols.INBOUND_AUDIT_SESSIONS.max",
        ),
        (
            "max = 30;",
            "max = 2.5;",
            "symbols.INBOUND_AUDIT_CONNECTIONS.max",
        ),
        (
            "ipv4_prefix = 24;",
            "ipv4_prefix = 33;",
            "symbols.INBOUND_AUDIT_SESSIONS.ipv4_prefix",
        ),
        (
            "ipv6_prefix = 128;",
            "ipv6_prefix = 129;",
            "symbols.INBOUND_AUDIT_CONNECTIONS.ipv6_prefix",
        ),
        (
            "count = \"sessions\";",
            "count = \"spam\";",
            "symbols.INBOUND_AUDIT_SESSIONS.count",
        ),
        (
            "monitor = \"60,1\";",
            "monitor = \"60\";",
            "symbols.INBOUND_AUDIT_CONNECTIONS.monitor",
        ),
        (
            "service = \"SMTP\";",
            "service = \"SMTP\\\" x\";",
            "symbols.INBOUND_AUDIT_SESSIONS.service",
        ),
        (
            "endv = 1;",
            "endv = -1;",
            "symbols.INBOUND_AUDIT_CONNECTIONS.endv",
        ),
        ("socket = \"/run/", "socket = \"run/", "socket"),
        ("timeout = 1.0;", "timeout = 0;", "timeout"),
        ("timeout = 1.0;", "timeout = 1.0; sockets = 2;", "sockets"),
        (
            "ipv4_prefix = 24;",
            "ipv4_prefx = 24;",
            "symbols.INBOUND_AUDIT_SESSIONS.ipv4_prefx",
        ),
        (
            "endv = 1;",
            "endv = 1; service = \"SMTP\";",
            "symbols.INBOUND_AUDIT_CONNECTIONS.service",
        ),
    ]
    .map(|(good, bad, key)| (readme_conf.replacen(good, bad, 1), key))
    {
        assert_ne!(bad, readme_conf, "{key}: the README's example moved");
        let output = configtest(dir.path(), &bad);
        assert!(
            output.contains(&format!("inbound_audit: bad config {key}: ")),
            "{key} is not named:\n{output}"
        );
        assert!(
            !output.contains("registered symbol INBOUND_AUDIT"),
            "{key}: the plugin still registered symbols:\n{output}"
        );
        assert!(output.contains("syntax OK"), "{output}");
    }
}

//! Harness for the end-to-end tests: a child cgroup, a test server inside it,
//! clients from chosen source addresses, and the real agent binary.
//!
//! Nothing here replaces the kernel: the agent loads the real eBPF program and
//! counts real loopback connections. Each test has its own cgroup, pin
//! directory and socket, so tests run in parallel without seeing each other.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use inbound_audit::kernel::{cgroup::cgroup2_root, seed, sock_diag};

pub mod http;
pub mod netns;
pub mod postfix;
pub mod redis;

/// Why the eBPF tests cannot run on this machine, if they cannot.
pub fn ebpf_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "not root: loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON)"
                .into(),
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux): tp_btf programs cannot load".into(),
        );
    }
    if let Err(e) = cgroup2_root() {
        return Some(format!("no cgroup2 hierarchy: {e}"));
    }
    if let Err(e) = probe_bpf_syscall() {
        return Some(format!("the bpf() system call is not usable here: {e}"));
    }
    None
}

/// Creates (and closes) a one-entry array map: the cheapest proof that bpf() works.
fn probe_bpf_syscall() -> std::io::Result<()> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    let attr = MapCreate {
        map_type: 2,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    // SAFETY: BPF_MAP_CREATE (0) with a valid attribute prefix of the given size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned here.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// Skips the calling test (returning early) with a clear message when eBPF cannot load.
#[macro_export]
macro_rules! require_ebpf {
    () => {
        if let Some(reason) = $crate::ebpf_unavailable() {
            eprintln!("SKIPPED (eBPF cannot load here): {reason}");
            return;
        }
    };
}

pub fn agent_binary() -> PathBuf {
    std::env::var_os("INBOUND_AUDIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/inbound-audit")
        })
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("inbound-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child cgroup of the cgroup2 root; the test server runs in it so only its
/// connections are seen by the sock_ops program attached there.
pub struct TestCgroup(PathBuf);

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let root = cgroup2_root().expect("cgroup2 mounted");
        let path = root.join(format!("inbound-audit-test-{name}-{}", std::process::id()));
        if path.exists() {
            let _ = std::fs::remove_dir(&path);
        }
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The directory can only go once its processes have exited.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Makes `command`'s process join the cgroup at `dir` before it execs, so every
/// socket it creates (listeners included, and the sessions they accept)
/// belongs to that cgroup.
pub fn join_cgroup_on_exec(command: &mut Command, dir: &Path) {
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").to_str().expect("utf-8 path"))
        .expect("no NUL");
    // SAFETY: the closure only calls async-signal-safe functions (open, write,
    // close) on memory prepared before the fork.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets RLIMIT_NOFILE (soft and hard) to `limit` in `command`'s process before it execs.
pub fn limit_open_files_on_exec(command: &mut Command, limit: u64) {
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit is async-signal-safe and reads only the copied struct.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The stand-in MTA (src/bin/test-server.rs), started inside a cgroup.
pub struct TestServer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub ports: Vec<u16>,
}

impl TestServer {
    /// Runs `binary` (the test-server, `env!("CARGO_BIN_EXE_test-server")` in an
    /// integration test) listening on each address (port 0: a free port) from
    /// inside `cgroup`.
    pub fn start(binary: &str, cgroup: &TestCgroup, addrs: &[&str]) -> Self {
        Self::start_in(Command::new(binary), cgroup, addrs)
    }

    /// As `start`, inside the network namespace `netns` (made by `ip netns add`),
    /// entered by nsenter: `ip netns exec` would remount /sys, hiding bpffs and cgroup2.
    pub fn start_in_netns(binary: &str, netns: &str, cgroup: &TestCgroup, addrs: &[&str]) -> Self {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{netns}")).arg(binary);
        Self::start_in(command, cgroup, addrs)
    }

    fn start_in(mut command: Command, cgroup: &TestCgroup, addrs: &[&str]) -> Self {
        command
            .args(addrs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        join_cgroup_on_exec(&mut command, cgroup.path());
        let mut child = command.spawn().expect("start test-server");
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("test-server READY line");
        let ports = line
            .strip_prefix("READY")
            .unwrap_or_else(|| panic!("test-server said {line:?}"))
            .split_whitespace()
            .map(|p| p.parse().expect("port"))
            .collect();
        Self {
            child,
            stdin,
            stdout,
            ports,
        }
    }

    fn command(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("test-server stdin");
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("test-server answer");
        answer.trim_end().to_string()
    }

    /// How many connections the server has accepted and still holds.
    pub fn held(&mut self) -> usize {
        let answer = self.command("count");
        answer
            .parse()
            .unwrap_or_else(|_| panic!("test-server count: {answer:?}"))
    }

    /// Closes the server's side of the connection from `peer` (a FIN from the server).
    pub fn close(&mut self, peer: SocketAddr) {
        // The server accepts asynchronously: a connection the kernel has
        // established may not be accepted yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = self.command(&format!("close {} {}", peer.ip(), peer.port()));
            if answer == "closed" || Instant::now() > deadline {
                assert_eq!(answer, "closed", "closing {peer}");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: the kernel closes every socket the server had.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client connection from `source` (any 127.x.y.z or ::1) to `server`.
pub fn connect_from(source: IpAddr, server: SocketAddr) -> TcpStream {
    let domain = if server.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    socket
        .connect(&server.into())
        .unwrap_or_else(|e| panic!("connect {source} -> {server}: {e}"));
    socket.into()
}

/// Aborts the connection with a RST (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    socket.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    drop(socket);
}

pub struct AgentOptions<'a> {
    pub name: &'a str,
    pub cgroup: &'a TestCgroup,
    pub services: Vec<String>,
    /// Extra agent flags.
    pub extra_args: Vec<String>,
}

/// The real agent binary, with its own socket and pin directory.
pub struct Agent {
    child: Option<Child>,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// RLIMIT_NOFILE (soft and hard) the agent's process starts with; None: ours.
    open_files: Option<u64>,
    /// The network namespace the agent runs in (entered by nsenter); None: ours.
    netns: Option<String>,
    _dir: TempDir,
}

impl Agent {
    pub fn start(options: AgentOptions<'_>) -> Self {
        Self::start_with_open_files(options, None)
    }

    /// As `start`, with the agent's RLIMIT_NOFILE soft and hard limits set to
    /// `limit` (as `ulimit -n` in its shell would).
    /// As `start`, inside the network namespace `netns` (made by `ip netns add`),
    /// entered by nsenter: `ip netns exec` would remount /sys, hiding bpffs and cgroup2.
    pub fn start_in_netns(options: AgentOptions<'_>, netns: &str) -> Self {
        Self::start_with(options, None, Some(netns.to_string()))
    }

    pub fn start_with_open_files(options: AgentOptions<'_>, limit: Option<u64>) -> Self {
        Self::start_with(options, limit, None)
    }

    fn start_with(options: AgentOptions<'_>, limit: Option<u64>, netns: Option<String>) -> Self {
        let dir = TempDir::new(options.name);
        let socket = dir.path().join("audit.sock");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/inbound-audit-test-{}-{}",
            options.name,
            std::process::id()
        ));
        let _ = inbound_audit::kernel::loader::cleanup(&pin_dir);
        let mut args = vec![
            "agent".to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--cgroup".into(),
            options.cgroup.path().display().to_string(),
        ];
        for service in &options.services {
            args.push("--service".into());
            args.push(service.clone());
        }
        args.extend(options.extra_args.iter().cloned());
        // Monitor state would otherwise go to /var/lib/inbound-audit, shared by
        // every test agent (and a real one).
        if !options.extra_args.iter().any(|a| a == "--state-dir") {
            args.push("--state-dir".into());
            args.push(dir.path().join("state").display().to_string());
        }
        let log = dir.path().join("agent.log");
        let mut agent = Self {
            child: None,
            socket,
            pin_dir,
            args,
            log,
            open_files: limit,
            netns,
            _dir: dir,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/run/netns/{netns}"))
                    .arg(agent_binary());
                command
            }
            None => Command::new(agent_binary()),
        };
        command
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if let Some(limit) = self.open_files {
            limit_open_files_on_exec(&mut command, limit);
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "start {}: {e} (build it with `cargo xtask build`)",
                agent_binary().display()
            )
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // The socket is bound before the kernel program is attached; only
            // an answer means the agent counts and serves.
            if inbound_audit::serving::client::query(&self.socket, "show 127.0.0.1").is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("wait"))
            {
                panic!(
                    "agent exited with {status} before serving:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent did not serve within 30 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait: the agent removes its socket, the kernel keeps counting.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Some(status) = child.try_wait().expect("wait agent") {
                    break status;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "agent did not stop within 20 s of SIGTERM:\n{}",
                        self.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            assert!(
                status.success(),
                "agent exit {status}:\n{}",
                self.log_text()
            );
        }
    }

    /// The running agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is running").id()
    }

    /// Sends `signal` (e.g. libc::SIGHUP) to the running agent.
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("the agent is running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// SIGSTOP, returning once every thread of the agent is stopped (the
    /// signal itself is asynchronous); SIGCONT goes through `signal`.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        let pid = self.child.as_ref().expect("the agent is running").id();
        eventually("every agent thread is stopped", || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .expect("agent tasks")
                .all(|task| {
                    let path = task.expect("task").path().join("stat");
                    // The state follows the ")" that ends the command name.
                    std::fs::read_to_string(path).is_ok_and(|stat| {
                        stat.rsplit_once(')')
                            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
                    })
                })
        });
    }

    /// SIGKILL, as a crash or the OOM killer would: no shutdown work at all.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again after `stop` or `kill`.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the agent is still running");
        self.spawn();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn query(&self, request: &str) -> String {
        inbound_audit::serving::client::query(&self.socket, request)
            .unwrap_or_else(|e| panic!("query {request:?}: {e}\n{}", self.log_text()))
    }

    /// One figure of the `stats` report.
    pub fn stat(&self, name: &str) -> u64 {
        inbound_audit::serving::client::query_report(&self.socket, "stats")
            .expect("stats request")
            .expect("stats report")
            .iter()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in stats"))
    }

    /// Polls until the answer is `expected` (events are asynchronous), then
    /// asserts it; a wrong count shows with the agent's log.
    pub fn expect(&self, request: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut answer = self.query(request);
        while answer != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            answer = self.query(request);
        }
        assert_eq!(
            answer,
            expected,
            "{request}\nagent log:\n{}",
            self.log_text()
        );
    }

    /// The session count for `cidr` on `service`.
    pub fn expect_count(&self, cidr: &str, service: &str, expected: u64) {
        self.expect(
            &format!("msys.audit.inbound_session_count(\"{cidr}\", \"{service}\")"),
            &format!("OK {expected}"),
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = inbound_audit::kernel::loader::cleanup(&self.pin_dir);
    }
}

/// The usual set-up: a test server on one loopback port in its own cgroup, and
/// an agent counting that port as SMTP. Fields drop in order: agent, server,
/// then the cgroup once its processes are gone.
pub struct SmtpFixture {
    pub agent: Agent,
    pub server: TestServer,
    pub cgroup: TestCgroup,
    /// Where clients connect: the server's port on 127.0.0.1.
    pub smtp: SocketAddr,
}

impl SmtpFixture {
    /// `server_binary` is `env!("CARGO_BIN_EXE_test-server")` of the calling test.
    pub fn start(server_binary: &str, name: &str, extra_args: &[&str]) -> Self {
        let cgroup = TestCgroup::new(name);
        let server = TestServer::start(server_binary, &cgroup, &["127.0.0.1:0"]);
        let agent = Agent::start(AgentOptions {
            name,
            cgroup: &cgroup,
            services: vec![format!("SMTP={}", server.ports[0])],
            extra_args: extra_args.iter().map(ToString::to_string).collect(),
        });
        let smtp = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), server.ports[0]);
        Self {
            agent,
            server,
            cgroup,
            smtp,
        }
    }
}

/// The kernel's truth: inbound live sockets on `ports` in `cgroup` from `net`,
/// straight from sock_diag.
pub fn sock_diag_count(ports: &[u16], cgroup: &TestCgroup, net: &ipnet::IpNet) -> u64 {
    let ports = ports.iter().map(|&p| (p, 0u8)).collect();
    let ids = seed::cgroup_subtree_ids(cgroup.path()).expect("cgroup ids");
    seed::inbound_live_sockets(&ports, Some(&ids), None)
        .expect("sock_diag dump")
        .iter()
        .filter(|s| net.contains(&seed::normalize(s.remote)))
        .count() as u64
}

pub use sock_diag::TcpSocket;

/// Polls `check` for up to 10 s; panics naming `what` if it never holds.
pub fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(10), check);
}

/// Polls `check` every 20 ms until it holds, for at most `within`; returns
/// how long it took (tests report convergence times with it).
pub fn eventually_within(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// The kernel's truth over several nodes: their sessions from `cidr` by
/// sock_diag, summed.
pub fn fleet_truth(nodes: &[&SmtpFixture], cidr: &str) -> u64 {
    let net = cidr.parse().expect("a CIDR");
    nodes
        .iter()
        .map(|n| sock_diag_count(&n.server.ports, &n.cgroup, &net))
        .sum()
}

/// The agent's pinned IPv4 per-IP count map, opened directly, to look at (and
/// tamper with) the kernel's state the way another root process could.
pub struct PinnedLiveMap(aya::maps::LpmTrie<aya::maps::MapData, [u8; 4], audit_common::LiveCounts>);

impl PinnedLiveMap {
    pub fn open(pin_dir: &Path) -> Self {
        let path = pin_dir.join(audit_common::map_names::LIVE_V4);
        let data = aya::maps::MapData::from_pin(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let map = aya::maps::Map::LpmTrie(data);
        Self(map.try_into().expect("an LPM trie"))
    }

    pub fn get(&self, ip: [u8; 4]) -> Option<audit_common::LiveCounts> {
        self.0.get(&aya::maps::lpm_trie::Key::new(32, ip), 0).ok()
    }

    pub fn set(&mut self, ip: [u8; 4], counts: audit_common::LiveCounts) {
        self.0
            .insert(&aya::maps::lpm_trie::Key::new(32, ip), counts, 0)
            .expect("write the pinned map");
    }
}

//! End to end, as root: `[[kernel_limits]]` refused in the kernel by the
//! sk_lookup program. Each test makes its own network namespace (lo up, test
//! addresses on lo) and runs the agent and the test server inside it: nothing
//! is attached to the host's own namespace.

use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    require_ebpf, reset, Agent, AgentOptions, TempDir, TestCgroup, TestServer,
};

/// A network namespace for one test, removed on drop.
struct NetNs(String);

impl NetNs {
    fn new(name: &str) -> Self {
        let name = format!("ia-{name}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]).expect("ip netns add");
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        // IPv6 clients from three /64s; 127.0.0.0/8 is on lo already.
        for addr in ["fd00:1::1", "fd00:1::2", "fd00:2::1", "fd00:3::1"] {
            ns.ip(&["addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"]);
        }
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all).unwrap_or_else(|e| panic!("ip {}: {e}", all.join(" ")));
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it makes
    /// stay in the namespace wherever they are used afterwards.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).expect("open netns");
                    // SAFETY: setns on this thread only, with a namespace fd we hold.
                    let rc = unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                    };
                    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("netns thread")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let status = Command::new("ip").args(args).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("exit {status}")))
    }
}

fn addr(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A connection from `source` to `server`, or the error the connect got.
fn try_connect(source: &str, server: SocketAddr) -> io::Result<TcpStream> {
    let domain = if server.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(addr(source), 0).into())?;
    socket.connect_timeout(&server.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// Asserts that a connect from `source` is refused at once (a RST, not a
/// dropped SYN, which would time out after retries).
fn assert_refused(ns: &NetNs, source: &str, server: SocketAddr) {
    let started = Instant::now();
    let result = ns.run(|| try_connect(source, server));
    let took = started.elapsed();
    match result {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("{source} -> {server}: {e}, expected ECONNREFUSED"),
        Ok(_) => panic!("{source} -> {server} connected, expected ECONNREFUSED"),
    }
    assert!(took < Duration::from_millis(500), "refusal took {took:?}");
}

fn connect(ns: &NetNs, source: &str, server: SocketAddr) -> TcpStream {
    ns.run(|| try_connect(source, server))
        .unwrap_or_else(|e| panic!("{source} -> {server}: {e}"))
}

/// The server accepts on its own threads: waits for `expected` held
/// connections, then checks that no more arrive.
fn expect_held(server: &mut TestServer, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.held() < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.held(), expected);
}

struct Setup {
    agent: Agent,
    server: TestServer,
    config: std::path::PathBuf,
    _dir: TempDir,
    _cgroup: TestCgroup,
    ns: NetNs,
}

impl Setup {
    /// A test server on 127.0.0.1 and [::] (both SMTP) and the agent, in a
    /// namespace of their own, with `limits` as the config file's text.
    fn start(name: &str, limits: &str) -> Self {
        let ns = NetNs::new(name);
        let cgroup = TestCgroup::new(&format!("refusal-{name}"));
        let server = TestServer::start_in_netns(
            env!("CARGO_BIN_EXE_test-server"),
            &ns.0,
            &cgroup,
            &["127.0.0.1:0", "[::]:0"],
        );
        let dir = TempDir::new(&format!("refusal-config-{name}"));
        let config = dir.path().join("inbound-audit.toml");
        std::fs::write(&config, limits).unwrap();
        let agent = Agent::start_in_netns(
            AgentOptions {
                name: &format!("refusal-{name}"),
                cgroup: &cgroup,
                services: vec![format!("SMTP={},{}", server.ports[0], server.ports[1])],
                extra_args: vec![
                    "--config".into(),
                    config.display().to_string(),
                    "--monitor".into(),
                    "60,1".into(),
                ],
            },
            &ns.0,
        );
        Self {
            agent,
            server,
            config,
            _dir: dir,
            _cgroup: cgroup,
            ns,
        }
    }

    fn v4(&self) -> SocketAddr {
        SocketAddr::new(addr("127.0.0.1"), self.server.ports[0])
    }

    fn v6(&self) -> SocketAddr {
        SocketAddr::new(addr("::1"), self.server.ports[1])
    }
}

const LIMITS: &str = r#"
[[kernel_limits]]
ipv4_prefix = 24
ipv6_prefix = 64
max = 3
exempt = ["127.0.3.0/24", "fd00:3::/64"]
"#;

#[test]
fn the_session_over_a_prefix_limit_is_refused_at_the_syn() {
    require_ebpf!();
    let mut setup = Setup::start("v4", LIMITS);
    assert!(
        setup.agent.log_text().contains("sk_lookup attached"),
        "{}",
        setup.agent.log_text()
    );
    let server = setup.v4();
    let mut admitted: Vec<TcpStream> = ["127.0.1.1", "127.0.1.2", "127.0.1.1"]
        .iter()
        .map(|source| connect(&setup.ns, source, server))
        .collect();
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 3);
    assert_refused(&setup.ns, "127.0.1.9", server);
    assert_refused(&setup.ns, "127.0.1.1", server);
    // The same limit through the dual-stack listener (a v4-mapped peer there).
    let dual_stack = SocketAddr::new(addr("127.0.0.1"), setup.server.ports[1]);
    assert_refused(&setup.ns, "127.0.1.10", dual_stack);
    // The MTA never saw the refused ones.
    expect_held(&mut setup.server, 3);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 3);

    // Another /24, and an exempt one past the limit, still connect.
    admitted.push(connect(&setup.ns, "127.0.2.1", server));
    for _ in 0..4 {
        admitted.push(connect(&setup.ns, "127.0.3.1", server));
    }
    setup.agent.expect_count("127.0.3.0/24", "SMTP", 4);

    // One session of the full /24 ends: the next one connects.
    reset(admitted.remove(0));
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 2);
    admitted.push(connect(&setup.ns, "127.0.1.7", server));
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 3);
    assert_refused(&setup.ns, "127.0.1.8", server);

    // A reload that raises the limit keeps the counts: one more, then full.
    std::fs::write(&setup.config, LIMITS.replace("max = 3", "max = 4")).unwrap();
    setup.agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !setup.agent.log_text().contains("SIGHUP: 1 kernel limit(s)") {
        assert!(Instant::now() < deadline, "{}", setup.agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    admitted.push(connect(&setup.ns, "127.0.1.7", server));
    assert_refused(&setup.ns, "127.0.1.7", server);

    // Every refusal counted: per IP in the refusals series, in stats, and
    // one log line for the /24 (not one per SYN).
    setup
        .agent
        .expect("@127.0.1.1 msys.audit.refusals(\"60,1\")", "OK 1");
    setup
        .agent
        .expect("@127.0.1.7 msys.audit.refusals(\"60,1\")", "OK 1");
    setup.agent.expect(
        "msys.audit.refusals(\"60,1\", {cidr=\"127.0.1.0/24\"})",
        "OK 5",
    );
    assert_eq!(setup.agent.stat("kernel_limit_refusals"), 5);
    assert_eq!(setup.agent.stat("kernel_limit_dry_run_refusals"), 0);
    assert_eq!(setup.agent.stat("kernel_limits_attached"), 1);
    let show =
        inbound_audit::serving::client::query_report(&setup.agent.socket, "show 127.0.1.0/24")
            .expect("show request")
            .expect("show report");
    assert!(show.iter().any(|l| l == "Refusals 60/0: 5"), "{show:?}");

    // A reload without limits detaches the program: nothing is refused.
    std::fs::write(&setup.config, "").unwrap();
    setup.agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !setup
        .agent
        .log_text()
        .contains("sk_lookup program detached")
    {
        assert!(Instant::now() < deadline, "{}", setup.agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    admitted.push(connect(&setup.ns, "127.0.1.7", server));
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 5);
    assert_eq!(setup.agent.stat("kernel_limits_attached"), 0);
    drop(admitted);
    setup.agent.stop();
    let log = setup.agent.log_text();
    assert_eq!(
        log.matches("kernel limits: refused").count(),
        1,
        "one line per prefix per minute:\n{log}"
    );
    assert!(log.contains("SYNs from 127.0.1.0/24"), "{log}");
}

#[test]
fn ipv6_sessions_are_limited_per_64() {
    require_ebpf!();
    let mut setup = Setup::start("v6", LIMITS);
    let server = setup.v6();
    let mut admitted: Vec<TcpStream> = ["fd00:1::1", "fd00:1::2", "fd00:1::1"]
        .iter()
        .map(|source| connect(&setup.ns, source, server))
        .collect();
    setup.agent.expect_count("fd00:1::/64", "SMTP", 3);
    assert_refused(&setup.ns, "fd00:1::2", server);
    admitted.push(connect(&setup.ns, "fd00:2::1", server));
    for _ in 0..4 {
        admitted.push(connect(&setup.ns, "fd00:3::1", server));
    }
    setup.agent.expect_count("fd00:3::/64", "SMTP", 4);
    reset(admitted.remove(0));
    setup.agent.expect_count("fd00:1::/64", "SMTP", 2);
    admitted.push(connect(&setup.ns, "fd00:1::2", server));
    assert_refused(&setup.ns, "fd00:1::1", server);
    expect_held(&mut setup.server, 3 + 1 + 4);
    drop(admitted);
    setup.agent.stop();
}

#[test]
fn dry_run_refuses_nothing() {
    require_ebpf!();
    let mut setup = Setup::start("dry", &LIMITS.replace("max = 3", "max = 3\ndry_run = true"));
    let server = setup.v4();
    let admitted: Vec<TcpStream> = (1..=5)
        .map(|i| connect(&setup.ns, &format!("127.0.1.{i}"), server))
        .collect();
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 5);
    expect_held(&mut setup.server, 5);
    // The 4th and 5th would have been refused.
    setup.agent.expect(
        "msys.audit.refusals(\"60,1\", {cidr=\"127.0.1.0/24\"})",
        "OK 2",
    );
    assert_eq!(setup.agent.stat("kernel_limit_dry_run_refusals"), 2);
    assert_eq!(setup.agent.stat("kernel_limit_refusals"), 0);
    drop(admitted);
    setup.agent.stop();
}

/// The agent keeps only CAP_BPF after start-up: a reload that brings the
/// first limit must find the program loaded already.
#[test]
fn a_limit_added_by_a_reload_is_enforced() {
    require_ebpf!();
    let mut setup = Setup::start("reload", "");
    let server = setup.v4();
    assert_eq!(setup.agent.stat("kernel_limits_attached"), 0);
    let mut admitted: Vec<TcpStream> = (1..=4)
        .map(|i| connect(&setup.ns, &format!("127.0.1.{i}"), server))
        .collect();
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 4);
    std::fs::write(&setup.config, LIMITS).unwrap();
    setup.agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !setup.agent.log_text().contains("SIGHUP: 1 kernel limit(s)") {
        assert!(Instant::now() < deadline, "{}", setup.agent.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        setup
            .agent
            .log_text()
            .contains("SIGHUP: 1 kernel limit(s), sk_lookup attached"),
        "{}",
        setup.agent.log_text()
    );
    // The four sessions that predate the limit count against it.
    assert_refused(&setup.ns, "127.0.1.5", server);
    reset(admitted.remove(0));
    reset(admitted.remove(0));
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 2);
    admitted.push(connect(&setup.ns, "127.0.1.5", server));
    assert_refused(&setup.ns, "127.0.1.6", server);
    drop(admitted);
    setup.agent.stop();
}

/// Overshoot: a count rises when a handshake completes, so SYNs that arrive
/// together can pass before any is counted. A burst of 10×max SYNs from one
/// /24: every one is answered at once (admitted or ECONNREFUSED, never a
/// timeout), at least `max` are admitted, and the figure is printed.
#[test]
fn a_burst_of_syns_overshoots_by_what_is_in_flight() {
    require_ebpf!();
    let mut setup = Setup::start("burst", LIMITS);
    let server = setup.v4();
    let burst = 30;
    let barrier = std::sync::Barrier::new(burst);
    let path = format!("/run/netns/{}", setup.ns.0);
    let results: Vec<io::Result<TcpStream>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..burst)
            .map(|i| {
                let (barrier, path) = (&barrier, &path);
                scope.spawn(move || {
                    let file = std::fs::File::open(path).expect("open netns");
                    // SAFETY: setns on this thread only, with a namespace fd we hold.
                    let rc = unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                    };
                    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                    barrier.wait();
                    try_connect(&format!("127.0.1.{}", 1 + i % 200), server)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    for result in &results {
        if let Err(e) = result {
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        }
    }
    println!("burst of {burst} SYNs from one /24, max 3: {admitted} admitted");
    assert!(admitted >= 3, "{admitted} admitted");
    setup
        .agent
        .expect_count("127.0.1.0/24", "SMTP", admitted as u64);
    expect_held(&mut setup.server, admitted);
    drop(results);
    setup.agent.stop();
}

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
    http, netns::NetNs, require_ebpf, reset, sock_diag_count, Agent, AgentOptions, TempDir,
    TestCgroup, TestServer,
};

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
    cgroup: TestCgroup,
    ns: NetNs,
}

impl Setup {
    /// A test server on 127.0.0.1 and [::] (both SMTP) and the agent, in a
    /// namespace of their own, with `limits` as the config file's text.
    fn start(name: &str, limits: &str) -> Self {
        Self::start_after(name, limits, |_, _| ()).0
    }

    /// `start`, with the sessions `before` opens (given the namespace and
    /// the server's two addresses) open before the agent starts.
    fn start_after<Before>(
        name: &str,
        limits: &str,
        before: impl FnOnce(&NetNs, [SocketAddr; 2]) -> Before,
    ) -> (Self, Before) {
        let ns = NetNs::new(name);
        // IPv6 clients from three /64s; 127.0.0.0/8 is on lo already.
        for addr in ["fd00:1::1", "fd00:1::2", "fd00:2::1", "fd00:3::1"] {
            ns.ip(&["addr", "add", &format!("{addr}/128"), "dev", "lo", "nodad"]);
        }
        let cgroup = TestCgroup::new(&format!("refusal-{name}"));
        let server = TestServer::start_in_netns(
            env!("CARGO_BIN_EXE_test-server"),
            ns.name(),
            &cgroup,
            &["127.0.0.1:0", "[::]:0"],
        );
        let sessions = before(
            &ns,
            [
                SocketAddr::new(addr("127.0.0.1"), server.ports[0]),
                SocketAddr::new(addr("::1"), server.ports[1]),
            ],
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
                    // The namespace's own loopback: no other test is there.
                    "--metrics-listen".into(),
                    format!("127.0.0.1:{METRICS_PORT}"),
                ],
            },
            ns.name(),
        );
        let setup = Self {
            agent,
            server,
            config,
            _dir: dir,
            cgroup,
            ns,
        };
        (setup, sessions)
    }

    /// The kernel's truth for `net`: live inbound sockets, from sock_diag
    /// in the test's namespace.
    fn sock_diag(&self, net: &str) -> u64 {
        let net: ipnet::IpNet = net.parse().unwrap();
        let ports = self.server.ports.clone();
        self.ns.run(|| sock_diag_count(&ports, &self.cgroup, &net))
    }

    /// Writes `config` and sends SIGHUP; waits until the reload is done
    /// (its last log line, after any cuts).
    fn reload(&self, config: &str) {
        let done = |log: String| log.matches("SIGHUP: configuration reloaded").count();
        let before = done(self.agent.log_text());
        std::fs::write(&self.config, config).unwrap();
        self.agent.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while done(self.agent.log_text()) == before {
            assert!(Instant::now() < deadline, "{}", self.agent.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts the agent's log holds `text`.
    fn expect_logged(&self, text: &str) {
        let log = self.agent.log_text();
        assert!(log.contains(text), "{text:?} not in:\n{log}");
    }

    /// One series of the agent's `/metrics`, scraped inside the namespace.
    fn metric(&self, series: &str) -> Option<f64> {
        let (_, _, body) = self.ns.run(|| http::get(METRICS_PORT, "/metrics"));
        http::sample(&body, series)
    }

    fn v4(&self) -> SocketAddr {
        SocketAddr::new(addr("127.0.0.1"), self.server.ports[0])
    }

    fn v6(&self) -> SocketAddr {
        SocketAddr::new(addr("::1"), self.server.ports[1])
    }
}

/// The agent's metrics port, inside each test's namespace.
const METRICS_PORT: u16 = 9464;

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
    setup.expect_logged("sk_lookup attached");
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
    setup.reload(&LIMITS.replace("max = 3", "max = 4"));
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
    // And in the metrics, as Prometheus would scrape them.
    assert_eq!(
        setup.metric("inbound_audit_kernel_limit_refusals_total"),
        Some(5.0)
    );
    assert_eq!(
        setup.metric("inbound_audit_kernel_limit_dry_run_refusals_total"),
        Some(0.0)
    );
    assert_eq!(
        setup.metric("inbound_audit_kernel_limits_attached"),
        Some(1.0)
    );
    let show =
        inbound_audit::serving::client::query_report(&setup.agent.socket, "show 127.0.1.0/24")
            .expect("show request")
            .expect("show report");
    assert!(show.iter().any(|l| l == "Refusals 60/0: 5"), "{show:?}");

    // A reload without limits detaches the program: nothing is refused.
    setup.reload("");
    setup.expect_logged("sk_lookup program detached");
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
    assert_eq!(
        setup.metric("inbound_audit_kernel_limit_dry_run_refusals_total"),
        Some(2.0)
    );
    assert_eq!(
        setup.metric("inbound_audit_kernel_limit_refusals_total"),
        Some(0.0)
    );
    drop(admitted);
    setup.agent.stop();
}

/// The places the kernel gives sk_lookup programs in a namespace (64),
/// all taken by another user of sk_lookup: copies of our own program,
/// loaded apart from any agent with maps of their own (pinned in a private
/// directory), which let every SYN through. Dropping this frees them.
struct TakenSkLookupPlaces {
    ebpf: Option<aya::Ebpf>,
    pins: std::path::PathBuf,
}

impl TakenSkLookupPlaces {
    fn take_all(ns: &NetNs) -> Self {
        let object = std::env::var_os("INBOUND_AUDIT_EBPF_OBJECT")
            .expect("INBOUND_AUDIT_EBPF_OBJECT (cargo xtask test sets it)");
        let pins = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/ia-test-sk-lookup-places-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pins);
        std::fs::create_dir_all(&pins).unwrap();
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&pins)
            .load_file(object)
            .expect("load the eBPF object");
        let program: &mut aya::programs::SkLookup = ebpf
            .program_mut(audit_common::program_names::SK_LOOKUP)
            .unwrap()
            .try_into()
            .unwrap();
        program.load().unwrap();
        let netns = std::fs::File::open(ns.path()).unwrap();
        let mut attached = 0;
        let full = loop {
            match program.attach(&netns) {
                Ok(_) => attached += 1,
                Err(e) => break e,
            }
            assert!(
                attached <= 1024,
                "the kernel takes sk_lookup programs without limit"
            );
        };
        let e2big = matches!(
            &full,
            aya::programs::ProgramError::SyscallError(e)
                if e.io_error.raw_os_error() == Some(libc::E2BIG)
        );
        assert!(e2big, "after {attached} attached: {full:?}");
        Self {
            ebpf: Some(ebpf),
            pins,
        }
    }

    fn free(&mut self) {
        self.ebpf = None;
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

impl Drop for TakenSkLookupPlaces {
    fn drop(&mut self) {
        self.free();
    }
}

/// Where the sk_lookup program cannot be attached, the agent says so at
/// start and counts as before; once a place is free a reload attaches it,
/// and the counts kept meanwhile are the limit's.
#[test]
fn where_sk_lookup_cannot_be_attached_the_agent_says_so_and_counts_as_before() {
    require_ebpf!();
    let (mut setup, mut taken) = Setup::start_after("noattach", LIMITS, |ns, _| {
        TakenSkLookupPlaces::take_all(ns)
    });
    let log = setup.agent.log_text();
    assert!(
        log.contains("kernel limits: the sk_lookup program cannot be attached")
            && log.contains("counting goes on as before"),
        "{log}"
    );
    assert!(!log.contains("sk_lookup attached"), "{log}");
    assert_eq!(setup.agent.stat("kernel_limits_attached"), 0);
    assert_eq!(
        setup.metric("inbound_audit_kernel_limits_attached"),
        Some(0.0)
    );

    // Past max = 3 every session connects, and each is counted as ever.
    let server = setup.v4();
    let mut sessions: Vec<TcpStream> = (1..=5)
        .map(|i| connect(&setup.ns, &format!("127.0.1.{i}"), server))
        .collect();
    sessions.push(connect(&setup.ns, "fd00:1::1", setup.v6()));
    expect_held(&mut setup.server, 6);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 5);
    setup.agent.expect_count("fd00:1::/64", "SMTP", 1);
    assert_eq!(setup.sock_diag("127.0.1.0/24"), 5);
    reset(sessions.remove(0));
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 4);
    assert_eq!(setup.sock_diag("127.0.1.0/24"), 4);
    assert_eq!(setup.agent.stat("kernel_limit_refusals"), 0);

    // The other user leaves; a reload keeping the limit attaches the
    // program, and the four live sessions count against max = 3 at once.
    taken.free();
    setup.reload(LIMITS);
    setup.expect_logged("SIGHUP: 1 kernel limit(s), sk_lookup attached");
    assert_eq!(setup.agent.stat("kernel_limits_attached"), 1);
    assert_refused(&setup.ns, "127.0.1.9", server);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 4);
    drop(sessions);
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
    setup.reload(LIMITS);
    setup.expect_logged("SIGHUP: 1 kernel limit(s), sk_lookup attached");
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
    let path = setup.ns.path();
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

const CUTTING: &str = r#"
[[kernel_limits]]
ipv4_prefix = 24
ipv6_prefix = 64
max = 10
exempt = ["127.0.3.0/24", "fd00:3::/64"]
cut_existing = true
"#;

/// Asserts that the server cut `stream`: the client's next read gets the RST.
fn assert_cut(stream: &mut TcpStream, what: &str) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    match stream.read(&mut [0u8; 16]) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: {other:?}, expected ECONNRESET"),
    }
}

/// Asserts that `stream` is still open: a read waits (nothing sent, no RST).
fn assert_open(stream: &mut TcpStream, what: &str) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    match stream.read(&mut [0u8; 16]) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("{what}: {other:?}, expected the session to stay open"),
    }
}

/// Connects from each source in turn, a few ms apart: the kernel keeps
/// each session's open time in ms, so their ages are in this order.
fn connect_in_order(setup: &Setup, sources: &[&str], server: SocketAddr) -> Vec<TcpStream> {
    sources
        .iter()
        .map(|source| {
            let stream = connect(&setup.ns, source, server);
            std::thread::sleep(Duration::from_millis(5));
            stream
        })
        .collect()
}

#[test]
fn a_lowered_limit_with_cut_existing_cuts_the_newest_sessions() {
    require_ebpf!();
    let mut setup = Setup::start("cut", CUTTING);
    setup.expect_logged("CAP_NET_ADMIN (kept for cut_existing");
    let server = setup.v4();
    let mut full = connect_in_order(
        &setup,
        &[
            "127.0.1.1",
            "127.0.1.2",
            "127.0.1.1",
            "127.0.1.3",
            "127.0.1.2",
        ],
        server,
    );
    let mut other = connect_in_order(&setup, &["127.0.2.1", "127.0.2.1"], server);
    let mut exempt = connect_in_order(&setup, &["127.0.3.1"; 4], server);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 5);
    setup.agent.expect_count("127.0.3.0/24", "SMTP", 4);

    // Lowered to 3: the two newest of 127.0.1.0/24 get a RST.
    setup.reload(&CUTTING.replace("max = 10", "max = 3"));
    let log = setup.agent.log_text();
    assert!(
        log.contains("SIGHUP: kernel limits: cut 2 sessions from 127.0.1.0/24 (over max 3)"),
        "{log}"
    );
    assert_eq!(log.matches("kernel limits: cut").count(), 1, "{log}");
    for (i, stream) in full.iter_mut().enumerate() {
        if i < 3 {
            assert_open(stream, &format!("oldest session {i}"));
        } else {
            assert_cut(stream, &format!("newest session {i}"));
        }
    }
    for stream in other.iter_mut().chain(exempt.iter_mut()) {
        assert_open(stream, "a session of a prefix under its limit, or exempt");
    }
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 3);
    assert_eq!(setup.sock_diag("127.0.1.0/24"), 3);
    assert_eq!(setup.sock_diag("127.0.3.0/24"), 4);
    expect_held(&mut setup.server, 3 + 2 + 4);
    assert_eq!(setup.agent.stat("kernel_limit_cuts"), 2);
    assert_eq!(setup.agent.stat("kernel_limit_dry_run_cuts"), 0);
    // Full now, and refusing.
    assert_refused(&setup.ns, "127.0.1.9", server);

    // A reload that adds a /32 limit of 1: 127.0.1.1 and 127.0.2.1 hold two
    // each, and lose their newest.
    let with_host_limit = format!(
        "{}\n[[kernel_limits]]\nmax = 1\nexempt = [\"127.0.3.0/24\"]\ncut_existing = true\n",
        CUTTING.replace("max = 10", "max = 3")
    );
    setup.reload(&with_host_limit);
    let log = setup.agent.log_text();
    assert!(
        log.contains("cut 1 sessions from 127.0.1.1/32 (over max 1)")
            && log.contains("cut 1 sessions from 127.0.2.1/32 (over max 1)"),
        "{log}"
    );
    assert_cut(&mut full[2], "127.0.1.1's newer session");
    assert_open(&mut full[0], "127.0.1.1's older session");
    assert_open(&mut full[1], "127.0.1.2's only session left");
    assert_cut(&mut other[1], "127.0.2.1's newer session");
    assert_open(&mut other[0], "127.0.2.1's older session");
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 2);
    setup.agent.expect_count("127.0.2.0/24", "SMTP", 1);
    assert_eq!(setup.sock_diag("127.0.1.0/24"), 2);
    assert_eq!(setup.sock_diag("127.0.2.0/24"), 1);
    assert_eq!(setup.agent.stat("kernel_limit_cuts"), 4);

    // The same configuration again: nothing is over, nothing is cut.
    setup.reload(&with_host_limit);
    assert_eq!(setup.agent.stat("kernel_limit_cuts"), 4);
    for stream in full.iter_mut().take(2).chain(other.iter_mut().take(1)) {
        assert_open(stream, "a session under every limit");
    }
    drop((full, other, exempt));
    setup.agent.stop();
}

#[test]
fn without_cut_existing_nothing_is_cut_and_a_dry_run_only_counts() {
    require_ebpf!();
    let plain = CUTTING.replace("cut_existing = true", "");
    let mut setup = Setup::start("nocut", &plain);
    assert!(
        !setup.agent.log_text().contains("kept for cut_existing"),
        "{}",
        setup.agent.log_text()
    );
    let server = setup.v4();
    let sources: Vec<String> = (1..=5).map(|i| format!("127.0.1.{i}")).collect();
    let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
    let mut sessions = connect_in_order(&setup, &sources, server);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 5);

    // Lowered without cut_existing: new SYNs are refused, no session is cut.
    setup.reload(&plain.replace("max = 10", "max = 3"));
    assert_refused(&setup.ns, "127.0.1.9", server);
    for stream in &mut sessions {
        assert_open(stream, "a session over a limit without cut_existing");
    }
    assert_eq!(setup.sock_diag("127.0.1.0/24"), 5);

    // A dry run counts and logs what it would cut, and cuts nothing.
    setup.reload(
        &CUTTING
            .replace("max = 10", "max = 3")
            .replace("cut_existing = true", "cut_existing = true\ndry_run = true"),
    );
    let log = setup.agent.log_text();
    assert!(
        log.contains("kernel limits (dry run): would have cut 2 sessions from 127.0.1.0/24"),
        "{log}"
    );
    for stream in &mut sessions {
        assert_open(stream, "a session a dry run would cut");
    }
    assert_eq!(setup.agent.stat("kernel_limit_dry_run_cuts"), 2);
    assert_eq!(setup.agent.stat("kernel_limit_cuts"), 0);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 5);
    assert_eq!(setup.sock_diag("127.0.1.0/24"), 5);

    // cut_existing enabled by a reload only: the agent dropped CAP_NET_ADMIN
    // at start-up, so the cut fails, says why, and nothing changes.
    setup.reload(&CUTTING.replace("max = 10", "max = 3"));
    let log = setup.agent.log_text();
    assert!(
        log.contains("stopped cutting") && log.contains("restart the agent"),
        "{log}"
    );
    for stream in &mut sessions {
        assert_open(stream, "a session the agent could not cut");
    }
    assert_eq!(setup.agent.stat("kernel_limit_cuts"), 0);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 5);
    expect_held(&mut setup.server, 5);
    drop(sessions);
    setup.agent.stop();
}

#[test]
fn cut_existing_cuts_ipv6_sessions_per_64() {
    require_ebpf!();
    let mut setup = Setup::start("cut6", CUTTING);
    let server = setup.v6();
    let mut sessions = connect_in_order(
        &setup,
        &["fd00:1::1", "fd00:1::2", "fd00:1::1", "fd00:1::2"],
        server,
    );
    let mut other = connect_in_order(&setup, &["fd00:2::1"; 3], server);
    setup.agent.expect_count("fd00:1::/64", "SMTP", 4);
    setup.reload(&CUTTING.replace("max = 10", "max = 3"));
    setup.expect_logged("cut 1 sessions from fd00:1::/64 (over max 3)");
    assert_cut(&mut sessions[3], "the newest session");
    for (i, stream) in sessions.iter_mut().take(3).enumerate() {
        assert_open(stream, &format!("older session {i}"));
    }
    for stream in &mut other {
        assert_open(stream, "a /64 at its limit");
    }
    setup.agent.expect_count("fd00:1::/64", "SMTP", 3);
    assert_eq!(setup.sock_diag("fd00:1::/64"), 3);
    assert_eq!(setup.sock_diag("fd00:2::/64"), 3);
    assert_refused(&setup.ns, "fd00:1::1", server);
    assert_eq!(setup.agent.stat("kernel_limit_cuts"), 1);
    drop((sessions, other));
    setup.agent.stop();
}

/// Sessions that predate the agent are seeded and then cut at start-up.
/// Their cookies come from the seeding's dump, not from their age, so only
/// how many are cut is fixed, not which.
#[test]
fn sessions_that_predate_the_agent_are_cut_at_start_up() {
    require_ebpf!();
    let (setup, mut sessions) = Setup::start_after(
        "cutstart",
        &CUTTING.replace("max = 10", "max = 2"),
        |ns, [v4, _]| {
            (1..=5)
                .map(|i| connect(ns, &format!("127.0.1.{i}"), v4))
                .collect::<Vec<_>>()
        },
    );
    let log = setup.agent.log_text();
    assert!(
        log.contains("start-up: kernel limits: cut 3 sessions from 127.0.1.0/24 (over max 2)"),
        "{log}"
    );
    let mut cut = 0;
    for stream in &mut sessions {
        use std::io::Read;
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match stream.read(&mut [0u8; 16]) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => cut += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(cut, 3);
    setup.agent.expect_count("127.0.1.0/24", "SMTP", 2);
    assert_eq!(setup.sock_diag("127.0.1.0/24"), 2);
    assert_eq!(setup.agent.stat("kernel_limit_cuts"), 3);
    drop(sessions);
    let mut setup = setup;
    setup.agent.stop();
}

/// A namespace for clients, linked to `setup`'s by a veth pair: the server
/// end has 10.99.0.1, the client end 10.99.1.1-`clients` (one /24). The
/// server end sends through a token bucket at `rate` (this kernel has no
/// netem): a burst's SYN-ACKs queue behind each other, so its handshakes
/// complete over tens of milliseconds, as over a real network, while its
/// SYNs all arrive at once.
fn delayed_link(setup: &Setup, name: &str, clients: u8, rate: &str) -> NetNs {
    let client = NetNs::new(name);
    setup.ns.ip(&[
        "link",
        "add",
        "s0",
        "type",
        "veth",
        "peer",
        "name",
        "c0",
        "netns",
        client.name(),
    ]);
    setup.ns.ip(&["addr", "add", "10.99.0.1/16", "dev", "s0"]);
    setup.ns.ip(&["link", "set", "s0", "up"]);
    client.ip(&["addr", "add", "10.99.1.1/16", "dev", "c0"]);
    for i in 2..=clients {
        client.ip(&["addr", "add", &format!("10.99.1.{i}/32"), "dev", "c0"]);
    }
    client.ip(&["link", "set", "c0", "up"]);
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            setup.ns.name(),
            "tc",
            "qdisc",
            "add",
            "dev",
            "s0",
            "root",
        ])
        // A bucket smaller than two SYN-ACKs (74 bytes each on the veth):
        // each waits for its tokens instead of leaving in a burst.
        .args(["tbf", "rate", rate, "burst", "128", "limit", "100000"])
        .status()
        .expect("tc");
    assert!(status.success(), "tc qdisc add tbf: {status}");
    client
}

/// `burst` connects from distinct addresses of 10.99.1.0/24 in `client`'s
/// namespace, released together; each result with how long it took.
fn syn_burst(
    client: &NetNs,
    burst: usize,
    server: SocketAddr,
) -> Vec<(io::Result<TcpStream>, Duration)> {
    let barrier = std::sync::Barrier::new(burst);
    let path = client.path();
    std::thread::scope(|scope| {
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
                    let started = Instant::now();
                    let result = try_connect(&format!("10.99.1.{}", 1 + i % 250), server);
                    (result, started.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    })
}

/// One burst of `burst` SYNs over `client`'s link: checks that every SYN
/// was answered (admitted or ECONNREFUSED, never a timeout) and that the
/// agent and sock_diag count the admitted ones, closes them, and returns
/// how many were admitted and the slowest answer.
fn measured_burst(
    setup: &Setup,
    client: &NetNs,
    burst: usize,
    server: SocketAddr,
) -> (usize, Duration) {
    let results = syn_burst(client, burst, server);
    let slowest = results.iter().map(|(_, took)| *took).max().unwrap();
    let mut admitted = Vec::new();
    for (result, _) in results {
        match result {
            Ok(stream) => admitted.push(stream),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}"),
        }
    }
    let n = admitted.len();
    setup.agent.expect_count("10.99.1.0/24", "SMTP", n as u64);
    assert_eq!(setup.sock_diag("10.99.1.0/24"), n as u64);
    for stream in admitted {
        reset(stream);
    }
    setup.agent.expect_count("10.99.1.0/24", "SMTP", 0);
    // A new pending window: the next burst starts from nothing pending.
    std::thread::sleep(Duration::from_millis(1100));
    (n, slowest)
}

/// Overshoot over a link where handshakes take real time: bursts of 10×max
/// SYNs from one /24, without the pending bound (`count_pending = false`)
/// and with it, in one run. With it, admitted SYNs count until their
/// handshakes complete: at most max, plus one per other CPU that can race
/// the same prefix's check.
#[test]
fn a_burst_over_a_slow_link_is_bounded_by_pending_syns() {
    require_ebpf!();
    let unbounded_limits = LIMITS.replace("max = 3", "max = 3\ncount_pending = false");
    let setup = Setup::start("slow", &unbounded_limits);
    let client = delayed_link(&setup, "slowc", 30, "64kbit");
    let server = SocketAddr::new(addr("10.99.0.1"), setup.server.ports[1]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut figures = Vec::new();
    for round in 0..3 {
        setup.reload(&unbounded_limits);
        let unbounded = measured_burst(&setup, &client, 30, server);
        setup.reload(LIMITS);
        let bounded = measured_burst(&setup, &client, 30, server);
        println!(
            "round {round}: burst of 30 SYNs from one /24 over a 64 kbit/s link, max 3: \
             {} admitted without the bound (slowest answer {:?}), {} with it ({:?})",
            unbounded.0, unbounded.1, bounded.0, bounded.1
        );
        assert!(
            bounded.0 >= 1 && bounded.0 < 3 + cpus,
            "{} admitted with the bound",
            bounded.0
        );
        figures.push((unbounded.0, bounded.0));
    }
    // The link makes the overshoot real: without the bound, more than max.
    assert!(
        figures.iter().any(|&(unbounded, _)| unbounded > 3),
        "{figures:?}"
    );
    let mut setup = setup;
    setup.agent.stop();
}

/// A prefix that goes over its limit between reloads (here a burst without
/// the pending bound, over a slow link) is cut back by the next reconcile
/// pass when `cut_existing` is on: the newest sessions get a RST, the
/// counts fall to max, the log names the prefix once per pass.
#[test]
fn an_overshoot_is_cut_back_by_the_next_reconcile_pass() {
    require_ebpf!();
    let limits = format!(
        "reconcile_interval_secs = 1\n{}",
        LIMITS.replace(
            "max = 3",
            "max = 3\ncount_pending = false\ncut_existing = true"
        )
    );
    let setup = Setup::start("overcut", &limits);
    let client = delayed_link(&setup, "overcutc", 30, "64kbit");
    let server = SocketAddr::new(addr("10.99.0.1"), setup.server.ports[1]);
    // The link makes an overshoot likely, not certain: up to three bursts.
    let mut tries = Vec::new();
    let mut admitted = Vec::new();
    for _ in 0..3 {
        admitted = syn_burst(&client, 30, server)
            .into_iter()
            .filter_map(|(result, _)| result.ok())
            .collect();
        tries.push(admitted.len());
        if admitted.len() > 3 {
            break;
        }
        for stream in admitted.drain(..) {
            reset(stream);
        }
        setup.agent.expect_count("10.99.1.0/24", "SMTP", 0);
    }
    let over = admitted.len();
    assert!(over > 3, "no burst went over the limit: {tries:?}");
    // Cut back to max within a pass or two, in the agent's counts and the kernel's.
    setup.agent.expect_count("10.99.1.0/24", "SMTP", 3);
    assert_eq!(setup.sock_diag("10.99.1.0/24"), 3);
    // Counted once the pass is over, a moment after the closes it caused.
    integration_tests::eventually_within("the cuts counted", Duration::from_secs(5), || {
        setup.agent.stat("kernel_limit_cuts") == (over - 3) as u64
    });
    let mut cut = 0;
    for stream in &mut admitted {
        use std::io::Read;
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if matches!(
            stream.read(&mut [0u8; 16]),
            Err(ref e) if e.kind() == io::ErrorKind::ConnectionReset
        ) {
            cut += 1;
        }
    }
    assert_eq!(cut, over - 3, "the clients cut see a reset");
    // One line per prefix per pass (a pass may land mid-burst, so maybe two).
    let log = setup.agent.log_text();
    let logged: usize = log
        .lines()
        .filter_map(|l| {
            l.split_once("reconcile: kernel limits: cut ")?
                .1
                .split_once(' ')
        })
        .map(|(n, rest)| {
            assert!(
                rest.starts_with("sessions from 10.99.1.0/24 (over max 3)"),
                "{rest}"
            );
            n.parse::<usize>().unwrap()
        })
        .sum();
    assert_eq!(logged, over - 3, "{log}");
    for stream in admitted {
        drop(stream);
    }
    let mut setup = setup;
    setup.agent.stop();
}

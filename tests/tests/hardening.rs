//! End to end, as root: who may use the query socket, and clients that trickle
//! or idle cannot hold the agent.

use std::{
    io::{Read, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    agent_binary, require_ebpf, Agent, AgentOptions, SmtpFixture, TempDir, TestCgroup, TestServer,
};

/// Debian's nobody/nogroup.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

fn start(name: &str, extra_args: &[&str]) -> (TestCgroup, TestServer, Agent) {
    let fixture = SmtpFixture::start(env!("CARGO_BIN_EXE_test-server"), name, extra_args);
    (fixture.cgroup, fixture.server, fixture.agent)
}

/// Runs `inbound-audit query` (the copy at `binary`) as `uid`/`gid`; returns
/// (exit code, stdout).
fn query_as(
    binary: &std::path::Path,
    agent: &Agent,
    uid: u32,
    gid: u32,
    request: &str,
) -> (Option<i32>, String) {
    let output = Command::new(binary)
        .args(["query", "--socket"])
        .arg(&agent.socket)
        .arg(request)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn peer_credentials_decide_who_queries_and_who_reports() {
    require_ebpf!();
    let dir = TempDir::new("access-config");
    let config = dir.path().join("access.toml");
    std::fs::write(
        &config,
        format!(
            "monitors = [\"60,1\"]\n[access]\nquery_users = [{NOBODY}]\nadd_users = [{}]\n",
            NOBODY - 1
        ),
    )
    .unwrap();
    let (_cgroup, _server, agent) = start(
        "access",
        &[
            "--config",
            config.to_str().unwrap(),
            "--socket-group",
            &NOGROUP.to_string(),
        ],
    );
    // The checkout (and target/ in it) may be private to root: the other
    // users run a copy.
    let binary = dir.path().join("inbound-audit");
    std::fs::copy(agent_binary(), &binary).unwrap();
    let query = "msys.audit.inbound_session_count(\"127.0.0.0/8\", \"SMTP\")";
    // nobody may query but not report.
    assert_eq!(
        query_as(&binary, &agent, NOBODY, NOGROUP, query),
        (Some(0), "OK 0\n".into())
    );
    let (code, out) = query_as(
        &binary,
        &agent,
        NOBODY,
        NOGROUP,
        "add receptions 127.0.0.1 2",
    );
    assert_eq!(code, Some(1));
    assert!(out.starts_with("ERR forbidden uid 65534 "), "{out}");
    // 65533 may report (and so query); 65532 may do neither.
    assert_eq!(
        query_as(
            &binary,
            &agent,
            NOBODY - 1,
            NOGROUP,
            "add receptions 127.0.0.1 2"
        ),
        (Some(0), "OK 2\n".into())
    );
    assert_eq!(
        query_as(&binary, &agent, NOBODY - 1, NOGROUP, query),
        (Some(0), "OK 0\n".into())
    );
    let (code, out) = query_as(&binary, &agent, NOBODY - 2, NOGROUP, query);
    assert_eq!(code, Some(1));
    assert!(
        out.starts_with("ERR forbidden uid 65532 may not query"),
        "{out}"
    );
    // Root always may; the refusal is logged with the uid.
    assert_eq!(agent.query("add receptions 127.0.0.1"), "OK 3");
    assert!(
        agent.log_text().contains("from uid 65532"),
        "{}",
        agent.log_text()
    );

    // Without the socket's group a user cannot even connect.
    let (code, _) = query_as(&binary, &agent, NOBODY, NOBODY - 10, query);
    assert_eq!(code, Some(2));
}

#[test]
fn trickling_and_silent_clients_are_dropped_and_cannot_stall_others() {
    require_ebpf!();
    let dir = TempDir::new("timeouts-config");
    let config = dir.path().join("timeouts.toml");
    std::fs::write(
        &config,
        "client_idle_timeout_secs = 2\nrequest_timeout_secs = 1\n",
    )
    .unwrap();
    let (_cgroup, _server, agent) = start("timeouts", &["--config", config.to_str().unwrap()]);

    let mut idle = UnixStream::connect(&agent.socket).unwrap();
    let mut trickle = UnixStream::connect(&agent.socket).unwrap();
    let started = Instant::now();
    // One byte every 200 ms: never a whole line within the 1 s request limit.
    let mut dropped = false;
    for byte in b"msys.audit.inbound_session_count()"
        .iter()
        .cycle()
        .take(40)
    {
        // Meanwhile everyone else is served at once.
        assert_eq!(
            agent.query("audit_service \"SMTP\" \"127.0.0.0/8\""),
            "OK 0"
        );
        if trickle.write_all(&[*byte]).is_err() {
            dropped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(dropped, "the trickling client was never dropped");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // The silent client is closed after the idle limit, unanswered.
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[test]
fn a_socket_directory_writable_by_everyone_is_refused() {
    require_ebpf!();
    let dir = TempDir::new("world-writable");
    let open_dir = dir.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(
        &open_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let output = Command::new(agent_binary())
        .args(["agent", "--socket"])
        .arg(open_dir.join("audit.sock"))
        .args(["--pin-dir", "/sys/fs/bpf/inbound-audit-test-world-writable"])
        .output()
        .unwrap();
    let _ = inbound_audit::kernel::loader::cleanup(std::path::Path::new(
        "/sys/fs/bpf/inbound-audit-test-world-writable",
    ));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("writable by every user"), "{stderr}");
    assert!(!open_dir.join("audit.sock").exists());
}

#[test]
fn a_full_kernel_table_refuses_new_ips_keeps_existing_counts_exact_and_says_so() {
    require_ebpf!();
    let dir = TempDir::new("full-config");
    let config = dir.path().join("full.toml");
    std::fs::write(
        &config,
        "max_tracked_ips = 2\nreconcile_interval_secs = 1\n",
    )
    .unwrap();
    let (_cgroup, server, agent) = start("full", &["--config", config.to_str().unwrap()]);
    let smtp = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), server.ports[0]);
    let from = |ip: &str| integration_tests::connect_from(ip.parse().unwrap(), smtp);
    let a = [from("127.0.0.51"), from("127.0.0.51")];
    let b = from("127.0.0.52");
    agent.expect_count("127.0.0.0/8", "SMTP", 3);
    // A third IP does not fit: not counted, and nothing else changes.
    let c = from("127.0.0.53");
    let a2 = from("127.0.0.51");
    agent.expect_count("127.0.0.51", "SMTP", 3);
    agent.expect_count("127.0.0.52", "SMTP", 1);
    agent.expect_count("127.0.0.53", "SMTP", 0);
    integration_tests::eventually("stats report the saturation", || {
        let report = inbound_audit::serving::client::query_report(&agent.socket, "stats")
            .unwrap()
            .unwrap();
        report.contains(&"kernel_ip_table_full 1".to_string())
            && report.contains(&"kernel_tables_saturated yes".to_string())
    });
    let show = inbound_audit::serving::client::query_report(&agent.socket, "show 127.0.0.0/8")
        .unwrap()
        .unwrap();
    assert!(
        show.iter()
            .any(|l| l.starts_with("Kernel tables saturated: 1 ")),
        "{show:?}"
    );
    assert!(
        agent.log_text().contains("kernel tables full"),
        "{}",
        agent.log_text()
    );
    drop((a, b, c, a2));
    agent.expect_count("127.0.0.0/8", "SMTP", 0);
}

#[test]
fn sighup_reloads_services_monitors_and_limits_without_losing_counts() {
    require_ebpf!();
    let cgroup = TestCgroup::new("reload");
    let server = TestServer::start(
        env!("CARGO_BIN_EXE_test-server"),
        &cgroup,
        &["127.0.0.1:0", "127.0.0.1:0"],
    );
    let dir = TempDir::new("reload-config");
    let config = dir.path().join("reload.toml");
    let write_config = |text: &str| std::fs::write(&config, text).unwrap();
    write_config(&format!(
        "monitors = [\"60,1\"]\n[services]\nSMTP = [{}]\n",
        server.ports[0]
    ));
    let agent = Agent::start(AgentOptions {
        name: "reload",
        cgroup: &cgroup,
        services: Vec::new(),
        extra_args: vec!["--config".into(), config.display().to_string()],
    });
    let smtp = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), server.ports[0]);
    let control = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), server.ports[1]);
    let from = |ip: &str, to| integration_tests::connect_from(ip.parse().unwrap(), to);
    let held = [from("127.0.0.61", smtp), from("127.0.0.61", smtp)];
    agent.expect_count("127.0.0.61", "SMTP", 2);
    assert_eq!(agent.query("add receptions 127.0.0.61 3"), "OK 3");
    assert!(agent
        .query("msys.audit.inbound_session_count('127.0.0.61', 'Control')")
        .starts_with("ERR unknown_service "));

    // Open before its port is watched: sock_ops never sees it accepted.
    let early = from("127.0.0.63", control);

    // A new service and a new monitor; the running ones keep their counts.
    write_config(&format!(
        "monitors = [\"60,1\", \"300,2\"]\n[services]\nSMTP = [{}]\nControl = [{}]\n",
        server.ports[0], server.ports[1]
    ));
    agent.signal(libc::SIGHUP);
    agent.expect(
        "msys.audit.inbound_session_count('127.0.0.61', 'Control')",
        "OK 0",
    );
    // The session already open on the newly watched port is seeded, and its
    // close is seen (by the close backstop, attached again for it).
    agent.expect_count("127.0.0.63", "Control", 1);
    assert!(
        agent.log_text().contains("1 open sessions seeded"),
        "{}",
        agent.log_text()
    );
    drop(early);
    agent.expect_count("127.0.0.63", "Control", 0);
    let c = from("127.0.0.61", control);
    agent.expect_count("127.0.0.61", "Control", 1);
    agent.expect_count("127.0.0.61", "SMTP", 2);
    agent.expect(
        "@127.0.0.61 msys.audit.receptions('60,1', {endv=1})",
        "OK 3",
    );
    agent.expect("@127.0.0.61 msys.audit.receptions('300,2')", "OK 0");

    // An invalid file is refused whole; the running configuration stays.
    write_config("monitors = [\"sixty\"]\n");
    agent.signal(libc::SIGHUP);
    integration_tests::eventually("the refusal is logged", || {
        agent.log_text().contains("new configuration refused")
    });
    agent.expect_count("127.0.0.61", "Control", 1);
    agent.expect("@127.0.0.61 msys.audit.receptions('300,2')", "OK 0");
    // A restart-only key is kept as it runs, and said so.
    write_config(&format!(
        "max_clients = 7\nmonitors = [\"60,1\"]\n[services]\nSMTP = [{}]\n",
        server.ports[0]
    ));
    agent.signal(libc::SIGHUP);
    integration_tests::eventually("the kept key is logged", || {
        agent
            .log_text()
            .contains("max_clients change only on restart")
    });
    // The services and monitors are applied after that line is logged.
    integration_tests::eventually("the dropped monitor is gone", || {
        agent
            .query("@127.0.0.61 msys.audit.receptions('300,2')")
            .starts_with("ERR unknown_monitor ")
    });
    agent.expect_count("127.0.0.61", "SMTP", 2);
    // The kernel no longer counts the dropped service's port.
    let unwatched = from("127.0.0.62", control);
    agent.expect_count("127.0.0.62", "SMTP", 0);
    let live = integration_tests::PinnedLiveMap::open(&agent.pin_dir);
    assert_eq!(live.get([127, 0, 0, 62]), None);
    drop((held, c, unwatched));
    agent.expect_count("127.0.0.61", "SMTP", 0);
}

#[test]
fn the_agent_keeps_only_cap_bpf_and_still_does_its_work() {
    require_ebpf!();
    let (_cgroup, server, agent) =
        start("caps", &["--monitor", "60,1", "--reconcile-interval", "1"]);
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| cmd.contains("inbound-audit-test-caps"))
        })
        .expect("the agent's process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    let cap_bpf = 1u64 << inbound_audit::sys::caps::CAP_BPF;
    // Capabilities are per thread: every thread of the agent must have dropped them.
    integration_tests::eventually("every thread keeps only CAP_BPF", || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .all(|task| {
                let status = std::fs::read_to_string(task.unwrap().path().join("status"))
                    .unwrap_or_default();
                status
                    .lines()
                    .any(|l| l == format!("CapEff:\t{cap_bpf:016x}"))
                    && status
                        .lines()
                        .any(|l| l == format!("CapPrm:\t{cap_bpf:016x}"))
            })
    });
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(
        threads > 1,
        "the runtime's worker threads are there too ({threads})"
    );
    assert_eq!(field("CapBnd:"), cap_bpf, "{status}");
    assert_eq!(field("CapInh:"), 0);
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    // Counting, reconciling, reporting and reloading still work.
    let smtp = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), server.ports[0]);
    let conn = integration_tests::connect_from("127.0.0.71".parse().unwrap(), smtp);
    agent.expect_count("127.0.0.71", "SMTP", 1);
    assert_eq!(agent.query("add receptions 127.0.0.71 2"), "OK 2");
    agent.signal(libc::SIGHUP);
    agent.expect_count("127.0.0.71", "SMTP", 1);
    drop(conn);
    agent.expect_count("127.0.0.71", "SMTP", 0);
    // Zero entries are still collected from the kernel map (a bpf() call).
    integration_tests::eventually("the agent collects zero entries", || {
        inbound_audit::serving::client::query_report(&agent.socket, "stats")
            .unwrap()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("zero_entries_collected ") && l != "zero_entries_collected 0")
    });
    assert!(agent
        .log_text()
        .contains("dropped every capability but CAP_BPF"));
    assert!(
        !agent.log_text().contains("SIGHUP: services not applied"),
        "{}",
        agent.log_text()
    );
}

/// A ring buffer that overflows (agent stopped while sessions come and go)
/// loses events, never counts: the kernel's maps stay right, the agent notices
/// the loss and repairs its index from the socket records.
#[test]
fn lost_kernel_events_are_noticed_and_repaired_from_the_socket_records() {
    require_ebpf!();
    let dir = TempDir::new("overflow-config");
    let config = dir.path().join("overflow.toml");
    // One page: about a hundred events.
    std::fs::write(
        &config,
        "event_ring_bytes = 4096\nreconcile_interval_secs = 1\n",
    )
    .unwrap();
    let (cgroup, server, agent) = start("overflow", &["--config", config.to_str().unwrap()]);
    let smtp = std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), server.ports[0]);
    let from = |ip: &str| integration_tests::connect_from(ip.parse().unwrap(), smtp);
    let mut early: Vec<_> = (0..5).map(|_| from("127.0.0.81")).collect();
    agent.expect_count("127.0.0.81", "SMTP", 5);
    assert_eq!(agent.stat("kernel_events_lost"), 0);

    agent.freeze();
    let burst: Vec<_> = (0..150).map(|_| from("127.0.0.82")).collect();
    early.truncate(2);
    // The closes must reach the kernel while the ring is still full.
    integration_tests::eventually("the server sees the closes", || {
        integration_tests::sock_diag_count(
            &server.ports,
            &cgroup,
            &"127.0.0.81/32".parse().unwrap(),
        ) == 2
    });
    agent.signal(libc::SIGCONT);

    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.stat("kernel_events_lost") == 0 {
        assert!(
            Instant::now() < deadline,
            "no lost events seen: {:?}\n{}",
            inbound_audit::serving::client::query_report(&agent.socket, "stats"),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    integration_tests::eventually("the index is repaired", || agent.stat("index_repairs") > 0);
    agent.expect_count("127.0.0.81", "SMTP", 2);
    agent.expect_count("127.0.0.82", "SMTP", 150);
    assert_eq!(
        integration_tests::sock_diag_count(&server.ports, &cgroup, &"127.0.0.0/8".parse().unwrap()),
        152
    );
    // Events flow again once the agent reads the ring.
    drop(burst);
    drop(early);
    agent.expect_count("127.0.0.0/8", "SMTP", 0);
}

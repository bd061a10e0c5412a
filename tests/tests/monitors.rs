//! End to end, as root: time-windowed monitors fed by the kernel's accept events
//! and by `add` reports, `show`, and monitor state across restarts.

use std::{net::SocketAddr, process::Command};

use integration_tests::{
    agent_binary, connect_from, require_ebpf, Agent, AgentOptions, SmtpFixture, TempDir,
    TestCgroup, TestServer,
};

/// Sums over every window of "60,2" (0..=2, three minutes), so a test that
/// crosses a window boundary still sees all it did.
const ALL_WINDOWS: &str = "{startv=0, endv=2}";

fn start(name: &str, state_dir: &TempDir) -> SmtpFixture {
    let args = monitor_args(state_dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    SmtpFixture::start(env!("CARGO_BIN_EXE_test-server"), name, &args)
}

fn monitor_args(state_dir: &TempDir) -> Vec<String> {
    vec![
        "--monitor".into(),
        "60,2".into(),
        "--monitor".into(),
        "300,1".into(),
        "--state-dir".into(),
        state_dir.path().display().to_string(),
    ]
}

fn windowed(agent: &Agent, client: &str, function: &str, expected: u64) {
    agent.expect(
        &format!("@{client} msys.audit.{function}(\"60,2\", {ALL_WINDOWS})"),
        &format!("OK {expected}"),
    );
}

#[test]
fn accepts_are_counted_in_windows_and_reports_add_up() {
    require_ebpf!();
    let state_dir = TempDir::new("monitors-state");
    let cgroup = TestCgroup::new("monitors");
    let server = TestServer::start(env!("CARGO_BIN_EXE_test-server"), &cgroup, &["127.0.0.1:0"]);
    let smtp = SocketAddr::new("127.0.0.1".parse().unwrap(), server.ports[0]);
    // Sessions from before the agent are live sessions, not new connections.
    let before: Vec<_> = (0..2)
        .map(|_| connect_from("127.0.0.32".parse().unwrap(), smtp))
        .collect();
    let agent = Agent::start(AgentOptions {
        name: "monitors",
        cgroup: &cgroup,
        services: vec![format!("SMTP={}", server.ports[0])],
        extra_args: monitor_args(&state_dir),
    });
    agent.expect_count("127.0.0.32", "SMTP", 2);
    windowed(&agent, "127.0.0.32", "connections", 0);

    let during: Vec<_> = (0..3)
        .map(|_| connect_from("127.0.0.31".parse().unwrap(), smtp))
        .collect();
    windowed(&agent, "127.0.0.31", "connections", 3);
    // Closing does not undo a connection that happened.
    drop(during);
    agent.expect_count("127.0.0.31", "SMTP", 0);
    windowed(&agent, "127.0.0.31", "connections", 3);
    agent.expect(
        "@127.0.0.99 msys.audit.connections(\"300,1\", {cidr=\"/24\", endv=1})",
        "OK 3",
    );

    assert_eq!(agent.query("add receptions 127.0.0.31 4"), "OK 4");
    assert_eq!(agent.query("add rejections 127.0.0.31"), "OK 1");
    windowed(&agent, "127.0.0.31", "receptions", 4);
    windowed(&agent, "127.0.0.31", "rejections", 1);
    agent.expect(
        "ec_ip_receptions {monitor=\"60,2\", period_start=0, period_end=2, mask=8}",
        "ERR no_client no client address: prefix the request with @IP",
    );
    agent.expect(
        "@127.0.0.31 ec_ip_receptions {monitor=\"60,2\", period_start=0, period_end=2, mask=8}",
        "OK 4",
    );
    assert!(agent
        .query("@127.0.0.31 msys.audit.connections(\"60,9\")")
        .starts_with("ERR unknown_monitor "));

    // `inbound-audit show` prints Momentum's layout.
    let output = Command::new(agent_binary())
        .args(["show", "--socket"])
        .arg(&agent.socket)
        .arg("127.0.0.0/24")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let sum = |prefix: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.split(": ").nth(1).unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(sum("Connections 60/"), 3, "{text}");
    assert_eq!(sum("Receptions 60/"), 4, "{text}");
    assert_eq!(sum("Rejections 300/"), 1, "{text}");
    assert!(text.contains("Sessions SMTP: 2"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("Connections 60/"))
            .count(),
        3
    );
    drop(before);
}

#[test]
fn window_state_survives_a_restart_and_a_corrupt_file_is_set_aside() {
    require_ebpf!();
    let state_dir = TempDir::new("monitors-restart-state");
    let mut fixture = start("monitors-restart", &state_dir);
    let smtp = fixture.smtp;
    let agent = &mut fixture.agent;
    let conns: Vec<_> = (0..2)
        .map(|_| connect_from("127.0.0.33".parse().unwrap(), smtp))
        .collect();
    windowed(agent, "127.0.0.33", "connections", 2);
    assert_eq!(agent.query("add receptions 127.0.0.33 5"), "OK 5");

    agent.restart();
    windowed(agent, "127.0.0.33", "connections", 2);
    windowed(agent, "127.0.0.33", "receptions", 5);
    assert!(
        agent.log_text().contains("monitor state restored"),
        "{}",
        agent.log_text()
    );

    agent.stop();
    let state_file = state_dir.path().join("monitors.state");
    let mut bytes = std::fs::read(&state_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&state_file, &bytes).unwrap();
    agent.restart();
    // Refused whole, never half-loaded; the file is kept aside for a human.
    windowed(agent, "127.0.0.33", "receptions", 0);
    windowed(agent, "127.0.0.33", "connections", 0);
    assert!(
        agent.log_text().contains("is corrupt"),
        "{}",
        agent.log_text()
    );
    let aside: Vec<_> = std::fs::read_dir(state_dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("rejected"))
        .collect();
    assert_eq!(aside.len(), 1);
    // Live sessions never depended on that file.
    agent.expect_count("127.0.0.33", "SMTP", 2);
    drop(conns);
}

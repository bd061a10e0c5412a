//! End to end, as root: a real Postfix (a private instance, as in postfix.rs)
//! behind a `[[kernel_limits]]` limit, in a network namespace the test makes,
//! with the agent started inside it. Clients over the limit get ECONNREFUSED
//! at the SYN and never appear in Postfix's log; the admitted ones get their
//! SMTP sessions (banner, EHLO); the agent's counts, the kernel's sockets
//! (sock_diag, inside the namespace) and Postfix's log agree.
//!
//! Needs root, eBPF and `/usr/sbin/postfix`; says `SKIPPED` without them.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use integration_tests::{
    eventually,
    netns::NetNs,
    postfix::{self, Postfix, Smtp},
    require_ebpf, sock_diag_count, Agent, AgentOptions, TempDir, TestCgroup,
};

/// Inside the test's own namespace nothing else listens: any port will do.
const PORT: u16 = 2525;

/// Postfix's readiness probes come from an exempt network.
const PROBE_SOURCE: &str = "127.0.9.9";

const LIMITS: &str = r#"
monitors = ["60,1"]

[[kernel_limits]]
ipv4_prefix = 24
max = 3
exempt = ["127.0.9.0/24"]
"#;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A session from `source`: banner and EHLO must both pass.
fn session(ns: &NetNs, source: &str, server: SocketAddr) -> Smtp {
    ns.run(|| {
        let mut smtp = Smtp::open(source, server);
        let ehlo = smtp.command("EHLO client.example");
        assert!(ehlo.starts_with("250 "), "EHLO from {source}: {ehlo}");
        smtp
    })
}

/// A connect from `source` must be refused at once (a RST at the SYN, not a
/// banner, not a timeout).
fn assert_refused(ns: &NetNs, source: &str, server: SocketAddr) {
    let started = Instant::now();
    let result = ns.run(|| Smtp::try_open(ip(source), server).map(|_| ()));
    let took = started.elapsed();
    match result {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("{source} -> {server}: {e}, expected ECONNREFUSED"),
        Ok(()) => panic!("{source} -> {server} got a session, expected ECONNREFUSED"),
    }
    assert!(took < Duration::from_millis(500), "refusal took {took:?}");
}

/// How many sessions Postfix's smtpd logged from `client` ("connect from
/// unknown[IP]": smtpd_peername_lookup is off).
fn logged_sessions(postfix: &Postfix, client: &str) -> usize {
    postfix
        .maillog()
        .matches(&format!("]: connect from unknown[{client}]"))
        .count()
}

/// The agent's live count for `cidr` and the kernel's sockets on Postfix's
/// port in its cgroup (sock_diag, asked from inside the namespace) agree, at
/// `expected`.
fn expect_counts_match(ns: &NetNs, agent: &Agent, cgroup: &TestCgroup, cidr: &str, expected: u64) {
    let net: ipnet::IpNet = cidr.parse().unwrap();
    agent.expect_count(cidr, "SMTP", expected);
    let kernel = ns.run(|| sock_diag_count(&[PORT], cgroup, &net));
    assert_eq!(kernel, expected, "sock_diag count of {cidr}");
}

#[test]
fn postfix_never_sees_the_sessions_the_kernel_refuses() {
    if let Some(why) = postfix::unavailable() {
        eprintln!("SKIPPED (no Postfix): {why}");
        return;
    }
    require_ebpf!();
    let ns = NetNs::new("pfkl");
    let cgroup = TestCgroup::new("postfix-kernel-limit");
    let dir = TempDir::new("postfix-kernel-limit-mta");
    let server = SocketAddr::new(ip("127.0.0.1"), PORT);
    let mut postfix = Postfix::configure(dir.path(), server, cgroup.path(), Some(&ns), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let config = dir.path().join("inbound-audit.toml");
    std::fs::write(&config, LIMITS).unwrap();
    let mut agent = Agent::start_in_netns(
        AgentOptions {
            name: "postfix-kernel-limit",
            cgroup: &cgroup,
            services: vec![format!("SMTP={PORT}")],
            extra_args: vec![
                "--config".into(),
                config.display().to_string(),
                "--state-dir".into(),
                dir.path().join("agent-state").display().to_string(),
            ],
        },
        ns.name(),
    );
    assert!(
        agent.log_text().contains("sk_lookup attached"),
        "{}",
        agent.log_text()
    );
    postfix
        .start(|p| ns.run(|| p.answers(ip(PROBE_SOURCE))))
        .unwrap_or_else(|e| panic!("{e}"));

    // Three sessions fill 127.0.1.0/24.
    let mut admitted: Vec<Smtp> = ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
        .iter()
        .map(|source| session(&ns, source, server))
        .collect();
    expect_counts_match(&ns, &agent, &cgroup, "127.0.1.0/24", 3);

    // Five more from that /24 are refused at the SYN.
    let refused = [
        "127.0.1.4",
        "127.0.1.5",
        "127.0.1.6",
        "127.0.1.7",
        "127.0.1.1",
    ];
    for source in refused {
        assert_refused(&ns, source, server);
    }
    // Another /24 still gets its session.
    admitted.push(session(&ns, "127.0.2.1", server));
    expect_counts_match(&ns, &agent, &cgroup, "127.0.1.0/24", 3);
    expect_counts_match(&ns, &agent, &cgroup, "127.0.0.0/8", 4);

    // Postfix logged the admitted sessions and nothing of the refused ones
    // (postlogd writes asynchronously: the admitted ones are waited for).
    eventually("Postfix logged the four admitted sessions", || {
        ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.2.1"]
            .iter()
            .all(|client| logged_sessions(&postfix, client) == 1)
    });
    for source in &refused[..4] {
        assert!(
            !postfix.maillog().contains(&format!("[{source}]")),
            "Postfix saw the refused {source}:\n{}",
            postfix.maillog()
        );
    }
    assert_eq!(
        logged_sessions(&postfix, "127.0.1.1"),
        1,
        "the refused second session from 127.0.1.1"
    );

    // Every refusal counted, per IP and per /24.
    agent.expect(
        "msys.audit.refusals(\"60,1\", {cidr=\"127.0.1.0/24\", endv=1})",
        "OK 5",
    );
    agent.expect("@127.0.1.4 msys.audit.refusals(\"60,1\", {endv=1})", "OK 1");
    eventually("stats count five refusals", || {
        agent.stat("kernel_limit_refusals") == 5
    });

    // One session ends: the next from the /24 gets a session, and the one after is refused.
    admitted.remove(0).quit();
    expect_counts_match(&ns, &agent, &cgroup, "127.0.1.0/24", 2);
    admitted.push(session(&ns, "127.0.1.9", server));
    expect_counts_match(&ns, &agent, &cgroup, "127.0.1.0/24", 3);
    assert_refused(&ns, "127.0.1.10", server);
    eventually("Postfix logged 127.0.1.9", || {
        logged_sessions(&postfix, "127.0.1.9") == 1
    });
    assert!(
        !postfix.maillog().contains("[127.0.1.10]"),
        "{}",
        postfix.maillog()
    );
    // The agent reads the kernel's refusal counts on its own schedule.
    eventually("stats count the sixth refusal", || {
        agent.stat("kernel_limit_refusals") == 6
    });

    for smtp in admitted {
        smtp.quit();
    }
    expect_counts_match(&ns, &agent, &cgroup, "127.0.0.0/8", 0);
    assert!(postfix.stop(), "postfix stop did not stop Postfix");
    agent.stop();
}

//! End to end, as root: several real agents on one host, each with its own
//! cgroup, pin directory, socket and test server (an MX host each), sharing a
//! private redis-server. Cluster answers are checked against the kernel's
//! truth (sock_diag, summed over the nodes) through a dead node, a restarted
//! node, Redis restarted empty and Redis stopped.

use std::{
    net::{IpAddr, TcpStream},
    time::{Duration, Instant},
};

use integration_tests::{
    eventually_within, fleet_truth, redis::Redis, require_ebpf, SmtpFixture, TempDir,
};

/// A node silent this long no longer counts (short, for the test).
const TTL_SECS: u64 = 2;

fn node(name: &str, redis: &Redis, dir: &TempDir) -> SmtpFixture {
    let config = dir.path().join(format!("{name}.toml"));
    let policy = dir.path().join(format!("{name}-policy.sock"));
    // A fleet-wide session limit on the policy socket: more than 3 sessions
    // from a /24 over all nodes.
    std::fs::write(
        &config,
        format!(
            "policy_socket = \"{}\"\n\
             [[policy_limits]]\ncount = \"sessions\"\nscope = \"cluster\"\nipv4_prefix = 24\nmax = 3\naction = \"450 4.7.1\"\n\
             [cluster]\nredis = \"{}\"\nnode = \"{name}\"\nkey_prefix = \"e2e\"\nnode_ttl_secs = {TTL_SECS}\n",
            policy.display(),
            redis.url()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        &format!("cluster-{name}"),
        &["--config", &config, "--monitor", "60,1"],
    )
}

fn connect(node: &SmtpFixture, from: &str) -> TcpStream {
    integration_tests::connect_from(from.parse::<IpAddr>().unwrap(), node.smtp)
}

fn cluster_sessions(node: &SmtpFixture, cidr: &str) -> String {
    node.agent.query(&format!(
        "msys.audit.inbound_session_count(\"{cidr}\", \"inbound_cidr\")"
    ))
}

/// One Postfix policy request for `client` on the node's policy socket.
fn policy(dir: &TempDir, name: &str, client: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(dir.path().join(format!("{name}-policy.sock")))
            .expect("policy socket");
    write!(
        stream,
        "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nserver_port=25\ninstance=1.{client}\n\n"
    )
    .unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    answer.trim_end().to_string()
}

fn report(node: &SmtpFixture, request: &str) -> Vec<String> {
    inbound_audit::serving::client::query_report(&node.agent.socket, request)
        .expect("agent reachable")
        .unwrap_or_else(|e| panic!("{request}: {e}"))
}

#[test]
fn fleet_counts_are_the_sum_of_the_nodes_through_deaths_restarts_and_a_lost_redis() {
    require_ebpf!();
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let dir = TempDir::new("cluster-e2e");
    let mut a = node("mxa", &redis, &dir);
    let b = node("mxb", &redis, &dir);

    let mut held_a: Vec<TcpStream> = ["127.0.5.1", "127.0.5.2", "127.0.5.3"]
        .iter()
        .map(|ip| connect(&a, ip))
        .collect();
    let mut held_b: Vec<TcpStream> = ["127.0.5.10", "127.0.6.1"]
        .iter()
        .map(|ip| connect(&b, ip))
        .collect();

    // Exact: every node's cluster answer is the sum of the nodes' local ones,
    // which is the kernel's truth.
    let exact =
        |n: &SmtpFixture, cidr: &str, want: u64| cluster_sessions(n, cidr) == format!("OK {want}");
    eventually_within("cluster sums", Duration::from_secs(5), || {
        exact(&a, "127.0.5.0/24", 4)
            && exact(&b, "127.0.5.0/24", 4)
            && exact(&a, "127.0.0.0/8", 5)
            && exact(&b, "127.0.0.0/8", 5)
    });
    assert_eq!(fleet_truth(&[&a, &b], "127.0.0.0/8"), 5);
    a.agent.expect_count("127.0.0.0/8", "SMTP", 3);
    b.agent.expect_count("127.0.0.0/8", "SMTP", 2);
    // The relative and Sieve forms, and the windowed cluster sums.
    a.agent.expect(
        "@127.0.5.1 ac:inbound_session_count(\"/24\", \"inbound_cidr\")",
        "OK 4",
    );
    a.agent
        .expect("@127.0.5.1 audit_service \"inbound_cidr\" \"/8\"", "OK 5");
    eventually_within("windowed cluster sums", Duration::from_secs(5), || {
        a.agent.query("msys.audit.connections(\"60,1\", {cidr=\"127.0.0.0/8\", endv=1, cluster=true})")
            == "OK 5"
            && b.agent.query("@127.0.5.1 ec_ip_connections_cluster {monitor=\"60,1\", period_start=0, period_end=1, mask=8}")
                == "OK 5"
    });
    assert_eq!(
        a.agent
            .query("msys.audit.connections(\"60,1\", {cidr=\"127.0.0.0/8\", endv=1})"),
        "OK 3"
    );
    // Sieve form 1, the sliding estimate: the fleet's equals the sum of the
    // nodes' own (each rounded, so within one).
    let count = |answer: String| {
        answer
            .strip_prefix("OK ")
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(-100)
    };
    let fleet = count(a.agent.query("@127.0.5.1 ec_ip_connections_cluster 0 8"));
    let own = count(a.agent.query("@127.0.5.1 ec_ip_connections 0 8"))
        + count(b.agent.query("@127.0.5.1 ec_ip_connections 0 8"));
    assert!(
        (fleet - own).abs() <= 1 && fleet > 0,
        "cluster sliding {fleet}, nodes' own {own}"
    );
    let show = report(&a, "show 127.0.0.0/8 cluster");
    assert!(show.iter().any(|l| l == "Sessions SMTP: 5"), "{show:?}");
    assert!(
        show.iter()
            .any(|l| l.starts_with("Node mxa (this node): Sessions SMTP 3")),
        "{show:?}"
    );
    assert!(
        show.iter()
            .any(|l| l.starts_with("Node mxb: Sessions SMTP 2")),
        "{show:?}"
    );
    let node_b = report(&a, "show 127.0.0.0/8 node mxb");
    assert!(node_b.iter().any(|l| l == "Sessions SMTP: 2"), "{node_b:?}");
    assert_eq!(a.agent.stat("cluster_nodes_live"), 2);
    // The fleet-wide policy limit: 4 sessions from 127.0.5.0/24 over the two
    // nodes (3 on mxa, 1 on mxb) is over 3, though mxb alone has 1.
    let answer = policy(&dir, "mxb", "127.0.5.77");
    assert!(
        answer.starts_with(
            "action=450 4.7.1 Too many SMTP sessions over the cluster from 127.0.5.0/24: 4"
        ),
        "{answer}"
    );
    assert_eq!(policy(&dir, "mxb", "127.0.6.77"), "action=dunno");

    // Fresh: a close on one node shows on the other well within a second.
    drop(held_b.pop());
    let lag = eventually_within(
        "a close seen by the other node",
        Duration::from_secs(1),
        || exact(&a, "127.0.0.0/8", 4),
    );
    eprintln!("close on mxb seen by mxa after {lag:?}");

    // A dead node stops counting within node_ttl.
    a.agent.kill();
    let gone = eventually_within(
        "the dead node dropped",
        Duration::from_secs(TTL_SECS + 3),
        || exact(&b, "127.0.0.0/8", 1),
    );
    eprintln!("dead node dropped after {gone:?}");

    // Restarted, it replaces its own share and is never counted twice.
    a.agent.start_again();
    let mut highest = 0;
    eventually_within(
        "the restarted node counted once",
        Duration::from_secs(5),
        || {
            let answer = cluster_sessions(&b, "127.0.0.0/8");
            if let Some(n) = answer
                .strip_prefix("OK ")
                .and_then(|n| n.parse::<u64>().ok())
            {
                highest = highest.max(n);
            }
            answer == "OK 4"
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        exact(&b, "127.0.0.0/8", 4) && highest <= 4,
        "highest {highest}"
    );

    // Redis killed and restarted empty, a session closing meanwhile: back
    // to exact.
    redis.kill();
    drop(held_a.pop());
    std::thread::sleep(Duration::from_millis(300));
    redis.spawn();
    let converged = eventually_within("Redis restarted empty", Duration::from_secs(5), || {
        exact(&a, "127.0.0.0/8", 3) && exact(&b, "127.0.0.0/8", 3)
    });
    eprintln!("converged {converged:?} after Redis restarted empty");

    // Redis stopped: local answers at their usual speed, cluster answers
    // from the last view while it is fresh, then cluster_unavailable.
    redis.signal("-STOP");
    let started = Instant::now();
    a.agent.expect_count("127.0.0.0/8", "SMTP", 2);
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    eventually_within(
        "cluster answers refused",
        Duration::from_secs(TTL_SECS + 3),
        || cluster_sessions(&a, "127.0.0.0/8").starts_with("ERR cluster_unavailable"),
    );
    a.agent.expect_count("127.0.0.0/8", "SMTP", 2);
    redis.signal("-CONT");
    eventually_within("Redis back", Duration::from_secs(5), || {
        exact(&a, "127.0.0.0/8", 3)
    });
    assert_eq!(fleet_truth(&[&a, &b], "127.0.0.0/8"), 3);
}

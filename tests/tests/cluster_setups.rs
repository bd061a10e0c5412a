//! End to end, as root: real agents (each its own cgroup, pin directory,
//! socket and test server) on Redis set up the ways the README documents:
//! behind Sentinel through a failover, over TLS as the README's
//! least-privilege ACL user, and with another client writing hostile data
//! under the prefix. Every cluster answer is checked against the sum of the
//! nodes' local answers, which are checked against the kernel's truth
//! (sock_diag).

use std::{
    net::{IpAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    eventually_within, fleet_truth,
    http::{self, sample},
    redis::{free_port, Redis, Sentinel},
    require_ebpf, SmtpFixture, TempDir,
};

/// The README's Redis ACL line, verbatim but for its password placeholder.
fn readme_acl(password: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split_once("**Least privilege.**")
        .expect("the README's least-privilege paragraph")
        .1;
    let line = section
        .lines()
        .find(|l| l.starts_with("ACL SETUSER "))
        .expect("the README's ACL line");
    assert!(line.contains(" >PASSWORD "), "{line}");
    line.split_whitespace()
        .map(|word| {
            if word == ">PASSWORD" {
                format!(">{password}")
            } else {
                word.to_string()
            }
        })
        .collect()
}

/// The tests that make certificates skip, saying why, without openssl.
macro_rules! require_openssl {
    () => {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: openssl is not installed");
            return;
        }
    };
}

/// The user the README's ACL line makes.
const ACL_USER: &str = "inbound-audit";

/// An agent in the fleet: `cluster` holds the `[cluster]` keys besides the
/// node name, `top` top-level keys.
fn node(name: &str, dir: &TempDir, top: &str, cluster: &str) -> SmtpFixture {
    let config = dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("{top}\n[cluster]\nnode = \"{name}\"\n{cluster}\n"),
    )
    .unwrap();
    let config = config.display().to_string();
    SmtpFixture::start(
        env!("CARGO_BIN_EXE_test-server"),
        &format!("setups-{name}"),
        &["--config", &config],
    )
}

fn connect(node: &SmtpFixture, from: &str) -> TcpStream {
    integration_tests::connect_from(from.parse::<IpAddr>().unwrap(), node.smtp)
}

/// `node` turned away by Redis: a session from `from` still counts locally
/// in `net`, the refusal is logged (with every one of `logged`), and its
/// cluster answers are refused. The session, to hold.
fn assert_turned_away(node: &SmtpFixture, from: &str, net: &str, logged: &[&str]) -> TcpStream {
    let held = connect(node, from);
    node.agent.expect_count(net, "SMTP", 1);
    eventually_within("the refusal logged", Duration::from_secs(10), || {
        node.agent.log_text().contains("cluster: Redis at")
    });
    let log = node.agent.log_text();
    for text in logged {
        assert!(log.contains(text), "{text:?} not in:\n{log}");
    }
    assert!(cluster(node, net).starts_with("ERR cluster_unavailable"));
    held
}

fn count(answer: &str) -> Option<u64> {
    answer.strip_prefix("OK ")?.parse().ok()
}

fn local(node: &SmtpFixture, cidr: &str) -> Option<u64> {
    count(&node.agent.query(&format!(
        "msys.audit.inbound_session_count(\"{cidr}\", \"SMTP\")"
    )))
}

fn cluster(node: &SmtpFixture, cidr: &str) -> String {
    node.agent.query(&format!(
        "msys.audit.inbound_session_count(\"{cidr}\", \"inbound_cidr\")"
    ))
}

/// Exact: the nodes' local answers sum to `want`, and every node's cluster
/// answer is that sum.
fn exact(nodes: &[&SmtpFixture], cidr: &str, want: u64) -> bool {
    nodes
        .iter()
        .map(|n| local(n, cidr).unwrap_or(u64::MAX))
        .sum::<u64>()
        == want
        && nodes.iter().all(|n| count(&cluster(n, cidr)) == Some(want))
}

fn stats(node: &SmtpFixture) -> Vec<String> {
    inbound_audit::serving::client::query_report(&node.agent.socket, "stats")
        .expect("agent reachable")
        .expect("stats report")
}

/// The Prometheus exposition from the agent's `metrics_listen` port.
fn metrics(port: u16) -> String {
    http::get(port, "/metrics").2
}

fn write_secret(path: &Path, secret: &str) {
    std::fs::write(path, format!("{secret}\n")).unwrap();
}

/// A primary, its replica and a sentinel; the agents reach Redis only
/// through the sentinel, as the README's ACL user. The primary is
/// SIGKILLed while sessions open and close; the sentinel promotes the
/// replica, and every agent's cluster answer is the exact sum again.
#[test]
fn agents_follow_a_sentinel_failover_back_to_exact_sums() {
    require_ebpf!();
    let Some(mut primary) = Redis::start() else {
        return;
    };
    let Some(replica) = Redis::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()])
    else {
        return;
    };
    // ACLs are not replicated: each server gets the line.
    let password = format!("sentinel-pw-{}-Qx7", std::process::id());
    let acl = readme_acl(&password);
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    assert_eq!(primary.cli(&acl).trim(), "OK");
    assert_eq!(replica.cli(&acl).trim(), "OK");
    eventually_within("the replica in sync", Duration::from_secs(10), || {
        replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    });
    // A sentinel finds replicas through the primary's INFO: started after
    // the replica is attached, it knows it at once.
    let Some(sentinel) = Sentinel::start(&primary, "ia", 1000) else {
        return;
    };
    eventually_within(
        "the sentinel knows the replica",
        Duration::from_secs(15),
        || sentinel.healthy_replicas() == 1,
    );
    let dir = TempDir::new("setups-sentinel");
    let pass = dir.path().join("redis.pass");
    write_secret(&pass, &password);
    let table = format!(
        "redis = \"redis+sentinel://{ACL_USER}@127.0.0.1:{}/ia\"\npassword_file = \"{}\"\nnode_ttl_secs = 5",
        sentinel.port,
        pass.display()
    );
    let a = node("sa", &dir, "", &table);
    let b = node("sb", &dir, "", &table);

    let mut held_a: Vec<TcpStream> = ["127.0.7.1", "127.0.7.2", "127.0.7.3"]
        .iter()
        .map(|ip| connect(&a, ip))
        .collect();
    let mut held_b: Vec<TcpStream> = ["127.0.7.9", "127.0.8.1"]
        .iter()
        .map(|ip| connect(&b, ip))
        .collect();
    eventually_within("sums through the sentinel", Duration::from_secs(10), || {
        exact(&[&a, &b], "127.0.7.0/24", 4) && exact(&[&a, &b], "127.0.0.0/8", 5)
    });

    primary.kill();
    let killed = Instant::now();
    // Sessions come and go while there is no primary; nothing is lost
    // locally: local answers are the kernel's at once.
    drop(held_a.pop());
    held_b.push(connect(&b, "127.0.7.10"));
    held_b.push(connect(&b, "127.0.7.11"));
    a.agent.expect_count("127.0.0.0/8", "SMTP", 2);
    b.agent.expect_count("127.0.0.0/8", "SMTP", 4);
    eventually_within(
        "exact again after the failover",
        Duration::from_secs(20),
        || exact(&[&a, &b], "127.0.7.0/24", 5) && exact(&[&a, &b], "127.0.0.0/8", 6),
    );
    eprintln!(
        "exact again {:?} after the primary was killed",
        killed.elapsed()
    );
    assert_eq!(sentinel.primary_port(), Some(replica.port));
    assert!(
        replica.cli(&["ROLE"]).starts_with("master"),
        "{}",
        replica.cli(&["ROLE"])
    );
    assert_eq!(fleet_truth(&[&a, &b], "127.0.0.0/8"), 6);
    // And it stays exact, both nodes counted once.
    std::thread::sleep(Duration::from_millis(300));
    assert!(exact(&[&a, &b], "127.0.0.0/8", 6));
    assert_eq!(a.agent.stat("cluster_nodes_live"), 2);
    // The README's ACL is all the agents needed from the new primary.
    assert_eq!(replica.cli(&["ACL", "LOG"]).trim(), "", "commands refused");
    drop((held_a, held_b));
}

/// `rediss://` to a redis-server that speaks only TLS, with a certificate
/// the test made, verified against `ca_file`; the agents log in as the
/// README's ACL user with `password_file`. Answers are exact, the ACL
/// refused nothing, and the password shows in no log, `stats` or metrics,
/// not even those of an agent whose password is wrong.
#[test]
fn agents_as_the_readme_acl_user_over_tls_are_exact_and_never_show_the_password() {
    require_ebpf!();
    require_openssl!();
    let Some((redis, ca)) = Redis::start_tls() else {
        return;
    };
    let password = format!("tls-pw-{}-Zk4", std::process::id());
    let acl = readme_acl(&password);
    let acl: Vec<&str> = acl.iter().map(String::as_str).collect();
    assert_eq!(redis.cli(&acl).trim(), "OK");
    let dir = TempDir::new("setups-tls");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let pass = dir.path().join("redis.pass");
    write_secret(&pass, &password);
    let table = |pass: &Path| {
        format!(
            "redis = \"rediss://{ACL_USER}@127.0.0.1:{}/0\"\npassword_file = \"{}\"\nca_file = \"{}\"\nnode_ttl_secs = 3",
            redis.port,
            pass.display(),
            ca_file.display()
        )
    };
    let metrics_port = free_port();
    let a = node(
        "ta",
        &dir,
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
        &table(&pass),
    );
    let b = node("tb", &dir, "", &table(&pass));

    let _held: Vec<TcpStream> = [
        connect(&a, "127.0.9.1"),
        connect(&a, "127.0.9.2"),
        connect(&b, "127.0.9.3"),
        connect(&b, "127.1.0.1"),
    ]
    .into();
    eventually_within(
        "sums over TLS as the ACL user",
        Duration::from_secs(10),
        || exact(&[&a, &b], "127.0.9.0/24", 3) && exact(&[&a, &b], "127.0.0.0/8", 4),
    );
    assert_eq!(fleet_truth(&[&a, &b], "127.0.0.0/8"), 4);
    // Both agents are connected as that user, and it was refused nothing.
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(
        clients
            .lines()
            .filter(|l| l.contains(&format!(" user={ACL_USER} ")))
            .count()
            >= 2,
        "{clients}"
    );
    assert_eq!(redis.cli(&["ACL", "LOG"]).trim(), "", "commands refused");
    for n in [&a, &b] {
        assert_eq!(n.agent.stat("cluster_publish_errors"), 0);
        assert_eq!(n.agent.stat("cluster_follow_errors"), 0);
    }

    // An agent with the wrong password: refused by Redis, says so, counts
    // locally, and shows that password nowhere either.
    let wrong = format!("wrong-pw-{}-Jm2", std::process::id());
    let wrong_pass = dir.path().join("wrong.pass");
    write_secret(&wrong_pass, &wrong);
    let c = node("tc", &dir, "", &table(&wrong_pass));
    let _held_c = assert_turned_away(&c, "127.0.9.4", "127.0.9.0/24", &[]);
    // The others never see it, and stay exact.
    assert!(exact(&[&a, &b], "127.0.9.0/24", 3));

    let body = metrics(metrics_port);
    assert!(
        sample(&body, "inbound_audit_cluster_nodes_live") == Some(2.0),
        "{body}"
    );
    for (what, text) in [
        ("ta's log", a.agent.log_text()),
        ("tb's log", b.agent.log_text()),
        ("tc's log", c.agent.log_text()),
        ("ta's stats", stats(&a).join("\n")),
        ("tc's stats", stats(&c).join("\n")),
        ("ta's metrics", body),
    ] {
        assert!(
            !text.contains(&password) && !text.contains(&wrong),
            "a password in {what}:\n{text}"
        );
        assert!(!text.is_empty(), "{what} is empty");
    }
}

/// `rediss+sentinel://`: a primary and a sentinel that both speak only TLS
/// and let in only clients with a certificate signed by the test's CA.
/// Agents verifying them against `ca_file` and showing that certificate
/// find the primary through the sentinel and sum exactly; an agent trusting
/// only the system's roots refuses the sentinel's certificate, one without a
/// client certificate is turned away; both say so and count locally.
#[test]
fn agents_find_the_primary_through_sentinels_over_tls() {
    require_ebpf!();
    require_openssl!();
    let Some((primary, files)) = Redis::start_mtls() else {
        return;
    };
    let Some(sentinel) = Sentinel::start(&primary, "ia-tls", 1000) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sentinel.primary_port() != Some(primary.port) {
        assert!(
            Instant::now() < deadline,
            "the TLS sentinel never named the primary"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = TempDir::new("setups-stls");
    let url = format!("rediss+sentinel://127.0.0.1:{}/ia-tls", sentinel.port);
    let identity = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n",
        files.client_cert.display(),
        files.client_key.display()
    );
    let ca = format!("ca_file = \"{}\"\n", files.ca.display());
    let table = |tls: &str| format!("redis = \"{url}\"\n{tls}node_ttl_secs = 3");
    let a = node("sa", &dir, "", &table(&(ca.clone() + &identity)));
    let b = node("sb", &dir, "", &table(&(ca.clone() + &identity)));
    let _held: Vec<TcpStream> = [
        connect(&a, "127.0.7.1"),
        connect(&b, "127.0.7.2"),
        connect(&b, "127.0.7.3"),
    ]
    .into();
    eventually_within(
        "sums through a sentinel over TLS",
        Duration::from_secs(10),
        || exact(&[&a, &b], "127.0.7.0/24", 3),
    );
    assert_eq!(fleet_truth(&[&a, &b], "127.0.7.0/24"), 3);
    // Their counts are in the primary the sentinel named.
    let keys = primary.cli(&["KEYS", "inbound-audit:node:sa:*"]);
    assert!(keys.contains("inbound-audit:node:sa:hb"), "{keys}");

    // The test's CA unknown (no ca_file), or no client certificate: turned
    // away at the handshake, said, counted locally; the others stay exact.
    for (name, tls, why, from) in [
        (
            "sc",
            identity.clone(),
            "invalid peer certificate: UnknownIssuer",
            "127.0.7.4",
        ),
        ("sd", ca.clone(), "CertificateRequired", "127.0.7.5"),
    ] {
        let n = node(name, &dir, "", &table(&tls));
        let logged = ["cluster: Redis at rediss+sentinel://", why];
        let _held_n = assert_turned_away(&n, from, "127.0.7.0/24", &logged);
    }
    assert!(exact(&[&a, &b], "127.0.7.0/24", 3));
}

/// A Redis that lets in only clients with a certificate signed by its CA
/// (`tls-auth-clients yes`): agents showing the one the test made
/// (`cert_file`, `key_file`) sum exactly; one without a certificate is
/// turned away by Redis, says so, and counts locally; a key file that holds
/// no private key refuses the start, naming `cluster.key_file`.
#[test]
fn agents_with_a_client_certificate_reach_a_redis_that_verifies_clients() {
    require_ebpf!();
    require_openssl!();
    let Some((redis, files)) = Redis::start_mtls() else {
        return;
    };
    assert_eq!(redis.cli(&["PING"]).trim(), "PONG");
    let dir = TempDir::new("setups-mtls");
    let table = |identity: &str| {
        format!(
            "redis = \"rediss://127.0.0.1:{}/0\"\nca_file = \"{}\"\n{identity}node_ttl_secs = 3",
            redis.port,
            files.ca.display()
        )
    };
    let identity = |key: &Path| {
        format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            files.client_cert.display(),
            key.display()
        )
    };
    let a = node("ma", &dir, "", &table(&identity(&files.client_key)));
    let b = node("mb", &dir, "", &table(&identity(&files.client_key)));
    let _held: Vec<TcpStream> = [
        connect(&a, "127.0.8.1"),
        connect(&a, "127.0.8.2"),
        connect(&b, "127.0.8.3"),
    ]
    .into();
    eventually_within(
        "sums through a Redis that verifies clients",
        Duration::from_secs(10),
        || exact(&[&a, &b], "127.0.8.0/24", 3),
    );
    assert_eq!(fleet_truth(&[&a, &b], "127.0.8.0/24"), 3);
    for n in [&a, &b] {
        assert_eq!(n.agent.stat("cluster_publish_errors"), 0);
        assert_eq!(n.agent.stat("cluster_follow_errors"), 0);
    }

    // No certificate: the TLS handshake fails, the agent says so and keeps
    // counting its own sessions; the others never see it.
    let c = node("mc", &dir, "", &table(""));
    let target = format!("cluster: Redis at rediss://127.0.0.1:{}", redis.port);
    let logged = [target.as_str(), "CertificateRequired"];
    let _held_c = assert_turned_away(&c, "127.0.8.4", "127.0.8.0/24", &logged);
    assert!(exact(&[&a, &b], "127.0.8.0/24", 3));

    // The certificate given as its own key: refused at start, named.
    let config = dir.path().join("md.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nnode = \"md\"\n{}\n",
            table(&identity(&files.client_cert))
        ),
    )
    .unwrap();
    let output = std::process::Command::new(integration_tests::agent_binary())
        .arg("agent")
        .arg("--config")
        .arg(&config)
        .args(["--service", "SMTP=2599", "--socket"])
        .arg(dir.path().join("md.sock"))
        .output()
        .expect("run the agent");
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cluster.key_file") && stderr.contains("holds no PEM private key"),
        "{stderr}"
    );
}

/// Another Redis client writes junk under the prefix while the agents run:
/// names, heartbeats, snapshots and stream entries that do not parse, a
/// forged entry in a real node's stream, keys of the wrong type (a node
/// whose snapshot is a list, a stream and the set of nodes replaced by
/// strings). The agents keep serving, their cluster answers are exact, and
/// `stats` and the metrics count what was refused.
#[test]
fn hostile_entries_under_the_prefix_are_refused_and_the_sums_stay_exact() {
    require_ebpf!();
    let Some(redis) = Redis::start() else {
        return;
    };
    let dir = TempDir::new("setups-hostile");
    let metrics_port = free_port();
    let table = format!(
        "redis = \"{}\"\nkey_prefix = \"hx\"\nnode_ttl_secs = 3",
        redis.url()
    );
    let a = node(
        "ha",
        &dir,
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
        &table,
    );
    let b = node("hb", &dir, "", &table);
    let mut held: Vec<TcpStream> = vec![
        connect(&a, "127.0.10.1"),
        connect(&a, "127.0.10.2"),
        connect(&b, "127.0.10.3"),
    ];
    eventually_within("sums", Duration::from_secs(10), || {
        exact(&[&a, &b], "127.0.10.0/24", 3)
    });
    assert_eq!(a.agent.stat("cluster_entries_refused"), 0);

    // Junk that does not parse, and a node whose data is all junk.
    redis.cli(&["SADD", "hx:nodes", "bad name", "../up", "ghost", "phantom"]);
    redis.cli(&["SET", "hx:node:ghost:hb", "not a heartbeat", "PX", "60000"]);
    redis.cli(&[
        "SET",
        "hx:node:phantom:hb",
        "v1 00000000000000aa 1 1",
        "PX",
        "60000",
    ]);
    redis.cli(&["RPUSH", "hx:node:phantom:snap", "s SMTP 127.0.10.50 9"]);
    redis.cli(&[
        "HSET",
        "hx:node:phantom:log",
        "data",
        "s SMTP 127.0.10.51 9",
    ]);
    redis.cli(&[
        "XADD",
        "hx:node:ha:log",
        "*",
        "epoch",
        "zz",
        "seq",
        "x",
        "data",
        "s SMTP 127.0.10.52 9",
    ]);
    // A well-formed entry in ha's own stream far past its sequence.
    let hb = redis.cli(&["GET", "hx:node:ha:hb"]);
    let fields: Vec<&str> = hb.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "{hb}");
    let forged_seq = (fields[2].parse::<u64>().unwrap() + 1000).to_string();
    redis.cli(&[
        "XADD",
        "hx:node:ha:log",
        "*",
        "epoch",
        fields[1],
        "seq",
        &forged_seq,
        "data",
        "s SMTP 127.0.10.53 9\n",
    ]);
    // Meanwhile sessions change, and the agents go on serving.
    held.push(connect(&a, "127.0.10.4"));
    eventually_within("exact through the junk", Duration::from_secs(10), || {
        exact(&[&a, &b], "127.0.10.0/24", 4)
            && a.agent.stat("cluster_entries_refused") > 0
            && b.agent.stat("cluster_entries_refused") > 0
    });

    // Keys of the wrong type where a real node's stream and the set of
    // nodes belong: refused, replaced by the agents, exact again.
    redis.cli(&["DEL", "hx:node:hb:log", "hx:nodes"]);
    redis.cli(&["SET", "hx:node:hb:log", "not a stream"]);
    redis.cli(&["SET", "hx:nodes", "not a set"]);
    drop(held.remove(0));
    held.push(connect(&b, "127.0.10.5"));
    let healed = eventually_within(
        "exact past keys of the wrong type",
        Duration::from_secs(10),
        || exact(&[&a, &b], "127.0.10.0/24", 4),
    );
    eprintln!("exact {healed:?} after keys of the wrong type");
    assert_eq!(redis.cli(&["TYPE", "hx:nodes"]).trim(), "set");
    // It stays exact, with the two real nodes alone live.
    for _ in 0..10 {
        assert!(exact(&[&a, &b], "127.0.10.0/24", 4));
        assert!(count(&cluster(&a, "127.0.10.50/31")) == Some(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fleet_truth(&[&a, &b], "127.0.10.0/24"), 4);
    assert_eq!(a.agent.stat("cluster_nodes_live"), 2);
    assert_eq!(b.agent.stat("cluster_nodes_live"), 2);
    let refused = a.agent.stat("cluster_entries_refused");
    let body = metrics(metrics_port);
    let exposed = sample(&body, "inbound_audit_cluster_entries_refused_total").unwrap_or(-1.0);
    assert!(
        exposed >= refused as f64,
        "metrics {exposed}, stats {refused}"
    );
    assert!(
        !stats(&b).is_empty() && count(&cluster(&b, "127.0.10.53/32")) == Some(0),
        "the forged entry counted"
    );
}

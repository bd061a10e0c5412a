//! The cluster rounds against a real redis-server: several nodes (each its own
//! round task, view and local counts) on one private Redis, checked for exact
//! sums, freshness, restarted and dead nodes, a Redis restarted empty or
//! stopped, and hostile data under the prefix. The agents' end-to-end use of
//! this (real kernel, real sessions) is tested in the tests crate.
//!
//! Skips, saying why, where `redis-server` is not installed.

use std::{
    collections::{HashMap, HashSet},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use integration_tests::redis::{free_port, Redis};

use inbound_audit::cluster::{
    self,
    wire::{Entry, EntryKey},
    ClusterStats, ClusterView, LocalShare, Settings, Target,
};

/// A node's own counts, as the agent's shared state would give them.
#[derive(Default)]
struct FakeLocal {
    counts: Mutex<(HashMap<EntryKey, u64>, HashSet<EntryKey>)>,
}

impl FakeLocal {
    fn set(&self, service: &str, ip: &str, count: u64) {
        let entry = Entry::sessions(service, ip.parse().unwrap(), count);
        let mut counts = self.counts.lock().unwrap();
        if count == 0 {
            counts.0.remove(&entry.key);
        } else {
            counts.0.insert(entry.key.clone(), count);
        }
        counts.1.insert(entry.key);
    }
}

impl LocalShare for FakeLocal {
    fn take_changes(&self) -> Vec<Entry> {
        let mut counts = self.counts.lock().unwrap();
        let dirty = std::mem::take(&mut counts.1);
        dirty
            .into_iter()
            .map(|key| Entry {
                count: counts.0.get(&key).copied().unwrap_or(0),
                key,
            })
            .collect()
    }

    fn snapshot(&self) -> Vec<Entry> {
        let counts = self.counts.lock().unwrap();
        counts
            .0
            .iter()
            .map(|(key, &count)| Entry {
                key: key.clone(),
                count,
            })
            .collect()
    }
}

/// One node: its round task, view and counts.
struct Node {
    view: Arc<ClusterView>,
    local: Arc<FakeLocal>,
    task: tokio::task::JoinHandle<()>,
}

const TTL: Duration = Duration::from_secs(2);

fn node(redis: &Redis, name: &str, prefix: &str, local: Arc<FakeLocal>) -> Node {
    node_at(&redis.url(), None, name, prefix, local)
}

fn node_at(
    url: &str,
    password: Option<&str>,
    name: &str,
    prefix: &str,
    local: Arc<FakeLocal>,
) -> Node {
    node_to(
        Target::parse(url, password).expect("url"),
        name,
        prefix,
        local,
    )
}

fn node_to(target: Target, name: &str, prefix: &str, local: Arc<FakeLocal>) -> Node {
    let mut settings = Settings::new(target, name, prefix, TTL);
    settings.snapshot_every = Duration::from_secs(2);
    let view = Arc::new(ClusterView::new(name, TTL));
    let task = tokio::spawn(cluster::run(settings, view.clone(), local.clone()));
    Node { view, local, task }
}

fn net(text: &str) -> ipnet::IpNet {
    text.parse().unwrap()
}

/// The other nodes' sessions from `cidr`, as `node` sees them.
fn fleet_sessions(node: &Node, cidr: &str) -> Option<u64> {
    node.view
        .fleet()
        .ok()
        .map(|fleet| fleet.sessions("SMTP", &net(cidr)))
}

async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sum_exactly_and_survive_restarts_deaths_and_a_lost_redis() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let a = node(&redis, "mx1", "t1", Arc::new(FakeLocal::default()));
    let b = node(&redis, "mx2", "t1", Arc::new(FakeLocal::default()));
    let c = node(&redis, "mx3", "t1", Arc::new(FakeLocal::default()));

    // Exact: each node sees the sum of the others.
    a.local.set("SMTP", "192.0.2.1", 3);
    a.local.set("SMTP", "192.0.2.2", 1);
    b.local.set("SMTP", "192.0.2.9", 2);
    c.local.set("SMTP", "198.51.100.1", 5);
    c.local.set("Control", "192.0.2.1", 7);
    let exact = |n: &Node, cidr: &str, want: u64| fleet_sessions(n, cidr) == Some(want);
    eventually("sums", Duration::from_secs(3), || {
        exact(&a, "192.0.2.0/24", 2)
            && exact(&b, "192.0.2.0/24", 4)
            && exact(&c, "192.0.2.0/24", 6)
            && exact(&a, "0.0.0.0/0", 7)
            && exact(&c, "192.0.2.1/32", 3)
    })
    .await;
    assert_eq!(
        a.view
            .fleet()
            .unwrap()
            .node_sessions("mx3", "SMTP", &net("198.51.100.0/24")),
        5
    );

    // Fresh: a change on one node shows on another well within 1 s.
    let mut lags = Vec::new();
    for i in 0..10u64 {
        a.local.set("SMTP", "192.0.2.1", 10 + i);
        lags.push(
            eventually("fresh", Duration::from_secs(1), || {
                exact(&b, "192.0.2.1/32", 10 + i)
            })
            .await,
        );
    }
    lags.sort();
    eprintln!("replication lag: p50 {:?}, max {:?}", lags[5], lags[9]);
    a.local.set("SMTP", "192.0.2.1", 3);

    // A restarted node replaces its earlier share: never counted twice.
    c.task.abort();
    let c = node(&redis, "mx3", "t1", c.local.clone());
    eventually("restart", Duration::from_secs(3), || {
        exact(&a, "198.51.100.0/24", 5) && c.view.fleet().is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        exact(&a, "0.0.0.0/0", 7),
        "{:?}",
        fleet_sessions(&a, "0.0.0.0/0")
    );

    // A dead node stops counting within the TTL.
    c.task.abort();
    let gone = eventually("death", TTL + Duration::from_secs(2), || {
        exact(&a, "0.0.0.0/0", 2) && exact(&b, "198.51.100.0/24", 0)
    })
    .await;
    eprintln!("dead node dropped after {gone:?}");
    let c = node(&redis, "mx3", "t1", c.local.clone());

    // Redis restarted empty: the view converges back to exact.
    redis.kill();
    a.local.set("SMTP", "192.0.2.2", 4);
    redis.spawn();
    let converged = eventually("redis restarted empty", Duration::from_secs(5), || {
        exact(&b, "192.0.2.0/24", 7) && exact(&c, "192.0.2.0/24", 9) && exact(&a, "0.0.0.0/0", 7)
    })
    .await;
    eprintln!("converged {converged:?} after Redis restarted empty");

    // Redis stopped: the last view is served while younger than the TTL,
    // then cluster answers are refused; rounds resume when it comes back.
    redis.signal("-STOP");
    let stopped = Instant::now();
    assert!(b.view.fleet().is_ok());
    eventually("unavailable", TTL + Duration::from_secs(2), || {
        b.view.fleet().is_err()
    })
    .await;
    assert!(
        stopped.elapsed() >= TTL - Duration::from_millis(300),
        "{:?}",
        stopped.elapsed()
    );
    redis.signal("-CONT");
    eventually("back", Duration::from_secs(5), || {
        exact(&b, "192.0.2.0/24", 7)
    })
    .await;

    // Hostile data under the prefix is refused entry by entry, never applied.
    let refused_before = ClusterStats::get(&b.view.stats.refused);
    redis.cli(&["SADD", "t1:nodes", "bad name", "evil"]);
    redis.cli(&[
        "SET",
        "t1:node:evil:hb",
        "v1 00000000000000aa 1 1",
        "PX",
        "60000",
    ]);
    redis.cli(&[
        "SET",
        "t1:node:evil:snap",
        "v1 00000000000000aa 1\ns SMTP 192.0.2.77 1\ns SMTP 192.0.2.78 99999999999999\nw junk\n",
    ]);
    redis.cli(&[
        "XADD",
        "t1:node:evil:log",
        "*",
        "epoch",
        "zz",
        "seq",
        "2",
        "data",
        "x",
    ]);
    redis.cli(&["SET", "t1:node:mx1:hb", "garbage"]);
    eventually("hostile entries counted", Duration::from_secs(3), || {
        ClusterStats::get(&b.view.stats.refused) >= refused_before + 4
    })
    .await;
    eventually("evil's one good entry", Duration::from_secs(3), || {
        exact(&b, "192.0.2.77/32", 1) && exact(&b, "192.0.2.78/32", 0)
    })
    .await;

    for n in [a, b, c] {
        n.task.abort();
    }
}

/// The README's ACL line, for key prefix `t2`: the nodes work with exactly
/// these commands, and the user can touch nothing outside the prefix.
const ACL: &str = "ACL SETUSER ia on >s3cret resetkeys ~t2:* resetchannels -@all \
    +get +set +del +exists +strlen +mget +sadd +smembers +xadd +xrange +multi +exec +ping +role";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_work_as_a_least_privilege_acl_user() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let line: Vec<&str> = ACL.split_whitespace().collect();
    assert_eq!(redis.cli(&line).trim(), "OK");
    let dir = std::env::temp_dir().join(format!("ia-pass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("redis.pass");
    std::fs::write(&file, "s3cret\n").unwrap();
    let password = cluster::read_password(&file).unwrap();
    let url = format!("redis://ia@127.0.0.1:{}/0", redis.port);
    let a = node_at(
        &url,
        Some(&password),
        "mx1",
        "t2",
        Arc::new(FakeLocal::default()),
    );
    let b = node_at(
        &url,
        Some(&password),
        "mx2",
        "t2",
        Arc::new(FakeLocal::default()),
    );
    a.local.set("SMTP", "192.0.2.1", 2);
    b.local.set("SMTP", "192.0.2.2", 1);
    eventually("sums as the ACL user", Duration::from_secs(3), || {
        fleet_sessions(&a, "192.0.2.0/24") == Some(1)
            && fleet_sessions(&b, "192.0.2.0/24") == Some(2)
    })
    .await;
    assert_eq!(ClusterStats::get(&a.view.stats.publish_errors), 0);
    // Outside the prefix the user is refused.
    let out = Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "--user",
            "ia",
            "--pass",
            "s3cret",
            "--no-auth-warning",
        ])
        .args(["SET", "other:key", "1"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NOPERM"),
        "{out:?}"
    );
    // A wrong password: rounds fail, counted, and nothing is merged.
    let c = node_at(
        &url,
        Some("wrong"),
        "mx3",
        "t2",
        Arc::new(FakeLocal::default()),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.view.fleet().is_err());
    for n in [a, b, c] {
        n.task.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis primary, its replica and one sentinel: the primary is killed, the
/// sentinel promotes the replica, and the nodes follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_is_survived() {
    if Command::new("redis-sentinel")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: redis-sentinel is not installed (apt-get install redis-sentinel)");
        return;
    }
    let Some(mut primary) = Redis::start() else {
        return;
    };
    let replica_of = primary.port.to_string();
    let Some(replica) = Redis::start_with(&["--replicaof", "127.0.0.1", &replica_of]) else {
        return;
    };
    let sentinel_port = free_port();
    let conf = primary.dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor ia 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds ia 1000\n\
             sentinel failover-timeout ia 5000\n",
            primary.dir.display(),
            primary.port
        ),
    )
    .unwrap();
    let mut sentinel = Command::new("redis-sentinel")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-sentinel");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", sentinel_port)).is_err() {
        assert!(Instant::now() < deadline, "redis-sentinel did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("redis+sentinel://127.0.0.1:{sentinel_port}/ia");
    let a = node_at(&url, None, "mx1", "t3", Arc::new(FakeLocal::default()));
    let b = node_at(&url, None, "mx2", "t3", Arc::new(FakeLocal::default()));
    a.local.set("SMTP", "192.0.2.1", 4);
    b.local.set("SMTP", "192.0.2.2", 1);
    let exact = |a: &Node, b: &Node| {
        fleet_sessions(a, "192.0.2.0/24") == Some(1) && fleet_sessions(b, "192.0.2.0/24") == Some(4)
    };
    eventually("sums through the sentinel", Duration::from_secs(5), || {
        exact(&a, &b)
    })
    .await;
    // Let the replica catch up, then lose the primary.
    tokio::time::sleep(Duration::from_millis(500)).await;
    primary.kill();
    a.local.set("SMTP", "192.0.2.1", 6);
    let failed_over = eventually("failover", Duration::from_secs(20), || {
        fleet_sessions(&b, "192.0.2.0/24") == Some(6)
            && fleet_sessions(&a, "192.0.2.0/24") == Some(1)
    })
    .await;
    eprintln!("converged {failed_over:?} after the primary was killed");
    assert!(
        replica.cli(&["ROLE"]).starts_with("master"),
        "{}",
        replica.cli(&["ROLE"])
    );
    for n in [a, b] {
        n.task.abort();
    }
    let _ = sentinel.kill();
    let _ = sentinel.wait();
}

/// `rediss://`: the nodes verify the server against the CA the test made,
/// and a node that trusts only the system's roots is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_tls_verified_against_a_ca_file() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("SKIPPED: openssl is not installed");
        return;
    }
    let Some((redis, ca)) = Redis::start_tls() else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let target = || {
        Target::parse(&url, None)
            .unwrap()
            .with_root_cert(ca.clone())
    };
    let a = node_to(target(), "mx1", "t4", Arc::new(FakeLocal::default()));
    let b = node_to(target(), "mx2", "t4", Arc::new(FakeLocal::default()));
    a.local.set("SMTP", "192.0.2.1", 2);
    b.local.set("SMTP", "192.0.2.2", 1);
    eventually("sums over TLS", Duration::from_secs(5), || {
        fleet_sessions(&a, "192.0.2.0/24") == Some(1)
            && fleet_sessions(&b, "192.0.2.0/24") == Some(2)
    })
    .await;
    let untrusting = node_at(&url, None, "mx3", "t4", Arc::new(FakeLocal::default()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        untrusting.view.fleet().is_err(),
        "a server our roots do not know was trusted"
    );
    assert!(
        ClusterStats::get(&untrusting.view.stats.publish_errors) == 0
            || untrusting.view.sync_age().is_none()
    );
    for n in [a, b, untrusting] {
        n.task.abort();
    }
}

/// The heartbeat's `(epoch, seq)` of `node` under `prefix`, as another
/// client reads it.
fn heartbeat(redis: &Redis, prefix: &str, node: &str) -> Option<(String, u64)> {
    let text = redis.cli(&["GET", &format!("{prefix}:node:{node}:hb")]);
    let mut fields = text.split_whitespace().skip(1);
    Some((fields.next()?.to_string(), fields.next()?.parse().ok()?))
}

/// A Redis that lost a node's last batches (a replica promoted before they
/// reached it): snapshot and stream both end short of the heartbeat, and the
/// node has nothing new to publish. A reader asks for a snapshot instead of
/// waiting for the next scheduled one. Then a well-formed entry another
/// client adds to the node's stream, past anything the node wrote, is
/// refused once, not reloaded for every round, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_batches_are_asked_for_and_a_forged_gap_is_refused_once() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let prefix = "t5";
    let quiet = |name: &str, local: Arc<FakeLocal>| {
        let mut settings = Settings::new(
            Target::parse(&redis.url(), None).unwrap(),
            name,
            prefix,
            TTL,
        );
        // No scheduled snapshot during the test: only a reader's request
        // can bring one.
        settings.snapshot_every = Duration::from_secs(600);
        let view = Arc::new(ClusterView::new(name, TTL));
        let task = tokio::spawn(cluster::run(settings, view.clone(), local.clone()));
        Node { view, local, task }
    };
    let a = quiet("mx1", Arc::new(FakeLocal::default()));
    a.local.set("SMTP", "192.0.2.1", 1);
    eventually("mx1's first snapshot", Duration::from_secs(3), || {
        redis.cli(&["EXISTS", "t5:node:mx1:snap"]).trim() == "1"
    })
    .await;
    let (epoch, before) = heartbeat(&redis, prefix, "mx1").unwrap();
    assert_eq!(
        redis.cli(&["COPY", "t5:node:mx1:snap", "t5:saved"]).trim(),
        "1"
    );
    a.local.set("SMTP", "192.0.2.1", 5);
    eventually("mx1's batch", Duration::from_secs(3), || {
        heartbeat(&redis, prefix, "mx1").is_some_and(|(_, seq)| seq > before)
    })
    .await;
    // What a replica that missed the batch holds: the older snapshot, no stream.
    redis.cli(&["COPY", "t5:saved", "t5:node:mx1:snap", "REPLACE"]);
    redis.cli(&["DEL", "t5:node:mx1:log"]);
    let b = quiet("mx2", Arc::new(FakeLocal::default()));
    let healed = eventually(
        "the lost batch, through a snapshot asked for",
        Duration::from_secs(3),
        || fleet_sessions(&b, "192.0.2.0/24") == Some(5),
    )
    .await;
    eprintln!("lost batch recovered after {healed:?}");

    // A forged entry far past the node's sequence, with one of its IPs.
    let (_, seq) = heartbeat(&redis, prefix, "mx1").unwrap();
    let refused = ClusterStats::get(&b.view.stats.refused);
    redis.cli(&[
        "XADD",
        "t5:node:mx1:log",
        "*",
        "epoch",
        &epoch,
        "seq",
        &(seq + 1000).to_string(),
        "data",
        "s SMTP 192.0.2.99 7\n",
    ]);
    // Readers meet it with the node's next batch, which still counts.
    a.local.set("SMTP", "192.0.2.2", 2);
    eventually(
        "the forged entry refused, the next batch applied",
        Duration::from_secs(3),
        || {
            ClusterStats::get(&b.view.stats.refused) > refused
                && fleet_sessions(&b, "192.0.2.0/24") == Some(7)
        },
    )
    .await;
    let loaded = ClusterStats::get(&b.view.stats.snapshots_loaded);
    a.local.set("SMTP", "192.0.2.3", 1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        ClusterStats::get(&b.view.stats.snapshots_loaded) <= loaded + 1,
        "the snapshot is reloaded round after round"
    );
    assert_eq!(fleet_sessions(&b, "192.0.2.99/32"), Some(0));
    assert_eq!(fleet_sessions(&b, "192.0.2.0/24"), Some(8));

    // Keys of the wrong type where the node's stream and the set of nodes
    // belong: refused, removed by the publisher, and the view is exact again.
    redis.cli(&["DEL", "t5:node:mx1:log", "t5:nodes"]);
    redis.cli(&["SET", "t5:node:mx1:log", "not a stream"]);
    redis.cli(&["SET", "t5:nodes", "not a set"]);
    let refused =
        ClusterStats::get(&b.view.stats.refused) + ClusterStats::get(&a.view.stats.refused);
    a.local.set("SMTP", "192.0.2.2", 3);
    eventually(
        "past keys of the wrong type",
        Duration::from_secs(5),
        || {
            fleet_sessions(&b, "192.0.2.0/24") == Some(9)
                && fleet_sessions(&a, "0.0.0.0/0") == Some(0)
        },
    )
    .await;
    assert!(
        ClusterStats::get(&b.view.stats.refused) + ClusterStats::get(&a.view.stats.refused)
            > refused
    );
    assert_eq!(redis.cli(&["TYPE", "t5:nodes"]).trim(), "set");
    for n in [a, b] {
        n.task.abort();
    }
}

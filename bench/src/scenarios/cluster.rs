//! Fleet-wide counts: three agents (nodes) on one private redis-server, each
//! with 100k IPs in its monitor windows (the windows measurement's synthetic
//! state, the same IPs on every node, as a network hitting every MX would).
//! Measured side by side in one run:
//! - cluster windowed queries through the socket against the same queries
//!   local (p99, worst kind), with the fleet view merged;
//! - replication lag: a session opened on one node, until another node's
//!   `inbound_cidr` answer counts it, while every node churns 1,000 opens and
//!   closes a second of real loopback connections;
//! - Redis commands and bytes a second per node during that churn;
//! - agent memory per fleet-wide IP (one node's RSS before and after the
//!   other two nodes' shares are merged);
//! - local query p99 with Redis stopped (SIGSTOP) against Redis running,
//!   alternating rounds.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use inbound_bench::{
    stats::Percentiles,
    synthetic::{QueryKind, SyntheticSet},
};
use serde_json::json;

use crate::{
    agent::BenchAgent,
    env, latency,
    net::{self, ServerProcess},
    report::{fmt_count, fmt_ns, Report, Section},
    scenarios::windows::{fill, FILLED_WINDOWS, MONITOR},
    Ctx,
};

const NODES: usize = 3;

/// A private redis-server, stopped when dropped.
struct Redis {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Redis {
    fn start() -> Result<Self> {
        let port = (21_000..32_000)
            .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
            .context("a free port below 32768")?;
        let dir =
            std::env::temp_dir().join(format!("inbound-audit-bench-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, port, dir })
    }

    fn signal(&self, signal: &str) -> Result<()> {
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()?;
        Ok(())
    }

    /// (commands processed, bytes in, bytes out) so far.
    fn counters(&self) -> Result<(u64, u64, u64)> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "INFO", "stats"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
                .with_context(|| format!("no {name} in INFO stats"))
        };
        Ok((
            field("total_commands_processed")?,
            field("total_net_input_bytes")?,
            field("total_net_output_bytes")?,
        ))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Node {
    agent: BenchAgent,
    server: SocketAddr,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let size = if ctx.quick { 10_000 } else { 100_000 };
    let churn_secs = if ctx.quick { 3 } else { 15 };
    let redis = Redis::start()?;
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    let mut ports: Vec<u16> = Vec::new();
    for _ in 0..NODES {
        let port = env::free_port(&ports)?;
        ports.push(port);
    }
    let server = ServerProcess::start(&ctx.cgroup, &ports)?;
    let now = inbound_audit::domain::unix_now();
    let set = SyntheticSet::generate(size);
    let mut nodes = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let name = format!("mx{i}");
        let mut agent = BenchAgent::new(
            &ctx.agent_binary,
            &format!("cluster-{name}"),
            ctx.cgroup.path(),
            &[format!("SMTP={port}")],
        )?;
        agent.add_args(&[
            "--monitor",
            MONITOR,
            "--cluster-redis",
            &url,
            "--node",
            &name,
        ]);
        let state_dir = agent.state_dir();
        std::fs::create_dir_all(&state_dir)?;
        fill(&set, now).save(&state_dir.join("monitors.state"))?;
        nodes.push(Node {
            agent,
            server: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
        });
    }

    // Memory: the first node alone, then with the other two nodes' shares.
    nodes[0].agent.start()?;
    nodes[0].agent.wait_quiet(Duration::from_millis(2500))?;
    let pid = nodes[0].agent.pid().context("agent pid")?;
    let rss_alone = env::rss_bytes(pid).unwrap_or(0);
    for node in &mut nodes[1..] {
        node.agent.start()?;
    }
    let remote_entries = (NODES - 1) * size;
    let deadline = Instant::now() + Duration::from_secs(120);
    while nodes[0].agent.stat_u64("cluster_fleet_entries")? < remote_entries as u64 {
        if Instant::now() > deadline {
            bail!("the fleet view did not fill: {:?}", nodes[0].agent.stats()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes[0].agent.wait_quiet(Duration::from_millis(2500))?;
    let rss_fleet = env::rss_bytes(pid).unwrap_or(0);
    let per_remote_entry = rss_fleet.saturating_sub(rss_alone) as f64 / remote_entries as f64;
    println!(
        "[cluster] RSS {:.1} MiB alone, {:.1} MiB with {} remote entries: {per_remote_entry:.0} B each",
        rss_alone as f64 / 1_048_576.0,
        rss_fleet as f64 / 1_048_576.0,
        fmt_count(remote_entries as f64)
    );

    // Queries: cluster and local windowed sums, the same nets, side by side.
    let mut client = nodes[0].agent.client()?;
    let per_round = if ctx.quick { 500 } else { 2_000 };
    let rounds = if ctx.quick { 2 } else { 5 };
    let windowed = |net: &ipnet::IpNet, cluster: bool| {
        format!(
            "msys.audit.connections(\"{MONITOR}\", {{startv=0, endv={FILLED_WINDOWS}, cidr=\"{net}\", cluster={cluster}}})\n"
        )
        .into_bytes()
    };
    let mut rows = Vec::new();
    let mut worst = (0.0f64, QueryKind::V4Host);
    for kind in QueryKind::ALL {
        let nets = set.queries(kind, per_round, 7);
        // The answers are right: the fleet's sum is three times the local one.
        for net in nets.iter().take(20) {
            let local = client.count(&windowed(net, false))?;
            let fleet = client.count(&windowed(net, true))?;
            if fleet != NODES as u64 * local {
                bail!("cluster answer {fleet} for {net}, local {local}: not {NODES}×");
            }
        }
        let (mut local, mut fleet) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let requests: Vec<Vec<u8>> = nets.iter().map(|n| windowed(n, false)).collect();
            local.extend(latency::socket_round(&mut client, &requests)?);
            let requests: Vec<Vec<u8>> = nets.iter().map(|n| windowed(n, true)).collect();
            fleet.extend(latency::socket_round(&mut client, &requests)?);
        }
        let (local, fleet) = (Percentiles::of(&local), Percentiles::of(&fleet));
        if fleet.p99 > worst.0 {
            worst = (fleet.p99, kind);
        }
        rows.push((
            vec![
                kind.label().to_string(),
                fmt_ns(local.p50),
                fmt_ns(local.p99),
                fmt_ns(fleet.p50),
                fmt_ns(fleet.p99),
                format!("{:.2}", fleet.p99 / local.p99),
            ],
            json!({"kind": kind.slug(), "local": local, "cluster": fleet}),
        ));
    }
    report.target(
        &format!(
            "Cluster windowed query p99 through the socket, {NODES} nodes × {} IPs (worst kind)",
            fmt_count(size as f64)
        ),
        format!("{} ({})", fmt_ns(worst.0), worst.1.label()),
        worst.0,
        "≤ 100 µs",
        worst.0 <= 100_000.0,
    );
    report.sections.push(Section {
        title: "Cluster queries".into(),
        method: format!(
            "{NODES} agents on one redis-server, each with the same {} IPs in the windows of \
             \"{MONITOR}\"; node 0 answers `msys.audit.connections` over windows 0–{FILLED_WINDOWS} \
             locally and with `cluster=true` for the same nets, alternating, {rounds} rounds of \
             {per_round} per kind; every cluster answer checked to be {NODES}× the local one.",
            fmt_count(size as f64)
        ),
        columns: ["query", "local p50", "local p99", "cluster p50", "cluster p99", "p99 ratio"]
            .map(String::from)
            .to_vec(),
        rows: rows.iter().map(|(r, _)| r.clone()).collect(),
        data: json!(rows.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>()),
    });

    // Lag under churn: every node opens and closes 500 connections a second.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let churners: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let (stop, churned, server) = (stop.clone(), churned.clone(), node.server);
            std::thread::spawn(move || churn(i, server, &stop, &churned))
        })
        .collect();
    let before = redis.counters()?;
    let churn_started = Instant::now();
    let mut lags = Vec::new();
    let mut marker = 0usize;
    let mut watcher = nodes[1].agent.client()?;
    while churn_started.elapsed() < Duration::from_secs(churn_secs) {
        marker += 1;
        let source = Ipv4Addr::new(127, 31, (marker / 250) as u8, (marker % 250 + 1) as u8);
        let request =
            format!("msys.audit.inbound_session_count(\"{source}/32\", \"inbound_cidr\")\n")
                .into_bytes();
        let opened = Instant::now();
        let held = net::connect_from(source, nodes[0].server)?;
        loop {
            if watcher.count(&request)? >= 1 {
                break;
            }
            if opened.elapsed() > Duration::from_secs(10) {
                bail!("a session on node 0 not seen by node 1 within 10 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        lags.push(opened.elapsed().as_nanos() as f64);
        drop(held);
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = churn_started.elapsed().as_secs_f64();
    let after = redis.counters()?;
    stop.store(true, Ordering::Relaxed);
    for churner in churners {
        let _ = churner.join();
    }
    let lag = Percentiles::of(&lags);
    let rate = churned.load(Ordering::Relaxed) as f64 / elapsed / NODES as f64;
    let per_node = |a: u64, b: u64| (b - a) as f64 / elapsed / NODES as f64;
    report.target(
        "Cluster replication lag p99 (open on one node until another counts it, under churn)",
        format!(
            "{} (p50 {}, {:.0} opens+closes/s per node)",
            fmt_ns(lag.p99),
            fmt_ns(lag.p50),
            rate
        ),
        lag.p99,
        "≤ 1 s",
        lag.p99 <= 1e9,
    );

    // Local queries with Redis stopped against running, alternating rounds.
    let nets = set.queries(QueryKind::V4Slash24, per_round, 11);
    let requests: Vec<Vec<u8>> = nets.iter().map(|n| windowed(n, false)).collect();
    let (mut running, mut stopped) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        running.extend(latency::socket_round(&mut client, &requests)?);
        redis.signal("-STOP")?;
        let result = latency::socket_round(&mut client, &requests);
        redis.signal("-CONT")?;
        stopped.extend(result?);
        // Back in step before the next running round.
        std::thread::sleep(Duration::from_millis(300));
    }
    let (running, stopped) = (Percentiles::of(&running), Percentiles::of(&stopped));
    let ratio = stopped.p99 / running.p99;
    report.target(
        "Local query p99 with Redis stopped ÷ running (v4/24, alternating rounds)",
        format!(
            "{ratio:.2}× ({} vs {})",
            fmt_ns(stopped.p99),
            fmt_ns(running.p99)
        ),
        ratio,
        "≤ 2×",
        ratio <= 2.0,
    );
    report.sections.push(Section {
        title: "Cluster traffic, memory and Redis stopped".into(),
        method: format!(
            "During {churn_secs} s of churn (each node's own loopback connections, opened and \
             closed as fast as {} a second allow), one session at a time is opened on node 0 \
             and node 1 is polled every 2 ms until `inbound_cidr` counts it. Redis counters \
             from INFO stats before and after, per node. Memory: node 0's RSS alone and once \
             the other nodes' shares are merged. Redis stopped: SIGSTOP during alternate rounds \
             of local queries.",
            500
        ),
        columns: ["measurement", "figure"].map(String::from).to_vec(),
        rows: vec![
            vec![
                "replication lag p50 / p99".into(),
                format!("{} / {}", fmt_ns(lag.p50), fmt_ns(lag.p99)),
            ],
            vec!["lag samples".into(), lag.samples.to_string()],
            vec![
                "opens+closes per second per node".into(),
                format!("{rate:.0}"),
            ],
            vec![
                "Redis commands per second per node".into(),
                format!("{:.0}", per_node(before.0, after.0)),
            ],
            vec![
                "Redis bytes in per second per node".into(),
                format!("{:.0}", per_node(before.1, after.1)),
            ],
            vec![
                "Redis bytes out per second per node".into(),
                format!("{:.0}", per_node(before.2, after.2)),
            ],
            vec![
                "agent memory per remote entry (node 0)".into(),
                format!("{per_remote_entry:.0} B"),
            ],
            vec![
                "local query p99, Redis running / stopped".into(),
                format!("{} / {}", fmt_ns(running.p99), fmt_ns(stopped.p99)),
            ],
        ],
        data: json!({
            "lag": lag, "rate_per_node": rate,
            "redis_commands_per_node_per_s": per_node(before.0, after.0),
            "redis_bytes_in_per_node_per_s": per_node(before.1, after.1),
            "redis_bytes_out_per_node_per_s": per_node(before.2, after.2),
            "rss_alone": rss_alone, "rss_fleet": rss_fleet, "remote_entries": remote_entries,
            "bytes_per_remote_entry": per_remote_entry,
            "query_redis_running": running, "query_redis_stopped": stopped,
        }),
    });
    for node in &mut nodes {
        node.agent.stop()?;
        node.agent.cleanup_pins()?;
    }
    server.kill();
    Ok(())
}

/// Opens and closes connections to `server` from node `i`'s own sources, at
/// most 500 a second, until `stop`.
fn churn(i: usize, server: SocketAddr, stop: &AtomicBool, churned: &AtomicU64) {
    let mut n = 0usize;
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let source = Ipv4Addr::new(
            127,
            32 + i as u8,
            (n / 250 % 250) as u8,
            (n % 250 + 1) as u8,
        );
        if let Ok(socket) = net::connect_from(source, server) {
            net::reset(socket);
            churned.fetch_add(2, Ordering::Relaxed);
        }
        n += 1;
        let due = started + Duration::from_micros(2_000 * n as u64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

//! Measurement 6: accuracy under churn.
//!
//! At least 1M connect/close cycles from 65,024 sources (127.30.0.0/16),
//! closed at random with FIN or RST, a few hundred held at any time per
//! client thread, and the server SIGKILLed and restarted several times. The
//! agent's reconciler is kept quiet (one pass an hour), so what is checked is
//! the event path itself. Afterwards, at a moment when two sock_diag dumps
//! agree, every source's count from the agent (a /32 query each) and from
//! the kernel's per-IP map is compared with sock_diag's; then every held
//! connection is closed and all three must be zero.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use inbound_audit::kernel::seed;
use inbound_bench::Rng;
use serde_json::json;
use socket2::Socket;

use crate::{
    agent::BenchAgent,
    env::{self, BenchCgroup},
    kernel,
    net::{connect_from, reset, ServerProcess},
    report::{fmt_count, Report, Section},
    Ctx,
};

struct Plan {
    cycles: u64,
    threads: usize,
    /// Connections each client thread keeps open; a new one replaces a random held one.
    held_per_thread: usize,
    kills: u64,
}

#[derive(Default)]
struct Counters {
    cycles: AtomicU64,
    fin: AtomicU64,
    rst: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Comparison {
    live_sessions: u64,
    sources_compared: usize,
    agent_mismatches: usize,
    kernel_mismatches: usize,
    agent_total: u64,
    kernel_records: usize,
    attempts: usize,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let plan = if ctx.quick {
        Plan {
            cycles: 20_000,
            threads: 2,
            held_per_thread: 100,
            kills: 1,
        }
    } else {
        Plan {
            cycles: 1_000_000,
            // More client threads only starve the single-threaded server of
            // CPU on 2 cores (closes then queue up in CLOSE_WAIT).
            threads: 2,
            held_per_thread: 1000,
            kills: 4,
        }
    };
    let port = env::free_port(&[])?;
    let mut server = Some(start_server(&ctx.cgroup, port)?);
    let mut agent = BenchAgent::new(
        &ctx.agent_binary,
        "churn",
        ctx.cgroup.path(),
        &[format!("SMTP={port}")],
    )?;
    agent.start()?;
    agent.wait_quiet(Duration::from_millis(2500))?;
    let target = SocketAddr::from(([127, 0, 0, 1], port));

    println!(
        "[churn] {} connect/close cycles, {} client threads, {} server kills",
        fmt_count(plan.cycles as f64),
        plan.threads,
        plan.kills
    );
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..plan.threads {
        let (counters, stop) = (counters.clone(), stop.clone());
        let (cycles, held_per_thread) = (plan.cycles, plan.held_per_thread);
        threads.push(std::thread::spawn(move || {
            churn_client(t as u64, target, cycles, held_per_thread, &counters, &stop)
        }));
    }
    let started = Instant::now();
    let mut kills = 0;
    let mut next_progress = plan.cycles / 10;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let done = counters.cycles.load(Ordering::Relaxed);
        if kills < plan.kills && done >= plan.cycles * (kills + 1) / (plan.kills + 1) {
            // SIGKILL the MTA: the kernel closes all it held at once.
            if let Some(old) = server.take() {
                old.kill();
            }
            server = Some(start_server(&ctx.cgroup, port)?);
            kills += 1;
        }
        if done >= next_progress {
            let held = match server.as_mut() {
                Some(server) => server.stats().map_or(0, |(_, open)| open),
                None => 0,
            };
            println!(
                "[churn] {:>9} cycles, {:.0}/s, server holds {held}",
                fmt_count(done as f64),
                done as f64 / started.elapsed().as_secs_f64()
            );
            next_progress += plan.cycles / 10;
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(900) {
            stop.store(true, Ordering::Relaxed);
        }
    }
    let churn_secs = started.elapsed().as_secs_f64();
    let mut held: Vec<Socket> = Vec::new();
    for thread in threads {
        held.extend(thread.join().expect("churn thread"));
    }
    let cycles = counters.cycles.load(Ordering::Relaxed);

    // Let the last closes and events land.
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "[churn] comparing with sock_diag, {} connections held",
        held.len()
    );
    let live = compare(&agent, &ctx.cgroup, port)?;
    println!(
        "[churn] mismatches with {} live: agent {}, kernel map {}",
        live.live_sessions, live.agent_mismatches, live.kernel_mismatches
    );

    let mut rng = Rng::new(99);
    for socket in held.drain(..) {
        if rng.chance(30) {
            reset(socket);
        } else {
            drop(socket);
        }
    }
    wait_for_no_live_sessions(&ctx.cgroup, port)?;
    let closed = compare(&agent, &ctx.cgroup, port)?;
    println!(
        "[churn] mismatches after closing all: agent {}, kernel map {}",
        closed.agent_mismatches, closed.kernel_mismatches
    );
    let stats = agent.stats()?;
    agent.stop()?;
    drop(server);

    let stat = |name: &str| stats.get(name).cloned().unwrap_or_else(|| "n/a".into());
    // Per source, plus the totals: the agent's 0.0.0.0/0 answer and the
    // kernel's socket records must equal sock_diag's live sessions.
    let mismatches: usize = [live, closed]
        .iter()
        .map(|c| {
            c.agent_mismatches
                + c.kernel_mismatches
                + usize::from(c.agent_total != c.live_sessions)
                + usize::from(c.kernel_records as u64 != c.live_sessions)
        })
        .sum();
    println!("[churn] total mismatches: {mismatches}");
    let fin = counters.fin.load(Ordering::Relaxed);
    let rst = counters.rst.load(Ordering::Relaxed);
    let refused = counters.refused.load(Ordering::Relaxed);
    report.sections.push(Section {
        title: "Accuracy under churn".into(),
        method: format!(
            "{} connect/close cycles in {churn_secs:.0} s ({:.0}/s) by {} client threads from \
             65,024 sources in 127.30.0.0/16; each thread keeps {} connections open and closes \
             a random one per new connection, with FIN (70 %) or RST (30 %); the server was \
             SIGKILLed and restarted {kills} times ({} connects refused while it was down). The \
             agent's reconciler ran only its start-up passes (`--reconcile-interval 3600`), so \
             nothing was repaired behind the event path. Then, when two sock_diag dumps agreed, \
             every source's count was compared: the agent's answer to a /32 query and the \
             kernel's per-IP map against sock_diag's inbound live sockets in the watched cgroup.",
            fmt_count(cycles as f64),
            cycles as f64 / churn_secs,
            plan.threads,
            plan.held_per_thread,
            fmt_count(refused as f64),
        ),
        columns: [
            "check",
            "live sessions (sock_diag)",
            "sources compared",
            "agent mismatches",
            "kernel map mismatches",
            "agent total",
            "kernel socket records",
        ]
        .map(String::from)
        .to_vec(),
        rows: [("after churn", live), ("after closing all", closed)]
            .iter()
            .map(|(name, c)| {
                vec![
                    name.to_string(),
                    fmt_count(c.live_sessions as f64),
                    fmt_count(c.sources_compared as f64),
                    c.agent_mismatches.to_string(),
                    c.kernel_mismatches.to_string(),
                    fmt_count(c.agent_total as f64),
                    fmt_count(c.kernel_records as f64),
                ]
            })
            .collect(),
        data: json!({
            "cycles": cycles, "seconds": churn_secs, "fin_closes": fin, "rst_closes": rst,
            "server_kills": kills, "refused_connects": refused,
            "after_churn": live, "after_closing_all": closed,
            "agent_stats": stats,
        }),
    });
    report.note(format!(
        "Churn: agent counters afterwards: events_applied {}, closes_without_open {}, \
         index_repairs {}, kernel_repairs {}, kernel_events_lost {}; closes: {} FIN, {} RST by \
         clients, plus the server kills.",
        stat("events_applied"),
        stat("closes_without_open"),
        stat("index_repairs"),
        stat("kernel_repairs"),
        stat("kernel_events_lost"),
        fmt_count(fin as f64),
        fmt_count(rst as f64),
    ));
    let enough = cycles >= plan.cycles && !ctx.quick;
    report.target(
        &format!(
            "Drift after {} connect/close cycles (mismatches with sock_diag)",
            fmt_count(cycles as f64)
        ),
        format!("{mismatches} mismatches"),
        mismatches as f64,
        "0 (after ≥ 1M cycles)",
        mismatches == 0 && enough,
    );
    Ok(())
}

fn start_server(cgroup: &BenchCgroup, port: u16) -> Result<ServerProcess> {
    let server = ServerProcess::start(cgroup, &[port])?;
    server.prioritize();
    Ok(server)
}

/// One client thread: connects from random sources until `cycles` connects
/// were made overall, keeping `held` connections open; returns those still held.
fn churn_client(
    seed: u64,
    target: SocketAddr,
    cycles: u64,
    held: usize,
    counters: &Counters,
    stop: &AtomicBool,
) -> Vec<Socket> {
    let mut rng = Rng::new(0xc0ffee + seed);
    let mut open: Vec<Socket> = Vec::with_capacity(held + 1);
    while !stop.load(Ordering::Relaxed) && counters.cycles.load(Ordering::Relaxed) < cycles {
        let host = rng.below(256 * 254) as u32;
        let source = Ipv4Addr::new(127, 30, (host / 254) as u8, (host % 254 + 1) as u8);
        match connect_from(source, target) {
            Ok(socket) => {
                counters.cycles.fetch_add(1, Ordering::Relaxed);
                open.push(socket);
            }
            Err(_) => {
                // The server is down (killed, restarting): try again shortly.
                counters.refused.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if open.len() > held {
            let victim = open.swap_remove(rng.below(open.len() as u64) as usize);
            if rng.chance(30) {
                reset(victim);
                counters.rst.fetch_add(1, Ordering::Relaxed);
            } else {
                drop(victim);
                counters.fin.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    open
}

/// sock_diag's view: inbound live sessions on `port` in the bench cgroup, per
/// source IP (the same definition the agent seeds from).
fn truth(cgroup: &BenchCgroup, port: u16) -> Result<HashMap<Ipv4Addr, u64>> {
    let ports = HashMap::from([(port, 0u8)]);
    let ids = seed::cgroup_subtree_ids(cgroup.path())?;
    let mut out = HashMap::new();
    for socket in seed::inbound_live_sockets(&ports, Some(&ids), None)? {
        if let IpAddr::V4(ip) = seed::normalize(socket.remote) {
            *out.entry(ip).or_default() += 1;
        }
    }
    Ok(out)
}

fn wait_for_no_live_sessions(cgroup: &BenchCgroup, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !truth(cgroup, port)?.is_empty() {
        if Instant::now() > deadline {
            anyhow::bail!("sessions still live 30 s after closing every client connection");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// Compares every source of 127.30.0.0/16 at a moment when two sock_diag
/// dumps, taken before and after reading our counts, agree.
fn compare(agent: &BenchAgent, cgroup: &BenchCgroup, port: u16) -> Result<Comparison> {
    let mut client = agent.client()?;
    for attempt in 1..=5 {
        let before = truth(cgroup, port)?;
        let mut agent_counts = HashMap::new();
        for host in 0..256 * 254u32 {
            let ip = Ipv4Addr::new(127, 30, (host / 254) as u8, (host % 254 + 1) as u8);
            let request = format!("msys.audit.inbound_session_count(\"{ip}/32\", \"SMTP\")\n");
            let n = client.count(request.as_bytes())?;
            if n > 0 {
                agent_counts.insert(ip, n);
            }
        }
        let agent_total = client
            .count(b"msys.audit.inbound_session_count(\"0.0.0.0/0\", \"SMTP\")\n")
            .context("total")?;
        let kernel_counts: HashMap<Ipv4Addr, u64> = kernel::live_v4_counts(&agent.pin_dir)?;
        let kernel_records = kernel::socket_records(&agent.pin_dir)?;
        let after = truth(cgroup, port)?;
        if before != after && attempt < 5 {
            continue;
        }
        let differs = |counts: &HashMap<Ipv4Addr, u64>| {
            before
                .keys()
                .chain(counts.keys())
                .collect::<std::collections::HashSet<_>>()
                .into_iter()
                .filter(|ip| before.get(ip) != counts.get(ip))
                .count()
        };
        return Ok(Comparison {
            live_sessions: before.values().sum(),
            sources_compared: 256 * 254,
            agent_mismatches: differs(&agent_counts),
            kernel_mismatches: differs(&kernel_counts),
            agent_total,
            kernel_records,
            attempts: attempt,
        });
    }
    unreachable!("the last attempt always returns")
}

//! A well-behaved client's latency with 1000 hostile clients connected, side by
//! side with the same client against the idle agent, and the agent's memory.
//!
//! The hostile mix: clients that connect and say nothing, clients that sent
//! half a request and stall, and clients that pipeline requests without ever
//! reading the answers (their socket buffers fill, the agent's writes block).

use std::{io::Write, os::unix::net::UnixStream, time::Instant};

use anyhow::{Context, Result};
use inbound_bench::stats::{median, Percentiles};

use crate::{
    agent::{BenchAgent, QueryClient},
    env,
    report::{fmt_ns, Report},
    Ctx,
};

const HOSTILE: usize = 1000;
/// Requests each pipelining client sends without reading an answer.
const PIPELINED: usize = 2000;
const REQUEST: &[u8] = b"msys.audit.inbound_session_count(\"10.0.0.0/8\", \"SMTP\")\n";

/// Opens the hostile clients; they stay until the returned vector is dropped.
fn open_hostile(socket: &std::path::Path) -> Result<Vec<UnixStream>> {
    let mut clients = Vec::with_capacity(HOSTILE);
    for i in 0..HOSTILE {
        let mut stream = UnixStream::connect(socket).context("hostile connect")?;
        stream.set_nonblocking(true)?;
        match i % 3 {
            // Silent.
            0 => {}
            // Half a request, never finished.
            1 => {
                let _ = stream.write(b"msys.audit.inbound_session_count(\"10.");
            }
            // Requests it never reads the answers to, until its buffers are full.
            _ => {
                let burst = REQUEST.repeat(PIPELINED);
                let _ = stream.write(&burst);
            }
        }
        clients.push(stream);
    }
    Ok(clients)
}

fn latencies(client: &mut QueryClient, n: usize) -> Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        client.count(REQUEST)?;
        samples.push(started.elapsed().as_nanos() as f64);
    }
    Ok(samples)
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let port = env::free_port(&[])?;
    let mut agent = BenchAgent::new(
        &ctx.agent_binary,
        "hostile",
        ctx.cgroup.path(),
        &[format!("SMTP={port}")],
    )?;
    agent.start()?;
    let pid = agent.pid().context("agent pid")?;
    let (rounds, per_round) = if ctx.quick { (2, 2_000) } else { (5, 20_000) };
    let mut idle_p99 = Vec::new();
    let mut hostile_p99 = Vec::new();
    let mut idle_all = Vec::new();
    let mut hostile_all = Vec::new();
    let mut rss_idle = Vec::new();
    let mut rss_hostile = Vec::new();
    let mut burst_secs = Vec::new();
    for round in 0..rounds {
        let mut client = agent.client()?;
        latencies(&mut client, per_round / 10)?; // warm-up
        let idle = latencies(&mut client, per_round)?;
        rss_idle.push(env::rss_bytes(pid).unwrap_or(0) as f64);
        let hostile_clients = open_hostile(&agent.socket)?;
        // The pipelined requests are answered first (a burst of load, not a
        // stall); what is measured is everyone else's service once the hostile
        // clients sit silent, stalled, or with answers they never read.
        burst_secs.push(
            agent
                .wait_quiet(std::time::Duration::from_millis(200))?
                .as_secs_f64(),
        );
        let hostile = latencies(&mut client, per_round)?;
        rss_hostile.push(env::rss_bytes(pid).unwrap_or(0) as f64);
        drop(hostile_clients);
        println!(
            "  round {round}: p99 idle {} / with {HOSTILE} hostile {}",
            fmt_ns(Percentiles::of(&idle).p99),
            fmt_ns(Percentiles::of(&hostile).p99)
        );
        idle_p99.push(Percentiles::of(&idle).p99);
        hostile_p99.push(Percentiles::of(&hostile).p99);
        idle_all.extend(idle);
        hostile_all.extend(hostile);
        // Let the agent see the hostile clients go before the next idle round.
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let ratios: Vec<f64> = hostile_p99
        .iter()
        .zip(&idle_p99)
        .map(|(h, i)| h / i)
        .collect();
    let ratio = median(&ratios);
    let (idle, hostile) = (Percentiles::of(&idle_all), Percentiles::of(&hostile_all));
    report.target(
        &format!("Well-behaved client's p99 with {HOSTILE} hostile clients vs idle agent (median of rounds)"),
        format!("{ratio:.2}× ({} vs {})", fmt_ns(hostile.p99), fmt_ns(idle.p99)),
        ratio,
        "≤ 2×",
        ratio <= 2.0,
    );
    let growth = (median(&rss_hostile) - median(&rss_idle)).max(0.0);
    let per_client = growth / HOSTILE as f64;
    report.target(
        &format!("Agent memory with {HOSTILE} hostile clients (growth over idle)"),
        format!(
            "{:.1} MiB ({:.1} KiB per client)",
            growth / (1024.0 * 1024.0),
            per_client / 1024.0
        ),
        growth,
        "bounded: ≤ 64 KiB per client",
        per_client <= 64.0 * 1024.0,
    );
    report.note(format!(
        "Hostile clients: {HOSTILE} per round, a third silent, a third stalled mid-request, a \
         third pipelining requests without reading answers; {rounds} rounds of {per_round} \
         queries each way, alternating idle and hostile, measured once the agent had answered \
         the pipelined requests ({:.1} s median, {} requests a round). Well-behaved p50 idle {} / \
         hostile {}.",
        median(&burst_secs),
        HOSTILE / 3 * PIPELINED,
        fmt_ns(idle.p50),
        fmt_ns(hostile.p50)
    ));
    agent.stop()?;
    agent.cleanup_pins()?;
    Ok(())
}

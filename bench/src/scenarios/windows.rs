//! Measurement 1 for the windowed queries: `msys.audit.connections` summed
//! over every window of a monitor, in-process on the monitors and through the
//! socket, with 1k, 100k and 1M IPs spread over the windows.
//!
//! The windows are synthetic: the runner records the IPs into a `Monitors`
//! (the agent's own type), as connections spread over the last four hourly
//! windows, and saves it as the agent's monitor state file, which the agent
//! loads at start exactly as after a restart.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use inbound_audit::monitors::{MonitorSpec, Monitors, Series};
use inbound_bench::synthetic::{QueryKind, SyntheticSet};
use ipnet::IpNet;
use serde_json::json;

use crate::{
    agent::{BenchAgent, QueryClient},
    env, latency,
    report::{fmt_count, Report, Section},
    Ctx,
};

/// Hourly windows, four kept: a window boundary during the run shifts the
/// data by one window, and the queries, summing windows 0 to 4, still see it all.
const MONITOR: &str = "3600,4";
const WINDOW: Duration = Duration::from_secs(3600);
const FILLED_WINDOWS: u32 = 4;

/// The request: connections in every window of the monitor, for `net`.
fn request(net: &IpNet) -> String {
    format!(
        "msys.audit.connections(\"{MONITOR}\", {{startv=0, endv={FILLED_WINDOWS}, cidr=\"{net}\"}})\n"
    )
}

fn sum(monitors: &Monitors, net: &IpNet, now: Duration) -> u64 {
    monitors.by_key(MONITOR).expect("the bench monitor").sum(
        Series::Connections,
        net,
        0,
        FILLED_WINDOWS,
        now,
    )
}

/// One IP in one window each, oldest window first (a monitor only appends
/// newer windows), so every query walks several windows' indexes.
fn fill(set: &SyntheticSet, now: Duration) -> Monitors {
    let spec: MonitorSpec = MONITOR.parse().expect("valid monitor");
    let mut monitors = Monitors::new(&[spec], usize::MAX);
    for age in (0..FILLED_WINDOWS).rev() {
        let at = now - WINDOW * age;
        for (i, ip) in set.iter().enumerate() {
            if i % FILLED_WINDOWS as usize == age as usize {
                monitors.record(Series::Connections, ip, 1, at);
            }
        }
    }
    monitors
}

struct SizeRun {
    size: usize,
    set: SyntheticSet,
    monitors: Monitors,
    agent: BenchAgent,
    client: QueryClient,
    inproc: latency::KindRounds,
    socket: latency::KindRounds,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let plan = latency::Plan::new(ctx.quick);
    let port = env::free_port(&[])?;
    let now = inbound_audit::server::unix_now();
    let mut runs = Vec::new();
    for &size in &plan.sizes {
        let set = SyntheticSet::generate(size);
        let recorded = fill(&set, now);
        let mut agent = BenchAgent::new(
            &ctx.agent_binary,
            &format!("windows-{size}"),
            ctx.cgroup.path(),
            &[format!("SMTP={port}")],
        )?;
        agent.add_args(&["--monitor", MONITOR]);
        let state_dir = agent.state_dir();
        std::fs::create_dir_all(&state_dir)?;
        let state_file = state_dir.join("monitors.state");
        recorded
            .save(&state_file)
            .context("saving the monitor state")?;
        // In-process queries run on the state as the agent loads it (the
        // loaded indexes are built in key order, recorded ones in arrival order).
        drop(recorded);
        let mut monitors = Monitors::new(&[MONITOR.parse()?], usize::MAX);
        monitors
            .load(&state_file, now)
            .context("loading the monitor state back")?;
        let started = agent.start()?;
        println!(
            "[windows] {} IPs in {FILLED_WINDOWS} windows; agent answering after {:.1} s",
            fmt_count(size as f64),
            started.as_secs_f64()
        );
        let client = agent.client()?;
        runs.push(SizeRun {
            size,
            set,
            monitors,
            agent,
            client,
            inproc: latency::kind_rounds(),
            socket: latency::kind_rounds(),
        });
    }
    for run in &mut runs {
        verify(run)?;
    }
    // Rounds interleave sizes, so a busy moment on the machine hits all alike.
    for round in 0..plan.rounds {
        for run in &mut runs {
            measure_inproc(run, &plan, round);
            measure_socket(run, &plan, round)?;
        }
    }
    for run in &mut runs {
        run.agent.stop()?;
    }
    write_report(&runs, &plan, report);
    Ok(())
}

/// The agent's answers for a sample of queries equal the in-process sums: it
/// really serves the state the runner built.
fn verify(run: &mut SizeRun) -> Result<()> {
    let now = inbound_audit::server::unix_now();
    for kind in QueryKind::ALL {
        for net in run.set.queries(kind, 200, 99) {
            let answer = run.client.count(request(&net).as_bytes())?;
            let expected = sum(&run.monitors, &net, now);
            if answer != expected {
                bail!("the agent answers {answer} for {net}, the monitors {expected}");
            }
        }
    }
    Ok(())
}

fn measure_inproc(run: &mut SizeRun, plan: &latency::Plan, round: usize) {
    let now = inbound_audit::server::unix_now();
    // Found once: the agent's parsing of the "W,N" key is not the index.
    let monitor = run.monitors.by_key(MONITOR).expect("the bench monitor");
    for (kind, rounds) in run.inproc.iter_mut() {
        let queries = run.set.queries(*kind, plan.inproc_per_round, round as u64);
        rounds.push_round(latency::inproc_round(&queries, |net| {
            monitor.sum(Series::Connections, net, 0, FILLED_WINDOWS, now)
        }));
    }
}

fn measure_socket(run: &mut SizeRun, plan: &latency::Plan, round: usize) -> Result<()> {
    for (kind, rounds) in run.socket.iter_mut() {
        let requests: Vec<Vec<u8>> = run
            .set
            .queries(*kind, plan.socket_per_round, 1000 + round as u64)
            .iter()
            .map(|net| request(net).into_bytes())
            .collect();
        rounds.push_round(latency::socket_round(&mut run.client, &requests)?);
    }
    Ok(())
}

fn write_report(runs: &[SizeRun], plan: &latency::Plan, report: &mut Report) {
    let (rows, data): (Vec<_>, Vec<_>) = runs
        .iter()
        .flat_map(|r| latency::rows(r.size, &r.inproc, &r.socket))
        .unzip();
    report.sections.push(Section {
        title: "Windowed query latency (msys.audit.connections over every window)".into(),
        method: format!(
            "Monitor \"{MONITOR}\" (hourly windows). Tracked IPs are synthetic, as in the \
             query-latency section, recorded as one connection each into the monitor's last \
             {FILLED_WINDOWS} windows (a quarter of the IPs per window) and saved as the \
             agent's monitor state file, which the agent loads at start. Each query is \
             `msys.audit.connections(\"{MONITOR}\", {{startv=0, endv={FILLED_WINDOWS}, \
             cidr=...}})` for the prefix of a tracked IP: a count over every window's CIDR \
             index. In-process: `Monitor::sum` on the state file loaded as the agent loads it, timed one query at a time ({} per kind per \
             round, timer included). Socket: the real agent, one persistent client, {} \
             queries per kind per round. {} rounds interleaving sizes; the agent's answers \
             were checked against the in-process sums first.",
            fmt_count(plan.inproc_per_round as f64),
            fmt_count(plan.socket_per_round as f64),
            plan.rounds
        ),
        columns: latency::COLUMNS.map(String::from).to_vec(),
        rows,
        data: json!(data),
    });
    let Some(largest) = runs.iter().max_by_key(|r| r.size) else {
        return;
    };
    let size = fmt_count(largest.size as f64);
    latency::judge(
        report,
        (&format!("Windowed query through the socket, p99 at {size} IPs in the windows (worst kind)"), &largest.socket),
        (&format!(
            "Windowed query in-process, p99 at {size} IPs ({FILLED_WINDOWS} window indexes, worst kind)"
        ), &largest.inproc),
    );
}

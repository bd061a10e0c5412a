//! Measurement 1 for the windowed queries: `msys.audit.connections` summed
//! over every window of a monitor, in-process on the monitors and through the
//! socket, with 1k, 100k and 1M IPs spread over the windows; and in-process,
//! over narrower ranges of windows, which take other paths through the monitor.
//!
//! The windows are synthetic: the runner records the IPs into a `Monitors`
//! (the agent's own type), as connections spread over the last four hourly
//! windows, and saves it as the agent's monitor state file, which the agent
//! loads at start exactly as after a restart.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use inbound_audit::{
    counting::monitors::Monitors,
    domain::{MonitorSpec, Series},
};
use inbound_bench::synthetic::{QueryKind, SyntheticSet};
use ipnet::IpNet;
use serde_json::json;

use crate::{
    agent::{BenchAgent, QueryClient},
    env, latency,
    report::{fmt_count, fmt_ns, Report, Section},
    Ctx,
};

/// Hourly windows, four kept: a window boundary during the run shifts the
/// data by one window, and the queries, summing windows 0 to 4, still see it all.
pub(crate) const MONITOR: &str = "3600,4";
const WINDOW: Duration = Duration::from_secs(3600);
pub(crate) const FILLED_WINDOWS: u32 = 4;

/// The request: connections in every window of the monitor, for `net`.
fn request(net: &IpNet) -> String {
    format!(
        "msys.audit.connections(\"{MONITOR}\", {{startv=0, endv={FILLED_WINDOWS}, cidr=\"{net}\"}})\n"
    )
}

/// Narrower ranges (first, last window), timed in-process only: the whole
/// history minus the current window (the totals minus one window), the two
/// newest windows and the previous window alone (window walks).
const OTHER_RANGES: [(u32, u32); 3] = [(1, FILLED_WINDOWS), (0, 1), (1, 1)];

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
pub(crate) fn fill(set: &SyntheticSet, now: Duration) -> Monitors {
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
    /// The agent's resident memory once it has loaded the windows and settled.
    rss: u64,
    size: usize,
    set: SyntheticSet,
    monitors: Monitors,
    agent: BenchAgent,
    client: QueryClient,
    inproc: latency::KindRounds,
    socket: latency::KindRounds,
    /// In-process rounds for each of [`OTHER_RANGES`].
    other_ranges: Vec<latency::KindRounds>,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let plan = latency::Plan::new(ctx.quick);
    let port = env::free_port(&[])?;
    let now = inbound_audit::domain::unix_now();
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
        agent.wait_quiet(Duration::from_millis(2500))?;
        let rss = env::rss_bytes(agent.pid().context("agent pid")?).unwrap_or(0);
        println!(
            "[windows] {} IPs in {FILLED_WINDOWS} windows; agent answering after {:.1} s, RSS {:.1} MiB",
            fmt_count(size as f64),
            started.as_secs_f64(),
            rss as f64 / 1_048_576.0
        );
        let client = agent.client()?;
        runs.push(SizeRun {
            rss,
            size,
            set,
            monitors,
            agent,
            client,
            inproc: latency::kind_rounds(),
            socket: latency::kind_rounds(),
            other_ranges: OTHER_RANGES
                .iter()
                .map(|_| latency::kind_rounds())
                .collect(),
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
    let now = inbound_audit::domain::unix_now();
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
    let now = inbound_audit::domain::unix_now();
    // Found once: the agent's parsing of the "W,N" key is not the index.
    let monitor = run.monitors.by_key(MONITOR).expect("the bench monitor");
    for (kind, rounds) in run.inproc.iter_mut() {
        let queries = run.set.queries(*kind, plan.inproc_per_round, round as u64);
        rounds.push_round(latency::inproc_round(&queries, |net| {
            monitor.sum(Series::Connections, net, 0, FILLED_WINDOWS, now)
        }));
    }
    for (&(first, last), kinds) in OTHER_RANGES.iter().zip(run.other_ranges.iter_mut()) {
        for (kind, rounds) in kinds.iter_mut() {
            let queries = run.set.queries(*kind, plan.inproc_per_round, round as u64);
            rounds.push_round(latency::inproc_round(&queries, |net| {
                monitor.sum(Series::Connections, net, first, last, now)
            }));
        }
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
             cidr=...}})` for the prefix of a tracked IP: every window, answered from the \
             monitor's running totals (one CIDR index walk). In-process: `Monitor::sum` on the state file loaded as the agent loads it, timed one query at a time ({} per kind per \
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
    let mut range_rows = Vec::new();
    let mut range_data = Vec::new();
    for run in runs {
        let all = std::iter::once(((0, FILLED_WINDOWS), &run.inproc));
        for ((first, last), kinds) in all.chain(OTHER_RANGES.iter().copied().zip(&run.other_ranges))
        {
            let (p99, kind) = latency::worst_p99(kinds);
            let summary = kinds
                .iter()
                .find(|(k, _)| *k == kind)
                .expect("the worst kind is one of them")
                .1
                .summary();
            range_rows.push(vec![
                fmt_count(run.size as f64),
                format!("{first}–{last}"),
                kind.label().to_string(),
                fmt_ns(summary.pooled.p50),
                fmt_ns(p99),
                fmt_ns(summary.pooled.p999),
            ]);
            range_data.push(json!({
                "tracked_ips": run.size, "first_window": first, "last_window": last,
                "worst_query": kind.label(), "in_process_ns": summary,
            }));
        }
    }
    report.sections.push(Section {
        title: "Windowed query in-process, by range of windows".into(),
        method: format!(
            "The same monitors and queries, `Monitor::sum` over other ranges of windows \
             (startv–endv; {FILLED_WINDOWS} windows hold IPs). A range is answered by walking \
             the windows in it or, when that is fewer walks, the monitor's running totals \
             minus the windows outside it: all windows is one walk of the totals, 1–{FILLED_WINDOWS} \
             the totals and the current window, 0–1 and 1–1 the windows themselves. Per \
             range, the kind with the highest p99 (of /32, /24, /16, /64)."
        ),
        columns: ["IPs", "windows", "worst query", "p50", "p99", "p999"]
            .map(String::from)
            .to_vec(),
        rows: range_rows,
        data: json!(range_data),
    });
    let Some(largest) = runs.iter().max_by_key(|r| r.size) else {
        return;
    };
    if let Some(smallest) = runs.iter().min_by_key(|r| r.size) {
        let per_entry = largest.rss.saturating_sub(smallest.rss) as f64
            / (largest.size - smallest.size).max(1) as f64;
        report.note(format!(
            "Agent memory with the monitor state loaded: {} (VmRSS once settled); {per_entry:.0} B \
             per (IP, window) entry between the smallest and the largest size, the running \
             totals and the indexes' hash maps included.",
            runs.iter()
                .map(|r| format!(
                    "{} MiB at {} IPs",
                    fmt_count(r.rss as f64 / 1_048_576.0),
                    fmt_count(r.size as f64)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let size = fmt_count(largest.size as f64);
    latency::judge(
        report,
        (
            &format!(
                "Windowed query through the socket, p99 at {size} IPs in the windows (worst kind)"
            ),
            &largest.socket,
        ),
        (
            &format!("Windowed query in-process, p99 at {size} IPs (all windows, worst kind)"),
            &largest.inproc,
        ),
    );
    let (p99, kind, (first, last)) = OTHER_RANGES
        .iter()
        .zip(&largest.other_ranges)
        .map(|(&range, kinds)| {
            let (p99, kind) = latency::worst_p99(kinds);
            (p99, kind, range)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .expect("ranges");
    report.target(
        &format!("Windowed query in-process over part of the windows, p99 at {size} IPs (worst range and kind)"),
        format!("{} (windows {first}–{last}, {kind})", fmt_ns(p99)),
        p99,
        "≤ 2 µs",
        p99 <= 2_000.0,
    );
}

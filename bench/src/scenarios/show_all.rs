//! `show all` (Momentum's console CSV of every tracked IP) at 1M tracked IPs:
//! the time for a whole dump through the socket, and how long it makes
//! other clients wait: the latency of a concurrent query client during the
//! dump beside the same client with the agent otherwise idle, in one run,
//! rounds interleaved; and, in-process on the agent's own state types, the
//! time of each chunk (the most any one lock is held, plus its formatting).
//!
//! The sessions are synthetic and pre-filled through the kernel as in
//! `sizes`; a monitor "300,6" carries receptions for every tenth IP (reported
//! with `add` before the measurement), so rows have windows to look up.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use inbound_audit::{
    config::Config,
    counting::state::{SharedState, Tally},
    domain::{Series, ServicePorts},
    serving::{
        client::{query_stream, StreamEnd},
        show_all::{Dump, CHUNK_IPS},
    },
};
use inbound_bench::{
    stats::{median, Percentiles},
    synthetic::{session_count_request, QueryKind, SyntheticSet},
};
use ipnet::IpNet;
use serde_json::json;

use crate::{
    agent::{BenchAgent, QueryClient},
    env, kernel,
    report::{fmt_count, fmt_ns, fmt_size, Report, Section},
    Ctx,
};

const SERVICE: &str = "SMTP";
const MONITOR: &str = "300,6";
/// Every this many IPs has receptions in the monitor's current window.
const RECEPTIONS_EVERY: usize = 10;

struct Plan {
    size: usize,
    rounds: usize,
    /// How long the idle phase of a round queries.
    idle: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                size: 20_000,
                rounds: 2,
                idle: Duration::from_millis(300),
            }
        } else {
            Self {
                size: 1_000_000,
                rounds: 5,
                idle: Duration::from_secs(2),
            }
        }
    }
}

/// One query stream's latencies, by kind of request.
#[derive(Default)]
struct Latencies {
    sessions: Vec<f64>,
    windowed: Vec<f64>,
}

impl Latencies {
    fn extend(&mut self, other: Latencies) {
        self.sessions.extend(other.sessions);
        self.windowed.extend(other.windowed);
    }
}

/// Alternating `msys.audit.inbound_session_count` (the sessions' read lock)
/// and `msys.audit.receptions` (the monitors' lock) until `stop`, one at a time.
fn query_until(
    client: &mut QueryClient,
    requests: &[(bool, Vec<u8>)],
    stop: impl Fn() -> bool,
) -> Result<Latencies> {
    let mut out = Latencies::default();
    let mut i = 0;
    while !stop() {
        let (windowed, request) = &requests[i % requests.len()];
        let started = Instant::now();
        client.count(request)?;
        let ns = started.elapsed().as_nanos() as f64;
        if *windowed {
            out.windowed.push(ns);
        } else {
            out.sessions.push(ns);
        }
        i += 1;
    }
    Ok(out)
}

struct DumpRun {
    secs: f64,
    rows: u64,
    bytes: u64,
}

/// One whole `show all` through the socket, as `inbound-audit show all` reads it.
fn dump_once(socket: &std::path::Path) -> Result<DumpRun> {
    let started = Instant::now();
    let mut bytes = 0u64;
    let end = query_stream(socket, "show all", |line| {
        bytes += line.len() as u64 + 1;
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    match end {
        StreamEnd::Complete { rows } => Ok(DumpRun { secs, rows, bytes }),
        other => bail!("show all did not complete: {other:?}"),
    }
}

/// Chunk sizes compared in-process (the agent uses [`CHUNK_IPS`]).
const CHUNK_SIZES: [usize; 4] = [512, 1024, 2048, 4096];

/// One in-process dump at one chunk size.
struct InprocRun {
    chunk_ips: usize,
    secs: f64,
    rows: u64,
    /// Per chunk, ns: the sessions' read lock held, the monitors' lock held,
    /// the whole chunk (both plus formatting).
    sessions_hold: Vec<f64>,
    monitors_hold: Vec<f64>,
    chunk: Vec<f64>,
}

/// In-process, on the agent's types: whole dumps at each chunk size, every
/// chunk's lock holds timed by `Dump` itself.
fn inproc_runs(set: &SyntheticSet, rounds: usize) -> Result<Vec<InprocRun>> {
    let config = Config {
        services: vec![ServicePorts {
            name: SERVICE.into(),
            ports: vec![25],
        }],
        monitors: vec![MONITOR.parse()?],
        max_tracked_ips_per_monitor: usize::MAX,
        ..Config::default()
    };
    let state = SharedState::new(config, HashMap::from([(SERVICE.to_string(), 0u8)]));
    let tally: Tally = set.iter().map(|ip| ((0u8, ip), 1)).collect();
    state.write_sessions().load(&tally);
    let now = inbound_audit::domain::unix_now();
    {
        let mut monitors = state.lock_monitors();
        for ip in set.iter().step_by(RECEPTIONS_EVERY) {
            monitors.record(Series::Receptions, ip, 3, now);
        }
    }
    let mut runs: Vec<InprocRun> = CHUNK_SIZES
        .iter()
        .map(|&chunk_ips| InprocRun {
            chunk_ips,
            secs: 0.0,
            rows: 0,
            sessions_hold: Vec::new(),
            monitors_hold: Vec::new(),
            chunk: Vec::new(),
        })
        .collect();
    let mut secs: Vec<Vec<f64>> = vec![Vec::new(); CHUNK_SIZES.len()];
    // Sizes interleaved round by round, as everywhere in the bench.
    for _ in 0..rounds {
        for (run, secs) in runs.iter_mut().zip(&mut secs) {
            let mut dump = Dump::new(&state);
            let mut out = String::new();
            let started = Instant::now();
            loop {
                out.clear();
                let chunk = Instant::now();
                let more = dump.next_chunk(&state, now, run.chunk_ips, &mut out)?;
                run.chunk.push(chunk.elapsed().as_nanos() as f64);
                let (sessions, monitors) = dump.last_holds();
                run.sessions_hold.push(sessions.as_nanos() as f64);
                run.monitors_hold.push(monitors.as_nanos() as f64);
                if !more {
                    break;
                }
            }
            secs.push(started.elapsed().as_secs_f64());
            run.rows = dump.rows();
        }
    }
    for (run, secs) in runs.iter_mut().zip(&secs) {
        run.secs = median(secs);
    }
    Ok(runs)
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let plan = Plan::new(ctx.quick);
    let port = env::free_port(&[])?;
    let service = ServicePorts {
        name: SERVICE.into(),
        ports: vec![port],
    };
    let set = SyntheticSet::generate(plan.size);

    println!(
        "[show_all] in-process: whole dumps of {} IPs at chunk sizes {CHUNK_SIZES:?}",
        fmt_size(plan.size)
    );
    let inproc = inproc_runs(&set, plan.rounds.min(3))?;
    if let Some(run) = inproc.iter().find(|r| r.rows != plan.size as u64) {
        bail!("in-process dump: {} rows for {} IPs", run.rows, plan.size);
    }

    println!(
        "[show_all] {}: pre-filling the kernel maps",
        fmt_size(plan.size)
    );
    let mut agent = BenchAgent::new(
        &ctx.agent_binary,
        "show-all",
        ctx.cgroup.path(),
        &[format!("{SERVICE}={port}")],
    )?;
    agent.add_args(&["--monitor", MONITOR]);
    kernel::prefill(&agent.pin_dir, ctx.cgroup.path(), &service, &set)?;
    agent.start()?;
    agent.wait_quiet(Duration::from_millis(2500))?;
    let tracked = agent.stat_u64("tracked_ips")?;
    if tracked != plan.size as u64 {
        bail!("the agent tracks {tracked} IPs, expected {}", plan.size);
    }
    {
        let mut client = agent.client()?;
        for ip in set.iter().step_by(RECEPTIONS_EVERY) {
            client.count(format!("add receptions {ip} 3\n").as_bytes())?;
        }
    }

    // A mix of prefix lengths and both lock paths, pre-built.
    let requests: Arc<Vec<(bool, Vec<u8>)>> = Arc::new(
        QueryKind::ALL
            .iter()
            .flat_map(|&kind| set.queries(kind, 256, 11))
            .enumerate()
            .map(|(i, net): (usize, IpNet)| {
                if i % 2 == 0 {
                    (
                        false,
                        (session_count_request(&net, SERVICE) + "\n").into_bytes(),
                    )
                } else {
                    (
                        true,
                        format!("msys.audit.receptions(\"{MONITOR}\", {{cidr=\"{net}\"}})\n")
                            .into_bytes(),
                    )
                }
            })
            .collect(),
    );

    let mut idle = Latencies::default();
    let mut during = Latencies::default();
    let mut dumps = Vec::new();
    let mut client = agent.client()?;
    for round in 0..plan.rounds {
        println!("[show_all] round {}/{}", round + 1, plan.rounds);
        // Alternate which phase goes first, so a drift in machine load hits both.
        for phase in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            if phase == 0 {
                let until = Instant::now() + plan.idle;
                idle.extend(query_until(&mut client, &requests, || {
                    Instant::now() >= until
                })?);
                continue;
            }
            let done = Arc::new(AtomicBool::new(false));
            let socket = agent.socket.clone();
            let flag = done.clone();
            let reader = std::thread::spawn(move || {
                let run = dump_once(&socket);
                flag.store(true, Ordering::Relaxed);
                run
            });
            during.extend(query_until(&mut client, &requests, || {
                done.load(Ordering::Relaxed)
            })?);
            let run = reader.join().expect("dump thread")?;
            if run.rows != plan.size as u64 {
                bail!("show all gave {} rows for {} IPs", run.rows, plan.size);
            }
            dumps.push(run);
        }
    }
    drop(client);
    agent.stop()?;

    report_results(report, &plan, &dumps, &idle, &during, &inproc);
    Ok(())
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn report_results(
    report: &mut Report,
    plan: &Plan,
    dumps: &[DumpRun],
    idle: &Latencies,
    during: &Latencies,
    inproc: &[InprocRun],
) {
    let secs: Vec<f64> = dumps.iter().map(|d| d.secs).collect();
    let dump_secs = median(&secs);
    let bytes = dumps.first().map_or(0, |d| d.bytes);
    let mut rows = vec![vec![
        format!("whole `show all`, {} rows", fmt_count(plan.size as f64)),
        format!("{dump_secs:.2} s median"),
        format!(
            "{:.2}–{:.2} s over {} dumps",
            secs.iter().copied().fold(f64::INFINITY, f64::min),
            max(&secs),
            secs.len()
        ),
        format!(
            "{:.0} MB, {} rows/s",
            bytes as f64 / 1e6,
            fmt_count(plan.size as f64 / dump_secs)
        ),
    ]];
    for run in inproc {
        let (sessions, monitors) = (
            Percentiles::of(&run.sessions_hold),
            Percentiles::of(&run.monitors_hold),
        );
        rows.push(vec![
            format!(
                "in-process, chunks of {} IPs{}: whole dump {:.2} s",
                run.chunk_ips,
                if run.chunk_ips == CHUNK_IPS {
                    " (the agent's)"
                } else {
                    ""
                },
                run.secs
            ),
            format!(
                "holds p50: sessions {} / monitors {}",
                fmt_ns(sessions.p50),
                fmt_ns(monitors.p50)
            ),
            format!("p99: {} / {}", fmt_ns(sessions.p99), fmt_ns(monitors.p99)),
            format!(
                "max {} / {}; chunk with formatting max {}",
                fmt_ns(max(&run.sessions_hold)),
                fmt_ns(max(&run.monitors_hold)),
                fmt_ns(max(&run.chunk))
            ),
        ]);
    }
    let mut data = json!({
        "ips": plan.size,
        "chunk_ips": CHUNK_IPS,
        "dump_secs": secs,
        "dump_bytes": bytes,
        "inproc": inproc.iter().map(|r| json!({
            "chunk_ips": r.chunk_ips,
            "dump_secs": r.secs,
            "sessions_hold_ns": {"p50": Percentiles::of(&r.sessions_hold).p50, "p99": Percentiles::of(&r.sessions_hold).p99, "max": max(&r.sessions_hold)},
            "monitors_hold_ns": {"p50": Percentiles::of(&r.monitors_hold).p50, "p99": Percentiles::of(&r.monitors_hold).p99, "max": max(&r.monitors_hold)},
            "chunk_ns_max": max(&r.chunk),
        })).collect::<Vec<_>>(),
    });
    for (label, slug, a, b) in [
        (
            "inbound_session_count",
            "sessions",
            &idle.sessions,
            &during.sessions,
        ),
        (
            "msys.audit.receptions",
            "windowed",
            &idle.windowed,
            &during.windowed,
        ),
    ] {
        let (pa, pb) = (Percentiles::of(a), Percentiles::of(b));
        for (when, p, values) in [("idle", pa, a), ("during the dump", pb, b)] {
            rows.push(vec![
                format!("{label}, {when}"),
                format!("p50 {}", fmt_ns(p.p50)),
                format!("p99 {} / p99.9 {}", fmt_ns(p.p99), fmt_ns(p.p999)),
                format!("max {} over {} queries", fmt_ns(max(values)), p.samples),
            ]);
        }
        data[slug] = json!({
            "idle": {"p50": pa.p50, "p99": pa.p99, "p999": pa.p999, "max": max(a), "samples": pa.samples},
            "during": {"p50": pb.p50, "p99": pb.p99, "p999": pb.p999, "max": max(b), "samples": pb.samples},
        });
    }
    report.sections.push(Section {
        title: format!("show all at {} tracked IPs", fmt_size(plan.size)),
        method: format!(
            "{} synthetic sessions (80 % IPv4, 20 % IPv6) pre-filled through the kernel as in \
             the sizes measurement; monitor \"{MONITOR}\" with receptions for every \
             {RECEPTIONS_EVERY}th IP (reported with `add`), so each row looks up {} windows \
             and one service. A whole dump: `show all` on the socket read to its `END` line \
             by the CLI's own client (`query_stream`). Blocking: one persistent client \
             alternating `msys.audit.inbound_session_count` (the sessions' read lock) and \
             `msys.audit.receptions` (the monitors' lock) over prefixes of tracked IPs, one \
             at a time, while a dump runs and, in the same round, with the agent otherwise \
             idle; {} rounds, the order of the two phases alternating; percentiles pool the \
             rounds. In-process: whole dumps with `Dump::next_chunk` on the agent's \
             `SharedState` holding the same data, at several chunk sizes, interleaved, each \
             chunk's two lock holds timed by `Dump` itself (`last_holds`): the longest any \
             other query waits behind one chunk.",
            fmt_count(plan.size as f64),
            3 * 7,
            plan.rounds
        ),
        columns: vec![
            "what".into(),
            "typical".into(),
            "tail".into(),
            "worst / size".into(),
        ],
        rows,
        data,
    });
    let during_p99 = Percentiles::of(&during.windowed)
        .p99
        .max(Percentiles::of(&during.sessions).p99);
    let agent_run = inproc.iter().find(|r| r.chunk_ips == CHUNK_IPS);
    let longest_hold = agent_run.map_or(0.0, |r| max(&r.sessions_hold).max(max(&r.monitors_hold)));
    report.note(format!(
        "show all: whole dump {dump_secs:.2} s at {} IPs; concurrent query p99 {} during it \
         (idle {}); longest lock hold of a chunk of {CHUNK_IPS} IPs {}",
        fmt_count(plan.size as f64),
        fmt_ns(during_p99),
        fmt_ns(
            Percentiles::of(&idle.windowed)
                .p99
                .max(Percentiles::of(&idle.sessions).p99)
        ),
        fmt_ns(longest_hold)
    ));
}

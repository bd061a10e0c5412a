//! Issue 14's figures at 1M tracked IPs: one `/metrics` scrape, one call of
//! each `show count for ...` request `inbound-audit top` sends, and the query
//! p99 of another socket client while scrapes run back to back, while `top`
//! refreshes once a second, and while `top`'s requests run back to back, each
//! side by side with the same client against the idle agent in the same round.
//!
//! The agent holds 1M synthetic sessions (pre-filled through the kernel's sync
//! path, as in `sizes`) and the same 1M IPs as connections in the windows of
//! an hourly monitor (a quarter per window, as in `windows`), so `top`'s
//! monitored columns read a full monitor. Real connections open and close on
//! the watched port at about 200 a second during every phase, so the agent
//! applies events (taking the sessions write lock and the monitors' lock)
//! while readers hold them: a reader that held a lock for long would stall
//! the writer, and every query queued behind it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use inbound_audit::domain::ServicePorts;
use inbound_bench::{
    stats::{median, Percentiles},
    synthetic::{session_count_request, QueryKind, SyntheticSet},
};
use serde_json::json;

use crate::{
    agent::{BenchAgent, QueryClient},
    env, kernel,
    net::ServerProcess,
    report::{fmt_count, fmt_ms, fmt_ns, fmt_size, Report, Section},
    scenarios::windows,
    Ctx,
};

const SERVICE: &str = "SMTP";
/// Rows per family, `top`'s default.
const LIMIT: usize = 15;

struct Plan {
    size: usize,
    scrapes: usize,
    calls: usize,
    rounds: usize,
    phase: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                size: 10_000,
                scrapes: 5,
                calls: 2,
                rounds: 1,
                phase: Duration::from_millis(1500),
            }
        } else {
            Self {
                size: 1_000_000,
                scrapes: 30,
                calls: 5,
                rounds: 3,
                phase: Duration::from_secs(5),
            }
        }
    }
}

/// One of `top`'s requests: the view (/24 and /64, or /32 and /48), the
/// family, and the column it sorts by (the agent orders by the first series).
#[derive(Clone, Copy)]
struct TopCall {
    label: &'static str,
    cidr: &'static str,
    size: u8,
    by_connections: bool,
}

const TOP_CALLS: [TopCall; 8] = [
    TopCall {
        label: "v4 /24, by sessions",
        cidr: "0.0.0.0/0",
        size: 24,
        by_connections: false,
    },
    TopCall {
        label: "v6 /64, by sessions",
        cidr: "::/0",
        size: 64,
        by_connections: false,
    },
    TopCall {
        label: "v4 /32, by sessions",
        cidr: "0.0.0.0/0",
        size: 32,
        by_connections: false,
    },
    TopCall {
        label: "v6 /48, by sessions",
        cidr: "::/0",
        size: 48,
        by_connections: false,
    },
    TopCall {
        label: "v4 /24, by connections",
        cidr: "0.0.0.0/0",
        size: 24,
        by_connections: true,
    },
    TopCall {
        label: "v6 /64, by connections",
        cidr: "::/0",
        size: 64,
        by_connections: true,
    },
    TopCall {
        label: "v4 /32, by connections",
        cidr: "0.0.0.0/0",
        size: 32,
        by_connections: true,
    },
    TopCall {
        label: "v6 /48, by connections",
        cidr: "::/0",
        size: 48,
        by_connections: true,
    },
];

impl TopCall {
    /// The request line, as `inbound-audit top` writes it.
    fn request(&self) -> String {
        let sessions = format!("sessions.{SERVICE}");
        let monitored = ["connections.0@0", "receptions.0@0", "rejections.0@0"];
        let series = if self.by_connections {
            vec![monitored[0], &sessions, monitored[1], monitored[2]]
        } else {
            vec![&sessions, monitored[0], monitored[1], monitored[2]]
        };
        format!(
            "show count for {} in {} cidrsize {} order by count limit {LIMIT}\n",
            self.cidr,
            series.join(", "),
            self.size
        )
    }
}

/// A persistent connection for multi-line answers (`OK <n>` then n lines).
struct ReportClient {
    reader: BufReader<UnixStream>,
    line: String,
}

impl ReportClient {
    fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            reader: BufReader::new(stream),
            line: String::new(),
        })
    }

    /// The rows of the answer to `request` (ending in LF).
    fn ask(&mut self, request: &str) -> Result<Vec<String>> {
        self.reader.get_mut().write_all(request.as_bytes())?;
        self.line.clear();
        self.reader.read_line(&mut self.line)?;
        let n: usize = self
            .line
            .trim_end()
            .strip_prefix("OK ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("{}: answered {:?}", request.trim_end(), self.line))?;
        let mut rows = Vec::with_capacity(n);
        for _ in 0..n {
            self.line.clear();
            self.reader.read_line(&mut self.line)?;
            rows.push(self.line.trim_end().to_string());
        }
        Ok(rows)
    }
}

/// One `GET /metrics` on a fresh connection, read to the end; the body.
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("the scrape answered {head:?}");
    }
    Ok(body.to_string())
}

/// What runs beside the measured client in a phase.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Idle,
    /// `GET /metrics` ten times a second (Prometheus' default is once in 15 s).
    ScrapesTenPerSecond,
    /// `GET /metrics` back to back: one of the two cores scraping.
    ScrapesBackToBack,
    /// A whole `top` refresh (the /24 and /64 view, then the /32 and /48
    /// view, alternately) once a second, as `top` does.
    TopEverySecond,
    /// `top`'s refreshes back to back.
    TopBackToBack,
}

impl Load {
    const ALL: [Load; 5] = [
        Load::Idle,
        Load::ScrapesTenPerSecond,
        Load::ScrapesBackToBack,
        Load::TopEverySecond,
        Load::TopBackToBack,
    ];

    fn label(self) -> &'static str {
        match self {
            Load::Idle => "idle",
            Load::ScrapesTenPerSecond => "scrapes ten times a second",
            Load::ScrapesBackToBack => "scrapes back to back",
            Load::TopEverySecond => "top refreshing every second",
            Load::TopBackToBack => "top's requests back to back",
        }
    }
}

/// One `top` refresh: `show available`, then the view's two requests.
fn top_refresh(client: &mut ReportClient, hosts: bool) -> Result<()> {
    client.ask("show available\n")?;
    let (v4, v6) = if hosts { (32, 48) } else { (24, 64) };
    for call in TOP_CALLS
        .iter()
        .filter(|c| !c.by_connections && (c.size == v4 || c.size == v6))
    {
        client.ask(&call.request())?;
    }
    Ok(())
}

/// Runs `load` in a thread until the returned stop flag is set; the thread
/// returns how many scrapes or refreshes it made.
fn start_load(
    load: Load,
    socket: &Path,
    metrics: SocketAddr,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<Result<u64>>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mut client = ReportClient::connect(socket)?;
    let handle = std::thread::spawn(move || -> Result<u64> {
        let mut n = 0u64;
        while !flag.load(Ordering::Relaxed) {
            match load {
                Load::Idle => std::thread::sleep(Duration::from_millis(20)),
                Load::ScrapesTenPerSecond => {
                    let started = Instant::now();
                    scrape(metrics)?;
                    n += 1;
                    while started.elapsed() < Duration::from_millis(100)
                        && !flag.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Load::ScrapesBackToBack => {
                    scrape(metrics)?;
                    n += 1;
                }
                Load::TopEverySecond => {
                    let started = Instant::now();
                    top_refresh(&mut client, n % 2 == 1)?;
                    n += 1;
                    while started.elapsed() < Duration::from_secs(1)
                        && !flag.load(Ordering::Relaxed)
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                Load::TopBackToBack => {
                    top_refresh(&mut client, n % 2 == 1)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    });
    Ok((stop, handle))
}

/// The measured client: for `duration`, closed loop, alternately a session
/// count (/24 of a tracked IP) and a windowed count (every window, /24), the
/// two locks `top` and a scrape read.
fn client_phase(
    client: &mut QueryClient,
    requests: &[Vec<u8>],
    duration: Duration,
) -> Result<Vec<f64>> {
    for request in requests.iter().take(200) {
        client.count(request)?;
    }
    let mut samples = Vec::with_capacity(200_000);
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < duration {
        let request = &requests[i % requests.len()];
        let t = Instant::now();
        client.count(request)?;
        samples.push(t.elapsed().as_nanos() as f64);
        i += 1;
    }
    Ok(samples)
}

/// Connects to and closes from the watched port, about 200 a second, until
/// stopped: the event path runs during every phase alike.
fn start_churn(server: SocketAddr) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut n = 0u64;
        while !flag.load(Ordering::Relaxed) {
            if TcpStream::connect(server).is_ok() {
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        n
    });
    (stop, handle)
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let plan = Plan::new(ctx.quick);
    let port = env::free_port(&[])?;
    let metrics_port = env::free_port(&[port])?;
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let service = ServicePorts {
        name: SERVICE.into(),
        ports: vec![port],
    };
    let set = SyntheticSet::generate(plan.size);
    let now = inbound_audit::domain::unix_now();
    let mut agent = BenchAgent::new(
        &ctx.agent_binary,
        "metrics",
        ctx.cgroup.path(),
        &[format!("{SERVICE}={port}")],
    )?;
    agent.add_args(&[
        "--monitor",
        windows::MONITOR,
        "--metrics-listen",
        &metrics.to_string(),
    ]);
    let state_dir = agent.state_dir();
    std::fs::create_dir_all(&state_dir)?;
    windows::fill(&set, now)
        .save(&state_dir.join("monitors.state"))
        .context("saving the monitor state")?;
    println!(
        "[metrics] {}: pre-filling the kernel maps",
        fmt_size(plan.size)
    );
    kernel::prefill(&agent.pin_dir, ctx.cgroup.path(), &service, &set)?;
    let started = agent.start()?;
    agent.wait_quiet(Duration::from_millis(2500))?;
    println!(
        "[metrics] agent answering after {:.1} s",
        started.as_secs_f64()
    );
    let tracked = agent.stat_u64("tracked_ips")?;
    if tracked != plan.size as u64 {
        bail!("the agent tracks {tracked} IPs, expected {}", plan.size);
    }
    let mut server = ServerProcess::start(&ctx.cgroup, &[port])?;
    let (churn_stop, churn) = start_churn(SocketAddr::from(([127, 0, 0, 1], port)));

    let body = scrape(metrics)?;
    if !body.contains(&format!("inbound_audit_tracked_ips {}", plan.size))
        && !body.contains(&format!("inbound_audit_tracked_ips {}", plan.size + 1))
    {
        bail!("the scrape does not show {} tracked IPs", plan.size);
    }
    println!("[metrics] scrapes");
    let mut scrape_ns = Vec::new();
    let mut scrape_bytes = 0;
    for _ in 0..plan.scrapes {
        let t = Instant::now();
        scrape_bytes = scrape(metrics)?.len();
        scrape_ns.push(t.elapsed().as_nanos() as f64);
    }

    println!("[metrics] top's requests, one at a time");
    let mut top_client = ReportClient::connect(&agent.socket)?;
    let mut call_ns: Vec<Vec<f64>> = vec![Vec::new(); TOP_CALLS.len()];
    for _ in 0..plan.calls {
        for (i, call) in TOP_CALLS.iter().enumerate() {
            let t = Instant::now();
            let rows = top_client.ask(&call.request())?;
            call_ns[i].push(t.elapsed().as_nanos() as f64);
            if rows.is_empty() {
                bail!("{}: no rows", call.request().trim_end());
            }
        }
    }

    let requests: Vec<Vec<u8>> = set
        .queries(QueryKind::V4Slash24, 512, 5)
        .iter()
        .flat_map(|net| {
            [
                (session_count_request(net, SERVICE) + "\n").into_bytes(),
                format!(
                    "msys.audit.connections(\"{}\", {{startv=0, endv={}, cidr=\"{net}\"}})\n",
                    windows::MONITOR,
                    windows::FILLED_WINDOWS
                )
                .into_bytes(),
            ]
        })
        .collect();
    let mut client = agent.client()?;
    // Per load: each round's samples.
    let mut phases: Vec<Vec<Vec<f64>>> = vec![Vec::new(); Load::ALL.len()];
    let mut background = vec![0u64; Load::ALL.len()];
    for round in 0..plan.rounds {
        for (i, &load) in Load::ALL.iter().enumerate() {
            let (stop, handle) = start_load(load, &agent.socket, metrics)?;
            let samples = client_phase(&mut client, &requests, plan.phase)?;
            stop.store(true, Ordering::Relaxed);
            background[i] += handle.join().expect("load thread")?;
            println!(
                "  round {}: {}: p99 {}",
                round + 1,
                load.label(),
                fmt_ns(Percentiles::of(&samples).p99)
            );
            phases[i].push(samples);
        }
    }
    churn_stop.store(true, Ordering::Relaxed);
    let churned = churn.join().expect("churn thread");
    let (accepted, _) = server.stats()?;
    drop(server);
    agent.stop()?;

    // Scrape.
    let scrape = Percentiles::of(&scrape_ns);
    report.sections.push(Section {
        title: format!(
            "Prometheus scrape and `top` at {} tracked IPs",
            fmt_size(plan.size)
        ),
        method: format!(
            "One agent with {} synthetic sessions (pre-filled through the kernel's sync path, \
             as in the sizes measurement) and the same IPs as connections in the windows of \
             monitor \"{}\" (a quarter per hourly window), with `--metrics-listen`; real \
             connections opened and closed on the watched port at about 200 a second \
             throughout ({} in all), so events are applied while readers hold the locks. \
             Scrape: `GET /metrics` on a fresh TCP connection, read to the end ({} scrapes, \
             {} bytes each). `top`'s requests: the line `inbound-audit top` sends for each \
             view, family and sort column (sessions of SMTP and the monitor's connections, \
             receptions and rejections in window 0, `order by count limit {LIMIT}`), timed \
             through the socket, {} calls each. Other clients: one persistent client \
             alternating `inbound_session_count` and `msys.audit.connections` (every window) \
             on /24s of tracked IPs, closed loop for {:.1} s per phase, the phases (idle, \
             scrapes ten times a second, scrapes back to back, a whole `top` refresh every \
             second alternating its two views, `top` refreshes back to back) interleaved \
             over {} rounds; the ratio is the median over rounds of (p99 under load ÷ p99 \
             idle in the same round). The back-to-back loads keep one of the machine's two \
             cores busy with the scraper or `top` and the agent's answers to it, so they \
             measure the CPU left to the client as much as any lock; they are shown, not \
             judged.",
            fmt_count(plan.size as f64),
            windows::MONITOR,
            fmt_count(churned as f64),
            plan.scrapes,
            fmt_count(scrape_bytes as f64),
            plan.calls,
            plan.phase.as_secs_f64(),
            plan.rounds,
        ),
        columns: ["what", "median", "p99 / worst", "calls"]
            .map(String::from)
            .to_vec(),
        rows: std::iter::once(vec![
            "GET /metrics".to_string(),
            fmt_ms(scrape.p50),
            fmt_ms(scrape.p99),
            plan.scrapes.to_string(),
        ])
        .chain(TOP_CALLS.iter().zip(&call_ns).map(|(call, ns)| {
            vec![
                format!("`top` request: {}", call.label),
                fmt_ms(median(ns)),
                fmt_ms(Percentiles::of(ns).p99),
                ns.len().to_string(),
            ]
        }))
        .collect(),
        data: json!({
            "scrape_ns": scrape_ns,
            "top_calls": TOP_CALLS.iter().zip(&call_ns).map(|(c, ns)| json!({
                "call": c.label, "request": c.request().trim_end(), "ns": ns,
            })).collect::<Vec<_>>(),
            "connections_churned": churned,
            "server_accepted": accepted,
        }),
    });
    let at = fmt_size(plan.size);
    report.target(
        &format!("One /metrics scrape at {at} tracked IPs (median)"),
        format!("{} (p99 {})", fmt_ms(scrape.p50), fmt_ms(scrape.p99)),
        scrape.p50,
        "≤ 100 ms",
        scrape.p50 <= 100e6,
    );
    let (worst, worst_ns) = TOP_CALLS
        .iter()
        .zip(&call_ns)
        .map(|(c, ns)| (c, median(ns)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("calls");
    report.target(
        &format!("One `top` request at {at} tracked IPs (median, worst kind)"),
        format!("{} ({})", fmt_ms(worst_ns), worst.label),
        worst_ns,
        "≤ 250 ms (a refresh, two requests, within half of top's second)",
        worst_ns <= 250e6,
    );

    // Other clients under load.
    let idle_p99: Vec<f64> = phases[0].iter().map(|r| Percentiles::of(r).p99).collect();
    let mut rows = Vec::new();
    let mut data = Vec::new();
    for (i, &load) in Load::ALL.iter().enumerate() {
        let pooled: Vec<f64> = phases[i].iter().flatten().copied().collect();
        let p = Percentiles::of(&pooled);
        let ratios: Vec<f64> = phases[i]
            .iter()
            .zip(&idle_p99)
            .map(|(r, idle)| Percentiles::of(r).p99 / idle)
            .collect();
        let ratio = median(&ratios);
        rows.push(vec![
            load.label().to_string(),
            fmt_ns(p.p50),
            fmt_ns(p.p99),
            fmt_ns(p.p999),
            format!("{:.2}×", ratio),
            fmt_count(p.samples as f64),
            fmt_count(background[i] as f64),
        ]);
        data.push(json!({
            "load": load.label(), "percentiles_ns": p, "p99_ratio_per_round": ratios,
            "background_operations": background[i],
        }));
        let idle = Percentiles::of(&phases[0].iter().flatten().copied().collect::<Vec<_>>());
        let name = match load {
            Load::ScrapesTenPerSecond => format!(
                "Query p99 at {at} tracked IPs while /metrics is scraped ten times a second vs idle (median of rounds)"
            ),
            Load::TopEverySecond => format!(
                "Query p99 at {at} tracked IPs while `top` refreshes every second vs idle (median of rounds)"
            ),
            // The back-to-back loads keep one of the two cores busy: they
            // show the machine's share of CPU more than any lock, so they
            // are reported in the table, not judged.
            Load::Idle | Load::ScrapesBackToBack | Load::TopBackToBack => continue,
        };
        report.target(
            &name,
            format!("{ratio:.2}× ({} vs {})", fmt_ns(p.p99), fmt_ns(idle.p99)),
            ratio,
            "≤ 2×",
            ratio <= 2.0,
        );
    }
    report.sections.push(Section {
        title: format!(
            "Other clients' queries during scrapes and `top` ({} tracked IPs)",
            fmt_size(plan.size)
        ),
        method: "See the section above. Background operations: scrapes or `top` refreshes made \
                 during the phases."
            .into(),
        columns: [
            "beside the client",
            "p50",
            "p99",
            "p999",
            "p99 ÷ idle (median of rounds)",
            "queries",
            "background operations",
        ]
        .map(String::from)
        .to_vec(),
        rows,
        data: json!(data),
    });
    Ok(())
}

//! Measurement 3: what a user has today, on the same live connections.
//!
//! 24,000 real established loopback connections from 6,000 sources in
//! 127.10.0.0/16 (4 each) to two server ports (two server processes and two
//! holder processes: the fd limit is 20,000 per process). For the same CIDR:
//! `ss -Htn state established` with a kernel-side (bytecode) filter, a
//! sock_diag dump from Rust that counts in user space, and our answer through
//! the socket. All answers must agree; each round measures all of them back
//! to back, and the ratio is taken per round.

use std::{net::SocketAddr, process::Command, time::Instant};

use anyhow::{bail, Context, Result};
use inbound_audit::kernel::{
    seed::normalize,
    sock_diag::{self, tcp_state},
};
use inbound_bench::stats::{median, quantile};
use ipnet::IpNet;
use serde_json::json;

use crate::{
    agent::{BenchAgent, QueryClient},
    env,
    net::{HoldProcess, ServerProcess},
    report::{fmt_count, fmt_ms, fmt_ns, Report, Section},
    Ctx,
};

const PER_IP: usize = 4;

#[derive(Default, Clone)]
struct Method {
    times_ns: Vec<f64>,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let (connections, rounds) = if ctx.quick { (2_000, 5) } else { (24_000, 25) };
    let p1 = env::free_port(&[])?;
    let p2 = env::free_port(&[p1])?;
    let ports = [p1, p2];
    let _server1 = ServerProcess::start(&ctx.cgroup, &[p1])?;
    let _server2 = ServerProcess::start(&ctx.cgroup, &[p2])?;
    let mut agent = BenchAgent::new(
        &ctx.agent_binary,
        "alternatives",
        ctx.cgroup.path(),
        &[format!("SMTP={p1},{p2}")],
    )?;
    agent.start()?;
    agent.wait_quiet(std::time::Duration::from_millis(2500))?;

    println!("[alternatives] opening {connections} connections");
    let opened = Instant::now();
    let half = connections / 2;
    let _holders = [
        HoldProcess::start(SocketAddr::from(([127, 0, 0, 1], p1)), 0, half, PER_IP)?,
        HoldProcess::start(SocketAddr::from(([127, 0, 0, 1], p2)), half, half, PER_IP)?,
    ];
    let all: IpNet = "127.10.0.0/16".parse()?;
    let mut client = agent.client()?;
    let request = |net: &IpNet| format!("msys.audit.inbound_session_count(\"{net}\", \"SMTP\")\n");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let seen = client.count(request(&all).as_bytes())?;
        if seen == connections as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent counts {seen} of {connections} connections after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!(
        "[alternatives] {} connections established and counted in {:.1} s",
        connections,
        opened.elapsed().as_secs_f64()
    );

    // A /24 (1,000 connections from 250 sources) and the whole /16, first with
    // every process where the scheduler puts it, then all on one CPU: there a
    // reply wakes its reader without waking a halted vCPU (a VM exit on this
    // VM), which dominates our round trip but not ss's.
    let nets: [IpNet; 2] = ["127.10.3.0/24".parse()?, all];
    let one_cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let agent_pid = agent.pid().context("agent pid")?;
    let mut sections_rows = Vec::new();
    let mut data = Vec::new();
    let mut disagreements = 0usize;
    for placement in [Placement::Default, Placement::OneCpu] {
        let _pinned = match placement {
            Placement::Default => None,
            Placement::OneCpu => {
                env::pin_process(agent_pid, Some(one_cpu))?;
                Some(env::PinnedThread::to(one_cpu)?)
            }
        };
        // Started here so that, pinned, its thread inherits the CPU.
        let mut echo = Echo::start()?;
        for net in nets {
            let measured = measure(&mut client, &mut echo, &agent, &ports, &net, rounds, report)?;
            disagreements += measured.disagreements;
            for mut r in measured.rows() {
                r.insert(0, placement.label().to_string());
                sections_rows.push(r);
            }
            data.push(measured.json(placement.label()));
            if net.prefix_len() == 24 {
                let ratio = median(&measured.ratios_ss);
                let figure = format!(
                    "{}× (ss {}, ours {}; a bare socket round trip, {}, would show {}×)",
                    fmt_count(ratio),
                    fmt_ms(median(&measured.ss.times_ns)),
                    fmt_ns(median(&measured.ours.times_ns)),
                    fmt_ns(median(&measured.floor.times_ns)),
                    fmt_count(median(&measured.ratios_ss_floor)),
                );
                match placement {
                    Placement::OneCpu => report.target(
                        &format!(
                            "Faster than `ss` with a kernel filter, {} connections, {net}, all on one CPU",
                            fmt_count(connections as f64)
                        ),
                        figure,
                        ratio,
                        "≥ 1,000×",
                        ratio >= 1_000.0 && connections >= 20_000,
                    ),
                    Placement::Default => report.note(format!(
                        "`ss` ratio with default placement (not judged: our side is mostly the \
                         wakeup of a halted vCPU): {figure}"
                    )),
                }
            }
        }
        if placement == Placement::OneCpu {
            env::pin_process(agent_pid, None)?;
        }
    }
    report.target(
        "Answers of ss, sock_diag and inbound-audit agree",
        format!(
            "{disagreements} disagreements in {} comparisons",
            rounds * nets.len()
        ),
        disagreements as f64,
        "0",
        disagreements == 0,
    );
    report.sections.push(Section {
        title: format!(
            "The alternatives, on {} live connections",
            fmt_count(connections as f64)
        ),
        method: format!(
            "Placement: first every process where the scheduler puts it, then the agent, the \
             measuring client, ss and the sock_diag dump all pinned to one CPU (the judged \
             figure). {} real established loopback connections from {} sources in 127.10.0.0/16 ({} per \
             source, 250 sources per /24) to two ports of the watched service. `ss`: `ss -Htn \
             state established '( sport = :P1 or sport = :P2 ) and dst CIDR'` (compiled to \
             inet_diag bytecode and run in the kernel), lines counted, process start included \
             (that is what a user runs). sock_diag: one established-state netlink dump of both \
             families from Rust, counted in user space. Ours: one query on a persistent \
             connection (median of 20 in the round), and a fresh connection per query. \
             Ping-pong: the same request to a thread that answers at once over a Unix socket \
             pair (median of 20): what the VM charges any socket round trip. {rounds} \
             rounds, the methods' order rotating; ratios are per round (alternative ÷ ours), \
             shown as the median and the 1st percentile (the least favourable round).",
            fmt_count(connections as f64),
            fmt_count((connections / PER_IP) as f64),
            PER_IP,
        ),
        columns: [
            "placement",
            "CIDR",
            "answer",
            "method",
            "median",
            "p99",
            "ratio (median)",
            "ratio (p1)",
        ]
        .map(String::from)
        .to_vec(),
        rows: sections_rows,
        data: json!(data),
    });
    agent.stop()?;
    kernel_memory_note(&agent, connections, report)
}

/// The kernel memory the sessions cost: slab objects freed when the pinned
/// state goes (the socket storage of every session and the per-IP entries),
/// while the connections stay open. The SOCKETS hash and the ring buffer are
/// vmalloc memory, outside the slab figure; the sessions here have no record.
fn kernel_memory_note(agent: &BenchAgent, connections: usize, report: &mut Report) -> Result<()> {
    let before = env::slab_object_bytes()?;
    agent.cleanup_pins()?;
    // Socket storage and trie nodes are freed after an RCU grace period.
    let mut after = env::slab_object_bytes()?;
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let now = env::slab_object_bytes()?;
        let settled = now.abs_diff(after) < 64 * 1024;
        after = now;
        if settled {
            break;
        }
    }
    let per_session = before.saturating_sub(after) as f64 / connections as f64;
    println!("[alternatives] kernel slab memory per session: {per_session:.0} B");
    report.note(format!(
        "Kernel memory per accepted session: {per_session:.0} B of slab objects (socket storage \
         plus the per-IP trie entries of {} sources), freed when the pinned state was removed \
         with {} connections still open (/proc/slabinfo, active objects × size, before and \
         after).",
        fmt_count((connections / PER_IP) as f64),
        fmt_count(connections as f64)
    ));
    Ok(())
}

/// Median time of 20 queries on the persistent connection, and the answer.
fn ours_persistent(client: &mut QueryClient, request: &[u8]) -> Result<(f64, u64)> {
    let mut times = Vec::with_capacity(20);
    let mut answer = 0;
    for _ in 0..20 {
        let start = Instant::now();
        answer = client.count(request)?;
        times.push(start.elapsed().as_nanos() as f64);
    }
    Ok((median(&times), answer))
}

fn ours_oneshot(agent: &BenchAgent, request: &[u8]) -> Result<(f64, u64)> {
    let start = Instant::now();
    let mut client = agent.client()?;
    let answer = client.count(request)?;
    drop(client);
    Ok((start.elapsed().as_nanos() as f64, answer))
}

fn ss_filter(ports: &[u16], net: &IpNet) -> Result<(f64, u64)> {
    let sports: Vec<String> = ports.iter().map(|p| format!("sport = :{p}")).collect();
    let filter = format!("( {} ) and dst {net}", sports.join(" or "));
    let start = Instant::now();
    let output = Command::new("ss")
        .args(["-Htn", "state", "established", &filter])
        .output()
        .context("running ss")?;
    let elapsed = start.elapsed().as_nanos() as f64;
    if !output.status.success() {
        bail!("ss failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let lines = output.stdout.iter().filter(|&&b| b == b'\n').count();
    Ok((elapsed, lines as u64))
}

fn sock_diag_count(ports: &[u16], net: &IpNet) -> Result<(f64, u64)> {
    let start = Instant::now();
    let sockets = sock_diag::dump_tcp(sock_diag::state_mask(&[tcp_state::ESTABLISHED]))?;
    let count = sockets
        .iter()
        .filter(|s| ports.contains(&s.local.port()) && net.contains(&normalize(s.remote)))
        .count();
    Ok((start.elapsed().as_nanos() as f64, count as u64))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Placement {
    Default,
    OneCpu,
}

impl Placement {
    fn label(self) -> &'static str {
        match self {
            Placement::Default => "default",
            Placement::OneCpu => "one CPU",
        }
    }
}

/// Every method's times for one CIDR, and the per-round ratios.
struct Measured {
    net: IpNet,
    answer: u64,
    ours: Method,
    oneshot: Method,
    ss: Method,
    diag: Method,
    /// A bare Unix-socket ping-pong between two threads: no parsing, no lookup.
    floor: Method,
    ratios_ss: Vec<f64>,
    /// ss ÷ ping-pong per round: the best ratio any socket service could show.
    ratios_ss_floor: Vec<f64>,
    ratios_diag: Vec<f64>,
    disagreements: usize,
}

fn measure(
    client: &mut QueryClient,
    echo: &mut Echo,
    agent: &BenchAgent,
    ports: &[u16],
    net: &IpNet,
    rounds: usize,
    report: &mut Report,
) -> Result<Measured> {
    let mut m = Measured {
        net: *net,
        answer: 0,
        ours: Method::default(),
        oneshot: Method::default(),
        ss: Method::default(),
        diag: Method::default(),
        floor: Method::default(),
        ratios_ss: Vec::new(),
        ratios_ss_floor: Vec::new(),
        ratios_diag: Vec::new(),
        disagreements: 0,
    };
    let line = format!("msys.audit.inbound_session_count(\"{net}\", \"SMTP\")\n");
    for round in 0..rounds {
        let mut round_ours = f64::NAN;
        let mut round_ss = f64::NAN;
        let mut round_diag = f64::NAN;
        let mut round_floor = f64::NAN;
        let mut answers = Vec::new();
        // Rotate which method goes first, so none always runs on a cold cache.
        for step in 0..5 {
            match (step + round) % 5 {
                4 => {
                    round_floor = echo.round_trip(line.as_bytes())?;
                    m.floor.times_ns.push(round_floor);
                }
                0 => {
                    let (t, n) = ours_persistent(client, line.as_bytes())?;
                    round_ours = t;
                    m.ours.times_ns.push(t);
                    answers.push(("ours", n));
                }
                1 => {
                    let (t, n) = ours_oneshot(agent, line.as_bytes())?;
                    m.oneshot.times_ns.push(t);
                    answers.push(("ours (new connection)", n));
                }
                2 => {
                    let (t, n) = ss_filter(ports, net)?;
                    round_ss = t;
                    m.ss.times_ns.push(t);
                    answers.push(("ss", n));
                }
                _ => {
                    let (t, n) = sock_diag_count(ports, net)?;
                    round_diag = t;
                    m.diag.times_ns.push(t);
                    answers.push(("sock_diag", n));
                }
            }
        }
        m.answer = answers[0].1;
        if answers.iter().any(|&(_, n)| n != m.answer) {
            m.disagreements += 1;
            report.note(format!(
                "answers disagree for {net} in round {round}: {answers:?}"
            ));
        }
        m.ratios_ss.push(round_ss / round_ours);
        m.ratios_ss_floor.push(round_ss / round_floor);
        m.ratios_diag.push(round_diag / round_ours);
    }
    Ok(m)
}

impl Measured {
    fn rows(&self) -> Vec<Vec<String>> {
        let row = |name: &str, m: &Method, fmt: fn(f64) -> String| {
            vec![
                self.net.to_string(),
                name.to_string(),
                fmt(median(&m.times_ns)),
                fmt(quantile(&m.times_ns, 0.99)),
            ]
        };
        let mut ss_row = row("`ss` with kernel filter", &self.ss, fmt_ms);
        ss_row.push(format!("{}×", fmt_count(median(&self.ratios_ss))));
        ss_row.push(format!("{}×", fmt_count(quantile(&self.ratios_ss, 0.01))));
        let mut diag_row = row("sock_diag dump from Rust", &self.diag, fmt_ms);
        diag_row.push(format!("{}×", fmt_count(median(&self.ratios_diag))));
        diag_row.push(format!("{}×", fmt_count(quantile(&self.ratios_diag, 0.01))));
        let mut ours_row = row("inbound-audit (persistent client)", &self.ours, fmt_ns);
        ours_row.extend(["1×".to_string(), "".to_string()]);
        let mut oneshot_row = row(
            "inbound-audit (connect, query, close)",
            &self.oneshot,
            fmt_ns,
        );
        oneshot_row.extend(["".to_string(), "".to_string()]);
        let mut floor_row = row(
            "Unix-socket ping-pong, no work (floor of any socket service; ss ÷ it in the ratio columns)",
            &self.floor,
            fmt_ns,
        );
        floor_row.push(format!("{}×", fmt_count(median(&self.ratios_ss_floor))));
        floor_row.push(format!(
            "{}×",
            fmt_count(quantile(&self.ratios_ss_floor, 0.01))
        ));
        let mut rows = vec![ours_row, oneshot_row, ss_row, diag_row, floor_row];
        for r in &mut rows {
            r.insert(1, fmt_count(self.answer as f64));
        }
        rows
    }

    fn json(&self, placement: &str) -> serde_json::Value {
        json!({
            "placement": placement,
            "cidr": self.net.to_string(), "answer": self.answer,
            "ours_ns": self.ours.times_ns, "ours_new_connection_ns": self.oneshot.times_ns,
            "ss_ns": self.ss.times_ns, "sock_diag_ns": self.diag.times_ns,
            "ratio_ss": self.ratios_ss, "ratio_sock_diag": self.ratios_diag,
            "ping_pong_ns": self.floor.times_ns, "ratio_ss_to_ping_pong": self.ratios_ss_floor,
        })
    }
}

/// An echo thread on a Unix socket pair: the cost of a socket round trip
/// alone, with no agent behind it.
struct Echo {
    stream: std::os::unix::net::UnixStream,
}

impl Echo {
    fn start() -> Result<Self> {
        use std::io::{Read, Write};
        let (stream, mut peer) = std::os::unix::net::UnixStream::pair()?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok(n) = peer.read(&mut buf) {
                if n == 0 || peer.write_all(b"OK 1000\n").is_err() {
                    break;
                }
            }
        });
        Ok(Self { stream })
    }

    /// Median of 20 round trips of `request`.
    fn round_trip(&mut self, request: &[u8]) -> Result<f64> {
        use std::io::{Read, Write};
        let mut buf = [0u8; 64];
        let mut times = Vec::with_capacity(20);
        for _ in 0..20 {
            let start = Instant::now();
            self.stream.write_all(request)?;
            let n = self.stream.read(&mut buf)?;
            times.push(start.elapsed().as_nanos() as f64);
            if n == 0 {
                bail!("the echo thread is gone");
            }
        }
        Ok(median(&times))
    }
}

//! The cost a mail host feels: a private Postfix instance (Debian's 3.7, the
//! tests' instance: chrooted smtpd, mail discarded after queueing) in a
//! network namespace the bench makes, driven by Postfix's own `smtp-source`
//! (one connection per message: banner, EHLO, MAIL, RCPT, DATA, QUIT).
//! Messages per second in four arms, alternating within each round (the
//! order reversed every other round):
//!
//! - none: no agent (no program attached), no policy check;
//! - programs: the agent running (its programs attached), no policy check;
//! - ours: the agent, and `check_policy_service` at RCPT and END-OF-MESSAGE
//!   on the agent's policy socket, with session and connection limits that
//!   never fire (every request is judged against them);
//! - reference: the agent, and the same checks on the bench's reference
//!   policy server, which answers `action=dunno` at once.
//!
//! Ratios per round (programs ÷ none, ours ÷ reference, ours ÷ programs),
//! reported as medians. Beside them, the policy round trip a client sees on
//! each socket, and the agent's CPU per message.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use inbound_bench::stats::{median, Percentiles};
use integration_tests::{
    netns::NetNs,
    postfix::{self, Postfix, POLICY_DIR_IN_QUEUE, POLICY_IN_QUEUE, SMTP_SOURCE},
    TempDir, TestCgroup,
};
use serde_json::json;

use crate::{
    agent::BenchAgent,
    env,
    policy::DunnoServer,
    report::{fmt_ns, Report, Section},
    Ctx,
};

const PORT: u16 = 2525;
const REFERENCE_IN_QUEUE: &str = "inbound-audit/reference.sock";

/// Limits as README.md suggests, set high enough never to fire: each request
/// does the lookups a real one does.
const AGENT_LIMITS: &str = r#"
monitors = ["60,1"]
policy_socket_mode = "0660"

[[policy_limits]]
count = "sessions"
ipv4_prefix = 24
ipv6_prefix = 64
max = 100000
action = "421 4.7.0"

[[policy_limits]]
count = "connections"
monitor = "60,1"
endv = 1
max = 100000000
action = "defer_if_permit"
"#;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Arm {
    None,
    Programs,
    Ours,
    Reference,
}

impl Arm {
    const ALL: [Arm; 4] = [Arm::None, Arm::Programs, Arm::Ours, Arm::Reference];

    fn label(self) -> &'static str {
        match self {
            Arm::None => "none",
            Arm::Programs => "programs",
            Arm::Ours => "ours",
            Arm::Reference => "reference",
        }
    }

    fn policy(self) -> Option<String> {
        match self {
            Arm::None | Arm::Programs => None,
            Arm::Ours => Some(format!("unix:{POLICY_IN_QUEUE}")),
            Arm::Reference => Some(format!("unix:{REFERENCE_IN_QUEUE}")),
        }
    }
}

struct Run {
    rate: f64,
    agent_cpu_us_per_message: f64,
    /// This process's CPU: the reference server's threads (the bench's own
    /// thread waits for smtp-source meanwhile).
    bench_cpu_us_per_message: f64,
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    if let Some(why) = postfix::unavailable() {
        bail!("{why}");
    }
    if !Path::new(SMTP_SOURCE).exists() {
        bail!("{SMTP_SOURCE} is missing (Debian's postfix package has it)");
    }
    let (rounds, messages) = if ctx.quick { (1, 300) } else { (7, 2_000) };
    let sessions = 10;
    let ns = NetNs::new("bench-mail");
    let cgroup = TestCgroup::new("bench-mailhost");
    let dir = TempDir::new("bench-mailhost-postfix");
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], PORT));
    let mut postfix = Postfix::configure(dir.path(), listen, cgroup.path(), Some(&ns), None)?;
    let policy_dir = postfix.queue().join(POLICY_DIR_IN_QUEUE);
    let reference_server = DunnoServer::start(&postfix.queue().join(REFERENCE_IN_QUEUE))?;

    let mut agent = BenchAgent::new(
        &ctx.agent_binary,
        "mailhost",
        cgroup.path(),
        &[format!("SMTP={PORT}")],
    )?;
    agent.append_config(AGENT_LIMITS)?;
    agent.add_args(&[
        "--policy-socket",
        &postfix.policy_socket().display().to_string(),
        "--policy-socket-group",
        "postfix",
    ]);
    agent.in_netns(ns.path());
    agent.start()?;
    postfix.start(|p| ns.run(|| p.answers([127, 0, 9, 9].into())))?;
    agent.wait_quiet(Duration::from_millis(500))?;
    let mut agent_running = true;

    // Round trips on the two policy sockets from a client process of its
    // own, pinned to CPU 0, with both servers (the agent, and this process
    // whose threads are the reference's) pinned first to the client's CPU,
    // then to the other. A woken thread goes back to the CPU it last ran on
    // when that one is idle, so unpinned, whichever server happened to sit
    // on the client's CPU looked 10x faster, run after run.
    let batches = if ctx.quick { 2 } else { 10 };
    let mut round_trip_rows = Vec::new();
    for (placement, server_cpu) in [("same CPU", 0), ("across CPUs", 1)] {
        let agent_pid = agent.pid().context("agent pid")?;
        env::pin_process(agent_pid, Some(server_cpu))?;
        env::pin_process(std::process::id(), Some(server_cpu))?;
        let measured = round_trips(
            &postfix.policy_socket(),
            &policy_dir.join("reference.sock"),
            batches,
        );
        env::pin_process(agent_pid, None)?;
        env::pin_process(std::process::id(), None)?;
        let (ours, reference) = measured?;
        println!(
            "  policy round trip, {placement}: p50 ours {} / reference {}, p99 {} / {}",
            fmt_ns(ours.p50),
            fmt_ns(reference.p50),
            fmt_ns(ours.p99),
            fmt_ns(reference.p99)
        );
        round_trip_rows.push((placement, ours, reference));
    }
    let (_, ours_p, reference_p) = round_trip_rows[0];
    let (_, ours_across, reference_across) = round_trip_rows[1];
    let round_trip_samples = batches * 1000;

    // Warm-up: Postfix's first run pays for process starts and page faults.
    set_arm(&postfix, Arm::Ours)?;
    source_run(&ns, &postfix, messages / 2, sessions)?;

    let mut runs: Vec<Vec<(Arm, Run)>> = Vec::new();
    for round in 0..rounds {
        let mut order = Arm::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut results = Vec::new();
        for arm in order {
            let want_agent = arm != Arm::None;
            if want_agent && !agent_running {
                agent.start()?;
                agent_running = true;
            } else if !want_agent && agent_running {
                // Stopped and its pins removed: nothing of ours is attached.
                agent.stop()?;
                agent.cleanup_pins()?;
                agent_running = false;
            }
            set_arm(&postfix, arm)?;
            let answered_before = reference_server.answered();
            let cpu_before = agent.pid().and_then(env::cpu_seconds).unwrap_or(0.0);
            let own_before = env::cpu_seconds(std::process::id()).unwrap_or(0.0);
            let secs = source_run(&ns, &postfix, messages, sessions)?;
            let cpu_after = agent.pid().and_then(env::cpu_seconds).unwrap_or(0.0);
            let own_after = env::cpu_seconds(std::process::id()).unwrap_or(0.0);
            // Each message is checked at RCPT and END-OF-MESSAGE.
            let answered = reference_server.answered() - answered_before;
            if (arm == Arm::Reference) != (answered >= 2 * messages as u64) {
                bail!("{} arm: the reference server answered {answered} requests for {messages} messages", arm.label());
            }
            let run = Run {
                rate: messages as f64 / secs,
                agent_cpu_us_per_message: (cpu_after - cpu_before) / messages as f64 * 1e6,
                bench_cpu_us_per_message: (own_after - own_before) / messages as f64 * 1e6,
            };
            println!(
                "  round {round} {:<9} {:.0} messages/s (CPU per message: agent {:.0} µs, bench {:.0} µs)",
                arm.label(),
                run.rate,
                run.agent_cpu_us_per_message,
                run.bench_cpu_us_per_message
            );
            results.push((arm, run));
        }
        runs.push(results);
    }
    if !agent_running {
        agent.start()?;
    }
    let rate = |round: &[(Arm, Run)], arm: Arm| {
        round
            .iter()
            .find(|(a, _)| *a == arm)
            .map(|(_, r)| r.rate)
            .unwrap_or(f64::NAN)
    };
    let ratio = |a: Arm, b: Arm| -> f64 {
        median(
            &runs
                .iter()
                .map(|round| rate(round, a) / rate(round, b))
                .collect::<Vec<_>>(),
        )
    };
    let programs = ratio(Arm::Programs, Arm::None);
    let policy = ratio(Arm::Ours, Arm::Reference);
    let ours_vs_programs = ratio(Arm::Ours, Arm::Programs);
    let reference_vs_programs = ratio(Arm::Reference, Arm::Programs);
    let median_rate = |arm: Arm| median(&runs.iter().map(|r| rate(r, arm)).collect::<Vec<_>>());
    let agent_cpu = |arm: Arm| {
        median(
            &runs
                .iter()
                .flat_map(|r| r.iter().filter(|(a, _)| *a == arm))
                .map(|(_, r)| r.agent_cpu_us_per_message)
                .collect::<Vec<_>>(),
        )
    };
    let bench_cpu = |arm: Arm| {
        median(
            &runs
                .iter()
                .flat_map(|r| r.iter().filter(|(a, _)| *a == arm))
                .map(|(_, r)| r.bench_cpu_us_per_message)
                .collect::<Vec<_>>(),
        )
    };
    report.target(
        "Postfix messages/s (smtp-source), our programs attached ÷ not (median of rounds)",
        format!(
            "{programs:.3} ({:.0} vs {:.0} messages/s)",
            median_rate(Arm::Programs),
            median_rate(Arm::None)
        ),
        programs,
        "≥ 0.95",
        programs >= 0.95,
    );
    report.target(
        "Postfix messages/s, our policy server ÷ a reference that answers dunno at once (median of rounds)",
        format!(
            "{policy:.3} ({:.0} vs {:.0} messages/s; policy round trip p50 {} vs {} on one CPU, {} vs {} across two)",
            median_rate(Arm::Ours),
            median_rate(Arm::Reference),
            fmt_ns(ours_p.p50),
            fmt_ns(reference_p.p50),
            fmt_ns(ours_across.p50),
            fmt_ns(reference_across.p50)
        ),
        policy,
        "≥ 0.97 (the reference's, within noise)",
        policy >= 0.97,
    );
    let mut rows = Vec::new();
    for arm in Arm::ALL {
        rows.push(vec![
            arm.label().to_string(),
            format!("{:.0}", median_rate(arm)),
            format!("{:.3}", median_rate(arm) / median_rate(Arm::None)),
            if arm == Arm::None {
                "n/a".into()
            } else {
                format!("{:.0} µs", agent_cpu(arm))
            },
            format!("{:.0} µs", bench_cpu(arm)),
        ]);
    }
    report.sections.push(Section {
        title: "The cost a mail host feels: Postfix and smtp-source".into(),
        method: format!(
            "A private Postfix 3.7 (chrooted smtpd, mail discarded after queueing) in a network \
             namespace of its own; `smtp-source -s {sessions} -m {messages} -l 1024` (one \
             connection per message) per run; {rounds} rounds of the four arms, alternating, the \
             order reversed every other round; the queue emptied before each run. ours ÷ programs \
             {ours_vs_programs:.3}, reference ÷ programs {reference_vs_programs:.3}. Policy round \
             trip through each socket (one persistent connection, a 30-attribute RCPT request, \
             {} requests each, alternating batches of 1000, from a client pinned to CPU 0), both \
             servers pinned to the client's CPU: ours p50 {} p99 {}, reference p50 {} p99 {}; \
             both pinned to the other CPU: ours p50 {} p99 {}, reference p50 {} p99 {}.",
            round_trip_samples,
            fmt_ns(ours_p.p50),
            fmt_ns(ours_p.p99),
            fmt_ns(reference_p.p50),
            fmt_ns(reference_p.p99),
            fmt_ns(ours_across.p50),
            fmt_ns(ours_across.p99),
            fmt_ns(reference_across.p50),
            fmt_ns(reference_across.p99)
        ),
        columns: vec![
            "arm".into(),
            "messages/s (median)".into(),
            "÷ none".into(),
            "agent CPU per message".into(),
            "bench process CPU per message (the reference server)".into(),
        ],
        rows,
        data: json!({
            "rounds": runs.iter().map(|r| r.iter().map(|(a, run)| json!({
                "arm": a.label(), "rate": run.rate, "agent_cpu_us_per_message": run.agent_cpu_us_per_message,
                "bench_cpu_us_per_message": run.bench_cpu_us_per_message,
            })).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "programs_ratio": programs,
            "policy_ratio": policy,
            "ours_vs_programs": ours_vs_programs,
            "reference_vs_programs": reference_vs_programs,
            "policy_round_trip_ns": {
                "ours_p50": ours_p.p50, "ours_p99": ours_p.p99,
                "reference_p50": reference_p.p50, "reference_p99": reference_p.p99,
                "across_cpus": {
                    "ours_p50": ours_across.p50, "ours_p99": ours_across.p99,
                    "reference_p50": reference_across.p50, "reference_p99": reference_across.p99,
                },
            },
        }),
    });
    // Postfix falls back to its default action when a policy server fails:
    // then the arm would have measured no check at all.
    if let Some(line) = postfix
        .maillog()
        .lines()
        .find(|l| l.contains("problem talking to server") || l.contains("warning: connect to"))
    {
        bail!("Postfix could not use a policy server: {line}");
    }
    postfix.stop();
    agent.stop()?;
    agent.cleanup_pins()?;
    Ok(())
}

/// p50 and p99 of each socket's round trips, timed by the `round-trips`
/// helper process.
fn round_trips(
    ours: &Path,
    reference: &Path,
    batches: usize,
) -> Result<(Percentiles, Percentiles)> {
    // The private copy: the criterion step replaces the runner's own binary.
    let output = std::process::Command::new(crate::net::helper()?)
        .args([
            "round-trips",
            "--cpu",
            "0",
            "--batches",
            &batches.to_string(),
            "--first",
        ])
        .arg(ours)
        .arg("--second")
        .arg(reference)
        .output()
        .context("running the round-trips helper")?;
    if !output.status.success() {
        bail!(
            "the round-trips helper failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let figures: Vec<f64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the round-trips helper printed {text:?}"))?;
    let [ours_p50, ours_p99, reference_p50, reference_p99] = figures[..] else {
        bail!("the round-trips helper printed {text:?}");
    };
    let of = |p50, p99| Percentiles {
        p50,
        p99,
        p999: f64::NAN,
        samples: batches * 1000,
    };
    Ok((of(ours_p50, ours_p99), of(reference_p50, reference_p99)))
}

/// main.cf for `arm`, then `postfix reload` (smtpd processes restart with it).
fn set_arm(postfix: &Postfix, arm: Arm) -> Result<()> {
    postfix.write_main_cf(arm.policy().as_deref(), "")?;
    postfix.run(&["reload"])?;
    // master signals its children; give the old smtpd processes time to go.
    std::thread::sleep(Duration::from_millis(500));
    Ok(())
}

/// One smtp-source run inside the namespace; its wall time in seconds, once
/// the queue has emptied before it.
fn source_run(ns: &NetNs, postfix: &Postfix, messages: usize, sessions: usize) -> Result<f64> {
    wait_queue_empty(postfix)?;
    let started = Instant::now();
    let output = ns
        .command(SMTP_SOURCE)
        .args([
            "-s",
            &sessions.to_string(),
            "-m",
            &messages.to_string(),
            "-l",
            "1024",
            "-f",
            "a@example.org",
            "-t",
            "b@example.net",
            &postfix.listen.to_string(),
        ])
        .stdin(Stdio::null())
        .output()
        .context("running smtp-source")?;
    let secs = started.elapsed().as_secs_f64();
    if !output.status.success() || !output.stderr.is_empty() {
        bail!(
            "smtp-source failed ({}): {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            postfix.logs()
        );
    }
    Ok(secs)
}

/// Until no message waits in Postfix's queue (qmgr discards them).
fn wait_queue_empty(postfix: &Postfix) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let waiting: usize = ["maildrop", "incoming", "active", "deferred"]
            .iter()
            .map(|sub| count_files(&postfix.queue().join(sub)))
            .sum();
        if waiting == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{waiting} messages still in Postfix's queue after 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_files(&path)
            } else {
                1
            }
        })
        .sum()
}

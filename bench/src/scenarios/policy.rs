//! Measurement: what running Momentum-style Lua scripts adds to a Postfix
//! policy request. Two agents side by side, alternating rounds: one with no
//! scripts (the request is judged by its `[[policy_limits]]` alone, here
//! none: `dunno`), one with the seed example and the three contrib/policy
//! scripts loaded. Both are asked the same MAIL request, as Postfix's smtpd
//! writes it (about 25 attributes), on one persistent policy connection, as
//! smtpd keeps it: time per request (p50, p99), and the request rate of
//! four such connections at once.

use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use inbound_bench::stats::{median, Percentiles};
use serde_json::json;

use crate::{
    agent::BenchAgent,
    env,
    policy::PolicyClient,
    report::{fmt_count, fmt_ns, Report, Section},
    Ctx,
};

/// Postfix 3.7's attributes for a MAIL FROM, values of typical length.
fn request(client: u32) -> Vec<u8> {
    let ip = format!("127.40.{}.{}", (client >> 8) & 255, client & 255);
    format!(
        "request=smtpd_access_policy\nprotocol_state=MAIL\nprotocol_name=ESMTP\n\
         client_address={ip}\nclient_name=unknown\nclient_port=40000\n\
         reverse_client_name=unknown\nserver_address=127.0.0.1\nserver_port=25\n\
         helo_name=client.example.org\nsender=someone@example.org\nrecipient=\n\
         recipient_count=0\nqueue_id=\ninstance=1b2f.6540a1b2.c3d4e.0\nsize=2048\n\
         etrn_domain=\nstress=\nsasl_method=\nsasl_username=\nsasl_sender=\n\
         ccert_subject=\nccert_issuer=\nccert_fingerprint=\nccert_pubkey_fingerprint=\n\
         encryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n\
         policy_context=\ncompatibility_level=3.6\nmail_version=3.7.11\n\n"
    )
    .into_bytes()
}

struct Arm {
    label: &'static str,
    agent: BenchAgent,
    policy_socket: std::path::PathBuf,
    latencies: Vec<Vec<f64>>,
    rates: Vec<f64>,
}

fn start_arm(
    ctx: &Ctx,
    label: &'static str,
    name: &str,
    scripts: &[&str],
    port: u16,
) -> Result<Arm> {
    let mut agent = BenchAgent::new(
        &ctx.agent_binary,
        name,
        ctx.cgroup.path(),
        &[format!("SMTP={port}")],
    )?;
    let list = scripts
        .iter()
        .map(|s| format!("{:?}", ctx.workspace.join(s).display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    agent.append_config(&format!(
        "monitors = [\"60,1\", \"3600,1\"]\nlua_policy_scripts = [{list}]\n"
    ))?;
    let policy_socket = agent.socket.with_file_name("policy.sock");
    agent.add_args(&["--policy-socket", policy_socket.to_str().unwrap()]);
    agent.start()?;
    Ok(Arm {
        label,
        agent,
        policy_socket,
        latencies: Vec::new(),
        rates: Vec::new(),
    })
}

/// `n` requests one after another on one connection: ns per request.
fn latency_round(arm: &Arm, n: usize, expect: &str) -> Result<Vec<f64>> {
    let mut client = PolicyClient::connect(&arm.policy_socket)?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let request = request(i as u32 % 4096);
        let began = Instant::now();
        let answer = client.ask(&request)?;
        samples.push(began.elapsed().as_nanos() as f64);
        if answer != expect {
            bail!("{}: answered {answer:?}, expected {expect:?}", arm.label);
        }
    }
    Ok(samples)
}

/// `clients` connections asking as fast as they are answered for `run_for`: requests/s.
fn rate_round(arm: &Arm, clients: usize, run_for: Duration) -> Result<f64> {
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (socket, barrier) = (arm.policy_socket.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<u64> {
                let mut client = PolicyClient::connect(&socket)?;
                let requests: Vec<Vec<u8>> =
                    (0..64).map(|i| request((c * 64 + i) as u32)).collect();
                barrier.wait();
                let began = Instant::now();
                let mut done = 0u64;
                while began.elapsed() < run_for {
                    client.ask(&requests[done as usize % requests.len()])?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for thread in threads {
        total += thread
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok(total as f64 / run_for.as_secs_f64())
}

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let (rounds, per_round, run_for) = if ctx.quick {
        (2, 500, Duration::from_millis(500))
    } else {
        (10, 5000, Duration::from_secs(2))
    };
    let port = env::free_port(&[])?;
    let scripts = [
        "contrib/policy/session_limit.lua",
        "contrib/policy/connection_tarpit.lua",
        "contrib/policy/rejection_ratio.lua",
        "tests/fixtures/policy/momentum_example.lua",
    ];
    let mut arms = [
        start_arm(ctx, "no script", "policy-plain", &[], port)?,
        start_arm(ctx, "4 scripts", "policy-lua", &scripts, port)?,
    ];
    // Warm-up: first connections, page faults, the interpreters' first runs.
    for arm in &arms {
        latency_round(arm, 200, "dunno")?;
    }
    for round in 0..rounds {
        // Alternating which goes first, so neither always runs on a warmer machine.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for &i in &order {
            let samples = latency_round(&arms[i], per_round, "dunno")?;
            arms[i].latencies.push(samples);
        }
        for &i in &order {
            let rate = rate_round(&arms[i], 4, run_for)?;
            arms[i].rates.push(rate);
        }
    }
    let summaries: Vec<(Percentiles, f64, f64)> = arms
        .iter()
        .map(|arm| {
            let pooled: Vec<f64> = arm.latencies.iter().flatten().copied().collect();
            let round_p99: Vec<f64> = arm
                .latencies
                .iter()
                .map(|r| inbound_bench::stats::quantile(r, 0.99))
                .collect();
            (
                Percentiles::of(&pooled),
                median(&round_p99),
                median(&arm.rates),
            )
        })
        .collect();
    let rows = arms
        .iter()
        .zip(&summaries)
        .map(|(arm, (p, round_p99, rate))| {
            vec![
                arm.label.to_string(),
                fmt_ns(p.p50),
                fmt_ns(p.p99),
                fmt_ns(*round_p99),
                format!("{}/s", fmt_count(*rate)),
            ]
        })
        .collect();
    let (plain, lua) = (&summaries[0], &summaries[1]);
    let added_p50 = lua.0.p50 - plain.0.p50;
    report.sections.push(Section {
        title: "Lua policy scripts: a Postfix policy request with and without scripts".into(),
        method: format!(
            "Two agents side by side, alternating in {rounds} rounds: one without scripts, one \
             with the seed example and contrib/policy's three scripts (at MAIL: \
             rejection_ratio.lua's two msys.audit calls and the seed's three, answered in-process). \
             Each round: {per_round} MAIL requests as Postfix writes them (31 attributes) one after \
             another on one persistent policy connection (time from writing the request to reading \
             the answer's empty line), then four connections asking as fast as answered for \
             {:.1} s (the rate). Both answer `dunno`.",
            run_for.as_secs_f64()
        ),
        columns: ["arm", "p50", "p99 (pooled)", "p99 (median of rounds)", "rate, 4 connections"]
            .iter()
            .map(ToString::to_string)
            .collect(),
        rows,
        data: json!({
            "no_script": { "p50_ns": plain.0.p50, "p99_ns": plain.0.p99, "round_p99_ns": plain.1, "rate": plain.2 },
            "scripts": { "p50_ns": lua.0.p50, "p99_ns": lua.0.p99, "round_p99_ns": lua.1, "rate": lua.2 },
        }),
    });
    report.target(
        "Lua policy: time a script run adds to a policy request (p50)",
        format!(
            "{} (p50 {} vs {}; p99 {} vs {}; {}/s vs {}/s)",
            fmt_ns(added_p50),
            fmt_ns(lua.0.p50),
            fmt_ns(plain.0.p50),
            fmt_ns(lua.0.p99),
            fmt_ns(plain.0.p99),
            fmt_count(lua.2),
            fmt_count(plain.2),
        ),
        added_p50,
        "< 1 ms",
        added_p50 < 1e6,
    );
    for arm in &mut arms {
        arm.agent.stop()?;
    }
    Ok(())
}

//! What the query-latency measurements (sizes, windows) share: timing a round
//! of queries in-process or through the socket, the table rows, the worst p99.

use std::time::Instant;

use anyhow::Result;
use inbound_bench::{stats::Rounds, synthetic::QueryKind};
use ipnet::IpNet;
use serde_json::{json, Value};

use crate::{
    agent::QueryClient,
    report::{fmt_ns, fmt_size, Report},
};

/// How many tracked IPs, rounds and queries a latency measurement uses.
pub struct Plan {
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub inproc_per_round: usize,
    pub socket_per_round: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                sizes: vec![1_000, 10_000],
                rounds: 3,
                inproc_per_round: 20_000,
                socket_per_round: 2_000,
            }
        } else {
            Self {
                sizes: vec![1_000, 100_000, 1_000_000],
                rounds: 5,
                inproc_per_round: 200_000,
                socket_per_round: 10_000,
            }
        }
    }
}

/// Latency rounds per query kind.
pub type KindRounds = Vec<(QueryKind, Rounds)>;

pub fn kind_rounds() -> KindRounds {
    QueryKind::ALL
        .iter()
        .map(|&k| (k, Rounds::default()))
        .collect()
}

/// `count` timed on each of `nets`, one query at a time (timer included).
pub fn inproc_round(nets: &[IpNet], mut count: impl FnMut(&IpNet) -> u64) -> Vec<f64> {
    let mut samples = Vec::with_capacity(nets.len());
    let mut sink = 0u64;
    for net in nets {
        let start = Instant::now();
        sink = sink.wrapping_add(std::hint::black_box(count(net)));
        samples.push(start.elapsed().as_nanos() as f64);
    }
    std::hint::black_box(sink);
    samples
}

/// Each request sent on `client` and its answer awaited, one at a time.
pub fn socket_round(client: &mut QueryClient, requests: &[Vec<u8>]) -> Result<Vec<f64>> {
    // A short warm-up: the first queries after a pause pay for caches and a
    // sleeping worker thread, which is a different figure.
    for request in requests.iter().take(200) {
        client.count(request)?;
    }
    let mut samples = Vec::with_capacity(requests.len());
    for request in requests {
        let start = Instant::now();
        client.count(request)?;
        samples.push(start.elapsed().as_nanos() as f64);
    }
    Ok(samples)
}

pub const COLUMNS: [&str; 9] = [
    "IPs",
    "query",
    "in-process p50",
    "in-process p99",
    "in-process p999",
    "socket p50",
    "socket p99",
    "socket p999",
    "socket p99 per round (median / worst)",
];

/// One table row per query kind for `ips` tracked IPs, and the same as data.
pub fn rows(ips: usize, inproc: &KindRounds, socket: &KindRounds) -> Vec<(Vec<String>, Value)> {
    inproc
        .iter()
        .zip(socket)
        .map(|((kind, inproc), (_, socket))| {
            let (i, s) = (inproc.summary(), socket.summary());
            let row = vec![
                fmt_size(ips),
                kind.label().to_string(),
                fmt_ns(i.pooled.p50),
                fmt_ns(i.pooled.p99),
                fmt_ns(i.pooled.p999),
                fmt_ns(s.pooled.p50),
                fmt_ns(s.pooled.p99),
                fmt_ns(s.pooled.p999),
                format!(
                    "{} / {}",
                    fmt_ns(s.median_round_p99),
                    fmt_ns(s.worst_round_p99)
                ),
            ];
            let data = json!({
                "tracked_ips": ips, "query": kind.label(), "in_process_ns": i, "socket_ns": s,
            });
            (row, data)
        })
        .collect()
}

/// The highest pooled p99 of the kinds, and its kind.
pub fn worst_p99(sets: &KindRounds) -> (f64, QueryKind) {
    sets.iter()
        .map(|(kind, r)| (r.summary().pooled.p99, *kind))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .expect("four kinds")
}

/// The two latency targets, judged on the worst kind's p99: through
/// the socket (≤ 100 µs) and in-process (≤ 2 µs), each under its report name.
pub fn judge(
    report: &mut Report,
    (socket_name, socket): (&str, &KindRounds),
    (inproc_name, inproc): (&str, &KindRounds),
) {
    let (p99, kind) = worst_p99(socket);
    report.target(
        socket_name,
        format!("{} ({kind})", fmt_ns(p99)),
        p99,
        "≤ 100 µs",
        p99 <= 100_000.0,
    );
    let (p99, kind) = worst_p99(inproc);
    report.target(
        inproc_name,
        format!("{} ({kind})", fmt_ns(p99)),
        p99,
        "≤ 2 µs",
        p99 <= 2_000.0,
    );
}

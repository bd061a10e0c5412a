//! In-process query cost of the CIDR index (`inbound_audit::counting::index::CidrIndex`)
//! at 1k, 100k and 1M tracked IPs, for /32, /24, /16 and IPv6 /64 queries,
//! and its update cost (a session opened and closed) at the same sizes.
//!
//! Each iteration answers the next query of a fixed, pre-generated list (each
//! the prefix of a tracked IP), so the measured figure is one query, with the
//! cache behaviour of a random walk over the trie rather than of one hot path.
//!
//! `cargo xtask bench` runs this and reads the medians from
//! target/criterion/index_count/*/*/new/estimates.json. Set
//! INBOUND_BENCH_SIZES=1000,10000 to choose sizes, INBOUND_BENCH_QUICK=1 for
//! a smoke run.

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use inbound_audit::counting::index::CidrIndex;
use inbound_bench::synthetic::{QueryKind, SyntheticSet};

const QUERIES: usize = 4096;

fn sizes() -> Vec<usize> {
    std::env::var("INBOUND_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 100_000, 1_000_000])
}

fn index_count(c: &mut Criterion) {
    // INBOUND_BENCH_QUICK=1 (the runner's --quick): a smoke run in seconds.
    let quick = std::env::var_os("INBOUND_BENCH_QUICK").is_some();
    let mut group = c.benchmark_group("index_count");
    group
        .warm_up_time(Duration::from_millis(if quick { 100 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 2000 }))
        .sample_size(if quick { 10 } else { 100 })
        .throughput(Throughput::Elements(1));
    for size in sizes() {
        let set = SyntheticSet::generate(size);
        let mut index = CidrIndex::new();
        for ip in set.iter() {
            index.add(ip, 1).expect("a fresh index cannot underflow");
        }
        for kind in QueryKind::ALL {
            let queries = set.queries(kind, QUERIES, 42);
            let mut next = 0usize;
            group.bench_with_input(BenchmarkId::new(kind.slug(), size), &index, |b, index| {
                b.iter(|| {
                    let net = &queries[next % QUERIES];
                    next = next.wrapping_add(1);
                    black_box(index.count(black_box(net)))
                })
            });
        }
    }
    group.finish();
}

/// The event path's cost: one session opened and closed from an IP already
/// tracked (a count up and down), and from a new IP (a key inserted and
/// removed), at each size. Each iteration takes the next IP of a fixed list.
fn index_update(c: &mut Criterion) {
    let quick = std::env::var_os("INBOUND_BENCH_QUICK").is_some();
    let mut group = c.benchmark_group("index_update");
    group
        .warm_up_time(Duration::from_millis(if quick { 100 } else { 500 }))
        .measurement_time(Duration::from_millis(if quick { 300 } else { 2000 }))
        .sample_size(if quick { 10 } else { 100 })
        .throughput(Throughput::Elements(1));
    for size in sizes() {
        let set = SyntheticSet::generate(size);
        let mut index = CidrIndex::new();
        for ip in set.iter() {
            index.add(ip, 1).expect("a fresh index cannot underflow");
        }
        let tracked: Vec<_> = set.iter().step_by((size / QUERIES).max(1)).collect();
        // Hosts of the same networks that are not tracked.
        let fresh: Vec<_> = SyntheticSet::generate(size + 1)
            .iter()
            .filter(|ip| index.get(*ip) == 0)
            .take(QUERIES)
            .collect();
        for (name, ips) in [("tracked_ip", &tracked), ("new_ip", &fresh)] {
            let mut next = 0usize;
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| {
                    let ip = ips[next % ips.len()];
                    next = next.wrapping_add(1);
                    let _ = black_box(index.add(black_box(ip), 1));
                    let _ = black_box(index.add(black_box(ip), -1));
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, index_count, index_update);
criterion_main!(benches);

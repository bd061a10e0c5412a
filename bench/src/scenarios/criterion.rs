//! Measurement 1, in-process part: runs the criterion bench `benches/index.rs`
//! and reads its per-query medians back from criterion's estimates.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};
use inbound_bench::synthetic::QueryKind;
use serde_json::json;

use crate::{
    report::{fmt_ns, fmt_size, Report, Section},
    Ctx,
};

pub fn run(ctx: &Ctx, report: &mut Report) -> Result<()> {
    let sizes: Vec<usize> = if ctx.quick {
        vec![1_000, 10_000]
    } else {
        vec![1_000, 100_000, 1_000_000]
    };
    let size_list = sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&ctx.workspace)
        .args([
            "bench",
            "--package",
            "bench",
            "--bench",
            "index",
            "--",
            "--noplot",
        ])
        .env("INBOUND_BENCH_SIZES", &size_list);
    if ctx.quick {
        command.env("INBOUND_BENCH_QUICK", "1");
    }
    println!("[criterion] {command:?}");
    let status = command.status().context("running cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed: {status}");
    }

    let base = ctx.target_dir.join("criterion/index_count");
    let mut rows = Vec::new();
    let mut data = Vec::new();
    let mut worst_at_largest = (0.0f64, QueryKind::V4Host);
    for &size in &sizes {
        for kind in QueryKind::ALL {
            let estimates = read_estimates(&base.join(kind.slug()).join(size.to_string()))?;
            let median = estimates["median"]["point_estimate"]
                .as_f64()
                .unwrap_or(f64::NAN);
            let low = estimates["median"]["confidence_interval"]["lower_bound"]
                .as_f64()
                .unwrap_or(f64::NAN);
            let high = estimates["median"]["confidence_interval"]["upper_bound"]
                .as_f64()
                .unwrap_or(f64::NAN);
            let mean = estimates["mean"]["point_estimate"]
                .as_f64()
                .unwrap_or(f64::NAN);
            if size == *sizes.last().expect("sizes") && median > worst_at_largest.0 {
                worst_at_largest = (median, kind);
            }
            rows.push(vec![
                fmt_size(size),
                kind.label().to_string(),
                format!("{median:.1} ns"),
                format!("{low:.1} – {high:.1} ns"),
                format!("{mean:.1} ns"),
            ]);
            data.push(json!({
                "tracked_ips": size, "query": kind.label(), "median_ns": median,
                "median_ci95_ns": [low, high], "mean_ns": mean,
            }));
        }
    }
    report.sections.push(Section {
        title: "Index query cost, in-process (criterion)".into(),
        method: "`cargo bench -p bench --bench index`: `CidrIndex::count` on the same synthetic \
                 sets, each iteration the next of 4,096 pre-generated queries (prefixes of \
                 tracked IPs), so caches see a random walk, not one hot path. Criterion's median \
                 per query with its 95 % confidence interval."
            .into(),
        columns: ["IPs", "query", "median", "95 % CI of median", "mean"]
            .map(String::from)
            .to_vec(),
        rows,
        data: json!(data),
    });
    let (median, kind) = worst_at_largest;
    let at = fmt_size(*sizes.last().expect("sizes"));
    report.target(
        &format!("Index query median at {at} tracked IPs, criterion (worst kind)"),
        format!("{} ({kind})", fmt_ns(median)),
        median,
        "≤ 2 µs",
        median <= 2_000.0,
    );
    Ok(())
}

fn read_estimates(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("new/estimates.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading criterion's {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

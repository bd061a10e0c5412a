//! Percentiles and medians. Every figure in the report is a median or a
//! percentile over repeated runs, because this machine is shared and noisy.

/// The value at quantile `q` (0.0..=1.0) of `sorted` (nearest rank).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts a copy and returns its quantile.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile_sorted(&sorted, q)
}

pub fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

/// p50, p99 and p999 of a set of latency samples.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub samples: usize,
}

impl Percentiles {
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Self {
            p50: quantile_sorted(&sorted, 0.5),
            p99: quantile_sorted(&sorted, 0.99),
            p999: quantile_sorted(&sorted, 0.999),
            samples: sorted.len(),
        }
    }
}

/// Latency samples gathered in several rounds: the pooled percentiles, and
/// the median over rounds of each round's p99 (which a single noisy round
/// cannot move).
#[derive(Debug, Default, Clone)]
pub struct Rounds {
    rounds: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RoundSummary {
    pub pooled: Percentiles,
    pub median_round_p50: f64,
    pub median_round_p99: f64,
    pub worst_round_p99: f64,
    pub rounds: usize,
}

impl Rounds {
    pub fn push_round(&mut self, samples: Vec<f64>) {
        self.rounds.push(samples);
    }

    pub fn summary(&self) -> RoundSummary {
        let pooled: Vec<f64> = self.rounds.iter().flatten().copied().collect();
        let per_round = |q: f64| -> Vec<f64> {
            self.rounds
                .iter()
                .filter(|r| !r.is_empty())
                .map(|r| quantile(r, q))
                .collect()
        };
        RoundSummary {
            pooled: Percentiles::of(&pooled),
            median_round_p50: median(&per_round(0.5)),
            median_round_p99: median(&per_round(0.99)),
            worst_round_p99: quantile(&per_round(0.99), 1.0),
            rounds: self.rounds.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let values: Vec<f64> = (1..=1000).map(f64::from).collect();
        let p = Percentiles::of(&values);
        assert_eq!(p.p50, 500.0);
        assert_eq!(p.p99, 990.0);
        assert_eq!(p.p999, 999.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}

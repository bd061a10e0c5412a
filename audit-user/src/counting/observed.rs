//! What the agent counts about its own traffic for the Prometheus exposition:
//! accepted connections per service slot, receptions and rejections recorded,
//! Postfix policy answers by action, and queries by function and result with
//! their latency. Kept as `prometheus-client` metrics (atomics behind an Arc)
//! so recording never takes one of the state's locks and a scrape registers
//! these very objects instead of copying them.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use audit_common::MAX_SERVICES;
use prometheus_client::metrics::{counter::Counter, family::Family, histogram::Histogram};

use crate::domain::Series;

/// Label sets: a few fixed keys, values from a bounded set (function names,
/// error codes, configured actions), never a client address.
pub type Labels = Vec<(&'static str, String)>;

/// Query latency buckets in seconds: answers are normally tens of
/// microseconds; the upper buckets catch lock waits and scheduling stalls.
const LATENCY_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
    0.25,
];

#[derive(Debug)]
pub struct Observed {
    /// Live accepts (kernel open events) per service slot.
    accepted: [AtomicU64; MAX_SERVICES],
    /// Receptions and rejections recorded into the monitors (reported by
    /// `add` or by the Postfix policy server); monitors are not per service.
    pub receptions: Counter,
    pub rejections: Counter,
    /// Postfix policy answers by the first word of the action.
    pub policy_answers: Family<Labels, Counter>,
    /// `policy_answers`' dunno series, the answer to nearly every request:
    /// counted without a label set built and hashed each time.
    dunno: Counter,
    /// Query-socket requests by `function` and `code` (`ok` or the ERR code).
    pub queries: Family<Labels, Counter>,
    pub query_seconds: Histogram,
}

impl Default for Observed {
    fn default() -> Self {
        let policy_answers = Family::<Labels, Counter>::default();
        let dunno = policy_answers
            .get_or_create(&vec![("action", "dunno".to_string())])
            .clone();
        Self {
            accepted: std::array::from_fn(|_| AtomicU64::new(0)),
            receptions: Counter::default(),
            rejections: Counter::default(),
            policy_answers,
            dunno,
            queries: Family::default(),
            query_seconds: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Observed {
    pub fn accepted(&self, slot: u8) {
        if let Some(counter) = self.accepted.get(slot as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn accepted_on(&self, slot: u8) -> u64 {
        self.accepted
            .get(slot as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Connections (the kernel's events) and refusals (the kernel limits'
    /// own counters) are counted elsewhere, not here.
    pub fn recorded(&self, series: Series, n: u64) {
        match series {
            Series::Receptions => self.receptions.inc_by(n),
            Series::Rejections => self.rejections.inc_by(n),
            Series::Connections | Series::Refusals => 0,
        };
    }

    /// `action` as sent to Postfix (without `action=`); only its first word
    /// is a label, the rest names the client and the limit.
    pub fn policy_answer(&self, action: &str) {
        if action == "dunno" {
            self.dunno.inc();
            return;
        }
        let word = action
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        self.policy_answers
            .get_or_create(&vec![("action", word)])
            .inc();
    }

    pub fn query(&self, function: &'static str, code: &'static str, took: Duration) {
        self.streamed(function, code);
        self.query_seconds.observe(took.as_secs_f64());
    }

    /// A streamed answer (`show all`): counted, but kept out of the latency
    /// histogram, where one dump of seconds would hide what policy checks see.
    pub fn streamed(&self, function: &'static str, code: &'static str) {
        self.queries
            .get_or_create(&vec![
                ("function", function.to_string()),
                ("code", code.to_string()),
            ])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_under_their_labels() {
        let observed = Observed::default();
        observed.accepted(1);
        observed.accepted(1);
        observed.accepted(200);
        assert_eq!(observed.accepted_on(1), 2);
        assert_eq!(observed.accepted_on(0), 0);
        assert_eq!(observed.accepted_on(200), 0);
        observed.policy_answer("REJECT Too many sessions from 10.0.0.0/24");
        observed.policy_answer("reject");
        observed.policy_answer("dunno");
        let reject = vec![("action", "reject".to_string())];
        assert_eq!(observed.policy_answers.get_or_create(&reject).get(), 2);
        observed.recorded(Series::Receptions, 3);
        observed.recorded(Series::Connections, 5);
        assert_eq!(observed.receptions.get(), 3);
        assert_eq!(observed.rejections.get(), 0);
        observed.query("count", "ok", Duration::from_micros(20));
        let ok = vec![
            ("function", "count".to_string()),
            ("code", "ok".to_string()),
        ];
        assert_eq!(observed.queries.get_or_create(&ok).get(), 1);
    }
}

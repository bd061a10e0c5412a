//! Refusals by the kernel limits: every second the kernel's per-IP SYN
//! counts (taken and reset) go into the refusals series and the agent's
//! counters; the log gets one line per prefix per minute, never one per SYN
//! (a flood is exactly when a line per SYN would hurt).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    config::kernel_limits::KernelLimitConfig,
    counting::state::{AgentStats, SharedState},
    domain::{unix_now, Series},
    kernel::{api::Kernel, refusal::Refused},
    serving::shutdown::Shutdown,
};

const TAKE_INTERVAL: Duration = Duration::from_secs(1);
const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Refusals gathered per prefix until the next log line is due.
#[derive(Debug, Default)]
pub(super) struct RefusalLog {
    /// (prefix, dry run) → SYNs.
    pending: BTreeMap<(IpNet, bool), u64>,
    last: Option<Duration>,
}

impl RefusalLog {
    /// Adds `refused`, each under its prefix of the first limit (/32 and
    /// /128 with none left after a reload).
    pub fn note(&mut self, refused: &[Refused], limits: &[KernelLimitConfig]) {
        let (v4, v6) = limits
            .first()
            .map_or((32, 128), |l| (l.ipv4_prefix, l.ipv6_prefix));
        for r in refused {
            let bits = if r.ip.is_ipv4() { v4 } else { v6 };
            let net = IpNet::new(r.ip, bits).map_or(IpNet::from(r.ip), |n| n.trunc());
            *self.pending.entry((net, r.dry_run)).or_insert(0) += r.syns;
        }
    }

    /// The lines due at `now` (Unix time): at most one per prefix per minute.
    pub fn due(&mut self, now: Duration) -> Vec<String> {
        let last = *self.last.get_or_insert(now.saturating_sub(LOG_INTERVAL));
        if self.pending.is_empty() || now < last + LOG_INTERVAL {
            return Vec::new();
        }
        self.last = Some(now);
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((net, dry_run), syns)| {
                if dry_run {
                    format!("kernel limits (dry run): would have refused {syns} SYNs from {net}")
                } else {
                    format!("kernel limits: refused {syns} SYNs from {net}")
                }
            })
            .collect()
    }
}

/// Applies one take of the kernel's refusals to the state.
pub(super) fn apply(refused: &[Refused], state: &SharedState, log: &mut RefusalLog, now: Duration) {
    if !refused.is_empty() {
        let stats = &state.stats;
        let mut monitors = state.lock_monitors();
        for r in refused {
            let counter = if r.dry_run {
                &stats.kernel_limit_dry_run_refusals
            } else {
                &stats.kernel_limit_refusals
            };
            AgentStats::add(counter, r.syns);
            monitors.record(Series::Refusals, r.ip, r.syns, now);
        }
        log.note(refused, &state.setup().config.kernel_limits);
    }
    for line in log.due(now) {
        log::warn!("{line}");
    }
}

pub(super) async fn follow_refusals<K: Kernel + Send + 'static>(
    program: Arc<Mutex<K>>,
    state: Arc<SharedState>,
    mut stop: Shutdown,
) {
    let mut log = RefusalLog::default();
    let mut tick = tokio::time::interval(TAKE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tick.tick() => {}
        }
        let refused = program
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_refused();
        apply(&refused, &state, &mut log, unix_now());
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn refused(ip: &str, syns: u64, dry_run: bool) -> Refused {
        Refused {
            ip: ip.parse::<IpAddr>().unwrap(),
            dry_run,
            syns,
        }
    }

    fn limit() -> KernelLimitConfig {
        KernelLimitConfig {
            service: "SMTP".into(),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            max: 3,
            exempt: Vec::new(),
            dry_run: false,
            cut_existing: false,
            count_pending: true,
        }
    }

    #[test]
    fn one_line_per_prefix_per_minute() {
        let mut log = RefusalLog::default();
        let at = Duration::from_secs;
        log.note(
            &[
                refused("192.0.2.1", 40, false),
                refused("192.0.2.9", 2, false),
                refused("2001:db8::1", 1, true),
            ],
            &[limit()],
        );
        assert_eq!(
            log.due(at(1000)),
            vec![
                "kernel limits: refused 42 SYNs from 192.0.2.0/24".to_string(),
                "kernel limits (dry run): would have refused 1 SYNs from 2001:db8::/64".to_string(),
            ]
        );
        log.note(&[refused("192.0.2.1", 5, false)], &[limit()]);
        assert!(
            log.due(at(1059)).is_empty(),
            "a second line within the minute"
        );
        log.note(&[refused("192.0.2.1", 1, false)], &[limit()]);
        assert_eq!(
            log.due(at(1060)),
            vec!["kernel limits: refused 6 SYNs from 192.0.2.0/24".to_string()]
        );
        assert!(
            log.due(at(2000)).is_empty(),
            "nothing refused, nothing logged"
        );
    }

    #[test]
    fn refusals_reach_the_series_and_the_counters() {
        let mut config = crate::config::Config {
            monitors: vec!["60,1".parse().unwrap()],
            ..Default::default()
        };
        config.kernel_limits = vec![limit()];
        let state = SharedState::new(config, Default::default());
        let mut log = RefusalLog::default();
        let now = unix_now();
        apply(
            &[
                refused("192.0.2.1", 3, false),
                refused("192.0.2.2", 2, true),
            ],
            &state,
            &mut log,
            now,
        );
        let net: IpNet = "192.0.2.0/24".parse().unwrap();
        let monitors = state.lock_monitors();
        let sum = monitors
            .iter()
            .map(|m| m.sum(Series::Refusals, &net, 0, 0, now))
            .sum::<u64>();
        assert_eq!(sum, 5);
        assert_eq!(AgentStats::get(&state.stats.kernel_limit_refusals), 3);
        assert_eq!(
            AgentStats::get(&state.stats.kernel_limit_dry_run_refusals),
            2
        );
    }
}

//! `cut_existing`, run at start-up (after seeding, so sessions that predate
//! the agent are candidates), after each reload, and after each reconcile
//! pass (agent::reconcile): the kernel cuts (see kernel::cut), the agent
//! counts and logs. A pass logs one line per prefix it cut, never one per
//! session; once cut, a prefix is under its limit and the next pass leaves it.

use std::collections::HashMap;

use crate::{
    config::kernel_limits::KernelLimitConfig,
    counting::state::{AgentStats, SharedState},
    kernel::{api::Kernel, cut::CutReport},
};

/// Cuts what `limits` ask for and accounts for it; `when` names the pass in
/// the log ("start-up", "SIGHUP", "reconcile").
pub(super) fn cut_over_limits<K: Kernel + ?Sized>(
    program: &mut K,
    limits: &[KernelLimitConfig],
    slots: &HashMap<String, u8>,
    state: &SharedState,
    when: &str,
) {
    match program.cut_over_limits(limits, slots) {
        Ok(report) => account(&report, state, when),
        Err(e) => log::error!("{when}: kernel limits: cutting sessions over a limit failed: {e}"),
    }
}

fn account(report: &CutReport, state: &SharedState, when: &str) {
    let stats = &state.stats;
    AgentStats::add(&stats.kernel_limit_cuts, report.total(false));
    AgentStats::add(&stats.kernel_limit_dry_run_cuts, report.total(true));
    for line in lines(report, when) {
        log::warn!("{line}");
    }
    if let Some(e) = &report.error {
        log::error!(
            "{when}: kernel limits: stopped cutting: {e} (cutting needs CAP_NET_ADMIN, kept \
             after start-up only when the start-up configuration has cut_existing; restart \
             the agent after enabling it by a reload)"
        );
    }
}

fn lines(report: &CutReport, when: &str) -> Vec<String> {
    report
        .prefixes
        .iter()
        .map(|p| {
            if p.dry_run {
                format!(
                    "{when}: kernel limits (dry run): would have cut {} sessions from {} (over max {})",
                    p.sessions, p.prefix, p.max
                )
            } else {
                format!(
                    "{when}: kernel limits: cut {} sessions from {} (over max {}) with a RST",
                    p.sessions, p.prefix, p.max
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::cut::PrefixCuts;

    #[test]
    fn one_line_and_one_count_per_prefix() {
        let report = CutReport {
            prefixes: vec![
                PrefixCuts {
                    prefix: "192.0.2.0/24".parse().unwrap(),
                    max: 3,
                    dry_run: false,
                    sessions: 2,
                },
                PrefixCuts {
                    prefix: "2001:db8::/64".parse().unwrap(),
                    max: 3,
                    dry_run: true,
                    sessions: 4,
                },
            ],
            error: None,
        };
        assert_eq!(
            lines(&report, "SIGHUP"),
            vec![
                "SIGHUP: kernel limits: cut 2 sessions from 192.0.2.0/24 (over max 3) with a RST"
                    .to_string(),
                "SIGHUP: kernel limits (dry run): would have cut 4 sessions from 2001:db8::/64 \
                 (over max 3)"
                    .to_string(),
            ]
        );
        let state = SharedState::new(Default::default(), Default::default());
        account(&report, &state, "SIGHUP");
        assert_eq!(AgentStats::get(&state.stats.kernel_limit_cuts), 2);
        assert_eq!(AgentStats::get(&state.stats.kernel_limit_dry_run_cuts), 4);
    }
}

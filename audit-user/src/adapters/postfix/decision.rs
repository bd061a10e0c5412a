//! The answer to one request: the first limit the client is over decides
//! it; which answers count as rejections; what a connection remembers so one
//! refused message counts once. At END-OF-MESSAGE a reception is recorded.

use std::{net::IpAddr, time::Duration};

use crate::{
    adapters::postfix::{
        limits::exceeded,
        reader::{PolicyError, PolicyRequest},
    },
    counting::state::SharedState,
    domain::{Limit, Series},
};

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Without the `action=` prefix.
    pub action: String,
    /// The answer refuses (reject or defer): counted as a rejection.
    pub refuses: bool,
}

/// Judges `request` against `limits`; records receptions and rejections.
pub fn decide(
    request: &PolicyRequest,
    limits: &[Limit],
    state: &SharedState,
    now: Duration,
    memory: &mut PolicyMemory,
) -> Result<Decision, PolicyError> {
    let client = request.client()?;
    let judged = judge(request, client, limits, state, now);
    Ok(conclude(request, client, judged, state, now, memory))
}

/// The first limit the client is over, as a refusing decision; None when
/// none fires (or at END-OF-MESSAGE, where limits are not checked).
pub fn judge(
    request: &PolicyRequest,
    client: IpAddr,
    limits: &[Limit],
    state: &SharedState,
    now: Duration,
) -> Option<Decision> {
    // The session asking is counted before it is judged.
    state.drain_events(now);
    if request.get("protocol_state") == Some("END-OF-MESSAGE") {
        return None;
    }
    for limit in limits {
        if let Some(over) = exceeded(limit, client, request, state, now) {
            let rule = limit.rule();
            return Some(Decision {
                action: format!(
                    "{} Too many {} from {}: {} (limit {}) [inbound-audit]",
                    rule.action, over.what, over.net, over.count, rule.max
                ),
                refuses: refuses(&rule.action),
            });
        }
    }
    None
}

/// A decision of the Lua policy scripts, as an answer.
pub fn scripted(action: String) -> Decision {
    Decision {
        refuses: refuses(&action),
        action,
    }
}

/// Records what `decision` (None: `dunno`) means for the counts: a refusal
/// is a rejection (once per transaction), an accepted END-OF-MESSAGE a reception.
pub fn conclude(
    request: &PolicyRequest,
    client: IpAddr,
    decision: Option<Decision>,
    state: &SharedState,
    now: Duration,
    memory: &mut PolicyMemory,
) -> Decision {
    let last_refused = &mut memory.last_refused;
    let decision = decision.unwrap_or_else(|| Decision {
        action: "dunno".into(),
        refuses: false,
    });
    if decision.refuses {
        // One message refused at several recipients is one rejection: Postfix
        // names the transaction in `instance`.
        let instance = request.get("instance").map(str::to_string);
        if instance.is_none() || instance != *last_refused {
            record(state, Series::Rejections, client, now);
        }
        *last_refused = instance;
    } else if request.get("protocol_state") == Some("END-OF-MESSAGE") {
        record(state, Series::Receptions, client, now);
    }
    state.stats.observed.policy_answer(&decision.action);
    decision
}

/// What one policy connection remembers between requests.
#[derive(Debug, Default)]
pub struct PolicyMemory {
    last_refused: Option<String>,
}

/// Whether an access(5) action refuses the mail (a 4xx/5xx code, reject, defer,
/// defer_if_permit). Not `defer_if_reject`: it defers only a message that a
/// later restriction rejects, and that refusal is Postfix's own, which never
/// reaches the agent; counting it here would count mail Postfix accepts.
pub fn refuses(action: &str) -> bool {
    let word = action
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    word.starts_with('4')
        || word.starts_with('5')
        || matches!(
            word.as_str(),
            "reject" | "defer" | "defer_if_permit" | "reject_unauth_destination"
        )
}

pub fn record(state: &SharedState, series: Series, client: IpAddr, now: Duration) {
    state.stats.observed.recorded(series, 1);
    let mut monitors = state.lock_monitors();
    if !monitors.is_empty() {
        monitors.record(series, client, 1, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::postfix::test_support::{limits, request, state};

    #[test]
    fn limits_fire_with_their_text_and_count_rejections() {
        let state = state();
        let limits = limits();
        let now = Duration::from_secs(1000);
        let from = |ip: &str| {
            request(&[
                ("request", "smtpd_access_policy"),
                ("protocol_state", "RCPT"),
                ("client_address", ip),
            ])
        };
        let mut memory = PolicyMemory::default();
        let decision = decide(&from("192.0.2.7"), &limits, &state, now, &mut memory).unwrap();
        assert_eq!(
            decision.action,
            "421 4.7.0 Too many SMTP sessions from 192.0.2.0/24: 3 (limit 2) [inbound-audit]"
        );
        assert!(decision.refuses);
        let decision = decide(&from("198.51.100.1"), &limits, &state, now, &mut memory).unwrap();
        assert_eq!(
            decision,
            Decision {
                action: "dunno".into(),
                refuses: false
            }
        );
        for _ in 0..5 {
            state.lock_monitors().record(
                Series::Connections,
                "198.51.100.1".parse().unwrap(),
                1,
                now,
            );
        }
        let decision = decide(&from("198.51.100.1"), &limits, &state, now, &mut memory).unwrap();
        assert_eq!(
            decision.action,
            "defer_if_permit Too many connections in \"60,1\" window 0 from 198.51.100.1/32: 5 (limit 4) [inbound-audit]"
        );
        let monitors = state.lock_monitors();
        let monitor = monitors.by_position(0).unwrap();
        assert_eq!(
            monitor.sum(
                Series::Rejections,
                &"192.0.2.7/32".parse().unwrap(),
                0,
                0,
                now
            ),
            1
        );
        assert_eq!(
            monitor.sum(
                Series::Rejections,
                &"198.51.100.1/32".parse().unwrap(),
                0,
                0,
                now
            ),
            1
        );
    }

    #[test]
    fn only_actions_that_refuse_the_mail_count_as_rejections() {
        for action in [
            "421 4.7.0 Too many",
            "550 5.7.1",
            "REJECT go away",
            "defer",
            "defer_if_permit",
        ] {
            assert!(refuses(action), "{action}");
        }
        for action in [
            "defer_if_reject",
            "dunno",
            "OK",
            "warn watch this",
            "prepend X-Audit: 1",
            "",
        ] {
            assert!(!refuses(action), "{action}");
        }
    }

    #[test]
    fn a_message_refused_at_several_recipients_is_one_rejection() {
        let state = state();
        let limits = limits();
        let now = Duration::from_secs(1000);
        let mut memory = PolicyMemory::default();
        let rcpt = |instance: &str| {
            request(&[
                ("protocol_state", "RCPT"),
                ("client_address", "192.0.2.9"),
                ("instance", instance),
            ])
        };
        for instance in ["a.1", "a.1", "a.1", "b.2"] {
            assert!(
                decide(&rcpt(instance), &limits, &state, now, &mut memory)
                    .unwrap()
                    .refuses
            );
        }
        let monitors = state.lock_monitors();
        let net = "192.0.2.9/32".parse().unwrap();
        assert_eq!(
            monitors
                .by_position(0)
                .unwrap()
                .sum(Series::Rejections, &net, 0, 0, now),
            2
        );
    }

    #[test]
    fn end_of_message_records_a_reception() {
        let state = state();
        let limits = limits();
        let now = Duration::from_secs(1000);
        let eom = request(&[
            ("protocol_state", "END-OF-MESSAGE"),
            ("client_address", "192.0.2.1"),
        ]);
        let mut memory = PolicyMemory::default();
        assert_eq!(
            decide(&eom, &limits, &state, now, &mut memory)
                .unwrap()
                .action,
            "dunno"
        );
        let monitors = state.lock_monitors();
        assert_eq!(
            monitors.by_position(0).unwrap().sum(
                Series::Receptions,
                &"192.0.2.0/24".parse().unwrap(),
                0,
                0,
                now
            ),
            1
        );
    }

    #[test]
    fn a_request_without_client_address_is_an_error() {
        let state = state();
        let no_client = request(&[("protocol_state", "RCPT")]);
        assert!(matches!(
            decide(
                &no_client,
                &[],
                &state,
                Duration::ZERO,
                &mut PolicyMemory::default()
            ),
            Err(PolicyError::NoClientAddress)
        ));
    }
}

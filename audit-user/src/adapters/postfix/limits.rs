//! One limit against the counts the query socket serves: live sessions of a
//! service from the client's network, or a series in a monitor's windows.

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;

use crate::{
    adapters::postfix::reader::PolicyRequest,
    counting::state::SharedState,
    domain::{Limit, DEFAULT_SERVICE},
};

/// A limit's count for one client, and what it counted for the explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub count: u64,
    /// E.g. `SMTP sessions`, `connections in "60,1" window 0`.
    pub what: String,
    /// The client's network at the limit's prefix length.
    pub net: IpNet,
}

/// Counts for `limit` what `client` (asking with `request`) has now; Some
/// when that is over the limit's max. The explanation is written only then:
/// every request is judged, and almost none is refused.
pub fn exceeded(
    limit: &Limit,
    client: IpAddr,
    request: &PolicyRequest,
    state: &SharedState,
    now: Duration,
) -> Option<Counted> {
    let rule = limit.rule();
    let net = rule.prefixes.network(client);
    let over = |count: u64| count > rule.max;
    match limit {
        Limit::Sessions { service, .. } => {
            let setup = state.setup();
            let service = service
                .as_deref()
                .or_else(|| {
                    request
                        .get("server_port")
                        .and_then(|p| p.parse().ok())
                        .and_then(|port| setup.config.service_of_port(port))
                })
                .unwrap_or(DEFAULT_SERVICE);
            let mut count = setup
                .slots
                .get(service)
                .map_or(0, |&slot| state.read_sessions().count(slot, &net));
            if rule.cluster {
                count = count.saturating_add(fleet(state, |f| f.sessions(service, &net)));
            }
            let scope = if rule.cluster {
                " over the cluster"
            } else {
                ""
            };
            over(count).then(|| Counted {
                count,
                what: format!("{service} sessions{scope}"),
                net,
            })
        }
        Limit::Windowed {
            series,
            monitor,
            first,
            last,
            ..
        } => {
            let mut count = state
                .lock_monitors()
                .by_spec(monitor)
                .map_or(0, |m| m.sum(*series, &net, *first, *last, now));
            if rule.cluster {
                let others = fleet(state, |f| {
                    f.windows(None, *monitor, *series, &net, (*first, *last), now)
                });
                count = count.saturating_add(others);
            }
            over(count).then(|| {
                let windows = if first == last {
                    format!("window {first}")
                } else {
                    format!("windows {first}-{last}")
                };
                Counted {
                    count,
                    what: format!("{} in \"{monitor}\" {windows}", series.name()),
                    net,
                }
            })
        }
    }
}

/// What the other nodes add, from the fleet view; 0 while it is unavailable
/// (Redis gone for longer than node_ttl): the limit then judges this node's
/// own counts, as Postfix would fail open on no answer at all.
fn fleet(state: &SharedState, count: impl FnOnce(&crate::cluster::Fleet) -> u64) -> u64 {
    state
        .cluster()
        .and_then(|view| view.fleet().ok())
        .map_or(0, |fleet| count(&fleet))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        adapters::postfix::test_support::{request, state},
        config::LimitConfig,
        domain::Series,
    };

    fn limit(text: &str) -> Limit {
        toml::from_str::<LimitConfig>(text)
            .unwrap()
            .check()
            .unwrap()
    }

    #[test]
    fn counts_name_what_they_counted() {
        let state = state();
        let now = Duration::from_secs(1000);
        let client: IpAddr = "192.0.2.200".parse().unwrap();
        let asking = request(&[("client_address", "192.0.2.200"), ("server_port", "25")]);
        // The service of server_port 25: SMTP, three live sessions in the /24.
        let sessions =
            limit("count = \"sessions\"\nipv4_prefix = 24\nmax = 2\naction = \"reject\"");
        assert_eq!(
            exceeded(&sessions, client, &asking, &state, now),
            Some(Counted {
                count: 3,
                what: "SMTP sessions".into(),
                net: "192.0.2.0/24".parse().unwrap(),
            })
        );
        // A named service without a slot has no sessions.
        let other = limit(
            "count = \"sessions\"\nservice = \"Submission\"\nipv4_prefix = 24\nmax = 0\naction = \"reject\"",
        );
        assert_eq!(exceeded(&other, client, &asking, &state, now), None);
        state
            .lock_monitors()
            .record(Series::Receptions, client, 2, now);
        let windowed = limit(
            "count = \"receptions\"\nmonitor = \"60,1\"\nendv = 1\nmax = 1\naction = \"450 4.7.1\"",
        );
        assert_eq!(
            exceeded(&windowed, client, &asking, &state, now).map(|c| (c.count, c.what)),
            Some((2, "receptions in \"60,1\" windows 0-1".to_string()))
        );
        assert_eq!(
            exceeded(
                &limit("count = \"receptions\"\nmonitor = \"60,1\"\nmax = 2\naction = \"reject\""),
                client,
                &asking,
                &state,
                now
            ),
            None,
            "fires only above max"
        );
    }
}

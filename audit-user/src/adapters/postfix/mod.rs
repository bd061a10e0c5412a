//! Postfix policy delegation (SMTPD_POLICY_README): `check_policy_service`
//! sends `name=value` lines ending with an empty line; we answer one
//! `action=...` line and an empty line. Connections are persistent. On trouble
//! (a malformed or oversized request) the server logs a warning and disconnects
//! without replying, as the protocol asks, and Postfix applies its default action.
//!
//! Each request is judged against the configured limits, from the same counts
//! the query socket serves: live sessions from the client's prefix, or
//! connections/receptions/rejections in a monitor's windows. At END-OF-MESSAGE a
//! reception is recorded; whenever the answer rejects or defers, a rejection.

use std::{collections::HashMap, io, net::IpAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::{
    counting::state::SharedState,
    domain::{unix_now, Limit, LimitCount, Series, DEFAULT_SERVICE},
    serving::{server::accept_loop, shutdown::Shutdown},
    sys::socket::QuerySocket,
};

/// Longest attribute line; Postfix's own are far shorter (a long client_name
/// or ccert field is well under this).
const MAX_LINE_LEN: usize = 4096;
/// Most attributes in one request; Postfix 3.7 sends about 30.
const MAX_ATTRIBUTES: usize = 128;

/// Why a request could not be read; the connection is then dropped unanswered.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("attribute line longer than {MAX_LINE_LEN} bytes")]
    LineTooLong,
    #[error("more than {MAX_ATTRIBUTES} attributes in one request")]
    TooManyAttributes,
    #[error("malformed attribute line {line:?} (expected name=value)")]
    Malformed { line: String },
    #[error("request without a usable client_address")]
    NoClientAddress,
    #[error("unsupported request type {0:?} (expected smtpd_access_policy)")]
    RequestType(String),
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One policy request: its attributes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    pub attributes: HashMap<String, String>,
}

impl PolicyRequest {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }

    fn client(&self) -> Result<IpAddr, PolicyError> {
        self.get("client_address")
            .and_then(|a| a.parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .ok_or(PolicyError::NoClientAddress)
    }
}

/// Reads requests off one connection; returns Ok(None) at a clean EOF between requests.
pub struct PolicyReader<R> {
    reader: R,
}

impl<R: tokio::io::AsyncBufRead + Unpin> PolicyReader<R> {
    pub fn new(reader: R) -> Self {
        Self { reader }
    }

    pub async fn next_request(&mut self) -> Result<Option<PolicyRequest>, PolicyError> {
        let mut request = PolicyRequest::default();
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE_LEN as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return if request.attributes.is_empty() {
                    Ok(None)
                } else {
                    Err(PolicyError::Truncated)
                };
            }
            if line.last() != Some(&b'\n') {
                return Err(if line.len() > MAX_LINE_LEN {
                    PolicyError::LineTooLong
                } else {
                    PolicyError::Truncated
                });
            }
            line.pop();
            if line.is_empty() {
                if request.attributes.is_empty() {
                    // Stray empty lines between requests are harmless.
                    continue;
                }
                if let Some(kind) = request.get("request") {
                    if kind != "smtpd_access_policy" {
                        return Err(PolicyError::RequestType(kind.to_string()));
                    }
                }
                return Ok(Some(request));
            }
            let text = String::from_utf8_lossy(&line);
            let Some((name, value)) = text.split_once('=') else {
                return Err(PolicyError::Malformed {
                    line: text.chars().take(80).collect(),
                });
            };
            if name.is_empty() {
                return Err(PolicyError::Malformed {
                    line: text.chars().take(80).collect(),
                });
            }
            if request.attributes.len() >= MAX_ATTRIBUTES {
                return Err(PolicyError::TooManyAttributes);
            }
            request
                .attributes
                .insert(name.to_string(), value.to_string());
        }
    }
}

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
    let last_refused = &mut memory.last_refused;
    // The session asking is counted before it is judged.
    state.drain_events(now);
    let client = request.client()?;
    let end_of_message = request.get("protocol_state") == Some("END-OF-MESSAGE");
    let mut decision = Decision {
        action: "dunno".into(),
        refuses: false,
    };
    if end_of_message {
        record(state, Series::Receptions, client, now);
        return Ok(decision);
    }
    for limit in limits {
        let prefix = if client.is_ipv4() {
            limit.ipv4_prefix
        } else {
            limit.ipv6_prefix
        };
        let net = IpNet::new(client, prefix)
            .expect("prefix checked at load")
            .trunc();
        let (count, what) = match limit.count {
            LimitCount::Sessions => {
                let setup = state.setup();
                let service = limit
                    .service
                    .clone()
                    .or_else(|| {
                        request
                            .get("server_port")
                            .and_then(|p| p.parse().ok())
                            .and_then(|port| setup.config.service_of_port(port))
                            .map(str::to_string)
                    })
                    .unwrap_or_else(|| DEFAULT_SERVICE.to_string());
                let count = setup
                    .slots
                    .get(&service)
                    .map_or(0, |&slot| state.read_sessions().count(slot, &net));
                (count, format!("{service} sessions"))
            }
            windowed => {
                let series = match windowed {
                    LimitCount::Connections => Series::Connections,
                    LimitCount::Receptions => Series::Receptions,
                    _ => Series::Rejections,
                };
                let spec = limit.monitor.expect("checked at load");
                let monitors = state.lock_monitors();
                let count = monitors
                    .by_key(&spec.to_string())
                    .map_or(0, |m| m.sum(series, &net, limit.first, limit.last, now));
                let windows = if limit.first == limit.last {
                    format!("window {}", limit.first)
                } else {
                    format!("windows {}-{}", limit.first, limit.last)
                };
                (count, format!("{} in \"{spec}\" {windows}", series.name()))
            }
        };
        if count > limit.max {
            decision = Decision {
                action: format!(
                    "{} Too many {what} from {net}: {count} (limit {}) [inbound-audit]",
                    limit.action, limit.max
                ),
                refuses: refuses(&limit.action),
            };
            break;
        }
    }
    if decision.refuses {
        // One message refused at several recipients is one rejection: Postfix
        // names the transaction in `instance`.
        let instance = request.get("instance").map(str::to_string);
        if instance.is_none() || instance != *last_refused {
            record(state, Series::Rejections, client, now);
        }
        *last_refused = instance;
    }
    Ok(decision)
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
fn refuses(action: &str) -> bool {
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

fn record(state: &SharedState, series: Series, client: IpAddr, now: Duration) {
    let mut monitors = state.lock_monitors();
    if !monitors.is_empty() {
        monitors.record(series, client, 1, now);
    }
}

/// Serves policy requests until `shutdown` fires.
pub async fn serve(socket: QuerySocket, state: Arc<SharedState>, shutdown: Shutdown) {
    let max = state.setup().config.max_clients;
    let stop = shutdown.clone();
    let refuse = move |_stream| async move {
        // The protocol has no busy answer: Postfix applies its default action.
        log::warn!("policy socket: too many clients (max_clients = {max}); dropping one");
    };
    accept_loop(&socket, max, shutdown, refuse, move |stream| {
        let (state, stop) = (state.clone(), stop.clone());
        async move {
            if let Err(e) = handle(stream, &state, stop).await {
                log::warn!("postfix policy client dropped: {e}");
            }
        }
    })
    .await;
}

async fn handle(
    stream: UnixStream,
    state: &SharedState,
    mut stop: Shutdown,
) -> Result<(), PolicyError> {
    let (read, mut write) = stream.into_split();
    let mut requests = PolicyReader::new(BufReader::new(read));
    let mut memory = PolicyMemory::default();
    loop {
        let request = tokio::select! {
            _ = stop.wait() => return Ok(()),
            request = requests.next_request() => request?,
        };
        let Some(request) = request else {
            return Ok(());
        };
        // Limits are read per request, so a SIGHUP reload applies at once.
        let setup = state.setup();
        let decision = decide(
            &request,
            &setup.config.policy_limits,
            state,
            unix_now(),
            &mut memory,
        )?;
        if decision.refuses {
            log::info!(
                "postfix policy: {} {} -> {}",
                request.get("client_address").unwrap_or("?"),
                request.get("protocol_state").unwrap_or("?"),
                decision.action
            );
        }
        write
            .write_all(format!("action={}\n\n", decision.action).as_bytes())
            .await?;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use audit_common::{SessionEvent, EVENT_OPEN, FAMILY_V4};

    use super::*;
    use crate::{
        config::{Config, LimitConfig},
        counting::state::ApplyOutcome,
        domain::ServicePorts,
    };

    fn state() -> SharedState {
        let config = Config {
            services: vec![ServicePorts {
                name: "SMTP".into(),
                ports: vec![25],
            }],
            monitors: vec!["60,1".parse().unwrap()],
            ..Config::default()
        };
        let state = SharedState::new(config, HashMap::from([("SMTP".to_string(), 0u8)]));
        let mut outcome = ApplyOutcome::default();
        for last in [1u8, 2, 3] {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&[192, 0, 2, last]);
            let event = SessionEvent {
                cookie: 0,
                addr,
                kind: EVENT_OPEN,
                family: FAMILY_V4,
                service: 0,
                _pad: [0; 5],
            };
            state.write_sessions().apply(&event, &mut outcome);
        }
        state
    }

    fn limits() -> Vec<Limit> {
        let configs: Vec<LimitConfig> = toml::from_str::<HashMap<String, Vec<LimitConfig>>>(
            r#"
            limits = [
              { count = "sessions", ipv4_prefix = 24, ipv6_prefix = 64, max = 2, action = "421 4.7.0" },
              { count = "connections", monitor = "60,1", max = 4, action = "defer_if_permit" },
            ]
            "#,
        )
        .unwrap()
        .remove("limits")
        .unwrap();
        configs.into_iter().map(|c| c.check().unwrap()).collect()
    }

    fn request(pairs: &[(&str, &str)]) -> PolicyRequest {
        PolicyRequest {
            attributes: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

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
    fn limit_config_errors_name_the_problem() {
        let check = |text: &str| {
            toml::from_str::<LimitConfig>(text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.check())
        };
        assert!(check("count = \"sessions\"\nmax = 1\naction = \"reject\"").is_ok());
        for (text, needle) in [
            (
                "count = \"connections\"\nmax = 1\naction = \"reject\"",
                "need `monitor`",
            ),
            (
                "count = \"connections\"\nmonitor = \"300\"\nmax = 1\naction = \"reject\"",
                "expected \"W,N\"",
            ),
            (
                "count = \"sessions\"\nmonitor = \"60,1\"\nmax = 1\naction = \"reject\"",
                "only applies",
            ),
            (
                "count = \"sessions\"\nipv4_prefix = 33\nmax = 1\naction = \"reject\"",
                "at most 32",
            ),
            ("count = \"sessions\"\nmax = 1\naction = \"\"", "one line"),
            (
                "count = \"bytes\"\nmax = 1\naction = \"reject\"",
                "unknown variant",
            ),
            (
                "count = \"sessions\"\nmax = 1\naction = \"reject\"\ncolour = 1",
                "unknown field",
            ),
        ] {
            let error = check(text).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[tokio::test]
    async fn reader_follows_the_wire_rules() {
        let input: &[u8] = b"request=smtpd_access_policy\nclient_address=192.0.2.1\nfoo=a=b\n\n\nclient_address=::1\n\n";
        let mut reader = PolicyReader::new(BufReader::new(input));
        let first = reader.next_request().await.unwrap().unwrap();
        assert_eq!(first.get("client_address"), Some("192.0.2.1"));
        assert_eq!(first.get("foo"), Some("a=b"));
        let second = reader.next_request().await.unwrap().unwrap();
        assert_eq!(second.get("client_address"), Some("::1"));
        assert!(reader.next_request().await.unwrap().is_none());

        for (bad, expected) in [
            (&b"no equals sign\n\n"[..], "malformed"),
            (b"request=junk\n\n", "unsupported request type"),
            (b"client_address=1.2.3.4\n", "closed in the middle"),
        ] {
            let mut reader = PolicyReader::new(BufReader::new(bad));
            let error = reader.next_request().await.unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        let long = [b"x=".as_slice(), &vec![b'y'; 5000], b"\n\n"].concat();
        let mut reader = PolicyReader::new(BufReader::new(long.as_slice()));
        assert!(matches!(
            reader.next_request().await,
            Err(PolicyError::LineTooLong)
        ));
        let many: Vec<u8> = (0..200)
            .flat_map(|i| format!("a{i}=1\n").into_bytes())
            .collect();
        let mut reader = PolicyReader::new(BufReader::new(many.as_slice()));
        assert!(matches!(
            reader.next_request().await,
            Err(PolicyError::TooManyAttributes)
        ));
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

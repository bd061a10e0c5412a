//! `[[policy_limits]]` as written in the file, checked into a [`Limit`]: the
//! count decides the kind, so keys of the other kind are refused, and the
//! action must be one Postfix's access(5) accepts with our explanation after it.

use serde::Deserialize;

use crate::domain::{Limit, LimitRule, MonitorSpec, MonitorSpecError, Prefixes, Series};

/// What a limit counts, as the file names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitCount {
    /// Live sessions now.
    Sessions,
    Connections,
    Receptions,
    Rejections,
}

impl LimitCount {
    /// The monitor series a windowed count sums; None for live sessions.
    fn series(self) -> Option<Series> {
        match self {
            LimitCount::Sessions => None,
            LimitCount::Connections => Some(Series::Connections),
            LimitCount::Receptions => Some(Series::Receptions),
            LimitCount::Rejections => Some(Series::Rejections),
        }
    }
}

/// One limit as written in the config file (`[[policy_limits]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub count: LimitCount,
    /// Sessions only: the service; default the service of the client's
    /// server_port, else SMTP.
    pub service: Option<String>,
    /// Windowed counts only: the monitor ("W,N") and its windows (default 0..0).
    pub monitor: Option<String>,
    pub startv: Option<u32>,
    pub endv: Option<u32>,
    /// Prefix lengths the client's address is masked to (default /32 and /128).
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    /// The limit fires when the count is above this.
    pub max: u64,
    /// The access(5) action, e.g. "421 4.7.0", "defer_if_permit", "reject",
    /// "450 4.7.1"; our explanation follows it.
    pub action: String,
    /// `local` (default): this node's counts; `cluster`: the fleet's.
    pub scope: Option<Scope>,
}

/// Whose counts a limit compares with its max.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Local,
    Cluster,
}

/// Why a limit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("windowed limits need `monitor`")]
    NeedsMonitor,
    #[error(transparent)]
    Monitor(#[from] MonitorSpecError),
    #[error("`monitor` only applies to connections, receptions, rejections")]
    MonitorOnSessions,
    #[error("`startv`/`endv` only apply to windowed limits")]
    WindowsOnSessions,
    #[error("`service` only applies to session limits")]
    ServiceOnWindowed,
    #[error("ipv4_prefix is at most 32 and ipv6_prefix at most 128")]
    Prefix,
    #[error("`action` {action:?}: {problem}")]
    Action {
        action: String,
        problem: ActionError,
    },
}

/// What is wrong with an action, read as Postfix's smtpd reads a policy
/// answer (access(5), case-insensitive): the first word is the command, and
/// our explanation ("Too many ... [inbound-audit]") follows the whole action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    #[error("`action` must be one line, e.g. \"421 4.7.0\" or \"defer_if_permit\"")]
    NotOneLine,
    #[error("`{0}` is not a 4xx or 5xx SMTP reply code")]
    Code(String),
    #[error("enhanced status code {status} must be of the reply code's class {class}.x.x")]
    StatusClass { status: String, class: char },
    #[error("PREPEND needs a header name and colon, e.g. \"PREPEND X-Inbound-Audit: limited\"")]
    NeedsHeader,
    #[error(
        "{0} takes a target, and the explanation inbound-audit appends would become part of it"
    )]
    Targeted(String),
    #[error(
        "`{0}` names a restriction: Postfix would read the explanation inbound-audit appends \
         as more restrictions and answer with a configuration error"
    )]
    Restriction(String),
    #[error(
        "`{0}` is not an access(5) action; use a reply code (\"421 4.7.0\", \"550 5.7.1\"), \
         REJECT, DEFER, DEFER_IF_PERMIT, DEFER_IF_REJECT, HOLD, DISCARD, WARN, INFO, PREPEND, \
         OK or DUNNO"
    )]
    Unknown(String),
}

/// Checks `action` as Postfix will read it with our explanation after it:
/// only commands that take free text (or ignore it) are accepted.
pub fn check_action(action: &str) -> Result<(), ActionError> {
    if action.is_empty() || action.contains(['\n', '\r']) {
        return Err(ActionError::NotOneLine);
    }
    let (command, rest) = action
        .split_once([' ', '\t'])
        .map_or((action, ""), |(c, r)| (c, r.trim_start()));
    if command.bytes().all(|b| b.is_ascii_digit()) {
        return check_code(command, rest);
    }
    match command.to_ascii_uppercase().as_str() {
        "REJECT" | "DEFER" | "DEFER_IF_REJECT" | "DEFER_IF_PERMIT" | "HOLD" | "DISCARD"
        | "WARN" | "INFO" | "OK" | "DUNNO" => Ok(()),
        "PREPEND" => {
            let name = rest.split_once(':').map_or("", |(name, _)| name);
            // RFC 5322 field names: printable ASCII but for the colon.
            if !name.is_empty() && name.bytes().all(|b| (33..=126).contains(&b)) {
                Ok(())
            } else {
                Err(ActionError::NeedsHeader)
            }
        }
        "BCC" | "FILTER" | "REDIRECT" => Err(ActionError::Targeted(command.to_ascii_uppercase())),
        _ if is_restriction(command) => Err(ActionError::Restriction(command.to_string())),
        _ => Err(ActionError::Unknown(command.to_string())),
    }
}

/// A 4xx/5xx code, and an enhanced status code after it (RFC 3463) of the
/// same class if there is one.
fn check_code(code: &str, rest: &str) -> Result<(), ActionError> {
    let class = code.chars().next().filter(|c| matches!(c, '4' | '5'));
    let Some(class) = class.filter(|_| code.len() == 3) else {
        // All digits otherwise is access(5)'s "all-numerical" (OK), which
        // takes no text: ours would make it an unknown restriction.
        return Err(ActionError::Code(code.to_string()));
    };
    let status = rest.split_whitespace().next().unwrap_or("");
    let parts: Vec<&str> = status.split('.').collect();
    let looks_like_status = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if looks_like_status && !status.starts_with(class) {
        return Err(ActionError::StatusClass {
            status: status.to_string(),
            class,
        });
    }
    Ok(())
}

/// Postfix's smtpd restriction names (permit_mynetworks, reject_rbl_client,
/// check_sender_access, ...), which access(5) also allows as results.
fn is_restriction(word: &str) -> bool {
    let word = word.to_ascii_lowercase();
    word == "permit"
        || [
            "permit_", "reject_", "check_", "defer_", "warn_if_", "sleep",
        ]
        .iter()
        .any(|prefix| word.starts_with(prefix))
}

impl LimitConfig {
    /// Checks the limit on its own; whether its service and monitor are
    /// configured is checked with the whole configuration (flags may add them),
    /// in `Config::check_references`.
    pub fn check(self) -> Result<Limit, LimitError> {
        // The kind's keys first, then the shared ones, as before the kinds
        // were types: a limit with several faults reports the same one.
        let windowed = match (self.count.series(), self.monitor) {
            (Some(series), Some(text)) => Some((series, text.parse::<MonitorSpec>()?)),
            (Some(_), None) => return Err(LimitError::NeedsMonitor),
            (None, Some(_)) => return Err(LimitError::MonitorOnSessions),
            (None, None) => None,
        };
        if windowed.is_none() && (self.startv.is_some() || self.endv.is_some()) {
            return Err(LimitError::WindowsOnSessions);
        }
        if windowed.is_some() && self.service.is_some() {
            return Err(LimitError::ServiceOnWindowed);
        }
        let prefixes = Prefixes::new(
            self.ipv4_prefix.unwrap_or(32),
            self.ipv6_prefix.unwrap_or(128),
        )
        .ok_or(LimitError::Prefix)?;
        let action = self.action.trim().to_string();
        check_action(&action).map_err(|problem| LimitError::Action {
            action: action.clone(),
            problem,
        })?;
        let rule = LimitRule {
            prefixes,
            cluster: self.scope == Some(Scope::Cluster),
            max: self.max,
            action,
        };
        Ok(match windowed {
            Some((series, monitor)) => Limit::Windowed {
                series,
                monitor,
                first: self.startv.unwrap_or(0),
                last: self.endv.unwrap_or(0),
                rule,
            },
            None => Limit::Sessions {
                service: self.service,
                rule,
            },
        })
    }
}

/// A `[[policy_limits]]` entry, checked as it is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "LimitConfig")]
pub struct PolicyLimit(pub Limit);

impl TryFrom<LimitConfig> for PolicyLimit {
    type Error = LimitError;

    fn try_from(config: LimitConfig) -> Result<Self, LimitError> {
        config.check().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_config_errors_name_the_problem() {
        let check = |text: &str| {
            toml::from_str::<LimitConfig>(text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.check().map_err(|e| e.to_string()))
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

    #[test]
    fn kinds_carry_only_their_keys() {
        let limit = |text: &str| toml::from_str::<LimitConfig>(text).unwrap().check();
        assert!(matches!(
            limit("count = \"rejections\"\nmonitor = \"60,2\"\nendv = 1\nmax = 3\naction = \"450 4.7.1\""),
            Ok(Limit::Windowed { series: Series::Rejections, first: 0, last: 1, ref rule, .. })
                if rule.max == 3 && rule.action == "450 4.7.1"
        ));
        assert!(matches!(
            limit("count = \"sessions\"\nservice = \"Submission\"\nmax = 3\naction = \"reject\""),
            Ok(Limit::Sessions { service: Some(ref s), .. }) if s == "Submission"
        ));
        assert_eq!(
            limit("count = \"sessions\"\nendv = 1\nmax = 3\naction = \"reject\""),
            Err(LimitError::WindowsOnSessions)
        );
        assert_eq!(
            limit("count = \"receptions\"\nmonitor = \"60,1\"\nservice = \"SMTP\"\nmax = 3\naction = \"reject\""),
            Err(LimitError::ServiceOnWindowed)
        );
    }

    #[test]
    fn actions_are_what_access5_accepts_with_our_text_after_them() {
        for good in [
            "421 4.7.0",
            "421",
            "450 4.7.1 Slow down",
            "550 5.7.1",
            "521",
            "REJECT",
            "reject go away",
            "Defer",
            "DEFER_IF_PERMIT",
            "defer_if_reject",
            "HOLD",
            "discard",
            "WARN",
            "info",
            "OK",
            "dunno",
            "PREPEND X-Inbound-Audit: over the limit",
            "prepend X-Inbound-Audit:",
        ] {
            assert_eq!(check_action(good), Ok(()), "{good}");
        }
        for (bad, problem) in [
            ("hello world", ActionError::Unknown("hello".into())),
            ("rejected", ActionError::Unknown("rejected".into())),
            ("250 ok", ActionError::Code("250".into())),
            ("600", ActionError::Code("600".into())),
            ("4211 x", ActionError::Code("4211".into())),
            ("1234", ActionError::Code("1234".into())),
            (
                "450 5.7.1",
                ActionError::StatusClass {
                    status: "5.7.1".into(),
                    class: '4',
                },
            ),
            ("PREPEND", ActionError::NeedsHeader),
            ("prepend no colon", ActionError::NeedsHeader),
            (
                "REDIRECT a@example.org",
                ActionError::Targeted("REDIRECT".into()),
            ),
            (
                "filter smtp:[127.0.0.1]:10025",
                ActionError::Targeted("FILTER".into()),
            ),
            ("BCC a@example.org", ActionError::Targeted("BCC".into())),
            (
                "reject_unauth_destination",
                ActionError::Restriction("reject_unauth_destination".into()),
            ),
            ("permit", ActionError::Restriction("permit".into())),
            ("reject\nx", ActionError::NotOneLine),
        ] {
            assert_eq!(check_action(bad), Err(problem), "{bad}");
        }
        let error = toml::from_str::<LimitConfig>(
            "count = \"sessions\"\nmax = 1\naction = \"hello world\"",
        )
        .unwrap()
        .check()
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("\"hello world\"") && error.contains("not an access(5) action"),
            "{error}"
        );
    }
}

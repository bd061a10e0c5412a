//! `[[policy_limits]]` as written in the file, checked into a [`Limit`].

use serde::Deserialize;

use crate::domain::{Limit, LimitCount, MonitorSpec, MonitorSpecError};

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
}

impl LimitConfig {
    /// Checks the limit on its own; whether its service and monitor are
    /// configured is checked with the whole configuration (flags may add them),
    /// in `Config::validate`. The error names what is wrong.
    pub fn check(self) -> Result<Limit, String> {
        let windowed = self.count != LimitCount::Sessions;
        let monitor = match (&self.monitor, windowed) {
            (Some(text), true) => {
                let spec: MonitorSpec =
                    text.parse().map_err(|e: MonitorSpecError| e.to_string())?;
                Some(spec)
            }
            (None, true) => return Err("windowed limits need `monitor`".into()),
            (Some(_), false) => {
                return Err("`monitor` only applies to connections, receptions, rejections".into())
            }
            (None, false) => None,
        };
        if !windowed && (self.startv.is_some() || self.endv.is_some()) {
            return Err("`startv`/`endv` only apply to windowed limits".into());
        }
        if windowed && self.service.is_some() {
            return Err("`service` only applies to session limits".into());
        }
        let ipv4_prefix = self.ipv4_prefix.unwrap_or(32);
        let ipv6_prefix = self.ipv6_prefix.unwrap_or(128);
        if ipv4_prefix > 32 || ipv6_prefix > 128 {
            return Err("ipv4_prefix is at most 32 and ipv6_prefix at most 128".into());
        }
        let action = self.action.trim().to_string();
        if action.is_empty() || action.contains(['\n', '\r']) {
            return Err(
                "`action` must be one line, e.g. \"421 4.7.0\" or \"defer_if_permit\"".into(),
            );
        }
        Ok(Limit {
            count: self.count,
            service: self.service,
            monitor,
            first: self.startv.unwrap_or(0),
            last: self.endv.unwrap_or(0),
            ipv4_prefix,
            ipv6_prefix,
            max: self.max,
            action,
        })
    }
}

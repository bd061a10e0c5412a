//! The types every layer shares: services and their ports, monitor specs and
//! the series they count, policy limits, the names and defaults that several
//! layers must agree on, and the clock monitor windows are aligned on. It
//! imports nothing from the crate: everything else builds on it.

use std::{fmt, str::FromStr, time::Duration};

/// The service relative forms and Sieve calls count when none is named.
pub const DEFAULT_SERVICE: &str = "SMTP";
/// Momentum's cluster-wide service name; never a local service.
pub const CLUSTER_SERVICE: &str = "inbound_cidr";
/// Where the kernel programs and maps are pinned by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/inbound-audit";

/// Time since the Unix epoch: monitor windows are aligned on it.
pub fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A named set of local ports, e.g. SMTP = 25, 465, 587.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePorts {
    pub name: String,
    pub ports: Vec<u16>,
}

impl fmt::Display for ServicePorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        write!(f, "{}={}", self.name, ports.join(","))
    }
}

/// What a monitor counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Series {
    /// Connections accepted by the kernel on any configured service.
    Connections,
    /// Messages received, as reported by the MTA.
    Receptions,
    /// Messages rejected, as reported by the MTA.
    Rejections,
}

impl Series {
    pub const ALL: [Series; 3] = [Series::Connections, Series::Receptions, Series::Rejections];

    pub(crate) fn slot(self) -> usize {
        self as usize
    }

    /// The name Momentum's console prints (`Connections 300/0: 30`).
    pub fn title(self) -> &'static str {
        match self {
            Series::Connections => "Connections",
            Series::Receptions => "Receptions",
            Series::Rejections => "Rejections",
        }
    }

    /// The name in requests (`msys.audit.receptions`, `add receptions`).
    pub fn name(self) -> &'static str {
        match self {
            Series::Connections => "connections",
            Series::Receptions => "receptions",
            Series::Rejections => "rejections",
        }
    }
}

/// "W,N": windows of W seconds, N previous ones kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MonitorSpec {
    pub window_secs: u64,
    pub kept: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("monitor {text:?}: {reason} (expected \"W,N\": N windows of W seconds, e.g. \"300,6\")")]
pub struct MonitorSpecError {
    pub text: String,
    pub reason: &'static str,
}

impl FromStr for MonitorSpec {
    type Err = MonitorSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| MonitorSpecError {
            text: text.to_string(),
            reason,
        };
        let (window, kept) = text.split_once(',').ok_or_else(|| error("no comma"))?;
        let window_secs: u64 = window
            .trim()
            .parse()
            .map_err(|_| error("W is not a whole number"))?;
        let kept: u32 = kept
            .trim()
            .parse()
            .map_err(|_| error("N is not a whole number"))?;
        if window_secs == 0 || window_secs > 366 * 86_400 {
            return Err(error("W must be 1 second to 1 year"));
        }
        if kept == 0 || kept > 10_000 {
            return Err(error("N must be 1 to 10000"));
        }
        Ok(Self { window_secs, kept })
    }
}

impl fmt::Display for MonitorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.window_secs, self.kept)
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitCount {
    /// Live sessions now.
    Sessions,
    Connections,
    Receptions,
    Rejections,
}

/// A checked limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub count: LimitCount,
    pub service: Option<String>,
    pub monitor: Option<MonitorSpec>,
    pub first: u32,
    pub last: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub max: u64,
    pub action: String,
}

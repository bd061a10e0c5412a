//! The types every layer shares: services and their ports, monitor specs and
//! the series they count, policy limits, the names and defaults that several
//! layers must agree on, and the clock monitor windows are aligned on. It
//! imports nothing from the crate: everything else builds on it.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use ipnet::IpNet;

/// The service relative forms and Sieve calls count when none is named.
pub const DEFAULT_SERVICE: &str = "SMTP";
/// Momentum's cluster-wide service name; never a local service.
pub const CLUSTER_SERVICE: &str = "inbound_cidr";
/// Where the kernel programs and maps are pinned by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/inbound-audit";

/// Longest node name in a cluster.
pub const MAX_NODE_NAME_LEN: usize = 64;

/// Node names are part of Redis keys: letters, digits and `_ - .` only.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NODE_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

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
    /// SYNs a kernel limit refused (or, in dry run, would have refused).
    Refusals,
}

impl Series {
    pub const ALL: [Series; 4] = [
        Series::Connections,
        Series::Receptions,
        Series::Rejections,
        Series::Refusals,
    ];
    pub const COUNT: usize = Self::ALL.len();
    /// The series the monitor state file holds, a prefix of `ALL`: the file
    /// format predates `Refusals`, whose windows start empty after a restart.
    pub const PERSISTED: usize = 3;

    pub(crate) fn slot(self) -> usize {
        self as usize
    }

    /// The name Momentum's console prints (`Connections 300/0: 30`).
    pub fn title(self) -> &'static str {
        match self {
            Series::Connections => "Connections",
            Series::Receptions => "Receptions",
            Series::Rejections => "Rejections",
            Series::Refusals => "Refusals",
        }
    }

    /// The name in requests (`msys.audit.receptions`, `add receptions`).
    pub fn name(self) -> &'static str {
        match self {
            Series::Connections => "connections",
            Series::Receptions => "receptions",
            Series::Rejections => "rejections",
            Series::Refusals => "refusals",
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

/// A checked policy limit. The two kinds carry only what applies to them, so a
/// windowed limit without its monitor cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// Live sessions now.
    Sessions {
        /// None: the service of the client's server_port, else [`DEFAULT_SERVICE`].
        service: Option<String>,
        rule: LimitRule,
    },
    /// A series summed over windows `first..=last` of a monitor (0 = current).
    Windowed {
        series: Series,
        monitor: MonitorSpec,
        first: u32,
        last: u32,
        rule: LimitRule,
    },
}

impl Limit {
    pub fn rule(&self) -> &LimitRule {
        match self {
            Limit::Sessions { rule, .. } | Limit::Windowed { rule, .. } => rule,
        }
    }
}

/// What every limit has: whose count it reads, when it fires, what it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRule {
    pub prefixes: Prefixes,
    /// Count over the whole fleet (`scope = "cluster"`), not this node alone.
    pub cluster: bool,
    /// The limit fires when the count is above this.
    pub max: u64,
    /// The access(5) action our explanation is appended to, e.g. "421 4.7.0".
    pub action: String,
}

/// Prefix lengths a client's address is masked to. The fields are private so
/// that they are always valid lengths and masking cannot fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefixes {
    ipv4: u8,
    ipv6: u8,
}

impl Prefixes {
    /// None when `ipv4` is over 32 or `ipv6` over 128.
    pub fn new(ipv4: u8, ipv6: u8) -> Option<Self> {
        (ipv4 <= 32 && ipv6 <= 128).then_some(Self { ipv4, ipv6 })
    }

    /// The network of `ip` at this limit's prefix length for its family.
    pub fn network(&self, ip: IpAddr) -> IpNet {
        let prefix = if ip.is_ipv4() { self.ipv4 } else { self.ipv6 };
        IpNet::new_assert(ip, prefix).trunc()
    }
}

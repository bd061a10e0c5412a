//! `[[kernel_limits]]`: live sessions per client prefix past which the kernel
//! refuses the SYN (see kernel::refusal). Each entry is checked as it is read;
//! how many there may be and whether the service exists are checked with the
//! whole configuration.

use ipnet::IpNet;
use serde::Deserialize;

use crate::domain::DEFAULT_SERVICE;

/// One kernel limit, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLimitConfig {
    pub service: String,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Live sessions allowed per prefix; the next SYN is refused.
    pub max: u32,
    /// Networks never refused (by this limit), truncated to their prefix.
    pub exempt: Vec<IpNet>,
    /// Count and log what would be refused, refuse nothing.
    pub dry_run: bool,
    /// At start-up and on each reload, close (RST) the newest sessions of a
    /// prefix already over `max` (see kernel::cut).
    pub cut_existing: bool,
    /// SYNs admitted whose handshake has not completed count against the
    /// limit for up to the pending window (about a second): the bound on a
    /// burst's overshoot. Default on.
    pub count_pending: bool,
}

/// Why a `[[kernel_limits]]` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelLimitError {
    #[error("ipv4_prefix is at most 32 and ipv6_prefix at most 128")]
    Prefix,
    #[error("`max` must be between 1 and {}, not {max}", i32::MAX)]
    Max { max: u64 },
    #[error(
        "exempt entry {text:?} is not an address or network (e.g. \"192.0.2.0/24\", \"::1/128\")"
    )]
    Exempt { text: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelLimitFile {
    service: Option<String>,
    ipv4_prefix: Option<u8>,
    ipv6_prefix: Option<u8>,
    max: u64,
    #[serde(default)]
    exempt: Vec<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    cut_existing: bool,
    count_pending: Option<bool>,
}

/// A `[[kernel_limits]]` entry as the file holds it, checked as it is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "KernelLimitFile")]
pub(super) struct KernelLimitEntry(pub KernelLimitConfig);

impl TryFrom<KernelLimitFile> for KernelLimitEntry {
    type Error = KernelLimitError;

    fn try_from(file: KernelLimitFile) -> Result<Self, KernelLimitError> {
        let ipv4_prefix = file.ipv4_prefix.unwrap_or(32);
        let ipv6_prefix = file.ipv6_prefix.unwrap_or(128);
        if ipv4_prefix > 32 || ipv6_prefix > 128 {
            return Err(KernelLimitError::Prefix);
        }
        // The kernel compares counts as signed (a count a racing close took
        // below zero must read as none), so max stays below 2^31.
        if file.max == 0 || file.max > i32::MAX as u64 {
            return Err(KernelLimitError::Max { max: file.max });
        }
        let exempt = file
            .exempt
            .iter()
            .map(|text| {
                parse_net(text).ok_or_else(|| KernelLimitError::Exempt { text: text.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(KernelLimitConfig {
            service: file.service.unwrap_or_else(|| DEFAULT_SERVICE.to_string()),
            ipv4_prefix,
            ipv6_prefix,
            max: file.max as u32,
            exempt,
            dry_run: file.dry_run,
            cut_existing: file.cut_existing,
            count_pending: file.count_pending.unwrap_or(true),
        }))
    }
}

/// "192.0.2.0/24", or a bare address (a /32 or /128).
fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|net| net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn defaults_and_exempt_networks() {
        let config = Config::from_toml(
            "[[kernel_limits]]\nmax = 50\nipv4_prefix = 24\nexempt = [\"127.0.0.1/8\", \"::1\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.kernel_limits,
            vec![KernelLimitConfig {
                service: "SMTP".into(),
                ipv4_prefix: 24,
                ipv6_prefix: 128,
                max: 50,
                exempt: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
                dry_run: false,
                cut_existing: false,
                count_pending: true,
            }]
        );
        let cut = Config::from_toml("[[kernel_limits]]\nmax = 5\ncut_existing = true\n").unwrap();
        assert!(cut.kernel_limits[0].cut_existing);
        let off = Config::from_toml("[[kernel_limits]]\nmax = 5\ncount_pending = false\n").unwrap();
        assert!(!off.kernel_limits[0].count_pending);
        assert!(Config::default().kernel_limits.is_empty());
    }

    #[test]
    fn bad_entries_name_the_key_and_reason() {
        for (text, key, reason) in [
            ("max = 0", "kernel_limits[0]", "`max` must be between 1"),
            (
                "max = 3000000000",
                "kernel_limits[0]",
                "`max` must be between 1",
            ),
            (
                "max = 3\nipv4_prefix = 33",
                "kernel_limits[0]",
                "ipv4_prefix is at most 32",
            ),
            (
                "max = 3\nexempt = [\"10.0.0.0/33\"]",
                "kernel_limits[0]",
                "exempt entry",
            ),
            (
                "max = 3\nservice = \"IMAP\"",
                "kernel_limits[0]",
                "not configured",
            ),
            ("max = 3\nbogus = 1", "kernel_limits[0]", "unknown field"),
            (
                "max = 3\ncut_existing = \"yes\"",
                "kernel_limits[0]",
                "invalid type",
            ),
        ] {
            let err = Config::from_toml(&format!("[[kernel_limits]]\n{text}\n"))
                .and_then(|c| c.check_references().map(|()| c))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) && err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn at_most_the_kernels_number_of_limits() {
        let one = "[[kernel_limits]]\nmax = 3\n";
        let four = one.repeat(audit_common::MAX_KERNEL_LIMITS);
        assert_eq!(Config::from_toml(&four).unwrap().kernel_limits.len(), 4);
        let err = Config::from_toml(&format!("{four}{one}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kernel_limits") && err.contains("at most 4"),
            "{err}"
        );
    }
}

//! Synthetic tracked IPs for the large sizes (1k, 100k, 1M), and the query mix.
//!
//! Real connections stop at a few tens of thousands on this machine (fd
//! limits, ports), so the index sizes the issue asks for are filled with
//! synthetic addresses: 80 % IPv4, 20 % IPv6, one session each. Density is
//! kept alike at every size (about 1 in 20 addresses of the IPv4 range used, 4
//! hosts per IPv6 /64), so a /24 or /64 query finds a handful of IPs and a /16
//! a few thousand, as on a busy MTA.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::Rng;

/// The queries the issue names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum QueryKind {
    V4Host,
    V4Slash24,
    V4Slash16,
    V6Slash64,
}

impl QueryKind {
    pub const ALL: [QueryKind; 4] = [
        QueryKind::V4Host,
        QueryKind::V4Slash24,
        QueryKind::V4Slash16,
        QueryKind::V6Slash64,
    ];

    pub fn prefix_len(self) -> u8 {
        match self {
            QueryKind::V4Host => 32,
            QueryKind::V4Slash24 => 24,
            QueryKind::V4Slash16 => 16,
            QueryKind::V6Slash64 => 64,
        }
    }

    pub fn is_v6(self) -> bool {
        self == QueryKind::V6Slash64
    }

    /// A short name for ids and tables: `v4/32`, `v6/64`.
    pub fn label(self) -> &'static str {
        match self {
            QueryKind::V4Host => "v4/32",
            QueryKind::V4Slash24 => "v4/24",
            QueryKind::V4Slash16 => "v4/16",
            QueryKind::V6Slash64 => "v6/64",
        }
    }

    /// File-name-safe form (criterion ids).
    pub fn slug(self) -> &'static str {
        match self {
            QueryKind::V4Host => "v4_32",
            QueryKind::V4Slash24 => "v4_24",
            QueryKind::V4Slash16 => "v4_16",
            QueryKind::V6Slash64 => "v6_64",
        }
    }
}

impl fmt::Display for QueryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A set of distinct tracked IPs.
pub struct SyntheticSet {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

impl SyntheticSet {
    /// `n` distinct addresses (80 % IPv4 in 10.0.0.0/8, 20 % IPv6 in
    /// 2001:db8::/32), the same for the same `n` on every run.
    pub fn generate(n: usize) -> Self {
        let mut rng = Rng::new(0x1b0u64 ^ n as u64);
        let v6_count = n / 5;
        let v4_count = n - v6_count;
        // IPv4: a block of about 20 addresses per tracked IP at the base of 10/8.
        let v4_space = (v4_count as u64 * 20)
            .next_power_of_two()
            .clamp(256, 1 << 24);
        let mut seen = HashSet::with_capacity(v4_count);
        let mut v4 = Vec::with_capacity(v4_count);
        while v4.len() < v4_count {
            let host = 0x0a00_0000u32 | rng.below(v4_space) as u32;
            if seen.insert(host) {
                v4.push(Ipv4Addr::from(host));
            }
        }
        // IPv6: about 4 hosts per /64.
        let nets = (v6_count as u64 / 4).max(1);
        let mut seen = HashSet::with_capacity(v6_count);
        let mut v6 = Vec::with_capacity(v6_count);
        while v6.len() < v6_count {
            let net = 0x2001_0db8_0000_0000u64 | (rng.below(nets) & 0xffff_ffff);
            let addr = (u128::from(net) << 64) | u128::from(rng.next_u64());
            if seen.insert(addr) {
                v6.push(Ipv6Addr::from(addr));
            }
        }
        Self { v4, v6 }
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.v4
            .iter()
            .map(|&a| IpAddr::V4(a))
            .chain(self.v6.iter().map(|&a| IpAddr::V6(a)))
    }

    /// `count` queries of `kind`, each the prefix of a tracked IP, so every
    /// query walks to a populated part of the trie (its worst case).
    pub fn queries(&self, kind: QueryKind, count: usize, seed: u64) -> Vec<IpNet> {
        let mut rng = Rng::new(seed ^ kind.prefix_len() as u64);
        (0..count)
            .map(|_| {
                if kind.is_v6() && !self.v6.is_empty() {
                    let ip = self.v6[rng.below(self.v6.len() as u64) as usize];
                    IpNet::V6(Ipv6Net::new(ip, kind.prefix_len()).expect("valid").trunc())
                } else {
                    let ip = self.v4[rng.below(self.v4.len() as u64) as usize];
                    IpNet::V4(Ipv4Net::new(ip, kind.prefix_len()).expect("valid").trunc())
                }
            })
            .collect()
    }
}

/// The request line the agent answers for `net` on `service`.
pub fn session_count_request(net: &IpNet, service: &str) -> String {
    format!("msys.audit.inbound_session_count(\"{net}\", \"{service}\")")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_distinct_deterministic_and_split() {
        let a = SyntheticSet::generate(10_000);
        let b = SyntheticSet::generate(10_000);
        assert_eq!(a.v4, b.v4);
        assert_eq!(a.v6, b.v6);
        assert_eq!(a.v4.len(), 8_000);
        assert_eq!(a.v6.len(), 2_000);
        assert_eq!(a.iter().collect::<HashSet<_>>().len(), 10_000);
    }

    #[test]
    fn queries_hit_tracked_prefixes() {
        let set = SyntheticSet::generate(1_000);
        let ips: Vec<IpAddr> = set.iter().collect();
        for kind in QueryKind::ALL {
            for net in set.queries(kind, 50, 7) {
                assert_eq!(net.prefix_len(), kind.prefix_len());
                assert!(ips.iter().any(|ip| net.contains(ip)), "{net}");
            }
        }
    }
}

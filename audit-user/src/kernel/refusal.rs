//! Kernel limits (`[[kernel_limits]]`): the maps the sk_lookup program reads,
//! kept by the agent, and the program's attachment to the agent's network
//! namespace. With no limit configured the program is not attached and the
//! open and close paths skip the per-prefix counts (`control::KERNEL_LIMITS`).
//!
//! The link is held, not pinned: refusal needs an agent that keeps the limits
//! and exempt list current, and a stopped agent must not leave the kernel
//! refusing on limits nobody watches. The counts it reads are pinned, so a
//! restart or a reload with the same limits keeps every count; a limit that
//! changes (service or prefix length) has its counts rebuilt from the per-IP
//! live counts. A session opening or closing during that rebuild can be
//! missed (off by one until its prefix empties); a count below zero reads as
//! none in the kernel.

use std::{collections::HashMap, fs::File, net::IpAddr};

use audit_common::{
    control, limit_flags, map_names, program_names, KernelLimit, LiveCounts, PrefixKey, RefusedKey,
    FAMILY_V4, FAMILY_V6, MAX_KERNEL_LIMITS,
};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError},
    programs::{links::FdLink, SkLookup},
    Ebpf,
};
use ipnet::IpNet;

use super::loader::error::LoadError;
use crate::config::kernel_limits::KernelLimitConfig;

/// Per-IP live counts, as `api::LiveSnapshot` (not named here: the loader
/// uses this file, and api uses the loader).
type LiveSnapshot = [(IpAddr, LiveCounts)];

/// How often zero per-prefix counts are collected.
const COLLECT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The network namespace the agent (and so the MTA it watches) runs in.
const OWN_NETNS: &str = "/proc/self/ns/net";

/// What `Refusal::configure` left in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefusalStatus {
    /// Limits configured.
    pub limits: usize,
    /// The sk_lookup program is attached (it refuses, or counts in dry run).
    pub attached: bool,
}

/// SYNs refused, or let through by a dry-run limit, per client IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub ip: IpAddr,
    pub dry_run: bool,
    pub syns: u64,
}

/// The kernel limits' maps and the sk_lookup link.
pub struct Refusal {
    limits: Array<MapData, KernelLimit>,
    counts: BpfHashMap<MapData, PrefixKey, u32>,
    exempt_v4: LpmTrie<MapData, [u8; 4], u32>,
    exempt_v6: LpmTrie<MapData, [u8; 16], u32>,
    refused: BpfHashMap<MapData, RefusedKey, u64>,
    link: Option<FdLink>,
    /// Why the sk_lookup program did not load at start-up, if it did not.
    load_error: Option<String>,
    last_collect: Option<std::time::Instant>,
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(map_error(name))
}

impl Refusal {
    /// Takes the limits' maps out of the loaded object and loads the
    /// sk_lookup program, unattached: loading it needs CAP_NET_ADMIN, which
    /// the agent drops after start-up, and a reload may add the first limit.
    /// A kernel that refuses it is told when a limit asks for it.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        let load_error = load_program(ebpf).err().map(|e| e.to_string());
        Ok(Self {
            limits: take(ebpf, map_names::KERNEL_LIMITS)?,
            counts: take(ebpf, map_names::PREFIX_COUNTS)?,
            exempt_v4: take(ebpf, map_names::EXEMPT_V4)?,
            exempt_v6: take(ebpf, map_names::EXEMPT_V6)?,
            refused: take(ebpf, map_names::REFUSED_IPS)?,
            link: None,
            load_error,
            last_collect: None,
        })
    }

    /// Puts `limits` in the kernel (slots: service name → slot), rebuilding the
    /// counts of each limit that changed from `live`, and attaches or detaches
    /// the sk_lookup program. A program that cannot be attached is reported
    /// in the status (counting goes on), not as an error.
    pub fn configure(
        &mut self,
        ebpf: &mut Ebpf,
        control: &mut Array<MapData, u32>,
        limits: &[KernelLimitConfig],
        slots: &HashMap<String, u8>,
        live: &LiveSnapshot,
    ) -> Result<RefusalStatus, LoadError> {
        let wanted = kernel_entries(limits, slots);
        let any = wanted.iter().any(|l| l.flags & limit_flags::ACTIVE != 0);
        if any {
            // Before the rebuild: opens and closes from here on are counted.
            control
                .set(control::KERNEL_LIMITS, 1, 0)
                .map_err(map_error(map_names::CONTROL))?;
        }
        for (i, new) in wanted.iter().enumerate() {
            let old = self
                .limits
                .get(&(i as u32), 0)
                .map_err(map_error(map_names::KERNEL_LIMITS))?;
            self.limits
                .set(i as u32, *new, 0)
                .map_err(map_error(map_names::KERNEL_LIMITS))?;
            if same_counts(&old, new) {
                continue;
            }
            self.clear_counts(i as u8)?;
            if new.flags & limit_flags::ACTIVE != 0 {
                for (key, count) in prefix_counts(i as u8, new, live) {
                    self.counts
                        .insert(key, count, 0)
                        .map_err(map_error(map_names::PREFIX_COUNTS))?;
                }
            }
        }
        if !any {
            control
                .set(control::KERNEL_LIMITS, 0, 0)
                .map_err(map_error(map_names::CONTROL))?;
        }
        self.set_exempt(&exempt_entries(limits))?;
        let mut status = RefusalStatus {
            limits: limits.len(),
            attached: false,
        };
        if any {
            match self.attach(ebpf) {
                Ok(()) => status.attached = true,
                Err(e) => log::warn!(
                    "kernel limits: the sk_lookup program cannot be attached ({e}); nothing \
                     is refused in the kernel, counting goes on as before"
                ),
            }
        } else if self.link.take().is_some() {
            log::info!("no kernel limit configured: sk_lookup program detached");
        }
        Ok(status)
    }

    fn attach(&mut self, ebpf: &mut Ebpf) -> Result<(), String> {
        if self.link.is_some() {
            return Ok(());
        }
        if let Some(e) = &self.load_error {
            return Err(format!("it did not load at start-up: {e}"));
        }
        self.attach_loaded(ebpf).map_err(|e| e.to_string())
    }

    fn attach_loaded(&mut self, ebpf: &mut Ebpf) -> Result<(), LoadError> {
        let name = program_names::SK_LOOKUP;
        let program = sk_lookup(ebpf)?;
        let netns = File::open(OWN_NETNS).map_err(|source| LoadError::Netns { source })?;
        let id = program
            .attach(netns)
            .map_err(|source| LoadError::Program { name, source })?;
        let link = program
            .take_link(id)
            .map_err(|source| LoadError::Program { name, source })?;
        self.link = Some(link.into());
        Ok(())
    }

    fn clear_counts(&mut self, limit: u8) -> Result<(), LoadError> {
        let keys: Vec<PrefixKey> = self
            .counts
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.limit == limit)
            .collect();
        for key in keys {
            let _ = self.counts.remove(&key);
        }
        Ok(())
    }

    /// New entries first, then the stale ones removed: an address exempt
    /// before and after stays exempt throughout.
    fn set_exempt(&mut self, entries: &[(IpNet, u32)]) -> Result<(), LoadError> {
        for &(net, mask) in entries {
            match net {
                IpNet::V4(v4) => self
                    .exempt_v4
                    .insert(
                        &Key::new(v4.prefix_len().into(), v4.network().octets()),
                        mask,
                        0,
                    )
                    .map_err(map_error(map_names::EXEMPT_V4))?,
                IpNet::V6(v6) => self
                    .exempt_v6
                    .insert(
                        &Key::new(v6.prefix_len().into(), v6.network().octets()),
                        mask,
                        0,
                    )
                    .map_err(map_error(map_names::EXEMPT_V6))?,
            }
        }
        let stale_v4: Vec<Key<[u8; 4]>> = self
            .exempt_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !entries.iter().any(|(net, _)| *net == v4_net(k)))
            .collect();
        for key in stale_v4 {
            let _ = self.exempt_v4.remove(&key);
        }
        let stale_v6: Vec<Key<[u8; 16]>> = self
            .exempt_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !entries.iter().any(|(net, _)| *net == v6_net(k)))
            .collect();
        for key in stale_v6 {
            let _ = self.exempt_v6.remove(&key);
        }
        Ok(())
    }

    /// Whether some prefix of a limit in `indexes` counts more than its max.
    pub fn any_over_limit(&self, entries: &[KernelLimit], indexes: &[u8]) -> bool {
        self.counts
            .iter()
            .filter_map(Result::ok)
            .any(|(key, count)| {
                indexes.contains(&key.limit)
                    && entries.get(usize::from(key.limit)).is_some_and(|e| {
                        e.flags & limit_flags::ACTIVE != 0 && count as i32 > e.max as i32
                    })
            })
    }

    /// Deletes the per-prefix counts at zero (or below: a racing close), at
    /// most once per `COLLECT_INTERVAL`: the kernel leaves them, and the map
    /// would otherwise fill with every prefix that ever connected, after
    /// which a new prefix could not be counted (nor limited). An open racing
    /// the delete is lost to its prefix count: that prefix may admit one
    /// session over its limit until it empties again. Returns how many went.
    pub fn collect_zero_prefixes(&mut self) -> usize {
        let due = self
            .last_collect
            .is_none_or(|at| at.elapsed() >= COLLECT_INTERVAL);
        if !due {
            return 0;
        }
        self.last_collect = Some(std::time::Instant::now());
        let zero: Vec<PrefixKey> = self
            .counts
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, count)| count as i32 <= 0)
            .map(|(key, _)| key)
            .collect();
        zero.iter()
            .filter(|key| self.counts.remove(key).is_ok())
            .count()
    }

    /// SYNs refused per client IP since the agent last took them; the entries
    /// are removed as they are read (an increment racing the removal is lost,
    /// which only undercounts one SYN).
    pub fn take_refused(&mut self) -> Vec<Refused> {
        let entries: Vec<(RefusedKey, u64)> = self.refused.iter().filter_map(Result::ok).collect();
        let mut out = Vec::with_capacity(entries.len());
        for (key, syns) in entries {
            let _ = self.refused.remove(&key);
            if let Some(ip) = key_ip(key.family, &key.addr) {
                out.push(Refused {
                    ip,
                    dry_run: key.dry_run != 0,
                    syns,
                });
            }
        }
        out
    }
}

fn sk_lookup(ebpf: &mut Ebpf) -> Result<&mut SkLookup, LoadError> {
    let name = program_names::SK_LOOKUP;
    ebpf.program_mut(name)
        .ok_or(LoadError::MissingProgram(name))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

fn load_program(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    sk_lookup(ebpf)?
        .load()
        .map_err(|source| LoadError::Program {
            name: program_names::SK_LOOKUP,
            source,
        })
}

/// The `KERNEL_LIMITS` array as `limits` (in order) make it; unused slots are zero.
pub fn kernel_entries(
    limits: &[KernelLimitConfig],
    slots: &HashMap<String, u8>,
) -> [KernelLimit; MAX_KERNEL_LIMITS] {
    let mut out = [KernelLimit::default(); MAX_KERNEL_LIMITS];
    for (entry, limit) in out.iter_mut().zip(limits) {
        let Some(&service) = slots.get(&limit.service) else {
            continue;
        };
        *entry = KernelLimit {
            max: limit.max,
            service,
            ipv4_prefix: limit.ipv4_prefix,
            ipv6_prefix: limit.ipv6_prefix,
            flags: limit_flags::ACTIVE
                | if limit.dry_run {
                    limit_flags::DRY_RUN
                } else {
                    0
                }
                | if limit.count_pending {
                    limit_flags::COUNT_PENDING
                } else {
                    0
                },
        };
    }
    out
}

/// Whether `new` counts the same prefixes as `old` (max and dry run may differ).
fn same_counts(old: &KernelLimit, new: &KernelLimit) -> bool {
    let active = |l: &KernelLimit| l.flags & limit_flags::ACTIVE != 0;
    active(old) == active(new)
        && (!active(new)
            || (old.service == new.service
                && old.ipv4_prefix == new.ipv4_prefix
                && old.ipv6_prefix == new.ipv6_prefix))
}

/// The per-prefix counts of limit `index` from the per-IP live counts.
pub fn prefix_counts(
    index: u8,
    limit: &KernelLimit,
    live: &LiveSnapshot,
) -> HashMap<PrefixKey, u32> {
    let mut out = HashMap::new();
    for (ip, counts) in live {
        let sessions = counts
            .sessions
            .get(usize::from(limit.service))
            .copied()
            .unwrap_or(0);
        if sessions == 0 || sessions > i32::MAX as u32 {
            continue;
        }
        let key = prefix_key(index, limit, *ip);
        *out.entry(key).or_insert(0) += sessions;
    }
    out
}

/// The key the kernel counts `ip` under for limit `index`.
pub fn prefix_key(index: u8, limit: &KernelLimit, ip: IpAddr) -> PrefixKey {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(v4) => {
            let net = ipnet::Ipv4Net::new(v4, limit.ipv4_prefix.min(32))
                .expect("prefix checked")
                .network();
            addr[..4].copy_from_slice(&net.octets());
            FAMILY_V4
        }
        IpAddr::V6(v6) => {
            let net = ipnet::Ipv6Net::new(v6, limit.ipv6_prefix.min(128))
                .expect("prefix checked")
                .network();
            addr.copy_from_slice(&net.octets());
            FAMILY_V6
        }
    };
    PrefixKey {
        addr,
        family,
        limit: index,
        _pad: [0; 6],
    }
}

/// The exempt trie's entries: each exempt network, with the bits of every
/// limit that exempts it or a network containing it (the longest match is
/// the only one the kernel sees).
pub fn exempt_entries(limits: &[KernelLimitConfig]) -> Vec<(IpNet, u32)> {
    let mut nets: Vec<IpNet> = limits
        .iter()
        .flat_map(|l| l.exempt.iter().copied())
        .collect();
    nets.sort();
    nets.dedup();
    nets.into_iter()
        .map(|net| {
            let mask = limits
                .iter()
                .enumerate()
                .take(MAX_KERNEL_LIMITS)
                .filter(|(_, l)| l.exempt.iter().any(|e| e.contains(&net)))
                .fold(0u32, |mask, (i, _)| mask | 1 << i);
            (net, mask)
        })
        .collect()
}

fn v4_net(key: &Key<[u8; 4]>) -> IpNet {
    ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8)
        .map(IpNet::V4)
        .unwrap_or_default()
}

fn v6_net(key: &Key<[u8; 16]>) -> IpNet {
    ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8)
        .map(IpNet::V6)
        .unwrap_or_default()
}

fn key_ip(family: u8, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from([addr[0], addr[1], addr[2], addr[3]])),
        FAMILY_V6 => Some(IpAddr::from(*addr)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(service: &str, v4: u8, v6: u8, exempt: &[&str]) -> KernelLimitConfig {
        KernelLimitConfig {
            service: service.into(),
            ipv4_prefix: v4,
            ipv6_prefix: v6,
            max: 3,
            exempt: exempt.iter().map(|e| e.parse().unwrap()).collect(),
            dry_run: false,
            cut_existing: false,
            count_pending: true,
        }
    }

    fn slots() -> HashMap<String, u8> {
        HashMap::from([("SMTP".to_string(), 0), ("Submission".to_string(), 2)])
    }

    #[test]
    fn entries_follow_the_configuration_in_order() {
        let mut dry = limit("Submission", 16, 48, &[]);
        dry.dry_run = true;
        let entries = kernel_entries(&[limit("SMTP", 24, 64, &[]), dry], &slots());
        assert_eq!(
            entries[0],
            KernelLimit {
                max: 3,
                service: 0,
                ipv4_prefix: 24,
                ipv6_prefix: 64,
                flags: limit_flags::ACTIVE | limit_flags::COUNT_PENDING
            }
        );
        assert_eq!(entries[1].service, 2);
        assert_eq!(
            entries[1].flags,
            limit_flags::ACTIVE | limit_flags::DRY_RUN | limit_flags::COUNT_PENDING
        );
        assert_eq!(entries[2], KernelLimit::default());
        assert_eq!(kernel_entries(&[], &slots()), [KernelLimit::default(); 4]);
    }

    #[test]
    fn counts_are_kept_unless_what_they_count_changes() {
        let a = kernel_entries(&[limit("SMTP", 24, 64, &[])], &slots())[0];
        let mut raised = a;
        raised.max = 50;
        raised.flags |= limit_flags::DRY_RUN;
        assert!(same_counts(&a, &raised));
        let mut wider = a;
        wider.ipv4_prefix = 16;
        assert!(!same_counts(&a, &wider));
        assert!(!same_counts(&KernelLimit::default(), &a));
        assert!(same_counts(
            &KernelLimit::default(),
            &KernelLimit::default()
        ));
    }

    #[test]
    fn prefix_counts_sum_the_ips_of_each_network() {
        let entry = kernel_entries(&[limit("SMTP", 24, 64, &[])], &slots())[0];
        let counts = |smtp: u32, other: u32| {
            let mut c = LiveCounts::default();
            c.sessions[0] = smtp;
            c.sessions[2] = other;
            c
        };
        let live = vec![
            ("192.0.2.1".parse().unwrap(), counts(2, 7)),
            ("192.0.2.200".parse().unwrap(), counts(1, 0)),
            ("198.51.100.1".parse().unwrap(), counts(1, 0)),
            ("203.0.113.1".parse().unwrap(), counts(0, 5)),
            ("2001:db8:1:2::1".parse().unwrap(), counts(1, 0)),
            ("2001:db8:1:2:ffff::9".parse().unwrap(), counts(4, 0)),
        ];
        let built = prefix_counts(1, &entry, &live);
        let at = |ip: &str| built[&prefix_key(1, &entry, ip.parse().unwrap())];
        assert_eq!(at("192.0.2.77"), 3);
        assert_eq!(at("198.51.100.0"), 1);
        assert_eq!(at("2001:db8:1:2::"), 5);
        assert_eq!(built.len(), 3, "{built:?}");
        let key = prefix_key(1, &entry, "192.0.2.77".parse().unwrap());
        assert_eq!(&key.addr[..4], &[192, 0, 2, 0]);
        assert_eq!((key.family, key.limit), (FAMILY_V4, 1));
    }

    #[test]
    fn an_exempt_network_inside_another_keeps_both_limits_bits() {
        let limits = [
            limit("SMTP", 24, 64, &["10.0.0.0/8"]),
            limit("SMTP", 16, 48, &["10.1.0.0/16", "::1/128"]),
        ];
        assert_eq!(
            exempt_entries(&limits),
            vec![
                ("10.0.0.0/8".parse().unwrap(), 0b01),
                ("10.1.0.0/16".parse().unwrap(), 0b11),
                ("::1/128".parse().unwrap(), 0b10),
            ]
        );
    }
}

//! `cut_existing`: closing the newest sessions of a prefix that is already
//! over its kernel limit (the limit was lowered by a reload, or the sessions
//! predate it). The sk_lookup program only refuses new SYNs; sessions
//! admitted before stay until this cuts them.
//!
//! How: the counted sessions are read through sock_diag (with each socket's
//! storage, so only sessions the kernel counts are candidates), grouped by
//! each cutting limit's prefix, and the newest over `max` are aborted with
//! SOCK_DESTROY over sock_diag: the kernel sends the client a RST and the
//! socket closes through the ordinary TCP_CLOSE transition, which the
//! counting programs see, so the counts follow with no fix-up here. Not a
//! BPF socket iterator with `bpf_sock_destroy`: that is a kfunc, and aya
//! 0.14's loader does not resolve kfunc calls.
//!
//! "Newest" is by the time the sock_ops program counted the session, which
//! it keeps in the socket's storage (`opened_ms`); not by socket cookie,
//! which the kernel hands out from per-CPU batches, out of accept order.
//! Sessions with no such time (seeded because they predate the programs,
//! or accepted while the agent seeded) are the oldest, by cookie among
//! themselves.
//!
//! Exempt sessions count toward their prefix (as for refusals) but are never
//! cut. A dry-run limit plans its cuts and counts them, and cuts nothing.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use audit_common::{limit_flags, KernelLimit, PrefixKey};
use ipnet::IpNet;

use super::{
    loader::{error::LoadError, KernelProgram},
    refusal::{kernel_entries, prefix_key},
    sock_diag::{self, SockDiagError, TcpSocket},
};
use crate::config::kernel_limits::KernelLimitConfig;

/// A session the kernel counts, as a cut candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub cookie: u64,
    /// The client, v4-mapped peers as IPv4 (as the kernel counts them).
    pub ip: IpAddr,
    /// Service slot.
    pub service: u8,
    /// Milliseconds since sock_ops counted it; `u32::MAX` when unknown
    /// (the session predates the programs, or was counted by a record).
    pub age_ms: u32,
}

/// One session to cut (or, for a dry-run limit, that would be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedCut {
    pub cookie: u64,
    /// The limit's prefix the session is over.
    pub prefix: IpNet,
    pub max: u32,
    pub dry_run: bool,
}

/// Sessions cut from one prefix in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixCuts {
    pub prefix: IpNet,
    pub max: u32,
    pub dry_run: bool,
    pub sessions: u64,
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct CutReport {
    pub prefixes: Vec<PrefixCuts>,
    /// Why the pass stopped before cutting all it planned, if it did.
    pub error: Option<SockDiagError>,
}

impl CutReport {
    pub fn total(&self, dry_run: bool) -> u64 {
        self.prefixes
            .iter()
            .filter(|p| p.dry_run == dry_run)
            .map(|p| p.sessions)
            .sum()
    }
}

/// The cuts `limits` ask for among `sessions`: for each limit with
/// `cut_existing`, in order, every prefix holding more than `max` sessions
/// loses its newest non-exempt ones down to `max`. A session a limit cuts no
/// longer counts for the later ones; a dry-run limit's would-be cuts leave
/// the sessions to the others.
pub fn plan_cuts(
    limits: &[KernelLimitConfig],
    entries: &[KernelLimit],
    sessions: &[Counted],
) -> Vec<PlannedCut> {
    let mut cut: HashSet<u64> = HashSet::new();
    let mut out = Vec::new();
    for (index, (limit, entry)) in limits.iter().zip(entries).enumerate() {
        if !limit.cut_existing || entry.flags & limit_flags::ACTIVE == 0 {
            continue;
        }
        let mut groups: HashMap<PrefixKey, Vec<&Counted>> = HashMap::new();
        for s in sessions
            .iter()
            .filter(|s| s.service == entry.service && !cut.contains(&s.cookie))
        {
            groups
                .entry(prefix_key(index as u8, entry, s.ip))
                .or_default()
                .push(s);
        }
        let mut planned = Vec::new();
        for group in groups.values_mut() {
            let excess = group.len().saturating_sub(entry.max as usize);
            if excess == 0 {
                continue;
            }
            // Oldest first, so the newest are at the end.
            group.sort_by_key(|s| (std::cmp::Reverse(s.age_ms), s.cookie));
            let prefix = prefix_net(entry, group[0].ip);
            planned.extend(
                group
                    .iter()
                    .rev()
                    .filter(|s| !limit.exempt.iter().any(|net| net.contains(&s.ip)))
                    .take(excess)
                    .map(|s| PlannedCut {
                        cookie: s.cookie,
                        prefix,
                        max: entry.max,
                        dry_run: limit.dry_run,
                    }),
            );
        }
        planned.sort_by_key(|p| (p.prefix, std::cmp::Reverse(p.cookie)));
        if !limit.dry_run {
            cut.extend(planned.iter().map(|p| p.cookie));
        }
        out.extend(planned);
    }
    out
}

fn prefix_net(entry: &KernelLimit, ip: IpAddr) -> IpNet {
    let bits = if ip.is_ipv4() {
        entry.ipv4_prefix
    } else {
        entry.ipv6_prefix
    };
    IpNet::new(ip, bits).map_or(IpNet::from(ip), |n| n.trunc())
}

/// The report's lines: planned cuts grouped per (prefix, dry run), counting
/// only those `done` says happened.
fn summarize(planned: &[PlannedCut], done: &HashSet<u64>) -> Vec<PrefixCuts> {
    let mut out: Vec<PrefixCuts> = Vec::new();
    for p in planned
        .iter()
        .filter(|p| p.dry_run || done.contains(&p.cookie))
    {
        match out
            .iter_mut()
            .find(|c| c.prefix == p.prefix && c.dry_run == p.dry_run)
        {
            Some(c) => c.sessions += 1,
            None => out.push(PrefixCuts {
                prefix: p.prefix,
                max: p.max,
                dry_run: p.dry_run,
                sessions: 1,
            }),
        }
    }
    out
}

impl KernelProgram {
    /// Cuts what `limits` ask for (see `plan_cuts`). Costs nothing when no
    /// limit cuts, and one pass over the per-prefix counts when none is over
    /// its limit; only then are the sockets dumped.
    pub fn cut_over_limits(
        &mut self,
        limits: &[KernelLimitConfig],
        slots: &HashMap<String, u8>,
    ) -> Result<CutReport, LoadError> {
        if !limits.iter().any(|l| l.cut_existing) {
            return Ok(CutReport::default());
        }
        let entries = kernel_entries(limits, slots);
        let cutting: Vec<u8> = limits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.cut_existing)
            .map(|(i, _)| i as u8)
            .collect();
        if !self.refusal().any_over_limit(&entries, &cutting) {
            return Ok(CutReport::default());
        }
        let sockets = self.counted_sockets()?;
        let counted: Vec<Counted> = sockets.iter().map(|(_, c)| *c).collect();
        let planned = plan_cuts(limits, &entries, &counted);
        let by_cookie: HashMap<u64, &TcpSocket> =
            sockets.iter().map(|(s, c)| (c.cookie, s)).collect();
        let mut done = HashSet::new();
        let mut error = None;
        for p in planned.iter().filter(|p| !p.dry_run) {
            let Some(socket) = by_cookie.get(&p.cookie) else {
                continue;
            };
            match sock_diag::destroy_tcp(socket) {
                Ok(true) => {
                    done.insert(p.cookie);
                }
                // Closed since the dump: one fewer to cut, nothing to count.
                Ok(false) => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        Ok(CutReport {
            prefixes: summarize(&planned, &done),
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: u32, v4: u8, exempt: &[&str], dry_run: bool) -> KernelLimitConfig {
        KernelLimitConfig {
            service: "SMTP".into(),
            ipv4_prefix: v4,
            ipv6_prefix: 64,
            max,
            exempt: exempt.iter().map(|e| e.parse().unwrap()).collect(),
            dry_run,
            cut_existing: true,
            count_pending: true,
        }
    }

    fn entries(limits: &[KernelLimitConfig]) -> [KernelLimit; audit_common::MAX_KERNEL_LIMITS] {
        kernel_entries(limits, &HashMap::from([("SMTP".to_string(), 0)]))
    }

    /// A session `cookie` ms old: in these tests the higher cookie is the
    /// newer one, except where `aged` says otherwise.
    fn counted(cookie: u64, ip: &str) -> Counted {
        aged(cookie, ip, 1_000_000 - cookie as u32)
    }

    fn aged(cookie: u64, ip: &str, age_ms: u32) -> Counted {
        Counted {
            cookie,
            ip: ip.parse().unwrap(),
            service: 0,
            age_ms,
        }
    }

    fn cookies(cuts: &[PlannedCut]) -> Vec<u64> {
        cuts.iter().map(|c| c.cookie).collect()
    }

    #[test]
    fn the_newest_over_the_limit_are_cut() {
        let limits = [limit(2, 24, &[], false)];
        let sessions = [
            counted(10, "192.0.2.1"),
            counted(40, "192.0.2.2"),
            counted(20, "192.0.2.1"),
            counted(30, "192.0.2.3"),
            counted(50, "198.51.100.1"),
            counted(60, "2001:db8::1"),
            counted(70, "2001:db8::2"),
            counted(80, "2001:db8::3"),
        ];
        let cuts = plan_cuts(&limits, &entries(&limits), &sessions);
        assert_eq!(cookies(&cuts), vec![40, 30, 80], "{cuts:?}");
        assert_eq!(cuts[0].prefix, "192.0.2.0/24".parse::<IpNet>().unwrap());
        assert_eq!(cuts[2].prefix, "2001:db8::/64".parse::<IpNet>().unwrap());
        assert!(cuts.iter().all(|c| c.max == 2 && !c.dry_run));
    }

    #[test]
    fn newest_is_by_age_not_cookie_and_unknown_ages_are_oldest() {
        let limits = [limit(2, 24, &[], false)];
        let sessions = [
            aged(900, "192.0.2.1", u32::MAX),
            aged(5, "192.0.2.1", 10),
            aged(7, "192.0.2.2", 5_000),
            aged(1, "192.0.2.3", u32::MAX),
        ];
        // Kept: the two with no age (oldest); cut: the 10 ms and the 5 s
        // old ones (listed by cookie, highest first).
        assert_eq!(
            cookies(&plan_cuts(&limits, &entries(&limits), &sessions)),
            vec![7, 5]
        );
    }

    #[test]
    fn exempt_sessions_count_but_stay() {
        let limits = [limit(2, 24, &["192.0.2.9/32"], false)];
        let sessions = [
            counted(1, "192.0.2.1"),
            counted(2, "192.0.2.2"),
            counted(3, "192.0.2.9"),
            counted(4, "192.0.2.9"),
        ];
        // Two over: the newest non-exempt ones go, the exempt ones stay.
        let cuts = plan_cuts(&limits, &entries(&limits), &sessions);
        assert_eq!(cookies(&cuts), vec![2, 1]);
    }

    #[test]
    fn without_cut_existing_or_under_the_limit_nothing_is_cut() {
        let mut off = limit(1, 24, &[], false);
        off.cut_existing = false;
        let sessions = [counted(1, "192.0.2.1"), counted(2, "192.0.2.2")];
        assert!(plan_cuts(&[off.clone()], &entries(&[off]), &sessions).is_empty());
        let roomy = [limit(2, 24, &[], false)];
        assert!(plan_cuts(&roomy, &entries(&roomy), &sessions).is_empty());
        let mut other_service = counted(3, "192.0.2.3");
        other_service.service = 1;
        assert!(plan_cuts(
            &roomy,
            &entries(&roomy),
            &[sessions[0], sessions[1], other_service]
        )
        .is_empty());
    }

    #[test]
    fn a_cut_counts_for_later_limits_and_a_dry_run_does_not() {
        let limits = [limit(2, 32, &[], false), limit(2, 24, &[], false)];
        let sessions = [
            counted(1, "192.0.2.1"),
            counted(2, "192.0.2.1"),
            counted(3, "192.0.2.1"),
            counted(4, "192.0.2.2"),
        ];
        // The /32 cuts 3; the /24 then holds 1, 2 and 4: it cuts 4.
        assert_eq!(
            cookies(&plan_cuts(&limits, &entries(&limits), &sessions)),
            vec![3, 4]
        );
        let limits = [limit(2, 32, &[], true), limit(2, 24, &[], false)];
        let cuts = plan_cuts(&limits, &entries(&limits), &sessions);
        // The dry run would cut 3 but leaves it: the /24 cuts 4 and 3.
        assert_eq!(cookies(&cuts), vec![3, 4, 3]);
        assert!(cuts[0].dry_run && !cuts[1].dry_run);
        let done = HashSet::from([4]);
        let lines = summarize(&cuts, &done);
        assert_eq!(
            lines,
            vec![
                PrefixCuts {
                    prefix: "192.0.2.1/32".parse().unwrap(),
                    max: 2,
                    dry_run: true,
                    sessions: 1
                },
                PrefixCuts {
                    prefix: "192.0.2.0/24".parse().unwrap(),
                    max: 2,
                    dry_run: false,
                    sessions: 1
                },
            ],
            "a planned cut the kernel did not make is not reported"
        );
    }
}

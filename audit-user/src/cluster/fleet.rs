//! The fleet as this node knows it: every other live node's share (its own
//! CIDR indexes, so one node's view answers any prefix) and their sum (so the
//! cluster answer is one index walk, as a local one is). This node's own share
//! is not kept here: cluster answers add the local index, which is always
//! exact and current.
//!
//! A share is replaced whole when its node restarts (a new epoch) and
//! dropped when the node falls silent, so a dead or restarted node is never
//! counted twice.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;

use crate::{
    counting::index::CidrIndex,
    domain::{MonitorSpec, Series},
};

use super::wire::{Entry, EntryKey};

/// A window of one monitor's series: (monitor, series, window epoch).
type WindowKey = (MonitorSpec, Series, u64);

/// One node's counts.
#[derive(Debug, Default)]
struct Counts {
    sessions: HashMap<String, CidrIndex>,
    windows: HashMap<WindowKey, CidrIndex>,
}

impl Counts {
    fn index_mut(&mut self, key: &EntryKey) -> (&mut CidrIndex, IpAddr) {
        match key {
            EntryKey::Sessions { service, ip } => {
                (self.sessions.entry(service.clone()).or_default(), *ip)
            }
            EntryKey::Window {
                monitor,
                epoch,
                series,
                ip,
            } => (
                self.windows.entry((*monitor, *series, *epoch)).or_default(),
                *ip,
            ),
        }
    }

    fn sessions(&self, service: &str, net: &IpNet) -> u64 {
        self.sessions
            .get(service)
            .map_or(0, |index| index.count(net))
    }

    fn window(&self, key: &WindowKey, net: &IpNet) -> u64 {
        self.windows.get(key).map_or(0, |index| index.count(net))
    }

    fn entries(&self) -> usize {
        self.sessions.values().map(CidrIndex::len).sum::<usize>()
            + self.windows.values().map(CidrIndex::len).sum::<usize>()
    }
}

/// What this node knows of another.
#[derive(Debug)]
pub struct NodeShare {
    /// The run of the node these counts come from.
    pub epoch: u64,
    /// The last batch applied.
    pub seq: u64,
    /// When this node last saw the node's heartbeat move (local clock).
    pub alive_at: Duration,
    counts: Counts,
}

/// The fleet's shares and their sum.
#[derive(Debug, Default)]
pub struct Fleet {
    nodes: BTreeMap<String, NodeShare>,
    sum: Counts,
}

impl Fleet {
    /// The node's share, if this node holds one.
    pub fn node(&self, name: &str) -> Option<&NodeShare> {
        self.nodes.get(name)
    }

    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Starts (or restarts) a node's share at `epoch`, empty: whatever an
    /// earlier run of it had counted leaves the sum.
    pub fn reset_node(&mut self, name: &str, epoch: u64, seq: u64, now: Duration) {
        self.drop_node(name);
        self.nodes.insert(
            name.to_string(),
            NodeShare {
                epoch,
                seq,
                alive_at: now,
                counts: Counts::default(),
            },
        );
    }

    /// Removes a node and its counts from the sum.
    pub fn drop_node(&mut self, name: &str) -> bool {
        let Some(share) = self.nodes.remove(name) else {
            return false;
        };
        for (service, index) in &share.counts.sessions {
            if let Some(sum) = self.sum.sessions.get_mut(service) {
                subtract(sum, index);
            }
        }
        for (key, index) in &share.counts.windows {
            if let Some(sum) = self.sum.windows.get_mut(key) {
                subtract(sum, index);
            }
        }
        self.sum.sessions.retain(|_, index| !index.is_empty());
        self.sum.windows.retain(|_, index| !index.is_empty());
        true
    }

    /// Marks the node alive at `now`.
    pub fn touch(&mut self, name: &str, now: Duration) {
        if let Some(share) = self.nodes.get_mut(name) {
            share.alive_at = now;
        }
    }

    /// Applies entries to a node's share (which must exist) and moves it to `seq`.
    pub fn apply(&mut self, name: &str, seq: u64, entries: &[Entry]) {
        let Some(share) = self.nodes.get_mut(name) else {
            return;
        };
        for entry in entries {
            let (index, ip) = share.counts.index_mut(&entry.key);
            let before = index.set(ip, entry.count);
            if before == entry.count {
                continue;
            }
            let (sum, _) = self.sum.index_mut(&entry.key);
            let delta = entry.count as i64 - before as i64;
            // The sum holds exactly the shares' counts, so it cannot go below 0.
            let _ = sum.add(ip, delta);
        }
        share.seq = seq;
    }

    /// Drops every node not heard from for `ttl`; returns their names.
    pub fn drop_silent(&mut self, now: Duration, ttl: Duration) -> Vec<String> {
        let silent: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, share)| now.saturating_sub(share.alive_at) >= ttl)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &silent {
            self.drop_node(name);
        }
        silent
    }

    /// Drops windows that left every monitor's history at `now` (window epoch
    /// below the current one minus N), from the shares and the sum alike.
    pub fn expire_windows(&mut self, now: Duration) {
        let keep = |(spec, _, epoch): &WindowKey| {
            let current = now.as_secs() / spec.window_secs;
            *epoch + u64::from(spec.kept) >= current
        };
        for share in self.nodes.values_mut() {
            share.counts.windows.retain(|key, _| keep(key));
        }
        self.sum.windows.retain(|key, _| keep(key));
    }

    /// Live sessions from `net` to `service` over the other nodes.
    pub fn sessions(&self, service: &str, net: &IpNet) -> u64 {
        self.sum.sessions(service, net)
    }

    /// The same, on one node.
    pub fn node_sessions(&self, node: &str, service: &str, net: &IpNet) -> u64 {
        self.nodes
            .get(node)
            .map_or(0, |share| share.counts.sessions(service, net))
    }

    /// `series` from `net` in windows `first..=last` of `spec` (0 = current),
    /// over the other nodes, or over `node` alone.
    pub fn windows(
        &self,
        node: Option<&str>,
        spec: MonitorSpec,
        series: Series,
        net: &IpNet,
        (first, last): (u32, u32),
        now: Duration,
    ) -> u64 {
        let counts = match node {
            Some(name) => match self.nodes.get(name) {
                Some(share) => &share.counts,
                None => return 0,
            },
            None => &self.sum,
        };
        let current = now.as_secs() / spec.window_secs;
        let (first, last) = (first.min(last), first.max(last).min(spec.kept));
        (first..=last)
            .filter_map(|k| current.checked_sub(u64::from(k)))
            .map(|epoch| counts.window(&(spec, series, epoch), net))
            .fold(0u64, u64::saturating_add)
    }

    /// Entries held for other nodes (each node's share; the sum not counted).
    pub fn entries(&self) -> usize {
        self.nodes
            .values()
            .map(|share| share.counts.entries())
            .sum()
    }

    /// Entries held for one node.
    pub fn node_entries(&self, name: &str) -> usize {
        self.nodes
            .get(name)
            .map_or(0, |share| share.counts.entries())
    }

    /// Memory of the indexes, shares and sum.
    pub fn heap_bytes(&self) -> usize {
        let counts = |c: &Counts| {
            c.sessions
                .values()
                .map(CidrIndex::heap_bytes)
                .sum::<usize>()
                + c.windows.values().map(CidrIndex::heap_bytes).sum::<usize>()
        };
        self.nodes
            .values()
            .map(|s| counts(&s.counts))
            .sum::<usize>()
            + counts(&self.sum)
    }
}

fn subtract(sum: &mut CidrIndex, share: &CidrIndex) {
    for (ip, count) in share.iter() {
        let _ = sum.add(ip, -(count as i64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const NOW: Duration = Duration::from_secs(1_800_000_000);

    #[test]
    fn sums_follow_absolute_entries_and_replays() {
        let mut fleet = Fleet::default();
        fleet.reset_node("mx2", 1, 0, NOW);
        fleet.reset_node("mx3", 9, 0, NOW);
        let batch = [
            Entry::sessions("SMTP", ip("10.0.0.1"), 3),
            Entry::sessions("SMTP", ip("10.0.0.2"), 1),
        ];
        fleet.apply("mx2", 1, &batch);
        // Replaying a batch changes nothing: entries are absolute.
        fleet.apply("mx2", 1, &batch);
        fleet.apply("mx3", 1, &[Entry::sessions("SMTP", ip("10.0.0.9"), 2)]);
        assert_eq!(fleet.sessions("SMTP", &net("10.0.0.0/24")), 6);
        assert_eq!(fleet.node_sessions("mx2", "SMTP", &net("10.0.0.0/24")), 4);
        assert_eq!(fleet.node_sessions("mx3", "SMTP", &net("10.0.0.1/32")), 0);
        fleet.apply("mx2", 2, &[Entry::sessions("SMTP", ip("10.0.0.1"), 0)]);
        assert_eq!(fleet.sessions("SMTP", &net("10.0.0.0/24")), 3);
        assert_eq!(fleet.node("mx2").unwrap().seq, 2);
        assert_eq!(fleet.entries(), 2);
    }

    #[test]
    fn a_restarted_or_silent_node_leaves_the_sum() {
        let mut fleet = Fleet::default();
        fleet.reset_node("mx2", 1, 0, NOW);
        fleet.apply("mx2", 1, &[Entry::sessions("SMTP", ip("10.0.0.1"), 5)]);
        fleet.reset_node("mx2", 2, 0, NOW);
        assert_eq!(fleet.sessions("SMTP", &net("0.0.0.0/0")), 0);
        fleet.apply("mx2", 1, &[Entry::sessions("SMTP", ip("10.0.0.1"), 1)]);
        assert_eq!(fleet.sessions("SMTP", &net("0.0.0.0/0")), 1);
        assert!(fleet
            .drop_silent(NOW + Duration::from_secs(4), Duration::from_secs(5))
            .is_empty());
        fleet.touch("mx2", NOW + Duration::from_secs(4));
        assert!(fleet
            .drop_silent(NOW + Duration::from_secs(8), Duration::from_secs(5))
            .is_empty());
        assert_eq!(
            fleet.drop_silent(NOW + Duration::from_secs(9), Duration::from_secs(5)),
            vec!["mx2".to_string()]
        );
        assert_eq!(fleet.sessions("SMTP", &net("0.0.0.0/0")), 0);
        assert_eq!(fleet.heap_bytes(), 0);
    }

    #[test]
    fn windows_are_summed_by_range_and_expire() {
        let spec: MonitorSpec = "60,2".parse().unwrap();
        let current = NOW.as_secs() / 60;
        let mut fleet = Fleet::default();
        fleet.reset_node("mx2", 1, 0, NOW);
        fleet.reset_node("mx3", 1, 0, NOW);
        for (node, back, n) in [
            ("mx2", 0, 1),
            ("mx2", 1, 10),
            ("mx3", 1, 100),
            ("mx3", 2, 1000),
        ] {
            fleet.apply(
                node,
                1,
                &[Entry::window(
                    spec,
                    current - back,
                    Series::Connections,
                    ip("10.1.0.1"),
                    n,
                )],
            );
        }
        let v4 = net("10.0.0.0/8");
        let sum = |node, range| fleet.windows(node, spec, Series::Connections, &v4, range, NOW);
        assert_eq!(sum(None, (0, 0)), 1);
        assert_eq!(sum(None, (1, 0)), 111);
        assert_eq!(sum(None, (0, 9)), 1111, "clamped to N");
        assert_eq!(sum(Some("mx3"), (0, 2)), 1100);
        assert_eq!(sum(Some("nope"), (0, 2)), 0);
        assert_eq!(
            fleet.windows(None, spec, Series::Receptions, &v4, (0, 2), NOW),
            0
        );
        fleet.expire_windows(NOW + Duration::from_secs(60));
        let later = NOW + Duration::from_secs(60);
        assert_eq!(
            fleet.windows(None, spec, Series::Connections, &v4, (0, 2), later),
            111
        );
    }
}

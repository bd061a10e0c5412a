//! Walks that list networks without visiting every key: the keys with the
//! largest counts (best first, pruned by each subtree's `top` bound), and the
//! sums of every network of one prefix length in key order (stopping at the
//! first node at least that long, so a /48 listing visits the /48s, not their
//! hosts), resumable so a caller can release its lock between chunks.

use std::{cmp::Reverse, collections::BinaryHeap, net::IpAddr};

use ipnet::IpNet;

use super::{is_leaf, slot, CidrIndex, NodeRef, PrefixTrie, TrieKey, Wide, NIL, TOP_SATURATED};

/// Whether the subtree with prefix `key`/`len` may hold keys inside
/// `prefix`/`plen`.
fn overlaps<K: TrieKey>(key: K, len: u8, prefix: K, plen: u8) -> bool {
    key.common_prefix_len(prefix) >= len.min(plen)
}

impl<K: TrieKey> PrefixTrie<K> {
    /// Up to `limit` keys inside `prefix`/`plen` with a count of at least
    /// `threshold` (and at least 1), largest count first, equal counts in
    /// ascending key order. Visits only nodes whose bound could still make
    /// the list: about `limit` root-to-leaf paths when counts are alike.
    pub fn top_keys(&self, prefix: K, plen: u8, limit: usize, threshold: u64) -> Vec<(K, u64)> {
        let threshold = threshold.max(1);
        let mut out = Vec::new();
        if self.root == NIL || limit == 0 {
            return out;
        }
        // (bound, smallest key below, node): the max-heap pops the largest
        // bound first and, among equal bounds, the smallest key. Every key
        // below a node is at least its prefix and its count at most the
        // bound, so leaves come out in exactly the order asked.
        let mut heap: BinaryHeap<(u64, Reverse<K>, NodeRef)> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, r: NodeRef| {
            let (key, len) = self.node_prefix(r);
            if !overlaps(key, len, prefix, plen) {
                return;
            }
            let bound = if is_leaf(r) {
                self.leaves[slot(r)].count
            } else {
                match self.inners[slot(r)].top {
                    TOP_SATURATED => u64::MAX,
                    top => u64::from(top),
                }
            };
            if bound >= threshold {
                heap.push((bound, Reverse(key), r));
            }
        };
        push(&mut heap, self.root);
        while let Some((bound, Reverse(key), r)) = heap.pop() {
            if is_leaf(r) {
                out.push((key, bound));
                if out.len() == limit {
                    break;
                }
            } else {
                let node = &self.inners[slot(r)];
                push(&mut heap, node.child[0]);
                push(&mut heap, node.child[1]);
            }
        }
        out
    }

    /// The sum of each network of `len` bits inside `prefix`/`plen` (`len` ≥
    /// `plen`) that holds keys, in ascending order, from the first network
    /// whose key is at least `from`; at most `limit` of them.
    pub fn prefix_sums(
        &self,
        prefix: K,
        plen: u8,
        len: u8,
        from: K,
        limit: usize,
    ) -> Vec<(K, u64)> {
        let mut out = Vec::new();
        if self.root == NIL || limit == 0 {
            return out;
        }
        let from = from.masked(len);
        let mut stack = vec![self.root];
        while let Some(r) = stack.pop() {
            let (key, node_len) = self.node_prefix(r);
            if !overlaps(key, node_len, prefix, plen) || key.filled(node_len) < from {
                continue;
            }
            if node_len >= len {
                out.push((key.masked(len), Wide::saturated(self.node_sum(r))));
                if out.len() == limit {
                    break;
                }
            } else {
                let node = &self.inners[slot(r)];
                stack.push(node.child[1]);
                stack.push(node.child[0]);
            }
        }
        out
    }
}

/// A network of `len` bits holding `ip`.
fn net_of(ip: IpAddr, len: u8) -> IpNet {
    IpNet::new(ip, len).expect("len within the family").trunc()
}

impl CidrIndex {
    /// Up to `limit` IPs inside `net` with the largest counts (at least
    /// `threshold`, at least 1), largest first, equal counts in address
    /// order; see [`PrefixTrie::top_keys`]. An IPv6 `net` lists IPv6 peers.
    pub fn top_ips(&self, net: &IpNet, limit: usize, threshold: u64) -> Vec<(IpAddr, u64)> {
        match net {
            IpNet::V4(n) => self
                .v4
                .top_keys(u32::from(n.addr()), n.prefix_len(), limit, threshold)
                .into_iter()
                .map(|(k, c)| (IpAddr::from(k.to_be_bytes()), c))
                .collect(),
            IpNet::V6(n) => self
                .v6
                .top_keys(u128::from(n.addr()), n.prefix_len(), limit, threshold)
                .into_iter()
                .map(|(k, c)| (IpAddr::from(k.to_be_bytes()), c))
                .collect(),
        }
    }

    /// The networks of `len` bits (at least `net`'s own length, at most the
    /// family's width) inside `net` that hold sessions, with their sums, in
    /// address order from the first whose address is at least `from` (None:
    /// the start); at most `limit`. An IPv6 `net` lists IPv6 peers.
    pub fn network_sums(
        &self,
        net: &IpNet,
        len: u8,
        from: Option<IpAddr>,
        limit: usize,
    ) -> Vec<(IpNet, u64)> {
        let len = len.clamp(net.prefix_len(), net.max_prefix_len());
        match net {
            IpNet::V4(n) => {
                let from = match from {
                    Some(IpAddr::V4(a)) => u32::from(a),
                    _ => 0,
                };
                self.v4
                    .prefix_sums(u32::from(n.addr()), n.prefix_len(), len, from, limit)
                    .into_iter()
                    .map(|(k, c)| (net_of(IpAddr::from(k.to_be_bytes()), len), c))
                    .collect()
            }
            IpNet::V6(n) => {
                let from = match from {
                    Some(IpAddr::V6(a)) => u128::from(a),
                    _ => 0,
                };
                self.v6
                    .prefix_sums(u128::from(n.addr()), n.prefix_len(), len, from, limit)
                    .into_iter()
                    .map(|(k, c)| (net_of(IpAddr::from(k.to_be_bytes()), len), c))
                    .collect()
            }
        }
    }
}

//! Live session counts per remote IP, indexed so that the number of sessions
//! inside any CIDR prefix costs O(prefix length), independent of how many IPs
//! are tracked.
//!
//! The core is [`PrefixTrie`], a path-compressed binary radix trie (PATRICIA /
//! crit-bit) in which every inner node caches the sum of the counts below it.
//! A prefix query therefore stops at the first node whose prefix is at least
//! as long as the query and returns that cached sum instead of visiting keys.
//!
//! Memory layout: nodes live in two dense arenas (leaves and inner nodes)
//! addressed by `u32`, so a key costs one leaf plus at most one inner node and
//! no per-node allocation. Removal swap-removes the freed slot (moving the
//! arena's last node into it and re-pointing that node's parent) instead of
//! keeping a free list: the arenas never contain holes, `len()` is just the
//! leaf count, and the backing vectors can shrink when the live set does, so
//! long-running churn neither grows nor pins memory.
//!
//! Beside the trie, two hash maps answer the queries operators ask most with
//! one or two cache misses instead of a walk of ~20 dependent ones at 1M keys:
//! one from each key to its leaf (a /32 or /128 query, and the read before every
//! update), one from each /24 (IPv4) or /64 (IPv6) that holds keys to its sum.
//!
//! Every inner node also keeps the largest count below it (saturated at 255,
//! in what was padding), so `top` finds the IPs with the most sessions
//! best-first without visiting the others (`index/walk.rs`, with the walks
//! that list networks of one prefix length). Raising a count raises the
//! bounds on its path; lowering one recomputes them upwards from the leaf
//! and stops at the first that does not change (usually the leaf's parent).
//!
//! Sums never wrap where a query can see it: they are kept in 80 bits (the
//! high 16 in what was padding, so nodes did not grow), exact unless more than
//! 65,536 keys under one node hold counts near `u64::MAX`, and a query's
//! answer saturates at `u64::MAX`.
//!
//! About 900 lines: the trie, its two hash maps and the CIDR index over both
//! families keep one invariant (every cached sum equals its leaves) and are
//! changed together; the tests are in `index/tests.rs`.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// An unsigned integer usable as a trie key; bit 0 is the most significant.
pub trait TrieKey: Copy + Eq + Ord + fmt::Debug {
    /// Key width in bits.
    const BITS: u8;

    /// The prefix length whose sums are kept in a map: "this client's /24 (or
    /// IPv6 /64)" is the question mail operators ask.
    const HOT_LEN: u8;

    /// The form a key is stored in inside a node. `u128` is 16-byte aligned
    /// on current targets, which would pad every node by 8 bytes; keeping
    /// keys as `[u64; 2]` lets nodes stay 8-byte aligned.
    type Packed: Copy + fmt::Debug + Eq + Hash;

    fn pack(self) -> Self::Packed;
    fn unpack(packed: Self::Packed) -> Self;

    /// Bit `i` counted from the most significant bit; `i < BITS`.
    fn bit(self, i: u8) -> bool;

    /// The key with all but its top `len` bits cleared.
    fn masked(self, len: u8) -> Self;

    /// Number of leading bits `self` and `other` share (`BITS` if equal).
    fn common_prefix_len(self, other: Self) -> u8;

    /// The key with all but its top `len` bits set: the largest key under
    /// the prefix `self`/`len`.
    fn filled(self, len: u8) -> Self;
}

macro_rules! trie_key_bit_ops {
    // `<$t as TrieKey>::BITS` because the inherent `u32::BITS` (a u32) would
    // otherwise shadow the trait constant.
    ($t:ty) => {
        const BITS: u8 = <$t>::BITS as u8;

        #[inline]
        fn bit(self, i: u8) -> bool {
            debug_assert!(i < <$t as TrieKey>::BITS);
            (self >> (<$t as TrieKey>::BITS - 1 - i)) & 1 == 1
        }

        #[inline]
        fn masked(self, len: u8) -> Self {
            // A shift by the full width is `None`, which is exactly the /0 mask.
            let keep = <$t>::MAX.checked_shl(u32::from(
                <$t as TrieKey>::BITS - len.min(<$t as TrieKey>::BITS),
            ));
            self & keep.unwrap_or(0)
        }

        #[inline]
        fn common_prefix_len(self, other: Self) -> u8 {
            (self ^ other).leading_zeros() as u8
        }

        #[inline]
        fn filled(self, len: u8) -> Self {
            self | !<$t as TrieKey>::masked(<$t>::MAX, len)
        }
    };
}

impl TrieKey for u32 {
    type Packed = u32;
    const HOT_LEN: u8 = 24;
    trie_key_bit_ops!(u32);

    #[inline]
    fn pack(self) -> u32 {
        self
    }

    #[inline]
    fn unpack(packed: u32) -> u32 {
        packed
    }
}

impl TrieKey for u128 {
    type Packed = [u64; 2];
    const HOT_LEN: u8 = 64;
    trie_key_bit_ops!(u128);

    #[inline]
    fn pack(self) -> [u64; 2] {
        [(self >> 64) as u64, self as u64]
    }

    #[inline]
    fn unpack(packed: [u64; 2]) -> u128 {
        (u128::from(packed[0]) << 64) | u128::from(packed[1])
    }
}

/// Returned by [`PrefixTrie::add`] when a negative delta exceeds the count;
/// the key has been removed (its count clamped to 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("count would go below zero: {count_before} + {delta}")]
pub struct Underflow {
    pub count_before: u64,
    pub delta: i64,
}

/// Reference to a node: the top bit selects the leaf arena, the rest is the
/// slot. Slots stay below `MAX_SLOTS` so that no leaf reference equals `NIL`.
type NodeRef = u32;
const LEAF: NodeRef = 1 << 31;
const NIL: NodeRef = u32::MAX;
const MAX_SLOTS: usize = (LEAF - 1) as usize;

/// Arenas at or below this capacity are never shrunk: reallocating tiny
/// vectors saves nothing and would churn the allocator.
const MIN_SHRINK_CAPACITY: usize = 64;

#[inline]
fn is_leaf(r: NodeRef) -> bool {
    r & LEAF != 0
}

#[inline]
fn slot(r: NodeRef) -> usize {
    (r & !LEAF) as usize
}

#[derive(Debug, Clone, Copy)]
struct Leaf<P> {
    key: P,
    count: u64,
}

#[derive(Debug, Clone, Copy)]
struct Inner<P> {
    /// Prefix shared by everything below, masked to `len` bits.
    key: P,
    /// Sum of all counts below: the low 64 of 80 bits; see [`Wide`].
    sum: u64,
    /// `child[b]` holds the keys whose bit `len` is `b`.
    child: [NodeRef; 2],
    len: u8,
    /// The high 16 bits of the sum.
    sum_hi: u16,
    /// The largest count of a key below, saturated at [`TOP_SATURATED`]: an
    /// upper bound that lets [`PrefixTrie::top_keys`] skip every subtree
    /// whose best key cannot make the list. It sits in what was padding.
    top: u8,
}

/// [`Inner::top`] for a subtree holding a count of at least this much.
const TOP_SATURATED: u8 = u8::MAX;

/// A count as an [`Inner::top`] bound.
#[inline]
fn top_of(count: u64) -> u8 {
    u8::try_from(count).unwrap_or(TOP_SATURATED)
}

impl<P> Inner<P> {
    fn sum(&self) -> u128 {
        Wide::new(self.sum, self.sum_hi).get()
    }

    fn add_to_sum(&mut self, diff: u128) {
        let sum = Wide::from(self.sum().wrapping_add(diff));
        (self.sum, self.sum_hi) = (sum.lo, sum.hi);
    }
}

/// An 80-bit sum, computed modulo 2^80 so that a difference (two's
/// complement, see [`Wide::diff`]) adds like an increase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Wide {
    lo: u64,
    hi: u16,
}

const WIDE_MASK: u128 = (1 << 80) - 1;

impl Wide {
    fn new(lo: u64, hi: u16) -> Self {
        Self { lo, hi }
    }

    fn get(self) -> u128 {
        u128::from(self.hi) << 64 | u128::from(self.lo)
    }

    /// `after - before` modulo 2^80.
    fn diff(before: u64, after: u64) -> u128 {
        u128::from(after).wrapping_sub(u128::from(before)) & WIDE_MASK
    }

    /// The answer a query gives.
    fn saturated(sum: u128) -> u64 {
        u64::try_from(sum).unwrap_or(u64::MAX)
    }
}

impl From<u128> for Wide {
    fn from(sum: u128) -> Self {
        let sum = sum & WIDE_MASK;
        Self {
            lo: sum as u64,
            hi: (sum >> 64) as u16,
        }
    }
}

/// Where the pointer to a node is stored, so it can be redirected.
#[derive(Debug, Clone, Copy)]
enum Link {
    Root,
    Child { inner: usize, side: usize },
}

/// Counts per key with O(key width) point updates and prefix-sum queries.
///
/// Invariants: every leaf has a non-zero count; every inner node has exactly
/// two children whose prefixes extend its own and differ at bit `len`; both
/// arenas are dense (every slot is reachable from the root).
#[derive(Clone)]
pub struct PrefixTrie<K: TrieKey> {
    leaves: Vec<Leaf<K::Packed>>,
    inners: Vec<Inner<K::Packed>>,
    root: NodeRef,
    /// Key → leaf slot, for every leaf. std's SipHash with a per-map random
    /// key, not a fixed fast hash: the keys are client IPs, which an attacker
    /// chooses, and colliding keys would turn every lookup into a scan.
    exact: HashMap<K::Packed, u32>,
    /// Prefix of `HOT_LEN` bits (masked) → sum of the counts under it, for
    /// every such prefix that holds keys. Hashed like `exact`, for the same reason.
    hot: HashMap<K::Packed, Wide>,
}

impl<K: TrieKey> Default for PrefixTrie<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: TrieKey> fmt::Debug for PrefixTrie<K> {
    // Dumping up to a million entries is never what a log line wants.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrefixTrie")
            .field("len", &self.len())
            .field("total", &self.total())
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

impl<K: TrieKey> PrefixTrie<K> {
    pub fn new() -> Self {
        Self {
            leaves: Vec::new(),
            inners: Vec::new(),
            root: NIL,
            exact: HashMap::new(),
            hot: HashMap::new(),
        }
    }

    /// Adds `delta` to the count of `key` and returns the new count. If the
    /// count would go negative it is set to 0 (the key removed) and the
    /// underflow is reported. A count above `u64::MAX` saturates.
    pub fn add(&mut self, key: K, delta: i64) -> Result<u64, Underflow> {
        let before = self.get(key);
        let after = i128::from(before) + i128::from(delta);
        if after < 0 {
            self.replace(key, before, 0);
            return Err(Underflow {
                count_before: before,
                delta,
            });
        }
        let after = u64::try_from(after).unwrap_or(u64::MAX);
        self.replace(key, before, after);
        Ok(after)
    }

    /// Sets the count of `key`, returning the previous one; 0 removes the key.
    pub fn set(&mut self, key: K, count: u64) -> u64 {
        let before = self.get(key);
        self.replace(key, before, count);
        before
    }

    pub fn get(&self, key: K) -> u64 {
        self.exact
            .get(&key.pack())
            .map_or(0, |&s| self.leaves[s as usize].count)
    }

    /// Sum of the counts of all keys whose top `len` bits equal those of
    /// `prefix` (its remaining bits are ignored). `len` 0 gives the total;
    /// `len` above `K::BITS` is a caller bug and is treated as `K::BITS`.
    pub fn count_prefix(&self, prefix: K, len: u8) -> u64 {
        debug_assert!(len <= K::BITS, "prefix length {len} > {}", K::BITS);
        let len = len.min(K::BITS);
        if len == K::BITS {
            return self.get(prefix);
        }
        if len == K::HOT_LEN {
            return self
                .hot
                .get(&prefix.masked(len).pack())
                .map_or(0, |sum| Wide::saturated(sum.get()));
        }
        let mut r = self.root;
        while r != NIL {
            let (key, node_len) = self.node_prefix(r);
            if prefix.common_prefix_len(key) < node_len.min(len) {
                return 0;
            }
            if node_len >= len {
                return Wide::saturated(self.node_sum(r));
            }
            // Leaves have node_len == BITS >= len, so this is an inner node.
            r = self.inners[slot(r)].child[usize::from(prefix.bit(node_len))];
        }
        0
    }

    /// Number of keys with a non-zero count.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    pub fn is_empty(&self) -> bool {
        self.root == NIL
    }

    pub fn total(&self) -> u64 {
        if self.root == NIL {
            0
        } else {
            Wide::saturated(self.node_sum(self.root))
        }
    }

    /// Every `HOT_LEN` prefix holding keys with its sum, in no order: one
    /// map walk, no trie walk (the per-prefix distribution of the metrics).
    pub fn hot_sums(&self) -> impl Iterator<Item = (K, u64)> + '_ {
        self.hot
            .iter()
            .map(|(prefix, sum)| (K::unpack(*prefix), Wide::saturated(sum.get())))
    }

    /// Every key with its count, in ascending key order.
    pub fn iter(&self) -> impl Iterator<Item = (K, u64)> + '_ {
        Iter {
            trie: self,
            stack: if self.root == NIL {
                Vec::new()
            } else {
                vec![self.root]
            },
        }
    }

    /// The keys from `start` on (inclusive) with their counts, in ascending
    /// order: a walk that resumes where an earlier one stopped, O(key width)
    /// to begin, so a reader can take the index a slice at a time and let go
    /// of its lock in between.
    pub fn iter_from(&self, start: K) -> impl Iterator<Item = (K, u64)> + '_ {
        let mut stack = Vec::new();
        let mut r = self.root;
        while r != NIL {
            let (key, len) = self.node_prefix(r);
            let shared = start.common_prefix_len(key);
            if shared < len {
                // `start` leaves this subtree's prefix at bit `shared`: the
                // whole subtree is above it (its bit is 1) or below it.
                if key.bit(shared) {
                    stack.push(r);
                }
                break;
            }
            if is_leaf(r) {
                stack.push(r);
                break;
            }
            let node = &self.inners[slot(r)];
            if start.bit(len) {
                r = node.child[1];
            } else {
                // Everything on the 1 side is above `start`; it comes after
                // whatever the 0 side still has.
                stack.push(node.child[1]);
                r = node.child[0];
            }
        }
        Iter { trie: self, stack }
    }

    /// Removes every key and releases the arenas' memory.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Bytes held by the arenas and the exact-key map (capacity, not just the
    /// live part).
    pub fn heap_bytes(&self) -> usize {
        self.arena_bytes()
            + table_buckets(&self.exact) * (std::mem::size_of::<(K::Packed, u32)>() + 1)
            + table_buckets(&self.hot) * (std::mem::size_of::<(K::Packed, Wide)>() + 1)
    }

    fn arena_bytes(&self) -> usize {
        self.leaves.capacity() * std::mem::size_of::<Leaf<K::Packed>>()
            + self.inners.capacity() * std::mem::size_of::<Inner<K::Packed>>()
    }

    #[cfg(test)]
    fn exact_buckets(&self) -> usize {
        table_buckets(&self.exact)
    }

    fn node_prefix(&self, r: NodeRef) -> (K, u8) {
        if is_leaf(r) {
            (K::unpack(self.leaves[slot(r)].key), K::BITS)
        } else {
            let node = &self.inners[slot(r)];
            (K::unpack(node.key), node.len)
        }
    }

    fn node_sum(&self, r: NodeRef) -> u128 {
        if is_leaf(r) {
            u128::from(self.leaves[slot(r)].count)
        } else {
            self.inners[slot(r)].sum()
        }
    }

    /// A node's [`Inner::top`] bound (a leaf's own count, saturated).
    fn node_top(&self, r: NodeRef) -> u8 {
        if is_leaf(r) {
            top_of(self.leaves[slot(r)].count)
        } else {
            self.inners[slot(r)].top
        }
    }

    /// Recomputes the `top` bounds of `path` (inner slots, root first) from
    /// the deepest up, after a count below went down; stops at the first that
    /// does not change, since those above depend on it alone.
    fn lower_tops(&mut self, path: &[u32]) {
        for &s in path.iter().rev() {
            let node = &self.inners[s as usize];
            let top = self
                .node_top(node.child[0])
                .max(self.node_top(node.child[1]));
            if top == node.top {
                return;
            }
            self.inners[s as usize].top = top;
        }
    }

    fn set_link(&mut self, link: Link, target: NodeRef) {
        match link {
            Link::Root => self.root = target,
            Link::Child { inner, side } => self.inners[inner].child[side] = target,
        }
    }

    /// Moves `key` from `before` (its current count) to `after`.
    fn replace(&mut self, key: K, before: u64, after: u64) {
        match (before, after) {
            (b, a) if b == a => return,
            (0, a) => self.insert(key, a),
            (b, 0) => self.remove(key, b),
            (b, a) => self.adjust(key, b, a),
        }
        let hot = key.masked(K::HOT_LEN).pack();
        let sum = self.hot.entry(hot).or_default();
        *sum = Wide::from(sum.get().wrapping_add(Wide::diff(before, after)));
        if sum.get() == 0 {
            // Counts are non-zero, so a zero sum means no key is left under it.
            self.hot.remove(&hot);
            release_map_slack(&mut self.hot);
        }
    }

    /// Changes the count of an existing key from `before` to `after` (by a
    /// two's complement difference, so one path handles increases and decreases).
    fn adjust(&mut self, key: K, before: u64, after: u64) {
        let diff = Wide::diff(before, after);
        let raise = top_of(after);
        let mut path = Path::new();
        let mut r = self.root;
        while !is_leaf(r) {
            path.push(slot(r) as u32);
            let node = &mut self.inners[slot(r)];
            node.add_to_sum(diff);
            node.top = node.top.max(raise);
            r = node.child[usize::from(key.bit(node.len))];
        }
        let leaf = &mut self.leaves[slot(r)];
        debug_assert_eq!(K::unpack(leaf.key), key);
        leaf.count = after;
        if after < before {
            self.lower_tops(path.as_slice());
        }
    }

    /// Inserts a key that is not present, with a non-zero count.
    fn insert(&mut self, key: K, count: u64) {
        let new_leaf = self.alloc_leaf(key, count);
        let mut link = Link::Root;
        let mut r = self.root;
        if r == NIL {
            self.root = new_leaf;
            return;
        }
        loop {
            let (node_key, node_len) = self.node_prefix(r);
            let common = key.common_prefix_len(node_key);
            if common < node_len {
                // The key leaves this node's prefix at bit `common`: a new
                // inner node for the shared part takes the node's place.
                // Leaves always end up here because the key is absent.
                let side = usize::from(key.bit(common));
                let mut child = [r; 2];
                child[side] = new_leaf;
                let sum = Wide::from(self.node_sum(r) + u128::from(count));
                let top = self.node_top(r).max(top_of(count));
                let inner = self.alloc_inner(Inner {
                    key: key.masked(common).pack(),
                    sum: sum.lo,
                    child,
                    len: common,
                    sum_hi: sum.hi,
                    top,
                });
                self.set_link(link, inner);
                return;
            }
            let s = slot(r);
            let node = &mut self.inners[s];
            node.add_to_sum(u128::from(count));
            node.top = node.top.max(top_of(count));
            let side = usize::from(key.bit(node.len));
            link = Link::Child { inner: s, side };
            r = node.child[side];
        }
    }

    /// Removes a present key whose count is `count`, splicing out its parent
    /// (which would otherwise be left with one child).
    fn remove(&mut self, key: K, count: u64) {
        let mut link_to_node = Link::Root;
        let mut link_to_parent = Link::Root;
        let mut path = Path::new();
        let mut r = self.root;
        while !is_leaf(r) {
            let s = slot(r);
            path.push(s as u32);
            let node = &mut self.inners[s];
            node.add_to_sum(Wide::diff(count, 0));
            let side = usize::from(key.bit(node.len));
            link_to_parent = link_to_node;
            link_to_node = Link::Child { inner: s, side };
            r = node.child[side];
        }
        debug_assert_eq!(K::unpack(self.leaves[slot(r)].key), key);
        match link_to_node {
            Link::Root => self.root = NIL,
            Link::Child { inner, side } => {
                let sibling = self.inners[inner].child[1 - side];
                self.set_link(link_to_parent, sibling);
                // The parent (last on the path) is gone; its ancestors'
                // bounds may fall, before any slot moves.
                let above = path.as_slice();
                self.lower_tops(&above[..above.len() - 1]);
                self.free_inner(inner);
            }
        }
        self.free_leaf(slot(r));
    }

    fn alloc_leaf(&mut self, key: K, count: u64) -> NodeRef {
        let s = self.leaves.len();
        assert!(s < MAX_SLOTS, "PrefixTrie leaf arena full");
        self.leaves.push(Leaf {
            key: key.pack(),
            count,
        });
        self.exact.insert(key.pack(), s as u32);
        LEAF | s as u32
    }

    fn alloc_inner(&mut self, node: Inner<K::Packed>) -> NodeRef {
        let s = self.inners.len();
        assert!(s < MAX_SLOTS, "PrefixTrie inner arena full");
        self.inners.push(node);
        s as u32
    }

    /// Finds the link pointing at `target`, a reachable node whose prefix is
    /// `key`: every ancestor's prefix is a shorter prefix of `key`, so
    /// following `key`'s bits from the root leads to it.
    fn link_to(&self, key: K, target: NodeRef) -> Link {
        if self.root == target {
            return Link::Root;
        }
        let mut r = self.root;
        loop {
            debug_assert!(!is_leaf(r), "link_to: {key:?} not reachable");
            let s = slot(r);
            let node = &self.inners[s];
            let side = usize::from(key.bit(node.len));
            if node.child[side] == target {
                return Link::Child { inner: s, side };
            }
            r = node.child[side];
        }
    }

    /// Frees an unlinked leaf slot by moving the last leaf into it.
    fn free_leaf(&mut self, s: usize) {
        let last = self.leaves.len() - 1;
        self.exact.remove(&self.leaves[s].key);
        if s != last {
            let moved = self.leaves[last].key;
            let link = self.link_to(K::unpack(moved), LEAF | last as u32);
            self.set_link(link, LEAF | s as u32);
            self.exact.insert(moved, s as u32);
        }
        self.leaves.swap_remove(s);
        release_slack(&mut self.leaves);
        if self.exact.capacity() > MIN_SHRINK_CAPACITY
            && self.exact.len() * 4 <= self.exact.capacity()
        {
            self.exact.shrink_to(self.exact.capacity() / 2);
        }
    }

    /// Frees an unlinked inner slot by moving the last inner node into it.
    fn free_inner(&mut self, s: usize) {
        let last = self.inners.len() - 1;
        if s != last {
            let moved = K::unpack(self.inners[last].key);
            let link = self.link_to(moved, last as u32);
            self.set_link(link, s as u32);
        }
        self.inners.swap_remove(s);
        release_slack(&mut self.inners);
    }
}

/// Halves an arena's capacity once it is at most a quarter full. The gap
/// between the shrink (1/4) and growth (full) points keeps reallocation
/// amortised O(1) even when the live set oscillates around one size.
fn release_slack<T>(arena: &mut Vec<T>) {
    if arena.capacity() > MIN_SHRINK_CAPACITY && arena.len() * 4 <= arena.capacity() {
        arena.shrink_to(arena.capacity() / 2);
    }
}

/// A hash map's table size: a power of two at most 7/8 full (each bucket is an
/// entry plus one control byte).
fn table_buckets<P, V>(map: &HashMap<P, V>) -> usize {
    match map.capacity() {
        0 => 0,
        capacity => (capacity * 8 / 7).next_power_of_two(),
    }
}

/// [`release_slack`] for a hash map, after a removal.
fn release_map_slack<P: Eq + Hash, V>(map: &mut HashMap<P, V>) {
    if map.is_empty() {
        // Removal leaves tombstones that would make the next fill grow the
        // table early; an empty map can drop them all at no cost.
        map.clear();
    }
    if map.capacity() > MIN_SHRINK_CAPACITY && map.len() * 4 <= map.capacity() {
        map.shrink_to(map.capacity() / 2);
    }
}

/// The inner slots from the root down to a leaf: at most one per key bit, on
/// the stack, so an update allocates nothing.
struct Path {
    slots: [u32; 128],
    len: usize,
}

impl Path {
    fn new() -> Self {
        Self {
            slots: [0; 128],
            len: 0,
        }
    }

    fn push(&mut self, s: u32) {
        self.slots[self.len] = s;
        self.len += 1;
    }

    fn as_slice(&self) -> &[u32] {
        &self.slots[..self.len]
    }
}

/// Depth-first, 0-side first, which visits leaves in ascending key order.
/// The stack holds at most one pending sibling per level.
struct Iter<'a, K: TrieKey> {
    trie: &'a PrefixTrie<K>,
    stack: Vec<NodeRef>,
}

impl<K: TrieKey> Iterator for Iter<'_, K> {
    type Item = (K, u64);

    fn next(&mut self) -> Option<Self::Item> {
        while let Some(r) = self.stack.pop() {
            if is_leaf(r) {
                let leaf = &self.trie.leaves[slot(r)];
                return Some((K::unpack(leaf.key), leaf.count));
            }
            let node = &self.trie.inners[slot(r)];
            self.stack.push(node.child[1]);
            self.stack.push(node.child[0]);
        }
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("count for {ip} would go below zero: {count_before} + {delta}")]
    Underflow {
        ip: IpAddr,
        count_before: u64,
        delta: i64,
    },
}

/// `::ffff:0:0/96`, where IPv4-mapped IPv6 addresses live.
const V4_MAPPED_NET: u128 = 0xffff << 32;
const V4_MAPPED_LEN: u8 = 96;

/// A key after IPv4-mapped IPv6 addresses have been folded into IPv4, so a
/// peer is counted once whichever socket family reported it.
enum Key {
    V4(u32),
    V6(u128),
}

fn key_of(ip: IpAddr) -> Key {
    match ip {
        IpAddr::V4(a) => Key::V4(u32::from(a)),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => Key::V4(u32::from(v4)),
            None => Key::V6(u128::from(a)),
        },
    }
}

/// Session counts per IP for both families, queryable by any CIDR network.
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are stored and reported as
/// IPv4. An IPv6 network inside `::ffff:0:0/96` counts the corresponding IPv4
/// network; any other IPv6 network, even one containing that block (`::/0`),
/// counts IPv6 peers only, as a mail operator reads "this client's /64".
#[derive(Default, Clone, Debug)]
pub struct CidrIndex {
    v4: PrefixTrie<u32>,
    v6: PrefixTrie<u128>,
}

impl CidrIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` to the count of `ip`; see [`PrefixTrie::add`].
    pub fn add(&mut self, ip: IpAddr, delta: i64) -> Result<u64, IndexError> {
        let result = match key_of(ip) {
            Key::V4(k) => self.v4.add(k, delta),
            Key::V6(k) => self.v6.add(k, delta),
        };
        result.map_err(
            |Underflow {
                 count_before,
                 delta,
             }| IndexError::Underflow {
                ip,
                count_before,
                delta,
            },
        )
    }

    /// Sets the count of `ip`, returning the previous one; 0 removes it.
    pub fn set(&mut self, ip: IpAddr, count: u64) -> u64 {
        match key_of(ip) {
            Key::V4(k) => self.v4.set(k, count),
            Key::V6(k) => self.v6.set(k, count),
        }
    }

    pub fn get(&self, ip: IpAddr) -> u64 {
        match key_of(ip) {
            Key::V4(k) => self.v4.get(k),
            Key::V6(k) => self.v6.get(k),
        }
    }

    /// Sessions from addresses inside `net`; host bits of `net` are ignored.
    pub fn count(&self, net: &IpNet) -> u64 {
        match net {
            IpNet::V4(n) => self.v4.count_prefix(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => {
                let addr = u128::from(n.addr());
                let len = n.prefix_len();
                if len >= V4_MAPPED_LEN && addr.common_prefix_len(V4_MAPPED_NET) >= V4_MAPPED_LEN {
                    // Inside the mapped block; the v6 trie never holds such keys,
                    // so only the IPv4 side can contribute.
                    self.v4.count_prefix(addr as u32, len - V4_MAPPED_LEN)
                } else {
                    // Anything else, even a network wider than the mapped block
                    // (::/64, ::/0), means IPv6 peers: IPv4 sessions count under
                    // IPv4 networks only, or an IPv6 client near :: would see the
                    // whole IPv4 internet in its /64.
                    self.v6.count_prefix(addr, len)
                }
            }
        }
    }

    /// Number of IPs with a non-zero count.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.v4.total().saturating_add(self.v6.total())
    }

    /// Every IP with its count: IPv4 ascending, then IPv6 ascending (which is
    /// `IpAddr`'s order).
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        let v4 = self
            .v4
            .iter()
            .map(|(k, c)| (IpAddr::V4(Ipv4Addr::from(k)), c));
        let v6 = self
            .v6
            .iter()
            .map(|(k, c)| (IpAddr::V6(Ipv6Addr::from(k)), c));
        v4.chain(v6)
    }

    /// Every IP from `start` on (inclusive), in [`CidrIndex::iter`]'s order.
    /// An IPv4-mapped `start` is its IPv4 address, as the index stores it.
    pub fn iter_from(&self, start: IpAddr) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        let (v4, v6) = match key_of(start) {
            Key::V4(k) => (Some(self.v4.iter_from(k)), self.v6.iter_from(0)),
            // Every IPv4 key is before any IPv6 one.
            Key::V6(k) => (None, self.v6.iter_from(k)),
        };
        let v4 = v4
            .into_iter()
            .flatten()
            .map(|(k, c)| (IpAddr::V4(Ipv4Addr::from(k)), c));
        let v6 = v6.map(|(k, c)| (IpAddr::V6(Ipv6Addr::from(k)), c));
        v4.chain(v6)
    }

    /// Every IPv4 /24 and IPv6 /64 that holds sessions with its sum, in no
    /// order; see [`PrefixTrie::hot_sums`].
    pub fn hot_sums(&self) -> impl Iterator<Item = (IpNet, u64)> + '_ {
        let v4 = self.v4.hot_sums().map(|(k, sum)| {
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(k), u32::HOT_LEN).expect("HOT_LEN <= 32");
            (IpNet::V4(net), sum)
        });
        let v6 = self.v6.hot_sums().map(|(k, sum)| {
            let net =
                ipnet::Ipv6Net::new(Ipv6Addr::from(k), u128::HOT_LEN).expect("HOT_LEN <= 128");
            (IpNet::V6(net), sum)
        });
        v4.chain(v6)
    }

    pub fn clear(&mut self) {
        self.v4.clear();
        self.v6.clear();
    }

    pub fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes() + self.v6.heap_bytes()
    }
}

mod walk;

#[cfg(test)]
mod tests;

//! Tests of the PATRICIA trie and the CIDR index, property tests against a
//! model included (one file: they share the model and its generators).

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

mod walks;

/// Top `len` bits computed independently of `TrieKey`, for the model.
trait ModelKey: TrieKey + Hash {
    fn top(self, len: u8) -> u128;
    /// The top `keep` bits of `self` followed by the rest of `tail`.
    fn splice(self, tail: Self, keep: u8) -> Self;
    /// The next key, None after the last.
    fn next_key(self) -> Option<Self>;
}
impl ModelKey for u32 {
    fn top(self, len: u8) -> u128 {
        u128::from(self.checked_shr(32 - u32::from(len)).unwrap_or(0))
    }
    fn splice(self, tail: Self, keep: u8) -> Self {
        let low = u32::MAX.checked_shr(u32::from(keep)).unwrap_or(0);
        (self & !low) | (tail & low)
    }
    fn next_key(self) -> Option<Self> {
        self.checked_add(1)
    }
}
impl ModelKey for u128 {
    fn top(self, len: u8) -> u128 {
        self.checked_shr(128 - u32::from(len)).unwrap_or(0)
    }
    fn splice(self, tail: Self, keep: u8) -> Self {
        let low = u128::MAX.checked_shr(u32::from(keep)).unwrap_or(0);
        (self & !low) | (tail & low)
    }
    fn next_key(self) -> Option<Self> {
        self.checked_add(1)
    }
}

fn brute_count<K: ModelKey>(model: &HashMap<K, u64>, prefix: K, len: u8) -> u64 {
    model
        .iter()
        .filter(|(k, _)| k.top(len) == prefix.top(len))
        .map(|(_, c)| c)
        .sum()
}

/// Walks the whole trie and checks every structural invariant, including
/// that both arenas are dense (each slot reached exactly once).
fn check_invariants<K: TrieKey>(t: &PrefixTrie<K>) {
    // The exact-key map names every leaf, by its current slot, and nothing else.
    assert_eq!(t.exact.len(), t.leaves.len());
    for (s, leaf) in t.leaves.iter().enumerate() {
        assert_eq!(t.exact.get(&leaf.key), Some(&(s as u32)));
    }
    // The hot map holds the sum of every HOT_LEN prefix that has keys.
    let mut hot: HashMap<K::Packed, u128> = HashMap::new();
    for leaf in &t.leaves {
        let prefix = K::unpack(leaf.key).masked(K::HOT_LEN).pack();
        *hot.entry(prefix).or_insert(0) += u128::from(leaf.count);
    }
    let held: HashMap<K::Packed, u128> = t.hot.iter().map(|(k, s)| (*k, s.get())).collect();
    assert_eq!(hot, held);
    assert!(table_buckets(&t.hot) <= 4 * t.len().max(MIN_SHRINK_CAPACITY).next_power_of_two());
    if t.root == NIL {
        assert!(t.leaves.is_empty() && t.inners.is_empty());
        return;
    }
    assert_eq!(t.inners.len() + 1, t.leaves.len());
    let mut seen_leaf = vec![false; t.leaves.len()];
    let mut seen_inner = vec![false; t.inners.len()];
    // (node, parent prefix, parent len, side taken from parent)
    let mut stack = vec![(t.root, None::<(K, u8, bool)>)];
    while let Some((r, parent)) = stack.pop() {
        let (key, len) = t.node_prefix(r);
        if let Some((pkey, plen, side)) = parent {
            assert!(len > plen, "child len {len} <= parent len {plen}");
            assert!(key.common_prefix_len(pkey) >= plen);
            assert_eq!(key.bit(plen), side);
        }
        if is_leaf(r) {
            assert!(!std::mem::replace(&mut seen_leaf[slot(r)], true));
            assert_ne!(t.leaves[slot(r)].count, 0);
        } else {
            assert!(!std::mem::replace(&mut seen_inner[slot(r)], true));
            let node = &t.inners[slot(r)];
            assert!(node.len < K::BITS);
            assert_eq!(key, key.masked(len));
            let children = node.child.map(|c| t.node_sum(c));
            assert_eq!(node.sum(), children[0] + children[1]);
            let tops = node.child.map(|c| t.node_top(c));
            assert_eq!(node.top, tops[0].max(tops[1]), "top bound of {key:?}/{len}");
            stack.push((node.child[0], Some((key, len, false))));
            stack.push((node.child[1], Some((key, len, true))));
        }
    }
    assert!(seen_leaf.iter().all(|&s| s) && seen_inner.iter().all(|&s| s));
}

fn check_against_model<K: ModelKey>(t: &PrefixTrie<K>, model: &HashMap<K, u64>) {
    check_invariants(t);
    assert_eq!(t.len(), model.len());
    assert_eq!(t.is_empty(), model.is_empty());
    assert_eq!(t.total(), model.values().sum::<u64>());
    let sorted: Vec<(K, u64)> = model
        .iter()
        .map(|(&k, &c)| (k, c))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    assert_eq!(t.iter().collect::<Vec<_>>(), sorted);
    for (&k, &c) in model {
        assert_eq!(t.get(k), c);
    }
    let probes: Vec<K> = model.keys().copied().take(3).collect();
    for prefix in probes {
        for plen in [0, K::HOT_LEN / 2, K::HOT_LEN, K::BITS - 2] {
            walks::check_walks(t, model, prefix, plen);
        }
    }
}

#[test]
fn node_sizes() {
    let sizes = [
        std::mem::size_of::<Leaf<<u32 as TrieKey>::Packed>>(),
        std::mem::size_of::<Inner<<u32 as TrieKey>::Packed>>(),
        std::mem::size_of::<Leaf<<u128 as TrieKey>::Packed>>(),
        std::mem::size_of::<Inner<<u128 as TrieKey>::Packed>>(),
    ];
    println!(
        "node sizes: leaf<u32> {} inner<u32> {} leaf<u128> {} inner<u128> {}",
        sizes[0], sizes[1], sizes[2], sizes[3]
    );
    assert_eq!(sizes, [16, 24, 24, 40]);
}

#[test]
fn key_bit_helpers() {
    assert!(0x8000_0000u32.bit(0));
    assert!(!0x8000_0000u32.bit(1));
    assert!(1u32.bit(31));
    assert!(1u128.bit(127));
    assert!((1u128 << 127).bit(0));
    assert_eq!(0xffff_ffffu32.masked(0), 0);
    assert_eq!(0xffff_ffffu32.masked(8), 0xff00_0000);
    assert_eq!(0xffff_ffffu32.masked(32), 0xffff_ffff);
    assert_eq!(u128::MAX.masked(0), 0);
    assert_eq!(u128::MAX.masked(1), 1 << 127);
    assert_eq!(u128::MAX.masked(128), u128::MAX);
    assert_eq!(5u32.common_prefix_len(5), 32);
    assert_eq!(0u32.common_prefix_len(1), 31);
    assert_eq!(0u128.common_prefix_len(1 << 127), 0);
    assert_eq!(7u128.common_prefix_len(7), 128);
    let k = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
    assert_eq!(u128::unpack(k.pack()), k);
}

#[test]
fn empty_trie() {
    let t = PrefixTrie::<u32>::new();
    assert!(t.is_empty());
    assert_eq!((t.len(), t.total(), t.get(0), t.heap_bytes()), (0, 0, 0, 0));
    for len in 0..=32 {
        assert_eq!(t.count_prefix(0, len), 0);
    }
    assert_eq!(t.iter().count(), 0);
    let t6 = PrefixTrie::<u128>::default();
    assert_eq!(t6.count_prefix(u128::MAX, 0), 0);
    assert_eq!(t6.count_prefix(u128::MAX, 128), 0);
}

#[test]
fn single_key_every_length() {
    let mut t = PrefixTrie::<u32>::new();
    let k = 0xc0a8_0101;
    assert_eq!(t.add(k, 3), Ok(3));
    for len in 0..=32 {
        assert_eq!(t.count_prefix(k, len), 3);
        // Flipping the last bit of the queried prefix must miss.
        if len > 0 {
            assert_eq!(t.count_prefix(k ^ (1 << (32 - len)), len), 0);
        }
    }
    check_invariants(&t);
}

#[test]
fn slash0_and_full_length() {
    let mut t = PrefixTrie::<u32>::new();
    let keys = [0u32, 1, 0x0a00_0001, 0x0a00_0002, 0x8000_0000, u32::MAX];
    for (i, &k) in keys.iter().enumerate() {
        t.set(k, i as u64 + 1);
    }
    assert_eq!(t.count_prefix(0x1234_5678, 0), 21);
    assert_eq!(t.total(), 21);
    for (i, &k) in keys.iter().enumerate() {
        assert_eq!(t.count_prefix(k, 32), i as u64 + 1);
    }
    assert_eq!(t.count_prefix(2, 32), 0);
    assert_eq!(t.count_prefix(0, 1), 1 + 2 + 3 + 4);
    assert_eq!(t.count_prefix(0x8000_0000, 1), 5 + 6);
    // Host bits of the prefix are ignored.
    assert_eq!(t.count_prefix(0x0aff_ffff, 8), 7);

    let mut t6 = PrefixTrie::<u128>::new();
    let keys6 = [0u128, 1, 1 << 127, u128::MAX, 0x2001_0db8 << 96];
    for (i, &k) in keys6.iter().enumerate() {
        t6.set(k, 10 * (i as u64 + 1));
    }
    assert_eq!(t6.count_prefix(0, 0), 150);
    for (i, &k) in keys6.iter().enumerate() {
        assert_eq!(t6.count_prefix(k, 128), 10 * (i as u64 + 1));
    }
    assert_eq!(t6.count_prefix(0, 127), 30);
    assert_eq!(t6.count_prefix(0x2001_0db8 << 96, 32), 50);
    assert_eq!(t6.count_prefix(1 << 127, 1), 30 + 40);
    check_invariants(&t6);
}

#[test]
fn keys_differing_only_in_last_bit() {
    let mut t = PrefixTrie::<u32>::new();
    t.set(0x0a00_0000, 1);
    t.set(0x0a00_0001, 2);
    assert_eq!(t.count_prefix(0x0a00_0000, 31), 3);
    assert_eq!(t.count_prefix(0x0a00_0000, 32), 1);
    assert_eq!(t.count_prefix(0x0a00_0001, 32), 2);
    assert_eq!(
        t.iter().collect::<Vec<_>>(),
        [(0x0a00_0000, 1), (0x0a00_0001, 2)]
    );
    assert_eq!(t.set(0x0a00_0000, 0), 1);
    assert_eq!(t.count_prefix(0x0a00_0000, 31), 2);
    check_invariants(&t);

    let mut t6 = PrefixTrie::<u128>::new();
    let k = 0xfe80 << 112;
    t6.set(k, 4);
    t6.set(k | 1, 5);
    assert_eq!(t6.count_prefix(k, 127), 9);
    assert_eq!(t6.count_prefix(k, 128), 4);
    assert_eq!(t6.count_prefix(k | 1, 128), 5);
    assert_eq!(t6.count_prefix(k | 2, 127), 0);
    check_invariants(&t6);
}

#[test]
fn remove_to_empty_then_reinsert() {
    let mut t = PrefixTrie::<u32>::new();
    let keys: Vec<u32> = (0..1000u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    for _ in 0..2 {
        for &k in &keys {
            assert_eq!(t.add(k, 2), Ok(2));
        }
        assert_eq!(t.len(), 1000);
        assert_eq!(t.total(), 2000);
        check_invariants(&t);
        for &k in &keys {
            assert_eq!(t.add(k, -2), Ok(0));
        }
        assert!(t.is_empty());
        assert_eq!((t.len(), t.total(), t.count_prefix(0, 0)), (0, 0, 0));
        // Shrinking stops at MIN_SHRINK_CAPACITY per arena and map.
        assert!(t.arena_bytes() <= MIN_SHRINK_CAPACITY * (16 + 24));
        assert!(t.exact_buckets() <= 2 * MIN_SHRINK_CAPACITY);
        check_invariants(&t);
    }
    t.set(7, 1);
    assert_eq!(t.iter().collect::<Vec<_>>(), [(7, 1)]);
    t.clear();
    assert_eq!((t.len(), t.heap_bytes()), (0, 0));
}

#[test]
fn underflow() {
    let mut t = PrefixTrie::<u32>::new();
    assert_eq!(
        t.add(9, -1),
        Err(Underflow {
            count_before: 0,
            delta: -1
        })
    );
    assert_eq!((t.len(), t.get(9)), (0, 0));
    t.add(9, 3).unwrap();
    t.add(10, 1).unwrap();
    assert_eq!(
        t.add(9, -5),
        Err(Underflow {
            count_before: 3,
            delta: -5
        })
    );
    assert_eq!((t.len(), t.get(9), t.total()), (1, 0, 1));
    assert_eq!(
        t.add(10, i64::MIN),
        Err(Underflow {
            count_before: 1,
            delta: i64::MIN
        })
    );
    assert!(t.is_empty());
    check_invariants(&t);
    assert_eq!(
        Underflow {
            count_before: 3,
            delta: -5
        }
        .to_string(),
        "count would go below zero: 3 + -5"
    );
}

#[test]
fn set_and_get() {
    let mut t = PrefixTrie::<u128>::new();
    assert_eq!(t.set(42, 5), 0);
    assert_eq!(t.set(42, 5), 5);
    assert_eq!(t.set(42, 2), 5);
    assert_eq!(t.get(42), 2);
    assert_eq!(t.get(43), 0);
    assert_eq!(t.total(), 2);
    assert_eq!(t.add(42, 0), Ok(2));
    assert_eq!(t.add(42, -2), Ok(0));
    assert_eq!(t.len(), 0);
    assert_eq!(t.set(42, 0), 0);
    assert_eq!(t.add(42, 0), Ok(0));
    assert!(t.is_empty());
    t.set(1, u64::MAX - 1);
    assert_eq!(t.add(1, 5), Ok(u64::MAX));
    check_invariants(&t);
}

#[test]
fn sums_saturate_instead_of_wrapping_and_stay_exact() {
    // The case: 10.0.0.1 = 2^64 - 1 and 10.0.0.2 = 5 read 4 for
    // the /24 when the sums wrapped.
    let mut idx = CidrIndex::new();
    idx.set("10.0.0.1".parse().unwrap(), u64::MAX);
    idx.set("10.0.0.2".parse().unwrap(), 5);
    idx.set("10.0.1.1".parse().unwrap(), u64::MAX - 1);
    for net in ["10.0.0.0/24", "10.0.0.0/30", "10.0.0.0/16", "0.0.0.0/0"] {
        assert_eq!(idx.count(&net.parse().unwrap()), u64::MAX, "{net}");
    }
    assert_eq!(idx.total(), u64::MAX);
    // Exact underneath: once the big counts leave, the rest is right.
    idx.set("10.0.0.1".parse().unwrap(), 0);
    assert_eq!(idx.count(&"10.0.0.0/24".parse().unwrap()), 5);
    assert_eq!(idx.count(&"10.0.0.0/16".parse().unwrap()), u64::MAX);
    assert_eq!(
        idx.add("10.0.1.1".parse().unwrap(), -(i64::MAX)),
        Ok(u64::MAX - 1 - i64::MAX as u64)
    );
    assert_eq!(
        idx.count(&"10.0.0.0/16".parse().unwrap()),
        u64::MAX - 1 - i64::MAX as u64 + 5
    );
    // Both families at once saturate too.
    idx.set("2001:db8::1".parse().unwrap(), u64::MAX);
    assert_eq!(idx.total(), u64::MAX);
    let mut t = PrefixTrie::<u32>::new();
    for k in 0..300u32 {
        t.set(k << 4, u64::MAX - u64::from(k));
    }
    check_invariants(&t);
    assert_eq!(t.count_prefix(0, 20), u64::MAX);
    for k in 1..300u32 {
        t.set(k << 4, 0);
    }
    assert_eq!(t.count_prefix(0, 0), u64::MAX);
    assert_eq!(t.count_prefix(0, 24), u64::MAX);
    t.set(0, 7);
    assert_eq!((t.count_prefix(0, 0), t.count_prefix(0, 24)), (7, 7));
    check_invariants(&t);
}

#[test]
fn iteration_is_ascending() {
    let mut t = PrefixTrie::<u32>::new();
    let keys = [u32::MAX, 0, 0x8000_0000, 0x7fff_ffff, 5, 4, 0x0a00_0000];
    for &k in &keys {
        t.set(k, u64::from(k % 7) + 1);
    }
    let mut want: Vec<(u32, u64)> = keys.iter().map(|&k| (k, u64::from(k % 7) + 1)).collect();
    want.sort();
    assert_eq!(t.iter().collect::<Vec<_>>(), want);
}

#[test]
fn churn_keeps_memory_flat() {
    let mut t = PrefixTrie::<u32>::new();
    let key = |i: u32| i.wrapping_mul(2_654_435_761) ^ 0x5bd1_e995;
    for i in 0..5000 {
        t.set(key(i), 1);
    }
    let filled = t.arena_bytes();
    for round in 0..40u32 {
        let base = round * 1000;
        for i in base..base + 1000 {
            t.set(key(i), 0);
        }
        for i in base + 5000..base + 6000 {
            t.set(key(i), 1);
        }
        assert_eq!(t.arena_bytes(), filled);
        assert_eq!(t.len(), 5000);
        // Tombstones can grow the map to about twice the live keys; past
        // that it rehashes in place instead of growing.
        assert!(t.exact_buckets() <= 4 * 5000usize.next_power_of_two());
    }
    check_invariants(&t);
}

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn cidr_index_v4_mapped() {
    let mut idx = CidrIndex::new();
    assert_eq!(idx.add(v4("::ffff:10.0.0.1"), 2), Ok(2));
    assert_eq!(idx.add(v4("10.0.0.1"), 1), Ok(3));
    assert_eq!(idx.add(v4("10.0.0.2"), 4), Ok(4));
    assert_eq!(idx.add(v4("192.168.1.1"), 1), Ok(1));
    assert_eq!(idx.add(v4("2001:db8::1"), 5), Ok(5));
    assert_eq!(idx.add(v4("2001:db8:1::1"), 6), Ok(6));
    // IPv4-compatible (not mapped) addresses stay IPv6.
    assert_eq!(idx.add(v4("::10.0.0.1"), 7), Ok(7));

    assert_eq!(idx.get(v4("10.0.0.1")), 3);
    assert_eq!(idx.get(v4("::ffff:10.0.0.1")), 3);
    assert_eq!(idx.len(), 6);
    assert_eq!(idx.total(), 3 + 4 + 1 + 5 + 6 + 7);

    assert_eq!(idx.count(&net("10.0.0.0/8")), 7);
    assert_eq!(idx.count(&net("::ffff:10.0.0.0/104")), 7);
    assert_eq!(idx.count(&net("::ffff:10.0.0.1/128")), 3);
    assert_eq!(idx.count(&net("::ffff:0.0.0.0/96")), 8);
    assert_eq!(idx.count(&net("::ffff:192.168.0.0/112")), 1);
    assert_eq!(idx.count(&net("0.0.0.0/0")), 8);
    // Networks wider than the mapped block count IPv6 peers only.
    assert_eq!(idx.count(&net("::/0")), 26 - 8);
    assert_eq!(idx.count(&net("::/80")), 7);
    assert_eq!(idx.count(&net("::/96")), 7);
    assert_eq!(idx.count(&net("2001:db8::/32")), 11);
    assert_eq!(idx.count(&net("2001:db8::/48")), 5);
    // Host bits are ignored.
    assert_eq!(idx.count(&net("10.0.0.77/24")), 7);
    assert_eq!(idx.count(&net("2001:db8::ffff/48")), 5);

    let listed: Vec<(IpAddr, u64)> = idx.iter().collect();
    assert_eq!(
        listed,
        [
            (v4("10.0.0.1"), 3),
            (v4("10.0.0.2"), 4),
            (v4("192.168.1.1"), 1),
            (v4("::10.0.0.1"), 7),
            (v4("2001:db8::1"), 5),
            (v4("2001:db8:1::1"), 6),
        ]
    );

    let mapped = v4("::ffff:192.168.1.1");
    assert_eq!(
        idx.add(mapped, -2),
        Err(IndexError::Underflow {
            ip: mapped,
            count_before: 1,
            delta: -2
        })
    );
    assert_eq!(idx.get(v4("192.168.1.1")), 0);
    assert_eq!(idx.set(v4("::ffff:10.0.0.2"), 0), 4);
    assert_eq!(idx.count(&net("10.0.0.0/8")), 3);
    assert_eq!(idx.len(), 4);
    assert!(idx.heap_bytes() > 0);
    idx.clear();
    assert!(idx.is_empty());
    assert_eq!((idx.total(), idx.heap_bytes()), (0, 0));
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Add(i64),
    Set(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (-4i64..=6).prop_map(Op::Add),
        2 => (0u64..4).prop_map(Op::Set),
        // Past the `top` bound's saturation.
        1 => (250u64..260).prop_map(Op::Set),
        1 => Just(Op::Add(i64::MIN)),
    ]
}

/// Applies `ops` to a trie and a HashMap model, comparing every result;
/// then checks prefix counts (every length for some keys, plus `probes`),
/// empties the trie and replays to show memory does not grow.
fn run_model<K: ModelKey>(
    pool: &[K],
    ops: &[(usize, Op)],
    probes: &[(K, u8)],
) -> Result<(), TestCaseError> {
    let mut t = PrefixTrie::<K>::new();
    let mut peaks = Vec::new();
    let mut after_clear = Vec::new();
    for round in 0..2 {
        let mut model: HashMap<K, u64> = HashMap::new();
        let mut peak = 0;
        for (step, &(i, op)) in ops.iter().enumerate() {
            let k = pool[i % pool.len()];
            let before = model.get(&k).copied().unwrap_or(0);
            match op {
                Op::Add(d) => {
                    let after = i128::from(before) + i128::from(d);
                    let got = t.add(k, d);
                    if after < 0 {
                        prop_assert_eq!(
                            got,
                            Err(Underflow {
                                count_before: before,
                                delta: d
                            })
                        );
                        model.remove(&k);
                    } else {
                        prop_assert_eq!(got, Ok(after as u64));
                        model.insert(k, after as u64);
                    }
                }
                Op::Set(c) => {
                    prop_assert_eq!(t.set(k, c), before);
                    model.insert(k, c);
                }
            }
            model.retain(|_, c| *c != 0);
            peak = peak.max(t.arena_bytes());
            // The map's size depends on its history of tombstones, not
            // only on the live keys, so it gets a bound instead.
            prop_assert!(
                t.exact_buckets() <= 4 * t.len().max(MIN_SHRINK_CAPACITY).next_power_of_two()
            );
            if round == 0 {
                for &(p, len) in probes.iter().take(4) {
                    prop_assert_eq!(t.count_prefix(p, len), brute_count(&model, p, len));
                }
                if step % 16 == 0 {
                    check_against_model(&t, &model);
                }
            }
        }
        check_against_model(&t, &model);
        if round == 0 {
            for &k in pool.iter().take(12) {
                for len in 0..=K::BITS {
                    prop_assert_eq!(t.count_prefix(k, len), brute_count(&model, k, len));
                }
            }
            for &(p, len) in probes {
                prop_assert_eq!(t.count_prefix(p, len), brute_count(&model, p, len));
            }
        }
        let keys: Vec<K> = model.keys().copied().collect();
        for k in keys {
            prop_assert_eq!(t.set(k, 0), model[&k]);
        }
        prop_assert!(t.is_empty());
        prop_assert_eq!(t.total(), 0);
        check_invariants(&t);
        peaks.push(peak);
        after_clear.push(t.arena_bytes());
    }
    prop_assert!(peaks[1] <= peaks[0], "peak arena bytes grew: {:?}", peaks);
    prop_assert_eq!(after_clear[0], after_clear[1]);
    Ok(())
}

/// Keys from one to three random /16s, with low bits either tiny (so
/// keys differ only in the last bits) or random.
fn v4_pool() -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(any::<u16>(), 1..4).prop_flat_map(|nets| {
        let n = nets.len();
        prop::collection::vec(
            (
                0..n,
                prop_oneof![0u32..16, any::<u16>().prop_map(u32::from)],
            ),
            1..48,
        )
        .prop_map(move |picks| {
            picks
                .into_iter()
                .map(|(i, lo)| (u32::from(nets[i]) << 16) | lo)
                .collect()
        })
    })
}

/// Keys from one to three random /48s, in a few /64 subnets, with
/// interface ids either tiny or random.
fn v6_pool() -> impl Strategy<Value = Vec<u128>> {
    prop::collection::vec(any::<u64>().prop_map(|x| u128::from(x >> 16)), 1..4).prop_flat_map(
        |nets| {
            let n = nets.len();
            let iid = prop_oneof![0u64..16, any::<u64>()];
            prop::collection::vec((0..n, 0u128..4, iid), 1..48).prop_map(move |picks| {
                picks
                    .into_iter()
                    .map(|(i, subnet, iid)| (nets[i] << 80) | (subnet << 64) | u128::from(iid))
                    .collect()
            })
        },
    )
}

/// A key pool, operations on pool indices, and (prefix, len) probes.
type Case<K> = (Vec<K>, Vec<(usize, Op)>, Vec<(K, u8)>);

fn with_ops_and_probes<K: ModelKey + 'static>(
    pool: impl Strategy<Value = Vec<K>>,
    noise: impl Strategy<Value = K> + Clone + 'static,
) -> impl Strategy<Value = Case<K>> {
    pool.prop_flat_map(move |pool| {
        let n = pool.len();
        let near = pool.clone();
        // Probes are mostly pool keys whose tail, starting a little
        // before or after the probed length, is random: they hit, miss
        // and straddle existing subtrees rather than empty space.
        let probe = prop_oneof![
            3 => (0..n, noise.clone(), 0..=K::BITS, 0u8..=10).prop_map(move |(i, x, len, off)| {
                let keep = (len.saturating_sub(2) + off).min(K::BITS);
                (near[i].splice(x, keep), len)
            }),
            1 => (noise.clone(), 0..=K::BITS),
        ];
        (
            Just(pool),
            prop::collection::vec((0..n, op()), 1..256),
            prop::collection::vec(probe, 0..24),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_v4_matches_model((pool, ops, probes) in with_ops_and_probes(v4_pool(), any::<u32>())) {
        run_model(&pool, &ops, &probes)?;
    }

    #[test]
    fn prop_v6_matches_model((pool, ops, probes) in with_ops_and_probes(v6_pool(), any::<u128>())) {
        run_model(&pool, &ops, &probes)?;
    }
}

/// `iter_from(start)` is the model's keys from `start` on, in order.
fn check_iter_from<K: ModelKey>(keys: &[K], starts: &[K]) -> Result<(), TestCaseError> {
    let mut t = PrefixTrie::<K>::new();
    let mut model = BTreeMap::new();
    for (i, &k) in keys.iter().enumerate() {
        let count = i as u64 % 5 + 1;
        t.set(k, count);
        model.insert(k, count);
    }
    for &start in starts.iter().chain(keys) {
        let got: Vec<(K, u64)> = t.iter_from(start).collect();
        let want: Vec<(K, u64)> = model.range(start..).map(|(&k, &c)| (k, c)).collect();
        prop_assert_eq!(got, want, "from {:?}", start);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_v4_iter_from_resumes_in_order(
        keys in v4_pool(),
        starts in prop::collection::vec(any::<u32>(), 0..16),
    ) {
        // Starts next to the keys too: one below, one above.
        let near: Vec<u32> = keys.iter().flat_map(|&k| [k.wrapping_sub(1), k.wrapping_add(1)]).collect();
        check_iter_from(&keys, &[starts, near].concat())?;
    }

    #[test]
    fn prop_v6_iter_from_resumes_in_order(
        keys in v6_pool(),
        starts in prop::collection::vec(any::<u128>(), 0..16),
    ) {
        let near: Vec<u128> = keys.iter().flat_map(|&k| [k.wrapping_sub(1), k.wrapping_add(1)]).collect();
        check_iter_from(&keys, &[starts, near].concat())?;
    }
}

#[test]
fn iter_from_on_an_empty_trie_and_past_the_last_key() {
    let mut t = PrefixTrie::<u32>::new();
    assert_eq!(t.iter_from(0).count(), 0);
    t.set(7, 1);
    t.set(9, 2);
    assert_eq!(t.iter_from(0).collect::<Vec<_>>(), [(7, 1), (9, 2)]);
    assert_eq!(t.iter_from(8).collect::<Vec<_>>(), [(9, 2)]);
    assert_eq!(t.iter_from(10).count(), 0);
    assert_eq!(t.iter_from(u32::MAX).count(), 0);
}

#[test]
fn cidr_index_iter_from_crosses_families_in_ip_order() {
    let mut index = CidrIndex::new();
    for (ip, n) in [
        ("10.0.0.1", 1),
        ("10.0.0.9", 2),
        ("2001:db8::1", 3),
        ("::ffff:10.0.0.5", 4),
    ] {
        index.set(ip.parse().unwrap(), n);
    }
    let from = |ip: &str| -> Vec<(String, u64)> {
        index
            .iter_from(ip.parse().unwrap())
            .map(|(ip, n)| (ip.to_string(), n))
            .collect()
    };
    let all = from("0.0.0.0");
    assert_eq!(
        all,
        [
            ("10.0.0.1".to_string(), 1),
            ("10.0.0.5".to_string(), 4),
            ("10.0.0.9".to_string(), 2),
            ("2001:db8::1".to_string(), 3)
        ]
    );
    assert_eq!(from("10.0.0.2"), all[1..]);
    // A mapped start is its IPv4 address.
    assert_eq!(from("::ffff:10.0.0.6"), all[2..]);
    assert_eq!(from("255.255.255.255"), all[3..]);
    assert_eq!(from("::"), all[3..]);
    assert_eq!(from("2001:db8::2"), []);
}

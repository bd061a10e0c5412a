//! The listing walks (`index/walk.rs`) against the model: the best keys in
//! order, and every network's sum at several lengths, whole and in chunks.

use std::collections::{BTreeMap, HashMap};

use super::{ModelKey, PrefixTrie};

/// `top_keys` and `prefix_sums` inside `prefix`/`plen` against the model.
pub(super) fn check_walks<K: ModelKey>(
    t: &PrefixTrie<K>,
    model: &HashMap<K, u64>,
    prefix: K,
    plen: u8,
) {
    let inside: Vec<(K, u64)> = model
        .iter()
        .filter(|(k, _)| k.top(plen) == prefix.top(plen))
        .map(|(&k, &c)| (k, c))
        .collect();
    for (limit, threshold) in [(1, 0), (3, 0), (5, 2), (1000, 0), (1000, 255)] {
        let mut want = inside.clone();
        want.retain(|&(_, c)| c >= threshold.max(1));
        want.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        want.truncate(limit);
        assert_eq!(
            t.top_keys(prefix, plen, limit, threshold),
            want,
            "{prefix:?}/{plen} limit {limit}"
        );
    }
    for len in [plen, (plen + 3).min(K::BITS), K::HOT_LEN.max(plen), K::BITS] {
        let mut sums: BTreeMap<K, u64> = BTreeMap::new();
        for &(k, c) in &inside {
            *sums.entry(k.masked(len)).or_default() += c;
        }
        let want: Vec<(K, u64)> = sums.into_iter().collect();
        let from = prefix.masked(plen);
        assert_eq!(t.prefix_sums(prefix, plen, len, from, usize::MAX), want);
        // In chunks of two, each resuming after the last network listed.
        let mut got = Vec::new();
        let mut next = Some(from);
        while let Some(at) = next {
            let chunk = t.prefix_sums(prefix, plen, len, at, 2);
            next = match chunk.last() {
                Some(&(k, _)) if chunk.len() == 2 => k.filled(len).next_key(),
                _ => None,
            };
            got.extend(chunk);
        }
        assert_eq!(got, want, "{prefix:?}/{plen} at {len} in chunks");
    }
}

//! Sans-IO shard placement: keys to shards, shards to members, and the moves between two maps.
//!
//! Pure functions of their arguments: no IO, no clocks, no randomness, no process state. Every
//! node (and every version of Tidepool) computes the same answer from the same inputs, which is
//! why hashing is xxh3 with fixed seeds and never std's randomly keyed SipHash.
//!
//! Placement is bounded-load rendezvous hashing: each shard ranks all members by
//! [`score`] and goes to the best-ranked member that is still under the cap
//! `ceil(shards / members * (1 + eps))`. Shards are placed in id order, so the cap can push a
//! shard off its first choice and a membership change can move a few shards beyond those that
//! must move; the property tests in `placement_tests.rs` measure and bound that.

use crate::node_id::NodeId;
use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of [`shard_for_key`]: ASCII "tidepool". Changing it re-homes every key.
const KEY_SEED: u64 = 0x7469_6465_706f_6f6c;
/// Seed of [`score`]: ASCII "placemnt". Changing it re-places every shard.
const SCORE_SEED: u64 = 0x706c_6163_656d_6e74;

/// The shard (`0..shards`) that owns `key`.
///
/// Stable across processes, platforms and versions: `xxh3_64(key, seed 0x7469_6465_706f_6f6c)`
/// mapped onto `0..shards` by multiply-shift (`hash * shards >> 64`), which keeps the high bits
/// and has no modulo bias worth measuring. `shards == 0` is treated as 1 (everything in shard 0).
pub fn shard_for_key(key: &[u8], shards: u32) -> u32 {
    let hash = xxh3_64_with_seed(key, KEY_SEED);
    let shards = u128::from(shards.max(1));
    // hash * shards < 2^64 * shards, so the shifted value is < shards <= u32::MAX.
    ((u128::from(hash) * shards) >> 64) as u32
}

/// Rendezvous (highest-random-weight) score of `member` for `shard`: xxh3_64, seed
/// `0x706c_6163_656d_6e74`, over the shard id's 4 little-endian bytes followed by the name's
/// UTF-8 bytes. The id has a fixed width, so the concatenation is unambiguous.
pub fn score(shard: u32, member: &str) -> u64 {
    Scorer::new(member).score(shard)
}

/// [`score`] of one member for many shards: the hashed bytes are laid out once, and each score
/// is one one-shot xxh3 call (the same digest as streaming the two parts, several times faster;
/// placement computes `shards x members` of them).
struct Scorer {
    key: Vec<u8>,
}

impl Scorer {
    fn new(member: &str) -> Self {
        let mut key = Vec::with_capacity(4 + member.len());
        key.extend_from_slice(&[0; 4]);
        key.extend_from_slice(member.as_bytes());
        Scorer { key }
    }

    fn score(&mut self, shard: u32) -> u64 {
        self.key[..4].copy_from_slice(&shard.to_le_bytes());
        xxh3_64_with_seed(&self.key, SCORE_SEED)
    }
}

/// Why [`assign`] could not produce a map. Nothing is partially computed: the caller's previous
/// map, if any, is still the one to use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// `members` was empty: there is nobody to own the shards.
    #[error("no members to place shards on")]
    NoMembers,
    /// `shards` was 0; a cluster has at least one shard.
    #[error("shard count must be at least 1")]
    ZeroShards,
    /// A member name was the empty string.
    #[error("member name must not be empty")]
    EmptyMemberName,
    /// `eps` was negative, NaN or infinite; it must be finite and >= 0.
    #[error("load slack eps must be finite and >= 0, got {0}")]
    InvalidEps(f64),
}

/// The owner of every shard: `owners[s]` is the name of the member that owns shard `s`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardMap {
    owners: Vec<NodeId>,
}

impl ShardMap {
    /// A map from an explicit owner list (index = shard id), e.g. one read from the cluster map.
    pub fn from_owners(owners: Vec<NodeId>) -> Self {
        Self { owners }
    }

    /// The owner of `shard`, or `None` if the map has no such shard.
    pub fn owner(&self, shard: u32) -> Option<&str> {
        self.owners.get(shard as usize).map(NodeId::as_str)
    }

    /// Number of shards in the map.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether the map has no shards (only a default-constructed one).
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// `(shard, owner)` in shard-id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> + '_ {
        // assign() makes at most u32::MAX + 1 shards, so ids fit in u32.
        (0u32..).zip(self.owners.iter().map(NodeId::as_str))
    }

    /// Shards owned per member. Members owning nothing are absent.
    pub fn counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for owner in &self.owners {
            *counts.entry(owner.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// The owners, index = shard id.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }
}

/// One shard changing owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Move {
    /// The shard id.
    pub shard: u32,
    /// Owner in the old map.
    pub from: NodeId,
    /// Owner in the new map.
    pub to: NodeId,
}

/// The most shards one member may own: `ceil(shards / members * (1 + eps))`, and never less
/// than `ceil(shards / members)` so that every shard always fits.
///
/// f64 arithmetic is IEEE-exact and deterministic on every platform Rust supports (no implicit
/// fused multiply-add), so all nodes agree on the cap.
pub fn cap(shards: u32, members: usize, eps: f64) -> usize {
    let members = members.max(1);
    let shards = shards as usize;
    let even = shards.div_ceil(members);
    let slack = (shards as f64 / members as f64 * (1.0 + eps)).ceil();
    // `as` saturates, so a huge eps gives usize::MAX; never more than all shards are needed.
    (slack as usize).max(even).min(shards)
}

/// Bounded-load rendezvous placement of `shards` shards onto `members`.
///
/// Members are sorted and deduplicated first, so the result depends only on the set of names.
/// Shards are placed in id order; each goes to the member with the highest [`score`] among those
/// still under [`cap`]`(shards, members, eps)` (equal scores, vanishingly rare, go to the smaller
/// name). `eps = 0` gives perfectly even counts.
pub fn assign(shards: u32, members: &[NodeId], eps: f64) -> Result<ShardMap, PlacementError> {
    if shards == 0 {
        return Err(PlacementError::ZeroShards);
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(PlacementError::InvalidEps(eps));
    }
    let mut names: Vec<&str> = members.iter().map(NodeId::as_str).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(PlacementError::NoMembers);
    }
    if names.iter().any(|n| n.is_empty()) {
        return Err(PlacementError::EmptyMemberName);
    }

    let cap = cap(shards, names.len(), eps);
    let mut load = vec![0usize; names.len()];
    let mut scorers: Vec<Scorer> = names.iter().map(|n| Scorer::new(n)).collect();
    let mut owners = Vec::with_capacity(shards as usize);
    for shard in 0..shards {
        // Names are sorted and the comparison is strict, so ties go to the smaller name.
        let mut best: Option<(u64, usize)> = None;
        for (i, scorer) in scorers.iter_mut().enumerate() {
            if load[i] >= cap {
                continue;
            }
            let s = scorer.score(shard);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, i));
            }
        }
        // cap * members >= shards, so some member always has room; fall back defensively to the
        // least-loaded member rather than panicking.
        let i = match best {
            Some((_, i)) => i,
            None => least_loaded(&load),
        };
        load[i] += 1;
        owners.push(NodeId::from(names[i]));
    }
    Ok(ShardMap { owners })
}

/// The last [`assign`] result, reused while its inputs (shard count, member set, eps) stay the
/// same. Placement costs `shards x members` score computations, and the leader plans every tick
/// although the member set rarely changes: with the cache a tick costs `O(shards)`, and the full
/// computation runs only on a membership change (see section 8 of BENCHMARKS.md).
#[derive(Debug, Clone, Default)]
pub struct PlacementCache {
    last: Option<(u32, Vec<NodeId>, u64, ShardMap)>,
    computed: u64,
}

impl PlacementCache {
    /// [`assign`]`(shards, members, eps)`, computed again only when an input changed. `members`
    /// must be sorted and deduplicated (as a `BTreeMap`'s keys are) for a hit; any order is
    /// correct.
    pub fn assign(
        &mut self,
        shards: u32,
        members: &[NodeId],
        eps: f64,
    ) -> Result<&ShardMap, PlacementError> {
        if !self.holds(shards, members, eps) {
            let map = assign(shards, members, eps)?;
            self.computed += 1;
            self.last = Some((shards, members.to_vec(), eps.to_bits(), map));
        }
        match &self.last {
            Some((.., map)) => Ok(map),
            None => Err(PlacementError::NoMembers),
        }
    }

    /// How many times a placement was computed (not taken from the cache).
    pub fn computed(&self) -> u64 {
        self.computed
    }

    /// Whether the cached placement is the one for these inputs.
    pub fn holds(&self, shards: u32, members: &[NodeId], eps: f64) -> bool {
        matches!(&self.last, Some((s, m, e, _))
            if *s == shards && m.as_slice() == members && *e == eps.to_bits())
    }

    /// Takes `other`'s placement (one computed elsewhere, e.g. outside a lock), keeping this
    /// cache's count.
    pub fn take_from(&mut self, other: PlacementCache) {
        if other.last.is_some() {
            self.last = other.last;
            self.computed += other.computed;
        }
    }
}

fn least_loaded(load: &[usize]) -> usize {
    (0..load.len()).min_by_key(|&i| load[i]).unwrap_or(0)
}

/// The shards whose owner differs between `old` and `new`, in shard-id order.
///
/// Only shards present in both maps are compared; the shard count is fixed for the life of a
/// cluster, so two maps of one cluster always have the same length.
pub fn diff(old: &ShardMap, new: &ShardMap) -> Vec<Move> {
    old.iter()
        .zip(new.iter())
        .filter(|((_, from), (_, to))| from != to)
        .map(|((shard, from), (_, to))| Move {
            shard,
            from: NodeId::from(from),
            to: NodeId::from(to),
        })
        .collect()
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;

use super::*;

use crate::node_id::NodeId;
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64_with_seed;

fn names(list: &[&str]) -> Vec<NodeId> {
    list.iter().map(NodeId::from).collect()
}

fn assign_ok(shards: u32, members: &[NodeId], eps: f64) -> ShardMap {
    match assign(shards, members, eps) {
        Ok(map) => map,
        Err(e) => panic!("assign({shards}, {members:?}, {eps}) failed: {e}"),
    }
}

// ---- Table tests: fixed expected outputs, so that any change to hashing or placement (which
// would re-home every key or shard of a running cluster) is noticed. ----

#[test]
fn xxh3_library_matches_reference_vector() {
    // XXH3_64bits_withSeed("", 0) from the reference implementation.
    assert_eq!(xxh3_64_with_seed(b"", 0), 0x2d06_8005_38d3_94c2);
}

#[test]
fn shard_for_key_golden() {
    let table: [(&str, u32, u32, u32); 5] = [
        // key, shards=64, shards=1000, shards=65536
        ("", 62, 975, 63908),
        ("a", 18, 288, 18896),
        ("user:42", 10, 166, 10927),
        ("tidepool", 25, 400, 26220),
        ("the quick brown fox", 54, 854, 56019),
    ];
    for (key, s64, s1000, s65536) in table {
        let k = key.as_bytes();
        assert_eq!(shard_for_key(k, 64), s64, "{key:?}");
        assert_eq!(shard_for_key(k, 1000), s1000, "{key:?}");
        assert_eq!(shard_for_key(k, 65536), s65536, "{key:?}");
    }
}

#[test]
fn score_golden() {
    assert_eq!(score(0, "n1"), 0x400c_226e_81c6_b323);
    assert_eq!(score(1, "n1"), 0xe1dc_aab3_27b7_b90f);
    assert_eq!(score(0, "n2"), 0xe2e2_20e4_e7bb_392b);
    assert_eq!(score(63, "n3"), 0x806c_273d_58fc_3171);
    assert_eq!(score(65535, "node-a"), 0x4124_abf9_148e_1f26);
}

/// The documented recipe, so other implementations (clients in other languages) can match it.
#[test]
fn score_is_xxh3_of_le_shard_then_name() {
    for (shard, member) in [
        (0u32, "n1"),
        (7, ""),
        (u32::MAX, "a-long-member-name-0123456789"),
    ] {
        let bytes = [&shard.to_le_bytes()[..], member.as_bytes()].concat();
        assert_eq!(score(shard, member), xxh3_64_with_seed(&bytes, SCORE_SEED));
    }
}

#[test]
fn assign_golden() {
    let m = names(&["n1", "n2", "n3"]);
    let owners = |eps| assign_ok(12, &m, eps).owners().to_vec();
    let rendezvous = [
        "n3", "n1", "n2", "n1", "n3", "n1", "n3", "n3", "n2", "n2", "n2", "n3",
    ];
    // cap = ceil(12 / 3 * 1.25) = 5: n3 gets 5, nobody is pushed off its first choice.
    assert_eq!(owners(0.25), names(&rendezvous));
    // Pure rendezvous (the cap never binds).
    assert_eq!(owners(10.0), names(&rendezvous));
    // cap = 4: n3 is full after shard 7, so shard 11 falls to its second choice, n1.
    let mut even = rendezvous;
    even[11] = "n1";
    assert_eq!(owners(0.0), names(&even));
}

#[test]
fn cap_values() {
    assert_eq!(cap(64, 3, 0.25), 27); // ceil(21.33 * 1.25) = ceil(26.67)
    assert_eq!(cap(64, 4, 0.25), 20); // exact: 16 * 1.25
    assert_eq!(cap(64, 4, 0.0), 16);
    assert_eq!(cap(10, 4, 0.0), 3); // never below ceil(S / N)
    assert_eq!(cap(10, 1, 5.0), 10); // never above S
    assert_eq!(cap(3, 8, 0.25), 1);
    assert_eq!(cap(65536, 7, 0.25), 11703);
}

#[test]
fn errors() {
    let m = names(&["n1"]);
    assert_eq!(assign(0, &m, 0.25), Err(PlacementError::ZeroShards));
    assert_eq!(assign(4, &[], 0.25), Err(PlacementError::NoMembers));
    assert_eq!(
        assign(4, &names(&["n1", ""]), 0.25),
        Err(PlacementError::EmptyMemberName)
    );
    assert!(matches!(
        assign(4, &m, -0.1),
        Err(PlacementError::InvalidEps(_))
    ));
    assert!(matches!(
        assign(4, &m, f64::NAN),
        Err(PlacementError::InvalidEps(_))
    ));
    assert!(matches!(
        assign(4, &m, f64::INFINITY),
        Err(PlacementError::InvalidEps(_))
    ));
}

#[test]
fn single_member_owns_everything() {
    let map = assign_ok(64, &names(&["solo"]), 0.25);
    assert_eq!(map.len(), 64);
    assert!(map.iter().all(|(_, o)| o == "solo"));
    assert_eq!(map.counts().get("solo"), Some(&64));
    assert_eq!(map.owner(63), Some("solo"));
    assert_eq!(map.owner(64), None);
}

#[test]
fn duplicates_are_ignored() {
    let a = assign_ok(64, &names(&["n1", "n2", "n3"]), 0.25);
    let b = assign_ok(64, &names(&["n3", "n1", "n2", "n1", "n3"]), 0.25);
    assert_eq!(a, b);
}

#[test]
fn diff_lists_changed_shards_in_order() {
    let old = ShardMap::from_owners(names(&["a", "b", "c", "a"]));
    let new = ShardMap::from_owners(names(&["a", "c", "c", "b"]));
    let moves = diff(&old, &new);
    let expected = vec![
        Move {
            shard: 1,
            from: "b".into(),
            to: "c".into(),
        },
        Move {
            shard: 3,
            from: "a".into(),
            to: "b".into(),
        },
    ];
    assert_eq!(moves, expected);
    assert!(diff(&new, &new).is_empty());
}

#[test]
fn shard_for_key_edge_shard_counts() {
    for key in [&b""[..], b"x", b"\xff\xff\xff\xff"] {
        assert_eq!(shard_for_key(key, 1), 0);
        assert_eq!(shard_for_key(key, 0), 0, "0 shards is treated as 1");
        assert!(shard_for_key(key, u32::MAX) < u32::MAX);
    }
}

/// Pearson's chi-square over 64 shards with 100k keys. With 63 degrees of freedom the statistic
/// has mean 63 and standard deviation ~11; 130 is about 6 sigma, so only a broken mapping (or a
/// badly biased one) fails. The keys are fixed, so the test is deterministic.
#[test]
fn shard_for_key_is_roughly_uniform() {
    const SHARDS: u32 = 64;
    const KEYS: u32 = 100_000;
    for (kind, make) in [
        (
            "text",
            (|i: u32| format!("user:{i}").into_bytes()) as fn(u32) -> Vec<u8>,
        ),
        ("le-int", |i: u32| i.to_le_bytes().to_vec()),
    ] {
        let mut counts = [0u32; SHARDS as usize];
        for i in 0..KEYS {
            counts[shard_for_key(&make(i), SHARDS) as usize] += 1;
        }
        let expected = f64::from(KEYS) / f64::from(SHARDS);
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        assert!(
            chi2 < 130.0,
            "{kind}: chi-square {chi2:.1} over {SHARDS} shards: {counts:?}"
        );
    }
}

// ---- Property tests ----

/// 1..=16 distinct, non-empty member names of mixed shapes.
fn member_set() -> impl Strategy<Value = Vec<NodeId>> {
    proptest::collection::btree_set("[a-z][a-z0-9-]{0,11}", 1..=16)
        .prop_map(|set| set.into_iter().map(NodeId::from).collect())
}

fn eps_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), 0.01f64..=1.0, Just(0.25)]
}

/// Slack on top of the unavoidable moves in the join and leave tests. See `join_moves_bounded`.
fn cascade_slack(shards: u32) -> usize {
    (4.0 * f64::from(shards).sqrt()).ceil() as usize
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn deterministic_and_order_independent(
        shards in 1u32..=512,
        members in member_set(),
        eps in eps_strategy(),
        rotate in 0usize..16,
    ) {
        let a = assign_ok(shards, &members, eps);
        prop_assert_eq!(&a, &assign_ok(shards, &members, eps));
        let mut shuffled = members.clone();
        shuffled.reverse();
        let r = rotate % shuffled.len();
        shuffled.rotate_left(r);
        prop_assert_eq!(&a, &assign_ok(shards, &shuffled, eps));
    }

    #[test]
    fn every_shard_owned_by_a_member_and_under_cap(
        shards in 1u32..=1024,
        members in member_set(),
        eps in eps_strategy(),
    ) {
        let map = assign_ok(shards, &members, eps);
        prop_assert_eq!(map.len(), shards as usize);
        for (_, owner) in map.iter() {
            prop_assert!(members.iter().any(|m| m == owner), "owner {} not a member", owner);
        }
        let cap = cap(shards, members.len(), eps);
        let counts = map.counts();
        prop_assert_eq!(counts.values().sum::<usize>(), shards as usize);
        for (member, count) in &counts {
            prop_assert!(*count <= cap, "{} owns {} > cap {}", member, count, cap);
        }
    }

    /// Join of one member to N. Pure rendezvous would move exactly the shards whose top choice
    /// is the newcomer, about S/(N+1), and the newcomer can take at most the new cap,
    /// ceil(S/(N+1) * (1+eps)). Placing shards in id order under a cap adds cascades: the old
    /// members' caps shrink and their shards arrive in a different order, so some shards pushed
    /// off their first choice before now are not (or vice versa), moving between old members.
    ///
    /// Measured (release build, random name sets): the excess over the newcomer's cap grows like
    /// sqrt(S), following the per-member load fluctuation that makes the cap bind, not like S.
    /// - S <= 512, N <= 16, eps in [0, 1], 200k cases: worst 2.7 sqrt(S) (S = 17, N = 16,
    ///   eps = 0: the cap is 1-2 shards and every placement is a tight matching).
    /// - S <= 48, N <= 16, 2M cases: worst 2.7 sqrt(S) on join, 2.9 sqrt(S) on leave (S = 34).
    /// - eps >= 0.25 is far calmer: at most 0.6 sqrt(S) for S >= 64, and no extra moves at all
    ///   on a join for S >= 1024 with N <= 16. At eps = 0 the excess also grows with N (S = 4096, N = 64:
    ///   130 = 2.0 sqrt(S), 3% of S; S = 98, N = 32: 3.2 sqrt(S)); N > 16 is not tested here.
    /// A fraction-of-S slack does not fit both ends: S = 64, eps = 0.05 moved 14 extra (22% of
    /// S) while S = 4096, eps = 0.25 moved none extra. Hence `cascade_slack` = 4 sqrt(S), a
    /// 1.4x margin over the worst seen in this domain.
    #[test]
    fn join_moves_bounded(
        shards in 1u32..=512,
        members in member_set(),
        eps in eps_strategy(),
    ) {
        let newcomer = NodeId::from("zz-newcomer");
        prop_assume!(!members.contains(&newcomer));
        let n = members.len();
        let old = assign_ok(shards, &members, eps);
        let mut joined = members.clone();
        joined.push(newcomer.clone());
        let new = assign_ok(shards, &joined, eps);
        let moves = diff(&old, &new);

        let to_newcomer = moves.iter().filter(|m| m.to == newcomer).count();
        prop_assert_eq!(to_newcomer, new.counts().get(&newcomer).copied().unwrap_or(0));
        let unavoidable = (f64::from(shards) / (n + 1) as f64 * (1.0 + eps)).ceil() as usize;
        let bound = unavoidable + cascade_slack(shards);
        prop_assert!(
            moves.len() <= bound,
            "S={} N={} eps={}: moved {} > {} ({} to newcomer)",
            shards, n, eps, moves.len(), bound, to_newcomer
        );
    }

    /// Leave of one member. Every shard of the leaver must move; other shards move only through
    /// cap cascades (the survivors' caps grow and shards arrive in a different order). Measured
    /// as in `join_moves_bounded`, the other moves stay in the same sqrt(S) envelope: worst seen
    /// 2.9 sqrt(S) with N <= 17 (S = 34, eps = 0), 3.0 sqrt(S) with N = 33 (S = 98, eps = 0).
    #[test]
    fn leave_moves_bounded(
        shards in 1u32..=512,
        members in member_set(),
        eps in eps_strategy(),
        pick in any::<prop::sample::Index>(),
    ) {
        prop_assume!(members.len() >= 2);
        let leaver = members[pick.index(members.len())].clone();
        let rest: Vec<NodeId> = members.iter().filter(|m| **m != leaver).cloned().collect();
        let old = assign_ok(shards, &members, eps);
        let new = assign_ok(shards, &rest, eps);
        let moves = diff(&old, &new);

        let owned = old.counts().get(&leaver).copied().unwrap_or(0);
        let from_leaver = moves.iter().filter(|m| m.from == leaver).count();
        prop_assert_eq!(from_leaver, owned, "every shard of the leaver moves");
        prop_assert!(new.iter().all(|(_, o)| o != leaver));
        let others = moves.len() - from_leaver;
        prop_assert!(
            others <= cascade_slack(shards),
            "S={} N={} eps={}: {} other shards moved", shards, members.len(), eps, others
        );
    }

    /// When the cap cannot bind (1 + eps >= N, so cap = S), placement is pure rendezvous and has
    /// its minimal-disruption property exactly: a join moves shards only to the newcomer, and a
    /// leave moves only the leaver's shards.
    #[test]
    fn uncapped_is_minimally_disruptive(
        shards in 1u32..=512,
        members in member_set(),
    ) {
        let newcomer = NodeId::from("zz-newcomer");
        prop_assume!(!members.contains(&newcomer));
        let mut joined = members.clone();
        joined.push(newcomer.clone());
        let eps = joined.len() as f64;
        let old = assign_ok(shards, &members, eps);
        let new = assign_ok(shards, &joined, eps);
        for m in diff(&old, &new) {
            prop_assert_eq!(&m.to, &newcomer);
        }
        for m in diff(&new, &old) {
            prop_assert_eq!(&m.from, &newcomer);
        }
    }

    #[test]
    fn shard_for_key_in_range(key in proptest::collection::vec(any::<u8>(), 0..64), shards in 1u32..) {
        prop_assert!(shard_for_key(&key, shards) < shards);
    }

    #[test]
    fn diff_applied_to_old_gives_new(
        shards in 1u32..=256,
        a in member_set(),
        b in member_set(),
        eps in eps_strategy(),
    ) {
        let old = assign_ok(shards, &a, eps);
        let new = assign_ok(shards, &b, eps);
        let mut owners = old.owners().to_vec();
        for m in diff(&old, &new) {
            prop_assert_eq!(&owners[m.shard as usize], &m.from);
            owners[m.shard as usize] = m.to;
        }
        prop_assert_eq!(ShardMap::from_owners(owners), new);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The cache never changes an answer: a sequence of member sets (with repeats) gives what
    /// `assign` gives, and computes only when the inputs changed.
    #[test]
    fn the_cache_answers_as_assign_does(
        shards in 1u32..=128,
        sets in proptest::collection::vec(proptest::sample::select(vec![0usize, 1, 2]), 1..12),
        pool in proptest::collection::vec(member_set(), 3),
        eps in eps_strategy(),
    ) {
        // member_set() gives sorted, distinct names, as the leader's BTreeMap does.
        let sorted = pool;
        let mut cache = PlacementCache::default();
        let mut changes = 0;
        let mut last: Option<usize> = None;
        for &i in &sets {
            let got = cache.assign(shards, &sorted[i], eps).unwrap().clone();
            prop_assert_eq!(got, assign_ok(shards, &sorted[i], eps));
            if last.is_none_or(|l| sorted[l] != sorted[i]) {
                changes += 1;
            }
            last = Some(i);
        }
        prop_assert_eq!(cache.computed(), changes);
    }
}

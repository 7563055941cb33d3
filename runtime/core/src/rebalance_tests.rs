use super::*;

use crate::node_id::NodeId;
use proptest::prelude::*;

use MemberState::{Down, Draining, Joining, Up};

fn members(list: &[(&str, MemberState)]) -> BTreeMap<NodeId, MemberState> {
    list.iter().map(|(n, s)| (NodeId::from(*n), *s)).collect()
}

fn set(list: &[&str]) -> BTreeSet<NodeId> {
    list.iter().map(|n| NodeId::from(*n)).collect()
}

fn names(list: &[&str]) -> Vec<NodeId> {
    list.iter().map(|n| NodeId::from(*n)).collect()
}

fn target(shards: u32, eligible: &[NodeId], eps: f64) -> placement::ShardMap {
    match placement::assign(shards, eligible, eps) {
        Ok(m) => m,
        Err(e) => panic!("assign({shards}, {eligible:?}, {eps}): {e}"),
    }
}

/// Every shard owned as `placement::assign` says, at epoch 1, no handoffs.
fn placed(shards: u32, owners: &[NodeId], eps: f64) -> Vec<ShardAssignment> {
    target(shards, owners, eps)
        .iter()
        .map(|(_, o)| ShardAssignment {
            owner: Some(o.into()),
            epoch: 1,
            handoff_to: None,
        })
        .collect()
}

/// What the control plane does with a committed change.
fn apply(assignments: &mut [ShardAssignment], changes: &[Change]) {
    for c in changes {
        match c {
            Change::Reassign { shard, to, epoch } => {
                let a = &mut assignments[*shard as usize];
                assert_eq!(*epoch, a.epoch + 1);
                *a = ShardAssignment {
                    owner: Some(to.clone()),
                    epoch: *epoch,
                    handoff_to: None,
                };
            }
            Change::BeginHandoff { shard, to, epoch } => {
                let a = &mut assignments[*shard as usize];
                assert_eq!(*epoch, a.epoch);
                a.handoff_to = Some(to.clone());
            }
            Change::CancelHandoff {
                shard,
                owner,
                epoch,
            } => {
                let a = &mut assignments[*shard as usize];
                assert_eq!((Some(owner), *epoch), (a.owner.as_ref(), a.epoch + 1));
                *a = ShardAssignment {
                    owner: Some(owner.clone()),
                    epoch: *epoch,
                    handoff_to: None,
                };
            }
        }
    }
}

/// Every handoff in progress to an eligible member finishes: the target owns the shard at the
/// next epoch. (One to a gone member would not: its target never restores; plan retargets it.)
fn complete_handoffs(assignments: &mut [ShardAssignment], eligible: &[NodeId]) -> usize {
    let mut done = 0;
    for a in assignments.iter_mut() {
        if let Some(to) = a.handoff_to.take_if(|to| eligible.contains(to)) {
            a.owner = Some(to);
            a.epoch += 1;
            done += 1;
        }
    }
    done
}

/// Handoffs in progress (a "handoff" to the owner itself moves nothing and is not one).
fn in_flight(assignments: &[ShardAssignment]) -> usize {
    assignments
        .iter()
        .filter(|a| a.handoff_to.is_some() && a.handoff_to != a.owner)
        .count()
}

fn owned_by(assignments: &[ShardAssignment], name: &str) -> usize {
    assignments
        .iter()
        .filter(|a| a.owner.as_deref() == Some(name))
        .count()
}

fn eligible_of(members: &BTreeMap<NodeId, MemberState>, expired: &BTreeSet<NodeId>) -> Vec<NodeId> {
    members
        .iter()
        .filter(|(n, s)| matches!(s, Up | Joining) && !expired.contains(*n))
        .map(|(n, _)| n.clone())
        .collect()
}

/// Plan, apply, finish the handoffs, repeat until the plan is empty. Checks the pace and the
/// targets every round; returns (rounds, shards moved gracefully, moves per shard).
fn run_to_fixpoint(
    assignments: &mut [ShardAssignment],
    members: &BTreeMap<NodeId, MemberState>,
    expired: &BTreeSet<NodeId>,
    cfg: &RebalanceConfig,
) -> Result<(usize, usize, Vec<usize>), TestCaseError> {
    let eligible = eligible_of(members, expired);
    let mut moved = 0;
    let mut per_shard = vec![0usize; assignments.len()];
    for round in 0..10_000 {
        let before = in_flight(assignments);
        let changes = plan(assignments, members, expired, cfg);
        for c in &changes {
            if let Change::Reassign { to, .. } | Change::BeginHandoff { to, .. } = c {
                prop_assert!(
                    eligible.contains(to),
                    "round {}: target {} not eligible",
                    round,
                    to
                );
            }
        }
        apply(assignments, &changes);
        prop_assert!(
            in_flight(assignments) <= before.max(cfg.max_concurrent_handoffs),
            "round {}: pace",
            round
        );
        for (i, a) in assignments.iter().enumerate() {
            if a.handoff_to.is_some() {
                per_shard[i] += 1;
            }
        }
        let done = complete_handoffs(assignments, &eligible);
        moved += done;
        if changes.is_empty() && done == 0 {
            return Ok((round, moved, per_shard));
        }
    }
    Err(TestCaseError::fail("no fixpoint after 10000 rounds"))
}

// ---- Tables ----

#[test]
fn config_defaults_and_validation() {
    let c = RebalanceConfig::default();
    assert_eq!((c.max_concurrent_handoffs, c.eps), (4, 0.25));
    assert_eq!(c.validate(), Ok(()));
    let bad = RebalanceConfig {
        max_concurrent_handoffs: 0,
        ..c
    };
    assert_eq!(bad.validate(), Err(RebalanceError::ZeroConcurrency));
    for eps in [-0.1, f64::NAN, f64::INFINITY] {
        let bad = RebalanceConfig { eps, ..c };
        assert!(
            matches!(bad.validate(), Err(RebalanceError::InvalidEps(_))),
            "{eps}"
        );
        // plan refuses quietly rather than guessing.
        let m = members(&[("n1", Up)]);
        assert!(plan(&[ShardAssignment::default()], &m, &set(&[]), &bad).is_empty());
    }
}

#[test]
fn nothing_to_do_without_eligible_members_or_shards() {
    let cfg = RebalanceConfig::default();
    let unassigned = vec![ShardAssignment::default(); 8];
    assert!(plan(&unassigned, &BTreeMap::new(), &set(&[]), &cfg).is_empty());
    let m = members(&[("n1", Draining), ("n2", Down), ("n3", Up)]);
    assert!(plan(&unassigned, &m, &set(&["n3"]), &cfg).is_empty());
    assert!(plan(&[], &m, &set(&[]), &cfg).is_empty());
}

#[test]
fn first_assignment_is_the_crash_path_unpaced() {
    let cfg = RebalanceConfig::default();
    let m = members(&[("n1", Joining), ("n2", Joining), ("n3", Up)]);
    let unassigned = vec![ShardAssignment::default(); 16];
    let t = target(16, &names(&["n1", "n2", "n3"]), cfg.eps);
    let want: Vec<Change> = t
        .iter()
        .map(|(shard, o)| Change::Reassign {
            shard,
            to: o.into(),
            epoch: 1,
        })
        .collect();
    assert_eq!(plan(&unassigned, &m, &set(&[]), &cfg), want);
}

#[test]
fn crash_reassigns_all_dead_shards_at_once_and_nothing_else() {
    let cfg = RebalanceConfig::default();
    let all = names(&["n1", "n2", "n3", "n4"]);
    let mut before = placed(64, &all, cfg.eps);
    // Something unrelated is mid-handoff; it neither blocks nor joins the crash round.
    before[0].handoff_to = Some(
        if before[0].owner.as_deref() == Some("n1") {
            "n3"
        } else {
            "n1"
        }
        .into(),
    );
    let survivors = names(&["n1", "n3", "n4"]);
    let t = target(64, &survivors, cfg.eps);
    for (label, m, expired) in [
        (
            "marked down",
            members(&[("n1", Up), ("n2", Down), ("n3", Up), ("n4", Up)]),
            set(&["n2"]),
        ),
        (
            "lease lapsed, still up in the map",
            members(&[("n1", Up), ("n2", Up), ("n3", Up), ("n4", Up)]),
            set(&["n2"]),
        ),
        (
            "not a member any more",
            members(&[("n1", Up), ("n3", Up), ("n4", Up)]),
            set(&["n2"]),
        ),
    ] {
        let mut a = before.clone();
        let changes = plan(&a, &m, &expired, &cfg);
        let dead: Vec<u32> = (0u32..)
            .zip(&a)
            .filter(|(_, x)| x.owner.as_deref() == Some("n2"))
            .map(|(s, _)| s)
            .collect();
        assert!(
            dead.len() > cfg.max_concurrent_handoffs,
            "{label}: the test needs more dead shards than the pace"
        );
        let want: Vec<Change> = dead
            .iter()
            .map(|&s| Change::Reassign {
                shard: s,
                to: NodeId::from(t.owner(s).unwrap_or_default()),
                epoch: 2,
            })
            .collect();
        assert_eq!(changes, want, "{label}");
        apply(&mut a, &changes);
        assert_eq!(owned_by(&a, "n2"), 0, "{label}");
    }
}

#[test]
fn down_owner_whose_lease_may_be_valid_waits() {
    let cfg = RebalanceConfig::default();
    let all = names(&["n1", "n2", "n3"]);
    let a = placed(32, &all, cfg.eps);
    let m = members(&[("n1", Up), ("n2", Down), ("n3", Up)]);
    let changes = plan(&a, &m, &set(&[]), &cfg);
    for c in &changes {
        let s = change_shard(c) as usize;
        assert_ne!(
            a[s].owner.as_deref(),
            Some("n2"),
            "{c:?} moves a shard n2 may still serve"
        );
    }
    // Once the lease must have expired, they all go at once.
    let changes = plan(&a, &m, &set(&["n2"]), &cfg);
    assert_eq!(changes.len(), owned_by(&a, "n2"));
    assert!(changes.iter().all(|c| matches!(c, Change::Reassign { .. })));
}

#[test]
fn handoffs_to_a_gone_target_are_retargeted_or_cancelled() {
    let cfg = RebalanceConfig::default();
    let live = names(&["n1", "n3", "n4"]);
    let m = members(&[("n1", Up), ("n2", Down), ("n3", Up), ("n4", Up)]);
    let mut a = placed(16, &live, cfg.eps);
    // Shard 0 is already where it should be: its handoff to the dead n2 is cancelled.
    a[0].handoff_to = Some("n2".into());
    // Shard 1 is on the wrong member: its handoff is retargeted to the shard's target.
    let t1 = a[1].owner.clone().unwrap_or_default();
    let wrong = live.iter().find(|n| **n != t1).cloned().unwrap_or_default();
    a[1] = ShardAssignment {
        owner: Some(wrong),
        epoch: 3,
        handoff_to: Some("n2".into()),
    };
    let changes = plan(&a, &m, &set(&["n2"]), &cfg);
    assert_eq!(
        changes,
        vec![
            Change::CancelHandoff {
                shard: 0,
                owner: a[0].owner.clone().unwrap_or_default(),
                epoch: 2
            },
            Change::BeginHandoff {
                shard: 1,
                to: t1,
                epoch: 3
            },
        ]
    );
}

#[test]
fn join_is_paced() {
    let cfg = RebalanceConfig {
        max_concurrent_handoffs: 3,
        eps: 0.25,
    };
    let mut a = placed(64, &names(&["n1", "n2", "n3"]), cfg.eps);
    let m = members(&[("n1", Up), ("n2", Up), ("n3", Up), ("n4", Joining)]);
    let changes = plan(&a, &m, &set(&[]), &cfg);
    assert_eq!(changes.len(), 3);
    assert!(changes
        .iter()
        .all(|c| matches!(c, Change::BeginHandoff { .. })));
    apply(&mut a, &changes);
    // Nothing more until those finish.
    assert!(plan(&a, &m, &set(&[]), &cfg).is_empty());
    complete_handoffs(&mut a, &names(&["n1", "n2", "n3", "n4"]));
    assert_eq!(plan(&a, &m, &set(&[]), &cfg).len(), 3);
}

#[test]
fn drain_moves_everything_off() {
    let cfg = RebalanceConfig::default();
    let mut a = placed(64, &names(&["n1", "n2", "n3", "n4"]), cfg.eps);
    let m = members(&[("n1", Up), ("n2", Draining), ("n3", Up), ("n4", Up)]);
    let drained = owned_by(&a, "n2");
    let result = run_to_fixpoint(&mut a, &m, &set(&[]), &cfg);
    let (rounds, moved, _) = match result {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(owned_by(&a, "n2"), 0);
    assert!(a
        .iter()
        .all(|x| x.owner.as_deref().is_some_and(|o| o != "n2")));
    assert!(moved >= drained);
    // Draining shards go first: the first ceil(drained / 4) rounds move nothing else.
    assert!(rounds >= drained.div_ceil(cfg.max_concurrent_handoffs));
}

// ---- Properties ----

const POOL: [&str; 7] = ["n0", "n1", "n2", "n3", "n4", "n5", "ghost"];

fn state() -> impl Strategy<Value = Option<MemberState>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Joining)),
        3 => Just(Some(Up)),
        1 => Just(Some(Draining)),
        1 => Just(Some(Down)),
    ]
}

fn pool_name() -> impl Strategy<Value = Option<NodeId>> {
    prop_oneof![1 => Just(None), 6 => (0..POOL.len()).prop_map(|i| Some(NodeId::from(POOL[i])))]
}

/// Any cluster state, sane or not: members with any states, any expired set (members or not),
/// any owners and handoff targets (members or not), any epochs.
#[allow(clippy::type_complexity)]
fn cluster() -> impl Strategy<
    Value = (
        Vec<ShardAssignment>,
        BTreeMap<NodeId, MemberState>,
        BTreeSet<NodeId>,
        RebalanceConfig,
    ),
> {
    let assignment = (
        pool_name(),
        0u64..6,
        prop::option::weighted(0.2, pool_name()),
    )
        .prop_map(|(owner, epoch, h)| ShardAssignment {
            owner,
            epoch,
            handoff_to: h.flatten(),
        });
    (
        proptest::collection::vec(assignment, 1..64),
        proptest::collection::vec(state(), POOL.len() - 1),
        proptest::collection::vec(prop::bool::weighted(0.2), POOL.len()),
        1usize..8,
        prop_oneof![Just(0.0), Just(0.25), 0.0f64..2.0],
    )
        .prop_map(|(assignments, states, exp, max, eps)| {
            let members = POOL
                .iter()
                .zip(states)
                .filter_map(|(n, s)| s.map(|s| (NodeId::from(*n), s)))
                .collect();
            let expired = POOL
                .iter()
                .zip(exp)
                .filter(|(_, e)| *e)
                .map(|(n, _)| NodeId::from(*n))
                .collect();
            (
                assignments,
                members,
                expired,
                RebalanceConfig {
                    max_concurrent_handoffs: max,
                    eps,
                },
            )
        })
}

fn member_set(min: usize) -> impl Strategy<Value = Vec<NodeId>> {
    proptest::collection::btree_set("[a-z][a-z0-9]{0,7}", min..=12)
        .prop_map(|s| s.into_iter().map(NodeId::from).collect())
}

/// As in placement_tests.rs: slack for the cap cascades of bounded-load placement.
fn cascade_slack(shards: u32) -> usize {
    (4.0 * f64::from(shards).sqrt()).ceil() as usize
}

use crate::test_support::cases;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(512)))]

    /// Whatever the state: targets are eligible, at most one change per shard, in shard order,
    /// crash rounds contain only crash reassignments, the pace is kept (handoffs in progress
    /// never grow past the cap), nothing moves away from an owner that may still serve unless
    /// gracefully, and the plan is deterministic.
    #[test]
    fn plans_are_safe_and_paced((assignments, members, expired, cfg) in cluster()) {
        let changes = plan(&assignments, &members, &expired, &cfg);
        prop_assert_eq!(&changes, &plan(&assignments, &members, &expired, &cfg));
        let eligible = eligible_of(&members, &expired);
        let shards: Vec<u32> = changes.iter().map(change_shard).collect();
        prop_assert!(shards.windows(2).all(|w| w[0] < w[1]), "one change per shard, in order: {:?}", shards);
        let crash = changes.iter().any(|c| matches!(c, Change::Reassign { .. }));
        for c in &changes {
            let a = &assignments[change_shard(c) as usize];
            match c {
                Change::Reassign { to, epoch, .. } => {
                    prop_assert!(eligible.contains(to), "{:?}", c);
                    prop_assert_eq!(*epoch, a.epoch + 1);
                    // Only a missing owner or one whose lease must have expired.
                    prop_assert!(a.owner.as_ref().is_none_or(|o| expired.contains(o)), "{:?} {:?}", c, a);
                }
                Change::BeginHandoff { to, epoch, .. } => {
                    prop_assert!(!crash, "a crash round proposes only reassignments");
                    prop_assert!(eligible.contains(to), "{:?}", c);
                    prop_assert_eq!(*epoch, a.epoch);
                    let owner = a.owner.clone().unwrap_or_default();
                    prop_assert!(!expired.contains(&owner));
                    prop_assert!(matches!(members.get(&owner), Some(Up | Joining | Draining)), "{:?} {:?}", c, a);
                    prop_assert_ne!(Some(to), a.owner.as_ref());
                }
                Change::CancelHandoff { owner, epoch, .. } => {
                    prop_assert!(!crash);
                    prop_assert_eq!(Some(owner), a.owner.as_ref());
                    prop_assert!(eligible.contains(owner));
                    prop_assert_eq!(*epoch, a.epoch + 1);
                }
            }
        }
        let mut after = assignments.clone();
        apply(&mut after, &changes);
        let before = in_flight(&assignments);
        prop_assert!(
            in_flight(&after) <= before.max(cfg.max_concurrent_handoffs),
            "{} handoffs after, {} before, cap {}", in_flight(&after), before, cfg.max_concurrent_handoffs
        );
    }

    /// From any state, repeated plan + apply + finish reaches a fixpoint where every shard is
    /// owned by an eligible member (if any), each shard at its placement target, and no shard
    /// was owned by anything but an eligible member after a move.
    #[test]
    fn reaches_the_placement_fixpoint((mut assignments, members, expired, cfg) in cluster()) {
        let eligible = eligible_of(&members, &expired);
        // Shards held by Down/unknown owners whose lease has not expired wait forever here (the
        // lease would expire in reality); expire them so the loop can finish.
        let mut expired = expired;
        for a in &assignments {
            if let Some(o) = &a.owner {
                if !matches!(members.get(o), Some(Up | Joining | Draining)) {
                    expired.insert(o.clone());
                }
            }
        }
        run_to_fixpoint(&mut assignments, &members, &expired, &cfg)?;
        if eligible.is_empty() {
            return Ok(());
        }
        let t = target(assignments.len() as u32, &eligible, cfg.eps);
        for (shard, a) in (0u32..).zip(&assignments) {
            prop_assert_eq!(a.owner.as_deref(), t.owner(shard));
            prop_assert_eq!(&a.handoff_to, &None);
        }
    }

}

// Many rounds of placement each: fewer cases.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(128)))]

    /// Draining one member of N: it ends owning nothing, every shard is owned by an eligible
    /// member, and the pace holds every round.
    #[test]
    fn drain_reaches_zero(
        shards in 1u32..=256,
        all in member_set(2),
        pick in any::<prop::sample::Index>(),
        max in 1usize..8,
    ) {
        let cfg = RebalanceConfig { max_concurrent_handoffs: max, eps: 0.25 };
        let drained = all[pick.index(all.len())].clone();
        let mut a = placed(shards, &all, cfg.eps);
        let m: BTreeMap<NodeId, MemberState> = all
            .iter()
            .map(|n| (n.clone(), if *n == drained { Draining } else { Up }))
            .collect();
        let owned = owned_by(&a, &drained);
        let (_, moved, _) = run_to_fixpoint(&mut a, &m, &BTreeSet::new(), &cfg)?;
        prop_assert_eq!(owned_by(&a, &drained), 0);
        prop_assert!(a.iter().all(|x| x.owner.as_ref().is_some_and(|o| *o != drained && m[o] == Up)));
        // Beyond the drained member's shards, only placement's cap cascades move.
        prop_assert!(moved <= owned + cascade_slack(shards), "moved {} of which {} were drained", moved, owned);
    }

    /// A member joins N: about S/(N+1) shards move, each at most once, straight to its target,
    /// bounded like placement_tests.rs `join_moves_bounded`.
    #[test]
    fn join_moves_about_s_over_n(
        shards in 1u32..=256,
        all in member_set(1),
        max in 1usize..8,
    ) {
        let newcomer = NodeId::from("zz-new");
        prop_assume!(!all.contains(&newcomer));
        let cfg = RebalanceConfig { max_concurrent_handoffs: max, eps: 0.25 };
        let mut a = placed(shards, &all, cfg.eps);
        let old = placement::ShardMap::from_owners(a.iter().map(|x| x.owner.clone().unwrap_or_default()).collect());
        let mut m: BTreeMap<NodeId, MemberState> = all.iter().map(|n| (n.clone(), Up)).collect();
        m.insert(newcomer.clone(), Joining);
        let (_, moved, per_shard) = run_to_fixpoint(&mut a, &m, &BTreeSet::new(), &cfg)?;
        let mut joined = all.clone();
        joined.push(newcomer.clone());
        let new = target(shards, &joined, cfg.eps);
        prop_assert_eq!(moved, placement::diff(&old, &new).len());
        prop_assert!(per_shard.iter().all(|&n| n <= 1), "a shard moved twice");
        let unavoidable = (f64::from(shards) / (all.len() + 1) as f64 * (1.0 + cfg.eps)).ceil() as usize;
        prop_assert!(moved <= unavoidable + cascade_slack(shards), "moved {} > {} + slack", moved, unavoidable);
        prop_assert_eq!(owned_by(&a, &newcomer), new.counts().get(&newcomer).copied().unwrap_or(0));
    }
}

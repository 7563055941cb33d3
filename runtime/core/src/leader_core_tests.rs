//! The leader core's rules, one table each. The first three are bugs the simulation and the
//! chaos harness found in the leader's glue before this code was one copy: each row shows the
//! fixed behaviour where the old one broke invariant 1.

use super::*;
use crate::control::{Member, ShardAssignment};
use crate::node_id::NodeId;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn cfg() -> LeaseConfig {
    LeaseConfig::default() // ttl 2 s, margin 200 ms: expiry after 2.2 s without a grant
}

/// Members `n1..=nN` (all up), `shards` shards owned round-robin by `owners`.
fn map(members: &[(&str, MemberState)], owners: &[&str], shards: usize) -> ClusterMap {
    let mut m = ClusterMap::default();
    for (name, state) in members {
        m.members.insert(
            NodeId::from(*name),
            Member {
                name: name.into(),
                addr: String::new(),
                state: *state,
                voter: false,
            },
        );
    }
    m.shards = (0..shards)
        .map(|i| ShardAssignment {
            owner: Some(owners[i % owners.len()].into()),
            epoch: 1,
            handoff_to: None,
        })
        .collect();
    m
}

fn leader(base: Instant) -> LeaderCore {
    let mut c = LeaderCore::new("n1", cfg(), ms(300));
    assert!(c.leading(1, base));
    c
}

use MemberState::{Down, Joining, Up};

#[test]
fn grants_need_a_recent_quorum_confirmation_and_a_term() {
    let base = Instant::now();
    let mut c = LeaderCore::new("n1", cfg(), ms(300));
    c.confirmed(base);
    assert_eq!(c.grant("n2", base, 7), Err(Refusal::NotLeading));
    assert!(c.leading(3, base));
    assert!(!c.leading(3, base + ms(1)), "same term: same table");
    assert_eq!(c.grant("n2", base + ms(301), 7), Err(Refusal::Unconfirmed));
    let g = c.grant("n2", base + ms(300), 7).unwrap();
    assert_eq!((g.ttl, g.term, g.map_index), (ms(2000), 3, 7));
    assert!(c.not_leading());
    assert_eq!(c.grant("n2", base + ms(300), 7), Err(Refusal::NotLeading));
    assert!(!c.not_leading());
}

#[test]
fn a_new_leader_declares_nobody_expired_for_ttl_plus_margin() {
    let base = Instant::now();
    let mut c = leader(base);
    let m = map(&[("n1", Up), ("n2", Up)], &["n2"], 4);
    assert!(c.membership(&m, base + ms(2199), base).expired.is_empty());
    let d = c.membership(&m, base + ms(2201), base + ms(2201));
    assert!(d.expired.contains("n2"));
    // The leader never counts itself expired (it just confirmed that it leads), so never marks
    // itself down nor moves its own shards as if it had failed.
    assert_eq!(
        d.commands,
        vec![Command::SetMemberState {
            name: "n2".into(),
            state: Down
        }]
    );
}

/// Was `Fixes::forget_after_expiry` (found by the simulation): a member marked down that renewed
/// since must keep its grant until that grant must have expired; forgetting it at once made it
/// count as never granted, so expired, while it still served.
#[test]
fn a_down_member_is_forgotten_only_once_its_grant_must_have_expired() {
    let base = Instant::now();
    let mut c = leader(base);
    c.confirmed(base + ms(3000));
    c.grant("n2", base + ms(3000), 0).unwrap();
    let m = map(&[("n1", Up), ("n2", Down)], &["n2"], 2);
    for (t, forgotten, expired) in [
        (3001, false, false),
        (5199, false, false),
        (5201, true, true),
    ] {
        let d = c.membership(&m, base + ms(t), base + ms(t));
        assert_eq!(d.forgot.contains(&NodeId::from("n2")), forgotten, "at {t}");
        assert_eq!(d.expired.contains("n2"), expired, "at {t}");
    }
}

/// Was `Fixes::no_grant_while_expiring` (chaos F5 under loss): between finding a member expired
/// and the commit that moves its shards, it gets no grant; once nothing of it can move, it may.
#[test]
fn no_grant_to_an_expired_member_until_its_shards_moved() {
    let base = Instant::now();
    let mut c = leader(base);
    let at = base + ms(2300);
    c.confirmed(at);
    let owning = map(&[("n1", Up), ("n2", Up), ("n3", Up)], &["n2", "n3"], 4);
    c.grant("n3", at, 0).unwrap();
    let d = c.membership(&owning, at, at);
    assert!(d.expired.contains("n2"));
    assert!(d.commands.contains(&Command::SetMemberState {
        name: "n2".into(),
        state: Down
    }));
    assert_eq!(c.grant("n2", at, 5), Err(Refusal::Expiring));
    // The reassignment committed: n2 owns nothing now and may renew (and rejoin).
    let moved = map(&[("n1", Up), ("n2", Down), ("n3", Up)], &["n3"], 4);
    c.membership(&moved, at + ms(10), at + ms(10));
    assert!(c.grant("n2", at + ms(10), 9).is_ok());
    // Nobody could take its shards: refusing it would only leave them unserved.
    let mut alone = leader(base);
    alone.confirmed(at);
    let only = map(&[("n1", Down), ("n2", Up)], &["n2"], 2);
    alone.membership(&only, at, at);
    assert!(alone.grant("n2", at, 1).is_ok());
}

#[test]
fn joining_members_that_renew_are_promoted_and_revived_members_rejoin() {
    let base = Instant::now();
    let mut c = leader(base);
    let at = base + ms(100);
    c.confirmed(at);
    let m = map(&[("n1", Up), ("n2", Joining), ("n3", Down)], &["n1"], 2);
    // n3 is seen down first, then renews: a grant after the mark revives it.
    c.membership(&m, at, at);
    c.grant("n2", at + ms(1), 0).unwrap();
    c.grant("n3", at + ms(1), 0).unwrap();
    let d = c.membership(&m, at + ms(2), at + ms(2));
    assert_eq!(
        d.commands,
        vec![
            Command::SetMemberState {
                name: "n2".into(),
                state: Up
            },
            Command::SetMemberState {
                name: "n3".into(),
                state: Joining
            },
        ]
    );
    // The leader never marks itself down.
    let mut lone = leader(base);
    let d = lone.membership(
        &map(&[("n1", Up)], &["n1"], 1),
        base + ms(9000),
        base + ms(9000),
    );
    assert!(!d.expired.contains("n1") && d.commands.is_empty());
}

#[test]
fn rebalance_commands_are_guarded_by_epoch_and_labelled() {
    let mut m = map(&[("n1", Up), ("n2", Up)], &["n1"], 4);
    m.shards[3] = ShardAssignment::default();
    let expired = BTreeSet::from([NodeId::from("n1")]);
    let rcfg = RebalanceConfig {
        max_concurrent_handoffs: 4,
        eps: 0.25,
    };
    let cmds = rebalance_commands(&m, &expired, &rcfg);
    assert!(!cmds.is_empty());
    for (kind, cmd) in &cmds {
        let Command::Assign {
            shard,
            expect_epoch,
            owner,
            ..
        } = cmd
        else {
            panic!("{cmd:?}");
        };
        assert_eq!(*expect_epoch, m.shards[*shard as usize].epoch);
        let want = if *shard == 3 {
            MoveKind::Initial
        } else {
            MoveKind::Reassign
        };
        assert_eq!(*kind, want, "{cmd:?}");
        assert_eq!(owner.as_deref(), Some("n2"));
    }
}

/// Found by the starved rolling restart: the step found n4 expired while nobody could take its
/// shards (so it was not refused a grant), n4 renewed while the step's member commands were
/// being proposed, and a member that became eligible meanwhile got n4's shards by a failure-
/// driven move decided on the step's old expired set: n4 served them again next to the new
/// owner. The moves are decided again against the grants made since.
#[test]
fn a_member_that_renewed_during_the_step_keeps_its_shards() {
    let base = Instant::now();
    let mut c = leader(base);
    let at = base + ms(2300);
    c.confirmed(at);
    let rcfg = RebalanceConfig {
        max_concurrent_handoffs: 4,
        eps: 0.25,
    };
    // n4 owns everything; n1 (the leader) drains; nobody else is eligible.
    c.grant("n1", at, 0).unwrap();
    let alone = map(&[("n1", MemberState::Draining), ("n4", Up)], &["n4"], 4);
    let d = c.membership(&alone, at, at);
    assert!(d.expired.contains("n4"));
    // Nowhere to move its shards: it may renew, and does.
    let renewed = at + ms(50);
    c.grant("n4", renewed, 7).unwrap();
    c.grant("n3", renewed, 7).unwrap();
    // Meanwhile n3 joined: with the step's old expired set, n4's shards would be reassigned.
    let later = map(
        &[("n1", MemberState::Draining), ("n3", Up), ("n4", Up)],
        &["n4"],
        4,
    );
    assert!(rebalance_commands(&later, &d.expired, &rcfg)
        .iter()
        .any(|(k, _)| *k == MoveKind::Reassign));
    // Decided again now: n4 holds a fresh lease, so its shards move only by graceful handoff.
    c.place_inline(&later, renewed + ms(10), &rcfg);
    let moves = c.moves(&later, renewed + ms(10), &rcfg);
    assert!(!moves.is_empty());
    assert!(
        moves.iter().all(|(k, _)| *k == MoveKind::Handoff),
        "{moves:?}"
    );
    // And a member found expired by `moves` itself is refused until its shards moved.
    let much_later = renewed + ms(2300);
    c.confirmed(much_later);
    c.grant("n3", much_later, 9).unwrap();
    c.place_inline(&later, much_later, &rcfg);
    let moves = c.moves(&later, much_later, &rcfg);
    assert!(
        moves.iter().any(|(k, _)| *k == MoveKind::Reassign),
        "{moves:?}"
    );
    assert_eq!(c.grant("n4", much_later, 9), Err(Refusal::Expiring));
}

/// Found by the starved rolling restart: a starved leader's own grant aged past the expiry wait,
/// it reassigned its own shards as if it had failed, then granted itself a lease and served them
/// next to their new owner. The leader never moves its own shards but by graceful handoff.
#[test]
fn a_starved_leader_does_not_fail_over_its_own_shards() {
    let base = Instant::now();
    let mut c = leader(base);
    c.confirmed(base);
    c.grant("n1", base, 0).unwrap();
    let at = base + ms(5000);
    c.confirmed(at);
    c.grant("n2", at, 0).unwrap();
    let rcfg = RebalanceConfig {
        max_concurrent_handoffs: 4,
        eps: 0.25,
    };
    let m = map(&[("n1", Up), ("n2", Up)], &["n1"], 4);
    let d = c.membership(&m, at, at);
    assert!(!d.expired.contains("n1"), "{:?}", d.expired);
    c.place_inline(&m, at, &rcfg);
    let moves = c.moves(&m, at, &rcfg);
    assert!(
        moves.iter().all(|(k, _)| *k == MoveKind::Handoff),
        "{moves:?}"
    );
    assert!(c.grant("n1", at, 1).is_ok());
}

/// A placement computed outside the grant lock and offered gives the moves a fresh computation
/// gives, and `moves` computes nothing itself: without a current offer it makes no move (the
/// leader keeps confirming and granting while the placement computes); an outdated offer is
/// ignored, never used.
#[test]
fn a_placement_offered_from_outside_the_lock_is_used_only_when_current() {
    let base = Instant::now();
    let rcfg = RebalanceConfig {
        max_concurrent_handoffs: 8,
        eps: 0.25,
    };
    let m = map(
        &[("n1", Up), ("n2", Up), ("n3", Joining)],
        &["n1", "n2"],
        24,
    );
    let prepared = |c: &LeaderCore| {
        let (shards, eligible) = c.placement_needed(&m, base, &rcfg).expect("not cached yet");
        let mut cache = PlacementCache::default();
        cache.assign(shards, &eligible, rcfg.eps).unwrap();
        cache
    };
    let mut fresh = leader(base);
    assert!(
        fresh.moves(&m, base, &rcfg).is_empty(),
        "no move before the placement is offered"
    );
    assert_eq!(fresh.placements_computed(), 0, "and none computed inline");
    fresh.place_inline(&m, base, &rcfg);
    let expected = fresh.moves(&m, base, &rcfg);
    assert!(!expected.is_empty(), "n3 joined: shards move to it");

    let mut c = leader(base);
    let cache = prepared(&c);
    c.offer_placement(cache);
    assert_eq!(c.placement_needed(&m, base, &rcfg), None, "held now");
    let computed = c.placements_computed();
    assert_eq!(c.moves(&m, base, &rcfg), expected);
    assert_eq!(
        c.placements_computed(),
        computed,
        "moves computed nothing itself"
    );

    // An offer for another member set (n3 left meanwhile) is not used for this map.
    let mut c = leader(base);
    let other = map(&[("n1", Up), ("n2", Up)], &["n1", "n2"], 24);
    let (shards, eligible) = c.placement_needed(&other, base, &rcfg).unwrap();
    let mut stale = PlacementCache::default();
    stale.assign(shards, &eligible, rcfg.eps).unwrap();
    c.offer_placement(stale);
    assert!(
        c.moves(&m, base, &rcfg).is_empty(),
        "the stale offer is not used"
    );
    c.place_inline(&m, base, &rcfg);
    assert_eq!(c.moves(&m, base, &rcfg), expected);
}

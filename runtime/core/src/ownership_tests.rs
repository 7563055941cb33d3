//! The ownership core's own decisions: which map changes reach which machine, which restored
//! state is kept, what a reset feeds again, and which commit a finished handoff proposes. The
//! machines' rules are tested in `handoff_tests.rs`.

use crate::node_id::NodeId;
use std::time::Instant;

use super::*;
use crate::handoff::ShardRole;

fn map(owners: &[(&str, u64, Option<&str>)]) -> ClusterMap {
    ClusterMap {
        shards: owners
            .iter()
            .map(|(o, e, to)| ShardAssignment {
                owner: Some(o.into()),
                epoch: *e,
                handoff_to: to.map(NodeId::from),
            })
            .collect(),
        ..ClusterMap::default()
    }
}

fn restore(e: u64, attempt: u64) -> Effect {
    Effect::Restore { epoch: e, attempt }
}

#[test]
fn only_changed_assignments_reach_their_machines() {
    let now = Instant::now();
    let mut c: OwnershipCore<u32> = OwnershipCore::new("a", 2);
    assert!(c.on_lease(now, true).is_empty(), "no assignment yet");
    let first = c.on_map(now, &map(&[("a", 1, None), ("b", 1, None)]));
    assert_eq!(first.changed, vec![0], "shard 1 is not named here");
    assert_eq!(c.machines(), 1, "no machine for a shard never named here");
    assert_eq!(
        first.effects,
        vec![(0, Effect::StopAccepting), (0, restore(1, 1))]
    );
    // The same map again: nothing changed, nothing fed.
    let again = c.on_map(now, &map(&[("a", 1, None), ("b", 1, None)]));
    assert!(again.changed.is_empty() && again.effects.is_empty());
    // Only shard 1 moves.
    let moved = c.on_map(now, &map(&[("a", 1, None), ("a", 2, None)]));
    assert_eq!(moved.changed, vec![1]);
    assert_eq!(c.machines(), 2);
    assert_eq!(
        moved.effects,
        vec![(1, Effect::StopAccepting), (1, restore(2, 1))]
    );
    // The lease fed twice changes nothing the second time.
    assert!(c.on_lease(now, true).is_empty());
}

#[test]
fn only_the_awaited_restore_is_kept_and_served() {
    let now = Instant::now();
    let mut c: OwnershipCore<&str> = OwnershipCore::new("a", 1);
    c.on_lease(now, true);
    c.on_map(now, &map(&[("a", 1, None)]));
    // The lease lapses and comes back while restore 1 runs: restore 2 is the awaited one.
    c.on_lease(now, false);
    assert_eq!(c.on_lease(now, true), vec![(0, restore(1, 2))]);
    let (fx, kept) = c.on_restored(now, 0, 1, 1, "stale", 5);
    assert!(!kept && fx.is_empty(), "a superseded restore is dropped");
    assert!(c.take_restored(0, 1).is_none());
    let (fx, kept) = c.on_restored(now, 0, 1, 2, "fresh", 9);
    assert!(kept);
    assert_eq!(
        fx,
        vec![Effect::StartServing { epoch: 1 }, Effect::DeliverBuffered]
    );
    assert_eq!(c.restored_at(0, 1), Some((&"fresh", 8)));
    assert_eq!(c.restored_at(0, 2), None, "another epoch's checkpoint");
    assert_eq!(c.take_restored(0, 1), Some(("fresh", 9)));
    assert!(c.take_restored(0, 1).is_none(), "taken once");
    assert_eq!(
        c.machine(0).map(|m| m.role()),
        Some(&ShardRole::Serving { epoch: 1 })
    );
}

#[test]
fn a_reset_starts_the_shard_over_from_storage() {
    let now = Instant::now();
    let mut c: OwnershipCore<u8> = OwnershipCore::new("a", 1);
    c.on_lease(now, true);
    c.on_map(now, &map(&[("a", 3, None)]));
    c.on_restored(now, 0, 3, 1, 7, 4);
    // The log writer faulted: a fresh machine, told the lease and the assignment again.
    assert_eq!(c.reset(now, 0), vec![Effect::StopAccepting, restore(3, 1)]);
    assert!(
        c.take_restored(0, 3).is_none(),
        "the old restored state is gone"
    );
    // Without a lease, a reset learns the assignment and buffers until the lease is back.
    c.on_lease(now, false);
    assert_eq!(c.reset(now, 0), vec![Effect::StopAccepting]);
    assert_eq!(c.machine(0).map(|m| m.epoch()), Some(Some(3)));
}

#[test]
fn a_fenced_append_starts_the_shard_over_instead_of_parking_it() {
    let now = Instant::now();
    let mut c: OwnershipCore<u8> = OwnershipCore::new("a", 1);
    c.on_lease(now, true);
    c.on_map(now, &map(&[("a", 3, None)]));
    c.on_restored(now, 0, 3, 1, 7, 4);
    assert_eq!(
        c.machine(0).map(|m| m.role()),
        Some(&ShardRole::Serving { epoch: 3 })
    );
    // The log writer's append was refused as fenced (possibly by this node's own late write):
    // a fresh restore at the same epoch, not a park.
    assert_eq!(
        c.on_log_fault(now, 0),
        vec![Effect::StopAccepting, restore(3, 1)]
    );
    assert!(!matches!(
        c.machine(0).map(|m| m.role()),
        Some(ShardRole::Fenced { .. })
    ));
    // Only the restore's own fence parks it: a newer epoch really owns the log.
    c.feed(now, 0, Event::FencedByStorage { epoch: 3 });
    assert_eq!(
        c.machine(0).map(|m| m.role()),
        Some(&ShardRole::Fenced { epoch: 3 })
    );
}

#[test]
fn a_finished_handoff_proposes_the_target_the_map_names_now() {
    let now = Instant::now();
    let mut c: OwnershipCore<()> = OwnershipCore::new("a", 1);
    c.on_map(now, &map(&[("a", 4, None)]));
    assert_eq!(c.handoff_commit(0, 4), None, "no target, no commit");
    c.on_map(now, &map(&[("a", 4, Some("c"))]));
    assert_eq!(
        c.handoff_commit(0, 4),
        Some(Command::Assign {
            shard: 0,
            expect_epoch: 4,
            owner: Some("c".into()),
            epoch: 5,
            handoff_to: None,
        })
    );
}

proptest::proptest! {
    /// A machine made only when a shard is first named here decides what one machine per shard,
    /// fed every change (the core before machines were made on demand), decides, except the
    /// router's buffer/flush toggles for a shard no actor runs here (the router buffers only
    /// for a running actor, so they do nothing); and `on_shards` with the shards that changed
    /// decides what `on_map` decides.
    #[test]
    fn machines_on_demand_decide_as_one_per_shard(
        steps in proptest::collection::vec(
            (0u32..4, 0u8..4, 0u8..4, proptest::bool::ANY, proptest::bool::ANY),
            1..60,
        )
    ) {
        const SHARDS: u32 = 4;
        let names = ["a", "b", "c", "-"];
        let node = |i: u8| (names[i as usize] != "-").then(|| NodeId::from(names[i as usize]));
        let now = Instant::now();
        let mut sparse: OwnershipCore<()> = OwnershipCore::new("a", SHARDS);
        let mut delta: OwnershipCore<()> = OwnershipCore::new("a", SHARDS);
        let mut dense: Vec<ShardHandoff> =
            (0..SHARDS).map(|s| ShardHandoff::new("a", s)).collect();
        let mut dense_seen: Vec<Option<ShardAssignment>> = vec![None; SHARDS as usize];
        let mut dense_lease = false;
        // Shards an actor runs here (between StartServing/Resume and StopServing).
        let mut live = [false; SHARDS as usize];
        // The effects this node carries out, without toggles for shards no actor runs.
        let acted = |live: &mut [bool], fx: Vec<(u32, Effect)>| -> Vec<(u32, Effect)> {
            let mut out = Vec::new();
            for (s, e) in fx {
                match e {
                    Effect::StartServing { .. } | Effect::Resume { .. } => live[s as usize] = true,
                    Effect::StopServing { .. } => live[s as usize] = false,
                    Effect::StopAccepting | Effect::DeliverBuffered if !live[s as usize] => continue,
                    _ => {}
                }
                out.push((s, e));
            }
            out
        };
        let mut m = ClusterMap {
            shards: vec![ShardAssignment::default(); SHARDS as usize],
            ..ClusterMap::default()
        };
        for (shard, owner, to, lease, restored) in steps {
            // One commit: the shard's assignment changes (a new epoch).
            let a = &mut m.shards[shard as usize];
            a.epoch += 1;
            a.owner = node(owner);
            a.handoff_to = node(to).filter(|t| Some(t) != a.owner.as_ref());
            let mut want = Vec::new();
            for (s, a) in m.shards.iter().enumerate() {
                if dense_seen[s].as_ref() != Some(a) {
                    dense_seen[s] = Some(a.clone());
                    let fx = dense[s].handle(now, assigned(a));
                    want.extend(fx.into_iter().map(|e| (s as u32, e)));
                }
            }
            let (mut l1, mut l2) = (live, live);
            let want = acted(&mut live, want);
            let got = acted(&mut l1, sparse.on_map(now, &m).effects);
            let got_delta = acted(&mut l2, delta.on_shards(now, &m, [shard]).effects);
            proptest::prop_assert_eq!(&got, &want);
            proptest::prop_assert_eq!(&got_delta, &want);
            // The lease as fed now.
            let mut want = Vec::new();
            if lease != dense_lease {
                dense_lease = lease;
                let ev = if lease { Event::LeaseRegained } else { Event::LeaseLost };
                for (s, mach) in dense.iter_mut().enumerate() {
                    let fx = mach.handle(now, ev.clone());
                    want.extend(fx.into_iter().map(|e| (s as u32, e)));
                }
            }
            let (mut l1, mut l2) = (live, live);
            let want = acted(&mut live, want);
            proptest::prop_assert_eq!(&acted(&mut l1, sparse.on_lease(now, lease)), &want);
            proptest::prop_assert_eq!(&acted(&mut l2, delta.on_lease(now, lease)), &want);
            // Every awaited restore (and fence check) finishes.
            if restored {
                for s in 0..SHARDS {
                    let Some((epoch, attempt)) = dense[s as usize].awaiting_restore() else {
                        continue;
                    };
                    let ev = Event::Restored { epoch, seq: 0, attempt };
                    let want: Vec<(u32, Effect)> =
                        dense[s as usize].handle(now, ev).into_iter().map(|e| (s, e)).collect();
                    let (mut l1, mut l2) = (live, live);
                    let want = acted(&mut live, want);
                    let fx = |c: &mut OwnershipCore<()>| -> Vec<(u32, Effect)> {
                        c.on_restored(now, s, epoch, attempt, (), 1).0.into_iter().map(|e| (s, e)).collect()
                    };
                    proptest::prop_assert_eq!(&acted(&mut l1, fx(&mut sparse)), &want);
                    proptest::prop_assert_eq!(&acted(&mut l2, fx(&mut delta)), &want);
                }
            }
        }
    }
}

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
    assert_eq!(first.changed, vec![0, 1]);
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

//! Sans-IO ownership core: one node's decisions about every shard it might own, as the node's
//! ownership driver (`actors/src/driver.rs`) and the deterministic simulation both run them.
//!
//! It holds one [`ShardHandoff`] machine per shard, the last assignment each machine was told
//! about, the lease as the node last saw it, and the restored state of the one restore each
//! machine waits for. Inputs are the replicated map, the lease, and the results of effects;
//! outputs are the machines' [`Effect`]s, per shard, in order. The caller carries them out
//! (storage, actors, the router, the control plane) with the help of the accessors here:
//! which restored state a new actor starts from, which state a never-served shard checkpoints,
//! which commit a finished handoff proposes. Retry delays (jittered) and timeouts stay with the
//! caller: this crate has no clock and no randomness.
//!
//! `S` is the restored shard state (the node's `ShardState`, or the simulation's model of it).

use crate::node_id::NodeId;
use std::collections::BTreeMap;
use std::time::Instant;

use crate::control::{ClusterMap, Command, ShardAssignment};
use crate::handoff::{Effect, Event, ShardHandoff};

/// A restore's result, kept for the attempt the shard's machine waits for.
#[derive(Debug, Clone)]
struct Kept<S> {
    epoch: u64,
    state: S,
    next_seq: u64,
}

/// Effects to carry out, each for its shard, in order.
pub type ShardEffects = Vec<(u32, Effect)>;

/// What a new map changed: the effects, and the shards whose assignment changed (a failing
/// step of theirs starts its retry delays over).
#[derive(Debug, Default)]
pub struct MapChange {
    /// Effects to carry out, in order.
    pub effects: ShardEffects,
    /// Shards whose assignment differs from the one seen before.
    pub changed: Vec<u32>,
}

/// Every shard's ownership as one node sees it (invariants 1, 3 and 4; see [`crate::handoff`]).
#[derive(Debug, Clone)]
pub struct OwnershipCore<S> {
    me: NodeId,
    machines: Vec<ShardHandoff>,
    seen: Vec<Option<ShardAssignment>>,
    kept: BTreeMap<u32, Kept<S>>,
    lease_valid: bool,
}

impl<S> OwnershipCore<S> {
    /// The core of the node called `me`, for `shards` shards: no assignment, no lease.
    pub fn new(me: impl Into<NodeId>, shards: u32) -> Self {
        let me = me.into();
        Self {
            machines: (0..shards)
                .map(|s| ShardHandoff::new(me.clone(), s))
                .collect(),
            seen: vec![None; shards as usize],
            kept: BTreeMap::new(),
            lease_valid: false,
            me,
        }
    }

    /// The node this core runs on.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// One shard's machine (its role, its epoch), for metrics and checkers.
    pub fn machine(&self, shard: u32) -> Option<&ShardHandoff> {
        self.machines.get(shard as usize)
    }

    /// The lease as last fed by [`on_lease`](Self::on_lease).
    pub fn lease_valid(&self) -> bool {
        self.lease_valid
    }

    /// The assignment of `shard` last fed to its machine.
    pub fn seen(&self, shard: u32) -> Option<&ShardAssignment> {
        self.seen.get(shard as usize).and_then(Option::as_ref)
    }

    /// Feeds every assignment that changed since the last map to its shard's machine. The caller
    /// passes maps in commit order (the handoff machine's contract).
    pub fn on_map(&mut self, now: Instant, map: &ClusterMap) -> MapChange {
        let mut out = MapChange::default();
        for (s, a) in map.shards.iter().enumerate() {
            let shard = s as u32;
            match self.seen.get_mut(s) {
                Some(slot) if slot.as_ref() != Some(a) => *slot = Some(a.clone()),
                _ => continue,
            }
            out.changed.push(shard);
            let fx = self.feed(now, shard, assigned(a));
            out.effects.extend(fx.into_iter().map(|e| (shard, e)));
        }
        out
    }

    /// The lease as the node's own clock sees it now. A change goes to every machine (a lapse
    /// suspends or stops every shard served here, a regain brings them back).
    pub fn on_lease(&mut self, now: Instant, valid: bool) -> ShardEffects {
        if valid == self.lease_valid {
            return Vec::new();
        }
        self.lease_valid = valid;
        let ev = if valid {
            Event::LeaseRegained
        } else {
            Event::LeaseLost
        };
        let mut out = Vec::new();
        for shard in 0..self.machines.len() as u32 {
            let fx = self.feed(now, shard, ev.clone());
            out.extend(fx.into_iter().map(|e| (shard, e)));
        }
        out
    }

    /// Feeds one event to a shard's machine; returns its effects.
    pub fn feed(&mut self, now: Instant, shard: u32, ev: Event) -> Vec<Effect> {
        match self.machines.get_mut(shard as usize) {
            Some(m) => m.handle(now, ev),
            None => Vec::new(),
        }
    }

    /// Restore `attempt` of `shard` at `epoch` produced `state` (the log continues at
    /// `next_seq`). The state is kept only if it is the restore the machine waits for: an
    /// earlier attempt at the same epoch, finishing late, read the log before writes
    /// acknowledged since. Returns the machine's effects and whether the state was kept.
    pub fn on_restored(
        &mut self,
        now: Instant,
        shard: u32,
        epoch: u64,
        attempt: u64,
        state: S,
        next_seq: u64,
    ) -> (Vec<Effect>, bool) {
        let awaited = self
            .machines
            .get(shard as usize)
            .and_then(ShardHandoff::awaiting_restore);
        let keep = awaited == Some((epoch, attempt));
        if keep {
            self.kept.insert(
                shard,
                Kept {
                    epoch,
                    state,
                    next_seq,
                },
            );
        }
        let seq = next_seq.saturating_sub(1);
        let ev = Event::Restored {
            epoch,
            seq,
            attempt,
        };
        (self.feed(now, shard, ev), keep)
    }

    /// Starts `shard` over from the current assignment (its actor failed, or its log writer
    /// faulted): a new machine, no restored state, then the lease and the assignment fed again,
    /// so its state is rebuilt from storage. The caller stops the shard's actor first.
    pub fn reset(&mut self, now: Instant, shard: u32) -> Vec<Effect> {
        let Some(m) = self.machines.get_mut(shard as usize) else {
            return Vec::new();
        };
        *m = ShardHandoff::new(self.me.clone(), shard);
        self.kept.remove(&shard);
        let mut fx = Vec::new();
        if self.lease_valid {
            fx.extend(self.feed(now, shard, Event::LeaseRegained));
        }
        if let Some(a) = self.seen(shard).cloned() {
            fx.extend(self.feed(now, shard, assigned(&a)));
        }
        fx
    }

    /// For [`Effect::StartServing`] at `epoch`: takes the kept restored state and the seq its
    /// log continues at. `None` if nothing was kept, or it was kept for another epoch (then it
    /// is dropped: serving needs a restore at the epoch served).
    pub fn take_restored(&mut self, shard: u32, epoch: u64) -> Option<(S, u64)> {
        let k = self.kept.remove(&shard)?;
        (k.epoch == epoch).then_some((k.state, k.next_seq))
    }

    /// For [`Effect::WriteCheckpoint`] at `epoch` when no actor runs the shard (it was restored
    /// here, then handed on before it served): the restored state and the log position it
    /// covers, which is what the checkpoint must hold.
    pub fn restored_at(&self, shard: u32, epoch: u64) -> Option<(&S, u64)> {
        self.kept
            .get(&shard)
            .filter(|k| k.epoch == epoch)
            .map(|k| (&k.state, k.next_seq.saturating_sub(1)))
    }

    /// For [`Effect::ReportHandoffDone`] at `epoch`: the commit that hands the shard to the
    /// target the map names now, checked against `epoch` (a stale report then fails the
    /// compare-and-set). `None` when the map names no target.
    pub fn handoff_commit(&self, shard: u32, epoch: u64) -> Option<Command> {
        let to = self.seen(shard)?.handoff_to.clone()?;
        Some(Command::Assign {
            shard,
            expect_epoch: epoch,
            owner: Some(to),
            epoch: epoch + 1,
            handoff_to: None,
        })
    }
}

/// The machine's event for an assignment from the map.
pub fn assigned(a: &ShardAssignment) -> Event {
    Event::Assigned {
        epoch: a.epoch,
        owner: a.owner.clone(),
        handoff_to: a.handoff_to.clone(),
    }
}

#[cfg(test)]
#[path = "ownership_tests.rs"]
mod tests;

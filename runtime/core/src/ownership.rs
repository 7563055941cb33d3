//! Sans-IO ownership core: one node's decisions about every shard it might own, as the node's
//! ownership driver (`actors/src/driver.rs`) and the deterministic simulation both run them.
//!
//! It holds one [`ShardHandoff`] machine per shard this node has been named for (owner or
//! handoff target; a shard never named here has no machine: its assignments cannot concern
//! this node, so memory grows with the shards a node serves, not with the cluster), the last
//! assignment each machine was told about, the lease as the node last saw it, and the restored state of the one restore each
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
    shards: u32,
    machines: BTreeMap<u32, ShardHandoff>,
    seen: BTreeMap<u32, ShardAssignment>,
    kept: BTreeMap<u32, Kept<S>>,
    lease_valid: bool,
}

impl<S> OwnershipCore<S> {
    /// The core of the node called `me`, for `shards` shards: no assignment, no lease.
    pub fn new(me: impl Into<NodeId>, shards: u32) -> Self {
        Self {
            me: me.into(),
            shards,
            machines: BTreeMap::new(),
            seen: BTreeMap::new(),
            kept: BTreeMap::new(),
            lease_valid: false,
        }
    }

    /// The node this core runs on.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// One shard's machine (its role, its epoch), for metrics and checkers; `None` for a shard
    /// never named here.
    pub fn machine(&self, shard: u32) -> Option<&ShardHandoff> {
        self.machines.get(&shard)
    }

    /// How many shards have a machine here (were ever named here).
    pub fn machines(&self) -> usize {
        self.machines.len()
    }

    /// The lease as last fed by [`on_lease`](Self::on_lease).
    pub fn lease_valid(&self) -> bool {
        self.lease_valid
    }

    /// The assignment of `shard` last fed to its machine.
    pub fn seen(&self, shard: u32) -> Option<&ShardAssignment> {
        self.seen.get(&shard)
    }

    /// Feeds every assignment that changed since the last map to its shard's machine. The caller
    /// passes maps in commit order (the handoff machine's contract).
    pub fn on_map(&mut self, now: Instant, map: &ClusterMap) -> MapChange {
        self.on_shards(now, map, 0..map.shards.len() as u32)
    }

    /// [`on_map`](Self::on_map) for the listed shards only: a caller that knows which shards
    /// the commits since its last map touched (every other assignment is as it was) skips the
    /// scan of the whole map. The result is the same as `on_map`'s.
    pub fn on_shards(
        &mut self,
        now: Instant,
        map: &ClusterMap,
        shards: impl IntoIterator<Item = u32>,
    ) -> MapChange {
        let mut out = MapChange::default();
        for shard in shards {
            let Some(a) = map.shards.get(shard as usize) else {
                continue;
            };
            if shard >= self.shards || self.seen.get(&shard) == Some(a) {
                continue;
            }
            if !self.machines.contains_key(&shard) {
                let named = |n: &Option<NodeId>| n.as_deref() == Some(self.me.as_str());
                if !named(&a.owner) && !named(&a.handoff_to) {
                    continue;
                }
                let mut m = ShardHandoff::new(self.me.clone(), shard);
                if self.lease_valid {
                    // An idle machine has nothing to do on a lease change: no effects.
                    let _ = m.handle(now, Event::LeaseRegained);
                }
                self.machines.insert(shard, m);
            }
            self.seen.insert(shard, a.clone());
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
        for (&shard, m) in self.machines.iter_mut() {
            let fx = m.handle(now, ev.clone());
            out.extend(fx.into_iter().map(|e| (shard, e)));
        }
        out
    }

    /// Feeds one event to a shard's machine; returns its effects.
    pub fn feed(&mut self, now: Instant, shard: u32, ev: Event) -> Vec<Effect> {
        match self.machines.get_mut(&shard) {
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
            .get(&shard)
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
        let Some(m) = self.machines.get_mut(&shard) else {
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

    /// The shard's log writer faulted: an append failed, or storage refused it as fenced. Either
    /// way the shard starts over ([`reset`](Self::reset)): a refusal as fenced may come from a
    /// late write of this node's own epoch (an earlier actor or process whose storage call
    /// landed after the new writer began), not from a newer owner, so it is not taken as
    /// [`Event::FencedByStorage`] (which would park a live owner for good); the fresh restore's
    /// own fence reports that if a newer epoch really owns the log. (Found by the deterministic
    /// simulation; its `reset-when-fenced` variant feeds the fence instead, from outside.)
    pub fn on_log_fault(&mut self, now: Instant, shard: u32) -> Vec<Effect> {
        self.reset(now, shard)
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

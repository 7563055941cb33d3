//! Sans-IO rebalancing policy of the control-plane leader: from the cluster map and the set of
//! nodes whose lease must have expired, the next shard changes to propose (ARCHITECTURE.md,
//! invariant 1 "one owner"; invariant 7 applies to the pace of movement).
//!
//! [`plan`] is a pure function: same inputs, same changes, in shard-id order. The leader runs it
//! on every map change and lease tick, proposes the changes (each a compare-and-set on the shard's
//! current epoch, so a plan computed from a stale map cannot apply), and runs it again on the new
//! map; repeating this reaches a fixpoint where every shard is owned by its placement target.
//!
//! - The **target** of shard `s` is [`placement::assign`] over the *eligible* members: `Up` or
//!   `Joining`, and not in `expired`. `Draining` and `Down` members are never targets.
//! - **Crash path** (availability first, not paced): a shard with no owner, or whose owner's lease
//!   must have expired, is reassigned straight to its target at `epoch + 1`; the new owner
//!   restores from storage. A round with any crash reassignment proposes nothing else.
//! - **Graceful path** (paced): a shard whose owner is alive but `Draining`, or is not the target,
//!   is handed off to its target. At most [`RebalanceConfig::max_concurrent_handoffs`] shards
//!   have a handoff in progress at once, counting those already in progress; draining owners'
//!   shards go first.
//! - A handoff whose target is no longer eligible is retargeted to the shard's current target,
//!   or cancelled when the current target is the owner itself. Cancelling re-assigns the owner at
//!   `epoch + 1`: a handoff cannot be withdrawn at its own epoch (see [`crate::handoff`]).
//! - An owner that is `Down`, or not a member, but whose lease has not yet expired may still be
//!   serving: its shards wait for the expiry (invariant 1) rather than move.

use crate::node_id::NodeId;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::placement;

/// Why a [`RebalanceConfig`] was refused. Nothing was applied: the leader keeps its previous
/// configuration (or refuses to start).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RebalanceError {
    /// `max_concurrent_handoffs` was 0: graceful moves, and so drains, could never progress.
    #[error("max_concurrent_handoffs must be at least 1")]
    ZeroConcurrency,
    /// `eps` was negative, NaN or infinite ([`placement::assign`] needs it finite and >= 0).
    #[error("placement eps must be finite and >= 0, got {0}")]
    InvalidEps(f64),
}

/// Rebalancing policy knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebalanceConfig {
    /// The most shards with a graceful handoff in progress at once. Default 4. Each handoff
    /// pauses its shard for a drain plus a checkpoint; more at once finishes a drain sooner but
    /// pauses more of the keyspace and loads storage harder.
    pub max_concurrent_handoffs: usize,
    /// Load slack of [`placement::assign`]: no member owns more than
    /// `ceil(shards / members * (1 + eps))`. Default 0.25 (the node config's
    /// `cluster.placement_eps` default).
    pub eps: f64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            max_concurrent_handoffs: 4,
            eps: 0.25,
        }
    }
}

impl RebalanceConfig {
    /// Checks that drains can progress and that placement accepts `eps`.
    pub fn validate(&self) -> Result<(), RebalanceError> {
        if self.max_concurrent_handoffs == 0 {
            return Err(RebalanceError::ZeroConcurrency);
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(RebalanceError::InvalidEps(self.eps));
        }
        Ok(())
    }
}

// The policy works on the control plane's own types (one definition of a shard assignment and of
// a member's lifecycle state).
pub use crate::control::{MemberState, ShardAssignment};

/// One change for the leader to propose. `epoch` is always the epoch the change writes; the
/// compare-and-set expects the shard's epoch in the map the plan was computed from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    /// The owner is missing or its lease must have expired: assign the shard directly to `to` at
    /// `epoch` (= current + 1). The crash path: `to` restores from storage (invariant 1).
    Reassign {
        /// The shard id.
        shard: u32,
        /// The new owner (the shard's placement target).
        to: NodeId,
        /// The new epoch, current + 1.
        epoch: u64,
    },
    /// Begin (or retarget) a graceful handoff from the current, alive owner to `to`: set
    /// `handoff_to = to` at the unchanged `epoch`.
    BeginHandoff {
        /// The shard id.
        shard: u32,
        /// The member taking over (the shard's placement target).
        to: NodeId,
        /// The shard's current epoch, unchanged.
        epoch: u64,
    },
    /// Cancel a handoff whose target is gone and whose owner is again the target: re-assign
    /// `owner` at `epoch` (= current + 1) with no handoff. The epoch bump makes any handoff
    /// report of the old epoch fail its compare-and-set.
    CancelHandoff {
        /// The shard id.
        shard: u32,
        /// The current owner, who keeps the shard.
        owner: NodeId,
        /// The new epoch, current + 1.
        epoch: u64,
    },
}

/// The next changes the leader should propose, at most one per shard, in shard-id order: the
/// crash reassignments alone if there are any; otherwise retargets and cancels of handoffs in
/// progress, plus as many new handoffs as the pace allows (draining owners' shards first).
///
/// `expired` holds the nodes whose lease must have expired
/// ([`crate::lease::LeaseTable::expired_nodes`] over every member and every owner). Returns no
/// changes when nothing needs to move, when no member is eligible, or when `cfg.eps` is invalid
/// (see [`RebalanceConfig::validate`]).
pub fn plan(
    assignments: &[ShardAssignment],
    members: &BTreeMap<NodeId, MemberState>,
    expired: &BTreeSet<NodeId>,
    cfg: &RebalanceConfig,
) -> Vec<Change> {
    plan_cached(
        assignments,
        members,
        expired,
        cfg,
        &mut placement::PlacementCache::default(),
    )
}

/// The members shards may be placed on: up or joining, and not expired; sorted by name.
pub fn eligible(
    members: &BTreeMap<NodeId, MemberState>,
    expired: &BTreeSet<NodeId>,
) -> Vec<NodeId> {
    members
        .iter()
        .filter(|(name, state)| {
            matches!(state, MemberState::Up | MemberState::Joining) && !expired.contains(*name)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// [`plan`], with the placement taken from `cache` while the eligible members stay the same
/// (the leader's per-tick call).
pub fn plan_cached(
    assignments: &[ShardAssignment],
    members: &BTreeMap<NodeId, MemberState>,
    expired: &BTreeSet<NodeId>,
    cfg: &RebalanceConfig,
    cache: &mut placement::PlacementCache,
) -> Vec<Change> {
    let eligible = eligible(members, expired);
    let Ok(shards) = u32::try_from(assignments.len()) else {
        return Vec::new();
    };
    if shards == 0 || eligible.is_empty() {
        return Vec::new();
    }
    let Ok(target) = cache.assign(shards, &eligible, cfg.eps) else {
        return Vec::new();
    };
    let view = View {
        live: members
            .iter()
            .filter(|(name, state)| **state != MemberState::Down && !expired.contains(*name))
            .map(|(name, state)| (name.as_str(), *state))
            .collect(),
        expired,
        eligible: &eligible,
        target,
    };

    let crash: Vec<Change> = (0..shards)
        .zip(assignments)
        .filter_map(|(shard, a)| view.crash_change(shard, a))
        .collect();
    if !crash.is_empty() {
        return crash;
    }
    view.graceful_changes(assignments, cfg.max_concurrent_handoffs)
}

/// The inputs of one [`plan`] call, with the eligible members and their placement.
struct View<'a> {
    /// The members neither down nor expired, by name (one lookup per shard: hashed, not the
    /// `members` tree's string comparisons).
    live: HashMap<&'a str, MemberState>,
    expired: &'a BTreeSet<NodeId>,
    /// Sorted (it comes from a BTreeMap).
    eligible: &'a [NodeId],
    target: &'a placement::ShardMap,
}

impl View<'_> {
    fn is_eligible(&self, name: &str) -> bool {
        self.eligible
            .binary_search_by(|e| e.as_str().cmp(name))
            .is_ok()
    }

    fn target_of(&self, shard: u32) -> Option<&str> {
        self.target.owner(shard)
    }

    /// The owner's state when it is alive and known (so it can take part in a handoff).
    fn live_owner_state(&self, owner: &str) -> Option<MemberState> {
        self.live.get(owner).copied()
    }

    fn crash_change(&self, shard: u32, a: &ShardAssignment) -> Option<Change> {
        let dead = a.owner.as_ref().is_none_or(|o| self.expired.contains(o));
        if !dead {
            return None;
        }
        Some(Change::Reassign {
            shard,
            to: NodeId::from(self.target_of(shard)?),
            epoch: a.epoch.checked_add(1)?,
        })
    }

    /// Retargets and cancels of handoffs in progress, then new handoffs up to the budget.
    fn graceful_changes(
        &self,
        assignments: &[ShardAssignment],
        max_concurrent: usize,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut in_flight = 0usize;
        let mut draining_moves = Vec::new();
        let mut other_moves = Vec::new();
        for (shard, a) in (0u32..).zip(assignments) {
            let Some(owner) = a.owner.as_deref() else {
                continue;
            };
            let handoff_to = a.handoff_to.as_deref().filter(|t| *t != owner);
            let owner_state = self.live_owner_state(owner);
            let Some(target) = self.target_of(shard) else {
                continue;
            };
            match (handoff_to, owner_state) {
                // Down (or unknown) but not yet expired: may still serve; wait for the expiry.
                (Some(_), None) => in_flight += 1,
                (None, None) => {}
                (Some(to), Some(_)) if self.is_eligible(to) => in_flight += 1,
                (Some(_), Some(_)) if target != owner => {
                    in_flight += 1;
                    changes.push(Change::BeginHandoff {
                        shard,
                        to: NodeId::from(target),
                        epoch: a.epoch,
                    });
                }
                (Some(_), Some(_)) => {
                    if let Some(epoch) = a.epoch.checked_add(1) {
                        changes.push(Change::CancelHandoff {
                            shard,
                            owner: NodeId::from(owner),
                            epoch,
                        });
                    }
                }
                (None, Some(state)) if state == MemberState::Draining || target != owner => {
                    let mv = Change::BeginHandoff {
                        shard,
                        to: NodeId::from(target),
                        epoch: a.epoch,
                    };
                    if state == MemberState::Draining {
                        draining_moves.push(mv);
                    } else {
                        other_moves.push(mv);
                    }
                }
                (None, Some(_)) => {}
            }
        }
        let budget = max_concurrent.saturating_sub(in_flight);
        changes.extend(draining_moves.into_iter().chain(other_moves).take(budget));
        changes.sort_by_key(change_shard);
        changes
    }
}

fn change_shard(c: &Change) -> u32 {
    match c {
        Change::Reassign { shard, .. }
        | Change::BeginHandoff { shard, .. }
        | Change::CancelHandoff { shard, .. } => *shard,
    }
}

#[cfg(test)]
#[path = "rebalance_tests.rs"]
mod tests;

/// Keeps in `expiring` the members (not `me`) that are expired now or were, while the map
/// still gives them a shard and some other member could take it (with nowhere to move the
/// shards, refusing the owner's renewal would only keep them unserved).
pub fn update_expiring(
    expiring: &mut BTreeSet<NodeId>,
    expired: &BTreeSet<NodeId>,
    map: &crate::control::ClusterMap,
    me: &str,
) {
    expiring.extend(expired.iter().filter(|n| n.as_str() != me).cloned());
    if expiring.is_empty() {
        return;
    }
    // One pass over the shards and one over the members, whatever the number of expiring ones
    // (the leader calls this twice per tick).
    let owners: BTreeSet<&str> = map
        .shards
        .iter()
        .flat_map(|a| [a.owner.as_deref(), a.handoff_to.as_deref()])
        .flatten()
        .filter(|n| expiring.contains(*n))
        .collect();
    let takers: BTreeSet<&str> = map
        .members
        .values()
        .filter(|m| {
            !expired.contains(&m.name) && matches!(m.state, MemberState::Up | MemberState::Joining)
        })
        .map(|m| m.name.as_str())
        .collect();
    let can_move = |n: &str| takers.len() > usize::from(takers.contains(n));
    expiring.retain(|n| owners.contains(n.as_str()) && can_move(n));
}

//! Sans-IO: the control-plane leader's decisions about leases and members, one copy that the
//! node (`actors/src/leader.rs`) and the simulations (`runtime/sim/`) run.
//! No clock, no I/O: the caller passes `now` and carries out the returned commands.
//!
//! - Leadership: a new term starts a fresh [`LeaseTable`] (which waits `ttl + margin` before it
//!   declares anyone expired, invariant 1); grants only within `grant_window` of a quorum
//!   confirmation (a deposed leader that does not know it must not keep nodes serving).
//! - Grants: refused to a member found expired while the map still gives it shards another
//!   member can take ([`rebalance::update_expiring`]): the reassignment was decided on its
//!   expiry, and a grant meanwhile would carry a map from before the move.
//! - Membership ([`LeaderCore::membership`]): members whose lease must have expired are marked
//!   down, joining members that renew are promoted, down members that renewed after being seen
//!   down rejoin; a member marked down is forgotten (its grants dropped) only once its lease must
//!   have expired, since a grant made after the mark still counts.
//! - Rebalancing ([`rebalance_commands`]): the map commands for [`rebalance::plan`]'s changes.

use crate::node_id::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::control::{ClusterMap, Command, MemberState};
use crate::lease::{LeaseConfig, LeaseTable};
use crate::placement::PlacementCache;
use crate::rebalance::{self, Change, RebalanceConfig};

/// A lease grant: ttl, the leader's term, and the leader's applied map index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub ttl: Duration,
    pub term: u64,
    pub map_index: u64,
}

/// A leader grants leases only this soon after a quorum confirmed it still leads: a leader cut
/// off from the majority keeps believing it leads (openraft does not step down on its own), and
/// must not keep nodes serving on its word. With a 2 s TTL and 200 ms margin the new leader's
/// TTL + margin wait outlasts any grant made within this window of the last confirmation. The
/// node's leader loop and the scale simulation both use it.
pub const CONFIRMED_GRANT_WINDOW: Duration = Duration::from_millis(300);

/// Why no grant was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not leading")]
    NotLeading,
    #[error("leadership not confirmed by a quorum recently")]
    Unconfirmed,
    #[error("found expired; its shards are being moved")]
    Expiring,
}

/// What one membership step decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    /// Members whose lease must have expired (their shards may move).
    pub expired: BTreeSet<NodeId>,
    /// Member state changes to propose, in order.
    pub commands: Vec<Command>,
    /// Members whose grants were dropped this step (marked down, lease surely over).
    pub forgot: Vec<NodeId>,
}

/// The leader's lease and membership state. Empty (and granting nothing) while not leading.
#[derive(Debug, Clone)]
pub struct LeaderCore {
    me: NodeId,
    cfg: LeaseConfig,
    grant_window: Duration,
    table: Option<(u64, LeaseTable)>,
    /// When a quorum last confirmed this node's leadership (taken before asking).
    confirmed: Option<Instant>,
    /// Members seen down and dropped from the lease table: only a renewal after that (a paused
    /// node waking up) brings one back, not the grants it had before it went down or left.
    forgotten: BTreeSet<NodeId>,
    /// When this leader first saw each member down. Only a grant after that revives one.
    down_since: BTreeMap<NodeId, Instant>,
    /// Members found expired that the map still gives shards to: no grant until they moved.
    expiring: BTreeSet<NodeId>,
    /// The shards' placement targets, computed again only when the eligible members change.
    placements: PlacementCache,
}

impl LeaderCore {
    /// The core of node `me`, granting `cfg.ttl` leases only within `grant_window` of a quorum
    /// confirmation.
    pub fn new(me: &str, cfg: LeaseConfig, grant_window: Duration) -> Self {
        LeaderCore {
            me: NodeId::from(me),
            cfg,
            grant_window,
            table: None,
            confirmed: None,
            forgotten: BTreeSet::new(),
            down_since: BTreeMap::new(),
            expiring: BTreeSet::new(),
            placements: PlacementCache::default(),
        }
    }

    /// This node does not lead: drop the table (nothing is granted). True if it led until now.
    pub fn not_leading(&mut self) -> bool {
        self.confirmed = None;
        self.table.take().is_some()
    }

    /// This node leads `term` at `now`. A new term starts a fresh table, which knows nothing of
    /// what predecessors granted (so it waits `ttl + margin`); true if it did.
    pub fn leading(&mut self, term: u64, now: Instant) -> bool {
        if self.table.as_ref().is_some_and(|(t, _)| *t == term) {
            return false;
        }
        self.table = Some((term, LeaseTable::new_leader(self.cfg, now)));
        self.forgotten.clear();
        self.down_since.clear();
        self.expiring.clear();
        true
    }

    /// A quorum confirmed this node's leadership; `asked` is when it was asked.
    pub fn confirmed(&mut self, asked: Instant) {
        self.confirmed = Some(asked);
    }

    /// The term this node leads, if it does.
    pub fn term(&self) -> Option<u64> {
        self.table.as_ref().map(|(t, _)| *t)
    }

    /// Grants `node` a lease at `now`, carrying `map_index` (the leader's applied map index).
    pub fn grant(&mut self, node: &str, now: Instant, map_index: u64) -> Result<Grant, Refusal> {
        if self
            .confirmed
            .is_none_or(|t| now.saturating_duration_since(t) > self.grant_window)
        {
            return Err(if self.table.is_some() {
                Refusal::Unconfirmed
            } else {
                Refusal::NotLeading
            });
        }
        if self.expiring.contains(node) {
            return Err(Refusal::Expiring);
        }
        let (term, table) = self.table.as_mut().ok_or(Refusal::NotLeading)?;
        Ok(Grant {
            ttl: table.grant(node, now),
            term: *term,
            map_index,
        })
    }

    /// Failure detection and promotion against `map`. `now` is when the step began (the expiry
    /// arithmetic counts from it), `seen` when `map` was read (a member first seen down is dated
    /// then: a grant from before it left is older).
    pub fn membership(&mut self, map: &ClusterMap, now: Instant, seen: Instant) -> Membership {
        let Some((_, table)) = self.table.as_mut() else {
            return Membership::default();
        };
        for m in map.members.values() {
            if m.state == MemberState::Down {
                self.down_since.entry(m.name.clone()).or_insert(seen);
            } else {
                self.down_since.remove(&m.name);
            }
        }
        let mut forgot = Vec::new();
        for m in map.members.values() {
            // Forget a member marked down only once its lease must have expired: a grant made
            // after the mark (it renewed meanwhile) must keep counting, or its shards would be
            // reassigned while it still serves them (found by the deterministic simulation).
            if m.state == MemberState::Down
                && !self.forgotten.contains(&m.name)
                && table.must_have_expired(&m.name, now)
            {
                if table.last_grant(&m.name).is_some() {
                    forgot.push(m.name.clone());
                }
                table.remove(&m.name);
                self.forgotten.insert(m.name.clone());
            }
        }
        // Every member counts, down ones included: a shard still owned by a member marked down
        // moves only once that member's lease must have expired.
        let live: Vec<&str> = map.members.values().map(|m| m.name.as_str()).collect();
        let expired = without_me(table.expired_nodes(live.iter().copied(), now), &self.me);
        let renewing: BTreeSet<&str> = live
            .iter()
            .copied()
            .filter(|n| table.last_grant(n).is_some() && !expired.contains(*n))
            .collect();
        let revived: BTreeSet<&str> = renewing
            .iter()
            .copied()
            .filter(|n| {
                let (grant, down) = (table.last_grant(n), self.down_since.get(*n));
                grant.zip(down).is_some_and(|(g, d)| g > *d)
            })
            .collect();
        // From here no grant reaches an expired member whose shards this step moves, until the
        // map shows them moved.
        rebalance::update_expiring(&mut self.expiring, &expired, map, &self.me);
        let mut commands = Vec::new();
        for m in map.members.values() {
            let state =
                if expired.contains(&m.name) && m.state != MemberState::Down && m.name != self.me {
                    MemberState::Down
                } else if m.state == MemberState::Joining && renewing.contains(m.name.as_str()) {
                    MemberState::Up
                } else if m.state == MemberState::Down && revived.contains(m.name.as_str()) {
                    // Renewed after it was marked down (a pause that ended): back as joining.
                    self.forgotten.remove(&m.name);
                    MemberState::Joining
                } else {
                    continue;
                };
            commands.push(Command::SetMemberState {
                name: m.name.clone(),
                state,
            });
        }
        Membership {
            expired,
            commands,
            forgot,
        }
    }

    /// The shard moves to make on `map`, the map as it is after the member commands of
    /// [`membership`](Self::membership) committed, at `now`. Who must have expired is decided
    /// again here, against the grants made since (a member the step found expired may have
    /// renewed while those commands were proposed, if nobody could take its shards then), and
    /// `expiring` is kept for this same map, under the same `&mut self` that grants take: no
    /// grant reaches a member between the decision that moves its shards and the commit.
    /// (Deciding the moves with the step's older expired set reassigned a shard of a member that
    /// had renewed meanwhile and served it again: found by the starved rolling restart, a 34 ms
    /// overlap.)
    ///
    /// Moves are made only against a placement already offered
    /// ([`offer_placement`](Self::offer_placement)); while the one `map` needs is not (it is
    /// being computed), there are none, and `expiring` still holds. A placement is never
    /// computed here: at 1 000 nodes it takes longer than the grant window, and a leader that
    /// stops confirming its leadership while it computes refuses every grant (the scale
    /// simulation found every lease in a 10 000-node cluster lapsing at each membership change).
    pub fn moves(
        &mut self,
        map: &ClusterMap,
        now: Instant,
        rcfg: &RebalanceConfig,
    ) -> Vec<(MoveKind, Command)> {
        let Some(expired) = self.expired_now(map, now) else {
            return Vec::new();
        };
        rebalance::update_expiring(&mut self.expiring, &expired, map, &self.me);
        if self.placement_needed(map, now, rcfg).is_some() {
            return Vec::new();
        }
        rebalance_commands_cached(map, &expired, rcfg, &mut self.placements)
    }

    /// Computes and offers the placement [`moves`](Self::moves) needs now, if any, right here:
    /// for callers whose placement time does not matter (the fault simulation, tests). The node
    /// computes it off its tick instead ([`placement_needed`](Self::placement_needed)).
    pub fn place_inline(&mut self, map: &ClusterMap, now: Instant, rcfg: &RebalanceConfig) {
        if let Some((shards, eligible)) = self.placement_needed(map, now, rcfg) {
            let mut cache = PlacementCache::default();
            let _ = cache.assign(shards, &eligible, rcfg.eps);
            self.offer_placement(cache);
        }
    }

    /// How many placements [`moves`](Self::moves) computed (the rest came from its cache).
    pub fn placements_computed(&self) -> u64 {
        self.placements.computed()
    }

    /// The placement inputs (shard count, eligible members) that [`moves`](Self::moves) on `map`
    /// at `now` would compute afresh, or `None` when its cache holds them. Placement costs
    /// `shards x members` scores (a quarter of a second at 1 000 nodes, tens of seconds at
    /// 10 000): the caller computes it outside the lock that grants take, and without holding up
    /// the leader's quorum confirmations, and hands it over with
    /// [`offer_placement`](Self::offer_placement), so no grant waits for it.
    pub fn placement_needed(
        &self,
        map: &ClusterMap,
        now: Instant,
        rcfg: &RebalanceConfig,
    ) -> Option<(u32, Vec<NodeId>)> {
        let expired = self.expired_now(map, now)?;
        let eligible = rebalance::eligible(&member_states(map), &expired);
        let shards = u32::try_from(map.shards.len()).ok()?;
        (shards > 0 && !eligible.is_empty() && !self.placements.holds(shards, &eligible, rcfg.eps))
            .then_some((shards, eligible))
    }

    /// A placement computed outside the lock (see [`placement_needed`](Self::placement_needed));
    /// [`moves`](Self::moves) uses it when its inputs are still the ones it needs, and waits for
    /// another otherwise, so an outdated offer costs time, never a wrong move.
    pub fn offer_placement(&mut self, cache: PlacementCache) {
        self.placements.take_from(cache);
    }

    /// The members (other than this node) whose lease must have expired at `now`; `None` while
    /// this node does not lead.
    fn expired_now(&self, map: &ClusterMap, now: Instant) -> Option<BTreeSet<NodeId>> {
        let (_, table) = self.table.as_ref()?;
        Some(without_me(
            table.expired_nodes(map.members.keys().map(NodeId::as_str), now),
            &self.me,
        ))
    }

    /// The simulation's deliberately broken variants reach in from outside through these.
    #[cfg(feature = "sim-hooks")]
    #[doc(hidden)]
    pub fn table_mut(&mut self) -> Option<&mut LeaseTable> {
        self.table.as_mut().map(|(_, t)| t)
    }

    #[cfg(feature = "sim-hooks")]
    #[doc(hidden)]
    pub fn forget_expiring(&mut self) {
        self.expiring.clear();
    }

    /// Forgets every member marked down at once, fresh grants and all; returns those that had
    /// one.
    #[cfg(feature = "sim-hooks")]
    #[doc(hidden)]
    pub fn forget_down_now(&mut self, map: &ClusterMap) -> Vec<NodeId> {
        let Some((_, table)) = self.table.as_mut() else {
            return Vec::new();
        };
        let mut forgot = Vec::new();
        for m in map.members.values() {
            if m.state == MemberState::Down && !self.forgotten.contains(&m.name) {
                if table.last_grant(&m.name).is_some() {
                    forgot.push(m.name.clone());
                }
                table.remove(&m.name);
                self.forgotten.insert(m.name.clone());
            }
        }
        forgot
    }
}

/// The members whose lease must have expired, never the leader itself: it has just confirmed
/// with a quorum that it leads, so it is not failed, and it grants itself its next lease. (A
/// starved leader whose own grant had aged past the expiry wait reassigned its own shards as if
/// it had failed, then granted itself a lease and served them next to their new owner: found by
/// the starved rolling restart.) Its own serving still stops at its own lease's expiry.
/// Each member's state, by name (what `rebalance` takes).
fn member_states(map: &ClusterMap) -> BTreeMap<NodeId, MemberState> {
    map.members
        .values()
        .map(|m| (m.name.clone(), m.state))
        .collect()
}

fn without_me(expired: impl IntoIterator<Item = NodeId>, me: &str) -> BTreeSet<NodeId> {
    expired.into_iter().filter(|n| n != me).collect()
}

/// What a rebalancing command does (for metrics: first placements are not failovers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveKind {
    /// A never-owned shard placed for the first time.
    Initial,
    /// A shard whose owner's lease must have expired, assigned straight to a new owner.
    Reassign,
    /// A graceful handoff begins.
    Handoff,
    /// A handoff is called off.
    Cancel,
}

impl MoveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::Initial => "initial",
            MoveKind::Reassign => "reassign",
            MoveKind::Handoff => "handoff",
            MoveKind::Cancel => "cancel",
        }
    }
}

/// The map commands that carry out [`rebalance::plan`] on `map`, each guarded by the shard's
/// current epoch.
pub fn rebalance_commands(
    map: &ClusterMap,
    expired: &BTreeSet<NodeId>,
    rcfg: &RebalanceConfig,
) -> Vec<(MoveKind, Command)> {
    rebalance_commands_cached(map, expired, rcfg, &mut PlacementCache::default())
}

/// [`rebalance_commands`] with the placement taken from `cache` while the members stay the same.
pub fn rebalance_commands_cached(
    map: &ClusterMap,
    expired: &BTreeSet<NodeId>,
    rcfg: &RebalanceConfig,
    cache: &mut PlacementCache,
) -> Vec<(MoveKind, Command)> {
    rebalance::plan_cached(&map.shards, &member_states(map), expired, rcfg, cache)
        .into_iter()
        .filter_map(|change| {
            let shard = match &change {
                Change::Reassign { shard, .. }
                | Change::BeginHandoff { shard, .. }
                | Change::CancelHandoff { shard, .. } => *shard,
            };
            let cur = map.shards.get(shard as usize)?;
            Some(match change {
                Change::Reassign { to, epoch, .. } => (
                    if cur.owner.is_none() && cur.epoch == 0 {
                        MoveKind::Initial
                    } else {
                        MoveKind::Reassign
                    },
                    Command::Assign {
                        shard,
                        expect_epoch: cur.epoch,
                        owner: Some(to),
                        epoch,
                        handoff_to: None,
                    },
                ),
                Change::BeginHandoff { to, epoch, .. } => (
                    MoveKind::Handoff,
                    Command::Assign {
                        shard,
                        expect_epoch: cur.epoch,
                        owner: cur.owner.clone(),
                        epoch,
                        handoff_to: Some(to),
                    },
                ),
                Change::CancelHandoff { owner, epoch, .. } => (
                    MoveKind::Cancel,
                    Command::Assign {
                        shard,
                        expect_epoch: cur.epoch,
                        owner: Some(owner),
                        epoch,
                        handoff_to: None,
                    },
                ),
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "leader_core_tests.rs"]
mod tests;

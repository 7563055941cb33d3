//! Lease renewal (every node) and the leader's duties (failure detection, member promotion,
//! paced rebalancing). The arithmetic lives in the sans-IO `runtime::lease` and
//! `runtime::rebalance`; this module only drives them with real time and the real control plane.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidepool_runtime::autoscale::{AutoscalePolicy, Autoscaler, LoadSample};
use tidepool_runtime::codec::{ArchivedBody, Body, Dest, Envelope};
use tidepool_runtime::control::{
    AutoscaleStatus, ClusterMap, Command, ControlError, ControlPlane, MemberState,
};
use tidepool_runtime::lease::{LeaseConfig, LeaseTable};
use tidepool_runtime::metrics as m;
use tidepool_runtime::rebalance::{self, Change, RebalanceConfig};
use tidepool_runtime::transport::Transport;
use tracing::{debug, info, warn};

use crate::load::LoadMeter;
use crate::serve_gate::ServeGate;

/// The leader's lease table, present only while this node leads (with the term it leads).
#[derive(Debug, Default)]
pub struct LeaderLeases {
    table: Option<(u64, LeaseTable)>,
    /// When a quorum last confirmed this node's leadership (taken before asking).
    confirmed: Option<Instant>,
    /// Members seen down and dropped from the lease table: only a renewal after that (a paused
    /// node waking up) brings one back, not the grants it had before it went down or left.
    forgotten: BTreeSet<String>,
    /// When this leader first saw each member down. Only a grant after that revives one (a
    /// paused node renewing again); a node that left still holds a fresh grant from before it
    /// left, which must not bring it back.
    down_since: BTreeMap<String, Instant>,
    /// Members this leader found expired that the map still gives shards to. No grant for them
    /// until the map has moved those shards: the reassignment was decided on their expiry, and
    /// a grant made while it is being proposed would let the old owner serve again (with a
    /// valid lease and the old map) while the new owner restores: two owners (chaos F5, found
    /// under packet loss; the fenced log kept the data whole).
    expiring: BTreeSet<String>,
}

/// A leader grants leases only this soon after a quorum confirmed it still leads: a leader cut
/// off from the majority keeps believing it leads (openraft does not step down on its own), and
/// must not keep nodes serving on its word. With a 2 s TTL and 200 ms margin the new leader's
/// TTL + margin wait outlasts any grant made within this window of the last confirmation.
pub const CONFIRMED_GRANT_WINDOW: Duration = Duration::from_millis(300);

/// Shared lease state of a node: its own holder, and the grantor table while it leads.
#[derive(Debug)]
pub struct Leases {
    pub cfg: LeaseConfig,
    /// This node's own lease (and the map index its ownership driver acted on).
    pub holder: Arc<ServeGate>,
    pub leader: Mutex<LeaderLeases>,
}

/// A lease grant: ttl, the leader's term, and the leader's applied map index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub ttl: Duration,
    pub term: u64,
    pub map_index: u64,
}

impl Leases {
    pub fn new(cfg: LeaseConfig) -> Arc<Self> {
        Arc::new(Leases {
            holder: Arc::new(ServeGate::new(cfg)),
            leader: Mutex::new(LeaderLeases::default()),
            cfg,
        })
    }

    /// Whether this node may serve now: lease time left, and the map acted on up to the grants.
    pub fn valid(&self) -> bool {
        self.holder.may_serve()
    }

    /// The ownership driver has acted on the map up to `index`.
    pub fn set_acted_index(&self, index: u64) {
        self.holder.set_acted(index);
    }

    /// Grants `node` a lease if this node leads, carrying `map_index`, the leader's applied map
    /// index (everything committed before the last quorum confirmation is applied by then).
    pub fn grant(&self, node: &str, now: Instant, map_index: u64) -> Option<Grant> {
        let mut l = self.leader.lock();
        if l.confirmed
            .is_none_or(|t| now.saturating_duration_since(t) > CONFIRMED_GRANT_WINDOW)
        {
            return None;
        }
        if l.expiring.contains(node) {
            metrics::counter!(m::LEASE_GRANTS_REFUSED).increment(1);
            return None;
        }
        let (term, table) = l.table.as_mut()?;
        Some(Grant {
            ttl: table.grant(node, now),
            term: *term,
            map_index,
        })
    }
}

/// The load each node reported with its latest lease renewal (the leader's autoscaling input).
#[derive(Debug, Default)]
pub struct ClusterLoad {
    nodes: Mutex<BTreeMap<String, (Instant, f64, u64)>>,
}

impl ClusterLoad {
    pub fn new() -> Arc<Self> {
        Arc::new(ClusterLoad::default())
    }

    /// `node` reported `utilization` (0..=1) and `backlog` now.
    pub fn record(&self, node: &str, utilization: f64, backlog: u64) {
        self.nodes.lock().insert(
            node.to_string(),
            (Instant::now(), utilization.clamp(0.0, 1.0), backlog),
        );
    }

    /// Mean utilisation and total backlog over `up` members, from reports younger than
    /// `fresh` (a member with no fresh report counts as idle: it is not renewing, so it is about
    /// to be declared down anyway).
    pub fn sample(&self, up: &[String], fresh: Duration, now: Instant) -> (f64, f64) {
        let nodes = self.nodes.lock();
        let mut util = 0.0;
        let mut backlog = 0.0;
        for name in up {
            if let Some((at, u, b)) = nodes.get(name) {
                if now.saturating_duration_since(*at) <= fresh {
                    util += u;
                    backlog += *b as f64;
                }
            }
        }
        (util / up.len().max(1) as f64, backlog)
    }
}

/// The leader's autoscaling loop: every `every`, feeds the cluster's load into the policy,
/// exports the recommendation, and records it in the map when it changes (or every 30 s) so
/// `cluster status` on any node can show it. Other nodes export zeros and keep no history.
pub async fn autoscale_loop(
    me: String,
    control: ControlPlane,
    load: Arc<ClusterLoad>,
    policy: AutoscalePolicy,
    every: Duration,
) {
    let mut scaler = Autoscaler::new(policy);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let origin = Instant::now();
    let mut recorded: Option<(u32, Instant)> = None;
    loop {
        tick.tick().await;
        if !control.is_leader() {
            scaler.reset();
            recorded = None;
            for g in [
                m::AUTOSCALE_DESIRED,
                m::AUTOSCALE_CURRENT,
                m::AUTOSCALE_UTILIZATION,
                m::AUTOSCALE_BACKLOG,
            ] {
                metrics::gauge!(g).set(0.0);
            }
            continue;
        }
        let now = Instant::now();
        let map = control.map().borrow().clone();
        let up: Vec<String> = map
            .members
            .values()
            .filter(|mb| mb.state == MemberState::Up)
            .map(|mb| mb.name.clone())
            .collect();
        let (utilization, backlog) = load.sample(&up, every * 3, now);
        let sample = LoadSample {
            current: up.len() as u32,
            utilization,
            backlog,
        };
        let previous = scaler.last();
        let rec = scaler.observe(now.duration_since(origin), &sample);
        metrics::gauge!(m::AUTOSCALE_DESIRED).set(f64::from(rec.desired));
        metrics::gauge!(m::AUTOSCALE_CURRENT).set(f64::from(rec.current));
        metrics::gauge!(m::AUTOSCALE_UTILIZATION).set(utilization);
        metrics::gauge!(m::AUTOSCALE_BACKLOG).set(backlog);
        if previous.is_some_and(|p| p != rec.desired) {
            metrics::counter!(m::AUTOSCALE_CHANGES).increment(1);
            info!(desired = rec.desired, current = rec.current, reason = %rec.reason, "autoscaling recommendation changed");
        }
        let stale = recorded.is_none_or(|(d, at)| {
            d != rec.desired || now.duration_since(at) >= Duration::from_secs(30)
        });
        if stale {
            let status = AutoscaleStatus {
                desired: rec.desired,
                current: rec.current,
                utilization,
                backlog,
                reason: rec.reason.clone(),
                by: me.clone(),
            };
            if let Ok(Ok(r)) =
                tokio::time::timeout(every, control.propose(Command::SetAutoscale(status))).await
            {
                if r.is_ok() {
                    recorded = Some((rec.desired, now));
                }
            }
        }
    }
}

/// Renews this node's lease with the leader every `renew_every` (directly when it is the leader),
/// reporting its load with each renewal.
pub async fn renew_loop(
    me: String,
    control: ControlPlane,
    transport: Transport,
    leases: Arc<Leases>,
    meter: Arc<LoadMeter>,
    load: Arc<ClusterLoad>,
) {
    let mut tick = tokio::time::interval(leases.cfg.renew_every.min(Duration::from_millis(250)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if leases.holder.lock().poll_expired(now) {
            warn!("lease expired: this node stops serving its shards until it renews");
            metrics::counter!(m::LEASE_EXPIRATIONS).increment(1);
        }
        metrics::gauge!(m::LEASE_VALID).set(if leases.holder.lock().is_valid(now) {
            1.0
        } else {
            0.0
        });
        if !leases.holder.lock().renew_due(now) {
            continue;
        }
        let Some(leader) = control.leader() else {
            continue;
        };
        let token = leases.holder.lock().on_send(now);
        let (utilization, backlog) = meter.latest();
        if leader.name == me {
            load.record(&me, utilization, backlog);
            let index = control.map().borrow().applied_index;
            if let Some(g) = leases.grant(&me, now, index) {
                leases
                    .holder
                    .lock()
                    .on_grant(Instant::now(), token, g.ttl, g.term, g.map_index);
            }
            continue;
        }
        let (transport, leases, me) = (transport.clone(), leases.clone(), me.clone());
        tokio::spawn(async move {
            if let Ok(addr) = leader.addr.parse() {
                transport.add_member(&leader.name, addr);
            }
            let Ok(link) = transport.link(&leader.name).await else {
                return;
            };
            let env = Envelope::new(
                &me,
                Dest::Node(leader.name.clone()),
                0,
                Body::LeaseRenew {
                    sent_at: token,
                    utilization_milli: (utilization * 1000.0).round() as u32,
                    backlog,
                },
            );
            match link.request(env, leases.cfg.ttl).await {
                Ok(f) => {
                    if let ArchivedBody::LeaseGrant {
                        sent_at,
                        ttl_ms,
                        term,
                        map_index,
                    } = &f.envelope().body
                    {
                        leases.holder.lock().on_grant(
                            Instant::now(),
                            sent_at.to_native(),
                            Duration::from_millis(ttl_ms.to_native()),
                            term.to_native(),
                            map_index.to_native(),
                        );
                    }
                }
                Err(e) => debug!(error = %e, "lease renewal failed"),
            }
        });
    }
}

/// The leader's loop: keeps the lease table, marks members whose lease must have expired as
/// down, promotes joining members that renew, and proposes paced rebalancing.
pub async fn leader_loop(
    me: String,
    shards: u32,
    control: ControlPlane,
    leases: Arc<Leases>,
    rcfg: RebalanceConfig,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    loop {
        tick.tick().await;
        let now = Instant::now();
        if !control.is_leader() {
            if was_leader {
                info!("no longer the control-plane leader");
                let mut l = leases.leader.lock();
                l.table = None;
                l.confirmed = None;
            }
            was_leader = false;
            continue;
        }
        let term = control.term();
        {
            let mut l = leases.leader.lock();
            if l.table.as_ref().is_none_or(|(t, _)| *t != term) {
                // A new leader does not know what its predecessor granted: it waits ttl+margin
                // before declaring anyone expired (invariant 1).
                info!(term, "leading the control plane; lease table reset");
                l.table = Some((term, LeaseTable::new_leader(leases.cfg, now)));
                l.forgotten.clear();
                l.down_since.clear();
                l.expiring.clear();
            }
        }
        was_leader = true;
        let asked = Instant::now();
        match tokio::time::timeout(Duration::from_millis(500), control.linearizable_map()).await {
            Ok(Ok(_)) => leases.leader.lock().confirmed = Some(asked),
            _ => {
                debug!("leadership not confirmed by a quorum; not granting leases");
                continue;
            }
        }
        let map = control.map().borrow().clone();
        if let Err(e) = leader_step(&me, shards, &control, &leases, &rcfg, &map, now).await {
            debug!(error = %e, "leader step failed; retrying next tick");
        }
    }
}

async fn leader_step(
    me: &str,
    shards: u32,
    control: &ControlPlane,
    leases: &Leases,
    rcfg: &RebalanceConfig,
    map: &ClusterMap,
    now: Instant,
) -> Result<(), ControlError> {
    if map.shards.is_empty() {
        control.propose(Command::Init { shards }).await?;
        return Ok(());
    }
    // Failure detection and promotion.
    let (expired, renewing, revived): (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) = {
        let mut l = leases.leader.lock();
        let LeaderLeases {
            table,
            forgotten,
            down_since,
            expiring,
            ..
        } = &mut *l;
        let Some((_, table)) = table.as_mut() else {
            return Ok(());
        };
        // Seen now, after this map was read: any grant from before the member left is older.
        let seen = Instant::now();
        for m in map.members.values() {
            if m.state == MemberState::Down {
                down_since.entry(m.name.clone()).or_insert(seen);
            } else {
                down_since.remove(&m.name);
            }
        }
        for m in map.members.values() {
            // Forget a member marked down only once its lease must have expired: a grant made
            // after the mark (it renewed meanwhile) must keep counting, or its shards would be
            // reassigned while it still serves them (found by the deterministic simulation).
            if m.state == MemberState::Down
                && !forgotten.contains(&m.name)
                && table.must_have_expired(&m.name, now)
            {
                table.remove(&m.name);
                forgotten.insert(m.name.clone());
            }
        }
        // Every member counts, down ones included: a shard still owned by a member marked down
        // moves only once that member's lease must have expired.
        let live: Vec<&str> = map.members.values().map(|m| m.name.as_str()).collect();
        let expired: BTreeSet<String> = table
            .expired_nodes(live.iter().copied(), now)
            .into_iter()
            .collect();
        let renewing: BTreeSet<String> = live
            .iter()
            .filter(|n| table.last_grant(n).is_some() && !expired.contains(**n))
            .map(|n| n.to_string())
            .collect();
        let revived = renewing
            .iter()
            .filter(|n| {
                let (grant, down) = (table.last_grant(n), down_since.get(*n));
                grant.zip(down).is_some_and(|(g, d)| g > *d)
            })
            .cloned()
            .collect();
        // Decided under the same lock as grants: from here no grant reaches an expired member
        // whose shards this step moves, until the map shows them moved.
        rebalance::update_expiring(expiring, &expired, map, me);
        (expired, renewing, revived)
    };
    let mut cmds = Vec::new();
    for m in map.members.values() {
        if expired.contains(&m.name) && m.state != MemberState::Down && m.name != me {
            warn!(member = %m.name, "lease must have expired: marking down");
            cmds.push(Command::SetMemberState {
                name: m.name.clone(),
                state: MemberState::Down,
            });
        } else if m.state == MemberState::Joining && renewing.contains(&m.name) {
            cmds.push(Command::SetMemberState {
                name: m.name.clone(),
                state: MemberState::Up,
            });
        } else if m.state == MemberState::Down && revived.contains(&m.name) {
            // Renewed after it was marked down (a pause that ended): back as joining.
            info!(member = %m.name, "down member renews its lease again: rejoining");
            leases.leader.lock().forgotten.remove(&m.name);
            cmds.push(Command::SetMemberState {
                name: m.name.clone(),
                state: MemberState::Joining,
            });
        }
    }
    for c in cmds {
        control.propose(c).await?;
    }
    // Rebalance against the map as it is now.
    let map = control.map().borrow().clone();
    let states: BTreeMap<String, MemberState> = map
        .members
        .values()
        .map(|m| (m.name.clone(), m.state))
        .collect();
    let changes = rebalance::plan(&map.shards, &states, &expired, rcfg);
    if !changes.is_empty() {
        // Each node logs what it serves at INFO ("serving N shards"); the moves are at DEBUG.
        debug!(moves = changes.len(), "rebalancing shards");
    }
    for change in changes {
        let cmd = match change {
            Change::Reassign { shard, to, epoch } => {
                let cur = &map.shards[shard as usize];
                // First placement of a never-owned shard is not a failure-driven move.
                let kind = if cur.owner.is_none() && cur.epoch == 0 {
                    "initial"
                } else {
                    "reassign"
                };
                metrics::counter!(m::REBALANCES, "kind" => kind).increment(1);
                Command::Assign {
                    shard,
                    expect_epoch: cur.epoch,
                    owner: Some(to),
                    epoch,
                    handoff_to: None,
                }
            }
            Change::BeginHandoff { shard, to, epoch } => {
                metrics::counter!(m::REBALANCES, "kind" => "handoff").increment(1);
                let cur = &map.shards[shard as usize];
                Command::Assign {
                    shard,
                    expect_epoch: cur.epoch,
                    owner: cur.owner.clone(),
                    epoch,
                    handoff_to: Some(to),
                }
            }
            Change::CancelHandoff {
                shard,
                owner,
                epoch,
            } => {
                let cur = &map.shards[shard as usize];
                Command::Assign {
                    shard,
                    expect_epoch: cur.epoch,
                    owner: Some(owner),
                    epoch,
                    handoff_to: None,
                }
            }
        };
        debug!(?cmd, "rebalance");
        control.propose(cmd).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_runtime::control::{Member, ShardAssignment};

    fn map(owners: &[&str], members: &[(&str, MemberState)]) -> ClusterMap {
        ClusterMap {
            members: members
                .iter()
                .map(|(n, s)| {
                    let m = Member {
                        name: (*n).into(),
                        addr: String::new(),
                        state: *s,
                        voter: false,
                    };
                    ((*n).to_string(), m)
                })
                .collect(),
            shards: owners
                .iter()
                .enumerate()
                .map(|(i, o)| ShardAssignment {
                    owner: Some((*o).into()),
                    epoch: i as u64 + 1,
                    handoff_to: None,
                })
                .collect(),
            ..ClusterMap::default()
        }
    }

    fn leading(leases: &Leases, now: Instant) {
        let mut l = leases.leader.lock();
        l.table = Some((1, LeaseTable::new_leader(leases.cfg, now)));
        l.confirmed = Some(now);
    }

    /// A member found expired gets no grant while the map still gives it shards that another
    /// member can take; once the map has moved them, it may renew (and be revived) again.
    #[test]
    fn no_grant_to_an_expired_owner_until_its_shards_moved() {
        let leases = Leases::new(LeaseConfig::default());
        let now = Instant::now();
        leading(&leases, now);
        let up = MemberState::Up;
        let before = map(&["n1", "n2"], &[("n1", up), ("n2", up)]);
        let expired = BTreeSet::from(["n2".to_string()]);
        rebalance::update_expiring(&mut leases.leader.lock().expiring, &expired, &before, "n1");
        assert!(
            leases.grant("n2", now, 7).is_none(),
            "n2's shard is being moved"
        );
        assert!(
            leases.grant("n1", now, 7).is_some(),
            "others renew as usual"
        );

        // The reassignment committed: n2 owns nothing, so a renewal is safe again.
        let after = map(&["n1", "n1"], &[("n1", up), ("n2", MemberState::Down)]);
        rebalance::update_expiring(&mut leases.leader.lock().expiring, &expired, &after, "n1");
        assert!(leases.grant("n2", now, 9).is_some());
    }

    /// With nowhere to move its shards, an expired owner is not refused (it would only leave
    /// them unserved), and the leader never refuses itself.
    #[test]
    fn an_owner_whose_shards_cannot_move_still_renews() {
        let leases = Leases::new(LeaseConfig::default());
        let now = Instant::now();
        leading(&leases, now);
        let m = map(
            &["n1", "n2"],
            &[("n1", MemberState::Draining), ("n2", MemberState::Up)],
        );
        let expired = BTreeSet::from(["n1".to_string(), "n2".to_string()]);
        rebalance::update_expiring(&mut leases.leader.lock().expiring, &expired, &m, "n1");
        assert!(
            leases.grant("n2", now, 1).is_some(),
            "no member could take n2's shard"
        );
        assert!(leases.grant("n1", now, 1).is_some(), "the leader itself");
    }
}

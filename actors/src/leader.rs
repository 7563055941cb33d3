//! Lease renewal (every node) and the leader's duties (failure detection, member promotion,
//! paced rebalancing). The arithmetic lives in the sans-IO `runtime::lease` and
//! `runtime::rebalance`; this module only drives them with real time and the real control plane.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidepool_runtime::autoscale::{AutoscalePolicy, Autoscaler, LoadSample};
use tidepool_runtime::codec::{ArchivedBody, Body, Dest, Envelope};
use tidepool_runtime::control::{
    AutoscaleStatus, ClusterMap, Command, ControlError, ControlPlane, MemberState,
};
use tidepool_runtime::leader_core::{LeaderCore, MoveKind, Refusal};
use tidepool_runtime::lease::LeaseConfig;
use tidepool_runtime::metrics as m;
use tidepool_runtime::placement::PlacementCache;
use tidepool_runtime::rebalance::RebalanceConfig;
use tidepool_runtime::transport::Transport;
use tracing::{debug, info, warn};

use crate::load::LoadMeter;
use crate::serve_gate::ServeGate;

pub use tidepool_runtime::leader_core::CONFIRMED_GRANT_WINDOW;

/// Shared lease state of a node: its own holder, and the grantor table while it leads.
#[derive(Debug)]
pub struct Leases {
    pub cfg: LeaseConfig,
    /// This node's own lease (and the map index its ownership driver acted on).
    pub holder: Arc<ServeGate>,
    /// The grantor's state and decisions (sans-IO, shared with the simulation).
    pub leader: Mutex<LeaderCore>,
}

pub use tidepool_runtime::leader_core::Grant;

impl Leases {
    pub fn new(me: &str, cfg: LeaseConfig) -> Arc<Self> {
        Arc::new(Leases {
            holder: Arc::new(ServeGate::new(cfg)),
            leader: Mutex::new(LeaderCore::new(me, cfg, CONFIRMED_GRANT_WINDOW)),
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
        match self.leader.lock().grant(node, now, map_index) {
            Ok(g) => Some(g),
            Err(Refusal::Expiring) => {
                metrics::counter!(m::LEASE_GRANTS_REFUSED).increment(1);
                None
            }
            Err(_) => None,
        }
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
            .map(|mb| mb.name.to_string())
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
    shards: u32,
    control: ControlPlane,
    leases: Arc<Leases>,
    rcfg: RebalanceConfig,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut placing: Option<Placing> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        if !control.is_leader() {
            placing = None;
            if leases.leader.lock().not_leading() {
                info!("no longer the control-plane leader");
            }
            continue;
        }
        let term = control.term();
        if leases.leader.lock().leading(term, now) {
            // A new leader does not know what its predecessor granted: it waits ttl+margin
            // before declaring anyone expired (invariant 1).
            info!(term, "leading the control plane; lease table reset");
        }
        let asked = Instant::now();
        match tokio::time::timeout(Duration::from_millis(500), control.linearizable_map()).await {
            Ok(Ok(_)) => leases.leader.lock().confirmed(asked),
            _ => {
                debug!("leadership not confirmed by a quorum; not granting leases");
                continue;
            }
        }
        let map = control.map().borrow().clone();
        if let Err(e) = leader_step(shards, &control, &leases, &rcfg, &map, now, &mut placing).await
        {
            debug!(error = %e, "leader step failed; retrying next tick");
        }
    }
}

/// A placement computing on a blocking thread.
type Placing = tokio::task::JoinHandle<PlacementCache>;

/// How long a tick waits for a placement it started before going on without it (its moves
/// then wait for a later tick). Well inside the grant window, so the next confirmation is on
/// time.
const PLACEMENT_WAIT: Duration = Duration::from_millis(50);

async fn leader_step(
    shards: u32,
    control: &ControlPlane,
    leases: &Leases,
    rcfg: &RebalanceConfig,
    map: &ClusterMap,
    now: Instant,
    placing: &mut Option<Placing>,
) -> Result<(), ControlError> {
    if map.shards.is_empty() {
        control.propose(Command::Init { shards }).await?;
        return Ok(());
    }
    // Failure detection and promotion (seen: after this map was read, so any grant from before
    // a member left is older).
    let decided = leases.leader.lock().membership(map, now, Instant::now());
    for name in &decided.forgot {
        debug!(member = %name, "forgetting the grants of a member marked down");
    }
    for c in decided.commands {
        if let Command::SetMemberState { name, state } = &c {
            match state {
                MemberState::Down => warn!(member = %name, "lease must have expired: marking down"),
                MemberState::Joining => {
                    info!(member = %name, "down member renews its lease again: rejoining")
                }
                _ => {}
            }
        }
        control.propose(c).await?;
    }
    // Rebalance against the map as it is now, deciding again who must have expired (a member
    // may have renewed while the commands above were proposed).
    let map = control.map().borrow().clone();
    // A new placement (after a membership change) is computed off the grant lock, off the
    // runtime threads, and off this loop: it costs shards x members scores (seconds at a few
    // thousand nodes), and a loop waiting for it would stop confirming its leadership, so every
    // grant in the cluster would be refused and every lease lapse (found by the scale
    // simulation, BENCHMARKS.md section 8). The moves wait until it is offered.
    let needed = leases
        .leader
        .lock()
        .placement_needed(&map, Instant::now(), rcfg);
    if let (Some((shards, eligible)), None) = (needed, placing.as_ref()) {
        let eps = rcfg.eps;
        *placing = Some(tokio::task::spawn_blocking(move || {
            let mut cache = PlacementCache::default();
            let _ = cache.assign(shards, &eligible, eps);
            cache
        }));
    }
    if let Some(handle) = placing.as_mut() {
        if let Ok(done) = tokio::time::timeout(PLACEMENT_WAIT, handle).await {
            *placing = None;
            if let Ok(cache) = done {
                leases.leader.lock().offer_placement(cache);
            }
        }
    }
    let moves = leases.leader.lock().moves(&map, Instant::now(), rcfg);
    if !moves.is_empty() {
        // Each node logs what it serves at INFO ("serving N shards"); the moves are at DEBUG.
        debug!(moves = moves.len(), "rebalancing shards");
    }
    for (kind, cmd) in moves {
        if kind != MoveKind::Cancel {
            metrics::counter!(m::REBALANCES, "kind" => kind.as_str()).increment(1);
        }
        debug!(?cmd, "rebalance");
        control.propose(cmd).await?;
    }
    Ok(())
}

//! The control plane at scale: one leader, `N` nodes, `16 N` shards, on a virtual clock.
//!
//! # What runs, and what is modelled
//!
//! Real (the code a node runs): the leader's [`LeaderCore`] (grants, failure detection,
//! promotion, placement, paced rebalancing), every node's [`LeaseHolder`] (renewal timing and
//! validity) and [`OwnershipCore`] (the per-shard handoff machines: restore, serve, drain,
//! checkpoint, report), and the map's state machine ([`apply`]), with the node's defaults:
//! [`LeaseConfig::default`] (2 s ttl, renew every 500 ms), [`RebalanceConfig::default`] (4
//! handoffs at once), the leader loop's 100 ms tick, the renew loop's 250 ms tick, and
//! [`CONFIRMED_GRANT_WINDOW`].
//!
//! Modelled: the network (every message takes [`NET_MS`]), Raft (a command commits when the
//! leader proposes it, and its quorum read succeeds each tick), storage (a restore takes
//! [`RESTORE_MS`], a checkpoint [`CHECKPOINT_MS`], a drain [`DRAIN_MS`]), and shard data (none:
//! the state is `()`). The leader is node 0 and is never killed. A node learns the shards a
//! commit touched ([`OwnershipCore::on_shards`]) [`NET_MS`] after it, which decides what the
//! node's full scan of the map ([`OwnershipCore::on_map`]) decides; the scan's own cost is
//! measured apart ([`Report::node_scan_us`]).
//!
//! # The scenario
//!
//! Bootstrap (every shard placed and served), 10 s steady, then three faults, each run until
//! every shard is served by the live owner the map names (and, for the join wave, no handoff
//! is left) or [`ScaleConfig::phase_cap_ms`] passes:
//! 1. **kill 1 %** of the nodes at once;
//! 2. **join 10 %** new nodes at once;
//! 3. **rolling restart**, two rounds of 1 % of the nodes (never the leader), as the node stops
//!    and starts: drain (every shard handed off, paced), stop, gone for [`RESTART_MS`], start,
//!    join, and take shards back once promoted; a round ends when every shard is served where
//!    placement wants it.
//!
//! Per phase: renewals and grants per second at the leader, Raft entries per second, leader CPU
//! per tick (wall time around the core calls and the map copy `leader_step` makes; placement
//! apart), shards moved against the fewest any correct plan moves, and the time until every
//! shard is served. Wall times are of this machine; everything else is deterministic per seed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tidepool_core::control::{apply, ClusterMap, Command, CommandResponse, MemberState};
use tidepool_core::handoff::{Effect, Event};
use tidepool_core::leader_core::{Grant, LeaderCore, CONFIRMED_GRANT_WINDOW};
use tidepool_core::lease::{LeaseConfig, LeaseHolder};
use tidepool_core::node_id::NodeId;
use tidepool_core::ownership::OwnershipCore;
use tidepool_core::placement::PlacementCache;
use tidepool_core::rebalance::RebalanceConfig;

/// Virtual milliseconds since the start of a run.
pub type Ms = u64;

/// The node's renew loop ticks every `min(renew_every, 250 ms)`.
pub const RENEW_TICK_MS: Ms = 250;
/// The node's leader loop ticks every 100 ms.
pub const LEADER_TICK_MS: Ms = 100;
/// One message between two nodes.
pub const NET_MS: Ms = 1;
/// Restoring one shard (fence, read the checkpoint, replay the log).
pub const RESTORE_MS: Ms = 20;
/// Writing one shard's checkpoint at the end of a drain.
pub const CHECKPOINT_MS: Ms = 10;
/// Operations in flight finishing at the start of a drain.
pub const DRAIN_MS: Ms = 2;
/// How long a restarted node is gone.
pub const RESTART_MS: Ms = 1000;
/// How long the leader loop's tick waits for a placement it started (`PLACEMENT_WAIT`).
pub const PLACEMENT_WAIT_MS: Ms = 50;
/// How often the run checks whether a phase is done.
const CHECK_MS: Ms = 50;
/// Steady state measured between bootstrap and the first fault.
const STEADY_MS: Ms = 10_000;

/// How long a placement takes in virtual time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementTime {
    /// As long as computing it took here (the measurement).
    Wall,
    /// A fixed time, whatever the machine (tests: the same history in every run).
    Fixed(Ms),
}

/// One run's shape.
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    pub nodes: usize,
    pub shards_per_node: u32,
    pub seed: u64,
    /// A phase not done after this long is cut off (reported with `done: false`).
    pub phase_cap_ms: Ms,
    pub rebalance: RebalanceConfig,
    /// How long a placement takes in virtual time. The leader loop waits up to
    /// [`PLACEMENT_WAIT_MS`] for it, then ticks on without it and moves nothing until it is
    /// ready, as the node's leader does.
    pub placement_time: PlacementTime,
}

impl ScaleConfig {
    /// `nodes` nodes, 16 shards each, the node's rebalance defaults, phases cut at 10 minutes.
    pub fn new(nodes: usize, seed: u64) -> Self {
        Self {
            nodes,
            shards_per_node: 16,
            seed,
            phase_cap_ms: 600_000,
            rebalance: RebalanceConfig::default(),
            placement_time: PlacementTime::Wall,
        }
    }
}

/// One phase's measurements.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub name: &'static str,
    /// Virtual time the phase took (to done, or to the cap).
    pub virtual_ms: Ms,
    pub done: bool,
    pub renewals_per_s: f64,
    pub grants_per_s: f64,
    pub raft_entries_per_s: f64,
    pub leader_ticks: u64,
    /// Wall time of one leader tick (membership, moves, the map copy), microseconds.
    pub tick_us_median: f64,
    pub tick_us_p99: f64,
    pub tick_us_max: f64,
    /// Wall time of the longest placement computed in the phase, milliseconds (0: none).
    pub placement_ms_max: f64,
    pub placements: u64,
    /// Mean wall time of one grant, nanoseconds.
    pub grant_ns_mean: f64,
    /// The leader's core work (ticks, grants, placements) per second of virtual time: the
    /// share of one CPU core the control plane's decisions take.
    pub leader_core_share: f64,
    /// Shards whose owner changed.
    pub moved: u64,
    /// The fewest moves any correct plan makes (the lost nodes' shards; a fair share for the
    /// joiners; none for a restart).
    pub ideal_moves: u64,
    /// From the fault until every shard was served (the whole phase for the restart).
    pub served_after_ms: Option<Ms>,
}

/// A run's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub nodes: usize,
    pub shards: u32,
    pub seed: u64,
    /// The cluster map as the Raft snapshot stores it (JSON), bytes.
    pub map_bytes: usize,
    /// One node's full scan of the map for changes (what its driver does per map change), µs.
    pub node_scan_us: f64,
    pub phases: Vec<Phase>,
}

#[derive(Debug)]
enum Ev {
    Renew(usize),
    GrantReq {
        n: usize,
        inc: u64,
        token: u64,
    },
    GrantReply {
        n: usize,
        inc: u64,
        token: u64,
        grant: Grant,
    },
    LeaderTick,
    /// The rest of a leader tick, after a placement it waited for: the moves, then the next tick.
    LeaderMoves {
        tick_started: Ms,
    },
    /// A placement computed beside the leader loop is ready.
    PlacementReady(PlacementCache),
    Deliver(usize),
    Feed {
        n: usize,
        inc: u64,
        shard: u32,
        ev: Event,
    },
    Restored {
        n: usize,
        inc: u64,
        shard: u32,
        epoch: u64,
        attempt: u64,
    },
    Report(Command),
    Revive(usize),
    Check,
}

struct Node {
    name: NodeId,
    alive: bool,
    /// Bumped by every kill: events of an earlier incarnation are dropped.
    inc: u64,
    holder: LeaseHolder,
    own: OwnershipCore<()>,
    /// Shards whose assignment changed since the last delivery.
    pending: BTreeSet<u32>,
    deliver_scheduled: bool,
    /// Shards the map names this node for (owner or handoff target).
    named: BTreeSet<u32>,
}

impl Node {
    fn new(name: NodeId, cfg: LeaseConfig, shards: u32) -> Self {
        Node {
            own: OwnershipCore::new(name.clone(), shards),
            name,
            alive: true,
            inc: 0,
            holder: LeaseHolder::new(cfg),
            pending: BTreeSet::new(),
            deliver_scheduled: false,
            named: BTreeSet::new(),
        }
    }
}

/// Counters of the phase in progress.
#[derive(Default)]
struct Acc {
    start: Ms,
    renewals: u64,
    grants: u64,
    entries: u64,
    ticks_us: Vec<f64>,
    placement_ms: Vec<f64>,
    grant_ns: u128,
    moved: u64,
}

/// The simulated cluster.
struct World {
    cfg: ScaleConfig,
    lease: LeaseConfig,
    rng: StdRng,
    now: Ms,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Ms, u64, usize)>>,
    events: Vec<Option<Ev>>,
    free: Vec<usize>,
    nodes: Vec<Node>,
    map: ClusterMap,
    leader: LeaderCore,
    /// Who serves each shard, at which epoch.
    served: Vec<Option<(usize, u64)>>,
    /// Per shard, every node the map ever named for it.
    ever_named: Vec<Vec<usize>>,
    /// A placement is computing beside the leader loop.
    placing: bool,
    acc: Acc,
}

impl World {
    /// `cfg.nodes` nodes, joined and up, shards not yet placed; node 0 leads term 1.
    pub fn new(cfg: ScaleConfig) -> Self {
        let lease = LeaseConfig::default();
        let shards = cfg.shards_per_node * cfg.nodes as u32;
        let base = Instant::now();
        let mut leader = LeaderCore::new("n0", lease, CONFIRMED_GRANT_WINDOW);
        leader.leading(1, base);
        let mut w = World {
            rng: StdRng::seed_from_u64(cfg.seed),
            lease,
            now: 0,
            base,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            free: Vec::new(),
            nodes: Vec::new(),
            map: ClusterMap::default(),
            leader,
            served: vec![None; shards as usize],
            ever_named: vec![Vec::new(); shards as usize],
            placing: false,
            acc: Acc::default(),
            cfg,
        };
        w.commit(Command::Init { shards });
        for _ in 0..w.cfg.nodes {
            let n = w.add_node();
            w.commit(Command::SetMemberState {
                name: w.nodes[n].name.clone(),
                state: MemberState::Up,
            });
        }
        w.schedule(0, Ev::LeaderTick);
        w
    }

    fn shards(&self) -> u32 {
        self.map.shards.len() as u32
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    fn schedule(&mut self, after: Ms, ev: Ev) {
        let slot = match self.free.pop() {
            Some(i) => {
                self.events[i] = Some(ev);
                i
            }
            None => {
                self.events.push(Some(ev));
                self.events.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq, slot)));
    }

    /// A new node joins the map and starts its renew loop.
    fn add_node(&mut self) -> usize {
        let n = self.nodes.len();
        let name = NodeId::from(format!("n{n}"));
        let shards = self.shards();
        self.nodes.push(Node::new(name.clone(), self.lease, shards));
        self.commit(Command::Join {
            name,
            addr: format!("10.0.{}.{}:7400", n / 250, n % 250),
            voter: n < 5,
        });
        let offset = self.rng.random_range(0..RENEW_TICK_MS);
        self.schedule(offset, Ev::Renew(n));
        n
    }

    fn index_of(name: &NodeId) -> usize {
        name.as_str()[1..].parse().unwrap_or(usize::MAX)
    }

    /// Commits `cmd` (Raft modelled as immediate) and tells the nodes it names.
    fn commit(&mut self, cmd: Command) -> CommandResponse {
        let mut touched = Vec::new();
        shards_of(&cmd, &mut touched);
        let before: Vec<_> = touched
            .iter()
            .map(|&s| self.map.shards.get(s as usize).cloned())
            .collect();
        let r = apply(&mut self.map, &cmd);
        self.map.applied_index += 1;
        self.acc.entries += 1;
        for (&s, old) in touched.iter().zip(before) {
            let Some(new) = self.map.shards.get(s as usize).cloned() else {
                continue;
            };
            let old_owner = old.as_ref().and_then(|a| a.owner.clone());
            if old_owner.is_some() && new.owner.is_some() && old_owner != new.owner {
                self.acc.moved += 1;
            }
            // Every node with a machine for the shard hears of it (a machine, once made,
            // stays), and the nodes it names now (which make one).
            let mut who: BTreeSet<usize> = self.ever_named[s as usize].iter().copied().collect();
            for name in [new.owner.as_ref(), new.handoff_to.as_ref()]
                .into_iter()
                .flatten()
            {
                let n = Self::index_of(name);
                if who.insert(n) {
                    self.ever_named[s as usize].push(n);
                }
            }
            for n in who {
                let Some(node) = self.nodes.get_mut(n) else {
                    continue;
                };
                let named = new.owner.as_ref() == Some(&node.name)
                    || new.handoff_to.as_ref() == Some(&node.name);
                if named {
                    node.named.insert(s);
                } else {
                    node.named.remove(&s);
                }
                node.pending.insert(s);
                if !node.deliver_scheduled && node.alive {
                    node.deliver_scheduled = true;
                    self.schedule(NET_MS, Ev::Deliver(n));
                }
            }
        }
        r
    }

    fn run_until(&mut self, done: impl Fn(&mut World) -> bool, cap: Ms) -> (Ms, bool) {
        let start = self.now;
        self.schedule(CHECK_MS, Ev::Check);
        while let Some(Reverse((at, _, slot))) = self.queue.pop() {
            self.now = at;
            let Some(ev) = self.events[slot].take() else {
                continue;
            };
            self.free.push(slot);
            if let Ev::Check = ev {
                if done(self) {
                    return (self.now - start, true);
                }
                if self.now - start >= cap {
                    return (self.now - start, false);
                }
                self.schedule(CHECK_MS, Ev::Check);
                continue;
            }
            self.step(ev);
        }
        (self.now - start, false)
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Renew(n) => self.renew(n),
            Ev::GrantReq { n, inc, token } => {
                self.acc.renewals += 1;
                let t = Instant::now();
                let r =
                    self.leader
                        .grant(&self.nodes[n].name, self.instant(), self.map.applied_index);
                self.acc.grant_ns += t.elapsed().as_nanos();
                if let Ok(grant) = r {
                    self.acc.grants += 1;
                    let delay = if n == 0 { 0 } else { NET_MS };
                    self.schedule(
                        delay,
                        Ev::GrantReply {
                            n,
                            inc,
                            token,
                            grant,
                        },
                    );
                }
            }
            Ev::GrantReply {
                n,
                inc,
                token,
                grant,
            } => {
                let now = self.instant();
                let node = &mut self.nodes[n];
                if node.alive && node.inc == inc {
                    node.holder
                        .on_grant(now, token, grant.ttl, grant.term, grant.map_index);
                }
            }
            Ev::LeaderTick => self.leader_tick(),
            Ev::LeaderMoves { tick_started } => self.leader_moves(tick_started),
            Ev::PlacementReady(cache) => {
                self.placing = false;
                self.leader.offer_placement(cache);
            }
            Ev::Deliver(n) => self.deliver(n),
            Ev::Feed { n, inc, shard, ev } => {
                if self.nodes[n].alive && self.nodes[n].inc == inc {
                    let now = self.instant();
                    let fx = self.nodes[n].own.feed(now, shard, ev);
                    self.effects(n, shard, fx);
                }
            }
            Ev::Restored {
                n,
                inc,
                shard,
                epoch,
                attempt,
            } => {
                if self.nodes[n].alive && self.nodes[n].inc == inc {
                    let now = self.instant();
                    let (fx, _) = self.nodes[n]
                        .own
                        .on_restored(now, shard, epoch, attempt, (), 1);
                    self.effects(n, shard, fx);
                }
            }
            Ev::Report(cmd) => {
                self.commit(cmd);
            }
            Ev::Revive(n) => self.revive(n),
            Ev::Check => {}
        }
    }

    /// The node's renew loop: lease validity to the ownership core, a renewal when due.
    fn renew(&mut self, n: usize) {
        let now = self.instant();
        let index = self.map.applied_index;
        let node = &mut self.nodes[n];
        if !node.alive {
            return;
        }
        let inc = node.inc;
        node.holder.poll_expired(now);
        node.holder.set_acted(now, index);
        let valid = node.holder.may_serve(now);
        node.holder.take_edges(now);
        let fx = node.own.on_lease(now, valid);
        let due = node.holder.renew_due(now);
        let token = due.then(|| node.holder.on_send(now));
        for (shard, e) in fx {
            self.effects(n, shard, vec![e]);
        }
        if let Some(token) = token {
            let delay = if n == 0 { 0 } else { NET_MS };
            self.schedule(delay, Ev::GrantReq { n, inc, token });
        }
        self.schedule(RENEW_TICK_MS, Ev::Renew(n));
    }

    /// The changed shards reach the node's ownership core.
    fn deliver(&mut self, n: usize) {
        let now = self.instant();
        let node = &mut self.nodes[n];
        node.deliver_scheduled = false;
        if !node.alive {
            return;
        }
        let pending = std::mem::take(&mut node.pending);
        let change = node.own.on_shards(now, &self.map, pending);
        for (shard, e) in change.effects {
            self.effects(n, shard, vec![e]);
        }
    }

    /// Carries out a node's effects for one shard, as the ownership driver does.
    fn effects(&mut self, n: usize, shard: u32, fx: Vec<Effect>) {
        let inc = self.nodes[n].inc;
        for e in fx {
            match e {
                Effect::StopAccepting | Effect::DeliverBuffered | Effect::StaleIgnored => {}
                Effect::WaitInflight => self.schedule(
                    DRAIN_MS,
                    Ev::Feed {
                        n,
                        inc,
                        shard,
                        ev: Event::InflightDrained,
                    },
                ),
                Effect::WriteCheckpoint { epoch } => self.schedule(
                    CHECKPOINT_MS,
                    Ev::Feed {
                        n,
                        inc,
                        shard,
                        ev: Event::CheckpointWritten { epoch, seq: 0 },
                    },
                ),
                Effect::ReportHandoffDone { epoch, .. } => {
                    if let Some(cmd) = self.nodes[n].own.handoff_commit(shard, epoch) {
                        self.schedule(NET_MS, Ev::Report(cmd));
                    }
                }
                Effect::Restore { epoch, attempt } => self.schedule(
                    RESTORE_MS,
                    Ev::Restored {
                        n,
                        inc,
                        shard,
                        epoch,
                        attempt,
                    },
                ),
                Effect::CheckFence { epoch, attempt } => self.schedule(
                    NET_MS,
                    Ev::Restored {
                        n,
                        inc,
                        shard,
                        epoch,
                        attempt,
                    },
                ),
                Effect::StartServing { epoch } => {
                    let _ = self.nodes[n].own.take_restored(shard, epoch);
                    self.served[shard as usize] = Some((n, epoch));
                }
                Effect::Resume { epoch } => self.served[shard as usize] = Some((n, epoch)),
                Effect::StopServing { .. } => {
                    if self.served[shard as usize].is_some_and(|(m, _)| m == n) {
                        self.served[shard as usize] = None;
                    }
                }
            }
        }
    }

    /// The leader loop's step: quorum confirmed, membership, placement, moves. A placement
    /// holds the moves back for the time it takes (see [`ScaleConfig::placement_time`]).
    fn leader_tick(&mut self) {
        let now = self.instant();
        let tick_started = self.now;
        self.leader.confirmed(now);
        let t = Instant::now();
        let map = self.map.clone();
        let decided = self.leader.membership(&map, now, now);
        let mut spent = t.elapsed();
        for c in decided.commands {
            self.commit(c);
        }
        let t = Instant::now();
        let needed = self
            .leader
            .placement_needed(&self.map, now, &self.cfg.rebalance);
        spent += t.elapsed();
        self.acc.ticks_us.push(spent.as_secs_f64() * 1e6);
        // As `actors/src/leader.rs`: a needed placement computes beside the loop; the tick
        // waits up to PLACEMENT_WAIT_MS for it, then goes on without it (no moves until it is
        // offered; confirmations and grants carry on).
        let mut wait = 0;
        if let (Some((shards, eligible)), false) = (needed, self.placing) {
            let t = Instant::now();
            let mut cache = PlacementCache::default();
            let _ = cache.assign(shards, &eligible, self.cfg.rebalance.eps);
            let took = t.elapsed();
            self.acc.placement_ms.push(took.as_secs_f64() * 1e3);
            let took = match self.cfg.placement_time {
                PlacementTime::Wall => took.as_millis() as Ms,
                PlacementTime::Fixed(ms) => ms,
            };
            if took <= PLACEMENT_WAIT_MS {
                self.leader.offer_placement(cache);
                wait = took;
            } else {
                self.placing = true;
                self.schedule(took, Ev::PlacementReady(cache));
                wait = PLACEMENT_WAIT_MS;
            }
        }
        if wait == 0 {
            self.leader_moves(tick_started);
        } else {
            self.schedule(wait, Ev::LeaderMoves { tick_started });
        }
    }

    /// The moves of a leader tick (against the map as it is now), then the next tick: 100 ms
    /// after this one began, or at once if the step took longer (tokio's `Delay` behaviour).
    fn leader_moves(&mut self, tick_started: Ms) {
        let now = self.instant();
        let t = Instant::now();
        let map = self.map.clone();
        let moves = self.leader.moves(&map, now, &self.cfg.rebalance);
        let spent = t.elapsed().as_secs_f64() * 1e6;
        if let Some(last) = self.acc.ticks_us.last_mut() {
            *last += spent;
        }
        for (_, c) in moves {
            self.commit(c);
        }
        let next = (tick_started + LEADER_TICK_MS).saturating_sub(self.now);
        self.schedule(next, Ev::LeaderTick);
    }

    fn kill(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.alive = false;
        node.inc += 1;
        node.pending.clear();
        for s in self.served.iter_mut() {
            if s.is_some_and(|(m, _)| m == n) {
                *s = None;
            }
        }
    }

    /// A killed node starts again: a fresh lease holder and ownership core, told its shards.
    fn revive(&mut self, n: usize) {
        let shards = self.shards();
        let node = &mut self.nodes[n];
        node.alive = true;
        node.holder = LeaseHolder::new(self.lease);
        node.own = OwnershipCore::new(node.name.clone(), shards);
        node.pending = node.named.clone();
        node.deliver_scheduled = true;
        let name = node.name.clone();
        self.commit(Command::Join {
            name,
            addr: format!("10.0.{}.{}:7400", n / 250, n % 250),
            voter: n < 5,
        });
        self.schedule(0, Ev::Deliver(n));
        self.schedule(0, Ev::Renew(n));
    }

    /// Every shard served, at the map's epoch, by the live owner the map names, lease valid.
    fn all_served(&mut self) -> bool {
        let now = self.instant();
        let mut valid = vec![None; self.nodes.len()];
        for (s, a) in self.map.shards.iter().enumerate() {
            let Some(owner) = a.owner.as_ref().map(Self::index_of) else {
                return false;
            };
            if self.served[s] != Some((owner, a.epoch)) || !self.nodes[owner].alive {
                return false;
            }
            let v = *valid[owner].get_or_insert_with(|| self.nodes[owner].holder.is_valid(now));
            if !v {
                return false;
            }
        }
        true
    }

    /// Every shard served where placement wants it: nothing handing off, the placement for
    /// the current members offered, and no move left to make.
    fn balanced(&mut self) -> bool {
        if !self.all_served() || self.map.shards.iter().any(|a| a.handoff_to.is_some()) {
            return false;
        }
        let now = self.instant();
        let map = self.map.clone();
        let rcfg = self.cfg.rebalance;
        self.leader.placement_needed(&map, now, &rcfg).is_none()
            && self.leader.moves(&map, now, &rcfg).is_empty()
    }

    fn owned_by(&self, n: usize) -> u64 {
        let name = &self.nodes[n].name;
        self.map
            .shards
            .iter()
            .filter(|a| a.owner.as_ref() == Some(name))
            .count() as u64
    }

    fn finish(&mut self, name: &'static str, took: (Ms, bool), ideal: u64) -> Phase {
        let acc = std::mem::take(&mut self.acc);
        self.acc.start = self.now;
        let secs = (self.now - acc.start).max(1) as f64 / 1000.0;
        let mut ticks = acc.ticks_us.clone();
        ticks.sort_by(f64::total_cmp);
        let q = |p: f64| {
            ticks
                .get(((ticks.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let placement_total: f64 = acc.placement_ms.iter().sum();
        let core_s = acc.ticks_us.iter().sum::<f64>() / 1e6
            + acc.grant_ns as f64 / 1e9
            + placement_total / 1e3;
        Phase {
            name,
            virtual_ms: took.0,
            done: took.1,
            renewals_per_s: acc.renewals as f64 / secs,
            grants_per_s: acc.grants as f64 / secs,
            raft_entries_per_s: acc.entries as f64 / secs,
            leader_ticks: ticks.len() as u64,
            tick_us_median: q(0.5),
            tick_us_p99: q(0.99),
            tick_us_max: q(1.0),
            placement_ms_max: acc.placement_ms.iter().copied().fold(0.0, f64::max),
            placements: acc.placement_ms.len() as u64,
            grant_ns_mean: acc.grant_ns as f64 / acc.renewals.max(1) as f64,
            leader_core_share: core_s / secs,
            moved: acc.moved,
            ideal_moves: ideal,
            served_after_ms: took.1.then_some(took.0),
        }
    }

    /// Runs the whole scenario.
    pub fn run(mut self) -> Report {
        let cap = self.cfg.phase_cap_ms;
        let mut phases = Vec::new();
        let took = self.run_until(World::balanced, cap);
        let shards = u64::from(self.shards());
        let mut p = self.finish("bootstrap", took, 0);
        p.moved = 0;
        p.ideal_moves = 0;
        phases.push(p);
        if !took.1 {
            return self.report(phases);
        }

        let end = self.now + STEADY_MS;
        let took = self.run_until(move |w| w.now >= end, STEADY_MS * 2);
        let mut p = self.finish("steady", took, 0);
        p.served_after_ms = None;
        phases.push(p);

        // Kill 1 %: their shards are what must move.
        let mut victims: Vec<usize> = (1..self.nodes.len()).collect();
        victims.shuffle(&mut self.rng);
        victims.truncate((self.cfg.nodes / 100).max(1));
        let ideal: u64 = victims.iter().map(|&n| self.owned_by(n)).sum();
        for &n in &victims {
            self.kill(n);
        }
        let took = self.run_until(World::all_served, cap);
        phases.push(self.finish("kill 1%", took, ideal));
        // Let the leader finish anything the failover left (no new fault yet).
        let _ = self.run_until(World::balanced, cap);
        self.acc = Acc {
            start: self.now,
            ..Acc::default()
        };

        // Join 10 %: a fair share of the shards moves to the joiners.
        let joiners = (self.cfg.nodes / 10).max(1);
        let live = self.nodes.iter().filter(|n| n.alive).count() + joiners;
        let ideal = shards * joiners as u64 / live as u64;
        let first = self.nodes.len();
        for _ in 0..joiners {
            self.add_node();
        }
        let took = self.run_until(
            move |w| {
                let up = w.nodes[first..].iter().all(|n| {
                    w.map
                        .members
                        .get(&n.name)
                        .is_some_and(|m| m.state == MemberState::Up)
                });
                up && w.balanced()
            },
            cap,
        );
        phases.push(self.finish("join 10%", took, ideal));
        if !took.1 {
            return self.report(phases);
        }

        // Rolling restart as the node does it, 1 % at a time, two rounds: each node drains (its
        // shards handed off), stops, is gone for RESTART_MS, starts again and joins; the round
        // ends when the restarted nodes are up and every shard is served where placement wants.
        let mut order: Vec<usize> = (1..self.nodes.len())
            .filter(|&n| self.nodes[n].alive)
            .collect();
        order.shuffle(&mut self.rng);
        let batch = (order.len() / 100).max(1);
        for (round, chunk) in order.chunks(batch).take(2).enumerate() {
            let ideal: u64 = 2 * chunk.iter().map(|&n| self.owned_by(n)).sum::<u64>();
            let start = self.now;
            for &n in chunk {
                self.commit(Command::SetMemberState {
                    name: self.nodes[n].name.clone(),
                    state: MemberState::Draining,
                });
            }
            let leaving = chunk.to_vec();
            let (_, drained) = self.run_until(
                move |w| leaving.iter().all(|&n| w.nodes[n].named.is_empty()),
                cap,
            );
            let mut done = false;
            if drained {
                for &n in chunk {
                    self.kill(n);
                    self.schedule(RESTART_MS, Ev::Revive(n));
                }
                let back = chunk.to_vec();
                done = self
                    .run_until(
                        move |w| {
                            back.iter().all(|&n| {
                                w.map
                                    .members
                                    .get(&w.nodes[n].name)
                                    .is_some_and(|m| m.state == MemberState::Up)
                            }) && w.balanced()
                        },
                        cap,
                    )
                    .1;
            }
            let name = if round == 0 {
                "restart round 1"
            } else {
                "restart round 2"
            };
            let mut p = self.finish(name, (self.now - start, done), ideal);
            p.served_after_ms = done.then_some(self.now - start);
            phases.push(p);
            if !done {
                break;
            }
        }
        self.report(phases)
    }

    fn report(&mut self, phases: Vec<Phase>) -> Report {
        let map_bytes = serde_json::to_vec(&self.map).map_or(0, |v| v.len());
        // One node's driver scanning the whole map for changes, as it does per map change.
        let mut own: OwnershipCore<()> =
            OwnershipCore::new(self.nodes[1].name.clone(), self.shards());
        let now = self.instant();
        own.on_map(now, &self.map);
        let runs = 5;
        let t = Instant::now();
        for _ in 0..runs {
            own.on_map(now, &self.map);
        }
        let node_scan_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(runs);
        Report {
            nodes: self.cfg.nodes,
            shards: self.shards(),
            seed: self.cfg.seed,
            map_bytes,
            node_scan_us,
            phases,
        }
    }
}

/// The shards a command's assignments touch.
fn shards_of(cmd: &Command, out: &mut Vec<u32>) {
    match cmd {
        Command::Assign { shard, .. } => out.push(*shard),
        Command::Batch(cmds) => {
            for c in cmds {
                shards_of(c, out);
            }
        }
        _ => {}
    }
}

/// Runs one cluster size through the scenario.
pub fn run(cfg: ScaleConfig) -> Report {
    World::new(cfg).run()
}

#[cfg(test)]
#[path = "scale_tests.rs"]
mod tests;

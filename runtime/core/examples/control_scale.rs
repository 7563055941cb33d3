//! How the control plane's cost grows with the cluster: the real leader core (`LeaderCore`:
//! grants, failure detection, promotion), the real rebalancing (`rebalance_commands` over
//! `rebalance::plan` and `placement`) and the real map state machine (`apply`), driven in virtual
//! time for N nodes and 16 N shards. Every node renews every 500 ms (staggered); the leader ticks
//! every 100 ms; an owner finishes a graceful handoff one tick after it began (the node's
//! checkpoint and report, idealised as instant). Raft is one log: every command the leader
//! proposes is an entry.
//!
//! Phases: form (every shard placed, nothing moving), kill 1 % of the nodes (no more renewals),
//! a join wave of 10 % new nodes, then two rounds of a rolling restart in batches of 1 %
//! (drain, 3 s without renewals, back). Per size it prints one CSV row: grants per second at the
//! leader, Raft entries per second in each phase, the map's size (JSON, as snapshots are
//! written), the leader's CPU time per tick (measured around the core calls, median and max),
//! the CPU share of one core that leasing and ticking take, shards moved against the ideal, and
//! the virtual time until every shard was served by a live node after the kill, and the time
//! of each placement computation (done off the grant lock, as the node's leader does).
//!
//! Run: `cargo run --release -p tidepool-core --example control_scale [SIZES...]`
//! (default 10 100 1000 10000); `benches/scale_plot.py` draws the CSV as a PNG.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tidepool_core::node_id::NodeId;

use tidepool_core::control::{apply, ClusterMap, Command, MemberState};
use tidepool_core::leader_core::LeaderCore;
use tidepool_core::lease::LeaseConfig;
use tidepool_core::placement::PlacementCache;
use tidepool_core::rebalance::RebalanceConfig;

const TICK: Duration = Duration::from_millis(100);

struct Run {
    map: ClusterMap,
    core: LeaderCore,
    base: Instant,
    /// Virtual milliseconds since `base`.
    t: u64,
    nodes: Vec<NodeId>,
    dead: BTreeSet<NodeId>,
    rcfg: RebalanceConfig,
    entries: u64,
    grants: u64,
    tick_ns: Vec<u64>,
    /// Each placement computation (off the grant lock).
    placement_ns: Vec<u64>,
    grant_ns: u64,
    moves: u64,
}

impl Run {
    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.t)
    }

    fn propose(&mut self, cmd: &Command) {
        self.entries += 1;
        apply(&mut self.map, cmd);
    }

    /// One leader tick: renewals due in this tick, then the leader's step.
    fn tick(&mut self) {
        let now = self.now();
        self.core.confirmed(now);
        let index = self.entries;
        // Renewals: node i renews when (t / 100) % 5 == i % 5 (every 500 ms, staggered).
        let slot = (self.t / 100) % 5;
        let started = Instant::now();
        for (i, n) in self.nodes.iter().enumerate() {
            if i as u64 % 5 == slot
                && !self.dead.contains(n)
                && self.core.grant(n, now, index).is_ok()
            {
                self.grants += 1;
            }
        }
        self.grant_ns += started.elapsed().as_nanos() as u64;
        // Owners finish the handoffs begun last tick (checkpoint + report).
        let done: Vec<Command> = self
            .map
            .shards
            .iter()
            .enumerate()
            .filter_map(|(s, a)| {
                let to = a.handoff_to.clone()?;
                Some(Command::Assign {
                    shard: s as u32,
                    expect_epoch: a.epoch,
                    owner: Some(to),
                    epoch: a.epoch + 1,
                    handoff_to: None,
                })
            })
            .filter(|c| match c {
                Command::Assign { shard, .. } => !self.map.shards[*shard as usize]
                    .owner
                    .as_ref()
                    .is_some_and(|o| self.dead.contains(o)),
                _ => true,
            })
            .collect();
        for c in &done {
            self.propose(c);
        }
        // The leader's step, timed around the core calls only.
        let started = Instant::now();
        let decided = self.core.membership(&self.map, now, now);
        let mut elapsed = started.elapsed();
        for c in &decided.commands {
            self.propose(c);
        }
        // A new placement is computed off the grant lock, as the node's leader does; timed
        // apart (it delays the rebalancing, not the grants).
        if let Some((shards, eligible)) = self.core.placement_needed(&self.map, now, &self.rcfg) {
            let started = Instant::now();
            let mut cache = PlacementCache::default();
            let _ = cache.assign(shards, &eligible, self.rcfg.eps);
            self.placement_ns.push(started.elapsed().as_nanos() as u64);
            self.core.offer_placement(cache);
        }
        let started = Instant::now();
        let moves = self.core.moves(&self.map, now, &self.rcfg);
        elapsed += started.elapsed();
        self.tick_ns.push(elapsed.as_nanos() as u64);
        for (_, c) in &moves {
            self.propose(c);
        }
        self.moves += moves.len() as u64;
        self.t += TICK.as_millis() as u64;
    }

    fn settled(&self) -> bool {
        self.map.shards.iter().all(|a| {
            a.handoff_to.is_none() && a.owner.as_ref().is_some_and(|o| !self.dead.contains(o))
        }) && self
            .map
            .members
            .values()
            .all(|m| m.state == MemberState::Up || self.dead.contains(&m.name))
    }

    /// Ticks until settled and nothing moved for a second, or `limit` ticks.
    fn run_until_settled(&mut self, limit: u64) -> Option<u64> {
        let start = self.t;
        let mut quiet = 0;
        let mut served_at = None;
        while self.t - start < limit * TICK.as_millis() as u64 {
            let moves = self.moves;
            self.tick();
            if self.settled() {
                served_at.get_or_insert(self.t - start);
                quiet += if self.moves == moves { 1 } else { 0 };
                if quiet >= 10 {
                    return served_at;
                }
            } else {
                quiet = 0;
            }
        }
        served_at
    }

    fn join(&mut self, name: NodeId) {
        self.propose(&Command::Join {
            name: name.clone(),
            addr: format!("{name}:7400"),
            voter: false,
        });
        self.nodes.push(name);
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 100, 1000, 10_000]
    } else {
        sizes
    };
    println!(
        "nodes,shards,grants_per_s,map_bytes,tick_us_median,tick_us_max,grant_us_per_s,leader_cpu_share,\
         entries_per_s_form,entries_per_s_kill,entries_per_s_join,kill_moved,kill_ideal,\
         served_after_kill_ms,join_moved,join_ideal,join_settled_s,roll_batch,roll_round_s,\
         roll_moved_per_round,roll_ideal_per_round,entries_per_s_roll,roll_settled,placements_computed,\
         placement_ms_median,placement_ms_max"
    );
    for n in sizes {
        let shards = 16 * n as u32;
        let cfg = LeaseConfig::default();
        let base = Instant::now();
        let mut r = Run {
            map: ClusterMap::default(),
            core: LeaderCore::new("n00000", cfg, Duration::from_millis(300)),
            base,
            t: 0,
            nodes: Vec::new(),
            dead: BTreeSet::new(),
            rcfg: RebalanceConfig {
                max_concurrent_handoffs: 4,
                eps: 0.25,
            },
            entries: 0,
            grants: 0,
            tick_ns: Vec::new(),
            placement_ns: Vec::new(),
            grant_ns: 0,
            moves: 0,
        };
        r.core.leading(1, base);
        r.propose(&Command::Init { shards });
        for i in 0..n {
            r.join(format!("n{i:05}").into());
        }
        // Form: every node joins, renews, is promoted; the shards are placed.
        r.run_until_settled(100);
        let (form_entries, form_t) = (r.entries, r.t);
        let map_bytes = serde_json::to_vec(&r.map).map_or(0, |b| b.len());

        // Kill 1 % (at least one node, never the leader).
        let kill = (n / 100).max(1);
        let victims: Vec<NodeId> = r.nodes.iter().rev().take(kill).cloned().collect();
        let ideal_kill = r
            .map
            .shards
            .iter()
            .filter(|a| a.owner.as_ref().is_some_and(|o| victims.contains(o)))
            .count() as u64;
        r.dead.extend(victims);
        let (e0, t0, m0) = (r.entries, r.t, r.moves);
        r.tick_ns.clear();
        r.grants = 0;
        r.grant_ns = 0;
        let served = r.run_until_settled(100);
        let (kill_entries, kill_t, kill_moves) = (r.entries - e0, r.t - t0, r.moves - m0);
        let secs = (kill_t as f64 / 1000.0).max(0.001);
        let grants_per_s = r.grants as f64 / secs;
        let grant_us_per_s = r.grant_ns as f64 / 1000.0 / secs;

        // A join wave of 10 % (at least one node).
        let join = (n / 10).max(1);
        let (e1, t1, m1) = (r.entries, r.t, r.moves);
        for i in 0..join {
            r.join(format!("j{i:05}").into());
        }
        let live = (r.nodes.len() - r.dead.len()) as u64;
        let ideal_join = u64::from(shards) * join as u64 / live;
        // At most 30 virtual seconds: the rate is what scales (the handoffs are paced).
        let settled = r.run_until_settled(300);
        let (join_entries, join_t, join_moves) = (r.entries - e1, r.t - t1, r.moves - m1);

        // A rolling restart in batches of 1 % (at least one node, never the leader): a batch
        // drains, stops renewing for 3 s (the restart), renews again and takes shards back. The
        // first two rounds are measured; the others repeat them.
        let batch = (n / 100).max(1);
        let (e2, t2, m2) = (r.entries, r.t, r.moves);
        let mut rounds = 0u64;
        let mut roll_ok = true;
        for round in 0..2usize {
            let live: Vec<NodeId> = r
                .nodes
                .iter()
                .filter(|x| !r.dead.contains(*x))
                .cloned()
                .collect();
            let names: Vec<NodeId> = live
                .iter()
                .skip(1 + round * batch)
                .take(batch)
                .cloned()
                .collect();
            if names.is_empty() {
                break;
            }
            for x in &names {
                r.propose(&Command::SetMemberState {
                    name: x.clone(),
                    state: MemberState::Draining,
                });
            }
            let owns = |r: &Run| {
                r.map.shards.iter().any(|a| {
                    a.owner.as_ref().is_some_and(|o| names.contains(o))
                        || a.handoff_to.as_ref().is_some_and(|o| names.contains(o))
                })
            };
            let mut ticks = 0;
            while owns(&r) && ticks < 3000 {
                r.tick();
                ticks += 1;
            }
            r.dead.extend(names.iter().cloned());
            for _ in 0..30 {
                r.tick();
            }
            for x in &names {
                r.dead.remove(x);
            }
            roll_ok &= ticks < 3000 && r.run_until_settled(3000).is_some();
            rounds += 1;
        }
        let (roll_entries, roll_t, roll_moves) = (r.entries - e2, r.t - t2, r.moves - m2);
        let rounds_f = rounds.max(1) as f64;
        // Ticks from the kill on (kill, join wave, rolling restart), under the grant lock.
        let mut ticks = r.tick_ns.clone();
        let tick_med = median(&mut ticks) / 1000;
        let tick_max = ticks.last().copied().unwrap_or(0) / 1000;
        // Share of one core: the tick's core calls ten times a second, plus the grants.
        let cpu_share = (tick_med as f64 * 10.0 + grant_us_per_s) / 1e6;
        let mut placements = r.placement_ns.clone();
        let placement_ms_med = median(&mut placements) as f64 / 1e6;
        let placement_ms_max = placements.last().copied().unwrap_or(0) as f64 / 1e6;
        let roll_ideal = 2 * u64::from(shards) * batch as u64 / live.max(1);

        println!(
            "{n},{shards},{grants_per_s:.0},{map_bytes},{tick_med},{tick_max},{grant_us_per_s:.0},{cpu_share:.4},\
             {:.1},{:.1},{:.1},{kill_moves},{ideal_kill},{},{join_moves},{ideal_join},{},\
             {batch},{:.1},{:.0},{roll_ideal},{:.1},{},{},{placement_ms_med:.1},{placement_ms_max:.1}",
            form_entries as f64 / (form_t as f64 / 1000.0).max(0.001),
            kill_entries as f64 / secs,
            join_entries as f64 / (join_t as f64 / 1000.0).max(0.001),
            served.map_or("never".to_string(), |ms| ms.to_string()),
            match settled {
                Some(_) => format!("{:.1}", join_t as f64 / 1000.0),
                None => format!(">{:.0}", join_t as f64 / 1000.0),
            },
            roll_t as f64 / 1000.0 / rounds_f,
            roll_moves as f64 / rounds_f,
            roll_entries as f64 / (roll_t as f64 / 1000.0).max(0.001),
            if roll_ok { "yes" } else { "no" },
            r.core.placements_computed(),
        );
    }
}

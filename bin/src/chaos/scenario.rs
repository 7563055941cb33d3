//! Chaos scenario files (`config/chaos/*.toml`): the cluster, the workload, and the faults on a
//! schedule. Every error names the key.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub scenario: Meta,
    pub workload: Workload,
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub converge: Converge,
    /// Wall-clock skew per node name, in milliseconds (libfaketime; monotonic time untouched).
    #[serde(default)]
    pub skew_ms: std::collections::BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "five")]
    pub nodes: usize,
    #[serde(default = "three")]
    pub voters: usize,
    #[serde(default = "shards")]
    pub shards: u32,
    /// Seeds of the long run (`--matrix`); `--seed N` replays one.
    #[serde(default = "three_u64")]
    pub seeds: u64,
    /// Only runs with `--netns` (it injects kernel-level faults: `link_down`). A matrix without
    /// `--netns` skips it and says so.
    #[serde(default)]
    pub needs_netns: bool,
}

fn five() -> usize {
    5
}
fn three() -> usize {
    3
}
fn three_u64() -> u64 {
    3
}
fn shards() -> u32 {
    32
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Idempotent increments, every acknowledgement recorded.
    pub ops: u64,
    #[serde(default = "keys")]
    pub keys: u64,
    #[serde(default = "concurrency")]
    pub concurrency: usize,
    /// Also train logistic regression (synchronous SGD) and compare with the fault-free model.
    #[serde(default)]
    pub training: bool,
}

fn keys() -> u64 {
    200
}
fn concurrency() -> usize {
    16
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// SIGKILL; restarted after `restart_after_ms` if given.
    Kill,
    /// SIGSTOP for `duration_ms`, then SIGCONT.
    Pause,
    /// `cluster drain` (graceful), then SIGTERM.
    Drain,
    /// A new node joins.
    Join,
    /// The target cannot talk to anyone (both ways) for `duration_ms`.
    Isolate,
    /// The first `minority` nodes are cut off from the rest for `duration_ms`.
    Split,
    /// The target's datagrams to `peer` are dropped (one way) for `duration_ms`.
    OneWay,
    /// Loss, delay, jitter (reordering) and duplication on every link for `duration_ms`.
    Netem,
    /// Hostile peers against the target: refused handshakes, a connection flood, garbage
    /// datagrams, malformed frames.
    Hostile,
    /// Storage faults on the target: write errors at `drop_rate`, writes delayed `delay_ms`,
    /// for `duration_ms`.
    Storage,
    /// `--netns` only: the target's link set down (no traffic at all, clients' included) for
    /// `duration_ms`.
    LinkDown,
    /// Graceful restart: SIGTERM (the node hands its shards off and exits 0), started again at
    /// once with the same identity, then ready (one step of a rolling restart).
    Restart,
    /// CPU starvation of every node, as Kubernetes CPU limits do it, for `duration_ms` (absent:
    /// until the run ends, checks and shutdown included): each
    /// node's process limited to `cpu_percent` of a core (cgroup quota; busy threads where no
    /// cgroup can be written), and SIGSTOP stalls of 1..=`stall_max_ms` ms of a random node about
    /// every `stall_every_ms`. Nodes started meanwhile are starved too.
    Starve,
}

impl Kind {
    /// A network fault (it lasts `duration_ms`, then the network heals).
    pub fn is_network(self) -> bool {
        self.is_partition() || matches!(self, Kind::Netem | Kind::LinkDown)
    }

    /// A partition: the fault-injecting socket on loopback, nftables DROP rules with `--netns`.
    pub fn is_partition(self) -> bool {
        matches!(self, Kind::Isolate | Kind::Split | Kind::OneWay)
    }
}

/// One fault on the schedule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Milliseconds after the workload starts.
    pub at_ms: u64,
    pub kind: Kind,
    /// `random` (seeded), `leader`, `coordinator`, `non_voter`, or a node name.
    #[serde(default = "random")]
    pub target: String,
    /// For one-way partitions: the peer that stops hearing the target.
    pub peer: Option<String>,
    pub duration_ms: Option<u64>,
    pub restart_after_ms: Option<u64>,
    pub minority: Option<usize>,
    #[serde(default)]
    pub drop_rate: f64,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub jitter_ms: u64,
    #[serde(default)]
    pub duplicate_rate: f64,
    /// For `storage`: checkpoint writes sleep this much longer (and show a marker file meanwhile).
    #[serde(default)]
    pub checkpoint_delay_ms: u64,
    /// For `kill`: wait (up to 30 s) until the target is in the middle of writing a checkpoint
    /// (it needs a `storage` fault with `checkpoint_delay_ms` on it), then kill.
    #[serde(default)]
    pub during_checkpoint: bool,
    /// For `starve`: CPU per node, percent of one core.
    pub cpu_percent: Option<u32>,
    /// For `starve`: mean gap between SIGSTOP stalls (0 or absent: none).
    #[serde(default)]
    pub stall_every_ms: u64,
    /// For `starve`: longest stall.
    #[serde(default)]
    pub stall_max_ms: u64,
}

fn random() -> String {
    "random".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Converge {
    /// After healing, every shard must be served by a live node within this bound.
    #[serde(default = "converge_ms")]
    pub timeout_ms: u64,
}

impl Default for Converge {
    fn default() -> Self {
        Converge {
            timeout_ms: converge_ms(),
        }
    }
}

fn converge_ms() -> u64 {
    60_000
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))?;
        s.validate()
            .with_context(|| format!("scenario {}", path.display()))?;
        Ok(s)
    }

    fn validate(&self) -> Result<()> {
        let m = &self.scenario;
        if m.nodes == 0 || m.voters == 0 || m.voters > m.nodes {
            bail!("scenario.voters must be in 1..=scenario.nodes");
        }
        if m.shards == 0 {
            bail!("scenario.shards must be at least 1");
        }
        for (i, f) in self.faults.iter().enumerate() {
            let needs_duration =
                matches!(f.kind, Kind::Pause | Kind::Storage) || f.kind.is_network();
            if needs_duration && f.duration_ms.is_none() {
                bail!("fault[{i}].duration_ms is required for {:?}", f.kind);
            }
            if f.kind == Kind::Split && f.minority.is_none_or(|k| k == 0 || k >= m.nodes) {
                bail!("fault[{i}].minority must be in 1..scenario.nodes");
            }
            if f.kind == Kind::OneWay && f.peer.is_none() {
                bail!("fault[{i}].peer is required for one_way");
            }
            if f.during_checkpoint && f.kind != Kind::Kill {
                bail!("fault[{i}].during_checkpoint only applies to kill");
            }
            if f.kind == Kind::Starve {
                crate::starve::StarveSpec {
                    cpu_percent: f.cpu_percent.unwrap_or(100),
                    stall_every_ms: f.stall_every_ms,
                    stall_max_ms: f.stall_max_ms,
                }
                .validate()
                .with_context(|| format!("fault[{i}] (starve)"))?;
            }
            if f.kind == Kind::LinkDown && !m.needs_netns {
                bail!("fault[{i}] is link_down: set scenario.needs_netns = true");
            }
        }
        Ok(())
    }
}

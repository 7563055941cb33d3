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

/// Which node a fault hits.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A running node drawn by the run's seeded RNG.
    #[default]
    Random,
    /// The control plane's leader at that moment.
    Leader,
    /// The node coordinating the scenario's training job.
    Coordinator,
    /// A running node that is not a control-plane voter.
    NonVoter,
    /// This node, by name.
    #[serde(untagged)]
    Node(String),
}

/// One fault on the schedule: when, and what (`kind = "..."` and that kind's own keys; a key
/// another kind takes is refused by name).
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    /// Milliseconds after the workload starts.
    pub at_ms: u64,
    #[serde(flatten)]
    pub what: What,
}

/// What a fault does, with the settings only it takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum What {
    /// SIGKILL; restarted after `restart_after_ms` if given. With `during_checkpoint`, waits (up
    /// to 30 s) until the target is in the middle of writing a checkpoint (it needs a `storage`
    /// fault with `checkpoint_delay_ms` on it), then kills.
    Kill {
        #[serde(default)]
        target: Target,
        restart_after_ms: Option<u64>,
        #[serde(default)]
        during_checkpoint: bool,
    },
    /// SIGSTOP for `duration_ms`, then SIGCONT.
    Pause {
        #[serde(default)]
        target: Target,
        duration_ms: u64,
    },
    /// `cluster drain` (graceful), then SIGTERM.
    Drain {
        #[serde(default)]
        target: Target,
    },
    /// Graceful restart: SIGTERM (the node hands its shards off and exits 0), started again at
    /// once with the same identity, then ready (one step of a rolling restart).
    Restart {
        #[serde(default)]
        target: Target,
    },
    /// A new node joins.
    Join {},
    /// The target cannot talk to anyone (both ways) for `duration_ms`.
    Isolate {
        #[serde(default)]
        target: Target,
        duration_ms: u64,
    },
    /// `minority` nodes (drawn by the seed) are cut off from the rest for `duration_ms`.
    Split { minority: usize, duration_ms: u64 },
    /// The target's datagrams to `peer` are dropped (one way) for `duration_ms`.
    OneWay {
        #[serde(default)]
        target: Target,
        peer: String,
        duration_ms: u64,
    },
    /// Loss, delay, jitter (reordering) and duplication on every link for `duration_ms`.
    Netem {
        duration_ms: u64,
        #[serde(default)]
        drop_rate: f64,
        #[serde(default)]
        delay_ms: u64,
        #[serde(default)]
        jitter_ms: u64,
        #[serde(default)]
        duplicate_rate: f64,
    },
    /// Hostile peers against the target: refused handshakes, a connection flood, garbage
    /// datagrams, malformed frames, then holders of valid certificates.
    Hostile {
        #[serde(default)]
        target: Target,
    },
    /// Storage faults on the target for `duration_ms`: write errors at `drop_rate`, writes
    /// delayed `delay_ms`, checkpoint writes `checkpoint_delay_ms` longer (with a marker file
    /// meanwhile).
    Storage {
        #[serde(default)]
        target: Target,
        duration_ms: u64,
        #[serde(default)]
        drop_rate: f64,
        #[serde(default)]
        delay_ms: u64,
        #[serde(default)]
        checkpoint_delay_ms: u64,
    },
    /// `--netns` only: the target's link set down (no traffic at all, clients' included) for
    /// `duration_ms`.
    LinkDown {
        #[serde(default)]
        target: Target,
        duration_ms: u64,
    },
    /// CPU starvation of every node, as Kubernetes CPU limits do it, for `duration_ms` (absent:
    /// until the run ends, checks and shutdown included): each node's process limited to
    /// `cpu_percent` of a core (cgroup quota; busy threads where no cgroup can be written), and
    /// SIGSTOP stalls of 1..=`stall_max_ms` ms of a random node about every `stall_every_ms`.
    /// Nodes started meanwhile are starved too.
    Starve {
        cpu_percent: u32,
        #[serde(default)]
        stall_every_ms: u64,
        #[serde(default)]
        stall_max_ms: u64,
        duration_ms: Option<u64>,
    },
}

impl What {
    /// A partition: the fault-injecting socket on loopback, nftables DROP rules with `--netns`.
    pub fn is_partition(&self) -> bool {
        matches!(
            self,
            What::Isolate { .. } | What::Split { .. } | What::OneWay { .. }
        )
    }

    /// The starvation it asks for, if it is `starve`.
    pub fn starve_spec(&self) -> Option<crate::starve::StarveSpec> {
        match *self {
            What::Starve {
                cpu_percent,
                stall_every_ms,
                stall_max_ms,
                ..
            } => Some(crate::starve::StarveSpec {
                cpu_percent,
                stall_every_ms,
                stall_max_ms,
            }),
            _ => None,
        }
    }
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
            match &f.what {
                What::Split { minority, .. } if *minority == 0 || *minority >= m.nodes => {
                    bail!("fault[{i}].minority must be in 1..scenario.nodes");
                }
                What::Kill {
                    during_checkpoint: true,
                    ..
                } if !self.faults.iter().any(|g| {
                    matches!(g.what, What::Storage { checkpoint_delay_ms, .. } if checkpoint_delay_ms > 0)
                }) =>
                {
                    bail!("fault[{i}].during_checkpoint needs a storage fault with checkpoint_delay_ms");
                }
                What::LinkDown { .. } if !m.needs_netns => {
                    bail!("fault[{i}] is link_down: set scenario.needs_netns = true");
                }
                What::Starve { .. } => {
                    if let Some(spec) = f.what.starve_spec() {
                        spec.validate()
                            .with_context(|| format!("fault[{i}] (starve)"))?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    const HEAD: &str = "[scenario]\nname = \"t\"\n[workload]\nops = 10\n";

    #[test]
    fn every_shipped_scenario_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/chaos");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            Scenario::load(&e.unwrap().path()).unwrap();
            n += 1;
        }
        assert!(n >= 11, "{n} scenarios");
    }

    #[test]
    fn faults_are_typed_and_keys_of_other_kinds_are_refused() {
        let s = parse(&format!(
            "{HEAD}[[fault]]\nat_ms = 5\nkind = \"pause\"\ntarget = \"leader\"\nduration_ms = 9\n\
             [[fault]]\nat_ms = 6\nkind = \"kill\"\ntarget = \"n3\"\n\
             [[fault]]\nat_ms = 7\nkind = \"join\"\n"
        ))
        .unwrap();
        assert!(matches!(
            s.faults[0].what,
            What::Pause {
                target: Target::Leader,
                duration_ms: 9
            }
        ));
        assert!(matches!(
            &s.faults[1].what,
            What::Kill { target: Target::Node(n), restart_after_ms: None, .. } if n == "n3"
        ));
        assert!(matches!(s.faults[2].what, What::Join {}));
        for (bad, want) in [
            (
                "kind = \"pause\"\nduration_ms = 1\nminority = 2",
                "minority",
            ),
            ("kind = \"pause\"", "duration_ms"),
            ("kind = \"teleport\"", "teleport"),
            (
                "kind = \"split\"\nminority = 0\nduration_ms = 1",
                "minority",
            ),
            ("kind = \"starve\"\ncpu_percent = 0", "cpu"),
            ("kind = \"link_down\"\nduration_ms = 1", "needs_netns"),
            (
                "kind = \"kill\"\nduring_checkpoint = true",
                "checkpoint_delay_ms",
            ),
        ] {
            let err = parse(&format!("{HEAD}[[fault]]\nat_ms = 1\n{bad}\n")).unwrap_err();
            let text = format!("{err:#}");
            assert!(text.contains(want), "{bad}: {text}");
        }
    }
}

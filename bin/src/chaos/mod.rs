//! `tidepool chaos run`: real node processes, a recorded workload, faults on a schedule,
//! healing, convergence, and checkers that prove nothing was lost. See `config/chaos/` for the
//! scenarios and RELIABILITY.md for what each checker proves.

pub mod checkers;
pub mod scenario;

use crate::hostile_peer::rss_kib;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tidepool_runtime::codec::WireShardState;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tidepool_actors::jobs::job::ShardData;
use tidepool_actors::jobs::registry;
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::control::{DatasetRecord, DatasetSource};
use tidepool_runtime::dataset;
use tidepool_runtime::jobspec::JobSpec;
use tidepool_runtime::transport::TlsMaterial;

use crate::local_cluster::{wait_all_up, wait_stable, LocalCluster};
use crate::{datasets, jobs_cli, workload};
use scenario::{Fault, Scenario, Target, What};

/// How a run is asked for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub seed: u64,
    /// Keep the cluster's temp dir (logs, ownership logs).
    pub keep: bool,
    /// The deliberately broken mode: nodes acknowledge ops without logging them. The checkers
    /// must report violations.
    pub unsafe_skip_durability: bool,
    /// Every node in its own network namespace (root): partitions become nftables DROP rules,
    /// and `link_down` faults are possible.
    pub netns: bool,
}

/// One injected fault, as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultEvent {
    pub at_ms: u64,
    pub kind: String,
    pub target: String,
    pub detail: String,
}

/// The outcome of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub scenario: String,
    pub seed: u64,
    /// `loopback`, or `netns 10.a.b.0/24` (one namespace per node).
    pub network: String,
    pub faults: Vec<FaultEvent>,
    pub ops: u64,
    pub acked: u64,
    pub unacked: u64,
    pub duplicates_deduplicated: u64,
    /// After the last heal, until every shard was served by a live node within the cap.
    pub convergence_ms: Option<u64>,
    /// Checker name -> violations (empty = passed).
    pub checks: BTreeMap<String, Vec<String>>,
    pub passed: bool,
    pub elapsed_ms: u64,
}

/// How much a node's resident memory may grow during one hostile attack (checker 6).
const HOSTILE_RSS_GROWTH_KIB: u64 = 64 * 1024;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Network faults per node, written to the nodes' fault files.
#[derive(Default)]
struct Net {
    specs: HashMap<String, crate::fault_spec::FaultSpec>,
}

struct Run<'a> {
    s: &'a Scenario,
    cluster: LocalCluster,
    client: Arc<ClusterClient>,
    rng: rand::rngs::StdRng,
    started: Instant,
    events: Vec<FaultEvent>,
    /// Nodes whose exit the scenario caused (killed or drained), by index.
    expected_exit: Vec<bool>,
    /// Periods (µs) a node could not serve: paused or dead.
    down: HashMap<String, Vec<(u64, u64)>>,
    net: Net,
    job: Option<String>,
    last_heal: Instant,
    /// Hostile attempts that were not refused (checker 6).
    hostile: Vec<String>,
    seed: u64,
}

impl Run<'_> {
    fn names(&self) -> Vec<String> {
        self.cluster.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.cluster
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    async fn target(&mut self, target: &Target) -> Result<usize> {
        let running: Vec<usize> = (0..self.cluster.nodes.len())
            .filter(|&i| self.cluster.running(i) && !self.expected_exit[i])
            .collect();
        let pick = |rng: &mut rand::rngs::StdRng, from: &[usize]| -> Result<usize> {
            if from.is_empty() {
                bail!("no running node to target");
            }
            Ok(from[rng.random_range(0..from.len())])
        };
        match target {
            Target::Random => pick(&mut self.rng, &running),
            Target::NonVoter => {
                let nv: Vec<usize> = running
                    .iter()
                    .copied()
                    .filter(|&i| !self.cluster.voters.contains(&self.cluster.nodes[i].name))
                    .collect();
                pick(&mut self.rng, &nv)
            }
            Target::Leader => {
                // Right after a heal the node asked may not know the leader yet: ask until one
                // is known.
                let deadline = Instant::now() + Duration::from_secs(15);
                loop {
                    let leader = self.client.status().await.map(|s| s.leader);
                    match leader {
                        Ok(l) if !l.is_empty() => break self.index(&l),
                        _ if Instant::now() > deadline => bail!("no leader known for 15 s"),
                        _ => tokio::time::sleep(Duration::from_millis(100)).await, // poll interval
                    }
                }
            }
            Target::Coordinator => {
                let id = self
                    .job
                    .clone()
                    .context("no training job to find a coordinator of")?;
                let rec = jobs_cli::status(&self.client, &id).await?;
                match rec.coordinator {
                    Some(c) => self.index(&c),
                    None => pick(&mut self.rng, &running),
                }
            }
            Target::Node(name) => self.index(name),
        }
    }

    fn event(&mut self, kind: &str, target: &str, detail: String) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        println!("  +{:>6} ms  {kind:<9} {target:<4} {detail}", at_ms);
        self.events.push(FaultEvent {
            at_ms,
            kind: kind.into(),
            target: target.into(),
            detail,
        });
    }

    fn storage_file(&self, name: &str) -> PathBuf {
        self.cluster
            .root()
            .join("faults")
            .join(format!("{name}.storage.json"))
    }

    /// Waits until node `name` is in the middle of a (slowed) checkpoint write: its storage fault
    /// file's marker exists. Returns the fault line's note.
    async fn wait_checkpoint_in_flight(&self, name: &str) -> Result<String> {
        #[cfg(feature = "fault-injection")]
        {
            let marker =
                tidepool_runtime::storage::faulty::checkpoint_marker(&self.storage_file(name));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !marker.exists() {
                if Instant::now() > deadline {
                    bail!("{name} wrote no checkpoint within 30 s (kill during_checkpoint)");
                }
                tokio::time::sleep(Duration::from_millis(5)).await; // poll interval
            }
            // The process dies with the write asleep; the marker would outlive it.
            let _ = std::fs::remove_file(&marker);
            Ok(" in the middle of a checkpoint write".into())
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            bail!("kill during_checkpoint of {name} needs a `fault-injection` build")
        }
    }

    fn write_net(&self) -> Result<()> {
        for n in &self.cluster.nodes {
            let spec = self.net.specs.get(&n.name).cloned().unwrap_or_default();
            let path = self
                .cluster
                .root()
                .join("faults")
                .join(format!("{}.json", n.name));
            std::fs::write(&path, serde_json::to_vec(&spec)?)?;
        }
        Ok(())
    }

    /// Cuts node `from`'s traffic with node `to`: outgoing only (`one_way`) or both ways. With
    /// `--netns`, nftables DROP rules in `from`'s namespace; else its fault-injecting socket.
    fn cut(&mut self, from: usize, to: usize, one_way: bool) -> Result<()> {
        if let Some(lab) = self.cluster.net.as_mut() {
            return lab.drop_between(from, to, one_way);
        }
        let (name, addr) = (
            self.cluster.nodes[from].name.clone(),
            self.cluster.nodes[to].quic,
        );
        let spec = self.net.specs.entry(name).or_default();
        let rule = spec.peers.entry(addr).or_default();
        rule.blocked = true;
        rule.outgoing_only = one_way;
        Ok(())
    }

    /// How partitions are made, for the fault lines.
    fn cut_by(&self) -> &'static str {
        if self.cluster.net.is_some() {
            "nftables DROP"
        } else {
            "fault socket"
        }
    }

    async fn apply(&mut self, f: &Fault) -> Result<Vec<(u64, Action)>> {
        let mut later = Vec::new();
        let at = f.at_ms;
        match &f.what {
            What::Kill {
                target,
                restart_after_ms,
                during_checkpoint,
            } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                let when = if *during_checkpoint {
                    self.wait_checkpoint_in_flight(&name).await?
                } else {
                    String::new()
                };
                self.cluster.kill(i).await?;
                self.expected_exit[i] = true;
                self.down
                    .entry(name.clone())
                    .or_default()
                    .push((now_us(), u64::MAX));
                let detail = match restart_after_ms {
                    Some(d) => {
                        // Relative to when the kill really happened (a kill during a checkpoint
                        // waits for one).
                        let now = self.started.elapsed().as_millis() as u64;
                        later.push((now.max(at) + d, Action::Restart(i)));
                        format!("SIGKILL{when}, restart in {d} ms")
                    }
                    None => format!("SIGKILL{when}"),
                };
                self.event("kill", &name, detail);
            }
            What::Pause {
                target,
                duration_ms,
            } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                // No down period: a paused node must end its ownership intervals itself, at its
                // own lease expiry, as any starved process must (checker 2 takes its word).
                self.cluster.signal(i, libc::SIGSTOP)?;
                let d = *duration_ms;
                later.push((at + d, Action::Resume(i)));
                self.event("pause", &name, format!("SIGSTOP for {d} ms"));
            }
            What::Drain { target } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                // A node that joined moments ago may not be a member yet (a slow start on a
                // loaded machine): ask again until it is.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match self.client.drain(&name).await {
                        Ok(_) => break,
                        Err(e)
                            if e.to_string().contains("no member named")
                                && Instant::now() < deadline =>
                        {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            // poll interval
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                self.event("drain", &name, "cluster drain, then SIGTERM".into());
                let status = self.cluster.stop(i, Duration::from_secs(60)).await?;
                self.expected_exit[i] = true;
                self.down
                    .entry(name.clone())
                    .or_default()
                    .push((now_us(), u64::MAX));
                if !status.success() {
                    bail!("{name} did not exit cleanly after a drain: {status}");
                }
            }
            What::Restart { target } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                let t0 = Instant::now();
                // Starved nodes drain slowly: the bound only proves the drain ends.
                let status = self.cluster.stop(i, Duration::from_secs(120)).await?;
                if !status.success() {
                    bail!("{name} did not exit cleanly on SIGTERM: {status}");
                }
                // Dead until it starts again (its own log closed every interval before exit).
                let exited = now_us();
                self.cluster.start(i)?;
                self.down
                    .entry(name.clone())
                    .or_default()
                    .push((exited, now_us()));
                self.cluster
                    .wait_node_ready(i, Duration::from_secs(120))
                    .await?;
                self.event(
                    "restart",
                    &name,
                    format!(
                        "SIGTERM, drained, started again, ready after {} ms",
                        t0.elapsed().as_millis()
                    ),
                );
            }
            What::Starve { duration_ms, .. } => {
                let spec = f.what.starve_spec().context("a starve fault")?;
                let starve = crate::starve::Starve::new(spec, self.seed)?;
                for n in &self.cluster.nodes {
                    if let Some(pid) = n.pid() {
                        starve.add(&n.name, pid)?;
                    }
                }
                let detail = match *duration_ms {
                    Some(d) => {
                        later.push((at + d, Action::EndStarve));
                        format!("{} for {d} ms", starve.describe())
                    }
                    None => format!("{} until the run ends", starve.describe()),
                };
                self.cluster.starve = Some(starve);
                self.event("starve", "all", detail);
            }
            What::Join {} => {
                let i = self.cluster.add_node()?;
                self.expected_exit.push(false);
                self.write_net()?;
                self.cluster.start(i)?;
                let name = self.cluster.nodes[i].name.clone();
                self.event("join", &name, "new node started".into());
            }
            What::Isolate {
                target,
                duration_ms,
            } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                for j in 0..self.cluster.nodes.len() {
                    if j != i {
                        self.cut(i, j, false)?;
                        self.cut(j, i, false)?;
                    }
                }
                self.write_net()?;
                let d = *duration_ms;
                later.push((at + d, Action::HealNet));
                let by = self.cut_by();
                self.event(
                    "isolate",
                    &name,
                    format!("no traffic with any node for {d} ms ({by})"),
                );
            }
            What::Split {
                minority: k,
                duration_ms,
            } => {
                let k = *k;
                let mut order: Vec<usize> = (0..self.cluster.nodes.len()).collect();
                for i in (1..order.len()).rev() {
                    let j = self.rng.random_range(0..=i);
                    order.swap(i, j);
                }
                let (minority, majority) = order.split_at(k.min(order.len()));
                for &a in minority {
                    for &b in majority {
                        self.cut(a, b, false)?;
                        self.cut(b, a, false)?;
                    }
                }
                self.write_net()?;
                let d = *duration_ms;
                later.push((at + d, Action::HealNet));
                let names: Vec<&str> = minority
                    .iter()
                    .map(|&i| self.cluster.nodes[i].name.as_str())
                    .collect();
                let detail = format!(
                    "minority cut off from the rest for {d} ms ({})",
                    self.cut_by()
                );
                self.event("split", &names.join(","), detail);
            }
            What::OneWay {
                target,
                peer,
                duration_ms,
            } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                let to = self.index(peer)?;
                self.cut(i, to, true)?;
                self.write_net()?;
                let d = *duration_ms;
                later.push((at + d, Action::HealNet));
                let by = self.cut_by();
                self.event(
                    "one_way",
                    &name,
                    format!("{name} -> {peer} dropped for {d} ms ({by})"),
                );
            }
            What::LinkDown {
                target,
                duration_ms,
            } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                let lab = self
                    .cluster
                    .net
                    .as_mut()
                    .context("link_down needs --netns")?;
                lab.set_link(i, false)?;
                let d = *duration_ms;
                later.push((at + d, Action::HealNet));
                self.event(
                    "link_down",
                    &name,
                    format!("eth0 down in its namespace for {d} ms"),
                );
            }
            What::Hostile { target } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                let admin = TlsMaterial::load_client(&self.cluster.admin_dir())?;
                let scratch = self
                    .cluster
                    .root()
                    .join(format!("hostile-{}", self.events.len()));
                std::fs::create_dir_all(&scratch)?;
                let pid = self.cluster.nodes[i].pid();
                let rss_before = pid.and_then(rss_kib);
                let r = crate::hostile::attack(
                    self.cluster.nodes[i].quic,
                    &self.cluster.ca_dir(),
                    &admin,
                    &scratch,
                    self.seed,
                )
                .await?;
                self.hostile
                    .extend(r.accepted.iter().map(|a| format!("{name}: {a}")));
                // Then holders of valid certificates: a spare node certificate speaking Raft,
                // proposals and joins about others, announced frames that never come.
                let mal = crate::hostile_peer::malicious_round(
                    self.cluster.nodes[i].quic,
                    self.cluster.nodes[i].admin,
                    &admin,
                    &self.cluster.ca_dir(),
                    &scratch,
                    self.seed.wrapping_add(self.events.len() as u64),
                )
                .await?;
                self.hostile
                    .extend(mal.accepted.iter().map(|a| format!("{name}: {a}")));
                // Memory stays bounded: the target's resident set may not grow by more than
                // HOSTILE_RSS_GROWTH_KIB over the attack (it holds no state for refused peers).
                // (Polled for up to 15 s: what the attack's buffers took must come back; the
                // daemon hands freed memory to the OS every 10 s.)
                let settle = Instant::now() + Duration::from_secs(15);
                let mut rss_after = pid.and_then(rss_kib);
                while let (Some(b), Some(a)) = (rss_before, rss_after) {
                    if a <= b + HOSTILE_RSS_GROWTH_KIB || Instant::now() > settle {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
                    rss_after = pid.and_then(rss_kib);
                }
                let rss = match (rss_before, rss_after) {
                    (Some(b), Some(a)) => {
                        if a > b + HOSTILE_RSS_GROWTH_KIB {
                            self.hostile.push(format!(
                                "{name}: resident memory grew {} KiB during the attack (bound {} KiB)",
                                a - b,
                                HOSTILE_RSS_GROWTH_KIB
                            ));
                        }
                        format!(", RSS {} -> {} MiB", b / 1024, a / 1024)
                    }
                    _ => String::new(),
                };
                self.event(
                    "hostile",
                    &name,
                    format!(
                        "{} refused handshakes, {} flood attempts, {} garbage datagrams, {} bad frames, {} refused control requests from a spare node certificate, {} announced 64 MiB frames, {} slow admin HTTP clients, never-reading client closed: {}{rss}",
                        r.refused_handshakes, r.flood_attempts, r.garbage_datagrams, r.bad_frames,
                        mal.control_refused, mal.oversized_streams, mal.slow_http, mal.never_read_closed
                    ),
                );
            }
            What::Storage {
                target,
                duration_ms,
                drop_rate,
                delay_ms,
                checkpoint_delay_ms,
            } => {
                let i = self.target(target).await?;
                let name = self.cluster.nodes[i].name.clone();
                let rule = serde_json::json!({
                    "write_error_rate": drop_rate,
                    "write_delay_ms": delay_ms,
                    "checkpoint_delay_ms": checkpoint_delay_ms,
                });
                std::fs::write(self.storage_file(&name), serde_json::to_vec(&rule)?)?;
                let d = *duration_ms;
                later.push((at + d, Action::HealStorage(i)));
                self.event(
                    "storage",
                    &name,
                    format!(
                        "{:.0}% write errors, writes delayed {} ms, checkpoint writes {} ms more, for {d} ms",
                        drop_rate * 100.0,
                        delay_ms,
                        checkpoint_delay_ms
                    ),
                );
            }
            What::Netem {
                duration_ms,
                drop_rate,
                delay_ms,
                jitter_ms,
                duplicate_rate,
            } => {
                for n in self.names() {
                    let spec = self.net.specs.entry(n).or_default();
                    spec.default.drop_rate = *drop_rate;
                    spec.default.delay_ms = *delay_ms;
                    spec.default.jitter_ms = *jitter_ms;
                    spec.default.duplicate_rate = *duplicate_rate;
                }
                self.write_net()?;
                let d = *duration_ms;
                later.push((at + d, Action::HealNet));
                self.event(
                    "netem",
                    "all",
                    format!(
                        "loss {:.0}%, delay {} ms +- {} ms, duplicates {:.0}% for {d} ms",
                        drop_rate * 100.0,
                        delay_ms,
                        jitter_ms,
                        duplicate_rate * 100.0
                    ),
                );
            }
        }
        Ok(later)
    }

    fn end_down(&mut self, name: &str) {
        if let Some(open) = self
            .down
            .get_mut(name)
            .and_then(|v| v.iter_mut().rev().find(|p| p.1 == u64::MAX))
        {
            open.1 = now_us();
        }
    }

    async fn act(&mut self, a: Action) -> Result<()> {
        match a {
            Action::Restart(i) => {
                let name = self.cluster.nodes[i].name.clone();
                self.cluster.start(i)?;
                self.expected_exit[i] = false;
                self.end_down(&name);
                self.event(
                    "restart",
                    &name,
                    "started again with the same identity".into(),
                );
            }
            Action::Resume(i) => {
                let name = self.cluster.nodes[i].name.clone();
                self.cluster.signal(i, libc::SIGCONT)?;
                self.event("resume", &name, "SIGCONT".into());
            }
            Action::EndStarve => {
                // Dropping it moves the processes out of their cgroups and continues any stall.
                self.cluster.starve = None;
                self.event("heal", "all", "CPU starvation ended".into());
            }
            Action::HealStorage(i) => {
                let name = self.cluster.nodes[i].name.clone();
                std::fs::write(self.storage_file(&name), b"{}")?;
                self.event("heal", &name, "storage faults removed".into());
            }
            Action::HealNet => {
                self.net.specs.clear();
                self.write_net()?;
                if let Some(lab) = self.cluster.net.as_mut() {
                    lab.heal()?;
                }
                self.event("heal", "all", "network faults removed".into());
            }
        }
        self.last_heal = Instant::now();
        Ok(())
    }

    /// Checker 3: every shard served by a live node, no node above the placement cap.
    async fn converge(&mut self, timeout: Duration) -> (Option<u64>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut live: Vec<String> = Vec::new();
        for i in 0..self.cluster.nodes.len() {
            if self.cluster.running(i) {
                live.push(self.cluster.nodes[i].name.clone());
            }
        }
        let mut last = String::new();
        loop {
            if let Ok(shards) = self.client.shards().await {
                let mut per: HashMap<&str, usize> = HashMap::new();
                for s in &shards {
                    *per.entry(s.owner.as_deref().unwrap_or_default())
                        .or_default() += 1;
                }
                let cap = (shards.len() as f64 / live.len().max(1) as f64 * 1.25).ceil() as usize;
                let bad: Vec<String> = shards
                    .iter()
                    .filter(|s| {
                        s.state != WireShardState::Serving
                            || !s.owner.as_ref().is_some_and(|o| live.contains(o))
                    })
                    .map(|s| format!("shard {} {} by {:?}", s.id, s.state, s.owner))
                    .chain(
                        per.iter()
                            .filter(|(_, &n)| n > cap)
                            .map(|(o, n)| format!("{o} owns {n} shards, cap {cap}")),
                    )
                    .collect();
                if bad.is_empty() {
                    return (
                        Some(self.last_heal.elapsed().as_millis() as u64),
                        Vec::new(),
                    );
                }
                last = bad.into_iter().take(5).collect::<Vec<_>>().join("; ");
            }
            if Instant::now() > deadline {
                return (
                    None,
                    vec![format!(
                        "not converged within {timeout:?} after healing: {last}"
                    )],
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Restart(usize),
    EndStarve,
    Resume(usize),
    HealNet,
    HealStorage(usize),
}

/// The training job of a scenario, and its fault-free result computed in this process with the
/// same maps and exact merging (so it is what any correct run must produce).
fn training(shards: u32) -> Result<(dataset::Table, String, serde_json::Value)> {
    let table = datasets::builtin("breast_cancer")?;
    let (train, _) = datasets::split(&table, 0.2, 7);
    let spec_text = "[job]\nkind = \"sgd\"\ndataset = \"cancer\"\n[model]\ntype = \"logistic\"\n\
        [train]\nepochs = 10\nbatch_size = 64\nlearning_rate = 0.1\nl2 = 0.0001\nseed = 7\ncheckpoint_every = 10\n"
        .to_string();
    let spec = JobSpec::parse(&spec_text)?;
    let rec = DatasetRecord {
        name: "cancer".into(),
        features: train.features.clone(),
        label: train.label.clone(),
        rows: train.rows as u64,
        shards,
        source: DatasetSource::Synthetic {
            kind: String::new(),
            seed: 0,
        },
    };
    let job = registry::build("reference", &spec, &rec).map_err(|e| anyhow::anyhow!("{e}"))?;
    let parts = dataset::partition(&train, shards);
    let data: Vec<ShardData<'_>> = parts
        .iter()
        .enumerate()
        .map(|(s, p)| ShardData {
            shard: s as u32,
            features: p.n_features(),
            x: p.features(),
            y: p.labels(),
            csr: None,
        })
        .collect();
    let want = registry::run_local(job, &data).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((train, spec_text, want))
}

/// libfaketime, for wall-clock skew (Debian package `faketime`); also how `tests/chaos.rs`
/// decides whether F6 can run here.
pub fn faketime_library() -> Result<PathBuf> {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("wall-clock skew needs libfaketime: apt-get install faketime")
}

/// Exit code of `chaos run` for a setup problem (nothing ran), as opposed to 1, a violation.
pub const EXIT_SETUP: i32 = 2;

/// What a scenario needs from this build and machine; `Err` says what is missing. Checked
/// before anything starts, so a setup problem is never reported as a violation.
pub fn check_setup(s: &Scenario, opts: &RunOptions) -> Result<(), String> {
    let name = &s.scenario.name;
    let fi = cfg!(feature = "fault-injection");
    let socket_faults = s
        .faults
        .iter()
        .any(|f| matches!(f.what, What::Netem { .. }) || (f.what.is_partition() && !opts.netns));
    if socket_faults && !fi {
        return Err(format!(
            "scenario {name} injects network faults: build with `--features fault-injection` \
             (cargo run --release --features fault-injection -- chaos run ...)"
        ));
    }
    let storage_faults = s.faults.iter().any(|f| {
        matches!(
            f.what,
            What::Storage { .. }
                | What::Kill {
                    during_checkpoint: true,
                    ..
                }
        )
    });
    if storage_faults && !fi {
        return Err(format!(
            "scenario {name} injects storage faults or kills during a checkpoint: build with \
             `--features fault-injection`"
        ));
    }
    if opts.unsafe_skip_durability && !fi {
        return Err("--unsafe-skip-durability needs a `fault-injection` build".into());
    }
    if s.scenario.needs_netns && !opts.netns {
        return Err(format!(
            "scenario {name} needs --netns (root, iproute2, nftables)"
        ));
    }
    if opts.netns {
        if !crate::netns::is_root() {
            return Err("--netns needs root (it creates network namespaces)".into());
        }
        for tool in ["ip", "nft"] {
            if !on_path(tool) {
                return Err(format!(
                    "--netns needs `{tool}` (Debian: apt-get install iproute2 nftables)"
                ));
            }
        }
    }
    if !s.skew_ms.is_empty() {
        faketime_library().map_err(|e| format!("scenario {name}: {e:#}"))?;
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// Runs one scenario with one seed. [`main`] has checked its setup ([`check_setup`]) first.
pub async fn run_one(s: &Scenario, opts: &RunOptions) -> Result<RunReport> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let m = &s.scenario;
    let lab = if opts.netns {
        Some(crate::netns::NetLab::create()?)
    } else {
        None
    };
    let network = lab
        .as_ref()
        .map_or("loopback".to_string(), |l| format!("netns {}", l.subnet()));
    let mut cluster = LocalCluster::create_in(&exe, m.nodes, m.shards, m.voters, lab)?;
    std::fs::create_dir_all(cluster.root().join("faults"))?;
    if cfg!(feature = "fault-injection") {
        let path = cluster.root().join("faults").join("{name}.json");
        cluster
            .env
            .push(("TIDEPOOL_FAULT_FILE".into(), path.display().to_string()));
        cluster
            .env
            .push(("TIDEPOOL_FAULT_SEED".into(), opts.seed.to_string()));
        let storage = cluster.root().join("faults").join("{name}.storage.json");
        cluster.env.push((
            "TIDEPOOL_STORAGE_FAULT_FILE".into(),
            storage.display().to_string(),
        ));
    }
    if !s.skew_ms.is_empty() {
        let lib = faketime_library()?;
        for (name, skew) in &s.skew_ms {
            let secs = *skew as f64 / 1000.0;
            cluster.node_env.insert(
                name.clone(),
                vec![
                    ("LD_PRELOAD".into(), lib.display().to_string()),
                    ("FAKETIME".into(), format!("{secs:+}")),
                    ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
                ],
            );
        }
    }
    if opts.unsafe_skip_durability {
        cluster
            .env
            .push(("TIDEPOOL_UNSAFE_SKIP_DURABILITY".into(), "1".into()));
    }
    println!(
        "chaos {} seed {}: {} nodes ({} voters), {} shards, {network}, dir {}",
        m.name,
        opts.seed,
        m.nodes,
        m.voters,
        m.shards,
        cluster.root().display()
    );
    for n in &cluster.nodes {
        std::fs::write(
            cluster
                .root()
                .join("faults")
                .join(format!("{}.json", n.name)),
            b"{}",
        )?;
    }
    let client = match start_cluster(&mut cluster, m.nodes).await {
        Ok(c) => c,
        Err(e) => {
            let dir = cluster.keep();
            bail!("cluster did not start: {e:#} (logs in {})", dir.display());
        }
    };
    let expected_exit = vec![false; cluster.nodes.len()];
    let mut run = Run {
        s,
        cluster,
        client: client.clone(),
        rng: rand::rngs::StdRng::seed_from_u64(opts.seed),
        started: Instant::now(),
        events: Vec::new(),
        expected_exit,
        down: HashMap::new(),
        net: Net::default(),
        job: None,
        last_heal: Instant::now(),
        hostile: Vec::new(),
        seed: opts.seed,
    };
    let result = drive(&mut run, opts, network).await;
    let exits = check_exits(&mut run);
    let stopped = run.cluster.stop_all(Duration::from_secs(60)).await;
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            let dir = run.cluster.keep();
            bail!(
                "chaos run failed to complete: {e:#} (logs in {})",
                dir.display()
            );
        }
    };
    report.checks.insert("5_unexpected_exits".into(), exits);
    if let Err(e) = stopped {
        if let Some(v) = report.checks.get_mut("5_unexpected_exits") {
            v.push(format!("stopping: {e}"));
        }
    }
    // Checker 2 runs on the logs after every node stopped (their last events are written).
    let names: Vec<String> = run.cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let mut ivs = checkers::intervals(&run.cluster.root().join("data"), &names);
    // A skewed node logs skewed wall-clock times: shift them back (the checker compares
    // instants across processes).
    for list in ivs.values_mut() {
        for iv in list.iter_mut() {
            if let Some(skew) = s.skew_ms.get(&iv.node) {
                let shift = -skew * 1000;
                iv.start = iv.start.saturating_add_signed(shift);
                iv.stop = iv.stop.map(|t| t.saturating_add_signed(shift));
            }
        }
    }
    report
        .checks
        .insert("2_one_owner".into(), checkers::ownership(&ivs, &run.down));
    report.passed = report.checks.values().all(Vec::is_empty);
    report.elapsed_ms = run.started.elapsed().as_millis() as u64;
    if opts.keep || !report.passed {
        let dir = run.cluster.keep();
        println!("  logs kept in {}", dir.display());
    }
    Ok(report)
}

async fn start_cluster(cluster: &mut LocalCluster, nodes: usize) -> Result<Arc<ClusterClient>> {
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(120)).await?;
    let copts = ClientOptions {
        retry_for: Duration::from_secs(90),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let client = Arc::new(cluster.admin_client(copts).await?);
    wait_all_up(&client, nodes, Duration::from_secs(90)).await?;
    wait_stable(&client, Duration::from_secs(120)).await?;
    Ok(client)
}

fn check_exits(run: &mut Run<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..run.cluster.nodes.len() {
        if !run.expected_exit[i] && !run.cluster.running(i) {
            out.push(format!(
                "{} exited without being killed",
                run.cluster.nodes[i].name
            ));
        }
    }
    out
}

async fn drive(run: &mut Run<'_>, opts: &RunOptions, network: String) -> Result<RunReport> {
    let s = run.s;
    let mut reference = None;
    if s.workload.training {
        let (train, spec, want) = training(s.scenario.shards)?;
        jobs_cli::import_table(&run.client, &train, "cancer").await?;
        let id = jobs_cli::submit(&run.client, &spec).await?;
        run.job = Some(id);
        reference = Some(want);
    }
    let work = tokio::spawn(workload::run_increments(
        run.client.clone(),
        s.workload.ops,
        s.workload.keys,
        s.workload.concurrency,
    ));
    run.started = Instant::now();
    let mut timeline: Vec<(u64, Option<usize>, Option<Action>)> = s
        .faults
        .iter()
        .enumerate()
        .map(|(i, f)| (f.at_ms, Some(i), None))
        .collect();
    while !timeline.is_empty() {
        timeline.sort_by_key(|t| t.0);
        let (at, fault, action) = timeline.remove(0);
        let due = run.started + Duration::from_millis(at);
        tokio::time::sleep_until(due.into()).await; // the scenario's schedule, not a sync wait
        if let Some(i) = fault {
            let later = run.apply(&s.faults[i]).await?;
            timeline.extend(later.into_iter().map(|(t, a)| (t, None, Some(a))));
        }
        if let Some(a) = action {
            run.act(a).await?;
        }
    }
    let report = work.await.context("workload task")?;
    let mut checks = BTreeMap::new();
    let (convergence_ms, conv) = run
        .converge(Duration::from_millis(s.converge.timeout_ms))
        .await;
    checks.insert("3_convergence".into(), conv);
    if s.faults
        .iter()
        .any(|f| matches!(f.what, What::Hostile { .. }))
    {
        checks.insert("6_hostile_refused".into(), run.hostile.clone());
    }
    checks.insert(
        "1_acked_ops".into(),
        checkers::ops(&run.client, &report, s.workload.keys).await,
    );
    if let (Some(id), Some(want)) = (run.job.clone(), reference) {
        let rec = jobs_cli::wait(&run.client, &id, false, Duration::from_secs(300)).await?;
        let got = if rec.state == tidepool_runtime::control::JobState::Succeeded {
            checkers::model(&jobs_cli::result(&run.client, &id).await?, &want)
        } else {
            vec![format!(
                "training job ended {}: {:?}",
                rec.state.as_str(),
                rec.error
            )]
        };
        checks.insert("4_model".into(), got);
    }
    Ok(RunReport {
        scenario: s.scenario.name.clone(),
        seed: opts.seed,
        network,
        faults: run.events.clone(),
        ops: report.ops,
        acked: report.acked,
        unacked: report.unacked,
        duplicates_deduplicated: report.duplicates,
        convergence_ms,
        checks,
        passed: false,
        elapsed_ms: 0,
    })
}

/// Prints a run's human summary.
pub fn summarize(r: &RunReport) {
    println!(
        "{} seed {}: {} ({} faults, {} ops: {} acknowledged, {} unacknowledged, {} retries deduplicated; converged {})",
        r.scenario,
        r.seed,
        if r.passed { "PASSED" } else { "VIOLATIONS" },
        r.faults.len(),
        r.ops,
        r.acked,
        r.unacked,
        r.duplicates_deduplicated,
        r.convergence_ms
            .map_or("never".into(), |ms| format!("{ms} ms after the last heal"))
    );
    for (name, v) in &r.checks {
        if v.is_empty() {
            println!("  ok    {name}");
        } else {
            println!("  FAIL  {name}: {} violations", v.len());
            for line in v.iter().take(10) {
                println!("          {line}");
            }
        }
    }
}

/// `tidepool chaos run`: one scenario (`--seed`), or every scenario of a directory for
/// `seeds` seeds each (`--matrix`), each run with `base` (its seed replaced). Returns the process
/// exit code (1 on any violation).
pub async fn main(
    path: &Path,
    matrix: bool,
    seed: Option<u64>,
    seeds: Option<u64>,
    report_path: Option<PathBuf>,
    base: RunOptions,
) -> Result<i32> {
    let netns = base.netns;
    let mut files = Vec::new();
    if matrix {
        for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "toml") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut reports = Vec::new();
    let mut scenarios = Vec::new();
    for file in &files {
        let s = Scenario::load(file)?;
        if matrix && s.scenario.needs_netns && !netns {
            println!(
                "{}: skipped (needs --netns: every node in its own network namespace, as root)",
                s.scenario.name
            );
            continue;
        }
        // Setup problems first, for every scenario: none of them is a violation.
        if let Err(e) = check_setup(&s, &base) {
            eprintln!("chaos: setup problem, nothing was run: {e}");
            return Ok(EXIT_SETUP);
        }
        scenarios.push(s);
    }
    for s in scenarios {
        let list: Vec<u64> = match (seed, seeds) {
            (Some(one), _) => vec![one],
            (None, Some(n)) => (1..=n).collect(),
            (None, None) => (1..=s.scenario.seeds).collect(),
        };
        for seed in list {
            let opts = RunOptions {
                seed,
                ..base.clone()
            };
            // A run that could not complete is a failed run, not the end of the matrix.
            let r = match run_one(&s, &opts).await {
                Ok(r) => r,
                Err(e) => RunReport {
                    scenario: s.scenario.name.clone(),
                    seed,
                    network: if netns { "netns" } else { "loopback" }.into(),
                    faults: Vec::new(),
                    ops: 0,
                    acked: 0,
                    unacked: 0,
                    duplicates_deduplicated: 0,
                    convergence_ms: None,
                    checks: BTreeMap::from([(
                        "0_run_completed".to_string(),
                        vec![format!("{e:#}")],
                    )]),
                    passed: false,
                    elapsed_ms: 0,
                },
            };
            summarize(&r);
            reports.push(r);
        }
    }
    let failed = reports.iter().filter(|r| !r.passed).count();
    println!(
        "\nchaos: {} runs, {} with violations, {} faults injected, {} ops checked",
        reports.len(),
        failed,
        reports.iter().map(|r| r.faults.len()).sum::<usize>(),
        reports.iter().map(|r| r.acked).sum::<u64>()
    );
    if let Some(p) = report_path {
        let doc = if reports.len() == 1 {
            serde_json::to_value(&reports[0])?
        } else {
            serde_json::json!({ "runs": reports })
        };
        std::fs::write(&p, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(i32::from(failed > 0))
}

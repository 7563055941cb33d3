//! The control plane: an embedded Raft group (openraft 0.9) that holds the cluster map.
//!
//! # Layout
//! - [`types`]: the openraft type config, [`NodeInfo`], [`node_id`], the replicated
//!   [`ClusterMap`], [`Command`]s and the pure [`apply`] function (the state machine).
//! - `log_store`: Raft log, vote, committed and purged markers in redb (`{data_dir}/raft.redb`).
//! - `state_machine`: the applied map and its snapshot file (`{data_dir}/raft-snapshot.json`).
//! - `store`: openraft's storage trait over the two.
//! - [`network`]: [`RaftTransport`] (implemented by the node over QUIC), openraft's network over
//!   it, and the forwarding messages.
//! - this file: [`ControlPlane`], which starts the Raft node and routes proposals and joins to the
//!   leader.
//!
//! # Forming a cluster
//! Every node is started with the same list of voters ([`ControlConfig::voters`]).
//! [`ControlPlane::bootstrap`] on the lowest-named voter initializes a pristine Raft group with
//! exactly that voter set (a no-op on any other node and on an initialized one); the other voters
//! wait for its first heartbeats. Then every node, voter or not, calls
//! [`ControlPlane::join`] with its own [`NodeInfo`]: the call is routed to the leader (via
//! [`RpcKind::Join`]), which makes a new node a Raft learner so it receives the map, updates the
//! address of a known node that rejoins from a new one, and commits [`Command::Join`] so the node
//! appears in the map. Joining is idempotent: a restarted node calls it again.
//!
//! # Guarantees
//! - A proposal returns after its entry is committed by a quorum and applied on the leader
//!   (Raft §5.3). [`ControlError::Timeout`] and [`ControlError::NoLeader`] mean "outcome unknown":
//!   the entry may still commit, which is why commands are idempotent or compare-and-set.
//! - [`ControlPlane::map`] on any member is a prefix of the leader's history: possibly behind,
//!   never diverging (Raft §5.4, State Machine Safety).
//! - [`ControlPlane::is_leader`] and [`ControlPlane::leadership`] report what this node's Raft
//!   state says *now*: a leader cut off from the majority still believes it leads until it hears
//!   of a higher term (openraft 0.9 has no check-quorum step-down). Decisions that must not be
//!   taken by a deposed leader either go through [`ControlPlane::propose`] (which cannot commit
//!   without a quorum) or call [`ControlPlane::linearizable_map`] first.

pub mod authz;
mod log_store;
pub mod network;
pub use tidepool_core::control::imports;
pub use tidepool_core::control::records;
mod state_machine;
mod store;
pub use tidepool_core::control::types;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError, RaftError,
};
use openraft::storage::Adaptor;
use openraft::{ChangeMembers, Config, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use imports::{
    ColumnPlan, Format, ImportRecord, ImportSpec, ImportState, NullPolicy, Split, SplitDone,
    SplitUnit,
};
pub use network::{RaftTransport, RpcKind};
pub use records::{AutoscaleStatus, DatasetRecord, DatasetSource, JobRecord, JobState, JobUpdate};
use store::RaftStore;
pub use types::{
    apply, node_id, AssignmentState, ClusterMap, Command, CommandResponse, Member, MemberState,
    NodeId, NodeInfo, Revoked, ShardAssignment,
};

openraft::declare_raft_types!(
    /// The openraft type configuration of the control plane.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

use network::{Directory, ForwardReply, JoinRequest, NetworkFactory, ProposeRequest};

/// Interval between polls while waiting for a leader to appear or a membership change to finish.
const POLL: Duration = Duration::from_millis(50);
/// Largest snapshot chunk sent in one [`RpcKind::Snapshot`] RPC (before JSON encoding, which
/// roughly triples it).
const SNAPSHOT_CHUNK_BYTES: u64 = 256 * 1024;

/// Control-plane configuration.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// This node's name (its identity; the Raft id is [`node_id`] of it).
    pub name: String,
    /// The address peers dial to reach this node.
    pub addr: String,
    /// Where `raft.redb` and `raft-snapshot.json` live.
    pub data_dir: PathBuf,
    /// The initial voter set, with addresses. The same on every node.
    pub voters: Vec<NodeInfo>,
    /// Leader heartbeat interval. Default 100 ms.
    pub heartbeat: Duration,
    /// Election timeout range (min, max), randomized per election. Default 300..600 ms; `min`
    /// must exceed `heartbeat`.
    pub election_timeout: (Duration, Duration),
    /// How long [`ControlPlane::propose`] and [`ControlPlane::join`] keep trying (finding the
    /// leader, forwarding, waiting for the commit). Default 5 s.
    pub propose_timeout: Duration,
    /// Build a snapshot after this many log entries since the last one, and keep this many entries
    /// behind a snapshot for slow followers. Default 500.
    pub snapshot_every: u64,
}

impl ControlConfig {
    /// A config with the defaults above.
    pub fn new(
        name: impl Into<String>,
        addr: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        voters: Vec<NodeInfo>,
    ) -> Self {
        Self {
            name: name.into(),
            addr: addr.into(),
            data_dir: data_dir.into(),
            voters,
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            propose_timeout: Duration::from_secs(5),
            snapshot_every: 500,
        }
    }

    fn validate(&self) -> Result<(), ControlError> {
        let bad = |m: String| Err(ControlError::Config(m));
        if self.name.is_empty() {
            return bad("name is empty".into());
        }
        if self.voters.is_empty() {
            return bad("voters is empty: at least one control-plane voter is required".into());
        }
        let mut ids: BTreeMap<u64, &str> = BTreeMap::new();
        for v in &self.voters {
            if let Some(other) = ids.insert(v.id(), &v.name) {
                return if other == v.name {
                    bad(format!("voter {:?} is listed twice", v.name))
                } else {
                    Err(ControlError::IdCollision {
                        name: v.name.clone(),
                        other: other.to_string(),
                        id: v.id(),
                    })
                };
            }
        }
        let (min, max) = self.election_timeout;
        if self.heartbeat.is_zero() || min <= self.heartbeat || max <= min {
            return bad(format!(
                "need 0 < heartbeat ({:?}) < election_timeout.0 ({min:?}) < election_timeout.1 ({max:?})",
                self.heartbeat
            ));
        }
        if self.snapshot_every == 0 || self.propose_timeout.is_zero() {
            return bad("snapshot_every and propose_timeout must be positive".into());
        }
        Ok(())
    }

    fn raft_config(&self) -> Result<Config, ControlError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let config = Config {
            cluster_name: "tidepool".into(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_timeout.0),
            election_timeout_max: ms(self.election_timeout.1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.snapshot_every,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            // Per snapshot chunk; openraft's default (200 ms) is tight for 256 KiB of JSON.
            install_snapshot_timeout: ms(self.election_timeout.1).max(2_000),
            ..Config::default()
        };
        config
            .validate()
            .map_err(|e| ControlError::Config(e.to_string()))
    }
}

/// Control-plane errors. Each says what it means for the caller's state.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The configuration is unusable; nothing was started.
    #[error("invalid control-plane config: {0}")]
    Config(String),
    /// The data dir could not be opened or read (including a corrupt snapshot file); nothing was
    /// started.
    #[error("control-plane storage: {0}")]
    Storage(String),
    /// openraft failed (storage error at runtime, internal error). The Raft node may have stopped.
    #[error("raft: {0}")]
    Raft(String),
    /// No leader could be found or reached before the deadline. A forwarded proposal may or may
    /// not have been committed.
    #[error("no leader reachable within {waited:?} (last: {last})")]
    NoLeader { waited: Duration, last: String },
    /// The leader accepted the command but it was not committed before the deadline (e.g. the
    /// leader lost its quorum). It may still commit later.
    #[error("not committed within {0:?}")]
    Timeout(Duration),
    /// This node is not the leader (returned by leader-only calls; `leader` is the current hint).
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeInfo> },
    /// `name` hashes to the Raft id already held by `other`; the node was not added. Rename it.
    #[error("node id {id:#x} of {name:?} is already used by {other:?}")]
    IdCollision {
        name: String,
        other: String,
        id: u64,
    },
    /// An RPC payload did not decode; nothing was done. The sender may be buggy or hostile.
    #[error("bad {kind} payload: {reason}")]
    BadPayload { kind: RpcKind, reason: String },
    /// The leader applied the join command and the state machine refused it.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The leader failed to carry out a forwarded request (its error, as text).
    #[error("leader failed: {0}")]
    Remote(String),
    /// The sender may not make this request (see [`authz`]); nothing was done.
    #[error("refused: {0}")]
    Refused(#[from] authz::Refused),
    /// An admin membership operation that cannot be carried out as asked (unknown node, last
    /// voter); nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// [`ControlPlane::shutdown`] was called.
    #[error("control plane is shut down")]
    ShutDown,
}

/// The running control plane of one node. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ControlConfig,
    id: u64,
    me: NodeInfo,
    raft: Raft<TypeConfig>,
    transport: Arc<dyn RaftTransport>,
    directory: Directory,
    map_rx: watch::Receiver<Arc<ClusterMap>>,
    leadership_tx: Arc<watch::Sender<Option<(u64, bool)>>>,
    watcher: Mutex<Option<JoinHandle<()>>>,
    stopped: AtomicBool,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("name", &self.inner.me.name)
            .field("id", &self.inner.id)
            .field("leader", &self.leader())
            .field("term", &self.term())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Opens the data dir and starts the Raft node. It does not form a cluster by itself: call
    /// [`bootstrap`](Self::bootstrap), then [`join`](Self::join).
    pub async fn start(
        cfg: ControlConfig,
        net: Arc<dyn RaftTransport>,
    ) -> Result<Self, ControlError> {
        cfg.validate()?;
        let config = Arc::new(cfg.raft_config()?);
        let dir = cfg.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || RaftStore::open(&dir))
            .await
            .map_err(|e| ControlError::Storage(e.to_string()))?
            .map_err(ControlError::Storage)?;
        let map_rx = store.subscribe();
        let id = node_id(&cfg.name);
        let me = NodeInfo::new(cfg.name.clone(), cfg.addr.clone());
        let directory: Directory = Arc::new(RwLock::new(
            cfg.voters.iter().map(|v| (v.id(), v.clone())).collect(),
        ));
        directory.write().insert(id, me.clone());
        let factory = NetworkFactory {
            transport: net.clone(),
            directory: directory.clone(),
            reach: Default::default(),
        };
        let (log_store, state_machine) = Adaptor::new(store);
        let raft = Raft::new(id, config, factory, log_store, state_machine)
            .await
            .map_err(|e| ControlError::Raft(e.to_string()))?;
        let (leadership_tx, _) = watch::channel(None);
        let leadership_tx = Arc::new(leadership_tx);
        let watcher = tokio::spawn(watch_metrics(
            id,
            raft.metrics(),
            leadership_tx.clone(),
            directory.clone(),
        ));
        tracing::info!(name = %me.name, id, data_dir = %cfg.data_dir.display(), "control plane started");
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                id,
                me,
                raft,
                transport: net,
                directory,
                map_rx,
                leadership_tx,
                watcher: Mutex::new(Some(watcher)),
                stopped: AtomicBool::new(false),
            }),
        })
    }

    /// Voters only: if this node is the lowest-named voter and the Raft group is uninitialized,
    /// initialize it with all voters. Others wait to be contacted. Idempotent.
    pub async fn bootstrap(&self) -> Result<(), ControlError> {
        self.check_running()?;
        let cfg = &self.inner.cfg;
        let lowest = cfg.voters.iter().map(|v| v.name.as_str()).min();
        if lowest != Some(self.inner.me.name.as_str()) {
            return Ok(());
        }
        if self
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| self.fatal(e))?
        {
            return Ok(());
        }
        let members: BTreeMap<u64, NodeInfo> = cfg
            .voters
            .iter()
            .map(|v| {
                if v.name == self.inner.me.name {
                    self.inner.me.clone()
                } else {
                    v.clone()
                }
            })
            .map(|v| (v.id(), v))
            .collect();
        match self.inner.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(
                    voters = cfg.voters.len(),
                    "control plane: initialized the raft group"
                );
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ControlError::Raft(e.to_string())),
        }
    }

    /// Proposes a command; if this node is not the leader, forwards it to the leader via
    /// [`RpcKind::Propose`] (retrying while there is no leader, up to
    /// [`ControlConfig::propose_timeout`]). Returns after commit + apply on the leader.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResponse, ControlError> {
        let payload = encode(&ProposeRequest { cmd: cmd.clone() })?;
        self.route(RpcKind::Propose, payload, |deadline| {
            self.propose_local(cmd.clone(), deadline)
        })
        .await
    }

    /// Join flow, run on the leader (directly or forwarded via [`RpcKind::Join`]): a node not yet
    /// in the Raft membership becomes a learner (so it replicates the map); a known node with a
    /// new address gets its address updated; a node joining as `voter` that is not one yet is
    /// caught up as a learner and then promoted. Then [`Command::Join`] is committed. A restarted
    /// node with the same name rejoins (idempotent).
    pub async fn join(&self, info: NodeInfo, voter: bool) -> Result<(), ControlError> {
        if info.name.is_empty() {
            return Err(ControlError::Config(
                "cannot join a node with an empty name".into(),
            ));
        }
        let payload = encode(&JoinRequest {
            info: info.clone(),
            voter,
        })?;
        let resp = self
            .route(RpcKind::Join, payload, |deadline| {
                self.join_local(info.clone(), voter, deadline)
            })
            .await?;
        match resp {
            CommandResponse::Rejected(r) => Err(ControlError::Rejected(r)),
            _ => Ok(()),
        }
    }

    /// The applied cluster map (every member, voter or learner, has it).
    pub fn map(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.inner.map_rx.clone()
    }

    /// On the leader: confirms leadership with a quorum (Raft §8, read-only queries), waits until
    /// everything committed before is applied, and returns the map. Elsewhere:
    /// [`ControlError::NotLeader`].
    pub async fn linearizable_map(&self) -> Result<Arc<ClusterMap>, ControlError> {
        self.check_running()?;
        let waited = self.inner.cfg.propose_timeout;
        match tokio::time::timeout(waited, self.inner.raft.ensure_linearizable()).await {
            Err(_) => Err(ControlError::Timeout(waited)),
            Ok(Ok(_)) => Ok(self.inner.map_rx.borrow().clone()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(ControlError::NotLeader {
                    leader: f.leader_node,
                })
            }
            Ok(Err(RaftError::APIError(e))) => Err(ControlError::Raft(e.to_string())),
            Ok(Err(RaftError::Fatal(e))) => Err(self.fatal(e)),
        }
    }

    /// The leader this node currently knows of, if any.
    pub fn leader(&self) -> Option<NodeInfo> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let id = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&id)
            .cloned()
            .or_else(|| self.inner.directory.read().get(&id).cloned())
    }

    /// The current Raft term as this node knows it.
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    /// Whether this node's Raft state is Leader (see the module docs for what that guarantees).
    pub fn is_leader(&self) -> bool {
        !self.inner.stopped.load(Ordering::Acquire)
            && self.inner.raft.metrics().borrow().state == ServerState::Leader
    }

    /// `Some((term, is_me))` while a leader is known, `None` otherwise; changes each time
    /// leadership does (for the lease table: a new leader must wait TTL + margin).
    pub fn leadership(&self) -> watch::Receiver<Option<(u64, bool)>> {
        self.inner.leadership_tx.subscribe()
    }

    /// This node's identity.
    pub fn me(&self) -> &NodeInfo {
        &self.inner.me
    }

    /// This node's Raft id ([`node_id`] of its name).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// openraft's own metrics (state, logs, replication, membership), for status pages and tests.
    pub fn raft_metrics(&self) -> watch::Receiver<RaftMetrics<u64, NodeInfo>> {
        self.inner.raft.metrics()
    }

    /// Stops the Raft node. The map receiver keeps its last value; every later call fails with
    /// [`ControlError::ShutDown`]. Idempotent.
    pub async fn shutdown(&self) {
        if self.inner.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "control plane: raft core did not stop cleanly");
        }
        let watcher = self.inner.watcher.lock().take();
        if let Some(h) = watcher {
            h.abort();
            // Wait until the task has really stopped: a watcher still running on another
            // worker thread could otherwise publish a leadership after the `None` below.
            let _ = h.await;
        }
        self.inner.leadership_tx.send_replace(None);
        tracing::info!(name = %self.inner.me.name, "control plane stopped");
    }

    /// Handles a control RPC that arrived from a peer: decodes `payload` (errors, never panics),
    /// runs it against the local Raft node, and returns the encoded reply for the sender.
    pub async fn handle_rpc(
        &self,
        from: &str,
        kind: RpcKind,
        payload: &[u8],
    ) -> Result<Vec<u8>, ControlError> {
        use authz::{check_entries, check_propose, check_raft, RaftRpc};
        self.check_running()?;
        let raft = &self.inner.raft;
        match kind {
            RpcKind::Append => {
                let req: openraft::raft::AppendEntriesRequest<TypeConfig> = decode(kind, payload)?;
                check_raft(
                    &self.raft_view(),
                    from,
                    req.vote.leader_id.voted_for(),
                    RaftRpc::Append,
                )?;
                check_entries(from, &req)?;
                encode(&raft.append_entries(req).await)
            }
            RpcKind::Vote => {
                let req: openraft::raft::VoteRequest<u64> = decode(kind, payload)?;
                check_raft(
                    &self.raft_view(),
                    from,
                    req.vote.leader_id.voted_for(),
                    RaftRpc::Vote,
                )?;
                encode(&raft.vote(req).await)
            }
            RpcKind::Snapshot => {
                let req: openraft::raft::InstallSnapshotRequest<TypeConfig> =
                    decode(kind, payload)?;
                check_raft(
                    &self.raft_view(),
                    from,
                    req.vote.leader_id.voted_for(),
                    RaftRpc::Snapshot,
                )?;
                encode(&raft.install_snapshot(req).await)
            }
            RpcKind::Propose => {
                let req: ProposeRequest = decode(kind, payload)?;
                // Only the leader judges (a follower answers NotLeader below), and against a
                // map at least as new as what the sender acted on: a refusal by a map whose
                // apply lags the commit is checked again after a linearizable read.
                if self.is_leader() {
                    let stale = check_propose(&self.inner.map_rx.borrow(), from, &req.cmd);
                    if stale.is_err() {
                        let fresh = self.linearizable_map().await?;
                        check_propose(&fresh, from, &req.cmd)?;
                    }
                }
                encode(
                    &self
                        .serve_forwarded(|deadline| self.propose_local(req.cmd.clone(), deadline))
                        .await,
                )
            }
            RpcKind::Join => {
                let req: JoinRequest = decode(kind, payload)?;
                if req.info.name != from {
                    return Err(authz::Refused::WrongName {
                        from: from.to_string(),
                        claimed: req.info.name,
                    }
                    .into());
                }
                encode(
                    &self
                        .serve_forwarded(|deadline| {
                            self.join_local(req.info.clone(), req.voter, deadline)
                        })
                        .await,
                )
            }
        }
    }

    /// The reply a refused forwarded request gets (`None` for Raft RPCs, which are answered
    /// with an error): the sender stops retrying and reports the reason.
    pub fn refusal_reply(kind: RpcKind, refused: &authz::Refused) -> Option<Vec<u8>> {
        match kind {
            RpcKind::Propose | RpcKind::Join => {
                encode(&ForwardReply::Failed(format!("refused: {refused}"))).ok()
            }
            RpcKind::Append | RpcKind::Vote | RpcKind::Snapshot => None,
        }
    }

    /// This node's view of the Raft membership, for [`authz::check_raft`].
    fn raft_view(&self) -> authz::RaftView {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let mem = m.membership_config.membership();
        authz::RaftView {
            voters: mem.voter_ids().collect(),
            members: mem.nodes().map(|(id, _)| *id).collect(),
            configured_voters: self.inner.cfg.voters.iter().map(NodeInfo::id).collect(),
        }
    }

    /// Current Raft voters, by name.
    pub fn voters(&self) -> Vec<String> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let mem = m.membership_config.membership();
        let ids: std::collections::BTreeSet<u64> = mem.voter_ids().collect();
        mem.nodes()
            .filter(|(id, _)| ids.contains(id))
            .map(|(_, n)| n.name.clone())
            .collect()
    }

    /// Admin, on the leader: makes member `name` a voter (caught up as a learner first), by
    /// Raft joint consensus, and records it in the map.
    pub async fn add_voter(&self, name: &str) -> Result<(), ControlError> {
        let deadline = self.leader_deadline()?;
        let info = self.member_info(name)?;
        if self.voters().iter().any(|v| v == name) {
            return Ok(());
        }
        self.change_membership(Change::AddLearner(info.clone(), true), deadline)
            .await?;
        let promote = ChangeMembers::AddVoterIds([info.id()].into());
        self.change_membership(Change::Members(promote), deadline)
            .await?;
        self.record_voter(&info, true, deadline).await
    }

    /// Admin, on the leader: removes `name` from the voters (it stays a learner, so a live node
    /// keeps receiving the map), by Raft joint consensus. The last voter cannot be removed.
    pub async fn remove_voter(&self, name: &str) -> Result<(), ControlError> {
        let deadline = self.leader_deadline()?;
        let info = self.member_info(name)?;
        let voters = self.voters();
        if !voters.iter().any(|v| v == name) {
            return Ok(());
        }
        if voters.len() == 1 {
            return Err(ControlError::Invalid(format!(
                "{name} is the only voter; add another voter first"
            )));
        }
        let demote = ChangeMembers::RemoveVoters([info.id()].into());
        self.change_membership(Change::Members(demote), deadline)
            .await?;
        self.record_voter(&info, false, deadline).await
    }

    /// Admin, on the leader: drops `name` from the Raft membership if it is a learner (after its
    /// certificate was revoked, the leader stops replicating to it). Voters must be removed
    /// with [`remove_voter`](Self::remove_voter) first. Returns whether it was dropped.
    pub async fn forget_learner(&self, name: &str) -> Result<bool, ControlError> {
        let deadline = self.leader_deadline()?;
        let Ok(info) = self.member_info(name) else {
            return Ok(false);
        };
        if self.voters().iter().any(|v| v == name) {
            return Ok(false);
        }
        let drop_it = ChangeMembers::RemoveNodes([info.id()].into());
        self.change_membership(Change::Members(drop_it), deadline)
            .await?;
        Ok(true)
    }

    fn leader_deadline(&self) -> Result<Instant, ControlError> {
        self.check_running()?;
        if !self.is_leader() {
            return Err(ControlError::NotLeader {
                leader: self.leader(),
            });
        }
        Ok(Instant::now() + self.inner.cfg.propose_timeout)
    }

    /// A member's Raft node info (its current address), by name.
    fn member_info(&self, name: &str) -> Result<NodeInfo, ControlError> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let mem = m.membership_config.membership();
        mem.get_node(&node_id(name))
            .filter(|n| n.name == name)
            .cloned()
            .ok_or_else(|| {
                ControlError::Invalid(format!(
                    "{name} is not a member of the Raft group (it must have joined first)"
                ))
            })
    }

    async fn record_voter(
        &self,
        info: &NodeInfo,
        voter: bool,
        deadline: Instant,
    ) -> Result<(), ControlError> {
        let cmd = Command::SetVoter {
            name: info.name.clone().into(),
            voter,
        };
        match self.propose_local(cmd, deadline).await? {
            CommandResponse::Rejected(r) => Err(ControlError::Rejected(r)),
            _ => Ok(()),
        }
    }

    fn check_running(&self) -> Result<(), ControlError> {
        if self.inner.stopped.load(Ordering::Acquire) {
            Err(ControlError::ShutDown)
        } else {
            Ok(())
        }
    }

    fn fatal(&self, e: impl fmt::Display) -> ControlError {
        if self.inner.stopped.load(Ordering::Acquire) {
            ControlError::ShutDown
        } else {
            ControlError::Raft(e.to_string())
        }
    }

    /// Runs `local` if this node leads, else forwards `payload` to the leader (or, while none is
    /// known, to the configured voters in turn, following their `NotLeader` hints), until the
    /// deadline.
    async fn route<F, Fut>(
        &self,
        kind: RpcKind,
        payload: Vec<u8>,
        local: F,
    ) -> Result<CommandResponse, ControlError>
    where
        F: Fn(Instant) -> Fut,
        Fut: Future<Output = Result<CommandResponse, ControlError>>,
    {
        let waited = self.inner.cfg.propose_timeout;
        let deadline = Instant::now() + waited;
        let mut hint: Option<NodeInfo> = None;
        let mut next_voter = 0usize;
        let mut last = String::from("no leader known");
        let mut followed_hint = false;
        loop {
            self.check_running()?;
            if self.is_leader() {
                match local(deadline).await {
                    Err(ControlError::NotLeader { leader }) => {
                        last = "lost leadership".into();
                        hint = leader;
                    }
                    other => return other,
                }
            } else if let Some(target) = self.forward_target(hint.take(), &mut next_voter) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(
                    remaining,
                    self.inner.transport.call(&target, kind, payload.clone()),
                )
                .await
                {
                    Ok(Ok(bytes)) => match serde_json::from_slice::<ForwardReply>(&bytes) {
                        Ok(ForwardReply::Done(resp)) => return Ok(resp),
                        Ok(ForwardReply::Failed(msg)) => return Err(ControlError::Remote(msg)),
                        Ok(ForwardReply::NotLeader { leader }) => {
                            last = format!("{} is not the leader", target.name);
                            hint = leader.filter(|l| l.name != target.name);
                            // Follow a fresh hint at once, but only once in a row: two nodes
                            // with stale views could otherwise bounce us between them.
                            if hint.is_some() && !followed_hint {
                                followed_hint = true;
                                continue;
                            }
                        }
                        Err(e) => last = format!("bad reply from {}: {e}", target.name),
                    },
                    Ok(Err(e)) => last = format!("{}: {e}", target.name),
                    Err(_) => last = format!("{}: no reply", target.name),
                }
            }
            followed_hint = false;
            if Instant::now() >= deadline {
                return Err(ControlError::NoLeader { waited, last });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whom to forward to: the hint, else the known leader, else the next configured voter.
    fn forward_target(&self, hint: Option<NodeInfo>, next_voter: &mut usize) -> Option<NodeInfo> {
        let me = &self.inner.me.name;
        if let Some(h) = hint.filter(|h| &h.name != me) {
            return Some(h);
        }
        if let Some(l) = self.leader().filter(|l| &l.name != me) {
            return Some(l);
        }
        let others: Vec<&NodeInfo> = self
            .inner
            .cfg
            .voters
            .iter()
            .filter(|v| &v.name != me)
            .collect();
        if others.is_empty() {
            return None;
        }
        let pick = others[*next_voter % others.len()];
        *next_voter = next_voter.wrapping_add(1);
        Some(
            self.inner
                .directory
                .read()
                .get(&pick.id())
                .cloned()
                .unwrap_or_else(|| pick.clone()),
        )
    }

    /// The receiving side of a forwarded request: served only by the leader, never forwarded again.
    async fn serve_forwarded<F, Fut>(&self, local: F) -> ForwardReply
    where
        F: FnOnce(Instant) -> Fut,
        Fut: Future<Output = Result<CommandResponse, ControlError>>,
    {
        if !self.is_leader() {
            return ForwardReply::NotLeader {
                leader: self.leader(),
            };
        }
        match local(Instant::now() + self.inner.cfg.propose_timeout).await {
            Ok(resp) => ForwardReply::Done(resp),
            Err(ControlError::NotLeader { leader }) => ForwardReply::NotLeader { leader },
            Err(e) => ForwardReply::Failed(e.to_string()),
        }
    }

    /// `client_write` on this node, bounded by `deadline`.
    async fn propose_local(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<CommandResponse, ControlError> {
        let started = Instant::now();
        let remaining = deadline.saturating_duration_since(started);
        match tokio::time::timeout(remaining, self.inner.raft.client_write(cmd)).await {
            Err(_) => Err(ControlError::Timeout(self.inner.cfg.propose_timeout)),
            Ok(Ok(resp)) => {
                metrics::histogram!("tidepool_raft_commit_latency_seconds")
                    .record(started.elapsed().as_secs_f64());
                Ok(resp.data)
            }
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    fn write_error(&self, e: RaftError<u64, ClientWriteError<u64, NodeInfo>>) -> ControlError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ControlError::NotLeader {
                leader: f.leader_node,
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ControlError::Raft(e.to_string())
            }
            RaftError::Fatal(f) => self.fatal(f),
        }
    }

    /// The join flow on the leader (see [`join`](Self::join)).
    async fn join_local(
        &self,
        info: NodeInfo,
        voter: bool,
        deadline: Instant,
    ) -> Result<CommandResponse, ControlError> {
        let id = info.id();
        let (existing, is_voter) = {
            let metrics = self.inner.raft.metrics();
            let m = metrics.borrow();
            let mem = m.membership_config.membership();
            (mem.get_node(&id).cloned(), mem.voter_ids().any(|v| v == id))
        };
        let collision = match &existing {
            Some(n) if n.name != info.name => Some(n.name.clone()),
            _ => self
                .inner
                .map_rx
                .borrow()
                .members
                .keys()
                .find(|n| **n != info.name && node_id(n) == id)
                .map(|n| n.to_string()),
        };
        if let Some(other) = collision {
            return Err(ControlError::IdCollision {
                name: info.name,
                other,
                id,
            });
        }
        match &existing {
            None => {
                self.change_membership(Change::AddLearner(info.clone(), false), deadline)
                    .await?
            }
            Some(n) if n.addr != info.addr => {
                let set = ChangeMembers::SetNodes(BTreeMap::from([(id, info.clone())]));
                self.change_membership(Change::Members(set), deadline)
                    .await?;
            }
            Some(_) => {}
        }
        if voter && !is_voter {
            // Voters are managed (`cluster voters add`), never self-declared: a node whose
            // config claims a vote the cluster does not give it runs as a learner.
            tracing::warn!(node = %info.name,
                "node's config lists it as a voter but the cluster does not; it joins as a learner (an admin can run `tidepool cluster voters add {}`)",
                info.name);
        }
        let voter = is_voter;
        let cmd = Command::Join {
            name: info.name.into(),
            addr: info.addr,
            voter,
        };
        self.propose_local(cmd, deadline).await
    }

    /// One membership change, retried while another is in progress, bounded by `deadline`.
    async fn change_membership(
        &self,
        change: Change,
        deadline: Instant,
    ) -> Result<(), ControlError> {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let raft = &self.inner.raft;
            let fut = async {
                match &change {
                    Change::AddLearner(info, blocking) => {
                        raft.add_learner(info.id(), info.clone(), *blocking).await
                    }
                    Change::Members(c) => raft.change_membership(c.clone(), true).await,
                }
            };
            match tokio::time::timeout(remaining, fut).await {
                Err(_) => return Err(ControlError::Timeout(self.inner.cfg.propose_timeout)),
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                )))) if Instant::now() + POLL < deadline => tokio::time::sleep(POLL).await,
                Ok(Err(e)) => return Err(self.write_error(e)),
            }
        }
    }
}

enum Change {
    /// `add_learner(node, blocking)`: blocking waits until the learner has caught up.
    AddLearner(NodeInfo, bool),
    Members(ChangeMembers<u64, NodeInfo>),
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ControlError> {
    serde_json::to_vec(value).map_err(|e| ControlError::Raft(format!("encoding: {e}")))
}

fn decode<T: DeserializeOwned>(kind: RpcKind, payload: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(payload).map_err(|e| ControlError::BadPayload {
        kind,
        reason: e.to_string(),
    })
}

/// Follows openraft's metrics: leadership watch, leader-change counter, term gauge, and the
/// address directory used by the network.
async fn watch_metrics(
    id: u64,
    mut rx: watch::Receiver<RaftMetrics<u64, NodeInfo>>,
    leadership: Arc<watch::Sender<Option<(u64, bool)>>>,
    directory: Directory,
) {
    let mut last_leader: Option<(u64, u64)> = None;
    let mut last_membership = None;
    loop {
        {
            let m = rx.borrow_and_update();
            metrics::gauge!(crate::metrics::RAFT_TERM).set(m.current_term as f64);
            let now = m.current_leader.map(|l| (m.current_term, l));
            let leading = now.is_some_and(|(_, leader)| leader == id);
            metrics::gauge!(crate::metrics::RAFT_IS_LEADER).set(if leading { 1.0 } else { 0.0 });
            if now.is_some() && now != last_leader {
                metrics::counter!(crate::metrics::RAFT_LEADER_CHANGES).increment(1);
                last_leader = now;
                if let Some((term, leader)) = now {
                    // Operators know nodes by name; the Raft id is a hash of it.
                    let name = m
                        .membership_config
                        .nodes()
                        .find(|(nid, _)| **nid == leader)
                        .map(|(_, n)| n.name.clone())
                        .or_else(|| directory.read().get(&leader).map(|n| n.name.clone()))
                        .unwrap_or_else(|| "unknown".into());
                    tracing::info!(
                        term,
                        leader = %name,
                        me = leading,
                        "control plane: leader changed"
                    );
                }
            }
            let value = now.map(|(term, leader)| (term, leader == id));
            leadership.send_if_modified(|v| {
                let changed = *v != value;
                *v = value;
                changed
            });
            let membership = m.membership_config.log_id().to_owned();
            if last_membership != Some(membership) {
                last_membership = Some(membership);
                let mut dir = directory.write();
                for (nid, node) in m.membership_config.nodes() {
                    dir.insert(*nid, node.clone());
                }
            }
        }
        if rx.changed().await.is_err() {
            break;
        }
    }
}

//! The replicated cluster map, the commands that change it, and the pure function that applies
//! them.
//!
//! [`apply`] is the whole state machine: deterministic, no IO, no clocks, no randomness. Every
//! replica applies the same committed commands in the same order and so holds the same map.
//! Commands are written to be safe to retry: `Init`, `Join` and `SetMemberState` are idempotent,
//! and `Assign` is a compare-and-set on the shard epoch, so a proposal that is forwarded twice
//! (or a stale leader's decision) cannot take effect twice.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::imports::{self, ImportRecord, SplitDone};
use super::records::{self, AutoscaleStatus, DatasetRecord, JobRecord, JobUpdate};
pub use crate::node_id::NodeId;

/// Seed of [`node_id`]: ASCII "raftnode". Changing it renames every Raft node: never change it.
const NODE_ID_SEED: u64 = 0x7261_6674_6e6f_6465;

/// The Raft node id of the member called `name`: `xxh3_64(name, seed 0x7261_6674_6e6f_6465)`.
///
/// Stable across processes, platforms and versions, so a node that restarts (or rejoins with a new
/// address) keeps its id without storing it. Two different names could in principle hash to the
/// same id (about 2^-64 per pair); the control plane refuses to start with colliding voters and
/// refuses to join a node whose id is already held by a different name
/// (`ControlError::IdCollision` in the runtime's control plane): rename the node.
pub fn node_id(name: &str) -> u64 {
    xxh3_64_with_seed(name.as_bytes(), NODE_ID_SEED)
}

/// What the Raft membership stores about a node: its name (identity, the certificate CN) and the
/// address to dial it at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub addr: String,
}

impl NodeInfo {
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            addr: addr.into(),
        }
    }

    /// This node's Raft id, [`node_id`] of its name.
    pub fn id(&self) -> u64 {
        node_id(&self.name)
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// A member's lifecycle state in the cluster map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Known to the cluster, not yet serving shards.
    Joining,
    /// Serving.
    Up,
    /// Handing its shards off before it leaves.
    Draining,
    /// Gone (left or declared dead); keeps its entry so it can rejoin under the same name.
    Down,
}

impl MemberState {
    /// The stable lowercase name used in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Up => "up",
            MemberState::Draining => "draining",
            MemberState::Down => "down",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One member of the cluster (voter or learner of the Raft group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: NodeId,
    pub addr: String,
    pub state: MemberState,
    /// Whether the member votes in the control-plane Raft group.
    pub voter: bool,
}

/// Who owns one shard, at which epoch, and where it is being handed to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAssignment {
    pub owner: Option<NodeId>,
    /// Fencing epoch (ARCHITECTURE.md invariant 2): every change of ownership bumps it.
    pub epoch: u64,
    pub handoff_to: Option<NodeId>,
}

/// Where a shard's assignment stands (what `cluster shards` reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignmentState {
    /// Owned, no handoff in progress.
    Serving,
    /// Owned, with a handoff target set.
    Handoff,
    /// No owner yet.
    Unassigned,
}

impl ShardAssignment {
    /// `Handoff` while a handoff target is set, else `Serving` with an owner, else `Unassigned`.
    pub fn state(&self) -> AssignmentState {
        if self.handoff_to.is_some() {
            AssignmentState::Handoff
        } else if self.owner.is_some() {
            AssignmentState::Serving
        } else {
            AssignmentState::Unassigned
        }
    }
}

/// The replicated cluster map. Every member, voter or learner, holds an applied copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub members: BTreeMap<NodeId, Member>,
    /// Indexed by shard id; empty until [`Command::Init`].
    pub shards: Vec<ShardAssignment>,
    /// Imported (or synthetic) datasets by name.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetRecord>,
    /// Jobs by id.
    #[serde(default)]
    pub jobs: BTreeMap<String, JobRecord>,
    /// The leader's latest autoscaling recommendation.
    #[serde(default)]
    pub autoscale: Option<AutoscaleStatus>,
    /// Index of the last Raft log entry applied to this copy (0 before any). Lease grants carry
    /// the leader's, and a node serves on a grant only once its own copy has caught up with it.
    #[serde(default)]
    pub applied_index: u64,
    /// Imports from object storage by id, running and finished.
    #[serde(default)]
    pub imports: BTreeMap<String, ImportRecord>,
    /// Revoked certificates by serial (lowercase hex): handshakes presenting one are refused
    /// and live connections of one are closed.
    #[serde(default)]
    pub revoked: BTreeMap<String, Revoked>,
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The name the certificate was issued to (for operators; the serial is what counts).
    pub name: String,
    /// When it was revoked (milliseconds since the Unix epoch, from the admin's request).
    pub at_ms: u64,
}

impl ClusterMap {
    /// Number of shards (0 before [`Command::Init`]).
    pub fn shard_count(&self) -> u32 {
        u32::try_from(self.shards.len()).unwrap_or(u32::MAX)
    }
}

/// A change to the cluster map; the Raft log's entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Sets the shard count once: all shards unassigned at epoch 0. Applying it again with the
    /// same count is a no-op `Ok`; with a different count it is `Rejected` (the count is fixed for
    /// the life of the cluster).
    Init { shards: u32 },
    /// Adds a member as `Joining`, or updates a known one (a rejoin: same name, maybe a new
    /// address). A rejoining member that was `Up` stays `Up`; otherwise it becomes `Joining`.
    Join {
        name: NodeId,
        addr: String,
        voter: bool,
    },
    /// Records whether a known member is a Raft voter (after an admin changed the voter set by
    /// joint consensus); `Rejected` for an unknown name.
    SetVoter { name: NodeId, voter: bool },
    /// Puts a certificate serial on the revocation list (idempotent; never undone).
    Revoke {
        serial: String,
        name: String,
        at_ms: u64,
    },
    /// Sets a known member's state; `Rejected` for an unknown name.
    SetMemberState { name: NodeId, state: MemberState },
    /// Shard changes; each carries the epoch it expects to replace (compare-and-set) so a stale
    /// leader decision cannot apply twice. `Rejected` when the shard's epoch is not
    /// `expect_epoch`, when `epoch < expect_epoch` (epochs never go back), when the shard does not
    /// exist, or when `owner`/`handoff_to` name an unknown member.
    Assign {
        shard: u32,
        expect_epoch: u64,
        owner: Option<NodeId>,
        epoch: u64,
        handoff_to: Option<NodeId>,
    },
    /// Several commands in one log entry, applied all-or-nothing: if any is rejected, none takes
    /// effect and every response is `Rejected` (the failing one with its reason, the others with
    /// "batch aborted").
    Batch(Vec<Command>),
    /// Registers an imported dataset (create-once; see [`super::records`]).
    PutDataset(Box<DatasetRecord>),
    /// Registers a job as `Pending` (create-once).
    SubmitJob(JobRecord),
    /// Progress, completion or cancellation of a job (steps never go back; terminal is final).
    UpdateJob { id: String, update: JobUpdate },
    /// Records the leader's autoscaling recommendation (always applies).
    SetAutoscale(AutoscaleStatus),
    /// Removes a dataset record (`dataset delete`); `Rejected` while a pending or running job
    /// uses it. Appended last: the log's existing entries keep their meaning.
    DeleteDataset { name: String },
    /// Records a planned import from storage (see [`super::imports`]).
    StartImport(Box<ImportRecord>),
    /// One split of an import was read and written; the last one creates the dataset.
    ImportSplitDone {
        id: String,
        split: u32,
        done: Box<SplitDone>,
    },
    /// An import failed: nothing of it becomes visible.
    FailImport { id: String, error: String },
}

/// The result of applying one [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    Ok,
    /// The command was valid Raft input but did not change the map (e.g. CAS mismatch).
    Rejected(String),
    Batch(Vec<CommandResponse>),
}

impl CommandResponse {
    /// True for `Ok` and for a batch whose every response is ok.
    pub fn is_ok(&self) -> bool {
        match self {
            CommandResponse::Ok => true,
            CommandResponse::Rejected(_) => false,
            CommandResponse::Batch(rs) => rs.iter().all(CommandResponse::is_ok),
        }
    }

    /// Why the command was rejected, as a sentence for the user (the first rejection of a
    /// batch); `None` when it was not.
    pub fn rejection(&self) -> Option<&str> {
        match self {
            CommandResponse::Ok => None,
            CommandResponse::Rejected(r) => Some(r),
            CommandResponse::Batch(rs) => rs.iter().find_map(CommandResponse::rejection),
        }
    }
}

/// Applies `cmd` to `map`. Deterministic and pure: the state machine of the control plane.
pub fn apply(map: &mut ClusterMap, cmd: &Command) -> CommandResponse {
    match cmd {
        Command::Init { shards } => init(map, *shards),
        Command::Join { name, addr, voter } => join(map, name, addr, *voter),
        Command::SetVoter { name, voter } => match map.members.get_mut(name) {
            Some(m) => {
                m.voter = *voter;
                CommandResponse::Ok
            }
            None => CommandResponse::Rejected(format!("unknown member {name:?}")),
        },
        Command::Revoke {
            serial,
            name,
            at_ms,
        } => {
            if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                return CommandResponse::Rejected(format!("{serial:?} is not a hex serial"));
            }
            map.revoked
                .entry(serial.to_ascii_lowercase())
                .or_insert_with(|| Revoked {
                    name: name.clone(),
                    at_ms: *at_ms,
                });
            CommandResponse::Ok
        }
        Command::SetMemberState { name, state } => match map.members.get_mut(name) {
            Some(m) => {
                m.state = *state;
                CommandResponse::Ok
            }
            None => CommandResponse::Rejected(format!("unknown member {name:?}")),
        },
        Command::Assign {
            shard,
            expect_epoch,
            owner,
            epoch,
            handoff_to,
        } => assign(map, *shard, *expect_epoch, owner, *epoch, handoff_to),
        Command::Batch(cmds) => batch(map, cmds),
        Command::PutDataset(rec) => records::put_dataset(map, rec),
        Command::SubmitJob(rec) => records::submit_job(map, rec),
        Command::DeleteDataset { name } => records::delete_dataset(map, name),
        Command::UpdateJob { id, update } => records::update_job(map, id, update),
        Command::StartImport(rec) => imports::start_import(map, rec),
        Command::ImportSplitDone { id, split, done } => imports::split_done(map, id, *split, done),
        Command::FailImport { id, error } => imports::fail_import(map, id, error),
        Command::SetAutoscale(status) => {
            map.autoscale = Some(status.clone());
            CommandResponse::Ok
        }
    }
}

fn init(map: &mut ClusterMap, shards: u32) -> CommandResponse {
    if shards == 0 {
        return CommandResponse::Rejected("shard count must be at least 1".into());
    }
    if map.shards.is_empty() {
        map.shards = vec![ShardAssignment::default(); shards as usize];
        CommandResponse::Ok
    } else if map.shard_count() == shards {
        CommandResponse::Ok
    } else {
        CommandResponse::Rejected(format!(
            "shard count is already {}, cannot change it to {shards}",
            map.shards.len()
        ))
    }
}

fn join(map: &mut ClusterMap, name: &str, addr: &str, voter: bool) -> CommandResponse {
    if name.is_empty() {
        return CommandResponse::Rejected("member name is empty".into());
    }
    let member = map
        .members
        .entry(NodeId::from(name))
        .or_insert_with(|| Member {
            name: NodeId::from(name),
            addr: addr.to_string(),
            state: MemberState::Joining,
            voter,
        });
    member.addr = addr.to_string();
    member.voter = voter;
    if member.state != MemberState::Up {
        member.state = MemberState::Joining;
    }
    CommandResponse::Ok
}

fn assign(
    map: &mut ClusterMap,
    shard: u32,
    expect_epoch: u64,
    owner: &Option<NodeId>,
    epoch: u64,
    handoff_to: &Option<NodeId>,
) -> CommandResponse {
    for name in owner.iter().chain(handoff_to.iter()) {
        if !map.members.contains_key(name.as_str()) {
            return CommandResponse::Rejected(format!("unknown member {name:?}"));
        }
    }
    let Some(slot) = map.shards.get_mut(shard as usize) else {
        return CommandResponse::Rejected(format!(
            "no shard {shard} (shard count {})",
            map.shards.len()
        ));
    };
    if slot.epoch != expect_epoch {
        return CommandResponse::Rejected(format!(
            "shard {shard}: epoch is {}, expected {expect_epoch}",
            slot.epoch
        ));
    }
    if epoch < expect_epoch {
        return CommandResponse::Rejected(format!(
            "shard {shard}: epoch {epoch} would go back from {expect_epoch}"
        ));
    }
    *slot = ShardAssignment {
        owner: owner.clone(),
        epoch,
        handoff_to: handoff_to.clone(),
    };
    CommandResponse::Ok
}

fn batch(map: &mut ClusterMap, cmds: &[Command]) -> CommandResponse {
    let mut scratch = map.clone();
    let responses: Vec<CommandResponse> = cmds.iter().map(|c| apply(&mut scratch, c)).collect();
    if responses.iter().all(CommandResponse::is_ok) {
        *map = scratch;
        return CommandResponse::Batch(responses);
    }
    CommandResponse::Batch(
        responses
            .into_iter()
            .map(|r| match r {
                r @ CommandResponse::Rejected(_) => r,
                r @ CommandResponse::Batch(_) if !r.is_ok() => r,
                _ => CommandResponse::Rejected("batch aborted".into()),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(names: &[&str]) -> ClusterMap {
        let mut map = ClusterMap::default();
        assert_eq!(
            apply(&mut map, &Command::Init { shards: 4 }),
            CommandResponse::Ok
        );
        for n in names {
            let cmd = Command::Join {
                name: n.into(),
                addr: format!("{n}:7400"),
                voter: false,
            };
            assert_eq!(apply(&mut map, &cmd), CommandResponse::Ok);
        }
        map
    }

    fn assign(
        shard: u32,
        expect_epoch: u64,
        owner: Option<&str>,
        epoch: u64,
        handoff: Option<&str>,
    ) -> Command {
        Command::Assign {
            shard,
            expect_epoch,
            owner: owner.map(NodeId::from),
            epoch,
            handoff_to: handoff.map(NodeId::from),
        }
    }

    #[test]
    fn node_id_is_stable_and_distinct() {
        assert_eq!(node_id("n1"), node_id("n1"));
        assert_ne!(node_id("n1"), node_id("n2"));
        // Golden value: changing the seed or the hash would rename every Raft node on disk.
        assert_eq!(
            node_id("n1"),
            xxh3_64_with_seed(b"n1", 0x7261_6674_6e6f_6465)
        );
        assert_eq!(NodeInfo::new("n1", "a").to_string(), "n1@a");
    }

    #[test]
    fn init_sets_shards_once() {
        let mut map = ClusterMap::default();
        assert_eq!(
            apply(&mut map, &Command::Init { shards: 0 }),
            CommandResponse::Rejected("shard count must be at least 1".into())
        );
        assert_eq!(
            apply(&mut map, &Command::Init { shards: 3 }),
            CommandResponse::Ok
        );
        assert_eq!(map.shards.len(), 3);
        assert!(map
            .shards
            .iter()
            .all(|s| s.state() == AssignmentState::Unassigned && s.epoch == 0));
        assert_eq!(
            apply(&mut map, &Command::Init { shards: 3 }),
            CommandResponse::Ok
        );
        assert!(!apply(&mut map, &Command::Init { shards: 5 }).is_ok());
        assert_eq!(map.shards.len(), 3);
    }

    #[test]
    fn join_and_rejoin() {
        let mut map = joined(&["a"]);
        assert_eq!(map.members["a"].state, MemberState::Joining);
        apply(
            &mut map,
            &Command::SetMemberState {
                name: "a".into(),
                state: MemberState::Up,
            },
        );
        // Rejoin with a new address keeps Up.
        apply(
            &mut map,
            &Command::Join {
                name: "a".into(),
                addr: "new:1".into(),
                voter: true,
            },
        );
        let a = &map.members["a"];
        assert_eq!(
            (a.addr.as_str(), a.state, a.voter),
            ("new:1", MemberState::Up, true)
        );
        // A Down member that rejoins is Joining again.
        apply(
            &mut map,
            &Command::SetMemberState {
                name: "a".into(),
                state: MemberState::Down,
            },
        );
        apply(
            &mut map,
            &Command::Join {
                name: "a".into(),
                addr: "new:1".into(),
                voter: true,
            },
        );
        assert_eq!(map.members["a"].state, MemberState::Joining);
        assert!(!apply(
            &mut map,
            &Command::Join {
                name: NodeId::default(),
                addr: "x".into(),
                voter: false
            }
        )
        .is_ok());
        assert!(!apply(
            &mut map,
            &Command::SetMemberState {
                name: "zz".into(),
                state: MemberState::Up
            }
        )
        .is_ok());
    }

    #[test]
    fn assign_is_compare_and_set() {
        let mut map = joined(&["a", "b"]);
        assert_eq!(
            apply(&mut map, &assign(1, 0, Some("a"), 1, None)),
            CommandResponse::Ok
        );
        assert_eq!(map.shards[1].state(), AssignmentState::Serving);
        // The same decision again (a retry, a stale leader) is rejected: epoch is now 1.
        assert!(matches!(
            apply(&mut map, &assign(1, 0, Some("a"), 1, None)),
            CommandResponse::Rejected(_)
        ));
        assert_eq!(
            apply(&mut map, &assign(1, 1, Some("a"), 1, Some("b"))),
            CommandResponse::Ok
        );
        assert_eq!(map.shards[1].state(), AssignmentState::Handoff);
        assert_eq!(
            apply(&mut map, &assign(1, 1, Some("b"), 2, None)),
            CommandResponse::Ok
        );
        assert_eq!(
            map.shards[1],
            ShardAssignment {
                owner: Some("b".into()),
                epoch: 2,
                handoff_to: None
            }
        );
        // Epochs never go back, shards must exist, owners must be members.
        assert!(!apply(&mut map, &assign(1, 2, Some("a"), 1, None)).is_ok());
        assert!(!apply(&mut map, &assign(9, 0, Some("a"), 1, None)).is_ok());
        assert!(!apply(&mut map, &assign(0, 0, Some("zz"), 1, None)).is_ok());
        assert!(!apply(&mut map, &assign(0, 0, Some("a"), 1, Some("zz"))).is_ok());
        assert_eq!(map.shards[0], ShardAssignment::default());
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut map = joined(&["a"]);
        let ok = Command::Batch(vec![
            assign(0, 0, Some("a"), 1, None),
            assign(1, 0, Some("a"), 1, None),
        ]);
        assert_eq!(
            apply(&mut map, &ok),
            CommandResponse::Batch(vec![CommandResponse::Ok, CommandResponse::Ok])
        );
        let before = map.clone();
        let bad = Command::Batch(vec![
            assign(2, 0, Some("a"), 1, None),
            assign(0, 0, Some("a"), 2, None),
        ]);
        let resp = apply(&mut map, &bad);
        assert!(!resp.is_ok());
        match resp {
            CommandResponse::Batch(rs) => {
                assert_eq!(rs[0], CommandResponse::Rejected("batch aborted".into()));
                assert!(matches!(&rs[1], CommandResponse::Rejected(r) if r.contains("expected 0")));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(map, before);
    }

    #[test]
    fn apply_is_deterministic() {
        let cmds = [
            Command::Init { shards: 8 },
            Command::Join {
                name: "a".into(),
                addr: "1".into(),
                voter: true,
            },
            Command::Join {
                name: "b".into(),
                addr: "2".into(),
                voter: false,
            },
            assign(3, 0, Some("b"), 1, None),
            Command::SetMemberState {
                name: "a".into(),
                state: MemberState::Draining,
            },
        ];
        let run = || {
            let mut m = ClusterMap::default();
            let rs: Vec<_> = cmds.iter().map(|c| apply(&mut m, c)).collect();
            (m, rs)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn serde_names_are_stable() {
        for s in [
            MemberState::Joining,
            MemberState::Up,
            MemberState::Draining,
            MemberState::Down,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        let cmd = Command::Batch(vec![
            Command::Init { shards: 2 },
            assign(0, 0, Some("a"), 1, None),
        ]);
        let back: Command = serde_json::from_slice(&serde_json::to_vec(&cmd).unwrap()).unwrap();
        assert_eq!(back, cmd);
    }
}

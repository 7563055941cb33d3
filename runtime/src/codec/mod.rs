//! The wire: every cross-node message is an rkyv-archived [`Envelope`] in a length-prefixed frame.
//!
//! This is the only module with rkyv derives. Everything that leaves or enters a node goes through
//! [`encode`] and [`Frame::decode`]; bytes from the network are size-checked before any allocation
//! and validated with `rkyv::access` (bytecheck) before anything reads them (invariant 5).
//!
//! Frame layout (all little-endian):
//! ```text
//! +-----------+-------------+------------+----------------------------+
//! | len: u32  | version:u16 | flags: u16 | rkyv archive of Envelope   |
//! +-----------+-------------+------------+----------------------------+
//!   len counts only the archive bytes; it is checked against the max frame size before the
//!   receive buffer is allocated, and the version is checked before validation.
//! ```

mod frame;
mod job;
mod persist;
mod tensor;

pub use frame::{
    encode, read_frame, read_frame_limited, EncodedFrame, Frame, ReadLimits, FRAME_HEADER_LEN,
};
pub use job::{
    AdminOp, ArchivedAdminOp, ArchivedParamReply, ArchivedParamStatus, DatasetPart, JobPartial,
    JobTask, ParamGrads, ParamKeys, ParamPull, ParamPush, ParamReply, ParamSnapshot, ParamStatus,
    ShardEpoch, WideSum, FIXED_FRAC_BITS, RESULT_CHUNK_HEADER,
};
pub use persist::{
    decode_log, decode_param_snapshot, decode_snapshot, encode_log, encode_log_refs,
    encode_param_snapshot, encode_snapshot, with_log, ArchivedLogRecord, LogRecord, LogRecordRef,
    OpRef, SenderWindow, ShardRequestRef, ShardSnapshot, SnapValue,
};
pub use tensor::TensorView;

use rkyv::{Archive, Deserialize, Serialize};

/// Wire protocol version. Bump on any change to the archived layout.
pub const PROTOCOL_VERSION: u16 = 6;

/// Default cap on one frame's archive bytes (64 MiB); `transport.max_frame_bytes` overrides it.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// One message between two endpoints (node or client).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Protocol version of the sender; must equal [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The sending node's name (informational: identity comes from the peer's certificate).
    pub source: String,
    /// Where the message is going.
    pub dest: Dest,
    /// Matches a reply to its request; 0 for one-way messages.
    pub correlation: u64,
    /// The payload; its variant is the message kind.
    pub body: Body,
}

/// Destination of an envelope.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Dest {
    /// A node, by name (control messages).
    Node(String),
    /// A shard at the epoch the sender believes current (fencing, invariant 2).
    Shard { shard: u32, epoch: u64 },
    /// The other end of this connection (replies, client requests).
    Peer,
}

/// Idempotency key of an operation: the sender's id plus its per-sender sequence number.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdemKey {
    pub sender: u64,
    pub seq: u64,
}

/// An operation on a shard's key-value state.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
    },
    Incr {
        key: String,
        delta: i64,
    },
    /// Add `values` element-wise into the f32 vector stored at `key` (gradient accumulation).
    AddTensor {
        key: String,
        values: Vec<f32>,
    },
    /// Read the f32 vector stored at `key`.
    GetTensor {
        key: String,
    },
}

/// A request to a shard.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ShardRequest {
    pub idem: IdemKey,
    pub op: Op,
}

/// The result of a shard operation.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum OpResult {
    /// Applied now.
    Done,
    /// This idempotency key was applied before; nothing was applied again.
    Duplicate,
    /// Value of a `Get` (None: no such key).
    Value(Option<Vec<u8>>),
    /// Counter value after an `Incr`.
    Counter(i64),
    /// Contents of a `GetTensor` (empty: no such key).
    Tensor(Vec<f32>),
}

/// Why a request failed. `retryable()` tells a client whether to try again.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// This node does not own the shard (or the epoch is stale); refresh the map and retry.
    NotOwner,
    /// The shard's queue is full; back off and retry.
    Overloaded,
    /// The request is invalid and will fail again (bad key, tensor length mismatch, ...).
    BadRequest,
    /// The caller's role may not do this.
    Forbidden,
    /// The node is shutting down; retry elsewhere.
    ShuttingDown,
    /// Something failed on the node; retrying may help.
    Internal,
    /// This node is not the control-plane leader; ask the leader (retryable).
    NotLeader,
    /// What the request names (a job, a dataset, a member) does not exist.
    NotFound,
    /// The request clashes with what exists (a dataset name already taken).
    Conflict,
}

impl ErrorCode {
    /// Whether the same request may succeed if sent again later.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            ErrorCode::BadRequest
                | ErrorCode::Forbidden
                | ErrorCode::NotFound
                | ErrorCode::Conflict
        )
    }
}

/// A member's state in `cluster status` (the control map's `MemberState`, on the wire).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireMemberState {
    Up,
    Joining,
    Draining,
    Down,
    /// A configured voter of a cluster that has not formed yet (before any map exists).
    Forming,
}

impl WireMemberState {
    /// As the CLI prints it: `up`, `joining`, `draining`, `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            WireMemberState::Up => "up",
            WireMemberState::Joining => "joining",
            WireMemberState::Draining => "draining",
            WireMemberState::Down => "down",
            WireMemberState::Forming => "forming",
        }
    }
}

impl std::fmt::Display for WireMemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl From<crate::control::MemberState> for WireMemberState {
    fn from(s: crate::control::MemberState) -> Self {
        use crate::control::MemberState as M;
        match s {
            M::Up => WireMemberState::Up,
            M::Joining => WireMemberState::Joining,
            M::Draining => WireMemberState::Draining,
            M::Down => WireMemberState::Down,
        }
    }
}

/// A shard's state in `cluster shards`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireShardState {
    /// Owned and served by its owner.
    Serving,
    /// Owned, with a graceful handoff to another member in progress.
    Handoff,
    /// No owner yet.
    Unassigned,
}

impl WireShardState {
    /// As the CLI prints it: `serving`, `handoff`, `unassigned`.
    pub fn as_str(self) -> &'static str {
        match self {
            WireShardState::Serving => "serving",
            WireShardState::Handoff => "handoff",
            WireShardState::Unassigned => "unassigned",
        }
    }
}

impl std::fmt::Display for WireShardState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl From<crate::control::AssignmentState> for WireShardState {
    fn from(s: crate::control::AssignmentState) -> Self {
        use crate::control::AssignmentState as A;
        match s {
            A::Serving => WireShardState::Serving,
            A::Handoff => WireShardState::Handoff,
            A::Unassigned => WireShardState::Unassigned,
        }
    }
}

/// A member as reported by `cluster status`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MemberInfo {
    pub name: String,
    pub addr: String,
    pub state: WireMemberState,
    /// Whether the answering node has a live QUIC connection to it (always true for itself).
    pub reachable: bool,
    pub shards: u32,
    /// Whether it votes in the control plane (voters are changed by `cluster voters`).
    pub voter: bool,
}

/// `cluster status` reply.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StatusInfo {
    pub leader: String,
    pub term: u64,
    pub members: Vec<MemberInfo>,
    /// The leader's autoscaling recommendation, once it made one.
    pub autoscale: Option<AutoscaleInfo>,
    /// While the answering node is still forming the cluster (a voter of a cluster that has
    /// never formed): the configured voters it has not heard from yet. Empty once it runs.
    pub waiting_for: Vec<String>,
}

/// The autoscaling recommendation in `cluster status`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AutoscaleInfo {
    pub desired: u32,
    pub current: u32,
    pub utilization: f64,
    pub backlog: f64,
    pub reason: String,
}

/// One shard in `cluster shards`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ShardInfo {
    pub id: u32,
    /// `None` while unassigned.
    pub owner: Option<String>,
    pub epoch: u64,
    pub state: WireShardState,
}

/// Control-plane RPCs between nodes. Raft payloads are serde_json of openraft's own types (foreign
/// types that cannot carry rkyv derives): still inside a size-capped, validated envelope, and
/// parsed with serde, which returns errors, never panics, on bad input.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    RaftAppend,
    RaftVote,
    RaftSnapshot,
    /// A command for the leader to propose (forwarded by a follower or a client).
    Propose,
    /// A node asks to join (or rejoin) the cluster.
    Join,
}

/// Admin membership operations (`cluster undrain`, `cluster voters add|remove`, `certs
/// revoke`). Carried out only by the Raft leader, for an admin certificate, and audited.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipOp {
    /// A draining member takes shards again.
    Undrain,
    /// Makes a member a Raft voter (joint consensus).
    VoterAdd,
    /// Removes a member from the Raft voters (it stays a learner).
    VoterRemove,
    /// Puts a certificate serial on the revocation list and closes its connections.
    Revoke,
}

impl MembershipOp {
    /// Stable name (audit log).
    pub fn as_str(self) -> &'static str {
        match self {
            MembershipOp::Undrain => "undrain",
            MembershipOp::VoterAdd => "voter_add",
            MembershipOp::VoterRemove => "voter_remove",
            MembershipOp::Revoke => "revoke",
        }
    }
}

/// The message kinds. The variant is the "message kind" of the envelope.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Body {
    ShardRequest(ShardRequest),
    ShardReply(OpResult),
    StatusRequest,
    StatusReply(StatusInfo),
    ShardsRequest,
    ShardsReply(Vec<ShardInfo>),
    Ping(u64),
    Pong(u64),
    Error {
        code: ErrorCode,
        message: String,
    },
    Control {
        kind: ControlKind,
        payload: Vec<u8>,
    },
    ControlReply(Vec<u8>),
    /// A node renews its lease with the leader; `sent_at` echoes back (sender's clock, opaque).
    /// The renewal carries the node's load for the leader's autoscaling recommendation.
    LeaseRenew {
        sent_at: u64,
        /// Worker utilisation over the node's last sampling window, in thousandths (0..=1000).
        utilization_milli: u32,
        /// Runnable backlog: tasks waiting for a worker plus messages queued at its shards.
        backlog: u64,
    },
    /// Lease granted for `ttl_ms` from the renewal's send time, by the leader of `term`, whose
    /// map had applied log index `map_index` (the node serves on it once its map caught up).
    LeaseGrant {
        sent_at: u64,
        ttl_ms: u64,
        term: u64,
        map_index: u64,
    },
    /// Admin: move every shard off `node`, then mark it drained.
    Drain {
        node: String,
    },
    /// Admin, to the leader: a membership operation on `node` (for `Revoke`, the certificate
    /// `serial` in hex, and `node` the name it was issued to).
    Membership {
        op: MembershipOp,
        node: String,
        serial: String,
    },
    /// Client: dataset and job administration (JSON payload; reply `ControlReply`).
    Admin {
        op: AdminOp,
        payload: Vec<u8>,
    },
    /// Client: one partition segment of a dataset import (reply `ControlReply`).
    DatasetPart(DatasetPart),
    /// Coordinator to shard owner: map these shards for one step.
    JobTask(JobTask),
    /// Shard owner to coordinator: the merged partial of a `JobTask`.
    JobPartial(JobPartial),
    /// Worker to parameter-shard owner: rows to read.
    ParamPull(ParamPull),
    /// Worker to parameter-shard owner: gradient sums to apply.
    ParamPush(ParamPush),
    /// The answer to a `ParamPull` or `ParamPush`.
    ParamReply(ParamReply),
}

/// Message kind, for logs and metric labels (a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ShardRequest,
    ShardReply,
    StatusRequest,
    StatusReply,
    ShardsRequest,
    ShardsReply,
    Ping,
    Pong,
    Error,
    Control,
    ControlReply,
    LeaseRenew,
    LeaseGrant,
    Drain,
    Membership,
    Admin,
    DatasetPart,
    JobTask,
    JobPartial,
    ParamPull,
    ParamPush,
    ParamReply,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ShardRequest => "shard_request",
            Kind::ShardReply => "shard_reply",
            Kind::StatusRequest => "status_request",
            Kind::StatusReply => "status_reply",
            Kind::ShardsRequest => "shards_request",
            Kind::ShardsReply => "shards_reply",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::Error => "error",
            Kind::Control => "control",
            Kind::ControlReply => "control_reply",
            Kind::LeaseRenew => "lease_renew",
            Kind::LeaseGrant => "lease_grant",
            Kind::Drain => "drain",
            Kind::Membership => "membership",
            Kind::Admin => "admin",
            Kind::DatasetPart => "dataset_part",
            Kind::JobTask => "job_task",
            Kind::JobPartial => "job_partial",
            Kind::ParamPull => "param_pull",
            Kind::ParamPush => "param_push",
            Kind::ParamReply => "param_reply",
        }
    }

    /// Replies complete a pending request by correlation id; everything else is a request.
    pub fn is_reply(self) -> bool {
        matches!(
            self,
            Kind::ShardReply
                | Kind::StatusReply
                | Kind::ShardsReply
                | Kind::Pong
                | Kind::Error
                | Kind::ControlReply
                | Kind::LeaseGrant
                | Kind::JobPartial
                | Kind::ParamReply
        )
    }
}

impl Body {
    /// Whether this body answers a request (see [`Kind::is_reply`]).
    pub fn is_reply(&self) -> bool {
        matches!(
            self,
            Body::ShardReply(_)
                | Body::StatusReply(_)
                | Body::ShardsReply(_)
                | Body::Pong(_)
                | Body::Error { .. }
                | Body::ControlReply(_)
                | Body::LeaseGrant { .. }
                | Body::JobPartial(_)
                | Body::ParamReply(_)
        )
    }
}

impl ArchivedBody {
    pub fn kind(&self) -> Kind {
        match self {
            ArchivedBody::ShardRequest(_) => Kind::ShardRequest,
            ArchivedBody::ShardReply(_) => Kind::ShardReply,
            ArchivedBody::StatusRequest => Kind::StatusRequest,
            ArchivedBody::StatusReply(_) => Kind::StatusReply,
            ArchivedBody::ShardsRequest => Kind::ShardsRequest,
            ArchivedBody::ShardsReply(_) => Kind::ShardsReply,
            ArchivedBody::Ping(_) => Kind::Ping,
            ArchivedBody::Pong(_) => Kind::Pong,
            ArchivedBody::Error { .. } => Kind::Error,
            ArchivedBody::Control { .. } => Kind::Control,
            ArchivedBody::ControlReply(_) => Kind::ControlReply,
            ArchivedBody::LeaseRenew { .. } => Kind::LeaseRenew,
            ArchivedBody::LeaseGrant { .. } => Kind::LeaseGrant,
            ArchivedBody::Drain { .. } => Kind::Drain,
            ArchivedBody::Membership { .. } => Kind::Membership,
            ArchivedBody::Admin { .. } => Kind::Admin,
            ArchivedBody::DatasetPart(_) => Kind::DatasetPart,
            ArchivedBody::JobTask(_) => Kind::JobTask,
            ArchivedBody::JobPartial(_) => Kind::JobPartial,
            ArchivedBody::ParamPull(_) => Kind::ParamPull,
            ArchivedBody::ParamPush(_) => Kind::ParamPush,
            ArchivedBody::ParamReply(_) => Kind::ParamReply,
        }
    }
}

impl ArchivedErrorCode {
    pub fn to_native(&self) -> ErrorCode {
        match self {
            ArchivedErrorCode::NotOwner => ErrorCode::NotOwner,
            ArchivedErrorCode::Overloaded => ErrorCode::Overloaded,
            ArchivedErrorCode::BadRequest => ErrorCode::BadRequest,
            ArchivedErrorCode::Forbidden => ErrorCode::Forbidden,
            ArchivedErrorCode::ShuttingDown => ErrorCode::ShuttingDown,
            ArchivedErrorCode::Internal => ErrorCode::Internal,
            ArchivedErrorCode::NotLeader => ErrorCode::NotLeader,
            ArchivedErrorCode::NotFound => ErrorCode::NotFound,
            ArchivedErrorCode::Conflict => ErrorCode::Conflict,
        }
    }
}

impl Envelope {
    /// An envelope from `source` at the current protocol version.
    pub fn new(source: impl Into<String>, dest: Dest, correlation: u64, body: Body) -> Self {
        Envelope {
            version: PROTOCOL_VERSION,
            source: source.into(),
            dest,
            correlation,
            body,
        }
    }
}

/// Everything that can be wrong with bytes from the network.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The length prefix exceeds the configured maximum; nothing was allocated.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversized { len: u64, max: u64 },
    /// The stream ended in the middle of a frame.
    #[error("stream ended {got} bytes into a frame of {expected}")]
    Truncated { expected: u64, got: u64 },
    /// The archive failed validation (bytecheck) or is structurally impossible.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The sender speaks another protocol version.
    #[error("unsupported protocol version {got} (this node speaks {PROTOCOL_VERSION})")]
    Version { got: u16 },
    /// Serializing an outgoing envelope failed (a bug, not peer input).
    #[error("encode failed: {0}")]
    Encode(String),
    /// The node's or the connection's memory budget for frames in flight stayed exhausted;
    /// what was read of the frame is dropped.
    #[error("frame refused: {0}")]
    OverBudget(String),
    /// The sender started a frame and then sent nothing for too long.
    #[error("stream stalled {got} bytes into a frame of {expected} for {after:?}")]
    Stalled {
        got: u64,
        expected: u64,
        after: std::time::Duration,
    },
    /// Reading the stream failed (connection lost, stream reset by the peer).
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The `reason` label of `tidepool_wire_rejected_frames_total`; `None` for errors that are
    /// not a rejected frame (I/O, our own encode failures).
    pub fn reject_reason(&self) -> Option<&'static str> {
        match self {
            CodecError::Oversized { .. } => Some("oversized"),
            CodecError::Truncated { .. } => Some("truncated"),
            CodecError::Malformed(_) => Some("malformed"),
            CodecError::Version { .. } => Some("version"),
            CodecError::OverBudget(_) => Some("over_budget"),
            CodecError::Stalled { .. } => Some("stalled"),
            CodecError::Encode(_) | CodecError::Io(_) => None,
        }
    }
}

#[cfg(test)]
mod tests;

//! Raft RPCs over an application transport.
//!
//! [`RaftTransport`] is the whole gateway to the network: one request/response call to a named
//! node. openraft's [`RaftNetworkFactory`] is implemented on top of it; payloads are serde_json of
//! openraft's request types, replies serde_json of `Result<Response, RaftError>`, so a remote
//! Raft error travels back intact. The receiving side is
//! [`ControlPlane::handle_rpc`](super::ControlPlane::handle_rpc).
//!
//! Error mapping: a failed `call` (peer down, partitioned, dial failed) is
//! [`Unreachable`](openraft::error::Unreachable), so openraft backs off before retrying that peer;
//! an undecodable reply is a [`NetworkError`](openraft::error::NetworkError); an error returned
//! by the remote Raft is a [`RemoteError`](openraft::error::RemoteError).
//!
//! Logging: openraft reports every failed RPC (several lines per retry, per peer); the node's
//! default log filter keeps its replication module quiet and [`PeerReach`] logs a peer's change
//! instead: one WARN when RPCs to it start failing, one INFO when it answers again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::types::{Command, CommandResponse, NodeInfo};
use super::TypeConfig;

/// The kind of a control-plane RPC; the transport carries it beside the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RpcKind {
    /// openraft AppendEntries (replication and heartbeats).
    Append,
    /// openraft RequestVote.
    Vote,
    /// openraft InstallSnapshot (one chunk).
    Snapshot,
    /// A [`Command`] forwarded to the leader.
    Propose,
    /// A join request forwarded to the leader.
    Join,
}

impl RpcKind {
    pub const ALL: [RpcKind; 5] = [
        RpcKind::Append,
        RpcKind::Vote,
        RpcKind::Snapshot,
        RpcKind::Propose,
        RpcKind::Join,
    ];

    /// Stable lowercase name (logs, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            RpcKind::Append => "append",
            RpcKind::Vote => "vote",
            RpcKind::Snapshot => "snapshot",
            RpcKind::Propose => "propose",
            RpcKind::Join => "join",
        }
    }

    /// Stable one-byte code for wire formats.
    pub fn code(self) -> u8 {
        match self {
            RpcKind::Append => 0,
            RpcKind::Vote => 1,
            RpcKind::Snapshot => 2,
            RpcKind::Propose => 3,
            RpcKind::Join => 4,
        }
    }

    /// Inverse of [`RpcKind::code`]; `None` for an unknown code (from the network: reject it).
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

impl fmt::Display for RpcKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sends control-plane RPCs. Implemented by the node over QUIC, and by the in-memory simulated
/// network in tests.
#[async_trait::async_trait]
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends one control RPC to node `target` (by name, at `addr` if a dial is needed) and
    /// returns the reply payload (what the target's
    /// [`ControlPlane::handle_rpc`](super::ControlPlane::handle_rpc) returned). An `Err` means no
    /// reply came back (unreachable, timed out, or the target failed to handle the payload);
    /// the caller may retry. Should give up within a few seconds: openraft bounds each call by its
    /// own timeouts, but forwarded proposals do not.
    async fn call(
        &self,
        target: &NodeInfo,
        kind: RpcKind,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String>;
}

/// Body of an [`RpcKind::Propose`] RPC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProposeRequest {
    pub(crate) cmd: Command,
}

/// Body of an [`RpcKind::Join`] RPC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JoinRequest {
    pub(crate) info: NodeInfo,
    pub(crate) voter: bool,
}

/// Reply to a forwarded [`RpcKind::Propose`] or [`RpcKind::Join`]. The receiver never forwards
/// again (no loops): it answers `NotLeader` with its best guess and the sender follows the hint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardReply {
    /// Committed and applied on the leader.
    Done(CommandResponse),
    /// The receiver is not the leader; `leader` is who it believes is.
    NotLeader { leader: Option<NodeInfo> },
    /// The leader tried and failed (e.g. timed out waiting for a quorum, id collision).
    Failed(String),
}

/// Latest known address of every Raft node, refreshed from the membership by the control plane,
/// so a node that rejoined with a new address is dialed there even by replication streams that
/// were created before the change.
pub(crate) type Directory = Arc<RwLock<BTreeMap<u64, NodeInfo>>>;

/// Which Raft peers this node currently cannot reach, shared by every openraft client (the
/// replication stream and the vote requests to one peer are separate clients), so that a peer
/// going away and coming back is reported once each way, not once per RPC.
#[derive(Debug, Default, Clone)]
pub(crate) struct PeerReach {
    down: Arc<Mutex<BTreeSet<u64>>>,
}

impl PeerReach {
    /// Records a failed RPC to `peer`; true when the peer was reachable until now.
    pub(crate) fn failed(&self, peer: u64) -> bool {
        self.down.lock().insert(peer)
    }

    /// Records an answer from `peer`; true when it was unreachable until now.
    pub(crate) fn answered(&self, peer: u64) -> bool {
        self.down.lock().remove(&peer)
    }
}

/// openraft's network factory over a [`RaftTransport`].
pub(crate) struct NetworkFactory {
    pub(crate) transport: Arc<dyn RaftTransport>,
    pub(crate) directory: Directory,
    pub(crate) reach: PeerReach,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> PeerClient {
        PeerClient {
            transport: self.transport.clone(),
            directory: self.directory.clone(),
            reach: self.reach.clone(),
            target,
            node: node.clone(),
        }
    }
}

/// openraft's client for one peer. Creating it dials nothing.
pub(crate) struct PeerClient {
    transport: Arc<dyn RaftTransport>,
    directory: Directory,
    reach: PeerReach,
    target: u64,
    node: NodeInfo,
}

#[derive(Debug)]
struct TransportFailure(String);

impl fmt::Display for TransportFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransportFailure {}

impl PeerClient {
    async fn rpc<Req, Resp, E>(
        &self,
        kind: RpcKind,
        req: &Req,
    ) -> Result<Resp, RPCError<u64, NodeInfo, RaftError<u64, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let node = self
            .directory
            .read()
            .get(&self.target)
            .cloned()
            .unwrap_or_else(|| self.node.clone());
        let reply = match self.transport.call(&node, kind, payload).await {
            Ok(reply) => {
                if self.reach.answered(self.target) {
                    tracing::info!(peer = %node.name, "control plane: peer answers again");
                }
                reply
            }
            Err(e) => {
                if self.reach.failed(self.target) {
                    tracing::warn!(
                        peer = %node.name, rpc = %kind, error = %e,
                        "control plane: peer unreachable; retrying with backoff"
                    );
                }
                return Err(RPCError::Unreachable(Unreachable::new(&TransportFailure(
                    e,
                ))));
            }
        };
        let res: Result<Resp, RaftError<u64, E>> =
            serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, node, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        self.rpc(RpcKind::Append, &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, NodeInfo, RaftError<u64, InstallSnapshotError>>,
    > {
        self.rpc(RpcKind::Snapshot, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        self.rpc(RpcKind::Vote, &rpc).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_codes_round_trip() {
        for k in RpcKind::ALL {
            assert_eq!(RpcKind::from_code(k.code()), Some(k));
        }
        assert_eq!(RpcKind::from_code(200), None);
    }

    #[test]
    fn a_peer_change_is_reported_once_each_way() {
        let reach = PeerReach::default();
        let other = reach.clone();
        assert!(!reach.answered(7), "a peer starts reachable");
        assert!(reach.failed(7));
        assert!(!other.failed(7), "a second client's failure is not news");
        assert!(reach.failed(8), "peers are tracked apart");
        assert!(other.answered(7));
        assert!(!reach.answered(7));
        assert!(reach.failed(7), "it can go away again");
    }
}

//! The client library: what the CLI, the demo and the tests use to talk to a cluster.
//!
//! A [`ClusterClient`] learns the members and the shard map from any seed, sends each op
//! straight to its shard's owner, and retries with the *same* idempotency key (sender id +
//! sequence) on timeouts, lost connections and retryable errors, so an op is applied at most once
//! however often it is sent, and acknowledged at most once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use parking_lot::Mutex;

use crate::codec::{
    AdminOp, Body, DatasetPart, Dest, Envelope, ErrorCode, Frame, IdemKey, MembershipOp, Op,
    OpResult, ShardInfo, ShardRequest, StatusInfo,
};
use crate::placement::shard_for_key;
use crate::transport::tls::{self, ANY_NODE};
use crate::transport::{Client, Link, TlsMaterial, TransportConfig, TransportError};

/// How long a node that did not answer is tried last.
const SHUN_FOR: Duration = Duration::from_secs(3);

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Wait for one reply at most this long before retrying.
    pub request_timeout: Duration,
    /// Keep retrying one op for at most this long (then it is reported as not acknowledged).
    pub retry_for: Duration,
    pub transport: TransportConfig,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            // A handshake on a LAN takes milliseconds; a dead node should cost little.
            transport: TransportConfig {
                connect_timeout: Duration::from_secs(1),
                ..TransportConfig::default()
            },
        }
    }
}

/// What went wrong with a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No node answered: none of the seeds (or known members) could be reached, or every one
    /// of them failed to reply.
    #[error("no node reachable: {0}")]
    NoSeed(String),
    /// The cluster refused the request for good; `code` says why (bad request, forbidden, not
    /// found, conflict) and `message` is the node's sentence for the user.
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// A retryable failure; after `retry_for` it is final and the op is NOT acknowledged (it may or
    /// may not have been applied; a later retry with the same key is still safe).
    #[error("retryable failure: {0}")]
    Retryable(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl ClientError {
    /// The node's error code when the cluster refused the request.
    pub fn refusal_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn retryable(&self) -> bool {
        matches!(self, ClientError::Retryable(_) | ClientError::NoSeed(_))
    }
}

#[derive(Debug, Default)]
struct View {
    addrs: HashMap<String, SocketAddr>,
    /// Each shard's owner (`None`: unassigned).
    owners: Vec<Option<String>>,
    epochs: Vec<u64>,
    links: HashMap<String, Arc<Client>>,
    /// One dial at a time per node: concurrent callers wait for it instead of each opening a
    /// connection of their own (nodes cap connections per certificate name).
    dialing: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Nodes that just failed to answer, skipped until then (unless nothing else is left).
    shunned: HashMap<String, std::time::Instant>,
}

/// A connection to a cluster. Cheap to share (`Arc`); every method takes `&self`.
#[derive(Debug)]
pub struct ClusterClient {
    seeds: Vec<SocketAddr>,
    client_config: quinn::ClientConfig,
    opts: ClientOptions,
    sender: u64,
    seq: AtomicU64,
    view: Mutex<View>,
}

impl ClusterClient {
    /// Connects to the cluster through any of `seeds` and loads the member list and shard map.
    pub async fn connect(
        seeds: &[SocketAddr],
        tls: &TlsMaterial,
        opts: ClientOptions,
    ) -> Result<Self, ClientError> {
        let sender = rand::random::<u64>() | 1;
        let c = ClusterClient {
            seeds: seeds.to_vec(),
            client_config: tls::client_config(tls)?,
            opts,
            sender,
            seq: AtomicU64::new(0),
            view: Mutex::new(View::default()),
        };
        c.refresh().await?;
        Ok(c)
    }

    /// This client's sender id (the first half of every idempotency key it makes).
    pub fn sender_id(&self) -> u64 {
        self.sender
    }

    async fn connect_node(
        &self,
        addr: SocketAddr,
        name: &str,
    ) -> Result<Arc<Client>, TransportError> {
        Client::connect_with(addr, name, self.client_config.clone(), &self.opts.transport)
            .await
            .map(Arc::new)
    }

    /// The link to `node`, connecting if needed (one dial per node at a time).
    async fn link_to(&self, node: &str) -> Result<Link, ClientError> {
        let cached = |v: &View| v.links.get(node).filter(|c| !c.link().is_closed()).cloned();
        let dial = {
            let mut v = self.view.lock();
            if let Some(c) = cached(&v) {
                return Ok(c.link().clone());
            }
            v.dialing.entry(node.to_string()).or_default().clone()
        };
        let _one = dial.lock().await;
        let (cached, addr) = {
            let v = self.view.lock();
            (cached(&v), v.addrs.get(node).copied())
        };
        if let Some(c) = cached {
            return Ok(c.link().clone());
        }
        let addr = addr.ok_or_else(|| ClientError::Retryable(format!("unknown node {node}")))?;
        let c = self
            .connect_node(addr, node)
            .await
            .map_err(|e| ClientError::Retryable(e.to_string()))?;
        let link = c.link().clone();
        self.view.lock().links.insert(node.to_string(), c);
        Ok(link)
    }

    async fn call(&self, link: &Link, dest: Dest, body: Body) -> Result<Frame, ClientError> {
        self.call_within(link, dest, body, self.opts.request_timeout)
            .await
    }

    async fn call_within(
        &self,
        link: &Link,
        dest: Dest,
        body: Body,
        timeout: Duration,
    ) -> Result<Frame, ClientError> {
        let env = Envelope::new("client", dest, 0, body);
        link.request(env, timeout)
            .await
            .map_err(|e| ClientError::Retryable(e.to_string()))
    }

    /// Asks any node: known members first, then seeds; a node that does not answer is dropped
    /// from the cache and the next one is tried.
    async fn ask_any(&self, body: Body) -> Result<Frame, ClientError> {
        self.ask_any_within(body, self.opts.request_timeout).await
    }

    /// [`Self::ask_any`], waiting up to `timeout` for each node's reply.
    async fn ask_any_within(&self, body: Body, timeout: Duration) -> Result<Frame, ClientError> {
        let mut last = String::from("no node answered");
        let known: Vec<String> = {
            let v = self.view.lock();
            let now = std::time::Instant::now();
            let (mut ok, shunned): (Vec<String>, Vec<String>) = v
                .addrs
                .keys()
                .cloned()
                .partition(|n| v.shunned.get(n).is_none_or(|t| *t <= now));
            ok.extend(shunned);
            ok
        };
        for n in known {
            let reply = match self.link_to(&n).await {
                Ok(link) => {
                    self.call_within(&link, Dest::Peer, body.clone(), timeout)
                        .await
                }
                Err(e) => Err(e),
            };
            match reply {
                Ok(f) => {
                    self.view.lock().shunned.remove(&n);
                    return Ok(f);
                }
                Err(e) => {
                    let mut v = self.view.lock();
                    v.links.remove(&n);
                    v.shunned.insert(n, std::time::Instant::now() + SHUN_FOR);
                    last = e.to_string();
                }
            }
        }
        for seed in &self.seeds {
            let c = match self.connect_node(*seed, ANY_NODE).await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{seed}: {e}");
                    continue;
                }
            };
            let link = c.link().clone();
            self.view.lock().links.insert(link.peer().name.clone(), c);
            match self
                .call_within(&link, Dest::Peer, body.clone(), timeout)
                .await
            {
                Ok(f) => return Ok(f),
                Err(e) => last = e.to_string(),
            }
        }
        // Every attempt above failed in transport (a reply, even an error, returns early).
        Err(ClientError::NoSeed(last))
    }

    /// Reloads members and the shard map from any reachable node.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let status = expect_status(&self.ask_any(Body::StatusRequest).await?)?;
        let shards = expect_shards(&self.ask_any(Body::ShardsRequest).await?)?;
        let mut v = self.view.lock();
        for m in &status.members {
            if let Ok(a) = m.addr.parse() {
                v.addrs.insert(m.name.clone(), a);
            }
        }
        let mut sorted = shards;
        sorted.sort_by_key(|s| s.id);
        v.owners = sorted.iter().map(|s| s.owner.clone()).collect();
        v.epochs = sorted.iter().map(|s| s.epoch).collect();
        Ok(())
    }

    /// `cluster status`, from any reachable node.
    pub async fn status(&self) -> Result<StatusInfo, ClientError> {
        expect_status(&self.ask_any(Body::StatusRequest).await?)
    }

    /// `cluster shards`, from any reachable node.
    pub async fn shards(&self) -> Result<Vec<ShardInfo>, ClientError> {
        expect_shards(&self.ask_any(Body::ShardsRequest).await?)
    }

    /// `cluster drain NODE` (admin role): moves every shard off `node`. Sent to the leader,
    /// which checks the admin certificate itself (no node relays an admin's authority).
    pub async fn drain(&self, node: &str) -> Result<(), ClientError> {
        self.ask_leader(Body::Drain {
            node: node.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// An admin membership operation (`cluster undrain`, `cluster voters add|remove`, `certs
    /// revoke`), carried out by the leader. Returns the leader's answer text.
    pub async fn membership(
        &self,
        op: MembershipOp,
        node: &str,
        serial: &str,
    ) -> Result<String, ClientError> {
        let bytes = self
            .ask_leader(Body::Membership {
                op,
                node: node.to_string(),
                serial: serial.to_string(),
            })
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends `body` to the current Raft leader (found through any node's status), following
    /// leader changes, for up to `retry_for`. Returns the `ControlReply` payload.
    async fn ask_leader(&self, body: Body) -> Result<Vec<u8>, ClientError> {
        self.retrying(|| async {
            let status = self.status().await?;
            {
                let mut v = self.view.lock();
                for m in &status.members {
                    if let Ok(a) = m.addr.parse() {
                        v.addrs.insert(m.name.clone(), a);
                    }
                }
            }
            if status.leader.is_empty() {
                return Err(ClientError::Retryable("no leader elected yet".into()));
            }
            let link = self.link_to(&status.leader).await?;
            let frame = self.call(&link, Dest::Peer, body.clone()).await?;
            match frame.to_owned_envelope().map(|e| e.body) {
                Ok(Body::ControlReply(bytes)) => Ok(bytes),
                _ => Err(refusal(&frame)),
            }
        })
        .await
    }

    /// A dataset or job admin request (`dataset`/`job` commands): JSON in, JSON out. Retried
    /// with backoff on retryable failures for up to `retry_for`; every admin op is safe to
    /// repeat (job submissions carry a client-chosen id).
    pub async fn admin(
        &self,
        op: AdminOp,
        payload: &serde_json::Value,
    ) -> Result<Vec<u8>, ClientError> {
        self.admin_within(op, payload, self.opts.request_timeout)
            .await
    }

    /// [`Self::admin`] for a request that may take a node longer to answer (planning an import
    /// reads every file's footer): each try waits up to `timeout`.
    pub async fn admin_within(
        &self,
        op: AdminOp,
        payload: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let payload = serde_json::to_vec(payload)
            .map_err(|e| ClientError::Retryable(format!("encode: {e}")))?;
        let body = Body::Admin { op, payload };
        self.retrying(|| async {
            let frame = self.ask_any_within(body.clone(), timeout).await?;
            match frame.to_owned_envelope().map(|e| e.body) {
                Ok(Body::ControlReply(bytes)) => Ok(bytes),
                _ => Err(refusal(&frame)),
            }
        })
        .await
    }

    /// Uploads one partition segment of a dataset import (stored create-once: safe to retry).
    pub async fn dataset_part(&self, part: DatasetPart) -> Result<(), ClientError> {
        let body = Body::DatasetPart(part);
        self.retrying(|| async {
            let frame = self.ask_any(body.clone()).await?;
            match frame.to_owned_envelope().map(|e| e.body) {
                Ok(Body::ControlReply(_)) => Ok(()),
                _ => Err(refusal(&frame)),
            }
        })
        .await
    }

    async fn retrying<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        f.retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(1))
                .with_total_delay(Some(self.opts.retry_for))
                .without_max_times(),
        )
        .when(ClientError::retryable)
        .await
    }

    /// Number of shards in the map.
    pub fn shard_count(&self) -> u32 {
        self.view.lock().owners.len() as u32
    }

    /// The shard a key lives on.
    pub fn shard_of(&self, key: &str) -> u32 {
        shard_for_key(key.as_bytes(), self.shard_count().max(1))
    }

    /// Makes the next idempotency key of this client.
    pub fn next_key(&self) -> IdemKey {
        IdemKey {
            sender: self.sender,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// Sends `op` on `key`'s shard with a fresh idempotency key, retrying until acknowledged or
    /// `retry_for` has passed.
    pub async fn op(&self, key: &str, op: Op) -> Result<OpResult, ClientError> {
        self.op_with_key(key, self.next_key(), op).await
    }

    /// As [`ClusterClient::op`] with a caller-chosen idempotency key.
    pub async fn op_with_key(
        &self,
        key: &str,
        idem: IdemKey,
        op: Op,
    ) -> Result<OpResult, ClientError> {
        let shard = self.shard_of(key);
        let req = ShardRequest { idem, op };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(10))
            .with_max_delay(Duration::from_secs(1))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(self.opts.retry_for));
        (|| self.try_once(shard, &req))
            .retry(backoff)
            .when(ClientError::retryable)
            .await
    }

    async fn try_once(&self, shard: u32, req: &ShardRequest) -> Result<OpResult, ClientError> {
        let (owner, epoch) = {
            let v = self.view.lock();
            (
                v.owners.get(shard as usize).cloned().flatten(),
                v.epochs.get(shard as usize).copied().unwrap_or(0),
            )
        };
        let Some(owner) = owner else {
            self.refresh().await?;
            return Err(ClientError::Retryable(format!(
                "shard {shard} has no owner yet (or no shard map yet)"
            )));
        };
        let link = match self.link_to(&owner).await {
            Ok(l) => l,
            Err(e) => {
                let _ = self.refresh().await;
                return Err(e);
            }
        };
        let frame = match self
            .call(
                &link,
                Dest::Shard { shard, epoch },
                Body::ShardRequest(req.clone()),
            )
            .await
        {
            Ok(f) => f,
            Err(e) => {
                self.view.lock().links.remove(&owner);
                return Err(e);
            }
        };
        match frame.to_owned_envelope().map(|e| e.body) {
            Ok(Body::ShardReply(r)) => Ok(r),
            Ok(Body::Error { code, message }) if code.retryable() => {
                if code == ErrorCode::NotOwner {
                    let _ = self.refresh().await;
                }
                Err(ClientError::Retryable(format!("{code:?}: {message}")))
            }
            Ok(Body::Error { code, message }) => Err(ClientError::Refused { code, message }),
            _ => Err(ClientError::Retryable("unexpected reply".into())),
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        let links: Vec<Arc<Client>> = self.view.lock().links.drain().map(|(_, c)| c).collect();
        for c in links {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.close().await;
            }
        }
    }
}

fn refusal(frame: &Frame) -> ClientError {
    match frame.to_owned_envelope().map(|e| e.body) {
        Ok(Body::Error { code, message }) if !code.retryable() => {
            ClientError::Refused { code, message }
        }
        Ok(Body::Error { code, message }) => ClientError::Retryable(format!("{code:?}: {message}")),
        _ => ClientError::Retryable("unexpected reply".into()),
    }
}

fn expect_status(frame: &Frame) -> Result<StatusInfo, ClientError> {
    match frame.to_owned_envelope().map(|e| e.body) {
        Ok(Body::StatusReply(s)) => Ok(s),
        _ => Err(refusal(frame)),
    }
}

fn expect_shards(frame: &Frame) -> Result<Vec<ShardInfo>, ClientError> {
    match frame.to_owned_envelope().map(|e| e.body) {
        Ok(Body::ShardsReply(s)) => Ok(s),
        _ => Err(refusal(frame)),
    }
}

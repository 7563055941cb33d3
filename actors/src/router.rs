//! Routing: `send_to_shard` delivers to the owning node; locally as an actor message with no
//! serialization, remotely over QUIC. The router also answers every request that arrives from
//! the transport (it is the node's [`Inbound`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use ractor::ActorRef;
use tidepool_runtime::certs::Role;
use tidepool_runtime::codec::{
    ArchivedBody, ArchivedDest, Body, Dest, Envelope, ErrorCode, Frame, Kind, MemberInfo, OpResult,
    ShardInfo, ShardRequest, StatusInfo,
};
use tidepool_runtime::metrics as m;
use tidepool_runtime::placement::ShardMap;
use tidepool_runtime::transport::{BoxFuture, Inbound, Link, Transport};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::audit::AuditLog;
use crate::shard::{OpRef, OpReply, ShardInput, ShardMsg};

/// A member is "up" if it answered a ping within this long.
pub const UP_WITHIN: Duration = Duration::from_secs(3);
/// Requests forwarded for clients at once (bounded memory).
const MAX_FORWARDS: usize = 4096;

/// The slot of a shard this node owns.
#[derive(Debug)]
struct LocalShard {
    actor: RwLock<Option<ActorRef<ShardMsg>>>,
    permits: Arc<Semaphore>,
}

/// Everything the router needs to know, fixed at start.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub name: String,
    pub members: Vec<(String, SocketAddr)>,
    pub map: ShardMap,
    /// Queued ops per shard before senders wait.
    pub max_inflight: usize,
    /// How long a node-to-node request may take.
    pub request_timeout: Duration,
}

struct Inner {
    cfg: RouterConfig,
    transport: Transport,
    local: HashMap<u32, LocalShard>,
    audit: AuditLog,
    last_seen: Mutex<HashMap<String, Instant>>,
    forwards: Arc<Semaphore>,
    shutting_down: AtomicBool,
}

/// The node's router. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("name", &self.inner.cfg.name)
            .finish()
    }
}

/// Shard epoch. Static membership never moves a shard, so every shard is at epoch 1; the
/// control plane makes this per-shard and moving.
pub const STATIC_EPOCH: u64 = 1;

impl Router {
    pub fn new(cfg: RouterConfig, transport: Transport, audit: AuditLog) -> Self {
        let local = cfg
            .map
            .iter()
            .filter(|(_, owner)| *owner == cfg.name)
            .map(|(s, _)| {
                (
                    s,
                    LocalShard {
                        actor: RwLock::new(None),
                        permits: Arc::new(Semaphore::new(cfg.max_inflight.max(1))),
                    },
                )
            })
            .collect();
        Router {
            inner: Arc::new(Inner {
                cfg,
                transport,
                local,
                audit,
                last_seen: Mutex::new(HashMap::new()),
                forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    /// Shards owned here, in id order.
    pub fn owned_shards(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.inner.local.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn shard_count(&self) -> u32 {
        self.inner.cfg.map.len() as u32
    }

    /// Installs (or removes, during a restart) the actor serving a local shard.
    pub fn set_actor(&self, shard: u32, actor: Option<ActorRef<ShardMsg>>) {
        if let Some(slot) = self.inner.local.get(&shard) {
            *slot.actor.write() = actor;
        }
    }

    /// The id of the actor serving a local shard now (changes on every restart).
    pub fn shard_actor(&self, shard: u32) -> Option<ractor::ActorId> {
        self.inner
            .local
            .get(&shard)
            .and_then(|s| s.actor.read().as_ref().map(|a| a.get_id()))
    }

    /// Whether every local shard has a running actor.
    pub fn all_shards_running(&self) -> bool {
        self.inner.local.values().all(|s| s.actor.read().is_some())
    }

    /// From now on, new requests are refused with a retryable `ShuttingDown`.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    /// Records that `peer` answered just now (heartbeats).
    pub fn saw(&self, peer: &str) {
        self.inner
            .last_seen
            .lock()
            .insert(peer.to_string(), Instant::now());
    }

    /// Members that answered within [`UP_WITHIN`], this node included.
    pub fn members_up(&self) -> usize {
        let seen = self.inner.last_seen.lock();
        self.inner
            .cfg
            .members
            .iter()
            .filter(|(n, _)| {
                *n == self.inner.cfg.name || seen.get(n).is_some_and(|t| t.elapsed() < UP_WITHIN)
            })
            .count()
    }

    pub fn members(&self) -> &[(String, SocketAddr)] {
        &self.inner.cfg.members
    }

    /// Delivers `req` to the owner of `shard`: locally by actor message (no serialization), or
    /// over QUIC to the owning node.
    pub async fn send_to_shard(&self, shard: u32, req: ShardRequest) -> OpReply {
        let owner = self
            .inner
            .cfg
            .map
            .owner(shard)
            .ok_or(ErrorCode::BadRequest)?;
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(ErrorCode::ShuttingDown);
        }
        if owner == self.inner.cfg.name {
            let permit = self.admit(shard).await?;
            return self.call_local(shard, ShardInput::Local(req), permit).await;
        }
        let link = self.inner.transport.link(owner).await.map_err(|e| {
            debug!(%owner, error = %e, "owner unreachable");
            ErrorCode::NotOwner
        })?;
        let env = Envelope::new(
            self.name(),
            Dest::Shard {
                shard,
                epoch: STATIC_EPOCH,
            },
            0,
            Body::ShardRequest(req),
        );
        let reply = link
            .request(env, self.inner.cfg.request_timeout)
            .await
            .map_err(|_| ErrorCode::Internal)?;
        decode_reply(&reply)
    }

    /// Takes a slot in the shard's bounded queue, waiting while it is full (backpressure).
    async fn admit(&self, shard: u32) -> Result<OwnedSemaphorePermit, ErrorCode> {
        let slot = self.inner.local.get(&shard).ok_or(ErrorCode::NotOwner)?;
        match tokio::time::timeout(
            self.inner.cfg.request_timeout,
            slot.permits.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => Ok(p),
            _ => {
                metrics::counter!(m::SHARD_REJECTED, "reason" => "overloaded").increment(1);
                Err(ErrorCode::Overloaded)
            }
        }
    }

    async fn call_local(
        &self,
        shard: u32,
        input: ShardInput,
        permit: OwnedSemaphorePermit,
    ) -> OpReply {
        let slot = self.inner.local.get(&shard).ok_or(ErrorCode::NotOwner)?;
        let Some(actor) = slot.actor.read().clone() else {
            // Between a crash and the restart: retryable.
            return Err(ErrorCode::Internal);
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        metrics::gauge!(m::SHARD_INFLIGHT).increment(1.0);
        let sent = actor.cast(ShardMsg::Apply {
            input,
            reply: tx,
            permit,
            arrived: Instant::now(),
        });
        let out = match sent {
            Ok(()) => rx.await.unwrap_or(Err(ErrorCode::Internal)),
            Err(_) => Err(ErrorCode::Internal),
        };
        metrics::gauge!(m::SHARD_INFLIGHT).decrement(1.0);
        out
    }

    fn status(&self) -> StatusInfo {
        let counts = self.inner.cfg.map.counts();
        let seen = self.inner.last_seen.lock();
        let members = self
            .inner
            .cfg
            .members
            .iter()
            .map(|(name, addr)| {
                let me = *name == self.inner.cfg.name;
                let up = me || seen.get(name).is_some_and(|t| t.elapsed() < UP_WITHIN);
                MemberInfo {
                    name: name.clone(),
                    addr: addr.to_string(),
                    state: if up { "up" } else { "down" }.to_string(),
                    reachable: up,
                    shards: counts.get(name).copied().unwrap_or(0) as u32,
                }
            })
            .collect();
        // No control plane yet: membership is static, so there is no leader and no term.
        StatusInfo {
            leader: String::new(),
            term: 0,
            members,
        }
    }

    fn shards(&self) -> Vec<ShardInfo> {
        self.inner
            .cfg
            .map
            .iter()
            .map(|(id, owner)| ShardInfo {
                id,
                owner: owner.to_string(),
                epoch: STATIC_EPOCH,
                state: "serving".into(),
            })
            .collect()
    }

    async fn handle(self, link: Link, frame: Frame) {
        let env = frame.envelope();
        let corr = env.correlation.to_native();
        let kind = env.body.kind();
        let role = link.peer().role;
        if role != Role::Node {
            metrics::counter!(m::ADMIN_REQUESTS, "role" => role.as_str(), "kind" => kind.as_str())
                .increment(1);
        }
        let body = match kind {
            Kind::ShardRequest => return self.handle_shard(link, frame, corr).await,
            Kind::StatusRequest => Body::StatusReply(self.status()),
            Kind::ShardsRequest => Body::ShardsReply(self.shards()),
            Kind::Ping => match &env.body {
                ArchivedBody::Ping(n) => Body::Pong(n.to_native()),
                _ => return,
            },
            _ => error_body(ErrorCode::BadRequest, "not a request"),
        };
        reply(&link, self.name(), corr, body).await;
    }

    async fn handle_shard(self, link: Link, frame: Frame, corr: u64) {
        let env = frame.envelope();
        let ArchivedBody::ShardRequest(req) = &env.body else {
            return;
        };
        let op = OpRef::from_archived(&req.op);
        let peer = link.peer().clone();
        let refuse = |code: ErrorCode, reason: &'static str, msg: String| {
            metrics::counter!(m::SHARD_REJECTED, "reason" => reason).increment(1);
            error_body(code, &msg)
        };
        let (shard, epoch) = match &env.dest {
            ArchivedDest::Shard { shard, epoch } => (shard.to_native(), epoch.to_native()),
            _ => {
                return reply(
                    &link,
                    self.name(),
                    corr,
                    refuse(
                        ErrorCode::BadRequest,
                        "bad_request",
                        "shard request without a shard".into(),
                    ),
                )
                .await
            }
        };
        let early = if shard >= self.shard_count() {
            Some(refuse(
                ErrorCode::BadRequest,
                "bad_request",
                format!("no shard {shard}"),
            ))
        } else if epoch != STATIC_EPOCH {
            metrics::counter!(m::STALE_EPOCH_REJECTIONS).increment(1);
            Some(refuse(
                ErrorCode::NotOwner,
                "stale_epoch",
                format!("shard {shard} is at epoch {STATIC_EPOCH}, not {epoch}"),
            ))
        } else if op.is_write() && role_cannot_write(peer.role) {
            Some(refuse(
                ErrorCode::Forbidden,
                "forbidden",
                format!("role {} may not write", peer.role),
            ))
        } else if self.inner.shutting_down.load(Ordering::SeqCst) {
            Some(refuse(
                ErrorCode::ShuttingDown,
                "shutting_down",
                "node is shutting down".into(),
            ))
        } else {
            None
        };
        if let Some(body) = early {
            return reply(&link, self.name(), corr, body).await;
        }
        if peer.role == Role::Admin {
            self.inner
                .audit
                .record(
                    &peer,
                    "shard_request",
                    &format!("{} shard={shard}", op.name()),
                )
                .await;
        }
        let owned = self.inner.local.contains_key(&shard);
        if owned {
            // Awaiting the slot here holds this stream: a full shard pushes back on the sender.
            let permit = match self.admit(shard).await {
                Ok(p) => p,
                Err(code) => {
                    return reply(
                        &link,
                        self.name(),
                        corr,
                        error_body(code, "shard queue is full"),
                    )
                    .await
                }
            };
            tokio::spawn(async move {
                let result = self
                    .call_local(shard, ShardInput::Wire(frame), permit)
                    .await;
                reply(&link, self.name(), corr, result_body(result)).await;
            });
        } else if peer.role == Role::Node {
            // Nodes route by the same map; a node sending us someone else's shard is confused.
            reply(
                &link,
                self.name(),
                corr,
                refuse(
                    ErrorCode::NotOwner,
                    "not_owner",
                    format!("shard {shard} is not here"),
                ),
            )
            .await;
        } else {
            // A client that does not know the map: forward on its behalf (bounded).
            let Ok(permit) = self.inner.forwards.clone().acquire_owned().await else {
                return;
            };
            let owned_req = match rkyv_request(&frame) {
                Some(r) => r,
                None => return,
            };
            tokio::spawn(async move {
                let _permit = permit;
                let result = self.send_to_shard(shard, owned_req).await;
                let label = if result.is_ok() { "ok" } else { "error" };
                metrics::counter!(m::ROUTER_FORWARDED, "result" => label).increment(1);
                reply(&link, self.name(), corr, result_body(result)).await;
            });
        }
    }
}

fn role_cannot_write(role: Role) -> bool {
    role == Role::Reader
}

fn rkyv_request(frame: &Frame) -> Option<ShardRequest> {
    match frame.to_owned_envelope().ok()?.body {
        Body::ShardRequest(r) => Some(r),
        _ => None,
    }
}

fn error_body(code: ErrorCode, message: &str) -> Body {
    Body::Error {
        code,
        message: message.to_string(),
    }
}

fn result_body(r: OpReply) -> Body {
    match r {
        Ok(v) => Body::ShardReply(v),
        Err(code) => error_body(code, "shard request failed"),
    }
}

/// Turns a reply frame into the op's result.
pub fn decode_reply(frame: &Frame) -> OpReply {
    match frame.to_owned_envelope().map(|e| e.body) {
        Ok(Body::ShardReply(r)) => Ok(r),
        Ok(Body::Error { code, .. }) => Err(code),
        _ => Err(ErrorCode::Internal),
    }
}

async fn reply(link: &Link, me: &str, corr: u64, body: Body) {
    if let Err(e) = link.send(&Envelope::new(me, Dest::Peer, corr, body)).await {
        debug!(peer = %link.peer().name, error = %e, "reply not sent");
    }
}

impl Inbound for Router {
    fn on_request(&self, link: Link, frame: Frame) -> BoxFuture {
        Box::pin(self.clone().handle(link, frame))
    }
}

/// `OpResult` is re-exported for callers of [`Router::send_to_shard`].
pub type ShardResult = OpResult;

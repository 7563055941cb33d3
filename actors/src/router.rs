//! Routing: `send_to_shard` delivers to the shard's owner in the replicated cluster map, locally
//! as an actor message (no serialization) or over QUIC; the router is also the node's
//! `Inbound`: it answers every request arriving from the transport ([`inbound`]: who may send
//! what, as one table, then a handler per kind).
//!
//! Per shard it keeps a slot: the serving actor and its epoch, a bounded queue (permits), and,
//! during a graceful handoff, a bounded buffer of requests that arrived meanwhile, forwarded in
//! order to the new owner once the handoff commits (invariant 4). A node serves a shard only
//! while the map names it owner at that epoch, its actor runs at that epoch, and its lease is
//! valid (invariant 1).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::ActorRef;
use tidepool_runtime::codec::{Body, Dest, Envelope, ErrorCode, Frame, ShardInfo, ShardRequest};
use tidepool_runtime::control::ClusterMap;
use tidepool_runtime::metrics as m;
use tidepool_runtime::transport::{Link, Transport};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

pub mod inbound;

use crate::audit::AuditLog;
use crate::ownership_log::{Event, OwnershipLog};
use crate::serve_gate::ServeGate;
use crate::services::Services;
use crate::shard::{OpReply, ShardInput, ShardMsg};
use inbound::reply;
use tidepool_runtime::lease::ServeEdge;
use tidepool_runtime::serving;

/// Requests forwarded for clients at once (bounded memory).
const MAX_FORWARDS: usize = 4096;

/// A request held while its shard is in handoff.
#[derive(Debug)]
struct Buffered {
    link: Link,
    frame: Frame,
    corr: u64,
}

#[derive(Debug)]
struct Slot {
    actor: Option<ActorRef<ShardMsg>>,
    epoch: u64,
    permits: Arc<Semaphore>,
    accepting: bool,
    buffer: VecDeque<Buffered>,
    /// The ownership log has an open interval for this slot: it accepts and the node may serve.
    logged: bool,
}

impl Slot {
    fn view(&self) -> serving::SlotView {
        serving::SlotView {
            epoch: self.actor.as_ref().map(|_| self.epoch),
            accepting: self.accepting,
        }
    }
}

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub name: String,
    /// Shard count (fixed for the life of the cluster).
    pub shards: u32,
    /// Queued ops per shard before senders wait.
    pub max_inflight: usize,
    /// Requests buffered per shard during a handoff before new ones are refused (retryable).
    pub handoff_buffer: usize,
    /// How long a node-to-node request may take.
    pub request_timeout: Duration,
    /// Where ownership intervals are recorded (JSON lines: when this node started and stopped
    /// serving each shard, wall clock), for operators and for the no-two-owners test.
    pub ownership_log: Option<std::path::PathBuf>,
}

struct Inner {
    cfg: RouterConfig,
    transport: Transport,
    map: watch::Receiver<Arc<ClusterMap>>,
    slots: Vec<Mutex<Slot>>,
    audit: AuditLog,
    services: std::sync::OnceLock<Arc<Services>>,
    forwards: Arc<Semaphore>,
    shutting_down: AtomicBool,
    /// Whether this node may serve now (its lease on its own clock).
    gate: Arc<ServeGate>,
    ownership: OwnershipLog,
    /// Held while serving edges and slot changes are written to the ownership log, so its
    /// intervals follow one order.
    ownership_order: Mutex<()>,
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

impl Router {
    pub fn new(
        cfg: RouterConfig,
        transport: Transport,
        map: watch::Receiver<Arc<ClusterMap>>,
        audit: AuditLog,
        gate: Arc<ServeGate>,
    ) -> Self {
        let slots = (0..cfg.shards)
            .map(|_| {
                Mutex::new(Slot {
                    actor: None,
                    epoch: 0,
                    permits: Arc::new(Semaphore::new(cfg.max_inflight.max(1))),
                    accepting: false,
                    buffer: VecDeque::new(),
                    logged: false,
                })
            })
            .collect();
        let ownership = OwnershipLog::start(&cfg.name, cfg.ownership_log.clone());
        Router {
            inner: Arc::new(Inner {
                cfg,
                transport,
                map,
                slots,
                audit,
                services: std::sync::OnceLock::new(),
                forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
                shutting_down: AtomicBool::new(false),
                gate,
                ownership,
                ownership_order: Mutex::new(()),
            }),
        }
    }

    /// Connects the router to the node's services (once, at start).
    pub fn set_services(&self, s: Arc<Services>) {
        let _ = self.inner.services.set(s);
    }

    pub fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    pub fn shard_count(&self) -> u32 {
        self.inner.cfg.shards
    }

    pub fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.inner.map.borrow().clone()
    }

    fn lease_valid(&self) -> bool {
        self.inner.gate.may_serve()
    }

    // ---- slot management (driven by the ownership driver) -------------------------------------

    /// Starts serving `shard` at `epoch` with `actor`.
    pub fn activate(&self, shard: u32, epoch: u64, actor: ActorRef<ShardMsg>) {
        if let Some(slot) = self.inner.slots.get(shard as usize) {
            let _order = self.sync_ownership_locked();
            let mut s = slot.lock();
            s.actor = Some(actor);
            s.epoch = epoch;
            s.accepting = true;
            let now = Instant::now();
            if !s.logged && self.lease_valid() {
                s.logged = true;
                self.inner.ownership.record(shard, epoch, Event::Start, now);
            }
        }
    }

    /// Stops serving `shard`; returns its actor (to stop) and forwards what was buffered.
    pub fn deactivate(&self, shard: u32) -> Option<ActorRef<ShardMsg>> {
        let slot = self.inner.slots.get(shard as usize)?;
        let (actor, buffered) = {
            let _order = self.sync_ownership_locked();
            let mut s = slot.lock();
            self.close_slot(shard, &mut s);
            (s.actor.take(), std::mem::take(&mut s.buffer))
        };
        self.forward_later(shard, buffered);
        actor
    }

    /// Graceful handoff begins: requests for `shard` are buffered from now on.
    pub fn stop_accepting(&self, shard: u32) {
        if let Some(slot) = self.inner.slots.get(shard as usize) {
            let _order = self.sync_ownership_locked();
            self.close_slot(shard, &mut slot.lock());
        }
    }

    /// A suspended shard (its actor kept, admission stopped when the lease lapsed) serves again
    /// at `epoch`: admission reopens, the ownership log opens an interval now (if the lease is
    /// valid), and what was buffered meanwhile goes to the actor, in arrival order.
    pub fn resume(&self, shard: u32, epoch: u64) {
        let Some(slot) = self.inner.slots.get(shard as usize) else {
            return;
        };
        let buffered = {
            let _order = self.sync_ownership_locked();
            let mut s = slot.lock();
            if s.actor.is_none() || s.epoch != epoch {
                return;
            }
            s.accepting = true;
            if !s.logged && self.lease_valid() {
                s.logged = true;
                self.inner
                    .ownership
                    .record(shard, epoch, Event::Start, Instant::now());
            }
            std::mem::take(&mut s.buffer)
        };
        self.forward_later(shard, buffered);
    }

    /// Stops admitting new ops to a slot, recording the end of this node's ownership interval
    /// (call with the ownership order held and the edges applied).
    fn close_slot(&self, shard: u32, s: &mut Slot) {
        if s.logged {
            self.inner
                .ownership
                .record(shard, s.epoch, Event::Stop, Instant::now());
        }
        s.logged = false;
        s.accepting = false;
    }

    /// Writes the serving edges noted since the last call to the ownership log: a lapse closes
    /// every open interval at the lease's own expiry instant (admission stopped there, whenever
    /// this runs), a regain reopens the slots still accepting. The driver calls it every tick;
    /// every slot change calls it first.
    pub fn sync_ownership(&self) {
        drop(self.sync_ownership_locked());
    }

    fn sync_ownership_locked(&self) -> parking_lot::MutexGuard<'_, ()> {
        let order = self.inner.ownership_order.lock();
        for edge in self.inner.gate.take_edges() {
            for (shard, slot) in self.inner.slots.iter().enumerate() {
                let mut s = slot.lock();
                match edge {
                    ServeEdge::Ended(at) if s.logged => {
                        s.logged = false;
                        self.inner
                            .ownership
                            .record(shard as u32, s.epoch, Event::Stop, at);
                    }
                    ServeEdge::Began(at) if s.accepting && !s.logged => {
                        s.logged = true;
                        self.inner
                            .ownership
                            .record(shard as u32, s.epoch, Event::Start, at);
                    }
                    _ => {}
                }
            }
        }
        order
    }

    /// Waits until every ownership event recorded so far is on disk (at shutdown).
    pub fn flush_ownership(&self) {
        self.sync_ownership();
        self.inner.ownership.flush();
    }

    /// Ops admitted to `shard` and not yet answered.
    pub fn inflight(&self, shard: u32) -> usize {
        self.inner.slots.get(shard as usize).map_or(0, |s| {
            let s = s.lock();
            self.inner.cfg.max_inflight.max(1) - s.permits.available_permits()
        })
    }

    /// Resolves once every op admitted to `shard` has been answered (no polling: it takes all
    /// of the slot's permits, then gives them back). Call after [`Router::stop_accepting`], so
    /// no new op can take a permit meanwhile.
    pub async fn inflight_drained(&self, shard: u32) {
        let Some(slot) = self.inner.slots.get(shard as usize) else {
            return;
        };
        let permits = slot.lock().permits.clone();
        all_returned(&permits, self.inner.cfg.max_inflight.max(1)).await;
    }

    /// The actor serving `shard` now, and its epoch.
    pub fn serving(&self, shard: u32) -> Option<(ActorRef<ShardMsg>, u64)> {
        let s = self.inner.slots.get(shard as usize)?.lock();
        s.actor.clone().map(|a| (a, s.epoch))
    }

    /// Whether this node holds `shard` at `epoch` at this instant with a valid lease (its
    /// actor runs at that epoch; invariant 1). Job tasks ask this: their partitions are
    /// immutable, so a shard in graceful handoff may still be mapped by its old owner.
    pub fn serves_now(&self, shard: u32, epoch: u64) -> bool {
        self.inner.slots.get(shard as usize).is_some_and(|s| {
            let s = s.lock();
            s.actor.is_some() && s.epoch == epoch && self.lease_valid()
        })
    }

    /// The id of the actor serving a local shard now (changes on every restart).
    pub fn shard_actor(&self, shard: u32) -> Option<ractor::ActorId> {
        self.serving(shard).map(|(a, _)| a.get_id())
    }

    /// Shards with a serving actor here.
    pub fn owned_shards(&self) -> Vec<u32> {
        (0..self.inner.cfg.shards)
            .filter(|s| self.serving(*s).is_some())
            .collect()
    }

    /// From now on, new requests are refused with a retryable `ShuttingDown`.
    /// Admission ends here, so every open ownership interval ends here too.
    pub fn begin_shutdown(&self) {
        let _order = self.sync_ownership_locked();
        for (shard, slot) in self.inner.slots.iter().enumerate() {
            let mut s = slot.lock();
            self.inner.shutting_down.store(true, Ordering::SeqCst);
            self.close_slot(shard as u32, &mut s);
        }
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    // ---- sending ------------------------------------------------------------------------------

    /// Delivers `req` to the owner of `shard`: locally by actor message (no serialization), or
    /// over QUIC to the owning node.
    pub async fn send_to_shard(&self, shard: u32, req: ShardRequest) -> OpReply {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(ErrorCode::ShuttingDown);
        }
        let (owner, epoch) = self.owner(shard).ok_or(ErrorCode::NotOwner)?;
        if owner == self.inner.cfg.name {
            let (permit, actor) = self.admit_local(shard, epoch).await?;
            return call(actor, ShardInput::Local(req), permit).await;
        }
        let link = self.inner.transport.link(&owner).await.map_err(|e| {
            debug!(%owner, error = %e, "owner unreachable");
            ErrorCode::NotOwner
        })?;
        let env = Envelope::new(
            self.name(),
            Dest::Shard { shard, epoch },
            0,
            Body::ShardRequest(req),
        );
        let reply = link
            .request(env, self.inner.cfg.request_timeout)
            .await
            .map_err(|_| ErrorCode::Internal)?;
        decode_reply(&reply)
    }

    /// Owner and epoch of `shard` in the current map.
    fn owner(&self, shard: u32) -> Option<(String, u64)> {
        let map = self.inner.map.borrow();
        let a = map.shards.get(shard as usize)?;
        Some((a.owner.as_ref()?.to_string(), a.epoch))
    }

    /// A slot in the local shard's bounded queue (waiting while it is full: backpressure), if
    /// this node serves the shard at `epoch` with a valid lease.
    async fn admit_local(
        &self,
        shard: u32,
        epoch: u64,
    ) -> Result<(OwnedSemaphorePermit, ActorRef<ShardMsg>), ErrorCode> {
        let permits = {
            let s = self
                .inner
                .slots
                .get(shard as usize)
                .ok_or(ErrorCode::BadRequest)?
                .lock();
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                return Err(ErrorCode::ShuttingDown);
            }
            serving::admit(s.view(), epoch, self.lease_valid()).map_err(|_| ErrorCode::NotOwner)?;
            s.permits.clone()
        };
        let permit =
            match tokio::time::timeout(self.inner.cfg.request_timeout, permits.acquire_owned())
                .await
            {
                Ok(Ok(p)) => p,
                _ => {
                    metrics::counter!(m::SHARD_REJECTED, "reason" => "overloaded").increment(1);
                    return Err(ErrorCode::Overloaded);
                }
            };
        // Re-check after the wait: the shard may have moved meanwhile.
        let s = self
            .inner
            .slots
            .get(shard as usize)
            .ok_or(ErrorCode::BadRequest)?
            .lock();
        // ... and the lease may have lapsed while this op waited for its permit.
        serving::admit(s.view(), epoch, self.lease_valid()).map_err(|_| ErrorCode::NotOwner)?;
        let actor = s.actor.clone().ok_or(ErrorCode::NotOwner)?;
        Ok((permit, actor))
    }

    /// Sends what a slot buffered to the shard's current owner (this node after a resume), in
    /// order, on a task of its own.
    fn forward_later(&self, shard: u32, buffered: VecDeque<Buffered>) {
        if buffered.is_empty() {
            return;
        }
        metrics::gauge!(m::HANDOFF_BUFFERED).decrement(buffered.len() as f64);
        let this = self.clone();
        tokio::spawn(async move { this.forward_buffered(shard, buffered).await });
    }

    async fn forward_buffered(&self, shard: u32, buffered: VecDeque<Buffered>) {
        // In order, one at a time: the new owner sees them in arrival order.
        for b in buffered {
            let result = match owned_request(&b.frame) {
                Some(req) => self.send_to_shard(shard, req).await,
                None => Err(ErrorCode::BadRequest),
            };
            reply(&b.link, self.name(), b.corr, result_body(result)).await;
        }
    }

    pub fn shards(&self) -> Vec<ShardInfo> {
        let map = self.inner.map.borrow();
        map.shards
            .iter()
            .enumerate()
            .map(|(id, a)| ShardInfo {
                id: id as u32,
                owner: a.owner.as_ref().map(|o| o.to_string()),
                epoch: a.epoch,
                state: a.state().into(),
            })
            .collect()
    }
}

async fn call(
    actor: ActorRef<ShardMsg>,
    input: ShardInput,
    permit: OwnedSemaphorePermit,
) -> OpReply {
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
        Err(_) => Err(ErrorCode::NotOwner),
    };
    metrics::gauge!(m::SHARD_INFLIGHT).decrement(1.0);
    out
}

fn owned_body(frame: &Frame) -> Option<Body> {
    frame.to_owned_envelope().ok().map(|e| e.body)
}

fn owned_request(frame: &Frame) -> Option<ShardRequest> {
    match owned_body(frame)? {
        Body::ShardRequest(r) => Some(r),
        _ => None,
    }
}

/// Waits until all `total` permits of `permits` are free (tokio's semaphore is fair, so later
/// acquirers queue behind this one).
async fn all_returned(permits: &Semaphore, total: usize) {
    let n = u32::try_from(total).unwrap_or(u32::MAX);
    // Err only if the semaphore is closed; nothing waits on a closed slot.
    let _ = permits.acquire_many(n).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The drain wait is an event: it resolves when the last admitted op gives its permit back,
    /// not on a timer, and not before.
    #[tokio::test]
    async fn drain_wait_resolves_when_the_last_op_answers() {
        let permits = Arc::new(Semaphore::new(4));
        let a = permits.clone().acquire_owned().await.unwrap();
        let b = permits.clone().acquire_owned().await.unwrap();
        let wait = tokio::spawn({
            let p = permits.clone();
            async move { all_returned(&p, 4).await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!wait.is_finished(), "one op is still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("resolves once every permit is back")
            .unwrap();
        assert_eq!(
            permits.available_permits(),
            4,
            "the wait gives the permits back"
        );
    }
}

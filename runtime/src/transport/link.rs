//! One QUIC connection to a peer (node or client): a bounded send queue drained by a writer
//! task, a reader per incoming stream, and request/response matching by correlation id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::{Inbound, TransportError};
use crate::budget::{Budget, Held};
use crate::certs::{Identity, Role};
use crate::codec::{self, EncodedFrame, Envelope, Frame, ReadLimits};
use crate::metrics as m;

/// Frames at least this large get a QUIC stream of their own, so a tensor never holds up the
/// small control messages queued behind it (no head-of-line blocking between them).
pub const LARGE_FRAME_BYTES: usize = 256 * 1024;
/// Small frames written in one vectored write.
const WRITE_BATCH: usize = 64;
/// Large frames in flight at once per link.
const LARGE_STREAMS: usize = 4;
/// QUIC application error code used when we close a connection whose peer stopped reading.
pub const SLOW_PEER_CODE: u32 = 0x11;

/// The memory limits of one link (from [`super::TransportConfig::link_limits`]).
#[derive(Debug, Clone)]
pub(crate) struct LinkLimits {
    pub max_frame: usize,
    pub queue_depth: usize,
    /// Receive budgets (the connection's own and the node's shared one) and stall limit.
    pub read: ReadLimits,
    /// Bytes queued for sending on this connection.
    pub send: Budget,
    pub send_stall: Duration,
    /// Requests read and not yet answered.
    pub max_requests: usize,
}

/// A frame queued for the writer, with the send budget it holds until written.
type Queued = (EncodedFrame, Held);
/// QUIC application error code used when we reset a stream over a rejected frame.
pub const REJECTED_FRAME_CODE: u32 = 0x10;

/// Where requests go: a stand-in while the node forms the cluster (it answers status only),
/// then the router once the node starts; links made earlier see each as soon as it is set (a
/// peer may dial us, or we it, before the router exists).
pub type Handler = Arc<parking_lot::RwLock<Option<Arc<dyn Inbound>>>>;

/// The handler now (the lock is not held across the request).
fn current(handler: &Handler) -> Option<Arc<dyn Inbound>> {
    handler.read().clone()
}

/// A live link to a peer. Cheap to clone; all clones share the queue and the connection.
#[derive(Clone)]
pub struct Link {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    peer: Identity,
    conn: quinn::Connection,
    tx: mpsc::Sender<Queued>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    /// Requests this peer sent that we have not answered yet, by correlation id; each holds a
    /// permit of `requests`, returned when the reply is queued.
    awaiting: Mutex<HashMap<u64, OwnedSemaphorePermit>>,
    requests: Arc<Semaphore>,
    send_budget: Budget,
    send_stall: Duration,
    next_correlation: AtomicU64,
    /// `peer` label for the queue-depth gauge: node name, or "client" (bounded label set).
    label: String,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.inner.peer)
            .field("remote", &self.inner.conn.remote_address())
            .finish()
    }
}

impl Link {
    /// Wraps an established connection and starts its writer and reader tasks.
    pub(crate) fn start(
        conn: quinn::Connection,
        peer: Identity,
        limits: LinkLimits,
        handler: Handler,
    ) -> Link {
        let (tx, rx) = mpsc::channel(limits.queue_depth.max(1));
        let label = if peer.role == Role::Node {
            peer.name.clone()
        } else {
            "client".to_string()
        };
        let link = Link {
            inner: Arc::new(LinkInner {
                peer,
                conn: conn.clone(),
                tx,
                pending: Mutex::new(HashMap::new()),
                awaiting: Mutex::new(HashMap::new()),
                requests: Arc::new(Semaphore::new(limits.max_requests.max(1))),
                send_budget: limits.send.clone(),
                send_stall: limits.send_stall,
                next_correlation: AtomicU64::new(1),
                label,
            }),
        };
        tokio::spawn(write_loop(conn, rx, link.inner.label.clone()));
        tokio::spawn(accept_loop(link.clone(), limits, handler));
        link
    }

    /// The peer, as its verified certificate names it.
    pub fn peer(&self) -> &Identity {
        &self.inner.peer
    }

    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.inner.conn.remote_address()
    }

    pub fn is_closed(&self) -> bool {
        self.inner.conn.close_reason().is_some()
    }

    /// Smoothed round-trip time of the underlying connection.
    pub fn rtt(&self) -> Duration {
        self.inner.conn.rtt()
    }

    /// quinn's statistics of the underlying connection (RTT, congestion window, lost packets).
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.inner.conn.stats()
    }

    /// Frames queued for sending and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.inner.tx.max_capacity() - self.inner.tx.capacity()
    }

    pub fn same_connection(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Closes the connection now (queued frames are dropped and counted).
    pub fn close(&self, reason: &str) {
        self.inner.conn.close(0u32.into(), reason.as_bytes());
    }

    /// Closes the connection with an application error code and a reason the peer can log.
    pub fn close_with(&self, code: u32, reason: &str) {
        self.inner.conn.close(code.into(), reason.as_bytes());
    }

    /// Resolves when the connection has closed, for whatever reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.inner.conn.closed().await
    }

    /// Queues one envelope. Waits while the peer's queue is full: that wait is the backpressure.
    /// A reply also returns the request slot its request held.
    pub async fn send(&self, env: &Envelope) -> Result<(), TransportError> {
        let encoded = codec::encode(env).inspect_err(|_| {
            metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "encode").increment(1);
        });
        let out = match encoded {
            Ok(frame) => self.send_encoded(frame).await,
            Err(e) => Err(e.into()),
        };
        if env.body.is_reply() {
            self.answered(env.correlation);
        }
        out
    }

    /// The reply to request `corr` is queued (or cannot be): its request slot is free again.
    fn answered(&self, corr: u64) {
        self.inner.awaiting.lock().remove(&corr);
    }

    /// Queues a reply: encodes it and drops the body before waiting for send budget (a reply
    /// that waits holds only its frame), then returns the request slot of its request.
    pub async fn reply(&self, env: Envelope) -> Result<(), TransportError> {
        let corr = env.correlation;
        let encoded = codec::encode(&env).inspect_err(|_| {
            metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "encode").increment(1);
        });
        drop(env);
        let out = match encoded {
            Ok(frame) => self.send_encoded(frame).await,
            Err(e) => Err(e.into()),
        };
        self.answered(corr);
        out
    }

    /// Queues an already encoded frame (lets a sender encode once for several peers or retries).
    ///
    /// The frame's bytes are paid for from the connection's send budget until written; a peer
    /// that leaves it exhausted for `send_stall` (it is not reading) has its connection closed,
    /// which returns everything queued for it.
    pub async fn send_encoded(&self, frame: EncodedFrame) -> Result<(), TransportError> {
        let mut held = Held::default();
        if let Err(e) = self
            .inner
            .send_budget
            .reserve_into(&mut held, frame.len(), self.inner.send_stall)
            .await
        {
            metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "peer_not_reading")
                .increment(1);
            metrics::counter!(m::TRANSPORT_SLOW_PEERS_CLOSED).increment(1);
            warn!(peer = %self.inner.peer, remote = %self.remote_address(), error = %e,
                "peer is not reading what we send; closing its connection");
            self.inner
                .conn
                .close(SLOW_PEER_CODE.into(), b"not reading: send budget exhausted");
            return Err(TransportError::Closed {
                peer: self.inner.peer.name.clone(),
            });
        }
        if self.is_closed() {
            metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "disconnected").increment(1);
            return Err(TransportError::Closed {
                peer: self.inner.peer.name.clone(),
            });
        }
        metrics::gauge!(m::TRANSPORT_SEND_QUEUE_DEPTH, "peer" => self.inner.label.clone())
            .increment(1.0);
        if self.inner.tx.send((frame, held)).await.is_err() {
            metrics::gauge!(m::TRANSPORT_SEND_QUEUE_DEPTH, "peer" => self.inner.label.clone())
                .decrement(1.0);
            metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "disconnected").increment(1);
            return Err(TransportError::Closed {
                peer: self.inner.peer.name.clone(),
            });
        }
        Ok(())
    }

    /// Sends a request and waits for the reply with the same correlation id.
    pub async fn request(
        &self,
        mut env: Envelope,
        timeout: Duration,
    ) -> Result<Frame, TransportError> {
        let corr = self.inner.next_correlation.fetch_add(1, Ordering::Relaxed);
        env.correlation = corr;
        let (tx, rx) = oneshot::channel();
        self.inner.pending.lock().insert(corr, tx);
        let guard = PendingGuard { link: self, corr };
        self.send(&env).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(frame)) => {
                std::mem::forget(guard);
                Ok(frame)
            }
            Ok(Err(_)) => Err(TransportError::Closed {
                peer: self.inner.peer.name.clone(),
            }),
            Err(_) => {
                metrics::counter!(m::TRANSPORT_REQUEST_TIMEOUTS).increment(1);
                Err(TransportError::Timeout {
                    peer: self.inner.peer.name.clone(),
                    after: timeout,
                })
            }
        }
    }

    fn complete(&self, frame: Frame) {
        let corr = frame.envelope().correlation.to_native();
        match self.inner.pending.lock().remove(&corr) {
            Some(tx) => {
                let _ = tx.send(frame);
            }
            None => metrics::counter!(m::TRANSPORT_LATE_REPLIES).increment(1),
        }
    }
}

/// Removes a pending request that was abandoned (timeout, cancelled caller).
struct PendingGuard<'a> {
    link: &'a Link,
    corr: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.link.inner.pending.lock().remove(&self.corr);
    }
}

/// Drains the send queue onto the connection: small frames batched on one long-lived stream
/// (ordered), large frames each on a stream of their own.
async fn write_loop(conn: quinn::Connection, mut rx: mpsc::Receiver<Queued>, label: String) {
    let large = Arc::new(Semaphore::new(LARGE_STREAMS));
    let mut stream: Option<quinn::SendStream> = None;
    let mut batch = Vec::with_capacity(WRITE_BATCH * 2);
    // Send budget of the frames in `batch`: returned once they are written (or dropped).
    let mut batch_held: Vec<Held> = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut n = 0;
        let mut bytes = 0;
        while let Some((frame, held)) = next.take() {
            n += 1;
            bytes += frame.len();
            if frame.len() >= LARGE_FRAME_BYTES {
                let Ok(permit) = large.clone().acquire_owned().await else {
                    break;
                };
                let conn = conn.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let _held = held;
                    if let Err(e) = write_own_stream(&conn, frame).await {
                        debug!(error = %e, "large frame write failed");
                        metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "disconnected")
                            .increment(1);
                    }
                });
            } else {
                batch.extend(frame.into_chunks());
                batch_held.push(held);
            }
            if n < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        metrics::gauge!(m::TRANSPORT_SEND_QUEUE_DEPTH, "peer" => label.clone()).decrement(n as f64);
        metrics::counter!(m::WIRE_FRAMES_SENT).increment(n as u64);
        metrics::counter!(m::WIRE_BYTES_SENT).increment(bytes as u64);
        if batch.is_empty() {
            continue;
        }
        if stream.is_none() {
            match conn.open_uni().await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    debug!(error = %e, "cannot open stream; link is closing");
                    break;
                }
            }
        }
        if let Some(s) = stream.as_mut() {
            match s.write_all_chunks(&mut batch).await {
                Ok(()) => {}
                // The peer reset this stream (it rejected a frame); the batch is lost, the
                // connection is not: continue on a fresh stream.
                Err(quinn::WriteError::Stopped(code)) => {
                    warn!(peer = %label, %code, "peer stopped our stream; reopening");
                    metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "stream_reset")
                        .increment(1);
                    stream = None;
                }
                Err(e) => {
                    debug!(error = %e, "write failed; link is closing");
                    break;
                }
            }
        }
        batch.clear();
        batch_held.clear();
    }
    // Whatever is still queued will never be sent.
    rx.close();
    let mut dropped = 0u64;
    while rx.try_recv().is_ok() {
        dropped += 1;
    }
    if dropped > 0 {
        metrics::gauge!(m::TRANSPORT_SEND_QUEUE_DEPTH, "peer" => label.clone())
            .decrement(dropped as f64);
        metrics::counter!(m::TRANSPORT_SEND_DROPPED, "reason" => "disconnected").increment(dropped);
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
    }
}

async fn write_own_stream(
    conn: &quinn::Connection,
    frame: EncodedFrame,
) -> Result<(), TransportError> {
    let mut s = conn
        .open_uni()
        .await
        .map_err(|e| TransportError::Connection(e.to_string()))?;
    let mut chunks = frame.into_chunks();
    s.write_all_chunks(&mut chunks)
        .await
        .map_err(|e| TransportError::Connection(e.to_string()))?;
    let _ = s.finish();
    Ok(())
}

/// Accepts the peer's streams until the connection closes, then fails pending requests.
async fn accept_loop(link: Link, limits: LinkLimits, handler: Handler) {
    let limits = Arc::new(limits);
    loop {
        match link.inner.conn.accept_uni().await {
            Ok(recv) => {
                tokio::spawn(read_stream(
                    link.clone(),
                    recv,
                    limits.clone(),
                    handler.clone(),
                ));
            }
            Err(e) => {
                debug!(peer = %link.inner.peer.name, reason = %e, "connection closed");
                break;
            }
        }
    }
    // Dropping the senders wakes every waiting request with an error.
    link.inner.pending.lock().clear();
    link.inner.awaiting.lock().clear();
}

/// Reads frames from one stream. A bad frame resets the stream (STOP_SENDING) and is counted;
/// the connection and every other stream keep working.
async fn read_stream(
    link: Link,
    mut recv: quinn::RecvStream,
    limits: Arc<LinkLimits>,
    handler: Handler,
) {
    loop {
        match codec::read_frame_limited(&mut recv, limits.max_frame, Some(&limits.read)).await {
            Ok(Some(frame)) => {
                let kind = frame.envelope().body.kind();
                metrics::counter!(m::WIRE_FRAMES_RECEIVED, "kind" => kind.as_str()).increment(1);
                metrics::counter!(m::WIRE_BYTES_RECEIVED).increment(frame.len() as u64);
                if kind.is_reply() {
                    link.complete(frame);
                } else if let Some(h) = current(&handler) {
                    // One request slot per unanswered request: a peer that sends requests
                    // and never reads the replies runs out of slots, and its stream waits.
                    let Ok(slot) = link.inner.requests.clone().acquire_owned().await else {
                        return;
                    };
                    let corr = frame.envelope().correlation.to_native();
                    let duplicate = match link.inner.awaiting.lock().entry(corr) {
                        std::collections::hash_map::Entry::Occupied(_) => true,
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(slot);
                            false
                        }
                    };
                    if duplicate {
                        metrics::counter!(m::WIRE_REJECTED_FRAMES, "reason" => "duplicate_correlation")
                            .increment(1);
                        warn!(peer = %link.inner.peer, corr, "request reuses an unanswered correlation id; resetting stream");
                        let _ = recv.stop(REJECTED_FRAME_CODE.into());
                        return;
                    }
                    // Returns once the request is admitted, so this stream keeps flowing while
                    // the work runs; a full shard queue holds the stream (backpressure).
                    h.on_request(link.clone(), frame).await;
                } else {
                    metrics::counter!(m::WIRE_REJECTED_FRAMES, "reason" => "unexpected")
                        .increment(1);
                    warn!(peer = %link.inner.peer.name, kind = kind.as_str(), "request on a link that takes none; dropped");
                }
            }
            Ok(None) => return,
            Err(e) => {
                if let Some(reason) = e.reject_reason() {
                    metrics::counter!(m::WIRE_REJECTED_FRAMES, "reason" => reason).increment(1);
                    warn!(peer = %link.inner.peer.name, role = %link.inner.peer.role, remote = %link.remote_address(),
                        reason, error = %e, "rejected frame; resetting stream");
                    let _ = recv.stop(REJECTED_FRAME_CODE.into());
                } else {
                    debug!(peer = %link.inner.peer.name, error = %e, "stream ended");
                }
                return;
            }
        }
    }
}

//! QUIC transport: one quinn endpoint per node, mutual TLS against the cluster CA, one reused
//! [`Link`] per peer with a bounded send queue, and dialing with exponential backoff.
//!
//! Identity comes only from the peer's verified certificate ([`tls`]); nothing a peer says about
//! itself is trusted. Frames are validated by [`crate::codec`] before anything reads them.

#[cfg(feature = "fault-injection")]
pub mod fault;
mod link;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

pub use link::{Link, LARGE_FRAME_BYTES, REJECTED_FRAME_CODE};
pub use tls::{PeerPolicy, TlsMaterial};

use crate::budget::{Budget, Budgets};
use crate::certs::{Identity, Role};
use crate::codec::{CodecError, Frame, ReadLimits};
use crate::metrics as m;

/// A future the transport awaits per incoming request.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Receives requests (every frame that is not a reply).
///
/// The returned future should resolve once the request is *admitted* (queued for its shard, say)
/// and do the work in a task of its own: the stream it came on is not read while it is pending,
/// which is how a full queue pushes back on the sender.
pub trait Inbound: Send + Sync + 'static {
    fn on_request(&self, link: Link, frame: Frame) -> BoxFuture;
}

/// Transport settings (see `[transport]` in config/node.toml for units and defaults).
#[derive(Debug, Clone)]
pub struct TransportConfig {
    pub max_frame_bytes: usize,
    pub send_queue_depth: usize,
    pub connect_timeout: Duration,
    pub reconnect_max_backoff: Duration,
    /// Bytes one connection may hold in received frames not yet dropped.
    pub connection_inflight_bytes: usize,
    /// Bytes all connections together may hold that way.
    pub node_inflight_bytes: usize,
    /// Bytes queued for sending on one connection.
    pub connection_send_bytes: usize,
    /// How long a frame may wait for send budget before the connection is closed.
    pub send_stall: Duration,
    /// How long a peer may pause mid-frame, and a frame may wait for receive budget.
    pub receive_stall: Duration,
    /// Requests read and not yet answered, per connection.
    pub max_requests_per_connection: usize,
    /// Connections one certificate name may hold to this node.
    pub max_connections_per_peer: usize,
    /// Concurrent incoming streams per connection.
    pub max_streams_per_connection: u32,
}

impl Default for TransportConfig {
    fn default() -> Self {
        const MIB: usize = 1 << 20;
        TransportConfig {
            max_frame_bytes: crate::codec::DEFAULT_MAX_FRAME_BYTES,
            send_queue_depth: 1024,
            connect_timeout: Duration::from_secs(5),
            reconnect_max_backoff: Duration::from_secs(5),
            connection_inflight_bytes: 128 * MIB,
            node_inflight_bytes: 512 * MIB,
            connection_send_bytes: 64 * MIB,
            send_stall: Duration::from_secs(10),
            receive_stall: Duration::from_secs(10),
            max_requests_per_connection: 256,
            max_connections_per_peer: 64,
            max_streams_per_connection: 256,
        }
    }
}

impl TransportConfig {
    /// The limits of one new connection; `node` is the node-wide receive budget it shares.
    pub(crate) fn link_limits(&self, node: &Budget) -> link::LinkLimits {
        link::LinkLimits {
            max_frame: self.max_frame_bytes,
            queue_depth: self.send_queue_depth,
            read: ReadLimits {
                budgets: Budgets {
                    connection: Budget::new("connection", self.connection_inflight_bytes),
                    node: node.clone(),
                    wait: self.receive_stall,
                },
                stall: self.receive_stall,
            },
            send: Budget::new("send", self.connection_send_bytes),
            send_stall: self.send_stall,
            max_requests: self.max_requests_per_connection,
        }
    }
}

/// Errors of the transport. Each says what state the caller is left in.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding the UDP socket failed; nothing is running.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// TLS material or configuration is unusable; nothing is running.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The peer is not a known member; nothing was sent.
    #[error("unknown peer {0}")]
    UnknownPeer(String),
    /// Dialing failed (refused handshake, timeout); a later call retries after a backoff.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable { peer: String, reason: String },
    /// The link closed; the message may not have been delivered.
    #[error("link to {peer} is closed")]
    Closed { peer: String },
    /// No reply in time; the request may or may not have been applied (retry idempotently).
    #[error("no reply from {peer} within {after:?}")]
    Timeout { peer: String, after: Duration },
    /// A connection-level failure while writing.
    #[error("connection failed: {0}")]
    Connection(String),
    /// Encoding the message failed (a bug on this side).
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The endpoint is shutting down.
    #[error("transport is shutting down")]
    ShuttingDown,
}

/// QUIC application error code of a connection refused for who its peer is.
pub const REFUSED_CODE: u32 = 0x12;
/// How long the old connection of a node identity gets to prove it is alive when a new one
/// arrives from another address.
const DUPLICATE_PROBE: Duration = Duration::from_millis(1500);

/// Why a connection was refused after its handshake.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Policy(String),
    #[error("too many connections under this certificate name ({0} open)")]
    TooMany(usize),
    #[error("this node identity is already live at {0}; a second process may not use it")]
    Duplicate(SocketAddr),
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Policy(_) => "revoked",
            Refusal::TooMany(_) => "too_many_connections",
            Refusal::Duplicate(_) => "duplicate_identity",
        }
    }
}

/// Per-peer dialing state: at most one dial in flight, and a backoff after failures.
#[derive(Default)]
struct PeerSlot {
    link: Option<Link>,
    dial: Arc<tokio::sync::Mutex<()>>,
    failures: u32,
    retry_at: Option<Instant>,
}

struct Inner {
    name: String,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    cfg: TransportConfig,
    policy: Arc<dyn PeerPolicy>,
    /// Node-wide budget of received frames' bytes, shared by every link.
    recv_budget: Budget,
    /// Every live link (nodes and clients) by connection id, to enforce the policy on live
    /// connections (revocation) and count connections per certificate name.
    links: Mutex<HashMap<usize, Link>>,
    addrs: Mutex<HashMap<String, SocketAddr>>,
    peers: Mutex<HashMap<String, PeerSlot>>,
    handler: link::Handler,
    accepting: std::sync::atomic::AtomicBool,
}

/// A node's QUIC endpoint and its links to peers. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// The UDP socket under quinn.
#[derive(Debug)]
pub enum Socket {
    /// A plain UDP socket bound to this address.
    Bind(SocketAddr),
    /// A socket quinn cannot tell from a real one (the fault-injecting socket, in tests).
    Abstract(Arc<dyn quinn::AsyncUdpSocket>),
}

impl Transport {
    /// Binds the endpoint. Incoming connections are accepted only after [`Transport::start`].
    pub fn bind(
        name: &str,
        socket: Socket,
        tls: &TlsMaterial,
        policy: Arc<dyn PeerPolicy>,
        cfg: TransportConfig,
    ) -> Result<Transport, TransportError> {
        let mut server = tls::server_config(tls, policy.clone())?;
        server.transport_config(tls::transport_config_with(cfg.max_streams_per_connection));
        let client_config = tls::client_config(tls)?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let endpoint = match socket {
            Socket::Bind(addr) => {
                let udp = std::net::UdpSocket::bind(addr)
                    .map_err(|source| TransportError::Bind { addr, source })?;
                quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), udp, runtime)
                    .map_err(|source| TransportError::Bind { addr, source })?
            }
            Socket::Abstract(sock) => {
                let addr = sock
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                quinn::Endpoint::new_with_abstract_socket(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    sock,
                    runtime,
                )
                .map_err(|source| TransportError::Bind { addr, source })?
            }
        };
        Ok(Transport {
            inner: Arc::new(Inner {
                name: name.to_string(),
                endpoint,
                client_config,
                recv_budget: Budget::new("node", cfg.node_inflight_bytes),
                cfg,
                policy,
                links: Mutex::new(HashMap::new()),
                addrs: Mutex::new(HashMap::new()),
                peers: Mutex::new(HashMap::new()),
                handler: Arc::new(parking_lot::RwLock::new(None)),
                accepting: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.endpoint.local_addr()
    }

    pub fn config(&self) -> &TransportConfig {
        &self.inner.cfg
    }

    /// Sets where each member can be dialed (static membership; the control plane updates it).
    pub fn set_members(&self, members: impl IntoIterator<Item = (String, SocketAddr)>) {
        let mut addrs = self.inner.addrs.lock();
        addrs.clear();
        addrs.extend(members.into_iter().filter(|(n, _)| *n != self.inner.name));
    }

    /// Starts accepting connections before the node can take requests (handshakes only; a
    /// request arriving before [`Transport::start`] is dropped and its sender retries). Peers
    /// discovering each other at startup need this, or each would wait for the other.
    pub fn listen(&self) {
        if !self
            .inner
            .accepting
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let this = self.clone();
            tokio::spawn(async move { this.accept_loop().await });
        }
    }

    /// Routes requests to `handler` (replacing any earlier one) and accepts connections (if
    /// [`Transport::listen`] has not already started that).
    pub fn start(&self, handler: Arc<dyn Inbound>) {
        *self.inner.handler.write() = Some(handler);
        self.listen();
    }

    async fn accept_loop(&self) {
        while let Some(incoming) = self.inner.endpoint.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        // The TLS verifier already logged which certificate it refused and why.
                        metrics::counter!(m::TRANSPORT_HANDSHAKE_FAILURES, "direction" => "inbound").increment(1);
                        debug!(%remote, error = %e, "inbound handshake failed");
                        return;
                    }
                };
                match tls::peer_identity(&conn) {
                    Ok(id) => {
                        if let Err(why) = this.check_inbound(&conn, &id).await {
                            this.refuse(&conn, &id, why);
                            return;
                        }
                        this.adopt(conn, id, false);
                    }
                    Err(e) => {
                        warn!(%remote, error = %e, "connection without a usable identity; closing");
                        conn.close(1u32.into(), b"no identity");
                    }
                };
            });
        }
    }

    /// Whether an inbound connection from `id` may stay: the policy (revocation), the cap on
    /// connections per certificate name, and, for a node identity, that no other live process
    /// holds it (a second process with the same node certificate is refused; the first keeps
    /// serving).
    async fn check_inbound(&self, conn: &quinn::Connection, id: &Identity) -> Result<(), Refusal> {
        self.inner.policy.admit(id).map_err(Refusal::Policy)?;
        let same_name = self
            .inner
            .links
            .lock()
            .values()
            .filter(|l| !l.is_closed() && l.peer().name == id.name && l.peer().role == id.role)
            .count();
        if same_name >= self.inner.cfg.max_connections_per_peer {
            return Err(Refusal::TooMany(same_name));
        }
        if id.role != Role::Node {
            return Ok(());
        }
        let existing = self
            .inner
            .peers
            .lock()
            .get(&id.name)
            .and_then(|s| s.link.clone())
            .filter(|l| !l.is_closed());
        let Some(old) = existing else { return Ok(()) };
        // The same process dials from the address it listens on; a new address with the old
        // connection still answering is a second process under the same name. (A restarted
        // process does not answer on the old connection; a node that moved gets no answer
        // there either.)
        if old.remote_address() == conn.remote_address() {
            return Ok(());
        }
        let ping = crate::codec::Envelope::new(
            &self.inner.name,
            crate::codec::Dest::Peer,
            0,
            crate::codec::Body::Ping(0),
        );
        match old.request(ping, DUPLICATE_PROBE).await {
            Ok(_) => Err(Refusal::Duplicate(old.remote_address())),
            Err(_) => Ok(()),
        }
    }

    /// Closes a connection refused for who its peer is, saying why (the peer logs it).
    fn refuse(&self, conn: &quinn::Connection, id: &Identity, why: Refusal) {
        let text = why.to_string();
        metrics::counter!(m::TRANSPORT_PEERS_REFUSED, "reason" => why.label()).increment(1);
        match why {
            Refusal::Duplicate(_) => {
                tracing::error!(peer = %id.name, serial = %id.serial, remote = %conn.remote_address(), reason = %text,
                    "refused a second process presenting a live node identity")
            }
            _ => {
                warn!(peer = %id.name, role = %id.role, serial = %id.serial, remote = %conn.remote_address(), reason = %text,
                    "connection refused")
            }
        }
        conn.close(REFUSED_CODE.into(), text.as_bytes());
    }

    /// Closes every live connection whose peer the policy no longer admits (a certificate was
    /// revoked). Returns how many were closed.
    pub fn enforce_policy(&self) -> usize {
        let refused: Vec<Link> = self
            .inner
            .links
            .lock()
            .values()
            .filter(|l| !l.is_closed() && self.inner.policy.admit(l.peer()).is_err())
            .cloned()
            .collect();
        for l in &refused {
            let why = self.inner.policy.admit(l.peer()).err().unwrap_or_default();
            metrics::counter!(m::TRANSPORT_PEERS_REFUSED, "reason" => "revoked").increment(1);
            warn!(peer = %l.peer().name, serial = %l.peer().serial, reason = %why, "closing a live connection the policy no longer admits");
            l.close_with(REFUSED_CODE, &why);
        }
        refused.len()
    }

    /// Wraps a new connection in a link, registering node links in the peer table.
    fn adopt(&self, conn: quinn::Connection, id: Identity, dialed: bool) -> Link {
        let role = id.role.to_string();
        let conn_id = conn.stable_id();
        let link = Link::start(
            conn,
            id.clone(),
            self.inner.cfg.link_limits(&self.inner.recv_budget),
            self.inner.handler.clone(),
        );
        self.inner.links.lock().insert(conn_id, link.clone());
        metrics::gauge!(m::TRANSPORT_CONNECTIONS, "role" => role.clone()).increment(1.0);
        info!(peer = %id.name, role = %id.role, remote = %link.remote_address(), dialed, "connection up");
        if id.role == Role::Node {
            let mut peers = self.inner.peers.lock();
            let slot = peers.entry(id.name.clone()).or_default();
            // A peer dialing us has just proven it is alive: its new connection replaces ours,
            // which may be to a process that died (a restarted peer would otherwise be
            // unreachable until QUIC's idle timeout noticed). A link we dialed ourselves only
            // fills an empty slot. A replaced link stays open and serves its own streams.
            if !dialed || slot.link.as_ref().is_none_or(Link::is_closed) {
                slot.link = Some(link.clone());
                slot.failures = 0;
                slot.retry_at = None;
            }
        }
        let this = self.clone();
        let watch = link.clone();
        tokio::spawn(async move {
            let why = watch.closed().await;
            this.inner.links.lock().remove(&conn_id);
            metrics::gauge!(m::TRANSPORT_CONNECTIONS, "role" => role).decrement(1.0);
            match &why {
                quinn::ConnectionError::ApplicationClosed(c)
                    if c.error_code == REFUSED_CODE.into() =>
                {
                    tracing::error!(peer = %watch.peer().name, reason = %String::from_utf8_lossy(&c.reason),
                        "the peer refused this node's connection")
                }
                _ => debug!(peer = %watch.peer().name, reason = %why, "connection down"),
            }
            if let Some(slot) = this.inner.peers.lock().get_mut(&watch.peer().name) {
                if slot
                    .link
                    .as_ref()
                    .is_some_and(|l| l.same_connection(&watch))
                {
                    slot.link = None;
                }
            }
        });
        link
    }

    /// The live link to `peer`, dialing it if needed (one dial at a time per peer; after a
    /// failure, calls fail fast until the backoff has passed).
    pub async fn link(&self, peer: &str) -> Result<Link, TransportError> {
        let dial_lock = {
            let mut peers = self.inner.peers.lock();
            let slot = peers.entry(peer.to_string()).or_default();
            if let Some(l) = slot.link.as_ref().filter(|l| !l.is_closed()) {
                return Ok(l.clone());
            }
            slot.dial.clone()
        };
        let _dialing = dial_lock.lock().await;
        {
            let peers = self.inner.peers.lock();
            if let Some(slot) = peers.get(peer) {
                if let Some(l) = slot.link.as_ref().filter(|l| !l.is_closed()) {
                    return Ok(l.clone());
                }
                if let Some(at) = slot.retry_at.filter(|at| *at > Instant::now()) {
                    return Err(TransportError::Unreachable {
                        peer: peer.to_string(),
                        reason: format!(
                            "backing off for {:?} after {} failures",
                            at - Instant::now(),
                            slot.failures
                        ),
                    });
                }
            }
        }
        let addr = self
            .inner
            .addrs
            .lock()
            .get(peer)
            .copied()
            .ok_or_else(|| TransportError::UnknownPeer(peer.to_string()))?;
        let cfg = &self.inner.cfg;
        let attempt = || self.dial(peer, addr);
        let result = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(20))
                    .with_max_delay(cfg.reconnect_max_backoff / 4)
                    .with_max_times(2),
            )
            .await;
        let mut peers = self.inner.peers.lock();
        let slot = peers.entry(peer.to_string()).or_default();
        match result {
            Ok(conn) => {
                drop(peers);
                metrics::counter!(m::TRANSPORT_DIALS, "result" => "ok").increment(1);
                let id = tls::peer_identity(&conn)?;
                if let Err(why) = self.inner.policy.admit(&id) {
                    self.refuse(&conn, &id, Refusal::Policy(why.clone()));
                    return Err(TransportError::Unreachable {
                        peer: peer.to_string(),
                        reason: why,
                    });
                }
                Ok(self.adopt(conn, id, true))
            }
            Err(e) => {
                metrics::counter!(m::TRANSPORT_DIALS, "result" => "error").increment(1);
                slot.failures = slot.failures.saturating_add(1);
                let backoff = Duration::from_millis(50u64 << slot.failures.min(10))
                    .min(cfg.reconnect_max_backoff);
                slot.retry_at = Some(Instant::now() + backoff);
                Err(e)
            }
        }
    }

    async fn dial(
        &self,
        peer: &str,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, TransportError> {
        let unreachable = |reason: String| TransportError::Unreachable {
            peer: peer.to_string(),
            reason,
        };
        let connecting = self
            .inner
            .endpoint
            .connect_with(self.inner.client_config.clone(), addr, peer)
            .map_err(|e| unreachable(e.to_string()))?;
        match tokio::time::timeout(self.inner.cfg.connect_timeout, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => {
                metrics::counter!(m::TRANSPORT_HANDSHAKE_FAILURES, "direction" => "outbound")
                    .increment(1);
                Err(unreachable(e.to_string()))
            }
            Err(_) => Err(unreachable(format!(
                "no handshake within {:?}",
                self.inner.cfg.connect_timeout
            ))),
        }
    }

    /// Dials whatever node listens at `addr` (a seed) and learns its name from its certificate;
    /// the link is registered under that name, and the address remembered for later dials.
    pub async fn dial_any(&self, addr: SocketAddr) -> Result<Link, TransportError> {
        let conn = self.dial(tls::ANY_NODE, addr).await?;
        let id = tls::peer_identity(&conn)?;
        if let Err(why) = self.inner.policy.admit(&id) {
            self.refuse(&conn, &id, Refusal::Policy(why.clone()));
            return Err(TransportError::Unreachable {
                peer: id.name,
                reason: why,
            });
        }
        if id.name == self.inner.name {
            conn.close(0u32.into(), b"self");
            return Err(TransportError::Unreachable {
                peer: id.name,
                reason: "that is this node".into(),
            });
        }
        self.inner.addrs.lock().insert(id.name.clone(), addr);
        metrics::counter!(m::TRANSPORT_DIALS, "result" => "ok").increment(1);
        Ok(self.adopt(conn, id, true))
    }

    /// Adds or updates the address of one member (dynamic membership).
    pub fn add_member(&self, name: &str, addr: SocketAddr) {
        if name != self.inner.name {
            self.inner.addrs.lock().insert(name.to_string(), addr);
        }
    }

    /// The live links to members now (for connection statistics).
    pub fn live_links(&self) -> Vec<Link> {
        self.inner
            .peers
            .lock()
            .values()
            .filter_map(|s| s.link.clone())
            .filter(|l| !l.is_closed())
            .collect()
    }

    /// Bytes of received frames held now, node-wide (against the node's receive budget).
    pub fn inflight_bytes(&self) -> usize {
        self.inner.recv_budget.in_use()
    }

    /// Names of members with a live link now.
    pub fn live_peers(&self) -> Vec<String> {
        self.inner
            .peers
            .lock()
            .iter()
            .filter(|(_, s)| s.link.as_ref().is_some_and(|l| !l.is_closed()))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Closes every connection (peers see a clean close) and waits, up to `grace`, for the
    /// close to reach them.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(grace, self.inner.endpoint.wait_idle()).await;
    }
}

/// A client connection to a node (CLI, demo workload, tests): a [`Link`] that takes no requests.
pub struct Client {
    endpoint: quinn::Endpoint,
    link: Link,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("link", &self.link).finish()
    }
}

impl Client {
    /// Connects to the node at `addr`, which must present the certificate of node `server_name`
    /// (the CLI learns it from... the certificate itself: pass `None` to accept any node name).
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: &TlsMaterial,
        cfg: &TransportConfig,
    ) -> Result<Client, TransportError> {
        Self::connect_with(addr, server_name, tls::client_config(tls)?, cfg).await
    }

    pub async fn connect_with(
        addr: SocketAddr,
        server_name: &str,
        client_config: quinn::ClientConfig,
        cfg: &TransportConfig,
    ) -> Result<Client, TransportError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| TransportError::ShuttingDown)?;
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|source| TransportError::Bind { addr: bind, source })?;
        let unreachable = |reason: String| TransportError::Unreachable {
            peer: server_name.to_string(),
            reason,
        };
        let connecting = endpoint
            .connect_with(client_config, addr, server_name)
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(cfg.connect_timeout, connecting)
            .await
            .map_err(|_| unreachable("handshake timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let id = tls::peer_identity(&conn)?;
        let link = Link::start(
            conn,
            id,
            cfg.link_limits(&Budget::new("node", cfg.node_inflight_bytes)),
            Arc::default(),
        );
        Ok(Client { endpoint, link })
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    pub async fn close(self) {
        self.link.close("bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

#[cfg(test)]
mod tests;

//! A whole node: transport, router, supervisor with its shard actors, worker pool, heartbeats.
//! The binary calls [`Node::start`] after validating config, then [`Node::shutdown`] on a signal.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tidepool_runtime::certs::{Identity, Role};
use tidepool_runtime::codec::{ArchivedBody, Body, Dest, Envelope};
use tidepool_runtime::config::NodeConfig;
use tidepool_runtime::placement;
use tidepool_runtime::transport::{PeerPolicy, Socket, TlsMaterial, Transport, TransportConfig};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::audit::{AuditError, AuditLog};
use crate::restart::RestartBudget;
use crate::router::{Router, RouterConfig};
use crate::shard::SharedState;
use crate::supervisor::{NodeSupervisor, SupervisorArgs, SupervisorMsg};
use crate::worker::WorkerPool;

/// How often each member is pinged (reachability for `cluster status` and readiness).
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("TLS: {0}")]
    Tls(#[from] tidepool_runtime::transport::tls::TlsError),
    /// The node certificate names someone else than `node.name`.
    #[error("certificate in {dir} is for {found:?}, but node.name is {expected:?}")]
    WrongCertificate {
        dir: String,
        expected: String,
        found: String,
    },
    #[error(transparent)]
    Transport(#[from] tidepool_runtime::transport::TransportError),
    #[error(transparent)]
    Placement(#[from] placement::PlacementError),
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot start the supervisor: {0}")]
    Spawn(String),
}

/// Admits member nodes and any client; refuses node certificates of non-members.
#[derive(Debug)]
struct MemberPolicy {
    members: HashSet<String>,
}

impl PeerPolicy for MemberPolicy {
    fn admit(&self, peer: &Identity) -> Result<(), String> {
        match peer.role {
            Role::Node if self.members.contains(&peer.name) => Ok(()),
            Role::Node => Err(format!(
                "node {:?} is not a member of this cluster",
                peer.name
            )),
            Role::Admin | Role::Reader => Ok(()),
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    router: Router,
    supervisor: ActorRef<SupervisorMsg>,
    supervisor_done: tokio::task::JoinHandle<()>,
    escalations: mpsc::Receiver<String>,
    stopping: Arc<AtomicBool>,
}

impl Node {
    /// Starts a node from validated config. `socket` overrides the UDP socket (fault injection).
    pub async fn start(cfg: &NodeConfig, socket: Option<Socket>) -> Result<Node, NodeError> {
        let name = cfg.node.name.clone();
        let tls = TlsMaterial::load_node(&cfg.tls.dir)?;
        if tls.identity.name != name {
            return Err(NodeError::WrongCertificate {
                dir: cfg.tls.dir.display().to_string(),
                expected: name,
                found: tls.identity.name.clone(),
            });
        }
        std::fs::create_dir_all(&cfg.node.data_dir).map_err(|source| NodeError::DataDir {
            path: cfg.node.data_dir.display().to_string(),
            source,
        })?;
        let members: Vec<(String, std::net::SocketAddr)> = cfg
            .cluster
            .members
            .iter()
            .map(|m| (m.name.clone(), m.addr))
            .collect();
        let policy = Arc::new(MemberPolicy {
            members: members.iter().map(|(n, _)| n.clone()).collect(),
        });
        let tcfg = TransportConfig {
            max_frame_bytes: cfg.transport.max_frame_bytes as usize,
            send_queue_depth: cfg.transport.send_queue_depth,
            connect_timeout: Duration::from_millis(cfg.transport.connect_timeout_ms),
            reconnect_max_backoff: Duration::from_millis(cfg.transport.reconnect_max_backoff_ms),
        };
        let transport = Transport::bind(
            &name,
            socket.unwrap_or(Socket::Bind(cfg.node.listen)),
            &tls,
            policy,
            tcfg,
        )?;
        transport.set_members(members.clone());
        let names: Vec<String> = members.iter().map(|(n, _)| n.clone()).collect();
        let map = placement::assign(cfg.cluster.shards, &names, cfg.cluster.placement_eps)?;
        let audit = AuditLog::open(&cfg.node.data_dir, &name).await?;
        let router = Router::new(
            RouterConfig {
                name: name.clone(),
                members,
                map,
                max_inflight: cfg.shard.max_inflight,
                request_timeout: Duration::from_millis(cfg.transport.request_timeout_ms),
            },
            transport.clone(),
            audit,
        );
        let states: HashMap<u32, SharedState> = router
            .owned_shards()
            .into_iter()
            .map(|s| (s, SharedState::default()))
            .collect();
        let (esc_tx, escalations) = mpsc::channel(1);
        let args = SupervisorArgs {
            router: router.clone(),
            pool: WorkerPool::new(cfg.workers.threads, cfg.workers.queue_depth),
            states,
            budget: RestartBudget::default(),
            escalate: esc_tx,
        };
        let (supervisor, supervisor_done) =
            Actor::spawn(Some(format!("supervisor-{name}")), NodeSupervisor, args)
                .await
                .map_err(|e| NodeError::Spawn(e.to_string()))?;
        transport.start(Arc::new(router.clone()));
        let stopping = Arc::new(AtomicBool::new(false));
        tokio::spawn(heartbeat(router.clone(), stopping.clone()));
        info!(node = %name, addr = ?transport.local_addr().ok(), shards = router.owned_shards().len(), "node started");
        Ok(Node {
            router,
            supervisor,
            supervisor_done,
            escalations,
            stopping,
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn supervisor(&self) -> &ActorRef<SupervisorMsg> {
        &self.supervisor
    }

    /// Ready: every local shard has a running actor, a majority of members answer, and the node
    /// is not stopping.
    pub fn ready(&self) -> bool {
        self.readiness().is_ready()
    }

    /// A cheap handle for health endpoints: readiness without holding the node.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            router: self.router.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// Resolves when the supervisor gives up (restart budget spent), with its reason.
    pub async fn escalated(&mut self) -> Option<String> {
        self.escalations.recv().await
    }

    /// Clean stop: refuse new requests, let in-flight ones finish (up to `grace`), stop the
    /// actors, close every connection so peers see a clean close.
    pub async fn shutdown(self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        self.router.begin_shutdown();
        let deadline = tokio::time::Instant::now() + grace;
        let settle = tokio::time::timeout_at(
            deadline,
            self.supervisor.stop_and_wait(Some("shutdown".into()), None),
        );
        if settle.await.is_err() {
            self.supervisor.kill();
        }
        let _ = tokio::time::timeout_at(deadline, self.supervisor_done).await;
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(100));
        self.router.transport().shutdown(left).await;
        info!(node = %self.router.name(), "node stopped");
    }
}

/// Answers "is this node ready?" for `/readyz`; flips to not-ready the moment a stop begins.
#[derive(Debug, Clone)]
pub struct Readiness {
    router: Router,
    stopping: Arc<AtomicBool>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst)
            && self.router.all_shards_running()
            && self.router.members_up() * 2 > self.router.members().len()
    }

    /// Marks the node as stopping (readiness 503) before the drain starts.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.router.begin_shutdown();
    }
}

/// Pings every other member each [`HEARTBEAT`]; keeps the links up and the reachability current.
async fn heartbeat(router: Router, stopping: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    while !stopping.load(Ordering::SeqCst) {
        tick.tick().await;
        for (peer, _) in router.members().iter().filter(|(n, _)| n != router.name()) {
            nonce += 1;
            let (router, peer) = (router.clone(), peer.clone());
            tokio::spawn(async move {
                let Ok(link) = router.transport().link(&peer).await else {
                    return;
                };
                let env = Envelope::new(
                    router.name(),
                    Dest::Node(peer.clone()),
                    0,
                    Body::Ping(nonce),
                );
                match link.request(env, HEARTBEAT * 2).await {
                    Ok(f) if matches!(f.envelope().body, ArchivedBody::Pong(_)) => {
                        router.saw(&peer)
                    }
                    Ok(_) => debug!(%peer, "odd heartbeat reply"),
                    Err(e) => debug!(%peer, error = %e, "heartbeat failed"),
                }
            });
        }
    }
}

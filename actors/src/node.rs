//! A whole node: transport, control plane, router, supervisor, ownership driver, leases, worker
//! pool. The binary calls [`Node::start`] after validating config, then [`Node::shutdown`] (which
//! drains the node's shards first) on a signal.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use tidepool_runtime::certs::Identity;
use tidepool_runtime::codec::{Body, ControlKind, Dest, Envelope};
use tidepool_runtime::config::NodeConfig;
use tidepool_runtime::control::{
    Command, ControlConfig, ControlPlane, MemberState, NodeInfo, RaftTransport, RpcKind,
};
use tidepool_runtime::lease::LeaseConfig;
use tidepool_runtime::metrics as m;
use tidepool_runtime::rebalance::RebalanceConfig;
use tidepool_runtime::storage::{KeyRing, Store};
use tidepool_runtime::transport::{PeerPolicy, Socket, TlsMaterial, Transport, TransportConfig};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::audit::{AuditError, AuditLog};
use crate::coordinator::CoordinatorCtx;
use crate::driver::{self, DriverConfig};
use crate::job_admin::{self, JobAdmin};
use crate::job_exec::{JobExecutor, JobLimits, DEFAULT_CACHE_BYTES};
use crate::leader::ClusterLoad;
use crate::leader::{self, Leases};
use crate::load::{self, LoadMeter};
use crate::restart::RestartBudget;
use crate::router::{Router, RouterConfig};
use crate::services::Services;
use crate::supervisor::{NodeSupervisor, SupervisorArgs, SupervisorMsg};
use crate::worker::WorkerPool;

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
    #[error("storage: {0}")]
    Storage(#[from] tidepool_runtime::storage::StorageError),
    /// The data key file (`storage.key_file`) is missing, unreadable or malformed.
    #[error("storage.key_file: {0}")]
    DataKey(#[from] tidepool_runtime::storage::KeyError),
    #[error("control plane: {0}")]
    Control(#[from] tidepool_runtime::control::ControlError),
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot start the supervisor: {0}")]
    Spawn(String),
    #[error("could not join the cluster: {0}")]
    Join(String),
}

/// Any certificate from the cluster CA may connect unless its serial is on the replicated
/// revocation list (membership is dynamic; a node proves its name with its certificate, and
/// what each identity may do is checked per request). The list is updated from the map.
#[derive(Debug, Default)]
struct ClusterPolicy {
    revoked: parking_lot::RwLock<std::collections::BTreeSet<String>>,
}

impl ClusterPolicy {
    /// Replaces the revocation list; true if it changed.
    fn set_revoked(&self, serials: std::collections::BTreeSet<String>) -> bool {
        let mut r = self.revoked.write();
        if *r == serials {
            return false;
        }
        *r = serials;
        true
    }
}

impl PeerPolicy for ClusterPolicy {
    fn admit(&self, peer: &Identity) -> Result<(), String> {
        if self.revoked.read().contains(&peer.serial) {
            return Err(format!(
                "certificate {} of {} ({}) is revoked",
                peer.serial, peer.name, peer.role
            ));
        }
        Ok(())
    }
}

/// Control-plane RPCs over the node's QUIC transport.
struct QuicRaft {
    transport: Transport,
    me: String,
    timeout: Duration,
}

#[async_trait::async_trait]
impl RaftTransport for QuicRaft {
    async fn call(
        &self,
        target: &NodeInfo,
        kind: RpcKind,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        if let Ok(addr) = target.addr.parse() {
            self.transport.add_member(&target.name, addr);
        }
        let link = self
            .transport
            .link(&target.name)
            .await
            .map_err(|e| e.to_string())?;
        let env = Envelope::new(
            &self.me,
            Dest::Node(target.name.clone()),
            0,
            Body::Control {
                kind: to_wire(kind),
                payload,
            },
        );
        let frame = link
            .request(env, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        match frame.to_owned_envelope().map(|e| e.body) {
            Ok(Body::ControlReply(bytes)) => Ok(bytes),
            Ok(Body::Error { code, message }) => Err(format!("{code:?}: {message}")),
            _ => Err("unexpected reply".into()),
        }
    }
}

fn to_wire(k: RpcKind) -> ControlKind {
    match k {
        RpcKind::Append => ControlKind::RaftAppend,
        RpcKind::Vote => ControlKind::RaftVote,
        RpcKind::Snapshot => ControlKind::RaftSnapshot,
        RpcKind::Propose => ControlKind::Propose,
        RpcKind::Join => ControlKind::Join,
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    name: String,
    router: Router,
    control: ControlPlane,
    leases: Arc<Leases>,
    supervisor: ActorRef<SupervisorMsg>,
    supervisor_done: tokio::task::JoinHandle<()>,
    escalations: mpsc::Receiver<String>,
    stopping: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Starts a node from validated config and joins the cluster. `socket` overrides the UDP
    /// socket (fault injection).
    pub async fn start(cfg: &NodeConfig, socket: Option<Socket>) -> Result<Node, NodeError> {
        Self::start_reporting(cfg, socket, crate::forming::phase_channel()).await
    }

    /// [`Node::start`], publishing its start-up phase on `phase` (for `/readyz` and systemd).
    pub async fn start_reporting(
        cfg: &NodeConfig,
        socket: Option<Socket>,
        phase: crate::forming::PhaseTx,
    ) -> Result<Node, NodeError> {
        let Local {
            name,
            store,
            policy,
            transport,
            addr,
        } = Local::open(cfg, socket)?;

        // Voters' addresses come from the seeds (their certificates say who they are).
        // Until the router exists, a stand-in answers `cluster status` with whom we wait for.
        transport.start(Arc::new(crate::forming::FormingStatus::new(
            &name,
            &cfg.cluster.voters,
            &phase,
        )));
        let voters = discover_voters(cfg, &transport, &name, &addr, &phase).await;
        phase.send_replace(crate::forming::Phase::Joining);
        // Only a complete voter set may form a new cluster; a partial view joins instead.
        let all_voters_known = voters.len() == cfg.cluster.voters.len();
        let control_cfg =
            ControlConfig::new(&name, &addr, cfg.node.data_dir.join("control"), voters);
        let net = Arc::new(QuicRaft {
            transport: transport.clone(),
            me: name.clone(),
            timeout: Duration::from_secs(3),
        });

        let audit = AuditLog::open(&cfg.node.data_dir, &name).await?;
        // The router exists before the control plane talks, so no early request finds no handler.
        let control = ControlPlane::start(control_cfg, net).await?;
        // Revocations this node already knows (its persisted map) hold before it talks.
        policy.set_revoked(control.map().borrow().revoked.keys().cloned().collect());
        let leases = Leases::new(&name, LeaseConfig::from(&cfg.lease));
        let router = Router::new(
            RouterConfig::from(cfg),
            transport.clone(),
            control.map(),
            audit.clone(),
            leases.holder.clone(),
        );
        let meter = LoadMeter::new();
        let cluster_load = ClusterLoad::new();
        let job_limits = JobLimits::from_config(cfg);
        let spill_dir = cfg.node.data_dir.join("partitions");
        let spill =
            crate::spill::SpillDir::open(&spill_dir).map_err(|source| NodeError::DataDir {
                path: spill_dir.display().to_string(),
                source,
            })?;
        let exec = Arc::new(
            JobExecutor::new(
                router.clone(),
                store.clone(),
                cfg.workers.threads,
                DEFAULT_CACHE_BYTES,
                meter.clone(),
            )
            .with_limits(job_limits)
            .with_spill(spill),
        );
        let import_urls = Arc::new(cfg.jobs.import_urls.clone());
        let admin = Arc::new(
            JobAdmin::new(control.clone(), store.clone())
                .with_limits(job_limits)
                .with_import_urls(import_urls.clone()),
        );
        router.set_services(Arc::new(Services {
            me: name.clone(),
            control: control.clone(),
            leases: leases.clone(),
            transport: router.transport().clone(),
            admin,
            exec: exec.clone(),
            load: cluster_load.clone(),
            audit,
        }));
        let coordinators = CoordinatorCtx {
            me: name.clone(),
            router: router.clone(),
            control: control.clone(),
            store: store.clone(),
            exec,
        };
        let imports = crate::imports::ImportCtx {
            router: router.clone(),
            control: control.clone(),
            store: store.clone(),
            allowed: import_urls,
        };
        transport.start(Arc::new(router.clone()));
        if cfg.is_voter() && all_voters_known {
            control.bootstrap().await?;
        }

        let (failed_tx, failed_rx) = mpsc::unbounded_channel();
        let (esc_tx, escalations) = mpsc::channel(1);
        let (supervisor, supervisor_done) =
            spawn_supervisor(cfg, &name, meter.clone(), failed_tx, esc_tx).await?;

        let tasks = spawn_loops(
            cfg,
            Loops {
                name: name.clone(),
                control: control.clone(),
                transport: transport.clone(),
                leases: leases.clone(),
                router: router.clone(),
                supervisor: supervisor.clone(),
                store,
                meter,
                cluster_load,
                policy,
                coordinators,
                imports,
                failed_rx,
            },
        );
        join(
            &control,
            &name,
            &addr,
            cfg.is_voter(),
            Duration::from_secs(60),
        )
        .await?;
        info!(node = %name, %addr, voter = cfg.is_voter(), "node started and joined");
        phase.send_replace(crate::forming::Phase::Running);
        Ok(Node {
            name,
            router,
            control,
            leases,
            supervisor,
            supervisor_done,
            escalations,
            stopping: Arc::new(AtomicBool::new(false)),
            tasks,
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn control(&self) -> &ControlPlane {
        &self.control
    }

    pub fn supervisor(&self) -> &ActorRef<SupervisorMsg> {
        &self.supervisor
    }

    /// A cheap handle for health endpoints.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            name: self.name.clone(),
            control: self.control.clone(),
            leases: self.leases.clone(),
            stopping: self.stopping.clone(),
        }
    }

    pub fn ready(&self) -> bool {
        self.readiness().is_ready()
    }

    /// Resolves when the supervisor gives up (restart budget spent), with its reason.
    pub async fn escalated(&mut self) -> Option<String> {
        self.escalations.recv().await
    }

    /// Drain, then stop: mark this node draining, wait (up to `grace`) until it owns no shard,
    /// mark it down (left), stop the actors and close every connection cleanly.
    pub async fn shutdown(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        self.stopping.store(true, Ordering::SeqCst);
        let drained =
            tokio::time::timeout_at(deadline, drain_self(&self.control, &self.name)).await;
        match drained {
            Ok(Ok(())) => info!(node = %self.name, "drained: no shards left here"),
            Ok(Err(e)) => warn!(node = %self.name, error = %e, "drain failed; stopping anyway"),
            Err(_) => warn!(node = %self.name, "drain did not finish within the grace period"),
        }
        // Stop renewing before leaving, so the leader does not take the last renewals for a
        // wish to rejoin.
        for t in &self.tasks {
            t.abort();
        }
        self.router.begin_shutdown();
        let left = Command::SetMemberState {
            name: self.name.clone().into(),
            state: MemberState::Down,
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), self.control.propose(left)).await;
        if tokio::time::timeout_at(
            deadline,
            self.supervisor.stop_and_wait(Some("shutdown".into()), None),
        )
        .await
        .is_err()
        {
            self.supervisor.kill();
        }
        let _ = tokio::time::timeout_at(deadline, self.supervisor_done).await;
        self.control.shutdown().await;
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(200));
        self.router.transport().shutdown(left).await;
        self.router.flush_ownership();
        info!(node = %self.name, "node stopped");
    }
}

/// Readiness for `/readyz`: joined (member up), lease valid, and not stopping.
#[derive(Debug, Clone)]
pub struct Readiness {
    name: String,
    control: ControlPlane,
    leases: Arc<Leases>,
    stopping: Arc<AtomicBool>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.check().is_ok()
    }

    /// Ready, or why not (the `/readyz` body).
    pub fn check(&self) -> Result<(), NotReady> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(NotReady::Stopping);
        }
        let state = self
            .control
            .map()
            .borrow()
            .members
            .get(&self.name)
            .map(|m| m.state);
        match state {
            Some(MemberState::Up) if self.leases.valid() => Ok(()),
            Some(MemberState::Up) => Err(NotReady::NoLease),
            Some(s) => Err(NotReady::State(s)),
            None => Err(NotReady::NotMember),
        }
    }

    /// Marks the node as stopping (readiness 503) before the drain starts.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// The address peers should dial: the configured listen address, with the bound port if 0.
/// What a node opens on its own machine before it talks to anyone: its certificate (checked
/// against its name), data dir, data keys, storage, and its bound endpoint.
struct Local {
    name: String,
    store: Store,
    policy: Arc<ClusterPolicy>,
    transport: Transport,
    /// The address other nodes dial.
    addr: String,
}

impl Local {
    fn open(cfg: &NodeConfig, socket: Option<Socket>) -> Result<Local, NodeError> {
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
        // Before binding anything: without its data keys a node can neither write nor read.
        let keys = KeyRing::load(&cfg.data_key_file())?;
        let store = Store::open(&cfg.storage.url, Arc::new(keys))?;
        let policy = Arc::new(ClusterPolicy::default());
        let transport = Transport::bind(
            &name,
            socket.unwrap_or(Socket::Bind(cfg.node.listen)),
            &tls,
            policy.clone(),
            TransportConfig::from(&cfg.transport),
        )?;
        let addr = cfg.node.advertise.map_or_else(
            || advertised(cfg.node.listen, &transport),
            |a| a.to_string(),
        );
        Ok(Local {
            name,
            store,
            policy,
            transport,
            addr,
        })
    }
}

/// The handles the node's background loops run on.
struct Loops {
    name: String,
    control: ControlPlane,
    transport: Transport,
    leases: Arc<Leases>,
    router: Router,
    supervisor: ActorRef<SupervisorMsg>,
    store: Store,
    meter: Arc<LoadMeter>,
    cluster_load: Arc<ClusterLoad>,
    policy: Arc<ClusterPolicy>,
    coordinators: CoordinatorCtx,
    imports: crate::imports::ImportCtx,
    failed_rx: mpsc::UnboundedReceiver<u32>,
}

/// Spawns the node's background loops: lease renewal, autoscaling, load sampling, the leader's
/// step, the ownership driver, job coordination and the member watch.
fn spawn_loops(cfg: &NodeConfig, l: Loops) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(leader::renew_loop(
            l.name.clone(),
            l.control.clone(),
            l.transport.clone(),
            l.leases.clone(),
            l.meter.clone(),
            l.cluster_load.clone(),
        )),
        tokio::spawn(leader::autoscale_loop(
            l.name.clone(),
            l.control.clone(),
            l.cluster_load,
            cfg.autoscale.policy(),
            Duration::from_millis(cfg.autoscale.sample_ms),
        )),
        tokio::spawn(load::sample_loop(
            l.meter,
            l.router.clone(),
            l.transport.clone(),
        )),
        tokio::spawn(leader::leader_loop(
            cfg.cluster.shards,
            l.control.clone(),
            l.leases.clone(),
            RebalanceConfig::from(&cfg.cluster),
        )),
        tokio::spawn(driver::run(
            DriverConfig {
                me: l.name,
                shards: cfg.cluster.shards,
                log_queue: cfg.shard.max_inflight,
            },
            l.control.clone(),
            l.router,
            l.supervisor,
            l.store,
            l.leases,
            l.failed_rx,
        )),
        tokio::spawn(crate::imports::manage(l.imports)),
        tokio::spawn(job_admin::manage(l.coordinators)),
        tokio::spawn(watch_members(l.control, l.transport, l.policy)),
    ]
}

fn advertised(listen: SocketAddr, transport: &Transport) -> String {
    match transport.local_addr() {
        Ok(a) if listen.port() == 0 => SocketAddr::new(listen.ip(), a.port()).to_string(),
        _ => listen.to_string(),
    }
}

/// Longest pause between two rounds of seed dialling or join requests, before jitter.
const PEER_RETRY_MAX: Duration = Duration::from_millis(500);

/// Pauses between rounds of seed dialling and join requests while the other nodes start or a
/// leader is elected: exponential from 50 ms, capped at [`PEER_RETRY_MAX`], each with up to as
/// much again of random jitter (voters started together do not dial in lockstep). Unlimited in
/// count: the callers' own deadlines (wall-clock, unchanged) end the waiting.
fn peer_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(PEER_RETRY_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Dials every seed once (briefly retrying) and returns the voters whose addresses were found,
/// this node included if it is one.
async fn discover_voters(
    cfg: &NodeConfig,
    transport: &Transport,
    me: &str,
    addr: &str,
    phase: &crate::forming::PhaseTx,
) -> Vec<NodeInfo> {
    let mut found = std::collections::BTreeMap::new();
    if cfg.is_voter() {
        found.insert(me.to_string(), addr.to_string());
    }
    // A voter of a cluster that has never formed (no Raft state on disk) waits for the other
    // voters as long as it takes: they may be started by hand minutes apart, or pulled slowly
    // by Kubernetes. A voter with state (a restart) and a non-voter look for a few seconds.
    let pristine = cfg.is_voter() && !cfg.node.data_dir.join("control").join("raft.redb").exists();
    let deadline = (!pristine)
        .then(|| Instant::now() + Duration::from_secs(if cfg.is_voter() { 10 } else { 3 }));
    let mut told = Instant::now();
    let mut backoff = peer_backoff();
    // Seeds may be names (`node-2.example:7400`, a Kubernetes headless service): resolved on
    // every round, so a peer whose DNS record appears while we wait is still found.
    loop {
        let mut seeds: Vec<SocketAddr> = Vec::new();
        for seed in &cfg.cluster.seeds {
            match tokio::net::lookup_host(seed.as_str()).await {
                // Every address: a headless service name resolves to all its pods.
                Ok(addrs) => seeds.extend(addrs.filter(|a| *a != cfg.node.listen)),
                Err(e) => debug!(%seed, error = %e, "cannot resolve seed yet"),
            }
        }
        for seed in &seeds {
            if found.values().any(|a| a == &seed.to_string()) {
                continue;
            }
            if let Ok(link) = transport.dial_any(*seed).await {
                found.insert(link.peer().name.clone(), seed.to_string());
            }
        }
        let missing: Vec<String> = cfg
            .cluster
            .voters
            .iter()
            .filter(|v| !found.contains_key(*v))
            .cloned()
            .collect();
        phase.send_if_modified(|p| {
            let now = crate::forming::Phase::Forming {
                waiting_for: missing.clone(),
                found: found.clone(),
            };
            let changed = *p != now;
            *p = now;
            changed
        });
        let all_voters = missing.is_empty();
        if all_voters || deadline.is_some_and(|d| Instant::now() > d) {
            break;
        }
        if told.elapsed() >= Duration::from_secs(5) {
            told = Instant::now();
            info!(
                waiting_for = %missing.join(", "),
                seeds = %cfg.cluster.seeds.join(", "),
                "forming the cluster: waiting until every configured voter answers at a seed address"
            );
        }
        tokio::time::sleep(backoff.next().unwrap_or(PEER_RETRY_MAX)).await; // retry while peers start
    }
    cfg.cluster
        .voters
        .iter()
        .filter_map(|v| found.get(v).map(|a| NodeInfo::new(v.clone(), a.clone())))
        .collect()
}

/// Asks the cluster to add this node until the map lists it.
async fn join(
    control: &ControlPlane,
    me: &str,
    addr: &str,
    voter: bool,
    timeout: Duration,
) -> Result<(), NodeError> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    let mut backoff = peer_backoff();
    loop {
        let listed = control
            .map()
            .borrow()
            .members
            .get(me)
            .is_some_and(|m| m.addr == addr && m.state != MemberState::Down);
        if listed {
            return Ok(());
        }
        match control.join(NodeInfo::new(me, addr), voter).await {
            Ok(()) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(NodeError::Join(last));
        }
        tokio::time::sleep(backoff.next().unwrap_or(PEER_RETRY_MAX)).await; // retry until a leader exists
    }
}

/// Why a node is not ready (the `/readyz` body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("stopping")]
    Stopping,
    #[error("no valid lease from the leader")]
    NoLease,
    #[error("member state {}", .0.as_str())]
    State(MemberState),
    #[error("not a member yet")]
    NotMember,
}

/// Why a drain before stopping did not finish (the node stops anyway; the shards' state is
/// durable).
#[derive(Debug, thiserror::Error)]
enum DrainError {
    #[error("proposing the drain: {0}")]
    Propose(#[from] tidepool_runtime::control::ControlError),
    #[error("no other member to take the shards; stopping with them in storage")]
    NowhereToGo,
    #[error("control plane stopped")]
    ControlStopped,
}

/// The router's settings from the node's configuration.
impl From<&NodeConfig> for RouterConfig {
    fn from(cfg: &NodeConfig) -> Self {
        RouterConfig {
            name: cfg.node.name.clone(),
            shards: cfg.cluster.shards,
            max_inflight: cfg.shard.max_inflight,
            handoff_buffer: cfg.shard.handoff_buffer,
            request_timeout: Duration::from_millis(cfg.transport.request_timeout_ms),
            ownership_log: Some(cfg.node.data_dir.join("ownership.log")),
        }
    }
}

/// Starts the node's supervisor, with its worker pool and restart budget: failed shard actors
/// are reported on `failed`, a budget overrun on `escalate`.
async fn spawn_supervisor(
    cfg: &NodeConfig,
    name: &str,
    meter: Arc<LoadMeter>,
    failed: mpsc::UnboundedSender<u32>,
    escalate: mpsc::Sender<String>,
) -> Result<(ActorRef<SupervisorMsg>, tokio::task::JoinHandle<()>), NodeError> {
    let args = SupervisorArgs {
        pool: WorkerPool::with_meter(cfg.workers.threads, cfg.workers.queue_depth, meter),
        budget: RestartBudget::default(),
        failed,
        escalate,
    };
    Actor::spawn(Some(format!("supervisor-{name}")), NodeSupervisor, args)
        .await
        .map_err(|e| NodeError::Spawn(e.to_string()))
}

/// Proposes this node draining and waits until it owns no shard.
async fn drain_self(control: &ControlPlane, me: &str) -> Result<(), DrainError> {
    control
        .propose(Command::SetMemberState {
            name: me.into(),
            state: MemberState::Draining,
        })
        .await?;
    let mut rx = control.map();
    loop {
        let (owns, elsewhere) = {
            let map = rx.borrow();
            let owns = map
                .shards
                .iter()
                .any(|a| a.owner.as_deref() == Some(me) || a.handoff_to.as_deref() == Some(me));
            let elsewhere = map
                .members
                .values()
                .any(|m| m.name != me && matches!(m.state, MemberState::Up | MemberState::Joining));
            (owns, elsewhere)
        };
        if !owns {
            return Ok(());
        }
        if !elsewhere {
            // Every other member is leaving too (a whole-cluster stop): there is nowhere to move
            // the shards; their state is durable in the op log and checkpoints already.
            return Err(DrainError::NowhereToGo);
        }
        if rx.changed().await.is_err() {
            return Err(DrainError::ControlStopped);
        }
    }
}

/// Keeps the transport's address book and the member metrics in step with the map.
async fn watch_members(control: ControlPlane, transport: Transport, policy: Arc<ClusterPolicy>) {
    let mut rx = control.map();
    loop {
        {
            let map = rx.borrow().clone();
            if policy.set_revoked(map.revoked.keys().cloned().collect()) {
                let closed = transport.enforce_policy();
                info!(
                    revoked = map.revoked.len(),
                    closed, "revocation list changed; closed the connections it refuses"
                );
            }
            let mut counts = std::collections::BTreeMap::from([
                ("joining", 0),
                ("up", 0),
                ("draining", 0),
                ("down", 0),
            ]);
            for mb in map.members.values() {
                if let Ok(a) = mb.addr.parse() {
                    transport.add_member(&mb.name, a);
                }
                *counts.entry(mb.state.as_str()).or_insert(0) += 1;
            }
            for (state, n) in counts {
                metrics::gauge!(m::CLUSTER_MEMBERS, "state" => state).set(n as f64);
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod backoff_tests {
    use std::time::Duration;

    /// Seed dialling and join requests start fast, back off to the cap, and carry jitter; the
    /// callers' wall-clock deadlines are what ends them.
    #[test]
    fn peer_retries_grow_with_jitter_up_to_a_cap() {
        let delays: Vec<Duration> = super::peer_backoff().take(20).collect();
        assert_eq!(delays.len(), 20, "no limit on the count");
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] < Duration::from_millis(100));
        for d in &delays {
            assert!(*d < super::PEER_RETRY_MAX * 2, "{d:?}");
        }
        assert!(delays[10..].iter().all(|d| *d >= super::PEER_RETRY_MAX));
        let other: Vec<Duration> = super::peer_backoff().take(20).collect();
        assert_ne!(delays, other, "jittered");
    }
}

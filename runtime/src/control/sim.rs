//! An in-process cluster for tests, in the style of raft-rs's `harness/src/network.rs`: every
//! node's [`RaftTransport`] is a handle on one simulated network that delivers calls by calling
//! the target's [`ControlPlane::handle_rpc`], and drops them on blocked links (partitions) or
//! when the target is down.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tempfile::TempDir;
use tokio::time::Instant;

use super::{
    ClusterMap, ControlConfig, ControlError, ControlPlane, NodeInfo, RaftTransport, RpcKind,
};

/// Shared state of the simulated network.
#[derive(Default)]
struct NetState {
    nodes: BTreeMap<String, ControlPlane>,
    /// Directed links that drop every message: (from, to).
    blocked: BTreeSet<(String, String)>,
}

/// The simulated network.
#[derive(Clone, Default)]
pub(crate) struct SimNet {
    state: Arc<Mutex<NetState>>,
}

/// One node's view of the simulated network.
struct SimTransport {
    me: String,
    net: SimNet,
}

#[async_trait::async_trait]
impl RaftTransport for SimTransport {
    async fn call(
        &self,
        target: &NodeInfo,
        kind: RpcKind,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let node = {
            let st = self.net.state.lock();
            if st.blocked.contains(&(self.me.clone(), target.name.clone())) {
                return Err(format!("{} -> {}: link blocked", self.me, target.name));
            }
            st.nodes.get(&target.name).cloned()
        };
        let Some(node) = node else {
            return Err(format!("{} is down", target.name));
        };
        // Like the node: a refused forwarded request is answered with the refusal.
        let reply = match node.handle_rpc(&self.me, kind, &payload).await {
            Ok(r) => r,
            Err(ControlError::Refused(r)) => {
                ControlPlane::refusal_reply(kind, &r).ok_or_else(|| r.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        // The reply travels back over the same link: a partition that starts mid-call drops it.
        if self
            .net
            .state
            .lock()
            .blocked
            .contains(&(target.name.clone(), self.me.clone()))
        {
            return Err(format!("{} -> {}: link blocked", target.name, self.me));
        }
        Ok(reply)
    }
}

impl SimNet {
    fn transport(&self, me: &str) -> Arc<dyn RaftTransport> {
        Arc::new(SimTransport {
            me: me.to_string(),
            net: self.clone(),
        })
    }

    /// Blocks every link between `a` and `b`, both directions.
    pub(crate) fn partition(&self, a: &[&str], b: &[&str]) {
        let mut st = self.state.lock();
        for x in a {
            for y in b {
                st.blocked.insert((x.to_string(), y.to_string()));
                st.blocked.insert((y.to_string(), x.to_string()));
            }
        }
    }

    /// Unblocks every link.
    pub(crate) fn heal(&self) {
        self.state.lock().blocked.clear();
    }
}

/// A test cluster: voters `v1..=v{n}` and learners, each with its own data dir.
pub(crate) struct Cluster {
    pub(crate) net: SimNet,
    voters: Vec<NodeInfo>,
    dirs: BTreeMap<String, PathBuf>,
    _tmp: TempDir,
    pub(crate) snapshot_every: u64,
}

pub(crate) fn addr_of(name: &str) -> String {
    format!("sim://{name}")
}

impl Cluster {
    pub(crate) fn new(voters: usize) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let voters = (1..=voters)
            .map(|i| NodeInfo::new(format!("v{i}"), addr_of(&format!("v{i}"))))
            .collect();
        Self {
            net: SimNet::default(),
            voters,
            dirs: BTreeMap::new(),
            _tmp: tmp,
            snapshot_every: 500,
        }
    }

    fn dir(&mut self, name: &str) -> PathBuf {
        let base: &Path = self._tmp.path();
        self.dirs
            .entry(name.to_string())
            .or_insert_with(|| base.join(name))
            .clone()
    }

    pub(crate) fn config(&mut self, name: &str, addr: &str) -> ControlConfig {
        let mut cfg = ControlConfig::new(name, addr, self.dir(name), self.voters.clone());
        // Timings with headroom for 2 busy cores running several clusters at once.
        cfg.heartbeat = Duration::from_millis(100);
        cfg.election_timeout = (Duration::from_millis(500), Duration::from_millis(1000));
        cfg.propose_timeout = Duration::from_secs(3);
        cfg.snapshot_every = self.snapshot_every;
        cfg
    }

    /// Starts (or restarts, from its data dir) node `name` and connects it to the network.
    pub(crate) async fn start(&mut self, name: &str) -> ControlPlane {
        let cfg = self.config(name, &addr_of(name));
        self.start_with(cfg).await
    }

    pub(crate) async fn start_with(&mut self, cfg: ControlConfig) -> ControlPlane {
        let name = cfg.name.clone();
        let cp = ControlPlane::start(cfg, self.net.transport(&name))
            .await
            .expect("start");
        self.net.state.lock().nodes.insert(name, cp.clone());
        cp
    }

    /// Starts every voter, bootstraps, and joins each voter.
    pub(crate) async fn start_voters(&mut self) -> Vec<ControlPlane> {
        let mut out = Vec::new();
        for v in self.voters.clone() {
            out.push(self.start(&v.name).await);
        }
        for cp in &out {
            cp.bootstrap().await.expect("bootstrap");
        }
        for cp in &out {
            cp.join(cp.me().clone(), true).await.expect("voter join");
        }
        out
    }

    /// Stops node `name` (as a crash would, minus the torn writes) and disconnects it.
    pub(crate) async fn kill(&mut self, name: &str) {
        let cp = self.net.state.lock().nodes.remove(name);
        if let Some(cp) = cp {
            cp.shutdown().await;
        }
    }

    pub(crate) fn node(&self, name: &str) -> ControlPlane {
        self.net
            .state
            .lock()
            .nodes
            .get(name)
            .cloned()
            .expect("node is up")
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.net.state.lock().nodes.keys().cloned().collect()
    }

    /// Shuts every node down (tests end with this so background tasks stop before the next test).
    pub(crate) async fn stop_all(&mut self) {
        for n in self.names() {
            self.kill(&n).await;
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub(crate) async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until exactly one of `nodes` is leader and all of them agree on it; returns it.
pub(crate) async fn stable_leader(nodes: &[ControlPlane]) -> ControlPlane {
    eventually(
        "a leader all nodes agree on",
        Duration::from_secs(15),
        || {
            let leaders: Vec<_> = nodes.iter().filter(|n| n.is_leader()).collect();
            let [leader] = leaders.as_slice() else {
                return None;
            };
            let name = &leader.me().name;
            nodes
                .iter()
                .all(|n| n.leader().is_some_and(|l| &l.name == name))
                .then(|| (*leader).clone())
        },
    )
    .await
}

/// Waits until `pred` holds for the applied map of every node in `nodes`.
pub(crate) async fn maps_satisfy(
    nodes: &[ControlPlane],
    what: &str,
    pred: impl Fn(&ClusterMap) -> bool,
) {
    eventually(what, Duration::from_secs(15), || {
        nodes.iter().all(|n| pred(&n.map().borrow())).then_some(())
    })
    .await
}

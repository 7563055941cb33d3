//! `NodeSupervisor`: the root actor of a node. It runs one `ShardActor` per shard this node
//! serves, linked to itself. When one fails, its in-memory state is suspect (it may hold applied
//! but not yet durable ops), so the supervisor does not just respawn it: within its
//! [`RestartBudget`] it reports the shard to the ownership driver, which restores the shard from
//! storage and starts a fresh actor. Past the budget it escalates: the node leaves the cluster
//! cleanly instead of running half-broken.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tidepool_runtime::metrics as m;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::restart::RestartBudget;
use crate::shard::{ShardActor, ShardArgs, ShardMsg, ShardState};
use crate::shard_log::ShardLog;
use crate::worker::WorkerPool;

/// Messages of [`NodeSupervisor`].
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start the actor of `shard` at `epoch` with restored state and its durable log.
    Start {
        shard: u32,
        epoch: u64,
        state: ShardState,
        log: Option<ShardLog>,
        reply: oneshot::Sender<Result<ActorRef<ShardMsg>, String>>,
    },
    /// Stop the actor of `shard` (it no longer serves it); replies when it has stopped.
    Stop {
        shard: u32,
        done: oneshot::Sender<()>,
    },
    /// Make a shard's actor fail (tests and chaos).
    CrashShard(u32),
    /// Log how many shards this node serves, if that changed since the last such line.
    Summary,
}

/// How long the shard count must have had a chance to settle before the summary line: an
/// initial placement starts dozens of shards within a second, and is one INFO line.
const SUMMARY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
pub struct NodeSupervisor;

/// Start arguments: what to run and where to report.
#[derive(Debug)]
pub struct SupervisorArgs {
    pub pool: WorkerPool,
    pub budget: RestartBudget,
    /// Receives a shard id when its actor failed and should be restored and restarted.
    pub failed: mpsc::UnboundedSender<u32>,
    /// Receives the reason when the supervisor gives up.
    pub escalate: mpsc::Sender<String>,
}

#[derive(Debug)]
pub struct SupervisorState {
    args: SupervisorArgs,
    by_actor: HashMap<ActorId, u32>,
    by_shard: HashMap<u32, ActorRef<ShardMsg>>,
    stopping: HashMap<ActorId, oneshot::Sender<()>>,
    escalated: bool,
    /// The shard count of the last summary line, and whether one is scheduled.
    summarized: usize,
    summary_pending: bool,
}

impl SupervisorState {
    /// Exports the shard count and schedules a summary line (per-shard lines are at DEBUG).
    fn shards_changed(&mut self, me: &ActorRef<SupervisorMsg>) {
        metrics::gauge!(m::SHARDS_OWNED).set(self.by_shard.len() as f64);
        if !self.summary_pending {
            self.summary_pending = true;
            me.send_after(SUMMARY_DELAY, || SupervisorMsg::Summary);
        }
    }
}

fn event(name: &'static str) {
    metrics::counter!(m::SUPERVISOR_EVENTS, "event" => name).increment(1);
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            args,
            by_actor: HashMap::new(),
            by_shard: HashMap::new(),
            stopping: HashMap::new(),
            escalated: false,
            summarized: 0,
            summary_pending: false,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start {
                shard,
                epoch,
                state,
                log,
                reply,
            } => {
                if let Some(old) = st.by_shard.remove(&shard) {
                    // A newer epoch replaces an older incarnation.
                    st.by_actor.remove(&old.get_id());
                    old.stop(Some("replaced".into()));
                }
                let args = ShardArgs {
                    shard,
                    epoch,
                    state: Arc::new(Mutex::new(state)),
                    pool: st.args.pool.clone(),
                    log,
                    since_checkpoint: 0,
                };
                let out = match Actor::spawn_linked(None, ShardActor, args, me.get_cell()).await {
                    Ok((actor, _)) => {
                        st.by_actor.insert(actor.get_id(), shard);
                        st.by_shard.insert(shard, actor.clone());
                        event("started");
                        Ok(actor)
                    }
                    Err(e) => Err(e.to_string()),
                };
                st.shards_changed(&me);
                let _ = reply.send(out);
            }
            SupervisorMsg::Stop { shard, done } => match st.by_shard.remove(&shard) {
                Some(actor) => {
                    st.stopping.insert(actor.get_id(), done);
                    actor.stop(Some("not owner".into()));
                    st.shards_changed(&me);
                }
                None => {
                    let _ = done.send(());
                }
            },
            SupervisorMsg::Summary => {
                st.summary_pending = false;
                let shards = st.by_shard.len();
                if shards != st.summarized {
                    st.summarized = shards;
                    info!(shards, "serving {shards} shards");
                }
            }
            SupervisorMsg::CrashShard(shard) => {
                if let Some(a) = st.by_shard.get(&shard) {
                    let _ = a.cast(ShardMsg::Crash);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (who, failure) = match evt {
            SupervisionEvent::ActorFailed(who, err) => (who, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                (who, reason.filter(|r| r != "not owner" && r != "replaced"))
            }
            _ => return Ok(()),
        };
        let id = who.get_id();
        if let Some(done) = st.stopping.remove(&id) {
            let _ = done.send(());
            event("terminated");
            return Ok(());
        }
        let Some(shard) = st.by_actor.remove(&id) else {
            return Ok(());
        };
        if st.by_shard.get(&shard).is_some_and(|a| a.get_id() == id) {
            st.by_shard.remove(&shard);
        }
        st.shards_changed(&me);
        let Some(reason) = failure else {
            event("terminated");
            return Ok(());
        };
        event("failed");
        if st.escalated {
            return Ok(());
        }
        if st.args.budget.allow(std::time::Instant::now()) {
            warn!(shard, %reason, "shard actor failed; restoring from storage and restarting");
            event("restarted");
            let _ = st.args.failed.send(shard);
        } else {
            st.escalated = true;
            event("escalated");
            error!(shard, %reason, "shard actors keep failing; restart budget spent, escalating");
            let _ = st.args.escalate.try_send(format!(
                "shard {shard} failed past the restart budget: {reason}"
            ));
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<Self::Msg>,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        info!(shards = st.by_shard.len(), "supervisor stopped");
        Ok(())
    }
}

//! `NodeSupervisor`: the root actor of a node. It spawns one `ShardActor` per owned shard,
//! linked to itself, and restarts a failed shard actor within a [`RestartBudget`]. Past the
//! budget it escalates: it reports to the node, which leaves the cluster cleanly instead of
//! running half-broken. Shard state survives restarts (it is held here, not in the actor).

use std::collections::HashMap;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tidepool_runtime::metrics as m;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::restart::RestartBudget;
use crate::router::Router;
use crate::shard::{ShardActor, ShardArgs, ShardMsg, SharedState};
use crate::worker::WorkerPool;

/// Messages of [`NodeSupervisor`].
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Make a shard's actor fail (tests and chaos).
    CrashShard(u32),
}

#[derive(Debug)]
pub struct NodeSupervisor;

/// Start arguments: what to run and where to report escalation.
#[derive(Debug)]
pub struct SupervisorArgs {
    pub router: Router,
    pub pool: WorkerPool,
    pub states: HashMap<u32, SharedState>,
    pub budget: RestartBudget,
    /// Receives the reason when the supervisor gives up.
    pub escalate: mpsc::Sender<String>,
}

#[derive(Debug)]
pub struct SupervisorState {
    args: SupervisorArgs,
    by_actor: HashMap<ActorId, u32>,
    by_shard: HashMap<u32, ActorRef<ShardMsg>>,
    escalated: bool,
}

fn event(name: &'static str) {
    metrics::counter!(m::SUPERVISOR_EVENTS, "event" => name).increment(1);
}

impl NodeSupervisor {
    async fn spawn_shard(
        me: &ActorRef<SupervisorMsg>,
        st: &mut SupervisorState,
        shard: u32,
    ) -> Result<(), ActorProcessingErr> {
        let Some(state) = st.args.states.get(&shard).cloned() else {
            return Ok(());
        };
        let args = ShardArgs {
            shard,
            state,
            pool: st.args.pool.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, ShardActor, args, me.get_cell()).await?;
        st.by_actor.insert(actor.get_id(), shard);
        st.by_shard.insert(shard, actor.clone());
        st.args.router.set_actor(shard, Some(actor));
        event("started");
        Ok(())
    }
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut st = SupervisorState {
            args,
            by_actor: HashMap::new(),
            by_shard: HashMap::new(),
            escalated: false,
        };
        let mut shards: Vec<u32> = st.args.states.keys().copied().collect();
        shards.sort_unstable();
        for shard in &shards {
            Self::spawn_shard(&me, &mut st, *shard).await?;
        }
        metrics::gauge!(m::SHARDS_OWNED).set(shards.len() as f64);
        info!(shards = shards.len(), "shard actors started");
        Ok(st)
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
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
                (who, reason.map(|r| format!("stopped: {r}")))
            }
            _ => return Ok(()),
        };
        let Some(shard) = st.by_actor.remove(&who.get_id()) else {
            return Ok(());
        };
        st.by_shard.remove(&shard);
        st.args.router.set_actor(shard, None);
        let reason = failure.unwrap_or_else(|| "stopped".into());
        event("failed");
        if st.escalated {
            return Ok(());
        }
        if st.args.budget.allow(std::time::Instant::now()) {
            warn!(shard, %reason, "shard actor failed; restarting");
            Self::spawn_shard(&me, st, shard).await?;
            event("restarted");
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
}

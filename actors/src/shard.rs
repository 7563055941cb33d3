//! `ShardActor`: owns one shard's state and applies operations to it, one at a time.
//!
//! The state ([`ShardState`], pure, in `tidepool_runtime::shard_state`) is a small key-value map
//! whose writes carry idempotency keys. It lives in a [`SharedState`] held by the supervisor, so
//! a restarted actor picks up where the failed one left off; writes reach the shard's durable
//! op log before they are acknowledged.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tidepool_runtime::codec::{
    ArchivedBody, ArchivedOp, ErrorCode, Frame, IdemKey, Op, OpRef, OpResult, ShardRequest,
    ShardRequestRef,
};
use tidepool_runtime::metrics as m;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::shard_log::{LogItem, ShardLog};
use crate::worker::WorkerPool;

pub use tidepool_runtime::shard_state::{ShardError, ShardState, MAX_KEYS, MAX_KEY_BYTES};
/// Writes between automatic checkpoints: bounds how much log a new owner replays.
pub const CHECKPOINT_EVERY: u64 = 5_000;

/// Tensor ops at least this long run on the worker pool, not on the actor's task.
pub const POOL_TENSOR_LEN: usize = 16 * 1024;

/// Shard state shared between the supervisor and the shard's current actor incarnation.
pub type SharedState = Arc<Mutex<ShardState>>;

/// Where a request's bytes live.
#[derive(Debug)]
pub enum ShardInput {
    /// A request made on this node: no serialization at all.
    Local(ShardRequest),
    /// A request received over QUIC: read in place from the validated frame.
    Wire(Frame),
}

/// The reply to one op.
pub type OpReply = Result<OpResult, ErrorCode>;

/// Messages of [`ShardActor`].
#[derive(Debug)]
pub enum ShardMsg {
    /// Apply a request. The permit is the op's slot in the shard's bounded queue; it is released
    /// when the reply is sent (after the op is durable).
    Apply {
        input: ShardInput,
        reply: oneshot::Sender<OpReply>,
        permit: OwnedSemaphorePermit,
        arrived: Instant,
    },
    /// Checkpoint the state (after everything applied so far is durable); replies with the seq.
    Checkpoint {
        done: oneshot::Sender<Result<u64, ErrorCode>>,
    },
    /// Fail on purpose (supervision tests and chaos).
    Crash,
}

/// The actor of one shard at one epoch. Configuration and state come in [`ShardArgs`].
#[derive(Debug)]
pub struct ShardActor;

#[derive(Debug, Clone)]
pub struct ShardArgs {
    pub shard: u32,
    pub epoch: u64,
    pub state: SharedState,
    pub pool: WorkerPool,
    /// The durable log; `None` runs without durability (in-process tests of the actor only).
    pub log: Option<ShardLog>,
    /// Writes since the last automatic checkpoint.
    pub since_checkpoint: u64,
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardArgs;
    type Arguments = ShardArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        args: ShardArgs,
    ) -> Result<ShardArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: ShardMsg,
        st: &mut ShardArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Crash => Err(format!("shard {} asked to crash", st.shard).into()),
            ShardMsg::Checkpoint { done } => {
                let snapshot = st.state.lock().snapshot(0);
                match &st.log {
                    Some(log) => log.submit(LogItem::Checkpoint { snapshot, done }).await,
                    None => {
                        let _ = done.send(Err(ErrorCode::Internal));
                    }
                }
                Ok(())
            }
            ShardMsg::Apply {
                input,
                reply,
                permit,
                arrived,
            } => {
                // Invariant 1: an op admitted under the lease takes no effect once it lapsed (on
                // this node's own clock), however long the op waited in the mailbox.
                if st.log.as_ref().is_some_and(|l| !l.may_serve()) {
                    metrics::counter!(m::SHARD_REJECTED, "reason" => "lease_lapsed").increment(1);
                    let _ = reply.send(Err(ErrorCode::NotOwner));
                    drop(permit);
                    return Ok(());
                }
                let (result, wrote, input) = apply_input(st, input).await;
                match &st.log {
                    Some(log) => {
                        // The request goes to the log as it arrived (a validated frame is
                        // encoded from in place): no owned copy, no decode.
                        let record = if wrote { input } else { None };
                        log.submit(LogItem::Op {
                            record,
                            result,
                            reply,
                            permit: Some(permit),
                            arrived,
                        })
                        .await;
                    }
                    None => {
                        let _ = reply.send(result);
                        drop(permit);
                        metrics::histogram!(m::SHARD_OP_DURATION)
                            .record(arrived.elapsed().as_secs_f64());
                    }
                }
                Ok(())
            }
        }
    }
}

impl ShardInput {
    /// The request, borrowed where it lives (for the log writer); `None` for a frame that
    /// holds no shard request (never admitted: the router checks the kind).
    pub fn request_ref(&self) -> Option<ShardRequestRef<'_>> {
        match self {
            ShardInput::Local(r) => Some(ShardRequestRef::from_native(r)),
            ShardInput::Wire(f) => match &f.envelope().body {
                ArchivedBody::ShardRequest(r) => Some(ShardRequestRef::from_archived(r)),
                _ => None,
            },
        }
    }
}

/// Applies one request; big tensor adds go to the worker pool so the reactor never does bulk
/// math. Returns the result, whether it changed the state (and so must be logged), and the input
/// back (the pool needed to own it).
async fn apply_input(st: &ShardArgs, input: ShardInput) -> (OpReply, bool, Option<ShardInput>) {
    let big = match &input {
        ShardInput::Local(r) => {
            matches!(&r.op, Op::AddTensor { values, .. } if values.len() >= POOL_TENSOR_LEN)
        }
        ShardInput::Wire(f) => matches!(&f.envelope().body, ArchivedBody::ShardRequest(r)
            if matches!(&r.op, ArchivedOp::AddTensor { values, .. } if values.len() >= POOL_TENSOR_LEN)),
    };
    if !big {
        let (r, wrote) = apply_sync(&st.state, &input);
        return (r, wrote, Some(input));
    }
    let state = st.state.clone();
    match st
        .pool
        .run(move || (apply_sync(&state, &input), input))
        .await
    {
        Ok(((r, wrote), input)) => (r, wrote, Some(input)),
        Err(e) => {
            tracing::warn!(error = %e, "worker pool refused a tensor op");
            (Err(ErrorCode::Overloaded), false, None)
        }
    }
}

fn apply_sync(state: &SharedState, input: &ShardInput) -> (OpReply, bool) {
    let (idem, op) = match input {
        ShardInput::Local(r) => (r.idem, OpRef::from_native(&r.op)),
        ShardInput::Wire(f) => match &f.envelope().body {
            ArchivedBody::ShardRequest(r) => (
                IdemKey {
                    sender: r.idem.sender.to_native(),
                    seq: r.idem.seq.to_native(),
                },
                OpRef::from_archived(&r.op),
            ),
            _ => return (Err(ErrorCode::BadRequest), false),
        },
    };
    let name = op.name();
    let write = op.is_write();
    let result = state.lock().apply(idem, op);
    let label = match &result {
        Ok(OpResult::Duplicate) => "duplicate",
        Ok(_) if write => "applied",
        Ok(_) => "read",
        Err(_) => "error",
    };
    metrics::counter!(m::SHARD_OPS, "op" => name, "result" => label).increment(1);
    let wrote = write && label == "applied";
    (result.map_err(|e| e.code()), wrote)
}

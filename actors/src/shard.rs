//! `ShardActor`: owns one shard's state and applies operations to it, one at a time.
//!
//! The state is a small key-value map (bytes, counters, f32 tensors) whose writes carry
//! idempotency keys, so every acknowledged op is applied exactly once however often it is retried.
//! The state lives in a [`SharedState`] held by the supervisor, so a restarted actor picks up
//! where the failed one left off. (Durable op logs and checkpoints arrive with the control plane.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use nalgebra::DVector;
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tidepool_runtime::codec::{
    ArchivedBody, ArchivedOp, ArchivedShardRequest, ErrorCode, Frame, IdemKey, Op, OpRef, OpResult,
    SenderWindow, ShardRequest, ShardRequestRef, ShardSnapshot, SnapValue,
};
use tidepool_runtime::metrics as m;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::dedup::{Check, Dedup};
use crate::shard_log::{LogItem, ShardLog};
use crate::worker::WorkerPool;

/// Keys a shard holds at most (bounded memory).
pub const MAX_KEYS: usize = 1 << 20;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Writes between automatic checkpoints: bounds how much log a new owner replays.
pub const CHECKPOINT_EVERY: u64 = 5_000;

/// Tensor ops at least this long run on the worker pool, not on the actor's task.
pub const POOL_TENSOR_LEN: usize = 16 * 1024;

#[derive(Debug, Clone)]
enum Value {
    Bytes(Vec<u8>),
    Counter(i64),
    Tensor(DVector<f32>),
}

/// Why an op was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    /// The key holds a different kind of value, or a tensor has the wrong length.
    #[error("{0}")]
    BadRequest(String),
    /// The shard or the sender's dedup window is full.
    #[error("{0}")]
    Full(String),
}

impl ShardError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ShardError::BadRequest(_) => ErrorCode::BadRequest,
            ShardError::Full(_) => ErrorCode::Overloaded,
        }
    }
}

/// One shard's data and idempotency table. Pure: no I/O, no clocks.
#[derive(Debug, Default, Clone)]
pub struct ShardState {
    kv: HashMap<String, Value>,
    dedup: Dedup,
    applied: u64,
}

impl ShardState {
    /// Applies `op`. Writes are deduplicated by `idem`; reads are not.
    pub fn apply(&mut self, idem: IdemKey, op: OpRef<'_>) -> Result<OpResult, ShardError> {
        let key = op.key();
        if key.len() > MAX_KEY_BYTES {
            return Err(ShardError::BadRequest(format!(
                "key of {} bytes exceeds {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        if op.is_write() {
            match self.dedup.check(idem.sender, idem.seq) {
                Check::New => {}
                Check::Duplicate => return Ok(OpResult::Duplicate),
                Check::WindowFull => {
                    return Err(ShardError::Full(format!(
                        "sender {} has too many ops in flight",
                        idem.sender
                    )))
                }
            }
            if !self.kv.contains_key(key) && self.kv.len() >= MAX_KEYS {
                return Err(ShardError::Full(format!(
                    "shard holds the maximum of {MAX_KEYS} keys"
                )));
            }
        }
        let result = self.apply_unchecked(op)?;
        if op.is_write() {
            self.dedup.record(idem.sender, idem.seq);
            self.applied += 1;
        }
        Ok(result)
    }

    fn apply_unchecked(&mut self, op: OpRef<'_>) -> Result<OpResult, ShardError> {
        let mismatch =
            |key: &str| ShardError::BadRequest(format!("key {key:?} holds another kind of value"));
        Ok(match op {
            OpRef::Put { key, value } => {
                self.kv
                    .insert(key.to_string(), Value::Bytes(value.to_vec()));
                OpResult::Done
            }
            OpRef::Get { key } => match self.kv.get(key) {
                None => OpResult::Value(None),
                Some(Value::Bytes(b)) => OpResult::Value(Some(b.clone())),
                Some(Value::Counter(c)) => OpResult::Counter(*c),
                Some(Value::Tensor(_)) => return Err(mismatch(key)),
            },
            OpRef::Incr { key, delta } => {
                let v = self.kv.entry(key.to_string()).or_insert(Value::Counter(0));
                let Value::Counter(c) = v else {
                    return Err(mismatch(key));
                };
                *c = c.wrapping_add(delta);
                OpResult::Counter(*c)
            }
            OpRef::AddTensor { key, values } => {
                let v = self
                    .kv
                    .entry(key.to_string())
                    .or_insert_with(|| Value::Tensor(DVector::zeros(values.len())));
                let Value::Tensor(t) = v else {
                    return Err(mismatch(key));
                };
                if t.len() != values.len() {
                    return Err(ShardError::BadRequest(format!(
                        "tensor {key:?} has {} elements, got {}",
                        t.len(),
                        values.len()
                    )));
                }
                // In place over the receive buffer: no decode, no copy of the gradient.
                *t += nalgebra::DVectorView::from_slice(values, values.len());
                OpResult::Done
            }
            OpRef::GetTensor { key } => match self.kv.get(key) {
                None => OpResult::Tensor(Vec::new()),
                Some(Value::Tensor(t)) => OpResult::Tensor(t.as_slice().to_vec()),
                Some(_) => return Err(mismatch(key)),
            },
        })
    }

    /// The state as a snapshot at log position `seq` (for checkpoints).
    pub fn snapshot(&self, seq: u64) -> ShardSnapshot {
        let mut entries: Vec<(String, SnapValue)> = self
            .kv
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Bytes(b) => SnapValue::Bytes(b.clone()),
                    Value::Counter(c) => SnapValue::Counter(*c),
                    Value::Tensor(t) => SnapValue::Tensor(t.as_slice().to_vec()),
                };
                (k.clone(), v)
            })
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let senders = self
            .dedup
            .export()
            .into_iter()
            .map(|(sender, floor, above)| SenderWindow {
                sender,
                floor,
                above,
            })
            .collect();
        ShardSnapshot {
            seq,
            entries,
            senders,
        }
    }

    /// Rebuilds a state from a snapshot.
    pub fn from_snapshot(snap: ShardSnapshot) -> Self {
        let kv = snap
            .entries
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    SnapValue::Bytes(b) => Value::Bytes(b),
                    SnapValue::Counter(c) => Value::Counter(c),
                    SnapValue::Tensor(t) => Value::Tensor(DVector::from_vec(t)),
                };
                (k, v)
            })
            .collect();
        let dedup = Dedup::import(
            snap.senders
                .into_iter()
                .map(|w| (w.sender, w.floor, w.above)),
        );
        ShardState {
            kv,
            dedup,
            applied: 0,
        }
    }

    /// Replays one logged request (restore). Errors were errors when first applied too, and
    /// duplicates are skipped by the dedup table, so replay reproduces the original state.
    pub fn replay(&mut self, req: &ShardRequest) {
        let _ = self.apply(req.idem, OpRef::from_native(&req.op));
    }

    /// [`replay`](Self::replay) of a request read in place from a log segment.
    pub fn replay_archived(&mut self, req: &ArchivedShardRequest) {
        let idem = IdemKey {
            sender: req.idem.sender.to_native(),
            seq: req.idem.seq.to_native(),
        };
        let _ = self.apply(idem, OpRef::from_archived(&req.op));
    }

    /// Writes applied (not counting duplicates).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn keys(&self) -> usize {
        self.kv.len()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn k(seq: u64) -> IdemKey {
        IdemKey { sender: 1, seq }
    }

    #[test]
    fn incr_is_applied_once_per_key() {
        let mut s = ShardState::default();
        assert_eq!(
            s.apply(k(1), OpRef::Incr { key: "a", delta: 2 }),
            Ok(OpResult::Counter(2))
        );
        assert_eq!(
            s.apply(k(1), OpRef::Incr { key: "a", delta: 2 }),
            Ok(OpResult::Duplicate)
        );
        assert_eq!(
            s.apply(k(2), OpRef::Incr { key: "a", delta: 2 }),
            Ok(OpResult::Counter(4))
        );
        assert_eq!(
            s.apply(k(9), OpRef::Get { key: "a" }),
            Ok(OpResult::Counter(4))
        );
        assert_eq!(s.applied(), 2);
    }

    #[test]
    fn tensors_accumulate_and_check_length() {
        let mut s = ShardState::default();
        s.apply(
            k(1),
            OpRef::AddTensor {
                key: "w",
                values: &[1.0, 2.0],
            },
        )
        .unwrap();
        s.apply(
            k(2),
            OpRef::AddTensor {
                key: "w",
                values: &[0.5, 0.5],
            },
        )
        .unwrap();
        assert_eq!(
            s.apply(k(3), OpRef::GetTensor { key: "w" }),
            Ok(OpResult::Tensor(vec![1.5, 2.5]))
        );
        assert!(matches!(
            s.apply(
                k(4),
                OpRef::AddTensor {
                    key: "w",
                    values: &[1.0]
                }
            ),
            Err(ShardError::BadRequest(_))
        ));
        assert!(matches!(
            s.apply(k(5), OpRef::Incr { key: "w", delta: 1 }),
            Err(ShardError::BadRequest(_))
        ));
    }

    #[test]
    fn oversized_keys_are_refused() {
        let mut s = ShardState::default();
        let key = "x".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            s.apply(
                k(1),
                OpRef::Put {
                    key: &key,
                    value: b"v"
                }
            ),
            Err(ShardError::BadRequest(_))
        ));
        assert_eq!(s.keys(), 0);
    }
}

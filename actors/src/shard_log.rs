//! The shard's durable op log writer (invariant 3: acknowledged means durable).
//!
//! The shard actor applies an op to its in-memory state and hands the reply here instead of
//! sending it; this task appends the op to the shard's log in the object store, in order, in
//! batches (group commit), and only then releases the replies. Reads and duplicates queue behind
//! the writes before them, so nothing is acknowledged before what it depends on is durable. If
//! the log was fenced by a newer epoch, every queued op is refused as stale and the owner stops
//! serving; on any other storage error the queued ops fail (retryable) and the shard restarts
//! from storage, discarding its in-memory state.

use std::time::Instant;

use bytes::Bytes;
use tidepool_runtime::codec::{self, ErrorCode, LogRecordRef, ShardSnapshot};
use tidepool_runtime::metrics as m;
use tidepool_runtime::storage::{StorageError, Store};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tracing::{error, warn};

use crate::serve_gate::ServeGate;
use crate::shard::{OpReply, ShardInput};
use std::sync::Arc;

/// Ops per log segment at most.
const MAX_BATCH: usize = 512;

/// One queued item.
#[derive(Debug)]
pub enum LogItem {
    /// An op's reply, held until the op (if it wrote) is durable.
    Op {
        /// The request to log, where it lives (a write that changed the state); `None` for
        /// reads and duplicates.
        record: Option<ShardInput>,
        result: OpReply,
        reply: oneshot::Sender<OpReply>,
        permit: Option<OwnedSemaphorePermit>,
        arrived: Instant,
    },
    /// Write a checkpoint of this snapshot, covering everything queued before it.
    Checkpoint {
        snapshot: ShardSnapshot,
        done: oneshot::Sender<Result<u64, ErrorCode>>,
    },
}

/// Why the log stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFault {
    /// A newer epoch fenced the log: this node is no longer the owner.
    Fenced,
    /// Storage failed; the in-memory state may hold undurable ops and must be rebuilt.
    Failed,
}

/// Resolves ([`Ended::wait`]) once a log writer has ended; holds no sender, so keeping it does
/// not keep the writer alive.
#[derive(Debug, Clone)]
pub struct Ended(tokio::sync::watch::Receiver<()>);

impl Ended {
    pub async fn wait(mut self) {
        while self.0.changed().await.is_ok() {}
    }
}

/// Handle to a shard's log writer.
#[derive(Debug, Clone)]
pub struct ShardLog {
    tx: mpsc::Sender<LogItem>,
    gate: Arc<ServeGate>,
    /// Closed when the writer task has ended (every queued append landed or failed).
    ended: tokio::sync::watch::Receiver<()>,
}

impl ShardLog {
    /// Starts the writer for `(shard, epoch)`; the next record gets `next_seq`. Faults are
    /// reported once on `faults`.
    pub fn start(
        store: Store,
        shard: u32,
        epoch: u64,
        next_seq: u64,
        depth: usize,
        faults: mpsc::Sender<(u32, u64, LogFault)>,
        gate: Arc<ServeGate>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let (ended_tx, ended) = tokio::sync::watch::channel(());
        let writer_gate = gate.clone();
        tokio::spawn(async move {
            let _ended = ended_tx;
            write_loop(
                Writer {
                    store,
                    shard,
                    epoch,
                    next_seq,
                    fault: None,
                    last_checkpoint: None,
                    gate: writer_gate,
                },
                rx,
                faults,
            )
            .await
        });
        ShardLog { tx, gate, ended }
    }

    /// Resolves once this writer has ended: its actor stopped and every append it had queued
    /// landed or failed. A restore of the same shard at the same epoch waits for it, or it could
    /// read the log before this writer's last append lands and serve without it.
    pub fn ended(&self) -> Ended {
        Ended(self.ended.clone())
    }

    /// Whether this node may serve now (the shard actor asks before it applies an op).
    pub fn may_serve(&self) -> bool {
        self.gate.may_serve()
    }

    /// Queues an item (waits while the queue is full: backpressure to the shard actor).
    pub async fn submit(&self, item: LogItem) {
        if let Err(mpsc::error::SendError(item)) = self.tx.send(item).await {
            fail(item, ErrorCode::Internal);
        }
    }
}

struct Writer {
    store: Store,
    shard: u32,
    epoch: u64,
    next_seq: u64,
    fault: Option<LogFault>,
    /// Seq of the last checkpoint written at this epoch: a second one with nothing new would
    /// collide with it (create-once objects) and say nothing new.
    last_checkpoint: Option<u64>,
    gate: Arc<ServeGate>,
}

/// The chaos harness's deliberately broken mode (`fault-injection` builds only, and only with
/// `TIDEPOOL_UNSAFE_SKIP_DURABILITY=1`): ops are acknowledged without being logged, so a crash
/// loses acknowledged ops, which the harness's checkers must catch.
fn skip_durability() -> bool {
    #[cfg(feature = "fault-injection")]
    {
        static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SKIP.get_or_init(|| {
            let on = std::env::var("TIDEPOOL_UNSAFE_SKIP_DURABILITY").as_deref() == Ok("1");
            if on {
                tracing::error!("TIDEPOOL_UNSAFE_SKIP_DURABILITY=1: acknowledging ops WITHOUT logging them (chaos test mode)");
            }
            on
        })
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        false
    }
}

fn fail(item: LogItem, code: ErrorCode) {
    match item {
        LogItem::Op { reply, .. } => {
            let _ = reply.send(Err(code));
        }
        LogItem::Checkpoint { done, .. } => {
            let _ = done.send(Err(code));
        }
    }
}

fn fault_code(f: LogFault) -> ErrorCode {
    match f {
        LogFault::Fenced => ErrorCode::NotOwner,
        LogFault::Failed => ErrorCode::Internal,
    }
}

async fn write_loop(
    mut w: Writer,
    mut rx: mpsc::Receiver<LogItem>,
    faults: mpsc::Sender<(u32, u64, LogFault)>,
) {
    let mut batch: Vec<LogItem> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        // Ops up to the first checkpoint go in one segment; the checkpoint follows them.
        let mut rest = std::mem::take(&mut batch).into_iter().peekable();
        while rest.peek().is_some() {
            let mut ops = Vec::new();
            while let Some(LogItem::Op { .. }) = rest.peek() {
                if let Some(item) = rest.next() {
                    ops.push(item);
                }
            }
            let before = w.fault;
            w.flush(ops).await;
            if let Some(LogItem::Checkpoint { .. }) = rest.peek() {
                if let Some(LogItem::Checkpoint { snapshot, done }) = rest.next() {
                    let _ = done.send(w.checkpoint(snapshot).await);
                }
            }
            if before.is_none() {
                if let Some(f) = w.fault {
                    let _ = faults.send((w.shard, w.epoch, f)).await;
                }
            }
        }
    }
}

impl Writer {
    async fn flush(&mut self, ops: Vec<LogItem>) {
        if ops.is_empty() {
            return;
        }
        if let Some(f) = self.fault {
            ops.into_iter().for_each(|i| fail(i, fault_code(f)));
            return;
        }
        // The segment is encoded straight from the requests where they live (a received frame
        // is read in place): one copy of each payload, tensors included, into the segment.
        let records: Vec<LogRecordRef<'_>> = ops
            .iter()
            .filter_map(|i| match i {
                LogItem::Op {
                    record: Some(input),
                    ..
                } => input.request_ref(),
                _ => None,
            })
            .enumerate()
            .map(|(i, req)| LogRecordRef {
                seq: self.next_seq + i as u64,
                epoch: self.epoch,
                req: Some(req),
            })
            .collect();
        let encoded =
            (!records.is_empty()).then(|| (records.len() as u64, codec::encode_log_refs(&records)));
        drop(records);
        // The chaos harness's deliberately broken mode skips the append: acknowledged, not logged.
        if let Some((n, encoded)) = encoded.filter(|_| !skip_durability()) {
            let outcome = match encoded {
                Ok(bytes) => {
                    self.store
                        .append(self.shard, self.epoch, self.next_seq, n, Bytes::from(bytes))
                        .await
                }
                Err(e) => Err(StorageError::Corrupt {
                    path: format!("shard {} log", self.shard),
                    reason: e.to_string(),
                }),
            };
            match outcome {
                Ok(()) => self.next_seq += n,
                Err(StorageError::Fenced { .. }) => {
                    warn!(
                        shard = self.shard,
                        epoch = self.epoch,
                        "log fenced by a newer epoch; refusing as stale"
                    );
                    metrics::counter!(m::STALE_EPOCH_REJECTIONS).increment(ops.len() as u64);
                    self.fault = Some(LogFault::Fenced);
                }
                Err(e) => {
                    error!(shard = self.shard, error = %e, "op log append failed");
                    self.fault = Some(LogFault::Failed);
                }
            }
        }
        // Invariant 1 on the answer side: nothing is answered after this node's lease lapsed (on
        // its own clock), however long the append or a stalled process took. A read is refused
        // (its value may be stale by now); so is a durable write, which the client retries with
        // the same idempotency key and the new owner answers as a duplicate.
        let lapsed = self.fault.is_none() && !self.gate.may_serve();
        if lapsed {
            metrics::counter!(m::SHARD_REJECTED, "reason" => "lease_lapsed")
                .increment(ops.len() as u64);
        }
        for item in ops {
            match (item, self.fault) {
                (item, None) if lapsed => fail(item, ErrorCode::NotOwner),
                (item, Some(f)) => fail(item, fault_code(f)),
                (
                    LogItem::Op {
                        result,
                        reply,
                        permit,
                        arrived,
                        ..
                    },
                    None,
                ) => {
                    let _ = reply.send(result);
                    drop(permit);
                    metrics::histogram!(m::SHARD_OP_DURATION)
                        .record(arrived.elapsed().as_secs_f64());
                }
                (other, None) => fail(other, ErrorCode::Internal),
            }
        }
    }

    async fn checkpoint(&mut self, mut snapshot: ShardSnapshot) -> Result<u64, ErrorCode> {
        if let Some(f) = self.fault {
            return Err(fault_code(f));
        }
        let seq = self.next_seq - 1;
        if self.last_checkpoint == Some(seq) {
            return Ok(seq);
        }
        snapshot.seq = seq;
        let bytes = codec::encode_snapshot(&snapshot).map_err(|_| ErrorCode::Internal)?;
        match self
            .store
            .put_checkpoint(self.shard, self.epoch, seq, Bytes::from(bytes))
            .await
        {
            Ok(()) => {
                self.last_checkpoint = Some(seq);
                // The log before the checkpoint is no longer needed to restore: trim it so the
                // next owner lists and reads only what came after.
                if let Err(e) = self.store.compact_log(self.shard, seq).await {
                    warn!(shard = self.shard, error = %e, "log compaction failed (harmless; retried at the next checkpoint)");
                }
                Ok(seq)
            }
            Err(StorageError::Fenced { .. }) => {
                self.fault = Some(LogFault::Fenced);
                Err(ErrorCode::NotOwner)
            }
            Err(e) => {
                error!(shard = self.shard, error = %e, "checkpoint failed");
                Err(ErrorCode::Internal)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{ShardActor, ShardArgs, ShardInput, ShardMsg, ShardState};
    use crate::worker::WorkerPool;
    use std::time::Duration;
    use tidepool_runtime::codec::{IdemKey, Op, OpResult, ShardRequest};
    use tidepool_runtime::lease::LeaseConfig;
    use tokio::sync::Semaphore;

    /// A gate holding a fresh 2 s lease, or none at all.
    fn gate(valid: bool) -> Arc<ServeGate> {
        let g = Arc::new(ServeGate::new(LeaseConfig::default()));
        if valid {
            let now = Instant::now();
            let mut h = g.lock();
            let token = h.on_send(now);
            h.on_grant(now, token, Duration::from_secs(2), 1, 0);
        }
        g
    }

    fn log(gate: Arc<ServeGate>) -> ShardLog {
        let (faults, _rx) = mpsc::channel(4);
        ShardLog::start(Store::in_memory(), 0, 1, 1, 16, faults, gate)
    }

    async fn read_through(log: &ShardLog) -> OpReply {
        let (tx, rx) = oneshot::channel();
        log.submit(LogItem::Op {
            record: None,
            result: Ok(OpResult::Counter(5)),
            reply: tx,
            permit: None,
            arrived: Instant::now(),
        })
        .await;
        rx.await.unwrap()
    }

    #[tokio::test]
    async fn nothing_is_answered_after_the_lease_lapsed() {
        assert_eq!(
            read_through(&log(gate(true))).await,
            Ok(OpResult::Counter(5))
        );
        // The op was applied while the lease was valid; by the time its reply is released the
        // lease has lapsed (a stalled process): the read is refused, retryable.
        assert_eq!(
            read_through(&log(gate(false))).await,
            Err(ErrorCode::NotOwner)
        );
    }

    /// A same-epoch restore waits for this: the writer ends only after its queued items were
    /// handled and the last handle to it is gone.
    #[tokio::test]
    async fn ended_resolves_after_the_queue_is_drained_and_the_handles_are_gone() {
        let log = log(gate(true));
        let ended = log.ended();
        let (tx, rx) = oneshot::channel();
        log.submit(LogItem::Op {
            record: None,
            result: Ok(OpResult::Counter(1)),
            reply: tx,
            permit: None,
            arrived: Instant::now(),
        })
        .await;
        let clone = log.clone();
        drop(log);
        let early = tokio::time::timeout(Duration::from_millis(50), ended.clone().wait()).await;
        assert!(early.is_err(), "a handle is still alive");
        drop(clone);
        tokio::time::timeout(Duration::from_secs(5), ended.wait())
            .await
            .expect("ends once every handle is gone");
        assert_eq!(rx.await.unwrap(), Ok(OpResult::Counter(1)));
    }

    #[tokio::test]
    async fn an_op_that_waited_past_the_lease_takes_no_effect() {
        let state = Arc::new(parking_lot::Mutex::new(ShardState::default()));
        let args = |g: Arc<ServeGate>| ShardArgs {
            shard: 0,
            epoch: 1,
            state: state.clone(),
            pool: WorkerPool::new(1, 1),
            log: Some(log(g)),
            since_checkpoint: 0,
        };
        let incr = |seq: u64| ShardRequest {
            idem: IdemKey { sender: 9, seq },
            op: Op::Incr {
                key: "k".into(),
                delta: 1,
            },
        };
        let permits = Arc::new(Semaphore::new(4));
        for (valid, want) in [
            (false, Err(ErrorCode::NotOwner)),
            (true, Ok(OpResult::Counter(1))),
        ] {
            let (actor, handle) = ractor::Actor::spawn(None, ShardActor, args(gate(valid)))
                .await
                .unwrap();
            let (tx, rx) = oneshot::channel();
            actor
                .cast(ShardMsg::Apply {
                    input: ShardInput::Local(incr(1)),
                    reply: tx,
                    permit: permits.clone().acquire_owned().await.unwrap(),
                    arrived: Instant::now(),
                })
                .unwrap();
            assert_eq!(rx.await.unwrap(), want, "lease valid: {valid}");
            actor.stop(None);
            handle.await.unwrap();
        }
        assert_eq!(state.lock().applied(), 1, "the refused op changed nothing");
    }
}

//! The ownership driver: one task per node that feeds cluster-map changes, lease validity,
//! storage faults and actor failures to the sans-IO [`OwnershipCore`] (one handoff machine per
//! shard; every decision is there) and carries out the effects it returns (restore, start and
//! stop actors, checkpoint, commit the handoff, buffer and forward requests). What stays here is
//! I/O and time: storage calls, actor messages, retry delays with jitter, timeouts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use ractor::ActorRef;
use tidepool_runtime::codec::ErrorCode;
use tidepool_runtime::control::ControlPlane;
use tidepool_runtime::handoff::{Effect, Event};
use tidepool_runtime::metrics as m;
use tidepool_runtime::ownership::OwnershipCore;
use tidepool_runtime::storage::{StorageError, Store};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::leader::Leases;
use crate::restore::{restore_shard, RestoreError, Restored};
use crate::router::Router;
use crate::serve_gate::ServeGate;
use crate::shard::{ShardMsg, ShardState};
use crate::shard_log::{Ended, LogFault, ShardLog};
use crate::supervisor::SupervisorMsg;

/// Something that finished in the background and must go back into a shard's machine.
#[derive(Debug)]
enum Done {
    Event(u32, Event),
    /// (shard, epoch, attempt, state)
    Restored(u32, u64, u64, Box<Restored>),
    /// A restore, checkpoint or handoff commit failed: retry after the shard's next backoff.
    Backoff(u32),
    Retry(u32),
}

/// Retry delays of one shard's failing restore, checkpoint or handoff commit: exponential from
/// 200 ms, capped at 1 s, each with up to as much again of random jitter (so the shards of a
/// node, or the nodes of a cluster, that failed together do not retry in lockstep). Without a
/// limit: the machine retries until the step succeeds or the assignment moves on.
fn retry_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(1))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Inputs the driver needs.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub me: String,
    pub shards: u32,
    pub log_queue: usize,
}

/// Runs until the map channel closes.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: DriverConfig,
    control: ControlPlane,
    router: Router,
    supervisor: ActorRef<SupervisorMsg>,
    store: Store,
    leases: Arc<Leases>,
    mut failed: mpsc::UnboundedReceiver<u32>,
) {
    let mut map_rx = control.map();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let (fault_tx, mut fault_rx) = mpsc::channel::<(u32, u64, LogFault)>(64);
    let mut d = Driver {
        cfg: cfg.clone(),
        control,
        router,
        supervisor,
        store,
        done: done_tx,
        faults: fault_tx,
        core: OwnershipCore::new(cfg.me.clone(), cfg.shards),
        handoff_started: HashMap::new(),
        backoff: HashMap::new(),
        gate: leases.holder.clone(),
        writers: HashMap::new(),
    };
    map_rx.borrow_and_update();
    leases.set_acted_index(d.on_map().await);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = map_rx.changed() => {
                if changed.is_err() { return; }
                let index = d.on_map().await;
                leases.set_acted_index(index);
            }
            _ = tick.tick() => {
                let valid = leases.valid();
                // Lease lapses and regains reach the ownership log dated when they happened
                // (admission stopped at the lapse), however late this tick runs.
                d.router.sync_ownership();
                let fx = d.core.on_lease(Instant::now(), valid);
                d.run(fx).await;
            }
            Some(done) = done_rx.recv() => d.on_done(done).await,
            Some((shard, epoch, fault)) = fault_rx.recv() => {
                warn!(shard, epoch, ?fault, "shard log fault");
                d.on_log_fault(shard).await;
            }
            Some(shard) = failed.recv() => d.reset(shard).await,
        }
    }
}

struct Driver {
    cfg: DriverConfig,
    control: ControlPlane,
    router: Router,
    supervisor: ActorRef<SupervisorMsg>,
    store: Store,
    done: mpsc::UnboundedSender<Done>,
    faults: mpsc::Sender<(u32, u64, LogFault)>,
    /// Every decision: the shards' machines, the assignments seen, the awaited restores' state.
    core: OwnershipCore<ShardState>,
    handoff_started: HashMap<u32, Instant>,
    /// Each shard's retry delays since its last success or assignment change.
    backoff: HashMap<u32, ExponentialBackoff>,
    /// Given to each shard's log writer: no reply leaves after this node's lease lapsed.
    gate: Arc<ServeGate>,
    /// Each shard's latest log writer and its epoch: a restore at that epoch waits until it
    /// ended (its last appends landed), or it could read the log without them.
    writers: HashMap<u32, (u64, Ended)>,
}

impl Driver {
    /// Feeds every changed assignment to its shard's machine; returns the map index acted on.
    async fn on_map(&mut self) -> u64 {
        let map = self.control.map().borrow().clone();
        let change = self.core.on_map(Instant::now(), &map);
        for s in change.changed {
            self.backoff.remove(&s);
        }
        self.run(change.effects).await;
        map.applied_index
    }

    /// Throws away a shard's machine and state and starts over from the current assignment
    /// (actor failure, storage failure): the state is rebuilt from storage.
    async fn reset(&mut self, shard: u32) {
        self.stop_actor(shard).await;
        self.backoff.remove(&shard);
        let fx = self.core.reset(Instant::now(), shard);
        self.run_for(shard, fx).await;
    }

    /// The shard's log writer faulted (append failed or refused as fenced): the core decides
    /// (it starts the shard over; see `OwnershipCore::on_log_fault`).
    async fn on_log_fault(&mut self, shard: u32) {
        self.stop_actor(shard).await;
        self.backoff.remove(&shard);
        let fx = self.core.on_log_fault(Instant::now(), shard);
        self.run_for(shard, fx).await;
    }

    async fn run(&mut self, effects: Vec<(u32, Effect)>) {
        for (shard, e) in effects {
            self.effect(shard, e).await;
        }
    }

    async fn run_for(&mut self, shard: u32, effects: Vec<Effect>) {
        for e in effects {
            self.effect(shard, e).await;
        }
    }

    async fn on_done(&mut self, done: Done) {
        match done {
            Done::Event(s, ev) => {
                if matches!(ev, Event::CheckpointWritten { .. }) {
                    self.backoff.remove(&s);
                }
                self.feed(s, ev).await
            }
            Done::Restored(s, epoch, attempt, r) => {
                self.backoff.remove(&s);
                let Restored {
                    state, next_seq, ..
                } = *r;
                let (fx, kept) =
                    self.core
                        .on_restored(Instant::now(), s, epoch, attempt, state, next_seq);
                if !kept {
                    debug!(
                        shard = s,
                        epoch, attempt, "superseded restore finished; dropped"
                    );
                }
                self.run_for(s, fx).await;
            }
            Done::Backoff(s) => {
                let delay = self
                    .backoff
                    .entry(s)
                    .or_insert_with(retry_backoff)
                    .next()
                    .unwrap_or(Duration::from_secs(1));
                let done = self.done.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = done.send(Done::Retry(s));
                });
            }
            Done::Retry(s) => self.feed(s, Event::Retry).await,
        }
    }

    async fn feed(&mut self, shard: u32, ev: Event) {
        let fx = self.core.feed(Instant::now(), shard, ev);
        self.run_for(shard, fx).await;
    }

    async fn effect(&mut self, shard: u32, e: Effect) {
        debug!(shard, ?e, "handoff effect");
        match e {
            Effect::StopAccepting => {
                if self.router.serving(shard).is_some() {
                    self.handoff_started.insert(shard, Instant::now());
                }
                self.router.stop_accepting(shard);
            }
            Effect::WaitInflight => {
                let (router, done) = (self.router.clone(), self.done.clone());
                tokio::spawn(async move {
                    let drained = router.inflight_drained(shard);
                    if tokio::time::timeout(Duration::from_secs(30), drained)
                        .await
                        .is_err()
                    {
                        // Going on is safe: the new owner fences the log, so a late append of
                        // one of these ops fails and the op is never acknowledged.
                        warn!(
                            shard,
                            left = router.inflight(shard),
                            "handoff: ops still in flight after 30 s; handing off anyway"
                        );
                    }
                    let _ = done.send(Done::Event(shard, Event::InflightDrained));
                });
            }
            Effect::WriteCheckpoint { epoch } => {
                let (router, done) = (self.router.clone(), self.done.clone());
                // A shard restored here but handed off before it started serving (the leader
                // moved it on while it was restoring) has no actor: its checkpoint is the
                // restored state itself, at the restored log position.
                let unserved = match (router.serving(shard), self.core.restored_at(shard, epoch)) {
                    (None, Some((state, seq))) => Some((state.snapshot(seq), seq)),
                    _ => None,
                };
                let store = self.store.clone();
                tokio::spawn(async move {
                    let written = match unserved {
                        Some((snapshot, seq)) => {
                            checkpoint_restored(&store, shard, epoch, seq, &snapshot).await
                        }
                        None => checkpoint(&router, shard).await,
                    };
                    match written {
                        Ok(seq) => {
                            let _ = done
                                .send(Done::Event(shard, Event::CheckpointWritten { epoch, seq }));
                        }
                        Err(CheckpointError::Fenced) => {
                            let _ = done.send(Done::Event(shard, Event::FencedByStorage { epoch }));
                        }
                        Err(e) => {
                            let reason = e.to_string();
                            warn!(shard, %reason, "checkpoint failed; retrying");
                            let _ =
                                done.send(Done::Event(shard, Event::CheckpointFailed { reason }));
                            let _ = done.send(Done::Backoff(shard));
                        }
                    }
                });
            }
            Effect::ReportHandoffDone { epoch, .. } => {
                let Some(cmd) = self.core.handoff_commit(shard, epoch) else {
                    return;
                };
                let (control, done) = (self.control.clone(), self.done.clone());
                tokio::spawn(async move {
                    match control.propose(cmd).await {
                        Ok(r) if r.is_ok() => {}
                        other => {
                            warn!(shard, ?other, "handoff commit failed; retrying");
                            let _ = done.send(Done::Backoff(shard));
                        }
                    }
                });
            }
            Effect::Restore { epoch, attempt } => {
                let (store, done) = (self.store.clone(), self.done.clone());
                let previous = self
                    .writers
                    .get(&shard)
                    .filter(|(e, _)| *e == epoch)
                    .map(|(_, ended)| ended.clone());
                tokio::spawn(async move {
                    if let Some(ended) = previous {
                        // Bounded: a writer stuck in a storage call must not hold the shard
                        // forever (its late append then meets the fence or a collision).
                        let _ = tokio::time::timeout(Duration::from_secs(30), ended.wait()).await;
                    }
                    match restore_shard(&store, shard, epoch).await {
                        Ok(r) => {
                            metrics::counter!(m::SHARD_RESTORES, "result" => "ok").increment(1);
                            debug!(shard, epoch, replayed = r.replayed, "shard restored");
                            let _ = done.send(Done::Restored(shard, epoch, attempt, Box::new(r)));
                        }
                        Err(RestoreError::Storage(StorageError::Fenced { .. })) => {
                            metrics::counter!(m::SHARD_RESTORES, "result" => "fenced").increment(1);
                            let _ = done.send(Done::Event(shard, Event::FencedByStorage { epoch }));
                        }
                        Err(e) => {
                            metrics::counter!(m::SHARD_RESTORES, "result" => "error").increment(1);
                            warn!(shard, epoch, error = %e, "restore failed; retrying");
                            let _ = done.send(Done::Event(
                                shard,
                                Event::RestoreFailed {
                                    reason: e.to_string(),
                                    attempt,
                                },
                            ));
                            let _ = done.send(Done::Backoff(shard));
                        }
                    }
                });
            }
            Effect::CheckFence { epoch, attempt } => {
                let (store, done) = (self.store.clone(), self.done.clone());
                tokio::spawn(async move {
                    let ev = match store.check_fence(shard, epoch).await {
                        Ok(end) => {
                            metrics::counter!(m::SHARD_RESUMES, "result" => "ok").increment(1);
                            Event::Restored {
                                epoch,
                                seq: end.saturating_sub(1),
                                attempt,
                            }
                        }
                        Err(StorageError::Fenced { .. }) => {
                            metrics::counter!(m::SHARD_RESUMES, "result" => "fenced").increment(1);
                            Event::FencedByStorage { epoch }
                        }
                        Err(e) => {
                            metrics::counter!(m::SHARD_RESUMES, "result" => "error").increment(1);
                            warn!(shard, epoch, error = %e, "resume check failed; restoring instead");
                            Event::RestoreFailed {
                                reason: e.to_string(),
                                attempt,
                            }
                        }
                    };
                    let _ = done.send(Done::Event(shard, ev));
                });
            }
            Effect::Resume { epoch } => {
                // A lapse is not a handoff: no handoff duration for it.
                self.handoff_started.remove(&shard);
                self.router.resume(shard, epoch);
                debug!(shard, epoch, "resumed in place");
            }
            Effect::StartServing { epoch } => {
                let Some((state, next_seq)) = self.core.take_restored(shard, epoch) else {
                    warn!(shard, epoch, "asked to serve without restored state");
                    return;
                };
                let log = ShardLog::start(
                    self.store.clone(),
                    shard,
                    epoch,
                    next_seq,
                    self.cfg.log_queue,
                    self.faults.clone(),
                    self.gate.clone(),
                );
                self.writers.insert(shard, (epoch, log.ended()));
                let (tx, rx) = oneshot::channel();
                let msg = SupervisorMsg::Start {
                    shard,
                    epoch,
                    state,
                    log: Some(log),
                    reply: tx,
                };
                if self.supervisor.cast(msg).is_err() {
                    return;
                }
                match rx.await {
                    Ok(Ok(actor)) => {
                        self.router.activate(shard, epoch, actor);
                        debug!(shard, epoch, "serving");
                    }
                    other => warn!(shard, ?other, "could not start the shard actor"),
                }
            }
            Effect::StopServing { reason } => {
                debug!(shard, reason, "stop serving");
                if let Some(t) = self.handoff_started.remove(&shard) {
                    metrics::histogram!(m::HANDOFF_DURATION).record(t.elapsed().as_secs_f64());
                }
                self.stop_actor(shard).await;
            }
            Effect::DeliverBuffered => {
                // Buffered requests are forwarded in order when the slot is deactivated
                // (StopServing precedes this effect on the old owner); elsewhere nothing waits.
                if self.router.serving(shard).is_none() {
                    self.router.deactivate(shard);
                }
            }
            Effect::StaleIgnored => {
                metrics::counter!(m::STALE_EPOCH_REJECTIONS).increment(1);
            }
        }
    }

    async fn stop_actor(&mut self, shard: u32) {
        if self.router.deactivate(shard).is_some() {
            let (tx, rx) = oneshot::channel();
            if self
                .supervisor
                .cast(SupervisorMsg::Stop { shard, done: tx })
                .is_ok()
            {
                let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            }
        }
    }
}

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A newer epoch fenced the shard's log: this node is no longer the owner.
    #[error("fenced by a newer epoch")]
    Fenced,
    #[error("no actor serves the shard")]
    NoActor,
    #[error("the shard actor is gone")]
    ActorGone,
    #[error("the shard refused: {0:?}")]
    Refused(ErrorCode),
    #[error("checkpoint timed out")]
    TimedOut,
    #[error("encoding the snapshot: {0}")]
    Encode(String),
    #[error(transparent)]
    Storage(StorageError),
}

/// Checkpoints a restored, never-served shard from its restored state.
async fn checkpoint_restored(
    store: &Store,
    shard: u32,
    epoch: u64,
    seq: u64,
    snapshot: &tidepool_runtime::codec::ShardSnapshot,
) -> Result<u64, CheckpointError> {
    let bytes = tidepool_runtime::codec::encode_snapshot(snapshot)
        .map_err(|e| CheckpointError::Encode(e.to_string()))?;
    match store
        .put_checkpoint(shard, epoch, seq, bytes::Bytes::from(bytes))
        .await
    {
        Ok(()) => Ok(seq),
        Err(StorageError::Fenced { .. }) => Err(CheckpointError::Fenced),
        Err(e) => Err(CheckpointError::Storage(e)),
    }
}

async fn checkpoint(router: &Router, shard: u32) -> Result<u64, CheckpointError> {
    let (actor, _) = router.serving(shard).ok_or(CheckpointError::NoActor)?;
    let (tx, rx) = oneshot::channel();
    actor
        .cast(ShardMsg::Checkpoint { done: tx })
        .map_err(|_| CheckpointError::ActorGone)?;
    match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(Ok(seq))) => Ok(seq),
        // The log writer answers a fenced log as stale: `NotOwner`.
        Ok(Ok(Err(ErrorCode::NotOwner))) => Err(CheckpointError::Fenced),
        Ok(Ok(Err(code))) => Err(CheckpointError::Refused(code)),
        Ok(Err(_)) => Err(CheckpointError::ActorGone),
        Err(_) => Err(CheckpointError::TimedOut),
    }
}

#[cfg(test)]
mod backoff_tests {
    use std::time::Duration;

    /// Failed steps retry after growing, jittered pauses that stop growing at the cap (the old
    /// loop waited a fixed 200 or 300 ms for ever).
    #[test]
    fn retry_delays_grow_with_jitter_up_to_a_cap() {
        let delays: Vec<Duration> = super::retry_backoff().take(12).collect();
        assert_eq!(delays.len(), 12, "never gives up");
        let floor = [200, 400, 800, 1000, 1000, 1000];
        for (d, min_ms) in delays.iter().zip(floor.iter().chain([1000; 6].iter())) {
            let min = Duration::from_millis(*min_ms);
            assert!(*d >= min && *d < min * 2, "{d:?} outside [{min:?}, 2x)");
        }
        // Jitter: two shards that failed together do not get the same pauses.
        let other: Vec<Duration> = super::retry_backoff().take(12).collect();
        assert_ne!(delays, other);
    }
}

//! One step's scatter: the task to the owner of every shard (one request per node), partials
//! merged exactly, refused or unanswered shards re-sent to their current owner.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tidepool_runtime::admission;
use tidepool_runtime::codec::{Body, Dest, Envelope, JobPartial, JobTask, ShardEpoch};
use tidepool_runtime::control::{ClusterMap, JobRecord, JobState, NodeId};
use tidepool_runtime::metrics as m;
use tokio::sync::watch;
use tracing::warn;

use super::{AskError, CoordinatorCtx, Scattered, Stop, TASK_TIMEOUT};
use crate::jobs::job::{sums_from_wire, ExactSum, Task};

/// Where a step runs: the coordinator's step and, for a parameter-server job, the generation,
/// its base, the train steps fully reduced, and every shard's epoch when the generation began.
#[derive(Debug, Clone)]
pub(super) struct StepAt {
    pub step: u64,
    pub gen: u64,
    pub base: u64,
    pub complete: u64,
    /// Empty for jobs without parameter tables.
    pub epochs: Vec<u64>,
}

/// Whether the coordinator may go on: it still serves the job's coordinator shard and the job
/// is neither cancelled nor over.
pub(super) fn check(ctx: &CoordinatorCtx, rec: &JobRecord) -> Result<(), Stop> {
    if ctx.router.serving(rec.coordinator_shard).is_none() {
        return Err(Stop::Moved);
    }
    match ctx.router.map().jobs.get(&rec.id).map(|j| j.state) {
        Some(JobState::Cancelled) => Err(Stop::Cancelled),
        Some(s) if s.is_terminal() => Err(Stop::Moved),
        Some(_) => Ok(()),
        None => Err(Stop::Failed("job record is gone".into())),
    }
}

/// One step over every shard: returns the exact merge of all shards' partials, or `Lost` when a
/// parameter table moved since the generation began (or a node lost one).
pub(super) async fn scatter(
    ctx: &CoordinatorCtx,
    rec: &JobRecord,
    mut map_rx: watch::Receiver<Arc<ClusterMap>>,
    task: &Task,
    at: StepAt,
) -> Result<Scattered, Stop> {
    let shards = ctx.router.map().shard_count();
    let mut pending: BTreeSet<u32> = (0..shards).collect();
    let mut acc = ExactSum::default();
    let mut backoff = Duration::from_millis(20);
    // A task too large for a frame can never be sent: fail the job with the numbers rather
    // than retry it for ever (softmax learns its class count only at run time).
    let values = task.broadcast.len() as u64;
    let bytes = admission::task_bytes(values, rec.spec.len() as u64);
    let limits = ctx.exec.limits().admission;
    admission::check_frame("task", bytes, values, &limits)
        .map_err(|e| Stop::Failed(format!("step {}: {e}", at.step)))?;
    loop {
        if pending.is_empty() {
            return Ok(Scattered::Done(acc));
        }
        check(ctx, rec)?;
        let map = map_rx.borrow_and_update().clone();
        if !at.epochs.is_empty() {
            let epochs: Vec<u64> = map.shards.iter().map(|a| a.epoch).collect();
            if epochs != at.epochs {
                // A table moved since the generation began: whatever its new owner holds is
                // not the generation's (ARCHITECTURE.md invariant 11).
                return Ok(Scattered::Lost);
            }
        }
        let mut by_node: BTreeMap<String, Vec<ShardEpoch>> = BTreeMap::new();
        for &s in &pending {
            if let Some(a) = map.shards.get(s as usize) {
                if let Some(owner) = &a.owner {
                    by_node
                        .entry(owner.to_string())
                        .or_default()
                        .push(ShardEpoch {
                            shard: s,
                            epoch: a.epoch,
                        });
                }
            }
        }
        let requests = by_node.into_iter().map(|(node, list)| {
            let msg = JobTask {
                job: rec.id.clone(),
                spec: rec.spec.clone(),
                dataset: rec.dataset.clone(),
                step: at.step,
                phase: task.phase,
                shards: list.clone(),
                broadcast: task.broadcast.clone(),
                gen: at.gen,
                base: at.base,
                complete: at.complete,
                epochs: at.epochs.clone(),
            };
            let map_rx = map_rx.clone();
            async move {
                let ask = ask(ctx, &node, msg);
                tokio::select! {
                    r = ask => (list, Some(r)),
                    () = moved(map_rx, list.clone()) => (list, None),
                }
            }
        });
        let replies = futures::future::join_all(requests).await;
        let mut progressed = false;
        for (list, reply) in replies {
            let asked: BTreeSet<u32> = list.iter().map(|s| s.shard).collect();
            match reply {
                Some(Ok(p)) => {
                    if let Some(e) = p.error {
                        return Err(Stop::Failed(e));
                    }
                    if p.lost {
                        return Ok(Scattered::Lost);
                    }
                    let done: BTreeSet<u32> = p.done.iter().copied().collect();
                    let valid = done.len() == p.done.len()
                        && done.is_subset(&asked)
                        && done.is_subset(&pending);
                    if !valid {
                        warn!(job = %rec.id, "partial names shards it was not asked for; dropped");
                        continue;
                    }
                    let sum =
                        sums_from_wire(&p.sum, &p.wide).map_err(|e| Stop::Failed(e.to_string()))?;
                    let part = ExactSum {
                        rows: p.rows,
                        sum,
                        min: p.min,
                        max: p.max,
                    };
                    acc.merge(&part).map_err(|e| Stop::Failed(e.to_string()))?;
                    for s in &done {
                        pending.remove(s);
                    }
                    progressed |= !done.is_empty();
                    let refused = asked.len() - done.len();
                    metrics::counter!(m::JOB_RETRIES).increment(refused as u64);
                }
                Some(Err(e)) => {
                    metrics::counter!(m::JOB_RETRIES).increment(asked.len() as u64);
                    warn!(job = %rec.id, error = %e, "task not answered; retrying");
                }
                None => {
                    metrics::counter!(m::JOB_RETRIES).increment(asked.len() as u64);
                }
            }
        }
        if !pending.is_empty() {
            // Wait for the map to move the missing shards (or a short backoff), then retry.
            backoff = if progressed {
                Duration::from_millis(20)
            } else {
                (backoff * 2).min(Duration::from_millis(500))
            };
            let _ = tokio::time::timeout(backoff, map_rx.changed()).await;
        }
    }
}

async fn ask(ctx: &CoordinatorCtx, node: &str, task: JobTask) -> Result<JobPartial, AskError> {
    if node == ctx.me {
        return Ok(ctx.exec.run(task).await);
    }
    let link = ctx.router.transport().link(node).await?;
    let env = Envelope::new(
        &ctx.me,
        Dest::Node(node.to_string()),
        0,
        Body::JobTask(task),
    );
    let frame = link.request(env, TASK_TIMEOUT).await?;
    match frame.to_owned_envelope()?.body {
        Body::JobPartial(p) => Ok(p),
        Body::Error { code, message } => Err(AskError::Refused { code, message }),
        _ => Err(AskError::Unexpected),
    }
}

/// Resolves once any of `shards` has a different owner or epoch than when it was sent.
async fn moved(mut rx: watch::Receiver<Arc<ClusterMap>>, shards: Vec<ShardEpoch>) {
    let sent: Vec<(u32, Option<NodeId>, u64)> = {
        let map = rx.borrow_and_update();
        shards
            .iter()
            .map(|s| {
                let owner = map
                    .shards
                    .get(s.shard as usize)
                    .and_then(|a| a.owner.clone());
                (s.shard, owner, s.epoch)
            })
            .collect()
    };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let map = rx.borrow_and_update();
        let changed = sent.iter().any(|(s, owner, epoch)| {
            map.shards
                .get(*s as usize)
                .is_none_or(|a| a.owner != *owner || a.epoch != *epoch)
        });
        if changed {
            return;
        }
    }
}

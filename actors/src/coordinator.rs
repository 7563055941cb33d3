//! The JobCoordinator: drives one job step by step from the node that owns the job's
//! coordinator shard, so it fails over like any shard.
//!
//! Each step it scatters the job's task to the owners of all shards (one request per node,
//! naming that node's shards and their epochs), merges the nodes' pre-summed partials exactly,
//! and reduces. A shard refused (moved), or whose owner changed while its request was out, or
//! whose node did not answer, is re-sent to its current owner; a late answer from the old owner
//! is dropped with its request, so no shard is counted twice. The state is checkpointed (create-
//! once blobs, `jobs/{id}/ckpt/{step}`) every `checkpoint_every` steps and at the end; a new
//! coordinator resumes from the newest checkpoint and re-runs only the steps after it. Because
//! maps are pure and merging is exact, the re-run steps give bit-identical results.

mod scatter;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tidepool_runtime::admission;
use tidepool_runtime::control::{
    ClusterMap, Command, ControlPlane, JobRecord, JobState, JobUpdate,
};
use tidepool_runtime::jobspec::JobSpec;
use tidepool_runtime::metrics as m;
use tidepool_runtime::storage::Store;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::job_exec::JobExecutor;
use crate::jobs::job::{ExactSum, Task};
use crate::jobs::ps::ParamPhase;
use crate::jobs::registry::{ErasedJob, JobDriver};
use crate::router::Router;

/// How long one node may take for one step's task before it is asked again.
const TASK_TIMEOUT: Duration = Duration::from_secs(120);
/// Minimum interval between progress reports through the control plane.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Storage key of a job checkpoint after `step` steps.
pub fn checkpoint_key(job: &str, step: u64) -> String {
    format!("jobs/{job}/ckpt/{step:020}.json")
}

/// Storage prefix of a job's checkpoints (deleted once the job is over).
pub fn checkpoint_prefix(job: &str) -> String {
    format!("jobs/{job}/ckpt")
}

/// Checkpoints kept while a job runs: the newest, and the one before in case the newest is
/// damaged. Older ones are deleted as new ones are written, so a long job's do not pile up.
const CHECKPOINTS_KEPT: usize = 2;

/// Storage key of a finished job's result document.
pub fn result_key(job: &str) -> String {
    format!("jobs/{job}/result.json")
}

/// What a coordinator needs from its node.
#[derive(Clone, Debug)]
pub struct CoordinatorCtx {
    pub me: String,
    pub router: Router,
    pub control: ControlPlane,
    pub store: Store,
    pub exec: Arc<JobExecutor>,
}

/// Why a coordinator stopped before the job finished.
#[derive(Debug)]
enum Stop {
    /// This node no longer owns the coordinator shard: the new owner takes over.
    Moved,
    /// The job was cancelled.
    Cancelled,
    /// The job cannot go on.
    Failed(String),
}

/// Why a job task sent to a node got no partial back (the coordinator retries it).
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("cannot reach the node: {0}")]
    Transport(#[from] tidepool_runtime::transport::TransportError),
    #[error("the reply does not decode: {0}")]
    Codec(#[from] tidepool_runtime::codec::CodecError),
    #[error("refused ({code:?}): {message}")]
    Refused {
        code: tidepool_runtime::codec::ErrorCode,
        message: String,
    },
    #[error("unexpected reply to a job task")]
    Unexpected,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    step: u64,
    state: serde_json::Value,
}

/// Runs job `rec` until it finishes, fails, is cancelled, or its coordinator shard moves away.
pub async fn run(ctx: CoordinatorCtx, rec: JobRecord) {
    let id = rec.id.clone();
    let running = RunningGauge::new();
    let outcome = Coordinator::start(&ctx, &rec).await;
    let outcome = match outcome {
        Ok(mut c) => c.drive().await,
        Err(e) => Err(e),
    };
    drop(running);
    let (state, error) = match outcome {
        Ok(()) => return,
        Err(Stop::Moved) => {
            info!(job = %id, "coordinator shard moved; the new owner resumes the job");
            return;
        }
        Err(Stop::Cancelled) => {
            info!(job = %id, "job cancelled; coordinator stopped");
            metrics::counter!(m::JOBS_FINISHED, "state" => "cancelled").increment(1);
            return;
        }
        Err(Stop::Failed(e)) => (JobState::Failed, e),
    };
    warn!(job = %id, error = %error, "job failed");
    metrics::counter!(m::JOBS_FINISHED, "state" => "failed").increment(1);
    // (The failed report below may be the last thing this task does before the manager sees the
    // terminal state and aborts it; the counter is already counted.)
    let update = JobUpdate {
        error: Some(error),
        coordinator: Some(ctx.me.clone()),
        ..JobUpdate::state(state)
    };
    report(&ctx.control, &id, update).await;
}

/// Counts a running coordinator in `tidepool_jobs_running`, also when its task is aborted.
struct RunningGauge;

impl RunningGauge {
    fn new() -> Self {
        metrics::gauge!(m::JOBS_RUNNING).increment(1.0);
        RunningGauge
    }
}

impl Drop for RunningGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::JOBS_RUNNING).decrement(1.0);
    }
}

async fn report(control: &ControlPlane, id: &str, update: JobUpdate) -> bool {
    let cmd = Command::UpdateJob {
        id: id.to_string(),
        update,
    };
    match control.propose(cmd).await {
        Ok(r) => r.is_ok(),
        Err(e) => {
            warn!(job = %id, error = %e, "job progress not recorded");
            false
        }
    }
}

struct Coordinator<'a> {
    ctx: &'a CoordinatorCtx,
    rec: JobRecord,
    spec: JobSpec,
    driver: Box<dyn JobDriver>,
    step: u64,
    map_rx: watch::Receiver<Arc<ClusterMap>>,
    /// Parameter-server jobs: the tables' generation (above every earlier coordinator's: its
    /// high bits are the coordinator shard's epoch) and the train step it starts from.
    gen: u64,
    base: u64,
    /// Parameter-server jobs: every shard's epoch when this generation started (empty until
    /// the first step of a generation reads them; always empty for other jobs).
    gen_epochs: Vec<u64>,
    /// Whether the job keeps its model in the shards' parameter tables.
    params: bool,
    job: Arc<dyn ErasedJob>,
    /// `ssp`: train steps that may run ahead of the oldest unreduced one (0: `sync`).
    staleness: u64,
}

/// Steps sent ahead under `ssp` (their tasks, and their scatters in the same order).
#[derive(Default)]
struct Ahead<'a> {
    tasks: std::collections::VecDeque<Task>,
    running: futures::stream::FuturesOrdered<StepFuture<'a>>,
}

type StepFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Scattered, Stop>> + Send + 'a>>;

/// What one step's scatter gave.
enum Scattered {
    /// Every shard's partial, merged.
    Done(ExactSum),
    /// A parameter table's rows were lost with its owner: roll back.
    Lost,
}

impl<'a> Coordinator<'a> {
    async fn start(ctx: &'a CoordinatorCtx, rec: &JobRecord) -> Result<Coordinator<'a>, Stop> {
        let spec = JobSpec::parse(&rec.spec).map_err(|e| Stop::Failed(e.to_string()))?;
        let map = ctx.router.map();
        let ds = map
            .datasets
            .get(&rec.dataset)
            .ok_or_else(|| Stop::Failed(format!("dataset {:?} is gone", rec.dataset)))?;
        // Admission again, with this node's limits: a job recorded as running that cannot run
        // here (limits lowered, or admitted by a node with larger ones) fails with the reason
        // instead of putting every node that maps it into a crash loop.
        let limits = ctx.exec.limits();
        let admitted = spec
            .check_caps(ds.rows, &limits.caps)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                admission::admit_job(
                    &spec,
                    rec.spec.len() as u64,
                    &crate::admin_checks::data_shape(ds),
                    map.shard_count(),
                    &limits.admission,
                )
                .map(|_| ())
                .map_err(|e| e.to_string())
            });
        if let Err(e) = admitted {
            metrics::counter!(m::JOB_ADMISSIONS_REFUSED, "stage" => "start").increment(1);
            return Err(Stop::Failed(format!("not admitted on {}: {e}", ctx.me)));
        }
        let job = ctx
            .exec
            .job(&rec.id, &rec.spec, ds)
            .map_err(|e| Stop::Failed(e.to_string()))?;
        let params = job.param_model().is_some();
        let mut driver = job.clone().driver();
        let mut step = 0;
        let ckpts = ctx
            .store
            .list_blobs(&checkpoint_prefix(&rec.id))
            .await
            .map_err(|e| Stop::Failed(format!("listing checkpoints: {e}")))?;
        // Newest valid checkpoint; a damaged one falls back to the one before.
        for key in ckpts.iter().rev() {
            match ctx.store.get_blob(key).await {
                Ok(Some(bytes)) => match serde_json::from_slice::<Checkpoint>(&bytes) {
                    Ok(c) if driver.restore(c.state.clone()).is_ok() => {
                        step = c.step;
                        metrics::counter!(m::JOB_RESUMES).increment(1);
                        info!(job = %rec.id, step, "resuming from checkpoint");
                        break;
                    }
                    _ => warn!(job = %rec.id, %key, "unusable checkpoint skipped"),
                },
                Ok(None) => {}
                Err(e) => warn!(job = %rec.id, %key, error = %e, "unreadable checkpoint skipped"),
            }
        }
        let epoch = map
            .shards
            .get(rec.coordinator_shard as usize)
            .map_or(0, |a| a.epoch);
        let base = driver.base();
        let staleness = if params { spec.staleness } else { 0 };
        Ok(Coordinator {
            ctx,
            rec: rec.clone(),
            spec,
            driver,
            step,
            map_rx: ctx.control.map(),
            gen: epoch << 20,
            base,
            gen_epochs: Vec::new(),
            params,
            job,
            staleness,
        })
    }

    fn check(&self) -> Result<(), Stop> {
        scatter::check(self.ctx, &self.rec)
    }

    async fn checkpoint(&self) -> Result<(), Stop> {
        let state = self
            .driver
            .checkpoint()
            .map_err(|e| Stop::Failed(e.to_string()))?;
        let body = serde_json::to_vec(&Checkpoint {
            step: self.step,
            state,
        })
        .map_err(|e| Stop::Failed(e.to_string()))?;
        // Still the owner? A stale coordinator must not write (and could not differ anyway:
        // the state after `step` steps is deterministic, and blobs are create-once).
        self.check()?;
        self.ctx
            .store
            .put_blob(&checkpoint_key(&self.rec.id, self.step), Bytes::from(body))
            .await
            .map_err(|e| Stop::Failed(format!("checkpoint: {e}")))?;
        metrics::counter!(m::JOB_CHECKPOINTS).increment(1);
        self.prune_checkpoints().await;
        Ok(())
    }

    /// Deletes all but the newest [`CHECKPOINTS_KEPT`] checkpoints (best effort: a leftover is
    /// only space, and is deleted with the rest when the job ends).
    async fn prune_checkpoints(&self) {
        let prefix = checkpoint_prefix(&self.rec.id);
        let Ok(keys) = self.ctx.store.list_blobs(&prefix).await else {
            return;
        };
        for key in keys.iter().rev().skip(CHECKPOINTS_KEPT) {
            if let Err(e) = self.ctx.store.delete_blob(key).await {
                warn!(job = %self.rec.id, %key, error = %e, "old checkpoint not deleted");
            }
        }
    }

    async fn drive(&mut self) -> Result<(), Stop> {
        let kind = self.spec.kind.as_str();
        self.check()?;
        let running = JobUpdate {
            steps: Some(self.driver.planned_steps()),
            step: Some(self.step),
            coordinator: Some(self.ctx.me.clone()),
            ..JobUpdate::state(JobState::Running)
        };
        if !report(&self.ctx.control, &self.rec.id, running).await {
            self.check()?;
        }
        let mut last_report = Instant::now();
        let mut window_rows = 0u64;
        let mut loss = None;
        let mut ahead = Ahead::default();
        while let Some(task) = self.driver.next_task() {
            self.check()?;
            let started = Instant::now();
            let result = if self.staleness > 0 {
                self.pipelined(&task, &mut ahead).await?
            } else {
                let complete = self.complete_at(&task);
                self.scatter(&task, complete).await?
            };
            let merged = match result {
                Scattered::Done(m) => m,
                Scattered::Lost => {
                    ahead = Ahead::default();
                    self.base = self.driver.rollback();
                    self.gen += 1;
                    self.gen_epochs.clear();
                    metrics::counter!(m::JOB_ROLLBACKS).increment(1);
                    info!(job = %self.rec.id, base = self.base, gen = self.gen, "parameter rows lost with a shard's owner; rolled back to the saved tables");
                    continue;
                }
            };
            let rep = self
                .driver
                .reduce(&task, merged.to_partial())
                .map_err(|e| Stop::Failed(e.to_string()))?;
            // Tables saved: a rollback now goes back only to here, and a new coordinator must
            // resume from a state that knows it.
            let saved = self.driver.base();
            let tables_saved = saved != self.base;
            self.base = saved;
            self.step += 1;
            window_rows += rep.rows;
            loss = rep.loss.or(loss);
            metrics::counter!(m::JOB_STEPS, "kind" => kind).increment(1);
            metrics::counter!(m::JOB_SAMPLES, "kind" => kind).increment(rep.rows);
            metrics::histogram!(m::JOB_STEP_SECONDS, "kind" => kind)
                .record(started.elapsed().as_secs_f64());
            if let Some(l) = rep.loss {
                metrics::gauge!(m::JOB_LOSS, "kind" => kind).set(l);
            }
            let ckpt = self.step % self.spec.checkpoint_every == 0 || tables_saved;
            if ckpt {
                self.checkpoint().await?;
            }
            if ckpt || last_report.elapsed() >= PROGRESS_EVERY {
                let secs = last_report.elapsed().as_secs_f64().max(1e-9);
                let update = JobUpdate {
                    step: Some(self.step),
                    steps: Some(self.driver.planned_steps()),
                    loss,
                    samples_per_sec: Some(window_rows as f64 / secs),
                    coordinator: Some(self.ctx.me.clone()),
                    ..JobUpdate::state(JobState::Running)
                };
                report(&self.ctx.control, &self.rec.id, update).await;
                (last_report, window_rows) = (Instant::now(), 0);
            }
        }
        self.checkpoint().await?;
        let result = self
            .driver
            .result()
            .map_err(|e| Stop::Failed(e.to_string()))?;
        let body = serde_json::to_vec_pretty(&result).map_err(|e| Stop::Failed(e.to_string()))?;
        self.ctx
            .store
            .put_blob(&result_key(&self.rec.id), Bytes::from(body))
            .await
            .map_err(|e| Stop::Failed(format!("result: {e}")))?;
        let done = JobUpdate {
            step: Some(self.step),
            steps: Some(self.step),
            loss,
            coordinator: Some(self.ctx.me.clone()),
            ..JobUpdate::state(JobState::Succeeded)
        };
        // Counted before the report: the manager aborts this task once the map shows the job
        // finished, which can be before `report` returns.
        metrics::counter!(m::JOBS_FINISHED, "state" => "succeeded").increment(1);
        if report(&self.ctx.control, &self.rec.id, done).await {
            info!(job = %self.rec.id, steps = self.step, "job succeeded");
        }
        Ok(())
    }

    /// `ssp`: the result of `task` (the driver's next), with up to `staleness` later train
    /// steps in flight beside it. Every step in flight names as `complete` the train steps
    /// reduced when it was sent, so its reads lack at most the `staleness` steps before it.
    async fn pipelined(&mut self, task: &Task, ahead: &mut Ahead<'a>) -> Result<Scattered, Stop> {
        if ahead.tasks.front() != Some(task) {
            // Not what was sent ahead (a save, the statistics pass, a rollback): start afresh.
            *ahead = Ahead::default();
        }
        if self.params && self.gen_epochs.is_empty() {
            let map = self.map_rx.borrow_and_update().clone();
            self.gen_epochs = map.shards.iter().map(|a| a.epoch).collect();
        }
        let complete = self.complete_at(task);
        while ahead.tasks.len() as u64 <= self.staleness {
            let k = ahead.tasks.len() as u64;
            let next = if k == 0 {
                Some(task.clone())
            } else {
                self.driver.task_ahead(k)
            };
            let Some(next) = next else { break };
            let at = scatter::StepAt {
                step: self.step + k,
                gen: self.gen,
                base: self.base,
                complete,
                epochs: self.gen_epochs.clone(),
            };
            let (ctx, rec, rx, t) = (
                self.ctx,
                self.rec.clone(),
                self.map_rx.clone(),
                next.clone(),
            );
            ahead.running.push_back(Box::pin(async move {
                scatter::scatter(ctx, &rec, rx, &t, at).await
            }));
            ahead.tasks.push_back(next);
        }
        ahead.tasks.pop_front();
        match ahead.running.next().await {
            Some(r) => r,
            None => Err(Stop::Failed("no step in flight".into())),
        }
    }

    /// The train steps fully reduced when `task` runs alone (it is the next one).
    fn complete_at(&self, task: &Task) -> u64 {
        match self.job.param_model().map(|m| m.phase(task)) {
            Some(ParamPhase::Train { step } | ParamPhase::Save { step, .. }) => step,
            _ => 0,
        }
    }

    /// One step over every shard at the coordinator's step: the exact merge of all shards'
    /// partials (for a parameter-server job, `complete` is the train steps fully reduced).
    async fn scatter(&mut self, task: &Task, complete: u64) -> Result<Scattered, Stop> {
        if self.params && self.gen_epochs.is_empty() {
            let map = self.map_rx.borrow_and_update().clone();
            self.gen_epochs = map.shards.iter().map(|a| a.epoch).collect();
        }
        let at = scatter::StepAt {
            step: self.step,
            gen: self.gen,
            base: self.base,
            complete,
            epochs: self.gen_epochs.clone(),
        };
        scatter::scatter(self.ctx, &self.rec, self.map_rx.clone(), task, at).await
    }
}

//! From a job spec to a runnable job: the built-in kinds, type-erased so the node's executor
//! and the coordinator handle every [`Job`] the same way.
//!
//! A user-defined job implements [`Job`] and gets a kind name here (one match arm in
//! [`build`]); everything else (placement, exact merging, retries on moved shards,
//! checkpoints, the CLI) comes with it.

use std::sync::Arc;

use tidepool_runtime::control::DatasetRecord;
use tidepool_runtime::jobspec::{JobKind, JobSpec};

use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};
use super::kmeans_job::KMeansJob;
use super::mf::MfJob;
use super::ps::{ParamModel, ParamPhase, ParamTable, Rows};
use super::ps_linear::PsLinearJob;
use super::stats_job::StatsJob;
use super::train::{DatasetShape, TrainJob};

/// A job with its state, driven step by step by the coordinator.
pub trait JobDriver: Send + Sync {
    /// Replaces the state with a checkpointed one.
    fn restore(&mut self, state: serde_json::Value) -> Result<(), JobError>;
    /// The state to checkpoint.
    fn checkpoint(&self) -> Result<serde_json::Value, JobError>;
    fn next_task(&self) -> Option<Task>;
    fn reduce(&mut self, task: &Task, merged: Partial) -> Result<StepReport, JobError>;
    fn planned_steps(&self) -> u64;
    fn result(&self) -> Result<serde_json::Value, JobError>;
    /// [`Job::rollback`].
    fn rollback(&mut self) -> u64;
    /// [`Job::base`].
    fn base(&self) -> u64;
    /// [`Job::task_ahead`].
    fn task_ahead(&self, k: u64) -> Option<Task>;
}

/// A job, type-erased.
pub trait ErasedJob: Send + Sync {
    /// [`Job::map`].
    fn map(&self, step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError>;
    /// A driver starting from the initial state.
    fn driver(self: Arc<Self>) -> Box<dyn JobDriver>;
    /// [`Job::param_model`].
    fn param_model(&self) -> Option<&dyn ParamModel>;
}

struct Driven<J: Job> {
    job: Arc<J>,
    state: J::State,
}

fn json_error(e: serde_json::Error) -> JobError {
    JobError::Data(format!("job state: {e}"))
}

impl<J: Job> JobDriver for Driven<J> {
    fn restore(&mut self, state: serde_json::Value) -> Result<(), JobError> {
        self.state = serde_json::from_value(state).map_err(json_error)?;
        Ok(())
    }
    fn checkpoint(&self) -> Result<serde_json::Value, JobError> {
        serde_json::to_value(&self.state).map_err(json_error)
    }
    fn next_task(&self) -> Option<Task> {
        self.job.next_task(&self.state)
    }
    fn reduce(&mut self, task: &Task, merged: Partial) -> Result<StepReport, JobError> {
        self.job.reduce(&mut self.state, task, merged)
    }
    fn planned_steps(&self) -> u64 {
        self.job.planned_steps(&self.state)
    }
    fn result(&self) -> Result<serde_json::Value, JobError> {
        self.job.result(&self.state)
    }
    fn rollback(&mut self) -> u64 {
        self.job.rollback(&mut self.state)
    }
    fn base(&self) -> u64 {
        self.job.base(&self.state)
    }
    fn task_ahead(&self, k: u64) -> Option<Task> {
        self.job.task_ahead(&self.state, k)
    }
}

impl<J: Job> ErasedJob for J {
    fn map(&self, step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError> {
        Job::map(self, step, task, data)
    }
    fn driver(self: Arc<Self>) -> Box<dyn JobDriver> {
        let state = self.init();
        Box::new(Driven { job: self, state })
    }
    fn param_model(&self) -> Option<&dyn ParamModel> {
        Job::param_model(self)
    }
}

/// The runnable job `id` for `spec` over dataset `ds`.
pub fn build(id: &str, spec: &JobSpec, ds: &DatasetRecord) -> Result<Arc<dyn ErasedJob>, JobError> {
    let shape = DatasetShape {
        // A sparse dataset's names (`f{index}`) are built here, once per job and node.
        features: ds.feature_names(),
        label: ds.label.clone(),
        rows: ds.rows,
    };
    Ok(match spec.kind {
        JobKind::Sgd if spec.on_params() => Arc::new(PsLinearJob::new(
            id,
            spec.clone(),
            ds.feature_count() as u64,
            ds.rows,
            ds.shards,
        )?),
        JobKind::Sgd | JobKind::LocalSgd => Arc::new(TrainJob::new(id, spec.clone(), shape)?),
        JobKind::Kmeans => Arc::new(KMeansJob::new(spec.clone(), ds.features.len(), ds.shards)),
        JobKind::Stats => Arc::new(StatsJob::new(&ds.features, &ds.label, spec.bins)),
        JobKind::Mf => Arc::new(MfJob::new(
            id,
            spec.clone(),
            &ds.features,
            ds.rows,
            ds.shards,
        )?),
    })
}

/// Runs a job to completion in this process over in-memory shards (tests, the benchmark's
/// single-process peer, and a reference for the distributed run: same maps, same exact
/// merging, so the same result).
pub fn run_local(
    job: Arc<dyn ErasedJob>,
    shards: &[ShardData<'_>],
) -> Result<serde_json::Value, JobError> {
    run_local_tables(job, shards).map(|(result, _)| result)
}

/// [`run_local`], also returning a parameter-server job's tables (one per shard, all of them
/// in this process; empty for other jobs).
pub fn run_local_tables(
    job: Arc<dyn ErasedJob>,
    shards: &[ShardData<'_>],
) -> Result<(serde_json::Value, Vec<ParamTable>), JobError> {
    let mut driver = job.clone().driver();
    let mut step = 0;
    let count = shards.len() as u32;
    let mut tables: Vec<ParamTable> = match job.param_model() {
        Some(_) => (0..count).map(|_| ParamTable::new(0)).collect(),
        None => Vec::new(),
    };
    let table_err = |e: super::ps::TableError| JobError::Data(e.to_string());
    while let Some(task) = driver.next_task() {
        let mut acc = super::job::ExactSum::default();
        let phase = job
            .param_model()
            .map_or(ParamPhase::Map, |m| m.phase(&task));
        match (phase, job.param_model()) {
            (ParamPhase::Train { step: t }, Some(model)) => {
                let mut pushes = Vec::new();
                for data in shards {
                    let batch = model.batch(t, &task, data)?;
                    // Pull each key from its shard's table.
                    let mut values = Vec::new();
                    for &k in &batch.keys {
                        let table = &mut tables[super::ps::shard_of(k, count) as usize];
                        table.pull(model, t, &[k], &mut values).map_err(table_err)?;
                    }
                    let rows = Rows::new(model, &batch.keys, &values)?;
                    let (partial, grads) = model.grads(&task, data, &batch, &rows)?;
                    acc.add(&partial)?;
                    pushes.push((data.shard, batch.keys, grads));
                }
                for (source, keys, grads) in pushes {
                    let offs = super::ps::offsets(model, &keys);
                    let mut by_shard: std::collections::BTreeMap<u32, (Vec<u64>, Vec<f32>)> =
                        Default::default();
                    for (i, &k) in keys.iter().enumerate() {
                        let e = by_shard.entry(super::ps::shard_of(k, count)).or_default();
                        e.0.push(k);
                        e.1.extend_from_slice(&grads[offs[i]..offs[i + 1]]);
                    }
                    for (s, (keys, grads)) in by_shard {
                        tables[s as usize]
                            .push(model, (t, t), source, &keys, &grads)
                            .map_err(table_err)?;
                    }
                }
            }
            (ParamPhase::Save { step: t, .. }, Some(model)) => {
                for table in &mut tables {
                    table.advance(model, t).map_err(table_err)?;
                }
            }
            _ => {
                for data in shards {
                    acc.add(&job.map(step, &task, data)?)?;
                }
            }
        }
        driver.reduce(&task, acc.to_partial())?;
        step += 1;
    }
    Ok((driver.result()?, tables))
}

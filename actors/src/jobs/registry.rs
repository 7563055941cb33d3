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
}

/// A job, type-erased.
pub trait ErasedJob: Send + Sync {
    /// [`Job::map`].
    fn map(&self, step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError>;
    /// A driver starting from the initial state.
    fn driver(self: Arc<Self>) -> Box<dyn JobDriver>;
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
}

impl<J: Job> ErasedJob for J {
    fn map(&self, step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError> {
        Job::map(self, step, task, data)
    }
    fn driver(self: Arc<Self>) -> Box<dyn JobDriver> {
        let state = self.init();
        Box::new(Driven { job: self, state })
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
        JobKind::Sgd | JobKind::LocalSgd => Arc::new(TrainJob::new(id, spec.clone(), shape)?),
        JobKind::Kmeans => Arc::new(KMeansJob::new(spec.clone(), ds.features.len(), ds.shards)),
        JobKind::Stats => Arc::new(StatsJob::new(&ds.features, &ds.label, spec.bins)),
    })
}

/// Runs a job to completion in this process over in-memory shards (tests, the benchmark's
/// single-process peer, and a reference for the distributed run: same maps, same exact
/// merging, so the same result).
pub fn run_local(
    job: Arc<dyn ErasedJob>,
    shards: &[ShardData<'_>],
) -> Result<serde_json::Value, JobError> {
    let mut driver = job.clone().driver();
    let mut step = 0;
    while let Some(task) = driver.next_task() {
        let mut acc = super::job::ExactSum::default();
        for data in shards {
            acc.add(&job.map(step, &task, data)?)?;
        }
        driver.reduce(&task, acc.to_partial())?;
        step += 1;
    }
    driver.result()
}

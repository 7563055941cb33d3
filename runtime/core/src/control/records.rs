//! Dataset and job records in the replicated cluster map, and the pure functions that apply
//! their commands.
//!
//! A dataset becomes visible only when its record commits ([`put_dataset`]): the import writes
//! every partition to storage first, under a fresh import id, so a failed import leaves no
//! record (and its objects are deleted by the importer). Job records are created once
//! ([`submit_job`]) and then updated by the job's coordinator ([`update_job`]): steps never go
//! back and a terminal state is final, so a stale coordinator (one whose shard moved) cannot
//! resurrect or rewind a job.

use serde::{Deserialize, Serialize};

use super::types::{ClusterMap, CommandResponse};

/// Where a dataset's rows come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum DatasetSource {
    /// Imported from a CSV: per shard, `segments[shard]` partition objects under
    /// `datasets/{name}/{import}/`.
    Imported {
        /// The import's unique id (its storage prefix).
        import: String,
        /// Partition objects per shard (index = shard id).
        segments: Vec<u32>,
    },
    /// Generated on each shard's owner from a seed (large benchmark runs): row `i` of the table
    /// belongs to shard `shard_for_key(i)`; nothing is stored.
    Synthetic {
        /// "linear" | "logistic".
        kind: String,
        seed: u64,
    },
    /// Read by the cluster from object storage (see [`super::imports`]): split `i` (read into
    /// shard `splits[i].0`) wrote `splits[i].1` partition objects under
    /// `datasets/{name}/{import}/`; a shard's partition is its splits' rows in split order.
    Ingested {
        /// The import's id (its storage prefix).
        import: String,
        /// Where the rows came from.
        url: String,
        /// Per split: (shard, segments).
        splits: Vec<(u32, u32)>,
        /// Content checksum ([`super::imports::ImportRecord::checksum`]).
        checksum: u64,
        /// `fill_mean` imports: per feature, the value a null (stored as NaN) stands for;
        /// empty otherwise.
        #[serde(default)]
        fill: Vec<f32>,
        /// Sparse (libsvm) imports: the columns and stored entries; the record's `features`
        /// is then empty (there may be millions of columns).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sparse: Option<SparseShape>,
    },
}

/// The shape of a sparse (CSR) dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseShape {
    /// Columns: the largest feature index seen, plus one (after the index base).
    pub columns: u64,
    /// Stored (non-zero) entries over every row.
    pub nnz: u64,
    /// The index the source's first column has: 1 (libsvm's convention) or 0.
    pub first_index: u32,
}

/// A dataset known to the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    pub name: String,
    /// Feature column names, in order.
    pub features: Vec<String>,
    /// The label column's name.
    pub label: String,
    /// Total rows.
    pub rows: u64,
    /// Shard count the rows were partitioned for (the cluster's).
    pub shards: u32,
    #[serde(flatten)]
    pub source: DatasetSource,
}

impl DatasetRecord {
    /// The sparse shape, for a sparse (libsvm) dataset.
    pub fn sparse(&self) -> Option<&SparseShape> {
        match &self.source {
            DatasetSource::Ingested { sparse, .. } => sparse.as_ref(),
            _ => None,
        }
    }

    /// Features per row: the named columns, or a sparse dataset's column count.
    pub fn feature_count(&self) -> usize {
        match self.sparse() {
            Some(s) => usize::try_from(s.columns).unwrap_or(usize::MAX),
            None => self.features.len(),
        }
    }

    /// Feature names: the named columns, or for a sparse dataset the source's indices as
    /// `f{index}` (built on demand; a sparse record does not list them).
    pub fn feature_names(&self) -> Vec<String> {
        match self.sparse() {
            Some(s) => (0..s.columns)
                .map(|j| format!("f{}", j + u64::from(s.first_index)))
                .collect(),
            None => self.features.clone(),
        }
    }
}

/// A job's lifecycle state; `--json` names are the lowercase variant names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// The stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed and cancelled are final.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A job in the cluster map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// The job spec as submitted (TOML text).
    pub spec: String,
    /// "sgd" | "local_sgd" | "kmeans" | "stats".
    pub kind: String,
    pub dataset: String,
    /// The shard whose owner runs the job's coordinator.
    pub coordinator_shard: u32,
    pub state: JobState,
    /// Steps completed.
    pub step: u64,
    /// Total steps planned (an upper bound for k-means, which may converge earlier).
    pub steps: u64,
    /// Latest loss (objective, inertia, ...), if any.
    pub loss: Option<f64>,
    /// Rows processed per second over the last progress interval.
    pub samples_per_sec: Option<f64>,
    /// The node running the coordinator at the last update.
    pub coordinator: Option<String>,
    /// Why the job failed.
    pub error: Option<String>,
    /// Submission order (the Raft log index is not visible to `apply`): job ids sort by it.
    pub submitted_seq: u64,
}

/// A coordinator's report; fields left `None` keep their value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobUpdate {
    pub state: Option<JobState>,
    pub step: Option<u64>,
    pub steps: Option<u64>,
    pub loss: Option<f64>,
    pub samples_per_sec: Option<f64>,
    pub coordinator: Option<String>,
    pub error: Option<String>,
}

impl JobUpdate {
    /// An update that only changes the state.
    pub fn state(state: JobState) -> Self {
        JobUpdate {
            state: Some(state),
            step: None,
            steps: None,
            loss: None,
            samples_per_sec: None,
            coordinator: None,
            error: None,
        }
    }
}

/// The Raft leader's latest autoscaling recommendation, as `cluster status` shows it. Written
/// when the recommended count changes (and refreshed now and then), never on every sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    pub desired: u32,
    pub current: u32,
    pub utilization: f64,
    pub backlog: f64,
    /// Why: the driving signal against its target, and any stabilisation hold.
    pub reason: String,
    /// The leader that computed it.
    pub by: String,
}

/// Creates a dataset record. Names are unique: a second import under the same name is
/// `Rejected` unless it is the same record (a retried proposal).
pub(super) fn put_dataset(map: &mut ClusterMap, rec: &DatasetRecord) -> CommandResponse {
    if rec.name.is_empty() {
        return CommandResponse::Rejected("dataset name is empty".into());
    }
    if rec.shards != map.shard_count() {
        return CommandResponse::Rejected(format!(
            "dataset {:?} was partitioned for {} shards, the cluster has {}",
            rec.name,
            rec.shards,
            map.shard_count()
        ));
    }
    match map.datasets.get(&rec.name) {
        Some(existing) if existing == rec => CommandResponse::Ok,
        Some(_) => CommandResponse::Rejected(format!("dataset {:?} already exists", rec.name)),
        None => {
            map.datasets.insert(rec.name.clone(), rec.clone());
            CommandResponse::Ok
        }
    }
}

/// Creates a job record (state `Pending`). The same record again is `Ok` (a retry); another
/// record under the same id is `Rejected`.
pub(super) fn submit_job(map: &mut ClusterMap, rec: &JobRecord) -> CommandResponse {
    if !map.datasets.contains_key(&rec.dataset) {
        return CommandResponse::Rejected(format!("no dataset {:?}", rec.dataset));
    }
    if rec.coordinator_shard >= map.shard_count() {
        return CommandResponse::Rejected(format!(
            "coordinator shard {} out of range",
            rec.coordinator_shard
        ));
    }
    match map.jobs.get(&rec.id) {
        Some(existing) if existing.spec == rec.spec && existing.dataset == rec.dataset => {
            CommandResponse::Ok
        }
        Some(_) => CommandResponse::Rejected(format!("job {:?} already exists", rec.id)),
        None => {
            map.jobs.insert(rec.id.clone(), rec.clone());
            CommandResponse::Ok
        }
    }
}

/// Removes a dataset record. Deleting a dataset that is not there is `Ok` (a retried proposal);
/// one that a pending or running job still reads is `Rejected`, naming the job: its shards would
/// lose their partitions mid-run. Terminal jobs keep their records (and results).
pub(super) fn delete_dataset(map: &mut ClusterMap, name: &str) -> CommandResponse {
    if let Some(job) = map
        .jobs
        .values()
        .find(|j| j.dataset == name && !j.state.is_terminal())
    {
        return CommandResponse::Rejected(format!(
            "dataset {name:?} is used by job {} ({}); cancel it first",
            job.id,
            job.state.as_str()
        ));
    }
    map.datasets.remove(name);
    CommandResponse::Ok
}

/// Applies a coordinator's (or a cancel's) update. `Rejected` for an unknown job, for any
/// update of a job already in a terminal state (unless it restates that state), and for a step
/// that goes back.
pub(super) fn update_job(map: &mut ClusterMap, id: &str, up: &JobUpdate) -> CommandResponse {
    let Some(job) = map.jobs.get_mut(id) else {
        return CommandResponse::Rejected(format!("no job {id:?}"));
    };
    if job.state.is_terminal() {
        return if up.state == Some(job.state) {
            CommandResponse::Ok
        } else {
            CommandResponse::Rejected(format!("job {id:?} is already {}", job.state.as_str()))
        };
    }
    if let Some(step) = up.step.filter(|&s| s < job.step) {
        return CommandResponse::Rejected(format!(
            "job {id:?}: step {step} would go back from {}",
            job.step
        ));
    }
    if let Some(s) = up.state {
        job.state = s;
    }
    if let Some(s) = up.step {
        job.step = s;
    }
    if let Some(s) = up.steps {
        job.steps = s;
    }
    if up.loss.is_some() {
        job.loss = up.loss;
    }
    if up.samples_per_sec.is_some() {
        job.samples_per_sec = up.samples_per_sec;
    }
    if up.coordinator.is_some() {
        job.coordinator.clone_from(&up.coordinator);
    }
    if up.error.is_some() {
        job.error.clone_from(&up.error);
    }
    CommandResponse::Ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::types::{apply, Command};

    fn map_with_dataset() -> ClusterMap {
        let mut map = ClusterMap::default();
        assert!(apply(&mut map, &Command::Init { shards: 4 }).is_ok());
        let ds = DatasetRecord {
            name: "d".into(),
            features: vec!["a".into()],
            label: "y".into(),
            rows: 10,
            shards: 4,
            source: DatasetSource::Imported {
                import: "i1".into(),
                segments: vec![1; 4],
            },
        };
        assert!(apply(&mut map, &Command::PutDataset(Box::new(ds.clone()))).is_ok());
        // Same record again: a retried proposal.
        assert!(apply(&mut map, &Command::PutDataset(Box::new(ds.clone()))).is_ok());
        let other = DatasetRecord { rows: 11, ..ds };
        assert!(!apply(&mut map, &Command::PutDataset(Box::new(other))).is_ok());
        map
    }

    fn job(id: &str) -> JobRecord {
        JobRecord {
            id: id.into(),
            spec: "[job]".into(),
            kind: "sgd".into(),
            dataset: "d".into(),
            coordinator_shard: 1,
            state: JobState::Pending,
            step: 0,
            steps: 10,
            loss: None,
            samples_per_sec: None,
            coordinator: None,
            error: None,
            submitted_seq: 1,
        }
    }

    fn update(map: &mut ClusterMap, id: &str, up: JobUpdate) -> bool {
        apply(
            map,
            &Command::UpdateJob {
                id: id.into(),
                update: up,
            },
        )
        .is_ok()
    }

    #[test]
    fn jobs_need_a_dataset_and_unique_ids() {
        let mut map = map_with_dataset();
        assert!(apply(&mut map, &Command::SubmitJob(job("j"))).is_ok());
        assert!(
            apply(&mut map, &Command::SubmitJob(job("j"))).is_ok(),
            "retry"
        );
        let mut clash = job("j");
        clash.spec = "other".into();
        assert!(!apply(&mut map, &Command::SubmitJob(clash)).is_ok());
        let mut missing = job("k");
        missing.dataset = "nope".into();
        assert!(!apply(&mut map, &Command::SubmitJob(missing)).is_ok());
    }

    #[test]
    fn a_dataset_in_use_is_not_deleted() {
        let mut map = map_with_dataset();
        assert!(apply(&mut map, &Command::SubmitJob(job("j"))).is_ok());
        let delete = Command::DeleteDataset { name: "d".into() };
        let refused = apply(&mut map, &delete);
        assert!(
            matches!(&refused, CommandResponse::Rejected(r) if r.contains("job j")),
            "{refused:?}"
        );
        assert!(map.datasets.contains_key("d"));
        assert!(update(&mut map, "j", JobUpdate::state(JobState::Cancelled)));
        assert!(apply(&mut map, &delete).is_ok());
        assert!(!map.datasets.contains_key("d"));
        assert!(apply(&mut map, &delete).is_ok(), "retry");
        assert!(
            !apply(&mut map, &Command::SubmitJob(job("k"))).is_ok(),
            "no jobs on a deleted dataset"
        );
    }

    #[test]
    fn steps_never_go_back_and_terminal_states_are_final() {
        let mut map = map_with_dataset();
        assert!(apply(&mut map, &Command::SubmitJob(job("j"))).is_ok());
        let progress = |step| JobUpdate {
            step: Some(step),
            ..JobUpdate::state(JobState::Running)
        };
        assert!(update(&mut map, "j", progress(5)));
        assert!(!update(&mut map, "j", progress(4)), "stale coordinator");
        assert_eq!(map.jobs["j"].step, 5);
        assert!(update(&mut map, "j", JobUpdate::state(JobState::Cancelled)));
        assert!(!update(&mut map, "j", progress(6)), "no resurrection");
        assert!(update(&mut map, "j", JobUpdate::state(JobState::Cancelled)));
        assert_eq!(map.jobs["j"].state, JobState::Cancelled);
        assert!(!update(&mut map, "x", progress(1)), "unknown job");
    }
}

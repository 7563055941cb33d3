//! Dataset and job administration on a node (the `dataset` and `job` CLI commands), and the
//! job manager that runs a coordinator for every unfinished job whose coordinator shard this
//! node serves.
//!
//! Imports: the CLI uploads every partition segment ([`JobAdmin::dataset_part`], validated
//! and stored create-once under the import's own prefix) and then commits the dataset record
//! through Raft; a dataset is visible only after the commit, and a failed commit (or an
//! explicit abort) deletes the import's objects, so nothing half-imported is left behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tidepool_runtime::codec::{AdminOp, DatasetPart, ErrorCode};
use tidepool_runtime::control::{
    ClusterMap, Command, ControlPlane, DatasetRecord, DatasetSource, JobRecord, JobState, JobUpdate,
};
use tidepool_runtime::dataset::PartitionView;
use tidepool_runtime::jobspec::JobSpec;
use tidepool_runtime::metrics as m;
use tidepool_runtime::placement::shard_for_key;
use tidepool_runtime::storage::Store;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::coordinator::{self, result_key, CoordinatorCtx};
use crate::job_exec::{import_prefix, segment_key};

/// An admin error: code plus a message for the user.
pub type AdminError = (ErrorCode, String);

fn bad(msg: impl Into<String>) -> AdminError {
    (ErrorCode::BadRequest, msg.into())
}

fn internal(msg: impl std::fmt::Display) -> AdminError {
    (ErrorCode::Internal, msg.to_string())
}

#[derive(Deserialize)]
struct IdArg {
    id: String,
}

#[derive(Deserialize)]
struct SubmitArg {
    spec: String,
    /// Client-chosen id (makes a retried submission idempotent); generated if absent.
    id: Option<String>,
}

#[derive(Deserialize)]
struct AbortArg {
    name: String,
    import: String,
}

/// Valid dataset and import names: `[A-Za-z0-9_.-]{1,64}`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Handles the admin requests of one node.
#[derive(Clone, Debug)]
pub struct JobAdmin {
    control: ControlPlane,
    store: Store,
}

impl JobAdmin {
    pub fn new(control: ControlPlane, store: Store) -> Self {
        JobAdmin { control, store }
    }

    fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, AdminError> {
        serde_json::from_slice(payload).map_err(|e| bad(format!("bad request payload: {e}")))
    }

    fn json(v: &impl serde::Serialize) -> Result<Vec<u8>, AdminError> {
        serde_json::to_vec(v).map_err(internal)
    }

    /// The local map once `ready` holds on it, or after a short wait: a follower may be a few
    /// milliseconds behind the leader that just committed the caller's previous request
    /// (read-your-writes for a client that talks to several nodes).
    async fn map_where(&self, ready: impl Fn(&ClusterMap) -> bool) -> Arc<ClusterMap> {
        let mut rx = self.control.map();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let map = rx.borrow_and_update().clone();
            if ready(&map) {
                return map;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return map;
            }
        }
    }

    async fn propose(&self, cmd: Command) -> Result<(), AdminError> {
        match self.control.propose(cmd).await {
            Ok(r) if r.is_ok() => Ok(()),
            Ok(r) => Err(bad(format!("{r:?}"))),
            Err(e) => Err((ErrorCode::Internal, format!("control plane: {e}"))),
        }
    }

    /// Stores one uploaded partition segment after validating it.
    pub async fn dataset_part(&self, part: DatasetPart) -> Result<(), AdminError> {
        if !valid_name(&part.dataset) || !valid_name(&part.import) {
            return Err(bad("dataset and import names must be [A-Za-z0-9_.-]{1,64}"));
        }
        let shards = self.control.map().borrow().shard_count();
        if part.shard >= shards {
            return Err(bad(format!("shard {} out of range ({shards})", part.shard)));
        }
        PartitionView::parse(&part.bytes).map_err(|e| bad(format!("partition: {e}")))?;
        let key = segment_key(&part.dataset, &part.import, part.shard, part.seg);
        self.store
            .put_blob(&key, Bytes::from(part.bytes))
            .await
            .map_err(internal)?;
        metrics::counter!(m::DATASET_PARTS).increment(1);
        Ok(())
    }

    /// One admin request; the reply is JSON.
    pub async fn handle(&self, op: AdminOp, payload: &[u8]) -> Result<Vec<u8>, AdminError> {
        match op {
            AdminOp::DatasetCommit => self.commit(Self::parse(payload)?).await,
            AdminOp::DatasetAbort => {
                let a: AbortArg = Self::parse(payload)?;
                if !valid_name(&a.name) || !valid_name(&a.import) {
                    return Err(bad("bad dataset or import name"));
                }
                let n = self
                    .store
                    .delete_blobs(&import_prefix(&a.name, &a.import))
                    .await
                    .map_err(internal)?;
                Self::json(&serde_json::json!({ "deleted": n }))
            }
            AdminOp::DatasetList => {
                let map = self.control.map().borrow().clone();
                Self::json(
                    &serde_json::json!({ "datasets": map.datasets.values().collect::<Vec<_>>() }),
                )
            }
            AdminOp::JobSubmit => self.submit(Self::parse(payload)?).await,
            AdminOp::JobStatus => {
                let a: IdArg = Self::parse(payload)?;
                let map = self.map_where(|m| m.jobs.contains_key(&a.id)).await;
                let job = map
                    .jobs
                    .get(&a.id)
                    .ok_or_else(|| bad(format!("no job {:?}", a.id)))?;
                Self::json(job)
            }
            AdminOp::JobList => {
                let map = self.control.map().borrow().clone();
                let mut jobs: Vec<&JobRecord> = map.jobs.values().collect();
                jobs.sort_by_key(|j| j.submitted_seq);
                Self::json(&serde_json::json!({ "jobs": jobs }))
            }
            AdminOp::JobCancel => {
                let a: IdArg = Self::parse(payload)?;
                self.propose(Command::UpdateJob {
                    id: a.id.clone(),
                    update: JobUpdate::state(JobState::Cancelled),
                })
                .await?;
                Self::json(&serde_json::json!({ "id": a.id, "state": "cancelled" }))
            }
            AdminOp::JobResult => {
                let a: IdArg = Self::parse(payload)?;
                let map = self
                    .map_where(|m| m.jobs.get(&a.id).is_some_and(|j| j.state.is_terminal()))
                    .await;
                let state = map.jobs.get(&a.id).map(|j| j.state);
                match state {
                    None => Err(bad(format!("no job {:?}", a.id))),
                    Some(JobState::Succeeded) => self
                        .store
                        .get_blob(&result_key(&a.id))
                        .await
                        .map_err(internal)?
                        .map(|b| b.to_vec())
                        .ok_or_else(|| internal("result object missing")),
                    Some(s) => Err(bad(format!("job {} is {}, no result", a.id, s.as_str()))),
                }
            }
        }
    }

    async fn commit(&self, rec: DatasetRecord) -> Result<Vec<u8>, AdminError> {
        if !valid_name(&rec.name) {
            return Err(bad("dataset names must be [A-Za-z0-9_.-]{1,64}"));
        }
        if let DatasetSource::Imported { import, segments } = &rec.source {
            let have: std::collections::BTreeSet<String> = self
                .store
                .list_blobs(&import_prefix(&rec.name, import))
                .await
                .map_err(internal)?
                .into_iter()
                .collect();
            for (shard, &count) in segments.iter().enumerate() {
                for seg in 0..count {
                    let key = segment_key(&rec.name, import, shard as u32, seg);
                    if !have.contains(&key) {
                        return Err(bad(format!("import incomplete: {key} missing")));
                    }
                }
            }
        }
        let result = self.propose(Command::PutDataset(rec.clone())).await;
        if let (Err(_), DatasetSource::Imported { import, .. }) = (&result, &rec.source) {
            let prefix = import_prefix(&rec.name, import);
            if let Err(e) = self.store.delete_blobs(&prefix).await {
                warn!(%prefix, error = %e, "could not delete a refused import");
            }
        }
        result?;
        info!(dataset = %rec.name, rows = rec.rows, "dataset registered");
        Self::json(&serde_json::json!({ "name": rec.name, "rows": rec.rows }))
    }

    async fn submit(&self, a: SubmitArg) -> Result<Vec<u8>, AdminError> {
        let spec = JobSpec::parse(&a.spec).map_err(|e| bad(e.to_string()))?;
        let map = self
            .map_where(|m| m.datasets.contains_key(&spec.dataset))
            .await;
        let ds = map
            .datasets
            .get(&spec.dataset)
            .ok_or_else(|| bad(format!("no dataset {:?} (import it first)", spec.dataset)))?;
        if ds.features.len() > 100_000 {
            return Err(bad("too many features"));
        }
        let id = match a.id {
            Some(id) if valid_name(&id) => id,
            Some(_) => return Err(bad("job ids must be [A-Za-z0-9_.-]{1,64}")),
            None => format!("{}-{:08x}", spec.kind.as_str(), rand::random::<u32>()),
        };
        let rec = JobRecord {
            id: id.clone(),
            spec: a.spec,
            kind: spec.kind.as_str().to_string(),
            dataset: spec.dataset.clone(),
            coordinator_shard: shard_for_key(id.as_bytes(), map.shard_count()),
            state: JobState::Pending,
            step: 0,
            steps: spec.train_steps(ds.rows),
            loss: None,
            samples_per_sec: None,
            coordinator: None,
            error: None,
            submitted_seq: map
                .jobs
                .values()
                .map(|j| j.submitted_seq)
                .max()
                .unwrap_or(0)
                + 1,
        };
        self.propose(Command::SubmitJob(rec)).await?;
        info!(job = %id, kind = spec.kind.as_str(), "job submitted");
        Self::json(&serde_json::json!({ "id": id }))
    }
}

/// Aborts the coordinators it holds when dropped (node shutdown).
#[derive(Default)]
struct Running(HashMap<String, JoinHandle<()>>);

impl Drop for Running {
    fn drop(&mut self) {
        for h in self.0.values() {
            h.abort();
        }
    }
}

/// Keeps one coordinator running for every unfinished job whose coordinator shard this node
/// serves, and stops those whose shard moved away.
pub async fn manage(ctx: CoordinatorCtx) {
    let mut rx = ctx.control.map();
    let mut running = Running::default();
    loop {
        let map = rx.borrow_and_update().clone();
        running.0.retain(|_, h| !h.is_finished());
        for job in map.jobs.values() {
            let mine =
                !job.state.is_terminal() && ctx.router.serving(job.coordinator_shard).is_some();
            match (mine, running.0.contains_key(&job.id)) {
                (true, false) => {
                    let handle = tokio::spawn(coordinator::run(ctx.clone(), job.clone()));
                    running.0.insert(job.id.clone(), handle);
                }
                (false, true) => {
                    if let Some(h) = running.0.remove(&job.id) {
                        h.abort();
                    }
                }
                _ => {}
            }
        }
        // Shard ownership changes on the router, not only in the map: poll it too.
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
}

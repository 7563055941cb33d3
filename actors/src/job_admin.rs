//! Dataset and job administration on a node (the `dataset` and `job` CLI commands), and the
//! job manager that runs a coordinator for every unfinished job whose coordinator shard this
//! node serves.
//!
//! Imports: the CLI uploads every partition segment ([`JobAdmin::dataset_part`], validated
//! and stored create-once under the import's own prefix) and then commits the dataset record
//! through Raft; a dataset is visible only after the commit, and a failed commit (or an
//! explicit abort) deletes the import's objects, so nothing half-imported is left behind.
//! Every payload is checked first ([`crate::admin_checks`]): a commit or abort touches only the
//! import it names, and never a committed dataset's objects; `dataset delete` removes a dataset
//! (record through Raft, then its objects) unless a pending or running job reads it.
//!
//! Jobs are admitted at submit ([`tidepool_runtime::admission`], [`JobSpec::check_caps`]): one
//! that cannot fit this node's memory budget or frame cap, or runs longer than the caps, is
//! refused with the numbers. Results are read in slices ([`AdminOp::JobResultChunk`]) so a model
//! of any size the job could train can be fetched.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use tidepool_runtime::admission::{self, MESSAGE_OVERHEAD};
use tidepool_runtime::codec::{AdminOp, DatasetPart, ErrorCode, RESULT_CHUNK_HEADER};
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

pub use crate::admin_checks::valid_name;
use crate::admin_checks::{self, Commit, Delete};
use crate::coordinator::{self, checkpoint_prefix, result_key, CoordinatorCtx};
use crate::job_exec::{import_prefix, segment_key, JobLimits};

/// Largest result slice one [`AdminOp::JobResultChunk`] reply carries.
pub const MAX_RESULT_CHUNK: u64 = 8 << 20;

/// An admin error: code plus a message for the user.
pub type AdminError = (ErrorCode, String);

fn bad(msg: impl Into<String>) -> AdminError {
    (ErrorCode::BadRequest, msg.into())
}

fn not_found(msg: impl Into<String>) -> AdminError {
    (ErrorCode::NotFound, msg.into())
}

/// A refused dataset commit: a taken name is a conflict, the rest bad requests.
fn refused_commit(e: admin_checks::PayloadError) -> AdminError {
    let code = match e {
        admin_checks::PayloadError::Exists(_) => ErrorCode::Conflict,
        _ => ErrorCode::BadRequest,
    };
    (code, e.to_string())
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
#[serde(deny_unknown_fields)]
struct AbortArg {
    name: String,
    import: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameArg {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChunkArg {
    id: String,
    offset: u64,
    length: u64,
    /// A parameter-server job's stored parts instead of the result document:
    /// `{"table": SHARD}` (the shard's final saved table) or `{"export": SHARD}`.
    #[serde(default)]
    table: Option<u32>,
    #[serde(default)]
    export: Option<u32>,
}

/// A stored part of a parameter-server job's model.
#[derive(Debug, Clone, Copy)]
enum Part {
    Table(u32),
    Export(u32),
}

/// The last result read for chunked fetches (one entry: fetching a result is sequential).
type ResultCache = Arc<Mutex<Option<(String, Bytes)>>>;

/// Handles the admin requests of one node.
#[derive(Clone, Debug)]
pub struct JobAdmin {
    control: ControlPlane,
    store: Store,
    limits: JobLimits,
    result: ResultCache,
    /// `jobs.import_urls`: where `dataset import URL` may read.
    import_urls: Arc<Vec<String>>,
}

impl JobAdmin {
    pub fn new(control: ControlPlane, store: Store) -> Self {
        JobAdmin {
            control,
            store,
            limits: JobLimits::default(),
            result: ResultCache::default(),
            import_urls: Arc::default(),
        }
    }

    /// Where `dataset import URL` may read (`jobs.import_urls`).
    pub fn with_import_urls(mut self, urls: Arc<Vec<String>>) -> Self {
        self.import_urls = urls;
        self
    }

    /// Sets this node's job limits (admission at submit and `dataset synth`).
    pub fn with_limits(mut self, limits: JobLimits) -> Self {
        self.limits = limits;
        self
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
            Ok(r) => Err(bad(r
                .rejection()
                .unwrap_or("rejected by the control plane"))),
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
                let map = self.control.map().borrow().clone();
                let prefix = admin_checks::check_abort(&a.name, &a.import, &map)
                    .map_err(|e| bad(e.to_string()))?;
                let n = self.store.delete_blobs(&prefix).await.map_err(internal)?;
                Self::json(&serde_json::json!({ "deleted": n }))
            }
            AdminOp::DatasetDelete => self.delete(Self::parse(payload)?).await,
            AdminOp::DatasetImport => {
                let arg = Self::parse(payload)?;
                let allowed = &self.import_urls;
                Self::json(&crate::imports::start(&self.control, &self.store, allowed, arg).await?)
            }
            AdminOp::DatasetImportStatus => {
                let arg: crate::imports::StatusArg = Self::parse(payload)?;
                if arg.id.is_none() && arg.name.is_none() {
                    let map = self.control.map().borrow().clone();
                    let imports = crate::imports::list(&map);
                    return Self::json(&serde_json::json!({ "imports": imports }));
                }
                let map = self
                    .map_where(|m| match (&arg.id, &arg.name) {
                        (Some(id), _) => m.imports.contains_key(id),
                        (None, Some(n)) => m.imports.values().any(|i| i.dataset == *n),
                        _ => true,
                    })
                    .await;
                Self::json(&crate::imports::status(&map, &arg)?)
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
                    .ok_or_else(|| not_found(format!("no job {:?}", a.id)))?;
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
                let map = self.map_where(|m| m.jobs.contains_key(&a.id)).await;
                if !map.jobs.contains_key(&a.id) {
                    return Err(not_found(format!("no job {:?}", a.id)));
                }
                self.propose(Command::UpdateJob {
                    id: a.id.clone(),
                    update: JobUpdate::state(JobState::Cancelled),
                })
                .await?;
                // A cancelled job's checkpoints are of no use; the manager deletes them too (in
                // case its coordinator writes one more before it sees the cancel).
                let prefix = checkpoint_prefix(&a.id);
                if let Err(e) = self.store.delete_blobs(&prefix).await {
                    warn!(%prefix, error = %e, "could not delete a cancelled job's checkpoints");
                }
                Self::json(&serde_json::json!({ "id": a.id, "state": "cancelled" }))
            }
            AdminOp::JobResultChunk => self.result_chunk(Self::parse(payload)?).await,
            AdminOp::JobResult => {
                let a: IdArg = Self::parse(payload)?;
                let map = self
                    .map_where(|m| m.jobs.get(&a.id).is_some_and(|j| j.state.is_terminal()))
                    .await;
                let state = map.jobs.get(&a.id).map(|j| j.state);
                match state {
                    None => Err(not_found(format!("no job {:?}", a.id))),
                    Some(JobState::Succeeded) => {
                        let blob = self.result_blob(&a.id, 0).await?;
                        let cap = self.limits.admission.max_frame_bytes;
                        if blob.len() as u64 + MESSAGE_OVERHEAD > cap {
                            return Err(bad(format!(
                                "result of job {} is {} bytes, over transport.max_frame_bytes = \
                                 {cap}; fetch it in chunks (job_result_chunk)",
                                a.id,
                                blob.len()
                            )));
                        }
                        Ok(blob.to_vec())
                    }
                    Some(s) => Err(bad(format!("job {} is {}, no result", a.id, s.as_str()))),
                }
            }
        }
    }

    /// A succeeded job's stored result. A fetch starts at offset 0, which always reads (and
    /// so verifies) the stored object; the later chunks of that fetch reuse what it read.
    async fn result_blob(&self, id: &str, offset: u64) -> Result<Bytes, AdminError> {
        if offset > 0 {
            if let Some((cached, bytes)) = self.result.lock().as_ref() {
                if cached == id {
                    return Ok(bytes.clone());
                }
            }
        }
        let bytes = self
            .store
            .get_blob(&result_key(id))
            .await
            .map_err(internal)?
            .ok_or_else(|| internal("result object missing"))?;
        *self.result.lock() = Some((id.to_string(), bytes.clone()));
        Ok(bytes)
    }

    /// A parameter-server job's saved table or export of `shard` (cached like the result).
    async fn part_blob(
        &self,
        id: &str,
        offset: u64,
        part: Part,
        map: &ClusterMap,
    ) -> Result<Bytes, AdminError> {
        let (shard, what) = match part {
            Part::Table(s) => (s, "table"),
            Part::Export(s) => (s, "export"),
        };
        if shard >= map.shard_count() {
            return Err(bad(format!(
                "no shard {shard} (the cluster has {})",
                map.shard_count()
            )));
        }
        let cache_id = format!("{id}\u{0}{what}{shard}");
        if offset > 0 {
            if let Some((cached, bytes)) = self.result.lock().as_ref() {
                if *cached == cache_id {
                    return Ok(bytes.clone());
                }
            }
        }
        let key = match part {
            Part::Table(s) => {
                // The newest save is the final one once the job succeeded.
                let saves = self
                    .store
                    .list_blobs(&crate::jobs::ps::shard_tables_prefix(id, s))
                    .await
                    .map_err(internal)?;
                saves
                    .into_iter()
                    .max()
                    .ok_or_else(|| not_found(format!("job {id} has no saved table of shard {s}")))?
            }
            Part::Export(s) => crate::jobs::ps::export_key(id, s),
        };
        let bytes = self
            .store
            .get_blob(&key)
            .await
            .map_err(internal)?
            .ok_or_else(|| not_found(format!("job {id} has no {what} of shard {shard}")))?;
        *self.result.lock() = Some((cache_id, bytes.clone()));
        Ok(bytes)
    }

    /// `[total size: u64 LE][bytes offset..offset+n]`, `n` capped to fit a frame.
    async fn result_chunk(&self, a: ChunkArg) -> Result<Vec<u8>, AdminError> {
        let map = self
            .map_where(|m| m.jobs.get(&a.id).is_some_and(|j| j.state.is_terminal()))
            .await;
        match map.jobs.get(&a.id).map(|j| j.state) {
            None => return Err(not_found(format!("no job {:?}", a.id))),
            Some(JobState::Succeeded) => {}
            Some(s) => return Err(bad(format!("job {} is {}, no result", a.id, s.as_str()))),
        }
        let blob = match (a.table, a.export) {
            (None, None) => self.result_blob(&a.id, a.offset).await?,
            (Some(shard), None) => {
                self.part_blob(&a.id, a.offset, Part::Table(shard), &map)
                    .await?
            }
            (None, Some(shard)) => {
                self.part_blob(&a.id, a.offset, Part::Export(shard), &map)
                    .await?
            }
            (Some(_), Some(_)) => return Err(bad("ask for a table or an export, not both")),
        };
        let total = blob.len() as u64;
        if a.offset > total {
            return Err(bad(format!(
                "offset {} is past the result's {total} bytes",
                a.offset
            )));
        }
        let fits = self
            .limits
            .admission
            .max_frame_bytes
            .saturating_sub(MESSAGE_OVERHEAD)
            .max(256);
        let n = a
            .length
            .min(fits)
            .min(MAX_RESULT_CHUNK)
            .min(total - a.offset);
        // Both fit in usize: offset <= total = blob.len(), and n <= total - offset.
        let (start, end) = (a.offset as usize, (a.offset + n) as usize);
        let mut out = Vec::with_capacity(RESULT_CHUNK_HEADER + (end - start));
        out.extend_from_slice(&total.to_le_bytes());
        out.extend_from_slice(&blob[start..end]);
        Ok(out)
    }

    async fn delete(&self, a: NameArg) -> Result<Vec<u8>, AdminError> {
        let map = self.control.map().borrow().clone();
        let plan = admin_checks::check_delete(&a.name, &map).map_err(|e| bad(e.to_string()))?;
        let Delete::Remove { prefix } = plan else {
            return Self::json(&serde_json::json!({ "name": a.name, "deleted": false }));
        };
        // Raft re-checks that no pending or running job reads it (a submit may have raced us);
        // only once the record is gone are the objects deleted.
        self.propose(Command::DeleteDataset {
            name: a.name.clone(),
        })
        .await?;
        let mut objects = 0;
        if let Some(prefix) = prefix {
            objects = self.store.delete_blobs(&prefix).await.map_err(internal)?;
        }
        info!(dataset = %a.name, objects, "dataset deleted");
        Self::json(&serde_json::json!({ "name": a.name, "deleted": true, "objects": objects }))
    }

    async fn commit(&self, rec: DatasetRecord) -> Result<Vec<u8>, AdminError> {
        let map = self.control.map().borrow().clone();
        let checked = admin_checks::check_commit(&rec, &map, &self.limits.admission);
        let plan = match checked {
            Ok(plan) => plan,
            Err(e) => {
                if matches!(e, admin_checks::PayloadError::TooLarge(..)) {
                    metrics::counter!(m::JOB_ADMISSIONS_REFUSED, "stage" => "synth").increment(1);
                }
                self.clean_refused(&rec, &map).await;
                return Err(refused_commit(e));
            }
        };
        if plan == Commit::Retry {
            return Self::json(&serde_json::json!({ "name": rec.name, "rows": rec.rows }));
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
        let result = self
            .propose(Command::PutDataset(Box::new(rec.clone())))
            .await;
        if let Err(e) = result {
            // Against the map after the refusal: the same import may have just been committed
            // (a retried commit that raced), and then it is kept.
            let map = self.control.map().borrow().clone();
            self.clean_refused(&rec, &map).await;
            // The leader saw a record this node's map had not caught up with yet: the same
            // sentence (and code) as when the check above catches it.
            return Err(
                match admin_checks::check_commit(&rec, &map, &self.limits.admission) {
                    Err(p @ admin_checks::PayloadError::Exists(_)) => refused_commit(p),
                    _ => e,
                },
            );
        }
        info!(dataset = %rec.name, rows = rec.rows, "dataset registered");
        Self::json(&serde_json::json!({ "name": rec.name, "rows": rec.rows }))
    }

    /// Deletes a refused commit's own uploads, and only those ([`admin_checks`]).
    async fn clean_refused(&self, rec: &DatasetRecord, map: &ClusterMap) {
        if let Some(prefix) = admin_checks::refused_commit_cleanup(rec, map) {
            if let Err(e) = self.store.delete_blobs(&prefix).await {
                warn!(%prefix, error = %e, "could not delete a refused import");
            }
        }
    }

    async fn submit(&self, a: SubmitArg) -> Result<Vec<u8>, AdminError> {
        let spec = JobSpec::parse(&a.spec).map_err(|e| bad(e.to_string()))?;
        let map = self
            .map_where(|m| m.datasets.contains_key(&spec.dataset))
            .await;
        let ds = map
            .datasets
            .get(&spec.dataset)
            .ok_or_else(|| not_found(format!("no dataset {:?} (import it first)", spec.dataset)))?;
        // Dense rows hold every feature; a sparse dataset's columns are bounded by the frame
        // checks of admission below (one weight per column travels in every task).
        if ds.sparse().is_none() && ds.features.len() > admin_checks::MAX_FEATURES {
            return Err(bad("too many features"));
        }
        if ds.sparse().is_some()
            && matches!(
                spec.kind,
                tidepool_runtime::jobspec::JobKind::Kmeans
                    | tidepool_runtime::jobspec::JobKind::Stats
            )
        {
            return Err(bad(format!(
                "job refused: {} needs dense rows; dataset {:?} is sparse (libsvm): train \
                 linear, logistic or softmax on it",
                spec.kind.as_str(),
                ds.name
            )));
        }
        let refused = |e: String| {
            metrics::counter!(m::JOB_ADMISSIONS_REFUSED, "stage" => "submit").increment(1);
            bad(format!("job refused: {e}"))
        };
        spec.check_caps(ds.rows, &self.limits.caps)
            .map_err(|e| refused(e.to_string()))?;
        admission::admit_job(
            &spec,
            a.spec.len() as u64,
            &admin_checks::data_shape(ds),
            map.shard_count(),
            &self.limits.admission,
        )
        .map_err(|e| refused(e.to_string()))?;
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

/// Tasks by key, aborted when dropped (node shutdown): the coordinators here, the import
/// splits in `crate::imports`.
pub(crate) struct Running<K: std::hash::Hash + Eq>(pub(crate) HashMap<K, JoinHandle<()>>);

impl<K: std::hash::Hash + Eq> Default for Running<K> {
    fn default() -> Self {
        Running(HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq> Drop for Running<K> {
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
    let mut running: Running<String> = Running::default();
    // Finished jobs whose checkpoints this process has deleted (again after a restart: deleting
    // an empty prefix is a cheap list).
    let mut cleaned = std::collections::HashSet::new();
    loop {
        let map = rx.borrow_and_update().clone();
        running.0.retain(|_, h| !h.is_finished());
        for job in map.jobs.values() {
            let serving = ctx.router.serving(job.coordinator_shard).is_some();
            let mine = !job.state.is_terminal() && serving;
            if job.state.is_terminal() && serving && !cleaned.contains(&job.id) {
                if let Some(h) = running.0.remove(&job.id) {
                    h.abort();
                }
                // Checkpoints of a finished, failed or cancelled job are never read again (a
                // succeeded job keeps its result).
                let prefix = checkpoint_prefix(&job.id);
                match ctx.store.delete_blobs(&prefix).await {
                    Ok(_) => {
                        cleaned.insert(job.id.clone());
                    }
                    Err(e) => {
                        warn!(%prefix, error = %e, "could not delete a finished job's checkpoints")
                    }
                }
            }
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
        // Parameter tables of jobs that ended, and of shards that moved away, are freed now,
        // not at the next job's first task.
        ctx.exec.evict_unowned();
        // Shard ownership changes on the router, not only in the map: poll it too.
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
}

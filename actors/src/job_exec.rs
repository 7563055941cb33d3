//! The node's side of a job step: map the shards this node owns and return one pre-summed
//! partial (one message per node per step).
//!
//! A task names the shards and the epochs the coordinator saw; a shard is mapped only if this
//! node serves it at that epoch with a valid lease (the router's check, invariant 1), else it
//! is refused and the coordinator asks the current owner. Partitions ride on shards: the first
//! task for a `(dataset, shard)` after this node took the shard over loads its partition from
//! storage (or generates it, for synthetic datasets); entries for shards this node no longer
//! serves are dropped, and the cache is capped in bytes (least recently used goes first).
//! Maps run on the worker pool, the shards split over its threads; the per-thread partials
//! merge exactly, so the thread count does not change the result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tidepool_runtime::admission::{self, Limits};
use tidepool_runtime::codec::{JobPartial, JobTask, ParamPull, ParamPush, ParamReply, ParamStatus};
use tidepool_runtime::config::NodeConfig;
use tidepool_runtime::control::{DatasetRecord, DatasetSource};
use tidepool_runtime::csr::{CsrRows, SparsePartition};
use tidepool_runtime::dataset::{self, AnyView, Partition, PartitionBuf, SyntheticKind};
use tidepool_runtime::ingest::split_segment_key;
use tidepool_runtime::jobspec::{JobCaps, JobSpec};
use tidepool_runtime::metrics as m;
use tidepool_runtime::partition_file::PartitionFileWriter;
use tidepool_runtime::storage::Store;
use tracing::{debug, warn};

mod ps_step;

use crate::admin_checks;
use crate::jobs::job::{sums_to_wire, ExactSum, JobError, ShardData, Task};
use crate::jobs::ps::ParamPhase;
use crate::jobs::registry::{self, ErasedJob};
use crate::params::ParamServer;
use crate::router::Router;
use crate::spill::{self, SpillDir};
use crate::worker::WorkerPool;

/// Default cap on cached partition bytes per node.
pub const DEFAULT_CACHE_BYTES: usize = 4 << 30;

/// A node's job limits (`[jobs]` and `transport.max_frame_bytes`): what admission checks, and
/// what the executor checks before it allocates a partition or sends a partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    pub admission: Limits,
    pub caps: JobCaps,
}

impl JobLimits {
    pub fn from_config(cfg: &NodeConfig) -> Self {
        JobLimits {
            admission: cfg.admission_limits(),
            caps: cfg.job_caps(),
        }
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        Self::from_config(&NodeConfig::default())
    }
}

/// Why a job task could not be mapped here (its text travels to the coordinator).
#[derive(Debug, thiserror::Error)]
pub enum JobExecError {
    #[error("job spec: {0}")]
    Spec(#[from] tidepool_runtime::jobspec::JobSpecError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("partition: {0}")]
    Partition(#[from] tidepool_runtime::dataset::DatasetError),
    #[error("storage: {0}")]
    Storage(#[from] tidepool_runtime::storage::StorageError),
    #[error("worker pool: {0}")]
    Worker(#[from] crate::worker::WorkerError),
    #[error("missing partition object {0}")]
    MissingObject(String),
    #[error("partition has {got} features, dataset {want}")]
    Features { got: usize, want: usize },
    #[error("a partition's layout does not match its dataset (sparse dataset: {sparse})")]
    Layout { sparse: bool },
    #[error("partition file: {0}")]
    File(#[from] std::io::Error),
}

/// Why a shard's partition is not available here.
#[derive(Debug)]
enum LoadError {
    /// Storage trouble, a missing object: another try (maybe on another owner) may work.
    Retry(JobExecError),
    /// Over this node's memory budget: no retry can fix it, the job fails.
    Budget(String),
}

impl<E: Into<JobExecError>> From<E> for LoadError {
    fn from(e: E) -> Self {
        LoadError::Retry(e.into())
    }
}

/// Storage key of one partition segment of an import.
pub fn segment_key(dataset: &str, import: &str, shard: u32, seg: u32) -> String {
    format!("datasets/{dataset}/{import}/{shard:05}-{seg:04}.tdds")
}

/// Storage prefix of one import.
pub fn import_prefix(dataset: &str, import: &str) -> String {
    format!("datasets/{dataset}/{import}")
}

/// A shard's partition, readable in place.
#[derive(Debug)]
enum Loaded {
    /// One stored object, read in place.
    InPlace(PartitionBuf),
    /// Several segments concatenated, or generated.
    Owned(Partition),
    /// Several sparse segments joined.
    Sparse(SparsePartition),
    /// A local partition file, memory-mapped (checked once when mapped).
    Mapped(memmap2::Mmap),
}

impl Loaded {
    fn bytes(&self) -> usize {
        match self {
            Loaded::InPlace(b) => b.bytes().len(),
            Loaded::Owned(p) => p.features().len() * 4 + p.rows() * 12,
            Loaded::Sparse(p) => p.bytes(),
            Loaded::Mapped(m) => m.len(),
        }
    }

    /// Runs `f` over the partition's rows; `features` is the dataset's column count (a sparse
    /// segment records only the columns it holds).
    fn with_data<T>(
        &self,
        shard: u32,
        features: usize,
        f: impl FnOnce(&ShardData<'_>) -> T,
    ) -> Result<T, JobExecError> {
        let view = match self {
            Loaded::InPlace(b) => b.any_view()?,
            Loaded::Mapped(m) => AnyView::parse_checked_before(m)?,
            Loaded::Owned(p) => {
                return Ok(f(&ShardData {
                    shard,
                    features: p.n_features(),
                    x: p.features(),
                    y: p.labels(),
                    csr: None,
                }))
            }
            Loaded::Sparse(p) => {
                return Ok(f(&sparse_data(shard, features, p.labels(), p.csr())?));
            }
        };
        match view {
            AnyView::Dense(v) => Ok(f(&ShardData {
                shard,
                features: v.n_features(),
                x: v.features(),
                y: v.labels(),
                csr: None,
            })),
            AnyView::Sparse(v) => Ok(f(&sparse_data(shard, features, v.labels(), v.csr())?)),
        }
    }
}

/// Sparse rows as the map sees them, `features` columns wide.
fn sparse_data<'a>(
    shard: u32,
    features: usize,
    y: &'a [f32],
    csr: CsrRows<'a>,
) -> Result<ShardData<'a>, JobExecError> {
    let got = csr.columns();
    let csr = csr.widen(features).ok_or(JobExecError::Features {
        got,
        want: features,
    })?;
    Ok(ShardData {
        shard,
        features,
        x: &[],
        y,
        csr: Some(csr),
    })
}

/// Cache key: the dataset's identity (name and import or seed, so a dataset deleted and
/// imported again under its name is not served from the old partitions) and the shard.
type CacheKey = (String, u32);

fn cache_key(ds: &DatasetRecord, shard: u32) -> CacheKey {
    let source = match &ds.source {
        DatasetSource::Imported { import, .. } => format!("i/{import}"),
        DatasetSource::Ingested { import, .. } => format!("g/{import}"),
        DatasetSource::Synthetic { kind, seed } => format!("s/{kind}/{seed}/{}", ds.rows),
    };
    (format!("{}/{source}", ds.name), shard)
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<CacheKey, (Arc<Loaded>, u64)>,
    clock: u64,
    bytes: usize,
    /// Partition files written, by key (deleted when their shard moves away).
    files: HashMap<CacheKey, std::path::PathBuf>,
}

/// What one step's maps gave.
#[derive(Debug, Default)]
struct Mapped {
    acc: ExactSum,
    done: Vec<u32>,
    refused: Vec<u32>,
    /// A map error that will recur: the job fails.
    error: Option<String>,
}

fn not_params(job: &str) -> ParamReply {
    ParamReply {
        status: ParamStatus::Refused,
        message: format!("job {job:?} is not a parameter-server job"),
        values: Vec::new(),
    }
}

/// A job, built once per (job id, spec).
type BuiltJob = (String, Arc<dyn ErasedJob>);

/// Runs job tasks on this node.
pub struct JobExecutor {
    router: Router,
    store: Store,
    pool: WorkerPool,
    threads: usize,
    cap_bytes: usize,
    limits: JobLimits,
    spill: Option<SpillDir>,
    cache: Mutex<Cache>,
    jobs: Mutex<HashMap<String, BuiltJob>>,
    /// The parameter tables of the shards this node owns.
    params: ParamServer,
}

impl std::fmt::Debug for JobExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobExecutor")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

fn refuse_all(task: &JobTask, error: Option<String>) -> JobPartial {
    JobPartial {
        done: Vec::new(),
        refused: task.shards.iter().map(|s| s.shard).collect(),
        rows: 0,
        sum: Vec::new(),
        wide: Vec::new(),
        min: Vec::new(),
        max: Vec::new(),
        error,
        lost: false,
    }
}

impl JobExecutor {
    pub fn new(
        router: Router,
        store: Store,
        threads: usize,
        cap_bytes: usize,
        meter: Arc<crate::load::LoadMeter>,
    ) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let budget = JobLimits::default().admission.memory_budget_bytes;
        JobExecutor {
            params: ParamServer::new(router.clone(), store.clone(), budget),
            router,
            store,
            pool: WorkerPool::with_meter(threads, threads * 4, meter),
            threads,
            cap_bytes,
            limits: JobLimits::default(),
            spill: None,
            cache: Mutex::new(Cache::default()),
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// Sets this node's job limits (the partition cache is capped at half the memory budget
    /// too: the other half is for the partitions being mapped, the model and the messages).
    pub fn with_limits(mut self, limits: JobLimits) -> Self {
        self.limits = limits;
        self.params = ParamServer::new(
            self.router.clone(),
            self.store.clone(),
            limits.admission.memory_budget_bytes,
        );
        let budget = usize::try_from(limits.admission.memory_budget_bytes).unwrap_or(usize::MAX);
        self.cap_bytes = self.cap_bytes.min(budget / 2);
        self
    }

    /// Keeps stored partitions as memory-mapped files in `spill` instead of in memory.
    pub fn with_spill(mut self, spill: SpillDir) -> Self {
        self.spill = Some(spill);
        self
    }

    /// This node's job limits.
    pub fn limits(&self) -> JobLimits {
        self.limits
    }

    /// The runnable job of a task (cached by job id and spec).
    pub fn job(
        &self,
        id: &str,
        spec_text: &str,
        ds: &DatasetRecord,
    ) -> Result<Arc<dyn ErasedJob>, JobExecError> {
        if let Some((spec, job)) = self.jobs.lock().get(id) {
            if spec == spec_text {
                return Ok(job.clone());
            }
        }
        let spec = JobSpec::parse(spec_text)?;
        let job = registry::build(id, &spec, ds)?;
        let mut jobs = self.jobs.lock();
        if jobs.len() > 64 {
            jobs.clear();
        }
        jobs.insert(id.to_string(), (spec_text.to_string(), job.clone()));
        Ok(job)
    }

    /// Maps the task's shards that this node serves at the task's epochs.
    pub async fn run(&self, task: JobTask) -> JobPartial {
        let started = Instant::now();
        let map = self.router.map();
        let Some(ds) = map.datasets.get(&task.dataset).cloned() else {
            // Our map may be behind the coordinator's: refuse, the coordinator retries.
            return refuse_all(&task, None);
        };
        let job = match self.job(&task.job, &task.spec, &ds) {
            Ok(j) => j,
            Err(e) => return refuse_all(&task, Some(e.to_string())),
        };
        self.evict_unowned();
        let mut serving = Vec::new();
        let mut refused = Vec::new();
        for se in &task.shards {
            if self.router.serves_now(se.shard, se.epoch) {
                serving.push(se.shard);
            } else {
                refused.push(se.shard);
            }
        }
        let t = Arc::new(Task {
            phase: task.phase,
            broadcast: task.broadcast.clone(),
        });
        match job.param_model().map(|m| m.phase(&t)) {
            Some(ParamPhase::Train { step }) => {
                let assigned = ps_step::Assigned { serving, refused };
                return self.ps_train(&task, &ds, job, t, step, assigned).await;
            }
            Some(ParamPhase::Save { step, last }) => {
                let assigned = ps_step::Assigned { serving, refused };
                return self.ps_save(&task, &ds, job, (step, last), assigned).await;
            }
            _ => {}
        }
        let mapped = match self.map_all(&ds, job, task.step, t, serving).await {
            Ok(m) => m,
            Err(budget) => return refuse_all(&task, Some(budget)),
        };
        let (acc, error) = (mapped.acc, mapped.error);
        let mine = mapped.done;
        refused.extend(mapped.refused);
        metrics::histogram!(m::JOB_TASK_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::JOB_SHARD_TASKS, "result" => "done").increment(mine.len() as u64);
        refused.sort_unstable();
        metrics::counter!(m::JOB_SHARD_TASKS, "result" => "refused")
            .increment(refused.len() as u64);
        // A partial that cannot be sent would be asked for again for ever: fail the job instead.
        let extrema = (acc.min.len() + acc.max.len()) as u64;
        let (sum, wide) = sums_to_wire(&acc.sum);
        let bytes = admission::partial_bytes(sum.len() as u64, wide.len() as u64, extrema);
        let values = acc.sum.len() as u64 + extrema;
        if let Err(e) = admission::check_frame("partial", bytes, values, &self.limits.admission) {
            return JobPartial {
                done: Vec::new(),
                refused: task.shards.iter().map(|s| s.shard).collect(),
                rows: 0,
                sum: Vec::new(),
                wide: Vec::new(),
                min: Vec::new(),
                max: Vec::new(),
                error: Some(format!("job {}: {e}", task.job)),
                lost: false,
            };
        }
        JobPartial {
            done: mine,
            refused,
            rows: acc.rows,
            sum,
            wide,
            min: acc.min,
            max: acc.max,
            error,
            lost: false,
        }
    }

    /// Answers a parameter pull from a worker (here or on another node).
    pub async fn param_pull(&self, req: ParamPull) -> ParamReply {
        match self.param_job(&req.job) {
            Ok(job) => match job.param_model() {
                Some(model) => self.params.pull(model, &req).await,
                None => not_params(&req.job),
            },
            Err(reply) => reply,
        }
    }

    /// Answers a parameter push from a worker (here or on another node).
    pub async fn param_push(&self, req: ParamPush) -> ParamReply {
        match self.param_job(&req.job) {
            Ok(job) => match job.param_model() {
                Some(model) => self.params.push(model, &req).await,
                None => not_params(&req.job),
            },
            Err(reply) => reply,
        }
    }

    /// The runnable job `id` from the replicated map (its spec and dataset).
    fn param_job(&self, id: &str) -> Result<Arc<dyn ErasedJob>, ParamReply> {
        let map = self.router.map();
        let refuse = |status, message: String| ParamReply {
            status,
            message,
            values: Vec::new(),
        };
        let Some(rec) = map.jobs.get(id) else {
            // Our map may be behind the worker's: retryable.
            return Err(refuse(
                ParamStatus::NotOwner,
                format!("no job {id:?} here yet"),
            ));
        };
        let Some(ds) = map.datasets.get(&rec.dataset) else {
            return Err(refuse(
                ParamStatus::NotOwner,
                format!("no dataset {:?} here yet", rec.dataset),
            ));
        };
        self.job(id, &rec.spec, ds)
            .map_err(|e| refuse(ParamStatus::Refused, e.to_string()))
    }

    /// Maps `shards` on the worker pool: the shards split over its threads, each thread's
    /// shards loaded (or mapped) one at a time, so a step holds one partition per thread beyond
    /// the cache. `Err`: a partition over the memory budget (the job fails).
    async fn map_all(
        &self,
        ds: &DatasetRecord,
        job: Arc<dyn ErasedJob>,
        step: u64,
        task: Arc<Task>,
        shards: Vec<u32>,
    ) -> Result<Mapped, String> {
        let groups = self.threads.min(shards.len()).max(1);
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); groups];
        for (i, s) in shards.into_iter().enumerate() {
            buckets[i % groups].push(s);
        }
        let runs = buckets.into_iter().map(|bucket| {
            let (job, task) = (job.clone(), task.clone());
            async move {
                let mut out = Mapped::default();
                for shard in bucket {
                    let loaded = match self.partition(ds, shard).await {
                        Ok(p) => p,
                        Err(LoadError::Retry(e)) => {
                            warn!(dataset = %ds.name, shard, error = %e, "partition not loadable");
                            out.refused.push(shard);
                            continue;
                        }
                        Err(LoadError::Budget(e)) => {
                            warn!(dataset = %ds.name, shard, error = %e, "partition over the memory budget");
                            metrics::counter!(m::JOB_ADMISSIONS_REFUSED, "stage" => "partition")
                                .increment(1);
                            return Err(e);
                        }
                    };
                    let (job, task) = (job.clone(), task.clone());
                    let features = ds.feature_count();
                    let partial = self
                        .pool
                        .run(move || {
                            loaded
                                .with_data(shard, features, |d| job.map(step, &task, d))
                                .map_err(|e| JobError::Data(e.to_string()))?
                        })
                        .await
                        .unwrap_or_else(|e| Err(JobError::Data(format!("worker: {e}"))))
                        .and_then(|p| out.acc.add(&p));
                    out.done.push(shard);
                    if let Err(e) = partial {
                        out.error = Some(e.to_string());
                        break;
                    }
                }
                Ok(out)
            }
        });
        let mut total = Mapped::default();
        for r in futures::future::join_all(runs).await {
            let part = r?;
            total.done.extend(part.done);
            total.refused.extend(part.refused);
            if total.error.is_none() {
                total.error = part.error;
            }
            if total.error.is_none() {
                if let Err(e) = total.acc.merge(&part.acc) {
                    total.error = Some(e.to_string());
                }
            }
        }
        if total.error.is_some() {
            total.acc = ExactSum::default();
        }
        total.done.sort_unstable();
        Ok(total)
    }

    /// Drops cached partitions and parameter tables of shards this node no longer serves, of
    /// datasets gone, and of jobs that ended.
    pub fn evict_unowned(&self) {
        let owned: std::collections::HashSet<u32> =
            self.router.owned_shards().into_iter().collect();
        // Datasets deleted (or imported again under their name) are gone from the map.
        let live: std::collections::HashSet<String> = self
            .router
            .map()
            .datasets
            .values()
            .map(|d| cache_key(d, 0).0)
            .collect();
        // Tables of jobs that ended (or are gone) are dropped: only running jobs keep theirs.
        let jobs: std::collections::HashSet<String> = self
            .router
            .map()
            .jobs
            .iter()
            .filter(|(_, j)| !j.state.is_terminal())
            .map(|(id, _)| id.clone())
            .collect();
        self.params.evict(&owned, &|j| jobs.contains(j));
        let mut c = self.cache.lock();
        let before = c.entries.len();
        c.entries
            .retain(|(ds, shard), _| owned.contains(shard) && live.contains(ds));
        let mut gone = Vec::new();
        c.files.retain(|(ds, shard), path| {
            let keep = owned.contains(shard) && live.contains(ds);
            if !keep {
                gone.push(std::mem::take(path));
            }
            keep
        });
        if c.entries.len() != before {
            c.bytes = c.entries.values().map(|(l, _)| l.bytes()).sum();
            debug!(
                dropped = before - c.entries.len(),
                "partitions of moved shards dropped"
            );
        }
        metrics::gauge!(m::JOB_CACHE_BYTES).set(c.bytes as f64);
        drop(c);
        // Deleted off the reactor and outside the cache lock (a mapping still in use keeps its
        // pages until it is dropped).
        if let (Some(spill), false) = (self.spill.clone(), gone.is_empty()) {
            tokio::task::spawn_blocking(move || gone.iter().for_each(|p| spill.remove(p)));
        }
    }

    async fn partition(&self, ds: &DatasetRecord, shard: u32) -> Result<Arc<Loaded>, LoadError> {
        let key = cache_key(ds, shard);
        {
            let mut c = self.cache.lock();
            c.clock += 1;
            let now = c.clock;
            if let Some((loaded, used)) = c.entries.get_mut(&key) {
                *used = now;
                return Ok(loaded.clone());
            }
        }
        let loaded = Arc::new(self.load(ds, shard).await?);
        metrics::counter!(m::JOB_PARTITIONS_LOADED).increment(1);
        let mut c = self.cache.lock();
        c.clock += 1;
        let now = c.clock;
        c.bytes += loaded.bytes();
        c.entries.insert(key, (loaded.clone(), now));
        while c.bytes > self.cap_bytes && c.entries.len() > 1 {
            let Some(oldest) = c
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((l, _)) = c.entries.remove(&oldest) {
                c.bytes -= l.bytes();
            }
        }
        metrics::gauge!(m::JOB_CACHE_BYTES).set(c.bytes as f64);
        Ok(loaded)
    }

    /// Refuses (before allocating) a partition of `rows` rows over this node's budget.
    fn within_budget(&self, ds: &DatasetRecord, shard: u32, rows: u64) -> Result<(), LoadError> {
        admission::check_partition(rows, &admin_checks::data_shape(ds), &self.limits.admission)
            .map(|_| ())
            .map_err(|e| LoadError::Budget(format!("dataset {:?} shard {shard}: {e}", ds.name)))
    }

    async fn load(&self, ds: &DatasetRecord, shard: u32) -> Result<Loaded, LoadError> {
        match &ds.source {
            DatasetSource::Synthetic { kind, seed } => {
                let kind = match kind.as_str() {
                    "linear" => SyntheticKind::Linear,
                    _ => SyntheticKind::Logistic,
                };
                let (rows, f, seed, shards) = (ds.rows, ds.features.len(), *seed, ds.shards);
                self.within_budget(
                    ds,
                    shard,
                    admission::synthetic_shard_rows(rows, shard, shards),
                )?;
                let p = self
                    .pool
                    .run(move || dataset::synthetic_shard(rows, f, kind, seed, shard, shards))
                    .await?;
                Ok(Loaded::Owned(p))
            }
            DatasetSource::Imported { import, segments } => {
                let count = segments.get(shard as usize).copied().unwrap_or(0);
                let keys: Vec<String> = (0..count)
                    .map(|seg| segment_key(&ds.name, import, shard, seg))
                    .collect();
                if self.spill.is_some() {
                    return self.load_file(ds, shard, keys, Vec::new()).await;
                }
                let blobs = self.fetch(ds, shard, keys).await?;
                let features = ds.features.len();
                Ok(self
                    .pool
                    .run(move || decode_segments(&blobs, features, &[], false))
                    .await??)
            }
            DatasetSource::Ingested {
                import,
                splits,
                fill,
                ..
            } => {
                // The shard's splits in split order, each split's segments in order.
                let keys: Vec<String> = splits
                    .iter()
                    .enumerate()
                    .filter(|(_, (s, _))| *s == shard)
                    .flat_map(|(i, &(_, n))| {
                        (0..n).map(move |seg| split_segment_key(&ds.name, import, i as u32, seg))
                    })
                    .collect();
                if self.spill.is_some() {
                    return self.load_file(ds, shard, keys, fill.clone()).await;
                }
                let blobs = self.fetch(ds, shard, keys).await?;
                let (features, fill) = (ds.feature_count(), fill.clone());
                let sparse = ds.sparse().is_some();
                Ok(self
                    .pool
                    .run(move || decode_segments(&blobs, features, &fill, sparse))
                    .await??)
            }
        }
    }

    /// A stored partition as a mapped local file: written from its segments, one at a time,
    /// the first time (the nulls of a `fill_mean` import filled in), checked once, mapped.
    async fn load_file(
        &self,
        ds: &DatasetRecord,
        shard: u32,
        keys: Vec<String>,
        fill: Vec<f32>,
    ) -> Result<Loaded, LoadError> {
        let Some(spill) = &self.spill else {
            return Err(LoadError::Retry(JobExecError::MissingObject(
                "no partition directory".into(),
            )));
        };
        let key = cache_key(ds, shard);
        let path = spill.path(&ds.name, &key.0, shard);
        let features = ds.feature_count();
        let sparse = ds.sparse().is_some();
        // A file this process wrote and checked maps again without reading it all.
        let checked = self.cache.lock().files.contains_key(&key) && path.exists();
        if !checked {
            let mut w = if sparse {
                PartitionFileWriter::create_sparse(&path, features)?
            } else {
                PartitionFileWriter::create(&path, features)?
            };
            for k in keys {
                let bytes = self
                    .store
                    .get_blob(&k)
                    .await?
                    .ok_or_else(|| LoadError::Retry(JobExecError::MissingObject(k)))?;
                let fill = fill.clone();
                w = self
                    .pool
                    .run(move || -> Result<PartitionFileWriter, JobExecError> {
                        let buf = PartitionBuf::from_bytes(&bytes)?;
                        match (buf.any_view()?, sparse) {
                            (AnyView::Sparse(v), true) => {
                                w.append_sparse(v.row_ids(), v.labels(), &v.csr())?;
                            }
                            (AnyView::Dense(v), false) => {
                                check_width(v.n_features(), features)?;
                                if fill.len() == features && features > 0 {
                                    let mut x = v.features().to_vec();
                                    for (k, v) in x.iter_mut().enumerate() {
                                        if v.is_nan() {
                                            *v = fill[k % features];
                                        }
                                    }
                                    w.append(v.row_ids(), v.labels(), &x)?;
                                } else {
                                    w.append(v.row_ids(), v.labels(), v.features())?;
                                }
                            }
                            (_, sparse) => return Err(JobExecError::Layout { sparse }),
                        }
                        Ok(w)
                    })
                    .await??;
                // One partition is mapped per worker at a time: it must fit half the budget
                // (the cache takes the other half).
                self.within_budget(ds, shard, w.rows().saturating_mul(2))?;
            }
            self.pool.run(move || w.finish()).await??;
        }
        let mapped_path = path.clone();
        let map = self
            .pool
            .run(move || -> Result<memmap2::Mmap, JobExecError> {
                let map = spill::map(&mapped_path)?;
                let v = if checked {
                    AnyView::parse_checked_before(&map)?
                } else {
                    AnyView::parse(&map)?
                };
                match v {
                    AnyView::Dense(v) if !sparse => check_width(v.n_features(), features)?,
                    AnyView::Sparse(v) if sparse && v.csr().columns() <= features => {}
                    _ => return Err(JobExecError::Layout { sparse }),
                }
                Ok(map)
            })
            .await??;
        self.cache.lock().files.insert(key, path);
        Ok(Loaded::Mapped(map))
    }

    /// Reads the objects at `keys` (one shard's segments), checking the rows they hold against
    /// the budget before holding more.
    async fn fetch(
        &self,
        ds: &DatasetRecord,
        shard: u32,
        keys: Vec<String>,
    ) -> Result<Vec<Bytes>, LoadError> {
        let mut blobs: Vec<Bytes> = Vec::new();
        let mut bytes_so_far = 0u64;
        let row_bytes = admin_checks::data_shape(ds).bytes_of(1).max(1);
        for key in keys {
            let bytes = self
                .store
                .get_blob(&key)
                .await?
                .ok_or_else(|| LoadError::Retry(JobExecError::MissingObject(key)))?;
            // Decoding several segments copies them into one partition: check the rows they
            // hold so far before holding (and copying) more.
            bytes_so_far += bytes.len() as u64;
            self.within_budget(ds, shard, bytes_so_far / row_bytes)?;
            blobs.push(bytes);
        }
        Ok(blobs)
    }
}

/// A dense segment must have the dataset's width.
fn check_width(got: usize, want: usize) -> Result<(), JobExecError> {
    if got == want {
        Ok(())
    } else {
        Err(JobExecError::Features { got, want })
    }
}

/// One partition from a shard's segments: read in place when there is one and nothing to fill,
/// else copied into one; `fill` (a `fill_mean` import's values, per feature) replaces the NaN
/// that marks a null. `sparse`: the segments are sparse rows, joined `features` columns wide.
fn decode_segments(
    blobs: &[Bytes],
    features: usize,
    fill: &[f32],
    sparse: bool,
) -> Result<Loaded, JobExecError> {
    let layout = |v: &AnyView<'_>| match (v, sparse) {
        (AnyView::Dense(v), false) => check_width(v.n_features(), features),
        (AnyView::Sparse(v), true) if v.csr().columns() <= features => Ok(()),
        _ => Err(JobExecError::Layout { sparse }),
    };
    if let ([one], []) = (blobs, fill) {
        let buf = PartitionBuf::from_bytes(one)?;
        layout(&buf.any_view()?)?;
        return Ok(Loaded::InPlace(buf));
    }
    if sparse {
        let mut joined = SparsePartition::new(features);
        for b in blobs {
            let buf = PartitionBuf::from_bytes(b)?;
            match buf.any_view()? {
                AnyView::Sparse(v) => joined.extend(&v)?,
                AnyView::Dense(_) => return Err(JobExecError::Layout { sparse }),
            }
        }
        return Ok(Loaded::Sparse(joined));
    }
    let (mut ids, mut y, mut x) = (Vec::new(), Vec::new(), Vec::new());
    for b in blobs {
        let buf = PartitionBuf::from_bytes(b)?;
        let v = buf.view()?;
        check_width(v.n_features(), features)?;
        ids.extend_from_slice(v.row_ids());
        y.extend_from_slice(v.labels());
        x.extend_from_slice(v.features());
    }
    if fill.len() == features && features > 0 {
        for (k, v) in x.iter_mut().enumerate() {
            if v.is_nan() {
                *v = fill[k % features];
            }
        }
    }
    Ok(Loaded::Owned(Partition::new(features, ids, y, x)?))
}

//! Imports from object storage on a node: the `dataset import URL` request (plan, then record
//! the plan through Raft), `dataset import-status`, and the manager that reads the splits of
//! the shards this node serves.
//!
//! The manager keeps at most [`SPLITS_AT_ONCE`] splits in flight per node. A split whose shard
//! moves away is dropped (its new owner reads it again, writing the same objects); a data error
//! (a corrupt file, a refused null, a value that is not a number) fails the whole import and
//! deletes what it wrote; a source or storage error is retried with backoff, and fails the
//! import after [`SOURCE_RETRIES`] tries.

use std::collections::HashSet;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use tidepool_runtime::codec::ErrorCode;
use tidepool_runtime::control::{
    ClusterMap, Command, ControlPlane, DatasetSource, Format, ImportRecord, ImportSpec,
    ImportState, NullPolicy, SplitDone,
};
use tidepool_runtime::ingest::{self, source::Source, IngestError};
use tidepool_runtime::metrics as m;
use tidepool_runtime::storage::Store;
use tracing::{info, warn};

use crate::admin_checks::{valid_name, MAX_FEATURES};
use crate::job_admin::{AdminError, Running};
use crate::job_exec::import_prefix;
use crate::router::Router;

/// Splits one node reads at once.
pub const SPLITS_AT_ONCE: usize = 2;
/// Tries of a split that fails on the source or the store before the import fails.
pub const SOURCE_RETRIES: usize = 5;
/// Default: string columns with at most this many values become one-hot columns.
pub const DEFAULT_MAX_CATEGORIES: u32 = 32;
/// Default: columns a hashed string column becomes.
pub const DEFAULT_HASH_BUCKETS: u32 = 1024;
/// Default split size (source bytes).
pub const DEFAULT_SPLIT_BYTES: u64 = 64 << 20;

/// The `DatasetImport` payload; absent fields take the defaults above.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportArg {
    pub name: String,
    pub url: String,
    pub label: String,
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub nulls: Option<NullPolicy>,
    #[serde(default)]
    pub max_categories: Option<u32>,
    #[serde(default)]
    pub hash_buckets: Option<u32>,
    #[serde(default)]
    pub split_bytes: Option<u64>,
    /// libsvm: indices start at 0 (default: at 1).
    #[serde(default)]
    pub zero_based: bool,
}

/// The spec `arg` asks for, with defaults, or why it is malformed.
pub fn resolve(arg: &ImportArg) -> Result<ImportSpec, String> {
    if !valid_name(&arg.name) {
        return Err("dataset names must be [A-Za-z0-9_.-]{1,64}".into());
    }
    let scheme = arg.url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("file" | "s3" | "gs" | "az")) {
        return Err(format!(
            "{:?}: the cluster reads file://, s3://, gs:// or az:// URLs",
            arg.url
        ));
    }
    let format = match arg.format {
        Some(f) => f,
        None => ingest::source::format_of(&arg.url).ok_or_else(|| {
            format!(
                "cannot tell the format of {:?} from its name: give --format parquet|csv|arrow|libsvm",
                arg.url
            )
        })?,
    };
    let label = match format {
        // A libsvm line's first field is its label; the name is only what describe shows.
        Format::Libsvm if !arg.features.is_empty() || arg.nulls.is_some_and(|n| n != NullPolicy::Refuse) => {
            return Err("a libsvm import takes no --features or --nulls (every line is `label index:value ...`)".into())
        }
        Format::Libsvm if arg.label.is_empty() => "label".to_string(),
        _ if arg.zero_based => return Err("--zero-based is for libsvm imports".into()),
        _ => arg.label.clone(),
    };
    if label.is_empty() || arg.features.len() > MAX_FEATURES {
        return Err("a label column and at most 100000 feature columns".into());
    }
    let hash_buckets = arg.hash_buckets.unwrap_or(DEFAULT_HASH_BUCKETS);
    if !(1..=1 << 20).contains(&hash_buckets) {
        return Err("hash_buckets must be 1..=1048576".into());
    }
    Ok(ImportSpec {
        url: arg.url.clone(),
        format,
        label,
        features: arg.features.clone(),
        nulls: arg.nulls.unwrap_or_default(),
        max_categories: arg.max_categories.unwrap_or(DEFAULT_MAX_CATEGORIES),
        hash_buckets,
        split_bytes: arg.split_bytes.unwrap_or(DEFAULT_SPLIT_BYTES).max(1),
        zero_based: arg.zero_based,
    })
}

/// The id of importing `spec` as `dataset`: the same request twice is the same import.
pub fn import_id(dataset: &str, spec: &ImportSpec) -> String {
    let text = serde_json::to_string(&(dataset, spec)).unwrap_or_default();
    format!("g{:015x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()) >> 4)
}

/// Where an import stands, as `dataset import-status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportStatus {
    pub id: String,
    pub dataset: String,
    pub url: String,
    pub format: Format,
    pub state: ImportState,
    pub error: Option<String>,
    pub splits: usize,
    pub splits_done: usize,
    pub bytes: u64,
    pub bytes_done: u64,
    pub rows: u64,
    pub dropped: u64,
    /// Features per row: the planned columns, or for a sparse (libsvm) import the widest
    /// split's so far.
    pub features: usize,
    /// Sparse imports: stored entries (non-zeros) so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnz: Option<u64>,
    /// Once succeeded: the content checksum (hex).
    pub checksum: Option<String>,
}

impl From<&ImportRecord> for ImportStatus {
    fn from(r: &ImportRecord) -> Self {
        let (bytes, bytes_done) = r.bytes();
        ImportStatus {
            id: r.id.clone(),
            dataset: r.dataset.clone(),
            url: r.spec.url.clone(),
            format: r.spec.format,
            state: r.state,
            error: r.error.clone(),
            splits: r.splits.len(),
            splits_done: r.done.iter().flatten().count(),
            bytes,
            bytes_done,
            rows: r.rows_done(),
            dropped: r.done.iter().flatten().map(|d| d.dropped).sum(),
            features: if r.is_sparse() {
                r.done
                    .iter()
                    .flatten()
                    .map(|d| d.columns)
                    .max()
                    .unwrap_or(0) as usize
            } else {
                r.width()
            },
            nnz: r
                .is_sparse()
                .then(|| r.done.iter().flatten().map(|d| d.nnz).sum()),
            checksum: (r.state == ImportState::Succeeded)
                .then(|| r.checksum().map(|c| format!("{c:016x}")))
                .flatten(),
        }
    }
}

fn bad(msg: impl Into<String>) -> AdminError {
    (ErrorCode::BadRequest, msg.into())
}

/// `dataset import URL`: plans the import and records it. Idempotent: the same request again
/// answers with the same import (running or done).
pub async fn start(
    control: &ControlPlane,
    store: &Store,
    allowed: &[String],
    arg: ImportArg,
) -> Result<ImportStatus, AdminError> {
    let spec = resolve(&arg).map_err(bad)?;
    let id = import_id(&arg.name, &spec);
    let map = control.map().borrow().clone();
    if let Some(ds) = map.datasets.get(&arg.name) {
        return match (&ds.source, map.imports.get(&id)) {
            (DatasetSource::Ingested { import, .. }, Some(rec)) if *import == id => {
                Ok(ImportStatus::from(rec))
            }
            _ => Err((
                ErrorCode::Conflict,
                format!("dataset {:?} already exists", arg.name),
            )),
        };
    }
    match map.imports.get(&id) {
        Some(rec) if rec.state == ImportState::Running => return Ok(ImportStatus::from(rec)),
        // Starting over: what the failed attempt wrote goes first.
        Some(rec) => {
            if let Err(e) = store.delete_blobs(&import_prefix(&rec.dataset, &id)).await {
                warn!(import = %id, error = %e, "could not delete a failed import's objects");
            }
        }
        None => {}
    }
    let shards = map.shard_count();
    if shards == 0 {
        return Err(bad("the cluster has no shards yet"));
    }
    // Planning reads footers and, for string columns, decodes their values: off the reactor.
    let (pid, name, pspec, pallowed) =
        (id.clone(), arg.name.clone(), spec.clone(), allowed.to_vec());
    let planned =
        off_reactor(
            async move { ingest::plan::plan(&pid, &name, &pspec, shards, &pallowed).await },
        )
        .await
        .map_err(|e| bad(e.to_string()))?;
    let rec = planned.record;
    if rec.width() > MAX_FEATURES {
        return Err(bad(format!(
            "{} features after encoding (at most {MAX_FEATURES}): lower max_categories or hash_buckets",
            rec.width()
        )));
    }
    for (col, ty) in &planned.skipped {
        info!(import = %id, column = %col, r#type = %ty, "column left out: its type does not import");
    }
    match control
        .propose(Command::StartImport(Box::new(rec.clone())))
        .await
    {
        Ok(r) if r.is_ok() => {}
        Ok(r) => {
            let why = r.rejection().unwrap_or("rejected").to_string();
            let code = if why.contains("exists") || why.contains("being imported") {
                ErrorCode::Conflict
            } else {
                ErrorCode::BadRequest
            };
            return Err((code, why));
        }
        Err(e) => return Err((ErrorCode::Internal, format!("control plane: {e}"))),
    }
    info!(
        import = %id,
        dataset = %arg.name,
        url = %spec.url,
        splits = rec.splits.len(),
        features = rec.width(),
        "import started"
    );
    Ok(ImportStatus::from(&rec))
}

/// The `DatasetImportStatus` payload: an import id, or a dataset name (its latest import).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusArg {
    pub id: Option<String>,
    pub name: Option<String>,
}

/// `dataset import-status`.
pub fn status(map: &ClusterMap, arg: &StatusArg) -> Result<ImportStatus, AdminError> {
    let found = match (&arg.id, &arg.name) {
        (Some(id), _) => map.imports.get(id),
        (None, Some(name)) => map
            .imports
            .values()
            .filter(|i| i.dataset == *name)
            // The running one, else the one that created the dataset, else any.
            .max_by_key(|i| {
                let created = matches!(map.datasets.get(name).map(|d| &d.source),
                    Some(DatasetSource::Ingested { import, .. }) if *import == i.id);
                (i.state == ImportState::Running, created)
            }),
        (None, None) => return Err(bad("give an import id or a dataset name, or use list()")),
    };
    found
        .map(ImportStatus::from)
        .ok_or_else(|| (ErrorCode::NotFound, "no such import".to_string()))
}

/// Every import the map holds (running, succeeded, failed), by id.
pub fn list(map: &ClusterMap) -> Vec<ImportStatus> {
    map.imports.values().map(ImportStatus::from).collect()
}

/// What the manager needs.
#[derive(Clone, Debug)]
pub struct ImportCtx {
    pub router: Router,
    pub control: ControlPlane,
    pub store: Store,
    /// `jobs.import_urls`: checked again before every split is read (a plan in the map may have
    /// been proposed by any node).
    pub allowed: std::sync::Arc<Vec<String>>,
}

/// Reads, for every running import, the splits whose shard this node serves.
pub async fn manage(ctx: ImportCtx) {
    let mut rx = ctx.control.map();
    let mut tasks: Running<(String, u32)> = Running::default();
    // Imports this process read splits of: when one fails, what it wrote is deleted (again,
    // after the failure's own cleanup, for a split that was still being written).
    let mut touched: HashSet<String> = HashSet::new();
    loop {
        let map = rx.borrow_and_update().clone();
        tasks.0.retain(|_, h| !h.is_finished());
        // Drop work that is no longer wanted.
        tasks.0.retain(|(id, split), h| {
            let wanted = map.imports.get(id).is_some_and(|imp| {
                imp.state == ImportState::Running
                    && imp.done.get(*split as usize).is_some_and(Option::is_none)
                    && imp
                        .splits
                        .get(*split as usize)
                        .is_some_and(|s| ctx.router.serving(s.shard).is_some())
            });
            if !wanted {
                h.abort();
            }
            wanted
        });
        for imp in map.imports.values() {
            if imp.state == ImportState::Failed && touched.remove(&imp.id) {
                let prefix = import_prefix(&imp.dataset, &imp.id);
                if let Err(e) = ctx.store.delete_blobs(&prefix).await {
                    warn!(%prefix, error = %e, "could not delete a failed import's objects");
                }
            }
            if imp.state != ImportState::Running {
                continue;
            }
            for (i, s) in imp.splits.iter().enumerate() {
                if tasks.0.len() >= SPLITS_AT_ONCE {
                    break;
                }
                let key = (imp.id.clone(), i as u32);
                if imp.done[i].is_some()
                    || tasks.0.contains_key(&key)
                    || ctx.router.serving(s.shard).is_none()
                {
                    continue;
                }
                touched.insert(imp.id.clone());
                let h = tokio::spawn(run_split(ctx.clone(), imp.clone(), i as u32));
                tasks.0.insert(key, h);
            }
        }
        // Shard ownership changes on the router, not only in the map: poll it too.
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
    }
}

/// Runs `work` (decoding Parquet, parsing CSV or libsvm: CPU work) on a blocking thread that
/// drives it on this runtime, never on the reactor that renews the node's leases.
async fn off_reactor<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, IngestError>> + Send + 'static,
) -> Result<T, IngestError> {
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || rt.block_on(work))
        .await
        .unwrap_or_else(|e| {
            // A decoder that panics on a malformed file (the arrow and parquet crates have a few
            // such paths) fails the import like any data error; the node goes on.
            if e.is_panic() {
                metrics::counter!(m::IMPORT_SPLITS, "outcome" => "decoder_panic").increment(1);
                return Err(IngestError::Data(format!(
                    "a decoder failed on malformed input: {}",
                    panic_text(e.into_panic())
                )));
            }
            Err(IngestError::Source {
                url: String::new(),
                reason: format!("import worker: {e}"),
            })
        })
}

/// The message of a caught panic.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Reads one split and reports it; a data error fails the import.
async fn run_split(ctx: ImportCtx, imp: ImportRecord, split: u32) {
    let bytes = imp.splits.get(split as usize).map_or(0, |s| s.bytes);
    let read = || {
        let (imp, store, allowed) = (imp.clone(), ctx.store.clone(), ctx.allowed.clone());
        off_reactor(async move {
            let src = Source::open(&imp.spec.url, &allowed)?;
            ingest::read::read_split(&src, &imp, split, &store).await
        })
    };
    let outcome = read
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(SOURCE_RETRIES)
                .with_jitter(),
        )
        .when(|e: &IngestError| !e.is_data())
        .notify(|e, wait| {
            metrics::counter!(m::IMPORT_SPLITS, "outcome" => "retried").increment(1);
            warn!(import = %imp.id, split, error = %e, ?wait, "import split failed; retrying");
        })
        .await;
    match outcome {
        Ok(done) => report(&ctx, &imp, split, done, bytes).await,
        Err(e) => {
            metrics::counter!(m::IMPORT_SPLITS, "outcome" => "failed").increment(1);
            warn!(import = %imp.id, split, error = %e, "import failed");
            let cmd = Command::FailImport {
                id: imp.id.clone(),
                error: e.to_string(),
            };
            if let Err(e) = ctx.control.propose(cmd).await {
                warn!(import = %imp.id, error = %e, "could not record the import's failure");
                return;
            }
            let prefix = import_prefix(&imp.dataset, &imp.id);
            if let Err(e) = ctx.store.delete_blobs(&prefix).await {
                warn!(%prefix, error = %e, "could not delete a failed import's objects");
            }
        }
    }
}

async fn report(ctx: &ImportCtx, imp: &ImportRecord, split: u32, done: SplitDone, bytes: u64) {
    let rows = done.rows;
    let cmd = Command::ImportSplitDone {
        id: imp.id.clone(),
        split,
        done: Box::new(done),
    };
    match ctx.control.propose(cmd).await {
        Ok(r) if r.is_ok() => {
            metrics::counter!(m::IMPORT_SPLITS, "outcome" => "done").increment(1);
            metrics::counter!(m::IMPORT_ROWS).increment(rows);
            metrics::counter!(m::IMPORT_BYTES).increment(bytes);
        }
        // The manager sees the split still open and reads it again (if this node still owns
        // its shard).
        Ok(r) => warn!(import = %imp.id, split, reason = ?r.rejection(), "split report refused"),
        Err(e) => warn!(import = %imp.id, split, error = %e, "split report not recorded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decoder_panic_fails_the_import_and_the_node_goes_on() {
        let err = off_reactor(async {
            if true {
                panic!("unsupported bitwidth");
            }
            Ok::<(), IngestError>(())
        })
        .await;
        match err {
            Err(e @ IngestError::Data(_)) => {
                assert!(
                    e.is_data() && e.to_string().contains("unsupported bitwidth"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(off_reactor(async { Ok(7) }).await.ok(), Some(7));
    }
}

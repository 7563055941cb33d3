//! Cluster-side imports in the replicated map: the plan (splits of the source files, each on a
//! shard), per-split completion, and the dataset record the last completion creates.
//!
//! An import is planned once (the files, their row groups or byte ranges, the output columns)
//! and recorded with [`start_import`]; every split names the shard whose owner reads it. Owners
//! report each split they wrote with [`split_done`]: the first report of a split counts, a
//! repeat (a retry, or a stale owner finishing a split its successor already finished) changes
//! nothing. Split contents are a pure function of the source and the plan, so whoever reads a
//! split writes the same rows. When the last split is done the same apply creates the
//! [`DatasetRecord`]: the dataset becomes visible at once, with every row, or never (a failed
//! import, [`fail_import`], creates nothing).

use serde::{Deserialize, Serialize};

use super::records::{DatasetRecord, DatasetSource, SparseShape};
use super::types::{ClusterMap, CommandResponse};

/// Most splits one import may plan (the plan lives in the replicated map).
pub const MAX_SPLITS: usize = 20_000;

/// Input format of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Parquet,
    Csv,
    /// Arrow IPC files (Feather v2).
    Arrow,
    /// libsvm / svmlight text: `label index:value ...` per line, sparse rows.
    Libsvm,
}

impl Format {
    /// The stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
            Format::Arrow => "arrow",
            Format::Libsvm => "libsvm",
        }
    }
}

/// What a null (a Parquet null, an empty CSV cell) becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NullPolicy {
    /// The import fails, naming the file, row group (or byte range) and row.
    #[default]
    Refuse,
    /// The row is left out.
    DropRow,
    /// The column's mean over every non-null value of the whole dataset.
    FillMean,
}

impl NullPolicy {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            NullPolicy::Refuse => "refuse",
            NullPolicy::DropRow => "drop_row",
            NullPolicy::FillMean => "fill_mean",
        }
    }
}

/// What the user asked for (after defaults): the same spec of the same dataset name is the same
/// import (its id is derived from both), so running it again is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImportSpec {
    /// `file://`, `s3://`, `gs://` or `az://`: one object, a prefix, or a glob in the last part.
    pub url: String,
    pub format: Format,
    /// The label column.
    pub label: String,
    /// Feature columns in this order; empty: every column but the label, in file order.
    pub features: Vec<String>,
    pub nulls: NullPolicy,
    /// String columns with at most this many distinct values become one-hot columns (sorted
    /// values); more, and they are hashed into [`ImportSpec::hash_buckets`] columns.
    pub max_categories: u32,
    /// Columns a hashed string column becomes.
    pub hash_buckets: u32,
    /// Target split size in source bytes (Parquet: whole row groups up to it, at least one).
    pub split_bytes: u64,
    /// libsvm: the source's feature indices start at 0 (default: at 1, libsvm's convention).
    /// Left out of the JSON when false, so imports planned before it keep their ids.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero_based: bool,
}

/// How one source column becomes output features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "encoding", rename_all = "snake_case")]
pub enum ColumnPlan {
    /// A number (integer, float, double, boolean as 0/1): one feature.
    Numeric { name: String },
    /// A string with few values: one 0/1 feature per value (`name=value`), in this order.
    OneHot { name: String, values: Vec<String> },
    /// A string with many values: `buckets` features (`name#k`); a value sets feature
    /// `xxh3_64(value) % buckets` to 1.
    Hashed { name: String, buckets: u32 },
    /// libsvm rows: sparse features whose count is known only once every split is read
    /// (the largest index seen); [`ColumnPlan::width`] is 0.
    Sparse { name: String },
}

impl ColumnPlan {
    /// The source column's name.
    pub fn name(&self) -> &str {
        match self {
            ColumnPlan::Numeric { name }
            | ColumnPlan::OneHot { name, .. }
            | ColumnPlan::Hashed { name, .. }
            | ColumnPlan::Sparse { name } => name,
        }
    }

    /// Output features this column becomes.
    pub fn width(&self) -> usize {
        match self {
            ColumnPlan::Numeric { .. } => 1,
            ColumnPlan::OneHot { values, .. } => values.len(),
            ColumnPlan::Hashed { buckets, .. } => *buckets as usize,
            ColumnPlan::Sparse { .. } => 0,
        }
    }

    /// Output feature names, in order.
    pub fn feature_names(&self) -> Vec<String> {
        match self {
            ColumnPlan::Numeric { name } => vec![name.clone()],
            ColumnPlan::OneHot { name, values } => {
                values.iter().map(|v| format!("{name}={v}")).collect()
            }
            ColumnPlan::Hashed { name, buckets } => {
                (0..*buckets).map(|k| format!("{name}#{k}")).collect()
            }
            ColumnPlan::Sparse { .. } => Vec::new(),
        }
    }
}

/// Which part of a file a split reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "unit", rename_all = "snake_case")]
pub enum SplitUnit {
    /// Parquet row groups (or Arrow IPC record batches) `first..first + count`.
    RowGroups { first: u32, count: u32 },
    /// The lines that start in bytes `start..end` (CSV; the header line is never one of them).
    Bytes { start: u64, end: u64 },
}

/// One unit of import work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// The file's path under the source root (the URL's bucket or directory).
    pub file: String,
    pub unit: SplitUnit,
    /// The shard whose rows these become; its owner reads the split.
    pub shard: u32,
    /// Source bytes (compressed, for Parquet) the split covers.
    pub bytes: u64,
}

/// What reading one split produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitDone {
    /// Rows written (after dropped rows).
    pub rows: u64,
    /// Rows dropped by the null policy.
    pub dropped: u64,
    /// Partition segments written.
    pub segments: u32,
    /// xxh3_64 of the rows written: labels then features, little-endian f32, row by row.
    pub checksum: u64,
    /// `fill_mean` only: per output feature, the sum of its non-null values (in row order)
    /// and their count; empty otherwise.
    pub sums: Vec<f64>,
    pub counts: Vec<u64>,
    /// Sparse (libsvm) splits: columns (the largest column seen, plus one) and stored entries.
    #[serde(default)]
    pub columns: u64,
    #[serde(default)]
    pub nnz: u64,
}

/// Where an import stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportState {
    Running,
    Succeeded,
    Failed,
}

impl ImportState {
    /// The stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportState::Running => "running",
            ImportState::Succeeded => "succeeded",
            ImportState::Failed => "failed",
        }
    }
}

/// One import from storage, planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportRecord {
    /// The import's id: derived from the dataset name and the spec; its storage prefix.
    pub id: String,
    /// The dataset it creates.
    pub dataset: String,
    pub spec: ImportSpec,
    /// Source feature columns and how each is encoded, in output order.
    pub columns: Vec<ColumnPlan>,
    /// Shard count the splits were planned for (the cluster's).
    pub shards: u32,
    pub splits: Vec<Split>,
    /// Per split, once read.
    pub done: Vec<Option<SplitDone>>,
    pub state: ImportState,
    pub error: Option<String>,
}

impl ImportRecord {
    /// Output feature names, in order.
    pub fn features(&self) -> Vec<String> {
        self.columns
            .iter()
            .flat_map(ColumnPlan::feature_names)
            .collect()
    }

    /// True for a sparse (libsvm) import.
    pub fn is_sparse(&self) -> bool {
        self.spec.format == Format::Libsvm
    }

    /// Output features per row (0 for a sparse import: known once every split is read).
    pub fn width(&self) -> usize {
        self.columns.iter().map(ColumnPlan::width).sum()
    }

    /// Source bytes of every split, and of the splits done.
    pub fn bytes(&self) -> (u64, u64) {
        let total = self.splits.iter().map(|s| s.bytes).sum();
        let done = self
            .splits
            .iter()
            .zip(&self.done)
            .filter(|(_, d)| d.is_some())
            .map(|(s, _)| s.bytes)
            .sum();
        (total, done)
    }

    /// Rows written so far.
    pub fn rows_done(&self) -> u64 {
        self.done.iter().flatten().map(|d| d.rows).sum()
    }

    /// The content checksum of the whole dataset: xxh3_64 over the splits' checksums in split
    /// order (little-endian). `None` until every split is done.
    pub fn checksum(&self) -> Option<u64> {
        let mut bytes = Vec::with_capacity(self.done.len() * 8);
        for d in &self.done {
            bytes.extend_from_slice(&d.as_ref()?.checksum.to_le_bytes());
        }
        Some(xxhash_rust::xxh3::xxh3_64(&bytes))
    }
}

/// Assigns splits (in order) to shards, each to the shard with the fewest bytes so far (the
/// lowest id on a tie): deterministic, and balanced by source bytes.
pub fn assign_shards(splits: &mut [Split], shards: u32) {
    let mut load = vec![0u64; shards.max(1) as usize];
    for s in splits {
        let (shard, _) = load
            .iter()
            .enumerate()
            .min_by_key(|&(i, &b)| (b, i))
            .unwrap_or((0, &0));
        s.shard = shard as u32;
        load[shard] += s.bytes.max(1);
    }
}

fn check_plan(map: &ClusterMap, rec: &ImportRecord) -> Result<(), String> {
    if rec.dataset.is_empty() || rec.id.is_empty() {
        return Err("import id and dataset name must not be empty".into());
    }
    if rec.shards != map.shard_count() || rec.shards == 0 {
        return Err(format!(
            "import planned for {} shards, the cluster has {}",
            rec.shards,
            map.shard_count()
        ));
    }
    if rec.splits.is_empty() || rec.splits.len() > MAX_SPLITS {
        return Err(format!(
            "an import needs 1 to {MAX_SPLITS} splits, got {}",
            rec.splits.len()
        ));
    }
    if rec.done.len() != rec.splits.len() || rec.done.iter().any(Option::is_some) {
        return Err("a new import has no split done".into());
    }
    if rec.splits.iter().any(|s| s.shard >= rec.shards) {
        return Err("a split names a shard out of range".into());
    }
    let sparse_ok = rec.is_sparse()
        && matches!(rec.columns.as_slice(), [ColumnPlan::Sparse { .. }])
        && rec.spec.nulls == NullPolicy::Refuse;
    let dense_ok = !rec.is_sparse()
        && rec.width() > 0
        && !rec
            .columns
            .iter()
            .any(|c| matches!(c, ColumnPlan::Sparse { .. }));
    if !(sparse_ok || dense_ok) {
        return Err("an import needs at least one feature (a libsvm import one sparse column plan, nulls refused)".into());
    }
    if rec.state != ImportState::Running || rec.error.is_some() {
        return Err("a new import is running, with no error".into());
    }
    Ok(())
}

/// Records a planned import. The same id again is `Ok` while it runs (a retried proposal, or the
/// same import started twice) and starts over once it failed, or once the dataset it created was
/// deleted. `Rejected`: a dataset of that name exists, another import of that name runs, or the
/// plan is malformed.
pub(super) fn start_import(map: &mut ClusterMap, rec: &ImportRecord) -> CommandResponse {
    if let Err(e) = check_plan(map, rec) {
        return CommandResponse::Rejected(e);
    }
    if let Some(ds) = map.datasets.get(&rec.dataset) {
        return CommandResponse::Rejected(match &ds.source {
            DatasetSource::Ingested { import, .. } if *import == rec.id => {
                format!(
                    "dataset {:?} is already imported (import {import})",
                    ds.name
                )
            }
            _ => format!("dataset {:?} already exists", ds.name),
        });
    }
    if let Some(other) = map
        .imports
        .values()
        .find(|i| i.dataset == rec.dataset && i.id != rec.id && i.state == ImportState::Running)
    {
        return CommandResponse::Rejected(format!(
            "dataset {:?} is being imported by import {}",
            rec.dataset, other.id
        ));
    }
    match map.imports.get(&rec.id) {
        Some(i) if i.state == ImportState::Running => CommandResponse::Ok,
        _ => {
            map.imports.insert(rec.id.clone(), rec.clone());
            CommandResponse::Ok
        }
    }
}

/// Records split `split` of import `id` as read. `Ok` and no change for a split already done or
/// an import no longer running; the last split creates the dataset.
pub(super) fn split_done(
    map: &mut ClusterMap,
    id: &str,
    split: u32,
    done: &SplitDone,
) -> CommandResponse {
    let Some(imp) = map.imports.get_mut(id) else {
        return CommandResponse::Rejected(format!("no import {id:?}"));
    };
    if imp.state != ImportState::Running {
        return CommandResponse::Ok;
    }
    let width = imp.width();
    let fill = imp.spec.nulls == NullPolicy::FillMean;
    let want = if fill { width } else { 0 };
    if done.sums.len() != want || done.counts.len() != want {
        return CommandResponse::Rejected(format!(
            "import {id}: split {split} reports {} column sums, want {want}",
            done.sums.len()
        ));
    }
    let sparse = imp.is_sparse();
    if (!sparse && (done.columns != 0 || done.nnz != 0)) || done.columns > u64::from(u32::MAX) {
        return CommandResponse::Rejected(format!(
            "import {id}: split {split} reports {} columns and {} entries",
            done.columns, done.nnz
        ));
    }
    let Some(slot) = imp.done.get_mut(split as usize) else {
        return CommandResponse::Rejected(format!("import {id}: no split {split}"));
    };
    if slot.is_some() {
        return CommandResponse::Ok;
    }
    *slot = Some(done.clone());
    if imp.done.iter().any(Option::is_none) {
        return CommandResponse::Ok;
    }
    let rows = imp.rows_done();
    let result = if rows == 0 {
        Err("no rows (every row was dropped, or the files are empty)".to_string())
    } else if sparse && imp.done.iter().flatten().all(|d| d.columns == 0) {
        Err("no features (every row is empty)".to_string())
    } else if map.datasets.contains_key(&imp.dataset) {
        Err(format!(
            "dataset {:?} was created by another import meanwhile",
            imp.dataset
        ))
    } else {
        Ok(dataset_of(imp, rows, fill))
    };
    match result {
        Ok(ds) => {
            imp.state = ImportState::Succeeded;
            map.datasets.insert(ds.name.clone(), ds);
        }
        Err(e) => {
            imp.state = ImportState::Failed;
            imp.error = Some(e);
        }
    }
    CommandResponse::Ok
}

/// The dataset a finished import creates.
fn dataset_of(imp: &ImportRecord, rows: u64, fill: bool) -> DatasetRecord {
    let width = imp.width();
    let mut fill_values = Vec::new();
    if fill {
        let (mut sums, mut counts) = (vec![0f64; width], vec![0u64; width]);
        for d in imp.done.iter().flatten() {
            for j in 0..width {
                sums[j] += d.sums[j];
                counts[j] += d.counts[j];
            }
        }
        fill_values = sums
            .iter()
            .zip(&counts)
            .map(|(&s, &c)| if c == 0 { 0.0 } else { (s / c as f64) as f32 })
            .collect();
    }
    let sparse = imp.is_sparse().then(|| SparseShape {
        columns: imp
            .done
            .iter()
            .flatten()
            .map(|d| d.columns)
            .max()
            .unwrap_or(0),
        nnz: imp.done.iter().flatten().map(|d| d.nnz).sum(),
        first_index: u32::from(!imp.spec.zero_based),
    });
    DatasetRecord {
        name: imp.dataset.clone(),
        features: imp.features(),
        label: imp.spec.label.clone(),
        rows,
        shards: imp.shards,
        source: DatasetSource::Ingested {
            import: imp.id.clone(),
            url: imp.spec.url.clone(),
            splits: imp
                .splits
                .iter()
                .zip(&imp.done)
                .map(|(s, d)| (s.shard, d.as_ref().map_or(0, |d| d.segments)))
                .collect(),
            checksum: imp.checksum().unwrap_or(0),
            fill: fill_values,
            sparse,
        },
    }
}

/// Marks a running import failed with `error`; `Ok` and no change for one not running.
pub(super) fn fail_import(map: &mut ClusterMap, id: &str, error: &str) -> CommandResponse {
    let Some(imp) = map.imports.get_mut(id) else {
        return CommandResponse::Rejected(format!("no import {id:?}"));
    };
    if imp.state == ImportState::Running {
        imp.state = ImportState::Failed;
        imp.error = Some(error.to_string());
    }
    CommandResponse::Ok
}

#[cfg(test)]
#[path = "imports_tests.rs"]
mod tests;

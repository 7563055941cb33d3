//! Validation of dataset admin payloads (sans-IO): what a commit, an abort or a delete may touch.
//!
//! The CLI only ever sends well-formed payloads, but any admin client can send any JSON, and the
//! storage calls behind these requests delete by prefix. So every payload is checked here first,
//! against the current map, and the answer says exactly which import prefix (if any) may be
//! deleted: never a committed dataset's, never a prefix built from an empty or odd name (an empty
//! import id once turned `datasets/NAME/{import}` into `datasets/NAME`, every import of the
//! dataset).

use tidepool_runtime::admission::{self, Limits};
use tidepool_runtime::control::{ClusterMap, DatasetRecord, DatasetSource};

use crate::job_exec::import_prefix;

/// Most features a dataset may have.
pub const MAX_FEATURES: usize = 100_000;
/// Most partition segments one shard of an import may have (8 MiB each: 8 TiB per shard).
pub const MAX_SEGMENTS: u32 = 1 << 20;

/// The rows a job over `ds` reads, for admission: dense, or sparse with its stored entries.
pub fn data_shape(ds: &DatasetRecord) -> admission::DataShape {
    admission::DataShape {
        rows: ds.rows,
        features: ds.feature_count() as u64,
        nnz: ds.sparse().map(|s| s.nnz),
    }
}

/// Why a dataset payload is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{what} {name:?} is not a valid name ([A-Za-z0-9_.-]{{1,64}}, not starting with '.')")]
    Name { what: &'static str, name: String },
    #[error("dataset {0:?} already exists (delete it first, or import under another name)")]
    Exists(String),
    #[error("import {import:?} is committed as dataset {name:?}; delete the dataset instead")]
    Committed { name: String, import: String },
    #[error("dataset {0:?}: {1}")]
    Shape(String, String),
    #[error("dataset {0:?} is used by job {1} ({2}); cancel it first")]
    InUse(String, String, &'static str),
    #[error("dataset {0:?}: {1}")]
    TooLarge(String, admission::AdmissionError),
}

/// Valid dataset and import names: `[A-Za-z0-9_.-]{1,64}`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn name(what: &'static str, name: &str) -> Result<(), PayloadError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(PayloadError::Name {
            what,
            name: name.to_string(),
        })
    }
}

/// What a valid commit does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The same record is already committed (a retried commit): answer ok, touch nothing.
    Retry,
    /// A new dataset: check its import's segments are stored, then propose it.
    New,
}

/// Checks a `DatasetCommit` payload against the map and this node's admission limits.
pub fn check_commit(
    rec: &DatasetRecord,
    map: &ClusterMap,
    limits: &Limits,
) -> Result<Commit, PayloadError> {
    name("dataset", &rec.name)?;
    let shape = |why: String| PayloadError::Shape(rec.name.clone(), why);
    if rec.features.is_empty() || rec.features.len() > MAX_FEATURES {
        return Err(shape(format!(
            "{} features (1..={MAX_FEATURES})",
            rec.features.len()
        )));
    }
    if rec.shards != map.shard_count() {
        return Err(shape(format!(
            "partitioned for {} shards, the cluster has {}",
            rec.shards,
            map.shard_count()
        )));
    }
    match &rec.source {
        DatasetSource::Imported { import, segments } => {
            name("import", import)?;
            if segments.len() != rec.shards as usize {
                return Err(shape(format!(
                    "{} segment counts for {} shards",
                    segments.len(),
                    rec.shards
                )));
            }
            if let Some(n) = segments.iter().find(|&&n| n > MAX_SEGMENTS) {
                return Err(shape(format!(
                    "{n} segments in one shard (at most {MAX_SEGMENTS})"
                )));
            }
        }
        DatasetSource::Synthetic { kind, .. } => {
            if !matches!(kind.as_str(), "linear" | "logistic") {
                return Err(shape(format!(
                    "synthetic kind {kind:?} (linear or logistic)"
                )));
            }
            admission::admit_dataset(rec.rows, rec.features.len() as u64, limits)
                .map_err(|e| PayloadError::TooLarge(rec.name.clone(), e))?;
        }
        // Only the cluster's own import creates these, when its last split is done.
        DatasetSource::Ingested { .. } => {
            return Err(shape(
                "a dataset read from storage is created by `dataset import URL`, not committed"
                    .into(),
            ))
        }
    }
    match map.datasets.get(&rec.name) {
        Some(existing) if existing == rec => Ok(Commit::Retry),
        Some(_) => Err(PayloadError::Exists(rec.name.clone())),
        None => Ok(Commit::New),
    }
}

/// The committed import of dataset `name`, if it is an imported one.
fn committed_import<'m>(map: &'m ClusterMap, name: &str) -> Option<&'m str> {
    match map.datasets.get(name).map(|d| &d.source) {
        Some(DatasetSource::Imported { import, .. } | DatasetSource::Ingested { import, .. }) => {
            Some(import)
        }
        _ => None,
    }
}

/// The storage prefix a refused commit of `rec` may delete (its own uploads): only an imported
/// record with a valid import id that no committed dataset uses.
pub fn refused_commit_cleanup(rec: &DatasetRecord, map: &ClusterMap) -> Option<String> {
    match &rec.source {
        DatasetSource::Imported { import, .. }
            if valid_name(&rec.name)
                && valid_name(import)
                && committed_import(map, &rec.name) != Some(import.as_str()) =>
        {
            Some(import_prefix(&rec.name, import))
        }
        _ => None,
    }
}

/// Checks a `DatasetAbort` (`{"name", "import"}`); returns the prefix to delete.
pub fn check_abort(dataset: &str, import: &str, map: &ClusterMap) -> Result<String, PayloadError> {
    name("dataset", dataset)?;
    name("import", import)?;
    if committed_import(map, dataset) == Some(import) {
        return Err(PayloadError::Committed {
            name: dataset.to_string(),
            import: import.to_string(),
        });
    }
    Ok(import_prefix(dataset, import))
}

/// What a valid `DatasetDelete` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delete {
    /// No such dataset (already deleted: a retry): nothing to do.
    Absent,
    /// Remove the record through Raft, then the partition objects under `prefix` (none for a
    /// synthetic dataset).
    Remove { prefix: Option<String> },
}

/// Checks a `DatasetDelete` (`{"name"}`). The Raft command re-checks the jobs atomically; this
/// check gives the same answer early, before anything is proposed.
pub fn check_delete(dataset: &str, map: &ClusterMap) -> Result<Delete, PayloadError> {
    name("dataset", dataset)?;
    if !map.datasets.contains_key(dataset) {
        return Ok(Delete::Absent);
    }
    if let Some(job) = map
        .jobs
        .values()
        .find(|j| j.dataset == dataset && !j.state.is_terminal())
    {
        return Err(PayloadError::InUse(
            dataset.to_string(),
            job.id.clone(),
            job.state.as_str(),
        ));
    }
    Ok(Delete::Remove {
        prefix: committed_import(map, dataset).map(|i| import_prefix(dataset, i)),
    })
}

#[cfg(test)]
#[path = "admin_checks_tests.rs"]
mod tests;

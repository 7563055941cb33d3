//! Cluster-side dataset import: the cluster reads Parquet, CSV and libsvm straight from object
//! storage.
//!
//! - [`source`]: a URL (one object, a prefix, or a glob) resolved to files.
//! - [`plan`]: the files cut into splits (Parquet row groups, CSV and libsvm byte ranges of
//!   whole lines), the output columns (numbers, one-hot or hashed strings), splits onto shards. Done
//!   once, by the node that takes the request; the plan goes into the replicated map
//!   (`tidepool_core::control::imports`).
//! - [`read`]: one split read by its shard's owner, streamed with bounded memory into partition
//!   segments in the in-place format ([`crate::dataset`]).
//!
//! A split's rows are a pure function of the source and the plan: whoever reads it (the first
//! owner, a successor after a kill, a retry) writes the same objects, so the first completion
//! recorded in the map is the one that counts and no row is lost or duplicated.

mod arrow_file;
pub mod columns;
mod lines;
pub mod plan;
pub mod read;
pub mod source;

/// Partition segment `seg` of split `split` of an import.
pub fn split_segment_key(dataset: &str, import: &str, split: u32, seg: u32) -> String {
    format!("datasets/{dataset}/{import}/split-{split:06}-{seg:04}.tdds")
}

/// Why an import could not be planned or a split not read. Data errors name the file and the
/// row group (Parquet) or byte offset (CSV) and row; they fail the import. Source errors may be
/// transient (a retry may work).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    #[error("bad source URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("no files to import at {url}")]
    NoFiles { url: String },
    /// Reading the source failed (network, permissions, a vanished object).
    #[error("reading {url}: {reason}")]
    Source { url: String, reason: String },
    /// The data cannot be imported as asked: schema, types, nulls, values, corrupt files.
    #[error("{0}")]
    Data(String),
    /// Writing a partition segment failed.
    #[error("storing a partition: {0}")]
    Store(#[from] crate::storage::StorageError),
}

impl IngestError {
    /// True for errors no retry can fix (the import fails).
    pub fn is_data(&self) -> bool {
        matches!(
            self,
            IngestError::Data(_) | IngestError::BadUrl { .. } | IngestError::NoFiles { .. }
        )
    }
}

#[cfg(test)]
mod tests;

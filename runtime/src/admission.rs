//! Job and dataset admission (sans-IO): whether a job, or a synthetic dataset, fits the limits of
//! a node *before* anything is allocated or sent, so that no admin input can make a node abort
//! on an allocation or a job retry forever on a message that can never be sent.
//!
//! # The rule
//!
//! - **Data**: `rows x (features x 4 + 12)` bytes (f32 features, f32 label, u64 row id), all of
//!   it counted against *one* node's `jobs.memory_budget_bytes`: shards follow membership, and a
//!   cluster shrunk to one node must still be able to run every job it admitted (the pessimistic
//!   rule; it also bounds `dataset synth`).
//! - **Model**: [`MODEL_COPIES`] copies of the model's values as f64 (parameters, the merged
//!   gradient, the checkpoint being written, the coordinator's copy), added to the data.
//! - **Messages**: a step's task (the broadcast, f64 each, plus the spec) and a node's partial
//!   (fixed-point i128 sums plus f64 minima and maxima) must each fit `transport.max_frame_bytes`,
//!   with [`MESSAGE_OVERHEAD`] bytes of envelope. Both are also counted in the memory need.
//!
//! A softmax spec without `model.classes` learns its class count from the labels; admission
//! assumes 2, and the coordinator re-checks each task's real size before sending it
//! ([`task_bytes`]), failing the job with the numbers if it does not fit.

use crate::jobspec::{JobKind, JobSpec, ModelType};

/// Bytes a partition holds per row besides its features: label (f32) + row id (u64).
pub const ROW_OVERHEAD: u64 = 12;
/// Copies of the model a coordinator may hold at once (see the module docs).
pub const MODEL_COPIES: u64 = 4;
/// Envelope, names and framing around a task's or partial's values.
pub const MESSAGE_OVERHEAD: u64 = 4096;

/// The limits admission checks against (one node's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `jobs.memory_budget_bytes`.
    pub memory_budget_bytes: u64,
    /// `transport.max_frame_bytes`.
    pub max_frame_bytes: u64,
}

/// Why a job or dataset is refused; every message carries the numbers and the config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The job's (or dataset's) memory need is over the node budget.
    #[error(
        "needs {need} bytes per node ({data} of data: {what} of {rows} rows x {features} \
         features, plus {model} for the model and messages), over jobs.memory_budget_bytes = \
         {budget}"
    )]
    Memory {
        /// What must be held at once: the dataset, or one shard's partition.
        what: &'static str,
        need: u64,
        data: u64,
        model: u64,
        rows: u64,
        features: u64,
        budget: u64,
    },
    /// A task or partial message would be larger than a frame may be.
    #[error(
        "{what} message of {bytes} bytes ({values} values) exceeds transport.max_frame_bytes = \
         {cap}"
    )]
    Frame {
        what: &'static str,
        bytes: u64,
        values: u64,
        cap: u64,
    },
}

/// The sizes of one job, in values (see [`shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobShape {
    /// Values the coordinator keeps as the model (parameters, centroids, histograms).
    pub model_values: u64,
    /// Largest broadcast of a step (f64 each).
    pub broadcast_values: u64,
    /// Largest partial's fixed-point sums (i128 each).
    pub partial_sums: u64,
    /// Largest partial's minima plus maxima (f64 each).
    pub partial_extrema: u64,
}

/// The largest messages and model of `spec` on a dataset of `features` features and `shards`
/// shards (mirrors what the jobs in `tidepool-actors` send; see the module docs for softmax).
pub fn shape(spec: &JobSpec, features: u64, shards: u32) -> JobShape {
    let d = features;
    let cols = d.saturating_add(1); // features and the label
    let stats_pass = JobShape {
        model_values: cols.saturating_mul(4),
        broadcast_values: cols.saturating_mul(3).saturating_add(1),
        partial_sums: cols,
        partial_extrema: cols.saturating_mul(2),
    };
    let job = match spec.kind {
        // The weights live in the shards' parameter tables, as for mf.
        JobKind::Sgd if spec.on_params() => JobShape {
            model_values: 8,
            broadcast_values: 2,
            partial_sums: 2,
            partial_extrema: 0,
        },
        JobKind::Sgd | JobKind::LocalSgd => {
            let outputs = match spec.model {
                Some(ModelType::Softmax) => spec.classes.unwrap_or(2) as u64,
                _ => 1,
            };
            let params = d.saturating_add(1).saturating_mul(outputs);
            let standardisation = if spec.standardize {
                d.saturating_mul(2)
            } else {
                0
            };
            JobShape {
                model_values: params,
                // [outputs, params.., (mean.., std..,) t]
                broadcast_values: params.saturating_add(standardisation).saturating_add(2),
                // [rows, loss, gradient..]
                partial_sums: params.saturating_add(2),
                partial_extrema: 0,
            }
        }
        JobKind::Kmeans => {
            let k = spec.k as u64;
            let centroids = k.saturating_mul(d);
            JobShape {
                model_values: centroids,
                broadcast_values: centroids.saturating_add(2),
                // [inertia, counts.., sums..], or one value per shard while seeding
                partial_sums: centroids
                    .saturating_add(k)
                    .saturating_add(1)
                    .max(u64::from(shards)),
                partial_extrema: 0,
            }
        }
        // The model lives in the shards' parameter tables, not in messages: a node's share is
        // held against its memory budget by the parameter server as rows are written.
        JobKind::Mf => JobShape {
            model_values: 8,
            broadcast_values: 2,
            partial_sums: 2,
            partial_extrema: 4,
        },
        JobKind::Stats => {
            let bins = spec.bins as u64;
            JobShape {
                model_values: cols.saturating_mul(bins.saturating_add(4)),
                broadcast_values: stats_pass.broadcast_values,
                partial_sums: cols.saturating_mul(bins.saturating_add(1)),
                partial_extrema: cols.saturating_mul(2),
            }
        }
    };
    // Every kind may run the column-statistics pass first (standardisation, k-means bounds);
    // training without standardisation sums only the label there.
    let stats_pass = match spec.kind {
        JobKind::Sgd | JobKind::LocalSgd if !spec.standardize => JobShape {
            model_values: 4,
            broadcast_values: 1,
            partial_sums: 1,
            partial_extrema: 2,
        },
        _ => stats_pass,
    };
    JobShape {
        model_values: job.model_values.max(stats_pass.model_values),
        broadcast_values: job.broadcast_values.max(stats_pass.broadcast_values),
        partial_sums: job.partial_sums.max(stats_pass.partial_sums),
        partial_extrema: job.partial_extrema.max(stats_pass.partial_extrema),
    }
}

/// Bytes of a dataset's partitions in memory.
pub fn data_bytes(rows: u64, features: u64) -> u64 {
    rows.saturating_mul(features.saturating_mul(4).saturating_add(ROW_OVERHEAD))
}

/// Bytes a sparse row takes besides its entries: label (f32), row id (u64), row pointer (u64).
pub const SPARSE_ROW_OVERHEAD: u64 = 20;
/// Bytes of one stored entry of a sparse row: column (u32) and value (f32).
pub const SPARSE_ENTRY: u64 = 8;

/// The rows a job reads: dense (`rows x features` values), or sparse (compressed sparse rows,
/// `nnz` stored entries over every row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataShape {
    pub rows: u64,
    pub features: u64,
    /// Stored entries of a sparse dataset; `None` for dense rows.
    pub nnz: Option<u64>,
}

impl DataShape {
    /// Dense rows.
    pub fn dense(rows: u64, features: u64) -> Self {
        Self {
            rows,
            features,
            nnz: None,
        }
    }

    /// Bytes `rows` of these rows take in memory: dense `rows x (4 features + 12)`; sparse
    /// `rows x 20` plus their share of the entries (rounded up) `x 8`.
    pub fn bytes_of(&self, rows: u64) -> u64 {
        match self.nnz {
            None => data_bytes(rows, self.features),
            Some(nnz) => {
                let share = u128::from(nnz) * u128::from(rows) / u128::from(self.rows.max(1));
                let entries = u64::try_from(share).unwrap_or(u64::MAX);
                rows.saturating_mul(SPARSE_ROW_OVERHEAD)
                    .saturating_add(entries.saturating_mul(SPARSE_ENTRY))
            }
        }
    }
}

/// Encoded bytes of a task carrying `broadcast_values` values and a spec of `spec_len` bytes.
pub fn task_bytes(broadcast_values: u64, spec_len: u64) -> u64 {
    broadcast_values
        .saturating_mul(8)
        .saturating_add(spec_len)
        .saturating_add(MESSAGE_OVERHEAD)
}

/// Encoded bytes of a partial with `sums` fixed-point sums (`wide` of them also beyond an
/// `i128`) and `extrema` minima plus maxima.
pub fn partial_bytes(sums: u64, wide: u64, extrema: u64) -> u64 {
    sums.saturating_mul(16)
        .saturating_add(wide.saturating_mul(56))
        .saturating_add(extrema.saturating_mul(8))
        .saturating_add(MESSAGE_OVERHEAD)
}

/// Whether a message of `bytes` fits a frame; `what` names it in the error.
pub fn check_frame(
    what: &'static str,
    bytes: u64,
    values: u64,
    limits: &Limits,
) -> Result<(), AdmissionError> {
    if bytes > limits.max_frame_bytes {
        return Err(AdmissionError::Frame {
            what,
            bytes,
            values,
            cap: limits.max_frame_bytes,
        });
    }
    Ok(())
}

/// Whether a dataset of `rows x features` fits one node's budget (`dataset synth`, and the
/// data part of [`admit_job`]).
pub fn admit_dataset(rows: u64, features: u64, limits: &Limits) -> Result<(), AdmissionError> {
    check_memory(
        "the dataset",
        rows,
        &DataShape::dense(rows, features),
        0,
        limits,
    )
}

fn check_memory(
    what: &'static str,
    rows: u64,
    data: &DataShape,
    model: u64,
    limits: &Limits,
) -> Result<(), AdmissionError> {
    let features = data.features;
    let data = data.bytes_of(rows);
    let need = data.saturating_add(model);
    if need > limits.memory_budget_bytes {
        return Err(AdmissionError::Memory {
            what,
            need,
            data,
            model,
            rows,
            features,
            budget: limits.memory_budget_bytes,
        });
    }
    Ok(())
}

/// Admits `spec` (spec text `spec_len` bytes long) on a dataset of shape `data` over `shards`
/// shards, or says which limit it breaks and by how much. Checks the messages first (a job
/// that cannot send its first task is refused for that, whatever its data size).
pub fn admit_job(
    spec: &JobSpec,
    spec_len: u64,
    data: &DataShape,
    shards: u32,
    limits: &Limits,
) -> Result<JobShape, AdmissionError> {
    let s = shape(spec, data.features, shards);
    let task = task_bytes(s.broadcast_values, spec_len);
    check_frame("task", task, s.broadcast_values, limits)?;
    // Sums beyond an i128 (huge-valued columns) take more; the node checks the real partial
    // again before it sends it and fails the job if it does not fit.
    let partial = partial_bytes(s.partial_sums, 0, s.partial_extrema);
    let partial_values = s.partial_sums.saturating_add(s.partial_extrema);
    check_frame("partial", partial, partial_values, limits)?;
    let model = s
        .model_values
        .saturating_mul(8)
        .saturating_mul(MODEL_COPIES)
        .saturating_add(task)
        .saturating_add(partial);
    // A node maps one shard's partition per worker at a time and keeps a cache of them capped
    // at half the budget (partitions live in local files, memory-mapped): the unit that must
    // fit is a partition, not the dataset. Shards are filled about evenly (row ids hashed, or
    // splits balanced by bytes); an uneven one is checked again when it is loaded.
    let per_shard = data.rows.div_ceil(u64::from(shards.max(1)));
    check_memory("one shard's partition", per_shard, data, model, limits)?;
    Ok(s)
}

/// Bytes a partition of `rows` rows of a dataset of shape `data` takes; refused (before
/// anything is allocated) when over the budget. Used where a node loads or generates a shard.
pub fn check_partition(
    rows: u64,
    data: &DataShape,
    limits: &Limits,
) -> Result<u64, AdmissionError> {
    check_memory("one shard's partition", rows, data, 0, limits)?;
    Ok(data.bytes_of(rows))
}

/// Rows of shard `shard` in a synthetic dataset of `rows` rows over `shards` shards (row `i`
/// belongs to shard `i % shards`, as `dataset::synthetic_shard` generates them).
pub fn synthetic_shard_rows(rows: u64, shard: u32, shards: u32) -> u64 {
    let (shard, shards) = (u64::from(shard), u64::from(shards.max(1)));
    if rows > shard {
        (rows - shard - 1) / shards + 1
    } else {
        0
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;

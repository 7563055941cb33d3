//! Wire types of datasets and jobs: admin requests from clients, dataset partition uploads,
//! and the map tasks a job's coordinator sends to shard owners with their partial results.
//!
//! Partials are merged *exactly*: each shard's sums are converted to 2^-[`FIXED_FRAC_BITS`]
//! fixed point (`i128`), so adding them is associative and a node can pre-sum all its shards
//! into one message while the coordinator's total stays bit-identical however the shards are
//! spread over nodes (ARCHITECTURE.md invariant 6). Minima and maxima merge exactly as they are.

use rkyv::{Archive, Deserialize, Serialize};

/// Fraction bits of the fixed-point sums in [`JobPartial::sum`]: resolution 2^-56 (about
/// 1.4e-17). A sum that fits an `i128` (about ±1.7e21) travels as one; a larger one (up to
/// 2^327 in magnitude) travels in [`JobPartial::wide`].
pub const FIXED_FRAC_BITS: u32 = 56;

/// A fixed-point sum too large for an `i128`: 384-bit two's complement, little-endian limbs,
/// at `index` of [`JobPartial::sum`] (whose own entry there is 0).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct WideSum {
    pub index: u32,
    pub limbs: [u64; 6],
}

/// Client requests about datasets and jobs. Payloads are small JSON documents (names, ids,
/// specs, status), answered with [`super::Body::ControlReply`] holding JSON.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOp {
    /// Register an uploaded dataset (payload: the dataset record).
    DatasetCommit,
    /// Delete an abandoned import's partitions (payload: `{"name", "import"}`).
    DatasetAbort,
    /// List datasets.
    DatasetList,
    /// Submit a job (payload: `{"spec": TOML}`); reply `{"id"}`.
    JobSubmit,
    /// One job's record (payload: `{"id"}`).
    JobStatus,
    /// Every job's record.
    JobList,
    /// Cancel a job (payload: `{"id"}`).
    JobCancel,
    /// A finished job's result document (payload: `{"id"}`).
    JobResult,
    /// Remove a dataset: its record (through Raft) and its partition objects (payload:
    /// `{"name"}`); refused while a pending or running job uses it.
    DatasetDelete,
    /// A slice of a finished job's result (payload: `{"id", "offset", "length"}`). The reply is
    /// binary, not JSON: [`RESULT_CHUNK_HEADER`] bytes of little-endian `u64` total size, then
    /// at most `length` bytes from `offset` (fewer at the end, or when the node caps the slice
    /// to fit a frame). Results of any size are fetched this way.
    JobResultChunk,
    /// Import a dataset from object storage, read by the cluster (payload: `{"name", "url",
    /// "format"?, "label", "features"?, "nulls"?, "max_categories"?, "hash_buckets"?,
    /// "split_bytes"?}`); reply: the import's id and plan summary. Appended last: the wire
    /// keeps the earlier ops' tags.
    DatasetImport,
    /// Where an import stands (payload: `{"id"}` or `{"name"}`); with neither, every import
    /// (`{"imports": [...]}`).
    DatasetImportStatus,
}

/// Bytes before the data in a [`AdminOp::JobResultChunk`] reply (the result's total size).
pub const RESULT_CHUNK_HEADER: usize = 8;

impl AdminOp {
    /// Whether a `reader` client may send it (reads only).
    pub fn read_only(self) -> bool {
        matches!(
            self,
            AdminOp::DatasetList
                | AdminOp::JobStatus
                | AdminOp::JobList
                | AdminOp::JobResult
                | AdminOp::JobResultChunk
                | AdminOp::DatasetImportStatus
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AdminOp::DatasetCommit => "dataset_commit",
            AdminOp::DatasetAbort => "dataset_abort",
            AdminOp::DatasetList => "dataset_list",
            AdminOp::JobSubmit => "job_submit",
            AdminOp::JobStatus => "job_status",
            AdminOp::JobList => "job_list",
            AdminOp::JobCancel => "job_cancel",
            AdminOp::JobResult => "job_result",
            AdminOp::DatasetDelete => "dataset_delete",
            AdminOp::JobResultChunk => "job_result_chunk",
            AdminOp::DatasetImport => "dataset_import",
            AdminOp::DatasetImportStatus => "dataset_import_status",
        }
    }
}

/// One partition segment of a dataset being imported, stored as-is (the TDDS format of
/// `dataset`, validated by the receiving node before it is written).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DatasetPart {
    pub dataset: String,
    /// The import's unique id (storage prefix); nothing is visible until the commit.
    pub import: String,
    pub shard: u32,
    pub seg: u32,
    pub bytes: Vec<u8>,
}

/// A shard the coordinator believes `epoch` owns.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardEpoch {
    pub shard: u32,
    pub epoch: u64,
}

/// One step's map task for the shards a node owns.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JobTask {
    pub job: String,
    /// The job spec (TOML), so any node can run the task without other state.
    pub spec: String,
    pub dataset: String,
    pub step: u64,
    /// Which kind of pass this step is (job-defined: statistics, gradient, ...).
    pub phase: u32,
    /// The shards to map, with the epoch the coordinator saw (fencing).
    pub shards: Vec<ShardEpoch>,
    /// Job-defined broadcast (parameters, centroids, ...).
    pub broadcast: Vec<f64>,
    /// Parameter-server jobs: the generation of the tables (see [`ParamPull::gen`]); 0 otherwise.
    pub gen: u64,
    /// Parameter-server jobs: the train step the generation started from.
    pub base: u64,
    /// Parameter-server jobs: train steps whose every push was acknowledged (the tables apply
    /// those only); the step itself under `sync`, up to `staleness` behind it under `ssp`.
    pub complete: u64,
    /// Parameter-server jobs: every shard's epoch when the generation started (indexed by
    /// shard). Pulls and pushes name these epochs, so a table that moved since is never read
    /// or written in this generation; the coordinator starts a new one instead.
    pub epochs: Vec<u64>,
}

/// A node's merged partial over the shards it mapped.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JobPartial {
    /// Shards included in the sums.
    pub done: Vec<u32>,
    /// Shards this node did not map (not the owner at that epoch, or partition not loadable);
    /// the coordinator asks their current owner.
    pub refused: Vec<u32>,
    /// Rows mapped.
    pub rows: u64,
    /// Fixed-point sums ([`FIXED_FRAC_BITS`]).
    pub sum: Vec<i128>,
    /// The sums too large for an `i128`, by index into `sum` (each index at most once).
    pub wide: Vec<WideSum>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    /// A map error that will recur (bad spec for this data, numeric overflow): the job fails.
    pub error: Option<String>,
    /// Parameter-server jobs: a table's rows were lost with its owner; the coordinator rolls
    /// the job back to the newest saved tables.
    pub lost: bool,
}

/// The parameter rows a worker reads from one shard's table.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ParamKeys {
    pub shard: u32,
    /// The epoch the worker's map named for the shard (fencing).
    pub epoch: u64,
    /// Row keys, strictly increasing.
    pub keys: Vec<u64>,
}

/// Worker to parameter-shard owner: the rows a minibatch needs at `step` (one request per
/// destination node, every shard of that node in it).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ParamPull {
    pub job: String,
    /// The tables' generation: the coordinator starts a new one (and every owner drops what it
    /// holds of an older one) when it rolls the job back to a checkpoint.
    pub gen: u64,
    /// The train step this generation started from (its checkpoint).
    pub base: u64,
    /// The train step the rows are read for.
    pub step: u64,
    /// Train steps whose every push was acknowledged: the rows read have all of them applied
    /// (and no later ones). `step` under `sync`; at least `step - staleness` under `ssp`.
    pub complete: u64,
    pub parts: Vec<ParamKeys>,
}

/// One source shard's gradient sums for rows of one parameter shard.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ParamGrads {
    pub shard: u32,
    pub epoch: u64,
    /// The data shard whose minibatch produced them: with the step, the push's idempotency key.
    pub source: u32,
    /// Row keys, strictly increasing.
    pub keys: Vec<u64>,
    /// The rows' gradient sums, each as wide as its row, in key order.
    pub grads: Vec<f32>,
}

/// Worker to parameter-shard owner: gradient sums of one step (one request per destination
/// node). Applied once per `(step, source)`, in source order, when the owner moves past `step`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ParamPush {
    pub job: String,
    pub gen: u64,
    pub base: u64,
    pub step: u64,
    /// As in [`ParamPull::complete`].
    pub complete: u64,
    pub parts: Vec<ParamGrads>,
}

/// How a parameter request went.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamStatus {
    /// Served: for a pull, the rows in request order.
    Ok,
    /// This node does not serve one of the shards at the named epoch: retry on the new owner.
    NotOwner,
    /// The shard's rows at this step are not here (its owner changed since the generation's
    /// checkpoint): the coordinator rolls the job back to that checkpoint.
    Lost,
    /// A generation or step older than this owner's: a straggler, dropped.
    Stale,
    /// Malformed (keys out of order, widths wrong, over the budget); the text says why.
    Refused,
}

/// The answer to a [`ParamPull`] or [`ParamPush`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ParamReply {
    pub status: ParamStatus,
    pub message: String,
    /// A pull's rows, concatenated in request order.
    pub values: Vec<f32>,
}

/// One parameter shard's rows at a train step, as a checkpoint blob
/// (`jobs/{job}/params/{shard}/{step}`): validated like the wire when read back.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ParamSnapshot {
    pub shard: u32,
    pub step: u64,
    /// Row keys, strictly increasing.
    pub keys: Vec<u64>,
    /// The rows, each as wide as its key's table, in key order.
    pub values: Vec<f32>,
}

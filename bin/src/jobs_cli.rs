//! Client side of datasets and jobs: import, submit, wait with progress, results. Used by the
//! CLI (`tidepool dataset ...`, `tidepool job ...`), the demo and the tests.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use tidepool_runtime::client::{ClientError, ClusterClient};
use tidepool_runtime::codec::{AdminOp, DatasetPart, ErrorCode, RESULT_CHUNK_HEADER};
use tidepool_runtime::control::{DatasetRecord, DatasetSource, JobRecord, JobState};
use tidepool_runtime::dataset::{self, Partition, Table};
use tidepool_runtime::jobspec::JobSpec;

use crate::exit::CliError;

/// Largest partition object an import writes; bigger partitions are split into segments.
pub use tidepool_runtime::dataset::SEGMENT_BYTES;
/// Segments uploaded at once.
const UPLOAD_CONCURRENCY: usize = 4;
/// Rows an import holds before uploading, over all shards: with the segments in flight the
/// client holds at most this plus [`UPLOAD_CONCURRENCY`] x [`SEGMENT_BYTES`] of rows (64 MiB),
/// whatever the file's size.
pub const IMPORT_WINDOW_BYTES: usize = 32 << 20;

fn hex_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

type Upload<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ClientError>> + 'a>>;

/// Rows on their way to the shards of one import: row `id` goes to shard
/// `shard_for_key(id)` (as [`dataset::partition`] places them), buffered per shard, and
/// uploaded as a segment when a shard's buffer fills a segment, or, the largest first, when
/// all buffers together reach [`IMPORT_WINDOW_BYTES`].
struct Uploader<'a> {
    client: &'a ClusterClient,
    name: String,
    import: String,
    features: usize,
    seg_rows: usize,
    window_rows: usize,
    bufs: Vec<(Vec<u64>, Vec<f32>, Vec<f32>)>,
    buffered: usize,
    counts: Vec<u32>,
    rows: u64,
    inflight: futures::stream::FuturesUnordered<Upload<'a>>,
}

impl<'a> Uploader<'a> {
    fn new(
        client: &'a ClusterClient,
        name: &str,
        import: &str,
        shards: u32,
        features: usize,
    ) -> Self {
        let row_bytes = features * 4 + 12;
        Uploader {
            client,
            name: name.to_string(),
            import: import.to_string(),
            features,
            seg_rows: (SEGMENT_BYTES / row_bytes).max(1),
            window_rows: (IMPORT_WINDOW_BYTES / row_bytes).max(1),
            bufs: (0..shards).map(|_| Default::default()).collect(),
            buffered: 0,
            counts: vec![0; shards as usize],
            rows: 0,
            inflight: Default::default(),
        }
    }

    async fn push(&mut self, label: f32, row: &[f32]) -> Result<()> {
        let id = self.rows;
        self.rows += 1;
        let shard = dataset::shard_of_row(id, self.bufs.len() as u32) as usize;
        let Some(buf) = self.bufs.get_mut(shard) else {
            bail!("shard {shard} out of range");
        };
        buf.0.push(id);
        buf.1.push(label);
        buf.2.extend_from_slice(row);
        self.buffered += 1;
        if buf.0.len() >= self.seg_rows {
            self.upload(shard).await?;
        } else if self.buffered >= self.window_rows {
            let largest = (0..self.bufs.len())
                .max_by_key(|&s| self.bufs[s].0.len())
                .unwrap_or(0);
            self.upload(largest).await?;
        }
        Ok(())
    }

    /// Uploads shard `shard`'s buffer as its next segment (waiting for a slot first).
    async fn upload(&mut self, shard: usize) -> Result<()> {
        let (ids, y, x) = std::mem::take(&mut self.bufs[shard]);
        if ids.is_empty() {
            return Ok(());
        }
        self.buffered -= ids.len();
        while self.inflight.len() >= UPLOAD_CONCURRENCY {
            if let Some(r) = self.inflight.next().await {
                r?;
            }
        }
        let part = Partition::new(self.features, ids, y, x)?;
        let part = DatasetPart {
            dataset: self.name.clone(),
            import: self.import.clone(),
            shard: shard as u32,
            seg: self.counts[shard],
            bytes: dataset::encode_partition(&part),
        };
        self.counts[shard] += 1;
        let client = self.client;
        self.inflight
            .push(Box::pin(async move { client.dataset_part(part).await }));
        Ok(())
    }

    /// Uploads what is left; the segment count per shard.
    async fn finish(mut self) -> Result<(Vec<u32>, u64)> {
        for shard in 0..self.bufs.len() {
            self.upload(shard).await?;
        }
        while let Some(r) = self.inflight.next().await {
            r?;
        }
        Ok((self.counts, self.rows))
    }
}

/// Commits an import whose segments are uploaded; on failure deletes them.
async fn commit(
    client: &ClusterClient,
    rec: DatasetRecord,
    uploaded: Result<()>,
) -> Result<DatasetRecord> {
    let committed = match uploaded {
        Ok(()) => client
            .admin(AdminOp::DatasetCommit, &serde_json::to_value(&rec)?)
            .await
            .map(|_| ())
            .map_err(|e| commit_failed(&rec.name, e)),
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        if let DatasetSource::Imported { import, .. } = &rec.source {
            let abort = serde_json::json!({ "name": rec.name, "import": import });
            let _ = client.admin(AdminOp::DatasetAbort, &abort).await;
        }
        return Err(e.context(format!("import of {:?} failed, nothing kept", rec.name)));
    }
    Ok(rec)
}

/// Partitions `shards`, checks the name is free, and gives a fresh import id.
async fn begin(client: &ClusterClient, name: &str) -> Result<(u32, String)> {
    client.refresh().await.context("loading the shard map")?;
    let shards = client.shard_count();
    if shards == 0 {
        bail!("the cluster has no shards yet");
    }
    // Checked again at commit (a concurrent import may take the name meanwhile); checking here
    // first saves uploading the whole table for nothing.
    if list_datasets(client).await?.iter().any(|d| d.name == name) {
        return Err(CliError::DatasetExists(name.to_string()).into());
    }
    Ok((shards, hex_id()))
}

/// Imports `table` as dataset `name`: partitions it onto the cluster's shards, uploads every
/// segment, then commits the record. On any failure the uploaded objects are deleted.
pub async fn import_table(
    client: &ClusterClient,
    table: &Table,
    name: &str,
) -> Result<DatasetRecord> {
    let (shards, import) = begin(client, name).await?;
    let mut up = Uploader::new(client, name, &import, shards, table.features.len());
    let uploaded = async {
        for i in 0..table.rows {
            let (Some(row), Some(&label)) = (table.row(i), table.y.get(i)) else {
                break;
            };
            up.push(label, row).await?;
        }
        up.finish().await
    }
    .await;
    let (segments, uploaded) = match uploaded {
        Ok((counts, _)) => (counts, Ok(())),
        Err(e) => (Vec::new(), Err(e)),
    };
    let rec = DatasetRecord {
        name: name.to_string(),
        features: table.features.clone(),
        label: table.label.clone(),
        rows: table.rows as u64,
        shards,
        source: DatasetSource::Imported { import, segments },
    };
    commit(client, rec, uploaded).await
}

/// A refused dataset commit: a taken name is [`CliError::DatasetExists`] (said once, as a
/// sentence); anything else keeps the client's error (and so its exit code).
fn commit_failed(name: &str, e: ClientError) -> anyhow::Error {
    if e.refusal_code() == Some(ErrorCode::Conflict) {
        CliError::DatasetExists(name.to_string()).into()
    } else {
        e.into()
    }
}

/// `tidepool dataset import FILE.csv --name NAME --label COLUMN`: the file is read row by row
/// and uploaded as it goes, never held whole (see [`IMPORT_WINDOW_BYTES`]).
pub async fn import_csv(
    client: &ClusterClient,
    path: &Path,
    name: &str,
    label: &str,
) -> Result<DatasetRecord> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let not_importable = || format!("{} is not importable", path.display());
    let mut rows =
        dataset::CsvRows::new(std::io::BufReader::new(file), label).with_context(not_importable)?;
    let (shards, import) = begin(client, name).await?;
    let mut up = Uploader::new(client, name, &import, shards, rows.features().len());
    let uploaded = async {
        let mut x = Vec::new();
        while let Some(y) = rows.next_row(&mut x).with_context(not_importable)? {
            up.push(y, &x).await?;
        }
        if up.rows == 0 {
            let line = rows.line() + 1;
            return Err(anyhow::Error::from(dataset::DatasetError::NoRows { line })
                .context(not_importable()));
        }
        up.finish().await
    }
    .await;
    let (segments, count, uploaded) = match uploaded {
        Ok((counts, n)) => (counts, n, Ok(())),
        Err(e) => (Vec::new(), 0, Err(e)),
    };
    let rec = DatasetRecord {
        name: name.to_string(),
        features: rows.features().to_vec(),
        label: rows.label().to_string(),
        rows: count,
        shards,
        source: DatasetSource::Imported { import, segments },
    };
    commit(client, rec, uploaded).await
}

/// Registers a synthetic dataset, generated on each shard's owner (nothing is uploaded).
pub async fn create_synthetic(
    client: &ClusterClient,
    name: &str,
    rows: u64,
    features: usize,
    kind: &str,
    seed: u64,
) -> Result<DatasetRecord> {
    if !matches!(kind, "linear" | "logistic") {
        bail!("--kind must be linear or logistic");
    }
    client.refresh().await?;
    let rec = DatasetRecord {
        name: name.to_string(),
        features: (0..features).map(|j| format!("x{j}")).collect(),
        label: "y".into(),
        rows,
        shards: client.shard_count(),
        source: DatasetSource::Synthetic {
            kind: kind.to_string(),
            seed,
        },
    };
    client
        .admin(AdminOp::DatasetCommit, &serde_json::to_value(&rec)?)
        .await
        .map_err(|e| commit_failed(name, e))?;
    Ok(rec)
}

/// `tidepool dataset delete NAME`: removes the dataset's record and partition objects; refused
/// while a pending or running job uses it. Returns whether there was such a dataset.
pub async fn delete_dataset(client: &ClusterClient, name: &str) -> Result<bool> {
    let bytes = client
        .admin(AdminOp::DatasetDelete, &serde_json::json!({ "name": name }))
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    Ok(v["deleted"].as_bool().unwrap_or(false))
}

/// Datasets the cluster knows.
pub async fn list_datasets(client: &ClusterClient) -> Result<Vec<DatasetRecord>> {
    let bytes = client
        .admin(AdminOp::DatasetList, &serde_json::json!({}))
        .await?;
    #[derive(serde::Deserialize)]
    struct L {
        datasets: Vec<DatasetRecord>,
    }
    Ok(serde_json::from_slice::<L>(&bytes)?.datasets)
}

/// Where a dataset's partitions are served now: per node, its shards and their partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodePartitions {
    pub shards: u32,
    pub partitions: u64,
}

/// `dataset describe`: the record, its size, and where its partitions are served now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DatasetDescription {
    pub name: String,
    /// `imported` (uploaded by a client), `storage` (read by the cluster from a URL) or
    /// `synthetic`.
    pub source: &'static str,
    /// The import's id (its storage prefix), for an imported dataset.
    pub import: Option<String>,
    /// The generator and its seed, for a synthetic one.
    pub generator: Option<String>,
    /// Where the cluster read it from, for a dataset imported from storage.
    pub url: Option<String>,
    /// Its content checksum (hex), for a dataset imported from storage.
    pub checksum: Option<String>,
    pub label: String,
    /// Feature names (empty for a sparse dataset, whose columns are `f{index}`).
    pub features: Vec<String>,
    /// `dense` or `sparse` (compressed sparse rows, from libsvm).
    pub layout: &'static str,
    /// Feature columns.
    pub columns: u64,
    pub rows: u64,
    /// Stored values, features and label (dense: every value counts; sparse: the stored
    /// entries, non-zeros, plus the labels).
    pub values: u64,
    /// Sparse: stored entries (non-zeros) over every row.
    pub nnz: Option<u64>,
    /// Bytes the partitions hold: dense `rows x (4 features + 12)`, sparse `rows x 20 +
    /// nnz x 8`.
    pub bytes: u64,
    pub shards: u32,
    /// Partition objects in storage (0 for a synthetic dataset, generated where it is used).
    pub partitions: u64,
    /// Per node (by name): the dataset's shards it owns now and their partitions; `unassigned`
    /// for shards without an owner.
    pub nodes: std::collections::BTreeMap<String, NodePartitions>,
}

/// The description of `name`, or `None` if the cluster has no such dataset.
pub async fn describe_dataset(
    client: &ClusterClient,
    name: &str,
) -> Result<Option<DatasetDescription>> {
    let Some(rec) = list_datasets(client)
        .await?
        .into_iter()
        .find(|d| d.name == name)
    else {
        return Ok(None);
    };
    let owners = client.shards().await?;
    Ok(Some(describe(rec, &owners)))
}

/// The description of `rec` with the shards owned as `owners` says (pure).
pub fn describe(
    rec: DatasetRecord,
    owners: &[tidepool_runtime::codec::ShardInfo],
) -> DatasetDescription {
    let (mut url, mut checksum) = (None, None);
    let (source, import, generator, segments) = match &rec.source {
        DatasetSource::Imported { import, segments } => {
            ("imported", Some(import.clone()), None, segments.clone())
        }
        DatasetSource::Synthetic { kind, seed } => (
            "synthetic",
            None,
            Some(format!("{kind}, seed {seed}")),
            Vec::new(),
        ),
        DatasetSource::Ingested {
            import,
            url: from,
            splits,
            checksum: sum,
            ..
        } => {
            url = Some(from.clone());
            checksum = Some(format!("{sum:016x}"));
            let mut per_shard = vec![0u32; rec.shards as usize];
            for &(shard, n) in splits {
                if let Some(c) = per_shard.get_mut(shard as usize) {
                    *c += n;
                }
            }
            ("storage", Some(import.clone()), None, per_shard)
        }
    };
    let owner_of: std::collections::HashMap<u32, &str> = owners
        .iter()
        .filter_map(|s| Some((s.id, s.owner.as_deref()?)))
        .collect();
    let mut nodes: std::collections::BTreeMap<String, NodePartitions> = Default::default();
    for shard in 0..rec.shards {
        let owner = owner_of
            .get(&shard)
            .copied()
            .unwrap_or("unassigned")
            .to_string();
        let n = nodes.entry(owner).or_default();
        n.shards += 1;
        n.partitions += u64::from(segments.get(shard as usize).copied().unwrap_or(0));
    }
    let shape = tidepool_actors::admin_checks::data_shape(&rec);
    let values = match shape.nnz {
        Some(nnz) => nnz.saturating_add(rec.rows),
        None => rec.rows.saturating_mul(shape.features + 1),
    };
    DatasetDescription {
        name: rec.name,
        source,
        import,
        generator,
        url,
        checksum,
        label: rec.label,
        rows: rec.rows,
        values,
        nnz: shape.nnz,
        bytes: shape.bytes_of(rec.rows),
        layout: if shape.nnz.is_some() {
            "sparse"
        } else {
            "dense"
        },
        columns: shape.features,
        shards: rec.shards,
        partitions: segments.iter().map(|&n| u64::from(n)).sum(),
        features: rec.features,
        nodes,
    }
}

/// Submits a job spec (validated here first, with the key named in any error); returns its id.
pub async fn submit(client: &ClusterClient, spec: &str) -> Result<String> {
    let parsed = JobSpec::parse(spec)?;
    let id = format!("{}-{}", parsed.kind.as_str(), &hex_id()[..8]);
    let bytes = client
        .admin(
            AdminOp::JobSubmit,
            &serde_json::json!({ "spec": spec, "id": id }),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    Ok(v["id"].as_str().unwrap_or(&id).to_string())
}

/// One job's record.
pub async fn status(client: &ClusterClient, id: &str) -> Result<JobRecord> {
    let bytes = client
        .admin(AdminOp::JobStatus, &serde_json::json!({ "id": id }))
        .await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Every job, in submission order.
pub async fn list(client: &ClusterClient) -> Result<Vec<JobRecord>> {
    let bytes = client
        .admin(AdminOp::JobList, &serde_json::json!({}))
        .await?;
    #[derive(serde::Deserialize)]
    struct L {
        jobs: Vec<JobRecord>,
    }
    Ok(serde_json::from_slice::<L>(&bytes)?.jobs)
}

/// Cancels a job.
pub async fn cancel(client: &ClusterClient, id: &str) -> Result<()> {
    client
        .admin(AdminOp::JobCancel, &serde_json::json!({ "id": id }))
        .await?;
    Ok(())
}

/// Bytes asked for per result chunk (a node may answer fewer, to fit its frame cap).
pub const RESULT_CHUNK_BYTES: u64 = 4 << 20;

/// A stored part of a finished job, fetched in chunks (`job_result_chunk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultPart {
    /// The result document.
    Document,
    /// A parameter-server job's final saved table of parameter shard `s` (an rkyv
    /// `ParamSnapshot`).
    Table(u32),
    /// Data shard `s`'s export (mf: its sorted distinct (user, item) pairs, 8 bytes each).
    Export(u32),
}

impl std::fmt::Display for ResultPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResultPart::Document => write!(f, "result"),
            ResultPart::Table(s) => write!(f, "table of shard {s}"),
            ResultPart::Export(s) => write!(f, "export of shard {s}"),
        }
    }
}

/// Where the parts of a finished job come from: the cluster ([`ClusterParts`]) or, in tests,
/// memory.
// Used only with concrete types in this crate, never as `dyn`; no Send bound needed.
#[allow(async_fn_in_trait)]
pub trait PartSource {
    /// The part's total size and its bytes from `offset`: at most `length`, fewer if the source
    /// caps its replies, none only at the end.
    async fn chunk(&self, part: ResultPart, offset: u64, length: u64) -> Result<(u64, Vec<u8>)>;
}

/// The parts of job `id` in the cluster that `client` talks to.
#[derive(Debug, Clone, Copy)]
pub struct ClusterParts<'a> {
    pub client: &'a ClusterClient,
    pub id: &'a str,
}

impl PartSource for ClusterParts<'_> {
    async fn chunk(&self, part: ResultPart, offset: u64, length: u64) -> Result<(u64, Vec<u8>)> {
        part_chunk(self.client, self.id, part, offset, length).await
    }
}

/// One `job_result_chunk` request: the total size of `part` of job `id` and its bytes from
/// `offset` (at most `length`; a node answers fewer to fit its frame cap).
pub async fn part_chunk(
    client: &ClusterClient,
    id: &str,
    part: ResultPart,
    offset: u64,
    length: u64,
) -> Result<(u64, Vec<u8>)> {
    let mut arg = serde_json::json!({ "id": id, "offset": offset, "length": length });
    match part {
        ResultPart::Document => {}
        ResultPart::Table(s) => arg["table"] = s.into(),
        ResultPart::Export(s) => arg["export"] = s.into(),
    }
    let mut reply = client.admin(AdminOp::JobResultChunk, &arg).await?;
    let Some(head) = reply.first_chunk::<RESULT_CHUNK_HEADER>() else {
        bail!(
            "job {id}: {part} chunk reply of {} bytes has no header",
            reply.len()
        );
    };
    let size = u64::from_le_bytes(*head);
    reply.drain(..RESULT_CHUNK_HEADER);
    Ok((size, reply))
}

/// Part `part` of a job, whole, assembled from chunks of [`RESULT_CHUNK_BYTES`] (so parts
/// larger than a frame come through); `what` names it in errors.
pub async fn fetch_part(src: &impl PartSource, part: ResultPart, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut total = None;
    loop {
        let offset = out.len() as u64;
        let (size, data) = src.chunk(part, offset, RESULT_CHUNK_BYTES).await?;
        match total {
            None => {
                total = Some(size);
                // Reserve only what a reply has shown exists, never a size read off the wire.
                out.reserve(data.len());
            }
            Some(t) if t != size => bail!("{what}: {part} changed size ({t} -> {size})"),
            Some(_) => {}
        }
        out.extend_from_slice(&data);
        if out.len() as u64 > size {
            bail!("{what}: got {} bytes of a {size}-byte {part}", out.len());
        }
        if out.len() as u64 == size {
            return Ok(out);
        }
        if data.is_empty() {
            bail!("{what}: empty chunk at offset {offset} of the {size}-byte {part}");
        }
    }
}

/// A finished job's result document exactly as the coordinator stored it, fetched in chunks
/// (`job_result_chunk`), so results larger than a frame come through.
pub async fn result_bytes(client: &ClusterClient, id: &str) -> Result<Vec<u8>> {
    let src = ClusterParts { client, id };
    fetch_part(&src, ResultPart::Document, &format!("job {id}")).await
}

/// A finished job's result document (the model for training jobs).
pub async fn result(client: &ClusterClient, id: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&result_bytes(client, id).await?)?)
}

/// Polls until the job reaches a terminal state (or `timeout`), optionally drawing a progress
/// bar with step, loss and state. Returns the final record ([`crate::job_watch::follow`]).
pub async fn wait(
    client: &ClusterClient,
    id: &str,
    progress: bool,
    timeout: Duration,
) -> Result<JobRecord> {
    crate::job_watch::follow(client, id, progress, Some(timeout)).await
}

/// The job record as the stable `job status --json` shape (plus extra fields).
pub fn status_json(rec: &JobRecord) -> serde_json::Value {
    serde_json::to_value(rec).unwrap_or_default()
}

/// Human one-liner for a job.
pub fn status_line(rec: &JobRecord) -> String {
    let loss = rec.loss.map_or("-".into(), |l| format!("{l:.6}"));
    let mut s = format!(
        "{}  {:<9} {:>6}/{:<6} loss {}  {} on {}",
        rec.id,
        rec.state.as_str(),
        rec.step,
        rec.steps,
        loss,
        rec.kind,
        rec.dataset
    );
    if let Some(e) = &rec.error {
        s.push_str(&format!("  error: {e}"));
    }
    s
}

/// Whether the job ended well.
pub fn succeeded(rec: &JobRecord) -> bool {
    rec.state == JobState::Succeeded
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_runtime::codec::{ShardInfo, WireShardState};

    #[test]
    fn a_description_counts_each_shards_partitions_on_its_owner() {
        let rec = DatasetRecord {
            name: "d".into(),
            features: vec!["a".into(), "b".into()],
            label: "y".into(),
            rows: 10,
            shards: 3,
            source: DatasetSource::Imported {
                import: "i1".into(),
                segments: vec![2, 0, 5],
            },
        };
        let info = |id, owner: Option<&str>| ShardInfo {
            id,
            owner: owner.map(str::to_string),
            epoch: 1,
            state: WireShardState::Serving,
        };
        let d = describe(
            rec,
            &[info(0, Some("n1")), info(1, Some("n1")), info(2, None)],
        );
        // 10 rows x (2 features + a label) values; bytes as stored: 10 x (2 x 4 + 12).
        assert_eq!((d.values, d.bytes, d.partitions), (30, 200, 7));
        assert_eq!((d.layout, d.columns, d.nnz), ("dense", 2, None));
        assert_eq!(
            d.nodes["n1"],
            NodePartitions {
                shards: 2,
                partitions: 2
            }
        );
        assert_eq!(
            d.nodes["unassigned"],
            NodePartitions {
                shards: 1,
                partitions: 5
            }
        );
        assert_eq!(d.import.as_deref(), Some("i1"));
    }
}

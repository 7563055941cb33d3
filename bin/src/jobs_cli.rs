//! Client side of datasets and jobs: import, submit, wait with progress, results. Used by the
//! CLI (`tidepool dataset ...`, `tidepool job ...`), the demo and the tests.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use tidepool_runtime::client::{ClientError, ClusterClient};
use tidepool_runtime::codec::{AdminOp, DatasetPart, ErrorCode, RESULT_CHUNK_HEADER};
use tidepool_runtime::control::{DatasetRecord, DatasetSource, JobRecord, JobState};
use tidepool_runtime::dataset::{self, Partition, Table};
use tidepool_runtime::jobspec::JobSpec;

use crate::exit::CliError;

/// Largest partition object an import writes; bigger partitions are split into segments.
pub const SEGMENT_BYTES: usize = 8 << 20;
/// Segments uploaded at once.
const UPLOAD_CONCURRENCY: usize = 8;

fn hex_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Splits one shard's partition into segments of at most [`SEGMENT_BYTES`] encoded.
fn segments(p: &Partition) -> Result<Vec<Vec<u8>>> {
    let row_bytes = p.n_features() * 4 + 12;
    let per = (SEGMENT_BYTES / row_bytes.max(1)).max(1);
    if p.rows() <= per {
        return Ok(vec![dataset::encode_partition(p)]);
    }
    let nf = p.n_features();
    let mut out = Vec::new();
    for start in (0..p.rows()).step_by(per) {
        let end = (start + per).min(p.rows());
        let part = Partition::new(
            nf,
            p.row_ids()[start..end].to_vec(),
            p.labels()[start..end].to_vec(),
            p.features()[start * nf..end * nf].to_vec(),
        )?;
        out.push(dataset::encode_partition(&part));
    }
    Ok(out)
}

/// Imports `table` as dataset `name`: partitions it onto the cluster's shards, uploads every
/// segment, then commits the record. On any failure the uploaded objects are deleted.
pub async fn import_table(
    client: &ClusterClient,
    table: &Table,
    name: &str,
) -> Result<DatasetRecord> {
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
    let import = hex_id();
    let parts = dataset::partition(table, shards);
    let mut uploads = Vec::new();
    let mut counts = Vec::with_capacity(parts.len());
    for (shard, p) in parts.iter().enumerate() {
        let segs = segments(p)?;
        counts.push(segs.len() as u32);
        for (seg, bytes) in segs.into_iter().enumerate() {
            uploads.push(DatasetPart {
                dataset: name.to_string(),
                import: import.clone(),
                shard: shard as u32,
                seg: seg as u32,
                bytes,
            });
        }
    }
    let rec = DatasetRecord {
        name: name.to_string(),
        features: table.features.clone(),
        label: table.label.clone(),
        rows: table.rows as u64,
        shards,
        source: DatasetSource::Imported {
            import: import.clone(),
            segments: counts,
        },
    };
    let uploaded = futures::stream::iter(uploads)
        .map(|part| client.dataset_part(part))
        .buffer_unordered(UPLOAD_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await;
    let committed = match uploaded {
        Ok(_) => client
            .admin(AdminOp::DatasetCommit, &serde_json::to_value(&rec)?)
            .await
            .map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        let abort = serde_json::json!({ "name": name, "import": import });
        let _ = client.admin(AdminOp::DatasetAbort, &abort).await;
        return Err(
            commit_failed(name, e).context(format!("import of {name:?} failed, nothing kept"))
        );
    }
    Ok(rec)
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

/// `tidepool dataset import FILE.csv --name NAME --label COLUMN`.
pub async fn import_csv(
    client: &ClusterClient,
    path: &Path,
    name: &str,
    label: &str,
) -> Result<DatasetRecord> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let table = dataset::parse_csv(std::io::BufReader::new(file), label)
        .with_context(|| format!("{} is not importable", path.display()))?;
    import_table(client, &table, name).await
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
    pub features: Vec<String>,
    pub rows: u64,
    /// Stored values, features and label (dense: every value counts).
    pub values: u64,
    /// The values as the partitions hold them (f32).
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
    let values = rec.rows.saturating_mul(rec.features.len() as u64 + 1);
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
        bytes: values.saturating_mul(4),
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

/// A finished job's result document exactly as the coordinator stored it, fetched in chunks
/// (`job_result_chunk`), so results larger than a frame come through.
pub async fn result_bytes(client: &ClusterClient, id: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut total = None;
    loop {
        let offset = out.len() as u64;
        let reply = client
            .admin(
                AdminOp::JobResultChunk,
                &serde_json::json!({ "id": id, "offset": offset, "length": RESULT_CHUNK_BYTES }),
            )
            .await?;
        let Some((head, data)) = reply.split_first_chunk::<RESULT_CHUNK_HEADER>() else {
            bail!(
                "job {id}: result chunk reply of {} bytes has no header",
                reply.len()
            );
        };
        let size = u64::from_le_bytes(*head);
        match total {
            None => {
                total = Some(size);
                // Reserve only what a reply has shown exists, never a size read off the wire.
                out.reserve(data.len());
            }
            Some(t) if t != size => bail!("job {id}: result changed size ({t} -> {size})"),
            Some(_) => {}
        }
        out.extend_from_slice(data);
        if out.len() as u64 > size {
            bail!("job {id}: got {} bytes of a {size}-byte result", out.len());
        }
        if out.len() as u64 == size {
            return Ok(out);
        }
        if data.is_empty() {
            bail!("job {id}: empty chunk at offset {offset} of {size}");
        }
    }
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
        assert_eq!((d.values, d.bytes, d.partitions), (30, 120, 7));
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

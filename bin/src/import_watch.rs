//! `tidepool dataset import URL`: asks the cluster to read a dataset from object storage, then
//! follows the import (progress bar with bytes, rows and rows/s on stderr) until it ends.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget};
use tidepool_actors::imports::{ImportArg, ImportStatus};
use tidepool_runtime::client::ClusterClient;
use tidepool_runtime::codec::{AdminOp, ErrorCode};
use tidepool_runtime::control::ImportState;

use crate::exit::CliError;

/// How long one node may take to plan an import (it reads every file's footer).
const PLAN_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the import's record is read.
const POLL: Duration = Duration::from_millis(100);
/// The bar: source bytes read, then rows and rows/s.
const TEMPLATE: &str = "{spinner} [{bar:24}] {bytes:>10}/{total_bytes:<10} {msg}";

/// Starts the import (or finds the same one running or done).
pub async fn start(client: &ClusterClient, arg: &ImportArg) -> Result<ImportStatus> {
    let bytes = client
        .admin_within(
            AdminOp::DatasetImport,
            &serde_json::to_value(arg)?,
            PLAN_TIMEOUT,
        )
        .await
        .map_err(|e| {
            if e.refusal_code() == Some(ErrorCode::Conflict) && e.to_string().contains("exists") {
                CliError::DatasetExists(arg.name.clone()).into()
            } else {
                anyhow::Error::from(e).context(format!("import of {:?} refused", arg.name))
            }
        })?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The status of import `id`, or of the latest import of dataset `name`.
pub async fn status(
    client: &ClusterClient,
    id: Option<&str>,
    name: Option<&str>,
) -> Result<ImportStatus> {
    let payload = serde_json::json!({ "id": id, "name": name });
    let bytes = client
        .admin(AdminOp::DatasetImportStatus, &payload)
        .await
        .map_err(|e| {
            if e.refusal_code() == Some(ErrorCode::NotFound) {
                CliError::NotFound(format!(
                    "no import {}",
                    id.map_or_else(
                        || format!("of dataset {:?}", name.unwrap_or("")),
                        str::to_string
                    )
                ))
                .into()
            } else {
                anyhow::Error::from(e)
            }
        })?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Every import the cluster knows (running, succeeded, failed).
pub async fn list(client: &ClusterClient) -> Result<Vec<ImportStatus>> {
    let bytes = client
        .admin(AdminOp::DatasetImportStatus, &serde_json::json!({}))
        .await?;
    #[derive(serde::Deserialize)]
    struct L {
        imports: Vec<ImportStatus>,
    }
    Ok(serde_json::from_slice::<L>(&bytes)?.imports)
}

fn bar(progress: bool) -> ProgressBar {
    let target = if progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    crate::job_watch::styled_bar(TEMPLATE, target)
}

/// Follows import `id` until it ends (or `timeout`). A failed import is an error
/// ([`CliError::ImportFailed`]).
pub async fn follow(
    client: &ClusterClient,
    id: &str,
    progress: bool,
    timeout: Option<Duration>,
) -> Result<ImportStatus> {
    let bar = bar(progress);
    let started = Instant::now();
    loop {
        let s = status(client, Some(id), None).await?;
        bar.set_length(s.bytes.max(1));
        bar.set_position(s.bytes_done);
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{} rows {:.0} rows/s {}/{} splits",
            s.rows,
            s.rows as f64 / secs,
            s.splits_done,
            s.splits
        ));
        match s.state {
            ImportState::Running => {}
            ImportState::Succeeded => {
                bar.finish_and_clear();
                return Ok(s);
            }
            ImportState::Failed => {
                bar.abandon();
                return Err(CliError::ImportFailed {
                    id: s.id,
                    dataset: s.dataset,
                    error: s.error.unwrap_or_default(),
                }
                .into());
            }
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            bar.abandon();
            bail!(
                "import {id} still running after {:?}",
                timeout.unwrap_or_default()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The one-line summary of an import.
pub fn line(s: &ImportStatus) -> String {
    let mut out = format!(
        "import {} of {:?} from {}: {} ({} rows x {} features, {}/{} splits, {} bytes read",
        s.id,
        s.dataset,
        s.url,
        s.state.as_str(),
        s.rows,
        s.features,
        s.splits_done,
        s.splits,
        s.bytes_done,
    );
    if let Some(nnz) = s.nnz {
        out.push_str(&format!(", sparse: {nnz} stored entries"));
    }
    if s.dropped > 0 {
        out.push_str(&format!(", {} rows with nulls dropped", s.dropped));
    }
    if let Some(c) = &s.checksum {
        out.push_str(&format!(", checksum {c}"));
    }
    out.push(')');
    if let Some(e) = &s.error {
        out.push_str(&format!(": {e}"));
    }
    out
}

/// Parses `--features a,b,c`.
pub fn feature_list(text: Option<&str>) -> Result<Vec<String>> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let cols: Vec<String> = text.split(',').map(|c| c.trim().to_string()).collect();
    if cols.iter().any(String::is_empty) {
        bail!("--features: an empty column name in {text:?}");
    }
    Ok(cols)
}

/// `dataset import` given a plain path instead of a URL: only CSV is read by the client.
pub fn local_csv(path: &str) -> Result<std::path::PathBuf> {
    let p = std::path::PathBuf::from(path);
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("parquet") {
        let abs = std::fs::canonicalize(&p).with_context(|| format!("opening {path}"))?;
        bail!(
            "the cluster reads Parquet itself: give a URL its nodes can read, e.g. file://{} \
             (when they share this file system) or s3://BUCKET/PATH",
            abs.display()
        );
    }
    Ok(p)
}

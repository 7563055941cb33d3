//! The idempotent-increment workload and its exactly-once check: every acknowledged increment
//! must be present exactly once in the final counters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tidepool_runtime::client::{ClientError, ClusterClient};
use tidepool_runtime::codec::{Op, OpResult};

/// Per-key acknowledgement counts of one worker task (merged at the end; no shared lock).
type Counts = HashMap<String, u64>;

/// What the workload did.
#[derive(Debug, Default, Clone)]
pub struct WorkloadReport {
    /// Increments attempted.
    pub ops: u64,
    /// Acknowledged (applied now, or reported as applied before).
    pub acked: u64,
    /// Of `acked`, how many the owner reported as duplicates of an earlier delivery (retries).
    pub duplicates: u64,
    /// Not acknowledged within the retry budget (may or may not have been applied).
    pub unacked: u64,
    pub elapsed: Duration,
    /// Acknowledged increments per key.
    pub per_key: HashMap<String, u64>,
}

impl WorkloadReport {
    pub fn ops_per_sec(&self) -> f64 {
        self.acked as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `total` increments by 1 spread round-robin over `keys` keys, from `concurrency` tasks.
pub async fn run_increments(
    client: Arc<ClusterClient>,
    total: u64,
    keys: u64,
    concurrency: usize,
) -> WorkloadReport {
    run_increments_while(client, total, keys, concurrency, None).await
}

/// [`run_increments`], stopping early once `go` turns false (a workload that runs for as long
/// as an experiment does).
pub async fn run_increments_while(
    client: Arc<ClusterClient>,
    total: u64,
    keys: u64,
    concurrency: usize,
    go: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> WorkloadReport {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let concurrency = concurrency.max(1) as u64;
    for t in 0..concurrency {
        let client = client.clone();
        let go = go.clone();
        tasks.spawn(async move {
            let mut r = WorkloadReport::default();
            let mut counts = Counts::new();
            let mut i = t;
            let going = || {
                go.as_ref()
                    .is_none_or(|g| g.load(std::sync::atomic::Ordering::Relaxed))
            };
            while i < total && going() {
                let key = format!("k{}", i % keys);
                r.ops += 1;
                match client
                    .op(
                        &key,
                        Op::Incr {
                            key: key.clone(),
                            delta: 1,
                        },
                    )
                    .await
                {
                    Ok(res) => {
                        r.acked += 1;
                        if res == OpResult::Duplicate {
                            r.duplicates += 1;
                        }
                        *counts.entry(key).or_default() += 1;
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "increment not acknowledged");
                        r.unacked += 1;
                    }
                }
                i += concurrency;
            }
            r.per_key = counts;
            r
        });
    }
    let mut total_report = WorkloadReport::default();
    while let Some(Ok(r)) = tasks.join_next().await {
        total_report.ops += r.ops;
        total_report.acked += r.acked;
        total_report.duplicates += r.duplicates;
        total_report.unacked += r.unacked;
        for (k, v) in r.per_key {
            *total_report.per_key.entry(k).or_default() += v;
        }
    }
    total_report.elapsed = start.elapsed();
    total_report
}

/// Reads every key back and checks that each acknowledged increment is present exactly once:
/// counter == acked for every key (or, if some ops went unacknowledged, acked <= counter <=
/// acked + unacked). Returns the sum of the counters.
pub async fn verify(client: &ClusterClient, report: &WorkloadReport, keys: u64) -> Result<u64> {
    let mut sum = 0u64;
    let mut wrong = Vec::new();
    for k in 0..keys {
        let key = format!("k{k}");
        let acked = report.per_key.get(&key).copied().unwrap_or(0);
        let value = match client.op(&key, Op::Get { key: key.clone() }).await {
            Ok(OpResult::Counter(v)) => u64::try_from(v).unwrap_or(u64::MAX),
            Ok(OpResult::Value(None)) => 0,
            Ok(other) => bail!("key {key}: unexpected {other:?}"),
            Err(ClientError::Refused { code, message }) => {
                bail!("key {key}: refused {code:?}: {message}")
            }
            Err(e) => bail!("key {key}: {e}"),
        };
        sum += value;
        let ok = if report.unacked == 0 {
            value == acked
        } else {
            value >= acked && value <= acked + report.unacked
        };
        if !ok {
            wrong.push(format!("{key}: counter {value}, acknowledged {acked}"));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "{} keys violate exactly-once: {}",
            wrong.len(),
            wrong
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(sum)
}

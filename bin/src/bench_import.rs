//! `tidepool bench import URL`: how fast real local clusters of 1..N nodes import a dataset from
//! storage (`dataset import URL`, read by the shard owners in parallel), in rows/s and source
//! MB/s, and each node's peak resident memory. `benches/import.sh` runs it beside Apache Spark
//! reading and caching the same files.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tidepool_actors::imports::ImportArg;
use tidepool_runtime::client::ClientOptions;
use tidepool_runtime::control::NullPolicy;

use crate::hostile_peer::proc_status_kib;
use crate::import_watch;
use crate::local_cluster::LocalCluster;

/// `bench import` settings.
#[derive(Debug, Clone)]
pub struct ImportBenchOptions {
    pub url: String,
    pub label: String,
    pub nodes: Vec<usize>,
    pub shards: u32,
    pub runs: usize,
    pub out: Option<PathBuf>,
}

/// One import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportRun {
    pub nodes: usize,
    pub run: usize,
    pub seconds: f64,
    pub rows: u64,
    pub source_bytes: u64,
    pub rows_per_sec: f64,
    pub mb_per_sec: f64,
}

/// One cluster size: its runs and each node's peak RSS over all of them.
#[derive(Debug, Clone, Serialize)]
pub struct ImportCluster {
    pub nodes: usize,
    pub runs: Vec<ImportRun>,
    pub median_rows_per_sec: f64,
    pub median_mb_per_sec: f64,
    pub peak_rss_mib: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub async fn run(o: ImportBenchOptions) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let mut results = Vec::new();
    for &n in &o.nodes {
        let mut c = LocalCluster::create(&exe, n, o.shards, n.min(3))?;
        c.start_all()?;
        let copts = ClientOptions {
            retry_for: Duration::from_secs(60),
            ..Default::default()
        };
        let client = c.settled_admin_client(copts).await?;
        let mut runs = Vec::new();
        for run in 0..o.runs {
            let name = format!("bench-{run}");
            let arg = ImportArg {
                name: name.clone(),
                url: o.url.clone(),
                label: o.label.clone(),
                format: None,
                features: Vec::new(),
                nulls: Some(NullPolicy::Refuse),
                max_categories: None,
                hash_buckets: None,
                split_bytes: None,
            };
            let t0 = Instant::now();
            let started = import_watch::start(&client, &arg).await?;
            let done = import_watch::follow(&client, &started.id, false, None).await?;
            let seconds = t0.elapsed().as_secs_f64();
            let r = ImportRun {
                nodes: n,
                run,
                seconds,
                rows: done.rows,
                source_bytes: done.bytes,
                rows_per_sec: done.rows as f64 / seconds,
                mb_per_sec: done.bytes as f64 / 1e6 / seconds,
            };
            eprintln!(
                "{n} node(s), run {run}: {} rows, {:.0} MB in {seconds:.2} s: {:.0} rows/s, {:.1} MB/s",
                r.rows,
                r.source_bytes as f64 / 1e6,
                r.rows_per_sec,
                r.mb_per_sec
            );
            runs.push(r);
            if !crate::jobs_cli::delete_dataset(&client, &name).await? {
                bail!("dataset {name} vanished");
            }
        }
        let peak_rss_mib = c
            .nodes
            .iter()
            .map(|p| {
                p.pid()
                    .and_then(|pid| proc_status_kib(pid, "VmHWM"))
                    .map_or(f64::NAN, |k| k as f64 / 1024.0)
            })
            .collect();
        results.push(ImportCluster {
            nodes: n,
            median_rows_per_sec: median(runs.iter().map(|r| r.rows_per_sec).collect()),
            median_mb_per_sec: median(runs.iter().map(|r| r.mb_per_sec).collect()),
            runs,
            peak_rss_mib,
        });
        c.stop_all(Duration::from_secs(30)).await?;
    }
    for r in &results {
        println!(
            "{} node(s): median {:.0} rows/s, {:.1} MB/s; peak RSS per node (MiB): {:?}",
            r.nodes, r.median_rows_per_sec, r.median_mb_per_sec, r.peak_rss_mib
        );
    }
    if let Some(path) = &o.out {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

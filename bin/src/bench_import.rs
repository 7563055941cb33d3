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

/// `bench import` settings (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct ImportBenchOptions {
    /// What to import (file://, s3://, ...; a glob or prefix).
    pub url: String,
    /// The label column.
    #[arg(long)]
    pub label: String,
    /// Node counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub nodes: Vec<usize>,
    /// Shards in each cluster.
    #[arg(long, default_value_t = 16)]
    pub shards: u32,
    /// Imports per cluster size.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Start the nodes with this `jobs.memory_budget_bytes`, keep the last import and train on
    /// it (20 SGD steps) while sampling every node's resident memory.
    #[arg(long)]
    pub memory_budget: Option<u64>,
    /// Local CSV files to upload through the streamed client path (this process's peak
    /// resident memory is sampled during each).
    #[arg(long)]
    pub csv: Vec<PathBuf>,
    /// Write the measurements as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A job over the imported data, with the nodes' memory during it.
#[derive(Debug, Clone, Serialize)]
pub struct JobMemory {
    pub budget_mib: f64,
    pub data_mib: f64,
    pub seconds: f64,
    /// Per node: RSS before the job and its peak during it (sampled every 50 ms).
    pub rss_before_mib: Vec<f64>,
    pub rss_peak_mib: Vec<f64>,
}

/// A local CSV uploaded by this process.
#[derive(Debug, Clone, Serialize)]
pub struct ClientUpload {
    pub file: PathBuf,
    pub file_mib: f64,
    pub rows: u64,
    pub seconds: f64,
    pub client_rss_before_mib: f64,
    pub client_rss_peak_mib: f64,
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
    pub job: Option<JobMemory>,
    pub uploads: Vec<ClientUpload>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Trains (20 SGD steps, batch 65 536) over `dataset` while sampling every node's RSS.
async fn job_memory(
    c: &LocalCluster,
    client: &tidepool_runtime::client::ClusterClient,
    dataset: &str,
    budget: u64,
) -> Result<JobMemory> {
    let rec = crate::jobs_cli::list_datasets(client)
        .await?
        .into_iter()
        .find(|d| d.name == dataset)
        .context("the imported dataset")?;
    let data = tidepool_runtime::admission::data_bytes(rec.rows, rec.features.len() as u64);
    let pids: Vec<u32> = c.nodes.iter().filter_map(|p| p.pid()).collect();
    let before: Vec<f64> = pids
        .iter()
        .map(|&p| proc_status_kib(p, "VmRSS").unwrap_or(0) as f64 / 1024.0)
        .collect();
    let spec = format!(
        "[job]\nkind = \"sgd\"\ndataset = \"{dataset}\"\n[model]\ntype = \"logistic\"\n\
         [train]\nsteps = 20\nbatch_size = 65536\nlearning_rate = 0.5\nseed = 7\n\
         checkpoint_every = 1000\n"
    );
    let t0 = Instant::now();
    let (done, peaks) = crate::hostile_peer::peak_rss_of(&pids, async {
        let id = crate::jobs_cli::submit(client, &spec).await?;
        let done = crate::jobs_cli::wait(client, &id, false, Duration::from_secs(3600)).await?;
        anyhow::Ok((id, done))
    })
    .await;
    let (id, done) = done?;
    if done.state != tidepool_runtime::control::JobState::Succeeded {
        bail!("job {id} ended {:?}: {:?}", done.state, done.error);
    }
    let m = JobMemory {
        budget_mib: budget as f64 / (1 << 20) as f64,
        data_mib: data as f64 / (1 << 20) as f64,
        seconds: t0.elapsed().as_secs_f64(),
        rss_before_mib: before,
        rss_peak_mib: peaks.iter().map(|&p| p as f64 / 1024.0).collect(),
    };
    eprintln!(
        "job over {:.0} MiB of partitions with a {:.0} MiB budget: {:.1} s; RSS before {:?} MiB, peak {:?} MiB",
        m.data_mib, m.budget_mib, m.seconds, m.rss_before_mib, m.rss_peak_mib
    );
    Ok(m)
}

pub async fn run(o: ImportBenchOptions) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let mut results = Vec::new();
    for &n in &o.nodes {
        let mut c = LocalCluster::create(&exe, n, o.shards, n.min(3))?;
        if let Some(b) = o.memory_budget {
            c.env
                .push(("TIDEPOOL_JOBS__MEMORY_BUDGET_BYTES".into(), b.to_string()));
        }
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
                zero_based: false,
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
            // The last import stays for the training job, if one is asked for.
            let keep = run + 1 == o.runs && o.memory_budget.is_some();
            if !keep && !crate::jobs_cli::delete_dataset(&client, &name).await? {
                bail!("dataset {name} vanished");
            }
        }
        let job = match o.memory_budget {
            Some(budget) => {
                Some(job_memory(&c, &client, &format!("bench-{}", o.runs - 1), budget).await?)
            }
            None => None,
        };
        let mut uploads = Vec::new();
        for (k, file) in o.csv.iter().enumerate() {
            let me = std::process::id();
            let before = proc_status_kib(me, "VmRSS").unwrap_or(0);
            let t0 = Instant::now();
            let name = format!("upload-{k}");
            let (rec, peak) = crate::hostile_peer::peak_rss(me, async {
                crate::jobs_cli::import_csv(&client, file, &name, &o.label).await
            })
            .await;
            let rec = rec?;
            let u = ClientUpload {
                file: file.clone(),
                file_mib: std::fs::metadata(file)?.len() as f64 / (1 << 20) as f64,
                rows: rec.rows,
                seconds: t0.elapsed().as_secs_f64(),
                client_rss_before_mib: before as f64 / 1024.0,
                client_rss_peak_mib: peak as f64 / 1024.0,
            };
            eprintln!(
                "uploaded {} ({:.0} MiB, {} rows) in {:.1} s: client RSS {:.0} MiB before, {:.0} MiB peak",
                file.display(),
                u.file_mib,
                u.rows,
                u.seconds,
                u.client_rss_before_mib,
                u.client_rss_peak_mib
            );
            uploads.push(u);
            crate::jobs_cli::delete_dataset(&client, &name).await?;
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
            job,
            uploads,
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

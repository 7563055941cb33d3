//! `tidepool bench mf`: matrix factorisation (`mf` jobs on the parameter server) on real local
//! clusters of 1..N nodes over ratings from CSV (`tidepool dataset builtin ratings`).
//!
//! Per cluster size the training ratings are uploaded once (the streamed CSV path) and an
//! untimed one-step job loads the partitions; then each run trains one job per epoch count
//! (`--epochs`, seed `--seed + run`), timed from submit to success, and scores its model on
//! the test ratings (the model directory `job result --out` writes and the code `predict`
//! uses; not timed). From every node's `/metrics`, scraped around each job: values pulled and
//! pushed (`tidepool_param_values_total`), so updates/s (pushed rows per second) and bytes
//! moved per train step, and `tidepool_param_table_bytes`; each node's resident memory is
//! sampled during the job. "Time to reach RMSE X" (`--target-rmse`) is, per run, the time of
//! the smallest epoch count whose test RMSE is at most X. `benches/mf.sh` runs Spark ALS on the
//! same files beside it.
//!
//! `--scale` is the memory run instead (see [`scale`]): one job over a large model, each
//! node's table bytes against its share of the model, and its peak resident memory against
//! the tables plus an idle node's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::control::JobState;

use crate::hostile_peer::{peak_rss_of, proc_status_kib};
use crate::http::sum_metric;
use crate::jobs_cli::{self, ClusterParts};
use crate::local_cluster::LocalCluster;
use crate::ratings_csv::LABEL;

mod scale;

/// The dataset's name in the benchmark clusters.
const DATASET: &str = "ratings";
/// The user and item id columns (`tidepool dataset builtin ratings` writes these).
const USER_COLUMN: &str = "user";
const ITEM_COLUMN: &str = "item";
/// Bytes of one parameter value (f32).
const VALUE_BYTES: f64 = 4.0;
const MIB: f64 = (1u64 << 20) as f64;
/// How often the table-bytes gauge is read during a job.
const TABLE_SAMPLE: Duration = Duration::from_millis(250);
/// How often a job's timeline keeps a sample.
const TIMELINE_EVERY: Duration = Duration::from_secs(2);

/// `bench mf` settings (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct MfBenchOptions {
    /// Training ratings: CSV with header `user,item,rating` (`dataset builtin ratings`).
    #[arg(long)]
    pub train: PathBuf,
    /// Test ratings, the same columns, scored after every job. Required unless --scale.
    #[arg(long)]
    pub test: Option<PathBuf>,
    /// Node counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub nodes: Vec<usize>,
    /// Shards in each cluster.
    #[arg(long, default_value_t = 16)]
    pub shards: u32,
    /// Worker threads per node (`workers.threads`; 0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Runs per cluster size (run r trains with seed --seed + r).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Epoch counts, comma-separated: one job each per run (--scale: the first).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub epochs: Vec<u64>,
    /// (--scale) Train steps instead of the first epoch count.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Embedding rank.
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Ratings per train step, over all shards.
    #[arg(long, default_value_t = 20_000)]
    pub batch_size: u64,
    /// Learning rate per rating (gradients are summed over a step's ratings of a row).
    #[arg(long, default_value_t = 0.01)]
    pub learning_rate: f64,
    /// Rate at step t = learning_rate / (1 + lr_decay * t).
    #[arg(long, default_value_t = 0.0)]
    pub lr_decay: f64,
    /// L2 penalty per rating.
    #[arg(long, default_value_t = 0.05)]
    pub l2: f64,
    /// Seed of run 0.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// `train.consistency`: sync, or ssp (train steps run up to --staleness ahead).
    #[arg(long, default_value = "sync", value_parser = ["sync", "ssp"])]
    pub consistency: String,
    /// (ssp) `train.staleness` (the job's default when not given).
    #[arg(long)]
    pub staleness: Option<u64>,
    /// Save the tables every this many train steps (and at the end).
    #[arg(long, default_value_t = 1_000_000)]
    pub checkpoint_every: u64,
    /// Test RMSE to reach: per run, the time of the smallest epoch count at or below it.
    #[arg(long)]
    pub target_rmse: Option<f64>,
    /// Every node's `jobs.memory_budget_bytes` (the tables may hold half of it).
    #[arg(long)]
    pub memory_budget: Option<u64>,
    /// The memory run: one job on each cluster size, table bytes and RSS per node.
    #[arg(long)]
    pub scale: bool,
    /// Write the measurements as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One `mf` job.
#[derive(Debug, Clone, Serialize)]
pub struct MfJobRun {
    pub nodes: usize,
    pub run: usize,
    pub seed: u64,
    pub epochs: Option<u64>,
    /// Train steps the job ran.
    pub steps: u64,
    /// Submit to success.
    pub seconds: f64,
    pub test_rmse: Option<f64>,
    /// The last epoch's training RMSE as the job reports it.
    pub train_rmse: Option<f64>,
    pub pulled_values: f64,
    pub pushed_values: f64,
    /// Pushed rows (gradient rows received by the tables, all nodes) per job second.
    pub updates_per_sec: f64,
    /// (pulled + pushed values) x 4 bytes / train steps.
    pub bytes_per_step: f64,
    /// Per node: the largest `tidepool_param_table_bytes` seen during the job.
    pub table_bytes: Vec<f64>,
    /// Per node: peak resident memory during the job (sampled every 50 ms).
    pub rss_peak_mib: Vec<f64>,
}

/// The smallest epoch count of a run that reached the target.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Reached {
    pub run: usize,
    pub epochs: u64,
    pub seconds: f64,
    pub test_rmse: f64,
}

/// One cluster size.
#[derive(Debug, Clone, Serialize)]
pub struct MfCluster {
    pub nodes: usize,
    pub shards_owned: Vec<f64>,
    /// Per node, after the upload and the warm-up job, before the timed jobs.
    pub rss_idle_mib: Vec<f64>,
    pub jobs: Vec<MfJobRun>,
    /// Per run (None: no epoch count reached the target).
    pub time_to_target: Vec<Option<Reached>>,
    pub median_time_to_target: Option<f64>,
    /// Medians over the runs' jobs of the largest epoch count.
    pub median_updates_per_sec: f64,
    pub median_bytes_per_step: f64,
    /// Per node: the process's peak resident memory (`VmHWM`) at the end, upload included.
    pub peak_rss_mib: Vec<f64>,
}

/// What `bench mf` writes.
#[derive(Debug, Clone, Serialize)]
pub struct MfReport {
    pub train: PathBuf,
    pub test: Option<PathBuf>,
    pub train_rows: u64,
    pub rank: usize,
    pub batch_size: u64,
    pub learning_rate: f64,
    pub lr_decay: f64,
    pub l2: f64,
    pub workers: usize,
    pub shards: u32,
    pub consistency: String,
    pub staleness: Option<u64>,
    pub target_rmse: Option<f64>,
    /// The spec of run 0's largest job.
    pub spec: String,
    pub clusters: Vec<MfCluster>,
}

/// The median (NaN when empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The job spec: `length` is `epochs = E` or `steps = S`.
fn spec(o: &MfBenchOptions, length: &str, seed: u64) -> String {
    let staleness = match o.staleness {
        Some(s) if o.consistency == "ssp" => format!("staleness = {s}\n"),
        _ => String::new(),
    };
    format!(
        "[job]\nkind = \"mf\"\ndataset = \"{DATASET}\"\n\
         [model]\nrank = {}\nuser_column = \"{USER_COLUMN}\"\nitem_column = \"{ITEM_COLUMN}\"\n\
         [train]\n{length}\nbatch_size = {}\nlearning_rate = {}\nlr_decay = {}\nl2 = {}\n\
         seed = {seed}\ncheckpoint_every = {}\nconsistency = \"{}\"\n{staleness}",
        o.rank, o.batch_size, o.learning_rate, o.lr_decay, o.l2, o.checkpoint_every, o.consistency
    )
}

/// One node's parameter-server counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NodeCounters {
    pub pulled: f64,
    pub pushed: f64,
    pub shards_owned: f64,
}

/// Scrapes every node's `/metrics`.
pub(crate) async fn scrape(c: &LocalCluster) -> Result<Vec<NodeCounters>> {
    let mut out = Vec::with_capacity(c.nodes.len());
    for i in 0..c.nodes.len() {
        let text = c.metrics(i).await?;
        let values = "tidepool_param_values_total";
        out.push(NodeCounters {
            pulled: sum_metric(&text, values, &[("kind", "pull")]),
            pushed: sum_metric(&text, values, &[("kind", "push")]),
            shards_owned: sum_metric(&text, "tidepool_shards_owned", &[]),
        });
    }
    Ok(out)
}

/// Every node's resident memory now, in MiB (`field`: `VmRSS` or `VmHWM`).
pub(crate) fn rss_mib(c: &LocalCluster, field: &str) -> Vec<f64> {
    c.nodes
        .iter()
        .map(|p| {
            p.pid()
                .and_then(|pid| proc_status_kib(pid, field))
                .map_or(f64::NAN, |k| k as f64 / 1024.0)
        })
        .collect()
}

/// A finished job and what the nodes did during it.
pub(crate) struct Finished {
    pub id: String,
    pub seconds: f64,
    pub doc: serde_json::Value,
    pub before: Vec<NodeCounters>,
    pub after: Vec<NodeCounters>,
    pub rss_peak_mib: Vec<f64>,
    /// Per node: the largest `tidepool_param_table_bytes` seen during the job.
    pub table_bytes_peak: Vec<f64>,
    /// Table bytes and RSS of every node, about every [`TIMELINE_EVERY`].
    pub timeline: Vec<Sample>,
}

impl Finished {
    /// Summed over nodes: (values pulled, values pushed) during the job.
    pub fn moved(&self) -> (f64, f64) {
        self.before
            .iter()
            .zip(&self.after)
            .fold((0.0, 0.0), |(p, q), (b, a)| {
                (p + a.pulled - b.pulled, q + a.pushed - b.pushed)
            })
    }

    /// Train steps the job ran (its result's `steps`).
    pub fn steps(&self) -> u64 {
        self.doc["steps"].as_u64().unwrap_or(0)
    }
}

/// One sample of every node during a job.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the job was submitted.
    pub t: f64,
    pub table_mib: Vec<f64>,
    pub rss_mib: Vec<f64>,
}

/// Every node's `tidepool_param_table_bytes` and RSS, read every [`TABLE_SAMPLE`] until
/// `stop`: the largest table bytes seen per node, and a sample every [`TIMELINE_EVERY`]. (A
/// node drops a job's tables once the job is over, so the gauge must be read while it runs.)
async fn sample_nodes(c: &LocalCluster, stop: &AtomicBool, t0: Instant) -> (Vec<f64>, Vec<Sample>) {
    let mut peak = vec![0f64; c.nodes.len()];
    let mut timeline = Vec::new();
    let mut next = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let mut now = vec![f64::NAN; c.nodes.len()];
        for (i, (p, v)) in peak.iter_mut().zip(now.iter_mut()).enumerate() {
            // A missed scrape is only a missed sample.
            if let Ok(text) = c.metrics(i).await {
                *v = sum_metric(&text, "tidepool_param_table_bytes", &[]);
                *p = p.max(*v);
            }
        }
        if t0.elapsed() >= next {
            next += TIMELINE_EVERY;
            timeline.push(Sample {
                t: t0.elapsed().as_secs_f64(),
                table_mib: now.iter().map(|b| b / MIB).collect(),
                rss_mib: rss_mib(c, "VmRSS"),
            });
        }
        tokio::time::sleep(TABLE_SAMPLE).await;
    }
    (peak, timeline)
}

/// Submits `spec`, waits for success while sampling every node's RSS and table bytes, scrapes
/// the counters before and after, and fetches the result document.
pub(crate) async fn timed_job(
    c: &LocalCluster,
    client: &ClusterClient,
    spec: &str,
) -> Result<Finished> {
    let pids: Vec<u32> = c.nodes.iter().filter_map(|p| p.pid()).collect();
    ensure!(pids.len() == c.nodes.len(), "a node is not running");
    let before = scrape(c).await?;
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let job = async {
        let out = peak_rss_of(&pids, async {
            let id = jobs_cli::submit(client, spec).await?;
            let rec = jobs_cli::wait(client, &id, false, Duration::from_secs(6 * 3600)).await?;
            anyhow::Ok((id, rec))
        })
        .await;
        let seconds = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        (out, seconds)
    };
    let (((done, peaks), seconds), (table_bytes_peak, timeline)) =
        tokio::join!(job, sample_nodes(c, &stop, t0));
    let (id, rec) = done?;
    if rec.state != JobState::Succeeded {
        bail!("mf job {id} ended {:?}: {:?}", rec.state, rec.error);
    }
    let after = scrape(c).await?;
    let doc = jobs_cli::result(client, &id).await?;
    Ok(Finished {
        id,
        seconds,
        doc,
        before,
        after,
        rss_peak_mib: peaks.iter().map(|&k| k as f64 / 1024.0).collect(),
        table_bytes_peak,
        timeline,
    })
}

/// Writes the job's model directory into a temporary directory and scores it on `test`.
async fn test_rmse(client: &ClusterClient, job: &Finished, spec: &str, test: &Path) -> Result<f64> {
    let dir = tempfile::Builder::new()
        .prefix("tidepool-mf-bench-")
        .tempdir()
        .context("creating a temporary model directory")?;
    let src = ClusterParts {
        client,
        id: &job.id,
    };
    crate::mf_dir::write(
        dir.path(),
        &job.doc,
        &job.id,
        Some(spec.to_string()),
        LABEL,
        &src,
    )
    .await
    .with_context(|| format!("writing the model directory of job {}", job.id))?;
    let report = crate::mf_predict::run(dir.path(), test, Some(LABEL))
        .with_context(|| format!("scoring job {} on {}", job.id, test.display()))?;
    Ok(report.rmse)
}

/// Starts a cluster of `n` nodes with the options' environment, connected and settled.
pub(crate) async fn start_cluster(
    o: &MfBenchOptions,
    n: usize,
) -> Result<(LocalCluster, ClusterClient)> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let mut c = LocalCluster::create(&exe, n, o.shards, n.min(3))?;
    c.env
        .push(("TIDEPOOL_WORKERS__THREADS".into(), o.workers.to_string()));
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
    Ok((c, client))
}

/// Uploads the training ratings; returns their row count.
pub(crate) async fn upload(client: &ClusterClient, train: &Path) -> Result<u64> {
    let t0 = Instant::now();
    let rec = jobs_cli::import_csv(client, train, DATASET, LABEL)
        .await
        .with_context(|| format!("uploading {}", train.display()))?;
    eprintln!(
        "uploaded {} ({} ratings) in {:.1} s",
        train.display(),
        rec.rows,
        t0.elapsed().as_secs_f64()
    );
    Ok(rec.rows)
}

/// Per run, the smallest epoch count whose test RMSE is at most `target`.
fn reached(jobs: &[MfJobRun], runs: usize, target: f64) -> Vec<Option<Reached>> {
    (0..runs)
        .map(|run| {
            jobs.iter()
                .filter(|j| j.run == run)
                .filter_map(|j| Some((j, j.epochs?, j.test_rmse?)))
                .filter(|(_, _, rmse)| *rmse <= target)
                .min_by_key(|(_, e, _)| *e)
                .map(|(j, epochs, test_rmse)| Reached {
                    run,
                    epochs,
                    seconds: j.seconds,
                    test_rmse,
                })
        })
        .collect()
}

/// Trains and scores one job.
async fn one_job(
    c: &LocalCluster,
    client: &ClusterClient,
    o: &MfBenchOptions,
    test: &Path,
    (run, epochs): (usize, u64),
) -> Result<(MfJobRun, String)> {
    let n = c.nodes.len();
    let seed = o.seed + run as u64;
    let text = spec(o, &format!("epochs = {epochs}"), seed);
    let job = timed_job(c, client, &text).await?;
    let rmse = test_rmse(client, &job, &text, test).await?;
    let (pulled, pushed) = job.moved();
    let steps = job.steps();
    let r = MfJobRun {
        nodes: n,
        run,
        seed,
        epochs: Some(epochs),
        steps,
        seconds: job.seconds,
        test_rmse: Some(rmse),
        train_rmse: job.doc["train_rmse"].as_f64(),
        pulled_values: pulled,
        pushed_values: pushed,
        updates_per_sec: pushed / o.rank as f64 / job.seconds,
        bytes_per_step: (pulled + pushed) * VALUE_BYTES / steps.max(1) as f64,
        table_bytes: job.table_bytes_peak.clone(),
        rss_peak_mib: job.rss_peak_mib.clone(),
    };
    eprintln!(
        "{n} node(s), run {run}, {epochs} epoch(s): {:.2} s, {steps} steps, test RMSE {rmse:.4}, \
         {:.0} updates/s, {:.2} MB/step",
        r.seconds,
        r.updates_per_sec,
        r.bytes_per_step / 1e6
    );
    Ok((r, text))
}

/// One cluster size: upload, warm-up, the runs.
async fn cluster(o: &MfBenchOptions, n: usize, test: &Path) -> Result<(MfCluster, u64, String)> {
    let (mut c, client) = start_cluster(o, n).await?;
    let rows = upload(&client, &o.train).await?;
    // Loads (maps) every partition; not timed.
    timed_job(&c, &client, &spec(o, "steps = 1", o.seed)).await?;
    let idle = scrape(&c).await?;
    let rss_idle_mib = rss_mib(&c, "VmRSS");
    let mut jobs = Vec::new();
    let mut last_spec = String::new();
    let max_epochs = o.epochs.iter().copied().max().unwrap_or(1);
    for run in 0..o.runs {
        for &epochs in &o.epochs {
            let (r, text) = one_job(&c, &client, o, test, (run, epochs)).await?;
            if run == 0 && epochs == max_epochs {
                last_spec = text;
            }
            jobs.push(r);
        }
    }
    let largest: Vec<&MfJobRun> = jobs
        .iter()
        .filter(|j| j.epochs == Some(max_epochs))
        .collect();
    let time_to_target = match o.target_rmse {
        Some(x) => reached(&jobs, o.runs, x),
        None => Vec::new(),
    };
    let hit: Vec<f64> = time_to_target.iter().flatten().map(|r| r.seconds).collect();
    let out = MfCluster {
        nodes: n,
        shards_owned: idle.iter().map(|s| s.shards_owned).collect(),
        rss_idle_mib,
        median_time_to_target: (hit.len() == o.runs && !hit.is_empty()).then(|| median(hit)),
        median_updates_per_sec: median(largest.iter().map(|j| j.updates_per_sec).collect()),
        median_bytes_per_step: median(largest.iter().map(|j| j.bytes_per_step).collect()),
        peak_rss_mib: rss_mib(&c, "VmHWM"),
        time_to_target,
        jobs,
    };
    c.stop_all(Duration::from_secs(30)).await?;
    Ok((out, rows, last_spec))
}

/// Writes `value` as pretty JSON to `out`, or to stdout without it.
pub(crate) fn write_json(out: Option<&Path>, value: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    match out {
        Some(path) => {
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            println!("{json}");
            Ok(())
        }
    }
}

/// `tidepool bench mf`.
pub async fn run(o: MfBenchOptions) -> Result<()> {
    ensure!(!o.nodes.is_empty(), "--nodes is empty");
    ensure!(
        o.nodes.iter().all(|&n| n >= 1),
        "--nodes must be at least 1"
    );
    ensure!(!o.epochs.is_empty(), "--epochs is empty");
    ensure!(
        o.epochs.iter().all(|&e| e >= 1),
        "--epochs must be at least 1"
    );
    if o.scale {
        return scale::run(&o).await;
    }
    let Some(test) = o.test.clone() else {
        bail!("--test is required (the ratings each job's model is scored on)");
    };
    ensure!(o.runs >= 1, "--runs must be at least 1");
    let mut clusters = Vec::new();
    let (mut train_rows, mut last_spec) = (0, String::new());
    for &n in &o.nodes {
        let (c, rows, text) = cluster(&o, n, &test).await?;
        (train_rows, last_spec) = (rows, text);
        clusters.push(c);
    }
    for c in &clusters {
        let ttt = c
            .median_time_to_target
            .map_or("not reached in every run".to_string(), |s| {
                format!("{s:.2} s")
            });
        println!(
            "{} node(s): time to target {ttt}; median {:.0} updates/s, {:.2} MB/step; \
             peak RSS per node (MiB): {:.0?}",
            c.nodes,
            c.median_updates_per_sec,
            c.median_bytes_per_step / 1e6,
            c.peak_rss_mib
        );
    }
    let report = MfReport {
        train: o.train.clone(),
        test: Some(test),
        train_rows,
        rank: o.rank,
        batch_size: o.batch_size,
        learning_rate: o.learning_rate,
        lr_decay: o.lr_decay,
        l2: o.l2,
        workers: o.workers,
        shards: o.shards,
        consistency: o.consistency.clone(),
        staleness: o.staleness,
        target_rmse: o.target_rmse,
        spec: last_spec,
        clusters,
    };
    write_json(o.out.as_deref(), &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(run: usize, epochs: u64, seconds: f64, rmse: f64) -> MfJobRun {
        MfJobRun {
            nodes: 1,
            run,
            seed: 7,
            epochs: Some(epochs),
            steps: epochs,
            seconds,
            test_rmse: Some(rmse),
            train_rmse: None,
            pulled_values: 0.0,
            pushed_values: 0.0,
            updates_per_sec: 0.0,
            bytes_per_step: 0.0,
            table_bytes: Vec::new(),
            rss_peak_mib: Vec::new(),
        }
    }

    #[test]
    fn time_to_target_is_the_smallest_epoch_count_reaching_it() {
        let jobs = vec![
            job(0, 1, 1.0, 0.9),
            job(0, 4, 4.0, 0.5),
            job(0, 2, 2.0, 0.6),
            job(1, 1, 1.5, 0.9),
            job(1, 2, 2.5, 0.8),
        ];
        let r = reached(&jobs, 2, 0.6);
        assert_eq!(r[0].map(|r| (r.epochs, r.seconds)), Some((2, 2.0)));
        assert!(r[1].is_none());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}

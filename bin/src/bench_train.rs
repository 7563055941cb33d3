//! `tidepool bench train`: synchronous-SGD throughput of real local clusters against a plain
//! single-threaded training loop over the same in-memory data (the limit: the same minibatch
//! kernel, no runtime), scaling
//! efficiency across node counts, and synchronous vs local SGD time to a target loss.
//!
//! Every node runs with `workers.threads = --workers` (default 1), so on a machine with C
//! cores up to C nodes each get a core of their own. Partitions are generated on the shards'
//! owners (a synthetic dataset) and a warm-up job loads them before anything is timed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nalgebra::DMatrix;
use serde::Serialize;
use tidepool_actors::jobs::minibatch::{loss_and_grad_rows, DenseRows};
use tidepool_actors::jobs::models::{LossGrad, LrSchedule, ModelKind, Standardizer};
use tidepool_actors::jobs::sgd::{apply_step, minibatch_indices};
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::control::JobState;
use tidepool_runtime::dataset::{synthetic_shard, SyntheticKind};

use crate::jobs_cli;
use crate::local_cluster::{wait_all_up, wait_stable, LocalCluster};

/// `bench train` settings.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// Node counts to measure, e.g. `[1, 2]`.
    pub nodes: Vec<usize>,
    pub shards: u32,
    pub rows: u64,
    pub features: usize,
    /// Global minibatch.
    pub batch: u64,
    pub steps: u64,
    /// Worker threads per node.
    pub workers: usize,
    /// Also compare synchronous with local SGD (time to a target loss).
    pub local: bool,
    pub out: Option<std::path::PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub what: String,
    pub nodes: usize,
    pub seconds: f64,
    pub samples_per_sec: f64,
}

fn spec(kind: &str, o: &TrainBenchOptions, steps: u64, extra: &str) -> String {
    format!(
        "[job]\nkind = \"{kind}\"\ndataset = \"synth\"\n[model]\ntype = \"logistic\"\n\
         [train]\nsteps = {steps}\nbatch_size = {}\nlearning_rate = 0.5\nseed = 7\n\
         standardize = false\ncheckpoint_every = 1000000\n{extra}",
        o.batch
    )
}

/// The plain loop: the same data in memory, the same per-shard minibatches read by the same
/// kernel as the jobs' (`minibatch::loss_and_grad_rows`), one gradient and update per step, one
/// thread.
pub fn plain_loop(o: &TrainBenchOptions) -> Measured {
    let parts: Vec<_> = (0..o.shards)
        .map(|s| synthetic_shard(o.rows, o.features, SyntheticKind::Logistic, 1, s, o.shards))
        .collect();
    let d = o.features;
    let mut params = DMatrix::<f64>::zeros(d + 1, 1);
    let identity = Standardizer {
        mean: Vec::new(),
        std: Vec::new(),
    };
    let started = Instant::now();
    let mut samples = 0u64;
    for t in 0..o.steps {
        let mut total = LossGrad {
            loss_sum: 0.0,
            grad_sum: DMatrix::zeros(d + 1, 1),
            count: 0,
        };
        for (s, p) in parts.iter().enumerate() {
            let b = (o.batch * p.rows() as u64).div_ceil(o.rows.max(1)) as usize;
            let idx = minibatch_indices(7, t, s as u32, p.rows(), b.min(p.rows()));
            let Some(rows) = DenseRows::new(p.features(), d) else {
                continue;
            };
            let lg = loss_and_grad_rows(
                ModelKind::Logistic,
                &params,
                &identity,
                &rows,
                p.labels(),
                &idx,
            );
            if let Ok(lg) = lg {
                total.loss_sum += lg.loss_sum;
                total.grad_sum += lg.grad_sum;
                total.count += lg.count;
            }
        }
        samples += total.count;
        if let Ok(out) = apply_step(&params, t, &total, 0.0, LrSchedule::Constant(0.5)) {
            params = out.params;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Measured {
        what: "plain single-threaded loop".into(),
        nodes: 0,
        seconds,
        samples_per_sec: samples as f64 / seconds,
    }
}

async fn timed_job(client: &ClusterClient, spec: &str) -> Result<(f64, serde_json::Value)> {
    let started = Instant::now();
    let id = jobs_cli::submit(client, spec).await?;
    let deadline = started + Duration::from_secs(1800);
    let rec = loop {
        let rec = jobs_cli::status(client, &id).await?;
        if rec.state.is_terminal() {
            break rec;
        }
        if Instant::now() > deadline {
            bail!("job {id} did not finish");
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
    };
    let secs = started.elapsed().as_secs_f64();
    if rec.state != JobState::Succeeded {
        bail!(
            "job {id} ended {}: {}",
            rec.state.as_str(),
            rec.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok((secs, jobs_cli::result(client, &id).await?))
}

/// First time (seconds, linear in steps) the loss history reaches `target`.
fn time_to(result: &serde_json::Value, secs: f64, target: f64) -> Option<f64> {
    let losses = result["losses"].as_array()?;
    let n = losses.len().max(1) as f64;
    losses
        .iter()
        .position(|l| l[1].as_f64().is_some_and(|v| v <= target))
        .map(|i| secs * (i + 1) as f64 / n)
}

async fn cluster_run(
    o: &TrainBenchOptions,
    n: usize,
    out: &mut Vec<Measured>,
) -> Result<Option<(f64, f64)>> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let mut cluster = LocalCluster::create(&exe, n, o.shards, 1)?;
    cluster
        .env
        .push(("TIDEPOOL_WORKERS__THREADS".into(), o.workers.to_string()));
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(120)).await?;
    let client = cluster.admin_client(ClientOptions::default()).await?;
    wait_all_up(&client, n, Duration::from_secs(60)).await?;
    wait_stable(&client, Duration::from_secs(120)).await?;
    jobs_cli::create_synthetic(&client, "synth", o.rows, o.features, "logistic", 1).await?;
    timed_job(&client, &spec("sgd", o, 2, "")).await?; // warm-up: partitions load
    let (secs, sync) = timed_job(&client, &spec("sgd", o, o.steps, "")).await?;
    let samples = (o.steps * o.batch) as f64;
    out.push(Measured {
        what: "synchronous SGD".into(),
        nodes: n,
        seconds: secs,
        samples_per_sec: samples / secs,
    });
    let mut ttl = None;
    if o.local {
        let rounds = (o.steps / 10).max(1);
        let (lsecs, local) = timed_job(
            &client,
            &spec("local_sgd", o, rounds * 10, "local_steps = 10\n"),
        )
        .await?;
        out.push(Measured {
            what: "local SGD (10 local steps)".into(),
            nodes: n,
            seconds: lsecs,
            samples_per_sec: samples / lsecs,
        });
        let final_loss = |v: &serde_json::Value| {
            v["losses"]
                .as_array()
                .and_then(|l| l.last())
                .and_then(|l| l[1].as_f64())
                .unwrap_or(f64::NAN)
        };
        let target = final_loss(&sync).max(final_loss(&local)) * 1.02;
        ttl = time_to(&sync, secs, target).zip(time_to(&local, lsecs, target));
        if let Some((a, b)) = ttl {
            println!("  time to loss {target:.4}: synchronous {a:.2} s, local {b:.2} s");
        }
    }
    client.close().await;
    cluster.stop_all(Duration::from_secs(30)).await?;
    Ok(ttl)
}

pub async fn run(o: TrainBenchOptions) -> Result<()> {
    println!(
        "bench train: {} rows x {} features, batch {}, {} steps, {} shards, {} worker thread(s) per node",
        o.rows, o.features, o.batch, o.steps, o.shards, o.workers
    );
    let mut out = vec![plain_loop(&o)];
    println!(
        "  plain loop: {:.0} samples/s ({:.2} s)",
        out[0].samples_per_sec, out[0].seconds
    );
    for &n in &o.nodes {
        cluster_run(&o, n, &mut out).await?;
        if let Some(m) = out
            .iter()
            .rev()
            .find(|m| m.nodes == n && m.what.starts_with("sync"))
        {
            println!(
                "  {n} node(s): {:.0} samples/s ({:.2} s) = {:.2}x the plain loop",
                m.samples_per_sec,
                m.seconds,
                m.samples_per_sec / out[0].samples_per_sec
            );
        }
    }
    let sync: Vec<&Measured> = out.iter().filter(|m| m.what.starts_with("sync")).collect();
    if let Some(one) = sync.iter().find(|m| m.nodes == 1) {
        for m in sync.iter().filter(|m| m.nodes > 1) {
            println!(
                "  efficiency at {} nodes: T1 / ({} * T{}) = {:.2}",
                m.nodes,
                m.nodes,
                m.nodes,
                one.seconds / (m.nodes as f64 * m.seconds)
            );
        }
    }
    if let Some(path) = &o.out {
        write_json(path, &out)?;
    }
    Ok(())
}

fn write_json(path: &Path, out: &[Measured]) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(out)?)
        .with_context(|| format!("writing {}", path.display()))
}

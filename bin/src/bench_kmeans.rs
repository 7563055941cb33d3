//! `tidepool bench kmeans URL`: k-means on a real local cluster over a dataset imported from
//! storage, timed from submit to result, with its inertia and iterations; `benches/kmeans.sh`
//! runs scikit-learn's `KMeans` on the same rows in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tidepool_actors::imports::ImportArg;
use tidepool_runtime::client::ClientOptions;
use tidepool_runtime::control::JobState;

use crate::local_cluster::LocalCluster;
use crate::{import_watch, jobs_cli};

/// `bench kmeans` settings (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct KMeansBenchOptions {
    /// The points (file://, s3://, ...), imported first.
    pub url: String,
    /// A column to leave out of the features (the points' true cluster, say).
    #[arg(long)]
    pub label: String,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Shards in the cluster.
    #[arg(long, default_value_t = 16)]
    pub shards: u32,
    /// Clusters.
    #[arg(long, default_value_t = 8)]
    pub k: usize,
    /// Lloyd steps at most.
    #[arg(long, default_value_t = 50)]
    pub max_iter: u64,
    /// Runs side by side per job.
    #[arg(long, default_value_t = 1)]
    pub n_init: usize,
    /// Seeds, comma-separated: one job each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Write the runs as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One k-means job.
#[derive(Debug, Clone, Serialize)]
pub struct KMeansRun {
    pub seed: u64,
    pub n_init: usize,
    pub seconds: f64,
    pub inertia: f64,
    pub iterations: u64,
}

pub async fn run(o: KMeansBenchOptions) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let mut c = LocalCluster::create(&exe, o.nodes, o.shards, o.nodes.min(3))?;
    c.start_all()?;
    let copts = ClientOptions {
        retry_for: Duration::from_secs(60),
        ..Default::default()
    };
    let client = c.settled_admin_client(copts).await?;
    let arg = ImportArg {
        name: "points".into(),
        url: o.url.clone(),
        label: o.label.clone(),
        format: None,
        features: Vec::new(),
        nulls: None,
        max_categories: None,
        hash_buckets: None,
        split_bytes: None,
        zero_based: false,
    };
    let started = import_watch::start(&client, &arg).await?;
    let imported = import_watch::follow(&client, &started.id, false, None).await?;
    eprintln!(
        "imported {} rows x {} features",
        imported.rows, imported.features
    );
    // A first job loads (maps) every partition; it is not timed.
    let warm = "[job]\nkind = \"stats\"\ndataset = \"points\"\n[train]\nbins = 2\n";
    let id = jobs_cli::submit(&client, warm).await?;
    jobs_cli::wait(&client, &id, false, Duration::from_secs(3600)).await?;
    let mut runs = Vec::new();
    for &seed in &o.seeds {
        let spec = format!(
            "[job]\nkind = \"kmeans\"\ndataset = \"points\"\n[model]\nk = {}\n\
             [train]\nmax_iter = {}\nseed = {seed}\nn_init = {}\ncheckpoint_every = 1000\n",
            o.k, o.max_iter, o.n_init
        );
        let t0 = Instant::now();
        let id = jobs_cli::submit(&client, &spec).await?;
        let rec = jobs_cli::wait(&client, &id, false, Duration::from_secs(3600)).await?;
        let seconds = t0.elapsed().as_secs_f64();
        if rec.state != JobState::Succeeded {
            bail!("k-means job {id} ended {:?}: {:?}", rec.state, rec.error);
        }
        let result = jobs_cli::result(&client, &id).await?;
        let r = KMeansRun {
            seed,
            n_init: o.n_init,
            seconds,
            inertia: result["inertia"].as_f64().unwrap_or(f64::NAN),
            iterations: result["iterations"].as_u64().unwrap_or(0),
        };
        eprintln!(
            "k-means seed {seed}, n_init {}: {:.2} s, inertia {:.6e}, {} iterations",
            o.n_init, r.seconds, r.inertia, r.iterations
        );
        runs.push(r);
    }
    c.stop_all(Duration::from_secs(30)).await?;
    let json = serde_json::to_string_pretty(&runs)?;
    match &o.out {
        Some(path) => {
            std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?
        }
        None => println!("{json}"),
    }
    Ok(())
}

//! `tidepool demo`: the main job, end to end, on a fresh machine. Makes a throwaway CA, starts
//! 3 node processes on loopback (all three control-plane voters), imports the breast-cancer
//! dataset's training split, trains logistic regression with synchronous data-parallel SGD,
//! kills -9 the node running the job's coordinator a third of the way (its shards and the coordinator
//! move; the job resumes from its checkpoint), then scores the model on the held-out split
//! beside smartcore's single-node logistic regression on the same split. With `--recommend`
//! the same cluster runs matrix factorisation on the parameter server instead
//! ([`crate::demo_recommend`]).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tidepool_actors::jobs::model_file::ModelFile;
use tidepool_runtime::client::ClientOptions;
use tidepool_runtime::control::JobState;

use crate::local_cluster::{wait_all_up, wait_stable, LocalCluster};
use crate::{datasets, jobs_cli, predict};

/// Demo settings (CLI flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub nodes: usize,
    pub shards: u32,
    pub epochs: u64,
    pub keep: bool,
    /// Kill the coordinator's node a third of the way through the job.
    pub kill: bool,
    /// Run the recommendation demo ([`crate::demo_recommend`]) instead.
    pub recommend: bool,
}

/// The job the demo runs.
pub fn spec(epochs: u64) -> String {
    format!(
        r#"[job]
kind = "sgd"
dataset = "cancer"
[model]
type = "logistic"
[train]
epochs = {epochs}
batch_size = 32
learning_rate = 0.1
l2 = 0.0001
seed = 7
checkpoint_every = 10
"#
    )
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let voters = opts.nodes.min(3);
    let mut cluster = LocalCluster::create(&exe, opts.nodes, opts.shards, voters)?;
    println!(
        "tidepool demo{}: {} nodes ({} voters), {} shards, temp dir {}",
        if opts.recommend { " --recommend" } else { "" },
        opts.nodes,
        voters,
        opts.shards,
        cluster.root().display()
    );
    let started = Instant::now();
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    println!(
        "cluster is ready after {:.1?} (every node's /readyz answers 200)",
        started.elapsed()
    );
    let result = if opts.recommend {
        crate::demo_recommend::train_and_recommend(&mut cluster, &opts).await
    } else {
        train_and_score(&mut cluster, &opts).await
    };
    let statuses = cluster.stop_all(Duration::from_secs(30)).await?;
    let clean = statuses.iter().all(|s| s.success());
    if opts.keep || result.is_err() || !clean {
        let dir = cluster.keep();
        println!("logs and certificates kept in {}", dir.display());
    }
    result?;
    if !clean {
        bail!("a node did not exit cleanly: {statuses:?}");
    }
    println!(
        "nodes stopped cleanly; demo OK in {:.1?}",
        started.elapsed()
    );
    Ok(())
}

async fn train_and_score(cluster: &mut LocalCluster, opts: &DemoOptions) -> Result<()> {
    let client = cluster.admin_client(ClientOptions::default()).await?;
    wait_all_up(&client, opts.nodes, Duration::from_secs(60)).await?;
    wait_stable(&client, Duration::from_secs(90)).await?;

    let table = datasets::builtin("breast_cancer")?;
    let (train, test) = datasets::split(&table, 0.2, 7);
    let test_csv = cluster.root().join("cancer-test.csv");
    datasets::write_csv(&test, &test_csv)?;
    let rec = jobs_cli::import_table(&client, &train, "cancer").await?;
    println!(
        "\nimported breast cancer (smartcore): {} training rows x {} features onto {} shards; {} test rows held out",
        rec.rows,
        rec.features.len(),
        rec.shards,
        test.rows
    );

    let id = jobs_cli::submit(&client, &spec(opts.epochs)).await?;
    println!(
        "submitted {id}: logistic regression, synchronous SGD, {} epochs",
        opts.epochs
    );
    let mut killed = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let rec = loop {
        let rec = jobs_cli::status(&client, &id).await?;
        if rec.state.is_terminal() {
            break rec;
        }
        // A third of the way through: a short job (2 epochs, 32 steps) passes from there to its
        // end in well over a dozen polls, so the kill lands before it finishes (with a kill
        // at halfway and 100 ms polls, a fast run once finished between two polls).
        if opts.kill && killed.is_none() && rec.steps > 0 && rec.step * 3 >= rec.steps {
            if let Some(coord) = rec.coordinator.clone() {
                let i = cluster
                    .nodes
                    .iter()
                    .position(|n| n.name == coord)
                    .context("coordinator node")?;
                cluster.kill(i).await?;
                println!(
                    "  step {}/{} loss {:.4}: killed {coord} (running the coordinator) with SIGKILL",
                    rec.step,
                    rec.steps,
                    rec.loss.unwrap_or(f64::NAN)
                );
                killed = Some((coord, rec.step));
            }
        }
        if Instant::now() > deadline {
            bail!("job {id} still {} after 300 s", rec.state.as_str());
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
    };
    if rec.state != JobState::Succeeded {
        bail!(
            "job {id} ended {}: {}",
            rec.state.as_str(),
            rec.error.as_deref().unwrap_or("no reason given")
        );
    }
    if let Some((coord, step)) = &killed {
        println!(
            "  the job resumed on {} from its last checkpoint before step {step} and finished (killed {coord})",
            rec.coordinator.as_deref().unwrap_or("?")
        );
    }
    println!(
        "  finished: {} steps, final training loss {:.4}",
        rec.step,
        rec.loss.unwrap_or(f64::NAN)
    );

    let result = jobs_cli::result(&client, &id).await?;
    let model_path = cluster.root().join("cancer-model.json");
    std::fs::write(&model_path, serde_json::to_vec_pretty(&result)?)?;
    ModelFile::from_json(&serde_json::to_vec(&result)?)?;
    let ours = predict::run_predict(&model_path, &test_csv, None)?;
    let theirs = datasets::smartcore_logistic_accuracy(&train, &test)?;
    let acc = ours.accuracy.unwrap_or(f64::NAN);
    println!("\ntest accuracy on {} held-out rows:", ours.rows);
    println!(
        "  tidepool (3 nodes, one killed mid-job)  {:.2}%",
        acc * 100.0
    );
    println!(
        "  smartcore (single node, same split)     {:.2}%",
        theirs * 100.0
    );
    // The files are removed with the cluster's directory unless it is kept.
    if opts.keep {
        println!(
            "  model written to {} (try: tidepool predict --model {} --data {})",
            model_path.display(),
            model_path.display(),
            test_csv.display()
        );
    }
    println!("\nmetrics (Prometheus text) while it runs:");
    for n in cluster.nodes.iter().filter(|n| n.pid().is_some()) {
        println!("  {}: http://{}/metrics", n.name, n.admin);
    }
    println!("  e.g. tidepool_job_steps_total, tidepool_job_loss, tidepool_job_checkpoints_total");
    client.close().await;
    if acc + 0.01 < theirs {
        bail!("accuracy {acc:.4} is more than 1 point below smartcore's {theirs:.4}");
    }
    Ok(())
}

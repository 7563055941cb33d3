//! `tidepool demo --recommend`: matrix factorisation on the parameter server, end to end. On the
//! demo's local cluster ([`crate::demo::run`]) it generates seeded synthetic ratings with a
//! planted low-rank structure, imports the training split, trains user and item embeddings
//! (an `mf` job: the tables are spread over the shards), kills -9 a node that owns some of
//! them a third of the way (the job rolls back to its last saved tables and goes on), then
//! scores the model on the held-out ratings beside the plain single-process reference
//! ([`mf::reference_train`] over the same per-shard rows) and beside predicting the mean,
//! checks the tables against the reference's bit for bit, writes the model directory and
//! prints a few users' top items from it (the code of `tidepool recommend`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tidepool_actors::jobs::mf;
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::control::JobState;
use tidepool_runtime::dataset::{shard_of_row, Table};
use tidepool_runtime::jobspec::JobSpec;
use tidepool_runtime::ratings::{self, Rating, RatingsSpec};

use crate::demo::DemoOptions;
use crate::local_cluster::{wait_all_up, wait_stable, LocalCluster};
use crate::mf_model::MfModel;
use crate::ratings_csv::{self, RatingsOptions};
use crate::{jobs_cli, mf_dir, mf_predict, recommend};

/// Training epochs when `--epochs` is not given.
pub const DEFAULT_EPOCHS: u64 = 8;
/// Embedding width of the model (the data's planted structure has rank [`DATA_RANK`]).
const RANK: usize = 8;
const DATA_RANK: usize = 4;
/// Held-out share of the ratings and the split's seed.
const TEST_FRACTION: f64 = 0.2;
const SPLIT_SEED: u64 = 7;
/// The cluster's test RMSE may differ from the reference's by this share of it.
const RMSE_TOLERANCE: f64 = 0.02;
/// Users whose recommendations are printed, and how many items each.
const SHOW_USERS: [u64; 3] = [0, 1, 2];
const TOP: usize = 5;

/// The synthetic ratings.
fn data_options() -> RatingsOptions {
    RatingsOptions {
        users: 2000,
        items: 400,
        ratings: 60_000,
        rank: DATA_RANK,
        noise: 0.1,
        data_seed: 42,
    }
}

/// The job the demo runs.
pub fn spec(epochs: u64) -> String {
    format!(
        r#"[job]
kind = "mf"
dataset = "ratings"
[model]
rank = {RANK}
user_column = "user"
item_column = "item"
[train]
epochs = {epochs}
batch_size = 2000
learning_rate = 0.05
l2 = 0.01
seed = 7
checkpoint_every = 10
"#
    )
}

fn table_of(rows: &[Rating]) -> Table {
    Table {
        features: vec!["user".into(), "item".into()],
        label: ratings_csv::LABEL.into(),
        rows: rows.len(),
        x: rows
            .iter()
            .flat_map(|&(u, i, _)| [u as f32, i as f32])
            .collect(),
        y: rows.iter().map(|r| r.2).collect(),
    }
}

/// The recommend demo's work on a ready cluster (the lifecycle is [`crate::demo::run`]'s).
pub async fn train_and_recommend(cluster: &mut LocalCluster, opts: &DemoOptions) -> Result<()> {
    let client = cluster.admin_client(ClientOptions::default()).await?;
    wait_all_up(&client, opts.nodes, Duration::from_secs(60)).await?;
    wait_stable(&client, Duration::from_secs(90)).await?;
    let result = run_job(cluster, &client, opts).await;
    client.close().await;
    result
}

async fn run_job(
    cluster: &mut LocalCluster,
    client: &ClusterClient,
    opts: &DemoOptions,
) -> Result<()> {
    // The CSV files (kept with --keep, for `tidepool predict`) and the same rows in memory.
    let data = data_options();
    let data_dir = cluster.root().join("ratings");
    let (_, test_csv, _, _) =
        ratings_csv::write_ratings(&data_dir, &data, TEST_FRACTION, SPLIT_SEED)?;
    let all = ratings::generate(&RatingsSpec {
        users: data.users,
        items: data.items,
        rank: data.rank,
        ratings: data.ratings,
        noise: data.noise,
        seed: data.data_seed,
    });
    let (train, test) = ratings::split(&all, TEST_FRACTION, SPLIT_SEED);
    drop(all);
    let rec = jobs_cli::import_table(client, &table_of(&train), ratings_csv::NAME).await?;
    println!(
        "\ngenerated {} ratings ({} users x {} items, planted rank {}, noise {}); \
         imported {} for training onto {} shards, {} held out",
        data.ratings,
        data.users,
        data.items,
        data.rank,
        data.noise,
        rec.rows,
        rec.shards,
        test.len()
    );

    let text = spec(opts.epochs);
    let id = jobs_cli::submit(client, &text).await?;
    let submitted = Instant::now();
    println!(
        "submitted {id}: matrix factorisation, rank {RANK}, {} epochs; the embeddings are \
         parameter tables on the shards, saved every 10 steps",
        opts.epochs
    );
    let (killed, coordinator) = follow(cluster, client, &id, opts.kill).await?;
    let doc = jobs_cli::result(client, &id).await?;
    let rollbacks = doc["rollbacks"].as_u64().unwrap_or(0);
    let train_rmse = doc["train_rmse"].as_f64().unwrap_or(f64::NAN);
    let steps = doc["steps"].as_u64().unwrap_or(0);
    if let Some(k) = &killed {
        if k.coordinator {
            println!(
                "  the coordinator moved to {} and resumed from its last checkpoint",
                coordinator.as_deref().unwrap_or("?")
            );
        }
        let what = if rollbacks > 0 {
            "the job rolled back to its last saved tables"
        } else {
            "the job went on without a rollback"
        };
        println!(
            "  {}'s shards moved to the nodes left; {what} (rollbacks: {rollbacks})",
            k.name
        );
    }
    println!(
        "  finished in {:.1?}: {steps} train steps, final train RMSE {train_rmse:.4}",
        submitted.elapsed()
    );

    // The model directory, as `tidepool job result ID --out DIR` writes it.
    let model_dir = cluster.root().join("ratings-model");
    let parts = jobs_cli::ClusterParts { client, id: &id };
    mf_dir::write(
        &model_dir,
        &doc,
        &id,
        Some(text.clone()),
        ratings_csv::LABEL,
        &parts,
    )
    .await?;

    // The reference: the same spec over the same per-shard rows, in one process.
    let spec = JobSpec::parse(&text)?;
    let mut by_shard = vec![Vec::new(); rec.shards as usize];
    for (r, &row) in train.iter().enumerate() {
        by_shard[shard_of_row(r as u64, rec.shards) as usize].push(row);
    }
    let (ref_u, ref_i, mu) = mf::reference_train(&spec, &by_shard);
    let ref_rmse = mf::rmse(&ref_u, &ref_i, RANK, mu, &test);
    let mean_rmse = mf::rmse(&[], &[], RANK, mu, &test);
    // The cluster's model, scored from its directory as `tidepool predict` does.
    let ours = mf_predict::run(&model_dir, &test_csv, None)?;
    let same = compare_tables(&model_dir, &ref_u, &ref_i, mu)?;
    let who = if killed.is_some() {
        format!("{} nodes, one killed mid-job", opts.nodes)
    } else {
        format!("{} nodes", opts.nodes)
    };
    println!("\ntest RMSE on {} held-out ratings:", ours.rows);
    println!("  {:<41}{:.4}", format!("tidepool ({who})"), ours.rmse);
    println!(
        "  {:<41}{ref_rmse:.4}",
        "single-process reference (same schedule)"
    );
    println!("  {:<41}{mean_rmse:.4}", "predicting the mean rating");
    match &same {
        Ok(()) => println!("  tables equal the reference's bit for bit: yes"),
        Err(why) => println!("  tables equal the reference's bit for bit: no ({why})"),
    }

    println!(
        "\ntop {TOP} items for {} users (as tidepool recommend --model DIR --user U --top {TOP}):",
        SHOW_USERS.len()
    );
    for user in SHOW_USERS {
        let recs = recommend::recommend(&model_dir, user, TOP)?;
        let items: Vec<String> = recs
            .iter()
            .map(|r| format!("{} ({:.2})", r.item, r.score))
            .collect();
        println!("  user {user}: {}", items.join(", "));
    }
    // The files are removed with the cluster's directory unless it is kept.
    if opts.keep {
        println!(
            "  model written to {} (try: tidepool recommend --model {} --user 0 --top 5, or \
             tidepool predict --model {} --data {} --label {})",
            model_dir.display(),
            model_dir.display(),
            model_dir.display(),
            test_csv.display(),
            ratings_csv::LABEL
        );
    }
    // NaN (a diverged model) is not within anything.
    let within = (ours.rmse - ref_rmse).abs() <= RMSE_TOLERANCE * ref_rmse;
    if !within {
        bail!(
            "test RMSE {:.4} is not within {}% of the reference's {ref_rmse:.4}",
            ours.rmse,
            RMSE_TOLERANCE * 100.0
        );
    }
    Ok(())
}

/// The node [`follow`] killed.
struct Killed {
    name: String,
    /// It was running the job's coordinator.
    coordinator: bool,
}

/// Polls job `id` every 10 ms to its end; with `kill`, a third of the way through kills -9 a
/// node owning parameter shards ([`victim`]). Returns the victim and the node running the
/// coordinator at the end.
async fn follow(
    cluster: &mut LocalCluster,
    client: &ClusterClient,
    id: &str,
    kill: bool,
) -> Result<(Option<Killed>, Option<String>)> {
    let mut killed = None;
    let mut tried = !kill;
    let deadline = Instant::now() + Duration::from_secs(300);
    let rec = loop {
        let rec = jobs_cli::status(client, id).await?;
        if rec.state.is_terminal() {
            break rec;
        }
        if !tried && rec.steps > 0 && rec.step * 3 >= rec.steps {
            tried = true;
            let coord = rec.coordinator.as_deref();
            match victim(cluster, client, coord).await? {
                Some((i, owned, shards)) => {
                    let name = cluster.nodes[i].name.clone();
                    cluster.kill(i).await?;
                    let coordinator = coord == Some(name.as_str());
                    println!(
                        "  step {}/{} train RMSE {:.4}: killed {name} (owner of {owned} of \
                         {shards} shards and their tables{}) with SIGKILL",
                        rec.step,
                        rec.steps,
                        rec.loss.unwrap_or(f64::NAN),
                        if coordinator {
                            ", running the coordinator"
                        } else {
                            ""
                        }
                    );
                    killed = Some(Killed { name, coordinator });
                }
                None => println!("  no node but n1 owns shards: nothing to kill"),
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
    Ok((killed, rec.coordinator))
}

/// The node to kill, never n1 (it may be the only voter): the running node owning the most
/// shards that does not run the job's coordinator (so what it takes down is tables, and the
/// job rolls back to the saved ones), else the coordinator's; with the shards it owns and the
/// cluster's. `None` when no other node owns any.
async fn victim(
    cluster: &mut LocalCluster,
    client: &ClusterClient,
    coordinator: Option<&str>,
) -> Result<Option<(usize, usize, usize)>> {
    let shards = client.shards().await?;
    let mut best: Option<(bool, usize, usize)> = None;
    for i in 0..cluster.nodes.len() {
        let name = cluster.nodes[i].name.clone();
        if name == "n1" || !cluster.running(i) {
            continue;
        }
        let owned = shards
            .iter()
            .filter(|s| s.owner.as_deref() == Some(name.as_str()))
            .count();
        // Best: not the coordinator, then the most shards.
        let key = (coordinator != Some(name.as_str()), owned, i);
        if owned > 0 && best.is_none_or(|(c, n, _)| (key.0, key.1) > (c, n)) {
            best = Some(key);
        }
    }
    Ok(best.map(|(_, n, i)| (i, n, shards.len())))
}

/// Whether the model directory's embeddings and `mu` equal the reference's bit for bit; the
/// error names the first difference.
fn compare_tables(
    dir: &Path,
    ref_u: &[f32],
    ref_i: &[f32],
    mu: f64,
) -> Result<std::result::Result<(), String>> {
    let mut model = MfModel::open(dir).with_context(|| format!("reading {}", dir.display()))?;
    if model.mf.mu.to_bits() != mu.to_bits() {
        return Ok(Err(format!("mu {} vs {mu}", model.mf.mu)));
    }
    let users = model.user_factors()?;
    let items = model.item_factors()?;
    for (what, got, want) in [("user", &users, ref_u), ("item", &items, ref_i)] {
        if got.len() != want.len() {
            return Ok(Err(format!(
                "{} {what} values vs {}",
                got.len(),
                want.len()
            )));
        }
        if let Some(n) = got
            .iter()
            .zip(want)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Ok(Err(format!(
                "{what} {} value {} is {} instead of {}",
                n / RANK,
                n % RANK,
                got[n],
                want[n]
            )));
        }
    }
    Ok(Ok(()))
}

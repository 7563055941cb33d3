//! `tidepool dataset ...` and `tidepool job ...`: argument definitions and output formatting;
//! the work is in [`crate::jobs_cli`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;

use tidepool_actors::jobs::model_dir::MF_KIND;
use tidepool_runtime::client::ClusterClient;

use crate::conn::{connect, Conn};
use crate::exit::CliError;
use crate::{import_watch, job_watch, jobs_cli, mf_dir, ratings_csv};

#[derive(Subcommand, Debug)]
pub enum DatasetCmd {
    /// Import a dataset, visible once complete. A URL (file://, s3://, gs://, az://; one file,
    /// a prefix, or a glob such as s3://bucket/events/*.parquet) is read by the cluster itself:
    /// every shard owner reads its splits in parallel, streamed; this command shows progress
    /// until the import ends. A plain path is a CSV read and uploaded by this command.
    Import {
        /// A URL the nodes can read, or a local CSV file.
        source: String,
        /// The dataset's name (unique in the cluster; [A-Za-z0-9_.-]{1,64}).
        #[arg(long)]
        name: String,
        /// The label column (not for libsvm, whose lines start with their label).
        #[arg(long, default_value = "")]
        label: String,
        /// parquet | csv | arrow | libsvm (default: from the URL's extension: .parquet/.pq,
        /// .csv, .arrow/.feather/.ipc, .libsvm/.svm/.svmlight).
        #[arg(long)]
        format: Option<String>,
        /// libsvm: feature indices start at 0 (default: at 1, libsvm's convention).
        #[arg(long)]
        zero_based: bool,
        /// Feature columns, comma-separated (default: every column but the label; columns of
        /// types that do not import are left out).
        #[arg(long)]
        features: Option<String>,
        /// What a null (empty CSV cell) does: refuse (the import fails, naming file, row group
        /// and row), drop_row, or fill_mean (the column's mean over the whole dataset).
        #[arg(long, default_value = "refuse")]
        nulls: String,
        /// String columns with at most this many distinct values become one-hot columns; above
        /// it they are hashed (0: always hash).
        #[arg(long, default_value_t = tidepool_actors::imports::DEFAULT_MAX_CATEGORIES)]
        max_categories: u32,
        /// Columns one hashed string column becomes.
        #[arg(long, default_value_t = tidepool_actors::imports::DEFAULT_HASH_BUCKETS)]
        hash_buckets: u32,
        /// Target split size in source bytes (Parquet splits are whole row groups).
        #[arg(long, default_value_t = tidepool_actors::imports::DEFAULT_SPLIT_BYTES)]
        split_bytes: u64,
        /// Start the import and print its id; do not wait for it.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Where an import from storage stands: state, splits and bytes done, rows, and its error
    /// if it failed. Give the import id, or --name for a dataset's latest import; neither lists
    /// every import (`--json`: `{"imports": [...]}`).
    ImportStatus {
        /// The import id (printed by `dataset import`).
        id: Option<String>,
        /// The dataset whose latest import to show.
        #[arg(long, conflicts_with = "id")]
        name: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register a seeded synthetic dataset, generated on each shard's owner (large runs).
    Synth {
        /// The dataset's name (unique in the cluster).
        #[arg(long)]
        name: String,
        /// Rows to generate.
        #[arg(long, default_value_t = 2_000_000)]
        rows: u64,
        /// Feature columns.
        #[arg(long, default_value_t = 64)]
        features: usize,
        /// linear | logistic
        #[arg(long, default_value = "logistic")]
        kind: String,
        /// Generator seed (same seed, same rows).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// List datasets.
    List(Conn),
    /// Describe a dataset: source, label and features, rows, values and bytes, partitions, and
    /// where they are served now (per node). An unknown name exits with the not-found code.
    Describe {
        /// The dataset to describe.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a dataset: its record and its stored partitions (admin role). Refused while a
    /// pending or running job uses it; an unknown name exits with the not-found code.
    Delete {
        /// The dataset to delete.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a built-in dataset (breast_cancer, digits, ratings) as DIR/train.csv and
    /// DIR/test.csv. `ratings` is synthetic (user,item,rating; label `rating`: the data of an
    /// `mf` job): a planted low-rank structure plus noise, shaped by --users, --items,
    /// --ratings, --rank, --noise and --data-seed.
    Builtin {
        /// breast_cancer, digits or ratings.
        name: String,
        /// Directory to write train.csv and test.csv into.
        #[arg(long)]
        out: PathBuf,
        /// Share of the rows that go to test.csv.
        #[arg(long, default_value_t = 0.2)]
        test_fraction: f64,
        /// Seed of the train/test shuffle.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// (ratings) User ids 0..N [default: 2000].
        #[arg(long)]
        users: Option<u64>,
        /// (ratings) Item ids 0..N [default: 500].
        #[arg(long)]
        items: Option<u64>,
        /// (ratings) Ratings generated, before the split [default: 100000].
        #[arg(long)]
        ratings: Option<usize>,
        /// (ratings) Rank of the planted structure [default: 8].
        #[arg(long)]
        rank: Option<usize>,
        /// (ratings) Standard deviation of the noise on each rating [default: 0.1].
        #[arg(long)]
        noise: Option<f64>,
        /// (ratings) Seed of the generated ratings (--seed seeds the split) [default: 42].
        #[arg(long)]
        data_seed: Option<u64>,
        /// Print `{"train": PATH, "test": PATH, "train_rows": N, "test_rows": N}`.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Submit a job spec (TOML); prints its id.
    Submit {
        /// The job spec file (TOML).
        spec: PathBuf,
        /// Wait until it ends, as `job watch` does (progress bar; exit code of its final state).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow a job (submitted from anywhere) until it ends: progress bar with step, loss and
    /// state on stderr, then its final status. Exits 0 if it succeeded, 6 if it failed, 7 if it
    /// was cancelled.
    Watch {
        /// The job id.
        id: String,
        /// Give up after this many seconds (default: wait for as long as it runs).
        #[arg(long)]
        timeout: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// A job's state, step, loss.
    Status {
        /// The job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Every job.
    List(Conn),
    /// Stop a job.
    Cancel {
        /// The job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// A finished job's result (the model for training jobs).
    Result {
        /// The job id.
        id: String,
        /// Write it here instead of stdout (`--json` then prints `{"id", "out"}`): a path ending
        /// in `.json` gets the result document as stored; any other path is a model directory
        /// (`manifest.json` and `model.safetensors`; training, k-means and mf jobs: an mf
        /// model is streamed from the cluster's tables shard by shard).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Follows job `id` to its end (`job watch`, `job submit --wait`): progress bar unless `json`,
/// then the final status (line or JSON document). A job that did not succeed is an error with
/// its own exit code ([`CliError::JobEnded`]).
async fn watch(
    client: &ClusterClient,
    id: &str,
    json: bool,
    timeout: Option<Duration>,
) -> Result<()> {
    let rec = job_watch::follow(client, id, !json, timeout).await?;
    if json {
        print_json(&jobs_cli::status_json(&rec))?;
    } else {
        println!("{}", jobs_cli::status_line(&rec));
    }
    if jobs_cli::succeeded(&rec) {
        return Ok(());
    }
    Err(CliError::JobEnded {
        id: id.to_string(),
        state: rec.state,
    }
    .into())
}

/// The label column of dataset `name`, if the cluster still has it.
async fn dataset_label(client: &ClusterClient, name: &str) -> Option<String> {
    let datasets = jobs_cli::list_datasets(client).await.ok()?;
    datasets
        .into_iter()
        .find(|d| d.name == name)
        .map(|d| d.label)
        .filter(|l| !l.is_empty())
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// Runs a `dataset` command.
pub async fn dataset(cmd: DatasetCmd) -> Result<()> {
    match cmd {
        DatasetCmd::Import {
            source,
            name,
            label,
            format,
            features,
            nulls,
            max_categories,
            hash_buckets,
            split_bytes,
            zero_based,
            no_wait,
            conn,
        } if source.contains("://") => {
            let parse = |what: &str, v: &str| -> Result<serde_json::Value> {
                let v = serde_json::Value::String(v.to_string());
                serde_json::from_value(v.clone())
                    .map(|_: serde_json::Value| v)
                    .with_context(|| format!("--{what}"))
            };
            let arg = serde_json::json!({
                "name": name,
                "url": source,
                "label": label,
                "format": format.as_deref().map(|f| parse("format", f)).transpose()?,
                "features": import_watch::feature_list(features.as_deref())?,
                "nulls": parse("nulls", &nulls)?,
                "max_categories": max_categories,
                "hash_buckets": hash_buckets,
                "split_bytes": split_bytes,
                "zero_based": zero_based,
            });
            let arg: tidepool_actors::imports::ImportArg = serde_json::from_value(arg).context(
                "--format must be parquet, csv, arrow or libsvm; --nulls refuse, drop_row or fill_mean",
            )?;
            let client = connect(&conn).await?;
            let started = import_watch::start(&client, &arg).await?;
            let done = if no_wait {
                started
            } else {
                import_watch::follow(&client, &started.id, !conn.json, None).await?
            };
            if conn.json {
                return print_json(&serde_json::to_value(&done)?);
            }
            println!("{}", import_watch::line(&done));
            Ok(())
        }
        DatasetCmd::ImportStatus {
            id: None,
            name: None,
            conn,
        } => {
            let client = connect(&conn).await?;
            let all = import_watch::list(&client).await?;
            if conn.json {
                return print_json(&serde_json::json!({ "imports": all }));
            }
            for s in &all {
                println!("{}", import_watch::line(s));
            }
            Ok(())
        }
        DatasetCmd::ImportStatus { id, name, conn } => {
            let client = connect(&conn).await?;
            let s = import_watch::status(&client, id.as_deref(), name.as_deref()).await?;
            if conn.json {
                return print_json(&serde_json::to_value(&s)?);
            }
            println!("{}", import_watch::line(&s));
            Ok(())
        }
        DatasetCmd::Import {
            source,
            name,
            label,
            format,
            features,
            conn,
            ..
        } => {
            if label.is_empty() {
                anyhow::bail!("--label names the label column of a CSV");
            }
            if format.as_deref().is_some_and(|f| f != "csv") || features.is_some() {
                anyhow::bail!(
                    "a local file is read as CSV with every column but the label; for --format \
                     or --features give a URL the nodes can read (file://, s3://, ...)"
                );
            }
            let file = import_watch::local_csv(&source)?;
            let client = connect(&conn).await?;
            let rec = jobs_cli::import_csv(&client, &file, &name, &label).await?;
            if conn.json {
                print_json(&serde_json::to_value(&rec)?)?;
            } else {
                println!(
                    "imported {} rows x {} features as {:?} onto {} shards",
                    rec.rows,
                    rec.features.len(),
                    rec.name,
                    rec.shards
                );
            }
            Ok(())
        }
        DatasetCmd::Synth {
            name,
            rows,
            features,
            kind,
            seed,
            conn,
        } => {
            let client = connect(&conn).await?;
            let rec =
                jobs_cli::create_synthetic(&client, &name, rows, features, &kind, seed).await?;
            if conn.json {
                print_json(&serde_json::to_value(&rec)?)?;
            } else {
                println!("registered synthetic {kind} dataset {name:?}: {rows} x {features}");
            }
            Ok(())
        }
        DatasetCmd::List(conn) => {
            let client = connect(&conn).await?;
            let list = jobs_cli::list_datasets(&client).await?;
            if conn.json {
                return print_json(&serde_json::json!({ "datasets": list }));
            }
            for d in list {
                let sparse = if d.sparse().is_some() {
                    " (sparse)"
                } else {
                    ""
                };
                println!(
                    "{:<20} {:>10} rows  {:>5} features{sparse}  label {}",
                    d.name,
                    d.rows,
                    d.feature_count(),
                    d.label
                );
            }
            Ok(())
        }
        DatasetCmd::Describe { name, conn } => {
            let client = connect(&conn).await?;
            let Some(d) = jobs_cli::describe_dataset(&client, &name).await? else {
                return Err(CliError::NotFound(format!("no dataset {name:?}")).into());
            };
            if conn.json {
                return print_json(&serde_json::to_value(&d)?);
            }
            println!("dataset    {}", d.name);
            match (&d.import, &d.generator) {
                (Some(id), _) if d.url.is_some() => println!(
                    "source     {} (import {id}, checksum {})",
                    d.url.as_deref().unwrap_or(""),
                    d.checksum.as_deref().unwrap_or("-")
                ),
                (Some(id), _) => println!("source     imported (import {id})"),
                (_, Some(g)) => println!("source     synthetic ({g})"),
                _ => println!("source     {}", d.source),
            }
            println!("label      {}", d.label);
            match d.nnz {
                Some(nnz) => println!(
                    "features   {} sparse columns, {nnz} stored entries ({:.1} a row)",
                    d.columns,
                    nnz as f64 / d.rows.max(1) as f64
                ),
                None => println!(
                    "features   {} ({})",
                    d.features.len(),
                    d.features.join(", ")
                ),
            }
            println!("rows       {}", d.rows);
            println!("values     {} ({} bytes stored)", d.values, d.bytes);
            println!("shards     {} ({} partitions)", d.shards, d.partitions);
            for (node, p) in &d.nodes {
                println!(
                    "  {node:<16} {:>5} shards {:>6} partitions",
                    p.shards, p.partitions
                );
            }
            Ok(())
        }
        DatasetCmd::Delete { name, conn } => {
            let client = connect(&conn).await?;
            let existed = jobs_cli::delete_dataset(&client, &name).await?;
            if conn.json {
                print_json(&serde_json::json!({ "name": name, "deleted": existed }))?;
                if !existed {
                    return Err(CliError::NotFound(format!("no dataset {name:?}")).into());
                }
                return Ok(());
            }
            if existed {
                println!("deleted dataset {name:?}");
                Ok(())
            } else {
                Err(CliError::NotFound(format!("no dataset {name:?}")).into())
            }
        }
        DatasetCmd::Builtin {
            name,
            out,
            test_fraction,
            seed,
            users,
            items,
            ratings,
            rank,
            noise,
            data_seed,
            json,
        } => {
            if name == ratings_csv::NAME {
                let d = ratings_csv::RatingsOptions::default();
                let opts = ratings_csv::RatingsOptions {
                    users: users.unwrap_or(d.users),
                    items: items.unwrap_or(d.items),
                    ratings: ratings.unwrap_or(d.ratings),
                    rank: rank.unwrap_or(d.rank),
                    noise: noise.unwrap_or(d.noise),
                    data_seed: data_seed.unwrap_or(d.data_seed),
                };
                return ratings_csv::builtin_main(&out, &opts, test_fraction, seed, json);
            }
            let ratings_only = users.is_some()
                || items.is_some()
                || ratings.is_some()
                || rank.is_some()
                || noise.is_some()
                || data_seed.is_some();
            if ratings_only {
                anyhow::bail!(
                    "--users, --items, --ratings, --rank, --noise and --data-seed apply only to \
                     the {} dataset",
                    ratings_csv::NAME
                );
            }
            crate::predict::builtin_main(&name, &out, test_fraction, seed, json)
        }
    }
}

/// Runs a `job` command.
pub async fn job(cmd: JobCmd) -> Result<()> {
    match cmd {
        JobCmd::Submit {
            spec,
            wait,
            timeout,
            conn,
        } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("reading {}", spec.display()))?;
            let client = connect(&conn).await?;
            let id = jobs_cli::submit(&client, &text).await?;
            if !wait {
                if conn.json {
                    return print_json(&serde_json::json!({ "id": id }));
                }
                println!("{id}");
                return Ok(());
            }
            watch(&client, &id, conn.json, Some(Duration::from_secs(timeout))).await
        }
        JobCmd::Watch { id, timeout, conn } => {
            let client = connect(&conn).await?;
            watch(&client, &id, conn.json, timeout.map(Duration::from_secs)).await
        }
        JobCmd::Status { id, conn } => {
            let client = connect(&conn).await?;
            let rec = jobs_cli::status(&client, &id).await?;
            if conn.json {
                return print_json(&jobs_cli::status_json(&rec));
            }
            println!("{}", jobs_cli::status_line(&rec));
            Ok(())
        }
        JobCmd::List(conn) => {
            let client = connect(&conn).await?;
            let jobs = jobs_cli::list(&client).await?;
            if conn.json {
                return print_json(&serde_json::json!({ "jobs": jobs }));
            }
            for j in &jobs {
                println!("{}", jobs_cli::status_line(j));
            }
            Ok(())
        }
        JobCmd::Cancel { id, conn } => {
            let client = connect(&conn).await?;
            jobs_cli::cancel(&client, &id).await?;
            if conn.json {
                return print_json(&serde_json::json!({ "id": id, "state": "cancelled" }));
            }
            println!("cancelled {id}");
            Ok(())
        }
        JobCmd::Result { id, out, conn } => {
            let client = connect(&conn).await?;
            let bytes = jobs_cli::result_bytes(&client, &id).await?;
            match out {
                Some(dir) if crate::model_dir::is_dir_path(&dir) => {
                    let doc: serde_json::Value = serde_json::from_slice(&bytes)?;
                    drop(bytes);
                    let record = jobs_cli::status(&client, &id).await.ok();
                    let tensors = if doc.get("kind").and_then(|k| k.as_str()) == Some(MF_KIND) {
                        // The model is in the cluster's tables: streamed shard by shard.
                        let label = match &record {
                            Some(r) => dataset_label(&client, &r.dataset).await,
                            None => None,
                        };
                        let label = label.unwrap_or_else(|| mf_dir::DEFAULT_LABEL.to_string());
                        let src = jobs_cli::ClusterParts {
                            client: &client,
                            id: &id,
                        };
                        let spec = record.map(|r| r.spec);
                        mf_dir::write(&dir, &doc, &id, spec, &label, &src).await?
                    } else {
                        crate::model_dir::write(&dir, &doc, &id, record.map(|r| r.spec))?
                    };
                    if conn.json {
                        print_json(
                            &serde_json::json!({ "id": id, "out": dir, "tensors": tensors }),
                        )?;
                    } else {
                        println!(
                            "model of {id} written to {} ({}, {})",
                            dir.display(),
                            tidepool_actors::jobs::model_dir::MANIFEST,
                            tidepool_actors::jobs::model_dir::TENSORS
                        );
                    }
                }
                Some(path) => {
                    // The stored document as is (assembled from chunks): byte-identical.
                    std::fs::write(&path, &bytes)
                        .with_context(|| format!("writing {}", path.display()))?;
                    if conn.json {
                        print_json(&serde_json::json!({ "id": id, "out": path }))?;
                    } else {
                        println!("result of {id} written to {}", path.display());
                    }
                }
                None => {
                    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
            Ok(())
        }
    }
}

//! The `tidepool` binary: argument parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tidepool::conn::{connect, Conn};
use tidepool::exit::Exit;
use tidepool::jobs_cmd::{self, DatasetCmd, JobCmd};
use tidepool::members_cmd;
use tidepool::{cli_docs, daemon, demo, demo_recommend, kv_demo};
use tidepool_runtime::certs::{self, Role, Subject, Validity};

#[derive(Parser, Debug)]
#[command(
    name = "tidepool",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TIDEPOOL_REVISION"), ")"),
    about = "Elastic cluster runtime for distributed machine learning",
    after_help = Exit::table()
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a throwaway 3-node cluster, train logistic regression on breast cancer across a
    /// kill -9, compare with smartcore, stop. `--recommend` trains matrix factorisation on the
    /// parameter server instead; `--kv` runs the exactly-once key-value demo.
    Demo {
        /// Nodes to start.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Shards in the cluster.
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// Training epochs [default: 20; with --recommend 8].
        #[arg(long)]
        epochs: Option<u64>,
        /// Run the recommendation demo instead: matrix factorisation of synthetic ratings,
        /// compared with the single-process reference, then top items for a few users.
        #[arg(long, conflicts_with = "kv")]
        recommend: bool,
        /// Run the key-value exactly-once demo instead.
        #[arg(long)]
        kv: bool,
        /// (--kv) Increments to run.
        #[arg(long, default_value_t = 100_000)]
        ops: u64,
        /// (--kv) Keys.
        #[arg(long, default_value_t = 1000)]
        keys: u64,
        /// (--kv) Concurrent senders.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Keep the temp dir (logs, configs, certificates) afterwards.
        #[arg(long)]
        keep: bool,
        /// Do not kill a node part-way through.
        #[arg(long)]
        no_kill: bool,
        /// (--kv) Control-plane voters (the first N nodes).
        #[arg(long, default_value_t = 1)]
        voters: usize,
    },
    /// Run a node.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Make a cluster CA and issue node and client certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Inspect the cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Benchmarks on a real local cluster.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Import and list datasets; write the built-in ones as CSV.
    #[command(subcommand)]
    Dataset(DatasetCmd),
    /// Submit, watch, cancel jobs and fetch their results.
    #[command(subcommand)]
    Job(JobCmd),
    /// Chaos runs: faults against a real local cluster, checked for lost or doubled data.
    #[command(subcommand)]
    Chaos(ChaosCmd),
    /// Node configuration files.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Run a trained model (from `job result --out`) on a CSV: predictions, accuracy or RMSE.
    /// A matrix-factorisation model directory reads its user and item id columns by name and
    /// reports the RMSE (`{"rows", "rmse"}`); ids beyond the model predict the mean rating.
    Predict {
        /// The model file or directory (`job result --out`).
        #[arg(long)]
        model: PathBuf,
        /// The CSV to predict on (header row; feature columns matched by name).
        #[arg(long)]
        data: PathBuf,
        /// Label column (default: the model's label, when the CSV has it; mf models need it).
        #[arg(long)]
        label: Option<String>,
        /// Print one JSON document (`{"rows", "accuracy"}` or `{"rows", "rmse"}`).
        #[arg(long)]
        json: bool,
    },
    /// The items a matrix-factorisation model (`job result ID --out DIR` of an mf job) scores
    /// highest for a user, leaving out those the user rated in training: score `mu + user .
    /// item`, ties to the smaller item id. Prints `ITEM SCORE` lines. A user beyond the model
    /// exits with the not-found code.
    Recommend {
        /// The model directory (`job result ID --out DIR` of an mf job).
        #[arg(long)]
        model: PathBuf,
        /// The user id.
        #[arg(long)]
        user: u64,
        /// How many items to print.
        #[arg(
            long,
            default_value_t = 10,
            value_parser = clap::value_parser!(u64).range(1..=tidepool_actors::jobs::mf::MAX_ID)
        )]
        top: u64,
        /// Print one JSON document `{"user": ID, "items": [{"item": I, "score": S}, ...]}`.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, or write tidepool.1 and one page per subcommand.
    Man {
        /// Write the pages into this directory instead (created if missing).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ChaosCmd {
    /// Run a scenario (config/chaos/*.toml) with one seed, or a directory of them (--matrix).
    ///
    /// Exit codes: 0 every checker passed; 1 a checker found a violation; 2 a setup problem
    /// (nothing was run: the message says what is missing).
    ///
    /// Requirements: network faults (netem, partitions without --netns), kills during a
    /// checkpoint and storage faults need a build with `--features fault-injection`; clock-skew
    /// scenarios need libfaketime (Debian: `faketime`); `--netns` needs root, iproute2 (`ip`) and
    /// nftables (`nft`); scenarios marked `needs_netns` run only with `--netns`.
    Run {
        /// The scenario file.
        #[arg(required_unless_present = "matrix")]
        scenario: Option<PathBuf>,
        /// Run every scenario in this directory instead.
        #[arg(long, conflicts_with = "scenario")]
        matrix: Option<PathBuf>,
        /// Replay exactly this seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Seeds 1..=N per scenario (default: each scenario's own `seeds`).
        #[arg(long, conflicts_with = "seed")]
        seeds: Option<u64>,
        /// Write the JSON report here (chaos keeps `--report`: the report is a file by design).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Keep every run's temp dir (logs, ownership logs), not only failing ones.
        #[arg(long)]
        keep: bool,
        /// Deliberately broken nodes that acknowledge ops without logging them (to see the
        /// checkers catch it; needs a fault-injection build).
        #[arg(long, hide = true)]
        unsafe_skip_durability: bool,
        /// Run every node in its own network namespace (root; needs iproute2 and nftables):
        /// partitions become nftables DROP rules, and `link_down` faults run.
        #[arg(long)]
        netns: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Synchronous-SGD samples/s on 1..N local nodes vs a plain single-threaded nalgebra loop;
    /// scaling efficiency; synchronous vs local SGD time to a target loss.
    Train {
        /// Node counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        nodes: Vec<usize>,
        /// Shards in each cluster.
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// Rows of the synthetic dataset.
        #[arg(long, default_value_t = 200_000)]
        rows: u64,
        /// Features of the synthetic dataset.
        #[arg(long, default_value_t = 64)]
        features: usize,
        /// Global minibatch size.
        #[arg(long, default_value_t = 16_384)]
        batch: u64,
        /// SGD steps per run.
        #[arg(long, default_value_t = 100)]
        steps: u64,
        /// Worker threads per node.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Also run local SGD and compare time to a target loss.
        #[arg(long)]
        local: bool,
        /// Write the measurements as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Import throughput from storage (`dataset import URL`) on 1..N local nodes: rows/s, source
    /// MB/s, each node's peak RSS. The dataset is deleted after each run.
    Import(tidepool::bench_import::ImportBenchOptions),
    /// k-means on a local cluster over a dataset imported from URL: seconds from submit to
    /// result, inertia and iterations, one job per seed.
    Kmeans(tidepool::bench_kmeans::KMeansBenchOptions),
    /// The training step's math on one core (a full pass of the minibatch kernel for linear,
    /// logistic and softmax) against a streaming read of the same rows: rows/s and the fraction
    /// of the memory-bandwidth limit.
    Math(tidepool::bench_math::MathBenchOptions),
    /// Matrix factorisation (`mf` jobs) on 1..N local nodes over ratings CSVs: time and test
    /// RMSE per epoch count, time to a target RMSE, updates/s, bytes per step, table bytes and
    /// RSS per node; `--scale`: one large model's tables and RSS per node.
    Mf(tidepool::bench_mf::MfBenchOptions),
    /// Failover time after SIGKILL (or SIGSTOP) of a node, handoff pause, shards moved on rejoin.
    Failover {
        /// Kills (or pauses) to measure.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Nodes in the cluster.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Shards in the cluster.
        #[arg(long, default_value_t = 64)]
        shards: u32,
        /// SIGSTOP the node past its lease instead of SIGKILL.
        #[arg(long)]
        pause: bool,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Validate a node config (with `TIDEPOOL_*` overrides) and everything it points to
    /// (certificates, data key, data dir) without starting anything. Exit 0 if valid, 64 if
    /// not, naming the key and why.
    Check {
        /// The config file.
        file: PathBuf,
        /// Print `{"file", "valid", "node", "voters", "shards"}` (or `{"file", "valid": false,
        /// "error"}`, still exiting 64).
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration: defaults, then FILE, then `TIDEPOOL_*__*`
    /// environment variables, validated (the paths it names are not checked; `config check`
    /// does that). Exit 64 naming the key if invalid.
    Show {
        /// The config file (none: defaults and environment only).
        file: Option<PathBuf>,
        /// Print `{"valid": true, "config": {...}}` (or `{"valid": false, "key", "reason"}`,
        /// still exiting 64) instead of TOML.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Run the daemon until SIGTERM/SIGINT.
    Run {
        /// The node's config file (`TIDEPOOL_*` environment variables override it).
        #[arg(long, default_value = "config/node.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Create a cluster CA (ca.pem, ca.key) and a data key file (data.key) in DIR.
    Init {
        /// Directory to create the CA and data key in.
        #[arg(long)]
        out: PathBuf,
        /// Print `{"dir": DIR}`.
        #[arg(long)]
        json: bool,
    },
    /// Add a fresh key to the CA dir's data key file (step 1 of a rotation; `current` is
    /// unchanged). Copy the file to every node afterwards.
    RotateDataKey {
        /// The CA directory (holds data.key).
        #[arg(long)]
        ca: PathBuf,
        /// Print `{"file": PATH, "key": ID}`.
        #[arg(long)]
        json: bool,
    },
    /// Issue a node certificate (--node NAME; the node dir also gets the CA dir's data.key) or a
    /// client certificate (--client NAME --role ROLE).
    Issue {
        /// The CA directory (`certs init --out`).
        #[arg(long)]
        ca: PathBuf,
        /// Issue a node certificate for this node name.
        #[arg(long, conflicts_with_all = ["client", "role"], required_unless_present = "client")]
        node: Option<String>,
        /// Issue a client certificate for this name.
        #[arg(long, requires = "role")]
        client: Option<String>,
        /// The client certificate's role.
        #[arg(long, value_enum)]
        role: Option<ClientRole>,
        /// Directory to write the certificate and key into.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Print `{"cert": PATH}`.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate (admin role, through the cluster): its handshakes are refused and
    /// its live connections closed within seconds, on every node.
    Revoke(members_cmd::RevokeArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ClientRole {
    Admin,
    Reader,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Leader, term, members with their state and reachability, shards per node.
    Status(Conn),
    /// The shard map: owner and epoch of every shard.
    Shards(Conn),
    /// Move every shard off NODE (admin role); afterwards it can stop with nothing lost.
    Drain {
        /// The node to drain.
        node: String,
        #[command(flatten)]
        conn: Conn,
        /// Wait until the node owns no shard.
        #[arg(long)]
        wait: bool,
    },
    /// Let a draining NODE take shards again (admin role).
    Undrain {
        /// The node to undrain.
        node: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change the control-plane voters (admin role; Raft joint consensus).
    #[command(subcommand)]
    Voters(members_cmd::VotersCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Config is validated before logging, sockets or threads exist.
    if let Cmd::Node(NodeCmd::Run { config }) = &cli.cmd {
        daemon::restrict_umask();
        return match daemon::load_config(config) {
            Ok(cfg) => {
                daemon::tune_allocator();
                daemon::init_node_logging(
                    matches!(cli.log_format, LogFormat::Json),
                    &cfg.node.name,
                );
                exit(runtime().and_then(|rt| rt.block_on(daemon::run(cfg))))
            }
            Err(e) => {
                eprintln!("tidepool: invalid configuration: {e}");
                ExitCode::from(daemon::EXIT_CONFIG as u8)
            }
        };
    }
    default_sigpipe();
    daemon::init_logging(matches!(cli.log_format, LogFormat::Json));
    exit(runtime().and_then(|rt| rt.block_on(dispatch(cli.cmd)).map(|()| 0)))
}

/// Client commands end quietly when their output pipe closes (`tidepool cluster shards | head
/// -1`), like other Unix tools, instead of panicking on the failed write. Rust ignores SIGPIPE
/// by default; the daemon keeps that (a peer closing a socket must not kill it).
fn default_sigpipe() {
    #[cfg(unix)]
    #[allow(unsafe_code)]
    // SAFETY: restores the default disposition of one signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn exit(r: Result<i32>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("tidepool: {e:#}");
            ExitCode::from(Exit::of(&e).code())
        }
    }
}

async fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Demo {
            nodes,
            shards,
            epochs,
            recommend,
            kv,
            ops,
            keys,
            concurrency,
            keep,
            no_kill,
            voters,
        } => {
            if kv {
                return kv_demo::run(kv_demo::DemoOptions {
                    nodes,
                    shards,
                    ops,
                    keys,
                    concurrency,
                    keep,
                    kill: !no_kill,
                    voters,
                })
                .await;
            }
            let epochs = epochs.unwrap_or(if recommend {
                demo_recommend::DEFAULT_EPOCHS
            } else {
                20
            });
            demo::run(demo::DemoOptions {
                nodes,
                shards,
                epochs,
                keep,
                kill: !no_kill,
                recommend,
            })
            .await
        }
        Cmd::Node(NodeCmd::Run { .. }) => unreachable!("handled in main"),
        Cmd::Completions { shell } => {
            cli_docs::completions(Cli::command(), shell, &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { out } => {
            let pages = cli_docs::man(Cli::command(), out.as_deref(), &mut std::io::stdout())?;
            for page in pages {
                println!("{}", page.display());
            }
            Ok(())
        }
        Cmd::Config(ConfigCmd::Check { file, json }) => match daemon::load_config(&file) {
            Ok(cfg) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"file": file, "valid": true, "node": cfg.node.name,
                            "voters": cfg.cluster.voters.len(), "shards": cfg.cluster.shards})
                    );
                    return Ok(());
                }
                println!(
                    "{}: valid (node {}, {} voter(s), {} shards)",
                    file.display(),
                    cfg.node.name,
                    cfg.cluster.voters.len(),
                    cfg.cluster.shards
                );
                Ok(())
            }
            Err(e) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"file": file, "valid": false, "error": e.to_string()})
                    );
                }
                eprintln!("tidepool: invalid configuration: {e}");
                std::process::exit(daemon::EXIT_CONFIG);
            }
        },
        Cmd::Config(ConfigCmd::Show { file, json }) => {
            match tidepool_runtime::config::NodeConfig::load(file.as_deref()) {
                Ok(cfg) if json => {
                    println!("{}", serde_json::json!({"valid": true, "config": cfg}));
                    Ok(())
                }
                Ok(cfg) => {
                    print!("{}", toml::to_string_pretty(&cfg)?);
                    Ok(())
                }
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"valid": false, "key": e.key, "reason": e.reason})
                        );
                    }
                    eprintln!("tidepool: invalid configuration: {e}");
                    std::process::exit(daemon::EXIT_CONFIG);
                }
            }
        }
        Cmd::Certs(CertsCmd::Init { out, json }) => {
            certs::init_ca(&out)?;
            if json {
                println!("{}", serde_json::json!({ "dir": out }));
            } else {
                println!("cluster CA and data key written to {}", out.display());
            }
            Ok(())
        }
        Cmd::Certs(CertsCmd::RotateDataKey { ca, json }) => {
            let id = certs::add_data_key(&ca)?;
            let file = ca.join(certs::DATA_KEY_FILE);
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "file": file, "key": id.to_string() })
                );
                return Ok(());
            }
            println!(
                "data key {id} added to {}; copy it to every node and restart them one by one, \
                 then set `current = {id}` in it, copy and restart again",
                file.display()
            );
            Ok(())
        }
        Cmd::Certs(CertsCmd::Issue {
            ca,
            node,
            client,
            role,
            out,
            days,
            json,
        }) => {
            let subject = match (node, client, role) {
                (Some(n), None, None) => Subject::Node(n),
                (None, Some(c), Some(r)) => Subject::Client {
                    name: c,
                    role: match r {
                        ClientRole::Admin => Role::Admin,
                        ClientRole::Reader => Role::Reader,
                    },
                },
                _ => bail!("give either --node NAME, or --client NAME --role admin|reader"),
            };
            let path = certs::issue(&ca, &subject, &out, Validity::days_from_now(days))?;
            if json {
                println!("{}", serde_json::json!({ "cert": path }));
            } else {
                println!("certificate written to {}", path.display());
            }
            Ok(())
        }
        Cmd::Bench(BenchCmd::Train {
            nodes,
            shards,
            rows,
            features,
            batch,
            steps,
            workers,
            local,
            out,
        }) => {
            tidepool::bench_train::run(tidepool::bench_train::TrainBenchOptions {
                nodes,
                shards,
                rows,
                features,
                batch,
                steps,
                workers,
                local,
                out,
            })
            .await
        }
        Cmd::Bench(BenchCmd::Import(o)) => tidepool::bench_import::run(o).await,
        Cmd::Bench(BenchCmd::Kmeans(o)) => tidepool::bench_kmeans::run(o).await,
        Cmd::Bench(BenchCmd::Math(o)) => tidepool::bench_math::run(o),
        Cmd::Bench(BenchCmd::Mf(o)) => tidepool::bench_mf::run(o).await,
        Cmd::Bench(BenchCmd::Failover {
            runs,
            nodes,
            shards,
            pause,
            out,
        }) => {
            let fault = if pause {
                tidepool::bench::Fault::Pause
            } else {
                tidepool::bench::Fault::Kill
            };
            tidepool::bench::failover(tidepool::bench::FailoverOptions {
                runs,
                nodes,
                shards,
                fault,
                out,
            })
            .await
        }
        Cmd::Chaos(ChaosCmd::Run {
            scenario,
            matrix,
            seed,
            seeds,
            report,
            keep,
            unsafe_skip_durability,
            netns,
        }) => {
            let (path, is_matrix) = match (scenario, matrix) {
                (_, Some(dir)) => (dir, true),
                (Some(file), None) => (file, false),
                (None, None) => bail!("give a scenario file or --matrix DIR"),
            };
            let code = tidepool::chaos::main(
                &path,
                is_matrix,
                seed,
                seeds,
                report,
                tidepool::chaos::RunOptions {
                    seed: 0,
                    keep,
                    unsafe_skip_durability,
                    netns,
                },
            )
            .await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Cmd::Dataset(cmd) => jobs_cmd::dataset(cmd).await,
        Cmd::Job(cmd) => jobs_cmd::job(cmd).await,
        Cmd::Predict {
            model,
            data,
            label,
            json,
        } => tidepool::predict::predict_main(&model, &data, label.as_deref(), json),
        Cmd::Recommend {
            model,
            user,
            top,
            json,
        } => tidepool::recommend::recommend_main(
            &model,
            user,
            usize::try_from(top).unwrap_or(usize::MAX),
            json,
        ),
        Cmd::Cluster(ClusterCmd::Status(c)) => cluster_status(c).await,
        Cmd::Cluster(ClusterCmd::Shards(c)) => cluster_shards(c).await,
        Cmd::Cluster(ClusterCmd::Drain { node, conn, wait }) => {
            cluster_drain(node, conn, wait).await
        }
        Cmd::Cluster(ClusterCmd::Undrain { node, conn }) => members_cmd::undrain(node, conn).await,
        Cmd::Cluster(ClusterCmd::Voters(cmd)) => members_cmd::voters(cmd).await,
        Cmd::Certs(CertsCmd::Revoke(args)) => members_cmd::revoke(args).await,
    }
}

async fn cluster_status(c: Conn) -> Result<()> {
    let client = connect(&c).await?;
    let s = client.status().await?;
    if c.json {
        let members: Vec<_> = s
            .members
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "addr": m.addr, "state": m.state.as_str(), "reachable": m.reachable, "shards": m.shards, "voter": m.voter}))
            .collect();
        let autoscale = s.autoscale.as_ref().map(|a| {
            serde_json::json!({"desired": a.desired, "current": a.current, "utilization": a.utilization, "backlog": a.backlog, "reason": a.reason})
        });
        println!(
            "{}",
            serde_json::json!({"leader": s.leader, "term": s.term, "members": members, "autoscale": autoscale, "waiting_for": s.waiting_for})
        );
    } else {
        let forming;
        let leader = if !s.waiting_for.is_empty() {
            forming = format!(
                "none (the cluster is forming: this node waits for voter(s) {} to start)",
                s.waiting_for.join(", ")
            );
            &forming
        } else if s.leader.is_empty() {
            "none (no leader elected: the cluster has not formed yet, or a majority of voters is down)"
        } else {
            &s.leader
        };
        println!("leader: {leader}   term: {}", s.term);
        println!(
            "{:<12} {:<24} {:<9} {:<6} {:<10} {:>6}",
            "NAME", "ADDR", "STATE", "VOTER", "REACHABLE", "SHARDS"
        );
        for m in &s.members {
            println!(
                "{:<12} {:<24} {:<9} {:<6} {:<10} {:>6}",
                m.name, m.addr, m.state, m.voter, m.reachable, m.shards
            );
        }
        match &s.autoscale {
            Some(a) => println!(
                "autoscale: {} nodes recommended ({} up; utilisation {:.2}, backlog {:.0}): {}",
                a.desired, a.current, a.utilization, a.backlog, a.reason
            ),
            None => println!("autoscale: no recommendation yet"),
        }
    }
    client.close().await;
    Ok(())
}

async fn cluster_drain(node: String, c: Conn, wait: bool) -> Result<()> {
    let client = connect(&c).await?;
    client.drain(&node).await?;
    if wait {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            let left = client
                .shards()
                .await?
                .iter()
                .filter(|s| s.owner.as_ref() == Some(&node))
                .count();
            if left == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("{node} still owns {left} shards after 5 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
        }
    }
    if c.json {
        println!(
            "{}",
            serde_json::json!({"node": node, "state": "draining", "drained": wait})
        );
    } else if wait {
        println!("{node} is drained: it owns no shards and can be stopped");
    } else {
        println!("{node} is draining; `cluster shards` shows its shards moving");
    }
    client.close().await;
    Ok(())
}

async fn cluster_shards(c: Conn) -> Result<()> {
    let client = connect(&c).await?;
    let mut shards = client.shards().await?;
    shards.sort_by_key(|s| s.id);
    if c.json {
        let list: Vec<_> = shards.iter().map(|s| serde_json::json!({"id": s.id, "owner": s.owner, "epoch": s.epoch, "state": s.state.as_str()})).collect();
        println!("{}", serde_json::json!({ "shards": list }));
    } else {
        println!(
            "{:>6} {:<12} {:>6} {:<10}",
            "SHARD", "OWNER", "EPOCH", "STATE"
        );
        for s in &shards {
            let owner = s.owner.as_deref().unwrap_or("-");
            println!("{:>6} {:<12} {:>6} {:<10}", s.id, owner, s.epoch, s.state);
        }
    }
    client.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand, depth first, with its path (`tidepool job watch`).
    fn walk(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands() {
            walk(sub, format!("{path} {}", sub.get_name()), out);
        }
        out.push((path, cmd.clone()));
    }

    fn all() -> Vec<(String, clap::Command)> {
        let mut cmd = Cli::command();
        cmd.build();
        let mut out = Vec::new();
        walk(&cmd, "tidepool".into(), &mut out);
        out
    }

    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_help() {
        for (path, cmd) in all() {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                assert!(arg.get_help().is_some(), "{path}: {id} has no help text");
            }
        }
    }

    /// `--json` is a flag printing one document on every command; paths to write are `--out`.
    #[test]
    fn json_is_always_a_flag() {
        let mut with_json = 0;
        for (path, cmd) in all() {
            for arg in cmd.get_arguments() {
                if arg.get_long() == Some("json") {
                    with_json += 1;
                    assert!(
                        matches!(arg.get_action(), clap::ArgAction::SetTrue),
                        "{path}: --json takes a value"
                    );
                }
            }
        }
        assert!(with_json > 20, "only {with_json} commands have --json");
    }
}

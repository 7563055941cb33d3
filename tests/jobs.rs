//! Distributed ML on real node processes: accuracy against smartcore, results identical on 1, 3
//! and 5 nodes and through kills and joins, k-means and column statistics against single-process
//! references, coordinator failover, cancel, dataset import through the CLI. Waits are polls
//! with deadlines.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nalgebra::DMatrix;
use tidepool::local_cluster::{wait_all_up, wait_stable, LocalCluster};
use tidepool::{datasets, jobs_cli};
use tidepool_actors::jobs::kmeans::lloyd_from;
use tidepool_actors::jobs::stats::Stats;
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::control::{JobRecord, JobState};
use tidepool_runtime::dataset::Table;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const SHARDS: u32 = 32;

async fn connect(c: &LocalCluster) -> Arc<ClusterClient> {
    let opts = ClientOptions {
        retry_for: Duration::from_secs(60),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    Arc::new(c.admin_client(opts).await.unwrap())
}

async fn start(n: usize, voters: usize) -> (LocalCluster, Arc<ClusterClient>) {
    let mut c = LocalCluster::create(Path::new(BIN), n, SHARDS, voters).unwrap();
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(90)).await.unwrap();
    let client = connect(&c).await;
    settle(&client, n).await;
    (c, client)
}

async fn settle(client: &ClusterClient, n: usize) {
    wait_all_up(client, n, Duration::from_secs(90))
        .await
        .unwrap();
    wait_stable(client, Duration::from_secs(120)).await.unwrap();
}

fn cli(c: &LocalCluster, args: &[&str]) -> std::process::Output {
    c.cli(args).unwrap()
}

fn cli_json(c: &LocalCluster, args: &[&str]) -> serde_json::Value {
    c.cli_json(args).unwrap()
}

fn sgd_spec(dataset: &str, model: &str, epochs: u64, extra: &str) -> String {
    format!(
        "[job]\nkind = \"sgd\"\ndataset = \"{dataset}\"\n[model]\ntype = \"{model}\"\n\
         [train]\nepochs = {epochs}\nbatch_size = 64\nlearning_rate = 0.1\nl2 = 0.0001\n\
         seed = 7\ncheckpoint_every = 10\n{extra}"
    )
}

async fn wait_job(client: &ClusterClient, id: &str) -> JobRecord {
    jobs_cli::wait(client, id, false, Duration::from_secs(600))
        .await
        .unwrap()
}

async fn run_job(client: &ClusterClient, spec: &str) -> serde_json::Value {
    let id = jobs_cli::submit(client, spec).await.unwrap();
    let rec = wait_job(client, &id).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    jobs_cli::result(client, &id).await.unwrap()
}

/// Polls until job `id` has done at least `frac` of its steps; returns its record then.
async fn until_progress(client: &ClusterClient, id: &str, frac: f64) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let rec = jobs_cli::status(client, id).await.unwrap();
        assert!(
            !rec.state.is_terminal(),
            "job ended before the fault: {rec:?}"
        );
        if rec.steps > 0 && rec.step as f64 >= frac * rec.steps as f64 {
            return rec;
        }
        assert!(Instant::now() < deadline, "no progress: {rec:?}");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
}

fn vec_of(v: &serde_json::Value, key: &str) -> Vec<f64> {
    fn flat(v: &serde_json::Value, out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    flat(&v[key], &mut out);
    assert!(!out.is_empty(), "no {key} in {v}");
    out
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn assert_same_model(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    for key in ["standardized_params", "params"] {
        let d = max_abs_diff(&vec_of(a, key), &vec_of(b, key));
        assert!(d <= 1e-5, "{what}: {key} differ by {d}");
    }
}

fn write_split(dir: &Path, name: &str) -> (Table, Table, PathBuf, PathBuf) {
    let table = datasets::builtin(name).unwrap();
    let (train, test) = datasets::split(&table, 0.2, 7);
    let (a, b) = (
        dir.join(format!("{name}-train.csv")),
        dir.join(format!("{name}-test.csv")),
    );
    datasets::write_csv(&train, &a).unwrap();
    datasets::write_csv(&test, &b).unwrap();
    (train, test, a, b)
}

/// Accuracy through the CLI: train (job submit --wait), export (job result --out), score
/// (predict --json); within 1 point of smartcore on the same split.
fn train_and_score(
    c: &LocalCluster,
    dir: &Path,
    dataset: &str,
    spec: &str,
    test_csv: &Path,
    smartcore: f64,
) -> f64 {
    let spec_path = dir.join(format!("{dataset}.toml"));
    std::fs::write(&spec_path, spec).unwrap();
    let done = cli_json(
        c,
        &[
            "job",
            "submit",
            spec_path.to_str().unwrap(),
            "--wait",
            "--json",
        ],
    );
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(done["step"].as_u64().unwrap() > 0 && done["loss"].as_f64().is_some());
    let id = done["id"].as_str().unwrap();
    let status = cli_json(c, &["job", "status", id, "--json"]);
    for key in ["id", "state", "step", "steps", "loss"] {
        assert!(
            status.get(key).is_some(),
            "job status --json lacks {key}: {status}"
        );
    }
    let model = dir.join(format!("{dataset}-model.json"));
    cli_json(
        c,
        &[
            "job",
            "result",
            id,
            "--out",
            model.to_str().unwrap(),
            "--json",
        ],
    );
    let scored = cli_json(
        c,
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--data",
            test_csv.to_str().unwrap(),
            "--json",
        ],
    );
    let acc = scored["accuracy"].as_f64().unwrap();
    assert!(
        acc + 0.01 >= smartcore,
        "{dataset}: accuracy {acc} more than 1 point below smartcore's {smartcore}"
    );
    acc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accuracy_matches_smartcore_and_jobs_survive_failover_and_cancel() {
    let (mut c, client) = start(3, 3).await;
    let dir = tempfile::tempdir().unwrap();

    // Bad input is refused with the line, and leaves nothing behind.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "a,b,y\n1,2,0\n3,oops,1\n").unwrap();
    let out = cli(
        &c,
        &[
            "dataset",
            "import",
            bad.to_str().unwrap(),
            "--name",
            "bad",
            "--label",
            "y",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 3"), "{err}");
    let missing = cli(
        &c,
        &[
            "dataset",
            "import",
            bad.to_str().unwrap(),
            "--name",
            "bad",
            "--label",
            "nope",
        ],
    );
    assert!(!missing.status.success());

    let (ctrain, ctest, ctrain_csv, ctest_csv) = write_split(dir.path(), "breast_cancer");
    let (dtrain, dtest, dtrain_csv, dtest_csv) = write_split(dir.path(), "digits");
    for (name, path) in [("cancer", &ctrain_csv), ("digits", &dtrain_csv)] {
        let rec = cli_json(
            &c,
            &[
                "dataset",
                "import",
                path.to_str().unwrap(),
                "--name",
                name,
                "--label",
                "target",
                "--json",
            ],
        );
        assert_eq!(rec["name"], name);
    }
    let listed = cli_json(&c, &["dataset", "list", "--json"]);
    let names: Vec<&str> = listed["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["cancer", "digits"],
        "no half-imported 'bad' dataset"
    );
    // Describe: the record, its size, and every shard's partitions on the node serving it.
    let d = cli_json(&c, &["dataset", "describe", "cancer", "--json"]);
    let rec = &listed["datasets"][0];
    assert_eq!(d["rows"], rec["rows"]);
    assert_eq!(d["source"], "imported");
    let features = d["features"].as_array().unwrap().len() as u64;
    assert_eq!(features, rec["features"].as_array().unwrap().len() as u64);
    assert_eq!(
        d["values"].as_u64().unwrap(),
        d["rows"].as_u64().unwrap() * (features + 1)
    );
    let nodes = d["nodes"].as_object().unwrap();
    let node_shards: u64 = nodes.values().map(|n| n["shards"].as_u64().unwrap()).sum();
    let node_parts: u64 = nodes
        .values()
        .map(|n| n["partitions"].as_u64().unwrap())
        .sum();
    assert_eq!(node_shards, d["shards"].as_u64().unwrap());
    assert_eq!(node_parts, d["partitions"].as_u64().unwrap());
    assert!(node_parts > 0, "{d}");
    assert!(
        nodes.keys().all(|n| n.starts_with('n')),
        "every shard has an owner: {d}"
    );
    let missing = cli(&c, &["dataset", "describe", "nope"]);
    assert_eq!(
        missing.status.code(),
        Some(4),
        "unknown dataset: not-found exit code"
    );

    let cancer_ref = datasets::smartcore_logistic_accuracy(&ctrain, &ctest).unwrap();
    let digits_ref = datasets::smartcore_logistic_accuracy(&dtrain, &dtest).unwrap();
    let cancer_spec = sgd_spec("cancer", "logistic", 20, "");
    train_and_score(
        &c,
        dir.path(),
        "cancer",
        &cancer_spec,
        &ctest_csv,
        cancer_ref,
    );
    let digits_spec = sgd_spec("digits", "softmax", 20, "");
    train_and_score(
        &c,
        dir.path(),
        "digits",
        &digits_spec,
        &dtest_csv,
        digits_ref,
    );

    // The load signals are live: workers ran tasks and the leader made a recommendation that
    // `cluster status` shows with its reason.
    let mut tasks = 0.0;
    for i in 0..c.nodes.len() {
        let text = c.metrics(i).await.unwrap();
        tasks += tidepool::http::sum_metric(&text, "tidepool_task_duration_seconds_count", &[]);
        assert!(
            text.contains("tidepool_worker_utilization_ratio"),
            "node {i}"
        );
        assert!(text.contains("tidepool_quic_rtt_seconds"), "node {i}");
    }
    assert!(tasks > 0.0, "worker tasks were timed");
    let deadline = Instant::now() + Duration::from_secs(30);
    let auto = loop {
        let status = cli_json(&c, &["cluster", "status", "--json"]);
        if status["autoscale"].is_object() {
            break status["autoscale"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no autoscale recommendation: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // poll interval
    };
    assert!(auto["desired"].as_u64().unwrap() >= 1, "{auto}");
    assert_eq!(auto["current"].as_u64().unwrap(), 3, "{auto}");
    assert!(!auto["reason"].as_str().unwrap().is_empty(), "{auto}");

    // The coordinator's node killed mid-job: the job resumes elsewhere from its checkpoint and
    // ends with exactly the fault-free model.
    let reference = run_job(&client, &cancer_spec).await;
    let id = jobs_cli::submit(&client, &cancer_spec).await.unwrap();
    let rec = until_progress(&client, &id, 0.4).await;
    let coord = rec.coordinator.clone().unwrap();
    let victim = c.nodes.iter().position(|n| n.name == coord).unwrap();
    c.kill(victim).await.unwrap();
    let done = wait_job(&client, &id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_ne!(
        done.coordinator.as_deref(),
        Some(coord.as_str()),
        "coordinator moved"
    );
    assert_same_model(
        &reference,
        &jobs_cli::result(&client, &id).await.unwrap(),
        "coordinator killed",
    );

    // Cancel stops a long job cleanly: it ends cancelled and its step stops moving.
    c.start(victim).unwrap();
    settle(&client, 3).await;
    let long = jobs_cli::submit(&client, &sgd_spec("digits", "softmax", 10_000, ""))
        .await
        .unwrap();
    until_progress(&client, &long, 0.0001).await;
    let out = cli_json(&c, &["job", "cancel", &long, "--json"]);
    assert_eq!(out["state"], "cancelled");
    let rec = wait_job(&client, &long).await;
    assert_eq!(rec.state, JobState::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running: f64 = {
            let mut sum = 0.0;
            for i in 0..c.nodes.len() {
                let text = c.metrics(i).await.unwrap();
                sum += tidepool::http::sum_metric(&text, "tidepool_jobs_running", &[]);
            }
            sum
        };
        if running == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a coordinator still runs after cancel"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
    let listed = cli_json(&c, &["job", "list", "--json"]);
    assert!(listed["jobs"].as_array().unwrap().len() >= 5);
    client.close().await;
    c.stop_all(Duration::from_secs(30)).await.unwrap();
}

fn stats_spec(dataset: &str) -> String {
    format!("[job]\nkind = \"stats\"\ndataset = \"{dataset}\"\n[train]\nbins = 8\n")
}

fn kmeans_spec(dataset: &str) -> String {
    format!(
        "[job]\nkind = \"kmeans\"\ndataset = \"{dataset}\"\n[model]\nk = 10\n\
         [train]\nseed = 3\nmax_iter = 30\ntol = 1e-9\ncheckpoint_every = 5\n"
    )
}

fn check_stats(result: &serde_json::Value, table: &Table) {
    let stats = Stats::from_rows(
        table.features.len(),
        (0..table.rows).filter_map(|i| table.row(i)),
    );
    let cols = result["columns"].as_array().unwrap();
    assert_eq!(
        cols.len(),
        table.features.len() + 1,
        "features and the label"
    );
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-300);
    for (c, want) in stats.columns.iter().enumerate() {
        let got = &cols[c];
        assert_eq!(got["count"].as_u64().unwrap(), want.count);
        for (key, w) in [
            ("mean", want.mean),
            ("variance", want.variance()),
            ("min", want.min),
            ("max", want.max),
        ] {
            let g = got[key].as_f64().unwrap();
            assert!(g == w || rel(g, w) <= 1e-9, "column {c} {key}: {g} vs {w}");
        }
        let hist: u64 = got["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(hist, want.count);
    }
}

fn check_kmeans(result: &serde_json::Value, table: &Table) {
    let d = table.features.len();
    let init = vec_of(result, "init_centroids");
    let points = DMatrix::from_row_slice(table.rows, d, &table.x);
    let reference = lloyd_from(
        &points,
        DMatrix::from_row_slice(init.len() / d, d, &init),
        30,
        1e-9,
    );
    let inertia = result["inertia"].as_f64().unwrap();
    let rel = (inertia - reference.inertia).abs() / reference.inertia;
    assert!(
        rel <= 0.01,
        "k-means inertia {inertia} vs single-process {}",
        reference.inertia
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_identical_on_1_3_5_nodes_and_through_kills_and_joins() {
    let (mut c, client) = start(1, 1).await;
    let digits = datasets::builtin("digits").unwrap();
    let (train, _) = datasets::split(&digits, 0.2, 7);
    jobs_cli::import_table(&client, &train, "digits")
        .await
        .unwrap();
    let spec = sgd_spec("digits", "softmax", 2, "");
    let local_spec =
        "[job]\nkind = \"local_sgd\"\ndataset = \"digits\"\n[model]\ntype = \"softmax\"\n\
         [train]\nsteps = 60\nlocal_steps = 5\nbatch_size = 64\nlearning_rate = 0.1\nseed = 7\n";

    let one = run_job(&client, &spec).await;
    let one_local = run_job(&client, local_spec).await;
    let one_stats = run_job(&client, &stats_spec("digits")).await;
    check_stats(&one_stats, &train);
    let one_kmeans = run_job(&client, &kmeans_spec("digits")).await;
    check_kmeans(&one_kmeans, &train);

    for _ in 0..2 {
        let i = c.add_node().unwrap();
        c.start(i).unwrap();
    }
    settle(&client, 3).await;
    assert_same_model(&one, &run_job(&client, &spec).await, "3 nodes");

    for _ in 0..2 {
        let i = c.add_node().unwrap();
        c.start(i).unwrap();
    }
    settle(&client, 5).await;
    assert_same_model(&one, &run_job(&client, &spec).await, "5 nodes");
    assert_same_model(
        &one_local,
        &run_job(&client, local_spec).await,
        "local SGD, 5 nodes",
    );
    assert_eq!(
        one_stats,
        run_job(&client, &stats_spec("digits")).await,
        "stats, 5 nodes"
    );
    let five_kmeans = run_job(&client, &kmeans_spec("digits")).await;
    assert_eq!(one_kmeans, five_kmeans, "k-means, 5 nodes");

    // A shard owner (not the only voter n1) killed -9 during a step.
    let id = jobs_cli::submit(&client, &spec).await.unwrap();
    let rec = until_progress(&client, &id, 0.3).await;
    let victim_name = match rec.coordinator.as_deref() {
        Some(c) if c != "n1" => c.to_string(),
        _ => "n2".to_string(),
    };
    let victim = c.nodes.iter().position(|n| n.name == victim_name).unwrap();
    c.kill(victim).await.unwrap();
    assert_eq!(wait_job(&client, &id).await.state, JobState::Succeeded);
    assert_same_model(
        &one,
        &jobs_cli::result(&client, &id).await.unwrap(),
        "owner killed",
    );

    // A node joining mid-job (shards move to it while the job runs).
    let id = jobs_cli::submit(&client, &spec).await.unwrap();
    until_progress(&client, &id, 0.3).await;
    let i = c.add_node().unwrap();
    c.start(i).unwrap();
    assert_eq!(wait_job(&client, &id).await.state, JobState::Succeeded);
    assert_same_model(
        &one,
        &jobs_cli::result(&client, &id).await.unwrap(),
        "node joined",
    );
    client.close().await;
    c.stop_all(Duration::from_secs(30)).await.unwrap();
}

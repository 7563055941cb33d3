//! Issue 12 items 7, 8, 9 on real node processes: admin payloads the CLI never sends cannot
//! destroy a dataset; `dataset delete`; job admission (oversize synthetic datasets and models
//! refused with the numbers); a job whose messages outgrow the frame cap at run time fails with
//! the reason; results larger than a frame are fetched in chunks, byte-identical to what the
//! coordinator stored; checkpoints are deleted on cancel. One cluster, a 2 MiB frame cap on every
//! node. Waits are polls with deadlines.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tidepool::jobs_cli;
use tidepool::local_cluster::LocalCluster;
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::codec::AdminOp;
use tidepool_runtime::control::{DatasetSource, JobState};
use tidepool_runtime::dataset::Table;
use tidepool_runtime::storage::Store;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const SHARDS: u32 = 8;
const FRAME: u64 = 2 << 20;

struct Fixture {
    c: LocalCluster,
    client: ClusterClient,
}

async fn start() -> Fixture {
    let mut c = LocalCluster::create(Path::new(BIN), 3, SHARDS, 3).unwrap();
    c.env = vec![(
        "TIDEPOOL_TRANSPORT__MAX_FRAME_BYTES".into(),
        FRAME.to_string(),
    )];
    c.start_all().unwrap();
    let opts = ClientOptions {
        retry_for: Duration::from_secs(30),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let client = c.settled_admin_client(opts).await.unwrap();
    Fixture { c, client }
}

fn cli(c: &LocalCluster, args: &[&str]) -> std::process::Output {
    c.cli(args).unwrap()
}

fn shared(c: &LocalCluster) -> PathBuf {
    c.root().join("shared")
}

/// Files under `dir` (recursively); 0 if it does not exist.
fn files_under(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                files_under(&p)
            } else {
                1
            }
        })
        .sum()
}

/// A small table with integer labels in `0..classes`, the largest (`classes - 1`) on the last row.
fn table(rows: usize, features: usize, classes: usize) -> Table {
    let x = (0..rows * features)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let y = (0..rows)
        .map(|i| if i + 1 == rows { classes - 1 } else { i % classes } as f32)
        .collect();
    Table {
        features: (0..features).map(|j| format!("x{j}")).collect(),
        label: "y".into(),
        rows,
        x,
        y,
    }
}

fn softmax(dataset: &str, extra: &str) -> String {
    format!(
        "[job]\nkind = \"sgd\"\ndataset = \"{dataset}\"\n[model]\ntype = \"softmax\"\n{extra}\n\
         [train]\nepochs = 1\nbatch_size = 64\nlearning_rate = 0.1\nseed = 7\n"
    )
}

fn logistic(dataset: &str, train: &str) -> String {
    format!(
        "[job]\nkind = \"sgd\"\ndataset = \"{dataset}\"\n[model]\ntype = \"logistic\"\n\
         [train]\nbatch_size = 16\nlearning_rate = 0.1\nseed = 7\n{train}"
    )
}

async fn wait_job(client: &ClusterClient, id: &str) -> tidepool_runtime::control::JobRecord {
    jobs_cli::wait(client, id, false, Duration::from_secs(300))
        .await
        .unwrap()
}

async fn run_ok(client: &ClusterClient, spec: &str) -> String {
    let id = jobs_cli::submit(client, spec).await.unwrap();
    let rec = wait_job(client, &id).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    id
}

/// Item 7: malicious commit / abort payloads leave the dataset whole; `dataset delete`.
async fn malicious_payloads(f: &Fixture) {
    let client = &f.client;
    let rec = jobs_cli::import_table(client, &table(200, 4, 2), "victim")
        .await
        .unwrap();
    let DatasetSource::Imported { import, segments } = rec.source.clone() else {
        panic!("not imported: {rec:?}");
    };
    let objects = shared(&f.c).join("datasets").join("victim");
    let stored = files_under(&objects);
    assert!(stored >= SHARDS as usize, "{stored} partition objects");

    // The raw payloads, built here: a commit with an empty import id on the existing name, one
    // with a path for an import id, an abort naming the committed import, an abort with an
    // empty import id.
    let mut empty_import = serde_json::to_value(&rec).unwrap();
    empty_import["import"] = "".into();
    let mut traversal = empty_import.clone();
    traversal["import"] = "../victim".into();
    let payloads = [
        (AdminOp::DatasetCommit, empty_import),
        (AdminOp::DatasetCommit, traversal),
        (
            AdminOp::DatasetAbort,
            serde_json::json!({ "name": "victim", "import": import }),
        ),
        (
            AdminOp::DatasetAbort,
            serde_json::json!({ "name": "victim", "import": "" }),
        ),
        (AdminOp::DatasetDelete, serde_json::json!({ "name": "" })),
    ];
    for (op, payload) in payloads {
        let r = client.admin(op, &payload).await;
        assert!(r.is_err(), "{op:?} {payload} was accepted");
        assert_eq!(
            files_under(&objects),
            stored,
            "{op:?} {payload} deleted objects"
        );
    }
    assert_eq!(segments.len(), SHARDS as usize);
    // The dataset still serves a job.
    run_ok(client, &logistic("victim", "epochs = 2")).await;

    // `dataset delete`: refused while a job runs on it, then removes record and objects.
    let long = jobs_cli::submit(
        client,
        &logistic("victim", "steps = 1000000\ncheckpoint_every = 1000"),
    )
    .await
    .unwrap();
    let out = cli(&f.c, &["dataset", "delete", "victim"]);
    assert!(
        !out.status.success(),
        "delete of a dataset in use succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&long), "{err}");
    jobs_cli::cancel(client, &long).await.unwrap();
    let out = cli(&f.c, &["dataset", "delete", "victim", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["deleted"], true, "{v}");
    assert_eq!(files_under(&objects), 0, "partition objects left");
    let names: Vec<String> = jobs_cli::list_datasets(client)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert!(!names.contains(&"victim".to_string()), "{names:?}");
    assert!(jobs_cli::submit(client, &logistic("victim", "epochs = 1"))
        .await
        .is_err());
}

/// Item 8 and 9 at submit: oversize synthetic datasets and models are refused with the numbers.
async fn refused_at_submit(f: &Fixture) {
    let out = cli(
        &f.c,
        &["dataset", "synth", "--name", "huge", "--rows", "1000000000"],
    );
    assert!(
        !out.status.success(),
        "a 268 GB synthetic dataset was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("268000000000") && err.contains("jobs.memory_budget_bytes"),
        "{err}"
    );
    assert!(jobs_cli::list_datasets(&f.client)
        .await
        .unwrap()
        .iter()
        .all(|d| d.name != "huge"));

    jobs_cli::create_synthetic(&f.client, "wide", 100, 300, "logistic", 1)
        .await
        .unwrap();
    let err = jobs_cli::submit(&f.client, &softmax("wide", "classes = 1000"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("task message of")
            && err.contains("(301602 values)")
            && err.contains(&format!("transport.max_frame_bytes = {FRAME}")),
        "{err}"
    );
    let err = jobs_cli::submit(&f.client, &logistic("wide", "epochs = 1000000000000"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.epochs") && err.contains("jobs.max_epochs"),
        "{err}"
    );
}

/// Item 9 at run time: a softmax learns 1000 classes from its labels (admission assumed 2),
/// so its first training task is over the frame cap: the job fails, with the reason.
async fn fails_at_run_time(f: &Fixture) {
    jobs_cli::import_table(&f.client, &table(64, 300, 1000), "many")
        .await
        .unwrap();
    let id = jobs_cli::submit(&f.client, &softmax("many", ""))
        .await
        .unwrap();
    let rec = wait_job(&f.client, &id).await;
    assert_eq!(rec.state, JobState::Failed, "{rec:?}");
    let error = rec.error.unwrap_or_default();
    assert!(
        error.contains("task message of") && error.contains("transport.max_frame_bytes"),
        "{error}"
    );
}

/// Item 9: a model result larger than a frame, fetched in chunks, byte-identical to the stored
/// one.
async fn chunked_result(f: &Fixture) {
    jobs_cli::create_synthetic(&f.client, "tall", 200, 2500, "logistic", 3)
        .await
        .unwrap();
    let id = run_ok(&f.client, &softmax("tall", "classes = 30")).await;
    let out = f.c.root().join("model.json");
    let o = cli(
        &f.c,
        &["job", "result", &id, "--out", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fetched = std::fs::read(&out).unwrap();
    assert!(
        fetched.len() as u64 > FRAME,
        "result only {} bytes",
        fetched.len()
    );
    let keys = tidepool_runtime::storage::keys::KeyRing::load(
        &f.c.root().join("certs").join("n1").join("data.key"),
    )
    .unwrap();
    let store = Store::open(
        &format!("file://{}", shared(&f.c).display()),
        std::sync::Arc::new(keys),
    )
    .unwrap();
    let stored = store
        .get_blob(&tidepool_actors::coordinator::result_key(&id))
        .await
        .unwrap()
        .unwrap();
    assert!(
        fetched == stored,
        "fetched result differs from the stored one"
    );
}

/// Item 9: checkpoints are pruned while a job runs and deleted when it is cancelled.
async fn checkpoints_deleted_on_cancel(f: &Fixture) {
    jobs_cli::create_synthetic(&f.client, "long", 4000, 8, "logistic", 5)
        .await
        .unwrap();
    let id = jobs_cli::submit(
        &f.client,
        &logistic("long", "steps = 1000000\ncheckpoint_every = 5"),
    )
    .await
    .unwrap();
    let dir = shared(&f.c).join("jobs").join(&id).join("ckpt");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rec = jobs_cli::status(&f.client, &id).await.unwrap();
        assert!(!rec.state.is_terminal(), "{rec:?}");
        // At most the two kept, plus one being written and one being pruned.
        let n = files_under(&dir);
        assert!(n <= 4, "{n} checkpoints pile up");
        if rec.step >= 30 && n > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {rec:?}");
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
    jobs_cli::cancel(&f.client, &id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while files_under(&dir) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} checkpoints left after cancel",
            files_under(&dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_input_cannot_break_or_exhaust_a_node() {
    let mut f = start().await;
    malicious_payloads(&f).await;
    refused_at_submit(&f).await;
    fails_at_run_time(&f).await;
    chunked_result(&f).await;
    checkpoints_deleted_on_cancel(&f).await;
    let text = f.c.metrics(0).await.unwrap();
    assert!(text.contains("tidepool_job_admissions_refused_total"));
    // Every node is still up (no crash loop).
    for i in 0..3 {
        assert!(f.c.running(i), "node {i} exited:\n{}", f.c.tail_log(i));
    }
    f.c.stop_all(Duration::from_secs(60)).await.unwrap();
}

//! The parameter server on real node processes: matrix factorisation whose tables are spread
//! over the shards trains to the same tables bit for bit on 1, 3 and 5 nodes, through kill -9
//! of a table's owner, a join and a drain mid-training; the tables equal the single-process
//! reference, and test RMSE is the reference's. Waits are polls with deadlines.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::jobs_cli;
use tidepool::local_cluster::{wait_all_up, wait_stable, LocalCluster};
use tidepool_actors::jobs::mf;
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::codec::{decode_param_snapshot, ParamSnapshot};
use tidepool_runtime::control::{JobRecord, JobState};
use tidepool_runtime::dataset::{shard_of_row, Table};
use tidepool_runtime::jobspec::JobSpec;
use tidepool_runtime::ratings::{self, Rating, RatingsSpec};

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const SHARDS: u32 = 16;

async fn connect(c: &LocalCluster) -> Arc<ClusterClient> {
    let opts = ClientOptions {
        retry_for: Duration::from_secs(60),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    Arc::new(c.admin_client(opts).await.unwrap())
}

async fn settle(client: &ClusterClient, n: usize) {
    wait_all_up(client, n, Duration::from_secs(90))
        .await
        .unwrap();
    wait_stable(client, Duration::from_secs(120)).await.unwrap();
}

fn spec_text() -> String {
    "[job]\nkind = \"mf\"\ndataset = \"ratings\"\n[model]\nrank = 8\nuser_column = \"user\"\n\
     item_column = \"item\"\n[train]\nepochs = 8\nbatch_size = 2000\nlearning_rate = 0.03\n\
     l2 = 0.02\nseed = 7\ncheckpoint_every = 10\nconsistency = \"sync\"\n"
        .to_string()
}

/// Logistic regression with hashed features: its weight vector on the parameter server.
const HASHED: &str = "[job]\nkind = \"sgd\"\ndataset = \"clicks\"\n[model]\ntype = \"logistic\"\n\
     features = \"hashed\"\nhash_bits = 20\n[train]\nepochs = 3\nbatch_size = 256\n\
     learning_rate = 0.5\nstandardize = false\nseed = 3\ncheckpoint_every = 20\n";

fn table_of(rows: &[Rating]) -> Table {
    Table {
        features: vec!["user".into(), "item".into()],
        label: "rating".into(),
        rows: rows.len(),
        x: rows
            .iter()
            .flat_map(|&(u, i, _)| [u as f32, i as f32])
            .collect(),
        y: rows.iter().map(|r| r.2).collect(),
    }
}

/// Every shard's final table, fetched in chunks.
async fn tables(client: &ClusterClient, id: &str) -> Vec<ParamSnapshot> {
    let mut out = Vec::new();
    for s in 0..SHARDS {
        let bytes = table_bytes(client, id, s).await;
        out.push(decode_param_snapshot(&bytes).unwrap());
    }
    out
}

/// Equal tables, or a panic naming the first difference (not the whole model).
fn assert_tables_eq(got: &[ParamSnapshot], want: &[ParamSnapshot], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: shard count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.shard, g.step), (w.shard, w.step), "{what}: shard/step");
        assert_eq!(g.keys, w.keys, "{what}: rows of shard {}", g.shard);
        if let Some(i) = g
            .values
            .iter()
            .zip(&w.values)
            .position(|(a, b)| a.to_bits() != b.to_bits())
        {
            panic!(
                "{what}: shard {} value {i} (row {}) is {} instead of {}",
                g.shard,
                g.keys[i / 8],
                g.values[i],
                w.values[i]
            );
        }
    }
}

async fn table_bytes(client: &ClusterClient, id: &str, shard: u32) -> Vec<u8> {
    use tidepool_runtime::codec::AdminOp;
    let mut out = Vec::new();
    loop {
        let reply = client
            .admin(
                AdminOp::JobResultChunk,
                &serde_json::json!({"id": id, "offset": out.len(), "length": 4 << 20, "table": shard}),
            )
            .await
            .unwrap();
        let total = u64::from_le_bytes(reply[..8].try_into().unwrap()) as usize;
        out.extend_from_slice(&reply[8..]);
        if out.len() >= total {
            return out;
        }
    }
}

async fn run(client: &ClusterClient) -> (String, serde_json::Value) {
    run_spec(client, &spec_text()).await
}

async fn run_spec(client: &ClusterClient, spec: &str) -> (String, serde_json::Value) {
    let id = jobs_cli::submit(client, spec).await.unwrap();
    let rec = wait_job(client, &id).await;
    assert_eq!(rec.state, JobState::Succeeded, "{rec:?}");
    (id.clone(), jobs_cli::result(client, &id).await.unwrap())
}

async fn wait_job(client: &ClusterClient, id: &str) -> JobRecord {
    jobs_cli::wait(client, id, false, Duration::from_secs(120))
        .await
        .unwrap()
}

/// Polls until job `id` has done at least `frac` of its steps.
async fn until_progress(client: &ClusterClient, id: &str, frac: f64) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let rec = jobs_cli::status(client, id).await.unwrap();
        if rec.state.is_terminal() || (rec.steps > 0 && rec.step as f64 >= frac * rec.steps as f64)
        {
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} made no progress: {rec:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Embeddings (users, items) from the shards' tables; rows never written at their initial value.
fn embeddings(
    tables: &[ParamSnapshot],
    users: usize,
    items: usize,
    k: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>) {
    let mut pu = vec![0.0f32; users * k];
    let mut qi = vec![0.0f32; items * k];
    for (u, row) in pu.chunks_mut(k).enumerate() {
        mf::init_row(seed, mf::user_key(u as u64), row);
    }
    for (i, row) in qi.chunks_mut(k).enumerate() {
        mf::init_row(seed, mf::item_key(i as u64), row);
    }
    for t in tables {
        for (n, key) in t.keys.iter().enumerate() {
            let id = (key & 0xffff_ffff) as usize;
            let dst = if key >> 32 == mf::USERS {
                &mut pu
            } else {
                &mut qi
            };
            dst[id * k..(id + 1) * k].copy_from_slice(&t.values[n * k..(n + 1) * k]);
        }
    }
    (pu, qi)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mf_tables_identical_on_1_3_5_nodes_through_kill_join_and_drain() {
    let all = ratings::generate(&RatingsSpec {
        users: 400,
        items: 150,
        rank: 4,
        ratings: 24_000,
        noise: 0.1,
        seed: 42,
    });
    let (train, test) = ratings::split(&all, 0.2, 1);
    let mut c = LocalCluster::create(Path::new(BIN), 1, SHARDS, 1).unwrap();
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(90)).await.unwrap();
    let client = connect(&c).await;
    settle(&client, 1).await;
    jobs_cli::import_table(&client, &table_of(&train), "ratings")
        .await
        .unwrap();

    // One node: the tables equal the plain single-process reference on the same shards.
    let (id, one) = run(&client).await;
    let one_tables = tables(&client, &id).await;
    let spec = JobSpec::parse(&spec_text()).unwrap();
    let mut by_shard = vec![Vec::new(); SHARDS as usize];
    for (r, &row) in train.iter().enumerate() {
        by_shard[shard_of_row(r as u64, SHARDS) as usize].push(row);
    }
    let (ref_u, ref_i, mu) = mf::reference_train(&spec, &by_shard);
    let (users, items) = (
        one["users"].as_u64().unwrap() as usize,
        one["items"].as_u64().unwrap() as usize,
    );
    let (pu, qi) = embeddings(&one_tables, users, items, 8, 7);
    assert_eq!(one["mu"].as_f64().unwrap(), mu);
    assert_eq!(pu, ref_u, "user embeddings differ from the reference");
    assert_eq!(qi, ref_i, "item embeddings differ from the reference");
    let (rmse, ref_rmse) = (
        mf::rmse(&pu, &qi, 8, mu, &test),
        mf::rmse(&ref_u, &ref_i, 8, mu, &test),
    );
    assert!(
        rmse <= ref_rmse * 1.02,
        "test rmse {rmse} vs reference {ref_rmse}"
    );
    let mean_only = mf::rmse(&[], &[], 8, mu, &test);
    assert!(
        rmse < 0.7 * mean_only,
        "learned nothing: {rmse} vs {mean_only}"
    );

    // Hashed-feature logistic regression, on one node (compared on five below).
    let (clicks, _) = tidepool_runtime::dataset::synthetic(
        6000,
        12,
        tidepool_runtime::dataset::SyntheticKind::Logistic,
        9,
    );
    jobs_cli::import_table(&client, &clicks, "clicks")
        .await
        .unwrap();
    let (hid, hashed) = run_spec(&client, HASHED).await;
    assert_eq!(hashed["kind"], "ps_linear", "{hashed}");
    let hashed_one = tables(&client, &hid).await;

    // Three nodes.
    for _ in 0..2 {
        let i = c.add_node().unwrap();
        c.start(i).unwrap();
    }
    settle(&client, 3).await;
    let (id, three) = run(&client).await;
    assert_tables_eq(&tables(&client, &id).await, &one_tables, "3 nodes");
    assert_eq!(three["train_rmse"], one["train_rmse"]);

    // ssp: steps run up to 2 ahead of the oldest unfinished one, reading rows that lack the
    // last ones; not bit-identical, but within 1 % of sync's test RMSE. A stale read moves a row
    // by up to (staleness + 1) steps' gradients at once, so both take smaller steps.
    let gentle = spec_text()
        .replace("learning_rate = 0.03", "learning_rate = 0.02")
        .replace("batch_size = 2000", "batch_size = 500")
        .replace("epochs = 8", "epochs = 16")
        .replace("checkpoint_every = 10", "checkpoint_every = 40");
    let (id, _) = run_spec(&client, &gentle).await;
    let (gu, gi) = embeddings(&tables(&client, &id).await, users, items, 8, 7);
    let sync_rmse = mf::rmse(&gu, &gi, 8, mu, &test);
    let ssp = gentle.replace(
        "consistency = \"sync\"",
        "consistency = \"ssp\"\nstaleness = 2",
    );
    let (id, ssp_result) = run_spec(&client, &ssp).await;
    let (su, si) = embeddings(&tables(&client, &id).await, users, items, 8, 7);
    let ssp_rmse = mf::rmse(&su, &si, 8, mu, &test);
    assert!(
        (ssp_rmse - sync_rmse).abs() <= 0.01 * sync_rmse,
        "ssp test rmse {ssp_rmse} vs sync {sync_rmse}: {ssp_result}"
    );

    // kill -9 of a table owner (not the only voter n1) mid-training.
    let id = jobs_cli::submit(&client, &spec_text()).await.unwrap();
    let rec = until_progress(&client, &id, 0.4).await;
    let victim_name = match rec.coordinator.as_deref() {
        Some(c) if c != "n1" => c.to_string(),
        _ => "n2".to_string(),
    };
    let victim = c.nodes.iter().position(|n| n.name == victim_name).unwrap();
    c.kill(victim).await.unwrap();
    assert_eq!(wait_job(&client, &id).await.state, JobState::Succeeded);
    assert_tables_eq(&tables(&client, &id).await, &one_tables, "owner killed");
    let killed = jobs_cli::result(&client, &id).await.unwrap();
    assert_eq!(killed["train_rmse"], one["train_rmse"]);
    assert!(
        killed["rollbacks"].as_u64().unwrap() >= 1,
        "the victim's tables were lost, so the job rolled back: {killed}"
    );
    c.start(victim).unwrap();
    settle(&client, 3).await;

    // Joins to five nodes, one of them mid-training.
    let i = c.add_node().unwrap();
    c.start(i).unwrap();
    let id = jobs_cli::submit(&client, &spec_text()).await.unwrap();
    until_progress(&client, &id, 0.3).await;
    let i = c.add_node().unwrap();
    c.start(i).unwrap();
    assert_eq!(wait_job(&client, &id).await.state, JobState::Succeeded);
    assert_tables_eq(&tables(&client, &id).await, &one_tables, "node joined");
    settle(&client, 5).await;
    let (id, _) = run(&client).await;
    assert_tables_eq(&tables(&client, &id).await, &one_tables, "5 nodes");
    let (hid, _) = run_spec(&client, HASHED).await;
    assert_eq!(
        tables(&client, &hid).await,
        hashed_one,
        "hashed logistic, 5 nodes"
    );

    // A drain mid-training.
    let id = jobs_cli::submit(&client, &spec_text()).await.unwrap();
    until_progress(&client, &id, 0.3).await;
    let drained = c.nodes.last().unwrap().name.clone();
    let out = c.cli(&["cluster", "drain", &drained]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_job(&client, &id).await.state, JobState::Succeeded);
    assert_tables_eq(&tables(&client, &id).await, &one_tables, "node drained");

    cli_round_trip(&c, &id, &test);

    client.close().await;
    c.stop_all(Duration::from_secs(30)).await.unwrap();
}

fn cli_json(c: &LocalCluster, args: &[&str]) -> serde_json::Value {
    c.cli_json(args).unwrap()
}

/// The CLI around a finished mf job: the model directory (streamed from the tables), predict's
/// RMSE equal to the tables' own, recommend skipping rated items, Python reading the tensors.
fn cli_round_trip(c: &LocalCluster, id: &str, test: &[Rating]) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let model_s = model.to_str().unwrap();
    let written = cli_json(c, &["job", "result", id, "--out", model_s, "--json"]);
    assert_eq!(
        written["tensors"],
        serde_json::json!([
            "item_factors",
            "rated_items",
            "rated_offsets",
            "user_factors"
        ]),
        "{written}"
    );
    let csv = dir.path().join("test.csv");
    let mut text = String::from("user,item,rating\n");
    for (u, i, r) in test {
        text.push_str(&format!("{u},{i},{r}\n"));
    }
    std::fs::write(&csv, text).unwrap();
    let scored = cli_json(
        c,
        &[
            "predict",
            "--model",
            model_s,
            "--data",
            csv.to_str().unwrap(),
            "--label",
            "rating",
            "--json",
        ],
    );
    assert_eq!(scored["rows"], test.len());
    let rmse = scored["rmse"].as_f64().unwrap();
    assert!(rmse > 0.0 && rmse < 1.0, "{scored}");
    let rec = cli_json(
        c,
        &[
            "recommend",
            "--model",
            model_s,
            "--user",
            "3",
            "--top",
            "5",
            "--json",
        ],
    );
    let items = rec["items"].as_array().unwrap();
    assert_eq!(items.len(), 5, "{rec}");
    let scores: Vec<f64> = items.iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{rec}");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json\n\
             from safetensors.numpy import load_file\n\
             t = load_file(sys.argv[1] + '/model.safetensors')\n\
             m = json.load(open(sys.argv[1] + '/manifest.json'))['mf']\n\
             assert t['user_factors'].shape == (m['users'], m['rank'])\n\
             off, items = t['rated_offsets'], t['rated_items']\n\
             rated = set(items[off[3]:off[3 + 1]].tolist())\n\
             got = [i['item'] for i in json.loads(sys.argv[2])['items']]\n\
             assert not rated & set(got), (rated, got)\n\
             u = t['user_factors'][3].astype('float64')\n\
             s = m['mu'] + t['item_factors'].astype('float64') @ u\n\
             want = [i['score'] for i in json.loads(sys.argv[2])['items']]\n\
             assert all(abs(s[i] - w) < 1e-5 for i, w in zip(got, want)), (got, want)\n\
             rest = [s[i] for i in range(len(s)) if i not in rated and i not in got]\n\
             assert max(rest) <= min(want) + 1e-5, (max(rest), want)\n",
            model_s,
            &rec.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Digits (64 features, 10 classes) spread over a million columns: a softmax of 10 M
/// parameters. Broadcast every step it cannot run (refused at submit with the frame numbers);
/// with its columns sharded on the parameter server it trains, each step pulling only the rows
/// its minibatch touches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_million_parameter_softmax_trains_on_the_parameter_server() {
    const COLS: u64 = 1_000_000;
    let digits = tidepool::datasets::builtin("digits").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digits-wide.libsvm");
    let mut text = String::new();
    for r in 0..digits.rows {
        text.push_str(&format!("{}", digits.y[r]));
        for (j, &v) in digits.row(r).unwrap().iter().enumerate() {
            if v != 0.0 {
                // libsvm indices are 1-based; feature j lands on column j * 15625 (0-based).
                text.push_str(&format!(" {}:{}", j as u64 * 15_625 + 1, v / 16.0));
            }
        }
        if r == 0 {
            // The widest column, so the dataset has a million.
            text.push_str(&format!(" {COLS}:0.001"));
        }
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    let mut c = LocalCluster::create(Path::new(BIN), 2, SHARDS, 2).unwrap();
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(90)).await.unwrap();
    let client = connect(&c).await;
    settle(&client, 2).await;
    let url = format!("file://{}", path.display());
    let done = cli_json(&c, &["dataset", "import", &url, "--name", "wide", "--json"]);
    assert_eq!(done["features"].as_u64(), Some(COLS), "{done}");

    let spec = |features: &str| {
        format!(
            "[job]\nkind = \"sgd\"\ndataset = \"wide\"\n[model]\ntype = \"softmax\"\n\
             classes = 10\n{features}\n[train]\nepochs = 6\nbatch_size = 64\n\
             learning_rate = 0.5\nstandardize = false\nseed = 3\ncheckpoint_every = 40\n"
        )
    };
    let broadcast = dir.path().join("broadcast.toml");
    std::fs::write(&broadcast, spec("")).unwrap();
    let out = c
        .cli(&["job", "submit", broadcast.to_str().unwrap()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("max_frame_bytes"),
        "a broadcast 10 M-parameter softmax is refused with the frame numbers: {err}"
    );
    let (id, result) = run_spec(&client, &spec("features = \"sharded\"")).await;
    assert_eq!(result["columns"].as_u64(), Some(COLS), "{result}");
    let acc = result["train_accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "train accuracy {acc}: {result}");
    // Only the rows training touched are held: 64 feature columns (and the bias), not a million.
    let held: usize = tables(&client, &id)
        .await
        .iter()
        .map(|t| t.keys.len())
        .sum();
    assert!(held <= 66, "{held} rows saved");
    client.close().await;
    c.stop_all(Duration::from_secs(30)).await.unwrap();
}

/// A model larger than the nodes may hold: the tables stop at half of each node's
/// `jobs.memory_budget_bytes`, the job fails with the numbers, and the nodes keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_beyond_the_memory_budget_fail_the_job_not_the_node() {
    let rows = ratings::generate(&RatingsSpec {
        users: 60_000,
        items: 500,
        rank: 4,
        ratings: 120_000,
        noise: 0.1,
        seed: 5,
    });
    let mut c = LocalCluster::create(Path::new(BIN), 2, SHARDS, 2).unwrap();
    // 8 MiB a node: tables may hold 4 MiB; 60 000 users x rank 32 x 4 bytes is 7.7 MB.
    c.env = vec![(
        "TIDEPOOL_JOBS__MEMORY_BUDGET_BYTES".to_string(),
        (8u64 << 20).to_string(),
    )];
    c.start_all().unwrap();
    c.wait_ready(Duration::from_secs(90)).await.unwrap();
    let client = connect(&c).await;
    settle(&client, 2).await;
    jobs_cli::import_table(&client, &table_of(&rows), "ratings")
        .await
        .unwrap();
    let spec = spec_text()
        .replace("rank = 8", "rank = 32")
        .replace("epochs = 8", "epochs = 2");
    let id = jobs_cli::submit(&client, &spec).await.unwrap();
    let rec = wait_job(&client, &id).await;
    assert_eq!(rec.state, JobState::Failed, "{rec:?}");
    let error = rec.error.unwrap_or_default();
    assert!(
        error.contains("jobs.memory_budget_bytes") && error.contains("parameter tables"),
        "{error}"
    );
    // Both nodes still serve: a small job runs to the end.
    settle(&client, 2).await;
    let small = spec_text().replace("epochs = 8", "steps = 3");
    let (_, done) = run_spec(&client, &small).await;
    assert_eq!(done["steps"], 3, "{done}");
    client.close().await;
    c.stop_all(Duration::from_secs(30)).await.unwrap();
}

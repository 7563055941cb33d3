//! Imports read by the cluster from object storage, on real node processes: Parquet written by
//! pyarrow (an independent writer) imported bit for bit under each null policy, a glob that
//! skips what is not data, a corrupt file named in the error with nothing left visible, the same
//! import run twice, training on the imported data; a CSV import that survives kill -9 of a node
//! with every row once (row count and content checksum against an in-process reading); the S3
//! path against moto. Waits are polls with deadlines.
//!
//! pyarrow comes from PyPI (`.ci/run` installs it); without it the Parquet tests skip with a
//! message, unless `TIDEPOOL_REQUIRE_PYARROW` is set.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::local_cluster::LocalCluster;
use tidepool::{datasets, jobs_cli};
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::control::{DatasetRecord, DatasetSource};
use tidepool_runtime::dataset::PartitionBuf;
use tidepool_runtime::ingest::{columns::bucket, split_segment_key};
use tidepool_runtime::storage::{KeyRing, Store};

#[path = "support/moto.rs"]
mod moto;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
const SHARDS: u32 = 8;

/// Whether pyarrow can be imported; panics when it cannot and the run requires it.
fn pyarrow() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import pyarrow"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("TIDEPOOL_REQUIRE_PYARROW").is_none(),
            "TIDEPOOL_REQUIRE_PYARROW is set but python3 cannot import pyarrow"
        );
        eprintln!("skipping: pyarrow is not installed (pip install pyarrow)");
    }
    ok
}

fn python(args: &[&str]) {
    let out = Command::new("python3").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "python3 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn start(n: usize) -> (LocalCluster, ClusterClient) {
    start_with(n, SHARDS, Vec::new()).await
}

/// `n` nodes of `shards` shards with `env` in every node's environment, started and settled.
async fn start_with(
    n: usize,
    shards: u32,
    env: Vec<(String, String)>,
) -> (LocalCluster, ClusterClient) {
    let mut c = LocalCluster::create(Path::new(BIN), n, shards, n.min(3)).unwrap();
    c.env = env;
    c.start_all().unwrap();
    let opts = ClientOptions {
        retry_for: Duration::from_secs(60),
        ..Default::default()
    };
    let client = c.settled_admin_client(opts).await.unwrap();
    (c, client)
}

fn cli(c: &LocalCluster, args: &[&str]) -> Output {
    c.cli(args).unwrap()
}

fn cli_json(c: &LocalCluster, args: &[&str]) -> serde_json::Value {
    c.cli_json(args).unwrap()
}

/// The cluster's store, opened as a node opens it.
fn store(c: &LocalCluster) -> Store {
    let keys = KeyRing::load(
        &c.root()
            .join("certs")
            .join(&c.nodes[0].name)
            .join("data.key"),
    )
    .unwrap();
    let url = format!("file://{}", c.root().join("shared").display());
    Store::open(&url, Arc::new(keys)).unwrap()
}

async fn record(client: &ClusterClient, name: &str) -> Option<DatasetRecord> {
    jobs_cli::list_datasets(client)
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
}

/// Every stored row of an imported-from-storage dataset, in split order: (label, features).
async fn stored_rows(c: &LocalCluster, rec: &DatasetRecord) -> Vec<(f32, Vec<f32>)> {
    let DatasetSource::Ingested { import, splits, .. } = &rec.source else {
        panic!("not read from storage: {rec:?}");
    };
    let store = store(c);
    let mut rows = Vec::new();
    for (i, &(_, segments)) in splits.iter().enumerate() {
        for seg in 0..segments {
            let key = split_segment_key(&rec.name, import, i as u32, seg);
            let bytes = store.get_blob(&key).await.unwrap().expect(&key);
            let buf = PartitionBuf::from_bytes(&bytes).unwrap();
            let v = buf.view().unwrap();
            for r in 0..v.rows() {
                rows.push((v.labels()[r], v.row(r).to_vec()));
            }
        }
    }
    rows
}

/// pyarrow's rows as this import should store them: numbers as f32, `city` one-hot over its
/// sorted values, `tag` hashed into `buckets`; rows with a null dropped when `drop`.
fn expected_rows(
    expected: &serde_json::Value,
    cities: &[&str],
    buckets: u32,
    drop: bool,
) -> Vec<(f32, Vec<f32>)> {
    let cols: Vec<&str> = expected["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let mut out = Vec::new();
    for row in expected["rows"].as_array().unwrap() {
        let row = row.as_array().unwrap();
        if drop && row.iter().any(serde_json::Value::is_null) {
            continue;
        }
        let mut x = Vec::new();
        let mut label = f32::NAN;
        for (name, v) in cols.iter().zip(row) {
            match *name {
                "y" => label = v.as_f64().unwrap() as f32,
                "city" => x.extend(cities.iter().map(|c| match v.as_str() {
                    None => f32::NAN,
                    Some(s) if s == *c => 1.0,
                    Some(_) => 0.0,
                })),
                "tag" => {
                    let hit = bucket(v.as_str().unwrap(), buckets);
                    x.extend((0..buckets as usize).map(|k| if k == hit { 1.0 } else { 0.0 }));
                }
                _ => x.push(v.as_f64().map_or(f32::NAN, |f| f as f32)),
            }
        }
        out.push((label, x));
    }
    out
}

fn bits(rows: &[(f32, Vec<f32>)]) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|(y, x)| {
            std::iter::once(y.to_bits())
                .chain(x.iter().map(|v| v.to_bits()))
                .collect()
        })
        .collect()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn objects_under(c: &LocalCluster, dataset: &str) -> usize {
    store(c)
        .list_blobs(&format!("datasets/{dataset}"))
        .await
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_from_pyarrow_imports_bit_for_bit_and_trains() {
    if !pyarrow() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("fixture");
    python(&[
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/parquet_fixture.py"
        ),
        fixture.to_str().unwrap(),
    ]);
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("expected.json")).unwrap()).unwrap();
    let (c, client) = start(3).await;
    let glob = format!("file://{}/parquet/*.parquet", fixture.display());
    let import = |name: &str, nulls: &str| {
        vec![
            "dataset".to_string(),
            "import".into(),
            glob.clone(),
            "--name".into(),
            name.into(),
            "--label".into(),
            "y".into(),
            "--nulls".into(),
            nulls.into(),
            "--max-categories".into(),
            "8".into(),
            "--hash-buckets".into(),
            "16".into(),
            "--split-bytes".into(),
            "1".into(),
            "--json".into(),
        ]
    };

    // drop_row: the rows without nulls, bit for bit, in file and row order; one split per row
    // group (2000/700, 1500/500, 300/1000 rows); _SUCCESS and notes.txt are not data.
    let done = cli_json(&c, &args(&import("pq", "drop_row")));
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["splits"], 7, "{done}");
    let want = expected_rows(&expected, &["ams", "ber", "cph", "dub"], 16, true);
    assert_eq!(done["rows"].as_u64().unwrap(), want.len() as u64);
    assert_eq!(
        done["dropped"].as_u64().unwrap(),
        3800 - want.len() as u64,
        "{done}"
    );
    let rec = record(&client, "pq").await.expect("dataset visible");
    assert_eq!(rec.label, "y");
    assert_eq!(rec.features[..4], ["i8", "i16", "i32", "i64"]);
    assert!(
        rec.features.contains(&"city=dub".to_string())
            && rec.features.contains(&"tag#15".to_string())
    );
    let got = stored_rows(&c, &rec).await;
    assert_eq!(bits(&got), bits(&want), "stored rows differ from pyarrow's");
    let described = cli_json(&c, &["dataset", "describe", "pq", "--json"]);
    assert_eq!(described["source"], "storage");
    assert_eq!(described["url"], glob.as_str());
    assert_eq!(described["checksum"], done["checksum"]);
    assert_eq!(described["rows"], done["rows"]);

    // Only where jobs.import_urls allows: a node's own files are not importable.
    let out = cli(
        &c,
        &[
            "dataset",
            "import",
            "file:///etc/passwd",
            "--name",
            "leak",
            "--label",
            "x",
            "--format",
            "csv",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("jobs.import_urls") && !stderr.contains("root:"),
        "{stderr}"
    );

    // The same import again: the same import, nothing new written.
    let objects = objects_under(&c, "pq").await;
    let again = cli_json(&c, &args(&import("pq", "drop_row")));
    assert_eq!(again["id"], done["id"]);
    assert_eq!(again["state"], "succeeded");
    assert_eq!(objects_under(&c, "pq").await, objects);
    let status = cli_json(&c, &["dataset", "import-status", "--name", "pq", "--json"]);
    assert_eq!(status["checksum"], done["checksum"]);
    let all = cli_json(&c, &["dataset", "import-status", "--json"]);
    let ids: Vec<&str> = all["imports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [done["id"].as_str().unwrap()], "{all}");

    // refuse (the default): the import fails naming file, row group and row; nothing visible.
    let out = cli(&c, &args(&import("pq_refuse", "refuse")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    // Splits are read in parallel: the first null found may be in any file.
    let named = (0..3).any(|f| stderr.contains(&format!("part-00{f}.parquet: row group ")));
    assert!(
        named
            && (stderr.contains("null in column \"v\"")
                || stderr.contains("null in column \"city\"")),
        "{stderr}"
    );
    assert!(record(&client, "pq_refuse").await.is_none());
    let deadline = Instant::now() + Duration::from_secs(30);
    while objects_under(&c, "pq_refuse").await > 0 {
        assert!(Instant::now() < deadline, "a failed import left objects");
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }

    // fill_mean: every row; a null reads as the column's mean over the whole dataset.
    let filled = cli_json(&c, &args(&import("pq_fill", "fill_mean")));
    assert_eq!(filled["rows"], 3800, "{filled}");
    let rec = record(&client, "pq_fill").await.unwrap();
    let DatasetSource::Ingested { fill, .. } = &rec.source else {
        panic!()
    };
    let all = expected_rows(&expected, &["ams", "ber", "cph", "dub"], 16, false);
    let v = rec.features.iter().position(|f| f == "v").unwrap();
    let vals: Vec<f64> = all
        .iter()
        .map(|(_, x)| x[v])
        .filter(|x| !x.is_nan())
        .map(f64::from)
        .collect();
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    assert!(
        (f64::from(fill[v]) - mean).abs() <= 1e-6 * mean.abs().max(1.0),
        "{} vs {mean}",
        fill[v]
    );
    // A job over it sees no nulls: the column's mean is unchanged by filling with it.
    let spec = "[job]\nkind = \"stats\"\ndataset = \"pq_fill\"\n[train]\nbins = 4\n";
    let id = jobs_cli::submit(&client, spec).await.unwrap();
    let rec_job = jobs_cli::wait(&client, &id, false, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(rec_job.state.as_str(), "succeeded", "{rec_job:?}");
    let result = jobs_cli::result(&client, &id).await.unwrap();
    let col = result["columns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "v")
        .unwrap();
    assert_eq!(col["count"], 3800);
    assert!((col["mean"].as_f64().unwrap() - mean).abs() < 1e-3, "{col}");

    // A corrupt file in a glob: the import fails naming it and its row group; nothing visible.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        fixture.join("parquet/part-002.parquet"),
        bad.join("a.parquet"),
    )
    .unwrap();
    let mut bytes = std::fs::read(fixture.join("parquet/part-001.parquet")).unwrap();
    for b in &mut bytes[4..400] {
        *b ^= 0x5a;
    }
    std::fs::write(bad.join("b.parquet"), &bytes).unwrap();
    let url = format!("file://{}/*.parquet", bad.display());
    let out = cli(
        &c,
        &[
            "dataset", "import", &url, "--name", "broken", "--label", "y", "--nulls", "drop_row",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("b.parquet") && stderr.contains("row group 0"),
        "{stderr}"
    );
    assert!(record(&client, "broken").await.is_none());

    // Train on Parquet: a built-in dataset converted by pyarrow, scored like the CSV path.
    let csvs = dir.path().join("bc");
    let out = cli(
        &c,
        &[
            "dataset",
            "builtin",
            "breast_cancer",
            "--out",
            csvs.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let pq_dir = dir.path().join("bc-parquet");
    std::fs::create_dir_all(&pq_dir).unwrap();
    python(&[
        "-c",
        "import sys, pyarrow.csv as c, pyarrow.parquet as p\n\
         t = c.read_csv(sys.argv[1])\n\
         h = t.num_rows // 2\n\
         p.write_table(t.slice(0, h), sys.argv[2] + '/a.parquet', row_group_size=100)\n\
         p.write_table(t.slice(h), sys.argv[2] + '/b.parquet', row_group_size=100)\n",
        csvs.join("train.csv").to_str().unwrap(),
        pq_dir.to_str().unwrap(),
    ]);
    let url = format!("file://{}", pq_dir.display());
    let done = cli_json(
        &c,
        &[
            "dataset", "import", &url, "--name", "bc", "--label", "target", "--format", "parquet",
            "--json",
        ],
    );
    assert_eq!(done["rows"], 455, "{done}");
    let spec = dir.path().join("bc.toml");
    std::fs::write(
        &spec,
        "[job]\nkind = \"sgd\"\ndataset = \"bc\"\n[model]\ntype = \"logistic\"\n\
         [train]\nepochs = 30\nbatch_size = 64\nlearning_rate = 0.1\nl2 = 0.0001\nseed = 7\n",
    )
    .unwrap();
    let job = cli_json(
        &c,
        &["job", "submit", spec.to_str().unwrap(), "--wait", "--json"],
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    let model = dir.path().join("bc-model.json");
    cli_json(
        &c,
        &[
            "job",
            "result",
            job["id"].as_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
            "--json",
        ],
    );
    let scored = cli_json(
        &c,
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            "--data",
            csvs.join("test.csv").to_str().unwrap(),
            "--json",
        ],
    );
    let (train, test) = datasets::split(&datasets::builtin("breast_cancer").unwrap(), 0.2, 7);
    let smartcore = datasets::smartcore_logistic_accuracy(&train, &test).unwrap();
    let acc = scored["accuracy"].as_f64().unwrap();
    assert!(
        acc + 0.02 >= smartcore,
        "accuracy {acc}, smartcore {smartcore}"
    );
}

/// A CSV of `rows` rows: id, four features, a 0/1 label.
fn write_csv(path: &Path, rows: usize) {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(w, "id,a,b,c,d,y").unwrap();
    for i in 0..rows {
        let f = i as f32;
        writeln!(
            w,
            "{i},{},{},{},{},{}",
            f * 0.5,
            f.sqrt(),
            (i % 97) as f32,
            -f,
            i % 2
        )
        .unwrap();
    }
}

/// The rows and checksum of importing `url` as the cluster would, read here in one process.
async fn reference(url: &str, split_bytes: u64) -> (u64, String) {
    let spec = tidepool_runtime::control::ImportSpec {
        url: url.to_string(),
        format: tidepool_runtime::control::Format::Csv,
        label: "y".into(),
        features: vec![],
        nulls: Default::default(),
        max_categories: 32,
        hash_buckets: 1024,
        split_bytes,
        zero_based: false,
    };
    let anywhere = vec!["file:///".to_string()];
    let planned = tidepool_runtime::ingest::plan::plan("ref", "ref", &spec, SHARDS, &anywhere)
        .await
        .unwrap();
    let mut rec = planned.record;
    let src = tidepool_runtime::ingest::source::Source::open(url, &anywhere).unwrap();
    let store = Store::in_memory();
    for i in 0..rec.splits.len() {
        let done = tidepool_runtime::ingest::read::read_split(&src, &rec, i as u32, &store)
            .await
            .unwrap();
        rec.done[i] = Some(done);
    }
    (rec.rows_done(), format!("{:016x}", rec.checksum().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_survives_kill_9_of_a_node_with_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let csv: PathBuf = dir.path().join("big.csv");
    let rows = 600_000;
    write_csv(&csv, rows);
    let url = format!("file://{}", csv.display());
    let split_bytes = 256 << 10;
    let (want_rows, want_checksum) = reference(&url, split_bytes).await;
    assert_eq!(want_rows, rows as u64);

    let (mut c, client) = start(3).await;
    let started = cli_json(
        &c,
        &[
            "dataset",
            "import",
            &url,
            "--name",
            "big",
            "--label",
            "y",
            "--split-bytes",
            &split_bytes.to_string(),
            "--no-wait",
            "--json",
        ],
    );
    let id = started["id"].as_str().unwrap().to_string();
    let total = started["splits"].as_u64().unwrap();
    assert!(total > 50, "{started}");
    // Kill a node (not the one the CLI talks to) once some splits are done, none is finished.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = cli_json(&c, &["dataset", "import-status", &id, "--json"]);
        assert_eq!(s["state"], "running", "ended before the kill: {s}");
        if s["splits_done"].as_u64().unwrap() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {s}");
        tokio::time::sleep(Duration::from_millis(10)).await; // poll interval
    }
    c.kill(2).await.unwrap();
    let out = cli(&c, &["dataset", "import-status", &id, "--json"]);
    let mid: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        mid["splits_done"].as_u64().unwrap() < total,
        "finished before the kill: {mid}"
    );
    eprintln!(
        "killed {} with {}/{total} splits done",
        c.nodes[2].name, mid["splits_done"]
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let s = cli_json(&c, &["dataset", "import-status", &id, "--json"]);
        if s["state"] != "running" {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "import did not finish after the kill: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // poll interval
    };
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["rows"].as_u64().unwrap(), want_rows);
    assert_eq!(done["checksum"].as_str().unwrap(), want_checksum);
    let rec = record(&client, "big").await.unwrap();
    assert_eq!(rec.rows, want_rows);
    // And the data is there: a job over it counts every row.
    let spec = "[job]\nkind = \"stats\"\ndataset = \"big\"\n[train]\nbins = 4\n";
    let job = jobs_cli::submit(&client, spec).await.unwrap();
    let rec_job = jobs_cli::wait(&client, &job, false, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(rec_job.state.as_str(), "succeeded", "{rec_job:?}");
    let result = jobs_cli::result(&client, &job).await.unwrap();
    let counts: BTreeMap<String, u64> = result["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(counts.values().all(|&n| n == want_rows), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_from_s3_matches_the_same_files_from_disk() {
    if !pyarrow() {
        return;
    }
    let Some(moto) = moto::start_moto("lake") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("fixture");
    python(&[
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/parquet_fixture.py"
        ),
        fixture.to_str().unwrap(),
    ]);
    for f in [
        "part-000.parquet",
        "part-001.parquet",
        "part-002.parquet",
        "_SUCCESS",
    ] {
        let bytes = std::fs::read(fixture.join("parquet").join(f)).unwrap();
        let (status, body) =
            moto::http(moto.port, "PUT", &format!("/lake/events/{f}"), &bytes).unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let env = [
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", moto.port)),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
    ];
    let (c, client) = start_with(2, SHARDS, env.map(|(k, v)| (k.to_string(), v)).to_vec()).await;
    let import = |url: &str, name: &str| {
        cli_json(
            &c,
            &[
                "dataset",
                "import",
                url,
                "--name",
                name,
                "--label",
                "y",
                "--nulls",
                "drop_row",
                "--split-bytes",
                "1",
                "--json",
            ],
        )
    };
    let s3 = import("s3://lake/events/*.parquet", "from_s3");
    let disk = import(
        &format!("file://{}/parquet/*.parquet", fixture.display()),
        "from_disk",
    );
    assert_eq!(s3["state"], "succeeded", "{s3}");
    assert_eq!(s3["splits"], disk["splits"]);
    assert_eq!(s3["rows"], disk["rows"]);
    assert_eq!(s3["checksum"], disk["checksum"], "same files, same rows");
    let a = record(&client, "from_s3").await.unwrap();
    let b = record(&client, "from_disk").await.unwrap();
    assert_eq!(a.features, b.features);
    assert_eq!(
        bits(&stored_rows(&c, &a).await),
        bits(&stored_rows(&c, &b).await)
    );
}

/// A CSV of `rows` rows of 16 features and a 0/1 label (a known linear rule).
fn write_wide_csv(path: &Path, rows: usize) {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let names: Vec<String> = (0..16).map(|j| format!("x{j}")).collect();
    writeln!(w, "{},y", names.join(",")).unwrap();
    let mut s = 7u64;
    for _ in 0..rows {
        let mut x = [0f32; 16];
        for v in &mut x {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            *v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        }
        let y = u8::from(x[0] + 0.5 * x[1] - x[2] > 0.0);
        let cells: Vec<String> = x.iter().map(f32::to_string).collect();
        writeln!(w, "{},{y}", cells.join(",")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_scans_four_times_the_memory_budget() {
    const BUDGET: u64 = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("wide.csv");
    // 900 000 rows x (16 x 4 + 12) bytes = 68 MB of partitions: over 4x the budget.
    let rows = 900_000;
    write_wide_csv(&csv, rows);
    let env = vec![(
        "TIDEPOOL_JOBS__MEMORY_BUDGET_BYTES".to_string(),
        BUDGET.to_string(),
    )];
    let (c, client) = start_with(1, 16, env).await;
    let url = format!("file://{}", csv.display());
    let done = cli_json(
        &c,
        &[
            "dataset",
            "import",
            &url,
            "--name",
            "wide",
            "--label",
            "y",
            "--split-bytes",
            "4000000",
            "--json",
        ],
    );
    assert_eq!(done["rows"].as_u64().unwrap(), rows as u64, "{done}");
    let data = rows as u64 * (16 * 4 + 12);
    assert!(data > 4 * BUDGET);

    let pid = c.nodes[0].pid().unwrap();
    let before = tidepool::hostile_peer::rss_kib(pid).unwrap();
    let spec = "[job]\nkind = \"sgd\"\ndataset = \"wide\"\n[model]\ntype = \"logistic\"\n\
                [train]\nsteps = 12\nbatch_size = 4096\nlearning_rate = 0.5\nseed = 7\n\
                checkpoint_every = 100\n";
    let (rec, peak) = tidepool::hostile_peer::peak_rss(pid, async {
        let id = jobs_cli::submit(&client, spec).await.unwrap();
        jobs_cli::wait(&client, &id, false, Duration::from_secs(300))
            .await
            .unwrap()
    })
    .await;
    assert_eq!(rec.state.as_str(), "succeeded", "{rec:?}");
    eprintln!(
        "data {} MiB, budget {} MiB: node RSS {} MiB before the job, peak {} MiB during it",
        data >> 20,
        BUDGET >> 20,
        before >> 10,
        peak >> 10
    );
    // The partitions are mapped a few at a time, never all at once.
    assert!(
        peak.saturating_sub(before) * 1024 < data / 2,
        "RSS grew by {} KiB over a job on {data} bytes",
        peak.saturating_sub(before)
    );
    let files = std::fs::read_dir(
        c.root()
            .join("data")
            .join(&c.nodes[0].name)
            .join("partitions"),
    )
    .unwrap()
    .count();
    assert_eq!(files, 16, "one mapped file per shard");
}

/// `files` files of `rows` rows each of the same seeded sparse data (40 columns, about a fifth
/// of them non-zero, 0/1 labels from a planted logistic model), written as dense CSV (columns
/// `f1..f40`, label `y`) under `dense/` and as libsvm (one-based) under `sparse/`.
fn write_sparse_pair(dir: &Path, files: usize, rows: usize) {
    const COLS: usize = 40;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let w: Vec<f64> = (0..COLS)
        .map(|j| ((j * 37 % 11) as f64 - 5.0) / 4.0)
        .collect();
    std::fs::create_dir_all(dir.join("dense")).unwrap();
    std::fs::create_dir_all(dir.join("sparse")).unwrap();
    for f in 0..files {
        let mut csv = (1..=COLS).map(|j| format!("f{j},")).collect::<String>() + "y\n";
        let mut svm = String::new();
        for _ in 0..rows {
            let mut x = vec![0f32; COLS];
            for v in x.iter_mut() {
                if next() % 5 == 0 {
                    // Values with short decimal forms, so both files hold the same f32.
                    *v = ((next() % 801) as f32 - 400.0) / 100.0;
                }
            }
            let z: f64 = x.iter().zip(&w).map(|(&a, b)| f64::from(a) * b).sum();
            let y = u8::from((next() % 1000) as f64 / 1000.0 < 1.0 / (1.0 + (-z).exp()));
            for v in &x {
                csv.push_str(&format!("{v},"));
            }
            csv.push_str(&format!("{y}\n"));
            svm.push_str(&y.to_string());
            for (j, v) in x.iter().enumerate().filter(|(_, v)| **v != 0.0) {
                svm.push_str(&format!(" {}:{v}", j + 1));
            }
            svm.push('\n');
        }
        std::fs::write(dir.join(format!("dense/part-{f}.csv")), csv).unwrap();
        std::fs::write(dir.join(format!("sparse/part-{f}.libsvm")), svm).unwrap();
    }
}

/// The raw parameters of a finished job's model, and the model file.
fn trained(c: &LocalCluster, dir: &Path, dataset: &str, model: &str) -> (Vec<f64>, PathBuf) {
    let spec = dir.join(format!("{dataset}-{model}.toml"));
    let classes = if model == "softmax" {
        "classes = 2\n"
    } else {
        ""
    };
    std::fs::write(
        &spec,
        format!(
            "[job]\nkind = \"sgd\"\ndataset = \"{dataset}\"\n[model]\ntype = \"{model}\"\n\
             {classes}[train]\nepochs = 8\nbatch_size = 128\nlearning_rate = 0.2\nl2 = 0.001\n\
             seed = 11\n"
        ),
    )
    .unwrap();
    let job = cli_json(
        c,
        &["job", "submit", spec.to_str().unwrap(), "--wait", "--json"],
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    let out = dir.join(format!("{dataset}-{model}.json"));
    let path = out.to_str().unwrap();
    cli_json(
        c,
        &[
            "job",
            "result",
            job["id"].as_str().unwrap(),
            "--out",
            path,
            "--json",
        ],
    );
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let params = file["params"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    (params, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libsvm_rows_train_the_same_model_as_the_same_rows_dense() {
    let dir = tempfile::tempdir().unwrap();
    write_sparse_pair(dir.path(), 4, 1500);
    let (c, client) = start(2).await;
    let dense = format!("file://{}/dense/*.csv", dir.path().display());
    let sparse = format!("file://{}/sparse/*.libsvm", dir.path().display());
    let d = cli_json(
        &c,
        &[
            "dataset", "import", &dense, "--name", "dense", "--label", "y", "--json",
        ],
    );
    assert_eq!(d["rows"], 6000, "{d}");
    // No --label: a libsvm line starts with its label. The format comes from the extension.
    let s = cli_json(
        &c,
        &["dataset", "import", &sparse, "--name", "sparse", "--json"],
    );
    assert_eq!(
        (s["rows"].as_u64(), s["features"].as_u64()),
        (Some(6000), Some(40)),
        "{s}"
    );
    let described = cli_json(&c, &["dataset", "describe", "sparse", "--json"]);
    assert_eq!(described["layout"], "sparse", "{described}");
    let nnz = described["nnz"].as_u64().unwrap();
    assert_eq!(s["nnz"].as_u64(), Some(nnz));
    assert!(
        (6000 * 40 / 6..6000 * 40 / 4).contains(&nnz),
        "{nnz} stored entries"
    );
    assert_eq!(described["bytes"].as_u64(), Some(6000 * 20 + nnz * 8));
    let rec = record(&client, "sparse").await.unwrap();
    assert!(rec.features.is_empty() && rec.feature_count() == 40);
    // Rows land on the same shards in the same order (one file a split, a shard a split), so
    // both train on the same minibatches: the models agree to rounding (the dense path rounds
    // standardised values to f32; the sparse one folds the standardisation into the weights).
    for model in ["logistic", "softmax"] {
        let (a, dense_model) = trained(&c, dir.path(), "dense", model);
        let (b, sparse_model) = trained(&c, dir.path(), "sparse", model);
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-5 * scale,
            "{model}: parameters differ by {worst} (scale {scale})"
        );
        // The sparse model's columns are f1..f40, the CSV's names: it scores the CSV directly.
        let test = dir.path().join("dense/part-0.csv");
        let score = |m: &PathBuf| {
            let args = [
                "predict",
                "--model",
                m.to_str().unwrap(),
                "--data",
                test.to_str().unwrap(),
                "--label",
                "y",
                "--json",
            ];
            cli_json(&c, &args)["accuracy"].as_f64().unwrap()
        };
        let (acc_dense, acc_sparse) = (score(&dense_model), score(&sparse_model));
        assert_eq!(acc_dense, acc_sparse, "{model}");
        assert!(acc_dense > 0.8, "{model}: accuracy {acc_dense}");
        // The same model as a directory (manifest + safetensors): predict reads it, and Python
        // reads its tensors with safetensors.numpy, equal to the JSON model's parameters.
        let model_dir = dir.path().join(format!("sparse-{model}-dir"));
        let id = std::fs::read_to_string(&sparse_model).unwrap();
        let id: serde_json::Value = serde_json::from_str(&id).unwrap();
        let id = id["job"].as_str().unwrap().to_string();
        let written = cli_json(
            &c,
            &[
                "job",
                "result",
                &id,
                "--out",
                model_dir.to_str().unwrap(),
                "--json",
            ],
        );
        assert_eq!(
            written["tensors"],
            serde_json::json!(["bias", "weight"]),
            "{written}"
        );
        assert_eq!(
            score(&model_dir),
            acc_sparse,
            "{model}: the directory scores the same"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model_dir.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(manifest["kind"], model);
        assert!(manifest["spec"]
            .as_str()
            .unwrap()
            .contains("dataset = \"sparse\""));
        python(&[
            "-c",
            "import sys, json, numpy as np\n\
             from safetensors.numpy import load_file\n\
             t = load_file(sys.argv[1] + '/model.safetensors')\n\
             m = json.load(open(sys.argv[2]))\n\
             p = np.array(m['params'])\n\
             assert t['weight'].dtype == np.float64 and t['weight'].shape == (40, p.shape[1])\n\
             assert (t['weight'] == p[:-1]).all() and (t['bias'] == p[-1]).all()\n",
            model_dir.to_str().unwrap(),
            sparse_model.to_str().unwrap(),
        ]);
    }
    // k-means and stats need dense rows: refused at submission, with the reason.
    let spec = dir.path().join("km.toml");
    std::fs::write(
        &spec,
        "[job]\nkind = \"kmeans\"\ndataset = \"sparse\"\n[model]\nk = 3\n",
    )
    .unwrap();
    let out = cli(&c, &["job", "submit", spec.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("sparse"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libsvm_file_of_three_million_columns_costs_its_non_zeros_and_trains() {
    const COLS: u64 = 3_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.svm");
    let mut text = String::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let rows = 4000u64;
    for r in 0..rows {
        let mut cols: Vec<u64> = (0..30)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                1 + state % COLS
            })
            .collect();
        if r == 7 {
            cols.push(COLS); // the widest column appears once
        }
        cols.sort_unstable();
        cols.dedup();
        text.push_str(if cols[0] % 2 == 0 { "1" } else { "0" });
        for c in cols {
            text.push_str(&format!(" {c}:1"));
        }
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    let (c, _client) = start(2).await;
    let url = format!("file://{}", path.display());
    let done = cli_json(
        &c,
        &[
            "dataset",
            "import",
            &url,
            "--name",
            "wide",
            "--split-bytes",
            "200000",
            "--json",
        ],
    );
    assert_eq!(
        (done["rows"].as_u64(), done["features"].as_u64()),
        (Some(rows), Some(COLS)),
        "{done}"
    );
    let d = cli_json(&c, &["dataset", "describe", "wide", "--json"]);
    let nnz = d["nnz"].as_u64().unwrap();
    assert_eq!(d["columns"].as_u64(), Some(COLS));
    // About 30 entries a row: under 300 bytes a row, where dense rows would be 12 MB each.
    assert!(d["bytes"].as_u64().unwrap() < rows * 300, "{d}");
    assert!((rows * 29..=rows * 31).contains(&nnz), "{nnz}");
    // A logistic model over every column trains (one weight per column in each task).
    let spec = dir.path().join("wide.toml");
    std::fs::write(
        &spec,
        "[job]\nkind = \"sgd\"\ndataset = \"wide\"\n[model]\ntype = \"logistic\"\n\
         [train]\nsteps = 3\nbatch_size = 256\nlearning_rate = 0.5\nseed = 3\nstandardize = false\n",
    )
    .unwrap();
    let job = cli_json(
        &c,
        &["job", "submit", spec.to_str().unwrap(), "--wait", "--json"],
    );
    assert_eq!(job["state"], "succeeded", "{job}");
}

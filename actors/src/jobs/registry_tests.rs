//! End-to-end tests of the built-in jobs through [`super::registry::build`] and
//! [`super::registry::run_local`] on tables partitioned into 16 shards: results against
//! single-process references, grouping independence (shards mapped in any order and pre-summed
//! on any "node" give bit-identical results), checkpoint round trips, and errors.

use std::sync::Arc;

use nalgebra::DMatrix;
use serde_json::Value;
use tidepool_runtime::control::{DatasetRecord, DatasetSource};
use tidepool_runtime::dataset::{self, Partition, SyntheticKind, Table};
use tidepool_runtime::jobspec::JobSpec;

use super::job::{ExactSum, JobError, ShardData};
use super::kmeans::lloyd_from;
use super::model_file::ModelFile;
use super::models::{accuracy, predict, rmse, ModelKind};
use super::registry::{build, run_local, ErasedJob};
use super::rng::Rng;
use super::stats::{Histogram, Stats};

const SHARDS: u32 = 16;

/// A table split into [`SHARDS`] partitions the way an import splits it.
struct Sharded {
    parts: Vec<Partition>,
}

impl Sharded {
    fn new(table: &Table) -> Self {
        let parts = dataset::partition(table, SHARDS);
        assert_eq!(parts.len(), SHARDS as usize);
        assert_eq!(parts.iter().map(Partition::rows).sum::<usize>(), table.rows);
        Sharded { parts }
    }

    fn data(&self) -> Vec<ShardData<'_>> {
        self.parts
            .iter()
            .enumerate()
            .map(|(s, p)| ShardData {
                shard: s as u32,
                features: p.n_features(),
                x: p.features(),
                y: p.labels(),
                csr: None,
            })
            .collect()
    }
}

fn record(table: &Table) -> DatasetRecord {
    DatasetRecord {
        name: "t".into(),
        features: table.features.clone(),
        label: table.label.clone(),
        rows: table.rows as u64,
        shards: SHARDS,
        source: DatasetSource::Imported {
            import: "test".into(),
            segments: vec![1; SHARDS as usize],
        },
    }
}

fn job(spec: &str, table: &Table) -> Arc<dyn ErasedJob> {
    let spec = JobSpec::parse(spec).unwrap();
    build("job-1", &spec, &record(table)).unwrap()
}

fn run(spec: &str, table: &Table) -> Result<Value, JobError> {
    let sharded = Sharded::new(table);
    run_local(job(spec, table), &sharded.data())
}

/// Like [`run_local`], but every step maps the shards in a shuffled order and pre-sums them on
/// `nodes` "nodes" (uneven groups, changing every step) before merging the nodes' sums in
/// reverse order.
fn run_grouped(
    job: &Arc<dyn ErasedJob>,
    shards: &[ShardData<'_>],
    seed: u64,
    nodes: usize,
) -> Result<Value, JobError> {
    let mut driver = job.clone().driver();
    let mut step = 0u64;
    while let Some(task) = driver.next_task() {
        let mut order: Vec<usize> = (0..shards.len()).collect();
        Rng::for_task(seed, step, 0).shuffle(&mut order);
        let mut per_node = vec![ExactSum::default(); nodes];
        for (i, &s) in order.iter().enumerate() {
            let node = (i * i + step as usize) % nodes;
            per_node[node].add(&job.map(step, &task, &shards[s])?)?;
        }
        let mut total = ExactSum::default();
        for n in per_node.iter().rev() {
            total.merge(n)?;
        }
        driver.reduce(&task, total.to_partial())?;
        step += 1;
    }
    driver.result()
}

/// Like [`run_local`], but with a fresh driver every step restored from the previous step's
/// checkpoint (a coordinator that moves after every step). With `text`, the checkpoint goes
/// through JSON text, as it does in storage.
fn run_restoring(
    job: &Arc<dyn ErasedJob>,
    shards: &[ShardData<'_>],
    text: bool,
) -> Result<Value, JobError> {
    let mut checkpoint: Option<Value> = None;
    let mut step = 0u64;
    loop {
        let mut driver = job.clone().driver();
        if let Some(state) = checkpoint.take() {
            driver.restore(state)?;
        }
        let Some(task) = driver.next_task() else {
            return driver.result();
        };
        let mut acc = ExactSum::default();
        for data in shards {
            acc.add(&job.map(step, &task, data)?)?;
        }
        driver.reduce(&task, acc.to_partial())?;
        let state = driver.checkpoint()?;
        checkpoint = Some(if text {
            serde_json::from_slice(&serde_json::to_vec(&state).unwrap()).unwrap()
        } else {
            state
        });
        step += 1;
    }
}

/// Runs `spec` locally, then resuming from a checkpoint after every step, asserting identical
/// results.
fn assert_resumes_exactly(spec: &str, table: &Table, result: &Value, text: bool) {
    let sharded = Sharded::new(table);
    let restored = run_restoring(&job(spec, table), &sharded.data(), text).unwrap();
    assert_eq!(&restored, result, "resumed from checkpoints every step");
}

/// Runs `spec` locally, then in several groupings, asserting bit-identical results.
fn run_checked(spec: &str, table: &Table) -> Value {
    let sharded = Sharded::new(table);
    let shards = sharded.data();
    let job = job(spec, table);
    let local = run_local(job.clone(), &shards).unwrap();
    for (seed, nodes) in [(1, 3), (2, 3), (3, 5)] {
        let grouped = run_grouped(&job, &shards, seed, nodes).unwrap();
        assert_eq!(grouped, local, "seed {seed}, {nodes} nodes");
    }
    local
}

/// Every row of `table` as its features then its label.
fn rows_with_labels(table: &Table) -> Vec<Vec<f32>> {
    (0..table.rows)
        .map(|i| {
            let mut r = table.row(i).unwrap().to_vec();
            r.push(table.y[i]);
            r
        })
        .collect()
}

/// The raw feature matrix of `table` (rows x features).
fn features(table: &Table) -> DMatrix<f32> {
    DMatrix::from_row_slice(table.rows, table.features.len(), &table.x)
}

/// The model in a training job's result, applied to the raw features of `table`.
fn predictions(result: &Value, table: &Table) -> (ModelKind, Vec<f64>) {
    let file = ModelFile::from_json(&serde_json::to_vec(result).unwrap()).unwrap();
    assert_eq!(file.features, table.features);
    assert_eq!(file.label, table.label);
    let kind = file.model_kind().unwrap();
    let params = file.params_matrix().unwrap();
    (kind, predict(kind, &params, &features(table)).unwrap())
}

/// The per-step losses of a training job's result.
fn losses(result: &Value) -> Vec<f64> {
    result["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l[1].as_f64().unwrap())
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The loss goes down: the last few steps' mean is below both the first few steps' and, by
/// 10%, the loss at the initial (zero) parameters.
fn assert_loss_decreases(result: &Value) {
    let l = losses(result);
    assert!(l.len() >= 10, "{} losses", l.len());
    let (first, last) = (mean(&l[..5]), mean(&l[l.len() - 5..]));
    assert!(last < first, "loss {first} -> {last}");
    assert!(last < 0.9 * l[0], "loss {} -> {last}", l[0]);
}

fn normal(rng: &mut Rng) -> f64 {
    let (u1, u2) = (1.0 - rng.uniform_f64(), rng.uniform_f64());
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn logistic_table() -> Table {
    dataset::synthetic(4000, 8, SyntheticKind::Logistic, 1).0
}

/// Predictions of the generating weights themselves: the Bayes classifier, about the best
/// accuracy any model can reach on labels drawn from `sigmoid(w . x)`.
fn truth_predictions(table: &Table, w: &[f32]) -> Vec<f64> {
    (0..table.rows)
        .map(|i| {
            let z: f64 = table
                .row(i)
                .unwrap()
                .iter()
                .zip(w)
                .map(|(&x, &w)| f64::from(x) * f64::from(w))
                .sum();
            f64::from(u8::from(z >= 0.0))
        })
        .collect()
}

/// A logistic model learnt on `synthetic(.., Logistic, ..)`: as accurate on the (noisy) labels
/// as the generating weights, and agreeing with them on more than 90% of rows.
///
/// The labels are Bernoulli draws, so no model gets much above the generating weights'
/// accuracy (0.72 for `synthetic(4000, 8, Logistic, 1)`): "accuracy > 0.8" is checked against
/// the noise-free labels `w . x >= 0` instead.
fn assert_learns_logistic(result: &Value, table: &Table, w: &[f32]) -> f64 {
    let (kind, pred) = predictions(result, table);
    assert_eq!(kind, ModelKind::Logistic);
    let acc = accuracy(&pred, &table.y);
    let truth = truth_predictions(table, w);
    let best = accuracy(&truth, &table.y);
    assert!(
        acc > best - 0.02,
        "accuracy {acc}, generating weights {best}"
    );
    let truth: Vec<f32> = truth.iter().map(|&v| v as f32).collect();
    let agree = accuracy(&pred, &truth);
    assert!(agree > 0.9, "agrees with the generating weights on {agree}");
    acc
}

const LOGISTIC_SGD: &str = r#"
[job]
kind = "sgd"
dataset = "t"
[model]
type = "logistic"
[train]
epochs = 3
batch_size = 128
learning_rate = 0.5
seed = 7
"#;

#[test]
fn stats_job_matches_a_single_pass() {
    // Columns of different scales and offsets, so the variances are not all about 1.
    let (mut table, _) = dataset::synthetic(3000, 4, SyntheticKind::Linear, 5);
    let scale = [1.0f32, 2.0, 0.01, 5.0];
    let offset = [0.5f32, -3.0, 250.0, 1e4];
    for row in table.x.chunks_exact_mut(4) {
        for (j, v) in row.iter_mut().enumerate() {
            *v = *v * scale[j] + offset[j];
        }
    }
    let bins = 7;
    let spec = format!("[job]\nkind = \"stats\"\ndataset = \"t\"\n[train]\nbins = {bins}");
    let result = run_checked(&spec, &table);
    assert_eq!(result["format"], "tidepool-stats/1");

    // The reference: one Welford pass over rows of features then label.
    let rows = rows_with_labels(&table);
    let reference = Stats::from_rows(5, rows.iter().map(Vec::as_slice));
    let all = DMatrix::from_fn(table.rows, 5, |i, j| rows[i][j]);

    let columns = result["columns"].as_array().unwrap();
    assert_eq!(columns.len(), 5);
    let names = ["x0", "x1", "x2", "x3", "y"];
    let close = |what: &str, c: usize, got: &Value, want: f64| {
        let got = got.as_f64().unwrap();
        let err = (got - want).abs() / want.abs().max(f64::MIN_POSITIVE);
        assert!(err <= 1e-9, "column {c} {what}: {got} vs {want} ({err:e})");
    };
    for (c, (col, want)) in columns.iter().zip(&reference.columns).enumerate() {
        assert_eq!(col["name"], names[c]);
        assert_eq!(col["count"], table.rows as u64);
        close("mean", c, &col["mean"], want.mean);
        close("variance", c, &col["variance"], want.variance());
        close("std", c, &col["std"], want.std_dev());
        assert_eq!(col["min"].as_f64().unwrap(), want.min, "column {c} min");
        assert_eq!(col["max"].as_f64().unwrap(), want.max, "column {c} max");
        let hist: Vec<u64> = col["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(hist.len(), bins);
        assert_eq!(hist.iter().sum::<u64>(), table.rows as u64, "column {c}");
        let h = Histogram::from_column(&all, c, want.min, want.max, bins);
        assert_eq!(hist, h.counts, "column {c} histogram");
    }
    // Variance really is scale-dependent here (not trivially 1).
    let v3 = columns[3]["variance"].as_f64().unwrap();
    assert!((v3 / 25.0 - 1.0).abs() < 0.1, "{v3}");

    assert_resumes_exactly(&spec, &table, &result, false);
}

const CENTERS: [[f64; 3]; 3] = [[0.0, 0.0, 0.0], [20.0, 0.0, 5.0], [-10.0, 15.0, 0.0]];

/// `per` points around each of [`CENTERS`] (unit normal noise), interleaved by cluster; the
/// label is the cluster.
fn blobs(per: usize) -> Table {
    let mut rng = Rng::for_task(11, 0, 0);
    let rows = per * CENTERS.len();
    let mut x = Vec::with_capacity(rows * 3);
    let mut y = Vec::with_capacity(rows);
    for i in 0..rows {
        let c = i % CENTERS.len();
        x.extend(CENTERS[c].iter().map(|m| (m + normal(&mut rng)) as f32));
        y.push(c as f32);
    }
    Table {
        features: vec!["a".into(), "b".into(), "c".into()],
        label: "cluster".into(),
        rows,
        x,
        y,
    }
}

#[test]
fn kmeans_job_matches_lloyd_from_its_seeds() {
    let table = blobs(1000);
    let (max_iter, tol) = (50, 1e-9);
    let spec = format!(
        "[job]\nkind = \"kmeans\"\ndataset = \"t\"\n[model]\nk = 3\n\
         [train]\nmax_iter = {max_iter}\ntol = {tol:e}\nseed = 3"
    );
    let result = run_checked(&spec, &table);
    assert_eq!(result["format"], "tidepool-kmeans/1");
    assert_eq!(result["k"], 3);

    let matrix = |v: &Value| {
        let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(rows.len(), 3);
        DMatrix::from_fn(3, 3, |r, c| rows[r][c])
    };
    let init = matrix(&result["init_centroids"]);
    let centroids = matrix(&result["centroids"]);
    let points = features(&table);
    // k-means++ seeds are data points.
    for r in init.row_iter() {
        let found = points.row_iter().any(|p| {
            p.iter()
                .zip(r.iter())
                .all(|(&a, &b)| (f64::from(a) - b).abs() <= 1e-12 * b.abs().max(1.0))
        });
        assert!(found, "seed {r} is not a data point");
    }

    // The job's threshold is relative to the mean column variance (scikit-learn's rule).
    let reference = lloyd_from(
        &points,
        init,
        max_iter as usize,
        tol * mean_variance(&points),
    );
    let inertia = result["inertia"].as_f64().unwrap();
    let rel = (inertia - reference.inertia).abs() / reference.inertia;
    assert!(rel < 1e-9, "inertia {inertia} vs {}", reference.inertia);
    assert_eq!(
        result["iterations"].as_u64().unwrap(),
        reference.iterations as u64
    );
    assert!((centroids - &reference.centroids).abs().max() < 1e-9);
    // Unit noise in 3 dimensions: inertia about 3 per point, and every true centre found.
    assert!(inertia / table.rows as f64 <= 3.5, "{inertia}");
    for c in CENTERS {
        let best = reference
            .centroids
            .row_iter()
            .map(|r| r.iter().zip(c).map(|(a, b)| (a - b).powi(2)).sum::<f64>())
            .fold(f64::INFINITY, f64::min)
            .sqrt();
        assert!(best < 0.2, "centre {c:?} off by {best}");
    }

    assert_resumes_exactly(&spec, &table, &result, false);
}

#[test]
fn sgd_logistic_learns_and_is_grouping_independent() {
    let (table, w) = dataset::synthetic(4000, 8, SyntheticKind::Logistic, 1);
    let result = run_checked(LOGISTIC_SGD, &table);
    assert_eq!(result["format"], "tidepool-model/1");
    assert_eq!(result["steps"], 3 * 4000u64.div_ceil(128));
    assert_loss_decreases(&result);
    let last = *losses(&result).last().unwrap();
    assert!(last < 0.55, "final loss {last} (ln 2 at the start)");
    assert_learns_logistic(&result, &table, &w);

    assert_resumes_exactly(LOGISTIC_SGD, &table, &result, false);
}

#[test]
fn sgd_softmax_infers_classes_and_learns() {
    let (mut table, _) = dataset::synthetic(3000, 5, SyntheticKind::Linear, 4);
    let mut rng = Rng::for_task(5, 0, 0);
    let truth: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..6).map(|_| rng.uniform_f64() * 4.0 - 2.0).collect())
        .collect();
    for i in 0..table.rows {
        let row = table.row(i).unwrap();
        let score = |w: &[f64]| {
            row.iter()
                .zip(w)
                .map(|(&x, w)| f64::from(x) * w)
                .sum::<f64>()
                + w[5]
        };
        let scores: Vec<f64> = truth.iter().map(|w| score(w)).collect();
        let class = (0..3)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        table.y[i] = class as f32;
    }
    for c in 0..3 {
        let n = table.y.iter().filter(|&&y| y == c as f32).count();
        assert!(n > 100, "class {c} has {n} rows");
    }
    let spec = r#"
        [job]
        kind = "sgd"
        dataset = "t"
        [model]
        type = "softmax"
        [train]
        epochs = 8
        batch_size = 64
        learning_rate = 0.5
        seed = 1
    "#;
    let result = run(spec, &table).unwrap();
    assert_eq!(result["classes"], 3);
    assert_loss_decreases(&result);
    let (kind, pred) = predictions(&result, &table);
    assert_eq!(kind, ModelKind::Softmax { classes: 3 });
    let acc = accuracy(&pred, &table.y);
    assert!(acc > 0.8, "softmax accuracy {acc}");
}

#[test]
fn sgd_linear_regression_fits() {
    let (table, w) = dataset::synthetic(3000, 8, SyntheticKind::Linear, 2);
    let spec = r#"
        [job]
        kind = "sgd"
        dataset = "t"
        [model]
        type = "linear"
        [train]
        epochs = 5
        batch_size = 64
        learning_rate = 0.1
        seed = 3
    "#;
    let result = run(spec, &table).unwrap();
    assert_loss_decreases(&result);
    let (kind, pred) = predictions(&result, &table);
    assert_eq!(kind, ModelKind::Linear);
    // The label noise has standard deviation 0.1; the label itself about 2.
    let err = rmse(&pred, &table.y);
    assert!(err < 0.15, "rmse {err}");
    let params = ModelFile::from_json(&serde_json::to_vec(&result).unwrap())
        .unwrap()
        .params;
    for (j, &wj) in w.iter().enumerate() {
        assert!(
            (params[j][0] - f64::from(wj)).abs() < 0.05,
            "w{j}: {} vs {wj}",
            params[j][0]
        );
    }
    assert!(params[8][0].abs() < 0.05, "bias {}", params[8][0]);
}

#[test]
fn local_sgd_logistic_learns_and_is_grouping_independent() {
    let (table, w) = dataset::synthetic(4000, 8, SyntheticKind::Logistic, 1);
    let spec = r#"
        [job]
        kind = "local_sgd"
        dataset = "t"
        [model]
        type = "logistic"
        [train]
        epochs = 3
        batch_size = 128
        learning_rate = 0.5
        local_steps = 5
        seed = 7
    "#;
    let result = run_checked(spec, &table);
    // 96 steps in rounds of 5.
    assert_eq!(result["steps"], 96 / 5);
    assert_loss_decreases(&result);
    let acc = assert_learns_logistic(&result, &table, &w);
    let sgd = assert_learns_logistic(&run(LOGISTIC_SGD, &table).unwrap(), &table, &w);
    assert!((acc - sgd).abs() < 0.03, "local SGD {acc}, SGD {sgd}");

    assert_resumes_exactly(spec, &table, &result, false);
}

#[test]
fn bad_labels_fail_with_a_data_error() {
    for bad in [2.0, -1.0] {
        let mut table = logistic_table();
        table.y[1234] = bad;
        match run(LOGISTIC_SGD, &table) {
            Err(JobError::Data(msg)) => assert!(msg.contains("labels"), "{bad}: {msg}"),
            other => panic!("label {bad}: {other:?}"),
        }
    }
    // Softmax labels must be class indices.
    let softmax = LOGISTIC_SGD.replace("logistic", "softmax");
    for bad in [-1.0, 1.5] {
        let mut table = logistic_table();
        for y in table.y.iter_mut().step_by(10) {
            *y = bad;
        }
        match run(&softmax, &table) {
            Err(JobError::Data(msg)) => assert!(msg.contains("label"), "{bad}: {msg}"),
            other => panic!("softmax label {bad}: {other:?}"),
        }
    }
}

#[test]
fn diverging_training_fails_with_a_job_error() {
    // Raw features of order 1e6, not standardised, and a large learning rate.
    let (mut table, _) = dataset::synthetic(2000, 4, SyntheticKind::Linear, 9);
    for v in &mut table.x {
        *v *= 1e6;
    }
    let spec = |kind: &str, steps: u64, lr: &str| {
        format!(
            "[job]\nkind = \"{kind}\"\ndataset = \"t\"\n[model]\ntype = \"linear\"\n\
             [train]\nsteps = {steps}\nbatch_size = 64\nlearning_rate = {lr}\n\
             standardize = false\nlocal_steps = 2"
        )
    };
    let cases = [
        ("sgd", 20, "1000.0"),
        // The last step's update overflows the parameters: no later merge would notice.
        ("sgd", 1, "1e308"),
        ("local_sgd", 20, "1000.0"),
        ("local_sgd", 2, "1e308"),
    ];
    for (kind, steps, lr) in cases {
        let spec = spec(kind, steps, lr);
        match run(&spec, &table) {
            Err(JobError::Overflow(_) | JobError::Data(_)) => {}
            other => panic!("{kind}, {steps} steps, lr {lr}: {other:?}"),
        }
    }
}

/// Checkpoints are stored as JSON text; a resumed job must be bit-identical to an uninterrupted
/// one. serde_json parses some floats 1 ulp off unless its `float_roundtrip` feature is on
/// (here the stats job's column minimum moves up, and the histogram drops the minimum's row).
#[test]
fn checkpoints_survive_json_text() {
    let (table, _) = dataset::synthetic(3000, 4, SyntheticKind::Linear, 5);
    let stats = "[job]\nkind = \"stats\"\ndataset = \"t\"\n[train]\nbins = 7";
    assert_resumes_exactly(stats, &table, &run(stats, &table).unwrap(), true);
    let table = blobs(300);
    let kmeans = "[job]\nkind = \"kmeans\"\ndataset = \"t\"\n[model]\nk = 3";
    assert_resumes_exactly(kmeans, &table, &run(kmeans, &table).unwrap(), true);
    let table = logistic_table();
    assert_resumes_exactly(
        LOGISTIC_SGD,
        &table,
        &run(LOGISTIC_SGD, &table).unwrap(),
        true,
    );
}

#[test]
fn softmax_on_one_class_gives_a_usable_model() {
    let mut table = logistic_table();
    table.y.fill(0.0);
    let softmax = LOGISTIC_SGD.replace("logistic", "softmax");
    let result = run(&softmax, &table).unwrap();
    let (kind, pred) = predictions(&result, &table);
    assert_eq!(kind, ModelKind::Softmax { classes: 2 });
    assert_eq!(accuracy(&pred, &table.y), 1.0);
}

/// A column of millisecond Unix timestamps (about 1.7e12, squared 2.9e24): beyond the old
/// fixed-point range, it made stats, standardised SGD and k-means fail with a numeric overflow.
/// Now they run, exactly and node-count independently, and the statistics are right.
#[test]
fn a_timestamp_column_works_in_stats_sgd_and_kmeans() {
    let (mut table, _) = dataset::synthetic(2000, 3, SyntheticKind::Logistic, 11);
    for (i, row) in table.x.chunks_exact_mut(3).enumerate() {
        row[0] = 1.7e12 + (i as f32) * 6.0e4;
    }
    let stats = run_checked(
        "[job]\nkind = \"stats\"\ndataset = \"t\"\n[train]\nbins = 4",
        &table,
    );
    let rows = rows_with_labels(&table);
    let reference = Stats::from_rows(4, rows.iter().map(Vec::as_slice));
    let col = &stats["columns"][0];
    let mean = col["mean"].as_f64().unwrap();
    assert!(
        (mean - reference.columns[0].mean).abs() / mean < 1e-12,
        "{col}"
    );
    let var = col["variance"].as_f64().unwrap();
    let want = reference.columns[0].variance();
    assert!((var - want).abs() / want < 1e-6, "{var} vs {want}");

    let sgd = run_checked(LOGISTIC_SGD, &table);
    assert!(sgd["loss"].as_f64().is_some_and(f64::is_finite), "{sgd}");
    let km = run_checked(
        "[job]\nkind = \"kmeans\"\ndataset = \"t\"\n[model]\nk = 3",
        &table,
    );
    assert_eq!(km["format"], "tidepool-kmeans/1");
}

/// The mean over columns of the population variance.
fn mean_variance(points: &DMatrix<f32>) -> f64 {
    let n = points.nrows() as f64;
    let d = points.ncols();
    (0..d)
        .map(|j| {
            let col = points.column(j);
            let mean = col.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            (col.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n - mean * mean).max(0.0)
        })
        .sum::<f64>()
        / d as f64
}

/// `k` blobs in `d` dimensions (centres uniform in [-10, 10]^d, unit normal noise, 200 points
/// each), the shape scikit-learn's `make_blobs` gives.
fn many_blobs(k: usize, d: usize, seed: u64) -> Table {
    let mut rng = Rng::for_task(seed, 1, 0);
    let centres: Vec<f64> = (0..k * d)
        .map(|_| rng.uniform_f64() * 20.0 - 10.0)
        .collect();
    let rows = 200 * k;
    let mut x = Vec::with_capacity(rows * d);
    for i in 0..rows {
        let c = i % k;
        x.extend((0..d).map(|j| (centres[c * d + j] + normal(&mut rng)) as f32));
    }
    Table {
        features: (0..d).map(|j| format!("x{j}")).collect(),
        label: "cluster".into(),
        rows,
        y: (0..rows).map(|i| (i % k) as f32).collect(),
        x,
    }
}

/// Share of 30 seeds whose inertia is within 1% of the best of them.
fn within_one_percent(table: &Table, train: &str) -> f64 {
    let sharded = Sharded::new(table);
    let shards = sharded.data();
    let inertias: Vec<f64> = (0..30)
        .map(|seed| {
            let spec = format!(
                "[job]\nkind = \"kmeans\"\ndataset = \"t\"\n[model]\nk = 12\n\
                 [train]\nmax_iter = 50\nseed = {seed}\n{train}"
            );
            let result = run_local(job(&spec, table), &shards).unwrap();
            result["inertia"].as_f64().unwrap()
        })
        .collect();
    let best = inertias.iter().copied().fold(f64::INFINITY, f64::min);
    inertias.iter().filter(|&&i| i <= best * 1.01).count() as f64 / 30.0
}

#[test]
fn greedy_seeding_and_restarts_find_the_best_inertia() {
    let table = many_blobs(12, 8, 5);
    let plain = within_one_percent(&table, "init_candidates = 1");
    let greedy = within_one_percent(&table, "");
    let restarts = within_one_percent(&table, "n_init = 3");
    eprintln!("within 1% of the best of 30 seeds: k-means++ {plain}, greedy {greedy}, greedy x3 {restarts}");
    // The issue's bar: within 1% of the best in at least 90% of 30 seeds, by default.
    assert!(
        greedy >= 0.9 && greedy >= plain,
        "greedy {greedy}, plain {plain}"
    );
    assert!(restarts >= greedy, "n_init = 3: {restarts}");
}

#[test]
fn kmeans_runs_are_identical_however_the_shards_are_grouped() {
    let table = many_blobs(5, 4, 9);
    let spec = "[job]\nkind = \"kmeans\"\ndataset = \"t\"\n[model]\nk = 5\n\
                [train]\nmax_iter = 30\nseed = 2\nn_init = 3";
    let result = run_checked(spec, &table);
    assert_eq!(result["n_init"], 3);
    let runs: Vec<f64> = serde_json::from_value(result["run_inertias"].clone()).unwrap();
    let best = runs.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(result["inertia"].as_f64().unwrap(), best);
    assert_resumes_exactly(spec, &table, &result, false);
}

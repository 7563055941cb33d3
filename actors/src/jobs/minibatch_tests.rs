//! Sparse rows against the same rows stored dense: the loss and gradient of a minibatch, the
//! column statistics, and whole training jobs (dense vs sparse give the same model).

use std::sync::Arc;

use nalgebra::DMatrix;
use serde_json::Value;
use tidepool_runtime::csr::SparsePartition;
use tidepool_runtime::jobspec::JobSpec;

use super::super::colstats::{self, FirstPass};
use super::super::job::{Job, JobError, ShardData, Task};
use super::super::kmeans_job::KMeansJob;
use super::super::model_file::ModelFile;
use super::super::models::{accuracy, loss_and_grad, predict, ModelError, ModelKind, Standardizer};
use super::super::registry::run_local;
use super::super::rng::Rng;
use super::super::sgd::minibatch_indices;
use super::super::stats_job::StatsJob;
use super::super::train::{DatasetShape, TrainJob};
use super::loss_and_grad_rows;

/// Columns no row stores anything in.
const EMPTY_COLUMNS: [usize; 3] = [3, 17, 41];

/// A non-zero multiple of 1/8 in `[-8, 8]`: exact in `f32`, and so is `(v - m) / s` for the
/// means (multiples of 1/4 up to 2) and deviations (powers of 2) of [`random_standardizer`].
fn eighths(rng: &mut Rng) -> f32 {
    let k = rng.below(64) as f32 + 1.0;
    if rng.below(2) == 0 {
        k / 8.0
    } else {
        -k / 8.0
    }
}

/// Rows of `columns` features, about 10% stored, column 0 stored in every non-empty row
/// (values in [1, 9], so its minimum is no implicit 0), the [`EMPTY_COLUMNS`] never, every
/// 13th row empty; labels from `label(row's columns, values, rng)`.
fn random_rows(
    rng: &mut Rng,
    rows: usize,
    columns: usize,
    mut label: impl FnMut(&[u32], &[f32], &mut Rng) -> f32,
) -> Vec<(Vec<u32>, Vec<f32>, f32)> {
    (0..rows)
        .map(|i| {
            let (mut cols, mut vals) = (Vec::new(), Vec::new());
            if i % 13 != 5 {
                for j in 0..columns {
                    let stored = if j == 0 {
                        true
                    } else {
                        !EMPTY_COLUMNS.contains(&j) && rng.below(10) == 0
                    };
                    if stored {
                        cols.push(j as u32);
                        vals.push(if j == 0 {
                            1.0 + (rng.below(64) as f32) / 8.0
                        } else {
                            eighths(rng)
                        });
                    }
                }
            }
            let y = label(&cols, &vals, rng);
            (cols, vals, y)
        })
        .collect()
}

/// The same rows as a sparse partition and as dense row-major values.
fn both(columns: usize, rows: &[(Vec<u32>, Vec<f32>, f32)]) -> (SparsePartition, Vec<f32>) {
    let mut part = SparsePartition::new(columns);
    let mut dense = vec![0.0f32; rows.len() * columns];
    for (i, (cols, vals, y)) in rows.iter().enumerate() {
        part.push(i as u64, *y, cols, vals).unwrap();
        for (&j, &v) in cols.iter().zip(vals) {
            dense[i * columns + j as usize] = v;
        }
    }
    (part, dense)
}

fn sparse_shard<'a>(shard: u32, part: &'a SparsePartition) -> ShardData<'a> {
    ShardData {
        shard,
        features: part.columns(),
        x: &[],
        y: part.labels(),
        csr: Some(part.csr()),
    }
}

fn dense_shard<'a>(shard: u32, part: &'a SparsePartition, x: &'a [f32]) -> ShardData<'a> {
    ShardData {
        shard,
        features: part.columns(),
        x,
        y: part.labels(),
        csr: None,
    }
}

/// Means: non-zero multiples of 1/4 in [-2, 2]; deviations: powers of 2 from 1/4 to 4.
fn random_standardizer(rng: &mut Rng, d: usize) -> Standardizer {
    Standardizer {
        mean: (0..d)
            .map(|_| {
                let k = rng.below(8) as f64 + 1.0;
                if rng.below(2) == 0 {
                    k / 4.0
                } else {
                    -k / 4.0
                }
            })
            .collect(),
        std: (0..d).map(|_| 2f64.powi(rng.below(5) as i32 - 2)).collect(),
    }
}

fn identity(d: usize) -> Standardizer {
    Standardizer {
        mean: vec![0.0; d],
        std: vec![1.0; d],
    }
}

/// Labels valid for `kind`, random.
fn random_label(kind: ModelKind, rng: &mut Rng) -> f32 {
    match kind {
        ModelKind::Linear => eighths(rng) * 3.0,
        ModelKind::Logistic => rng.below(2) as f32,
        ModelKind::Softmax { classes } => rng.below(classes as u64) as f32,
    }
}

/// `|a - b| <= tol * scale` for every pair; `scale` at least 1e-300 so all-zero matrices match.
fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().chain(b).fold(1e-300f64, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

/// The sparse loss and gradient equal the dense ones on the standardised minibatch. The
/// standardised values are exact in `f32` (see [`eighths`]), so the dense path's rounding of
/// them to `f32` changes nothing and only the summation order differs: 1e-9 relative (to the
/// largest gradient entry) is loose for that and far below any real error.
#[test]
fn sparse_loss_and_gradient_match_dense() {
    let (rows, d) = (200, 50);
    for (n, kind) in [
        ModelKind::Linear,
        ModelKind::Logistic,
        ModelKind::Softmax { classes: 3 },
    ]
    .into_iter()
    .enumerate()
    {
        for standardized in [false, true] {
            let mut rng = Rng::for_task(11, n as u64, u32::from(standardized));
            let data = random_rows(&mut rng, rows, d, |_, _, rng| random_label(kind, rng));
            let (part, dense) = both(d, &data);
            assert!(part.nnz() > rows * d / 20 && part.nnz() < rows * d / 5);
            let std = if standardized {
                random_standardizer(&mut rng, d)
            } else {
                identity(d)
            };
            let k = kind.outputs();
            let params = DMatrix::from_fn(d + 1, k, |_, _| rng.uniform_f64() * 2.0 - 1.0);
            // A minibatch with a row twice and an empty row.
            let mut idx = minibatch_indices(5, 3, 0, rows, 64);
            idx.push(idx[0]);
            idx.push(5);

            let sparse =
                loss_and_grad_rows(kind, &params, &std, &part.csr(), part.labels(), &idx).unwrap();
            let x = DMatrix::from_fn(idx.len(), d, |r, c| {
                let v = (f64::from(dense[idx[r] * d + c]) - std.mean[c]) / std.std[c];
                assert_eq!(f64::from(v as f32), v, "standardised value exact in f32");
                v as f32
            });
            let y: Vec<f32> = idx.iter().map(|&i| part.labels()[i]).collect();
            let want = loss_and_grad(kind, &params, &x, &y).unwrap();

            let what = format!("{kind:?} standardized={standardized}");
            assert_eq!(sparse.count, want.count, "{what}");
            assert_eq!(sparse.grad_sum.shape(), want.grad_sum.shape(), "{what}");
            assert_close(
                &format!("{what} loss"),
                &[sparse.loss_sum],
                &[want.loss_sum],
                1e-9,
            );
            assert_close(
                &format!("{what} gradient"),
                sparse.grad_sum.as_slice(),
                want.grad_sum.as_slice(),
                1e-9,
            );
            for j in EMPTY_COLUMNS {
                // An empty column's gradient is -m_j R_c / s_j (0 unstandardised), exactly.
                for c in 0..k {
                    let r = sparse.grad_sum[(d, c)];
                    let want = if standardized {
                        -std.mean[j] * r / std.std[j]
                    } else {
                        0.0
                    };
                    assert_eq!(sparse.grad_sum[(j, c)], want, "{what}: column {j}");
                }
            }
        }
    }
}

#[test]
fn sparse_loss_of_an_empty_minibatch_is_zero() {
    let mut rng = Rng::from_seed(2);
    let data = random_rows(&mut rng, 20, 10, |_, _, _| 1.0);
    let (part, _) = both(10, &data);
    let kind = ModelKind::Softmax { classes: 3 };
    let params = DMatrix::from_element(11, 3, 0.5);
    let lg = loss_and_grad_rows(
        kind,
        &params,
        &identity(10),
        &part.csr(),
        part.labels(),
        &[],
    )
    .unwrap();
    assert_eq!((lg.loss_sum, lg.count), (0.0, 0));
    assert!(lg.grad_sum.iter().all(|&g| g == 0.0));
}

#[test]
fn sparse_loss_refuses_bad_input() {
    let mut rng = Rng::from_seed(3);
    let data = random_rows(&mut rng, 20, 10, |_, _, rng| rng.below(2) as f32);
    let (part, _) = both(10, &data);
    let (csr, y) = (part.csr(), part.labels());
    let kind = ModelKind::Logistic;
    let params = DMatrix::zeros(11, 1);
    let std = identity(10);
    let err = loss_and_grad_rows(kind, &DMatrix::zeros(10, 1), &std, &csr, y, &[0]);
    assert!(matches!(
        err,
        Err(ModelError::ParamShape { want_rows: 11, .. })
    ));
    // No means and no deviations at all is the identity, not a shape error.
    let none = Standardizer {
        mean: Vec::new(),
        std: Vec::new(),
    };
    let weights = DMatrix::from_fn(11, 1, |r, _| r as f64 * 0.1 - 0.4);
    assert_eq!(
        loss_and_grad_rows(kind, &weights, &none, &csr, y, &[0, 3, 5]).unwrap(),
        loss_and_grad_rows(kind, &weights, &std, &csr, y, &[0, 3, 5]).unwrap()
    );
    let short = identity(9);
    let err = loss_and_grad_rows(kind, &params, &short, &csr, y, &[0]);
    assert!(matches!(
        err,
        Err(ModelError::StandardizerShape { features: 10, .. })
    ));
    let err = loss_and_grad_rows(kind, &params, &std, &csr, &y[1..], &[0]);
    assert!(matches!(err, Err(ModelError::LabelCount { .. })));
    let err = loss_and_grad_rows(kind, &params, &std, &csr, y, &[0, 20]);
    assert!(matches!(
        err,
        Err(ModelError::RowOutOfRange {
            index: 20,
            rows: 20
        })
    ));
    let mut labels = y.to_vec();
    labels[7] = 2.0;
    let err = loss_and_grad_rows(kind, &params, &std, &csr, &labels, &[3, 7]);
    assert!(matches!(err, Err(ModelError::BadLabel { row: 1, .. })));
    let softmax = ModelKind::Softmax { classes: 2 };
    let err = loss_and_grad_rows(softmax, &DMatrix::zeros(11, 2), &std, &csr, &labels, &[7]);
    assert!(matches!(err, Err(ModelError::BadLabel { row: 0, .. })));
}

/// Column statistics of sparse rows equal the dense ones: pass 1 exactly (the stored values
/// are summed in the same row order; the dense pass only adds zeros between them), pass 2 to
/// rounding (the implicit zeros' squares are added as one product).
#[test]
fn sparse_column_statistics_match_dense() {
    let d = 50;
    let mut rng = Rng::from_seed(9);
    let data = random_rows(&mut rng, 300, d, |_, _, rng| {
        random_label(ModelKind::Linear, rng)
    });
    // Two shards, one of them with a column stored in every row but the empty ones.
    let (a, b) = data.split_at(130);
    for (shard, rows) in [a, b].into_iter().enumerate() {
        let (part, dense) = both(d, rows);
        let sparse = sparse_shard(shard as u32, &part);
        let dense = dense_shard(shard as u32, &part, &dense);
        let sums = colstats::map_sums(&sparse).unwrap();
        assert_eq!(sums, colstats::map_sums(&dense).unwrap());
        assert!(sums.min[0] >= 0.0 && sums.max[0] > 1.0);
        for j in EMPTY_COLUMNS {
            assert_eq!((sums.sum[j], sums.min[j], sums.max[j]), (0.0, 0.0, 0.0));
        }

        let first = FirstPass::reduce(&sums).unwrap();
        let broadcast = colstats::squares_broadcast(&first, 0);
        let sq = colstats::map_squares(&sparse, &broadcast).unwrap();
        let want = colstats::map_squares(&dense, &broadcast).unwrap();
        assert_eq!((sq.rows, sq.sum.len()), (want.rows, want.sum.len()));
        for (c, (x, y)) in sq.sum.iter().zip(&want.sum).enumerate() {
            assert!(
                (x - y).abs() <= 1e-12 * y.abs().max(1e-300),
                "column {c}: {x} vs {y}"
            );
        }
        // The label column is computed the same way on both.
        assert_eq!(sq.sum[d], want.sum[d]);

        // Histograms need dense rows.
        let with_bins = colstats::squares_broadcast(&first, 4);
        match colstats::map_squares(&sparse, &with_bins) {
            Err(JobError::Data(m)) => assert!(m.contains("needs dense rows"), "{m}"),
            other => panic!("histograms on sparse rows: {other:?}"),
        }
    }
}

#[test]
fn an_empty_sparse_shard_has_neutral_statistics() {
    let part = SparsePartition::new(4);
    let sums = colstats::map_sums(&sparse_shard(0, &part)).unwrap();
    assert_eq!(
        sums,
        colstats::map_sums(&dense_shard(0, &part, &[])).unwrap()
    );
    assert_eq!(sums.rows, 0);
    assert!(sums.min.iter().all(|&m| m == f64::INFINITY));
}

#[test]
fn a_sparse_shard_that_does_not_fit_its_labels_is_refused() {
    let mut rng = Rng::from_seed(4);
    let data = random_rows(&mut rng, 10, 6, |_, _, _| 0.0);
    let (part, _) = both(6, &data);
    let mut shard = sparse_shard(0, &part);
    shard.y = &part.labels()[1..];
    assert!(matches!(colstats::map_sums(&shard), Err(JobError::Data(_))));
    let mut shard = sparse_shard(0, &part);
    shard.features = 7;
    assert!(matches!(colstats::map_sums(&shard), Err(JobError::Data(_))));
}

#[test]
fn stats_and_kmeans_refuse_sparse_rows() {
    let mut rng = Rng::from_seed(5);
    let data = random_rows(&mut rng, 10, 6, |_, _, _| 0.0);
    let (part, _) = both(6, &data);
    let shard = sparse_shard(0, &part);
    let names: Vec<String> = (0..6).map(|j| format!("f{j}")).collect();
    let stats = StatsJob::new(&names, "y", 10);
    let task = stats.next_task(&stats.init()).unwrap();
    match stats.map(0, &task, &shard) {
        Err(JobError::Data(m)) => assert_eq!(m, colstats::SPARSE_HISTOGRAMS),
        other => panic!("stats on sparse rows: {other:?}"),
    }
    let spec = JobSpec::parse(
        r#"
        [job]
        kind = "kmeans"
        dataset = "t"
        [model]
        k = 2
        "#,
    )
    .unwrap();
    let kmeans = KMeansJob::new(spec, 6, 1);
    let task = Task {
        phase: 0,
        broadcast: Vec::new(),
    };
    match kmeans.map(0, &task, &shard) {
        Err(JobError::Data(m)) => assert!(m.contains("k-means needs dense rows"), "{m}"),
        other => panic!("k-means on sparse rows: {other:?}"),
    }
}

/// Training data in 4 shards of different sizes, sparse and dense.
struct Shards {
    parts: Vec<SparsePartition>,
    dense: Vec<Vec<f32>>,
    features: Vec<String>,
    rows: u64,
}

impl Shards {
    fn new(d: usize, data: &[(Vec<u32>, Vec<f32>, f32)]) -> Self {
        let mut parts = Vec::new();
        let mut dense = Vec::new();
        let mut rest = data;
        for n in [150, 300, 90] {
            let (head, tail) = rest.split_at(n);
            let (p, x) = both(d, head);
            parts.push(p);
            dense.push(x);
            rest = tail;
        }
        let (p, x) = both(d, rest);
        parts.push(p);
        dense.push(x);
        Shards {
            parts,
            dense,
            features: (0..d).map(|j| format!("f{j}")).collect(),
            rows: data.len() as u64,
        }
    }

    fn data(&self, sparse: bool) -> Vec<ShardData<'_>> {
        self.parts
            .iter()
            .zip(&self.dense)
            .enumerate()
            .map(|(s, (p, x))| {
                if sparse {
                    sparse_shard(s as u32, p)
                } else {
                    dense_shard(s as u32, p, x)
                }
            })
            .collect()
    }

    /// Runs the training job `spec` on the shards.
    fn train(&self, spec: &str, sparse: bool) -> Value {
        let shape = DatasetShape {
            features: self.features.clone(),
            label: "y".into(),
            rows: self.rows,
        };
        let job = TrainJob::new("job-1", JobSpec::parse(spec).unwrap(), shape).unwrap();
        run_local(Arc::new(job), &self.data(sparse)).unwrap()
    }

    /// Accuracy of a result's model on the (dense) rows.
    fn accuracy(&self, result: &Value) -> f64 {
        let file = ModelFile::from_json(&serde_json::to_vec(result).unwrap()).unwrap();
        let kind = file.model_kind().unwrap();
        let params = file.params_matrix().unwrap();
        let d = self.features.len();
        let (mut pred, mut y) = (Vec::new(), Vec::new());
        for (p, x) in self.parts.iter().zip(&self.dense) {
            let x = DMatrix::from_row_slice(p.rows(), d, x);
            pred.extend(predict(kind, &params, &x).unwrap());
            y.extend_from_slice(p.labels());
        }
        accuracy(&pred, &y)
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Dense and sparse runs of `spec` give the same model: standardised parameters to 1e-6
/// relative to the largest (the dense path rounds standardised values to `f32`, about 6e-8
/// relative, and the training steps carry that along: about 1e-8 seen), or 1e-12
/// unstandardised (only the summation order differs: about 5e-16 seen); the same accuracy,
/// and a model that learnt something.
fn assert_same_model(shards: &Shards, spec: &str, min_accuracy: f64) {
    for standardize in [false, true] {
        let spec = format!("{spec}\nstandardize = {standardize}\n");
        let dense = shards.train(&spec, false);
        let sparse = shards.train(&spec, true);
        let what = format!("standardize = {standardize}");
        let tol = if standardize { 1e-6 } else { 1e-12 };
        assert_close(
            &format!("{what}: standardized params"),
            &floats(&sparse["standardized_params"]),
            &floats(&dense["standardized_params"]),
            tol,
        );
        let (acc_dense, acc_sparse) = (shards.accuracy(&dense), shards.accuracy(&sparse));
        assert_eq!(acc_sparse, acc_dense, "{what}: accuracy");
        assert!(acc_sparse >= min_accuracy, "{what}: accuracy {acc_sparse}");
        let (ld, ls) = (floats(&dense["losses"][0]), floats(&sparse["losses"][0]));
        assert_close(&format!("{what}: first loss"), &ls, &ld, tol);
    }
}

/// Labels from a linear score of the sparse features.
fn scored_rows(rng: &mut Rng, d: usize, classes: usize) -> Vec<(Vec<u32>, Vec<f32>, f32)> {
    // Column 0 (stored in almost every row, positive) left out of the score, so the classes
    // come out about balanced.
    let truth: Vec<Vec<f64>> = (0..classes)
        .map(|_| {
            (0..d)
                .map(|j| {
                    let w = rng.uniform_f64() * 4.0 - 2.0;
                    if j == 0 {
                        0.0
                    } else {
                        w
                    }
                })
                .collect()
        })
        .collect();
    let mut label = |cols: &[u32], vals: &[f32], _: &mut Rng| {
        let scores: Vec<f64> = truth
            .iter()
            .map(|w| {
                cols.iter()
                    .zip(vals)
                    .map(|(&j, &v)| w[j as usize] * f64::from(v))
                    .sum::<f64>()
            })
            .collect();
        if classes == 1 {
            f32::from(u8::from(scores[0] > 0.0))
        } else {
            (0..classes)
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
                .unwrap() as f32
        }
    };
    random_rows(rng, 700, d, &mut label)
}

#[test]
fn sgd_logistic_trains_the_same_model_on_sparse_rows() {
    let mut rng = Rng::from_seed(21);
    let shards = Shards::new(50, &scored_rows(&mut rng, 50, 1));
    let spec = r#"
        [job]
        kind = "sgd"
        dataset = "t"
        [model]
        type = "logistic"
        [train]
        epochs = 4
        batch_size = 64
        learning_rate = 0.5
        l2 = 0.001
        seed = 7"#;
    assert_same_model(&shards, spec, 0.9);
}

#[test]
fn local_sgd_logistic_trains_the_same_model_on_sparse_rows() {
    let mut rng = Rng::from_seed(22);
    let shards = Shards::new(50, &scored_rows(&mut rng, 50, 1));
    let spec = r#"
        [job]
        kind = "local_sgd"
        dataset = "t"
        [model]
        type = "logistic"
        [train]
        epochs = 4
        batch_size = 64
        learning_rate = 0.5
        local_steps = 4
        seed = 3"#;
    assert_same_model(&shards, spec, 0.9);
}

#[test]
fn sgd_softmax_trains_the_same_model_on_sparse_rows() {
    let mut rng = Rng::from_seed(23);
    let shards = Shards::new(50, &scored_rows(&mut rng, 50, 3));
    let spec = r#"
        [job]
        kind = "sgd"
        dataset = "t"
        [model]
        type = "softmax"
        [train]
        epochs = 4
        batch_size = 64
        learning_rate = 0.5
        seed = 1"#;
    assert_same_model(&shards, spec, 0.8);
}

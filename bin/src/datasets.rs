//! Built-in real datasets (from the `smartcore` crate, compiled into the binary), a seeded
//! train/test split, CSV export that `dataset import` reads back bit-exactly, and a reference
//! accuracy from smartcore's own logistic regression to compare Tidepool's trained models with.
//!
//! `tidepool dataset builtin NAME --out DIR` ([`crate::predict::builtin_main`]) is the CLI face of
//! this module.

use std::path::Path;

use anyhow::{bail, ensure, Context};
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linear::logistic_regression::{LogisticRegression, LogisticRegressionParameters};
use tidepool_actors::jobs::models::Standardizer;
use tidepool_actors::jobs::rng::Rng;
use tidepool_actors::jobs::stats::Stats;
use tidepool_runtime::dataset::Table;

/// Names accepted by [`builtin`].
pub const BUILTIN: &[&str] = &["breast_cancer", "digits"];

/// The label column name of every built-in dataset.
pub const LABEL: &str = "target";

/// A built-in dataset as a [`Table`] with label column [`LABEL`]:
///
/// - `breast_cancer`: Wisconsin diagnostic breast cancer, 569 rows x 30 features (smartcore's
///   feature names, e.g. `mean radius`), labels 0/1.
/// - `digits`: 8x8 handwritten digits, 1797 rows x 64 features `x0..x63` (pixel intensities
///   0..16, row-major), labels 0..9.
pub fn builtin(name: &str) -> anyhow::Result<Table> {
    let (data, target, rows, cols, names): (Vec<f32>, Vec<f32>, usize, usize, Vec<String>) =
        match name {
            "breast_cancer" => {
                let ds = smartcore::dataset::breast_cancer::load_dataset();
                let target = ds.target.iter().map(|&t| t as f32).collect();
                (
                    ds.data,
                    target,
                    ds.num_samples,
                    ds.num_features,
                    ds.feature_names,
                )
            }
            "digits" => {
                let ds = smartcore::dataset::digits::load_dataset();
                (
                    ds.data,
                    ds.target,
                    ds.num_samples,
                    ds.num_features,
                    ds.feature_names,
                )
            }
            other => bail!(
                "unknown built-in dataset {other:?} (available: {})",
                BUILTIN.join(", ")
            ),
        };
    // smartcore's digits carries the iris feature names; use them only when they fit.
    let features = if names.len() == cols && !names.iter().any(|n| n == LABEL) {
        names
    } else {
        (0..cols).map(|j| format!("x{j}")).collect()
    };
    let table = Table {
        features,
        label: LABEL.to_owned(),
        rows,
        x: data,
        y: target,
    };
    table
        .check()
        .with_context(|| format!("built-in dataset {name}"))?;
    ensure!(
        table.x.iter().chain(&table.y).all(|v| v.is_finite()),
        "built-in dataset {name} has non-finite values"
    );
    Ok(table)
}

/// The rows of `table` at `indices`, in that order.
fn take_rows(table: &Table, indices: &[usize]) -> Table {
    let nf = table.features.len();
    let mut x = Vec::with_capacity(indices.len() * nf);
    let mut y = Vec::with_capacity(indices.len());
    for &i in indices {
        if let (Some(row), Some(&label)) = (table.row(i), table.y.get(i)) {
            x.extend_from_slice(row);
            y.push(label);
        }
    }
    Table {
        features: table.features.clone(),
        label: table.label.clone(),
        rows: y.len(),
        x,
        y,
    }
}

/// Splits `table` into `(train, test)`: the row indices are shuffled with
/// `Rng::from_seed(seed)` (Fisher-Yates), the first `round(rows * test_fraction)` go to the test
/// set and the rest to the training set; each part keeps the original row order. Same table and
/// seed, same split, on every platform. `test_fraction` is clamped to `[0, 1]` (NaN counts as 0).
pub fn split(table: &Table, test_fraction: f64, seed: u64) -> (Table, Table) {
    let rows = table.rows.min(table.y.len());
    let fraction = if test_fraction.is_nan() {
        0.0
    } else {
        test_fraction.clamp(0.0, 1.0)
    };
    let n_test = ((rows as f64 * fraction).round() as usize).min(rows);
    let mut order: Vec<usize> = (0..rows).collect();
    Rng::from_seed(seed).shuffle(&mut order);
    let (test_idx, train_idx) = order.split_at_mut(n_test);
    test_idx.sort_unstable();
    train_idx.sort_unstable();
    (take_rows(table, train_idx), take_rows(table, test_idx))
}

/// Writes `table` as CSV: a header of the feature names then the label name, then one line per
/// row. Values use `f32`'s `Display` (the shortest text that parses back to the same `f32`), so
/// `tidepool_runtime::dataset::parse_csv(file, &table.label)` returns an identical table.
pub fn write_csv(table: &Table, path: &Path) -> anyhow::Result<()> {
    table.check().context("table shape")?;
    let mut w = csv::Writer::from_path(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    w.write_record(table.features.iter().chain(std::iter::once(&table.label)))
        .with_context(|| format!("writing {}", path.display()))?;
    let mut record = Vec::with_capacity(table.features.len() + 1);
    for (i, &label) in table.y.iter().enumerate().take(table.rows) {
        let row = table.row(i).context("table shape")?;
        record.clear();
        record.extend(row.iter().map(f32::to_string));
        record.push(label.to_string());
        w.write_record(&record)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `table`'s features standardised with `standardizer`, as a row-major f64 smartcore matrix.
fn standardized_matrix(
    table: &Table,
    standardizer: &Standardizer,
) -> anyhow::Result<DenseMatrix<f64>> {
    let nf = table.features.len();
    let values: Vec<f64> = table
        .x
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let c = k % nf.max(1);
            (f64::from(v) - standardizer.mean[c]) / standardizer.std[c]
        })
        .collect();
    DenseMatrix::new(table.rows, nf, values, false).context("building the feature matrix")
}

/// Class labels as `u32`; refuses labels that are not non-negative integers.
fn class_labels(table: &Table) -> anyhow::Result<Vec<u32>> {
    table
        .y
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            ensure!(
                v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f32,
                "row {i}: label {v} is not a class index"
            );
            Ok(v as u32)
        })
        .collect()
}

/// Test-set accuracy of smartcore's `LogisticRegression` (default parameters: L-BFGS, no
/// regularisation; binary for two classes, multinomial for more) fitted on `train`.
///
/// Features are first standardised with the **training** set's column means and population
/// standard deviations (constant columns get std 1), exactly as Tidepool's jobs do
/// ([`Standardizer::from_stats`]), and the same transform is applied to `test`. Labels must be
/// class indices (non-negative integers).
pub fn smartcore_logistic_accuracy(train: &Table, test: &Table) -> anyhow::Result<f64> {
    train.check().context("training table")?;
    test.check().context("test table")?;
    ensure!(
        train.features == test.features,
        "training and test tables have different feature columns"
    );
    ensure!(
        train.rows > 0 && test.rows > 0,
        "empty training or test table"
    );
    let nf = train.features.len();
    ensure!(nf > 0, "no feature columns");
    let stats = Stats::from_rows(nf, train.x.chunks_exact(nf));
    let standardizer = Standardizer::from_stats(&stats);
    let x_train = standardized_matrix(train, &standardizer)?;
    let x_test = standardized_matrix(test, &standardizer)?;
    let y_train = class_labels(train)?;
    let y_test = class_labels(test)?;
    let model =
        LogisticRegression::fit(&x_train, &y_train, LogisticRegressionParameters::default())
            .context("smartcore logistic regression fit")?;
    let pred: Vec<u32> = model
        .predict(&x_test)
        .context("smartcore logistic regression predict")?;
    let hits = pred.iter().zip(&y_test).filter(|(p, t)| p == t).count();
    Ok(hits as f64 / y_test.len() as f64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::HashSet;
    use tidepool_runtime::dataset::parse_csv;

    #[test]
    fn builtin_sizes_and_labels() {
        let bc = builtin("breast_cancer").unwrap();
        assert_eq!((bc.rows, bc.features.len()), (569, 30));
        assert_eq!(bc.features[0], "mean radius");
        assert_eq!(bc.label, "target");
        assert!(bc.y.iter().all(|&v| v == 0.0 || v == 1.0));
        assert!(bc.y.contains(&0.0) && bc.y.contains(&1.0));

        let digits = builtin("digits").unwrap();
        assert_eq!((digits.rows, digits.features.len()), (1797, 64));
        assert_eq!(digits.features[63], "x63");
        let classes: HashSet<u32> = digits.y.iter().map(|&v| v as u32).collect();
        assert_eq!(classes, (0..10).collect::<HashSet<u32>>());
        assert!(digits.y.iter().all(|&v| v.fract() == 0.0));

        let err = builtin("iris2").unwrap_err().to_string();
        assert!(
            err.contains("breast_cancer") && err.contains("digits"),
            "{err}"
        );
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        // Tag every row with its index in a copy of the table so rows can be told apart.
        let mut table = builtin("breast_cancer").unwrap();
        let nf = table.features.len();
        for i in 0..table.rows {
            table.x[i * nf] = i as f32;
        }
        let (train, test) = split(&table, 0.2, 7);
        assert_eq!(test.rows, 114);
        assert_eq!(train.rows + test.rows, table.rows);
        train.check().unwrap();
        test.check().unwrap();
        let ids = |t: &Table| -> Vec<usize> { (0..t.rows).map(|i| t.x[i * nf] as usize).collect() };
        let (a, b) = (ids(&train), ids(&test));
        let all: HashSet<usize> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), table.rows, "disjoint and complete");
        assert!(a.windows(2).all(|w| w[0] < w[1]), "original order kept");
        for (part, idx) in [(&train, &a), (&test, &b)] {
            for (k, &i) in idx.iter().enumerate() {
                assert_eq!(part.row(k), table.row(i));
                assert_eq!(part.y[k], table.y[i]);
            }
        }
        assert_eq!(split(&table, 0.2, 7), (train.clone(), test.clone()));
        let (_, other) = split(&table, 0.2, 8);
        assert_ne!(other, test, "another seed, another split");
        assert_eq!(split(&table, 0.0, 7).1.rows, 0);
        assert_eq!(split(&table, 1.5, 7).0.rows, 0);
        assert_eq!(split(&table, f64::NAN, 7).0.rows, table.rows);
    }

    #[test]
    fn csv_round_trips_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for name in BUILTIN {
            let mut table = builtin(name).unwrap();
            // Awkward values too: tiny, huge, negative zero, many digits.
            table.x[0] = -0.0;
            table.x[1] = 1.0e-38;
            table.x[2] = 3.402_823e38;
            table.x[3] = 0.1 + 0.2;
            let path = dir.path().join(format!("{name}.csv"));
            write_csv(&table, &path).unwrap();
            let back = parse_csv(std::fs::File::open(&path).unwrap(), LABEL).unwrap();
            assert_eq!(back.features, table.features);
            assert_eq!(back.rows, table.rows);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back.x), bits(&table.x));
            assert_eq!(bits(&back.y), bits(&table.y));
        }
    }

    #[test]
    fn smartcore_reference_accuracy_breast_cancer() {
        let (train, test) = split(&builtin("breast_cancer").unwrap(), 0.2, 7);
        let acc = smartcore_logistic_accuracy(&train, &test).unwrap();
        eprintln!("smartcore logistic accuracy, breast_cancer, 0.2 / seed 7: {acc}");
        assert!(acc > 0.9, "accuracy {acc}");
    }

    #[test]
    fn smartcore_reference_accuracy_digits() {
        let (train, test) = split(&builtin("digits").unwrap(), 0.2, 7);
        let acc = smartcore_logistic_accuracy(&train, &test).unwrap();
        eprintln!("smartcore logistic accuracy, digits, 0.2 / seed 7: {acc}");
        assert!(acc > 0.9, "accuracy {acc}");
    }

    #[test]
    fn smartcore_refuses_bad_labels() {
        let (mut train, test) = split(&builtin("breast_cancer").unwrap(), 0.2, 7);
        train.y[3] = 0.5;
        let err = smartcore_logistic_accuracy(&train, &test).unwrap_err();
        assert!(err.to_string().contains("row 3"), "{err}");
    }
}

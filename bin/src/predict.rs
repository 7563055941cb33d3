//! `tidepool predict --model MODEL.json --data FILE.csv [--label COLUMN] [--json]` and
//! `tidepool dataset builtin NAME --out DIR [--test-fraction F] [--seed N]`.
//!
//! Prediction runs locally: it reads a model file written by `job result ID --out MODEL.json`
//! ([`ModelFile`]) and a CSV with a header row, picks the model's feature columns **by name** (in
//! any order; other columns are ignored and need not be numeric), and applies the model to the
//! raw values. With a label column (`--label`, or by default the model's own label column when
//! the CSV has it) it also reports accuracy (logistic, softmax) or RMSE (linear).
//!
//! `--json` prints the stable shape the README documents, `{"rows": 320, "accuracy": 0.95}` (or
//! `"rmse"`), plus `"predictions"`, one per row in file order.
//!
//! A matrix-factorisation model directory (`kind` `mf`) predicts from user and item ids
//! instead: [`crate::mf_predict`] (`{"rows", "rmse"}`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use nalgebra::DMatrix;
use serde::Serialize;
use tidepool_actors::jobs::model_file::ModelFile;
use tidepool_actors::jobs::models::{accuracy, predict, rmse, ModelKind};
use tidepool_runtime::dataset::MAX_CELLS;

use crate::datasets;

/// How many predictions the human output shows.
const SHOWN_PREDICTIONS: usize = 10;

/// The result of [`run_predict`]; serialises to the stable `predict --json` shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PredictReport {
    /// Data rows predicted.
    pub rows: usize,
    /// Fraction of correct predictions (logistic, softmax), when the data has labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Root mean squared error (linear), when the data has labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    /// One prediction per row, in file order: the value (linear), the class 0/1 (logistic) or
    /// the class index (softmax).
    pub predictions: Vec<f64>,
}

/// The columns read from a prediction CSV.
#[derive(Debug)]
struct PredictData {
    rows: usize,
    /// Row-major, in the model's feature order.
    x: Vec<f32>,
    /// Labels, when a label column was read.
    y: Option<Vec<f32>>,
}

/// Maps byte offsets of record starts to 1-based line numbers (the csv reader's own line count
/// does not count blank lines). Offsets must be queried in non-decreasing order.
#[derive(Debug)]
pub(crate) struct Lines<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: u64,
}

impl<'a> Lines<'a> {
    /// Line numbers of `bytes`, from line 1.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Lines {
            bytes,
            offset: 0,
            line: 1,
        }
    }

    fn at(&mut self, offset: u64) -> u64 {
        let mut target = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        // The reader reports a record after blank lines as starting at the first of them.
        while matches!(self.bytes.get(target), Some(b'\n' | b'\r')) {
            target += 1;
        }
        if target > self.offset {
            let passed = self
                .bytes
                .get(self.offset..target)
                .unwrap_or_default()
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            self.line += passed as u64;
            self.offset = target;
        }
        self.line
    }
}

/// Reads the next record; `None` at the end, else the line it starts on.
pub(crate) fn next_record(
    rdr: &mut csv::Reader<&[u8]>,
    record: &mut csv::ByteRecord,
    lines: &mut Lines<'_>,
) -> anyhow::Result<Option<u64>> {
    match rdr.read_byte_record(record) {
        Ok(false) => Ok(None),
        Ok(true) => Ok(Some(
            record.position().map_or(lines.line, |p| lines.at(p.byte())),
        )),
        Err(e) => {
            let line = e.position().map_or(lines.line, |p| lines.at(p.byte()));
            bail!("line {line}: {e}")
        }
    }
}

/// Parses one cell as a finite `f32`.
pub(crate) fn parse_value(field: &[u8], line: u64, column: &str) -> anyhow::Result<f32> {
    let text = String::from_utf8_lossy(field);
    let short: String = text.chars().take(48).collect();
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => {
            bail!("line {line}: column {column:?}: NaN or infinite values are refused: {short:?}")
        }
        Err(_) => bail!("line {line}: column {column:?}: not a number: {short:?}"),
    }
}

/// Reads the model's feature columns (by name) and, if `label` is given, the label column from
/// CSV `bytes`. Errors name the file's 1-based line.
fn read_columns(
    bytes: &[u8],
    features: &[String],
    label: Option<&str>,
) -> anyhow::Result<PredictData> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let mut lines = Lines::new(bytes);
    let mut record = csv::ByteRecord::new();
    let Some(header_line) = next_record(&mut rdr, &mut record, &mut lines)? else {
        bail!("line 1: empty file");
    };
    let mut columns: HashMap<&str, usize> = HashMap::with_capacity(record.len());
    let names: Vec<String> = record
        .iter()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let mut duplicates = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if columns.insert(name.as_str(), i).is_some() {
            duplicates.push(name.as_str());
        }
    }
    let find = |name: &str| -> anyhow::Result<usize> {
        ensure!(
            !duplicates.contains(&name),
            "line {header_line}: column {name:?} appears more than once in the header"
        );
        columns.get(name).copied().ok_or_else(|| {
            anyhow::anyhow!(
                "line {header_line}: the model's feature column {name:?} is not in the header"
            )
        })
    };
    let feature_idx = features
        .iter()
        .map(|f| find(f))
        .collect::<anyhow::Result<Vec<usize>>>()?;
    let label_idx = match label {
        None => None,
        Some(l) => {
            ensure!(
                !features.iter().any(|f| f == l),
                "label column {l:?} is one of the model's features"
            );
            Some(columns.get(l).copied().ok_or_else(|| {
                anyhow::anyhow!("line {header_line}: label column {l:?} is not in the header")
            })?)
        }
    };
    if let Some(l) = label {
        ensure!(
            !duplicates.contains(&l),
            "line {header_line}: column {l:?} appears more than once in the header"
        );
    }

    let width = names.len();
    let per_row = features.len() + usize::from(label.is_some());
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut rows = 0usize;
    while let Some(line) = next_record(&mut rdr, &mut record, &mut lines)? {
        ensure!(
            record.len() == width,
            "line {line}: ragged row: expected {width} fields, got {}",
            record.len()
        );
        ensure!(
            rows.saturating_add(1).saturating_mul(per_row) <= MAX_CELLS,
            "line {line}: too large: more than {MAX_CELLS} cells"
        );
        for (&i, name) in feature_idx.iter().zip(features) {
            x.push(parse_value(record.get(i).unwrap_or_default(), line, name)?);
        }
        if let (Some(i), Some(name)) = (label_idx, label) {
            y.push(parse_value(record.get(i).unwrap_or_default(), line, name)?);
        }
        rows += 1;
    }
    ensure!(
        rows > 0,
        "line {}: no data rows after the header",
        header_line + 1
    );
    Ok(PredictData {
        rows,
        x,
        y: label.map(|_| y),
    })
}

/// Applies the model in `model` to the CSV `data` and, with labels, scores it.
///
/// Feature columns are matched to the model's feature names by name, in any order; a missing one
/// is an error naming it. `label` names the label column; without it the model's own label column
/// is used when the CSV has one, and otherwise only predictions are made.
pub fn run_predict(
    model: &Path,
    data: &Path,
    label: Option<&str>,
) -> anyhow::Result<PredictReport> {
    let file = if model.is_dir() {
        crate::model_dir::read(model)?
    } else {
        let model_bytes =
            std::fs::read(model).with_context(|| format!("cannot read {}", model.display()))?;
        ModelFile::from_json(&model_bytes)
            .with_context(|| format!("{}: not a usable model file", model.display()))?
    };
    let kind = file.model_kind()?;
    let params = file.params_matrix()?;
    let csv_bytes =
        std::fs::read(data).with_context(|| format!("cannot read {}", data.display()))?;
    let label = match label {
        Some(l) => Some(l),
        None if has_column(&csv_bytes, &file.label) => Some(file.label.as_str()),
        None => None,
    };
    let table = read_columns(&csv_bytes, &file.features, label)
        .with_context(|| format!("{}", data.display()))?;
    let x = DMatrix::from_row_slice(table.rows, file.features.len(), &table.x);
    let predictions = predict(kind, &params, &x).context("applying the model")?;
    let (mut acc, mut err) = (None, None);
    if let Some(y) = &table.y {
        match kind {
            ModelKind::Linear => err = Some(rmse(&predictions, y)),
            ModelKind::Logistic | ModelKind::Softmax { .. } => {
                acc = Some(accuracy(&predictions, y));
            }
        }
    }
    Ok(PredictReport {
        rows: table.rows,
        accuracy: acc,
        rmse: err,
        predictions,
    })
}

/// Whether the CSV's header row has a column named `name` (false if it cannot be read; the real
/// parse reports why).
fn has_column(csv_bytes: &[u8], name: &str) -> bool {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(csv_bytes);
    let mut record = csv::ByteRecord::new();
    matches!(rdr.read_byte_record(&mut record), Ok(true))
        && record.iter().any(|f| f == name.as_bytes())
}

/// `tidepool predict`: runs [`run_predict`] and prints the report, as JSON with `json` (one line,
/// the stable shape) or for people (rows, accuracy or RMSE, the first few predictions).
pub fn predict_main(
    model: &Path,
    data: &Path,
    label: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    if crate::model_dir::is_mf(model) {
        return crate::mf_predict::predict_main(model, data, label, json);
    }
    let report = run_predict(model, data, label)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("rows:     {}", report.rows);
    if let Some(a) = report.accuracy {
        println!("accuracy: {a:.4}");
    }
    if let Some(e) = report.rmse {
        println!("rmse:     {e:.6}");
    }
    if report.accuracy.is_none() && report.rmse.is_none() {
        println!("(no label column: predictions only)");
    }
    let shown: Vec<String> = report
        .predictions
        .iter()
        .take(SHOWN_PREDICTIONS)
        .map(|p| {
            if p.fract() == 0.0 {
                format!("{p}")
            } else {
                format!("{p:.4}")
            }
        })
        .collect();
    let more = if report.rows > shown.len() {
        " ..."
    } else {
        ""
    };
    println!(
        "predictions (first {} of {}): {}{more}",
        shown.len(),
        report.rows,
        shown.join(" ")
    );
    Ok(())
}

/// Writes built-in dataset `name` split into `out/train.csv` and `out/test.csv` and returns
/// their paths. `test_fraction` must be in `(0, 1)` and leave both parts non-empty.
pub fn write_builtin(
    name: &str,
    out: &Path,
    test_fraction: f64,
    seed: u64,
) -> anyhow::Result<(PathBuf, PathBuf, usize, usize)> {
    ensure!(
        test_fraction > 0.0 && test_fraction < 1.0,
        "--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}"
    );
    let table = datasets::builtin(name)?;
    let (train, test) = datasets::split(&table, test_fraction, seed);
    ensure!(
        train.rows > 0 && test.rows > 0,
        "--test-fraction {test_fraction} leaves the training or test set empty ({} rows)",
        table.rows
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let train_path = out.join("train.csv");
    let test_path = out.join("test.csv");
    datasets::write_csv(&train, &train_path)?;
    datasets::write_csv(&test, &test_path)?;
    Ok((train_path, test_path, train.rows, test.rows))
}

/// `tidepool dataset builtin NAME --out DIR`: [`write_builtin`], then prints the two paths.
pub fn builtin_main(
    name: &str,
    out: &Path,
    test_fraction: f64,
    seed: u64,
    json: bool,
) -> anyhow::Result<()> {
    let (train, test, n_train, n_test) = write_builtin(name, out, test_fraction, seed)?;
    if json {
        let doc = serde_json::json!({
            "train": train, "test": test, "train_rows": n_train, "test_rows": n_test,
        });
        println!("{doc}");
        return Ok(());
    }
    println!("{}", train.display());
    println!("{}", test.display());
    eprintln!(
        "{name}: {n_train} training rows, {n_test} test rows (seed {seed}); label column {:?}",
        datasets::LABEL
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tidepool_actors::jobs::models::Standardizer;
    use tidepool_actors::jobs::stats::Stats;

    /// A logistic model for `y = 1 iff 2*a - b > 1`, features named `a`, `b`.
    fn write_model(dir: &Path) -> PathBuf {
        let params = DMatrix::from_row_slice(3, 1, &[2.0, -1.0, -1.0]);
        let file = ModelFile::new(
            ModelKind::Logistic,
            vec!["a".into(), "b".into()],
            "y".into(),
            &params,
            "job-7".into(),
            40,
            0.2,
        );
        let path = dir.join("model.json");
        std::fs::write(&path, file.to_json_pretty().unwrap()).unwrap();
        path
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn logistic_model_on_csv_with_columns_in_another_order() {
        let dir = tempfile::tempdir().unwrap();
        let model = write_model(dir.path());
        // Columns reordered, an extra non-numeric id column, a blank line; the last row's
        // label is wrong on purpose (3 of 4 right).
        let data = write(
            dir.path(),
            "data.csv",
            "id,b,y,a\nr1,0,1,1\nr2,2,0,1\n\nr3,0.5,1,2\nr4,-1,0,3\n",
        );
        let report = run_predict(&model, &data, Some("y")).unwrap();
        assert_eq!(report.rows, 4);
        assert_eq!(report.predictions, vec![1.0, 0.0, 1.0, 1.0]);
        assert_eq!(report.accuracy, Some(0.75));
        assert_eq!(report.rmse, None);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"rows": 4, "accuracy": 0.75, "predictions": [1.0, 0.0, 1.0, 1.0]})
        );
        // Without --label, the model's label column is used when present...
        assert_eq!(run_predict(&model, &data, None).unwrap(), report);
        // ...and without one, only predictions are made.
        let features_only = write(dir.path(), "x.csv", "a,b\n1,0\n1,2\n");
        let report = run_predict(&model, &features_only, None).unwrap();
        assert_eq!((report.rows, report.accuracy), (2, None));
        assert_eq!(
            serde_json::to_value(&report).unwrap(),
            serde_json::json!({"rows": 2, "predictions": [1.0, 0.0]})
        );
    }

    #[test]
    fn linear_model_reports_rmse() {
        let dir = tempfile::tempdir().unwrap();
        let params = DMatrix::from_row_slice(2, 1, &[2.0, 1.0]);
        let file = ModelFile::new(
            ModelKind::Linear,
            vec!["x".into()],
            "t".into(),
            &params,
            "j".into(),
            1,
            0.0,
        );
        let model = write(dir.path(), "m.json", &file.to_json_pretty().unwrap());
        let data = write(dir.path(), "d.csv", "x,t\n0,1\n1,5\n");
        let report = run_predict(&model, &data, None).unwrap();
        assert_eq!(report.predictions, vec![1.0, 3.0]);
        assert_eq!(report.accuracy, None);
        assert!((report.rmse.unwrap() - 2.0f64.sqrt()).abs() < 1e-12);
        let json = serde_json::to_value(&report).unwrap();
        assert!(json.get("rmse").is_some() && json.get("accuracy").is_none());
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let model = write_model(dir.path());
        let cases = [
            ("a,y\n1,1\n", None, "\"b\""),
            ("a,b,y\n1,2,1\n", Some("label"), "label column \"label\""),
            (
                "a,b\n1,2\n3,x\n",
                None,
                "line 3: column \"b\": not a number",
            ),
            ("a,b\n1,2\n\n\n3,4,5\n", None, "line 5: ragged row"),
            ("a,b\n1,2\n3,NaN\n", None, "line 3: column \"b\": NaN"),
            ("a,b\n", None, "line 2: no data rows"),
            ("", None, "empty file"),
            ("a,b,b\n1,2,3\n", None, "\"b\" appears more than once"),
            ("a,b\n1,2\n", Some("a"), "is one of the model's features"),
        ];
        for (text, label, want) in cases {
            let data = write(dir.path(), "bad.csv", text);
            let err = format!("{:#}", run_predict(&model, &data, label).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let data = write(dir.path(), "ok.csv", "a,b\n1,2\n");
        let junk = write(dir.path(), "junk.json", "{\"format\": \"nope\"}");
        assert!(run_predict(&junk, &data, None).is_err());
        let missing = dir.path().join("absent.json");
        let err = format!("{:#}", run_predict(&missing, &data, None).unwrap_err());
        assert!(err.contains("absent.json"), "{err}");
    }

    /// End to end on real data: a logistic model fitted here by plain gradient descent on the
    /// standardised breast-cancer training split, exported for raw features as jobs do, predicts
    /// the test CSV written by `dataset builtin`.
    #[test]
    fn builtin_split_and_exported_model_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (train_path, test_path, n_train, n_test) =
            write_builtin("breast_cancer", dir.path(), 0.2, 7).unwrap();
        assert_eq!((n_train, n_test), (455, 114));
        let train = tidepool_runtime::dataset::parse_csv(
            std::fs::File::open(&train_path).unwrap(),
            datasets::LABEL,
        )
        .unwrap();
        let nf = train.features.len();
        let mut x = DMatrix::from_row_slice(train.rows, nf, &train.x);
        let standardizer = Standardizer::from_stats(&Stats::from_matrix(&x));
        standardizer.apply(&mut x);
        let kind = ModelKind::Logistic;
        let mut params = kind.zeros(nf);
        for _ in 0..200 {
            let (_, grad) =
                tidepool_actors::jobs::models::objective(kind, &params, &x, &train.y, 1e-3)
                    .unwrap();
            params -= grad * 0.5;
        }
        let raw = standardizer.to_raw_params(&params);
        let file = ModelFile::new(
            kind,
            train.features.clone(),
            train.label.clone(),
            &raw,
            "gd".into(),
            200,
            0.0,
        );
        let model = write(dir.path(), "model.json", &file.to_json_pretty().unwrap());
        let report = run_predict(&model, &test_path, None).unwrap();
        assert_eq!(report.rows, 114);
        let acc = report.accuracy.unwrap();
        assert!(acc > 0.9, "accuracy {acc}");

        predict_main(&model, &test_path, None, false).unwrap();
        predict_main(&model, &test_path, Some("target"), true).unwrap();
        builtin_main("digits", &dir.path().join("digits"), 0.2, 7, false).unwrap();
        assert!(dir.path().join("digits/test.csv").is_file());
        assert!(write_builtin("breast_cancer", dir.path(), 0.0, 7).is_err());
        assert!(write_builtin("nope", dir.path(), 0.2, 7).is_err());
    }
}

//! `tidepool predict --model DIR --data FILE.csv [--label COLUMN] [--json]` for a
//! matrix-factorisation model directory: reads the user and item id columns the manifest names
//! and the label column (`--label`, default the manifest's label), predicts `mu + user . item`
//! for every row (an id beyond the model predicts `mu`) and reports the RMSE:
//! `{"rows": N, "rmse": X}`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tidepool_actors::jobs::mf;

use crate::mf_model::MfModel;
use crate::predict::{next_record, parse_value, Lines};

/// What `predict --json` prints for an `mf` model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MfPredictReport {
    /// Data rows predicted.
    pub rows: usize,
    /// Root mean squared error of the predicted ratings.
    pub rmse: f64,
}

/// Parses one id cell: a non-negative integer (written `12` or `12.0`).
fn parse_id(field: &[u8], line: u64, column: &str) -> Result<u64> {
    let text = String::from_utf8_lossy(field);
    let short: String = text.chars().take(48).collect();
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 => Ok(v as u64),
        _ => bail!("line {line}: column {column:?}: not a non-negative integer id: {short:?}"),
    }
}

/// The RMSE of the `mf` model in `dir` on CSV `data` (header row; columns found by name).
pub fn run(dir: &Path, data: &Path, label: Option<&str>) -> Result<MfPredictReport> {
    let mut model = MfModel::open(dir)?;
    let users = model.user_factors()?;
    let items = model.item_factors()?;
    let (k, mu) = (model.mf.rank, model.mf.mu);
    let (n_users, n_items) = (model.mf.users, model.mf.items);
    let label = label.unwrap_or(&model.manifest.label).to_string();
    let bytes = std::fs::read(data).with_context(|| format!("cannot read {}", data.display()))?;
    let predict = |u: u64, i: u64| {
        if u < n_users && i < n_items {
            mf::predict(&users, &items, k, mu, u, i)
        } else {
            mu
        }
    };
    score_csv(
        &bytes,
        [&model.mf.user_column, &model.mf.item_column],
        &label,
        predict,
    )
    .with_context(|| format!("{}", data.display()))
}

/// Reads the id columns `ids` (user, item) and `label` from CSV `bytes` and scores `predict`.
fn score_csv(
    bytes: &[u8],
    ids: [&str; 2],
    label: &str,
    predict: impl Fn(u64, u64) -> f64,
) -> Result<MfPredictReport> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let mut lines = Lines::new(bytes);
    let mut record = csv::ByteRecord::new();
    let Some(header) = next_record(&mut rdr, &mut record, &mut lines)? else {
        bail!("line 1: empty file");
    };
    let mut columns: HashMap<String, usize> = HashMap::new();
    let mut twice = Vec::new();
    for (i, f) in record.iter().enumerate() {
        let name = String::from_utf8_lossy(f).into_owned();
        if columns.insert(name.clone(), i).is_some() {
            twice.push(name);
        }
    }
    let find = |name: &str, what: &str| -> Result<usize> {
        ensure!(
            !twice.iter().any(|t| t == name),
            "line {header}: column {name:?} appears more than once in the header"
        );
        columns.get(name).copied().with_context(|| {
            format!("line {header}: the {what} column {name:?} is not in the header")
        })
    };
    ensure!(
        !ids.contains(&label),
        "label column {label:?} is one of the model's id columns"
    );
    let (u_col, i_col) = (find(ids[0], "user id")?, find(ids[1], "item id")?);
    let y_col = find(label, "label")?;
    let width = record.len();
    let (mut rows, mut sse) = (0usize, 0f64);
    while let Some(line) = next_record(&mut rdr, &mut record, &mut lines)? {
        ensure!(
            record.len() == width,
            "line {line}: ragged row: expected {width} fields, got {}",
            record.len()
        );
        let cell = |c: usize| record.get(c).unwrap_or_default();
        let u = parse_id(cell(u_col), line, ids[0])?;
        let i = parse_id(cell(i_col), line, ids[1])?;
        let y = parse_value(cell(y_col), line, label)?;
        sse += (predict(u, i) - f64::from(y)).powi(2);
        rows += 1;
    }
    ensure!(
        rows > 0,
        "line {}: no data rows after the header",
        header + 1
    );
    Ok(MfPredictReport {
        rows,
        rmse: (sse / rows as f64).sqrt(),
    })
}

/// `tidepool predict` on an `mf` model directory: [`run`], printed as one JSON line with
/// `json`, else for people.
pub fn predict_main(dir: &Path, data: &Path, label: Option<&str>, json: bool) -> Result<()> {
    let report = run(dir, data, label)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("rows:     {}", report.rows);
        println!("rmse:     {:.6}", report.rmse);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn rmse_of_a_tiny_model_with_unknown_ids_at_mu() {
        let (doc, src) = crate::mf_dir::tests::fixture();
        let dir = tempfile::tempdir().unwrap();
        crate::mf_dir::write(dir.path(), &doc, "j1", None, "rating", &src)
            .await
            .unwrap();
        // User 0 = (1, 0), item 3 = (2, 1): 3 + 2 = 5; user 2 = (-1, 1), item 0 = (1, 1): 3;
        // user 9 is beyond the model: mu = 3.
        let data = dir.path().join("test.csv");
        std::fs::write(&data, "rating,item,user\n4,3,0\n3,0,2.0\n\n5,1,9\n").unwrap();
        let report = run(dir.path(), &data, None).unwrap();
        assert_eq!(report.rows, 3);
        assert!(
            (report.rmse - (5.0f64 / 3.0).sqrt()).abs() < 1e-12,
            "{report:?}"
        );
        assert_eq!(
            serde_json::to_value(&report)
                .unwrap()
                .as_object()
                .unwrap()
                .len(),
            2
        );
        // Through `predict` itself.
        crate::predict::predict_main(dir.path(), &data, Some("rating"), true).unwrap();
        let cases = [
            (
                "user,item\n1,2\n",
                "label column \"rating\" is not in the header",
            ),
            ("user,rating\n1,2\n", "item id column \"item\""),
            (
                "user,item,rating\n1,-2,3\n",
                "line 2: column \"item\": not a non-negative",
            ),
            (
                "user,item,rating\n1,2,x\n",
                "line 2: column \"rating\": not a number",
            ),
            ("user,item,rating\n", "no data rows"),
            ("user,item,rating\n1,2\n", "ragged row"),
        ];
        for (text, want) in cases {
            std::fs::write(&data, text).unwrap();
            let err = format!("{:#}", run(dir.path(), &data, None).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains("test.csv"), "{err}");
        }
        std::fs::write(&data, "user,item,r\n1,2,3\n").unwrap();
        assert_eq!(run(dir.path(), &data, Some("r")).unwrap().rows, 1);
        assert!(run(dir.path(), &data, Some("user")).is_err());
    }
}

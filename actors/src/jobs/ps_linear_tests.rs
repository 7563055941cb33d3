//! Linear models on the in-process parameter server (hashed or sharded columns): as accurate
//! as the dense job on data both can hold; a softmax far wider than a frame trains touching
//! only the rows its sparse rows use.

use std::collections::HashMap;

use tidepool_runtime::control::{DatasetRecord, DatasetSource};
use tidepool_runtime::dataset::{self, SyntheticKind, Table};
use tidepool_runtime::jobspec::JobSpec;

use super::job::ShardData;
use super::model_file::ModelFile;
use super::models::{accuracy, predict};
use super::ps::{ParamTable, RowModel};
use super::ps_linear::{self, PsLinearJob, BIAS_KEY};
use super::registry::{self, run_local_tables};

const SHARDS: u32 = 8;

fn record(t: &Table) -> DatasetRecord {
    DatasetRecord {
        name: "t".into(),
        features: t.features.clone(),
        label: t.label.clone(),
        rows: t.rows as u64,
        shards: SHARDS,
        source: DatasetSource::Imported {
            import: "test".into(),
            segments: vec![1; SHARDS as usize],
        },
    }
}

fn spec(model: &str, extra_model: &str) -> String {
    format!(
        "[job]\nkind = \"sgd\"\ndataset = \"t\"\n[model]\ntype = \"{model}\"\n{extra_model}\n\
         [train]\nepochs = 4\nbatch_size = 128\nlearning_rate = 0.5\nstandardize = false\n\
         seed = 5\ncheckpoint_every = 100\n"
    )
}

/// The tables' weights as `(index, output) -> value`, and the bias.
type Weights = (HashMap<(u64, usize), f64>, Vec<f64>);

fn weights(tables: &mut [ParamTable], job: &PsLinearJob, step: u64) -> Weights {
    let outputs = job.outputs();
    let per = ps_linear::features_per_row(outputs);
    let mut w = HashMap::new();
    let mut bias = vec![0.0; outputs];
    for t in tables {
        let (keys, values) = t.save(job, step).unwrap();
        let mut at = 0;
        for &k in &keys {
            let width = job.width(k);
            let row = &values[at..at + width];
            at += width;
            if k == BIAS_KEY {
                bias = row.iter().map(|&v| f64::from(v)).collect();
            } else {
                for (j, &v) in row.iter().enumerate() {
                    let index = k * per as u64 + (j / outputs) as u64;
                    w.insert((index, j % outputs), f64::from(v));
                }
            }
        }
    }
    (w, bias)
}

/// Accuracy of a parameter-server job's tables on `test`.
fn ps_accuracy(tables: &mut [ParamTable], job: &PsLinearJob, step: u64, test: &Table) -> f64 {
    let (w, bias) = weights(tables, job, step);
    let data = ShardData {
        shard: 0,
        features: test.features.len(),
        x: &test.x,
        y: &test.y,
        csr: None,
    };
    let pred: Vec<f64> = (0..test.rows)
        .map(|r| {
            let z = ps_linear::scores(job, &data, r, &bias, &|i, o| {
                w.get(&(i, o)).copied().unwrap_or(0.0)
            });
            ps_linear::predict(job.loss(), &z)
        })
        .collect();
    accuracy(&pred, &test.y)
}

fn split(table: &Table, cut: usize) -> (Table, Table) {
    let d = table.features.len();
    let part = |a: usize, b: usize| Table {
        rows: b - a,
        x: table.x[a * d..b * d].to_vec(),
        y: table.y[a..b].to_vec(),
        ..table.clone()
    };
    (part(0, cut), part(cut, table.rows))
}

/// Trains `spec` densely and on the parameter server with `features`; returns both accuracies.
fn dense_vs_params(table: &Table, model: &str, features: &str) -> (f64, f64) {
    let (train, test) = split(table, table.rows * 5 / 6);
    let d = train.features.len();
    let parts = dataset::partition(&train, SHARDS);
    let data: Vec<ShardData<'_>> = parts
        .iter()
        .enumerate()
        .map(|(s, p)| ShardData {
            shard: s as u32,
            features: p.n_features(),
            x: p.features(),
            y: p.labels(),
            csr: None,
        })
        .collect();
    let ds = record(&train);
    let classes = if model == "softmax" {
        "classes = 3\n"
    } else {
        ""
    };
    let dense_spec = JobSpec::parse(&spec(model, classes)).unwrap();
    let dense = registry::build("d", &dense_spec, &ds).unwrap();
    let (result, _) = run_local_tables(dense, &data).unwrap();
    let file = ModelFile::from_json(&serde_json::to_vec(&result).unwrap()).unwrap();
    let x = nalgebra::DMatrix::from_row_slice(test.rows, d, &test.x);
    let pred = predict(
        file.model_kind().unwrap(),
        &file.params_matrix().unwrap(),
        &x,
    )
    .unwrap();
    let dense_acc = accuracy(&pred, &test.y);
    let ps_spec = JobSpec::parse(&spec(model, &format!("{classes}{features}"))).unwrap();
    let job = registry::build("p", &ps_spec, &ds).unwrap();
    let (result, mut tables) = run_local_tables(job, &data).unwrap();
    assert_eq!(result["kind"], "ps_linear");
    let steps = result["steps"].as_u64().unwrap();
    let p = PsLinearJob::new("p", ps_spec, d as u64, train.rows as u64, SHARDS).unwrap();
    (dense_acc, ps_accuracy(&mut tables, &p, steps, &test))
}

#[test]
fn hashed_logistic_matches_the_dense_job_within_half_a_point() {
    let (table, _) = dataset::synthetic(24_000, 16, SyntheticKind::Logistic, 3);
    let (dense, hashed) =
        dense_vs_params(&table, "logistic", "features = \"hashed\"\nhash_bits = 18");
    assert!(
        (hashed - dense).abs() <= 0.005,
        "hashed {hashed} vs dense {dense}"
    );
    assert!(dense > 0.65, "dense accuracy {dense}");
}

#[test]
fn sharded_softmax_matches_the_dense_job_within_half_a_point() {
    // Three classes from the signs of two generating scores.
    let (table, _) = dataset::synthetic(18_000, 12, SyntheticKind::Linear, 4);
    let mut t = table.clone();
    for (r, y) in t.y.iter_mut().enumerate() {
        let x = &table.x[r * 12..(r + 1) * 12];
        *y = if x[0] + x[1] > 0.5 {
            2.0
        } else if x[2] - x[3] > 0.0 {
            1.0
        } else {
            0.0
        };
    }
    let (dense, sharded) = dense_vs_params(&t, "softmax", "features = \"sharded\"");
    assert!(
        (sharded - dense).abs() <= 0.005,
        "sharded {sharded} vs dense {dense}"
    );
    assert!(dense > 0.8, "dense accuracy {dense}");
}

#[test]
fn spec_errors_name_the_key() {
    for (model, key) in [
        ("features = \"hashed\"\nhash_bits = 4", "model.hash_bits"),
        ("hash_bits = 20", "model.hash_bits"),
        ("features = \"sharded\"\nhash_bits = 20", "model.hash_bits"),
        ("features = \"bloom\"", "model.features"),
    ] {
        let err = JobSpec::parse(&spec("logistic", model))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{model}: {err}");
    }
    let err = JobSpec::parse(&spec("softmax", "features = \"sharded\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.classes"), "{err}");
}

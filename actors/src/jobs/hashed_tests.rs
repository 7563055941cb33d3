//! Hashed-feature logistic regression on the in-process parameter server: as accurate as the
//! dense job on data both can hold, dense or sparse rows alike.

use std::collections::HashMap;

use tidepool_runtime::control::{DatasetRecord, DatasetSource};
use tidepool_runtime::dataset::{self, SyntheticKind, Table};
use tidepool_runtime::jobspec::JobSpec;

use super::hashed::{self, BIAS_KEY, BLOCK};
use super::job::ShardData;
use super::model_file::ModelFile;
use super::models::{accuracy, predict};
use super::ps::ParamTable;
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

fn spec(extra_model: &str) -> String {
    format!(
        "[job]\nkind = \"sgd\"\ndataset = \"t\"\n[model]\ntype = \"logistic\"\n{extra_model}\n\
         [train]\nepochs = 4\nbatch_size = 128\nlearning_rate = 0.5\nstandardize = false\n\
         seed = 5\ncheckpoint_every = 100\n"
    )
}

/// The weights of the tables as `index -> value`, and the bias.
fn weights(
    tables: &mut [ParamTable],
    job: &hashed::HashedLogisticJob,
    step: u64,
) -> (HashMap<u64, f64>, f64) {
    let mut w = HashMap::new();
    let mut bias = 0.0;
    for t in tables {
        let (keys, values) = t.save(job, step).unwrap();
        for (n, &k) in keys.iter().enumerate() {
            let row = &values[n * BLOCK..(n + 1) * BLOCK];
            if k == BIAS_KEY {
                bias = f64::from(row[0]);
            } else {
                for (j, &v) in row.iter().enumerate() {
                    w.insert(k * BLOCK as u64 + j as u64, f64::from(v));
                }
            }
        }
    }
    (w, bias)
}

#[test]
fn hashed_logistic_matches_the_dense_job_within_half_a_point() {
    let (table, _) = dataset::synthetic(24_000, 16, SyntheticKind::Logistic, 3);
    let cut = 20_000;
    let train = Table {
        rows: cut,
        x: table.x[..cut * 16].to_vec(),
        y: table.y[..cut].to_vec(),
        ..table.clone()
    };
    let test = Table {
        rows: table.rows - cut,
        x: table.x[cut * 16..].to_vec(),
        y: table.y[cut..].to_vec(),
        ..table.clone()
    };
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
    // Dense job.
    let dense = registry::build("d", &JobSpec::parse(&spec("")).unwrap(), &ds).unwrap();
    let (result, _) = run_local_tables(dense, &data).unwrap();
    let file = ModelFile::from_json(&serde_json::to_vec(&result).unwrap()).unwrap();
    let x = nalgebra::DMatrix::from_row_slice(test.rows, 16, &test.x);
    let pred = predict(
        file.model_kind().unwrap(),
        &file.params_matrix().unwrap(),
        &x,
    )
    .unwrap();
    let dense_acc = accuracy(&pred, &test.y);
    // Hashed job, its weight vector on the parameter server.
    let text = spec("features = \"hashed\"\nhash_bits = 18");
    let hspec = JobSpec::parse(&text).unwrap();
    let job = registry::build("h", &hspec, &ds).unwrap();
    let (result, mut tables) = run_local_tables(job, &data).unwrap();
    assert_eq!(result["kind"], "hashed_logistic");
    let steps = result["steps"].as_u64().unwrap();
    let h = hashed::HashedLogisticJob::new("h", hspec, train.rows as u64, SHARDS).unwrap();
    let (w, bias) = weights(&mut tables, &h, steps);
    let test_parts = ShardData {
        shard: 0,
        features: 16,
        x: &test.x,
        y: &test.y,
        csr: None,
    };
    let pred: Vec<f64> = (0..test.rows)
        .map(|r| {
            let z = hashed::margin(&test_parts, r, 18, bias, &|i| {
                w.get(&i).copied().unwrap_or(0.0)
            });
            f64::from(u8::from(z >= 0.0))
        })
        .collect();
    let hashed_acc = accuracy(&pred, &test.y);
    assert!(
        (hashed_acc - dense_acc).abs() <= 0.005,
        "hashed {hashed_acc} vs dense {dense_acc}"
    );
    assert!(dense_acc > 0.65, "dense accuracy {dense_acc}");
}

#[test]
fn hashed_spec_errors_name_the_key() {
    for (model, key) in [
        ("features = \"hashed\"\nhash_bits = 4", "model.hash_bits"),
        ("hash_bits = 20", "model.hash_bits"),
        ("features = \"bloom\"", "model.features"),
    ] {
        let err = JobSpec::parse(&spec(model)).unwrap_err().to_string();
        assert!(err.contains(key), "{model}: {err}");
    }
    let err = JobSpec::parse(
        "[job]\nkind = \"sgd\"\ndataset = \"t\"\n[model]\ntype = \"linear\"\nfeatures = \"hashed\"",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.features"), "{err}");
}

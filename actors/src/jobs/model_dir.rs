//! The model directory: what `job result ID --out DIR` writes and what `predict --model DIR`
//! reads. A JSON manifest ([`Manifest`], `manifest.json`) says what the model is (kind,
//! shapes, feature names, label, how it was trained, its metrics); the tensors are in
//! `model.safetensors` (the safetensors format: an 8-byte header length, a JSON table of
//! tensors, little-endian data), so Python reads them with
//! `safetensors.numpy.load_file(DIR + "/model.safetensors")`.
//!
//! Tensors (all `F64`, row-major):
//! - linear, logistic, softmax: `weight` (`features x outputs`) and `bias` (`outputs`). They
//!   apply to raw features (a standardised job's standardisation is folded in, as in the JSON
//!   model file of [`super::model_file`]): `prediction = x @ weight + bias` (then the sigmoid,
//!   or a softmax over `outputs = classes`).
//! - kmeans: `centroids` (`k x features`) and `init_centroids` (the seeding's).
//! - mf (matrix factorisation; the manifest's [`Manifest::mf`] section holds rank, id ranges,
//!   `mu`): `user_factors` (`F32`, `users x rank`), `item_factors` (`F32`, `items x rank`),
//!   `rated_offsets` (`I64`, `users + 1`: CSR row pointers) and `rated_items` (`I32`: the items
//!   each user rated in training, increasing per user). `prediction = mu + user_factors[user] .
//!   item_factors[item]`. The binary streams this file from the cluster's tables (it can be
//!   larger than memory); this module only describes it ([`mf_manifest`]).
//!
//! Pure: documents and bytes in, documents and bytes out; the binary writes the files.

use std::collections::{BTreeMap, HashMap};

use nalgebra::DMatrix;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::model_file::{self, ModelFile};

/// The manifest's file name inside a model directory.
pub const MANIFEST: &str = "manifest.json";
/// The tensors' file name inside a model directory.
pub const TENSORS: &str = "model.safetensors";
/// The manifest's format tag.
pub const DIR_FORMAT: &str = "tidepool-model-dir/1";
/// The k-means result's format tag.
const KMEANS_FORMAT: &str = "tidepool-kmeans/1";

/// Why a result cannot become a model directory, or a directory is not a usable model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelDirError {
    #[error("not a model: {0}")]
    NotAModel(String),
    #[error("manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error("tensors: {0}")]
    Tensors(String),
    #[error(transparent)]
    Model(#[from] model_file::ModelFileError),
}

/// One tensor's entry in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// What the model is; the tensors are in [`TENSORS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`DIR_FORMAT`].
    pub format: String,
    /// `linear`, `logistic`, `softmax` or `kmeans`.
    pub kind: String,
    /// Softmax classes (0 otherwise).
    #[serde(default)]
    pub classes: usize,
    /// Feature names, in weight-row (or centroid-column) order; empty for k-means, which
    /// names none.
    pub features: Vec<String>,
    /// The label column (empty for k-means).
    #[serde(default)]
    pub label: String,
    /// What `weight` and `bias` apply to.
    pub inputs: String,
    /// The tensors in [`TENSORS`], by name.
    pub tensors: BTreeMap<String, TensorSpec>,
    /// The job that trained it and its spec (TOML text, when known).
    pub job: String,
    #[serde(default)]
    pub spec: Option<String>,
    /// Steps, final loss, inertia, ...: the job's own numbers.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Matrix factorisation (`kind = "mf"`) only: what the tensors hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mf: Option<MfManifest>,
}

/// The `kind` of a matrix-factorisation model directory.
pub const MF_KIND: &str = "mf";
/// `users x rank` user embeddings (`F32`).
pub const MF_USER_FACTORS: &str = "user_factors";
/// `items x rank` item embeddings (`F32`).
pub const MF_ITEM_FACTORS: &str = "item_factors";
/// `users + 1` CSR row pointers into [`MF_RATED_ITEMS`] (`I64`).
pub const MF_RATED_OFFSETS: &str = "rated_offsets";
/// The items each user rated in training, increasing per user (`I32`).
pub const MF_RATED_ITEMS: &str = "rated_items";

/// A matrix-factorisation model's numbers (the manifest's `mf` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MfManifest {
    /// Embedding width.
    pub rank: usize,
    /// Rows of `user_factors`: the largest user id in training + 1.
    pub users: u64,
    /// Rows of `item_factors`: the largest item id in training + 1.
    pub items: u64,
    /// The mean training rating: the prediction's constant term (and the prediction for ids
    /// beyond the tensors).
    pub mu: f64,
    /// The job's seed: rows training never touched hold `mf::init_row(seed, key)`.
    pub seed: u64,
    /// The dataset column of user ids.
    pub user_column: String,
    /// The dataset column of item ids.
    pub item_column: String,
    /// Distinct (user, item) pairs in training: the length of `rated_items`.
    pub pairs: u64,
}

/// The fields of an `mf` job's result document that the model directory needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MfResult {
    pub rank: usize,
    pub user_column: String,
    pub item_column: String,
    pub users: u64,
    pub items: u64,
    /// Training rows.
    #[serde(default)]
    pub rows: u64,
    pub mu: f64,
    pub seed: u64,
    /// Train steps run.
    pub steps: u64,
    /// Data (and parameter) shards: tables and exports `0..shards`.
    pub shards: u32,
    /// Where the final tables are.
    pub tables: MfTables,
    #[serde(default)]
    pub train_rmse: Option<f64>,
    #[serde(default)]
    pub epoch_train_rmse: Vec<f64>,
    #[serde(default)]
    pub rollbacks: u64,
}

/// The result's `tables` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MfTables {
    /// The train step of the final save (every shard's table is saved at it).
    pub step: u64,
}

impl MfResult {
    /// The mf fields of result document `doc` (`"kind": "mf"`), checked: rank at least 1, ids
    /// that fit the `I32` of `rated_items`, a finite `mu`.
    pub fn parse(doc: &serde_json::Value) -> Result<Self, ModelDirError> {
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != MF_KIND {
            return Err(ModelDirError::NotAModel(format!(
                "result kind {kind:?} is not {MF_KIND:?}"
            )));
        }
        let r: MfResult = serde_json::from_value(doc.clone())
            .map_err(|e| ModelDirError::NotAModel(format!("mf result: {e}")))?;
        let bad = |why: String| Err(ModelDirError::NotAModel(format!("mf result: {why}")));
        if r.rank == 0 {
            return bad("rank is 0".into());
        }
        for (what, n) in [("users", r.users), ("items", r.items)] {
            if n > i32::MAX as u64 {
                return bad(format!("{what} = {n} does not fit 32-bit ids"));
            }
        }
        if !r.mu.is_finite() {
            return bad(format!("mu = {} is not finite", r.mu));
        }
        Ok(r)
    }

    /// The tensors of its model directory, by name (`pairs`: the length of `rated_items`).
    pub fn tensors(&self, pairs: u64) -> BTreeMap<String, TensorSpec> {
        let spec = |dtype: &str, shape: Vec<usize>| TensorSpec {
            dtype: dtype.into(),
            shape,
        };
        let (u, i, k) = (self.users as usize, self.items as usize, self.rank);
        BTreeMap::from([
            (MF_USER_FACTORS.into(), spec("F32", vec![u, k])),
            (MF_ITEM_FACTORS.into(), spec("F32", vec![i, k])),
            (MF_RATED_OFFSETS.into(), spec("I64", vec![u + 1])),
            (MF_RATED_ITEMS.into(), spec("I32", vec![pairs as usize])),
        ])
    }
}

/// The manifest of an `mf` job's model directory: `r` from its result document, `label` the
/// dataset's label column, `pairs` the length of `rated_items`, `spec` the job's spec text.
pub fn mf_manifest(
    r: &MfResult,
    job: &str,
    spec: Option<String>,
    label: &str,
    pairs: u64,
) -> Manifest {
    let mut metrics = serde_json::Map::new();
    metrics.insert("train_rmse".into(), serde_json::json!(r.train_rmse));
    metrics.insert(
        "epoch_train_rmse".into(),
        serde_json::json!(r.epoch_train_rmse),
    );
    metrics.insert("steps".into(), r.steps.into());
    metrics.insert("rollbacks".into(), r.rollbacks.into());
    metrics.insert("rows".into(), r.rows.into());
    Manifest {
        format: DIR_FORMAT.into(),
        kind: MF_KIND.into(),
        classes: 0,
        features: vec![r.user_column.clone(), r.item_column.clone()],
        label: label.into(),
        inputs: "user and item ids (integers from 0): prediction = mu + user_factors[user] . \
                 item_factors[item]; an id beyond the tensors predicts mu"
            .into(),
        tensors: r.tensors(pairs),
        job: job.into(),
        spec,
        metrics,
        mf: Some(MfManifest {
            rank: r.rank,
            users: r.users,
            items: r.items,
            mu: r.mu,
            seed: r.seed,
            user_column: r.user_column.clone(),
            item_column: r.item_column.clone(),
            pairs,
        }),
    }
}

/// A model directory's contents: the manifest and the safetensors bytes.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub manifest: Manifest,
    pub tensors: Vec<u8>,
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tensor_spec(shape: &[usize]) -> TensorSpec {
    TensorSpec {
        dtype: "F64".into(),
        shape: shape.to_vec(),
    }
}

/// Serialises named row-major f64 tensors.
fn encode(
    tensors: &[(&str, Vec<usize>, Vec<f64>)],
) -> Result<(BTreeMap<String, TensorSpec>, Vec<u8>), ModelDirError> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| f64_bytes(v)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F64, shape.clone(), b)
                .map(|v| (name.to_string(), v))
                .map_err(|e| ModelDirError::Tensors(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let info = HashMap::from([("format".to_string(), DIR_FORMAT.to_string())]);
    let out = safetensors::serialize(views, Some(info))
        .map_err(|e| ModelDirError::Tensors(e.to_string()))?;
    let specs = tensors
        .iter()
        .map(|(n, shape, _)| (n.to_string(), tensor_spec(shape)))
        .collect();
    Ok((specs, out))
}

fn rows(v: &serde_json::Value, what: &str) -> Result<Vec<Vec<f64>>, ModelDirError> {
    serde_json::from_value(v.get(what).cloned().unwrap_or_default())
        .map_err(|e| ModelDirError::NotAModel(format!("{what}: {e}")))
}

/// The model directory of a finished job's result document (`sgd`, `local_sgd`, `kmeans`);
/// `spec` is the job's spec text. A `stats` result is not a model.
pub fn from_result(
    doc: &serde_json::Value,
    job: &str,
    spec: Option<String>,
) -> Result<ModelDir, ModelDirError> {
    let format = doc.get("format").and_then(|f| f.as_str()).unwrap_or("");
    let mut metrics = serde_json::Map::new();
    let (kind, classes, features, label, inputs, tensors) = match format {
        model_file::FORMAT => {
            let file: ModelFile = serde_json::from_value(doc.clone())?;
            let params = file.params_matrix()?;
            let d = file.features.len();
            let outputs = params.ncols();
            let weight: Vec<f64> = (0..d)
                .flat_map(|r| (0..outputs).map(move |c| (r, c)))
                .map(|(r, c)| params[(r, c)])
                .collect();
            let bias: Vec<f64> = (0..outputs).map(|c| params[(d, c)]).collect();
            metrics.insert("steps".into(), file.steps.into());
            metrics.insert("loss".into(), serde_json::json!(file.loss));
            (
                file.kind.clone(),
                file.classes,
                file.features.clone(),
                file.label.clone(),
                "raw features (any standardisation is folded into weight and bias)",
                vec![
                    ("weight", vec![d, outputs], weight),
                    ("bias", vec![outputs], bias),
                ],
            )
        }
        KMEANS_FORMAT => {
            let centroids = rows(doc, "centroids")?;
            let init = rows(doc, "init_centroids")?;
            let k = centroids.len();
            let d = centroids.first().map_or(0, Vec::len);
            if centroids.iter().chain(&init).any(|c| c.len() != d) || init.len() != k {
                return Err(ModelDirError::NotAModel("ragged centroids".into()));
            }
            for key in ["k", "inertia", "iterations", "n_init", "run_inertias"] {
                if let Some(v) = doc.get(key) {
                    metrics.insert(key.into(), v.clone());
                }
            }
            (
                "kmeans".to_string(),
                0,
                Vec::new(),
                String::new(),
                "raw features",
                vec![
                    ("centroids", vec![k, d], centroids.concat()),
                    ("init_centroids", vec![k, d], init.concat()),
                ],
            )
        }
        other => {
            return Err(ModelDirError::NotAModel(format!(
                "a {other:?} result holds no model tensors; write it as JSON (--out FILE.json)"
            )))
        }
    };
    let (specs, bytes) = encode(&tensors)?;
    Ok(ModelDir {
        manifest: Manifest {
            format: DIR_FORMAT.into(),
            kind,
            classes,
            features,
            label,
            inputs: inputs.into(),
            tensors: specs,
            job: job.into(),
            spec,
            metrics,
            mf: None,
        },
        tensors: bytes,
    })
}

/// A tensor of the directory, checked against its manifest entry.
fn tensor(
    st: &SafeTensors<'_>,
    manifest: &Manifest,
    name: &str,
) -> Result<(Vec<usize>, Vec<f64>), ModelDirError> {
    let bad = |why: String| ModelDirError::Tensors(format!("{name}: {why}"));
    let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
    if view.dtype() != Dtype::F64 {
        return Err(bad(format!("dtype {:?}, want F64", view.dtype())));
    }
    let spec = manifest
        .tensors
        .get(name)
        .ok_or_else(|| bad("not in the manifest".into()))?;
    if spec.shape != view.shape() {
        return Err(bad(format!(
            "shape {:?}, the manifest says {:?}",
            view.shape(),
            spec.shape
        )));
    }
    let values = view
        .data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok((view.shape().to_vec(), values))
}

/// The linear / logistic / softmax model of a directory's manifest and tensor bytes, checked
/// (shapes, finiteness, names) as a JSON model file is.
pub fn to_model_file(manifest: &Manifest, tensors: &[u8]) -> Result<ModelFile, ModelDirError> {
    if manifest.format != DIR_FORMAT {
        return Err(ModelDirError::NotAModel(format!(
            "format {:?} (this build reads {DIR_FORMAT:?})",
            manifest.format
        )));
    }
    if manifest.kind == "kmeans" {
        return Err(ModelDirError::NotAModel(
            "a k-means model has no predictions to score".into(),
        ));
    }
    if manifest.kind == MF_KIND || manifest.mf.is_some() {
        return Err(ModelDirError::NotAModel(
            "a matrix-factorisation model predicts from user and item ids, not features".into(),
        ));
    }
    let st =
        SafeTensors::deserialize(tensors).map_err(|e| ModelDirError::Tensors(e.to_string()))?;
    let (wshape, weight) = tensor(&st, manifest, "weight")?;
    let (bshape, bias) = tensor(&st, manifest, "bias")?;
    let d = manifest.features.len();
    let outputs = bshape.first().copied().unwrap_or(0);
    if wshape != [d, outputs] || bshape.len() != 1 {
        return Err(ModelDirError::Tensors(format!(
            "weight {wshape:?} and bias {bshape:?} for {d} features"
        )));
    }
    let params = DMatrix::from_fn(d + 1, outputs, |r, c| {
        if r < d {
            weight[r * outputs + c]
        } else {
            bias[c]
        }
    });
    let kind = ModelFile {
        format: model_file::FORMAT.into(),
        kind: manifest.kind.clone(),
        classes: manifest.classes,
        features: Vec::new(),
        label: String::new(),
        params: Vec::new(),
        job: String::new(),
        steps: 0,
        loss: 0.0,
    }
    .model_kind()?;
    let metric = |k: &str| manifest.metrics.get(k).and_then(serde_json::Value::as_f64);
    let file = ModelFile::new(
        kind,
        manifest.features.clone(),
        manifest.label.clone(),
        &params,
        manifest.job.clone(),
        metric("steps").unwrap_or(0.0) as u64,
        metric("loss").unwrap_or(f64::NAN),
    );
    file.validate()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::models::ModelKind;
    use super::*;

    #[test]
    fn a_trained_model_round_trips_through_a_directory() {
        let params = DMatrix::from_row_slice(3, 2, &[1.0, -2.0, 0.5, 0.25, -3.0, 4.0]);
        let file = ModelFile::new(
            ModelKind::Softmax { classes: 2 },
            vec!["a".into(), "b".into()],
            "y".into(),
            &params,
            "sgd-1".into(),
            12,
            0.5,
        );
        let doc = serde_json::to_value(&file).unwrap();
        let dir = from_result(&doc, "sgd-1", Some("[job]\n".into())).unwrap();
        assert_eq!(dir.manifest.tensors["weight"].shape, vec![2, 2]);
        assert_eq!(dir.manifest.tensors["bias"].shape, vec![2]);
        let back = to_model_file(&dir.manifest, &dir.tensors).unwrap();
        assert_eq!(back, file);
        // The bytes are the safetensors format: header length, JSON table, f64 LE data.
        let n = u64::from_le_bytes(dir.tensors[..8].try_into().unwrap()) as usize;
        let table: serde_json::Value = serde_json::from_slice(&dir.tensors[8..8 + n]).unwrap();
        assert_eq!(table["weight"]["dtype"], "F64");
        assert_eq!(table["__metadata__"]["format"], DIR_FORMAT);
        // Damaged tensors or a manifest that disagrees are refused, never a panic.
        let mut wrong = dir.manifest.clone();
        wrong.features.push("c".into());
        assert!(to_model_file(&wrong, &dir.tensors).is_err());
        for cut in [0, 7, 8, n, dir.tensors.len() - 1] {
            assert!(to_model_file(&dir.manifest, &dir.tensors[..cut]).is_err());
        }
    }

    #[test]
    fn mf_manifests_round_trip_and_older_manifests_still_read() {
        let doc = serde_json::json!({
            "kind": "mf", "job": "j", "rank": 4, "user_column": "u", "item_column": "i",
            "users": 10, "items": 5, "rows": 40, "mu": 3.5, "seed": 7, "steps": 9, "shards": 2,
            "tables": {"step": 9, "prefix": "jobs/j/params"}, "train_rmse": 0.5,
            "epoch_train_rmse": [0.7, 0.5], "rollbacks": 0, "rated": "...",
        });
        let r = MfResult::parse(&doc).unwrap();
        let m = mf_manifest(&r, "j", Some("[job]\n".into()), "rating", 33);
        assert_eq!(m.tensors[MF_USER_FACTORS].shape, vec![10, 4]);
        assert_eq!(m.tensors[MF_RATED_OFFSETS].shape, vec![11]);
        assert_eq!(m.tensors[MF_RATED_ITEMS].dtype, "I32");
        assert_eq!(m.metrics["epoch_train_rmse"], serde_json::json!([0.7, 0.5]));
        let text = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.mf.unwrap().pairs, 33);
        assert!(matches!(
            to_model_file(&m, &[]),
            Err(ModelDirError::NotAModel(_))
        ));
        // A dense manifest has no mf section, written or read.
        let file = ModelFile::new(
            super::super::models::ModelKind::Linear,
            vec!["a".into()],
            "y".into(),
            &DMatrix::from_row_slice(2, 1, &[1.0, 2.0]),
            "s".into(),
            1,
            0.0,
        );
        let dense = from_result(&serde_json::to_value(&file).unwrap(), "s", None).unwrap();
        let text = serde_json::to_string(&dense.manifest).unwrap();
        assert!(!text.contains("\"mf\""), "{text}");
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back.mf, None);
        // Results that are not mf, or mf results with impossible fields, are refused.
        for bad in [
            serde_json::json!({"kind": "sgd"}),
            serde_json::json!({"kind": "mf", "rank": 4}),
            {
                let mut d = doc.clone();
                d["rank"] = 0.into();
                d
            },
            {
                let mut d = doc.clone();
                d["users"] = (1u64 << 40).into();
                d
            },
        ] {
            assert!(MfResult::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kmeans_results_become_centroid_tensors_and_stats_are_not_models() {
        let doc = serde_json::json!({
            "format": "tidepool-kmeans/1", "k": 2, "inertia": 3.5, "iterations": 4,
            "centroids": [[1.0, 2.0], [3.0, 4.0]], "init_centroids": [[0.0, 0.0], [1.0, 1.0]],
        });
        let dir = from_result(&doc, "km", None).unwrap();
        assert_eq!(dir.manifest.tensors["centroids"].shape, vec![2, 2]);
        assert_eq!(dir.manifest.metrics["inertia"], 3.5);
        assert!(to_model_file(&dir.manifest, &dir.tensors).is_err());
        let stats = serde_json::json!({"format": "tidepool-stats/1"});
        assert!(matches!(
            from_result(&stats, "st", None),
            Err(ModelDirError::NotAModel(_))
        ));
    }
}

//! Model directories on disk: `job result ID --out DIR` writes one, `predict --model DIR`
//! reads one (the format: `tidepool_actors::jobs::model_dir`).

use std::path::Path;

use anyhow::{Context, Result};
use tidepool_actors::jobs::model_dir::{self, Manifest, MANIFEST, TENSORS};
use tidepool_actors::jobs::model_file::ModelFile;

/// Whether `--out PATH` names a model directory (anything but a `.json` file).
pub fn is_dir_path(path: &Path) -> bool {
    path.is_dir() || path.extension().is_none_or(|e| e != "json")
}

/// Writes the model directory of result document `doc` of job `job` (spec text `spec`) into
/// `dir` (created if missing); returns the tensor names.
pub fn write(
    dir: &Path,
    doc: &serde_json::Value,
    job: &str,
    spec: Option<String>,
) -> Result<Vec<String>> {
    let md = model_dir::from_result(doc, job, spec)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Tensors first, manifest last: a directory with a manifest is complete.
    let tmp = dir.join(format!("{TENSORS}.part"));
    std::fs::write(&tmp, &md.tensors).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(TENSORS))?;
    let mut text = serde_json::to_string_pretty(&md.manifest)?;
    text.push('\n');
    std::fs::write(dir.join(MANIFEST), text)?;
    Ok(md.manifest.tensors.keys().cloned().collect())
}

/// The manifest of model directory `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a model manifest", path.display()))
}

/// Whether `dir` is a matrix-factorisation model directory (its manifest says kind `mf`).
pub fn is_mf(dir: &Path) -> bool {
    dir.is_dir()
        && read_manifest(dir).is_ok_and(|m| m.kind == tidepool_actors::jobs::model_dir::MF_KIND)
}

/// The linear / logistic / softmax model in directory `dir`.
pub fn read(dir: &Path) -> Result<ModelFile> {
    let manifest = read_manifest(dir)?;
    let tensors = std::fs::read(dir.join(TENSORS))
        .with_context(|| format!("cannot read {}", dir.join(TENSORS).display()))?;
    model_dir::to_model_file(&manifest, &tensors)
        .with_context(|| format!("{}: not a usable model directory", dir.display()))
}

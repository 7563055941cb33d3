//! The trained-model file: what `job result ID --out MODEL.json` writes for `sgd` / `local_sgd`
//! jobs and what `tidepool predict --model MODEL.json` reads.
//!
//! The file is JSON ([`ModelFile`]), format tag [`FORMAT`]. Parameters are stored as the
//! [`models`](super::models) parameter matrix: `(features + 1)` rows by `outputs` columns,
//! row-major (`params[row][col]`), the **last row is the bias**, and they apply to **raw**
//! (unstandardised) features: a job that standardised its inputs exports
//! [`Standardizer::to_raw_params`](super::models::Standardizer::to_raw_params). So
//! [`predict`](super::models::predict) on the raw feature columns, in the order of
//! [`ModelFile::features`], gives the model's predictions.
//!
//! Reading never panics: [`ModelFile::from_json`] checks the JSON, and
//! [`ModelFile::model_kind`] / [`ModelFile::params_matrix`] check the kind, the class count, the
//! parameter shape and that every parameter is finite.

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use super::models::ModelKind;

/// The format tag written into every model file; files with another tag are refused.
pub const FORMAT: &str = "tidepool-model/1";

/// Why a model file could not be read or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelFileError {
    /// Not valid JSON, or JSON missing a field / with a field of the wrong type.
    #[error("model file is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The `format` field is not [`FORMAT`].
    #[error("unsupported model format {found:?} (this build reads {FORMAT:?})")]
    Format {
        /// The `format` field.
        found: String,
    },
    /// The `kind` field is not `linear`, `logistic` or `softmax`.
    #[error("unknown model kind {0:?} (expected linear, logistic or softmax)")]
    UnknownKind(String),
    /// `classes` does not fit the kind: softmax needs at least 2, the others 0.
    #[error("model kind {kind} with classes = {classes} (softmax needs >= 2, others 0)")]
    Classes {
        /// The `kind` field.
        kind: String,
        /// The `classes` field.
        classes: usize,
    },
    /// The parameter matrix does not have `features + 1` rows of `outputs` values.
    #[error("parameters are {rows} rows (first row {cols} values), expected {want_rows}x{want_cols} (features + 1 rows, last = bias)")]
    Shape {
        /// Rows given.
        rows: usize,
        /// Length of the first bad row (or of the first row when the row count is wrong).
        cols: usize,
        /// Rows expected.
        want_rows: usize,
        /// Values per row expected.
        want_cols: usize,
    },
    /// A parameter is NaN or infinite (a file cannot hold one, but a [`ModelFile`] built in
    /// memory can).
    #[error("parameter [{row}][{col}] is not finite")]
    NonFinite {
        /// Row of the value.
        row: usize,
        /// Column of the value.
        col: usize,
    },
    /// Two features have the same name, or a feature has the label's name.
    #[error("duplicate column name {0:?} among features and label")]
    DuplicateName(String),
}

/// A trained linear / logistic / softmax model as stored on disk (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    /// Always [`FORMAT`] (`"tidepool-model/1"`).
    pub format: String,
    /// `"linear"`, `"logistic"` or `"softmax"`.
    pub kind: String,
    /// Number of classes for `softmax`; 0 for `linear` and `logistic` (which have one output).
    pub classes: usize,
    /// Feature column names, in parameter-row order.
    pub features: Vec<String>,
    /// The label column the model was trained on.
    pub label: String,
    /// `(features + 1)` rows of `outputs` values (`classes` for softmax, else 1), row-major; the
    /// last row is the bias. Applies to raw (unstandardised) features.
    pub params: Vec<Vec<f64>>,
    /// The id of the job that trained the model.
    pub job: String,
    /// Optimisation steps taken.
    pub steps: u64,
    /// The final training loss. A non-finite loss is written as JSON `null` and read back as NaN.
    #[serde(deserialize_with = "loss_or_nan")]
    pub loss: f64,
}

/// Reads `loss`, taking `null` (how serde_json writes NaN and infinities) as NaN.
fn loss_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The `kind` string and `classes` value stored for a model kind.
fn kind_fields(kind: ModelKind) -> (&'static str, usize) {
    match kind {
        ModelKind::Linear => ("linear", 0),
        ModelKind::Logistic => ("logistic", 0),
        ModelKind::Softmax { classes } => ("softmax", classes),
    }
}

impl ModelFile {
    /// A model file for `params` (`(features + 1) x outputs`, last row bias, raw features).
    /// Shape is not checked here; [`Self::params_matrix`] checks it when the file is used.
    pub fn new(
        kind: ModelKind,
        features: Vec<String>,
        label: String,
        params: &DMatrix<f64>,
        job: String,
        steps: u64,
        loss: f64,
    ) -> Self {
        let (kind, classes) = kind_fields(kind);
        let params = params
            .row_iter()
            .map(|row| row.iter().copied().collect())
            .collect();
        Self {
            format: FORMAT.to_owned(),
            kind: kind.to_owned(),
            classes,
            features,
            label,
            params,
            job,
            steps,
            loss,
        }
    }

    /// The model kind, checked against `classes`.
    pub fn model_kind(&self) -> Result<ModelKind, ModelFileError> {
        let bad_classes = || ModelFileError::Classes {
            kind: self.kind.clone(),
            classes: self.classes,
        };
        match self.kind.as_str() {
            "linear" | "logistic" if self.classes != 0 => Err(bad_classes()),
            "linear" => Ok(ModelKind::Linear),
            "logistic" => Ok(ModelKind::Logistic),
            "softmax" if self.classes < 2 => Err(bad_classes()),
            "softmax" => Ok(ModelKind::Softmax {
                classes: self.classes,
            }),
            other => Err(ModelFileError::UnknownKind(other.to_owned())),
        }
    }

    /// The parameter matrix, after checking the kind, its shape against the feature count and
    /// the kind's outputs, and that every value is finite.
    pub fn params_matrix(&self) -> Result<DMatrix<f64>, ModelFileError> {
        let outputs = self.model_kind()?.outputs();
        let want_rows = self.features.len() + 1;
        let shape_err = |cols: usize| ModelFileError::Shape {
            rows: self.params.len(),
            cols,
            want_rows,
            want_cols: outputs,
        };
        if self.params.len() != want_rows {
            return Err(shape_err(self.params.first().map_or(0, Vec::len)));
        }
        if let Some(bad) = self.params.iter().find(|r| r.len() != outputs) {
            return Err(shape_err(bad.len()));
        }
        for (row, values) in self.params.iter().enumerate() {
            if let Some(col) = values.iter().position(|v| !v.is_finite()) {
                return Err(ModelFileError::NonFinite { row, col });
            }
        }
        Ok(DMatrix::from_row_iterator(
            want_rows,
            outputs,
            self.params.iter().flatten().copied(),
        ))
    }

    /// Checks everything a reader relies on: format, kind, classes, shape, finiteness and that
    /// the feature and label names are distinct.
    pub fn validate(&self) -> Result<(), ModelFileError> {
        if self.format != FORMAT {
            return Err(ModelFileError::Format {
                found: self.format.clone(),
            });
        }
        self.params_matrix()?;
        let mut seen = std::collections::HashSet::with_capacity(self.features.len() + 1);
        for name in self.features.iter().chain(std::iter::once(&self.label)) {
            if !seen.insert(name.as_str()) {
                return Err(ModelFileError::DuplicateName(name.clone()));
            }
        }
        Ok(())
    }

    /// Parses and [validates](Self::validate) a model file.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelFileError> {
        let model: Self = serde_json::from_slice(bytes)?;
        model.validate()?;
        Ok(model)
    }

    /// The file's JSON text, pretty-printed, with a trailing newline.
    pub fn to_json_pretty(&self) -> Result<String, ModelFileError> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::models::{accuracy, predict};
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("x{i}")).collect()
    }

    fn softmax_file() -> (ModelFile, DMatrix<f64>) {
        let params = DMatrix::from_fn(4, 3, |r, c| r as f64 * 0.5 - c as f64 * 0.25 + 0.125);
        let file = ModelFile::new(
            ModelKind::Softmax { classes: 3 },
            names(3),
            "y".into(),
            &params,
            "job-1".into(),
            120,
            0.31,
        );
        (file, params)
    }

    #[test]
    fn round_trip_keeps_every_field_and_the_matrix() {
        let (file, params) = softmax_file();
        assert_eq!(file.format, FORMAT);
        assert_eq!((file.kind.as_str(), file.classes), ("softmax", 3));
        assert_eq!(file.params.len(), 4);
        assert_eq!(
            file.params[3],
            vec![1.625, 1.375, 1.125],
            "last row is the bias"
        );
        let text = file.to_json_pretty().unwrap();
        let back = ModelFile::from_json(text.as_bytes()).unwrap();
        assert_eq!(back, file);
        assert_eq!(back.params_matrix().unwrap(), params);
        assert_eq!(
            back.model_kind().unwrap(),
            ModelKind::Softmax { classes: 3 }
        );
    }

    #[test]
    fn linear_and_logistic_store_zero_classes() {
        for kind in [ModelKind::Linear, ModelKind::Logistic] {
            let params = DMatrix::from_element(3, 1, 0.5);
            let file = ModelFile::new(kind, names(2), "y".into(), &params, "j".into(), 1, 0.0);
            assert_eq!(file.classes, 0);
            let back = ModelFile::from_json(file.to_json_pretty().unwrap().as_bytes()).unwrap();
            assert_eq!(back.model_kind().unwrap(), kind);
            assert_eq!(back.params_matrix().unwrap(), params);
        }
    }

    #[test]
    fn loaded_model_predicts_on_raw_features() {
        // y = 1 iff x0 - x1 > 0.5: weights (1, -1), bias -0.5.
        let params = DMatrix::from_row_slice(3, 1, &[1.0, -1.0, -0.5]);
        let file = ModelFile::new(
            ModelKind::Logistic,
            names(2),
            "y".into(),
            &params,
            "j".into(),
            10,
            0.1,
        );
        let back = ModelFile::from_json(file.to_json_pretty().unwrap().as_bytes()).unwrap();
        let x = DMatrix::from_row_slice(3, 2, &[2.0f32, 0.0, 0.0, 2.0, 1.0, 0.25]);
        let pred = predict(
            back.model_kind().unwrap(),
            &back.params_matrix().unwrap(),
            &x,
        )
        .unwrap();
        assert_eq!(pred, vec![1.0, 0.0, 1.0]);
        assert_eq!(accuracy(&pred, &[1.0, 0.0, 1.0]), 1.0);
    }

    #[test]
    fn nan_loss_reads_back_as_nan() {
        let (mut file, _) = softmax_file();
        file.loss = f64::NAN;
        let back = ModelFile::from_json(file.to_json_pretty().unwrap().as_bytes()).unwrap();
        assert!(back.loss.is_nan());
    }

    #[test]
    fn bad_shape_is_refused() {
        let (file, _) = softmax_file();
        let mut short = file.clone();
        short.params.pop();
        assert!(matches!(
            short.params_matrix(),
            Err(ModelFileError::Shape {
                rows: 3,
                want_rows: 4,
                want_cols: 3,
                ..
            })
        ));
        let mut ragged = file.clone();
        ragged.params[1].push(1.0);
        assert!(matches!(
            ragged.params_matrix(),
            Err(ModelFileError::Shape { cols: 4, .. })
        ));
        let text = serde_json::to_string(&ragged).unwrap();
        assert!(matches!(
            ModelFile::from_json(text.as_bytes()),
            Err(ModelFileError::Shape { .. })
        ));
        let mut nan = file;
        nan.params[2][1] = f64::INFINITY;
        assert!(matches!(
            nan.params_matrix(),
            Err(ModelFileError::NonFinite { row: 2, col: 1 })
        ));
    }

    #[test]
    fn unknown_kind_and_bad_classes_are_refused() {
        let (file, _) = softmax_file();
        let mut unknown = file.clone();
        unknown.kind = "svm".into();
        let text = serde_json::to_string(&unknown).unwrap();
        let err = ModelFile::from_json(text.as_bytes()).unwrap_err();
        assert!(matches!(&err, ModelFileError::UnknownKind(k) if k == "svm"));
        assert!(err.to_string().contains("svm"));

        let mut one_class = file.clone();
        one_class.classes = 1;
        assert!(matches!(
            one_class.model_kind(),
            Err(ModelFileError::Classes { classes: 1, .. })
        ));
        let mut logistic_with_classes = file.clone();
        logistic_with_classes.kind = "logistic".into();
        assert!(matches!(
            logistic_with_classes.model_kind(),
            Err(ModelFileError::Classes { .. })
        ));
    }

    #[test]
    fn other_bad_files_are_refused_without_panicking() {
        let (file, _) = softmax_file();
        let mut format = file.clone();
        format.format = "tidepool-model/2".into();
        let text = serde_json::to_string(&format).unwrap();
        assert!(matches!(
            ModelFile::from_json(text.as_bytes()),
            Err(ModelFileError::Format { .. })
        ));
        let mut dup = file;
        dup.label = "x1".into();
        assert!(matches!(dup.validate(), Err(ModelFileError::DuplicateName(n)) if n == "x1"));
        for junk in [&b""[..], b"{", b"[]", b"{\"format\": 1}", b"\xff\xfe"] {
            assert!(matches!(
                ModelFile::from_json(junk),
                Err(ModelFileError::Json(_))
            ));
        }
    }
}

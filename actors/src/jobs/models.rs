//! Linear, logistic and softmax regression: losses, gradients, predictions, standardisation and
//! the learning-rate schedule.
//!
//! Parameters are a `(features + 1) x outputs` matrix whose last row is the bias; `outputs` is 1
//! for linear and logistic regression and `classes` for softmax. [`loss_and_grad`] returns
//! *sums* over the rows it is given and no regularisation term, so the partials of any row
//! split add up to the whole batch's; the reducer divides by the total count and adds the L2
//! term once ([`l2_penalty`]).

use super::stats::Stats;
use nalgebra::DMatrix;

/// Which model a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Least squares: loss `0.5 * (z - y)^2`.
    Linear,
    /// Binary cross-entropy on labels 0/1.
    Logistic,
    /// Multinomial cross-entropy on integer labels `0..classes`.
    Softmax {
        /// Number of classes (at least 2).
        classes: usize,
    },
}

impl ModelKind {
    /// Columns of the parameter matrix.
    pub fn outputs(self) -> usize {
        match self {
            ModelKind::Linear | ModelKind::Logistic => 1,
            ModelKind::Softmax { classes } => classes,
        }
    }

    /// Zero parameters for `features` inputs.
    pub fn zeros(self, features: usize) -> DMatrix<f64> {
        DMatrix::zeros(features + 1, self.outputs())
    }
}

/// Inputs a model cannot use; nothing is computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// The parameter matrix does not fit the data's feature count or the model kind.
    #[error("parameters are {rows}x{cols}, expected {want_rows}x{want_cols}")]
    ParamShape {
        /// Rows given.
        rows: usize,
        /// Columns given.
        cols: usize,
        /// Rows expected (features + 1).
        want_rows: usize,
        /// Columns expected (outputs).
        want_cols: usize,
    },
    /// `y` has a different length than `x` has rows.
    #[error("{labels} labels for {rows} rows")]
    LabelCount {
        /// Labels given.
        labels: usize,
        /// Rows of `x`.
        rows: usize,
    },
    /// A label is not valid for the model (not 0/1 for logistic, not a class index for
    /// softmax, not finite).
    #[error("row {row}: label {label} is not valid for this model")]
    BadLabel {
        /// Row index within the batch.
        row: usize,
        /// The label.
        label: f32,
    },
    /// The standardisation does not have one mean and one deviation per feature.
    #[error("standardisation of {means} means and {stds} deviations for {features} features")]
    StandardizerShape {
        /// Features of the data.
        features: usize,
        /// Means given.
        means: usize,
        /// Deviations given.
        stds: usize,
    },
    /// A minibatch names a row the data does not have.
    #[error("row {index} of {rows}")]
    RowOutOfRange {
        /// The row asked for.
        index: usize,
        /// Rows in the data.
        rows: usize,
    },
}

/// Loss and gradient summed over a batch (no regularisation).
#[derive(Debug, Clone, PartialEq)]
pub struct LossGrad {
    /// Sum of per-row losses.
    pub loss_sum: f64,
    /// Sum of per-row gradients, shaped like the parameters.
    pub grad_sum: DMatrix<f64>,
    /// Rows summed.
    pub count: u64,
}

fn check(
    kind: ModelKind,
    params: &DMatrix<f64>,
    x: &DMatrix<f32>,
    y: Option<&[f32]>,
) -> Result<(), ModelError> {
    let (want_rows, want_cols) = (x.ncols() + 1, kind.outputs());
    if params.shape() != (want_rows, want_cols) {
        return Err(ModelError::ParamShape {
            rows: params.nrows(),
            cols: params.ncols(),
            want_rows,
            want_cols,
        });
    }
    let Some(y) = y else { return Ok(()) };
    if y.len() != x.nrows() {
        return Err(ModelError::LabelCount {
            labels: y.len(),
            rows: x.nrows(),
        });
    }
    check_labels(kind, y)
}

/// Every label valid for `kind`: finite (linear), 0 or 1 (logistic), a class index below
/// `classes` (softmax). The error names the first bad one by its index in `y`.
pub(super) fn check_labels(kind: ModelKind, y: &[f32]) -> Result<(), ModelError> {
    for (row, &label) in y.iter().enumerate() {
        let ok = match kind {
            ModelKind::Linear => label.is_finite(),
            ModelKind::Logistic => label == 0.0 || label == 1.0,
            ModelKind::Softmax { classes } => {
                label >= 0.0 && label.fract() == 0.0 && (label as usize) < classes
            }
        };
        if !ok {
            return Err(ModelError::BadLabel { row, label });
        }
    }
    Ok(())
}

/// `x * W + b`: one row of raw scores per sample.
fn logits(params: &DMatrix<f64>, x64: &DMatrix<f64>) -> DMatrix<f64> {
    let d = x64.ncols();
    let mut z = x64 * params.rows(0, d);
    let bias = params.row(d);
    for mut row in z.row_iter_mut() {
        row += bias;
    }
    z
}

/// The logistic function, stable for large `|z|`.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Turns `z` (one row of scores) into probabilities in place; returns `log(sum(exp(z)))`.
pub(super) fn softmax_in_place(z: &mut [f64]) -> f64 {
    // One exp per score: e_c = exp(z_c - max), p_c = e_c / sum.
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    for v in z.iter_mut() {
        *v /= sum;
    }
    m + sum.ln()
}

/// One row's loss; turns its scores `z` (one per output) into the loss's derivative with
/// respect to them (the residuals): `z - y` (linear), `sigmoid(z) - y` (logistic),
/// `softmax(z) - onehot(y)` (softmax). `label` must have passed [`check_labels`] (an invalid
/// softmax class leaves the one-hot term out rather than panic).
pub(super) fn residual_in_place(kind: ModelKind, z: &mut [f64], label: f32) -> f64 {
    let t = f64::from(label);
    match (kind, z) {
        (ModelKind::Linear, [z0, ..]) => {
            let r = *z0 - t;
            *z0 = r;
            0.5 * r * r
        }
        (ModelKind::Logistic, [z0, ..]) => {
            // sigmoid and softplus share exp(-|z|), as they compute it on their own.
            let zi = *z0;
            let e = (-zi.abs()).exp();
            let sig = if zi >= 0.0 {
                1.0 / (1.0 + e)
            } else {
                e / (1.0 + e)
            };
            *z0 = sig - t;
            zi.max(0.0) + e.ln_1p() - t * zi
        }
        (ModelKind::Softmax { .. }, z) => {
            let class = label as usize;
            let zc = z.get(class).copied().unwrap_or(0.0);
            let loss = softmax_in_place(z) - zc;
            if let Some(p) = z.get_mut(class) {
                *p -= 1.0;
            }
            loss
        }
        (_, []) => 0.0,
    }
}

/// Loss and gradient sums over the rows of `x` (samples x features) with labels `y`.
pub fn loss_and_grad(
    kind: ModelKind,
    params: &DMatrix<f64>,
    x: &DMatrix<f32>,
    y: &[f32],
) -> Result<LossGrad, ModelError> {
    check(kind, params, x, Some(y))?;
    let x64 = x.map(f64::from);
    let mut dz = logits(params, &x64);
    let mut loss_sum = 0.0;
    let mut row = vec![0.0; kind.outputs()];
    for (i, &label) in y.iter().enumerate() {
        for (c, z) in row.iter_mut().enumerate() {
            *z = dz[(i, c)];
        }
        loss_sum += residual_in_place(kind, &mut row, label);
        for (c, &r) in row.iter().enumerate() {
            dz[(i, c)] = r;
        }
    }
    let d = x.ncols();
    let mut grad_sum = DMatrix::zeros(d + 1, kind.outputs());
    grad_sum.rows_mut(0, d).copy_from(&(x64.transpose() * &dz));
    for (c, col) in dz.column_iter().enumerate() {
        grad_sum[(d, c)] = col.sum();
    }
    Ok(LossGrad {
        loss_sum,
        grad_sum,
        count: x.nrows() as u64,
    })
}

/// `0.5 * l2 * |W|^2` (bias excluded) and its gradient.
pub fn l2_penalty(params: &DMatrix<f64>, l2: f64) -> (f64, DMatrix<f64>) {
    let d = params.nrows().saturating_sub(1);
    let mut grad = params * l2;
    grad.row_mut(d).fill(0.0);
    let w = params.rows(0, d);
    (0.5 * l2 * w.norm_squared(), grad)
}

/// The full-batch objective: mean loss plus the L2 penalty, and its gradient.
pub fn objective(
    kind: ModelKind,
    params: &DMatrix<f64>,
    x: &DMatrix<f32>,
    y: &[f32],
    l2: f64,
) -> Result<(f64, DMatrix<f64>), ModelError> {
    let lg = loss_and_grad(kind, params, x, y)?;
    let n = lg.count.max(1) as f64;
    let (pen, pen_grad) = l2_penalty(params, l2);
    Ok((lg.loss_sum / n + pen, lg.grad_sum / n + pen_grad))
}

/// Predictions per row: the value (linear), the class 0/1 (logistic) or the class index
/// (softmax), as `f64` so they compare directly with labels.
pub fn predict(
    kind: ModelKind,
    params: &DMatrix<f64>,
    x: &DMatrix<f32>,
) -> Result<Vec<f64>, ModelError> {
    check(kind, params, x, None)?;
    let z = logits(params, &x.map(f64::from));
    Ok(z.row_iter()
        .map(|row| match kind {
            ModelKind::Linear => row[0],
            ModelKind::Logistic => f64::from(u8::from(row[0] >= 0.0)),
            ModelKind::Softmax { .. } => argmax(row.iter().copied()) as f64,
        })
        .collect())
}

/// Index of the largest value; ties go to the lowest index.
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Probability of class 1 per row (logistic regression).
pub fn predict_proba(params: &DMatrix<f64>, x: &DMatrix<f32>) -> Result<Vec<f64>, ModelError> {
    check(ModelKind::Logistic, params, x, None)?;
    let z = logits(params, &x.map(f64::from));
    Ok(z.column(0).iter().map(|&v| sigmoid(v)).collect())
}

/// Fraction of predictions equal to their labels; 0 for no rows.
pub fn accuracy(pred: &[f64], y: &[f32]) -> f64 {
    let hits = pred
        .iter()
        .zip(y)
        .filter(|(p, t)| **p == f64::from(**t))
        .count();
    hits as f64 / pred.len().max(1) as f64
}

/// Root mean squared error; 0 for no rows.
pub fn rmse(pred: &[f64], y: &[f32]) -> f64 {
    let sse: f64 = pred
        .iter()
        .zip(y)
        .map(|(p, t)| (p - f64::from(*t)).powi(2))
        .sum();
    (sse / pred.len().max(1) as f64).sqrt()
}

/// Per-column `(x - mean) / std`, from a column-statistics pass. Constant columns get std 1 so
/// they map to 0 rather than NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    /// Column means.
    pub mean: Vec<f64>,
    /// Column standard deviations (population), never 0.
    pub std: Vec<f64>,
}

impl Standardizer {
    /// From merged statistics of the training features.
    pub fn from_stats(stats: &Stats) -> Self {
        let mean = stats.columns.iter().map(|c| c.mean).collect();
        let std = stats
            .columns
            .iter()
            .map(|c| match c.std_dev() {
                s if s > 0.0 && s.is_finite() => s,
                _ => 1.0,
            })
            .collect();
        Self { mean, std }
    }

    /// Standardises `x` (samples x features) in place.
    ///
    /// # Panics
    /// If `x` does not have one column per standardised feature.
    pub fn apply(&self, x: &mut DMatrix<f32>) {
        assert_eq!(x.ncols(), self.mean.len(), "feature count");
        for (c, mut col) in x.column_iter_mut().enumerate() {
            let (m, s) = (self.mean[c], self.std[c]);
            col.apply(|v| *v = ((f64::from(*v) - m) / s) as f32);
        }
    }

    /// Rewrites parameters trained on standardised features so they apply to raw features:
    /// `w' = w / std`, `b' = b - sum(w * mean / std)`. Exported models use raw features.
    pub fn to_raw_params(&self, params: &DMatrix<f64>) -> DMatrix<f64> {
        let d = self.mean.len();
        let mut out = params.clone();
        for c in 0..params.ncols() {
            let mut shift = 0.0;
            for f in 0..d {
                let w = params[(f, c)] / self.std[f];
                out[(f, c)] = w;
                shift += w * self.mean[f];
            }
            out[(d, c)] -= shift;
        }
        out
    }
}

/// The learning rate at each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// The same rate every step.
    Constant(f64),
    /// `lr0 / (1 + decay * step)`.
    InverseDecay {
        /// Rate at step 0.
        lr0: f64,
        /// Decay per step.
        decay: f64,
    },
}

impl LrSchedule {
    /// The rate for `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant(lr) => lr,
            LrSchedule::InverseDecay { lr0, decay } => lr0 / (1.0 + decay * step as f64),
        }
    }
}

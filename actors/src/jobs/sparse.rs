//! Linear, logistic and softmax regression on sparse rows (CSR, from libsvm imports), without
//! densifying them.
//!
//! The training jobs learn in standardised feature space: row `i`'s input `j` is
//! `(x_ij - m_j) / s_j`. On sparse rows that would turn every implicit zero into `-m_j / s_j`
//! (a dense row), so the standardisation is folded into the parameters `P` instead (`d`
//! features, last row the bias):
//!
//! ```text
//! z_ic = P_dc + sum_j P_jc (x_ij - m_j) / s_j = b'_c + sum_j w'_jc x_ij
//! w'_jc = P_jc / s_j        b'_c = P_dc - sum_j w'_jc m_j
//! ```
//!
//! where only the stored entries of row `i` contribute to the sum. The gradient folds back the
//! same way: with residuals `r_ic` (the loss's derivative in `z_ic`),
//!
//! ```text
//! g_jc = sum_i r_ic (x_ij - m_j) / s_j = (S_jc - m_j R_c) / s_j     (bias: R_c)
//! S_jc = sum_i r_ic x_ij  (stored entries only)                     R_c = sum_i r_ic
//! ```
//!
//! A minibatch costs `O(nnz_batch * outputs + d * outputs)`, whatever the density. The result
//! is [`super::models::loss_and_grad`]'s on the standardised dense rows, up to floating-point
//! rounding (the dense path also rounds standardised values to `f32`; this one does not).

use nalgebra::DMatrix;

use super::job::{CsrRows, JobError, ShardData};
use super::models::{
    check_labels, residual_in_place, LossGrad, ModelError, ModelKind, Standardizer,
};

/// The shard's sparse rows, if it has them, checked against the shard's shape: as many rows as
/// labels and `features` columns. `Ok(None)` for dense shards.
pub fn shard_csr<'a>(data: &ShardData<'a>) -> Result<Option<CsrRows<'a>>, JobError> {
    let Some(csr) = data.csr else {
        return Ok(None);
    };
    if csr.rows() != data.rows() || csr.columns() != data.features {
        return Err(JobError::Data(format!(
            "sparse shard {}: {} rows of {} columns for {} labels and {} features",
            data.shard,
            csr.rows(),
            csr.columns(),
            data.rows(),
            data.features
        )));
    }
    Ok(Some(csr))
}

/// Whether `std` leaves features as they are (means 0, deviations 1): then the folding is the
/// identity and is skipped.
fn is_identity(std: &Standardizer) -> bool {
    std.mean.iter().all(|&m| m == 0.0) && std.std.iter().all(|&s| s == 1.0)
}

/// Loss and gradient sums over the rows `idx` of `csr` (labels `y`, one per row of `csr`), as
/// [`super::models::loss_and_grad`] computes them on those rows densified and standardised by
/// `std`: `params` is `(d + 1) x outputs` in standardised space (last row the bias), and so is
/// the gradient. A row may appear in `idx` more than once; it then counts as often.
///
/// Refuses (computing nothing) parameters or a standardisation of the wrong shape, labels
/// that do not match the rows, a row index past the end, and a label invalid for `kind`
/// (named by its position in `idx`).
pub fn loss_and_grad_sparse(
    kind: ModelKind,
    params: &DMatrix<f64>,
    std: &Standardizer,
    csr: &CsrRows<'_>,
    y: &[f32],
    idx: &[usize],
) -> Result<LossGrad, ModelError> {
    let d = csr.columns();
    let k = kind.outputs();
    if params.shape() != (d + 1, k) {
        return Err(ModelError::ParamShape {
            rows: params.nrows(),
            cols: params.ncols(),
            want_rows: d + 1,
            want_cols: k,
        });
    }
    if std.mean.len() != d || std.std.len() != d {
        return Err(ModelError::StandardizerShape {
            features: d,
            means: std.mean.len(),
            stds: std.std.len(),
        });
    }
    if y.len() != csr.rows() {
        return Err(ModelError::LabelCount {
            labels: y.len(),
            rows: csr.rows(),
        });
    }
    let labels = idx
        .iter()
        .map(|&i| {
            y.get(i).copied().ok_or(ModelError::RowOutOfRange {
                index: i,
                rows: y.len(),
            })
        })
        .collect::<Result<Vec<f32>, _>>()?;
    check_labels(kind, &labels)?;

    let identity = is_identity(std);
    let (weights, bias) = effective_weights(params, std, identity, d, k);

    // Per row: scores from the stored entries, residuals in place, then scattered into S.
    let mut s = vec![0.0; d * k];
    let mut r_sum = vec![0.0; k];
    let mut z = vec![0.0; k];
    let mut loss_sum = 0.0;
    for (&i, &label) in idx.iter().zip(&labels) {
        let (cols, vals) = csr.row(i);
        z.copy_from_slice(&bias);
        for (&j, &v) in cols.iter().zip(vals) {
            let v = f64::from(v);
            let at = j as usize * k;
            for (zc, w) in z
                .iter_mut()
                .zip(weights.get(at..at + k).unwrap_or_default())
            {
                *zc += w * v;
            }
        }
        loss_sum += residual_in_place(kind, &mut z, label);
        for (acc, r) in r_sum.iter_mut().zip(&z) {
            *acc += r;
        }
        for (&j, &v) in cols.iter().zip(vals) {
            let v = f64::from(v);
            let at = j as usize * k;
            for (acc, r) in s.get_mut(at..at + k).unwrap_or_default().iter_mut().zip(&z) {
                *acc += r * v;
            }
        }
    }

    // Back to standardised space: g_jc = (S_jc - m_j R_c) / s_j; the bias row is R_c.
    let mut grad_sum = DMatrix::zeros(d + 1, k);
    for (c, mut col) in grad_sum.column_iter_mut().enumerate() {
        let r = r_sum.get(c).copied().unwrap_or(0.0);
        let features = s.iter().skip(c).step_by(k).zip(&std.mean).zip(&std.std);
        for (g, ((&sjc, &m), &sd)) in col.iter_mut().zip(features) {
            *g = if identity { sjc } else { (sjc - m * r) / sd };
        }
        if let Some(g) = col.get_mut(d) {
            *g = r;
        }
    }
    Ok(LossGrad {
        loss_sum,
        grad_sum,
        count: idx.len() as u64,
    })
}

/// The standardisation folded into the parameters: `w'_jc = P_jc / s_j` row-major (`d x k`,
/// one row of `k` outputs per feature, the order a sparse row's entries read them in) and
/// `b'_c = P_dc - sum_j w'_jc m_j`. With `identity` (means 0, deviations 1), `P` as it is.
fn effective_weights(
    params: &DMatrix<f64>,
    std: &Standardizer,
    identity: bool,
    d: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut weights = vec![0.0; d * k];
    let mut bias = vec![0.0; k];
    for (c, col) in params.column_iter().enumerate() {
        let mut shift = 0.0;
        let features = col.iter().zip(&std.mean).zip(&std.std);
        for (w, ((&p, &m), &sd)) in weights.iter_mut().skip(c).step_by(k).zip(features) {
            if identity {
                *w = p;
            } else {
                *w = p / sd;
                shift += *w * m;
            }
        }
        if let (Some(b), Some(&p)) = (bias.get_mut(c), col.get(d)) {
            *b = p - shift;
        }
    }
    (weights, bias)
}

#[cfg(test)]
#[path = "sparse_tests.rs"]
mod tests;

//! The training step's math: loss and gradient sums over a minibatch of rows read in place,
//! dense (a partition's row-major f32 rows) or sparse (CSR, from libsvm imports), by one
//! function ([`loss_and_grad_rows`]) over the [`Rows`] of either.
//!
//! The training jobs learn in standardised feature space: row `i`'s input `j` is
//! `(x_ij - m_j) / s_j`. Standardising the rows would copy a dense minibatch (and turn every
//! implicit zero of a sparse row into `-m_j / s_j`), so the standardisation is folded into the
//! parameters `P` instead (`d` features, last row the bias):
//!
//! ```text
//! z_ic = P_dc + sum_j P_jc (x_ij - m_j) / s_j = b'_c + sum_j w'_jc x_ij
//! w'_jc = P_jc / s_j        b'_c = P_dc - sum_j w'_jc m_j
//! ```
//!
//! where only the stored entries of a sparse row contribute to the sum. The gradient folds
//! back the same way: with residuals `r_ic` (the loss's derivative in `z_ic`),
//!
//! ```text
//! g_jc = sum_i r_ic (x_ij - m_j) / s_j = (S_jc - m_j R_c) / s_j     (bias: R_c)
//! S_jc = sum_i r_ic x_ij                                             R_c = sum_i r_ic
//! ```
//!
//! A minibatch costs one read of each of its rows (a dot product per output, then an axpy per
//! output, in [`LANES`] accumulator lanes the compiler vectorises; for sparse rows their
//! stored entries) plus one pass over the weights. The result is
//! [`super::models::loss_and_grad`]'s on the standardised rows up to floating-point rounding
//! (that reference rounds standardised values to `f32` and sums in another order).

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

/// Whether `std` leaves features as they are (no means and deviations at all, as an
/// unstandardised job passes it, or means 0 and deviations 1): then the folding is skipped.
fn is_identity(std: &Standardizer) -> bool {
    std.mean.iter().all(|&m| m == 0.0) && std.std.iter().all(|&s| s == 1.0)
}

/// Feature `j`'s mean and deviation (0 and 1 past the end: the identity).
fn mean_std(std: &Standardizer, j: usize) -> (f64, f64) {
    (
        std.mean.get(j).copied().unwrap_or(0.0),
        std.std.get(j).copied().unwrap_or(1.0),
    )
}

/// Lanes of the dense kernels' accumulators: the compiler vectorises them.
const LANES: usize = 8;

/// Rows a minibatch is read from, in place. Weights and accumulators are `d x k` (`k` outputs),
/// laid out as [`Rows::FEATURE_MAJOR`] says.
pub trait Rows {
    /// `true`: entry `(j, c)` at `j * k + c` (a sparse row reads one feature's outputs
    /// together); `false`: at `c * d + j` (a dense row is a contiguous dot per output).
    const FEATURE_MAJOR: bool;
    /// Rows.
    fn count(&self) -> usize;
    /// Columns (features).
    fn columns(&self) -> usize;
    /// `z[c] += sum_j x_ij w_jc` for every output `c` (`k = z.len()`).
    fn scores(&self, i: usize, w: &[f64], z: &mut [f64]);
    /// `s_jc += x_ij r_c` for every feature and output.
    fn scatter(&self, i: usize, r: &[f64], s: &mut [f64]);
    /// [`Rows::scatter`] of the rows `block` (at most [`BLOCK`]), residuals `r` one row of
    /// `k` after another. A kernel may add the rows' terms together before adding them to
    /// `s` (a fixed order for a given block).
    fn scatter_block(&self, block: &[usize], r: &[f64], s: &mut [f64]) {
        let k = r.len() / block.len().max(1);
        for (&i, r) in block.iter().zip(r.chunks_exact(k.max(1))) {
            self.scatter(i, r, s);
        }
    }
}

/// Rows scattered together ([`Rows::scatter_block`]).
pub const BLOCK: usize = 4;

/// Dense rows: `d` f32 features per row, row-major (a partition read in place).
#[derive(Debug, Clone, Copy)]
pub struct DenseRows<'a> {
    x: &'a [f32],
    d: usize,
}

impl<'a> DenseRows<'a> {
    /// The rows of `x` (`rows x d`, row-major); `None` when the length is not a multiple of `d`.
    pub fn new(x: &'a [f32], d: usize) -> Option<Self> {
        (d > 0 && x.len() % d == 0 || d == 0 && x.is_empty()).then_some(Self { x, d })
    }

    fn row(&self, i: usize) -> &'a [f32] {
        self.x.get(i * self.d..(i + 1) * self.d).unwrap_or_default()
    }
}

/// `sum_j x_j w_j` in [`LANES`] lanes, then lane by lane and the tail (a fixed order).
#[inline]
fn dot(x: &[f32], w: &[f64]) -> f64 {
    let n = x.len().min(w.len());
    let split = n - n % LANES;
    let (xh, xt) = x.get(..n).unwrap_or_default().split_at(split);
    let (wh, wt) = w.get(..n).unwrap_or_default().split_at(split);
    let mut acc = [0f64; LANES];
    for (a, b) in xh.chunks_exact(LANES).zip(wh.chunks_exact(LANES)) {
        for ((acc, &a), &b) in acc.iter_mut().zip(a).zip(b) {
            *acc += f64::from(a) * b;
        }
    }
    let mut sum = acc.iter().sum::<f64>();
    for (&a, &b) in xt.iter().zip(wt) {
        sum += f64::from(a) * b;
    }
    sum
}

/// `s_j += r x_j`.
#[inline]
fn axpy(r: f64, x: &[f32], s: &mut [f64]) {
    for (s, &v) in s.iter_mut().zip(x) {
        *s += r * f64::from(v);
    }
}

impl Rows for DenseRows<'_> {
    const FEATURE_MAJOR: bool = false;
    fn count(&self) -> usize {
        self.x.len().checked_div(self.d).unwrap_or(0)
    }
    fn columns(&self) -> usize {
        self.d
    }
    fn scores(&self, i: usize, w: &[f64], z: &mut [f64]) {
        let row = self.row(i);
        for (zc, wc) in z.iter_mut().zip(w.chunks_exact(self.d.max(1))) {
            *zc += dot(row, wc);
        }
    }
    fn scatter(&self, i: usize, r: &[f64], s: &mut [f64]) {
        let row = self.row(i);
        for (&rc, sc) in r.iter().zip(s.chunks_exact_mut(self.d.max(1))) {
            axpy(rc, row, sc);
        }
    }
    fn scatter_block(&self, block: &[usize], r: &[f64], s: &mut [f64]) {
        // A full block: per output, each feature's four terms summed, then added once (`s` is
        // read and written once per block instead of once per row).
        let k = r.len() / block.len().max(1);
        if let [a, b, c, e] = block {
            let (xa, xb, xc, xe) = (self.row(*a), self.row(*b), self.row(*c), self.row(*e));
            for (out, sc) in s.chunks_exact_mut(self.d.max(1)).enumerate().take(k) {
                let at = |row: usize| r.get(row * k + out).copied().unwrap_or(0.0);
                let (ra, rb, rc, re) = (at(0), at(1), at(2), at(3));
                let rows = xa.iter().zip(xb).zip(xc).zip(xe);
                for (s, (((&va, &vb), &vc), &ve)) in sc.iter_mut().zip(rows) {
                    *s += ((ra * f64::from(va) + rb * f64::from(vb)) + rc * f64::from(vc))
                        + re * f64::from(ve);
                }
            }
            return;
        }
        for (&i, r) in block.iter().zip(r.chunks_exact(k.max(1))) {
            self.scatter(i, r, s);
        }
    }
}

impl Rows for CsrRows<'_> {
    const FEATURE_MAJOR: bool = true;
    fn count(&self) -> usize {
        self.rows()
    }
    fn columns(&self) -> usize {
        CsrRows::columns(self)
    }
    fn scores(&self, i: usize, w: &[f64], z: &mut [f64]) {
        let k = z.len();
        let (cols, vals) = self.row(i);
        for (&j, &v) in cols.iter().zip(vals) {
            let v = f64::from(v);
            let at = j as usize * k;
            for (zc, w) in z.iter_mut().zip(w.get(at..at + k).unwrap_or_default()) {
                *zc += w * v;
            }
        }
    }
    fn scatter(&self, i: usize, r: &[f64], s: &mut [f64]) {
        let k = r.len();
        let (cols, vals) = self.row(i);
        for (&j, &v) in cols.iter().zip(vals) {
            let v = f64::from(v);
            let at = j as usize * k;
            for (acc, r) in s.get_mut(at..at + k).unwrap_or_default().iter_mut().zip(r) {
                *acc += r * v;
            }
        }
    }
}

/// Loss and gradient sums over the rows `idx` of `rows` (labels `y`, one per row), as
/// [`super::models::loss_and_grad`] computes them on those rows standardised by `std`:
/// `params` is `(d + 1) x outputs` in standardised space (last row the bias), and so is the
/// gradient. The standardisation is folded into the weights (see the module docs), so the rows
/// are read as they are stored. A row may appear in `idx` more than once; it then counts as
/// often. A `std` with no means and no deviations is the identity (no vectors to allocate).
///
/// Refuses (computing nothing) parameters or a standardisation of the wrong shape, labels
/// that do not match the rows, a row index past the end, and a label invalid for `kind`
/// (named by its position in `idx`).
pub fn loss_and_grad_rows<R: Rows>(
    kind: ModelKind,
    params: &DMatrix<f64>,
    std: &Standardizer,
    rows: &R,
    y: &[f32],
    idx: &[usize],
) -> Result<LossGrad, ModelError> {
    let d = rows.columns();
    let k = kind.outputs();
    if params.shape() != (d + 1, k) {
        return Err(ModelError::ParamShape {
            rows: params.nrows(),
            cols: params.ncols(),
            want_rows: d + 1,
            want_cols: k,
        });
    }
    let unstandardised = std.mean.is_empty() && std.std.is_empty();
    if !unstandardised && (std.mean.len() != d || std.std.len() != d) {
        return Err(ModelError::StandardizerShape {
            features: d,
            means: std.mean.len(),
            stds: std.std.len(),
        });
    }
    if y.len() != rows.count() {
        return Err(ModelError::LabelCount {
            labels: y.len(),
            rows: rows.count(),
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
    let at = |j: usize, c: usize| {
        if R::FEATURE_MAJOR {
            j * k + c
        } else {
            c * d + j
        }
    };
    let (weights, bias) = effective_weights(params, std, identity, d, k, at);

    // Per row: scores, residuals in place; then a block of rows scattered into S.
    let mut s = vec![0.0; d * k];
    let mut r_sum = vec![0.0; k];
    let mut zb = vec![0.0; BLOCK * k];
    let mut loss_sum = 0.0;
    for (block, block_labels) in idx.chunks(BLOCK).zip(labels.chunks(BLOCK)) {
        let zb = zb.get_mut(..block.len() * k).unwrap_or_default();
        for ((&i, &label), z) in block.iter().zip(block_labels).zip(zb.chunks_exact_mut(k)) {
            z.copy_from_slice(&bias);
            rows.scores(i, &weights, z);
            loss_sum += residual_in_place(kind, z, label);
            for (acc, r) in r_sum.iter_mut().zip(z.iter()) {
                *acc += r;
            }
        }
        rows.scatter_block(block, zb, &mut s);
    }

    // Back to standardised space: g_jc = (S_jc - m_j R_c) / s_j; the bias row is R_c.
    let mut grad_sum = DMatrix::zeros(d + 1, k);
    for (c, mut col) in grad_sum.column_iter_mut().enumerate() {
        let r = r_sum.get(c).copied().unwrap_or(0.0);
        for (j, g) in col.iter_mut().enumerate().take(d) {
            let sjc = s.get(at(j, c)).copied().unwrap_or(0.0);
            *g = if identity {
                sjc
            } else {
                let (m, sd) = mean_std(std, j);
                (sjc - m * r) / sd
            };
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

/// [`loss_and_grad_rows`] over a shard's rows, dense or sparse, read in place.
pub fn shard_loss_and_grad(
    kind: ModelKind,
    params: &DMatrix<f64>,
    std: &Standardizer,
    data: &ShardData<'_>,
    idx: &[usize],
) -> Result<LossGrad, JobError> {
    let data_error = |e: ModelError| JobError::Data(e.to_string());
    match shard_csr(data)? {
        Some(csr) => loss_and_grad_rows(kind, params, std, &csr, data.y, idx).map_err(data_error),
        None => {
            let rows = DenseRows::new(data.x, data.features)
                .filter(|r| r.count() == data.rows())
                .ok_or_else(|| {
                    JobError::Data(format!(
                        "shard {}: {} values for {} rows of {} features",
                        data.shard,
                        data.x.len(),
                        data.rows(),
                        data.features
                    ))
                })?;
            loss_and_grad_rows(kind, params, std, &rows, data.y, idx).map_err(data_error)
        }
    }
}

/// The standardisation folded into the parameters: `w'_jc = P_jc / s_j` at `at(j, c)` and
/// `b'_c = P_dc - sum_j w'_jc m_j`. With `identity` (means 0, deviations 1), `P` as it is.
fn effective_weights(
    params: &DMatrix<f64>,
    std: &Standardizer,
    identity: bool,
    d: usize,
    k: usize,
    at: impl Fn(usize, usize) -> usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut weights = vec![0.0; d * k];
    let mut bias = vec![0.0; k];
    for (c, col) in params.column_iter().enumerate() {
        let mut shift = 0.0;
        for (j, &p) in col.iter().enumerate().take(d) {
            let (m, sd) = mean_std(std, j);
            let w = if identity { p } else { p / sd };
            if let Some(slot) = weights.get_mut(at(j, c)) {
                *slot = w;
            }
            if !identity {
                shift += w * m;
            }
        }
        if let (Some(b), Some(&p)) = (bias.get_mut(c), col.get(d)) {
            *b = p - shift;
        }
    }
    (weights, bias)
}

#[cfg(test)]
#[path = "minibatch_tests.rs"]
mod tests;

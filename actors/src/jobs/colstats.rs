//! Column statistics as two exact MapReduce passes, shared by the `stats` job and the
//! standardisation pass of the training jobs.
//!
//! Pass 1 ([`PHASE_SUMS`]) sums every column (features, then the label) and takes min and max;
//! pass 2 ([`PHASE_SQUARES`]) sums squared deviations from pass 1's means and, optionally,
//! counts a histogram over `[min, max]`. Two passes with exact sums give the variance to about
//! machine precision, independent of how the rows are spread over shards and nodes.
//!
//! Sparse shards (CSR rows) give the statistics of the same rows stored dense, at a cost of
//! `O(nnz + columns)`: a column's sum is the sum of its stored values (in row order, so it is
//! the dense sum exactly), its min and max include an implicit 0 when some row stores nothing
//! in it, and its squared deviations from mean `m` are those of the stored values plus
//! `m^2` for every row that stores nothing. Histograms (the `stats` job) need dense rows.

use serde::{Deserialize, Serialize};

use super::job::{CsrRows, JobError, Partial, ShardData};
use super::minibatch::shard_csr;
use super::stats::Histogram;

/// Why histograms are refused on sparse rows.
pub const SPARSE_HISTOGRAMS: &str =
    "the stats job needs dense rows; this dataset is sparse (libsvm)";

/// Phase of pass 1.
pub const PHASE_SUMS: u32 = 0;
/// Phase of pass 2.
pub const PHASE_SQUARES: u32 = 1;

/// The value of column `c` (features `0..d`, then the label at `d`) of row `i`.
fn value(data: &ShardData<'_>, i: usize, c: usize) -> f64 {
    if c < data.features {
        f64::from(data.x[i * data.features + c])
    } else {
        f64::from(data.y[i])
    }
}

/// Refuses a dense shard whose values do not fill `rows x features`.
fn check_dense(data: &ShardData<'_>) -> Result<(), JobError> {
    if Some(data.x.len()) == data.rows().checked_mul(data.features) {
        Ok(())
    } else {
        Err(JobError::Data(format!(
            "shard {}: {} values for {} rows of {} features",
            data.shard,
            data.x.len(),
            data.rows(),
            data.features
        )))
    }
}

/// Pass 1 map: per column sum, min and max over the shard's rows (dense or sparse).
pub fn map_sums(data: &ShardData<'_>) -> Result<Partial, JobError> {
    if let Some(csr) = shard_csr(data)? {
        return Ok(sparse_sums(data, &csr));
    }
    check_dense(data)?;
    let cols = data.features + 1;
    let mut p = Partial {
        rows: data.rows() as u64,
        sum: vec![0.0; cols],
        min: vec![f64::INFINITY; cols],
        max: vec![f64::NEG_INFINITY; cols],
    };
    for i in 0..data.rows() {
        for c in 0..cols {
            let v = value(data, i, c);
            p.sum[c] += v;
            p.min[c] = p.min[c].min(v);
            p.max[c] = p.max[c].max(v);
        }
    }
    Ok(p)
}

/// Pass 1 over the label only (a training job that does not standardise needs only the label's
/// range): one column, dense or sparse rows alike.
pub fn map_label_sums(data: &ShardData<'_>) -> Partial {
    let (sum, lo, hi) = label_sums(data.y);
    Partial {
        rows: data.rows() as u64,
        sum: vec![sum],
        min: vec![lo],
        max: vec![hi],
    }
}

/// The label column's sum, min and max, in row order (as the dense pass takes them).
fn label_sums(y: &[f32]) -> (f64, f64, f64) {
    y.iter().fold(
        (0.0, f64::INFINITY, f64::NEG_INFINITY),
        |(sum, lo, hi), &v| {
            let v = f64::from(v);
            (sum + v, lo.min(v), hi.max(v))
        },
    )
}

/// Stored entries per column.
fn stored_counts(csr: &CsrRows<'_>) -> Vec<u64> {
    let mut n = vec![0u64; csr.columns()];
    for &j in csr.indices() {
        if let Some(n) = n.get_mut(j as usize) {
            *n += 1;
        }
    }
    n
}

/// [`map_sums`] of a sparse shard (checked by [`shard_csr`]): stored values summed in row
/// order; min and max take an implicit 0 for a column some row stores nothing in.
fn sparse_sums(data: &ShardData<'_>, csr: &CsrRows<'_>) -> Partial {
    let d = csr.columns();
    let mut sum = vec![0.0; d + 1];
    let mut min = vec![f64::INFINITY; d + 1];
    let mut max = vec![f64::NEG_INFINITY; d + 1];
    for (&j, &v) in csr.indices().iter().zip(csr.values()) {
        let j = j as usize;
        let v = f64::from(v);
        if let (Some(s), Some(lo), Some(hi)) = (sum.get_mut(j), min.get_mut(j), max.get_mut(j)) {
            *s += v;
            *lo = lo.min(v);
            *hi = hi.max(v);
        }
    }
    let rows = data.rows() as u64;
    for ((&n, lo), hi) in stored_counts(csr).iter().zip(&mut min).zip(&mut max) {
        if n < rows {
            *lo = lo.min(0.0);
            *hi = hi.max(0.0);
        }
    }
    let (s, lo, hi) = label_sums(data.y);
    if let (Some(a), Some(b), Some(c)) = (sum.get_mut(d), min.get_mut(d), max.get_mut(d)) {
        (*a, *b, *c) = (s, lo, hi);
    }
    Partial {
        rows,
        sum,
        min,
        max,
    }
}

/// Pass 2's broadcast: `[bins, means.., mins.., maxs..]`.
pub fn squares_broadcast(first: &FirstPass, bins: usize) -> Vec<f64> {
    let mut b = vec![bins as f64];
    b.extend(&first.mean);
    b.extend(&first.min);
    b.extend(&first.max);
    b
}

/// Pass 2 map: per column sum of squared deviations, then `bins` histogram counts per column.
pub fn map_squares(data: &ShardData<'_>, broadcast: &[f64]) -> Result<Partial, JobError> {
    let cols = data.features + 1;
    if broadcast.len() != 1 + 3 * cols {
        return Err(JobError::Shape(format!(
            "statistics broadcast of {} values for {cols} columns",
            broadcast.len()
        )));
    }
    let bins = broadcast[0] as usize;
    let (mean, rest) = broadcast[1..].split_at(cols);
    if let Some(csr) = shard_csr(data)? {
        if bins > 0 {
            return Err(JobError::Data(SPARSE_HISTOGRAMS.into()));
        }
        return Ok(sparse_squares(data, &csr, mean));
    }
    check_dense(data)?;
    let (lo, hi) = rest.split_at(cols);
    let mut sum = vec![0.0; cols * (1 + bins)];
    let mut hists: Vec<Histogram> = (0..cols)
        .filter(|_| bins > 0)
        .map(|c| Histogram::new(lo[c].min(hi[c]), hi[c].max(lo[c]), bins))
        .collect();
    for i in 0..data.rows() {
        for c in 0..cols {
            let v = value(data, i, c);
            sum[c] += (v - mean[c]) * (v - mean[c]);
            if let Some(h) = hists.get_mut(c) {
                h.push(v);
            }
        }
    }
    for (c, h) in hists.iter().enumerate() {
        for (b, &n) in h.counts.iter().enumerate() {
            sum[cols + c * bins + b] = n as f64;
        }
    }
    Ok(Partial {
        rows: data.rows() as u64,
        sum,
        min: Vec::new(),
        max: Vec::new(),
    })
}

/// [`map_squares`] of a sparse shard without histograms: per column, the squared deviations of
/// its stored values from `mean`, plus `mean^2` for every row that stores nothing in it.
fn sparse_squares(data: &ShardData<'_>, csr: &CsrRows<'_>, mean: &[f64]) -> Partial {
    let d = csr.columns();
    let mut sum = vec![0.0; d + 1];
    for (&j, &v) in csr.indices().iter().zip(csr.values()) {
        let j = j as usize;
        if let (Some(s), Some(&m)) = (sum.get_mut(j), mean.get(j)) {
            let dv = f64::from(v) - m;
            *s += dv * dv;
        }
    }
    let rows = data.rows() as u64;
    for ((s, &n), &m) in sum.iter_mut().zip(&stored_counts(csr)).zip(mean) {
        *s += (rows - n.min(rows)) as f64 * (m * m);
    }
    if let (Some(s), Some(&m)) = (sum.get_mut(d), mean.get(d)) {
        *s = data.y.iter().fold(0.0, |acc, &v| {
            let dv = f64::from(v) - m;
            acc + dv * dv
        });
    }
    Partial {
        rows,
        sum,
        min: Vec::new(),
        max: Vec::new(),
    }
}

/// Pass 1 reduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstPass {
    pub count: u64,
    pub mean: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

impl FirstPass {
    /// From pass 1's merged partial.
    pub fn reduce(merged: &Partial) -> Result<Self, JobError> {
        if merged.rows == 0 {
            return Err(JobError::Data("the dataset has no rows".into()));
        }
        let n = merged.rows as f64;
        Ok(FirstPass {
            count: merged.rows,
            mean: merged.sum.iter().map(|s| s / n).collect(),
            min: merged.min.clone(),
            max: merged.max.clone(),
        })
    }
}

/// One column's statistics (the `stats` job's result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSummary {
    pub name: String,
    pub count: u64,
    pub mean: f64,
    /// Population variance.
    pub variance: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Equal-width bins over `[min, max]` (empty when no histogram was asked for).
    pub histogram: Vec<u64>,
}

/// Both passes reduced: one summary per column (features, then the label).
pub fn summarize(first: &FirstPass, merged: &Partial, names: &[String]) -> Vec<ColumnSummary> {
    let cols = first.mean.len();
    let bins = merged.sum.len().saturating_sub(cols) / cols.max(1);
    let n = first.count as f64;
    (0..cols)
        .map(|c| {
            let variance = merged.sum.get(c).copied().unwrap_or(0.0) / n;
            ColumnSummary {
                name: names.get(c).cloned().unwrap_or_else(|| format!("col{c}")),
                count: first.count,
                mean: first.mean[c],
                variance,
                std: variance.sqrt(),
                min: first.min[c],
                max: first.max[c],
                histogram: (0..bins)
                    .map(|b| merged.sum[cols + c * bins + b].round() as u64)
                    .collect(),
            }
        })
        .collect()
}

//! Column statistics as two exact MapReduce passes, shared by the `stats` job and the
//! standardisation pass of the training jobs.
//!
//! Pass 1 ([`PHASE_SUMS`]) sums every column (features, then the label) and takes min and max;
//! pass 2 ([`PHASE_SQUARES`]) sums squared deviations from pass 1's means and, optionally,
//! counts a histogram over `[min, max]`. Two passes with exact sums give the variance to about
//! machine precision, independent of how the rows are spread over shards and nodes.

use serde::{Deserialize, Serialize};

use super::job::{JobError, Partial, ShardData};
use super::stats::Histogram;

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

/// Pass 1 map: per column sum, min and max over the shard's rows.
pub fn map_sums(data: &ShardData<'_>) -> Partial {
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
    p
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

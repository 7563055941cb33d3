//! Mergeable column statistics: the `stats` job's map and reduce, and the standardisation pass
//! of the learning jobs.
//!
//! Each shard summarises its rows into a [`Stats`]; the reducer merges the partials in shard-id
//! order with Chan et al.'s pairwise update, which matches one Welford pass over all rows to
//! about machine precision (everything is accumulated in `f64`).

use nalgebra::DMatrix;

/// Count, mean, sum of squared deviations (`m2`), min and max of one column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColumnStats {
    /// Number of values seen.
    pub count: u64,
    /// Running mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
    /// Smallest value; `+inf` while empty.
    pub min: f64,
    /// Largest value; `-inf` while empty.
    pub max: f64,
}

impl Default for ColumnStats {
    fn default() -> Self {
        Self {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl ColumnStats {
    /// Adds one value (Welford's update).
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        let delta = x - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (x - self.mean);
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Folds `other` into `self` (Chan et al.). Merging is exact for count/min/max and
    /// associative up to rounding for mean/m2, so reducers merge in shard-id order.
    pub fn merge(&mut self, other: &ColumnStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        let delta = other.mean - self.mean;
        self.mean += delta * (nb / n);
        self.m2 += other.m2 + delta * delta * (na * nb / n);
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Population variance (`m2 / count`); 0 when empty.
    pub fn variance(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.m2 / self.count as f64
        }
    }

    /// Sample variance (`m2 / (count - 1)`); 0 with fewer than two values.
    pub fn sample_variance(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            self.m2 / (self.count - 1) as f64
        }
    }

    /// Population standard deviation.
    pub fn std_dev(&self) -> f64 {
        self.variance().sqrt()
    }
}

/// Statistics of every column of a partition.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    /// One entry per column, in column order.
    pub columns: Vec<ColumnStats>,
}

impl Stats {
    /// Empty statistics for `cols` columns.
    pub fn new(cols: usize) -> Self {
        Self {
            columns: vec![ColumnStats::default(); cols],
        }
    }

    /// One pass over the rows of `x` (rows are samples, columns are features).
    pub fn from_matrix(x: &DMatrix<f32>) -> Self {
        let mut s = Self::new(x.ncols());
        for (c, col) in x.column_iter().enumerate() {
            for v in col.iter() {
                s.columns[c].push(f64::from(*v));
            }
        }
        s
    }

    /// One pass over row slices, all of length `cols`.
    ///
    /// # Panics
    /// If a row's length differs from `cols`.
    pub fn from_rows<'a>(cols: usize, rows: impl IntoIterator<Item = &'a [f32]>) -> Self {
        let mut s = Self::new(cols);
        for row in rows {
            assert_eq!(row.len(), cols, "ragged row");
            s.push_row(row);
        }
        s
    }

    /// Adds one row.
    pub fn push_row(&mut self, row: &[f32]) {
        for (c, v) in self.columns.iter_mut().zip(row) {
            c.push(f64::from(*v));
        }
    }

    /// Folds `other` into `self`, column by column.
    ///
    /// # Panics
    /// If the column counts differ (partials of one dataset always agree).
    pub fn merge(&mut self, other: &Stats) {
        assert_eq!(self.columns.len(), other.columns.len(), "column count");
        for (a, b) in self.columns.iter_mut().zip(&other.columns) {
            a.merge(b);
        }
    }

    /// Merges partials in the order given (callers pass them in shard-id order).
    pub fn merge_all<'a>(cols: usize, partials: impl IntoIterator<Item = &'a Stats>) -> Self {
        let mut s = Self::new(cols);
        for p in partials {
            s.merge(p);
        }
        s
    }
}

/// A histogram over the fixed range `[lo, hi]` with equal-width bins; values below `lo` or
/// above `hi` (and NaN) are counted apart. Two histograms merge only if their ranges and bin
/// counts agree, which is why the range comes from a prior [`Stats`] pass (min/max).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Lower edge of the first bin.
    pub lo: f64,
    /// Upper edge of the last bin (inclusive).
    pub hi: f64,
    /// Counts per bin.
    pub counts: Vec<u64>,
    /// Values below `lo`.
    pub below: u64,
    /// Values above `hi`, and NaNs.
    pub above: u64,
}

/// Histograms with different ranges or bin counts cannot be merged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("histogram ranges differ: [{a_lo}, {a_hi}]x{a_bins} vs [{b_lo}, {b_hi}]x{b_bins}")]
pub struct HistogramMismatch {
    a_lo: f64,
    a_hi: f64,
    a_bins: usize,
    b_lo: f64,
    b_hi: f64,
    b_bins: usize,
}

impl Histogram {
    /// An empty histogram. A degenerate range (`lo == hi`, as for a constant column) puts every
    /// in-range value in bin 0.
    ///
    /// # Panics
    /// If `bins == 0` or `!(lo <= hi)`.
    pub fn new(lo: f64, hi: f64, bins: usize) -> Self {
        assert!(bins > 0 && lo <= hi, "bad histogram range");
        Self {
            lo,
            hi,
            counts: vec![0; bins],
            below: 0,
            above: 0,
        }
    }

    /// Counts one value.
    pub fn push(&mut self, x: f64) {
        if x < self.lo {
            self.below += 1;
        } else if x > self.hi || x.is_nan() {
            self.above += 1;
        } else {
            let bins = self.counts.len();
            let width = self.hi - self.lo;
            let i = if width > 0.0 {
                (((x - self.lo) / width) * bins as f64) as usize
            } else {
                0
            };
            self.counts[i.min(bins - 1)] += 1;
        }
    }

    /// Histogram of column `col` of `x`.
    pub fn from_column(x: &DMatrix<f32>, col: usize, lo: f64, hi: f64, bins: usize) -> Self {
        let mut h = Self::new(lo, hi, bins);
        for v in x.column(col).iter() {
            h.push(f64::from(*v));
        }
        h
    }

    /// Adds `other`'s counts to `self`.
    pub fn merge(&mut self, other: &Histogram) -> Result<(), HistogramMismatch> {
        if self.lo != other.lo || self.hi != other.hi || self.counts.len() != other.counts.len() {
            return Err(HistogramMismatch {
                a_lo: self.lo,
                a_hi: self.hi,
                a_bins: self.counts.len(),
                b_lo: other.lo,
                b_hi: other.hi,
                b_bins: other.counts.len(),
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.below += other.below;
        self.above += other.above;
        Ok(())
    }

    /// Total values counted, in range or not.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum::<u64>() + self.below + self.above
    }
}

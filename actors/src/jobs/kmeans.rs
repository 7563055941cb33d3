//! k-means as iterative MapReduce: seeded k-means++ init, an assignment step whose per-shard
//! partials merge exactly in count and to rounding in sums, and the centroid update.
//!
//! Points are `n x d` `f32` rows; centroids are `k x d` `f64` rows. Ties in assignment go to the
//! lowest cluster index so every node assigns a point the same way.

use super::rng::Rng;
use nalgebra::DMatrix;

/// Lanes of the distance kernel's accumulator.
const LANES: usize = 8;

/// Squared Euclidean distance between a point and a centre: the one kernel of every k-means
/// distance (the distributed job's and this module's reference). Summed in [`LANES`]
/// independent lanes, so the compiler vectorises it, then lane by lane and the tail: the same
/// order for every call, so the result does not depend on where it runs.
#[inline]
pub fn dist2(row: &[f32], centre: &[f64]) -> f64 {
    let n = row.len().min(centre.len());
    let split = n - n % LANES;
    let (head, tail) = row[..n].split_at(split);
    let (chead, ctail) = centre[..n].split_at(split);
    let mut acc = [0f64; LANES];
    for (r, c) in head.chunks_exact(LANES).zip(chead.chunks_exact(LANES)) {
        for l in 0..LANES {
            let d = f64::from(r[l]) - c[l];
            acc[l] += d * d;
        }
    }
    let mut sum = acc.iter().sum::<f64>();
    for (&x, &m) in tail.iter().zip(ctail) {
        let d = f64::from(x) - m;
        sum += d * d;
    }
    sum
}

/// The nearest of `centroids` (row-major, `d` columns) to `row`, and the squared distance;
/// ties go to the lowest index, so every node assigns a point the same way.
#[inline]
pub fn nearest(row: &[f32], centroids: &[f64], d: usize) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (c, centre) in centroids.chunks_exact(d.max(1)).enumerate() {
        let dist = dist2(row, centre);
        if dist < best.1 {
            best = (c, dist);
        }
    }
    best
}

/// The rows of `points` as contiguous slices (a column-major matrix transposed once).
fn rows_of(points: &DMatrix<f32>) -> DMatrix<f32> {
    points.transpose()
}

/// `m`'s rows, row-major.
fn row_major(m: &DMatrix<f64>) -> Vec<f64> {
    m.transpose().as_slice().to_vec()
}

/// k-means++ seeding: the first centre uniformly, each next one with probability proportional
/// to the squared distance to the nearest centre chosen so far. When fewer than `k` distinct
/// points exist, the remaining centres repeat already-chosen points.
///
/// # Panics
/// If `k == 0` or `points` has no rows.
pub fn init_plus_plus(points: &DMatrix<f32>, k: usize, rng: &mut Rng) -> DMatrix<f64> {
    let n = points.nrows();
    assert!(k > 0 && n > 0, "k-means++ needs k > 0 and points");
    let rows = rows_of(points);
    let row = |i: usize| rows.column(i).as_slice().to_vec();
    let mut centroids = DMatrix::zeros(k, points.ncols());
    let first = rng.below(n as u64) as usize;
    centroids.set_row(0, &points.row(first).map(f64::from));
    let centre = |m: &DMatrix<f64>, c: usize| -> Vec<f64> { m.row(c).iter().copied().collect() };
    let c0 = centre(&centroids, 0);
    let mut d2: Vec<f64> = (0..n).map(|i| dist2(&row(i), &c0)).collect();
    for c in 1..k {
        let total: f64 = d2.iter().sum();
        let pick = if total > 0.0 {
            let target = rng.uniform_f64() * total;
            let mut acc = 0.0;
            // Falls back to the last point with positive weight if rounding overshoots.
            let mut pick = d2.iter().rposition(|&w| w > 0.0).unwrap_or(0);
            for (i, w) in d2.iter().enumerate() {
                acc += w;
                if acc > target && *w > 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            rng.below(n as u64) as usize
        };
        centroids.set_row(c, &points.row(pick).map(f64::from));
        let cc = centre(&centroids, c);
        for (i, w) in d2.iter_mut().enumerate() {
            *w = w.min(dist2(&row(i), &cc));
        }
    }
    centroids
}

/// One shard's (or one merged) result of an assignment step.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansPartial {
    /// Per-cluster sums of the assigned points (`k x d`).
    pub sums: DMatrix<f64>,
    /// Points assigned to each cluster.
    pub counts: Vec<u64>,
    /// Sum of squared distances to the assigned centroids.
    pub inertia: f64,
}

impl KMeansPartial {
    /// The empty partial for `k` clusters in `d` dimensions.
    pub fn empty(k: usize, d: usize) -> Self {
        Self {
            sums: DMatrix::zeros(k, d),
            counts: vec![0; k],
            inertia: 0.0,
        }
    }

    /// Adds `other` into `self`; reducers merge in shard-id order.
    ///
    /// # Panics
    /// If the shapes differ.
    pub fn merge(&mut self, other: &KMeansPartial) {
        assert_eq!(
            self.sums.shape(),
            other.sums.shape(),
            "k-means partial shape"
        );
        self.sums += &other.sums;
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.inertia += other.inertia;
    }

    /// Points counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Assigns each point to its nearest centroid and sums per cluster.
///
/// # Panics
/// If the dimensions of points and centroids differ.
pub fn assign(points: &DMatrix<f32>, centroids: &DMatrix<f64>) -> KMeansPartial {
    assert_eq!(points.ncols(), centroids.ncols(), "dimension mismatch");
    let mut p = KMeansPartial::empty(centroids.nrows(), centroids.ncols());
    let rows = rows_of(points);
    let flat = row_major(centroids);
    for i in 0..points.nrows() {
        let (c, d) = nearest(rows.column(i).as_slice(), &flat, centroids.ncols());
        for j in 0..points.ncols() {
            p.sums[(c, j)] += f64::from(points[(i, j)]);
        }
        p.counts[c] += 1;
        p.inertia += d;
    }
    p
}

/// New centroids: each cluster's mean; an empty cluster keeps its old centroid.
pub fn update_centroids(merged: &KMeansPartial, old: &DMatrix<f64>) -> DMatrix<f64> {
    let mut next = old.clone();
    for (c, &count) in merged.counts.iter().enumerate() {
        if count > 0 {
            next.set_row(c, &(merged.sums.row(c) / count as f64));
        }
    }
    next
}

/// The result of [`lloyd`].
#[derive(Debug, Clone, PartialEq)]
pub struct KMeansResult {
    /// Final centroids.
    pub centroids: DMatrix<f64>,
    /// Inertia of the final assignment step (against the centroids it started from).
    pub inertia: f64,
    /// Assignment steps run.
    pub iterations: usize,
}

/// Single-process k-means (a reference): k-means++ from `rng`, then Lloyd steps until the sum of
/// the centroids' squared moves is at most `tol` or `max_iter` steps.
pub fn lloyd(
    points: &DMatrix<f32>,
    k: usize,
    rng: &mut Rng,
    max_iter: usize,
    tol: f64,
) -> KMeansResult {
    let init = init_plus_plus(points, k, rng);
    lloyd_from(points, init, max_iter, tol)
}

/// Lloyd steps from given initial centroids until the sum of the centroids' squared moves is at
/// most `tol` (an absolute threshold: the distributed job uses its `tol` times the mean column
/// variance, as scikit-learn does) or `max_iter` steps.
pub fn lloyd_from(
    points: &DMatrix<f32>,
    init: DMatrix<f64>,
    max_iter: usize,
    tol: f64,
) -> KMeansResult {
    let mut centroids = init;
    let mut inertia = f64::INFINITY;
    let mut iterations = 0;
    while iterations < max_iter {
        let p = assign(points, &centroids);
        inertia = p.inertia;
        iterations += 1;
        let next = update_centroids(&p, &centroids);
        let moved = squared_shift(&centroids, &next);
        centroids = next;
        if moved <= tol {
            break;
        }
    }
    KMeansResult {
        centroids,
        inertia,
        iterations,
    }
}

/// The sum over centroids of the squared distance each moved (scikit-learn's `center_shift_tot`).
pub fn squared_shift(old: &DMatrix<f64>, new: &DMatrix<f64>) -> f64 {
    (new - old).norm_squared()
}

//! Tests of [`super::kmeans`].

use super::kmeans::*;
use super::rng::Rng;
use nalgebra::DMatrix;

const CENTERS: [[f64; 2]; 3] = [[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]];

/// `per` points around each of [`CENTERS`], spread ±0.5, interleaved by cluster.
fn blobs(per: usize, seed: u64) -> DMatrix<f32> {
    let mut rng = Rng::for_task(seed, 0, 0);
    DMatrix::from_fn(per * CENTERS.len(), 2, |i, j| {
        (CENTERS[i % CENTERS.len()][j] + rng.uniform_f64() - 0.5) as f32
    })
}

#[test]
fn converges_to_the_true_centers() {
    let points = blobs(100, 1);
    let res = lloyd(&points, 3, &mut Rng::for_task(5, 0, 0), 50, 1e-9);
    assert!(res.iterations < 50);
    for c in CENTERS {
        let best = res
            .centroids
            .row_iter()
            .map(|r| ((r[0] - c[0]).powi(2) + (r[1] - c[1]).powi(2)).sqrt())
            .fold(f64::INFINITY, f64::min);
        assert!(best < 0.15, "center {c:?} off by {best}");
    }
    // Uniform noise of width 1 in 2 dims: about 1/6 per point.
    assert!(res.inertia / 300.0 < 0.25, "{}", res.inertia);
}

#[test]
fn init_is_seeded_and_spreads_out() {
    let points = blobs(50, 2);
    let a = init_plus_plus(&points, 3, &mut Rng::for_task(9, 0, 0));
    let b = init_plus_plus(&points, 3, &mut Rng::for_task(9, 0, 0));
    assert_eq!(a, b);
    // Well-separated blobs: k-means++ picks one seed from each.
    let mut owners: Vec<usize> = a
        .row_iter()
        .map(|r| {
            (0..3)
                .min_by(|&x, &y| {
                    let dx = (r[0] - CENTERS[x][0]).powi(2) + (r[1] - CENTERS[x][1]).powi(2);
                    let dy = (r[0] - CENTERS[y][0]).powi(2) + (r[1] - CENTERS[y][1]).powi(2);
                    dx.total_cmp(&dy)
                })
                .unwrap_or(0)
        })
        .collect();
    owners.sort_unstable();
    assert_eq!(owners, vec![0, 1, 2]);
}

#[test]
fn init_with_duplicate_points() {
    let points = DMatrix::from_row_slice(3, 1, &[1.0f32, 1.0, 1.0]);
    let c = init_plus_plus(&points, 2, &mut Rng::for_task(1, 0, 0));
    assert_eq!(c, DMatrix::from_row_slice(2, 1, &[1.0, 1.0]));
}

#[test]
fn partials_merge_to_the_single_pass() {
    let points = blobs(40, 3);
    let centroids = init_plus_plus(&points, 3, &mut Rng::for_task(4, 0, 0));
    let whole = assign(&points, &centroids);
    let mut merged = KMeansPartial::empty(3, 2);
    for (start, len) in [(0, 7), (7, 0), (7, 60), (67, 53)] {
        merged.merge(&assign(&points.rows(start, len).into_owned(), &centroids));
    }
    assert_eq!(merged.counts, whole.counts);
    assert_eq!(merged.total(), 120);
    assert!((merged.inertia - whole.inertia).abs() <= 1e-9 * whole.inertia);
    assert!((&merged.sums - &whole.sums).amax() <= 1e-9 * whole.sums.amax());
    let a = update_centroids(&merged, &centroids);
    let b = update_centroids(&whole, &centroids);
    assert!((a - b).amax() < 1e-9);
}

#[test]
fn empty_cluster_keeps_its_centroid() {
    let points = DMatrix::from_row_slice(2, 1, &[0.0f32, 1.0]);
    let old = DMatrix::from_row_slice(2, 1, &[0.5, 100.0]);
    let p = assign(&points, &old);
    assert_eq!(p.counts, vec![2, 0]);
    assert_eq!(
        update_centroids(&p, &old),
        DMatrix::from_row_slice(2, 1, &[0.5, 100.0])
    );
}

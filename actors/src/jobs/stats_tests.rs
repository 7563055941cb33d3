//! Tests of [`super::stats`]: merged partials equal one pass.

use super::stats::{ColumnStats, Histogram, Stats};
use nalgebra::DMatrix;
use proptest::prelude::*;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

fn assert_stats_close(a: &Stats, b: &Stats) {
    assert_eq!(a.columns.len(), b.columns.len());
    for (x, y) in a.columns.iter().zip(&b.columns) {
        assert_eq!(x.count, y.count);
        assert_eq!(x.min, y.min);
        assert_eq!(x.max, y.max);
        assert!(close(x.mean, y.mean, 1e-9), "mean {} vs {}", x.mean, y.mean);
        assert!(close(x.m2, y.m2, 1e-9), "m2 {} vs {}", x.m2, y.m2);
    }
}

#[test]
fn known_values() {
    let mut c = ColumnStats::default();
    for v in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
        c.push(v);
    }
    assert_eq!(c.count, 8);
    assert_eq!(c.mean, 5.0);
    assert_eq!(c.variance(), 4.0);
    assert_eq!(c.std_dev(), 2.0);
    assert!((c.sample_variance() - 32.0 / 7.0).abs() < 1e-12);
    assert_eq!((c.min, c.max), (2.0, 9.0));
    assert_eq!(ColumnStats::default().variance(), 0.0);
}

#[test]
fn matrix_and_rows_agree() {
    let x = DMatrix::from_row_slice(3, 2, &[1.0f32, 10.0, 2.0, 20.0, 3.0, 60.0]);
    let rows: Vec<Vec<f32>> = x.row_iter().map(|r| r.iter().copied().collect()).collect();
    let a = Stats::from_matrix(&x);
    let b = Stats::from_rows(2, rows.iter().map(|r| r.as_slice()));
    assert_eq!(a, b);
    assert_eq!(a.columns[1].mean, 30.0);
}

#[test]
fn merging_empty_is_identity() {
    let x = DMatrix::from_row_slice(2, 1, &[1.0f32, 3.0]);
    let s = Stats::from_matrix(&x);
    let mut e = Stats::new(1);
    e.merge(&s);
    assert_eq!(e, s);
    let mut s2 = s.clone();
    s2.merge(&Stats::new(1));
    assert_eq!(s2, s);
}

#[test]
fn histogram_bins_and_merge() {
    let mut h = Histogram::new(0.0, 10.0, 5);
    for v in [0.0, 1.9, 2.0, 9.99, 10.0, -1.0, 11.0, f64::NAN] {
        h.push(v);
    }
    assert_eq!(h.counts, vec![2, 1, 0, 0, 2]);
    assert_eq!((h.below, h.above), (1, 2));
    let mut g = Histogram::new(0.0, 10.0, 5);
    g.push(5.0);
    g.merge(&h).expect("same range");
    assert_eq!(g.counts, vec![2, 1, 1, 0, 2]);
    assert_eq!(g.total(), 9);
    assert!(g.merge(&Histogram::new(0.0, 10.0, 4)).is_err());
    let mut flat = Histogram::new(3.0, 3.0, 4);
    flat.push(3.0);
    assert_eq!(flat.counts, vec![1, 0, 0, 0]);
}

#[test]
fn histogram_from_column() {
    let x = DMatrix::from_row_slice(4, 2, &[0.0f32, 1.0, 1.0, 1.0, 2.0, 1.0, 3.0, 1.0]);
    let h = Histogram::from_column(&x, 0, 0.0, 3.0, 3);
    assert_eq!(h.counts, vec![1, 1, 2]);
}

fn rows_and_cuts() -> impl Strategy<Value = (Vec<Vec<f32>>, Vec<usize>)> {
    (1usize..4, 1usize..120).prop_flat_map(|(cols, n)| {
        (
            prop::collection::vec(prop::collection::vec(-1.0e3f32..1.0e3, cols), n),
            prop::collection::vec(0..=n, 0..6),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn merged_partials_equal_single_pass((rows, mut cuts) in rows_and_cuts()) {
        let cols = rows[0].len();
        let whole = Stats::from_rows(cols, rows.iter().map(|r| r.as_slice()));
        cuts.push(0);
        cuts.push(rows.len());
        cuts.sort_unstable();
        let partials: Vec<Stats> = cuts
            .windows(2)
            .map(|w| Stats::from_rows(cols, rows[w[0]..w[1]].iter().map(|r| r.as_slice())))
            .collect();
        let merged = Stats::merge_all(cols, &partials);
        assert_stats_close(&merged, &whole);
    }
}

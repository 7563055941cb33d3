//! A seeded synthetic ratings table with a planted low-rank structure (pure): the data of
//! the matrix-factorisation tests, demo and benchmarks.
//!
//! Every user `u` and item `i` get hidden factors of `rank` values (standard normal divided by
//! `rank^(1/4)`, so a dot product has unit variance); a rating is `3 + u* . i* + noise` (noise
//! normal with standard deviation `noise`). Users are drawn uniformly, items with a skewed
//! popularity (the `i`-th most popular about `1/sqrt(i)` as often); a pair drawn twice is
//! rated twice, as in real logs. The same spec gives the same rows on every platform.

use crate::dataset::SplitMix64;

/// One rating: `(user, item, rating)`.
pub type Rating = (u64, u64, f32);

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatingsSpec {
    pub users: u64,
    pub items: u64,
    /// Rank of the planted structure.
    pub rank: usize,
    /// Rows to generate.
    pub ratings: usize,
    /// Standard deviation of the noise added to each rating.
    pub noise: f64,
    pub seed: u64,
}

fn factors(seed: u64, what: u64, id: u64, rank: usize) -> Vec<f64> {
    let mut g = SplitMix64(
        seed ^ what.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id.wrapping_mul(0xd1b5_4a32_d192_ed03),
    );
    let scale = (rank as f64).powf(0.25);
    (0..rank).map(|_| g.normal() / scale).collect()
}

/// The rows `(user, item, rating)`, in generation order.
pub fn generate(spec: &RatingsSpec) -> Vec<Rating> {
    let users = spec.users.max(1);
    let items = spec.items.max(1);
    let mut g = SplitMix64(spec.seed);
    let mut cache_u: std::collections::HashMap<u64, Vec<f64>> = Default::default();
    let mut cache_i: std::collections::HashMap<u64, Vec<f64>> = Default::default();
    (0..spec.ratings)
        .map(|_| {
            let u = g.next_u64() % users;
            // Skewed popularity: i = items * x^2 for x uniform puts density ~ 1/sqrt(i).
            let x = g.unit();
            let i = ((items as f64 * x * x) as u64).min(items - 1);
            let fu = cache_u
                .entry(u)
                .or_insert_with(|| factors(spec.seed, 1, u, spec.rank));
            let dot: f64 = {
                let fi = cache_i
                    .entry(i)
                    .or_insert_with(|| factors(spec.seed, 2, i, spec.rank));
                fu.iter().zip(fi.iter()).map(|(a, b)| a * b).sum()
            };
            let r = 3.0 + dot + spec.noise * g.normal();
            (u, i, r as f32)
        })
        .collect()
}

/// Splits rows into train and test: each row goes to test with probability `test_fraction`
/// (seeded by `seed`).
pub fn split(rows: &[Rating], test_fraction: f64, seed: u64) -> (Vec<Rating>, Vec<Rating>) {
    let mut g = SplitMix64(seed ^ 0x7465_7374);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for &r in rows {
        if g.unit() < test_fraction {
            test.push(r);
        } else {
            train.push(r);
        }
    }
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_in_range() {
        let spec = RatingsSpec {
            users: 50,
            items: 20,
            rank: 3,
            ratings: 2000,
            noise: 0.1,
            seed: 4,
        };
        let a = generate(&spec);
        assert_eq!(a, generate(&spec));
        assert_ne!(a, generate(&RatingsSpec { seed: 5, ..spec }));
        assert!(a.iter().all(|&(u, i, r)| u < 50 && i < 20 && r.is_finite()));
        let mean = a.iter().map(|r| f64::from(r.2)).sum::<f64>() / a.len() as f64;
        assert!((mean - 3.0).abs() < 0.2, "{mean}");
        let (train, test) = split(&a, 0.2, 1);
        assert_eq!(train.len() + test.len(), a.len());
        assert!((300..500).contains(&test.len()), "{}", test.len());
    }
}

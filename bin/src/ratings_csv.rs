//! `tidepool dataset builtin ratings --out DIR`: the seeded synthetic ratings of
//! `tidepool_runtime::ratings` (a planted low-rank structure plus noise) split into
//! `DIR/train.csv` and `DIR/test.csv`, header `user,item,rating`: the data of an `mf` job
//! (import `train.csv` with `--label rating`, then `predict` the model on `test.csv`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use tidepool_actors::jobs::mf::MAX_ID;
use tidepool_runtime::ratings::{generate, split, RatingsSpec};

/// The dataset's name for `dataset builtin`.
pub const NAME: &str = "ratings";
/// Its label column.
pub const LABEL: &str = "rating";
/// Its header row.
pub const HEADER: &str = "user,item,rating";

/// What to generate (`dataset builtin ratings` options).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatingsOptions {
    /// User ids `0..users`.
    pub users: u64,
    /// Item ids `0..items`.
    pub items: u64,
    /// Rows generated before the split.
    pub ratings: usize,
    /// Rank of the planted structure.
    pub rank: usize,
    /// Standard deviation of the noise on each rating.
    pub noise: f64,
    /// Generator seed (the split has its own).
    pub data_seed: u64,
}

impl Default for RatingsOptions {
    fn default() -> Self {
        RatingsOptions {
            users: 2000,
            items: 500,
            ratings: 100_000,
            rank: 8,
            noise: 0.1,
            data_seed: 42,
        }
    }
}

/// Writes `rows` as CSV with [`HEADER`] (ratings in `f32`'s shortest exact text).
fn write_rows(path: &Path, rows: &[(u64, u64, f32)]) -> Result<()> {
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::new(file);
    let mut write = || -> std::io::Result<()> {
        writeln!(w, "{HEADER}")?;
        for (u, i, r) in rows {
            writeln!(w, "{u},{i},{r}")?;
        }
        w.flush()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Generates the ratings of `opts`, splits them (each row to test with probability
/// `test_fraction`, seeded by `seed`) and writes `out/train.csv` and `out/test.csv`; returns
/// their paths and row counts.
pub fn write_ratings(
    out: &Path,
    opts: &RatingsOptions,
    test_fraction: f64,
    seed: u64,
) -> Result<(PathBuf, PathBuf, usize, usize)> {
    ensure!(
        test_fraction > 0.0 && test_fraction < 1.0,
        "--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}"
    );
    for (flag, n) in [("--users", opts.users), ("--items", opts.items)] {
        ensure!(
            (1..=MAX_ID).contains(&n),
            "{flag} must be between 1 and {MAX_ID} (ids must be exact in an f32 column), got {n}"
        );
    }
    ensure!(opts.rank >= 1, "--rank must be at least 1");
    ensure!(opts.ratings >= 1, "--ratings must be at least 1");
    ensure!(
        opts.noise.is_finite() && opts.noise >= 0.0,
        "--noise must be a finite standard deviation >= 0, got {}",
        opts.noise
    );
    let rows = generate(&RatingsSpec {
        users: opts.users,
        items: opts.items,
        rank: opts.rank,
        ratings: opts.ratings,
        noise: opts.noise,
        seed: opts.data_seed,
    });
    let (train, test) = split(&rows, test_fraction, seed);
    drop(rows);
    ensure!(
        !train.is_empty() && !test.is_empty(),
        "--test-fraction {test_fraction} leaves the training or test set empty ({} ratings)",
        opts.ratings
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (train_path, test_path) = (out.join("train.csv"), out.join("test.csv"));
    write_rows(&train_path, &train)?;
    write_rows(&test_path, &test)?;
    Ok((train_path, test_path, train.len(), test.len()))
}

/// `tidepool dataset builtin ratings --out DIR`: [`write_ratings`], then prints the two paths
/// (or with `json` `{"train", "test", "train_rows", "test_rows"}`).
pub fn builtin_main(
    out: &Path,
    opts: &RatingsOptions,
    test_fraction: f64,
    seed: u64,
    json: bool,
) -> Result<()> {
    let (train, test, n_train, n_test) = write_ratings(out, opts, test_fraction, seed)?;
    if json {
        let doc = serde_json::json!({
            "train": train, "test": test, "train_rows": n_train, "test_rows": n_test,
        });
        println!("{doc}");
        return Ok(());
    }
    println!("{}", train.display());
    println!("{}", test.display());
    eprintln!(
        "{NAME}: {n_train} training rows, {n_test} test rows ({} users, {} items, rank {}, data \
         seed {}, split seed {seed}); label column {LABEL:?}",
        opts.users, opts.items, opts.rank, opts.data_seed
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn header_and_row_counts() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RatingsOptions {
            users: 50,
            items: 20,
            ratings: 1000,
            ..RatingsOptions::default()
        };
        let (train, test, n_train, n_test) = write_ratings(dir.path(), &opts, 0.2, 7).unwrap();
        assert_eq!(n_train + n_test, 1000);
        assert!((100..300).contains(&n_test), "{n_test}");
        for (path, n) in [(&train, n_train), (&test, n_test)] {
            let text = std::fs::read_to_string(path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines[0], HEADER);
            assert_eq!(lines.len(), n + 1);
            let t = tidepool_runtime::dataset::parse_csv(File::open(path).unwrap(), LABEL).unwrap();
            assert_eq!(
                (t.rows, t.features.clone()),
                (n, vec!["user".into(), "item".into()])
            );
            assert!(t
                .x
                .iter()
                .all(|v| v.fract() == 0.0 && *v >= 0.0 && *v < 50.0));
        }
        // Same seeds, same files; another data seed, other ratings.
        let again = tempfile::tempdir().unwrap();
        write_ratings(again.path(), &opts, 0.2, 7).unwrap();
        let read = |d: &Path| std::fs::read(d.join("train.csv")).unwrap();
        assert_eq!(read(dir.path()), read(again.path()));
        let other = RatingsOptions {
            data_seed: 1,
            ..opts
        };
        write_ratings(again.path(), &other, 0.2, 7).unwrap();
        assert_ne!(read(dir.path()), read(again.path()));
        builtin_main(&dir.path().join("j"), &opts, 0.2, 7, true).unwrap();
        let bad = [
            RatingsOptions { users: 0, ..opts },
            RatingsOptions { rank: 0, ..opts },
            RatingsOptions {
                noise: -1.0,
                ..opts
            },
            RatingsOptions { ratings: 0, ..opts },
        ];
        for b in bad {
            assert!(write_ratings(dir.path(), &b, 0.2, 7).is_err(), "{b:?}");
        }
        assert!(write_ratings(dir.path(), &opts, 1.0, 7).is_err());
    }
}

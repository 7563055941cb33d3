//! `tidepool recommend --model DIR --user ID [--top N] [--json]`: the items a matrix
//! factorisation model (`job result ID --out DIR` of an `mf` job) scores highest for one user,
//! leaving out the items that user rated in training. A score is `mu + user . item`; ties go
//! to the smaller item id. Reads the user's row, the item factors and the user's rated items,
//! never the other users.

use std::cmp::Ordering;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use tidepool_actors::jobs::mf;

use crate::mf_model::MfModel;

/// One recommended item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    pub item: u32,
    /// The predicted rating, `mu + user . item`.
    pub score: f64,
}

/// Best first: higher score, then smaller item id; a NaN score (a diverged model) ranks last.
fn rank_order(a: &Recommendation, b: &Recommendation) -> Ordering {
    let key = |s: f64| if s.is_nan() { f64::NEG_INFINITY } else { s };
    key(b.score)
        .total_cmp(&key(a.score))
        .then(a.item.cmp(&b.item))
}

/// The `top` best items for a user with embedding `user` among `items` (row-major, as wide as
/// `user`), skipping `rated` (increasing item ids).
pub fn top_items(
    mu: f64,
    user: &[f32],
    items: &[f32],
    rated: &[u32],
    top: usize,
) -> Vec<Recommendation> {
    let k = user.len();
    if k == 0 || top == 0 {
        return Vec::new();
    }
    let n = items.len() / k;
    let mut scored: Vec<Recommendation> = (0..n as u64)
        .filter(|&i| rated.binary_search(&(i as u32)).is_err())
        .map(|i| Recommendation {
            item: i as u32,
            score: mf::predict(user, items, k, mu, 0, i),
        })
        .collect();
    if scored.len() > top {
        scored.select_nth_unstable_by(top - 1, rank_order);
        scored.truncate(top);
    }
    scored.sort_unstable_by(rank_order);
    scored
}

/// The `top` recommendations for `user` from the model in `dir`; a user beyond the model is a
/// not-found error (exit code 4).
pub fn recommend(dir: &Path, user: u64, top: usize) -> Result<Vec<Recommendation>> {
    let mut model = MfModel::open(dir)?;
    let row = model.user_row(user)?;
    let rated = model.rated(user)?;
    let items = model.item_factors()?;
    Ok(top_items(model.mf.mu, &row, &items, &rated, top))
}

/// `tidepool recommend`: prints `item score` lines, or with `json` one document
/// `{"user": ID, "items": [{"item": I, "score": S}, ...]}`.
pub fn recommend_main(dir: &Path, user: u64, top: usize, json: bool) -> Result<()> {
    let recs = recommend(dir, user, top)?;
    if json {
        #[derive(Serialize)]
        struct Report<'a> {
            user: u64,
            items: &'a [Recommendation],
        }
        let report = Report { user, items: &recs };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for r in &recs {
        println!("{} {:.6}", r.item, r.score);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::exit::{CliError, Exit};

    #[test]
    fn rated_items_are_skipped_and_ties_go_to_the_smaller_id() {
        // Items 0..5 with scores 1 + (2, 5, 5, 1, 9) for user (1, 0).
        let items = [2.0, 0.0, 5.0, 0.0, 5.0, 3.0, 1.0, 0.0, 9.0, 0.0];
        let top = top_items(1.0, &[1.0, 0.0], &items, &[4], 3);
        let got: Vec<(u32, f64)> = top.iter().map(|r| (r.item, r.score)).collect();
        assert_eq!(got, vec![(1, 6.0), (2, 6.0), (0, 3.0)]);
        assert_eq!(top_items(1.0, &[1.0, 0.0], &items, &[], 1)[0].item, 4);
        assert_eq!(
            top_items(1.0, &[1.0, 0.0], &items, &[0, 1, 2, 3, 4], 3),
            vec![]
        );
        assert_eq!(top_items(1.0, &[1.0, 0.0], &items, &[], 50).len(), 5);
    }

    #[tokio::test]
    async fn recommends_from_a_written_model_directory() {
        let (doc, src) = crate::mf_dir::tests::fixture();
        let dir = tempfile::tempdir().unwrap();
        crate::mf_dir::write(dir.path(), &doc, "j1", None, "rating", &src)
            .await
            .unwrap();
        // User 0 = (1, 0) rated items 0, 1, 3; item 2 is left (its initial row).
        let recs = recommend(dir.path(), 0, 10).unwrap();
        assert_eq!(recs.iter().map(|r| r.item).collect::<Vec<_>>(), vec![2]);
        // User 1 = (0.5, 0.5) rated item 0: items 3 (3 + 1.5), 2 (3 + its initial row, within
        // 0.1), 1 (3 - 0.125).
        let recs = recommend(dir.path(), 1, 3).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.item).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        assert_eq!((recs[0].score, recs[2].score), (4.5, 2.875));
        assert_eq!(recommend(dir.path(), 1, 1).unwrap(), recs[..1].to_vec());
        let err = recommend(dir.path(), 3, 2).unwrap_err();
        assert_eq!(Exit::of(&err), Exit::NotFound);
        assert!(err.downcast_ref::<CliError>().is_some());
        assert!(
            err.to_string().contains("user 3 is not in the model"),
            "{err}"
        );
        recommend_main(dir.path(), 1, 2, true).unwrap();
    }
}

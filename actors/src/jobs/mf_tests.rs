//! Matrix factorisation and the parameter tables: the in-process parameter server against the
//! plain reference, exactly-once pushes, order independence, rollback.

use tidepool_runtime::control::{DatasetRecord, DatasetSource};
use tidepool_runtime::jobspec::JobSpec;
use tidepool_runtime::ratings::{self, Rating};

use super::job::ShardData;
use super::mf::{self, item_key, user_key, MfJob};
use super::ps::{ParamTable, RowModel, TableError};
use super::registry::{self, run_local_tables};

fn spec(extra: &str) -> JobSpec {
    JobSpec::parse(&format!(
        "[job]\nkind = \"mf\"\ndataset = \"r\"\n[model]\nrank = 8\nuser_column = \"user\"\n\
         item_column = \"item\"\n[train]\nepochs = 30\nbatch_size = 500\nlearning_rate = 0.05\n\
         l2 = 0.02\nseed = 3\ncheckpoint_every = 7\n{extra}"
    ))
    .unwrap()
}

/// `n` ratings split over `shards` shards by row id (as a stored dataset is).
/// Per shard: features, labels, and the same rows as ratings.
type Shards = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<Rating>>);

fn shards_of(n: usize, shards: u32) -> Shards {
    let t = ratings::generate(&ratings::RatingsSpec {
        users: 300,
        items: 120,
        rank: 4,
        ratings: n,
        noise: 0.1,
        seed: 11,
    });
    let mut x = vec![Vec::new(); shards as usize];
    let mut y = vec![Vec::new(); shards as usize];
    let mut triples = vec![Vec::new(); shards as usize];
    for (r, &(u, i, v)) in t.iter().enumerate() {
        let s = r % shards as usize;
        x[s].extend_from_slice(&[u as f32, i as f32]);
        y[s].push(v);
        triples[s].push((u, i, v));
    }
    (x, y, triples)
}

fn record(rows: u64, shards: u32) -> DatasetRecord {
    DatasetRecord {
        name: "r".into(),
        features: vec!["user".into(), "item".into()],
        label: "rating".into(),
        rows,
        shards,
        source: DatasetSource::Imported {
            import: "test".into(),
            segments: vec![1; shards as usize],
        },
    }
}

#[test]
fn parameter_server_equals_the_plain_reference_bit_for_bit() {
    let spec = spec("");
    let (x, y, triples) = shards_of(6000, 4);
    let data: Vec<ShardData<'_>> = (0..4)
        .map(|s| ShardData {
            shard: s as u32,
            features: 2,
            x: &x[s],
            y: &y[s],
            csr: None,
        })
        .collect();
    let job = registry::build("j", &spec, &record(6000, 4)).unwrap();
    let (result, mut tables) = run_local_tables(job, &data).unwrap();
    let (pu, qi, mu) = mf::reference_train(&spec, &triples);
    assert_eq!(result["mu"].as_f64().unwrap(), mu);
    let m = MfJob::new("j", spec.clone(), &["user".into(), "item".into()], 6000, 4).unwrap();
    let step = result["steps"].as_u64().unwrap();
    let mut got_u = vec![0.0f32; pu.len()];
    let mut got_i = vec![0.0f32; qi.len()];
    let k = 8;
    for table in &mut tables {
        let (keys, values) = table.save(&m, step).unwrap();
        for (n, key) in keys.iter().enumerate() {
            let (t, id) = (key >> 32, (key & 0xffff_ffff) as usize);
            let dst = if t == mf::USERS {
                &mut got_u
            } else {
                &mut got_i
            };
            dst[id * k..(id + 1) * k].copy_from_slice(&values[n * k..(n + 1) * k]);
        }
    }
    // Rows training never touched are at their initial value.
    for (u, row) in got_u.chunks_mut(k).enumerate() {
        if row.iter().all(|&v| v == 0.0) {
            m.init_row(user_key(u as u64), row);
        }
    }
    for (i, row) in got_i.chunks_mut(k).enumerate() {
        if row.iter().all(|&v| v == 0.0) {
            m.init_row(item_key(i as u64), row);
        }
    }
    assert_eq!(got_u, pu, "user embeddings differ from the reference");
    assert_eq!(got_i, qi, "item embeddings differ from the reference");
    // And it learned: the planted structure is recovered well below the ratings' spread.
    let all: Vec<_> = triples.concat();
    let train = mf::rmse(&pu, &qi, k, mu, &all);
    let spread = mf::rmse(&[], &[], k, mu, &all);
    assert!(
        train < 0.5 * spread,
        "train rmse {train} vs predicting the mean {spread}"
    );
}

#[test]
fn same_model_whatever_the_shard_layout_of_pushes() {
    // Pushes of one step arriving in any order give the same rows (applied in source order).
    let m = MfJob::new("j", spec(""), &["user".into(), "item".into()], 10, 1).unwrap();
    let keys = [user_key(1), user_key(2), item_key(5)];
    let g = |s: f32| -> Vec<f32> { (0..24).map(|j| s * (j as f32 + 0.37) / 7.0).collect() };
    let mut a = ParamTable::new(0);
    let mut b = ParamTable::new(0);
    for src in [0u32, 1, 2, 3] {
        a.push(&m, (0, 0), src, &keys, &g(src as f32 + 0.1))
            .unwrap();
    }
    for src in [3u32, 1, 0, 2] {
        b.push(&m, (0, 0), src, &keys, &g(src as f32 + 0.1))
            .unwrap();
    }
    // A repeated push is recognised and not applied twice.
    assert_eq!(b.push(&m, (0, 0), 1, &keys, &g(1.1)).unwrap(), 0);
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    a.pull(&m, 1, &keys, &mut ra).unwrap();
    b.pull(&m, 1, &keys, &mut rb).unwrap();
    assert_eq!(ra, rb);
    // A straggler of step 0 is refused once the table moved on.
    assert!(matches!(
        a.push(&m, (0, 1), 4, &keys, &g(1.0)),
        Err(TableError::Stale {
            step: 0,
            version: 1
        })
    ));
    // Malformed requests are refused, not applied.
    assert!(matches!(
        a.push(&m, (1, 1), 0, &[user_key(2), user_key(1)], &g(1.0)[..16]),
        Err(TableError::Malformed(_))
    ));
    assert!(matches!(
        a.push(&m, (1, 1), 0, &keys, &g(1.0)[..5]),
        Err(TableError::Malformed(_))
    ));
    let mut bad = g(1.0);
    bad[3] = f32::NAN;
    assert!(matches!(
        a.push(&m, (1, 1), 0, &keys, &bad),
        Err(TableError::NotFinite { .. })
    ));
    // Saved and restored, a table reads the same.
    let (k2, v2) = a.save(&m, 1).unwrap();
    let mut c = ParamTable::from_rows(&m, 1, &k2, &v2).unwrap();
    let mut rc = Vec::new();
    c.pull(&m, 1, &keys, &mut rc).unwrap();
    assert_eq!(ra, rc);
}

#[test]
fn rollback_resumes_from_the_saved_step_and_ends_identical() {
    use super::job::Job;
    let spec = spec("");
    let m = MfJob::new("j", spec, &["user".into(), "item".into()], 6000, 4).unwrap();
    let mut st = m.init();
    st.step = 9;
    st.saved = 7;
    st.losses.sse = 3.0;
    st.losses_at_saved.sse = 1.0;
    assert_eq!(m.rollback(&mut st), 7);
    assert_eq!((st.step, st.losses.sse, st.rollbacks), (7, 1.0, 1));
}

#[test]
fn ids_must_be_integers_in_range() {
    let spec = spec("");
    let job = registry::build("j", &spec, &record(2, 1)).unwrap();
    for bad in [-1.0f32, 1.5, 3.0e7] {
        let x = [bad, 1.0, 2.0, 3.0];
        let y = [1.0f32, 2.0];
        let d = ShardData {
            shard: 0,
            features: 2,
            x: &x,
            y: &y,
            csr: None,
        };
        let err = registry::run_local(job.clone(), &[d])
            .unwrap_err()
            .to_string();
        assert!(err.contains("user id"), "{err}");
    }
    let err = MfJob::new("j", spec, &["a".into(), "item".into()], 2, 1).unwrap_err();
    assert!(err.to_string().contains("user_column"), "{err}");
}

#[test]
fn batches_cover_every_row_once_per_epoch() {
    for (n, per_epoch) in [(1000usize, 7u64), (13, 13), (5, 9), (1, 1)] {
        let mut seen = vec![0u32; n];
        for step in 0..per_epoch {
            for r in mf::batch_rows(5, step, per_epoch, 2, n) {
                seen[r] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "n {n} per_epoch {per_epoch}");
        // The next epoch visits them in another order.
        let a = mf::batch_rows(5, 0, per_epoch, 2, n);
        let b = mf::batch_rows(5, per_epoch, per_epoch, 2, n);
        if n > 5 {
            assert_ne!(a, b);
        }
    }
}

#[test]
fn steps_run_ahead_only_up_to_the_next_save() {
    use super::ps::step_ahead;
    // every 10, 100 steps in all, from step 3.
    assert_eq!(step_ahead(3, 0, 10, 100), Some(3));
    assert_eq!(step_ahead(3, 6, 10, 100), Some(9));
    assert_eq!(step_ahead(3, 7, 10, 100), None, "step 10 follows a save");
    assert_eq!(step_ahead(10, 9, 10, 100), Some(19));
    assert_eq!(step_ahead(95, 4, 10, 100), Some(99));
    assert_eq!(step_ahead(95, 5, 10, 100), None, "past the end");
}

#[test]
fn ssp_reads_lag_at_most_the_steps_not_complete() {
    // A pull for step 5 with steps 0..3 complete reads the table with exactly those applied,
    // though pushes of step 3 and 4 are there; a later push of step 3 is still taken.
    let m = MfJob::new("j", spec(""), &["user".into(), "item".into()], 10, 1).unwrap();
    let keys = [user_key(1)];
    let g = vec![1.0f32; 8];
    let mut t = ParamTable::new(0);
    for step in 0..5 {
        t.push(&m, (step, 0), 0, &keys, &g).unwrap();
    }
    let mut rows = Vec::new();
    t.pull(&m, 3, &keys, &mut rows).unwrap();
    assert_eq!(t.version(), 3);
    assert_eq!(t.push(&m, (3, 3), 1, &keys, &g).unwrap(), 1);
    // Steps 0..3 applied: the row moved by 3 x lr x 1 from its initial value.
    let mut init = vec![0.0f32; 8];
    m.init_row(user_key(1), &mut init);
    let mut want = init.clone();
    for step in 0..3 {
        let lr = m.learning_rate(step);
        for w in &mut want {
            *w = (f64::from(*w) - lr) as f32;
        }
    }
    assert_eq!(rows, want);
    assert!(matches!(
        t.push(&m, (2, 3), 2, &keys, &g),
        Err(TableError::Stale {
            step: 2,
            version: 3
        })
    ));
}

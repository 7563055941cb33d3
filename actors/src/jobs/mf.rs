//! Matrix factorisation on the parameter server: user and item embeddings of rank `k`,
//! trained by minibatch SGD on (user, item, rating) rows, the prediction `mu + u . v` (`mu` the
//! mean rating).
//!
//! The embeddings are two parameter tables (keys [`user_key`] and [`item_key`]) spread over
//! the shards ([`super::ps`]); nothing of them travels through the coordinator. A job runs
//! one statistics pass (rows, mean rating, id ranges), then train steps, saving the tables
//! every `checkpoint_every` steps and at the end. The schedule: epoch `e` visits every shard's
//! rows once, in an order drawn by `(seed, e, shard)`; step `t` of an epoch takes the `t`-th
//! slice of that order from every shard. A row's gradient is `e * v + l2 * u` for the user
//! (`e` the prediction error), summed over the minibatch's ratings of that row.

use serde::{Deserialize, Serialize};
use tidepool_runtime::jobspec::{JobSpec, MfModel};
use tidepool_runtime::ratings::Rating;

use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};
use super::ps::{phase_of, Batch, ParamModel, ParamPhase, RowModel, Rows, Schedule, PHASE_TRAIN};
use super::rng::Rng;

/// Table of user rows.
pub const USERS: u64 = 0;
/// Table of item rows.
pub const ITEMS: u64 = 1;
/// Ids must be exact in an f32 column.
pub const MAX_ID: u64 = 1 << 24;
/// Initial values are uniform in `[-INIT_SCALE, INIT_SCALE]`.
pub const INIT_SCALE: f64 = 0.1;

const PHASE_STATS: u32 = 0;

/// The parameter key of user `id`.
pub fn user_key(id: u64) -> u64 {
    (USERS << 32) | id
}

/// The parameter key of item `id`.
pub fn item_key(id: u64) -> u64 {
    (ITEMS << 32) | id
}

/// The initial row of `key` under `seed` (also what the model directory writes for a row
/// training never touched).
pub fn init_row(seed: u64, key: u64, out: &mut [f32]) {
    let mut rng = Rng::for_task(seed ^ 0x6d66_5f69_6e69_7400, key, 0);
    for v in out {
        *v = ((rng.uniform_f64() * 2.0 - 1.0) * INIT_SCALE) as f32;
    }
}

/// What an `mf` job needs besides its spec: the dataset's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct MfJob {
    id: String,
    spec: JobSpec,
    model: MfModel,
    user_col: usize,
    item_col: usize,
    features: usize,
    rows: u64,
    shards: u32,
    schedule: Schedule,
}

/// Dataset statistics from the first pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MfStats {
    pub rows: u64,
    /// Mean rating.
    pub mu: f64,
    /// Largest user id + 1.
    pub users: u64,
    /// Largest item id + 1.
    pub items: u64,
}

/// Loss sums for the train RMSE of the epoch in progress and of the finished ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Losses {
    pub sse: f64,
    pub rows: u64,
    /// Train RMSE of each finished epoch.
    pub epochs: Vec<f64>,
}

/// The coordinator's state of an `mf` job (the model itself is in the tables).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MfState {
    pub stats: Option<MfStats>,
    /// Train steps done.
    pub step: u64,
    /// Train step at which the tables were last saved (0: nothing saved; initial rows).
    pub saved: u64,
    pub losses: Losses,
    /// The losses as they were at `saved` (restored on a rollback).
    pub losses_at_saved: Losses,
    /// Rollbacks so far (for the result's report).
    pub rollbacks: u64,
}

impl MfJob {
    /// The job `id` over a dataset with columns `features` and `rows` rows in `shards` shards.
    pub fn new(
        id: &str,
        spec: JobSpec,
        features: &[String],
        rows: u64,
        shards: u32,
    ) -> Result<Self, JobError> {
        let model = spec
            .mf
            .clone()
            .ok_or_else(|| JobError::Data("an mf job needs [model] rank and columns".into()))?;
        let col = |name: &str, key: &str| {
            features.iter().position(|f| f == name).ok_or_else(|| {
                JobError::Data(format!(
                    "model.{key} = {name:?} is not a feature column of the dataset ({})",
                    features.join(", ")
                ))
            })
        };
        let user_col = col(&model.user_column, "user_column")?;
        let item_col = col(&model.item_column, "item_column")?;
        if user_col == item_col {
            return Err(JobError::Data(
                "model.user_column and model.item_column name the same column".into(),
            ));
        }
        Ok(MfJob {
            id: id.to_string(),
            schedule: Schedule::new(&spec, rows),
            spec,
            user_col,
            item_col,
            features: features.len(),
            rows,
            shards,
            model,
        })
    }

    /// Embedding width.
    pub fn rank(&self) -> usize {
        self.model.rank
    }

    /// Train steps in all.
    pub fn total_steps(&self) -> u64 {
        self.schedule.total
    }

    fn ids(&self, data: &ShardData<'_>, r: usize) -> Result<(u64, u64), JobError> {
        let row = data.row(r);
        let id = |v: f32, what: &str| {
            if v >= 0.0 && v.fract() == 0.0 && (v as u64) < MAX_ID {
                Ok(v as u64)
            } else {
                Err(JobError::Data(format!(
                    "shard {} row {r}: {what} id {v} is not an integer in 0..{MAX_ID}",
                    data.shard
                )))
            }
        };
        Ok((
            id(row[self.user_col], "user")?,
            id(row[self.item_col], "item")?,
        ))
    }

    fn check_data(&self, data: &ShardData<'_>) -> Result<(), JobError> {
        if data.csr.is_some() || data.features != self.features {
            return Err(JobError::Data(
                "mf needs dense rows with the dataset's columns".into(),
            ));
        }
        Ok(())
    }
}

/// The rows of shard `shard` (of `n`) that train step `step` takes: slice `step % per_epoch`
/// of the epoch's order, an affine permutation `i -> (a i + c) mod n` drawn by
/// `(seed, epoch, shard)`.
pub fn batch_rows(seed: u64, step: u64, per_epoch: u64, shard: u32, n: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let epoch = step / per_epoch;
    let slice = (step % per_epoch) as usize;
    let size = n.div_ceil(per_epoch as usize);
    let start = (slice * size).min(n);
    let end = (start + size).min(n);
    let mut rng = Rng::for_task(seed ^ 0x6d66_5f6f_7264_6572, epoch, shard);
    let n64 = n as u64;
    let mut a = rng.below(n64).max(1);
    while gcd(a, n64) != 1 {
        a = a % n64 + 1;
    }
    let c = rng.below(n64);
    (start..end)
        .map(|i| ((u128::from(a) * i as u128 + u128::from(c)) % u128::from(n64)) as usize)
        .collect()
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl RowModel for MfJob {
    fn width(&self, _key: u64) -> usize {
        self.model.rank
    }

    fn init_row(&self, key: u64, out: &mut [f32]) {
        init_row(self.spec.seed, key, out);
    }

    fn learning_rate(&self, step: u64) -> f64 {
        self.schedule.lr(step)
    }
}

impl ParamModel for MfJob {
    fn phase(&self, task: &Task) -> ParamPhase {
        phase_of(task)
    }

    fn batch(&self, step: u64, _task: &Task, data: &ShardData<'_>) -> Result<Batch, JobError> {
        self.check_data(data)?;
        let rows = batch_rows(
            self.spec.seed,
            step,
            self.schedule.per_epoch,
            data.shard,
            data.rows(),
        );
        let mut keys = Vec::with_capacity(rows.len() * 2);
        for &r in &rows {
            let (u, i) = self.ids(data, r)?;
            keys.push(user_key(u));
            keys.push(item_key(i));
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(Batch { rows, keys })
    }

    fn grads(
        &self,
        task: &Task,
        data: &ShardData<'_>,
        batch: &Batch,
        rows: &Rows<'_>,
    ) -> Result<(Partial, Vec<f32>), JobError> {
        let k = self.model.rank;
        let mu = task.broadcast.get(1).copied().unwrap_or(0.0);
        let l2 = self.spec.l2;
        let mut g = vec![0.0f64; batch.keys.len() * k];
        let mut sse = 0.0f64;
        let missing = |key: u64| JobError::Shape(format!("parameter row {key} was not pulled"));
        for &r in &batch.rows {
            let (u, i) = self.ids(data, r)?;
            let (uk, ik) = (user_key(u), item_key(i));
            let pu = rows.get(uk).ok_or_else(|| missing(uk))?;
            let qi = rows.get(ik).ok_or_else(|| missing(ik))?;
            let dot: f64 = pu
                .iter()
                .zip(qi)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let e = mu + dot - f64::from(data.y[r]);
            sse += e * e;
            let ui = batch.keys.binary_search(&uk).map_err(|_| missing(uk))? * k;
            let ii = batch.keys.binary_search(&ik).map_err(|_| missing(ik))? * k;
            for j in 0..k {
                let (a, b) = (f64::from(pu[j]), f64::from(qi[j]));
                g[ui + j] += e * b + l2 * a;
                g[ii + j] += e * a + l2 * b;
            }
        }
        let partial = Partial {
            rows: batch.rows.len() as u64,
            sum: vec![sse],
            min: Vec::new(),
            max: Vec::new(),
        };
        Ok((partial, g.into_iter().map(|v| v as f32).collect()))
    }

    /// The shard's distinct (user, item) pairs, sorted, as little-endian `u32` pairs.
    fn shard_export(&self, data: &ShardData<'_>) -> Result<Option<Vec<u8>>, JobError> {
        self.check_data(data)?;
        let mut pairs = Vec::with_capacity(data.rows());
        for r in 0..data.rows() {
            let (u, i) = self.ids(data, r)?;
            pairs.push((u as u32, i as u32));
        }
        pairs.sort_unstable();
        pairs.dedup();
        let mut out = Vec::with_capacity(pairs.len() * 8);
        for (u, i) in pairs {
            out.extend_from_slice(&u.to_le_bytes());
            out.extend_from_slice(&i.to_le_bytes());
        }
        Ok(Some(out))
    }
}

impl Job for MfJob {
    type State = MfState;

    fn init(&self) -> MfState {
        MfState::default()
    }

    fn next_task(&self, state: &MfState) -> Option<Task> {
        let Some(stats) = state.stats else {
            return Some(Task {
                phase: PHASE_STATS,
                broadcast: Vec::new(),
            });
        };
        self.schedule.next(state.step, state.saved, &[stats.mu])
    }

    fn planned_steps(&self, _state: &MfState) -> u64 {
        1 + self.schedule.planned()
    }

    fn map(&self, _step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError> {
        if task.phase != PHASE_STATS {
            return Err(JobError::Shape(format!(
                "mf phase {} runs on the parameter server, not as a map",
                task.phase
            )));
        }
        self.check_data(data)?;
        let (mut sum, mut sq) = (0.0f64, 0.0f64);
        let mut min = vec![f64::INFINITY; 2];
        let mut max = vec![f64::NEG_INFINITY; 2];
        for r in 0..data.rows() {
            let (u, i) = self.ids(data, r)?;
            let y = f64::from(data.y[r]);
            sum += y;
            sq += y * y;
            for (j, id) in [u, i].into_iter().enumerate() {
                min[j] = min[j].min(id as f64);
                max[j] = max[j].max(id as f64);
            }
        }
        Ok(Partial {
            rows: data.rows() as u64,
            sum: vec![sum, sq],
            min,
            max,
        })
    }

    fn reduce(
        &self,
        state: &mut MfState,
        task: &Task,
        merged: Partial,
    ) -> Result<StepReport, JobError> {
        match task.phase {
            PHASE_STATS => {
                if merged.rows == 0 || merged.max.len() != 2 {
                    return Err(JobError::Data("the dataset has no ratings".into()));
                }
                state.stats = Some(MfStats {
                    rows: merged.rows,
                    mu: merged.sum[0] / merged.rows as f64,
                    users: merged.max[0] as u64 + 1,
                    items: merged.max[1] as u64 + 1,
                });
                Ok(StepReport {
                    loss: None,
                    rows: merged.rows,
                })
            }
            PHASE_TRAIN => {
                let sse = merged.sum.first().copied().unwrap_or(0.0);
                state.step += 1;
                state.losses.sse += sse;
                state.losses.rows += merged.rows;
                let rmse = (sse / merged.rows.max(1) as f64).sqrt();
                if self.schedule.ends_epoch(state.step) {
                    let l = &mut state.losses;
                    l.epochs.push((l.sse / l.rows.max(1) as f64).sqrt());
                    (l.sse, l.rows) = (0.0, 0);
                }
                Ok(StepReport {
                    loss: Some(rmse),
                    rows: merged.rows,
                })
            }
            _ => {
                state.saved = state.step;
                state.losses_at_saved = state.losses.clone();
                Ok(StepReport::default())
            }
        }
    }

    fn result(&self, state: &MfState) -> Result<serde_json::Value, JobError> {
        let stats = state
            .stats
            .ok_or_else(|| JobError::Data("mf job finished without statistics".into()))?;
        Ok(serde_json::json!({
            "kind": "mf",
            "job": self.id,
            "rank": self.model.rank,
            "user_column": self.model.user_column,
            "item_column": self.model.item_column,
            "users": stats.users,
            "items": stats.items,
            "rows": stats.rows,
            "mu": stats.mu,
            "seed": self.spec.seed,
            "steps": state.step,
            "shards": self.shards,
            "tables": {"step": state.saved, "prefix": super::ps::tables_prefix(&self.id)},
            "rated": "jobs/{job}/export/{shard}: sorted distinct (user u32, item u32) pairs",
            "train_rmse": state.losses.epochs.last(),
            "epoch_train_rmse": state.losses.epochs,
            "rollbacks": state.rollbacks,
        }))
    }

    fn param_model(&self) -> Option<&dyn ParamModel> {
        Some(self)
    }

    fn rollback(&self, state: &mut MfState) -> u64 {
        state.step = state.saved;
        state.losses = state.losses_at_saved.clone();
        state.rollbacks += 1;
        state.saved
    }

    fn base(&self, state: &MfState) -> u64 {
        state.saved
    }

    fn task_ahead(&self, state: &MfState, k: u64) -> Option<Task> {
        let stats = state.stats?;
        self.schedule.ahead(state.step, state.saved, k, &[stats.mu])
    }
}

/// The plain single-process reference: the same schedule (minibatches, learning rates,
/// per-shard sums added in shard order) written as dense loops over two embedding matrices,
/// sharing nothing with the parameter server but [`batch_rows`] and [`init_row`]. Returns the
/// user and item embeddings (row-major, `rank` wide).
pub fn reference_train(spec: &JobSpec, shards: &[Vec<Rating>]) -> (Vec<f32>, Vec<f32>, f64) {
    let k = spec.mf.as_ref().map_or(1, |m| m.rank);
    let all = shards.iter().flatten();
    let users = all.clone().map(|r| r.0).max().unwrap_or(0) as usize + 1;
    let items = all.clone().map(|r| r.1).max().unwrap_or(0) as usize + 1;
    let rows: u64 = shards.iter().map(|s| s.len() as u64).sum();
    let mu = all.map(|r| f64::from(r.2)).sum::<f64>() / rows.max(1) as f64;
    let mut pu = vec![0.0f32; users * k];
    let mut qi = vec![0.0f32; items * k];
    for u in 0..users {
        init_row(spec.seed, user_key(u as u64), &mut pu[u * k..(u + 1) * k]);
    }
    for i in 0..items {
        init_row(spec.seed, item_key(i as u64), &mut qi[i * k..(i + 1) * k]);
    }
    let per_epoch = rows.div_ceil(spec.batch_size).max(1);
    for step in 0..spec.train_steps(rows) {
        let lr = spec.learning_rate / (1.0 + spec.lr_decay * step as f64);
        let mut gu = vec![0.0f64; users * k];
        let mut gi = vec![0.0f64; items * k];
        for (s, data) in shards.iter().enumerate() {
            // One shard's sums, rounded to f32 as they travel, then added in shard order.
            let mut su = std::collections::BTreeMap::<usize, Vec<f64>>::new();
            let mut si = std::collections::BTreeMap::<usize, Vec<f64>>::new();
            for r in batch_rows(spec.seed, step, per_epoch, s as u32, data.len()) {
                let (u, i, y) = (data[r].0 as usize, data[r].1 as usize, data[r].2);
                let (a, b) = (&pu[u * k..(u + 1) * k], &qi[i * k..(i + 1) * k]);
                let dot: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum();
                let e = mu + dot - f64::from(y);
                let gu_row = su.entry(u).or_insert_with(|| vec![0.0; k]);
                for j in 0..k {
                    gu_row[j] += e * f64::from(b[j]) + spec.l2 * f64::from(a[j]);
                }
                let gi_row = si.entry(i).or_insert_with(|| vec![0.0; k]);
                for j in 0..k {
                    gi_row[j] += e * f64::from(a[j]) + spec.l2 * f64::from(b[j]);
                }
            }
            for (u, g) in su {
                for j in 0..k {
                    gu[u * k + j] += f64::from(g[j] as f32);
                }
            }
            for (i, g) in si {
                for j in 0..k {
                    gi[i * k + j] += f64::from(g[j] as f32);
                }
            }
        }
        for (w, g) in pu.iter_mut().zip(&gu) {
            *w = (f64::from(*w) - lr * g) as f32;
        }
        for (w, g) in qi.iter_mut().zip(&gi) {
            *w = (f64::from(*w) - lr * g) as f32;
        }
    }
    (pu, qi, mu)
}

/// Root mean squared error of `mu + u . v` over `(user, item, rating)` rows; ids beyond the
/// embeddings predict `mu`.
pub fn rmse(pu: &[f32], qi: &[f32], k: usize, mu: f64, rows: &[Rating]) -> f64 {
    let mut sse = 0.0;
    for &(u, i, y) in rows {
        sse += (predict(pu, qi, k, mu, u, i) - f64::from(y)).powi(2);
    }
    (sse / rows.len().max(1) as f64).sqrt()
}

/// The predicted rating of user `u` for item `i`.
pub fn predict(pu: &[f32], qi: &[f32], k: usize, mu: f64, u: u64, i: u64) -> f64 {
    let (u, i) = (u as usize, i as usize);
    if (u + 1) * k > pu.len() || (i + 1) * k > qi.len() {
        return mu;
    }
    let a = &pu[u * k..(u + 1) * k];
    let b = &qi[i * k..(i + 1) * k];
    mu + a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum::<f64>()
}

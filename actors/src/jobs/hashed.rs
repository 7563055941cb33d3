//! Logistic regression with hashed features on the parameter server (click-through style):
//! feature column `c` of a row (dense or sparse) adds `sign(c) * x_c` to weight `bucket(c)` of
//! a `2^hash_bits`-entry vector, so the model's size is set by `hash_bits`, not by the data's
//! columns. The weights are rows of [`BLOCK`] values spread over the shards ([`super::ps`]):
//! a minibatch pulls only the blocks its rows touch and pushes their gradients.
//!
//! Labels must be 0 or 1. The weights start at zero; the step's gradient is the minibatch's
//! sum of `(p - y) * sign * x` (plus `l2 * w` per row that touches a weight) divided by
//! `batch_size`, the learning rate `learning_rate / (1 + lr_decay * step)`. The schedule is
//! [`super::mf::batch_rows`]': every row once per epoch.

use serde::{Deserialize, Serialize};
use tidepool_runtime::jobspec::JobSpec;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};
use super::mf::batch_rows;
use super::ps::{Batch, ParamModel, ParamPhase, RowModel, Rows};

/// Weights per parameter row.
pub const BLOCK: usize = 8;
/// The key of the bias row (beyond every weight block's key).
pub const BIAS_KEY: u64 = 1 << 40;
const HASH_SEED: u64 = 0x6861_7368_6564_0001;

const PHASE_TRAIN: u32 = 1;
const PHASE_SAVE: u32 = 2;

/// The weight index and sign of feature column `c` under `bits` bits.
pub fn bucket(c: u32, bits: u32) -> (u64, f64) {
    let h = xxh3_64_with_seed(&c.to_le_bytes(), HASH_SEED);
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
    (h & mask, sign)
}

/// The job.
#[derive(Debug, Clone, PartialEq)]
pub struct HashedLogisticJob {
    id: String,
    spec: JobSpec,
    bits: u32,
    rows: u64,
    shards: u32,
}

/// The coordinator's state (the weights are in the tables).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HashedState {
    pub step: u64,
    pub saved: u64,
    /// Log loss and rows of the epoch in progress, and each finished epoch's mean log loss.
    pub loss: f64,
    pub loss_rows: u64,
    pub epochs: Vec<f64>,
    pub at_saved: (f64, u64, usize),
    pub rollbacks: u64,
}

impl HashedLogisticJob {
    pub fn new(id: &str, spec: JobSpec, rows: u64, shards: u32) -> Result<Self, JobError> {
        let bits = spec
            .hash_bits
            .ok_or_else(|| JobError::Data("hashed features need model.hash_bits".into()))?;
        Ok(HashedLogisticJob {
            id: id.to_string(),
            spec,
            bits,
            rows,
            shards,
        })
    }

    fn total_steps(&self) -> u64 {
        self.spec.train_steps(self.rows)
    }

    fn per_epoch(&self) -> u64 {
        self.rows.div_ceil(self.spec.batch_size).max(1)
    }

    /// Calls `f(column, value)` for every non-zero feature of row `r`.
    fn for_features(data: &ShardData<'_>, r: usize, mut f: impl FnMut(u32, f32)) {
        match &data.csr {
            Some(csr) => {
                let (cols, vals) = csr.row(r);
                for (&c, &v) in cols.iter().zip(vals) {
                    f(c, v);
                }
            }
            None => {
                for (c, &v) in data.row(r).iter().enumerate() {
                    if v != 0.0 {
                        f(c as u32, v);
                    }
                }
            }
        }
    }

    fn label(data: &ShardData<'_>, r: usize) -> Result<f64, JobError> {
        match data.y[r] {
            y if y == 0.0 || y == 1.0 => Ok(f64::from(y)),
            y => Err(JobError::Data(format!(
                "shard {} row {r}: label {y} is not 0 or 1 (logistic regression)",
                data.shard
            ))),
        }
    }

    fn save_due(&self, s: &HashedState) -> bool {
        s.step > s.saved
            && (s.step == self.total_steps() || s.step % self.spec.checkpoint_every == 0)
    }
}

/// The margin `bias + sum sign * x * w` of row `r` given a way to read weight `i`.
pub fn margin(
    data: &ShardData<'_>,
    r: usize,
    bits: u32,
    bias: f64,
    weight: &dyn Fn(u64) -> f64,
) -> f64 {
    let mut z = bias;
    HashedLogisticJob::for_features(data, r, |c, v| {
        let (i, sign) = bucket(c, bits);
        z += sign * f64::from(v) * weight(i);
    });
    z
}

impl RowModel for HashedLogisticJob {
    fn width(&self, _key: u64) -> usize {
        BLOCK
    }

    fn init_row(&self, _key: u64, out: &mut [f32]) {
        out.fill(0.0);
    }

    fn learning_rate(&self, step: u64) -> f64 {
        self.spec.learning_rate / (1.0 + self.spec.lr_decay * step as f64)
    }
}

impl ParamModel for HashedLogisticJob {
    fn phase(&self, task: &Task) -> ParamPhase {
        let step = task.broadcast.first().map_or(0, |&s| s as u64);
        match task.phase {
            PHASE_TRAIN => ParamPhase::Train { step },
            PHASE_SAVE => ParamPhase::Save {
                step,
                last: task.broadcast.get(1).is_some_and(|&l| l != 0.0),
            },
            _ => ParamPhase::Map,
        }
    }

    fn batch(&self, step: u64, _task: &Task, data: &ShardData<'_>) -> Result<Batch, JobError> {
        let rows = batch_rows(
            self.spec.seed,
            step,
            self.per_epoch(),
            data.shard,
            data.rows(),
        );
        let mut keys = vec![BIAS_KEY];
        for &r in &rows {
            Self::for_features(data, r, |c, _| {
                keys.push(bucket(c, self.bits).0 / BLOCK as u64);
            });
        }
        keys.sort_unstable();
        keys.dedup();
        Ok(Batch { rows, keys })
    }

    fn grads(
        &self,
        _task: &Task,
        data: &ShardData<'_>,
        batch: &Batch,
        rows: &Rows<'_>,
    ) -> Result<(Partial, Vec<f32>), JobError> {
        let missing = |k: u64| JobError::Shape(format!("parameter row {k} was not pulled"));
        let weight = |i: u64| -> f64 {
            rows.get(i / BLOCK as u64)
                .map_or(0.0, |b| f64::from(b[(i % BLOCK as u64) as usize]))
        };
        let bias_row = rows.get(BIAS_KEY).ok_or_else(|| missing(BIAS_KEY))?;
        let bias = f64::from(bias_row[0]);
        let n = self.spec.batch_size as f64;
        let l2 = self.spec.l2;
        let mut g = vec![0.0f64; batch.keys.len() * BLOCK];
        let bias_at = batch
            .keys
            .binary_search(&BIAS_KEY)
            .map_err(|_| missing(BIAS_KEY))?
            * BLOCK;
        let (mut loss, mut correct) = (0.0f64, 0.0f64);
        for &r in &batch.rows {
            let y = Self::label(data, r)?;
            let z = margin(data, r, self.bits, bias, &weight);
            // log(1 + e^z) - y z, and p = sigmoid(z), from one exp.
            let e = (-z.abs()).exp();
            let p = if z >= 0.0 {
                1.0 / (1.0 + e)
            } else {
                e / (1.0 + e)
            };
            loss += z.max(0.0) + e.ln_1p() - y * z;
            if (p >= 0.5) == (y == 1.0) {
                correct += 1.0;
            }
            let d = p - y;
            g[bias_at] += d / n;
            let mut err = None;
            Self::for_features(data, r, |c, v| {
                let (i, sign) = bucket(c, self.bits);
                match batch.keys.binary_search(&(i / BLOCK as u64)) {
                    Ok(at) => {
                        let j = at * BLOCK + (i % BLOCK as u64) as usize;
                        g[j] += (d * sign * f64::from(v) + l2 * weight(i)) / n;
                    }
                    Err(_) => err = Some(i / BLOCK as u64),
                }
            });
            if let Some(k) = err {
                return Err(missing(k));
            }
        }
        let partial = Partial {
            rows: batch.rows.len() as u64,
            sum: vec![loss, correct],
            min: Vec::new(),
            max: Vec::new(),
        };
        Ok((partial, g.into_iter().map(|v| v as f32).collect()))
    }
}

impl Job for HashedLogisticJob {
    type State = HashedState;

    fn init(&self) -> HashedState {
        HashedState::default()
    }

    fn next_task(&self, s: &HashedState) -> Option<Task> {
        if self.save_due(s) {
            let last = s.step == self.total_steps();
            return Some(Task {
                phase: PHASE_SAVE,
                broadcast: vec![s.step as f64, if last { 1.0 } else { 0.0 }],
            });
        }
        (s.step < self.total_steps()).then(|| Task {
            phase: PHASE_TRAIN,
            broadcast: vec![s.step as f64],
        })
    }

    fn planned_steps(&self, _s: &HashedState) -> u64 {
        let total = self.total_steps();
        total + total.div_ceil(self.spec.checkpoint_every)
    }

    fn map(&self, _step: u64, task: &Task, _data: &ShardData<'_>) -> Result<Partial, JobError> {
        Err(JobError::Shape(format!(
            "hashed logistic phase {} runs on the parameter server, not as a map",
            task.phase
        )))
    }

    fn reduce(
        &self,
        s: &mut HashedState,
        task: &Task,
        merged: Partial,
    ) -> Result<StepReport, JobError> {
        if task.phase == PHASE_SAVE {
            s.saved = s.step;
            s.at_saved = (s.loss, s.loss_rows, s.epochs.len());
            return Ok(StepReport::default());
        }
        let loss = merged.sum.first().copied().unwrap_or(0.0);
        s.step += 1;
        s.loss += loss;
        s.loss_rows += merged.rows;
        if s.step % self.per_epoch() == 0 || s.step == self.total_steps() {
            s.epochs.push(s.loss / s.loss_rows.max(1) as f64);
            (s.loss, s.loss_rows) = (0.0, 0);
        }
        Ok(StepReport {
            loss: Some(loss / merged.rows.max(1) as f64),
            rows: merged.rows,
        })
    }

    fn result(&self, s: &HashedState) -> Result<serde_json::Value, JobError> {
        Ok(serde_json::json!({
            "kind": "hashed_logistic",
            "job": self.id,
            "hash_bits": self.bits,
            "block": BLOCK,
            "bias_key": BIAS_KEY,
            "steps": s.step,
            "shards": self.shards,
            "tables": {"step": s.saved, "prefix": super::ps::tables_prefix(&self.id)},
            "train_loss": s.epochs.last(),
            "epoch_train_loss": s.epochs,
            "rollbacks": s.rollbacks,
        }))
    }

    fn param_model(&self) -> Option<&dyn ParamModel> {
        Some(self)
    }

    fn rollback(&self, s: &mut HashedState) -> u64 {
        s.step = s.saved;
        (s.loss, s.loss_rows) = (s.at_saved.0, s.at_saved.1);
        s.epochs.truncate(s.at_saved.2);
        s.rollbacks += 1;
        s.saved
    }

    fn base(&self, s: &HashedState) -> u64 {
        s.saved
    }
}

//! Linear, logistic and softmax regression with their weights on the parameter server, for
//! models wider than a frame (`[model] features = "sharded"`: feature column `c` owns a row of
//! weights, one per output) or of a fixed size whatever the data's width (`features = "hashed"`,
//! click-through style: column `c` adds `sign(c) * x_c` to weight `hash(c) mod 2^hash_bits`).
//! A minibatch pulls only the rows its rows' non-zero features touch (sparse libsvm rows touch
//! few) and pushes their gradients ([`super::ps`]).
//!
//! A row holds the weights of [`features_per_row`] features (8 for one output, 1 for softmax),
//! each `outputs` wide; the bias is its own row. Weights start at zero; features are used as
//! they are. The step's gradient is the minibatch's sum of `(p - y) * sign * x` (plus `l2 * w`
//! per row that touches a weight) divided by `batch_size`, moved by `learning_rate / (1 +
//! lr_decay * step)`; losses as the dense job's (`0.5 r^2`, log loss, cross-entropy). The
//! schedule is [`super::mf::batch_rows`]': every row once per epoch.

use serde::{Deserialize, Serialize};
use tidepool_runtime::jobspec::{FeatureMap, JobSpec, ModelType};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};
use super::mf::batch_rows;
use super::ps::{phase_of, Batch, ParamModel, ParamPhase, RowModel, Rows, Schedule, PHASE_SAVE};

/// Features per parameter row for models of one output.
pub const BLOCK: usize = 8;
/// The key of the bias row (beyond every weight row's key: columns and buckets are below 2^32).
pub const BIAS_KEY: u64 = 1 << 40;

/// Features per parameter row of a model with `outputs` outputs.
pub fn features_per_row(outputs: usize) -> usize {
    if outputs == 1 {
        BLOCK
    } else {
        1
    }
}
const HASH_SEED: u64 = 0x6861_7368_6564_0001;

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

/// The model's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    Linear,
    Logistic,
    Softmax { classes: usize },
}

/// The job.
#[derive(Debug, Clone, PartialEq)]
pub struct PsLinearJob {
    id: String,
    spec: JobSpec,
    map: FeatureMap,
    loss: Loss,
    outputs: usize,
    per_row: usize,
    columns: u64,
    rows: u64,
    shards: u32,
    schedule: Schedule,
}

/// The coordinator's state (the weights are in the tables).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PsLinearState {
    pub step: u64,
    pub saved: u64,
    /// Log loss and rows of the epoch in progress, and each finished epoch's mean log loss.
    pub loss: f64,
    pub loss_rows: u64,
    pub epochs: Vec<f64>,
    /// Rows predicted right in the epoch in progress, and each finished epoch's accuracy.
    #[serde(default)]
    pub correct: f64,
    #[serde(default)]
    pub accuracy: Vec<f64>,
    pub at_saved: (f64, u64, usize),
    #[serde(default)]
    pub correct_at_saved: f64,
    pub rollbacks: u64,
}

impl PsLinearJob {
    /// The job over a dataset of `columns` feature columns and `rows` rows in `shards` shards.
    pub fn new(
        id: &str,
        spec: JobSpec,
        columns: u64,
        rows: u64,
        shards: u32,
    ) -> Result<Self, JobError> {
        let loss = match (spec.model, spec.classes) {
            (Some(ModelType::Linear), _) => Loss::Linear,
            (Some(ModelType::Logistic), _) => Loss::Logistic,
            (Some(ModelType::Softmax), Some(classes)) => Loss::Softmax { classes },
            _ => {
                return Err(JobError::Data(
                    "a parameter-server model needs model.type (and model.classes for softmax)"
                        .into(),
                ))
            }
        };
        if spec.features == FeatureMap::Broadcast {
            return Err(JobError::Data("not a parameter-server model".into()));
        }
        if spec.features == FeatureMap::Sharded && columns > u64::from(u32::MAX) {
            return Err(JobError::Data(format!(
                "{columns} columns: at most 2^32 can be sharded"
            )));
        }
        let outputs = match loss {
            Loss::Softmax { classes } => classes,
            _ => 1,
        };
        Ok(PsLinearJob {
            id: id.to_string(),
            schedule: Schedule::new(&spec, rows),
            map: spec.features,
            spec,
            loss,
            outputs,
            per_row: features_per_row(outputs),
            columns,
            rows,
            shards,
        })
    }

    /// The weight index and sign of feature column `c`.
    pub fn index(&self, c: u32) -> (u64, f64) {
        match self.map {
            FeatureMap::Hashed { bits } => bucket(c, bits),
            _ => (u64::from(c), 1.0),
        }
    }

    /// The row key and the offset in it of output 0 of weight index `i`.
    fn place(&self, i: u64) -> (u64, usize) {
        let per = self.per_row as u64;
        (i / per, (i % per) as usize * self.outputs)
    }

    /// Model outputs.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// The model's loss.
    pub fn loss(&self) -> Loss {
        self.loss
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

    fn label(&self, data: &ShardData<'_>, r: usize) -> Result<f64, JobError> {
        let y = data.y[r];
        let ok = match self.loss {
            Loss::Linear => y.is_finite(),
            Loss::Logistic => y == 0.0 || y == 1.0,
            Loss::Softmax { classes } => y >= 0.0 && y.fract() == 0.0 && (y as usize) < classes,
        };
        if ok {
            Ok(f64::from(y))
        } else {
            Err(JobError::Data(format!(
                "shard {} row {r}: label {y} does not fit a {:?} model",
                data.shard, self.loss
            )))
        }
    }
}

/// The scores `bias[o] + sum sign * x * w[i][o]` of row `r` of `data`, given a way to read
/// output `o` of weight index `i`.
pub fn scores(
    job: &PsLinearJob,
    data: &ShardData<'_>,
    r: usize,
    bias: &[f64],
    weight: &dyn Fn(u64, usize) -> f64,
) -> Vec<f64> {
    let mut z = bias.to_vec();
    PsLinearJob::for_features(data, r, |c, v| {
        let (i, sign) = job.index(c);
        for (o, zo) in z.iter_mut().enumerate() {
            *zo += sign * f64::from(v) * weight(i, o);
        }
    });
    z
}

/// Loss and `dloss/dz` of scores `z` for label `y`.
fn loss_and_delta(loss: Loss, z: &[f64], y: f64) -> (f64, Vec<f64>) {
    match loss {
        Loss::Linear => {
            let r = z[0] - y;
            (0.5 * r * r, vec![r])
        }
        Loss::Logistic => {
            // log(1 + e^z) - y z, and p = sigmoid(z), from one exp.
            let z = z[0];
            let e = (-z.abs()).exp();
            let p = if z >= 0.0 {
                1.0 / (1.0 + e)
            } else {
                e / (1.0 + e)
            };
            (z.max(0.0) + e.ln_1p() - y * z, vec![p - y])
        }
        Loss::Softmax { .. } => {
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
            let total: f64 = ex.iter().sum();
            let k = y as usize;
            let loss = total.ln() + m - z[k];
            let delta = ex
                .iter()
                .enumerate()
                .map(|(o, e)| e / total - if o == k { 1.0 } else { 0.0 })
                .collect();
            (loss, delta)
        }
    }
}

/// The prediction of scores `z`: the value (linear), the class 0/1 (logistic), the argmax.
pub fn predict(loss: Loss, z: &[f64]) -> f64 {
    match loss {
        Loss::Linear => z[0],
        Loss::Logistic => f64::from(u8::from(z[0] >= 0.0)),
        Loss::Softmax { .. } => {
            z.iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0 as f64
        }
    }
}

impl RowModel for PsLinearJob {
    fn width(&self, key: u64) -> usize {
        if key == BIAS_KEY {
            self.outputs
        } else {
            self.per_row * self.outputs
        }
    }

    fn init_row(&self, _key: u64, out: &mut [f32]) {
        out.fill(0.0);
    }

    fn learning_rate(&self, step: u64) -> f64 {
        self.schedule.lr(step)
    }
}

impl ParamModel for PsLinearJob {
    fn phase(&self, task: &Task) -> ParamPhase {
        phase_of(task)
    }

    fn batch(&self, step: u64, _task: &Task, data: &ShardData<'_>) -> Result<Batch, JobError> {
        let rows = batch_rows(
            self.spec.seed,
            step,
            self.schedule.per_epoch,
            data.shard,
            data.rows(),
        );
        let mut keys = vec![BIAS_KEY];
        let mut wide = None;
        for &r in &rows {
            Self::for_features(data, r, |c, _| {
                if u64::from(c) >= self.columns && self.map == FeatureMap::Sharded {
                    wide = Some(c);
                }
                keys.push(self.place(self.index(c).0).0);
            });
        }
        if let Some(c) = wide {
            return Err(JobError::Data(format!(
                "shard {}: column {c} beyond the dataset's {} columns",
                data.shard, self.columns
            )));
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
        let weight = |i: u64, o: usize| -> f64 {
            let (key, at) = self.place(i);
            rows.get(key).map_or(0.0, |row| f64::from(row[at + o]))
        };
        let bias: Vec<f64> = rows
            .get(BIAS_KEY)
            .ok_or_else(|| missing(BIAS_KEY))?
            .iter()
            .map(|&b| f64::from(b))
            .collect();
        let offs = super::ps::offsets(self, &batch.keys);
        let n = self.spec.batch_size as f64;
        let l2 = self.spec.l2;
        let mut g = vec![0.0f64; offs.last().copied().unwrap_or(0)];
        let bias_at = offs[batch
            .keys
            .binary_search(&BIAS_KEY)
            .map_err(|_| missing(BIAS_KEY))?];
        let (mut loss, mut correct) = (0.0f64, 0.0f64);
        for &r in &batch.rows {
            let y = self.label(data, r)?;
            let z = scores(self, data, r, &bias, &weight);
            let (l, delta) = loss_and_delta(self.loss, &z, y);
            loss += l;
            if predict(self.loss, &z) == y {
                correct += 1.0;
            }
            for (o, d) in delta.iter().enumerate() {
                g[bias_at + o] += d / n;
            }
            let mut err = None;
            Self::for_features(data, r, |c, v| {
                let (i, sign) = self.index(c);
                let (key, at) = self.place(i);
                match batch.keys.binary_search(&key) {
                    Ok(k) => {
                        let base = offs[k] + at;
                        for (o, d) in delta.iter().enumerate() {
                            g[base + o] += (d * sign * f64::from(v) + l2 * weight(i, o)) / n;
                        }
                    }
                    Err(_) => err = Some(key),
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

impl Job for PsLinearJob {
    type State = PsLinearState;

    fn init(&self) -> PsLinearState {
        PsLinearState::default()
    }

    fn next_task(&self, s: &PsLinearState) -> Option<Task> {
        self.schedule.next(s.step, s.saved, &[])
    }

    fn planned_steps(&self, _s: &PsLinearState) -> u64 {
        self.schedule.planned()
    }

    fn map(&self, _step: u64, task: &Task, _data: &ShardData<'_>) -> Result<Partial, JobError> {
        Err(JobError::Shape(format!(
            "phase {} runs on the parameter server, not as a map",
            task.phase
        )))
    }

    fn reduce(
        &self,
        s: &mut PsLinearState,
        task: &Task,
        merged: Partial,
    ) -> Result<StepReport, JobError> {
        if task.phase == PHASE_SAVE {
            s.saved = s.step;
            s.at_saved = (s.loss, s.loss_rows, s.epochs.len());
            s.correct_at_saved = s.correct;
            return Ok(StepReport::default());
        }
        let loss = merged.sum.first().copied().unwrap_or(0.0);
        s.step += 1;
        s.loss += loss;
        s.correct += merged.sum.get(1).copied().unwrap_or(0.0);
        s.loss_rows += merged.rows;
        if self.schedule.ends_epoch(s.step) {
            let rows = s.loss_rows.max(1) as f64;
            s.epochs.push(s.loss / rows);
            s.accuracy.push(s.correct / rows);
            (s.loss, s.loss_rows, s.correct) = (0.0, 0, 0.0);
        }
        Ok(StepReport {
            loss: Some(loss / merged.rows.max(1) as f64),
            rows: merged.rows,
        })
    }

    fn result(&self, s: &PsLinearState) -> Result<serde_json::Value, JobError> {
        let (features, bits) = match self.map {
            FeatureMap::Hashed { bits } => ("hashed", Some(bits)),
            _ => ("sharded", None),
        };
        Ok(serde_json::json!({
            "kind": "ps_linear",
            "model": match self.loss { Loss::Linear => "linear", Loss::Logistic => "logistic", Loss::Softmax { .. } => "softmax" },
            "features": features,
            "hash_bits": bits,
            "columns": self.columns,
            "outputs": self.outputs,
            "features_per_row": self.per_row,
            "bias_key": BIAS_KEY,
            "steps": s.step,
            "shards": self.shards,
            "tables": {"step": s.saved, "prefix": super::ps::tables_prefix(&self.id)},
            "train_loss": s.epochs.last(),
            "epoch_train_loss": s.epochs,
            "train_accuracy": s.accuracy.last(),
            "epoch_train_accuracy": s.accuracy,
            "rollbacks": s.rollbacks,
        }))
    }

    fn param_model(&self) -> Option<&dyn ParamModel> {
        Some(self)
    }

    fn rollback(&self, s: &mut PsLinearState) -> u64 {
        s.step = s.saved;
        (s.loss, s.loss_rows) = (s.at_saved.0, s.at_saved.1);
        s.epochs.truncate(s.at_saved.2);
        s.accuracy.truncate(s.at_saved.2);
        s.correct = s.correct_at_saved;
        s.rollbacks += 1;
        s.saved
    }

    fn base(&self, s: &PsLinearState) -> u64 {
        s.saved
    }

    fn task_ahead(&self, s: &PsLinearState, k: u64) -> Option<Task> {
        self.schedule.ahead(s.step, s.saved, k, &[])
    }
}

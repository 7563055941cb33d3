//! The training jobs: synchronous data-parallel minibatch SGD and local SGD (model averaging)
//! for linear, logistic and softmax regression.
//!
//! Stages: a column-statistics pass (means, min/max, label range; [`super::colstats`]), a
//! squares pass for the standard deviations when `standardize` is on, then training steps.
//! Every shard's minibatch at training step `t` is `minibatch_indices(seed, t, shard, ...)`
//! with a size proportional to the shard's rows, so the global minibatch, and therefore the
//! model, depend only on `(dataset, spec)`.
//!
//! - `sgd`: the broadcast is the parameters; each shard returns its minibatch's loss and
//!   gradient sums; the reducer takes one step ([`super::sgd::apply_step`]).
//! - `local_sgd`: each shard takes `local_steps` steps from the broadcast parameters on its own
//!   minibatches; the reducer averages the shards' models weighted by their rows. One
//!   exchange per `local_steps` steps: the communication-saving option.
//!
//! Minibatch losses and gradients come from [`super::minibatch::loss_and_grad_rows`], which
//! reads the shard's rows in place (dense, or sparse CSR rows from libsvm imports) and folds
//! the standardisation into the parameters; sparse shards train the same model as the same
//! rows stored dense (the statistics passes handle both, [`super::colstats`]).

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};
use tidepool_runtime::jobspec::{JobKind, JobSpec, ModelType};

use super::colstats::{self, FirstPass, PHASE_SQUARES, PHASE_SUMS};
use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};
use super::minibatch::shard_loss_and_grad;
use super::model_file::ModelFile;
use super::models::{l2_penalty, LossGrad, LrSchedule, ModelKind, Standardizer};
use super::sgd::{apply_step, minibatch_indices};

/// Phase of a synchronous-SGD gradient step.
pub const PHASE_GRADIENT: u32 = 2;
/// Phase of a local-SGD round.
pub const PHASE_LOCAL: u32 = 3;

/// What a training job knows about its dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetShape {
    pub features: Vec<String>,
    pub label: String,
    pub rows: u64,
}

/// A training job (`sgd` or `local_sgd`).
#[derive(Debug, Clone)]
pub struct TrainJob {
    id: String,
    spec: JobSpec,
    model: ModelType,
    shape: DatasetShape,
}

/// Where a training job is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Stage {
    Sums,
    Squares,
    Train,
    Done,
}

/// The training job's checkpointed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub stage: Stage,
    pub first: Option<FirstPass>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Model outputs (classes for softmax, else 1).
    pub outputs: usize,
    /// Parameters in standardised feature space, column-major `(features + 1) x outputs`.
    pub params: Vec<f64>,
    /// Training steps (sgd) or rounds (local SGD) done.
    pub t: u64,
    /// Training steps (or rounds) to run.
    pub total: u64,
    /// `(t, loss)` of every training step.
    pub losses: Vec<(u64, f64)>,
}

impl TrainJob {
    /// A training job for `spec` (kind sgd or local_sgd) over a dataset of `shape`.
    pub fn new(id: &str, spec: JobSpec, shape: DatasetShape) -> Result<Self, JobError> {
        let model = spec
            .model
            .ok_or_else(|| JobError::Data("training jobs need model.type".into()))?;
        if !matches!(spec.kind, JobKind::Sgd | JobKind::LocalSgd) {
            return Err(JobError::Data("not a training job".into()));
        }
        Ok(TrainJob {
            id: id.to_string(),
            spec,
            model,
            shape,
        })
    }

    fn d(&self) -> usize {
        self.shape.features.len()
    }

    fn kind(&self, outputs: usize) -> ModelKind {
        match self.model {
            ModelType::Linear => ModelKind::Linear,
            ModelType::Logistic => ModelKind::Logistic,
            ModelType::Softmax => ModelKind::Softmax { classes: outputs },
        }
    }

    fn schedule(&self) -> LrSchedule {
        if self.spec.lr_decay > 0.0 {
            LrSchedule::InverseDecay {
                lr0: self.spec.learning_rate,
                decay: self.spec.lr_decay,
            }
        } else {
            LrSchedule::Constant(self.spec.learning_rate)
        }
    }

    /// This shard's minibatch size: its share of the global batch, by rows.
    fn shard_batch(&self, shard_rows: usize) -> usize {
        let n = self.shape.rows.max(1);
        let b = (self.spec.batch_size * shard_rows as u64).div_ceil(n);
        usize::try_from(b).unwrap_or(usize::MAX).min(shard_rows)
    }

    /// Broadcast of a training step: `[outputs, params.., mean.., std..]` (then `t`).
    /// Broadcast of a training step: `[outputs, params..]`, then `[mean.., std..]` when
    /// standardising (an unstandardised wide model sends only its parameters).
    fn broadcast(&self, s: &TrainState) -> Vec<f64> {
        let mut b = Vec::with_capacity(1 + s.params.len() + 2 * self.d());
        b.push(s.outputs as f64);
        b.extend(&s.params);
        if self.spec.standardize {
            b.extend(&s.mean);
            b.extend(&s.std);
        }
        b
    }

    fn unpack(&self, b: &[f64]) -> Result<(usize, DMatrix<f64>, Standardizer), JobError> {
        let d = self.d();
        let outputs = b.first().copied().unwrap_or(0.0) as usize;
        let np = (d + 1) * outputs;
        let stats = if self.spec.standardize { 2 * d } else { 0 };
        if outputs == 0 || b.len() != 1 + np + stats {
            return Err(JobError::Shape(format!(
                "training broadcast of {} values for {d} features",
                b.len()
            )));
        }
        let params = DMatrix::from_column_slice(d + 1, outputs, &b[1..1 + np]);
        let std = if self.spec.standardize {
            Standardizer {
                mean: b[1 + np..1 + np + d].to_vec(),
                std: b[1 + np + d..].to_vec(),
            }
        } else {
            // No means or deviations: the identity, without a vector per task.
            Standardizer {
                mean: Vec::new(),
                std: Vec::new(),
            }
        };
        Ok((outputs, params, std))
    }

    /// The rows of `data`'s minibatch at training step `t`.
    fn batch_indices(&self, t: u64, data: &ShardData<'_>) -> Vec<usize> {
        minibatch_indices(
            self.spec.seed,
            t,
            data.shard,
            data.rows(),
            self.shard_batch(data.rows()),
        )
    }

    fn data_error(e: impl std::fmt::Display) -> JobError {
        JobError::Data(e.to_string())
    }

    /// Loss and gradient sums of `data`'s minibatch at training step `t`, on its dense rows
    /// standardised, or on its sparse rows with the standardisation folded in.
    fn minibatch_loss(
        &self,
        kind: ModelKind,
        params: &DMatrix<f64>,
        std: &Standardizer,
        data: &ShardData<'_>,
        t: u64,
    ) -> Result<LossGrad, JobError> {
        let idx = self.batch_indices(t, data);
        shard_loss_and_grad(kind, params, std, data, &idx)
    }

    fn map_gradient(&self, b: &[f64], data: &ShardData<'_>, t: u64) -> Result<Partial, JobError> {
        let (outputs, params, std) = self.unpack(b)?;
        let lg = self.minibatch_loss(self.kind(outputs), &params, &std, data, t)?;
        let mut sum = Vec::with_capacity(1 + params.len());
        sum.push(lg.loss_sum);
        sum.extend(lg.grad_sum.iter());
        Ok(Partial {
            rows: lg.count,
            sum,
            ..Partial::default()
        })
    }

    fn map_local(&self, b: &[f64], data: &ShardData<'_>, round: u64) -> Result<Partial, JobError> {
        let (outputs, mut params, std) = self.unpack(b)?;
        let kind = self.kind(outputs);
        let k = self.spec.local_steps;
        let (mut first_loss, mut first_count) = (0.0, 0u64);
        if data.rows() > 0 {
            for i in 0..k {
                let t = round * k + i;
                let lg = self.minibatch_loss(kind, &params, &std, data, t)?;
                if i == 0 {
                    (first_loss, first_count) = (lg.loss_sum, lg.count);
                }
                if let Ok(out) = apply_step(&params, t, &lg, self.spec.l2, self.schedule()) {
                    params = out.params;
                }
            }
        }
        let w = data.rows() as f64;
        let mut sum = vec![first_loss, first_count as f64];
        sum.extend(params.iter().map(|p| p * w));
        Ok(Partial {
            rows: data.rows() as u64,
            sum,
            ..Partial::default()
        })
    }

    fn start_training(&self, s: &mut TrainState) -> Result<(), JobError> {
        let first = s
            .first
            .as_ref()
            .ok_or_else(|| JobError::Data("statistics pass missing".into()))?;
        let d = self.d();
        // Unstandardised, pass 1 summed only the label.
        let label = if self.spec.standardize { d } else { 0 };
        let (lmin, lmax) = match (first.min.get(label), first.max.get(label)) {
            (Some(&lo), Some(&hi)) => (lo, hi),
            _ => return Err(JobError::Shape("statistics pass without the label".into())),
        };
        s.outputs = match self.model {
            ModelType::Linear | ModelType::Logistic => 1,
            ModelType::Softmax => match self.spec.classes {
                Some(c) => c,
                // At least 2 classes: a model file's softmax needs them (all labels 0 gives
                // a valid two-class model that always predicts 0).
                None if lmin >= 0.0 && lmax.fract() == 0.0 && lmax < 10_000.0 => {
                    (lmax as usize + 1).max(2)
                }
                None => {
                    return Err(JobError::Data(format!(
                        "softmax labels must be class indices 0..classes, found {lmin}..{lmax}"
                    )))
                }
            },
        };
        if self.model == ModelType::Logistic && (lmin < 0.0 || lmax > 1.0) {
            return Err(JobError::Data(format!(
                "logistic regression needs 0/1 labels, found {lmin}..{lmax}"
            )));
        }
        if !self.spec.standardize {
            // The identity: not stored, not sent (see `broadcast`, `result`).
            s.mean = Vec::new();
            s.std = Vec::new();
        }
        s.params = vec![0.0; (d + 1) * s.outputs];
        s.total = self.spec.train_steps(self.shape.rows);
        s.stage = Stage::Train;
        Ok(())
    }

    fn penalty(&self, s: &TrainState) -> f64 {
        let p = DMatrix::from_column_slice(self.d() + 1, s.outputs, &s.params);
        l2_penalty(&p, self.spec.l2).0
    }
}

impl Job for TrainJob {
    type State = TrainState;

    fn init(&self) -> TrainState {
        TrainState {
            stage: Stage::Sums,
            first: None,
            mean: Vec::new(),
            std: Vec::new(),
            outputs: 0,
            params: Vec::new(),
            t: 0,
            total: self.spec.train_steps(self.shape.rows),
            losses: Vec::new(),
        }
    }

    fn next_task(&self, s: &TrainState) -> Option<Task> {
        let (phase, broadcast) = match s.stage {
            Stage::Sums => (PHASE_SUMS, Vec::new()),
            Stage::Squares => (
                PHASE_SQUARES,
                colstats::squares_broadcast(s.first.as_ref()?, 0),
            ),
            Stage::Train if s.t < s.total => {
                let phase = match self.spec.kind {
                    JobKind::LocalSgd => PHASE_LOCAL,
                    _ => PHASE_GRADIENT,
                };
                (phase, with_t(self.broadcast(s), s.t))
            }
            Stage::Train | Stage::Done => return None,
        };
        Some(Task { phase, broadcast })
    }

    fn planned_steps(&self, s: &TrainState) -> u64 {
        let stats = if self.spec.standardize { 2 } else { 1 };
        stats + s.total
    }

    fn map(&self, _step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError> {
        match task.phase {
            PHASE_SUMS if self.spec.standardize => colstats::map_sums(data),
            PHASE_SUMS => Ok(colstats::map_label_sums(data)),
            PHASE_SQUARES => colstats::map_squares(data, &task.broadcast),
            // The training step (or round) index is the broadcast's last element.
            PHASE_GRADIENT | PHASE_LOCAL => {
                let (b, t) = split_t(&task.broadcast)?;
                if task.phase == PHASE_GRADIENT {
                    self.map_gradient(b, data, t)
                } else {
                    self.map_local(b, data, t)
                }
            }
            p => Err(JobError::Shape(format!("unknown training phase {p}"))),
        }
    }

    fn reduce(
        &self,
        s: &mut TrainState,
        task: &Task,
        merged: Partial,
    ) -> Result<StepReport, JobError> {
        let rows = merged.rows;
        match task.phase {
            PHASE_SUMS => {
                let first = FirstPass::reduce(&merged)?;
                if self.spec.standardize {
                    s.mean = first.mean.get(..self.d()).unwrap_or_default().to_vec();
                }
                s.first = Some(first);
                if self.spec.standardize {
                    s.stage = Stage::Squares;
                } else {
                    self.start_training(s)?;
                }
                Ok(StepReport { loss: None, rows })
            }
            PHASE_SQUARES => {
                let first = s
                    .first
                    .clone()
                    .ok_or_else(|| JobError::Data("statistics pass missing".into()))?;
                let n = first.count as f64;
                s.std = (0..self.d())
                    .map(
                        |c| match (merged.sum.get(c).copied().unwrap_or(0.0) / n).sqrt() {
                            v if v > 0.0 && v.is_finite() => v,
                            _ => 1.0,
                        },
                    )
                    .collect();
                self.start_training(s)?;
                Ok(StepReport { loss: None, rows })
            }
            PHASE_GRADIENT => {
                let np = s.params.len();
                if merged.sum.len() != 1 + np {
                    return Err(JobError::Shape("gradient length".into()));
                }
                let params = DMatrix::from_column_slice(self.d() + 1, s.outputs, &s.params);
                let total = LossGrad {
                    loss_sum: merged.sum[0],
                    grad_sum: DMatrix::from_column_slice(self.d() + 1, s.outputs, &merged.sum[1..]),
                    count: merged.rows,
                };
                let out = apply_step(&params, s.t, &total, self.spec.l2, self.schedule())
                    .map_err(Self::data_error)?;
                // A diverging step can overflow the parameters themselves; caught here, not by
                // the next step's merge, since it may be the last one (the model would export
                // them as JSON nulls).
                if let Some(p) = out.params.iter().find(|p| !p.is_finite()) {
                    return Err(JobError::Overflow(format!(
                        "parameter {p} after training step {}",
                        s.t
                    )));
                }
                s.params = out.params.as_slice().to_vec();
                s.losses.push((s.t, out.loss));
                s.t += 1;
                Ok(StepReport {
                    loss: Some(out.loss),
                    rows: out.count,
                })
            }
            PHASE_LOCAL => {
                let np = s.params.len();
                if merged.sum.len() != 2 + np || merged.rows == 0 {
                    return Err(JobError::Shape("local model length".into()));
                }
                let loss = merged.sum[0] / merged.sum[1].max(1.0) + self.penalty(s);
                let w = merged.rows as f64;
                s.params = merged.sum[2..].iter().map(|v| v / w).collect();
                s.losses.push((s.t, loss));
                s.t += 1;
                Ok(StepReport {
                    loss: Some(loss),
                    rows: merged.sum[1] as u64 * self.spec.local_steps,
                })
            }
            p => Err(JobError::Shape(format!("unknown training phase {p}"))),
        }
    }

    fn result(&self, s: &TrainState) -> Result<serde_json::Value, JobError> {
        let params = DMatrix::from_column_slice(self.d() + 1, s.outputs, &s.params);
        let std = Standardizer {
            mean: if s.mean.is_empty() {
                vec![0.0; self.d()]
            } else {
                s.mean.clone()
            },
            std: if s.std.is_empty() {
                vec![1.0; self.d()]
            } else {
                s.std.clone()
            },
        };
        let raw = std.to_raw_params(&params);
        let loss = s.losses.last().map_or(f64::NAN, |l| l.1);
        let file = ModelFile::new(
            self.kind(s.outputs),
            self.shape.features.clone(),
            self.shape.label.clone(),
            &raw,
            self.id.clone(),
            s.t,
            loss,
        );
        let mut v = serde_json::to_value(file).map_err(|e| JobError::Data(e.to_string()))?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "standardized_params".into(),
                serde_json::json!(s.params.clone()),
            );
            obj.insert("losses".into(), serde_json::json!(s.losses.clone()));
        }
        Ok(v)
    }
}

/// Appends the training step index to a broadcast (the map needs it to draw minibatches).
fn with_t(mut broadcast: Vec<f64>, t: u64) -> Vec<f64> {
    broadcast.push(t as f64);
    broadcast
}

fn split_t(b: &[f64]) -> Result<(&[f64], u64), JobError> {
    match b.split_last() {
        Some((t, rest)) if *t >= 0.0 && t.fract() == 0.0 => Ok((rest, *t as u64)),
        _ => Err(JobError::Shape("training broadcast without a step".into())),
    }
}

//! The synchronous-SGD step as a pure function (ARCHITECTURE.md, invariant 6).
//!
//! Each step, every shard draws its minibatch with [`minibatch_indices`] (seeded by
//! `(seed, step, shard)`) and computes a [`ShardPartial`]; the coordinator passes all partials,
//! in shard-id order, to [`sgd_step`]. Because the minibatch depends only on the key and the
//! partials are summed in one fixed order, the new parameters are bit-identical however the
//! shards are spread over nodes, and a task re-run after a failover gives the same partial.
//!
//! Pre-summing on a node keeps that property only if the node's shards are summed as one
//! contiguous run of the global shard order; otherwise send per-shard partials (floating-point
//! addition is not associative).

use super::models::{l2_penalty, loss_and_grad, LossGrad, LrSchedule, ModelError, ModelKind};
use super::rng::Rng;
use nalgebra::DMatrix;

/// One shard's contribution to one step: sums over its minibatch, no regularisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardPartial {
    /// The shard that computed it.
    pub shard: u32,
    /// Sum of per-row losses.
    pub loss_sum: f64,
    /// Sum of per-row gradients, shaped like the parameters.
    pub grad_sum: DMatrix<f64>,
    /// Rows in the minibatch.
    pub count: u64,
}

impl ShardPartial {
    /// The partial of `shard` for the rows `indices` of its partition `(x, y)`.
    pub fn compute(
        kind: ModelKind,
        params: &DMatrix<f64>,
        shard: u32,
        x: &DMatrix<f32>,
        y: &[f32],
        indices: &[usize],
    ) -> Result<Self, ModelError> {
        let (bx, by) = gather_rows(x, y, indices);
        let LossGrad {
            loss_sum,
            grad_sum,
            count,
        } = loss_and_grad(kind, params, &bx, &by)?;
        Ok(Self {
            shard,
            loss_sum,
            grad_sum,
            count,
        })
    }
}

/// Partials that [`sgd_step`] refuses; the parameters are left as they were.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SgdError {
    /// Partials must come in strictly increasing shard id (no duplicates), or the sum's order,
    /// and with it the model, would depend on arrival order.
    #[error("partials out of shard order: shard {next} after shard {prev}")]
    NotInShardOrder {
        /// The earlier shard id.
        prev: u32,
        /// The id that followed it.
        next: u32,
    },
    /// A partial's gradient does not have the parameters' shape.
    #[error("shard {shard}: gradient shape {got:?}, parameters {want:?}")]
    ShapeMismatch {
        /// The shard whose partial is wrong.
        shard: u32,
        /// Its gradient's shape.
        got: (usize, usize),
        /// The parameters' shape.
        want: (usize, usize),
    },
    /// The minibatches held no rows at all.
    #[error("no rows in this step's minibatches")]
    NoRows,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// Parameters after the update.
    pub params: DMatrix<f64>,
    /// Objective at the parameters *before* the update: mean minibatch loss plus L2 penalty.
    pub loss: f64,
    /// Rows in the step's global minibatch.
    pub count: u64,
}

/// Sums partials in the order given, checking that it is strictly increasing shard id.
pub fn combine_in_shard_order(
    shape: (usize, usize),
    partials: &[ShardPartial],
) -> Result<LossGrad, SgdError> {
    let mut total = LossGrad {
        loss_sum: 0.0,
        grad_sum: DMatrix::zeros(shape.0, shape.1),
        count: 0,
    };
    let mut prev: Option<u32> = None;
    for p in partials {
        if let Some(prev) = prev.filter(|&prev| p.shard <= prev) {
            return Err(SgdError::NotInShardOrder {
                prev,
                next: p.shard,
            });
        }
        prev = Some(p.shard);
        if p.grad_sum.shape() != shape {
            return Err(SgdError::ShapeMismatch {
                shard: p.shard,
                got: p.grad_sum.shape(),
                want: shape,
            });
        }
        total.loss_sum += p.loss_sum;
        total.grad_sum += &p.grad_sum;
        total.count += p.count;
    }
    Ok(total)
}

/// One synchronous step: sum the partials in shard order, divide by the row count, add the L2
/// gradient, and move by `schedule.lr(step)`.
pub fn sgd_step(
    params: &DMatrix<f64>,
    step: u64,
    partials: &[ShardPartial],
    l2: f64,
    schedule: LrSchedule,
) -> Result<StepOutcome, SgdError> {
    let total = combine_in_shard_order(params.shape(), partials)?;
    apply_step(params, step, &total, l2, schedule)
}

/// The update of one step from the summed loss and gradient of its global minibatch: divide by
/// the row count, add the L2 gradient, move by `schedule.lr(step)`.
pub fn apply_step(
    params: &DMatrix<f64>,
    step: u64,
    total: &LossGrad,
    l2: f64,
    schedule: LrSchedule,
) -> Result<StepOutcome, SgdError> {
    if total.count == 0 {
        return Err(SgdError::NoRows);
    }
    if total.grad_sum.shape() != params.shape() {
        return Err(SgdError::ShapeMismatch {
            shard: u32::MAX,
            got: total.grad_sum.shape(),
            want: params.shape(),
        });
    }
    let n = total.count as f64;
    let (penalty, penalty_grad) = l2_penalty(params, l2);
    let grad = &total.grad_sum / n + penalty_grad;
    Ok(StepOutcome {
        params: params - grad * schedule.lr(step),
        loss: total.loss_sum / n + penalty,
        count: total.count,
    })
}

/// The rows of one shard's minibatch at `step`: `min(batch_per_shard, shard_rows)` distinct
/// indices in increasing order, a function of `(seed, step, shard)` only.
pub fn minibatch_indices(
    seed: u64,
    step: u64,
    shard: u32,
    shard_rows: usize,
    batch_per_shard: usize,
) -> Vec<usize> {
    Rng::for_task(seed, step, shard).sample_indices(shard_rows, batch_per_shard.min(shard_rows))
}

/// Copies the rows `indices` of `(x, y)` into a dense minibatch.
///
/// # Panics
/// If an index is out of range.
pub fn gather_rows(x: &DMatrix<f32>, y: &[f32], indices: &[usize]) -> (DMatrix<f32>, Vec<f32>) {
    let bx = DMatrix::from_fn(indices.len(), x.ncols(), |r, c| x[(indices[r], c)]);
    let by = indices.iter().map(|&i| y[i]).collect();
    (bx, by)
}

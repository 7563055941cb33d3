//! The job trait: how a distributed job is written, and the exact merging of partial results.
//!
//! A job is iterative MapReduce. Each step the coordinator asks the job for a [`Task`] (a phase
//! number and a broadcast vector), every shard's owner runs [`Job::map`] over the shard's
//! partition, the runtime merges the shards' [`Partial`]s, and [`Job::reduce`] folds the merged
//! result into the job's state. The runtime does the rest: placement (tasks run where the
//! shard's data is), re-running a shard's task on its new owner after a move (tasks are pure
//! functions of `(job, step, shard)`, hence idempotent), checkpointing the state every
//! `checkpoint_every` steps, and resuming from the checkpoint after the coordinator moves.
//!
//! # Exact merging
//! A partial is a bag of vectors the runtime knows how to merge: `sum` is added, `min`/`max`
//! are taken element-wise, `rows` is added. Sums are converted per shard to fixed point
//! ([`FIXED_FRAC_BITS`] fraction bits in an `i128`) and added as integers, which is associative:
//! a node pre-sums all the shards it owns into one message, and the total is bit-identical
//! whichever node ran which shard (ARCHITECTURE.md invariant 6). Converting back to `f64` happens once,
//! on the coordinator.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tidepool_runtime::codec::WideSum;
pub use tidepool_runtime::csr::CsrRows;

pub use super::exact::Wide;

/// One shard's rows as the map sees them: row-major `f32` features (or compressed sparse rows)
/// and labels, borrowed from the loaded partition (in place when the partition is a single
/// stored object, or a mapped file).
#[derive(Debug, Clone, Copy)]
pub struct ShardData<'a> {
    pub shard: u32,
    /// Features per row.
    pub features: usize,
    /// `rows * features` values, row-major; empty when the rows are sparse (`csr`).
    pub x: &'a [f32],
    /// One label per row.
    pub y: &'a [f32],
    /// The rows as CSR (a libsvm import); `x` is then empty. Jobs that need dense rows refuse
    /// sparse data when they are built ([`super::registry`]).
    pub csr: Option<CsrRows<'a>>,
}

impl<'a> ShardData<'a> {
    /// Rows in the shard.
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Row `i`'s features.
    ///
    /// # Panics
    /// If `i >= rows()`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        &self.x[i * self.features..(i + 1) * self.features]
    }
}

/// What one step asks of every shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Job-defined pass kind.
    pub phase: u32,
    /// Job-defined data every shard needs (parameters, centroids, ...).
    pub broadcast: Vec<f64>,
}

/// One shard's result (or a merge of several).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Partial {
    /// Rows this partial covers.
    pub rows: u64,
    /// Added element-wise.
    pub sum: Vec<f64>,
    /// Minimum element-wise.
    pub min: Vec<f64>,
    /// Maximum element-wise.
    pub max: Vec<f64>,
}

/// Why a job cannot go on. The job fails with this message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The data does not fit the spec (bad labels for the model, too few rows, ...).
    #[error("{0}")]
    Data(String),
    /// A value not finite, or beyond the exact range (|x| < 2^327, about 2.7e98): in training
    /// usually a diverging learning rate.
    #[error("numeric overflow: {0}")]
    Overflow(String),
    /// Partials of different shapes: a bug or a mixed-version cluster.
    #[error("partial shape mismatch: {0}")]
    Shape(String),
}

/// What a reduce reports for progress.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepReport {
    /// The step's loss (objective, inertia, ...), if it has one.
    pub loss: Option<f64>,
    /// Rows the step processed.
    pub rows: u64,
}

/// A distributed job. Implementations are pure: no I/O, no clocks, all randomness seeded.
pub trait Job: Send + Sync + 'static {
    /// Everything the coordinator needs to continue: checkpointed (JSON) every
    /// `checkpoint_every` steps and at the end.
    type State: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;

    /// The state before step 0.
    fn init(&self) -> Self::State;

    /// The next step's task, or `None` when the job is done.
    fn next_task(&self, state: &Self::State) -> Option<Task>;

    /// Steps the job expects to run in total (for progress; may shrink when it converges).
    fn planned_steps(&self, state: &Self::State) -> u64;

    /// Runs on the shard's owner: the shard's partial for `task` at `step`. Must be a pure
    /// function of `(step, task, data)`: it is re-run when a shard moves.
    fn map(&self, step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError>;

    /// Runs on the coordinator with every shard's partial merged.
    fn reduce(
        &self,
        state: &mut Self::State,
        task: &Task,
        merged: Partial,
    ) -> Result<StepReport, JobError>;

    /// The result document of a finished job (`job result`).
    fn result(&self, state: &Self::State) -> Result<serde_json::Value, JobError>;

    /// Parameter-server jobs: the model whose rows live in the shards' tables
    /// ([`super::ps`]); `None` for jobs whose model travels in the broadcast.
    fn param_model(&self) -> Option<&dyn super::ps::ParamModel> {
        None
    }

    /// Parameter-server jobs: rolls `state` back to the newest saved tables (after a table's
    /// rows were lost with its owner) and returns their train step.
    fn rollback(&self, _state: &mut Self::State) -> u64 {
        0
    }

    /// Parameter-server jobs: the train step of the newest saved tables.
    fn base(&self, _state: &Self::State) -> u64 {
        0
    }

    /// Parameter-server jobs under `ssp`: the task `k` train steps after [`Job::next_task`], if
    /// that and every step between are train steps whose tasks do not depend on the reductions
    /// before them (no save, no end between); `None` otherwise.
    fn task_ahead(&self, _state: &Self::State, _k: u64) -> Option<Task> {
        None
    }
}

/// Partials merged exactly (fixed-point sums), in any order and grouping.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExactSum {
    pub rows: u64,
    pub sum: Vec<Wide>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

/// `x` in fixed point (nearest 2^-56); refused if not finite or beyond 2^327.
pub fn to_fixed(x: f64) -> Result<Wide, JobError> {
    Wide::from_f64(x).map_err(|e| JobError::Overflow(format!("partial value: {e}")))
}

/// A fixed-point value back as `f64` (rounded once, deterministically).
pub fn from_fixed(v: &Wide) -> f64 {
    v.to_f64()
}

/// Fixed-point sums as they travel: an `i128` each where it fits, the rest in `wide`.
pub fn sums_to_wire(sum: &[Wide]) -> (Vec<i128>, Vec<WideSum>) {
    let mut small = Vec::with_capacity(sum.len());
    let mut wide = Vec::new();
    for (i, w) in sum.iter().enumerate() {
        match w.to_i128() {
            Some(v) => small.push(v),
            None => {
                small.push(0);
                wide.push(WideSum {
                    index: i as u32,
                    limbs: w.limbs,
                });
            }
        }
    }
    (small, wide)
}

/// The sums a peer sent ([`sums_to_wire`]); refuses a `wide` entry outside `sum`, twice at one
/// index, or over a non-zero small sum.
pub fn sums_from_wire(sum: &[i128], wide: &[WideSum]) -> Result<Vec<Wide>, JobError> {
    let mut out: Vec<Wide> = sum.iter().map(|&v| Wide::from_i128(v)).collect();
    let mut seen = std::collections::BTreeSet::new();
    for w in wide {
        let i = w.index as usize;
        if i >= out.len() || !seen.insert(i) || sum[i] != 0 {
            return Err(JobError::Shape(format!(
                "wide sum at index {i} of {} (repeated or over a small one)",
                out.len()
            )));
        }
        out[i] = Wide { limbs: w.limbs };
    }
    Ok(out)
}

fn check_len(what: &str, have: usize, got: usize) -> Result<(), JobError> {
    if have == got {
        Ok(())
    } else {
        Err(JobError::Shape(format!("{what}: {have} vs {got}")))
    }
}

impl ExactSum {
    /// Adds one shard's partial.
    pub fn add(&mut self, p: &Partial) -> Result<(), JobError> {
        let sums = p
            .sum
            .iter()
            .map(|&x| to_fixed(x))
            .collect::<Result<Vec<_>, _>>()?;
        self.merge(&ExactSum {
            rows: p.rows,
            sum: sums,
            min: p.min.clone(),
            max: p.max.clone(),
        })
    }

    /// Adds another merged partial (from another node).
    pub fn merge(&mut self, o: &ExactSum) -> Result<(), JobError> {
        if self.sum.is_empty() && self.min.is_empty() && self.max.is_empty() && self.rows == 0 {
            *self = o.clone();
            return Ok(());
        }
        if o.sum.is_empty() && o.min.is_empty() && o.max.is_empty() && o.rows == 0 {
            return Ok(());
        }
        check_len("sum", self.sum.len(), o.sum.len())?;
        check_len("min", self.min.len(), o.min.len())?;
        check_len("max", self.max.len(), o.max.len())?;
        for (a, b) in self.sum.iter_mut().zip(&o.sum) {
            *a = a
                .checked_add(b)
                .map_err(|e| JobError::Overflow(e.to_string()))?;
        }
        for (a, b) in self.min.iter_mut().zip(&o.min) {
            *a = a.min(*b);
        }
        for (a, b) in self.max.iter_mut().zip(&o.max) {
            *a = a.max(*b);
        }
        self.rows += o.rows;
        Ok(())
    }

    /// The merged partial in `f64`.
    pub fn to_partial(&self) -> Partial {
        Partial {
            rows: self.rows,
            sum: self.sum.iter().map(from_fixed).collect(),
            min: self.min.clone(),
            max: self.max.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::rng::Rng;

    fn partial(rng: &mut Rng, n: usize) -> Partial {
        let v = |rng: &mut Rng| (rng.uniform_f64() - 0.5) * 1e3;
        Partial {
            rows: rng.below(100),
            sum: (0..n).map(|_| v(rng)).collect(),
            min: (0..n).map(|_| v(rng)).collect(),
            max: (0..n).map(|_| v(rng)).collect(),
        }
    }

    #[test]
    fn merging_is_exact_in_any_grouping() {
        let mut rng = Rng::from_seed(3);
        let parts: Vec<Partial> = (0..64).map(|_| partial(&mut rng, 5)).collect();
        let mut all = ExactSum::default();
        for p in &parts {
            all.add(p).unwrap();
        }
        // Any split of the shards over "nodes", each pre-summing its own, merged in any order.
        for nodes in [2usize, 3, 5, 7] {
            let mut per_node = vec![ExactSum::default(); nodes];
            for (i, p) in parts.iter().enumerate() {
                per_node[(i * 7 + 3) % nodes].add(p).unwrap();
            }
            let mut total = ExactSum::default();
            for n in per_node.iter().rev() {
                total.merge(n).unwrap();
            }
            assert_eq!(total, all, "{nodes} nodes");
        }
        let sum0: f64 = parts.iter().map(|p| p.sum[0]).sum();
        assert!((all.to_partial().sum[0] - sum0).abs() < 1e-9);
    }

    #[test]
    fn sums_travel_small_or_wide_and_bad_wide_entries_are_refused() {
        let sums: Vec<Wide> = [1.5, -2.0e24, 0.0, 3.0e30]
            .iter()
            .map(|&x| to_fixed(x).unwrap())
            .collect();
        let (small, wide) = sums_to_wire(&sums);
        assert_eq!(small.len(), 4);
        assert_eq!(wide.iter().map(|w| w.index).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(sums_from_wire(&small, &wide).unwrap(), sums);
        // A peer's wide entry out of range, repeated, or over a non-zero small sum.
        let mut bad = wide.clone();
        bad[0].index = 9;
        assert!(sums_from_wire(&small, &bad).is_err());
        let twice = vec![wide[0].clone(), wide[0].clone()];
        assert!(sums_from_wire(&small, &twice).is_err());
        let over = vec![WideSum {
            index: 0,
            limbs: wide[0].limbs,
        }];
        assert!(sums_from_wire(&small, &over).is_err());
    }

    #[test]
    fn refuses_what_it_cannot_sum_exactly() {
        let mut acc = ExactSum::default();
        let bad = Partial {
            sum: vec![f64::NAN],
            ..Partial::default()
        };
        assert!(matches!(acc.add(&bad), Err(JobError::Overflow(_))));
        let huge = Partial {
            sum: vec![1e99],
            ..Partial::default()
        };
        assert!(matches!(acc.add(&huge), Err(JobError::Overflow(_))));
        // Beyond the old i128 accumulator, within the wide one.
        let mut big = ExactSum::default();
        big.add(&Partial {
            rows: 1,
            sum: vec![2.9e24],
            ..Partial::default()
        })
        .unwrap();
        assert_eq!(big.to_partial().sum, vec![2.9e24]);
        acc.add(&Partial {
            rows: 1,
            sum: vec![1.0, 2.0],
            ..Partial::default()
        })
        .unwrap();
        let short = Partial {
            rows: 1,
            sum: vec![1.0],
            ..Partial::default()
        };
        assert!(matches!(acc.add(&short), Err(JobError::Shape(_))));
    }
}

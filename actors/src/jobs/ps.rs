//! The parameter server's math, sans-IO: a model whose parameters are rows spread over the
//! shards ([`ParamModel`]), and one shard's table of them ([`ParamTable`]).
//!
//! # How a step runs (synchronous consistency)
//! At train step `t` every data shard draws its minibatch ([`ParamModel::batch`]), *pulls* the
//! rows it reads from their shards' tables, computes per-row gradient sums
//! ([`ParamModel::grads`]) and *pushes* them, one push per `(step, source shard)`. Every request
//! names `complete`, the train steps whose every push the coordinator knows acknowledged; a
//! table applies a step's pushes only once a request names it complete, so it holds all of
//! them. Under `sync` consistency `complete` is the step itself (the coordinator starts step
//! `t + 1` after step `t` is done); under `ssp` with staleness `s` up to `s` later steps run
//! meanwhile, reading rows that lack at most the last `s` steps. It applies them **in source-shard order**, summing
//! each row's gradients in `f64` in that order, so a row's new value does not depend on which
//! node sent what, or when: the tables are bit-identical on 1, 3 or 5 nodes. A push repeated
//! (a task re-run after a failover) is recognised row by row by `(step, source, key)` and
//! applied once, however the rows were split into requests.
//!
//! A row never written reads as [`ParamModel::init_row`] of its key (seeded), and is not
//! stored: a table's memory is the rows training touched.

use std::collections::{BTreeMap, HashMap};

use super::job::{JobError, Partial, ShardData, Task};

/// Storage prefix of a job's saved tables.
pub fn tables_prefix(job: &str) -> String {
    format!("jobs/{job}/params")
}

/// Storage key of shard `shard`'s table saved after `step` train steps.
pub fn table_key(job: &str, shard: u32, step: u64) -> String {
    format!("{}/{shard:05}/{step:020}", tables_prefix(job))
}

/// Storage key of data shard `shard`'s export at the end of a job
/// ([`ParamModel::shard_export`]).
pub fn export_key(job: &str, shard: u32) -> String {
    format!("jobs/{job}/export/{shard:05}")
}

/// Storage prefix of shard `shard`'s saved tables.
pub fn shard_tables_prefix(job: &str, shard: u32) -> String {
    format!("{}/{shard:05}/", tables_prefix(job))
}

/// The shard a parameter row lives on (the same hash as every other key in the cluster).
pub fn shard_of(key: u64, shards: u32) -> u32 {
    tidepool_runtime::placement::shard_for_key(&key.to_le_bytes(), shards)
}

/// The rows of one parameter table as a model sees them.
pub trait RowModel: Send + Sync {
    /// Values in row `key`.
    fn width(&self, key: u64) -> usize;
    /// The value of a row never written (seeded by the key: the same on every node).
    fn init_row(&self, key: u64, out: &mut [f32]);
    /// The learning rate of train step `step`.
    fn learning_rate(&self, step: u64) -> f64;
}

/// What a task asks of a parameter-server job on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamPhase {
    /// An ordinary map over the shard's rows ([`super::job::Job::map`]).
    Map,
    /// Train step `step`: pull, compute, push.
    Train { step: u64 },
    /// Save every table this node owns as it stands after `step` train steps; `last`: the
    /// job's final save (also writes each data shard's [`ParamModel::shard_export`]).
    Save { step: u64, last: bool },
}

/// One shard's minibatch: its row indices and the parameter keys they read (strictly
/// increasing).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    pub rows: Vec<usize>,
    pub keys: Vec<u64>,
}

/// A model trained on the parameter server.
pub trait ParamModel: RowModel {
    /// What `task` is.
    fn phase(&self, task: &Task) -> ParamPhase;
    /// The shard's minibatch at train step `step`.
    fn batch(&self, step: u64, task: &Task, data: &ShardData<'_>) -> Result<Batch, JobError>;
    /// The minibatch's loss partial and the gradient sums of `batch.keys`, in key order, each as
    /// wide as its row; `rows` holds the pulled rows of `batch.keys`.
    fn grads(
        &self,
        task: &Task,
        data: &ShardData<'_>,
        batch: &Batch,
        rows: &Rows<'_>,
    ) -> Result<(Partial, Vec<f32>), JobError>;

    /// What the model directory needs from a data shard besides the tables (for matrix
    /// factorisation: the shard's (user, item) pairs, so `recommend` skips rated items),
    /// written once at the end of the job.
    fn shard_export(&self, _data: &ShardData<'_>) -> Result<Option<Vec<u8>>, JobError> {
        Ok(None)
    }
}

/// Task phase of a train step (broadcast: the step, then the model's own values).
pub const PHASE_TRAIN: u32 = 1;
/// Task phase of a save (broadcast: the step, and 1 for the job's last save).
pub const PHASE_SAVE: u32 = 2;

/// What a parameter-server job's task asks for (phases other than train and save are maps).
pub fn phase_of(task: &Task) -> ParamPhase {
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

/// The train steps of a parameter-server job: how many, how often the tables are saved, and the
/// learning rate of each (`learning_rate / (1 + lr_decay * step)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub total: u64,
    pub per_epoch: u64,
    pub every: u64,
    learning_rate: f64,
    lr_decay: f64,
}

impl Schedule {
    /// The schedule of `spec` over `rows` rows.
    pub fn new(spec: &tidepool_runtime::jobspec::JobSpec, rows: u64) -> Self {
        Schedule {
            total: spec.train_steps(rows),
            per_epoch: rows.div_ceil(spec.batch_size).max(1),
            every: spec.checkpoint_every,
            learning_rate: spec.learning_rate,
            lr_decay: spec.lr_decay,
        }
    }

    /// The learning rate of train step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        self.learning_rate / (1.0 + self.lr_decay * step as f64)
    }

    /// Whether the tables must be saved before train step `step` (the last save was at `saved`).
    pub fn save_due(&self, step: u64, saved: u64) -> bool {
        step > saved && (step == self.total || step % self.every == 0)
    }

    /// Whether train step `step` ends an epoch (or the job).
    pub fn ends_epoch(&self, done: u64) -> bool {
        done % self.per_epoch == 0 || done == self.total
    }

    /// The next task after `step` train steps with tables saved at `saved`: a save when due,
    /// else train step `step` broadcasting `extra` after the step; `None` when done.
    pub fn next(&self, step: u64, saved: u64, extra: &[f64]) -> Option<Task> {
        if self.save_due(step, saved) {
            let last = step == self.total;
            return Some(Task {
                phase: PHASE_SAVE,
                broadcast: vec![step as f64, if last { 1.0 } else { 0.0 }],
            });
        }
        (step < self.total).then(|| train_task(step, extra))
    }

    /// The train task `k` steps after [`Schedule::next`] under `ssp` (see [`step_ahead`]).
    pub fn ahead(&self, step: u64, saved: u64, k: u64, extra: &[f64]) -> Option<Task> {
        if self.save_due(step, saved) {
            return None;
        }
        step_ahead(step, k, self.every, self.total).map(|t| train_task(t, extra))
    }

    /// Train steps plus saves in all (for progress).
    pub fn planned(&self) -> u64 {
        self.total + self.total.div_ceil(self.every)
    }
}

fn train_task(step: u64, extra: &[f64]) -> Task {
    let mut broadcast = vec![step as f64];
    broadcast.extend_from_slice(extra);
    Task {
        phase: PHASE_TRAIN,
        broadcast,
    }
}

/// The train step `k` steps after `step` if none of the steps reached on the way calls for a
/// save (every `every` steps) or is the last (`total`): under `ssp` those run ahead.
pub fn step_ahead(step: u64, k: u64, every: u64, total: u64) -> Option<u64> {
    let target = step.checked_add(k)?;
    if target >= total {
        return None;
    }
    // Steps step+1 ..= target are reached by reducing step .. target-1: none may be a save.
    let next_save = (step / every + 1) * every;
    (next_save > target).then_some(target)
}

/// Rows by key: `values` holds the rows of `keys` (strictly increasing) back to back.
#[derive(Debug, Clone)]
pub struct Rows<'a> {
    keys: &'a [u64],
    offsets: Vec<usize>,
    values: &'a [f32],
}

impl<'a> Rows<'a> {
    /// `values` as the rows of `keys`; refused if the lengths do not add up.
    pub fn new(model: &dyn RowModel, keys: &'a [u64], values: &'a [f32]) -> Result<Self, JobError> {
        let offsets = offsets(model, keys);
        let total = offsets.last().copied().unwrap_or(0);
        if total != values.len() {
            return Err(JobError::Shape(format!(
                "{} parameter values for rows of {total}",
                values.len()
            )));
        }
        Ok(Rows {
            keys,
            offsets,
            values,
        })
    }

    /// Row `key` (`None` if it was not pulled).
    pub fn get(&self, key: u64) -> Option<&'a [f32]> {
        let i = self.keys.binary_search(&key).ok()?;
        Some(&self.values[self.offsets[i]..self.offsets[i + 1]])
    }
}

/// Prefix sums of the rows' widths: row `i` is `offsets[i]..offsets[i + 1]`.
pub fn offsets(model: &dyn RowModel, keys: &[u64]) -> Vec<usize> {
    let mut out = Vec::with_capacity(keys.len() + 1);
    let mut at = 0;
    out.push(0);
    for &k in keys {
        at += model.width(k);
        out.push(at);
    }
    out
}

/// Why a table refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    /// A step this table has already moved past: a straggler's request.
    #[error("step {step} is behind this table (at step {version})")]
    Stale { step: u64, version: u64 },
    /// Keys not strictly increasing, or values not as wide as the rows.
    #[error("malformed parameter request: {0}")]
    Malformed(String),
    /// A gradient that is not finite, or a row that became so.
    #[error("parameter row {key} is not finite after step {step} (learning rate too high?)")]
    NotFinite { key: u64, step: u64 },
}

/// The gradient rows of one step by `(source, key)`.
type StepPushes = BTreeMap<(u32, u64), Box<[f32]>>;

/// One parameter shard's rows, at `version` train steps applied, with the pushes of later
/// steps waiting.
#[derive(Debug, Clone, Default)]
pub struct ParamTable {
    version: u64,
    rows: HashMap<u64, Box<[f32]>>,
    /// Gradient rows waiting, by step, then `(source, key)`: recorded once each, however the
    /// pushes were split into requests.
    pending: BTreeMap<u64, StepPushes>,
    row_values: usize,
    pending_values: usize,
}

fn check_keys(keys: &[u64]) -> Result<(), TableError> {
    if keys.windows(2).all(|w| w[0] < w[1]) {
        Ok(())
    } else {
        Err(TableError::Malformed("keys not strictly increasing".into()))
    }
}

impl ParamTable {
    /// An empty table (every row at its initial value) at `version`.
    pub fn new(version: u64) -> Self {
        ParamTable {
            version,
            ..Default::default()
        }
    }

    /// A table restored from saved rows at `version`.
    pub fn from_rows(
        model: &dyn RowModel,
        version: u64,
        keys: &[u64],
        values: &[f32],
    ) -> Result<Self, TableError> {
        check_keys(keys)?;
        let offs = offsets(model, keys);
        if offs.last().copied().unwrap_or(0) != values.len() {
            return Err(TableError::Malformed(
                "saved rows of the wrong width".into(),
            ));
        }
        let mut t = ParamTable::new(version);
        for (i, &k) in keys.iter().enumerate() {
            let row = &values[offs[i]..offs[i + 1]];
            if !row.iter().all(|v| v.is_finite()) {
                return Err(TableError::NotFinite {
                    key: k,
                    step: version,
                });
            }
            t.row_values += row.len();
            t.rows.insert(k, row.into());
        }
        Ok(t)
    }

    /// Train steps applied.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Values held (rows written plus pushes waiting): what the table costs in memory, in f32s.
    pub fn values_held(&self) -> usize {
        self.row_values + self.pending_values
    }

    /// Applies the waiting pushes of every step before `step`, in step and then source order.
    pub fn advance(&mut self, model: &dyn RowModel, step: u64) -> Result<(), TableError> {
        if step < self.version {
            return Err(TableError::Stale {
                step,
                version: self.version,
            });
        }
        while self.version < step {
            let v = self.version;
            if let Some(pushes) = self.pending.remove(&v) {
                self.apply(model, v, pushes)?;
            }
            self.version = v + 1;
        }
        Ok(())
    }

    fn apply(
        &mut self,
        model: &dyn RowModel,
        step: u64,
        pushes: StepPushes,
    ) -> Result<(), TableError> {
        let lr = model.learning_rate(step);
        // Each row's sum runs over the sources in order: the same on every node.
        let mut sums: HashMap<u64, Vec<f64>> = HashMap::new();
        for ((_, k), g) in &pushes {
            self.pending_values -= g.len();
            let acc = sums.entry(*k).or_insert_with(|| vec![0.0; g.len()]);
            for (a, &x) in acc.iter_mut().zip(g.iter()) {
                *a += f64::from(x);
            }
        }
        for (k, g) in sums {
            let row = match self.rows.entry(k) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let mut r = vec![0.0f32; g.len()].into_boxed_slice();
                    model.init_row(k, &mut r);
                    self.row_values += r.len();
                    e.insert(r)
                }
            };
            for (w, d) in row.iter_mut().zip(&g) {
                *w = (f64::from(*w) - lr * d) as f32;
            }
            if !row.iter().all(|v| v.is_finite()) {
                return Err(TableError::NotFinite { key: k, step });
            }
        }
        Ok(())
    }

    /// Appends the rows of `keys` (strictly increasing) with the pushes of every step before
    /// `complete` applied (a table already past it reads as it stands: fresher is allowed).
    pub fn pull(
        &mut self,
        model: &dyn RowModel,
        complete: u64,
        keys: &[u64],
        out: &mut Vec<f32>,
    ) -> Result<(), TableError> {
        check_keys(keys)?;
        self.advance(model, complete.max(self.version))?;
        for &k in keys {
            match self.rows.get(&k) {
                Some(r) => out.extend_from_slice(r),
                None => {
                    let at = out.len();
                    out.resize(at + model.width(k), 0.0);
                    model.init_row(k, &mut out[at..]);
                }
            }
        }
        Ok(())
    }

    /// Records the gradient sums of `source`'s minibatch at train step `step` (after applying
    /// the steps before `complete`); returns how many rows were new (a row recorded before for
    /// this step and source is not applied twice). A step already applied is refused.
    pub fn push(
        &mut self,
        model: &dyn RowModel,
        (step, complete): (u64, u64),
        source: u32,
        keys: &[u64],
        grads: &[f32],
    ) -> Result<usize, TableError> {
        check_keys(keys)?;
        let offs = offsets(model, keys);
        let want = offs.last().copied().unwrap_or(0);
        if want != grads.len() {
            return Err(TableError::Malformed(format!(
                "{} gradient values for rows of {want}",
                grads.len()
            )));
        }
        if let Some((i, _)) = grads.iter().enumerate().find(|(_, g)| !g.is_finite()) {
            let key = keys[offs.partition_point(|&o| o <= i) - 1];
            return Err(TableError::NotFinite { key, step });
        }
        self.advance(model, complete.min(step).max(self.version))?;
        if step < self.version {
            return Err(TableError::Stale {
                step,
                version: self.version,
            });
        }
        let at_step = self.pending.entry(step).or_default();
        let mut fresh = 0;
        for (i, &k) in keys.iter().enumerate() {
            if let std::collections::btree_map::Entry::Vacant(e) = at_step.entry((source, k)) {
                e.insert(grads[offs[i]..offs[i + 1]].into());
                self.pending_values += offs[i + 1] - offs[i];
                fresh += 1;
            }
        }
        Ok(fresh)
    }

    /// The rows written so far, keys increasing, as they stand after `step` train steps.
    pub fn save(
        &mut self,
        model: &dyn RowModel,
        step: u64,
    ) -> Result<(Vec<u64>, Vec<f32>), TableError> {
        self.advance(model, step)?;
        let mut keys: Vec<u64> = self.rows.keys().copied().collect();
        keys.sort_unstable();
        let mut values = Vec::with_capacity(self.row_values);
        for k in &keys {
            values.extend_from_slice(&self.rows[k]);
        }
        Ok((keys, values))
    }
}

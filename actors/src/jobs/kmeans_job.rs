//! k-means as iterative MapReduce: exact distributed k-means++ seeding, then Lloyd steps.
//!
//! Seeding picks centres from the whole dataset exactly as single-process k-means++ does, with
//! the coordinator's seeded RNG (checkpointed): a counting pass gives each shard's rows (one
//! slot per shard in the sum vector, so pre-summing keeps them apart); the first centre is a
//! uniform global row index, fetched from its shard; each next centre needs a weights pass (per
//! shard, the sum of squared distances to the chosen centres) and a pick pass (the shard the
//! coordinator's draw falls into returns the row where its running weight reaches the draw).
//! Then Lloyd steps: assign, sum per cluster, move centroids, until no centroid moves more than
//! `tol` or `max_iter` steps, the rule of [`super::kmeans::lloyd_from`].

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};
use tidepool_runtime::jobspec::JobSpec;

use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};
use super::kmeans::{max_shift, update_centroids, KMeansPartial};
use super::rng::Rng;

const PHASE_COUNT: u32 = 10;
const PHASE_FETCH: u32 = 11;
const PHASE_WEIGHTS: u32 = 12;
const PHASE_PICK: u32 = 13;
const PHASE_ASSIGN: u32 = 20;

/// The k-means job.
#[derive(Debug, Clone)]
pub struct KMeansJob {
    spec: JobSpec,
    features: usize,
    shards: u32,
}

/// Where seeding stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KStage {
    Count,
    /// Fetch row `index` of `shard` as the next centre.
    Fetch {
        shard: u32,
        index: u64,
    },
    Weights,
    /// Pick the row of `shard` where the running weight reaches `target`.
    Pick {
        shard: u32,
        target: f64,
    },
    Lloyd,
    Done,
}

/// The k-means job's checkpointed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansState {
    pub stage: KStage,
    pub rng: [u64; 4],
    pub shard_rows: Vec<u64>,
    /// Chosen centres so far (row-major `k x d`), then the current centroids.
    pub centroids: Vec<f64>,
    /// The k-means++ centres (row-major), once seeding is done.
    pub init: Vec<f64>,
    pub iterations: u64,
    pub inertia: Option<f64>,
}

fn nearest(row: &[f32], centroids: &[f64], d: usize) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (c, centre) in centroids.chunks_exact(d.max(1)).enumerate() {
        let dist: f64 = row
            .iter()
            .zip(centre)
            .map(|(&x, &m)| (f64::from(x) - m) * (f64::from(x) - m))
            .sum();
        if dist < best.1 {
            best = (c, dist);
        }
    }
    best
}

impl KMeansJob {
    pub fn new(spec: JobSpec, features: usize, shards: u32) -> Self {
        KMeansJob {
            spec,
            features,
            shards,
        }
    }

    fn k(&self) -> usize {
        self.spec.k
    }

    fn row_partial(&self, data: &ShardData<'_>, shard: u32, i: Option<usize>) -> Partial {
        let mut sum = vec![0.0; self.features];
        if let Some(i) = i.filter(|&i| data.shard == shard && i < data.rows()) {
            for (s, &x) in sum.iter_mut().zip(data.row(i)) {
                *s = f64::from(x);
            }
        }
        Partial {
            rows: 0,
            sum,
            ..Partial::default()
        }
    }

    /// Picks a shard and an offset within it from per-shard weights and a draw in
    /// `[0, total)`: the first shard (in id order) whose running total exceeds the draw.
    fn locate(weights: &[f64], draw: f64) -> (u32, f64) {
        let mut before = 0.0;
        let mut last = 0;
        for (s, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                last = s;
                if draw < before + w {
                    return (s as u32, draw - before);
                }
            }
            before += w;
        }
        (last as u32, weights.get(last).copied().unwrap_or(0.0))
    }

    /// After a centre was added: next weights pass, or Lloyd once there are k.
    fn after_centre(&self, s: &mut KMeansState) {
        if s.centroids.len() / self.features.max(1) >= self.k() {
            s.init = s.centroids.clone();
            s.stage = KStage::Lloyd;
        } else {
            s.stage = KStage::Weights;
        }
    }

    /// A uniform draw over all rows: the next centre when the weights are all zero (and the
    /// first centre).
    fn uniform_fetch(s: &mut KMeansState, rng: &mut Rng) -> KStage {
        let n: u64 = s.shard_rows.iter().sum();
        let mut g = rng.below(n.max(1));
        for (shard, &rows) in s.shard_rows.iter().enumerate() {
            if g < rows {
                return KStage::Fetch {
                    shard: shard as u32,
                    index: g,
                };
            }
            g -= rows;
        }
        KStage::Fetch { shard: 0, index: 0 }
    }
}

impl Job for KMeansJob {
    type State = KMeansState;

    fn init(&self) -> KMeansState {
        KMeansState {
            stage: KStage::Count,
            rng: Rng::from_seed(self.spec.seed).state(),
            shard_rows: Vec::new(),
            centroids: Vec::new(),
            init: Vec::new(),
            iterations: 0,
            inertia: None,
        }
    }

    fn next_task(&self, s: &KMeansState) -> Option<Task> {
        let (phase, broadcast) = match &s.stage {
            KStage::Count => (PHASE_COUNT, Vec::new()),
            KStage::Fetch { shard, index } => (PHASE_FETCH, vec![*shard as f64, *index as f64]),
            KStage::Weights => (PHASE_WEIGHTS, s.centroids.clone()),
            KStage::Pick { shard, target } => {
                let mut b = s.centroids.clone();
                b.extend([*shard as f64, *target]);
                (PHASE_PICK, b)
            }
            KStage::Lloyd => (PHASE_ASSIGN, s.centroids.clone()),
            KStage::Done => return None,
        };
        Some(Task { phase, broadcast })
    }

    fn planned_steps(&self, s: &KMeansState) -> u64 {
        let seeding = 2 * self.k() as u64;
        match s.stage {
            KStage::Done => seeding + s.iterations,
            _ => seeding + self.spec.max_iter,
        }
    }

    fn map(&self, _step: u64, task: &Task, data: &ShardData<'_>) -> Result<Partial, JobError> {
        let d = self.features;
        let b = &task.broadcast;
        match task.phase {
            PHASE_COUNT => {
                let mut sum = vec![0.0; self.shards as usize];
                if let Some(slot) = sum.get_mut(data.shard as usize) {
                    *slot = data.rows() as f64;
                }
                Ok(Partial {
                    rows: data.rows() as u64,
                    sum,
                    ..Partial::default()
                })
            }
            PHASE_FETCH if b.len() == 2 => {
                Ok(self.row_partial(data, b[0] as u32, Some(b[1] as usize)))
            }
            PHASE_WEIGHTS if b.len() % d.max(1) == 0 => {
                let w: f64 = (0..data.rows()).map(|i| nearest(data.row(i), b, d).1).sum();
                let mut sum = vec![0.0; self.shards as usize];
                if let Some(slot) = sum.get_mut(data.shard as usize) {
                    *slot = w;
                }
                Ok(Partial {
                    rows: data.rows() as u64,
                    sum,
                    ..Partial::default()
                })
            }
            PHASE_PICK if b.len() >= 2 && (b.len() - 2) % d.max(1) == 0 => {
                let (centres, pick) = b.split_at(b.len() - 2);
                let shard = pick[0] as u32;
                if data.shard != shard {
                    return Ok(self.row_partial(data, shard, None));
                }
                let mut running = 0.0;
                let mut chosen = None;
                for i in 0..data.rows() {
                    let w = nearest(data.row(i), centres, d).1;
                    if w > 0.0 {
                        chosen = Some(i);
                        running += w;
                        if running > pick[1] {
                            break;
                        }
                    }
                }
                Ok(self.row_partial(data, shard, chosen))
            }
            PHASE_ASSIGN if b.len() == self.k() * d => {
                let k = self.k();
                let mut sum = vec![0.0; 1 + k + k * d];
                for i in 0..data.rows() {
                    let row = data.row(i);
                    let (c, dist) = nearest(row, b, d);
                    sum[0] += dist;
                    sum[1 + c] += 1.0;
                    for (j, &x) in row.iter().enumerate() {
                        sum[1 + k + c * d + j] += f64::from(x);
                    }
                }
                Ok(Partial {
                    rows: data.rows() as u64,
                    sum,
                    ..Partial::default()
                })
            }
            p => Err(JobError::Shape(format!(
                "k-means phase {p} with a broadcast of {}",
                b.len()
            ))),
        }
    }

    fn reduce(
        &self,
        s: &mut KMeansState,
        task: &Task,
        merged: Partial,
    ) -> Result<StepReport, JobError> {
        let mut rng = Rng::from_state(s.rng);
        let d = self.features;
        let rows = merged.rows;
        let mut loss = None;
        match task.phase {
            PHASE_COUNT => {
                if merged.rows == 0 {
                    return Err(JobError::Data("the dataset has no rows".into()));
                }
                s.shard_rows = merged.sum.iter().map(|v| v.round() as u64).collect();
                s.stage = Self::uniform_fetch(s, &mut rng);
            }
            PHASE_FETCH | PHASE_PICK => {
                s.centroids.extend(&merged.sum[..d.min(merged.sum.len())]);
                self.after_centre(s);
            }
            PHASE_WEIGHTS => {
                let total: f64 = merged.sum.iter().sum();
                s.stage = if total > 0.0 {
                    let (shard, target) = Self::locate(&merged.sum, rng.uniform_f64() * total);
                    KStage::Pick { shard, target }
                } else {
                    Self::uniform_fetch(s, &mut rng)
                };
            }
            PHASE_ASSIGN => {
                let k = self.k();
                if merged.sum.len() != 1 + k + k * d {
                    return Err(JobError::Shape("assignment length".into()));
                }
                let partial = KMeansPartial {
                    inertia: merged.sum[0],
                    counts: merged.sum[1..1 + k]
                        .iter()
                        .map(|c| c.round() as u64)
                        .collect(),
                    sums: DMatrix::from_row_slice(k, d, &merged.sum[1 + k..]),
                };
                let old = DMatrix::from_row_slice(k, d, &s.centroids);
                let next = update_centroids(&partial, &old);
                let moved = max_shift(&old, &next);
                s.centroids = next.transpose().as_slice().to_vec();
                s.iterations += 1;
                s.inertia = Some(partial.inertia);
                loss = s.inertia;
                if moved <= self.spec.tol || s.iterations >= self.spec.max_iter {
                    s.stage = KStage::Done;
                }
            }
            p => return Err(JobError::Shape(format!("unknown k-means phase {p}"))),
        }
        s.rng = rng.state();
        Ok(StepReport { loss, rows })
    }

    fn result(&self, s: &KMeansState) -> Result<serde_json::Value, JobError> {
        let rows = |v: &[f64]| -> Vec<Vec<f64>> {
            v.chunks_exact(self.features.max(1))
                .map(<[f64]>::to_vec)
                .collect()
        };
        Ok(serde_json::json!({
            "format": "tidepool-kmeans/1",
            "k": self.k(),
            "centroids": rows(&s.centroids),
            "init_centroids": rows(&s.init),
            "inertia": s.inertia,
            "iterations": s.iterations,
        }))
    }
}

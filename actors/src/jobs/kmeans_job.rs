//! k-means as iterative MapReduce: `n_init` runs side by side, each seeded by exact distributed
//! greedy k-means++, then Lloyd steps; the run with the lowest inertia is the result.
//!
//! Every pass serves all runs at once (one scan of the data per step, whatever `n_init`). Seeding
//! picks centres from the whole dataset exactly as single-process greedy k-means++ does
//! (scikit-learn's: `2 + ln k` candidates per centre, the one that lowers the potential most is
//! kept), with each run's seeded RNG (checkpointed):
//!
//! - a counting pass gives each shard's rows (one slot per shard in the sum vector, so pre-summing
//!   keeps them apart) and every column's sum and sum of squares (the tolerance is relative to the
//!   mean column variance, as scikit-learn's is);
//! - the first centre is a uniform global row index, fetched from its shard;
//! - an evaluation pass gives, per shard, the potential (sum of squared distances to the nearest
//!   centre) of the centres with each candidate added; the best candidate is kept, and its
//!   per-shard potentials are the weights the next candidates are drawn from;
//! - a pick pass returns the candidate rows: the row of the shard a draw falls into where that
//!   shard's running weight reaches the draw.
//!
//! Then Lloyd steps: assign, sum per cluster, move centroids; a run stops when the sum of its
//! centres' squared moves is at most `tol` times the mean column variance (scikit-learn's rule;
//! [`super::kmeans::lloyd_from`] is the single-process reference), all of them after `max_iter`
//! steps.

use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};
use tidepool_runtime::jobspec::JobSpec;

use super::job::{Job, JobError, Partial, ShardData, StepReport, Task};
use super::kmeans::{dist2, nearest, squared_shift, update_centroids, KMeansPartial};
use super::rng::Rng;

const PHASE_COUNT: u32 = 10;
const PHASE_FETCH: u32 = 11;
const PHASE_EVAL: u32 = 12;
const PHASE_PICK: u32 = 13;
const PHASE_ASSIGN: u32 = 20;

/// The k-means job.
#[derive(Debug, Clone)]
pub struct KMeansJob {
    spec: JobSpec,
    features: usize,
    shards: u32,
}

/// Where the runs stand (all runs move through the stages together).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum KStage {
    Count,
    /// Fetch each run's first centre: `(shard, row index)` per run.
    Fetch {
        rows: Vec<(u32, u64)>,
    },
    /// Score each run's candidates (row-major, `candidates x d` per run).
    Eval {
        candidates: Vec<Vec<f64>>,
    },
    /// Fetch each run's candidate rows: `(shard, running-weight target)` per draw.
    Pick {
        draws: Vec<Vec<(u32, f64)>>,
    },
    Lloyd,
    Done,
}

/// One run (one seeding and its Lloyd steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KRun {
    pub rng: [u64; 4],
    /// Chosen centres so far (row-major `k x d`), then the current centroids.
    pub centroids: Vec<f64>,
    /// The k-means++ centres (row-major), once seeding is done.
    pub init: Vec<f64>,
    /// Per shard, the potential of the centres chosen so far (seeding).
    pub weights: Vec<f64>,
    pub inertia: Option<f64>,
    pub iterations: u64,
    pub converged: bool,
}

/// The k-means job's checkpointed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KMeansState {
    pub stage: KStage,
    pub runs: Vec<KRun>,
    pub shard_rows: Vec<u64>,
    /// The stopping threshold on the sum of squared centre moves: `tol` x mean column variance.
    pub tol_abs: f64,
    /// Lloyd steps run.
    pub iterations: u64,
}

/// The RNG of run `r`: run 0 draws from the job's seed, the others from their own streams.
fn run_rng(seed: u64, r: usize) -> Rng {
    if r == 0 {
        Rng::from_seed(seed)
    } else {
        Rng::for_task(seed, r as u64, u32::MAX)
    }
}

/// Candidates per centre in greedy k-means++: `2 + floor(ln k)` (scikit-learn's choice).
pub fn greedy_candidates(k: usize) -> usize {
    2 + (k.max(1) as f64).ln().floor() as usize
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

    fn n_init(&self) -> usize {
        self.spec.n_init.max(1)
    }

    fn candidates(&self) -> usize {
        self.spec
            .init_candidates
            .unwrap_or_else(|| greedy_candidates(self.k()))
            .max(1)
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

    /// A uniform global row: `(shard, index in it)`.
    fn uniform_row(shard_rows: &[u64], rng: &mut Rng) -> (u32, u64) {
        let n: u64 = shard_rows.iter().sum();
        let mut g = rng.below(n.max(1));
        for (shard, &rows) in shard_rows.iter().enumerate() {
            if g < rows {
                return (shard as u32, g);
            }
            g -= rows;
        }
        (0, 0)
    }

    /// After each run's candidates were scored (or its first centre fetched): next draws, or
    /// Lloyd once every run has k centres.
    fn next_draws(&self, s: &mut KMeansState) {
        let d = self.features.max(1);
        if s.runs.iter().all(|r| r.centroids.len() / d >= self.k()) {
            for r in &mut s.runs {
                r.init = r.centroids.clone();
            }
            s.stage = KStage::Lloyd;
            return;
        }
        let l = self.candidates();
        let draws = s
            .runs
            .iter_mut()
            .map(|r| {
                let mut rng = Rng::from_state(r.rng);
                let total: f64 = r.weights.iter().sum();
                let draws = (0..l)
                    .map(|_| {
                        if total > 0.0 {
                            Self::locate(&r.weights, rng.uniform_f64() * total)
                        } else {
                            // Every point is already a centre: any row will do.
                            let (shard, i) = Self::uniform_row(&s.shard_rows, &mut rng);
                            (shard, -(i as f64) - 1.0)
                        }
                    })
                    .collect();
                r.rng = rng.state();
                draws
            })
            .collect();
        s.stage = KStage::Pick { draws };
    }

    /// `runs x slots x d` row values from the shard that holds each requested row.
    fn rows_partial(
        &self,
        data: &ShardData<'_>,
        requests: &[Vec<(u32, Option<usize>)>],
        slots: usize,
    ) -> Partial {
        let d = self.features;
        let mut sum = vec![0.0; requests.len() * slots * d];
        for (r, reqs) in requests.iter().enumerate() {
            for (j, &(shard, row)) in reqs.iter().enumerate() {
                if let Some(i) = row.filter(|&i| shard == data.shard && i < data.rows()) {
                    let at = (r * slots + j) * d;
                    for (s, &x) in sum[at..at + d].iter_mut().zip(data.row(i)) {
                        *s = f64::from(x);
                    }
                }
            }
        }
        Partial {
            rows: 0,
            sum,
            ..Partial::default()
        }
    }

    /// Splits a broadcast of `runs` blocks, each led by its length.
    fn blocks(b: &[f64]) -> Result<Vec<&[f64]>, JobError> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let n = b[at] as usize;
            let block = b
                .get(at + 1..at + 1 + n)
                .ok_or_else(|| JobError::Shape("k-means broadcast block".into()))?;
            out.push(block);
            at += 1 + n;
        }
        Ok(out)
    }

    fn pack(blocks: impl IntoIterator<Item = Vec<f64>>) -> Vec<f64> {
        let mut out = Vec::new();
        for b in blocks {
            out.push(b.len() as f64);
            out.extend(b);
        }
        out
    }
}

impl Job for KMeansJob {
    type State = KMeansState;

    fn init(&self) -> KMeansState {
        KMeansState {
            stage: KStage::Count,
            runs: (0..self.n_init())
                .map(|r| KRun {
                    rng: run_rng(self.spec.seed, r).state(),
                    centroids: Vec::new(),
                    init: Vec::new(),
                    weights: Vec::new(),
                    inertia: None,
                    iterations: 0,
                    converged: false,
                })
                .collect(),
            shard_rows: Vec::new(),
            tol_abs: 0.0,
            iterations: 0,
        }
    }

    fn next_task(&self, s: &KMeansState) -> Option<Task> {
        let (phase, broadcast) = match &s.stage {
            KStage::Count => (PHASE_COUNT, Vec::new()),
            KStage::Fetch { rows } => (
                PHASE_FETCH,
                rows.iter()
                    .flat_map(|&(shard, i)| [f64::from(shard), i as f64])
                    .collect(),
            ),
            // Per run: its centres, then its candidates.
            KStage::Eval { candidates } => (
                PHASE_EVAL,
                Self::pack(
                    s.runs
                        .iter()
                        .zip(candidates)
                        .flat_map(|(r, c)| [r.centroids.clone(), c.clone()]),
                ),
            ),
            // Per run: its centres, then its draws as (shard, target) pairs.
            KStage::Pick { draws } => (
                PHASE_PICK,
                Self::pack(s.runs.iter().zip(draws).flat_map(|(r, ds)| {
                    [
                        r.centroids.clone(),
                        ds.iter().flat_map(|&(sh, t)| [f64::from(sh), t]).collect(),
                    ]
                })),
            ),
            // Per run: a 1 if it still moves, then its centroids.
            KStage::Lloyd => (
                PHASE_ASSIGN,
                Self::pack(s.runs.iter().map(|r| {
                    let mut b = vec![if r.converged { 0.0 } else { 1.0 }];
                    b.extend(&r.centroids);
                    b
                })),
            ),
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
        if data.csr.is_some() {
            return Err(JobError::Data(
                "k-means needs dense rows; this dataset is sparse (libsvm)".into(),
            ));
        }
        let d = self.features;
        let b = &task.broadcast;
        let shards = self.shards as usize;
        let runs = self.n_init();
        let shard = data.shard as usize;
        let bad = |what: &str| JobError::Shape(format!("k-means {what} broadcast"));
        match task.phase {
            PHASE_COUNT => {
                // Per shard its rows; then every column's sum and sum of squares.
                let mut sum = vec![0.0; shards + 2 * d];
                if let Some(slot) = sum.get_mut(shard) {
                    *slot = data.rows() as f64;
                }
                for i in 0..data.rows() {
                    for (j, &x) in data.row(i).iter().enumerate() {
                        let x = f64::from(x);
                        sum[shards + j] += x;
                        sum[shards + d + j] += x * x;
                    }
                }
                Ok(Partial {
                    rows: data.rows() as u64,
                    sum,
                    ..Partial::default()
                })
            }
            PHASE_FETCH if b.len() == 2 * runs => {
                let reqs: Vec<Vec<(u32, Option<usize>)>> = b
                    .chunks_exact(2)
                    .map(|p| vec![(p[0] as u32, Some(p[1] as usize))])
                    .collect();
                Ok(self.rows_partial(data, &reqs, 1))
            }
            PHASE_EVAL => {
                let blocks = Self::blocks(b)?;
                if blocks.len() != 2 * runs {
                    return Err(bad("evaluation"));
                }
                let l = self.candidates();
                // Per run and candidate, one slot per shard: this shard's potential.
                let mut sum = vec![0.0; runs * l * shards];
                for r in 0..runs {
                    let (centres, cands) = (blocks[2 * r], blocks[2 * r + 1]);
                    if cands.len() % d.max(1) != 0 || cands.len() / d.max(1) > l {
                        return Err(bad("evaluation"));
                    }
                    for i in 0..data.rows() {
                        let row = data.row(i);
                        let base = if centres.is_empty() {
                            f64::INFINITY
                        } else {
                            nearest(row, centres, d).1
                        };
                        for (c, cand) in cands.chunks_exact(d.max(1)).enumerate() {
                            sum[(r * l + c) * shards + shard] += base.min(dist2(row, cand));
                        }
                    }
                }
                Ok(Partial {
                    rows: data.rows() as u64,
                    sum,
                    ..Partial::default()
                })
            }
            PHASE_PICK => {
                let blocks = Self::blocks(b)?;
                if blocks.len() != 2 * runs {
                    return Err(bad("pick"));
                }
                let l = self.candidates();
                let mut reqs = Vec::with_capacity(runs);
                for r in 0..runs {
                    let (centres, draws) = (blocks[2 * r], blocks[2 * r + 1]);
                    if draws.len() != 2 * l {
                        return Err(bad("pick"));
                    }
                    let mut mine: Vec<(u32, Option<usize>)> = Vec::with_capacity(l);
                    // Running weights of this shard's rows, scanned once for every draw in it.
                    let targets: Vec<(usize, f64)> = draws
                        .chunks_exact(2)
                        .enumerate()
                        .filter(|(_, p)| p[0] as usize == shard)
                        .map(|(j, p)| (j, p[1]))
                        .collect();
                    let mut found: Vec<Option<usize>> = vec![None; l];
                    for &(j, t) in &targets {
                        if t < 0.0 {
                            // A uniform row (every weight was zero): its index is -(t + 1).
                            found[j] = Some((-t - 1.0) as usize);
                        }
                    }
                    let mut open: Vec<(usize, f64)> =
                        targets.iter().copied().filter(|&(_, t)| t >= 0.0).collect();
                    open.sort_by(|a, b| a.1.total_cmp(&b.1));
                    let mut running = 0.0;
                    let mut last_positive = None;
                    let mut next = 0;
                    for i in 0..data.rows() {
                        if next >= open.len() {
                            break;
                        }
                        let w = nearest(data.row(i), centres, d).1;
                        if w > 0.0 {
                            last_positive = Some(i);
                            running += w;
                            while next < open.len() && running > open[next].1 {
                                found[open[next].0] = Some(i);
                                next += 1;
                            }
                        }
                    }
                    // Rounding may leave a draw past the last row: it takes the last row with
                    // a positive weight.
                    for &(j, _) in &open[next..] {
                        found[j] = last_positive;
                    }
                    for (j, p) in draws.chunks_exact(2).enumerate() {
                        mine.push((p[0] as u32, found[j]));
                    }
                    reqs.push(mine);
                }
                Ok(self.rows_partial(data, &reqs, l))
            }
            PHASE_ASSIGN => {
                let blocks = Self::blocks(b)?;
                let k = self.k();
                if blocks.len() != runs || blocks.iter().any(|bl| bl.len() != 1 + k * d) {
                    return Err(bad("assignment"));
                }
                let per = 1 + k + k * d;
                let mut sum = vec![0.0; runs * per];
                for (r, bl) in blocks.iter().enumerate() {
                    if bl[0] == 0.0 {
                        continue;
                    }
                    let centres = &bl[1..];
                    let out = &mut sum[r * per..(r + 1) * per];
                    for i in 0..data.rows() {
                        let row = data.row(i);
                        let (c, dist) = nearest(row, centres, d);
                        out[0] += dist;
                        out[1 + c] += 1.0;
                        for (j, &x) in row.iter().enumerate() {
                            out[1 + k + c * d + j] += f64::from(x);
                        }
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
        let d = self.features;
        let k = self.k();
        let shards = self.shards as usize;
        let runs = self.n_init();
        let rows = merged.rows;
        let mut loss = None;
        let short = |what: &str| JobError::Shape(format!("k-means {what} partial length"));
        match task.phase {
            PHASE_COUNT => {
                if merged.rows == 0 {
                    return Err(JobError::Data("the dataset has no rows".into()));
                }
                if merged.sum.len() != shards + 2 * d {
                    return Err(short("count"));
                }
                s.shard_rows = merged.sum[..shards]
                    .iter()
                    .map(|v| v.round() as u64)
                    .collect();
                let n = merged.rows as f64;
                let mean_var = (0..d)
                    .map(|j| {
                        let mean = merged.sum[shards + j] / n;
                        (merged.sum[shards + d + j] / n - mean * mean).max(0.0)
                    })
                    .sum::<f64>()
                    / d.max(1) as f64;
                s.tol_abs = self.spec.tol * mean_var;
                let rows = s
                    .runs
                    .iter_mut()
                    .map(|r| {
                        let mut rng = Rng::from_state(r.rng);
                        let at = Self::uniform_row(&s.shard_rows, &mut rng);
                        r.rng = rng.state();
                        at
                    })
                    .collect();
                s.stage = KStage::Fetch { rows };
            }
            PHASE_FETCH => {
                if merged.sum.len() != runs * d {
                    return Err(short("fetch"));
                }
                // The first centre is scored like a lone candidate: its potentials come back.
                let candidates = merged
                    .sum
                    .chunks_exact(d.max(1))
                    .map(<[f64]>::to_vec)
                    .collect();
                s.stage = KStage::Eval { candidates };
            }
            PHASE_EVAL => {
                let KStage::Eval { candidates } = &s.stage else {
                    return Err(JobError::Shape("k-means evaluation out of turn".into()));
                };
                let l = self.candidates();
                if merged.sum.len() != runs * l * shards {
                    return Err(short("evaluation"));
                }
                let candidates = candidates.clone();
                for (r, run) in s.runs.iter_mut().enumerate() {
                    let n = candidates[r].len() / d.max(1);
                    // The candidate that lowers the potential most (the first on a tie).
                    let mut best: Option<(usize, f64)> = None;
                    for c in 0..n {
                        let at = (r * l + c) * shards;
                        let total: f64 = merged.sum[at..at + shards].iter().sum();
                        if best.is_none_or(|(_, b)| total < b) {
                            best = Some((c, total));
                        }
                    }
                    if let Some((c, _)) = best {
                        run.centroids
                            .extend_from_slice(&candidates[r][c * d..(c + 1) * d]);
                        let at = (r * l + c) * shards;
                        run.weights = merged.sum[at..at + shards].to_vec();
                    }
                }
                self.next_draws(s);
            }
            PHASE_PICK => {
                let l = self.candidates();
                if merged.sum.len() != runs * l * d {
                    return Err(short("pick"));
                }
                let candidates = merged
                    .sum
                    .chunks_exact((l * d).max(1))
                    .map(<[f64]>::to_vec)
                    .collect();
                s.stage = KStage::Eval { candidates };
            }
            PHASE_ASSIGN => {
                let per = 1 + k + k * d;
                if merged.sum.len() != runs * per {
                    return Err(short("assignment"));
                }
                s.iterations += 1;
                for (r, run) in s.runs.iter_mut().enumerate() {
                    if run.converged {
                        continue;
                    }
                    let sums = &merged.sum[r * per..(r + 1) * per];
                    let partial = KMeansPartial {
                        inertia: sums[0],
                        counts: sums[1..1 + k].iter().map(|c| c.round() as u64).collect(),
                        sums: DMatrix::from_row_slice(k, d, &sums[1 + k..]),
                    };
                    let old = DMatrix::from_row_slice(k, d, &run.centroids);
                    let next = update_centroids(&partial, &old);
                    run.converged = squared_shift(&old, &next) <= s.tol_abs;
                    run.centroids = next.transpose().as_slice().to_vec();
                    run.iterations += 1;
                    run.inertia = Some(partial.inertia);
                }
                loss = best_run(s).and_then(|r| r.inertia);
                if s.runs.iter().all(|r| r.converged) || s.iterations >= self.spec.max_iter {
                    s.stage = KStage::Done;
                }
            }
            p => return Err(JobError::Shape(format!("unknown k-means phase {p}"))),
        }
        Ok(StepReport { loss, rows })
    }

    fn result(&self, s: &KMeansState) -> Result<serde_json::Value, JobError> {
        let rows = |v: &[f64]| -> Vec<Vec<f64>> {
            v.chunks_exact(self.features.max(1))
                .map(<[f64]>::to_vec)
                .collect()
        };
        let best = best_run(s).ok_or_else(|| JobError::Data("k-means ran no run".into()))?;
        Ok(serde_json::json!({
            "format": "tidepool-kmeans/1",
            "k": self.k(),
            "centroids": rows(&best.centroids),
            "init_centroids": rows(&best.init),
            "inertia": best.inertia,
            "iterations": best.iterations,
            "n_init": s.runs.len(),
            "run_inertias": s.runs.iter().map(|r| r.inertia).collect::<Vec<_>>(),
        }))
    }
}

/// The run with the lowest inertia (the first on a tie).
fn best_run(s: &KMeansState) -> Option<&KRun> {
    s.runs
        .iter()
        .fold(None, |best: Option<&KRun>, r| match (best, r.inertia) {
            (None, _) => Some(r),
            (Some(b), Some(i)) if b.inertia.is_none_or(|bi| i < bi) => Some(r),
            (b, _) => b,
        })
}

//! The worker's side of a parameter-server step on a node: every data shard the node serves
//! draws its minibatch; the rows they read are pulled (one request per destination node, split
//! to fit a frame), the gradients computed on the worker pool, and pushed (one request per
//! destination node). A failed or refused request makes the node refuse the step's shards, and
//! the coordinator asks again: pushes are applied once per `(step, source shard)`, so a retry
//! changes nothing already recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tidepool_runtime::codec::{
    ArchivedBody, ArchivedParamReply, ArchivedParamStatus, Body, Dest, Envelope, Frame, JobPartial,
    JobTask, ParamGrads, ParamKeys, ParamPull, ParamPush, ParamReply, ParamStatus, TensorView,
};
use tidepool_runtime::control::DatasetRecord;
use tidepool_runtime::metrics as m;
use tracing::warn;

use super::{refuse_all, JobExecutor, LoadError};
use crate::jobs::job::{sums_to_wire, ExactSum, JobError, Partial, Task};
use crate::jobs::ps::{self, Batch, Rows};
use crate::jobs::registry::ErasedJob;
use crate::params::{At, Gen, ParamError};

/// The shards of a task this node maps (`serving`) and those it refuses (not served here at
/// the task's epoch).
pub(super) struct Assigned {
    pub serving: Vec<u32>,
    pub refused: Vec<u32>,
}

/// How long one parameter request may take.
const PARAM_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a step could not finish on this node.
enum StepFail {
    /// Ask again (moved shard, unreachable node, straggler).
    Retry(String),
    /// A table's rows were lost: roll back.
    Lost,
    /// The job cannot go on.
    Fatal(String),
}

impl From<ParamError> for StepFail {
    fn from(e: ParamError) -> Self {
        match e.status() {
            ParamStatus::Lost => StepFail::Lost,
            ParamStatus::Refused => StepFail::Fatal(e.to_string()),
            _ => StepFail::Retry(e.to_string()),
        }
    }
}

fn from_status(status: ParamStatus, message: &str) -> Result<(), StepFail> {
    match status {
        ParamStatus::Ok => Ok(()),
        ParamStatus::Lost => Err(StepFail::Lost),
        ParamStatus::Refused => Err(StepFail::Fatal(message.to_string())),
        ParamStatus::NotOwner | ParamStatus::Stale => Err(StepFail::Retry(message.to_string())),
    }
}

/// A parameter reply: answered on this node, or a received frame whose rows are read in place
/// (validated once on arrival, then used as `&[f32]` over the receive buffer).
enum Answer {
    Local(ParamReply),
    Remote(Frame),
}

impl Answer {
    fn archived(f: &Frame) -> Option<&ArchivedParamReply> {
        match &f.envelope().body {
            ArchivedBody::ParamReply(r) => Some(r),
            _ => None,
        }
    }

    /// `Ok` if the request was served; otherwise what the step does about it.
    fn check(&self) -> Result<(), StepFail> {
        match self {
            Answer::Local(r) => from_status(r.status, &r.message),
            Answer::Remote(f) => match Self::archived(f) {
                Some(r) => {
                    let status = match r.status {
                        ArchivedParamStatus::Ok => ParamStatus::Ok,
                        ArchivedParamStatus::NotOwner => ParamStatus::NotOwner,
                        ArchivedParamStatus::Lost => ParamStatus::Lost,
                        ArchivedParamStatus::Stale => ParamStatus::Stale,
                        ArchivedParamStatus::Refused => ParamStatus::Refused,
                    };
                    from_status(status, r.message.as_str())
                }
                None => Err(StepFail::Retry("not a parameter reply".into())),
            },
        }
    }

    /// A pull's rows.
    fn values(&self) -> &[f32] {
        match self {
            Answer::Local(r) => &r.values,
            Answer::Remote(f) => Self::archived(f).map_or(&[], |r| r.values.as_f32s()),
        }
    }
}

/// One pull or push, to one node.
enum Call {
    Pull(ParamPull),
    Push(ParamPush),
}

impl JobExecutor {
    fn model(job: &Arc<dyn ErasedJob>) -> Result<&dyn ps::ParamModel, StepFail> {
        job.param_model()
            .ok_or_else(|| StepFail::Fatal("not a parameter-server job".into()))
    }

    /// Sends `call` to `node` (or answers it here) and returns the reply.
    async fn param_call(
        &self,
        job: &Arc<dyn ErasedJob>,
        node: &str,
        call: Call,
    ) -> Result<Answer, StepFail> {
        if node == self.router.name() {
            let model = Self::model(job)?;
            return Ok(Answer::Local(match &call {
                Call::Pull(p) => self.params.pull(model, p).await,
                Call::Push(p) => self.params.push(model, p).await,
            }));
        }
        let link = self
            .router
            .transport()
            .link(node)
            .await
            .map_err(|e| StepFail::Retry(format!("{node}: {e}")))?;
        let body = match call {
            Call::Pull(p) => Body::ParamPull(p),
            Call::Push(p) => Body::ParamPush(p),
        };
        let env = Envelope::new(self.router.name(), Dest::Node(node.to_string()), 0, body);
        let frame = link
            .request(env, PARAM_TIMEOUT)
            .await
            .map_err(|e| StepFail::Retry(format!("{node}: {e}")))?;
        match &frame.envelope().body {
            ArchivedBody::ParamReply(_) => Ok(Answer::Remote(frame)),
            ArchivedBody::Error { message, .. } => {
                Err(StepFail::Retry(format!("{node}: {}", message.as_str())))
            }
            _ => Err(StepFail::Retry(format!("{node}: unexpected reply"))),
        }
    }

    /// Most values one parameter request (or its reply) may carry: a quarter of a frame.
    fn values_per_request(&self) -> usize {
        usize::try_from(self.limits.admission.max_frame_bytes / 16)
            .unwrap_or(usize::MAX)
            .max(1024)
    }

    /// Runs train step `step` of a parameter-server job over the data shards this node serves.
    pub(super) async fn ps_train(
        &self,
        task: &JobTask,
        ds: &DatasetRecord,
        job: Arc<dyn ErasedJob>,
        t: Arc<Task>,
        step: u64,
        assigned: Assigned,
    ) -> JobPartial {
        let Assigned { serving, refused } = assigned;
        match self.ps_train_inner(task, ds, &job, t, step, &serving).await {
            Ok(acc) => {
                let (sum, wide) = sums_to_wire(&acc.sum);
                JobPartial {
                    done: serving,
                    refused,
                    rows: acc.rows,
                    sum,
                    wide,
                    min: acc.min,
                    max: acc.max,
                    error: None,
                    lost: false,
                }
            }
            Err(f) => self.failed(task, f),
        }
    }

    fn failed(&self, task: &JobTask, f: StepFail) -> JobPartial {
        match f {
            StepFail::Retry(why) => {
                warn!(job = %task.job, step = task.step, %why, "parameter step refused; the coordinator retries");
                refuse_all(task, None)
            }
            StepFail::Lost => JobPartial {
                lost: true,
                ..refuse_all(task, None)
            },
            StepFail::Fatal(e) => refuse_all(task, Some(e)),
        }
    }

    async fn ps_train_inner(
        &self,
        task: &JobTask,
        ds: &DatasetRecord,
        job: &Arc<dyn ErasedJob>,
        t: Arc<Task>,
        step: u64,
        serving: &[u32],
    ) -> Result<ExactSum, StepFail> {
        let g = Gen {
            gen: task.gen,
            base: task.base,
        };
        let epochs: BTreeMap<u32, u64> = task.shards.iter().map(|s| (s.shard, s.epoch)).collect();
        let model = Self::model(job)?;
        // This node's own tables must have been here since the generation's base.
        for &s in serving {
            let at = At {
                shard: s,
                epoch: epochs[&s],
                step,
                complete: task.complete,
            };
            self.params.ensure(model, &task.job, g, at).await?;
        }
        // 1. Minibatches.
        let features = ds.feature_count();
        let mut loaded = Vec::new();
        for &shard in serving {
            match self.partition(ds, shard).await {
                Ok(l) => loaded.push((shard, l)),
                Err(LoadError::Retry(e)) => return Err(StepFail::Retry(e.to_string())),
                Err(LoadError::Budget(e)) => return Err(StepFail::Fatal(e)),
            }
        }
        let batches: Vec<Batch> = {
            let runs = loaded.iter().map(|(shard, l)| {
                let (job, t, l, shard) = (job.clone(), t.clone(), l.clone(), *shard);
                self.pool.run(move || -> Result<Batch, JobError> {
                    let model = job
                        .param_model()
                        .ok_or_else(|| JobError::Shape("not a parameter-server job".into()))?;
                    l.with_data(shard, features, |d| model.batch(step, &t, d))
                        .map_err(|e| JobError::Data(e.to_string()))?
                })
            });
            let mut out = Vec::new();
            // At most one task per worker thread in flight (the pool's queue is bounded).
            let runs: Vec<_> = runs.collect();
            let runs = futures::stream::iter(runs).buffered(self.threads);
            for r in runs.collect::<Vec<_>>().await {
                match r {
                    Ok(Ok(b)) => out.push(b),
                    Ok(Err(e)) => return Err(StepFail::Fatal(e.to_string())),
                    Err(e) => return Err(StepFail::Retry(format!("worker: {e}"))),
                }
            }
            out
        };
        // 2. Pull every row once, one request per node (split to fit a frame).
        let keys: Vec<u64> = batches
            .iter()
            .flat_map(|b| b.keys.iter().copied())
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        let map = self.router.map();
        let shards = map.shard_count();
        // Tables are addressed at the generation's epochs: a table that moved since is not
        // this generation's (the coordinator starts a new one when it sees the move).
        let owner = |s: u32| -> Result<(String, u64), StepFail> {
            let epoch = task.epochs.get(s as usize).copied().ok_or_else(|| {
                StepFail::Fatal(format!(
                    "task names {} epochs, no shard {s}",
                    task.epochs.len()
                ))
            })?;
            match map.shards.get(s as usize) {
                Some(a) if a.epoch == epoch => a
                    .owner
                    .as_ref()
                    .map(|o| (o.to_string(), epoch))
                    .ok_or_else(|| StepFail::Retry(format!("shard {s} has no owner"))),
                _ => Err(StepFail::Retry(format!(
                    "shard {s} is no longer at epoch {epoch} of generation {}",
                    task.gen
                ))),
            }
        };
        let mut by_shard: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &k in &keys {
            by_shard.entry(ps::shard_of(k, shards)).or_default().push(k);
        }
        let offsets = ps::offsets(model, &keys);
        let per_request = self.values_per_request();
        let mut pulls: Vec<(String, ParamPull)> = Vec::new();
        {
            let mut by_node: BTreeMap<String, Vec<ParamKeys>> = BTreeMap::new();
            for (s, ks) in by_shard {
                let (node, epoch) = owner(s)?;
                let part = ParamKeys {
                    shard: s,
                    epoch,
                    keys: ks,
                };
                by_node
                    .entry(node)
                    .or_default()
                    .extend(split_keys(model, part, per_request));
            }
            for (node, parts) in by_node {
                for chunk in chunk_parts(parts, per_request, |p| {
                    p.keys.iter().map(|&k| model.width(k)).sum()
                }) {
                    let req = ParamPull {
                        job: task.job.clone(),
                        gen: g.gen,
                        base: g.base,
                        step,
                        complete: task.complete,
                        parts: chunk,
                    };
                    pulls.push((node.clone(), req));
                }
            }
        }
        let mut values = vec![0.0f32; offsets.last().copied().unwrap_or(0)];
        let asked: Vec<Vec<ParamKeys>> = pulls.iter().map(|(_, p)| p.parts.clone()).collect();
        let replies = futures::future::join_all(
            pulls
                .into_iter()
                .map(|(node, p)| async move { self.param_call(job, &node, Call::Pull(p)).await }),
        )
        .await;
        for (parts, reply) in asked.iter().zip(replies) {
            let reply = reply?;
            reply.check()?;
            let got = reply.values();
            let mut at = 0usize;
            for part in parts {
                for &k in &part.keys {
                    let w = model.width(k);
                    let i = keys.binary_search(&k).map_err(|_| {
                        StepFail::Fatal(format!("pulled row {k} was not asked for"))
                    })?;
                    let src = got.get(at..at + w).ok_or_else(|| {
                        StepFail::Retry("a pull reply holds fewer values than asked".into())
                    })?;
                    values[offsets[i]..offsets[i] + w].copy_from_slice(src);
                    at += w;
                }
            }
            if at != got.len() {
                return Err(StepFail::Retry(
                    "a pull reply holds more values than asked".into(),
                ));
            }
        }
        // 3. Gradients on the worker pool, one data shard per task.
        let rows_shared = Arc::new((keys, values));
        let runs = loaded.iter().zip(batches).map(|((shard, l), batch)| {
            let (job, t, l, shard) = (job.clone(), t.clone(), l.clone(), *shard);
            let rows_shared = rows_shared.clone();
            self.pool
                .run(move || -> Result<(Partial, Batch, Vec<f32>), JobError> {
                    let model = job
                        .param_model()
                        .ok_or_else(|| JobError::Shape("not a parameter-server job".into()))?;
                    let rows = Rows::new(model, &rows_shared.0, &rows_shared.1)?;
                    let (p, grads) = l
                        .with_data(shard, features, |d| model.grads(&t, d, &batch, &rows))
                        .map_err(|e| JobError::Data(e.to_string()))??;
                    Ok((p, batch, grads))
                })
        });
        let mut acc = ExactSum::default();
        let mut by_node: BTreeMap<String, Vec<ParamGrads>> = BTreeMap::new();
        let runs: Vec<_> = runs.collect();
        let done: Vec<_> = futures::stream::iter(runs)
            .buffered(self.threads)
            .collect()
            .await;
        for ((shard, _), r) in loaded.iter().zip(done) {
            let (partial, batch, grads) = match r {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => return Err(StepFail::Fatal(e.to_string())),
                Err(e) => return Err(StepFail::Retry(format!("worker: {e}"))),
            };
            acc.add(&partial)
                .map_err(|e| StepFail::Fatal(e.to_string()))?;
            let offs = ps::offsets(model, &batch.keys);
            let mut parts: BTreeMap<u32, ParamGrads> = BTreeMap::new();
            for (i, &k) in batch.keys.iter().enumerate() {
                let s = ps::shard_of(k, shards);
                let part = match parts.entry(s) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => e.insert(ParamGrads {
                        shard: s,
                        epoch: owner(s)?.1,
                        source: *shard,
                        keys: Vec::new(),
                        grads: Vec::new(),
                    }),
                };
                part.keys.push(k);
                part.grads.extend_from_slice(&grads[offs[i]..offs[i + 1]]);
            }
            for (s, part) in parts {
                by_node.entry(owner(s)?.0).or_default().extend(split_grads(
                    model,
                    part,
                    per_request,
                ));
            }
        }
        // 4. Push, one request per node (split to fit a frame).
        let mut pushes = Vec::new();
        for (node, parts) in by_node {
            for chunk in chunk_parts(parts, per_request, |p| p.grads.len()) {
                let req = ParamPush {
                    job: task.job.clone(),
                    gen: g.gen,
                    base: g.base,
                    step,
                    complete: task.complete,
                    parts: chunk,
                };
                pushes.push((node.clone(), req));
            }
        }
        let replies = futures::future::join_all(
            pushes
                .into_iter()
                .map(|(node, p)| async move { self.param_call(job, &node, Call::Push(p)).await }),
        )
        .await;
        for r in replies {
            r?.check()?;
        }
        metrics::counter!(m::JOB_SHARD_TASKS, "result" => "done").increment(serving.len() as u64);
        Ok(acc)
    }

    /// Saves the tables of the shards this node serves as they stand after `step` train steps
    /// (and, at the `last` save, each data shard's export).
    pub(super) async fn ps_save(
        &self,
        task: &JobTask,
        ds: &DatasetRecord,
        job: Arc<dyn ErasedJob>,
        (step, last): (u64, bool),
        assigned: Assigned,
    ) -> JobPartial {
        let Assigned { serving, refused } = assigned;
        if last {
            for &s in &serving {
                if let Err(f) = self.export(ds, &job, &task.job, s).await {
                    return self.failed(task, f);
                }
            }
        }
        let g = Gen {
            gen: task.gen,
            base: task.base,
        };
        let epochs: BTreeMap<u32, u64> = task.shards.iter().map(|s| (s.shard, s.epoch)).collect();
        let saves = serving.iter().map(|&s| {
            let job = job.clone();
            let epoch = epochs[&s];
            async move {
                let model = Self::model(&job)?;
                let at = At {
                    shard: s,
                    epoch,
                    step,
                    complete: task.complete,
                };
                self.params
                    .save(model, &task.job, g, at)
                    .await
                    .map_err(StepFail::from)
            }
        });
        for r in futures::future::join_all(saves).await {
            if let Err(f) = r {
                return self.failed(task, f);
            }
        }
        JobPartial {
            done: serving,
            refused,
            rows: 0,
            sum: Vec::new(),
            wide: Vec::new(),
            min: Vec::new(),
            max: Vec::new(),
            error: None,
            lost: false,
        }
    }
}

impl JobExecutor {
    /// Writes data shard `shard`'s export (create-once; a repeat writes the same bytes).
    async fn export(
        &self,
        ds: &DatasetRecord,
        job: &Arc<dyn ErasedJob>,
        id: &str,
        shard: u32,
    ) -> Result<(), StepFail> {
        let loaded = match self.partition(ds, shard).await {
            Ok(l) => l,
            Err(LoadError::Retry(e)) => return Err(StepFail::Retry(e.to_string())),
            Err(LoadError::Budget(e)) => return Err(StepFail::Fatal(e)),
        };
        let (job2, features) = (job.clone(), ds.feature_count());
        let bytes = self
            .pool
            .run(move || -> Result<Option<Vec<u8>>, JobError> {
                let model = job2
                    .param_model()
                    .ok_or_else(|| JobError::Shape("not a parameter-server job".into()))?;
                loaded
                    .with_data(shard, features, |d| model.shard_export(d))
                    .map_err(|e| JobError::Data(e.to_string()))?
            })
            .await
            .map_err(|e| StepFail::Retry(format!("worker: {e}")))?
            .map_err(|e| StepFail::Fatal(e.to_string()))?;
        let Some(bytes) = bytes else {
            return Ok(());
        };
        match self
            .store
            .put_blob(&ps::export_key(id, shard), bytes::Bytes::from(bytes))
            .await
        {
            Ok(()) | Err(tidepool_runtime::storage::StorageError::Exists(_)) => Ok(()),
            Err(e) => Err(StepFail::Retry(format!("export of shard {shard}: {e}"))),
        }
    }
}

/// Splits `parts` into runs of at most about `limit` values each (parts are split into
/// [`split_keys`] / [`split_grads`] pieces first, so none is much larger).
fn chunk_parts<P>(parts: Vec<P>, limit: usize, values: impl Fn(&P) -> usize) -> Vec<Vec<P>> {
    let mut out: Vec<Vec<P>> = Vec::new();
    let mut used = 0usize;
    for p in parts {
        let v = values(&p);
        if out.is_empty() || used + v > limit {
            out.push(Vec::new());
            used = 0;
        }
        used += v;
        if let Some(last) = out.last_mut() {
            last.push(p);
        }
    }
    out
}

/// `part` as pieces of at most `limit` values (rows are never split).
fn split_keys(model: &dyn ps::RowModel, part: ParamKeys, limit: usize) -> Vec<ParamKeys> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for k in part.keys {
        let w = model.width(k);
        if !cur.is_empty() && used + w > limit {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        used += w;
        cur.push(k);
    }
    out.push(cur);
    out.into_iter()
        .map(|keys| ParamKeys {
            shard: part.shard,
            epoch: part.epoch,
            keys,
        })
        .collect()
}

/// `part` as pieces of at most `limit` values (rows are never split; the owner records each
/// row once per step and source, so the pieces add up to the whole).
fn split_grads(model: &dyn ps::RowModel, part: ParamGrads, limit: usize) -> Vec<ParamGrads> {
    let mut out = Vec::new();
    let mut cur = empty_like(&part);
    let mut at = 0;
    for &k in &part.keys {
        let w = model.width(k);
        if !cur.keys.is_empty() && cur.grads.len() + w > limit {
            out.push(std::mem::replace(&mut cur, empty_like(&part)));
        }
        cur.keys.push(k);
        cur.grads.extend_from_slice(&part.grads[at..at + w]);
        at += w;
    }
    out.push(cur);
    out
}

fn empty_like(p: &ParamGrads) -> ParamGrads {
    ParamGrads {
        shard: p.shard,
        epoch: p.epoch,
        source: p.source,
        keys: Vec::new(),
        grads: Vec::new(),
    }
}

//! The parameter server on a node: the tables of the shards it owns (one [`ParamTable`] per
//! job and shard), answering pulls and pushes from every node's workers, saving tables as
//! create-once blobs and loading them back.
//!
//! # Ownership and recovery
//! A table is served only by its shard's owner at the epoch the request names (the router's
//! check, invariant 1), and only for the job's current *generation*. Rows live in memory; a
//! table is saved (`jobs/{job}/params/{shard}/{step}`, sealed like every blob) when the job's
//! coordinator asks, every `checkpoint_every` train steps and at the end. When a shard's owner
//! changes (kill, drain, join), its rows after the last save are gone with the old owner: the
//! new owner answers [`ParamStatus::Lost`] to any step but the generation's base, and the
//! coordinator rolls the job back to the saved step and starts a new generation, in which every
//! owner loads its tables from that save. Training is deterministic
//! (see [`crate::jobs::ps`]), so the steps run again give the same tables bit for bit.
//!
//! # Budget
//! The tables of a node hold at most half of `jobs.memory_budget_bytes` (the partition cache
//! has the other half); a request that would grow them beyond fails the job with the numbers.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tidepool_runtime::codec::{self, ParamPull, ParamPush, ParamReply, ParamSnapshot, ParamStatus};
use tidepool_runtime::metrics as m;
use tidepool_runtime::storage::{StorageError, Store};
use tracing::{debug, info};

use crate::jobs::ps::{self, ParamModel, ParamTable, TableError};
use crate::router::Router;

/// One shard's table on this node.
#[derive(Debug)]
struct Slot {
    epoch: u64,
    table: ParamTable,
}

type SlotRef = Arc<tokio::sync::Mutex<Option<Slot>>>;

#[derive(Debug, Default)]
struct JobTables {
    gen: u64,
    shards: HashMap<u32, SlotRef>,
}

/// Why a parameter request was not served (the reply's status and text).
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    #[error("shard {shard} is not served here at epoch {epoch}")]
    NotOwner { shard: u32, epoch: u64 },
    #[error("shard {shard}'s rows at step {step} are not here (owner changed since step {base})")]
    Lost { shard: u32, step: u64, base: u64 },
    #[error("generation {got} is older than this node's {have}")]
    StaleGen { got: u64, have: u64 },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(
        "parameter tables on this node would hold {need} bytes, over half of \
         jobs.memory_budget_bytes ({budget} bytes)"
    )]
    Budget { need: u64, budget: u64 },
    #[error("saved table {key}: {reason}")]
    Saved { key: String, reason: String },
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

impl ParamError {
    /// The status a reply carries.
    pub fn status(&self) -> ParamStatus {
        match self {
            ParamError::NotOwner { .. } | ParamError::Storage(_) => ParamStatus::NotOwner,
            ParamError::Lost { .. } => ParamStatus::Lost,
            ParamError::StaleGen { .. } | ParamError::Table(TableError::Stale { .. }) => {
                ParamStatus::Stale
            }
            ParamError::Table(_) | ParamError::Budget { .. } | ParamError::Saved { .. } => {
                ParamStatus::Refused
            }
        }
    }

    /// The reply carrying this error.
    pub fn reply(&self) -> ParamReply {
        ParamReply {
            status: self.status(),
            message: self.to_string(),
            values: Vec::new(),
        }
    }
}

/// This node's parameter tables.
pub struct ParamServer {
    router: Router,
    store: Store,
    budget_bytes: u64,
    jobs: Mutex<HashMap<String, JobTables>>,
}

impl std::fmt::Debug for ParamServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamServer")
            .field("budget_bytes", &self.budget_bytes)
            .finish_non_exhaustive()
    }
}

/// Which table a request is about, and for which train step.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub shard: u32,
    /// The epoch the request names for the shard.
    pub epoch: u64,
    pub step: u64,
    /// Train steps whose pushes were all acknowledged (see `ParamPull::complete`).
    pub complete: u64,
}

/// The generation and base a request names.
#[derive(Debug, Clone, Copy)]
pub struct Gen {
    pub gen: u64,
    pub base: u64,
}

impl ParamServer {
    pub fn new(router: Router, store: Store, memory_budget_bytes: u64) -> Self {
        ParamServer {
            router,
            store,
            budget_bytes: memory_budget_bytes / 2,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    /// The slot of `(job, shard)` in generation `gen` (a newer generation drops the older's).
    fn slot(&self, job: &str, gen: u64, shard: u32) -> Result<SlotRef, ParamError> {
        let mut jobs = self.jobs.lock();
        let tables = jobs.entry(job.to_string()).or_default();
        if gen < tables.gen {
            return Err(ParamError::StaleGen {
                got: gen,
                have: tables.gen,
            });
        }
        if gen > tables.gen {
            if !tables.shards.is_empty() {
                info!(
                    job,
                    gen, "new parameter generation: tables of the old one dropped"
                );
            }
            *tables = JobTables {
                gen,
                shards: HashMap::new(),
            };
        }
        Ok(tables.shards.entry(shard).or_default().clone())
    }

    /// Runs `f` on shard `shard`'s table as it stands for `step` of generation `g`: the table
    /// is loaded from its save at the base if this node has none at `epoch` and `step` is the
    /// base; otherwise its rows are lost.
    async fn with_table<T>(
        &self,
        model: &dyn ParamModel,
        job: &str,
        g: Gen,
        at: At,
        f: impl FnOnce(&mut ParamTable) -> Result<T, TableError>,
    ) -> Result<T, ParamError> {
        let At {
            shard,
            epoch,
            step,
            complete,
        } = at;
        if !self.router.serves_now(shard, epoch) {
            return Err(ParamError::NotOwner { shard, epoch });
        }
        let slot = self.slot(job, g.gen, shard)?;
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(|s| s.epoch != epoch) {
            // Only while nothing of this generation is complete may a table be (re)loaded.
            if complete != g.base {
                *guard = None;
                metrics::counter!(m::PARAM_TABLES_LOST).increment(1);
                return Err(ParamError::Lost {
                    shard,
                    step,
                    base: g.base,
                });
            }
            let table = self.load(model, job, shard, g.base).await?;
            *guard = Some(Slot { epoch, table });
        }
        let Some(slot) = guard.as_mut() else {
            return Err(ParamError::Lost {
                shard,
                step,
                base: g.base,
            });
        };
        let before = slot.table.values_held() as u64 * 4;
        let out = f(&mut slot.table)?;
        let after = slot.table.values_held() as u64 * 4;
        drop(guard);
        if after > before {
            self.check_budget()?;
        }
        Ok(out)
    }

    fn held_bytes(&self) -> u64 {
        let jobs = self.jobs.lock();
        let mut total = 0u64;
        for t in jobs.values() {
            for slot in t.shards.values() {
                if let Ok(g) = slot.try_lock() {
                    total += g.as_ref().map_or(0, |s| s.table.values_held() as u64 * 4);
                }
            }
        }
        total
    }

    fn check_budget(&self) -> Result<(), ParamError> {
        let need = self.held_bytes();
        metrics::gauge!(m::PARAM_TABLE_BYTES).set(need as f64);
        if need > self.budget_bytes {
            return Err(ParamError::Budget {
                need,
                budget: self.budget_bytes * 2,
            });
        }
        Ok(())
    }

    async fn load(
        &self,
        model: &dyn ParamModel,
        job: &str,
        shard: u32,
        step: u64,
    ) -> Result<ParamTable, ParamError> {
        if step == 0 {
            return Ok(ParamTable::new(0));
        }
        let key = ps::table_key(job, shard, step);
        let bytes = self
            .store
            .get_blob(&key)
            .await?
            .ok_or_else(|| ParamError::Saved {
                key: key.clone(),
                reason: "missing".into(),
            })?;
        let saved = |reason: String| ParamError::Saved {
            key: key.clone(),
            reason,
        };
        let snap = codec::decode_param_snapshot(&bytes).map_err(|e| saved(e.to_string()))?;
        if snap.shard != shard || snap.step != step {
            return Err(saved(format!(
                "holds shard {} at step {}",
                snap.shard, snap.step
            )));
        }
        let table = ParamTable::from_rows(model, step, &snap.keys, &snap.values)?;
        debug!(
            job,
            shard,
            step,
            rows = snap.keys.len(),
            "parameter table loaded"
        );
        Ok(table)
    }

    /// Answers a pull: the rows of every part, in order.
    pub async fn pull(&self, model: &dyn ParamModel, req: &ParamPull) -> ParamReply {
        let g = Gen {
            gen: req.gen,
            base: req.base,
        };
        let mut values = Vec::new();
        for part in &req.parts {
            let r = self
                .with_table(
                    model,
                    &req.job,
                    g,
                    at(part.shard, part.epoch, req.step, req.complete),
                    |t| t.pull(model, req.complete, &part.keys, &mut values),
                )
                .await;
            if let Err(e) = r {
                metrics::counter!(m::PARAM_REQUESTS, "kind" => "pull", "status" => status_label(e.status())).increment(1);
                return e.reply();
            }
        }
        metrics::counter!(m::PARAM_REQUESTS, "kind" => "pull", "status" => "ok").increment(1);
        metrics::counter!(m::PARAM_VALUES, "kind" => "pull").increment(values.len() as u64);
        ParamReply {
            status: ParamStatus::Ok,
            message: String::new(),
            values,
        }
    }

    /// Answers a push: records every part (once per step and source).
    pub async fn push(&self, model: &dyn ParamModel, req: &ParamPush) -> ParamReply {
        let g = Gen {
            gen: req.gen,
            base: req.base,
        };
        let mut values = 0u64;
        for part in &req.parts {
            let r = self
                .with_table(
                    model,
                    &req.job,
                    g,
                    at(part.shard, part.epoch, req.step, req.complete),
                    |t| {
                        let when = (req.step, req.complete);
                        t.push(model, when, part.source, &part.keys, &part.grads)
                    },
                )
                .await;
            match r {
                Ok(fresh) => {
                    let repeated = part.keys.len() - fresh;
                    if repeated > 0 {
                        metrics::counter!(m::PARAM_DUPLICATE_PUSHES).increment(repeated as u64);
                    }
                    values += part.grads.len() as u64;
                }
                Err(e) => {
                    metrics::counter!(m::PARAM_REQUESTS, "kind" => "push", "status" => status_label(e.status())).increment(1);
                    return e.reply();
                }
            }
        }
        metrics::counter!(m::PARAM_REQUESTS, "kind" => "push", "status" => "ok").increment(1);
        metrics::counter!(m::PARAM_VALUES, "kind" => "push").increment(values);
        ParamReply {
            status: ParamStatus::Ok,
            message: String::new(),
            values: Vec::new(),
        }
    }

    /// Checks that shard `shard`'s table is here for `step` (loading it at the base).
    pub async fn ensure(
        &self,
        model: &dyn ParamModel,
        job: &str,
        g: Gen,
        at: At,
    ) -> Result<(), ParamError> {
        self.with_table(model, job, g, at, |_| Ok(())).await
    }

    /// Saves shard `shard`'s table as it stands after `step` train steps, then deletes its
    /// saves older than the one before (a rollback goes at most to the newest).
    pub async fn save(
        &self,
        model: &dyn ParamModel,
        job: &str,
        g: Gen,
        at: At,
    ) -> Result<(), ParamError> {
        let At { shard, step, .. } = at;
        let (keys, values) = self
            .with_table(model, job, g, at, |t| t.save(model, step))
            .await?;
        let snap = ParamSnapshot {
            shard,
            step,
            keys,
            values,
        };
        let bytes = codec::encode_param_snapshot(&snap).map_err(|e| ParamError::Saved {
            key: ps::table_key(job, shard, step),
            reason: e.to_string(),
        })?;
        match self
            .store
            .put_blob(&ps::table_key(job, shard, step), Bytes::from(bytes))
            .await
        {
            // Saved before (a task run again): the same rows, deterministically.
            Ok(()) | Err(StorageError::Exists(_)) => {}
            Err(e) => return Err(e.into()),
        }
        metrics::counter!(m::PARAM_TABLES_SAVED).increment(1);
        let saves = self
            .store
            .list_blobs(&ps::shard_tables_prefix(job, shard))
            .await?;
        let keep = ps::table_key(job, shard, step);
        let mut older: Vec<&String> = saves.iter().filter(|k| **k < keep).collect();
        older.sort();
        older.pop();
        for k in older {
            let _ = self.store.delete_blob(k).await;
        }
        Ok(())
    }

    /// Drops the tables of shards this node no longer serves, and of jobs not in `live`.
    pub fn evict(&self, owned: &std::collections::HashSet<u32>, live: &dyn Fn(&str) -> bool) {
        {
            let mut jobs = self.jobs.lock();
            jobs.retain(|job, _| live(job));
            for t in jobs.values_mut() {
                t.shards.retain(|s, _| owned.contains(s));
            }
        }
        metrics::gauge!(m::PARAM_TABLE_BYTES).set(self.held_bytes() as f64);
    }
}

fn at(shard: u32, epoch: u64, step: u64, complete: u64) -> At {
    At {
        shard,
        epoch,
        step,
        complete,
    }
}

fn status_label(s: ParamStatus) -> &'static str {
    match s {
        ParamStatus::Ok => "ok",
        ParamStatus::NotOwner => "not_owner",
        ParamStatus::Lost => "lost",
        ParamStatus::Stale => "stale",
        ParamStatus::Refused => "refused",
    }
}

//! The Raft log, vote and committed/purged markers in a redb database (`{data_dir}/raft.redb`).
//!
//! Two tables: `raft_log` (index -> serde_json of the entry) and `raft_meta` (`vote`,
//! `committed`, `last_purged` -> serde_json). Every write is one redb transaction committed with
//! the default `Durability::Immediate` (fsync before returning), which is what openraft asks of
//! `append_to_log`, `save_vote` and `purge`. Writes run on tokio's blocking pool so an fsync never
//! stalls the reactor; reads are short and run inline.

// openraft's trait methods return `StorageError` by value; these helpers feed them directly.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::LogState;
use openraft::{AnyError, LogId, RaftLogId, StorageError, StorageIOError, Vote};
use redb::{Database, DatabaseError, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::TypeConfig;

type Entry = openraft::Entry<TypeConfig>;
type StorageResult<T> = Result<T, StorageError<u64>>;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// How long [`LogStore::open`] waits for a previous holder of the database (a process still
/// exiting, or this process's own previous incarnation still dropping) to let go of its lock.
const OPEN_WAIT: Duration = Duration::from_secs(10);

/// Builds a storage error of the kind `kind` (e.g. [`StorageIOError::write_logs`]) from anything
/// printable.
fn sto_err(kind: fn(AnyError) -> StorageIOError<u64>, e: impl ToString) -> StorageError<u64> {
    StorageError::IO {
        source: kind(AnyError::error(e)),
    }
}

/// The on-disk Raft log. Cheap to clone (one shared database handle): openraft's replication
/// tasks read through clones while the core appends.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens (creating if needed) the database at `path`, waiting up to 10 s for another holder
    /// to release it.
    pub(crate) fn open(path: &Path) -> Result<Self, String> {
        let started = Instant::now();
        let db = loop {
            match Database::create(path) {
                Ok(db) => break db,
                Err(DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < OPEN_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("opening {}: {e}", path.display())),
            }
        };
        // Create both tables so that readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(LOGS).map_err(|e| e.to_string())?;
        txn.open_table(META).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        Ok(Self { db: Arc::new(db) })
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> StorageResult<Option<T>> {
        let kind = StorageIOError::read;
        let txn = self.db.begin_read().map_err(|e| sto_err(kind, e))?;
        let table = txn.open_table(META).map_err(|e| sto_err(kind, e))?;
        let Some(raw) = table.get(key).map_err(|e| sto_err(kind, e))? else {
            return Ok(None);
        };
        serde_json::from_slice(raw.value())
            .map_err(|e| sto_err(kind, format!("decoding {key}: {e}")))
    }

    pub(crate) fn read_vote(&self) -> StorageResult<Option<Vote<u64>>> {
        self.read_meta(KEY_VOTE)
    }

    pub(crate) fn read_committed(&self) -> StorageResult<Option<LogId<u64>>> {
        self.read_meta::<Option<LogId<u64>>>(KEY_COMMITTED)
            .map(Option::flatten)
    }

    fn last_purged(&self) -> StorageResult<Option<LogId<u64>>> {
        self.read_meta::<Option<LogId<u64>>>(KEY_PURGED)
            .map(Option::flatten)
    }

    pub(crate) async fn save_vote(&self, vote: &Vote<u64>) -> StorageResult<()> {
        self.write_meta(KEY_VOTE, vote, StorageIOError::write_vote)
            .await
    }

    pub(crate) async fn save_committed(&self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        self.write_meta(KEY_COMMITTED, &committed, StorageIOError::write)
            .await
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        kind: fn(AnyError) -> StorageIOError<u64>,
    ) -> StorageResult<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| sto_err(kind, e))?;
        self.write(kind, move |txn| {
            let mut table = txn.open_table(META).map_err(|e| e.to_string())?;
            table
                .insert(key, bytes.as_slice())
                .map_err(|e| e.to_string())?;
            Ok(())
        })
        .await
    }

    /// Runs `f` in one write transaction on the blocking pool and commits it durably.
    async fn write<F>(&self, kind: fn(AnyError) -> StorageIOError<u64>, f: F) -> StorageResult<()>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), String> + Send + 'static,
    {
        let db = self.db.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let txn = db.begin_write().map_err(|e| e.to_string())?;
            f(&txn)?;
            txn.commit().map_err(|e| e.to_string())
        })
        .await;
        match res {
            Ok(r) => r.map_err(|e| sto_err(kind, e)),
            Err(join) => Err(sto_err(kind, format!("storage task failed: {join}"))),
        }
    }

    /// Entries with indexes in `range` (missing ones are skipped, as openraft allows).
    pub(crate) fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> StorageResult<Vec<Entry>> {
        let kind = StorageIOError::read_logs;
        let start = match range.start_bound() {
            Bound::Included(&s) => Bound::Included(s),
            Bound::Excluded(&s) => Bound::Excluded(s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(e),
            Bound::Excluded(&e) => Bound::Excluded(e),
            Bound::Unbounded => Bound::Unbounded,
        };
        if let (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) =
            (start, end)
        {
            if s > e {
                return Ok(Vec::new());
            }
        }
        let txn = self.db.begin_read().map_err(|e| sto_err(kind, e))?;
        let table = txn.open_table(LOGS).map_err(|e| sto_err(kind, e))?;
        let mut out = Vec::new();
        for item in table
            .range::<u64>((start, end))
            .map_err(|e| sto_err(kind, e))?
        {
            let (_, v) = item.map_err(|e| sto_err(kind, e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| sto_err(kind, e))?);
        }
        Ok(out)
    }

    pub(crate) fn log_state(&self) -> StorageResult<LogState<TypeConfig>> {
        let kind = StorageIOError::read_logs;
        let last_purged_log_id = self.last_purged()?;
        let txn = self.db.begin_read().map_err(|e| sto_err(kind, e))?;
        let table = txn.open_table(LOGS).map_err(|e| sto_err(kind, e))?;
        let last = match table.last().map_err(|e| sto_err(kind, e))? {
            Some((_, v)) => {
                let entry: Entry =
                    serde_json::from_slice(v.value()).map_err(|e| sto_err(kind, e))?;
                Some(*entry.get_log_id())
            }
            None => None,
        };
        Ok(LogState {
            last_log_id: last.or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    pub(crate) async fn append(&self, entries: Vec<Entry>) -> StorageResult<()> {
        let kind = StorageIOError::write_logs;
        let mut rows = Vec::with_capacity(entries.len());
        for e in &entries {
            rows.push((
                e.get_log_id().index,
                serde_json::to_vec(e).map_err(|err| sto_err(kind, err))?,
            ));
        }
        self.write(kind, move |txn| {
            let mut table = txn.open_table(LOGS).map_err(|e| e.to_string())?;
            for (index, bytes) in &rows {
                table
                    .insert(*index, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await
    }

    /// Deletes every entry with index >= `index` (conflicting entries on a follower).
    pub(crate) async fn truncate_since(&self, index: u64) -> StorageResult<()> {
        self.write(StorageIOError::write_logs, move |txn| {
            let mut table = txn.open_table(LOGS).map_err(|e| e.to_string())?;
            table
                .retain_in(index.., |_, _| false)
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Records `log_id` as the last purged id and deletes every entry up to it, in one
    /// transaction (so a crash never leaves a hole without the marker that explains it).
    pub(crate) async fn purge_upto(&self, log_id: LogId<u64>) -> StorageResult<()> {
        let kind = StorageIOError::write_logs;
        let marker = serde_json::to_vec(&Some(log_id)).map_err(|e| sto_err(kind, e))?;
        self.write(kind, move |txn| {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            meta.insert(KEY_PURGED, marker.as_slice())
                .map_err(|e| e.to_string())?;
            let mut table = txn.open_table(LOGS).map_err(|e| e.to_string())?;
            table
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(|e| e.to_string())
        })
        .await
    }
}

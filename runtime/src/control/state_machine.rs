//! The applied cluster map and its snapshot file (`{data_dir}/raft-snapshot.json`).
//!
//! The map lives in memory and is persisted only through snapshots: on restart it is reloaded
//! from the snapshot file, and openraft re-applies the committed log entries after it (the log
//! store persists the committed marker). A snapshot file is `{"meta": SnapshotMeta, "map":
//! ClusterMap}`; it is written to a temporary file, fsynced, renamed over the old one, and the
//! directory fsynced, so a crash leaves either the old or the new snapshot, never a torn one.
//! On the wire (`InstallSnapshot` chunks) a snapshot's data is the serde_json of the map alone;
//! the metadata travels beside it.

use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::{
    AnyError, EntryPayload, LogId, RaftLogId, Snapshot, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::types::{apply, ClusterMap, CommandResponse, NodeInfo};
use super::TypeConfig;

type StorageResult<T> = Result<T, StorageError<u64>>;
type Entry = openraft::Entry<TypeConfig>;

/// File name of the snapshot inside the data dir.
pub(crate) const SNAPSHOT_FILE: &str = "raft-snapshot.json";

fn snap_err(
    meta: Option<&SnapshotMeta<u64, NodeInfo>>,
    write: bool,
    e: impl ToString,
) -> StorageError<u64> {
    let sig = meta.map(SnapshotMeta::signature);
    let source = if write {
        StorageIOError::write_snapshot(sig, AnyError::error(e))
    } else {
        StorageIOError::read_snapshot(sig, AnyError::error(e))
    };
    StorageError::IO { source }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFileContents {
    meta: SnapshotMeta<u64, NodeInfo>,
    map: ClusterMap,
}

/// The current snapshot: metadata plus the wire form of its data.
#[derive(Clone)]
struct CurrentSnapshot {
    meta: SnapshotMeta<u64, NodeInfo>,
    data: Vec<u8>,
}

/// The snapshot file and the in-memory copy of the newest snapshot. Shared between the state
/// machine (installs) and snapshot builders (which openraft runs in their own tasks).
#[derive(Clone)]
pub(crate) struct SnapshotStore {
    path: PathBuf,
    current: Arc<Mutex<Option<CurrentSnapshot>>>,
    /// Serializes file writes so the "only if newer" check and the rename are atomic together.
    write_lock: Arc<Mutex<()>>,
}

impl SnapshotStore {
    /// Loads the snapshot file of `dir`, if any. A file that exists but does not parse is an
    /// error: starting from an empty map instead would silently forget the cluster.
    fn load(dir: &Path) -> Result<(Self, Option<SnapshotFileContents>), String> {
        let path = dir.join(SNAPSHOT_FILE);
        let contents = match std::fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice::<SnapshotFileContents>(&bytes)
                    .map_err(|e| format!("{}: corrupt snapshot: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let current = match &contents {
            Some(c) => Some(CurrentSnapshot {
                meta: c.meta.clone(),
                data: serde_json::to_vec(&c.map).map_err(|e| e.to_string())?,
            }),
            None => None,
        };
        let store = Self {
            path,
            current: Arc::new(Mutex::new(current)),
            write_lock: Arc::new(Mutex::new(())),
        };
        Ok((store, contents))
    }

    fn current(&self) -> Option<Snapshot<TypeConfig>> {
        self.current.lock().as_ref().map(|c| Snapshot {
            meta: c.meta.clone(),
            snapshot: Box::new(Cursor::new(c.data.clone())),
        })
    }

    /// Persists a snapshot unless a newer one is already current. Blocking (fsync): runs on
    /// tokio's blocking pool.
    async fn store(
        &self,
        meta: SnapshotMeta<u64, NodeInfo>,
        map: Arc<ClusterMap>,
        data: Vec<u8>,
    ) -> StorageResult<()> {
        let this = self.clone();
        let err_meta = meta.clone();
        let res = tokio::task::spawn_blocking(move || this.store_blocking(meta, &map, data)).await;
        match res {
            Ok(r) => r.map_err(|e| snap_err(Some(&err_meta), true, e)),
            Err(join) => Err(snap_err(
                Some(&err_meta),
                true,
                format!("snapshot task failed: {join}"),
            )),
        }
    }

    fn store_blocking(
        &self,
        meta: SnapshotMeta<u64, NodeInfo>,
        map: &ClusterMap,
        data: Vec<u8>,
    ) -> Result<(), String> {
        let _guard = self.write_lock.lock();
        if let Some(cur) = self.current.lock().as_ref() {
            if cur.meta.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        let file = SnapshotFileContents {
            meta,
            map: map.clone(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| e.to_string())?;
        write_atomically(&self.path, &bytes)
            .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        *self.current.lock() = Some(CurrentSnapshot {
            meta: file.meta,
            data,
        });
        Ok(())
    }
}

/// Write-temp + fsync + rename + fsync(dir).
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Makes the rename itself durable. Directories cannot be opened this way on Windows.
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all()?;
        }
    }
    Ok(())
}

/// The state machine: last applied log id, last membership, and the map.
pub(crate) struct StateMachine {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, NodeInfo>,
    map: Arc<ClusterMap>,
    map_tx: watch::Sender<Arc<ClusterMap>>,
    snapshots: SnapshotStore,
}

impl Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("last_applied", &self.last_applied)
            .field("membership", &self.membership)
            .finish_non_exhaustive()
    }
}

impl StateMachine {
    /// Loads the state machine of `dir` from its snapshot (or empty if there is none).
    pub(crate) fn open(dir: &Path) -> Result<Self, String> {
        let (snapshots, contents) = SnapshotStore::load(dir)?;
        let (last_applied, membership, map) = match contents {
            Some(c) => (c.meta.last_log_id, c.meta.last_membership, c.map),
            None => (None, StoredMembership::default(), ClusterMap::default()),
        };
        let map = Arc::new(ClusterMap {
            applied_index: last_applied.map_or(0, |l| l.index),
            ..map
        });
        let (map_tx, _) = watch::channel(map.clone());
        Ok(Self {
            last_applied,
            membership,
            map,
            map_tx,
            snapshots,
        })
    }

    /// A receiver of the applied map, updated after every applied batch and installed snapshot.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.map_tx.subscribe()
    }

    pub(crate) fn applied_state(&self) -> (Option<LogId<u64>>, StoredMembership<u64, NodeInfo>) {
        (self.last_applied, self.membership.clone())
    }

    pub(crate) fn apply(&mut self, entries: &[Entry]) -> Vec<CommandResponse> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            self.last_applied = Some(*entry.get_log_id());
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::Ok,
                EntryPayload::Normal(cmd) => apply(Arc::make_mut(&mut self.map), cmd),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(*entry.get_log_id()), m.clone());
                    CommandResponse::Ok
                }
            };
            out.push(resp);
        }
        if let Some(last) = entries.last() {
            Arc::make_mut(&mut self.map).applied_index = last.get_log_id().index;
            self.map_tx.send_replace(self.map.clone());
        }
        out
    }

    pub(crate) fn snapshot_builder(&self) -> SnapshotBuilder {
        SnapshotBuilder {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            map: self.map.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    pub(crate) fn current_snapshot(&self) -> Option<Snapshot<TypeConfig>> {
        self.snapshots.current()
    }

    /// Replaces the state with a snapshot received from the leader, persisting it first.
    pub(crate) async fn install(
        &mut self,
        meta: &SnapshotMeta<u64, NodeInfo>,
        data: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = data.into_inner();
        let mut map: ClusterMap = serde_json::from_slice(&data)
            .map_err(|e| snap_err(Some(meta), false, format!("decoding snapshot: {e}")))?;
        map.applied_index = meta.last_log_id.map_or(0, |l| l.index);
        let map = Arc::new(map);
        self.snapshots
            .store(meta.clone(), map.clone(), data)
            .await?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.map = map;
        self.map_tx.send_replace(self.map.clone());
        Ok(())
    }
}

/// A consistent copy of the state machine taken when openraft asks for a builder; building
/// (serializing and writing the file) happens later in openraft's own task.
pub(crate) struct SnapshotBuilder {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, NodeInfo>,
    map: Arc<ClusterMap>,
    snapshots: SnapshotStore,
}

impl Debug for SnapshotBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotBuilder")
            .field("last_applied", &self.last_applied)
            .finish_non_exhaustive()
    }
}

impl SnapshotBuilder {
    pub(crate) async fn build(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id.term, l.index),
            None => format!("none-{nanos}"),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let data = serde_json::to_vec(&*self.map).map_err(|e| snap_err(Some(&meta), false, e))?;
        self.snapshots
            .store(meta.clone(), self.map.clone(), data.clone())
            .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

//! openraft's storage traits over [`LogStore`] (redb) and [`StateMachine`] (map + snapshot file).
//!
//! openraft 0.9 seals the v2 traits (`RaftLogStorage`, `RaftStateMachine`) unless its
//! `storage-v2` feature is on, so this implements the v1 [`RaftStorage`] trait and
//! [`ControlPlane`](super::ControlPlane) splits it with [`openraft::storage::Adaptor`]. The two
//! halves stay separate types underneath, so moving to v2 is a matter of moving methods.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;

use openraft::storage::{LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot};
use openraft::{
    LogId, OptionalSend, RaftStorage, SnapshotMeta, StorageError, StoredMembership, Vote,
};
use tokio::sync::watch;

use super::log_store::LogStore;
use super::state_machine::{SnapshotBuilder, StateMachine};
use super::types::{ClusterMap, CommandResponse, NodeInfo};
use super::TypeConfig;

type StorageResult<T> = Result<T, StorageError<u64>>;
type Entry = openraft::Entry<TypeConfig>;

/// File name of the redb database inside the data dir.
pub(crate) const LOG_FILE: &str = "raft.redb";

/// The control plane's Raft storage, rooted at a data dir.
#[derive(Debug)]
pub(crate) struct RaftStore {
    log: LogStore,
    sm: StateMachine,
}

impl RaftStore {
    /// Opens (creating if needed) `{dir}/raft.redb` and loads `{dir}/raft-snapshot.json`.
    /// Blocking: waits up to 10 s for a previous holder of the database to let go.
    pub(crate) fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let log = LogStore::open(&dir.join(LOG_FILE))?;
        let sm = StateMachine::open(dir)?;
        Ok(Self { log, sm })
    }

    /// The applied map, updated after every applied batch and installed snapshot.
    pub(crate) fn subscribe(&self) -> watch::Receiver<std::sync::Arc<ClusterMap>> {
        self.sm.subscribe()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        self.entries(range)
    }
}

impl RaftLogReader<TypeConfig> for RaftStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry>> {
        self.log.entries(range)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        self.build().await
    }
}

impl RaftStorage<TypeConfig> for RaftStore {
    type LogReader = LogStore;
    type SnapshotBuilder = SnapshotBuilder;

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        self.log.save_vote(vote).await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        self.log.read_vote()
    }

    // Persisted so a restart re-applies committed entries after the snapshot (openraft's
    // `get_initial_state`), instead of waiting for a leader to tell it what is committed.
    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        self.log.save_committed(committed).await
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        self.log.read_committed()
    }

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        self.log.log_state()
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.log.clone()
    }

    async fn append_to_log<I>(&mut self, entries: I) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
    {
        self.log.append(entries.into_iter().collect()).await
    }

    async fn delete_conflict_logs_since(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.log.truncate_since(log_id.index).await
    }

    async fn purge_logs_upto(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.log.purge_upto(log_id).await
    }

    async fn last_applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, NodeInfo>)> {
        Ok(self.sm.applied_state())
    }

    async fn apply_to_state_machine(
        &mut self,
        entries: &[Entry],
    ) -> StorageResult<Vec<CommandResponse>> {
        Ok(self.sm.apply(entries))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.sm.snapshot_builder()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        self.sm.install(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.sm.current_snapshot())
    }
}

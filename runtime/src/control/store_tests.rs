//! Storage tests: openraft's own storage suite, and restart from the data dir.

use std::collections::BTreeSet;

use openraft::storage::{Adaptor, RaftLogStorage, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, LogId, Membership, RaftSnapshotBuilder, RaftStorage,
    StorageError, StorageHelper,
};
use tempfile::TempDir;

use super::state_machine::SNAPSHOT_FILE;
use super::store::RaftStore;
use super::types::{Command, CommandResponse};
use super::TypeConfig;

type Half = Adaptor<TypeConfig, RaftStore>;

struct Builder;

impl StoreBuilder<TypeConfig, Half, Half, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, Half, Half), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RaftStore::open(dir.path()).expect("open store");
        let (log, sm) = Adaptor::new(store);
        Ok((dir, log, sm))
    }
}

/// openraft's storage conformance suite (log, vote, purge, truncate, apply, snapshot transfer).
#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, index),
        payload,
    }
}

fn join(name: &str) -> EntryPayload<TypeConfig> {
    EntryPayload::Normal(Command::Join {
        name: name.into(),
        addr: format!("{name}:1"),
        voter: false,
    })
}

/// The map survives a restart: the snapshot file is reloaded and the committed entries after it
/// are re-applied from the redb log (openraft's `get_initial_state`).
#[tokio::test]
async fn restart_reloads_snapshot_and_replays_committed_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The v1 trait directly: Adaptor's `append` needs a flush callback only openraft can make.
        let mut store = RaftStore::open(dir.path()).unwrap();
        let membership = Membership::new(vec![BTreeSet::from([1u64])], None);
        let entries = vec![
            entry(1, EntryPayload::Membership(membership)),
            entry(2, EntryPayload::Normal(Command::Init { shards: 4 })),
            entry(3, join("a")),
            entry(4, join("b")),
            entry(5, join("c")),
        ];
        store.append_to_log(entries.clone()).await.unwrap();
        let resp = store.apply_to_state_machine(&entries[..3]).await.unwrap();
        assert_eq!(resp, vec![CommandResponse::Ok; 3]);
        let snap = store
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));
        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        assert!(!dir.path().join("raft-snapshot.json.tmp").exists());
        store.apply_to_state_machine(&entries[3..4]).await.unwrap();
        // Entry 5 is in the log but not committed: it must not be re-applied.
        store.save_committed(Some(log_id(1, 4))).await.unwrap();
        store.purge_logs_upto(log_id(1, 2)).await.unwrap();
    }
    let (mut log, mut sm) = Adaptor::new(RaftStore::open(dir.path()).unwrap());
    let state = StorageHelper::new(&mut log, &mut sm)
        .get_initial_state()
        .await
        .unwrap();
    assert_eq!(state.committed, Some(log_id(1, 4)));
    let map = sm.storage().await.subscribe().borrow().clone();
    assert_eq!(map.shards.len(), 4);
    assert_eq!(
        map.members.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let (applied, membership) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 4)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(
        (st.last_purged_log_id, st.last_log_id),
        (Some(log_id(1, 2)), Some(log_id(1, 5)))
    );
    assert!(sm.get_current_snapshot().await.unwrap().is_some());
}

/// A snapshot file that does not parse stops the start instead of silently forgetting the map.
#[test]
fn corrupt_snapshot_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(SNAPSHOT_FILE), b"{not json").unwrap();
    let err = RaftStore::open(dir.path()).unwrap_err();
    assert!(err.contains("corrupt snapshot"), "{err}");
}

//! Storage tests. Each case runs against a `LocalFileSystem` in a temp dir (through
//! `Store::open("file://…")`, fsync included) and against `InMemory`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::PutPayload;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tempfile::TempDir;

use super::*;

const S: u32 = 7;

/// A store under test; keeps its temp dir alive.
struct Backend {
    label: &'static str,
    store: Store,
    _dir: Option<TempDir>,
}

fn local() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &format!("file://{}/store", dir.path().display()),
        test_keys(),
    )
    .unwrap();
    Backend {
        label: "local",
        store,
        _dir: Some(dir),
    }
}

fn backends() -> Vec<Backend> {
    vec![
        local(),
        Backend {
            label: "memory",
            store: Store::in_memory(),
            _dir: None,
        },
    ]
}

fn recs(ids: &[u64]) -> Bytes {
    ids.iter()
        .flat_map(|i| i.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

fn ids(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Damages the object at `path` the way a disk or a careless operator would: written directly
/// (on disk for the local store, bypassing this module).
async fn clobber(store: &Store, path: &Path, bytes: Vec<u8>) {
    match &store.local {
        Some(local) => {
            let file = path
                .parts()
                .fold(local.dir.clone(), |p, part| p.join(part.as_ref()));
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, bytes).unwrap();
        }
        None => {
            store
                .inner
                .put(path, PutPayload::from(bytes))
                .await
                .unwrap();
        }
    }
}

async fn raw(store: &Store, path: &Path) -> Vec<u8> {
    store
        .inner
        .get(path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn append_read_round_trip() {
    for b in backends() {
        let s = &b.store;
        assert_eq!(s.log_end(S).await.unwrap(), 1, "{}", b.label);
        assert!(s.read_log(S, 0).await.unwrap().is_empty());
        s.append(S, 1, 1, 3, recs(&[10, 11, 12])).await.unwrap();
        s.append(S, 1, 4, 2, recs(&[13, 14])).await.unwrap();
        s.append(S, 1, 6, 1, Bytes::new()).await.unwrap(); // empty payloads are opaque too

        let all = s.read_log(S, 0).await.unwrap();
        assert_eq!(all.len(), 3, "{}", b.label);
        assert_eq!(
            (all[0].epoch, all[0].first_seq, all[0].count, all[0].fence),
            (1, 1, 3, false)
        );
        assert_eq!(ids(&all[0].records), [10, 11, 12]);
        assert_eq!(ids(&all[1].records), [13, 14]);
        assert!(all[2].records.is_empty());
        assert_eq!(s.log_end(S).await.unwrap(), 7);

        // After seq 2: the segment holding seq 3 first, with 2 records to skip.
        let tail = s.read_log(S, 2).await.unwrap();
        assert_eq!(
            tail.iter().map(|g| g.first_seq).collect::<Vec<_>>(),
            [1, 4, 6]
        );
        assert_eq!(tail[0].records_to_skip(2), 2);
        assert_eq!(tail[1].records_to_skip(2), 0);
        assert_eq!(s.read_log(S, 3).await.unwrap()[0].first_seq, 4);
        assert!(s.read_log(S, 6).await.unwrap().is_empty());
        assert!(s.read_log(S, 100).await.unwrap().is_empty());
        // Other shards are separate logs.
        assert_eq!(s.log_end(S + 1).await.unwrap(), 1);
    }
}

#[tokio::test]
async fn invalid_appends_are_refused() {
    let s = Store::in_memory();
    for (seq, count) in [(0, 1), (1, 0), (u64::MAX, 1)] {
        let r = s.append(S, 1, seq, count, Bytes::new()).await;
        assert!(
            matches!(r, Err(StorageError::Invalid(_))),
            "{seq} {count}: {r:?}"
        );
    }
}

#[tokio::test]
async fn gaps_overlaps_and_epoch_regressions_are_corrupt() {
    for b in backends() {
        let s = &b.store;
        s.append(S, 1, 1, 2, recs(&[1, 2])).await.unwrap();
        s.append(S, 1, 5, 1, recs(&[5])).await.unwrap();
        let e = s.read_log(S, 0).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("gap")),
            "{e}"
        );

        s.append(S + 1, 1, 1, 3, recs(&[1, 2, 3])).await.unwrap();
        s.append(S + 1, 1, 2, 1, recs(&[9])).await.unwrap(); // a buggy writer, mid-segment
        let e = s.read_log(S + 1, 0).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("overlap")),
            "{e}"
        );

        s.append(S + 2, 2, 1, 1, recs(&[1])).await.unwrap();
        s.append(S + 2, 1, 2, 1, recs(&[2])).await.unwrap(); // an unfenced stale writer
        let e = s.read_log(S + 2, 0).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("epoch")),
            "{e}"
        );
    }
}

#[tokio::test]
async fn fencing_stops_the_old_owner_and_keeps_its_writes() {
    for b in backends() {
        let s = &b.store;
        s.append(S, 1, 1, 2, recs(&[1, 2])).await.unwrap();
        s.append(S, 1, 3, 1, recs(&[3])).await.unwrap();

        let f = s.fence(S, 2).await.unwrap();
        assert_eq!(f, 4, "{}", b.label);
        assert_eq!(
            s.fence(S, 2).await.unwrap(),
            4,
            "fence is idempotent for its epoch"
        );

        // The old owner's next write is at its own next seq: 4, the fence.
        let r = s.append(S, 1, 4, 1, recs(&[4])).await;
        assert!(
            matches!(r, Err(StorageError::Fenced { shard: S, seq: 4 })),
            "{r:?}"
        );

        s.append(S, 2, 5, 1, recs(&[40])).await.unwrap();
        let r = s.append(S, 1, 5, 1, recs(&[4])).await;
        assert!(matches!(r, Err(StorageError::Fenced { .. })), "{r:?}");
        // An older epoch cannot fence over a newer one.
        let r = s.fence(S, 1).await;
        assert!(matches!(r, Err(StorageError::Fenced { .. })), "{r:?}");

        let log = s.read_log(S, 0).await.unwrap();
        let shape: Vec<_> = log
            .iter()
            .map(|g| (g.epoch, g.first_seq, g.fence))
            .collect();
        assert_eq!(
            shape,
            [(1, 1, false), (1, 3, false), (2, 4, true), (2, 5, false)]
        );
        let replayed: Vec<u64> = log.iter().flat_map(|g| ids(&g.records)).collect();
        assert_eq!(replayed, [1, 2, 3, 40]);
        assert!(log[2].records.is_empty() && log[2].count == 1);
    }
}

#[tokio::test]
async fn fencing_an_empty_log_claims_seq_1() {
    for b in backends() {
        assert_eq!(b.store.fence(S, 1).await.unwrap(), 1);
        let r = b.store.append(S, 0, 1, 1, Bytes::new()).await;
        assert!(matches!(r, Err(StorageError::Fenced { .. })), "{r:?}");
        b.store.append(S, 1, 2, 1, recs(&[2])).await.unwrap();
    }
}

#[tokio::test]
async fn fence_retries_when_the_old_owner_slips_a_segment_in() {
    for b in backends() {
        let s = &b.store;
        s.append(S, 1, 1, 1, recs(&[1])).await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let hook = {
            let (s, calls) = (s.clone(), calls.clone());
            move |end: u64| {
                let (s, calls) = (s.clone(), calls.clone());
                async move {
                    // First attempt: the old owner appends at the end the new owner just read.
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        assert_eq!(end, 2);
                        s.append(S, 1, end, 2, recs(&[2, 3])).await.unwrap();
                    }
                }
            }
        };
        let f = s.fence_with(S, 2, hook).await.unwrap();
        assert_eq!((f, calls.load(Ordering::SeqCst)), (4, 2), "{}", b.label);

        // The slipped-in write succeeded before the fence, so the new owner reads it...
        let replayed: Vec<u64> = s
            .read_log(S, 0)
            .await
            .unwrap()
            .iter()
            .flat_map(|g| ids(&g.records))
            .collect();
        assert_eq!(replayed, [1, 2, 3]);
        // ...and the old owner's next one fails.
        let r = s.append(S, 1, 4, 1, recs(&[4])).await;
        assert!(
            matches!(r, Err(StorageError::Fenced { seq: 4, .. })),
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn fence_gives_up_against_an_endless_writer() {
    let s = Store::in_memory();
    let hook = {
        let s = s.clone();
        move |end: u64| {
            let s = s.clone();
            async move { s.append(S, 1, end, 1, Bytes::new()).await.unwrap() }
        }
    };
    let r = s.fence_with(S, 2, hook).await;
    assert!(
        matches!(
            r,
            Err(StorageError::FenceContended {
                attempts: MAX_FENCE_ATTEMPTS,
                ..
            })
        ),
        "{r:?}"
    );
    // And it is safe to call again once the writer stopped.
    assert_eq!(
        s.fence(S, 2).await.unwrap(),
        u64::from(MAX_FENCE_ATTEMPTS) + 1
    );
}

#[tokio::test]
async fn identical_retries_succeed_and_different_bytes_are_fenced() {
    for b in backends() {
        let s = &b.store;
        s.append(S, 1, 1, 1, recs(&[1])).await.unwrap();
        s.append(S, 1, 1, 1, recs(&[1])).await.unwrap();
        assert!(matches!(
            s.append(S, 1, 1, 1, recs(&[2])).await,
            Err(StorageError::Fenced { .. })
        ));
        assert!(matches!(
            s.append(S, 1, 1, 2, recs(&[1])).await,
            Err(StorageError::Fenced { .. })
        ));
        assert!(matches!(
            s.append(S, 2, 1, 1, recs(&[1])).await,
            Err(StorageError::Fenced { .. })
        ));
        assert_eq!(s.read_log(S, 0).await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn checkpoints_are_created_once() {
    for b in backends() {
        let s = &b.store;
        s.put_checkpoint(S, 1, 5, Bytes::from_static(b"A"))
            .await
            .unwrap();
        let r = s.put_checkpoint(S, 1, 5, Bytes::from_static(b"B")).await;
        assert!(
            matches!(r, Err(StorageError::Fenced { shard: S, seq: 5 })),
            "{}: {r:?}",
            b.label
        );
        s.put_checkpoint(S, 1, 5, Bytes::from_static(b"A"))
            .await
            .unwrap(); // a retry
                       // Another epoch may checkpoint the same seq.
        s.put_checkpoint(S, 2, 5, Bytes::from_static(b"B"))
            .await
            .unwrap();
        let c = s.latest_checkpoint(S).await.unwrap().unwrap();
        assert_eq!((c.epoch, c.seq, &c.snapshot[..]), (2, 5, &b"B"[..]));
        assert_eq!(s.latest_checkpoint(S + 1).await.unwrap(), None);
    }
}

#[tokio::test]
async fn latest_checkpoint_prefers_the_highest_epoch_and_skips_corrupt_ones() {
    for b in backends() {
        let s = &b.store;
        s.put_checkpoint(S, 1, 10, Bytes::from_static(b"e1s10"))
            .await
            .unwrap();
        s.put_checkpoint(S, 2, 5, Bytes::from_static(b"e2s5"))
            .await
            .unwrap();
        s.put_checkpoint(S, 2, 7, Bytes::from_static(b"e2s7"))
            .await
            .unwrap();
        s.put_checkpoint(S, 10, 3, Bytes::from_static(b"e10"))
            .await
            .unwrap(); // 10 > 2 numerically
        let c = s.latest_checkpoint(S).await.unwrap().unwrap();
        assert_eq!((c.epoch, c.seq), (10, 3), "{}", b.label);

        // Damage epoch 10's only checkpoint: a flipped payload bit.
        let p10 = s.checkpoint_path(S, 10, 3);
        let mut bytes = raw(s, &p10).await;
        *bytes.last_mut().unwrap() ^= 1;
        clobber(s, &p10, bytes).await;
        let c = s.latest_checkpoint(S).await.unwrap().unwrap();
        assert_eq!(
            (c.epoch, c.seq, &c.snapshot[..]),
            (2, 7, &b"e2s7"[..]),
            "{}",
            b.label
        );

        // Epoch 2's newest: truncated. Then falls back to epoch 2's older one.
        let p7 = s.checkpoint_path(S, 2, 7);
        let bytes = raw(s, &p7).await;
        clobber(s, &p7, bytes[..20].to_vec()).await;
        let c = s.latest_checkpoint(S).await.unwrap().unwrap();
        assert_eq!((c.epoch, c.seq), (2, 5));

        // A valid object under the wrong name (header says (2, 5)) is corrupt too; and so is
        // one with the wrong magic.
        let p5 = s.checkpoint_path(S, 2, 5);
        let good = raw(s, &p5).await;
        clobber(s, &s.checkpoint_path(S, 2, 6), good.clone()).await;
        let mut bad_magic = good;
        bad_magic[0] = b'X';
        clobber(s, &p5, bad_magic).await;
        let r = s.restore(S).await.unwrap_err(); // the log is empty: seq 10 is past its end...
        assert!(matches!(r, StorageError::Corrupt { .. }), "{r}");
        let c = s.latest_checkpoint(S).await.unwrap().unwrap(); // ...but the choice is right
        assert_eq!((c.epoch, c.seq, &c.snapshot[..]), (1, 10, &b"e1s10"[..]));

        // restore reports what it skipped.
        s.append(S, 1, 1, 11, Bytes::new()).await.unwrap();
        let r = s.restore(S).await.unwrap();
        assert_eq!(r.report.skipped_corrupt, 4, "{:?}", r.report);
        assert_eq!(r.checkpoint.map(|c| c.seq), Some(10));
    }
}

#[tokio::test]
async fn corrupt_log_segments_are_errors_not_skips() {
    for b in backends() {
        let s = &b.store;
        s.append(S, 1, 1, 1, recs(&[1])).await.unwrap();
        s.append(S, 1, 2, 1, recs(&[2])).await.unwrap();
        let p = s.segment_path(S, 1);
        let mut bytes = raw(s, &p).await;
        bytes[20] ^= 0x80; // the header's seq field: caught by the tag
        clobber(s, &p, bytes).await;
        let e = s.read_log(S, 0).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("authentication failed")),
            "{e}"
        );
        // Not needed after seq 1, so not read.
        assert_eq!(s.read_log(S, 1).await.unwrap().len(), 1);
        // A foreign object in the log directory is ignored.
        clobber(s, &s.log_prefix(S).child("README"), b"hi".to_vec()).await;
        assert_eq!(s.log_end(S).await.unwrap(), 3);
    }
}

#[tokio::test]
async fn restore_returns_the_checkpoint_and_the_log_after_it() {
    for b in backends() {
        let s = &b.store;
        assert_eq!(
            s.restore(S).await.unwrap(),
            Restore {
                checkpoint: None,
                segments: vec![],
                log_end: 1,
                report: RestoreReport::default()
            }
        );
        s.fence(S, 1).await.unwrap(); // seq 1
        s.append(S, 1, 2, 3, recs(&[2, 3, 4])).await.unwrap();
        s.append(S, 1, 5, 3, recs(&[5, 6, 7])).await.unwrap();
        s.put_checkpoint(S, 1, 5, recs(&[2, 3, 4, 5]))
            .await
            .unwrap();
        assert_eq!(s.fence(S, 2).await.unwrap(), 8);
        s.append(S, 2, 9, 1, recs(&[9])).await.unwrap();

        let r = s.restore(S).await.unwrap();
        let c = r.checkpoint.unwrap();
        assert_eq!((c.epoch, c.seq), (1, 5), "{}", b.label);
        let shape: Vec<_> = r
            .segments
            .iter()
            .map(|g| (g.first_seq, g.records_to_skip(c.seq), g.fence))
            .collect();
        assert_eq!(shape, [(5, 1, false), (8, 0, true), (9, 0, false)]);
        let mut state = ids(&c.snapshot);
        for g in &r.segments {
            state.extend(
                ids(&g.records)
                    .into_iter()
                    .skip(g.records_to_skip(c.seq) as usize),
            );
        }
        assert_eq!(state, [2, 3, 4, 5, 6, 7, 9]);
        assert_eq!(r.log_end, 10);
        assert_eq!(r.report, RestoreReport::default());

        // A checkpoint that claims more than the log holds is refused.
        s.put_checkpoint(S, 3, 10, Bytes::new()).await.unwrap();
        assert!(matches!(
            s.restore(S).await,
            Err(StorageError::Corrupt { .. })
        ));
    }
}

#[tokio::test]
async fn compaction_deletes_covered_segments_but_never_the_newest() {
    for b in backends() {
        let s = &b.store;
        s.append(S, 1, 1, 3, recs(&[1, 2, 3])).await.unwrap();
        s.append(S, 1, 4, 3, recs(&[4, 5, 6])).await.unwrap();
        s.append(S, 1, 7, 1, recs(&[7])).await.unwrap();
        assert_eq!(s.compact_log(S, 2).await.unwrap(), 0, "{}", b.label);
        assert_eq!(s.compact_log(S, 5).await.unwrap(), 1); // seg 4 ends at 6 > 5
        assert_eq!(s.compact_log(S, 5).await.unwrap(), 0);
        assert_eq!(s.compact_log(S, 100).await.unwrap(), 1); // seg 7 is the newest: kept
        assert_eq!(s.log_end(S).await.unwrap(), 8);
        assert_eq!(s.read_log(S, 6).await.unwrap().len(), 1);
        let e = s.read_log(S, 0).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("log starts at")),
            "{e}"
        );
        assert_eq!(s.compact_log(S + 1, 100).await.unwrap(), 0);

        // Fences survive compaction: a stale owner's next write is at its fence's seq.
        assert_eq!(s.fence(S, 2).await.unwrap(), 8);
        s.append(S, 2, 9, 2, recs(&[9, 10])).await.unwrap();
        s.append(S, 2, 11, 1, recs(&[11])).await.unwrap();
        assert_eq!(s.compact_log(S, 10).await.unwrap(), 2, "{}", b.label); // 7 and 9; not fence 8
        let r = s.append(S, 1, 8, 1, recs(&[8])).await;
        assert!(
            matches!(r, Err(StorageError::Fenced { seq: 8, .. })),
            "{r:?}"
        );
        let e = s.read_log(S, 9).await.unwrap_err(); // fence 8, then a gap
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("gap")),
            "{e}"
        );
        assert_eq!(s.read_log(S, 10).await.unwrap().len(), 1);
    }
}

#[test]
fn bad_urls_are_rejected_with_a_reason() {
    let o = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    type Case = (&'static str, Vec<(String, String)>, &'static str);
    let cases: Vec<Case> = vec![
        ("", vec![], "SCHEME://"),
        ("/data/shared", vec![], "SCHEME://"),
        ("ftp://host/x", vec![], "unsupported scheme"),
        ("file://", vec![], "empty path"),
        ("s3://", vec![], "missing bucket"),
        ("s3:///prefix", vec![], "missing bucket"),
        ("s3://bucket/a//b", vec![], "bad prefix"),
        ("s3://bucket/x?region=eu", vec![], "query"),
        (
            "s3://bucket/x",
            o("no_such_option", "1"),
            "unknown s3 option",
        ),
        ("file:///tmp/x", o("aws_region", "eu"), "take no options"),
        ("memory://x", o("aws_region", "eu"), "take no options"),
    ];
    for (url, options, want) in cases {
        match Store::open_with_options(url, &options, test_keys()) {
            Err(StorageError::BadUrl { url: u, reason }) => {
                assert_eq!(u, url);
                assert!(reason.contains(want), "{url:?}: {reason:?} lacks {want:?}");
            }
            other => panic!("{url:?}: expected BadUrl, got {other:?}"),
        }
    }
    // A file path under a regular file cannot be created.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"").unwrap();
    let e = Store::open(
        &format!("file://{}/f/store", dir.path().display()),
        test_keys(),
    )
    .unwrap_err();
    assert!(matches!(e, StorageError::BadUrl { .. }), "{e}");
}

#[test]
fn cloud_urls_open_without_network() {
    let opts = [
        ("aws_region", "us-east-1"),
        ("aws_endpoint", "http://127.0.0.1:1"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let s = Store::open_with_options("s3://bucket/some/prefix/", &opts, test_keys()).unwrap();
    assert_eq!(s.root.as_ref(), "some/prefix");
    assert_eq!(s.shard_prefix(3).as_ref(), "some/prefix/shards/00003");
    assert_eq!(
        Store::open_with_options("s3://bucket", &opts, test_keys())
            .unwrap()
            .root
            .as_ref(),
        ""
    );
}

#[tokio::test]
async fn file_urls_absolute_and_relative_reach_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let abs = dir.path().join("a/b");
    let s1 = Store::open(&format!("file://{}", abs.display()), test_keys()).unwrap();
    assert!(abs.is_dir());
    s1.append(S, 1, 1, 1, recs(&[1])).await.unwrap();
    assert!(abs
        .join("shards/00007/log/00000000000000000001.seg")
        .is_file());

    // The same directory, relative to the cwd.
    let cwd = std::env::current_dir().unwrap();
    let ups = "../".repeat(cwd.components().count() - 1);
    let rel = format!("{ups}{}", abs.display().to_string().trim_start_matches('/'));
    let s2 = Store::open(&format!("file://{rel}"), test_keys()).unwrap();
    assert_eq!(s2.log_end(S).await.unwrap(), 2);
}

#[tokio::test]
async fn memory_urls_are_shared_by_name() {
    let a = Store::open("memory://storage-tests-shared", test_keys()).unwrap();
    let b = Store::open("memory://storage-tests-shared", test_keys()).unwrap();
    let other = Store::open("memory://storage-tests-other", test_keys()).unwrap();
    a.append(S, 1, 1, 1, recs(&[1])).await.unwrap();
    assert_eq!(b.log_end(S).await.unwrap(), 2);
    assert_eq!(other.log_end(S).await.unwrap(), 1);
    assert_eq!(Store::in_memory().log_end(S).await.unwrap(), 1);
}

/// The attack that worked before sealing: edit a job result on the storage, recompute the
/// unkeyed xxh3 checksum of the old format, and `job result` served it. The old check is
/// reimplemented here to show the forgery passes it; the store refuses it now.
#[tokio::test]
async fn a_forged_job_result_with_a_recomputed_checksum_is_refused() {
    use xxhash_rust::xxh3::Xxh3Default;
    /// The version-1 object: 48-byte header, xxh3-64 of header bytes 0..40 and the payload.
    fn v1_object(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"TDPL");
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&[kind, 0]);
        b.extend_from_slice(&[0u8; 24]); // epoch, seq, count
        b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut h = Xxh3Default::new();
        h.update(&b);
        h.update(payload);
        b.extend_from_slice(&h.digest().to_le_bytes());
        b.extend_from_slice(payload);
        b
    }
    /// The version-1 reader: what served the forgery before.
    fn v1_accepts(obj: &[u8]) -> bool {
        let mut h = Xxh3Default::new();
        h.update(&obj[..40]);
        h.update(&obj[48..]);
        obj[40..48] == h.digest().to_le_bytes()
    }
    for b in backends() {
        let s = &b.store;
        let key = "jobs/j-1/result.json";
        s.put_blob(key, Bytes::from_static(br#"{"weights":[0.5,-1.25]}"#))
            .await
            .unwrap();
        let path = s.blob_path(key);
        // Sealed: the plaintext is not on the storage.
        assert!(!raw(s, &path).await.windows(7).any(|w| w == b"weights"));

        let forged = v1_object(3, br#"{"weights":[9.0,9.0]}"#);
        assert!(v1_accepts(&forged), "the old check accepts the forgery");
        clobber(s, &path, forged).await;
        let e = s.get_blob(key).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("unsealed")),
            "{}: {e}",
            b.label
        );

        // Editing the sealed object in place (no checksum left to recompute) is refused too.
        let key2 = "jobs/j-2/result.json";
        s.put_blob(key2, Bytes::from_static(b"{\"weights\":[1.0]}"))
            .await
            .unwrap();
        let path2 = s.blob_path(key2);
        let mut sealed = raw(s, &path2).await;
        sealed[format::HEADER_LEN + 3] ^= 0x01;
        clobber(s, &path2, sealed).await;
        let e = s.get_blob(key2).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("authentication failed")),
            "{}: {e}",
            b.label
        );
    }
}

#[tokio::test]
async fn a_valid_object_moved_to_another_name_or_shard_is_refused() {
    for b in backends() {
        let s = &b.store;
        s.put_blob("jobs/a/result.json", Bytes::from_static(b"a"))
            .await
            .unwrap();
        let good = raw(s, &s.blob_path("jobs/a/result.json")).await;
        clobber(s, &s.blob_path("jobs/b/result.json"), good).await;
        let e = s.get_blob("jobs/b/result.json").await.unwrap_err();
        assert!(matches!(e, StorageError::Corrupt { .. }), "{e}");

        // A segment copied to the same seq of another shard: the header matches the name, the
        // location does not.
        s.append(S, 1, 1, 1, recs(&[1])).await.unwrap();
        let seg = raw(s, &s.segment_path(S, 1)).await;
        clobber(s, &s.segment_path(S + 1, 1), seg).await;
        let e = s.read_log(S + 1, 0).await.unwrap_err();
        assert!(
            matches!(&e, StorageError::Corrupt { reason, .. } if reason.contains("moved")),
            "{e}"
        );
    }
}

#[tokio::test]
async fn objects_of_another_key_are_refused_and_rotation_keeps_old_ones_readable() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}/store", dir.path().display());
    let secret = |fill: u8| format!("{fill:02x}").repeat(32);
    let ring = |current: u32, keys: &[(u32, u8)]| -> Arc<dyn KeyProvider> {
        let mut text = format!("current = {current}\n");
        for (id, fill) in keys {
            text.push_str(&format!(
                "[[keys]]\nid = {id}\nsecret = \"{}\"\n",
                secret(*fill)
            ));
        }
        Arc::new(KeyRing::parse(&text).unwrap())
    };
    let old = Store::open(&url, ring(1, &[(1, 0xa1)])).unwrap();
    old.put_blob("x", Bytes::from_static(b"old")).await.unwrap();

    // Step 1 of a rotation: the new key is known, the old one still current.
    let both = Store::open(&url, ring(1, &[(1, 0xa1), (2, 0xb2)])).unwrap();
    assert_eq!(&both.get_blob("x").await.unwrap().unwrap()[..], b"old");
    // Step 2: new writes use key 2, old objects stay readable.
    let rotated = Store::open(&url, ring(2, &[(1, 0xa1), (2, 0xb2)])).unwrap();
    rotated
        .put_blob("y", Bytes::from_static(b"new"))
        .await
        .unwrap();
    let y = raw(&rotated, &rotated.blob_path("y")).await;
    assert_eq!(&y[40..44], &2u32.to_le_bytes());
    assert_eq!(&rotated.get_blob("x").await.unwrap().unwrap()[..], b"old");
    assert_eq!(&rotated.get_blob("y").await.unwrap().unwrap()[..], b"new");

    // Another cluster's key file (same id, other secret; or other ids): refused, never served.
    let foreign = Store::open(&url, ring(1, &[(1, 0xff)])).unwrap();
    let e = foreign.get_blob("x").await.unwrap_err();
    assert!(e.to_string().contains("authentication failed"), "{e}");
    let e = old.get_blob("y").await.unwrap_err();
    assert!(e.to_string().contains("does not hold"), "{e}");
    // A retry of an identical write is still recognised, although nonces differ.
    rotated
        .put_blob("y", Bytes::from_static(b"new"))
        .await
        .unwrap();
    assert!(matches!(
        rotated.put_blob("y", Bytes::from_static(b"other")).await,
        Err(StorageError::Exists(_))
    ));
}

#[tokio::test]
async fn a_forged_checkpoint_is_skipped_like_a_corrupt_one() {
    for b in backends() {
        let s = &b.store;
        s.append(S, 1, 1, 4, recs(&[1, 2, 3, 4])).await.unwrap();
        s.put_checkpoint(S, 1, 2, recs(&[1, 2])).await.unwrap();
        s.put_checkpoint(S, 1, 4, recs(&[1, 2, 3, 4]))
            .await
            .unwrap();
        // An attacker replaces the newest checkpoint with a copy of the older one, header
        // rewritten to match the name: only the tag can tell.
        let mut forged = raw(s, &s.checkpoint_path(S, 1, 2)).await;
        forged[16..24].copy_from_slice(&4u64.to_le_bytes());
        clobber(s, &s.checkpoint_path(S, 1, 4), forged).await;
        let r = s.restore(S).await.unwrap();
        assert_eq!(r.report.skipped_corrupt, 1, "{}", b.label);
        assert_eq!(r.checkpoint.map(|c| c.seq), Some(2));
        assert_eq!(r.segments.len(), 1);
    }
}

// ---- property test: random owners, fences, checkpoints, compactions --------------------------

#[derive(Clone, Debug)]
enum Op {
    /// `stale` picks an owner back from the current one (0 = current).
    Append {
        stale: usize,
        count: u64,
    },
    /// A new owner takes over; with `slip`, the previous owner appends between the new owner's
    /// read of the log end and its fence put.
    Fence {
        slip: bool,
    },
    Checkpoint {
        stale: usize,
    },
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..3, 1u64..4).prop_map(|(stale, count)| Op::Append { stale: stale.saturating_sub(1), count }),
        2 => any::<bool>().prop_map(|slip| Op::Fence { slip }),
        2 => (0usize..3).prop_map(|stale| Op::Checkpoint { stale: stale.saturating_sub(1) }),
        1 => Just(Op::Compact),
    ]
}

struct Owner {
    epoch: u64,
    next_seq: u64,
    /// Record ids this owner knows are durable, in seq order (its state).
    state: Vec<u64>,
}

/// What `restore` gives back as a state: the snapshot's ids, then the records after it.
fn restored_state(r: &Restore) -> Vec<u64> {
    let after = r.checkpoint.as_ref().map_or(0, |c| c.seq);
    let mut state = r
        .checkpoint
        .as_ref()
        .map_or_else(Vec::new, |c| ids(&c.snapshot));
    for g in &r.segments {
        state.extend(
            ids(&g.records)
                .into_iter()
                .skip(g.records_to_skip(after) as usize),
        );
    }
    state
}

async fn run_model(store: Store, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut next_id = 1u64;
    // Every record any append reported durable, in seq order: the truth restore must match.
    let mut history: Vec<u64> = Vec::new();
    let first = store
        .fence(S, 1)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(first, 1);
    let mut owners = vec![Owner {
        epoch: 1,
        next_seq: 2,
        state: vec![],
    }];
    for op in ops {
        match op {
            Op::Append { stale, count } => {
                let current = owners.len() - 1;
                let i = current.saturating_sub(stale);
                let o = &mut owners[i];
                let new: Vec<u64> = (next_id..next_id + count).collect();
                next_id += count;
                match store
                    .append(S, o.epoch, o.next_seq, count, recs(&new))
                    .await
                {
                    Ok(()) => {
                        prop_assert_eq!(i, current, "a stale owner's append succeeded");
                        o.next_seq += count;
                        o.state.extend(&new);
                        history.extend(&new);
                    }
                    Err(StorageError::Fenced { .. }) => {
                        prop_assert!(i != current, "the owner was fenced")
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Fence { slip } => {
                let epoch = owners.len() as u64 + 1;
                let slipped = Arc::new(parking_lot::Mutex::new(None));
                let old = owners
                    .last()
                    .map(|o| (o.epoch, o.next_seq))
                    .unwrap_or((0, 1));
                let slip_id = next_id;
                next_id += 1;
                let hook = {
                    let (store, slipped) = (store.clone(), slipped.clone());
                    move |_end: u64| {
                        let (store, slipped) = (store.clone(), slipped.clone());
                        async move {
                            if slip && slipped.lock().is_none() {
                                let r = store.append(S, old.0, old.1, 1, recs(&[slip_id])).await;
                                *slipped.lock() = Some(r.is_ok());
                            }
                        }
                    }
                };
                let f = store
                    .fence_with(S, epoch, hook)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if *slipped.lock() == Some(true) {
                    let o = owners.last_mut().unwrap();
                    o.next_seq += 1;
                    o.state.push(slip_id);
                    history.push(slip_id);
                }
                prop_assert_eq!(
                    Some(f),
                    owners.last().map(|o| o.next_seq),
                    "fence lands at the old owner's end"
                );
                // The new owner rebuilds its state from storage.
                let r = store
                    .restore(S)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(r.log_end, f + 1);
                let state = restored_state(&r);
                prop_assert_eq!(&state, &history);
                owners.push(Owner {
                    epoch,
                    next_seq: f + 1,
                    state,
                });
            }
            Op::Checkpoint { stale } => {
                let o = &owners[(owners.len() - 1).saturating_sub(stale)];
                let r = store
                    .put_checkpoint(S, o.epoch, o.next_seq - 1, recs(&o.state))
                    .await;
                prop_assert!(r.is_ok(), "checkpoint: {:?}", r);
            }
            Op::Compact => {
                let r = store
                    .restore(S)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                if let Some(c) = r.checkpoint {
                    store
                        .compact_log(S, c.seq)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
        }
    }
    let r = store
        .restore(S)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(restored_state(&r), history);
    prop_assert_eq!(r.log_end, owners.last().map_or(1, |o| o.next_seq));
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        // Seeds of past failures live next to this file (tests.proptest-regressions).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]
    #[test]
    fn restore_reproduces_every_successful_append_in_memory(ops in proptest::collection::vec(op(), 1..40)) {
        runtime().block_on(run_model(Store::in_memory(), ops))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        // Seeds of past failures live next to this file (tests.proptest-regressions).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]
    #[test]
    fn restore_reproduces_every_successful_append_on_disk(ops in proptest::collection::vec(op(), 1..40)) {
        let b = local();
        runtime().block_on(run_model(b.store.clone(), ops))?;
    }
}

/// The resume check reads only: it accepts the epoch that holds the log end (after its fence or
/// its own appends, without moving the end), refuses once a newer epoch fenced, and distrusts a
/// log that does not end with the epoch at all.
#[tokio::test]
async fn check_fence_reads_the_owner_of_the_log_end() {
    for b in backends() {
        let s = &b.store;
        assert!(
            matches!(s.check_fence(S, 1).await, Err(StorageError::Corrupt { .. })),
            "{}: an empty log holds no fence",
            b.label
        );
        let fence = s.fence(S, 2).await.unwrap();
        assert_eq!(s.check_fence(S, 2).await.unwrap(), fence + 1);
        s.append(S, 2, fence + 1, 2, recs(&[1, 2])).await.unwrap();
        assert_eq!(s.check_fence(S, 2).await.unwrap(), fence + 3, "{}", b.label);
        // Nothing written: the writer's next append still fits.
        s.append(S, 2, fence + 3, 1, recs(&[3])).await.unwrap();
        assert!(
            matches!(s.check_fence(S, 5).await, Err(StorageError::Corrupt { .. })),
            "{}: the log ends with an older epoch than the one asked for",
            b.label
        );
        s.fence(S, 3).await.unwrap();
        assert!(
            matches!(s.check_fence(S, 2).await, Err(StorageError::Fenced { .. })),
            "{}: a newer epoch fenced it",
            b.label
        );
    }
}

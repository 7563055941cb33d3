//! The storage layer against an S3-compatible server: moto (`pip install 'moto[server]'`),
//! started on a free loopback port for this test and killed at the end. Skipped, with a message,
//! when moto is not installed.
//!
//! Checks that `PutMode::Create` (S3 `If-None-Match: *`) conflicts are detected, which is what
//! fencing rests on, and the append / fence / checkpoint / restore / compaction paths end to end.

#[path = "../../tests/support/moto.rs"]
mod moto;

use bytes::Bytes;
use moto::{http, start_moto, Moto};
use std::sync::{Arc, OnceLock};
use tidepool_runtime::storage::{KeyProvider, KeyRing, StorageError, Store};

const BUCKET: &str = "tidepool-test";

fn open(moto: &Moto, prefix: &str) -> Store {
    let options: Vec<(String, String)> = [
        ("aws_endpoint", format!("http://127.0.0.1:{}", moto.port)),
        ("aws_allow_http", "true".to_string()),
        ("aws_access_key_id", "test".to_string()),
        ("aws_secret_access_key", "test".to_string()),
        ("aws_region", "us-east-1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Store::open_with_options(&format!("s3://{BUCKET}/{prefix}"), &options, keys())
        .expect("open s3 store")
}

/// One data key ring for every store of this test, so that all of them read each other.
fn keys() -> Arc<dyn KeyProvider> {
    static KEYS: OnceLock<Arc<KeyRing>> = OnceLock::new();
    KEYS.get_or_init(|| Arc::new(KeyRing::ephemeral().expect("a random data key")))
        .clone()
}

fn fenced<T: std::fmt::Debug>(r: Result<T, StorageError>) -> bool {
    matches!(r, Err(StorageError::Fenced { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_on_s3_compatible_server() {
    let Some(moto) = start_moto(BUCKET) else {
        return;
    };
    let s = open(&moto, "tidepool");
    let shard = 3;

    // Objects land under the prefix, with the documented names and header.
    s.append(shard, 1, 1, 2, Bytes::from_static(b"r1r2"))
        .await
        .unwrap();
    let (status, body) = http(
        moto.port,
        "GET",
        &format!("/{BUCKET}/tidepool/shards/00003/log/00000000000000000001.seg"),
        b"",
    )
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body.get(..4), Some(&b"TDPL"[..]));

    // Create-once: a second, different put at a taken seq is a conflict; an identical one (a
    // retry) is not.
    assert!(fenced(
        s.append(shard, 1, 1, 1, Bytes::from_static(b"other")).await
    ));
    s.append(shard, 1, 1, 2, Bytes::from_static(b"r1r2"))
        .await
        .unwrap();
    s.append(shard, 1, 3, 1, Bytes::from_static(b"r3"))
        .await
        .unwrap();

    // Fencing.
    assert_eq!(s.fence(shard, 2).await.unwrap(), 4);
    assert!(fenced(
        s.append(shard, 1, 4, 1, Bytes::from_static(b"late")).await
    ));
    s.append(shard, 2, 5, 1, Bytes::from_static(b"r5"))
        .await
        .unwrap();

    // Checkpoints: create-once, highest epoch, corrupt ones skipped.
    s.put_checkpoint(shard, 2, 4, Bytes::from_static(b"snap@4"))
        .await
        .unwrap();
    assert!(fenced(
        s.put_checkpoint(shard, 2, 4, Bytes::from_static(b"other"))
            .await
    ));
    s.put_checkpoint(shard, 2, 5, Bytes::from_static(b"snap@5"))
        .await
        .unwrap();
    s.put_checkpoint(shard, 1, 3, Bytes::from_static(b"old epoch"))
        .await
        .unwrap();
    let garbage = http(
        moto.port,
        "PUT",
        &format!("/{BUCKET}/tidepool/shards/00003/epoch-00000000000000000002/checkpoint-00000000000000000005.ckpt"),
        b"not a checkpoint",
    )
    .unwrap();
    assert_eq!(garbage.0, 200);
    let r = s.restore(shard).await.unwrap();
    let c = r.checkpoint.clone().unwrap();
    assert_eq!((c.epoch, c.seq, &c.snapshot[..]), (2, 4, &b"snap@4"[..]));
    assert_eq!(r.report.skipped_corrupt, 1);
    let shape: Vec<_> = r
        .segments
        .iter()
        .map(|g| (g.epoch, g.first_seq, g.fence))
        .collect();
    assert_eq!(shape, [(2, 5, false)]); // the checkpoint covers the fence at 4
    assert_eq!(r.log_end, 6);

    // Compaction keeps the fence and the newest segment.
    assert_eq!(s.compact_log(shard, 4).await.unwrap(), 2);
    assert!(fenced(
        s.append(shard, 1, 4, 1, Bytes::from_static(b"late")).await
    ));
    assert_eq!(s.read_log(shard, 4).await.unwrap().len(), 1);

    // Racing creators of one seq: exactly one wins, every time.
    let mut handles = Vec::new();
    for round in 0..20u64 {
        for writer in 0..2u8 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                (
                    round,
                    s.append(7, 1, round + 1, 1, Bytes::from(vec![writer; 8]))
                        .await,
                )
            }));
        }
    }
    let mut wins = [0u32; 20];
    for h in handles {
        let (round, r) = h.await.unwrap();
        match r {
            Ok(()) => wins[round as usize] += 1,
            Err(StorageError::Fenced { .. }) => {}
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    assert_eq!(
        wins, [1; 20],
        "each racing pair must have exactly one winner"
    );
    assert_eq!(s.read_log(7, 0).await.unwrap().len(), 20);

    // A prefix-less store on the same bucket does not see the prefixed objects.
    assert_eq!(open(&moto, "").log_end(shard).await.unwrap(), 1);
}

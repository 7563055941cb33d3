//! What sealing storage objects at rest costs: the storage layer writing op-log segments and
//! job checkpoints through a real `file://` store (fsync included), sealed (AES-256-GCM, what a
//! node does) against the unsealed baseline in the same run.
//!
//! - `sealed_*`: `Store::open(url, keys)` with a fresh data key: the production path.
//! - `unsealed_*`: the same store with `Store::unsealed_baseline()` (feature `bench-baseline` of
//!   tidepool-runtime, never used by a node): the same header and framing, checked by an
//!   unkeyed xxh3 as before sealing. The difference is the seal/open step: AES-GCM over the
//!   payload, a random nonce, and one payload copy into the sealing buffer.
//!
//! Rows:
//! - `append_4KiB/*`: `Store::append` of one 4 KiB segment (a group commit of a few dozen ops)
//!   at the next seq: what one durable acknowledgement costs; 1/time is durable op-log appends
//!   per second for one writer.
//! - `RESULT storage append_4KiB_interleaved.*`: the same appends, sealed and unsealed
//!   alternating one by one (400 each), medians and p99 of each and the ratio of the medians.
//!   The criterion rows above measure the variants seconds apart, and on a shared disk the fsync
//!   time drifts more than sealing costs; alternating exposes both to the same drift.
//! - `put_4KiB_memory/*`: `Store::put_blob` of 4 KiB to `memory://` (deleted again untimed):
//!   no fsync, so the CPU cost of sealing is not hidden behind the disk.
//! - `checkpoint_put_4MiB/*`: `Store::put_blob` of a 4 MiB job checkpoint (what a training job's
//!   coordinator writes), deleted again outside the timed region.
//! - `checkpoint_get_4MiB/*`: `Store::get_blob` of it (what a resuming coordinator reads), from the
//!   page cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use tidepool_runtime::storage::{KeyRing, Store};

const SEGMENT: usize = 4 * 1024;
const CHECKPOINT: usize = 4 * 1024 * 1024;

/// Incompressible-looking bytes (sealing does not care, but a store might).
fn payload(len: usize) -> Bytes {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn stores(url: &str) -> [(&'static str, Store); 2] {
    let keys = Arc::new(KeyRing::ephemeral().expect("data key"));
    let sealed = Store::open(url, keys.clone()).expect("open store");
    let unsealed = Store::open(url, keys)
        .expect("open store")
        .unsealed_baseline();
    [("sealed", sealed), ("unsealed", unsealed)]
}

fn storage(c: &mut Criterion) {
    let rt = tidepool_benches::runtime();
    let dir = tempfile::tempdir().expect("temp dir");

    let mut g = c.benchmark_group("storage/append_4KiB");
    let records = payload(SEGMENT);
    let log_url = format!("file://{}/log", dir.path().display());
    // Each variant appends to a shard of its own, so both logs grow alike.
    for (shard, (label, store)) in stores(&log_url).into_iter().enumerate() {
        let seq = AtomicU64::new(1);
        g.bench_function(label, |b| {
            b.iter(|| {
                let s = seq.fetch_add(1, Ordering::Relaxed);
                rt.block_on(store.append(shard as u32, 1, s, 32, records.clone()))
                    .expect("append");
            })
        });
    }
    g.finish();
    interleaved_appends(
        &rt,
        &format!("file://{}/log2", dir.path().display()),
        &records,
    );

    puts(
        c,
        &rt,
        "storage/put_4KiB_memory",
        "memory://bench",
        &records,
    );
    let ckpt = payload(CHECKPOINT);
    let ckpt_url = format!("file://{}/ckpt", dir.path().display());
    puts(c, &rt, "storage/checkpoint_put_4MiB", &ckpt_url, &ckpt);

    let mut g = c.benchmark_group("storage/checkpoint_get_4MiB");
    for (label, store) in stores(&ckpt_url) {
        let key = format!("jobs/{label}/latest.json");
        rt.block_on(store.put_blob(&key, ckpt.clone()))
            .expect("put");
        g.bench_function(label, |b| {
            b.iter(|| {
                let got = rt.block_on(store.get_blob(&key)).expect("get");
                assert_eq!(got.map(|b| b.len()), Some(CHECKPOINT));
            })
        });
    }
    g.finish();
}

/// Sealed and unsealed appends alternating, each timed; reports medians, p99s and the ratio.
fn interleaved_appends(rt: &tokio::runtime::Runtime, url: &str, records: &Bytes) {
    const N: usize = 400;
    let [sealed, unsealed] = stores(url);
    let mut times = [Vec::with_capacity(N), Vec::with_capacity(N)];
    for i in 0..N {
        for (shard, (_, store)) in [&sealed, &unsealed].into_iter().enumerate() {
            let t = Instant::now();
            rt.block_on(store.append(shard as u32, 1, i as u64 + 1, 32, records.clone()))
                .expect("append");
            times[shard].push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let mut medians = [0.0; 2];
    for (k, (label, _)) in [&sealed, &unsealed].into_iter().enumerate() {
        let ts = &mut times[k];
        ts.sort_by(f64::total_cmp);
        medians[k] = ts[N / 2];
        let key = format!("append_4KiB_interleaved.{label}");
        tidepool_benches::report("storage", &format!("{key}.p50_us"), ts[N / 2], "us");
        tidepool_benches::report("storage", &format!("{key}.p99_us"), ts[N * 99 / 100], "us");
    }
    tidepool_benches::report(
        "storage",
        "append_4KiB_interleaved.sealed_over_unsealed_p50",
        medians[0] / medians[1],
        "ratio",
    );
}

/// `put_blob` of `body`, timed; each blob is deleted again outside the timed region so that
/// the store does not grow with the iteration count.
fn puts(c: &mut Criterion, rt: &tokio::runtime::Runtime, group: &str, url: &str, body: &Bytes) {
    let mut g = c.benchmark_group(group);
    for (label, store) in stores(url) {
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for i in 0..iters {
                    let key = format!("jobs/{label}/ckpt/{i:020}.json");
                    let t = Instant::now();
                    rt.block_on(store.put_blob(&key, body.clone()))
                        .expect("put");
                    timed += t.elapsed();
                    rt.block_on(store.delete_blobs(&key)).expect("delete");
                }
                timed
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = tidepool_benches::criterion();
    targets = storage
}
criterion_main!(benches);

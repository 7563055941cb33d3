//! From received bytes to a usable 1M-f32 (4 MiB) payload: Tidepool's validated in-place access
//! against deserializing the same f32s with postcard and bincode 2.
//!
//! - `tidepool_decode_access`: what the receive path does once `read_frame` has the archive in
//!   its aligned buffer: `Frame::decode` (bytecheck validation, version check) + `as_f32s()` +
//!   reading the first and last element. The buffer is copied outside the timed region
//!   (`Frame::decode` takes ownership), as the network read would have filled it.
//! - `tidepool_validate_only`: `Frame::decode` alone.
//! - `tidepool_from_wire_access`: `Frame::from_wire(&wire, max)` + the same reads. `from_wire`
//!   (the test/fuzz entry point) copies the bytes into a fresh aligned buffer first, so this one
//!   includes a 4 MiB copy that the network path does not make.
//! - `postcard` / `bincode2`: `from_bytes::<Vec<f32>>` / `decode_from_slice` (standard config)
//!   + the same reads. Both build an owned `Vec<f32>` (every element decoded and copied).
//!
//! - `log_segment/1M_f32/in_place`: the shard log writer's step for that write: the log segment
//!   encoded straight from the validated frame (`encode_log_refs`); `decode_then_encode`: the
//!   step as it was, the envelope deserialized into owned types, then encoded (`encode_log`).
//!   Both produce the same bytes (asserted).
//!
//! `from_wire` and the peers free their 4 MiB inside the timed loop, so the allocator hands the
//! same memory back each time (as in a long-running receiver; fresh pages would add page faults
//! to every row). The `decode` rows get their buffer from an untimed setup and free it untimed.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rkyv::util::AlignedVec;
use std::hint::black_box;
use tidepool_benches::report;
use tidepool_runtime::codec::{
    encode, encode_log, encode_log_refs, ArchivedBody, ArchivedOp, Body, Dest, Envelope, Frame,
    IdemKey, LogRecord, LogRecordRef, Op, ShardRequest, ShardRequestRef, TensorView,
    DEFAULT_MAX_FRAME_BYTES, FRAME_HEADER_LEN,
};

const LEN: usize = 1 << 20;

fn values() -> Vec<f32> {
    (0..LEN).map(|i| i as f32 * 0.25 - 3.0).collect()
}

/// First + last element, read the way a consumer of the tensor would.
fn ends(xs: &[f32]) -> f32 {
    xs[0] + xs[xs.len() - 1]
}

fn tensor_of(frame: &Frame) -> &[f32] {
    match &frame.envelope().body {
        ArchivedBody::ShardRequest(req) => match &req.op {
            ArchivedOp::AddTensor { values, .. } => values.as_f32s(),
            _ => panic!("not a tensor"),
        },
        _ => panic!("not a shard request"),
    }
}

fn decode(c: &mut Criterion) {
    let values = values();
    let env = Envelope::new(
        "a",
        Dest::Shard { shard: 0, epoch: 1 },
        0,
        Body::ShardRequest(ShardRequest {
            idem: IdemKey { sender: 1, seq: 1 },
            op: Op::AddTensor {
                key: "w".into(),
                values: values.clone(),
            },
        }),
    );
    let wire = encode(&env).expect("encode").to_vec();
    let mut archive = AlignedVec::<16>::with_capacity(wire.len() - FRAME_HEADER_LEN);
    archive.extend_from_slice(&wire[FRAME_HEADER_LEN..]);
    let postcard_bytes = postcard::to_allocvec(&values).expect("postcard encode");
    let bincode_bytes =
        bincode::encode_to_vec(&values, bincode::config::standard()).expect("bincode encode");
    let expect = ends(&values);

    // Sanity: every path sees the same numbers.
    assert_eq!(
        ends(tensor_of(
            &Frame::from_wire(&wire, DEFAULT_MAX_FRAME_BYTES).expect("valid frame")
        )),
        expect
    );
    assert_eq!(
        ends(&postcard::from_bytes::<Vec<f32>>(&postcard_bytes).expect("postcard")),
        expect
    );
    let (v, _): (Vec<f32>, usize) =
        bincode::decode_from_slice(&bincode_bytes, bincode::config::standard()).expect("bincode");
    assert_eq!(ends(&v), expect);

    let mut g = c.benchmark_group("decode/1M_f32");
    g.bench_function("tidepool_decode_access", |b| {
        b.iter_batched(
            || archive.clone(),
            |buf| {
                let frame = Frame::decode(buf).expect("valid");
                black_box(ends(tensor_of(&frame)));
                frame
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("tidepool_validate_only", |b| {
        b.iter_batched(
            || archive.clone(),
            |buf| Frame::decode(buf).expect("valid"),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("tidepool_from_wire_access", |b| {
        b.iter(|| {
            let frame = Frame::from_wire(black_box(&wire), DEFAULT_MAX_FRAME_BYTES).expect("valid");
            black_box(ends(tensor_of(&frame)));
            frame
        })
    });
    g.bench_function("postcard", |b| {
        b.iter(|| {
            let v: Vec<f32> = postcard::from_bytes(black_box(&postcard_bytes)).expect("postcard");
            black_box(ends(&v));
            v
        })
    });
    g.bench_function("bincode2", |b| {
        b.iter(|| {
            let (v, _): (Vec<f32>, usize) =
                bincode::decode_from_slice(black_box(&bincode_bytes), bincode::config::standard())
                    .expect("bincode");
            black_box(ends(&v));
            v
        })
    });
    g.finish();

    // The shard log writer's step for a received 4 MiB tensor write: one log segment holding
    // it. In place (what the writer does): the segment is encoded straight from the frame.
    // Owned (what it did before): the envelope deserialized into owned types, then encoded.
    let frame = Frame::from_wire(&wire, DEFAULT_MAX_FRAME_BYTES).expect("valid frame");
    let req = match &frame.envelope().body {
        ArchivedBody::ShardRequest(r) => r,
        _ => panic!("not a shard request"),
    };
    let in_place = || {
        let recs = vec![LogRecordRef {
            seq: 1,
            epoch: 1,
            req: Some(ShardRequestRef::from_archived(req)),
        }];
        encode_log_refs(&recs).expect("encode")
    };
    let owned = || {
        let Body::ShardRequest(r) = frame.to_owned_envelope().expect("owned").body else {
            panic!("not a shard request");
        };
        let recs = vec![LogRecord {
            seq: 1,
            epoch: 1,
            req: Some(r),
        }];
        encode_log(&recs).expect("encode")
    };
    assert_eq!(in_place(), owned(), "the same segment either way");
    let mut g = c.benchmark_group("log_segment/1M_f32");
    g.bench_function("in_place", |b| b.iter(|| black_box(in_place())));
    g.bench_function("decode_then_encode", |b| b.iter(|| black_box(owned())));
    g.finish();

    report("decode", "wire_bytes", wire.len() as f64, "B");
    report("decode", "postcard_bytes", postcard_bytes.len() as f64, "B");
    report("decode", "bincode_bytes", bincode_bytes.len() as f64, "B");
}

criterion_group! {
    name = benches;
    config = tidepool_benches::criterion();
    targets = decode
}
criterion_main!(benches);

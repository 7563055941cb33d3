#![allow(clippy::unwrap_used)]
use super::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (".{0,16}", proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(key, value)| Op::Put { key, value }),
        ".{0,16}".prop_map(|key| Op::Get { key }),
        (".{0,16}", any::<i64>()).prop_map(|(key, delta)| Op::Incr { key, delta }),
        (
            ".{0,16}",
            proptest::collection::vec(any::<f32>().prop_filter("nan", |f| !f.is_nan()), 0..64)
        )
            .prop_map(|(key, values)| Op::AddTensor { key, values }),
        ".{0,16}".prop_map(|key| Op::GetTensor { key }),
    ]
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::NotOwner),
        Just(ErrorCode::Overloaded),
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Forbidden),
        Just(ErrorCode::ShuttingDown),
        Just(ErrorCode::Internal),
        Just(ErrorCode::NotLeader),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Conflict),
    ]
}

fn arb_result() -> impl Strategy<Value = OpResult> {
    prop_oneof![
        Just(OpResult::Done),
        Just(OpResult::Duplicate),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32))
            .prop_map(OpResult::Value),
        any::<i64>().prop_map(OpResult::Counter),
        proptest::collection::vec(-1e6f32..1e6, 0..32).prop_map(OpResult::Tensor),
    ]
}

fn arb_member() -> impl Strategy<Value = MemberInfo> {
    (
        "[a-z]{1,8}",
        "[0-9.:]{1,21}",
        prop_oneof![
            Just(WireMemberState::Up),
            Just(WireMemberState::Down),
            Just(WireMemberState::Joining),
            Just(WireMemberState::Draining),
        ],
        any::<bool>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(name, addr, state, reachable, shards, voter)| MemberInfo {
            name,
            addr,
            state,
            reachable,
            shards,
            voter,
        })
}

fn arb_body() -> impl Strategy<Value = Body> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), arb_op()).prop_map(|(sender, seq, op)| Body::ShardRequest(
            ShardRequest {
                idem: IdemKey { sender, seq },
                op
            }
        )),
        arb_result().prop_map(Body::ShardReply),
        Just(Body::StatusRequest),
        (
            "[a-z0-9]{0,8}",
            any::<u64>(),
            proptest::collection::vec(arb_member(), 0..5),
            proptest::option::of((0u32..100, 0u32..100, "[ -~]{0,40}")),
        )
            .prop_map(
                |(leader, term, members, auto)| Body::StatusReply(StatusInfo {
                    leader,
                    term,
                    members,
                    autoscale: auto.map(|(desired, current, reason)| AutoscaleInfo {
                        desired,
                        current,
                        utilization: 0.5,
                        backlog: 3.0,
                        reason,
                    }),
                    waiting_for: vec!["n2".into()],
                })
            ),
        Just(Body::ShardsRequest),
        proptest::collection::vec(
            (
                any::<u32>(),
                proptest::option::of("[a-z0-9]{1,8}"),
                any::<u64>(),
                prop_oneof![
                    Just(WireShardState::Serving),
                    Just(WireShardState::Handoff),
                    Just(WireShardState::Unassigned),
                ]
            )
                .prop_map(|(id, owner, epoch, state)| ShardInfo {
                    id,
                    owner,
                    epoch,
                    state
                }),
            0..8
        )
        .prop_map(Body::ShardsReply),
        any::<u64>().prop_map(Body::Ping),
        any::<u64>().prop_map(Body::Pong),
        (arb_code(), ".{0,32}").prop_map(|(code, message)| Body::Error { code, message }),
        (
            prop_oneof![
                Just(ControlKind::RaftAppend),
                Just(ControlKind::RaftVote),
                Just(ControlKind::RaftSnapshot),
                Just(ControlKind::Propose),
                Just(ControlKind::Join)
            ],
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(kind, payload)| Body::Control { kind, payload }),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Body::ControlReply),
        (any::<u64>(), 0u32..=1000, any::<u64>()).prop_map(
            |(sent_at, utilization_milli, backlog)| {
                Body::LeaseRenew {
                    sent_at,
                    utilization_milli,
                    backlog,
                }
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(sent_at, ttl_ms, term, map_index)| Body::LeaseGrant {
                sent_at,
                ttl_ms,
                term,
                map_index,
            }
        ),
        "[a-z0-9]{1,8}".prop_map(|node| Body::Drain { node }),
        ("[a-z0-9]{1,8}", "[0-9a-f]{0,40}").prop_map(|(node, serial)| Body::Membership {
            op: MembershipOp::VoterAdd,
            node,
            serial
        }),
    ]
}

fn arb_dest() -> impl Strategy<Value = Dest> {
    prop_oneof![
        "[a-z0-9-]{1,12}".prop_map(Dest::Node),
        (any::<u32>(), any::<u64>()).prop_map(|(shard, epoch)| Dest::Shard { shard, epoch }),
        Just(Dest::Peer),
    ]
}

fn arb_envelope() -> impl Strategy<Value = Envelope> {
    ("[a-z0-9-]{0,12}", arb_dest(), any::<u64>(), arb_body()).prop_map(
        |(source, dest, correlation, body)| Envelope::new(source, dest, correlation, body),
    )
}

fn sample() -> Envelope {
    Envelope::new(
        "n1",
        Dest::Shard { shard: 3, epoch: 1 },
        42,
        Body::ShardRequest(ShardRequest {
            idem: IdemKey { sender: 7, seq: 9 },
            op: Op::Incr {
                key: "k".into(),
                delta: 1,
            },
        }),
    )
}

proptest! {
    #[test]
    fn every_message_round_trips(env in arb_envelope()) {
        let wire = encode(&env).unwrap().to_vec();
        let frame = Frame::from_wire(&wire, DEFAULT_MAX_FRAME_BYTES).unwrap();
        prop_assert_eq!(frame.to_owned_envelope().unwrap(), env);
    }

    #[test]
    fn async_reader_agrees_with_slice_decoder(envs in proptest::collection::vec(arb_envelope(), 1..6)) {
        let mut wire = Vec::new();
        for e in &envs { wire.extend(encode(e).unwrap().to_vec()); }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let got = rt.block_on(async {
            let mut r = &wire[..];
            let mut out = Vec::new();
            while let Some(f) = read_frame(&mut r, DEFAULT_MAX_FRAME_BYTES).await.unwrap() {
                out.push(f.to_owned_envelope().unwrap());
            }
            out
        });
        prop_assert_eq!(got, envs);
    }
}

fn read_all(wire: &[u8], max: usize) -> Result<Option<Frame>, CodecError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut r = wire;
        read_frame(&mut r, max).await
    })
}

#[test]
fn oversized_frame_is_rejected_before_allocation() {
    let mut wire = encode(&sample()).unwrap().to_vec();
    wire[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    // Only the header is present: the reader must fail on the length alone, not try to read 4 GiB.
    let err = read_all(&wire[..FRAME_HEADER_LEN], 1024).unwrap_err();
    assert!(
        matches!(err, CodecError::Oversized { len, max: 1024 } if len == u32::MAX as u64),
        "{err}"
    );
    assert_eq!(err.reject_reason(), Some("oversized"));
}

#[test]
fn truncated_frames_are_rejected() {
    let wire = encode(&sample()).unwrap().to_vec();
    for cut in [3, FRAME_HEADER_LEN + 1, wire.len() - 1] {
        let err = read_all(&wire[..cut], DEFAULT_MAX_FRAME_BYTES).unwrap_err();
        assert_eq!(
            err.reject_reason(),
            Some("truncated"),
            "cut at {cut}: {err}"
        );
    }
    assert!(
        read_all(&[], DEFAULT_MAX_FRAME_BYTES).unwrap().is_none(),
        "empty stream is a clean end"
    );
}

#[test]
fn malformed_archives_are_rejected() {
    let mut wire = encode(&sample()).unwrap().to_vec();
    let body_len = wire.len() - FRAME_HEADER_LEN;
    // Garbage of the right length.
    for b in &mut wire[FRAME_HEADER_LEN..] {
        *b = 0xff;
    }
    let err = read_all(&wire, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert_eq!(err.reject_reason(), Some("malformed"), "{err}");
    // Unknown flags.
    let mut wire = encode(&sample()).unwrap().to_vec();
    wire[6] = 1;
    assert_eq!(
        Frame::from_wire(&wire, DEFAULT_MAX_FRAME_BYTES)
            .unwrap_err()
            .reject_reason(),
        Some("malformed")
    );
    assert!(body_len > 0);
}

#[test]
fn wrong_version_is_rejected_in_header_and_in_archive() {
    let mut wire = encode(&sample()).unwrap().to_vec();
    wire[4..6].copy_from_slice(&9u16.to_le_bytes());
    let err = read_all(&wire, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert!(matches!(err, CodecError::Version { got: 9 }), "{err}");

    let mut env = sample();
    env.version = PROTOCOL_VERSION + 1;
    let wire = encode(&env).unwrap().to_vec();
    let err = Frame::from_wire(&wire, DEFAULT_MAX_FRAME_BYTES).unwrap_err();
    assert!(
        matches!(err, CodecError::Version { got } if got == PROTOCOL_VERSION + 1),
        "{err}"
    );
    assert_eq!(err.reject_reason(), Some("version"));
}

#[test]
fn tensors_are_read_in_place() {
    let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let env = Envelope::new(
        "n1",
        Dest::Shard { shard: 1, epoch: 1 },
        1,
        Body::ShardRequest(ShardRequest {
            idem: IdemKey { sender: 1, seq: 1 },
            op: Op::AddTensor {
                key: "w".into(),
                values: values.clone(),
            },
        }),
    );
    let wire = encode(&env).unwrap().to_vec();
    let frame = Frame::from_wire(&wire, DEFAULT_MAX_FRAME_BYTES).unwrap();
    let ArchivedBody::ShardRequest(req) = &frame.envelope().body else {
        panic!("wrong kind")
    };
    let ArchivedOp::AddTensor {
        values: archived, ..
    } = &req.op
    else {
        panic!("wrong op")
    };
    let slice = archived.as_f32s();
    assert_eq!(slice, &values[..]);
    // The slice points into the frame's own buffer: no copy was made.
    let frame_start = frame.envelope() as *const _ as usize
        - (frame.len() - std::mem::size_of::<ArchivedEnvelope>());
    let p = slice.as_ptr() as usize;
    assert!(
        p >= frame_start && p < frame_start + frame.len(),
        "view is outside the receive buffer"
    );
    let v = archived.as_dvector();
    assert_eq!(v.len(), 1000);
    assert_eq!(v.sum(), values.iter().sum::<f32>());
}

/// A bounded, seeded fuzz run of the decoder under the normal test command. The same decoder is
/// the target of `runtime/fuzz` (cargo-fuzz) for open-ended runs.
#[test]
fn decoder_survives_seeded_mutations() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x71de_9001);
    let corpus: Vec<Vec<u8>> = {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        (0..64)
            .map(|_| {
                encode(&arb_envelope().new_tree(&mut runner).unwrap().current())
                    .unwrap()
                    .to_vec()
            })
            .collect()
    };
    // `TIDEPOOL_FUZZ_SEED_DIR=runtime/fuzz/corpus/decode` writes these valid frames there, as
    // the seed corpus of the open-ended cargo-fuzz run.
    if let Some(dir) = std::env::var_os("TIDEPOOL_FUZZ_SEED_DIR") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, wire) in corpus.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), wire).unwrap();
        }
    }
    let (mut ok, mut rejected) = (0u32, 0u32);
    for i in 0..20_000 {
        let mut wire = corpus[i % corpus.len()].clone();
        match rng.random_range(0..4) {
            0 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..wire.len());
                    wire[at] = rng.random();
                }
            }
            1 => wire.truncate(rng.random_range(0..wire.len())),
            2 => wire.extend((0..rng.random_range(1..32)).map(|_| rng.random::<u8>())),
            _ => {
                let at = rng.random_range(FRAME_HEADER_LEN..wire.len());
                wire[at..].iter_mut().for_each(|b| *b = rng.random());
            }
        }
        match Frame::from_wire(&wire, 1 << 20) {
            Ok(f) => {
                // A frame that validates must be fully readable.
                let _ = f.to_owned_envelope().expect("validated frame deserializes");
                ok += 1;
            }
            Err(e) => {
                assert!(e.reject_reason().is_some(), "{e}");
                rejected += 1;
            }
        }
    }
    assert!(
        rejected > 10_000,
        "mutations should mostly be caught: ok={ok} rejected={rejected}"
    );
}

fn limits(conn: usize, node: usize, stall_ms: u64) -> ReadLimits {
    use crate::budget::{Budget, Budgets};
    ReadLimits {
        budgets: Budgets {
            connection: Budget::new("connection", conn),
            node: Budget::new("node", node),
            wait: std::time::Duration::from_millis(stall_ms),
        },
        stall: std::time::Duration::from_millis(stall_ms),
    }
}

/// A header announcing the maximum frame, then a few bytes, then silence: the reader holds
/// only what arrived (rounded up to one growth step), not the announced length, and gives
/// the stream up after the stall limit with the budget returned.
#[tokio::test]
async fn an_announced_length_is_not_allocated_up_front() {
    let l = limits(1 << 20, 4 << 20, 50);
    let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
    let mut header = encode(&sample()).unwrap().to_vec()[..FRAME_HEADER_LEN].to_vec();
    header[..4].copy_from_slice(&(DEFAULT_MAX_FRAME_BYTES as u32).to_le_bytes());
    use tokio::io::AsyncWriteExt;
    tx.write_all(&header).await.unwrap();
    tx.write_all(&[7u8; 100]).await.unwrap();
    let reading = tokio::spawn({
        let l = l.clone();
        async move { read_frame_limited(&mut rx, DEFAULT_MAX_FRAME_BYTES, Some(&l)).await }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while l.budgets.node.in_use() == 0 {
        assert!(std::time::Instant::now() < deadline, "reader never started");
        tokio::task::yield_now().await;
    }
    assert!(
        l.budgets.node.in_use() <= 64 * 1024,
        "holds {} bytes for 108 received",
        l.budgets.node.in_use()
    );
    let err = reading.await.unwrap().unwrap_err();
    assert!(matches!(err, CodecError::Stalled { got: 100, .. }), "{err}");
    assert_eq!(err.reject_reason(), Some("stalled"));
    assert_eq!(l.budgets.node.in_use(), 0);
    assert_eq!(l.budgets.connection.in_use(), 0);
    drop(tx);
}

/// A frame larger than what the connection's budget has left is refused (and counted as
/// `over_budget`) once the wait runs out; a frame that fits keeps its bytes until dropped.
#[tokio::test]
async fn frames_hold_their_budget_until_dropped() {
    let mut big = sample();
    big.body = Body::ControlReply(vec![1u8; 300 * 1024]);
    let wire = encode(&big).unwrap().to_vec();
    let l = limits(512 * 1024, 4 << 20, 50);
    let mut r = &wire[..];
    let first = read_frame_limited(&mut r, DEFAULT_MAX_FRAME_BYTES, Some(&l))
        .await
        .unwrap()
        .unwrap();
    assert!(first.held_bytes() >= wire.len() - FRAME_HEADER_LEN);
    assert_eq!(l.budgets.connection.in_use(), first.held_bytes());
    let mut r = &wire[..];
    let err = read_frame_limited(&mut r, DEFAULT_MAX_FRAME_BYTES, Some(&l))
        .await
        .unwrap_err();
    assert_eq!(err.reject_reason(), Some("over_budget"), "{err}");
    drop(first);
    assert_eq!(l.budgets.connection.in_use(), 0);
    let mut r = &wire[..];
    let again = read_frame_limited(&mut r, DEFAULT_MAX_FRAME_BYTES, Some(&l))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.to_owned_envelope().unwrap(), big);
}

//! Persistent formats: shard op-log records and shard snapshots (checkpoints). rkyv like the
//! wire, validated with `rkyv::access` on the way back in: storage is input too.

use rkyv::rancor::{self, Fallible, Source};
use rkyv::ser::{Allocator, Writer};
use rkyv::string::{ArchivedString, StringResolver};
use rkyv::traits::SerializeUnsized;
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::with::{ArchiveWith, SerializeWith};
use rkyv::{Archive, Deserialize, Place, Serialize};

use super::{ArchivedOp, ArchivedShardRequest, CodecError, IdemKey, Op, ShardRequest, TensorView};

/// One acknowledged-once-durable operation in a shard's log.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Position in the shard's log (continuous across epochs).
    pub seq: u64,
    /// Epoch of the owner that wrote it.
    pub epoch: u64,
    /// The request; `None` for a fence record (a new owner taking over the log).
    pub req: Option<ShardRequest>,
}

/// A value in a shard snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum SnapValue {
    Bytes(Vec<u8>),
    Counter(i64),
    Tensor(Vec<f32>),
}

/// The dedup window of one sender.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SenderWindow {
    pub sender: u64,
    pub floor: u64,
    pub above: Vec<u64>,
}

/// A shard's whole state at log position `seq`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ShardSnapshot {
    pub seq: u64,
    pub entries: Vec<(String, SnapValue)>,
    pub senders: Vec<SenderWindow>,
}

/// A [`LogRecord`] that borrows its request from wherever it lives (a request made on this node,
/// or a validated frame read in place) and archives to exactly [`ArchivedLogRecord`]: the log
/// writer encodes a segment straight from the received bytes, with no owned copy of the request
/// (megabytes for a tensor) and no second pass. [`decode_log`] reads either the same.
#[derive(Archive, Serialize, Debug, Clone, Copy)]
#[rkyv(
    as = ArchivedLogRecord,
    serialize_bounds(__S: Writer + Allocator, __S::Error: Source)
)]
pub struct LogRecordRef<'a> {
    /// Position in the shard's log.
    pub seq: u64,
    /// Epoch of the owner that wrote it.
    pub epoch: u64,
    /// The request; `None` for a fence record.
    #[rkyv(omit_bounds)]
    pub req: Option<ShardRequestRef<'a>>,
}

/// A borrowed [`ShardRequest`], archived as [`ArchivedShardRequest`].
#[derive(Archive, Serialize, Debug, Clone, Copy)]
#[rkyv(
    as = ArchivedShardRequest,
    serialize_bounds(__S: Writer + Allocator, __S::Error: Source)
)]
pub struct ShardRequestRef<'a> {
    pub idem: IdemKey,
    #[rkyv(omit_bounds)]
    pub op: OpRef<'a>,
}

/// An op borrowed from wherever it lives (a request made on this node, or a received frame read
/// in place); archived as [`ArchivedOp`], so a log segment is encoded straight from it.
#[derive(Archive, Serialize, Debug, Clone, Copy)]
#[rkyv(as = ArchivedOp)]
pub enum OpRef<'a> {
    Put {
        #[rkyv(with = StrAsString)]
        key: &'a str,
        #[rkyv(with = SliceAsVec)]
        value: &'a [u8],
    },
    Get {
        #[rkyv(with = StrAsString)]
        key: &'a str,
    },
    Incr {
        #[rkyv(with = StrAsString)]
        key: &'a str,
        delta: i64,
    },
    AddTensor {
        #[rkyv(with = StrAsString)]
        key: &'a str,
        #[rkyv(with = SliceAsVec)]
        values: &'a [f32],
    },
    GetTensor {
        #[rkyv(with = StrAsString)]
        key: &'a str,
    },
}

impl<'a> OpRef<'a> {
    /// Borrows an owned op.
    pub fn from_native(op: &'a Op) -> Self {
        match op {
            Op::Put { key, value } => OpRef::Put { key, value },
            Op::Get { key } => OpRef::Get { key },
            Op::Incr { key, delta } => OpRef::Incr { key, delta: *delta },
            Op::AddTensor { key, values } => OpRef::AddTensor { key, values },
            Op::GetTensor { key } => OpRef::GetTensor { key },
        }
    }

    /// Reads the op in place from a validated archive (tensors included: no copy).
    pub fn from_archived(op: &'a ArchivedOp) -> Self {
        match op {
            ArchivedOp::Put { key, value } => OpRef::Put {
                key: key.as_str(),
                value: value.as_slice(),
            },
            ArchivedOp::Get { key } => OpRef::Get { key: key.as_str() },
            ArchivedOp::Incr { key, delta } => OpRef::Incr {
                key: key.as_str(),
                delta: delta.to_native(),
            },
            ArchivedOp::AddTensor { key, values } => OpRef::AddTensor {
                key: key.as_str(),
                values: values.as_f32s(),
            },
            ArchivedOp::GetTensor { key } => OpRef::GetTensor { key: key.as_str() },
        }
    }

    /// The op's name, for metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            OpRef::Put { .. } => "put",
            OpRef::Get { .. } => "get",
            OpRef::Incr { .. } => "incr",
            OpRef::AddTensor { .. } => "add_tensor",
            OpRef::GetTensor { .. } => "get_tensor",
        }
    }

    /// Whether the op changes the shard's state (and so is logged once applied).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            OpRef::Put { .. } | OpRef::Incr { .. } | OpRef::AddTensor { .. }
        )
    }

    /// The key the op reads or writes.
    pub fn key(&self) -> &'a str {
        match *self {
            OpRef::Put { key, .. }
            | OpRef::Get { key }
            | OpRef::Incr { key, .. }
            | OpRef::AddTensor { key, .. }
            | OpRef::GetTensor { key } => key,
        }
    }
}

impl<'a> ShardRequestRef<'a> {
    /// Borrows an owned request.
    pub fn from_native(r: &'a ShardRequest) -> Self {
        ShardRequestRef {
            idem: r.idem,
            op: OpRef::from_native(&r.op),
        }
    }

    /// Borrows a request read in place from a validated archive (tensors included: no copy).
    pub fn from_archived(r: &'a ArchivedShardRequest) -> Self {
        ShardRequestRef {
            idem: IdemKey {
                sender: r.idem.sender.to_native(),
                seq: r.idem.seq.to_native(),
            },
            op: OpRef::from_archived(&r.op),
        }
    }
}

/// Archives a `&str` as an [`ArchivedString`] (what a `String` field archives to).
#[derive(Debug)]
pub struct StrAsString;

impl ArchiveWith<&str> for StrAsString {
    type Archived = ArchivedString;
    type Resolver = StringResolver;

    fn resolve_with(field: &&str, resolver: StringResolver, out: Place<ArchivedString>) {
        ArchivedString::resolve_from_str(field, resolver, out);
    }
}

impl<S: Fallible + ?Sized> SerializeWith<&str, S> for StrAsString
where
    S::Error: Source,
    str: SerializeUnsized<S>,
{
    fn serialize_with(field: &&str, serializer: &mut S) -> Result<StringResolver, S::Error> {
        ArchivedString::serialize_from_str(field, serializer)
    }
}

/// Archives a `&[T]` as an [`ArchivedVec`] (what a `Vec<T>` field archives to).
#[derive(Debug)]
pub struct SliceAsVec;

impl<T: Archive> ArchiveWith<&[T]> for SliceAsVec {
    type Archived = ArchivedVec<T::Archived>;
    type Resolver = VecResolver;

    fn resolve_with(field: &&[T], resolver: VecResolver, out: Place<Self::Archived>) {
        ArchivedVec::resolve_from_slice(field, resolver, out);
    }
}

impl<T, S> SerializeWith<&[T], S> for SliceAsVec
where
    T: Serialize<S>,
    S: Fallible + Allocator + Writer + ?Sized,
{
    fn serialize_with(field: &&[T], serializer: &mut S) -> Result<VecResolver, S::Error> {
        ArchivedVec::serialize_from_slice(field, serializer)
    }
}

/// Encodes one log segment from borrowed records: the same bytes [`encode_log`] makes from the
/// owned ones.
pub fn encode_log_refs(records: &Vec<LogRecordRef<'_>>) -> Result<Vec<u8>, CodecError> {
    rkyv::to_bytes::<rancor::Error>(records)
        .map(|b| b.to_vec())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

pub fn encode_log(records: &Vec<LogRecord>) -> Result<Vec<u8>, CodecError> {
    rkyv::to_bytes::<rancor::Error>(records)
        .map(|b| b.to_vec())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

pub fn decode_log(bytes: &[u8]) -> Result<Vec<LogRecord>, CodecError> {
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    buf.extend_from_slice(bytes);
    rkyv::from_bytes::<Vec<LogRecord>, rancor::Error>(&buf)
        .map_err(|e| CodecError::Malformed(e.to_string()))
}

/// Validates one log segment and hands its records to `f`, read in place (no owned copy of any
/// request; replay applies them straight from the segment's bytes). Storage is input too: a
/// segment that fails validation is refused, and `f` is not called.
pub fn with_log<R>(
    bytes: &[u8],
    f: impl FnOnce(&rkyv::vec::ArchivedVec<ArchivedLogRecord>) -> R,
) -> Result<R, CodecError> {
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    buf.extend_from_slice(bytes);
    let records = rkyv::access::<rkyv::vec::ArchivedVec<ArchivedLogRecord>, rancor::Error>(&buf)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    Ok(f(records))
}

pub fn encode_snapshot(s: &ShardSnapshot) -> Result<Vec<u8>, CodecError> {
    rkyv::to_bytes::<rancor::Error>(s)
        .map(|b| b.to_vec())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<ShardSnapshot, CodecError> {
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    buf.extend_from_slice(bytes);
    rkyv::from_bytes::<ShardSnapshot, rancor::Error>(&buf)
        .map_err(|e| CodecError::Malformed(e.to_string()))
}

/// A saved parameter table (see [`super::ParamSnapshot`]).
pub fn encode_param_snapshot(s: &super::ParamSnapshot) -> Result<Vec<u8>, CodecError> {
    rkyv::to_bytes::<rancor::Error>(s)
        .map(|b| b.to_vec())
        .map_err(|e| CodecError::Encode(e.to_string()))
}

/// A saved parameter table back, validated (storage is input too).
pub fn decode_param_snapshot(bytes: &[u8]) -> Result<super::ParamSnapshot, CodecError> {
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    buf.extend_from_slice(bytes);
    rkyv::from_bytes::<super::ParamSnapshot, rancor::Error>(&buf)
        .map_err(|e| CodecError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{IdemKey, Op};

    #[test]
    fn log_and_snapshot_round_trip_and_reject_garbage() {
        let recs = vec![
            LogRecord {
                seq: 1,
                epoch: 2,
                req: Some(ShardRequest {
                    idem: IdemKey { sender: 1, seq: 1 },
                    op: Op::Incr {
                        key: "a".into(),
                        delta: 1,
                    },
                }),
            },
            LogRecord {
                seq: 2,
                epoch: 3,
                req: None,
            },
        ];
        assert_eq!(decode_log(&encode_log(&recs).unwrap()).unwrap(), recs);
        let snap = ShardSnapshot {
            seq: 9,
            entries: vec![
                ("a".into(), SnapValue::Counter(3)),
                ("t".into(), SnapValue::Tensor(vec![1.0])),
            ],
            senders: vec![SenderWindow {
                sender: 1,
                floor: 5,
                above: vec![7],
            }],
        };
        assert_eq!(
            decode_snapshot(&encode_snapshot(&snap).unwrap()).unwrap(),
            snap
        );
        assert!(decode_log(&[0xff; 64]).is_err());
        assert!(decode_snapshot(&[1, 2, 3]).is_err());
    }

    fn requests() -> Vec<ShardRequest> {
        let idem = |seq| IdemKey { sender: 7, seq };
        vec![
            ShardRequest {
                idem: idem(1),
                op: Op::Put {
                    key: "a key longer than the inline capacity".into(),
                    value: vec![1, 2, 3],
                },
            },
            ShardRequest {
                idem: idem(2),
                op: Op::Get { key: "k".into() },
            },
            ShardRequest {
                idem: idem(3),
                op: Op::Incr {
                    key: "c".into(),
                    delta: -4,
                },
            },
            ShardRequest {
                idem: idem(4),
                op: Op::AddTensor {
                    key: "w".into(),
                    values: (0..1000).map(|i| i as f32 * 0.5).collect(),
                },
            },
            ShardRequest {
                idem: idem(5),
                op: Op::GetTensor { key: "w".into() },
            },
        ]
    }

    /// A segment encoded from borrowed requests is byte for byte the one the owned records
    /// make, whether they borrow owned requests or archives read in place from frames.
    #[test]
    fn borrowed_records_encode_exactly_like_owned_ones() {
        use crate::codec::{encode, Body, Dest, Envelope, Frame};
        let reqs = requests();
        let owned: Vec<LogRecord> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| LogRecord {
                seq: 10 + i as u64,
                epoch: 3,
                req: Some(r.clone()),
            })
            .chain(std::iter::once(LogRecord {
                seq: 15,
                epoch: 3,
                req: None,
            }))
            .collect();
        let expected = encode_log(&owned).unwrap();
        let refs = |reqs: Vec<ShardRequestRef<'_>>| -> Vec<u8> {
            let recs: Vec<LogRecordRef<'_>> = reqs
                .into_iter()
                .enumerate()
                .map(|(i, r)| LogRecordRef {
                    seq: 10 + i as u64,
                    epoch: 3,
                    req: Some(r),
                })
                .chain(std::iter::once(LogRecordRef {
                    seq: 15,
                    epoch: 3,
                    req: None,
                }))
                .collect();
            encode_log_refs(&recs).unwrap()
        };
        let native = refs(reqs.iter().map(ShardRequestRef::from_native).collect());
        assert_eq!(native, expected);
        let frames: Vec<Frame> = reqs
            .iter()
            .map(|r| {
                let env = Envelope::new(
                    "n1",
                    Dest::Shard { shard: 1, epoch: 3 },
                    9,
                    Body::ShardRequest(r.clone()),
                );
                Frame::from_wire(&encode(&env).unwrap().to_vec(), 1 << 24).unwrap()
            })
            .collect();
        let archived = refs(
            frames
                .iter()
                .map(|f| match &f.envelope().body {
                    crate::codec::ArchivedBody::ShardRequest(r) => {
                        ShardRequestRef::from_archived(r)
                    }
                    _ => unreachable!("built as a shard request"),
                })
                .collect(),
        );
        assert_eq!(archived, expected);
        assert_eq!(decode_log(&archived).unwrap(), owned);
    }
}

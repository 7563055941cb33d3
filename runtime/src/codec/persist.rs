//! Persistent formats: shard op-log records and shard snapshots (checkpoints). rkyv like the
//! wire, validated with `rkyv::access` on the way back in: storage is input too.

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};

use super::{CodecError, ShardRequest};

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
}

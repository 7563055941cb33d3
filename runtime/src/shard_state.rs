//! One shard's data: a small key-value map (bytes, counters, f32 tensors) whose writes carry
//! idempotency keys, so every acknowledged op is applied exactly once however often it is
//! retried. Pure: no I/O, no clocks. The node's shard actors own one each; the deterministic
//! simulation runs the same type.

use std::collections::HashMap;

use nalgebra::DVector;

use crate::codec::{
    ArchivedShardRequest, ErrorCode, IdemKey, OpRef, OpResult, SenderWindow, ShardRequest,
    ShardSnapshot, SnapValue,
};
use crate::dedup::{Check, Dedup};

/// Keys a shard holds at most (bounded memory).
pub const MAX_KEYS: usize = 1 << 20;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

#[derive(Debug, Clone)]
enum Value {
    Bytes(Vec<u8>),
    Counter(i64),
    Tensor(DVector<f32>),
}

/// Why an op was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    /// The key holds a different kind of value, or a tensor has the wrong length.
    #[error("{0}")]
    BadRequest(String),
    /// The shard or the sender's dedup window is full.
    #[error("{0}")]
    Full(String),
}

impl ShardError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ShardError::BadRequest(_) => ErrorCode::BadRequest,
            ShardError::Full(_) => ErrorCode::Overloaded,
        }
    }
}

/// One shard's data and idempotency table. Pure: no I/O, no clocks.
#[derive(Debug, Default, Clone)]
pub struct ShardState {
    kv: HashMap<String, Value>,
    dedup: Dedup,
    applied: u64,
}

impl ShardState {
    /// Applies `op`. Writes are deduplicated by `idem`; reads are not.
    pub fn apply(&mut self, idem: IdemKey, op: OpRef<'_>) -> Result<OpResult, ShardError> {
        let key = op.key();
        if key.len() > MAX_KEY_BYTES {
            return Err(ShardError::BadRequest(format!(
                "key of {} bytes exceeds {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        if op.is_write() {
            match self.dedup.check(idem.sender, idem.seq) {
                Check::New => {}
                Check::Duplicate => return Ok(OpResult::Duplicate),
                Check::WindowFull => {
                    return Err(ShardError::Full(format!(
                        "sender {} has too many ops in flight",
                        idem.sender
                    )))
                }
            }
            if !self.kv.contains_key(key) && self.kv.len() >= MAX_KEYS {
                return Err(ShardError::Full(format!(
                    "shard holds the maximum of {MAX_KEYS} keys"
                )));
            }
        }
        let result = self.apply_unchecked(op)?;
        if op.is_write() {
            self.dedup.record(idem.sender, idem.seq);
            self.applied += 1;
        }
        Ok(result)
    }

    fn apply_unchecked(&mut self, op: OpRef<'_>) -> Result<OpResult, ShardError> {
        let mismatch =
            |key: &str| ShardError::BadRequest(format!("key {key:?} holds another kind of value"));
        Ok(match op {
            OpRef::Put { key, value } => {
                self.kv
                    .insert(key.to_string(), Value::Bytes(value.to_vec()));
                OpResult::Done
            }
            OpRef::Get { key } => match self.kv.get(key) {
                None => OpResult::Value(None),
                Some(Value::Bytes(b)) => OpResult::Value(Some(b.clone())),
                Some(Value::Counter(c)) => OpResult::Counter(*c),
                Some(Value::Tensor(_)) => return Err(mismatch(key)),
            },
            OpRef::Incr { key, delta } => {
                let v = self.kv.entry(key.to_string()).or_insert(Value::Counter(0));
                let Value::Counter(c) = v else {
                    return Err(mismatch(key));
                };
                *c = c.wrapping_add(delta);
                OpResult::Counter(*c)
            }
            OpRef::AddTensor { key, values } => {
                let v = self
                    .kv
                    .entry(key.to_string())
                    .or_insert_with(|| Value::Tensor(DVector::zeros(values.len())));
                let Value::Tensor(t) = v else {
                    return Err(mismatch(key));
                };
                if t.len() != values.len() {
                    return Err(ShardError::BadRequest(format!(
                        "tensor {key:?} has {} elements, got {}",
                        t.len(),
                        values.len()
                    )));
                }
                // In place over the receive buffer: no decode, no copy of the gradient.
                *t += nalgebra::DVectorView::from_slice(values, values.len());
                OpResult::Done
            }
            OpRef::GetTensor { key } => match self.kv.get(key) {
                None => OpResult::Tensor(Vec::new()),
                Some(Value::Tensor(t)) => OpResult::Tensor(t.as_slice().to_vec()),
                Some(_) => return Err(mismatch(key)),
            },
        })
    }

    /// The state as a snapshot at log position `seq` (for checkpoints).
    pub fn snapshot(&self, seq: u64) -> ShardSnapshot {
        let mut entries: Vec<(String, SnapValue)> = self
            .kv
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Bytes(b) => SnapValue::Bytes(b.clone()),
                    Value::Counter(c) => SnapValue::Counter(*c),
                    Value::Tensor(t) => SnapValue::Tensor(t.as_slice().to_vec()),
                };
                (k.clone(), v)
            })
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let senders = self
            .dedup
            .export()
            .into_iter()
            .map(|(sender, floor, above)| SenderWindow {
                sender,
                floor,
                above,
            })
            .collect();
        ShardSnapshot {
            seq,
            entries,
            senders,
        }
    }

    /// Rebuilds a state from a snapshot.
    pub fn from_snapshot(snap: ShardSnapshot) -> Self {
        let kv = snap
            .entries
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    SnapValue::Bytes(b) => Value::Bytes(b),
                    SnapValue::Counter(c) => Value::Counter(c),
                    SnapValue::Tensor(t) => Value::Tensor(DVector::from_vec(t)),
                };
                (k, v)
            })
            .collect();
        let dedup = Dedup::import(
            snap.senders
                .into_iter()
                .map(|w| (w.sender, w.floor, w.above)),
        );
        ShardState {
            kv,
            dedup,
            applied: 0,
        }
    }

    /// Replays one logged request (restore). Errors were errors when first applied too, and
    /// duplicates are skipped by the dedup table, so replay reproduces the original state.
    pub fn replay(&mut self, req: &ShardRequest) {
        let _ = self.apply(req.idem, OpRef::from_native(&req.op));
    }

    /// [`replay`](Self::replay) of a request read in place from a log segment.
    pub fn replay_archived(&mut self, req: &ArchivedShardRequest) {
        let idem = IdemKey {
            sender: req.idem.sender.to_native(),
            seq: req.idem.seq.to_native(),
        };
        let _ = self.apply(idem, OpRef::from_archived(&req.op));
    }

    /// Writes applied (not counting duplicates).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn keys(&self) -> usize {
        self.kv.len()
    }

    /// Whether the write with idempotency key `idem` was applied (a retry would be a duplicate).
    pub fn has_applied(&self, idem: IdemKey) -> bool {
        self.dedup.check(idem.sender, idem.seq) == Check::Duplicate
    }

    /// The counter at `key`, if it holds one.
    pub fn counter(&self, key: &str) -> Option<i64> {
        match self.kv.get(key) {
            Some(Value::Counter(c)) => Some(*c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(seq: u64) -> IdemKey {
        IdemKey { sender: 1, seq }
    }

    #[test]
    fn incr_is_applied_once_per_key() {
        let mut s = ShardState::default();
        assert_eq!(
            s.apply(k(1), OpRef::Incr { key: "a", delta: 2 }),
            Ok(OpResult::Counter(2))
        );
        assert_eq!(
            s.apply(k(1), OpRef::Incr { key: "a", delta: 2 }),
            Ok(OpResult::Duplicate)
        );
        assert_eq!(
            s.apply(k(2), OpRef::Incr { key: "a", delta: 2 }),
            Ok(OpResult::Counter(4))
        );
        assert_eq!(
            s.apply(k(9), OpRef::Get { key: "a" }),
            Ok(OpResult::Counter(4))
        );
        assert_eq!(s.applied(), 2);
    }

    #[test]
    fn tensors_accumulate_and_check_length() {
        let mut s = ShardState::default();
        s.apply(
            k(1),
            OpRef::AddTensor {
                key: "w",
                values: &[1.0, 2.0],
            },
        )
        .unwrap();
        s.apply(
            k(2),
            OpRef::AddTensor {
                key: "w",
                values: &[0.5, 0.5],
            },
        )
        .unwrap();
        assert_eq!(
            s.apply(k(3), OpRef::GetTensor { key: "w" }),
            Ok(OpResult::Tensor(vec![1.5, 2.5]))
        );
        assert!(matches!(
            s.apply(
                k(4),
                OpRef::AddTensor {
                    key: "w",
                    values: &[1.0]
                }
            ),
            Err(ShardError::BadRequest(_))
        ));
        assert!(matches!(
            s.apply(k(5), OpRef::Incr { key: "w", delta: 1 }),
            Err(ShardError::BadRequest(_))
        ));
    }

    #[test]
    fn oversized_keys_are_refused() {
        let mut s = ShardState::default();
        let key = "x".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            s.apply(
                k(1),
                OpRef::Put {
                    key: &key,
                    value: b"v"
                }
            ),
            Err(ShardError::BadRequest(_))
        ));
        assert_eq!(s.keys(), 0);
    }
}

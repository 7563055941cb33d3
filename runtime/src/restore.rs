//! Taking ownership of a shard: rebuild its state from the newest valid checkpoint of the highest
//! epoch plus every log record after it, after fencing the log at the new epoch so that a stale
//! owner can no longer append (invariants 2 and 3).

use crate::codec;
use crate::shard_state::ShardState;
use crate::storage::{Restore, StorageError, Store};

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("shard {shard}: {reason}")]
    Decode { shard: u32, reason: String },
}

/// What a restore produced.
#[derive(Debug)]
pub struct Restored {
    pub state: ShardState,
    /// The seq the new owner's first record gets.
    pub next_seq: u64,
    /// Records replayed from the log.
    pub replayed: u64,
    /// Corrupt objects skipped.
    pub skipped_corrupt: usize,
}

/// Restores `shard` for an owner at `epoch` and fences the log.
pub async fn restore_shard(
    store: &Store,
    shard: u32,
    epoch: u64,
) -> Result<Restored, RestoreError> {
    // Fence first, then read: an old owner could otherwise append after our read and before
    // our fence, and that acknowledged write would be lost.
    let fence = store.fence(shard, epoch).await?;
    let r = store.restore(shard).await?;
    let (state, replayed) = rebuild(shard, &r)?;
    Ok(Restored {
        state,
        next_seq: fence + 1,
        replayed,
        skipped_corrupt: r.report.skipped_corrupt,
    })
}

/// The state of `r`'s newest checkpoint (empty without one) and the log position it covers.
pub fn from_checkpoint(shard: u32, r: &Restore) -> Result<(ShardState, u64), RestoreError> {
    Ok(match &r.checkpoint {
        Some(c) => {
            let snap = codec::decode_snapshot(&c.snapshot).map_err(|e| RestoreError::Decode {
                shard,
                reason: e.to_string(),
            })?;
            let seq = snap.seq;
            (ShardState::from_snapshot(snap), seq)
        }
        None => (ShardState::default(), 0),
    })
}

/// The state what storage returned holds: the newest checkpoint, then every logged request
/// after it, replayed in place from the segments' bytes. Returns the state and the records
/// replayed. (Read-only: checkers call it on a log they must not fence.)
pub fn rebuild(shard: u32, r: &Restore) -> Result<(ShardState, u64), RestoreError> {
    let bad = |reason: String| RestoreError::Decode { shard, reason };
    let (mut state, after) = from_checkpoint(shard, r)?;
    let mut replayed = 0;
    for seg in &r.segments {
        if seg.fence || seg.records.is_empty() {
            continue;
        }
        // Replayed in place from the segment's bytes: no owned copy of any request.
        replayed += codec::with_log(&seg.records, |records| {
            let mut n = 0;
            for rec in records.iter().filter(|r| r.seq.to_native() > after) {
                if let Some(req) = rec.req.as_ref() {
                    state.replay_archived(req);
                    n += 1;
                }
            }
            n
        })
        .map_err(|e| bad(e.to_string()))?;
    }
    Ok((state, replayed))
}

//! Epoch-fenced checkpoints and restore.

use bytes::Bytes;
use object_store::path::Path;

use super::format::{Header, Kind};
use super::{Checkpoint, Created, Restore, RestoreReport, StorageError, Store};

/// `epoch-{e:020}` -> e.
fn parse_epoch_dir(name: &str) -> Option<u64> {
    parse_fixed(name.strip_prefix("epoch-")?)
}

/// `checkpoint-{seq:020}.ckpt` -> seq.
fn parse_checkpoint_name(name: &str) -> Option<u64> {
    parse_fixed(name.strip_prefix("checkpoint-")?.strip_suffix(".ckpt")?)
}

fn parse_fixed(digits: &str) -> Option<u64> {
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

impl Store {
    pub(super) fn epoch_prefix(&self, shard: u32, epoch: u64) -> Path {
        self.shard_prefix(shard).child(format!("epoch-{epoch:020}"))
    }

    pub(super) fn checkpoint_path(&self, shard: u32, epoch: u64, seq: u64) -> Path {
        self.epoch_prefix(shard, epoch)
            .child(format!("checkpoint-{seq:020}.ckpt"))
    }

    /// Stores the snapshot of `shard` as of log seq `seq` (0 = before any record), written by
    /// the owner at `epoch`, with `PutMode::Create`. `Err(Fenced)` if a different checkpoint
    /// already holds `(epoch, seq)`; an identical one (a retry) is `Ok`.
    pub async fn put_checkpoint(
        &self,
        shard: u32,
        epoch: u64,
        seq: u64,
        snapshot: Bytes,
    ) -> Result<(), StorageError> {
        let header = Header {
            kind: Kind::Checkpoint,
            fence: false,
            epoch,
            seq,
            count: 0,
        };
        let path = self.checkpoint_path(shard, epoch, seq);
        match self.create(&path, header, snapshot).await? {
            Created::Ok => Ok(()),
            Created::Taken => Err(StorageError::Fenced { shard, seq }),
        }
    }

    /// The newest valid checkpoint of the highest epoch that has one, skipping corrupt objects
    /// (falling back to older checkpoints, then older epochs). `None` if there is none.
    pub async fn latest_checkpoint(&self, shard: u32) -> Result<Option<Checkpoint>, StorageError> {
        let mut report = RestoreReport::default();
        Ok(self
            .find_checkpoint(shard, &mut report)
            .await?
            .map(|(c, _)| c))
    }

    /// Numbers parsed from the names directly under `prefix`: directories if `dirs`, else objects.
    async fn list_numbered(
        &self,
        prefix: &Path,
        dirs: bool,
        parse: fn(&str) -> Option<u64>,
    ) -> Result<Vec<u64>, StorageError> {
        let listing = self.inner.list_with_delimiter(Some(prefix)).await?;
        let paths = if dirs {
            listing.common_prefixes
        } else {
            listing.objects.into_iter().map(|m| m.location).collect()
        };
        let mut found: Vec<u64> = paths
            .iter()
            .filter_map(|p| p.filename().and_then(parse))
            .collect();
        found.sort_unstable_by(|a, b| b.cmp(a));
        Ok(found)
    }

    async fn find_checkpoint(
        &self,
        shard: u32,
        report: &mut RestoreReport,
    ) -> Result<Option<(Checkpoint, Path)>, StorageError> {
        let epochs = self
            .list_numbered(&self.shard_prefix(shard), true, parse_epoch_dir)
            .await?;
        for epoch in epochs {
            let prefix = self.epoch_prefix(shard, epoch);
            for seq in self
                .list_numbered(&prefix, false, parse_checkpoint_name)
                .await?
            {
                let path = self.checkpoint_path(shard, epoch, seq);
                match self.read_checkpoint(&path, epoch, seq).await? {
                    Some(Ok(c)) => return Ok(Some((c, path))),
                    Some(Err(reason)) => {
                        tracing::warn!(shard, %path, %reason, "skipping a corrupt checkpoint");
                        report.skipped_corrupt += 1;
                        report.skipped_paths.push(path.to_string());
                    }
                    None => {} // deleted since the listing
                }
            }
        }
        Ok(None)
    }

    /// `None` if gone, `Some(Err(reason))` if corrupt.
    async fn read_checkpoint(
        &self,
        path: &Path,
        epoch: u64,
        seq: u64,
    ) -> Result<Option<Result<Checkpoint, String>>, StorageError> {
        let checked = match self.get_checked(path, Kind::Checkpoint).await {
            Ok(c) => c,
            Err(StorageError::Store(object_store::Error::NotFound { .. })) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(checked.and_then(|(h, snapshot)| {
            if h.epoch != epoch || h.seq != seq || h.fence || h.count != 0 {
                return Err(format!(
                    "header (epoch {}, seq {}) does not match the name (epoch {epoch}, seq {seq})",
                    h.epoch, h.seq
                ));
            }
            Ok(Checkpoint {
                epoch,
                seq,
                snapshot,
            })
        })))
    }

    /// Everything a new owner needs: the latest checkpoint and the log after its seq.
    /// `Corrupt` if the log is damaged where needed, or if the checkpoint claims seqs the log
    /// never reached (restore is for shards that log every op; checkpoint-only users call
    /// [`Store::latest_checkpoint`]).
    pub async fn restore(&self, shard: u32) -> Result<Restore, StorageError> {
        let mut report = RestoreReport::default();
        let found = self.find_checkpoint(shard, &mut report).await?;
        let after = found.as_ref().map_or(0, |(c, _)| c.seq);
        let (segments, log_end) = self.read_chain(shard, after).await?;
        if let Some((c, path)) = &found {
            if c.seq >= log_end {
                return Err(StorageError::Corrupt {
                    path: path.to_string(),
                    reason: format!(
                        "checkpoint covers seq {} but the log ends at seq {}",
                        c.seq,
                        log_end - 1
                    ),
                });
            }
        }
        Ok(Restore {
            checkpoint: found.map(|(c, _)| c),
            segments,
            log_end,
            report,
        })
    }
}

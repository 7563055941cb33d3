//! The per-shard op log: append, read, end, fence, compaction.

use std::future::Future;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;

use super::format::{self, Header, Kind, HEADER_LEN};
use super::{Created, Segment, StorageError, Store, MAX_FENCE_ATTEMPTS};

/// Segments fetched concurrently by `read_log`.
const READ_CONCURRENCY: usize = 8;

/// `{first_seq:020}.seg` -> first_seq.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

impl Store {
    pub(super) fn log_prefix(&self, shard: u32) -> Path {
        self.shard_prefix(shard).child("log")
    }

    pub(super) fn segment_path(&self, shard: u32, first_seq: u64) -> Path {
        self.log_prefix(shard).child(format!("{first_seq:020}.seg"))
    }

    /// Appends `count` records (opaque `records`) at seqs `first_seq..first_seq + count`,
    /// written by the owner at `epoch`. `Ok` means durable (module docs, "Durability").
    /// `Err(Fenced)` if `first_seq` is taken by a different segment: a newer owner fenced the
    /// log. Retrying the same call after an ambiguous error is safe.
    pub async fn append(
        &self,
        shard: u32,
        epoch: u64,
        first_seq: u64,
        count: u64,
        records: Bytes,
    ) -> Result<(), StorageError> {
        if first_seq == 0 || count == 0 || first_seq.checked_add(count).is_none() {
            return Err(StorageError::Invalid(format!(
                "append of {count} records at seq {first_seq}: seqs start at 1, count must be >= 1"
            )));
        }
        self.put_segment(shard, epoch, first_seq, count, false, records)
            .await
    }

    async fn put_segment(
        &self,
        shard: u32,
        epoch: u64,
        first_seq: u64,
        count: u64,
        fence: bool,
        records: Bytes,
    ) -> Result<(), StorageError> {
        let header = Header {
            kind: Kind::Segment,
            fence,
            epoch,
            seq: first_seq,
            count,
        };
        let path = self.segment_path(shard, first_seq);
        match self.create(&path, header, records).await? {
            Created::Ok => Ok(()),
            Created::Taken => Err(StorageError::Fenced {
                shard,
                seq: first_seq,
            }),
        }
    }

    /// Log segment names of `shard`, sorted by first seq. Foreign names are ignored.
    async fn list_segments(&self, shard: u32) -> Result<Vec<(u64, Path)>, StorageError> {
        let prefix = self.log_prefix(shard);
        let metas: Vec<_> = self.inner.list(Some(&prefix)).try_collect().await?;
        let mut names: Vec<(u64, Path)> = metas
            .into_iter()
            .filter_map(|m| {
                let seq = m.location.filename().and_then(parse_segment_name);
                if seq.is_none() {
                    tracing::debug!(path = %m.location, "ignoring a foreign object in the log");
                }
                Some((seq?, m.location))
            })
            .collect();
        names.sort_unstable_by_key(|(seq, _)| *seq);
        Ok(names)
    }

    /// Reads and checks one segment; anything wrong with it is `Corrupt`.
    async fn fetch_segment(&self, first_seq: u64, path: &Path) -> Result<Segment, StorageError> {
        let corrupt = |reason: String| StorageError::Corrupt {
            path: path.to_string(),
            reason,
        };
        let (h, records) = self
            .get_checked(path, Kind::Segment)
            .await?
            .map_err(corrupt)?;
        if h.seq != first_seq {
            return Err(corrupt(format!(
                "header says first seq {}, name says {first_seq}",
                h.seq
            )));
        }
        if h.count == 0 || h.seq.checked_add(h.count).is_none() {
            return Err(corrupt(format!("impossible record count {}", h.count)));
        }
        if h.fence && (h.count != 1 || !records.is_empty()) {
            return Err(corrupt("fence segment with records".to_string()));
        }
        Ok(Segment {
            epoch: h.epoch,
            first_seq: h.seq,
            count: h.count,
            fence: h.fence,
            records,
        })
    }

    /// Every segment holding records after `after_seq`, in seq order, fences included, each
    /// opened and verified. The log must be contiguous from the segment holding `after_seq + 1`
    /// on: a gap, an overlap, an epoch going backwards or a corrupt segment is `Corrupt`.
    /// The first segment may start before `after_seq + 1` (see [`Segment::records_to_skip`]).
    pub async fn read_log(&self, shard: u32, after_seq: u64) -> Result<Vec<Segment>, StorageError> {
        Ok(self.read_chain(shard, after_seq).await?.0)
    }

    /// `read_log` plus the log end (next free seq).
    pub(crate) async fn read_chain(
        &self,
        shard: u32,
        after_seq: u64,
    ) -> Result<(Vec<Segment>, u64), StorageError> {
        let names = self.list_segments(shard).await?;
        let Some((first_listed, first_path)) = names.first() else {
            return Ok((Vec::new(), 1));
        };
        let want = after_seq.saturating_add(1);
        if *first_listed > want {
            return Err(StorageError::Corrupt {
                path: first_path.to_string(),
                reason: format!(
                    "log starts at seq {first_listed} but seq {want} is needed (compacted past the checkpoint in use, or lost)"
                ),
            });
        }
        // The segment holding `want` is the last one starting at or before it.
        let start = names.partition_point(|(seq, _)| *seq <= want) - 1;
        // Owned items and `async move`: a closure over borrowed tuples makes the future fail
        // the higher-ranked `Send` check when callers spawn it.
        let fetched: Vec<Segment> = futures::stream::iter(names[start..].to_vec())
            .map(|(seq, path)| async move { self.fetch_segment(seq, &path).await })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;

        let mut out = Vec::with_capacity(fetched.len());
        let mut expected = None::<(u64, u64)>; // (next seq, epoch so far)
        for (seg, (_, path)) in fetched.into_iter().zip(&names[start..]) {
            if let Some((next, epoch)) = expected {
                let problem = if seg.first_seq > next {
                    Some(format!(
                        "gap: seqs {next}..{} are missing (compacted past the checkpoint in use, or lost)",
                        seg.first_seq
                    ))
                } else if seg.first_seq < next {
                    Some(format!(
                        "overlap: starts at {} but the previous segment ends at {}",
                        seg.first_seq,
                        next - 1
                    ))
                } else if seg.epoch < epoch {
                    Some(format!("epoch went back from {epoch} to {}", seg.epoch))
                } else {
                    None
                };
                if let Some(reason) = problem {
                    return Err(StorageError::Corrupt {
                        path: path.to_string(),
                        reason,
                    });
                }
                if seg.epoch > epoch && !seg.fence {
                    tracing::warn!(shard, %path, epoch = seg.epoch, "epoch changes without a fence segment");
                }
            }
            expected = Some((seg.end(), seg.epoch));
            if seg.end() > want {
                out.push(seg);
            }
        }
        Ok((out, expected.map_or(1, |(next, _)| next)))
    }

    /// The last segment, checked.
    async fn last_segment(&self, shard: u32) -> Result<Option<Segment>, StorageError> {
        let names = self.list_segments(shard).await?;
        match names.last() {
            None => Ok(None),
            Some((seq, path)) => self.fetch_segment(*seq, path).await.map(Some),
        }
    }

    /// The next free seq: the last segment's `first_seq + count`, or 1 for an empty log.
    pub async fn log_end(&self, shard: u32) -> Result<u64, StorageError> {
        Ok(self.last_segment(shard).await?.map_or(1, |s| s.end()))
    }

    /// Claims the log for `epoch`: creates a fence segment at the current end, re-reading the
    /// end and retrying if an older owner slipped a segment in first. Returns the fence's seq;
    /// the new owner appends from there + 1. Afterwards every write by an older epoch at or
    /// after the fence fails with `Fenced`. Idempotent: if the log already ends with this
    /// epoch's fence, returns it. `Err(Fenced)` if the log already holds a newer epoch.
    pub async fn fence(&self, shard: u32, epoch: u64) -> Result<u64, StorageError> {
        self.fence_with(shard, epoch, |_| async {}).await
    }

    /// Checks, reading only, that `epoch` still holds the log: its last segment is this epoch's
    /// (a fence or an append). Returns the log's end. `Err(Fenced)` if a newer epoch fenced or
    /// wrote it; `Err(Corrupt)` if the log is empty or ends with an older epoch (this epoch's
    /// fence is gone: the caller must not trust its in-memory state). Unlike [`Store::fence`]
    /// it writes nothing, so the epoch's running log writer keeps its next seq: an owner whose
    /// lease lapsed and came back resumes with it instead of restoring.
    pub async fn check_fence(&self, shard: u32, epoch: u64) -> Result<u64, StorageError> {
        match self.last_segment(shard).await? {
            Some(last) if last.epoch == epoch => Ok(last.end()),
            Some(last) if last.epoch > epoch => Err(StorageError::Fenced {
                shard,
                seq: last.end(),
            }),
            other => Err(StorageError::Corrupt {
                path: format!("shard {shard} log"),
                reason: format!(
                    "expected epoch {epoch}'s fence at the end, found {}",
                    other.map_or("an empty log".to_string(), |s| format!("epoch {}", s.epoch))
                ),
            }),
        }
    }

    /// `fence` with a hook run between reading the end and creating the fence (tests use it to
    /// slip an old owner's segment in).
    pub(crate) async fn fence_with<F, Fut>(
        &self,
        shard: u32,
        epoch: u64,
        mut before_put: F,
    ) -> Result<u64, StorageError>
    where
        F: FnMut(u64) -> Fut,
        Fut: Future<Output = ()>,
    {
        for attempt in 1..=MAX_FENCE_ATTEMPTS {
            let last = self.last_segment(shard).await?;
            let end = last.as_ref().map_or(1, |s| s.end());
            if let Some(last) = &last {
                if last.epoch > epoch {
                    return Err(StorageError::Fenced { shard, seq: end });
                }
                if last.fence && last.epoch == epoch {
                    return Ok(last.first_seq);
                }
            }
            before_put(end).await;
            match self
                .put_segment(shard, epoch, end, 1, true, Bytes::new())
                .await
            {
                Ok(()) => {
                    tracing::debug!(shard, epoch, seq = end, attempt, "fenced the shard log");
                    return Ok(end);
                }
                Err(StorageError::Fenced { .. }) => {
                    tracing::debug!(
                        shard,
                        epoch,
                        seq = end,
                        attempt,
                        "lost the race for the log end; re-reading"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Err(StorageError::FenceContended {
            shard,
            attempts: MAX_FENCE_ATTEMPTS,
        })
    }

    /// Deletes, oldest first, log segments whose every seq is `<= upto_seq` (covered by a
    /// checkpoint at `upto_seq`), never the newest segment and never a fence segment (see the
    /// module docs, "Garbage collection"). Stops at the first segment it cannot prove covered.
    /// Returns how many were deleted.
    pub async fn compact_log(&self, shard: u32, upto_seq: u64) -> Result<usize, StorageError> {
        let names = self.list_segments(shard).await?;
        let mut deleted = 0;
        for pair in names.windows(2) {
            let [(seq, path), (next_seq, _)] = pair else {
                break;
            };
            if next_seq.saturating_sub(1) > upto_seq {
                break;
            }
            // The next name bounds the end only if the log is well formed: check the header.
            // Only the header is read, so it is not authenticated (the tag covers the whole
            // object): a forged one can at worst make this keep a segment, or delete one, which
            // whoever can write such a header can do directly. Nothing read here is served.
            let head = self.inner.get_range(path, 0..HEADER_LEN as u64).await?;
            let header = match format::decode_header(&head, Kind::Segment) {
                Ok((h, _)) if h.seq == *seq => h,
                _ => break,
            };
            if header.seq.saturating_add(header.count).saturating_sub(1) > upto_seq {
                break;
            }
            if header.fence {
                // Kept: a stale owner's next write is at exactly this seq; deleting the fence
                // would let that write succeed, below the log anyone reads.
                continue;
            }
            match self.inner.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }
}

//! Durable shard storage on an object store: per-shard op logs and epoch-fenced checkpoints.
//!
//! This layer makes ARCHITECTURE.md invariants 2 (**fencing**) and 3 (**acknowledged means
//! durable**) true for shard state. Payloads are opaque [`Bytes`]: the codec encodes records and
//! snapshots, this module only names, frames, seals, orders and fences them.
//!
//! # Objects
//!
//! For shard `s` (all names are relative to the URL's prefix):
//!
//! - **Op log**: `shards/{s:05}/log/{first_seq:020}.seg`. One log per shard, continuous across
//!   epochs. A segment holds `count >= 1` records with consecutive seqs starting at `first_seq`;
//!   seqs start at 1, so the first segment is `…/00000000000000000001.seg`. Every segment is
//!   created with [`PutMode::Create`], so a seq can be claimed only once.
//! - **Checkpoints**: `shards/{s:05}/epoch-{e:020}/checkpoint-{seq:020}.ckpt`, created with
//!   [`PutMode::Create`] (one writer per `(epoch, seq)`); `seq` is the last log seq the snapshot
//!   covers (0 = before any record).
//!
//! Every object is sealed at rest (`seal.rs`): a 56-byte header (magic `b"TDPL"`, format
//! version 2, kind (1 = log segment, 2 = checkpoint, 3 = blob), flags (bit 0 = fence segment),
//! epoch, seq (a segment's first seq or a checkpoint's covered seq), record count, payload length,
//! data key id, nonce), then the payload encrypted with AES-256-GCM under the cluster data key
//! ([`keys`]), then the 16-byte tag. The header and the object's name relative to the store root
//! are the associated data: epoch/seq/count decide what a restore replays, and a valid object
//! moved to another name must not pass for it. Anything that does not open (damaged, forged,
//! moved, truncated, an unknown key id, format version 1) is refused, counted in
//! `tidepool_storage_rejected_objects_total{reason}` and never returned as data. The exact layout
//! is in `format.rs`.
//!
//! # Fencing (invariant 2)
//!
//! A new owner of shard `s` at epoch `e` calls [`Store::fence`] before its first append: it
//! reads the log's last segment, whose end `L` is the next free seq, and creates a *fence
//! segment* (count 1, empty payload, fence flag, epoch `e`) at `L` with `PutMode::Create`.
//!
//! - A stale owner writes its next segment at *its* next seq, the end of its own last write.
//!   Owners write contiguously and the new owner read every completed write, so that seq is
//!   exactly the seq of the fence that superseded it (`L` for the owner just replaced). That name
//!   exists, so the put fails with `AlreadyExists`, reported as [`StorageError::Fenced`]. The
//!   stale owner must not apply or acknowledge that operation, and should stop serving the shard.
//! - If the fence put itself hits `AlreadyExists`, the old owner slipped a segment in between
//!   the read and the put: the new owner re-reads the end and tries again there (bounded by
//!   [`MAX_FENCE_ATTEMPTS`]). So every write that succeeded before the fence is below the fence
//!   and is read by the new owner's restore, and no older-epoch write after the fence succeeds.
//! - Fence segments are returned by [`Store::read_log`] (`Segment::fence == true`) so callers
//!   see where epochs change. Epochs never decrease along the log; a decrease is reported as
//!   [`StorageError::Corrupt`].
//! - Checkpoints live under an epoch prefix; [`Store::latest_checkpoint`] takes the newest
//!   valid checkpoint of the highest epoch that has one, so a stale owner's late checkpoint
//!   (which can only cover seqs below the fence) never hides a newer epoch's.
//!
//! **Caller contract** (what makes the argument above hold):
//! 1. Per shard, an owner appends at consecutive seqs and has **at most one append in flight**
//!    (await each `append` before issuing the next). With pipelined appends a later segment
//!    could be visible to the new owner's read while an earlier one is still in flight and
//!    lands below the fence afterwards, unseen.
//! 2. An operation is applied/acknowledged only after its `append` returned `Ok`
//!    (invariant 3). After `Fenced`, it is not durable and must not be acknowledged.
//! 3. A new owner calls `fence` before its first append, and appends from the returned seq + 1.
//! 4. If an `append` fails ambiguously (timeout, connection reset), retry it with the **same
//!    seq and bytes**: if the first attempt landed, the retry finds an identical object and
//!    returns `Ok` (same for `put_checkpoint` and `fence`). Different bytes at a taken seq are
//!    `Fenced`.
//!
//! # Restore
//!
//! [`Store::restore`] = [`Store::latest_checkpoint`] + [`Store::read_log`] after its seq. The
//! first returned segment may start before `checkpoint.seq + 1` (segments are not split);
//! [`Segment::records_to_skip`] says how many of its leading records the checkpoint already
//! covers. Corrupt checkpoints (short, wrong magic, failing the tag: damaged or forged, header
//! not matching the name) are skipped with a warning, falling back to older ones and older
//! epochs, and counted in [`RestoreReport::skipped_corrupt`] (the caller owns the metric). A
//! corrupt *log segment* cannot be skipped (that would drop acknowledged operations): it is a
//! hard [`StorageError::Corrupt`], as are gaps and overlaps in the needed part of the log.
//!
//! # Garbage collection
//!
//! [`Store::compact_log`] deletes, oldest first, the segments wholly at or below a checkpoint's
//! seq, except the newest segment (it carries the log's end, which fencing needs) and **fence
//! segments**, which are kept forever (one 48-byte object per change of owner): a stale owner's
//! next write is at exactly the seq of the fence that superseded it, and were that fence
//! deleted, the write would succeed below the part of the log anyone reads, and be lost after
//! being acknowledged. (The property test found this.)
//!
//! Compaction trades recoverability for space: if the newest checkpoint later turns out corrupt
//! and restore falls back to an older one, the log after that older one must still be there.
//! Otherwise restore fails loudly with `Corrupt` ("log starts at …" or "gap …") rather than
//! silently losing operations. A cautious caller compacts up to its *previous* checkpoint. Old
//! checkpoints are not deleted by this layer.
//!
//! # Durability
//!
//! An `Ok` from `append`, `fence` or `put_checkpoint` means the object store acknowledged a
//! complete, create-once object:
//! - **S3 / GCS / Azure**: the provider's durability for an acknowledged PUT.
//! - **file://** ([`LocalFileSystem`]): object_store writes a staging file and hard-links it into
//!   place (`PutMode::Create`), so a reader never sees a partial object and the write survives a
//!   process crash or `kill -9` (the data is in the OS page cache). object_store itself does
//!   **not** fsync, so by itself it does not survive power loss or a kernel crash. This module
//!   therefore fsyncs the new file and its directory (and, once per process, each directory up
//!   to the store root) before returning `Ok`, which makes local objects durable on filesystems
//!   that honour fsync. Deletions (compaction) are not fsynced: a resurrected old segment is
//!   harmless. If the disk lies about flushes, a torn object fails its tag on read.
//! - **memory://** ([`InMemory`]): process-local, lost at exit. For tests and demos only.
//!
//! # URLs ([`Store::open`])
//!
//! - `file:///abs/path`, or `file://relative/path` (relative to the process cwd, e.g. the
//!   default `file://./data/shared`); the directory is created. No percent-decoding; no host
//!   part (`file://localhost/x` means the relative path `localhost/x`).
//! - `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`: options come from
//!   the standard environment (`AWS_*`, `GOOGLE_*`, `AZURE_*`, via the builders' `from_env`)
//!   and are overridden by [`Store::open_with_options`] (keys as object_store spells them, e.g.
//!   `aws_endpoint`, `aws_allow_http`, `aws_region`, `aws_access_key_id`). A local
//!   S3-compatible server works with `AWS_ENDPOINT=http://127.0.0.1:PORT AWS_ALLOW_HTTP=true`.
//!   S3 `PutMode::Create` uses `If-None-Match: *` (object_store's default
//!   `aws_conditional_put=etag`); a server without conditional PUT support cannot fence.
//! - `memory://NAME`: one in-memory store per NAME per process, shared by every `open` of the
//!   same URL (so several in-process nodes can share it). [`Store::in_memory`] makes a private
//!   one.
//!
//! [`PutMode::Create`]: object_store::PutMode::Create
//! [`LocalFileSystem`]: object_store::local::LocalFileSystem
//! [`InMemory`]: object_store::memory::InMemory

mod blobs;
mod checkpoint;
#[cfg(feature = "fault-injection")]
pub mod faulty;
mod format;
pub mod keys;
mod log;
pub(crate) mod open;
mod seal;

#[cfg(test)]
mod tests;

/// One key ring for every store a test opens, so that two opens of one URL read each other.
#[cfg(test)]
pub(crate) fn test_keys() -> Arc<dyn KeyProvider> {
    static KEYS: std::sync::OnceLock<Arc<KeyRing>> = std::sync::OnceLock::new();
    #[allow(clippy::unwrap_used)]
    let keys = KEYS.get_or_init(|| Arc::new(KeyRing::ephemeral().unwrap()));
    keys.clone()
}

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutPayload};

use format::{Header, Kind};
pub use keys::{DataKey, KeyError, KeyId, KeyProvider, KeyRing};

/// How many times [`Store::fence`] re-reads the log end after losing the race for it.
pub const MAX_FENCE_ATTEMPTS: u32 = 64;

/// Errors from the storage layer. Each says what it means for the caller's state.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The storage URL (or one of its options) is unusable; nothing was opened.
    #[error("bad storage URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The object this write wanted to create (log seq or checkpoint `(epoch, seq)`) already
    /// exists with different contents: a newer owner fenced the log, or another writer raced
    /// this one. Nothing was written; the operation is NOT durable and must not be acknowledged.
    #[error(
        "shard {shard}: seq {seq} is already taken (fenced by a newer owner, or a racing writer)"
    )]
    Fenced { shard: u32, seq: u64 },
    /// An object that must be read is damaged or forged (short, wrong magic/version, failing
    /// its AEAD tag, sealed with an unknown key, header not matching its name) or the log it
    /// belongs to has a gap, an overlap or an epoch going backwards. Nothing was changed;
    /// restoring this shard needs an operator.
    #[error("corrupt storage object {path}: {reason}")]
    Corrupt { path: String, reason: String },
    /// The arguments cannot describe a valid write (seq 0, count 0, seq overflow). Nothing was
    /// written.
    #[error("invalid storage request: {0}")]
    Invalid(String),
    /// `fence` lost the race for the log end [`MAX_FENCE_ATTEMPTS`] times: another writer keeps
    /// appending (its lease should have expired). The log is unchanged apart from that writer's
    /// segments; calling `fence` again is safe.
    #[error("shard {shard}: could not fence the log after {attempts} attempts: another writer keeps appending")]
    FenceContended { shard: u32, attempts: u32 },
    /// The object store failed (network, permissions, ...). The write may or may not have
    /// happened: retry with the same arguments (see the module docs, caller contract 4).
    #[error(transparent)]
    Store(#[from] object_store::Error),
    /// A blob with this name already exists with different contents; nothing was written.
    #[error("blob {0:?} already exists with different contents")]
    Exists(String),
    /// The payload cannot be sealed (larger than one AES-GCM message, about 64 GiB, or no
    /// random numbers from the OS for its nonce). Nothing was written.
    #[error("cannot seal {path}: {reason}")]
    Seal { path: String, reason: String },
    /// Flushing a local (`file://`) object to disk failed. The object exists but may not survive
    /// power loss; retrying the same write returns `Ok` once the flush succeeds.
    #[error("fsync of {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A log segment as read back: `count` records with seqs `first_seq..first_seq + count`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Epoch of the owner that wrote it.
    pub epoch: u64,
    pub first_seq: u64,
    pub count: u64,
    /// A fence segment: written by [`Store::fence`], count 1, empty `records`; it marks where
    /// `epoch` took over.
    pub fence: bool,
    /// The opaque payload given to [`Store::append`].
    pub records: Bytes,
}

impl Segment {
    /// One past the last seq in this segment.
    pub fn end(&self) -> u64 {
        self.first_seq.saturating_add(self.count)
    }

    /// How many leading records of this segment have seqs `<= after_seq` (already covered by a
    /// checkpoint at `after_seq`), i.e. must be skipped when replaying after it.
    pub fn records_to_skip(&self, after_seq: u64) -> u64 {
        after_seq
            .saturating_add(1)
            .saturating_sub(self.first_seq)
            .min(self.count)
    }
}

/// A checkpoint as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub epoch: u64,
    /// The last log seq the snapshot covers.
    pub seq: u64,
    pub snapshot: Bytes,
}

/// What restore had to step over. The caller counts these in its metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Corrupt checkpoint objects skipped on the way to the one used.
    pub skipped_corrupt: usize,
    /// Their paths, for the log line.
    pub skipped_paths: Vec<String>,
}

/// Everything a new owner needs to rebuild a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restore {
    /// The newest valid checkpoint of the highest epoch that has one.
    pub checkpoint: Option<Checkpoint>,
    /// The log after the checkpoint's seq (after 0 without one), in seq order, fences included.
    /// The first segment may start at or before the checkpoint's seq: see
    /// [`Segment::records_to_skip`].
    pub segments: Vec<Segment>,
    /// The next free log seq (what `fence` would claim now).
    pub log_end: u64,
    pub report: RestoreReport,
}

/// A handle on the shard storage; cheap to clone (an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// Prefix every object name starts with (empty for file:// and memory://, whose prefix is
    /// the store's root).
    root: Path,
    /// For file:// stores: the directory the store is rooted at, to fsync written objects.
    local: Option<Arc<LocalSync>>,
    /// The data keys every object is sealed and opened with.
    keys: Arc<dyn KeyProvider>,
    /// Bench-only: frame objects without sealing (see `seal::baseline`).
    #[cfg(feature = "bench-baseline")]
    baseline: bool,
}

/// fsync bookkeeping of a file:// store.
#[derive(Debug)]
struct LocalSync {
    dir: PathBuf,
    /// Directories whose entry in their parent is known to be on disk.
    synced_dirs: parking_lot::Mutex<HashSet<PathBuf>>,
}

/// Outcome of a create-once put.
enum Created {
    /// Created now, or an identical object was already there (a retry of the same write).
    Ok,
    /// A different object holds the name.
    Taken,
}

impl Store {
    /// A private, empty in-memory store (tests, demos), sealing with a fresh random key that
    /// lives as long as the process.
    ///
    /// # Panics
    ///
    /// If the operating system has no random numbers for the key.
    pub fn in_memory() -> Store {
        #[allow(clippy::expect_used)]
        let keys = KeyRing::ephemeral().expect("random numbers for an ephemeral data key");
        Store::in_memory_with_keys(Arc::new(keys))
    }

    /// A private, empty in-memory store sealing with `keys`.
    pub fn in_memory_with_keys(keys: Arc<dyn KeyProvider>) -> Store {
        Store::from_parts(
            Arc::new(object_store::memory::InMemory::new()),
            Path::default(),
            None,
            keys,
        )
    }

    fn from_parts(
        inner: Arc<dyn ObjectStore>,
        root: Path,
        local: Option<Arc<LocalSync>>,
        keys: Arc<dyn KeyProvider>,
    ) -> Store {
        Store {
            inner,
            root,
            local,
            keys,
            #[cfg(feature = "bench-baseline")]
            baseline: false,
        }
    }

    /// Bench-only: this store without sealing, objects framed as before encryption at rest
    /// (header + unkeyed xxh3), so a bench can measure what sealing costs. A node never uses it.
    #[cfg(feature = "bench-baseline")]
    pub fn unsealed_baseline(mut self) -> Store {
        self.baseline = true;
        self
    }

    /// The name `path` is sealed under: relative to the store root, so that a whole store can be
    /// copied to another bucket or prefix, while an object moved within it is refused.
    fn location(&self, path: &Path) -> String {
        match path.prefix_match(&self.root) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.to_string(),
        }
    }

    /// `header` + `payload` as stored: sealed with the current data key and a fresh nonce.
    fn seal(&self, path: &Path, header: &Header, payload: &[u8]) -> Result<Bytes, StorageError> {
        #[cfg(feature = "bench-baseline")]
        if self.baseline {
            return Ok(seal::baseline::frame(header, payload));
        }
        let failed = |reason: String| StorageError::Seal {
            path: path.to_string(),
            reason,
        };
        let mut nonce = [0u8; format::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| failed("no random numbers from the operating system".to_string()))?;
        let key = self.keys.current();
        let sealed = seal::seal(header, &self.location(path), payload, key, nonce)
            .map_err(|e| failed(e.to_string()))?;
        metrics::counter!(crate::metrics::STORAGE_SEALED_OBJECTS).increment(1);
        Ok(sealed)
    }

    /// Opens a stored object; a refusal is counted (by reason) and logged, never returned as
    /// data.
    fn open_object(
        &self,
        path: &Path,
        object: Bytes,
        kind: Kind,
    ) -> Result<(Header, Bytes), String> {
        #[cfg(feature = "bench-baseline")]
        let opened = if self.baseline {
            seal::baseline::unframe(object, kind)
        } else {
            seal::open(object, kind, &self.location(path), self.keys.as_ref())
        };
        #[cfg(not(feature = "bench-baseline"))]
        let opened = seal::open(object, kind, &self.location(path), self.keys.as_ref());
        opened.map_err(|refused| {
            metrics::counter!(crate::metrics::STORAGE_REJECTED_OBJECTS, "reason" => refused.reason())
                .increment(1);
            tracing::warn!(%path, reason = refused.reason(), error = %refused, "refused a storage object");
            refused.to_string()
        })
    }

    fn shard_prefix(&self, shard: u32) -> Path {
        self.root.child("shards").child(format!("{shard:05}"))
    }

    /// Creates `path` holding `header` + `payload` with `PutMode::Create`. On `AlreadyExists`,
    /// compares the existing object with ours: identical means an earlier attempt of this same
    /// write landed (retry after an ambiguous failure), so it is `Ok`.
    async fn create(
        &self,
        path: &Path,
        header: Header,
        payload: Bytes,
    ) -> Result<Created, StorageError> {
        let body = PutPayload::from(self.seal(path, &header, &payload)?);
        match self
            .inner
            .put_opts(path, body, PutMode::Create.into())
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Nonces are random, so a retry's bytes differ from the first attempt's: compare
                // what they say, not how they are sealed. An object that does not open is not ours.
                let existing = self.inner.get(path).await?.bytes().await?;
                let same = self
                    .open_object(path, existing, header.kind)
                    .is_ok_and(|(h, p)| h == header && p == payload);
                if !same {
                    return Ok(Created::Taken);
                }
                tracing::debug!(%path, "create-once put found its own earlier write");
            }
            Err(e) => return Err(e.into()),
        }
        self.sync(path).await?;
        Ok(Created::Ok)
    }

    /// Reads a whole object and opens it (header, length, key, tag); `Ok(Err(reason))` if it is
    /// refused (damaged, forged, moved, or sealed with a key this store does not hold).
    async fn get_checked(
        &self,
        path: &Path,
        kind: Kind,
    ) -> Result<Result<(Header, Bytes), String>, StorageError> {
        let bytes = self.inner.get(path).await?.bytes().await?;
        Ok(self.open_object(path, bytes, kind))
    }

    /// fsyncs a just-written local object, its directory, and (once per process) the
    /// directories above it up to the store root.
    async fn sync(&self, path: &Path) -> Result<(), StorageError> {
        let Some(local) = self.local.clone() else {
            return Ok(());
        };
        let file = path
            .parts()
            .fold(local.dir.clone(), |p, part| p.join(part.as_ref()));
        let task = tokio::task::spawn_blocking(move || local.sync_file(&file));
        match task.await {
            Ok(r) => r,
            Err(e) => Err(StorageError::Sync {
                path: PathBuf::from(path.as_ref()),
                source: std::io::Error::other(e),
            }),
        }
    }
}

impl LocalSync {
    fn sync_file(&self, file: &std::path::Path) -> Result<(), StorageError> {
        let fsync = |p: &std::path::Path| {
            std::fs::File::open(p)
                .and_then(|f| f.sync_all())
                .map_err(|source| StorageError::Sync {
                    path: p.to_path_buf(),
                    source,
                })
        };
        fsync(file)?;
        // fsync(dir) makes dir's entries durable. The file's directory is synced every time (the
        // file is new); each ancestor only until one whose own entry is already known durable.
        let mut child = file;
        while let Some(dir) = child.parent() {
            fsync(dir)?;
            if child != file {
                self.synced_dirs.lock().insert(child.to_path_buf());
            }
            if dir == self.dir || self.synced_dirs.lock().contains(dir) {
                break;
            }
            child = dir;
        }
        Ok(())
    }
}

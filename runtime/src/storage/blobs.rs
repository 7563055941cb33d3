//! Named blobs outside the shards' logs: dataset partitions, job checkpoints and job results.
//!
//! Every blob is written create-once and sealed like log segments (kind 3), so a torn,
//! flipped, forged or moved object is reported as [`StorageError::Corrupt`], never returned as
//! data, and two writers of one name cannot silently overwrite each other: an
//! identical retry is `Ok`, different contents are [`StorageError::Fenced`]-like
//! [`StorageError::Exists`].

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;

use super::format::{Header, Kind};
use super::{Created, StorageError, Store};

impl Store {
    pub(super) fn blob_path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.clone(), |p, part| p.child(part))
    }

    /// Creates blob `key` (a `/`-separated name) holding `bytes`. An identical blob already
    /// there is `Ok` (a retry); a different one is [`StorageError::Exists`].
    pub async fn put_blob(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let header = Header {
            kind: Kind::Blob,
            fence: false,
            epoch: 0,
            seq: 0,
            count: 0,
        };
        match self.create(&self.blob_path(key), header, bytes).await? {
            Created::Ok => Ok(()),
            Created::Taken => Err(StorageError::Exists(key.to_string())),
        }
    }

    /// Reads blob `key` and opens it (see `seal.rs`); `Ok(None)` if there is no such blob.
    pub async fn get_blob(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let path = self.blob_path(key);
        match self.get_checked(&path, Kind::Blob).await {
            Ok(Ok((_, payload))) => Ok(Some(payload)),
            Ok(Err(reason)) => Err(StorageError::Corrupt {
                path: path.to_string(),
                reason,
            }),
            Err(StorageError::Store(object_store::Error::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Names (relative to the store root, `/`-separated) of every blob under `prefix`, sorted.
    pub async fn list_blobs(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let root = self.root.to_string();
        let mut names: Vec<String> = self
            .inner
            .list(Some(&self.blob_path(prefix)))
            .map_ok(|meta| {
                let full = meta.location.to_string();
                full.strip_prefix(&root)
                    .map(|s| s.trim_start_matches('/').to_string())
                    .unwrap_or(full)
            })
            .try_collect()
            .await?;
        names.sort();
        Ok(names)
    }

    /// Deletes blob `key`; a blob already gone is `Ok` (a retry).
    pub async fn delete_blob(&self, key: &str) -> Result<(), StorageError> {
        match self.inner.delete(&self.blob_path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every blob under `prefix` (an abandoned import, a finished job's checkpoints).
    /// Returns how many were deleted.
    pub async fn delete_blobs(&self, prefix: &str) -> Result<usize, StorageError> {
        let names = self.list_blobs(prefix).await?;
        for name in &names {
            self.delete_blob(name).await?;
        }
        Ok(names.len())
    }
}

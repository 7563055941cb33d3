//! Partition files on the node's local disk, read through memory maps: how a node trains on
//! more data than its memory.
//!
//! The first task that needs a stored partition (an uploaded or storage-imported dataset)
//! writes it to `{data_dir}/partitions/` one storage segment at a time
//! ([`tidepool_runtime::partition_file`]), checks it once, and maps it. Mapped pages are the
//! kernel's page cache: they count toward the node's resident memory only while mapped, so the
//! executor's byte-capped cache (`jobs.memory_budget_bytes / 2`) unmaps what it evicts, and a job
//! maps one partition per worker thread at a time. The files are a cache, not state: the
//! directory is emptied when the node starts, and a shard's files are deleted when it moves away.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// The directory of partition files.
#[derive(Debug, Clone)]
pub struct SpillDir {
    dir: PathBuf,
}

impl SpillDir {
    /// Empties (or creates) `dir`, mode 0700.
    pub fn open(dir: &Path) -> io::Result<Self> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(SpillDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The file of a dataset source's shard: `{dataset}-{source}-{shard}.tdds` (names are
    /// `[A-Za-z0-9_.-]`, so they make file names as they are).
    pub fn path(&self, dataset: &str, source: &str, shard: u32) -> PathBuf {
        let source: String = source
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self.dir.join(format!("{dataset}-{source}-{shard:05}.tdds"))
    }

    /// Deletes a partition file (gone already is fine).
    pub fn remove(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not delete a partition file");
            }
        }
    }
}

/// Maps a partition file read-only.
#[allow(unsafe_code)]
pub fn map(path: &Path) -> io::Result<Mmap> {
    let file = File::open(path)?;
    // SAFETY: the mapping is read-only and the file is private to this process: written whole
    // under a temporary name in a 0700 directory of the node's data dir, renamed into place,
    // and never written again (a rewrite creates a new file and renames it over the name, which
    // leaves this mapping on the old inode). Another process truncating it would break this;
    // the data dir is the node's own.
    unsafe { Mmap::map(&file) }
}

//! Storage fault injection (feature `fault-injection`, for tests and chaos runs): an
//! [`ObjectStore`] wrapper that fails and slows writes (and optionally fails reads) according to
//! a shared, runtime-updatable [`StorageFaults`] rule.
//!
//! With `TIDEPOOL_STORAGE_FAULT_FILE=PATH` in the environment, [`Store::open`] wraps every store
//! it opens in a [`FaultyStore`] driven by the JSON written to PATH:
//!
//! ```json
//! {"write_error_rate": 0.2, "write_delay_ms": 50, "read_error_rate": 0.0}
//! ```
//!
//! Every field is optional (0 when absent); an empty or missing file means no faults; a file that
//! does not parse is logged and the current rule kept. The file is read once when the store is
//! opened and then, if `open` ran inside a tokio runtime, polled every 100 ms by a watcher task
//! (one per file per process; every store opened with the same file shares its rule). The random
//! draws are seeded from `TIDEPOOL_FAULT_SEED` (0 if unset), so the same seed and the same
//! sequence of operations fail the same operations.
//!
//! What is injected:
//! - **Write errors**: `put`, `put_opts`, `put_multipart(_opts)` fail with probability
//!   `write_error_rate` with an [`object_store::Error::Generic`] *before* reaching the inner
//!   store, so nothing is written. The storage layer reports it as [`StorageError::Store`]
//!   (`append`, `fence`, `put_checkpoint`, `put_blob` fail: not durable, must not be
//!   acknowledged; retrying the same write is safe).
//! - **Slow writes**: each of those calls first sleeps `write_delay_ms` (also when it then fails).
//! - **Read errors**: `get*`, `head` and `list*` fail with probability `read_error_rate`.
//! - **Slow checkpoints**: a write of a checkpoint object (`*.ckpt`) first sleeps
//!   `checkpoint_delay_ms` more. While one sleeps, the file `PATH.checkpoint-in-flight` exists
//!   (PATH: the fault file), so a chaos harness can kill the process in the middle of a
//!   checkpoint write.
//!
//! Deletes, copies and renames are passed through untouched. Without the variable (or without
//! the feature) `open` returns the plain store.
//!
//! [`StorageError::Store`]: super::StorageError::Store

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::Store;

/// The environment variable naming the storage fault file.
pub const STORAGE_FAULT_FILE_ENV: &str = "TIDEPOOL_STORAGE_FAULT_FILE";

/// The environment variable holding the seed of the fault draws (shared with the network faults).
pub const FAULT_SEED_ENV: &str = "TIDEPOOL_FAULT_SEED";

/// How often the watcher re-reads the fault file.
const POLL: Duration = Duration::from_millis(100);

/// The storage faults to inject; also the JSON shape of the fault file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageFaultRule {
    /// Probability (0.0..=1.0) that a write fails without writing anything.
    pub write_error_rate: f64,
    /// Sleep this long before each write.
    pub write_delay_ms: u64,
    /// Probability (0.0..=1.0) that a read (get, head, list) fails.
    pub read_error_rate: f64,
    /// Sleep this much longer before writing a checkpoint object.
    pub checkpoint_delay_ms: u64,
}

#[derive(Debug)]
struct FaultState {
    rule: StorageFaultRule,
    rng: rand::rngs::StdRng,
    write_errors: u64,
    read_errors: u64,
    /// Delayed checkpoint writes in flight (the marker file exists while this is above 0).
    checkpoints_in_flight: u32,
}

impl FaultState {
    /// Draws whether an operation with failure probability `rate` fails. Out-of-range rates are
    /// clamped; NaN means never.
    fn roll(&mut self, rate: f64) -> bool {
        if rate.is_nan() || rate <= 0.0 {
            false
        } else if rate >= 1.0 {
            true
        } else {
            self.rng.random::<f64>() < rate
        }
    }
}

/// The current [`StorageFaultRule`], shared between whoever sets it (a test, the fault-file
/// watcher) and the [`FaultyStore`]s it drives. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StorageFaults {
    state: Arc<Mutex<FaultState>>,
    /// Exists while a delayed checkpoint write sleeps (fault-file rules only).
    marker: Option<Arc<PathBuf>>,
}

impl StorageFaults {
    /// No faults yet; draws seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        StorageFaults {
            state: Arc::new(Mutex::new(FaultState {
                rule: StorageFaultRule::default(),
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                write_errors: 0,
                read_errors: 0,
                checkpoints_in_flight: 0,
            })),
            marker: None,
        }
    }

    /// Replaces the rule; applies to operations that start from now on.
    pub fn set(&self, rule: StorageFaultRule) {
        self.state.lock().rule = rule;
    }

    /// Stops injecting faults.
    pub fn clear(&self) {
        self.set(StorageFaultRule::default());
    }

    /// The rule in force.
    pub fn rule(&self) -> StorageFaultRule {
        self.state.lock().rule
    }

    /// Write errors injected so far.
    pub fn injected_write_errors(&self) -> u64 {
        self.state.lock().write_errors
    }

    /// Read errors injected so far.
    pub fn injected_read_errors(&self) -> u64 {
        self.state.lock().read_errors
    }

    /// Applies the contents of a fault file: empty (or whitespace) means no faults. On a parse
    /// error the rule is left as it was.
    pub fn apply_file_text(&self, text: &str) -> Result<(), serde_json::Error> {
        let rule = if text.trim().is_empty() {
            StorageFaultRule::default()
        } else {
            serde_json::from_str(text)?
        };
        if self.rule() != rule {
            tracing::info!(?rule, "storage fault rule updated");
        }
        self.set(rule);
        Ok(())
    }

    /// The delay before a write, and whether it then fails.
    fn roll_write(&self) -> (Duration, bool) {
        let mut s = self.state.lock();
        let rate = s.rule.write_error_rate;
        let fail = s.roll(rate);
        if fail {
            s.write_errors += 1;
        }
        (Duration::from_millis(s.rule.write_delay_ms), fail)
    }

    /// A delayed checkpoint write starts sleeping: the marker file appears.
    fn checkpoint_started(&self) {
        let mut s = self.state.lock();
        s.checkpoints_in_flight += 1;
        if let Some(m) = &self.marker {
            let _ = std::fs::write(m.as_ref(), b"");
        }
    }

    /// A delayed checkpoint write woke up: the marker goes when none sleeps any more.
    fn checkpoint_ended(&self) {
        let mut s = self.state.lock();
        s.checkpoints_in_flight = s.checkpoints_in_flight.saturating_sub(1);
        if s.checkpoints_in_flight == 0 {
            if let Some(m) = &self.marker {
                let _ = std::fs::remove_file(m.as_ref());
            }
        }
    }

    /// Whether a read fails.
    fn roll_read(&self) -> bool {
        let mut s = self.state.lock();
        let rate = s.rule.read_error_rate;
        let fail = s.roll(rate);
        if fail {
            s.read_errors += 1;
        }
        fail
    }
}

fn injected(op: &str, location: &Path) -> object_store::Error {
    tracing::debug!(%location, op, "injecting a storage fault");
    object_store::Error::Generic {
        store: "FaultyStore",
        source: format!("injected {op} fault at {location}").into(),
    }
}

/// An [`ObjectStore`] that delegates to `inner` after injecting the faults of a
/// [`StorageFaults`] rule (see the module docs for which calls get which faults).
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: StorageFaults,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: StorageFaults) -> Self {
        FaultyStore { inner, faults }
    }

    async fn before_write(&self, location: &Path) -> object_store::Result<()> {
        let slow_checkpoint = Duration::from_millis(self.faults.rule().checkpoint_delay_ms);
        if location.as_ref().ends_with(".ckpt") && !slow_checkpoint.is_zero() {
            self.faults.checkpoint_started();
            tokio::time::sleep(slow_checkpoint).await;
            self.faults.checkpoint_ended();
        }
        let (delay, fail) = self.faults.roll_write();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if fail {
            return Err(injected("write", location));
        }
        Ok(())
    }

    fn before_read(&self, location: &Path) -> object_store::Result<()> {
        if self.faults.roll_read() {
            return Err(injected("read", location));
        }
        Ok(())
    }

    /// A failed listing, or `None` to pass the listing through.
    fn failed_list(
        &self,
        prefix: Option<&Path>,
    ) -> Option<BoxStream<'static, object_store::Result<ObjectMeta>>> {
        let root = Path::default();
        let e = self.before_read(prefix.unwrap_or(&root)).err()?;
        Some(futures::stream::once(async move { Err(e) }).boxed())
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put(&self, location: &Path, payload: PutPayload) -> object_store::Result<PutResult> {
        self.before_write(location).await?;
        self.inner.put(location, payload).await
    }

    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.before_write(location).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart(
        &self,
        location: &Path,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.before_write(location).await?;
        self.inner.put_multipart(location).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.before_write(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get(&self, location: &Path) -> object_store::Result<GetResult> {
        self.before_read(location)?;
        self.inner.get(location).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.before_read(location)?;
        self.inner.get_opts(location, options).await
    }

    async fn get_range(&self, location: &Path, range: Range<u64>) -> object_store::Result<Bytes> {
        self.before_read(location)?;
        self.inner.get_range(location, range).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.before_read(location)?;
        self.inner.get_ranges(location, ranges).await
    }

    async fn head(&self, location: &Path) -> object_store::Result<ObjectMeta> {
        self.before_read(location)?;
        self.inner.head(location).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn delete_stream<'a>(
        &'a self,
        locations: BoxStream<'a, object_store::Result<Path>>,
    ) -> BoxStream<'a, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        match self.failed_list(prefix) {
            Some(failed) => failed,
            None => self.inner.list(prefix),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        match self.failed_list(prefix) {
            Some(failed) => failed,
            None => self.inner.list_with_offset(prefix, offset),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.before_read(prefix.unwrap_or(&Path::default()))?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn rename(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.rename(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }

    async fn rename_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.rename_if_not_exists(from, to).await
    }
}

impl Store {
    /// This store with the faults of `faults` injected into its object store calls. A file://
    /// store keeps fsyncing what it writes.
    pub fn with_faults(mut self, faults: StorageFaults) -> Store {
        self.inner = Arc::new(FaultyStore::new(self.inner, faults));
        self
    }
}

/// Called by [`Store::open`]: wraps `store` if `TIDEPOOL_STORAGE_FAULT_FILE` is set.
pub(super) fn wrap_from_env(store: Store) -> Store {
    let path = std::env::var_os(STORAGE_FAULT_FILE_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    wrap_with(store, path.as_deref())
}

fn wrap_with(store: Store, fault_file: Option<&FsPath>) -> Store {
    match fault_file {
        Some(path) => store.with_faults(faults_for_file(path)),
        None => store,
    }
}

/// A fault file's rule and the task that keeps it up to date.
struct Watched {
    faults: StorageFaults,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

/// The rules of this process, one per fault file.
fn watched_files() -> &'static Mutex<HashMap<PathBuf, Watched>> {
    static FILES: OnceLock<Mutex<HashMap<PathBuf, Watched>>> = OnceLock::new();
    FILES.get_or_init(Default::default)
}

/// The rule driven by the fault file at `path`: read now, and kept up to date by a watcher task
/// when called inside a tokio runtime (respawned if the runtime it ran on is gone).
pub fn faults_for_file(path: &FsPath) -> StorageFaults {
    let mut files = watched_files().lock();
    let w = files.entry(path.to_path_buf()).or_insert_with(|| {
        let seed = std::env::var(FAULT_SEED_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut faults = StorageFaults::new(seed);
        faults.marker = Some(Arc::new(checkpoint_marker(path)));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Err(e) = faults.apply_file_text(&text) {
            tracing::warn!(error = %e, file = %path.display(), "unreadable storage fault file; no storage faults for now");
        }
        tracing::warn!(file = %path.display(), "storage fault injection enabled: applying the faults written to this file");
        Watched {
            faults,
            watcher: None,
        }
    });
    if w.watcher.as_ref().is_none_or(|h| h.is_finished()) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                w.watcher = Some(rt.spawn(watch(path.to_path_buf(), w.faults.clone())));
            }
            Err(_) => {
                tracing::debug!(file = %path.display(), "no tokio runtime: storage fault file read once");
            }
        }
    }
    w.faults.clone()
}

/// The file that exists while a delayed checkpoint write of the fault file `path` sleeps.
pub fn checkpoint_marker(path: &FsPath) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".checkpoint-in-flight");
    PathBuf::from(name)
}

async fn watch(path: PathBuf, faults: StorageFaults) {
    let mut last: Option<String> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let text = tokio::fs::read_to_string(&path).await.unwrap_or_default();
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        if let Err(e) = faults.apply_file_text(&text) {
            tracing::warn!(error = %e, file = %path.display(), "unreadable storage fault file; keeping the current storage faults");
        }
        last = Some(text);
    }
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::super::StorageError;
    use super::*;

    fn rule(write_error_rate: f64, write_delay_ms: u64, read_error_rate: f64) -> StorageFaultRule {
        StorageFaultRule {
            write_error_rate,
            write_delay_ms,
            read_error_rate,
            ..StorageFaultRule::default()
        }
    }

    #[tokio::test]
    async fn write_errors_fail_appends_until_cleared() {
        let faults = StorageFaults::new(1);
        let store = Store::in_memory().with_faults(faults.clone());
        store.append(3, 1, 1, 1, Bytes::from("a")).await.unwrap();

        faults.set(rule(1.0, 0, 0.0));
        for _ in 0..3 {
            let err = store
                .append(3, 1, 2, 1, Bytes::from("b"))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    StorageError::Store(object_store::Error::Generic { .. })
                ),
                "{err:?}"
            );
        }
        assert!(store.fence(3, 2).await.is_err());
        assert!(store
            .put_checkpoint(3, 1, 1, Bytes::from("ckpt"))
            .await
            .is_err());
        assert!(store.put_blob("x/y", Bytes::from("blob")).await.is_err());
        assert_eq!(faults.injected_write_errors(), 6);
        // Reads still work, and the failed writes left nothing behind.
        assert_eq!(store.log_end(3).await.unwrap(), 2);

        faults.clear();
        // Seq 2 is free: a different payload there is not `Fenced`.
        store.append(3, 1, 2, 1, Bytes::from("c")).await.unwrap();
        let log = store.read_log(3, 0).await.unwrap();
        let records: Vec<_> = log.iter().map(|s| s.records.clone()).collect();
        assert_eq!(records, [Bytes::from("a"), Bytes::from("c")]);
        assert_eq!(faults.injected_write_errors(), 6);
    }

    #[tokio::test]
    async fn read_errors_fail_reads_until_cleared() {
        let faults = StorageFaults::new(1);
        let store = Store::in_memory().with_faults(faults.clone());
        store.append(3, 1, 1, 1, Bytes::from("a")).await.unwrap();
        store.put_blob("b", Bytes::from("blob")).await.unwrap();

        faults.set(rule(0.0, 0, 1.0));
        assert!(store.read_log(3, 0).await.is_err());
        assert!(store.log_end(3).await.is_err());
        assert!(store.get_blob("b").await.is_err());
        assert!(store.latest_checkpoint(3).await.is_err());
        // Writes are unaffected.
        store.append(3, 1, 2, 1, Bytes::from("b")).await.unwrap();

        faults.clear();
        assert_eq!(store.read_log(3, 0).await.unwrap().len(), 2);
        assert_eq!(
            store.get_blob("b").await.unwrap(),
            Some(Bytes::from("blob"))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn write_delay_slows_writes() {
        let faults = StorageFaults::new(1);
        let store = Store::in_memory().with_faults(faults.clone());
        faults.set(rule(0.0, 50, 0.0));
        let start = tokio::time::Instant::now();
        store.append(3, 1, 1, 1, Bytes::from("a")).await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(50));
        let start = tokio::time::Instant::now();
        store.read_log(3, 0).await.unwrap();
        assert!(start.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn partial_rates_are_seeded() {
        let draws = |seed| {
            let f = StorageFaults::new(seed);
            f.set(rule(0.5, 0, 0.0));
            (0..64).map(|_| f.roll_write().1).collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7));
        assert!(a.iter().any(|&x| x) && a.iter().any(|&x| !x));
        let f = StorageFaults::new(0);
        f.set(rule(f64::NAN, 0, -1.0));
        assert!(!f.roll_write().1 && !f.roll_read());
    }

    #[test]
    fn file_text_parses_and_keeps_rule_on_garbage() {
        let f = StorageFaults::new(0);
        f.apply_file_text(r#"{"write_error_rate":0.2,"write_delay_ms":50,"read_error_rate":0.0}"#)
            .unwrap();
        assert_eq!(f.rule(), rule(0.2, 50, 0.0));
        f.apply_file_text(r#"{"write_delay_ms":5}"#).unwrap();
        assert_eq!(f.rule(), rule(0.0, 5, 0.0));
        assert!(f.apply_file_text("{not json").is_err());
        assert_eq!(f.rule(), rule(0.0, 5, 0.0));
        f.apply_file_text("  \n").unwrap();
        assert_eq!(f.rule(), StorageFaultRule::default());
    }

    #[test]
    fn no_fault_file_means_no_wrapper() {
        let store = wrap_with(Store::in_memory(), None);
        assert!(!store.inner.to_string().starts_with("FaultyStore"));
    }

    /// The open path: a file:// store (fsync included) driven by a fault file the test rewrites.
    #[tokio::test]
    async fn fault_file_drives_a_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node-1.storage.json");
        std::fs::write(&file, r#"{"write_error_rate":1.0}"#).unwrap();
        let plain = Store::open(
            &format!("file://{}/store", dir.path().display()),
            super::super::test_keys(),
        )
        .unwrap();
        let store = wrap_with(plain, Some(&file));
        assert!(store.inner.to_string().starts_with("FaultyStore"));
        assert!(store.local.is_some());
        // Read synchronously at open: faults apply from the first write.
        assert!(store.append(1, 1, 1, 1, Bytes::from("a")).await.is_err());

        // Emptying the file heals the store within a few polls.
        std::fs::write(&file, "").unwrap();
        let healed = async {
            while store.append(1, 1, 1, 1, Bytes::from("a")).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), healed)
            .await
            .expect("faults cleared");
        assert!(dir.path().join("store/shards/00001/log").is_dir());

        // Faults come back when the file is rewritten, and go when it is removed.
        std::fs::write(&file, r#"{"write_error_rate":1.0,"write_delay_ms":1}"#).unwrap();
        let faults = faults_for_file(&file);
        let updated = async {
            while faults.rule() != rule(1.0, 1, 0.0) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), updated)
            .await
            .expect("faults updated");
        assert!(store.append(1, 1, 2, 1, Bytes::from("b")).await.is_err());
        std::fs::remove_file(&file).unwrap();
        let removed = async {
            while faults.rule() != StorageFaultRule::default() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), removed)
            .await
            .expect("faults removed");
        store.append(1, 1, 2, 1, Bytes::from("b")).await.unwrap();
    }

    /// A slowed checkpoint write is visible from outside the process while it sleeps (the chaos
    /// harness kills a node in the middle of one), and only checkpoint objects are slowed.
    #[tokio::test]
    async fn a_slow_checkpoint_write_shows_its_marker_while_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node-2.storage.json");
        std::fs::write(&file, r#"{"checkpoint_delay_ms":400}"#).unwrap();
        let store = wrap_with(Store::in_memory(), Some(&file));
        let marker = checkpoint_marker(&file);
        // A log append is not slowed and leaves no marker.
        store.append(3, 1, 1, 1, Bytes::from("a")).await.unwrap();
        assert!(!marker.exists());
        let write = tokio::spawn({
            let store = store.clone();
            async move { store.put_checkpoint(3, 1, 1, Bytes::from("snap")).await }
        });
        let seen = async {
            while !marker.exists() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), seen)
            .await
            .expect("marker while the checkpoint write sleeps");
        write.await.unwrap().unwrap();
        assert!(
            !marker.exists(),
            "marker removed once the write went through"
        );
        assert!(store.latest_checkpoint(3).await.unwrap().is_some());
    }
}

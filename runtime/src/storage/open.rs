//! Turning a storage URL into a [`Store`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;

use super::{KeyProvider, LocalSync, StorageError, Store};

/// `memory://NAME` stores of this process.
fn memory_stores() -> &'static parking_lot::Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<parking_lot::Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

impl Store {
    /// Opens the store at `url` (see the module docs for the forms), taking cloud options from
    /// the environment. Every object is sealed and opened with `keys`.
    pub fn open(url: &str, keys: Arc<dyn KeyProvider>) -> Result<Store, StorageError> {
        Self::open_with_options(url, &[], keys)
    }

    /// Like [`Store::open`], with object_store config options (e.g. `("aws_endpoint",
    /// "http://127.0.0.1:9000")`) that override the environment. Unknown keys are an error;
    /// `file://` and `memory://` take no options.
    pub fn open_with_options(
        url: &str,
        options: &[(String, String)],
        keys: Arc<dyn KeyProvider>,
    ) -> Result<Store, StorageError> {
        let bad = |reason: String| StorageError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(
                "expected SCHEME://..., with scheme file, s3, gs, az or memory".to_string(),
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(bad(
                "query strings and fragments are not supported".to_string()
            ));
        }
        let store = match scheme {
            "file" | "memory" if !options.is_empty() => {
                Err(bad(format!("{scheme}:// URLs take no options")))
            }
            "file" => open_local(rest, keys).map_err(bad),
            "memory" => Ok(open_memory(rest, keys)),
            "s3" | "gs" | "az" => open_cloud(scheme, rest, options, keys).map_err(bad),
            other => Err(bad(format!(
                "unsupported scheme {other:?}: expected file, s3, gs, az or memory"
            ))),
        }?;
        // Chaos hook: inject storage faults when TIDEPOOL_STORAGE_FAULT_FILE is set.
        #[cfg(feature = "fault-injection")]
        let store = super::faulty::wrap_from_env(store);
        Ok(store)
    }
}

fn open_memory(name: &str, keys: Arc<dyn KeyProvider>) -> Store {
    let store = Arc::clone(memory_stores().lock().entry(name.to_string()).or_default());
    Store::from_parts(store, Path::default(), None, keys)
}

fn open_local(rest: &str, keys: Arc<dyn KeyProvider>) -> Result<Store, String> {
    if rest.is_empty() {
        return Err("empty path: use file:///absolute/path or file://relative/path".to_string());
    }
    let dir = PathBuf::from(rest);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| e.to_string())?;
    let dir = std::fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // The root's own entry: create_dir_all may just have made it. Best effort, like the
    // directories below it (see `LocalSync`), but a failure here means fsync does not work here.
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("cannot fsync {}: {e}", parent.display()))?;
    }
    let local = LocalSync {
        dir,
        synced_dirs: Default::default(),
    };
    Ok(Store::from_parts(
        Arc::new(fs),
        Path::default(),
        Some(Arc::new(local)),
        keys,
    ))
}

fn open_cloud(
    scheme: &str,
    rest: &str,
    options: &[(String, String)],
    keys: Arc<dyn KeyProvider>,
) -> Result<Store, String> {
    let (inner, root) = cloud_store(scheme, rest, options)?;
    Ok(Store::from_parts(inner, root, None, keys))
}

/// The raw object store of `scheme://rest` (`s3`, `gs` or `az`: the bucket is the part of `rest`
/// before the first `/`) and the prefix after the bucket, with cloud options from the
/// environment overridden by `options`. Shared by the node's store and the sources that
/// `dataset import` reads (`crate::ingest`).
pub(crate) fn cloud_store(
    scheme: &str,
    rest: &str,
    options: &[(String, String)],
) -> Result<(Arc<dyn ObjectStore>, Path), String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!(
            "missing bucket: use {scheme}://BUCKET/optional/prefix"
        ));
    }
    let prefix = prefix.trim_matches('/');
    let root = Path::parse(prefix).map_err(|e| format!("bad prefix {prefix:?}: {e}"))?;
    let base = format!("{scheme}://{bucket}");
    let unknown = |k: &str| format!("unknown {scheme} option {k:?}");
    let inner: Arc<dyn ObjectStore> = match scheme {
        "s3" => {
            let mut b = AmazonS3Builder::from_env().with_url(base);
            for (k, v) in options {
                let key: AmazonS3ConfigKey = k.parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(base);
            for (k, v) in options {
                let key: GoogleConfigKey = k.parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        "az" => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(base);
            for (k, v) in options {
                let key: AzureConfigKey = k.parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| e.to_string())?)
        }
        other => return Err(format!("unsupported scheme {other:?}")),
    };
    Ok((inner, root))
}

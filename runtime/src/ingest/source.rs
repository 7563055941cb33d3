//! Where an import reads from: a URL (`file://`, `s3://`, `gs://`, `az://`) naming one object,
//! a prefix, or a glob in its last part, resolved to a sorted list of files.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;

use super::IngestError;
use tidepool_core::control::Format;

/// A source's files, in path order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Path under the source root (what a split records).
    pub path: String,
    pub size: u64,
}

/// An opened source: the store its URL names and the root the file paths are relative to.
#[derive(Debug, Clone)]
pub struct Source {
    store: Arc<dyn ObjectStore>,
    /// The URL's fixed part: the bucket prefix or directory before any glob.
    root: Path,
    /// The glob over paths under `root`, if the URL had one.
    glob: Option<globset::GlobMatcher>,
    url: String,
}

/// True for a path part with glob syntax.
fn is_glob(part: &str) -> bool {
    part.contains(['*', '?', '[', '{'])
}

/// Whether `url` (a file:// URL already resolved, or a cloud one) is under one of `allowed`.
fn allowed_by(url: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|prefix| {
        match (url.strip_prefix("file://"), prefix.strip_prefix("file://")) {
            // Paths compare by whole components, after resolving the prefix's own links.
            (Some(path), Some(root)) => {
                let root =
                    std::fs::canonicalize(root).unwrap_or_else(|_| std::path::PathBuf::from(root));
                std::path::Path::new(path).starts_with(root)
            }
            (None, None) => url.starts_with(prefix.as_str()),
            _ => false,
        }
    })
}

impl Source {
    /// Opens `url` if it is under one of the `allowed` URL prefixes (`jobs.import_urls`); cloud
    /// options come from the environment (as for `storage.url`). A `file://` URL is checked
    /// after resolving `..` and links, so it cannot step out of an allowed directory.
    pub fn open(url: &str, allowed: &[String]) -> Result<Source, IngestError> {
        let bad = |reason: String| IngestError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad("expected SCHEME://..., with scheme file, s3, gs or az".to_string())
        })?;
        if rest.contains(['?', '#']) {
            return Err(bad("query strings and fragments are not supported".into()));
        }
        // Split off the first part with glob syntax and everything after it.
        let parts: Vec<&str> = rest.split('/').collect();
        let first_glob = parts.iter().position(|p| is_glob(p));
        let (fixed, pattern) = match first_glob {
            Some(i) => (parts[..i].join("/"), Some(parts[i..].join("/"))),
            None => (rest.to_string(), None),
        };
        let glob = pattern
            .map(|p| {
                globset::GlobBuilder::new(&p)
                    .literal_separator(true)
                    .build()
                    .map(|g| g.compile_matcher())
                    .map_err(|e| bad(format!("bad glob {p:?}: {e}")))
            })
            .transpose()?;
        let resolved = match scheme {
            "file" => {
                if !fixed.starts_with('/') {
                    return Err(bad("use an absolute path: file:///dir/file".into()));
                }
                let real =
                    std::fs::canonicalize(&fixed).map_err(|e| bad(format!("{fixed}: {e}")))?;
                format!("file://{}", real.display())
            }
            _ => format!("{scheme}://{fixed}"),
        };
        if !allowed_by(&resolved, allowed) {
            return Err(bad(format!(
                "imports may read only under jobs.import_urls ({}); {resolved} is not",
                if allowed.is_empty() {
                    "none configured".to_string()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        let fixed = resolved
            .split_once("://")
            .map_or(fixed.clone(), |(_, rest)| rest.to_string());
        let (store, root): (Arc<dyn ObjectStore>, Path) = match scheme {
            "file" => {
                let fs = LocalFileSystem::new();
                let root = Path::from_absolute_path(&fixed)
                    .map_err(|e| bad(format!("bad path {fixed:?}: {e}")))?;
                (Arc::new(fs), root)
            }
            "s3" | "gs" | "az" => {
                crate::storage::open::cloud_store(scheme, &fixed, &[]).map_err(bad)?
            }
            other => {
                return Err(bad(format!(
                    "unsupported scheme {other:?}: expected file, s3, gs or az"
                )))
            }
        };
        Ok(Source {
            store,
            root,
            glob,
            url: url.to_string(),
        })
    }

    /// The URL it was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object store under it.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object path of a file.
    pub fn object_path(&self, file: &SourceFile) -> Path {
        self.path_of(&file.path)
    }

    /// The object path of the file at `path` (a split's file).
    pub fn path_of(&self, path: &str) -> Path {
        if path.is_empty() {
            return self.root.clone();
        }
        path.split('/')
            .fold(self.root.clone(), |p, part| p.child(part))
    }

    /// The files to import, in path order: with a glob, every object under the root it matches;
    /// without, the object the URL names, or else every object under it as a prefix. Names
    /// starting with `.` or `_` (`_SUCCESS`, `.crc` files of Spark and Hadoop) are skipped, and
    /// so are files whose extension is not `ext` when reading a prefix or glob.
    pub async fn files(&self, exts: &[&str]) -> Result<Vec<SourceFile>, IngestError> {
        let err = |e: object_store::Error| IngestError::Source {
            url: self.url.clone(),
            reason: e.to_string(),
        };
        if self.glob.is_none() {
            match self.store.head(&self.root).await {
                Ok(meta) => {
                    return Ok(vec![SourceFile {
                        path: String::new(),
                        size: meta.size,
                    }])
                }
                Err(object_store::Error::NotFound { .. }) => {}
                // A directory on a local file system answers `head` with an error of its own.
                Err(_) if self.url.starts_with("file://") => {}
                Err(e) => return Err(err(e)),
            }
        }
        let metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&self.root))
            .try_collect()
            .await
            .map_err(err)?;
        let mut files: Vec<SourceFile> = metas
            .into_iter()
            .filter_map(|m| {
                let rel: Vec<String> = m
                    .location
                    .prefix_match(&self.root)?
                    .map(|p| p.as_ref().to_string())
                    .collect();
                let rel = rel.join("/");
                let name = rel.rsplit('/').next().unwrap_or(&rel);
                let hidden = rel.split('/').any(|p| p.starts_with(['.', '_']));
                let wanted = match &self.glob {
                    Some(g) => g.is_match(&rel),
                    None => name
                        .rsplit_once('.')
                        .is_some_and(|(_, e)| exts.contains(&e.to_ascii_lowercase().as_str())),
                };
                (!hidden && wanted && !rel.is_empty()).then_some(SourceFile {
                    path: rel,
                    size: m.size,
                })
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        if files.is_empty() {
            return Err(IngestError::NoFiles {
                url: self.url.clone(),
            });
        }
        Ok(files)
    }

    /// Bytes `start..end` of the file at `path`.
    pub async fn read_range(
        &self,
        path: &str,
        start: u64,
        end: u64,
    ) -> Result<bytes::Bytes, IngestError> {
        self.store
            .get_range(&self.path_of(path), start..end)
            .await
            .map_err(|e| IngestError::Source {
                url: self.display(path),
                reason: e.to_string(),
            })
    }

    /// A file's name for messages: the URL for a single-object source, else its path.
    pub fn display(&self, path: &str) -> String {
        if path.is_empty() {
            self.url.clone()
        } else {
            path.to_string()
        }
    }
}

/// The format a file name's extension implies.
pub fn format_of(url: &str) -> Option<tidepool_core::control::Format> {
    let last = url.rsplit('/').next().unwrap_or(url);
    let ext = last.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase())?;
    [Format::Parquet, Format::Csv, Format::Arrow, Format::Libsvm]
        .into_iter()
        .find(|f| extensions(*f).contains(&ext.as_str()))
}

/// The file extensions of `format` (a prefix import reads the files that have one of them).
pub fn extensions(format: Format) -> &'static [&'static str] {
    match format {
        Format::Parquet => &["parquet", "pq"],
        Format::Csv => &["csv"],
        Format::Arrow => &["arrow", "feather", "ipc"],
        Format::Libsvm => &["libsvm", "svm", "svmlight"],
    }
}

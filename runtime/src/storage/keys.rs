//! Cluster data keys: the AES-256-GCM keys that seal every storage object at rest.
//!
//! A [`KeyProvider`] hands out the key new objects are sealed with ([`KeyProvider::current`])
//! and, by id, every key an existing object may have been sealed with ([`KeyProvider::get`]).
//! The default provider is a [`KeyRing`] loaded from a key file. A KMS or Vault provider fits the
//! same trait: it would unwrap its data keys at startup (envelope encryption) and keep them in
//! memory, so that sealing and opening never wait on the network.
//!
//! # Key file
//!
//! TOML, mode 0600, made by `tidepool certs init` (`data.key` next to `ca.key`) and copied into
//! every node's certificate directory by `tidepool certs issue --node`:
//!
//! ```toml
//! # The key new objects are sealed with.
//! current = 2
//!
//! [[keys]]
//! id = 1
//! secret = "64 hex digits: 32 random bytes"
//!
//! [[keys]]
//! id = 2
//! secret = "…"
//! ```
//!
//! Ids are `u32`, unique within the file, and recorded in every object's header. A key must stay
//! in the file for as long as objects sealed with it are to be read: removing it makes them
//! unreadable (refused as `unknown_key`).
//!
//! # Rotation
//!
//! Two rolling restarts, so that no node writes with a key another node cannot read yet:
//! 1. Add the new key (`tidepool certs rotate-data-key --ca DIR` appends one with the next id and
//!    leaves `current` alone), copy the file to every node, restart them one by one.
//! 2. Set `current` to the new id, copy the file again, restart them one by one. New objects are
//!    sealed with the new key; old ones stay readable under theirs.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Bytes of a data key (AES-256).
pub const KEY_LEN: usize = 32;

/// Which data key sealed an object; stored in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One AES-256-GCM data key. `Debug` shows the id only.
pub struct DataKey {
    id: KeyId,
    key: LessSafeKey,
}

impl DataKey {
    /// A key with id `id` from 32 secret bytes.
    pub fn new(id: KeyId, secret: &[u8; KEY_LEN]) -> Result<DataKey, KeyError> {
        let unbound = UnboundKey::new(&AES_256_GCM, secret).map_err(|_| KeyError::Crypto)?;
        Ok(DataKey {
            id,
            key: LessSafeKey::new(unbound),
        })
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub(crate) fn aead(&self) -> &LessSafeKey {
        &self.key
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Where the storage layer gets its data keys.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    /// The key new objects are sealed with.
    fn current(&self) -> &DataKey;
    /// The key with `id`, for opening an object; `None` if this provider does not know it (a
    /// retired key, or an object from another cluster).
    fn get(&self, id: KeyId) -> Option<&DataKey>;
}

/// Errors from reading, parsing or writing a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("data key file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data key file {} already exists; refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("malformed data key file: {0}")]
    Malformed(String),
    #[error("data key file lists no keys")]
    Empty,
    #[error("data key id {0} appears twice")]
    DuplicateId(KeyId),
    #[error("data key {id}: secret must be {} hex digits ({KEY_LEN} bytes)", KEY_LEN * 2)]
    BadSecret { id: KeyId },
    #[error("`current = {0}` names no key in the file")]
    NoCurrent(KeyId),
    #[error("no random numbers from the operating system")]
    Random,
    #[error("the AES-256-GCM key could not be set up")]
    Crypto,
}

/// The key file as written (see the module docs).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    current: u32,
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: u32,
    secret: String,
}

const FILE_COMMENT: &str =
    "# Tidepool cluster data key file: the AES-256-GCM keys that seal storage objects at\n\
# rest. Secret: keep it mode 0600, give it to nodes only. `current` seals new objects; every\n\
# key listed stays readable. Rotation: README.md, \"Encryption at rest\".\n";

/// The key-file [`KeyProvider`]: several keys by id, one of them current.
#[derive(Debug)]
pub struct KeyRing {
    current: KeyId,
    keys: BTreeMap<KeyId, DataKey>,
}

impl KeyRing {
    /// Parses key file text (pure).
    pub fn parse(text: &str) -> Result<KeyRing, KeyError> {
        let file: KeyFile = toml::from_str(text).map_err(|e| KeyError::Malformed(e.to_string()))?;
        if file.keys.is_empty() {
            return Err(KeyError::Empty);
        }
        let mut keys = BTreeMap::new();
        for entry in &file.keys {
            let id = KeyId(entry.id);
            let secret = decode_hex(&entry.secret).ok_or(KeyError::BadSecret { id })?;
            if keys.insert(id, DataKey::new(id, &secret)?).is_some() {
                return Err(KeyError::DuplicateId(id));
            }
        }
        let current = KeyId(file.current);
        if !keys.contains_key(&current) {
            return Err(KeyError::NoCurrent(current));
        }
        Ok(KeyRing { current, keys })
    }

    /// Reads and parses the key file at `path`.
    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        warn_if_readable_by_others(path);
        KeyRing::parse(&text)
    }

    /// A ring of one fresh random key with id 1, never written anywhere (in-memory stores of
    /// tests and demos).
    pub fn ephemeral() -> Result<KeyRing, KeyError> {
        KeyRing::parse(&new_key_file_text()?)
    }

    /// Ids of every key, ascending.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.keys().copied().collect()
    }
}

impl KeyProvider for KeyRing {
    fn current(&self) -> &DataKey {
        // `parse` checked that `current` is one of `keys`; a ring is never changed afterwards.
        self.keys
            .get(&self.current)
            .or_else(|| self.keys.values().next())
            .unwrap_or_else(|| unreachable!("a KeyRing holds at least its current key"))
    }

    fn get(&self, id: KeyId) -> Option<&DataKey> {
        self.keys.get(&id)
    }
}

fn random_secret() -> Result<String, KeyError> {
    let mut secret = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| KeyError::Random)?;
    Ok(encode_hex(&secret))
}

/// Text of a new key file holding one fresh random key, id 1, current.
pub fn new_key_file_text() -> Result<String, KeyError> {
    render(&KeyFile {
        current: 1,
        keys: vec![KeyEntry {
            id: 1,
            secret: random_secret()?,
        }],
    })
}

/// `text` with one more fresh random key (id: one above the highest), `current` unchanged: step
/// 1 of a rotation. Returns the new text and the new id.
pub fn add_key_to_file_text(text: &str) -> Result<(String, KeyId), KeyError> {
    // Parse fully first: never extend a file this build could not read.
    KeyRing::parse(text)?;
    let mut file: KeyFile = toml::from_str(text).map_err(|e| KeyError::Malformed(e.to_string()))?;
    let next = file
        .keys
        .iter()
        .map(|k| k.id)
        .max()
        .and_then(|m| m.checked_add(1))
        .ok_or_else(|| KeyError::Malformed("no key id is left".to_string()))?;
    file.keys.push(KeyEntry {
        id: next,
        secret: random_secret()?,
    });
    Ok((render(&file)?, KeyId(next)))
}

fn render(file: &KeyFile) -> Result<String, KeyError> {
    let body = toml::to_string(file).map_err(|e| KeyError::Malformed(e.to_string()))?;
    Ok(format!("{FILE_COMMENT}\n{body}"))
}

/// Creates `path` (which must not exist) holding a new key file, mode 0600.
pub fn write_new_key_file(path: &Path) -> Result<(), KeyError> {
    write_secret(path, new_key_file_text()?.as_bytes(), true)
}

/// Writes `contents` to `path` with mode 0600 from creation on. With `create_new`, an existing
/// file is [`KeyError::Exists`]; otherwise it is replaced through a temporary file and a rename,
/// so a node starting meanwhile reads the old file or the new one, never half of one.
pub fn write_secret(path: &Path, contents: &[u8], create_new: bool) -> Result<(), KeyError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| KeyError::Io { path: p, source }
    };
    let target = if create_new {
        path.to_path_buf()
    } else {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&tmp)(e)),
        }
        tmp
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(&target).map_err(|e| {
        if create_new && e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(path.to_path_buf())
        } else {
            io(&target)(e)
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io(&target))?;
    drop(file);
    if !create_new {
        std::fs::rename(&target, path).map_err(io(path))?;
    }
    Ok(())
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        // Not refused, and group access is fine: the documented deployments give it to the
        // node's group (systemd: root:tidepool 0640; Kubernetes: fsGroup, 0440). Access for
        // everyone else is said loudly.
        if mode & 0o007 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the data key file is readable by other users; chmod o-rwx it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]])
        .map(char::from)
        .collect()
}

fn decode_hex(text: &str) -> Option<[u8; KEY_LEN]> {
    let text = text.as_bytes();
    if text.len() != KEY_LEN * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; KEY_LEN];
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn parses_several_keys_and_picks_current() {
        let ring = KeyRing::parse(&format!(
            "current = 7\n[[keys]]\nid = 3\nsecret = \"{A}\"\n[[keys]]\nid = 7\nsecret = \"{}\"\n",
            A.to_uppercase()
        ))
        .unwrap();
        assert_eq!(ring.current().id(), KeyId(7));
        assert_eq!(ring.ids(), vec![KeyId(3), KeyId(7)]);
        assert!(ring.get(KeyId(3)).is_some());
        assert!(ring.get(KeyId(4)).is_none());
    }

    #[test]
    fn refuses_malformed_files() {
        let one = |id: u32, secret: &str| format!("[[keys]]\nid = {id}\nsecret = \"{secret}\"\n");
        let cases = [
            ("", "malformed"),
            ("current = 1\nkeys = []\n", "no keys"),
            (&format!("current = 2\n{}", one(1, A)), "names no key"),
            (&format!("current = 1\n{}{}", one(1, A), one(1, A)), "twice"),
            (&format!("current = 1\n{}", one(1, &A[2..])), "hex digits"),
            (
                &format!("current = 1\n{}", one(1, &A.replace('0', "g"))),
                "hex digits",
            ),
            (&format!("current = 1\nextra = 1\n{}", one(1, A)), "unknown"),
        ];
        for (text, want) in cases {
            let e = KeyRing::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e} lacks {want:?}");
        }
    }

    #[test]
    fn new_files_parse_and_rotation_adds_a_key_without_switching() {
        let text = new_key_file_text().unwrap();
        let ring = KeyRing::parse(&text).unwrap();
        assert_eq!(ring.current().id(), KeyId(1));
        let (text2, id) = add_key_to_file_text(&text).unwrap();
        assert_eq!(id, KeyId(2));
        let ring2 = KeyRing::parse(&text2).unwrap();
        assert_eq!(ring2.current().id(), KeyId(1));
        assert_eq!(ring2.ids(), vec![KeyId(1), KeyId(2)]);
        // Two fresh files never share a secret.
        assert_ne!(text, new_key_file_text().unwrap());
    }

    #[test]
    fn hex_round_trips() {
        let bytes: [u8; KEY_LEN] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(decode_hex(&encode_hex(&bytes)), Some(bytes));
    }

    #[cfg(unix)]
    #[test]
    fn written_files_are_owner_only_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.key");
        write_new_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            write_new_key_file(&path),
            Err(KeyError::Exists(_))
        ));
        KeyRing::load(&path).unwrap();
        let e = KeyRing::load(&dir.path().join("missing.key")).unwrap_err();
        assert!(e.to_string().contains("missing.key"), "{e}");
    }
}

//! The object header (pure: no I/O).
//!
//! ```text
//! offset size
//!      0    4  magic  b"TDPL"
//!      4    2  format version (u16 LE), currently 2 (sealed); 1 was unsealed and is refused
//!      6    1  kind: 1 = log segment, 2 = checkpoint, 3 = blob
//!      7    1  flags: bit 0 = fence segment; other bits must be zero
//!      8    8  epoch (u64 LE) of the owner that wrote the object
//!     16    8  seq (u64 LE): a segment's first seq, or the last log seq a checkpoint covers
//!     24    8  count (u64 LE): records in a segment (1 for a fence); 0 for a checkpoint
//!     32    8  payload length (u64 LE), in plaintext bytes
//!     40    4  data key id (u32 LE) the object is sealed with
//!     44   12  AES-256-GCM nonce
//!     56       ciphertext (payload length bytes), then the 16-byte GCM tag
//! ```
//!
//! The whole header (with the object's name, see `seal.rs`) is the AEAD's associated data:
//! epoch, seq and count decide what a restore replays, so a change there must be caught just
//! like one in the payload, and by a check an attacker cannot recompute.

use super::keys::KeyId;

pub(crate) const MAGIC: &[u8; 4] = b"TDPL";
pub(crate) const VERSION: u16 = 2;
/// The last format without sealing (an unkeyed xxh3 checksum); refused on read.
const VERSION_UNSEALED: u16 = 1;
pub(crate) const HEADER_LEN: usize = 56;
pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;
const FLAG_FENCE: u8 = 1;

/// What an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Segment = 1,
    Checkpoint = 2,
    /// A named blob (dataset partition, job checkpoint, job result).
    Blob = 3,
}

/// The header fields that describe the object's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub fence: bool,
    pub epoch: u64,
    pub seq: u64,
    pub count: u64,
}

/// The header fields that describe the sealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Envelope {
    /// Plaintext bytes; the object holds this many ciphertext bytes and a tag after the header.
    pub payload_len: u64,
    pub key: KeyId,
    pub nonce: [u8; NONCE_LEN],
}

/// Why a header is unusable. Nothing about an object is trusted until its tag checks (see
/// `seal.rs`); these are the checks that come before.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("short object: {len} bytes, a sealed object needs at least {}", HEADER_LEN + TAG_LEN)]
    Short { len: usize },
    #[error("wrong magic {0:02x?}")]
    Magic([u8; 4]),
    #[error(
        "format version 1 is unsealed (from before encryption at rest) and is not read by this \
         build, which reads version {VERSION}"
    )]
    Unsealed,
    #[error("unsupported format version {0} (this build reads {VERSION})")]
    Version(u16),
    #[error("unknown object kind {0}")]
    UnknownKind(u8),
    #[error("expected a {want:?} object, found a {found:?}")]
    WrongKind { want: Kind, found: Kind },
    #[error("unknown header flags {0:#04x}")]
    Flags(u8),
}

impl Header {
    /// Encodes the header bytes.
    pub(crate) fn encode(&self, env: &Envelope) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[7] = if self.fence { FLAG_FENCE } else { 0 };
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.count.to_le_bytes());
        b[32..40].copy_from_slice(&env.payload_len.to_le_bytes());
        b[40..44].copy_from_slice(&env.key.0.to_le_bytes());
        b[44..56].copy_from_slice(&env.nonce);
        b
    }
}

fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut raw = [0u8; N];
    raw.copy_from_slice(&b[at..at + N]);
    raw
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array_at(b, at))
}

/// Parses the header fields of `b` (the object, or at least its first [`HEADER_LEN`] bytes).
/// Nothing here is authenticated: callers that act on the result must open the whole object,
/// except where a forged header can do no more harm than deleting the object would.
pub(crate) fn decode_header(b: &[u8], want: Kind) -> Result<(Header, Envelope), HeaderError> {
    if b.len() < HEADER_LEN {
        return Err(HeaderError::Short { len: b.len() });
    }
    let magic: [u8; 4] = array_at(b, 0);
    if &magic != MAGIC {
        return Err(HeaderError::Magic(magic));
    }
    match u16::from_le_bytes(array_at(b, 4)) {
        VERSION => {}
        VERSION_UNSEALED => return Err(HeaderError::Unsealed),
        v => return Err(HeaderError::Version(v)),
    }
    let kind = match b[6] {
        1 => Kind::Segment,
        2 => Kind::Checkpoint,
        3 => Kind::Blob,
        k => return Err(HeaderError::UnknownKind(k)),
    };
    if kind != want {
        return Err(HeaderError::WrongKind { want, found: kind });
    }
    let flags = b[7];
    if flags & !FLAG_FENCE != 0 {
        return Err(HeaderError::Flags(flags));
    }
    let header = Header {
        kind,
        fence: flags & FLAG_FENCE != 0,
        epoch: u64_at(b, 8),
        seq: u64_at(b, 16),
        count: u64_at(b, 24),
    };
    let env = Envelope {
        payload_len: u64_at(b, 32),
        key: KeyId(u32::from_le_bytes(array_at(b, 40))),
        nonce: array_at(b, 44),
    };
    Ok((header, env))
}

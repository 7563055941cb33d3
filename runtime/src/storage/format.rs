//! The object header (pure: no I/O).
//!
//! ```text
//! offset size
//!      0    4  magic  b"TDPL"
//!      4    2  format version (u16 LE), currently 1
//!      6    1  kind: 1 = log segment, 2 = checkpoint, 3 = blob
//!      7    1  flags: bit 0 = fence segment; other bits must be zero
//!      8    8  epoch (u64 LE) of the owner that wrote the object
//!     16    8  seq (u64 LE): a segment's first seq, or the last log seq a checkpoint covers
//!     24    8  count (u64 LE): records in a segment (1 for a fence); 0 for a checkpoint
//!     32    8  payload length (u64 LE)
//!     40    8  xxh3-64 of bytes 0..40 followed by the payload
//!     48       payload
//! ```
//!
//! The checksum covers the header fields as well as the payload: epoch, seq and count decide
//! what a restore replays, so a flipped bit there must be caught just like one in the payload.

use bytes::{BufMut, Bytes, BytesMut};
use xxhash_rust::xxh3::Xxh3Default;

pub(crate) const MAGIC: &[u8; 4] = b"TDPL";
pub(crate) const VERSION: u16 = 1;
pub(crate) const HEADER_LEN: usize = 48;
const CHECKSUM_AT: usize = 40;
const FLAG_FENCE: u8 = 1;

/// What an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Segment = 1,
    Checkpoint = 2,
    /// A named blob (dataset partition, job checkpoint, job result).
    Blob = 3,
}

/// A decoded header; every field has been checked against the bytes it describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub fence: bool,
    pub epoch: u64,
    pub seq: u64,
    pub count: u64,
}

impl Header {
    /// Encodes the 48 header bytes for `payload`.
    pub(crate) fn encode(&self, payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(HEADER_LEN);
        b.put_slice(MAGIC);
        b.put_u16_le(VERSION);
        b.put_u8(self.kind as u8);
        b.put_u8(if self.fence { FLAG_FENCE } else { 0 });
        b.put_u64_le(self.epoch);
        b.put_u64_le(self.seq);
        b.put_u64_le(self.count);
        b.put_u64_le(payload.len() as u64);
        let sum = checksum(&b[..CHECKSUM_AT], payload);
        b.put_u64_le(sum);
        b.freeze()
    }
}

fn checksum(fields: &[u8], payload: &[u8]) -> u64 {
    let mut h = Xxh3Default::new();
    h.update(fields);
    h.update(payload);
    h.digest()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

/// Parses and checks the header fields only (no checksum: the payload may not have been read).
/// Returns the header and the payload length it announces.
pub(crate) fn decode_header(b: &[u8], want: Kind) -> Result<(Header, u64), String> {
    if b.len() < HEADER_LEN {
        return Err(format!(
            "short object: {} bytes, header needs {HEADER_LEN}",
            b.len()
        ));
    }
    if &b[0..4] != MAGIC {
        return Err(format!("wrong magic {:02x?}", &b[0..4]));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(format!(
            "unsupported format version {version} (this build reads {VERSION})"
        ));
    }
    let kind = match b[6] {
        1 => Kind::Segment,
        2 => Kind::Checkpoint,
        3 => Kind::Blob,
        k => return Err(format!("unknown object kind {k}")),
    };
    if kind != want {
        return Err(format!("expected a {want:?} object, found a {kind:?}"));
    }
    let flags = b[7];
    if flags & !FLAG_FENCE != 0 {
        return Err(format!("unknown header flags {flags:#04x}"));
    }
    let header = Header {
        kind,
        fence: flags & FLAG_FENCE != 0,
        epoch: u64_at(b, 8),
        seq: u64_at(b, 16),
        count: u64_at(b, 24),
    };
    Ok((header, u64_at(b, 32)))
}

/// Checks a whole object (header, length, checksum) and splits off its payload.
pub(crate) fn decode(object: Bytes, want: Kind) -> Result<(Header, Bytes), String> {
    let (header, len) = decode_header(&object, want)?;
    let actual = (object.len() - HEADER_LEN) as u64;
    if len != actual {
        return Err(format!(
            "header announces {len} payload bytes, object holds {actual}"
        ));
    }
    let payload = object.slice(HEADER_LEN..);
    let stored = u64_at(&object, CHECKSUM_AT);
    let computed = checksum(&object[..CHECKSUM_AT], &payload);
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:016x}, computed {computed:016x}"
        ));
    }
    Ok((header, payload))
}

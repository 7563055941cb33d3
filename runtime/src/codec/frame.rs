//! Length-prefixed frames: header parsing, bounded reads into aligned buffers, validation.

use std::time::Duration;

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::budget::{Budgets, Held};

use super::{ArchivedEnvelope, CodecError, Envelope, PROTOCOL_VERSION};

/// Bytes before the archive: `len: u32`, `version: u16`, `flags: u16`.
pub const FRAME_HEADER_LEN: usize = 8;

/// rkyv archives need their root aligned; 16 covers every type we archive.
type Buf = AlignedVec<16>;

/// A received frame: an aligned buffer whose archive has been validated.
///
/// Reading the envelope is free after [`Frame::decode`]: no copy, no per-field decode.
pub struct Frame {
    buf: Buf,
    /// The budget reservation that paid for `buf` (network frames): returned with it.
    held: Held,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("len", &self.buf.len())
            .finish()
    }
}

impl Frame {
    /// Validates `buf` (an archive, without the header) and takes ownership of it.
    pub fn decode(buf: Buf) -> Result<Self, CodecError> {
        let env = rkyv::access::<ArchivedEnvelope, rancor::Error>(&buf)
            .map_err(|e| CodecError::Malformed(e.to_string()))?;
        if env.version != PROTOCOL_VERSION {
            return Err(CodecError::Version {
                got: env.version.to_native(),
            });
        }
        Ok(Frame {
            buf,
            held: Held::default(),
        })
    }

    /// Attaches the budget reservation that paid for this frame's buffer.
    fn holding(mut self, held: Held) -> Self {
        self.held = held;
        self
    }

    /// Budgeted bytes this frame holds (0 for frames not read from a peer).
    pub fn held_bytes(&self) -> usize {
        self.held.bytes()
    }

    /// Parses one whole frame (header + archive) from a byte slice. For tests and fuzzing; the
    /// network path is [`read_frame`].
    pub fn from_wire(bytes: &[u8], max: usize) -> Result<Self, CodecError> {
        let Some(header) = bytes.get(..FRAME_HEADER_LEN) else {
            return Err(CodecError::Truncated {
                expected: FRAME_HEADER_LEN as u64,
                got: bytes.len() as u64,
            });
        };
        let len = parse_header(header.try_into().unwrap_or([0; FRAME_HEADER_LEN]), max)?;
        let body = &bytes[FRAME_HEADER_LEN..];
        if body.len() < len {
            return Err(CodecError::Truncated {
                expected: len as u64,
                got: body.len() as u64,
            });
        }
        if body.len() > len {
            return Err(CodecError::Malformed(format!(
                "{} trailing bytes",
                body.len() - len
            )));
        }
        let mut buf = Buf::with_capacity(len);
        buf.extend_from_slice(body);
        Frame::decode(buf)
    }

    /// The validated envelope, read in place.
    pub fn envelope(&self) -> &ArchivedEnvelope {
        // SAFETY: `buf` passed `rkyv::access` (full bytecheck validation) in `decode`, the only
        // constructor, and is never mutated afterwards, so the archive is still valid. Skipping
        // the second validation is what makes repeated reads of a large frame O(1).
        #[allow(unsafe_code)]
        unsafe {
            rkyv::access_unchecked::<ArchivedEnvelope>(&self.buf)
        }
    }

    /// Archive bytes (without the header).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Deserializes into owned types (for small messages that outlive the buffer).
    pub fn to_owned_envelope(&self) -> Result<Envelope, CodecError> {
        rkyv::deserialize::<Envelope, rancor::Error>(self.envelope())
            .map_err(|e| CodecError::Malformed(e.to_string()))
    }
}

/// Checks a header and returns the archive length. Size and version are checked here, before
/// anything is allocated.
fn parse_header(h: [u8; FRAME_HEADER_LEN], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as u64;
    let version = u16::from_le_bytes([h[4], h[5]]);
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if len > max as u64 {
        return Err(CodecError::Oversized {
            len,
            max: max as u64,
        });
    }
    if version != PROTOCOL_VERSION {
        return Err(CodecError::Version { got: version });
    }
    if flags != 0 {
        return Err(CodecError::Malformed(format!("unknown flags {flags:#x}")));
    }
    if len == 0 {
        return Err(CodecError::Malformed("empty frame".into()));
    }
    Ok(len as usize)
}

/// Reads into `dst` until full or EOF; returns how many bytes arrived.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, dst: &mut [u8]) -> Result<usize, CodecError> {
    let mut got = 0;
    while got < dst.len() {
        let n = r.read(&mut dst[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames. The buffer grows as
/// bytes arrive (never to the announced length up front); nothing is counted against a
/// budget. Peers' streams are read with [`read_frame_limited`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Frame>, CodecError> {
    read_frame_limited(r, max, None).await
}

/// How the network path limits one frame read.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    /// Budgets the growing buffer is reserved from, step by step, before it is allocated. The
    /// frame keeps its reservation until it is dropped.
    pub budgets: Budgets,
    /// Longest wait for the next bytes once a frame has started: a sender that announces a
    /// frame and stalls loses the stream (and the memory) after this.
    pub stall: Duration,
}

/// The first step a frame's buffer grows by; later steps double it (amortised copies).
const GROW_STEP: usize = 64 * 1024;

/// Reads one frame against `limits` (if any): see [`read_frame`].
pub async fn read_frame_limited<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
    limits: Option<&ReadLimits>,
) -> Result<Option<Frame>, CodecError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    // Between frames a stream may idle (a long-lived stream of small frames); once a header
    // has started, the stall limit applies.
    let first = r.read(&mut header).await?;
    if first == 0 {
        return Ok(None);
    }
    let got = first
        + stalling(
            limits,
            read_full(r, &mut header[first..]),
            first as u64,
            FRAME_HEADER_LEN as u64,
        )
        .await??;
    if got < FRAME_HEADER_LEN {
        return Err(CodecError::Truncated {
            expected: FRAME_HEADER_LEN as u64,
            got: got as u64,
        });
    }
    let len = parse_header(header, max)?;
    let mut buf = Buf::new();
    let mut held = Held::default();
    let mut got = 0usize;
    while got < len {
        if got == buf.capacity() {
            let cap = buf.capacity();
            let new_cap = len.min(cap.saturating_mul(2).max(GROW_STEP));
            if let Some(l) = limits {
                l.budgets
                    .reserve(&mut held, new_cap - cap)
                    .await
                    .map_err(|e| CodecError::OverBudget(e.to_string()))?;
            }
            buf.reserve_exact(new_cap - buf.len());
        }
        let end = buf.capacity().min(len);
        buf.resize(end, 0);
        let n = stalling(limits, r.read(&mut buf[got..end]), got as u64, len as u64).await??;
        if n == 0 {
            return Err(CodecError::Truncated {
                expected: len as u64,
                got: got as u64,
            });
        }
        got += n;
        buf.resize(got, 0);
    }
    Frame::decode(buf).map(|f| Some(f.holding(held)))
}

/// Runs one read under the stall limit.
async fn stalling<T>(
    limits: Option<&ReadLimits>,
    read: impl std::future::Future<Output = T>,
    got: u64,
    expected: u64,
) -> Result<T, CodecError> {
    match limits {
        Some(l) => tokio::time::timeout(l.stall, read)
            .await
            .map_err(|_| CodecError::Stalled {
                got,
                expected,
                after: l.stall,
            }),
        None => Ok(read.await),
    }
}

/// An outgoing frame: header plus archive, ready for a vectored write.
#[derive(Debug)]
pub struct EncodedFrame {
    header: [u8; FRAME_HEADER_LEN],
    body: Buf,
}

impl EncodedFrame {
    /// Wire length (header + archive).
    pub fn len(&self) -> usize {
        FRAME_HEADER_LEN + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The two chunks to write, without copying the archive.
    pub fn into_chunks(self) -> [Bytes; 2] {
        [
            Bytes::copy_from_slice(&self.header),
            Bytes::from_owner(self.body),
        ]
    }

    /// The whole frame as one vector (tests, fuzzing).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.body);
        v
    }
}

/// Serializes an envelope into a frame.
pub fn encode(env: &Envelope) -> Result<EncodedFrame, CodecError> {
    let body =
        rkyv::to_bytes::<rancor::Error>(env).map_err(|e| CodecError::Encode(e.to_string()))?;
    let len = u32::try_from(body.len())
        .map_err(|_| CodecError::Encode(format!("{} bytes do not fit a frame", body.len())))?;
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[..4].copy_from_slice(&len.to_le_bytes());
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    Ok(EncodedFrame { header, body })
}

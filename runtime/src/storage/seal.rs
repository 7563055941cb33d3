//! Sealing objects at rest (pure: no I/O): AES-256-GCM under a cluster data key.
//!
//! An object is `header || ciphertext || tag` (layout in `format.rs`). The associated data is
//! the whole header followed by the object's **location**: its name relative to the store root
//! (`shards/00007/log/00000000000000000001.seg`, `jobs/…/result`). So the tag fails for a changed
//! header field (epoch, seq, count, kind, fence flag, key id, nonce), a changed payload, a
//! truncated object, an object sealed under another key, and a valid object copied or moved to
//! another name or shard. The store root itself is not bound, so a whole store can be copied to
//! a new bucket or prefix (backup, migration) and still be read.
//!
//! Nonces are 96 random bits per object from the OS (ring's `SystemRandom`). Two objects under
//! one key collide with probability about n²/2⁹⁷ after n objects: 2⁻³³ at n = 2³² (the limit
//! NIST SP 800-38D sets for random nonces). The objects here are log segments (one per group
//! commit), checkpoints and blobs; a cluster sealing 100 objects per second on average takes
//! 1.4 years to reach 2³². `tidepool_storage_sealed_objects_total` counts them; rotate the data
//! key (README, "Encryption at rest") well before a key has sealed 2³² objects. A counter-based
//! nonce would need a persistent, never-reused counter per key shared by every node, which this
//! layer does not have.

use bytes::{Bytes, BytesMut};
use ring::aead::{Aad, Nonce, Tag};

use super::format::{self, Envelope, Header, HeaderError, Kind, HEADER_LEN, NONCE_LEN, TAG_LEN};
use super::keys::{DataKey, KeyId, KeyProvider};

/// Why an object read from the store was refused. It is never returned as data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("header announces {want} payload bytes (+{TAG_LEN} tag), object holds {have} after the header")]
    Length { want: u64, have: u64 },
    #[error(
        "sealed with data key {0}, which the key file does not hold (a retired key, or an object \
         of another cluster)"
    )]
    UnknownKey(KeyId),
    #[error(
        "authentication failed under data key {0}: the object was modified, moved from another \
         name, or sealed with a different key of the same id"
    )]
    Forged(KeyId),
}

impl Refused {
    /// The `reason` label of `tidepool_storage_rejected_objects_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refused::Header(HeaderError::Short { .. }) => "truncated",
            Refused::Length { want, have } if *have < want.saturating_add(TAG_LEN as u64) => {
                "truncated"
            }
            Refused::Header(HeaderError::Unsealed | HeaderError::Version(_)) => "version",
            Refused::Header(_) | Refused::Length { .. } => "malformed",
            Refused::UnknownKey(_) => "unknown_key",
            Refused::Forged(_) => "forged",
        }
    }
}

/// The associated data: the header bytes, then the location.
fn aad(header: &[u8], location: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + location.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(location.as_bytes());
    aad
}

/// The payload does not fit one AES-GCM message (about 64 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("payload of {0} bytes is too large to seal")]
pub(crate) struct TooLarge(pub usize);

/// Seals `payload` as the object at `location` with `key` and `nonce` (which must never be used
/// again with this key: callers draw it at random, see the module docs).
pub(crate) fn seal(
    header: &Header,
    location: &str,
    payload: &[u8],
    key: &DataKey,
    nonce: [u8; NONCE_LEN],
) -> Result<Bytes, TooLarge> {
    let env = Envelope {
        payload_len: payload.len() as u64,
        key: key.id(),
        nonce,
    };
    let head = header.encode(&env);
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
    buf.extend_from_slice(&head);
    buf.extend_from_slice(payload);
    let tag = key
        .aead()
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(&head, location)),
            &mut buf[HEADER_LEN..],
        )
        .map_err(|_| TooLarge(payload.len()))?;
    buf.extend_from_slice(tag.as_ref());
    Ok(buf.freeze())
}

/// Checks and decrypts the object read from `location`: header, length, key id, tag. Returns
/// the header and the plaintext payload only if all of them hold.
pub(crate) fn open(
    object: Bytes,
    want: Kind,
    location: &str,
    keys: &dyn KeyProvider,
) -> Result<(Header, Bytes), Refused> {
    let (header, env) = format::decode_header(&object, want)?;
    let have = (object.len() - HEADER_LEN) as u64;
    if env.payload_len.checked_add(TAG_LEN as u64) != Some(have) {
        return Err(Refused::Length {
            want: env.payload_len,
            have,
        });
    }
    let key = keys.get(env.key).ok_or(Refused::UnknownKey(env.key))?;
    // Decrypt in place: reuses the buffer when this is its only handle, copies it otherwise.
    let mut buf = object
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
    let (head, body) = buf.split_at_mut(HEADER_LEN);
    let (ciphertext, tag) = body.split_at_mut(body.len() - TAG_LEN);
    let tag = Tag::try_from(&tag[..]).map_err(|_| Refused::Forged(env.key))?;
    key.aead()
        .open_in_place_separate_tag(
            Nonce::assume_unique_for_key(env.nonce),
            Aad::from(aad(head, location)),
            tag,
            ciphertext,
            0..,
        )
        .map_err(|_| Refused::Forged(env.key))?;
    let end = HEADER_LEN + ciphertext.len();
    Ok((header, buf.freeze().slice(HEADER_LEN..end)))
}

/// The bench-only baseline: the same framing without sealing, checked by an unkeyed xxh3-128 in
/// the tag's place, as objects were before sealing. Never used by a node.
#[cfg(feature = "bench-baseline")]
pub(crate) mod baseline {
    use super::*;
    use xxhash_rust::xxh3::Xxh3Default;

    fn checksum(head: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut h = Xxh3Default::new();
        h.update(head);
        h.update(payload);
        h.digest128().to_le_bytes()
    }

    pub(crate) fn frame(header: &Header, payload: &[u8]) -> Bytes {
        let env = Envelope {
            payload_len: payload.len() as u64,
            key: KeyId(0),
            nonce: [0; NONCE_LEN],
        };
        let head = header.encode(&env);
        let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        buf.extend_from_slice(&head);
        buf.extend_from_slice(payload);
        buf.extend_from_slice(&checksum(&head, payload));
        buf.freeze()
    }

    pub(crate) fn unframe(object: Bytes, want: Kind) -> Result<(Header, Bytes), Refused> {
        let (header, env) = format::decode_header(&object, want)?;
        let have = (object.len() - HEADER_LEN) as u64;
        if env.payload_len.checked_add(TAG_LEN as u64) != Some(have) {
            return Err(Refused::Length {
                want: env.payload_len,
                have,
            });
        }
        let end = object.len() - TAG_LEN;
        if checksum(&object[..HEADER_LEN], &object[HEADER_LEN..end])[..] != object[end..] {
            return Err(Refused::Forged(env.key));
        }
        Ok((header, object.slice(HEADER_LEN..end)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::storage::keys::{KeyRing, KEY_LEN};
    use proptest::prelude::*;

    const LOC: &str = "shards/00007/log/00000000000000000009.seg";

    fn ring(current: u32, ids: &[(u32, u8)]) -> KeyRing {
        let mut text = format!("current = {current}\n");
        for (id, fill) in ids {
            let secret: String = std::iter::repeat_n(format!("{fill:02x}"), KEY_LEN).collect();
            text.push_str(&format!("[[keys]]\nid = {id}\nsecret = \"{secret}\"\n"));
        }
        KeyRing::parse(&text).unwrap()
    }

    fn header() -> Header {
        Header {
            kind: Kind::Segment,
            fence: false,
            epoch: 3,
            seq: 9,
            count: 2,
        }
    }

    fn sealed(keys: &KeyRing, payload: &[u8]) -> Vec<u8> {
        seal(&header(), LOC, payload, keys.current(), [7; NONCE_LEN])
            .unwrap()
            .to_vec()
    }

    fn refused(obj: Vec<u8>, keys: &KeyRing, loc: &str) -> Refused {
        open(Bytes::from(obj), Kind::Segment, loc, keys).unwrap_err()
    }

    #[test]
    fn round_trip_hides_the_payload() {
        let keys = ring(1, &[(1, 0xaa)]);
        let payload = b"the payload, in clear".repeat(4);
        let obj = sealed(&keys, &payload);
        assert_eq!(obj.len(), HEADER_LEN + payload.len() + TAG_LEN);
        assert!(!obj.windows(11).any(|w| w == b"the payload"));
        let (h, p) = open(Bytes::from(obj), Kind::Segment, LOC, &keys).unwrap();
        assert_eq!((h, &p[..]), (header(), &payload[..]));
        // An empty payload (a fence segment) is sealed too.
        let obj = sealed(&keys, b"");
        assert_eq!(
            open(Bytes::from(obj), Kind::Segment, LOC, &keys)
                .unwrap()
                .1
                .len(),
            0
        );
    }

    #[test]
    fn a_shared_buffer_opens_too() {
        let keys = ring(1, &[(1, 0xaa)]);
        let obj = Bytes::from(sealed(&keys, b"abc"));
        let other_handle = obj.clone();
        let (_, p) = open(obj, Kind::Segment, LOC, &keys).unwrap();
        assert_eq!(&p[..], b"abc");
        assert_eq!(other_handle.len(), HEADER_LEN + 3 + TAG_LEN);
    }

    #[test]
    fn wrong_key_and_unknown_key_are_refused() {
        let keys = ring(1, &[(1, 0xaa)]);
        let obj = sealed(&keys, b"abc");
        let same_id_other_secret = ring(1, &[(1, 0xbb)]);
        let e = refused(obj.clone(), &same_id_other_secret, LOC);
        assert_eq!(
            (e.clone(), e.reason()),
            (Refused::Forged(KeyId(1)), "forged")
        );
        let other_ids = ring(2, &[(2, 0xaa)]);
        let e = refused(obj, &other_ids, LOC);
        assert_eq!(
            (e.clone(), e.reason()),
            (Refused::UnknownKey(KeyId(1)), "unknown_key")
        );
    }

    #[test]
    fn a_moved_object_is_refused() {
        let keys = ring(1, &[(1, 0xaa)]);
        let obj = sealed(&keys, b"abc");
        for other in [
            "shards/00008/log/00000000000000000009.seg",
            "shards/00007/log/00000000000000000010.seg",
            "shards/00007/log/00000000000000000009.seg/",
            "",
        ] {
            assert_eq!(
                refused(obj.clone(), &keys, other),
                Refused::Forged(KeyId(1))
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let keys = ring(1, &[(1, 0xaa)]);
        let obj = sealed(&keys, b"0123456789");
        for at in 0..obj.len() {
            for bit in 0..8 {
                let mut bad = obj.clone();
                bad[at] ^= 1 << bit;
                let r = open(Bytes::from(bad), Kind::Segment, LOC, &keys);
                assert!(r.is_err(), "flip of bit {bit} at byte {at} was accepted");
            }
        }
        // What the checks before the tag say about the header's fixed fields.
        let reason = |at: usize| {
            let mut bad = obj.clone();
            bad[at] ^= 0x40;
            refused(bad, &keys, LOC).to_string()
        };
        assert!(reason(0).contains("magic"));
        assert!(reason(4).contains("version"));
        assert!(reason(6).contains("kind"));
        assert!(reason(7).contains("flags"));
        assert!(reason(20).contains("authentication failed"));
        assert!(reason(60).contains("authentication failed"));
    }

    #[test]
    fn truncated_or_extended_objects_are_refused() {
        let keys = ring(1, &[(1, 0xaa)]);
        let obj = sealed(&keys, b"0123456789");
        for len in 0..obj.len() {
            let e = refused(obj[..len].to_vec(), &keys, LOC);
            assert_eq!(e.reason(), "truncated", "{len}: {e}");
        }
        let e = refused([&obj[..], b"x"].concat(), &keys, LOC);
        assert_eq!(e.reason(), "malformed", "{e}");
    }

    #[test]
    fn version_1_objects_are_refused() {
        let keys = ring(1, &[(1, 0xaa)]);
        let mut obj = sealed(&keys, b"abc");
        obj[4..6].copy_from_slice(&1u16.to_le_bytes());
        let e = refused(obj, &keys, LOC);
        assert_eq!(e.reason(), "version");
        assert!(e.to_string().contains("unsealed"), "{e}");
    }

    #[test]
    fn rotation_reads_old_keys_and_writes_the_current_one() {
        let old = ring(1, &[(1, 0xaa)]);
        let before = sealed(&old, b"old");
        let rotated = ring(2, &[(1, 0xaa), (2, 0xcc)]);
        let after = sealed(&rotated, b"new");
        assert_eq!(&after[40..44], &2u32.to_le_bytes());
        assert_eq!(
            &open(Bytes::from(before), Kind::Segment, LOC, &rotated)
                .unwrap()
                .1[..],
            b"old"
        );
        assert_eq!(
            &open(Bytes::from(after.clone()), Kind::Segment, LOC, &rotated)
                .unwrap()
                .1[..],
            b"new"
        );
        // A node still on the old file cannot read the new key's objects (hence two restarts).
        assert_eq!(refused(after, &old, LOC), Refused::UnknownKey(KeyId(2)));
    }

    #[test]
    fn every_reason_is_a_zero_series_of_the_metric() {
        let (_, _, exported) = crate::metrics::ZERO_SERIES
            .iter()
            .find(|(name, _, _)| *name == crate::metrics::STORAGE_REJECTED_OBJECTS)
            .unwrap();
        let all = [
            Refused::Header(HeaderError::Short { len: 0 }),
            Refused::Header(HeaderError::Unsealed),
            Refused::Header(HeaderError::Flags(2)),
            Refused::Length { want: 5, have: 3 },
            Refused::UnknownKey(KeyId(1)),
            Refused::Forged(KeyId(1)),
        ];
        for r in all {
            assert!(exported.contains(&r.reason()), "{}", r.reason());
        }
    }

    proptest! {
        #[test]
        fn any_payload_round_trips_and_any_single_change_is_refused(
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            epoch in any::<u64>(),
            seq in any::<u64>(),
            fence in any::<bool>(),
            flip in any::<(usize, u8)>(),
        ) {
            let keys = ring(5, &[(5, 0x5a)]);
            let h = Header { kind: Kind::Checkpoint, fence, epoch, seq, count: 0 };
            let nonce: [u8; NONCE_LEN] = std::array::from_fn(|i| (seq as u8).wrapping_add(i as u8));
            let obj = seal(&h, LOC, &payload, keys.current(), nonce).unwrap();
            let (back, p) = open(obj.clone(), Kind::Checkpoint, LOC, &keys).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(&p[..], &payload[..]);
            let mut bad = obj.to_vec();
            let at = flip.0 % bad.len();
            bad[at] ^= flip.1.max(1);
            prop_assert!(open(Bytes::from(bad), Kind::Checkpoint, LOC, &keys).is_err());
        }
    }
}

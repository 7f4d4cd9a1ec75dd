//! Tensor digests (CONTRACT.md §5): SHA3-256 over a canonical encoding, so
//! two workers agree on a digest exactly when they agree on every bit of the
//! tensor (NaN payloads aside, which the contract canonicalises).

use sha3::{Digest as _, Sha3_256};

use crate::contract::canonicalize;

/// Domain-separation tag at the start of every encoded tensor.
pub const TENSOR_TAG: &[u8; 16] = b"lockstep.tensor\0";

/// Element type code in the encoding. Only f32 exists so far.
pub const DTYPE_F32: u8 = 1;

/// A SHA3-256 digest, printed, and serialised, as `sha3-256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse_prefixed(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{}` is not a digest (sha3-256:<64 hex>)",
                s.chars().take(80).collect::<String>()
            ))
        })
    }
}

impl Digest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses `sha3-256:<hex>` or bare hex.
    pub fn parse(s: &str) -> Option<Self> {
        let hex_part = s.strip_prefix("sha3-256:").unwrap_or(s);
        let bytes = hex::decode(hex_part).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// Parses `sha3-256:<hex>` only (the wire form).
    pub fn parse_prefixed(s: &str) -> Option<Self> {
        s.strip_prefix("sha3-256:").and_then(Self::parse)
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha3-256:{}", self.to_hex())
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Digest of an f32 tensor with the given shape:
/// `SHA3-256(TENSOR_TAG ‖ dtype:u8 ‖ rank:u32le ‖ dims:u64le… ‖ data:f32le…)`
/// with every NaN replaced by the canonical NaN before hashing.
pub fn tensor_digest_f32(shape: &[usize], data: &[f32]) -> Digest {
    assert_eq!(
        shape.iter().product::<usize>(),
        data.len(),
        "shape does not match data length"
    );
    let mut h = Sha3_256::new();
    h.update(TENSOR_TAG);
    h.update([DTYPE_F32]);
    h.update((shape.len() as u32).to_le_bytes());
    for &d in shape {
        h.update((d as u64).to_le_bytes());
    }
    // Hash in blocks to avoid one update call per element.
    let mut buf = [0u8; 4096];
    for chunk in data.chunks(buf.len() / 4) {
        for (dst, &x) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&canonicalize(x).to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    Digest(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_part_of_the_digest() {
        let d = [1.0f32, 2.0, 3.0, 4.0];
        assert_ne!(tensor_digest_f32(&[2, 2], &d), tensor_digest_f32(&[4], &d));
        assert_ne!(
            tensor_digest_f32(&[1, 4], &d),
            tensor_digest_f32(&[4, 1], &d)
        );
    }

    #[test]
    fn nan_payloads_do_not_matter_but_signs_of_zero_do() {
        let a = [f32::from_bits(0x7FC0_0001), 0.0];
        let b = [f32::from_bits(0xFFC0_0000), 0.0];
        assert_eq!(tensor_digest_f32(&[2], &a), tensor_digest_f32(&[2], &b));
        assert_ne!(
            tensor_digest_f32(&[1], &[0.0]),
            tensor_digest_f32(&[1], &[-0.0])
        );
    }

    #[test]
    fn known_answer() {
        // Pinned so that an accidental change of the encoding is caught: the
        // digest of the empty rank-0 ... well, of a [0]-shaped tensor.
        let d = tensor_digest_f32(&[0], &[]);
        let mut h = Sha3_256::new();
        h.update(b"lockstep.tensor\0\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(d.0, <[u8; 32]>::from(h.finalize()));
        assert_eq!(Digest::parse(&d.to_string()), Some(d));
    }
}

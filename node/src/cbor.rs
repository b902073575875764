//! Strict CBOR decoding of bytes from peers, apps and files: one value and nothing after it.
//!
//! `ciborium::from_reader` stops after the first value and ignores whatever follows. A relay
//! could then pad an envelope or a roster, which would still decode and verify while its
//! digest (a quarantine key, a gossip message id) changed, and any message could carry junk.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes are not the one CBOR value expected. Names no content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CborError {
    /// Not CBOR, or not of the expected shape.
    #[error("not CBOR of the expected shape")]
    Malformed,
    /// A whole value, and then more bytes.
    #[error("{bytes} bytes after the value")]
    TrailingBytes {
        /// How many bytes follow the value.
        bytes: usize,
    },
    /// The value, but not in the encoding this node writes for it.
    #[error("not the canonical encoding of the value")]
    NotCanonical,
}

/// Encodes `value` as CBOR.
pub(crate) fn encode(value: &impl Serialize) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Writing CBOR into a Vec cannot fail.
    ciborium::into_writer(value, &mut bytes).expect("CBOR encoding into memory");
    bytes
}

/// Decodes exactly one value from `bytes`: bytes after it are refused.
pub(crate) fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CborError> {
    let mut rest = bytes;
    let value = ciborium::from_reader(&mut rest).map_err(|_| CborError::Malformed)?;
    if !rest.is_empty() {
        return Err(CborError::TrailingBytes { bytes: rest.len() });
    }
    Ok(value)
}

/// Decodes a value that must be in the one encoding `encode` gives it: a value whose bytes
/// are its identity (an envelope's digest, a gossip message id) must not have others, such
/// as its map keys in another order, an unknown key, or lengths written long.
pub(crate) fn decode_canonical<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, CborError> {
    let value = decode_exact(bytes)?;
    if encode(&value) != bytes {
        return Err(CborError::NotCanonical);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Pair {
        a: u8,
        b: u8,
    }

    #[test]
    fn one_value_and_nothing_else_is_taken() {
        let bytes = encode(&Pair { a: 1, b: 2 });
        assert_eq!(decode_exact::<Pair>(&bytes), Ok(Pair { a: 1, b: 2 }));
        assert_eq!(decode_canonical::<Pair>(&bytes), Ok(Pair { a: 1, b: 2 }));
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode_exact::<Pair>(&padded),
            Err(CborError::TrailingBytes { bytes: 2 })
        );
        assert_eq!(decode_exact::<Pair>(&bytes[..3]), Err(CborError::Malformed));
        // The same map with its keys the other way round.
        let reordered = [0xa2, 0x61, b'b', 2, 0x61, b'a', 1];
        assert_eq!(decode_exact::<Pair>(&reordered), Ok(Pair { a: 1, b: 2 }));
        assert_eq!(
            decode_canonical::<Pair>(&reordered),
            Err(CborError::NotCanonical)
        );
    }
}

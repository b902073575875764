//! Offline bundles: every envelope a node holds, in a file signed by the node's key, for a
//! courier to carry to a node the network cannot reach. The receiving node runs each envelope
//! through its ordinary pipeline, so a bundle can add nothing a peer could not have sent.
//!
//! The format streams both ways in bounded memory:
//! `MAGIC ‖ frame* ‖ end`, where a frame is `length (u32, big-endian) ‖ bytes`. The first
//! frame is the CBOR [`BundleHeader`]; each following frame is one envelope, documents one
//! after another and each document's envelopes in causal order. `end` is a zero length
//! followed by the 64-byte ed25519 signature of the exporting node over
//! `estuary/bundle/v1 ‖ SHA-256(everything before end)`.

use std::io::{Read, Write};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::ENVELOPE_BYTES_MAX;
use crate::model::{Bytes32, DocumentId};
use crate::node::{Node, NodeError};

/// The first bytes of every bundle.
pub const MAGIC: &[u8; 16] = b"ESTUARY-BUNDLE1\n";
const SIGNING_DOMAIN: &[u8] = b"estuary/bundle/v1";
/// Largest header frame, in bytes.
const HEADER_BYTES_MAX: usize = 4 * 1024;
/// Most envelopes one bundle may hold: 700,000 files of a few dozen changes each.
pub const BUNDLE_ENVELOPES_MAX: u64 = 100_000_000;

/// Why a bundle could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing the bytes failed.
    #[error("bundle I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The node's store failed.
    #[error(transparent)]
    Node(#[from] Box<NodeError>),
    /// The bytes are not a bundle of this format.
    #[error("not an Estuary bundle (version 1): {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// The signature does not verify: the bundle was altered or truncated after export.
    #[error("the bundle's signature does not verify: it was altered or cut short after export")]
    BadSignature,
}

/// Who exported a bundle, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// The exporting node's key (it signs the bundle).
    pub created_by: Bytes32,
    /// When the export began, in milliseconds since the epoch.
    pub created_at_ms: i64,
    /// Documents the exporting node held.
    pub documents: u64,
}

/// What an export or a check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleSummary {
    /// The header.
    pub header: BundleHeader,
    /// Envelopes in the bundle.
    pub envelopes: u64,
    /// Bytes of the whole bundle.
    pub bytes: u64,
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn frame(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let length = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
        self.put(&length.to_be_bytes())?;
        self.put(bytes)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        self.inner.write_all(bytes)
    }
}

fn signing_message(digest: &[u8]) -> Vec<u8> {
    [SIGNING_DOMAIN, digest].concat()
}

/// Writes every envelope `node` holds as a bundle signed by its key. `progress` is called
/// after each document with (documents done, documents total).
pub fn export(
    node: &Node,
    out: impl Write,
    mut progress: impl FnMut(u64, u64),
) -> Result<BundleSummary, BundleError> {
    let ids: Vec<DocumentId> = node
        .catalogue()
        .ids()
        .map(|id| DocumentId::from_bytes(*id))
        .collect();
    let header = BundleHeader {
        created_by: node.public_key(),
        created_at_ms: crate::audit::now_ms(),
        documents: ids.len() as u64,
    };
    let mut out = Hashing {
        inner: out,
        hasher: Sha256::new(),
        bytes: 0,
    };
    out.put(MAGIC)?;
    let mut encoded = Vec::new();
    ciborium::into_writer(&header, &mut encoded).expect("CBOR encoding into memory");
    out.frame(&encoded)?;
    let mut envelopes = 0u64;
    for (done, id) in ids.iter().enumerate() {
        for envelope in node.envelopes(*id).map_err(Box::new)? {
            out.frame(&envelope)?;
            envelopes += 1;
        }
        progress(done as u64 + 1, ids.len() as u64);
    }
    let digest = out.hasher.clone().finalize();
    let signature = node.identity().sign(&signing_message(&digest));
    out.inner.write_all(&0u32.to_be_bytes())?;
    out.inner.write_all(&signature)?;
    out.inner.flush()?;
    Ok(BundleSummary {
        header,
        envelopes,
        bytes: out.bytes + 4 + 64,
    })
}

/// Reads a bundle frame by frame.
pub struct BundleReader<R> {
    input: R,
    hasher: Sha256,
    header: BundleHeader,
    envelopes: u64,
    bytes: u64,
    ended: bool,
}

impl<R: Read> BundleReader<R> {
    /// Reads the magic and the header.
    pub fn open(mut input: R) -> Result<Self, BundleError> {
        let mut magic = [0u8; 16];
        input
            .read_exact(&mut magic)
            .map_err(|_| BundleError::Malformed {
                reason: "shorter than a bundle's first line",
            })?;
        if &magic != MAGIC {
            return Err(BundleError::Malformed {
                reason: "it does not start with ESTUARY-BUNDLE1",
            });
        }
        let mut reader = Self {
            input,
            hasher: Sha256::new(),
            header: BundleHeader {
                created_by: Bytes32([0; 32]),
                created_at_ms: 0,
                documents: 0,
            },
            envelopes: 0,
            bytes: 16,
            ended: false,
        };
        reader.hasher.update(magic);
        let header = reader
            .frame(HEADER_BYTES_MAX)?
            .ok_or(BundleError::Malformed {
                reason: "it has no header",
            })?;
        reader.header = crate::cbor::decode_exact(&header).map_err(|_| BundleError::Malformed {
            reason: "the header is not one CBOR value of the expected shape",
        })?;
        Ok(reader)
    }

    /// The header.
    pub fn header(&self) -> &BundleHeader {
        &self.header
    }

    /// The next envelope, or `None` at the end, once the signature has been checked.
    pub fn next_envelope(&mut self) -> Result<Option<Vec<u8>>, BundleError> {
        if self.ended {
            return Ok(None);
        }
        match self.frame(ENVELOPE_BYTES_MAX)? {
            Some(envelope) => {
                self.envelopes += 1;
                if self.envelopes > BUNDLE_ENVELOPES_MAX {
                    return Err(BundleError::Malformed {
                        reason: "it holds more envelopes than any consortium has",
                    });
                }
                Ok(Some(envelope))
            }
            None => {
                self.check_signature()?;
                self.ended = true;
                Ok(None)
            }
        }
    }

    /// Reads to the end and checks the signature without keeping anything.
    pub fn check(mut self) -> Result<BundleSummary, BundleError> {
        while self.next_envelope()?.is_some() {}
        Ok(BundleSummary {
            header: self.header,
            envelopes: self.envelopes,
            bytes: self.bytes,
        })
    }

    /// A frame of at most `max` bytes; `None` at the end marker.
    fn frame(&mut self, max: usize) -> Result<Option<Vec<u8>>, BundleError> {
        let mut prefix = [0u8; 4];
        self.input
            .read_exact(&mut prefix)
            .map_err(|_| BundleError::Malformed {
                reason: "it ends without its signature (cut short?)",
            })?;
        self.bytes += 4;
        let length = u32::from_be_bytes(prefix) as usize;
        if length == 0 {
            return Ok(None);
        }
        if length > max {
            return Err(BundleError::Malformed {
                reason: "a frame is larger than any envelope",
            });
        }
        self.hasher.update(prefix);
        let mut bytes = vec![0u8; length];
        self.input
            .read_exact(&mut bytes)
            .map_err(|_| BundleError::Malformed {
                reason: "it ends inside a frame (cut short?)",
            })?;
        self.hasher.update(&bytes);
        self.bytes += length as u64;
        Ok(Some(bytes))
    }

    fn check_signature(&mut self) -> Result<(), BundleError> {
        let mut signature = [0u8; 64];
        self.input
            .read_exact(&mut signature)
            .map_err(|_| BundleError::Malformed {
                reason: "it ends inside its signature (cut short?)",
            })?;
        self.bytes += 64;
        let mut rest = [0u8; 1];
        if self.input.read(&mut rest)? != 0 {
            return Err(BundleError::Malformed {
                reason: "bytes follow its signature",
            });
        }
        let digest = self.hasher.clone().finalize();
        let key = VerifyingKey::from_bytes(&self.header.created_by.0)
            .map_err(|_| BundleError::BadSignature)?;
        key.verify_strict(
            &signing_message(&digest),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| BundleError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_frames(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Hashing {
            inner: Vec::new(),
            hasher: Sha256::new(),
            bytes: 0,
        };
        out.put(MAGIC).unwrap();
        for frame in frames {
            out.frame(frame).unwrap();
        }
        out.inner
    }

    #[test]
    fn a_bundle_cut_short_or_altered_is_refused_with_a_reason() {
        assert!(matches!(
            BundleReader::open(&b"GARBAGE"[..]),
            Err(BundleError::Malformed { .. })
        ));
        let mut header = Vec::new();
        ciborium::into_writer(
            &BundleHeader {
                created_by: Bytes32([9; 32]),
                created_at_ms: 1,
                documents: 1,
            },
            &mut header,
        )
        .unwrap();
        let bytes = write_frames(&[&header, b"envelope"]);
        let mut reader = BundleReader::open(bytes.as_slice()).unwrap();
        assert_eq!(reader.next_envelope().unwrap().unwrap(), b"envelope");
        let error = reader.next_envelope().unwrap_err().to_string();
        assert!(error.contains("cut short"), "{error}");

        let mut signed = bytes.clone();
        signed.extend_from_slice(&0u32.to_be_bytes());
        signed.extend_from_slice(&[0u8; 64]);
        assert!(matches!(
            BundleReader::open(signed.as_slice()).unwrap().check(),
            Err(BundleError::BadSignature)
        ));
    }
}

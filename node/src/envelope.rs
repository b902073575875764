//! Signed change envelopes: how a change travels between nodes and is stored.
//!
//! An envelope carries one automerge change, the document it belongs to, and the author's
//! ed25519 signature over `estuary/change/v1 ‖ document id ‖ change hash`. The document id is
//! signed too, so a change cannot be replayed into another document; the author is read from
//! the change's automerge actor: the signing node's public key, followed by the incarnation
//! of its store (see `ACTOR_INCARNATION_BYTES`).

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::cbor::CborError;
use crate::identity::Identity;
use crate::model::automerge::{Change, ChangeHash};
use crate::model::{Bytes32, DocumentId, LoadError, decode_change};

/// Bytes after the node key in a node's automerge actor: a random incarnation, kept with the
/// store and drawn anew for a new store and whenever the store is found to have lost
/// acknowledged changes. automerge refuses a second change with an actor and sequence number it holds, so a
/// node whose store lost its tail (or was restored from an older copy) must never write as
/// the actor it wrote as before: with the key alone it would reuse sequence numbers its peers
/// hold, and the document would split for good. Actors of exactly 32 bytes (the key alone)
/// are still read, as earlier releases wrote them.
pub const ACTOR_INCARNATION_BYTES: usize = 8;

/// The node key an automerge actor belongs to: the actor's first 32 bytes, when the actor is
/// a key alone or a key and an incarnation.
pub fn author_of(actor: &[u8]) -> Option<[u8; 32]> {
    match actor.len() {
        32 => actor.try_into().ok(),
        n if n == 32 + ACTOR_INCARNATION_BYTES => actor.get(..32)?.try_into().ok(),
        _ => None,
    }
}

/// The envelope format this build writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
/// Largest automerge change an envelope may carry, in bytes.
pub const CHANGE_BYTES_MAX: usize = 512 * 1024;
/// Largest change, in bytes, a node puts in its own envelope uncompressed (`Envelope::sign_own`).
pub const OWN_CHANGE_PLAIN_BYTES_MAX: usize = 4 * 1024;
const _: () = assert!(OWN_CHANGE_PLAIN_BYTES_MAX <= CHANGE_BYTES_MAX);
/// Largest encoded envelope, in bytes: the change plus room for ids, signature and framing.
/// Checked before anything is decoded or allocated.
pub const ENVELOPE_BYTES_MAX: usize = CHANGE_BYTES_MAX + 1024;
/// Domain separation for change signatures.
const SIGNING_DOMAIN: &[u8] = b"estuary/change/v1";

/// Why an envelope was refused. None of these carries patient data.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Larger than `ENVELOPE_BYTES_MAX`; refused before decoding.
    #[error("envelope of {bytes} bytes exceeds the {ENVELOPE_BYTES_MAX}-byte limit")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
    /// Not an envelope.
    #[error("malformed envelope: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// Written by a newer format.
    #[error(
        "envelope version {found} is not supported (this build reads {ENVELOPE_VERSION}); upgrade the node"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// The carried bytes are not an automerge change.
    #[error("the envelope's change is unreadable: {0}")]
    Change(#[from] LoadError),
    /// The change's author is not an ed25519 public key.
    #[error("the change's author is not a node key")]
    NotANodeKey,
    /// The signature does not verify against the author's key.
    #[error("the signature does not match the change and its author")]
    BadSignature,
}

/// An envelope as it is encoded (CBOR, byte fields as byte strings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version.
    pub version: u8,
    /// The document the change belongs to (16 bytes).
    #[serde(with = "serde_bytes")]
    pub document: Vec<u8>,
    /// The automerge change.
    #[serde(with = "serde_bytes")]
    pub change: Vec<u8>,
    /// Ed25519 signature by the change's author (64 bytes).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A change whose envelope decoded and whose signature verified.
#[derive(Clone, Debug)]
pub struct VerifiedChange {
    /// The document it belongs to.
    pub document: DocumentId,
    /// The change's hash.
    pub hash: ChangeHash,
    /// The author's public key.
    pub author: Bytes32,
    /// The decoded change.
    pub change: Change,
    /// The envelope, encoded, as it is stored and forwarded.
    pub encoded: Vec<u8>,
}

fn signing_message(document: &DocumentId, hash: &ChangeHash) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNING_DOMAIN.len() + 16 + 32);
    message.extend_from_slice(SIGNING_DOMAIN);
    message.extend_from_slice(document.as_bytes());
    message.extend_from_slice(&hash.0);
    message
}

impl Envelope {
    /// Signs `change` of `document` as `identity`.
    pub fn sign(identity: &Identity, document: DocumentId, change: &mut Change) -> Self {
        let signature = sign_change(identity, &document, &change.hash());
        Self::seal(document, change, &signature)
    }

    /// Signs `change` of `document` as `identity` for this node's own pipeline: the envelope
    /// gets every check `decode` makes (sizes, encoding), but the signature, just made with
    /// the node's own key, is not verified again.
    ///
    /// A change of at most `OWN_CHANGE_PLAIN_BYTES_MAX` travels as automerge encodes it
    /// uncompressed: deflating a change of a few hundred bytes, as an app's writes are, cost
    /// about a twentieth of a write's CPU to save about an eighth of its bytes (381 against
    /// 339 bytes on average for the changes of realistic files). The signature covers the
    /// change's hash, not its bytes, and every reader takes either form. A larger change goes
    /// compressed, as peers rebuild it (`seal`): its size decides whether gossip carries it.
    pub fn sign_own(
        identity: &Identity,
        document: DocumentId,
        mut change: Change,
    ) -> Result<VerifiedChange, EnvelopeError> {
        let signature = sign_change(identity, &document, &change.hash());
        let bytes = if change.raw_bytes().len() <= OWN_CHANGE_PLAIN_BYTES_MAX {
            change.raw_bytes().to_vec()
        } else {
            change.bytes().into_owned()
        };
        let encoded = Self::of_bytes(document, bytes, &signature).encode();
        Self::decode(&encoded)?;
        Ok(VerifiedChange {
            document,
            hash: change.hash(),
            author: identity.public_key(),
            change,
            encoded,
        })
    }

    /// Encodes the envelope.
    pub fn encode(&self) -> Vec<u8> {
        crate::cbor::encode(self)
    }

    /// Decodes an envelope, refusing oversized input before decoding it. Only the encoding
    /// `encode` writes is taken: an envelope is stored, quarantined and gossiped under the
    /// digest of its bytes, so its CBOR must not have several encodings that all verify. (The
    /// change inside may be automerge's compressed or uncompressed chunk: a node's own small
    /// changes travel uncompressed and peers rebuild them compressed, so a refused change may
    /// be recorded under both.)
    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() > ENVELOPE_BYTES_MAX {
            return Err(EnvelopeError::TooLarge { bytes: bytes.len() });
        }
        let envelope: Self =
            crate::cbor::decode_exact(bytes).map_err(|error| EnvelopeError::Malformed {
                reason: match error {
                    CborError::TrailingBytes { .. } => "trailing bytes after the envelope",
                    CborError::Malformed | CborError::NotCanonical => "not a CBOR envelope",
                },
            })?;
        if envelope.version != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion {
                found: envelope.version,
            });
        }
        // After the version: a newer format may well encode differently.
        if envelope.encode() != bytes {
            return Err(EnvelopeError::Malformed {
                reason: "not the envelope's canonical encoding (re-encoded on the way)",
            });
        }
        if envelope.document.len() != 16 || envelope.signature.len() != 64 {
            return Err(EnvelopeError::Malformed {
                reason: "document id or signature of the wrong length",
            });
        }
        if envelope.change.len() > CHANGE_BYTES_MAX {
            return Err(EnvelopeError::TooLarge { bytes: bytes.len() });
        }
        Ok(envelope)
    }

    /// Decodes and verifies an envelope: the change decodes, its author is an ed25519 key,
    /// and the signature verifies. Membership is the roster's business, not this function's.
    pub fn verify(bytes: &[u8]) -> Result<VerifiedChange, EnvelopeError> {
        let envelope = Self::decode(bytes)?;
        let change = decode_change(&envelope.change)?;
        let mut document = [0u8; 16];
        document.copy_from_slice(&envelope.document);
        let document = DocumentId::from_bytes(document);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&envelope.signature);
        let author = verify_signature(&document, &change, &signature)?;
        Ok(VerifiedChange {
            document,
            hash: change.hash(),
            author,
            change,
            encoded: bytes.to_vec(),
        })
    }

    /// The envelope of a change and its signature, as a peer sends them apart (a sync
    /// message, a fetched document).
    pub fn seal(document: DocumentId, change: &mut Change, signature: &[u8; 64]) -> Self {
        Self::of_bytes(document, change.bytes().into_owned(), signature)
    }

    /// The envelope of a change's bytes (automerge's chunk, compressed or not).
    fn of_bytes(document: DocumentId, change: Vec<u8>, signature: &[u8; 64]) -> Self {
        Self {
            version: ENVELOPE_VERSION,
            document: document.as_bytes().to_vec(),
            change,
            signature: signature.to_vec(),
        }
    }
}

/// The signature of the change `hash` of `document` by `identity`, as an envelope carries it
/// (for a document stored whole, whose change is never encoded on its own).
pub fn sign_change(identity: &Identity, document: &DocumentId, hash: &ChangeHash) -> [u8; 64] {
    identity.sign(&signing_message(document, hash))
}

/// Verifies `signature` over `change` in `document` against the change's author, as
/// `Envelope::verify` does for an envelope: the author is an ed25519 key, and the signature
/// verifies (strictly). Returns the author.
pub fn verify_signature(
    document: &DocumentId,
    change: &Change,
    signature: &[u8; 64],
) -> Result<Bytes32, EnvelopeError> {
    let author = author_of(change.actor_id().to_bytes()).ok_or(EnvelopeError::NotANodeKey)?;
    let key = VerifyingKey::from_bytes(&author).map_err(|_| EnvelopeError::NotANodeKey)?;
    key.verify_strict(
        &signing_message(document, &change.hash()),
        &Signature::from_bytes(signature),
    )
    .map_err(|_| EnvelopeError::BadSignature)?;
    Ok(Bytes32(author))
}

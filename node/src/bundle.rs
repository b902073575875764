//! Offline bundles: every document a node holds, in a file signed by the node's key, for a
//! courier to carry to a node the network cannot reach. The receiving node takes each document
//! as it takes one fetched from a peer, so a bundle can add nothing a peer could not have sent.
//!
//! The format streams both ways in bounded memory:
//! `MAGIC ‖ frame* ‖ end`, where a frame is `length (u32, big-endian) ‖ bytes`. The first
//! frame is the CBOR [`BundleHeader`] (with the exporter's signed roster); each following
//! frame is one document as a covered fetch carries it (`sync::protocol::CoveredDocument`,
//! CBOR: its automerge bytes and the signatures of its authors' latest changes, which vouch
//! for the rest; see `crate::authorship`). Bundles of format 1 (`MAGIC_V1`), written by
//! earlier releases, carry one envelope per frame instead, documents one after another and
//! each document's envelopes in causal order; they are still read. `end` is a zero length
//! followed by the 64-byte ed25519 signature of the exporting node over
//! `estuary/bundle/v1 ‖ SHA-256(everything before end)`.
//!
//! A bundle may be *sealed*: encrypted to one node's key, so that only that node can read it
//! however it travels. `SEALED_MAGIC ‖ recipient node key (32) ‖ ephemeral X25519 public key
//! (32) ‖ chunk*`. The sender does X25519 between a fresh ephemeral key and the recipient's
//! ed25519 key in Montgomery form; HKDF-SHA256 over the shared secret, with both public keys
//! in its info, gives a key used for this bundle alone. The whole bundle above is encrypted
//! with ChaCha20-Poly1305 in the STREAM construction (`aead::stream`, big-endian 32-bit
//! counter and a last-chunk flag in each nonce) in chunks of [`SEALED_CHUNK_BYTES`]; every
//! chunk is full but the last, which is shorter (empty if need be), so a file cut at any
//! point, chunks reordered or a byte changed fail to decrypt. Sealing hides the contents; who
//! exported the bundle is still proven by the signature inside, checked at import as ever.

use std::io::{Read, Write};

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use curve25519_dalek::MontgomeryPoint;
use ed25519_dalek::{Signature, VerifyingKey};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::envelope::ENVELOPE_BYTES_MAX;
use crate::identity::Identity;
use crate::model::{Bytes32, DocumentId};
use crate::replica::{Node, NodeError};

/// The first bytes of every bundle this build writes (format 2: a document per frame).
pub const MAGIC: &[u8; 16] = b"ESTUARY-BUNDLE2\n";
/// The first bytes of a bundle of format 1 (an envelope per frame), which earlier releases
/// wrote; still read.
pub const MAGIC_V1: &[u8; 16] = b"ESTUARY-BUNDLE1\n";
/// What every bundle's magic starts with, before its format's digit.
const MAGIC_STEM: &[u8] = b"ESTUARY-BUNDLE";
/// Largest document frame, in bytes: a document as large as a fetch answer may carry, with
/// as many signatures as one document may have.
pub const BUNDLE_DOCUMENT_BYTES_MAX: usize = crate::sync::protocol::RESPONSE_BYTES_MAX as usize
    + crate::sync::protocol::SYNC_SIGNATURES_MAX * crate::sync::protocol::COVER_ENTRY_BYTES
    + 1024;
const SIGNING_DOMAIN: &[u8] = b"estuary/bundle/v1";
/// Largest header frame, in bytes: a few fields and the signed roster.
const HEADER_BYTES_MAX: usize = 4 * 1024 + crate::membership::SIGNED_ROSTER_BYTES_MAX;
/// Most envelopes one bundle may hold: 700,000 files of a few dozen changes each.
pub const BUNDLE_ENVELOPES_MAX: u64 = 100_000_000;
/// The first bytes of a bundle sealed to one node's key; the digit is the sealed format's
/// version.
pub const SEALED_MAGIC: &[u8; 16] = b"ESTUARY-SEALED1\n";
/// Bytes of a sealed bundle before its first chunk: magic, recipient key, ephemeral key.
const SEALED_HEADER_BYTES: usize = 16 + 32 + 32;
/// Plaintext bytes in each sealed chunk but the last: reading or writing holds one chunk, and
/// the 16-byte tag of each costs 0.02 %.
pub const SEALED_CHUNK_BYTES: usize = 64 * 1024;
/// The Poly1305 tag after each chunk's ciphertext.
const SEALED_TAG_BYTES: usize = 16;
/// HKDF info for a sealed bundle's key; the recipient's key (ed25519, then X25519) and the
/// ephemeral public key follow it.
const SEALING_DOMAIN: &[u8] = b"estuary/sealed-bundle/v1";

/// Why a bundle could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing the bytes failed.
    #[error("bundle I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The node's store failed.
    #[error(transparent)]
    Node(#[from] Box<NodeError>),
    /// The bytes are not a bundle of a format this build reads.
    #[error("not an Estuary bundle (formats 1 and 2): {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// A bundle of a format newer than this build reads.
    #[error(
        "this bundle is of format {found}, newer than this build reads (formats 1 and 2); \
         import it on a node of a newer release, or upgrade this one"
    )]
    NewerFormat {
        /// The format's digit as the bundle names it.
        found: char,
    },
    /// The signature does not verify: the bundle was altered or truncated after export.
    #[error("the bundle's signature does not verify: it was altered or cut short after export")]
    BadSignature,
    /// The bundle is sealed: it opens only with the key of the node it is encrypted to.
    #[error(
        "this bundle is encrypted to node key {}…; it opens only with that node's key",
        short_key(.recipient)
    )]
    Sealed {
        /// The node key it is encrypted to.
        recipient: Bytes32,
    },
    /// The bundle is sealed to another node's key.
    #[error(
        "this bundle is encrypted to node key {}…, not to this node's ({}…); take it to that node",
        short_key(.recipient),
        short_key(.this_node)
    )]
    NotForThisNode {
        /// The node key it is encrypted to.
        recipient: Bytes32,
        /// This node's key.
        this_node: Bytes32,
    },
    /// A sealed bundle does not decrypt.
    #[error(
        "the encrypted bundle does not decrypt: it was altered or cut short after export (export it again)"
    )]
    SealBroken,
    /// A bundle cannot be sealed to this key.
    #[error("cannot encrypt to node key {}…: {reason}", short_key(.recipient))]
    BadRecipient {
        /// The key asked for.
        recipient: Bytes32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The operating system's random source failed.
    #[error("no randomness available to encrypt the bundle: {0}")]
    Randomness(getrandom::Error),
}

/// The first 16 hex digits of a key: enough for a person to tell nodes apart.
fn short_key(key: &Bytes32) -> String {
    key.to_string()[..16].to_owned()
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
    /// The roster the exporting node held, as the authority signed it: the importing node
    /// adopts it, when newer, before any envelope, so an erasure or a revocation in it is in
    /// force before the bundle's changes are decided. Absent from bundles of earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster: Option<serde_bytes::ByteBuf>,
}

/// What an export or a check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleSummary {
    /// The header.
    pub header: BundleHeader,
    /// Envelopes in the bundle (format 1).
    pub envelopes: u64,
    /// Documents in the bundle (format 2).
    #[serde(default)]
    pub documents: u64,
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
        roster: Some(serde_bytes::ByteBuf::from(node.signed_roster())),
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
    let mut documents = 0u64;
    for (done, id) in ids.iter().enumerate() {
        // A document erased or set aside since the catalogue was read is not held any more.
        if let Some((saved, signatures)) = node.whole_document(*id, true).map_err(Box::new)? {
            let document = crate::sync::protocol::FetchedDocument::new(*id, saved, signatures);
            out.frame(&crate::cbor::encode(
                &crate::sync::protocol::CoveredDocument::from(&document),
            ))?;
            documents += 1;
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
        envelopes: 0,
        documents,
        bytes: out.bytes + 4 + 64,
    })
}

/// What one frame of a bundle carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleItem {
    /// An envelope (format 1).
    Envelope(Vec<u8>),
    /// A document as a covered fetch carries it, CBOR (format 2).
    Document(Vec<u8>),
}

/// Reads a bundle frame by frame.
pub struct BundleReader<R> {
    input: Source<R>,
    hasher: Sha256,
    header: BundleHeader,
    /// The bundle's format: 1 or 2.
    format: u8,
    envelopes: u64,
    documents: u64,
    bytes: u64,
    ended: bool,
}

/// A bundle's bytes: as they are, or decrypted chunk by chunk.
enum Source<R> {
    Clear(R),
    Sealed(Box<SealedReader<R>>),
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Clear(input) => input.read(buffer),
            Source::Sealed(input) => input.read(buffer),
        }
    }
}

/// The error for a failed read: a sealed chunk that does not decrypt, or `malformed`.
fn read_failure(error: &std::io::Error, malformed: &'static str) -> BundleError {
    if error.get_ref().is_some_and(|e| e.is::<ChunkRefused>()) {
        BundleError::SealBroken
    } else {
        BundleError::Malformed { reason: malformed }
    }
}

fn read_magic(input: &mut impl Read) -> Result<[u8; 16], BundleError> {
    let mut magic = [0u8; 16];
    input
        .read_exact(&mut magic)
        .map_err(|e| read_failure(&e, "shorter than a bundle's first line"))?;
    Ok(magic)
}

impl<R: Read> BundleReader<R> {
    /// Reads the magic and the header of a bundle in clear; a sealed bundle is refused with
    /// [`BundleError::Sealed`], which names the key that opens it.
    pub fn open(mut input: R) -> Result<Self, BundleError> {
        let magic = read_magic(&mut input)?;
        if &magic == SEALED_MAGIC {
            let (recipient, _) = read_sealed_header(&mut input)?;
            return Err(BundleError::Sealed { recipient });
        }
        Self::start(Source::Clear(input), magic)
    }

    /// Reads a bundle in clear, or one sealed to `identity`, which decrypts it as it is read.
    pub fn open_with_key(mut input: R, identity: &Identity) -> Result<Self, BundleError> {
        let magic = read_magic(&mut input)?;
        if &magic != SEALED_MAGIC {
            return Self::start(Source::Clear(input), magic);
        }
        let (recipient, ephemeral) = read_sealed_header(&mut input)?;
        let this_node = identity.public_key();
        if recipient != this_node {
            return Err(BundleError::NotForThisNode {
                recipient,
                this_node,
            });
        }
        let shared = identity.key_agreement(&ephemeral);
        // A low-order ephemeral key gives an all-zero secret anyone can compute.
        if shared.iter().all(|b| *b == 0) {
            return Err(BundleError::SealBroken);
        }
        let key = sealing_key(&shared, &recipient, &ephemeral)?;
        let mut input = Source::Sealed(Box::new(SealedReader::new(input, &key)));
        let magic = read_magic(&mut input)?;
        Self::start(input, magic)
    }

    /// Checks the magic already read and reads the header.
    fn start(input: Source<R>, magic: [u8; 16]) -> Result<Self, BundleError> {
        let format = match &magic {
            m if m == MAGIC => 2,
            m if m == MAGIC_V1 => 1,
            m if m.starts_with(MAGIC_STEM) && m[15] == b'\n' && m[14].is_ascii_digit() => {
                return Err(BundleError::NewerFormat {
                    found: char::from(m[14]),
                });
            }
            _ => {
                return Err(BundleError::Malformed {
                    reason: "it does not start with ESTUARY-BUNDLE",
                });
            }
        };
        let mut reader = Self {
            input,
            hasher: Sha256::new(),
            header: BundleHeader {
                created_by: Bytes32([0; 32]),
                created_at_ms: 0,
                documents: 0,
                roster: None,
            },
            format,
            envelopes: 0,
            documents: 0,
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

    /// The next item, or `None` at the end, once the signature has been checked.
    pub fn next_item(&mut self) -> Result<Option<BundleItem>, BundleError> {
        if self.ended {
            return Ok(None);
        }
        let max = match self.format {
            1 => ENVELOPE_BYTES_MAX,
            _ => BUNDLE_DOCUMENT_BYTES_MAX,
        };
        match self.frame(max)? {
            Some(bytes) => {
                self.envelopes += u64::from(self.format == 1);
                self.documents += u64::from(self.format != 1);
                if self.envelopes + self.documents > BUNDLE_ENVELOPES_MAX {
                    return Err(BundleError::Malformed {
                        reason: "it holds more envelopes than any consortium has",
                    });
                }
                Ok(Some(match self.format {
                    1 => BundleItem::Envelope(bytes),
                    _ => BundleItem::Document(bytes),
                }))
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
        while self.next_item()?.is_some() {}
        Ok(BundleSummary {
            header: self.header,
            envelopes: self.envelopes,
            documents: self.documents,
            bytes: self.bytes,
        })
    }

    /// A frame of at most `max` bytes; `None` at the end marker.
    fn frame(&mut self, max: usize) -> Result<Option<Vec<u8>>, BundleError> {
        let mut prefix = [0u8; 4];
        self.input
            .read_exact(&mut prefix)
            .map_err(|e| read_failure(&e, "it ends without its signature (cut short?)"))?;
        self.bytes += 4;
        let length = u32::from_be_bytes(prefix) as usize;
        if length == 0 {
            return Ok(None);
        }
        if length > max {
            return Err(BundleError::Malformed {
                reason: "a frame is larger than any envelope or document",
            });
        }
        self.hasher.update(prefix);
        let mut bytes = vec![0u8; length];
        self.input
            .read_exact(&mut bytes)
            .map_err(|e| read_failure(&e, "it ends inside a frame (cut short?)"))?;
        self.hasher.update(&bytes);
        self.bytes += length as u64;
        Ok(Some(bytes))
    }

    fn check_signature(&mut self) -> Result<(), BundleError> {
        let mut signature = [0u8; 64];
        self.input
            .read_exact(&mut signature)
            .map_err(|e| read_failure(&e, "it ends inside its signature (cut short?)"))?;
        self.bytes += 64;
        let mut rest = [0u8; 1];
        let after = self.input.read(&mut rest).map_err(|e| {
            if e.get_ref().is_some_and(|e| e.is::<ChunkRefused>()) {
                BundleError::SealBroken
            } else {
                BundleError::Io(e)
            }
        })?;
        if after != 0 {
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

/// The recipient's key and the ephemeral public key, after the sealed magic.
fn read_sealed_header(input: &mut impl Read) -> Result<(Bytes32, [u8; 32]), BundleError> {
    let mut keys = [0u8; SEALED_HEADER_BYTES - 16];
    input
        .read_exact(&mut keys)
        .map_err(|_| BundleError::SealBroken)?;
    let (recipient, ephemeral) = keys.split_at(32);
    Ok((
        Bytes32(recipient.try_into().expect("32 bytes")),
        ephemeral.try_into().expect("32 bytes"),
    ))
}

/// The key of one sealed bundle, from the X25519 secret and both public keys.
fn sealing_key(
    shared: &[u8; 32],
    recipient: &Bytes32,
    ephemeral: &[u8; 32],
) -> Result<Zeroizing<[u8; 32]>, BundleError> {
    let recipient_x25519 = VerifyingKey::from_bytes(&recipient.0)
        .map_err(|_| BundleError::BadRecipient {
            recipient: *recipient,
            reason: "it is not an ed25519 public key",
        })?
        .to_montgomery();
    let info = [
        SEALING_DOMAIN,
        &recipient.0,
        recipient_x25519.as_bytes(),
        ephemeral,
    ]
    .concat();
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, shared)
        .expand(&info, key.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Ok(key)
}

/// The STREAM nonce prefix. Each bundle's key is new (a fresh ephemeral key), so nonces need
/// to be unique within one bundle only, which the counter and the last-chunk flag make them.
const NONCE_PREFIX: [u8; 7] = [0; 7];

/// Writes a bundle sealed to one node's key; call [`SealedWriter::finish`] to write the last
/// chunk (without it, the file reads as cut short).
pub struct SealedWriter<W: Write> {
    inner: W,
    encryptor: EncryptorBE32<ChaCha20Poly1305>,
    /// Plaintext waiting for a full chunk, then its ciphertext in place.
    chunk: Vec<u8>,
}

impl<W: Write> SealedWriter<W> {
    /// Writes the sealed header to `inner` for the node whose key is `recipient`.
    pub fn new(mut inner: W, recipient: &Bytes32) -> Result<Self, BundleError> {
        let recipient_x25519 = VerifyingKey::from_bytes(&recipient.0)
            .map_err(|_| BundleError::BadRecipient {
                recipient: *recipient,
                reason: "it is not an ed25519 public key",
            })?
            .to_montgomery();
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut()).map_err(BundleError::Randomness)?;
        let ephemeral = MontgomeryPoint::mul_base_clamped(*secret).to_bytes();
        let shared = Zeroizing::new(recipient_x25519.mul_clamped(*secret).to_bytes());
        if shared.iter().all(|b| *b == 0) {
            return Err(BundleError::BadRecipient {
                recipient: *recipient,
                reason: "it is a low-order point, which no node key is",
            });
        }
        let key = sealing_key(&shared, recipient, &ephemeral)?;
        inner.write_all(SEALED_MAGIC)?;
        inner.write_all(&recipient.0)?;
        inner.write_all(&ephemeral)?;
        Ok(Self {
            inner,
            encryptor: EncryptorBE32::from_aead(
                ChaCha20Poly1305::new((&*key).into()),
                (&NONCE_PREFIX).into(),
            ),
            chunk: Vec::with_capacity(SEALED_CHUNK_BYTES + SEALED_TAG_BYTES),
        })
    }

    /// Encrypts and writes the last chunk (shorter than the others, perhaps empty), flushes,
    /// and gives the inner writer back.
    pub fn finish(self) -> Result<W, BundleError> {
        let Self {
            mut inner,
            encryptor,
            mut chunk,
        } = self;
        encryptor
            .encrypt_last_in_place(b"", &mut chunk)
            .map_err(|_| std::io::Error::other("a bundle chunk could not be encrypted"))?;
        inner.write_all(&chunk)?;
        inner.flush()?;
        Ok(inner)
    }

    fn seal_full_chunk(&mut self) -> std::io::Result<()> {
        debug_assert_eq!(self.chunk.len(), SEALED_CHUNK_BYTES);
        self.encryptor
            .encrypt_next_in_place(b"", &mut self.chunk)
            .map_err(|_| {
                std::io::Error::other("a bundle holds more chunks than the STREAM counter allows")
            })?;
        self.inner.write_all(&self.chunk)?;
        self.chunk.clear();
        Ok(())
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let taken = bytes.len().min(SEALED_CHUNK_BYTES - self.chunk.len());
        self.chunk.extend_from_slice(&bytes[..taken]);
        // A full chunk goes out at once, so the one left for `finish` is always short.
        if self.chunk.len() == SEALED_CHUNK_BYTES {
            self.seal_full_chunk()?;
        }
        Ok(taken)
    }

    /// Flushes what has been sealed; a partial chunk stays until it fills or `finish`.
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The error a [`SealedReader`] reads as when a chunk does not decrypt.
#[derive(Debug, thiserror::Error)]
#[error("a sealed chunk does not decrypt")]
struct ChunkRefused;

/// Decrypts a sealed bundle's chunks as they are read.
struct SealedReader<R> {
    inner: R,
    /// `None` once the last chunk has been opened, or one has failed.
    decryptor: Option<DecryptorBE32<ChaCha20Poly1305>>,
    refused: bool,
    /// The current chunk: ciphertext as read, then its plaintext in place.
    chunk: Vec<u8>,
    position: usize,
}

impl<R: Read> SealedReader<R> {
    fn new(inner: R, key: &[u8; 32]) -> Self {
        Self {
            inner,
            decryptor: Some(DecryptorBE32::from_aead(
                ChaCha20Poly1305::new(key.into()),
                (&NONCE_PREFIX).into(),
            )),
            refused: false,
            chunk: Vec::with_capacity(SEALED_CHUNK_BYTES + SEALED_TAG_BYTES),
            position: 0,
        }
    }

    /// Reads and opens the next chunk: a full one is never the last, a short one always is.
    fn next_chunk(&mut self) -> std::io::Result<()> {
        let full = SEALED_CHUNK_BYTES + SEALED_TAG_BYTES;
        self.chunk.resize(full, 0);
        self.position = 0;
        let mut filled = 0;
        while filled < full {
            match self.inner.read(&mut self.chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.chunk.truncate(filled);
        let opened = match self.decryptor.take() {
            Some(mut decryptor) if filled == full => {
                let opened = decryptor.decrypt_next_in_place(b"", &mut self.chunk);
                self.decryptor = Some(decryptor);
                opened
            }
            Some(decryptor) => decryptor.decrypt_last_in_place(b"", &mut self.chunk),
            None => unreachable!("no chunk is read after the last"),
        };
        opened.map_err(|_| {
            self.refused = true;
            self.decryptor = None;
            self.chunk.clear();
            std::io::Error::new(std::io::ErrorKind::InvalidData, ChunkRefused)
        })
    }
}

impl<R: Read> Read for SealedReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        while self.position == self.chunk.len() {
            if self.refused {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    ChunkRefused,
                ));
            }
            if self.decryptor.is_none() {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = buffer.len().min(self.chunk.len() - self.position);
        buffer[..n].copy_from_slice(&self.chunk[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header frame of a bundle exported by key `[9; 32]`.
    fn header_frame() -> Vec<u8> {
        let mut header = Vec::new();
        ciborium::into_writer(
            &BundleHeader {
                created_by: Bytes32([9; 32]),
                created_at_ms: 1,
                documents: 1,
                roster: None,
            },
            &mut header,
        )
        .unwrap();
        header
    }

    fn write_frames(frames: &[&[u8]]) -> Vec<u8> {
        write_frames_as(MAGIC, frames)
    }

    fn write_frames_as(magic: &[u8; 16], frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Hashing {
            inner: Vec::new(),
            hasher: Sha256::new(),
            bytes: 0,
        };
        out.put(magic).unwrap();
        for frame in frames {
            out.frame(frame).unwrap();
        }
        out.inner
    }

    /// A bundle in clear of `envelopes`, signed by `signer`.
    fn signed_bundle(signer: &Identity, envelopes: &[Vec<u8>]) -> Vec<u8> {
        let mut header = Vec::new();
        ciborium::into_writer(
            &BundleHeader {
                created_by: signer.public_key(),
                created_at_ms: 1,
                documents: 1,
                roster: None,
            },
            &mut header,
        )
        .unwrap();
        let mut frames: Vec<&[u8]> = vec![&header];
        frames.extend(envelopes.iter().map(Vec::as_slice));
        let mut out = Hashing {
            inner: Vec::new(),
            hasher: Sha256::new(),
            bytes: 0,
        };
        out.put(MAGIC).unwrap();
        for frame in frames {
            out.frame(frame).unwrap();
        }
        let digest = out.hasher.clone().finalize();
        let mut bytes = out.inner;
        bytes.extend_from_slice(&0u32.to_be_bytes());
        bytes.extend_from_slice(&signer.sign(&signing_message(&digest)));
        bytes
    }

    fn seal(plain: &[u8], recipient: &Identity) -> Vec<u8> {
        let mut writer = SealedWriter::new(Vec::new(), &recipient.public_key()).unwrap();
        // Odd-sized writes, so chunks fill across them.
        for piece in plain.chunks(1_000) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap()
    }

    /// Opens sealed bytes as `open_with_key` does, without reading them as a bundle.
    fn unseal(sealed: &[u8], recipient: &Identity) -> std::io::Result<Vec<u8>> {
        let mut input = sealed;
        assert_eq!(&read_magic(&mut input).unwrap(), SEALED_MAGIC);
        let (to, ephemeral) = read_sealed_header(&mut input).unwrap();
        let shared = recipient.key_agreement(&ephemeral);
        let key = sealing_key(&shared, &to, &ephemeral).unwrap();
        let mut plain = Vec::new();
        SealedReader::new(input, &key).read_to_end(&mut plain)?;
        Ok(plain)
    }

    #[test]
    fn sealed_chunks_round_trip_and_any_cut_is_refused() {
        let recipient = Identity::from_secret([3; 32]);
        for length in [
            0,
            1,
            SEALED_CHUNK_BYTES - 1,
            SEALED_CHUNK_BYTES,
            SEALED_CHUNK_BYTES + 1,
            2 * SEALED_CHUNK_BYTES,
            2 * SEALED_CHUNK_BYTES + 7,
        ] {
            let plain: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
            let sealed = seal(&plain, &recipient);
            let chunks = length / SEALED_CHUNK_BYTES + 1;
            assert_eq!(
                sealed.len(),
                SEALED_HEADER_BYTES + length + chunks * SEALED_TAG_BYTES
            );
            assert_eq!(unseal(&sealed, &recipient).unwrap(), plain, "{length}");
            // Cut at every chunk boundary, and one byte short.
            let mut cuts: Vec<usize> = (0..chunks)
                .map(|i| SEALED_HEADER_BYTES + i * (SEALED_CHUNK_BYTES + SEALED_TAG_BYTES))
                .collect();
            cuts.push(sealed.len() - 1);
            for cut in cuts {
                let error = unseal(&sealed[..cut], &recipient).unwrap_err();
                assert!(
                    error.get_ref().unwrap().is::<ChunkRefused>(),
                    "{length} {cut}"
                );
            }
            // Bytes after the last chunk make it a full chunk, or a wrong last one.
            let mut longer = sealed.clone();
            longer.push(0);
            assert!(unseal(&longer, &recipient).is_err(), "{length}");
        }
    }

    #[test]
    fn a_sealed_bundle_opens_only_with_its_recipients_key_and_only_unaltered() {
        let exporter = Identity::from_secret([2; 32]);
        let recipient = Identity::from_secret([3; 32]);
        let other = Identity::from_secret([4; 32]);
        let documents: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 5_000]).collect();
        let plain = signed_bundle(&exporter, &documents);
        let sealed = seal(&plain, &recipient);
        assert!(sealed.starts_with(SEALED_MAGIC));
        assert!(!sealed.windows(5_000).any(|w| w == documents[7].as_slice()));

        let summary = BundleReader::open_with_key(sealed.as_slice(), &recipient)
            .unwrap()
            .check()
            .unwrap();
        assert_eq!(summary.documents, 40);
        assert_eq!(summary.header.created_by, exporter.public_key());
        // A bundle in clear opens with a key as well.
        let clear = BundleReader::open_with_key(plain.as_slice(), &recipient)
            .unwrap()
            .check()
            .unwrap();
        assert_eq!(clear, summary);

        match BundleReader::open(sealed.as_slice()) {
            Err(BundleError::Sealed { recipient: to }) => {
                assert_eq!(to, recipient.public_key());
            }
            _ => panic!("a sealed bundle opens in clear"),
        }
        let error = BundleReader::open_with_key(sealed.as_slice(), &other)
            .err()
            .expect("another node's key opens the bundle");
        assert!(matches!(error, BundleError::NotForThisNode { .. }));
        let text = error.to_string();
        assert!(
            text.contains(&recipient.public_key().to_string()[..16])
                && text.contains(&other.public_key().to_string()[..16]),
            "{text}"
        );

        let open = |bytes: &[u8]| {
            BundleReader::open_with_key(bytes, &recipient).and_then(BundleReader::check)
        };
        // The recipient's key, the ephemeral key, the first chunk, a middle one, the last tag.
        for position in [
            20,
            60,
            SEALED_HEADER_BYTES + 3,
            SEALED_HEADER_BYTES + SEALED_CHUNK_BYTES + 100,
            sealed.len() - 1,
        ] {
            let mut altered = sealed.clone();
            altered[position] ^= 0x20;
            match open(&altered) {
                Err(BundleError::SealBroken) => {}
                Err(BundleError::NotForThisNode { .. }) if position < 48 => {}
                other => panic!("byte {position} altered: {:?}", other.map(|s| s.envelopes)),
            }
        }
        for cut in [
            30,
            SEALED_HEADER_BYTES,
            SEALED_HEADER_BYTES + SEALED_CHUNK_BYTES + SEALED_TAG_BYTES,
            sealed.len() - 1,
        ] {
            assert!(
                matches!(open(&sealed[..cut]), Err(BundleError::SealBroken)),
                "cut at {cut}"
            );
        }
        // Two full chunks swapped.
        let mut swapped = sealed.clone();
        let size = SEALED_CHUNK_BYTES + SEALED_TAG_BYTES;
        let (first, second) = swapped[SEALED_HEADER_BYTES..].split_at_mut(size);
        first.swap_with_slice(&mut second[..size]);
        assert!(matches!(open(&swapped), Err(BundleError::SealBroken)));
    }

    #[test]
    fn a_bundle_of_format_one_reads_as_envelopes_and_a_newer_format_is_refused_by_name() {
        let header = header_frame();
        let old = write_frames_as(MAGIC_V1, &[&header, b"envelope"]);
        let mut reader = BundleReader::open(old.as_slice()).unwrap();
        assert_eq!(
            reader.next_item().unwrap().unwrap(),
            BundleItem::Envelope(b"envelope".to_vec())
        );
        let newer = write_frames_as(b"ESTUARY-BUNDLE7\n", &[&header]);
        let error = BundleReader::open(newer.as_slice()).err().unwrap();
        assert!(matches!(error, BundleError::NewerFormat { found: '7' }));
        assert!(error.to_string().contains("format 7"), "{error}");
    }

    #[test]
    fn a_bundle_cut_short_or_altered_is_refused_with_a_reason() {
        assert!(matches!(
            BundleReader::open(&b"GARBAGE"[..]),
            Err(BundleError::Malformed { .. })
        ));
        let header = header_frame();
        let bytes = write_frames(&[&header, b"envelope"]);
        let mut reader = BundleReader::open(bytes.as_slice()).unwrap();
        assert_eq!(
            reader.next_item().unwrap().unwrap(),
            BundleItem::Document(b"envelope".to_vec())
        );
        let error = reader.next_item().unwrap_err().to_string();
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

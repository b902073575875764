//! What nodes say to each other: request-response messages (CBOR, `/estuary/sync/1`) and
//! gossip messages. Every byte field is a CBOR byte string; every size has a named limit
//! checked before decoding; every message is decoded exactly (bytes after it are refused).
//! Records sent by the thousand (signatures, fetched documents) carry one-letter field names.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::{ByteArray, ByteBuf};

use crate::cbor::{self, CborError};
use crate::membership::SignedRoster;
use crate::reconcile::{Query, Reply};

/// The request-response protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/estuary/sync/1");
/// Largest request a node reads, in bytes: a sync message at its limits fits.
pub const REQUEST_BYTES_MAX: u64 = 5 * 1024 * 1024;
/// Largest response a node reads, in bytes.
pub const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Largest automerge sync message sent or taken, in bytes (under the request limit, with
/// room for the signatures beside it).
pub const SYNC_MESSAGE_BYTES_MAX: usize = 3 * 1024 * 1024;
/// Most signatures beside one sync message, and in one fetched document.
pub const SYNC_SIGNATURES_MAX: usize = 16_384;
/// Bytes one `ChangeSignature` takes on the wire: a map of two one-letter keys, a 32-byte
/// hash and a 64-byte signature, each with its CBOR header.
pub const SIGNATURE_ENTRY_BYTES: usize = 105;
/// Bytes of a sync request beside its message and signatures: the request's tag, the
/// document id, the field names, the headers of the message and of the signature list, the
/// first-message flag.
pub const SYNC_REQUEST_FRAMING_BYTES: usize = 96;
/// Most documents one fetch asks for.
pub const FETCH_DOCUMENTS_MAX: usize = 64;
/// Most envelope bytes in one fetch response; documents that do not fit are left out and
/// asked for again.
pub const FETCH_RESPONSE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Most bytes the documents of a `Response::FetchDeflated` inflate to: what a response
/// carrying them plainly could hold.
pub const FETCH_INFLATED_BYTES_MAX: u64 = RESPONSE_BYTES_MAX;
/// The deflate level of fetched documents: the fastest. Their automerge columns are
/// compressed already; what is left to find is the structure documents share, which the
/// fastest level finds at a fraction of the CPU the default spends.
const FETCH_DEFLATE_LEVEL: u32 = 1;
/// Largest gossip message, in bytes: an envelope up to `GOSSIP_ENVELOPE_BYTES_MAX`, or an
/// announcement, or a signed roster up to this size.
pub const GOSSIP_MESSAGE_BYTES_MAX: usize = 256 * 1024;
/// Envelopes above this size are announced on gossip, not carried: receivers pull them.
pub const GOSSIP_ENVELOPE_BYTES_MAX: usize = 64 * 1024;

/// The largest sync request or response a node sends: a message and its signatures at their
/// limits (`document::outgoing` sends no more).
pub const SYNC_REQUEST_BYTES_MAX: usize = SYNC_MESSAGE_BYTES_MAX
    + SYNC_SIGNATURES_MAX * SIGNATURE_ENTRY_BYTES
    + SYNC_REQUEST_FRAMING_BYTES;

// Each payload is within the message that carries it.
const _: () = {
    assert!(SYNC_REQUEST_BYTES_MAX as u64 <= REQUEST_BYTES_MAX);
    assert!(SYNC_REQUEST_BYTES_MAX as u64 <= RESPONSE_BYTES_MAX);
    assert!((FETCH_RESPONSE_BYTES_MAX as u64) < RESPONSE_BYTES_MAX);
    assert!(GOSSIP_ENVELOPE_BYTES_MAX < GOSSIP_MESSAGE_BYTES_MAX);
    // A fetched document's changes are proven at once (`crate::authorship`).
    assert!(crate::authorship::CHANGES_PROVEN_MAX == SYNC_SIGNATURES_MAX);
};

/// The request-response codec of `PROTOCOL`: one CBOR value per stream, read whole up to
/// `REQUEST_BYTES_MAX` or `RESPONSE_BYTES_MAX` and decoded exactly (bytes after the value
/// are refused, as is a message over its limit).
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

impl Codec {
    async fn read<M, T>(io: &mut T, bytes_max: u64) -> io::Result<M>
    where
        M: DeserializeOwned,
        T: AsyncRead + Unpin + Send,
    {
        let mut bytes = Vec::new();
        // One byte past the limit tells a message over it from one that just fits.
        io.take(bytes_max + 1).read_to_end(&mut bytes).await?;
        if bytes.len() as u64 > bytes_max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a sync message over the {bytes_max}-byte limit"),
            ));
        }
        Self::decode(&bytes)
    }

    /// Decodes one whole message exactly as it is read from a stream (the size is checked by
    /// the reader): what the fuzz target `sync_codec` runs.
    pub fn decode<M: DeserializeOwned>(bytes: &[u8]) -> io::Result<M> {
        cbor::decode_exact(bytes).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
    }

    async fn write<T>(io: &mut T, message: &impl Serialize) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&cbor::encode(message)).await
    }
}

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        Self::read(io, REQUEST_BYTES_MAX).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        Self::read(io, RESPONSE_BYTES_MAX).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Self::write(io, &request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Self::write(io, &response).await
    }
}

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A round of catalogue reconciliation.
    Reconcile(Query),
    /// A round of automerge's sync protocol for one document.
    Sync(SyncMessage),
    /// Every envelope of these documents (bulk catch-up of documents the asker lacks).
    Fetch {
        /// At most `FETCH_DOCUMENTS_MAX`.
        documents: Vec<ByteArray<16>>,
        /// The asker reads `Response::FetchDeflated`. A responder that predates it ignores the
        /// field and answers `Response::Fetch`.
        #[serde(default)]
        deflated: bool,
        /// The asker reads `Response::FetchCovered`: each document with only the signatures
        /// that prove its authors (`crate::authorship`). A responder that predates it ignores
        /// the field and answers as `deflated` says.
        #[serde(default)]
        covered: bool,
    },
    /// The responder's signed roster, if newer than the version the asker holds (asked at
    /// every connection and reconciliation, so a node that missed the roster gossip learns
    /// of a revocation all the same).
    Roster {
        /// The version the asker holds.
        have: u64,
        /// The asker also reads the documents the responder holds urgent
        /// (`Response::RosterAndUrgent`). A responder that predates it ignores the field and
        /// answers `Response::Roster`.
        #[serde(default)]
        urgent: bool,
    },
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The answer to a reconciliation round.
    Reconcile(Reply),
    /// The responder's next sync message, or `None` when it has nothing more to say.
    Sync(Option<SyncMessage>),
    /// The documents asked for, compressed, with their changes' signatures.
    Fetch {
        /// The documents.
        documents: Vec<FetchedDocument>,
        /// Documents left out for lack of room, to ask for again.
        deferred: Vec<ByteArray<16>>,
    },
    /// The documents asked for, as `Fetch` carries them, their CBOR deflated as one stream
    /// (see `deflate_fetched`): the documents of a batch share most of their structure (field
    /// names, actors, the signatures' framing), which each document's own compression cannot
    /// see. Sent only to an asker that said it reads it.
    FetchDeflated {
        /// `deflate(CBOR(Vec<FetchedDocument>))`, inflating to at most
        /// `FETCH_INFLATED_BYTES_MAX`.
        documents: ByteBuf,
        /// Documents left out for lack of room, to ask for again.
        deferred: Vec<ByteArray<16>>,
    },
    /// The documents asked for, each with the signatures of its authors' latest changes
    /// only, which vouch for the rest (`crate::authorship`), their CBOR deflated as one
    /// stream. Sent only to an asker that said it reads it.
    FetchCovered {
        /// `deflate(CBOR(Vec<CoveredDocument>))`, inflating to at most
        /// `FETCH_INFLATED_BYTES_MAX`.
        documents: ByteBuf,
        /// Documents left out for lack of room, to ask for again.
        deferred: Vec<ByteArray<16>>,
    },
    /// The responder's signed roster when it is newer than the asker's.
    Roster(Option<ByteBuf>),
    /// The same, with the documents the responder holds urgent (priority referrals in motion,
    /// health files whose allergies just changed), newest first, at most
    /// `URGENT_DOCUMENTS_MAX`: the asker fetches those it lacks ahead of
    /// anything else. Sent only to an asker that said it reads it.
    RosterAndUrgent {
        /// The responder's signed roster when it is newer than the asker's.
        roster: Option<ByteBuf>,
        /// The documents it holds urgent.
        urgent: Vec<UrgentDocument>,
    },
    /// The request was not served.
    Refused(Refusal),
}

/// A document a peer holds urgent, with the digest of its heads (as its catalogue holds it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrgentDocument {
    /// The document's id.
    pub document: ByteArray<16>,
    /// SHA-256 of its sorted heads.
    pub digest: ByteArray<32>,
}

/// Why a request was not served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// Too many requests from this peer at once or per second; ask again later.
    #[error("busy: too many requests from this peer")]
    Busy,
    /// The request breaks the protocol.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The responder failed (its store); not the asker's fault.
    #[error("the responder could not serve the request")]
    Failed,
    /// The responder's answer would exceed a sync message's limits (a large document): fetch
    /// the document instead.
    #[error("the answer is too large for a sync message; fetch the document")]
    TooLarge,
}

/// One round of automerge's sync protocol for a document, with the signature of every change
/// it carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMessage {
    /// The document.
    pub document: ByteArray<16>,
    /// Automerge's encoded sync message.
    pub message: ByteBuf,
    /// The author's signature of each change the message carries.
    pub signatures: Vec<ChangeSignature>,
    /// The first message of a session: the initiator starts from a fresh sync state, so the
    /// responder does too. A state kept from an earlier session believes changes were
    /// delivered whose delivery may have been lost with a cut connection or a timeout, and
    /// automerge never sends a change its state says it sent.
    #[serde(default)]
    pub first: bool,
}

/// A whole document as a fetch carries it: automerge's compressed save, and the signature of
/// every change in it. The receiver loads it into a scratch document and runs each change,
/// in its envelope, through the pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedDocument {
    /// The document.
    #[serde(rename = "d")]
    pub document: ByteArray<16>,
    /// `save()` of the document.
    #[serde(rename = "b")]
    pub saved: ByteBuf,
    /// The author's signature of each change.
    #[serde(rename = "s")]
    pub signatures: Vec<ChangeSignature>,
}

impl FetchedDocument {
    /// A document as `Node::whole_document` gives it: its bytes and signatures by change.
    pub fn new(
        document: crate::model::DocumentId,
        saved: Vec<u8>,
        signatures: Vec<(crate::model::automerge::ChangeHash, [u8; 64])>,
    ) -> Self {
        Self {
            document: ByteArray::new(*document.as_bytes()),
            saved: ByteBuf::from(saved),
            signatures: signatures
                .into_iter()
                .map(|(hash, signature)| ChangeSignature {
                    change: ByteArray::new(hash.0),
                    signature: ByteArray::new(signature),
                })
                .collect(),
        }
    }
}

/// A fetched document as `Response::FetchDeflated` carries it: its signatures without the
/// change hashes beside them, in the order of those hashes, which the receiver reads from the
/// document itself (32 bytes and their framing saved per change).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactDocument {
    /// The document.
    #[serde(rename = "d")]
    pub document: ByteArray<16>,
    /// Automerge bytes that load to the document.
    #[serde(rename = "b")]
    pub saved: ByteBuf,
    /// The author's signature of each change, 64 bytes each, ordered by change hash.
    #[serde(rename = "s")]
    pub signatures: ByteBuf,
}

impl From<&FetchedDocument> for CompactDocument {
    fn from(document: &FetchedDocument) -> Self {
        let mut signatures: Vec<&ChangeSignature> = document.signatures.iter().collect();
        signatures.sort_unstable_by_key(|s| *s.change);
        Self {
            document: document.document,
            saved: document.saved.clone(),
            signatures: ByteBuf::from(
                signatures
                    .iter()
                    .flat_map(|s| s.signature.iter().copied())
                    .collect::<Vec<u8>>(),
            ),
        }
    }
}

/// A fetched document as `Response::FetchCovered` carries it: the signatures that prove its
/// authors, each beside the hash of its change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoveredDocument {
    /// The document.
    #[serde(rename = "d")]
    pub document: ByteArray<16>,
    /// Automerge bytes that load to the document.
    #[serde(rename = "b")]
    pub saved: ByteBuf,
    /// `COVER_ENTRY_BYTES` per signature: the change hash (32 bytes), then the signature of
    /// its author over it (64 bytes).
    #[serde(rename = "s")]
    pub signatures: ByteBuf,
}

/// Bytes of one entry of `CoveredDocument::signatures`.
pub const COVER_ENTRY_BYTES: usize = 32 + 64;

impl From<&FetchedDocument> for CoveredDocument {
    fn from(document: &FetchedDocument) -> Self {
        Self {
            document: document.document,
            saved: document.saved.clone(),
            signatures: ByteBuf::from(
                document
                    .signatures
                    .iter()
                    .flat_map(|s| s.change.iter().chain(s.signature.iter()).copied())
                    .collect::<Vec<u8>>(),
            ),
        }
    }
}

impl CoveredDocument {
    /// Its signatures by change hash; `None` if they are not whole entries or more than one
    /// document may carry (`SYNC_SIGNATURES_MAX`).
    pub fn signatures(&self) -> Option<std::collections::HashMap<[u8; 32], [u8; 64]>> {
        let entries = self.signatures.chunks_exact(COVER_ENTRY_BYTES);
        if !entries.remainder().is_empty() || entries.len() > SYNC_SIGNATURES_MAX {
            return None;
        }
        entries
            .map(|entry| Some((entry[..32].try_into().ok()?, entry[32..].try_into().ok()?)))
            .collect()
    }
}

/// Fetched documents as `Response::FetchDeflated` carries them: compact, then deflated as
/// one stream.
pub fn deflate_fetched(documents: &[FetchedDocument]) -> Vec<u8> {
    let compact: Vec<CompactDocument> = documents.iter().map(CompactDocument::from).collect();
    deflate(&compact)
}

/// Fetched documents as `Response::FetchCovered` carries them.
pub fn deflate_covered(documents: &[FetchedDocument]) -> Vec<u8> {
    let covered: Vec<CoveredDocument> = documents.iter().map(CoveredDocument::from).collect();
    deflate(&covered)
}

/// A value's CBOR, deflated.
fn deflate<T: Serialize>(value: &T) -> Vec<u8> {
    use std::io::Write;
    let plain = cbor::encode(value);
    let mut encoder = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(plain.len() / 2),
        flate2::Compression::new(FETCH_DEFLATE_LEVEL),
    );
    // Writing to a `Vec` cannot fail.
    let _ = encoder.write_all(&plain);
    encoder.finish().unwrap_or_default()
}

/// Why a `Response::FetchDeflated` was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// Not a deflate stream.
    #[error("fetched documents do not inflate")]
    NotDeflate,
    /// The stream inflates past `FETCH_INFLATED_BYTES_MAX`.
    #[error("fetched documents inflate past {FETCH_INFLATED_BYTES_MAX} bytes")]
    TooLarge,
    /// What it inflates to is not a list of fetched documents.
    #[error("fetched documents inflate to something else")]
    Malformed,
}

impl InflateError {
    /// Why, in words a log line carries.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotDeflate => "fetched documents do not inflate",
            Self::TooLarge => "fetched documents inflate past their limit",
            Self::Malformed => "fetched documents inflate to something else",
        }
    }
}

/// The documents of a `Response::FetchDeflated`, inflated within `FETCH_INFLATED_BYTES_MAX`.
pub fn inflate_fetched(deflated: &[u8]) -> Result<Vec<CompactDocument>, InflateError> {
    inflate(deflated)
}

/// The documents of a `Response::FetchCovered`, inflated within `FETCH_INFLATED_BYTES_MAX`.
pub fn inflate_covered(deflated: &[u8]) -> Result<Vec<CoveredDocument>, InflateError> {
    inflate(deflated)
}

/// A deflated CBOR value, inflated within `FETCH_INFLATED_BYTES_MAX`.
fn inflate<T: DeserializeOwned>(deflated: &[u8]) -> Result<T, InflateError> {
    use std::io::Read;
    let mut plain = Vec::new();
    // One byte past the bound tells a stream at the bound from one beyond it.
    flate2::bufread::DeflateDecoder::new(deflated)
        .take(FETCH_INFLATED_BYTES_MAX + 1)
        .read_to_end(&mut plain)
        .map_err(|_| InflateError::NotDeflate)?;
    if plain.len() as u64 > FETCH_INFLATED_BYTES_MAX {
        return Err(InflateError::TooLarge);
    }
    cbor::decode_exact(&plain).map_err(|_| InflateError::Malformed)
}

/// A change's signature, as its envelope holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSignature {
    /// The change hash.
    #[serde(rename = "c")]
    pub change: ByteArray<32>,
    /// The author's ed25519 signature over `estuary/change/v1 ‖ document ‖ change hash`.
    #[serde(rename = "s")]
    pub signature: ByteArray<64>,
}

/// A message on the consortium's gossip topics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gossip {
    /// A new change's signed envelope.
    Change(ByteBuf),
    /// A new change too large to carry: receivers that lack it pull the document.
    Announce {
        /// The document.
        document: ByteArray<16>,
        /// Its new heads at the publisher.
        heads: Vec<ByteArray<32>>,
    },
    /// A signed roster (on the roster topic).
    Roster(ByteBuf),
}

/// Why a gossip message was refused before reaching the pipeline.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    /// Larger than `GOSSIP_MESSAGE_BYTES_MAX`.
    #[error("gossip message of {0} bytes exceeds the limit of {GOSSIP_MESSAGE_BYTES_MAX}")]
    TooLarge(usize),
    /// Not a gossip message.
    #[error("malformed gossip message")]
    Malformed,
    /// A gossip message, and then more bytes.
    #[error("{bytes} bytes after the gossip message")]
    TrailingBytes {
        /// How many.
        bytes: usize,
    },
    /// A gossip message encoded otherwise than nodes encode it: one message must have one
    /// id (the SHA-256 of its bytes).
    #[error("the gossip message is not in its canonical encoding")]
    NotCanonical,
}

impl Gossip {
    /// Encodes the message (CBOR).
    pub fn encode(&self) -> Vec<u8> {
        cbor::encode(self)
    }

    /// Decodes a message, refusing oversized input before decoding, and any encoding but
    /// the one `encode` gives.
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipError> {
        if bytes.len() > GOSSIP_MESSAGE_BYTES_MAX {
            return Err(GossipError::TooLarge(bytes.len()));
        }
        cbor::decode_canonical(bytes).map_err(|error| match error {
            CborError::Malformed => GossipError::Malformed,
            CborError::TrailingBytes { bytes } => GossipError::TrailingBytes { bytes },
            CborError::NotCanonical => GossipError::NotCanonical,
        })
    }
}

/// A gossip message's id, which gossipsub deduplicates on: what the message says, not how
/// it was encoded. On the changes topic, the SHA-256 of its bytes (a change's message has one
/// encoding: `Gossip::decode` and `Envelope::decode` take no other). On the roster topic, the
/// roster's `SignedRoster::content_digest` behind `ROSTER_MESSAGE_ID_TAG`, so that a roster
/// re-encoded on the way is the same message. Bytes that would be refused keep the SHA-256
/// of their bytes: a refused message must not share an id with the genuine one, which
/// gossipsub would then drop as a duplicate.
pub fn gossip_message_id(roster_topic: bool, data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    if roster_topic
        && let Ok(Gossip::Roster(signed)) = Gossip::decode(data)
        && let Some(digest) = SignedRoster::content_digest(&signed)
    {
        let mut id = ROSTER_MESSAGE_ID_TAG.to_vec();
        id.extend_from_slice(&digest);
        return id;
    }
    sha2::Sha256::digest(data).to_vec()
}

/// Prefix of roster message ids: they are 39 bytes long and a change's 32, so no message on
/// the changes topic can take a roster's id.
const ROSTER_MESSAGE_ID_TAG: &[u8] = b"roster/";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::membership::SignedRoster;
    use crate::model::{Editor, InstitutionId, Roster, Timestamp};
    use libp2p::request_response::Codec as _;

    fn signed_roster(authority: &Identity) -> SignedRoster {
        let editor = Editor {
            institution: InstitutionId::new("xinhua").unwrap(),
            at: Timestamp(1),
        };
        let mut roster = Roster::create(&Identity::from_secret([1; 32]).actor(), &editor).unwrap();
        SignedRoster::sign(authority, &mut roster)
    }

    /// The same fields in another order: another encoding of the same value.
    fn reordered(signed: &SignedRoster) -> Vec<u8> {
        #[derive(Serialize)]
        struct Reordered<'a> {
            #[serde(with = "serde_bytes")]
            signature: &'a [u8],
            #[serde(with = "serde_bytes")]
            roster: &'a [u8],
            version: u8,
        }
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &Reordered {
                signature: &signed.signature,
                roster: &signed.roster,
                version: signed.version,
            },
            &mut bytes,
        )
        .unwrap();
        bytes
    }

    #[test]
    fn a_sync_message_at_its_limits_is_a_request_and_a_response_a_peer_reads() {
        let signature = ChangeSignature {
            change: ByteArray::new([0xa5; 32]),
            signature: ByteArray::new([0x5a; 64]),
        };
        assert_eq!(cbor::encode(&signature).len(), SIGNATURE_ENTRY_BYTES);
        let message = SyncMessage {
            document: ByteArray::new([7; 16]),
            message: ByteBuf::from(vec![0xee; SYNC_MESSAGE_BYTES_MAX]),
            signatures: vec![signature; SYNC_SIGNATURES_MAX],
            first: true,
        };
        let request = Request::Sync(message.clone());
        let response = Response::Sync(Some(message));
        futures::executor::block_on(async {
            let mut codec = Codec;
            let mut bytes = Vec::new();
            codec
                .write_request(&PROTOCOL, &mut bytes, request.clone())
                .await
                .unwrap();
            assert!(
                bytes.len() <= SYNC_REQUEST_BYTES_MAX,
                "{} bytes",
                bytes.len()
            );
            let read = codec.read_request(&PROTOCOL, &mut &bytes[..]).await;
            assert_eq!(read.unwrap(), request);

            let mut bytes = Vec::new();
            codec
                .write_response(&PROTOCOL, &mut bytes, response.clone())
                .await
                .unwrap();
            assert!(
                bytes.len() <= SYNC_REQUEST_BYTES_MAX,
                "{} bytes",
                bytes.len()
            );
            let read = codec.read_response(&PROTOCOL, &mut &bytes[..]).await;
            assert_eq!(read.unwrap(), response);
        });
    }

    #[test]
    fn a_padded_sync_message_is_refused() {
        futures::executor::block_on(async {
            let mut codec = Codec;
            let request = Request::Roster {
                have: 3,
                urgent: true,
            };
            let mut bytes = Vec::new();
            codec
                .write_request(&PROTOCOL, &mut bytes, request.clone())
                .await
                .unwrap();
            let decoded = codec.read_request(&PROTOCOL, &mut &bytes[..]).await;
            assert_eq!(decoded.unwrap(), request);
            bytes.push(0);
            assert!(
                codec
                    .read_request(&PROTOCOL, &mut &bytes[..])
                    .await
                    .is_err()
            );

            let response = Response::Roster(None);
            let mut bytes = Vec::new();
            codec
                .write_response(&PROTOCOL, &mut bytes, response.clone())
                .await
                .unwrap();
            let decoded = codec.read_response(&PROTOCOL, &mut &bytes[..]).await;
            assert_eq!(decoded.unwrap(), response);
            bytes.extend_from_slice(b"junk");
            assert!(
                codec
                    .read_response(&PROTOCOL, &mut &bytes[..])
                    .await
                    .is_err()
            );
        });
    }

    #[test]
    fn a_padded_gossip_message_is_refused() {
        let gossip = Gossip::Announce {
            document: ByteArray::new([7; 16]),
            heads: vec![ByteArray::new([8; 32])],
        };
        let mut bytes = gossip.encode();
        assert_eq!(Gossip::decode(&bytes).unwrap(), gossip);
        bytes.push(0);
        assert!(Gossip::decode(&bytes).is_err());
    }

    #[test]
    fn a_roster_re_encoded_is_one_gossip_message() {
        let authority = Identity::from_secret([1; 32]);
        let signed = signed_roster(&authority);
        let canonical = Gossip::Roster(signed.encode().into()).encode();
        let other_encoding = Gossip::Roster(reordered(&signed).into()).encode();
        assert_ne!(canonical, other_encoding);
        assert_eq!(
            gossip_message_id(true, &canonical),
            gossip_message_id(true, &other_encoding)
        );
        // Another signature over the same roster is another message: a forgery seen first
        // must not make the genuine roster a duplicate.
        let mut forged = signed.clone();
        forged.signature = Identity::from_secret([9; 32]).sign(b"anything").to_vec();
        let forged = Gossip::Roster(forged.encode().into()).encode();
        assert_ne!(
            gossip_message_id(true, &canonical),
            gossip_message_id(true, &forged)
        );
        // On the changes topic the same bytes have another id, so a message there cannot
        // take a roster's id.
        assert_ne!(
            gossip_message_id(false, &canonical),
            gossip_message_id(true, &canonical)
        );
    }

    fn fetched(n: u8) -> FetchedDocument {
        FetchedDocument {
            document: ByteArray::new([n; 16]),
            saved: ByteBuf::from(vec![n; 300]),
            signatures: [3u8, 1, 2]
                .into_iter()
                .map(|k| ChangeSignature {
                    change: ByteArray::new([k; 32]),
                    signature: ByteArray::new([k ^ n; 64]),
                })
                .collect(),
        }
    }

    #[test]
    fn a_compact_document_lists_its_signatures_in_the_order_of_their_changes_hashes() {
        let compact = CompactDocument::from(&fetched(8));
        let expected: Vec<u8> = [1u8, 2, 3].iter().flat_map(|k| [k ^ 8; 64]).collect();
        assert_eq!(compact.signatures.into_vec(), expected);
    }

    fn deflate(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn fetched_documents_deflate_and_inflate_to_themselves_and_shrink() {
        let documents: Vec<FetchedDocument> = (0..8).map(fetched).collect();
        let deflated = deflate_fetched(&documents);
        assert!(deflated.len() * 4 < cbor::encode(&documents).len());
        let compact: Vec<CompactDocument> = documents.iter().map(CompactDocument::from).collect();
        assert_eq!(inflate_fetched(&deflated), Ok(compact));
    }

    #[test]
    fn fetched_documents_that_do_not_inflate_within_bounds_are_refused_by_reason() {
        assert_eq!(
            inflate_fetched(b"not a deflate stream at all"),
            Err(InflateError::NotDeflate)
        );
        let bomb = deflate(&vec![0; FETCH_INFLATED_BYTES_MAX as usize + 1]);
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(inflate_fetched(&bomb), Err(InflateError::TooLarge));
        assert_eq!(
            inflate_fetched(&deflate(&cbor::encode(&"a string"))),
            Err(InflateError::Malformed)
        );
        // At the bound exactly, the stream is read (and is not documents).
        let at_bound = deflate(&vec![0; FETCH_INFLATED_BYTES_MAX as usize]);
        assert_eq!(inflate_fetched(&at_bound), Err(InflateError::Malformed));
    }

    /// A fetch asked by a node that predates deflated answers is answered plainly; its
    /// request still reads.
    #[test]
    fn a_fetch_request_without_the_deflated_field_reads_as_a_plain_fetch() {
        #[derive(Serialize)]
        enum OldRequest {
            Fetch { documents: Vec<ByteArray<16>> },
        }
        let old = cbor::encode(&OldRequest::Fetch {
            documents: vec![ByteArray::new([7; 16])],
        });
        let read: Request = cbor::decode_exact(&old).unwrap();
        assert_eq!(
            read,
            Request::Fetch {
                documents: vec![ByteArray::new([7; 16])],
                deflated: false,
                covered: false,
            }
        );
    }

    /// A covered document's signatures read back by change hash; entries that are not whole
    /// are refused.
    #[test]
    fn a_covered_document_pairs_each_signature_with_its_change_hash() {
        let fetched = FetchedDocument {
            document: ByteArray::new([1; 16]),
            saved: ByteBuf::from(vec![9; 40]),
            signatures: vec![ChangeSignature {
                change: ByteArray::new([2; 32]),
                signature: ByteArray::new([3; 64]),
            }],
        };
        let covered = CoveredDocument::from(&fetched);
        assert_eq!(covered.signatures.len(), COVER_ENTRY_BYTES);
        assert_eq!(
            covered.signatures(),
            Some(std::collections::HashMap::from([([2; 32], [3; 64])]))
        );
        let inflated = inflate_covered(&deflate_covered(&[fetched])).unwrap();
        assert_eq!(inflated, vec![covered.clone()]);
        let mut cut = covered;
        cut.signatures.pop();
        assert_eq!(cut.signatures(), None);
    }
}

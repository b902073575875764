//! What nodes say to each other: request-response messages (CBOR, `/estuary/sync/1`) and
//! gossip messages. Every byte field is a CBOR byte string; every size has a named limit
//! checked before decoding. Records sent by the thousand (signatures, fetched documents)
//! carry one-letter field names.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use serde_bytes::{ByteArray, ByteBuf};

use crate::reconcile::{Query, Reply};

/// The request-response protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/estuary/sync/1");
/// Largest request a node reads, in bytes.
pub const REQUEST_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Largest response a node reads, in bytes.
pub const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Largest automerge sync message sent or taken, in bytes (under the request limit, with
/// room for the signatures beside it).
pub const SYNC_MESSAGE_BYTES_MAX: usize = 3 * 1024 * 1024;
/// Most signatures beside one sync message.
pub const SYNC_SIGNATURES_MAX: usize = 16_384;
/// Most documents one fetch asks for.
pub const FETCH_DOCUMENTS_MAX: usize = 64;
/// Most envelope bytes in one fetch response; documents that do not fit are left out and
/// asked for again.
pub const FETCH_RESPONSE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Largest gossip message, in bytes: an envelope up to `GOSSIP_ENVELOPE_BYTES_MAX`, or an
/// announcement, or a signed roster up to this size.
pub const GOSSIP_MESSAGE_BYTES_MAX: usize = 256 * 1024;
/// Envelopes above this size are announced on gossip, not carried: receivers pull them.
pub const GOSSIP_ENVELOPE_BYTES_MAX: usize = 64 * 1024;

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
    },
    /// The responder's signed roster, if newer than the version the asker holds (asked at
    /// every connection and reconciliation, so a node that missed the roster gossip learns
    /// of a revocation all the same).
    Roster {
        /// The version the asker holds.
        have: u64,
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
    /// The responder's signed roster when it is newer than the asker's.
    Roster(Option<ByteBuf>),
    /// The request was not served.
    Refused(Refusal),
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
}

impl Gossip {
    /// Encodes the message (CBOR).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::into_writer(self, &mut bytes).expect("CBOR encoding into memory");
        bytes
    }

    /// Decodes a message, refusing oversized input before decoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, GossipError> {
        if bytes.len() > GOSSIP_MESSAGE_BYTES_MAX {
            return Err(GossipError::TooLarge(bytes.len()));
        }
        ciborium::from_reader(bytes).map_err(|_| GossipError::Malformed)
    }
}

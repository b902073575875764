//! One document between two nodes: automerge's sync protocol, with every carried change
//! verified and decided by the ingest pipeline rather than applied by automerge; and the bulk
//! fetch of documents a node lacks.

use std::collections::HashMap;

use serde_bytes::{ByteArray, ByteBuf};

use super::protocol::{
    ChangeSignature, CompactDocument, CoveredDocument, FETCH_DOCUMENTS_MAX,
    FETCH_RESPONSE_BYTES_MAX, FetchedDocument, RESPONSE_BYTES_MAX, SIGNATURE_ENTRY_BYTES,
    SYNC_MESSAGE_BYTES_MAX, SYNC_SIGNATURES_MAX, SyncMessage,
};
use crate::envelope::Envelope;
use crate::model::automerge::sync::{self, ChunkList, SyncDoc};
use crate::model::automerge::{AutoCommit, Change, ChangeHash};
use crate::model::{
    DocumentId, SyncChunk, decode_changes_onto, is_one_document_chunk, load_document_with_changes,
    split_sync_chunk,
};
use crate::replica::{IngestError, Ingested, Node, NodeError, Undurable, WholeDocument};

/// Why a peer's sync message was refused, or ours could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DocumentSyncError {
    /// Larger than `SYNC_MESSAGE_BYTES_MAX`, or carrying more than `SYNC_SIGNATURES_MAX`
    /// changes.
    #[error(
        "sync message of {0} bytes with its signatures exceeds the limits of \
         {SYNC_MESSAGE_BYTES_MAX} bytes and {SYNC_SIGNATURES_MAX} changes"
    )]
    TooLarge(usize),
    /// A change the message would carry is held vouched for (`crate::authorship`): it has no
    /// signature of its own and travels only inside its whole document, which the peer is to
    /// fetch instead.
    #[error("a change to send travels only inside its whole document")]
    WholeOnly,
    /// Not a well-formed sync message.
    #[error("malformed sync message: {0}")]
    Malformed(&'static str),
    /// This node's store.
    #[error(transparent)]
    Node(Box<NodeError>),
    /// The pipeline failed as a whole (the flush).
    #[error(transparent)]
    Ingest(Box<IngestError>),
}

impl From<NodeError> for DocumentSyncError {
    fn from(error: NodeError) -> Self {
        Self::Node(Box::new(error))
    }
}

impl From<IngestError> for DocumentSyncError {
    fn from(error: IngestError) -> Self {
        Self::Ingest(Box::new(error))
    }
}

impl DocumentSyncError {
    /// Whether the peer is to blame (rather than this node).
    pub fn is_peers_fault(&self) -> bool {
        matches!(self, Self::TooLarge(_) | Self::Malformed(_))
    }
}

/// What a peer's message carried, by the pipeline's decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// Changes accepted.
    pub accepted: usize,
    /// Changes already held.
    pub duplicate: usize,
    /// Changes held for their dependencies.
    pub pending: usize,
    /// Changes refused: quarantined, unsigned, badly signed, by a stranger.
    pub rejected: usize,
    /// Of those, the ones that show the sender at fault: an honest member never sends them
    /// (`Ingested::blames_sender`; envelopes that do not decode, or name more missing
    /// dependencies than any honest change).
    pub blamed: usize,
}

impl Carried {
    /// Adds the outcomes of one `ingest_many`.
    pub fn count(&mut self, outcomes: &[Result<Ingested, IngestError>]) {
        for outcome in outcomes {
            match outcome {
                Ok(Ingested::Accepted(_)) => self.accepted += 1,
                Ok(Ingested::Duplicate(_)) => self.duplicate += 1,
                Ok(Ingested::Pending(_)) => self.pending += 1,
                Ok(decision @ Ingested::Quarantined(..)) => {
                    self.rejected += 1;
                    self.blamed += usize::from(decision.blames_sender());
                }
                Err(IngestError::Envelope(_) | IngestError::TooManyMissing { .. }) => {
                    self.rejected += 1;
                    self.blamed += 1;
                }
                Err(_) => self.rejected += 1,
            }
        }
    }
}

fn copy_of(node: &Node, document: DocumentId) -> Result<AutoCommit, NodeError> {
    Ok(node.sync_document(document)?.unwrap_or_default())
}

/// The signatures of a document's accepted changes, as they travel beside the changes.
fn change_signatures(
    node: &Node,
    document: DocumentId,
    changes: &[ChangeHash],
) -> Result<Vec<ChangeSignature>, NodeError> {
    Ok(node
        .signatures(document, changes)?
        .into_iter()
        .map(|(hash, signature)| ChangeSignature {
            change: ByteArray::new(hash.0),
            signature: ByteArray::new(signature),
        })
        .collect())
}

/// This node's next sync message for `document` to the peer whose state is `state`, with the
/// signatures of the changes it carries; `None` when there is nothing to say. A message over
/// `bytes_max` (at most `SYNC_MESSAGE_BYTES_MAX`) or `SYNC_SIGNATURES_MAX` changes is
/// `TooLarge`.
pub fn outgoing(
    node: &Node,
    document: DocumentId,
    state: &mut sync::State,
    bytes_max: usize,
) -> Result<Option<SyncMessage>, DocumentSyncError> {
    let mut doc = copy_of(node, document)?;
    let before = state.sent_hashes.clone();
    // The state holds what the peer said it has and needs; automerge trusts it (it can
    // panic on hashes the document lacks), so it is contained like a decoder.
    let generated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.sync().generate_sync_message(state)
    }))
    .map_err(|_| DocumentSyncError::Malformed("the peer's sync state does not fit the document"))?;
    let Some(mut message) = generated else {
        return Ok(None);
    };
    // Changes held pending here are not in the document automerge sees, so it would never
    // ask for what they wait on; a peer whose view of our changes has a false positive for
    // that dependency would never send it. Ask for it by name.
    // automerge encodes needs only in hash order (and panics otherwise in a debug build).
    message.need.extend(node.missing_dependencies(document)?);
    message.need.sort_unstable();
    message.need.dedup();
    let carried: Vec<ChangeHash> = state.sent_hashes.difference(&before).copied().collect();
    let encoded = message.encode();
    if encoded.len() > bytes_max.min(SYNC_MESSAGE_BYTES_MAX) || carried.len() > SYNC_SIGNATURES_MAX
    {
        // Too large to sync this way (a whole large document): the caller falls back to
        // fetching the document. Within both limits, the request is within the peer's
        // (`SYNC_REQUEST_BYTES_MAX`).
        return Err(DocumentSyncError::TooLarge(
            encoded.len() + carried.len() * SIGNATURE_ENTRY_BYTES,
        ));
    }
    let signatures = change_signatures(node, document, &carried)?;
    if signatures.len() < carried.len() {
        return Err(DocumentSyncError::WholeOnly);
    }
    Ok(Some(SyncMessage {
        document: ByteArray::new(*document.as_bytes()),
        message: ByteBuf::from(encoded),
        signatures,
        first: false,
    }))
}

/// A digest of a sync message as sent, to tell a session repeating itself
/// (`Driver::on_response`); never 0, which stands for no message.
pub fn message_digest(message: &SyncMessage) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    message.message.hash(&mut hasher);
    hasher.finish().max(1)
}

/// Takes a peer's sync message: every change it carries — one by one, or inside a whole
/// document, which is loaded into a scratch document — is put in an envelope with its
/// signature and decided by the pipeline; then automerge's state learns the rest of the
/// message (heads, needs, what the peer has) without applying anything.
pub fn incoming(
    node: &Node,
    incoming: &SyncMessage,
    state: &mut sync::State,
) -> Result<Carried, DocumentSyncError> {
    let document = DocumentId::from_bytes(*incoming.document);
    if incoming.message.len() > SYNC_MESSAGE_BYTES_MAX {
        return Err(DocumentSyncError::TooLarge(incoming.message.len()));
    }
    if incoming.signatures.len() > SYNC_SIGNATURES_MAX {
        return Err(DocumentSyncError::Malformed("too many signatures"));
    }
    let mut message = std::panic::catch_unwind(|| sync::Message::decode(&incoming.message))
        .ok()
        .and_then(Result::ok)
        .ok_or(DocumentSyncError::Malformed(
            "not an automerge sync message",
        ))?;
    // automerge allocates a filter's probe count per hash it tests, unchecked: a crafted
    // count would allocate gigabytes.
    if !message
        .have
        .iter()
        .all(|have| bloom_within_bounds(&have.bloom.to_bytes()))
    {
        return Err(DocumentSyncError::Malformed(
            "a Bloom filter with more probes or bits than automerge makes",
        ));
    }
    let signatures: HashMap<[u8; 32], [u8; 64]> = incoming
        .signatures
        .iter()
        .map(|s| (*s.change, *s.signature))
        .collect();
    let mut changes = Vec::new();
    let mut base = None;
    for chunk in message.changes.iter() {
        let pieces = split_sync_chunk(chunk).map_err(|_| {
            DocumentSyncError::Malformed("a chunk that is neither changes nor a document")
        })?;
        for piece in pieces {
            match piece {
                SyncChunk::Change(change) => changes.push(*change),
                SyncChunk::Document(bytes) => {
                    // The changes the peer found we lack, in document encoding, building on
                    // what we hold.
                    if base.is_none() {
                        base = Some(copy_of(node, document)?);
                    }
                    let base = base.as_ref().unwrap_or_else(|| unreachable!("just set"));
                    changes.extend(decode_changes_onto(base, bytes).map_err(|_| {
                        DocumentSyncError::Malformed("a document chunk that does not load")
                    })?);
                }
            }
        }
        if changes.len() > SYNC_SIGNATURES_MAX {
            return Err(DocumentSyncError::Malformed("too many changes"));
        }
    }
    let mut carried = Carried::default();
    let envelopes = sealed(document, changes, &signatures, &mut carried);
    carried.count(&node.ingest_many(&envelopes)?);
    message.changes = ChunkList::empty();
    let mut doc = copy_of(node, document)?;
    let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.sync().receive_sync_message(state, message)
    }));
    match received {
        Ok(Ok(())) => Ok(carried),
        _ => Err(DocumentSyncError::Malformed(
            "the sync message does not fit the document",
        )),
    }
}

/// Each change in its envelope, with the signature sent beside it; a change without one
/// cannot be checked and is counted as refused.
fn sealed(
    document: DocumentId,
    changes: Vec<crate::model::automerge::Change>,
    signatures: &HashMap<[u8; 32], [u8; 64]>,
    carried: &mut Carried,
) -> Vec<Vec<u8>> {
    let mut envelopes = Vec::with_capacity(changes.len());
    for mut change in changes {
        match signatures.get(&change.hash().0) {
            None => carried.rejected += 1,
            Some(signature) => {
                envelopes.push(Envelope::seal(document, &mut change, signature).encode())
            }
        }
    }
    envelopes
}

/// The documents a peer asked for, each saved (compressed) with its changes' signatures,
/// within `FETCH_RESPONSE_BYTES_MAX`; the documents left out are returned to ask for again.
/// The first document is always sent, however large, so a fetch always makes progress.
pub fn fetch(
    node: &Node,
    documents: &[ByteArray<16>],
    covered: bool,
) -> Result<(Vec<FetchedDocument>, Vec<ByteArray<16>>), DocumentSyncError> {
    if documents.len() > FETCH_DOCUMENTS_MAX {
        return Err(DocumentSyncError::Malformed(
            "too many documents in one fetch",
        ));
    }
    let mut fetched = Vec::new();
    let mut deferred = Vec::new();
    let mut bytes = 0;
    for id in documents {
        let document = DocumentId::from_bytes(**id);
        if !fetched.is_empty() && bytes >= FETCH_RESPONSE_BYTES_MAX {
            deferred.push(*id);
            continue;
        }
        let Some((saved, signatures)) = node.whole_document(document, covered)? else {
            // Not held (any more): nothing to send, nothing to ask again.
            continue;
        };
        let size = saved.len() + signatures.len() * SIGNATURE_ENTRY_BYTES;
        if !fetched.is_empty() && bytes + size > FETCH_RESPONSE_BYTES_MAX {
            deferred.push(*id);
            continue;
        }
        bytes += size;
        fetched.push(FetchedDocument::new(document, saved, signatures));
    }
    Ok((fetched, deferred))
}

/// Takes fetched documents: each is loaded into a scratch document (bounded and guarded like
/// any peer's bytes). A document this node lacks is taken whole (`Node::ingest_whole`: judged
/// at once, stored in one write); any other goes through the pipeline change by change, each
/// change in its envelope. A document that does not load, or a change without a signature, is
/// counted as refused. What they carried holds once durable (`Taken::durable`).
pub fn ingest_fetched(
    node: &Node,
    fetched: &[FetchedDocument],
) -> Result<Taken, DocumentSyncError> {
    ingest_each(node, fetched, |document| {
        let loaded = load_fetched(&document.saved, document.signatures.len())?;
        let signatures = document
            .signatures
            .iter()
            .map(|s| (*s.change, *s.signature))
            .collect();
        Some((document.document, loaded, signatures))
    })
}

/// Takes fetched documents in their compact form (`Response::FetchDeflated`), as
/// `ingest_fetched` does: each signature belongs to the change whose hash has its place in
/// the order of the document's change hashes. A document whose changes and signatures do not
/// pair up is counted as refused.
pub fn ingest_compact(
    node: &Node,
    fetched: &[CompactDocument],
) -> Result<Taken, DocumentSyncError> {
    ingest_each(node, fetched, |document| {
        let signatures = document.signatures.chunks_exact(64);
        let count = signatures.len();
        if !signatures.remainder().is_empty() {
            return None;
        }
        let loaded = load_fetched(&document.saved, count)?;
        let mut hashes: Vec<ChangeHash> = loaded.1.iter().map(Change::hash).collect();
        hashes.sort_unstable();
        (hashes.len() == count).then(|| {
            let signatures = hashes
                .iter()
                .zip(signatures)
                .filter_map(|(hash, signature)| Some((hash.0, signature.try_into().ok()?)))
                .collect();
            (document.document, loaded, signatures)
        })
    })
}

/// Takes fetched documents in their covered form (`Response::FetchCovered`), as
/// `ingest_fetched` does. A document whose signatures are not whole entries is counted as
/// refused.
pub fn ingest_covered(
    node: &Node,
    fetched: &[CoveredDocument],
) -> Result<Taken, DocumentSyncError> {
    ingest_each(node, fetched, |document| {
        let signatures = document.signatures()?;
        let loaded = load_fetched(&document.saved, signatures.len())?;
        Some((document.document, loaded, signatures))
    })
}

/// A fetched document in any of its forms: the bytes it is loaded from.
trait Fetched {
    fn saved(&self) -> &[u8];
}

impl Fetched for FetchedDocument {
    fn saved(&self) -> &[u8] {
        &self.saved
    }
}

impl Fetched for CompactDocument {
    fn saved(&self) -> &[u8] {
        &self.saved
    }
}

impl Fetched for CoveredDocument {
    fn saved(&self) -> &[u8] {
        &self.saved
    }
}

/// Loads each fetched document with `load` (its id, the loaded document with its changes, and
/// its signatures by change hash; `None` counts it refused) and takes them (`ingest_loaded`). Bytes that are one
/// document chunk are kept as its snapshot (`WholeDocument::saved`).
fn ingest_each<D: Fetched>(
    node: &Node,
    fetched: &[D],
    load: impl Fn(&D) -> Option<(ByteArray<16>, Loaded, HashMap<[u8; 32], [u8; 64]>)>,
) -> Result<Taken, DocumentSyncError> {
    let mut carried = Carried::default();
    let mut whole = Vec::with_capacity(fetched.len());
    for document in fetched {
        let Some((id, (doc, changes), signatures)) = load(document) else {
            carried.rejected += 1;
            continue;
        };
        let saved = document.saved();
        whole.push(WholeDocument {
            id: DocumentId::from_bytes(*id),
            doc,
            signatures,
            changes: Some(changes),
            saved: is_one_document_chunk(saved).then(|| saved.to_vec()),
        });
    }
    ingest_loaded(node, whole, carried)
}

/// A fetched document loaded, with its changes as `get_changes(&[])` lists them.
type Loaded = (AutoCommit, Vec<Change>);

/// A fetched document's bytes loaded with its changes (built once, as loading checks the
/// document's heads), within the limits of one response and of the changes one document may
/// carry.
fn load_fetched(saved: &[u8], signatures: usize) -> Option<Loaded> {
    if saved.len() > RESPONSE_BYTES_MAX as usize || signatures > SYNC_SIGNATURES_MAX {
        return None;
    }
    load_document_with_changes(saved).ok()
}

/// Takes fetched documents once loaded: whole where this node lacks them, change by change
/// otherwise.
fn ingest_loaded(
    node: &Node,
    whole: Vec<WholeDocument>,
    mut carried: Carried,
) -> Result<Taken, DocumentSyncError> {
    let (outcomes, given_back, undurable) = node.ingest_whole_undurable(whole)?;
    carried.count(&outcomes);
    let mut envelopes = Vec::new();
    for mut document in given_back {
        let changes = match document.changes.take() {
            Some(changes) => changes,
            None => document.doc.get_changes(&[]),
        };
        envelopes.extend(sealed(
            document.id,
            changes,
            &document.signatures,
            &mut carried,
        ));
    }
    match node.ingest_many(&envelopes) {
        Ok(outcomes) => carried.count(&outcomes),
        Err(error) => {
            // Reported as failed only once what was decided whole is durable too.
            node.make_whole_durable(undurable)?;
            return Err(error.into());
        }
    }
    Ok(Taken { carried, undurable })
}

/// Fetched documents taken (`ingest_fetched` and its kin): what they carried holds once their
/// decisions are durable (`Taken::durable`), and nothing of it may be reported before. So a
/// catch-up thread can take the next documents while a flush makes these durable.
#[must_use = "what was taken holds only once durable"]
#[derive(Debug)]
pub struct Taken {
    carried: Carried,
    undurable: Undurable,
}

impl Taken {
    /// Waits for the decisions to be durable (one flush, shared with concurrent callers);
    /// then what the documents carried.
    pub fn durable(self, node: &Node) -> Result<Carried, DocumentSyncError> {
        node.make_whole_durable(self.undurable)?;
        Ok(self.carried)
    }
}

/// Most probes per hash in a peer's Bloom filter (automerge makes 7).
pub const BLOOM_PROBES_MAX: u64 = 32;
/// Most bits per entry in a peer's Bloom filter (automerge makes 10).
pub const BLOOM_BITS_PER_ENTRY_MAX: u64 = 64;

/// Whether an encoded Bloom filter (LEB128 entries, bits per entry, probes; then the bits)
/// stays within `BLOOM_PROBES_MAX` and `BLOOM_BITS_PER_ENTRY_MAX`. An empty filter does.
fn bloom_within_bounds(encoded: &[u8]) -> bool {
    fn leb128(bytes: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = bytes.split_first()?;
            *bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    if encoded.is_empty() {
        return true;
    }
    let mut rest = encoded;
    let (Some(_entries), Some(bits_per_entry), Some(probes)) =
        (leb128(&mut rest), leb128(&mut rest), leb128(&mut rest))
    else {
        return false;
    };
    probes <= BLOOM_PROBES_MAX && bits_per_entry <= BLOOM_BITS_PER_ENTRY_MAX
}

#[cfg(test)]
mod bloom_tests {
    use super::*;

    #[test]
    fn a_bloom_filter_with_a_crafted_probe_count_is_refused_and_automerges_own_pass() {
        // entries 1, 10 bits per entry, 7 probes, then the bits.
        assert!(bloom_within_bounds(&[1, 10, 7, 0, 0]));
        assert!(bloom_within_bounds(&[]));
        // 2^32 - 1 probes.
        assert!(!bloom_within_bounds(&[
            1, 10, 0xff, 0xff, 0xff, 0xff, 0x0f, 0
        ]));
        assert!(!bloom_within_bounds(&[1, 200, 1, 7, 0]));
        // Cut off inside its header.
        assert!(!bloom_within_bounds(&[1, 0x80]));
    }
}

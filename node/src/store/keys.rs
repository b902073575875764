//! Key prefixes of the store's keyspaces: one ordered tree (sled's, or the log-structured
//! engine's one keyspace), so a batch across keyspaces is atomic. Every key the replica
//! writes is built here.

use crate::model::automerge::ChangeHash;
use crate::model::{Bytes32, DocumentId};

/// `e ‖ document ‖ change hash` → the change as `StoredChange` encodes it: its envelope,
/// or, once the document's snapshot holds the change, its signature alone. A key here is
/// an accepted change.
pub const ENVELOPE: u8 = b'e';
/// `d ‖ document` → document record (kind, heads).
pub const DOCUMENT: u8 = b'd';
/// `s ‖ document` → compacted snapshot (automerge `save()`), loaded instead of replaying
/// every envelope.
pub const SNAPSHOT: u8 = b's';
/// `c ‖ document` → SHA-256 of the sorted heads: the catalogue reconciliation reads.
pub const CATALOGUE: u8 = b'c';
/// `q ‖ change hash ‖ document` → quarantine record. Keyed by what was judged — the
/// change *in that document* — so a copy sent into another document, where it fails,
/// never condemns the genuine change or what builds on it.
pub const QUARANTINE: u8 = b'q';
/// `f ‖ SHA-256(envelope)` → quarantine record of an envelope refused for its signature
/// or its author (forged, or a stranger's). Keyed by the envelope, not the change it
/// claims, so a forgery never blocks the genuine change.
pub const REFUSED: u8 = b'f';
/// `p ‖ document ‖ change hash` → pending record: per document, so what a document's
/// held changes miss is one short prefix scan.
pub const PENDING: u8 = b'p';
/// `w ‖ missing dependency ‖ document ‖ change hash` → nothing: which pending changes
/// wait for what, so a decision wakes only the changes waiting for it. A change waiting
/// for itself (a revoked key's change until its cut-off can be drawn, or a change whose
/// author this roster does not know yet) is woken by name.
pub const WAITING: u8 = b'w';
/// `o ‖ bucket ‖ sequence (u64, big-endian) ‖ document ‖ change hash` → its cost (bytes
/// and waits, two u64): the pending changes of each bucket (its author's key, or one
/// bucket for every author this roster does not know) oldest first, so a bucket over its
/// share evicts its own oldest, and the shares are counted at open without reading a
/// single pending envelope.
pub const PENDING_ORDER: u8 = b'o';
/// `y ‖ change hash ‖ document` → nothing: the pending changes that wait for themselves,
/// woken by name at every start and roster change.
pub const WAITS_ON_ITSELF: u8 = b'y';
/// Bytes of quarantined envelopes kept whole (u64, big-endian): bodies are kept only up
/// to `QUARANTINE_BODIES_BYTES_MAX`.
pub const QUARANTINE_BODIES: &[u8] = b"m/quarantine-bodies";
/// The signed roster.
pub const ROSTER: &[u8] = b"m/roster";
/// How many changes the store has accepted (u64, big-endian), witnessed outside it. It
/// counts decisions to accept and never goes down: a withdrawal after a revocation does
/// not lower it, or the witness would report the withdrawn changes as lost.
pub const ACCEPTED: &[u8] = b"m/accepted";
/// Acknowledged changes the store was found to have lost, over all starts (u64): kept so
/// that `verify` reports the loss until the documents are re-synced.
pub const LOST: &[u8] = b"m/lost";
/// This node's random salt for the national-id index (32 bytes).
pub const SALT: &[u8] = b"m/salt";
/// The incarnation this store's node writes as (`envelope::ACTOR_INCARNATION_BYTES`).
pub const INCARNATION: &[u8] = b"m/incarnation";
/// The store layout's version (u32, big-endian).
pub const FORMAT: &[u8] = b"m/format";
/// `v ‖ change hash ‖ revoked key` → document: the change is one of the key's cut-off
/// heads or an ancestor of one, so a change of that key here is within the cut-off.
pub const VOUCHED: u8 = b'v';
/// `h ‖ revoked key ‖ change hash ‖ document` → nothing: the key's changes held until this
/// node can tell whether they are within its cut-off (at most `REVOKED_HELD_PER_KEY_MAX`
/// per key).
pub const HELD: u8 = b'h';
/// `u ‖ author ‖ document` → nothing: the documents each key has changes accepted in, so
/// a revocation reaches only the documents it concerns.
pub const AUTHOR: u8 = b'u';
/// `z ‖ document` → `ErasureRecord`: a document erased on legal order (a health file the
/// roster orders erased, or a referral of its resident). Its content is gone and a change to
/// it is refused without being stored, for good.
pub const ERASED: u8 = b'z';
/// `m/revocation/ ‖ key` → nothing: revocations whose withdrawals are complete.
pub const REVOCATION_APPLIED: &[u8] = b"m/revocation/";

/// A key's fields after its prefix byte, read in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    /// The fields of `key` if it starts with `prefix`.
    fn after(prefix: u8, key: &'a [u8]) -> Option<Self> {
        match key.split_first() {
            Some((first, rest)) if *first == prefix => Some(Self(rest)),
            _ => None,
        }
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn document(&mut self) -> Option<DocumentId> {
        self.bytes().map(DocumentId::from_bytes)
    }

    fn hash(&mut self) -> Option<ChangeHash> {
        self.bytes().map(ChangeHash)
    }

    fn key(&mut self) -> Option<Bytes32> {
        self.bytes().map(Bytes32)
    }

    fn sequence(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_be_bytes)
    }

    /// `value` if every byte of the key was read: a key longer than its layout is not one.
    fn end<T>(self, value: T) -> Option<T> {
        self.0.is_empty().then_some(value)
    }
}

/// `e ‖ document ‖ change hash`.
pub fn envelope(document: &DocumentId, hash: &ChangeHash) -> Vec<u8> {
    [&[ENVELOPE][..], document.as_bytes(), &hash.0].concat()
}

/// The document and change of an `ENVELOPE` key.
pub fn parse_envelope(key: &[u8]) -> Option<(DocumentId, ChangeHash)> {
    let mut fields = Fields::after(ENVELOPE, key)?;
    let (document, hash) = (fields.document()?, fields.hash()?);
    fields.end((document, hash))
}

/// `prefix ‖ document`: a document's record, snapshot or catalogue entry, or the prefix of its
/// changes or pending changes.
pub fn per_document(prefix: u8, document: &DocumentId) -> Vec<u8> {
    [&[prefix][..], document.as_bytes()].concat()
}

/// The document of a `prefix ‖ document` key.
pub fn parse_per_document(prefix: u8, key: &[u8]) -> Option<DocumentId> {
    let mut fields = Fields::after(prefix, key)?;
    let document = fields.document()?;
    fields.end(document)
}

/// `q ‖ change hash ‖ document`.
pub fn quarantined(hash: &ChangeHash, document: &DocumentId) -> Vec<u8> {
    [&[QUARANTINE][..], &hash.0, document.as_bytes()].concat()
}

/// `f ‖ SHA-256(envelope)`.
pub fn refused(digest: &[u8; 32]) -> Vec<u8> {
    [&[REFUSED][..], digest].concat()
}

/// `m/revocation/ ‖ key`.
pub fn revocation_applied(key: &Bytes32) -> Vec<u8> {
    [REVOCATION_APPLIED, &key.0].concat()
}

/// The prefix of every quarantined copy of a change (one per document it was sent into).
pub fn quarantined_copies(hash: &ChangeHash) -> Vec<u8> {
    [&[QUARANTINE][..], &hash.0].concat()
}

/// The change and document of a `QUARANTINE` key.
pub fn parse_quarantined(key: &[u8]) -> Option<(ChangeHash, DocumentId)> {
    let mut fields = Fields::after(QUARANTINE, key)?;
    let (hash, document) = (fields.hash()?, fields.document()?);
    fields.end((hash, document))
}

/// `p ‖ document ‖ change hash`.
pub fn pending(document: &DocumentId, hash: &ChangeHash) -> Vec<u8> {
    [&[PENDING][..], document.as_bytes(), &hash.0].concat()
}

/// The document and change of a `PENDING` key.
pub fn parse_pending(key: &[u8]) -> Option<(DocumentId, ChangeHash)> {
    let mut fields = Fields::after(PENDING, key)?;
    let (document, hash) = (fields.document()?, fields.hash()?);
    fields.end((document, hash))
}

/// `y ‖ change hash ‖ document`.
pub fn waits_on_itself(hash: &ChangeHash, document: &DocumentId) -> Vec<u8> {
    [&[WAITS_ON_ITSELF][..], &hash.0, document.as_bytes()].concat()
}

/// The change and document of a `WAITS_ON_ITSELF` key.
pub fn parse_waits_on_itself(key: &[u8]) -> Option<(ChangeHash, DocumentId)> {
    let mut fields = Fields::after(WAITS_ON_ITSELF, key)?;
    let (hash, document) = (fields.hash()?, fields.document()?);
    fields.end((hash, document))
}

/// `o ‖ bucket ‖ sequence ‖ document ‖ change hash`.
pub fn pending_order(
    bucket: &[u8; 32],
    sequence: u64,
    document: &DocumentId,
    hash: &ChangeHash,
) -> Vec<u8> {
    [
        &[PENDING_ORDER][..],
        bucket,
        &sequence.to_be_bytes(),
        document.as_bytes(),
        &hash.0,
    ]
    .concat()
}

/// A `PENDING_ORDER` key's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingOrder {
    /// Whose share the change counts against.
    pub bucket: [u8; 32],
    /// Its place in the bucket's order.
    pub sequence: u64,
    /// Its document.
    pub document: DocumentId,
    /// The change.
    pub hash: ChangeHash,
}

/// The prefix of a bucket's pending changes, oldest first.
pub fn pending_order_of(bucket: &[u8; 32]) -> Vec<u8> {
    [&[PENDING_ORDER][..], bucket].concat()
}

/// The fields of a `PENDING_ORDER` key.
pub fn parse_pending_order(key: &[u8]) -> Option<PendingOrder> {
    let mut fields = Fields::after(PENDING_ORDER, key)?;
    let order = PendingOrder {
        bucket: fields.bytes()?,
        sequence: fields.sequence()?,
        document: fields.document()?,
        hash: fields.hash()?,
    };
    fields.end(order)
}

/// `w ‖ missing dependency ‖ document ‖ change hash`.
pub fn waiting(dependency: &[u8; 32], document: &DocumentId, hash: &ChangeHash) -> Vec<u8> {
    [&[WAITING][..], dependency, document.as_bytes(), &hash.0].concat()
}

/// The prefix of the changes waiting for `dependency`.
pub fn waiting_for(dependency: &[u8; 32]) -> Vec<u8> {
    [&[WAITING][..], dependency].concat()
}

/// The waiting change's document and hash, from a `WAITING` key.
pub fn parse_waiting(key: &[u8]) -> Option<(DocumentId, ChangeHash)> {
    let mut fields = Fields::after(WAITING, key)?;
    let _dependency: [u8; 32] = fields.bytes()?;
    let (document, hash) = (fields.document()?, fields.hash()?);
    fields.end((document, hash))
}

/// `v ‖ change hash ‖ revoked key`.
pub fn vouched(hash: &ChangeHash, key: &Bytes32) -> Vec<u8> {
    [&[VOUCHED][..], &hash.0, &key.0].concat()
}

/// The prefix of the revoked keys a change is vouched for.
pub fn vouched_for(hash: &ChangeHash) -> Vec<u8> {
    [&[VOUCHED][..], &hash.0].concat()
}

/// The change and the revoked key of a `VOUCHED` key.
pub fn parse_vouched(key: &[u8]) -> Option<(ChangeHash, Bytes32)> {
    let mut fields = Fields::after(VOUCHED, key)?;
    let (hash, revoked) = (fields.hash()?, fields.key()?);
    fields.end((hash, revoked))
}

/// `h ‖ revoked key ‖ change hash ‖ document`.
pub fn held(key: &Bytes32, hash: &ChangeHash, document: &DocumentId) -> Vec<u8> {
    [&[HELD][..], &key.0, &hash.0, document.as_bytes()].concat()
}

/// The prefix of a revoked key's held changes.
pub fn held_of(key: &Bytes32) -> Vec<u8> {
    [&[HELD][..], &key.0].concat()
}

/// The revoked key, change and document of a `HELD` key.
pub fn parse_held(key: &[u8]) -> Option<(Bytes32, ChangeHash, DocumentId)> {
    let mut fields = Fields::after(HELD, key)?;
    let (revoked, hash, document) = (fields.key()?, fields.hash()?, fields.document()?);
    fields.end((revoked, hash, document))
}

/// `u ‖ author ‖ document`.
pub fn author(key: &Bytes32, document: &DocumentId) -> Vec<u8> {
    [&[AUTHOR][..], &key.0, document.as_bytes()].concat()
}

/// The prefix of the documents a key has changes accepted in.
pub fn authored_by(key: &Bytes32) -> Vec<u8> {
    [&[AUTHOR][..], &key.0].concat()
}

/// The author and document of an `AUTHOR` key.
pub fn parse_author(key: &[u8]) -> Option<(Bytes32, DocumentId)> {
    let mut fields = Fields::after(AUTHOR, key)?;
    let (author, document) = (fields.key()?, fields.document()?);
    fields.end((author, document))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_reads_back_as_written_and_no_other_keyspace_reads_as_it() {
        let document = DocumentId::from_bytes([7; 16]);
        let hash = ChangeHash([9; 32]);
        let key = Bytes32([5; 32]);
        assert_eq!(
            parse_envelope(&envelope(&document, &hash)),
            Some((document, hash))
        );
        assert_eq!(
            parse_per_document(SNAPSHOT, &per_document(SNAPSHOT, &document)),
            Some(document)
        );
        assert_eq!(
            parse_pending(&pending(&document, &hash)),
            Some((document, hash))
        );
        let order = PendingOrder {
            bucket: [3; 32],
            sequence: 42,
            document,
            hash,
        };
        assert_eq!(
            parse_pending_order(&pending_order(&[3; 32], 42, &document, &hash)),
            Some(order)
        );
        assert_eq!(
            parse_waiting(&waiting(&[1; 32], &document, &hash)),
            Some((document, hash))
        );
        assert_eq!(
            parse_quarantined(&quarantined(&hash, &document)),
            Some((hash, document))
        );
        assert_eq!(
            parse_waits_on_itself(&waits_on_itself(&hash, &document)),
            Some((hash, document))
        );
        assert_eq!(parse_vouched(&vouched(&hash, &key)), Some((hash, key)));
        assert_eq!(
            parse_held(&held(&key, &hash, &document)),
            Some((key, hash, document))
        );
        assert_eq!(
            parse_author(&author(&key, &document)),
            Some((key, document))
        );
        // The wrong prefix, a short key or a long one is no key of the keyspace.
        assert_eq!(parse_pending(&envelope(&document, &hash)), None);
        let long = [envelope(&document, &hash), vec![0]].concat();
        assert_eq!(parse_envelope(&long), None);
        assert_eq!(parse_envelope(&long[..40]), None);
    }
}

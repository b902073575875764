//! A node's core: its identity, roster, durable store, and the one ingest pipeline that every
//! change goes through — a local write as much as a peer's.
//!
//! Pipeline: verify the envelope's signature → the author is a member (or within its
//! revocation cut-off) → a creation change names its own document → dependencies accepted
//! (otherwise held as pending, bounded) and none quarantined → apply to the document at the
//! change's own dependencies and `validate_change` → accept (store, durable) or quarantine
//! with the reason. Every decision depends only on the change, its history and the roster.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{self, AuditAction, AuditHead, AuditRecord};
use crate::envelope::{Envelope, EnvelopeError, VerifiedChange};
use crate::identity::{Identity, IdentityError};
use crate::index::{self, ResidentSummary};
use crate::membership::{Admission, Membership, RosterError, SignedRoster};
use crate::model::automerge::{AutoCommit, Change, ChangeHash};
use crate::model::{
    Actor, Bytes32, Demographics, DocumentId, DocumentKind, Editor, HealthFile, HealthFileOp,
    HealthFileView, InstitutionId, NewReferral, OpError, Referral, ReferralOp, ReferralView, View,
    document_id_of, validate,
};
use crate::reconcile::{Catalogue, HeadsDigest};
use crate::store::{Batch, GroupCommit, KeyValue, StoreError, WITNESS_FILE, WitnessedStore};

/// Most documents held decoded in memory at once.
pub const CACHE_DOCUMENTS_MAX: usize = 1_024;
/// Most bytes of stored envelopes held decoded in memory at once (the cache's budget).
pub const CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Bytes of envelopes a document accumulates since its last snapshot before a new one is
/// saved, unless the snapshot itself is larger (then its size is the limit): saving a whole
/// document costs O(document), so it is done once per O(document) bytes written, and a load
/// replays at most this much, or a snapshot's worth, of changes.
pub const SNAPSHOT_TAIL_MIN_BYTES: u64 = 4 * 1024;
/// Most changes kept in quarantine. Past it, a change that would be quarantined is refused
/// with `IngestError::QuarantineFull` and not stored: the decision is the same, only the record
/// is not kept, so a faulty member cannot fill the disk.
pub const QUARANTINE_CHANGES_MAX: usize = 100_000;
/// Typed views kept for reads, most recently used first out last. A view is kept with the
/// digest of the heads it shows, so a read that finds the catalogue's digest unchanged is
/// answered without the decision lock and without copying the document. Views of typical
/// files are a few KB, of the longest (thousands of entries) about a MB.
pub const VIEWS_CACHED_MAX: usize = 256;
/// Stripes of the per-document write lock.
const DOCUMENT_LOCK_STRIPES: usize = 64;
/// Quarantined envelopes are kept whole only up to this many bytes in all; past it a
/// quarantine record keeps the envelope's digest, size and reason, not its body. 100,000
/// records of up to 513 KiB would be 51 GB; the records alone are about 200 bytes each.
pub const QUARANTINE_BODIES_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Quarantine records in one page of the operators' listing.
pub const QUARANTINE_PAGE_RECORDS_MAX: usize = 1_000;
/// Most changes held waiting (for their dependencies, a revoked key's cut-off or a roster
/// that knows their author), over all buckets.
pub const PENDING_CHANGES_MAX: usize = 10_000;
/// Most bytes of envelopes held waiting, over all buckets.
pub const PENDING_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most (change, missing dependency) waits, over all buckets: each is a key to wake.
pub const PENDING_WAITS_MAX: usize = 40_000;
/// One member's share of what waits: its own changes past it evict its oldest, so no member
/// (or peer replaying a member's changes out of order) can push out the others'.
pub const PENDING_CHANGES_PER_AUTHOR_MAX: usize = 2_500;
/// One member's share of pending bytes.
pub const PENDING_BYTES_PER_AUTHOR_MAX: usize = 16 * 1024 * 1024;
/// One member's share of pending waits.
pub const PENDING_WAITS_PER_AUTHOR_MAX: usize = 10_000;
/// The share of every author this roster does not know, together: changes held until a
/// newer roster names their author. Small, since any key can sign such changes.
pub const PENDING_CHANGES_OF_STRANGERS_MAX: usize = 1_024;
/// Bytes of the strangers' share.
pub const PENDING_BYTES_OF_STRANGERS_MAX: usize = 4 * 1024 * 1024;
/// Most missing dependencies one change may wait for. An honest change depends on its
/// document's heads (a handful); thousands are invented, and each would be a key to keep.
pub const PENDING_MISSING_PER_CHANGE_MAX: usize = 256;
/// Local changes queued for the network layer to publish; a subscriber that falls further
/// behind misses the oldest (anti-entropy carries them instead).
pub const LOCAL_CHANGES_QUEUE_MAX: usize = 4_096;
/// Most changes of one revoked key held until the node can tell whether they are within the
/// revocation's cut-off; past it, the key's changes are refused and not kept.
pub const REVOKED_HELD_PER_KEY_MAX: usize = 256;
/// The store's folder in the data directory.
pub const STORE_DIR: &str = "store";
/// The layout of the store this release writes. A release that changes key layouts or record
/// encodings raises it and converts older stores at open. 2: quarantine and pending records
/// keyed by document as well as change, pending changes ordered per author. 3: a change its
/// document's snapshot holds may be stored as its signature alone (`StoredChange`); a format-2
/// store is a valid format-3 store as it is.
pub const STORE_FORMAT: u32 = 3;
/// Audit records read at a time when the whole log is checked.
const AUDIT_PAGE_RECORDS: usize = 4_096;

/// Key prefixes of the store's keyspaces (one tree, so batches across them are atomic).
mod keys {
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

    pub fn envelope(document: &super::DocumentId, hash: &super::ChangeHash) -> Vec<u8> {
        [&[ENVELOPE][..], document.as_bytes(), &hash.0].concat()
    }
    pub fn per_document(prefix: u8, document: &super::DocumentId) -> Vec<u8> {
        [&[prefix][..], document.as_bytes()].concat()
    }
    pub fn quarantined(hash: &super::ChangeHash, document: &super::DocumentId) -> Vec<u8> {
        [&[QUARANTINE][..], &hash.0, document.as_bytes()].concat()
    }
    pub fn pending(document: &super::DocumentId, hash: &super::ChangeHash) -> Vec<u8> {
        [&[PENDING][..], document.as_bytes(), &hash.0].concat()
    }
    pub fn waits_on_itself(hash: &super::ChangeHash, document: &super::DocumentId) -> Vec<u8> {
        [&[WAITS_ON_ITSELF][..], &hash.0, document.as_bytes()].concat()
    }
    pub fn pending_order(
        bucket: &[u8; 32],
        sequence: u64,
        document: &super::DocumentId,
        hash: &super::ChangeHash,
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
    /// `m/revocation/ ‖ key` → nothing: revocations whose withdrawals are complete.
    pub const REVOCATION_APPLIED: &[u8] = b"m/revocation/";

    pub fn waiting(
        dependency: &[u8; 32],
        document: &super::DocumentId,
        hash: &super::ChangeHash,
    ) -> Vec<u8> {
        [&[WAITING][..], dependency, document.as_bytes(), &hash.0].concat()
    }
    pub fn vouched(hash: &super::ChangeHash, key: &super::Bytes32) -> Vec<u8> {
        [&[VOUCHED][..], &hash.0, &key.0].concat()
    }
    pub fn held(
        key: &super::Bytes32,
        hash: &super::ChangeHash,
        document: &super::DocumentId,
    ) -> Vec<u8> {
        [&[HELD][..], &key.0, &hash.0, document.as_bytes()].concat()
    }
    pub fn author(key: &super::Bytes32, document: &super::DocumentId) -> Vec<u8> {
        [&[AUTHOR][..], &key.0, document.as_bytes()].concat()
    }
}

/// Why the node could not start or do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node key.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The roster.
    #[error(transparent)]
    Roster(#[from] RosterError),
    /// This node's key is not in the roster (or is revoked): it may not write.
    #[error(
        "this node's key is not a current member of the roster; ask the consortium authority to add it"
    )]
    NotAMember,
    /// An edit made in another institution's name.
    #[error("this node writes for {own}, not for another institution")]
    WrongInstitution {
        /// The node's institution.
        own: InstitutionId,
    },
    /// No such document.
    #[error("no document {0}")]
    UnknownDocument(DocumentId),
    /// The document is of another kind than asked for.
    #[error("document {document} is a {found}, not a {expected}")]
    WrongKind {
        /// The document.
        document: DocumentId,
        /// The kind asked for.
        expected: DocumentKind,
        /// Its kind.
        found: DocumentKind,
    },
    /// The typed operation was refused.
    #[error(transparent)]
    Op(#[from] OpError),
    /// A stored document does not load as its kind.
    #[error(transparent)]
    Load(#[from] crate::model::LoadError),
    /// The node's own change did not pass the pipeline: a bug, reported rather than hidden.
    #[error("the local change was not accepted: {0:?}")]
    LocalChangeRefused(Ingested),
    /// The pipeline refused an envelope outright.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A listing cursor that is not one this node gave out.
    #[error("the cursor is not one this node gave out; start from the first page")]
    BadCursor,
}

/// Why an envelope was refused without being stored at all.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// It does not decode or its signature does not verify.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The quarantine is full; the change was refused and not stored.
    #[error(
        "the quarantine holds its maximum of {QUARANTINE_CHANGES_MAX} changes; the change was refused and not kept. Review and clear the quarantine"
    )]
    QuarantineFull,
    /// The change waits for more missing dependencies than any honest change has.
    #[error(
        "the change names {missing} dependencies this node lacks, more than the {PENDING_MISSING_PER_CHANGE_MAX} it holds a change for; it was refused and not kept"
    )]
    TooManyMissing {
        /// How many it lacks.
        missing: usize,
    },
    /// Too many changes of one revoked key already wait for its cut-off to be drawn.
    #[error(
        "{REVOKED_HELD_PER_KEY_MAX} changes of this revoked key already wait until its cut-off can be drawn; the change was refused and not kept"
    )]
    RevokedBacklogFull,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the pipeline decided for one envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Accepted and durable.
    Accepted(ChangeHash),
    /// Already accepted before: nothing changed.
    Duplicate(ChangeHash),
    /// Held until its dependencies arrive.
    Pending(ChangeHash),
    /// Refused for the reason given, and stored in quarantine with it.
    Quarantined(ChangeHash, String),
}

/// One page of the quarantine listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinePage {
    /// The records of this page.
    pub entries: Vec<QuarantineEntry>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

fn quarantine_entry(key: &[u8], value: &[u8]) -> Result<QuarantineEntry, StoreError> {
    let record: QuarantineRecord = decode(value, "quarantine record")?;
    let change = match record.claimed {
        Some(claimed) => claimed,
        None => key
            .get(1..33)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or(StoreError::Corrupt {
                what: "quarantine key",
            })?,
    };
    Ok(QuarantineEntry {
        change,
        document: record.document,
        reason: record.reason,
        envelope_bytes: record.envelope_bytes,
        envelope_kept: !record.envelope.is_empty(),
        at_ms: record.at_ms,
    })
}

/// Bytes as lowercase hex: listing cursors, and hashes and signatures in API answers.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Longest listing cursor accepted, in bytes (a quarantine key is at most 49).
const CURSOR_BYTES_MAX: usize = 128;

/// A listing cursor back to bytes; `None` if it is not even-length hex within
/// `CURSOR_BYTES_MAX`.
fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 2 * CURSOR_BYTES_MAX {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why a change built on a quarantined change is quarantined with it.
pub const REASON_DEPENDS_ON_QUARANTINED: &str = "it depends on a quarantined change";
/// Why a revoked key's change past its cut-off is quarantined.
pub const REASON_PAST_CUTOFF: &str =
    "the author's key was revoked and this change is not within the revocation's cut-off";

impl Ingested {
    /// Whether the decision shows that whoever sent the change is at fault: an honest member
    /// sends only changes it accepted, and every rule but two is judged the same everywhere.
    /// The two: a revoked key's change past its cut-off (the sender may not have the roster
    /// that revokes it yet) and a change built on one (the same).
    pub fn blames_sender(&self) -> bool {
        match self {
            Ingested::Quarantined(_, reason) => {
                reason != REASON_DEPENDS_ON_QUARANTINED && reason != REASON_PAST_CUTOFF
            }
            _ => false,
        }
    }
}

/// A quarantined change as operators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The change.
    pub change: [u8; 32],
    /// Its document.
    pub document: DocumentId,
    /// Why it was refused (names fields and rules, never content).
    pub reason: String,
    /// The envelope's size in bytes.
    #[serde(default)]
    pub envelope_bytes: u64,
    /// Whether the envelope is kept whole (bodies are kept up to a byte budget).
    #[serde(default)]
    pub envelope_kept: bool,
    /// When it was quarantined, in milliseconds since the epoch (0 if not recorded).
    #[serde(default)]
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct QuarantineRecord {
    document: DocumentId,
    /// For a refused envelope, the change it claims to carry.
    #[serde(default)]
    claimed: Option<[u8; 32]>,
    reason: String,
    /// The envelope, when the quarantine's body budget had room for it (empty otherwise).
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
    /// SHA-256 of the envelope, kept whether or not its body is.
    #[serde(default)]
    digest: Option<[u8; 32]>,
    /// The envelope's size in bytes.
    #[serde(default)]
    envelope_bytes: u64,
    /// When it was quarantined, in milliseconds since the epoch (0: before this was kept).
    #[serde(default)]
    at_ms: u64,
    /// The change's dependencies, kept whether or not the envelope is (`None`: a record from
    /// before they were kept; read from its envelope).
    #[serde(default)]
    deps: Option<Vec<[u8; 32]>>,
}

impl QuarantineRecord {
    fn new(document: DocumentId, claimed: Option<[u8; 32]>, reason: &str, envelope: &[u8]) -> Self {
        Self {
            document,
            claimed,
            reason: reason.to_string(),
            envelope: envelope.to_vec(),
            digest: Some(Sha256::digest(envelope).into()),
            envelope_bytes: envelope.len() as u64,
            at_ms: u64::try_from(audit::now_ms()).unwrap_or(0),
            deps: Some(
                dependencies_of(envelope)
                    .into_iter()
                    .map(|hash| hash.0)
                    .collect(),
            ),
        }
    }

    fn dependencies(&self) -> Vec<ChangeHash> {
        match &self.deps {
            Some(deps) => deps.iter().copied().map(ChangeHash).collect(),
            None => dependencies_of(&self.envelope),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct PendingRecord {
    document: DocumentId,
    /// The dependencies it waits for, when it was parked.
    missing: Vec<[u8; 32]>,
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
    /// Whose share it counts against: its author's key, or `STRANGERS_BUCKET`.
    #[serde(default)]
    bucket: [u8; 32],
    /// Its place in the bucket's order (`keys::PENDING_ORDER`).
    #[serde(default)]
    sequence: u64,
    /// It waits for itself: woken by name (a revoked key's change until the cut-off can be
    /// drawn, a stranger's change until a roster names its author).
    #[serde(default)]
    waits_on_itself: bool,
    /// The revoked key whose cut-off it waits for, if any (`keys::HELD`).
    #[serde(default)]
    held_for: Option<[u8; 32]>,
}

impl PendingRecord {
    fn usage(&self) -> Usage {
        Usage {
            changes: 1,
            bytes: self.envelope.len(),
            waits: self.missing.len() + usize::from(self.waits_on_itself),
        }
    }
}

/// What a held change waits for, besides its missing dependencies.
enum Hold {
    /// Only its dependencies; it counts against its author's share.
    Dependencies,
    /// The cut-off of its revoked author's key to be drawable here, or a mark within it.
    Cutoff(Bytes32),
    /// A roster that names its author.
    Roster,
}

/// What `Node::unpark` took out of the store, to take off its bucket's share.
#[derive(Clone, Copy, Debug)]
struct Unparked {
    bucket: [u8; 32],
    sequence: u64,
    usage: Usage,
}

/// The bucket of every author the roster does not know: they share one small quota.
const STRANGERS_BUCKET: [u8; 32] = [0xff; 32];

/// What pending changes hold: of one bucket, or of all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    changes: usize,
    bytes: usize,
    waits: usize,
}

impl Usage {
    fn plus(self, other: Usage) -> Usage {
        Usage {
            changes: self.changes + other.changes,
            bytes: self.bytes + other.bytes,
            waits: self.waits + other.waits,
        }
    }

    fn minus(self, other: Usage) -> Usage {
        Usage {
            changes: self.changes.saturating_sub(other.changes),
            bytes: self.bytes.saturating_sub(other.bytes),
            waits: self.waits.saturating_sub(other.waits),
        }
    }

    fn exceeds(self, quota: Usage) -> bool {
        self.changes > quota.changes || self.bytes > quota.bytes || self.waits > quota.waits
    }

    fn encode(self) -> Vec<u8> {
        [
            (self.bytes as u64).to_be_bytes(),
            (self.waits as u64).to_be_bytes(),
        ]
        .concat()
    }

    fn decode(bytes: &[u8]) -> Option<Usage> {
        let bytes_held = u64::from_be_bytes(bytes.get(0..8)?.try_into().ok()?);
        let waits = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(Usage {
            changes: 1,
            bytes: usize::try_from(bytes_held).ok()?,
            waits: usize::try_from(waits).ok()?,
        })
    }
}

/// The pending changes' shares, counted at open from the order keys and kept in step with
/// every batch that parks or settles a change.
#[derive(Debug, Default)]
struct PendingBook {
    buckets: HashMap<[u8; 32], Usage>,
    total: Usage,
    next_sequence: u64,
}

impl PendingBook {
    fn quota(bucket: &[u8; 32]) -> Usage {
        if *bucket == STRANGERS_BUCKET {
            Usage {
                changes: PENDING_CHANGES_OF_STRANGERS_MAX,
                bytes: PENDING_BYTES_OF_STRANGERS_MAX,
                waits: PENDING_CHANGES_OF_STRANGERS_MAX,
            }
        } else {
            Usage {
                changes: PENDING_CHANGES_PER_AUTHOR_MAX,
                bytes: PENDING_BYTES_PER_AUTHOR_MAX,
                waits: PENDING_WAITS_PER_AUTHOR_MAX,
            }
        }
    }

    const TOTAL: Usage = Usage {
        changes: PENDING_CHANGES_MAX,
        bytes: PENDING_BYTES_MAX,
        waits: PENDING_WAITS_MAX,
    };

    fn of(&self, bucket: &[u8; 32]) -> Usage {
        self.buckets.get(bucket).copied().unwrap_or_default()
    }

    fn add(&mut self, bucket: [u8; 32], usage: Usage) {
        let entry = self.buckets.entry(bucket).or_default();
        *entry = entry.plus(usage);
        self.total = self.total.plus(usage);
    }

    /// Takes a change `unpark` removed off its share (after its batch was applied).
    fn settled(&mut self, unparked: Option<Unparked>) {
        if let Some(unparked) = unparked {
            self.remove(&unparked.bucket, unparked.usage);
        }
    }

    fn remove(&mut self, bucket: &[u8; 32], usage: Usage) {
        if let Some(entry) = self.buckets.get_mut(bucket) {
            *entry = entry.minus(usage);
            if entry.changes == 0 {
                self.buckets.remove(bucket);
            }
        }
        self.total = self.total.minus(usage);
    }

    /// The bucket holding the largest part of the whole, in whichever measure it holds most
    /// of: the one to evict from when the whole is full.
    fn largest(&self) -> Option<[u8; 32]> {
        let per_mille = |part: usize, whole: usize| part.saturating_mul(1_000) / whole.max(1);
        self.buckets
            .iter()
            .max_by_key(|(_, usage)| {
                per_mille(usage.changes, Self::TOTAL.changes)
                    .max(per_mille(usage.bytes, Self::TOTAL.bytes))
                    .max(per_mille(usage.waits, Self::TOTAL.waits))
            })
            .map(|(bucket, _)| *bucket)
    }
}

/// A change waiting for its dependencies, as operators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEntry {
    /// The change.
    pub change: [u8; 32],
    /// Its document.
    pub document: DocumentId,
    /// The dependencies it was waiting for when it arrived.
    pub missing: Vec<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
struct DocumentRecord {
    kind: DocumentKind,
    heads: Vec<[u8; 32]>,
    /// Bytes of the envelopes accepted since the document's last snapshot (see
    /// `Node::snapshot_due`).
    #[serde(default)]
    tail: u64,
    /// Bytes of that snapshot.
    #[serde(default)]
    snapshot: u64,
}

/// A change as the store keeps it (`keys::ENVELOPE`): its envelope, as received or signed; or,
/// once the document's snapshot holds the change, its signature alone: the change's bytes are
/// in the snapshot, so keeping them twice would double what a file costs on disk. An envelope
/// is rebuilt from the document when one must be sent (`into_envelope`). The cost: a snapshot
/// damaged beyond loading loses those changes here, and `repair` then fetches the document
/// from peers, as for any damaged document.
enum StoredChange {
    Envelope(Vec<u8>),
    Signature([u8; 64]),
}

/// The first byte of a change stored as its signature alone; an envelope (a CBOR map) never
/// starts with it.
const SIGNATURE_ONLY: u8 = b'S';

impl StoredChange {
    fn decode(value: Vec<u8>) -> Result<Self, StoreError> {
        match value.split_first() {
            Some((&SIGNATURE_ONLY, signature)) => signature
                .try_into()
                .map(Self::Signature)
                .map_err(|_| StoreError::Corrupt {
                    what: "stored signature",
                }),
            _ => Ok(Self::Envelope(value)),
        }
    }

    /// The value that stores a change by its signature alone.
    fn signature_only(signature: &[u8; 64]) -> Vec<u8> {
        [&[SIGNATURE_ONLY][..], signature].concat()
    }

    fn signature(&self) -> Result<[u8; 64], StoreError> {
        match self {
            Self::Signature(signature) => Ok(*signature),
            Self::Envelope(envelope) => Envelope::decode(envelope)
                .ok()
                .and_then(|envelope| envelope.signature.try_into().ok())
                .ok_or(StoreError::Corrupt { what: "envelope" }),
        }
    }

    /// The change's envelope; rebuilt from `doc`, which must hold the change, when only its
    /// signature is stored.
    fn into_envelope(
        self,
        document: DocumentId,
        hash: &ChangeHash,
        doc: &AutoCommit,
    ) -> Result<Vec<u8>, StoreError> {
        match self {
            Self::Envelope(envelope) => Ok(envelope),
            Self::Signature(signature) => {
                let mut change = crate::model::automerge::ReadDoc::get_change_by_hash(doc, hash)
                    .ok_or(StoreError::Corrupt {
                        what: "a change its snapshot lacks",
                    })?;
                Ok(Envelope::seal(document, &mut change, &signature).encode())
            }
        }
    }
}

/// Where a node keeps its data and whom it trusts.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The data directory (key, store).
    pub data_dir: PathBuf,
    /// The consortium authority's public key.
    pub authority: Bytes32,
}

/// A decoded document in the cache.
struct Cached {
    doc: AutoCommit,
    kind: DocumentKind,
    bytes: usize,
    used: u64,
}

/// Documents decoded on demand, bounded in count and bytes: 700,000 files are not 700,000
/// loaded documents. A document here is exactly as the store holds it: only a decision (under
/// the decision lock) puts one in, and whoever changes one takes it out first.
#[derive(Default)]
struct Documents {
    documents: HashMap<DocumentId, Cached>,
    bytes: usize,
    clock: u64,
}

impl Documents {
    fn touch(&mut self, id: &DocumentId) -> Option<&mut Cached> {
        self.clock += 1;
        let clock = self.clock;
        let cached = self.documents.get_mut(id)?;
        cached.used = clock;
        Some(cached)
    }

    fn remove(&mut self, id: &DocumentId) -> Option<Cached> {
        let cached = self.documents.remove(id)?;
        self.bytes -= cached.bytes;
        Some(cached)
    }

    /// Inserts a document as the most recently used, then evicts the least recently used
    /// others until the cache is within its bounds. The document just inserted is never the
    /// one evicted.
    fn insert(&mut self, id: DocumentId, mut cached: Cached) {
        self.remove(&id);
        self.clock += 1;
        cached.used = self.clock;
        self.bytes += cached.bytes;
        self.documents.insert(id, cached);
        while self.documents.len() > CACHE_DOCUMENTS_MAX || self.bytes > CACHE_BYTES_MAX {
            let Some(oldest) = self
                .documents
                .iter()
                .filter(|(other, _)| **other != id)
                .min_by_key(|(_, c)| c.used)
                .map(|(id, _)| *id)
            else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

/// What decisions share across documents: the counters, the audit log's head and the pending
/// changes' books. Held (the decision lock) to check a change against the store and write the
/// decision, never while judging a change prepared beforehand, nor while flushing.
#[derive(Default)]
struct Ledger {
    /// Changes accepted by the store so far (mirrors `keys::ACCEPTED`).
    accepted: u64,
    /// The audit log's head (mirrors `audit::HEAD`).
    audit: AuditHead,
    /// Changes in quarantine (counted at open).
    quarantined: usize,
    /// Changes to decide again: those waiting for a change just decided, and held changes of
    /// a revoked key that were just vouched for.
    woken: VecDeque<ChangeHash>,
    /// Revoked keys whose cut-off may just have become drawable.
    recheck: BTreeSet<Bytes32>,
    /// What pending changes hold, per bucket.
    pending: PendingBook,
    /// Bytes of quarantined envelopes kept whole (mirrors `keys::QUARANTINE_BODIES`).
    quarantine_bodies: u64,
}

/// The ledger's counts as of the last release of the decision lock.
struct LedgerCounts {
    quarantined: std::sync::atomic::AtomicUsize,
    pending: std::sync::atomic::AtomicUsize,
}

/// The decision lock, held. Releasing it publishes the counts status reads show
/// (`LedgerCounts`), so no code path that changes them can forget to.
struct LedgerGuard<'a> {
    guard: MutexGuard<'a, Ledger>,
    counts: &'a LedgerCounts,
}

impl std::ops::Deref for LedgerGuard<'_> {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        &self.guard
    }
}

impl std::ops::DerefMut for LedgerGuard<'_> {
    fn deref_mut(&mut self) -> &mut Ledger {
        &mut self.guard
    }
}

impl Drop for LedgerGuard<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counts
            .quarantined
            .store(self.guard.quarantined, Relaxed);
        self.counts
            .pending
            .store(self.guard.pending.total.changes, Relaxed);
    }
}

/// A change to decide: its envelope verified, or why it did not (with the envelope). Held
/// only while a batch is decided, so the size of its variants matters little.
#[allow(clippy::large_enum_variant)]
enum Incoming<'a> {
    Verified(VerifiedChange),
    Failed(EnvelopeError, &'a [u8]),
}

/// The document a local change was made on, holding the change (see `Node::write_in_place`).
struct Written {
    doc: AutoCommit,
    /// Its cache weight before the change.
    bytes: usize,
}

/// A change applied to its document and judged there before the decision lock is taken (see
/// `Node::prepare`). The decision uses it only if the store still holds the document at
/// `base` and the author still belongs to `author`'s institution: the judgement is a function
/// of these alone.
struct Prepared {
    /// The document's heads before the change, sorted (none for a creation).
    base: Vec<ChangeHash>,
    author: InstitutionId,
    /// The document, holding the change.
    doc: AutoCommit,
    /// Its cache weight before the change.
    bytes: usize,
    /// The document's view with the change.
    view: View,
    /// A snapshot of `doc`, when the document's tail of envelopes outgrows its last one.
    snapshot: Option<Vec<u8>>,
}

/// A document a peer sent whole (a fetch), loaded, with its changes' signatures by change
/// hash (see `Node::ingest_whole`).
pub struct WholeDocument {
    /// The document's id, as the peer named it (its creation change must agree).
    pub id: DocumentId,
    /// The document as the peer's bytes loaded.
    pub doc: AutoCommit,
    /// The signature of each change, by change hash.
    pub signatures: HashMap<[u8; 32], [u8; 64]>,
}

/// A change of a document sent whole, checked before the decision lock is taken.
struct WholeChange {
    hash: ChangeHash,
    author: Bytes32,
    institution: InstitutionId,
    signature: [u8; 64],
}

/// A document sent whole, judged at once before the decision lock is taken (see
/// `Node::prepare_whole`). The decision uses it only if the store still holds nothing of the
/// document and every author still belongs to the institution named here.
struct PreparedWhole {
    /// Its changes, in causal order.
    changes: Vec<WholeChange>,
    view: View,
    snapshot: Vec<u8>,
}

/// What became of a document prepared whole (see `Node::decide_whole`).
enum WholeDecision {
    Accepted,
    /// The store holds part of it now, or an author's standing changed: decide it change by
    /// change.
    GivenBack(WholeDocument),
    /// The store failed.
    Failed(StoreError, WholeDocument),
}

/// A change judged on its document.
enum Judgement {
    Accepted(Box<View>),
    /// Refused; `clean` when the document was left as it was (judged on a copy).
    Refused {
        reason: String,
        clean: bool,
    },
}

/// Typed views of documents as of the heads digest they were read or decided at (see
/// `VIEWS_CACHED_MAX`). Its lock is held only for a lookup or an insert, never across a
/// decision, a load or I/O.
#[derive(Default)]
struct Views {
    entries: HashMap<DocumentId, (HeadsDigest, Arc<View>, u64)>,
    clock: u64,
}

impl Views {
    fn get(&mut self, id: &DocumentId, digest: &HeadsDigest) -> Option<Arc<View>> {
        self.clock += 1;
        let clock = self.clock;
        let (held, view, used) = self.entries.get_mut(id)?;
        if held != digest {
            return None;
        }
        *used = clock;
        Some(view.clone())
    }

    fn insert(&mut self, id: DocumentId, digest: HeadsDigest, view: Arc<View>) {
        self.clock += 1;
        self.entries.insert(id, (digest, view, self.clock));
        if self.entries.len() > VIEWS_CACHED_MAX
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(id, _)| *id)
        {
            self.entries.remove(&oldest);
        }
    }
}

/// One accepted change of a document, for its history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// The change.
    pub change: ChangeHash,
    /// The institution of the key that signed it (none if the key left the roster).
    pub institution: Option<InstitutionId>,
    /// The signing node key.
    pub author: Bytes32,
    /// When, by the writer's clock, in milliseconds since the epoch (whole seconds).
    pub at_ms: i64,
}

/// A change this node wrote, once durable: what the network layer publishes.
#[derive(Clone, Debug)]
pub struct LocalChange {
    /// Its document.
    pub document: DocumentId,
    /// Its hash.
    pub hash: ChangeHash,
    /// Its signed envelope.
    pub envelope: Vec<u8>,
}

/// One member institution's node.
pub struct Node {
    identity: Identity,
    /// The automerge actor this node writes as: its key and its store's incarnation
    /// (`envelope::ACTOR_INCARNATION_BYTES`), so it never reuses a sequence number even if
    /// its store lost changes its peers hold.
    actor: Actor,
    institution: InstitutionId,
    authority: Bytes32,
    store: WitnessedStore,
    commit: GroupCommit,
    /// Acknowledged changes the store lost before this open (see `WitnessedStore`).
    lost_at_open: std::sync::atomic::AtomicU64,
    /// Salt of the national-id index; random per node, so the index is useless elsewhere.
    salt: [u8; 32],
    membership: RwLock<Membership>,
    /// The decision lock: held while a change is checked against the store and its decision
    /// written, never while flushing. A change that builds on what the node holds is judged
    /// before it is taken (`prepare`), so decisions on different documents judge in parallel.
    ledger: Mutex<Ledger>,
    /// Decoded documents. Its lock is held only to take, put or find one.
    documents: Mutex<Documents>,
    /// Held while a peer's batch is decided: a catch-up's decisions take one core at most, and
    /// clinical reads, local writes and the network keep the other (on two cores, batches
    /// decided side by side made reads wait 2× longer, and catch-up no faster).
    peer_batches: Mutex<()>,
    /// The ledger's counts that status reads show, published whenever the decision lock is
    /// released (`LedgerGuard`), so those reads never take it.
    counts: LedgerCounts,
    /// Typed views for reads that need not wait for decisions.
    views: Mutex<Views>,
    /// Local writers to one document take turns from reading it to deciding their change:
    /// two writes based on the same state would give the node's actor one sequence number
    /// twice, and automerge refuses the second. Striped by document id: bounded memory.
    document_locks: Vec<Mutex<()>>,
    /// Every document held and the digest of its heads, for reconciliation (mirrors the
    /// `c` keyspace). Written under the decision lock.
    catalogue: RwLock<Catalogue>,
    /// Durable local writes, for the network layer.
    local_changes: tokio::sync::broadcast::Sender<LocalChange>,
    /// The last durable audit sequence, for the change feed.
    audit_updates: tokio::sync::watch::Sender<u64>,
}

/// Writes to this node on behalf of an app (see `Node::writer`).
#[derive(Clone, Copy, Debug)]
pub struct Writer<'a> {
    node: &'a Node,
    app: Option<&'a str>,
}

impl Writer<'_> {
    /// Registers a resident: creates their health file. Returns once it is durable.
    pub fn create_health_file(
        &self,
        editor: &Editor,
        demographics: &Demographics,
    ) -> Result<(DocumentId, ChangeHash), NodeError> {
        let node = self.node;
        node.check_editor(editor)?;
        let mut file = HealthFile::create(&node.actor, editor, demographics)?;
        let id = file.id();
        let changes = file.changes_since(&[]);
        let written = Written {
            doc: file.into_automerge(),
            bytes: 0,
        };
        let hash = node.write_local(id, changes, Some(written), self.app)?;
        Ok((id, hash))
    }

    /// Sends a referral from this node's institution. Returns once it is durable.
    pub fn create_referral(
        &self,
        editor: &Editor,
        referral: &NewReferral,
    ) -> Result<(DocumentId, ChangeHash), NodeError> {
        let node = self.node;
        node.check_editor(editor)?;
        let mut created = Referral::create(&node.actor, editor, referral)?;
        let id = created.id();
        let changes = created.changes_since(&[]);
        let written = Written {
            doc: created.into_automerge(),
            bytes: 0,
        };
        let hash = node.write_local(id, changes, Some(written), self.app)?;
        Ok((id, hash))
    }

    /// Applies a typed edit to a health file. Returns the change's hash once it is durable.
    pub fn apply_health_file(
        &self,
        id: DocumentId,
        editor: &Editor,
        op: &HealthFileOp,
    ) -> Result<ChangeHash, NodeError> {
        let node = self.node;
        node.check_editor(editor)?;
        let _writing = node.lock_document(&id);
        match node.write_in_place(id, DocumentKind::HealthFile, |doc| {
            HealthFile::apply_to(doc, &node.actor, editor, op)
        })? {
            Some((change, written)) => node.write_local(id, vec![change], Some(written), self.app),
            None => node.write_local(id, Vec::new(), None, self.app),
        }
    }

    /// Applies a typed edit to a referral. Returns the change's hash once it is durable.
    pub fn apply_referral(
        &self,
        id: DocumentId,
        editor: &Editor,
        op: &ReferralOp,
    ) -> Result<ChangeHash, NodeError> {
        let node = self.node;
        node.check_editor(editor)?;
        let _writing = node.lock_document(&id);
        let doc = node.document(id, DocumentKind::Referral)?;
        let mut referral = Referral::from_automerge(doc, &node.actor)?;
        let heads = referral.heads();
        referral.apply(editor, op)?;
        node.write_local(id, referral.changes_since(&heads), None, self.app)
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("identity", &self.identity)
            .field("institution", &self.institution)
            .finish()
    }
}

impl Node {
    /// Moves a store that no longer opens (sled refuses its damaged files) aside, to
    /// `store.damaged-<seconds since the epoch>` in the data directory, so the node starts
    /// with an empty store and fetches everything from its peers. The key and the witness
    /// stay: at the next open the witness reports how many acknowledged changes the store
    /// held, as lost until the re-sync brings them back (`repair` then clears the count).
    /// The damaged files are kept for whoever wants to salvage this node's own writes that
    /// never reached a peer. Returns where they went.
    pub fn set_aside_store(data_dir: &Path) -> Result<PathBuf, NodeError> {
        let from = data_dir.join(STORE_DIR);
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let to = data_dir.join(format!("{STORE_DIR}.damaged-{seconds}"));
        std::fs::rename(&from, &to).map_err(|e| {
            StoreError::Backend(format!(
                "cannot move the store at {} aside: {e}",
                from.display()
            ))
        })?;
        tracing::warn!(to = %to.display(), "damaged store moved aside; the node will re-sync from peers");
        Ok(to)
    }

    /// Opens the node in `config.data_dir`, creating its key and store on first start.
    /// `roster` is a signed roster to adopt if newer than the stored one (the first start
    /// needs one).
    pub fn open(config: &NodeConfig, roster: Option<&[u8]>) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let identity = Identity::load_or_create(&config.data_dir)?;
        let store = WitnessedStore::open(
            &config.data_dir.join(STORE_DIR),
            &config.data_dir.join(WITNESS_FILE),
        )?;
        let accepted = match store.get(keys::ACCEPTED)? {
            None => 0,
            Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt {
                    what: "accepted count",
                }
            })?),
        };
        let previously_lost = match store.get(keys::LOST)? {
            None => 0,
            Some(bytes) => u64::from_be_bytes(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt { what: "lost count" })?,
            ),
        };
        if let Some(bytes) = store.get(keys::FORMAT)? {
            let found = <[u8; 4]>::try_from(bytes.as_slice())
                .map(u32::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    what: "format version",
                })?;
            if found > STORE_FORMAT {
                return Err(StoreError::Format {
                    found,
                    supported: STORE_FORMAT,
                }
                .into());
            }
            if found < 2 {
                migrate_to_format_2(&store)?;
            }
        }
        let lost_now = store.witnessed_at_open().saturating_sub(accepted);
        if lost_now > 0 {
            tracing::error!(
                lost = lost_now,
                "the store lost acknowledged changes; they must be re-synced from peers"
            );
        }
        // Kept in the store: the first flush rewrites the witness, and the loss must still be
        // reported at the next start.
        let lost_at_open = previously_lost + lost_now;
        store.set_accepted(accepted);
        let stored = store
            .get(keys::ROSTER)?
            .map(|bytes| SignedRoster::verify(&bytes, &config.authority))
            .transpose()?;
        let offered = roster
            .map(|bytes| SignedRoster::verify(bytes, &config.authority))
            .transpose()?;
        let membership = match (stored, offered) {
            // A node restarted with its bootstrap roster keeps the newer one it adopted since.
            (Some(held), Some(offered)) => match held.replaced_by(offered) {
                Ok(newer) => newer,
                Err(RosterError::Stale { current, offered }) => {
                    tracing::warn!(current, offered, "ignoring an older roster given at start");
                    held
                }
                Err(error) => return Err(error.into()),
            },
            (Some(held), None) => held,
            (None, Some(offered)) => offered,
            (None, None) => {
                return Err(RosterError::Malformed {
                    reason: "no roster: the first start needs the signed roster",
                }
                .into());
            }
        };
        let mut batch = Batch::default();
        // The incarnation is kept with the store and drawn anew with every new store and every
        // loss the witness reports: a store that lost changes, or one restored from a bundle
        // into an empty directory, never writes as an actor whose sequence numbers its peers
        // may hold. In the first batch: the flush that follows rewrites the witness, after
        // which the loss could no longer be seen. Kept across ordinary restarts, so a
        // registration sent again is still the same change.
        let incarnation = match store.get(keys::INCARNATION)? {
            Some(bytes) if lost_now == 0 => bytes,
            _ => {
                let mut incarnation = [0u8; crate::envelope::ACTOR_INCARNATION_BYTES];
                getrandom::fill(&mut incarnation).map_err(IdentityError::Randomness)?;
                batch.put(keys::INCARNATION, incarnation.to_vec());
                incarnation.to_vec()
            }
        };
        if incarnation.len() != crate::envelope::ACTOR_INCARNATION_BYTES {
            return Err(StoreError::Corrupt {
                what: "actor incarnation",
            }
            .into());
        }
        batch.put(keys::FORMAT, STORE_FORMAT.to_be_bytes().to_vec());
        batch.put(keys::ROSTER, membership.encoded().to_vec());
        if lost_now > 0 {
            batch.put(keys::LOST, lost_at_open.to_be_bytes().to_vec());
        }
        let salt: [u8; 32] = match store.get(keys::SALT)? {
            Some(bytes) => bytes
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "index salt" })?,
            None => {
                let mut salt = [0u8; 32];
                getrandom::fill(&mut salt).map_err(IdentityError::Randomness)?;
                batch.put(keys::SALT, salt.to_vec());
                salt
            }
        };
        let audit_head: AuditHead = match store.get(audit::HEAD)? {
            Some(bytes) => decode(&bytes, "audit head")?,
            None => AuditHead::default(),
        };
        let quarantined_at_open = store.keys_with_prefix(&[keys::QUARANTINE])?.len()
            + store.keys_with_prefix(&[keys::REFUSED])?.len();
        let quarantine_bodies = match store.get(keys::QUARANTINE_BODIES)? {
            None => 0,
            Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt {
                    what: "quarantine bodies count",
                }
            })?),
        };
        // The shares of pending changes, from their order keys alone (no envelope is read).
        let mut pending = PendingBook::default();
        for (key, value) in store.scan_prefix(&[keys::PENDING_ORDER])? {
            let (Some(bucket), Some(sequence), Some(usage)) = (
                key.get(1..33).and_then(|b| <[u8; 32]>::try_from(b).ok()),
                key.get(33..41)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes),
                Usage::decode(&value),
            ) else {
                return Err(StoreError::Corrupt {
                    what: "pending order key",
                }
                .into());
            };
            pending.add(bucket, usage);
            pending.next_sequence = pending.next_sequence.max(sequence + 1);
        }
        let mut catalogue = Catalogue::default();
        for (key, digest) in store.scan_prefix(&[keys::CATALOGUE])? {
            let (Some(id), Ok(digest)) = (
                key.get(1..17).and_then(|b| <[u8; 16]>::try_from(b).ok()),
                <[u8; 32]>::try_from(digest.as_slice()),
            ) else {
                return Err(StoreError::Corrupt {
                    what: "catalogue entry",
                }
                .into());
            };
            catalogue.insert(id, digest);
        }
        let commit = GroupCommit::default();
        commit.commit(&store, batch)?;
        let institution = match membership.admit(&identity.public_key(), &ChangeHash([0; 32])) {
            Admission::Member(institution) => institution,
            _ => return Err(NodeError::NotAMember),
        };
        let actor = [identity.public_key().0.as_slice(), &incarnation].concat();
        let pending_at_open = pending.total.changes;
        let node = Self {
            actor: Actor::from_bytes(actor),
            identity,
            institution,
            authority: config.authority,
            store,
            commit,
            lost_at_open: std::sync::atomic::AtomicU64::new(lost_at_open),
            salt,
            membership: RwLock::new(membership),
            document_locks: (0..DOCUMENT_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            catalogue: RwLock::new(catalogue),
            local_changes: tokio::sync::broadcast::channel(LOCAL_CHANGES_QUEUE_MAX).0,
            audit_updates: tokio::sync::watch::Sender::new(audit_head.sequence),
            views: Mutex::new(Views::default()),
            ledger: Mutex::new(Ledger {
                accepted,
                audit: audit_head,
                quarantined: quarantined_at_open,
                quarantine_bodies,
                pending,
                ..Ledger::default()
            }),
            documents: Mutex::new(Documents::default()),
            peer_batches: Mutex::new(()),
            counts: LedgerCounts {
                quarantined: quarantined_at_open.into(),
                pending: pending_at_open.into(),
            },
        };
        node.catch_up_revocations()?;
        Ok(node)
    }

    /// This node's identity (its key).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The consortium authority's public key.
    pub fn authority(&self) -> Bytes32 {
        self.authority
    }

    /// The automerge actor this node writes as: its key and its store's incarnation.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// This node's public key.
    pub fn public_key(&self) -> Bytes32 {
        self.identity.public_key()
    }

    /// The institution of the node behind a network peer, if it is a current member.
    pub fn peer_institution(&self, peer: &libp2p::PeerId) -> Option<InstitutionId> {
        let membership = self.membership();
        membership.peer_institution(peer)
    }

    /// The version of the roster this node holds.
    pub fn roster_version(&self) -> u64 {
        let membership = self.membership();
        membership.version()
    }

    /// The signed roster this node holds, encoded as it is sent to peers.
    pub fn signed_roster(&self) -> Vec<u8> {
        let membership = self.membership();
        membership.encoded().to_vec()
    }

    /// The institution this node writes for.
    pub fn institution(&self) -> &InstitutionId {
        &self.institution
    }

    /// Adopts a newer signed roster. A new revocation withdraws what this node accepted from
    /// the key past its cut-off before the call returns. The roster held, offered again (as
    /// peers gossip and answer it), is `AlreadyHeld`: nothing is written, flushed or scanned.
    pub fn update_roster(
        &self,
        signed: &[u8],
    ) -> Result<crate::membership::RosterUpdate, NodeError> {
        use crate::membership::RosterUpdate;
        {
            // The roster held, byte for byte (its bytes were verified when it was adopted).
            let held = self.membership();
            if held.encoded() == signed {
                let version = held.version();
                return Ok(RosterUpdate::AlreadyHeld { version });
            }
        }
        let offered = SignedRoster::verify(signed, &self.authority)?;
        let version = {
            // No change is decided while the roster changes: each decision sees one roster.
            let _decisions = self.lock_ledger();
            let mut membership = self.membership.write().unwrap_or_else(|p| p.into_inner());
            // The roster held, encoded otherwise.
            if membership.is_same_roster(&offered) {
                let version = membership.version();
                return Ok(RosterUpdate::AlreadyHeld { version });
            }
            let newer = membership.replaced_by(offered)?;
            let mut batch = Batch::default();
            batch.put(keys::ROSTER, newer.encoded().to_vec());
            self.commit.commit(&self.store, batch)?;
            *membership = newer;
            membership.version()
        };
        self.catch_up_revocations()?;
        Ok(RosterUpdate::Adopted { version })
    }

    /// Registers a resident: creates their health file. Returns once it is durable.
    pub fn create_health_file(
        &self,
        editor: &Editor,
        demographics: &Demographics,
    ) -> Result<(DocumentId, ChangeHash), NodeError> {
        self.writer(None).create_health_file(editor, demographics)
    }

    /// Sends a referral from this node's institution. Returns once it is durable.
    pub fn create_referral(
        &self,
        editor: &Editor,
        referral: &NewReferral,
    ) -> Result<(DocumentId, ChangeHash), NodeError> {
        self.writer(None).create_referral(editor, referral)
    }

    /// Applies a typed edit to a health file. Returns the change's hash once it is durable.
    pub fn apply_health_file(
        &self,
        id: DocumentId,
        editor: &Editor,
        op: &HealthFileOp,
    ) -> Result<ChangeHash, NodeError> {
        self.writer(None).apply_health_file(id, editor, op)
    }

    /// Applies a typed edit to a referral. Returns the change's hash once it is durable.
    pub fn apply_referral(
        &self,
        id: DocumentId,
        editor: &Editor,
        op: &ReferralOp,
    ) -> Result<ChangeHash, NodeError> {
        self.writer(None).apply_referral(id, editor, op)
    }

    /// The same writes, made by `app` through the API: each change's audit record names the
    /// app, in the same durable batch as the change, so no crash can keep the change and
    /// lose who wrote it.
    pub fn writer<'a>(&'a self, app: Option<&'a str>) -> Writer<'a> {
        Writer { node: self, app }
    }

    /// The typed view of a health file.
    pub fn health_file(&self, id: DocumentId) -> Result<HealthFileView, NodeError> {
        match self.view_of(id, DocumentKind::HealthFile)?.as_ref() {
            View::HealthFile(view) => Ok((**view).clone()),
            other => Err(NodeError::WrongKind {
                document: id,
                expected: DocumentKind::HealthFile,
                found: other.kind(),
            }),
        }
    }

    /// The typed view of a referral.
    pub fn referral(&self, id: DocumentId) -> Result<ReferralView, NodeError> {
        match self.view_of(id, DocumentKind::Referral)?.as_ref() {
            View::Referral(view) => Ok(view.clone()),
            other => Err(NodeError::WrongKind {
                document: id,
                expected: DocumentKind::Referral,
                found: other.kind(),
            }),
        }
    }

    /// A document's typed view as kept (shared, not copied): what the API serialises.
    pub fn view(&self, id: DocumentId, expected: DocumentKind) -> Result<Arc<View>, NodeError> {
        let view = self.view_of(id, expected)?;
        if view.kind() != expected {
            return Err(NodeError::WrongKind {
                document: id,
                expected,
                found: view.kind(),
            });
        }
        Ok(view)
    }

    /// A document's typed view. When the view kept for it shows the heads the catalogue
    /// holds now, that view is the answer: no copy of the document. Otherwise the document
    /// is read from the store, without the decision lock (a clinical read does not wait
    /// while the node decides a peer's batch), and its view is kept under the digest of the
    /// heads it shows: an accepted state at least as recent as the catalogue was when the
    /// read began.
    fn view_of(&self, id: DocumentId, expected: DocumentKind) -> Result<Arc<View>, NodeError> {
        if let Some(digest) = self.catalogue().get(id.as_bytes())
            && let Some(view) = self.lock_views().get(&id, &digest)
        {
            return Ok(view);
        }
        let (mut doc, found, _, _) = self
            .stored_document(&id)?
            .ok_or(NodeError::UnknownDocument(id))?;
        if found != expected {
            return Err(NodeError::WrongKind {
                document: id,
                expected,
                found,
            });
        }
        let mut view = crate::model::view(&doc).map_err(crate::model::LoadError::from)?;
        set_view_id(&mut view, id);
        let view = Arc::new(view);
        self.lock_views()
            .insert(id, catalogue_digest(&doc.get_heads()), view.clone());
        Ok(view)
    }

    fn lock_views(&self) -> MutexGuard<'_, Views> {
        self.views.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current heads of a document.
    pub fn heads(&self, id: DocumentId) -> Result<Vec<ChangeHash>, NodeError> {
        let record = self
            .document_record(&id)?
            .ok_or(NodeError::UnknownDocument(id))?;
        Ok(record.heads.into_iter().map(ChangeHash).collect())
    }

    /// Whether the change is stored (accepted) for the document.
    pub fn has_change(&self, id: DocumentId, change: &ChangeHash) -> Result<bool, NodeError> {
        Ok(self.store.get(&keys::envelope(&id, change))?.is_some())
    }

    /// Every stored envelope of a document, for sync and export.
    /// A document's envelopes in causal order (each after its dependencies): how they are
    /// sent to a peer that lacks the document.
    pub fn envelopes(&self, id: DocumentId) -> Result<Vec<Vec<u8>>, NodeError> {
        let mut by_hash: HashMap<[u8; 32], StoredChange> = HashMap::new();
        for (key, value) in self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, &id))?
        {
            let (_, hash) = parse_envelope_key(&key).ok_or(StoreError::Corrupt {
                what: "envelope key",
            })?;
            by_hash.insert(hash.0, StoredChange::decode(value)?);
        }
        let mut doc = self.sync_document(id)?.unwrap_or_default();
        let mut ordered = Vec::with_capacity(by_hash.len());
        for change in doc.get_changes(&[]) {
            let hash = change.hash();
            if let Some(stored) = by_hash.remove(&hash.0) {
                ordered.push(stored.into_envelope(id, &hash, &doc)?);
            }
        }
        // Anything the document does not hold (damage `verify` reports) goes last, if it can.
        ordered.extend(by_hash.into_values().filter_map(|stored| match stored {
            StoredChange::Envelope(envelope) => Some(envelope),
            StoredChange::Signature(_) => None,
        }));
        Ok(ordered)
    }

    /// The hashes of every change stored for a document, in hash order (no decoding).
    pub fn change_hashes(&self, id: DocumentId) -> Result<Vec<ChangeHash>, NodeError> {
        Ok(self
            .store
            .keys_with_prefix(&keys::per_document(keys::ENVELOPE, &id))?
            .iter()
            .filter_map(|key| parse_envelope_key(key).map(|(_, hash)| hash))
            .collect())
    }

    /// Who changed a document and when, oldest first: each accepted change with its hash,
    /// the institution whose key signed it, and the writer's clock.
    pub fn history(&self, id: DocumentId) -> Result<Vec<HistoryEntry>, NodeError> {
        let envelopes = self.envelopes(id)?;
        if envelopes.is_empty() {
            return Err(NodeError::UnknownDocument(id));
        }
        let membership = self.membership();
        envelopes
            .iter()
            .map(|bytes| {
                let verified = Envelope::verify(bytes)
                    .map_err(|_| StoreError::Corrupt { what: "envelope" })?;
                Ok(HistoryEntry {
                    change: verified.hash,
                    institution: membership.institution_of(&verified.author),
                    author: verified.author,
                    // Changes carry whole seconds of the writer's clock.
                    at_ms: verified.change.timestamp().saturating_mul(1000),
                })
            })
            .collect()
    }

    /// The catalogue: every document held and the digest of its heads.
    pub fn catalogue(&self) -> RwLockReadGuard<'_, Catalogue> {
        self.catalogue.read().unwrap_or_else(|p| p.into_inner())
    }

    fn catalogue_mut(&self) -> std::sync::RwLockWriteGuard<'_, Catalogue> {
        self.catalogue.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of a document as automerge holds it, for the sync protocol; `None` if this
    /// node does not hold it.
    pub fn sync_document(&self, id: DocumentId) -> Result<Option<AutoCommit>, NodeError> {
        Ok(self.copy_of(&id)?.map(|(doc, _)| doc))
    }

    /// A document as a fetch sends it: saved (automerge's compressed encoding), with the
    /// signature of each of its changes. When its snapshot holds every accepted change (no
    /// envelope accepted since), the snapshot is sent as stored, without decoding the
    /// document; otherwise the document is saved afresh. The signatures are read after the
    /// snapshot, so a change accepted meanwhile adds a signature, never takes one away. `None`
    /// if the document is not held.
    #[allow(clippy::type_complexity)]
    pub fn whole_document(
        &self,
        id: DocumentId,
    ) -> Result<Option<(Vec<u8>, Vec<(ChangeHash, [u8; 64])>)>, NodeError> {
        let Some(record) = self.document_record(&id)? else {
            return Ok(None);
        };
        let snapshot = match record.tail == 0 && record.snapshot > 0 {
            true => self
                .store
                .get(&keys::per_document(keys::SNAPSHOT, &id))?
                .filter(|snapshot| snapshot.len() as u64 == record.snapshot),
            false => None,
        };
        let saved = match snapshot {
            Some(snapshot) => snapshot,
            None => match self.copy_of(&id)? {
                Some((mut doc, _)) => doc.save(),
                None => return Ok(None),
            },
        };
        let mut signatures = Vec::new();
        for (key, value) in self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, &id))?
        {
            let (_, hash) = parse_envelope_key(&key).ok_or(StoreError::Corrupt {
                what: "envelope key",
            })?;
            signatures.push((hash, StoredChange::decode(value)?.signature()?));
        }
        Ok(Some((saved, signatures)))
    }

    /// The signatures of accepted changes of a document, to send beside them; a change not
    /// held is left out.
    pub fn signatures(
        &self,
        id: DocumentId,
        changes: &[ChangeHash],
    ) -> Result<Vec<(ChangeHash, [u8; 64])>, NodeError> {
        let mut found = Vec::with_capacity(changes.len());
        for hash in changes {
            if let Some(value) = self.store.get(&keys::envelope(&id, hash))? {
                found.push((*hash, StoredChange::decode(value)?.signature()?));
            }
        }
        Ok(found)
    }

    /// Durable local writes from now on, for the network layer to publish.
    pub fn local_changes(&self) -> tokio::sync::broadcast::Receiver<LocalChange> {
        self.local_changes.subscribe()
    }

    /// The quarantined changes, with their reasons.
    pub fn quarantine(&self) -> Result<Vec<QuarantineEntry>, NodeError> {
        let mut entries = Vec::new();
        let mut after = None;
        loop {
            let page = self.quarantine_page(after.as_deref(), QUARANTINE_PAGE_RECORDS_MAX)?;
            entries.extend(page.entries);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(entries),
            }
        }
    }

    /// One page of the quarantine, in key order from just after the cursor `after` (a
    /// page's `next`), at most `limit` records (capped at `QUARANTINE_PAGE_RECORDS_MAX`).
    pub fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<QuarantinePage, NodeError> {
        let limit = limit.clamp(1, QUARANTINE_PAGE_RECORDS_MAX);
        let start = match after {
            None => Vec::new(),
            Some(cursor) => {
                let mut key = hex_decode(cursor).ok_or(NodeError::BadCursor)?;
                // Just past the cursor's key.
                key.push(0);
                key
            }
        };
        let mut records = Vec::new();
        // Both keyspaces, in key order ('f' before 'q').
        for prefix in [keys::REFUSED, keys::QUARANTINE] {
            if records.len() > limit {
                break;
            }
            let from = if start.first() == Some(&prefix) {
                start.clone()
            } else if start.first().is_none_or(|first| *first < prefix) {
                vec![prefix]
            } else {
                continue;
            };
            records.extend(
                self.store
                    .scan_from(&[prefix], &from, limit + 1 - records.len())?,
            );
        }
        let next = (records.len() > limit).then(|| hex_encode(&records[limit - 1].0));
        records.truncate(limit);
        let entries = records
            .into_iter()
            .map(|(key, value)| quarantine_entry(&key, &value))
            .collect::<Result<_, StoreError>>()?;
        Ok(QuarantinePage { entries, next })
    }

    /// The quarantine records of `change`: its copies judged in each document (one short
    /// prefix scan), then refused envelopes that claim it (read a page at a time).
    pub fn quarantined_change(
        &self,
        change: &ChangeHash,
    ) -> Result<Vec<QuarantineEntry>, NodeError> {
        let mut entries: Vec<QuarantineEntry> = self
            .store
            .scan_prefix(&[&[keys::QUARANTINE][..], &change.0].concat())?
            .iter()
            .map(|(key, value)| quarantine_entry(key, value))
            .collect::<Result<_, StoreError>>()?;
        let mut from = vec![keys::REFUSED];
        loop {
            let page =
                self.store
                    .scan_from(&[keys::REFUSED], &from, QUARANTINE_PAGE_RECORDS_MAX)?;
            let Some((last, _)) = page.last() else {
                return Ok(entries);
            };
            from = [last.as_slice(), &[0]].concat();
            for (key, value) in &page {
                let entry = quarantine_entry(key, value)?;
                if entry.change == change.0 {
                    entries.push(entry);
                }
            }
        }
    }

    /// Removes quarantine records, with their envelopes: every record, or those quarantined
    /// before `before_ms` (milliseconds since the epoch). A purged change that arrives again
    /// is judged again, and quarantined again. The purge is on the audit log. Returns how many
    /// records went.
    pub fn purge_quarantine(&self, before_ms: Option<u64>) -> Result<usize, NodeError> {
        let (ticket, purged) = {
            let mut ledger = self.lock_ledger();
            // The purge is on record before anything goes: the audit record is in the first
            // batch.
            let mut batch = Batch::default();
            ledger.audit = append_record(
                &mut batch,
                ledger.audit,
                AuditRecord {
                    sequence: 0,
                    previous: [0; 32],
                    at_ms: audit::now_ms(),
                    action: AuditAction::QuarantinePurged,
                    document: DocumentId::from_bytes([0; 16]),
                    change: None,
                    institution: Some(self.institution.clone()),
                    app: None,
                },
            );
            let mut purged = 0usize;
            for prefix in [keys::REFUSED, keys::QUARANTINE] {
                let mut from = vec![prefix];
                loop {
                    let page =
                        self.store
                            .scan_from(&[prefix], &from, QUARANTINE_PAGE_RECORDS_MAX)?;
                    let Some((last, _)) = page.last() else {
                        break;
                    };
                    from = [last.as_slice(), &[0]].concat();
                    let (mut bodies, mut records) = (ledger.quarantine_bodies, ledger.quarantined);
                    let mut purged_here = 0;
                    for (key, value) in &page {
                        let record: QuarantineRecord = decode(value, "quarantine record")?;
                        if before_ms.is_some_and(|before| record.at_ms >= before) {
                            continue;
                        }
                        bodies = bodies.saturating_sub(record.envelope.len() as u64);
                        records = records.saturating_sub(1);
                        batch.delete(key.clone());
                        purged_here += 1;
                    }
                    batch.put(keys::QUARANTINE_BODIES, bodies.to_be_bytes().to_vec());
                    self.commit.apply(&self.store, std::mem::take(&mut batch))?;
                    (ledger.quarantine_bodies, ledger.quarantined) = (bodies, records);
                    purged += purged_here;
                }
            }
            let ticket = self.commit.apply(&self.store, batch)?;
            tracing::warn!(purged, "quarantine records purged");
            (ticket, purged)
        };
        self.commit.wait_durable(&self.store, ticket)?;
        self.audit_updates
            .send_replace(self.lock_ledger().audit.sequence);
        Ok(purged)
    }

    /// How many changes are held waiting (for dependencies, a cut-off or a roster), as of the
    /// last decision (without the decision lock).
    pub fn pending_count(&self) -> Result<usize, NodeError> {
        Ok(self
            .counts
            .pending
            .load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The dependencies that changes of `document` held pending wait for and this node does
    /// not hold: what to ask peers for by name. Reads only that document's pending records.
    pub fn missing_dependencies(&self, document: DocumentId) -> Result<Vec<ChangeHash>, NodeError> {
        // Most of the time nothing is pending and this is one empty prefix scan.
        let mut missing = BTreeSet::new();
        for (_, value) in self
            .store
            .scan_prefix(&keys::per_document(keys::PENDING, &document))?
        {
            let record: PendingRecord = decode(&value, "pending record")?;
            for dependency in record.missing {
                let hash = ChangeHash(dependency);
                let held = self.has_change(document, &hash)?
                    || self.store.get(&keys::pending(&document, &hash))?.is_some();
                if !held {
                    missing.insert(hash);
                }
            }
        }
        Ok(missing.into_iter().collect())
    }

    /// The changes waiting for their dependencies, with the dependencies they wait for.
    pub fn pending(&self) -> Result<Vec<PendingEntry>, NodeError> {
        let mut entries = Vec::new();
        for (key, value) in self.store.scan_prefix(&[keys::PENDING])? {
            let record: PendingRecord = decode(&value, "pending record")?;
            let mut change = [0u8; 32];
            change.copy_from_slice(key.get(17..49).ok_or(StoreError::Corrupt {
                what: "pending key",
            })?);
            entries.push(PendingEntry {
                change,
                document: record.document,
                missing: record.missing,
            });
        }
        Ok(entries)
    }

    /// Runs one envelope from a peer (or a bundle) through the pipeline; returns once the
    /// decision is durable.
    pub fn ingest(&self, envelope: &[u8]) -> Result<Ingested, IngestError> {
        self.ingest_many(&[envelope])?
            .pop()
            .unwrap_or(Err(IngestError::Store(StoreError::Corrupt {
                what: "ingest outcome",
            })))
    }

    /// Runs envelopes through the pipeline in order, with one flush for them all: how a peer's
    /// batch (a sync message, a fetch, a gossiped change) is ingested. Peers' batches are
    /// decided one at a time (`peer_batches`); each change is judged before the decision lock
    /// is taken for it (see `prepare`), so a batch is judged while local writes decide theirs.
    /// Returns one outcome per envelope once all the decisions are durable; fails as a whole
    /// only if the flush fails.
    pub fn ingest_many<E: AsRef<[u8]>>(
        &self,
        envelopes: &[E],
    ) -> Result<Vec<Result<Ingested, IngestError>>, IngestError> {
        // Signatures are checked before taking either lock.
        let verified = envelopes
            .iter()
            .map(|e| match Envelope::verify(e.as_ref()) {
                Ok(verified) => Incoming::Verified(verified),
                Err(error) => Incoming::Failed(error, e.as_ref()),
            })
            .collect();
        let _one_at_a_time = self.peer_batches.lock().unwrap_or_else(|p| p.into_inner());
        self.decide_in_order(verified, None, None)
    }

    /// Takes documents this node holds nothing of, sent whole by a peer (a fetch): each is
    /// judged at once (`judge_history`, as deciding its changes one by one in causal order
    /// would) before the decision lock is taken, and accepted in one write: one load, one
    /// judgement pass and one batch per document instead of one per change. A document is
    /// given back, for `ingest_many` to decide change by change as usual, when this node holds
    /// any part of it (accepted, pending or quarantined) or its history is not accepted whole:
    /// a change unsigned, badly signed or refused, an author who is not a plain member, a
    /// revocation in force. Returns one outcome per change of the documents taken, once their
    /// decisions are durable, and the documents given back. Unlike `ingest_many`, calls run
    /// side by side: the decision lock is held only to write a document already judged.
    #[allow(clippy::type_complexity)]
    pub fn ingest_whole(
        &self,
        documents: Vec<WholeDocument>,
    ) -> Result<(Vec<Result<Ingested, IngestError>>, Vec<WholeDocument>), IngestError> {
        // Judged first, without any lock: fetches answered at once are judged side by side
        // (on threads of lower priority than reads, see `sync::background`).
        let mut prepared = Vec::with_capacity(documents.len());
        let mut given_back = Vec::new();
        for mut whole in documents {
            match self.prepare_whole(&mut whole) {
                Some(judged) => prepared.push((whole, judged)),
                None => given_back.push(whole),
            }
        }
        let deciding = self.commit.enter();
        let mut ticket = 0;
        let mut outcomes = Vec::new();
        for (whole, prepared) in prepared {
            let mut ledger = self.lock_ledger();
            let hashes: Vec<ChangeHash> = prepared.changes.iter().map(|c| c.hash).collect();
            match self.decide_whole(&mut ledger, &mut ticket, whole, prepared) {
                WholeDecision::Accepted => {
                    outcomes.extend(hashes.into_iter().map(|h| Ok(Ingested::Accepted(h))))
                }
                WholeDecision::GivenBack(whole) => given_back.push(whole),
                // The change-by-change pipeline meets the same failure and reports it.
                WholeDecision::Failed(error, whole) => {
                    tracing::warn!(%error, "storing a document fetched whole failed");
                    given_back.push(whole);
                }
            }
        }
        drop(deciding);
        self.make_durable(ticket)?;
        Ok((outcomes, given_back))
    }

    /// Makes the decisions applied up to batch `ticket` durable (one flush, shared with
    /// concurrent writers, no lock held while the disk works), then tells the change feed.
    fn make_durable(&self, ticket: u64) -> Result<(), IngestError> {
        if ticket > 0 {
            self.commit.wait_durable(&self.store, ticket)?;
            self.audit_updates
                .send_replace(self.lock_ledger().audit.sequence);
        }
        Ok(())
    }

    /// Checks and judges a document sent whole without the decision lock: every change
    /// signed by its author, every author a plain member, the creation change naming the
    /// document, the history judged at once (`judge_history`). `None` if anything is out of
    /// the ordinary: the per-change pipeline then decides it.
    fn prepare_whole(&self, whole: &mut WholeDocument) -> Option<PreparedWhole> {
        let id = whole.id;
        if !matches!(self.document_record(&id), Ok(None)) {
            return None;
        }
        // Changes whose dependencies the bytes lack are held inside automerge, out of
        // `get_changes`, yet saved with the document: such a document goes change by change.
        if !whole.doc.get_missing_deps(&[]).is_empty() {
            return None;
        }
        let mut changes = whole.doc.get_changes(&[]);
        let mut checked = Vec::with_capacity(changes.len());
        {
            let membership = self.membership();
            // A revoked key's changes are decided against its cut-off, change by change.
            if !membership.view().revocations.is_empty() {
                return None;
            }
            for change in &mut changes {
                let hash = change.hash();
                if change.deps().is_empty() && document_id_of(&hash) != id {
                    return None;
                }
                let signature = whole.signatures.get(&hash.0)?;
                let author = crate::envelope::verify_signature(&id, change, signature).ok()?;
                let Admission::Member(institution) = membership.admit(&author, &hash) else {
                    return None;
                };
                // A change too large for an envelope is refused by the envelope path, which
                // holds its bytes as automerge encodes them (compressed above 256 bytes, which
                // may make them larger): compressed only when it could matter.
                if change.raw_bytes().len() > crate::envelope::CHANGE_BYTES_MAX / 2
                    && change.bytes().len() > crate::envelope::CHANGE_BYTES_MAX
                {
                    return None;
                }
                checked.push(WholeChange {
                    hash,
                    author,
                    institution,
                    signature: *signature,
                });
            }
        }
        let institutions: Vec<InstitutionId> =
            checked.iter().map(|c| c.institution.clone()).collect();
        let view = crate::model::judge_history(&whole.doc, &changes, &institutions).ok()?;
        Some(PreparedWhole {
            changes: checked,
            view,
            snapshot: whole.doc.save(),
        })
    }

    /// Accepts a document prepared whole (`prepare_whole`) in one batch: its envelopes,
    /// snapshot, record, catalogue and index entries, and an audit record per change, as
    /// accepting its changes one by one would leave them. Gives the document back if the store
    /// now holds any part of it or an author's standing changed.
    fn decide_whole(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        mut whole: WholeDocument,
        prepared: PreparedWhole,
    ) -> WholeDecision {
        let id = whole.id;
        match self.holds_any_of(&id, &prepared) {
            Ok(false) => {}
            Ok(true) => return WholeDecision::GivenBack(whole),
            Err(error) => return WholeDecision::Failed(error, whole),
        }
        {
            let membership = self.membership();
            if !membership.view().revocations.is_empty()
                || prepared.changes.iter().any(|c| {
                    !matches!(membership.admit(&c.author, &c.hash),
                        Admission::Member(institution) if institution == c.institution)
                })
            {
                return WholeDecision::GivenBack(whole);
            }
        }
        let PreparedWhole {
            changes,
            mut view,
            snapshot,
        } = prepared;
        let kind = view.kind();
        let heads = whole.doc.get_heads();
        let digest = catalogue_digest(&heads);
        let accepted = ledger.accepted + changes.len() as u64;
        let mut batch = Batch::default();
        let bytes = snapshot.len();
        let mut authors = BTreeSet::new();
        let mut head = ledger.audit;
        // The snapshot holds every change: each is stored as its signature alone.
        for change in changes {
            batch.put(
                keys::envelope(&id, &change.hash),
                StoredChange::signature_only(&change.signature),
            );
            authors.insert(change.author);
            head = self.append_audit(
                &mut batch,
                head,
                AuditAction::Accepted,
                (id, change.hash),
                Some(change.institution),
            );
        }
        let record = DocumentRecord {
            kind,
            heads: heads.iter().map(|h| h.0).collect(),
            tail: 0,
            snapshot: snapshot.len() as u64,
        };
        batch.put(keys::per_document(keys::SNAPSHOT, &id), snapshot);
        batch.put(keys::per_document(keys::DOCUMENT, &id), encode(&record));
        batch.put(keys::per_document(keys::CATALOGUE, &id), digest.to_vec());
        for author in &authors {
            batch.put(keys::author(author, &id), Vec::new());
        }
        batch.put(keys::ACCEPTED, accepted.to_be_bytes().to_vec());
        let applied = self
            .reindex(&mut batch, &id, &view)
            .and_then(|()| self.commit.apply(&self.store, batch));
        *ticket = match applied {
            Ok(applied) => applied,
            Err(error) => return WholeDecision::Failed(error, whole),
        };
        ledger.audit = head;
        ledger.accepted = accepted;
        self.store.set_accepted(accepted);
        self.catalogue_mut().insert(*id.as_bytes(), digest);
        set_view_id(&mut view, id);
        self.lock_views().insert(id, digest, Arc::new(view));
        self.lock_documents().insert(
            id,
            Cached {
                doc: whole.doc,
                kind,
                bytes,
                used: 0,
            },
        );
        WholeDecision::Accepted
    }

    /// Whether the store holds any part of a document prepared whole: its record (an accepted
    /// change), a pending change of it, or one of its changes in quarantine.
    fn holds_any_of(&self, id: &DocumentId, prepared: &PreparedWhole) -> Result<bool, StoreError> {
        if self.document_record(id)?.is_some()
            || !self
                .store
                .keys_with_prefix(&keys::per_document(keys::PENDING, id))?
                .is_empty()
        {
            return Ok(true);
        }
        for change in &prepared.changes {
            if self
                .store
                .get(&keys::quarantined(&change.hash, id))?
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Decides changes in order, each prepared (`prepare`) before the decision lock is taken
    /// for it, and makes every decision durable with one flush shared with concurrent callers.
    /// `written` is the document the first change was made on, for a local write. Returns one
    /// outcome per change; fails as a whole only if the flush fails.
    fn decide_in_order(
        &self,
        changes: Vec<Incoming<'_>>,
        mut written: Option<Written>,
        app: Option<&str>,
    ) -> Result<Vec<Result<Ingested, IngestError>>, IngestError> {
        // Until its batches are applied, a flush about to start waits for this call.
        let deciding = self.commit.enter();
        let mut ticket = 0;
        let mut outcomes = Vec::with_capacity(changes.len());
        for change in changes {
            let prepared = match &change {
                Incoming::Verified(verified) => self.prepare(verified, written.take()),
                Incoming::Failed(..) => None,
            };
            let mut ledger = self.lock_ledger();
            // A duplicate's first copy may not be durable yet: wait for everything applied so
            // far, not only for what this call applies.
            ticket = ticket.max(self.commit.applied());
            let outcome = match change {
                Incoming::Verified(verified) => {
                    self.decide(&mut ledger, verified, prepared, &mut ticket, app)
                }
                Incoming::Failed(
                    EnvelopeError::BadSignature | EnvelopeError::NotANodeKey,
                    encoded,
                ) => self.refuse(
                    &mut ledger,
                    &mut ticket,
                    encoded,
                    "the signature does not verify against the change's author",
                ),
                Incoming::Failed(error, _) => Err(error.into()),
            };
            // A decision may settle the dependencies of pending changes, accepted or not.
            if let Ok(Ingested::Accepted(hash) | Ingested::Quarantined(hash, _)) = &outcome {
                ledger.woken.push_back(*hash);
            }
            self.settle(&mut ledger, &mut ticket);
            outcomes.push(outcome);
        }
        drop(deciding);
        self.make_durable(ticket)?;
        Ok(outcomes)
    }

    /// Makes a local change on the cached document itself (no copy): `write` makes it. Returns
    /// the change and the document holding it, for `write_local`; `None` if `write` changed
    /// nothing.
    fn write_in_place(
        &self,
        id: DocumentId,
        expected: DocumentKind,
        write: impl FnOnce(&mut AutoCommit) -> Result<Option<ChangeHash>, crate::model::OpError>,
    ) -> Result<Option<(Change, Written)>, NodeError> {
        let taken = match self.take_unlocked(&id) {
            Some(taken) => Some(taken),
            // Not cached, and read while a decision was being written: read under the lock.
            None => self.take(&self.lock_ledger(), &id)?,
        };
        let (mut doc, found, bytes) = taken.ok_or(NodeError::UnknownDocument(id))?;
        let put_back = |doc| self.put_back(&self.lock_ledger(), id, doc, bytes);
        if found != expected {
            put_back(doc);
            return Err(NodeError::WrongKind {
                document: id,
                expected,
                found,
            });
        }
        let written = match write(&mut doc) {
            Ok(Some(hash)) => hash,
            // Nothing written, or an error (`write` rolled back): the document is unchanged.
            Ok(None) => {
                put_back(doc);
                return Ok(None);
            }
            Err(error) => {
                put_back(doc);
                return Err(error.into());
            }
        };
        let change = doc
            .get_change_by_hash(&written)
            .ok_or(StoreError::Corrupt {
                what: "a change just written",
            })?;
        Ok(Some((change, Written { doc, bytes })))
    }

    /// Signs and decides the change a typed operation made (on `written`, when it was made on
    /// the cached document); `app`, when an app made it through the API, is recorded as its
    /// writer in the same batch as the change.
    fn write_local(
        &self,
        id: DocumentId,
        mut changes: Vec<Change>,
        written: Option<Written>,
        app: Option<&str>,
    ) -> Result<ChangeHash, NodeError> {
        let Some(change) = changes.pop() else {
            // The operation changed nothing (for instance removing an absent allergy).
            let head = self
                .heads(id)?
                .first()
                .copied()
                .ok_or(NodeError::UnknownDocument(id))?;
            if let Some(app) = app {
                self.record_access(app, &[(id, Some(head))])?;
            }
            return Ok(head);
        };
        debug_assert!(changes.is_empty(), "a typed operation makes one change");
        let verified = Envelope::sign_own(&self.identity, id, change).map_err(IngestError::from)?;
        let envelope = verified.encoded.clone();
        let outcome = self
            .decide_in_order(vec![Incoming::Verified(verified)], written, app)?
            .pop()
            .unwrap_or(Err(IngestError::Store(StoreError::Corrupt {
                what: "ingest outcome",
            })))?;
        match outcome {
            Ingested::Accepted(hash) => {
                // No subscriber is fine: a node without a network layer.
                let _ = self.local_changes.send(LocalChange {
                    document: id,
                    hash,
                    envelope,
                });
                Ok(hash)
            }
            // The same write made twice (a registration sent again) is already there.
            Ingested::Duplicate(hash) => {
                if let Some(app) = app {
                    self.record_access(app, &[(id, Some(hash))])?;
                }
                Ok(hash)
            }
            other => Err(NodeError::LocalChangeRefused(other)),
        }
    }

    fn check_editor(&self, editor: &Editor) -> Result<(), NodeError> {
        if editor.institution != self.institution {
            return Err(NodeError::WrongInstitution {
                own: self.institution.clone(),
            });
        }
        let membership = self.membership();
        match membership.admit(&self.identity.public_key(), &ChangeHash([0; 32])) {
            Admission::Member(_) => Ok(()),
            _ => Err(NodeError::NotAMember),
        }
    }

    /// Does the costly part of a decision before the decision lock is taken: applies a
    /// member's new change to its document and judges it there, so changes to different
    /// documents are judged in parallel. `written` is the document a local change was made
    /// on, holding it. Anything out of the ordinary (a duplicate, an author who is not a
    /// plain member, a document not at hand, a refusal) is left to `decide`, which checks
    /// everything again under the lock and uses this work only if the store still holds the
    /// document at the heads it was judged on.
    fn prepare(&self, verified: &VerifiedChange, written: Option<Written>) -> Option<Prepared> {
        let (id, hash) = (verified.document, verified.hash);
        if !matches!(self.store.get(&keys::envelope(&id, &hash)), Ok(None)) {
            return None;
        }
        let author = match self.membership().admit(&verified.author, &hash) {
            Admission::Member(institution) | Admission::WithinCutoff(institution) => institution,
            _ => return None,
        };
        let deps = verified.change.deps();
        let applied = written.is_some();
        let (mut doc, bytes, mut base) = match written {
            // Made on the document at its heads: the change's dependencies.
            Some(written) => (written.doc, written.bytes, deps.to_vec()),
            None if deps.is_empty() => (AutoCommit::new(), 0, Vec::new()),
            None => {
                let (mut doc, _, bytes) = self.take_unlocked(&id)?;
                let heads = doc.get_heads();
                (doc, bytes, heads)
            }
        };
        base.sort();
        // A refused change is judged again by `decide`, which quarantines it.
        let Ok(Judgement::Accepted(view)) =
            self.judge_into(&id, &mut doc, verified, &author, applied)
        else {
            return None;
        };
        let snapshot = self
            .snapshot_due(&id, verified.encoded.len())
            .ok()?
            .then(|| doc.save());
        Some(Prepared {
            base,
            author,
            doc,
            bytes,
            view: *view,
            snapshot,
        })
    }

    /// Applies `verified`'s change to `current` (the document as the store holds it, or, when
    /// `applied`, the document it was made on, already holding it) and judges it by what it
    /// wrote. A change that builds on `current`'s heads is applied in place (`judge_change`
    /// reads the document before it at its dependencies, without a copy); any other is judged
    /// on a copy of the document at its own dependencies, then merged. Returns the document's
    /// view with the change; on refusal, whether `current` is still as it was.
    fn judge_into(
        &self,
        id: &DocumentId,
        current: &mut AutoCommit,
        verified: &VerifiedChange,
        author: &InstitutionId,
        applied: bool,
    ) -> Result<Judgement, StoreError> {
        let deps = verified.change.deps();
        let on_current = applied || {
            let mut heads = current.get_heads();
            let mut wanted = deps.to_vec();
            heads.sort();
            wanted.sort();
            heads == wanted
        };
        // The document's heads before the change: what its kept view shows.
        let digest_before = match (deps.is_empty(), applied) {
            (true, _) => None,
            (false, true) => Some(catalogue_digest(deps)),
            (false, false) => Some(catalogue_digest(&current.get_heads())),
        };
        let judged = if on_current {
            if applied || applies(current, &verified.change) {
                judge_applied(current, &verified.change, author)
            } else {
                Err(APPLY_TO_DEPENDENCIES.to_string())
            }
        } else {
            // `fork_at` reads only what this node accepted; contained all the same.
            let forked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| current.fork_at(deps)));
            let mut judged_at = forked
                .ok()
                .and_then(Result::ok)
                .ok_or(StoreError::Corrupt {
                    what: "document history",
                })?;
            let judged = if applies(&mut judged_at, &verified.change) {
                judge_applied(&judged_at, &verified.change, author)
            } else {
                Err(APPLY_TO_DEPENDENCIES.to_string())
            };
            match judged {
                Err(reason) => {
                    return Ok(Judgement::Refused {
                        reason,
                        clean: true,
                    });
                }
                Ok(judged) if applies(current, &verified.change) => Ok(judged),
                Ok(_) => Err(APPLY_TO_DOCUMENT.to_string()),
            }
        };
        let previous = digest_before
            .and_then(|digest| self.lock_views().get(id, &digest))
            .map(Arc::unwrap_or_clone);
        let view = judged.and_then(|judged| {
            judged
                .view(current, previous)
                .map_err(|error| format!("merging it breaks the document: {error}"))
        });
        Ok(match view {
            Ok(view) => Judgement::Accepted(Box::new(view)),
            // `current` holds the refused change, or part of it.
            Err(reason) => Judgement::Refused {
                reason,
                clean: false,
            },
        })
    }

    /// Whether accepting `bytes` more of envelopes in document `id` calls for a new snapshot:
    /// at its creation, and when the envelopes since its last one would outweigh it (and
    /// `SNAPSHOT_TAIL_MIN_BYTES`). Saving then costs O(1) amortised per byte written, and a
    /// load replays at most about a snapshot's worth of changes.
    fn snapshot_due(&self, id: &DocumentId, bytes: usize) -> Result<bool, StoreError> {
        Ok(match self.document_record(id)? {
            None => true,
            Some(record) => {
                record.tail + bytes as u64 > record.snapshot.max(SNAPSHOT_TAIL_MIN_BYTES)
            }
        })
    }

    /// Decides one verified change and applies the writes it needs; `ticket` is then the
    /// group-commit ticket to wait on for durability. `prepared` is the work `prepare` did
    /// for it, used if it still holds.
    fn decide(
        &self,
        ledger: &mut Ledger,
        verified: VerifiedChange,
        prepared: Option<Prepared>,
        ticket: &mut u64,
        app: Option<&str>,
    ) -> Result<Ingested, IngestError> {
        let (id, hash) = (verified.document, verified.hash);
        if self.store.get(&keys::envelope(&id, &hash))?.is_some() {
            return Ok(Ingested::Duplicate(hash));
        }
        if let Some(value) = self.store.get(&keys::quarantined(&hash, &id))? {
            let record: QuarantineRecord = decode(&value, "quarantine record")?;
            return Ok(Ingested::Quarantined(hash, record.reason));
        }
        // Whether a change is within a revoked key's cut-off is settled by its descendants: a
        // cut-off head, or a change marked as the ancestor of one, vouches for its own
        // ancestors, whoever wrote it and whatever becomes of it.
        let vouchers = self.vouchers(&hash)?;
        if !vouchers.is_empty() {
            self.vouch(ledger, ticket, &vouchers, id, hash, verified.change.deps())?;
        }
        let admission = {
            let membership = self.membership();
            membership.admit(&verified.author, &hash)
        };
        let author = match admission {
            Admission::Member(institution) | Admission::WithinCutoff(institution) => institution,
            Admission::Revoked { institution, key } if vouchers.contains(&key) => institution,
            Admission::Revoked { key, .. } => {
                return self.past_revocation(ledger, ticket, &verified, key);
            }
            // Its signature holds, so its author signed it: an author this roster does not
            // know may be a member a newer roster adds (and an honest peer on that roster
            // passes its changes on). Held, bounded, until a roster names it.
            Admission::Stranger => {
                return self.park(ledger, ticket, &verified, Vec::new(), Hold::Roster);
            }
        };
        let deps = verified.change.deps().to_vec();
        if deps.is_empty() && document_id_of(&hash) != id {
            return self.quarantined(
                ledger,
                ticket,
                &verified,
                "a creation change for another document",
            );
        }
        for dep in &deps {
            if self.store.get(&keys::quarantined(dep, &id))?.is_some() {
                return self.quarantined(ledger, ticket, &verified, REASON_DEPENDS_ON_QUARANTINED);
            }
        }
        let mut missing = Vec::new();
        for dep in &deps {
            if self.store.get(&keys::envelope(&id, dep))?.is_none() {
                missing.push(dep.0);
            }
        }
        if !missing.is_empty() {
            return self.park(ledger, ticket, &verified, missing, Hold::Dependencies);
        }

        if let Some(prepared) = prepared
            && prepared.author == author
            && self.stored_heads(&id)? == prepared.base
        {
            return self.accept(ledger, ticket, &verified, prepared, app);
        }
        // The document is taken out of the cache, not copied; it goes back once decided.
        let (mut current, bytes) = if deps.is_empty() {
            (AutoCommit::new(), 0)
        } else {
            let (doc, _, bytes) = self.take(ledger, &id)?.ok_or(StoreError::Corrupt {
                what: "document record",
            })?;
            (doc, bytes)
        };
        match self.judge_into(&id, &mut current, &verified, &author, false)? {
            Judgement::Accepted(view) => {
                let snapshot = self
                    .snapshot_due(&id, verified.encoded.len())?
                    .then(|| current.save());
                let decided = Prepared {
                    base: Vec::new(),
                    author,
                    doc: current,
                    bytes,
                    view: *view,
                    snapshot,
                };
                self.accept(ledger, ticket, &verified, decided, app)
            }
            Judgement::Refused { reason, clean } => {
                if clean {
                    self.put_back(ledger, id, current, bytes);
                }
                self.quarantined(ledger, ticket, &verified, &reason)
            }
        }
    }

    /// The heads the store holds a document at, sorted (none if it holds no such document).
    fn stored_heads(&self, id: &DocumentId) -> Result<Vec<ChangeHash>, StoreError> {
        let mut heads: Vec<ChangeHash> = self
            .document_record(id)?
            .map(|record| record.heads.into_iter().map(ChangeHash).collect())
            .unwrap_or_default();
        heads.sort();
        Ok(heads)
    }

    /// Adds to `batch` the rewrite of every envelope of `id` as its signature alone, for a
    /// batch that writes a snapshot holding them all.
    fn keep_signatures_only(&self, batch: &mut Batch, id: &DocumentId) -> Result<(), StoreError> {
        for (key, value) in self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, id))?
        {
            if let envelope @ StoredChange::Envelope(_) = StoredChange::decode(value)? {
                batch.put(key, StoredChange::signature_only(&envelope.signature()?));
            }
        }
        Ok(())
    }

    /// Writes the acceptance of a judged change: its envelope, the document's record, heads and
    /// index entries, its audit records; then keeps the document and its view for what comes
    /// next. `decided.base` is not read.
    fn accept(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        verified: &VerifiedChange,
        decided: Prepared,
        app: Option<&str>,
    ) -> Result<Ingested, IngestError> {
        let (id, hash) = (verified.document, verified.hash);
        let Prepared {
            author,
            doc: mut current,
            bytes,
            view,
            snapshot,
            ..
        } = decided;
        let kind = view.kind();
        let cached_bytes = bytes + verified.encoded.len();
        let heads = current.get_heads();
        let mut batch = Batch::default();
        // A load replays only the envelopes the snapshot lacks (see `snapshot_due`).
        let (tail, snapshot_bytes) = match snapshot {
            Some(snapshot) => {
                let saved = snapshot.len() as u64;
                batch.put(keys::per_document(keys::SNAPSHOT, &id), snapshot);
                // The snapshot holds every change of the document now: each is kept as its
                // signature alone.
                self.keep_signatures_only(&mut batch, &id)?;
                let signature = StoredChange::Envelope(verified.encoded.clone()).signature()?;
                batch.put(
                    keys::envelope(&id, &hash),
                    StoredChange::signature_only(&signature),
                );
                (0, saved)
            }
            None => {
                batch.put(keys::envelope(&id, &hash), verified.encoded.clone());
                self.document_record(&id)?
                    .map_or((verified.encoded.len() as u64, 0), |record| {
                        (record.tail + verified.encoded.len() as u64, record.snapshot)
                    })
            }
        };
        let record = DocumentRecord {
            kind,
            heads: heads.iter().map(|h| h.0).collect(),
            tail,
            snapshot: snapshot_bytes,
        };
        batch.put(keys::per_document(keys::DOCUMENT, &id), encode(&record));
        batch.put(
            keys::per_document(keys::CATALOGUE, &id),
            catalogue_digest(&heads).to_vec(),
        );
        let unparked = self.unpark(&mut batch, &id, &hash)?;
        batch.put(keys::author(&verified.author, &id), Vec::new());
        batch.put(keys::ACCEPTED, (ledger.accepted + 1).to_be_bytes().to_vec());
        self.reindex(&mut batch, &id, &view)?;
        let mut view = view;
        set_view_id(&mut view, id);
        let mut head = self.append_audit(
            &mut batch,
            ledger.audit,
            AuditAction::Accepted,
            (verified.document, verified.hash),
            Some(author),
        );
        if let Some(app) = app {
            // Who wrote it is durable exactly when the change is.
            head = append_record(
                &mut batch,
                head,
                self.app_record(app, AuditAction::Written, id, Some(hash.0)),
            );
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.pending.settled(unparked);
        let digest = catalogue_digest(&heads);
        self.catalogue_mut().insert(*id.as_bytes(), digest);
        // The view the judgement read is the document's view now: kept for reads at no
        // cost (after the catalogue, so a read never pairs a newer view with older heads).
        self.lock_views().insert(id, digest, Arc::new(view));
        ledger.audit = head;
        ledger.accepted += 1;
        self.store.set_accepted(ledger.accepted);
        self.lock_documents().insert(
            id,
            Cached {
                doc: current,
                kind,
                bytes: cached_bytes,
                used: 0,
            },
        );
        Ok(Ingested::Accepted(hash))
    }

    fn quarantined(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        verified: &VerifiedChange,
        reason: &str,
    ) -> Result<Ingested, IngestError> {
        if ledger.quarantined >= QUARANTINE_CHANGES_MAX {
            tracing::warn!(document = %verified.document, change = %verified.hash, reason, "change refused; the quarantine is full");
            return Err(IngestError::QuarantineFull);
        }
        tracing::info!(document = %verified.document, change = %verified.hash, reason, "change quarantined");
        let record = QuarantineRecord::new(verified.document, None, reason, &verified.encoded);
        let mut batch = Batch::default();
        let body = self.put_quarantine(
            ledger,
            &mut batch,
            keys::quarantined(&verified.hash, &verified.document),
            record,
        );
        let unparked = self.unpark(&mut batch, &verified.document, &verified.hash)?;
        let institution = self.membership().institution_of(&verified.author);
        let head = self.append_audit(
            &mut batch,
            ledger.audit,
            AuditAction::Quarantined,
            (verified.document, verified.hash),
            institution,
        );
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.pending.settled(unparked);
        ledger.quarantine_bodies += body;
        ledger.audit = head;
        ledger.quarantined += 1;
        Ok(Ingested::Quarantined(verified.hash, reason.to_string()))
    }

    /// Adds a quarantine record to `batch`, keeping its envelope whole only while the bodies
    /// kept stay within `QUARANTINE_BODIES_BYTES_MAX` (the digest, size, reason and
    /// dependencies always). Returns the body bytes kept, to count once the batch is applied.
    fn put_quarantine(
        &self,
        ledger: &Ledger,
        batch: &mut Batch,
        key: Vec<u8>,
        mut record: QuarantineRecord,
    ) -> u64 {
        let body = record.envelope.len() as u64;
        let kept = if ledger.quarantine_bodies + body <= QUARANTINE_BODIES_BYTES_MAX {
            batch.put(
                keys::QUARANTINE_BODIES,
                (ledger.quarantine_bodies + body).to_be_bytes().to_vec(),
            );
            body
        } else {
            record.envelope = Vec::new();
            0
        };
        batch.put(key, encode(&record));
        kept
    }

    /// Quarantines an envelope refused for its signature or its author. It is kept under its
    /// own digest: the change it claims may be genuine and arrive later, properly signed.
    /// An envelope whose change does not decode cannot be attributed and is refused with a
    /// typed error instead.
    fn refuse(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        encoded: &[u8],
        reason: &str,
    ) -> Result<Ingested, IngestError> {
        let envelope = Envelope::decode(encoded)?;
        let change = crate::model::decode_change(&envelope.change)
            .map_err(|_| EnvelopeError::Malformed {
                reason: "the change does not decode",
            })?
            .hash();
        let document = <[u8; 16]>::try_from(envelope.document.as_slice())
            .map(DocumentId::from_bytes)
            .map_err(|_| EnvelopeError::Malformed {
                reason: "document id of the wrong length",
            })?;
        let key = [&[keys::REFUSED][..], &Sha256::digest(encoded)].concat();
        if self.store.get(&key)?.is_some() {
            return Ok(Ingested::Quarantined(change, reason.to_string()));
        }
        if ledger.quarantined >= QUARANTINE_CHANGES_MAX {
            return Err(IngestError::QuarantineFull);
        }
        tracing::info!(%document, %change, reason, "envelope refused and quarantined");
        let record = QuarantineRecord::new(document, Some(change.0), reason, encoded);
        let mut batch = Batch::default();
        let body = self.put_quarantine(ledger, &mut batch, key, record);
        let head = self.append_audit(
            &mut batch,
            ledger.audit,
            AuditAction::Quarantined,
            (document, change),
            None,
        );
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.quarantine_bodies += body;
        ledger.audit = head;
        ledger.quarantined += 1;
        Ok(Ingested::Quarantined(change, reason.to_string()))
    }

    /// Decides the pending changes that waited for `decided`, and in turn those that waited
    /// for them. Only changes waiting for a decided change are read: the cost follows what a
    /// decision settles, not how many changes wait. A pending record that can no longer be
    /// decided (damaged, or its author no longer in the roster) is dropped with a log line: a
    /// peer will offer it again if it matters. Errors here never fail the ingest that
    /// triggered the retry.
    fn retry_pending(&self, ledger: &mut Ledger, ticket: &mut u64, decided: ChangeHash) {
        if let Err(error) = self.retry_pending_inner(ledger, ticket, decided) {
            tracing::warn!(%error, "retrying pending changes stopped early");
        }
    }

    /// Decides what the decisions so far unblocked: pending changes whose dependencies were
    /// settled, held changes of a revoked key that were just vouched for, and — once a
    /// revoked key's cut-off can be drawn — every change of that key still held. Errors are
    /// logged, never returned: they must not fail the call that triggered the work.
    fn settle(&self, ledger: &mut Ledger, ticket: &mut u64) {
        loop {
            if let Some(hash) = ledger.woken.pop_front() {
                self.retry_pending(ledger, ticket, hash);
            } else if let Some(key) = ledger.recheck.pop_first() {
                match self.held_past_cutoff(&key) {
                    Ok(held) => ledger.woken.extend(held),
                    Err(error) => {
                        tracing::warn!(%error, "rechecking a revoked key's held changes failed")
                    }
                }
            } else {
                return;
            }
        }
    }

    /// The revoked keys that vouch for `change`: it is one of their cut-off heads, or was
    /// marked as an ancestor of one.
    fn vouchers(&self, change: &ChangeHash) -> Result<Vec<Bytes32>, StoreError> {
        let mut keys = {
            let membership = self.membership();
            // Marks exist only for revoked keys: without one, no scan on the hot path.
            if membership.view().revocations.is_empty() {
                return Ok(Vec::new());
            }
            membership.cutoff_keys_of(change)
        };
        for key in self
            .store
            .keys_with_prefix(&[&[keys::VOUCHED][..], &change.0].concat())?
        {
            if let Some(voucher) = key.get(33..65).and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                keys.push(Bytes32(voucher));
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Records that `change` (of `document`) is within the cut-off of each of `vouchers`, and
    /// so are its ancestors: marks them, walking through the changes held here but not
    /// accepted, and stopping at accepted changes (all their ancestors are accepted) and at
    /// changes not received yet (marked for when they arrive). A held change of a revoked key
    /// that is now vouched for is woken to be decided again.
    fn vouch(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        vouchers: &[Bytes32],
        document: DocumentId,
        change: ChangeHash,
        deps: &[ChangeHash],
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for key in vouchers {
            batch.put(keys::vouched(&change, key), document.as_bytes().to_vec());
            let mut next = deps.to_vec();
            let mut seen = HashSet::new();
            while let Some(hash) = next.pop() {
                if !seen.insert(hash) || self.store.get(&keys::vouched(&hash, key))?.is_some() {
                    continue;
                }
                batch.put(keys::vouched(&hash, key), document.as_bytes().to_vec());
                if self.store.get(&keys::envelope(&document, &hash))?.is_some() {
                    continue;
                }
                let Some(deps) = self.held_dependencies(&document, &hash)? else {
                    continue;
                };
                if self
                    .store
                    .get(&keys::held(key, &hash, &document))?
                    .is_some()
                {
                    ledger.woken.push_back(hash);
                }
                next.extend(deps);
            }
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.recheck.extend(vouchers.iter().copied());
        Ok(())
    }

    /// The dependencies of a change of `document` held here but not accepted (pending or
    /// quarantined); `None` if it is not held. Quarantine records keep the dependencies even
    /// when they do not keep the envelope: the walk of a revocation's cut-off must not depend
    /// on what one node's budget kept.
    fn held_dependencies(
        &self,
        document: &DocumentId,
        hash: &ChangeHash,
    ) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        if let Some(value) = self.store.get(&keys::pending(document, hash))? {
            let record = decode::<PendingRecord>(&value, "pending record")?;
            return Ok(Some(dependencies_of(&record.envelope)));
        }
        if let Some(value) = self.store.get(&keys::quarantined(hash, document))? {
            let record = decode::<QuarantineRecord>(&value, "quarantine record")?;
            return Ok(Some(record.dependencies()));
        }
        Ok(None)
    }

    /// Every copy held but not accepted of the change `hash`, in any document, with its
    /// dependencies: a revocation's cut-off heads name changes, not documents. Scans the
    /// pending records; runs only when a revocation is applied.
    fn held_anywhere(
        &self,
        hash: &ChangeHash,
    ) -> Result<Vec<(DocumentId, Vec<ChangeHash>)>, StoreError> {
        let mut copies = Vec::new();
        for (key, value) in self.store.scan_prefix(&[keys::PENDING])? {
            if key.get(17..49) == Some(&hash.0[..]) {
                let record = decode::<PendingRecord>(&value, "pending record")?;
                copies.push((record.document, dependencies_of(&record.envelope)));
            }
        }
        for (_, value) in self
            .store
            .scan_prefix(&[&[keys::QUARANTINE][..], &hash.0].concat())?
        {
            let record = decode::<QuarantineRecord>(&value, "quarantine record")?;
            copies.push((record.document, record.dependencies()));
        }
        Ok(copies)
    }

    /// A change of a revoked key that nothing here vouches for: past the cut-off once the
    /// cut-off can be drawn here, held until then (bounded per key).
    fn past_revocation(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        verified: &VerifiedChange,
        key: Bytes32,
    ) -> Result<Ingested, IngestError> {
        if self.cutoff_drawn(&key)? {
            return self.quarantined(ledger, ticket, verified, REASON_PAST_CUTOFF);
        }
        let hash = verified.hash;
        if self
            .store
            .get(&keys::held(&key, &hash, &verified.document))?
            .is_none()
        {
            let prefix = [&[keys::HELD][..], &key.0].concat();
            if self.store.keys_with_prefix(&prefix)?.len() >= REVOKED_HELD_PER_KEY_MAX {
                return Err(IngestError::RevokedBacklogFull);
            }
        }
        // Waiting for itself: woken when vouched for or when the cut-off can be drawn.
        self.park(ledger, ticket, verified, Vec::new(), Hold::Cutoff(key))
    }

    /// Whether this node holds all the history a revoked key's cut-off reaches: every cut-off
    /// head has been seen, and every change marked as within the cut-off is held (accepted,
    /// pending or quarantined), so no change still to arrive can extend it. Then a change of
    /// the key that is not marked is past the cut-off — on every node, since the marks follow
    /// from the cut-off heads' hashed histories alone.
    fn cutoff_drawn(&self, key: &Bytes32) -> Result<bool, StoreError> {
        let cutoff = {
            let membership = self.membership();
            membership.cutoff_of(key)
        };
        for head in &cutoff {
            if self
                .store
                .get(&keys::vouched(&ChangeHash(head.0), key))?
                .is_none()
            {
                return Ok(false);
            }
        }
        for (mark, value) in self.store.scan_prefix(&[keys::VOUCHED])? {
            if mark.get(33..65) != Some(&key.0[..]) {
                continue;
            }
            let (Some(hash), Ok(document)) = (
                mark.get(1..33).and_then(|b| <[u8; 32]>::try_from(b).ok()),
                <[u8; 16]>::try_from(value.as_slice()),
            ) else {
                return Err(StoreError::Corrupt {
                    what: "cut-off mark",
                });
            };
            let hash = ChangeHash(hash);
            let document = DocumentId::from_bytes(document);
            let held = self.store.get(&keys::envelope(&document, &hash))?.is_some()
                || self.held_dependencies(&document, &hash)?.is_some();
            if !held {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The changes of a revoked key held for its cut-off, if the cut-off can now be drawn.
    fn held_past_cutoff(&self, key: &Bytes32) -> Result<Vec<ChangeHash>, StoreError> {
        if !self.cutoff_drawn(key)? {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .keys_with_prefix(&[&[keys::HELD][..], &key.0].concat())?
            .iter()
            .filter_map(|k| k.get(33..65).and_then(|b| <[u8; 32]>::try_from(b).ok()))
            .map(ChangeHash)
            .collect())
    }

    /// Finishes what a start or a roster update leaves to do: applies the revocations not
    /// applied yet, decides again the changes a crash left waiting for that, then settles.
    fn catch_up_revocations(&self) -> Result<(), NodeError> {
        let ticket = {
            let mut ledger = self.lock_ledger();
            let mut ticket = self.commit.applied();
            // Held for a cut-off, a roster, or withdrawn by a revocation a crash interrupted.
            for key in self.store.keys_with_prefix(&[keys::WAITS_ON_ITSELF])? {
                if let Some(hash) = key.get(1..33).and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                    ledger.woken.push_back(ChangeHash(hash));
                }
            }
            self.apply_revocations(&mut ledger, &mut ticket)?;
            self.settle(&mut ledger, &mut ticket);
            ticket
        };
        if ticket > 0 {
            self.commit.wait_durable(&self.store, ticket)?;
        }
        Ok(())
    }

    /// Applies the revocations this node has not applied yet. A revoked key's accepted changes
    /// that nothing here vouches for are withdrawn — taken out of their documents together
    /// with every change built on them — and decided again by the pipeline, so this node ends
    /// where a node that learnt of the revocation before receiving them would be. A
    /// revocation counts as applied once all its documents are done, so a crash midway
    /// resumes at the next start; withdrawing twice changes nothing.
    fn apply_revocations(&self, ledger: &mut Ledger, ticket: &mut u64) -> Result<(), NodeError> {
        let revoked = {
            let membership = self.membership();
            membership
                .revoked_keys()
                .into_iter()
                .map(|key| (key, membership.cutoff_of(&key)))
                .collect::<Vec<_>>()
        };
        for (key, cutoff) in revoked {
            let applied = [keys::REVOCATION_APPLIED, &key.0].concat();
            if self.store.get(&applied)?.is_some() {
                continue;
            }
            // Cut-off heads held but not accepted vouch for their ancestors from now on.
            for head in &cutoff {
                let head = ChangeHash(head.0);
                for (document, deps) in self.held_anywhere(&head)? {
                    self.vouch(ledger, ticket, &[key], document, head, &deps)?;
                }
            }
            for author in self
                .store
                .keys_with_prefix(&[&[keys::AUTHOR][..], &key.0].concat())?
            {
                let Some(document) = author
                    .get(33..49)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(DocumentId::from_bytes)
                else {
                    continue;
                };
                self.withdraw(ledger, ticket, &key, &cutoff, document)?;
            }
            let mut batch = Batch::default();
            batch.put(applied, Vec::new());
            *ticket = self.commit.apply(&self.store, batch)?;
            ledger.recheck.insert(key);
        }
        Ok(())
    }

    /// Withdraws from `document` the changes of revoked `key` that are not within its
    /// cut-off as far as this node can tell, with every change built on them. They become
    /// pending records in the same atomic batch that rewrites the document, so none is lost,
    /// and are then decided again (quarantined, or held until the cut-off can be drawn).
    fn withdraw(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        key: &Bytes32,
        cutoff: &BTreeSet<Bytes32>,
        document: DocumentId,
    ) -> Result<(), NodeError> {
        let Some((mut doc, kind, bytes)) = self.take(ledger, &document)? else {
            return Ok(());
        };
        // In causal order: every change comes after its dependencies.
        let changes = doc.get_changes(&[]);
        let mut batch = Batch::default();
        let mut roots = Vec::new();
        for change in &changes {
            let hash = change.hash();
            if cutoff.contains(&Bytes32(hash.0)) {
                batch.put(keys::vouched(&hash, key), document.as_bytes().to_vec());
                roots.push(hash);
            } else if self.store.get(&keys::vouched(&hash, key))?.is_some() {
                roots.push(hash);
            }
        }
        let deps: HashMap<ChangeHash, Vec<ChangeHash>> = changes
            .iter()
            .map(|c| (c.hash(), c.deps().to_vec()))
            .collect();
        let mut within = HashSet::new();
        while let Some(hash) = roots.pop() {
            if within.insert(hash) {
                roots.extend(deps.get(&hash).into_iter().flatten().copied());
            }
        }
        let mut withdrawn = Vec::new();
        let mut gone = HashSet::new();
        let mut kept = Vec::new();
        for change in changes {
            let hash = change.hash();
            let past_cutoff = crate::envelope::author_of(change.actor_id().to_bytes())
                == Some(key.0)
                && !within.contains(&hash);
            if past_cutoff || change.deps().iter().any(|d| gone.contains(d)) {
                gone.insert(hash);
                withdrawn.push(hash);
            } else {
                kept.push(change);
            }
        }
        if withdrawn.is_empty() {
            self.put_back(ledger, document, doc, bytes);
            *ticket = self.commit.apply(&self.store, batch)?;
            return Ok(());
        }
        let mut audit_head = ledger.audit;
        let mut withdrawn_bytes = 0;
        // Counted on their authors' shares once the batch is applied.
        let mut held = Vec::new();
        for hash in &withdrawn {
            let envelope_key = keys::envelope(&document, hash);
            let envelope = StoredChange::decode(
                self.store
                    .get(&envelope_key)?
                    .ok_or(StoreError::Corrupt { what: "envelope" })?,
            )?
            .into_envelope(document, hash, &doc)?;
            let verified = Envelope::verify(&envelope)
                .map_err(|_| StoreError::Corrupt { what: "envelope" })?;
            withdrawn_bytes += envelope.len();
            batch.delete(envelope_key);
            // Held under its author's share, waiting for itself; not evicted to make room:
            // it was accepted here, and is decided again at once.
            let record = PendingRecord {
                document,
                missing: Vec::new(),
                envelope,
                bucket: verified.author.0,
                sequence: ledger.pending.next_sequence,
                waits_on_itself: true,
                held_for: None,
            };
            ledger.pending.next_sequence += 1;
            let usage = record.usage();
            batch.put(
                keys::pending_order(&record.bucket, record.sequence, &document, hash),
                usage.encode(),
            );
            held.push((record.bucket, usage));
            batch.put(keys::pending(&document, hash), encode(&record));
            batch.put(keys::waiting(&hash.0, &document, hash), Vec::new());
            batch.put(keys::waits_on_itself(hash, &document), Vec::new());
            let institution = self.membership().institution_of(&verified.author);
            audit_head = self.append_audit(
                &mut batch,
                audit_head,
                AuditAction::Withdrawn,
                (verified.document, verified.hash),
                institution,
            );
        }
        let mut rebuilt = AutoCommit::new();
        rebuilt
            .apply_changes(kept)
            .map_err(|_| StoreError::Corrupt {
                what: "document history",
            })?;
        let heads = rebuilt.get_heads();
        if heads.is_empty() {
            // Its creation was withdrawn: nothing of the document is left.
            for prefix in [keys::DOCUMENT, keys::SNAPSHOT, keys::CATALOGUE] {
                batch.delete(keys::per_document(prefix, &document));
            }
            self.set_index(&mut batch, &document, Vec::new())?;
        } else {
            // What is left is a causal cut of accepted changes, which `validate` holds for.
            let view = crate::model::view(&rebuilt).map_err(|_| StoreError::Corrupt {
                what: "document after a withdrawal",
            })?;
            let snapshot = rebuilt.save();
            let record = DocumentRecord {
                kind,
                heads: heads.iter().map(|h| h.0).collect(),
                tail: 0,
                snapshot: snapshot.len() as u64,
            };
            batch.put(keys::per_document(keys::SNAPSHOT, &document), snapshot);
            batch.put(
                keys::per_document(keys::DOCUMENT, &document),
                encode(&record),
            );
            batch.put(
                keys::per_document(keys::CATALOGUE, &document),
                catalogue_digest(&heads).to_vec(),
            );
            self.set_index(
                &mut batch,
                &document,
                index::entries_of(&self.salt, &document, &view),
            )?;
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        for (bucket, usage) in held {
            ledger.pending.add(bucket, usage);
        }
        if heads.is_empty() {
            self.catalogue_mut().remove(document.as_bytes());
        } else {
            self.catalogue_mut()
                .insert(*document.as_bytes(), catalogue_digest(&heads));
        }
        ledger.audit = audit_head;
        tracing::warn!(%document, withdrawn = withdrawn.len(), "changes withdrawn after a revocation");
        if !heads.is_empty() {
            self.lock_documents().insert(
                document,
                Cached {
                    doc: rebuilt,
                    kind,
                    bytes: bytes.saturating_sub(withdrawn_bytes),
                    used: 0,
                },
            );
        }
        ledger.woken.extend(withdrawn);
        Ok(())
    }

    /// Holds a change until what it waits for arrives: its `missing` dependencies, or (when
    /// `waits_on_itself`) a wake by name. It counts against `bucket`'s share; a bucket over
    /// its share evicts its own oldest held change, and a full whole evicts the oldest of the
    /// bucket holding most of it. Evicted changes are dropped, not refused: a peer offers
    /// them again. Parking a change held already replaces its record.
    fn park(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        verified: &VerifiedChange,
        missing: Vec<[u8; 32]>,
        hold: Hold,
    ) -> Result<Ingested, IngestError> {
        let (id, hash) = (verified.document, verified.hash);
        if missing.len() > PENDING_MISSING_PER_CHANGE_MAX {
            return Err(IngestError::TooManyMissing {
                missing: missing.len(),
            });
        }
        let (bucket, waits_on_itself, held_for) = match hold {
            Hold::Dependencies => (verified.author.0, false, None),
            Hold::Cutoff(key) => (key.0, true, Some(key.0)),
            Hold::Roster => (STRANGERS_BUCKET, true, None),
        };
        let mut batch = Batch::default();
        let replaced = self.unpark(&mut batch, &id, &hash)?;
        // Decided again and held again (at every start, every roster change), a change keeps
        // its place: its age is when it first arrived.
        let sequence = match replaced {
            Some(old) if old.bucket == bucket => old.sequence,
            _ => {
                ledger.pending.next_sequence += 1;
                ledger.pending.next_sequence - 1
            }
        };
        let record = PendingRecord {
            document: id,
            missing,
            envelope: verified.encoded.clone(),
            bucket,
            sequence,
            waits_on_itself,
            held_for,
        };
        let usage = record.usage();
        let room = replaced.map_or(usage, |old| usage.minus(old.usage));
        self.make_room(ledger, ticket, &bucket, room, (&id, &hash))?;
        for dependency in &record.missing {
            batch.put(keys::waiting(dependency, &id, &hash), Vec::new());
        }
        if waits_on_itself {
            batch.put(keys::waiting(&hash.0, &id, &hash), Vec::new());
            batch.put(keys::waits_on_itself(&hash, &id), Vec::new());
        }
        if let Some(key) = held_for {
            batch.put(keys::held(&Bytes32(key), &hash, &id), Vec::new());
        }
        batch.put(
            keys::pending_order(&bucket, record.sequence, &id, &hash),
            usage.encode(),
        );
        batch.put(keys::pending(&id, &hash), encode(&record));
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.pending.settled(replaced);
        ledger.pending.add(bucket, usage);
        Ok(Ingested::Pending(hash))
    }

    /// Adds to `batch` the deletion of a pending change's record and every key that points at
    /// it. Returns what it held, to take off its bucket's share once the batch is applied
    /// (`PendingBook::settled`); `None` if it was not pending.
    fn unpark(
        &self,
        batch: &mut Batch,
        document: &DocumentId,
        hash: &ChangeHash,
    ) -> Result<Option<Unparked>, StoreError> {
        let key = keys::pending(document, hash);
        let Some(value) = self.store.get(&key)? else {
            return Ok(None);
        };
        batch.delete(key);
        batch.delete(keys::waiting(&hash.0, document, hash));
        batch.delete(keys::waits_on_itself(hash, document));
        // A record that no longer decodes still goes; its order key goes when its bucket
        // next evicts.
        let Ok(record) = decode::<PendingRecord>(&value, "pending record") else {
            return Ok(None);
        };
        for dependency in &record.missing {
            batch.delete(keys::waiting(dependency, document, hash));
        }
        if let Some(key) = record.held_for {
            batch.delete(keys::held(&Bytes32(key), hash, document));
        }
        batch.delete(keys::pending_order(
            &record.bucket,
            record.sequence,
            document,
            hash,
        ));
        Ok(Some(Unparked {
            bucket: record.bucket,
            sequence: record.sequence,
            usage: record.usage(),
        }))
    }

    /// Evicts held changes until `usage` more fits `bucket`'s share and the whole. The change
    /// being parked (`parking`) is never its own victim.
    fn make_room(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        bucket: &[u8; 32],
        usage: Usage,
        parking: (&DocumentId, &ChangeHash),
    ) -> Result<(), StoreError> {
        while ledger
            .pending
            .of(bucket)
            .plus(usage)
            .exceeds(PendingBook::quota(bucket))
        {
            if !self.evict_oldest(ledger, ticket, bucket, parking)? {
                break;
            }
        }
        while ledger.pending.total.plus(usage).exceeds(PendingBook::TOTAL) {
            let Some(largest) = ledger.pending.largest() else {
                break;
            };
            if !self.evict_oldest(ledger, ticket, &largest, parking)? {
                break;
            }
        }
        Ok(())
    }

    /// Drops the oldest held change of `bucket`; false if it has none to drop.
    fn evict_oldest(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        bucket: &[u8; 32],
        parking: (&DocumentId, &ChangeHash),
    ) -> Result<bool, StoreError> {
        let prefix = [&[keys::PENDING_ORDER][..], bucket].concat();
        // Two: the oldest may be the change being parked, which is never its own victim.
        for (key, value) in self.store.scan_from(&prefix, &prefix, 2)? {
            let (Some(document), Some(hash)) = (
                key.get(41..57)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .map(DocumentId::from_bytes),
                key.get(57..89)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .map(ChangeHash),
            ) else {
                return Err(StoreError::Corrupt {
                    what: "pending order key",
                });
            };
            if (&document, &hash) == parking {
                continue;
            }
            let mut batch = Batch::default();
            let unparked = self.unpark(&mut batch, &document, &hash)?;
            // An order key whose record is gone (or no longer decodes) goes with its share.
            batch.delete(key.clone());
            *ticket = self.commit.apply(&self.store, batch)?;
            match unparked {
                Some(unparked) => ledger.pending.settled(Some(unparked)),
                None => ledger
                    .pending
                    .remove(bucket, Usage::decode(&value).unwrap_or_default()),
            }
            tracing::warn!(%document, change = %hash, "a held change was evicted to keep pending changes within their bounds");
            return Ok(true);
        }
        Ok(false)
    }

    fn retry_pending_inner(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        decided: ChangeHash,
    ) -> Result<(), IngestError> {
        let mut settled = vec![decided];
        while let Some(dependency) = settled.pop() {
            for key in self
                .store
                .keys_with_prefix(&[&[keys::WAITING][..], &dependency.0].concat())?
            {
                let (Some(document), Some(hash)) = (
                    key.get(33..49)
                        .and_then(|b| <[u8; 16]>::try_from(b).ok())
                        .map(DocumentId::from_bytes),
                    key.get(49..81)
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .map(ChangeHash),
                ) else {
                    self.drop_keys(vec![key], ticket)?;
                    continue;
                };
                let pending_key = keys::pending(&document, &hash);
                let Some(value) = self.store.get(&pending_key)? else {
                    self.drop_keys(vec![key], ticket)?;
                    continue;
                };
                let Ok(record) = decode::<PendingRecord>(&value, "pending record") else {
                    self.drop_pending(ledger, ticket, vec![key], &document, &hash)?;
                    continue;
                };
                // Still waiting for another of its dependencies?
                let mut ready = true;
                for missing in &record.missing {
                    let missing = ChangeHash(*missing);
                    let accepted = self
                        .store
                        .get(&keys::envelope(&document, &missing))?
                        .is_some();
                    let refused = self
                        .store
                        .get(&keys::quarantined(&missing, &document))?
                        .is_some();
                    ready &= accepted || refused;
                }
                if !ready {
                    continue;
                }
                // Verified when it was parked; failing now means the stored copy is damaged.
                let Ok(verified) = Envelope::verify(&record.envelope) else {
                    self.drop_pending(ledger, ticket, Vec::new(), &document, &hash)?;
                    continue;
                };
                match self.decide(ledger, verified, None, ticket, None) {
                    Ok(Ingested::Accepted(_) | Ingested::Quarantined(..)) => settled.push(hash),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "a pending change could not be decided; dropped");
                        self.drop_pending(ledger, ticket, Vec::new(), &document, &hash)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops a pending change that can no longer be decided, with every key pointing at it,
    /// and `extra` keys.
    fn drop_pending(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        extra: Vec<Vec<u8>>,
        document: &DocumentId,
        hash: &ChangeHash,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let unparked = self.unpark(&mut batch, document, hash)?;
        for key in extra {
            batch.delete(key);
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.pending.settled(unparked);
        Ok(())
    }

    fn drop_keys(&self, keys: Vec<Vec<u8>>, ticket: &mut u64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for key in keys {
            batch.delete(key);
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        Ok(())
    }

    /// A document taken out of the cache (or decoded from the store), with its kind and its
    /// cache weight; `put_back` returns it. The ledger shows the decision lock is held: no
    /// decision is then half written in the store, so a document read from it is whole.
    fn take(
        &self,
        _decisions: &Ledger,
        id: &DocumentId,
    ) -> Result<Option<(AutoCommit, DocumentKind, usize)>, StoreError> {
        if let Some(cached) = self.lock_documents().remove(id) {
            return Ok(Some((cached.doc, cached.kind, cached.bytes)));
        }
        let Some((mut doc, kind, bytes, record)) = self.stored_document(id)? else {
            return Ok(None);
        };
        if !holds_heads(&mut doc, &record) {
            return Err(StoreError::Corrupt {
                what: "document heads",
            });
        }
        Ok(Some((doc, kind, bytes)))
    }

    /// `take` without the decision lock, for `prepare`: a document read from the store while a
    /// decision is being written may hold more than its record names, and is then not used.
    fn take_unlocked(&self, id: &DocumentId) -> Option<(AutoCommit, DocumentKind, usize)> {
        if let Some(cached) = self.lock_documents().remove(id) {
            return Some((cached.doc, cached.kind, cached.bytes));
        }
        let (mut doc, kind, bytes, record) = self.stored_document(id).ok()??;
        holds_heads(&mut doc, &record).then_some((doc, kind, bytes))
    }

    /// Returns a document `take` took, unchanged, if the store still holds it so (a decision
    /// may have been written meanwhile, by a writer that read the document from the store).
    fn put_back(&self, _decisions: &Ledger, id: DocumentId, mut doc: AutoCommit, bytes: usize) {
        if bytes == 0 {
            // A creation that was refused: there is no document to keep.
            return;
        }
        if let Ok(Some(record)) = self.document_record(&id)
            && holds_heads(&mut doc, &record)
        {
            self.lock_documents().insert(
                id,
                Cached {
                    doc,
                    kind: record.kind,
                    bytes,
                    used: 0,
                },
            );
        }
    }

    /// A copy of a document, from the cache or the store; with its kind. Without the decision
    /// lock, unless the store was read while a decision was being written (a copy read so is
    /// not kept in the cache: only decisions put documents there).
    fn copy_of(&self, id: &DocumentId) -> Result<Option<(AutoCommit, DocumentKind)>, StoreError> {
        if let Some(cached) = self.lock_documents().touch(id) {
            return Ok(Some((cached.doc.clone(), cached.kind)));
        }
        // A read racing a decision being written (or a withdrawal) may see half of it: then,
        // and on any error, read again under the lock.
        match self.stored_document(id) {
            Ok(None) => return Ok(None),
            Ok(Some((mut doc, kind, _, record))) => {
                if holds_heads(&mut doc, &record) {
                    return Ok(Some((doc, kind)));
                }
            }
            Err(_) => {}
        }
        self.load(&self.lock_ledger(), id)
    }

    /// A copy of a document, from the cache or the store (then kept in the cache); with its
    /// kind.
    fn load(
        &self,
        decisions: &Ledger,
        id: &DocumentId,
    ) -> Result<Option<(AutoCommit, DocumentKind)>, StoreError> {
        if let Some(cached) = self.lock_documents().touch(id) {
            return Ok(Some((cached.doc.clone(), cached.kind)));
        }
        let Some((doc, kind, bytes)) = self.take(decisions, id)? else {
            return Ok(None);
        };
        self.lock_documents().insert(
            *id,
            Cached {
                doc: doc.clone(),
                kind,
                bytes,
                used: 0,
            },
        );
        Ok(Some((doc, kind)))
    }

    /// A document as the store holds it: its record, then its snapshot and the envelopes the
    /// snapshot lacks. Takes no lock: under concurrent decisions the document may hold
    /// changes its record does not name yet (every stored envelope is an accepted change).
    /// Returns the document, its kind, its envelopes' bytes and the record read.
    #[allow(clippy::type_complexity)]
    fn stored_document(
        &self,
        id: &DocumentId,
    ) -> Result<Option<(AutoCommit, DocumentKind, usize, DocumentRecord)>, StoreError> {
        let Some(record) = self.document_record(id)? else {
            return Ok(None);
        };
        // The snapshot, then only the envelopes it lacks (identified by their keys, so the
        // ones it holds are neither decoded nor re-verified).
        let snapshot = self.store.get(&keys::per_document(keys::SNAPSHOT, id))?;
        // Its cache weight: what it was decoded from.
        let mut bytes = snapshot.as_ref().map_or(0, Vec::len);
        let mut doc = snapshot
            .and_then(|snapshot| load_own_snapshot(&snapshot))
            .unwrap_or_default();
        let mut changes = Vec::new();
        for (key, value) in self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, id))?
        {
            bytes += value.len();
            let hash = parse_envelope_key(&key)
                .ok_or(StoreError::Corrupt {
                    what: "envelope key",
                })?
                .1;
            if crate::model::automerge::ReadDoc::get_change_by_hash(&doc, &hash).is_some() {
                continue;
            }
            // A change stored by its signature alone is in the snapshot, or lost.
            let StoredChange::Envelope(envelope) = StoredChange::decode(value)? else {
                return Err(StoreError::Corrupt {
                    what: "a change its snapshot lacks",
                });
            };
            // Signatures were checked when the change was accepted, and `verify` checks them
            // again; a read of the node's own store only decodes.
            let change = Envelope::decode(&envelope)
                .ok()
                .and_then(|envelope| crate::model::decode_change(&envelope.change).ok())
                .filter(|change| change.hash() == hash)
                .ok_or(StoreError::Corrupt { what: "envelope" })?;
            changes.push(change);
        }
        doc.apply_changes(changes)
            .map_err(|_| StoreError::Corrupt {
                what: "document history",
            })?;
        Ok(Some((doc, record.kind, bytes, record)))
    }

    fn document(&self, id: DocumentId, expected: DocumentKind) -> Result<AutoCommit, NodeError> {
        let (doc, found) = self.copy_of(&id)?.ok_or(NodeError::UnknownDocument(id))?;
        if found != expected {
            return Err(NodeError::WrongKind {
                document: id,
                expected,
                found,
            });
        }
        Ok(doc)
    }

    fn document_record(&self, id: &DocumentId) -> Result<Option<DocumentRecord>, StoreError> {
        self.store
            .get(&keys::per_document(keys::DOCUMENT, id))?
            .map(|bytes| decode(&bytes, "document record"))
            .transpose()
    }

    fn lock_documents(&self) -> MutexGuard<'_, Documents> {
        self.documents.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_document(&self, id: &DocumentId) -> MutexGuard<'_, ()> {
        let stripe = usize::from(id.as_bytes()[0]) % self.document_locks.len();
        self.document_locks[stripe]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn membership(&self) -> RwLockReadGuard<'_, Membership> {
        self.membership.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_ledger(&self) -> LedgerGuard<'_> {
        LedgerGuard {
            guard: self.ledger.lock().unwrap_or_else(|p| p.into_inner()),
            counts: &self.counts,
        }
    }

    /// Adds the next audit record to `batch`; returns the new head, to adopt once the batch
    /// is applied.
    fn append_audit(
        &self,
        batch: &mut Batch,
        head: AuditHead,
        action: AuditAction,
        (document, change): (DocumentId, ChangeHash),
        institution: Option<InstitutionId>,
    ) -> AuditHead {
        append_record(
            batch,
            head,
            AuditRecord {
                sequence: 0,
                previous: [0; 32],
                at_ms: audit::now_ms(),
                action,
                document,
                change: Some(change.0),
                institution,
                app: None,
            },
        )
    }

    /// Writes to the audit log, durably, that `app` read (`change` none) or wrote (`change`
    /// the change it made) these documents through the API. Returns once the records are
    /// durable: an access is on record before its data leaves the node.
    pub fn record_access(
        &self,
        app: &str,
        accesses: &[(DocumentId, Option<ChangeHash>)],
    ) -> Result<(), NodeError> {
        self.record_for_app(
            app,
            accesses.iter().map(|(document, change)| {
                let action = if change.is_some() {
                    AuditAction::Written
                } else {
                    AuditAction::Read
                };
                (action, *document, change.map(|c| c.0))
            }),
        )
    }

    /// Writes to the audit log, durably, that `app` exported every document.
    pub fn record_export(&self, app: &str) -> Result<(), NodeError> {
        self.record_for_app(
            app,
            [(AuditAction::Exported, DocumentId::from_bytes([0; 16]), None)],
        )
    }

    /// An audit record of an app's access through this node.
    fn app_record(
        &self,
        app: &str,
        action: AuditAction,
        document: DocumentId,
        change: Option<[u8; 32]>,
    ) -> AuditRecord {
        AuditRecord {
            sequence: 0,
            previous: [0; 32],
            at_ms: audit::now_ms(),
            action,
            document,
            change,
            institution: Some(self.institution.clone()),
            app: Some(app.to_owned()),
        }
    }

    /// Appends an app's records to the audit log in one batch and waits until they are
    /// durable, then wakes the change feed.
    fn record_for_app(
        &self,
        app: &str,
        records: impl IntoIterator<Item = (AuditAction, DocumentId, Option<[u8; 32]>)>,
    ) -> Result<(), NodeError> {
        let ticket = {
            let mut ledger = self.lock_ledger();
            let mut batch = Batch::default();
            let mut head = ledger.audit;
            for (action, document, change) in records {
                head = append_record(
                    &mut batch,
                    head,
                    self.app_record(app, action, document, change),
                );
            }
            if batch.is_empty() {
                return Ok(());
            }
            let ticket = self.commit.apply(&self.store, batch)?;
            ledger.audit = head;
            ticket
        };
        self.commit.wait_durable(&self.store, ticket)?;
        self.audit_updates
            .send_replace(self.lock_ledger().audit.sequence);
        Ok(())
    }

    /// Checks the audit log's hash chain from its first record to its head; `None` when it
    /// is whole.
    pub fn verify_audit(&self) -> Option<Problem> {
        let head = self.lock_ledger().audit;
        self.check_audit_chain(head)
    }

    fn check_audit_chain(&self, head: AuditHead) -> Option<Problem> {
        let mut chain = audit::ChainCheck::default();
        let mut from = 1;
        let broken = |what: String| {
            Some(Problem {
                document: None,
                what,
            })
        };
        loop {
            let page = match self.audit(from, AUDIT_PAGE_RECORDS) {
                Ok(page) => page,
                Err(error) => return broken(format!("the audit log is unreadable: {error}")),
            };
            for record in page.iter().take_while(|r| r.sequence <= head.sequence) {
                if let Err(sequence) = chain.push(record) {
                    return broken(format!(
                        "the audit log's hash chain breaks at record {sequence}"
                    ));
                }
            }
            match page.last() {
                Some(last) if page.len() == AUDIT_PAGE_RECORDS && last.sequence < head.sequence => {
                    from = last.sequence + 1;
                }
                _ => break,
            }
        }
        chain.finish(&head).err().and_then(|sequence| {
            broken(format!(
                "the audit log's hash chain breaks at record {sequence}"
            ))
        })
    }

    /// The sequence of the last durable audit record (without waiting for the decision lock).
    pub fn audit_sequence(&self) -> u64 {
        *self.audit_updates.borrow()
    }

    /// Wakes when durable audit records are added, with the last sequence: how the change
    /// feed follows the log without polling. Withdrawals on a revocation do not wake it; a
    /// follower sees them at its next wake.
    pub fn audit_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.audit_updates.subscribe()
    }

    /// Audit records from sequence `from` on, at most `limit`.
    pub fn audit(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, NodeError> {
        // Keys are in sequence order; only the records asked for are read.
        self.store
            .scan_from(&[audit::RECORD], &audit::record_key(from.max(1)), limit)?
            .into_iter()
            .map(|(key, value)| {
                audit::decode_record(&key, &value).ok_or(NodeError::Store(StoreError::Corrupt {
                    what: "audit record",
                }))
            })
            .collect()
    }

    /// Adds to `batch` the index updates for a document's new content: its old entries out,
    /// its new ones in, atomically with the change itself.
    fn reindex(
        &self,
        batch: &mut Batch,
        id: &DocumentId,
        view: &crate::model::View,
    ) -> Result<(), StoreError> {
        self.set_index(batch, id, index::entries_of(&self.salt, id, view))
    }

    /// Adds to `batch` the index updates that make `new` a document's index keys.
    /// Adds to `batch` the index updates that make `new` (keys, each with its value) a
    /// document's index entries. An entry holding a value is written again, as its value (a
    /// resident's summary) may have changed under the same key.
    fn set_index(
        &self,
        batch: &mut Batch,
        id: &DocumentId,
        new: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let record_key = keys::per_document(index::RECORD, id);
        let old: Vec<Vec<u8>> = match self.store.get(&record_key)? {
            Some(bytes) => decode(&bytes, "index record")?,
            None => Vec::new(),
        };
        let keys: Vec<Vec<u8>> = new.iter().map(|(key, _)| key.clone()).collect();
        for key in old.iter().filter(|k| !keys.contains(k)) {
            batch.delete(key.clone());
        }
        for (key, value) in new {
            if !value.is_empty() || !old.contains(&key) {
                batch.put(key, value);
            }
        }
        batch.put(record_key, encode(&keys));
        Ok(())
    }

    fn lookup(&self, prefix: &[u8]) -> Result<Vec<DocumentId>, NodeError> {
        // Only the first page of keys is read, however many match.
        let mut found: Vec<DocumentId> = self
            .store
            .scan_from(prefix, prefix, index::SEARCH_RESULTS_MAX)?
            .into_iter()
            .filter_map(|(key, _)| index::document_of(&key))
            .collect();
        found.dedup();
        Ok(found)
    }

    /// Residents whose index entries start with `prefix`, answered from the index (an entry
    /// without a summary, written by an earlier release, is answered from the file's view).
    fn residents(&self, prefix: &[u8]) -> Result<Vec<ResidentSummary>, NodeError> {
        let mut found: Vec<ResidentSummary> = Vec::new();
        let mut seen = HashSet::new();
        for (key, value) in self
            .store
            .scan_from(prefix, prefix, index::SEARCH_RESULTS_MAX)?
        {
            let Some(id) = index::document_of(&key) else {
                continue;
            };
            if !seen.insert(id) {
                continue;
            }
            let summary = match index::summary_of(&value) {
                Some(summary) if summary.id == id => summary,
                _ => match self.view(id, DocumentKind::HealthFile)?.as_ref() {
                    View::HealthFile(view) => ResidentSummary {
                        id,
                        name: view.demographics.name.value.clone(),
                        sex: view.demographics.sex.value,
                        birth_date: view.demographics.birth_date.value.clone(),
                    },
                    _ => continue,
                },
            };
            found.push(summary);
        }
        Ok(found)
    }

    /// Residents whose name (family and given, or as written locally) starts with `name`,
    /// ignoring case and spacing, with their summaries; at most `SEARCH_RESULTS_MAX`. Answered
    /// from the index: no file is read.
    pub fn search_residents_by_name(&self, name: &str) -> Result<Vec<ResidentSummary>, NodeError> {
        if index::normalise_name(name).is_empty() {
            return Ok(Vec::new());
        }
        self.residents(&index::name_prefix(name))
    }

    /// The residents with this national id (through its salted hash), with their summaries.
    pub fn find_residents_by_national_id(
        &self,
        national_id: &str,
    ) -> Result<Vec<ResidentSummary>, NodeError> {
        self.residents(&index::national_id_prefix(&self.salt, national_id))
    }

    /// Health files of the resident with this national id (through its salted hash).
    pub fn find_by_national_id(&self, national_id: &str) -> Result<Vec<DocumentId>, NodeError> {
        let found = self.find_residents_by_national_id(national_id)?;
        Ok(found.into_iter().map(|resident| resident.id).collect())
    }

    /// Health files whose name (family and given, or as written locally) starts with `name`,
    /// ignoring case and spacing; at most `SEARCH_RESULTS_MAX`.
    pub fn search_by_name(&self, name: &str) -> Result<Vec<DocumentId>, NodeError> {
        let found = self.search_residents_by_name(name)?;
        Ok(found.into_iter().map(|resident| resident.id).collect())
    }

    /// Referrals addressed to `to` that are in `status`: a referral desk's worklist.
    pub fn referrals_to(
        &self,
        to: &InstitutionId,
        status: crate::model::ReferralStatus,
    ) -> Result<Vec<DocumentId>, NodeError> {
        self.lookup(&index::destination_prefix(to.as_str(), status))
    }

    /// Documents holding concurrent values for a clinician to review (at most
    /// `SEARCH_RESULTS_MAX`, in id order).
    pub fn conflicted(&self) -> Result<Vec<DocumentId>, NodeError> {
        self.lookup(&index::conflicted_prefix())
    }

    /// The kind of a document held, if held.
    pub fn kind_of(&self, id: DocumentId) -> Result<Option<DocumentKind>, NodeError> {
        Ok(self.document_record(&id)?.map(|record| record.kind))
    }

    /// The institution a node key belongs to in the current roster (revoked keys included).
    pub fn institution_of_key(&self, key: &Bytes32) -> Option<InstitutionId> {
        self.membership().institution_of(key)
    }

    /// Changes in quarantine, as of the last decision (without the decision lock).
    pub fn quarantine_count(&self) -> usize {
        self.counts
            .quarantined
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Referrals of a resident.
    pub fn referrals_of(&self, patient: &DocumentId) -> Result<Vec<DocumentId>, NodeError> {
        self.lookup(&index::patient_prefix(patient))
    }

    /// Re-checks the whole store: every envelope's signature and hash against its key, every
    /// document rebuilt from its changes against its recorded heads and catalogue entry, and
    /// validated. Reports problems; never panics on damaged data.
    pub fn verify(&self) -> Result<VerifyReport, NodeError> {
        // No decision runs meanwhile: envelopes, records and the audit head are read as one
        // consistent state.
        let ledger = self.lock_ledger();
        self.verify_locked(&ledger)
    }

    /// `verify`, under the decision lock the caller holds.
    fn verify_locked(&self, ledger: &Ledger) -> Result<VerifyReport, NodeError> {
        let mut report = VerifyReport::default();
        let lost = self.lost_at_open.load(std::sync::atomic::Ordering::Relaxed);
        if lost > 0 {
            report.problems.push(Problem {
                document: None,
                what: format!(
                    "the store has lost {lost} acknowledged changes (damaged log); run repair, then re-sync from peers"
                ),
            });
        }
        // Document by document, so memory follows the largest document, not the store.
        let mut recorded = HashSet::new();
        let records = self.store.scan_prefix(&[keys::DOCUMENT])?;
        for (key, value) in records {
            report.documents += 1;
            let Some(document) = key
                .get(1..17)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(DocumentId::from_bytes)
            else {
                report.problems.push(Problem {
                    document: None,
                    what: "a document record has a malformed key".into(),
                });
                continue;
            };
            recorded.insert(document);
            let problems = self.verify_document(document, &value, &mut report.envelopes);
            report
                .problems
                .extend(problems.into_iter().map(|what| Problem {
                    document: Some(document),
                    what,
                }));
        }
        if let Some(problem) = self.check_audit_chain(ledger.audit) {
            report.problems.push(problem);
        }
        // Envelopes of a document without a record, a page of keys at a time.
        let mut from = vec![keys::ENVELOPE];
        let mut orphans = BTreeSet::new();
        loop {
            let page = self
                .store
                .scan_from(&[keys::ENVELOPE], &from, AUDIT_PAGE_RECORDS)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            from = [last.as_slice(), &[0]].concat();
            for (key, _) in &page {
                match parse_envelope_key(key) {
                    Some((document, _)) if !recorded.contains(&document) => {
                        orphans.insert(document);
                    }
                    Some(_) => {}
                    None => report.problems.push(Problem {
                        document: None,
                        what: "an envelope is stored under a malformed key".into(),
                    }),
                }
            }
        }
        for document in orphans {
            report.problems.push(Problem {
                document: Some(document),
                what: "envelopes without a document record".into(),
            });
        }
        Ok(report)
    }

    /// Checks one document against its record (`value`): every stored change verifies (an
    /// envelope's signature and hash; a change stored by its signature alone, against the
    /// change its snapshot holds), the changes rebuild the recorded heads and nothing else,
    /// the catalogue agrees, and the document validates. Counts the changes checked in
    /// `envelopes`; returns what is wrong.
    fn verify_document(
        &self,
        document: DocumentId,
        value: &[u8],
        envelopes: &mut usize,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let record: DocumentRecord = match decode(value, "document record") {
            Ok(record) => record,
            Err(error) => return vec![error.to_string()],
        };
        let stored = match self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, &document))
        {
            Ok(stored) => stored,
            Err(error) => return vec![format!("its changes are unreadable: {error}")],
        };
        let snapshot = self
            .store
            .get(&keys::per_document(keys::SNAPSHOT, &document))
            .ok()
            .flatten()
            .and_then(|bytes| load_own_snapshot(&bytes));
        let snapshot_loads = snapshot.is_some();
        let mut doc = snapshot.unwrap_or_default();
        let mut hashes = HashSet::new();
        let mut tail = Vec::new();
        for (key, value) in stored {
            *envelopes += 1;
            let Some((_, hash)) = parse_envelope_key(&key) else {
                problems.push("a change is stored under a malformed key".into());
                continue;
            };
            hashes.insert(hash);
            match StoredChange::decode(value) {
                Ok(StoredChange::Envelope(envelope)) => match Envelope::verify(&envelope) {
                    Ok(verified) if verified.document == document && verified.hash == hash => {
                        tail.push(verified.change);
                    }
                    Ok(_) => problems.push(format!(
                        "envelope {hash} is stored under another change's key"
                    )),
                    Err(error) => {
                        problems.push(format!("envelope {hash} fails verification: {error}"))
                    }
                },
                Ok(StoredChange::Signature(signature)) => {
                    match crate::model::automerge::ReadDoc::get_change_by_hash(&doc, &hash) {
                        None => problems.push(format!(
                            "change {hash} is stored by its signature alone, and its snapshot lacks it"
                        )),
                        Some(change) => {
                            if let Err(error) =
                                crate::envelope::verify_signature(&document, &change, &signature)
                            {
                                problems.push(format!("change {hash} fails verification: {error}"));
                            }
                        }
                    }
                }
                Err(error) => problems.push(format!("change {hash}: {error}")),
            }
        }
        if !snapshot_loads {
            problems.push("its snapshot is missing or does not load".into());
        }
        // `apply_changes` skips the changes the snapshot already holds.
        if doc.apply_changes(tail).is_err() {
            problems.push("its changes do not apply".into());
            return problems;
        }
        if !doc.get_missing_deps(&[]).is_empty() {
            problems.push("its snapshot holds changes whose dependencies it lacks".into());
        }
        // Every change the document holds (its snapshot's too) is an accepted change.
        if doc
            .get_changes(&[])
            .iter()
            .any(|c| !hashes.contains(&c.hash()))
        {
            problems.push("its snapshot holds a change that is not stored as accepted".into());
        }
        let mut heads = doc.get_heads();
        let mut recorded: Vec<ChangeHash> = record.heads.iter().copied().map(ChangeHash).collect();
        heads.sort();
        recorded.sort();
        if heads != recorded {
            problems.push("its changes do not rebuild its recorded heads".into());
            return problems;
        }
        match self
            .store
            .get(&keys::per_document(keys::CATALOGUE, &document))
        {
            Ok(Some(digest)) if digest == catalogue_digest(&doc.get_heads()) => {}
            _ => problems.push("its catalogue entry disagrees with its heads".into()),
        }
        if let Err(error) = validate(&doc) {
            problems.push(format!("it fails validation: {error}"));
        }
        problems
    }

    /// Repairs damaged data so that peers can make it whole again: every document `verify`
    /// finds damaged is taken out of the store (its envelopes, snapshot, record, catalogue
    /// entry and index entries, in one batch), so anti-entropy fetches it from peers as a
    /// document this node lacks; and the record of changes lost at open is cleared, since the
    /// same re-sync brings them back (they are the peers' too). What no peer holds — this
    /// node's own writes that never left it — cannot come back; the count says how many
    /// changes were lost, and the audit log which documents they were in. Pending and
    /// quarantined changes are kept.
    pub fn repair(&self) -> Result<RepairReport, NodeError> {
        // One decision lock for the check and the removal: nothing accepted in between is
        // taken out with the damaged documents.
        let ledger = self.lock_ledger();
        let report = self.verify_locked(&ledger)?;
        let discarded = report.affected_documents();
        let mut batch = Batch::default();
        for id in &discarded {
            let prefix = [&[keys::ENVELOPE][..], id.as_bytes()].concat();
            for key in self.store.keys_with_prefix(&prefix)? {
                batch.delete(key);
            }
            for prefix in [keys::SNAPSHOT, keys::DOCUMENT, keys::CATALOGUE] {
                batch.delete(keys::per_document(prefix, id));
            }
            let record_key = keys::per_document(index::RECORD, id);
            // A damaged index record leaves its entries behind: lookups then name a document
            // that is not (yet) here, which they already tolerate.
            if let Some(bytes) = self.store.get(&record_key)?
                && let Ok(entries) = decode::<Vec<Vec<u8>>>(&bytes, "index record")
            {
                for key in entries {
                    batch.delete(key);
                }
            }
            batch.delete(record_key);
            self.lock_documents().remove(id);
        }
        let lost = self.lost_at_open.load(std::sync::atomic::Ordering::Relaxed);
        if lost > 0 {
            batch.delete(keys::LOST);
        }
        if !batch.is_empty() {
            self.commit.commit(&self.store, batch)?;
        }
        {
            let mut catalogue = self.catalogue_mut();
            for id in &discarded {
                catalogue.remove(id.as_bytes());
            }
        }
        self.lost_at_open
            .store(0, std::sync::atomic::Ordering::Relaxed);
        for id in &discarded {
            tracing::warn!(document = %id, "damaged document discarded; it will be fetched from peers");
        }
        Ok(RepairReport {
            discarded,
            lost_changes: lost,
            unrepaired: report
                .problems
                .into_iter()
                .filter(|p| p.document.is_none() && !p.what.contains("acknowledged changes"))
                .collect(),
        })
    }

    /// The data directory's store size on disk, in bytes.
    pub fn storage_bytes(&self) -> Result<u64, NodeError> {
        Ok(self.store.size_on_disk()?)
    }

    /// The bytes of keys and values the store holds, per keyspace (named by its first key
    /// byte, `m` for every `m/…` key): what `storage_bytes` holds beyond them is sled's own
    /// overhead and space not yet reclaimed. Reads the whole store a page at a time, so it is
    /// for benchmarks and diagnosis, not a request path.
    pub fn keyspace_bytes(&self) -> Result<Vec<KeyspaceBytes>, NodeError> {
        const PAGE: usize = 4_096;
        let mut spaces: BTreeMap<u8, KeyspaceBytes> = BTreeMap::new();
        let mut start = Vec::new();
        loop {
            let page = self.store.scan_from(&[], &start, PAGE)?;
            for (key, value) in &page {
                let Some(&first) = key.first() else { continue };
                let space = spaces.entry(first).or_insert_with(|| KeyspaceBytes {
                    prefix: char::from(first).to_string(),
                    keys: 0,
                    bytes: 0,
                });
                space.keys += 1;
                space.bytes += (key.len() + value.len()) as u64;
            }
            match page.last() {
                Some((last, _)) if page.len() == PAGE => {
                    start = last.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok(spaces.into_values().collect())
    }
}

/// Keys and bytes (keys and values) of one keyspace of the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyspaceBytes {
    /// The keyspace's first key byte.
    pub prefix: String,
    /// Keys held.
    pub keys: u64,
    /// Bytes of those keys and their values.
    pub bytes: u64,
}

/// One problem `verify` found. Names documents and changes, never content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The affected document, when known.
    pub document: Option<DocumentId>,
    /// What is wrong.
    pub what: String,
}

/// What `repair` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Damaged documents taken out of the store, to be fetched from peers.
    pub discarded: Vec<DocumentId>,
    /// Acknowledged changes the store had lost (a damaged log), now to be fetched from peers.
    pub lost_changes: u64,
    /// Problems repair does not touch (the audit chain, malformed keys): they stay reported.
    pub unrepaired: Vec<Problem>,
}

/// What `verify` checked and found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Envelopes whose signature and hash were re-checked.
    pub envelopes: usize,
    /// Documents rebuilt from their changes and validated.
    pub documents: usize,
    /// Everything found wrong; empty when the store is sound.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// The documents affected by a problem: re-sync them from peers.
    pub fn affected_documents(&self) -> Vec<DocumentId> {
        let mut documents: Vec<DocumentId> =
            self.problems.iter().filter_map(|p| p.document).collect();
        documents.sort();
        documents.dedup();
        documents
    }
}

/// Why a change that automerge cannot apply at its own dependencies is refused.
const APPLY_TO_DEPENDENCIES: &str = "the change does not apply to its dependencies";
/// Why a change judged at its dependencies that cannot merge into the document is refused.
const APPLY_TO_DOCUMENT: &str = "the change does not apply to the document";

/// Judges `change` by what it wrote, on `doc`, which holds exactly the change and its
/// ancestors. On refusal callers drop `doc`: it holds the refused change.
fn judge_applied(
    doc: &AutoCommit,
    change: &Change,
    author: &InstitutionId,
) -> Result<crate::model::Judged, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::model::judge_change(doc, change, author)
    }))
    .map_err(|_| "the change could not be read".to_string())?
    .map_err(|error| error.to_string())
}

/// Applies a peer's change, containing a panic inside automerge (0.12 panics on some crafted
/// input, see crdt-model): false when it does not apply. The document may then be half
/// changed, so callers apply to a copy they drop on failure.
fn applies(doc: &mut AutoCommit, change: &Change) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.apply_changes([change.clone()])
    }))
    .is_ok_and(|result| result.is_ok())
}

/// Loads a snapshot this node saved. It is loaded as a peer's bytes are (`load_document`:
/// bounded, guarded); a snapshot beyond the bounds set for peers' bytes — a document the model
/// allows to grow that large — is loaded by automerge unbounded, still guarded against a
/// panic: it is this node's own, and its changes may be stored by their signatures alone.
fn load_own_snapshot(bytes: &[u8]) -> Option<AutoCommit> {
    crate::model::load_document(bytes).ok().or_else(|| {
        std::panic::catch_unwind(|| AutoCommit::load(bytes))
            .ok()?
            .ok()
    })
}

/// Whether `doc` is at exactly the heads `record` names.
fn holds_heads(doc: &mut AutoCommit, record: &DocumentRecord) -> bool {
    let mut heads = doc.get_heads();
    heads.sort();
    let mut named: Vec<ChangeHash> = record.heads.iter().copied().map(ChangeHash).collect();
    named.sort();
    heads == named
}

/// Converts a store of format 1 (quarantine and pending records keyed by change alone) to
/// format 2: pending records under their document, with their waits and their place in their
/// author's order; quarantine records under their change and document, with their digest,
/// size and dependencies, keeping envelopes only within `QUARANTINE_BODIES_BYTES_MAX`. Works a
/// page at a time, so a format-1 quarantine of any size converts in bounded memory. Old keys
/// are told apart by their length, so a conversion a crash interrupted resumes at the next
/// open (the format is written only after it). A record that no longer decodes is dropped
/// with a log line: a peer offers the change again.
fn migrate_to_format_2(store: &WitnessedStore) -> Result<(), StoreError> {
    const PAGE_RECORDS: usize = 1_000;
    // Pending first: the old held keys tell which were held for a revoked key's cut-off.
    let mut sequence = 0u64;
    for_each_page(
        store,
        keys::PENDING,
        33,
        PAGE_RECORDS,
        |key, value, batch| {
            batch.delete(key.to_vec());
            let Ok(old) = decode::<PendingRecord>(value, "pending record") else {
                tracing::warn!("an unreadable pending record was dropped converting the store");
                return Ok(());
            };
            let Ok(verified) = Envelope::verify(&old.envelope) else {
                tracing::warn!("an unreadable pending record was dropped converting the store");
                return Ok(());
            };
            let (document, hash) = (old.document, verified.hash);
            let old_held = [&[keys::HELD][..], &verified.author.0, &hash.0].concat();
            let held_for = store.get(&old_held)?.map(|_| verified.author.0);
            batch.delete(old_held);
            let record = PendingRecord {
                bucket: verified.author.0,
                sequence,
                waits_on_itself: old.missing.is_empty(),
                held_for,
                ..old
            };
            sequence += 1;
            for dependency in &record.missing {
                batch.put(keys::waiting(dependency, &document, &hash), Vec::new());
            }
            if record.waits_on_itself {
                batch.put(keys::waiting(&hash.0, &document, &hash), Vec::new());
                batch.put(keys::waits_on_itself(&hash, &document), Vec::new());
            }
            if let Some(key) = held_for {
                batch.put(keys::held(&Bytes32(key), &hash, &document), Vec::new());
            }
            batch.put(
                keys::pending_order(&record.bucket, record.sequence, &document, &hash),
                record.usage().encode(),
            );
            batch.put(keys::pending(&document, &hash), encode(&record));
            Ok(())
        },
    )?;
    // What is left of the old waits and held keys points at nothing.
    for (prefix, old_length) in [(keys::WAITING, 65), (keys::HELD, 65)] {
        for_each_page(store, prefix, old_length, PAGE_RECORDS, |key, _, batch| {
            batch.delete(key.to_vec());
            Ok(())
        })?;
    }
    let mut bodies = match store.get(keys::QUARANTINE_BODIES)? {
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(u64::from_be_bytes)
            .unwrap_or(0),
        None => 0,
    };
    for_each_page(
        store,
        keys::QUARANTINE,
        33,
        PAGE_RECORDS,
        |key, value, batch| {
            batch.delete(key.to_vec());
            let Ok(mut record) = decode::<QuarantineRecord>(value, "quarantine record") else {
                tracing::warn!("an unreadable quarantine record was dropped converting the store");
                return Ok(());
            };
            record.envelope_bytes = record.envelope.len() as u64;
            record.digest = Some(Sha256::digest(&record.envelope).into());
            record.deps = Some(
                dependencies_of(&record.envelope)
                    .into_iter()
                    .map(|hash| hash.0)
                    .collect(),
            );
            if bodies + record.envelope_bytes <= QUARANTINE_BODIES_BYTES_MAX {
                bodies += record.envelope_bytes;
            } else {
                record.envelope = Vec::new();
            }
            batch.put([key, record.document.as_bytes()].concat(), encode(&record));
            batch.put(keys::QUARANTINE_BODIES, bodies.to_be_bytes().to_vec());
            Ok(())
        },
    )?;
    Ok(())
}

/// Runs `convert` on every key of `prefix` that is `length` bytes long (and its value), a page
/// at a time, applying each page's writes in one batch.
fn for_each_page(
    store: &WitnessedStore,
    prefix: u8,
    length: usize,
    page_records: usize,
    mut convert: impl FnMut(&[u8], &[u8], &mut Batch) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut from = vec![prefix];
    loop {
        let page = store.scan_from(&[prefix], &from, page_records)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        from = [last.as_slice(), &[0]].concat();
        let mut batch = Batch::default();
        for (key, value) in &page {
            if key.len() == length {
                convert(key, value, &mut batch)?;
            }
        }
        if !batch.is_empty() {
            store.apply(batch)?;
        }
    }
}

/// A view read from a document carries the id the node knows it by.
fn set_view_id(view: &mut View, id: DocumentId) {
    match view {
        View::HealthFile(view) => view.id = id,
        View::Referral(view) => view.id = id,
        View::Roster(_) => {}
    }
}

/// The dependencies of the change in an envelope (none if it does not decode).
fn dependencies_of(envelope: &[u8]) -> Vec<ChangeHash> {
    Envelope::decode(envelope)
        .ok()
        .and_then(|envelope| crate::model::decode_change(&envelope.change).ok())
        .map(|change| change.deps().to_vec())
        .unwrap_or_default()
}

/// The catalogue's digest of a document's heads: equal digests mean equal heads.
fn catalogue_digest(heads: &[ChangeHash]) -> [u8; 32] {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for head in sorted {
        hasher.update(head.0);
    }
    hasher.finalize().into()
}

fn parse_envelope_key(key: &[u8]) -> Option<(DocumentId, ChangeHash)> {
    let document: [u8; 16] = key.get(1..17)?.try_into().ok()?;
    let hash: [u8; 32] = key.get(17..49)?.try_into().ok()?;
    (key.len() == 49).then(|| (DocumentId::from_bytes(document), ChangeHash(hash)))
}

/// Adds `record` to `batch` as the record after `head`, filling in its place in the chain;
/// returns the new head, to adopt once the batch is applied.
fn append_record(batch: &mut Batch, head: AuditHead, mut record: AuditRecord) -> AuditHead {
    record.sequence = head.sequence + 1;
    record.previous = head.hash;
    let next = AuditHead {
        sequence: record.sequence,
        hash: record.hash(),
    };
    batch.put(
        audit::record_key(record.sequence),
        audit::encode_record(&record),
    );
    batch.put(audit::HEAD, encode(&next));
    next
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).expect("CBOR encoding into memory");
    bytes
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|_| StoreError::Corrupt { what })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn cached(bytes: usize) -> Cached {
        Cached {
            doc: AutoCommit::new(),
            kind: DocumentKind::HealthFile,
            bytes,
            used: 0,
        }
    }

    /// A resident with a name, a sex and a birth date, and nothing else.
    fn bare_resident() -> Demographics {
        Demographics {
            name: crate::model::PersonName {
                family: "F".into(),
                given: "G".into(),
                text: None,
            },
            sex: crate::model::Sex::Unknown,
            birth_date: crate::model::Date::new("1950-01-01").unwrap(),
            phone: None,
            address: None,
            national_id: None,
            insurance: None,
        }
    }

    /// The editor of the one member of `one_member_node`'s consortium.
    pub(crate) fn one_member_editor() -> Editor {
        Editor {
            institution: InstitutionId::new("chc-a").unwrap(),
            at: crate::model::Timestamp(0),
        }
    }

    /// A node in `dir` whose consortium is itself alone, with the authority key `[1; 32]`.
    pub(crate) fn one_member_node(dir: &Path) -> (Node, NodeConfig) {
        use crate::model::{InstitutionKind, Roster, RosterOp};
        let data_dir = dir.join("node");
        std::fs::create_dir_all(&data_dir).unwrap();
        let own = Identity::load_or_create(&data_dir).unwrap();
        let authority = Identity::from_secret([1; 32]);
        let editor = one_member_editor();
        let mut roster = Roster::create(&authority.actor(), &editor).unwrap();
        for op in [
            RosterOp::AddInstitution {
                id: editor.institution.clone(),
                name: "A".into(),
                kind: InstitutionKind::CommunityCentre,
            },
            RosterOp::AddNodeKey {
                institution: editor.institution.clone(),
                key: own.public_key(),
            },
        ] {
            roster.apply(&editor, &op).unwrap();
        }
        let config = NodeConfig {
            data_dir,
            authority: authority.public_key(),
        };
        let node = Node::open(
            &config,
            Some(&SignedRoster::sign(&authority, &mut roster).encode()),
        )
        .unwrap();
        (node, config)
    }

    #[test]
    fn an_envelope_never_reads_as_a_change_stored_by_its_signature_alone() {
        let envelope = Envelope {
            version: crate::envelope::ENVELOPE_VERSION,
            document: vec![0; 16],
            change: vec![SIGNATURE_ONLY; 8],
            signature: vec![SIGNATURE_ONLY; 64],
        }
        .encode();
        assert_ne!(envelope[0], SIGNATURE_ONLY);
        assert!(matches!(
            StoredChange::decode(envelope),
            Ok(StoredChange::Envelope(_))
        ));
        let signature = [7; 64];
        assert!(matches!(
            StoredChange::decode(StoredChange::signature_only(&signature)),
            Ok(StoredChange::Signature(s)) if s == signature
        ));
        assert!(StoredChange::decode(vec![SIGNATURE_ONLY; 10]).is_err());
    }

    #[test]
    fn a_read_of_a_decided_document_does_not_wait_for_the_decision_lock() {
        use crate::model::DemographicField;
        let dir = tempfile::tempdir().unwrap();
        let (node, config) = one_member_node(dir.path());
        let editor = one_member_editor();
        let demographics = bare_resident();
        let (id, _) = node.create_health_file(&editor, &demographics).unwrap();
        node.apply_health_file(
            id,
            &editor,
            &HealthFileOp::SetDemographic(DemographicField::Phone("+86 1".into())),
        )
        .unwrap();
        let node = Arc::new(node);
        let read_while_deciding = |node: &Arc<Node>| {
            // A decision in progress holds this lock; the read must not need it.
            let _deciding = node.lock_ledger();
            let (sender, receiver) = std::sync::mpsc::channel();
            let reader = node.clone();
            let thread = std::thread::spawn(move || {
                // What `/admin/status` and `/metrics` show, too.
                let counts = (reader.pending_count().unwrap(), reader.quarantine_count());
                assert_eq!(counts, (0, 0));
                let _ = sender.send(reader.health_file(id));
            });
            let read = receiver
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the read waited for the decision lock")
                .unwrap();
            // The reader's handle on the node goes with its thread (the store reopens below).
            thread.join().unwrap();
            read
        };
        let read = read_while_deciding(&node);
        assert_eq!(read.id, id);
        assert_eq!(
            read.demographics
                .phone
                .as_ref()
                .map(|phone| phone.value.as_str()),
            Some("+86 1")
        );
        // After a restart nothing is kept: the first read reads the store, without the lock,
        // and keeps the view.
        drop(node);
        let node = Arc::new(Node::open(&config, None).unwrap());
        let first = read_while_deciding(&node);
        assert_eq!(first, read);
        assert_eq!(read_while_deciding(&node), first);
    }

    #[test]
    fn a_local_change_is_judged_on_the_document_it_was_made_on_or_on_a_copy_read_meanwhile() {
        use crate::model::{NewAllergy, Severity};
        let dir = tempfile::tempdir().unwrap();
        let (node, config) = one_member_node(dir.path());
        let editor = one_member_editor();
        let demographics = bare_resident();
        let (id, _) = node.create_health_file(&editor, &demographics).unwrap();
        let allergy = |substance: &str| {
            HealthFileOp::AddAllergy(NewAllergy {
                substance: substance.into(),
                reaction: "rash".into(),
                severity: Severity::Mild,
            })
        };
        let elsewhere = std::cell::Cell::new(None);
        let write = |op: HealthFileOp, meanwhile: &dyn Fn()| {
            let (change, written) = node
                .write_in_place(id, DocumentKind::HealthFile, |doc| {
                    HealthFile::apply_to(doc, &node.actor, &editor, &op)
                })
                .unwrap()
                .unwrap();
            // Taken out of the cache, not copied.
            assert!(!node.lock_documents().documents.contains_key(&id));
            meanwhile();
            let hash = node
                .write_local(id, vec![change], Some(written), None)
                .unwrap();
            assert!(node.lock_documents().documents.contains_key(&id));
            hash
        };
        write(allergy("penicillin"), &|| {});
        // While the change waits, a change of the same document from elsewhere (the same
        // key, another incarnation) is decided on a copy read again from the store: that
        // copy is then the current one, and the waiting change is judged on it.
        write(allergy("latex"), &|| {
            let mut copy = node.document(id, DocumentKind::HealthFile).unwrap();
            let mut other = node.identity.public_key().0.to_vec();
            other.extend([9; crate::envelope::ACTOR_INCARNATION_BYTES]);
            let hash = HealthFile::apply_to(
                &mut copy,
                &crate::model::Actor::from_bytes(other),
                &editor,
                &allergy("shellfish"),
            )
            .unwrap()
            .unwrap();
            let mut change = copy.get_change_by_hash(&hash).unwrap();
            let envelope = Envelope::sign(&node.identity, id, &mut change).encode();
            assert!(matches!(node.ingest(&envelope), Ok(Ingested::Accepted(_))));
            elsewhere.set(Some(hash));
        });
        write(allergy("iodine"), &|| {});
        assert_eq!(
            node.health_file(id).unwrap().allergy_substances(),
            ["iodine", "latex", "penicillin", "shellfish"]
        );
        // The cached document holds exactly what the store holds.
        let cached = node.document(id, DocumentKind::HealthFile).unwrap();
        assert_eq!(cached.clone().get_heads(), node.heads(id).unwrap());
        let problems = node.verify().unwrap().problems;
        assert!(problems.is_empty(), "{problems:?}");
        // An operation that fails writes nothing and leaves the document in the cache.
        let refused = node.apply_health_file(
            id,
            &editor,
            &HealthFileOp::EditEncounterNote {
                entry: crate::model::EntryId::parse("1@00").unwrap(),
                note: "no such encounter".into(),
            },
        );
        assert!(refused.is_err());
        assert!(node.lock_documents().documents.contains_key(&id));
        assert_eq!(node.health_file(id).unwrap().allergies.len(), 4);
        // Nothing was judged on a stale copy: the change from elsewhere is an ancestor of the
        // heads, and the store read afresh shows what the node showed.
        let mut stored = node.document(id, DocumentKind::HealthFile).unwrap();
        assert!(
            stored
                .get_change_by_hash(&elsewhere.get().unwrap())
                .is_some()
        );
        let shown = node.health_file(id).unwrap();
        drop(node);
        let node = Node::open(&config, None).unwrap();
        assert_eq!(node.health_file(id).unwrap(), shown);
        assert_eq!(node.heads(id).unwrap(), stored.get_heads());
    }

    #[test]
    fn a_resident_search_answers_from_the_index_and_follows_edits() {
        use crate::model::{DemographicField, PersonName, Sex};
        let dir = tempfile::tempdir().unwrap();
        let (node, _) = one_member_node(dir.path());
        let editor = one_member_editor();
        let name = |family: &str| PersonName {
            family: family.into(),
            given: "Jianguo".into(),
            text: None,
        };
        let demographics = Demographics {
            name: name("Lu"),
            sex: Sex::Unknown,
            birth_date: crate::model::Date::new("1950-01-01").unwrap(),
            phone: None,
            address: None,
            national_id: Some("310230195001010011".into()),
            insurance: None,
        };
        let (id, _) = node.create_health_file(&editor, &demographics).unwrap();
        let summary = |sex, family: &str| ResidentSummary {
            id,
            name: name(family),
            sex,
            birth_date: demographics.birth_date.clone(),
        };
        assert_eq!(
            node.search_residents_by_name("lu jian").unwrap(),
            [summary(Sex::Unknown, "Lu")]
        );
        // An edit under the same index key (the sex), then one that moves it (the name).
        let edit = |field| {
            node.apply_health_file(id, &editor, &HealthFileOp::SetDemographic(field))
                .unwrap()
        };
        edit(DemographicField::Sex(Sex::Female));
        assert_eq!(
            node.search_residents_by_name("lu").unwrap(),
            [summary(Sex::Female, "Lu")]
        );
        edit(DemographicField::Name(name("Shi")));
        assert!(node.search_residents_by_name("lu").unwrap().is_empty());
        assert_eq!(
            node.search_residents_by_name("SHI  jianguo").unwrap(),
            [summary(Sex::Female, "Shi")]
        );
        assert_eq!(
            node.find_residents_by_national_id("310230 195001010011")
                .unwrap(),
            [summary(Sex::Female, "Shi")]
        );
        // An entry written before entries held a summary is answered from the file.
        let key = index::name_prefix("shi jianguo");
        let (stored, _) = node.store.scan_from(&key, &key, 1).unwrap().remove(0);
        let mut batch = Batch::default();
        batch.put(stored, Vec::new());
        node.store.apply(batch).unwrap();
        assert_eq!(
            node.search_residents_by_name("shi").unwrap(),
            [summary(Sex::Female, "Shi")]
        );
    }

    #[test]
    fn a_full_quarantine_refuses_without_storing_and_bodies_stop_at_their_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (node, config) = one_member_node(dir.path());
        let own = Identity::load_or_create(&config.data_dir).unwrap();
        let editor = one_member_editor();
        let demographics = bare_resident();
        // A creation change sent under another document's id: quarantined, normally.
        let mut file = HealthFile::create(&own.actor(), &editor, &demographics).unwrap();
        let mut change = file.changes_since(&[]).remove(0);
        let hijack = Envelope::sign(&own, DocumentId::from_bytes([9; 16]), &mut change).encode();
        node.lock_ledger().quarantined = QUARANTINE_CHANGES_MAX;
        assert!(matches!(
            node.ingest(&hijack),
            Err(IngestError::QuarantineFull)
        ));
        assert!(node.quarantine().unwrap().is_empty(), "nothing was stored");
        node.lock_ledger().quarantined = 0;
        // With the bodies' budget spent, the record keeps the digest, size and reason only.
        node.lock_ledger().quarantine_bodies = QUARANTINE_BODIES_BYTES_MAX - 1;
        assert!(matches!(
            node.ingest(&hijack).unwrap(),
            Ingested::Quarantined(..)
        ));
        let kept = node.quarantine().unwrap();
        assert_eq!(kept.len(), 1);
        assert!(!kept[0].envelope_kept);
        assert_eq!(kept[0].envelope_bytes, hijack.len() as u64);
        assert!(node.purge_quarantine(None).unwrap() == 1);
        node.lock_ledger().quarantine_bodies = 0;
        assert!(matches!(
            node.ingest(&hijack).unwrap(),
            Ingested::Quarantined(..)
        ));
        assert!(node.quarantine().unwrap()[0].envelope_kept);
        assert_eq!(node.lock_ledger().quarantine_bodies, hijack.len() as u64);
    }

    #[test]
    fn the_cache_keeps_its_bounds_and_the_document_just_inserted() {
        let mut cache = Documents::default();
        for n in 0..(CACHE_DOCUMENTS_MAX + 10) {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&(n as u64).to_be_bytes());
            let id = DocumentId::from_bytes(id);
            cache.insert(id, cached(1));
            assert!(
                cache.documents.contains_key(&id),
                "the newest document stays"
            );
            assert!(cache.documents.len() <= CACHE_DOCUMENTS_MAX);
        }
        // One document over the byte budget evicts the others, but stays itself.
        let big = DocumentId::from_bytes([0xff; 16]);
        cache.insert(big, cached(CACHE_BYTES_MAX + 1));
        assert!(cache.documents.contains_key(&big));
        assert_eq!(cache.documents.len(), 1);
        assert_eq!(cache.bytes, CACHE_BYTES_MAX + 1);
    }
}

//! A node's core: its identity, roster, durable store, and the one ingest pipeline that every
//! change goes through — a local write as much as a peer's.
//!
//! Pipeline: verify the envelope's signature → the author is a member (or within its
//! revocation cut-off) → a creation change names its own document → dependencies accepted
//! (otherwise held as pending, bounded) and none quarantined → apply to the document at the
//! change's own dependencies and `validate_change` → accept (store, durable) or quarantine
//! with the reason. Every decision depends only on the change, its history and the roster.
//!
//! Rooms: `pipeline` decides changes one by one and `whole` a fetched document at once;
//! `pending` holds changes whose dependencies have not arrived; `revocation` applies
//! revocation cut-offs; `quarantine` keeps refused changes; `documents` loads, caches and
//! serves documents and views; `search` reads the indexes; `audit_trail` writes and checks
//! the audit chain; `verify` re-checks the whole store; `migrate` upgrades older layouts.

mod audit_trail;
mod documents;
mod erasure;
mod linked;
mod migrate;
mod pending;
mod pipeline;
mod quarantine;
mod revocation;
mod search;
mod urgent;
mod verify;
mod whole;

use audit_trail::append_record;
use documents::*;
use migrate::*;
use pending::*;
use pipeline::*;
use quarantine::*;
use whole::{PreparedWhole, WholeChange};

pub use crate::index::{DeskPosition, Side};
pub use documents::HistoryEntry;
pub use erasure::ErasureRecord;
pub use pending::PendingEntry;
pub use quarantine::{
    QuarantineEntry, QuarantinePage, REASON_DEPENDS_ON_QUARANTINED, REASON_PAST_CUTOFF,
};
pub(crate) use quarantine::{hex_decode, hex_encode};
pub use search::{DESK_PAGE_MAX, DeskPage, DeskQuery};
pub use urgent::{URGENT_DOCUMENTS_MAX, URGENT_WINDOW_MS};
pub use verify::{KeyspaceBytes, Problem, RepairReport, VerifyReport};
pub use whole::{Undurable, WholeDocument};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{self, AuditAction, AuditHead, AuditRecord};
use crate::envelope::{Envelope, EnvelopeError, VerifiedChange};
use crate::identity::{Identity, IdentityError};
use crate::import::ResidentRecords;
use crate::index::{self, ResidentSummary};
use crate::membership::{Admission, Membership, RosterError, SignedRoster};
use crate::model::automerge::{AutoCommit, Change, ChangeHash};
use crate::model::{
    Actor, Bytes32, Demographics, DocumentId, DocumentKind, Editor, HealthFile, HealthFileOp,
    HealthFileView, InstitutionId, NewReferral, OpError, Referral, ReferralOp, ReferralView, View,
    document_id_of, validate,
};
use crate::reconcile::{Catalogue, HeadsDigest};
use crate::store::keys;
use crate::store::{
    Batch, GroupCommit, KeyValue, StoreEngine, StoreError, WITNESS_FILE, WitnessedStore, pages,
};

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
/// store is a valid format-3 store as it is. 4: referrals indexed on the desks of the
/// institutions that receive and send them (`index::DeskPosition`), replacing the index by
/// destination and status. 5: every resident's index entry holds the resident's summary
/// (`index_summaries` writes them for files indexed by an earlier release), which a write
/// trusts when it leaves a file's entries alone. 6: audit records appended in one batch are
/// stored as one run (`audit::append_to_run`); a format-5 store is a valid format-6 store as
/// it is, its records read as runs of one.
pub const STORE_FORMAT: u32 = 6;
/// Audit records read at a time when the whole log is checked.
const AUDIT_PAGE_RECORDS: usize = 4_096;

// How the limits relate: a share never exceeds the whole it is a share of, and one change
// never needs more than its author's share.
const _: () = {
    assert!(PENDING_CHANGES_PER_AUTHOR_MAX <= PENDING_CHANGES_MAX);
    assert!(PENDING_BYTES_PER_AUTHOR_MAX <= PENDING_BYTES_MAX);
    assert!(PENDING_WAITS_PER_AUTHOR_MAX <= PENDING_WAITS_MAX);
    assert!(PENDING_CHANGES_OF_STRANGERS_MAX <= PENDING_CHANGES_MAX);
    assert!(PENDING_BYTES_OF_STRANGERS_MAX <= PENDING_BYTES_MAX);
    assert!(PENDING_MISSING_PER_CHANGE_MAX <= PENDING_WAITS_PER_AUTHOR_MAX);
    assert!(crate::envelope::ENVELOPE_BYTES_MAX <= PENDING_BYTES_OF_STRANGERS_MAX);
};

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
    /// A resident loaded in bulk whose national id already names a health file here.
    #[error(
        "a health file with this resident's national id is already held ({existing}); write to it rather than load the resident again"
    )]
    AlreadyHeld {
        /// The file held.
        existing: DocumentId,
    },
    /// A resident of an all-or-nothing load (a FHIR transaction) not written because another
    /// was refused.
    #[error("not loaded: another resident of this all-or-nothing load was refused")]
    LoadRolledBack,
    /// A referral to an institution the roster does not name.
    #[error(
        "no member of the consortium is named {institution}; check the destination against the roster (estuary roster show)"
    )]
    UnknownMember {
        /// The destination named.
        institution: InstitutionId,
    },
    /// A link of a health file that cannot be made here.
    #[error("the link is refused: {reason}")]
    LinkRefused {
        /// Why.
        reason: &'static str,
    },
    /// A resident loaded in bulk with the same national id as an earlier one of the load.
    #[error("the same national id as resident {first} of this load (counted from 0)")]
    RepeatedInLoad {
        /// The earlier resident's place in the load.
        first: usize,
    },
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
    /// The change is to a document erased on the consortium authority's order (or a referral
    /// of an erased resident's): refused, and nothing of it kept.
    #[error(
        "document {document} was erased on the consortium authority's order; its changes are refused and not kept"
    )]
    Erased {
        /// The document.
        document: DocumentId,
    },
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

/// Where a node keeps its data and whom it trusts.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The data directory (key, store).
    pub data_dir: PathBuf,
    /// The consortium authority's public key.
    pub authority: Bytes32,
    /// The engine a new store is created in (`StoreEngine::default()` if none); an existing
    /// store keeps its own, except that a sled store moves to `Lsm` when this names it.
    pub store_engine: Option<StoreEngine>,
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
    /// Its document is urgent (`Node::is_urgent`): gossiped ahead of the others.
    pub urgent: bool,
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
    /// How long decisions take, from a change's arrival in the pipeline to its durable
    /// decision (one observation per change).
    decisions: crate::latency::Histogram,
    /// Salt of the national-id index; random per node, so the index is useless elsewhere.
    salt: [u8; 32],
    /// The roster in force, published whole: a reader (a decision, the swarm checking a peer)
    /// takes the current `Arc` and never holds a lock while it reads, and an update replaces
    /// it only once the new roster is durable.
    membership: tokio::sync::watch::Sender<Arc<Membership>>,
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
    /// Documents a peer should take first (`urgent.rs`).
    urgent: Mutex<urgent::Urgent>,
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

/// One resident of a bulk load: their new file and its change, or why they were not loaded.
pub type Loaded = Result<(DocumentId, ChangeHash), NodeError>;

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
            kind: None,
        };
        let hash = node.write_local(id, changes, Some(written), self.app)?;
        Ok((id, hash))
    }

    /// Loads residents' existing records (a member joining brings them): each resident's
    /// health file is created with every record in it as **one** signed change
    /// (`HealthFile::create_with_records`). Each file is made, judged (`judge_creation`),
    /// signed and saved on every core, then stored whole (its snapshot and the change's
    /// signature, as a document fetched whole is) in order, with one flush for the request.
    /// The change is never encoded on its own: a peer takes a loaded file by reconciliation,
    /// fetched whole, not by gossip (a load outruns what gossip queues anyway). A resident
    /// whose national id already names a health file here is refused (`AlreadyHeld`), and so
    /// is one whose national id an earlier resident of `residents` has (`RepeatedInLoad`): a
    /// load run twice adds nothing. Returns each resident's file and change, or why it was
    /// not loaded; fails as a whole only if the store fails. `all_or_nothing` (a FHIR
    /// transaction) writes nothing when any resident is refused before its decision.
    pub fn import_health_files(
        &self,
        editor: &Editor,
        residents: &[ResidentRecords],
        all_or_nothing: bool,
    ) -> Result<Vec<Loaded>, NodeError> {
        let node = self.node;
        node.check_editor(editor)?;
        let mut first_with: HashMap<&str, usize> = HashMap::new();
        let mut refused: Vec<Option<NodeError>> = Vec::with_capacity(residents.len());
        for (index, resident) in residents.iter().enumerate() {
            let Some(national_id) = resident.demographics.national_id.as_deref() else {
                refused.push(None);
                continue;
            };
            refused.push(if let Some(&first) = first_with.get(national_id) {
                Some(NodeError::RepeatedInLoad { first })
            } else if let Some(&existing) = node.find_by_national_id(national_id)?.first() {
                Some(NodeError::AlreadyHeld { existing })
            } else {
                first_with.insert(national_id, index);
                None
            });
        }
        let author = node.identity.public_key();
        let roster = node.roster_version();
        let made = parallel_map(residents, refused, |resident| {
            let file = HealthFile::create_with_records(
                &node.actor,
                editor,
                &resident.demographics,
                &resident.records,
            )
            .map_err(|refused| NodeError::Op(*refused.error))?;
            let id = file.id();
            let mut doc = file.into_automerge();
            let hash = *doc.get_heads().first().ok_or(StoreError::Corrupt {
                what: "a file just made",
            })?;
            // What peers would judge, judged here first: a file this node cannot keep valid
            // is not stored.
            let view = crate::model::judge_creation(&doc, hash, &node.institution)
                .map_err(|error| NodeError::Op(error.into()))?;
            let snapshot = doc.save();
            // A change too large for an envelope could not travel change by change: refused
            // as the envelope path refuses it (compressed, as automerge encodes it, only when
            // the document's own bytes say it could matter).
            if snapshot.len() > crate::envelope::CHANGE_BYTES_MAX / 2
                && let Some(mut change) = doc.get_last_local_change()
                && change.bytes().len() > crate::envelope::CHANGE_BYTES_MAX
            {
                let bytes = change.bytes().len();
                return Err(IngestError::from(EnvelopeError::TooLarge { bytes }).into());
            }
            let signature = crate::envelope::sign_change(&node.identity, &id, &hash);
            let change = WholeChange {
                hash,
                author,
                institution: node.institution.clone(),
                signature: Some(signature),
            };
            let whole = WholeDocument {
                id,
                doc,
                signatures: HashMap::from([(hash.0, signature)]),
                changes: None,
                saved: None,
            };
            Ok((
                whole,
                PreparedWhole {
                    changes: vec![change],
                    view,
                    snapshot,
                    base: Vec::new(),
                    merged: None,
                    roster,
                    cover: vec![(hash, author)],
                    held: Vec::new(),
                },
            ))
        });
        if all_or_nothing && made.iter().any(Result::is_err) {
            let not_written = |_| Err(NodeError::LoadRolledBack);
            return Ok(made.into_iter().map(|m| m.and_then(not_written)).collect());
        }
        let mut outcomes = Vec::with_capacity(made.len());
        let mut to_decide = Vec::new();
        for made in made {
            match made {
                Ok((whole, prepared)) => {
                    outcomes.push(Ok((whole.id, prepared.changes[0].hash)));
                    to_decide.push((whole, prepared));
                }
                Err(error) => outcomes.push(Err(error)),
            }
        }
        let (_, given_back) = node.decide_prepared_whole(to_decide, self.app)?;
        // A file is given back only if this node's standing changed while the load ran (its
        // id is new): it was not stored.
        let not_stored: HashSet<DocumentId> = given_back.iter().map(|whole| whole.id).collect();
        for outcome in &mut outcomes {
            if matches!(outcome, Ok((id, _)) if not_stored.contains(id)) {
                *outcome = Err(NodeError::NotAMember);
            }
        }
        Ok(outcomes)
    }

    /// Sends a referral from this node's institution. Returns once it is durable.
    pub fn create_referral(
        &self,
        editor: &Editor,
        referral: &NewReferral,
    ) -> Result<(DocumentId, ChangeHash), NodeError> {
        let node = self.node;
        node.check_editor(editor)?;
        node.check_member(&referral.to)?;
        self.send(Referral::create(&node.actor, editor, referral)?)
    }

    /// Writes a referral just made here.
    fn send(&self, mut created: Referral) -> Result<(DocumentId, ChangeHash), NodeError> {
        let id = created.id();
        let changes = created.changes_since(&[]);
        let written = Written {
            doc: created.into_automerge(),
            bytes: 0,
            kind: None,
        };
        let hash = self
            .node
            .write_local(id, changes, Some(written), self.app)?;
        Ok((id, hash))
    }

    /// Redirects a referral this institution received to another member: sends the onward
    /// referral (`Referral::create_onward`), then writes the redirect on the original. Returns
    /// the redirect's change and the onward referral's id, once both are durable.
    ///
    /// The redirect is checked on the original before anything is written. The onward
    /// referral is written first: a crash between the two writes leaves it sent and the
    /// original not yet redirected, and the desk's second attempt finds that onward referral
    /// (same original, same member) instead of sending another. The onward referral is
    /// returned with the change that created it.
    pub fn redirect_referral(
        &self,
        id: DocumentId,
        editor: &Editor,
        to: &InstitutionId,
        reason: &str,
    ) -> Result<(ChangeHash, (DocumentId, ChangeHash)), NodeError> {
        let node = self.node;
        node.check_editor(editor)?;
        node.check_member(to)?;
        let _writing = node.lock_document(&id);
        let doc = node.document(id, DocumentKind::Referral)?;
        let mut referral = Referral::from_automerge(doc, &node.actor)?;
        let original = referral.view();
        let heads = referral.heads();
        referral.apply(
            editor,
            &ReferralOp::Redirect {
                to: to.clone(),
                reason: reason.to_owned(),
            },
        )?;
        let mut sent = None;
        for candidate in node.referrals_of(&original.patient)? {
            let view = node.referral(candidate)?;
            if view.redirected_from == Some(id) && view.to == *to && view.from == editor.institution
            {
                sent = Some(candidate);
                break;
            }
        }
        let onward = match sent {
            Some(onward) => {
                let created = node.history(onward)?.first().map(|entry| entry.change);
                (onward, created.ok_or(NodeError::UnknownDocument(onward))?)
            }
            None => {
                let onward = Referral::create_onward(&node.actor, editor, id, &original, to)?;
                self.send(onward)?
            }
        };
        let hash = node.write_local(id, referral.changes_since(&heads), None, self.app)?;
        Ok((hash, onward))
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
        if let HealthFileOp::Link { to, .. } = op {
            node.check_link(id, *to)?;
        }
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
        if let ReferralOp::Redirect { to, reason } = op {
            return Ok(self.redirect_referral(id, editor, to, reason)?.0);
        }
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

/// Threads that make and sign a bulk load's changes: one per core, at most this many.
const IMPORT_THREADS_MAX: usize = 8;

/// `make` over `items` on every core (items already `refused` are not made), in order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    refused: Vec<Option<NodeError>>,
    make: impl Fn(&T) -> Result<R, NodeError> + Sync,
) -> Vec<Result<R, NodeError>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, IMPORT_THREADS_MAX);
    let chunk = items.len().div_ceil(threads).max(1);
    let mut refused = refused.into_iter();
    let work: Vec<Vec<(&T, Option<NodeError>)>> = items
        .chunks(chunk)
        .map(|part| {
            part.iter()
                .map(|item| (item, refused.next().flatten()))
                .collect()
        })
        .collect();
    std::thread::scope(|scope| {
        let make = &make;
        let handles: Vec<_> = work
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(|(item, refused)| match refused {
                            Some(error) => Err(error),
                            None => make(item),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
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
    /// Moves a store that no longer opens (its storage engine refuses its damaged files)
    /// aside, to `store.damaged-<seconds since the epoch>` in the data directory, so the node
    /// starts with an empty store and fetches everything from its peers. The key and the witness
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
            config.store_engine,
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
        // A store of format 3 or older gets the desk index once the node is open, and one of
        // format 4 or older its residents' summaries.
        let (mut desks_due, mut summaries_due) = (false, false);
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
            desks_due = found < 4;
            summaries_due = found < 5;
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
        // Formats 4 and 6 are written once their conversions are done (`index_desks`,
        // `index_summaries`; format 6, audit runs, needs none of its own).
        let format: u32 = if desks_due {
            3
        } else if summaries_due {
            4
        } else {
            STORE_FORMAT
        };
        batch.put(keys::FORMAT, format.to_be_bytes().to_vec());
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
        for page in pages(&store, &[keys::PENDING_ORDER]) {
            for (key, value) in page? {
                let (Some(order), Some(usage)) =
                    (keys::parse_pending_order(&key), Usage::decode(&value))
                else {
                    return Err(StoreError::Corrupt {
                        what: "pending order key",
                    }
                    .into());
                };
                pending.add(order.bucket, usage);
                pending.next_sequence = pending.next_sequence.max(order.sequence + 1);
            }
        }
        let mut catalogue = Catalogue::default();
        for page in pages(&store, &[keys::CATALOGUE]) {
            for (key, digest) in page? {
                let (Some(id), Ok(digest)) = (
                    keys::parse_per_document(keys::CATALOGUE, &key).map(|id| *id.as_bytes()),
                    <[u8; 32]>::try_from(digest.as_slice()),
                ) else {
                    return Err(StoreError::Corrupt {
                        what: "catalogue entry",
                    }
                    .into());
                };
                catalogue.insert(id, digest);
            }
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
            decisions: crate::latency::Histogram::default(),
            salt,
            membership: tokio::sync::watch::channel(Arc::new(membership)).0,
            document_locks: (0..DOCUMENT_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            catalogue: RwLock::new(catalogue),
            local_changes: tokio::sync::broadcast::channel(LOCAL_CHANGES_QUEUE_MAX).0,
            audit_updates: tokio::sync::watch::Sender::new(audit_head.sequence),
            views: Mutex::new(Views::default()),
            urgent: Mutex::new(urgent::Urgent::default()),
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
        if desks_due {
            node.index_desks()?;
        }
        if summaries_due {
            node.index_summaries()?;
        }
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
            // Readers keep the roster held until the new one is durable.
            let _decisions = self.lock_ledger();
            let membership = self.membership();
            // The roster held, encoded otherwise.
            if membership.is_same_roster(&offered) {
                let version = membership.version();
                return Ok(RosterUpdate::AlreadyHeld { version });
            }
            let newer = membership.replaced_by(offered)?;
            let mut batch = Batch::default();
            batch.put(keys::ROSTER, newer.encoded().to_vec());
            self.commit.commit(&self.store, batch)?;
            let version = newer.version();
            self.membership.send_replace(Arc::new(newer));
            version
        };
        self.catch_up_revocations()?;
        Ok(RosterUpdate::Adopted { version })
    }

    /// The roster in force: its institutions, revocations and erasures.
    pub fn roster_view(&self) -> crate::model::RosterView {
        self.membership().view().clone()
    }

    /// How long decisions take, from a change's arrival in the pipeline to its durable
    /// decision.
    pub fn decision_latency(&self) -> &crate::latency::Histogram {
        &self.decisions
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

    /// Durable local writes from now on, for the network layer to publish.
    pub fn local_changes(&self) -> tokio::sync::broadcast::Receiver<LocalChange> {
        self.local_changes.subscribe()
    }

    fn membership(&self) -> Arc<Membership> {
        Arc::clone(&self.membership.borrow())
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
            store_engine: Default::default(),
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
        // An edit that leaves the names and ids alone writes no index entry: the one blanked
        // above stays blank (and is still answered from the file) until the name moves.
        let entry_value = || node.store.scan_from(&key, &key, 1).unwrap().remove(0).1;
        node.apply_health_file(
            id,
            &editor,
            &HealthFileOp::AddAllergy(crate::model::NewAllergy {
                substance: "penicillin".into(),
                reaction: "rash".into(),
                severity: crate::model::Severity::Mild,
            }),
        )
        .unwrap();
        assert!(entry_value().is_empty());
        assert_eq!(
            node.search_residents_by_name("shi").unwrap(),
            [summary(Sex::Female, "Shi")]
        );
        edit(DemographicField::Sex(Sex::Male));
        assert!(!entry_value().is_empty());
        assert_eq!(
            node.search_residents_by_name("shi").unwrap(),
            [summary(Sex::Male, "Shi")]
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
    fn the_cache_evicts_the_least_recently_used_document() {
        let id = |n: u64| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            DocumentId::from_bytes(id)
        };
        let mut cache = Documents::default();
        for n in 0..CACHE_DOCUMENTS_MAX as u64 {
            cache.insert(id(n), cached(1));
        }
        // The first is used again, the second taken out and put back: the third is now the
        // least recently used, then the first of the rest.
        assert!(cache.touch(&id(0)).is_some());
        let second = cache.remove(&id(1)).unwrap();
        cache.insert(id(1), second);
        let full = CACHE_DOCUMENTS_MAX as u64;
        cache.insert(id(full), cached(1));
        assert!(!cache.documents.contains_key(&id(2)));
        cache.insert(id(full + 1), cached(1));
        assert!(!cache.documents.contains_key(&id(3)));
        for kept in [0, 1, 4, full, full + 1] {
            assert!(
                cache.documents.contains_key(&id(kept)),
                "{kept} was evicted"
            );
        }
        assert_eq!(cache.documents.len(), CACHE_DOCUMENTS_MAX);
        assert_eq!(cache.bytes, CACHE_DOCUMENTS_MAX);
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

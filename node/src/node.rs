//! A node's core: its identity, roster, durable store, and the one ingest pipeline that every
//! change goes through — a local write as much as a peer's.
//!
//! Pipeline: verify the envelope's signature → the author is a member (or within its
//! revocation cut-off) → a creation change names its own document → dependencies accepted
//! (otherwise held as pending, bounded) and none quarantined → apply to the document at the
//! change's own dependencies and `validate_change` → accept (store, durable) or quarantine
//! with the reason. Every decision depends only on the change, its history and the roster.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::audit::{self, AuditAction, AuditHead, AuditRecord};
use crate::envelope::{Envelope, EnvelopeError, VerifiedChange};
use crate::identity::{Identity, IdentityError};
use crate::index;
use crate::membership::{Admission, Membership, RosterError, SignedRoster};
use crate::model::automerge::{AutoCommit, Change, ChangeHash};
use crate::model::{
    Bytes32, Demographics, DocumentId, DocumentKind, Editor, HealthFile, HealthFileOp,
    HealthFileView, InstitutionId, NewReferral, OpError, Referral, ReferralOp, ReferralView,
    document_id_of, validate, validate_change_view,
};
use crate::reconcile::Catalogue;
use crate::store::{Batch, GroupCommit, KeyValue, StoreError, WITNESS_FILE, WitnessedStore};

/// Most documents held decoded in memory at once.
pub const CACHE_DOCUMENTS_MAX: usize = 1_024;
/// Most bytes of stored envelopes held decoded in memory at once (the cache's budget).
pub const CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// A document's snapshot is rewritten when the node's accepted count is a multiple of this
/// (and at creation): saving a whole document on every change costs more than replaying a few
/// envelopes at load.
pub const SNAPSHOT_EVERY_CHANGES: u64 = 16;
/// Most changes kept in quarantine. Past it, a change that would be quarantined is refused
/// with `IngestError::QuarantineFull` and not stored: the decision is the same, only the record
/// is not kept, so a faulty member cannot fill the disk.
pub const QUARANTINE_CHANGES_MAX: usize = 100_000;
/// Stripes of the per-document write lock.
const DOCUMENT_LOCK_STRIPES: usize = 64;
/// Most changes held waiting for their dependencies.
pub const PENDING_CHANGES_MAX: usize = 10_000;
/// Local changes queued for the network layer to publish; a subscriber that falls further
/// behind misses the oldest (anti-entropy carries them instead).
pub const LOCAL_CHANGES_QUEUE_MAX: usize = 4_096;
/// Most changes of one revoked key held until the node can tell whether they are within the
/// revocation's cut-off; past it, the key's changes are refused and not kept.
pub const REVOKED_HELD_PER_KEY_MAX: usize = 256;
/// The store's folder in the data directory.
pub const STORE_DIR: &str = "store";
/// The layout of the store this release writes. A release that changes key layouts or record
/// encodings raises it and converts older stores at open.
pub const STORE_FORMAT: u32 = 1;
/// Audit records read at a time when the whole log is checked.
const AUDIT_PAGE_RECORDS: usize = 4_096;

/// Key prefixes of the store's keyspaces (one tree, so batches across them are atomic).
mod keys {
    /// `e ‖ document ‖ change hash` → envelope.
    pub const ENVELOPE: u8 = b'e';
    /// `d ‖ document` → document record (kind, heads).
    pub const DOCUMENT: u8 = b'd';
    /// `s ‖ document` → compacted snapshot (automerge `save()`), loaded instead of replaying
    /// and re-verifying every envelope.
    pub const SNAPSHOT: u8 = b's';
    /// `c ‖ document` → SHA-256 of the sorted heads: the catalogue reconciliation reads.
    pub const CATALOGUE: u8 = b'c';
    /// `q ‖ change hash` → quarantine record.
    pub const QUARANTINE: u8 = b'q';
    /// `f ‖ SHA-256(envelope)` → quarantine record of an envelope refused for its signature
    /// or its author (forged, or a stranger's). Keyed by the envelope, not the change it
    /// claims, so a forgery never blocks the genuine change.
    pub const REFUSED: u8 = b'f';
    /// `p ‖ change hash` → pending record.
    pub const PENDING: u8 = b'p';
    /// `w ‖ missing dependency ‖ change hash` → nothing: which pending changes wait for what,
    /// so a decision wakes only the changes waiting for it.
    pub const WAITING: u8 = b'w';
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
    /// The store layout's version (u32, big-endian).
    pub const FORMAT: &[u8] = b"m/format";

    pub fn envelope(document: &super::DocumentId, hash: &super::ChangeHash) -> Vec<u8> {
        [&[ENVELOPE][..], document.as_bytes(), &hash.0].concat()
    }
    pub fn per_document(prefix: u8, document: &super::DocumentId) -> Vec<u8> {
        [&[prefix][..], document.as_bytes()].concat()
    }
    pub fn per_change(prefix: u8, hash: &super::ChangeHash) -> Vec<u8> {
        [&[prefix][..], &hash.0].concat()
    }
    /// `v ‖ change hash ‖ revoked key` → document: the change is one of the key's cut-off
    /// heads or an ancestor of one, so a change of that key here is within the cut-off.
    pub const VOUCHED: u8 = b'v';
    /// `h ‖ revoked key ‖ change hash` → nothing: the key's changes held until this node can
    /// tell whether they are within its cut-off (at most `REVOKED_HELD_PER_KEY_MAX` per key).
    pub const HELD: u8 = b'h';
    /// `u ‖ author ‖ document` → nothing: the documents each key has changes accepted in, so
    /// a revocation reaches only the documents it concerns.
    pub const AUTHOR: u8 = b'u';
    /// `m/revocation/ ‖ key` → nothing: revocations whose withdrawals are complete.
    pub const REVOCATION_APPLIED: &[u8] = b"m/revocation/";

    pub fn waiting(dependency: &[u8; 32], hash: &super::ChangeHash) -> Vec<u8> {
        [&[WAITING][..], dependency, &hash.0].concat()
    }
    pub fn vouched(hash: &super::ChangeHash, key: &super::Bytes32) -> Vec<u8> {
        [&[VOUCHED][..], &hash.0, &key.0].concat()
    }
    pub fn held(key: &super::Bytes32, hash: &super::ChangeHash) -> Vec<u8> {
        [&[HELD][..], &key.0, &hash.0].concat()
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
    /// Too many changes already wait for their dependencies.
    #[error("{PENDING_CHANGES_MAX} changes already wait for dependencies; retry after catching up")]
    PendingFull,
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

/// A quarantined change as operators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The change.
    pub change: [u8; 32],
    /// Its document.
    pub document: DocumentId,
    /// Why it was refused (names fields and rules, never content).
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
struct QuarantineRecord {
    document: DocumentId,
    /// For a refused envelope, the change it claims to carry.
    #[serde(default)]
    claimed: Option<[u8; 32]>,
    reason: String,
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct PendingRecord {
    document: DocumentId,
    /// The dependencies it waits for, when it was parked.
    missing: Vec<[u8; 32]>,
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
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
/// loaded documents.
#[derive(Default)]
struct Cache {
    documents: HashMap<DocumentId, Cached>,
    bytes: usize,
    clock: u64,
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
}

impl Cache {
    fn touch(&mut self, id: &DocumentId) -> Option<&mut Cached> {
        self.clock += 1;
        let clock = self.clock;
        let cached = self.documents.get_mut(id)?;
        cached.used = clock;
        Some(cached)
    }

    /// Inserts a document as the most recently used, then evicts the least recently used
    /// others until the cache is within its bounds. The document just inserted is never the
    /// one evicted.
    fn insert(&mut self, id: DocumentId, mut cached: Cached) {
        if let Some(old) = self.documents.remove(&id) {
            self.bytes -= old.bytes;
        }
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
            if let Some(evicted) = self.documents.remove(&oldest) {
                self.bytes -= evicted.bytes;
            }
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
    institution: InstitutionId,
    authority: Bytes32,
    store: WitnessedStore,
    commit: GroupCommit,
    /// Acknowledged changes the store lost before this open (see `WitnessedStore`).
    lost_at_open: std::sync::atomic::AtomicU64,
    /// Salt of the national-id index; random per node, so the index is useless elsewhere.
    salt: [u8; 32],
    membership: RwLock<Membership>,
    /// Document state; held while deciding and applying a change, never while flushing.
    cache: Mutex<Cache>,
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
        let node = Self {
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
            cache: Mutex::new(Cache {
                accepted,
                audit: audit_head,
                quarantined: quarantined_at_open,
                ..Cache::default()
            }),
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
            let _decisions = self.lock_cache();
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
        self.check_editor(editor)?;
        let mut file = HealthFile::create(&self.identity.actor(), editor, demographics)?;
        let id = file.id();
        let hash = self.write_local(id, file.changes_since(&[]))?;
        Ok((id, hash))
    }

    /// Sends a referral from this node's institution. Returns once it is durable.
    pub fn create_referral(
        &self,
        editor: &Editor,
        referral: &NewReferral,
    ) -> Result<(DocumentId, ChangeHash), NodeError> {
        self.check_editor(editor)?;
        let mut created = Referral::create(&self.identity.actor(), editor, referral)?;
        let id = created.id();
        let hash = self.write_local(id, created.changes_since(&[]))?;
        Ok((id, hash))
    }

    /// Applies a typed edit to a health file. Returns the change's hash once it is durable.
    pub fn apply_health_file(
        &self,
        id: DocumentId,
        editor: &Editor,
        op: &HealthFileOp,
    ) -> Result<ChangeHash, NodeError> {
        self.check_editor(editor)?;
        let _writing = self.lock_document(&id);
        let doc = self.document(id, DocumentKind::HealthFile)?;
        let mut file = HealthFile::from_automerge(doc, &self.identity.actor())?;
        let heads = file.heads();
        file.apply(editor, op)?;
        self.write_local(id, file.changes_since(&heads))
    }

    /// Applies a typed edit to a referral. Returns the change's hash once it is durable.
    pub fn apply_referral(
        &self,
        id: DocumentId,
        editor: &Editor,
        op: &ReferralOp,
    ) -> Result<ChangeHash, NodeError> {
        self.check_editor(editor)?;
        let _writing = self.lock_document(&id);
        let doc = self.document(id, DocumentKind::Referral)?;
        let mut referral = Referral::from_automerge(doc, &self.identity.actor())?;
        let heads = referral.heads();
        referral.apply(editor, op)?;
        self.write_local(id, referral.changes_since(&heads))
    }

    /// The typed view of a health file.
    pub fn health_file(&self, id: DocumentId) -> Result<HealthFileView, NodeError> {
        let _writing = self.lock_document(&id);
        let doc = self.document(id, DocumentKind::HealthFile)?;
        Ok(HealthFile::from_automerge(doc, &self.identity.actor())?.view())
    }

    /// The typed view of a referral.
    pub fn referral(&self, id: DocumentId) -> Result<ReferralView, NodeError> {
        let _writing = self.lock_document(&id);
        let doc = self.document(id, DocumentKind::Referral)?;
        Ok(Referral::from_automerge(doc, &self.identity.actor())?.view())
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
        let mut by_hash: HashMap<[u8; 32], Vec<u8>> = HashMap::new();
        for (key, envelope) in self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, &id))?
        {
            let (_, hash) = parse_envelope_key(&key).ok_or(StoreError::Corrupt {
                what: "envelope key",
            })?;
            by_hash.insert(hash.0, envelope);
        }
        let Some(mut doc) = self.sync_document(id)? else {
            return Ok(by_hash.into_values().collect());
        };
        let mut ordered = Vec::with_capacity(by_hash.len());
        for change in doc.get_changes(&[]) {
            if let Some(envelope) = by_hash.remove(&change.hash().0) {
                ordered.push(envelope);
            }
        }
        // Anything the document does not hold (damage `verify` reports) goes last.
        ordered.extend(by_hash.into_values());
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
        let mut cache = self.lock_cache();
        Ok(self.load(&mut cache, &id)?.map(|(doc, _)| doc))
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
            if let Some(bytes) = self.store.get(&keys::envelope(&id, hash))? {
                let envelope = Envelope::decode(&bytes)
                    .map_err(|_| StoreError::Corrupt { what: "envelope" })?;
                let signature: [u8; 64] = envelope
                    .signature
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt { what: "envelope" })?;
                found.push((*hash, signature));
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
        let mut records = self.store.scan_prefix(&[keys::QUARANTINE])?;
        records.extend(self.store.scan_prefix(&[keys::REFUSED])?);
        records
            .into_iter()
            .map(|(key, value)| {
                let record: QuarantineRecord = decode(&value, "quarantine record")?;
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
                })
            })
            .collect()
    }

    /// How many changes wait for their dependencies.
    pub fn pending_count(&self) -> Result<usize, NodeError> {
        Ok(self.store.keys_with_prefix(&[keys::PENDING])?.len())
    }

    /// The dependencies that changes of `document` held pending wait for and this node does
    /// not hold: what to ask peers for by name.
    pub fn missing_dependencies(&self, document: DocumentId) -> Result<Vec<ChangeHash>, NodeError> {
        // Most of the time nothing is pending and this is one empty prefix scan.
        let mut missing = BTreeSet::new();
        for (_, value) in self.store.scan_prefix(&[keys::PENDING])? {
            let record: PendingRecord = decode(&value, "pending record")?;
            if record.document != document {
                continue;
            }
            for dependency in record.missing {
                let hash = ChangeHash(dependency);
                let held = self.has_change(document, &hash)?
                    || self
                        .store
                        .get(&keys::per_change(keys::PENDING, &hash))?
                        .is_some();
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
        for key in self.store.keys_with_prefix(&[keys::PENDING])? {
            let Some(value) = self.store.get(&key)? else {
                continue;
            };
            let record: PendingRecord = decode(&value, "pending record")?;
            let mut change = [0u8; 32];
            change.copy_from_slice(key.get(1..33).ok_or(StoreError::Corrupt {
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

    /// Runs envelopes through the pipeline in order, under one decision lock and one flush:
    /// how a peer's batch (a sync message, a fetch) is ingested. Returns one outcome per
    /// envelope once all the decisions are durable; fails as a whole only if the flush fails.
    pub fn ingest_many<E: AsRef<[u8]>>(
        &self,
        envelopes: &[E],
    ) -> Result<Vec<Result<Ingested, IngestError>>, IngestError> {
        // Signatures are checked before taking the lock.
        let verified: Vec<_> = envelopes
            .iter()
            .map(|e| Envelope::verify(e.as_ref()))
            .collect();
        let (outcomes, ticket) = {
            let mut cache = self.lock_cache();
            // A duplicate's first copy may not be durable yet: wait for everything applied so
            // far, not only for what this call applies.
            let mut ticket = self.commit.applied();
            let mut outcomes = Vec::with_capacity(verified.len());
            for (verified, encoded) in verified.into_iter().zip(envelopes) {
                let outcome = match verified {
                    Ok(verified) => self.decide(&mut cache, verified, &mut ticket),
                    Err(EnvelopeError::BadSignature | EnvelopeError::NotANodeKey) => self.refuse(
                        &mut cache,
                        &mut ticket,
                        encoded.as_ref(),
                        "the signature does not verify against the change's author",
                    ),
                    Err(error) => Err(error.into()),
                };
                // A decision may settle the dependencies of pending changes, accepted or not.
                if let Ok(Ingested::Accepted(hash) | Ingested::Quarantined(hash, _)) = &outcome {
                    cache.woken.push_back(*hash);
                }
                self.settle(&mut cache, &mut ticket);
                outcomes.push(outcome);
            }
            (outcomes, ticket)
        };
        // Decisions were applied in order under the lock; one flush makes them all durable,
        // shared with concurrent writers, without holding the lock while the disk works.
        if ticket > 0 {
            self.commit.wait_durable(&self.store, ticket)?;
            self.audit_updates
                .send_replace(self.lock_cache().audit.sequence);
        }
        Ok(outcomes)
    }

    fn write_local(
        &self,
        id: DocumentId,
        mut changes: Vec<Change>,
    ) -> Result<ChangeHash, NodeError> {
        let Some(mut change) = changes.pop() else {
            // The operation changed nothing (for instance removing an absent allergy).
            return self
                .heads(id)?
                .first()
                .copied()
                .ok_or(NodeError::UnknownDocument(id));
        };
        debug_assert!(changes.is_empty(), "a typed operation makes one change");
        let envelope = Envelope::sign(&self.identity, id, &mut change).encode();
        match self.ingest(&envelope)? {
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
            Ingested::Duplicate(hash) => Ok(hash),
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

    /// Decides one verified change and applies the writes it needs; `ticket` is then the
    /// group-commit ticket to wait on for durability.
    fn decide(
        &self,
        cache: &mut Cache,
        verified: VerifiedChange,
        ticket: &mut u64,
    ) -> Result<Ingested, IngestError> {
        let (id, hash) = (verified.document, verified.hash);
        if self.store.get(&keys::envelope(&id, &hash))?.is_some() {
            return Ok(Ingested::Duplicate(hash));
        }
        if let Some(value) = self.store.get(&keys::per_change(keys::QUARANTINE, &hash))? {
            let record: QuarantineRecord = decode(&value, "quarantine record")?;
            return Ok(Ingested::Quarantined(hash, record.reason));
        }
        // Whether a change is within a revoked key's cut-off is settled by its descendants: a
        // cut-off head, or a change marked as the ancestor of one, vouches for its own
        // ancestors, whoever wrote it and whatever becomes of it.
        let vouchers = self.vouchers(&hash)?;
        if !vouchers.is_empty() {
            self.vouch(cache, ticket, &vouchers, id, hash, verified.change.deps())?;
        }
        let admission = {
            let membership = self.membership();
            membership.admit(&verified.author, &hash)
        };
        let author = match admission {
            Admission::Member(institution) | Admission::WithinCutoff(institution) => institution,
            Admission::Revoked { institution, key } if vouchers.contains(&key) => institution,
            Admission::Revoked { key, .. } => {
                return self.past_revocation(cache, ticket, &verified, key);
            }
            Admission::Stranger => {
                return self.refuse(
                    cache,
                    ticket,
                    &verified.encoded,
                    "the change's author is not a member of the consortium",
                );
            }
        };
        let deps = verified.change.deps().to_vec();
        if deps.is_empty() && document_id_of(&hash) != id {
            return self.quarantined(
                cache,
                ticket,
                &verified,
                "a creation change for another document",
            );
        }
        for dep in &deps {
            if self
                .store
                .get(&keys::per_change(keys::QUARANTINE, dep))?
                .is_some()
            {
                return self.quarantined(
                    cache,
                    ticket,
                    &verified,
                    "it depends on a quarantined change",
                );
            }
        }
        let mut missing = Vec::new();
        for dep in &deps {
            if self.store.get(&keys::envelope(&id, dep))?.is_none() {
                missing.push(dep.0);
            }
        }
        if !missing.is_empty() {
            if self.store.keys_with_prefix(&[keys::PENDING])?.len() >= PENDING_CHANGES_MAX {
                return Err(IngestError::PendingFull);
            }
            let mut batch = Batch::default();
            forget_waits(&mut batch, &verified);
            for dependency in &missing {
                batch.put(keys::waiting(dependency, &hash), Vec::new());
            }
            let record = PendingRecord {
                document: id,
                missing,
                envelope: verified.encoded.clone(),
            };
            batch.put(keys::per_change(keys::PENDING, &hash), encode(&record));
            *ticket = self.commit.apply(&self.store, batch)?;
            return Ok(Ingested::Pending(hash));
        }

        // The document is taken out of the cache, not copied; it goes back once decided.
        let (mut current, mut cached_bytes) = if deps.is_empty() {
            (AutoCommit::new(), 0)
        } else {
            let (doc, _, bytes) = self.take(cache, &id)?.ok_or(StoreError::Corrupt {
                what: "document record",
            })?;
            (doc, bytes)
        };
        // Usually a change builds on the document as this node holds it: then the document is
        // its `before` as it is, and `after` becomes the document. Otherwise it is judged at
        // its own dependencies and merged after.
        let on_current = {
            let mut heads = current.get_heads();
            let mut wanted = deps.clone();
            heads.sort();
            wanted.sort();
            heads == wanted
        };
        let judged_at = if on_current {
            None
        } else {
            // `fork_at` reads only what this node accepted; contained all the same.
            let forked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| current.fork_at(&deps)));
            Some(
                forked
                    .ok()
                    .and_then(Result::ok)
                    .ok_or(StoreError::Corrupt {
                        what: "document history",
                    })?,
            )
        };
        let before = judged_at.as_ref().unwrap_or(&current);
        let mut after = before.clone();
        let verdict = if !applies(&mut after, &verified.change) {
            Err("the change does not apply to its dependencies".to_string())
        } else {
            validate_change_view(before, &after, &author).map_err(|error| error.to_string())
        };
        let view = match verdict {
            Err(reason) => {
                self.put_back(cache, id, current, cached_bytes);
                return self.quarantined(cache, ticket, &verified, &reason);
            }
            Ok(view) if on_current => {
                current = after;
                view
            }
            Ok(_) => {
                // Judged at its dependencies; merged into a document that holds more.
                let mut merged = current.clone();
                let merged_view = if !applies(&mut merged, &verified.change) {
                    Err("the change does not apply to the document".to_string())
                } else {
                    // Per-change checks keep merged states valid; check rather than assume.
                    crate::model::view(&merged)
                        .map_err(|error| format!("merging it breaks the document: {error}"))
                };
                match merged_view {
                    Ok(view) => {
                        current = merged;
                        view
                    }
                    Err(reason) => {
                        self.put_back(cache, id, current, cached_bytes);
                        return self.quarantined(cache, ticket, &verified, &reason);
                    }
                }
            }
        };
        let kind = view.kind();
        cached_bytes += verified.encoded.len();
        let heads = current.get_heads();
        let mut batch = Batch::default();
        batch.put(keys::envelope(&id, &hash), verified.encoded.clone());
        // A new snapshot every `SNAPSHOT_EVERY_CHANGES` changes; a load replays only the
        // envelopes the snapshot lacks.
        if cache.accepted.is_multiple_of(SNAPSHOT_EVERY_CHANGES) || deps.is_empty() {
            batch.put(keys::per_document(keys::SNAPSHOT, &id), current.save());
        }
        let record = DocumentRecord {
            kind,
            heads: heads.iter().map(|h| h.0).collect(),
        };
        batch.put(keys::per_document(keys::DOCUMENT, &id), encode(&record));
        batch.put(
            keys::per_document(keys::CATALOGUE, &id),
            catalogue_digest(&heads).to_vec(),
        );
        batch.delete(keys::per_change(keys::PENDING, &hash));
        forget_waits(&mut batch, &verified);
        batch.put(keys::author(&verified.author, &id), Vec::new());
        batch.put(keys::ACCEPTED, (cache.accepted + 1).to_be_bytes().to_vec());
        self.reindex(&mut batch, &id, &view)?;
        let head = self.append_audit(
            &mut batch,
            cache.audit,
            AuditAction::Accepted,
            (verified.document, verified.hash),
            Some(author),
        );
        *ticket = self.commit.apply(&self.store, batch)?;
        self.catalogue_mut()
            .insert(*id.as_bytes(), catalogue_digest(&heads));
        cache.audit = head;
        cache.accepted += 1;
        self.store.set_accepted(cache.accepted);
        cache.insert(
            id,
            Cached {
                doc: current,
                kind,
                bytes: cached_bytes,
                used: 0,
            },
        );
        cache.touch(&id);
        Ok(Ingested::Accepted(hash))
    }

    fn quarantined(
        &self,
        cache: &mut Cache,
        ticket: &mut u64,
        verified: &VerifiedChange,
        reason: &str,
    ) -> Result<Ingested, IngestError> {
        if cache.quarantined >= QUARANTINE_CHANGES_MAX {
            tracing::warn!(document = %verified.document, change = %verified.hash, reason, "change refused; the quarantine is full");
            return Err(IngestError::QuarantineFull);
        }
        tracing::info!(document = %verified.document, change = %verified.hash, reason, "change quarantined");
        let record = QuarantineRecord {
            document: verified.document,
            claimed: None,
            reason: reason.to_string(),
            envelope: verified.encoded.clone(),
        };
        let mut batch = Batch::default();
        batch.put(
            keys::per_change(keys::QUARANTINE, &verified.hash),
            encode(&record),
        );
        batch.delete(keys::per_change(keys::PENDING, &verified.hash));
        forget_waits(&mut batch, verified);
        let institution = self.membership().institution_of(&verified.author);
        let head = self.append_audit(
            &mut batch,
            cache.audit,
            AuditAction::Quarantined,
            (verified.document, verified.hash),
            institution,
        );
        *ticket = self.commit.apply(&self.store, batch)?;
        cache.audit = head;
        cache.quarantined += 1;
        Ok(Ingested::Quarantined(verified.hash, reason.to_string()))
    }

    /// Quarantines an envelope refused for its signature or its author. It is kept under its
    /// own digest: the change it claims may be genuine and arrive later, properly signed.
    /// An envelope whose change does not decode cannot be attributed and is refused with a
    /// typed error instead.
    fn refuse(
        &self,
        cache: &mut Cache,
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
        if cache.quarantined >= QUARANTINE_CHANGES_MAX {
            return Err(IngestError::QuarantineFull);
        }
        tracing::info!(%document, %change, reason, "envelope refused and quarantined");
        let record = QuarantineRecord {
            document,
            claimed: Some(change.0),
            reason: reason.to_string(),
            envelope: encoded.to_vec(),
        };
        let mut batch = Batch::default();
        batch.put(key, encode(&record));
        let head = self.append_audit(
            &mut batch,
            cache.audit,
            AuditAction::Quarantined,
            (document, change),
            None,
        );
        *ticket = self.commit.apply(&self.store, batch)?;
        cache.audit = head;
        cache.quarantined += 1;
        Ok(Ingested::Quarantined(change, reason.to_string()))
    }

    /// Decides the pending changes that waited for `decided`, and in turn those that waited
    /// for them. Only changes waiting for a decided change are read: the cost follows what a
    /// decision settles, not how many changes wait. A pending record that can no longer be
    /// decided (damaged, or its author no longer in the roster) is dropped with a log line: a
    /// peer will offer it again if it matters. Errors here never fail the ingest that
    /// triggered the retry.
    fn retry_pending(&self, cache: &mut Cache, ticket: &mut u64, decided: ChangeHash) {
        if let Err(error) = self.retry_pending_inner(cache, ticket, decided) {
            tracing::warn!(%error, "retrying pending changes stopped early");
        }
    }

    /// Decides what the decisions so far unblocked: pending changes whose dependencies were
    /// settled, held changes of a revoked key that were just vouched for, and — once a
    /// revoked key's cut-off can be drawn — every change of that key still held. Errors are
    /// logged, never returned: they must not fail the call that triggered the work.
    fn settle(&self, cache: &mut Cache, ticket: &mut u64) {
        loop {
            if let Some(hash) = cache.woken.pop_front() {
                self.retry_pending(cache, ticket, hash);
            } else if let Some(key) = cache.recheck.pop_first() {
                match self.held_past_cutoff(&key) {
                    Ok(held) => cache.woken.extend(held),
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
        cache: &mut Cache,
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
                let Some(envelope) = self.held_envelope(&hash)? else {
                    continue;
                };
                if self.store.get(&keys::held(key, &hash))?.is_some() {
                    cache.woken.push_back(hash);
                }
                if let Ok(held) = Envelope::verify(&envelope) {
                    next.extend(held.change.deps());
                }
            }
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        cache.recheck.extend(vouchers.iter().copied());
        Ok(())
    }

    /// The envelope of a change held here but not accepted (pending or quarantined).
    fn held_envelope(&self, hash: &ChangeHash) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.store.get(&keys::per_change(keys::PENDING, hash))? {
            return Ok(Some(
                decode::<PendingRecord>(&value, "pending record")?.envelope,
            ));
        }
        if let Some(value) = self.store.get(&keys::per_change(keys::QUARANTINE, hash))? {
            return Ok(Some(
                decode::<QuarantineRecord>(&value, "quarantine record")?.envelope,
            ));
        }
        Ok(None)
    }

    /// A change of a revoked key that nothing here vouches for: past the cut-off once the
    /// cut-off can be drawn here, held until then (bounded per key).
    fn past_revocation(
        &self,
        cache: &mut Cache,
        ticket: &mut u64,
        verified: &VerifiedChange,
        key: Bytes32,
    ) -> Result<Ingested, IngestError> {
        if self.cutoff_drawn(&key)? {
            return self.quarantined(
                cache,
                ticket,
                verified,
                "the author's key was revoked and this change is not within the revocation's cut-off",
            );
        }
        let hash = verified.hash;
        let held = keys::held(&key, &hash);
        if self.store.get(&held)?.is_none() {
            let prefix = [&[keys::HELD][..], &key.0].concat();
            if self.store.keys_with_prefix(&prefix)?.len() >= REVOKED_HELD_PER_KEY_MAX {
                return Err(IngestError::RevokedBacklogFull);
            }
            if self.store.keys_with_prefix(&[keys::PENDING])?.len() >= PENDING_CHANGES_MAX {
                return Err(IngestError::PendingFull);
            }
        }
        let record = PendingRecord {
            document: verified.document,
            missing: Vec::new(),
            envelope: verified.encoded.clone(),
        };
        let mut batch = Batch::default();
        batch.put(keys::per_change(keys::PENDING, &hash), encode(&record));
        // Waiting for itself: woken when vouched for or when the cut-off can be drawn.
        batch.put(keys::waiting(&hash.0, &hash), Vec::new());
        batch.put(held, Vec::new());
        *ticket = self.commit.apply(&self.store, batch)?;
        Ok(Ingested::Pending(hash))
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
                || self.held_envelope(&hash)?.is_some();
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
            let mut cache = self.lock_cache();
            let mut ticket = self.commit.applied();
            for key in self.store.keys_with_prefix(&[keys::WAITING])? {
                if key.len() == 65 && key[1..33] == key[33..65] {
                    let mut hash = [0u8; 32];
                    hash.copy_from_slice(&key[33..65]);
                    cache.woken.push_back(ChangeHash(hash));
                }
            }
            self.apply_revocations(&mut cache, &mut ticket)?;
            self.settle(&mut cache, &mut ticket);
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
    fn apply_revocations(&self, cache: &mut Cache, ticket: &mut u64) -> Result<(), NodeError> {
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
                if let Some(envelope) = self.held_envelope(&head)?
                    && let Ok(held) = Envelope::verify(&envelope)
                {
                    self.vouch(
                        cache,
                        ticket,
                        &[key],
                        held.document,
                        head,
                        held.change.deps(),
                    )?;
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
                self.withdraw(cache, ticket, &key, &cutoff, document)?;
            }
            let mut batch = Batch::default();
            batch.put(applied, Vec::new());
            *ticket = self.commit.apply(&self.store, batch)?;
            cache.recheck.insert(key);
        }
        Ok(())
    }

    /// Withdraws from `document` the changes of revoked `key` that are not within its
    /// cut-off as far as this node can tell, with every change built on them. They become
    /// pending records in the same atomic batch that rewrites the document, so none is lost,
    /// and are then decided again (quarantined, or held until the cut-off can be drawn).
    fn withdraw(
        &self,
        cache: &mut Cache,
        ticket: &mut u64,
        key: &Bytes32,
        cutoff: &BTreeSet<Bytes32>,
        document: DocumentId,
    ) -> Result<(), NodeError> {
        let Some((mut doc, kind, bytes)) = self.take(cache, &document)? else {
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
            let past_cutoff = change.actor_id().to_bytes() == key.0 && !within.contains(&hash);
            if past_cutoff || change.deps().iter().any(|d| gone.contains(d)) {
                gone.insert(hash);
                withdrawn.push(hash);
            } else {
                kept.push(change);
            }
        }
        if withdrawn.is_empty() {
            self.put_back(cache, document, doc, bytes);
            *ticket = self.commit.apply(&self.store, batch)?;
            return Ok(());
        }
        let mut audit_head = cache.audit;
        let mut withdrawn_bytes = 0;
        for hash in &withdrawn {
            let envelope_key = keys::envelope(&document, hash);
            let envelope = self
                .store
                .get(&envelope_key)?
                .ok_or(StoreError::Corrupt { what: "envelope" })?;
            let verified = Envelope::verify(&envelope)
                .map_err(|_| StoreError::Corrupt { what: "envelope" })?;
            withdrawn_bytes += envelope.len();
            batch.delete(envelope_key);
            let record = PendingRecord {
                document,
                missing: Vec::new(),
                envelope,
            };
            batch.put(keys::per_change(keys::PENDING, hash), encode(&record));
            batch.put(keys::waiting(&hash.0, hash), Vec::new());
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
            batch.put(
                keys::per_document(keys::SNAPSHOT, &document),
                rebuilt.save(),
            );
            let record = DocumentRecord {
                kind,
                heads: heads.iter().map(|h| h.0).collect(),
            };
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
                index::keys_of(&self.salt, &document, &view),
            )?;
        }
        *ticket = self.commit.apply(&self.store, batch)?;
        if heads.is_empty() {
            self.catalogue_mut().remove(document.as_bytes());
        } else {
            self.catalogue_mut()
                .insert(*document.as_bytes(), catalogue_digest(&heads));
        }
        cache.audit = audit_head;
        tracing::warn!(%document, withdrawn = withdrawn.len(), "changes withdrawn after a revocation");
        if !heads.is_empty() {
            cache.insert(
                document,
                Cached {
                    doc: rebuilt,
                    kind,
                    bytes: bytes.saturating_sub(withdrawn_bytes),
                    used: 0,
                },
            );
        }
        cache.woken.extend(withdrawn);
        Ok(())
    }

    fn retry_pending_inner(
        &self,
        cache: &mut Cache,
        ticket: &mut u64,
        decided: ChangeHash,
    ) -> Result<(), IngestError> {
        let mut settled = vec![decided];
        while let Some(dependency) = settled.pop() {
            for key in self
                .store
                .keys_with_prefix(&[&[keys::WAITING][..], &dependency.0].concat())?
            {
                let Some(hash) = key
                    .get(33..65)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .map(ChangeHash)
                else {
                    continue;
                };
                let pending_key = keys::per_change(keys::PENDING, &hash);
                let Some(value) = self.store.get(&pending_key)? else {
                    self.drop_keys(vec![key], ticket)?;
                    continue;
                };
                let Ok(record) = decode::<PendingRecord>(&value, "pending record") else {
                    self.drop_keys(vec![key, pending_key], ticket)?;
                    continue;
                };
                // Still waiting for another of its dependencies?
                let mut ready = true;
                for missing in &record.missing {
                    let missing = ChangeHash(*missing);
                    let accepted = self
                        .store
                        .get(&keys::envelope(&record.document, &missing))?
                        .is_some();
                    let refused = self
                        .store
                        .get(&keys::per_change(keys::QUARANTINE, &missing))?
                        .is_some();
                    ready &= accepted || refused;
                }
                if !ready {
                    continue;
                }
                let mut stale: Vec<Vec<u8>> = record
                    .missing
                    .iter()
                    .map(|m| keys::waiting(m, &hash))
                    .collect();
                stale.push(keys::waiting(&hash.0, &hash));
                stale.push(pending_key);
                // Verified when it was parked; failing now means the stored copy is damaged.
                let Ok(verified) = Envelope::verify(&record.envelope) else {
                    self.drop_keys(stale, ticket)?;
                    continue;
                };
                match self.decide(cache, verified, ticket) {
                    Ok(Ingested::Accepted(_) | Ingested::Quarantined(..)) => settled.push(hash),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "a pending change could not be decided; dropped");
                        self.drop_keys(stale, ticket)?;
                    }
                }
            }
        }
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
    /// cache weight; `put_back` returns it.
    fn take(
        &self,
        cache: &mut Cache,
        id: &DocumentId,
    ) -> Result<Option<(AutoCommit, DocumentKind, usize)>, StoreError> {
        if let Some(cached) = cache.documents.remove(id) {
            cache.bytes -= cached.bytes;
            return Ok(Some((cached.doc, cached.kind, cached.bytes)));
        }
        self.load(cache, id)?;
        Ok(cache.documents.remove(id).map(|cached| {
            cache.bytes -= cached.bytes;
            (cached.doc, cached.kind, cached.bytes)
        }))
    }

    /// Returns a document `take` took, unchanged.
    fn put_back(&self, cache: &mut Cache, id: DocumentId, doc: AutoCommit, bytes: usize) {
        if bytes == 0 {
            // A creation that was refused: there is no document to keep.
            return;
        }
        if let Ok(Some(record)) = self.document_record(&id) {
            cache.insert(
                id,
                Cached {
                    doc,
                    kind: record.kind,
                    bytes,
                    used: 0,
                },
            );
            cache.touch(&id);
        }
    }

    /// A document decoded, from the cache or the store; with its kind.
    fn load(
        &self,
        cache: &mut Cache,
        id: &DocumentId,
    ) -> Result<Option<(AutoCommit, DocumentKind)>, StoreError> {
        if let Some(cached) = cache.touch(id) {
            return Ok(Some((cached.doc.clone(), cached.kind)));
        }
        let Some(record) = self.document_record(id)? else {
            return Ok(None);
        };
        // The snapshot, then only the envelopes it lacks (identified by their keys, so the
        // ones it holds are neither decoded nor re-verified).
        let mut doc = self
            .store
            .get(&keys::per_document(keys::SNAPSHOT, id))?
            .and_then(|snapshot| crate::model::load_document(&snapshot).ok())
            .unwrap_or_default();
        let mut bytes = 0;
        let mut changes = Vec::new();
        for (key, envelope) in self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, id))?
        {
            bytes += envelope.len();
            let hash = parse_envelope_key(&key)
                .ok_or(StoreError::Corrupt {
                    what: "envelope key",
                })?
                .1;
            if crate::model::automerge::ReadDoc::get_change_by_hash(&doc, &hash).is_some() {
                continue;
            }
            let verified = Envelope::verify(&envelope)
                .map_err(|_| StoreError::Corrupt { what: "envelope" })?;
            changes.push(verified.change);
        }
        doc.apply_changes(changes)
            .map_err(|_| StoreError::Corrupt {
                what: "document history",
            })?;
        let heads: Vec<[u8; 32]> = doc.get_heads().iter().map(|h| h.0).collect();
        if heads != record.heads {
            return Err(StoreError::Corrupt {
                what: "document heads",
            });
        }
        cache.insert(
            *id,
            Cached {
                doc: doc.clone(),
                kind: record.kind,
                bytes,
                used: 0,
            },
        );
        cache.touch(id);
        Ok(Some((doc, record.kind)))
    }

    fn document(&self, id: DocumentId, expected: DocumentKind) -> Result<AutoCommit, NodeError> {
        let mut cache = self.lock_cache();
        let (doc, found) = self
            .load(&mut cache, &id)?
            .ok_or(NodeError::UnknownDocument(id))?;
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

    fn lock_document(&self, id: &DocumentId) -> MutexGuard<'_, ()> {
        let stripe = usize::from(id.as_bytes()[0]) % self.document_locks.len();
        self.document_locks[stripe]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn membership(&self) -> RwLockReadGuard<'_, Membership> {
        self.membership.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Appends an app's records to the audit log in one batch and waits until they are
    /// durable, then wakes the change feed.
    fn record_for_app(
        &self,
        app: &str,
        records: impl IntoIterator<Item = (AuditAction, DocumentId, Option<[u8; 32]>)>,
    ) -> Result<(), NodeError> {
        let ticket = {
            let mut cache = self.lock_cache();
            let mut batch = Batch::default();
            let mut head = cache.audit;
            for (action, document, change) in records {
                head = append_record(
                    &mut batch,
                    head,
                    AuditRecord {
                        sequence: 0,
                        previous: [0; 32],
                        at_ms: audit::now_ms(),
                        action,
                        document,
                        change,
                        institution: Some(self.institution.clone()),
                        app: Some(app.to_owned()),
                    },
                );
            }
            if batch.is_empty() {
                return Ok(());
            }
            let ticket = self.commit.apply(&self.store, batch)?;
            cache.audit = head;
            ticket
        };
        self.commit.wait_durable(&self.store, ticket)?;
        self.audit_updates
            .send_replace(self.lock_cache().audit.sequence);
        Ok(())
    }

    /// Checks the audit log's hash chain from its first record to its head; `None` when it
    /// is whole.
    pub fn verify_audit(&self) -> Option<Problem> {
        let head = self.lock_cache().audit;
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
            .map(|(_, value)| Ok(decode(&value, "audit record")?))
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
        self.set_index(batch, id, index::keys_of(&self.salt, id, view))
    }

    /// Adds to `batch` the index updates that make `new` a document's index keys.
    fn set_index(
        &self,
        batch: &mut Batch,
        id: &DocumentId,
        new: Vec<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let record_key = keys::per_document(index::RECORD, id);
        let old: Vec<Vec<u8>> = match self.store.get(&record_key)? {
            Some(bytes) => decode(&bytes, "index record")?,
            None => Vec::new(),
        };
        for key in old.iter().filter(|k| !new.contains(k)) {
            batch.delete(key.clone());
        }
        for key in new.iter().filter(|k| !old.contains(k)) {
            batch.put(key.clone(), Vec::new());
        }
        batch.put(record_key, encode(&new));
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

    /// Health files of the resident with this national id (through its salted hash).
    pub fn find_by_national_id(&self, national_id: &str) -> Result<Vec<DocumentId>, NodeError> {
        self.lookup(&index::national_id_prefix(&self.salt, national_id))
    }

    /// Health files whose name (family and given, or as written locally) starts with `name`,
    /// ignoring case and spacing; at most `SEARCH_RESULTS_MAX`.
    pub fn search_by_name(&self, name: &str) -> Result<Vec<DocumentId>, NodeError> {
        if index::normalise_name(name).is_empty() {
            return Ok(Vec::new());
        }
        self.lookup(&index::name_prefix(name))
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

    /// Changes in quarantine.
    pub fn quarantine_count(&self) -> usize {
        self.lock_cache().quarantined
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
        let cache = self.lock_cache();
        self.verify_locked(&cache)
    }

    /// `verify`, under the decision lock the caller holds.
    fn verify_locked(&self, cache: &Cache) -> Result<VerifyReport, NodeError> {
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
        let mut by_document: HashMap<DocumentId, Vec<Change>> = HashMap::new();
        let entries = match self.store.scan_prefix(&[keys::ENVELOPE]) {
            Ok(entries) => entries,
            Err(error) => {
                report.problems.push(Problem {
                    document: None,
                    what: format!("the envelope keyspace is unreadable: {error}"),
                });
                return Ok(report);
            }
        };
        for (key, value) in entries {
            report.envelopes += 1;
            let Some((document, hash)) = parse_envelope_key(&key) else {
                report.problems.push(Problem {
                    document: None,
                    what: "an envelope is stored under a malformed key".into(),
                });
                continue;
            };
            match Envelope::verify(&value) {
                Ok(verified) if verified.document == document && verified.hash == hash => {
                    by_document
                        .entry(document)
                        .or_default()
                        .push(verified.change);
                }
                Ok(_) => report.problems.push(Problem {
                    document: Some(document),
                    what: format!("envelope {hash} is stored under another change's key"),
                }),
                Err(error) => report.problems.push(Problem {
                    document: Some(document),
                    what: format!("envelope {hash} fails verification: {error}"),
                }),
            }
        }
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
            let problem = |what: String| Problem {
                document: Some(document),
                what,
            };
            let record: DocumentRecord = match decode(&value, "document record") {
                Ok(record) => record,
                Err(error) => {
                    report.problems.push(problem(error.to_string()));
                    continue;
                }
            };
            let mut doc = AutoCommit::new();
            if doc
                .apply_changes(by_document.remove(&document).unwrap_or_default())
                .is_err()
            {
                report
                    .problems
                    .push(problem("its changes do not apply".into()));
                continue;
            }
            let heads = doc.get_heads();
            let recorded: Vec<ChangeHash> = record.heads.iter().copied().map(ChangeHash).collect();
            if heads != recorded {
                report.problems.push(problem(
                    "its changes do not rebuild its recorded heads".into(),
                ));
                continue;
            }
            let snapshot_heads = self
                .store
                .get(&keys::per_document(keys::SNAPSHOT, &document))
                .ok()
                .flatten()
                .and_then(|bytes| crate::model::load_document(&bytes).ok())
                .map(|mut snapshot| snapshot.get_heads());
            // A snapshot may lag behind the heads, but everything it holds must be among the
            // document's verified changes.
            let snapshot_sound = snapshot_heads.is_some_and(|snapshot| {
                snapshot.iter().all(|head| {
                    crate::model::automerge::ReadDoc::get_change_by_hash(&doc, head).is_some()
                })
            });
            if !snapshot_sound {
                report.problems.push(problem(
                    "its snapshot is missing or disagrees with its changes".into(),
                ));
            }
            match self
                .store
                .get(&keys::per_document(keys::CATALOGUE, &document))
            {
                Ok(Some(digest)) if digest == catalogue_digest(&heads) => {}
                _ => report.problems.push(problem(
                    "its catalogue entry disagrees with its heads".into(),
                )),
            }
            if let Err(error) = validate(&doc) {
                report
                    .problems
                    .push(problem(format!("it fails validation: {error}")));
            }
        }
        if let Some(problem) = self.check_audit_chain(cache.audit) {
            report.problems.push(problem);
        }
        for document in by_document.into_keys() {
            report.problems.push(Problem {
                document: Some(document),
                what: "envelopes without a document record".into(),
            });
        }
        Ok(report)
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
        let mut cache = self.lock_cache();
        let report = self.verify_locked(&cache)?;
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
            if let Some(cached) = cache.documents.remove(id) {
                cache.bytes -= cached.bytes;
            }
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

/// Applies a peer's change, containing a panic inside automerge (0.12 panics on some crafted
/// input, see crdt-model): false when it does not apply. The document may then be half
/// changed, so callers apply to a copy they drop on failure.
fn applies(doc: &mut AutoCommit, change: &Change) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.apply_changes([change.clone()])
    }))
    .is_ok_and(|result| result.is_ok())
}

/// The catalogue's digest of a document's heads: equal digests mean equal heads.
/// Deletes what made a change wait: for its dependencies, to be decided again, or for a
/// revoked key's cut-off.
fn forget_waits(batch: &mut Batch, verified: &VerifiedChange) {
    let hash = verified.hash;
    for dependency in verified.change.deps() {
        batch.delete(keys::waiting(&dependency.0, &hash));
    }
    batch.delete(keys::waiting(&hash.0, &hash));
    batch.delete(keys::held(&verified.author, &hash));
}

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
    batch.put(audit::record_key(record.sequence), encode(&record));
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
mod tests {
    use super::*;

    fn cached(bytes: usize) -> Cached {
        Cached {
            doc: AutoCommit::new(),
            kind: DocumentKind::HealthFile,
            bytes,
            used: 0,
        }
    }

    #[test]
    fn a_full_quarantine_refuses_without_storing() {
        use crate::model::{InstitutionKind, PersonName, Roster, RosterOp, Sex, Timestamp};
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("node");
        std::fs::create_dir_all(&data_dir).unwrap();
        let own = Identity::load_or_create(&data_dir).unwrap();
        let authority = Identity::from_secret([1; 32]);
        let editor = Editor {
            institution: InstitutionId::new("chc-a").unwrap(),
            at: Timestamp(0),
        };
        let mut roster = Roster::create(&authority.actor(), &editor).unwrap();
        let id = editor.institution.clone();
        roster
            .apply(
                &editor,
                &RosterOp::AddInstitution {
                    id: id.clone(),
                    name: "A".into(),
                    kind: InstitutionKind::CommunityCentre,
                },
            )
            .unwrap();
        roster
            .apply(
                &editor,
                &RosterOp::AddNodeKey {
                    institution: id,
                    key: own.public_key(),
                },
            )
            .unwrap();
        let config = NodeConfig {
            data_dir,
            authority: authority.public_key(),
        };
        let node = Node::open(
            &config,
            Some(&SignedRoster::sign(&authority, &mut roster).encode()),
        )
        .unwrap();
        let demographics = Demographics {
            name: PersonName {
                family: "F".into(),
                given: "G".into(),
                text: None,
            },
            sex: Sex::Unknown,
            birth_date: crate::model::Date::new("1950-01-01").unwrap(),
            phone: None,
            address: None,
            national_id: None,
            insurance: None,
        };
        // A creation change sent under another document's id: quarantined, normally.
        let mut file = HealthFile::create(&own.actor(), &editor, &demographics).unwrap();
        let mut change = file.changes_since(&[]).remove(0);
        let hijack = Envelope::sign(&own, DocumentId::from_bytes([9; 16]), &mut change).encode();
        node.lock_cache().quarantined = QUARANTINE_CHANGES_MAX;
        assert!(matches!(
            node.ingest(&hijack),
            Err(IngestError::QuarantineFull)
        ));
        assert!(node.quarantine().unwrap().is_empty(), "nothing was stored");
        node.lock_cache().quarantined = 0;
        assert!(matches!(
            node.ingest(&hijack).unwrap(),
            Ingested::Quarantined(..)
        ));
    }

    #[test]
    fn the_cache_keeps_its_bounds_and_the_document_just_inserted() {
        let mut cache = Cache::default();
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

//! Documents as the replica holds them: stored records and snapshots, the bounded cache of
//! decoded documents, the views cached by heads, and the reads that serve them.

use super::*;

#[derive(Serialize, Deserialize)]
pub(super) struct DocumentRecord {
    pub(super) kind: DocumentKind,
    pub(super) heads: Vec<[u8; 32]>,
    /// Bytes of the envelopes accepted since the document's last snapshot (see
    /// `Node::snapshot_due`).
    #[serde(default)]
    pub(super) tail: u64,
    /// Bytes of that snapshot.
    #[serde(default)]
    pub(super) snapshot: u64,
    /// The changes whose signatures prove every change's author (`crate::authorship`), each
    /// as its hash and its author's key (64 bytes an entry): at least every author's latest
    /// change, each stored with its signature. Absent in records of earlier releases: then
    /// every stored signature is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) cover: Option<serde_bytes::ByteBuf>,
}

impl DocumentRecord {
    /// The cover's entries: change hash and author.
    pub(super) fn cover(&self) -> Option<Vec<(ChangeHash, Bytes32)>> {
        let cover = self.cover.as_ref()?;
        if cover.len() % 64 != 0 {
            return None;
        }
        cover
            .chunks_exact(64)
            .map(|entry| {
                Some((
                    ChangeHash(entry[..32].try_into().ok()?),
                    Bytes32(entry[32..].try_into().ok()?),
                ))
            })
            .collect()
    }

    /// A cover from its entries.
    pub(super) fn encode_cover(entries: &[(ChangeHash, Bytes32)]) -> serde_bytes::ByteBuf {
        serde_bytes::ByteBuf::from(
            entries
                .iter()
                .flat_map(|(hash, author)| hash.0.into_iter().chain(author.0))
                .collect::<Vec<u8>>(),
        )
    }

    /// The cover after accepting `hash` by `author` on `deps`: the change joins it, and any
    /// change of the same author among its dependencies leaves it, since the new change now
    /// vouches for it. A change of that author further below stays (the cover may hold more
    /// than the latest changes, never fewer). `None` (an earlier release's record) stays so.
    pub(super) fn cover_after(
        previous: Option<&DocumentRecord>,
        hash: ChangeHash,
        author: Bytes32,
        deps: &[ChangeHash],
    ) -> Option<serde_bytes::ByteBuf> {
        let mut entries = match previous {
            None => Vec::new(),
            Some(record) => record.cover()?,
        };
        entries.retain(|(entry, by)| !(*by == author && deps.contains(entry)));
        entries.push((hash, author));
        Some(Self::encode_cover(&entries))
    }
}

/// A change as the store keeps it (`keys::ENVELOPE`): its envelope, as received or signed; or,
/// once the document's snapshot holds the change, its signature alone: the change's bytes are
/// in the snapshot, so keeping them twice would double what a file costs on disk. An envelope
/// is rebuilt from the document when one must be sent (`into_envelope`). The cost: a snapshot
/// damaged beyond loading loses those changes here, and `repair` then fetches the document
/// from peers, as for any damaged document.
///
/// A change that came inside a whole document, vouched for by a later change of its author
/// (`crate::authorship`), is stored *vouched*: no signature of its own, its bytes in the
/// snapshot, its authorship proven by the signature of that later change, which is stored.
/// It travels only inside its document, beside that signature.
pub(super) enum StoredChange {
    Envelope(Vec<u8>),
    Signature([u8; 64]),
    Vouched,
}

/// The first byte of a change stored as its signature alone; an envelope (a CBOR map) never
/// starts with it.
pub(super) const SIGNATURE_ONLY: u8 = b'S';
/// The whole value of a change stored vouched for by a later change of its author.
pub(super) const VOUCHED: &[u8] = b"V";

impl StoredChange {
    pub(super) fn decode(value: Vec<u8>) -> Result<Self, StoreError> {
        if value == VOUCHED {
            return Ok(Self::Vouched);
        }
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
    pub(super) fn signature_only(signature: &[u8; 64]) -> Vec<u8> {
        [&[SIGNATURE_ONLY][..], signature].concat()
    }

    /// The value that stores a change its snapshot holds: by its signature alone, or vouched
    /// for when it has none of its own.
    pub(super) fn in_snapshot(signature: Option<&[u8; 64]>) -> Vec<u8> {
        signature.map_or_else(|| VOUCHED.to_vec(), Self::signature_only)
    }

    /// The change's own signature; `None` for a change stored vouched for.
    pub(super) fn signature(&self) -> Result<Option<[u8; 64]>, StoreError> {
        match self {
            Self::Signature(signature) => Ok(Some(*signature)),
            Self::Vouched => Ok(None),
            Self::Envelope(envelope) => Envelope::decode(envelope)
                .ok()
                .and_then(|envelope| envelope.signature.try_into().ok())
                .map(Some)
                .ok_or(StoreError::Corrupt { what: "envelope" }),
        }
    }

    /// The change's envelope; rebuilt from `doc`, which must hold the change, when only its
    /// signature is stored; `None` for a change stored vouched for, which has no envelope.
    pub(super) fn into_envelope(
        self,
        document: DocumentId,
        hash: &ChangeHash,
        doc: &AutoCommit,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Self::Envelope(envelope) => Ok(Some(envelope)),
            Self::Vouched => Ok(None),
            Self::Signature(signature) => {
                let mut change = crate::model::automerge::ReadDoc::get_change_by_hash(doc, hash)
                    .ok_or(StoreError::Corrupt {
                        what: "a change its snapshot lacks",
                    })?;
                Ok(Some(
                    Envelope::seal(document, &mut change, &signature).encode(),
                ))
            }
        }
    }
}

/// A decoded document in the cache.
pub(super) struct Cached {
    pub(super) doc: AutoCommit,
    pub(super) kind: DocumentKind,
    pub(super) bytes: usize,
    pub(super) used: u64,
}

/// Documents decoded on demand, bounded in count and bytes: 700,000 files are not 700,000
/// loaded documents. A document here is exactly as the store holds it: only a decision (under
/// the decision lock) puts one in, and whoever changes one takes it out first.
#[derive(Default)]
pub(super) struct Documents {
    pub(super) documents: HashMap<DocumentId, Cached>,
    /// Each document's id by its last use (`Cached::used`), least recent first: what to evict
    /// is found without a scan of the cache (every fetched document a catch-up decides goes
    /// in, and one goes out).
    by_use: BTreeMap<u64, DocumentId>,
    pub(super) bytes: usize,
    pub(super) clock: u64,
}

impl Documents {
    pub(super) fn touch(&mut self, id: &DocumentId) -> Option<&mut Cached> {
        self.clock += 1;
        let clock = self.clock;
        let cached = self.documents.get_mut(id)?;
        self.by_use.remove(&cached.used);
        self.by_use.insert(clock, *id);
        cached.used = clock;
        Some(cached)
    }

    pub(super) fn remove(&mut self, id: &DocumentId) -> Option<Cached> {
        let cached = self.documents.remove(id)?;
        self.by_use.remove(&cached.used);
        self.bytes -= cached.bytes;
        Some(cached)
    }

    /// Inserts a document as the most recently used, then evicts the least recently used
    /// others until the cache is within its bounds. The document just inserted is never the
    /// one evicted.
    pub(super) fn insert(&mut self, id: DocumentId, mut cached: Cached) {
        self.remove(&id);
        self.clock += 1;
        cached.used = self.clock;
        self.bytes += cached.bytes;
        self.by_use.insert(cached.used, id);
        self.documents.insert(id, cached);
        while self.documents.len() > CACHE_DOCUMENTS_MAX || self.bytes > CACHE_BYTES_MAX {
            // The document just inserted is the most recent: first only when it is alone.
            match self.by_use.first_key_value() {
                Some((_, oldest)) if *oldest != id => {
                    let oldest = *oldest;
                    self.remove(&oldest);
                }
                _ => break,
            }
        }
    }
}

/// Typed views of documents as of the heads digest they were read or decided at (see
/// `VIEWS_CACHED_MAX`). Its lock is held only for a lookup or an insert, never across a
/// decision, a load or I/O.
#[derive(Default)]
pub(super) struct Views {
    entries: HashMap<DocumentId, (HeadsDigest, Arc<View>, u64)>,
    /// Each view's document by its last use, least recent first (as `Documents::by_use`).
    by_use: BTreeMap<u64, DocumentId>,
    clock: u64,
}

impl Views {
    pub(super) fn get(&mut self, id: &DocumentId, digest: &HeadsDigest) -> Option<Arc<View>> {
        self.clock += 1;
        let clock = self.clock;
        let (held, view, used) = self.entries.get_mut(id)?;
        if held != digest {
            return None;
        }
        self.by_use.remove(used);
        self.by_use.insert(clock, *id);
        *used = clock;
        Some(view.clone())
    }

    pub(super) fn insert(&mut self, id: DocumentId, digest: HeadsDigest, view: Arc<View>) {
        self.clock += 1;
        if let Some((_, _, used)) = self.entries.insert(id, (digest, view, self.clock)) {
            self.by_use.remove(&used);
        }
        self.by_use.insert(self.clock, id);
        if self.entries.len() > VIEWS_CACHED_MAX
            && let Some((_, oldest)) = self.by_use.pop_first()
        {
            self.entries.remove(&oldest);
        }
    }

    pub(super) fn remove(&mut self, id: &DocumentId) {
        if let Some((_, _, used)) = self.entries.remove(id) {
            self.by_use.remove(&used);
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

/// Loads a snapshot this node keeps (saved here, or a peer's chunk kept as it came once it
/// loaded within the bounds set for peers' bytes). It is loaded as a peer's bytes are
/// (`load_document`: bounded, guarded); a snapshot beyond those bounds — a document the model
/// allows to grow that large, saved here — is loaded by automerge unbounded, still guarded
/// against a panic: its changes may be stored by their signatures alone.
pub(super) fn load_own_snapshot(bytes: &[u8]) -> Option<AutoCommit> {
    crate::model::load_document(bytes).ok().or_else(|| {
        std::panic::catch_unwind(|| AutoCommit::load(bytes))
            .ok()?
            .ok()
    })
}

/// Whether `doc` is at exactly the heads `record` names.
pub(super) fn holds_heads(doc: &mut AutoCommit, record: &DocumentRecord) -> bool {
    let mut heads = doc.get_heads();
    heads.sort();
    let mut named: Vec<ChangeHash> = record.heads.iter().copied().map(ChangeHash).collect();
    named.sort();
    heads == named
}

/// A view read from a document carries the id the node knows it by.
pub(super) fn set_view_id(view: &mut View, id: DocumentId) {
    match view {
        View::HealthFile(view) => view.id = id,
        View::Referral(view) => view.id = id,
        View::Roster(_) => {}
    }
}

impl Node {
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
            View::Referral(view) => Ok((**view).clone()),
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
    /// is copied from the cache or read from the store (`copy_of`), without the decision lock
    /// (a clinical read does not wait while the node decides a peer's batch) unless that read
    /// met a decision or a withdrawal half-written (or failed), and its view is kept under the
    /// digest of the heads it shows: an accepted state at least as recent as the catalogue was
    /// when the read began.
    pub(super) fn view_of(
        &self,
        id: DocumentId,
        expected: DocumentKind,
    ) -> Result<Arc<View>, NodeError> {
        if let Some(digest) = self.catalogue().get(id.as_bytes())
            && let Some(view) = self.lock_views().get(&id, &digest)
        {
            return Ok(view);
        }
        // A store read that raced a decision, or a withdrawal that removed the document, is
        // read again under the lock: never a view of half a write.
        let (mut doc, found) = self.copy_of(&id)?.ok_or(NodeError::UnknownDocument(id))?;
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

    pub(super) fn lock_views(&self) -> MutexGuard<'_, Views> {
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

    /// A document's envelopes in causal order (each after its dependencies). A change stored
    /// vouched for has no envelope and is left out: it travels only inside its document
    /// (`whole_document`).
    pub fn envelopes(&self, id: DocumentId) -> Result<Vec<Vec<u8>>, NodeError> {
        let mut by_hash: HashMap<[u8; 32], StoredChange> = HashMap::new();
        for (hash, value) in self.stored_changes(&id)? {
            by_hash.insert(hash.0, StoredChange::decode(value)?);
        }
        let mut doc = self.sync_document(id)?.unwrap_or_default();
        let mut ordered = Vec::with_capacity(by_hash.len());
        for change in doc.get_changes(&[]) {
            let hash = change.hash();
            if let Some(stored) = by_hash.remove(&hash.0) {
                ordered.extend(stored.into_envelope(id, &hash, &doc)?);
            }
        }
        // Anything the document does not hold (damage `verify` reports) goes last, if it can.
        ordered.extend(by_hash.into_values().filter_map(|stored| match stored {
            StoredChange::Envelope(envelope) => Some(envelope),
            StoredChange::Signature(_) | StoredChange::Vouched => None,
        }));
        Ok(ordered)
    }

    /// The hashes of every change stored for a document, in hash order (no decoding).
    pub fn change_hashes(&self, id: DocumentId) -> Result<Vec<ChangeHash>, NodeError> {
        Ok(self
            .store
            .keys_with_prefix(&keys::per_document(keys::ENVELOPE, &id))?
            .iter()
            .filter_map(|key| keys::parse_envelope(key).map(|(_, hash)| hash))
            .collect())
    }

    /// Who changed a document and when, oldest first: each accepted change with its hash,
    /// the institution whose key signed it, and the writer's clock.
    pub fn history(&self, id: DocumentId) -> Result<Vec<HistoryEntry>, NodeError> {
        let Some(mut doc) = self.sync_document(id)? else {
            return Err(NodeError::UnknownDocument(id));
        };
        let membership = self.membership();
        // Every change the document holds was accepted, its author's key proven then (by its
        // own signature, or one of its author's later changes): the key is the actor's.
        doc.get_changes(&[])
            .iter()
            .map(|change| {
                let author = crate::envelope::author_of(change.actor_id().to_bytes())
                    .map(Bytes32)
                    .ok_or(StoreError::Corrupt {
                        what: "a change's author",
                    })?;
                Ok(HistoryEntry {
                    change: change.hash(),
                    institution: membership.institution_of(&author),
                    author,
                    // Changes carry whole seconds of the writer's clock.
                    at_ms: change.timestamp().saturating_mul(1000),
                })
            })
            .collect()
    }

    /// The catalogue: every document held and the digest of its heads.
    pub fn catalogue(&self) -> RwLockReadGuard<'_, Catalogue> {
        self.catalogue.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn catalogue_mut(&self) -> std::sync::RwLockWriteGuard<'_, Catalogue> {
        self.catalogue.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of a document as automerge holds it, for the sync protocol; `None` if this
    /// node does not hold it.
    pub fn sync_document(&self, id: DocumentId) -> Result<Option<AutoCommit>, NodeError> {
        Ok(self.copy_of(&id)?.map(|(doc, _)| doc))
    }

    /// A document as a fetch sends it: automerge bytes that load to it, with the signature of
    /// each of its changes that has one stored; with `cover_only`, only the signatures that
    /// prove every change's author (`crate::authorship`): its authors' latest changes, as the
    /// record's cover names them. The bytes are the stored snapshot followed by the changes accepted
    /// since (their envelopes' change chunks, which automerge loads after a document chunk),
    /// so serving a document decodes nothing of it. Should a decision land while they are read
    /// (the record's heads moved), or the snapshot be missing, the document is saved afresh
    /// from a copy instead. `None` if the document is not held.
    #[allow(clippy::type_complexity)]
    pub fn whole_document(
        &self,
        id: DocumentId,
        cover_only: bool,
    ) -> Result<Option<(Vec<u8>, Vec<(ChangeHash, [u8; 64])>)>, NodeError> {
        let Some(record) = self.document_record(&id)? else {
            return Ok(None);
        };
        let cover = if cover_only { record.cover() } else { None };
        if let Some((bytes, mut signatures)) = self.stored_whole(&id, &record, cover.as_deref())? {
            if let Some(cover) = &cover {
                signatures.retain(|(hash, _)| cover.iter().any(|(c, _)| c == hash));
            }
            return Ok(Some((bytes, signatures)));
        }
        let Some((mut doc, _)) = self.copy_of(&id)? else {
            return Ok(None);
        };
        // Read after the copy, so none is missing; a change accepted meanwhile is not in the
        // copy, and its signature is left out (a compact answer pairs signatures with the
        // document's changes one to one).
        let held: HashSet<ChangeHash> = if cover_only {
            crate::authorship::cover(&doc.get_changes(&[]))
                .into_iter()
                .map(|(hash, _)| hash)
                .collect()
        } else {
            doc.get_changes_meta(&[])
                .into_iter()
                .map(|meta| meta.hash)
                .collect()
        };
        let mut signatures = Vec::new();
        for (hash, value) in self.stored_changes(&id)? {
            if held.contains(&hash)
                && let Some(signature) = StoredChange::decode(value)?.signature()?
            {
                signatures.push((hash, signature));
            }
        }
        Ok(Some((doc.save(), signatures)))
    }

    /// A document's snapshot followed by the change chunks of the envelopes it lacks, with every
    /// change's signature, read from the store as `record` describes it; `None` if the
    /// snapshot is not the one `record` names or a decision on the document landed meanwhile.
    /// With `cover` (the record's), when nothing was accepted since the snapshot, only the
    /// cover's changes are read: the snapshot is the whole document, and only their
    /// signatures are wanted. (A withdrawal's new snapshot may leave changes it holds stored
    /// as envelopes; their chunks, which add nothing to the snapshot, are then not sent.)
    #[allow(clippy::type_complexity)]
    fn stored_whole(
        &self,
        id: &DocumentId,
        record: &DocumentRecord,
        cover: Option<&[(ChangeHash, Bytes32)]>,
    ) -> Result<Option<(Vec<u8>, Vec<(ChangeHash, [u8; 64])>)>, StoreError> {
        if record.snapshot == 0 {
            return Ok(None);
        }
        let Some(mut bytes) = self
            .store
            .get(&keys::per_document(keys::SNAPSHOT, id))?
            .filter(|snapshot| snapshot.len() as u64 == record.snapshot)
        else {
            return Ok(None);
        };
        let stored = match cover {
            Some(cover) if record.tail == 0 => {
                let mut stored = Vec::with_capacity(cover.len());
                for (hash, _) in cover {
                    if let Some(value) = self.store.get(&keys::envelope(id, hash))? {
                        stored.push((*hash, value));
                    }
                }
                // In the order of their keys, as a scan gives them.
                stored.sort_unstable_by_key(|(hash, _)| hash.0);
                stored.dedup_by(|(a, _), (b, _)| a == b);
                stored
            }
            _ => self.stored_changes(id)?,
        };
        let mut signatures = Vec::with_capacity(stored.len());
        for (hash, value) in stored {
            let signature = match StoredChange::decode(value)? {
                StoredChange::Signature(signature) => signature,
                StoredChange::Vouched => continue,
                StoredChange::Envelope(envelope) => {
                    let envelope = Envelope::decode(&envelope)
                        .ok()
                        .filter(|envelope| envelope.document == id.as_bytes())
                        .ok_or(StoreError::Corrupt { what: "envelope" })?;
                    bytes.extend_from_slice(&envelope.change);
                    envelope
                        .signature
                        .try_into()
                        .map_err(|_| StoreError::Corrupt { what: "envelope" })?
                }
            };
            signatures.push((hash, signature));
        }
        // A decision that landed between the reads may have replaced the snapshot and kept its
        // envelopes as signatures alone: then what was read may lack changes.
        match self.document_record(id)? {
            Some(now) if now.heads == record.heads => Ok(Some((bytes, signatures))),
            _ => Ok(None),
        }
    }

    /// The signatures of accepted changes of a document, to send beside them; a change not
    /// held, or held vouched for (without a signature of its own), is left out.
    pub fn signatures(
        &self,
        id: DocumentId,
        changes: &[ChangeHash],
    ) -> Result<Vec<(ChangeHash, [u8; 64])>, NodeError> {
        let mut found = Vec::with_capacity(changes.len());
        for hash in changes {
            if let Some(value) = self.store.get(&keys::envelope(&id, hash))?
                && let Some(signature) = StoredChange::decode(value)?.signature()?
            {
                found.push((*hash, signature));
            }
        }
        Ok(found)
    }

    /// The heads the store holds a document at, sorted (none if it holds no such document).
    pub(super) fn stored_heads(&self, id: &DocumentId) -> Result<Vec<ChangeHash>, StoreError> {
        let mut heads: Vec<ChangeHash> = self
            .document_record(id)?
            .map(|record| record.heads.into_iter().map(ChangeHash).collect())
            .unwrap_or_default();
        heads.sort();
        Ok(heads)
    }

    /// A document taken out of the cache (or decoded from the store), with its kind and its
    /// cache weight; `put_back` returns it. The ledger shows the decision lock is held: no
    /// decision is then half written in the store, so a document read from it is whole.
    pub(super) fn take(
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
    pub(super) fn take_unlocked(
        &self,
        id: &DocumentId,
    ) -> Option<(AutoCommit, DocumentKind, usize)> {
        if let Some(cached) = self.lock_documents().remove(id) {
            return Some((cached.doc, cached.kind, cached.bytes));
        }
        let (mut doc, kind, bytes, record) = self.stored_document(id).ok()??;
        holds_heads(&mut doc, &record).then_some((doc, kind, bytes))
    }

    /// Returns a document `take` took, unchanged, if the store still holds it so (a decision
    /// may have been written meanwhile, by a writer that read the document from the store).
    pub(super) fn put_back(
        &self,
        _decisions: &Ledger,
        id: DocumentId,
        mut doc: AutoCommit,
        bytes: usize,
    ) {
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
    pub(super) fn copy_of(
        &self,
        id: &DocumentId,
    ) -> Result<Option<(AutoCommit, DocumentKind)>, StoreError> {
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
    pub(super) fn load(
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
    pub(super) fn stored_document(
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
        let stored = self.stored_changes(id)?;
        bytes += stored.iter().map(|(_, value)| value.len()).sum::<usize>();
        // What the snapshot lacks, in one pass over its change graph (asking automerge for a
        // change by hash rebuilds the whole change).
        let hashes: Vec<ChangeHash> = stored.iter().map(|(hash, _)| *hash).collect();
        let lacking: HashSet<ChangeHash> = doc.get_missing_deps(&hashes).into_iter().collect();
        let mut changes = Vec::new();
        for (hash, value) in stored {
            if !lacking.contains(&hash) {
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

    /// A document's accepted changes as the store holds them (`StoredChange`), by hash, in
    /// key order.
    pub(super) fn stored_changes(
        &self,
        id: &DocumentId,
    ) -> Result<Vec<(ChangeHash, Vec<u8>)>, StoreError> {
        self.store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, id))?
            .into_iter()
            .map(|(key, value)| {
                let (_, hash) = keys::parse_envelope(&key).ok_or(StoreError::Corrupt {
                    what: "envelope key",
                })?;
                Ok((hash, value))
            })
            .collect()
    }

    pub(super) fn document(
        &self,
        id: DocumentId,
        expected: DocumentKind,
    ) -> Result<AutoCommit, NodeError> {
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

    pub(super) fn document_record(
        &self,
        id: &DocumentId,
    ) -> Result<Option<DocumentRecord>, StoreError> {
        self.store
            .get(&keys::per_document(keys::DOCUMENT, id))?
            .map(|bytes| decode(&bytes, "document record"))
            .transpose()
    }

    pub(super) fn lock_documents(&self) -> MutexGuard<'_, Documents> {
        self.documents.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn lock_document(&self, id: &DocumentId) -> MutexGuard<'_, ()> {
        let stripe = usize::from(id.as_bytes()[0]) % self.document_locks.len();
        self.document_locks[stripe]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

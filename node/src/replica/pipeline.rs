//! The one decision pipeline: every change, local or a peer's, is verified, judged at its own
//! dependencies, and accepted or refused in a batch made durable by group commit.

use super::*;

/// What decisions share across documents: the counters, the audit log's head and the pending
/// changes' books. Held (the decision lock) to check a change against the store and write the
/// decision, never while judging a change prepared beforehand, nor while flushing.
#[derive(Default)]
pub(super) struct Ledger {
    /// Changes accepted by the store so far (mirrors `keys::ACCEPTED`).
    pub(super) accepted: u64,
    /// The audit log's head (mirrors `audit::HEAD`).
    pub(super) audit: AuditHead,
    /// Records of changes in quarantine or refused: counted at open, one more for each
    /// written, fewer only for those purged. Never fewer than the records the store holds, so
    /// zero means there are none (a document decided whole then looks none up).
    pub(super) quarantined: usize,
    /// Changes to decide again: those waiting for a change just decided, and held changes of
    /// a revoked key that were just vouched for.
    pub(super) woken: VecDeque<ChangeHash>,
    /// Revoked keys whose cut-off may just have become drawable.
    pub(super) recheck: BTreeSet<Bytes32>,
    /// What pending changes hold, per bucket.
    pub(super) pending: PendingBook,
    /// Bytes of quarantined envelopes kept whole (mirrors `keys::QUARANTINE_BODIES`).
    pub(super) quarantine_bodies: u64,
}

/// The ledger's counts as of the last release of the decision lock.
pub(super) struct LedgerCounts {
    pub(super) quarantined: std::sync::atomic::AtomicUsize,
    pub(super) pending: std::sync::atomic::AtomicUsize,
}

/// The decision lock, held. Releasing it publishes the counts status reads show
/// (`LedgerCounts`), so no code path that changes them can forget to.
pub(super) struct LedgerGuard<'a> {
    pub(super) guard: MutexGuard<'a, Ledger>,
    pub(super) counts: &'a LedgerCounts,
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
pub(super) enum Incoming<'a> {
    Verified(VerifiedChange),
    Failed(EnvelopeError, &'a [u8]),
}

/// The document a local change was made on, holding the change (see `Node::write_in_place`).
pub(super) struct Written {
    pub(super) doc: AutoCommit,
    /// Its cache weight before the change.
    pub(super) bytes: usize,
    /// Its kind, as this node holds it; `None` for a document the change creates.
    pub(super) kind: Option<DocumentKind>,
}

/// A change applied to its document and judged there before the decision lock is taken (see
/// `Node::prepare`). The decision uses it only if the store still holds the document at
/// `base` and the author still belongs to `author`'s institution: the judgement is a function
/// of these alone.
pub(super) struct Prepared {
    /// The document's heads before the change, sorted (none for a creation).
    pub(super) base: Vec<ChangeHash>,
    pub(super) author: InstitutionId,
    /// The document, holding the change.
    pub(super) doc: AutoCommit,
    /// Its cache weight before the change.
    pub(super) bytes: usize,
    /// The document's view with the change.
    pub(super) view: View,
    /// A snapshot of `doc`, when the document's tail of envelopes outgrows its last one.
    pub(super) snapshot: Option<Vec<u8>>,
    /// The change moved the file's allergies (see `Judgement::Accepted`).
    pub(super) allergies: bool,
}

/// A change judged on its document.
pub(super) enum Judgement {
    /// Accepted: the view with the change, and whether the change moved a health file's
    /// allergies (what makes the file urgent for peers, `urgent.rs`).
    Accepted(Box<View>, bool),
    /// Refused; `clean` when the document was left as it was (judged on a copy).
    Refused { reason: String, clean: bool },
}

/// Why a change that automerge cannot apply at its own dependencies is refused.
pub(super) const APPLY_TO_DEPENDENCIES: &str = "the change does not apply to its dependencies";
/// Why a change judged at its dependencies that cannot merge into the document is refused.
pub(super) const APPLY_TO_DOCUMENT: &str = "the change does not apply to the document";

/// Judges `change` by what it wrote, on `doc`, which holds exactly the change and its
/// ancestors; `kind`, when known, is the kind this node holds the document as (see
/// `judge_change_of_kind`). On refusal callers drop `doc`: it holds the refused change.
pub(super) fn judge_applied(
    doc: &AutoCommit,
    change: &Change,
    author: &InstitutionId,
    kind: Option<DocumentKind>,
) -> Result<crate::model::Judged, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::model::judge_change_of_kind(doc, change, author, kind)
    }))
    .map_err(|_| "the change could not be read".to_string())?
    .map_err(|error| error.to_string())
}

/// Applies a peer's change, containing a panic inside automerge (0.12 panics on some crafted
/// input, see crdt-model): false when it does not apply. The document may then be half
/// changed, so callers apply to a copy they drop on failure.
pub(super) fn applies(doc: &mut AutoCommit, change: &Change) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        doc.apply_changes([change.clone()])
    }))
    .is_ok_and(|result| result.is_ok())
}

/// The catalogue's digest of a document's heads: equal digests mean equal heads.
pub(super) fn catalogue_digest(heads: &[ChangeHash]) -> [u8; 32] {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for head in sorted {
        hasher.update(head.0);
    }
    hasher.finalize().into()
}

impl Node {
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
            .map(|incoming| (incoming, None))
            .collect();
        let _one_at_a_time = self.peer_batches.lock().unwrap_or_else(|p| p.into_inner());
        self.decide_in_order(verified, None)
    }

    /// Makes the decisions applied up to batch `ticket` durable (one flush, shared with
    /// concurrent writers, no lock held while the disk works), then tells the change feed.
    pub(super) fn make_durable(&self, ticket: u64) -> Result<(), IngestError> {
        if ticket > 0 {
            self.commit.wait_durable(&self.store, ticket)?;
            self.audit_updates
                .send_replace(self.lock_ledger().audit.sequence);
        }
        Ok(())
    }

    /// Decides changes in order, each prepared (`prepare`) before the decision lock is taken
    /// for it, and makes every decision durable with one flush shared with concurrent callers.
    /// Each change comes with the document it was made on, for a local write. Returns one
    /// outcome per change; fails as a whole only if the flush fails.
    pub(super) fn decide_in_order(
        &self,
        changes: Vec<(Incoming<'_>, Option<Written>)>,
        app: Option<&str>,
    ) -> Result<Vec<Result<Ingested, IngestError>>, IngestError> {
        let started = std::time::Instant::now();
        // Until its batches are applied, a flush about to start waits for this call.
        let deciding = self.commit.enter();
        let mut ticket = 0;
        let mut outcomes = Vec::with_capacity(changes.len());
        for (change, written) in changes {
            let prepared = match &change {
                Incoming::Verified(verified) => self.prepare(verified, written),
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
        let took = started.elapsed();
        for _ in &outcomes {
            self.decisions.observe(took);
        }
        Ok(outcomes)
    }

    /// Makes a local change on the cached document itself (no copy): `write` makes it. Returns
    /// the change and the document holding it, for `write_local`; `None` if `write` changed
    /// nothing.
    pub(super) fn write_in_place(
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
        Ok(Some((
            change,
            Written {
                doc,
                bytes,
                kind: Some(found),
            },
        )))
    }

    /// Signs and decides the change a typed operation made (on `written`, when it was made on
    /// the cached document); `app`, when an app made it through the API, is recorded as its
    /// writer in the same batch as the change.
    pub(super) fn write_local(
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
        self.decide_local(vec![(verified, written)], app)?
            .pop()
            .unwrap_or(Err(NodeError::Store(StoreError::Corrupt {
                what: "ingest outcome",
            })))
    }

    /// Decides changes this node made and signed, each with the document it was made on when
    /// at hand, with one flush for them all; tells the network layer of each one accepted.
    /// Returns each change's hash, or why it was not accepted.
    pub(super) fn decide_local(
        &self,
        changes: Vec<(VerifiedChange, Option<Written>)>,
        app: Option<&str>,
    ) -> Result<Vec<Result<ChangeHash, NodeError>>, NodeError> {
        let published: Vec<_> = changes
            .iter()
            .map(|(verified, _)| (verified.document, verified.encoded.clone()))
            .collect();
        let incoming = changes
            .into_iter()
            .map(|(verified, written)| (Incoming::Verified(verified), written))
            .collect();
        let outcomes = self.decide_in_order(incoming, app)?;
        Ok(outcomes
            .into_iter()
            .zip(published)
            .map(|(outcome, (document, envelope))| match outcome? {
                Ingested::Accepted(hash) => {
                    // No subscriber is fine: a node without a network layer.
                    let _ = self.local_changes.send(LocalChange {
                        document,
                        hash,
                        envelope,
                        urgent: self.is_urgent(&document),
                    });
                    Ok(hash)
                }
                // The same write made twice (a registration sent again) is already there.
                Ingested::Duplicate(hash) => {
                    if let Some(app) = app {
                        self.record_access(app, &[(document, Some(hash))])?;
                    }
                    Ok(hash)
                }
                other => Err(NodeError::LocalChangeRefused(other)),
            })
            .collect())
    }

    /// A referral (or a redirect) to an institution the roster does not name would reach no
    /// desk.
    pub(super) fn check_member(&self, institution: &InstitutionId) -> Result<(), NodeError> {
        if self
            .membership()
            .view()
            .institutions
            .iter()
            .all(|member| member.id != *institution)
        {
            return Err(NodeError::UnknownMember {
                institution: institution.clone(),
            });
        }
        Ok(())
    }

    pub(super) fn check_editor(&self, editor: &Editor) -> Result<(), NodeError> {
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
    pub(super) fn prepare(
        &self,
        verified: &VerifiedChange,
        written: Option<Written>,
    ) -> Option<Prepared> {
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
        let (mut doc, bytes, mut base, kind) = match written {
            // Made on the document at its heads: the change's dependencies.
            Some(written) => (written.doc, written.bytes, deps.to_vec(), written.kind),
            None if deps.is_empty() => (AutoCommit::new(), 0, Vec::new(), None),
            None => {
                let (mut doc, kind, bytes) = self.take_unlocked(&id)?;
                let heads = doc.get_heads();
                (doc, bytes, heads, Some(kind))
            }
        };
        base.sort();
        // A refused change is judged again by `decide`, which quarantines it.
        let Ok(Judgement::Accepted(view, allergies)) =
            self.judge_into(&id, &mut doc, verified, &author, kind, applied)
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
            allergies,
        })
    }

    /// Applies `verified`'s change to `current` (the document as the store holds it, or, when
    /// `applied`, the document it was made on, already holding it) and judges it by what it
    /// wrote. A change that builds on `current`'s heads is applied in place (`judge_change`
    /// reads the document before it at its dependencies, without a copy); any other is judged
    /// on a copy of the document at its own dependencies, then merged. Returns the document's
    /// view with the change; on refusal, whether `current` is still as it was.
    pub(super) fn judge_into(
        &self,
        id: &DocumentId,
        current: &mut AutoCommit,
        verified: &VerifiedChange,
        author: &InstitutionId,
        kind: Option<DocumentKind>,
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
                judge_applied(current, &verified.change, author, kind)
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
                judge_applied(&judged_at, &verified.change, author, kind)
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
        // Whether the change moved the allergies: where it wrote, or, for a change judged
        // whole, the allergies before it (when that view is kept) against those after.
        let wrote = judged.as_ref().ok().and_then(|j| j.wrote("allergies"));
        let allergies_before = match (wrote, &previous) {
            (None, Some(View::HealthFile(before))) => {
                Some((before.allergies.clone(), before.no_known_allergies.clone()))
            }
            _ => None,
        };
        let view = judged.and_then(|judged| {
            // Built on the heads, the change is `current`'s only head: its view is what
            // judging it read, over the view before it.
            let view = match on_current {
                true => judged.view_at_change(current, previous),
                false => judged.view(current, previous),
            };
            view.map_err(|error| format!("merging it breaks the document: {error}"))
        });
        Ok(match view {
            Ok(view) => {
                let allergies = match (wrote, allergies_before, &view) {
                    (Some(wrote), ..) => wrote,
                    (None, Some((allergies, none_known)), View::HealthFile(after)) => {
                        after.allergies != allergies || after.no_known_allergies != none_known
                    }
                    _ => false,
                };
                Judgement::Accepted(Box::new(view), allergies)
            }
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
    pub(super) fn snapshot_due(&self, id: &DocumentId, bytes: usize) -> Result<bool, StoreError> {
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
    pub(super) fn decide(
        &self,
        ledger: &mut Ledger,
        verified: VerifiedChange,
        prepared: Option<Prepared>,
        ticket: &mut u64,
        app: Option<&str>,
    ) -> Result<Ingested, IngestError> {
        let (id, hash) = (verified.document, verified.hash);
        if self.is_erased(&id)? {
            return Err(IngestError::Erased { document: id });
        }
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
        let (mut current, bytes, kind) = if deps.is_empty() {
            (AutoCommit::new(), 0, None)
        } else {
            let (doc, kind, bytes) = self.take(ledger, &id)?.ok_or(StoreError::Corrupt {
                what: "document record",
            })?;
            (doc, bytes, Some(kind))
        };
        match self.judge_into(&id, &mut current, &verified, &author, kind, false)? {
            Judgement::Accepted(view, allergies) => {
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
                    allergies,
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

    /// Adds to `batch` the rewrite of every envelope of `id` as its signature alone, for a
    /// batch that writes a snapshot holding them all.
    pub(super) fn keep_signatures_only(
        &self,
        batch: &mut Batch,
        id: &DocumentId,
    ) -> Result<(), StoreError> {
        for (key, value) in self
            .store
            .scan_prefix(&keys::per_document(keys::ENVELOPE, id))?
        {
            if let envelope @ StoredChange::Envelope(_) = StoredChange::decode(value)? {
                batch.put(
                    key,
                    StoredChange::in_snapshot(envelope.signature()?.as_ref()),
                );
            }
        }
        Ok(())
    }

    /// Writes the acceptance of a judged change: its envelope, the document's record, heads and
    /// index entries, its audit records; then keeps the document and its view for what comes
    /// next. `decided.base` is not read.
    pub(super) fn accept(
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
            allergies,
            ..
        } = decided;
        if let View::Referral(referral) = &view
            && self.is_erased(&referral.patient)?
        {
            return Err(self.refuse_erased_referral(ledger, ticket, id, &referral.patient)?);
        }
        let kind = view.kind();
        let cached_bytes = bytes + verified.encoded.len();
        let heads = current.get_heads();
        let mut batch = Batch::default();
        let snapshotted = snapshot.is_some();
        // The record before this change: its tail and cover go on when no snapshot is written.
        let previous = if snapshotted {
            None
        } else {
            self.document_record(&id)?
        };
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
                    StoredChange::in_snapshot(signature.as_ref()),
                );
                (0, saved)
            }
            None => {
                batch.put(keys::envelope(&id, &hash), verified.encoded.clone());
                previous
                    .as_ref()
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
            cover: if snapshotted {
                // A snapshot is written: the exact cover, at a cost amortised like the save's.
                Some(DocumentRecord::encode_cover(
                    &crate::authorship::cover_of_metadata(&current.get_changes_meta(&[])),
                ))
            } else {
                DocumentRecord::cover_after(
                    previous.as_ref(),
                    hash,
                    verified.author,
                    verified.change.deps(),
                )
            },
        };
        batch.put(keys::per_document(keys::DOCUMENT, &id), encode(&record));
        batch.put(
            keys::per_document(keys::CATALOGUE, &id),
            catalogue_digest(&heads).to_vec(),
        );
        let unparked = self.unpark(&mut batch, &id, &hash)?;
        // Written once per author and document (revocation finds an author's documents by
        // it): a read, where it is there already, is cheaper than writing it again.
        let author_key = keys::author(&verified.author, &id);
        if self.store.get(&author_key)?.is_none() {
            batch.put(author_key, Vec::new());
        }
        batch.put(keys::ACCEPTED, (ledger.accepted + 1).to_be_bytes().to_vec());
        // The view before this change, if kept: the catalogue still names the heads before it.
        let digest_before = self.catalogue().get(id.as_bytes());
        let before = digest_before.and_then(|digest| self.lock_views().get(&id, &digest));
        self.reindex_after(&mut batch, &id, before.as_deref(), &view)?;
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
        self.note_urgency(id, &view, allergies);
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

    /// Quarantines an envelope refused for its signature or its author. It is kept under its
    /// own digest: the change it claims may be genuine and arrive later, properly signed.
    /// An envelope whose change does not decode cannot be attributed and is refused with a
    /// typed error instead.
    pub(super) fn refuse(
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
        let key = keys::refused(&Sha256::digest(encoded).into());
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

    pub(super) fn lock_ledger(&self) -> LedgerGuard<'_> {
        LedgerGuard {
            guard: self.ledger.lock().unwrap_or_else(|p| p.into_inner()),
            counts: &self.counts,
        }
    }
}

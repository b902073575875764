//! A fetched document the node holds nothing of, decided at once: every signature checked,
//! its history judged in one pass, stored in one batch. Anything unusual goes back to the
//! change-by-change pipeline.

use super::*;

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
pub(super) struct WholeChange {
    pub(super) hash: ChangeHash,
    pub(super) author: Bytes32,
    pub(super) institution: InstitutionId,
    pub(super) signature: [u8; 64],
}

/// A document sent whole, judged at once before the decision lock is taken (see
/// `Node::prepare_whole`). The decision uses it only if the store still holds nothing of the
/// document and every author still belongs to the institution named here.
pub(super) struct PreparedWhole {
    /// Its changes, in causal order.
    pub(super) changes: Vec<WholeChange>,
    pub(super) view: View,
    pub(super) snapshot: Vec<u8>,
    /// Made by this node (a bulk load): its one author is this node's key, whose standing
    /// `Membership::admit` settles, so a revocation of another key cannot concern it.
    pub(super) made_here: bool,
}

/// What became of a document prepared whole (see `Node::decide_whole`).
pub(super) enum WholeDecision {
    Accepted,
    /// The store holds part of it now, or an author's standing changed: decide it change by
    /// change.
    GivenBack(WholeDocument),
    /// The store failed.
    Failed(StoreError, WholeDocument),
}

impl Node {
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
        let (outcomes, decided_back) = self.decide_prepared_whole(prepared, None)?;
        given_back.extend(decided_back);
        Ok((outcomes, given_back))
    }

    /// Decides documents prepared whole, in order, each under the decision lock only while it
    /// is written (`decide_whole`), and makes them durable with one flush; `app`, when an app
    /// made them through the API, is recorded as their writer. Returns one outcome per change
    /// of the documents accepted, once durable, and the documents given back.
    #[allow(clippy::type_complexity)]
    pub(super) fn decide_prepared_whole(
        &self,
        prepared: Vec<(WholeDocument, PreparedWhole)>,
        app: Option<&str>,
    ) -> Result<(Vec<Result<Ingested, IngestError>>, Vec<WholeDocument>), IngestError> {
        let started = std::time::Instant::now();
        let deciding = self.commit.enter();
        let mut ticket = 0;
        let mut outcomes = Vec::new();
        let mut given_back = Vec::new();
        for (whole, prepared) in prepared {
            let mut ledger = self.lock_ledger();
            let hashes: Vec<ChangeHash> = prepared.changes.iter().map(|c| c.hash).collect();
            match self.decide_whole(&mut ledger, &mut ticket, whole, prepared, app) {
                WholeDecision::Accepted => {
                    outcomes.extend(hashes.into_iter().map(|h| Ok(Ingested::Accepted(h))))
                }
                WholeDecision::GivenBack(whole) => given_back.push(whole),
                // The change-by-change pipeline meets the same failure and reports it.
                WholeDecision::Failed(error, whole) => {
                    tracing::warn!(%error, "storing a document decided whole failed");
                    given_back.push(whole);
                }
            }
        }
        drop(deciding);
        self.make_durable(ticket)?;
        let took = started.elapsed();
        for _ in &outcomes {
            self.decisions.observe(took);
        }
        Ok((outcomes, given_back))
    }

    /// Checks and judges a document sent whole without the decision lock: every change
    /// signed by its author, every author a plain member, the creation change naming the
    /// document, the history judged at once (`judge_history`). `None` if anything is out of
    /// the ordinary: the per-change pipeline then decides it.
    pub(super) fn prepare_whole(&self, whole: &mut WholeDocument) -> Option<PreparedWhole> {
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
        // An erased document, or a referral of an erased resident, is refused change by
        // change, and nothing of it kept.
        let patient = match &view {
            View::Referral(referral) => Some(referral.patient),
            _ => None,
        };
        if std::iter::once(id)
            .chain(patient)
            .any(|document| !matches!(self.is_erased(&document), Ok(false)))
        {
            return None;
        }
        Some(PreparedWhole {
            changes: checked,
            view,
            snapshot: whole.doc.save(),
            made_here: false,
        })
    }

    /// Accepts a document prepared whole (`prepare_whole`) in one batch: its envelopes,
    /// snapshot, record, catalogue and index entries, and an audit record per change, as
    /// accepting its changes one by one would leave them. Gives the document back if the store
    /// now holds any part of it or an author's standing changed.
    pub(super) fn decide_whole(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        mut whole: WholeDocument,
        prepared: PreparedWhole,
        app: Option<&str>,
    ) -> WholeDecision {
        let id = whole.id;
        match self.holds_any_of(&id, &prepared) {
            Ok(false) => {}
            Ok(true) => return WholeDecision::GivenBack(whole),
            Err(error) => return WholeDecision::Failed(error, whole),
        }
        {
            let membership = self.membership();
            if (!prepared.made_here && !membership.view().revocations.is_empty())
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
            ..
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
            if let Some(app) = app {
                // Who wrote it is durable exactly when the change is.
                head = append_record(
                    &mut batch,
                    head,
                    self.app_record(app, AuditAction::Written, id, Some(change.hash.0)),
                );
            }
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
        self.note_urgency(id, &view, false);
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
    pub(super) fn holds_any_of(
        &self,
        id: &DocumentId,
        prepared: &PreparedWhole,
    ) -> Result<bool, StoreError> {
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
}

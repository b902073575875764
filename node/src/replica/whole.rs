//! A fetched document the node holds nothing of, decided at once: every signature checked,
//! its history judged in one pass, stored in one batch. Anything unusual goes back to the
//! change-by-change pipeline.

use super::*;

/// A document a peer sent whole (a fetch), loaded, with its changes' signatures by change
/// hash (see `Node::ingest_whole`).
#[derive(Clone)]
pub struct WholeDocument {
    /// The document's id, as the peer named it (its creation change must agree).
    pub id: DocumentId,
    /// The document as the peer's bytes loaded.
    pub doc: AutoCommit,
    /// The signature of each change, by change hash.
    pub signatures: HashMap<[u8; 32], [u8; 64]>,
    /// The changes of `doc` as `get_changes(&[])` lists them, when loading built them already
    /// (`model::load_document_with_changes`); `None`: listed when needed.
    pub changes: Option<Vec<Change>>,
    /// The bytes `doc` was loaded from, when they are exactly one document chunk (a peer's
    /// snapshot, `model::is_one_document_chunk`): a document new here keeps them as its
    /// snapshot instead of saving `doc` again.
    pub saved: Option<Vec<u8>>,
}

/// A change of a document sent whole, checked before the decision lock is taken.
pub(super) struct WholeChange {
    pub(super) hash: ChangeHash,
    pub(super) author: Bytes32,
    pub(super) institution: InstitutionId,
    /// Its own signature when it is its author's latest in the document; `None` when a later
    /// change of its author vouches for it (`crate::authorship`).
    pub(super) signature: Option<[u8; 64]>,
}

/// A document sent whole, judged at once before the decision lock is taken (see
/// `Node::prepare_whole`). The decision uses it only if the store still holds the document at
/// `base` (nothing of it, when `base` is empty) and every author still belongs to the
/// institution named here.
pub(super) struct PreparedWhole {
    /// Its changes this node lacks, in causal order.
    pub(super) changes: Vec<WholeChange>,
    pub(super) view: View,
    pub(super) snapshot: Vec<u8>,
    /// The heads, sorted, of the document as this node held it when it was prepared; empty
    /// when it held nothing of it.
    pub(super) base: Vec<ChangeHash>,
    /// The document as it will be: what this node held with the new changes applied, when it
    /// held any of it (otherwise the document sent).
    pub(super) merged: Option<AutoCommit>,
    /// The version of the roster it was judged under: under the decision lock, a newer one
    /// lets it stand only if the document is new here and every change a plain member's of
    /// the same institution.
    pub(super) roster: u64,
    /// The changes whose signatures prove every author (`DocumentRecord::cover`).
    pub(super) cover: Vec<(ChangeHash, Bytes32)>,
    /// The changes sent that this node held already.
    pub(super) held: Vec<ChangeHash>,
}

/// How many times a document sent whole is judged before it goes change by change, when the
/// store moves on between its judgement and its decision (or the roster changes): a change of
/// it arriving meanwhile (gossip) must not send a document whose changes are vouched for down
/// the change-by-change path, where only changes with their own signature can go.
const WHOLE_ATTEMPTS_MAX: usize = 3;

/// Bytes a peer's document chunk may hold beyond its changes' own (its header, heads, actors
/// and column framing) and still be kept as the document's snapshot: a `save()` of realistic
/// files is smaller than its changes, one of a single change a few dozen bytes larger.
const KEPT_SNAPSHOT_SLACK_BYTES: usize = 512;

/// What `Node::prepare_whole` made of a document sent whole.
pub(super) enum Preparation {
    /// Judged, to be written.
    Judged(Box<PreparedWhole>),
    /// This node holds every change it carries: these.
    NothingNew(Vec<ChangeHash>),
    /// Out of the ordinary: decided change by change.
    Unusual,
}

/// Decisions applied to the store but not yet durable (`Node::ingest_whole_undurable`): what
/// was decided holds once `Node::make_whole_durable` has returned `Ok` for it.
#[must_use = "decisions hold only once made durable"]
#[derive(Debug)]
pub struct Undurable {
    /// The store's ticket for the last batch applied (0: none).
    ticket: u64,
    /// When deciding started.
    started: std::time::Instant,
    /// Outcomes decided, each counted in the decision latencies once durable.
    decided: usize,
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
    /// Takes documents sent whole by a peer (a fetch): each is judged at once
    /// (`judge_history`, as deciding its changes one by one in causal order would) before the
    /// decision lock is taken, and accepted in one write: one load, one judgement pass and one
    /// batch per document instead of one per change. A document this node holds part of is
    /// merged with it and its whole history judged the same way. Authorship is proven by one
    /// signature per author's latest change (`crate::authorship`). A document is given back,
    /// for `ingest_many` to decide change by change as usual, when its history is not
    /// accepted whole: a change unproven or refused, an author who is not a plain member (a
    /// revocation concerns it), a change this node quarantined. Returns one outcome per change
    /// taken, once their decisions are durable, and the documents given back. Unlike
    /// `ingest_many`, calls run side by side: the decision lock is held only to write a
    /// document already judged.
    #[allow(clippy::type_complexity)]
    pub fn ingest_whole(
        &self,
        documents: Vec<WholeDocument>,
    ) -> Result<(Vec<Result<Ingested, IngestError>>, Vec<WholeDocument>), IngestError> {
        let (outcomes, given_back, undurable) = self.ingest_whole_undurable(documents)?;
        self.make_whole_durable(undurable)?;
        Ok((outcomes, given_back))
    }

    /// [`Node::ingest_whole`] without waiting for its decisions to be durable: the outcomes
    /// hold only once [`Node::make_whole_durable`] has returned `Ok` for the `Undurable`
    /// returned (nothing may be reported of them before). The caller can decide more
    /// meanwhile, as a flush makes these durable.
    #[allow(clippy::type_complexity)]
    pub fn ingest_whole_undurable(
        &self,
        documents: Vec<WholeDocument>,
    ) -> Result<
        (
            Vec<Result<Ingested, IngestError>>,
            Vec<WholeDocument>,
            Undurable,
        ),
        IngestError,
    > {
        let started = std::time::Instant::now();
        let mut ticket = 0;
        let mut outcomes = Vec::new();
        let mut given_back = Vec::new();
        let mut to_judge = documents;
        // A document the store moved on for between its judgement and its decision (a change
        // of it arrived meanwhile) is judged again against what the store holds now.
        for _ in 0..WHOLE_ATTEMPTS_MAX {
            // Judged first, without any lock: fetches answered at once are judged side by
            // side (on threads of lower priority than reads, see `sync::background`).
            let mut prepared = Vec::with_capacity(to_judge.len());
            for mut whole in to_judge.drain(..) {
                match self.prepare_whole(&mut whole) {
                    Preparation::Judged(judged) => prepared.push((whole, *judged)),
                    Preparation::NothingNew(held) => {
                        // Their first copies may not be durable yet: wait for everything
                        // applied so far.
                        ticket = ticket.max(self.commit.applied());
                        outcomes.extend(held.into_iter().map(|h| Ok(Ingested::Duplicate(h))))
                    }
                    Preparation::Unusual => given_back.push(whole),
                }
            }
            let (decided, moved_on, applied) =
                self.decide_prepared_whole_undurable(prepared, None)?;
            outcomes.extend(decided);
            ticket = ticket.max(applied);
            to_judge = moved_on;
            if to_judge.is_empty() {
                break;
            }
        }
        given_back.extend(to_judge);
        let undurable = Undurable {
            ticket,
            started,
            decided: outcomes.len(),
        };
        Ok((outcomes, given_back, undurable))
    }

    /// Makes durable the decisions of [`Node::ingest_whole_undurable`] (one flush, shared
    /// with concurrent callers), and counts how long they took, from their start to durable.
    pub fn make_whole_durable(&self, undurable: Undurable) -> Result<(), IngestError> {
        self.make_durable(undurable.ticket)?;
        let took = undurable.started.elapsed();
        for _ in 0..undurable.decided {
            self.decisions.observe(took);
        }
        Ok(())
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
        let (outcomes, given_back, ticket) = self.decide_prepared_whole_undurable(prepared, app)?;
        self.make_whole_durable(Undurable {
            ticket,
            started,
            decided: outcomes.len(),
        })?;
        Ok((outcomes, given_back))
    }

    /// [`Node::decide_prepared_whole`] up to its flush: returns the store's ticket for what it
    /// applied, which is durable once `make_durable` has returned for it.
    #[allow(clippy::type_complexity)]
    fn decide_prepared_whole_undurable(
        &self,
        prepared: Vec<(WholeDocument, PreparedWhole)>,
        app: Option<&str>,
    ) -> Result<(Vec<Result<Ingested, IngestError>>, Vec<WholeDocument>, u64), IngestError> {
        let deciding = self.commit.enter();
        let mut ticket = 0;
        let mut outcomes = Vec::new();
        let mut given_back = Vec::new();
        for (whole, mut prepared) in prepared {
            let mut ledger = self.lock_ledger();
            let hashes: Vec<ChangeHash> = prepared.changes.iter().map(|c| c.hash).collect();
            let held = std::mem::take(&mut prepared.held);
            match self.decide_whole(&mut ledger, &mut ticket, whole, prepared, app) {
                WholeDecision::Accepted => {
                    // Pending changes may have waited for these.
                    ledger.woken.extend(hashes.iter().copied());
                    self.settle(&mut ledger, &mut ticket);
                    outcomes.extend(hashes.into_iter().map(|h| Ok(Ingested::Accepted(h))));
                    outcomes.extend(held.into_iter().map(|h| Ok(Ingested::Duplicate(h))));
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
        Ok((outcomes, given_back, ticket))
    }

    /// Checks and judges a document sent whole without the decision lock: every change's
    /// author proven (`crate::authorship::authenticate`) and a plain member, the creation
    /// change naming the document, the history — merged with what this node holds of it —
    /// judged at once (`judge_history`). `Unusual` if anything is out of the ordinary: the
    /// per-change pipeline then decides it.
    pub(super) fn prepare_whole(&self, whole: &mut WholeDocument) -> Preparation {
        let id = whole.id;
        // Changes whose dependencies the bytes lack are held inside automerge, out of
        // `get_changes`, yet saved with the document: such a document goes change by change.
        if !whole.doc.get_missing_deps(&[]).is_empty() {
            return Preparation::Unusual;
        }
        let sent = match whole.changes.take() {
            Some(changes) => changes,
            None => whole.doc.get_changes(&[]),
        };
        if sent
            .iter()
            .any(|change| change.deps().is_empty() && document_id_of(&change.hash()) != id)
        {
            return Preparation::Unusual;
        }
        let Ok(authored) = crate::authorship::authenticate(&id, &sent, &whole.signatures) else {
            return Preparation::Unusual;
        };
        let record = match self.document_record(&id) {
            Ok(record) => record,
            Err(_) => return Preparation::Unusual,
        };
        // The document as it will be, and its changes this node lacks.
        let (merged, base, history, new, held) = match record {
            None => (None, Vec::new(), sent, authored, Vec::new()),
            Some(_) => {
                let Ok(Some((mut held, _))) = self.copy_of(&id) else {
                    return Preparation::Unusual;
                };
                let mut base = held.get_heads();
                base.sort_unstable();
                let known: HashSet<ChangeHash> = held
                    .get_changes_meta(&[])
                    .into_iter()
                    .map(|meta| meta.hash)
                    .collect();
                let (lacking, new): (Vec<_>, Vec<_>) = sent
                    .iter()
                    .cloned()
                    .zip(authored)
                    .filter(|(change, _)| !known.contains(&change.hash()))
                    .unzip();
                let held_already: Vec<ChangeHash> = sent
                    .iter()
                    .map(|change| change.hash())
                    .filter(|hash| known.contains(hash))
                    .collect();
                if lacking.is_empty() {
                    return Preparation::NothingNew(held_already);
                }
                if held.apply_changes(lacking).is_err() {
                    return Preparation::Unusual;
                }
                let history = held.get_changes(&[]);
                (Some(held), base, history, new, held_already)
            }
        };
        let doc = merged.as_ref().unwrap_or(&whole.doc);
        let new_hashes: HashMap<ChangeHash, usize> =
            new.iter().enumerate().map(|(i, a)| (a.hash, i)).collect();
        let mut institutions = Vec::with_capacity(history.len());
        let mut changes = Vec::with_capacity(new.len());
        let roster;
        {
            let membership = self.membership();
            roster = membership.version();
            let mut admitted = Vec::with_capacity(history.len());
            for change in &history {
                let hash = change.hash();
                let author = match new_hashes.get(&hash) {
                    Some(&i) => new[i].author,
                    None => match crate::envelope::author_of(change.actor_id().to_bytes()) {
                        Some(author) => Bytes32(author),
                        None => return Preparation::Unusual,
                    },
                };
                admitted.push((author, membership.admit(&author, &hash)));
            }
            // A revoked key's changes stand when they are its cut-off's heads here or below
            // one of them; anything else of a revoked key (held until its cut-off can be
            // drawn, or refused) is decided change by change.
            let within = within_cutoffs(&history, &admitted);
            for (change, (author, admission)) in history.iter().zip(admitted) {
                let hash = change.hash();
                let institution = match admission {
                    Admission::Member(institution) | Admission::WithinCutoff(institution) => {
                        institution
                    }
                    Admission::Revoked { institution, key } if within.contains(&(key, hash)) => {
                        institution
                    }
                    Admission::Revoked { .. } | Admission::Stranger => {
                        return Preparation::Unusual;
                    }
                };
                if let Some(&i) = new_hashes.get(&hash) {
                    // A change too large for an envelope is refused by the envelope path,
                    // which holds its bytes as automerge encodes them (compressed above 256
                    // bytes, which may make them larger): compressed only when it could
                    // matter.
                    if change.raw_bytes().len() > crate::envelope::CHANGE_BYTES_MAX / 2
                        && change.clone().bytes().len() > crate::envelope::CHANGE_BYTES_MAX
                    {
                        return Preparation::Unusual;
                    }
                    changes.push(WholeChange {
                        hash,
                        author,
                        institution: institution.clone(),
                        signature: new[i].signature,
                    });
                }
                institutions.push(institution);
            }
        }
        let Ok(view) = crate::model::judge_history(doc, &history, &institutions) else {
            return Preparation::Unusual;
        };
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
            return Preparation::Unusual;
        }
        let cover = crate::authorship::cover(&history);
        let mut merged = merged;
        // The bytes loaded, one document chunk, load to exactly the document judged; but
        // automerge skips columns it does not know, so a chunk larger than its changes (padded:
        // kept, it would be served on as it is) is saved again.
        let kept_bytes_max = history
            .iter()
            .map(|change| change.raw_bytes().len())
            .sum::<usize>()
            + KEPT_SNAPSHOT_SLACK_BYTES;
        let snapshot = match (&mut merged, whole.saved.take()) {
            (Some(merged), _) => merged.save(),
            (None, Some(saved)) if saved.len() <= kept_bytes_max => saved,
            (None, _) => whole.doc.save(),
        };
        Preparation::Judged(Box::new(PreparedWhole {
            changes,
            view,
            snapshot,
            base,
            merged,
            roster,
            cover,
            held,
        }))
    }

    /// Accepts a document prepared whole (`prepare_whole`) in one batch: its new changes
    /// (each by its signature, or vouched for), snapshot, record, catalogue and index entries,
    /// and an audit record per new change, as accepting its changes one by one would leave
    /// them; a pending record of a new change goes. Gives the document back if the store no
    /// longer holds it as it was prepared against, holds one of its changes in quarantine, or
    /// an author's standing changed.
    pub(super) fn decide_whole(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        mut whole: WholeDocument,
        prepared: PreparedWhole,
        app: Option<&str>,
    ) -> WholeDecision {
        let id = whole.id;
        // With no record in quarantine, none of its changes is there.
        match self.still_as_prepared(&id, &prepared, ledger.quarantined > 0) {
            Ok(true) => {}
            Ok(false) => return WholeDecision::GivenBack(whole),
            Err(error) => return WholeDecision::Failed(error, whole),
        }
        {
            let membership = self.membership();
            if membership.version() != prepared.roster
                && (!prepared.base.is_empty()
                    || prepared.changes.iter().any(|c| {
                        !matches!(membership.admit(&c.author, &c.hash),
                            Admission::Member(admitted) if admitted == c.institution)
                    }))
            {
                return WholeDecision::GivenBack(whole);
            }
        }
        let PreparedWhole {
            changes,
            mut view,
            snapshot,
            base,
            merged,
            cover,
            ..
        } = prepared;
        let kind = view.kind();
        let mut doc = merged.unwrap_or_else(|| std::mem::take(&mut whole.doc));
        let heads = doc.get_heads();
        let digest = catalogue_digest(&heads);
        let accepted = ledger.accepted + changes.len() as u64;
        let mut batch = Batch::default();
        let bytes = snapshot.len();
        let mut authors = BTreeSet::new();
        let mut head = ledger.audit;
        let mut unparked = Vec::new();
        let stored = (|| {
            if !base.is_empty() {
                // The new snapshot holds the changes accepted since the last one too.
                self.keep_signatures_only(&mut batch, &id)?;
            }
            // The snapshot holds every change: each is stored as its signature alone, or
            // vouched for.
            for change in &changes {
                batch.put(
                    keys::envelope(&id, &change.hash),
                    StoredChange::in_snapshot(change.signature.as_ref()),
                );
                // With nothing held pending, there is no record to take off.
                if !ledger.pending.holds_none() {
                    unparked.push(self.unpark(&mut batch, &id, &change.hash)?);
                }
                authors.insert(change.author);
                head = self.append_audit(
                    &mut batch,
                    head,
                    AuditAction::Accepted,
                    (id, change.hash),
                    Some(change.institution.clone()),
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
                cover: Some(DocumentRecord::encode_cover(&cover)),
            };
            batch.put(keys::per_document(keys::SNAPSHOT, &id), snapshot);
            batch.put(keys::per_document(keys::DOCUMENT, &id), encode(&record));
            batch.put(keys::per_document(keys::CATALOGUE, &id), digest.to_vec());
            for author in &authors {
                batch.put(keys::author(author, &id), Vec::new());
            }
            batch.put(keys::ACCEPTED, accepted.to_be_bytes().to_vec());
            self.reindex(&mut batch, &id, &view)?;
            self.commit.apply(&self.store, batch)
        })();
        *ticket = match stored {
            Ok(applied) => applied,
            Err(error) => {
                if base.is_empty() {
                    whole.doc = doc;
                }
                return WholeDecision::Failed(error, whole);
            }
        };
        for unparked in unparked {
            ledger.pending.settled(unparked);
        }
        ledger.audit = head;
        ledger.accepted = accepted;
        self.store.set_accepted(accepted);
        self.catalogue_mut().insert(*id.as_bytes(), digest);
        set_view_id(&mut view, id);
        self.note_urgency(id, &view, false);
        self.lock_views().insert(id, digest, Arc::new(view));
        let mut documents = self.lock_documents();
        documents.remove(&id);
        documents.insert(
            id,
            Cached {
                doc,
                kind,
                bytes,
                used: 0,
            },
        );
        WholeDecision::Accepted
    }

    /// Whether the store still holds a document as it was when prepared whole: at the same
    /// heads (or nothing of it), and none of its new changes in quarantine (looked up only
    /// when `any_quarantined`: the ledger counts a record for every one kept).
    pub(super) fn still_as_prepared(
        &self,
        id: &DocumentId,
        prepared: &PreparedWhole,
        any_quarantined: bool,
    ) -> Result<bool, StoreError> {
        if self.stored_heads(id)? != prepared.base {
            return Ok(false);
        }
        if !any_quarantined {
            return Ok(true);
        }
        for change in &prepared.changes {
            if self
                .store
                .get(&keys::quarantined(&change.hash, id))?
                .is_some()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The changes of `history` (in causal order, with each one's author and admission) that lie
/// within a revoked key's cut-off: the key's cut-off heads among them and every change below
/// one, as (key, change).
fn within_cutoffs(
    history: &[Change],
    admitted: &[(Bytes32, Admission)],
) -> HashSet<(Bytes32, ChangeHash)> {
    let mut within = HashSet::new();
    if !admitted
        .iter()
        .any(|(_, admission)| matches!(admission, Admission::WithinCutoff(_)))
    {
        return within;
    }
    let deps: HashMap<ChangeHash, &[ChangeHash]> =
        history.iter().map(|c| (c.hash(), c.deps())).collect();
    for (change, (author, admission)) in history.iter().zip(admitted) {
        if !matches!(admission, Admission::WithinCutoff(_)) {
            continue;
        }
        let mut below = vec![change.hash()];
        while let Some(hash) = below.pop() {
            if within.insert((*author, hash)) {
                below.extend(deps.get(&hash).copied().into_iter().flatten());
            }
        }
    }
    within
}

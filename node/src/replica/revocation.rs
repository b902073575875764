//! Revocation cut-offs: which changes of a revoked key are vouched for by a signed cut-off,
//! which are held until the cut-off can be drawn, and the withdrawal of those past it.

use super::*;

impl Node {
    /// The revoked keys that vouch for `change`: it is one of their cut-off heads, or was
    /// marked as an ancestor of one.
    pub(super) fn vouchers(&self, change: &ChangeHash) -> Result<Vec<Bytes32>, StoreError> {
        let mut keys = {
            let membership = self.membership();
            // Marks exist only for revoked keys: without one, no scan on the hot path.
            if membership.view().revocations.is_empty() {
                return Ok(Vec::new());
            }
            membership.cutoff_keys_of(change)
        };
        for key in self.store.keys_with_prefix(&keys::vouched_for(change))? {
            if let Some((_, voucher)) = keys::parse_vouched(&key) {
                keys.push(voucher);
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
    pub(super) fn vouch(
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
    pub(super) fn held_dependencies(
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
    pub(super) fn held_anywhere(
        &self,
        hash: &ChangeHash,
    ) -> Result<Vec<(DocumentId, Vec<ChangeHash>)>, StoreError> {
        let mut copies = Vec::new();
        for page in pages(&self.store, &[keys::PENDING]) {
            for (key, value) in page? {
                if keys::parse_pending(&key).is_some_and(|(_, pending)| pending == *hash) {
                    let record = decode::<PendingRecord>(&value, "pending record")?;
                    copies.push((record.document, dependencies_of(&record.envelope)));
                }
            }
        }
        for (_, value) in self.store.scan_prefix(&keys::quarantined_copies(hash))? {
            let record = decode::<QuarantineRecord>(&value, "quarantine record")?;
            copies.push((record.document, record.dependencies()));
        }
        Ok(copies)
    }

    /// A change of a revoked key that nothing here vouches for: past the cut-off once the
    /// cut-off can be drawn here, held until then (bounded per key).
    pub(super) fn past_revocation(
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
            let prefix = keys::held_of(&key);
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
    pub(super) fn cutoff_drawn(&self, key: &Bytes32) -> Result<bool, StoreError> {
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
        for page in pages(&self.store, &[keys::VOUCHED]) {
            for (mark, value) in page? {
                // Another key's marks, even damaged ones, say nothing of this key's cut-off.
                let Some((hash, revoked)) = keys::parse_vouched(&mark) else {
                    continue;
                };
                if revoked != *key {
                    continue;
                }
                let Ok(document) = <[u8; 16]>::try_from(value.as_slice()) else {
                    return Err(StoreError::Corrupt {
                        what: "cut-off mark",
                    });
                };
                let document = DocumentId::from_bytes(document);
                let held = self.store.get(&keys::envelope(&document, &hash))?.is_some()
                    || self.held_dependencies(&document, &hash)?.is_some();
                if !held {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The changes of a revoked key held for its cut-off, if the cut-off can now be drawn.
    pub(super) fn held_past_cutoff(&self, key: &Bytes32) -> Result<Vec<ChangeHash>, StoreError> {
        if !self.cutoff_drawn(key)? {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .keys_with_prefix(&keys::held_of(key))?
            .iter()
            .filter_map(|held| keys::parse_held(held).map(|(_, hash, _)| hash))
            .collect())
    }

    /// Finishes what a start or a roster update leaves to do: applies the revocations not
    /// applied yet, decides again the changes a crash left waiting for that, then settles.
    pub(super) fn catch_up_revocations(&self) -> Result<(), NodeError> {
        let ticket = {
            let mut ledger = self.lock_ledger();
            let mut ticket = self.commit.applied();
            // Held for a cut-off, a roster, or withdrawn by a revocation a crash interrupted.
            for key in self.store.keys_with_prefix(&[keys::WAITS_ON_ITSELF])? {
                if let Some((hash, _)) = keys::parse_waits_on_itself(&key) {
                    ledger.woken.push_back(hash);
                }
            }
            self.apply_revocations(&mut ledger, &mut ticket)?;
            self.apply_erasures(&mut ledger, &mut ticket)?;
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
    pub(super) fn apply_revocations(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
    ) -> Result<(), NodeError> {
        let revoked = {
            let membership = self.membership();
            membership
                .revoked_keys()
                .into_iter()
                .map(|key| (key, membership.cutoff_of(&key)))
                .collect::<Vec<_>>()
        };
        for (key, cutoff) in revoked {
            let applied = keys::revocation_applied(&key);
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
            for author in self.store.keys_with_prefix(&keys::authored_by(&key))? {
                let Some((_, document)) = keys::parse_author(&author) else {
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
    pub(super) fn withdraw(
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
        // A change kept vouched for needs a signed later change of its author among those
        // kept, or nothing proves who wrote it: it is withdrawn too (with what builds on it),
        // and not held, having no signature of its own. Peers that hold it with its proof
        // send it again, to be decided against the cut-off afresh.
        let mut unsigned = HashSet::new();
        for change in &kept {
            let hash = change.hash();
            if let Some(value) = self.store.get(&keys::envelope(&document, &hash))?
                && matches!(StoredChange::decode(value)?, StoredChange::Vouched)
            {
                unsigned.insert(hash);
            }
        }
        while !unsigned.is_empty() {
            let unproven: HashSet<ChangeHash> = crate::authorship::cover(&kept)
                .into_iter()
                .map(|(hash, _)| hash)
                .filter(|hash| unsigned.contains(hash))
                .collect();
            if unproven.is_empty() {
                break;
            }
            let mut still = Vec::with_capacity(kept.len());
            for change in kept {
                let hash = change.hash();
                if unproven.contains(&hash) || change.deps().iter().any(|d| gone.contains(d)) {
                    gone.insert(hash);
                    withdrawn.push(hash);
                } else {
                    still.push(change);
                }
            }
            kept = still;
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
            let Some(envelope) = StoredChange::decode(
                self.store
                    .get(&envelope_key)?
                    .ok_or(StoreError::Corrupt { what: "envelope" })?,
            )?
            .into_envelope(document, hash, &doc)?
            else {
                // Vouched for, without a signature of its own: not held (see above).
                batch.delete(envelope_key);
                let author = crate::model::automerge::ReadDoc::get_change_by_hash(&doc, hash)
                    .and_then(|change| crate::envelope::author_of(change.actor_id().to_bytes()))
                    .ok_or(StoreError::Corrupt {
                        what: "a change its snapshot lacks",
                    })?;
                let institution = self.membership().institution_of(&Bytes32(author));
                audit_head = self.append_audit(
                    &mut batch,
                    audit_head,
                    AuditAction::Withdrawn,
                    (document, *hash),
                    institution,
                );
                continue;
            };
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
        let cover = DocumentRecord::encode_cover(&crate::authorship::cover(&kept));
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
                cover: Some(cover),
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
}

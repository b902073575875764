//! Erasure on legal order. The consortium authority orders a health file erased in the roster
//! (`RosterOp::Erase`); every node that holds the roster deletes the file's content and the
//! referrals of its resident, and leaves a tombstone (`z ‖ document`) that refuses their
//! changes, without storing them, for good: a node back from offline that still holds them
//! cannot bring them back, since no node stores or fetches them again.
//!
//! What goes: every stored change and signature (`e`), the snapshot (`s`), the record and
//! catalogue entry (`d`, `c`), index entries (`x` and what it lists), pending and
//! quarantined copies of its changes, the cached document and its kept view. What stays: the
//! document's id and its changes' hashes where other records name them (the audit log, whose
//! chain cannot be edited, and the `u` author keys), the tombstone with the order's reference,
//! and an audit record of the erasure.

use super::*;

/// Why a document is erased: the tombstone `z ‖ document` holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRecord {
    /// The health file the order names (the document itself, or its resident's file for a
    /// referral).
    pub file: DocumentId,
    /// The order's reference, as the roster gives it.
    pub order: String,
    /// When the authority ordered it, in milliseconds since the epoch.
    pub ordered_at_ms: i64,
    /// When this node erased it.
    pub erased_at_ms: i64,
}

impl Node {
    /// Whether `document` was erased on legal order here.
    pub fn is_erased(&self, document: &DocumentId) -> Result<bool, StoreError> {
        Ok(self
            .store
            .get(&keys::per_document(keys::ERASED, document))?
            .is_some())
    }

    /// The erasure of `document`, if it was erased here.
    pub fn erasure_of(&self, document: &DocumentId) -> Result<Option<ErasureRecord>, StoreError> {
        match self
            .store
            .get(&keys::per_document(keys::ERASED, document))?
        {
            Some(bytes) => Ok(Some(decode(&bytes, "erasure record")?)),
            None => Ok(None),
        }
    }

    /// Applies the erasures of the roster held that this node has not applied yet: the
    /// health file and every referral of its resident held here. Each document is erased in
    /// one batch with its tombstone and audit record, so a crash midway resumes at the next
    /// start with what is left.
    pub(super) fn apply_erasures(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
    ) -> Result<(), NodeError> {
        let erasures = self.membership().view().erasures.clone();
        for erasure in erasures {
            if self.is_erased(&erasure.document)? {
                continue;
            }
            let record = ErasureRecord {
                file: erasure.document,
                order: erasure.order.clone(),
                ordered_at_ms: erasure.at.0,
                erased_at_ms: audit::now_ms(),
            };
            // The referrals first: the file's tombstone says the whole order is applied.
            let referrals: Vec<DocumentId> = self
                .store
                .keys_with_prefix(&index::patient_prefix(&erasure.document))?
                .iter()
                .filter_map(|key| index::document_of(key))
                .collect();
            for referral in referrals {
                self.erase(ledger, ticket, referral, &record)?;
            }
            self.erase(ledger, ticket, erasure.document, &record)?;
            tracing::warn!(document = %erasure.document, "health file erased on the authority's order");
        }
        Ok(())
    }

    /// Deletes what this node holds of `document` and leaves its tombstone (see the module).
    pub(super) fn erase(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        document: DocumentId,
        record: &ErasureRecord,
    ) -> Result<(), StoreError> {
        // Out of the cache first: whoever changes a document takes it out.
        drop(self.take(ledger, &document)?);
        let mut batch = Batch::default();
        for key in self
            .store
            .keys_with_prefix(&keys::per_document(keys::ENVELOPE, &document))?
        {
            batch.delete(key);
        }
        for prefix in [keys::SNAPSHOT, keys::DOCUMENT, keys::CATALOGUE] {
            batch.delete(keys::per_document(prefix, &document));
        }
        let index_record = keys::per_document(index::RECORD, &document);
        if let Some(bytes) = self.store.get(&index_record)? {
            for key in decode::<Vec<Vec<u8>>>(&bytes, "index record")? {
                batch.delete(key);
            }
        }
        batch.delete(index_record);
        // Quarantined copies of its changes hold its content too.
        let (mut bodies, mut records) = (ledger.quarantine_bodies, ledger.quarantined);
        for key in self.store.keys_with_prefix(&[keys::QUARANTINE])? {
            if keys::parse_quarantined(&key).is_some_and(|(_, of)| of == document)
                && let Some(value) = self.store.get(&key)?
            {
                let quarantined: QuarantineRecord = decode(&value, "quarantine record")?;
                bodies = bodies.saturating_sub(quarantined.envelope.len() as u64);
                records = records.saturating_sub(1);
                batch.delete(key);
            }
        }
        batch.put(keys::QUARANTINE_BODIES, bodies.to_be_bytes().to_vec());
        batch.put(keys::per_document(keys::ERASED, &document), encode(record));
        ledger.audit = append_record(
            &mut batch,
            ledger.audit,
            AuditRecord::of_node(record.erased_at_ms, AuditAction::Erased, document, None),
        );
        *ticket = self.commit.apply(&self.store, batch)?;
        (ledger.quarantine_bodies, ledger.quarantined) = (bodies, records);
        // Its pending changes, each with the keys that point at it.
        for key in self
            .store
            .keys_with_prefix(&keys::per_document(keys::PENDING, &document))?
        {
            if let Some((_, hash)) = keys::parse_pending(&key) {
                self.drop_pending(ledger, ticket, Vec::new(), &document, &hash)?;
            }
        }
        self.catalogue_mut().remove(document.as_bytes());
        self.lock_views().remove(&document);
        Ok(())
    }

    /// Refuses a referral of an erased resident, arriving after the erasure (written on a
    /// node that had not learnt of it): the referral is erased with its resident, tombstone
    /// and all, and nothing of it is stored.
    pub(super) fn refuse_erased_referral(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        referral: DocumentId,
        patient: &DocumentId,
    ) -> Result<IngestError, StoreError> {
        let Some(mut record) = self.erasure_of(patient)? else {
            return Err(StoreError::Corrupt {
                what: "erasure record",
            });
        };
        record.erased_at_ms = audit::now_ms();
        self.erase(ledger, ticket, referral, &record)?;
        Ok(IngestError::Erased { document: referral })
    }
}

//! Upgrades a store written in an older layout, in pages of bounded size.

use super::*;

impl Node {
    /// Converts a store of format 3 to format 4: every referral's index entries are written
    /// again (`reindex`), so the desk index holds it and the destination index of earlier
    /// releases (`r ‖ destination ‖ 0 ‖ status ‖ 0 ‖ document`) no longer does (its keys are
    /// among the document's recorded ones); then the format. A conversion a crash interrupted
    /// runs again at the next open, and reindexing what is already converted writes nothing
    /// new.
    pub(super) fn index_desks(&self) -> Result<(), NodeError> {
        let referrals = self.reindex_to_format(4, |id| {
            Ok(match self.kind_of(*id)? {
                Some(DocumentKind::Referral) => Some(View::Referral(Box::new(self.referral(*id)?))),
                _ => None,
            })
        })?;
        tracing::info!(
            referrals,
            "referrals indexed on their desks (store format 4)"
        );
        Ok(())
    }

    /// Converts a store of format 4 to format 5 (and so 6, which needs no conversion): every
    /// health file whose index entries lack the resident's summary (written before entries
    /// held one, and so before conflicted documents had their own entry too) is indexed again
    /// from its view; then the format.
    ///
    /// Since format 5 a write rewrites a document's entries only when its view's entries
    /// change, trusting the stored entries to be those of the view before it: entries of an
    /// earlier release would otherwise stay as they are. A conversion a crash interrupted runs
    /// again at the next open and finds fewer to do. A store whose entries all hold summaries
    /// costs a read of each file's index record.
    pub(super) fn index_summaries(&self) -> Result<(), NodeError> {
        // A file whose records or content cannot be read is left as it is, for `verify` to
        // name and `repair` to take out (both need the node open); only the store failing
        // ends the conversion. Format 6 (audit runs) needs no conversion: this is the last.
        let files =
            self.reindex_to_format(STORE_FORMAT, |id| match self.view_lacking_summaries(id) {
                Err(error @ NodeError::Store(StoreError::Backend(_))) => Err(error),
                Err(error) => {
                    tracing::warn!(document = %id, %error, "a health file not indexed again");
                    Ok(None)
                }
                view => view,
            })?;
        tracing::info!(
            files,
            "health files indexed with their residents' summaries (store format 5 and on)"
        );
        Ok(())
    }

    /// Indexes again every document `view_of` gives a view for, a page of documents per
    /// batch, then writes `format`. Returns how many were indexed.
    fn reindex_to_format(
        &self,
        format: u32,
        view_of: impl Fn(&DocumentId) -> Result<Option<View>, NodeError>,
    ) -> Result<usize, NodeError> {
        const PAGE_DOCUMENTS: usize = 256;
        let ids: Vec<DocumentId> = self
            .catalogue()
            .ids()
            .map(|id| DocumentId::from_bytes(*id))
            .collect();
        let mut indexed = 0usize;
        for page in ids.chunks(PAGE_DOCUMENTS) {
            let mut batch = Batch::default();
            for id in page {
                if let Some(view) = view_of(id)? {
                    self.reindex(&mut batch, id, &view)?;
                    indexed += 1;
                }
            }
            self.commit.commit(&self.store, batch)?;
        }
        let mut batch = Batch::default();
        batch.put(keys::FORMAT, format.to_be_bytes().to_vec());
        self.commit.commit(&self.store, batch)?;
        Ok(indexed)
    }

    /// The view of a health file whose resident's entries lack their summary; `None` for any
    /// other document.
    fn view_lacking_summaries(&self, id: &DocumentId) -> Result<Option<View>, NodeError> {
        if self.kind_of(*id)? != Some(DocumentKind::HealthFile)
            || !self.index_lacks_summaries(id)?
        {
            return Ok(None);
        }
        Ok(Some(View::HealthFile(Box::new(self.health_file(*id)?))))
    }

    /// Whether a document's index record is missing, or names a resident's entry without a
    /// summary (`index::lacks_summary`).
    fn index_lacks_summaries(&self, id: &DocumentId) -> Result<bool, NodeError> {
        let Some(bytes) = self.store.get(&keys::per_document(index::RECORD, id))? else {
            return Ok(true);
        };
        let recorded: Vec<Vec<u8>> = decode(&bytes, "index record")?;
        for key in recorded {
            let value = self.store.get(&key)?.unwrap_or_default();
            if index::lacks_summary(&key, &value) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Converts a store of format 1 (quarantine and pending records keyed by change alone) to
/// format 2: pending records under their document, with their waits and their place in their
/// author's order; quarantine records under their change and document, with their digest,
/// size and dependencies, keeping envelopes only within `QUARANTINE_BODIES_BYTES_MAX`. Works a
/// page at a time, so a format-1 quarantine of any size converts in bounded memory. Old keys
/// are told apart by their length, so a conversion a crash interrupted resumes at the next
/// open (the format is written only after it). A record that no longer decodes is dropped
/// with a log line: a peer offers the change again.
pub(super) fn migrate_to_format_2(store: &WitnessedStore) -> Result<(), StoreError> {
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
pub(super) fn for_each_page(
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

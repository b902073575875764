//! `verify` re-checks the whole store against its invariants; `repair` rebuilds what can be
//! derived again; storage figures per keyspace.

use super::*;

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

impl Node {
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
    pub(super) fn verify_locked(&self, ledger: &Ledger) -> Result<VerifyReport, NodeError> {
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
        for page in pages(&self.store, &[keys::DOCUMENT]) {
            for (key, value) in page? {
                report.documents += 1;
                let Some(document) = keys::parse_per_document(keys::DOCUMENT, &key) else {
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
        }
        if let Some(problem) = self.check_audit_chain(ledger.audit) {
            report.problems.push(problem);
        }
        // Envelopes of a document without a record, a page of keys at a time.
        let mut orphans = BTreeSet::new();
        for page in pages(&self.store, &[keys::ENVELOPE]) {
            for (key, _) in &page? {
                match keys::parse_envelope(key) {
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
    pub(super) fn verify_document(
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
        let mut vouched = HashSet::new();
        let mut tail = Vec::new();
        for (key, value) in stored {
            *envelopes += 1;
            let Some((_, hash)) = keys::parse_envelope(&key) else {
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
                Ok(StoredChange::Vouched) => {
                    if crate::model::automerge::ReadDoc::get_change_by_hash(&doc, &hash).is_none()
                    {
                        problems.push(format!(
                            "change {hash} is stored vouched for, and its snapshot lacks it"
                        ));
                    }
                    vouched.insert(hash);
                }
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
        let changes = doc.get_changes(&[]);
        if changes.iter().any(|c| !hashes.contains(&c.hash())) {
            problems.push("its snapshot holds a change that is not stored as accepted".into());
        }
        // A change stored vouched for has a signed later change of its author: every author's
        // latest change is stored with its signature (checked above).
        for (hash, _) in crate::authorship::cover(&changes) {
            if vouched.contains(&hash) {
                problems.push(format!(
                    "change {hash} is its author's latest and is stored without its signature"
                ));
            }
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
            let prefix = keys::per_document(keys::ENVELOPE, id);
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

    /// Of `storage_bytes`, the bytes of the store engine's journals: a bounded amount kept
    /// until the engine has the writes in its tables (the log-structured engine's journal
    /// is rotated at 64 MB), which does not grow with the store.
    pub fn storage_journal_bytes(&self) -> Result<u64, NodeError> {
        Ok(self.store.journal_bytes_on_disk()?)
    }

    /// The engine the store is kept in.
    pub fn store_engine(&self) -> crate::store::StoreEngine {
        self.store.engine()
    }

    /// The bytes of keys and values the store holds, per keyspace (named by its first key
    /// byte, `m` for every `m/…` key): what `storage_bytes` holds beyond them is the storage
    /// engine's own overhead and space not yet reclaimed. Reads the whole store a page at a
    /// time, so it is for benchmarks and diagnosis, not a request path.
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

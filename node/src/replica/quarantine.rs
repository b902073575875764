//! Refused changes and envelopes, kept with their reason (bodies up to a byte budget),
//! listed in pages and purged on request.

use super::*;

/// One page of the quarantine listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinePage {
    /// The records of this page.
    pub entries: Vec<QuarantineEntry>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

pub(super) fn quarantine_entry(key: &[u8], value: &[u8]) -> Result<QuarantineEntry, StoreError> {
    let record: QuarantineRecord = decode(value, "quarantine record")?;
    let change = match record.claimed {
        Some(claimed) => claimed,
        None => {
            keys::parse_quarantined(key)
                .map(|(hash, _)| hash.0)
                .ok_or(StoreError::Corrupt {
                    what: "quarantine key",
                })?
        }
    };
    Ok(QuarantineEntry {
        change,
        document: record.document,
        reason: record.reason,
        envelope_bytes: record.envelope_bytes,
        envelope_kept: !record.envelope.is_empty(),
        at_ms: record.at_ms,
    })
}

/// Bytes as lowercase hex: listing cursors, and hashes and signatures in API answers.
pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Longest listing cursor accepted, in bytes (a quarantine key is at most 49).
pub(super) const CURSOR_BYTES_MAX: usize = 128;
// The longest listing key (`q ‖ change hash ‖ document`) fits a cursor.
const _: () = assert!(1 + 32 + 16 <= CURSOR_BYTES_MAX);

/// A listing cursor back to bytes; `None` if it is not even-length hex within
/// `CURSOR_BYTES_MAX`.
pub(crate) fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 2 * CURSOR_BYTES_MAX {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why a change built on a quarantined change is quarantined with it.
pub const REASON_DEPENDS_ON_QUARANTINED: &str = "it depends on a quarantined change";
/// Why a revoked key's change past its cut-off is quarantined.
pub const REASON_PAST_CUTOFF: &str =
    "the author's key was revoked and this change is not within the revocation's cut-off";

/// A quarantined change as operators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The change.
    pub change: [u8; 32],
    /// Its document.
    pub document: DocumentId,
    /// Why it was refused (names fields and rules, never content).
    pub reason: String,
    /// The envelope's size in bytes.
    #[serde(default)]
    pub envelope_bytes: u64,
    /// Whether the envelope is kept whole (bodies are kept up to a byte budget).
    #[serde(default)]
    pub envelope_kept: bool,
    /// When it was quarantined, in milliseconds since the epoch (0 if not recorded).
    #[serde(default)]
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct QuarantineRecord {
    pub(super) document: DocumentId,
    /// For a refused envelope, the change it claims to carry.
    #[serde(default)]
    pub(super) claimed: Option<[u8; 32]>,
    pub(super) reason: String,
    /// The envelope, when the quarantine's body budget had room for it (empty otherwise).
    #[serde(with = "serde_bytes")]
    pub(super) envelope: Vec<u8>,
    /// SHA-256 of the envelope, kept whether or not its body is.
    #[serde(default)]
    pub(super) digest: Option<[u8; 32]>,
    /// The envelope's size in bytes.
    #[serde(default)]
    pub(super) envelope_bytes: u64,
    /// When it was quarantined, in milliseconds since the epoch (0: before this was kept).
    #[serde(default)]
    pub(super) at_ms: u64,
    /// The change's dependencies, kept whether or not the envelope is (`None`: a record from
    /// before they were kept; read from its envelope).
    #[serde(default)]
    pub(super) deps: Option<Vec<[u8; 32]>>,
}

impl QuarantineRecord {
    pub(super) fn new(
        document: DocumentId,
        claimed: Option<[u8; 32]>,
        reason: &str,
        envelope: &[u8],
    ) -> Self {
        Self {
            document,
            claimed,
            reason: reason.to_string(),
            envelope: envelope.to_vec(),
            digest: Some(Sha256::digest(envelope).into()),
            envelope_bytes: envelope.len() as u64,
            at_ms: u64::try_from(audit::now_ms()).unwrap_or(0),
            deps: Some(
                dependencies_of(envelope)
                    .into_iter()
                    .map(|hash| hash.0)
                    .collect(),
            ),
        }
    }

    pub(super) fn dependencies(&self) -> Vec<ChangeHash> {
        match &self.deps {
            Some(deps) => deps.iter().copied().map(ChangeHash).collect(),
            None => dependencies_of(&self.envelope),
        }
    }
}

impl Node {
    /// The quarantined changes, with their reasons.
    pub fn quarantine(&self) -> Result<Vec<QuarantineEntry>, NodeError> {
        let mut entries = Vec::new();
        let mut after = None;
        loop {
            let page = self.quarantine_page(after.as_deref(), QUARANTINE_PAGE_RECORDS_MAX)?;
            entries.extend(page.entries);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(entries),
            }
        }
    }

    /// One page of the quarantine, in key order from just after the cursor `after` (a
    /// page's `next`), at most `limit` records (capped at `QUARANTINE_PAGE_RECORDS_MAX`).
    pub fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<QuarantinePage, NodeError> {
        let limit = limit.clamp(1, QUARANTINE_PAGE_RECORDS_MAX);
        let start = match after {
            None => Vec::new(),
            Some(cursor) => {
                let mut key = hex_decode(cursor).ok_or(NodeError::BadCursor)?;
                // Just past the cursor's key.
                key.push(0);
                key
            }
        };
        let mut records = Vec::new();
        // Both keyspaces, in key order ('f' before 'q').
        for prefix in [keys::REFUSED, keys::QUARANTINE] {
            if records.len() > limit {
                break;
            }
            let from = if start.first() == Some(&prefix) {
                start.clone()
            } else if start.first().is_none_or(|first| *first < prefix) {
                vec![prefix]
            } else {
                continue;
            };
            records.extend(
                self.store
                    .scan_from(&[prefix], &from, limit + 1 - records.len())?,
            );
        }
        let next = (records.len() > limit).then(|| hex_encode(&records[limit - 1].0));
        records.truncate(limit);
        let entries = records
            .into_iter()
            .map(|(key, value)| quarantine_entry(&key, &value))
            .collect::<Result<_, StoreError>>()?;
        Ok(QuarantinePage { entries, next })
    }

    /// The quarantine records of `change`: its copies judged in each document (one short
    /// prefix scan), then refused envelopes that claim it (read a page at a time).
    pub fn quarantined_change(
        &self,
        change: &ChangeHash,
    ) -> Result<Vec<QuarantineEntry>, NodeError> {
        let mut entries: Vec<QuarantineEntry> = self
            .store
            .scan_prefix(&keys::quarantined_copies(change))?
            .iter()
            .map(|(key, value)| quarantine_entry(key, value))
            .collect::<Result<_, StoreError>>()?;
        let mut from = vec![keys::REFUSED];
        loop {
            let page =
                self.store
                    .scan_from(&[keys::REFUSED], &from, QUARANTINE_PAGE_RECORDS_MAX)?;
            let Some((last, _)) = page.last() else {
                return Ok(entries);
            };
            from = [last.as_slice(), &[0]].concat();
            for (key, value) in &page {
                let entry = quarantine_entry(key, value)?;
                if entry.change == change.0 {
                    entries.push(entry);
                }
            }
        }
    }

    /// Removes quarantine records, with their envelopes: every record, or those quarantined
    /// before `before_ms` (milliseconds since the epoch). A purged change that arrives again
    /// is judged again, and quarantined again. The purge is on the audit log. Returns how many
    /// records went.
    pub fn purge_quarantine(&self, before_ms: Option<u64>) -> Result<usize, NodeError> {
        let (ticket, purged) = {
            let mut ledger = self.lock_ledger();
            // The purge is on record before anything goes: the audit record is in the first
            // batch.
            let mut batch = Batch::default();
            ledger.audit = append_record(
                &mut batch,
                ledger.audit,
                AuditRecord::of_node(
                    audit::now_ms(),
                    AuditAction::QuarantinePurged,
                    DocumentId::from_bytes([0; 16]),
                    Some(self.institution.clone()),
                ),
            );
            let mut purged = 0usize;
            for prefix in [keys::REFUSED, keys::QUARANTINE] {
                let mut from = vec![prefix];
                loop {
                    let page =
                        self.store
                            .scan_from(&[prefix], &from, QUARANTINE_PAGE_RECORDS_MAX)?;
                    let Some((last, _)) = page.last() else {
                        break;
                    };
                    from = [last.as_slice(), &[0]].concat();
                    let (mut bodies, mut records) = (ledger.quarantine_bodies, ledger.quarantined);
                    let mut purged_here = 0;
                    for (key, value) in &page {
                        let record: QuarantineRecord = decode(value, "quarantine record")?;
                        if before_ms.is_some_and(|before| record.at_ms >= before) {
                            continue;
                        }
                        bodies = bodies.saturating_sub(record.envelope.len() as u64);
                        records = records.saturating_sub(1);
                        batch.delete(key.clone());
                        purged_here += 1;
                    }
                    batch.put(keys::QUARANTINE_BODIES, bodies.to_be_bytes().to_vec());
                    self.commit.apply(&self.store, std::mem::take(&mut batch))?;
                    (ledger.quarantine_bodies, ledger.quarantined) = (bodies, records);
                    purged += purged_here;
                }
            }
            let ticket = self.commit.apply(&self.store, batch)?;
            tracing::warn!(purged, "quarantine records purged");
            (ticket, purged)
        };
        self.commit.wait_durable(&self.store, ticket)?;
        self.audit_updates
            .send_replace(self.lock_ledger().audit.sequence);
        Ok(purged)
    }

    pub(super) fn quarantined(
        &self,
        ledger: &mut Ledger,
        ticket: &mut u64,
        verified: &VerifiedChange,
        reason: &str,
    ) -> Result<Ingested, IngestError> {
        if ledger.quarantined >= QUARANTINE_CHANGES_MAX {
            tracing::warn!(document = %verified.document, change = %verified.hash, reason, "change refused; the quarantine is full");
            return Err(IngestError::QuarantineFull);
        }
        tracing::info!(document = %verified.document, change = %verified.hash, reason, "change quarantined");
        let record = QuarantineRecord::new(verified.document, None, reason, &verified.encoded);
        let mut batch = Batch::default();
        let body = self.put_quarantine(
            ledger,
            &mut batch,
            keys::quarantined(&verified.hash, &verified.document),
            record,
        );
        let unparked = self.unpark(&mut batch, &verified.document, &verified.hash)?;
        let institution = self.membership().institution_of(&verified.author);
        let head = self.append_audit(
            &mut batch,
            ledger.audit,
            AuditAction::Quarantined,
            (verified.document, verified.hash),
            institution,
        );
        *ticket = self.commit.apply(&self.store, batch)?;
        ledger.pending.settled(unparked);
        ledger.quarantine_bodies += body;
        ledger.audit = head;
        ledger.quarantined += 1;
        Ok(Ingested::Quarantined(verified.hash, reason.to_string()))
    }

    /// Adds a quarantine record to `batch`, keeping its envelope whole only while the bodies
    /// kept stay within `QUARANTINE_BODIES_BYTES_MAX` (the digest, size, reason and
    /// dependencies always). Returns the body bytes kept, to count once the batch is applied.
    pub(super) fn put_quarantine(
        &self,
        ledger: &Ledger,
        batch: &mut Batch,
        key: Vec<u8>,
        mut record: QuarantineRecord,
    ) -> u64 {
        let body = record.envelope.len() as u64;
        let kept = if ledger.quarantine_bodies + body <= QUARANTINE_BODIES_BYTES_MAX {
            batch.put(
                keys::QUARANTINE_BODIES,
                (ledger.quarantine_bodies + body).to_be_bytes().to_vec(),
            );
            body
        } else {
            record.envelope = Vec::new();
            0
        };
        batch.put(key, encode(&record));
        kept
    }

    /// Changes in quarantine, as of the last decision (without the decision lock).
    pub fn quarantine_count(&self) -> usize {
        self.counts
            .quarantined
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

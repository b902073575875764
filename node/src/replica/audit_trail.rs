//! The node's side of the audit chain: records appended in the same batch as what they
//! record, app accesses and exports, and checks of the chain.

use super::*;

/// How far back in a batch (in writes) the run of the record before is looked for: the
/// writes of one accepted change between two records are fewer (its change key, its pending
/// record's keys when it waited, the head). A run not found there is not lost: the record
/// starts a new one.
const RUN_LOOKBACK_WRITES: usize = 16;

/// Adds `record` to `batch` as the record after `head`, filling in its place in the chain;
/// returns the new head, to adopt once the batch is applied. Records appended to one batch
/// are stored as one run (`audit::append_to_run`), under the key of the last: a decision
/// about a document's dozen changes stores the hash of the record before once, not a dozen
/// times.
pub(super) fn append_record(
    batch: &mut Batch,
    head: AuditHead,
    mut record: AuditRecord,
) -> AuditHead {
    record.sequence = head.sequence + 1;
    record.previous = head.hash;
    let next = AuditHead {
        sequence: record.sequence,
        hash: record.hash(),
    };
    // The run this batch holds ends at `head` when the record before was appended to it.
    let run = batch.take_recent_put(&audit::record_key(head.sequence), RUN_LOOKBACK_WRITES);
    let (value, full) = audit::append_to_run(run, &record);
    if let Some(full) = full {
        batch.put(audit::record_key(head.sequence), full);
    }
    batch.put(audit::record_key(record.sequence), value);
    batch.take_recent_put(audit::HEAD, RUN_LOOKBACK_WRITES);
    batch.put(audit::HEAD, encode(&next));
    next
}

impl Node {
    /// Adds the next audit record to `batch`; returns the new head, to adopt once the batch
    /// is applied.
    pub(super) fn append_audit(
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

    /// An audit record of an app's access through this node.
    pub(super) fn app_record(
        &self,
        app: &str,
        action: AuditAction,
        document: DocumentId,
        change: Option<[u8; 32]>,
    ) -> AuditRecord {
        AuditRecord {
            sequence: 0,
            previous: [0; 32],
            at_ms: audit::now_ms(),
            action,
            document,
            change,
            institution: Some(self.institution.clone()),
            app: Some(app.to_owned()),
        }
    }

    /// Appends an app's records to the audit log in one batch and waits until they are
    /// durable, then wakes the change feed.
    pub(super) fn record_for_app(
        &self,
        app: &str,
        records: impl IntoIterator<Item = (AuditAction, DocumentId, Option<[u8; 32]>)>,
    ) -> Result<(), NodeError> {
        let ticket = {
            let mut ledger = self.lock_ledger();
            let mut batch = Batch::default();
            let mut head = ledger.audit;
            for (action, document, change) in records {
                head = append_record(
                    &mut batch,
                    head,
                    self.app_record(app, action, document, change),
                );
            }
            if batch.is_empty() {
                return Ok(());
            }
            let ticket = self.commit.apply(&self.store, batch)?;
            ledger.audit = head;
            ticket
        };
        self.commit.wait_durable(&self.store, ticket)?;
        self.audit_updates
            .send_replace(self.lock_ledger().audit.sequence);
        Ok(())
    }

    /// Checks the audit log's hash chain from its first record to its head; `None` when it
    /// is whole.
    pub fn verify_audit(&self) -> Option<Problem> {
        let head = self.lock_ledger().audit;
        self.check_audit_chain(head)
    }

    pub(super) fn check_audit_chain(&self, head: AuditHead) -> Option<Problem> {
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

    /// Goes on checking the audit log's hash chain from where `check` stopped, at most
    /// `limit` records: how a check that runs alongside the node (the dashboard's) follows the
    /// log without reading it from the start each time. Once it reaches the head, the head's
    /// hash must match too. The inner `Err` names the first break (a record missing, out of
    /// place or not holding the hash of the one before); the outer `Err` is a store that could
    /// not be read now, which says nothing of the chain.
    pub fn continue_audit_check(
        &self,
        check: &mut audit::ChainCheck,
        limit: usize,
    ) -> Result<Result<(), Problem>, NodeError> {
        let head = self.lock_ledger().audit;
        let broken = |sequence: u64| Problem {
            document: None,
            what: format!("the audit log's hash chain breaks at record {sequence}"),
        };
        let mut left = limit;
        while left > 0 && check.checked() < head.sequence {
            let page = self.audit(check.checked() + 1, left.min(AUDIT_PAGE_RECORDS))?;
            if page.is_empty() {
                // Every record up to the head is written before the head moves.
                return Ok(Err(broken(check.checked() + 1)));
            }
            for record in &page {
                if check.checked() == head.sequence {
                    break;
                }
                // A record past the head here means the ones before it are missing.
                if let Err(sequence) = check.push(record) {
                    return Ok(Err(broken(sequence)));
                }
                left -= 1;
            }
        }
        if check.checked() == head.sequence
            && let Err(sequence) = check.finish(&head)
        {
            return Ok(Err(broken(sequence)));
        }
        Ok(Ok(()))
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
        // Runs read at a time: no more are read than the records asked for need, and at most
        // this many more.
        const AUDIT_SCAN_RUNS: usize = 16;
        // Keys are in sequence order, each run under its last record's: the first key from
        // `from` on holds the record `from`.
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut next = from.max(1);
        while records.len() < limit {
            let asked = AUDIT_SCAN_RUNS.min(limit - records.len());
            let runs = self
                .store
                .scan_from(&[audit::RECORD], &audit::record_key(next), asked)?;
            let read = runs.len();
            let scanned_from = next;
            for (key, value) in runs {
                let run = audit::decode_records(&key, &value).ok_or(NodeError::Store(
                    StoreError::Corrupt {
                        what: "audit record",
                    },
                ))?;
                records.extend(run.into_iter().filter(|record| record.sequence >= next));
                if let Some(last) = records.last() {
                    next = last.sequence.saturating_add(1);
                }
            }
            if read < asked || next == u64::MAX {
                break;
            }
            // Every value read holds a record at or past its key's sequence; values that do
            // not (a damaged store's) must not hold the scan in place.
            if next == scanned_from {
                return Err(NodeError::Store(StoreError::Corrupt {
                    what: "audit record",
                }));
            }
        }
        records.truncate(limit);
        Ok(records)
    }
}

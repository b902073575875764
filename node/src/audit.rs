//! The hash-chained audit log: every decision the node makes about a change, and every read
//! and write of patient data by an app through the API, in order, each record holding the
//! hash of the one before, so a record cannot be altered, removed or reordered without
//! breaking the chain. Records name documents, changes, institutions and apps, never patient
//! data.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{DocumentId, InstitutionId};

/// Key prefix: `l ‖ sequence (u64, big-endian)` → record.
pub(crate) const RECORD: u8 = b'l';
/// The head of the chain: sequence and hash of the last record.
pub(crate) const HEAD: &[u8] = b"m/audit_head";

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// A change was accepted.
    Accepted,
    /// A change was quarantined.
    Quarantined,
    /// An accepted change was taken back out of its document because its author's key was
    /// revoked (or it builds on such a change); it is then decided again.
    Withdrawn,
    /// An app read a document through the API.
    Read,
    /// An app wrote a change through the API (recorded after the change was accepted).
    Written,
    /// Every envelope the node holds was exported to a bundle; the record's document is the
    /// zero id, meaning all of them.
    Exported,
    /// An operator purged quarantine records; the record's document is the zero id.
    QuarantinePurged,
}

impl AuditAction {
    /// Whether the record is a decision about a change (what the change feed carries), as
    /// opposed to an app's access.
    pub fn is_decision(self) -> bool {
        matches!(
            self,
            AuditAction::Accepted | AuditAction::Quarantined | AuditAction::Withdrawn
        )
    }
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    pub sequence: u64,
    /// Hash of the record before (zeros for the first).
    pub previous: [u8; 32],
    /// When the node decided, in milliseconds since the epoch (the node's clock).
    pub at_ms: i64,
    /// What happened.
    pub action: AuditAction,
    /// The document.
    pub document: DocumentId,
    /// The change; none for a read.
    pub change: Option<[u8; 32]>,
    /// The institution whose key signed the change, when it is a member; for an app's access,
    /// this node's institution.
    pub institution: Option<InstitutionId>,
    /// The app, for a read or write through the API (the name of its token in the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

impl AuditRecord {
    /// The record's hash, which the next record holds.
    pub fn hash(&self) -> [u8; 32] {
        let mut bytes = Vec::new();
        ciborium::into_writer(self, &mut bytes).expect("CBOR encoding into memory");
        let mut hasher = Sha256::new();
        hasher.update(b"estuary/audit/v1");
        hasher.update(&bytes);
        hasher.finalize().into()
    }
}

/// The last record's sequence and hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AuditHead {
    pub sequence: u64,
    pub hash: [u8; 32],
}

/// The key of record `sequence`.
pub(crate) fn record_key(sequence: u64) -> Vec<u8> {
    [&[RECORD][..], &sequence.to_be_bytes()].concat()
}

/// The node's clock, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Checks a chain of records fed in order: sequences contiguous from 1, each holding the
/// hash of the one before, the last matching the head. Holds one hash, so a log of any length
/// is checked page by page.
#[derive(Default)]
pub(crate) struct ChainCheck {
    previous: [u8; 32],
    checked: u64,
}

impl ChainCheck {
    /// Checks the next record; on a break, returns its sequence.
    pub fn push(&mut self, record: &AuditRecord) -> Result<(), u64> {
        let expected = self.checked + 1;
        if record.sequence != expected || record.previous != self.previous {
            return Err(expected);
        }
        self.previous = record.hash();
        self.checked = expected;
        Ok(())
    }

    /// Checks that the last record pushed is the head; returns the records checked.
    pub fn finish(&self, head: &AuditHead) -> Result<u64, u64> {
        if head.sequence != self.checked || (head.sequence > 0 && head.hash != self.previous) {
            return Err(self.checked + 1);
        }
        Ok(self.checked)
    }
}

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
    /// A document was erased on the consortium authority's order: its content deleted here,
    /// and its changes refused from now on.
    Erased,
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
    /// A record of something the node itself did to `document` (no change, no app), to be
    /// appended: `append_record` gives it its place in the chain.
    pub(crate) fn of_node(
        at_ms: i64,
        action: AuditAction,
        document: DocumentId,
        institution: Option<InstitutionId>,
    ) -> Self {
        Self {
            sequence: 0,
            previous: [0; 32],
            at_ms,
            action,
            document,
            change: None,
            institution,
            app: None,
        }
    }

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

/// A record as the store keeps it: a CBOR array of its fields, hashes and ids as byte strings,
/// the action as a number, the sequence in the key only (~110 bytes for a decision about a
/// change, where the CBOR map the hash is computed over takes ~260). The hash does not depend
/// on it: `AuditRecord::hash` encodes the record itself.
#[derive(Serialize, Deserialize)]
struct Stored(
    serde_bytes::ByteArray<32>,
    i64,
    u8,
    serde_bytes::ByteArray<16>,
    Option<serde_bytes::ByteArray<32>>,
    Option<InstitutionId>,
    Option<String>,
);

/// The code a record stores an action as: its place in `ACTIONS`. A new action takes the next
/// code here (the match makes that a compile error to forget) and goes at the end of `ACTIONS`.
const fn code_of(action: AuditAction) -> u8 {
    match action {
        AuditAction::Accepted => 0,
        AuditAction::Quarantined => 1,
        AuditAction::Withdrawn => 2,
        AuditAction::Read => 3,
        AuditAction::Written => 4,
        AuditAction::Exported => 5,
        AuditAction::QuarantinePurged => 6,
        AuditAction::Erased => 7,
    }
}

/// Every action, at its code (`code_of`).
const ACTIONS: [AuditAction; 8] = [
    AuditAction::Accepted,
    AuditAction::Quarantined,
    AuditAction::Withdrawn,
    AuditAction::Read,
    AuditAction::Written,
    AuditAction::Exported,
    AuditAction::QuarantinePurged,
    AuditAction::Erased,
];

/// The value record `record` is stored as (under `record_key(record.sequence)`).
pub(crate) fn encode_record(record: &AuditRecord) -> Vec<u8> {
    let action = code_of(record.action);
    let stored = Stored(
        serde_bytes::ByteArray::new(record.previous),
        record.at_ms,
        action,
        serde_bytes::ByteArray::new(*record.document.as_bytes()),
        record.change.map(serde_bytes::ByteArray::new),
        record.institution.clone(),
        record.app.clone(),
    );
    let mut bytes = Vec::new();
    ciborium::into_writer(&stored, &mut bytes).expect("CBOR encoding into memory");
    bytes
}

/// Reads a stored record: the array `encode_record` writes (its sequence from the key), or the
/// map of the whole record that stores of format 2 hold. `None` if it is neither.
pub(crate) fn decode_record(key: &[u8], value: &[u8]) -> Option<AuditRecord> {
    if let Ok(Stored(previous, at_ms, action, document, change, institution, app)) =
        ciborium::from_reader::<Stored, _>(value)
    {
        let sequence = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
        return Some(AuditRecord {
            sequence,
            previous: previous.into_array(),
            at_ms,
            action: *ACTIONS.get(usize::from(action))?,
            document: DocumentId::from_bytes(document.into_array()),
            change: change.map(serde_bytes::ByteArray::into_array),
            institution,
            app,
        });
    }
    ciborium::from_reader::<AuditRecord, _>(value).ok()
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

/// The same clock unsigned, for the figures that compare times (sync, urgency, dashboard).
pub(crate) fn now_unix_ms() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}

/// Checks a chain of records fed in order: sequences contiguous from 1, each holding the
/// hash of the one before, the last matching the head. Holds one hash, so a log of any length
/// is checked page by page.
#[derive(Clone, Default, Debug)]
pub struct ChainCheck {
    previous: [u8; 32],
    checked: u64,
}

impl ChainCheck {
    /// Checks the next record; on a break, returns its sequence.
    pub(crate) fn push(&mut self, record: &AuditRecord) -> Result<(), u64> {
        let expected = self.checked + 1;
        if record.sequence != expected || record.previous != self.previous {
            return Err(expected);
        }
        self.previous = record.hash();
        self.checked = expected;
        Ok(())
    }

    /// Records checked so far, all sound.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Checks that the last record pushed is the head; returns the records checked.
    pub(crate) fn finish(&self, head: &AuditHead) -> Result<u64, u64> {
        if head.sequence != self.checked || (head.sequence > 0 && head.hash != self.previous) {
            return Err(self.checked + 1);
        }
        Ok(self.checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_is_listed_at_its_code() {
        for (index, action) in ACTIONS.iter().enumerate() {
            assert_eq!(usize::from(code_of(*action)), index, "{action:?}");
        }
    }

    #[test]
    fn records_are_stored_compactly_and_read_back_in_either_encoding() {
        for (action, change, app) in [
            (AuditAction::Accepted, Some([3; 32]), None),
            (AuditAction::Read, None, Some("emr".to_string())),
            (AuditAction::QuarantinePurged, None, None),
        ] {
            let record = AuditRecord {
                sequence: 7,
                previous: [1; 32],
                at_ms: 1_764_000_000_000,
                action,
                document: DocumentId::from_bytes([2; 16]),
                change,
                institution: Some(InstitutionId::new("chc-jianshe").unwrap()),
                app,
            };
            let key = record_key(7);
            let stored = encode_record(&record);
            assert_eq!(decode_record(&key, &stored), Some(record.clone()));
            let mut map = Vec::new();
            ciborium::into_writer(&record, &mut map).unwrap();
            assert!(
                stored.len() * 2 < map.len() + 40,
                "{} vs {}",
                stored.len(),
                map.len()
            );
            // A record written by a format-2 store reads the same.
            assert_eq!(decode_record(&key, &map), Some(record));
        }
        assert_eq!(decode_record(&record_key(1), b"junk"), None);
    }
}

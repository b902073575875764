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

    /// The record's hash, which the next record holds: over its CBOR map as serde writes it
    /// (`hashed_form`).
    pub fn hash(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(b"estuary/audit/v1");
        hasher.update(self.hashed_form());
        hasher.finalize().into()
    }

    /// The record as a CBOR map, byte for byte as `ciborium` serialises it (the form every
    /// chain so far was hashed over; a test holds the two equal), written directly: serde
    /// writes each of the 32 bytes of a hash as an item of its own, and a record is hashed
    /// for every decision.
    fn hashed_form(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(320);
        cbor_head(&mut out, MAJOR_MAP, 7 + u64::from(self.app.is_some()));
        cbor_text(&mut out, "sequence");
        cbor_head(&mut out, MAJOR_UNSIGNED, self.sequence);
        cbor_text(&mut out, "previous");
        cbor_byte_array(&mut out, &self.previous);
        cbor_text(&mut out, "at_ms");
        match u64::try_from(self.at_ms) {
            Ok(at) => cbor_head(&mut out, MAJOR_UNSIGNED, at),
            Err(_) => cbor_head(&mut out, MAJOR_NEGATIVE, !(self.at_ms as u64)),
        }
        cbor_text(&mut out, "action");
        cbor_text(&mut out, action_name(self.action));
        cbor_text(&mut out, "document");
        cbor_text(&mut out, &self.document.to_string());
        cbor_text(&mut out, "change");
        match &self.change {
            Some(change) => cbor_byte_array(&mut out, change),
            None => out.push(CBOR_NULL),
        }
        cbor_text(&mut out, "institution");
        match &self.institution {
            Some(institution) => cbor_text(&mut out, institution.as_str()),
            None => out.push(CBOR_NULL),
        }
        if let Some(app) = &self.app {
            cbor_text(&mut out, "app");
            cbor_text(&mut out, app);
        }
        out
    }
}

const MAJOR_UNSIGNED: u8 = 0;
const MAJOR_NEGATIVE: u8 = 1;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;
const MAJOR_MAP: u8 = 5;
const CBOR_NULL: u8 = 0xf6;

/// A CBOR item head: the major type and its argument, in the shortest form.
fn cbor_head(out: &mut Vec<u8>, major: u8, argument: u64) {
    let major = major << 5;
    match argument {
        0..24 => out.push(major | argument as u8),
        24..0x100 => out.extend_from_slice(&[major | 24, argument as u8]),
        0x100..0x1_0000 => {
            out.push(major | 25);
            out.extend_from_slice(&(argument as u16).to_be_bytes());
        }
        0x1_0000..0x1_0000_0000 => {
            out.push(major | 26);
            out.extend_from_slice(&(argument as u32).to_be_bytes());
        }
        _ => {
            out.push(major | 27);
            out.extend_from_slice(&argument.to_be_bytes());
        }
    }
}

fn cbor_text(out: &mut Vec<u8>, text: &str) {
    cbor_head(out, MAJOR_TEXT, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// A byte array as serde writes one: an array of small unsigned integers.
fn cbor_byte_array(out: &mut Vec<u8>, bytes: &[u8]) {
    cbor_head(out, MAJOR_ARRAY, bytes.len() as u64);
    for &byte in bytes {
        cbor_head(out, MAJOR_UNSIGNED, u64::from(byte));
    }
}

/// The action's name as serde writes it (`rename_all = "snake_case"`).
const fn action_name(action: AuditAction) -> &'static str {
    match action {
        AuditAction::Accepted => "accepted",
        AuditAction::Quarantined => "quarantined",
        AuditAction::Withdrawn => "withdrawn",
        AuditAction::Read => "read",
        AuditAction::Written => "written",
        AuditAction::Exported => "exported",
        AuditAction::QuarantinePurged => "quarantine_purged",
        AuditAction::Erased => "erased",
    }
}

/// A record as stores of format 5 and before keep it (since, runs: `append_to_run`): a CBOR
/// array of its fields, hashes and ids as byte strings,
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

/// The first byte of a run: records appended in one batch, stored as one value under the key
/// of the last (`record_key`). It follows with the hash of the record before the run's first
/// (32 bytes) and then each record's fields as a CBOR array (`Entry`), one after another. A
/// record inside a run does not store the hash of the one before: it is the hash of the
/// record read just before it, so the chain is checked whole from the first record of each
/// run, and an altered record breaks it at the next run or at the head. No other stored
/// record starts with this byte (they are CBOR arrays and maps).
const RUN: u8 = 0x01;

/// Most bytes of a run: the records appended in one batch start a new run past it, so that
/// reading one record never decodes more than this (about 100 records of a decision).
pub(crate) const RUN_BYTES_MAX: usize = 8 * 1024;

/// A record's fields as a run stores them: `Stored` without the hash of the record before.
#[derive(Serialize, Deserialize)]
struct Entry(
    i64,
    u8,
    serde_bytes::ByteArray<16>,
    Option<serde_bytes::ByteArray<32>>,
    Option<InstitutionId>,
    Option<String>,
);

impl Entry {
    fn of(record: &AuditRecord) -> Self {
        Entry(
            record.at_ms,
            code_of(record.action),
            serde_bytes::ByteArray::new(*record.document.as_bytes()),
            record.change.map(serde_bytes::ByteArray::new),
            record.institution.clone(),
            record.app.clone(),
        )
    }

    /// The record at `sequence`, after the record whose hash is `previous`; `None` if its
    /// action code is unknown.
    fn into_record(self, sequence: u64, previous: [u8; 32]) -> Option<AuditRecord> {
        let Entry(at_ms, action, document, change, institution, app) = self;
        Some(AuditRecord {
            sequence,
            previous,
            at_ms,
            action: *ACTIONS.get(usize::from(action))?,
            document: DocumentId::from_bytes(document.into_array()),
            change: change.map(serde_bytes::ByteArray::into_array),
            institution,
            app,
        })
    }
}

/// Adds `record` to `run`, the stored value of the records appended before it in the same
/// batch (`None`: it starts a run). Returns the value to store under `record_key` of
/// `record.sequence`, and `run` itself when the record did not fit in it: that run stays
/// stored as it was, under its own key.
pub(crate) fn append_to_run(
    run: Option<Vec<u8>>,
    record: &AuditRecord,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut encoded = Vec::new();
    ciborium::into_writer(&Entry::of(record), &mut encoded).expect("CBOR encoding into memory");
    let (mut run, kept) = match run {
        Some(run) if run.first() == Some(&RUN) && run.len() + encoded.len() <= RUN_BYTES_MAX => {
            (run, None)
        }
        kept => ([&[RUN][..], &record.previous].concat(), kept),
    };
    run.extend_from_slice(&encoded);
    (run, kept)
}

/// Reads a stored value under `key`: a run (`append_to_run`), or a single record of an
/// earlier format (`decode_record`). `None` if it is none of them.
pub(crate) fn decode_records(key: &[u8], value: &[u8]) -> Option<Vec<AuditRecord>> {
    let Some((&RUN, rest)) = value.split_first() else {
        return decode_record(key, value).map(|record| vec![record]);
    };
    let last = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    let (previous, mut entries) = rest.split_at_checked(32)?;
    let mut stored = Vec::new();
    while !entries.is_empty() {
        stored.push(ciborium::from_reader::<Entry, _>(&mut entries).ok()?);
    }
    let first = last
        .checked_add(1)?
        .checked_sub(u64::try_from(stored.len()).ok()?)?;
    if stored.is_empty() || first == 0 {
        return None;
    }
    let mut previous: [u8; 32] = previous.try_into().ok()?;
    let mut records = Vec::with_capacity(stored.len());
    for (sequence, entry) in (first..).zip(stored) {
        let record = entry.into_record(sequence, previous)?;
        previous = record.hash();
        records.push(record);
    }
    Some(records)
}

/// The value record `record` is stored as (under `record_key(record.sequence)`) by stores of
/// format 5 and before; runs (`append_to_run`) since.
#[cfg(test)]
pub(crate) fn encode_record(record: &AuditRecord) -> Vec<u8> {
    let Entry(at_ms, action, document, change, institution, app) = Entry::of(record);
    let stored = Stored(
        serde_bytes::ByteArray::new(record.previous),
        at_ms,
        action,
        document,
        change,
        institution,
        app,
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
        return Entry(at_ms, action, document, change, institution, app)
            .into_record(sequence, previous.into_array());
    }
    // A record of format 2 holds its own sequence: it must be its key's.
    let record = ciborium::from_reader::<AuditRecord, _>(value).ok()?;
    let sequence = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    (record.sequence == sequence).then_some(record)
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

    proptest::proptest! {
        /// The hash is over exactly the bytes serde's CBOR encoding of the record gives, for
        /// every action and any field's value.
        #[test]
        fn a_record_is_hashed_over_its_serde_encoding(
            sequence in proptest::prelude::any::<u64>(),
            previous in proptest::prelude::any::<[u8; 32]>(),
            at_ms in proptest::prelude::any::<i64>(),
            action in 0..ACTIONS.len(),
            document in proptest::prelude::any::<[u8; 16]>(),
            change in proptest::prelude::any::<Option<[u8; 32]>>(),
            institution in proptest::option::of("[a-z0-9-]{1,64}"),
            app in proptest::option::of(".{0,300}"),
        ) {
            let record = AuditRecord {
                sequence,
                previous,
                at_ms,
                action: ACTIONS[action],
                document: DocumentId::from_bytes(document),
                change,
                institution: institution.map(|i| InstitutionId::new(i).unwrap()),
                app,
            };
            let mut serde = Vec::new();
            ciborium::into_writer(&record, &mut serde).unwrap();
            proptest::prop_assert_eq!(record.hashed_form(), serde);
        }
    }

    #[test]
    fn every_small_and_boundary_integer_is_encoded_as_serde_does() {
        for at_ms in [
            0,
            1,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            u32::MAX as i64,
            i64::MAX,
        ]
        .into_iter()
        .flat_map(|n: i64| [n, -n, -n - 1, n.saturating_add(1)])
        {
            let record = AuditRecord {
                sequence: at_ms.unsigned_abs(),
                at_ms,
                ..chained(1, [0; 32], 1).remove(0)
            };
            let mut serde = Vec::new();
            ciborium::into_writer(&record, &mut serde).unwrap();
            assert_eq!(record.hashed_form(), serde, "{at_ms}");
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
            // A record written by a format-2 store reads the same, under its own sequence only.
            assert_eq!(decode_record(&key, &map), Some(record));
            assert_eq!(decode_record(&record_key(8), &map), None);
        }
        assert_eq!(decode_record(&record_key(1), b"junk"), None);
    }

    /// Records chained after `previous` from sequence `first` on, as `append_record` fills
    /// them in.
    fn chained(first: u64, previous: [u8; 32], count: usize) -> Vec<AuditRecord> {
        let mut previous = previous;
        (0..count)
            .map(|n| {
                let record = AuditRecord {
                    sequence: first + n as u64,
                    previous,
                    at_ms: 1_764_000_000_000 + n as i64,
                    action: if n % 2 == 0 {
                        AuditAction::Accepted
                    } else {
                        AuditAction::Written
                    },
                    document: DocumentId::from_bytes([n as u8; 16]),
                    change: Some([(n % 251) as u8 + 1; 32]),
                    institution: Some(InstitutionId::new("chc-jianshe").unwrap()),
                    app: (n % 2 == 1).then(|| "emr".to_string()),
                };
                previous = record.hash();
                record
            })
            .collect()
    }

    #[test]
    fn a_run_reads_back_every_record_with_the_hash_of_the_one_before() {
        let records = chained(5, [9; 32], 3);
        let mut run = None;
        for record in &records {
            let (next, full) = append_to_run(run, record);
            assert_eq!(full, None);
            run = Some(next);
        }
        let run = run.unwrap();
        assert_eq!(decode_records(&record_key(7), &run), Some(records.clone()));
        // Each record after the first stores no hash: the run is smaller than the records.
        let singles: usize = records.iter().map(|r| encode_record(r).len()).sum();
        assert!(run.len() + 2 * 30 < singles, "{} vs {singles}", run.len());
        // Under a key that would put its first record before the log's start, or with bytes
        // that do not read as records, it is refused.
        assert_eq!(decode_records(&record_key(2), &run), None);
        assert_eq!(decode_records(&record_key(7), &run[..run.len() - 1]), None);
        assert_eq!(decode_records(&record_key(7), &run[..33]), None);
        assert_eq!(decode_records(&record_key(7), &[RUN]), None);
        // A record of an earlier format reads as a run of one.
        assert_eq!(
            decode_records(&record_key(5), &encode_record(&records[0])),
            Some(vec![records[0].clone()])
        );
    }

    #[test]
    fn a_run_past_its_bound_gives_way_to_a_new_one() {
        let records = chained(1, [0; 32], 400);
        let mut run: Option<Vec<u8>> = None;
        let mut runs = Vec::new();
        for record in &records {
            let before = run.clone();
            let (next, full) = append_to_run(run.take(), record);
            assert!(next.len() <= RUN_BYTES_MAX);
            let decoded = decode_records(&record_key(record.sequence), &next).unwrap();
            if decoded.len() == 1 && record.sequence > 1 {
                // The full run is handed back whole, to stay under its own key.
                assert_eq!(full, before);
                let kept = decode_records(&record_key(record.sequence - 1), &full.unwrap());
                assert_eq!(
                    kept.unwrap().last(),
                    Some(&records[record.sequence as usize - 2])
                );
                runs.push(record.sequence - 1);
            } else {
                assert_eq!(full, None);
            }
            assert_eq!(decoded.last(), Some(record));
            run = Some(next);
        }
        assert!(runs.len() >= 3, "{runs:?}");
        // A key past the largest sequence is refused, not a panic.
        let (one, _) = append_to_run(None, &records[0]);
        assert_eq!(
            decode_records(&[&[RECORD][..], &[0xff; 8]].concat(), &one),
            None
        );
    }
}

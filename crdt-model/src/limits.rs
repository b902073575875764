//! Every bound the model enforces, named with its unit.
//!
//! The same limits guard local operations and peers' changes: a value that an operation
//! refuses is also a value that `validate` rejects, so an honest node can never write what
//! another honest node would quarantine.

/// Longest short text field (names, addresses, reasons, codes), in UTF-8 bytes.
pub const FIELD_BYTES_MAX: usize = 512;
/// Longest name of a member's area on the consortium's map, in bytes.
pub const AREA_BYTES_MAX: usize = 64;
/// Longest free-text note on an encounter, in UTF-8 bytes. Checked per change: concurrent
/// edits, each within it, may merge into a longer note (see `validate_change`).
pub const NOTE_BYTES_MAX: usize = 16 * 1024;
/// Longest referral handover summary or exam report, in UTF-8 bytes.
pub const SUMMARY_BYTES_MAX: usize = 16 * 1024;
/// Most entries in one clinical list of a health file (allergies, encounters, …). Checked per
/// change: a change may not add past it, concurrent appends may merge past it.
pub const ENTRIES_PER_LIST_MAX: usize = 10_000;
/// Most diagnoses on one encounter.
pub const DIAGNOSES_PER_ENCOUNTER_MAX: usize = 32;
/// Most measurements in one exam result.
pub const MEASUREMENTS_PER_RESULT_MAX: usize = 64;
/// Longest prescription, in days. Long-term prescriptions for chronic disease are capped at
/// 60 days by the consortium's prescribing rules; no prescription may be longer.
pub const PRESCRIPTION_DAYS_MAX: u64 = 60;
/// Most status events on one referral. A full life cycle needs five; the rest is headroom
/// for concurrent transitions, and a bound on what a faulty node can append. Checked per
/// change, like `ENTRIES_PER_LIST_MAX`.
pub const REFERRAL_EVENTS_MAX: usize = 64;
/// Longest booked appointment, in minutes (a day): a referral's slot is booked for a visit,
/// an examination or a day's admission, not for a stay.
pub const APPOINTMENT_MINUTES_MAX: u64 = 24 * 60;
/// Most institutions in one roster.
pub const INSTITUTIONS_MAX: usize = 1_024;
/// Most node keys one institution may hold at once (a node and its standby, rotations).
pub const NODE_KEYS_PER_INSTITUTION_MAX: usize = 16;
/// Most revocations in one roster.
pub const REVOCATIONS_MAX: usize = 4_096;
/// Most heads a revocation may name as its cut-off.
pub const REVOCATION_HEADS_MAX: usize = 1_024;
/// Most erasures (health files erased on legal order) in one roster.
pub const ERASURES_MAX: usize = 16_384;
/// Most changes in a roster's history. Every edit is one change, and the other limits allow
/// 37,889 (the creation, 1,024 institutions, 16,384 node keys, 4,096 revocations, 16,384
/// erasures); the rest is room for renames. It bounds the walk over the history that checks
/// revocations are final.
pub const ROSTER_CHANGES_MAX: usize = 65_536;
/// Longest institution id, in bytes.
pub const INSTITUTION_ID_BYTES_MAX: usize = 64;
/// Largest size one compressed automerge change may inflate to, in bytes. automerge inflates
/// without a bound; untrusted chunks are inflated through this bound first.
pub const CHANGE_INFLATED_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Largest size one compressed column of a document chunk may inflate to, in bytes.
/// automerge inflates these columns without a bound; untrusted document chunks are inflated
/// through this bound first. Documents here are kilobytes to a few MiB, and deflate gains
/// about 4 to 1 on their largest column, the values (a health file of 300 encounters with
/// 3 KB notes saves to 220 KiB and its value column inflates from 212 KiB to 887 KiB), so an
/// honest column stays far below.
pub const DOCUMENT_COLUMN_INFLATED_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// Largest total that the compressed changes and compressed document columns of one decode
/// (one call of `load_document`, `decode_changes_onto`, `decode_change`, `split_sync_chunk`
/// or `load_incremental`) may inflate to, in bytes. At the 4 to 1 measured on honest
/// documents it admits 16 MiB of compressed input, the largest response a node reads. Without
/// it, many compressed parts, each within its own bound, could still inflate to gigabytes.
pub const INFLATED_BYTES_PER_DECODE_MAX: u64 = 64 * 1024 * 1024;
/// Most columns in one block of a document chunk's column metadata (change columns, op
/// columns). automerge 0.12 defines 9 change columns and 16 op columns; the rest is room for
/// columns a later automerge may add. A crafted count is refused before it is read.
pub const DOCUMENT_COLUMNS_MAX: usize = 64;

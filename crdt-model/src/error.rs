//! The model's errors. None of them carries patient data: fields are named by their schema
//! path, never by their content, so an error can be logged and shown to an operator.

use crate::referral::{ReferralStatus, Role};

/// Why a document (or a change to it) breaks the model's rules.
///
/// `validate` is deterministic, so every replica that sees the same history reports the same
/// error, and `node` can quarantine a peer's change on it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The document's `type` is missing or not one of ours.
    #[error("not an Estuary document: the root has no known `type`")]
    UnknownDocumentType,
    /// The document's schema version is newer than this build understands.
    #[error(
        "schema version {found} is not supported (this build reads {supported}); upgrade the node"
    )]
    UnsupportedSchema {
        /// The version in the document.
        found: u64,
        /// The version this build reads and writes.
        supported: u64,
    },
    /// A required field is absent.
    #[error("required field `{field}` is missing")]
    MissingField {
        /// Schema path of the field.
        field: &'static str,
    },
    /// A field holds a value of the wrong type.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// Schema path of the field.
        field: &'static str,
        /// What the schema expects there.
        expected: &'static str,
    },
    /// An object holds a key the schema does not define.
    #[error("`{object}` holds a field this schema does not define")]
    UnknownField {
        /// Schema path of the object.
        object: &'static str,
    },
    /// A required text is empty.
    #[error("field `{field}` must not be empty")]
    Empty {
        /// Schema path of the field.
        field: &'static str,
    },
    /// A text is longer than its limit.
    #[error("field `{field}` is {bytes} bytes; the limit is {max} bytes")]
    TooLong {
        /// Schema path of the field.
        field: &'static str,
        /// Its length in UTF-8 bytes.
        bytes: usize,
        /// The limit in UTF-8 bytes.
        max: usize,
    },
    /// A list holds more entries than its limit.
    #[error("`{field}` holds {count} entries; the limit is {max}")]
    TooMany {
        /// Schema path of the list.
        field: &'static str,
        /// How many entries it holds.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A value has the right type but not an allowed value.
    #[error("field `{field}` is invalid: {reason}")]
    InvalidValue {
        /// Schema path of the field.
        field: &'static str,
        /// What a valid value looks like.
        reason: &'static str,
    },
    /// A prescription is longer than the consortium's cap.
    #[error("a prescription of {days} days exceeds the {max}-day cap on long-term prescriptions")]
    PrescriptionTooLong {
        /// Days prescribed.
        days: u64,
        /// The cap, in days.
        max: u64,
    },
    /// A referral event does not follow the state machine.
    #[error("referral transition {from} -> {to} is not allowed")]
    IllegalTransition {
        /// The status the event started from.
        from: ReferralStatus,
        /// The status it moved to.
        to: ReferralStatus,
    },
    /// A referral event was made by an institution that may not make it.
    #[error("only the {required} institution may move a referral to {to}")]
    NotAuthorised {
        /// The status the event moved to.
        to: ReferralStatus,
        /// Which side of the referral may make that move.
        required: Role,
    },
    /// A referral event's recorded starting status disagrees with its history.
    #[error("a referral event starts from {recorded} but its history derives {derived}")]
    EventBase {
        /// The `from` status written in the event.
        recorded: ReferralStatus,
        /// The status derived from the events it names as seen.
        derived: ReferralStatus,
    },
    /// A referral event names events it cannot have seen, or not exactly the latest ones.
    #[error("a referral event's `after` list is malformed: {reason}")]
    EventReference {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A change altered a field that is fixed once written.
    #[error("field `{field}` cannot change once written")]
    ImmutableChanged {
        /// Schema path of the field.
        field: &'static str,
    },
    /// A change removed an entry from an append-only list.
    #[error("entries of `{field}` are append-only and cannot be removed or replaced")]
    EntryRemoved {
        /// Schema path of the list.
        field: &'static str,
    },
    /// A change recorded an entry in another institution's name, or edited an entry that only
    /// its own institution may edit.
    #[error("`{field}` may only be written by the institution it names")]
    Provenance {
        /// Schema path of the field.
        field: &'static str,
    },
    /// A section, list or text was replaced by a new object instead of edited in place, which
    /// would hide what other replicas wrote into the old one.
    #[error("`{field}` was replaced as a whole; it may only be edited in place")]
    ReplacedObject {
        /// Schema path of the object.
        field: &'static str,
    },
    /// A change moved the document to another type or id.
    #[error("a change may not alter a document's type or id")]
    IdentityChanged,
}

/// Why a typed operation was refused. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// An argument breaks the same rule `validate` enforces on peers' changes.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The operation names an entry the document does not hold (or no longer holds).
    #[error("no entry `{entry}` in `{field}`")]
    UnknownEntry {
        /// Schema path of the list.
        field: &'static str,
        /// The entry id that was asked for.
        entry: crate::EntryId,
    },
    /// The document reached one of its limits.
    #[error("`{field}` already holds its maximum of {max} entries")]
    Full {
        /// Schema path of the list.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// automerge refused an operation on a path this crate built: a bug in this crate.
    #[error("internal document error: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

/// Why a health file with records (`HealthFile::create_with_records`) was not made. Nothing
/// was made.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", match record { Some(i) => format!("record {i}"), None => "the demographics".to_string() })]
pub struct RecordRefused {
    /// The refused record's index, or `None` when the demographics were refused.
    pub record: Option<usize>,
    /// Why.
    pub error: Box<OpError>,
}

/// Why bytes could not be loaded as a model document.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not an automerge document (or are truncated or corrupt).
    #[error("not a readable automerge document: {0}")]
    Decode(#[from] automerge::AutomergeError),
    /// The bytes are malformed in a way that made automerge's decoder panic. The panic was
    /// contained and nothing was applied; the sender's bytes are at fault, not this node.
    #[error("malformed document bytes: the automerge decoder failed on them; nothing was applied")]
    DecoderFault,
    /// The bytes were refused before decoding: not automerge's chunk framing, a chunk type
    /// Estuary does not accept, a document chunk whose column layout is malformed, or a
    /// compressed change or document column that does not inflate or inflates past its limit
    /// (alone, or with the rest of the bytes, past the limit of one decode).
    #[error("document bytes refused: {reason}")]
    Refused {
        /// What is wrong with them.
        reason: &'static str,
    },
    /// The document decodes but breaks the model's rules.
    #[error("document is invalid: {0}")]
    Invalid(#[from] ValidationError),
    /// The document is valid but of another type than the caller asked for.
    #[error("expected a {expected} document, found a {found} document")]
    WrongKind {
        /// The type the caller asked for.
        expected: crate::DocumentKind,
        /// The type the document holds.
        found: crate::DocumentKind,
    },
}

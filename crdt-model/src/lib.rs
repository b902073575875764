//! The consortium's data model: residents' health files, referrals and the roster as
//! automerge documents behind a typed API.
//!
//! This crate does no I/O, no cryptography and no async. Callers never write automerge paths:
//! they create documents, apply typed operations ([`HealthFileOp`], [`ReferralOp`],
//! [`RosterOp`]) and read typed, serde-serialisable views that show concurrent values as
//! conflicts to review.
//!
//! [`validate`] decides whether a document state is well formed and [`validate_change`]
//! whether one change is allowed given the history it was written on. Both are deterministic
//! functions of the document's content, so every replica that holds the same history gives
//! the same answer; `estuary-node` quarantines peers' changes on them.

mod access;
mod at;
mod document;
mod error;
mod health_file;
mod ids;
mod judge;
pub mod limits;
pub mod linked;
mod referral;
mod roster;
#[cfg(test)]
mod testing;
mod vocab;
mod written;

pub use access::Register;
pub use at::At;
pub use document::{
    DocumentKind, SCHEMA_VERSION, SyncChunk, decode_change, decode_changes_onto, document_id,
    document_id_of, is_one_document_chunk, load_document, load_document_with_changes,
    split_sync_chunk,
};
pub use error::{LoadError, OpError, RecordRefused, ValidationError};
pub use health_file::{
    Address, AllergyView, Amended, Amendment, CorrectableList, DemographicField, Demographics,
    DemographicsView, Diagnosis, EncounterView, EnteredInError, ExamResultView,
    FamilyDoctorContract, FileLink, FollowUpView, HealthFile, HealthFileOp, HealthFileView,
    Insurance, Measurement, MedicationView, NewAllergy, NewEncounter, NewExamResult, NewFollowUp,
    NewMedication, NewProblem, NoKnownAllergies, PersonName, ProblemView,
};
pub use ids::{
    Actor, Date, DocumentId, Editor, EntryId, Icd10, Icd10System, InstitutionId, Timestamp,
};
pub use judge::{
    HistoryRefused, Judged, judge_change, judge_change_of_kind, judge_creation, judge_history,
};
pub use linked::{CombinedRecord, LINKED_FILES_MAX};
pub use referral::{
    EventView, NewReferral, Referral, ReferralOp, ReferralStatus, ReferralView, Role,
};
pub use roster::{
    Bytes32, ErasureView, InstitutionView, RevocationHistoryError, RevocationView, Roster,
    RosterOp, RosterView,
};
pub use vocab::{
    AllergyVerification, Direction, EncounterKind, ExamKind, InstitutionKind, ProblemStatus,
    Severity, Sex, Urgency,
};

/// Re-exported so callers name the same automerge types this crate uses.
pub use automerge;

use automerge::ReadDoc;

/// A validated document's typed view, whichever its kind.
///
/// A view read from a bare document has the zero id: ids are not content (they derive from
/// the creation change, see [`document_id_of`]); the typed documents fill in their own.
#[derive(Clone, Debug, PartialEq)]
pub enum View {
    /// A health file (boxed: its view is several times larger than the others).
    HealthFile(Box<HealthFileView>),
    /// A referral (boxed too: a health file's view box and the roster's view are small).
    Referral(Box<ReferralView>),
    /// The roster.
    Roster(RosterView),
}

impl View {
    /// The document's kind.
    pub fn kind(&self) -> DocumentKind {
        match self {
            View::HealthFile(_) => DocumentKind::HealthFile,
            View::Referral(_) => DocumentKind::Referral,
            View::Roster(_) => DocumentKind::Roster,
        }
    }
}

/// Validates a document and returns its typed view, read once.
pub fn view<D: ReadDoc>(doc: &D) -> Result<View, ValidationError> {
    view_of(&access::Obj::root(doc))
}

/// [`view`] of the document whose root is `root`.
pub(crate) fn view_of<D: ReadDoc>(root: &access::Obj<'_, D>) -> Result<View, ValidationError> {
    Ok(match document::read_identity_of(root)? {
        DocumentKind::HealthFile => {
            View::HealthFile(Box::new(health_file::parse_health_file_of(root)?))
        }
        DocumentKind::Referral => View::Referral(Box::new(referral::parse_referral(root.doc)?)),
        DocumentKind::Roster => View::Roster(roster::parse_roster(root.doc)?),
    })
}

/// Checks that a document is a well-formed model document and returns its kind.
///
/// Deterministic: it reads only the document's content (every conflicting value included),
/// so replicas holding the same changes agree, whatever order the changes arrived in.
pub fn validate<D: ReadDoc>(doc: &D) -> Result<DocumentKind, ValidationError> {
    view(doc).map(|view| view.kind())
}

/// Checks one change: `before` is the document at the change's dependencies (empty for the
/// change that creates it), `after` is `before` with the change applied, and `author` is the
/// institution the change's signing key belongs to.
///
/// Besides `validate(after)`, it enforces what a state alone cannot show: append-only lists
/// keep their entries, fixed fields stay fixed, entries are recorded only in the author's own
/// name, and referral transitions are made by the side allowed to make them, from exactly the
/// events their writer held. Because `before` is fixed by the change's own dependencies, the
/// answer does not depend on what else the validating replica holds.
pub fn validate_change<B: ReadDoc, A: ReadDoc>(
    before: &B,
    after: &A,
    author: &InstitutionId,
) -> Result<DocumentKind, ValidationError> {
    validate_change_view(before, after, author).map(|view| view.kind())
}

/// `validate_change`, returning the view of `after` it read (so callers need not read it
/// again).
pub fn validate_change_view<B: ReadDoc, A: ReadDoc>(
    before: &B,
    after: &A,
    author: &InstitutionId,
) -> Result<View, ValidationError> {
    let after_view = view(after)?;
    if before.keys(automerge::ROOT).next().is_none() {
        check_creation(&after_view, author)?;
        return Ok(after_view);
    }
    if document::read_identity(before)? != after_view.kind() {
        return Err(ValidationError::IdentityChanged);
    }
    document::check_containers_kept(before, after, after_view.kind())?;
    match &after_view {
        View::HealthFile(after) => {
            health_file::check_change(&health_file::parse_health_file(before)?, after, author)?;
        }
        View::Referral(after) => {
            referral::check_change(&referral::parse_referral(before)?, after, author)?;
        }
        // Only the consortium authority may change the roster; `node` checks its signature.
        View::Roster(_) => {}
    }
    Ok(after_view)
}

/// The first change of a document: a referral is sent by its `from` institution, and nothing
/// is recorded in another institution's name.
pub(crate) fn check_creation(view: &View, author: &InstitutionId) -> Result<(), ValidationError> {
    match view {
        View::HealthFile(view) => {
            let blank = HealthFileView {
                allergies: Vec::new(),
                problems: Vec::new(),
                medications: Vec::new(),
                encounters: Vec::new(),
                exams: Vec::new(),
                follow_ups: Vec::new(),
                no_known_allergies: None,
                link: None,
                ..(**view).clone()
            };
            health_file::check_change(&blank, view, author)
        }
        View::Referral(view) => {
            if view.from != *author {
                return Err(ValidationError::Provenance { field: "from" });
            }
            let blank = ReferralView {
                history: Vec::new(),
                return_summary: None,
                ..(**view).clone()
            };
            referral::check_change(&blank, view, author)
        }
        View::Roster(_) => Ok(()),
    }
}

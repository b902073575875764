//! A resident's health file, shaped after the national resident health file.
//!
//! Layout of the automerge document (all keys fixed by this module):
//! - `demographics`: single-valued registers; structured ones (`name`, `address`, `insurance`)
//!   are whole maps so that concurrent edits conflict as whole values, never as a mix.
//! - `contract`: the family doctor contract "1+1+1", one register holding a whole map.
//! - `allergies`, `problems`: add-wins sets. Each add inserts a fresh entry; a remove deletes
//!   only the entries its writer had seen, so an add concurrent with a remove survives.
//! - `medications`, `encounters`, `exams`, `follow_ups`: append-only lists; entries are never
//!   removed (a medication is stopped, not deleted).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use automerge::hydrate::Value as HydrateValue;
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, Value};
use serde::{Deserialize, Serialize};

use crate::access::{
    self, NewEntry, Obj, Register, append_entry, check_text, checked, date, entry_id, find_entry,
    finite, icd10, institution, is_entry_of, long_text, object, put_time, put_value, text,
    timestamp, uint,
};
use crate::document::{DocumentKind, IDENTITY_KEYS, read_identity, read_identity_of, replica};
use crate::error::{OpError, ValidationError};
use crate::ids::{
    Actor, Date, DocumentId, Editor, EntryId, Icd10, Icd10System, InstitutionId, Timestamp,
};
use crate::judge::Touch;
use crate::limits::{
    DIAGNOSES_PER_ENCOUNTER_MAX, ENTRIES_PER_LIST_MAX, FIELD_BYTES_MAX,
    MEASUREMENTS_PER_RESULT_MAX, NOTE_BYTES_MAX, PRESCRIPTION_DAYS_MAX, SUMMARY_BYTES_MAX,
};
use crate::vocab::{AllergyVerification, EncounterKind, ExamKind, ProblemStatus, Severity, Sex};
use crate::written::Written;

/// A resident's name: family and given names in Latin script, and the name as written
/// (for example in Chinese characters).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct PersonName {
    /// Family name.
    pub family: String,
    /// Given name.
    pub given: String,
    /// The full name as written locally, if it differs from family + given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A postal address.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Address {
    /// Street and number.
    pub line: String,
    /// Town.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub town: Option<String>,
    /// District.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub district: Option<String>,
    /// City.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
    /// Postal code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
}

/// Health insurance.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Insurance {
    /// The scheme, for example "UEBMI (urban employee)".
    pub scheme: String,
    /// The member number.
    pub number: String,
    /// Last day of cover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<Date>,
}

/// The demographics a health file is created with.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Demographics {
    /// Name.
    pub name: PersonName,
    /// Administrative sex.
    pub sex: Sex,
    /// Date of birth.
    pub birth_date: Date,
    /// Telephone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Address>,
    /// National id number. Stored in the file; indexed by `node` only as a salted hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub national_id: Option<String>,
    /// Insurance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insurance: Option<Insurance>,
}

/// One demographic field with its new value.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "field", content = "value", rename_all = "snake_case")]
pub enum DemographicField {
    /// Name.
    Name(PersonName),
    /// Administrative sex.
    Sex(Sex),
    /// Date of birth.
    BirthDate(Date),
    /// Telephone.
    Phone(String),
    /// Address.
    Address(Address),
    /// National id number.
    NationalId(String),
    /// Insurance.
    Insurance(Insurance),
}

/// The family doctor contract "1+1+1": a community centre, a district hospital and a municipal
/// hospital, with the contracted family doctor.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FamilyDoctorContract {
    /// The contracted community health centre.
    pub community_centre: InstitutionId,
    /// The contracted district hospital.
    pub district_hospital: InstitutionId,
    /// The contracted municipal hospital.
    pub municipal_hospital: InstitutionId,
    /// The family doctor's staff id.
    pub doctor_id: String,
    /// The family doctor's name.
    pub doctor_name: String,
    /// Start of the contract.
    pub since: Date,
}

/// An allergy to record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewAllergy {
    /// The substance, for example "penicillin".
    pub substance: String,
    /// The reaction, for example "urticaria".
    pub reaction: String,
    /// How severe the reaction is.
    pub severity: Severity,
}

/// A chronic problem to record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewProblem {
    /// ICD-10 code.
    pub icd10: Icd10,
    /// The code's display text.
    pub display: String,
    /// Date of onset, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onset: Option<Date>,
    /// Whether the problem is active.
    pub status: ProblemStatus,
}

/// A prescription to record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewMedication {
    /// The drug.
    pub drug: String,
    /// The dose, for example "100 mg".
    pub dose: String,
    /// How often, for example "once daily".
    pub frequency: String,
    /// First day.
    pub start: Date,
    /// Days prescribed; at most `PRESCRIPTION_DAYS_MAX`.
    pub days: u64,
}

/// A diagnosis made at an encounter.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Diagnosis {
    /// ICD-10 code.
    pub icd10: Icd10,
    /// The code's display text.
    pub display: String,
}

/// An encounter to record at the editor's institution.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewEncounter {
    /// When it took place.
    pub time: Timestamp,
    /// What kind of encounter it was.
    pub kind: EncounterKind,
    /// Diagnoses made.
    pub diagnoses: Vec<Diagnosis>,
    /// The clinician's free-text note.
    pub note: String,
}

/// One measured value of an exam.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Measurement {
    /// What was measured, for example "creatinine" or "qtc".
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit, for example "µmol/L".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// An exam result to record as produced by the editor's institution.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct NewExamResult {
    /// Lab, imaging or ECG.
    pub kind: ExamKind,
    /// When the exam was done.
    pub time: Timestamp,
    /// The exam's name, for example "chest X-ray" or "fasting glucose".
    pub name: String,
    /// Measured values.
    #[serde(default)]
    pub measurements: Vec<Measurement>,
    /// A written report or finding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
}

/// A chronic-disease follow-up to record at the editor's institution.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct NewFollowUp {
    /// When it took place.
    pub time: Timestamp,
    /// Systolic blood pressure, mmHg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systolic_mmhg: Option<u64>,
    /// Diastolic blood pressure, mmHg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diastolic_mmhg: Option<u64>,
    /// Blood glucose, mmol/L.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glucose_mmol_per_l: Option<f64>,
}

/// A record marked entered in error by the institution that wrote it: the record stays, kept
/// and audited, and reads as not to be relied on.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EnteredInError {
    /// Why, for example "filed on the wrong resident".
    pub reason: String,
    /// The institution that marked it (always the one that wrote the record).
    pub recorded_by: InstitutionId,
    /// When.
    pub recorded_at: Timestamp,
}

/// A record of an append-only list amended by the institution that wrote it: the record
/// stays, kept and audited, and reads as replaced by the amending record, a new entry of the
/// same list written in the same change.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Amended {
    /// The amending record's entry.
    pub by: EntryId,
    /// Why, for example "potassium re-measured: haemolysed sample".
    pub reason: String,
    /// The institution that amended it (always the one that wrote the record).
    pub recorded_by: InstitutionId,
    /// When.
    pub recorded_at: Timestamp,
}

/// The corrected record that amends one of the editor's own records of an append-only list.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amendment {
    /// A prescription.
    Medication(NewMedication),
    /// An encounter.
    Encounter(NewEncounter),
    /// An exam result.
    ExamResult(NewExamResult),
    /// A follow-up.
    FollowUp(NewFollowUp),
}

impl Amendment {
    /// The list the amended and the amending record are in.
    pub fn list(&self) -> CorrectableList {
        match self {
            Self::Medication(_) => CorrectableList::Medications,
            Self::Encounter(_) => CorrectableList::Encounters,
            Self::ExamResult(_) => CorrectableList::Exams,
            Self::FollowUp(_) => CorrectableList::FollowUps,
        }
    }

    /// The operation that appends the amending record.
    fn append(&self) -> HealthFileOp {
        match self {
            Self::Medication(m) => HealthFileOp::AddMedication(m.clone()),
            Self::Encounter(e) => HealthFileOp::AddEncounter(e.clone()),
            Self::ExamResult(r) => HealthFileOp::AddExamResult(r.clone()),
            Self::FollowUp(f) => HealthFileOp::AddFollowUp(f.clone()),
        }
    }
}

/// The append-only lists whose records can be marked entered in error.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectableList {
    /// Prescriptions.
    Medications,
    /// Encounters.
    Encounters,
    /// Lab, imaging and ECG results.
    Exams,
    /// Chronic-disease follow-ups.
    FollowUps,
}

/// Schema paths of one of a list's markers (entered in error, amended).
struct MarkerFields {
    marker: &'static str,
    reason: &'static str,
    recorded_by: &'static str,
    recorded_at: &'static str,
}

impl CorrectableList {
    /// The list's root key.
    fn key(self) -> &'static str {
        match self {
            Self::Medications => "medications",
            Self::Encounters => "encounters",
            Self::Exams => "exams",
            Self::FollowUps => "follow_ups",
        }
    }

    /// The key of the entry field naming the institution that wrote it.
    fn owner_key(self) -> &'static str {
        match self {
            Self::Medications => "prescribed_by",
            Self::Encounters | Self::Exams | Self::FollowUps => "institution",
        }
    }

    fn marker_fields(self) -> MarkerFields {
        self.fields_of("entered_in_error")
    }

    fn amend_fields(self) -> MarkerFields {
        self.fields_of("amended")
    }

    /// The schema paths of the marker at `key` (`entered_in_error` or `amended`).
    fn fields_of(self, key: &'static str) -> MarkerFields {
        macro_rules! fields {
            ($list:literal, $key:literal) => {
                MarkerFields {
                    marker: concat!($list, ".", $key),
                    reason: concat!($list, ".", $key, ".reason"),
                    recorded_by: concat!($list, ".", $key, ".recorded_by"),
                    recorded_at: concat!($list, ".", $key, ".recorded_at"),
                }
            };
        }
        macro_rules! lists {
            ($key:literal) => {
                match self {
                    Self::Medications => fields!("medications", $key),
                    Self::Encounters => fields!("encounters", $key),
                    Self::Exams => fields!("exams", $key),
                    Self::FollowUps => fields!("follow_ups", $key),
                }
            };
        }
        match key {
            "amended" => lists!("amended"),
            _ => lists!("entered_in_error"),
        }
    }
}

/// The statement that a resident has no known allergies: who made it, and when.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NoKnownAllergies {
    /// The institution that recorded it.
    pub recorded_by: InstitutionId,
    /// When.
    pub recorded_at: Timestamp,
}

/// A file's link to another file of the same resident: what the last link or unlink of the
/// file said. A resident registered twice (offline, at a centre and at the district hospital)
/// has two files; linking the duplicate to the file that holds the resident's main record
/// makes reads through either show one combined record (see [`crate::linked`]).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct FileLink {
    /// The file this one is the same resident as; `None` once unlinked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<DocumentId>,
    /// Why it was linked or unlinked.
    pub reason: String,
    /// The institution that linked or unlinked it.
    pub recorded_by: InstitutionId,
    /// When.
    pub recorded_at: Timestamp,
}

/// A typed edit of a health file. This is also the JSON form apps send through the API.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum HealthFileOp {
    /// Sets one demographic field (overwriting the values the editor has seen).
    SetDemographic(DemographicField),
    /// Sets the family doctor contract.
    SetContract(FamilyDoctorContract),
    /// Adds an allergy record.
    AddAllergy(NewAllergy),
    /// Removes every allergy record of a substance that the editor has seen.
    RemoveAllergy {
        /// The substance, compared case-insensitively.
        substance: String,
    },
    /// Sets what is known of an allergy record: refuted when the resident turns out not to
    /// be allergic (the record stays, refuted), confirmed, or unconfirmed.
    SetAllergyVerification {
        /// The allergy's entry.
        entry: EntryId,
        /// What is known of it now.
        status: AllergyVerification,
    },
    /// Marks a record of an append-only list entered in error (a wrong value, a result filed
    /// on the wrong resident). Only the institution that wrote the record may; the record
    /// stays, kept and audited, and reads as entered in error.
    MarkEnteredInError {
        /// Which list the record is in.
        list: CorrectableList,
        /// The record's entry.
        entry: EntryId,
        /// Why.
        reason: String,
    },
    /// Amends a record of an append-only list with a corrected one (a re-measured value, a
    /// corrected dose): the corrected record is appended, and the original, kept and audited,
    /// is marked as amended by it. Only the institution that wrote the record may.
    Amend {
        /// The record's entry.
        entry: EntryId,
        /// Why.
        reason: String,
        /// The corrected record (its list is the record's).
        with: Amendment,
    },
    /// Records that the resident has no known allergies. Refused while the file holds an
    /// allergy that is not refuted.
    RecordNoKnownAllergies,
    /// Adds a chronic problem record.
    AddProblem(NewProblem),
    /// Sets whether a problem is active.
    SetProblemStatus {
        /// The problem's entry.
        entry: EntryId,
        /// Its new status.
        status: ProblemStatus,
    },
    /// Removes every record of a problem (by ICD-10 code) that the editor has seen.
    RemoveProblem {
        /// The problem's code.
        icd10: Icd10,
    },
    /// Adds a prescription.
    AddMedication(NewMedication),
    /// Records that a prescription was stopped.
    StopMedication {
        /// The prescription's entry.
        entry: EntryId,
        /// Day it was stopped.
        on: Date,
    },
    /// Appends an encounter at the editor's institution.
    AddEncounter(NewEncounter),
    /// Replaces the note of an encounter of the editor's institution (merged character-wise
    /// with concurrent edits).
    EditEncounterNote {
        /// The encounter's entry.
        entry: EntryId,
        /// The note's new text.
        note: String,
    },
    /// Appends an exam result produced by the editor's institution.
    AddExamResult(NewExamResult),
    /// Appends a chronic-disease follow-up at the editor's institution.
    AddFollowUp(NewFollowUp),
    /// Links this file to `to`, another file of the same resident (a duplicate
    /// registration), which holds the resident's main record: reads through either file
    /// show one combined record. Any member institution may, in its own name; a later link
    /// replaces it, and an unlink undoes it.
    Link {
        /// The file of the same resident.
        to: DocumentId,
        /// Why (how the two were found to be one resident).
        reason: String,
    },
    /// Undoes this file's link (two residents linked in error): both read as separate files
    /// again. The link stays in the file's history and in the audit log.
    Unlink {
        /// Why.
        reason: String,
    },
}

/// An allergy record in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AllergyView {
    /// The record's entry id.
    pub entry: EntryId,
    /// The substance.
    pub substance: String,
    /// The reaction.
    pub reaction: String,
    /// Severity.
    pub severity: Severity,
    /// Institution that recorded it.
    pub recorded_by: InstitutionId,
    /// When it was recorded.
    pub recorded_at: Timestamp,
    /// What is known of it, once someone has said (with concurrent settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Register<AllergyVerification>>,
}

impl AllergyView {
    /// Whether the allergy stands: recorded and not refuted (a conflicting verification that
    /// refutes it does not count until resolved).
    pub fn stands(&self) -> bool {
        self.verification
            .as_ref()
            .is_none_or(|r| r.value != AllergyVerification::Refuted || r.is_conflicted())
    }
}

/// A chronic problem record in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ProblemView {
    /// The record's entry id.
    pub entry: EntryId,
    /// ICD-10 code.
    pub icd10: Icd10,
    /// The code's display text.
    pub display: String,
    /// Date of onset.
    pub onset: Option<Date>,
    /// Whether it is active, with concurrent settings.
    pub status: Register<ProblemStatus>,
    /// Institution that recorded it.
    pub recorded_by: InstitutionId,
    /// When it was recorded.
    pub recorded_at: Timestamp,
}

/// A prescription in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct MedicationView {
    /// The prescription's entry id.
    pub entry: EntryId,
    /// The drug.
    pub drug: String,
    /// The dose.
    pub dose: String,
    /// How often.
    pub frequency: String,
    /// First day.
    pub start: Date,
    /// Days prescribed.
    pub days: u64,
    /// Prescribing institution.
    pub prescribed_by: InstitutionId,
    /// When it was recorded.
    pub recorded_at: Timestamp,
    /// Day it was stopped, with concurrent stops.
    pub stopped: Option<Register<Date>>,
    /// Marked entered in error by the prescriber, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_in_error: Option<Register<EnteredInError>>,
    /// Amended by its institution with a corrected record, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amended: Option<Register<Amended>>,
}

/// An encounter in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EncounterView {
    /// The encounter's entry id.
    pub entry: EntryId,
    /// Where it took place.
    pub institution: InstitutionId,
    /// When.
    pub time: Timestamp,
    /// What kind.
    pub kind: EncounterKind,
    /// Diagnoses made.
    pub diagnoses: Vec<Diagnosis>,
    /// The note.
    pub note: String,
    /// Notes written concurrently with `note` (by two nodes of its institution), to review;
    /// empty when there is no conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub note_conflicts: Vec<String>,
    /// Marked entered in error by its institution, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_in_error: Option<Register<EnteredInError>>,
    /// Amended by its institution with a corrected record, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amended: Option<Register<Amended>>,
}

/// An exam result in a view.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct ExamResultView {
    /// The result's entry id.
    pub entry: EntryId,
    /// Lab, imaging or ECG.
    pub kind: ExamKind,
    /// Producing institution.
    pub institution: InstitutionId,
    /// When the exam was done.
    pub time: Timestamp,
    /// The exam's name.
    pub name: String,
    /// Measured values.
    pub measurements: Vec<Measurement>,
    /// Written report or finding.
    pub report: Option<String>,
    /// Marked entered in error by the producing institution, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_in_error: Option<Register<EnteredInError>>,
    /// Amended by its institution with a corrected record, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amended: Option<Register<Amended>>,
}

/// A follow-up in a view.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct FollowUpView {
    /// The follow-up's entry id.
    pub entry: EntryId,
    /// Where it took place.
    pub institution: InstitutionId,
    /// When.
    pub time: Timestamp,
    /// Systolic blood pressure, mmHg.
    pub systolic_mmhg: Option<u64>,
    /// Diastolic blood pressure, mmHg.
    pub diastolic_mmhg: Option<u64>,
    /// Blood glucose, mmol/L.
    pub glucose_mmol_per_l: Option<f64>,
    /// Marked entered in error by its institution, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_in_error: Option<Register<EnteredInError>>,
    /// Amended by its institution with a corrected record, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amended: Option<Register<Amended>>,
}

/// The demographics in a view: every field a register, so conflicts show.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DemographicsView {
    /// Name.
    pub name: Register<PersonName>,
    /// Administrative sex.
    pub sex: Register<Sex>,
    /// Date of birth.
    pub birth_date: Register<Date>,
    /// Telephone.
    pub phone: Option<Register<String>>,
    /// Address.
    pub address: Option<Register<Address>>,
    /// National id.
    pub national_id: Option<Register<String>>,
    /// Insurance.
    pub insurance: Option<Register<Insurance>>,
}

/// A health file as apps see it. Lists are in document order, which is the same on every
/// replica.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct HealthFileView {
    /// The document id.
    pub id: DocumentId,
    /// Demographics.
    pub demographics: DemographicsView,
    /// Family doctor contract.
    pub contract: Option<Register<FamilyDoctorContract>>,
    /// The statement that the resident has no known allergies, once recorded. It may stand
    /// beside allergies recorded concurrently or later: an allergy that is not refuted
    /// always outweighs it ([`HealthFileView::no_known_allergies_now`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_known_allergies: Option<Register<NoKnownAllergies>>,
    /// The file's link to another file of the same resident, once linked or unlinked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<Register<FileLink>>,
    /// Allergy records.
    pub allergies: Vec<Arc<AllergyView>>,
    /// Chronic problem records.
    pub problems: Vec<Arc<ProblemView>>,
    /// Prescriptions.
    pub medications: Vec<Arc<MedicationView>>,
    /// Encounters.
    pub encounters: Vec<Arc<EncounterView>>,
    /// Exam results.
    pub exams: Vec<Arc<ExamResultView>>,
    /// Chronic-disease follow-ups.
    pub follow_ups: Vec<Arc<FollowUpView>>,
}

impl HealthFileView {
    /// The statement of no known allergies, if it holds now: recorded, and no allergy that
    /// stands beside it (one recorded concurrently or since outweighs it).
    pub fn no_known_allergies_now(&self) -> Option<&NoKnownAllergies> {
        let statement = self.no_known_allergies.as_ref()?;
        (!self.allergies.iter().any(|a| a.stands())).then_some(&statement.value)
    }

    /// The schema paths of the fields holding concurrent values for a clinician to review.
    pub fn conflicts(&self) -> Vec<String> {
        let d = &self.demographics;
        let mut fields: Vec<String> = [
            ("demographics.name", d.name.is_conflicted()),
            ("demographics.sex", d.sex.is_conflicted()),
            ("demographics.birth_date", d.birth_date.is_conflicted()),
            (
                "demographics.phone",
                d.phone.as_ref().is_some_and(Register::is_conflicted),
            ),
            (
                "demographics.address",
                d.address.as_ref().is_some_and(Register::is_conflicted),
            ),
            (
                "demographics.national_id",
                d.national_id.as_ref().is_some_and(Register::is_conflicted),
            ),
            (
                "demographics.insurance",
                d.insurance.as_ref().is_some_and(Register::is_conflicted),
            ),
            (
                "contract",
                self.contract.as_ref().is_some_and(Register::is_conflicted),
            ),
            (
                "no_known_allergies",
                self.no_known_allergies
                    .as_ref()
                    .is_some_and(Register::is_conflicted),
            ),
            (
                "link",
                self.link.as_ref().is_some_and(Register::is_conflicted),
            ),
        ]
        .into_iter()
        .filter(|(_, conflicted)| *conflicted)
        .map(|(field, _)| field.to_string())
        .collect();
        for allergy in &self.allergies {
            if allergy
                .verification
                .as_ref()
                .is_some_and(Register::is_conflicted)
            {
                fields.push(format!("allergies[{}].verification", allergy.entry));
            }
        }
        for problem in &self.problems {
            if problem.status.is_conflicted() {
                fields.push(format!("problems[{}].status", problem.entry));
            }
        }
        let markers = self
            .medications
            .iter()
            .map(|m| ("medications", &m.entry, &m.entered_in_error))
            .chain(
                self.encounters
                    .iter()
                    .map(|e| ("encounters", &e.entry, &e.entered_in_error)),
            )
            .chain(
                self.exams
                    .iter()
                    .map(|e| ("exams", &e.entry, &e.entered_in_error)),
            )
            .chain(
                self.follow_ups
                    .iter()
                    .map(|f| ("follow_ups", &f.entry, &f.entered_in_error)),
            );
        for (list, entry, marker) in markers {
            if marker.as_ref().is_some_and(Register::is_conflicted) {
                fields.push(format!("{list}[{entry}].entered_in_error"));
            }
        }
        let amendments = self
            .medications
            .iter()
            .map(|m| ("medications", &m.entry, &m.amended))
            .chain(
                self.encounters
                    .iter()
                    .map(|e| ("encounters", &e.entry, &e.amended)),
            )
            .chain(self.exams.iter().map(|e| ("exams", &e.entry, &e.amended)))
            .chain(
                self.follow_ups
                    .iter()
                    .map(|f| ("follow_ups", &f.entry, &f.amended)),
            );
        for (list, entry, amended) in amendments {
            if amended.as_ref().is_some_and(Register::is_conflicted) {
                fields.push(format!("{list}[{entry}].amended"));
            }
        }
        for medication in &self.medications {
            if medication
                .stopped
                .as_ref()
                .is_some_and(Register::is_conflicted)
            {
                fields.push(format!("medications[{}].stopped", medication.entry));
            }
        }
        fields
    }

    /// The distinct substances the resident is allergic to (lower-cased), sorted.
    pub fn allergy_substances(&self) -> Vec<String> {
        let mut substances: Vec<String> = self
            .allergies
            .iter()
            .map(|a| a.substance.to_lowercase())
            .collect();
        substances.sort();
        substances.dedup();
        substances
    }
}

/// A resident's health file: one automerge document behind typed operations.
#[derive(Debug)]
pub struct HealthFile {
    doc: AutoCommit,
    id: DocumentId,
}

replica!(
    HealthFile,
    DocumentKind::HealthFile,
    HealthFileView,
    parse_health_file
);

const ROOT_KEYS: [&str; 12] = [
    IDENTITY_KEYS[0],
    IDENTITY_KEYS[1],
    "demographics",
    "contract",
    // Written rarely: a change writing them is judged against the whole file.
    "no_known_allergies",
    "link",
    "allergies",
    "problems",
    "medications",
    "encounters",
    "exams",
    "follow_ups",
];
/// Sections and lists created with the file and edited in place after (see
/// `document::check_containers_kept`).
pub(crate) const CONTAINERS: [&str; 7] = [
    "demographics",
    "allergies",
    "problems",
    "medications",
    "encounters",
    "exams",
    "follow_ups",
];
/// The clinical lists: every container but the demographics section.
const LISTS: &[&str] = CONTAINERS.split_at(1).1;

impl HealthFile {
    /// Creates a health file with its demographics, as one change by `editor`.
    ///
    /// The file's id is derived from this first change (see [`crate::document_id_of`]).
    pub fn create(
        actor: &Actor,
        editor: &Editor,
        demographics: &Demographics,
    ) -> Result<Self, OpError> {
        Self::create_blank(actor, editor, |tx| write_creation(tx, demographics))
    }

    /// Creates a health file holding a resident's existing records, as **one** change by
    /// `editor`: how a member's records are loaded in bulk. Each record is applied as its
    /// operation would be, in order, each at its own time (the `recorded_at` it gets), in
    /// `editor`'s institution's name; the change itself is made at `editor.at`. On error
    /// nothing is made, and the error says which record (by index) was refused.
    pub fn create_with_records(
        actor: &Actor,
        editor: &Editor,
        demographics: &Demographics,
        records: &[(Timestamp, HealthFileOp)],
    ) -> Result<Self, crate::RecordRefused> {
        let mut refused = None;
        Self::create_blank(actor, editor, |tx| {
            // The appends before the first operation that reads a clinical list are written
            // with the skeleton, one batch per list: the same entries, in the same order, as
            // one operation each would write. The operations among them that touch no list
            // (the contract, a demographic field) commute with them and are applied after,
            // in order, and so is everything from the first that reads a list on.
            // So is the last contract among them (a contract is one register, so an earlier
            // one there is overwritten whatever the order).
            let mut entries = Vec::new();
            let mut contract = None;
            let mut later = Vec::new();
            for (index, (at, op)) in records.iter().enumerate() {
                let editor = Editor {
                    institution: editor.institution.clone(),
                    at: *at,
                };
                if reads_lists(op) {
                    later.extend(index..records.len());
                    break;
                }
                if let HealthFileOp::SetContract(written) = op {
                    contract =
                        Some(contract_entry(written).inspect_err(|_| refused = Some(index))?);
                    continue;
                }
                match new_entry(&editor, op).inspect_err(|_| refused = Some(index))? {
                    Some(entry) => entries.push(entry),
                    None => later.push(index),
                }
            }
            write_creation_with(tx, demographics, contract, entries)?;
            for index in later {
                let (at, op) = &records[index];
                let editor = Editor {
                    institution: editor.institution.clone(),
                    at: *at,
                };
                apply_op(tx, &editor, op).inspect_err(|_| refused = Some(index))?;
            }
            Ok(())
        })
        .map_err(|error| crate::RecordRefused {
            record: refused,
            error: Box::new(error),
        })
    }

    /// Applies one typed operation as one change. On error nothing is written.
    pub fn apply(&mut self, editor: &Editor, op: &HealthFileOp) -> Result<(), OpError> {
        if let HealthFileOp::Link { to, .. } = op
            && *to == self.id
        {
            return Err(LINK_TO_ITSELF.into());
        }
        self.transact(editor, |tx| apply_op(tx, editor, op))
    }

    /// Applies one typed operation as one change by `actor` directly on `doc`, the automerge
    /// document of a health file its holder accepted (a node's replica, which every change
    /// it holds was judged to keep valid): nothing is copied and the file is not read whole,
    /// so the cost is the operation's, however long the file. Returns the change's hash, or
    /// `None` when the operation changed nothing. On error nothing is written.
    pub fn apply_to(
        doc: &mut AutoCommit,
        actor: &Actor,
        editor: &Editor,
        op: &HealthFileOp,
    ) -> Result<Option<automerge::ChangeHash>, OpError> {
        if read_identity(doc)? != DocumentKind::HealthFile {
            return Err(ValidationError::UnknownDocumentType.into());
        }
        doc.set_actor(actor.to_automerge());
        let written = apply_op(doc, editor, op);
        crate::document::commit_or_roll_back(doc, editor, written)
    }
}

/// Writes a new health file's skeleton and its demographics.
fn write_creation(tx: &mut AutoCommit, demographics: &Demographics) -> Result<(), OpError> {
    write_creation_with(tx, demographics, None, Vec::new())
}

/// Writes a new health file whole, in one batch: its identity, its demographics, and its
/// lists, each holding those of `entries` that are for it (checked against the list's limit).
/// `tx` must be a new, empty document.
fn write_creation_with(
    tx: &mut AutoCommit,
    demographics: &Demographics,
    contract: Option<NewEntry>,
    mut entries: Vec<(&'static str, NewEntry)>,
) -> Result<(), OpError> {
    let d = demographics;
    let mut section = NewEntry::default();
    let fields = [
        Some(DemographicField::Name(d.name.clone())),
        Some(DemographicField::Sex(d.sex)),
        Some(DemographicField::BirthDate(d.birth_date.clone())),
        d.phone.clone().map(DemographicField::Phone),
        d.address.clone().map(DemographicField::Address),
        d.national_id.clone().map(DemographicField::NationalId),
        d.insurance.clone().map(DemographicField::Insurance),
    ];
    for field in fields.into_iter().flatten() {
        let (key, value) = demographic(&field)?;
        section.value(key, value);
    }
    let mut root = NewEntry::default();
    root.put("type", DocumentKind::HealthFile.as_str())
        .put("schema", crate::SCHEMA_VERSION)
        .value("demographics", section.into_value());
    if let Some(contract) = contract {
        root.value("contract", contract.into_value());
    }
    for list in LISTS.iter().copied() {
        let (items, rest): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|(into, _)| *into == list);
        entries = rest;
        if items.len() > ENTRIES_PER_LIST_MAX {
            return Err(OpError::Full {
                field: list,
                max: ENTRIES_PER_LIST_MAX,
            });
        }
        let items: Vec<HydrateValue> = items.into_iter().map(|(_, e)| e.into_value()).collect();
        root.value(list, items.into());
    }
    tx.init_root_from_hydrate(&root.into_map())?;
    Ok(())
}

fn section(doc: &AutoCommit, key: &'static str) -> Result<ObjId, OpError> {
    match doc.get(automerge::ROOT, key)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(ValidationError::MissingField { field: key }.into()),
    }
}

fn apply_op(tx: &mut AutoCommit, editor: &Editor, op: &HealthFileOp) -> Result<(), OpError> {
    let root = automerge::ROOT;
    let by = &editor.institution;
    match op {
        HealthFileOp::AddAllergy(_)
        | HealthFileOp::AddProblem(_)
        | HealthFileOp::AddMedication(_)
        | HealthFileOp::AddEncounter(_)
        | HealthFileOp::AddExamResult(_)
        | HealthFileOp::AddFollowUp(_) => match new_entry(editor, op)? {
            Some((list, entry)) => append(tx, list, entry),
            None => Ok(()),
        },
        HealthFileOp::SetDemographic(field) => {
            let demographics = section(tx, "demographics")?;
            write_demographic(tx, &demographics, field)
        }
        HealthFileOp::SetContract(contract) => write_contract(tx, contract),
        HealthFileOp::RemoveAllergy { substance } => {
            let wanted = substance.to_lowercase();
            remove_matching(tx, "allergies", |doc, entry| {
                Ok(matches!(doc.get(entry, "substance")?,
                    Some((Value::Scalar(s), _)) if s.as_str().is_some_and(|t| t.to_lowercase() == wanted)))
            })
        }
        HealthFileOp::MarkEnteredInError {
            list,
            entry,
            reason,
        } => {
            let id = own_record(tx, *list, list.marker_fields(), entry, reason, editor)?;
            // A fresh map per marking: concurrent markings conflict as wholes.
            let marker = tx.put_object(&id, "entered_in_error", ObjType::Map)?;
            tx.put(&marker, "reason", reason.as_str())?;
            record_provenance(tx, &marker, "recorded_by", editor)
        }
        HealthFileOp::Amend {
            entry,
            reason,
            with,
        } => {
            let list = with.list();
            let id = own_record(tx, list, list.amend_fields(), entry, reason, editor)?;
            let Some((key, record)) = new_entry(editor, &with.append())? else {
                return Err(ValidationError::MissingField {
                    field: list.amend_fields().marker,
                }
                .into());
            };
            let amending = append_entry(tx, &root, key, key, ENTRIES_PER_LIST_MAX, record)?;
            // A fresh map per amendment: concurrent amendments conflict as wholes.
            let marker = tx.put_object(&id, "amended", ObjType::Map)?;
            tx.put(&marker, "by", entry_id(&amending).as_str())?;
            tx.put(&marker, "reason", reason.as_str())?;
            record_provenance(tx, &marker, "recorded_by", editor)
        }
        HealthFileOp::RecordNoKnownAllergies => {
            let allergies: Vec<Arc<AllergyView>> = read_list(&Obj::root(&*tx))?;
            if allergies.iter().any(|a| a.stands()) {
                return Err(ValidationError::InvalidValue {
                    field: "no_known_allergies",
                    reason: "the file records an allergy that is not refuted; refute it first if it is wrong",
                }
                .into());
            }
            // A fresh map per statement: concurrent ones conflict as wholes.
            let statement = tx.put_object(automerge::ROOT, "no_known_allergies", ObjType::Map)?;
            record_provenance(tx, &statement, "recorded_by", editor)
        }
        HealthFileOp::Link { to, reason } => write_link(tx, Some(to), reason, editor),
        HealthFileOp::Unlink { reason } => {
            let linked = match tx.get(automerge::ROOT, "link")? {
                Some((Value::Object(ObjType::Map), link)) => tx.get(&link, "to")?.is_some(),
                _ => false,
            };
            if !linked {
                return Err(ValidationError::InvalidValue {
                    field: "link",
                    reason: "the file is not linked to another",
                }
                .into());
            }
            write_link(tx, None, reason, editor)
        }
        HealthFileOp::SetAllergyVerification { entry, status } => {
            let (_, _, id) = find_entry(tx, &root, "allergies", "allergies", entry)?;
            tx.put(&id, "verification", status.as_str())?;
            Ok(())
        }
        HealthFileOp::SetProblemStatus { entry, status } => {
            let (_, _, id) = find_entry(tx, &root, "problems", "problems", entry)?;
            tx.put(&id, "status", status.as_str())?;
            Ok(())
        }
        HealthFileOp::RemoveProblem { icd10 } => remove_matching(tx, "problems", |doc, entry| {
            let text = |key| -> Result<Option<String>, OpError> {
                Ok(match doc.get(entry, key)? {
                    Some((Value::Scalar(s), _)) => s.as_str().map(str::to_string),
                    _ => None,
                })
            };
            // The same code in another system is another diagnosis.
            let system = text("icd10_system")?;
            Ok(text("icd10")?.as_deref() == Some(icd10.as_str())
                && system.as_deref().unwrap_or(Icd10System::Who.as_str())
                    == icd10.system().as_str())
        }),
        HealthFileOp::StopMedication { entry, on } => {
            let (_, _, id) = find_entry(tx, &root, "medications", "medications", entry)?;
            tx.put(&id, "stopped", on.as_str())?;
            Ok(())
        }
        HealthFileOp::EditEncounterNote { entry, note } => {
            check_text(note, "encounters.note", NOTE_BYTES_MAX, false)?;
            let (_, _, id) = find_entry(tx, &root, "encounters", "encounters", entry)?;
            let owner = match tx.get(&id, "institution")? {
                Some((Value::Scalar(s), _)) => s.as_str().map(str::to_owned),
                _ => None,
            };
            if owner.as_deref() != Some(by.as_str()) {
                return Err(ValidationError::Provenance {
                    field: "encounters.note",
                }
                .into());
            }
            // A plain register: the whole note is replaced, a Text note of an earlier release
            // included; a note edited to what it says already, without a conflict to settle,
            // writes nothing.
            let settled = tx.get_all(&id, "note")?.len() == 1;
            let current = match tx.get(&id, "note")? {
                Some((Value::Object(ObjType::Text), text)) => Some(tx.text(&text)?),
                Some((Value::Scalar(value), _)) => value.as_str().map(str::to_owned),
                _ => None,
            };
            match current {
                None => Err(ValidationError::MissingField {
                    field: "encounters.note",
                }
                .into()),
                Some(current) if settled && current == *note => Ok(()),
                Some(_) => {
                    tx.put(&id, "note", note.as_str())?;
                    Ok(())
                }
            }
        }
    }
}

/// Whether an operation reads a clinical list (to find an entry, or to check it): all but
/// the appends and the writes of the contract and of demographic fields.
fn reads_lists(op: &HealthFileOp) -> bool {
    !matches!(
        op,
        HealthFileOp::AddAllergy(_)
            | HealthFileOp::AddProblem(_)
            | HealthFileOp::AddMedication(_)
            | HealthFileOp::AddEncounter(_)
            | HealthFileOp::AddExamResult(_)
            | HealthFileOp::AddFollowUp(_)
            | HealthFileOp::SetContract(_)
            | HealthFileOp::SetDemographic(_)
    )
}

/// The entry an operation that appends to a clinical list makes, and the list, checked;
/// `None` for other operations.
fn new_entry(
    editor: &Editor,
    op: &HealthFileOp,
) -> Result<Option<(&'static str, NewEntry)>, OpError> {
    let by = &editor.institution;
    match op {
        HealthFileOp::AddAllergy(allergy) => {
            check_text(
                &allergy.substance,
                "allergies.substance",
                FIELD_BYTES_MAX,
                true,
            )?;
            check_text(
                &allergy.reaction,
                "allergies.reaction",
                FIELD_BYTES_MAX,
                true,
            )?;
            let mut entry = NewEntry::default();
            entry
                .put("substance", allergy.substance.as_str())
                .put("reaction", allergy.reaction.as_str())
                .put("severity", allergy.severity.as_str());
            provenance(&mut entry, "recorded_by", editor);
            Ok(Some(("allergies", entry)))
        }
        HealthFileOp::AddProblem(problem) => {
            check_text(&problem.display, "problems.display", FIELD_BYTES_MAX, true)?;
            let mut entry = NewEntry::default();
            icd10_fields(&mut entry, &problem.icd10)
                .put("display", problem.display.as_str())
                .put("status", problem.status.as_str());
            if let Some(onset) = &problem.onset {
                entry.put("onset", onset.as_str());
            }
            provenance(&mut entry, "recorded_by", editor);
            Ok(Some(("problems", entry)))
        }
        HealthFileOp::AddMedication(medication) => {
            check_prescription(medication.days)?;
            for (value, field) in [
                (&medication.drug, "medications.drug"),
                (&medication.dose, "medications.dose"),
                (&medication.frequency, "medications.frequency"),
            ] {
                check_text(value, field, FIELD_BYTES_MAX, true)?;
            }
            let mut entry = NewEntry::default();
            entry
                .put("drug", medication.drug.as_str())
                .put("dose", medication.dose.as_str())
                .put("frequency", medication.frequency.as_str())
                .put("start", medication.start.as_str())
                .put("days", medication.days);
            provenance(&mut entry, "prescribed_by", editor);
            Ok(Some(("medications", entry)))
        }
        HealthFileOp::AddEncounter(encounter) => {
            check_text(&encounter.note, "encounters.note", NOTE_BYTES_MAX, false)?;
            check_diagnoses(&encounter.diagnoses)?;
            let diagnoses = encounter
                .diagnoses
                .iter()
                .map(|diagnosis| {
                    let mut item = NewEntry::default();
                    icd10_fields(&mut item, &diagnosis.icd10)
                        .put("display", diagnosis.display.as_str());
                    item
                })
                .collect();
            let mut entry = NewEntry::default();
            entry
                .put("institution", by.as_str())
                .time("time", encounter.time)
                .put("kind", encounter.kind.as_str())
                .list("diagnoses", diagnoses)
                .put("note", encounter.note.as_str());
            Ok(Some(("encounters", entry)))
        }
        HealthFileOp::AddExamResult(result) => {
            check_text(&result.name, "exams.name", FIELD_BYTES_MAX, true)?;
            check_exam_content(&result.measurements, result.report.as_deref())?;
            if let Some(report) = &result.report {
                check_text(report, "exams.report", SUMMARY_BYTES_MAX, false)?;
            }
            check_measurements(&result.measurements)?;
            let measurements = result
                .measurements
                .iter()
                .map(|m| {
                    let mut item = NewEntry::default();
                    item.put("name", m.name.as_str())
                        .put("value", m.value)
                        .opt_text(
                            "unit",
                            m.unit.as_deref(),
                            "exams.measurements.unit",
                            FIELD_BYTES_MAX,
                        )?;
                    Ok(item)
                })
                .collect::<Result<_, OpError>>()?;
            let mut entry = NewEntry::default();
            entry
                .put("kind", result.kind.as_str())
                .put("institution", by.as_str())
                .time("time", result.time)
                .put("name", result.name.as_str())
                .list("measurements", measurements)
                .opt_text(
                    "report",
                    result.report.as_deref(),
                    "exams.report",
                    SUMMARY_BYTES_MAX,
                )?;
            Ok(Some(("exams", entry)))
        }
        HealthFileOp::AddFollowUp(follow_up) => {
            check_follow_up(
                follow_up.systolic_mmhg,
                follow_up.diastolic_mmhg,
                follow_up.glucose_mmol_per_l,
            )?;
            let mut entry = NewEntry::default();
            entry
                .put("institution", by.as_str())
                .time("time", follow_up.time);
            if let Some(v) = follow_up.systolic_mmhg {
                entry.put("systolic_mmhg", v);
            }
            if let Some(v) = follow_up.diastolic_mmhg {
                entry.put("diastolic_mmhg", v);
            }
            if let Some(v) = follow_up.glucose_mmol_per_l {
                entry.put("glucose_mmol_per_l", v);
            }
            Ok(Some(("follow_ups", entry)))
        }
        _ => Ok(None),
    }
}

/// The object of `entry`, a record of `list` that the editor's institution wrote, for one of
/// its markers (`fields`) with `reason`; a Provenance error for another institution's.
fn own_record(
    tx: &AutoCommit,
    list: CorrectableList,
    fields: MarkerFields,
    entry: &EntryId,
    reason: &str,
    editor: &Editor,
) -> Result<ObjId, OpError> {
    check_text(reason, fields.reason, FIELD_BYTES_MAX, true)?;
    let (_, _, id) = find_entry(tx, &automerge::ROOT, list.key(), list.key(), entry)?;
    let owner = match tx.get(&id, list.owner_key())? {
        Some((Value::Scalar(owner), _)) => owner.as_str().map(str::to_string),
        _ => None,
    };
    if owner.as_deref() != Some(editor.institution.as_str()) {
        return Err(ValidationError::Provenance {
            field: fields.marker,
        }
        .into());
    }
    Ok(id)
}

/// A link of a file to itself, which says nothing.
pub(crate) const LINK_TO_ITSELF: ValidationError = ValidationError::InvalidValue {
    field: "link.to",
    reason: "another file of the same resident, not the file itself",
};

/// Writes a file's link (`to`) or unlink (`None`), in the editor's name: a fresh map per
/// write, so that concurrent links conflict as wholes and show for review.
fn write_link(
    tx: &mut AutoCommit,
    to: Option<&DocumentId>,
    reason: &str,
    editor: &Editor,
) -> Result<(), OpError> {
    check_text(reason, "link.reason", FIELD_BYTES_MAX, true)?;
    let link = tx.put_object(automerge::ROOT, "link", ObjType::Map)?;
    if let Some(to) = to {
        tx.put(&link, "to", to.to_string())?;
    }
    tx.put(&link, "reason", reason)?;
    record_provenance(tx, &link, "recorded_by", editor)
}

/// Writes who recorded an entry and when.
fn record_provenance(
    tx: &mut AutoCommit,
    entry: &ObjId,
    key: &str,
    editor: &Editor,
) -> Result<(), OpError> {
    tx.put(entry, key, editor.institution.as_str())?;
    put_time(tx, entry, "recorded_at", editor.at)
}

/// Writes who recorded a new entry and when.
fn provenance(entry: &mut NewEntry, key: &str, editor: &Editor) {
    entry
        .put(key, editor.institution.as_str())
        .time("recorded_at", editor.at);
}

/// Appends a new entry to a clinical list of the file, refused when the list is full.
fn append(tx: &mut AutoCommit, list: &'static str, entry: NewEntry) -> Result<(), OpError> {
    append_entry(
        tx,
        &automerge::ROOT,
        list,
        list,
        ENTRIES_PER_LIST_MAX,
        entry,
    )?;
    Ok(())
}

/// Writes `code` into `entry`: the code as written, and its system's name unless it is WHO
/// ICD-10 (so a WHO code is stored as it always was).
fn icd10_fields<'e>(entry: &'e mut NewEntry, code: &Icd10) -> &'e mut NewEntry {
    entry.put("icd10", code.as_str());
    if code.system() != Icd10System::Who {
        entry.put("icd10_system", code.system().as_str());
    }
    entry
}

/// Deletes every entry of the list at `key` that `matches`. Only entries this replica holds
/// are deleted, which is what makes the set add-wins.
fn remove_matching(
    tx: &mut AutoCommit,
    key: &'static str,
    matches: impl Fn(&AutoCommit, &ObjId) -> Result<bool, OpError>,
) -> Result<(), OpError> {
    let Some((Value::Object(ObjType::List), list)) = tx.get(automerge::ROOT, key)? else {
        return Err(ValidationError::MissingField { field: key }.into());
    };
    // Walk backwards so deleting an entry does not shift the ones still to visit.
    for index in (0..tx.length(&list)).rev() {
        if let Some((_, entry)) = tx.get(&list, index)?
            && matches(tx, &entry)?
        {
            tx.delete(&list, index)?;
        }
    }
    Ok(())
}

fn check_prescription(days: u64) -> Result<(), ValidationError> {
    if days == 0 {
        return Err(ValidationError::InvalidValue {
            field: "medications.days",
            reason: "a prescription lasts at least one day",
        });
    }
    if days > PRESCRIPTION_DAYS_MAX {
        return Err(ValidationError::PrescriptionTooLong {
            days,
            max: PRESCRIPTION_DAYS_MAX,
        });
    }
    Ok(())
}

fn check_diagnoses(diagnoses: &[Diagnosis]) -> Result<(), ValidationError> {
    if diagnoses.len() > DIAGNOSES_PER_ENCOUNTER_MAX {
        return Err(ValidationError::TooMany {
            field: "encounters.diagnoses",
            count: diagnoses.len(),
            max: DIAGNOSES_PER_ENCOUNTER_MAX,
        });
    }
    for diagnosis in diagnoses {
        check_text(
            &diagnosis.display,
            "encounters.diagnoses.display",
            FIELD_BYTES_MAX,
            true,
        )?;
    }
    Ok(())
}

/// A result others can recognise carries measured values, a report, or both.
fn check_exam_content(
    measurements: &[Measurement],
    report: Option<&str>,
) -> Result<(), ValidationError> {
    if measurements.is_empty() && report.is_none_or(|r| r.trim().is_empty()) {
        return Err(ValidationError::InvalidValue {
            field: "exams",
            reason: "an exam result records measured values, a report, or both",
        });
    }
    Ok(())
}

fn check_measurements(measurements: &[Measurement]) -> Result<(), ValidationError> {
    if measurements.len() > MEASUREMENTS_PER_RESULT_MAX {
        return Err(ValidationError::TooMany {
            field: "exams.measurements",
            count: measurements.len(),
            max: MEASUREMENTS_PER_RESULT_MAX,
        });
    }
    for m in measurements {
        check_text(&m.name, "exams.measurements.name", FIELD_BYTES_MAX, true)?;
        if !m.value.is_finite() {
            return Err(ValidationError::WrongType {
                field: "exams.measurements.value",
                expected: "a finite number",
            });
        }
    }
    Ok(())
}

/// Plausibility bounds for follow-up vital signs: wide enough for any living patient, narrow
/// enough to catch a unit error (kPa for mmHg, mg/dL for mmol/L).
const BLOOD_PRESSURE_MMHG_MAX: u64 = 350;
const GLUCOSE_MMOL_PER_L_MAX: f64 = 100.0;

fn check_follow_up(
    systolic: Option<u64>,
    diastolic: Option<u64>,
    glucose: Option<f64>,
) -> Result<(), ValidationError> {
    if systolic.is_none() && diastolic.is_none() && glucose.is_none() {
        return Err(ValidationError::InvalidValue {
            field: "follow_ups",
            reason: "a follow-up records blood pressure, glucose, or both",
        });
    }
    if systolic.is_some() != diastolic.is_some() {
        return Err(ValidationError::InvalidValue {
            field: "follow_ups",
            reason: "blood pressure needs both systolic and diastolic values",
        });
    }
    for (value, field) in [
        (systolic, "follow_ups.systolic_mmhg"),
        (diastolic, "follow_ups.diastolic_mmhg"),
    ] {
        if value.is_some_and(|v| v == 0 || v > BLOOD_PRESSURE_MMHG_MAX) {
            return Err(ValidationError::InvalidValue {
                field,
                reason: "blood pressure is between 1 and 350 mmHg",
            });
        }
    }
    if glucose.is_some_and(|g| !(g > 0.0 && g <= GLUCOSE_MMOL_PER_L_MAX)) {
        return Err(ValidationError::InvalidValue {
            field: "follow_ups.glucose_mmol_per_l",
            reason: "glucose is between 0 and 100 mmol/L",
        });
    }
    Ok(())
}

fn write_demographic(
    tx: &mut AutoCommit,
    demographics: &ObjId,
    field: &DemographicField,
) -> Result<(), OpError> {
    let (key, value) = demographic(field)?;
    put_value(tx, demographics, key, &value)
}

/// A demographic field's key and value, checked. A field that is a map (name, address,
/// insurance) is written whole: concurrent writes conflict as wholes.
fn demographic(field: &DemographicField) -> Result<(&'static str, HydrateValue), OpError> {
    let scalar = |text: &str| HydrateValue::Scalar(text.into());
    Ok(match field {
        DemographicField::Name(name) => {
            check_name(name)?;
            let mut obj = NewEntry::default();
            obj.put("family", name.family.as_str())
                .put("given", name.given.as_str())
                .opt_text(
                    "text",
                    name.text.as_deref(),
                    "demographics.name.text",
                    FIELD_BYTES_MAX,
                )?;
            ("name", obj.into_value())
        }
        DemographicField::Sex(sex) => ("sex", scalar(sex.as_str())),
        DemographicField::BirthDate(date) => ("birth_date", scalar(date.as_str())),
        DemographicField::Phone(phone) => {
            check_text(phone, "demographics.phone", FIELD_BYTES_MAX, true)?;
            ("phone", scalar(phone))
        }
        DemographicField::NationalId(national_id) => {
            check_text(
                national_id,
                "demographics.national_id",
                FIELD_BYTES_MAX,
                true,
            )?;
            ("national_id", scalar(national_id))
        }
        DemographicField::Address(address) => {
            check_text(
                &address.line,
                "demographics.address.line",
                FIELD_BYTES_MAX,
                true,
            )?;
            let mut obj = NewEntry::default();
            obj.put("line", address.line.as_str());
            for (key, value) in [
                ("town", &address.town),
                ("district", &address.district),
                ("city", &address.city),
                ("postal_code", &address.postal_code),
            ] {
                obj.opt_text(
                    key,
                    value.as_deref(),
                    "demographics.address",
                    FIELD_BYTES_MAX,
                )?;
            }
            ("address", obj.into_value())
        }
        DemographicField::Insurance(insurance) => {
            check_text(
                &insurance.scheme,
                "demographics.insurance.scheme",
                FIELD_BYTES_MAX,
                true,
            )?;
            check_text(
                &insurance.number,
                "demographics.insurance.number",
                FIELD_BYTES_MAX,
                true,
            )?;
            let mut obj = NewEntry::default();
            obj.put("scheme", insurance.scheme.as_str())
                .put("number", insurance.number.as_str());
            if let Some(until) = &insurance.valid_until {
                obj.put("valid_until", until.as_str());
            }
            ("insurance", obj.into_value())
        }
    })
}

fn check_name(name: &PersonName) -> Result<(), ValidationError> {
    check_text(
        &name.family,
        "demographics.name.family",
        FIELD_BYTES_MAX,
        true,
    )?;
    check_text(
        &name.given,
        "demographics.name.given",
        FIELD_BYTES_MAX,
        true,
    )?;
    if let Some(text) = &name.text {
        check_text(text, "demographics.name.text", FIELD_BYTES_MAX, false)?;
    }
    Ok(())
}

fn write_contract(tx: &mut AutoCommit, contract: &FamilyDoctorContract) -> Result<(), OpError> {
    put_value(
        tx,
        &automerge::ROOT,
        "contract",
        &contract_entry(contract)?.into_value(),
    )?;
    Ok(())
}

/// A contract as the map a write of it puts, checked.
fn contract_entry(contract: &FamilyDoctorContract) -> Result<NewEntry, OpError> {
    check_text(
        &contract.doctor_id,
        "contract.doctor_id",
        FIELD_BYTES_MAX,
        true,
    )?;
    check_text(
        &contract.doctor_name,
        "contract.doctor_name",
        FIELD_BYTES_MAX,
        true,
    )?;
    // A fresh map per write: concurrent contracts conflict as wholes, never field by field.
    let mut obj = NewEntry::default();
    obj.put("community_centre", contract.community_centre.as_str())
        .put("district_hospital", contract.district_hospital.as_str())
        .put("municipal_hospital", contract.municipal_hospital.as_str())
        .put("doctor_id", contract.doctor_id.as_str())
        .put("doctor_name", contract.doctor_name.as_str())
        .put("since", contract.since.as_str());
    Ok(obj)
}

// ---- Reading and validation -------------------------------------------------------------

/// Reads the map object `value` as a child of `obj` with schema path `path`.
fn map_child<'d, D: ReadDoc>(
    obj: &Obj<'d, D>,
    value: &Value<'_>,
    id: &ObjId,
    path: &'static str,
    keys: &[&str],
) -> Result<Obj<'d, D>, ValidationError> {
    let id = object(ObjType::Map, "an object")(&obj.child(id.clone(), path), value, id)?;
    let child = obj.child(id, path);
    child.only_keys(keys)?;
    Ok(child)
}

/// Parses and validates a whole health file.
pub(crate) fn parse_health_file<D: ReadDoc>(doc: &D) -> Result<HealthFileView, ValidationError> {
    parse_health_file_of(&Obj::root(doc))
}

/// [`parse_health_file`] of the document whose root is `root`.
pub(crate) fn parse_health_file_of<D: ReadDoc>(
    root: &Obj<'_, D>,
) -> Result<HealthFileView, ValidationError> {
    if read_identity_of(root)? != DocumentKind::HealthFile {
        return Err(ValidationError::UnknownDocumentType);
    }
    root.only_keys(&ROOT_KEYS)?;
    let demographics = read_demographics(root)?;
    let contract = read_contract(root)?;
    let no_known_allergies = root.register(
        "no_known_allergies",
        "no_known_allergies",
        parse_no_known_allergies,
    )?;
    let link = root.register("link", "link", parse_link)?;
    Ok(HealthFileView {
        // The id is not content: it is derived from the creation change by the replica.
        id: DocumentId::from_bytes([0; 16]),
        demographics,
        contract,
        no_known_allergies,
        link,
        allergies: read_list(root)?,
        problems: read_list(root)?,
        medications: read_list(root)?,
        encounters: read_list(root)?,
        exams: read_list(root)?,
        follow_ups: read_list(root)?,
    })
}

/// The demographics section of a file.
fn read_demographics<D: ReadDoc>(root: &Obj<'_, D>) -> Result<DemographicsView, ValidationError> {
    let section = root.child(
        root.container("demographics", "demographics", ObjType::Map, "an object")?,
        "demographics",
    );
    section.only_keys(&[
        "name",
        "sex",
        "birth_date",
        "phone",
        "address",
        "national_id",
        "insurance",
    ])?;
    parse_demographics(&section)
}

/// The family doctor contract of a file.
fn read_contract<D: ReadDoc>(
    root: &Obj<'_, D>,
) -> Result<Option<Register<FamilyDoctorContract>>, ValidationError> {
    root.register("contract", "contract", parse_contract)
}

/// Every entry of one clinical list, in document order.
fn read_list<T: Listed, D: ReadDoc>(root: &Obj<'_, D>) -> Result<Vec<Arc<T>>, ValidationError> {
    root.entries(T::KEY, T::KEY, None)?
        .iter()
        .map(|id| T::parse(&root.child(id.clone(), T::KEY)).map(Arc::new))
        .collect()
}

fn parse_demographics<D: ReadDoc>(
    section: &Obj<'_, D>,
) -> Result<DemographicsView, ValidationError> {
    Ok(DemographicsView {
        name: section.required("name", "demographics.name", |obj, value, id| {
            let name = map_child(
                obj,
                value,
                id,
                "demographics.name",
                &["family", "given", "text"],
            )?;
            Ok(PersonName {
                family: name.once(
                    "family",
                    "demographics.name.family",
                    text("demographics.name.family", FIELD_BYTES_MAX, true),
                )?,
                given: name.once(
                    "given",
                    "demographics.name.given",
                    text("demographics.name.given", FIELD_BYTES_MAX, true),
                )?,
                text: name.once_opt(
                    "text",
                    "demographics.name.text",
                    text("demographics.name.text", FIELD_BYTES_MAX, false),
                )?,
            })
        })?,
        sex: section.required(
            "sex",
            "demographics.sex",
            access::checked("demographics.sex", Sex::parse),
        )?,
        birth_date: section.required(
            "birth_date",
            "demographics.birth_date",
            date("demographics.birth_date"),
        )?,
        phone: section.register(
            "phone",
            "demographics.phone",
            text("demographics.phone", FIELD_BYTES_MAX, true),
        )?,
        national_id: section.register(
            "national_id",
            "demographics.national_id",
            text("demographics.national_id", FIELD_BYTES_MAX, true),
        )?,
        address: section.register("address", "demographics.address", |obj, value, id| {
            let address = map_child(
                obj,
                value,
                id,
                "demographics.address",
                &["line", "town", "district", "city", "postal_code"],
            )?;
            let optional = |key: &str| {
                address.once_opt(
                    key,
                    "demographics.address",
                    text("demographics.address", FIELD_BYTES_MAX, false),
                )
            };
            Ok(Address {
                line: address.once(
                    "line",
                    "demographics.address.line",
                    text("demographics.address.line", FIELD_BYTES_MAX, true),
                )?,
                town: optional("town")?,
                district: optional("district")?,
                city: optional("city")?,
                postal_code: optional("postal_code")?,
            })
        })?,
        insurance: section.register("insurance", "demographics.insurance", |obj, value, id| {
            let insurance = map_child(
                obj,
                value,
                id,
                "demographics.insurance",
                &["scheme", "number", "valid_until"],
            )?;
            Ok(Insurance {
                scheme: insurance.once(
                    "scheme",
                    "demographics.insurance.scheme",
                    text("demographics.insurance.scheme", FIELD_BYTES_MAX, true),
                )?,
                number: insurance.once(
                    "number",
                    "demographics.insurance.number",
                    text("demographics.insurance.number", FIELD_BYTES_MAX, true),
                )?,
                valid_until: insurance.once_opt(
                    "valid_until",
                    "demographics.insurance.valid_until",
                    date("demographics.insurance.valid_until"),
                )?,
            })
        })?,
    })
}

fn parse_no_known_allergies<D: ReadDoc>(
    obj: &Obj<'_, D>,
    value: &Value<'_>,
    id: &ObjId,
) -> Result<NoKnownAllergies, ValidationError> {
    let statement = map_child(
        obj,
        value,
        id,
        "no_known_allergies",
        &["recorded_by", "recorded_at"],
    )?;
    Ok(NoKnownAllergies {
        recorded_by: statement.once(
            "recorded_by",
            "no_known_allergies.recorded_by",
            institution("no_known_allergies.recorded_by"),
        )?,
        recorded_at: statement.once(
            "recorded_at",
            "no_known_allergies.recorded_at",
            timestamp("no_known_allergies.recorded_at"),
        )?,
    })
}

fn parse_link<D: ReadDoc>(
    obj: &Obj<'_, D>,
    value: &Value<'_>,
    id: &ObjId,
) -> Result<FileLink, ValidationError> {
    let link = map_child(
        obj,
        value,
        id,
        "link",
        &["to", "reason", "recorded_by", "recorded_at"],
    )?;
    Ok(FileLink {
        to: link.once_opt(
            "to",
            "link.to",
            checked("link.to", |text, _| DocumentId::parse(text)),
        )?,
        reason: link.once(
            "reason",
            "link.reason",
            text("link.reason", FIELD_BYTES_MAX, true),
        )?,
        recorded_by: link.once(
            "recorded_by",
            "link.recorded_by",
            institution("link.recorded_by"),
        )?,
        recorded_at: link.once(
            "recorded_at",
            "link.recorded_at",
            timestamp("link.recorded_at"),
        )?,
    })
}

fn parse_contract<D: ReadDoc>(
    obj: &Obj<'_, D>,
    value: &Value<'_>,
    id: &ObjId,
) -> Result<FamilyDoctorContract, ValidationError> {
    let contract = map_child(
        obj,
        value,
        id,
        "contract",
        &[
            "community_centre",
            "district_hospital",
            "municipal_hospital",
            "doctor_id",
            "doctor_name",
            "since",
        ],
    )?;
    Ok(FamilyDoctorContract {
        community_centre: contract.once(
            "community_centre",
            "contract.community_centre",
            institution("contract.community_centre"),
        )?,
        district_hospital: contract.once(
            "district_hospital",
            "contract.district_hospital",
            institution("contract.district_hospital"),
        )?,
        municipal_hospital: contract.once(
            "municipal_hospital",
            "contract.municipal_hospital",
            institution("contract.municipal_hospital"),
        )?,
        doctor_id: contract.once(
            "doctor_id",
            "contract.doctor_id",
            text("contract.doctor_id", FIELD_BYTES_MAX, true),
        )?,
        doctor_name: contract.once(
            "doctor_name",
            "contract.doctor_name",
            text("contract.doctor_name", FIELD_BYTES_MAX, true),
        )?,
        since: contract.once("since", "contract.since", date("contract.since"))?,
    })
}

fn parse_allergy<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<AllergyView, ValidationError> {
    entry.only_keys(&[
        "substance",
        "reaction",
        "severity",
        "recorded_by",
        "recorded_at",
        "verification",
    ])?;
    Ok(AllergyView {
        entry: entry_id(&entry.id),
        substance: entry.once(
            "substance",
            "allergies.substance",
            text("allergies.substance", FIELD_BYTES_MAX, true),
        )?,
        reaction: entry.once(
            "reaction",
            "allergies.reaction",
            text("allergies.reaction", FIELD_BYTES_MAX, true),
        )?,
        severity: entry.once(
            "severity",
            "allergies.severity",
            access::checked("allergies.severity", Severity::parse),
        )?,
        recorded_by: entry.once(
            "recorded_by",
            "allergies.recorded_by",
            institution("allergies.recorded_by"),
        )?,
        recorded_at: entry.once(
            "recorded_at",
            "allergies.recorded_at",
            timestamp("allergies.recorded_at"),
        )?,
        verification: entry.register(
            "verification",
            "allergies.verification",
            access::checked("allergies.verification", AllergyVerification::parse),
        )?,
    })
}

fn parse_problem<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<ProblemView, ValidationError> {
    entry.only_keys(&[
        "icd10",
        "icd10_system",
        "display",
        "onset",
        "status",
        "recorded_by",
        "recorded_at",
    ])?;
    Ok(ProblemView {
        entry: entry_id(&entry.id),
        icd10: icd10(
            entry,
            ("icd10", "problems.icd10"),
            ("icd10_system", "problems.icd10_system"),
        )?,
        display: entry.once(
            "display",
            "problems.display",
            text("problems.display", FIELD_BYTES_MAX, true),
        )?,
        onset: entry.once_opt("onset", "problems.onset", date("problems.onset"))?,
        status: entry.required(
            "status",
            "problems.status",
            access::checked("problems.status", ProblemStatus::parse),
        )?,
        recorded_by: entry.once(
            "recorded_by",
            "problems.recorded_by",
            institution("problems.recorded_by"),
        )?,
        recorded_at: entry.once(
            "recorded_at",
            "problems.recorded_at",
            timestamp("problems.recorded_at"),
        )?,
    })
}

fn parse_medication<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<MedicationView, ValidationError> {
    entry.only_keys(&[
        "drug",
        "dose",
        "frequency",
        "start",
        "days",
        "prescribed_by",
        "recorded_at",
        "stopped",
        "entered_in_error",
        "amended",
    ])?;
    let days = entry.once("days", "medications.days", uint("medications.days"))?;
    check_prescription(days)?;
    Ok(MedicationView {
        entry: entry_id(&entry.id),
        drug: entry.once(
            "drug",
            "medications.drug",
            text("medications.drug", FIELD_BYTES_MAX, true),
        )?,
        dose: entry.once(
            "dose",
            "medications.dose",
            text("medications.dose", FIELD_BYTES_MAX, true),
        )?,
        frequency: entry.once(
            "frequency",
            "medications.frequency",
            text("medications.frequency", FIELD_BYTES_MAX, true),
        )?,
        start: entry.once("start", "medications.start", date("medications.start"))?,
        days,
        prescribed_by: entry.once(
            "prescribed_by",
            "medications.prescribed_by",
            institution("medications.prescribed_by"),
        )?,
        recorded_at: entry.once(
            "recorded_at",
            "medications.recorded_at",
            timestamp("medications.recorded_at"),
        )?,
        stopped: entry.register(
            "stopped",
            "medications.stopped",
            date("medications.stopped"),
        )?,
        entered_in_error: entered_in_error(entry, CorrectableList::Medications)?,
        amended: amended(entry, CorrectableList::Medications)?,
    })
}

/// The entered-in-error marker of an entry of `list`, if it has one.
fn entered_in_error<D: ReadDoc>(
    entry: &Obj<'_, D>,
    list: CorrectableList,
) -> Result<Option<Register<EnteredInError>>, ValidationError> {
    let fields = list.marker_fields();
    entry.register("entered_in_error", fields.marker, |obj, value, id| {
        let marker = map_child(
            obj,
            value,
            id,
            fields.marker,
            &["reason", "recorded_by", "recorded_at"],
        )?;
        let (reason, recorded_by, recorded_at) = marker_provenance(&marker, &fields)?;
        Ok(EnteredInError {
            reason,
            recorded_by,
            recorded_at,
        })
    })
}

/// The amendment marker of an entry of `list`, if it has one.
fn amended<D: ReadDoc>(
    entry: &Obj<'_, D>,
    list: CorrectableList,
) -> Result<Option<Register<Amended>>, ValidationError> {
    let fields = list.amend_fields();
    entry.register("amended", fields.marker, |obj, value, id| {
        let marker = map_child(
            obj,
            value,
            id,
            fields.marker,
            &["by", "reason", "recorded_by", "recorded_at"],
        )?;
        let (reason, recorded_by, recorded_at) = marker_provenance(&marker, &fields)?;
        Ok(Amended {
            by: marker.once(
                "by",
                fields.marker,
                checked(fields.marker, |text, _| EntryId::parse(text)),
            )?,
            reason,
            recorded_by,
            recorded_at,
        })
    })
}

/// What every marker of a record holds: why, who wrote it and when.
fn marker_provenance<D: ReadDoc>(
    marker: &Obj<'_, D>,
    fields: &MarkerFields,
) -> Result<(String, InstitutionId, Timestamp), ValidationError> {
    Ok((
        marker.once(
            "reason",
            fields.reason,
            text(fields.reason, FIELD_BYTES_MAX, true),
        )?,
        marker.once(
            "recorded_by",
            fields.recorded_by,
            institution(fields.recorded_by),
        )?,
        marker.once(
            "recorded_at",
            fields.recorded_at,
            timestamp(fields.recorded_at),
        )?,
    ))
}

/// Checks that every value of an entry's markers names the entry's own institution: only it
/// marks or amends its records, in its own name.
fn marked_by_owner(
    marker: &Option<Register<EnteredInError>>,
    amended: &Option<Register<Amended>>,
    owner: &InstitutionId,
    list: CorrectableList,
) -> Result<(), ValidationError> {
    /// Whether a marker (any of its concurrent values) was written by another institution.
    fn elsewhere<T>(
        marker: &Option<Register<T>>,
        owner: &InstitutionId,
        recorded_by: fn(&T) -> &InstitutionId,
    ) -> bool {
        marker.iter().any(|register| {
            std::iter::once(&register.value)
                .chain(&register.conflicts)
                .any(|m| recorded_by(m) != owner)
        })
    }
    if elsewhere(marker, owner, |m| &m.recorded_by) {
        return Err(ValidationError::Provenance {
            field: list.marker_fields().recorded_by,
        });
    }
    if elsewhere(amended, owner, |m| &m.recorded_by) {
        return Err(ValidationError::Provenance {
            field: list.amend_fields().recorded_by,
        });
    }
    Ok(())
}

fn parse_encounter<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<EncounterView, ValidationError> {
    entry.only_keys(&[
        "institution",
        "time",
        "kind",
        "diagnoses",
        "note",
        "entered_in_error",
        "amended",
    ])?;
    let diagnoses = entry
        .entries(
            "diagnoses",
            "encounters.diagnoses",
            Some(DIAGNOSES_PER_ENCOUNTER_MAX),
        )?
        .into_iter()
        .map(|id| {
            let item = entry.child(id, "encounters.diagnoses");
            item.only_keys(&["icd10", "icd10_system", "display"])?;
            Ok(Diagnosis {
                icd10: icd10(
                    &item,
                    ("icd10", "encounters.diagnoses.icd10"),
                    ("icd10_system", "encounters.diagnoses.icd10_system"),
                )?,
                display: item.once(
                    "display",
                    "encounters.diagnoses.display",
                    text("encounters.diagnoses.display", FIELD_BYTES_MAX, true),
                )?,
            })
        })
        .collect::<Result<_, ValidationError>>()?;
    let Register {
        value: note,
        conflicts: note_conflicts,
    } = entry.required("note", "encounters.note", long_text("encounters.note"))?;
    Ok(EncounterView {
        entry: entry_id(&entry.id),
        institution: entry.once(
            "institution",
            "encounters.institution",
            institution("encounters.institution"),
        )?,
        time: entry.once("time", "encounters.time", timestamp("encounters.time"))?,
        kind: entry.once(
            "kind",
            "encounters.kind",
            access::checked("encounters.kind", EncounterKind::parse),
        )?,
        diagnoses,
        note,
        note_conflicts,
        entered_in_error: entered_in_error(entry, CorrectableList::Encounters)?,
        amended: amended(entry, CorrectableList::Encounters)?,
    })
}

fn parse_exam<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<ExamResultView, ValidationError> {
    entry.only_keys(&[
        "kind",
        "institution",
        "time",
        "name",
        "measurements",
        "report",
        "entered_in_error",
        "amended",
    ])?;
    let measurements: Vec<Measurement> = entry
        .entries(
            "measurements",
            "exams.measurements",
            Some(MEASUREMENTS_PER_RESULT_MAX),
        )?
        .into_iter()
        .map(|id| {
            let item = entry.child(id, "exams.measurements");
            item.only_keys(&["name", "value", "unit"])?;
            Ok(Measurement {
                name: item.once(
                    "name",
                    "exams.measurements.name",
                    text("exams.measurements.name", FIELD_BYTES_MAX, true),
                )?,
                value: item.once(
                    "value",
                    "exams.measurements.value",
                    finite("exams.measurements.value"),
                )?,
                unit: item.once_opt(
                    "unit",
                    "exams.measurements.unit",
                    text("exams.measurements.unit", FIELD_BYTES_MAX, false),
                )?,
            })
        })
        .collect::<Result<_, ValidationError>>()?;
    let report = entry.once_opt(
        "report",
        "exams.report",
        text("exams.report", SUMMARY_BYTES_MAX, false),
    )?;
    check_exam_content(&measurements, report.as_deref())?;
    Ok(ExamResultView {
        entry: entry_id(&entry.id),
        kind: entry.once(
            "kind",
            "exams.kind",
            access::checked("exams.kind", ExamKind::parse),
        )?,
        institution: entry.once(
            "institution",
            "exams.institution",
            institution("exams.institution"),
        )?,
        time: entry.once("time", "exams.time", timestamp("exams.time"))?,
        name: entry.once(
            "name",
            "exams.name",
            text("exams.name", FIELD_BYTES_MAX, true),
        )?,
        measurements,
        report,
        entered_in_error: entered_in_error(entry, CorrectableList::Exams)?,
        amended: amended(entry, CorrectableList::Exams)?,
    })
}

fn parse_follow_up<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<FollowUpView, ValidationError> {
    entry.only_keys(&[
        "institution",
        "time",
        "systolic_mmhg",
        "diastolic_mmhg",
        "glucose_mmol_per_l",
        "entered_in_error",
        "amended",
    ])?;
    let systolic = entry.once_opt(
        "systolic_mmhg",
        "follow_ups.systolic_mmhg",
        uint("follow_ups.systolic_mmhg"),
    )?;
    let diastolic = entry.once_opt(
        "diastolic_mmhg",
        "follow_ups.diastolic_mmhg",
        uint("follow_ups.diastolic_mmhg"),
    )?;
    let glucose = entry.once_opt(
        "glucose_mmol_per_l",
        "follow_ups.glucose_mmol_per_l",
        finite("follow_ups.glucose_mmol_per_l"),
    )?;
    check_follow_up(systolic, diastolic, glucose)?;
    Ok(FollowUpView {
        entry: entry_id(&entry.id),
        institution: entry.once(
            "institution",
            "follow_ups.institution",
            institution("follow_ups.institution"),
        )?,
        time: entry.once("time", "follow_ups.time", timestamp("follow_ups.time"))?,
        systolic_mmhg: systolic,
        diastolic_mmhg: diastolic,
        glucose_mmol_per_l: glucose,
        entered_in_error: entered_in_error(entry, CorrectableList::FollowUps)?,
        amended: amended(entry, CorrectableList::FollowUps)?,
    })
}

/// Checks what a change may do to a health file given what it saw (`before`): append-only
/// lists keep every entry unchanged, fixed fields stay fixed, and new entries and note edits
/// are written only in the author's own name.
pub(crate) fn check_change(
    before: &HealthFileView,
    after: &HealthFileView,
    author: &InstitutionId,
) -> Result<(), ValidationError> {
    fn whole<T: Listed>(
        before: &HealthFileView,
        after: &HealthFileView,
        author: &InstitutionId,
    ) -> Result<(), ValidationError> {
        let (before, after) = (T::list(before), T::list(after));
        T::RULES.check(before, after, (before.len(), after.len()), author)
    }
    // A statement of no known allergies, and a link, are made only in their author's own
    // name.
    if in_another_name(
        &before.no_known_allergies,
        &after.no_known_allergies,
        author,
        |s| &s.recorded_by,
    ) {
        return Err(ValidationError::Provenance {
            field: "no_known_allergies.recorded_by",
        });
    }
    if in_another_name(&before.link, &after.link, author, |l| &l.recorded_by) {
        return Err(ValidationError::Provenance {
            field: "link.recorded_by",
        });
    }
    whole::<AllergyView>(before, after, author)?;
    whole::<ProblemView>(before, after, author)?;
    whole::<MedicationView>(before, after, author)?;
    whole::<EncounterView>(before, after, author)?;
    whole::<ExamResultView>(before, after, author)?;
    whole::<FollowUpView>(before, after, author)
}

/// Whether a change wrote a value of a root register (one not held before it, any of its
/// concurrent values) in the name of another institution than its author's.
fn in_another_name<T: PartialEq>(
    before: &Option<Register<T>>,
    after: &Option<Register<T>>,
    author: &InstitutionId,
    recorded_by: fn(&T) -> &InstitutionId,
) -> bool {
    fn values<T>(register: &Option<Register<T>>) -> impl Iterator<Item = &T> {
        register
            .iter()
            .flat_map(|r| std::iter::once(&r.value).chain(&r.conflicts))
    }
    let held: Vec<&T> = values(before).collect();
    values(after).any(|value| !held.contains(&value) && recorded_by(value) != author)
}

/// An entry of one of the clinical lists: where it lives, how it is read, and the rules the
/// list follows across a change.
pub(crate) trait Listed: Clone + PartialEq + Sized {
    /// The list's root key (and schema path).
    const KEY: &'static str;
    /// The list's rules.
    const RULES: ListCheck<Self>;
    /// Reads and validates one entry.
    fn parse<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<Self, ValidationError>;
    /// The entry's id.
    fn entry(&self) -> &EntryId;
    /// The list in a view.
    fn list(view: &HealthFileView) -> &Vec<Arc<Self>>;
    /// The list in a view, to replace.
    fn list_mut(view: &mut HealthFileView) -> &mut Vec<Arc<Self>>;
}

macro_rules! listed {
    ($view:ty, $key:literal, $field:ident, $parse:ident, $rules:expr) => {
        impl Listed for $view {
            const KEY: &'static str = $key;
            const RULES: ListCheck<Self> = $rules;
            fn parse<D: ReadDoc>(entry: &Obj<'_, D>) -> Result<Self, ValidationError> {
                $parse(entry)
            }
            fn entry(&self) -> &EntryId {
                &self.entry
            }
            fn list(view: &HealthFileView) -> &Vec<Arc<Self>> {
                &view.$field
            }
            fn list_mut(view: &mut HealthFileView) -> &mut Vec<Arc<Self>> {
                &mut view.$field
            }
        }
    };
}

/// Which marker of a record of `list` a change edited, if any: only the record's institution
/// may.
type Markers<'a> = (
    &'a Option<Register<EnteredInError>>,
    &'a Option<Register<Amended>>,
);

fn marker_edit(old: Markers<'_>, new: Markers<'_>, list: CorrectableList) -> Option<&'static str> {
    if old.0 != new.0 {
        Some(list.marker_fields().marker)
    } else if old.1 != new.1 {
        Some(list.amend_fields().marker)
    } else {
        None
    }
}

fn no_owner_only_edit<T>(_: &T, _: &T) -> Option<&'static str> {
    None
}

fn no_entry_limits<T>(_: &T) -> Result<(), ValidationError> {
    Ok(())
}

// Allergies and problems are add-wins sets: entries may go, but not change.
listed!(
    AllergyView,
    "allergies",
    allergies,
    parse_allergy,
    ListCheck {
        field: "allergies",
        owner_field: "allergies.recorded_by",
        append_only: false,
        owner: |a| &a.recorded_by,
        fixed: |a| AllergyView {
            verification: None,
            ..a.clone()
        },
        owner_only_edit: no_owner_only_edit,
        entry_limits: no_entry_limits,
    }
);
listed!(
    ProblemView,
    "problems",
    problems,
    parse_problem,
    ListCheck {
        field: "problems",
        owner_field: "problems.recorded_by",
        append_only: false,
        owner: |p| &p.recorded_by,
        fixed: |p| ProblemView {
            status: Register::single(ProblemStatus::Active),
            ..p.clone()
        },
        owner_only_edit: no_owner_only_edit,
        entry_limits: no_entry_limits,
    }
);
listed!(
    MedicationView,
    "medications",
    medications,
    parse_medication,
    ListCheck {
        field: "medications",
        owner_field: "medications.prescribed_by",
        append_only: true,
        owner: |m| &m.prescribed_by,
        fixed: |m| MedicationView {
            stopped: None,
            entered_in_error: None,
            amended: None,
            ..m.clone()
        },
        owner_only_edit: |old, new| marker_edit(
            (&old.entered_in_error, &old.amended),
            (&new.entered_in_error, &new.amended),
            CorrectableList::Medications,
        ),
        entry_limits: |m| {
            marked_by_owner(
                &m.entered_in_error,
                &m.amended,
                &m.prescribed_by,
                CorrectableList::Medications,
            )
        },
    }
);
listed!(
    EncounterView,
    "encounters",
    encounters,
    parse_encounter,
    ListCheck {
        field: "encounters",
        owner_field: "encounters.institution",
        append_only: true,
        owner: |e| &e.institution,
        fixed: |e| EncounterView {
            note: String::new(),
            note_conflicts: Vec::new(),
            entered_in_error: None,
            amended: None,
            ..e.clone()
        },
        owner_only_edit: |old, new| {
            if (&old.note, &old.note_conflicts) != (&new.note, &new.note_conflicts) {
                Some("encounters.note")
            } else {
                marker_edit(
                    (&old.entered_in_error, &old.amended),
                    (&new.entered_in_error, &new.amended),
                    CorrectableList::Encounters,
                )
            }
        },
        entry_limits: |e| {
            check_text(&e.note, "encounters.note", NOTE_BYTES_MAX, false)?;
            marked_by_owner(
                &e.entered_in_error,
                &e.amended,
                &e.institution,
                CorrectableList::Encounters,
            )
        },
    }
);
listed!(
    ExamResultView,
    "exams",
    exams,
    parse_exam,
    ListCheck {
        field: "exams",
        owner_field: "exams.institution",
        append_only: true,
        owner: |e| &e.institution,
        fixed: |e| ExamResultView {
            entered_in_error: None,
            amended: None,
            ..e.clone()
        },
        owner_only_edit: |old, new| marker_edit(
            (&old.entered_in_error, &old.amended),
            (&new.entered_in_error, &new.amended),
            CorrectableList::Exams,
        ),
        entry_limits: |e| marked_by_owner(
            &e.entered_in_error,
            &e.amended,
            &e.institution,
            CorrectableList::Exams
        ),
    }
);
listed!(
    FollowUpView,
    "follow_ups",
    follow_ups,
    parse_follow_up,
    ListCheck {
        field: "follow_ups",
        owner_field: "follow_ups.institution",
        append_only: true,
        owner: |f| &f.institution,
        fixed: |f| FollowUpView {
            entered_in_error: None,
            amended: None,
            ..f.clone()
        },
        owner_only_edit: |old, new| marker_edit(
            (&old.entered_in_error, &old.amended),
            (&new.entered_in_error, &new.amended),
            CorrectableList::FollowUps,
        ),
        entry_limits: |f| {
            marked_by_owner(
                &f.entered_in_error,
                &f.amended,
                &f.institution,
                CorrectableList::FollowUps,
            )
        },
    }
);

/// The rules one clinical list follows across a change.
pub(crate) struct ListCheck<T> {
    field: &'static str,
    /// Schema path of the field naming the institution an entry is recorded for.
    owner_field: &'static str,
    /// Whether entries may never be removed.
    append_only: bool,
    owner: fn(&T) -> &InstitutionId,
    /// The entry with the fields that may change blanked out.
    fixed: fn(&T) -> T,
    /// The schema path of what an edit from `old` to `new` changes, if it is an edit only the
    /// entry's own institution may make.
    owner_only_edit: fn(&T, &T) -> Option<&'static str>,
    /// Bounds on an entry that merges can grow (a note), and who its marker names, checked on
    /// new and edited entries.
    entry_limits: fn(&T) -> Result<(), ValidationError>,
}

impl<T: Listed> ListCheck<T> {
    /// Linear in the list sizes. Walks both lists in document order, so the first error found,
    /// and so the error reported, is the same on every replica.
    ///
    /// `before` and `after` may leave out entries the change did not touch (kept, unchanged):
    /// those break no rule, so the answer is the same as for the whole lists. `counts` are the
    /// whole lists' lengths.
    pub(crate) fn check<E: std::borrow::Borrow<T>>(
        &self,
        before: &[E],
        after: &[E],
        counts: (usize, usize),
        author: &InstitutionId,
    ) -> Result<(), ValidationError> {
        let field = self.field;
        // Concurrent appends may merge past the bound; a change may not add past it.
        let (count_before, count_after) = counts;
        if count_after > ENTRIES_PER_LIST_MAX && count_after > count_before {
            return Err(ValidationError::TooMany {
                field,
                count: count_after,
                max: ENTRIES_PER_LIST_MAX,
            });
        }
        let kept: HashMap<&EntryId, &T> = after
            .iter()
            .map(|e| (e.borrow().entry(), e.borrow()))
            .collect();
        for old in before.iter().map(E::borrow) {
            match kept.get(old.entry()) {
                None if self.append_only => return Err(ValidationError::EntryRemoved { field }),
                None => {}
                Some(new) if (self.fixed)(new) != (self.fixed)(old) => {
                    return Err(ValidationError::ImmutableChanged { field });
                }
                Some(new) => {
                    if let Some(edited) = (self.owner_only_edit)(old, new) {
                        if (self.owner)(new) != author {
                            return Err(ValidationError::Provenance { field: edited });
                        }
                        (self.entry_limits)(new)?;
                    }
                }
            }
        }
        let seen: HashSet<&EntryId> = before.iter().map(|e| e.borrow().entry()).collect();
        for new in after
            .iter()
            .map(E::borrow)
            .filter(|e| !seen.contains(e.entry()))
        {
            self.check_new(new, author)?;
        }
        Ok(())
    }

    /// The rules an entry a change adds is held to: it is recorded in its author's own name,
    /// and within an entry's bounds.
    fn check_new(&self, new: &T, author: &InstitutionId) -> Result<(), ValidationError> {
        if (self.owner)(new) != author {
            return Err(ValidationError::Provenance {
                field: self.owner_field,
            });
        }
        (self.entry_limits)(new)
    }
}

// ---- Judging one change from what it touched -------------------------------------------------

/// The root keys a change to a file is judged by: the sections, the lists and the contract.
pub(crate) const PARTS: [&str; 8] = [
    CONTAINERS[0],
    ROOT_REGISTER,
    CONTAINERS[1],
    CONTAINERS[2],
    CONTAINERS[3],
    CONTAINERS[4],
    CONTAINERS[5],
    CONTAINERS[6],
];
/// The one root field a change may write at the root, after the file's creation.
pub(crate) const ROOT_REGISTER: &str = "contract";

/// One touched list across a change: the entries the change added, removed or wrote into,
/// before and after it, in document order, and the lengths of the whole lists; and, after
/// it, the ids of the whole list and of the entries parsed.
struct ListSides<T> {
    before: Vec<T>,
    after: Vec<T>,
    counts: (usize, usize),
    ids_after: Vec<ObjId>,
    parsed_ids: Vec<ObjId>,
}

/// A touched list read after the change: its entry ids before and after it, and the entries
/// that are new or that the change wrote into, parsed after it, in document order.
struct AfterSide<T> {
    /// An error here is reported after every part has been read after the change.
    ids_before: Result<Vec<ObjId>, ValidationError>,
    ids_after: Vec<ObjId>,
    parsed: Vec<T>,
    parsed_ids: Vec<ObjId>,
    /// The change only inserted entries: it removed none.
    only_inserted: bool,
}

/// Reads a touched list after the change: its entry ids, and the entries that are new or that
/// the change wrote into. Errors here are those `parse_health_file(after)` meets in this list.
///
/// A change that only inserted objects into the list (`inserted`, see
/// `DirectWrites::only_inserted`) leaves every earlier entry in place: the list before it is
/// the list after it without them, so the earlier state's list is not read.
fn after_side<T: Listed, B: ReadDoc, A: ReadDoc>(
    before: &B,
    after: &A,
    touched: &BTreeSet<ObjId>,
    inserted: Option<&BTreeSet<ObjId>>,
) -> Result<AfterSide<T>, ValidationError> {
    let root = Obj::root(after);
    let ids_after = root.entries(T::KEY, T::KEY, None)?;
    let ids_before = match inserted {
        Some(inserted) => Ok(ids_after
            .iter()
            .filter(|id| !inserted.contains(id))
            .cloned()
            .collect()),
        None => Obj::root(before).entries(T::KEY, T::KEY, None),
    };
    let known = match (inserted, &ids_before) {
        (Some(inserted), _) => Known::AllBut(inserted),
        (None, Ok(ids)) => Known::These(ids.iter().collect()),
        (None, Err(_)) => Known::Unreadable,
    };
    let mut parsed = Vec::new();
    let mut parsed_ids = Vec::new();
    for id in &ids_after {
        let needed = touched.contains(id) || !known.held(id);
        if needed {
            parsed.push(T::parse(&root.child(id.clone(), T::KEY))?);
            parsed_ids.push(id.clone());
        }
    }
    Ok(AfterSide {
        ids_before,
        ids_after,
        parsed,
        parsed_ids,
        only_inserted: inserted.is_some(),
    })
}

/// Which entries of a list were there before a change.
enum Known<'a> {
    /// Every entry but those the change inserted.
    AllBut(&'a BTreeSet<ObjId>),
    /// These.
    These(HashSet<&'a ObjId>),
    /// Unknown (an unreadable earlier state): none counts as held, so every entry is read,
    /// as a whole read would.
    Unreadable,
}

impl Known<'_> {
    fn held(&self, id: &ObjId) -> bool {
        match self {
            Known::AllBut(inserted) => !inserted.contains(id),
            Known::These(ids) => ids.contains(id),
            Known::Unreadable => false,
        }
    }
}

/// Completes a touched list with the entries the change removed or wrote into, read before it.
fn before_side<T: Listed, B: ReadDoc>(
    before: &B,
    touched: &BTreeSet<ObjId>,
    AfterSide {
        ids_before,
        ids_after,
        parsed: after,
        parsed_ids,
        only_inserted,
    }: AfterSide<T>,
) -> Result<ListSides<T>, ValidationError> {
    let ids_before = ids_before?;
    let kept: Option<HashSet<&ObjId>> = (!only_inserted).then(|| ids_after.iter().collect());
    let root = Obj::root(before);
    let before_entries = ids_before
        .iter()
        .filter(|id| touched.contains(id) || kept.as_ref().is_some_and(|kept| !kept.contains(id)))
        .map(|id| T::parse(&root.child(id.clone(), T::KEY)))
        .collect::<Result<_, _>>()?;
    Ok(ListSides {
        before: before_entries,
        after,
        counts: (ids_before.len(), ids_after.len()),
        ids_after,
        parsed_ids,
    })
}

/// A touched list as a change left it: the ids of all its entries, and the entries it added or
/// wrote into, parsed, each with its id, in document order.
struct ListAfter<T> {
    ids: Vec<ObjId>,
    parsed: Vec<(ObjId, T)>,
}

impl<T> From<ListSides<T>> for ListAfter<T> {
    fn from(sides: ListSides<T>) -> Self {
        Self {
            ids: sides.ids_after,
            parsed: sides.parsed_ids.into_iter().zip(sides.after).collect(),
        }
    }
}

/// What judging a change by its parts read after it: with the view at the change's
/// dependencies, enough to make the view at the change without reading again
/// ([`view_after`]).
pub(crate) struct AfterParts {
    demographics: Option<DemographicsView>,
    contract: Option<Option<Register<FamilyDoctorContract>>>,
    allergies: Option<ListAfter<AllergyView>>,
    problems: Option<ListAfter<ProblemView>>,
    medications: Option<ListAfter<MedicationView>>,
    encounters: Option<ListAfter<EncounterView>>,
    exams: Option<ListAfter<ExamResultView>>,
    follow_ups: Option<ListAfter<FollowUpView>>,
}

/// Judges a change to a file from the parts it touched, in the order `validate_change` reads
/// the whole file (every part after the change, then every part before it, then the lists'
/// rules), so that the first error found is the one a whole read finds first. Returns what it
/// read after the change.
pub(crate) fn judge_touched<B: ReadDoc, A: ReadDoc>(
    before: &B,
    after: &A,
    touch: &Touch,
    author: &InstitutionId,
) -> Result<AfterParts, ValidationError> {
    let touched = |key: &str| touch.under.get(key);
    let root = Obj::root(after);
    let demographics = touched("demographics")
        .map(|_| read_demographics(&root))
        .transpose()?;
    let contract = touched(ROOT_REGISTER)
        .map(|_| read_contract(&root))
        .transpose()?;
    fn after_of<T: Listed, B: ReadDoc, A: ReadDoc>(
        before: &B,
        after: &A,
        touch: &Touch,
    ) -> Result<Option<AfterSide<T>>, ValidationError> {
        let Some(entries) = touch.under.get(T::KEY) else {
            return Ok(None);
        };
        // Nothing written into the list itself: it holds what it held.
        let inserted = match touch.direct.get(T::KEY) {
            Some(direct) => direct.only_inserted(),
            None => Some(&NONE_INSERTED),
        };
        after_side::<T, _, _>(before, after, entries, inserted).map(Some)
    }
    static NONE_INSERTED: BTreeSet<ObjId> = BTreeSet::new();
    let allergies = after_of::<AllergyView, _, _>(before, after, touch)?;
    let problems = after_of::<ProblemView, _, _>(before, after, touch)?;
    let medications = after_of::<MedicationView, _, _>(before, after, touch)?;
    let encounters = after_of::<EncounterView, _, _>(before, after, touch)?;
    let exams = after_of::<ExamResultView, _, _>(before, after, touch)?;
    let follow_ups = after_of::<FollowUpView, _, _>(before, after, touch)?;

    let root = Obj::root(before);
    if touched("demographics").is_some() {
        read_demographics(&root)?;
    }
    if touched(ROOT_REGISTER).is_some() {
        read_contract(&root)?;
    }
    fn before_of<T: Listed, B: ReadDoc>(
        before: &B,
        touched: Option<&BTreeSet<ObjId>>,
        after: Option<AfterSide<T>>,
    ) -> Result<Option<ListSides<T>>, ValidationError> {
        after
            .map(|after| before_side(before, touched.unwrap_or(&BTreeSet::new()), after))
            .transpose()
    }
    let allergies = before_of(before, touched(AllergyView::KEY), allergies)?;
    let problems = before_of(before, touched(ProblemView::KEY), problems)?;
    let medications = before_of(before, touched(MedicationView::KEY), medications)?;
    let encounters = before_of(before, touched(EncounterView::KEY), encounters)?;
    let exams = before_of(before, touched(ExamResultView::KEY), exams)?;
    let follow_ups = before_of(before, touched(FollowUpView::KEY), follow_ups)?;

    fn rules<T: Listed>(
        sides: Option<ListSides<T>>,
        author: &InstitutionId,
    ) -> Result<Option<ListAfter<T>>, ValidationError> {
        let Some(sides) = sides else {
            return Ok(None);
        };
        T::RULES.check(&sides.before, &sides.after, sides.counts, author)?;
        Ok(Some(sides.into()))
    }
    Ok(AfterParts {
        demographics,
        contract,
        allergies: rules(allergies, author)?,
        problems: rules(problems, author)?,
        medications: rules(medications, author)?,
        encounters: rules(encounters, author)?,
        exams: rules(exams, author)?,
        follow_ups: rules(follow_ups, author)?,
    })
}

/// What the changes of a history wrote into a file after its creation, when they only
/// appended entries and wrote the contract (see `judge::judge_appends`).
#[derive(Default)]
pub(crate) struct Appended {
    /// The entries appended, by list (root key), each with the index of the change that
    /// inserted it, the only change that wrote into it.
    pub entries: BTreeMap<String, HashMap<ObjId, usize>>,
    /// Whether a change wrote the contract (one change at most).
    pub contract: bool,
}

/// The view of a file whose history after its creation only appended entries to its lists
/// and wrote its contract (`appended`), given `created`, the view at its creation, where
/// `authors[i]` is the institution of change `i`. Each appended entry, and the contract, is
/// read once, in `doc` as it is now: no change after its own wrote into it, so it reads as it
/// did at that change. What `written` holds (what each change wrote into the objects it made,
/// from its operations, with every change of `doc` read) is read from there. An entry is held to the rules `judge_touched` holds an appended entry
/// to (`ListCheck::check_new`), and its list to the bound on entries (the whole list now is
/// the longest it has been: lists only grew); the contract, as there, only has to read.
///
/// `None` if an entry breaks a rule or does not read, a list is longer than
/// `ENTRIES_PER_LIST_MAX` or is not its entries at the creation with the appended ones, or the
/// contract does not read: the history is then judged change by change, which names
/// the change refused and why.
pub(crate) fn view_with_appended<D: ReadDoc>(
    doc: &D,
    written: &Written,
    created: HealthFileView,
    appended: &Appended,
    authors: &[InstitutionId],
) -> Option<HealthFileView> {
    fn list<T: Listed, D: ReadDoc>(
        root: &Obj<'_, D>,
        view: &mut HealthFileView,
        appended: &Appended,
        authors: &[InstitutionId],
    ) -> Option<()> {
        let Some(new) = appended.entries.get(T::KEY) else {
            return Some(());
        };
        let ids = root.entries(T::KEY, T::KEY, None).ok()?;
        let old = std::mem::take(T::list_mut(view));
        if ids.len() > ENTRIES_PER_LIST_MAX || ids.len() != old.len() + new.len() {
            return None;
        }
        // Entries only went in, so the entries at the creation keep their order: one walk.
        let mut old = old.into_iter();
        let mut list = Vec::with_capacity(ids.len());
        let mut read = 0;
        for id in &ids {
            let entry = match new.get(id) {
                Some(&change) => {
                    let entry = T::parse(&root.child(id.clone(), T::KEY)).ok()?;
                    T::RULES.check_new(&entry, authors.get(change)?).ok()?;
                    read += 1;
                    Arc::new(entry)
                }
                None => old.next().filter(|e| is_entry_of(e.entry(), id))?,
            };
            list.push(entry);
        }
        (read == new.len() && old.next().is_none()).then(|| *T::list_mut(view) = list)
    }
    // Every list appended to is one of those below.
    if !appended
        .entries
        .keys()
        .all(|key| LISTS.contains(&key.as_str()))
    {
        return None;
    }
    let root = Obj::root_written(doc, written);
    let mut view = created;
    if appended.contract {
        view.contract = read_contract(&root).ok()?;
    }
    list::<AllergyView, _>(&root, &mut view, appended, authors)?;
    list::<ProblemView, _>(&root, &mut view, appended, authors)?;
    list::<MedicationView, _>(&root, &mut view, appended, authors)?;
    list::<EncounterView, _>(&root, &mut view, appended, authors)?;
    list::<ExamResultView, _>(&root, &mut view, appended, authors)?;
    list::<FollowUpView, _>(&root, &mut view, appended, authors)?;
    Some(view)
}

/// A list rebuilt in the order of `ids` (document order) from `old`, the list before in
/// document order: `pick` gets each id with its old entry, if it had one, and gives its entry
/// now. Both lists differ only where a change wrote, so they are walked side by side: an id
/// not next in the old list is new, or the old entries before it were removed; only then is
/// the old list searched.
fn relist<T: Listed, E>(
    old: Vec<Arc<T>>,
    ids: &[ObjId],
    mut pick: impl FnMut(&ObjId, Option<Arc<T>>) -> Result<Arc<T>, E>,
) -> Result<Vec<Arc<T>>, E> {
    let mut old = old.into_iter();
    let mut list = Vec::with_capacity(ids.len());
    for id in ids {
        let next_is_it = old
            .as_slice()
            .first()
            .is_some_and(|e| is_entry_of(e.entry(), id));
        let kept = if next_is_it {
            old.next()
        } else if old.as_slice().iter().any(|e| is_entry_of(e.entry(), id)) {
            // The entries before it are gone.
            old.by_ref().find(|e| is_entry_of(e.entry(), id))
        } else {
            None
        };
        list.push(pick(id, kept)?);
    }
    Ok(list)
}

/// The view at a change from `previous`, the view at exactly the change's dependencies, and
/// what judging the change read after it: nothing is read again. `None` if the two do not fit
/// together (an entry kept by the change that `previous` lacks).
pub(crate) fn view_after(
    parts: AfterParts,
    mut previous: HealthFileView,
) -> Option<HealthFileView> {
    if let Some(demographics) = parts.demographics {
        previous.demographics = demographics;
    }
    if let Some(contract) = parts.contract {
        previous.contract = contract;
    }
    fn update<T: Listed>(view: &mut HealthFileView, list: Option<ListAfter<T>>) -> Option<()> {
        let Some(ListAfter { ids, parsed }) = list else {
            return Some(());
        };
        let mut parsed = parsed.into_iter().peekable();
        let old = std::mem::take(T::list_mut(view));
        let list = relist(old, &ids, |id, kept| {
            match parsed.next_if(|(parsed, _)| parsed == id) {
                Some((_, entry)) => Ok(Arc::new(entry)),
                None => kept.ok_or(()),
            }
        })
        .ok()?;
        parsed.next().is_none().then(|| *T::list_mut(view) = list)
    }
    update(&mut previous, parts.allergies)?;
    update(&mut previous, parts.problems)?;
    update(&mut previous, parts.medications)?;
    update(&mut previous, parts.encounters)?;
    update(&mut previous, parts.exams)?;
    update(&mut previous, parts.follow_ups)?;
    Some(previous)
}

/// `previous` brought up to date with the parts a change touched, read from `doc` now.
pub(crate) fn update_view<D: ReadDoc>(
    doc: &D,
    touch: &Touch,
    mut previous: HealthFileView,
) -> Result<HealthFileView, ValidationError> {
    let root = Obj::root(doc);
    let touched = |key: &str| touch.under.get(key);
    if touched("demographics").is_some() {
        previous.demographics = read_demographics(&root)?;
    }
    if touched(ROOT_REGISTER).is_some() {
        previous.contract = read_contract(&root)?;
    }
    fn update<T: Listed, D: ReadDoc>(
        root: &Obj<'_, D>,
        view: &mut HealthFileView,
        touched: Option<&BTreeSet<ObjId>>,
    ) -> Result<(), ValidationError> {
        let Some(touched) = touched else {
            return Ok(());
        };
        let ids = root.entries(T::KEY, T::KEY, None)?;
        let old = std::mem::take(T::list_mut(view));
        *T::list_mut(view) = relist(old, &ids, |id, kept| match kept {
            Some(entry) if !touched.contains(id) => Ok(entry),
            _ => T::parse(&root.child(id.clone(), T::KEY)).map(Arc::new),
        })?;
        Ok(())
    }
    update::<AllergyView, _>(&root, &mut previous, touched(AllergyView::KEY))?;
    update::<ProblemView, _>(&root, &mut previous, touched(ProblemView::KEY))?;
    update::<MedicationView, _>(&root, &mut previous, touched(MedicationView::KEY))?;
    update::<EncounterView, _>(&root, &mut previous, touched(EncounterView::KEY))?;
    update::<ExamResultView, _>(&root, &mut previous, touched(ExamResultView::KEY))?;
    update::<FollowUpView, _>(&root, &mut previous, touched(FollowUpView::KEY))?;
    Ok(previous)
}

//! Property tests of the merge rules and invariants: convergence, no loss, the referral state
//! machine under concurrency, validation determinism and save/load round trips.
//!
//! Replicas apply random operations and exchange their changes in random orders, with
//! duplicates. Each replica belongs to one institution, as each node does.

mod common;

use std::collections::BTreeSet;

use automerge::AutoCommit;
use automerge::transaction::Transactable;
use common::*;
use estuary_crdt_model::*;
use proptest::prelude::*;

const INSTITUTIONS: [&str; 3] = ["chc-jianshe", "xinhua", "dh-chongming-2"];
const SUBSTANCES: [&str; 3] = ["penicillin", "Penicillin", "iodine contrast"];
/// Diagnosis codes: WHO, and the national editions (one written like a WHO code's text
/// extended, one sharing its text across the two editions).
const CODES: [(Icd10System, &str); 5] = [
    (Icd10System::Who, "I10"),
    (Icd10System::Who, "E11.9"),
    (Icd10System::CnClinical, "I10.x00x002"),
    (Icd10System::CnClinical, "E11.900"),
    (Icd10System::CnInsurance, "E11.900"),
];

fn code(c: usize) -> Icd10 {
    let (system, code) = CODES[c];
    Icd10::in_system(system, code).expect("test codes are valid")
}

/// A step of a random history: an edit on one replica, or one replica receiving another's
/// changes in a shuffled order, possibly twice.
#[derive(Clone, Debug)]
enum Step<A> {
    Edit {
        replica: usize,
        action: A,
    },
    Sync {
        from: usize,
        to: usize,
        order: u64,
        duplicate: bool,
    },
}

fn steps<A: std::fmt::Debug + Clone>(
    replicas: usize,
    action: impl Strategy<Value = A> + Clone,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Step<A>>> {
    let edit = (0..replicas, action).prop_map(|(replica, action)| Step::Edit { replica, action });
    let sync = (0..replicas, 0..replicas, any::<u64>(), any::<bool>()).prop_map(
        |(from, to, order, duplicate)| Step::Sync {
            from,
            to,
            order,
            duplicate,
        },
    );
    prop::collection::vec(prop_oneof![3 => edit, 1 => sync], len)
}

/// Shuffles `items` deterministically from `seed` (Fisher-Yates over a xorshift stream).
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed | 1;
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

/// The changes `from` holds, shuffled, optionally with every change twice.
fn shipment(from: &AutoCommit, order: u64, duplicate: bool) -> Vec<automerge::Change> {
    let mut changes = from.clone().get_changes(&[]);
    if duplicate {
        changes.extend(changes.clone());
    }
    shuffle(&mut changes, order);
    changes
}

// ---- Health files -------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum FileAction {
    Phone(u8),
    Contract(u8),
    AddAllergy(usize, Severity),
    RemoveAllergy(usize),
    VerifyAllergy(usize, AllergyVerification),
    NoKnownAllergies,
    MarkInError(CorrectableList, usize),
    Amend(CorrectableList, usize, u8),
    AddProblem(usize),
    SetProblemStatus(usize, bool),
    RemoveProblem(usize),
    AddMedication(u64),
    StopMedication(usize),
    AddEncounter(usize),
    EditNote(usize, String),
    AddExam(u8),
    AddFollowUp(u8),
    /// Linked to one of a few other files of the same resident.
    Link(u8),
    Unlink,
}

/// The other files a file in these tests may be linked to.
fn other_file(n: u8) -> DocumentId {
    DocumentId::from_bytes([n % 3 + 1; 16])
}

fn file_action() -> impl Strategy<Value = FileAction> + Clone {
    let list = || {
        prop::sample::select(vec![
            CorrectableList::Medications,
            CorrectableList::Encounters,
            CorrectableList::Exams,
            CorrectableList::FollowUps,
        ])
    };
    prop_oneof![
        6 => appending_action(),
        1 => any::<u8>().prop_map(FileAction::Phone),
        1 => any::<u8>().prop_map(FileAction::Contract),
        1 => (0..SUBSTANCES.len()).prop_map(FileAction::RemoveAllergy),
        1 => (
            0..4usize,
            prop::sample::select(AllergyVerification::ALL.to_vec())
        )
            .prop_map(|(i, v)| FileAction::VerifyAllergy(i, v)),
        1 => Just(FileAction::NoKnownAllergies),
        1 => (list(), 0..4usize).prop_map(|(list, i)| FileAction::MarkInError(list, i)),
        1 => (list(), 0..4usize, any::<u8>())
            .prop_map(|(list, i, n)| FileAction::Amend(list, i, n)),
        1 => (0..4usize, any::<bool>()).prop_map(|(i, a)| FileAction::SetProblemStatus(i, a)),
        1 => (0..CODES.len()).prop_map(FileAction::RemoveProblem),
        1 => (0..4usize).prop_map(FileAction::StopMedication),
        1 => (0..4usize, "[a-z ]{0,12}").prop_map(|(i, t)| FileAction::EditNote(i, t)),
        1 => any::<u8>().prop_map(FileAction::Link),
        1 => Just(FileAction::Unlink),
    ]
}

/// The actions that append an entry to one of a file's lists.
fn appending_action() -> impl Strategy<Value = FileAction> + Clone {
    prop_oneof![
        (
            0..SUBSTANCES.len(),
            prop::sample::select(Severity::ALL.to_vec())
        )
            .prop_map(|(s, v)| FileAction::AddAllergy(s, v)),
        (0..CODES.len()).prop_map(FileAction::AddProblem),
        (1..=limits::PRESCRIPTION_DAYS_MAX).prop_map(FileAction::AddMedication),
        (0..CODES.len()).prop_map(FileAction::AddEncounter),
        any::<u8>().prop_map(FileAction::AddExam),
        (90u8..200).prop_map(FileAction::AddFollowUp),
    ]
}

/// Turns an action into an operation against what `view` holds (None when it names an entry
/// the replica does not have).
fn file_op(action: &FileAction, view: &HealthFileView) -> Option<HealthFileOp> {
    Some(match action {
        FileAction::Phone(n) => {
            HealthFileOp::SetDemographic(DemographicField::Phone(format!("+86 139{n:08}")))
        }
        FileAction::Contract(n) => HealthFileOp::SetContract(FamilyDoctorContract {
            doctor_id: format!("doc-{n}"),
            ..contract()
        }),
        FileAction::AddAllergy(s, severity) => HealthFileOp::AddAllergy(NewAllergy {
            substance: SUBSTANCES[*s].into(),
            reaction: "rash".into(),
            severity: *severity,
        }),
        FileAction::RemoveAllergy(s) => HealthFileOp::RemoveAllergy {
            substance: SUBSTANCES[*s].into(),
        },
        FileAction::VerifyAllergy(i, status) => HealthFileOp::SetAllergyVerification {
            entry: view.allergies.get(*i)?.entry.clone(),
            status: *status,
        },
        // Refused while an allergy stands (tested in health_file.rs).
        FileAction::NoKnownAllergies => {
            if view.allergies.iter().any(|a| a.stands()) {
                return None;
            }
            HealthFileOp::RecordNoKnownAllergies
        }
        // Refused unless the replica's institution wrote the record (a Provenance error).
        FileAction::MarkInError(list, i) => HealthFileOp::MarkEnteredInError {
            list: *list,
            entry: match list {
                CorrectableList::Medications => view.medications.get(*i)?.entry.clone(),
                CorrectableList::Encounters => view.encounters.get(*i)?.entry.clone(),
                CorrectableList::Exams => view.exams.get(*i)?.entry.clone(),
                CorrectableList::FollowUps => view.follow_ups.get(*i)?.entry.clone(),
            },
            reason: "entered in error".into(),
        },
        // Refused unless the replica's institution wrote the record (a Provenance error).
        FileAction::Amend(list, i, n) => {
            let (entry, append) = match list {
                CorrectableList::Medications => (
                    view.medications.get(*i)?.entry.clone(),
                    FileAction::AddMedication(u64::from(*n % 60) + 1),
                ),
                CorrectableList::Encounters => (
                    view.encounters.get(*i)?.entry.clone(),
                    FileAction::AddEncounter(usize::from(*n) % CODES.len()),
                ),
                CorrectableList::Exams => {
                    (view.exams.get(*i)?.entry.clone(), FileAction::AddExam(*n))
                }
                CorrectableList::FollowUps => (
                    view.follow_ups.get(*i)?.entry.clone(),
                    FileAction::AddFollowUp(90 + *n % 100),
                ),
            };
            let with = match file_op(&append, view)? {
                HealthFileOp::AddMedication(m) => Amendment::Medication(m),
                HealthFileOp::AddEncounter(e) => Amendment::Encounter(e),
                HealthFileOp::AddExamResult(r) => Amendment::ExamResult(r),
                HealthFileOp::AddFollowUp(f) => Amendment::FollowUp(f),
                _ => return None,
            };
            HealthFileOp::Amend {
                entry,
                reason: "re-measured".into(),
                with,
            }
        }
        FileAction::AddProblem(c) => HealthFileOp::AddProblem(NewProblem {
            icd10: code(*c),
            display: "problem".into(),
            onset: None,
            status: ProblemStatus::Active,
        }),
        FileAction::SetProblemStatus(i, active) => HealthFileOp::SetProblemStatus {
            entry: view.problems.get(*i)?.entry.clone(),
            status: if *active {
                ProblemStatus::Active
            } else {
                ProblemStatus::Resolved
            },
        },
        FileAction::RemoveProblem(c) => HealthFileOp::RemoveProblem { icd10: code(*c) },
        FileAction::AddMedication(days) => HealthFileOp::AddMedication(NewMedication {
            drug: "amlodipine".into(),
            dose: "5 mg".into(),
            frequency: "once daily".into(),
            start: date("2026-03-01"),
            days: *days,
        }),
        FileAction::StopMedication(i) => HealthFileOp::StopMedication {
            entry: view.medications.get(*i)?.entry.clone(),
            on: date("2026-04-01"),
        },
        FileAction::AddEncounter(c) => HealthFileOp::AddEncounter(NewEncounter {
            time: Timestamp(1_700_000_000_000),
            kind: EncounterKind::Outpatient,
            diagnoses: vec![Diagnosis {
                icd10: code(*c),
                display: "dx".into(),
            }],
            note: "seen".into(),
        }),
        FileAction::EditNote(i, text) => HealthFileOp::EditEncounterNote {
            entry: view.encounters.get(*i)?.entry.clone(),
            note: text.clone(),
        },
        FileAction::AddExam(n) => HealthFileOp::AddExamResult(NewExamResult {
            kind: ExamKind::Lab,
            time: Timestamp(i64::from(*n)),
            name: "creatinine".into(),
            measurements: vec![Measurement {
                name: "creatinine".into(),
                value: f64::from(*n),
                unit: None,
            }],
            report: None,
        }),
        FileAction::AddFollowUp(systolic) => HealthFileOp::AddFollowUp(NewFollowUp {
            time: Timestamp(1),
            systolic_mmhg: Some(u64::from(*systolic)),
            diastolic_mmhg: Some(80),
            glucose_mmol_per_l: None,
        }),
        FileAction::Link(n) => HealthFileOp::Link {
            to: other_file(*n),
            reason: "same national id".into(),
        },
        // Refused while the file is not linked (tested in linked.rs).
        FileAction::Unlink => {
            view.link.as_ref()?.value.to?;
            HealthFileOp::Unlink {
                reason: "two residents".into(),
            }
        }
    })
}

/// Entry ids of every clinical list, for the no-loss check.
#[derive(Default, Debug, PartialEq)]
struct Entries {
    allergies: BTreeSet<EntryId>,
    problems: BTreeSet<EntryId>,
    medications: BTreeSet<EntryId>,
    encounters: BTreeSet<EntryId>,
    exams: BTreeSet<EntryId>,
    follow_ups: BTreeSet<EntryId>,
}

fn entries(view: &HealthFileView) -> Entries {
    Entries {
        allergies: view.allergies.iter().map(|e| e.entry.clone()).collect(),
        problems: view.problems.iter().map(|e| e.entry.clone()).collect(),
        medications: view.medications.iter().map(|e| e.entry.clone()).collect(),
        encounters: view.encounters.iter().map(|e| e.entry.clone()).collect(),
        exams: view.exams.iter().map(|e| e.entry.clone()).collect(),
        follow_ups: view.follow_ups.iter().map(|e| e.entry.clone()).collect(),
    }
}

fn file_replicas(count: usize) -> Vec<HealthFile> {
    let mut origin = new_file(100);
    let saved = origin.save();
    (0..count)
        .map(|i| HealthFile::load(&saved, &actor(i as u8 + 1)).unwrap())
        .collect()
}

fn replica_editor(replica: usize) -> Editor {
    editor(
        INSTITUTIONS[replica % INSTITUTIONS.len()],
        10_000 + replica as i64,
    )
}

/// Every replica receives every other replica's changes, shuffled, then all must agree.
fn sync_all<T>(
    replicas: &mut [T],
    raw: impl Fn(&T) -> &AutoCommit,
    apply: impl Fn(&mut T, Vec<automerge::Change>),
    seed: u64,
) {
    for to in 0..replicas.len() {
        for from in 0..replicas.len() {
            if from != to {
                let changes = shipment(
                    raw(&replicas[from]),
                    seed ^ (from * 31 + to) as u64,
                    to % 2 == 0,
                );
                apply(&mut replicas[to], changes);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// 3-5 replicas, random concurrent operations, random exchange orders with duplicates:
    /// all end with identical heads and views; every entry added anywhere is present unless
    /// a replica that had seen it removed it; every honest change passes `validate_change`.
    #[test]
    fn health_files_converge_without_loss(
        count in 3usize..=5,
        history in steps(5, file_action(), 1..40),
        seed in any::<u64>(),
    ) {
        let mut replicas = file_replicas(count);
        let mut added = Entries::default();
        let mut removed: BTreeSet<EntryId> = BTreeSet::new();
        for step in history {
            match step {
                Step::Edit { replica, action } => {
                    let replica = replica % count;
                    let file = &mut replicas[replica];
                    let before_view = file.view();
                    let Some(op) = file_op(&action, &before_view) else { continue };
                    let before = file.automerge().clone();
                    let heads = file.heads();
                    let who = replica_editor(replica);
                    match file.apply(&who, &op) {
                        Ok(()) => {
                            let after = file.automerge().clone();
                            prop_assert_eq!(validate_change(&before, &after, &who.institution), Ok(DocumentKind::HealthFile));
                            let (old, new) = (entries(&before_view), entries(&file.view()));
                            added.allergies.extend(new.allergies.difference(&old.allergies).cloned());
                            added.problems.extend(new.problems.difference(&old.problems).cloned());
                            added.medications.extend(new.medications.difference(&old.medications).cloned());
                            added.encounters.extend(new.encounters.difference(&old.encounters).cloned());
                            added.exams.extend(new.exams.difference(&old.exams).cloned());
                            added.follow_ups.extend(new.follow_ups.difference(&old.follow_ups).cloned());
                            removed.extend(old.allergies.difference(&new.allergies).cloned());
                            removed.extend(old.problems.difference(&new.problems).cloned());
                        }
                        Err(error) => {
                            // Only editing another institution's note is refused here.
                            prop_assert!(matches!(error, OpError::Invalid(ValidationError::Provenance { .. })), "{error}");
                            prop_assert_eq!(file.heads(), heads, "a refused operation wrote");
                        }
                    }
                }
                Step::Sync { from, to, order, duplicate } => {
                    let (from, to) = (from % count, to % count);
                    let changes = shipment(replicas[from].automerge(), order, duplicate);
                    replicas[to].apply_changes(changes).unwrap();
                }
            }
        }
        sync_all(&mut replicas, HealthFile::automerge, |r, c| r.apply_changes(c).unwrap(), seed);

        let heads = replicas[0].heads();
        let view = replicas[0].view();
        for replica in &mut replicas[1..] {
            prop_assert_eq!(replica.heads(), heads.clone());
            prop_assert_eq!(replica.view(), view.clone());
        }
        prop_assert!(validate(replicas[0].automerge()).is_ok());
        let merged = entries(&view);
        let expect = |all: &BTreeSet<EntryId>| all.difference(&removed).cloned().collect::<BTreeSet<_>>();
        prop_assert_eq!(&merged.allergies, &expect(&added.allergies));
        prop_assert_eq!(&merged.problems, &expect(&added.problems));
        prop_assert_eq!(&merged.medications, &added.medications);
        prop_assert_eq!(&merged.encounters, &added.encounters);
        prop_assert_eq!(&merged.exams, &added.exams);
        prop_assert_eq!(&merged.follow_ups, &added.follow_ups);
    }

    /// `save`/`load` and `save_incremental`/`load_incremental` preserve views and heads.
    #[test]
    fn save_and_load_round_trip(actions in prop::collection::vec(file_action(), 1..30), chunk in 1usize..6) {
        let mut file = new_file(1);
        let mut follower = HealthFile::load(&file.save(), &actor(2)).unwrap();
        let mut pending = Vec::new();
        for (index, action) in actions.iter().enumerate() {
            if let Some(op) = file_op(action, &file.view()) {
                let _ = file.apply(&replica_editor(0), &op);
            }
            pending.push(file.save_incremental());
            if index % chunk == 0 {
                for delta in pending.drain(..) {
                    follower.load_incremental(&delta).unwrap();
                }
            }
        }
        for delta in pending.drain(..) {
            follower.load_incremental(&delta).unwrap();
        }
        prop_assert_eq!(follower.view(), file.view());
        prop_assert_eq!(follower.heads(), file.heads());
        let mut loaded = HealthFile::load(&file.save(), &actor(3)).unwrap();
        prop_assert_eq!(loaded.view(), file.view());
        prop_assert_eq!(loaded.heads(), file.heads());
    }
}

// ---- Referrals ----------------------------------------------------------------------------

/// Replica roles: the sender's node, two nodes of the receiver (two desks), and a third
/// institution that may not touch the referral.
/// A run uses the first 3 to 5 of them.
const REFERRAL_NODES: [&str; 5] = [
    "chc-jianshe",
    "xinhua",
    "dh-chongming-2",
    "xinhua",
    "chc-jianshe",
];

fn referral_action() -> impl Strategy<Value = ReferralOp> + Clone {
    prop_oneof![
        Just(ReferralOp::Accept),
        Just(ReferralOp::Decline {
            reason: "no bed".into()
        }),
        (0i64..5, prop::option::of(1u64..=1_440)).prop_map(|(h, minutes)| {
            ReferralOp::Schedule {
                appointment: Timestamp(h * 3_600_000),
                minutes,
            }
        }),
        (0i64..5, prop::option::of(1u64..=1_440)).prop_map(|(h, minutes)| {
            ReferralOp::Reschedule {
                appointment: Timestamp(h * 3_600_000),
                minutes,
            }
        }),
        Just(ReferralOp::MarkNoShow),
        Just(ReferralOp::Redirect {
            to: InstitutionId::new("district-n").unwrap(),
            reason: "no bed".into(),
        }),
        Just(ReferralOp::MarkArrived),
        Just(ReferralOp::Complete),
        Just(ReferralOp::Cancel),
        "[a-z]{0,8}".prop_map(|handover| ReferralOp::EditHandover { handover }),
        "[a-z]{0,8}".prop_map(|summary| ReferralOp::WriteReturnSummary { summary }),
    ]
}

/// The derived status must be reached by a legal path of transitions, each made by the side
/// allowed to make it.
fn assert_legal_path(view: &ReferralView) -> Result<(), TestCaseError> {
    let mut status = ReferralStatus::Requested;
    for entry in &view.effective {
        let event = view
            .history
            .iter()
            .find(|e| &e.entry == entry)
            .expect("effective events are in history");
        prop_assert_eq!(event.from, status);
        prop_assert!(status.may_move_to(event.to), "{} -> {}", status, event.to);
        prop_assert_eq!(
            view.role_of(&event.institution),
            Some(event.to.authorised_role())
        );
        status = event.to;
    }
    prop_assert_eq!(status, view.status);
    for event in &view.history {
        prop_assert_eq!(
            view.role_of(&event.institution),
            Some(event.to.authorised_role())
        );
        prop_assert!(event.from.may_move_to(event.to));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Random concurrent transitions by random institutions, merged in any order: every
    /// replica derives the same status, by a legal path of authorised transitions; refused
    /// operations write nothing; honest changes pass `validate_change`.
    #[test]
    fn referral_state_machine_holds_under_concurrency(
        count in 3usize..=5,
        history in steps(REFERRAL_NODES.len(), referral_action(), 1..40),
        seed in any::<u64>(),
    ) {
        let mut origin = new_referral(100);
        let saved = origin.save();
        let mut replicas: Vec<Referral> =
            (0..count).map(|i| Referral::load(&saved, &actor(i as u8 + 1)).unwrap()).collect();
        for step in history {
            match step {
                Step::Edit { replica, action } => {
                    let replica = replica % count;
                    let who = editor(REFERRAL_NODES[replica], 20_000);
                    let referral = &mut replicas[replica];
                    let before = referral.automerge().clone();
                    let heads = referral.heads();
                    match referral.apply(&who, &action) {
                        Ok(()) => {
                            let after = referral.automerge().clone();
                            prop_assert_eq!(validate_change(&before, &after, &who.institution), Ok(DocumentKind::Referral));
                        }
                        Err(OpError::Invalid(
                            ValidationError::IllegalTransition { .. }
                            | ValidationError::NotAuthorised { .. }
                            | ValidationError::Provenance { .. },
                        )) => prop_assert_eq!(referral.heads(), heads),
                        Err(other) => prop_assert!(false, "unexpected error {}", other),
                    }
                    assert_legal_path(&referral.view())?;
                }
                Step::Sync { from, to, order, duplicate } => {
                    let (from, to) = (from % count, to % count);
                    let changes = shipment(replicas[from].automerge(), order, duplicate);
                    replicas[to].apply_changes(changes).unwrap();
                    assert_legal_path(&replicas[to].view())?;
                }
            }
        }
        sync_all(&mut replicas, Referral::automerge, |r, c| r.apply_changes(c).unwrap(), seed);
        let heads = replicas[0].heads();
        let view = replicas[0].view();
        for replica in &mut replicas[1..] {
            prop_assert_eq!(replica.heads(), heads.clone());
            prop_assert_eq!(replica.view(), view.clone());
        }
        assert_legal_path(&view)?;
        let mut loaded = Referral::load(&replicas[0].save(), &actor(9)).unwrap();
        prop_assert_eq!(loaded.view(), view);
        prop_assert_eq!(loaded.heads(), heads);
    }
}

// ---- Ingest determinism ------------------------------------------------------------------

/// Ingests changes the way a node does, in the order `order` draws: a change waits until its
/// dependencies are decided; one with a rejected dependency is rejected; otherwise it is
/// accepted exactly when `validate_change` accepts it against the document at its own
/// dependencies. Returns the accepted hashes and the document they make.
fn ingest(
    changes: &[automerge::Change],
    author_of: impl Fn(&automerge::Change) -> InstitutionId,
    order: u64,
) -> (BTreeSet<automerge::ChangeHash>, AutoCommit) {
    let mut queue: Vec<&automerge::Change> = changes.iter().collect();
    shuffle(&mut queue, order);
    let mut doc = AutoCommit::new();
    let mut accepted = BTreeSet::new();
    let mut rejected = BTreeSet::new();
    loop {
        let mut progress = false;
        for change in &queue {
            let hash = change.hash();
            if accepted.contains(&hash) || rejected.contains(&hash) {
                continue;
            }
            if change.deps().iter().any(|d| rejected.contains(d)) {
                rejected.insert(hash);
                progress = true;
                continue;
            }
            if !change.deps().iter().all(|d| accepted.contains(d)) {
                continue;
            }
            let before = doc.fork_at(change.deps()).unwrap();
            let mut after = before.clone();
            after.apply_changes([(*change).clone()]).unwrap();
            if validate_change(&before, &after, &author_of(change)).is_ok() {
                doc.apply_changes([(*change).clone()]).unwrap();
                accepted.insert(hash);
            } else {
                rejected.insert(hash);
            }
            progress = true;
        }
        if !progress {
            return (accepted, doc);
        }
    }
}

/// A raw edit breaking a rule, as a faulty or hostile member could write it.
#[derive(Clone, Debug)]
enum FileFault {
    UnknownSex,
    UnknownRootKey,
    EmptyName,
    LongPrescription(u64),
    ReplaceAllergies,
    ForgedAllergy,
    DeleteEncounter,
    /// A fixed field of an existing encounter rewritten.
    ChangeEncounterTime,
    /// Another institution's encounter note edited.
    ForeignNote,
    /// A scalar where a list holds entries.
    ScalarInList,
    /// A prescription replaced by a new entry in its place (the old one is gone).
    ReplaceMedication,
    /// A new entry with a field the schema does not define.
    UnknownEntryField,
    /// Another institution's exam result marked amended, in the writer's own name.
    ForeignAmendment,
    /// The file linked in another institution's name.
    ForeignLink,
    /// The document's kind rewritten.
    ChangeKind,
    /// The document's schema version rewritten.
    ChangeSchema,
}

fn file_fault() -> impl Strategy<Value = FileFault> + Clone {
    prop_oneof![
        Just(FileFault::UnknownSex),
        Just(FileFault::UnknownRootKey),
        Just(FileFault::EmptyName),
        (61u64..400).prop_map(FileFault::LongPrescription),
        Just(FileFault::ReplaceAllergies),
        Just(FileFault::ForgedAllergy),
        Just(FileFault::DeleteEncounter),
        Just(FileFault::ChangeEncounterTime),
        Just(FileFault::ForeignNote),
        Just(FileFault::ScalarInList),
        Just(FileFault::ReplaceMedication),
        Just(FileFault::UnknownEntryField),
        Just(FileFault::ForeignAmendment),
        Just(FileFault::ForeignLink),
        Just(FileFault::ChangeKind),
        Just(FileFault::ChangeSchema),
    ]
}

/// Writes `fault` on `doc` as one change by `replica`; returns its hash, if it wrote anything.
fn write_file_fault(
    doc: &mut AutoCommit,
    fault: &FileFault,
    replica: usize,
) -> Option<automerge::ChangeHash> {
    use automerge::{ObjType, ReadDoc, ScalarValue};
    let root = automerge::ROOT;
    let at = |doc: &AutoCommit, obj: &automerge::ObjId, key: &str| {
        doc.get(obj, key).ok().flatten().map(|(_, id)| id)
    };
    let demographics = at(doc, &root, "demographics")?;
    match fault {
        FileFault::UnknownSex => doc.put(&demographics, "sex", "x").ok()?,
        FileFault::UnknownRootKey => doc.put(&root, "extra", 1u64).ok()?,
        FileFault::EmptyName => {
            let name = at(doc, &demographics, "name")?;
            doc.put(&name, "given", "").ok()?
        }
        FileFault::LongPrescription(days) => {
            let list = at(doc, &root, "medications")?;
            let (_, entry) = doc.get(&list, 0).ok().flatten()?;
            doc.put(&entry, "days", *days).ok()?
        }
        FileFault::ReplaceAllergies => {
            doc.put_object(&root, "allergies", ObjType::List).ok()?;
        }
        FileFault::ForgedAllergy => {
            let list = at(doc, &root, "allergies")?;
            let entry = doc.insert_object(&list, 0, ObjType::Map).ok()?;
            doc.put(&entry, "substance", "latex").ok()?;
            doc.put(&entry, "reaction", "rash").ok()?;
            doc.put(&entry, "severity", "mild").ok()?;
            // Recorded in the name of another member than the writer's.
            let other = INSTITUTIONS[(replica + 1) % INSTITUTIONS.len()];
            doc.put(&entry, "recorded_by", other).ok()?;
            doc.put(&entry, "recorded_at", ScalarValue::Timestamp(1))
                .ok()?;
        }
        FileFault::DeleteEncounter => {
            let list = at(doc, &root, "encounters")?;
            if doc.length(&list) == 0 {
                return None;
            }
            doc.delete(&list, 0).ok()?;
        }
        FileFault::ChangeEncounterTime => {
            let list = at(doc, &root, "encounters")?;
            let (_, entry) = doc.get(&list, 0).ok().flatten()?;
            let time = match doc.get(&entry, "time").ok().flatten()?.0 {
                automerge::Value::Scalar(value) => match value.as_ref() {
                    ScalarValue::Timestamp(time) => *time,
                    _ => return None,
                },
                _ => return None,
            };
            doc.put(&entry, "time", ScalarValue::Timestamp(time + 1))
                .ok()?
        }
        FileFault::ForeignNote => {
            let list = at(doc, &root, "encounters")?;
            let own = INSTITUTIONS[replica % INSTITUTIONS.len()];
            let foreign = (0..doc.length(&list)).find_map(|index| {
                let (_, entry) = doc.get(&list, index).ok().flatten()?;
                let (owner, _) = doc.get(&entry, "institution").ok().flatten()?;
                (owner.as_str() != Some(own)).then_some(entry)
            })?;
            doc.put(&foreign, "note", "amended").ok()?
        }
        FileFault::ScalarInList => {
            let list = at(doc, &root, "follow_ups")?;
            let end = doc.length(&list);
            doc.insert(&list, end, 120u64).ok()?
        }
        FileFault::ReplaceMedication => {
            let list = at(doc, &root, "medications")?;
            if doc.length(&list) == 0 {
                return None;
            }
            let entry = doc.put_object(&list, 0, ObjType::Map).ok()?;
            doc.put(&entry, "drug", "metformin").ok()?;
            doc.put(&entry, "dose", "500 mg").ok()?;
            doc.put(&entry, "frequency", "twice daily").ok()?;
            doc.put(&entry, "start", "2026-03-01").ok()?;
            doc.put(&entry, "days", 30u64).ok()?;
            doc.put(
                &entry,
                "prescribed_by",
                INSTITUTIONS[replica % INSTITUTIONS.len()],
            )
            .ok()?;
            doc.put(&entry, "recorded_at", ScalarValue::Timestamp(1))
                .ok()?
        }
        FileFault::UnknownEntryField => {
            let list = at(doc, &root, "follow_ups")?;
            let end = doc.length(&list);
            let entry = doc.insert_object(&list, end, ObjType::Map).ok()?;
            doc.put(
                &entry,
                "institution",
                INSTITUTIONS[replica % INSTITUTIONS.len()],
            )
            .ok()?;
            doc.put(&entry, "time", ScalarValue::Timestamp(1)).ok()?;
            doc.put(&entry, "remark", "extra").ok()?
        }
        FileFault::ForeignAmendment => {
            let list = at(doc, &root, "exams")?;
            let own = INSTITUTIONS[replica % INSTITUTIONS.len()];
            let (foreign, amending) = (0..doc.length(&list)).find_map(|index| {
                let (_, entry) = doc.get(&list, index).ok().flatten()?;
                let (owner, _) = doc.get(&entry, "institution").ok().flatten()?;
                (owner.as_str() != Some(own)).then_some((entry, index))
            })?;
            let (_, amending) = doc.get(&list, amending).ok().flatten()?;
            let marker = doc.put_object(&foreign, "amended", ObjType::Map).ok()?;
            let by = match amending {
                automerge::ObjId::Id(counter, actor, _) => format!("{counter}@{actor}"),
                automerge::ObjId::Root => return None,
            };
            doc.put(&marker, "by", by).ok()?;
            doc.put(&marker, "reason", "re-measured").ok()?;
            doc.put(&marker, "recorded_by", own).ok()?;
            doc.put(&marker, "recorded_at", ScalarValue::Timestamp(1))
                .ok()?
        }
        FileFault::ForeignLink => {
            let link = doc.put_object(&root, "link", ObjType::Map).ok()?;
            doc.put(&link, "to", other_file(0).to_string()).ok()?;
            doc.put(&link, "reason", "same resident").ok()?;
            let other = INSTITUTIONS[(replica + 1) % INSTITUTIONS.len()];
            doc.put(&link, "recorded_by", other).ok()?;
            doc.put(&link, "recorded_at", ScalarValue::Timestamp(1))
                .ok()?
        }
        FileFault::ChangeKind => doc.put(&root, "type", "referral").ok()?,
        FileFault::ChangeSchema => doc.put(&root, "schema", 99u64).ok()?,
    }
    doc.commit()
}

#[derive(Clone, Debug)]
enum FileStep {
    Honest(FileAction),
    Faulty(FileFault),
}

/// Records which changes are faulty or descend from one: those must be rejected, all others
/// accepted.
fn tainted(
    changes: &[automerge::Change],
    faulty: &BTreeSet<automerge::ChangeHash>,
) -> BTreeSet<automerge::ChangeHash> {
    let mut tainted = faulty.clone();
    loop {
        let before = tainted.len();
        for change in changes {
            if change.deps().iter().any(|d| tainted.contains(d)) {
                tainted.insert(change.hash());
            }
        }
        if tainted.len() == before {
            return tainted;
        }
    }
}

/// Ingests `changes` in two orders and checks both accept the same changes and reach the same
/// heads, and that exactly the faulty changes and their descendants are rejected. Returns the
/// accepted document.
fn check_ingest(
    changes: &[automerge::Change],
    faulty: &BTreeSet<automerge::ChangeHash>,
    author_of: impl Fn(&automerge::Change) -> InstitutionId + Copy,
    orders: [u64; 2],
) -> Result<AutoCommit, TestCaseError> {
    let (accepted_a, mut doc_a) = ingest(changes, author_of, orders[0]);
    let (accepted_b, mut doc_b) = ingest(changes, author_of, orders[1]);
    prop_assert_eq!(&accepted_a, &accepted_b);
    prop_assert_eq!(doc_a.get_heads(), doc_b.get_heads());
    let tainted = tainted(changes, faulty);
    for change in changes {
        prop_assert_eq!(
            accepted_a.contains(&change.hash()),
            !tainted.contains(&change.hash()),
            "change {} (faulty: {})",
            change.hash(),
            faulty.contains(&change.hash())
        );
    }
    Ok(doc_a)
}

fn all_changes(replicas: &[AutoCommit]) -> Vec<automerge::Change> {
    let mut seen = BTreeSet::new();
    let mut changes = Vec::new();
    for replica in replicas {
        for change in replica.clone().get_changes(&[]) {
            if seen.insert(change.hash()) {
                changes.push(change);
            }
        }
    }
    changes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Honest and faulty changes from three replicas, exchanged in random orders and ingested
    /// in two different orders: both accept exactly the same changes, the accepted document is
    /// valid, every faulty change and its descendants are rejected, every other is accepted.
    #[test]
    fn ingest_is_deterministic_and_rejects_exactly_the_faulty_health_file_changes(
        history in steps(3, prop_oneof![4 => file_action().prop_map(FileStep::Honest), 1 => file_fault().prop_map(FileStep::Faulty)], 1..30),
        order_a in any::<u64>(),
        order_b in any::<u64>(),
    ) {
        let (changes, faulty) = file_history(history);
        let merged = check_ingest(&changes, &faulty, file_author, [order_a, order_b])?;
        prop_assert_eq!(validate(&merged), Ok(DocumentKind::HealthFile));
    }

    /// Every change of random honest and faulty histories, decided in a random order, is
    /// judged by its parts (`judge_change`) exactly as by the whole file (`validate_change`):
    /// the same answer and the same error; and the view kept up to date from the parts the
    /// change touched (from what judging read, for a change on the heads) equals the view
    /// read whole.
    #[test]
    fn judging_a_change_by_its_parts_agrees_with_judging_the_whole_file(
        history in steps(3, prop_oneof![3 => file_action().prop_map(FileStep::Honest), 1 => file_fault().prop_map(FileStep::Faulty)], 1..40),
        order in any::<u64>(),
    ) {
        let (changes, faulty) = file_history(history);
        let accepted = ingest_judging_parts(&changes, file_author, order)?;
        prop_assert!(accepted.is_disjoint(&faulty), "a faulty change was accepted");
    }
}

/// Decides `changes` one by one in the order given, as a node decides them when they arrive
/// so: each judged whole (`validate_change`) at its own dependencies, then the document with it
/// read whole. Returns the view of the whole history, or the index of the first change refused.
fn decide_one_by_one(
    changes: &[automerge::Change],
    author_of: impl Fn(&automerge::Change) -> InstitutionId,
) -> Result<View, usize> {
    let mut doc = AutoCommit::new();
    for (index, change) in changes.iter().enumerate() {
        let before = doc.fork_at(change.deps()).unwrap();
        let mut after = before.clone();
        after.apply_changes([change.clone()]).unwrap();
        if validate_change(&before, &after, &author_of(change)).is_err() {
            return Err(index);
        }
        doc.apply_changes([change.clone()]).unwrap();
        if view(&doc).is_err() {
            return Err(index);
        }
    }
    Ok(view(&doc).unwrap())
}

/// A history judged at once (`judge_history`, on a document holding all of it) gets the
/// answer deciding its changes one by one in the same order gets: the same view, or a refusal
/// at the same change.
fn check_judged_at_once(
    changes: &[automerge::Change],
    author_of: impl Fn(&automerge::Change) -> InstitutionId + Copy,
) -> Result<bool, TestCaseError> {
    let mut doc = AutoCommit::new();
    doc.apply_changes(changes.to_vec()).unwrap();
    let ordered = doc.get_changes(&[]);
    let authors: Vec<InstitutionId> = ordered.iter().map(author_of).collect();
    let at_once = judge_history(&doc, &ordered, &authors);
    let one_by_one = decide_one_by_one(&ordered, author_of);
    match (at_once, one_by_one) {
        (Ok(at_once), Ok(one_by_one)) => {
            prop_assert_eq!(at_once, one_by_one);
            Ok(true)
        }
        (Err(refused), Err(index)) => {
            prop_assert_eq!(refused.index, index, "{}", refused);
            Ok(false)
        }
        (at_once, one_by_one) => Err(TestCaseError::fail(format!(
            "judged at once: {:?}; one by one: {:?}",
            at_once.map(|_| "accepted"),
            one_by_one.map(|_| "accepted")
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random honest and faulty histories of a health file from three replicas, judged at
    /// once as a node judges a file fetched whole, and decided one by one in the same order:
    /// the same view, or a refusal at the same change; an honest history is accepted whole.
    #[test]
    fn a_health_file_history_judged_at_once_is_judged_as_one_by_one(
        history in steps(3, prop_oneof![3 => file_action().prop_map(FileStep::Honest), 1 => file_fault().prop_map(FileStep::Faulty)], 1..40),
    ) {
        let (changes, faulty) = file_history(history);
        let accepted = check_judged_at_once(&changes, file_author)?;
        prop_assert!(accepted || !faulty.is_empty(), "an honest history was refused");
        prop_assert!(!accepted || faulty.is_empty(), "a faulty history was accepted");
    }

    /// A change's outline (where each operation writes, which judging a change by its parts
    /// reads) and its operations as `Change::ops` reads them say what decoding the whole
    /// change says, op by op, for honest and faulty histories alike.
    #[test]
    fn a_changes_outline_agrees_with_its_decoding(
        history in steps(3, prop_oneof![3 => file_action().prop_map(FileStep::Honest), 1 => file_fault().prop_map(FileStep::Faulty)], 1..30),
    ) {
        let (changes, _) = file_history(history);
        for change in &changes {
            check_outline(change)?;
        }
    }

    /// The same for histories written by one replica alone, honest then perhaps one fault
    /// (every change builds on the one before: the view is carried from change to change,
    /// never read whole at the end).
    #[test]
    fn a_single_writers_health_file_history_judged_at_once_is_judged_as_one_by_one(
        honest in steps(1, file_action().prop_map(FileStep::Honest), 1..60),
        fault in prop::option::of(file_fault()),
    ) {
        check_single_writer(honest, fault)?;
    }

    /// The same for a file that only grows (entries appended, and a contract written, as
    /// clinics write most files), which is judged by what its changes wrote, each read once,
    /// perhaps ending with a fault.
    #[test]
    fn a_growing_health_file_judged_at_once_is_judged_as_one_by_one(
        honest in steps(1, prop_oneof![8 => appending_action(), 1 => any::<u8>().prop_map(FileAction::Contract)].prop_map(FileStep::Honest), 1..60),
        fault in prop::option::of(file_fault()),
    ) {
        check_single_writer(honest, fault)?;
    }
}

/// Compares `change.outline()` with `change.decode()`, operation by operation.
fn check_outline(change: &automerge::Change) -> Result<(), TestCaseError> {
    use automerge::OpAction;
    use automerge::legacy::{ElementId, Key, ObjectId, OpType};
    let decoded = change.decode();
    let outline = change
        .outline()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TestCaseError::fail(format!("outline unreadable: {error}")))?;
    prop_assert_eq!(outline.len(), decoded.operations.len());
    for (outlined, op) in outline.iter().zip(&decoded.operations) {
        let obj = match &op.obj {
            ObjectId::Root => None,
            ObjectId::Id(id) => Some((id.counter(), id.actor().clone())),
        };
        prop_assert_eq!(outlined.obj.map(|(c, a)| (c, a.clone())), obj);
        let key = match &op.key {
            Key::Map(key) => Some(key.to_string()),
            Key::Seq(_) => None,
        };
        prop_assert_eq!(outlined.map_key().map(str::to_string), key);
        prop_assert_eq!(outlined.insert, op.insert);
        let make = match op.action {
            OpType::Make(made) => Some(made),
            _ => None,
        };
        prop_assert_eq!(outlined.make, make);
    }
    // And the operations as `Change::ops` reads them, values and all.
    let ops = change
        .ops()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TestCaseError::fail(format!("operations unreadable: {error}")))?;
    prop_assert_eq!(ops.len(), decoded.operations.len());
    for (read, op) in ops.iter().zip(&decoded.operations) {
        let obj = match &op.obj {
            ObjectId::Root => None,
            ObjectId::Id(id) => Some((id.counter(), id.actor().clone())),
        };
        prop_assert_eq!(read.obj.map(|(c, a)| (c, a.clone())), obj);
        let (key, elem) = match &op.key {
            Key::Map(key) => (Some(key.to_string()), None),
            Key::Seq(ElementId::Head) => (None, Some(None)),
            Key::Seq(ElementId::Id(id)) => (None, Some(Some((id.counter(), id.actor().clone())))),
        };
        prop_assert_eq!(read.map_key().map(str::to_string), key);
        prop_assert_eq!(read.elem().map(|e| e.map(|(c, a)| (c, a.clone()))), elem);
        prop_assert_eq!(read.insert, op.insert);
        prop_assert_eq!(read.overwrites, op.pred.len());
        let action = match &op.action {
            OpType::Make(made) => OpAction::Make(*made),
            OpType::Put(value) => OpAction::Put(value.clone()),
            OpType::Delete => OpAction::Delete,
            OpType::Increment(_) => OpAction::Increment,
            OpType::MarkBegin(_) | OpType::MarkEnd(_) => OpAction::Mark,
        };
        prop_assert_eq!(&read.action, &action);
    }
    Ok(())
}

/// One replica's `honest` steps, then `fault` if any, judged at once and one by one (see
/// `check_judged_at_once`): an honest history is accepted, a faulty one refused.
fn check_single_writer(
    honest: Vec<Step<FileStep>>,
    fault: Option<FileFault>,
) -> Result<(), TestCaseError> {
    let history = honest.into_iter().chain(fault.map(|fault| Step::Edit {
        replica: 0,
        action: FileStep::Faulty(fault),
    }));
    let (changes, faulty) = file_history(history.collect());
    let accepted = check_judged_at_once(&changes, file_author)?;
    prop_assert!(
        accepted || !faulty.is_empty(),
        "an honest history was refused"
    );
    prop_assert!(
        !accepted || faulty.is_empty(),
        "a faulty history was accepted"
    );
    Ok(())
}

/// Two replicas rewrite the file's kind concurrently, each ending with the value it has (a
/// change that writes another kind and then the same one again, so that automerge records a
/// write), and a change builds on both. Equal values written concurrently conflict, so the
/// history is refused where the two meet, judged at once (which reads the kind only at the
/// creation, see `judge_history`) as one by one. One such rewrite alone is accepted; another
/// kind is refused at its own change.
#[test]
fn rewrites_of_a_files_kind_are_judged_at_once_as_one_by_one() {
    use automerge::transaction::Transactable;
    fn rewrite(doc: &mut AutoCommit, kind: &str) {
        doc.put(automerge::ROOT, "type", "roster").unwrap();
        doc.put(automerge::ROOT, "type", kind).unwrap();
        assert!(doc.commit().is_some(), "the rewrite was recorded");
    }
    let mut replicas = replicas_of(&new_file(100).save(), 2);
    for replica in &mut replicas {
        rewrite(replica, "health_file");
    }
    let theirs = replicas[1].get_changes(&[]);
    replicas[0].apply_changes(theirs).unwrap();
    rewrite(&mut replicas[0], "health_file");
    assert!(!check_judged_at_once(&all_changes(&replicas), file_author).unwrap());

    let mut alone = replicas_of(&new_file(100).save(), 1);
    rewrite(&mut alone[0], "health_file");
    assert!(check_judged_at_once(&all_changes(&alone), file_author).unwrap());
    rewrite(&mut alone[0], "referral");
    assert!(!check_judged_at_once(&all_changes(&alone), file_author).unwrap());
}

/// The institution a test change's actor stands for.
fn file_author(change: &automerge::Change) -> InstitutionId {
    let bytes = change.actor_id().to_bytes();
    institution(INSTITUTIONS[usize::from(bytes[0]).saturating_sub(1) % INSTITUTIONS.len()])
}

/// `count` replicas of the document saved as `saved`, replica n writing as actor n+1.
fn replicas_of(saved: &[u8], count: u8) -> Vec<AutoCommit> {
    (0..count)
        .map(|i| {
            AutoCommit::load(saved)
                .unwrap()
                .with_actor(automerge::ActorId::from(actor(i + 1).as_bytes()))
        })
        .collect()
}

/// Plays a random history of honest and faulty edits on three replicas; returns every change
/// written and the faulty ones.
fn file_history(
    history: Vec<Step<FileStep>>,
) -> (Vec<automerge::Change>, BTreeSet<automerge::ChangeHash>) {
    let mut replicas = replicas_of(&new_file(100).save(), 3);
    let mut faulty = BTreeSet::new();
    for step in history {
        match step {
            Step::Edit {
                replica,
                action: FileStep::Honest(action),
            } => {
                // A replica holding an invalid state cannot use the typed API.
                if let Ok(mut file) =
                    HealthFile::from_automerge(replicas[replica].clone(), &actor(replica as u8 + 1))
                    && let Some(op) = file_op(&action, &file.view())
                    && file.apply(&replica_editor(replica), &op).is_ok()
                {
                    replicas[replica] = file.automerge().clone();
                }
            }
            Step::Edit {
                replica,
                action: FileStep::Faulty(fault),
            } => {
                if let Some(hash) = write_file_fault(&mut replicas[replica], &fault, replica) {
                    faulty.insert(hash);
                }
            }
            Step::Sync { from, to, .. } => {
                let changes = replicas[from].clone().get_changes(&[]);
                replicas[to].apply_changes(changes).unwrap();
            }
        }
    }
    (all_changes(&replicas), faulty)
}

/// Ingests `changes` as a node does, judging each by its parts where the node would: in place
/// on the document when the change builds on its heads, otherwise on a copy at the change's
/// dependencies. Every verdict is compared with `validate_change`'s on the whole file before
/// and after, and every kept view with the view read whole. Returns the accepted changes.
fn ingest_judging_parts(
    changes: &[automerge::Change],
    author_of: impl Fn(&automerge::Change) -> InstitutionId,
    order: u64,
) -> Result<BTreeSet<automerge::ChangeHash>, TestCaseError> {
    let mut queue: Vec<&automerge::Change> = changes.iter().collect();
    shuffle(&mut queue, order);
    let mut doc = AutoCommit::new();
    let mut kept: Option<View> = None;
    let mut decided = BTreeSet::new();
    let mut accepted = BTreeSet::new();
    loop {
        let mut progress = false;
        for change in &queue {
            let hash = change.hash();
            if decided.contains(&hash)
                || !change
                    .deps()
                    .iter()
                    .all(|d| doc.get_change_by_hash(d).is_some())
            {
                continue;
            }
            decided.insert(hash);
            progress = true;
            let author = author_of(change);
            let before = doc.fork_at(change.deps()).unwrap();
            let mut after = before.clone();
            after.apply_changes([(*change).clone()]).unwrap();
            let whole = validate_change(&before, &after, &author);

            let mut heads = doc.get_heads();
            let mut deps = change.deps().to_vec();
            heads.sort();
            deps.sort();
            let mut in_place = doc.clone();
            let judged = if heads == deps {
                in_place.apply_changes([(*change).clone()]).unwrap();
                judge_change(&in_place, change, &author)
            } else {
                judge_change(&after, change, &author)
            };
            prop_assert_eq!(
                judged.as_ref().map(Judged::kind).map_err(Clone::clone),
                whole.clone(),
                "change {} judged by parts and whole",
                hash
            );
            let Ok(judged) = judged else {
                continue;
            };
            accepted.insert(hash);
            doc.apply_changes([(*change).clone()]).unwrap();
            // Built on the heads, the view comes from what judging read; otherwise the
            // touched parts are read again from the merged document.
            let updated = match heads == deps {
                true => judged.view_at_change(&doc, kept.take()),
                false => judged.view(&doc, kept.take()),
            };
            prop_assert_eq!(&updated, &view(&doc), "view kept after {}", hash);
            kept = updated.ok();
        }
        if !progress {
            return Ok(accepted);
        }
    }
}

/// A raw referral edit breaking a rule.
#[derive(Clone, Debug)]
enum ReferralFault {
    /// A status event in a third institution's name.
    ThirdPartyEvent,
    /// An event that ignores the events its writer held.
    StaleBase,
    /// A new, empty event list in place of the old one.
    ReplaceEvents,
    /// A fixed field rewritten.
    ChangeReason,
    /// The return summary written by the sender or a third party.
    ReturnSummary,
    /// A referral made an onward one after its creation (`redirected_from` added).
    RedirectedFromAdded,
    /// A redirect back to the referral's sender.
    RedirectBack,
}

fn referral_fault() -> impl Strategy<Value = ReferralFault> + Clone {
    prop_oneof![
        Just(ReferralFault::ThirdPartyEvent),
        Just(ReferralFault::StaleBase),
        Just(ReferralFault::ReplaceEvents),
        Just(ReferralFault::ChangeReason),
        Just(ReferralFault::ReturnSummary),
        Just(ReferralFault::RedirectedFromAdded),
        Just(ReferralFault::RedirectBack),
    ]
}

/// Writes `fault` on `doc` as one change by an institution; returns its hash if it wrote one.
fn write_referral_fault(
    doc: &mut AutoCommit,
    fault: &ReferralFault,
    by: &str,
) -> Option<automerge::ChangeHash> {
    use automerge::{ObjType, ReadDoc, ScalarValue};
    let view = Referral::from_automerge(doc.clone(), &actor(99))
        .ok()?
        .view();
    let root = automerge::ROOT;
    let event =
        |doc: &mut AutoCommit, institution: &str, from: ReferralStatus, after: &[EntryId]| {
            let events = doc.get(&root, "events").ok().flatten()?.1;
            let len = doc.length(&events);
            let entry = doc.insert_object(&events, len, ObjType::Map).ok()?;
            doc.put(&entry, "institution", institution).ok()?;
            doc.put(&entry, "at", ScalarValue::Timestamp(1)).ok()?;
            doc.put(&entry, "from", from.as_str()).ok()?;
            doc.put(&entry, "to", "accepted").ok()?;
            let list = doc.put_object(&entry, "after", ObjType::List).ok()?;
            for (index, id) in after.iter().enumerate() {
                doc.insert(&list, index, id.as_str()).ok()?;
            }
            Some(())
        };
    match fault {
        ReferralFault::ThirdPartyEvent => {
            let frontier: Vec<EntryId> = view.effective.last().cloned().into_iter().collect();
            event(doc, "dh-chongming-2", view.status, &frontier)?;
        }
        ReferralFault::StaleBase => {
            if view.history.is_empty() {
                return None;
            }
            event(doc, by, ReferralStatus::Requested, &[])?;
        }
        ReferralFault::ReplaceEvents => {
            doc.put_object(&root, "events", ObjType::List).ok()?;
        }
        ReferralFault::ChangeReason => doc.put(&root, "reason", "rewritten").ok()?,
        ReferralFault::ReturnSummary => {
            // Faulty only in another's hands than the receiver's.
            if view.to.as_str() == by {
                return None;
            }
            doc.put(&root, "return_summary", "seen").ok()?
        }
        ReferralFault::RedirectedFromAdded => doc
            .put(&root, "redirected_from", "00000000000000000000000000000001")
            .ok()?,
        ReferralFault::RedirectBack => {
            let frontier: Vec<EntryId> = view.effective.last().cloned().into_iter().collect();
            event(doc, by, view.status, &frontier)?;
            let events = doc.get(&root, "events").ok().flatten()?.1;
            let last = doc.length(&events) - 1;
            let entry = doc.get(&events, last).ok().flatten()?.1;
            doc.put(&entry, "to", "redirected").ok()?;
            doc.put(&entry, "redirect", view.from.as_str()).ok()?;
            doc.put(&entry, "reason", "back").ok()?;
        }
    }
    doc.commit()
}

#[derive(Clone, Debug)]
enum ReferralStep {
    Honest(ReferralOp),
    Faulty(ReferralFault),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The same for referrals: honest transitions by any side, forged events and rewritten
    /// fields, ingested in two orders: identical decisions, a valid result whose status is
    /// reached legally, exactly the faulty changes and their descendants rejected.
    #[test]
    fn ingest_rejects_exactly_the_faulty_referral_changes(
        history in steps(4, prop_oneof![4 => referral_action().prop_map(ReferralStep::Honest), 1 => referral_fault().prop_map(ReferralStep::Faulty)], 1..30),
        order_a in any::<u64>(),
        order_b in any::<u64>(),
    ) {
        let (changes, faulty) = referral_history(history);
        let merged = check_ingest(&changes, &faulty, referral_author, [order_a, order_b])?;
        let merged = Referral::from_automerge(merged, &actor(99)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        assert_legal_path(&merged.view())?;
    }
}

/// Plays a random history of honest and faulty referral edits on four replicas; returns every
/// change written and the faulty ones.
fn referral_history(
    history: Vec<Step<ReferralStep>>,
) -> (Vec<automerge::Change>, BTreeSet<automerge::ChangeHash>) {
    let mut replicas = replicas_of(&new_referral(100).save(), 4);
    let mut faulty = BTreeSet::new();
    for step in history {
        match step {
            Step::Edit {
                replica,
                action: ReferralStep::Honest(op),
            } => {
                let who = editor(REFERRAL_NODES[replica], 20_000);
                if let Ok(mut referral) =
                    Referral::from_automerge(replicas[replica].clone(), &actor(replica as u8 + 1))
                    && referral.apply(&who, &op).is_ok()
                {
                    replicas[replica] = referral.automerge().clone();
                }
            }
            Step::Edit {
                replica,
                action: ReferralStep::Faulty(fault),
            } => {
                if let Some(hash) =
                    write_referral_fault(&mut replicas[replica], &fault, REFERRAL_NODES[replica])
                {
                    faulty.insert(hash);
                }
            }
            Step::Sync { from, to, .. } => {
                let changes = replicas[from].clone().get_changes(&[]);
                replicas[to].apply_changes(changes).unwrap();
            }
        }
    }
    (all_changes(&replicas), faulty)
}

/// The institution a test referral change's actor stands for: actor n+1 is replica n; the
/// origin (actor 100) is the sender.
fn referral_author(change: &automerge::Change) -> InstitutionId {
    let n = usize::from(change.actor_id().to_bytes()[0]);
    institution(if n == 100 {
        REFERRAL_NODES[0]
    } else {
        REFERRAL_NODES[n - 1]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The same for referrals: a history judged at once gets the answer deciding it one by
    /// one in the same order gets.
    #[test]
    fn a_referral_history_judged_at_once_is_judged_as_one_by_one(
        history in steps(4, prop_oneof![4 => referral_action().prop_map(ReferralStep::Honest), 1 => referral_fault().prop_map(ReferralStep::Faulty)], 1..30),
    ) {
        let (changes, faulty) = referral_history(history);
        let accepted = check_judged_at_once(&changes, referral_author)?;
        prop_assert!(accepted || !faulty.is_empty(), "an honest history was refused");
        prop_assert!(!accepted || faulty.is_empty(), "a faulty history was accepted");
    }
}

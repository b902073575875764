//! One test per typed health-file operation, through the public API.

mod common;

use common::*;
use estuary_crdt_model::*;

fn chc() -> Editor {
    editor("chc-jianshe", 2_000)
}

fn apply(file: &mut HealthFile, op: HealthFileOp) {
    file.apply(&chc(), &op).expect("operation applies");
    validate(file.automerge()).expect("the result validates");
}

#[test]
fn create_records_demographics() {
    let file = new_file(1);
    let view = file.view();
    assert_eq!(view.id, file.id());
    assert_ne!(view.id, DocumentId::from_bytes([0; 16]));
    assert_eq!(view.demographics.name.value.family, "Lu");
    assert_eq!(view.demographics.sex.value, Sex::Female);
    assert_eq!(
        view.demographics.national_id.as_ref().unwrap().value,
        "310230195410170433"
    );
    assert!(view.conflicts().is_empty());
    assert!(view.encounters.is_empty());
}

#[test]
fn set_demographic_overwrites_without_conflict() {
    let mut file = new_file(1);
    apply(
        &mut file,
        HealthFileOp::SetDemographic(DemographicField::Phone("+86 1".into())),
    );
    let view = file.view();
    assert_eq!(
        view.demographics.phone.unwrap(),
        Register::single("+86 1".to_string())
    );
}

#[test]
fn set_contract_stores_the_whole_contract() {
    let mut file = new_file(1);
    apply(&mut file, HealthFileOp::SetContract(contract()));
    assert_eq!(file.view().contract.unwrap().value, contract());
}

#[test]
fn add_and_remove_allergy() {
    let mut file = new_file(1);
    let allergy = NewAllergy {
        substance: "Penicillin".into(),
        reaction: "urticaria".into(),
        severity: Severity::Severe,
    };
    apply(&mut file, HealthFileOp::AddAllergy(allergy.clone()));
    apply(&mut file, HealthFileOp::AddAllergy(allergy));
    let view = file.view();
    assert_eq!(view.allergies.len(), 2);
    assert_eq!(view.allergy_substances(), vec!["penicillin".to_string()]);
    assert_eq!(view.allergies[0].recorded_by, institution("chc-jianshe"));
    apply(
        &mut file,
        HealthFileOp::RemoveAllergy {
            substance: "PENICILLIN".into(),
        },
    );
    assert!(file.view().allergies.is_empty());
}

/// An allergy that turns out to be wrong is refuted, not removed: the record stays in the
/// view with what is now known, and any member may say so; only that register may change.
#[test]
fn an_allergy_shown_wrong_is_refuted_and_stays_visible() {
    let mut file = new_file(1);
    apply(
        &mut file,
        HealthFileOp::AddAllergy(NewAllergy {
            substance: "penicillin".into(),
            reaction: "rash".into(),
            severity: Severity::Moderate,
        }),
    );
    let entry = file.view().allergies[0].entry.clone();
    assert_eq!(file.view().allergies[0].verification, None);
    // A hospital's skin test shows the centre's record wrong.
    let hospital = editor("xinhua", 3_000);
    file.apply(
        &hospital,
        &HealthFileOp::SetAllergyVerification {
            entry: entry.clone(),
            status: AllergyVerification::Refuted,
        },
    )
    .unwrap();
    validate(file.automerge()).unwrap();
    let allergy = &file.view().allergies[0];
    assert_eq!(allergy.substance, "penicillin");
    assert_eq!(
        allergy.verification.as_ref().map(|r| r.value),
        Some(AllergyVerification::Refuted)
    );
    // An entry that is not an allergy of this file is a typed error.
    let error = file
        .apply(
            &hospital,
            &HealthFileOp::SetAllergyVerification {
                entry: EntryId::parse("99@00").unwrap(),
                status: AllergyVerification::Confirmed,
            },
        )
        .unwrap_err();
    assert!(matches!(error, OpError::UnknownEntry { .. }), "{error:?}");
}

/// Two members verifying one allergy at once keep both answers, surfaced as a conflict.
#[test]
fn concurrent_verifications_of_an_allergy_are_both_kept_and_surfaced() {
    let mut a = new_file(1);
    apply(
        &mut a,
        HealthFileOp::AddAllergy(NewAllergy {
            substance: "iodine contrast".into(),
            reaction: "hives".into(),
            severity: Severity::Mild,
        }),
    );
    let entry = a.view().allergies[0].entry.clone();
    let mut b = HealthFile::load(&a.save(), &actor(2)).unwrap();
    for (file, status) in [
        (&mut a, AllergyVerification::Confirmed),
        (&mut b, AllergyVerification::Refuted),
    ] {
        apply(
            file,
            HealthFileOp::SetAllergyVerification {
                entry: entry.clone(),
                status,
            },
        );
    }
    a.merge(&mut b).unwrap();
    validate(a.automerge()).unwrap();
    let view = a.view();
    assert_eq!(
        view.conflicts(),
        vec![format!("allergies[{entry}].verification")]
    );
    assert_eq!(
        view.allergies[0]
            .verification
            .as_ref()
            .unwrap()
            .conflicts
            .len(),
        1
    );
}

/// "No known allergies" is recorded with who said it; it is refused while an allergy stands,
/// allowed once that allergy is refuted, and an allergy recorded concurrently outweighs it.
#[test]
fn no_known_allergies_is_recorded_and_an_allergy_that_stands_outweighs_it() {
    let mut file = new_file(1);
    apply(&mut file, HealthFileOp::RecordNoKnownAllergies);
    let view = file.view();
    let statement = view.no_known_allergies_now().expect("recorded");
    assert_eq!(statement.recorded_by, institution("chc-jianshe"));

    // Another replica records an allergy at the same time: both merge, the allergy wins.
    let mut other = HealthFile::load(&new_file(1).save(), &actor(2)).unwrap();
    apply(
        &mut other,
        HealthFileOp::AddAllergy(NewAllergy {
            substance: "aspirin".into(),
            reaction: "wheeze".into(),
            severity: Severity::Severe,
        }),
    );
    file.merge(&mut other).unwrap();
    validate(file.automerge()).unwrap();
    let view = file.view();
    assert!(view.no_known_allergies.is_some(), "the statement is kept");
    assert_eq!(
        view.no_known_allergies_now(),
        None,
        "but the allergy outweighs it"
    );

    // Stating it again is refused while the allergy stands...
    let error = file
        .apply(&chc(), &HealthFileOp::RecordNoKnownAllergies)
        .unwrap_err();
    assert!(
        matches!(
            error,
            OpError::Invalid(ValidationError::InvalidValue {
                field: "no_known_allergies",
                ..
            })
        ),
        "{error:?}"
    );
    // ...and allowed once it is refuted.
    let entry = file.view().allergies[0].entry.clone();
    apply(
        &mut file,
        HealthFileOp::SetAllergyVerification {
            entry,
            status: AllergyVerification::Refuted,
        },
    );
    apply(&mut file, HealthFileOp::RecordNoKnownAllergies);
    assert!(file.view().no_known_allergies_now().is_some());
}

/// A statement of no known allergies in another institution's name is refused.
#[test]
fn no_known_allergies_in_another_institutions_name_is_refused() {
    use automerge::transaction::Transactable;
    let before = new_file(1).automerge().clone();
    let mut after = before.clone();
    let statement = after
        .put_object(
            automerge::ROOT,
            "no_known_allergies",
            automerge::ObjType::Map,
        )
        .unwrap();
    after.put(&statement, "recorded_by", "xinhua").unwrap();
    after
        .put(
            &statement,
            "recorded_at",
            automerge::ScalarValue::Timestamp(1_000),
        )
        .unwrap();
    after.commit();
    assert_eq!(
        validate_change(&before, &after, &institution("chc-jianshe")),
        Err(ValidationError::Provenance {
            field: "no_known_allergies.recorded_by"
        })
    );
    assert!(validate_change(&before, &after, &institution("xinhua")).is_ok());
}

fn ecg() -> HealthFileOp {
    HealthFileOp::AddExamResult(NewExamResult {
        kind: ExamKind::Ecg,
        time: Timestamp(1_600_000_000_000),
        name: "12-lead ECG".into(),
        measurements: vec![Measurement {
            name: "qtc".into(),
            value: 402.0,
            unit: Some("ms".into()),
        }],
        report: Some("sinus bradycardia".into()),
    })
}

/// A result filed on the wrong resident is marked entered in error by the hospital that
/// filed it: the record stays as it was, with the marker; no one else may mark it.
#[test]
fn a_record_filed_in_error_is_marked_by_its_institution_and_kept() {
    let mut file = new_file(1);
    let hospital = editor("xinhua", 3_000);
    file.apply(&hospital, &ecg()).unwrap();
    let original = ExamResultView::clone(&file.view().exams[0]);
    let mark = HealthFileOp::MarkEnteredInError {
        list: CorrectableList::Exams,
        entry: original.entry.clone(),
        reason: "filed on the wrong resident".into(),
    };
    // The centre did not write it: refused before anything is written.
    let heads = file.heads();
    let error = file.apply(&chc(), &mark).unwrap_err();
    assert!(
        matches!(
            error,
            OpError::Invalid(ValidationError::Provenance {
                field: "exams.entered_in_error"
            })
        ),
        "{error:?}"
    );
    assert_eq!(file.heads(), heads);
    file.apply(&hospital, &mark).unwrap();
    validate(file.automerge()).unwrap();
    let marked = ExamResultView::clone(&file.view().exams[0]);
    let marker = marked.entered_in_error.clone().expect("marked").value;
    assert_eq!(marker.reason, "filed on the wrong resident");
    assert_eq!(marker.recorded_by, institution("xinhua"));
    assert_eq!(
        ExamResultView {
            entered_in_error: None,
            ..marked
        },
        original,
        "the record itself is unchanged"
    );
    // An empty reason is refused.
    let error = file
        .apply(
            &hospital,
            &HealthFileOp::MarkEnteredInError {
                list: CorrectableList::Exams,
                entry: original.entry.clone(),
                reason: String::new(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(error, OpError::Invalid(ValidationError::Empty { .. })),
        "{error:?}"
    );
}

/// A wrong value is amended by the institution that wrote it: the corrected record is
/// appended, the original stays, marked as amended by it; no one else may amend it, and two
/// amendments made at once are both kept, as a conflict to review.
#[test]
fn a_record_amended_by_its_institution_keeps_the_original() {
    let mut file = new_file(1);
    let hospital = editor("xinhua", 3_000);
    file.apply(&hospital, &ecg()).unwrap();
    let original = ExamResultView::clone(&file.view().exams[0]);
    let HealthFileOp::AddExamResult(mut corrected) = ecg() else {
        unreachable!("an exam result")
    };
    corrected.measurements[0].value = 398.0;
    let amend = HealthFileOp::Amend {
        entry: original.entry.clone(),
        reason: "QTc re-read".into(),
        with: Amendment::ExamResult(corrected.clone()),
    };
    let heads = file.heads();
    let error = file.apply(&chc(), &amend).unwrap_err();
    assert!(
        matches!(
            error,
            OpError::Invalid(ValidationError::Provenance {
                field: "exams.amended"
            })
        ),
        "{error:?}"
    );
    assert_eq!(file.heads(), heads, "nothing written");
    file.apply(&hospital, &amend).unwrap();
    validate(file.automerge()).unwrap();
    let view = file.view();
    assert_eq!(view.exams.len(), 2, "the original and its correction");
    let amended = view.exams[0].amended.clone().expect("amended").value;
    assert_eq!(amended.by, view.exams[1].entry);
    assert_eq!(amended.reason, "QTc re-read");
    assert_eq!(amended.recorded_by, institution("xinhua"));
    assert_eq!(view.exams[1].measurements[0].value, 398.0);
    assert_eq!(
        ExamResultView {
            amended: None,
            ..ExamResultView::clone(&view.exams[0])
        },
        original,
        "the original is unchanged"
    );

    // Two amendments at once, from two replicas of the hospital: both kept, a conflict.
    let mut other = HealthFile::load(&file.save(), &actor(2)).unwrap();
    let again = |value: f64| HealthFileOp::Amend {
        entry: original.entry.clone(),
        reason: "re-read".into(),
        with: Amendment::ExamResult(NewExamResult {
            measurements: vec![Measurement {
                name: "qtc".into(),
                value,
                unit: Some("ms".into()),
            }],
            ..corrected.clone()
        }),
    };
    file.apply(&hospital, &again(400.0)).unwrap();
    other.apply(&hospital, &again(401.0)).unwrap();
    file.merge(&mut other).unwrap();
    validate(file.automerge()).unwrap();
    let view = file.view();
    assert_eq!(view.exams.len(), 4);
    assert!(
        view.conflicts()
            .contains(&format!("exams[{}].amended", original.entry)),
        "{:?}",
        view.conflicts()
    );
}

/// A peer's change marking another institution's record, or marking its own in another's
/// name, is refused by validation.
#[test]
fn a_marker_written_by_or_naming_another_institution_is_refused() {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    let mut file = new_file(1);
    file.apply(&editor("xinhua", 3_000), &ecg()).unwrap();
    let before = file.automerge().clone();
    for (named, author, field) in [
        ("xinhua", "chc-jianshe", "exams.entered_in_error"),
        (
            "chc-jianshe",
            "xinhua",
            "exams.entered_in_error.recorded_by",
        ),
    ] {
        let mut after = before.clone();
        let (_, exams) = after.get(automerge::ROOT, "exams").unwrap().unwrap();
        let (_, exam) = after.get(&exams, 0).unwrap().unwrap();
        let marker = after
            .put_object(&exam, "entered_in_error", automerge::ObjType::Map)
            .unwrap();
        after.put(&marker, "reason", "wrong resident").unwrap();
        after.put(&marker, "recorded_by", named).unwrap();
        after
            .put(
                &marker,
                "recorded_at",
                automerge::ScalarValue::Timestamp(4_000),
            )
            .unwrap();
        after.commit();
        assert_eq!(
            validate_change(&before, &after, &institution(author)),
            Err(ValidationError::Provenance { field }),
            "{named} by {author}"
        );
    }
}

#[test]
fn add_problem_set_status_and_remove() {
    let mut file = new_file(1);
    apply(
        &mut file,
        HealthFileOp::AddProblem(NewProblem {
            icd10: icd("E11.9"),
            display: "Type 2 diabetes mellitus".into(),
            onset: Some(date("2019-10-25")),
            status: ProblemStatus::Active,
        }),
    );
    let entry = file.view().problems[0].entry.clone();
    apply(
        &mut file,
        HealthFileOp::SetProblemStatus {
            entry,
            status: ProblemStatus::Resolved,
        },
    );
    assert_eq!(
        file.view().problems[0].status.value,
        ProblemStatus::Resolved
    );
    apply(
        &mut file,
        HealthFileOp::RemoveProblem {
            icd10: icd("E11.9"),
        },
    );
    assert!(file.view().problems.is_empty());
}

/// Codes of the national clinical and insurance editions are written as they are, each in
/// its own system: a WHO code, or another edition's, of the same text is another diagnosis.
#[test]
fn national_edition_codes_are_recorded_as_written_in_their_own_system() {
    let mut file = new_file(1);
    let clinical = Icd10::in_system(Icd10System::CnClinical, "E11.900").unwrap();
    let insurance = Icd10::in_system(Icd10System::CnInsurance, "E11.900").unwrap();
    for code in [&clinical, &insurance] {
        apply(
            &mut file,
            HealthFileOp::AddProblem(NewProblem {
                icd10: code.clone(),
                display: "2型糖尿病".into(),
                onset: None,
                status: ProblemStatus::Active,
            }),
        );
    }
    apply(
        &mut file,
        HealthFileOp::AddEncounter(NewEncounter {
            time: Timestamp(1_700_000_000_000),
            kind: EncounterKind::Outpatient,
            diagnoses: vec![
                Diagnosis {
                    icd10: Icd10::in_system(Icd10System::CnClinical, "I10.x00x002").unwrap(),
                    display: "高血压1级".into(),
                },
                Diagnosis {
                    icd10: icd("I10"),
                    display: "Essential hypertension".into(),
                },
            ],
            note: String::new(),
        }),
    );
    let view = file.view();
    let problems: Vec<&Icd10> = view.problems.iter().map(|p| &p.icd10).collect();
    assert_eq!(problems, vec![&clinical, &insurance]);
    let diagnoses: Vec<(Icd10System, &str)> = view.encounters[0]
        .diagnoses
        .iter()
        .map(|d| (d.icd10.system(), d.icd10.as_str()))
        .collect();
    assert_eq!(
        diagnoses,
        vec![
            (Icd10System::CnClinical, "I10.x00x002"),
            (Icd10System::Who, "I10")
        ]
    );
    // Removing the insurance edition's code leaves the clinical edition's of the same text.
    apply(&mut file, HealthFileOp::RemoveProblem { icd10: insurance });
    let problems: Vec<Icd10> = file
        .view()
        .problems
        .iter()
        .map(|p| p.icd10.clone())
        .collect();
    assert_eq!(problems, vec![clinical]);
}

/// A peer's document naming a code system no node accepts, or a code that is not of the
/// system named, is refused by validation with the field named.
#[test]
fn a_code_in_an_unknown_system_or_of_the_wrong_shape_is_refused() {
    use automerge::ReadDoc;
    use automerge::transaction::Transactable;
    for (system, code, field) in [
        ("icd-10-cm", "E11.9", "problems.icd10_system"),
        ("icd-10-cn-clinical", "E11.9", "problems.icd10"),
    ] {
        let mut file = new_file(1);
        apply(
            &mut file,
            HealthFileOp::AddProblem(NewProblem {
                icd10: icd("E11.9"),
                display: "Type 2 diabetes mellitus".into(),
                onset: None,
                status: ProblemStatus::Active,
            }),
        );
        let mut doc = file.automerge().clone();
        let (_, problems) = doc.get(automerge::ROOT, "problems").unwrap().unwrap();
        let (_, entry) = doc.get(&problems, 0).unwrap().unwrap();
        doc.put(&entry, "icd10_system", system).unwrap();
        doc.put(&entry, "icd10", code).unwrap();
        doc.commit();
        match validate(&doc) {
            Err(ValidationError::InvalidValue { field: named, .. }) => assert_eq!(named, field),
            other => panic!("{system} {code}: {other:?}"),
        }
    }
}

#[test]
fn add_and_stop_medication() {
    let mut file = new_file(1);
    apply(
        &mut file,
        HealthFileOp::AddMedication(NewMedication {
            drug: "aspirin".into(),
            dose: "100 mg".into(),
            frequency: "once daily".into(),
            start: date("2026-01-24"),
            days: 60,
        }),
    );
    let entry = file.view().medications[0].entry.clone();
    apply(
        &mut file,
        HealthFileOp::StopMedication {
            entry,
            on: date("2026-02-01"),
        },
    );
    let medication = &file.view().medications[0];
    assert_eq!(
        medication.stopped.as_ref().unwrap().value,
        date("2026-02-01")
    );
    assert_eq!(medication.prescribed_by, institution("chc-jianshe"));
}

#[test]
fn a_prescription_longer_than_sixty_days_is_refused() {
    let mut file = new_file(1);
    let before = file.heads();
    let error = file
        .apply(
            &chc(),
            &HealthFileOp::AddMedication(NewMedication {
                drug: "metformin".into(),
                dose: "500 mg".into(),
                frequency: "twice daily".into(),
                start: date("2026-01-24"),
                days: 61,
            }),
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::PrescriptionTooLong { days: 61, max: 60 })
    ));
    assert_eq!(file.heads(), before, "a refused operation writes nothing");
}

#[test]
fn add_encounter_and_edit_its_note() {
    let mut file = new_file(1);
    apply(
        &mut file,
        HealthFileOp::AddEncounter(NewEncounter {
            time: Timestamp(1_700_000_000_000),
            kind: EncounterKind::FollowUp,
            diagnoses: vec![Diagnosis {
                icd10: icd("I10"),
                display: "Essential hypertension".into(),
            }],
            note: "BP well controlled.".into(),
        }),
    );
    let entry = file.view().encounters[0].entry.clone();
    apply(
        &mut file,
        HealthFileOp::EditEncounterNote {
            entry: entry.clone(),
            note: "BP well controlled. Walks daily.".into(),
        },
    );
    let encounter = &file.view().encounters[0];
    assert_eq!(encounter.note, "BP well controlled. Walks daily.");
    assert_eq!(encounter.institution, institution("chc-jianshe"));

    let hospital = editor("xinhua", 3_000);
    let error = file
        .apply(
            &hospital,
            &HealthFileOp::EditEncounterNote {
                entry,
                note: "x".into(),
            },
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::Provenance {
            field: "encounters.note"
        })
    ));
}

#[test]
fn add_exam_result_records_the_producer() {
    let mut file = new_file(1);
    let hospital = editor("xinhua", 3_000);
    file.apply(&hospital, &ecg()).unwrap();
    let exam = &file.view().exams[0];
    assert_eq!(exam.institution, institution("xinhua"));
    assert_eq!(exam.measurements[0].value, 402.0);
}

#[test]
fn add_follow_up() {
    let mut file = new_file(1);
    apply(
        &mut file,
        HealthFileOp::AddFollowUp(NewFollowUp {
            time: Timestamp(1_700_000_000_000),
            systolic_mmhg: Some(135),
            diastolic_mmhg: Some(85),
            glucose_mmol_per_l: Some(6.1),
        }),
    );
    assert_eq!(file.view().follow_ups[0].systolic_mmhg, Some(135));
    let error = file
        .apply(
            &chc(),
            &HealthFileOp::AddFollowUp(NewFollowUp {
                time: Timestamp(0),
                systolic_mmhg: Some(135),
                diastolic_mmhg: None,
                glucose_mmol_per_l: None,
            }),
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::InvalidValue {
            field: "follow_ups",
            ..
        })
    ));
}

#[test]
fn operations_on_unknown_entries_are_refused() {
    let mut file = new_file(1);
    let error = file
        .apply(
            &chc(),
            &HealthFileOp::StopMedication {
                entry: EntryId::parse("9@00").unwrap(),
                on: date("2026-01-01"),
            },
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::UnknownEntry {
            field: "medications",
            ..
        }
    ));
}

#[test]
fn concurrent_demographic_edits_surface_as_conflicts() {
    let mut a = new_file(1);
    let mut b = HealthFile::load(&a.save(), &actor(2)).unwrap();
    a.apply(
        &chc(),
        &HealthFileOp::SetDemographic(DemographicField::Phone("+86 111".into())),
    )
    .unwrap();
    b.apply(
        &editor("xinhua", 2_500),
        &HealthFileOp::SetDemographic(DemographicField::Phone("+86 222".into())),
    )
    .unwrap();
    a.merge(&mut b).unwrap();
    b.merge(&mut a).unwrap();
    let (va, vb) = (a.view(), b.view());
    assert_eq!(va, vb);
    let phone = va.demographics.phone.clone().unwrap();
    let mut all = vec![phone.value.clone()];
    all.extend(phone.conflicts.clone());
    all.sort();
    assert_eq!(all, vec!["+86 111".to_string(), "+86 222".to_string()]);
    assert_eq!(va.conflicts(), vec!["demographics.phone".to_string()]);

    // Writing the field again, having seen both, resolves the conflict.
    a.apply(
        &chc(),
        &HealthFileOp::SetDemographic(DemographicField::Phone(phone.value)),
    )
    .unwrap();
    assert!(a.view().conflicts().is_empty());
}

#[test]
fn views_serialise_to_json_and_ops_parse_from_json() {
    let file = new_file(1);
    let json = serde_json::to_value(file.view()).unwrap();
    assert_eq!(json["demographics"]["name"]["value"]["family"], "Lu");
    let op: HealthFileOp = serde_json::from_str(
        r#"{"op":"add_allergy","args":{"substance":"penicillin","reaction":"rash","severity":"mild"}}"#,
    )
    .unwrap();
    assert!(matches!(op, HealthFileOp::AddAllergy(_)));
    let bad = serde_json::from_str::<HealthFileOp>(
        r#"{"op":"add_problem","args":{"icd10":"not-a-code","display":"x","status":"active"}}"#,
    );
    assert!(bad.is_err());
}

#[test]
fn save_incremental_round_trips() {
    let mut a = new_file(1);
    let mut b = HealthFile::load(&a.save(), &actor(2)).unwrap();
    a.apply(&chc(), &HealthFileOp::SetContract(contract()))
        .unwrap();
    let delta = a.save_incremental();
    b.load_incremental(&delta).unwrap();
    assert_eq!(a.view(), b.view());
    assert_eq!(a.heads(), b.heads());
}

#[test]
fn loading_the_wrong_kind_is_refused() {
    let mut referral = new_referral(1);
    let error = HealthFile::load(&referral.save(), &actor(1)).unwrap_err();
    assert!(matches!(
        error,
        LoadError::WrongKind {
            expected: DocumentKind::HealthFile,
            found: DocumentKind::Referral
        }
    ));
    assert!(matches!(
        HealthFile::load(b"not a document", &actor(1)),
        Err(LoadError::Refused { .. })
    ));
}

/// The view's winner of a conflicted register is automerge's own winner, on every replica.
#[test]
fn the_view_shows_automerges_winner() {
    use automerge::ReadDoc;
    for round in 0..8u8 {
        let mut a = new_file(round.wrapping_mul(2).wrapping_add(1));
        let mut b =
            HealthFile::load(&a.save(), &actor(round.wrapping_mul(2).wrapping_add(2))).unwrap();
        let mut c = HealthFile::load(&a.save(), &actor(200 - round)).unwrap();
        for (file, phone) in [(&mut a, "+86 1"), (&mut b, "+86 2"), (&mut c, "+86 3")] {
            file.apply(
                &chc(),
                &HealthFileOp::SetDemographic(DemographicField::Phone(phone.into())),
            )
            .unwrap();
        }
        a.merge(&mut b).unwrap();
        a.merge(&mut c).unwrap();
        let doc = a.automerge();
        let demographics = doc.get(automerge::ROOT, "demographics").unwrap().unwrap().1;
        let (winner, _) = doc.get(&demographics, "phone").unwrap().unwrap();
        let phone = a.view().demographics.phone.unwrap();
        assert_eq!(winner.as_str(), Some(phone.value.as_str()));
        assert_eq!(phone.conflicts.len(), 2);
    }
}

/// A member's existing records load as one change that creates the file: each record written
/// at its own time in the loading institution's name, the file valid, and the change judged
/// as any creation is.
#[test]
fn a_resident_with_records_is_created_in_one_change() {
    let records = vec![
        (
            Timestamp(1_500_000_000_000),
            HealthFileOp::SetContract(contract()),
        ),
        (
            Timestamp(1_400_000_000_000),
            HealthFileOp::AddAllergy(NewAllergy {
                substance: "Penicillin".into(),
                reaction: "urticaria".into(),
                severity: Severity::Severe,
            }),
        ),
        (
            Timestamp(1_600_000_000_000),
            HealthFileOp::AddEncounter(NewEncounter {
                time: Timestamp(1_600_000_000_000),
                kind: EncounterKind::Outpatient,
                diagnoses: vec![Diagnosis {
                    icd10: Icd10::in_system(Icd10System::CnClinical, "I10.x00x002").unwrap(),
                    display: "高血压1级".into(),
                }],
                note: "BP 150/95".into(),
            }),
        ),
    ];
    let file =
        HealthFile::create_with_records(&actor(1), &chc(), &demographics(), &records).unwrap();
    let mut doc = file.automerge().clone();
    assert_eq!(doc.get_changes(&[]).len(), 1, "one change");
    assert_eq!(document_id(&mut doc).unwrap(), file.id());
    validate(file.automerge()).expect("the file validates");
    let change = doc.get_changes(&[])[0].clone();
    judge_change(&doc, &change, &institution("chc-jianshe")).expect("judged as a creation");

    let view = file.view();
    assert_eq!(view.contract.as_ref().unwrap().value, contract());
    assert_eq!(view.allergies.len(), 1);
    assert_eq!(view.allergies[0].recorded_at, Timestamp(1_400_000_000_000));
    assert_eq!(view.allergies[0].recorded_by, institution("chc-jianshe"));
    assert_eq!(view.encounters.len(), 1);
    assert_eq!(view.encounters[0].note, "BP 150/95");
    assert!(view.conflicts().is_empty());
}

/// A record the model refuses makes nothing, and the error names the record.
#[test]
fn a_refused_record_makes_no_file_and_is_named() {
    let records = vec![
        (
            Timestamp(1_500_000_000_000),
            HealthFileOp::SetContract(contract()),
        ),
        (
            Timestamp(1_400_000_000_000),
            HealthFileOp::AddAllergy(NewAllergy {
                substance: String::new(),
                reaction: "urticaria".into(),
                severity: Severity::Severe,
            }),
        ),
    ];
    let refused =
        HealthFile::create_with_records(&actor(1), &chc(), &demographics(), &records).unwrap_err();
    assert_eq!(refused.record, Some(1));
    assert!(refused.to_string().starts_with("record 1: "), "{refused}");
}

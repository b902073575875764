//! One test per validation error: documents and changes written with raw automerge, the way a
//! faulty or hostile peer could, are rejected by `validate` / `validate_change` with the error
//! a person can act on.

mod common;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue};
use common::*;
use estuary_crdt_model::*;

fn map(doc: &AutoCommit, parent: &ObjId, key: &str) -> ObjId {
    doc.get(parent, key).unwrap().unwrap().1
}

fn item(doc: &AutoCommit, list: &ObjId, index: usize) -> ObjId {
    doc.get(list, index).unwrap().unwrap().1
}

/// A file with one encounter and one medication, as raw automerge.
fn raw_file() -> AutoCommit {
    let mut file = new_file(1);
    let chc = editor("chc-jianshe", 2_000);
    file.apply(
        &chc,
        &HealthFileOp::AddEncounter(NewEncounter {
            time: Timestamp(5),
            kind: EncounterKind::Outpatient,
            diagnoses: vec![],
            note: "note".into(),
        }),
    )
    .unwrap();
    file.apply(
        &chc,
        &HealthFileOp::AddMedication(NewMedication {
            drug: "aspirin".into(),
            dose: "100 mg".into(),
            frequency: "daily".into(),
            start: date("2026-01-01"),
            days: 30,
        }),
    )
    .unwrap();
    raw(&file.save())
}

fn demographics_of(doc: &AutoCommit) -> ObjId {
    map(doc, &automerge::ROOT, "demographics")
}

fn invalid(doc: &AutoCommit) -> ValidationError {
    validate(doc).expect_err("the document must be rejected")
}

#[test]
fn a_document_without_type_is_unknown() {
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "name", "x").unwrap();
    assert_eq!(invalid(&doc), ValidationError::UnknownDocumentType);
}

#[test]
fn a_newer_schema_is_unsupported() {
    let mut doc = raw_file();
    doc.put(automerge::ROOT, "schema", 2u64).unwrap();
    assert_eq!(
        invalid(&doc),
        ValidationError::UnsupportedSchema {
            found: 2,
            supported: 1
        }
    );
}

#[test]
fn a_missing_required_field_is_named() {
    let mut doc = raw_file();
    let demographics = demographics_of(&doc);
    doc.delete(&demographics, "sex").unwrap();
    assert_eq!(
        invalid(&doc),
        ValidationError::MissingField {
            field: "demographics.sex"
        }
    );
}

#[test]
fn a_value_of_the_wrong_type_is_named() {
    let mut doc = raw_file();
    let medications = map(&doc, &automerge::ROOT, "medications");
    let medication = item(&doc, &medications, 0);
    doc.put(&medication, "days", "thirty").unwrap();
    assert!(matches!(
        invalid(&doc),
        ValidationError::WrongType {
            field: "medications.days",
            ..
        }
    ));
}

#[test]
fn an_unknown_field_is_rejected() {
    let mut doc = raw_file();
    doc.put(automerge::ROOT, "hidden", "anything").unwrap();
    assert_eq!(
        invalid(&doc),
        ValidationError::UnknownField { object: "root" }
    );
}

#[test]
fn an_empty_required_text_is_rejected() {
    let mut doc = raw_file();
    let demographics = demographics_of(&doc);
    let name = map(&doc, &demographics, "name");
    doc.put(&name, "family", "  ").unwrap();
    assert_eq!(
        invalid(&doc),
        ValidationError::Empty {
            field: "demographics.name.family"
        }
    );
}

#[test]
fn an_overlong_text_is_rejected_with_its_length() {
    let mut doc = raw_file();
    let demographics = demographics_of(&doc);
    doc.put(&demographics, "phone", "9".repeat(600)).unwrap();
    assert_eq!(
        invalid(&doc),
        ValidationError::TooLong {
            field: "demographics.phone",
            bytes: 600,
            max: limits::FIELD_BYTES_MAX
        }
    );
}

#[test]
fn too_many_entries_are_rejected() {
    let mut doc = raw_file();
    let encounters = map(&doc, &automerge::ROOT, "encounters");
    let encounter = item(&doc, &encounters, 0);
    let diagnoses = map(&doc, &encounter, "diagnoses");
    for index in 0..=limits::DIAGNOSES_PER_ENCOUNTER_MAX {
        let d = doc.insert_object(&diagnoses, index, ObjType::Map).unwrap();
        doc.put(&d, "icd10", "I10").unwrap();
        doc.put(&d, "display", "Hypertension").unwrap();
    }
    assert_eq!(
        invalid(&doc),
        ValidationError::TooMany {
            field: "encounters.diagnoses",
            count: limits::DIAGNOSES_PER_ENCOUNTER_MAX + 1,
            max: limits::DIAGNOSES_PER_ENCOUNTER_MAX
        }
    );
}

#[test]
fn an_unknown_vocabulary_value_is_rejected() {
    let mut doc = raw_file();
    let demographics = demographics_of(&doc);
    doc.put(&demographics, "sex", "M").unwrap();
    assert!(matches!(
        invalid(&doc),
        ValidationError::InvalidValue {
            field: "demographics.sex",
            ..
        }
    ));
}

#[test]
fn a_prescription_over_sixty_days_is_rejected() {
    let mut doc = raw_file();
    let medications = map(&doc, &automerge::ROOT, "medications");
    let medication = item(&doc, &medications, 0);
    doc.put(&medication, "days", 90u64).unwrap();
    assert_eq!(
        invalid(&doc),
        ValidationError::PrescriptionTooLong { days: 90, max: 60 }
    );
}

/// Appends a raw status event to a referral.
fn raw_event(doc: &mut AutoCommit, institution: &str, from: &str, to: &str, after: &[&str]) {
    let events = map(doc, &automerge::ROOT, "events");
    let len = doc.length(&events);
    let event = doc.insert_object(&events, len, ObjType::Map).unwrap();
    doc.put(&event, "institution", institution).unwrap();
    doc.put(&event, "at", ScalarValue::Timestamp(1)).unwrap();
    doc.put(&event, "from", from).unwrap();
    doc.put(&event, "to", to).unwrap();
    let list = doc.put_object(&event, "after", ObjType::List).unwrap();
    for (index, id) in after.iter().enumerate() {
        doc.insert(&list, index, *id).unwrap();
    }
}

fn raw_referral() -> AutoCommit {
    raw(&new_referral(1).save())
}

#[test]
fn an_illegal_transition_is_rejected() {
    let mut doc = raw_referral();
    raw_event(&mut doc, "xinhua", "requested", "completed", &[]);
    assert_eq!(
        invalid(&doc),
        ValidationError::IllegalTransition {
            from: ReferralStatus::Requested,
            to: ReferralStatus::Completed
        }
    );
}

#[test]
fn a_transition_by_the_wrong_side_is_rejected() {
    let mut doc = raw_referral();
    raw_event(&mut doc, "chc-jianshe", "requested", "accepted", &[]);
    assert_eq!(
        invalid(&doc),
        ValidationError::NotAuthorised {
            to: ReferralStatus::Accepted,
            required: Role::Receiver
        }
    );
    let mut doc = raw_referral();
    raw_event(&mut doc, "dh-chongming-2", "requested", "cancelled", &[]);
    assert_eq!(
        invalid(&doc),
        ValidationError::NotAuthorised {
            to: ReferralStatus::Cancelled,
            required: Role::Sender
        }
    );
}

#[test]
fn an_event_that_misstates_its_starting_status_is_rejected() {
    let mut doc = raw_referral();
    raw_event(&mut doc, "xinhua", "accepted", "scheduled", &[]);
    assert!(matches!(
        invalid(&doc),
        ValidationError::EventBase {
            recorded: ReferralStatus::Accepted,
            derived: ReferralStatus::Requested
        }
    ));
}

#[test]
fn an_event_naming_unknown_events_is_rejected() {
    let mut doc = raw_referral();
    raw_event(&mut doc, "xinhua", "requested", "accepted", &["99@abcdef"]);
    assert!(matches!(
        invalid(&doc),
        ValidationError::EventReference { .. }
    ));
}

/// `before` and `after` of a change made with raw automerge by `edit`.
fn raw_change(bytes: &[u8], edit: impl FnOnce(&mut AutoCommit)) -> (AutoCommit, AutoCommit) {
    let before = raw(bytes);
    let mut after = raw(bytes);
    edit(&mut after);
    (before, after)
}

#[test]
fn changing_a_fixed_field_is_rejected() {
    let (before, after) = raw_change(&raw_file().save(), |doc| {
        let encounters = map(doc, &automerge::ROOT, "encounters");
        let encounter = item(doc, &encounters, 0);
        doc.put(&encounter, "kind", "inpatient").unwrap();
    });
    assert_eq!(
        validate_change(&before, &after, &institution("chc-jianshe")),
        Err(ValidationError::ImmutableChanged {
            field: "encounters"
        })
    );
}

#[test]
fn removing_an_append_only_entry_is_rejected() {
    let (before, after) = raw_change(&raw_file().save(), |doc| {
        let encounters = map(doc, &automerge::ROOT, "encounters");
        doc.delete(&encounters, 0).unwrap();
    });
    assert_eq!(
        validate_change(&before, &after, &institution("chc-jianshe")),
        Err(ValidationError::EntryRemoved {
            field: "encounters"
        })
    );
}

#[test]
fn recording_in_another_institutions_name_is_rejected() {
    let mut file = new_file(1);
    let before = raw(&file.save());
    file.apply(
        &editor("chc-jianshe", 3_000),
        &HealthFileOp::AddAllergy(NewAllergy {
            substance: "penicillin".into(),
            reaction: "rash".into(),
            severity: Severity::Mild,
        }),
    )
    .unwrap();
    let after = raw(&file.save());
    assert!(validate_change(&before, &after, &institution("chc-jianshe")).is_ok());
    assert_eq!(
        validate_change(&before, &after, &institution("xinhua")),
        Err(ValidationError::Provenance {
            field: "allergies.recorded_by"
        })
    );
}

#[test]
fn editing_another_institutions_note_is_rejected() {
    let (before, after) = raw_change(&raw_file().save(), |doc| {
        let encounters = map(doc, &automerge::ROOT, "encounters");
        let encounter = item(doc, &encounters, 0);
        doc.put(&encounter, "note", "amended: note").unwrap();
    });
    assert!(validate_change(&before, &after, &institution("chc-jianshe")).is_ok());
    assert_eq!(
        validate_change(&before, &after, &institution("xinhua")),
        Err(ValidationError::Provenance {
            field: "encounters.note"
        })
    );
}

/// A file whose encounter note is an automerge Text object, as releases before notes became
/// plain registers wrote it.
fn file_with_a_text_note() -> AutoCommit {
    let mut doc = raw_file();
    let encounters = map(&doc, &automerge::ROOT, "encounters");
    let encounter = item(&doc, &encounters, 0);
    let note = doc.put_object(&encounter, "note", ObjType::Text).unwrap();
    doc.splice_text(&note, 0, 0, "BP 150/95").unwrap();
    doc.commit();
    doc
}

#[test]
fn a_note_written_as_text_is_read_edited_by_its_institution_and_kept_from_others() {
    let saved = file_with_a_text_note().save();
    let mut file = HealthFile::load(&saved, &actor(3)).unwrap();
    let view = file.view();
    assert_eq!(view.encounters[0].note, "BP 150/95");
    // Another institution may not touch it, character by character or whole.
    for edit in [
        (|doc: &mut AutoCommit, note: ObjId, _: ObjId| {
            doc.splice_text(&note, 0, 0, "amended: ").unwrap();
        }) as fn(&mut AutoCommit, ObjId, ObjId),
        |doc, _, encounter| {
            doc.put(&encounter, "note", "amended").unwrap();
        },
    ] {
        let (before, after) = raw_change(&saved, |doc| {
            let encounters = map(doc, &automerge::ROOT, "encounters");
            let encounter = item(doc, &encounters, 0);
            let note = map(doc, &encounter, "note");
            edit(doc, note, encounter);
        });
        assert!(validate_change(&before, &after, &institution("chc-jianshe")).is_ok());
        assert_eq!(
            validate_change(&before, &after, &institution("xinhua")),
            Err(ValidationError::Provenance {
                field: "encounters.note"
            })
        );
    }
    // Its institution's edit replaces it with a plain note.
    let entry = view.encounters[0].entry.clone();
    file.apply(
        &editor("chc-jianshe", 3_000),
        &HealthFileOp::EditEncounterNote {
            entry: entry.clone(),
            note: "BP 150/95; recheck in two weeks".into(),
        },
    )
    .unwrap();
    assert_eq!(
        file.view().encounters[0].note,
        "BP 150/95; recheck in two weeks"
    );
    let doc = file.into_automerge();
    let encounters = map(&doc, &automerge::ROOT, "encounters");
    let encounter = item(&doc, &encounters, 0);
    assert!(matches!(
        doc.get(&encounter, "note").unwrap(),
        Some((automerge::Value::Scalar(_), _))
    ));
}

#[test]
fn a_referral_created_in_another_name_is_rejected() {
    let after = raw(&new_referral(1).save());
    let before = AutoCommit::new();
    assert!(validate_change(&before, &after, &institution("chc-jianshe")).is_ok());
    assert_eq!(
        validate_change(&before, &after, &institution("xinhua")),
        Err(ValidationError::Provenance { field: "from" })
    );
}

#[test]
fn an_event_ignoring_events_its_writer_held_is_rejected() {
    let mut referral = new_referral(1);
    referral
        .apply(&editor("xinhua", 2_000), &ReferralOp::Accept)
        .unwrap();
    // The receiver pretends not to have seen its own accept: a forged concurrent decline.
    let (before, after) = raw_change(&referral.save(), |doc| {
        raw_event(doc, "xinhua", "requested", "declined", &[]);
    });
    validate(&after).expect("as a state it is a plausible concurrent decline");
    assert!(matches!(
        validate_change(&before, &after, &institution("xinhua")),
        Err(ValidationError::EventReference { .. })
    ));
}

#[test]
fn a_document_id_is_bound_to_its_one_creation_change() {
    let mut a = new_file(1);
    let mut b = new_file(2);
    assert_ne!(a.id(), b.id(), "two creations make two documents");
    // Mixing two documents gives two creation changes: refused, the replica unchanged.
    let heads = a.heads();
    assert!(matches!(
        a.merge(&mut b),
        Err(LoadError::Invalid(ValidationError::IdentityChanged))
    ));
    assert_eq!(a.heads(), heads);
    let mut mixed = raw(&a.save());
    mixed.merge(&mut raw(&b.save())).unwrap();
    assert_eq!(
        document_id(&mut mixed),
        Err(ValidationError::IdentityChanged)
    );
    assert_eq!(document_id(&mut raw(&a.save())), Ok(a.id()));
}

#[test]
fn changing_a_documents_kind_is_rejected() {
    let (before, after) = raw_change(&raw_file().save(), |doc| {
        doc.put(automerge::ROOT, "type", "roster").unwrap();
    });
    assert!(validate_change(&before, &after, &institution("chc-jianshe")).is_err());
    let mut kinds = raw(&raw_file().save());
    let mut other = raw(&raw_file().save());
    kinds.put(automerge::ROOT, "type", "roster").unwrap();
    other.put(automerge::ROOT, "type", "referral").unwrap();
    kinds.merge(&mut other).unwrap();
    assert_eq!(validate(&kinds), Err(ValidationError::IdentityChanged));
}

#[test]
fn replacing_a_list_is_rejected() {
    let (before, after) = raw_change(&raw_file().save(), |doc| {
        doc.put_object(automerge::ROOT, "allergies", ObjType::List)
            .unwrap();
    });
    validate(&after).expect("as a state, an empty allergy list is fine");
    assert_eq!(
        validate_change(&before, &after, &institution("chc-jianshe")),
        Err(ValidationError::ReplacedObject { field: "allergies" })
    );
    // Two concurrent replacements leave a conflicted list: invalid as a state too.
    let mut one = raw(&raw_file().save());
    let mut two = raw(&raw_file().save());
    one.put_object(automerge::ROOT, "encounters", ObjType::List)
        .unwrap();
    two.put_object(automerge::ROOT, "encounters", ObjType::List)
        .unwrap();
    one.merge(&mut two).unwrap();
    assert_eq!(
        validate(&one),
        Err(ValidationError::ReplacedObject {
            field: "encounters"
        })
    );
}

#[test]
fn error_messages_name_fields_never_values() {
    let mut doc = raw_file();
    let demographics = demographics_of(&doc);
    let secret = "310230195410170433-CANARY";
    doc.put(&demographics, "national_id", secret.repeat(30))
        .unwrap();
    let message = invalid(&doc).to_string();
    assert!(message.contains("demographics.national_id"));
    assert!(!message.contains("CANARY"));
}

/// Fuzzing found bundle chunks on which automerge 0.12's decoder panics (`-panic-`) or tries
/// to allocate 2 GiB (`-oom-`). Loading them must be a typed error, on every path that
/// decodes untrusted bytes, without reaching automerge's bundle parser.
#[test]
fn bytes_that_break_the_automerge_decoder_are_refused() {
    for bytes in [
        &include_bytes!("data/automerge-decoder-panic-1.bin")[..],
        &include_bytes!("data/automerge-bundle-oom-1.bin")[..],
    ] {
        assert!(matches!(
            load_document(bytes),
            Err(LoadError::Refused { .. })
        ));
        assert!(matches!(
            HealthFile::load(bytes, &actor(1)),
            Err(LoadError::Refused { .. })
        ));
        let mut file = new_file(1);
        let heads = file.heads();
        assert!(matches!(
            file.load_incremental(bytes),
            Err(LoadError::Refused { .. })
        ));
        assert_eq!(
            file.heads(),
            heads,
            "a refused load leaves the replica unchanged"
        );
    }
}

#[test]
fn a_compressed_change_that_inflates_past_its_limit_is_refused() {
    use std::io::Write;
    let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    encoder
        .write_all(&vec![0u8; (limits::CHANGE_INFLATED_BYTES_MAX + 1) as usize])
        .unwrap();
    let data = encoder.finish().unwrap();
    // magic | checksum (unchecked here) | type 2 (compressed change) | LEB128 length | data
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    let mut length = data.len();
    loop {
        let byte = (length & 0x7f) as u8;
        length >>= 7;
        chunk.push(if length == 0 { byte } else { byte | 0x80 });
        if length == 0 {
            break;
        }
    }
    chunk.extend(&data);
    assert!(
        chunk.len() < 64 * 1024,
        "the bomb is small: {} bytes",
        chunk.len()
    );
    assert!(matches!(
        load_document(&chunk),
        Err(LoadError::Refused { reason }) if reason.contains("inflates")
    ));
}

#[test]
fn saved_documents_and_incremental_saves_pass_the_chunk_check() {
    let mut file = new_file(1);
    let mut copy = HealthFile::load(&file.save(), &actor(2)).unwrap();
    let note = "a long note that automerge compresses ".repeat(100);
    file.apply(
        &editor("chc-jianshe", 5),
        &HealthFileOp::AddEncounter(NewEncounter {
            time: Timestamp(5),
            kind: EncounterKind::Outpatient,
            diagnoses: vec![],
            note,
        }),
    )
    .unwrap();
    copy.load_incremental(&file.save_incremental()).unwrap();
    copy.load_incremental(&file.save_incremental()).unwrap();
    assert_eq!(copy.view(), file.view());
}

/// Loading with the changes lists them as `get_changes` does: from one document chunk (the
/// changes loading builds to check the heads) and from a document with changes after it.
#[test]
fn a_document_loads_with_its_changes_in_the_order_get_changes_lists_them() {
    let mut file = new_file(1);
    for n in 0..4 {
        file.apply(
            &editor("chc-jianshe", 5 + n),
            &HealthFileOp::AddEncounter(NewEncounter {
                time: Timestamp(5 + n),
                kind: EncounterKind::Outpatient,
                diagnoses: vec![],
                note: format!("visit {n}"),
            }),
        )
        .unwrap();
    }
    let one_chunk = file.save();
    assert!(is_one_document_chunk(&one_chunk));
    let mut with_tail = one_chunk.clone();
    file.save_incremental();
    file.apply(
        &editor("chc-jianshe", 20),
        &HealthFileOp::AddAllergy(NewAllergy {
            substance: "penicillin".into(),
            reaction: "rash".into(),
            severity: Severity::Mild,
        }),
    )
    .unwrap();
    with_tail.extend(file.save_incremental());
    assert!(!is_one_document_chunk(&with_tail));
    for bytes in [&one_chunk, &with_tail] {
        let (mut doc, changes) = load_document_with_changes(bytes).unwrap();
        let mut listed = load_document(bytes).unwrap();
        let hashes = |changes: &[automerge::Change]| -> Vec<_> {
            changes
                .iter()
                .map(|c| (c.hash(), c.raw_bytes().to_vec()))
                .collect()
        };
        assert_eq!(hashes(&changes), hashes(&listed.get_changes(&[])));
        assert_eq!(doc.get_heads(), listed.get_heads());
    }
    assert_eq!(load_document_with_changes(&with_tail).unwrap().1.len(), 6);
    assert!(load_document_with_changes(&one_chunk[..one_chunk.len() - 1]).is_err());
}

/// A note is one register: two concurrent edits (two nodes of its institution) keep both,
/// one shown and the other a conflict to review, on every replica; a note past the bound is
/// refused.
#[test]
fn concurrent_note_edits_show_as_a_conflict() {
    let chc = editor("chc-jianshe", 2_000);
    let mut a = new_file(1);
    a.apply(
        &chc,
        &HealthFileOp::AddEncounter(NewEncounter {
            time: Timestamp(5),
            kind: EncounterKind::Outpatient,
            diagnoses: vec![],
            note: String::new(),
        }),
    )
    .unwrap();
    let entry = a.view().encounters[0].entry.clone();
    let mut b = HealthFile::load(&a.save(), &actor(2)).unwrap();
    for (file, note) in [(&mut a, "BP 150/95"), (&mut b, "BP 150/95, seen at home")] {
        file.apply(
            &chc,
            &HealthFileOp::EditEncounterNote {
                entry: entry.clone(),
                note: note.into(),
            },
        )
        .unwrap();
    }
    a.merge(&mut b).unwrap();
    b.merge(&mut a).unwrap();
    assert_eq!(a.view(), b.view());
    let encounter = &a.view().encounters[0];
    let mut both = vec![encounter.note.clone()];
    both.extend(encounter.note_conflicts.clone());
    both.sort();
    assert_eq!(both, ["BP 150/95", "BP 150/95, seen at home"]);
    // An edit after both settles it.
    a.apply(
        &chc,
        &HealthFileOp::EditEncounterNote {
            entry: entry.clone(),
            note: "BP 150/95, seen at home".into(),
        },
    )
    .unwrap();
    assert!(a.view().encounters[0].note_conflicts.is_empty());
    let error = a
        .apply(
            &chc,
            &HealthFileOp::EditEncounterNote {
                entry,
                note: "c".repeat(limits::NOTE_BYTES_MAX + 1),
            },
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::TooLong {
            field: "encounters.note",
            ..
        })
    ));
}

//! Arbitrary JSON as an app's health-file operation: parsing and applying must return a typed
//! result, never panic, and never leave a document that fails validation.
#![no_main]

use estuary_crdt_model::*;
use libfuzzer_sys::fuzz_target;

/// A file holding one entry of each kind, so operations naming entries reach real ones.
fn populated_file(editor: &Editor) -> HealthFile {
    let demographics = Demographics {
        name: PersonName { family: "F".into(), given: "G".into(), text: None },
        sex: Sex::Unknown,
        birth_date: Date::new("1950-01-01").unwrap(),
        phone: None,
        address: None,
        national_id: None,
        insurance: None,
    };
    let mut file = HealthFile::create(&Actor::from_bytes(vec![1]), editor, &demographics)
        .expect("a minimal file is valid");
    let seed_ops = [
        r#"{"op":"add_allergy","args":{"substance":"penicillin","reaction":"rash","severity":"mild"}}"#,
        r#"{"op":"add_problem","args":{"icd10":"I10","display":"HT","status":"active"}}"#,
        r#"{"op":"add_problem","args":{"icd10":{"system":"icd-10-cn-clinical","code":"I10.x00x002"},"display":"HT","status":"active"}}"#,
        r#"{"op":"add_medication","args":{"drug":"a","dose":"1","frequency":"d","start":"2026-01-01","days":30}}"#,
        r#"{"op":"add_encounter","args":{"time":1,"kind":"outpatient","diagnoses":[],"note":"n"}}"#,
    ];
    for op in seed_ops {
        let op: HealthFileOp = serde_json::from_str(op).expect("seed ops parse");
        file.apply(editor, &op).expect("seed ops apply");
    }
    file
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(op) = serde_json::from_slice::<HealthFileOp>(bytes) else { return };
    let editor = Editor { institution: InstitutionId::new("chc-a").unwrap(), at: Timestamp(0) };
    let mut file = populated_file(&editor);
    let before = file.automerge().clone();
    let heads = file.heads();
    match file.apply(&editor, &op) {
        Ok(()) => {
            validate_change(&before, file.automerge(), &editor.institution).expect("an accepted op is a valid change");
        }
        Err(_) => assert_eq!(file.heads(), heads, "a refused op writes nothing"),
    }
});

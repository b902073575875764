//! Documents the crate's unit tests share.

use crate::{
    Actor, Demographics, Diagnosis, Editor, HealthFile, HealthFileOp, Icd10, InstitutionId,
    NewEncounter, PersonName, Sex, Timestamp,
};

/// An edit by the community centre at `at`.
pub(crate) fn editor(at: i64) -> Editor {
    Editor {
        institution: InstitutionId::new("chc-jianshe").unwrap(),
        at: Timestamp(at),
    }
}

/// A file created, then `encounters` encounters appended, each its own change, each with
/// `diagnoses` diagnoses (at most two).
pub(crate) fn health_file(encounters: usize, diagnoses: usize) -> HealthFile {
    let demographics = Demographics {
        name: PersonName {
            family: "Lu".into(),
            given: "Jianguo".into(),
            text: None,
        },
        sex: Sex::Female,
        birth_date: crate::Date::new("1954-10-17").unwrap(),
        phone: None,
        address: None,
        national_id: None,
        insurance: None,
    };
    let mut file = HealthFile::create(
        &Actor::from_bytes(vec![1; 32]),
        &editor(1_000),
        &demographics,
    )
    .unwrap();
    let diagnosis = |(code, display): (&str, &str)| Diagnosis {
        icd10: Icd10::new(code).unwrap(),
        display: display.into(),
    };
    for n in 0..encounters {
        file.apply(
            &editor(2_000 + n as i64),
            &HealthFileOp::AddEncounter(NewEncounter {
                time: Timestamp(2_000 + n as i64),
                kind: crate::EncounterKind::Outpatient,
                diagnoses: [
                    ("I10", "Essential hypertension"),
                    ("E11.9", "Type 2 diabetes"),
                ]
                .into_iter()
                .take(diagnoses)
                .map(diagnosis)
                .collect(),
                note: format!("visit {n}"),
            }),
        )
        .unwrap();
    }
    file
}

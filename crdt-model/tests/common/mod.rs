//! Builders shared by the model's integration tests.
#![allow(dead_code)]

use estuary_crdt_model::*;

pub mod document_chunk;

pub fn institution(id: &str) -> InstitutionId {
    InstitutionId::new(id).expect("test institution ids are valid")
}

pub fn editor(id: &str, at: i64) -> Editor {
    Editor {
        institution: institution(id),
        at: Timestamp(at),
    }
}

pub fn actor(n: u8) -> Actor {
    Actor::from_bytes(vec![n; 32])
}

pub fn doc_id(n: u8) -> DocumentId {
    DocumentId::from_bytes([n; 16])
}

pub fn date(text: &str) -> Date {
    Date::new(text).expect("test dates are valid")
}

pub fn icd(code: &str) -> Icd10 {
    Icd10::new(code).expect("test codes are valid")
}

pub fn demographics() -> Demographics {
    Demographics {
        name: PersonName {
            family: "Lu".into(),
            given: "Jianguo".into(),
            text: Some("陆建国".into()),
        },
        sex: Sex::Female,
        birth_date: date("1954-10-17"),
        phone: Some("+86 13599251131".into()),
        address: Some(Address {
            line: "494 Dongmen Rd".into(),
            town: Some("Jianshe".into()),
            district: Some("Chongming".into()),
            city: Some("Shanghai".into()),
            postal_code: Some("202115".into()),
        }),
        national_id: Some("310230195410170433".into()),
        insurance: Some(Insurance {
            scheme: "UEBMI (urban employee)".into(),
            number: "SH304046585692".into(),
            valid_until: Some(date("2027-01-05")),
        }),
    }
}

pub fn new_file(actor_n: u8) -> HealthFile {
    HealthFile::create(
        &actor(actor_n),
        &editor("chc-jianshe", 1_000),
        &demographics(),
    )
    .expect("a valid file is created")
}

pub fn contract() -> FamilyDoctorContract {
    FamilyDoctorContract {
        community_centre: institution("chc-jianshe"),
        district_hospital: institution("dh-chongming-2"),
        municipal_hospital: institution("xinhua"),
        doctor_id: "doc-44552".into(),
        doctor_name: "Shi Jianguo".into(),
        since: date("2024-12-03"),
    }
}

pub fn new_referral(actor_n: u8) -> Referral {
    Referral::create(
        &actor(actor_n),
        &editor("chc-jianshe", 1_000),
        &NewReferral {
            patient: doc_id(1),
            direction: Direction::Up,
            to: institution("xinhua"),
            reason: "chest pain on exertion".into(),
            urgency: Urgency::Priority,
            handover: "ECG attached; aspirin given".into(),
        },
    )
    .expect("a valid referral is created")
}

/// A raw automerge copy of a document, for tests that need to write what the typed API refuses.
pub fn raw(bytes: &[u8]) -> automerge::AutoCommit {
    automerge::AutoCommit::load(bytes).expect("saved documents load")
}

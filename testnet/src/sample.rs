//! Typical documents for demos and benchmarks, shaped after the consortium's reference data
//! (demographics, contract, allergies, problems, encounters with 100-400 character notes, and
//! lab, imaging and ECG results).

use estuary_node::model::*;

pub fn institution(id: &str) -> InstitutionId {
    InstitutionId::new(id).expect("sample institution ids are valid")
}

pub fn date(text: &str) -> Date {
    Date::new(text).expect("sample dates are valid")
}

pub fn icd(code: &str) -> Icd10 {
    Icd10::new(code).expect("sample codes are valid")
}

pub fn editor(id: &str, at: i64) -> Editor {
    Editor {
        institution: institution(id),
        at: Timestamp(at),
    }
}

pub const CENTRE: &str = "chc-jianshe";
pub const HOSPITAL: &str = "xinhua";
pub const DISTRICT: &str = "dh-chongming-2";

/// 2026-11-23 08:00 +08:00, in milliseconds since the epoch.
pub const MORNING_MS: i64 = 1_795_392_000_000;

pub fn demographics() -> Demographics {
    Demographics {
        name: PersonName {
            family: "Lu".into(),
            given: "Jianguo".into(),
            text: Some("陆建国".into()),
        },
        sex: Sex::Male,
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

pub fn contract() -> FamilyDoctorContract {
    FamilyDoctorContract {
        community_centre: institution(CENTRE),
        district_hospital: institution(DISTRICT),
        municipal_hospital: institution(HOSPITAL),
        doctor_id: "doc-44552".into(),
        doctor_name: "Shi Jianguo".into(),
        since: date("2024-12-03"),
    }
}

const NOTE_SENTENCES: [&str; 6] = [
    "No chest pain, dyspnoea or palpitations reported.",
    "Reports dizziness when standing; orthostatic BP measured.",
    "Advised low-salt diet and daily walking.",
    "Foot examination normal; monofilament intact.",
    "Lungs clear on auscultation.",
    "Follow-up in four weeks at the community centre.",
];

/// A note of 100-400 characters, varying with `n`.
pub fn note(n: usize) -> String {
    let mut note = String::new();
    let mut i = n;
    while note.len() < 100 + (n * 37) % 300 {
        note.push_str(NOTE_SENTENCES[i % NOTE_SENTENCES.len()]);
        note.push(' ');
        i += 1;
    }
    note.truncate(400);
    note
}

/// The operations that turn a new file into a typical one: contract, 3 allergies, 5 problems,
/// 10 encounters with notes and 20 exam results, each one change by the institution that
/// would write it.
pub fn typical_file_ops() -> Vec<(Editor, HealthFileOp)> {
    let mut ops = vec![(
        editor(CENTRE, MORNING_MS),
        HealthFileOp::SetContract(contract()),
    )];
    for (substance, reaction, severity) in [
        ("penicillin", "urticaria", Severity::Severe),
        ("iodine contrast", "rash", Severity::Moderate),
        ("pollen", "rhinitis", Severity::Mild),
    ] {
        ops.push((
            editor(CENTRE, MORNING_MS),
            HealthFileOp::AddAllergy(NewAllergy {
                substance: substance.into(),
                reaction: reaction.into(),
                severity,
            }),
        ));
    }
    for (code, display, onset) in [
        ("I10", "Essential (primary) hypertension", "2012-03-02"),
        (
            "E11.9",
            "Type 2 diabetes mellitus without complications",
            "2019-10-25",
        ),
        ("E78.5", "Hyperlipidaemia, unspecified", "2001-07-21"),
        ("K21.9", "Gastro-oesophageal reflux disease", "2016-10-22"),
        ("M17.9", "Gonarthrosis, unspecified", "2020-05-14"),
    ] {
        ops.push((
            editor(CENTRE, MORNING_MS),
            HealthFileOp::AddProblem(NewProblem {
                icd10: icd(code),
                display: display.into(),
                onset: Some(date(onset)),
                status: ProblemStatus::Active,
            }),
        ));
    }
    let kinds = [
        EncounterKind::FamilyDoctorVisit,
        EncounterKind::FollowUp,
        EncounterKind::Outpatient,
    ];
    for n in 0..10 {
        let at = if n % 3 == 0 { HOSPITAL } else { CENTRE };
        ops.push((
            editor(at, MORNING_MS + n as i64),
            HealthFileOp::AddEncounter(NewEncounter {
                time: Timestamp(MORNING_MS - (n as i64) * 86_400_000 * 30),
                kind: kinds[n % kinds.len()],
                diagnoses: vec![Diagnosis {
                    icd10: icd("I10"),
                    display: "Essential (primary) hypertension".into(),
                }],
                note: note(n),
            }),
        ));
    }
    for n in 0..20 {
        let result = match n % 4 {
            0 => NewExamResult {
                kind: ExamKind::Ecg,
                time: Timestamp(MORNING_MS - n * 86_400_000 * 20),
                name: "12-lead ECG".into(),
                measurements: ["heart_rate", "pr_ms", "qrs_ms", "qtc_ms"]
                    .iter()
                    .zip([72.0, 163.0, 88.0, 402.0])
                    .map(|(name, value)| Measurement {
                        name: (*name).into(),
                        value,
                        unit: None,
                    })
                    .collect(),
                report: Some("sinus rhythm".into()),
            },
            1 => NewExamResult {
                kind: ExamKind::Imaging,
                time: Timestamp(MORNING_MS - n * 86_400_000 * 20),
                name: "chest X-ray".into(),
                measurements: vec![],
                report: Some("no acute cardiopulmonary abnormality".into()),
            },
            _ => NewExamResult {
                kind: ExamKind::Lab,
                time: Timestamp(MORNING_MS - n * 86_400_000 * 20),
                name: "fasting glucose".into(),
                measurements: vec![Measurement {
                    name: "glucose".into(),
                    value: 6.2,
                    unit: Some("mmol/L".into()),
                }],
                report: None,
            },
        };
        ops.push((
            editor(HOSPITAL, MORNING_MS + n),
            HealthFileOp::AddExamResult(result),
        ));
    }
    ops
}

pub fn referral_request(patient: DocumentId) -> NewReferral {
    NewReferral {
        patient,
        direction: Direction::Up,
        to: institution(HOSPITAL),
        reason: "exertional chest pain, suspected unstable angina".into(),
        urgency: Urgency::Priority,
        handover: "ECG today: ST depression V4-V6. Aspirin 300 mg given. BP 150/95.".into(),
    }
}

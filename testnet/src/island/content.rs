//! What the planned actions write: residents' demographics and clinical entries, generated from
//! the seed and the resident's number, so a replay writes the same content.

use std::sync::atomic::{AtomicBool, Ordering};

use estuary_node::model::*;

use super::plan::Rng;

/// Canary values: marked text in names, phone numbers, national ids, encounter notes and
/// referral reasons, which no log, error, metric or report may ever contain. The canary test
/// searches for them, in any case and hex-encoded.
pub const CANARIES: [&str; 5] = [
    "QXNAMECANARY",
    "QXPHONECANARY",
    "QXNATIDCANARY",
    "QXNOTECANARY",
    "QXREASONCANARY",
];

/// Whether the workload writes canary values (the demo's `--canary`).
static CANARY: AtomicBool = AtomicBool::new(false);

/// Makes the workload write canary values from now on.
pub fn use_canaries() {
    CANARY.store(true, Ordering::Relaxed);
}

/// Whether the workload writes canary values.
pub fn canaries_on() -> bool {
    CANARY.load(Ordering::Relaxed)
}

fn canary() -> bool {
    canaries_on()
}

const FAMILY: [&str; 16] = [
    "Lu", "Zhang", "Wang", "Li", "Chen", "Shi", "Huang", "Zhou", "Wu", "Xu", "Sun", "Ma", "Zhu",
    "Hu", "Guo", "He",
];
const GIVEN: [&str; 16] = [
    "Jianguo", "Xiuying", "Guifang", "Weimin", "Lihua", "Jun", "Hong", "Min", "Jing", "Qiang",
    "Yan", "Ping", "Lei", "Fang", "Hui", "Gang",
];
const ALLERGENS: [(&str, &str); 5] = [
    ("penicillin", "urticaria"),
    ("aspirin", "bronchospasm"),
    ("sulfonamides", "rash"),
    ("iodinated contrast", "flushing"),
    ("peanuts", "angioedema"),
];
const EXAMS: [(ExamKind, &str, &str, f64, &str); 4] = [
    (ExamKind::Lab, "fasting glucose", "glucose", 6.8, "mmol/L"),
    (ExamKind::Lab, "renal panel", "creatinine", 88.0, "µmol/L"),
    (ExamKind::Ecg, "12-lead ECG", "qtc", 432.0, "ms"),
    (ExamKind::Imaging, "chest X-ray", "ctr", 0.48, "ratio"),
];

/// A resident's random draws: the same for the same seed and resident.
fn rng(seed: u64, resident: u32, what: u64) -> Rng {
    Rng::new(seed ^ (u64::from(resident) << 20) ^ what.wrapping_mul(0x9E37_79B9))
}

/// Demographics of resident `resident`.
pub fn demographics(seed: u64, resident: u32) -> Demographics {
    let mut rng = rng(seed, resident, 1);
    let year = 1930 + rng.below(70);
    let month = 1 + rng.below(12);
    let day = 1 + rng.below(28);
    let family = if canary() {
        CANARIES[0].to_owned()
    } else {
        (*rng.pick(&FAMILY)).to_owned()
    };
    Demographics {
        name: PersonName {
            family,
            // The resident's number keeps names apart (and creation changes distinct).
            given: format!("{} {resident}", rng.pick(&GIVEN)),
            text: None,
        },
        sex: if rng.chance(50) {
            Sex::Female
        } else {
            Sex::Male
        },
        birth_date: Date::new(format!("{year:04}-{month:02}-{day:02}")).expect("a valid date"),
        phone: Some(if canary() {
            format!("+86 {} {}", CANARIES[1], rng.below(100_000_000))
        } else {
            format!("+86 139{:08}", rng.below(100_000_000))
        }),
        address: None,
        national_id: Some(if canary() {
            format!("{}{resident:06}", CANARIES[2])
        } else {
            format!("310230{year:04}{month:02}{day:02}{:04}", resident % 10_000)
        }),
        insurance: None,
    }
}

/// A new phone number, variant `variant`.
pub fn phone(seed: u64, resident: u32, variant: u32) -> HealthFileOp {
    let mut rng = rng(seed, resident, 2 + u64::from(variant));
    let number = rng.below(100_000_000);
    HealthFileOp::SetDemographic(DemographicField::Phone(if canary() {
        format!("+86 {} {number:08}", CANARIES[1])
    } else {
        format!("+86 138{number:08}")
    }))
}

pub fn encounter(seed: u64, resident: u32, at_ms: i64) -> HealthFileOp {
    let mut rng = rng(seed, resident, 3 + at_ms as u64);
    HealthFileOp::AddEncounter(NewEncounter {
        time: Timestamp(at_ms),
        kind: if rng.chance(50) {
            EncounterKind::Outpatient
        } else {
            EncounterKind::FollowUp
        },
        // Hospital EMRs code in the national clinical edition; the rest in WHO ICD-10.
        diagnoses: vec![if rng.chance(50) {
            Diagnosis {
                icd10: Icd10::in_system(Icd10System::CnClinical, "I10.x00x002")
                    .expect("a valid code"),
                display: "高血压1级".into(),
            }
        } else {
            Diagnosis {
                icd10: Icd10::new("I10").expect("a valid code"),
                display: "Essential hypertension".into(),
            }
        }],
        note: if canary() {
            format!("{} BP reviewed; continue current treatment.", CANARIES[3])
        } else {
            "BP reviewed; continue current treatment; lifestyle advice given.".into()
        },
    })
}

pub fn follow_up(seed: u64, resident: u32, at_ms: i64) -> HealthFileOp {
    let mut rng = rng(seed, resident, 4 + at_ms as u64);
    HealthFileOp::AddFollowUp(NewFollowUp {
        time: Timestamp(at_ms),
        systolic_mmhg: Some(120 + rng.below(50)),
        diastolic_mmhg: Some(70 + rng.below(30)),
        glucose_mmol_per_l: Some(5.0 + rng.below(40) as f64 / 10.0),
    })
}

pub fn exam_result(seed: u64, resident: u32, at_ms: i64) -> HealthFileOp {
    let mut rng = rng(seed, resident, 5 + at_ms as u64);
    let (kind, name, measured, value, unit) = *rng.pick(&EXAMS);
    HealthFileOp::AddExamResult(NewExamResult {
        kind,
        time: Timestamp(at_ms),
        name: name.into(),
        measurements: vec![Measurement {
            name: measured.into(),
            value,
            unit: Some(unit.into()),
        }],
        report: None,
    })
}

pub fn allergy(seed: u64, resident: u32) -> HealthFileOp {
    let mut rng = rng(seed, resident, 6);
    let (substance, reaction) = *rng.pick(&ALLERGENS);
    HealthFileOp::AddAllergy(NewAllergy {
        substance: substance.into(),
        reaction: reaction.into(),
        severity: Severity::Moderate,
    })
}

pub fn referral(patient: DocumentId, to: &str, up: bool, priority: bool) -> NewReferral {
    NewReferral {
        patient,
        direction: if up { Direction::Up } else { Direction::Down },
        to: InstitutionId::new(to).expect("member ids are valid"),
        reason: if canary() {
            format!("{} specialist review", CANARIES[4])
        } else if up {
            "poorly controlled hypertension; specialist review".into()
        } else {
            "recovery and follow-up at the home centre".into()
        },
        urgency: if priority {
            Urgency::Priority
        } else {
            Urgency::Routine
        },
        handover: "Current medication and latest results in the file.".into(),
    }
}

/// Writes full of canary values that every node must refuse (each past a length limit), to
/// drive the error paths in the canary test: (what, the write's operation on a file).
pub fn canary_probes() -> Vec<(&'static str, HealthFileOp)> {
    let long = |canary: &str, bytes: usize| canary.repeat(bytes / canary.len() + 1);
    vec![
        (
            "phone past its limit",
            HealthFileOp::SetDemographic(DemographicField::Phone(long(CANARIES[1], 600))),
        ),
        (
            "national id past its limit",
            HealthFileOp::SetDemographic(DemographicField::NationalId(long(CANARIES[2], 600))),
        ),
        (
            "encounter note past its limit",
            HealthFileOp::AddEncounter(NewEncounter {
                time: Timestamp(0),
                kind: EncounterKind::Outpatient,
                diagnoses: vec![],
                note: long(CANARIES[3], 20 * 1024),
            }),
        ),
    ]
}

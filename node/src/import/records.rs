//! Records in the shape of the consortium's health-file data set (`shared/peers/gen.js`), one
//! resident per NDJSON line, and how they become a health file: the demographics, then one
//! operation per contract and per entry (allergy, problem, prescription, encounter, exam),
//! each at the time the record gives it.
//!
//! Entries are recorded by the loading institution (the model records entries only in their
//! writer's name); the institution a record names for an encounter or an exam is kept in
//! the record's text, not in the file.
#![allow(missing_docs)] // The fields are the data set's own, named as it names them.

use serde::{Deserialize, Serialize};

use super::{RecordError, ResidentRecords};
use crate::model::{
    Address, Date, Demographics, Diagnosis, EncounterKind, ExamKind, FamilyDoctorContract,
    HealthFileOp, Icd10, Icd10System, InstitutionId, Insurance, Measurement, NewAllergy,
    NewEncounter, NewExamResult, NewMedication, NewProblem, PersonName, ProblemStatus, Severity,
    Sex, Timestamp, ValidationError,
};

/// One resident's health file as the data set writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileRecord {
    pub id: String,
    pub demographics: RecordDemographics,
    pub family_doctor_contract: RecordContract,
    pub allergies: Vec<RecordAllergy>,
    pub problems: Vec<RecordProblem>,
    pub medications: Vec<RecordMedication>,
    pub encounters: Vec<RecordEncounter>,
    pub exams: Vec<RecordExam>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordName {
    pub family: String,
    pub given: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordAddress {
    pub line: String,
    pub town: String,
    pub district: String,
    pub city: String,
    pub postal_code: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordInsurance {
    pub scheme: String,
    pub number: String,
    pub valid_until: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordDemographics {
    pub name: RecordName,
    pub sex: String,
    pub birth_date: String,
    pub phone: String,
    pub address: RecordAddress,
    pub national_id: String,
    pub insurance: RecordInsurance,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordDoctor {
    pub id: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordContract {
    pub community_centre: String,
    pub district_hospital: String,
    pub municipal_hospital: String,
    pub doctor: RecordDoctor,
    pub since: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordAllergy {
    pub substance: String,
    pub reaction: String,
    pub severity: String,
    pub recorded: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordProblem {
    pub icd10: String,
    /// The code's system when it is not WHO ICD-10 (`icd-10-cn-clinical`, …).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "icd10System"
    )]
    pub icd10_system: Option<String>,
    pub display: String,
    pub onset: String,
    pub status: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordMedication {
    pub drug: String,
    pub dose: String,
    pub frequency: String,
    pub start: String,
    pub days: u64,
    pub prescriber: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordDiagnosis {
    pub icd10: String,
    /// The code's system when it is not WHO ICD-10 (`icd-10-cn-clinical`, …).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "icd10System"
    )]
    pub icd10_system: Option<String>,
    pub display: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordEncounter {
    pub id: String,
    pub institution: String,
    pub time: String,
    pub kind: String,
    pub diagnoses: Vec<RecordDiagnosis>,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordEcg {
    pub heart_rate: u64,
    pub pr_ms: u64,
    pub qrs_ms: u64,
    pub qtc_ms: u64,
}

/// An exam: a lab value, an imaging finding or an ECG (fields in the order `gen.js` writes
/// them, so the JSON made here is byte for byte the JSON `gen.js` prints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordExam {
    pub id: String,
    pub kind: String,
    pub institution: String,
    pub time: String,
    pub name: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "js_number"
    )]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<RecordEcg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rhythm: Option<String>,
}

/// A number as JavaScript prints it: whole numbers without a fraction.
fn js_number<S: serde::Serializer>(value: &Option<f64>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => serializer.serialize_i64(*v as i64),
        Some(v) => serializer.serialize_f64(*v),
        None => serializer.serialize_none(),
    }
}

/// Milliseconds since the epoch of `YYYY-MM-DD` (midnight, UTC+8, the island's time) or of
/// `YYYY-MM-DDTHH:MM:SS+08:00`.
fn millis(field: &'static str, text: &str) -> Result<Timestamp, RecordError> {
    let bad = || RecordError::Field {
        field,
        reason: "not a date (YYYY-MM-DD) or a time (YYYY-MM-DDTHH:MM:SS+08:00)".into(),
    };
    if !(text.len() == 10 || (text.len() == 25 && text.ends_with("+08:00"))) {
        return Err(bad());
    }
    let number = |range: std::ops::Range<usize>| -> Result<i64, RecordError> {
        text.get(range)
            .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = if text.len() > 10 {
        (number(11..13)?, number(14..16)?, number(17..19)?)
    } else {
        (0, 0, 0)
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    let days = super::days_from_civil(year, month, day);
    let local = ((days * 24 + hour) * 60 + minute) * 60 + second;
    Ok(Timestamp((local - 8 * 3_600) * 1_000))
}

/// A model value's own check, named by the record's field. `ValidationError` names rules,
/// never values.
fn checked<T>(field: &'static str, value: Result<T, ValidationError>) -> Result<T, RecordError> {
    value.map_err(|error| RecordError::Field {
        field,
        reason: error.to_string(),
    })
}

fn date(field: &'static str, text: &str) -> Result<Date, RecordError> {
    checked(field, Date::new(text))
}

fn icd10(field: &'static str, code: &str, system: Option<&str>) -> Result<Icd10, RecordError> {
    match system {
        None => checked(field, Icd10::new(code)),
        Some(system) => {
            let system = checked(field, Icd10System::parse(system, field))?;
            checked(field, Icd10::in_system(system, code))
        }
    }
}

fn vocabulary<T>(
    field: &'static str,
    parse: fn(&str, &'static str) -> Result<T, ValidationError>,
    text: &str,
) -> Result<T, RecordError> {
    checked(field, parse(text, field))
}

/// An institution id from a name: lower case, runs of other characters as one '-'.
pub fn institution_id(field: &'static str, name: &str) -> Result<InstitutionId, RecordError> {
    let mut id = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            id.push(c.to_ascii_lowercase());
        } else if !id.ends_with('-') && !id.is_empty() {
            id.push('-');
        }
    }
    checked(field, InstitutionId::new(id.trim_end_matches('-')))
}

impl FileRecord {
    /// The record as the health file it makes: its demographics and its records, in order.
    pub fn resident(&self) -> Result<ResidentRecords, RecordError> {
        let d = &self.demographics;
        let demographics = Demographics {
            name: PersonName {
                family: d.name.family.clone(),
                given: d.name.given.clone(),
                text: Some(d.name.text.clone()),
            },
            sex: vocabulary("demographics.sex", Sex::parse, &d.sex)?,
            birth_date: date("demographics.birthDate", &d.birth_date)?,
            phone: Some(d.phone.clone()),
            address: Some(Address {
                line: d.address.line.clone(),
                town: Some(d.address.town.clone()),
                district: Some(d.address.district.clone()),
                city: Some(d.address.city.clone()),
                postal_code: Some(d.address.postal_code.clone()),
            }),
            national_id: Some(d.national_id.clone()),
            insurance: Some(Insurance {
                scheme: d.insurance.scheme.clone(),
                number: d.insurance.number.clone(),
                valid_until: Some(date(
                    "demographics.insurance.validUntil",
                    &d.insurance.valid_until,
                )?),
            }),
        };
        let c = &self.family_doctor_contract;
        let created_at = millis("familyDoctorContract.since", &c.since)?;
        let mut records = vec![(
            created_at,
            HealthFileOp::SetContract(FamilyDoctorContract {
                community_centre: institution_id(
                    "familyDoctorContract.communityCentre",
                    &c.community_centre,
                )?,
                district_hospital: institution_id(
                    "familyDoctorContract.districtHospital",
                    &c.district_hospital,
                )?,
                municipal_hospital: institution_id(
                    "familyDoctorContract.municipalHospital",
                    &c.municipal_hospital,
                )?,
                doctor_id: c.doctor.id.clone(),
                doctor_name: c.doctor.name.clone(),
                since: date("familyDoctorContract.since", &c.since)?,
            }),
        )];
        for a in &self.allergies {
            records.push((
                millis("allergies.recorded", &a.recorded)?,
                HealthFileOp::AddAllergy(NewAllergy {
                    substance: a.substance.clone(),
                    reaction: a.reaction.clone(),
                    severity: vocabulary("allergies.severity", Severity::parse, &a.severity)?,
                }),
            ));
        }
        for p in &self.problems {
            records.push((
                millis("problems.onset", &p.onset)?,
                HealthFileOp::AddProblem(NewProblem {
                    icd10: icd10("problems.icd10", &p.icd10, p.icd10_system.as_deref())?,
                    display: p.display.clone(),
                    onset: Some(date("problems.onset", &p.onset)?),
                    status: vocabulary("problems.status", ProblemStatus::parse, &p.status)?,
                }),
            ));
        }
        for m in &self.medications {
            records.push((
                millis("medications.start", &m.start)?,
                HealthFileOp::AddMedication(NewMedication {
                    drug: m.drug.clone(),
                    dose: m.dose.clone(),
                    frequency: m.frequency.clone(),
                    start: date("medications.start", &m.start)?,
                    days: m.days,
                }),
            ));
        }
        for e in &self.encounters {
            let encounter = e.to_new()?;
            records.push((encounter.time, HealthFileOp::AddEncounter(encounter)));
        }
        for x in &self.exams {
            let time = millis("exams.time", &x.time)?;
            let measurements = match (&x.value, &x.values) {
                (Some(value), _) => vec![Measurement {
                    name: x.name.clone(),
                    value: *value,
                    unit: x.unit.clone(),
                }],
                (None, Some(ecg)) => [
                    ("heart rate", ecg.heart_rate, "/min"),
                    ("PR interval", ecg.pr_ms, "ms"),
                    ("QRS duration", ecg.qrs_ms, "ms"),
                    ("QTc interval", ecg.qtc_ms, "ms"),
                ]
                .into_iter()
                .map(|(name, value, unit)| Measurement {
                    name: name.into(),
                    value: value as f64,
                    unit: Some(unit.into()),
                })
                .collect(),
                (None, None) => Vec::new(),
            };
            records.push((
                time,
                HealthFileOp::AddExamResult(NewExamResult {
                    kind: vocabulary("exams.kind", ExamKind::parse, &x.kind)?,
                    time,
                    name: x.name.clone(),
                    measurements,
                    report: x.finding.clone().or_else(|| x.rhythm.clone()),
                }),
            ));
        }
        Ok(ResidentRecords {
            demographics,
            created_at,
            records,
        })
    }
}

impl RecordEncounter {
    /// The encounter as an app records it.
    pub fn to_new(&self) -> Result<NewEncounter, RecordError> {
        Ok(NewEncounter {
            time: millis("encounters.time", &self.time)?,
            kind: vocabulary("encounters.kind", EncounterKind::parse, &self.kind)?,
            diagnoses: self
                .diagnoses
                .iter()
                .map(|d| {
                    Ok(Diagnosis {
                        icd10: icd10(
                            "encounters.diagnoses.icd10",
                            &d.icd10,
                            d.icd10_system.as_deref(),
                        )?,
                        display: d.display.clone(),
                    })
                })
                .collect::<Result<_, RecordError>>()?,
            note: self.note.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_the_data_set_are_read_in_china_standard_time() {
        let at = |text| millis("time", text);
        assert_eq!(at("1970-01-01T08:00:00+08:00"), Ok(Timestamp(0)));
        assert_eq!(
            at("2015-04-28T19:51:00+08:00"),
            Ok(Timestamp(1_430_221_860_000))
        );
        assert_eq!(at("2024-12-03"), Ok(Timestamp(1_733_155_200_000)));
        for bad in [
            "2024-13-03",
            "2024-12-3",
            "2015-04-28T19:51:00Z",
            "２024-12-03",
            "",
        ] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }
}

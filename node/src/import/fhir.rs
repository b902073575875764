//! A FHIR R4 `transaction` Bundle as residents' records: each Patient becomes a health file,
//! and the AllergyIntolerances, Conditions, MedicationRequests, Encounters and Observations
//! that name it (by the Patient entry's `fullUrl`, or `Patient/<id>`) become its records, in
//! Bundle order. The mapping is the inverse of what the node's own FHIR reads serve:
//!
//! | resource | becomes |
//! |---|---|
//! | Patient | the demographics: official (else first) name, gender, birthDate, the first phone, the first address, the national id (`identifier` of system `urn:estuary:national-id`) |
//! | AllergyIntolerance | an allergy: `code` text (or first coding's display), the first reaction's manifestation and severity; SNOMED 716186003 records "no known allergies" |
//! | Condition | a problem: the ICD-10 coding (WHO `http://hl7.org/fhir/sid/icd-10`, or a national edition's `urn:estuary:code-system:…`), onset, clinical status (active, recurrence, relapse: active; inactive, remission, resolved: resolved) |
//! | MedicationRequest | a prescription: medication text, dose (`doseQuantity`, else the dosage text), frequency (`timing.code` text, else the dosage text), start and days (`dispenseRequest`: `validityPeriod` or `expectedSupplyDuration`) |
//! | Encounter | an encounter: `period.start`, `class` (AMB outpatient, IMP/ACUTE/NONAC inpatient, EMER emergency, HH home visit), ICD-10 `reasonCode`s as its diagnoses |
//! | Observation | laboratory, imaging and procedure (ECG) results as exam results (`valueQuantity` or `component`s as measurements, `valueString` as the report); vital signs of blood pressure (LOINC 85354-9, 8480-6, 8462-4) and blood glucose (15074-8) as follow-ups |
//!
//! Anything the model could not keep faithfully is refused with the entry's place and a
//! reason rather than loaded half: a refuted or entered-in-error record, an allergy without
//! a reaction or a severity, other vital signs, other resource types, entries that do not
//! create (`request.method` other than POST). A transaction is all or nothing.

use std::collections::HashMap;

use serde_json::Value;

use super::ResidentRecords;
use crate::model::{
    Address, Date, Demographics, Diagnosis, EncounterKind, ExamKind, HealthFileOp, Icd10,
    Icd10System, Measurement, NewAllergy, NewEncounter, NewExamResult, NewFollowUp, NewMedication,
    NewProblem, PersonName, ProblemStatus, Severity, Sex, Timestamp,
};

/// Most entries in one Bundle: a chunk of a member's load, as `estuary import` sends it.
pub const BUNDLE_ENTRIES_MAX: usize = 50_000;
/// Identifier system of residents' national id numbers (as the node's FHIR reads write it).
const NATIONAL_ID_SYSTEM: &str = "urn:estuary:national-id";
/// SNOMED CT.
const SNOMED_SYSTEM: &str = "http://snomed.info/sct";
/// SNOMED CT 716186003 |No known allergy (situation)|.
const NO_KNOWN_ALLERGY_SNOMED: &str = "716186003";
const LOINC_SYSTEM: &str = "http://loinc.org";
/// LOINC codes of the follow-up measurements.
const BLOOD_PRESSURE_PANEL: &str = "85354-9";
const SYSTOLIC: &str = "8480-6";
const DIASTOLIC: &str = "8462-4";
const GLUCOSE: &str = "15074-8";

/// Why a Bundle was refused: the entry (from 0) and its resource type, and the reason, which
/// names elements and rules, never values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", match entry { Some(i) => format!("entry {i} ({resource}): "), None => String::new() })]
pub struct BundleError {
    /// The entry, when one is at fault.
    pub entry: Option<usize>,
    /// Its resource type.
    pub resource: String,
    /// Why.
    pub reason: String,
}

impl BundleError {
    fn bundle(reason: impl Into<String>) -> Self {
        Self {
            entry: None,
            resource: String::new(),
            reason: reason.into(),
        }
    }
}

/// Why one resource cannot be read, before its entry is known.
type Refused = String;

/// The residents of a transaction Bundle, each with the index of its Patient entry, in Bundle
/// order. `now` is the time of records that do not say when they were recorded.
pub fn residents_from_bundle(
    bundle: &Value,
    now: Timestamp,
) -> Result<Vec<(usize, ResidentRecords)>, BundleError> {
    if bundle["resourceType"] != "Bundle" || bundle["type"] != "transaction" {
        return Err(BundleError::bundle(
            "the body must be a FHIR Bundle of type transaction",
        ));
    }
    let entries = match &bundle["entry"] {
        Value::Array(entries) => entries.as_slice(),
        Value::Null => &[],
        _ => return Err(BundleError::bundle("Bundle.entry must be an array")),
    };
    if entries.len() > BUNDLE_ENTRIES_MAX {
        return Err(BundleError::bundle(format!(
            "at most {BUNDLE_ENTRIES_MAX} entries per Bundle; send the rest in further Bundles"
        )));
    }
    let mut residents: Vec<(usize, ResidentRecords)> = Vec::new();
    let mut patients: HashMap<String, usize> = HashMap::new();
    // Patients first, so that a record may come before its Patient.
    for (index, entry) in entries.iter().enumerate() {
        let resource = &entry["resource"];
        let at = |reason: Refused| BundleError {
            entry: Some(index),
            resource: resource["resourceType"]
                .as_str()
                .unwrap_or("?")
                .chars()
                .take(64)
                .collect(),
            reason,
        };
        if entry["request"]["method"] != "POST" {
            return Err(at(
                "only entries that create (request.method POST) are loaded".into(),
            ));
        }
        if resource["resourceType"] != "Patient" {
            continue;
        }
        let demographics = patient(resource).map_err(at)?;
        for name in [
            entry["fullUrl"].as_str().map(str::to_owned),
            resource["id"].as_str().map(|id| format!("Patient/{id}")),
        ]
        .into_iter()
        .flatten()
        {
            if patients.insert(name, residents.len()).is_some() {
                return Err(at("two Patient entries share a fullUrl or id".into()));
            }
        }
        residents.push((
            index,
            ResidentRecords {
                demographics,
                created_at: now,
                records: Vec::new(),
            },
        ));
    }
    for (index, entry) in entries.iter().enumerate() {
        let resource = &entry["resource"];
        let kind = resource["resourceType"].as_str().unwrap_or("?");
        if kind == "Patient" {
            continue;
        }
        let at = |reason: Refused| BundleError {
            entry: Some(index),
            resource: kind.chars().take(64).collect(),
            reason,
        };
        let subject = match kind {
            "AllergyIntolerance" => &resource["patient"]["reference"],
            _ => &resource["subject"]["reference"],
        };
        let record = match kind {
            "AllergyIntolerance" => allergy(resource, now),
            "Condition" => condition(resource, now),
            "MedicationRequest" => medication(resource, now),
            "Encounter" => encounter(resource),
            "Observation" => observation(resource),
            _ => Err(
                "only Patient, AllergyIntolerance, Condition, MedicationRequest, Encounter and Observation are loaded"
                    .into(),
            ),
        }
        .map_err(at)?;
        let Some(&resident) = subject.as_str().and_then(|s| patients.get(s)) else {
            return Err(at(
                "its patient or subject must reference a Patient entry of this Bundle (by fullUrl or Patient/<id>)".into(),
            ));
        };
        residents[resident].1.records.push(record);
    }
    for (_, resident) in &mut residents {
        if let Some(first) = resident.records.iter().map(|(at, _)| *at).min() {
            resident.created_at = resident.created_at.min(first);
        }
    }
    Ok(residents)
}

fn text<'v>(value: &'v Value, element: &str) -> Result<&'v str, Refused> {
    value
        .as_str()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| format!("{element} is required"))
}

/// A CodeableConcept's text, else its first coding's display.
fn concept_text<'v>(concept: &'v Value, element: &str) -> Result<&'v str, Refused> {
    concept["text"]
        .as_str()
        .or_else(|| concept["coding"][0]["display"].as_str())
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| format!("{element} needs a text or a coding with a display"))
}

/// Whether a CodeableConcept holds the coding `system|code`.
fn has_coding(concept: &Value, system: &str, code: &str) -> bool {
    concept["coding"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["system"] == system && c["code"] == code))
}

/// The first coding's code of a CodeableConcept.
fn first_code(concept: &Value) -> Option<&str> {
    concept["coding"][0]["code"].as_str()
}

fn date(value: &Value, element: &str) -> Result<Date, Refused> {
    let text = text(value, element)?;
    Date::new(text.get(..10).unwrap_or(text)).map_err(|e| format!("{element}: {e}"))
}

/// A FHIR date or dateTime as milliseconds since the epoch. A date alone is midnight on the
/// island (UTC+8); a time without a zone is refused, as FHIR requires one.
fn instant(value: &Value, element: &str) -> Result<Timestamp, Refused> {
    let text = text(value, element)?;
    let bad = || {
        format!(
            "{element} is not a FHIR date (YYYY-MM-DD) or dateTime with its zone (YYYY-MM-DDThh:mm:ss+08:00)"
        )
    };
    let digits = |range: std::ops::Range<usize>| -> Result<i64, Refused> {
        text.get(range)
            .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let (seconds, offset) = if text.len() == 10 {
        (0, 8 * 3_600)
    } else {
        if text.as_bytes().get(10) != Some(&b'T') {
            return Err(bad());
        }
        let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        if hour > 23 || minute > 59 || second > 60 {
            return Err(bad());
        }
        // Fractional seconds are dropped: records are kept to the second.
        let rest = text[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
        let offset = match rest {
            "Z" => 0,
            zone if zone.len() == 6 && (zone.starts_with('+') || zone.starts_with('-')) => {
                let sign = if zone.starts_with('-') { -1 } else { 1 };
                let hours: i64 = zone[1..3].parse().map_err(|_| bad())?;
                let minutes: i64 = zone[4..6].parse().map_err(|_| bad())?;
                sign * (hours * 3_600 + minutes * 60)
            }
            _ => return Err(bad()),
        };
        ((hour * 60 + minute) * 60 + second, offset)
    };
    let days = super::days_from_civil(year, month, day);
    Ok(Timestamp((days * 86_400 + seconds - offset) * 1_000))
}

/// `instant`, or `now` when the element is absent.
fn instant_or(value: &Value, element: &str, now: Timestamp) -> Result<Timestamp, Refused> {
    if value.is_null() {
        Ok(now)
    } else {
        instant(value, element)
    }
}

fn patient(resource: &Value) -> Result<Demographics, Refused> {
    let names = resource["name"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let name = names
        .iter()
        .find(|n| n["use"] == "official")
        .or(names.first())
        .ok_or("Patient.name is required")?;
    let given: Vec<&str> = name["given"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if given.is_empty() {
        return Err("Patient.name.given is required".into());
    }
    let sex = Sex::parse(
        text(&resource["gender"], "Patient.gender")?,
        "Patient.gender",
    )
    .map_err(|e| e.to_string())?;
    let phone = resource["telecom"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["system"] == "phone"))
        .and_then(|t| t["value"].as_str())
        .map(str::to_owned);
    let address = match &resource["address"][0] {
        Value::Null => None,
        a => Some(Address {
            line: text(&a["line"][0], "Patient.address.line")?.to_owned(),
            town: None,
            district: a["district"].as_str().map(str::to_owned),
            city: a["city"].as_str().map(str::to_owned),
            postal_code: a["postalCode"].as_str().map(str::to_owned),
        }),
    };
    let national_id = resource["identifier"]
        .as_array()
        .and_then(|ids| ids.iter().find(|i| i["system"] == NATIONAL_ID_SYSTEM))
        .and_then(|i| i["value"].as_str())
        .map(str::to_owned);
    Ok(Demographics {
        name: PersonName {
            family: text(&name["family"], "Patient.name.family")?.to_owned(),
            given: given.join(" "),
            text: name["text"].as_str().map(str::to_owned),
        },
        sex,
        birth_date: date(&resource["birthDate"], "Patient.birthDate")?,
        phone,
        address,
        national_id,
        insurance: None,
    })
}

/// Refuses a record its source marked wrong: it is not loaded as if it stood.
fn refuse_withdrawn(status: Option<&str>, element: &str) -> Result<(), Refused> {
    match status {
        Some(status @ ("refuted" | "entered-in-error")) => Err(format!(
            "a record whose {element} is {status} is not loaded; leave it out of the Bundle"
        )),
        _ => Ok(()),
    }
}

fn allergy(resource: &Value, now: Timestamp) -> Result<(Timestamp, HealthFileOp), Refused> {
    refuse_withdrawn(
        first_code(&resource["verificationStatus"]),
        "verificationStatus",
    )?;
    let at = instant_or(
        &resource["recordedDate"],
        "AllergyIntolerance.recordedDate",
        now,
    )?;
    if has_coding(&resource["code"], SNOMED_SYSTEM, NO_KNOWN_ALLERGY_SNOMED) {
        return Ok((at, HealthFileOp::RecordNoKnownAllergies));
    }
    let reaction = &resource["reaction"][0];
    let severity = text(
        &reaction["severity"],
        "AllergyIntolerance.reaction.severity",
    )?;
    Ok((
        at,
        HealthFileOp::AddAllergy(NewAllergy {
            substance: concept_text(&resource["code"], "AllergyIntolerance.code")?.to_owned(),
            reaction: concept_text(
                &reaction["manifestation"][0],
                "AllergyIntolerance.reaction.manifestation",
            )?
            .to_owned(),
            severity: Severity::parse(severity, "AllergyIntolerance.reaction.severity")
                .map_err(|e| e.to_string())?,
        }),
    ))
}

/// The ICD-10 codings of a CodeableConcept, in any accepted system.
fn icd10_codings(concept: &Value) -> Result<Vec<(Icd10, String)>, Refused> {
    let mut found = Vec::new();
    for coding in concept["coding"].as_array().into_iter().flatten() {
        let Some(system) = Icd10System::ALL
            .into_iter()
            .find(|s| coding["system"].as_str() == Some(s.fhir_uri().as_str()))
        else {
            continue;
        };
        let code = Icd10::in_system(system, coding["code"].as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let display = coding["display"]
            .as_str()
            .or(concept["text"].as_str())
            .unwrap_or(code.as_str())
            .to_owned();
        found.push((code, display));
    }
    Ok(found)
}

fn condition(resource: &Value, now: Timestamp) -> Result<(Timestamp, HealthFileOp), Refused> {
    refuse_withdrawn(
        first_code(&resource["verificationStatus"]),
        "verificationStatus",
    )?;
    let (icd10, display) = icd10_codings(&resource["code"])?
        .into_iter()
        .next()
        .ok_or("Condition.code needs an ICD-10 coding (WHO or a national edition)")?;
    let status = match first_code(&resource["clinicalStatus"]) {
        None | Some("active" | "recurrence" | "relapse") => ProblemStatus::Active,
        Some("inactive" | "remission" | "resolved") => ProblemStatus::Resolved,
        Some(_) => return Err("Condition.clinicalStatus is not a FHIR clinical status".into()),
    };
    let onset = match &resource["onsetDateTime"] {
        Value::Null => None,
        onset => Some(date(onset, "Condition.onsetDateTime")?),
    };
    Ok((
        instant_or(&resource["recordedDate"], "Condition.recordedDate", now)?,
        HealthFileOp::AddProblem(NewProblem {
            icd10,
            display,
            onset,
            status,
        }),
    ))
}

fn medication(resource: &Value, now: Timestamp) -> Result<(Timestamp, HealthFileOp), Refused> {
    if matches!(
        resource["status"].as_str(),
        Some("entered-in-error" | "cancelled")
    ) {
        return Err("a MedicationRequest entered in error or cancelled is not loaded".into());
    }
    let dosage = &resource["dosageInstruction"][0];
    let dose_quantity = &dosage["doseAndRate"][0]["doseQuantity"];
    let dose = match (dose_quantity["value"].as_f64(), dosage["text"].as_str()) {
        (Some(value), _) => format!(
            "{value} {}",
            dose_quantity["unit"].as_str().unwrap_or_default()
        )
        .trim()
        .to_owned(),
        (None, Some(text)) => text.to_owned(),
        (None, None) => {
            return Err(
                "MedicationRequest.dosageInstruction needs a doseQuantity or a text".into(),
            );
        }
    };
    let frequency = dosage["timing"]["code"]["text"]
        .as_str()
        .or(dosage["text"].as_str())
        .ok_or("MedicationRequest.dosageInstruction needs a timing.code text or a text")?
        .to_owned();
    let dispense = &resource["dispenseRequest"];
    let period = &dispense["validityPeriod"];
    let start_value = if period["start"].is_null() {
        &resource["authoredOn"]
    } else {
        &period["start"]
    };
    let start = date(
        start_value,
        "MedicationRequest.dispenseRequest.validityPeriod.start",
    )?;
    let supply = &dispense["expectedSupplyDuration"];
    let days = match (
        supply["value"].as_f64(),
        supply["code"].as_str().or(supply["unit"].as_str()),
    ) {
        (Some(value), Some("d" | "day" | "days")) => value,
        (Some(value), Some("wk" | "week" | "weeks")) => value * 7.0,
        _ if !period["end"].is_null() => {
            let days = |v: &Value, e: &str| instant(v, e).map(|t| t.0.div_euclid(86_400_000));
            (days(
                &period["end"],
                "MedicationRequest.dispenseRequest.validityPeriod.end",
            )? - days(
                start_value,
                "MedicationRequest.dispenseRequest.validityPeriod.start",
            )?) as f64
        }
        _ => {
            return Err("MedicationRequest.dispenseRequest needs an expectedSupplyDuration in days or a validityPeriod with an end".into());
        }
    };
    if !(days.is_finite() && days >= 1.0 && days.fract() == 0.0) {
        return Err(
            "MedicationRequest's supply is not a whole number of days, at least one".into(),
        );
    }
    Ok((
        instant_or(&resource["authoredOn"], "MedicationRequest.authoredOn", now)?,
        HealthFileOp::AddMedication(NewMedication {
            drug: concept_text(
                &resource["medicationCodeableConcept"],
                "MedicationRequest.medicationCodeableConcept",
            )?
            .to_owned(),
            dose,
            frequency,
            start,
            days: days as u64,
        }),
    ))
}

fn encounter(resource: &Value) -> Result<(Timestamp, HealthFileOp), Refused> {
    if resource["status"] == "entered-in-error" || resource["status"] == "cancelled" {
        return Err("an Encounter entered in error or cancelled is not loaded".into());
    }
    let time = instant(&resource["period"]["start"], "Encounter.period.start")?;
    let kind = match resource["class"]["code"].as_str() {
        Some("AMB") => EncounterKind::Outpatient,
        Some("IMP" | "ACUTE" | "NONAC") => EncounterKind::Inpatient,
        Some("EMER") => EncounterKind::Emergency,
        Some("HH") => EncounterKind::HomeVisit,
        _ => {
            return Err(
                "Encounter.class is one of AMB, IMP, ACUTE, NONAC, EMER, HH (v3 ActCode)".into(),
            );
        }
    };
    let mut diagnoses = Vec::new();
    for reason in resource["reasonCode"].as_array().into_iter().flatten() {
        for (icd10, display) in icd10_codings(reason)? {
            diagnoses.push(Diagnosis { icd10, display });
        }
    }
    Ok((
        time,
        HealthFileOp::AddEncounter(NewEncounter {
            time,
            kind,
            diagnoses,
            note: String::new(),
        }),
    ))
}

/// A Quantity's value and unit.
fn quantity(value: &Value) -> Option<(f64, Option<String>)> {
    Some((
        value["value"].as_f64()?,
        value["unit"]
            .as_str()
            .or(value["code"].as_str())
            .map(str::to_owned),
    ))
}

fn observation(resource: &Value) -> Result<(Timestamp, HealthFileOp), Refused> {
    if matches!(
        resource["status"].as_str(),
        Some("entered-in-error" | "cancelled")
    ) {
        return Err("an Observation entered in error or cancelled is not loaded".into());
    }
    let time = instant(
        &resource["effectiveDateTime"],
        "Observation.effectiveDateTime",
    )?;
    let categories: Vec<&str> = resource["category"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(first_code)
        .collect();
    let code = &resource["code"];
    let components = resource["component"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let component = |loinc: &str| {
        components
            .iter()
            .find(|c| has_coding(&c["code"], LOINC_SYSTEM, loinc))
            .and_then(|c| c["valueQuantity"]["value"].as_f64())
    };
    let whole_mmhg = |value: Option<f64>| -> Result<Option<u64>, Refused> {
        match value {
            None => Ok(None),
            Some(v) if v.is_finite() && v >= 0.0 && v.fract() == 0.0 => Ok(Some(v as u64)),
            Some(_) => Err("a blood pressure is a whole number of mmHg".into()),
        }
    };
    if has_coding(code, LOINC_SYSTEM, BLOOD_PRESSURE_PANEL) {
        return Ok((
            time,
            HealthFileOp::AddFollowUp(NewFollowUp {
                time,
                systolic_mmhg: whole_mmhg(component(SYSTOLIC))?,
                diastolic_mmhg: whole_mmhg(component(DIASTOLIC))?,
                glucose_mmol_per_l: None,
            }),
        ));
    }
    if has_coding(code, LOINC_SYSTEM, GLUCOSE) {
        return Ok((
            time,
            HealthFileOp::AddFollowUp(NewFollowUp {
                time,
                systolic_mmhg: None,
                diastolic_mmhg: None,
                glucose_mmol_per_l: Some(
                    resource["valueQuantity"]["value"]
                        .as_f64()
                        .ok_or("a blood glucose Observation needs a valueQuantity")?,
                ),
            }),
        ));
    }
    let kind = if categories.contains(&"laboratory") {
        ExamKind::Lab
    } else if categories.contains(&"imaging") {
        ExamKind::Imaging
    } else if categories.contains(&"procedure") {
        ExamKind::Ecg
    } else {
        return Err("an Observation is loaded as a laboratory, imaging or procedure (ECG) result, or a blood pressure or glucose follow-up".into());
    };
    let name = concept_text(code, "Observation.code")?.to_owned();
    let mut measurements = Vec::new();
    if let Some((value, unit)) = quantity(&resource["valueQuantity"]) {
        measurements.push(Measurement {
            name: name.clone(),
            value,
            unit,
        });
    }
    for c in components {
        if let Some((value, unit)) = quantity(&c["valueQuantity"]) {
            measurements.push(Measurement {
                name: concept_text(&c["code"], "Observation.component.code")?.to_owned(),
                value,
                unit,
            });
        }
    }
    Ok((
        time,
        HealthFileOp::AddExamResult(NewExamResult {
            kind,
            time,
            name,
            measurements,
            report: resource["valueString"].as_str().map(str::to_owned),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fhir_times_are_read_with_their_zone_and_dates_on_island_time() {
        let at = |text: &str| instant(&Value::from(text), "t");
        assert_eq!(at("1970-01-01T08:00:00+08:00"), Ok(Timestamp(0)));
        assert_eq!(at("1970-01-01T00:00:00Z"), Ok(Timestamp(0)));
        assert_eq!(at("1970-01-01T00:00:01.250Z"), Ok(Timestamp(1_000)));
        assert_eq!(at("2024-12-03"), Ok(Timestamp(1_733_155_200_000)));
        assert_eq!(
            at("2015-04-28T19:51:00+08:00"),
            Ok(Timestamp(1_430_221_860_000))
        );
        for bad in [
            "2024-12-03T10:00:00",
            "2024-13-01",
            "12/03/2024",
            "2024-12-03T25:00:00Z",
        ] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }
}

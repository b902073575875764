//! FHIR R4 read views of the model, the shape health apps expect: `Patient` for a health
//! file, `ServiceRequest` for a referral, `AllergyIntolerance`, `Condition` (problems, coded
//! in ICD-10) and `Observation` (follow-ups, exam results) for a resident, and `Bundle` of
//! type `searchset` for searches. Writes go through the typed `/v1` operations, except a
//! member's existing records, which load as a `transaction` Bundle posted to `/fhir`
//! (`crate::import::fhir`), each resident one signed change.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::clinical::{document_id, institution_id, referral_status};
use super::error::{FormBody, QueryParams, RawBody};
use super::{ApiError, ApiState, Caller, Loader, Route, blocking};
use std::collections::{HashMap, HashSet};

use crate::model::{
    AllergyVerification, Amended, DocumentId, EncounterKind, EnteredInError, EntryId, ExamKind,
    HealthFileView, ReferralStatus, ReferralView, Register, Severity, Sex, Urgency,
};

/// Identifier system of Estuary document ids.
pub const DOCUMENT_SYSTEM: &str = "urn:estuary:document";
/// Identifier system of entries within a health file.
pub const ENTRY_SYSTEM: &str = "urn:estuary:entry";
/// Identifier system of consortium institution ids.
pub const INSTITUTION_SYSTEM: &str = "urn:estuary:institution";
/// Identifier system of residents' national id numbers.
pub const NATIONAL_ID_SYSTEM: &str = "urn:estuary:national-id";
/// Extension carrying a referral's own status (FHIR's request status is coarser).
pub const REFERRAL_STATUS_EXTENSION: &str = "urn:estuary:fhir:referral-status";
/// Extension naming the institution that recorded an allergy or a problem.
pub const RECORDED_BY_EXTENSION: &str = "urn:estuary:fhir:recorded-by";
/// LOINC.
const LOINC_SYSTEM: &str = "http://loinc.org";
/// UCUM units.
const UCUM_SYSTEM: &str = "http://unitsofmeasure.org";
const OBSERVATION_CATEGORY_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/observation-category";
const ALLERGY_CLINICAL_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
/// SNOMED CT.
const SNOMED_SYSTEM: &str = "http://snomed.info/sct";
/// SNOMED CT 716186003 |No known allergy (situation)|, what FHIR's examples record it as.
const NO_KNOWN_ALLERGY_SNOMED: &str = "716186003";
const ALLERGY_VERIFICATION_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
const CONDITION_CLINICAL_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const CONDITION_CATEGORY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
/// HL7 v2 table 0074: a diagnostic report's service section.
const DIAGNOSTIC_SERVICE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";
/// HL7 v3 ActCode: an encounter's class.
const ACT_CODE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z.
const INSTANT_MS_MIN: i64 = -62_135_596_800_000;
const INSTANT_MS_MAX: i64 = 253_402_300_799_999;
const FHIR_JSON: &str = "application/fhir+json";

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::get("/fhir/metadata", metadata),
        Route::post("/fhir", transaction),
        Route::get("/fhir/Patient", search_patients),
        Route::post("/fhir/Patient/_search", search_patients_by_post),
        Route::get("/fhir/Patient/{id}", patient),
        Route::get("/fhir/Patient/{id}/$everything", everything),
        Route::get("/fhir/ServiceRequest", search_service_requests),
        Route::get("/fhir/ServiceRequest/{id}", service_request),
        Route::get("/fhir/Task", search_tasks),
        Route::get("/fhir/Task/{id}", task),
        Route::get("/fhir/Appointment", search_appointments),
        Route::get("/fhir/Appointment/{id}", appointment),
        Route::get("/fhir/Organization", organizations),
        Route::get("/fhir/Organization/{id}", organization),
        Route::get("/fhir/AllergyIntolerance", allergies),
        Route::get("/fhir/Condition", conditions),
        Route::get("/fhir/MedicationRequest", medication_requests),
        Route::get("/fhir/Encounter", encounters),
        Route::get("/fhir/Observation", observations),
        Route::get("/fhir/DiagnosticReport", diagnostic_reports),
    ]
}

/// When this server's capability statement last changed (its `date`).
const CAPABILITY_STATEMENT_DATE: &str = "2026-12-06";

/// `GET /fhir/metadata`: what this server does, for a FHIR client to discover. It needs no
/// token, as FHIR clients ask before they authenticate; it holds nothing of any resident.
async fn metadata(State(state): State<ApiState>) -> impl IntoResponse {
    fhir(capability_statement(state.node.institution().as_str()))
}

/// The `CapabilityStatement` of a node of `institution`: the resources served, how each is
/// read and searched, and the transaction that loads a member's records.
pub fn capability_statement(institution: &str) -> Value {
    let param = |name: &str, kind: &str, documentation: &str| json!({ "name": name, "type": kind, "documentation": documentation });
    let resource = |kind: &str, interactions: &[&str], params: Vec<Value>| {
        let interactions: Vec<Value> = interactions
            .iter()
            .map(|code| json!({ "code": code }))
            .collect();
        json!({ "type": kind, "interaction": interactions, "searchParam": params })
    };
    let patient = || {
        param(
            "patient",
            "reference",
            "Required: Patient/<id> or the id. A file linked with others of the same resident answers for all of them, under the main file's id.",
        )
    };
    let patient_resource = {
        let mut patient = resource(
            "Patient",
            &["read", "search-type"],
            vec![
                param(
                    "name",
                    "string",
                    "The beginning of the family and given name, or of the name as written locally, ignoring case; by POST to Patient/_search so the name stays out of URLs.",
                ),
                param(
                    "identifier",
                    "token",
                    "A national id (urn:estuary:national-id|<id>, or the id alone); only by POST to Patient/_search, so it never appears in a URL.",
                ),
            ],
        );
        patient["operation"] = json!([{
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            "documentation": "GET Patient/<id>/$everything: the Patient with its allergies, problems, prescriptions, encounters, observations and referrals, every linked file included.",
        }]);
        patient
    };
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": CAPABILITY_STATEMENT_DATE,
        "publisher": "Estuary",
        "kind": "instance",
        "software": { "name": "Estuary", "version": env!("CARGO_PKG_VERSION") },
        "implementation": { "description": format!("Estuary node of {institution}") },
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {
                "description": "A bearer token of an app configured on this node (Authorization: Bearer <token>): a read token for reads and searches, a read-write one for the transaction. Every read is recorded in the node's audit log under the app's name.",
            },
            "resource": [
                patient_resource,
                resource("Task", &["read", "search-type"], vec![
                    param("owner", "reference", "The receiving institution: its referrals as a desk's worklist, every status."),
                    param("patient", "reference", "Patient/<id> or the id: the resident's referrals."),
                ]),
                resource("Appointment", &["read", "search-type"], vec![
                    param("patient", "reference", "Required: Patient/<id> or the id: the booked slots of the resident's referrals."),
                ]),
                resource("Organization", &["read", "search-type"], Vec::new()),
                resource("ServiceRequest", &["read", "search-type"], vec![
                    param("performer", "reference", "Required: the receiving institution, Organization/<id> or the id."),
                    param("status", "token", "active, completed or revoked, or a referral status."),
                ]),
                resource("AllergyIntolerance", &["search-type"], vec![patient()]),
                resource("Condition", &["search-type"], vec![patient()]),
                resource("MedicationRequest", &["search-type"], vec![patient()]),
                resource("Encounter", &["search-type"], vec![patient()]),
                resource("Observation", &["search-type"], vec![patient()]),
                resource("DiagnosticReport", &["search-type"], vec![patient()]),
            ],
            "searchParam": [
                param("_count", "number", "Entries per page, 1 to 1,000; the Bundle's next and previous links carry _offset. Without it, every entry."),
            ],
            "interaction": [{
                "code": "transaction",
                "documentation": "POST /fhir: a member's existing records (Patient, AllergyIntolerance, Condition, MedicationRequest, Encounter, Observation), each Patient one new health file, all or nothing.",
            }],
        }],
    })
}

fn fhir(resource: Value) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, FHIR_JSON)], Json(resource))
}

/// A `transaction` Bundle of a member's existing records: every Patient a health file written
/// as one signed change with its records, all or nothing. Answers a `transaction-response`
/// Bundle, one entry per entry posted, a Patient's with the new file's location.
async fn transaction(
    State(state): State<ApiState>,
    Loader(caller): Loader,
    RawBody(body): RawBody,
) -> Result<impl IntoResponse, ApiError> {
    let answer = blocking(move || {
        let bundle: Value = serde_json::from_slice(&body).map_err(|e| ApiError::from_json(&e))?;
        let editor = state.editor();
        let residents = crate::import::fhir::residents_from_bundle(&bundle, editor.at)
            .map_err(|e| ApiError::bad_request("invalid_bundle", e.to_string()))?;
        let (places, residents): (Vec<usize>, Vec<_>) = residents.into_iter().unzip();
        let outcomes = state
            .node
            .writer(Some(&caller.app))
            .import_health_files(&editor, &residents, true)?;
        let mut locations = std::collections::HashMap::new();
        for (&place, outcome) in places.iter().zip(outcomes) {
            let error = match outcome {
                Ok((id, _)) => {
                    locations.insert(place, format!("Patient/{id}"));
                    continue;
                }
                Err(crate::replica::NodeError::LoadRolledBack) => continue,
                Err(crate::replica::NodeError::RepeatedInLoad { first }) => ApiError::bad_request(
                    "repeated_in_load",
                    format!(
                        "the same national id as entry {}; one resident, one health file",
                        places.get(first).copied().unwrap_or_default()
                    ),
                ),
                Err(error) => ApiError::from(error),
            };
            if error.status.is_server_error() {
                return Err(error);
            }
            return Err(ApiError {
                reason: format!(
                    "entry {place} (Patient): {}; nothing was loaded",
                    error.reason
                ),
                ..error
            });
        }
        let entries = bundle["entry"].as_array().map_or(0, Vec::len);
        let entry: Vec<Value> = (0..entries)
            .map(|index| match locations.get(&index) {
                Some(location) => {
                    json!({ "response": { "status": "201 Created", "location": location } })
                }
                None => json!({ "response": { "status": "201 Created" } }),
            })
            .collect();
        Ok(json!({
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": entry,
        }))
    })
    .await?;
    Ok(fhir(answer))
}

/// RFC 3339 UTC from milliseconds since the epoch (FHIR `instant` and `dateTime`).
pub fn instant(ms: i64) -> String {
    // FHIR years have four digits: times outside 0001–9999 (a mistyped appointment) clamp.
    let ms = ms.clamp(INSTANT_MS_MIN, INSTANT_MS_MAX);
    let seconds = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let (days, second_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// A FHIR id for an entry of a file (allergy, problem, exam, follow-up): entry ids hold
/// characters FHIR ids may not, and FHIR ids are at most 64 characters.
fn entry_id(document: &DocumentId, entry: &EntryId) -> String {
    digest_id(&format!("{document}/{}", entry.as_str()))
}

/// A FHIR id for a part of a document named by `path`: 32 hex digits of its SHA-256.
fn digest_id(path: &str) -> String {
    let digest = Sha256::digest(path);
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The entry's own id, as an identifier.
fn entry_identifier(entry: &EntryId) -> Value {
    json!({ "system": ENTRY_SYSTEM, "value": entry.as_str() })
}

/// Which institution recorded an entry: FHIR's `recorder` takes people, not organisations.
fn recorded_by(institution: &str) -> Value {
    json!({
        "url": RECORDED_BY_EXTENSION,
        "valueIdentifier": { "system": INSTITUTION_SYSTEM, "value": institution },
    })
}

fn reference(kind: &str, id: &DocumentId) -> Value {
    json!({ "reference": format!("{kind}/{id}") })
}

fn organisation(id: &str) -> Value {
    json!({ "identifier": { "system": INSTITUTION_SYSTEM, "value": id }, "display": id })
}

fn meta(last_updated_ms: i64) -> Value {
    json!({ "lastUpdated": instant(last_updated_ms) })
}

/// The time of a document's latest change, from its history.
fn last_updated(state: &ApiState, id: DocumentId) -> Result<i64, ApiError> {
    Ok(state
        .node
        .history(id)?
        .iter()
        .map(|entry| entry.at_ms)
        .max()
        .unwrap_or(0))
}

/// A health file as a FHIR `Patient`. Conflicting values show the deterministic winner; the
/// `/v1` view lists the others for review.
pub fn patient_resource(view: &HealthFileView, last_updated_ms: i64) -> Value {
    let d = &view.demographics;
    let name = &d.name.value;
    let mut identifiers = vec![json!({ "system": DOCUMENT_SYSTEM, "value": view.id.to_string() })];
    if let Some(national_id) = &d.national_id {
        identifiers.push(json!({
            "use": "official",
            "system": NATIONAL_ID_SYSTEM,
            "value": national_id.value,
        }));
    }
    let mut patient = json!({
        "resourceType": "Patient",
        "id": view.id.to_string(),
        "meta": meta(last_updated_ms),
        "identifier": identifiers,
        "active": true,
        "name": [{
            "use": "official",
            "family": name.family,
            "given": [name.given],
            "text": name
                .text
                .clone()
                .filter(|text| !text.trim().is_empty())
                .unwrap_or_else(|| format!("{} {}", name.family, name.given)),
        }],
        "gender": match d.sex.value {
            Sex::Male => "male",
            Sex::Female => "female",
            Sex::Other => "other",
            Sex::Unknown => "unknown",
        },
        "birthDate": d.birth_date.value.as_str(),
    });
    if let Some(phone) = &d.phone {
        patient["telecom"] = json!([{ "system": "phone", "value": phone.value, "use": "mobile" }]);
    }
    if let Some(address) = &d.address {
        let a = &address.value;
        let text = [
            Some(a.line.as_str()),
            a.town.as_deref(),
            a.district.as_deref(),
            a.city.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        patient["address"] = json!([{
            "line": [a.line],
            "city": a.city,
            "district": a.district,
            "postalCode": a.postal_code,
            "text": text,
        }]);
        strip_nulls(&mut patient["address"][0]);
    }
    if let Some(contract) = &view.contract {
        patient["generalPractitioner"] =
            json!([organisation(contract.value.community_centre.as_str())]);
    }
    patient
}

/// FHIR has no nulls: absent elements are left out.
fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
    }
}

/// FHIR request status for a referral status.
pub fn request_status(status: ReferralStatus) -> &'static str {
    match status {
        ReferralStatus::Requested
        | ReferralStatus::Accepted
        | ReferralStatus::Scheduled
        | ReferralStatus::NoShow
        | ReferralStatus::Arrived => "active",
        ReferralStatus::Completed => "completed",
        ReferralStatus::Declined | ReferralStatus::Cancelled | ReferralStatus::Redirected => {
            "revoked"
        }
    }
}

/// A referral as a FHIR `ServiceRequest`.
pub fn service_request_resource(view: &ReferralView, last_updated_ms: i64) -> Value {
    let mut request = json!({
        "resourceType": "ServiceRequest",
        "id": view.id.to_string(),
        "meta": meta(last_updated_ms),
        "identifier": [{ "system": DOCUMENT_SYSTEM, "value": view.id.to_string() }],
        "status": request_status(view.status),
        "extension": [{ "url": REFERRAL_STATUS_EXTENSION, "valueCode": view.status.as_str() }],
        "intent": "order",
        "category": [{
            "coding": [{
                "system": "http://snomed.info/sct",
                "code": "3457005",
                "display": "Patient referral",
            }],
            "text": format!("{} referral", view.direction),
        }],
        "priority": match view.urgency.value {
            Urgency::Routine => "routine",
            Urgency::Priority => "urgent",
        },
        "subject": reference("Patient", &view.patient),
        "authoredOn": instant(view.created_at.0),
        "requester": organisation(view.from.as_str()),
        "performer": [organisation(view.to.as_str())],
        "reasonCode": [{ "text": view.reason }],
    });
    if !view.handover.value.is_empty() {
        request["note"] = json!([{ "text": view.handover.value }]);
    }
    if let Some(appointment) = view.appointment {
        request["occurrenceDateTime"] = json!(instant(appointment.0));
    }
    if let Some(original) = &view.redirected_from {
        // The onward referral of a redirect takes the place of the one passed on.
        request["replaces"] = json!([reference("ServiceRequest", original)]);
    }
    request
}

/// Most entries one page of a search answers (`_count`).
pub const PAGE_ENTRIES_MAX: usize = 1_000;

/// Which page of a search to answer: `_count` entries from `_offset` (FHIR's paging; the
/// `next` and `previous` links carry them), and the request's path and query for the links.
/// Without `_count`, every entry.
pub(super) struct Page {
    path: String,
    /// The query's other parameters, as sent (encoded).
    others: Vec<String>,
    count: Option<usize>,
    offset: usize,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Page {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let malformed = || {
            ApiError::bad_request(
                "malformed_query",
                format!("_count is 1 to {PAGE_ENTRIES_MAX}, and _offset a whole number"),
            )
        };
        let (mut count, mut offset, mut others) = (None, 0, Vec::new());
        for pair in parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some(("_count", n)) => {
                    count = Some(
                        n.parse::<usize>()
                            .ok()
                            .filter(|n| (1..=PAGE_ENTRIES_MAX).contains(n))
                            .ok_or_else(malformed)?,
                    );
                }
                Some(("_offset", n)) => offset = n.parse().map_err(|_| malformed())?,
                _ => others.push(pair.to_owned()),
            }
        }
        Ok(Self {
            path: parts.uri.path().to_owned(),
            others,
            count,
            offset,
        })
    }
}

impl Page {
    /// The URL of the page starting at `offset` (this page's, if it is this one's offset).
    fn url(&self, base: &str, offset: usize) -> String {
        let mut query = self.others.clone();
        if let Some(count) = self.count {
            query.push(format!("_count={count}"));
        }
        if offset > 0 {
            query.push(format!("_offset={offset}"));
        }
        match query.is_empty() {
            true => format!("{base}{}", self.path),
            false => format!("{base}{}?{}", self.path, query.join("&")),
        }
    }
}

/// A `searchset` Bundle of the page of `entries` that `page` asks for, `total` counting them
/// all, with `next` and `previous` links where there are such pages; entries' `fullUrl`s are
/// absolute, under this node's API address.
fn searchset(state: &ApiState, page: &Page, entries: Vec<Value>) -> Value {
    let host = format!("http://{}", state.config.api.listen);
    let total = entries.len();
    let count = page.count.unwrap_or(total.max(1));
    let mut links = vec![json!({ "relation": "self", "url": page.url(&host, page.offset) })];
    if page.offset.saturating_add(count) < total {
        links.push(json!({ "relation": "next", "url": page.url(&host, page.offset + count) }));
    }
    if page.offset > 0 {
        let previous = page.offset.saturating_sub(count);
        links.push(json!({ "relation": "previous", "url": page.url(&host, previous) }));
    }
    let base = format!("{host}/fhir");
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries.into_iter().skip(page.offset).take(count).map(|resource| {
            let url = format!("{base}/{}/{}", resource["resourceType"].as_str().unwrap_or(""), resource["id"].as_str().unwrap_or(""));
            json!({ "fullUrl": url, "resource": resource, "search": { "mode": "match" } })
        }).collect::<Vec<_>>(),
    })
}

/// A health file as a `Patient`; one linked with others of the same resident says so in
/// `link` (see `patient_links`).
fn patient_of(state: &ApiState, id: DocumentId) -> Result<Value, ApiError> {
    let view = state.node.health_file(id)?;
    let mut patient = patient_resource(&view, last_updated(state, id)?);
    if let Some(record) = state.node.resident_record(id)? {
        patient["link"] = patient_links(id, &record);
    }
    Ok(patient)
}

/// `Patient.link` of a file linked with others: the main file's Patient is `seealso` each
/// other file of the resident; any other file's is `replaced-by` the main file, whose Patient
/// is where the resident's record is read whole.
fn patient_links(id: DocumentId, record: &crate::model::CombinedRecord) -> Value {
    let link = |other: &DocumentId, kind: &str| json!({ "other": reference("Patient", other), "type": kind });
    if id == record.main {
        record
            .files
            .iter()
            .chain(&record.missing)
            .filter(|file| **file != id)
            .map(|file| link(file, "seealso"))
            .collect()
    } else {
        json!([link(&record.main, "replaced-by")])
    }
}

/// A referral as a `ServiceRequest`.
fn service_request_of(state: &ApiState, id: DocumentId) -> Result<Value, ApiError> {
    let view = state.node.referral(id)?;
    Ok(service_request_resource(&view, last_updated(state, id)?))
}

/// A referral's workflow as a `Task` (its id the referral's), for a desk's FHIR client: the
/// status follows the referral's one to one (scheduled is `accepted` with business status
/// `scheduled`, a no-show `on-hold` until booked again, arrived `in-progress`), the receiver
/// owns it, and it focuses on the referral's `ServiceRequest`. A decline's reason is its
/// `statusReason`; the receiver's return summary is its output.
pub fn task_resource(view: &ReferralView, last_updated_ms: i64) -> Value {
    let status = match view.status {
        ReferralStatus::Requested => "requested",
        ReferralStatus::Accepted | ReferralStatus::Scheduled => "accepted",
        ReferralStatus::NoShow => "on-hold",
        ReferralStatus::Arrived => "in-progress",
        ReferralStatus::Completed => "completed",
        ReferralStatus::Declined | ReferralStatus::Redirected => "rejected",
        ReferralStatus::Cancelled => "cancelled",
    };
    let mut task = json!({
        "resourceType": "Task",
        "id": view.id.to_string(),
        "meta": meta(last_updated_ms),
        "identifier": [{ "system": DOCUMENT_SYSTEM, "value": view.id.to_string() }],
        "basedOn": [reference("ServiceRequest", &view.id)],
        "status": status,
        "businessStatus": { "text": view.status.as_str() },
        "intent": "order",
        "priority": match view.urgency.value {
            Urgency::Routine => "routine",
            Urgency::Priority => "urgent",
        },
        "focus": reference("ServiceRequest", &view.id),
        "for": reference("Patient", &view.patient),
        "authoredOn": instant(view.created_at.0),
        "lastModified": instant(last_updated_ms),
        "requester": organisation(view.from.as_str()),
        "owner": organisation(view.to.as_str()),
    });
    match view.status {
        ReferralStatus::Declined => {
            // The reason the winning decline gave (declines of earlier releases gave none).
            let reason = winning_event(view).and_then(|event| event.reason.as_deref());
            let text = match reason {
                Some(reason) => format!("declined by {}: {reason}", view.to),
                None => format!("declined by {}", view.to),
            };
            task["statusReason"] = json!({ "text": text });
        }
        ReferralStatus::Cancelled => {
            task["statusReason"] = json!({ "text": format!("cancelled by {}", view.from) });
        }
        ReferralStatus::Redirected => {
            let reason = winning_event(view).and_then(|event| event.reason.as_deref());
            let onward = view.redirected_to.as_ref().map_or("", |to| to.as_str());
            let text = match reason {
                Some(reason) => format!("redirected by {} to {onward}: {reason}", view.to),
                None => format!("redirected by {} to {onward}", view.to),
            };
            task["statusReason"] = json!({ "text": text });
        }
        _ => {}
    }
    if let Some(appointment) = view.appointment {
        task["restriction"] = json!({ "period": { "start": instant(appointment.0) } });
    }
    if let Some(summary) = &view.return_summary {
        task["output"] = json!([{
            "type": { "text": "return summary" },
            "valueString": summary.value,
        }]);
    }
    task
}

/// A referral's booked slot as an `Appointment` (its id the referral's), once the receiver
/// booked one: booked while scheduled, `noshow`, `arrived`, `fulfilled` once care completed,
/// `cancelled` if the sender withdrew after the booking. It is based on the referral's
/// `ServiceRequest`; its participants are the resident and the receiving institution.
///
/// R4 requires a start and an end of every appointment but a proposed or cancelled one, so a
/// booking made without its slot's length (`minutes`, which earlier releases did not record)
/// is served only once cancelled; until then the `Task`'s `restriction` still carries its
/// start. `None` when there is no appointment to serve.
pub fn appointment_resource(view: &ReferralView, last_updated_ms: i64) -> Option<Value> {
    let start = view.appointment?;
    let status = match view.status {
        ReferralStatus::Scheduled => "booked",
        ReferralStatus::NoShow => "noshow",
        ReferralStatus::Arrived => "arrived",
        ReferralStatus::Completed => "fulfilled",
        // A booking given up: the sender withdrew, or the receiver sent the resident on.
        ReferralStatus::Cancelled | ReferralStatus::Redirected => "cancelled",
        ReferralStatus::Requested | ReferralStatus::Accepted | ReferralStatus::Declined => {
            return None;
        }
    };
    let participant =
        |actor: Value| json!({ "actor": actor, "required": "required", "status": "accepted" });
    let mut appointment = json!({
        "resourceType": "Appointment",
        "id": view.id.to_string(),
        "meta": meta(last_updated_ms),
        "identifier": [{ "system": DOCUMENT_SYSTEM, "value": view.id.to_string() }],
        "status": status,
        "basedOn": [reference("ServiceRequest", &view.id)],
        "participant": [
            participant(reference("Patient", &view.patient)),
            participant(organisation(view.to.as_str())),
        ],
    });
    match view.appointment_minutes {
        Some(minutes) => {
            let end = i64::try_from(minutes)
                .ok()
                .and_then(|m| m.checked_mul(60_000))
                .and_then(|ms| start.0.checked_add(ms))?;
            appointment["start"] = json!(instant(start.0));
            appointment["end"] = json!(instant(end));
            appointment["minutesDuration"] = json!(minutes);
        }
        None if status == "cancelled" => {}
        None => return None,
    }
    if status == "cancelled" {
        let reason = match &view.redirected_to {
            Some(onward) => format!("referral redirected by {} to {onward}", view.to),
            None => format!("referral cancelled by {}", view.from),
        };
        appointment["cancelationReason"] = json!({ "text": reason });
    }
    Some(appointment)
}

/// A referral's appointment, or 404 if it has none to serve.
fn appointment_of(state: &ApiState, id: DocumentId) -> Result<Value, ApiError> {
    let view = state.node.referral(id)?;
    appointment_resource(&view, last_updated(state, id)?).ok_or_else(|| {
        ApiError::not_found(
            "this referral has no appointment to serve: none is booked, or its booking gave no slot length",
        )
    })
}

async fn appointment(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    read_one(state, caller, &id, appointment_of).await
}

#[derive(Deserialize)]
struct AppointmentSearch {
    patient: String,
}

/// `Appointment?patient=<file>`: the booked slots of a resident's referrals.
async fn search_appointments(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<AppointmentSearch>,
) -> Result<impl IntoResponse, ApiError> {
    let patient = document_id(
        query
            .patient
            .strip_prefix("Patient/")
            .unwrap_or(&query.patient),
    )?;
    blocking(move || {
        let referrals = state.node.referrals_of(&patient)?;
        let entries = appointments(&state, &caller, &referrals)?;
        Ok(fhir(searchset(&state, &page, entries)))
    })
    .await
}

/// The appointments among `referrals`, each read recorded as any referral read is.
fn appointments(
    state: &ApiState,
    caller: &Caller,
    referrals: &[DocumentId],
) -> Result<Vec<Value>, ApiError> {
    let mut found = Vec::new();
    let mut read = Vec::new();
    for id in referrals {
        let view = state.node.referral(*id)?;
        if let Some(resource) = appointment_resource(&view, last_updated(state, *id)?) {
            found.push(resource);
            read.push((*id, None));
        }
    }
    state.node.record_access(&caller.app, &read)?;
    Ok(found)
}

/// The event that decided a referral's status (the last of its effective path).
fn winning_event(view: &ReferralView) -> Option<&crate::model::EventView> {
    let last = view.effective.last()?;
    view.history.iter().find(|e| e.entry == *last)
}

/// A referral as a `Task`.
fn task_of(state: &ApiState, id: DocumentId) -> Result<Value, ApiError> {
    let view = state.node.referral(id)?;
    Ok(task_resource(&view, last_updated(state, id)?))
}

async fn task(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    read_one(state, caller, &id, task_of).await
}

#[derive(Deserialize)]
struct TaskSearch {
    owner: Option<String>,
    patient: Option<String>,
}

/// `Task?owner=<institution>` (a desk's worklist, every status) or `Task?patient=<file>`.
async fn search_tasks(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<TaskSearch>,
) -> Result<impl IntoResponse, ApiError> {
    enum Of {
        Owner(crate::model::InstitutionId),
        Patient(DocumentId),
    }
    let of = match (query.owner, query.patient) {
        (Some(owner), None) => Of::Owner(institution_id(
            owner.strip_prefix("Organization/").unwrap_or(&owner),
        )?),
        (None, Some(patient)) => Of::Patient(document_id(
            patient.strip_prefix("Patient/").unwrap_or(&patient),
        )?),
        _ => {
            return Err(ApiError::bad_request(
                "malformed_query",
                "search tasks by owner (an institution) or by patient, one of the two",
            ));
        }
    };
    blocking(move || {
        let found = match of {
            Of::Owner(owner) => {
                let mut found = Vec::new();
                for status in ReferralStatus::ALL {
                    found.extend(state.node.referrals_to(&owner, *status)?);
                }
                found
            }
            Of::Patient(patient) => state.node.referrals_of(&patient)?,
        };
        let entries = read_all(&state, &caller, &found, task_of)?;
        Ok(fhir(searchset(&state, &page, entries)))
    })
    .await
}

/// A member institution as an `Organization`, from the roster (no patient data: reading it is
/// not audited).
fn organization_resource(member: &crate::model::InstitutionView) -> Value {
    json!({
        "resourceType": "Organization",
        "id": member.id.as_str(),
        "identifier": [{ "system": INSTITUTION_SYSTEM, "value": member.id.as_str() }],
        "active": true,
        "type": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/organization-type",
            "code": "prov",
            "display": "Healthcare Provider",
        }], "text": member.kind.as_str() }],
        "name": member.name,
    })
}

async fn organizations(
    State(state): State<ApiState>,
    _caller: Caller,
    page: Page,
) -> Result<impl IntoResponse, ApiError> {
    let members = state.node.roster_view().institutions;
    let entries = members.iter().map(organization_resource).collect();
    Ok(fhir(searchset(&state, &page, entries)))
}

async fn organization(
    State(state): State<ApiState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let members = state.node.roster_view().institutions;
    members
        .iter()
        .find(|member| member.id.as_str() == id)
        .map(|member| fhir(organization_resource(member)))
        .ok_or_else(|| ApiError::not_found("no member of the consortium has this id"))
}

type Resource = fn(&ApiState, DocumentId) -> Result<Value, ApiError>;

/// Documents as resources, their reads recorded in the audit log under the app's name.
fn read_all(
    state: &ApiState,
    caller: &Caller,
    ids: &[DocumentId],
    resource: Resource,
) -> Result<Vec<Value>, ApiError> {
    let resources = ids
        .iter()
        .map(|id| resource(state, *id))
        .collect::<Result<Vec<_>, _>>()?;
    let accesses: Vec<_> = ids.iter().map(|id| (*id, None)).collect();
    state.node.record_access(&caller.app, &accesses)?;
    Ok(resources)
}

/// One document as a resource, by the id in the path.
async fn read_one(
    state: ApiState,
    caller: Caller,
    id: &str,
    resource: Resource,
) -> Result<impl IntoResponse + use<>, ApiError> {
    let id = document_id(id)?;
    blocking(move || {
        let mut one = read_all(&state, &caller, &[id], resource)?;
        Ok(fhir(one.pop().unwrap_or_default()))
    })
    .await
}

async fn patient(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    read_one(state, caller, &id, patient_of).await
}

#[derive(Deserialize)]
struct NameSearch {
    name: String,
}

/// `?name=` in the URL: kept for the apps that use it, but the name ends up in access logs;
/// `POST /fhir/Patient/_search` keeps it in the body.
async fn search_patients(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<NameSearch>,
) -> Result<impl IntoResponse, ApiError> {
    patients_named(state, caller, page, query).await
}

/// FHIR's search by POST: the parameters as a form body, the same searchset as the GET.
/// A search by POST: by `name`, or by `identifier` (a national id, as
/// `urn:estuary:national-id|<id>` or the id alone), which is searched only this way so that it
/// never appears in a URL.
#[derive(Deserialize)]
struct PatientForm {
    name: Option<String>,
    identifier: Option<String>,
}

async fn search_patients_by_post(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    FormBody(form): FormBody<PatientForm>,
) -> Result<impl IntoResponse, ApiError> {
    match (form.name, form.identifier) {
        (Some(name), None) => patients_named(state, caller, page, NameSearch { name }).await,
        (None, Some(identifier)) => {
            let national_id = match identifier.split_once('|') {
                Some((NATIONAL_ID_SYSTEM, value)) => value.to_owned(),
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "unknown_identifier_system",
                        format!(
                            "patients are searched by national id: the system is {NATIONAL_ID_SYSTEM}"
                        ),
                    ));
                }
                None => identifier,
            };
            patients_found(state, caller, page, move |node| {
                node.find_by_national_id(&national_id)
            })
            .await
        }
        _ => Err(ApiError::bad_request(
            "malformed_query",
            "search patients by name or by identifier (a national id), one of the two",
        )),
    }
}

async fn patients_named(
    state: ApiState,
    caller: Caller,
    page: Page,
    query: NameSearch,
) -> Result<Response, ApiError> {
    patients_found(state, caller, page, move |node| {
        node.search_by_name(&query.name)
    })
    .await
}

/// The Patients of the health files `find` finds, a page of them, every read audited.
async fn patients_found(
    state: ApiState,
    caller: Caller,
    page: Page,
    find: impl FnOnce(&crate::replica::Node) -> Result<Vec<DocumentId>, crate::replica::NodeError>
    + Send
    + 'static,
) -> Result<Response, ApiError> {
    blocking(move || {
        let found = find(&state.node)?;
        let entries = read_all(&state, &caller, &found, patient_of)?;
        Ok(fhir(searchset(&state, &page, entries)).into_response())
    })
    .await
}

/// `Patient/{id}/$everything`: the resident's whole record in one Bundle — the Patient, its
/// allergies, problems, prescriptions, encounters, observations and referrals (every file
/// linked with it included), each read audited.
async fn everything(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let file = document_id(&id)?;
    let view = patient_file(&state, &caller, &PatientSearch { patient: id }).await?;
    blocking(move || {
        let mut entries = vec![patient_of(&state, file)?];
        entries.extend(allergy_resources(&view));
        entries.extend(condition_resources(&view));
        entries.extend(medication_request_resources(&view));
        entries.extend(encounter_resources(&view));
        entries.extend(observation_resources(&view));
        entries.extend(diagnostic_report_resources(&view));
        let mut referrals = state.node.referrals_of(&file)?;
        if view.id != file {
            referrals.extend(state.node.referrals_of(&view.id)?);
        }
        entries.extend(read_all(&state, &caller, &referrals, service_request_of)?);
        entries.extend(appointments(&state, &caller, &referrals)?);
        Ok(fhir(searchset(&state, &page, entries)))
    })
    .await
}

async fn service_request(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    read_one(state, caller, &id, service_request_of).await
}

#[derive(Deserialize)]
struct ServiceRequestSearch {
    performer: String,
    status: Option<String>,
}

/// `performer` is an institution id (or `Organization/<id>`); `status` a FHIR request status
/// (`active`, `completed`, `revoked`) or a referral status.
async fn search_service_requests(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<ServiceRequestSearch>,
) -> Result<impl IntoResponse, ApiError> {
    let performer = institution_id(
        query
            .performer
            .strip_prefix("Organization/")
            .unwrap_or(&query.performer),
    )?;
    let statuses: Vec<ReferralStatus> = match query.status.as_deref() {
        None => ReferralStatus::ALL.to_vec(),
        Some(fhir_status @ ("active" | "completed" | "revoked")) => ReferralStatus::ALL
            .iter()
            .copied()
            .filter(|s| request_status(*s) == fhir_status)
            .collect(),
        Some(status) => vec![referral_status(status)?],
    };
    blocking(move || {
        let mut found = Vec::new();
        for status in statuses {
            found.extend(state.node.referrals_to(&performer, status)?);
        }
        let entries = read_all(&state, &caller, &found, service_request_of)?;
        Ok(fhir(searchset(&state, &page, entries)))
    })
    .await
}

#[derive(Deserialize)]
struct PatientSearch {
    patient: String,
}

/// The resident's health file for a `?patient=` search (`Patient/<id>` or the bare id): with
/// every file linked with it, combined.
async fn patient_file(
    state: &ApiState,
    caller: &Caller,
    query: &PatientSearch,
) -> Result<HealthFileView, ApiError> {
    let id = document_id(
        query
            .patient
            .strip_prefix("Patient/")
            .unwrap_or(&query.patient),
    )?;
    let (state, app) = (state.clone(), caller.app.clone());
    blocking(move || {
        // A file linked with others answers for the resident's every file, under the main
        // file's id.
        if let Some(record) = state.node.resident_record(id)? {
            let accesses: Vec<_> = record.files.iter().map(|file| (*file, None)).collect();
            state.node.record_access(&app, &accesses)?;
            return Ok(record.view);
        }
        let view = state.node.health_file(id)?;
        state.node.record_access(&app, &[(id, None)])?;
        Ok(view)
    })
    .await
}

/// A `?patient=` search: the resources `resources` makes of the resident's record (every
/// linked file included), a page of them.
async fn of_patient(
    state: ApiState,
    caller: Caller,
    page: Page,
    query: PatientSearch,
    resources: fn(&HealthFileView) -> Vec<Value>,
) -> Result<impl IntoResponse, ApiError> {
    let view = patient_file(&state, &caller, &query).await?;
    Ok(fhir(searchset(&state, &page, resources(&view))))
}

async fn allergies(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<PatientSearch>,
) -> Result<impl IntoResponse, ApiError> {
    of_patient(state, caller, page, query, allergy_resources).await
}

fn allergy_resources(view: &HealthFileView) -> Vec<Value> {
    let mut entries: Vec<Value> = view
        .allergies
        .iter()
        .map(|allergy| {
            // The winning value; concurrent ones are in the file's conflicts.
            let verification = allergy.verification.as_ref().map(|r| r.value);
            // A refuted allergy is not a current one (FHIR still wants a clinical status).
            let clinical = match verification {
                Some(AllergyVerification::Refuted) => "inactive",
                _ => "active",
            };
            let mut resource = json!({
                "resourceType": "AllergyIntolerance",
                "id": entry_id(&view.id, &allergy.entry),
                "identifier": [entry_identifier(&allergy.entry)],
                "meta": meta(allergy.recorded_at.0),
                "clinicalStatus": { "coding": [{ "system": ALLERGY_CLINICAL_SYSTEM, "code": clinical }] },
                "code": { "text": allergy.substance },
                "patient": reference("Patient", &view.id),
                "recordedDate": instant(allergy.recorded_at.0),
                "extension": [recorded_by(allergy.recorded_by.as_str())],
                "reaction": [{
                    "manifestation": [{ "text": allergy.reaction }],
                    "severity": match allergy.severity {
                        Severity::Mild => "mild",
                        Severity::Moderate => "moderate",
                        Severity::Severe => "severe",
                    },
                }],
            });
            if let Some(verification) = verification {
                resource["verificationStatus"] = json!({ "coding": [{
                    "system": ALLERGY_VERIFICATION_SYSTEM,
                    "code": verification.as_str(),
                }] });
            }
            resource
        })
        .collect();
    // Said, and no allergy stands beside it: FHIR's way is a record of "no known allergy".
    if let Some(statement) = view.no_known_allergies_now() {
        entries.push(json!({
            "resourceType": "AllergyIntolerance",
            "id": digest_id(&format!("{}/no-known-allergies", view.id)),
            "meta": meta(statement.recorded_at.0),
            "clinicalStatus": { "coding": [{ "system": ALLERGY_CLINICAL_SYSTEM, "code": "active" }] },
            "verificationStatus": { "coding": [{ "system": ALLERGY_VERIFICATION_SYSTEM, "code": "confirmed" }] },
            "code": {
                "coding": [{
                    "system": SNOMED_SYSTEM,
                    "code": NO_KNOWN_ALLERGY_SNOMED,
                    "display": "No known allergy",
                }],
                "text": "No known allergies",
            },
            "patient": reference("Patient", &view.id),
            "recordedDate": instant(statement.recorded_at.0),
            "extension": [recorded_by(statement.recorded_by.as_str())],
        }));
    }
    entries
}

async fn conditions(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<PatientSearch>,
) -> Result<impl IntoResponse, ApiError> {
    of_patient(state, caller, page, query, condition_resources).await
}

fn condition_resources(view: &HealthFileView) -> Vec<Value> {
    view.problems
        .iter()
        .map(|problem| {
            let mut condition = json!({
                "resourceType": "Condition",
                "id": entry_id(&view.id, &problem.entry),
                "identifier": [entry_identifier(&problem.entry)],
                "meta": meta(problem.recorded_at.0),
                "clinicalStatus": { "coding": [{
                    "system": CONDITION_CLINICAL_SYSTEM,
                    "code": problem.status.value.as_str(),
                }] },
                "code": {
                    "coding": [{
                        "system": problem.icd10.system().fhir_uri(),
                        "code": problem.icd10.as_str(),
                        "display": problem.display,
                    }],
                    "text": problem.display,
                },
                "subject": reference("Patient", &view.id),
                "recordedDate": instant(problem.recorded_at.0),
                "extension": [recorded_by(problem.recorded_by.as_str())],
            });
            if let Some(onset) = &problem.onset {
                condition["onsetDateTime"] = json!(onset.as_str());
            }
            condition
        })
        .collect()
}

/// The date (`YYYY-MM-DD`) `days` after 1970-01-01.
fn civil_date(days: i64) -> String {
    let (year, month, day) = crate::import::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The last day of a prescription of `days` days from `start` (`YYYY-MM-DD`), if it reads.
fn last_day(start: &str, days: u64) -> Option<String> {
    let mut parts = start.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    let first = crate::import::days_from_civil(year, month, day);
    Some(civil_date(
        first + i64::try_from(days).ok()?.saturating_sub(1),
    ))
}

/// A resident's prescriptions as `MedicationRequest`s: the 60-day cap as the validity period
/// and the expected supply; stopped, entered in error, or completed once the period is over.
/// An amended prescription is served under its own id with the corrected values.
async fn medication_requests(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<PatientSearch>,
) -> Result<impl IntoResponse, ApiError> {
    of_patient(state, caller, page, query, medication_request_resources).await
}

fn medication_request_resources(view: &HealthFileView) -> Vec<Value> {
    let today = civil_date(crate::audit::now_ms().div_euclid(86_400_000));
    current(&view.medications, |m| &m.entry, |m| &m.amended)
        .into_iter()
        .map(|(record, medication)| {
            let end = last_day(medication.start.as_str(), medication.days);
            let status = if record.entered_in_error.is_some() {
                "entered-in-error"
            } else if medication.stopped.is_some() {
                "stopped"
            } else if end.as_deref().is_some_and(|end| end < today.as_str()) {
                "completed"
            } else {
                "active"
            };
            let mut period = json!({ "start": medication.start.as_str() });
            if let Some(end) = &end {
                period["end"] = json!(end);
            }
            json!({
                "resourceType": "MedicationRequest",
                "id": entry_id(&view.id, &record.entry),
                "identifier": [entry_identifier(&record.entry)],
                "meta": meta(medication.recorded_at.0),
                "status": status,
                "intent": "order",
                "medicationCodeableConcept": { "text": medication.drug },
                "subject": reference("Patient", &view.id),
                "authoredOn": instant(medication.recorded_at.0),
                "requester": organisation(medication.prescribed_by.as_str()),
                "dosageInstruction": [{
                    "text": medication.dose,
                    "timing": { "code": { "text": medication.frequency } },
                }],
                "dispenseRequest": {
                    "validityPeriod": period,
                    "expectedSupplyDuration": {
                        "value": medication.days,
                        "unit": "days",
                        "system": UCUM_SYSTEM,
                        "code": "d",
                    },
                },
            })
        })
        .collect()
}

/// A resident's encounters as `Encounter`s, each diagnosis both a `reasonCode` and a
/// contained `Condition` of category encounter-diagnosis that `diagnosis` names. An amended
/// encounter is served under its own id with the corrected values.
async fn encounters(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<PatientSearch>,
) -> Result<impl IntoResponse, ApiError> {
    of_patient(state, caller, page, query, encounter_resources).await
}

fn encounter_resources(view: &HealthFileView) -> Vec<Value> {
    current(&view.encounters, |e| &e.entry, |e| &e.amended)
        .into_iter()
        .map(|(record, encounter)| {
            let (class, display) = match encounter.kind {
                EncounterKind::Inpatient => ("IMP", "inpatient encounter"),
                EncounterKind::Emergency => ("EMER", "emergency"),
                EncounterKind::HomeVisit => ("HH", "home health"),
                _ => ("AMB", "ambulatory"),
            };
            let coded: Vec<Value> = encounter
                .diagnoses
                .iter()
                .map(|d| {
                    json!({
                        "coding": [{
                            "system": d.icd10.system().fhir_uri(),
                            "code": d.icd10.as_str(),
                            "display": d.display,
                        }],
                        "text": d.display,
                    })
                })
                .collect();
            let contained: Vec<Value> = coded
                .iter()
                .enumerate()
                .map(|(index, code)| {
                    json!({
                        "resourceType": "Condition",
                        "id": format!("diagnosis-{index}"),
                        "category": [{ "coding": [{
                            "system": CONDITION_CATEGORY_SYSTEM,
                            "code": "encounter-diagnosis",
                        }] }],
                        "code": code,
                        "subject": reference("Patient", &view.id),
                    })
                })
                .collect();
            let diagnoses: Vec<Value> = (0..coded.len())
                .map(|index| {
                    json!({
                        "condition": { "reference": format!("#diagnosis-{index}") },
                        "rank": index + 1,
                    })
                })
                .collect();
            let mut resource = json!({
                "resourceType": "Encounter",
                "id": entry_id(&view.id, &record.entry),
                "identifier": [entry_identifier(&record.entry)],
                "meta": meta(encounter.time.0),
                "status": if record.entered_in_error.is_some() { "entered-in-error" } else { "finished" },
                "class": { "system": ACT_CODE_SYSTEM, "code": class, "display": display },
                "type": [{ "text": encounter.kind.as_str() }],
                "subject": reference("Patient", &view.id),
                "serviceProvider": organisation(encounter.institution.as_str()),
                "period": { "start": instant(encounter.time.0) },
            });
            if !coded.is_empty() {
                resource["reasonCode"] = json!(coded);
                resource["contained"] = json!(contained);
                resource["diagnosis"] = json!(diagnoses);
            }
            resource
        })
        .collect()
}

/// LOINC codes of exams and measurements, by name (compared ignoring case) and unit: only
/// where the name and unit leave one code (eGFR, whose code depends on the formula, and the
/// imaging studies, whose codes depend on views and contrast, are not coded).
const EXAM_LOINC: [(&str, Option<&str>, &str, &str); 13] = [
    (
        "hba1c",
        Some("%"),
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
    ),
    (
        "fasting glucose",
        Some("mmol/L"),
        "14771-0",
        "Fasting glucose [Moles/volume] in Serum or Plasma",
    ),
    (
        "ldl-c",
        Some("mmol/L"),
        "22748-8",
        "Cholesterol in LDL [Moles/volume] in Serum or Plasma",
    ),
    (
        "creatinine",
        Some("µmol/L"),
        "14682-9",
        "Creatinine [Moles/volume] in Serum or Plasma",
    ),
    (
        "potassium",
        Some("mmol/L"),
        "2823-3",
        "Potassium [Moles/volume] in Serum or Plasma",
    ),
    (
        "haemoglobin",
        Some("g/L"),
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
    ),
    (
        "alt",
        Some("U/L"),
        "1742-6",
        "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
    ),
    (
        "tsh",
        Some("mIU/L"),
        "3016-3",
        "Thyrotropin [Units/volume] in Serum or Plasma",
    ),
    ("12-lead ecg", None, "11524-6", "EKG study"),
    ("heart rate", Some("/min"), "8867-4", "Heart rate"),
    ("pr interval", Some("ms"), "8625-6", "P-R Interval"),
    ("qrs duration", Some("ms"), "8633-0", "QRS duration"),
    (
        "qtc interval",
        Some("ms"),
        "8636-3",
        "Q-T interval corrected",
    ),
];
/// Extension saying an exam's code is its name alone: no LOINC code is known for it.
const UNCODED_EXTENSION: &str = "urn:estuary:fhir:uncoded";

/// An exam's or a measurement's code: its LOINC code with the name as text where
/// `EXAM_LOINC` knows one, else the name as text with an extension saying it is uncoded.
fn exam_code(name: &str, unit: Option<&str>) -> Value {
    let known = EXAM_LOINC.iter().find(|(known, known_unit, ..)| {
        known.eq_ignore_ascii_case(name.trim()) && known_unit.is_none_or(|u| Some(u) == unit)
    });
    match known {
        Some((_, _, code, display)) => json!({
            "coding": [{ "system": LOINC_SYSTEM, "code": code, "display": display }],
            "text": name,
        }),
        None => json!({
            "text": name,
            "extension": [{
                "url": UNCODED_EXTENSION,
                "valueString": "no LOINC code is known for this name; the text is the name as recorded",
            }],
        }),
    }
}

fn quantity(value: f64, unit: &str, ucum: &str) -> Value {
    json!({ "value": value, "unit": unit, "system": UCUM_SYSTEM, "code": ucum })
}

fn loinc(code: &str, display: &str) -> Value {
    json!({ "coding": [{ "system": LOINC_SYSTEM, "code": code, "display": display }], "text": display })
}

/// An observation's status: `entered-in-error` once its institution marked it so (with any
/// concurrent marking), `amended` once it amended it, `final` otherwise.
fn observation_status(
    marker: &Option<Register<EnteredInError>>,
    amended: &Option<Register<Amended>>,
) -> &'static str {
    match (marker, amended) {
        (Some(_), _) => "entered-in-error",
        (None, Some(_)) => "amended",
        (None, None) => "final",
    }
}

/// Records as FHIR serves them: an amended record under its own id with the value of the
/// record that amends it (the latest of a chain), the amending records not again. Yields
/// (the record whose id and status are served, the record whose value is).
fn current<T>(
    records: &[T],
    entry: impl Fn(&T) -> &EntryId,
    amended: impl Fn(&T) -> &Option<Register<Amended>>,
) -> Vec<(&T, &T)> {
    let by_entry: HashMap<&EntryId, &T> = records.iter().map(|r| (entry(r), r)).collect();
    let amending: HashSet<&EntryId> = records
        .iter()
        .filter_map(|r| amended(r).as_ref())
        .map(|register| &register.value.by)
        .collect();
    records
        .iter()
        .filter(|r| !amending.contains(entry(r)))
        .map(|record| {
            let mut shown = record;
            // A chain is at most as long as the list.
            for _ in 0..records.len() {
                match amended(shown)
                    .as_ref()
                    .and_then(|r| by_entry.get(&r.value.by))
                {
                    Some(next) => shown = next,
                    None => break,
                }
            }
            (record, shown)
        })
        .collect()
}

/// Follow-ups (blood pressure panel, glucose) and exam results as `Observation`s.
async fn observations(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<PatientSearch>,
) -> Result<impl IntoResponse, ApiError> {
    of_patient(state, caller, page, query, observation_resources).await
}

async fn diagnostic_reports(
    State(state): State<ApiState>,
    caller: Caller,
    page: Page,
    QueryParams(query): QueryParams<PatientSearch>,
) -> Result<impl IntoResponse, ApiError> {
    of_patient(state, caller, page, query, diagnostic_report_resources).await
}

/// A resident's exam results as `DiagnosticReport`s: a lab panel, an imaging study or an ECG,
/// each the report of the exam's `Observation` (its `result`), with the report's text as the
/// conclusion. Served under the exam's id with `-report`, amended and entered in error as the
/// Observation is.
fn diagnostic_report_resources(view: &HealthFileView) -> Vec<Value> {
    current(&view.exams, |e| &e.entry, |e| &e.amended)
        .into_iter()
        .map(|(record, exam)| {
            let observation = entry_id(&view.id, &record.entry);
            let (code, display) = match exam.kind {
                ExamKind::Lab => ("LAB", "Laboratory"),
                ExamKind::Imaging => ("RAD", "Radiology"),
                ExamKind::Ecg => ("EC", "Electrocardiac (e.g., EKG, EEC, Holter)"),
            };
            let mut report = json!({
                "resourceType": "DiagnosticReport",
                "id": format!("{observation}-report"),
                "identifier": [entry_identifier(&record.entry)],
                "meta": meta(exam.time.0),
                "status": match observation_status(&record.entered_in_error, &record.amended) {
                    "entered-in-error" => "entered-in-error",
                    "amended" => "amended",
                    _ => "final",
                },
                "category": [{ "coding": [{
                    "system": DIAGNOSTIC_SERVICE_SYSTEM,
                    "code": code,
                    "display": display,
                }] }],
                "code": exam_code(&exam.name, exam.measurements.first().and_then(|m| m.unit.as_deref())),
                "subject": reference("Patient", &view.id),
                "effectiveDateTime": instant(exam.time.0),
                "issued": instant(exam.time.0),
                "performer": [organisation(exam.institution.as_str())],
                "result": [{ "reference": format!("Observation/{observation}") }],
            });
            if let Some(text) = &exam.report {
                report["conclusion"] = json!(text);
            }
            report
        })
        .collect()
}

fn observation_resources(view: &HealthFileView) -> Vec<Value> {
    let subject = reference("Patient", &view.id);
    let mut entries = Vec::new();
    for (record, follow_up) in current(&view.follow_ups, |f| &f.entry, |f| &f.amended) {
        let base = |suffix: &str, code: Value| {
            json!({
                "resourceType": "Observation",
                "id": format!("{}-{suffix}", entry_id(&view.id, &record.entry)),
                "identifier": [entry_identifier(&record.entry)],
                "meta": meta(follow_up.time.0),
                "status": observation_status(&record.entered_in_error, &record.amended),
                "category": [{ "coding": [{ "system": OBSERVATION_CATEGORY_SYSTEM, "code": "vital-signs" }] }],
                "code": code,
                "subject": subject,
                "effectiveDateTime": instant(follow_up.time.0),
                "performer": [organisation(follow_up.institution.as_str())],
            })
        };
        if let (Some(systolic), Some(diastolic)) =
            (follow_up.systolic_mmhg, follow_up.diastolic_mmhg)
        {
            let mut bp = base("bp", loinc("85354-9", "Blood pressure panel"));
            bp["component"] = json!([
                { "code": loinc("8480-6", "Systolic blood pressure"), "valueQuantity": quantity(systolic as f64, "mmHg", "mm[Hg]") },
                { "code": loinc("8462-4", "Diastolic blood pressure"), "valueQuantity": quantity(diastolic as f64, "mmHg", "mm[Hg]") },
            ]);
            entries.push(bp);
        }
        if let Some(glucose) = follow_up.glucose_mmol_per_l {
            let mut observation = base(
                "glucose",
                loinc("15074-8", "Glucose [Moles/volume] in Blood"),
            );
            observation["category"] = json!([{ "coding": [{ "system": OBSERVATION_CATEGORY_SYSTEM, "code": "laboratory" }] }]);
            observation["valueQuantity"] = quantity(glucose, "mmol/L", "mmol/L");
            entries.push(observation);
        }
    }
    for (record, exam) in current(&view.exams, |e| &e.entry, |e| &e.amended) {
        let mut observation = json!({
            "resourceType": "Observation",
            "id": entry_id(&view.id, &record.entry),
            "identifier": [entry_identifier(&record.entry)],
            "meta": meta(exam.time.0),
            "status": observation_status(&record.entered_in_error, &record.amended),
            "category": [{ "coding": [{
                "system": OBSERVATION_CATEGORY_SYSTEM,
                "code": match exam.kind {
                    ExamKind::Lab => "laboratory",
                    ExamKind::Imaging => "imaging",
                    ExamKind::Ecg => "procedure",
                },
            }] }],
            "code": exam_code(&exam.name, exam.measurements.first().and_then(|m| m.unit.as_deref())),
            "subject": subject,
            "effectiveDateTime": instant(exam.time.0),
            "performer": [organisation(exam.institution.as_str())],
        });
        if !exam.measurements.is_empty() {
            observation["component"] = exam
                .measurements
                .iter()
                .map(|m| {
                    let mut value = json!({ "value": m.value });
                    if let Some(unit) = &m.unit {
                        value["unit"] = json!(unit);
                    }
                    json!({ "code": exam_code(&m.name, m.unit.as_deref()), "valueQuantity": value })
                })
                .collect();
        }
        if let Some(report) = &exam.report {
            observation["valueString"] = json!(report);
        }
        entries.push(observation);
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_rfc3339_utc() {
        assert_eq!(instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(instant(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(instant(1_795_478_400_000), "2026-11-24T00:00:00.000Z");
        assert_eq!(instant(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(instant(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(instant(i64::MIN), "0001-01-01T00:00:00.000Z");
    }

    #[test]
    fn every_referral_status_maps_to_a_fhir_request_status() {
        for status in ReferralStatus::ALL {
            assert!(["active", "completed", "revoked"].contains(&request_status(*status)));
        }
    }
}

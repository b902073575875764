//! `/v1`: what clinical apps use. Health files and referrals, their typed operations,
//! searches and worklists, conflicts to review, history, and the change feed.

use std::collections::VecDeque;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use serde::{Deserialize, Serialize};

use super::error::{JsonBody, QueryParams, RawBody};
use super::{ApiError, ApiState, Caller, Loader, Route, Writer, blocking};
use crate::audit::AuditRecord;
use crate::index::{DESK_POSITION_BYTES, DeskPosition, Side};
use crate::model::automerge::ChangeHash;
use crate::model::{
    Demographics, Direction, DocumentId, DocumentKind, HealthFileOp, InstitutionId, NewReferral,
    ReferralOp, ReferralStatus, Timestamp, Urgency, View,
};
use crate::replica::{DESK_PAGE_MAX, DeskQuery, Node, hex_encode as hex};

/// Events sent per read of the audit log by a change feed.
const FEED_PAGE_RECORDS: usize = 256;
/// How long a quiet feed waits before a keep-alive, in seconds.
const FEED_KEEP_ALIVE_S: u64 = 15;
/// Most residents one bulk-load request may carry (lines of NDJSON); a loader sends more in
/// several requests.
pub const IMPORT_RESIDENTS_MAX: usize = 4_096;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::get("/v1/health-files", search_health_files),
        Route::post("/v1/health-files", create_health_file),
        Route::post("/v1/health-files/search", search_residents),
        Route::post("/v1/import", import_residents),
        Route::get("/v1/health-files/{id}", get_health_file),
        Route::post("/v1/health-files/{id}/operations", apply_health_file),
        Route::get("/v1/health-files/{id}/history", history),
        Route::get("/v1/referrals", list_referrals),
        Route::post("/v1/referrals", create_referral),
        Route::get("/v1/referrals/{id}", get_referral),
        Route::post("/v1/referrals/{id}/operations", apply_referral),
        Route::get("/v1/referrals/{id}/history", history),
        Route::get("/v1/conflicts", conflicts),
        Route::get("/v1/changes", changes),
    ]
}

/// Parses a document id from a path or query.
pub(super) fn document_id(text: &str) -> Result<DocumentId, ApiError> {
    DocumentId::parse(text).map_err(|_| {
        ApiError::bad_request(
            "malformed_id",
            "a document id is 32 lowercase hexadecimal characters",
        )
    })
}

/// Parses an institution id from a query.
pub(super) fn institution_id(text: &str) -> Result<InstitutionId, ApiError> {
    InstitutionId::new(text)
        .map_err(|e| ApiError::bad_request("malformed_institution", e.to_string()))
}

/// Parses a referral status from a query.
pub(super) fn referral_status(text: &str) -> Result<ReferralStatus, ApiError> {
    ReferralStatus::parse(text, "status").map_err(|_| {
        ApiError::bad_request(
            "malformed_status",
            "status is one of requested, accepted, declined, scheduled, no_show, arrived, completed, cancelled",
        )
    })
}

/// A written change, as a write returns it.
#[derive(Serialize)]
struct Written {
    id: DocumentId,
    change: ChangeHash,
    /// A redirect's onward referral.
    #[serde(skip_serializing_if = "Option::is_none")]
    onward: Option<Onward>,
}

/// The referral a redirect sent on, and the change that created it.
#[derive(Serialize)]
struct Onward {
    id: DocumentId,
    change: ChangeHash,
}

/// Makes a write on the blocking pool, as the app: its audit record names the app and is
/// durable with the change (`Node::writer`). Answers with the change.
async fn write(
    state: ApiState,
    caller: Caller,
    make: impl FnOnce(
        &ApiState,
        crate::replica::Writer<'_>,
    ) -> Result<(DocumentId, ChangeHash), ApiError>
    + Send
    + 'static,
) -> Result<Json<Written>, ApiError> {
    write_answer(state, caller, move |state, writer| {
        let (id, change) = make(state, writer)?;
        Ok(Written {
            id,
            change,
            onward: None,
        })
    })
    .await
}

/// As `write`, for a write that answers more than its change.
async fn write_answer(
    state: ApiState,
    caller: Caller,
    make: impl FnOnce(&ApiState, crate::replica::Writer<'_>) -> Result<Written, ApiError>
    + Send
    + 'static,
) -> Result<Json<Written>, ApiError> {
    blocking(move || Ok(Json(make(&state, state.node.writer(Some(&caller.app)))?))).await
}

/// A document's view with its conflicts to review, read and audited.
/// A document as the API answers it.
#[derive(Serialize)]
struct DocumentAnswer<'a, V: Serialize> {
    id: DocumentId,
    kind: DocumentKind,
    conflicts: Vec<String>,
    view: &'a V,
}

/// Reads a document's kept view and writes the answer straight from it: no copy of the view
/// and no intermediate JSON tree (a long file's answer is half a megabyte).
async fn read_document(
    state: ApiState,
    caller: Caller,
    id: &str,
    kind: DocumentKind,
) -> Result<axum::response::Response, ApiError> {
    let id = document_id(id)?;
    blocking(move || {
        if state
            .node
            .is_erased(&id)
            .map_err(crate::replica::NodeError::from)?
        {
            return Err(ApiError::new(
                StatusCode::GONE,
                "erased",
                "the document was erased on the consortium authority's order",
            ));
        }
        let kept = state.node.view(id, kind)?;
        if kind == DocumentKind::HealthFile
            && let Some(record) = state.node.resident_record_of(id, kept.as_ref())?
        {
            return linked_answer(&state, &caller, id, record);
        }
        let body = match kept.as_ref() {
            View::HealthFile(view) => serde_json::to_vec(&DocumentAnswer {
                id,
                kind,
                conflicts: view.conflicts(),
                view: view.as_ref(),
            }),
            View::Referral(view) => serde_json::to_vec(&DocumentAnswer {
                id,
                kind,
                conflicts: view.conflicts(),
                view,
            }),
            View::Roster(_) => return Err(ApiError::internal()),
        }
        .map_err(|_| ApiError::internal())?;
        state.node.record_access(&caller.app, &[(id, None)])?;
        Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response())
    })
    .await
}

/// A health file linked with others of the same resident, as the API answers it: the
/// combined record as the view, and how the files are linked.
#[derive(Serialize)]
struct LinkedAnswer<'a> {
    id: DocumentId,
    kind: DocumentKind,
    conflicts: Vec<String>,
    view: &'a crate::model::HealthFileView,
    linked: LinkedFiles<'a>,
}

/// How a resident's files are linked: the combined record's parts other than its view.
#[derive(Serialize)]
struct LinkedFiles<'a> {
    main: DocumentId,
    files: &'a [DocumentId],
    #[serde(skip_serializing_if = "<[DocumentId]>::is_empty")]
    missing: &'a [DocumentId],
    links:
        &'a std::collections::BTreeMap<DocumentId, crate::model::Register<crate::model::FileLink>>,
    entry_files: &'a std::collections::BTreeMap<crate::model::EntryId, DocumentId>,
}

/// A JSON answer already serialised.
fn json_body(body: Vec<u8>) -> axum::response::Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Answers a read of a linked health file with its resident's combined record, the read of
/// every file in it audited.
fn linked_answer(
    state: &ApiState,
    caller: &Caller,
    id: DocumentId,
    record: crate::model::CombinedRecord,
) -> Result<axum::response::Response, ApiError> {
    let body = serde_json::to_vec(&LinkedAnswer {
        id,
        kind: DocumentKind::HealthFile,
        conflicts: record.view.conflicts(),
        view: &record.view,
        linked: LinkedFiles {
            main: record.main,
            files: &record.files,
            missing: &record.missing,
            links: &record.links,
            entry_files: &record.entry_files,
        },
    })
    .map_err(|_| ApiError::internal())?;
    let accesses: Vec<_> = record.files.iter().map(|file| (*file, None)).collect();
    state.node.record_access(&caller.app, &accesses)?;
    Ok(json_body(body))
}

/// A registration's answer: the new file, and the files that may be the same resident
/// (`Node::duplicate_candidates`), for the registering clerk to check.
#[derive(Serialize)]
struct Registered {
    id: DocumentId,
    change: ChangeHash,
    possible_duplicates: Vec<crate::ResidentSummary>,
}

async fn create_health_file(
    State(state): State<ApiState>,
    Writer(caller): Writer,
    JsonBody(demographics): JsonBody<Demographics>,
) -> Result<impl IntoResponse, ApiError> {
    let registered = blocking(move || {
        let (id, change) = state
            .node
            .writer(Some(&caller.app))
            .create_health_file(&state.editor(), &demographics)?;
        let possible_duplicates = state.node.duplicate_candidates(&demographics, Some(id))?;
        // Shown to the app as a search's results are: audited alike.
        let accesses: Vec<_> = possible_duplicates.iter().map(|r| (r.id, None)).collect();
        state.node.record_access(&caller.app, &accesses)?;
        Ok(Json(Registered {
            id,
            change,
            possible_duplicates,
        }))
    })
    .await?;
    Ok((StatusCode::CREATED, registered))
}

/// A resident loaded: its line and its new file.
#[derive(Serialize)]
struct Loaded {
    line: usize,
    id: DocumentId,
    change: ChangeHash,
}

/// A resident not loaded: its line and why.
#[derive(Serialize)]
struct NotLoaded {
    line: usize,
    code: &'static str,
    reason: String,
}

/// What a bulk load did, line by line.
#[derive(Serialize)]
struct LoadAnswer {
    loaded: Vec<Loaded>,
    refused: Vec<NotLoaded>,
}

/// Bulk load: NDJSON, one resident's existing records per line in the data set's shape
/// (`crate::import::records`), each resident written as one signed change. A line that is
/// refused is reported with its number and the reason; the others are loaded.
async fn import_residents(
    State(state): State<ApiState>,
    Loader(caller): Loader,
    RawBody(body): RawBody,
) -> Result<Json<LoadAnswer>, ApiError> {
    blocking(move || {
        let text = std::str::from_utf8(&body).map_err(|_| {
            ApiError::bad_request(
                "malformed_import",
                "the body must be NDJSON in UTF-8: one resident's records per line",
            )
        })?;
        if text.lines().filter(|l| !l.trim().is_empty()).count() > IMPORT_RESIDENTS_MAX {
            return Err(ApiError::bad_request(
                "malformed_import",
                format!("at most {IMPORT_RESIDENTS_MAX} residents per request; send the rest in further requests"),
            ));
        }
        let mut refused = Vec::new();
        let (mut lines, mut residents) = (Vec::new(), Vec::new());
        for (line, read) in crate::import::residents_from_ndjson(text) {
            match read {
                Ok(resident) => {
                    lines.push(line);
                    residents.push(resident);
                }
                Err(error) => refused.push(NotLoaded {
                    line,
                    code: "invalid_record",
                    reason: error.to_string(),
                }),
            }
        }
        let outcomes = state
            .node
            .writer(Some(&caller.app))
            .import_health_files(&state.editor(), &residents, false)?;
        let mut loaded = Vec::with_capacity(outcomes.len());
        for (&line, outcome) in lines.iter().zip(outcomes) {
            match outcome {
                Ok((id, change)) => loaded.push(Loaded { line, id, change }),
                Err(crate::replica::NodeError::RepeatedInLoad { first }) => {
                    refused.push(NotLoaded {
                        line,
                        code: "repeated_in_load",
                        reason: format!(
                            "the same national id as line {}; one resident, one health file",
                            lines.get(first).copied().unwrap_or_default()
                        ),
                    })
                }
                Err(error) => {
                    let error = ApiError::from(error);
                    if error.status.is_server_error() {
                        return Err(error);
                    }
                    refused.push(NotLoaded {
                        line,
                        code: error.code,
                        reason: error.reason,
                    });
                }
            }
        }
        refused.sort_by_key(|r| r.line);
        Ok(Json(LoadAnswer { loaded, refused }))
    })
    .await
}

async fn apply_health_file(
    State(state): State<ApiState>,
    Writer(caller): Writer,
    Path(id): Path<String>,
    JsonBody(op): JsonBody<HealthFileOp>,
) -> Result<Json<Written>, ApiError> {
    let id = document_id(&id)?;
    write(state, caller, move |state, writer| {
        Ok((id, writer.apply_health_file(id, &state.editor(), &op)?))
    })
    .await
}

async fn get_health_file(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    read_document(state, caller, &id, DocumentKind::HealthFile).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameQuery {
    name: String,
}

/// A name in the query string: kept for the apps that use it, but the name ends up in the
/// access logs of every proxy on the way; `POST /v1/health-files/search` keeps it in the body.
async fn search_health_files(
    State(state): State<ApiState>,
    caller: Caller,
    QueryParams(query): QueryParams<NameQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let found = state.node.search_residents_by_name(&query.name)?;
        residents(&state, &caller, found)
    })
    .await
}

/// A search by the beginning of a name or by national id: one of the two.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResidentSearch {
    name: Option<String>,
    national_id: Option<String>,
}

/// Residents are searched with a POST so that neither a name nor a national id appears in a
/// URL (and so in an access log or a proxy's).
async fn search_residents(
    State(state): State<ApiState>,
    caller: Caller,
    JsonBody(query): JsonBody<ResidentSearch>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let found = match (query.name, query.national_id) {
            (Some(name), None) => state.node.search_residents_by_name(&name)?,
            (None, Some(national_id)) => state.node.find_residents_by_national_id(&national_id)?,
            _ => {
                return Err(ApiError::bad_request(
                    "malformed_query",
                    "give `name` or `national_id`, exactly one of them",
                ));
            }
        };
        residents(&state, &caller, found)
    })
    .await
}

fn residents(
    state: &ApiState,
    caller: &Caller,
    results: Vec<crate::ResidentSummary>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let accesses: Vec<_> = results.iter().map(|r| (r.id, None)).collect();
    state.node.record_access(&caller.app, &accesses)?;
    Ok(Json(serde_json::json!({ "results": results })))
}

async fn create_referral(
    State(state): State<ApiState>,
    Writer(caller): Writer,
    JsonBody(referral): JsonBody<NewReferral>,
) -> Result<impl IntoResponse, ApiError> {
    let written = write(state, caller, move |state, writer| {
        if state.node.kind_of(referral.patient)? != Some(DocumentKind::HealthFile) {
            return Err(ApiError::not_found(
                "the referral's patient is not a health file this node holds",
            ));
        }
        Ok(writer.create_referral(&state.editor(), &referral)?)
    })
    .await?;
    Ok((StatusCode::CREATED, written))
}

async fn apply_referral(
    State(state): State<ApiState>,
    Writer(caller): Writer,
    Path(id): Path<String>,
    JsonBody(op): JsonBody<ReferralOp>,
) -> Result<Json<Written>, ApiError> {
    let id = document_id(&id)?;
    write_answer(state, caller, move |state, writer| {
        Ok(match &op {
            // A redirect also sends the onward referral: the answer names it.
            ReferralOp::Redirect { to, reason } => {
                let (change, (onward, created)) =
                    writer.redirect_referral(id, &state.editor(), to, reason)?;
                Written {
                    id,
                    change,
                    onward: Some(Onward {
                        id: onward,
                        change: created,
                    }),
                }
            }
            op => Written {
                id,
                change: writer.apply_referral(id, &state.editor(), op)?,
                onward: None,
            },
        })
    })
    .await
}

async fn get_referral(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    read_document(state, caller, &id, DocumentKind::Referral).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferralQuery {
    to: Option<String>,
    from: Option<String>,
    status: Option<String>,
    urgency: Option<String>,
    direction: Option<String>,
    since: Option<String>,
    until: Option<String>,
    #[serde(rename = "_count")]
    count: Option<usize>,
    cursor: Option<String>,
    patient: Option<String>,
}

/// A desk's worklist, `?to=INST` (referrals it receives) or `?from=INST` (referrals it sent),
/// urgent first then oldest first, with optional filters (`status`, a comma-separated list;
/// `urgency`; `direction`; `since` and `until`, dates the referral was sent on or after and on
/// or before) and paging (`_count`, `cursor` from the page before's `next`); or the referrals
/// of a resident, `?patient=ID`.
async fn list_referrals(
    State(state): State<ApiState>,
    caller: Caller,
    QueryParams(query): QueryParams<ReferralQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (found, next) = referral_query(&state, query).await?;
    blocking(move || {
        let mut results = Vec::with_capacity(found.len());
        for id in &found {
            results.push(state.node.referral(*id)?);
        }
        let accesses: Vec<_> = found.iter().map(|id| (*id, None)).collect();
        state.node.record_access(&caller.app, &accesses)?;
        let mut answer = serde_json::json!({ "results": results });
        if let Some(next) = next {
            answer["next"] = hex(&next.encode()).into();
        }
        Ok(Json(answer))
    })
    .await
}

/// The referrals a query names, and where the next page starts.
async fn referral_query(
    state: &ApiState,
    query: ReferralQuery,
) -> Result<(Vec<DocumentId>, Option<DeskPosition>), ApiError> {
    let node = state.node.clone();
    if let Some(patient) = &query.patient {
        let filtered = [
            &query.to,
            &query.from,
            &query.status,
            &query.urgency,
            &query.direction,
        ]
        .iter()
        .chain([&query.since, &query.until, &query.cursor].iter())
        .any(|value| value.is_some())
            || query.count.is_some();
        if filtered {
            return Err(ApiError::bad_request(
                "malformed_query",
                "ask for `patient` alone, or for a desk (`to` or `from`) with its filters",
            ));
        }
        let patient = document_id(patient)?;
        return Ok((
            blocking(move || Ok(node.referrals_of(&patient)?)).await?,
            None,
        ));
    }
    let (institution, side) = match (&query.to, &query.from) {
        (Some(to), None) => (institution_id(to)?, Side::Receiving),
        (None, Some(from)) => (institution_id(from)?, Side::Sending),
        _ => {
            return Err(ApiError::bad_request(
                "malformed_query",
                "ask for one desk, `to` (referrals it receives) or `from` (referrals it sent), or for `patient` alone",
            ));
        }
    };
    let mut desk = DeskQuery::new(institution, side);
    if let Some(statuses) = &query.status {
        desk.statuses = statuses
            .split(',')
            .map(referral_status)
            .collect::<Result<_, _>>()?;
    }
    if let Some(urgency) = &query.urgency {
        desk.urgency = Some(Urgency::parse(urgency, "urgency").map_err(|_| {
            ApiError::bad_request("malformed_query", "urgency is routine or priority")
        })?);
    }
    if let Some(direction) = &query.direction {
        desk.direction =
            Some(Direction::parse(direction, "direction").map_err(|_| {
                ApiError::bad_request("malformed_query", "direction is up or down")
            })?);
    }
    desk.since = query
        .since
        .as_deref()
        .map(|d| day_start(d, "since"))
        .transpose()?;
    desk.until = query
        .until
        .as_deref()
        .map(|d| day_start(d, "until").map(|start| Timestamp(start.0 + DAY_MS)))
        .transpose()?;
    if let Some(count) = query.count {
        if !(1..=DESK_PAGE_MAX).contains(&count) {
            return Err(ApiError::bad_request(
                "malformed_query",
                format!("_count is 1 to {DESK_PAGE_MAX}"),
            ));
        }
        desk.count = count;
    }
    if let Some(cursor) = &query.cursor {
        desk.after = Some(desk_cursor(cursor)?);
    }
    let page = blocking(move || Ok(node.desk(&desk)?)).await?;
    Ok((page.referrals, page.next))
}

/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;

/// The first moment (UTC) of a `YYYY-MM-DD` date in a query.
fn day_start(text: &str, field: &'static str) -> Result<Timestamp, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "malformed_query",
            format!("`{field}` is a date, YYYY-MM-DD"),
        )
    };
    let date = crate::model::Date::new(text).map_err(|_| invalid())?;
    let mut parts = date.as_str().splitn(3, '-').map(str::parse::<i64>);
    let mut part = || parts.next().and_then(Result::ok).ok_or_else(invalid);
    let (year, month, day) = (part()?, part()?, part()?);
    Ok(Timestamp(
        crate::import::days_from_civil(year, month, day) * DAY_MS,
    ))
}

/// A desk page's `next`, as the page before answered it.
fn desk_cursor(text: &str) -> Result<DeskPosition, ApiError> {
    let malformed = || {
        ApiError::bad_request(
            "bad_cursor",
            "cursor is the `next` a page of the same desk answered",
        )
    };
    let bytes = crate::replica::hex_decode(text).ok_or_else(malformed)?;
    if bytes.len() != DESK_POSITION_BYTES {
        return Err(malformed());
    }
    DeskPosition::decode(&bytes).ok_or_else(malformed)
}

async fn history(
    State(state): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = document_id(&id)?;
    blocking(move || {
        let history = state.node.history(id)?;
        state.node.record_access(&caller.app, &[(id, None)])?;
        Ok(Json(serde_json::json!({ "id": id, "changes": history })))
    })
    .await
}

/// Documents with concurrent values for a clinician to review, and which fields.
async fn conflicts(
    State(state): State<ApiState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let mut results = Vec::new();
        for id in state.node.conflicted()? {
            let fields = match state.node.kind_of(id)? {
                Some(DocumentKind::HealthFile) => state.node.health_file(id)?.conflicts(),
                Some(DocumentKind::Referral) => state.node.referral(id)?.conflicts(),
                _ => continue,
            };
            results.push(serde_json::json!({ "id": id, "fields": fields }));
        }
        let accesses: Vec<_> = results
            .iter()
            .filter_map(|r| r["id"].as_str().and_then(|id| DocumentId::parse(id).ok()))
            .map(|id| (id, None))
            .collect();
        state.node.record_access(&caller.app, &accesses)?;
        Ok(Json(serde_json::json!({ "results": results })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedQuery {
    cursor: Option<u64>,
    /// Only referrals to or from this institution (a desk following its own).
    referrals_of: Option<String>,
    /// Only priority (green-channel) referrals.
    priority: Option<bool>,
}

/// What a feed follows.
#[derive(Clone, Default)]
pub(super) struct FeedFilter {
    referrals_of: Option<InstitutionId>,
    priority_only: bool,
}

impl FeedFilter {
    /// Whether the feed follows every event (no referral filter).
    fn is_everything(&self) -> bool {
        self.referrals_of.is_none() && !self.priority_only
    }

    /// Whether an event about `referral` (none for another kind of document) passes.
    fn passes(&self, referral: Option<&crate::model::ReferralView>) -> bool {
        if self.is_everything() {
            return true;
        }
        let Some(referral) = referral else {
            return false;
        };
        let ours = self
            .referrals_of
            .as_ref()
            .is_none_or(|institution| referral.from == *institution || referral.to == *institution);
        ours && (!self.priority_only || is_priority(referral))
    }
}

/// A referral whose urgency is priority, or in conflict with priority.
fn is_priority(referral: &crate::model::ReferralView) -> bool {
    std::iter::once(&referral.urgency.value)
        .chain(&referral.urgency.conflicts)
        .any(|urgency| *urgency == Urgency::Priority)
}

/// One event of the change feed: a decision about a change, by audit sequence (the cursor).
/// Ids only: an app that wants the content reads the document, and that read is audited. A
/// referral's event carries the status and urgency it has when the event is read, so a desk
/// learns "accepted" or "report ready" without a read.
#[derive(Clone, Debug, Serialize)]
pub struct FeedEvent {
    cursor: u64,
    action: crate::audit::AuditAction,
    document: DocumentId,
    kind: Option<DocumentKind>,
    change: Option<String>,
    institution: Option<InstitutionId>,
    at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<ReferralStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<bool>,
}

struct Feed {
    state: ApiState,
    cursor: u64,
    filter: FeedFilter,
    buffered: VecDeque<FeedEvent>,
    updates: tokio::sync::watch::Receiver<u64>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The change feed (Server-Sent Events): every change accepted, quarantined or withdrawn
/// after `cursor` (or the `Last-Event-ID` header), then new ones as they are decided; with
/// `referrals_of=INST`, only those of referrals to or from that institution, and with
/// `priority=true` only those of priority referrals. Each event's id is its cursor: reconnect
/// with it (and the same filters) to resume without gaps.
async fn changes(
    State(state): State<ApiState>,
    _caller: Caller,
    headers: HeaderMap,
    QueryParams(query): QueryParams<FeedQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let cursor = query.cursor.or(resume).unwrap_or(0);
    let filter = FeedFilter {
        referrals_of: query
            .referrals_of
            .as_deref()
            .map(institution_id)
            .transpose()?,
        priority_only: query.priority.unwrap_or(false),
    };
    if cursor > state.node.audit_sequence() {
        return Err(ApiError::bad_request(
            "cursor_ahead",
            "the cursor is past this node's log (was the node's store replaced?); resume from 0",
        ));
    }
    let slot = state.feeds.clone().try_acquire_owned().map_err(|_| {
        ApiError::busy(format!(
            "{} change feeds are open, the most this node serves; retry later",
            super::FEED_SUBSCRIBERS_MAX
        ))
    })?;
    let feed = Feed {
        updates: state.node.audit_updates(),
        state,
        cursor,
        filter,
        buffered: VecDeque::new(),
        _slot: slot,
    };
    let stream = futures::stream::unfold(feed, next_event);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(FEED_KEEP_ALIVE_S))))
}

/// The next event, waiting for one if the feed is caught up; ends at shutdown or if the log
/// cannot be read.
async fn next_event(mut feed: Feed) -> Option<(Result<Event, std::convert::Infallible>, Feed)> {
    loop {
        if let Some(event) = feed.buffered.pop_front() {
            let sse = Event::default()
                .id(event.cursor.to_string())
                .event("change")
                .json_data(&event)
                .ok()?;
            return Some((Ok(sse), feed));
        }
        let node = feed.state.node.clone();
        let filter = feed.filter.clone();
        let from = feed.cursor.saturating_add(1);
        let page = tokio::task::spawn_blocking(move || {
            let records = node.audit(from, FEED_PAGE_RECORDS)?;
            let last = records.last().map(|r| r.sequence);
            Ok::<_, crate::replica::NodeError>((last, decision_events(&node, records, &filter)))
        })
        .await
        .ok()?
        .ok()?;
        let (Some(last), events) = page else {
            let mut shutdown = feed.state.shutdown.clone();
            if *shutdown.borrow() {
                return None;
            }
            tokio::select! {
                changed = feed.updates.changed() => changed.ok()?,
                _ = shutdown.changed() => return None,
            }
            continue;
        };
        feed.cursor = last;
        feed.buffered.extend(events);
    }
}

/// The feed's events among `records` (decisions about changes) that pass `filter`.
pub(super) fn decision_events(
    node: &Node,
    records: Vec<AuditRecord>,
    filter: &FeedFilter,
) -> Vec<FeedEvent> {
    let mut events = Vec::new();
    for record in records.into_iter().filter(|r| r.action.is_decision()) {
        let kind = node.kind_of(record.document).ok().flatten();
        // A referral withdrawn or erased since is read as none.
        let referral = match kind {
            Some(DocumentKind::Referral) => node.referral(record.document).ok(),
            _ => None,
        };
        if filter.passes(referral.as_ref()) {
            events.push(feed_event(record, kind, referral.as_ref()));
        }
    }
    events
}

fn feed_event(
    record: AuditRecord,
    kind: Option<DocumentKind>,
    referral: Option<&crate::model::ReferralView>,
) -> FeedEvent {
    FeedEvent {
        cursor: record.sequence,
        action: record.action,
        document: record.document,
        kind,
        change: record.change.map(|c| ChangeHash(c).to_string()),
        institution: record.institution,
        at_ms: record.at_ms,
        status: referral.map(|r| r.status),
        priority: referral.map(is_priority),
    }
}

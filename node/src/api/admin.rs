//! `/admin`: what the `estuary` command shows and does, for the admin token only. No route
//! here returns patient data: documents appear by id, changes by hash, institutions by id.

use std::io::Write;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

use super::clinical::{document_id, institution_id};
use super::error::{JsonBody, QueryParams, RawBody};
use super::{Admin, ApiError, ApiState, Route, blocking};
use crate::audit::AuditRecord;
use crate::model::DocumentId;
use crate::replica::{Ingested, hex_encode as hex};

/// Most audit records one request returns.
pub const AUDIT_PAGE_MAX: usize = 1_000;
/// Most audit records one filtered request reads before it returns what it found and where
/// to go on from.
const AUDIT_SCAN_MAX: usize = 50_000;
/// Most documents one page of `/admin/documents` lists.
pub const DOCUMENTS_PAGE_MAX: usize = 1_000;
/// Most envelopes one import request carries.
pub const IMPORT_ENVELOPES_MAX: usize = 4_096;
/// Bytes of bundle sent per chunk of an export response.
const EXPORT_CHUNK_BYTES: usize = 64 * 1024;
/// Export chunks buffered between the store and a slow client.
const EXPORT_CHUNKS_QUEUED_MAX: usize = 8;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::get("/admin/status", status),
        Route::get("/admin/sync", sync),
        Route::get("/admin/roster", roster),
        Route::post("/admin/roster", offer_roster),
        Route::get("/admin/documents", documents),
        Route::get("/admin/quarantine", quarantine),
        Route::get("/admin/quarantine/{change}", quarantined_change),
        Route::post("/admin/quarantine/purge", purge_quarantine),
        Route::get("/admin/audit", audit),
        Route::get("/admin/audit/verify", verify_audit),
        Route::get("/admin/verify", verify),
        Route::post("/admin/repair", repair),
        Route::get("/admin/export", export),
        Route::post("/admin/import", import),
    ]
}

async fn status(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sync = state.sync.as_ref().map(|s| s.get());
    blocking(move || {
        let node = &state.node;
        Ok(Json(serde_json::json!({
            "institution": node.institution(),
            "node_key": node.public_key(),
            "peer_id": node.identity().peer_id().to_string(),
            "roster_version": node.roster_version(),
            "documents": node.catalogue().len(),
            "quarantined": node.quarantine_count(),
            "pending": node.pending_count()?,
            "storage_bytes": node.storage_bytes()?,
            "store_engine": node.store_engine(),
            "audit_records": node.audit_sequence(),
            "network": sync.is_some(),
            "connected_peers": sync.map_or(0, |s| s.peers.values().filter(|p| p.connected).count()),
            "uptime_s": state.started.elapsed().as_secs(),
            "version": env!("CARGO_PKG_VERSION"),
        })))
    })
    .await
}

async fn sync(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(sync) = &state.sync else {
        return Err(ApiError::not_found(
            "the node is not running its network layer (a stopped node's data directory)",
        ));
    };
    let stats = serde_json::to_value(sync.get()).map_err(|_| ApiError::internal())?;
    Ok(Json(stats))
}

async fn roster(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let membership = crate::membership::SignedRoster::verify(
            &state.node.signed_roster(),
            &state.node.authority(),
        )
        .map_err(|_| ApiError::internal())?;
        Ok(Json(
            serde_json::to_value(membership.view()).map_err(|_| ApiError::internal())?,
        ))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocumentsQuery {
    /// Start after this document id.
    after: Option<String>,
    /// Most documents to return.
    limit: Option<usize>,
}

/// A page of the documents held, in id order, with their kinds, heads and change hashes:
/// what a convergence check compares between nodes. Ids and hashes only.
async fn documents(
    State(state): State<ApiState>,
    _admin: Admin,
    QueryParams(query): QueryParams<DocumentsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = query
        .limit
        .unwrap_or(DOCUMENTS_PAGE_MAX)
        .clamp(1, DOCUMENTS_PAGE_MAX);
    let after = query.after.as_deref().map(document_id).transpose()?;
    blocking(move || {
        let ids: Vec<DocumentId> = state
            .node
            .catalogue()
            .ids()
            .map(|id| DocumentId::from_bytes(*id))
            .filter(|id| after.is_none_or(|after| *id > after))
            .take(limit)
            .collect();
        let mut documents = Vec::with_capacity(ids.len());
        for id in &ids {
            let heads = state.node.heads(*id)?;
            let changes = state.node.change_hashes(*id)?;
            documents.push(serde_json::json!({
                "id": id,
                "kind": state.node.kind_of(*id)?,
                "heads": heads.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "changes": changes.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            }));
        }
        let next = (ids.len() == limit).then(|| ids.last().copied()).flatten();
        Ok(Json(
            serde_json::json!({ "documents": documents, "next": next }),
        ))
    })
    .await
}

fn quarantine_json(entry: &crate::replica::QuarantineEntry) -> serde_json::Value {
    serde_json::json!({
        "change": hex(&entry.change),
        "document": entry.document,
        "reason": entry.reason,
        "envelope_bytes": entry.envelope_bytes,
        "envelope_kept": entry.envelope_kept,
        "at_ms": entry.at_ms,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineQuery {
    /// The cursor a previous page gave as `next`.
    after: Option<String>,
    /// Most records to return (at most `QUARANTINE_PAGE_RECORDS_MAX`).
    limit: Option<usize>,
}

/// One page of the quarantine; `next` is the cursor of the following page (absent at the
/// end).
async fn quarantine(
    State(state): State<ApiState>,
    _admin: Admin,
    QueryParams(query): QueryParams<QuarantineQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let page = state.node.quarantine_page(
            query.after.as_deref(),
            query
                .limit
                .unwrap_or(crate::replica::QUARANTINE_PAGE_RECORDS_MAX),
        )?;
        let entries: Vec<_> = page.entries.iter().map(quarantine_json).collect();
        Ok(Json(
            serde_json::json!({ "entries": entries, "next": page.next }),
        ))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    /// Only records quarantined before this time (milliseconds since the epoch); all if
    /// absent.
    before_ms: Option<u64>,
}

async fn purge_quarantine(
    State(state): State<ApiState>,
    _admin: Admin,
    JsonBody(request): JsonBody<PurgeRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let purged = state.node.purge_quarantine(request.before_ms)?;
        Ok(Json(serde_json::json!({ "purged": purged })))
    })
    .await
}

async fn quarantined_change(
    State(state): State<ApiState>,
    _admin: Admin,
    Path(change): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let hash = crate::model::Bytes32::parse_hex(&change, "change")
            .map_err(|_| ApiError::not_found("no quarantined change with that hash"))?;
        state
            .node
            .quarantined_change(&crate::model::automerge::ChangeHash(hash.0))?
            .first()
            .map(|entry| Json(quarantine_json(entry)))
            .ok_or_else(|| ApiError::not_found("no quarantined change with that hash"))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// First sequence to read.
    from: Option<u64>,
    /// Most records to return.
    limit: Option<usize>,
    /// Only records about this document.
    document: Option<String>,
    /// Only records about this health file or its referrals.
    patient: Option<String>,
    /// Only records of this institution.
    institution: Option<String>,
    /// Only records from this time on (milliseconds since the epoch).
    since_ms: Option<i64>,
}

/// An audit record as JSON, hashes in hex.
fn audit_json(record: &AuditRecord) -> serde_json::Value {
    serde_json::json!({
        "sequence": record.sequence,
        "at_ms": record.at_ms,
        "action": record.action,
        "document": record.document,
        "change": record.change.map(|c| hex(&c)),
        "institution": record.institution,
        "app": record.app,
        "previous": hex(&record.previous),
        "hash": hex(&record.hash()),
    })
}

/// A page of the audit log, filtered; `next` is where to go on from (absent at the end).
async fn audit(
    State(state): State<ApiState>,
    _admin: Admin,
    QueryParams(query): QueryParams<AuditQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = query
        .limit
        .unwrap_or(AUDIT_PAGE_MAX)
        .clamp(1, AUDIT_PAGE_MAX);
    let document: Option<DocumentId> = query.document.as_deref().map(document_id).transpose()?;
    let patient: Option<DocumentId> = query.patient.as_deref().map(document_id).transpose()?;
    let institution = query
        .institution
        .as_deref()
        .map(institution_id)
        .transpose()?;
    blocking(move || {
        // A resident's documents by id from the index: no content is read, so nothing here
        // is itself a read to audit.
        let documents: Option<std::collections::BTreeSet<DocumentId>> = match patient {
            Some(patient) => {
                let mut ids: std::collections::BTreeSet<_> =
                    state.node.referrals_of(&patient)?.into_iter().collect();
                ids.insert(patient);
                Some(ids)
            }
            None => None,
        };
        let head = state.node.audit_sequence();
        let mut from = query.from.unwrap_or(1).max(1);
        let mut found = Vec::new();
        let mut scanned = 0;
        while found.len() < limit && scanned < AUDIT_SCAN_MAX && from <= head {
            let page = state.node.audit(from, AUDIT_PAGE_MAX)?;
            let Some(last) = page.last().map(|r| r.sequence) else {
                break;
            };
            scanned += page.len();
            for record in page {
                from = record.sequence + 1;
                let wanted = document.is_none_or(|d| record.document == d)
                    && documents
                        .as_ref()
                        .is_none_or(|ids| ids.contains(&record.document))
                    && institution
                        .as_ref()
                        .is_none_or(|i| record.institution.as_ref() == Some(i))
                    && query.since_ms.is_none_or(|since| record.at_ms >= since);
                if wanted {
                    found.push(audit_json(&record));
                    if found.len() == limit {
                        break;
                    }
                }
            }
            if last >= head {
                break;
            }
        }
        let next = (from <= head).then_some(from);
        Ok(Json(
            serde_json::json!({ "records": found, "next": next, "head": head }),
        ))
    })
    .await
}

async fn verify_audit(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let records = state.node.audit_sequence();
        let problem = state.node.verify_audit().map(|p| p.what);
        Ok(Json(serde_json::json!({
            "records": records,
            "sound": problem.is_none(),
            "problem": problem,
        })))
    })
    .await
}

async fn verify(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<serde_json::Value>, ApiError> {
    blocking(move || {
        let report = state.node.verify()?;
        let affected = report.affected_documents();
        Ok(Json(serde_json::json!({
            "envelopes": report.envelopes,
            "documents": report.documents,
            "problems": report.problems,
            "affected_documents": affected,
            "sound": report.problems.is_empty(),
        })))
    })
    .await
}

/// Takes the documents `verify` finds damaged out of the store, for anti-entropy to fetch
/// again from peers, and clears the record of changes the store lost.
async fn repair(
    State(state): State<ApiState>,
    _admin: Admin,
) -> Result<Json<crate::replica::RepairReport>, ApiError> {
    blocking(move || Ok(Json(state.node.repair()?))).await
}

/// Writes into a bounded channel in chunks, blocking when the client is slow; fails once the
/// client has gone, which stops the export.
struct ChannelWriter {
    chunk: Vec<u8>,
    sender: tokio::sync::mpsc::Sender<Bytes>,
}

impl Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.chunk.extend_from_slice(bytes);
        if self.chunk.len() >= EXPORT_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.chunk));
        self.sender
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("the client stopped reading the export"))
    }
}

/// Every envelope this node holds, as a bundle signed by its key (see `bundle`).
async fn export(
    State(state): State<ApiState>,
    Admin(caller): Admin,
) -> Result<impl IntoResponse, ApiError> {
    // On record before a byte leaves.
    let node = state.node.clone();
    blocking(move || Ok(node.record_export(&caller.app)?)).await?;
    let (sender, mut receiver) = tokio::sync::mpsc::channel(EXPORT_CHUNKS_QUEUED_MAX);
    let node = state.node.clone();
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            chunk: Vec::with_capacity(EXPORT_CHUNK_BYTES),
            sender,
        };
        match crate::bundle::export(&node, writer, |_, _| {}) {
            Ok(summary) => tracing::info!(
                documents = summary.documents,
                bytes = summary.bytes,
                "bundle exported"
            ),
            // A failed export ends the response early; the reader's signature check fails.
            Err(error) => tracing::warn!(%error, "bundle export stopped"),
        }
    });
    let stream = futures::stream::poll_fn(move |cx| {
        receiver
            .poll_recv(cx)
            .map(|chunk| chunk.map(Ok::<_, std::convert::Infallible>))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    ))
}

/// How an import chunk went.
#[derive(Default, Serialize)]
struct Imported {
    accepted: u64,
    duplicate: u64,
    pending: u64,
    quarantined: u64,
    refused: u64,
    /// Changes of documents erased on the authority's order: refused, not kept.
    erased: u64,
}

/// One item of an import request: an envelope (a bundle of format 1) or a document as a
/// covered fetch carries it (format 2).
#[derive(Deserialize)]
#[serde(untagged)]
enum ImportItem {
    Envelope(serde_bytes::ByteBuf),
    Document(crate::sync::protocol::CoveredDocument),
}

/// A chunk of a bundle's envelopes or documents (CBOR array of byte strings or maps), through
/// the ordinary pipeline. The `estuary` command checks the bundle's signature before it sends any.
/// A signed roster offered to the node (a courier's bundle carries its exporter's): adopted
/// when newer, an erasure or a revocation in it in force before this answers. The network
/// layer reads the roster in force for every peer it checks, and offers it to peers.
async fn offer_roster(
    State(state): State<ApiState>,
    _admin: Admin,
    RawBody(body): RawBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    use crate::membership::{RosterError, RosterUpdate};
    use crate::replica::NodeError;
    let signed = body.to_vec();
    let node = state.node.clone();
    let update = blocking(move || Ok(node.update_roster(&signed))).await?;
    // An older roster than the node's (a bundle exported before the node's last update) is
    // no error: the node keeps the newer one.
    let (version, adopted) = match update {
        Ok(RosterUpdate::Adopted { version }) => (version, true),
        Ok(RosterUpdate::AlreadyHeld { version })
        | Err(NodeError::Roster(RosterError::Stale {
            current: version, ..
        })) => (version, false),
        Err(NodeError::Roster(refused)) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "roster_refused",
                refused.to_string(),
            ));
        }
        Err(error) => return Err(error.into()),
    };
    Ok(Json(
        serde_json::json!({ "version": version, "adopted": adopted }),
    ))
}

async fn import(
    State(state): State<ApiState>,
    _admin: Admin,
    RawBody(body): RawBody,
) -> Result<Json<Imported>, ApiError> {
    let items: Vec<ImportItem> = crate::cbor::decode_exact(body.as_ref()).map_err(|_| {
        ApiError::bad_request(
            "malformed_import",
            "the body must be a CBOR array of envelopes (byte strings) or documents (maps)",
        )
    })?;
    if items.len() > IMPORT_ENVELOPES_MAX {
        return Err(ApiError::bad_request(
            "malformed_import",
            format!("at most {IMPORT_ENVELOPES_MAX} envelopes or documents per import request"),
        ));
    }
    let (mut envelopes, mut documents) = (Vec::new(), Vec::new());
    for item in items {
        match item {
            ImportItem::Envelope(envelope) => envelopes.push(envelope),
            ImportItem::Document(document) => documents.push(document),
        }
    }
    blocking(move || {
        // Documents go as fetched ones do: whole where they can, change by change otherwise.
        let carried = crate::sync::document::ingest_covered(&state.node, &documents)
            .and_then(|taken| taken.durable(&state.node))
            .map_err(|error| match error {
                crate::sync::document::DocumentSyncError::Node(error) => ApiError::from(*error),
                crate::sync::document::DocumentSyncError::Ingest(error) => {
                    ApiError::from(crate::replica::NodeError::from(*error))
                }
                error => {
                    tracing::warn!(%error, "importing documents failed");
                    ApiError::internal()
                }
            })?;
        let outcomes = state
            .node
            .ingest_many(&envelopes)
            .map_err(crate::replica::NodeError::from)?;
        let mut imported = Imported {
            accepted: carried.accepted as u64,
            duplicate: carried.duplicate as u64,
            pending: carried.pending as u64,
            refused: carried.rejected as u64,
            ..Imported::default()
        };
        for outcome in outcomes {
            match outcome {
                Ok(Ingested::Accepted(_)) => imported.accepted += 1,
                Ok(Ingested::Duplicate(_)) => imported.duplicate += 1,
                Ok(Ingested::Pending(_)) => imported.pending += 1,
                Ok(Ingested::Quarantined(..)) => imported.quarantined += 1,
                Err(crate::replica::IngestError::Erased { .. }) => imported.erased += 1,
                Err(_) => imported.refused += 1,
            }
        }
        Ok(Json(imported))
    })
    .await
}

//! `/health` and `/metrics` (Prometheus text format): figures about the node, the store, sync
//! per peer and the API itself. Labels are peer ids and institution ids, never patient data.
//!
//! Some figures move with every clinical read: each read appends an audit record (to the log,
//! and so to the store's size on disk) and is an API request. Watched over time they say
//! when, and how often, records are read, so they are served only to the admin token
//! ([`Access::Full`]). The rest (documents, quarantine, sync, peers) move only with writes
//! and the network.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;

use super::challenge::{self, CHALLENGE_NONCE_BYTES};
use super::error::QueryParams;
use super::{ApiError, ApiState, Counter, bearer_token, blocking};
use crate::latency::Histogram;
use crate::model::Bytes32;

/// The API's own figures.
#[derive(Default)]
pub(super) struct ApiMetrics {
    ok: Counter,
    client_errors: Counter,
    server_errors: Counter,
    duration_us: Counter,
    /// Latency of the clinical reads (GET of `/v1` and `/fhir`).
    reads: Histogram,
    /// Latency of the clinical writes (POST of `/v1` and `/fhir`).
    writes: Histogram,
}

impl ApiMetrics {
    /// Counts a request to `route` (the matched route, never the URI).
    pub(super) fn record(&self, method: &Method, route: &str, status: StatusCode, took: Duration) {
        match status.as_u16() {
            500.. => self.server_errors.add(1),
            400..500 => self.client_errors.add(1),
            _ => self.ok.add(1),
        }
        self.duration_us
            .add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        if route.starts_with("/v1/") || route == "/fhir" || route.starts_with("/fhir/") {
            match *method {
                Method::GET => self.reads.observe(took),
                Method::POST => self.writes.observe(took),
                _ => {}
            }
        }
    }
}

impl Families {
    /// A histogram family with its buckets, count and sum.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let (buckets, count, sum) = histogram.snapshot();
        let bucket = format!("{name}_bucket");
        for (bound, cumulative) in buckets {
            let le = bound.to_string();
            let mut with = labels.to_vec();
            with.push(("le", &le));
            self.sample(&bucket, &with, cumulative);
        }
        let mut with = labels.to_vec();
        with.push(("le", "+Inf"));
        self.sample(&bucket, &with, count);
        self.sample(&format!("{name}_count"), labels, count);
        self.sample(&format!("{name}_sum"), labels, sum);
    }
}

/// Other parameters are ignored, as they were before the challenge existed: health checkers
/// may add their own.
#[derive(Deserialize)]
pub(super) struct HealthQuery {
    /// A client's nonce, hex, to be signed with the node key.
    challenge: Option<String>,
}

pub(super) async fn health(
    State(state): State<ApiState>,
    QueryParams(query): QueryParams<HealthQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let nonce = query
        .challenge
        .map(|text| {
            Bytes32::parse_hex(&text, "challenge").map_err(|_| {
                ApiError::bad_request(
                    "malformed_query",
                    format!(
                        "challenge must be {} lowercase hex characters ({CHALLENGE_NONCE_BYTES} random bytes)",
                        2 * CHALLENGE_NONCE_BYTES
                    ),
                )
            })
        })
        .transpose()?;
    blocking(move || {
        let mut body = serde_json::json!({
            "status": "ok",
            "institution": state.node.institution(),
            "roster_version": state.node.roster_version(),
        });
        if let Some(nonce) = nonce {
            body["challenge"] = serde_json::json!({
                "key": state.node.public_key().to_string(),
                "signature": challenge::answer(
                    state.node.identity(),
                    &nonce.0,
                    state.config.api.listen,
                ),
            });
        }
        Ok(axum::Json(body))
    })
    .await
}

/// Which figures a `/metrics` caller gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Every figure: the caller holds the admin token.
    Full,
    /// Figures that do not move with clinical reads: no token, and the config allows it.
    WithoutReads,
}

fn access(state: &ApiState, headers: &HeaderMap) -> Result<Access, ApiError> {
    match bearer_token(headers)? {
        Some(token) if state.config.is_admin(token) => Ok(Access::Full),
        Some(_) if state.config.api.metrics_token_required => Err(ApiError::forbidden(
            "/metrics takes only the admin token from the node's config",
        )),
        Some(_) => Err(ApiError::forbidden(
            "/metrics takes the admin token from the node's config, or no token",
        )),
        None if state.config.api.metrics_token_required => Err(ApiError::unauthorized(
            "/metrics needs the admin token (api.metrics_token_required is true)",
        )),
        None => Ok(Access::WithoutReads),
    }
}

/// Writes one metric family: its help, type and samples.
struct Families(String);

impl Families {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }
}

pub(super) async fn metrics(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let access = access(&state, &headers)?;
    // Node figures are read on the blocking pool: some wait for the node's decision lock.
    blocking(move || render(&state, access)).await
}

fn render(state: &ApiState, access: Access) -> Result<impl IntoResponse + use<>, ApiError> {
    let pending = state.node.pending_count()?;
    let mut out = Families(String::new());
    out.gauge(
        "estuary_documents",
        "Documents this node holds.",
        state.node.catalogue().len(),
    );
    out.gauge(
        "estuary_quarantined_changes",
        "Changes refused and kept in quarantine.",
        state.node.quarantine_count(),
    );
    out.gauge(
        "estuary_pending_changes",
        "Changes waiting for their dependencies.",
        pending,
    );
    out.gauge(
        "estuary_roster_version",
        "Version of the roster in force.",
        state.node.roster_version(),
    );
    out.gauge(
        "estuary_uptime_seconds",
        "Seconds since the API started.",
        state.started.elapsed().as_secs(),
    );
    out.family(
        "estuary_decision_duration_seconds",
        "histogram",
        "Seconds from a change's arrival in the pipeline to its durable decision, per change.",
    );
    out.histogram(
        "estuary_decision_duration_seconds",
        &[],
        state.node.decision_latency(),
    );
    // Without a network (a command reading a stopped store) the families are there, empty.
    let stats = state
        .sync
        .as_ref()
        .map(|sync| sync.get())
        .unwrap_or_default();
    write_sync(&mut out, &stats);
    if access == Access::Full {
        write_reads(&mut out, state)?;
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.0,
    ))
}

/// The figures that move with every clinical read.
fn write_reads(out: &mut Families, state: &ApiState) -> Result<(), ApiError> {
    out.gauge(
        "estuary_storage_bytes",
        "Bytes the store occupies on disk.",
        state.node.storage_bytes()?,
    );
    out.gauge(
        "estuary_audit_records",
        "Records in the audit log.",
        state.node.audit_sequence(),
    );
    let m = &state.metrics;
    out.family(
        "estuary_api_requests_total",
        "counter",
        "API requests served, by status class.",
    );
    for (class, counter) in [
        ("2xx", &m.ok),
        ("4xx", &m.client_errors),
        ("5xx", &m.server_errors),
    ] {
        out.sample(
            "estuary_api_requests_total",
            &[("class", class)],
            counter.get(),
        );
    }
    out.family(
        "estuary_api_request_seconds_total",
        "counter",
        "Seconds spent serving API requests (divide by the request count for the mean).",
    );
    out.sample(
        "estuary_api_request_seconds_total",
        &[],
        m.duration_us.get() as f64 / 1e6,
    );
    out.family(
        "estuary_api_request_duration_seconds",
        "histogram",
        "Seconds to answer a clinical request (/v1 and /fhir), by kind: read (GET) or write (POST).",
    );
    out.histogram(
        "estuary_api_request_duration_seconds",
        &[("kind", "read")],
        &m.reads,
    );
    out.histogram(
        "estuary_api_request_duration_seconds",
        &[("kind", "write")],
        &m.writes,
    );
    Ok(())
}

fn write_sync(out: &mut Families, stats: &crate::sync::SyncStats) {
    type Figure = fn(&crate::sync::PeerStats) -> Option<f64>;
    let per_peer: [(&str, &str, &str, Figure); 13] = [
        (
            "estuary_peer_connected",
            "gauge",
            "Whether the peer is connected (1) or not (0).",
            |p| Some(if p.connected { 1.0 } else { 0.0 }),
        ),
        (
            "estuary_peer_received_bytes_total",
            "counter",
            "Bytes received from the peer.",
            |p| Some(p.bytes_in as f64),
        ),
        (
            "estuary_peer_sent_bytes_total",
            "counter",
            "Bytes sent to the peer.",
            |p| Some(p.bytes_out as f64),
        ),
        (
            "estuary_peer_received_messages_total",
            "counter",
            "Messages received from the peer.",
            |p| Some(p.messages_in as f64),
        ),
        (
            "estuary_peer_sent_messages_total",
            "counter",
            "Messages sent to the peer.",
            |p| Some(p.messages_out as f64),
        ),
        (
            "estuary_peer_changes_received_total",
            "counter",
            "Changes from the peer that were accepted.",
            |p| Some(p.changes_received as f64),
        ),
        (
            "estuary_peer_changes_rejected_total",
            "counter",
            "Changes from the peer that were refused.",
            |p| Some(p.changes_rejected as f64),
        ),
        (
            "estuary_peer_lag_documents",
            "gauge",
            "Documents that differed at the last reconciliation with the peer.",
            |p| p.lag.map(|l| l as f64),
        ),
        (
            "estuary_peer_last_reconciled_timestamp_seconds",
            "gauge",
            "When a reconciliation with the peer last completed.",
            |p| p.last_reconciled_ms.map(|ms| ms as f64 / 1e3),
        ),
        (
            "estuary_peer_score",
            "gauge",
            "The peer's gossip score.",
            |p| p.score,
        ),
        (
            "estuary_peer_strikes",
            "gauge",
            "Faulty answers the peer gave to this node's sync requests.",
            |p| Some(f64::from(p.strikes)),
        ),
        (
            "estuary_peer_unanswered_requests_total",
            "counter",
            "This node's sync requests the peer let time out.",
            |p| Some(p.unanswered as f64),
        ),
        (
            "estuary_peer_rtt_seconds",
            "gauge",
            "The last ping round trip to the peer.",
            |p| p.rtt_ms.map(|ms| ms / 1e3),
        ),
    ];
    for (name, kind, help, figure) in per_peer {
        out.family(name, kind, help);
        for (peer, p) in &stats.peers {
            if let Some(value) = figure(p) {
                let institution = p.institution.as_deref().unwrap_or("");
                out.sample(name, &[("peer", peer), ("institution", institution)], value);
            }
        }
    }
    out.gauge(
        "estuary_catch_up_documents",
        "Documents found missing here since start.",
        stats.catch_up.documents_total,
    );
    out.gauge(
        "estuary_catch_up_documents_done",
        "Of those, fetched.",
        stats.catch_up.documents_done,
    );
    out.family(
        "estuary_disconnected_peers_total",
        "counter",
        "Peers disconnected for their gossip score, their faulty answers or revocation.",
    );
    out.sample("estuary_disconnected_peers_total", &[], stats.disconnected);
    out.family(
        "estuary_denied_connections_total",
        "counter",
        "Connections the gate denied: strangers, revoked keys, banned peers.",
    );
    out.sample("estuary_denied_connections_total", &[], stats.denied);
}

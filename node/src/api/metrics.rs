//! `/health` and `/metrics` (Prometheus text format): figures about the node, the store, sync
//! per peer and the API itself. Labels are peer ids and institution ids, never patient data.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::{ApiError, ApiState, Counter, blocking};

/// The API's own figures.
#[derive(Default)]
pub(super) struct ApiMetrics {
    ok: Counter,
    client_errors: Counter,
    server_errors: Counter,
    duration_us: Counter,
}

impl ApiMetrics {
    pub(super) fn record(&self, status: StatusCode, took: Duration) {
        match status.as_u16() {
            500.. => self.server_errors.add(1),
            400..500 => self.client_errors.add(1),
            _ => self.ok.add(1),
        }
        self.duration_us
            .add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }
}

pub(super) async fn health(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    blocking(move || {
        Ok(axum::Json(serde_json::json!({
            "status": "ok",
            "institution": state.node.institution(),
            "roster_version": state.node.roster_version(),
        })))
    })
    .await
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

pub(super) async fn metrics(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    // Node figures are read on the blocking pool: some wait for the node's decision lock.
    blocking(move || render(&state)).await
}

fn render(state: &ApiState) -> Result<impl IntoResponse + use<>, ApiError> {
    let pending = state.node.pending_count()?;
    let storage_bytes = state.node.storage_bytes()?;
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
        "estuary_storage_bytes",
        "Bytes the store occupies on disk.",
        storage_bytes,
    );
    out.gauge(
        "estuary_roster_version",
        "Version of the roster in force.",
        state.node.roster_version(),
    );
    out.gauge(
        "estuary_audit_records",
        "Records in the audit log.",
        state.node.audit_sequence(),
    );
    out.gauge(
        "estuary_uptime_seconds",
        "Seconds since the API started.",
        state.started.elapsed().as_secs(),
    );
    if let Some(sync) = &state.sync {
        write_sync(&mut out, &sync.get());
    }
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
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.0,
    ))
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

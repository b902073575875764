//! `/dashboard`: the consortium at a glance for institution IT, in a browser. The page is
//! static code embedded in the binary (no CDN, no data of its own); everything it shows comes
//! from `/admin/dashboard` and the change feed, both behind the admin token, which the page
//! takes from its URL fragment (`/dashboard#token=…`, which a browser never sends to a
//! server) or from a form. What it shows names members, peers, documents and changes by id
//! and counts them: never patient data.
//!
//! A sampler beside the API keeps what the figures of one moment cannot give: each peer's
//! lag over the last hour, and the audit chain checked as it grows.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;

use super::{Admin, ApiError, ApiState, Route, blocking};
use crate::audit::{AuditAction, ChainCheck, now_unix_ms as now_ms};
use crate::model::{InstitutionKind, RosterView};
use crate::replica::{Node, hex_encode as hex};
use crate::sync::{CatchUp, PeerStats, StatsReader, SyncStats};

/// How often the sampler records each peer's lag, in seconds.
pub const LAG_SAMPLE_INTERVAL_S: u64 = 10;
/// How far back the lag chart reaches, in seconds.
pub const LAG_HISTORY_WINDOW_S: u64 = 3_600;
/// Samples kept per peer: the window at the sampling interval.
const LAG_SAMPLES_PER_PEER_MAX: usize = (LAG_HISTORY_WINDOW_S / LAG_SAMPLE_INTERVAL_S) as usize;
/// Peers whose lag history is kept. A new peer beyond it takes the place of one with no
/// sample in the last window, or goes uncharted until one ages out.
pub const LAG_HISTORY_PEERS_MAX: usize = 256;
/// Audit records read back from the head to estimate what a disconnected peer lacks; a peer
/// that left before them gets a lower bound (`lag_at_least`).
pub const LAG_SCAN_RECORDS_MAX: usize = 20_000;
/// Disconnected peers whose lag is estimated, the most recently gone first; the others show
/// the lag they left with, as a lower bound.
pub const LAG_ESTIMATED_PEERS_MAX: usize = 64;
/// Audit records the sampler checks per sample, so that a long log is checked over several
/// samples rather than in one long read.
pub const AUDIT_CHECK_RECORDS_PER_SAMPLE: usize = 200_000;
/// Audit records a dashboard request checks (what was written since the last sample, on a
/// node that is not catching up a long log), so that a page's poll stays short.
pub const AUDIT_CHECK_RECORDS_PER_REQUEST: usize = 10_000;
/// Quarantined changes listed with their reasons (the count is always whole).
pub const QUARANTINE_SHOWN_MAX: usize = 50;
/// The latest decisions a snapshot carries, so that the page (and a static copy) opens with
/// the feed's recent past; the live feed goes on from the snapshot's last record.
pub const RECENT_CHANGES_MAX: usize = 40;
/// Audit records read back from the head to find them (reads among them are skipped).
const RECENT_SCAN_RECORDS: u64 = 400;

const _: () = assert!(LAG_SAMPLES_PER_PEER_MAX >= 2 && LAG_SAMPLES_PER_PEER_MAX <= 3_600);

/// The page: HTML, style and script in one file.
const PAGE: &str = include_str!("dashboard.html");
/// Where a static copy carries its snapshot.
const SNAPSHOT_SLOT: &str = r#"<script id="snapshot" type="application/json"></script>"#;

pub(super) fn routes() -> Vec<Route> {
    vec![
        Route::get("/dashboard", page),
        Route::get("/admin/dashboard", figures),
    ]
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page needs is in it or on this node.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}

async fn figures(State(state): State<ApiState>, _admin: Admin) -> Result<Json<Snapshot>, ApiError> {
    let stats = state.sync.as_ref().map(StatsReader::get);
    let history = state.dashboard.clone();
    let uptime_s = state.started.elapsed().as_secs();
    blocking(move || {
        check_audit(&state.node, &history, AUDIT_CHECK_RECORDS_PER_REQUEST);
        snapshot(&state.node, stats.as_ref(), &history, uptime_s)
            .map(Json)
            .map_err(|_| ApiError::internal())
    })
    .await
}

/// A static copy of the dashboard showing `snapshot` (a [`Snapshot`], or its JSON as
/// `/admin/dashboard` answers it): the page with the figures in it, for a report. It fetches
/// nothing.
pub fn static_page(snapshot: &impl Serialize) -> Result<String, serde_json::Error> {
    // Inside a script element, a `<` could start `</script>` or `<!--`: JSON spells it as an
    // escape instead.
    let json = serde_json::to_string(snapshot)?.replace('<', "\\u003c");
    Ok(PAGE.replacen(
        SNAPSHOT_SLOT,
        &format!(r#"<script id="snapshot" type="application/json">{json}</script>"#),
        1,
    ))
}

/// Everything the dashboard shows at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// When it was taken (milliseconds since the epoch).
    pub at_ms: u64,
    /// This node.
    pub node: NodeFigures,
    /// Every member of the roster, with its nodes as this node sees them.
    pub members: Vec<MemberState>,
    /// Peers connected or seen that the roster does not name (revoked or not yet listed).
    pub strangers: Vec<PeerState>,
    /// Bulk catch-up progress.
    pub catch_up: CatchUp,
    /// What is quarantined and why.
    pub quarantine: QuarantineFigures,
    /// The latest decisions, the latest last, as the change feed carries them, up to
    /// `audit.records`; the live feed goes on from there.
    pub recent_changes: Vec<super::clinical::FeedEvent>,
    /// The audit log's hash chain.
    pub audit: AuditState,
    /// Each peer's lag over the last hour.
    pub lag_history: Vec<LagSeries>,
}

/// This node's own figures.
#[derive(Clone, Debug, Serialize)]
pub struct NodeFigures {
    /// Its institution.
    pub institution: String,
    /// Its libp2p peer id.
    pub peer_id: String,
    /// The release it runs.
    pub version: &'static str,
    /// Seconds since the API started.
    pub uptime_s: u64,
    /// Documents held.
    pub documents: u64,
    /// Changes waiting for their dependencies.
    pub pending: u64,
    /// Bytes on disk.
    pub storage_bytes: u64,
    /// The roster version held.
    pub roster_version: u64,
    /// Whether the network layer runs (a node started without it shows no peers).
    pub network: bool,
}

/// A member institution on the map.
#[derive(Clone, Debug, Serialize)]
pub struct MemberState {
    /// Its id.
    pub id: String,
    /// Its display name.
    pub name: String,
    /// Core hospital, district hospital or community centre.
    pub kind: InstitutionKind,
    /// Its area on the consortium's map, if the roster says.
    pub area: Option<String>,
    /// `this_node`, `connected` (a node of it is), `disconnected` (none is, one was),
    /// `not_seen` (none has been connected since this node started) or `revoked` (every key
    /// of it is revoked).
    pub state: &'static str,
    /// Documents it lacks or this node lacks, as far as this node knows: the most over its
    /// nodes (see `PeerState::lag`).
    pub lag: Option<u64>,
    /// Its nodes this node has seen.
    pub peers: Vec<PeerState>,
}

/// One peer node.
#[derive(Clone, Debug, Serialize)]
pub struct PeerState {
    /// Its libp2p peer id.
    pub peer_id: String,
    /// Its institution, if the roster names it.
    pub institution: Option<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// How far apart the two nodes are, in documents: while connected, the documents that
    /// differed at the last reconciliation; once disconnected, those plus the documents this
    /// node has accepted changes to since (which the peer cannot have had from it).
    pub lag: Option<u64>,
    /// Whether the lag is a lower bound (more changes since the disconnection than were read).
    pub lag_at_least: bool,
    /// When a reconciliation with it last completed.
    pub last_reconciled_ms: Option<u64>,
    /// When it disconnected, while it is.
    pub disconnected_ms: Option<u64>,
    /// Bytes received from it.
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
    /// Its gossipsub score.
    pub score: Option<f64>,
    /// Faulty answers it gave.
    pub strikes: u32,
}

/// The quarantine: its size and the latest reasons.
#[derive(Clone, Debug, Serialize)]
pub struct QuarantineFigures {
    /// Changes quarantined or refused.
    pub count: u64,
    /// Up to `QUARANTINE_SHOWN_MAX` of them, the latest first among the `scanned` read.
    pub shown: Vec<QuarantinedChange>,
    /// Entries read to choose them (the first page in key order: refused changes, then
    /// quarantined ones); when it is less than `count`, later ones may be missing.
    pub scanned: u64,
}

/// A quarantined change, by id.
#[derive(Clone, Debug, Serialize)]
pub struct QuarantinedChange {
    /// The change hash.
    pub change: String,
    /// Its document.
    pub document: String,
    /// Why (names fields and rules, never content).
    pub reason: String,
    /// When.
    pub at_ms: u64,
}

/// The audit chain's state.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditState {
    /// Records in the log.
    pub records: u64,
    /// Records whose hash chain the sampler has checked, from the first.
    pub checked: u64,
    /// `false` once a break is found.
    pub sound: bool,
    /// The break, if any.
    pub problem: Option<String>,
    /// When the check last ran (milliseconds since the epoch).
    pub checked_ms: Option<u64>,
}

/// One peer's lag over time.
#[derive(Clone, Debug, Serialize)]
pub struct LagSeries {
    /// The peer.
    pub peer_id: String,
    /// Its institution, if known.
    pub institution: Option<String>,
    /// `[milliseconds since the epoch, documents]`, oldest first.
    pub points: Vec<[u64; 2]>,
}

/// What the sampler keeps between requests; shared with the API.
#[derive(Debug, Default)]
pub struct History {
    lag: BTreeMap<String, (Option<String>, VecDeque<[u64; 2]>)>,
    audit_check: ChainCheck,
    audit: AuditState,
}

/// The sampler's state, shared between it and the API.
pub type SharedHistory = Arc<Mutex<History>>;

fn lock(history: &SharedHistory) -> std::sync::MutexGuard<'_, History> {
    history.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the sampler until `shutdown` turns true: every `LAG_SAMPLE_INTERVAL_S`, each peer's
/// lag and the next stretch of the audit chain.
pub async fn sample(
    node: Arc<Node>,
    stats: Option<StatsReader>,
    history: SharedHistory,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    // The first sample one interval in: a node starting (or a command reading a stopped
    // node's directory) does not also read its audit log at once.
    let every = Duration::from_secs(LAG_SAMPLE_INTERVAL_S);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let (node, stats, history) = (node.clone(), stats.clone(), history.clone());
        let sampled = tokio::task::spawn_blocking(move || {
            sample_once(&node, stats.map(|s| s.get()).as_ref(), &history);
        })
        .await;
        if sampled.is_err() {
            tracing::warn!("the dashboard's sampler failed once; it samples again next time");
        }
    }
}

/// One sample: each peer's lag now, and the audit chain checked further.
pub fn sample_once(node: &Node, stats: Option<&SyncStats>, history: &SharedHistory) {
    let at = now_ms();
    let since = SinceDisconnections::read(node, stats);
    let lags: Vec<(String, Option<String>, u64)> = stats
        .map(|stats| {
            stats
                .peers
                .iter()
                .filter_map(|(peer, s)| {
                    let (lag, _) = since.lag(peer, s);
                    Some((peer.clone(), s.institution.clone(), lag?))
                })
                .collect()
        })
        .unwrap_or_default();
    check_audit(node, history, AUDIT_CHECK_RECORDS_PER_SAMPLE);
    let mut history = lock(history);
    for (peer, institution, lag) in lags {
        if !history.lag.contains_key(&peer) && history.lag.len() >= LAG_HISTORY_PEERS_MAX {
            // Make room by forgetting a peer with no sample in the window, if there is one.
            let stale = history
                .lag
                .iter()
                .find(|(_, (_, points))| {
                    points
                        .back()
                        .is_none_or(|p| at.saturating_sub(p[0]) > LAG_HISTORY_WINDOW_S * 1_000)
                })
                .map(|(peer, _)| peer.clone());
            match stale {
                Some(stale) => {
                    history.lag.remove(&stale);
                }
                None => continue,
            }
        }
        let (known, points) = history.lag.entry(peer).or_default();
        *known = institution;
        if points.len() == LAG_SAMPLES_PER_PEER_MAX {
            points.pop_front();
        }
        points.push_back([at, lag]);
    }
    // Samples older than the window go, however irregular the sampling was.
    let oldest = at.saturating_sub(LAG_HISTORY_WINDOW_S * 1_000);
    for (_, points) in history.lag.values_mut() {
        while points.front().is_some_and(|p| p[0] < oldest) {
            points.pop_front();
        }
    }
    history.lag.retain(|_, (_, points)| !points.is_empty());
}

/// Checks the audit chain on from where the last check stopped, at most `limit` records.
/// Two checks at once each go on from the same place; the one that got further is kept. A
/// store that cannot be read now leaves the state as it was (the next check tries again).
pub fn check_audit(node: &Node, history: &SharedHistory, limit: usize) {
    let mut check = lock(history).audit_check.clone();
    let verdict = match node.continue_audit_check(&mut check, limit) {
        Ok(verdict) => verdict,
        Err(error) => {
            tracing::warn!(%error, "the dashboard could not read the audit log this time");
            return;
        }
    };
    let mut history = lock(history);
    history.audit.checked_ms = Some(now_ms());
    match verdict {
        Err(problem) => {
            history.audit.sound = false;
            history.audit.problem = Some(problem.what);
        }
        Ok(()) if history.audit.problem.is_none() => history.audit.sound = true,
        Ok(()) => {}
    }
    if check.checked() > history.audit_check.checked() {
        history.audit.checked = check.checked();
        history.audit_check = check;
    }
}

/// The latest audit records (at most `LAG_SCAN_RECORDS_MAX`, back from the head), read once
/// for every disconnected peer's lag, and which peers get an estimate.
struct SinceDisconnections {
    /// `(sequence, document, institution)` of each change accepted, in sequence order.
    accepted: Vec<(u64, crate::model::DocumentId, Option<String>)>,
    /// The first sequence read: a peer gone before it gets a lower bound.
    from: u64,
    /// Whether the records could be read.
    read: bool,
    /// The peers estimated: the `LAG_ESTIMATED_PEERS_MAX` most recently gone.
    estimated: BTreeSet<String>,
}

impl SinceDisconnections {
    fn read(node: &Node, stats: Option<&SyncStats>) -> Self {
        let mut gone: Vec<(u64, &String)> = stats
            .into_iter()
            .flat_map(|s| &s.peers)
            .filter(|(_, p)| !p.connected)
            .filter_map(|(peer, p)| Some((p.audit_sequence_at_disconnect?, peer)))
            .collect();
        gone.sort_unstable_by(|a, b| b.cmp(a));
        gone.truncate(LAG_ESTIMATED_PEERS_MAX);
        let estimated: BTreeSet<String> = gone.iter().map(|(_, peer)| (*peer).clone()).collect();
        let head = node.audit_sequence();
        let earliest = gone.iter().map(|(sequence, _)| sequence + 1).min();
        let Some(earliest) = earliest else {
            return Self {
                accepted: Vec::new(),
                from: head + 1,
                read: true,
                estimated,
            };
        };
        let from = earliest.max((head + 1).saturating_sub(LAG_SCAN_RECORDS_MAX as u64));
        match node.audit(from, LAG_SCAN_RECORDS_MAX) {
            Ok(records) => Self {
                accepted: records
                    .into_iter()
                    .filter(|r| r.sequence <= head && r.action == AuditAction::Accepted)
                    .map(|r| (r.sequence, r.document, r.institution.map(|i| i.to_string())))
                    .collect(),
                from,
                read: true,
                estimated,
            },
            Err(_) => Self {
                accepted: Vec::new(),
                from,
                read: false,
                estimated,
            },
        }
    }

    /// A peer's lag now (see `PeerState::lag`), and whether it is a lower bound.
    fn lag(&self, peer: &str, stats: &PeerStats) -> (Option<u64>, bool) {
        let Some(since) = stats
            .audit_sequence_at_disconnect
            .filter(|_| !stats.connected)
        else {
            return (stats.lag, false);
        };
        if !self.estimated.contains(peer) || !self.read {
            return (stats.lag, true);
        }
        let start = self
            .accepted
            .partition_point(|(sequence, _, _)| *sequence <= since);
        let changed: BTreeSet<_> = self.accepted[start..]
            .iter()
            .filter(|(_, _, by)| stats.institution.is_none() || *by != stats.institution)
            .map(|(_, document, _)| document)
            .collect();
        let lag = stats.lag.unwrap_or(0) + changed.len() as u64;
        (Some(lag), since + 1 < self.from)
    }
}

fn peer_state(since: &SinceDisconnections, peer_id: &str, stats: &PeerStats) -> PeerState {
    let (lag, lag_at_least) = since.lag(peer_id, stats);
    PeerState {
        peer_id: peer_id.to_owned(),
        institution: stats.institution.clone(),
        connected: stats.connected,
        lag,
        lag_at_least,
        last_reconciled_ms: stats.last_reconciled_ms,
        disconnected_ms: stats.disconnected_ms,
        bytes_in: stats.bytes_in,
        bytes_out: stats.bytes_out,
        score: stats.score,
        strikes: stats.strikes,
    }
}

/// The figures now: from the node, the sync layer's (`None` without a network layer) and the
/// sampler's history (the audit chain as far as it was last checked).
pub fn snapshot(
    node: &Node,
    stats: Option<&SyncStats>,
    history: &SharedHistory,
    uptime_s: u64,
) -> Result<Snapshot, crate::replica::NodeError> {
    let roster = node.roster_view();
    let own = node.institution().as_str().to_owned();
    let head = node.audit_sequence();
    let since = SinceDisconnections::read(node, stats);
    let mut peers: BTreeMap<Option<String>, Vec<PeerState>> = BTreeMap::new();
    if let Some(stats) = stats {
        for (peer_id, s) in &stats.peers {
            peers
                .entry(s.institution.clone())
                .or_default()
                .push(peer_state(&since, peer_id, s));
        }
    }
    let members = members(&roster, &own, &mut peers);
    let strangers: Vec<PeerState> = peers.into_values().flatten().collect();

    let quarantine = node.quarantine_page(None, crate::replica::QUARANTINE_PAGE_RECORDS_MAX)?;
    let scanned = quarantine.entries.len() as u64;
    let mut shown: Vec<QuarantinedChange> = quarantine
        .entries
        .into_iter()
        .map(|e| QuarantinedChange {
            change: hex(&e.change),
            document: e.document.to_string(),
            reason: e.reason,
            at_ms: e.at_ms,
        })
        .collect();
    shown.sort_by_key(|q| std::cmp::Reverse(q.at_ms));
    shown.truncate(QUARANTINE_SHOWN_MAX);

    let at_ms = now_ms();
    let (audit, lag_history) = {
        let history = lock(history);
        let mut audit = history.audit.clone();
        if audit.checked_ms.is_none() {
            audit.sound = true;
        }
        let mut series: BTreeMap<&str, LagSeries> = history
            .lag
            .iter()
            .map(|(peer, (institution, points))| {
                let series = LagSeries {
                    peer_id: peer.clone(),
                    institution: institution.clone(),
                    points: points
                        .iter()
                        .filter(|p| p[0] + LAG_HISTORY_WINDOW_S * 1_000 >= at_ms)
                        .copied()
                        .collect(),
                };
                (peer.as_str(), series)
            })
            .collect();
        // Each chart ends with the lag now.
        for peer in members.iter().flat_map(|m| &m.peers).chain(&strangers) {
            if let Some(lag) = peer.lag {
                series
                    .entry(&peer.peer_id)
                    .or_insert_with(|| LagSeries {
                        peer_id: peer.peer_id.clone(),
                        institution: peer.institution.clone(),
                        points: Vec::new(),
                    })
                    .points
                    .push([at_ms, lag]);
            }
        }
        (audit, series.into_values().collect())
    };
    Ok(Snapshot {
        at_ms,
        node: NodeFigures {
            institution: own,
            peer_id: node.identity().peer_id().to_string(),
            version: env!("CARGO_PKG_VERSION"),
            uptime_s,
            documents: node.catalogue().len() as u64,
            pending: node.pending_count()? as u64,
            storage_bytes: node.storage_bytes()?,
            roster_version: node.roster_version(),
            network: stats.is_some(),
        },
        members,
        strangers,
        catch_up: stats.map(|s| s.catch_up.clone()).unwrap_or_default(),
        quarantine: QuarantineFigures {
            count: node.quarantine_count() as u64,
            shown,
            scanned,
        },
        audit: AuditState {
            // The check may have read a record made durable a moment after `head` was read.
            records: head.max(audit.checked),
            ..audit
        },
        recent_changes: recent_changes(node, head)?,
        lag_history,
    })
}

/// The latest `RECENT_CHANGES_MAX` decisions up to the audit record `head`.
fn recent_changes(
    node: &Node,
    head: u64,
) -> Result<Vec<super::clinical::FeedEvent>, crate::replica::NodeError> {
    let from = head.saturating_sub(RECENT_SCAN_RECORDS - 1).max(1);
    let mut records = node.audit(from, RECENT_SCAN_RECORDS as usize)?;
    records.retain(|r| r.sequence <= head);
    let mut events = super::clinical::decision_events(node, records, &Default::default());
    let skip = events.len().saturating_sub(RECENT_CHANGES_MAX);
    events.drain(..skip);
    Ok(events)
}

/// Each member of the roster with its peers (taken out of `peers`).
fn members(
    roster: &RosterView,
    own: &str,
    peers: &mut BTreeMap<Option<String>, Vec<PeerState>>,
) -> Vec<MemberState> {
    roster
        .institutions
        .iter()
        .map(|institution| {
            let id = institution.id.as_str().to_owned();
            let mine = peers.remove(&Some(id.clone())).unwrap_or_default();
            let revoked = !institution.node_keys.is_empty()
                && institution
                    .node_keys
                    .iter()
                    .all(|k| roster.revocation_of(k).is_some());
            let state = if id == own {
                "this_node"
            } else if revoked {
                "revoked"
            } else if mine.iter().any(|p| p.connected) {
                "connected"
            } else if mine.is_empty() {
                "not_seen"
            } else {
                "disconnected"
            };
            MemberState {
                name: institution.name.clone(),
                kind: institution.kind,
                area: institution.area.clone(),
                state,
                lag: mine.iter().filter_map(|p| p.lag).max(),
                peers: mine,
                id,
            }
        })
        .collect()
}

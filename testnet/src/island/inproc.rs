//! All nodes in this process over libp2p's memory transport, behind the seeded fault layer.
//! A crash shuts a node's network down and drops its in-memory state; a restart reopens its
//! data directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use estuary_node::api::dashboard;
use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::{DocumentId, DocumentKind, OpError, ValidationError};
use estuary_node::replica::{Node, NodeConfig, NodeError};
use estuary_node::sync::faults::Faults;
use estuary_node::sync::{Multiaddr, SyncConfig, SyncHandle, TransportKind};

use super::check::{DocumentState, NodeState};
use super::cluster::{Cluster, Made, NetworkFaults, Skip, Traffic, Write, exam_correction};

/// How long after a restart a node is given to rejoin before the run goes on.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How long a sync request may take: short, so a request lost with a cut link is retried
/// soon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

struct Running {
    node: Arc<Node>,
    sync: SyncHandle,
}

pub struct InProc {
    runtime: tokio::runtime::Runtime,
    faults: Arc<Faults>,
    configs: Vec<NodeConfig>,
    roster: Vec<u8>,
    addresses: Vec<Multiaddr>,
    bootstrap: Vec<Vec<Multiaddr>>,
    nodes: Vec<Option<Running>>,
    /// Traffic of node incarnations that crashed.
    past: Traffic,
    applied: NetworkFaults,
    /// Nodes started at least once.
    restarted: BTreeSet<usize>,
    /// Slots never started: a rogue holds the member's key instead.
    absent: BTreeSet<usize>,
    /// Each node's dashboard history (lag samples, the audit chain checked so far), sampled
    /// by the harness: a node in this process runs no API, so no sampler of its own.
    dashboards: Vec<(dashboard::SharedHistory, Option<Instant>)>,
    started: Instant,
}

/// A memory-transport address on a random port.
fn fresh_address() -> anyhow::Result<Multiaddr> {
    let mut port = [0u8; 8];
    getrandom::fill(&mut port).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(format!("/memory/{}", u64::from_le_bytes(port) >> 8).parse()?)
}

impl InProc {
    /// Opens a node in each data directory (the key in each is already written) and connects
    /// them: every node dials the hospitals (nodes 0–2) and `links` of the others.
    /// `absent` slots are never started (a rogue takes their place), and nobody dials them.
    pub fn start(
        seed: u64,
        data_dirs: Vec<PathBuf>,
        authority: estuary_node::model::Bytes32,
        roster: Vec<u8>,
        links: &[Vec<usize>],
        absent: BTreeSet<usize>,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let addresses: Vec<Multiaddr> = (0..data_dirs.len())
            .map(|_| fresh_address())
            .collect::<anyhow::Result<_>>()?;
        let bootstrap = links
            .iter()
            .map(|peers| {
                peers
                    .iter()
                    .filter(|p| !absent.contains(p))
                    .map(|p| addresses[*p].clone())
                    .collect()
            })
            .collect();
        let configs: Vec<NodeConfig> = data_dirs
            .into_iter()
            .map(|data_dir| NodeConfig {
                data_dir,
                authority,
                store_engine: Default::default(),
            })
            .collect();
        let mut cluster = Self {
            runtime,
            faults: Faults::new(seed),
            nodes: configs.iter().map(|_| None).collect(),
            configs,
            roster,
            addresses,
            bootstrap,
            past: Traffic::default(),
            applied: NetworkFaults::default(),
            restarted: BTreeSet::new(),
            absent,
            dashboards: Vec::new(),
            started: Instant::now(),
        };
        cluster.dashboards = (0..cluster.configs.len())
            .map(|_| Default::default())
            .collect();
        for node in 0..cluster.configs.len() {
            cluster.restart(node)?;
        }
        Ok(cluster)
    }

    fn node(&self, node: usize) -> Option<&Arc<Node>> {
        self.nodes[node].as_ref().map(|r| &r.node)
    }

    /// Node `node`, if it is up (for benchmarks that time what nodes hold).
    pub fn node_handle(&self, node: usize) -> Option<Arc<Node>> {
        self.node(node).cloned()
    }

    /// Bytes the running nodes among `from` sent to the running nodes among `to`.
    pub fn bytes_between(&self, from: &[usize], to: &[usize]) -> u64 {
        let receivers: Vec<String> = to
            .iter()
            .filter_map(|n| self.nodes[*n].as_ref())
            .map(|running| running.sync.peer_id().to_string())
            .collect();
        from.iter()
            .filter_map(|n| self.nodes[*n].as_ref())
            .map(|running| {
                let stats = running.sync.stats();
                receivers
                    .iter()
                    .filter_map(|peer| stats.peers.get(peer))
                    .map(|peer| peer.bytes_out)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Bytes the running nodes sent, by what they were for.
    pub fn sent(&self) -> estuary_node::sync::SentBytes {
        let mut total = estuary_node::sync::SentBytes::default();
        for running in self.nodes.iter().flatten() {
            total += &running.sync.stats().sent;
        }
        total
    }
}

fn traffic_of(sync: &SyncHandle) -> Traffic {
    let stats = sync.stats();
    let mut traffic = Traffic::default();
    for peer in stats.peers.values() {
        // Each byte is counted once, by its sender.
        traffic.wire_bytes += peer.bytes_out;
        traffic.messages += peer.messages_out;
        traffic.rejected_changes += peer.changes_rejected;
    }
    traffic
}

/// Whether an error means the model refused the write given what the node holds.
fn refused(error: &NodeError) -> Option<Skip> {
    match error {
        // A link to a file that has not reached the node yet.
        NodeError::UnknownDocument(_) | NodeError::LinkRefused { .. } => Some(Skip::NotYetHere),
        // A revoked node that has learnt of its revocation, or a write built on a change
        // withdrawn by a revocation meanwhile.
        NodeError::NotAMember
        | NodeError::LocalChangeRefused(estuary_node::replica::Ingested::Quarantined(..)) => {
            Some(Skip::RefusedByPipeline)
        }
        NodeError::Op(OpError::Invalid(
            ValidationError::IllegalTransition { .. }
            | ValidationError::NotAuthorised { .. }
            | ValidationError::EventBase { .. },
        ))
        | NodeError::Op(OpError::UnknownEntry { .. } | OpError::Full { .. }) => Some(Skip::Refused),
        _ => None,
    }
}

/// Makes a write at a node, as an app would through the API; a correction with nothing to
/// correct is a skip.
// The node's own error, passed on as it is: the caller sorts it into skips and failures.
#[allow(clippy::result_large_err)]
fn apply(
    node: &Node,
    write: &Write,
    editor: &estuary_node::model::Editor,
) -> Result<Result<Made, Skip>, NodeError> {
    if let Write::Referral(id, estuary_node::model::ReferralOp::Redirect { to, reason }) = write {
        let (change, onward) = node
            .writer(None)
            .redirect_referral(*id, editor, to, reason)?;
        return Ok(Ok(Made {
            id: *id,
            change,
            onward: Some(onward),
        }));
    }
    Ok(Ok(Made::one(match write {
        Write::CreateHealthFile(demographics) => node.create_health_file(editor, demographics)?,
        Write::HealthFile(id, op) => (*id, node.apply_health_file(*id, editor, op)?),
        Write::CorrectOwnExam(id, _) => {
            let Some(op) = exam_correction(&node.health_file(*id)?, &editor.institution) else {
                return Ok(Err(Skip::NothingToCorrect));
            };
            (*id, node.apply_health_file(*id, editor, &op)?)
        }
        Write::CreateReferral(referral) => {
            if node.kind_of(referral.patient)? != Some(DocumentKind::HealthFile) {
                return Err(NodeError::UnknownDocument(referral.patient));
            }
            node.create_referral(editor, referral)?
        }
        Write::Referral(id, op) => (*id, node.apply_referral(*id, editor, op)?),
    })))
}

impl Cluster for InProc {
    fn len(&self) -> usize {
        self.nodes.len()
    }

    fn is_up(&self, node: usize) -> bool {
        self.nodes[node].is_some()
    }

    fn write(&mut self, index: usize, write: &Write) -> anyhow::Result<Result<Made, Skip>> {
        let Some(node) = self.node(index) else {
            return Ok(Err(Skip::NodeDown));
        };
        let editor = estuary_node::model::Editor {
            institution: node.institution().clone(),
            at: estuary_node::model::Timestamp(estuary_node::audit::now_ms()),
        };
        match apply(node, write, &editor) {
            Ok(written) => Ok(written),
            Err(error) => match refused(&error) {
                Some(skip) => Ok(Err(skip)),
                None => Err(anyhow::Error::from(error).context(format!("a write at node {index}"))),
            },
        }
    }

    fn load(
        &mut self,
        index: usize,
        ndjson: &str,
    ) -> anyhow::Result<Result<Vec<(DocumentId, ChangeHash)>, Skip>> {
        let Some(node) = self.node(index) else {
            return Ok(Err(Skip::NodeDown));
        };
        let residents = estuary_node::import::residents_from_ndjson(ndjson)
            .map(|(line, read)| read.with_context(|| format!("line {line} of the load")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let editor = estuary_node::model::Editor {
            institution: node.institution().clone(),
            at: estuary_node::model::Timestamp(estuary_node::audit::now_ms()),
        };
        let loaded = match node
            .writer(None)
            .import_health_files(&editor, &residents, false)
        {
            Ok(loaded) => loaded,
            Err(error) => match refused(&error) {
                Some(skip) => return Ok(Err(skip)),
                None => {
                    return Err(
                        anyhow::Error::from(error).context(format!("a load at node {index}"))
                    );
                }
            },
        };
        Ok(Ok(loaded.into_iter().filter_map(Result::ok).collect()))
    }

    fn main_file(&mut self, index: usize, id: DocumentId) -> anyhow::Result<Option<DocumentId>> {
        let Some(node) = self.node(index) else {
            return Ok(None);
        };
        match node.resident_record(id) {
            Ok(record) => Ok(Some(record.map_or(id, |r| r.main))),
            Err(NodeError::UnknownDocument(_)) => Ok(None),
            Err(error) => {
                Err(anyhow::Error::from(error).context(format!("a read at node {index}")))
            }
        }
    }

    fn read(&mut self, index: usize, id: DocumentId) -> anyhow::Result<Option<Duration>> {
        let Some(node) = self.node(index) else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        match node.health_file(id) {
            Ok(_) => Ok(Some(started.elapsed())),
            Err(NodeError::UnknownDocument(_)) => Ok(None),
            Err(error) => {
                Err(anyhow::Error::from(error).context(format!("a read at node {index}")))
            }
        }
    }

    fn crash(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(running) = self.nodes[node].take() {
            let traffic = traffic_of(&running.sync);
            self.past.wire_bytes += traffic.wire_bytes;
            self.past.messages += traffic.messages;
            self.past.rejected_changes += traffic.rejected_changes;
            self.runtime.block_on(running.sync.shutdown());
            drop(running.node);
        }
        Ok(())
    }

    fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        if self.nodes[index].is_some() || self.absent.contains(&index) {
            return Ok(());
        }
        let node = Arc::new(
            Node::open(&self.configs[index], Some(&self.roster))
                .with_context(|| format!("opening node {index}"))?,
        );
        // A restarted node listens on a fresh port (the memory transport may still hold the
        // old one for a moment); it dials its peers, so they find it again.
        if self.restarted.contains(&index) {
            self.addresses[index] = fresh_address()?;
        }
        self.restarted.insert(index);
        let config = SyncConfig {
            listen: vec![self.addresses[index].clone()],
            bootstrap: self.bootstrap[index].clone(),
            reconcile_every: RECONCILE_EVERY,
            request_timeout: REQUEST_TIMEOUT,
            transport: TransportKind::Faulty {
                faults: self.faults.clone(),
                node: index,
            },
            ..SyncConfig::default()
        };
        let sync = {
            let _entered = self.runtime.enter();
            SyncHandle::start(node.clone(), config)
                .with_context(|| format!("starting sync at node {index}"))?
        };
        self.nodes[index] = Some(Running { node, sync });
        Ok(())
    }

    fn set_faults(&mut self, faults: &NetworkFaults) {
        if *faults == self.applied {
            return;
        }
        faults.apply_to(&self.faults);
        self.applied = faults.clone();
    }

    fn catalogue(&mut self, index: usize) -> anyhow::Result<BTreeMap<[u8; 16], [u8; 32]>> {
        let node = self.node(index).context("the node is down")?;
        let catalogue = node.catalogue();
        Ok(catalogue
            .ids()
            .filter_map(|id| catalogue.get(id).map(|digest| (*id, digest)))
            .collect())
    }

    fn state(
        &mut self,
        index: usize,
        authored_by: Option<estuary_node::model::Bytes32>,
    ) -> anyhow::Result<NodeState> {
        let node = self.node(index).context("the node is down")?;
        state_of(node, authored_by)
    }

    fn traffic(&mut self) -> Traffic {
        let mut total = self.past;
        for running in self.nodes.iter().flatten() {
            let traffic = traffic_of(&running.sync);
            total.wire_bytes += traffic.wire_bytes;
            total.messages += traffic.messages;
            total.rejected_changes += traffic.rejected_changes;
        }
        total.connections_cut = self.faults.cuts();
        total.writes_delayed = self.faults.delays();
        total
    }

    fn reconcile_now(&mut self) {
        for running in self.nodes.iter().flatten() {
            let _ = self.runtime.block_on(running.sync.reconcile_now());
        }
    }

    fn shutdown(&mut self) {
        for node in 0..self.nodes.len() {
            let _ = self.crash(node);
        }
    }

    fn handle(&self, node: usize) -> Option<Arc<Node>> {
        self.node(node).cloned()
    }

    fn address(&self, node: usize) -> Option<Multiaddr> {
        self.nodes[node].as_ref()?;
        self.addresses.get(node).cloned()
    }

    fn update_roster(&mut self, index: usize, signed: &[u8]) -> anyhow::Result<()> {
        let running = self.nodes[index].as_ref().context("the node is down")?;
        self.runtime
            .block_on(running.sync.update_roster(signed.to_vec()))
            .with_context(|| format!("node {index} refused the roster"))?;
        Ok(())
    }

    fn sample_dashboard(&mut self, node: usize) {
        let Some(running) = &self.nodes[node] else {
            return;
        };
        let (history, sampled) = &mut self.dashboards[node];
        let due = Duration::from_secs(dashboard::LAG_SAMPLE_INTERVAL_S);
        if sampled.is_some_and(|at| at.elapsed() < due) {
            return;
        }
        *sampled = Some(Instant::now());
        dashboard::sample_once(&running.node, Some(&running.sync.stats()), history);
    }

    fn dashboard(&mut self, node: usize) -> anyhow::Result<Option<String>> {
        let Some(running) = &self.nodes[node] else {
            return Ok(None);
        };
        // A last sample, so that the copy's chart and audit check reach its end.
        let stats = running.sync.stats();
        dashboard::sample_once(&running.node, Some(&stats), &self.dashboards[node].0);
        let snapshot = dashboard::snapshot(
            &running.node,
            Some(&stats),
            &self.dashboards[node].0,
            self.started.elapsed().as_secs(),
        )?;
        Ok(Some(dashboard::static_page(&snapshot)?))
    }

    fn sync_stats(&self, node: usize) -> Option<estuary_node::sync::SyncStats> {
        self.nodes[node].as_ref().map(|r| r.sync.stats())
    }
}

/// Audit records read at a time.
const AUDIT_PAGE: usize = 4_096;

/// A node's state as the checker reads it; `authored_by`: list that key's changes.
pub fn state_of(
    node: &Node,
    authored_by: Option<estuary_node::model::Bytes32>,
) -> anyhow::Result<NodeState> {
    let ids: Vec<DocumentId> = node
        .catalogue()
        .ids()
        .map(|id| DocumentId::from_bytes(*id))
        .collect();
    let mut state = NodeState::default();
    for id in ids {
        let mut heads: Vec<String> = node.heads(id)?.iter().map(|h| h.to_string()).collect();
        heads.sort();
        let changes: BTreeSet<String> = node
            .change_hashes(id)?
            .iter()
            .map(|h| h.to_string())
            .collect();
        // Reading the typed view validates the document.
        let valid = match node.kind_of(id)? {
            Some(DocumentKind::HealthFile) => node.health_file(id).map(|_| ()),
            Some(DocumentKind::Referral) => node.referral(id).map(|view| {
                if let Some(bad) = view
                    .history
                    .iter()
                    .filter(|e| view.effective.contains(&e.entry))
                    .find(|e| !e.from.may_move_to(e.to))
                {
                    state.violations.push(format!(
                        "referral {id}: effective event {} moves {} -> {}",
                        bad.entry.as_str(),
                        bad.from,
                        bad.to
                    ));
                }
            }),
            _ => Ok(()),
        };
        if let Err(error) = valid {
            state.violations.push(format!("document {id}: {error}"));
        }
        if let Some(key) = authored_by {
            for entry in node.history(id)? {
                if entry.author == key {
                    state
                        .authored
                        .insert((id.to_string(), entry.change.to_string()));
                }
            }
        }
        state
            .documents
            .insert(id.to_string(), DocumentState { heads, changes });
    }
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    for entry in node.quarantine()? {
        state
            .quarantine
            .insert((entry.document.to_string(), hex(&entry.change), entry.reason));
    }
    for entry in node.pending()? {
        state
            .pending_changes
            .insert((entry.document.to_string(), hex(&entry.change)));
    }
    state.pending = state.pending_changes.len() as u64;
    let mut from = 1;
    loop {
        let page = node.audit(from, AUDIT_PAGE)?;
        let Some(last) = page.last() else { break };
        from = last.sequence + 1;
        for record in page {
            if record.action == estuary_node::audit::AuditAction::Accepted
                && let Some(change) = record.change
            {
                state
                    .accepted_at
                    .entry(hex(&change))
                    .or_insert(record.at_ms);
            }
        }
    }
    for problem in node.verify()?.problems {
        state.violations.push(format!("verify: {}", problem.what));
    }
    Ok(state)
}

//! The Byzantine presets: the bad node driven during a run (a rogue started beside the
//! honest nodes, a member revoked mid-partition, a member flooding valid changes), and the
//! judge of what the honest nodes made of it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::{Bytes32, DocumentId, Editor, InstitutionId, Timestamp};
use estuary_node::replica::Node;
use estuary_node::sync::{DISCONNECT_SCORE, PeerId, SYNC_STRIKES_MAX};
use serde::Serialize;

use super::check::{Acknowledged, NodeState};
use super::cluster::Cluster;
use super::consortium::{self, Member};
use super::content;
use super::plan::{BadNode, Byzantine, Misbehaviour};
use super::rogue::{Expect, Rogue, RogueConfig, RogueLog};

/// A flooding app starts a new file after this many follow-ups (a clinical list holds at
/// most 10,000 entries, and a smaller file keeps each change cheap to judge).
const FLOOD_CHANGES_PER_FILE: u32 = 50;
/// The flooding app's pace: ten times the busiest honest node's (about 10 writes a second in
/// the island demo). Unpaced, on this machine, it measures only that the flooding node's own
/// work takes the CPU the honest nodes share with it in one process; separate machines do
/// not share it.
const FLOOD_WRITES_PER_S: u64 = 100;
/// The most cut-off heads a revocation names (the roster's `REVOCATION_HEADS_MAX`).
const CUTOFF_HEADS_MAX: usize = 1_024;

/// The bad node during a run.
pub struct Adversary {
    byzantine: Byzantine,
    seed: u64,
    members: Vec<Member>,
    keys: Vec<Bytes32>,
    rogue: Option<Rogue>,
    /// The rogue's PeerId, or the bad member node's.
    peer_id: PeerId,
    flood: Option<Flood>,
    /// The flooding app's acknowledged writes, once it stopped.
    flooded: Vec<(Acknowledged, i64)>,
    revocation: Option<Revocation>,
}

struct Flood {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<(Acknowledged, i64)>>>,
}

/// The revocation as the authority drew it.
#[derive(Clone, Debug, Serialize)]
pub struct Revocation {
    /// When, in milliseconds from the start.
    pub at_ms: u64,
    /// The cut-off heads it names.
    pub cutoff_heads: usize,
    /// The revoked key's changes the core hospital held then: exactly what every honest node
    /// must keep of the key.
    #[serde(skip)]
    pub kept: BTreeSet<Acknowledged>,
}

/// What the bad node did, for the judge.
#[derive(Default)]
pub struct AdversaryLog {
    pub rogue: Option<RogueLog>,
    pub flood: Vec<(Acknowledged, i64)>,
    pub revocation: Option<Revocation>,
    pub peer_id: String,
    pub key: Option<Bytes32>,
}

impl Adversary {
    /// Starts the bad node's misbehaviour: the rogue dials every honest node, the flooding
    /// app starts writing; a revocation waits for its time.
    pub fn start(
        byzantine: &Byzantine,
        seed: u64,
        members: &[Member],
        keys: &[Bytes32],
        authority: Bytes32,
        cluster: &mut dyn Cluster,
    ) -> anyhow::Result<Self> {
        let node = byzantine.node;
        let mut peer_id = estuary_node::identity::Identity::from_secret(consortium::secret(
            seed,
            members[node].id,
        ))
        .libp2p_keypair()
        .public()
        .to_peer_id();
        let mut rogue = None;
        let mut flood = None;
        match byzantine.bad {
            BadNode::Rogue { misbehaviour } => {
                let secret = if misbehaviour == Misbehaviour::Stranger {
                    consortium::secret(seed, "stranger")
                } else {
                    consortium::secret(seed, members[node].id)
                };
                let targets = (0..cluster.len())
                    .filter(|i| *i != node)
                    .filter_map(|i| cluster.address(i))
                    .collect();
                let started = Rogue::start(RogueConfig {
                    misbehaviour,
                    secret,
                    institution: InstitutionId::new(members[node].id)?,
                    authority,
                    targets,
                    impersonated: keys[0],
                    seed,
                })?;
                peer_id = started.peer_id();
                rogue = Some(started);
            }
            BadNode::Flood => {
                let handle = cluster.handle(node).context("the flooding node is down")?;
                let stop = Arc::new(AtomicBool::new(false));
                let thread = {
                    let stop = stop.clone();
                    std::thread::Builder::new()
                        .name("flood".into())
                        .spawn(move || flood_writes(&handle, seed, &stop))?
                };
                flood = Some(Flood { stop, thread });
            }
            BadNode::Revoked { .. } => {}
        }
        Ok(Self {
            byzantine: byzantine.clone(),
            seed,
            members: members.to_vec(),
            keys: keys.to_vec(),
            rogue,
            peer_id,
            flood,
            flooded: Vec::new(),
            revocation: None,
        })
    }

    /// Acts on time: the authority revokes the member when its time comes.
    pub fn tick(&mut self, t_ms: u64, cluster: &mut dyn Cluster) -> anyhow::Result<()> {
        let BadNode::Revoked { at_ms } = self.byzantine.bad else {
            return Ok(());
        };
        if t_ms < at_ms || self.revocation.is_some() {
            return Ok(());
        }
        let key = self.keys[self.byzantine.node];
        // The authority sits with the core hospital (node 0), on the other side of the
        // partition: the cut-off is what the core hospital holds of the key now.
        let core = cluster.handle(0).context("the core hospital is down")?;
        let (heads, kept) = cutoff(&core, key)?;
        anyhow::ensure!(
            heads.len() <= CUTOFF_HEADS_MAX,
            "the revoked key wrote {} branches, more than a revocation can name",
            heads.len()
        );
        let signed = consortium::revoked_roster(
            self.seed,
            &self.members,
            &self.keys,
            key,
            heads.iter().map(|h| Bytes32(h.0)).collect(),
        )?;
        cluster.update_roster(0, &signed)?;
        self.revocation = Some(Revocation {
            at_ms: t_ms,
            cutoff_heads: heads.len(),
            kept,
        });
        Ok(())
    }

    /// Stops the flooding app (when faults stop); its writes are acknowledged writes.
    pub fn stop_flood(&mut self) -> anyhow::Result<&[(Acknowledged, i64)]> {
        if let Some(flood) = self.flood.take() {
            flood.stop.store(true, Ordering::Relaxed);
            self.flooded = flood
                .thread
                .join()
                .map_err(|_| anyhow::anyhow!("the flooding app's thread panicked"))??;
        }
        Ok(&self.flooded)
    }

    /// Stops everything; what the bad node did.
    pub fn finish(mut self) -> anyhow::Result<AdversaryLog> {
        let flood = self.stop_flood()?.to_vec();
        let rogue = self.rogue.take().map(Rogue::stop).transpose()?;
        let key = match self.byzantine.rogue() {
            Some(Misbehaviour::Stranger) => None,
            _ => Some(self.keys[self.byzantine.node]),
        };
        Ok(AdversaryLog {
            rogue,
            flood,
            revocation: self.revocation,
            peer_id: self.peer_id.to_string(),
            key,
        })
    }
}

/// Follow-ups in the flooding member's own files, as fast as its node acknowledges them.
fn flood_writes(
    node: &Node,
    seed: u64,
    stop: &AtomicBool,
) -> anyhow::Result<Vec<(Acknowledged, i64)>> {
    let mut acknowledged = Vec::new();
    let mut file: Option<(DocumentId, u32)> = None;
    let mut resident = 700_000u32;
    let started = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let due = started
            + std::time::Duration::from_micros(
                acknowledged.len() as u64 * 1_000_000 / FLOOD_WRITES_PER_S,
            );
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = estuary_node::audit::now_ms();
        let editor = Editor {
            institution: node.institution().clone(),
            at: Timestamp(now),
        };
        let (id, hash): (DocumentId, ChangeHash) = match file {
            Some((id, written)) if written < FLOOD_CHANGES_PER_FILE => {
                file = Some((id, written + 1));
                let op = content::follow_up(seed, resident, now);
                (id, node.apply_health_file(id, &editor, &op)?)
            }
            _ => {
                resident += 1;
                let created =
                    node.create_health_file(&editor, &content::demographics(seed, resident))?;
                file = Some((created.0, 0));
                created
            }
        };
        acknowledged.push((
            (id.to_string(), hash.to_string()),
            estuary_node::audit::now_ms(),
        ));
    }
    Ok(acknowledged)
}

/// The key's changes `node` holds, and the heads among them (per document, those no other
/// change of the key builds on): the cut-off a revocation names.
fn cutoff(node: &Node, key: Bytes32) -> anyhow::Result<(Vec<ChangeHash>, BTreeSet<Acknowledged>)> {
    let ids: Vec<DocumentId> = node
        .catalogue()
        .ids()
        .map(|id| DocumentId::from_bytes(*id))
        .collect();
    let mut heads = Vec::new();
    let mut kept = BTreeSet::new();
    for id in ids {
        let own: BTreeSet<ChangeHash> = node
            .history(id)?
            .into_iter()
            .filter(|entry| entry.author == key)
            .map(|entry| entry.change)
            .collect();
        if own.is_empty() {
            continue;
        }
        let doc = node.sync_document(id)?.context("a catalogued document")?;
        let deps: BTreeMap<ChangeHash, Vec<ChangeHash>> = doc
            .clone()
            .get_changes(&[])
            .iter()
            .map(|c| (c.hash(), c.deps().to_vec()))
            .collect();
        // Every ancestor of one of the key's changes is not a head among them.
        let mut covered = BTreeSet::new();
        let mut stack: Vec<ChangeHash> = own
            .iter()
            .flat_map(|c| deps.get(c).cloned().unwrap_or_default())
            .collect();
        while let Some(change) = stack.pop() {
            if covered.insert(change) {
                stack.extend(deps.get(&change).cloned().unwrap_or_default());
            }
        }
        for change in &own {
            kept.insert((id.to_string(), change.to_string()));
            if !covered.contains(change) {
                heads.push(*change);
            }
        }
    }
    Ok((heads, kept))
}

/// How one honest node saw the bad peer.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    pub institution: &'static str,
    /// Still connected at the end.
    pub connected: bool,
    pub score: Option<f64>,
    pub strikes: u32,
    pub unanswered: u64,
    /// Its changes this node refused.
    pub changes_rejected: u64,
    /// Connections this node's gate denied (from anyone).
    pub denied: u64,
}

/// What `report.json` says of a Byzantine preset.
#[derive(Clone, Debug, Serialize)]
pub struct ByzantineReport {
    /// The bad node.
    pub institution: &'static str,
    #[serde(flatten)]
    pub bad: BadNode,
    pub peer_id: String,
    /// Bad changes that left the rogue.
    pub bad_changes_sent: u64,
    pub bad_changes_by_kind: BTreeMap<&'static str, u64>,
    /// (honest node, bad change) pairs where the node holds the change as accepted: must be
    /// none.
    pub bad_changes_accepted: u64,
    /// Per honest node, the bad changes that reached it (in its quarantine or held pending).
    pub bad_changes_reached: Vec<u64>,
    /// Of those, quarantined with a reason.
    pub bad_changes_quarantined: u64,
    /// Held pending: invented dependencies, never applied and never passed on.
    pub bad_changes_pending: u64,
    /// Found in the other state than expected (a forgery pending, an invented dependency
    /// quarantined): must be none.
    pub bad_changes_misfiled: u64,
    /// Reasons given in quarantine for the bad changes, with counts.
    pub quarantine_reasons: BTreeMap<String, u64>,
    /// Messages that carried no change (undecodable, oversized, replayed).
    pub garbage_messages: u64,
    /// Hostile sync requests sent; answers garbage; answers withheld.
    pub requests_sent: u64,
    pub answers_garbage: u64,
    pub answers_withheld: u64,
    /// Gossip messages no honest node would take from it any more.
    pub publish_failed: u64,
    /// Valid changes the bad node wrote (a rogue's chain, a flood): every honest node must
    /// hold them.
    pub valid_changes_sent: u64,
    pub valid_changes_missing: u64,
    /// The lowest gossip score an honest node gave it.
    pub score_min: Option<f64>,
    /// The most faulty answers an honest node counted from it.
    pub strikes_max: u32,
    /// Honest nodes disconnected from it at the end.
    pub disconnected_by: u64,
    /// Honest nodes whose rules (score below `DISCONNECT_SCORE`, `SYNC_STRIKES_MAX`
    /// strikes) say it must be disconnected, and that are not: must be none.
    pub rules_unenforced: u64,
    /// Connections the honest nodes' gates denied.
    pub denied: u64,
    pub per_node: Vec<PeerView>,
    pub revocation: Option<RevocationReport>,
    /// Writes the flooding app made.
    pub flood_writes: u64,
    /// Every check of the preset held.
    pub passed: bool,
    /// What failed, if anything.
    pub failures: Vec<String>,
}

/// The revocation, as the honest nodes drew it.
#[derive(Clone, Debug, Serialize)]
pub struct RevocationReport {
    pub at_ms: u64,
    pub cutoff_heads: usize,
    /// The key's changes the authority's side held at the revocation.
    pub kept_expected: u64,
    /// Whether every honest node keeps exactly those of the key.
    pub same_cutoff_everywhere: bool,
    /// The key's acknowledged writes past the cut-off (refused everywhere).
    pub refused_writes: u64,
}

/// Judges the honest nodes' states against what the bad node did.
pub fn judge(
    byzantine: &Byzantine,
    members: &[Member],
    log: &AdversaryLog,
    honest: &[usize],
    states: &[NodeState],
    stats: &[Option<estuary_node::sync::SyncStats>],
    refused_writes: u64,
) -> ByzantineReport {
    let mut failures = Vec::new();
    let empty = RogueLog::default();
    let rogue = log.rogue.as_ref().unwrap_or(&empty);
    let mut by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
    for bad in &rogue.bad {
        *by_kind.entry(bad.kind).or_default() += 1;
    }
    let (mut accepted, mut quarantined, mut pending, mut misfiled) = (0, 0, 0, 0);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut reached = vec![0u64; states.len()];
    for bad in &rogue.bad {
        for (index, state) in states.iter().enumerate() {
            if state
                .documents
                .get(&bad.document)
                .is_some_and(|d| d.changes.contains(&bad.change))
            {
                accepted += 1;
                failures.push(format!(
                    "{} accepted a bad change ({}) {} of {}",
                    members[honest[index]].id, bad.kind, bad.change, bad.document
                ));
            }
            let in_quarantine = state
                .quarantine
                .iter()
                .find(|(d, c, _)| *d == bad.document && *c == bad.change);
            let held = state
                .pending_changes
                .contains(&(bad.document.clone(), bad.change.clone()));
            if let Some((_, _, reason)) = in_quarantine {
                reached[index] += 1;
                quarantined += 1;
                *reasons.entry(reason.clone()).or_default() += 1;
                if bad.expect != Expect::Quarantined || reason.is_empty() {
                    misfiled += 1;
                }
            } else if held {
                reached[index] += 1;
                pending += 1;
                if bad.expect != Expect::Pending {
                    misfiled += 1;
                }
            }
        }
    }
    if misfiled > 0 {
        failures.push(format!(
            "{misfiled} bad changes were not in the state expected"
        ));
    }
    // Valid changes of the bad node: on every honest node.
    let valid: BTreeSet<&Acknowledged> = rogue
        .valid
        .iter()
        .chain(log.flood.iter().map(|(ack, _)| ack))
        .collect();
    let mut valid_missing = 0;
    for (document, change) in &valid {
        for state in states {
            if !state
                .documents
                .get(document)
                .is_some_and(|d| d.changes.contains(change))
            {
                valid_missing += 1;
            }
        }
    }
    if valid_missing > 0 {
        failures.push(format!(
            "{valid_missing} of the bad node's valid changes are missing on honest nodes"
        ));
    }
    // The bad peer as each honest node saw it.
    let mut per_node = Vec::new();
    let (mut score_min, mut strikes_max, mut disconnected_by, mut unenforced, mut denied) =
        (None::<f64>, 0, 0, 0, 0);
    for (index, stats) in stats.iter().enumerate() {
        let institution = members[honest[index]].id;
        // A flooding node is checked like the others, but is not its own peer.
        let Some(stats) = stats.as_ref().filter(|_| honest[index] != byzantine.node) else {
            continue;
        };
        denied += stats.denied;
        // A node that never met the bad peer has nothing to disconnect.
        let Some(peer) = stats.peers.get(&log.peer_id).cloned() else {
            continue;
        };
        let met = peer.messages_in > 0 || peer.score.is_some() || peer.strikes > 0;
        if let Some(score) = peer.score {
            score_min = Some(score_min.map_or(score, |m: f64| m.min(score)));
        }
        strikes_max = strikes_max.max(peer.strikes);
        disconnected_by += u64::from(met && !peer.connected);
        let must_go =
            peer.score.is_some_and(|s| s < DISCONNECT_SCORE) || peer.strikes >= SYNC_STRIKES_MAX;
        if must_go && peer.connected {
            unenforced += 1;
            failures.push(format!("{institution} keeps a peer its rules disconnect"));
        }
        per_node.push(PeerView {
            institution,
            connected: peer.connected,
            score: peer.score,
            strikes: peer.strikes,
            unanswered: peer.unanswered,
            changes_rejected: peer.changes_rejected,
            denied: stats.denied,
        });
    }
    if accepted > 0 {
        failures.push(format!("{accepted} (node, bad change) pairs accepted"));
    }
    // What each preset must show, beyond "nothing bad accepted".
    match byzantine.bad {
        BadNode::Rogue {
            misbehaviour: Misbehaviour::Forged | Misbehaviour::Garbage,
        } => {
            if quarantined == 0 {
                failures.push("no bad change reached an honest node's quarantine".into());
            }
            if disconnected_by == 0 {
                failures.push("no honest node disconnected the rogue".into());
            }
        }
        BadNode::Rogue {
            misbehaviour: Misbehaviour::Mute,
        } => {
            if rogue.answers_garbage + rogue.answers_withheld == 0 {
                failures.push("no honest node asked the mute rogue anything".into());
            }
            if strikes_max < SYNC_STRIKES_MAX {
                failures.push(format!(
                    "no honest node counted {SYNC_STRIKES_MAX} faulty answers (at most {strikes_max})"
                ));
            }
        }
        BadNode::Rogue {
            misbehaviour: Misbehaviour::Stranger,
        } => {
            if denied == 0 {
                failures.push("no honest node denied the stranger".into());
            }
            if quarantined + pending > 0 {
                failures.push("a stranger's change got past the gate".into());
            }
        }
        BadNode::Flood => {
            if log.flood.is_empty() {
                failures.push("the flooding app wrote nothing".into());
            }
        }
        BadNode::Revoked { .. } => {}
    }
    let revocation = log.revocation.as_ref().map(|revocation| {
        let same = states.iter().all(|s| s.authored == revocation.kept);
        if !same {
            failures.push("honest nodes keep different changes of the revoked key".into());
        }
        RevocationReport {
            at_ms: revocation.at_ms,
            cutoff_heads: revocation.cutoff_heads,
            kept_expected: revocation.kept.len() as u64,
            same_cutoff_everywhere: same,
            refused_writes,
        }
    });
    if matches!(byzantine.bad, BadNode::Revoked { .. }) && revocation.is_none() {
        failures.push("the revocation never happened".into());
    }
    ByzantineReport {
        institution: members[byzantine.node].id,
        bad: byzantine.bad,
        peer_id: log.peer_id.clone(),
        bad_changes_sent: rogue.bad.len() as u64,
        bad_changes_by_kind: by_kind,
        bad_changes_accepted: accepted,
        bad_changes_reached: reached,
        bad_changes_quarantined: quarantined,
        bad_changes_pending: pending,
        bad_changes_misfiled: misfiled,
        quarantine_reasons: reasons,
        garbage_messages: rogue.garbage_messages,
        requests_sent: rogue.requests_sent,
        answers_garbage: rogue.answers_garbage,
        answers_withheld: rogue.answers_withheld,
        publish_failed: rogue.publish_failed,
        valid_changes_sent: valid.len() as u64,
        valid_changes_missing: valid_missing,
        score_min,
        strikes_max,
        disconnected_by,
        rules_unenforced: unenforced,
        denied,
        per_node,
        revocation,
        flood_writes: log.flood.len() as u64,
        passed: failures.is_empty(),
        failures: failures.into_iter().take(20).collect(),
    }
}

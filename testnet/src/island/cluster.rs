//! What a run drives: a set of nodes that take writes, crash and restart, suffer faults, and
//! can be read by the checker. `inproc` and `procs` implement it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::{
    Bytes32, CorrectableList, Demographics, DocumentId, HealthFileOp, HealthFileView,
    InstitutionId, NewReferral, ReferralOp,
};
use estuary_node::replica::Node;
use estuary_node::sync::faults::Faults;
use estuary_node::sync::{Multiaddr, SyncStats};

use super::check::NodeState;

/// A write to make at a node, in the typed form apps send.
#[derive(Clone, Debug)]
pub enum Write {
    /// Register a resident.
    CreateHealthFile(Demographics),
    /// Edit a health file.
    HealthFile(DocumentId, HealthFileOp),
    /// Mark entered in error the latest exam result the writing institution (named here)
    /// filed in a file and has not marked yet: which one is known only at the node, when the
    /// write is made.
    CorrectOwnExam(DocumentId, InstitutionId),
    /// Send a referral.
    CreateReferral(NewReferral),
    /// Move or edit a referral.
    Referral(DocumentId, ReferralOp),
}

/// Why a planned write was not made.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// The node was down.
    NodeDown,
    /// The document had not reached the node yet.
    NotYetHere,
    /// The model refused it given what the node held (a transition made moot by a concurrent
    /// one, for instance).
    Refused,
    /// The node's pipeline refused it: the node's key was revoked, or the write built on a
    /// change a revocation withdrew meanwhile.
    RefusedByPipeline,
    /// A correction found no record of the writer's to correct (its write was skipped).
    NothingToCorrect,
}

impl Skip {
    pub fn name(&self) -> &'static str {
        match self {
            Skip::NodeDown => "node_down",
            Skip::NotYetHere => "not_yet_here",
            Skip::Refused => "refused_by_model",
            Skip::RefusedByPipeline => "refused_by_pipeline",
            Skip::NothingToCorrect => "nothing_to_correct",
        }
    }
}

/// The operation that marks entered in error the latest exam result `institution` filed in
/// `file` and has not marked yet; `None` if there is none.
pub fn exam_correction(file: &HealthFileView, institution: &InstitutionId) -> Option<HealthFileOp> {
    let exam = file
        .exams
        .iter()
        .rev()
        .find(|e| e.institution == *institution && e.entered_in_error.is_none())?;
    Some(HealthFileOp::MarkEnteredInError {
        list: CorrectableList::Exams,
        entry: exam.entry.clone(),
        reason: "filed on the wrong resident".into(),
    })
}

/// Bytes and messages on the wire, and changes peers refused, summed over nodes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Traffic {
    pub wire_bytes: u64,
    pub messages: u64,
    pub rejected_changes: u64,
    /// Connections the fault layer cut (partitions, loss), over the run.
    pub connections_cut: u64,
    /// Writes the fault layer held back by a retransmission's delay, over the run.
    pub writes_delayed: u64,
}

/// The faults the network is under now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkFaults {
    /// Groups that cannot reach each other.
    pub partition: Option<Vec<Vec<usize>>>,
    /// Loss percentage.
    pub loss: Option<u64>,
}

/// How long a write held up by loss waits (lost segments arrive late, retransmitted after
/// about a TCP retransmission timeout).
pub const LOSS_DELAY: Duration = Duration::from_millis(200);

impl NetworkFaults {
    /// Puts `faults` under these faults: partitions, and loss as late writes and broken
    /// connections (the budget shrinks as loss grows).
    pub fn apply_to(&self, faults: &Faults) {
        faults.heal();
        if let Some(groups) = &self.partition {
            faults.partition(groups);
        }
        if let Some(percent) = self.loss {
            faults.delay(percent, LOSS_DELAY);
            let budget = 64 * 1024 * 100 / percent.max(1);
            faults.cut_after(budget, budget * 8);
        }
    }
}

/// What a write made at a node: its own change, and a document the node sent with it (a
/// redirect's onward referral, with the change that created it).
#[derive(Clone, Copy, Debug)]
pub struct Made {
    pub id: DocumentId,
    pub change: ChangeHash,
    pub onward: Option<(DocumentId, ChangeHash)>,
}

impl Made {
    /// A write that made one change.
    pub fn one((id, change): (DocumentId, ChangeHash)) -> Self {
        Self {
            id,
            change,
            onward: None,
        }
    }
}

/// A set of nodes.
pub trait Cluster {
    /// How many nodes.
    fn len(&self) -> usize;
    /// Whether node `node` is up.
    fn is_up(&self, node: usize) -> bool;
    /// Makes a write at a node; `Err` if it was not made (and why). An error of the harness
    /// itself is a panic-free `anyhow` error.
    fn write(&mut self, node: usize, write: &Write) -> anyhow::Result<Result<Made, Skip>>;
    /// Loads residents' existing records at a node (NDJSON, the data set's shape), each
    /// resident one change; the files and changes loaded, or why nothing was.
    fn load(
        &mut self,
        node: usize,
        ndjson: &str,
    ) -> anyhow::Result<Result<Vec<(DocumentId, ChangeHash)>, Skip>>;
    /// Kills a node.
    fn crash(&mut self, node: usize) -> anyhow::Result<()>;
    /// Restarts a killed node from its data directory.
    fn restart(&mut self, node: usize) -> anyhow::Result<()>;
    /// Puts the network under these faults (no-op where they cannot be injected).
    fn set_faults(&mut self, faults: &NetworkFaults);
    /// A node's catalogue: document id → digest of its heads.
    fn catalogue(&mut self, node: usize) -> anyhow::Result<BTreeMap<[u8; 16], [u8; 32]>>;
    /// A node's full state, for the checker; `authored_by`: list that key's changes too.
    fn state(&mut self, node: usize, authored_by: Option<Bytes32>) -> anyhow::Result<NodeState>;
    /// Traffic so far.
    fn traffic(&mut self) -> Traffic;
    /// Asks every node to reconcile now.
    fn reconcile_now(&mut self);
    /// Stops every node.
    fn shutdown(&mut self);
    /// The node itself, where it runs in this process (the Byzantine presets drive the bad
    /// node's own misbehaviour through it).
    fn handle(&self, _node: usize) -> Option<Arc<Node>> {
        None
    }
    /// Where a node listens, where others in this process can dial it.
    fn address(&self, _node: usize) -> Option<Multiaddr> {
        None
    }
    /// Gives a node a newer signed roster, as its operator would; it passes it on.
    fn update_roster(&mut self, _node: usize, _signed: &[u8]) -> anyhow::Result<()> {
        anyhow::bail!("this cluster cannot hand a node a roster during a run")
    }
    /// A node's sync figures (per peer: score, strikes, disconnections).
    fn sync_stats(&self, _node: usize) -> Option<SyncStats> {
        None
    }
    /// Reads health file `id` at a node as a clinical app would (its view; through the API
    /// where nodes serve one) and says how long the node took to answer; `None` if the node is
    /// down or does not hold the file yet.
    fn read(&mut self, node: usize, id: DocumentId) -> anyhow::Result<Option<Duration>>;
    /// The file holding the resident's main record, as `node` reads the health file `id`
    /// (itself for a file linked with none); `None` if the node is down or lacks the file.
    fn main_file(&mut self, node: usize, id: DocumentId) -> anyhow::Result<Option<DocumentId>>;
    /// A node's `/metrics` text, where nodes serve their HTTP API.
    fn metrics(&mut self, _node: usize) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// Lets a node's dashboard record its peers' lag now, where the harness must do it (a
    /// node process samples itself).
    fn sample_dashboard(&mut self, _node: usize) {}
    /// A static copy of a node's dashboard as it is now (HTML); `None` if the node is down.
    fn dashboard(&mut self, node: usize) -> anyhow::Result<Option<String>>;
}

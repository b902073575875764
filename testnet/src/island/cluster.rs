//! What a run drives: a set of nodes that take writes, crash and restart, suffer faults, and
//! can be read by the checker. `inproc` and `procs` implement it.

use std::collections::BTreeMap;

use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::{Demographics, DocumentId, HealthFileOp, NewReferral, ReferralOp};

use super::check::NodeState;

/// A write to make at a node, in the typed form apps send.
#[derive(Clone, Debug)]
pub enum Write {
    /// Register a resident.
    CreateHealthFile(Demographics),
    /// Edit a health file.
    HealthFile(DocumentId, HealthFileOp),
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
}

impl Skip {
    pub fn name(&self) -> &'static str {
        match self {
            Skip::NodeDown => "node_down",
            Skip::NotYetHere => "not_yet_here",
            Skip::Refused => "refused_by_model",
        }
    }
}

/// Bytes and messages on the wire, and changes peers refused, summed over nodes.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Traffic {
    pub wire_bytes: u64,
    pub messages: u64,
    pub rejected_changes: u64,
}

/// The faults the network is under now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkFaults {
    /// Groups that cannot reach each other.
    pub partition: Option<Vec<Vec<usize>>>,
    /// Loss percentage.
    pub loss: Option<u64>,
}

/// A set of nodes.
pub trait Cluster {
    /// How many nodes.
    fn len(&self) -> usize;
    /// Whether node `node` is up.
    fn is_up(&self, node: usize) -> bool;
    /// Makes a write at a node; `Err` if it was not made (and why). An error of the harness
    /// itself is a panic-free `anyhow` error.
    fn write(
        &mut self,
        node: usize,
        write: &Write,
    ) -> anyhow::Result<Result<(DocumentId, ChangeHash), Skip>>;
    /// Kills a node.
    fn crash(&mut self, node: usize) -> anyhow::Result<()>;
    /// Restarts a killed node from its data directory.
    fn restart(&mut self, node: usize) -> anyhow::Result<()>;
    /// Puts the network under these faults (no-op where they cannot be injected).
    fn set_faults(&mut self, faults: &NetworkFaults);
    /// A node's catalogue: document id → digest of its heads.
    fn catalogue(&mut self, node: usize) -> anyhow::Result<BTreeMap<[u8; 16], [u8; 32]>>;
    /// A node's full state, for the checker.
    fn state(&mut self, node: usize) -> anyhow::Result<NodeState>;
    /// Traffic so far.
    fn traffic(&mut self) -> Traffic;
    /// Asks every node to reconcile now.
    fn reconcile_now(&mut self);
    /// Stops every node.
    fn shutdown(&mut self);
}

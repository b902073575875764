//! Sync over libp2p: members find each other and refuse strangers, push every new change at
//! once over gossipsub, and periodically reconcile catalogues with a random connected member
//! to pull whatever the push missed — one document or 700,000. Every change from the network
//! goes through the node's ingest pipeline.
//!
//! One task drives the swarm; the node's blocking work (ingest, reading documents) runs on
//! tokio's blocking pool and reports back to it. Every queue, message and concurrency level
//! has a named bound below or in `protocol`.

mod background;
mod client;
pub mod document;
mod driver;
pub mod faults;
mod gate;
mod gossip;
mod peers;
mod progress;
pub mod protocol;
mod serve;
mod swarm;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{
    self, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId, TopicHash,
};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Swarm, Transport, identify, mdns, noise, ping, relay, tcp, yamux};
use serde::Serialize;
use serde_bytes::ByteArray;
use tokio::sync::{mpsc, oneshot};

pub use document::{Carried, DocumentSyncError};
pub use libp2p::{Multiaddr, PeerId};
use protocol::{
    FETCH_DOCUMENTS_MAX, FetchedDocument, GOSSIP_ENVELOPE_BYTES_MAX, GOSSIP_MESSAGE_BYTES_MAX,
    Gossip, PROTOCOL, Refusal, Request, Response, SyncMessage, UrgentDocument,
};

use crate::membership::RosterUpdate;
use crate::model::DocumentId;
use crate::model::automerge::sync::State;
use crate::reconcile::Difference;
use crate::reconcile::Hybrid;
use crate::replica::{Ingested, Node, NodeError, URGENT_DOCUMENTS_MAX};
use driver::*;
use gossip::*;
use peers::*;
use progress::InProgress;
pub use swarm::topic_names;
use swarm::*;

/// Concurrent automerge sync sessions this node runs with one peer.
pub const SYNC_SESSIONS_PER_PEER_MAX: usize = 8;
/// Concurrent fetches (of up to `FETCH_DOCUMENTS_MAX` documents) with one peer.
pub const FETCHES_PER_PEER_MAX: usize = 4;
/// Rounds one sync session may take before it is abandoned (the next reconciliation
/// starts afresh).
pub const SYNC_ROUNDS_MAX: usize = 32;
/// Documents being synced or fetched (queued or in flight, with any peer); more differing
/// documents wait for a later reconciliation.
pub const DOCUMENTS_IN_PROGRESS_MAX: usize = 100_000;
/// Of those, most worked on with one peer; beyond, its documents wait for a later
/// reconciliation. A peer that announces documents it never serves holds at most this share,
/// so three quarters of the budget stay for the other peers. A node catching up from a
/// single peer queues this many documents per reconciliation.
pub const DOCUMENTS_IN_PROGRESS_PER_PEER_MAX: usize = DOCUMENTS_IN_PROGRESS_MAX / 4;
/// Differences a reconciliation found beyond the peer's share of documents in progress, kept
/// (over all peers) to take into progress as room frees up rather than found again by another
/// reconciliation: a document id and a flag each, about 17 MB at most. A node catching up
/// from a single peer reconciles once, not once per share.
pub const DIFFERENCES_KEPT_MAX: usize = 1_000_000;
/// A node with more documents than this still to fetch or sync (in progress or kept, with
/// any peer) starts no reconciliation while that work moves: each would find the same
/// differences again, at about 50 bytes per differing document (a heal of 5,000 realistic
/// files a side spent six times the files' bytes so). Below it, the next reconciliation finds
/// more before the queues run dry: a full round of fetches with one peer.
pub const CATCH_UP_BACKLOG_RECONCILE_MAX: usize = FETCHES_PER_PEER_MAX * FETCH_DOCUMENTS_MAX;
/// Backlogged work with no document finished for this long is stalled (a peer holding its
/// share of fetches unanswered): it no longer holds reconciliations back, so that they find
/// other peers to take the documents from.
pub const BACKLOG_STALLED_AFTER: Duration = Duration::from_secs(10);
/// Longest a backlog holds reconciliations back after the last one that ended well, however
/// it moves (a peer serving a document now and then).
pub const RECONCILE_HELD_MAX: Duration = Duration::from_secs(60);
/// A peer whose reconciliations keep finding only documents it lacks (it is catching up from
/// this node, and pulls them itself) is asked again after `reconcile_every` × 2ⁿ for the n-th
/// such reconciliation in a row, n at most this.
pub const LOPSIDED_BACKOFF_MAX: u32 = 5;
/// Requests from one peer being served at once; more are refused as busy.
pub const INBOUND_REQUESTS_PER_PEER_MAX: usize = 16;
/// Requests one peer may make per second (a token bucket of this size, refilled per second).
pub const INBOUND_REQUESTS_PER_PEER_PER_S: u32 = 400;
/// Sync states kept for peers' sessions (per peer and document); the oldest is dropped.
pub const RESPONDER_SYNC_STATES_MAX: usize = 1_024;
/// Of those, most kept for one peer.
pub const RESPONDER_SYNC_STATES_PER_PEER_MAX: usize = 64;
/// A state is kept only after a message of at most this many bytes (what a peer can make
/// this node hold is then at most `RESPONDER_SYNC_STATES_MAX` × this).
pub const RESPONDER_STATE_MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Reconciliation queries one peer may make per second (each costs up to one pass over the
/// catalogue; an in-sync check, none).
pub const RECONCILE_QUERIES_PER_PEER_PER_S: u32 = 40;
/// Gossip messages being validated at once; more are ignored (anti-entropy recovers them).
pub const GOSSIP_VALIDATIONS_MAX: usize = 256;
/// Gossip changes from one publisher being validated at once; more wait their turn in its
/// queue. Validations of one node take turns at its decision lock, so without this a member
/// flooding valid changes would put hundreds of them ahead of every other member's change.
pub const GOSSIP_VALIDATIONS_PER_PUBLISHER_MAX: usize = 4;
/// Gossip changes from one publisher waiting for validation; more are ignored (not passed on,
/// not penalised: anti-entropy brings them).
pub const GOSSIP_QUEUED_PER_PUBLISHER_MAX: usize = 1_024;
/// Gossip changes waiting for validation, from all publishers.
pub const GOSSIP_QUEUED_MAX: usize = 8_192;
/// Bytes of gossip changes waiting for validation, from all publishers (each envelope is at
/// most `GOSSIP_ENVELOPE_BYTES_MAX`).
pub const GOSSIP_QUEUED_BYTES_MAX: usize = 32 * 1024 * 1024;
/// A queued gossip change older than this is not validated from the queue: gossipsub keeps
/// a message for its verdict for about 5 heartbeats (5 s), after which a verdict neither
/// forwards it nor scores its sender. It is ignored; anti-entropy brings it.
pub const GOSSIP_QUEUED_AGE_MAX: Duration = Duration::from_secs(4);
/// Heads of an announcement that are looked up; more are ignored.
pub const ANNOUNCED_HEADS_MAX: usize = 16;
/// A peer whose gossip score falls below this is disconnected and banned.
pub const DISCONNECT_SCORE: f64 = -500.0;
/// How long a peer disconnected for its score or its answers stays banned.
pub const BAN: Duration = Duration::from_secs(300);
/// Faulty answers to this node's sync requests (of the wrong kind, a roster that does not
/// verify, a sync message or reconciliation reply that breaks the protocol) after which a
/// peer is disconnected and banned. A member's node never answers so, whatever its link
/// does (a cut link loses an answer, it does not garble one): a few are proof of broken or
/// hostile code. One is forgiven, in case of a bug on either side.
pub const SYNC_STRIKES_MAX: u32 = 4;
/// A peer that let a request time out is not asked to reconcile for this long: a peer that
/// never answers costs each node one timeout per period, not one per round.
pub const UNANSWERED_BACKOFF: Duration = Duration::from_secs(30);
/// Commands queued to the sync task.
const COMMANDS_MAX: usize = 256;

// Per-peer and per-publisher shares never exceed the totals they are shares of; a fetch fits
// a peer's share of documents in progress; one envelope fits the gossip queue.
const _: () = {
    assert!(DOCUMENTS_IN_PROGRESS_PER_PEER_MAX <= DOCUMENTS_IN_PROGRESS_MAX);
    assert!(FETCH_DOCUMENTS_MAX <= DOCUMENTS_IN_PROGRESS_PER_PEER_MAX);
    assert!(RESPONDER_SYNC_STATES_PER_PEER_MAX <= RESPONDER_SYNC_STATES_MAX);
    assert!(RESPONDER_STATE_MESSAGE_BYTES_MAX <= protocol::SYNC_MESSAGE_BYTES_MAX);
    assert!(GOSSIP_VALIDATIONS_PER_PUBLISHER_MAX <= GOSSIP_VALIDATIONS_MAX);
    assert!(GOSSIP_QUEUED_PER_PUBLISHER_MAX <= GOSSIP_QUEUED_MAX);
    assert!(GOSSIP_ENVELOPE_BYTES_MAX <= GOSSIP_QUEUED_BYTES_MAX);
    // An answer of coded symbols at its limit, with its envelope.
    assert!(
        crate::riblt::SYMBOLS_PER_REPLY_MAX as u64 * crate::riblt::SYMBOL_WIRE_BYTES as u64 + 64
            <= protocol::RESPONSE_BYTES_MAX
    );
};
/// How long an idle connection is kept.
const IDLE_CONNECTION: Duration = Duration::from_secs(120);

/// How a node reaches others.
#[derive(Clone, Debug, Default)]
pub enum TransportKind {
    /// TCP and QUIC (with DNS): a real deployment.
    #[default]
    Network,
    /// libp2p's in-process memory transport: tests and the in-process testnet.
    Memory,
    /// The memory transport under injected faults, as node `node` of the set `faults` covers.
    Faulty {
        /// The faults in force.
        faults: Arc<faults::Faults>,
        /// This node's index among them.
        node: usize,
    },
}

/// The sync layer's configuration.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start, and again whenever the connection is lost.
    pub bootstrap: Vec<Multiaddr>,
    /// Find peers on the local network with mDNS.
    pub mdns: bool,
    /// Serve as a circuit relay for other members (the core hospital, reachable by all). A
    /// relay announces its external addresses (below) in every reservation.
    pub relay_server: bool,
    /// Addresses others reach this node at; empty: its listen addresses.
    pub external: Vec<Multiaddr>,
    /// Relays to be reachable through, each `…/p2p/<relay PeerId>` (a centre behind NAT):
    /// the node listens on a circuit through each, and others dial it at
    /// `…/p2p/<relay>/p2p-circuit/p2p/<this node>`.
    pub relays: Vec<Multiaddr>,
    /// How often to reconcile with a random connected member.
    pub reconcile_every: Duration,
    /// How long a request may take.
    pub request_timeout: Duration,
    /// Envelopes larger than this are announced on gossip rather than carried (at most
    /// `GOSSIP_ENVELOPE_BYTES_MAX`, the default).
    pub gossip_envelope_bytes_max: usize,
    /// Sync messages this node would send larger than this are not sent: the document is
    /// fetched instead (at most `SYNC_MESSAGE_BYTES_MAX`, the default).
    pub sync_message_bytes_max: usize,
    /// The transport.
    pub transport: TransportKind,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            relay_server: false,
            external: Vec::new(),
            relays: Vec::new(),
            reconcile_every: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            gossip_envelope_bytes_max: GOSSIP_ENVELOPE_BYTES_MAX,
            sync_message_bytes_max: protocol::SYNC_MESSAGE_BYTES_MAX,
            transport: TransportKind::Network,
        }
    }
}

/// Why the sync layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The transport or a behaviour could not be set up.
    #[error("the network layer could not start: {0}")]
    Setup(String),
    /// An address to listen on was refused.
    #[error("cannot listen on {address}: {reason}")]
    Listen {
        /// The address.
        address: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The sync task has stopped.
    #[error("the sync task has stopped")]
    Stopped,
    /// The node refused the operation.
    #[error(transparent)]
    Node(Box<NodeError>),
}

impl From<NodeError> for SyncError {
    fn from(error: NodeError) -> Self {
        Self::Node(Box::new(error))
    }
}

/// Figures for one peer.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeerStats {
    /// The peer's institution (from the roster).
    pub institution: Option<String>,
    /// Whether it is connected now.
    pub connected: bool,
    /// Bytes received from it (sync protocol and gossip payloads).
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
    /// Messages received from it.
    pub messages_in: u64,
    /// Messages sent to it.
    pub messages_out: u64,
    /// Documents found differing with it and synced or fetched, over all reconciliations.
    pub documents_reconciled: u64,
    /// Changes received from it that the pipeline accepted.
    pub changes_received: u64,
    /// Changes received from it that the pipeline refused.
    pub changes_rejected: u64,
    /// When a reconciliation with it last completed (milliseconds since the epoch).
    pub last_reconciled_ms: Option<u64>,
    /// Documents that differed at the last completed reconciliation: how far apart the two
    /// nodes were.
    pub lag: Option<u64>,
    /// Its gossipsub score.
    pub score: Option<f64>,
    /// Round trips the last completed reconciliation this node started with it took.
    pub last_round_trips: Option<u64>,
    /// Bytes (both ways) that reconciliation took.
    pub last_reconciliation_bytes: Option<u64>,
    /// The address of the connection last established with it.
    pub address: Option<String>,
    /// The last ping round-trip time, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Faulty answers it gave to this node's sync requests (at `SYNC_STRIKES_MAX` it is
    /// disconnected and banned).
    pub strikes: u32,
    /// This node's sync requests it let time out.
    pub unanswered: u64,
    /// When it last disconnected (milliseconds since the epoch); absent while connected.
    pub disconnected_ms: Option<u64>,
    /// This node's audit sequence when it last disconnected: the changes decided here since
    /// then are what it has not had from this node (absent while connected).
    pub audit_sequence_at_disconnect: Option<u64>,
}

/// Progress of pulling documents this node lacks.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CatchUp {
    /// Documents found missing here since start.
    pub documents_total: u64,
    /// Of those, fetched.
    pub documents_done: u64,
    /// Envelope bytes fetched.
    pub bytes: u64,
    /// Estimated time left at the current rate, in seconds.
    pub eta_s: Option<f64>,
}

/// The sync layer's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SyncStats {
    /// Per peer (by PeerId, as text).
    pub peers: BTreeMap<String, PeerStats>,
    /// Bulk catch-up.
    pub catch_up: CatchUp,
    /// Peers disconnected for their gossip score, their faulty answers or revocation.
    pub disconnected: u64,
    /// Connections the gate denied (strangers, revoked keys, banned peers).
    pub denied: u64,
    /// Bytes sent, by what they were for.
    pub sent: SentBytes,
    /// Reconciliations this node started.
    pub reconciliations: u64,
}

/// Bytes this node sent, by what they were for (requests and answers alike; of gossip, only
/// this node's own changes, once per mesh peer: messages relayed for others and gossipsub's
/// control messages are not counted).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SentBytes {
    /// Reconciliation queries and replies.
    pub reconcile: u64,
    /// Fetch requests and the documents sent in answer.
    pub fetch: u64,
    /// Automerge sync messages, both ways.
    pub sync: u64,
    /// Roster and urgent-list requests and answers.
    pub roster: u64,
    /// Refusals.
    pub refused: u64,
    /// Gossiped changes and announcements.
    pub gossip: u64,
}

impl std::ops::AddAssign<&SentBytes> for SentBytes {
    fn add_assign(&mut self, other: &SentBytes) {
        self.reconcile += other.reconcile;
        self.fetch += other.fetch;
        self.sync += other.sync;
        self.roster += other.roster;
        self.refused += other.refused;
        self.gossip += other.gossip;
    }
}

impl std::ops::Sub<&SentBytes> for &SentBytes {
    type Output = SentBytes;

    fn sub(self, other: &SentBytes) -> SentBytes {
        SentBytes {
            reconcile: self.reconcile.saturating_sub(other.reconcile),
            fetch: self.fetch.saturating_sub(other.fetch),
            sync: self.sync.saturating_sub(other.sync),
            roster: self.roster.saturating_sub(other.roster),
            refused: self.refused.saturating_sub(other.refused),
            gossip: self.gossip.saturating_sub(other.gossip),
        }
    }
}

impl SentBytes {
    pub(crate) fn request(&mut self, request: &Request, bytes: u64) {
        *match request {
            Request::Reconcile(_) => &mut self.reconcile,
            Request::Sync(_) => &mut self.sync,
            Request::Fetch { .. } => &mut self.fetch,
            Request::Roster { .. } => &mut self.roster,
        } += bytes;
    }

    pub(crate) fn response(&mut self, response: &Response, bytes: u64) {
        *match response {
            Response::Reconcile(_) => &mut self.reconcile,
            Response::Sync(_) => &mut self.sync,
            Response::Fetch { .. }
            | Response::FetchDeflated { .. }
            | Response::FetchCovered { .. } => &mut self.fetch,
            Response::Roster(_) | Response::RosterAndUrgent { .. } => &mut self.roster,
            Response::Refused(_) => &mut self.refused,
        } += bytes;
    }
}

/// Reads the sync layer's figures; cheap to clone.
#[derive(Clone, Debug)]
pub struct StatsReader(Arc<Mutex<SyncStats>>);

impl StatsReader {
    /// The figures now.
    pub fn get(&self) -> SyncStats {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Dial(Multiaddr),
    ReconcileNow,
    UpdateRoster(Vec<u8>, oneshot::Sender<Result<RosterUpdate, NodeError>>),
    Connected(oneshot::Sender<Vec<PeerId>>),
    Shutdown(oneshot::Sender<()>),
}

/// A running sync layer.
pub struct SyncHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<SyncStats>>,
    task: tokio::task::JoinHandle<()>,
}

impl SyncHandle {
    /// Starts the sync layer for `node` on the current tokio runtime.
    pub fn start(node: Arc<Node>, mut config: SyncConfig) -> Result<Self, SyncError> {
        config.gossip_envelope_bytes_max = config
            .gossip_envelope_bytes_max
            .min(GOSSIP_ENVELOPE_BYTES_MAX);
        config.sync_message_bytes_max = config
            .sync_message_bytes_max
            .min(protocol::SYNC_MESSAGE_BYTES_MAX);
        let bans: gate::Bans = Arc::default();
        let mut swarm = build_swarm(&node, &config, bans.clone())?;
        for address in &config.listen {
            if let TransportKind::Faulty { faults, node } = &config.transport {
                faults.register(address, *node);
            }
            swarm
                .listen_on(address.clone())
                .map_err(|e| SyncError::Listen {
                    address: address.clone(),
                    reason: e.to_string(),
                })?;
        }
        // Listen addresses stand in for external ones only when they are concrete.
        let concrete = |address: &&Multiaddr| {
            address.iter().all(|p| match p {
                Protocol::Ip4(ip) => !ip.is_unspecified(),
                Protocol::Ip6(ip) => !ip.is_unspecified(),
                Protocol::Tcp(port) | Protocol::Udp(port) => port != 0,
                _ => true,
            })
        };
        let external = if config.external.is_empty() {
            &config.listen
        } else {
            &config.external
        };
        for address in external.iter().filter(concrete) {
            swarm.add_external_address(address.clone());
        }
        for relay in &config.relays {
            let circuit = relay.clone().with(Protocol::P2pCircuit);
            swarm
                .listen_on(circuit.clone())
                .map_err(|e| SyncError::Listen {
                    address: circuit,
                    reason: e.to_string(),
                })?;
        }
        let topics = Topics::new(&node);
        for topic in [&topics.changes, &topics.roster] {
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(topic)
                .map_err(|e| SyncError::Setup(e.to_string()))?;
        }
        for address in &config.bootstrap {
            if let Err(error) = swarm.dial(address.clone()) {
                tracing::warn!(%address, %error, "cannot dial a bootstrap peer");
            }
        }
        let peer_id = *swarm.local_peer_id();
        let (commands, commands_rx) = mpsc::channel(COMMANDS_MAX);
        let stats = Arc::new(Mutex::new(SyncStats::default()));
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let local = node.local_changes();
        let background = background::Background::start()
            .map_err(|error| SyncError::Setup(format!("catch-up threads: {error}")))?;
        let driver = Driver {
            node,
            background,
            swarm,
            config,
            topics,
            bans,
            stats: stats.clone(),
            jobs,
            outbound: HashMap::new(),
            peers: HashMap::new(),
            responder: ResponderStates::default(),
            validations: 0,
            publishers: HashMap::new(),
            queued: 0,
            queued_bytes: 0,
            catch_up_started: None,
            bootstrap_peers: HashMap::new(),
            in_progress: InProgress::default(),
            connections: 0,
            backlog_finished: 0,
            backlog_moved: Instant::now(),
            reconciled_at: Instant::now(),
            urgent_named: HashSet::new(),
        };
        let task = tokio::spawn(driver.run(commands_rx, jobs_rx, local));
        Ok(Self {
            peer_id,
            commands,
            stats,
            task,
        })
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, SyncError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| SyncError::Stopped)?;
        rx.await.map_err(|_| SyncError::Stopped)
    }

    /// The addresses this node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, SyncError> {
        self.ask(Command::ListenAddrs).await
    }

    /// The peers connected now.
    pub async fn connected(&self) -> Result<Vec<PeerId>, SyncError> {
        self.ask(Command::Connected).await
    }

    /// Dials a peer.
    pub async fn dial(&self, address: Multiaddr) -> Result<(), SyncError> {
        self.commands
            .send(Command::Dial(address))
            .await
            .map_err(|_| SyncError::Stopped)
    }

    /// Reconciles with a connected member now rather than at the next tick (unless a backlog
    /// that still moves holds reconciliations back: `CATCH_UP_BACKLOG_RECONCILE_MAX`).
    pub async fn reconcile_now(&self) -> Result<(), SyncError> {
        self.commands
            .send(Command::ReconcileNow)
            .await
            .map_err(|_| SyncError::Stopped)
    }

    /// Adopts a newer signed roster, passes it on to the other members, and disconnects
    /// peers it no longer admits. The roster held already is left as it is.
    pub async fn update_roster(&self, signed: Vec<u8>) -> Result<RosterUpdate, SyncError> {
        Ok(self.ask(|tx| Command::UpdateRoster(signed, tx)).await??)
    }

    /// The sync figures now.
    pub fn stats(&self) -> SyncStats {
        self.stats_reader().get()
    }

    /// A handle that reads the same figures, for whoever outlives a borrow of this one (the
    /// API, metrics).
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader(self.stats.clone())
    }

    /// Stops the sync layer: closes connections, waits for the task.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

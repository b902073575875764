//! Sync over libp2p: members find each other and refuse strangers, push every new change at
//! once over gossipsub, and periodically reconcile catalogues with a random connected member
//! to pull whatever the push missed — one document or 700,000. Every change from the network
//! goes through the node's ingest pipeline.
//!
//! One task drives the swarm; the node's blocking work (ingest, reading documents) runs on
//! tokio's blocking pool and reports back to it. Every queue, message and concurrency level
//! has a named bound below or in `protocol`.

mod background;
pub mod document;
pub mod faults;
mod gate;
mod progress;
pub mod protocol;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    FETCH_DOCUMENTS_MAX, GOSSIP_ENVELOPE_BYTES_MAX, GOSSIP_MESSAGE_BYTES_MAX, Gossip, PROTOCOL,
    Refusal, Request, Response, SyncMessage,
};

use crate::membership::RosterUpdate;
use crate::model::DocumentId;
use crate::model::automerge::sync::State;
use crate::reconcile::{Difference, Reconciliation};
use crate::replica::{Ingested, Node, NodeError};
use progress::InProgress;

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
/// catalogue).
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

    /// Reconciles with a connected member now rather than at the next tick.
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

#[derive(NetworkBehaviour)]
struct Behaviour {
    gate: gate::Gate,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    sync: request_response::Behaviour<protocol::Codec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
}

struct Topics {
    changes: IdentTopic,
    roster: IdentTopic,
}

impl Topics {
    fn new(node: &Node) -> Self {
        let (changes, roster) = topic_names(&node.authority());
        Self {
            changes: IdentTopic::new(changes),
            roster: IdentTopic::new(roster),
        }
    }
}

/// The consortium's gossip topics, named after its authority key: changes, and the roster.
pub fn topic_names(authority: &crate::model::Bytes32) -> (String, String) {
    (
        format!("estuary/{authority}/changes/1"),
        format!("estuary/{authority}/roster/1"),
    )
}

fn gossipsub_config(roster_topic: TopicHash) -> Result<gossipsub::Config, SyncError> {
    gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(GOSSIP_MESSAGE_BYTES_MAX + 4 * 1024)
        // A message is its content: the same envelope from two publishers is one message.
        // A roster is its content, however it was encoded on the way.
        .message_id_fn(move |message| {
            let roster = message.topic == roster_topic;
            MessageId::from(protocol::gossip_message_id(roster, &message.data))
        })
        .heartbeat_interval(Duration::from_secs(1))
        .build()
        .map_err(|e| SyncError::Setup(e.to_string()))
}

/// Gossip scoring: a member earns a little for first deliveries and loses much for each
/// invalid message (a change the pipeline refuses), which decays slowly. Delivery-rate
/// penalties are off: a consortium's traffic is bursty, and a quiet centre is not at fault.
fn peer_score(topics: &Topics) -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.99,
        ..gossipsub::TopicScoreParams::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        // Institutions may share an address (NAT, the testnet's loopback).
        ip_colocation_factor_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    };
    params.topics.insert(topics.changes.hash(), topic.clone());
    params.topics.insert(topics.roster.hash(), topic);
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -100.0,
        publish_threshold: -200.0,
        graylist_threshold: -400.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    (params, thresholds)
}

fn build_swarm(
    node: &Arc<Node>,
    config: &SyncConfig,
    bans: gate::Bans,
) -> Result<Swarm<Behaviour>, SyncError> {
    let setup = |e: &dyn std::fmt::Display| SyncError::Setup(e.to_string());
    let keypair = node.identity().libp2p_keypair();
    let topics = Topics::new(node);
    let make_behaviour = |key: &libp2p::identity::Keypair,
                          relay_client: relay::client::Behaviour|
     -> Result<Behaviour, SyncError> {
        let mut gossipsub = gossipsub::Behaviour::new(
            MessageAuthenticity::Signed(key.clone()),
            gossipsub_config(topics.roster.hash())?,
        )
        .map_err(|e| setup(&e))?;
        let (params, thresholds) = peer_score(&topics);
        gossipsub
            .with_peer_score(params, thresholds)
            .map_err(|e| setup(&e))?;
        let sync = request_response::Behaviour::with_codec(
            protocol::Codec,
            [(PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(
                    INBOUND_REQUESTS_PER_PEER_MAX
                        + SYNC_SESSIONS_PER_PEER_MAX
                        + FETCHES_PER_PEER_MAX
                        + 1,
                ),
        );
        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())
                    .map_err(|e| setup(&e))?,
            )
        } else {
            None
        };
        Ok(Behaviour {
            gate: gate::Gate::new(node.clone(), bans.clone()),
            identify: identify::Behaviour::new(identify::Config::new(
                "/estuary/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
            gossipsub,
            sync,
            mdns: mdns.into(),
            relay_client,
            relay_server: config
                .relay_server
                .then(|| relay::Behaviour::new(key.public().to_peer_id(), relay::Config::default()))
                .into(),
        })
    };
    let behaviour = |key: &libp2p::identity::Keypair, relay_client| {
        make_behaviour(key, relay_client)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    };
    let swarm_config = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(IDLE_CONNECTION);
    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair).with_tokio();
    let swarm = match config.transport {
        TransportKind::Network => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| setup(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| setup(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| setup(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(swarm_config)
            .build(),
        TransportKind::Memory | TransportKind::Faulty { .. } => {
            // Plain memory is the faulty transport with no fault in force.
            let (faults, node) = match &config.transport {
                TransportKind::Faulty { faults, node } => (faults.clone(), *node),
                _ => (faults::Faults::new(0), 0),
            };
            builder
                .with_other_transport(
                    move |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                        Ok(MemoryTransport::default()
                            .map(move |channel, point| faults.wrap(channel, node, &point))
                            .upgrade(Version::V1)
                            .authenticate(noise::Config::new(key)?)
                            .multiplex(yamux::Config::default()))
                    },
                )
                .map_err(|e| setup(&e))?
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| setup(&e))?
                .with_behaviour(behaviour)
                .map_err(|e| setup(&e))?
                .with_swarm_config(swarm_config)
                .build()
        }
    };
    Ok(swarm)
}

/// What an outbound request was for.
enum Outbound {
    Reconcile {
        run: Box<Reconciliation>,
        round_trips: u64,
        bytes: u64,
    },
    Sync {
        document: DocumentId,
        state: Box<State>,
        rounds: usize,
    },
    Fetch(Vec<ByteArray<16>>),
    Roster,
}

/// What a blocking job held, to release if it fails.
#[derive(Clone)]
enum Release {
    /// A request being served.
    Inbound,
    /// A sync session.
    Session(DocumentId),
    /// A reconciliation this node started.
    Reconciliation,
    /// Fetched documents being ingested.
    Fetched(Vec<ByteArray<16>>),
    /// A gossip validation slot of a publisher's.
    Validation(PeerId),
    /// An announcement's lookup.
    Lookup,
    /// Nothing.
    Nothing,
}

/// Work done on the blocking pool, reported to the driver.
enum Job {
    Validated {
        message_id: MessageId,
        source: PeerId,
        publisher: PeerId,
        acceptance: MessageAcceptance,
        accepted: bool,
    },
    RosterAdopted {
        result: Result<RosterUpdate, NodeError>,
        /// The gossip message it came in, to report on.
        gossip: Option<(MessageId, PeerId)>,
        /// The peer whose answer to `Request::Roster` it came in.
        answered_by: Option<PeerId>,
        /// The operator's call waiting for the result (then the roster is also published).
        reply: Option<oneshot::Sender<Result<RosterUpdate, NodeError>>>,
    },
    Respond {
        peer: PeerId,
        channel: ResponseChannel<Response>,
        response: Response,
        carried: Carried,
        /// The session's state to keep, when the step succeeded.
        state: Option<(DocumentId, Box<State>)>,
    },
    ReconcileStep {
        peer: PeerId,
        run: Box<Reconciliation>,
        round_trips: u64,
        bytes: u64,
        result: Result<bool, crate::reconcile::ReconcileError>,
    },
    SyncStep {
        peer: PeerId,
        document: DocumentId,
        state: Box<State>,
        rounds: usize,
        result: Result<(Carried, Option<SyncMessage>), DocumentSyncError>,
    },
    Fetched {
        peer: PeerId,
        documents: Vec<ByteArray<16>>,
        bytes: u64,
        carried: Result<Carried, DocumentSyncError>,
        deferred: Vec<ByteArray<16>>,
    },
    /// An announced change this node lacks: sync the document with the announcer.
    Announced {
        peer: PeerId,
        document: Option<DocumentId>,
    },
    /// A job failed (panicked); what it held is released.
    Released { peer: PeerId, release: Release },
}

/// A token bucket refilled once a second.
#[derive(Default)]
struct Bucket {
    tokens: u32,
    refilled: Option<Instant>,
}

impl Bucket {
    fn take(&mut self, per_second: u32) -> bool {
        let now = Instant::now();
        if self
            .refilled
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.tokens = per_second;
            self.refilled = Some(now);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// What the driver keeps per connected peer.
#[derive(Default)]
struct PeerState {
    reconciling: bool,
    to_sync: VecDeque<DocumentId>,
    to_fetch: VecDeque<ByteArray<16>>,
    sessions: usize,
    fetches: usize,
    inbound: usize,
    requests: Bucket,
    reconcile_queries: Bucket,
    /// Faulty answers so far.
    strikes: u32,
    /// Not asked to reconcile before then (it let a request time out).
    quiet_until: Option<Instant>,
}

/// Sync states of sessions peers run with this node, bounded in total and per peer; the
/// least recently used goes first.
#[derive(Default)]
struct ResponderStates {
    states: HashMap<(PeerId, DocumentId), (Box<State>, u64)>,
    clock: u64,
}

impl ResponderStates {
    fn take(&mut self, key: &(PeerId, DocumentId)) -> Option<Box<State>> {
        self.states.remove(key).map(|(state, _)| state)
    }

    fn put(&mut self, key: (PeerId, DocumentId), state: Box<State>) {
        let of_peer = self.states.keys().filter(|(p, _)| *p == key.0).count();
        let evict = if of_peer >= RESPONDER_SYNC_STATES_PER_PEER_MAX {
            self.oldest(|(p, _)| *p == key.0)
        } else if self.states.len() >= RESPONDER_SYNC_STATES_MAX {
            self.oldest(|_| true)
        } else {
            None
        };
        if let Some(old) = evict {
            self.states.remove(&old);
        }
        self.clock += 1;
        self.states.insert(key, (state, self.clock));
    }

    fn oldest(
        &self,
        which: impl Fn(&(PeerId, DocumentId)) -> bool,
    ) -> Option<(PeerId, DocumentId)> {
        self.states
            .iter()
            .filter(|(key, _)| which(key))
            .min_by_key(|(_, (_, used))| *used)
            .map(|(key, _)| *key)
    }

    fn forget(&mut self, peer: &PeerId) {
        self.states.retain(|(p, _), _| p != peer);
    }
}

struct Driver {
    node: Arc<Node>,
    swarm: Swarm<Behaviour>,
    config: SyncConfig,
    topics: Topics,
    bans: gate::Bans,
    stats: Arc<Mutex<SyncStats>>,
    jobs: mpsc::UnboundedSender<Job>,
    /// Where fetched documents are ingested, below the priority of the node's other work.
    background: background::Background,
    outbound: HashMap<OutboundRequestId, (PeerId, Outbound)>,
    peers: HashMap<PeerId, PeerState>,
    responder: ResponderStates,
    validations: usize,
    /// Gossip changes in validation and waiting, by publisher (only publishers with work).
    publishers: HashMap<PeerId, PublisherQueue>,
    /// Gossip changes waiting, over all publishers, and their bytes.
    queued: usize,
    queued_bytes: usize,
    catch_up_started: Option<Instant>,
    /// The peer each bootstrap address led to, once dialled.
    bootstrap_peers: HashMap<Multiaddr, PeerId>,
    /// Documents queued or in flight for sync or fetch with some peer: a document is worked
    /// on with one peer at a time, until its changes are ingested.
    in_progress: InProgress,
}

/// The size of a value as CBOR, for the byte counters.
fn cbor_len(value: &impl Serialize) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = ciborium::into_writer(value, &mut count);
    count.0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a roster offered by a peer (gossip) is judged.
fn roster_acceptance(result: &Result<RosterUpdate, NodeError>) -> MessageAcceptance {
    match result {
        Ok(RosterUpdate::Adopted { .. }) => MessageAcceptance::Accept,
        // The roster held: a duplicate, not passed on as new, its sender not penalised.
        Ok(RosterUpdate::AlreadyHeld { .. }) => MessageAcceptance::Ignore,
        // Older or the same: nothing new, nobody's fault; a newer format is a newer
        // release's, during a rolling upgrade. A roster that changes or drops a revocation is
        // signed by the authority, and a peer may hold it honestly (it never held the
        // revocation, or runs an older release).
        Err(NodeError::Roster(
            crate::membership::RosterError::Stale { .. }
            | crate::membership::RosterError::Diverged { .. }
            | crate::membership::RosterError::UnsupportedVersion { .. }
            | crate::membership::RosterError::RevocationChanged { .. }
            | crate::membership::RosterError::History(_),
        )) => MessageAcceptance::Ignore,
        Err(NodeError::Roster(_)) => MessageAcceptance::Reject,
        Err(_) => MessageAcceptance::Ignore,
    }
}

/// A gossiped change waiting for validation.
struct QueuedChange {
    message_id: MessageId,
    source: PeerId,
    envelope: serde_bytes::ByteBuf,
    queued_at: Instant,
}

/// One publisher's gossip changes in validation and waiting.
#[derive(Default)]
struct PublisherQueue {
    in_flight: usize,
    waiting: VecDeque<QueuedChange>,
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut jobs: mpsc::UnboundedReceiver<Job>,
        mut local: tokio::sync::broadcast::Receiver<crate::replica::LocalChange>,
    ) {
        let mut tick = tokio::time::interval(self.config.reconcile_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(job) = jobs.recv() => self.on_job(job),
                change = local.recv() => match change {
                    Ok(change) => self.publish(change),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "local changes not gossiped; anti-entropy will carry them");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
                _ = tick.tick() => self.on_tick(),
                command = commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        self.close();
                        let _ = done.send(());
                        return;
                    }
                    None => return self.close(),
                    Some(command) => self.on_command(command),
                },
            }
        }
    }

    /// Runs `work` on the blocking pool; the job it returns goes back to the driver. If it
    /// panics, what it held is released instead, so no slot or document stays taken.
    fn spawn_job(
        &self,
        peer: PeerId,
        release: Release,
        work: impl FnOnce() -> Job + Send + 'static,
    ) {
        tokio::task::spawn_blocking(self.job(peer, release, work));
    }

    /// `spawn_job` for catch-up work, on the threads of lower priority (`background`).
    fn spawn_catch_up_job(
        &self,
        peer: PeerId,
        release: Release,
        work: impl FnOnce() -> Job + Send + 'static,
    ) {
        if !self.background.run(self.job(peer, release.clone(), work)) {
            tracing::error!(%peer, "the catch-up threads are gone; the work is released");
            let _ = self.jobs.send(Job::Released { peer, release });
        }
    }

    /// `work`, reporting its job to the driver; a panic releases what it held.
    fn job(
        &self,
        peer: PeerId,
        release: Release,
        work: impl FnOnce() -> Job + Send + 'static,
    ) -> impl FnOnce() + Send + 'static {
        let jobs = self.jobs.clone();
        move || {
            let job =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
                    tracing::error!(%peer, "a sync job failed unexpectedly; its work is released");
                    Job::Released { peer, release }
                });
            let _ = jobs.send(job);
        }
    }

    fn close(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Connected(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Dial(address) => {
                if let Err(error) = self.swarm.dial(address.clone()) {
                    tracing::warn!(%address, %error, "dial failed");
                }
            }
            Command::ReconcileNow => self.reconcile_with_someone(),
            Command::UpdateRoster(signed, reply) => {
                self.adopt_roster(signed, None, None, Some(reply))
            }
            Command::Shutdown(_) => {}
        }
    }

    /// Adopts a signed roster on the blocking pool (it may withdraw a revoked key's changes).
    fn adopt_roster(
        &self,
        signed: Vec<u8>,
        gossip: Option<(MessageId, PeerId)>,
        answered_by: Option<PeerId>,
        reply: Option<oneshot::Sender<Result<RosterUpdate, NodeError>>>,
    ) {
        let node = self.node.clone();
        let peer = gossip
            .as_ref()
            .map(|(_, p)| *p)
            .or(answered_by)
            .unwrap_or(*self.swarm.local_peer_id());
        self.spawn_job(peer, Release::Nothing, move || Job::RosterAdopted {
            result: node.update_roster(&signed),
            gossip,
            answered_by,
            reply,
        });
    }

    fn stats_mut(&self) -> std::sync::MutexGuard<'_, SyncStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_peer_stats(&self, peer: &PeerId, f: impl FnOnce(&mut PeerStats)) {
        let mut stats = self.stats_mut();
        f(stats.peers.entry(peer.to_string()).or_default());
    }

    fn on_tick(&mut self) {
        // Redial bootstrap peers that are not connected.
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for address in self.config.bootstrap.clone() {
            let reached = self
                .bootstrap_peers
                .get(&address)
                .is_some_and(|peer| self.swarm.is_connected(peer));
            if !reached {
                let _ = self.swarm.dial(address);
            }
        }
        // Disconnect and ban peers whose gossip score says they misbehave.
        for peer in &connected {
            let score = self.swarm.behaviour().gossipsub.peer_score(peer);
            self.with_peer_stats(peer, |s| s.score = score);
            if score.is_some_and(|s| s < DISCONNECT_SCORE) {
                tracing::warn!(%peer, ?score, "disconnecting a peer for its gossip score");
                self.ban(*peer);
            }
        }
        self.reconcile_with_someone();
    }

    /// Disconnects a misbehaving peer and refuses it for `BAN`.
    fn ban(&mut self, peer: PeerId) {
        self.bans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, Instant::now() + BAN);
        let _ = self.swarm.disconnect_peer_id(peer);
        self.stats_mut().disconnected += 1;
    }

    /// Counts a faulty answer from `peer`; at `SYNC_STRIKES_MAX` it is banned.
    fn strike(&mut self, peer: PeerId, what: &'static str) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.strikes += 1;
        let strikes = state.strikes;
        tracing::info!(%peer, strikes, what, "a faulty answer to a sync request");
        self.with_peer_stats(&peer, |s| s.strikes = strikes);
        if strikes == SYNC_STRIKES_MAX {
            tracing::warn!(%peer, strikes, "disconnecting a peer for its faulty answers");
            self.ban(peer);
        }
    }

    fn publish(&mut self, change: crate::replica::LocalChange) {
        let gossip = if change.envelope.len() <= self.config.gossip_envelope_bytes_max {
            Gossip::Change(change.envelope.into())
        } else {
            Gossip::Announce {
                document: ByteArray::new(*change.document.as_bytes()),
                heads: vec![ByteArray::new(change.hash.0)],
            }
        };
        let data = gossip.encode();
        let bytes = data.len() as u64;
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topics.changes.clone(), data)
        {
            Ok(_) => {
                let mesh: Vec<PeerId> = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .mesh_peers(&self.topics.changes.hash())
                    .copied()
                    .collect();
                for peer in mesh {
                    self.with_peer_stats(&peer, |s| {
                        s.bytes_out += bytes;
                        s.messages_out += 1;
                    });
                }
            }
            // No peer to send to (alone, or still connecting): anti-entropy carries it.
            Err(error) => tracing::debug!(%error, "change not gossiped"),
        }
    }

    fn publish_roster(&mut self) {
        let data = Gossip::Roster(self.node.signed_roster().into()).encode();
        if let Err(error) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topics.roster.clone(), data)
        {
            tracing::debug!(%error, "roster not gossiped; peers will ask for it");
        }
    }

    /// Disconnects peers the current roster no longer admits.
    fn enforce_roster(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            if self.node.peer_institution(&peer).is_none() {
                tracing::warn!(%peer, "disconnecting a peer the roster no longer admits");
                let _ = self.swarm.disconnect_peer_id(peer);
                self.stats_mut().disconnected += 1;
            }
        }
    }

    /// Asks a peer for its roster if newer than ours.
    fn ask_roster(&mut self, peer: PeerId) {
        let have = self.node.roster_version();
        self.send(peer, Request::Roster { have }, Outbound::Roster);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = &endpoint
                    && self.config.bootstrap.contains(address)
                {
                    self.bootstrap_peers.insert(address.clone(), peer_id);
                }
                if num_established.get() > 1 {
                    return;
                }
                let institution = self.node.peer_institution(&peer_id);
                tracing::info!(peer = %peer_id, ?institution, "connected");
                self.peers.entry(peer_id).or_default();
                let address = endpoint.get_remote_address().to_string();
                self.with_peer_stats(&peer_id, |s| {
                    s.connected = true;
                    s.institution = institution.map(|i| i.to_string());
                    s.address = Some(address);
                });
                self.ask_roster(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "disconnected");
                // Its documents are released, queued or in flight: requests in flight fail, and
                // their release (or a late answer's) then finds nothing of it.
                self.peers.remove(&peer_id);
                self.in_progress.release_peer(&peer_id);
                self.responder.forget(&peer_id);
                self.with_peer_stats(&peer_id, |s| s.connected = false);
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.stats_mut().denied += 1;
                }
                tracing::debug!(%error, "incoming connection failed or denied");
            }
            SwarmEvent::OutgoingConnectionError {
                error: libp2p::swarm::DialError::Denied { .. },
                ..
            } => {
                self.stats_mut().denied += 1;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.with_peer_stats(&peer, |s| s.rtt_ms = Some(rtt.as_secs_f64() * 1e3));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, address) in found {
                    if self.node.peer_institution(&peer).is_some()
                        && !self.swarm.is_connected(&peer)
                    {
                        let _ = self.swarm.dial(address);
                    }
                }
            }
            _ => {}
        }
    }

    fn report(&mut self, message_id: &MessageId, source: &PeerId, acceptance: MessageAcceptance) {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(message_id, source, acceptance);
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source: source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let bytes = message.data.len() as u64;
        self.with_peer_stats(&source, |s| {
            s.bytes_in += bytes;
            s.messages_in += 1;
        });
        let gossip = match Gossip::decode(&message.data) {
            Ok(gossip) => gossip,
            Err(error) => {
                tracing::info!(peer = %source, %error, "gossip refused");
                self.with_peer_stats(&source, |s| s.changes_rejected += 1);
                return self.report(&message_id, &source, MessageAcceptance::Reject);
            }
        };
        let roster_topic = message.topic == self.topics.roster.hash();
        match gossip {
            Gossip::Roster(signed) if roster_topic => {
                self.adopt_roster(signed.into_vec(), Some((message_id, source)), None, None);
            }
            Gossip::Change(envelope) if !roster_topic => {
                // Members carry larger changes as announcements.
                if envelope.len() > GOSSIP_ENVELOPE_BYTES_MAX {
                    self.with_peer_stats(&source, |s| s.changes_rejected += 1);
                    return self.report(&message_id, &source, MessageAcceptance::Reject);
                }
                if self.validations >= GOSSIP_VALIDATIONS_MAX {
                    return self.report(&message_id, &source, MessageAcceptance::Ignore);
                }
                // Each publisher's changes take turns: a few at once, the rest in its queue.
                // A publisher that is not a member (anyone can sign a gossip message) is
                // queued under the peer that passed it on, so invented publishers share one
                // queue.
                let publisher = message
                    .source
                    .filter(|p| self.node.peer_institution(p).is_some())
                    .unwrap_or(source);
                let queue = self.publishers.entry(publisher).or_default();
                let change = QueuedChange {
                    message_id,
                    source,
                    envelope,
                    queued_at: Instant::now(),
                };
                if queue.in_flight < GOSSIP_VALIDATIONS_PER_PUBLISHER_MAX {
                    queue.in_flight += 1;
                    return self.validate(publisher, change);
                }
                let bytes = change.envelope.len();
                if queue.waiting.len() >= GOSSIP_QUEUED_PER_PUBLISHER_MAX
                    || self.queued >= GOSSIP_QUEUED_MAX
                    || self.queued_bytes + bytes > GOSSIP_QUEUED_BYTES_MAX
                {
                    return self.report(&change.message_id, &source, MessageAcceptance::Ignore);
                }
                queue.waiting.push_back(change);
                self.queued += 1;
                self.queued_bytes += bytes;
            }
            Gossip::Announce { document, heads } if !roster_topic => {
                // Not passed on: the announcer's neighbours pull from it, others reconcile.
                self.report(&message_id, &source, MessageAcceptance::Ignore);
                if self.validations >= GOSSIP_VALIDATIONS_MAX {
                    return;
                }
                self.validations += 1;
                let document = DocumentId::from_bytes(*document);
                let node = self.node.clone();
                self.spawn_job(source, Release::Lookup, move || {
                    let missing = heads.iter().take(ANNOUNCED_HEADS_MAX).any(|head| {
                        !node
                            .has_change(document, &crate::model::automerge::ChangeHash(**head))
                            .unwrap_or(false)
                    });
                    Job::Announced {
                        peer: source,
                        document: missing.then_some(document),
                    }
                });
            }
            // A message on the wrong topic.
            _ => self.report(&message_id, &source, MessageAcceptance::Reject),
        }
    }

    /// Validates a gossiped change on the blocking pool: the pipeline's decision is the
    /// gossip verdict.
    fn validate(&mut self, publisher: PeerId, change: QueuedChange) {
        self.validations += 1;
        let QueuedChange {
            message_id,
            source,
            envelope,
            ..
        } = change;
        let node = self.node.clone();
        self.spawn_job(source, Release::Validation(publisher), move || {
            let _span = tracing::debug_span!("gossip_validation", peer = %source).entered();
            let (acceptance, accepted) = match node.ingest(&envelope) {
                Ok(Ingested::Accepted(_)) => (MessageAcceptance::Accept, true),
                // Known already, or not decidable yet: not passed on, not punished.
                Ok(Ingested::Duplicate(_) | Ingested::Pending(_)) => {
                    (MessageAcceptance::Ignore, false)
                }
                // Refused, and the sender is at fault: an honest member never sends it.
                Ok(decision @ Ingested::Quarantined(..)) if decision.blames_sender() => {
                    (MessageAcceptance::Reject, false)
                }
                // Refused here because of a revocation the relay may not have adopted yet:
                // not passed on, not punished.
                Ok(Ingested::Quarantined(..)) => (MessageAcceptance::Ignore, false),
                // This node's own trouble (its store, a full quarantine).
                Err(
                    crate::replica::IngestError::Store(_)
                    | crate::replica::IngestError::QuarantineFull
                    | crate::replica::IngestError::RevokedBacklogFull,
                ) => (MessageAcceptance::Ignore, false),
                Err(_) => (MessageAcceptance::Reject, false),
            };
            Job::Validated {
                message_id,
                source,
                publisher,
                acceptance,
                accepted,
            }
        });
    }

    /// A validation of `publisher`'s ended: the next of its queue takes the slot (changes
    /// queued too long are ignored on the way).
    fn validated(&mut self, publisher: PeerId) {
        self.validations = self.validations.saturating_sub(1);
        loop {
            let Some(queue) = self.publishers.get_mut(&publisher) else {
                return;
            };
            let Some(next) = queue.waiting.pop_front() else {
                queue.in_flight = queue.in_flight.saturating_sub(1);
                if queue.in_flight == 0 {
                    self.publishers.remove(&publisher);
                }
                return;
            };
            self.queued = self.queued.saturating_sub(1);
            self.queued_bytes = self.queued_bytes.saturating_sub(next.envelope.len());
            if next.queued_at.elapsed() > GOSSIP_QUEUED_AGE_MAX {
                self.report(&next.message_id, &next.source, MessageAcceptance::Ignore);
                continue;
            }
            return self.validate(publisher, next);
        }
    }

    fn on_sync_event(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let bytes = cbor_len(&response);
                    self.with_peer_stats(&peer, |s| {
                        s.bytes_in += bytes;
                        s.messages_in += 1;
                    });
                    if let Some((peer, outbound)) = self.outbound.remove(&request_id) {
                        self.on_response(peer, outbound, response, bytes);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "sync request failed");
                // Only a timeout says something of the peer; an I/O failure may be a cut link,
                // a full stream budget here, or an honest responder whose work failed.
                if let request_response::OutboundFailure::Timeout = error {
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.quiet_until = Some(Instant::now() + UNANSWERED_BACKOFF);
                        // Its queue would take one timeout per batch to drain: released now,
                        // those documents are found again with a peer that answers.
                        for document in state.to_sync.drain(..) {
                            self.in_progress.release(&peer, &document);
                        }
                        for id in state.to_fetch.drain(..) {
                            self.in_progress
                                .release(&peer, &DocumentId::from_bytes(*id));
                        }
                    }
                    self.with_peer_stats(&peer, |s| s.unanswered += 1);
                }
                if let Some((peer, outbound)) = self.outbound.remove(&request_id) {
                    self.finished(peer, &outbound);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "serving a sync request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Frees what an outbound exchange held.
    fn finished(&mut self, peer: PeerId, outbound: &Outbound) {
        match outbound {
            Outbound::Sync { document, .. } => self.release(peer, Release::Session(*document)),
            Outbound::Fetch(documents) => {
                for document in documents {
                    self.in_progress
                        .release(&peer, &DocumentId::from_bytes(**document));
                }
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.fetches = state.fetches.saturating_sub(1);
                }
                self.pump(peer);
            }
            Outbound::Reconcile { .. } => self.release(peer, Release::Reconciliation),
            Outbound::Roster => {}
        }
    }

    /// Releases what a job or an exchange held.
    fn release(&mut self, peer: PeerId, release: Release) {
        let state = self.peers.get_mut(&peer);
        match release {
            Release::Inbound => {
                if let Some(state) = state {
                    state.inbound = state.inbound.saturating_sub(1);
                }
            }
            Release::Session(document) => {
                self.in_progress.release(&peer, &document);
                if let Some(state) = state {
                    state.sessions = state.sessions.saturating_sub(1);
                }
            }
            Release::Reconciliation => {
                if let Some(state) = state {
                    state.reconciling = false;
                }
            }
            Release::Fetched(documents) => {
                for document in documents {
                    self.in_progress
                        .release(&peer, &DocumentId::from_bytes(*document));
                }
            }
            Release::Validation(publisher) => self.validated(publisher),
            Release::Lookup => self.validations = self.validations.saturating_sub(1),
            Release::Nothing => {}
        }
        self.pump(peer);
    }

    fn send(&mut self, peer: PeerId, request: Request, outbound: Outbound) -> u64 {
        let bytes = cbor_len(&request);
        self.with_peer_stats(&peer, |s| {
            s.bytes_out += bytes;
            s.messages_out += 1;
        });
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.outbound.insert(id, (peer, outbound));
        bytes
    }

    fn respond(&mut self, peer: PeerId, channel: ResponseChannel<Response>, response: Response) {
        let bytes = cbor_len(&response);
        self.with_peer_stats(&peer, |s| {
            s.bytes_out += bytes;
            s.messages_out += 1;
        });
        if let Some(state) = self.peers.get_mut(&peer) {
            state.inbound = state.inbound.saturating_sub(1);
        }
        let _ = self
            .swarm
            .behaviour_mut()
            .sync
            .send_response(channel, response);
    }

    fn reconcile_with_someone(&mut self) {
        let now = Instant::now();
        let candidates: Vec<PeerId> = self
            .peers
            .iter()
            // A peer still working through the last differences is left alone until done.
            .filter(|(_, s)| {
                !s.reconciling
                    && s.quiet_until.is_none_or(|until| until <= now)
                    && s.sessions == 0
                    && s.fetches == 0
                    && s.to_sync.is_empty()
                    && s.to_fetch.is_empty()
            })
            .map(|(p, _)| *p)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let mut pick = [0u8; 8];
        let _ = getrandom::fill(&mut pick);
        let peer = candidates[(u64::from_le_bytes(pick) as usize) % candidates.len()];
        self.reconcile_with(peer);
    }

    fn reconcile_with(&mut self, peer: PeerId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.reconciling {
            return;
        }
        state.reconciling = true;
        self.ask_roster(peer);
        let node = self.node.clone();
        self.spawn_job(peer, Release::Reconciliation, move || {
            let run = Box::new(Reconciliation::new(&node.catalogue()));
            Job::ReconcileStep {
                peer,
                run,
                round_trips: 0,
                bytes: 0,
                result: Ok(true),
            }
        });
    }

    fn on_request(&mut self, peer: PeerId, request: Request, channel: ResponseChannel<Response>) {
        let bytes = cbor_len(&request);
        self.with_peer_stats(&peer, |s| {
            s.bytes_in += bytes;
            s.messages_in += 1;
        });
        let state = self.peers.entry(peer).or_default();
        state.inbound += 1;
        let allowed = state.inbound <= INBOUND_REQUESTS_PER_PEER_MAX
            && state.requests.take(INBOUND_REQUESTS_PER_PEER_PER_S)
            && (!matches!(request, Request::Reconcile(_))
                || state
                    .reconcile_queries
                    .take(RECONCILE_QUERIES_PER_PEER_PER_S));
        if !allowed {
            return self.respond(peer, channel, Response::Refused(Refusal::Busy));
        }
        let node = self.node.clone();
        match request {
            Request::Roster { have } => {
                let newer = (node.roster_version() > have).then(|| node.signed_roster().into());
                self.respond(peer, channel, Response::Roster(newer));
            }
            Request::Reconcile(query) => {
                self.spawn_job(peer, Release::Inbound, move || {
                    let response = match node.catalogue().answer(&query) {
                        Ok(reply) => Response::Reconcile(reply),
                        Err(error) => Response::Refused(Refusal::Malformed(error.to_string())),
                    };
                    Job::Respond {
                        peer,
                        channel,
                        response,
                        carried: Carried::default(),
                        state: None,
                    }
                });
            }
            Request::Sync(message) => {
                let document = DocumentId::from_bytes(*message.document);
                let kept = self.responder.take(&(peer, document));
                let state = if message.first {
                    Box::default()
                } else {
                    kept.unwrap_or_default()
                };
                self.spawn_job(peer, Release::Inbound, move || {
                    let _span =
                        tracing::debug_span!("serve_document_sync", %peer, %document).entered();
                    let mut state = state;
                    let mut carried = Carried::default();
                    let step = document::incoming(&node, &message, &mut state).and_then(|c| {
                        carried = c;
                        document::outgoing(&node, document, &mut state)
                    });
                    let (response, keep) = match step {
                        Ok(reply) => (
                            Response::Sync(reply),
                            message.message.len() <= RESPONDER_STATE_MESSAGE_BYTES_MAX,
                        ),
                        Err(error) if error.is_peers_fault() => (
                            Response::Refused(Refusal::Malformed(error.to_string())),
                            false,
                        ),
                        Err(error) => {
                            tracing::warn!(%error, "serving a sync request failed");
                            (Response::Refused(Refusal::Failed), false)
                        }
                    };
                    Job::Respond {
                        peer,
                        channel,
                        response,
                        carried,
                        state: keep.then_some((document, state)),
                    }
                });
            }
            Request::Fetch { documents } => {
                self.spawn_job(peer, Release::Inbound, move || {
                    let response = match document::fetch(&node, &documents) {
                        Ok((documents, deferred)) => Response::Fetch {
                            documents,
                            deferred,
                        },
                        Err(error) if error.is_peers_fault() => {
                            Response::Refused(Refusal::Malformed(error.to_string()))
                        }
                        Err(_) => Response::Refused(Refusal::Failed),
                    };
                    Job::Respond {
                        peer,
                        channel,
                        response,
                        carried: Carried::default(),
                        state: None,
                    }
                });
            }
        }
    }

    fn on_response(&mut self, peer: PeerId, outbound: Outbound, response: Response, bytes: u64) {
        match (outbound, response) {
            (
                Outbound::Reconcile {
                    run,
                    round_trips,
                    bytes: so_far,
                },
                Response::Reconcile(reply),
            ) => {
                let node = self.node.clone();
                self.spawn_job(peer, Release::Reconciliation, move || {
                    let mut run = run;
                    let result = run.receive(&node.catalogue(), &reply);
                    Job::ReconcileStep {
                        peer,
                        run,
                        round_trips: round_trips + 1,
                        bytes: so_far + bytes,
                        result,
                    }
                });
            }
            (
                Outbound::Sync {
                    document,
                    state,
                    rounds,
                },
                Response::Sync(reply),
            ) => {
                let node = self.node.clone();
                self.spawn_job(peer, Release::Session(document), move || {
                    let _span =
                        tracing::debug_span!("document_sync", %peer, %document, rounds).entered();
                    let mut state = state;
                    let mut carried = Carried::default();
                    let result = reply
                        .as_ref()
                        .map(|m| document::incoming(&node, m, &mut state))
                        .transpose()
                        .and_then(|c| {
                            carried = c.unwrap_or_default();
                            document::outgoing(&node, document, &mut state)
                        })
                        .map(|next| (carried, next));
                    Job::SyncStep {
                        peer,
                        document,
                        state,
                        rounds: rounds + 1,
                        result,
                    }
                });
            }
            (
                Outbound::Fetch(documents),
                Response::Fetch {
                    documents: fetched,
                    deferred,
                },
            ) => {
                // A responder defers only documents it was asked for, and only once it has
                // sent one of them (for lack of room): any other id would be work this node
                // never chose, and deferring everything would keep the documents from every
                // other peer for as long as it liked.
                let asked: HashSet<[u8; 16]> = documents.iter().map(|id| **id).collect();
                let (deferred, unasked): (Vec<ByteArray<16>>, Vec<ByteArray<16>>) =
                    deferred.into_iter().partition(|id| asked.contains(&**id));
                let served = fetched.iter().any(|d| asked.contains(&*d.document));
                if !unasked.is_empty() {
                    self.strike(peer, "a fetch answer deferring documents not asked for");
                } else if !deferred.is_empty() && !served {
                    self.strike(
                        peer,
                        "a fetch answer deferring documents without sending one",
                    );
                }
                let node = self.node.clone();
                // The exchange is over; ingesting is the blocking pool's work, and the
                // documents stay in progress until it is done.
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.fetches = state.fetches.saturating_sub(1);
                }
                self.pump(peer);
                self.spawn_catch_up_job(peer, Release::Fetched(documents.clone()), move || {
                    let _span =
                        tracing::debug_span!("fetch", %peer, documents = fetched.len()).entered();
                    let carried = document::ingest_fetched(&node, &fetched);
                    Job::Fetched {
                        peer,
                        documents,
                        bytes,
                        carried,
                        deferred,
                    }
                });
            }
            (Outbound::Roster, Response::Roster(Some(signed))) => {
                self.adopt_roster(signed.into_vec(), None, Some(peer), None);
            }
            (Outbound::Roster, Response::Roster(None)) => {}
            (outbound, Response::Refused(refusal)) => {
                tracing::debug!(%peer, %refusal, "sync request refused");
                self.finished(peer, &outbound);
            }
            (outbound, _) => {
                self.strike(peer, "an answer of the wrong kind");
                self.finished(peer, &outbound);
            }
        }
    }

    /// A reconciliation finished: queue what differs.
    fn reconciled(&mut self, peer: PeerId, run: &Reconciliation, round_trips: u64, bytes: u64) {
        let differing = run.differing();
        let lag = differing.len() as u64;
        let _span = tracing::debug_span!("reconciled", %peer, round_trips, bytes, lag).entered();
        tracing::debug!("catalogues reconciled");
        self.with_peer_stats(&peer, |s| {
            s.last_reconciled_ms = Some(now_ms());
            s.lag = Some(lag);
            s.last_round_trips = Some(round_trips);
            s.last_reconciliation_bytes = Some(bytes);
        });
        let mut new_missing = 0;
        if let Some(state) = self.peers.get_mut(&peer) {
            state.reconciling = false;
            for (id, difference) in differing {
                let document = DocumentId::from_bytes(*id);
                // Only this node holds it: the peer fetches it when it reconciles. Past the
                // peer's share (or the budget), documents wait for a later reconciliation.
                if *difference == Difference::OnlyOurs || !self.in_progress.take(peer, document) {
                    continue;
                }
                match difference {
                    Difference::OnlyOurs => {}
                    Difference::OnlyTheirs => {
                        state.to_fetch.push_back(ByteArray::new(*id));
                        new_missing += 1;
                    }
                    Difference::Both => state.to_sync.push_back(document),
                }
            }
        }
        if new_missing > 0 {
            let mut stats = self.stats_mut();
            // A new catch-up starts when the last one is done.
            if stats.catch_up.documents_done >= stats.catch_up.documents_total {
                stats.catch_up = CatchUp::default();
                drop(stats);
                self.catch_up_started = Some(Instant::now());
                stats = self.stats_mut();
            }
            stats.catch_up.documents_total += new_missing;
        }
        self.pump(peer);
    }

    /// Starts as many queued syncs and fetches with `peer` as its bounds allow.
    fn pump(&mut self, peer: PeerId) {
        loop {
            let Some(state) = self.peers.get_mut(&peer) else {
                return;
            };
            if state.fetches < FETCHES_PER_PEER_MAX && !state.to_fetch.is_empty() {
                let take = state.to_fetch.len().min(FETCH_DOCUMENTS_MAX);
                let documents: Vec<ByteArray<16>> = state.to_fetch.drain(..take).collect();
                state.fetches += 1;
                self.send(
                    peer,
                    Request::Fetch {
                        documents: documents.clone(),
                    },
                    Outbound::Fetch(documents),
                );
                continue;
            }
            if state.sessions < SYNC_SESSIONS_PER_PEER_MAX
                && let Some(document) = state.to_sync.pop_front()
            {
                state.sessions += 1;
                self.start_session(peer, document);
                continue;
            }
            return;
        }
    }

    fn start_session(&mut self, peer: PeerId, document: DocumentId) {
        let node = self.node.clone();
        self.spawn_job(peer, Release::Session(document), move || {
            let mut state = Box::<State>::default();
            let result = document::outgoing(&node, document, &mut state).map(|next| {
                let next = next.map(|message| SyncMessage {
                    first: true,
                    ..message
                });
                (Carried::default(), next)
            });
            Job::SyncStep {
                peer,
                document,
                state,
                rounds: 0,
                result,
            }
        });
    }

    fn on_job(&mut self, job: Job) {
        match job {
            Job::Validated {
                message_id,
                source,
                publisher,
                acceptance,
                accepted,
            } => {
                self.validated(publisher);
                let rejected = matches!(acceptance, MessageAcceptance::Reject);
                self.with_peer_stats(&source, |s| {
                    s.changes_received += u64::from(accepted);
                    s.changes_rejected += u64::from(rejected);
                });
                self.report(&message_id, &source, acceptance);
            }
            Job::RosterAdopted {
                result,
                gossip,
                answered_by,
                reply,
            } => {
                let acceptance = roster_acceptance(&result);
                if let Some(peer) = answered_by
                    && matches!(acceptance, MessageAcceptance::Reject)
                {
                    self.strike(peer, "a roster that does not verify");
                }
                if let Some((message_id, source)) = gossip {
                    self.report(&message_id, &source, acceptance);
                }
                if let Ok(RosterUpdate::Adopted { .. }) = result {
                    if reply.is_some() {
                        self.publish_roster();
                    }
                    self.enforce_roster();
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Job::Respond {
                peer,
                channel,
                response,
                carried,
                state,
            } => {
                self.count_carried(&peer, &carried);
                if let Some((document, state)) = state
                    && self.swarm.is_connected(&peer)
                {
                    self.responder.put((peer, document), state);
                }
                self.respond(peer, channel, response);
            }
            Job::ReconcileStep {
                peer,
                run,
                round_trips,
                bytes,
                result,
            } => match result {
                Ok(true) => {
                    let query = run.query().clone();
                    let sent = cbor_len(&query);
                    self.send(
                        peer,
                        Request::Reconcile(query),
                        Outbound::Reconcile {
                            run,
                            round_trips,
                            bytes: bytes + sent,
                        },
                    );
                }
                Ok(false) => self.reconciled(peer, &run, round_trips, bytes),
                Err(error) => {
                    tracing::info!(%peer, %error, "reconciliation abandoned");
                    self.strike(peer, "a reconciliation reply that breaks the protocol");
                    self.release(peer, Release::Reconciliation);
                }
            },
            Job::SyncStep {
                peer,
                document,
                state,
                rounds,
                result,
            } => match result {
                Ok((carried, Some(message))) if rounds < SYNC_ROUNDS_MAX => {
                    self.count_carried(&peer, &carried);
                    self.send(
                        peer,
                        Request::Sync(message),
                        Outbound::Sync {
                            document,
                            state,
                            rounds,
                        },
                    );
                }
                Ok((carried, _)) => {
                    self.count_carried(&peer, &carried);
                    self.with_peer_stats(&peer, |s| s.documents_reconciled += 1);
                    self.release(peer, Release::Session(document));
                }
                Err(error) => {
                    tracing::info!(%peer, %document, %error, "document sync abandoned");
                    if error.is_peers_fault() && !matches!(error, DocumentSyncError::TooLarge(_)) {
                        self.strike(peer, "a malformed sync message");
                    }
                    self.release(peer, Release::Session(document));
                    // Too large to sync by messages: fetch its envelopes instead.
                    if matches!(error, DocumentSyncError::TooLarge(_))
                        && let Some(s) = self.peers.get_mut(&peer)
                        && self.in_progress.take(peer, document)
                    {
                        s.to_fetch.push_back(ByteArray::new(*document.as_bytes()));
                        self.pump(peer);
                    }
                }
            },
            Job::Fetched {
                peer,
                documents,
                bytes,
                carried,
                deferred,
            } => self.fetched(peer, documents, bytes, carried, deferred),
            Job::Announced { peer, document } => {
                self.validations = self.validations.saturating_sub(1);
                // A peer that let a request time out is given no announced documents while it
                // is left out of reconciliation.
                if let Some(document) = document
                    && let Some(state) = self.peers.get_mut(&peer)
                    && state
                        .quiet_until
                        .is_none_or(|until| until <= Instant::now())
                    && self.in_progress.take(peer, document)
                {
                    state.to_sync.push_back(document);
                }
                self.pump(peer);
            }
            Job::Released { peer, release } => self.release(peer, release),
        }
    }

    fn fetched(
        &mut self,
        peer: PeerId,
        documents: Vec<ByteArray<16>>,
        bytes: u64,
        carried: Result<Carried, DocumentSyncError>,
        deferred: Vec<ByteArray<16>>,
    ) {
        match carried {
            Ok(carried) => self.count_carried(&peer, &carried),
            Err(error) => tracing::warn!(%peer, %error, "fetched envelopes not ingested"),
        }
        // Only documents asked for (checked when the answer came).
        let deferred_ids: HashSet<DocumentId> = deferred
            .iter()
            .map(|id| DocumentId::from_bytes(**id))
            .collect();
        let mut fetched = 0u64;
        for id in &documents {
            let document = DocumentId::from_bytes(**id);
            if !deferred_ids.contains(&document) {
                self.in_progress.release(&peer, &document);
                fetched += 1;
            }
        }
        self.with_peer_stats(&peer, |s| s.documents_reconciled += fetched);
        {
            let started = self.catch_up_started;
            let mut stats = self.stats_mut();
            let catch_up = &mut stats.catch_up;
            catch_up.documents_done += fetched;
            catch_up.bytes += bytes;
            let left = catch_up
                .documents_total
                .saturating_sub(catch_up.documents_done);
            catch_up.eta_s = started.and_then(|at| {
                let rate = catch_up.documents_done as f64 / at.elapsed().as_secs_f64();
                (rate > 0.0).then(|| left as f64 / rate)
            });
        }
        // Deferred documents are asked again, in the order first asked, unless they were
        // released meanwhile (the peer let a request time out, or left).
        for id in documents {
            let document = DocumentId::from_bytes(*id);
            if !deferred_ids.contains(&document) || !self.in_progress.holds(&peer, &document) {
                continue;
            }
            let Some(state) = self.peers.get_mut(&peer) else {
                self.in_progress.release(&peer, &document);
                continue;
            };
            // Partly fetched documents finish by sync; others are asked again.
            if self.node.catalogue().get(&id).is_some() {
                state.to_sync.push_back(document);
            } else {
                state.to_fetch.push_back(id);
            }
        }
        self.pump(peer);
    }

    fn count_carried(&mut self, peer: &PeerId, carried: &Carried) {
        if carried.accepted + carried.rejected > 0 {
            self.with_peer_stats(peer, |s| {
                s.changes_received += carried.accepted as u64;
                s.changes_rejected += carried.rejected as u64;
            });
        }
        // One strike per message, however many bad changes it carried: forged, malformed or
        // invalid changes come only from a faulty or hostile node, and each is a record this
        // node must keep.
        if carried.blamed > 0 {
            self.strike(*peer, "changes an honest member never sends");
        }
    }
}

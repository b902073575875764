//! The bad peer of the Byzantine presets: a member's key (or a stranger's) driven by hostile
//! code. It is not an Estuary node — a bare libp2p swarm with the consortium's gossip topic
//! and the sync protocol, so it can send what no node would: forged signatures, undecodable
//! and oversized frames, changes with invented dependencies, garbage answers. It
//! records what it sent, for the checker to find (or not find) on every honest node.
//!
//! It runs on its own thread and runtime, as another machine would; it reaches the honest
//! nodes over the memory transport without the fault layer.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Context;
use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::model::automerge::{self, Change, ChangeHash, transaction::Transactable};
use estuary_node::model::{
    Actor, Bytes32, DocumentId, Editor, HealthFile, InstitutionId, Timestamp,
};
use estuary_node::sync::protocol::{
    ChangeSignature, FetchedDocument, Gossip, PROTOCOL, Request, Response, SyncMessage,
};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, MessageId};
use libp2p::request_response::{self, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use serde_bytes::{ByteArray, ByteBuf};
use tokio::sync::oneshot;

use super::content;
use super::plan::{Misbehaviour, Rng};

/// How often the rogue acts (publishes, redials).
const TICK: Duration = Duration::from_millis(100);
/// How long it waits to be connected to every target before its first burst.
const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// Its gossip frames may be this large (honest nodes take at most 260 KiB): room for an
/// oversized frame.
const ROGUE_TRANSMIT_BYTES_MAX: usize = 1024 * 1024;
/// An oversized gossip frame: past the honest nodes' limit.
const OVERSIZED_GOSSIP_BYTES: usize = 300 * 1024;
/// An oversized sync request: past `REQUEST_BYTES_MAX` (4 MiB).
const OVERSIZED_REQUEST_BYTES: usize = 5 * 1024 * 1024;
/// Honest envelopes kept for replay.
const REPLAYS_MAX: usize = 16;
/// Requests `mute` holds without answering (dropped oldest first past this).
const WITHHELD_MAX: usize = 1_024;
/// How long `mute` holds a request before dropping it: past the honest nodes' request
/// timeout, so they see a timeout, not a closed stream.
const WITHHELD_FOR: Duration = Duration::from_secs(60);

/// What the rogue is told.
pub struct RogueConfig {
    /// What it does.
    pub misbehaviour: Misbehaviour,
    /// Its node key: a member's, or (for `stranger`) one outside the roster.
    pub secret: [u8; 32],
    /// The institution it writes as (the member whose key it holds).
    pub institution: InstitutionId,
    /// The consortium authority (the gossip topic is named after it).
    pub authority: Bytes32,
    /// The honest nodes' addresses.
    pub targets: Vec<Multiaddr>,
    /// An honest member's key, to impersonate.
    pub impersonated: Bytes32,
    /// For its content.
    pub seed: u64,
}

/// What honest nodes must make of a bad change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expect {
    /// Quarantined with a reason wherever it arrives.
    Quarantined,
    /// Held — waiting for a dependency that does not exist, or for a roster that names its
    /// author: never applied, never passed on.
    Pending,
}

/// A change the rogue sent that no honest node may accept.
#[derive(Clone, Debug, Serialize)]
pub struct BadChange {
    /// The document it claims, hex.
    pub document: String,
    /// The change hash it claims, hex.
    pub change: String,
    /// What is wrong with it.
    pub kind: &'static str,
    /// What honest nodes must make of it.
    pub expect: Expect,
}

/// What the rogue did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RogueLog {
    /// Its PeerId.
    pub peer_id: String,
    /// Bad changes that left it.
    pub bad: Vec<BadChange>,
    /// Valid changes that left it: every honest node must end up holding them.
    pub valid: BTreeSet<(String, String)>,
    /// Gossip messages that left it.
    pub published: u64,
    /// Gossip messages no peer would take (it was disconnected, banned or denied).
    pub publish_failed: u64,
    /// Messages carrying no change: undecodable, oversized, replayed.
    pub garbage_messages: u64,
    /// Hostile sync requests it sent.
    pub requests_sent: u64,
    /// Sync requests it answered with garbage.
    pub answers_garbage: u64,
    /// Sync requests it never answered.
    pub answers_withheld: u64,
    /// Connections established (none for a stranger: the gate denies them).
    pub connections: u64,
    /// Connections that ended.
    pub connections_closed: u64,
}

#[derive(NetworkBehaviour)]
struct RogueBehaviour {
    gossipsub: gossipsub::Behaviour,
    sync: request_response::cbor::Behaviour<Request, Response>,
}

/// A running rogue.
pub struct Rogue {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<RogueLog>>>,
    peer_id: PeerId,
}

impl Rogue {
    /// Starts the rogue on a thread of its own.
    pub fn start(config: RogueConfig) -> anyhow::Result<Self> {
        let identity = Identity::from_secret(config.secret);
        let peer_id = identity.libp2p_keypair().public().to_peer_id();
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("rogue".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(run(config, identity, stopped))
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
            peer_id,
        })
    }

    /// Its PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Stops it; returns what it did.
    pub fn stop(mut self) -> anyhow::Result<RogueLog> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let thread = self.thread.take().context("the rogue was stopped twice")?;
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the rogue's thread panicked"))?
    }
}

fn swarm(identity: &Identity) -> anyhow::Result<libp2p::Swarm<RogueBehaviour>> {
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    use libp2p::{Transport, noise, yamux};
    let key = identity.libp2p_keypair();
    let gossip_config = gossipsub::ConfigBuilder::default()
        .max_transmit_size(ROGUE_TRANSMIT_BYTES_MAX)
        .heartbeat_interval(Duration::from_secs(1))
        // Ids include the sequence number, so the rogue can send the same bytes twice.
        .message_id_fn(|message| {
            use sha2::Digest;
            let mut hasher = sha2::Sha256::new();
            hasher.update(&message.data);
            hasher.update(message.sequence_number.unwrap_or(0).to_be_bytes());
            MessageId::from(hasher.finalize().to_vec())
        })
        .build()
        .map_err(|e| anyhow::anyhow!("gossip config: {e}"))?;
    let gossipsub =
        gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)
            .map_err(|e| anyhow::anyhow!("gossip: {e}"))?;
    let codec = request_response::cbor::codec::Codec::<Request, Response>::default()
        .set_request_size_maximum(2 * OVERSIZED_REQUEST_BYTES as u64)
        .set_response_size_maximum(64 * 1024 * 1024);
    let sync = request_response::Behaviour::with_codec(
        codec,
        [(PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
    );
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()))
            },
        )
        .map_err(|e| anyhow::anyhow!("transport: {e}"))?
        .with_behaviour(|_| RogueBehaviour { gossipsub, sync })
        .map_err(|e| anyhow::anyhow!("behaviour: {e:?}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build())
}

/// The rogue's own documents and signing.
struct Writer {
    identity: Identity,
    actor: Actor,
    editor: Editor,
    seed: u64,
    files: u32,
}

impl Writer {
    fn editor(&self) -> Editor {
        Editor {
            at: Timestamp(estuary_node::audit::now_ms()),
            ..self.editor.clone()
        }
    }

    /// A new health file of its own; its creation change, signed.
    fn new_file(&mut self) -> anyhow::Result<(HealthFile, Vec<u8>, ChangeHash)> {
        // Residents numbered far from the workload's, so names and ids never collide.
        let resident = 900_000 + self.files;
        self.files += 1;
        let mut file = HealthFile::create(
            &self.actor,
            &self.editor(),
            &content::demographics(self.seed ^ 0xBAD, resident),
        )?;
        let mut change = file.changes_since(&[]).remove(0);
        let id = file.id();
        let hash = change.hash();
        Ok((
            file,
            Envelope::sign(&self.identity, id, &mut change).encode(),
            hash,
        ))
    }

    /// A valid follow-up in `file`; the change, unsigned.
    fn follow_up(&self, file: &mut HealthFile) -> anyhow::Result<Change> {
        let heads = file.heads();
        let at = estuary_node::audit::now_ms();
        file.apply(&self.editor(), &content::follow_up(self.seed, 900_000, at))?;
        file.changes_since(&heads)
            .pop()
            .context("an operation makes one change")
    }

    fn sign(&self, document: DocumentId, change: &mut Change) -> Vec<u8> {
        Envelope::sign(&self.identity, document, change).encode()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct State {
    swarm: libp2p::Swarm<RogueBehaviour>,
    topic: IdentTopic,
    log: RogueLog,
    targets: Vec<Multiaddr>,
    /// Peers that are connected and subscribed to the changes topic.
    subscribed: BTreeSet<PeerId>,
    /// Honest envelopes seen on gossip, for replay.
    seen: VecDeque<Vec<u8>>,
    withheld: VecDeque<(Instant, ResponseChannel<Response>)>,
    requests: u64,
    rng: Rng,
}

impl State {
    /// Publishes a gossip message; whether it left.
    fn publish(&mut self, data: Vec<u8>) -> bool {
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), data)
        {
            Ok(_) => {
                self.log.published += 1;
                true
            }
            Err(_) => {
                self.log.publish_failed += 1;
                false
            }
        }
    }

    /// Publishes a change's envelope; records it as bad if it left.
    fn publish_bad(&mut self, envelope: Vec<u8>, kind: &'static str, expect: Expect) {
        let Ok(decoded) = Envelope::decode(&envelope) else {
            return;
        };
        let change = estuary_node::model::decode_change(&decoded.change)
            .map(|c| hex(&c.hash().0))
            .unwrap_or_default();
        if self.publish(Gossip::Change(envelope.into()).encode()) {
            self.log.bad.push(BadChange {
                document: hex(&decoded.document),
                change,
                kind,
                expect,
            });
        }
    }

    /// Publishes a valid change; records it if it left (every honest node must then hold it,
    /// by gossip or anti-entropy).
    fn publish_valid(&mut self, document: DocumentId, hash: ChangeHash, envelope: Vec<u8>) -> bool {
        let left = self.publish(Gossip::Change(envelope.into()).encode());
        if left {
            self.log
                .valid
                .insert((document.to_string(), hash.to_string()));
        }
        left
    }

    fn on_event(&mut self, event: SwarmEvent<RogueBehaviourEvent>, misbehaviour: Misbehaviour) {
        match event {
            SwarmEvent::ConnectionEstablished { .. } => self.log.connections += 1,
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.log.connections_closed += 1;
                self.subscribed.remove(&peer_id);
            }
            SwarmEvent::Behaviour(RogueBehaviourEvent::Gossipsub(event)) => match event {
                gossipsub::Event::Subscribed { peer_id, topic } if topic == self.topic.hash() => {
                    self.subscribed.insert(peer_id);
                }
                gossipsub::Event::Message { message, .. } => {
                    if let Ok(Gossip::Change(envelope)) = Gossip::decode(&message.data)
                        && self.seen.len() < REPLAYS_MAX
                    {
                        self.seen.push_back(envelope.into_vec());
                    }
                }
                _ => {}
            },
            SwarmEvent::Behaviour(RogueBehaviourEvent::Sync(
                request_response::Event::Message {
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                },
            )) => self.on_request(request, channel, misbehaviour),
            _ => {}
        }
    }

    /// Answers an honest node's request: `mute` answers garbage or never; the others refuse
    /// politely (they misbehave elsewhere).
    fn on_request(
        &mut self,
        request: Request,
        channel: ResponseChannel<Response>,
        misbehaviour: Misbehaviour,
    ) {
        self.requests += 1;
        if misbehaviour != Misbehaviour::Mute {
            let answer = match request {
                Request::Roster { .. } => Response::Roster(None),
                _ => Response::Refused(estuary_node::sync::protocol::Refusal::Busy),
            };
            let _ = self
                .swarm
                .behaviour_mut()
                .sync
                .send_response(channel, answer);
            return;
        }
        // Every third request is never answered; the others get garbage of their kind or
        // an answer of the wrong kind.
        if self.requests.is_multiple_of(3) {
            if self.withheld.len() >= WITHHELD_MAX {
                self.withheld.pop_front();
            }
            self.withheld.push_back((Instant::now(), channel));
            self.log.answers_withheld += 1;
            return;
        }
        let garbage =
            |rng: &mut Rng, n: usize| -> Vec<u8> { (0..n).map(|_| rng.next() as u8).collect() };
        let answer = match request {
            Request::Roster { .. } => {
                Response::Roster(Some(ByteBuf::from(garbage(&mut self.rng, 200))))
            }
            Request::Sync(message) => Response::Sync(Some(SyncMessage {
                document: message.document,
                message: ByteBuf::from(garbage(&mut self.rng, 300)),
                signatures: vec![],
                first: false,
            })),
            Request::Fetch { documents, .. } => Response::Fetch {
                documents: documents
                    .iter()
                    .take(4)
                    .map(|id| FetchedDocument {
                        document: *id,
                        saved: ByteBuf::from(garbage(&mut self.rng, 500)),
                        signatures: vec![ChangeSignature {
                            change: ByteArray::new([7; 32]),
                            signature: ByteArray::new([9; 64]),
                        }],
                    })
                    .collect(),
                deferred: vec![],
            },
            // A reconciliation answered with a fetch.
            Request::Reconcile(_) => Response::Fetch {
                documents: vec![],
                deferred: vec![],
            },
        };
        self.log.answers_garbage += 1;
        let _ = self
            .swarm
            .behaviour_mut()
            .sync
            .send_response(channel, answer);
    }

    fn request(&mut self, request: Request) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            self.swarm
                .behaviour_mut()
                .sync
                .send_request(&peer, request.clone());
            self.log.requests_sent += 1;
        }
    }

    fn connected_to_all(&self) -> bool {
        self.subscribed.len() >= self.targets.len()
    }
}

/// Runs the rogue until stopped: it dials every target (again once a second), answers their
/// requests as its misbehaviour says, and once it is connected to every target (or after
/// `CONNECT_WAIT`) plays its script, one step a tick.
async fn run(
    config: RogueConfig,
    identity: Identity,
    mut stopped: oneshot::Receiver<()>,
) -> anyhow::Result<RogueLog> {
    let (changes_topic, _) = estuary_node::sync::topic_names(&config.authority);
    let topic = IdentTopic::new(changes_topic);
    let mut swarm = swarm(&identity)?;
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
    for target in &config.targets {
        let _ = swarm.dial(target.clone());
    }
    let misbehaviour = config.misbehaviour;
    let mut state = State {
        log: RogueLog {
            peer_id: swarm.local_peer_id().to_string(),
            ..RogueLog::default()
        },
        swarm,
        topic,
        targets: config.targets.clone(),
        subscribed: BTreeSet::new(),
        seen: VecDeque::new(),
        withheld: VecDeque::new(),
        requests: 0,
        rng: Rng::new(config.seed ^ 0x5106),
    };
    let mut writer = Writer {
        actor: identity.actor(),
        identity,
        editor: Editor {
            institution: config.institution.clone(),
            at: Timestamp(0),
        },
        seed: config.seed,
        files: 0,
    };
    let started = Instant::now();
    let mut script = Script::new(misbehaviour, &config);
    let mut tick = tokio::time::interval(TICK);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            event = state.swarm.select_next_some() => state.on_event(event, misbehaviour),
            _ = tick.tick() => {
                ticks += 1;
                // Redial whatever dropped, once a second (banned: denied again).
                if ticks.is_multiple_of(10) {
                    for target in state.targets.clone() {
                        let _ = state.swarm.dial(target);
                    }
                }
                while state
                    .withheld
                    .front()
                    .is_some_and(|(at, _)| at.elapsed() > WITHHELD_FOR)
                {
                    state.withheld.pop_front();
                }
                let ready = state.connected_to_all() || started.elapsed() >= CONNECT_WAIT;
                if ready {
                    script.step(&mut state, &mut writer)?;
                }
            }
        }
    }
    Ok(state.log)
}

/// Where a misbehaviour is in its script.
struct Script {
    misbehaviour: Misbehaviour,
    step: u32,
    impersonated: Actor,
    /// Garbage: the chain published out of order.
    chain: Vec<(DocumentId, ChangeHash, Vec<u8>)>,
}

impl Script {
    fn new(misbehaviour: Misbehaviour, config: &RogueConfig) -> Self {
        Self {
            misbehaviour,
            step: 0,
            impersonated: Actor::from_bytes(config.impersonated.0.to_vec()),
            chain: Vec::new(),
        }
    }

    fn step(&mut self, state: &mut State, writer: &mut Writer) -> anyhow::Result<()> {
        self.step += 1;
        match self.misbehaviour {
            Misbehaviour::Forged => self.forged(state, writer),
            Misbehaviour::Stranger => self.stranger(state, writer),
            Misbehaviour::Garbage => self.garbage(state, writer),
            // It only answers (badly); it never publishes.
            Misbehaviour::Mute => Ok(()),
        }
    }

    /// Forgeries: a burst of every kind at once (before any honest node has scored the
    /// rogue), then one every second until stopped.
    fn forged(&mut self, state: &mut State, writer: &mut Writer) -> anyhow::Result<()> {
        let rounds = if self.step == 1 {
            2
        } else if self.step.is_multiple_of(10) {
            1
        } else {
            return Ok(());
        };
        for _ in 0..rounds {
            // A signature with a flipped bit.
            let (_, envelope, _) = writer.new_file()?;
            let mut flipped = Envelope::decode(&envelope)?;
            flipped.signature[7] ^= 0x20;
            state.publish_bad(flipped.encode(), "bad_signature", Expect::Quarantined);
            // The rogue's change, signed by another key.
            let (file, _, _) = writer.new_file()?;
            let mut change = file.automerge().clone().get_changes(&[]).remove(0);
            let other = Identity::from_secret([0x5A; 32]);
            state.publish_bad(
                Envelope::sign(&other, file.id(), &mut change).encode(),
                "signed_by_another_key",
                Expect::Quarantined,
            );
            // A change in an honest member's name, signed with the rogue's key.
            let mut posing = HealthFile::create(
                &self.impersonated,
                &writer.editor(),
                &content::demographics(writer.seed ^ 0xF0, 800_000 + self.step),
            )?;
            let id = posing.id();
            let mut change = posing.changes_since(&[]).remove(0);
            state.publish_bad(
                writer.sign(id, &mut change),
                "impersonation",
                Expect::Quarantined,
            );
            // A genuine signature moved onto another document.
            let (_, envelope, _) = writer.new_file()?;
            let mut moved = Envelope::decode(&envelope)?;
            moved.document[0] ^= 0xFF;
            state.publish_bad(
                moved.encode(),
                "moved_to_another_document",
                Expect::Quarantined,
            );
        }
        Ok(())
    }

    /// A stranger's valid signatures: it keeps dialling and publishing; the gate should keep
    /// every one of them out.
    fn stranger(&mut self, state: &mut State, writer: &mut Writer) -> anyhow::Result<()> {
        if !self.step.is_multiple_of(5) {
            return Ok(());
        }
        let (_, envelope, _) = writer.new_file()?;
        // Were one to reach a node, it would be held until a roster named its author.
        state.publish_bad(envelope, "not_a_member", Expect::Pending);
        Ok(())
    }

    /// Garbage, one offence per tick: a chain out of order (valid in the end), an invented
    /// dependency, content the model refuses, a signature moved to another document, replays,
    /// undecodable and oversized gossip, undecodable and oversized sync requests.
    fn garbage(&mut self, state: &mut State, writer: &mut Writer) -> anyhow::Result<()> {
        match self.step {
            1 => {
                // A file with three changes, the last two published before the first.
                let (mut file, creation, hash) = writer.new_file()?;
                let id = file.id();
                self.chain.push((id, hash, creation));
                for _ in 0..2 {
                    let mut change = writer.follow_up(&mut file)?;
                    let hash = change.hash();
                    self.chain.push((id, hash, writer.sign(id, &mut change)));
                }
                for (id, hash, envelope) in self.chain.clone().into_iter().skip(1).rev() {
                    state.publish_valid(id, hash, envelope);
                }
            }
            5 => {
                // The missing dependency, at last: all three are accepted everywhere.
                if let Some((id, hash, envelope)) = self.chain.first().cloned() {
                    state.publish_valid(id, hash, envelope);
                }
            }
            10 => {
                // A change whose dependency exists nowhere but here.
                let (mut file, _, _) = writer.new_file()?;
                let id = file.id();
                let mut change = writer.follow_up(&mut file)?;
                state.publish_bad(
                    writer.sign(id, &mut change),
                    "invented_dependency",
                    Expect::Pending,
                );
            }
            12 => {
                // A file (valid), then a change smuggling a key the schema does not know.
                let (file, creation, hash) = writer.new_file()?;
                let id = file.id();
                state.publish_valid(id, hash, creation);
                let mut raw = file.automerge().clone();
                raw.set_actor(automerge::ActorId::from(writer.actor.as_bytes()));
                let before = raw.get_heads();
                raw.put(automerge::ROOT, "smuggled", "x")?;
                raw.commit();
                if let Some(mut change) = raw.get_changes(&before).pop() {
                    state.publish_bad(
                        writer.sign(id, &mut change),
                        "invalid_content",
                        Expect::Quarantined,
                    );
                }
            }
            14 => {
                // Honest envelopes, replayed as they were, and moved onto another document.
                let seen: Vec<Vec<u8>> = state.seen.iter().cloned().collect();
                for envelope in seen {
                    if state.publish(Gossip::Change(envelope.clone().into()).encode()) {
                        state.log.garbage_messages += 1;
                    }
                    if let Ok(mut moved) = Envelope::decode(&envelope) {
                        moved.document[15] ^= 0x01;
                        state.publish_bad(
                            moved.encode(),
                            "replayed_into_another_document",
                            Expect::Quarantined,
                        );
                    }
                }
            }
            16 => {
                // Undecodable gossip, and a frame past the honest nodes' limit.
                let noise: Vec<u8> = (0..512).map(|_| state.rng.next() as u8).collect();
                if state.publish(noise) {
                    state.log.garbage_messages += 1;
                }
                let oversized = Gossip::Change(vec![0xAB; OVERSIZED_GOSSIP_BYTES].into()).encode();
                if state.publish(oversized) {
                    state.log.garbage_messages += 1;
                }
            }
            18 => {
                // Sync requests: undecodable, too many documents, past the size limit.
                let id = self
                    .chain
                    .first()
                    .map(|(id, _, _)| *id)
                    .unwrap_or(DocumentId::from_bytes([1; 16]));
                let document = ByteArray::new(*id.as_bytes());
                state.request(Request::Sync(SyncMessage {
                    document,
                    message: ByteBuf::from(vec![0x42; 256]),
                    signatures: vec![],
                    first: true,
                }));
                state.request(Request::Fetch {
                    documents: (0..10_000u32)
                        .map(|i| {
                            let mut id = [0u8; 16];
                            id[..4].copy_from_slice(&i.to_be_bytes());
                            ByteArray::new(id)
                        })
                        .collect(),
                    deflated: true,
                    covered: true,
                });
                state.request(Request::Sync(SyncMessage {
                    document,
                    message: ByteBuf::from(vec![0u8; OVERSIZED_REQUEST_BYTES]),
                    signatures: vec![],
                    first: true,
                }));
            }
            _ => {}
        }
        Ok(())
    }
}

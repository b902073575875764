//! Sync against a member whose node runs faulty or hostile code: a bare libp2p swarm under a
//! member's key that speaks the sync protocol or gossip and answers as it likes. Whatever it
//! claims, the honest members' documents still flow, and what it sends creates no work.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{CONVERGENCE, Consortium, bare_swarm, editor, memory_address, resident, start};
use estuary_node::identity::Identity;
use estuary_node::reconcile::Catalogue;
use estuary_node::replica::Node;
use estuary_node::sync::protocol::{
    ChangeSignature, FetchedDocument, Gossip, PROTOCOL, REQUEST_BYTES_MAX, RESPONSE_BYTES_MAX,
    Request, Response, SyncMessage, deflate_fetched,
};
use estuary_node::sync::{
    DOCUMENTS_IN_PROGRESS_MAX, SYNC_STRIKES_MAX, SyncConfig, SyncHandle, TransportKind,
};
use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, gossipsub};
use serde_bytes::{ByteArray, ByteBuf};

fn member_key(consortium: &Consortium, member: &str) -> libp2p::identity::Keypair {
    Identity::load_or_create(&consortium.dir.path().join(member))
        .unwrap()
        .libp2p_keypair()
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).unwrap();
    bytes
}

/// A node that reconciles often and lets requests run for `request_timeout`.
fn start_with(
    node: &Arc<Node>,
    listen: &Multiaddr,
    bootstrap: Vec<Multiaddr>,
    request_timeout: Duration,
) -> SyncHandle {
    SyncHandle::start(
        node.clone(),
        SyncConfig {
            listen: vec![listen.clone()],
            bootstrap,
            reconcile_every: Duration::from_millis(200),
            request_timeout,
            transport: TransportKind::Memory,
            ..SyncConfig::default()
        },
    )
    .unwrap()
}

async fn wait_until(deadline: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(NetworkBehaviour)]
struct RogueBehaviour {
    sync: request_response::cbor::Behaviour<Request, Response>,
}

/// How the rogue answers a fetch.
#[derive(Clone)]
enum OnFetch {
    /// At once, with these documents where asked for: real documents, forged signatures.
    Forged(Arc<HashMap<[u8; 16], FetchedDocument>>),
    /// Never: it keeps the request open until the asker gives up.
    Hold,
    /// At once, with no document, deferring what was asked and this many documents that
    /// were not.
    DeferUnasked(usize),
    /// At once, with no document, deferring what was asked (an honest responder defers only
    /// once it has sent one).
    DeferAsked,
    /// At once, deflated: the documents asked for and these, which were not (real documents,
    /// honestly signed).
    AddUnasked(
        Arc<HashMap<[u8; 16], FetchedDocument>>,
        Vec<FetchedDocument>,
    ),
}

/// What the rogue saw.
#[derive(Default)]
struct Seen {
    /// Fetch requests received.
    fetches: usize,
    /// Every document a fetch asked for.
    asked: HashSet<[u8; 16]>,
    /// Every document it deferred without being asked for it.
    unasked: HashSet<[u8; 16]>,
    /// Sync messages received, and of those the first of a session.
    syncs: usize,
    sessions: usize,
}

/// Runs a rogue under `member`'s key that dials `target` and claims, in reconciliation, to
/// hold the documents `claims` (with heads nobody has). It answers every sync message with
/// `on_sync`, or never if `None`.
fn rogue(
    consortium: &Consortium,
    member: &str,
    target: Multiaddr,
    claims: &[[u8; 16]],
    on_fetch: OnFetch,
    on_sync: Option<SyncMessage>,
) -> (PeerId, Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let mut catalogue = Catalogue::default();
    for id in claims {
        catalogue.insert(*id, random());
    }
    let codec = request_response::cbor::codec::Codec::<Request, Response>::default()
        .set_request_size_maximum(REQUEST_BYTES_MAX)
        .set_response_size_maximum(RESPONSE_BYTES_MAX);
    let sync = request_response::Behaviour::with_codec(
        codec,
        [(PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(Duration::from_secs(600)),
    );
    let mut swarm = bare_swarm(
        member_key(consortium, member),
        RogueBehaviour { sync },
        Duration::from_secs(600),
    );
    let peer = *swarm.local_peer_id();
    swarm.dial(target).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            // Requests it never answers, kept open.
            let mut held = Vec::new();
            loop {
                let SwarmEvent::Behaviour(RogueBehaviourEvent::Sync(
                    request_response::Event::Message {
                        message:
                            request_response::Message::Request {
                                request, channel, ..
                            },
                        ..
                    },
                )) = swarm.select_next_some().await
                else {
                    continue;
                };
                let response = match request {
                    Request::Roster { .. } => Response::Roster(None),
                    Request::Reconcile(query) => {
                        Response::Reconcile(catalogue.answer(&query).unwrap())
                    }
                    Request::Fetch { documents, .. } => {
                        let mut seen = seen.lock().unwrap();
                        seen.fetches += 1;
                        seen.asked.extend(documents.iter().map(|id| **id));
                        match &on_fetch {
                            OnFetch::Forged(forged) => Response::Fetch {
                                documents: documents
                                    .iter()
                                    .filter_map(|id| forged.get(&**id).cloned())
                                    .collect(),
                                deferred: vec![],
                            },
                            OnFetch::Hold => {
                                held.push(channel);
                                continue;
                            }
                            OnFetch::DeferUnasked(n) => {
                                let unasked: Vec<[u8; 16]> = (0..*n).map(|_| random()).collect();
                                seen.unasked.extend(&unasked);
                                let mut deferred = documents;
                                deferred.extend(unasked.into_iter().map(ByteArray::new));
                                Response::Fetch {
                                    documents: vec![],
                                    deferred,
                                }
                            }
                            OnFetch::DeferAsked => Response::Fetch {
                                documents: vec![],
                                deferred: documents,
                            },
                            OnFetch::AddUnasked(held, unasked) => {
                                let mut sent: Vec<FetchedDocument> = documents
                                    .iter()
                                    .filter_map(|id| held.get(&**id).cloned())
                                    .collect();
                                sent.extend(unasked.iter().cloned());
                                Response::FetchDeflated {
                                    documents: ByteBuf::from(deflate_fetched(&sent)),
                                    deferred: vec![],
                                }
                            }
                        }
                    }
                    Request::Sync(message) => {
                        let mut seen = seen.lock().unwrap();
                        seen.syncs += 1;
                        seen.sessions += usize::from(message.first);
                        match &on_sync {
                            Some(reply) => Response::Sync(Some(reply.clone())),
                            None => {
                                held.push(channel);
                                continue;
                            }
                        }
                    }
                };
                let _ = swarm.behaviour_mut().sync.send_response(channel, response);
            }
        }
    });
    (peer, seen, task)
}

/// `n` health files written by `node`, whose sync is not running: only a pull brings them to
/// another node.
/// The strikes `sync`'s node holds against `peer`, once it knows the peer.
fn strikes(sync: &SyncHandle, peer: &PeerId) -> Option<u32> {
    sync.stats().peers.get(&peer.to_string()).map(|p| p.strikes)
}

/// `n` documents written by `member` on `node`, as a fetch answer carries them, by id; every
/// signature flipped if `forge`.
fn fetch_answers(
    node: &Node,
    member: &str,
    n: usize,
    forge: bool,
) -> HashMap<[u8; 16], FetchedDocument> {
    offline_files(node, member, n)
        .into_iter()
        .map(|id| {
            let document = estuary_node::model::DocumentId::from_bytes(id);
            let mut doc = node.sync_document(document).unwrap().unwrap();
            let signatures = node
                .signatures(document, &node.change_hashes(document).unwrap())
                .unwrap()
                .into_iter()
                .map(|(hash, mut signature)| {
                    signature[0] ^= u8::from(forge);
                    ChangeSignature {
                        change: ByteArray::new(hash.0),
                        signature: ByteArray::new(signature),
                    }
                })
                .collect();
            let fetched = FetchedDocument {
                document: ByteArray::new(id),
                saved: ByteBuf::from(doc.save()),
                signatures,
            };
            (id, fetched)
        })
        .collect()
}

fn offline_files(node: &Node, member: &str, n: usize) -> Vec<[u8; 16]> {
    (0..n)
        .map(|i| {
            let (id, _) = node
                .create_health_file(&editor(member), &resident(&format!("{member} {i}")))
                .unwrap();
            *id.as_bytes()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_claiming_documents_it_never_serves_does_not_stop_others_being_fetched() {
    let consortium = Consortium::new(3);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let wanted = offline_files(&b, "member-1", 5);
    let a_address = memory_address();
    // No request times out during the test: only a share of the budget per peer leaves room.
    let patient = Duration::from_secs(600);
    let a_sync = start_with(&a, &a_address, vec![], patient);
    // The rogue claims more documents than the whole budget and never serves one.
    let claims: Vec<[u8; 16]> = (0..DOCUMENTS_IN_PROGRESS_MAX + 1_000)
        .map(|_| random())
        .collect();
    let (_, seen, rogue) = rogue(
        &consortium,
        "member-2",
        a_address.clone(),
        &claims,
        OnFetch::Hold,
        None,
    );
    wait_until(CONVERGENCE, "A never fetched from the rogue", || {
        seen.lock().unwrap().fetches > 0
    })
    .await;
    let b_sync = start_with(&b, &memory_address(), vec![a_address], patient);
    wait_until(
        CONVERGENCE,
        "the honest member's documents were never fetched",
        || wanted.iter().all(|id| a.catalogue().get(id).is_some()),
    )
    .await;
    rogue.abort();
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_queued_with_a_member_that_stops_answering_are_fetched_from_another() {
    let consortium = Consortium::new(3);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let wanted = offline_files(&b, "member-1", 5);
    let a_address = memory_address();
    let timeout = Duration::from_secs(2);
    let a_sync = start_with(&a, &a_address, vec![], timeout);
    // The rogue claims B's documents among 20,000 others (within its share), so that they
    // sit in its queue, and answers no fetch.
    let mut claims: Vec<[u8; 16]> = (0..20_000).map(|_| random()).collect();
    claims.extend(&wanted);
    let (_, seen, rogue) = rogue(
        &consortium,
        "member-2",
        a_address.clone(),
        &claims,
        OnFetch::Hold,
        None,
    );
    wait_until(CONVERGENCE, "A never fetched from the rogue", || {
        seen.lock().unwrap().fetches > 0
    })
    .await;
    let b_sync = start_with(&b, &memory_address(), vec![a_address], timeout);
    // Fetching the rogue's queue batch by batch, one timeout each, would take minutes; its
    // first timeout releases the whole queue.
    wait_until(
        Duration::from_secs(40),
        "documents queued with the silent member were not fetched from another",
        || wanted.iter().all(|id| a.catalogue().get(id).is_some()),
    )
    .await;
    rogue.abort();
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_answer_deferring_documents_not_asked_for_creates_no_work() {
    let consortium = Consortium::new(2);
    let a = consortium.node(0);
    let a_address = memory_address();
    let a_sync = start_with(&a, &a_address, vec![], Duration::from_secs(30));
    let claims: Vec<[u8; 16]> = (0..10).map(|_| random()).collect();
    let (rogue_peer, seen, rogue) = rogue(
        &consortium,
        "member-1",
        a_address,
        &claims,
        OnFetch::DeferUnasked(100),
        None,
    );
    // A asks again for what was deferred.
    wait_until(CONVERGENCE, "A did not ask the rogue again", || {
        seen.lock().unwrap().fetches >= 3
    })
    .await;
    {
        let seen = seen.lock().unwrap();
        let asked_unasked = seen.asked.intersection(&seen.unasked).count();
        assert_eq!(asked_unasked, 0, "A fetched documents nobody offered it");
        assert!(seen.asked.iter().all(|id| claims.contains(id)));
    }
    let strikes = strikes(&a_sync, &rogue_peer);
    assert!(strikes >= Some(2), "strikes: {strikes:?}");
    rogue.abort();
    a_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_fetch_answers_carry_forged_changes_is_struck_off() {
    let consortium = Consortium::new(3);
    let a = consortium.node(0);
    // Real documents of the rogue's member, every signature flipped.
    let forged = fetch_answers(&consortium.node(2), "member-2", 6, true);
    let claims: Vec<[u8; 16]> = forged.keys().copied().collect();
    let a_address = memory_address();
    let a_sync = start_with(&a, &a_address, vec![], Duration::from_secs(30));
    let (rogue_peer, seen, rogue) = rogue(
        &consortium,
        "member-2",
        a_address,
        &claims,
        OnFetch::Forged(Arc::new(forged)),
        None,
    );
    wait_until(CONVERGENCE, "A never fetched the forged documents", || {
        seen.lock().unwrap().fetches > 0 && !a.quarantine().unwrap().is_empty()
    })
    .await;
    wait_until(CONVERGENCE, "the forger was never struck", || {
        strikes(&a_sync, &rogue_peer) >= Some(1)
    })
    .await;
    assert!(claims.iter().all(|id| a.catalogue().get(id).is_none()));
    rogue.abort();
    a_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_answer_carrying_documents_not_asked_for_is_refused_whole() {
    let consortium = Consortium::new(3);
    let a = consortium.node(0);
    let own = consortium.node(2);
    // Real documents, honestly signed: two it claims, four it never claims but sends.
    let claimed = fetch_answers(&own, "member-2", 2, false);
    let unasked: Vec<FetchedDocument> = fetch_answers(&own, "member-2", 4, false)
        .into_values()
        .collect();
    let unasked_ids: Vec<[u8; 16]> = unasked.iter().map(|d| *d.document).collect();
    let claims: Vec<[u8; 16]> = claimed.keys().copied().collect();
    let a_address = memory_address();
    let a_sync = start_with(&a, &a_address, vec![], Duration::from_secs(30));
    let (rogue_peer, seen, rogue) = rogue(
        &consortium,
        "member-2",
        a_address,
        &claims,
        OnFetch::AddUnasked(Arc::new(claimed), unasked),
        None,
    );
    wait_until(CONVERGENCE, "the rogue was never struck", || {
        seen.lock().unwrap().fetches > 0 && strikes(&a_sync, &rogue_peer) >= Some(1)
    })
    .await;
    // Nothing of the answer was taken: not the documents slipped in, nor those asked for
    // beside them.
    assert!(
        unasked_ids
            .iter()
            .chain(&claims)
            .all(|id| a.catalogue().get(id).is_none())
    );
    rogue.abort();
    a_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_a_member_keeps_deferring_are_fetched_from_another() {
    let consortium = Consortium::new(3);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let wanted = offline_files(&b, "member-1", 5);
    let a_address = memory_address();
    let a_sync = start_with(&a, &a_address, vec![], Duration::from_secs(30));
    // The rogue claims B's documents and defers them in every answer, at once.
    let (rogue_peer, seen, rogue) = rogue(
        &consortium,
        "member-2",
        a_address.clone(),
        &wanted,
        OnFetch::DeferAsked,
        None,
    );
    wait_until(CONVERGENCE, "A never fetched from the rogue", || {
        seen.lock().unwrap().fetches > 0
    })
    .await;
    let b_sync = start_with(
        &b,
        &memory_address(),
        vec![a_address],
        Duration::from_secs(30),
    );
    wait_until(
        CONVERGENCE,
        "documents the rogue kept deferring were never fetched from another member",
        || wanted.iter().all(|id| a.catalogue().get(id).is_some()),
    )
    .await;
    let strikes = strikes(&a_sync, &rogue_peer);
    assert_eq!(strikes, Some(SYNC_STRIKES_MAX));
    rogue.abort();
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

/// A bare swarm under `member`'s key subscribed to the consortium's roster topic.
fn roster_gossiper(
    consortium: &Consortium,
    member: &str,
) -> (libp2p::Swarm<gossipsub::Behaviour>, gossipsub::IdentTopic) {
    let key = member_key(consortium, member);
    let (_, roster) =
        estuary_node::sync::topic_names(&Identity::from_secret(common::AUTHORITY).public_key());
    let topic = gossipsub::IdentTopic::new(roster);
    let gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossipsub::Config::default(),
    )
    .unwrap();
    let mut swarm = bare_swarm(key, gossip, Duration::from_secs(600));
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    (swarm, topic)
}

/// The roster a node holds, gossiped to it again, is a duplicate: it is not passed on as new
/// (and its sender is not penalised); a newer roster is adopted and passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roster_gossiped_again_is_not_passed_on() {
    let mut consortium = Consortium::new(4);
    let a = consortium.node(0);
    let a_address = memory_address();
    let a_sync = start(&a, &a_address, vec![]);
    let held = Gossip::Roster(consortium.roster.clone().into()).encode();
    // Member 3 never connects: revoking it disconnects nobody here.
    let newer = Gossip::Roster(consortium.revoke("member-3").into()).encode();
    let (mut sender, topic) = roster_gossiper(&consortium, "member-1");
    let (mut listener, _) = roster_gossiper(&consortium, "member-2");
    let sender_peer = *sender.local_peer_id();
    sender.dial(a_address.clone()).unwrap();
    listener.dial(a_address).unwrap();
    let started = Instant::now();
    let mut subscribed = [false, false];
    // When both saw A join the topic; then the held roster is sent, then the newer one.
    let mut meshed: Option<Instant> = None;
    let mut sent = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let first = loop {
        tokio::select! {
            event = sender.select_next_some() => {
                if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { topic: t, .. }) = event
                    && t == topic.hash()
                {
                    subscribed[0] = true;
                }
            }
            event = listener.select_next_some() => match event {
                SwarmEvent::Behaviour(gossipsub::Event::Subscribed { topic: t, .. })
                    if t == topic.hash() => subscribed[1] = true,
                SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) => {
                    break message.data;
                }
                _ => {}
            },
            _ = tick.tick() => {
                assert!(started.elapsed() < CONVERGENCE, "the listener received nothing");
                if meshed.is_none() && subscribed == [true, true] {
                    meshed = Some(Instant::now());
                }
                // A few heartbeats for the meshes to form, then one message each 2 s.
                let due = meshed.is_some_and(|at| at.elapsed() > Duration::from_secs(2 + 2 * sent));
                if due && sent < 2 {
                    let data = if sent == 0 { held.clone() } else { newer.clone() };
                    sender.behaviour_mut().publish(topic.clone(), data).unwrap();
                    sent += 1;
                }
            }
        }
    };
    assert!(first == newer, "the roster A held was passed on as new");
    let score = a_sync
        .stats()
        .peers
        .get(&sender_peer.to_string())
        .and_then(|p| p.score);
    assert!(
        score.unwrap_or(0.0) >= 0.0,
        "the sender was penalised: {score:?}"
    );
    a_sync.shutdown().await;
}

/// A member that answers every sync message of a document with the same message, carrying
/// nothing and naming heads nobody has, holds a session for a few rounds, not for
/// `SYNC_ROUNDS_MAX` (32): a round that would repeat the last ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_would_repeat_itself_ends() {
    use estuary_node::model::automerge::ChangeHash;
    use estuary_node::model::automerge::sync::{State, SyncDoc};
    let consortium = Consortium::new(3);
    let a = consortium.node(0);
    let (file, _) = a
        .create_health_file(&editor("member-0"), &resident("Repeated"))
        .unwrap();
    let mut doc = a.sync_document(file).unwrap().unwrap();
    let mut stuck = doc.sync().generate_sync_message(&mut State::new()).unwrap();
    stuck.heads = vec![ChangeHash(random())];
    let reply = SyncMessage {
        document: ByteArray::new(*file.as_bytes()),
        message: ByteBuf::from(stuck.encode()),
        signatures: vec![],
        first: false,
    };
    let a_address = memory_address();
    let a_sync = start_with(&a, &a_address, vec![], Duration::from_secs(600));
    let (_, seen, rogue) = rogue(
        &consortium,
        "member-2",
        a_address,
        &[*file.as_bytes()],
        OnFetch::Hold,
        Some(reply),
    );
    wait_until(
        CONVERGENCE,
        "A never held three sessions with the rogue",
        || seen.lock().unwrap().sessions >= 3,
    )
    .await;
    rogue.abort();
    a_sync.shutdown().await;
    let seen = seen.lock().unwrap();
    // The first message and the one asking for the unknown heads; its repeat is never sent.
    assert!(
        seen.syncs <= 2 * seen.sessions,
        "{} messages in {} sessions",
        seen.syncs,
        seen.sessions
    );
}

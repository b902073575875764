//! Sync between real nodes — real stores in temporary directories, real libp2p swarms over
//! the in-process memory transport: concurrent writes converge, an offline node catches up,
//! a line of nodes carries every change end to end, strangers are refused.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    AUTHORITY, CONVERGENCE, Consortium, allergy, bare_swarm, converge, converge_or, editor,
    memory_address, resident, start, start_on,
};
use estuary_node::identity::Identity;
use estuary_node::model::*;
use estuary_node::replica::Node;
use estuary_node::sync::faults::Faults;
use estuary_node::sync::{SyncConfig, SyncHandle, TransportKind};
use libp2p::Multiaddr;

/// `member`'s key driven by faulty code: a bare swarm subscribed to the consortium's changes
/// topic, which it can publish anything on.
fn faulty_member(
    consortium: &Consortium,
    member: &str,
) -> (
    libp2p::Swarm<libp2p::gossipsub::Behaviour>,
    libp2p::gossipsub::IdentTopic,
) {
    use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
    let key = Identity::load_or_create(&consortium.dir.path().join(member))
        .unwrap()
        .libp2p_keypair();
    let (changes, _) =
        estuary_node::sync::topic_names(&Identity::from_secret(AUTHORITY).public_key());
    let topic = IdentTopic::new(changes);
    let gossip = gossipsub::Behaviour::new(
        MessageAuthenticity::Signed(key.clone()),
        gossipsub::Config::default(),
    )
    .unwrap();
    let mut swarm = bare_swarm(key, gossip, Duration::ZERO);
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    (swarm, topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_converge_on_concurrent_writes() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let (a_address, b_address) = (memory_address(), memory_address());
    let a_sync = start(&a, &a_address, vec![]);
    let b_sync = start(&b, &b_address, vec![a_address.clone()]);
    let (a_editor, b_editor) = (editor("member-0"), editor("member-1"));
    let shared = a
        .create_health_file(&a_editor, &resident("Shared"))
        .unwrap()
        .0;
    for i in 0..5 {
        a.create_health_file(&a_editor, &resident(&format!("A{i}")))
            .unwrap();
        b.create_health_file(&b_editor, &resident(&format!("B{i}")))
            .unwrap();
    }
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], 11).await;
    // Both edit the same file at once: the edits merge, on both sides. (On a loaded machine
    // one edit may reach the other node before its own is made, and build on it: then the
    // file has one head, not two; either way both nodes end with both edits.)
    a.apply_health_file(shared, &a_editor, &allergy("penicillin"))
        .unwrap();
    b.apply_health_file(shared, &b_editor, &allergy("latex"))
        .unwrap();
    let both_held = |node: &Node| node.health_file(shared).unwrap().allergy_substances().len() == 2;
    let started = Instant::now();
    while !both_held(&a) || a.heads(shared).unwrap() != b.heads(shared).unwrap() {
        assert!(started.elapsed() < CONVERGENCE, "{:#?}", a_sync.stats());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut substances = a.health_file(shared).unwrap().allergy_substances();
    substances.sort();
    assert_eq!(substances, vec!["latex", "penicillin"]);
    assert_eq!(
        b.health_file(shared).unwrap(),
        a.health_file(shared).unwrap()
    );
    assert!(a.quarantine().unwrap().is_empty() && b.quarantine().unwrap().is_empty());
    let stats = b_sync.stats();
    let a_seen_by_b = &stats.peers[&a_sync.peer_id().to_string()];
    assert_eq!(a_seen_by_b.institution.as_deref(), Some("member-0"));
    assert!(a_seen_by_b.changes_received > 0 && a_seen_by_b.bytes_in > 0);
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_offline_while_1000_changes_were_made_catches_up() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let a_address = memory_address();
    let a_sync = start(&a, &a_address, vec![]);
    let a_editor = editor("member-0");
    let mut changes = 0;
    for i in 0..100 {
        let (file, _) = a
            .create_health_file(&a_editor, &resident(&format!("R{i}")))
            .unwrap();
        changes += 1;
        for k in 0..9 {
            a.apply_health_file(file, &a_editor, &allergy(&format!("substance {k}")))
                .unwrap();
            changes += 1;
        }
    }
    assert_eq!(changes, 1_000);
    // B comes online only now.
    let b_sync = start(&b, &memory_address(), vec![a_address]);
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], 100).await;
    // The driver counts a fetched batch once its ingest returns, just after the documents it
    // stored become visible.
    let started = Instant::now();
    while b_sync.stats().catch_up.documents_done < 100 && started.elapsed() < CONVERGENCE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = b_sync.stats().catch_up;
    assert_eq!(catch_up.documents_total, 100, "{catch_up:?}");
    assert_eq!(catch_up.documents_done, 100, "{catch_up:?}");
    assert!(catch_up.bytes > 0);
    assert_eq!(b.pending_count().unwrap(), 0);
    assert!(b.verify().unwrap().problems.is_empty());
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

/// A node back from offline takes what its peer holds urgent first: a priority referral and a
/// file whose allergies just changed, written while it was away, arrive before the routine
/// files its reconciliation finds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_catching_up_takes_urgent_documents_before_routine_ones() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let a_address = memory_address();
    let a_sync = start(&a, &a_address, vec![]);
    let a_editor = editor("member-0");
    const ROUTINE: usize = 600;
    let mut files = Vec::new();
    for i in 0..ROUTINE {
        let (file, _) = a
            .create_health_file(&a_editor, &resident(&format!("R{i}")))
            .unwrap();
        files.push(file);
    }
    // An allergy recorded on one file, and a priority referral of another to member-1.
    a.apply_health_file(files[17], &a_editor, &allergy("penicillin"))
        .unwrap();
    let (referral, _) = a
        .create_referral(
            &a_editor,
            &NewReferral {
                patient: files[42],
                direction: Direction::Up,
                to: common::institution("member-1"),
                reason: "suspected stroke".into(),
                urgency: Urgency::Priority,
                handover: String::new(),
            },
        )
        .unwrap();
    assert!(a.is_urgent(&referral), "the referral");
    assert!(a.is_urgent(&files[17]), "the allergy");
    assert!(!a.is_urgent(&files[18]));
    let mut urgent: Vec<[u8; 16]> = a.urgent_documents().iter().map(|(id, _)| *id).collect();
    urgent.sort();
    let mut expected = vec![*referral.as_bytes(), *files[17].as_bytes()];
    expected.sort();
    assert_eq!(urgent, expected);

    // B comes online only now, and catches up.
    let b_sync = start(&b, &memory_address(), vec![a_address]);
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], ROUTINE + 1).await;
    // The order B accepted the documents in.
    let mut order = Vec::new();
    for record in b.audit(1, 10 * ROUTINE).unwrap() {
        if record.action == estuary_node::audit::AuditAction::Accepted
            && !order.contains(&record.document)
        {
            order.push(record.document);
        }
    }
    let at = |id: DocumentId| order.iter().position(|d| *d == id).unwrap();
    // Both before all but at most one batch of routine files (one fetch may overtake).
    let batch = 64; // FETCH_DOCUMENTS_MAX
    assert!(
        at(referral) <= batch,
        "the referral came {}th",
        at(referral)
    );
    assert!(
        at(files[17]) <= batch,
        "the allergy came {}th",
        at(files[17])
    );
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

/// After time apart, an allergy recorded on a file both nodes hold comes back before the
/// routine edits made meanwhile: the reconciliation that finds the differences takes the ones
/// its peer names urgent first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allergy_change_to_a_file_both_hold_comes_back_before_routine_edits() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let a_address = memory_address();
    let a_sync = start(&a, &a_address, vec![]);
    let a_editor = editor("member-0");
    const FILES: usize = 400;
    let mut files = Vec::new();
    for i in 0..FILES {
        let (file, _) = a
            .create_health_file(&a_editor, &resident(&format!("R{i}")))
            .unwrap();
        files.push(file);
    }
    let b_sync = start(&b, &memory_address(), vec![a_address.clone()]);
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], FILES).await;
    b_sync.shutdown().await;
    let seen = b.audit(1, 100 * FILES).unwrap().len() as u64;
    // Apart: a routine edit of every file, and an allergy on one of them.
    for (n, file) in files.iter().enumerate() {
        a.apply_health_file(
            *file,
            &a_editor,
            &HealthFileOp::SetDemographic(DemographicField::Phone(format!("+86 {n}"))),
        )
        .unwrap();
    }
    a.apply_health_file(files[217], &a_editor, &allergy("iodinated contrast"))
        .unwrap();
    assert!(a.is_urgent(&files[217]) && !a.is_urgent(&files[216]));
    let b_sync = start(&b, &memory_address(), vec![a_address]);
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], FILES).await;
    // The order B took the files' new changes in, since it came back.
    let mut order = Vec::new();
    for record in b.audit(seen + 1, 100 * FILES).unwrap() {
        if record.action == estuary_node::audit::AuditAction::Accepted
            && !order.contains(&record.document)
        {
            order.push(record.document);
        }
    }
    assert_eq!(order.len(), FILES);
    let at = order.iter().position(|d| *d == files[217]).unwrap();
    // Among the first sessions of the first reconciliation (a peer's share of them).
    assert!(at < FILES / 8, "the allergy came back {at}th of {FILES}");
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

/// A bulk load is stored whole (snapshot and signatures) and not gossiped: a running peer
/// takes it by reconciliation, fetched whole, and holds it as the loading node does. The
/// roster's revocation of another member does not stand in the load's way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_load_reaches_a_running_peer_by_reconciliation() {
    let mut consortium = Consortium::new(3);
    let revoked = consortium.revoke("member-2");
    let (a, b) = (consortium.node(0), consortium.node(1));
    for node in [&a, &b] {
        node.update_roster(&revoked).unwrap();
    }
    let a_address = memory_address();
    let a_sync = start(&a, &a_address, vec![]);
    let b_sync = start(&b, &memory_address(), vec![a_address]);
    let line = include_str!("data/resident.json").trim();
    let residents: Vec<_> = (0..40)
        .map(|i| {
            let line = line.replace("310230195410170433", &format!("3102301954101{i:05}"));
            estuary_node::import::resident_from_line(&line).unwrap()
        })
        .collect();
    let loaded = a
        .writer(Some("emr"))
        .import_health_files(&editor("member-0"), &residents, false)
        .unwrap();
    let loaded: Vec<_> = loaded.into_iter().map(Result::unwrap).collect();
    assert_eq!(loaded.len(), 40);
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], 40).await;
    for (id, hash) in &loaded {
        assert_eq!(b.heads(*id).unwrap(), vec![*hash]);
        assert_eq!(b.health_file(*id).unwrap(), a.health_file(*id).unwrap());
    }
    for node in [&a, &b] {
        assert!(node.verify().unwrap().problems.is_empty());
    }
    let audit = a.audit(0, 1_000).unwrap();
    let written = audit
        .iter()
        .filter(|record| record.action == estuary_node::audit::AuditAction::Written)
        .count();
    assert_eq!(written, 40, "the app is recorded as each file's writer");
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_in_a_line_carry_every_change_to_every_node() {
    let consortium = Consortium::new(5);
    let nodes: Vec<Arc<Node>> = (0..5).map(|i| consortium.node(i)).collect();
    let addresses: Vec<Multiaddr> = (0..5).map(|_| memory_address()).collect();
    // Each knows only its neighbour.
    let handles: Vec<SyncHandle> = (0..5)
        .map(|i| {
            let bootstrap = if i == 0 {
                vec![]
            } else {
                vec![addresses[i - 1].clone()]
            };
            start(&nodes[i], &addresses[i], bootstrap)
        })
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        for k in 0..2 {
            node.create_health_file(
                &editor(&format!("member-{i}")),
                &resident(&format!("N{i}-{k}")),
            )
            .unwrap();
        }
    }
    let refs: Vec<&SyncHandle> = handles.iter().collect();
    converge(&nodes, &refs, 10).await;
    // The ends never connected to each other.
    let first_peers = handles[0].connected().await.unwrap();
    assert!(!first_peers.contains(&handles[4].peer_id()));
    for handle in handles {
        handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_refused_at_connection() {
    use futures::StreamExt;
    use libp2p::ping;
    use libp2p::swarm::SwarmEvent;

    let consortium = Consortium::new(1);
    let member = consortium.node(0);
    let address = memory_address();
    let member_sync = start(&member, &address, vec![]);
    // A peer whose key is not in the roster dials in.
    let mut stranger = bare_swarm(
        libp2p::identity::Keypair::generate_ed25519(),
        ping::Behaviour::default(),
        Duration::ZERO,
    );
    stranger.dial(address).unwrap();
    let closed = tokio::time::timeout(CONVERGENCE, async {
        loop {
            match stranger.select_next_some().await {
                SwarmEvent::ConnectionClosed { .. }
                | SwarmEvent::OutgoingConnectionError { .. } => {
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the member kept the stranger's connection");
    assert!(member_sync.connected().await.unwrap().is_empty());
    member_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge_once_injected_faults_stop() {
    let seed = std::env::var("ESTUARY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).unwrap();
            u64::from_le_bytes(bytes)
        });
    let context = format!("with fault seed {seed} (replay: ESTUARY_FAULT_SEED={seed})");
    eprintln!("{context}");
    let faults = Faults::new(seed);
    let consortium = Consortium::new(5);
    let nodes: Vec<Arc<Node>> = (0..5).map(|i| consortium.node(i)).collect();
    let addresses: Vec<Multiaddr> = (0..5).map(|_| memory_address()).collect();
    let handles: Vec<SyncHandle> = (0..5)
        .map(|i| {
            let transport = TransportKind::Faulty {
                faults: faults.clone(),
                node: i,
            };
            start_on(&nodes[i], &addresses[i], addresses[..i].to_vec(), transport)
        })
        .collect();
    let refs: Vec<&SyncHandle> = handles.iter().collect();
    // Flaky links from the start; then the northern group is cut off; then node 0 alone.
    faults.cut_after(2 * 1024, 32 * 1024);
    faults.delay(10, Duration::from_millis(20));
    let write_round = |round: usize| {
        for (i, node) in nodes.iter().enumerate() {
            let by = editor(&format!("member-{i}"));
            let (file, _) = node
                .create_health_file(&by, &resident(&format!("N{i}-{round}")))
                .unwrap();
            for k in 0..3 {
                node.apply_health_file(file, &by, &allergy(&format!("substance {k}")))
                    .unwrap();
            }
        }
    };
    write_round(0);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    faults.partition(&[vec![0, 1], vec![2, 3, 4]]);
    write_round(1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    faults.partition(&[vec![0], vec![1, 2, 3, 4]]);
    write_round(2);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let cuts = faults.cuts();
    faults.heal();
    converge_or(&nodes, &refs, 15, &context).await;
    assert!(cuts > 0, "no fault was injected {context}");
    for node in &nodes {
        assert_eq!(node.pending_count().unwrap(), 0, "{context}");
        assert!(node.quarantine().unwrap().is_empty(), "{context}");
    }
    for handle in handles {
        handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_member_is_disconnected_everywhere_the_roster_reaches() {
    let mut consortium = Consortium::new(3);
    let nodes: Vec<Arc<Node>> = (0..3).map(|i| consortium.node(i)).collect();
    let addresses: Vec<Multiaddr> = (0..3).map(|_| memory_address()).collect();
    // 1 and 2 both know 0; 2 also knows 1.
    let handles: Vec<SyncHandle> = (0..3)
        .map(|i| start(&nodes[i], &addresses[i], addresses[..i].to_vec()))
        .collect();
    let started = Instant::now();
    while handles[0].connected().await.unwrap().len() < 2
        || handles[1].connected().await.unwrap().len() < 2
    {
        assert!(started.elapsed() < CONVERGENCE, "the three never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The authority revokes member 2; member 0 adopts the roster and passes it on.
    let newer = consortium.revoke("member-2");
    let version = handles[0].update_roster(newer).await.unwrap().version();
    let revoked = handles[2].peer_id();
    let started = Instant::now();
    loop {
        let gone_from_0 = !handles[0].connected().await.unwrap().contains(&revoked);
        let gone_from_1 = !handles[1].connected().await.unwrap().contains(&revoked);
        let adopted = nodes[1].roster_version() == version;
        if gone_from_0 && gone_from_1 && adopted {
            break;
        }
        assert!(
            started.elapsed() < CONVERGENCE,
            "0 dropped it: {gone_from_0}, 1 dropped it: {gone_from_1}, 1 adopted: {adopted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It keeps redialling, and is refused every time.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!handles[0].connected().await.unwrap().contains(&revoked));
    assert!(handles[0].stats().disconnected >= 1);
    for handle in handles {
        handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gossiping_invalid_data_is_penalised_then_disconnected() {
    use futures::StreamExt;
    use libp2p::swarm::SwarmEvent;

    let consortium = Consortium::new(2);
    let honest = consortium.node(0);
    let address = memory_address();
    let honest_sync = start(&honest, &address, vec![]);
    // Member 1's key, driven by a faulty program that gossips garbage.
    let (mut faulty, topic) = faulty_member(&consortium, "member-1");
    let faulty_peer = *faulty.local_peer_id();
    faulty.dial(address).unwrap();
    let outcome = tokio::time::timeout(CONVERGENCE, async {
        let mut sent = 0u32;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                event = faulty.select_next_some() => {
                    if let SwarmEvent::ConnectionClosed { num_established: 0, .. } = event
                        && sent > 0
                    {
                        return sent;
                    }
                }
                _ = tick.tick() => {
                    // Distinct garbage each time (gossip drops repeats).
                    let garbage = format!("not an envelope {sent}").into_bytes();
                    if faulty.behaviour_mut().publish(topic.clone(), garbage).is_ok() {
                        sent += 1;
                    }
                }
            }
        }
    })
    .await;
    let sent = outcome.expect("the faulty member was never disconnected");
    let stats = honest_sync.stats();
    let peer = &stats.peers[&faulty_peer.to_string()];
    assert!(peer.changes_rejected >= 1, "{peer:?}");
    assert!(stats.disconnected >= 1);
    assert!(peer.score.is_some_and(|s| s < 0.0), "{peer:?}");
    eprintln!(
        "disconnected after {sent} invalid messages; score {:?}",
        peer.score
    );
    honest_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_centre_behind_nat_is_reachable_through_the_hospitals_relay() {
    use libp2p::multiaddr::Protocol;

    let consortium = Consortium::new(3);
    let nodes: Vec<Arc<Node>> = (0..3).map(|i| consortium.node(i)).collect();
    let config = |listen: Vec<Multiaddr>| SyncConfig {
        listen,
        reconcile_every: Duration::from_millis(500),
        transport: TransportKind::Memory,
        ..SyncConfig::default()
    };
    let hospital_address = memory_address();
    let hospital = SyncHandle::start(
        nodes[0].clone(),
        SyncConfig {
            relay_server: true,
            ..config(vec![hospital_address.clone()])
        },
    )
    .unwrap();
    let relay = hospital_address.with(Protocol::P2p(hospital.peer_id()));
    // The centre listens on no address of its own: it is reachable only through the relay.
    let centre = SyncHandle::start(
        nodes[1].clone(),
        SyncConfig {
            relays: vec![relay.clone()],
            ..config(vec![])
        },
    )
    .unwrap();
    let started = Instant::now();
    while !centre
        .listen_addrs()
        .await
        .unwrap()
        .iter()
        .any(|a| a.iter().any(|p| p == Protocol::P2pCircuit))
    {
        assert!(started.elapsed() < CONVERGENCE, "no relay reservation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The district hospital knows the centre only by its relayed address.
    let circuit = relay
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(centre.peer_id()));
    let district = SyncHandle::start(
        nodes[2].clone(),
        SyncConfig {
            bootstrap: vec![circuit],
            ..config(vec![memory_address()])
        },
    )
    .unwrap();
    nodes[1]
        .create_health_file(&editor("member-1"), &resident("Centre"))
        .unwrap();
    nodes[2]
        .create_health_file(&editor("member-2"), &resident("District"))
        .unwrap();
    converge(&nodes, &[&hospital, &centre, &district], 2).await;
    assert!(
        district
            .connected()
            .await
            .unwrap()
            .contains(&centre.peer_id())
    );
    for handle in [hospital, centre, district] {
        handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sync_over_loopback_tcp_and_quic() {
    use libp2p::multiaddr::Protocol;

    let consortium = Consortium::new(3);
    let nodes: Vec<Arc<Node>> = (0..3).map(|i| consortium.node(i)).collect();
    let network = |listen: Vec<&str>, bootstrap: Vec<Multiaddr>| SyncConfig {
        listen: listen.into_iter().map(|a| a.parse().unwrap()).collect(),
        bootstrap,
        reconcile_every: Duration::from_millis(500),
        transport: TransportKind::Network,
        ..SyncConfig::default()
    };
    let hub = SyncHandle::start(
        nodes[0].clone(),
        network(
            vec!["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"],
            vec![],
        ),
    )
    .unwrap();
    // The ports are chosen by the system: wait for both listeners.
    let started = Instant::now();
    let (tcp, quic) = loop {
        let addresses = hub.listen_addrs().await.unwrap();
        let tcp = addresses
            .iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
            .cloned();
        let quic = addresses
            .iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::QuicV1)))
            .cloned();
        if let (Some(tcp), Some(quic)) = (tcp, quic) {
            break (tcp, quic);
        }
        assert!(
            started.elapsed() < CONVERGENCE,
            "no listener: {addresses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let over_tcp = SyncHandle::start(nodes[1].clone(), network(vec![], vec![tcp])).unwrap();
    let over_quic = SyncHandle::start(nodes[2].clone(), network(vec![], vec![quic])).unwrap();
    for (i, node) in nodes.iter().enumerate() {
        node.create_health_file(&editor(&format!("member-{i}")), &resident(&format!("L{i}")))
            .unwrap();
    }
    converge(&nodes, &[&hub, &over_tcp, &over_quic], 3).await;
    for handle in [hub, over_tcp, over_quic] {
        handle.shutdown().await;
    }
}

/// Runs automerge's sync protocol between two nodes directly (no network) until both are
/// quiet; returns whether any message carried a whole document, and the rejected count.
fn sync_directly(
    from: &Node,
    to: &Node,
    document: DocumentId,
    tamper: impl Fn(&mut estuary_node::sync::protocol::SyncMessage),
) -> (bool, usize) {
    use estuary_node::model::automerge::sync::State;
    let mut states = (State::new(), State::new());
    sync_with_states(from, to, document, &mut states, tamper)
}

/// `sync_directly` with sync states that outlive the exchange, as a session's do.
fn sync_with_states(
    from: &Node,
    to: &Node,
    document: DocumentId,
    (from_state, to_state): &mut (
        estuary_node::model::automerge::sync::State,
        estuary_node::model::automerge::sync::State,
    ),
    tamper: impl Fn(&mut estuary_node::sync::protocol::SyncMessage),
) -> (bool, usize) {
    use estuary_node::model::automerge::sync::Message;
    use estuary_node::sync::document::{incoming, outgoing};
    use estuary_node::sync::protocol::SYNC_MESSAGE_BYTES_MAX;
    let (mut whole_document, mut rejected) = (false, 0);
    for _ in 0..16 {
        let sent = outgoing(from, document, from_state, SYNC_MESSAGE_BYTES_MAX).unwrap();
        if let Some(mut message) = sent.clone() {
            let decoded = Message::decode(&message.message).unwrap();
            // Byte 8 of a chunk is its type; 0 is a whole document.
            whole_document |= decoded.changes.iter().any(|chunk| chunk.get(8) == Some(&0));
            tamper(&mut message);
            rejected += incoming(to, &message, to_state).unwrap().rejected;
        }
        let reply = outgoing(to, document, to_state, SYNC_MESSAGE_BYTES_MAX).unwrap();
        if let Some(reply) = &reply {
            incoming(from, reply, from_state).unwrap();
        }
        if sent.is_none() && reply.is_none() {
            break;
        }
    }
    (whole_document, rejected)
}

#[test]
fn a_whole_document_in_a_sync_message_is_checked_change_by_change() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let by = editor("member-0");
    let (file, _) = a.create_health_file(&by, &resident("Whole")).unwrap();
    for k in 0..9 {
        a.apply_health_file(file, &by, &allergy(&format!("substance {k}")))
            .unwrap();
    }
    let (whole_document, rejected) = sync_directly(&a, &b, file, |_| {});
    assert!(whole_document, "automerge sent the changes one by one");
    assert_eq!(rejected, 0);
    assert_eq!(b.heads(file).unwrap(), a.heads(file).unwrap());
    assert_eq!(b.envelopes(file).unwrap().len(), 10);
}

/// Found by the island testnet: when the receiver holds the document already, automerge
/// sends the changes it lacks as a document chunk that builds on the receiver's changes and
/// does not load on its own. It was refused as malformed, and those changes never arrived.
#[test]
fn a_document_chunk_building_on_changes_the_receiver_holds_is_applied() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let by = editor("member-0");
    let (file, _) = a.create_health_file(&by, &resident("Partial")).unwrap();
    a.apply_health_file(file, &by, &allergy("first")).unwrap();
    let mut states = Default::default();
    sync_with_states(&a, &b, file, &mut states, |_| {});
    assert_eq!(b.envelopes(file).unwrap().len(), 2);
    for k in 0..9 {
        a.apply_health_file(file, &by, &allergy(&format!("later {k}")))
            .unwrap();
    }
    let (whole_document, rejected) = sync_with_states(&a, &b, file, &mut states, |_| {});
    assert!(whole_document, "automerge sent the changes one by one");
    assert_eq!(rejected, 0);
    assert_eq!(b.heads(file).unwrap(), a.heads(file).unwrap());
    assert_eq!(b.envelopes(file).unwrap().len(), 11);
    assert_eq!(b.pending_count().unwrap(), 0);
}

/// Found by the island testnet: a node holding changes that wait for their dependencies asks
/// for those dependencies by name, and automerge encodes a message's needs only in hash order
/// (out of order, a debug build panicked while serving the peer, and the document never
/// converged).
#[test]
fn a_node_asks_for_the_dependencies_its_held_changes_wait_on_in_hash_order() {
    use estuary_node::envelope::Envelope;
    use estuary_node::model::automerge::sync::{Message, State};
    use estuary_node::replica::Ingested;
    use estuary_node::sync::document::{incoming, outgoing};
    use estuary_node::sync::protocol::SYNC_MESSAGE_BYTES_MAX;
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let by = editor("member-0");
    let (file, _) = a.create_health_file(&by, &resident("Gaps")).unwrap();
    for k in 0..16 {
        a.apply_health_file(file, &by, &allergy(&format!("substance {k}")))
            .unwrap();
    }
    // One author's chain in order; `b` receives the creation and every other change after it.
    let mut chain: Vec<_> = a
        .envelopes(file)
        .unwrap()
        .into_iter()
        .map(|bytes| (Envelope::verify(&bytes).unwrap(), bytes))
        .collect();
    chain.sort_by_key(|(envelope, _)| envelope.change.seq());
    let mut missing = Vec::new();
    for (k, (envelope, bytes)) in chain.iter().enumerate() {
        if k % 2 == 1 {
            missing.push(envelope.hash);
            continue;
        }
        let decision = b.ingest(bytes).unwrap();
        assert_eq!(
            matches!(decision, Ingested::Pending(_)),
            k > 0,
            "change {k}: {decision:?}"
        );
    }
    assert_eq!(missing.len(), 8);
    // `a` writes on (none of it reaches `b`) until its head sorts after one of those
    // dependencies, then says what it has: automerge's own need (that head) comes first.
    loop {
        a.apply_health_file(file, &by, &allergy("later")).unwrap();
        let heads = a.heads(file).unwrap();
        if missing.iter().any(|hash| *hash < heads[0]) {
            break;
        }
    }
    let mut b_state = State::new();
    let hello = outgoing(&a, file, &mut State::new(), SYNC_MESSAGE_BYTES_MAX)
        .unwrap()
        .expect("a first message");
    incoming(&b, &hello, &mut b_state).unwrap();
    let message = outgoing(&b, file, &mut b_state, SYNC_MESSAGE_BYTES_MAX)
        .unwrap()
        .expect("an answer");
    let need = Message::decode(&message.message).unwrap().need;
    assert!(need.is_sorted(), "needs out of hash order");
    for hash in missing.iter().chain(&a.heads(file).unwrap()) {
        assert!(
            need.contains(hash),
            "a dependency or the peer's head is not asked for"
        );
    }
}

#[test]
fn changes_in_a_sync_message_without_their_authors_signatures_are_refused() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let by = editor("member-0");
    let (file, _) = a.create_health_file(&by, &resident("Forged")).unwrap();
    a.apply_health_file(file, &by, &allergy("penicillin"))
        .unwrap();
    // Every signature altered.
    let (_, rejected) = sync_directly(&a, &b, file, |message| {
        for signature in &mut message.signatures {
            signature.signature[0] ^= 1;
        }
    });
    assert!(rejected >= 2, "{rejected}");
    assert!(b.catalogue().is_empty());
    // Signatures left out.
    let (_, rejected) = sync_directly(&a, &b, file, |message| message.signatures.clear());
    assert!(rejected >= 2, "{rejected}");
    assert!(b.catalogue().is_empty());
    // Not a sync message at all.
    let mut state = estuary_node::model::automerge::sync::State::new();
    let garbage = estuary_node::sync::protocol::SyncMessage {
        document: serde_bytes::ByteArray::new(*file.as_bytes()),
        message: serde_bytes::ByteBuf::from(b"garbage".to_vec()),
        signatures: vec![],
        first: true,
    };
    let error = estuary_node::sync::document::incoming(&b, &garbage, &mut state).unwrap_err();
    assert!(error.is_peers_fault(), "{error}");
}

/// automerge's version-2 sync messages carry several changes concatenated in one chunk. When
/// the sender's view of the receiver's changes (a Bloom filter) takes a change the receiver
/// lacks for one it holds, the sender leaves that change out and sends the ones that build on
/// it. Those are held pending, and the receiver asks for the one they wait on. Loaded onto the
/// receiver's document instead, they waited inside automerge, out of sight: the receiver
/// asked for the sender's heads, which the sender had sent in that session and did not send
/// again, and every later session met the same false positive. Islands of seven nodes were
/// left three acknowledged changes short of one document for good.
#[test]
fn changes_sent_in_one_chunk_over_a_missing_dependency_wait_for_it_and_ask_for_it() {
    use estuary_node::model::automerge::sync::{Message, State, SyncDoc};
    use estuary_node::sync::document::{incoming, outgoing};
    use estuary_node::sync::protocol::{SYNC_MESSAGE_BYTES_MAX, SyncMessage};
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let by = editor("member-0");
    // Keys, and so change hashes, differ from run to run: should the filter also falsely hold
    // the first of the two changes sent (about 1 in 100), A would send one change alone.
    let (file, lacked, later, hello) = (0..8)
        .find_map(|attempt| {
            let (file, _) = a
                .create_health_file(&by, &resident(&format!("Chunked {attempt}")))
                .unwrap();
            for k in 0..6 {
                a.apply_health_file(file, &by, &allergy(&format!("early {k}")))
                    .unwrap();
            }
            sync_directly(&a, &b, file, |_| {});
            assert_eq!(b.heads(file).unwrap(), a.heads(file).unwrap());
            let lacked = a.apply_health_file(file, &by, &allergy("lacked")).unwrap();
            let later = [
                a.apply_health_file(file, &by, &allergy("second")).unwrap(),
                a.apply_health_file(file, &by, &allergy("third")).unwrap(),
            ];
            // B opens a session with a filter that, falsely, holds `lacked`.
            let mut believed = b.sync_document(file).unwrap().unwrap();
            let mut held_by_a = a.sync_document(file).unwrap().unwrap();
            believed
                .apply_changes([held_by_a.get_change_by_hash(&lacked).unwrap().clone()])
                .unwrap();
            let hello = believed
                .sync()
                .generate_sync_message(&mut State::new())
                .unwrap();
            (!hello.have[0].bloom.contains_hash(&later[0])).then_some((file, lacked, later, hello))
        })
        .expect("a filter without a second false positive");
    let hello = SyncMessage {
        document: serde_bytes::ByteArray::new(*file.as_bytes()),
        message: serde_bytes::ByteBuf::from(hello.encode()),
        signatures: vec![],
        first: true,
    };
    let (mut a_state, mut b_state) = (State::new(), State::new());
    incoming(&a, &hello, &mut a_state).unwrap();
    let reply = outgoing(&a, file, &mut a_state, SYNC_MESSAGE_BYTES_MAX)
        .unwrap()
        .unwrap();
    let chunks: Vec<Vec<u8>> = Message::decode(&reply.message)
        .unwrap()
        .changes
        .iter()
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(chunks.len(), 1, "the two later changes in one chunk");
    assert_eq!(reply.signatures.len(), 2);

    let carried = incoming(&b, &reply, &mut b_state).unwrap();
    assert_eq!((carried.pending, carried.rejected), (2, 0), "{carried:?}");
    let ask = outgoing(&b, file, &mut b_state, SYNC_MESSAGE_BYTES_MAX)
        .unwrap()
        .unwrap();
    assert!(
        Message::decode(&ask.message)
            .unwrap()
            .need
            .contains(&lacked),
        "the change they wait on is asked for"
    );
    // The session goes on to agreement, the pending changes taken once it arrives.
    let mut next = Some(ask);
    for _ in 0..8 {
        let Some(message) = next.take() else { break };
        incoming(&a, &message, &mut a_state).unwrap();
        if let Some(reply) = outgoing(&a, file, &mut a_state, SYNC_MESSAGE_BYTES_MAX).unwrap() {
            incoming(&b, &reply, &mut b_state).unwrap();
            next = outgoing(&b, file, &mut b_state, SYNC_MESSAGE_BYTES_MAX).unwrap();
        }
    }
    assert_eq!(b.heads(file).unwrap(), vec![later[1]]);
    assert_eq!(b.heads(file).unwrap(), a.heads(file).unwrap());
    assert!(b.verify().unwrap().problems.is_empty());
}

/// Creation envelopes of `n` health files written by `node`'s key.
fn files_by(node: &Node, institution_id: &str, n: usize) -> Vec<Vec<u8>> {
    use estuary_node::envelope::Envelope;
    let actor = node.identity().actor();
    (0..n)
        .map(|i| {
            let file =
                HealthFile::create(&actor, &editor(institution_id), &resident(&format!("F{i}")))
                    .unwrap();
            let mut change = file.automerge().clone().get_changes(&[]).remove(0);
            Envelope::sign(node.identity(), file.id(), &mut change).encode()
        })
        .collect()
}

/// A node catching up thousands of documents does not reconcile again while its fetches move:
/// each reconciliation would find the same thousands of differences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_catching_up_does_not_reconcile_again_while_its_fetches_move() {
    let consortium = Consortium::new(3);
    let (a, b, c) = (consortium.node(0), consortium.node(1), consortium.node(2));
    let files = 5_000;
    for chunk in files_by(&a, "member-0", files).chunks(1_000) {
        a.ingest_many(chunk).unwrap();
        c.ingest_many(chunk).unwrap();
    }
    let (a_address, c_address) = (memory_address(), memory_address());
    // Reconciling every 50 ms with whichever peer it is not fetching from, B would find the
    // same thousands of differences again dozens of times during its catch-up.
    let config = |listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>| SyncConfig {
        listen,
        bootstrap,
        reconcile_every: Duration::from_millis(50),
        transport: TransportKind::Memory,
        ..SyncConfig::default()
    };
    let a_sync = SyncHandle::start(a.clone(), config(vec![a_address.clone()], vec![])).unwrap();
    let c_sync = SyncHandle::start(c.clone(), config(vec![c_address.clone()], vec![])).unwrap();
    let started = Instant::now();
    let b_sync = SyncHandle::start(
        b.clone(),
        config(vec![memory_address()], vec![a_address, c_address]),
    )
    .unwrap();
    let nodes = [a.clone(), b.clone(), c.clone()];
    converge(&nodes, &[&a_sync, &b_sync, &c_sync], files).await;
    let took = started.elapsed();
    let stats = [a_sync.stats(), b_sync.stats(), c_sync.stats()];
    let reconcile_bytes: u64 = stats.iter().map(|s| s.sent.reconcile).sum();
    println!(
        "caught up {files} documents in {took:?}: {} reconciliations, {reconcile_bytes} bytes",
        stats[1].reconciliations
    );
    // One reconciliation finds them all (about 60 bytes each); the last few hundred
    // documents let reconciliations start again, each finding at most those.
    assert!(
        reconcile_bytes < files as u64 * 400,
        "{reconcile_bytes} bytes of reconciliation for {files} documents, {} reconciliations in {took:?}",
        stats[1].reconciliations
    );
    a_sync.shutdown().await;
    b_sync.shutdown().await;
    c_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_holding_the_same_10000_documents_confirm_it_in_at_most_3_round_trips() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let envelopes = files_by(&a, "member-0", 10_000);
    for chunk in envelopes.chunks(2_000) {
        a.ingest_many(chunk).unwrap();
        b.ingest_many(chunk).unwrap();
    }
    assert_eq!(*a.catalogue(), *b.catalogue());
    let a_address = memory_address();
    let config = |listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>| SyncConfig {
        listen,
        bootstrap,
        // Only the reconciliation at start is measured.
        reconcile_every: Duration::from_secs(3_600),
        transport: TransportKind::Memory,
        ..SyncConfig::default()
    };
    let a_sync = SyncHandle::start(a.clone(), config(vec![a_address.clone()], vec![])).unwrap();
    let b_sync =
        SyncHandle::start(b.clone(), config(vec![memory_address()], vec![a_address])).unwrap();
    let started = Instant::now();
    let (round_trips, bytes, lag) = loop {
        // Connected now: reconcile.
        b_sync.reconcile_now().await.unwrap();
        let stats = b_sync.stats();
        if let Some(peer) = stats.peers.get(&a_sync.peer_id().to_string())
            && let (Some(round_trips), Some(bytes), Some(lag)) = (
                peer.last_round_trips,
                peer.last_reconciliation_bytes,
                peer.lag,
            )
        {
            break (round_trips, bytes, lag);
        }
        assert!(
            started.elapsed() < CONVERGENCE,
            "no reconciliation: {stats:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("in-sync check of 10,000 documents: {round_trips} round trip(s), {bytes} bytes");
    assert_eq!(lag, 0);
    assert!(round_trips <= 3, "{round_trips} round trips");
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_changes_are_quarantined_strangers_changes_held_and_neither_forwarded() {
    use futures::StreamExt;

    let consortium = Consortium::new(3);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let a_address = memory_address();
    let a_sync = start(&a, &a_address, vec![]);
    let b_sync = start(&b, &memory_address(), vec![a_address.clone()]);
    // Member 2's node is faulty: it gossips a forgery of one of B's changes and a change
    // signed by a key outside the roster.
    let genuine = files_by(&b, "member-1", 1).remove(0);
    let mut forged = estuary_node::envelope::Envelope::decode(&genuine).unwrap();
    forged.signature[5] ^= 0x40;
    let stranger_node = Identity::from_secret([42; 32]);
    let strangers = {
        let file = HealthFile::create(&stranger_node.actor(), &editor("member-0"), &resident("S"))
            .unwrap();
        let mut change = file.automerge().clone().get_changes(&[]).remove(0);
        estuary_node::envelope::Envelope::sign(&stranger_node, file.id(), &mut change).encode()
    };
    let bad = [forged.encode(), strangers];
    let (mut faulty, topic) = faulty_member(&consortium, "member-2");
    faulty.dial(a_address).unwrap();
    // Honest writes on both sides meanwhile.
    a.create_health_file(&editor("member-0"), &resident("Honest A"))
        .unwrap();
    b.create_health_file(&editor("member-1"), &resident("Honest B"))
        .unwrap();
    let started = Instant::now();
    let mut published = [false, false];
    while a.quarantine().unwrap().is_empty() || a.pending_count().unwrap() == 0 {
        assert!(
            started.elapsed() < CONVERGENCE,
            "A never received the bad changes"
        );
        tokio::select! {
            _ = faulty.select_next_some() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                for (i, envelope) in bad.iter().enumerate() {
                    if !published[i] {
                        let gossip = estuary_node::sync::protocol::Gossip::Change(
                            envelope.clone().into(),
                        );
                        published[i] = faulty
                            .behaviour_mut()
                            .publish(topic.clone(), gossip.encode())
                            .is_ok();
                    }
                }
            }
        }
    }
    let reasons: Vec<String> = a
        .quarantine()
        .unwrap()
        .into_iter()
        .map(|q| q.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("signature")),
        "{reasons:?}"
    );
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    // The stranger's change is held until a roster names its author (a newer roster may),
    // never applied, and never counted against the member that relayed it.
    assert_eq!(a.pending_count().unwrap(), 1);
    // The honest nodes converge; B never saw the bad changes (A did not pass them on), and
    // B's genuine change was not blocked by its forgery.
    b.ingest(&genuine).unwrap();
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], 3).await;
    assert!(b.quarantine().unwrap().is_empty());
    assert_eq!(b.pending_count().unwrap(), 0);
    let a_stats = a_sync.stats();
    let faulty_peer = a_stats
        .peers
        .values()
        .find(|p| p.institution.as_deref() == Some("member-2"))
        .unwrap();
    assert_eq!(faulty_peer.changes_rejected, 1, "{faulty_peer:?}");
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_large_to_gossip_is_announced_and_pulled() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let a_address = memory_address();
    // Every envelope counts as too large; reconciliation waits an hour, so only the
    // announcement can bring the change across.
    let config = |listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>| SyncConfig {
        listen,
        bootstrap,
        reconcile_every: Duration::from_secs(3_600),
        gossip_envelope_bytes_max: 0,
        transport: TransportKind::Memory,
        ..SyncConfig::default()
    };
    let a_sync = SyncHandle::start(a.clone(), config(vec![a_address.clone()], vec![])).unwrap();
    let b_sync =
        SyncHandle::start(b.clone(), config(vec![memory_address()], vec![a_address])).unwrap();
    let started = Instant::now();
    while a_sync.connected().await.unwrap().is_empty() {
        assert!(started.elapsed() < CONVERGENCE, "never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the mesh form and the first (empty) reconciliation pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.create_health_file(&editor("member-0"), &resident("Announced"))
        .unwrap();
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], 1).await;
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_too_large_to_sync_by_messages_is_fetched_from_either_side() {
    let consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let a_address = memory_address();
    // Every change is announced, not carried, and reconciliation waits an hour: only the
    // announcements' sync sessions can bring changes across. B sends no sync message at all
    // (each is too large for it), so it must fetch what A announces, and A, refused by B's
    // answer, must fetch what B announces.
    let config =
        |listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>, sync_bytes: usize| SyncConfig {
            listen,
            bootstrap,
            reconcile_every: Duration::from_secs(3_600),
            gossip_envelope_bytes_max: 0,
            sync_message_bytes_max: sync_bytes,
            transport: TransportKind::Memory,
            ..SyncConfig::default()
        };
    let a_sync = SyncHandle::start(
        a.clone(),
        config(vec![a_address.clone()], vec![], usize::MAX),
    )
    .unwrap();
    let b_sync = SyncHandle::start(
        b.clone(),
        config(vec![memory_address()], vec![a_address], 0),
    )
    .unwrap();
    let started = Instant::now();
    while a_sync.connected().await.unwrap().is_empty() {
        assert!(started.elapsed() < CONVERGENCE, "never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the mesh form and the first (empty) reconciliation pass.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let file = a
        .create_health_file(&editor("member-0"), &resident("Fetched"))
        .unwrap()
        .0;
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], 1).await;
    // A holds the file, so it syncs what B announces; B refuses to answer by messages.
    b.apply_health_file(file, &editor("member-1"), &allergy("latex"))
        .unwrap();
    converge(&[a.clone(), b.clone()], &[&a_sync, &b_sync], 1).await;
    assert_eq!(a.heads(file).unwrap(), b.heads(file).unwrap());
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

//! Erasure on legal order: the authority orders a health file erased in the roster; every
//! node deletes it and its resident's referrals, and a node that was offline meanwhile, back
//! with the old changes, cannot bring them back.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use estuary_node::audit::AuditAction;
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::replica::{IngestError, Node, NodeError};

/// Orders `document` erased in the consortium's roster; returns the signed roster.
fn erase(consortium: &mut Consortium, document: DocumentId) -> Vec<u8> {
    consortium
        .document
        .apply(
            &editor("xinhua"),
            &RosterOp::Erase {
                document,
                order: "court order 2026-117".into(),
            },
        )
        .unwrap();
    SignedRoster::sign(&Identity::from_secret(AUTHORITY), &mut consortium.document).encode()
}

/// A referral of `patient` from member-1 to member-0.
fn referral_of(patient: DocumentId, reason: &str) -> NewReferral {
    NewReferral {
        patient,
        direction: Direction::Up,
        to: institution("member-0"),
        reason: reason.into(),
        urgency: Urgency::Routine,
        handover: String::new(),
    }
}

/// Waits until `done` holds, failing after `CONVERGENCE`.
async fn until(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < CONVERGENCE, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn erased_everything_of(node: &Node, documents: &[DocumentId]) -> bool {
    documents.iter().all(|document| {
        node.is_erased(document).unwrap()
            && node.catalogue().get(document.as_bytes()).is_none()
            && matches!(
                node.envelopes(*document),
                Ok(envelopes) if envelopes.is_empty()
            )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_file_is_gone_everywhere_and_a_node_back_from_offline_cannot_bring_it_back() {
    let mut consortium = Consortium::new(3);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let c = consortium.node(2);
    let (a_address, b_address, c_address) = (memory_address(), memory_address(), memory_address());
    let a_sync = start(&a, &a_address, vec![]);
    let b_sync = start(&b, &b_address, vec![a_address.clone()]);
    let c_sync = start(&c, &c_address, vec![a_address.clone()]);

    let (file, _) = a
        .create_health_file(&editor("member-0"), &resident("Jianguo"))
        .unwrap();
    a.apply_health_file(file, &editor("member-0"), &allergy("penicillin"))
        .unwrap();
    let (kept, _) = a
        .create_health_file(&editor("member-0"), &resident("Meilan"))
        .unwrap();
    converge(
        &[a.clone(), b.clone(), c.clone()],
        &[&a_sync, &b_sync, &c_sync],
        2,
    )
    .await;
    let (referral, _) = b
        .create_referral(&editor("member-1"), &referral_of(file, "chest pain"))
        .unwrap();
    converge(
        &[a.clone(), b.clone(), c.clone()],
        &[&a_sync, &b_sync, &c_sync],
        3,
    )
    .await;
    // The old changes, as a node that kept them would offer them: their author holds each
    // with its signature (member-2 took the file whole, one signature vouching for both).
    let old_envelopes = a.envelopes(file).unwrap();
    assert_eq!(old_envelopes.len(), 2);

    // The node of member-2 goes offline, holding the file and the referral.
    c_sync.shutdown().await;
    drop(c);

    let signed = erase(&mut consortium, file);
    a.update_roster(&signed).unwrap();
    let gone = [file, referral];
    assert!(erased_everything_of(&a, &gone));
    until("member-1's erasure", || erased_everything_of(&b, &gone)).await;
    for node in [&a, &b] {
        assert!(matches!(
            node.health_file(file),
            Err(NodeError::UnknownDocument(_))
        ));
        // Another resident's file is untouched.
        assert!(node.health_file(kept).is_ok());
        assert!(node.search_by_name("lu jianguo").unwrap().is_empty());
        let record = node.erasure_of(&file).unwrap().unwrap();
        assert_eq!(record.order, "court order 2026-117");
        assert_eq!(node.erasure_of(&referral).unwrap().unwrap().file, file);
        let erasures: Vec<DocumentId> = node
            .audit(1, 10_000)
            .unwrap()
            .into_iter()
            .filter(|r| r.action == AuditAction::Erased)
            .map(|r| r.document)
            .collect();
        assert_eq!(erasures.len(), 2, "one audit record per document erased");
        assert!(erasures.contains(&file) && erasures.contains(&referral));
        assert!(node.verify().unwrap().problems.is_empty());
    }
    // An old change sent again is refused and not kept.
    for envelope in &old_envelopes {
        assert!(matches!(
            a.ingest(envelope),
            Err(IngestError::Erased { document }) if document == file
        ));
    }
    assert!(a.envelopes(file).unwrap().is_empty());
    assert_eq!(a.pending_count().unwrap(), 0);
    assert_eq!(a.quarantine_count(), 0);

    // The node comes back with its old roster and the old changes: it learns of the order
    // from its peers and erases them too, and no one takes them back meanwhile.
    let c = Arc::new(
        Node::open(
            &estuary_node::replica::NodeConfig {
                data_dir: consortium.dir.path().join("member-2"),
                authority: Identity::from_secret(AUTHORITY).public_key(),
                store_engine: Default::default(),
            },
            None,
        )
        .unwrap(),
    );
    assert!(
        c.health_file(file).is_ok(),
        "it kept the file while offline"
    );
    let c_sync = start(
        &c,
        &memory_address(),
        vec![a_address.clone(), b_address.clone()],
    );
    until("member-2's erasure", || erased_everything_of(&c, &gone)).await;
    // Several reconciliations later, nobody holds the file again.
    c_sync.reconcile_now().await.unwrap();
    a_sync.reconcile_now().await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in [&a, &b, &c] {
        assert!(erased_everything_of(node, &gone));
        assert_eq!(node.catalogue().len(), 1);
    }
    for handle in [a_sync, b_sync, c_sync] {
        handle.shutdown().await;
    }
}

#[test]
fn a_referral_of_an_erased_resident_written_elsewhere_is_refused_and_not_kept() {
    let mut consortium = Consortium::new(2);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let (file, _) = a
        .create_health_file(&editor("member-0"), &resident("Jianguo"))
        .unwrap();
    for envelope in a.envelopes(file).unwrap() {
        b.ingest(&envelope).unwrap();
    }
    // member-1 refers the resident before it learns of the order.
    let (referral, _) = b
        .create_referral(&editor("member-1"), &referral_of(file, "chest pain"))
        .unwrap();
    let signed = erase(&mut consortium, file);
    a.update_roster(&signed).unwrap();
    for envelope in b.envelopes(referral).unwrap() {
        assert!(matches!(
            a.ingest(&envelope),
            Err(IngestError::Erased { document }) if document == referral
        ));
    }
    assert!(a.is_erased(&referral).unwrap());
    assert!(a.envelopes(referral).unwrap().is_empty());
    // A new referral of the resident is refused at its own node too, once it knows.
    b.update_roster(&signed).unwrap();
    assert!(b.is_erased(&referral).unwrap());
    let refused = b.create_referral(&editor("member-1"), &referral_of(file, "follow-up"));
    assert!(
        matches!(refused, Err(NodeError::Ingest(IngestError::Erased { .. }))),
        "{refused:?}"
    );
}

/// A courier's bundle carries its exporter's roster, adopted before its envelopes (as
/// `estuary import` offers it): a node reached only by courier erases what the authority
/// ordered erased before anything in the bundle is decided.
#[test]
fn a_bundle_carries_the_erasure_to_a_node_reached_only_by_courier() {
    let mut consortium = Consortium::new(2);
    let (a, c) = (consortium.node(0), consortium.node(1));
    let writer = editor("member-0");
    let (file, _) = a.create_health_file(&writer, &resident("Jianguo")).unwrap();
    let (kept, _) = a.create_health_file(&writer, &resident("Guilan")).unwrap();
    for document in [file, kept] {
        for envelope in a.envelopes(document).unwrap() {
            c.ingest(&envelope).unwrap();
        }
    }
    let signed = erase(&mut consortium, file);
    a.update_roster(&signed).unwrap();
    let mut bundle = Vec::new();
    estuary_node::bundle::export(&a, &mut bundle, |_, _| {}).unwrap();

    let mut reader = estuary_node::bundle::BundleReader::open(bundle.as_slice()).unwrap();
    let roster = reader
        .header()
        .roster
        .clone()
        .expect("the bundle carries its exporter's roster");
    assert_eq!(
        c.update_roster(&roster).unwrap().version(),
        a.roster_version()
    );
    assert!(erased_everything_of(&c, &[file]));
    let mut documents = 0;
    while let Some(item) = reader.next_item().unwrap() {
        let estuary_node::bundle::BundleItem::Document(document) = item else {
            panic!("a bundle of this release carries documents");
        };
        let document: estuary_node::sync::protocol::CoveredDocument =
            ciborium::from_reader(document.as_slice()).unwrap();
        assert_eq!(DocumentId::from_bytes(*document.document), kept);
        let carried = estuary_node::sync::document::ingest_covered(&c, &[document])
            .and_then(|taken| taken.durable(&c))
            .unwrap();
        assert_eq!(carried.accepted + carried.rejected, 0, "{carried:?}");
        documents += 1;
    }
    assert_eq!(documents, 1, "only the file not erased travels");
    assert_eq!(c.heads(kept).unwrap(), a.heads(kept).unwrap());
    assert!(erased_everything_of(&c, &[file]));
}

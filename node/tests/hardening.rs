//! What a member (or a fault) must not be able to do to honest replicas: condemn a genuine
//! change by sending a copy of it into another document, split a document by reusing a node
//! key after store loss, push other members' held changes out, fill the disk with quarantine,
//! or leave an app's write on record without its writer.

mod common;

use common::*;
use estuary_node::audit::AuditAction;
use estuary_node::bundle::{BundleItem, BundleReader, export};
use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::*;
use estuary_node::replica::{Ingested, Node, PENDING_CHANGES_PER_AUTHOR_MAX};

/// The envelopes of `id` as `node` holds them, creation first.
fn causal_envelopes(node: &Node, id: DocumentId) -> Vec<Vec<u8>> {
    let mut envelopes = node.envelopes(id).unwrap();
    envelopes.sort_by_key(|e| !Envelope::verify(e).unwrap().change.deps().is_empty());
    envelopes
}

/// `envelope`'s change signed again by its own author for document `into`: a valid
/// signature, the wrong document.
fn sent_into(author: &Identity, envelope: &[u8], into: DocumentId) -> Vec<u8> {
    let mut change = Envelope::verify(envelope).unwrap().change;
    Envelope::sign(author, into, &mut change).encode()
}

fn key_of(consortium: &Consortium, member: &str) -> Identity {
    Identity::load_or_create(&consortium.dir.path().join(member)).unwrap()
}

#[test]
fn a_change_sent_into_another_document_never_condemns_the_genuine_one() {
    let consortium = Consortium::new(3);
    let (author, first, second) = (consortium.node(0), consortium.node(1), consortium.node(2));
    let member = editor("member-0");
    let (id, creation) = author.create_health_file(&member, &resident("A")).unwrap();
    let follow_up = author
        .apply_health_file(id, &member, &allergy("penicillin"))
        .unwrap();
    let genuine = causal_envelopes(&author, id);
    assert_eq!(Envelope::verify(&genuine[0]).unwrap().hash, creation);
    let elsewhere = DocumentId::from_bytes([7; 16]);
    let key = key_of(&consortium, "member-0");
    let replayed: Vec<Vec<u8>> = genuine
        .iter()
        .map(|e| sent_into(&key, e, elsewhere))
        .collect();

    // The copies first, then the genuine changes.
    for envelope in &replayed {
        assert!(matches!(
            first.ingest(envelope).unwrap(),
            Ingested::Quarantined(..)
        ));
    }
    for envelope in &genuine {
        assert!(matches!(
            first.ingest(envelope).unwrap(),
            Ingested::Accepted(_)
        ));
    }
    // The creation, then the copies, then the change built on the creation.
    assert!(matches!(
        second.ingest(&genuine[0]).unwrap(),
        Ingested::Accepted(_)
    ));
    for envelope in &replayed {
        assert!(matches!(
            second.ingest(envelope).unwrap(),
            Ingested::Quarantined(..)
        ));
    }
    assert!(matches!(
        second.ingest(&genuine[1]).unwrap(),
        Ingested::Accepted(hash) if hash == follow_up
    ));

    let heads = author.heads(id).unwrap();
    for node in [&first, &second] {
        assert_eq!(node.heads(id).unwrap(), heads);
        assert_eq!(
            node.health_file(id).unwrap(),
            author.health_file(id).unwrap()
        );
        let mut quarantined: Vec<(DocumentId, [u8; 32])> = node
            .quarantine()
            .unwrap()
            .into_iter()
            .map(|q| (q.document, q.change))
            .collect();
        quarantined.sort();
        let mut expected: Vec<(DocumentId, [u8; 32])> = genuine
            .iter()
            .map(|e| (elsewhere, Envelope::verify(e).unwrap().hash.0))
            .collect();
        expected.sort();
        assert_eq!(quarantined, expected, "only the copies are in quarantine");
    }
}

#[test]
fn a_node_restored_from_an_older_bundle_writes_without_splitting_documents() {
    let consortium = Consortium::new(2);
    let data_dir = consortium.dir.path().join("member-0");
    let member = editor("member-0");
    let (id, bundle) = {
        let a = consortium.node(0);
        let (id, _) = a.create_health_file(&member, &resident("A")).unwrap();
        a.apply_health_file(id, &member, &allergy("penicillin"))
            .unwrap();
        let mut bundle = Vec::new();
        export(&a, &mut bundle, |_, _| {}).unwrap();
        // Acknowledged after the bundle, and passed on to a peer before the store is lost.
        a.apply_health_file(id, &member, &allergy("aspirin"))
            .unwrap();
        a.apply_health_file(id, &member, &allergy("latex")).unwrap();
        let b = consortium.node(1);
        for outcome in b.ingest_many(&causal_envelopes(&a, id)).unwrap() {
            assert!(matches!(outcome.unwrap(), Ingested::Accepted(_)));
        }
        (id, bundle)
    };
    // The store and its witness are lost; the key stays; the store is restored from the
    // older bundle, so nothing here can tell that anything is missing.
    std::fs::remove_dir_all(data_dir.join("store")).unwrap();
    for entry in std::fs::read_dir(&data_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().unwrap() != "node.key" {
            std::fs::remove_file(path).unwrap();
        }
    }
    let a = consortium.node(0);
    let mut reader = BundleReader::open(&bundle[..]).unwrap();
    while let Some(item) = reader.next_item().unwrap() {
        let BundleItem::Document(document) = item else {
            panic!("a bundle of this release carries documents");
        };
        let document = ciborium::from_reader(document.as_slice()).unwrap();
        let carried = estuary_node::sync::document::ingest_covered(&a, &[document])
            .and_then(|taken| taken.durable(&a))
            .unwrap();
        assert_eq!(carried.accepted, 2, "{carried:?}");
    }
    assert_eq!(a.change_hashes(id).unwrap().len(), 2);
    let written = a
        .apply_health_file(id, &member, &allergy("iodine"))
        .unwrap();

    // Both ways, as anti-entropy would: the document must not split.
    let b = consortium.node(1);
    for outcome in b.ingest_many(&causal_envelopes(&a, id)).unwrap() {
        let outcome = outcome.unwrap();
        assert!(
            matches!(outcome, Ingested::Accepted(_) | Ingested::Duplicate(_)),
            "{outcome:?}"
        );
    }
    for outcome in a.ingest_many(&causal_envelopes(&b, id)).unwrap() {
        let outcome = outcome.unwrap();
        assert!(
            matches!(outcome, Ingested::Accepted(_) | Ingested::Duplicate(_)),
            "{outcome:?}"
        );
    }
    assert_eq!(a.heads(id).unwrap(), b.heads(id).unwrap());
    assert!(b.has_change(id, &written).unwrap());
    assert_eq!(a.health_file(id).unwrap().allergies.len(), 4);
    assert!(a.quarantine().unwrap().is_empty() && b.quarantine().unwrap().is_empty());
    assert_ne!(
        a.actor().as_bytes(),
        key_of(&consortium, "member-0").public_key().0
    );
}

#[test]
fn one_members_held_changes_never_push_out_anothers() {
    let consortium = Consortium::new(3);
    let node = consortium.node(2);
    // Member 0 sends a long chain without its first change: every change waits.
    let flooder = key_of(&consortium, "member-0");
    let mut file = HealthFile::create(
        &Actor::from_bytes(flooder.public_key().0.to_vec()),
        &editor("member-0"),
        &resident("Flood"),
    )
    .unwrap();
    // The creation is never sent.
    let mut heads: Vec<ChangeHash> = file.heads();
    let mut chain = Vec::new();
    for n in 0..PENDING_CHANGES_PER_AUTHOR_MAX + 10 {
        file.apply(
            &editor("member-0"),
            &HealthFileOp::SetDemographic(DemographicField::Phone(format!("+86 {n}"))),
        )
        .unwrap();
        let mut change = file.changes_since(&heads).remove(0);
        heads = file.heads();
        chain.push(Envelope::sign(&flooder, file.id(), &mut change).encode());
    }
    // Member 1's one change that waits for its dependency, held first.
    let other = key_of(&consortium, "member-1");
    let mut theirs = HealthFile::create(
        &Actor::from_bytes(other.public_key().0.to_vec()),
        &editor("member-1"),
        &resident("Other"),
    )
    .unwrap();
    let creation = {
        let mut change = theirs.changes_since(&[]).remove(0);
        Envelope::sign(&other, theirs.id(), &mut change).encode()
    };
    let before = theirs.heads();
    theirs
        .apply(&editor("member-1"), &allergy("penicillin"))
        .unwrap();
    let waiting = {
        let mut change = theirs.changes_since(&before).remove(0);
        Envelope::sign(&other, theirs.id(), &mut change).encode()
    };
    assert!(matches!(
        node.ingest(&waiting).unwrap(),
        Ingested::Pending(_)
    ));
    for outcome in node.ingest_many(&chain).unwrap() {
        assert!(matches!(outcome.unwrap(), Ingested::Pending(_)));
    }
    assert_eq!(
        node.pending_count().unwrap(),
        PENDING_CHANGES_PER_AUTHOR_MAX + 1,
        "member 0 holds its share, member 1 its change"
    );
    let held: Vec<[u8; 32]> = node.pending().unwrap().iter().map(|p| p.change).collect();
    let oldest = Envelope::verify(&chain[0]).unwrap().hash;
    assert!(!held.contains(&oldest.0), "member 0's oldest went first");
    assert_eq!(node.missing_dependencies(theirs.id()).unwrap().len(), 1);
    // Member 1's change is decided when its dependency arrives.
    node.ingest(&creation).unwrap();
    assert_eq!(node.health_file(theirs.id()).unwrap().allergies.len(), 1);
    assert_eq!(
        node.pending_count().unwrap(),
        PENDING_CHANGES_PER_AUTHOR_MAX
    );
}

#[test]
fn the_quarantine_pages_and_purges_and_the_purge_is_audited() {
    let consortium = Consortium::new(2);
    let node = consortium.node(1);
    let author = consortium.node(0);
    let key = key_of(&consortium, "member-0");
    let mut copies = Vec::new();
    for n in 0..5u8 {
        let (id, _) = author
            .create_health_file(&editor("member-0"), &resident(&format!("Q{n}")))
            .unwrap();
        let envelope = author.envelopes(id).unwrap().remove(0);
        copies.push(sent_into(&key, &envelope, DocumentId::from_bytes([n; 16])));
        let mut forged = Envelope::decode(&envelope).unwrap();
        forged.signature[0] ^= 1;
        copies.push(forged.encode());
    }
    for copy in &copies {
        assert!(matches!(
            node.ingest(copy).unwrap(),
            Ingested::Quarantined(..)
        ));
    }
    let all = node.quarantine().unwrap();
    assert_eq!(all.len(), 10);
    assert!(all.iter().all(|q| q.envelope_kept && q.envelope_bytes > 0));
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = node.quarantine_page(after.as_deref(), 3).unwrap();
        assert!(page.entries.len() <= 3);
        paged.extend(page.entries);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, all);
    assert!(node.quarantine_page(Some("zz"), 3).is_err());
    // One change's records: its copy in another document and the forgery claiming it.
    let claimed = Envelope::verify(&copies[0]).unwrap().hash;
    let records = node.quarantined_change(&claimed).unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| r.change == claimed.0));

    let sequence = node.audit_sequence();
    assert_eq!(node.purge_quarantine(None).unwrap(), 10);
    assert!(node.quarantine().unwrap().is_empty());
    assert_eq!(node.quarantine_count(), 0);
    let purge = node.audit(sequence + 1, 10).unwrap();
    assert!(
        purge
            .iter()
            .any(|r| r.action == AuditAction::QuarantinePurged)
    );
    // A purged change that comes again is judged again.
    assert!(matches!(
        node.ingest(&copies[0]).unwrap(),
        Ingested::Quarantined(..)
    ));
    assert_eq!(node.quarantine_count(), 1);
}

#[test]
fn an_apps_write_and_its_writer_are_recorded_together() {
    let consortium = Consortium::new(1);
    let node = consortium.node(0);
    let writer = node.writer(Some("emr"));
    let (id, created) = writer
        .create_health_file(&editor("member-0"), &resident("W"))
        .unwrap();
    let changed = writer
        .apply_health_file(id, &editor("member-0"), &allergy("penicillin"))
        .unwrap();
    let records = node.audit(1, 100).unwrap();
    for change in [created, changed] {
        let at = records
            .iter()
            .position(|r| r.action == AuditAction::Accepted && r.change == Some(change.0))
            .unwrap();
        let written = &records[at + 1];
        assert_eq!(written.action, AuditAction::Written);
        assert_eq!(written.change, Some(change.0));
        assert_eq!(written.app.as_deref(), Some("emr"));
    }
    assert!(node.verify_audit().is_none());
}

#[test]
fn the_incarnation_is_kept_across_restarts_and_drawn_anew_after_a_loss() {
    let consortium = Consortium::new(1);
    let member = editor("member-0");
    let first = {
        let node = consortium.node(0);
        node.create_health_file(&member, &resident("I")).unwrap();
        node.actor().clone()
    };
    // An ordinary restart: the same actor, so a registration sent again is the same change.
    let again = consortium.node(0);
    assert_eq!(again.actor(), &first);
    let (_, repeated) = again.create_health_file(&member, &resident("J")).unwrap();
    assert_eq!(
        again.create_health_file(&member, &resident("J")).unwrap().1,
        repeated
    );
    drop(again);
    // The store loses acknowledged changes (its count goes back; the witness outside it does
    // not): the node must not write as the actor whose sequence numbers peers may hold.
    {
        let db = open_stopped_store(&consortium.dir.path().join("member-0/store"));
        db.insert(b"m/accepted", 0u64.to_be_bytes().to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let after_loss = consortium.node(0);
    assert_ne!(after_loss.actor(), &first);
    assert_eq!(
        &after_loss.actor().as_bytes()[..32],
        &first.as_bytes()[..32]
    );
}

#[test]
fn shares_are_counted_again_at_open_and_a_purge_can_keep_the_recent() {
    let consortium = Consortium::new(2);
    let key = key_of(&consortium, "member-0");
    let mut file = HealthFile::create(
        &Actor::from_bytes(key.public_key().0.to_vec()),
        &editor("member-0"),
        &resident("S"),
    )
    .unwrap();
    let mut heads = file.heads();
    let mut chain = Vec::new();
    for n in 0..20 {
        file.apply(&editor("member-0"), &allergy(&format!("a{n}")))
            .unwrap();
        let mut change = file.changes_since(&heads).remove(0);
        heads = file.heads();
        chain.push(Envelope::sign(&key, file.id(), &mut change).encode());
    }
    let held = {
        let node = consortium.node(1);
        node.ingest_many(&chain).unwrap();
        let copy = sent_into(&key, &chain[0], DocumentId::from_bytes([3; 16]));
        assert!(matches!(node.ingest(&copy).unwrap(), Ingested::Pending(_)));
        node.pending().unwrap()
    };
    assert_eq!(held.len(), 21);
    // Waiting for dependencies, nothing is decided again at open: the count comes from the
    // order keys alone.
    let node = consortium.node(1);
    assert_eq!(node.pending_count().unwrap(), 21);
    assert_eq!(node.pending().unwrap(), held);

    let forged = {
        let mut forged = Envelope::decode(&chain[1]).unwrap();
        forged.signature[0] ^= 1;
        forged.encode()
    };
    assert!(matches!(
        node.ingest(&forged).unwrap(),
        Ingested::Quarantined(..)
    ));
    let at = node.quarantine().unwrap()[0].at_ms;
    assert!(at > 0);
    assert_eq!(
        node.purge_quarantine(Some(at)).unwrap(),
        0,
        "kept: not older"
    );
    assert_eq!(node.purge_quarantine(Some(at + 1)).unwrap(), 1);
    assert!(node.quarantine().unwrap().is_empty());
}

/// Records appended in one batch are stored as one run: each reads back from any place in
/// it, in order, holding the hash of the one before; a record altered inside a run breaks the
/// chain, as an altered record on its own does.
#[test]
fn records_of_one_batch_read_back_from_any_place_and_an_altered_one_breaks_the_chain() {
    let consortium = Consortium::new(1);
    let (before, head) = {
        let node = consortium.node(0);
        let (file, _) = node
            .create_health_file(&editor("member-0"), &resident("A"))
            .unwrap();
        let before = node.audit_sequence();
        let reads: Vec<_> = (0..6).map(|_| (file, None)).collect();
        node.record_access("emr", &reads).unwrap();
        node.create_health_file(&editor("member-0"), &resident("B"))
            .unwrap();
        let seven = node.audit_sequence();
        assert_eq!(seven, before + 7);
        let all = node.audit(1, 1_000).unwrap();
        assert_eq!(all.len() as u64, seven);
        for (n, record) in all.iter().enumerate() {
            assert_eq!(record.sequence, n as u64 + 1);
            if n > 0 {
                assert_eq!(record.previous, all[n - 1].hash());
            }
        }
        // From the middle of the run, a few at a time.
        let middle = node.audit(before + 3, 2).unwrap();
        assert_eq!(
            middle,
            all[before as usize + 2..before as usize + 4].to_vec()
        );
        assert!(
            middle
                .iter()
                .all(|r| r.action == AuditAction::Read && r.app.as_deref() == Some("emr"))
        );
        assert!(node.verify_audit().is_none());
        // A batch of records past one run's bound keeps every one: its runs follow each other,
        // each under its last record's key.
        node.record_access("emr", &vec![(file, None); 300]).unwrap();
        let head = node.audit_sequence();
        assert_eq!(head, before + 307);
        let all = node.audit(1, 10_000).unwrap();
        assert_eq!(all.len() as u64, head);
        for (n, record) in all.iter().enumerate().skip(1) {
            assert_eq!(record.sequence, n as u64 + 1);
            assert_eq!(record.previous, all[n - 1].hash());
        }
        assert_eq!(node.audit(head - 1, 10).unwrap().len(), 2);
        assert!(node.verify_audit().is_none());
        (before, head)
    };
    {
        // The run is kept under its last record's key; its first record's app is altered.
        let db = open_stopped_store(&consortium.dir.path().join("member-0/store"));
        let key = [&[b'l'][..], &(before + 6).to_be_bytes()].concat();
        let mut run = db
            .get(&key)
            .unwrap()
            .expect("the run under its last record");
        let at = run
            .windows(3)
            .position(|w| w == b"emr")
            .expect("the app's name");
        run[at + 2] = b'q';
        db.insert(&key, run).unwrap();
        db.flush().unwrap();
    }
    let node = consortium.node(0);
    let records = node.audit(1, 1_000).unwrap();
    assert_eq!(records.len() as u64, head);
    assert_eq!(records[before as usize].app.as_deref(), Some("emq"));
    let problem = node.verify_audit().expect("the chain breaks");
    assert!(
        problem.what.contains("hash chain breaks"),
        "{}",
        problem.what
    );
}

/// The dashboard's audit check follows the log a stretch at a time: a sound log is checked
/// through its head in stretches, and a record missing from the middle or the end of the log
/// is a break, as the whole check finds it.
#[test]
fn the_audit_check_in_stretches_finds_a_record_missing_from_the_middle_or_the_end() {
    use estuary_node::audit::ChainCheck;
    for missing_last in [false, true] {
        let consortium = Consortium::new(1);
        let head = {
            let node = consortium.node(0);
            for name in ["A", "B", "C", "D"] {
                node.create_health_file(&editor("member-0"), &resident(name))
                    .unwrap();
            }
            let head = node.audit_sequence();
            assert!(head >= 4, "{head}");
            let mut check = ChainCheck::default();
            node.continue_audit_check(&mut check, 3).unwrap().unwrap();
            assert_eq!(check.checked(), 3);
            node.continue_audit_check(&mut check, 1_000)
                .unwrap()
                .unwrap();
            assert_eq!(check.checked(), head);
            head
        };
        let gone = if missing_last { head } else { 2 };
        {
            let db = open_stopped_store(&consortium.dir.path().join("member-0/store"));
            let key = [&[b'l'][..], &gone.to_be_bytes()].concat();
            assert!(db.remove(key).unwrap().is_some());
            db.flush().unwrap();
        }
        let node = consortium.node(0);
        let mut check = ChainCheck::default();
        let problem = node
            .continue_audit_check(&mut check, 1_000)
            .unwrap()
            .unwrap_err();
        assert!(
            problem.what.contains(&format!("record {gone}")),
            "{}",
            problem.what
        );
        assert_eq!(check.checked(), gone - 1);
        assert!(node.verify_audit().is_some());
    }
}

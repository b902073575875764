//! Compact authorship: one signature per author's latest change proves a whole document, and
//! every per-change guarantee still holds — a change in another's name, a signature replayed
//! into another document, an author's change no later change of theirs vouches for.

mod common;

use std::collections::HashMap;

use common::{Consortium, allergy, editor, resident};
use estuary_node::authorship::{AuthorshipError, authenticate, cover};
use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::model::automerge::{Change, ChangeHash};
use estuary_node::model::*;
use estuary_node::sync::document::{DocumentSyncError, fetch, ingest_covered, outgoing};
use estuary_node::sync::protocol::{CoveredDocument, SYNC_MESSAGE_BYTES_MAX};

/// A health file written by `a`, then `b`, then `a` again: three changes, in causal order.
fn written_by_two(a: &Identity, b: &Identity) -> (DocumentId, Vec<Change>) {
    let mut file =
        HealthFile::create(&a.actor(), &editor("chc-jianshe"), &resident("Two")).unwrap();
    let bytes = file.save();
    let mut by_b = HealthFile::load(&bytes, &b.actor()).unwrap();
    by_b.apply(&editor("xinhua"), &allergy("latex")).unwrap();
    let mut by_a = HealthFile::load(&by_b.save(), &a.actor()).unwrap();
    by_a.apply(&editor("chc-jianshe"), &allergy("aspirin"))
        .unwrap();
    let id = by_a.id();
    (id, by_a.changes_since(&[]))
}

/// Each change's signature by `identity`, by hash.
fn signed_by(
    identity: &Identity,
    id: DocumentId,
    changes: &[Change],
) -> HashMap<[u8; 32], [u8; 64]> {
    changes
        .iter()
        .map(|change| {
            let mut change = change.clone();
            let envelope = Envelope::sign(identity, id, &mut change);
            (change.hash().0, envelope.signature.try_into().unwrap())
        })
        .collect()
}

#[test]
fn each_authors_latest_signature_proves_the_whole_document() {
    let (a, b) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    );
    let (id, changes) = written_by_two(&a, &b);
    assert_eq!(changes.len(), 3);
    let mut signatures = signed_by(&a, id, &changes[2..]);
    signatures.extend(signed_by(&b, id, &changes[1..2]));
    let proven = authenticate(&id, &changes, &signatures).unwrap();
    assert_eq!(proven[0].author, a.public_key());
    assert_eq!(
        proven[0].signature, None,
        "a's later change vouches for its first"
    );
    assert!(proven[1].signature.is_some() && proven[2].signature.is_some());
    let mut covered: Vec<ChangeHash> = cover(&changes).into_iter().map(|(h, _)| h).collect();
    covered.sort();
    let mut expected = vec![changes[1].hash(), changes[2].hash()];
    expected.sort();
    assert_eq!(covered, expected);
}

#[test]
fn a_signature_by_one_author_never_vouches_for_another_authors_change() {
    let (a, b) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    );
    let (id, changes) = written_by_two(&a, &b);
    // Only a's latest signed: b's change below it is not proven by a's signature.
    let signatures = signed_by(&a, id, &changes[2..]);
    assert_eq!(
        authenticate(&id, &changes, &signatures),
        Err(AuthorshipError::TooManyAuthors {
            authors: 2,
            signatures: 1
        })
    );
    let both_of_a = signed_by(&a, id, &[changes[0].clone(), changes[2].clone()]);
    assert_eq!(
        authenticate(&id, &changes, &both_of_a),
        Err(AuthorshipError::Unsigned { index: 1 })
    );
    // b's change signed by a's key: a forgery in b's name.
    let mut forged = signatures.clone();
    forged.extend(signed_by(&a, id, &changes[1..2]));
    assert_eq!(
        authenticate(&id, &changes, &forged),
        Err(AuthorshipError::BadSignature { index: 1 })
    );
}

#[test]
fn a_cover_signed_for_one_document_proves_nothing_in_another() {
    let (a, b) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
    );
    let (id, changes) = written_by_two(&a, &b);
    let mut signatures = signed_by(&a, id, &changes[2..]);
    signatures.extend(signed_by(&b, id, &changes[1..2]));
    let other = DocumentId::from_bytes([0x42; 16]);
    assert!(matches!(
        authenticate(&other, &changes, &signatures),
        Err(AuthorshipError::BadSignature { .. })
    ));
}

#[test]
fn two_concurrent_changes_of_one_author_each_need_a_signature() {
    let a = Identity::from_secret([1; 32]);
    let mut file =
        HealthFile::create(&a.actor(), &editor("chc-jianshe"), &resident("Fork")).unwrap();
    let bytes = file.save();
    // The same key writes twice on the same state (two incarnations of its store).
    let mut left = HealthFile::load(&bytes, &a.actor()).unwrap();
    left.apply(&editor("chc-jianshe"), &allergy("latex"))
        .unwrap();
    let other_incarnation = Actor::from_bytes([a.public_key().0.as_slice(), &[9; 8]].concat());
    let mut right = HealthFile::load(&bytes, &other_incarnation).unwrap();
    right
        .apply(&editor("chc-jianshe"), &allergy("aspirin"))
        .unwrap();
    left.merge(&mut right).unwrap();
    let id = left.id();
    let changes = left.changes_since(&[]);
    assert_eq!(changes.len(), 3);
    let both = signed_by(&a, id, &changes[1..]);
    let proven = authenticate(&id, &changes, &both).unwrap();
    assert_eq!(proven[0].signature, None);
    let one: HashMap<_, _> = both.into_iter().take(1).collect();
    assert!(matches!(
        authenticate(&id, &changes, &one),
        Err(AuthorshipError::Unsigned { .. })
    ));
}

/// A node that took a document whole keeps one signature per author. It cannot send the
/// changes vouched for one by one, so a peer holding part of the document is told to fetch
/// it, and takes the rest from the whole document, merged with what it holds.
#[test]
fn a_document_held_by_its_authors_latest_signature_reaches_a_peer_holding_part_of_it() {
    let consortium = Consortium::new(3);
    let (a, b, c) = (consortium.node(0), consortium.node(1), consortium.node(2));
    let by = editor("member-0");
    let (file, _) = a.create_health_file(&by, &resident("Partial")).unwrap();
    a.apply_health_file(file, &by, &allergy("first")).unwrap();
    // C takes the first two changes, change by change.
    let fetched = |from: &estuary_node::replica::Node| -> CoveredDocument {
        let (documents, deferred) =
            fetch(from, &[serde_bytes::ByteArray::new(*file.as_bytes())], true).unwrap();
        assert!(deferred.is_empty());
        CoveredDocument::from(&documents[0])
    };
    assert_eq!(
        ingest_covered(&c, &[fetched(&a)])
            .and_then(|taken| taken.durable(&c))
            .unwrap()
            .accepted,
        2
    );
    for k in 0..8 {
        a.apply_health_file(file, &by, &allergy(&format!("later {k}")))
            .unwrap();
    }
    // B takes the document whole from A: one signature for ten changes.
    let from_a = fetched(&a);
    assert_eq!(from_a.signatures().unwrap().len(), 1);
    assert_eq!(
        ingest_covered(&b, &[from_a])
            .and_then(|taken| taken.durable(&b))
            .unwrap()
            .accepted,
        10
    );
    assert!(b.verify().unwrap().problems.is_empty());
    assert_eq!(
        b.envelopes(file).unwrap().len(),
        1,
        "nine changes are vouched for"
    );

    // B cannot send C the changes it lacks one by one.
    let mut state = estuary_node::model::automerge::sync::State::new();
    let mut c_state = estuary_node::model::automerge::sync::State::new();
    let hello = outgoing(&c, file, &mut c_state, SYNC_MESSAGE_BYTES_MAX)
        .unwrap()
        .unwrap();
    estuary_node::sync::document::incoming(&b, &hello, &mut state).unwrap();
    assert!(matches!(
        outgoing(&b, file, &mut state, SYNC_MESSAGE_BYTES_MAX),
        Err(DocumentSyncError::WholeOnly)
    ));
    // C fetches it instead, and merges it with the two changes it holds.
    let carried = ingest_covered(&c, &[fetched(&b)])
        .and_then(|taken| taken.durable(&c))
        .unwrap();
    assert_eq!((carried.accepted, carried.rejected), (8, 0), "{carried:?}");
    assert_eq!(c.heads(file).unwrap(), a.heads(file).unwrap());
    assert_eq!(c.health_file(file).unwrap().allergies.len(), 9);
    assert!(c.verify().unwrap().problems.is_empty());

    // B writes on it: its own change travels by message, signed, to A.
    b.apply_health_file(file, &editor("member-1"), &allergy("iodine"))
        .unwrap();
    let mut b_state = estuary_node::model::automerge::sync::State::new();
    let mut a_state = estuary_node::model::automerge::sync::State::new();
    for _ in 0..4 {
        if let Some(message) = outgoing(&a, file, &mut a_state, SYNC_MESSAGE_BYTES_MAX).unwrap() {
            estuary_node::sync::document::incoming(&b, &message, &mut b_state).unwrap();
        }
        if let Some(message) = outgoing(&b, file, &mut b_state, SYNC_MESSAGE_BYTES_MAX).unwrap() {
            estuary_node::sync::document::incoming(&a, &message, &mut a_state).unwrap();
        }
    }
    assert_eq!(a.heads(file).unwrap(), b.heads(file).unwrap());
    // And B's covered copy now proves the document with two signatures, one per author.
    assert_eq!(fetched(&b).signatures().unwrap().len(), 2);
    assert!(a.verify().unwrap().problems.is_empty());
}

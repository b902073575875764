//! The ingest pipeline on a real store in a temporary directory: local writes are durable and
//! survive reopening; every way a peer's change can be wrong ends in a typed error or in
//! quarantine with the right reason, and nothing else changes.

use automerge::transaction::Transactable;
use automerge::{ObjType, ReadDoc};
use estuary_node::envelope::{Envelope, EnvelopeError};
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::automerge::{self, AutoCommit};
use estuary_node::model::*;
use estuary_node::replica::{
    IngestError, Ingested, Node, NodeConfig, NodeError, PENDING_CHANGES_OF_STRANGERS_MAX,
    WholeDocument,
};

const AUTHORITY: [u8; 32] = [1; 32];
const PEER: [u8; 32] = [2; 32];
const REVOKED: [u8; 32] = [3; 32];

fn institution(id: &str) -> InstitutionId {
    InstitutionId::new(id).unwrap()
}

fn editor(id: &str) -> Editor {
    Editor {
        institution: institution(id),
        at: Timestamp(1_000),
    }
}

fn demographics() -> Demographics {
    resident("+86 13599251131")
}

/// Demographics differing by phone: two creations with the same content, author and time
/// would be the same change, and so the same document.
fn resident(phone: &str) -> Demographics {
    Demographics {
        name: PersonName {
            family: "Lu".into(),
            given: "Jianguo".into(),
            text: None,
        },
        sex: Sex::Male,
        birth_date: Date::new("1954-10-17").unwrap(),
        phone: Some(phone.into()),
        address: None,
        national_id: None,
        insurance: None,
    }
}

/// A consortium: the node under test (Jianshe CHC), a peer (Xinhua), and a member whose key
/// is revoked with `cutoff`.
struct Consortium {
    /// Holds the data directories until the test ends.
    _dir: tempfile::TempDir,
    config: NodeConfig,
    roster: Roster,
}

impl Consortium {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            data_dir: dir.path().join("chc-jianshe"),
            authority: Identity::from_secret(AUTHORITY).public_key(),
            store_engine: Default::default(),
        };
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let own = Identity::load_or_create(&config.data_dir)
            .unwrap()
            .public_key();
        let authority = Identity::from_secret(AUTHORITY);
        let by = editor("xinhua");
        let mut roster = Roster::create(&authority.actor(), &by).unwrap();
        for (id, kind, key) in [
            ("chc-jianshe", InstitutionKind::CommunityCentre, own),
            (
                "xinhua",
                InstitutionKind::CoreHospital,
                Identity::from_secret(PEER).public_key(),
            ),
            (
                "dh-chongming-2",
                InstitutionKind::DistrictHospital,
                Identity::from_secret(REVOKED).public_key(),
            ),
        ] {
            roster
                .apply(
                    &by,
                    &RosterOp::AddInstitution {
                        id: institution(id),
                        name: id.into(),
                        kind,
                    },
                )
                .unwrap();
            roster
                .apply(
                    &by,
                    &RosterOp::AddNodeKey {
                        institution: institution(id),
                        key,
                    },
                )
                .unwrap();
        }
        Self {
            _dir: dir,
            config,
            roster,
        }
    }

    fn signed_roster(&mut self) -> Vec<u8> {
        SignedRoster::sign(&Identity::from_secret(AUTHORITY), &mut self.roster).encode()
    }

    fn open(&mut self) -> Node {
        let roster = self.signed_roster();
        Node::open(&self.config, Some(&roster)).unwrap()
    }

    /// The roster with `key` added to `institution`, signed.
    fn roster_adding(&mut self, institution_id: &str, key: Bytes32) -> Vec<u8> {
        self.roster
            .apply(
                &editor("xinhua"),
                &RosterOp::AddNodeKey {
                    institution: institution(institution_id),
                    key,
                },
            )
            .unwrap();
        self.signed_roster()
    }

    fn revoke(&mut self, cutoff: Vec<Bytes32>) -> Vec<u8> {
        let by = editor("xinhua");
        self.roster
            .apply(
                &by,
                &RosterOp::Revoke {
                    key: Identity::from_secret(REVOKED).public_key(),
                    cutoff,
                    reason: "node compromised".into(),
                },
            )
            .unwrap();
        self.signed_roster()
    }
}

/// Signs every change of `doc` after `have` as `identity`, for document `id`.
fn envelopes(
    identity: &Identity,
    id: DocumentId,
    doc: &mut AutoCommit,
    have: &[automerge::ChangeHash],
) -> Vec<Vec<u8>> {
    doc.get_changes(have)
        .into_iter()
        .map(|mut c| Envelope::sign(identity, id, &mut c).encode())
        .collect()
}

/// A health file created by the peer: its document and creation envelope.
fn peer_file() -> (HealthFile, Vec<u8>) {
    let peer = Identity::from_secret(PEER);
    let file = HealthFile::create(&peer.actor(), &editor("xinhua"), &demographics()).unwrap();
    let id = file.id();
    let mut doc = file.automerge().clone();
    let envelope = envelopes(&peer, id, &mut doc, &[]).remove(0);
    (file, envelope)
}

#[test]
fn local_writes_are_durable_and_survive_reopening() {
    let mut consortium = Consortium::new();
    let (id, view, heads) = {
        let node = consortium.open();
        let (id, _) = node
            .create_health_file(&editor("chc-jianshe"), &demographics())
            .unwrap();
        node.apply_health_file(
            id,
            &editor("chc-jianshe"),
            &HealthFileOp::AddAllergy(NewAllergy {
                substance: "penicillin".into(),
                reaction: "rash".into(),
                severity: Severity::Mild,
            }),
        )
        .unwrap();
        (id, node.health_file(id).unwrap(), node.heads(id).unwrap())
    };
    let node = consortium.open();
    assert_eq!(node.health_file(id).unwrap(), view);
    assert_eq!(node.heads(id).unwrap(), heads);
    assert_eq!(node.envelopes(id).unwrap().len(), 2);
    assert!(node.quarantine().unwrap().is_empty());
}

#[test]
fn an_edit_in_another_institutions_name_is_refused() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let error = node
        .create_health_file(&editor("xinhua"), &demographics())
        .unwrap_err();
    assert!(matches!(error, NodeError::WrongInstitution { .. }));
}

#[test]
fn a_peers_valid_change_is_accepted_once() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let (file, envelope) = peer_file();
    assert!(matches!(
        node.ingest(&envelope).unwrap(),
        Ingested::Accepted(_)
    ));
    assert!(matches!(
        node.ingest(&envelope).unwrap(),
        Ingested::Duplicate(_)
    ));
    assert_eq!(node.health_file(file.id()).unwrap().id, file.id());
}

#[test]
fn a_bad_signature_is_quarantined_without_blocking_the_genuine_change() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let (file, envelope) = peer_file();
    let mut forged = Envelope::decode(&envelope).unwrap();
    forged.signature[0] ^= 1;
    match node.ingest(&forged.encode()).unwrap() {
        Ingested::Quarantined(_, reason) => assert!(reason.contains("signature"), "{reason}"),
        other => panic!("expected quarantine, got {other:?}"),
    }
    assert!(matches!(
        node.health_file(file.id()),
        Err(NodeError::UnknownDocument(_))
    ));
    assert_eq!(node.quarantine().unwrap().len(), 1);
    // The forgery claimed a genuine change: that change, properly signed, is still accepted.
    assert!(matches!(
        node.ingest(&envelope).unwrap(),
        Ingested::Accepted(_)
    ));
    // A signature cut short is not an envelope at all: a typed error, nothing kept.
    forged.signature.truncate(10);
    assert!(matches!(
        node.ingest(&forged.encode()),
        Err(IngestError::Envelope(EnvelopeError::Malformed { .. }))
    ));
    assert_eq!(node.quarantine().unwrap().len(), 1);
}

#[test]
fn an_unknown_keys_change_is_held_until_a_roster_names_its_author() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let newcomer = Identity::from_secret([9; 32]);
    let file = HealthFile::create(&newcomer.actor(), &editor("xinhua"), &demographics()).unwrap();
    let id = file.id();
    let envelope = envelopes(&newcomer, id, &mut file.automerge().clone(), &[]).remove(0);
    // Its author may be a member a newer roster adds: held, not refused, never applied.
    assert!(matches!(
        node.ingest(&envelope).unwrap(),
        Ingested::Pending(_)
    ));
    assert!(matches!(
        node.health_file(id),
        Err(NodeError::UnknownDocument(_))
    ));
    // Offered again: still one held change, nothing in quarantine.
    assert!(matches!(
        node.ingest(&envelope).unwrap(),
        Ingested::Pending(_)
    ));
    assert_eq!(node.pending_count().unwrap(), 1);
    assert!(node.quarantine().unwrap().is_empty());
    // The roster that names the key arrives: the held change is decided and accepted.
    node.update_roster(&consortium.roster_adding("xinhua", newcomer.public_key()))
        .unwrap();
    assert_eq!(node.health_file(id).unwrap().id, id);
    assert_eq!(node.pending_count().unwrap(), 0);
}

#[test]
fn strangers_changes_share_one_bounded_holding_and_the_oldest_go_first() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let mut first = None;
    for n in 0..PENDING_CHANGES_OF_STRANGERS_MAX + 8 {
        let stranger = Identity::from_secret([(n % 200) as u8 + 20; 32]);
        let file = HealthFile::create(
            &stranger.actor(),
            &editor("xinhua"),
            &resident(&format!("+86 {n}")),
        )
        .unwrap();
        let envelope =
            envelopes(&stranger, file.id(), &mut file.automerge().clone(), &[]).remove(0);
        assert!(matches!(
            node.ingest(&envelope).unwrap(),
            Ingested::Pending(_)
        ));
        first.get_or_insert(envelope);
    }
    assert_eq!(
        node.pending_count().unwrap(),
        PENDING_CHANGES_OF_STRANGERS_MAX
    );
    let oldest = Envelope::verify(first.as_ref().unwrap()).unwrap();
    assert!(
        !node
            .pending()
            .unwrap()
            .iter()
            .any(|p| p.change == oldest.hash.0),
        "the oldest held change was evicted"
    );
    drop(node);
    // The shares are counted again at open, from the order keys.
    let node = consortium.open();
    assert_eq!(
        node.pending_count().unwrap(),
        PENDING_CHANGES_OF_STRANGERS_MAX
    );
}

#[test]
fn malformed_and_oversized_envelopes_are_typed_errors() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    assert!(matches!(
        node.ingest(b"not an envelope"),
        Err(IngestError::Envelope(EnvelopeError::Malformed { .. }))
    ));
    let big = vec![0u8; estuary_node::envelope::ENVELOPE_BYTES_MAX + 1];
    assert!(matches!(
        node.ingest(&big),
        Err(IngestError::Envelope(EnvelopeError::TooLarge { .. }))
    ));
}

#[test]
fn a_revoked_key_past_its_cutoff_is_quarantined_within_it_accepted() {
    let mut consortium = Consortium::new();
    let revoked = Identity::from_secret(REVOKED);
    let by = editor("dh-chongming-2");
    let mut first = HealthFile::create(&revoked.actor(), &by, &demographics()).unwrap();
    let second = HealthFile::create(&revoked.actor(), &by, &resident("+86 2")).unwrap();
    let first_envelope =
        envelopes(&revoked, first.id(), &mut first.automerge().clone(), &[]).remove(0);
    let second_envelope =
        envelopes(&revoked, second.id(), &mut second.automerge().clone(), &[]).remove(0);
    let cutoff = first.heads().into_iter().map(|h| Bytes32(h.0)).collect();
    let roster = consortium.revoke(cutoff);
    let node = consortium.open();
    node.update_roster(&roster).unwrap();
    assert!(matches!(
        node.ingest(&first_envelope).unwrap(),
        Ingested::Accepted(_)
    ));
    match node.ingest(&second_envelope).unwrap() {
        Ingested::Quarantined(_, reason) => assert!(reason.contains("revoked"), "{reason}"),
        other => panic!("expected quarantine, got {other:?}"),
    }
    assert_eq!(node.quarantine().unwrap().len(), 1);
}

#[test]
fn a_change_failing_validation_is_quarantined_with_the_reason_and_so_are_its_descendants() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let peer = Identity::from_secret(PEER);
    let (file, envelope) = peer_file();
    node.ingest(&envelope).unwrap();
    let mut doc = file.automerge().clone();
    let base = doc.get_heads();
    // A raw 90-day prescription: the typed API would refuse it, a faulty peer can write it.
    let medications = doc.get(automerge::ROOT, "medications").unwrap().unwrap().1;
    let entry = doc.insert_object(&medications, 0, ObjType::Map).unwrap();
    for (key, value) in [
        ("drug", "metformin"),
        ("dose", "500 mg"),
        ("frequency", "daily"),
        ("start", "2026-01-01"),
        ("prescribed_by", "xinhua"),
    ] {
        doc.put(&entry, key, value).unwrap();
    }
    doc.put(&entry, "days", 90u64).unwrap();
    doc.put(&entry, "recorded_at", automerge::ScalarValue::Timestamp(1))
        .unwrap();
    doc.commit();
    let bad = envelopes(&peer, file.id(), &mut doc, &base);
    let after_bad = doc.get_heads();
    let demographics = doc.get(automerge::ROOT, "demographics").unwrap().unwrap().1;
    doc.put(&demographics, "phone", "+86 4").unwrap();
    doc.commit();
    let descendant = envelopes(&peer, file.id(), &mut doc, &after_bad);
    let heads = node.heads(file.id()).unwrap();

    match node.ingest(&bad[0]).unwrap() {
        Ingested::Quarantined(_, reason) => assert!(reason.contains("60-day"), "{reason}"),
        other => panic!("expected quarantine, got {other:?}"),
    }
    match node.ingest(&descendant[0]).unwrap() {
        Ingested::Quarantined(_, reason) => {
            assert!(reason.contains("quarantined change"), "{reason}")
        }
        other => panic!("expected quarantine, got {other:?}"),
    }
    assert_eq!(
        node.heads(file.id()).unwrap(),
        heads,
        "nothing else changed"
    );
    assert_eq!(node.quarantine().unwrap().len(), 2);
    let reasons: Vec<String> = node
        .quarantine()
        .unwrap()
        .into_iter()
        .map(|q| q.reason)
        .collect();
    assert!(
        reasons.iter().all(|r| !r.contains("metformin")),
        "no patient data in reasons"
    );
}

#[test]
fn a_change_arriving_before_its_dependency_waits_then_is_accepted() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let peer = Identity::from_secret(PEER);
    let (mut file, creation) = peer_file();
    let heads = file.heads();
    file.apply(
        &editor("xinhua"),
        &HealthFileOp::SetDemographic(DemographicField::Phone("+86 1".into())),
    )
    .unwrap();
    let edit = envelopes(&peer, file.id(), &mut file.automerge().clone(), &heads).remove(0);
    assert!(matches!(node.ingest(&edit).unwrap(), Ingested::Pending(_)));
    assert_eq!(node.pending_count().unwrap(), 1);
    let pending = node.pending().unwrap();
    assert_eq!(
        pending[0].missing,
        vec![heads[0].0],
        "it says what it waits for"
    );
    assert!(matches!(
        node.ingest(&creation).unwrap(),
        Ingested::Accepted(_)
    ));
    assert_eq!(node.pending_count().unwrap(), 0);
    assert_eq!(node.health_file(file.id()).unwrap(), file.view());
}

#[test]
fn a_creation_change_claiming_another_document_is_quarantined() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let peer = Identity::from_secret(PEER);
    let (existing, envelope) = peer_file();
    node.ingest(&envelope).unwrap();
    // A second creation change sent under the existing document's id.
    let mut other =
        HealthFile::create(&peer.actor(), &editor("xinhua"), &resident("+86 3")).unwrap();
    let mut change = other.changes_since(&[]).remove(0);
    let hijack = Envelope::sign(&peer, existing.id(), &mut change).encode();
    match node.ingest(&hijack).unwrap() {
        Ingested::Quarantined(_, reason) => {
            assert!(reason.contains("another document"), "{reason}")
        }
        other => panic!("expected quarantine, got {other:?}"),
    }
}

#[test]
fn indexes_find_residents_and_referral_worklists_and_follow_changes() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let chc = editor("chc-jianshe");
    let mut with_id = resident("+86 5");
    with_id.national_id = Some("310230195410170433".into());
    with_id.name.text = Some("陆建国".into());
    let (file, _) = node.create_health_file(&chc, &with_id).unwrap();
    let (other, _) = node.create_health_file(&chc, &resident("+86 6")).unwrap();

    assert_eq!(
        node.find_by_national_id("3102 3019 5410 170433").unwrap(),
        vec![file]
    );
    assert!(
        node.find_by_national_id("110101199003070000")
            .unwrap()
            .is_empty()
    );
    let mut both = node.search_by_name("lu  JIAN").unwrap();
    both.sort();
    let mut expected = vec![file, other];
    expected.sort();
    assert_eq!(both, expected);
    assert_eq!(node.search_by_name("陆建").unwrap(), vec![file]);

    // A corrected national id moves the index entry.
    node.apply_health_file(
        file,
        &chc,
        &HealthFileOp::SetDemographic(DemographicField::NationalId("310230195410170441".into())),
    )
    .unwrap();
    assert!(
        node.find_by_national_id("310230195410170433")
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        node.find_by_national_id("310230195410170441").unwrap(),
        vec![file]
    );

    let xinhua = institution("xinhua");
    let (referral, _) = node
        .create_referral(
            &chc,
            &NewReferral {
                patient: file,
                direction: Direction::Up,
                to: xinhua.clone(),
                reason: "chest pain".into(),
                urgency: Urgency::Priority,
                handover: String::new(),
            },
        )
        .unwrap();
    assert_eq!(
        node.referrals_to(&xinhua, ReferralStatus::Requested)
            .unwrap(),
        vec![referral]
    );
    assert_eq!(node.referrals_of(&file).unwrap(), vec![referral]);
    node.apply_referral(referral, &chc, &ReferralOp::Cancel)
        .unwrap();
    assert!(
        node.referrals_to(&xinhua, ReferralStatus::Requested)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        node.referrals_to(&xinhua, ReferralStatus::Cancelled)
            .unwrap(),
        vec![referral]
    );
}

#[test]
fn every_decision_is_in_the_hash_chained_audit_log() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let (file, envelope) = peer_file();
    node.ingest(&envelope).unwrap();
    node.apply_health_file(
        file.id(),
        &editor("chc-jianshe"),
        &HealthFileOp::SetDemographic(DemographicField::Phone("+86 7".into())),
    )
    .unwrap();
    let records = node.audit(1, 100).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].institution, Some(institution("xinhua")));
    assert_eq!(records[1].institution, Some(institution("chc-jianshe")));
    assert_eq!(records[1].previous, records[0].hash());
    assert!(node.verify().unwrap().problems.is_empty());
    drop(node);
    // The chain continues across restarts.
    let node = consortium.open();
    let (_, second) = peer_file_with("+86 8");
    node.ingest(&second).unwrap();
    let records = node.audit(1, 100).unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[2].previous, records[1].hash());
    assert!(node.verify().unwrap().problems.is_empty());
}

/// A peer's health file with a distinct phone.
fn peer_file_with(phone: &str) -> (HealthFile, Vec<u8>) {
    let peer = Identity::from_secret(PEER);
    let file = HealthFile::create(&peer.actor(), &editor("xinhua"), &resident(phone)).unwrap();
    let id = file.id();
    let envelope = envelopes(&peer, id, &mut file.automerge().clone(), &[]).remove(0);
    (file, envelope)
}

#[test]
fn concurrent_local_writes_to_one_document_all_land() {
    let mut consortium = Consortium::new();
    let node = std::sync::Arc::new(consortium.open());
    let (file, _) = node
        .create_health_file(&editor("chc-jianshe"), &demographics())
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let node = std::sync::Arc::clone(&node);
            std::thread::spawn(move || {
                for n in 0..10u64 {
                    let op = HealthFileOp::AddFollowUp(NewFollowUp {
                        time: Timestamp((t * 100 + n) as i64),
                        systolic_mmhg: Some(120),
                        diastolic_mmhg: Some(80),
                        glucose_mmol_per_l: None,
                    });
                    node.apply_health_file(file, &editor("chc-jianshe"), &op)
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(node.health_file(file).unwrap().follow_ups.len(), 80);
    assert!(node.quarantine().unwrap().is_empty());
}

#[test]
fn the_same_registration_twice_is_the_same_document() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let first = node
        .create_health_file(&editor("chc-jianshe"), &demographics())
        .unwrap();
    let again = node
        .create_health_file(&editor("chc-jianshe"), &demographics())
        .unwrap();
    assert_eq!(first, again);
}

#[test]
fn a_pending_change_whose_dependency_is_quarantined_is_quarantined_too() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let peer = Identity::from_secret(PEER);
    let (file, creation) = peer_file();
    node.ingest(&creation).unwrap();
    let mut doc = file.automerge().clone();
    let base = doc.get_heads();
    // A bad change (unknown root key), then a child of it.
    doc.put(automerge::ROOT, "extra", 1u64).unwrap();
    doc.commit();
    let bad = envelopes(&peer, file.id(), &mut doc, &base).remove(0);
    let after_bad = doc.get_heads();
    let demographics = doc.get(automerge::ROOT, "demographics").unwrap().unwrap().1;
    doc.put(&demographics, "phone", "+86 9").unwrap();
    doc.commit();
    let child = envelopes(&peer, file.id(), &mut doc, &after_bad).remove(0);
    assert!(matches!(node.ingest(&child).unwrap(), Ingested::Pending(_)));
    assert!(matches!(
        node.ingest(&bad).unwrap(),
        Ingested::Quarantined(..)
    ));
    assert_eq!(
        node.pending_count().unwrap(),
        0,
        "the child is decided with its parent"
    );
    assert_eq!(node.quarantine().unwrap().len(), 2);
}

#[test]
fn a_node_restarted_with_an_older_roster_keeps_the_newer_one() {
    let mut consortium = Consortium::new();
    let bootstrap = consortium.signed_roster();
    let newer = consortium.revoke(vec![]);
    {
        let node = Node::open(&consortium.config, Some(&bootstrap)).unwrap();
        node.update_roster(&newer).unwrap();
    }
    let node = Node::open(&consortium.config, Some(&bootstrap)).unwrap();
    let (_, envelope) = peer_file();
    // Under the newer roster the peer is still a member; the revoked key is not.
    assert!(matches!(
        node.ingest(&envelope).unwrap(),
        Ingested::Accepted(_)
    ));
    assert!(matches!(
        node.update_roster(&bootstrap),
        Err(NodeError::Roster(_))
    ));
}

#[test]
fn a_chain_arriving_backwards_is_decided_when_its_first_change_arrives() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let peer = Identity::from_secret(PEER);
    let (mut file, creation) = peer_file();
    let mut edits = Vec::new();
    for phone in ["+86 1", "+86 2", "+86 3"] {
        let heads = file.heads();
        file.apply(
            &editor("xinhua"),
            &HealthFileOp::SetDemographic(DemographicField::Phone(phone.into())),
        )
        .unwrap();
        edits.push(envelopes(&peer, file.id(), &mut file.automerge().clone(), &heads).remove(0));
    }
    for edit in edits.iter().rev() {
        assert!(matches!(node.ingest(edit).unwrap(), Ingested::Pending(_)));
    }
    assert_eq!(node.pending_count().unwrap(), 3);
    assert!(matches!(
        node.ingest(&creation).unwrap(),
        Ingested::Accepted(_)
    ));
    assert_eq!(node.pending_count().unwrap(), 0);
    assert_eq!(node.health_file(file.id()).unwrap(), file.view());
    assert_eq!(node.audit(1, 100).unwrap().len(), 4);
}

#[test]
fn peers_batches_and_local_writes_decided_at_once_end_as_if_decided_one_by_one() {
    use std::sync::Arc;
    const FILES: usize = 6;
    const PEER_EDITS: usize = 10;
    const LOCAL_EDITS: u64 = 8;
    let mut consortium = Consortium::new();
    let node = Arc::new(consortium.open());
    let peer = Identity::from_secret(PEER);
    // Each file: the peer's creation and edits, as the batches a sync message carries.
    let batches: Vec<(DocumentId, Vec<Vec<u8>>)> = (0..FILES)
        .map(|f| {
            let mut file = HealthFile::create(
                &peer.actor(),
                &editor("xinhua"),
                &resident(&format!("+86 {f}")),
            )
            .unwrap();
            for n in 0..PEER_EDITS {
                file.apply(
                    &editor("xinhua"),
                    &HealthFileOp::AddFollowUp(NewFollowUp {
                        time: Timestamp((f * 1_000 + n) as i64),
                        systolic_mmhg: Some(130),
                        diastolic_mmhg: Some(85),
                        glucose_mmol_per_l: None,
                    }),
                )
                .unwrap();
            }
            let id = file.id();
            (id, envelopes(&peer, id, &mut file.automerge().clone(), &[]))
        })
        .collect();
    // The creations first, so local writers have documents to write to.
    for (_, envelopes) in &batches {
        assert!(matches!(
            node.ingest(&envelopes[0]),
            Ok(Ingested::Accepted(_))
        ));
    }
    let ids: Vec<DocumentId> = batches.iter().map(|(id, _)| *id).collect();
    // Three ingesters take every batch, in different orders (so each change is also offered
    // twice more, racing its first decision), while two local writers edit the same files:
    // their changes and the peer's are concurrent, judged in place or on forks.
    let mut threads = Vec::new();
    for t in 0..3usize {
        let (node, batches) = (node.clone(), batches.clone());
        threads.push(std::thread::spawn(move || {
            for b in 0..FILES {
                let (_, envelopes) = &batches[(b + t * 2) % FILES];
                for outcome in node.ingest_many(&envelopes[1..]).unwrap() {
                    assert!(
                        matches!(outcome, Ok(Ingested::Accepted(_) | Ingested::Duplicate(_))),
                        "{outcome:?}"
                    );
                }
            }
        }));
    }
    for w in 0..2u64 {
        let (node, ids) = (node.clone(), ids.clone());
        threads.push(std::thread::spawn(move || {
            for n in 0..LOCAL_EDITS {
                for id in &ids {
                    let op = HealthFileOp::AddFollowUp(NewFollowUp {
                        time: Timestamp((100_000 + w * 1_000 + n) as i64),
                        systolic_mmhg: Some(120),
                        diastolic_mmhg: Some(80),
                        glucose_mmol_per_l: None,
                    });
                    node.apply_health_file(*id, &editor("chc-jianshe"), &op)
                        .unwrap();
                }
            }
        }));
    }
    for thread in threads {
        thread.join().unwrap();
    }
    // Every change landed once: in the documents, in the audit log, in the store's checks.
    let expected_follow_ups = PEER_EDITS + 2 * LOCAL_EDITS as usize;
    for id in &ids {
        assert_eq!(
            node.health_file(*id).unwrap().follow_ups.len(),
            expected_follow_ups
        );
    }
    let accepted = node
        .audit(1, 10_000)
        .unwrap()
        .iter()
        .filter(|record| record.action == estuary_node::audit::AuditAction::Accepted)
        .count();
    assert_eq!(accepted, FILES * (1 + expected_follow_ups));
    assert!(node.quarantine().unwrap().is_empty());
    assert!(node.verify().unwrap().problems.is_empty());
    assert_eq!(node.verify_audit(), None);
    // A node deciding the same changes one by one, in another order, ends the same.
    let views: Vec<HealthFileView> = ids
        .iter()
        .map(|id| node.health_file(*id).unwrap())
        .collect();
    let heads: Vec<_> = ids.iter().map(|id| node.heads(*id).unwrap()).collect();
    let all: Vec<Vec<u8>> = ids
        .iter()
        .flat_map(|id| node.envelopes(*id).unwrap())
        .collect();
    drop(node);
    let elsewhere = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        data_dir: elsewhere.path().to_path_buf(),
        authority: Identity::from_secret(AUTHORITY).public_key(),
        store_engine: Default::default(),
    };
    let key = Identity::load_or_create(&config.data_dir)
        .unwrap()
        .public_key();
    let roster = consortium.roster_adding("xinhua", key);
    let other = Node::open(&config, Some(&roster)).unwrap();
    for envelope in all.iter().rev() {
        other.ingest(envelope).unwrap();
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(other.heads(*id).unwrap(), heads[i]);
        assert_eq!(other.health_file(*id).unwrap(), views[i]);
    }
    // And the node itself, reopened, reads what it showed.
    let node = consortium.open();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(node.health_file(*id).unwrap(), views[i]);
    }
}

/// A document as a fetch carries it: loaded from its saved bytes, with each change's
/// signature by the identity among `signers` whose key wrote it.
fn fetched_whole(doc: &mut AutoCommit, id: DocumentId, signers: &[&Identity]) -> WholeDocument {
    let signatures = doc
        .get_changes(&[])
        .into_iter()
        .map(|mut change| {
            let author = &change.actor_id().to_bytes()[..32];
            let signer = signers
                .iter()
                .find(|s| s.public_key().0[..] == *author)
                .expect("a signer for every change");
            let envelope = Envelope::sign(signer, id, &mut change);
            (change.hash().0, envelope.signature.try_into().unwrap())
        })
        .collect();
    // As a fetch carries it: one document chunk, loaded with its changes, kept as the
    // snapshot of a document new here.
    let saved = doc.save();
    let (loaded, changes) = load_document_with_changes(&saved).unwrap();
    WholeDocument {
        id,
        doc: loaded,
        signatures,
        changes: Some(changes),
        saved: Some(saved),
    }
}

/// Every signed change of `whole`, in its envelope, in causal order: the same document sent
/// change by change.
fn one_by_one(whole: &mut WholeDocument) -> Vec<Vec<u8>> {
    whole
        .doc
        .get_changes(&[])
        .into_iter()
        .filter_map(|mut change| {
            let signature = whole.signatures.get(&change.hash().0)?;
            Some(Envelope::seal(whole.id, &mut change, signature).encode())
        })
        .collect()
}

/// A health file written by two members at once: the peer's edits and, concurrent with the
/// last of them, the district hospital's; merged.
fn file_of_two_members() -> (DocumentId, AutoCommit) {
    let peer = Identity::from_secret(PEER);
    let district = Identity::from_secret(REVOKED);
    let mut file = HealthFile::create(&peer.actor(), &editor("xinhua"), &demographics()).unwrap();
    file.apply(&editor("xinhua"), &allergy("penicillin"))
        .unwrap();
    let mut other = HealthFile::load(&file.save(), &district.actor()).unwrap();
    file.apply(&editor("xinhua"), &allergy("iodine contrast"))
        .unwrap();
    other
        .apply(&editor("dh-chongming-2"), &allergy("latex"))
        .unwrap();
    file.merge(&mut other).unwrap();
    file.apply(
        &editor("xinhua"),
        &HealthFileOp::SetDemographic(DemographicField::Phone("+86 13800000000".into())),
    )
    .unwrap();
    (file.id(), file.automerge().clone())
}

fn allergy(substance: &str) -> HealthFileOp {
    HealthFileOp::AddAllergy(NewAllergy {
        substance: substance.into(),
        reaction: "rash".into(),
        severity: Severity::Mild,
    })
}

#[test]
fn a_document_fetched_whole_is_accepted_as_its_changes_one_by_one_would_be() {
    let (id, mut doc) = file_of_two_members();
    let signers = [
        &Identity::from_secret(PEER),
        &Identity::from_secret(REVOKED),
    ];
    let mut whole_ = Consortium::new();
    let mut by_change_ = Consortium::new();
    let whole = whole_.open();
    let by_change = by_change_.open();

    let mut sent = fetched_whole(&mut doc, id, &signers);
    let envelopes = one_by_one(&mut sent);
    let sent_bytes = sent.saved.clone().unwrap();
    let (outcomes, given_back) = whole.ingest_whole(vec![sent]).unwrap();
    assert!(given_back.is_empty(), "an honest document is taken whole");
    assert_eq!(outcomes.len(), envelopes.len());
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(Ingested::Accepted(_))))
    );
    for outcome in by_change.ingest_many(&envelopes).unwrap() {
        assert!(matches!(outcome, Ok(Ingested::Accepted(_))), "{outcome:?}");
    }

    let same = |a: &Node, b: &Node| {
        assert_eq!(a.heads(id).unwrap(), b.heads(id).unwrap());
        assert_eq!(a.health_file(id).unwrap(), b.health_file(id).unwrap());
        // The same changes, each author's latest with the same signature (an envelope rebuilt
        // from a snapshot may compress its change differently); a node that took the document
        // whole keeps no other signature.
        let signed = |node: &Node| {
            let mut signed: Vec<_> = node
                .envelopes(id)
                .unwrap()
                .iter()
                .map(|e| {
                    let verified = Envelope::verify(e).unwrap();
                    (verified.hash, Envelope::decode(e).unwrap().signature)
                })
                .collect();
            signed.sort();
            signed
        };
        let (whole, by_change) = (signed(a), signed(b));
        assert!(whole.iter().all(|s| by_change.contains(s)));
        let mut covered: Vec<automerge::ChangeHash> = a
            .whole_document(id, true)
            .unwrap()
            .unwrap()
            .1
            .into_iter()
            .map(|(hash, _)| hash)
            .collect();
        covered.sort();
        assert_eq!(whole.iter().map(|(h, _)| *h).collect::<Vec<_>>(), covered);
        assert_eq!(a.change_hashes(id).unwrap(), b.change_hashes(id).unwrap());
        assert_eq!(a.audit_sequence(), b.audit_sequence());
        assert_eq!(
            a.search_by_name("Lu").unwrap(),
            b.search_by_name("Lu").unwrap()
        );
    };
    same(&whole, &by_change);
    // The peer's bytes, one document chunk no larger than its changes, are its snapshot as
    // they came: what this node serves is what it was sent.
    assert_eq!(
        whole.whole_document(id, true).unwrap().unwrap().0,
        sent_bytes
    );
    assert_eq!(whole.health_file(id).unwrap().allergies.len(), 3);
    assert!(whole.verify().unwrap().problems.is_empty());
    assert_eq!(whole.verify_audit(), None);

    // The same document again is held whole: nothing to decide.
    let audited = whole.audit_sequence();
    let (outcomes, given_back) = whole
        .ingest_whole(vec![fetched_whole(&mut doc, id, &signers)])
        .unwrap();
    assert!(given_back.is_empty());
    assert_eq!(outcomes.len(), envelopes.len());
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(Ingested::Duplicate(_))))
    );
    assert_eq!(whole.audit_sequence(), audited);

    // A local write builds on it, and all of it survives reopening.
    whole
        .apply_health_file(id, &editor("chc-jianshe"), &allergy("aspirin"))
        .unwrap();
    drop(whole);
    let whole = whole_.open();
    assert_eq!(whole.health_file(id).unwrap().allergies.len(), 4);
    assert!(whole.verify().unwrap().problems.is_empty());
    assert_eq!(whole.verify_audit(), None);
}

#[test]
fn a_document_fetched_whole_that_is_not_accepted_whole_is_decided_change_by_change() {
    let peer = Identity::from_secret(PEER);
    let stranger = Identity::from_secret([9; 32]);
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let mut reference_ = Consortium::new();
    let reference = reference_.open();

    // A change breaking a rule (a root field the model does not know) after two good ones.
    let mut faulty = HealthFile::create(&peer.actor(), &editor("xinhua"), &resident("+86 1"))
        .unwrap()
        .into_automerge();
    faulty.put(automerge::ROOT, "extra", 1u64).unwrap();
    faulty.commit();
    let faulty_id = document_id(&mut faulty).unwrap();
    // A change by a key no roster names.
    let mut foreign = HealthFile::create(&peer.actor(), &editor("xinhua"), &resident("+86 2"))
        .unwrap()
        .into_automerge();
    let foreign_id = document_id(&mut foreign).unwrap();
    let mut foreign = HealthFile::from_automerge(foreign, &stranger.actor()).unwrap();
    foreign
        .apply(&editor("xinhua"), &allergy("penicillin"))
        .unwrap();
    let mut foreign = foreign.into_automerge();
    // A change sent without its signature.
    let (unsigned_id, mut unsigned) = file_of_two_members();

    let mut sent = vec![
        fetched_whole(&mut faulty, faulty_id, &[&peer]),
        fetched_whole(&mut foreign, foreign_id, &[&peer, &stranger]),
        fetched_whole(
            &mut unsigned,
            unsigned_id,
            &[&peer, &Identity::from_secret(REVOKED)],
        ),
    ];
    let last = unsigned.get_heads()[0].0;
    sent[2].signatures.remove(&last);
    // A change whose signature does not verify.
    let (forged_id, mut forged) = {
        let file =
            HealthFile::create(&peer.actor(), &editor("xinhua"), &resident("+86 3")).unwrap();
        (file.id(), file.into_automerge())
    };
    sent.push(fetched_whole(&mut forged, forged_id, &[&peer]));
    sent[3].signatures.values_mut().for_each(|s| s[7] ^= 1);
    let envelopes: Vec<Vec<Vec<u8>>> = sent.iter_mut().map(one_by_one).collect();

    let (outcomes, mut given_back) = node.ingest_whole(sent).unwrap();
    assert!(outcomes.is_empty(), "{outcomes:?}");
    assert_eq!(
        given_back.iter().map(|w| w.id).collect::<Vec<_>>(),
        [faulty_id, foreign_id, unsigned_id, forged_id]
    );
    // Change by change, as the fetch then sends them: the same decisions as a node that only
    // ever saw them so.
    for (document, expected) in given_back.iter_mut().zip(&envelopes) {
        let got = node.ingest_many(&one_by_one(document)).unwrap();
        let want = reference.ingest_many(expected).unwrap();
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
    }
    for id in [faulty_id, foreign_id, unsigned_id] {
        assert_eq!(node.heads(id).unwrap(), reference.heads(id).unwrap());
    }
    assert_eq!(node.quarantine_count(), 2);
    assert_eq!(node.pending_count().unwrap(), 1);
    assert_eq!(node.audit_sequence(), reference.audit_sequence());
}

#[test]
fn a_document_fetched_whole_while_one_of_its_changes_waits_is_taken_whole_with_it() {
    let (id, mut doc) = file_of_two_members();
    let signers = [
        &Identity::from_secret(PEER),
        &Identity::from_secret(REVOKED),
    ];
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let mut sent = fetched_whole(&mut doc, id, &signers);
    let envelopes = one_by_one(&mut sent);
    // The last change arrived first (gossip) and waits for the others.
    let last = envelopes.last().unwrap();
    assert!(matches!(node.ingest(last).unwrap(), Ingested::Pending(_)));

    let (outcomes, given_back) = node.ingest_whole(vec![sent]).unwrap();
    assert!(
        given_back.is_empty(),
        "taken whole, the waiting change's record with it"
    );
    assert_eq!(outcomes.len(), envelopes.len());
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(Ingested::Accepted(_) | Ingested::Duplicate(_))))
    );
    assert_eq!(node.pending_count().unwrap(), 0);
    assert_eq!(node.heads(id).unwrap(), doc.get_heads());
    assert!(node.verify().unwrap().problems.is_empty());
}

#[test]
fn a_fetched_document_carrying_a_change_without_its_dependencies_goes_change_by_change() {
    let peer = Identity::from_secret(PEER);
    let mut file = HealthFile::create(&peer.actor(), &editor("xinhua"), &demographics()).unwrap();
    let id = file.id();
    let saved = file.save();
    file.apply(&editor("xinhua"), &allergy("penicillin"))
        .unwrap();
    file.apply(&editor("xinhua"), &allergy("latex")).unwrap();
    let mut doc = file.automerge().clone();
    let mut whole = fetched_whole(&mut doc, id, &[&peer]);
    // The creation, and the last change without the one it builds on: automerge holds it
    // aside, out of `get_changes`, but would save it with the document.
    let head = doc.get_heads()[0];
    let mut last = doc.get_change_by_hash(&head).unwrap();
    whole.doc = AutoCommit::load(&[saved, last.bytes().into_owned()].concat()).unwrap();
    assert_eq!(whole.doc.get_changes(&[]).len(), 1);
    assert!(!whole.doc.get_missing_deps(&[]).is_empty());

    let mut consortium = Consortium::new();
    let node = consortium.open();
    let (outcomes, mut given_back) = node.ingest_whole(vec![whole]).unwrap();
    assert!(outcomes.is_empty());
    let outcomes = node.ingest_many(&one_by_one(&mut given_back[0])).unwrap();
    assert!(matches!(outcomes[..], [Ok(Ingested::Accepted(_))]));
    assert_eq!(node.health_file(id).unwrap().allergies.len(), 0);
    assert!(node.verify().unwrap().problems.is_empty());
}

/// A document as a fetch sends it (its snapshot followed by the changes accepted since) loads
/// to the document the node holds, with a signature that verifies for every change.
#[test]
fn a_whole_document_as_a_fetch_sends_it_loads_to_the_node_copy_with_every_signature() {
    let mut consortium = Consortium::new();
    let node = consortium.open();
    let by = editor("chc-jianshe");
    let (id, _) = node.create_health_file(&by, &demographics()).unwrap();
    for n in 0..40 {
        node.apply_health_file(
            id,
            &by,
            &HealthFileOp::AddAllergy(NewAllergy {
                substance: format!("substance {n}"),
                reaction: "a rash over the forearms and the back of the hands".into(),
                severity: Severity::Mild,
            }),
        )
        .unwrap();
    }
    let (bytes, signatures) = node.whole_document(id, false).unwrap().unwrap();
    let mut loaded = load_document(&bytes).unwrap();
    let mut heads = loaded.get_heads();
    heads.sort();
    let mut held = node.heads(id).unwrap();
    held.sort();
    assert_eq!(heads, held);
    let changes = loaded.get_changes(&[]);
    assert_eq!(changes.len(), 41);
    assert_eq!(signatures.len(), 41);
    let by_hash: std::collections::HashMap<_, _> = signatures.into_iter().collect();
    for change in &changes {
        let signature = by_hash[&change.hash()];
        estuary_node::envelope::verify_signature(&id, change, &signature).unwrap();
    }
    // Covered: the one author's latest change alone vouches for the other forty.
    let (covered_bytes, cover) = node.whole_document(id, true).unwrap().unwrap();
    assert_eq!(covered_bytes, bytes);
    assert_eq!(cover.len(), 1, "one author, one signature");
    let cover: std::collections::HashMap<_, _> = cover.into_iter().map(|(h, s)| (h.0, s)).collect();
    let proven = estuary_node::authorship::authenticate(&id, &changes, &cover).unwrap();
    assert_eq!(proven.iter().filter(|p| p.signature.is_some()).count(), 1);
}

/// A document a revoked key wrote in is still taken whole when every change of that key lies
/// within its cut-off, with one signature per author; past the cut-off, it goes change by
/// change.
#[test]
fn a_document_a_revoked_key_wrote_within_its_cutoff_is_taken_whole_and_past_it_is_not() {
    let (id, mut doc) = file_of_two_members();
    let revoked = Identity::from_secret(REVOKED);
    let signers = [&Identity::from_secret(PEER), &revoked];
    let latex = doc
        .get_changes(&[])
        .into_iter()
        .find(|c| c.actor_id().to_bytes()[..32] == revoked.public_key().0[..])
        .unwrap()
        .hash();
    for (cutoff, taken_whole) in [(vec![Bytes32(latex.0)], true), (vec![], false)] {
        let mut consortium = Consortium::new();
        let roster = consortium.revoke(cutoff);
        let node = consortium.open();
        node.update_roster(&roster).unwrap();
        let mut sent = fetched_whole(&mut doc, id, &signers);
        // Only each author's latest signature travels.
        let cover: std::collections::HashSet<[u8; 32]> =
            estuary_node::authorship::cover(&sent.doc.get_changes(&[]))
                .into_iter()
                .map(|(hash, _)| hash.0)
                .collect();
        sent.signatures.retain(|hash, _| cover.contains(hash));
        assert_eq!(sent.signatures.len(), 2);
        let (outcomes, given_back) = node.ingest_whole(vec![sent]).unwrap();
        assert_eq!(given_back.is_empty(), taken_whole);
        if taken_whole {
            assert_eq!(outcomes.len(), 5);
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, Ok(Ingested::Accepted(_))))
            );
            assert_eq!(node.health_file(id).unwrap().allergies.len(), 3);
            assert!(node.verify().unwrap().problems.is_empty());
        } else {
            assert!(outcomes.is_empty());
        }
    }
}

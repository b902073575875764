//! Revocation with a cut-off, on real stores: nodes that learn of a revocation at different
//! times — before or after receiving the revoked key's changes, in any order — end with the
//! same documents and the same quarantine.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    AUTHORITY, CONVERGENCE, add_member, allergy, editor, memory_address, resident, start,
};
use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::membership::{RosterError, SignedRoster};
use estuary_node::model::automerge::transaction::Transactable;
use estuary_node::model::automerge::{AutoCommit, ChangeHash, ObjType, ReadDoc, ScalarValue};
use estuary_node::model::*;
use estuary_node::replica::{
    IngestError, Ingested, Node, NodeConfig, NodeError, REVOKED_HELD_PER_KEY_MAX,
};
use estuary_node::sync::SYNC_STRIKES_MAX;

/// The compromised member's key (Chongming district hospital no. 2).
const REVOKED: [u8; 32] = [3; 32];
const REVOKED_INSTITUTION: &str = "dh-chongming-2";

/// Member nodes with data directories: Jianshe CHC, Xinhua, and Baozhen CHC (whose key the
/// order-shuffling nodes share; they only receive).
const MEMBERS: [&str; 3] = ["chc-jianshe", "xinhua", "chc-baozhen"];

struct Consortium {
    dir: tempfile::TempDir,
    roster: Roster,
}

impl Consortium {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let authority = Identity::from_secret(AUTHORITY);
        let by = editor("xinhua");
        let mut roster = Roster::create(&authority.actor(), &by).unwrap();
        let mut members: Vec<(&str, InstitutionKind, Bytes32)> = MEMBERS
            .iter()
            .map(|name| {
                let data_dir = dir.path().join(name);
                std::fs::create_dir_all(&data_dir).unwrap();
                let key = Identity::load_or_create(&data_dir).unwrap().public_key();
                (*name, InstitutionKind::CommunityCentre, key)
            })
            .collect();
        members.push((
            REVOKED_INSTITUTION,
            InstitutionKind::DistrictHospital,
            Identity::from_secret(REVOKED).public_key(),
        ));
        for (id, kind, key) in members {
            add_member(&mut roster, &by, id, kind, key);
        }
        Self { dir, roster }
    }

    fn signed(&mut self) -> Vec<u8> {
        SignedRoster::sign(&Identity::from_secret(AUTHORITY), &mut self.roster).encode()
    }

    fn config(&self, data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            data_dir,
            authority: Identity::from_secret(AUTHORITY).public_key(),
            store_engine: Default::default(),
        }
    }

    fn open(&mut self, member: &str) -> Node {
        let roster = self.signed();
        Node::open(&self.config(self.dir.path().join(member)), Some(&roster)).unwrap()
    }

    /// A new, empty node with Baozhen's key, started with `roster`.
    fn fresh(&self, name: &str, roster: &[u8]) -> Node {
        self.try_fresh(name, roster).unwrap()
    }

    fn try_fresh(&self, name: &str, roster: &[u8]) -> Result<Node, Box<NodeError>> {
        let data_dir = self.dir.path().join(name);
        std::fs::create_dir_all(&data_dir).unwrap();
        copy_key(&self.dir.path().join("chc-baozhen"), &data_dir);
        Node::open(&self.config(data_dir), Some(roster)).map_err(Box::new)
    }

    /// Another replica of the authority's roster as it stands, writing as another actor.
    fn replica(&mut self) -> Roster {
        Roster::load(&self.roster.save(), &Actor::from_bytes(vec![7; 32])).unwrap()
    }

    fn revoke(&mut self, cutoff: Vec<Bytes32>) -> Vec<u8> {
        self.roster
            .apply(
                &editor("xinhua"),
                &RosterOp::Revoke {
                    key: Identity::from_secret(REVOKED).public_key(),
                    cutoff,
                    reason: "node compromised".into(),
                },
            )
            .unwrap();
        self.signed()
    }
}

fn sign(roster: &mut Roster) -> Vec<u8> {
    SignedRoster::sign(&Identity::from_secret(AUTHORITY), roster).encode()
}

/// `roster` with the key revoked again with `cutoff`, written as a raw automerge change that
/// also raises the version: the model refuses this edit, a hand-crafted roster or an older
/// tool's does not.
fn revoked_again(roster: &Roster, cutoff: &[Bytes32]) -> Roster {
    let mut doc = roster.automerge().clone();
    let Some((_, revocations)) = doc.get(automerge::ROOT, "revocations").unwrap() else {
        panic!("a roster has revocations");
    };
    let key = Identity::from_secret(REVOKED).public_key().to_string();
    let entry = doc.put_object(&revocations, key, ObjType::Map).unwrap();
    doc.put(&entry, "at", ScalarValue::Timestamp(2_000))
        .unwrap();
    doc.put(&entry, "reason", "a later line").unwrap();
    let list = doc.put_object(&entry, "cutoff", ObjType::List).unwrap();
    for (index, head) in cutoff.iter().enumerate() {
        doc.insert(&list, index, ScalarValue::Bytes(head.0.to_vec()))
            .unwrap();
    }
    doc.put(automerge::ROOT, "version", roster.view().version + 1)
        .unwrap();
    doc.commit();
    Roster::from_automerge(doc, &Identity::from_secret(AUTHORITY).actor()).unwrap()
}

/// The authority's roster rebuilt from scratch with the same members, revoking the key with
/// `cutoff` if given, and a version above `above`.
fn rebuilt(view: &RosterView, cutoff: Option<Vec<Bytes32>>, above: u64) -> Roster {
    let by = editor("xinhua");
    let mut roster = Roster::create(&Identity::from_secret(AUTHORITY).actor(), &by).unwrap();
    for institution in &view.institutions {
        add_member(
            &mut roster,
            &by,
            institution.id.as_str(),
            institution.kind,
            institution.node_keys[0],
        );
    }
    if let Some(cutoff) = cutoff {
        let revoke = RosterOp::Revoke {
            key: Identity::from_secret(REVOKED).public_key(),
            cutoff,
            reason: "rebuilt".into(),
        };
        roster.apply(&by, &revoke).unwrap();
    }
    let first = &view.institutions[0];
    while roster.view().version <= above {
        let rename = RosterOp::AddInstitution {
            id: first.id.clone(),
            name: first.name.clone(),
            kind: first.kind,
        };
        roster.apply(&by, &rename).unwrap();
    }
    roster
}

fn copy_key(from: &Path, to: &Path) {
    std::fs::copy(from.join("node.key"), to.join("node.key")).unwrap();
}

fn hash_of(envelope: &[u8]) -> ChangeHash {
    Envelope::verify(envelope).unwrap().hash
}

/// The revoked key's replica of one document: each edit becomes a signed envelope.
struct Writer {
    identity: Identity,
    file: HealthFile,
}

impl Writer {
    fn create(given: &str) -> (Self, Vec<u8>) {
        let identity = Identity::from_secret(REVOKED);
        let file = HealthFile::create(
            &identity.actor(),
            &editor(REVOKED_INSTITUTION),
            &resident(given),
        )
        .unwrap();
        let mut writer = Self { identity, file };
        let envelope = writer.since(&[]);
        (writer, envelope)
    }

    /// Joins a document a node holds, from its envelopes.
    fn join(envelopes: &[Vec<u8>]) -> Self {
        let identity = Identity::from_secret(REVOKED);
        let mut doc = AutoCommit::new();
        doc.apply_changes(
            envelopes
                .iter()
                .map(|e| Envelope::verify(e).unwrap().change),
        )
        .unwrap();
        let file = HealthFile::from_automerge(doc, &identity.actor()).unwrap();
        Self { identity, file }
    }

    fn edit(&mut self, op: &HealthFileOp) -> Vec<u8> {
        let before = self.file.heads();
        self.file.apply(&editor(REVOKED_INSTITUTION), op).unwrap();
        self.since(&before)
    }

    fn since(&mut self, before: &[ChangeHash]) -> Vec<u8> {
        let id = self.file.id();
        let mut changes = self.file.automerge().clone().get_changes(before);
        assert_eq!(changes.len(), 1);
        Envelope::sign(&self.identity, id, &mut changes[0]).encode()
    }
}

/// What the scenario wrote, every envelope in causal order, and the revocation.
struct Story {
    /// File D, created by the revoked key, and file E, created by Jianshe CHC.
    files: [DocumentId; 2],
    /// Every envelope written, accepted or not.
    all: Vec<Vec<u8>>,
    /// The revoked key's edits of D: within the cut-off, within it, past it; and its edit of
    /// E, past it.
    r: [Vec<u8>; 4],
    /// Jianshe's edit of D built on the third (past the cut-off).
    built_on_past: Vec<u8>,
    /// The roster before the revocation.
    before: Vec<u8>,
    /// The roster revoking the key with the second edit of D as its cut-off.
    revocation: Vec<u8>,
}

/// Jianshe CHC (`a`) receives everything the revoked key writes and builds on it before the
/// revocation; Xinhua (`b`) has only the creation of D and the first edit.
fn story(consortium: &mut Consortium, a: &Node, b: &Node) -> Story {
    let (mut writer, creation) = Writer::create("Jianguo");
    let d = writer.file.id();
    let r1 = writer.edit(&allergy("penicillin"));
    let r2 = writer.edit(&allergy("sulfonamide"));
    let r3 = writer.edit(&allergy("codeine"));
    for envelope in [&creation, &r1, &r2, &r3] {
        assert!(matches!(a.ingest(envelope).unwrap(), Ingested::Accepted(_)));
    }
    let m = a
        .apply_health_file(d, &editor("chc-jianshe"), &allergy("aspirin"))
        .unwrap();
    let built_on_past = a
        .envelopes(d)
        .unwrap()
        .into_iter()
        .find(|e| hash_of(e) == m)
        .unwrap();
    let (e, _) = a
        .create_health_file(&editor("chc-jianshe"), &resident("Meiling"))
        .unwrap();
    let e_creation = a.envelopes(e).unwrap();
    let r4 = Writer::join(&e_creation).edit(&allergy("latex"));
    assert!(matches!(a.ingest(&r4).unwrap(), Ingested::Accepted(_)));
    for envelope in [&creation, &r1, &e_creation[0]] {
        assert!(matches!(b.ingest(envelope).unwrap(), Ingested::Accepted(_)));
    }
    let before = consortium.signed();
    let revocation = consortium.revoke(vec![Bytes32(hash_of(&r2).0)]);
    let all = vec![
        creation,
        r1.clone(),
        r2.clone(),
        r3.clone(),
        built_on_past.clone(),
        e_creation[0].clone(),
        r4.clone(),
    ];
    Story {
        files: [d, e],
        all,
        r: [r1, r2, r3, r4],
        built_on_past,
        before,
        revocation,
    }
}

/// What two nodes must agree on: heads of both files, and the quarantined changes.
fn state(node: &Node, files: &[DocumentId; 2]) -> (Vec<Vec<ChangeHash>>, BTreeSet<[u8; 32]>) {
    (
        files.iter().map(|f| node.heads(*f).unwrap()).collect(),
        node.quarantine()
            .unwrap()
            .iter()
            .map(|q| q.change)
            .collect(),
    )
}

fn assert_settled(node: &Node) {
    assert_eq!(node.pending_count().unwrap(), 0, "{:?}", node.pending());
    let report = node.verify().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
fn nodes_that_learn_of_a_revocation_at_different_times_agree() {
    let mut consortium = Consortium::new();
    let (a, b) = (consortium.open("chc-jianshe"), consortium.open("xinhua"));
    let story = story(&mut consortium, &a, &b);
    let [d, e] = story.files;
    let [r1, r2, r3, r4] = &story.r;

    // Jianshe holds everything: adopting the revocation withdraws what is past the cut-off,
    // with its own edit built on it, and quarantines them.
    a.update_roster(&story.revocation).unwrap();
    assert_eq!(a.heads(d).unwrap(), vec![hash_of(r2)]);
    assert_eq!(a.heads(e).unwrap(), vec![hash_of(&story.all[5])]);
    let quarantine = a.quarantine().unwrap();
    let reason_of = |envelope: &[u8]| {
        quarantine
            .iter()
            .find(|q| q.change == hash_of(envelope).0)
            .map(|q| q.reason.clone())
            .unwrap_or_default()
    };
    assert!(reason_of(r3).contains("not within the revocation's cut-off"));
    assert!(reason_of(r4).contains("not within the revocation's cut-off"));
    assert!(reason_of(&story.built_on_past).contains("depends on a quarantined change"));
    assert_eq!(quarantine.len(), 3);
    let substances = a.health_file(d).unwrap().allergy_substances();
    assert_eq!(substances, vec!["penicillin", "sulfonamide"]);
    assert!(a.health_file(e).unwrap().allergy_substances().is_empty());
    assert_settled(&a);

    // Xinhua has not seen the cut-off head: it cannot tell yet whether the creation of D and
    // the first edit are within the cut-off, so it holds them rather than keep or refuse them.
    b.update_roster(&story.revocation).unwrap();
    assert!(matches!(b.heads(d), Err(NodeError::UnknownDocument(_))));
    assert!(b.search_by_name("Lu Jianguo").unwrap().is_empty());
    assert_eq!(b.pending().unwrap().len(), 2);
    assert!(b.quarantine().unwrap().is_empty());
    // The rest arrives, newest first: everything is held until the cut-off head comes.
    for envelope in story.all.iter().rev() {
        b.ingest(envelope).unwrap();
    }
    assert_eq!(state(&b, &story.files), state(&a, &story.files));
    assert_settled(&b);
    // A second copy of a withdrawn change stays quarantined.
    assert!(matches!(b.ingest(r1).unwrap(), Ingested::Duplicate(_)));
    assert!(matches!(b.ingest(r3).unwrap(), Ingested::Quarantined(..)));

    // Both keep it across a restart.
    let expected = state(&a, &story.files);
    drop((a, b));
    for member in ["chc-jianshe", "xinhua"] {
        let node = consortium.open(member);
        assert_eq!(state(&node, &story.files), expected, "{member}");
        assert_settled(&node);
    }
}

/// A small deterministic shuffle (xorshift), so a failing order can be replayed by its seed.
fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut items = items.to_vec();
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
    items
}

#[test]
fn any_delivery_order_and_any_moment_of_revocation_end_in_the_same_state() {
    let mut consortium = Consortium::new();
    let (a, b) = (consortium.open("chc-jianshe"), consortium.open("xinhua"));
    let story = story(&mut consortium, &a, &b);
    a.update_roster(&story.revocation).unwrap();
    let expected = state(&a, &story.files);
    for seed in 0..24u64 {
        let node = consortium.fresh(&format!("shuffled-{seed}"), &story.before);
        let order = shuffled(&story.all, seed);
        // The revocation reaches the node at a different point of the delivery each time.
        let revoked_after = (seed as usize) % (order.len() + 1);
        for (i, envelope) in order.iter().enumerate() {
            if i == revoked_after {
                node.update_roster(&story.revocation).unwrap();
            }
            node.ingest(envelope).unwrap();
        }
        if revoked_after == order.len() {
            node.update_roster(&story.revocation).unwrap();
        }
        assert_eq!(
            state(&node, &story.files),
            expected,
            "seed {seed}, revoked after {revoked_after} envelopes"
        );
        assert_settled(&node);
    }
}

#[test]
fn a_revoked_keys_changes_are_held_within_a_budget_until_the_cutoff_can_be_drawn() {
    let mut consortium = Consortium::new();
    // The cut-off head never reaches this node.
    let before = consortium.signed();
    let revocation = consortium.revoke(vec![Bytes32([9; 32])]);
    let node = consortium.fresh("budget", &before);
    node.update_roster(&revocation).unwrap();
    for i in 0..REVOKED_HELD_PER_KEY_MAX {
        let (_, creation) = Writer::create(&format!("resident {i}"));
        assert!(matches!(
            node.ingest(&creation).unwrap(),
            Ingested::Pending(_)
        ));
    }
    let (_, one_more) = Writer::create("one more");
    assert!(matches!(
        node.ingest(&one_more),
        Err(IngestError::RevokedBacklogFull)
    ));
    assert_eq!(node.pending_count().unwrap(), REVOKED_HELD_PER_KEY_MAX);
    assert!(node.quarantine().unwrap().is_empty());
}

#[test]
fn a_roster_whose_history_changes_a_revocation_is_refused_by_every_node() {
    let mut consortium = Consortium::new();
    let (a, b) = (consortium.open("chc-jianshe"), consortium.open("xinhua"));
    let mut replica = consortium.replica();
    let story = story(&mut consortium, &a, &b);
    let [r1, _, r3, _] = &story.r;
    a.update_roster(&story.revocation).unwrap();

    // Revoked a second time, later, with a cut-off that keeps more.
    let again = sign(&mut revoked_again(
        &consortium.roster,
        &[Bytes32(hash_of(r3).0)],
    ));
    // Revoked by two replicas of the authority's roster at once, with different cut-offs.
    replica
        .apply(
            &editor("xinhua"),
            &RosterOp::Revoke {
                key: Identity::from_secret(REVOKED).public_key(),
                cutoff: vec![Bytes32(hash_of(r1).0)],
                reason: "node compromised".into(),
            },
        )
        .unwrap();
    let mut merged = consortium.replica();
    merged.merge(&mut replica).unwrap();
    let merged = sign(&mut merged);

    let authority = Identity::from_secret(AUTHORITY).public_key();
    let key = Identity::from_secret(REVOKED).public_key();
    for (what, roster) in [("revoked again", &again), ("revoked concurrently", &merged)] {
        assert!(
            matches!(
                SignedRoster::verify(roster, &authority),
                Err(RosterError::RevocationChanged { key: k }) if k == key
            ),
            "{what}"
        );
        let fresh = consortium.try_fresh(&format!("fresh {what}"), roster);
        assert!(
            matches!(
                fresh.err().as_deref(),
                Some(NodeError::Roster(RosterError::RevocationChanged { .. }))
            ),
            "{what}: a fresh node refuses it"
        );
        assert!(
            matches!(
                a.update_roster(roster),
                Err(NodeError::Roster(RosterError::RevocationChanged { .. }))
            ),
            "{what}: a node that applied the first revocation refuses it"
        );
        assert_eq!(
            a.signed_roster(),
            story.revocation,
            "{what}: the roster held"
        );
    }
}

#[test]
fn a_roster_that_drops_or_changes_a_revocation_does_not_replace_the_held_one() {
    let mut consortium = Consortium::new();
    let (a, b) = (consortium.open("chc-jianshe"), consortium.open("xinhua"));
    let story = story(&mut consortium, &a, &b);
    let [r1, r2, ..] = &story.r;
    a.update_roster(&story.revocation).unwrap();
    let expected = state(&a, &story.files);
    let view = consortium.roster.view();
    let version = view.version;

    for (what, cutoff) in [
        ("dropped", None),
        ("changed", Some(vec![Bytes32(hash_of(r1).0)])),
    ] {
        let offered = sign(&mut rebuilt(&view, cutoff, version));
        // Its own history is sound: only the node that held the revocation can tell.
        SignedRoster::verify(&offered, &Identity::from_secret(AUTHORITY).public_key()).unwrap();
        assert!(
            matches!(
                a.update_roster(&offered),
                Err(NodeError::Roster(RosterError::RevocationChanged { key }))
                    if key == Identity::from_secret(REVOKED).public_key()
            ),
            "{what}"
        );
        assert_eq!(
            a.signed_roster(),
            story.revocation,
            "{what}: the roster held"
        );
    }
    // The same cut-off recorded again, at another time, draws the same line: accepted.
    let same = sign(&mut rebuilt(
        &view,
        Some(vec![Bytes32(hash_of(r2).0)]),
        version,
    ));
    assert!(a.update_roster(&same).unwrap().version() > version);
    assert_eq!(state(&a, &story.files), expected);
    assert_settled(&a);
}

#[test]
fn a_node_that_applied_a_revocation_and_a_fresh_node_draw_the_same_line() {
    let mut consortium = Consortium::new();
    let (a, b) = (consortium.open("chc-jianshe"), consortium.open("xinhua"));
    let story = story(&mut consortium, &a, &b);
    let r3 = &story.r[2];
    a.update_roster(&story.revocation).unwrap();
    let later = sign(&mut revoked_again(
        &consortium.roster,
        &[Bytes32(hash_of(r3).0)],
    ));

    // Jianshe is offered the later roster; a new node is started with it, and where it is
    // refused, with the roster its peers hold.
    let _ = a.update_roster(&later);
    let fresh = consortium
        .try_fresh("fresh", &later)
        .or_else(|_| consortium.try_fresh("fresh", &a.signed_roster()))
        .unwrap();
    for envelope in &story.all {
        fresh.ingest(envelope).unwrap();
    }
    assert_eq!(fresh.signed_roster(), a.signed_roster());
    assert_eq!(state(&fresh, &story.files), state(&a, &story.files));
    assert_settled(&a);
    assert_settled(&fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_a_roster_that_drops_a_revocation_is_not_struck() {
    let mut consortium = common::Consortium::new(3);
    let nodes: Vec<Arc<Node>> = (0..2).map(|i| consortium.node(i)).collect();
    // Member 0 applies the revocation of member 2; member 1 never held it, and adopts a roster
    // the authority rebuilt without it, which member 0 refuses.
    let revocation = consortium.revoke("member-2");
    nodes[0].update_roster(&revocation).unwrap();
    let view = consortium.document.view();
    let without = sign(&mut rebuilt(&view, None, view.version));
    nodes[1].update_roster(&without).unwrap();
    assert!(nodes[0].update_roster(&without).is_err());

    let addresses = [memory_address(), memory_address()];
    let handles = [
        start(&nodes[0], &addresses[0], vec![]),
        start(&nodes[1], &addresses[1], vec![addresses[0].clone()]),
    ];
    // Member 0 asks member 1 for its newer roster at every reconciliation and refuses it each
    // time; member 1 answered honestly, so it is neither struck nor disconnected.
    let peer = handles[1].peer_id();
    let started = Instant::now();
    let mut reconciliations = BTreeSet::new();
    while reconciliations.len() <= SYNC_STRIKES_MAX as usize {
        let stats = handles[0].stats().peers.get(&peer.to_string()).cloned();
        if let Some(stats) = stats {
            assert_eq!(stats.strikes, 0, "{stats:?}");
            reconciliations.extend(stats.last_reconciled_ms);
        }
        assert!(
            started.elapsed() < CONVERGENCE,
            "{} reconciliations",
            reconciliations.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(handles[0].connected().await.unwrap().contains(&peer));
    assert_eq!(nodes[0].signed_roster(), revocation);
    assert_eq!(nodes[1].signed_roster(), without);
    for handle in handles {
        handle.shutdown().await;
    }
}

//! Revocation with a cut-off, on real stores: nodes that learn of a revocation at different
//! times — before or after receiving the revoked key's changes, in any order — end with the
//! same documents and the same quarantine.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{AUTHORITY, add_member, allergy, editor, resident};
use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::automerge::{AutoCommit, ChangeHash};
use estuary_node::model::*;
use estuary_node::node::{
    IngestError, Ingested, Node, NodeConfig, NodeError, REVOKED_HELD_PER_KEY_MAX,
};

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
        }
    }

    fn open(&mut self, member: &str) -> Node {
        let roster = self.signed();
        Node::open(&self.config(self.dir.path().join(member)), Some(&roster)).unwrap()
    }

    /// A new, empty node with Baozhen's key, started with `roster`.
    fn fresh(&self, name: &str, roster: &[u8]) -> Node {
        let data_dir = self.dir.path().join(name);
        std::fs::create_dir_all(&data_dir).unwrap();
        copy_key(&self.dir.path().join("chc-baozhen"), &data_dir);
        Node::open(&self.config(data_dir), Some(roster)).unwrap()
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

//! The node on each storage engine: a new node's store is log-structured unless its config
//! names sled, and keeps what it wrote across restarts; a node on sled stays there until its
//! config names the log-structured engine, then moves at a restart keeping every change, its
//! witness reporting nothing lost.

mod common;

use common::{allergy, editor, resident, single_node};
use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::*;
use estuary_node::replica::Node;
use estuary_node::store::StoreEngine;

/// Files written at each step.
const FILES: usize = 6;

/// Writes `FILES` health files of two changes each; returns every change written.
fn write_files(node: &Node, tag: &str) -> Vec<(DocumentId, ChangeHash)> {
    let by = editor("chc-a");
    let mut written = Vec::new();
    for n in 0..FILES {
        let (id, created) = node
            .create_health_file(&by, &resident(&format!("{tag} {n}")))
            .unwrap();
        let allergy = node
            .apply_health_file(id, &by, &allergy("penicillin"))
            .unwrap();
        written.extend([(id, created), (id, allergy)]);
    }
    written
}

/// Every change in `written` is held, every file reads, and `verify` finds nothing wrong
/// (nor a loss the witness would report).
fn holds_all(node: &Node, written: &[(DocumentId, ChangeHash)]) {
    for (document, hash) in written {
        assert!(node.has_change(*document, hash).unwrap());
        assert_eq!(node.health_file(*document).unwrap().allergies.len(), 1);
    }
    let report = node.verify().unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(report.envelopes, written.len());
}

#[test]
fn a_node_on_the_log_structured_store_keeps_what_it_wrote_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, roster) = single_node(dir.path(), "chc-a");
    // A new store with no engine named is log-structured.
    config.store_engine = None;
    let mut written = {
        let node = Node::open(&config, Some(&roster)).unwrap();
        assert_eq!(node.store_engine(), StoreEngine::Lsm);
        write_files(&node, "First")
    };
    let node = Node::open(&config, None).unwrap();
    assert_eq!(node.store_engine(), StoreEngine::Lsm);
    holds_all(&node, &written);
    written.extend(write_files(&node, "Second"));
    drop(node);
    // A config asking for sled does not move a log-structured store back.
    config.store_engine = Some(StoreEngine::Sled);
    let node = Node::open(&config, None).unwrap();
    assert_eq!(node.store_engine(), StoreEngine::Lsm);
    holds_all(&node, &written);
}

#[test]
fn a_sled_node_moved_to_the_log_structured_store_keeps_every_change_and_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, roster) = single_node(dir.path(), "chc-a");
    config.store_engine = Some(StoreEngine::Sled);
    let (written, audit) = {
        let node = Node::open(&config, Some(&roster)).unwrap();
        assert_eq!(node.store_engine(), StoreEngine::Sled);
        (write_files(&node, "Sled"), node.audit_sequence())
    };
    // With no engine named, as a config of an earlier release has none, it stays on sled.
    config.store_engine = None;
    assert_eq!(
        Node::open(&config, None).unwrap().store_engine(),
        StoreEngine::Sled
    );
    config.store_engine = Some(StoreEngine::Lsm);
    let node = Node::open(&config, None).unwrap();
    assert_eq!(node.store_engine(), StoreEngine::Lsm);
    holds_all(&node, &written);
    assert_eq!(node.audit_sequence(), audit, "the audit chain moved whole");
    assert!(node.verify_audit().is_none(), "and still verifies");
    // It writes on, and keeps what it wrote after the move too.
    let after = write_files(&node, "Moved");
    drop(node);
    let node = Node::open(&config, None).unwrap();
    holds_all(&node, &[written, after].concat());
}

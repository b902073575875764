//! The authority's roster commands with the real binary: a revocation is final, and a roster
//! whose history changes one is never signed.

mod common;

use std::path::Path;

use common::estuary;
use estuary_node::model::automerge::transaction::Transactable;
use estuary_node::model::automerge::{self, ObjType, ReadDoc, ScalarValue};
use estuary_node::model::{Actor, Roster};

/// A node key to add and revoke (any 32 bytes; nothing runs with it).
const KEY: &str = "0303030303030303030303030303030303030303030303030303030303030303";

fn succeeds(dir: &Path, args: &[&str]) {
    let output = estuary(dir, args);
    assert!(
        output.status.success(),
        "estuary {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a command that must fail, and returns what it printed on stderr.
fn fails(dir: &Path, args: &[&str]) -> String {
    let output = estuary(dir, args);
    assert!(!output.status.success(), "estuary {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn revoke(cutoff: &str) -> Vec<&str> {
    let mut args = vec!["roster", "revoke", "--dir", "auth", "--key", KEY];
    args.extend(["--cutoff", cutoff, "--reason", "node compromised"]);
    args
}

#[test]
fn a_key_is_revoked_once_and_a_roster_that_revokes_it_again_is_never_signed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    succeeds(
        root,
        &["init", "--authority", "--data-dir", "auth", "--json"],
    );
    succeeds(
        root,
        &[
            "roster",
            "add",
            "--dir",
            "auth",
            "--institution",
            "dh-chongming-2",
            "--name",
            "Chongming District Hospital No. 2",
            "--kind",
            "district_hospital",
            "--key",
            KEY,
        ],
    );
    succeeds(root, &revoke(&"01".repeat(32)));
    let refused = fails(root, &revoke(&"02".repeat(32)));
    assert!(refused.contains("a revocation is final"), "{refused}");
    succeeds(root, &["roster", "sign", "--dir", "auth"]);

    // The same key revoked again by a raw edit of the roster document, as a hand-crafted
    // roster or an older tool's could be: signing it is refused, and the signed roster stays.
    let document = root.join("auth/roster.automerge");
    let signed = std::fs::read(root.join("auth/roster.signed")).unwrap();
    let roster = Roster::load(
        &std::fs::read(&document).unwrap(),
        &Actor::from_bytes(vec![1; 32]),
    )
    .unwrap();
    let mut doc = roster.automerge().clone();
    let (_, revocations) = doc.get(automerge::ROOT, "revocations").unwrap().unwrap();
    let entry = doc.put_object(&revocations, KEY, ObjType::Map).unwrap();
    doc.put(&entry, "at", ScalarValue::Timestamp(2_000))
        .unwrap();
    doc.put(&entry, "reason", "a later line").unwrap();
    let list = doc.put_object(&entry, "cutoff", ObjType::List).unwrap();
    doc.insert(&list, 0, ScalarValue::Bytes(vec![2; 32]))
        .unwrap();
    std::fs::write(&document, doc.save()).unwrap();
    let refused = fails(root, &["roster", "sign", "--dir", "auth"]);
    assert!(refused.contains("every node would refuse"), "{refused}");
    assert!(refused.contains("a revocation is final"), "{refused}");
    assert_eq!(
        std::fs::read(root.join("auth/roster.signed")).unwrap(),
        signed
    );
}

#[test]
fn an_erasure_is_ordered_once_signed_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    succeeds(
        root,
        &["init", "--authority", "--data-dir", "auth", "--json"],
    );
    let file = "0123456789abcdef0123456789abcdef";
    let erase = |document: &'static str| {
        [
            "roster",
            "erase",
            "--dir",
            "auth",
            "--document",
            document,
            "--order",
            "court order 2026-117",
        ]
    };
    let refused = fails(root, &erase("not-an-id"));
    assert!(refused.contains("--document"), "{refused}");
    succeeds(root, &erase(file));
    let refused = fails(root, &erase(file));
    assert!(refused.contains("already erased"), "{refused}");
    succeeds(root, &["roster", "sign", "--dir", "auth"]);
    let shown = estuary(root, &["roster", "show", "--dir", "auth", "--json"]);
    let view: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(view["erasures"][0]["document"], file);
    assert_eq!(view["erasures"][0]["order"], "court order 2026-117");
    let shown = estuary(root, &["roster", "show", "--dir", "auth"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("ERASED HEALTH FILE") && text.contains(file),
        "{text}"
    );
}

#[test]
fn a_member_added_earlier_is_placed_on_the_map_and_roster_show_lists_its_area() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    succeeds(
        root,
        &["init", "--authority", "--data-dir", "auth", "--json"],
    );
    let key = "11".repeat(32);
    succeeds(
        root,
        &[
            "roster",
            "add",
            "--dir",
            "auth",
            "--institution",
            "chc-jianshe",
            "--name",
            "Jianshe Community Health Centre",
            "--kind",
            "community_centre",
            "--key",
            &key,
        ],
    );
    let place = |institution: &'static str| {
        [
            "roster",
            "set-area",
            "--dir",
            "auth",
            "--institution",
            institution,
            "--area",
            "north shore",
        ]
    };
    let refused = fails(root, &place("chc-nowhere"));
    assert!(refused.contains("no such institution"), "{refused}");
    succeeds(root, &place("chc-jianshe"));
    let shown = estuary(root, &["roster", "show", "--dir", "auth", "--json"]);
    let view: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let member = view["institutions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "chc-jianshe")
        .unwrap();
    assert_eq!(member["area"], "north shore");
    let shown = estuary(root, &["roster", "show", "--dir", "auth"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("AREA") && text.contains("north shore"),
        "{text}"
    );
}

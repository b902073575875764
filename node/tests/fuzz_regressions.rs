//! Inputs the fuzzers found, replayed through the ordinary pipeline: each gets a typed
//! outcome, never a panic.

mod common;

use common::{AUTHORITY, add_member};
use estuary_node::envelope::Envelope;
use estuary_node::identity::{Identity, KEY_FILE};
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::replica::{Ingested, Node, NodeConfig};
use sha2::{Digest, Sha256};

/// The `ingest_change` target's member: its key, institution and first health file.
const NODE_KEY: [u8; 32] = [2; 32];

fn fuzz_editor() -> Editor {
    Editor {
        institution: InstitutionId::new("chc-fuzz").unwrap(),
        at: Timestamp(1_700_000_000_000),
    }
}

/// The genuine creation change the `ingest_change` target spliced its input into when the
/// inputs below were found: a health file created by `HealthFile::create` for the target's
/// member, as the model then wrote it (one operation per field; it now writes the file in one
/// batch, which makes other bytes). Kept as bytes so that the inputs replay exactly.
fn template() -> Vec<u8> {
    let hex = include_str!("data/ingest-change-template.hex").trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The target's splice: `patch` XORed into the template at `8 + at % (len − 8)`, then the
/// chunk's checksum made right.
fn spliced(at: u8, patch: &[u8]) -> Vec<u8> {
    let mut bytes = template();
    let at = 8 + usize::from(at) % (bytes.len() - 8);
    for (i, b) in patch.iter().enumerate().take(bytes.len() - at) {
        bytes[at + i] ^= b;
    }
    let checksum = Sha256::digest(&bytes[8..]);
    bytes[4..8].copy_from_slice(&checksum[..4]);
    bytes
}

fn member_node(dir: &std::path::Path) -> Node {
    let data_dir = dir.join("node");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join(KEY_FILE), NODE_KEY).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data_dir.join(KEY_FILE),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    let authority = Identity::from_secret(AUTHORITY);
    let by = fuzz_editor();
    let mut roster = Roster::create(&authority.actor(), &by).unwrap();
    add_member(
        &mut roster,
        &by,
        "chc-fuzz",
        InstitutionKind::CommunityCentre,
        Identity::from_secret(NODE_KEY).public_key(),
    );
    let signed = SignedRoster::sign(&authority, &mut roster).encode();
    Node::open(
        &NodeConfig {
            data_dir,
            authority: authority.public_key(),
            store_engine: Default::default(),
        },
        Some(&signed),
    )
    .unwrap()
}

#[test]
fn a_change_automerge_panics_on_applying_is_quarantined() {
    // ingest_change, crash-f3b7c0a8: input 77 7d b5 68 (splice 0xb5 0x68 at 0x7d). automerge
    // 0.12 panics applying the resulting creation change ("Obj … Missing from Index"); the
    // pipeline applies to a copy inside `catch_unwind`, and quarantines the change.
    let bytes = spliced(0x7d, &[0xb5, 0x68]);
    let mut change = decode_change(&bytes).expect("the spliced change decodes");
    assert!(change.deps().is_empty(), "a creation change");
    let document = document_id_of(&change.hash());
    let envelope = Envelope::sign(&Identity::from_secret(NODE_KEY), document, &mut change).encode();
    let dir = tempfile::tempdir().unwrap();
    let node = member_node(dir.path());
    match node.ingest(&envelope).unwrap() {
        Ingested::Quarantined(_, reason) => {
            assert_eq!(reason, "the change does not apply to its dependencies")
        }
        other => panic!("{other:?}"),
    }
    assert!(node.catalogue().get(document.as_bytes()).is_none());
    assert!(node.verify().unwrap().problems.is_empty());
}

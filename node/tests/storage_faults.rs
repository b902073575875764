//! Storage faults on a stopped node of a three-node network: bytes flipped in its sled files,
//! or the files cut short. The node detects the damage at open or on `verify`, names the
//! documents it can, `repair` takes them out, and re-sync from the peers makes the node whole
//! again: every change the peers hold is back, and `verify` is clean.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::{Consortium, allergy, converge, editor, files_under, memory_address, resident, start};
use estuary_node::model::DocumentId;
use estuary_node::replica::Node;
use estuary_node::store::StoreEngine;

/// Files written at each node before the damage.
const FILES_PER_NODE: usize = 8;

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// One byte flipped inside a stored envelope's signature (of a file a peer wrote).
    FlippedEnvelope,
    /// A byte flipped every 4 KiB through the middle third of every store file.
    FlippedPages,
    /// Every store file cut to 60 % of its length.
    Truncated,
}

/// Damages the stopped node's store; returns whether anything was changed.
///
/// In the log-structured store the damage lands in what the engine wrote: its format marker
/// and lock file are left alone (a marker cut short refuses the store before a byte of data is
/// read), and a journal, which fjall lays out at its full size ahead of the data, counts only
/// up to its last byte written.
fn damage(store: &Path, how: Damage, needle: &[u8], engine: StoreEngine) -> bool {
    let mut changed = false;
    for file in files_under(store) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if engine == StoreEngine::Lsm && (name == "version" || name == "lock") {
            continue;
        }
        let mut bytes = std::fs::read(&file).unwrap();
        let written = match engine {
            StoreEngine::Lsm => bytes
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |last| last + 1),
            StoreEngine::Sled => bytes.len(),
        };
        if written == 0 {
            continue;
        }
        match how {
            Damage::FlippedEnvelope => {
                if let Some(at) = bytes[..written]
                    .windows(needle.len())
                    .position(|w| w == needle)
                {
                    bytes[at + needle.len() / 2] ^= 0x10;
                    std::fs::write(&file, &bytes).unwrap();
                    return true;
                }
            }
            Damage::FlippedPages => {
                let (from, to) = (written / 3, 2 * written / 3);
                for at in (from..to).step_by(4096) {
                    bytes[at] ^= 0x01;
                    changed = true;
                }
                std::fs::write(&file, &bytes).unwrap();
            }
            Damage::Truncated => {
                let file = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                file.set_len(written as u64 * 6 / 10).unwrap();
                changed = true;
            }
        }
    }
    changed
}

/// Every (document, change) a node holds.
fn held(node: &Node) -> BTreeSet<(DocumentId, String)> {
    let ids: Vec<DocumentId> = node
        .catalogue()
        .ids()
        .map(|id| DocumentId::from_bytes(*id))
        .collect();
    ids.into_iter()
        .flat_map(|id| {
            node.change_hashes(id)
                .unwrap()
                .into_iter()
                .map(move |h| (id, h.to_string()))
        })
        .collect()
}

async fn damaged_store_is_detected_repaired_and_resynced(how: Damage, engine: StoreEngine) {
    let mut consortium = Consortium::new(3);
    consortium.store_engine = Some(engine);
    let (a, b) = (consortium.node(0), consortium.node(1));
    let (a_address, b_address) = (memory_address(), memory_address());
    let a_sync = start(&a, &a_address, vec![]);
    let b_sync = start(&b, &b_address, vec![a_address.clone()]);
    let bootstrap = vec![a_address.clone(), b_address.clone()];
    let c_dir = consortium.dir.path().join(&consortium.members[2]);
    let needle = {
        let c = consortium.node(2);
        let c_sync = start(&c, &memory_address(), bootstrap.clone());
        for (i, node) in [&a, &b, &c].into_iter().enumerate() {
            let by = editor(&consortium.members[i]);
            for n in 0..FILES_PER_NODE {
                let (id, _) = node
                    .create_health_file(&by, &resident(&format!("Resident {i}-{n}")))
                    .unwrap();
                node.apply_health_file(id, &by, &allergy("penicillin"))
                    .unwrap();
            }
        }
        converge(
            &[a.clone(), b.clone(), c.clone()],
            &[&a_sync, &b_sync, &c_sync],
            3 * FILES_PER_NODE,
        )
        .await;
        assert!(c.verify().unwrap().problems.is_empty());
        // A signature of a file A wrote, as C stores it.
        let first = DocumentId::from_bytes(*a.catalogue().ids().next().unwrap());
        let envelope = c.envelopes(first).unwrap().remove(0);
        let signature = estuary_node::envelope::Envelope::decode(&envelope)
            .unwrap()
            .signature;
        c_sync.shutdown().await;
        signature
    };
    // C is stopped; the peers keep what they hold.
    let expected = held(&a);
    assert_eq!(expected, held(&b));
    assert!(
        damage(&c_dir.join("store"), how, &needle, engine),
        "{how:?}: nothing to damage"
    );
    let how = (how, engine);

    // Detected at open (the witness: the log lost acknowledged changes) or by verify (a
    // damaged envelope or record, named by document). Never a panic.
    let config = estuary_node::replica::NodeConfig {
        data_dir: c_dir.clone(),
        authority: estuary_node::identity::Identity::from_secret(common::AUTHORITY).public_key(),
        store_engine: Some(engine),
    };
    let c = match Node::open(&config, Some(&consortium.roster)) {
        Ok(node) => node,
        Err(error) => {
            // The engine refuses the files: a typed error at open, naming the store. The operator
            // moves the store aside and the node starts empty, to re-sync everything.
            assert!(
                matches!(
                    error,
                    estuary_node::replica::NodeError::Store(
                        estuary_node::store::StoreError::Damaged { .. }
                    )
                ),
                "{how:?}: {error}"
            );
            assert!(error.to_string().contains("move the `store` folder aside"));
            eprintln!("{how:?}: refused at open: {error}");
            let aside = Node::set_aside_store(&c_dir).unwrap();
            assert!(aside.exists());
            Node::open(&config, Some(&consortium.roster)).unwrap()
        }
    };
    let c = Arc::new(c);
    let report = c.verify().unwrap();
    assert!(
        !report.problems.is_empty(),
        "{how:?}: the damage went unnoticed"
    );
    let named = report.affected_documents();
    let lost = report
        .problems
        .iter()
        .any(|p| p.what.contains("lost") && p.what.contains("acknowledged changes"));
    let missing = expected.len().saturating_sub(held(&c).len());
    eprintln!(
        "{how:?}: {} problems, {} documents named, changes missing {missing}, loss recorded {lost}",
        report.problems.len(),
        named.len()
    );
    assert!(
        !named.is_empty() || lost,
        "{how:?}: the damage is neither named nor counted: {report:?}"
    );

    let repaired = c.repair().unwrap();
    assert_eq!(repaired.discarded, named, "{how:?}");
    for document in &named {
        assert!(c.catalogue().get(document.as_bytes()).is_none());
    }

    // Re-sync from the peers makes C whole.
    let c_sync = start(&c, &memory_address(), bootstrap);
    converge(
        &[a.clone(), b.clone(), c.clone()],
        &[&a_sync, &b_sync, &c_sync],
        3 * FILES_PER_NODE,
    )
    .await;
    assert_eq!(held(&c), expected, "{how:?}: C is not whole again");
    let after = c.verify().unwrap();
    assert!(after.problems.is_empty(), "{how:?}: {after:?}");
    for document in &named {
        assert!(c.health_file(*document).is_ok(), "{how:?}");
    }
    c_sync.shutdown().await;
    a_sync.shutdown().await;
    b_sync.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_envelope_byte_is_named_and_the_document_refetched() {
    damaged_store_is_detected_repaired_and_resynced(Damage::FlippedEnvelope, StoreEngine::Sled)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_through_the_store_files_are_detected_and_resynced() {
    damaged_store_is_detected_repaired_and_resynced(Damage::FlippedPages, StoreEngine::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_store_files_are_detected_and_resynced() {
    damaged_store_is_detected_repaired_and_resynced(Damage::Truncated, StoreEngine::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_envelope_byte_in_the_log_structured_store_is_named_and_refetched() {
    damaged_store_is_detected_repaired_and_resynced(Damage::FlippedEnvelope, StoreEngine::Lsm)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bit_flips_through_the_log_structured_store_are_detected_and_resynced() {
    damaged_store_is_detected_repaired_and_resynced(Damage::FlippedPages, StoreEngine::Lsm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_log_structured_store_is_detected_and_resynced() {
    damaged_store_is_detected_repaired_and_resynced(Damage::Truncated, StoreEngine::Lsm).await;
}

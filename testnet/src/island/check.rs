//! The convergence checker: once faults stop, every honest node must hold the same heads for
//! every document, every acknowledged write must be everywhere, nothing may be anywhere that
//! was not written, every document must validate, and the quarantine must be the same
//! everywhere.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One document as a node holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DocumentState {
    /// Its heads, hex, sorted.
    pub heads: Vec<String>,
    /// Every change hash stored, hex.
    pub changes: BTreeSet<String>,
}

/// What the checker reads from one node.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeState {
    /// Documents by id.
    pub documents: BTreeMap<String, DocumentState>,
    /// Quarantined changes with their reasons.
    pub quarantine: BTreeSet<(String, String)>,
    /// Problems `verify` found and model invariants that failed.
    pub violations: Vec<String>,
    /// Changes still waiting for their dependencies.
    pub pending: u64,
}

/// What the checker concluded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    /// Every node holds the same heads for every document.
    pub identical_heads: bool,
    /// Acknowledged writes missing on some node.
    pub lost: u64,
    /// Changes present on some node that no one acknowledged writing.
    pub phantom: u64,
    /// `verify` problems and model invariant failures, over all nodes.
    pub invariant_violations: u64,
    /// Every node holds the same quarantine.
    pub quarantine_identical: bool,
    /// Documents compared.
    pub documents: u64,
    /// Changes still waiting for their dependencies, over all nodes (none expected once
    /// honest nodes agree).
    pub pending: u64,
    /// Up to 20 examples of what failed (ids and hashes only).
    pub examples: Vec<String>,
}

impl Verdict {
    /// Whether the run passes.
    pub fn passed(&self) -> bool {
        self.identical_heads
            && self.lost == 0
            && self.phantom == 0
            && self.invariant_violations == 0
            && self.quarantine_identical
    }
}

/// A write some node acknowledged: its document and change hash, hex.
pub type Acknowledged = (String, String);

/// Compares the nodes' states against each other and against the acknowledged writes.
/// `extra_changes` are changes written outside the workload (none in honest presets).
pub fn check(nodes: &[NodeState], acknowledged: &BTreeSet<Acknowledged>) -> Verdict {
    let mut verdict = Verdict {
        identical_heads: true,
        quarantine_identical: true,
        ..Verdict::default()
    };
    let example = |verdict: &mut Verdict, text: String| {
        if verdict.examples.len() < 20 {
            verdict.examples.push(text);
        }
    };
    let Some(first) = nodes.first() else {
        return verdict;
    };
    let ids: BTreeSet<&String> = nodes.iter().flat_map(|n| n.documents.keys()).collect();
    verdict.documents = ids.len() as u64;
    for id in &ids {
        let reference = first.documents.get(*id).map(|d| &d.heads);
        for (index, node) in nodes.iter().enumerate() {
            if node.documents.get(*id).map(|d| &d.heads) != reference {
                verdict.identical_heads = false;
                example(
                    &mut verdict,
                    format!("node {index} differs on document {id}"),
                );
                break;
            }
        }
    }
    for (document, change) in acknowledged {
        for (index, node) in nodes.iter().enumerate() {
            let held = node
                .documents
                .get(document)
                .is_some_and(|d| d.changes.contains(change));
            if !held {
                verdict.lost += 1;
                example(
                    &mut verdict,
                    format!("node {index} lacks acknowledged change {change} of {document}"),
                );
            }
        }
    }
    let mut present: BTreeSet<(&String, &String)> = BTreeSet::new();
    for node in nodes {
        for (id, document) in &node.documents {
            for change in &document.changes {
                present.insert((id, change));
            }
        }
    }
    for (document, change) in present {
        if !acknowledged.contains(&(document.clone(), change.clone())) {
            verdict.phantom += 1;
            example(
                &mut verdict,
                format!("change {change} of {document} was never acknowledged"),
            );
        }
    }
    for (index, node) in nodes.iter().enumerate() {
        verdict.pending += node.pending;
        verdict.invariant_violations += node.violations.len() as u64;
        for violation in node.violations.iter().take(3) {
            example(&mut verdict, format!("node {index}: {violation}"));
        }
        if node.quarantine != first.quarantine {
            verdict.quarantine_identical = false;
            example(&mut verdict, format!("node {index}'s quarantine differs"));
        }
    }
    verdict
}

/// The share of documents on which every node agrees (same digest), from each node's
/// catalogue digests; 1.0 when there are none.
pub fn agreement(catalogues: &[BTreeMap<[u8; 16], [u8; 32]>]) -> (u64, u64) {
    let ids: BTreeSet<&[u8; 16]> = catalogues.iter().flat_map(|c| c.keys()).collect();
    let agreed = ids
        .iter()
        .filter(|id| {
            let first = catalogues.first().and_then(|c| c.get(**id));
            first.is_some() && catalogues.iter().all(|c| c.get(**id) == first)
        })
        .count();
    (agreed as u64, ids.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(docs: &[(&str, &[&str])]) -> NodeState {
        NodeState {
            documents: docs
                .iter()
                .map(|(id, changes)| {
                    (
                        id.to_string(),
                        DocumentState {
                            heads: vec![changes.last().unwrap().to_string()],
                            changes: changes.iter().map(|c| c.to_string()).collect(),
                        },
                    )
                })
                .collect(),
            ..NodeState::default()
        }
    }

    #[test]
    fn the_checker_finds_lost_phantom_and_divergent_documents() {
        let acked: BTreeSet<Acknowledged> = [("d1", "a"), ("d1", "b")]
            .iter()
            .map(|(d, c)| (d.to_string(), c.to_string()))
            .collect();
        let whole = node(&[("d1", &["a", "b"])]);
        assert!(check(&[whole.clone(), whole.clone()], &acked).passed());

        let behind = node(&[("d1", &["a"])]);
        let verdict = check(&[whole.clone(), behind], &acked);
        assert!(!verdict.identical_heads);
        assert_eq!(verdict.lost, 1);

        let invented = node(&[("d1", &["a", "b", "z"])]);
        let verdict = check(&[invented.clone(), invented], &acked);
        assert_eq!(verdict.phantom, 1);
        assert!(!verdict.passed());

        let mut quarantined = whole.clone();
        quarantined.quarantine.insert(("x".into(), "bad".into()));
        assert!(!check(&[whole, quarantined], &acked).quarantine_identical);
    }
}

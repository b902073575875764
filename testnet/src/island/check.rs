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
    /// Quarantined changes (document, change, reason), hex.
    pub quarantine: BTreeSet<(String, String, String)>,
    /// Changes held pending (document, change), hex.
    pub pending_changes: BTreeSet<(String, String)>,
    /// When this node first accepted each change it holds (change hex → milliseconds since
    /// the epoch, by its audit log).
    pub accepted_at: BTreeMap<String, i64>,
    /// The author key (hex) of each change held, when the checker asked for one key's
    /// changes: (document, change) of that key.
    pub authored: BTreeSet<(String, String)>,
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
    /// Acknowledged writes that are nowhere because a change they build on was refused
    /// (quarantined with it on a node that held both): expected only after a revocation.
    pub collateral: u64,
    /// Acknowledged writes expected to be refused (a revoked key's, past its cut-off) that
    /// some node holds.
    pub refused_but_held: u64,
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
            && self.refused_but_held == 0
    }
}

/// A write some node acknowledged: its document and change hash, hex.
pub type Acknowledged = (String, String);

/// The pipeline's quarantine reason for a change built on a quarantined one.
const DEPENDS_ON_QUARANTINED: &str = "it depends on a quarantined change";

/// What a Byzantine run expects besides the ordinary rules.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    /// Acknowledged writes that must end up refused everywhere (a revoked key's past its
    /// cut-off): neither lost nor allowed anywhere.
    pub refused: BTreeSet<Acknowledged>,
    /// Whether an acknowledged write may be refused because it builds on a refused one.
    pub collateral_allowed: bool,
    /// Bad changes (document, change) from a rogue: checked by the Byzantine judge, and left
    /// out of the quarantine comparison (only the nodes that received one hold it).
    pub bad: BTreeSet<Acknowledged>,
}

/// Compares the nodes' states against each other and against the acknowledged writes.
pub fn check(
    nodes: &[NodeState],
    acknowledged: &BTreeSet<Acknowledged>,
    expected: &Expected,
) -> Verdict {
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
    let held_by = |node: &NodeState, document: &String, change: &String| {
        node.documents
            .get(document)
            .is_some_and(|d| d.changes.contains(change))
    };
    // Refused with a refused change it builds on (the pipeline's reason for it).
    let refused_with_its_dependency = |document: &String, change: &String| {
        nodes.iter().any(|n| {
            n.quarantine.iter().any(|(d, c, reason)| {
                d == document && c == change && reason == DEPENDS_ON_QUARANTINED
            })
        })
    };
    // Refused writes (and what was refused with them) are left out of the quarantine
    // comparison: only the nodes that received them hold them.
    let mut refused_here: BTreeSet<Acknowledged> = expected.refused.clone();
    refused_here.extend(expected.bad.iter().cloned());
    for ack @ (document, change) in acknowledged {
        if expected.refused.contains(ack) {
            for (index, node) in nodes.iter().enumerate() {
                if held_by(node, document, change) {
                    verdict.refused_but_held += 1;
                    example(
                        &mut verdict,
                        format!("node {index} holds {change} of {document}, past the cut-off"),
                    );
                }
            }
            continue;
        }
        if expected.collateral_allowed
            && nodes.iter().all(|n| !held_by(n, document, change))
            && refused_with_its_dependency(document, change)
        {
            verdict.collateral += 1;
            refused_here.insert(ack.clone());
            continue;
        }
        for (index, node) in nodes.iter().enumerate() {
            if !held_by(node, document, change) {
                verdict.lost += 1;
                example(
                    &mut verdict,
                    format!("node {index} lacks acknowledged change {change} of {document}"),
                );
            }
        }
    }
    let compared = |node: &NodeState| -> BTreeSet<(String, String, String)> {
        node.quarantine
            .iter()
            .filter(|(d, c, _)| !refused_here.contains(&(d.clone(), c.clone())))
            .cloned()
            .collect()
    };
    let first_quarantine = compared(first);
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
        if compared(node) != first_quarantine {
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
        let none = Expected::default();
        let whole = node(&[("d1", &["a", "b"])]);
        assert!(check(&[whole.clone(), whole.clone()], &acked, &none).passed());

        let behind = node(&[("d1", &["a"])]);
        let verdict = check(&[whole.clone(), behind], &acked, &none);
        assert!(!verdict.identical_heads);
        assert_eq!(verdict.lost, 1);

        let invented = node(&[("d1", &["a", "b", "z"])]);
        let verdict = check(&[invented.clone(), invented], &acked, &none);
        assert_eq!(verdict.phantom, 1);
        assert!(!verdict.passed());

        let mut quarantined = whole.clone();
        quarantined
            .quarantine
            .insert(("d1".into(), "x".into(), "bad".into()));
        assert!(!check(&[whole.clone(), quarantined.clone()], &acked, &none).quarantine_identical);
        // A rogue's bad change held by one node only is not a difference.
        let rogue = Expected {
            bad: [("d1".to_string(), "x".to_string())].into(),
            ..Expected::default()
        };
        assert!(check(&[whole.clone(), quarantined], &acked, &rogue).quarantine_identical);

        // A revoked key's write past the cut-off: expected nowhere, not lost; held, a failure.
        let revoked = Expected {
            refused: [("d1".to_string(), "b".to_string())].into(),
            ..Expected::default()
        };
        let cut = node(&[("d1", &["a"])]);
        let verdict = check(&[cut.clone(), cut.clone()], &acked, &revoked);
        assert!(verdict.passed(), "{verdict:?}");
        let verdict = check(&[whole.clone(), cut], &acked, &revoked);
        assert_eq!(verdict.refused_but_held, 1);
        assert!(!verdict.passed());

        // A write built on a refused one: collateral where allowed, lost where not.
        let mut refused_with = node(&[("d1", &["a"])]);
        refused_with
            .quarantine
            .insert(("d1".into(), "b".into(), DEPENDS_ON_QUARANTINED.into()));
        let others = node(&[("d1", &["a"])]);
        let allowed = Expected {
            collateral_allowed: true,
            ..Expected::default()
        };
        let verdict = check(&[refused_with.clone(), others.clone()], &acked, &allowed);
        assert_eq!((verdict.collateral, verdict.lost), (1, 0));
        assert!(verdict.passed(), "{verdict:?}");
        let verdict = check(&[refused_with, others.clone()], &acked, &none);
        assert_eq!(verdict.lost, 2);
        // Quarantined for a reason of its own: lost, even where collateral is allowed.
        let mut wrongly = node(&[("d1", &["a"])]);
        wrongly
            .quarantine
            .insert(("d1".into(), "b".into(), "some other rule".into()));
        let verdict = check(&[wrongly, others], &acked, &allowed);
        assert_eq!((verdict.collateral, verdict.lost), (0, 2));
    }
}

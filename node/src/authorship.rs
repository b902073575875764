//! Compact authorship: who wrote each change of a set, proven by one signature per author's
//! latest change instead of one per change.
//!
//! A change's signature covers `document id ‖ change hash`, and the hash fixes the change's
//! dependencies and so, transitively, every change below it. An author's signature over a
//! change therefore vouches for every change of that author among its ancestors: nobody
//! else can have written them, since their bytes are fixed by the hash the author signed,
//! and an honest node builds on its own changes only after signing them. So within a set of
//! changes of one document, a change is proven when it carries its author's signature, or
//! when a change of the same author (the node key, whatever its incarnation) that descends
//! from it is proven. Every change is then proven by the signatures of the changes that are
//! their author's *latest* in the set: those no change of the same author descends from.
//!
//! Each per-change guarantee holds: a change in another's name needs that author's signature
//! over a descendant, whose hash fixes the change; the document id is signed, so nothing can
//! be replayed into another document; a revocation's cut-off is decided on change hashes and
//! authors, which do not depend on which signature proves them.

use std::collections::HashMap;

use crate::envelope::{EnvelopeError, author_of, verify_signature};
use crate::model::automerge::{Change, ChangeHash};
use crate::model::{Bytes32, DocumentId};

/// Most changes one set may hold to be proven at once: what one fetched document may carry
/// (`sync::protocol::SYNC_SIGNATURES_MAX`). Finding each author's latest change takes a bit
/// per change and author, and each author needs a signature, so a set within both bounds
/// costs at most 16,384 × 16,384 bits (32 MiB) however its bytes were crafted.
pub const CHANGES_PROVEN_MAX: usize = 16_384;

/// A change whose authorship is proven, with the signature that proves it when it is its
/// author's latest in its set (`None`: a later change of the same author vouches for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authored {
    /// The change's hash.
    pub hash: ChangeHash,
    /// Its author's node key.
    pub author: Bytes32,
    /// Its own signature, checked; only for an author's latest changes.
    pub signature: Option<[u8; 64]>,
}

/// Why a set of changes is not proven. None of these carries patient data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorshipError {
    /// A change's automerge actor is not a node key.
    #[error("change {index} of the set has an author that is not a node key")]
    NotANodeKey {
        /// Its place in the set.
        index: usize,
    },
    /// An author's latest change carries no signature, so nothing proves its author wrote it
    /// or what came before it.
    #[error("change {index} of the set is its author's latest and carries no signature")]
    Unsigned {
        /// Its place in the set.
        index: usize,
    },
    /// More changes than `CHANGES_PROVEN_MAX`.
    #[error("the set holds {count} changes, more than the {CHANGES_PROVEN_MAX} proven at once")]
    TooManyChanges {
        /// How many.
        count: usize,
    },
    /// More authors than signatures: some author's latest change carries none.
    #[error("the set has {authors} authors and only {signatures} signatures")]
    TooManyAuthors {
        /// Distinct authors.
        authors: usize,
        /// Signatures given.
        signatures: usize,
    },
    /// An author's latest change carries a signature that does not verify.
    #[error("the signature of change {index} of the set does not match it and its author")]
    BadSignature {
        /// Its place in the set.
        index: usize,
    },
}

/// For changes given each after its dependencies (as `get_changes(&[])` lists them), whether
/// each is its author's latest in the set: no change of the same author descends from it.
/// `authors[i]` is the author of `hashes[i]`, whose dependencies are `deps[i]`; dependencies
/// outside the set are ignored. A change listed before one of its own dependencies is
/// reported latest rather than vouched for, so the answer errs towards asking for more
/// signatures, never fewer.
pub fn latest_by_author(
    hashes: &[ChangeHash],
    deps: &[&[ChangeHash]],
    authors: &[Bytes32],
) -> Vec<bool> {
    let count = hashes.len().min(deps.len()).min(authors.len());
    let mut distinct: Vec<Bytes32> = authors[..count].to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let author_index: Vec<usize> = authors[..count]
        .iter()
        .map(|a| distinct.binary_search(a).unwrap_or(0))
        .collect();
    let words = distinct.len().div_ceil(64).max(1);
    let place: HashMap<ChangeHash, usize> = hashes[..count]
        .iter()
        .enumerate()
        .map(|(i, h)| (*h, i))
        .collect();
    // below[i]: the authors of the changes that descend from change i, a bit per author.
    let mut below = vec![0u64; count * words];
    for child in (0..count).rev() {
        let mut carried = below[child * words..(child + 1) * words].to_vec();
        carried[author_index[child] / 64] |= 1 << (author_index[child] % 64);
        for dep in deps[child] {
            if let Some(&parent) = place.get(dep)
                && parent < child
            {
                for (word, bits) in carried.iter().enumerate() {
                    below[parent * words + word] |= bits;
                }
            }
        }
    }
    (0..count)
        .map(|i| {
            let a = author_index[i];
            below[i * words + a / 64] & (1 << (a % 64)) == 0
        })
        .collect()
}

/// Proves who wrote each of `changes` (one document's, each after its dependencies) from
/// `signatures` by change hash: every author's latest change must carry a signature that
/// verifies (strictly, as an envelope's); the others are vouched for by those. Signatures of
/// other changes are not read. Returns one `Authored` per change, in order.
pub fn authenticate(
    document: &DocumentId,
    changes: &[Change],
    signatures: &HashMap<[u8; 32], [u8; 64]>,
) -> Result<Vec<Authored>, AuthorshipError> {
    if changes.len() > CHANGES_PROVEN_MAX {
        return Err(AuthorshipError::TooManyChanges {
            count: changes.len(),
        });
    }
    let mut authors = Vec::with_capacity(changes.len());
    for (index, change) in changes.iter().enumerate() {
        let author = author_of(change.actor_id().to_bytes())
            .ok_or(AuthorshipError::NotANodeKey { index })?;
        authors.push(Bytes32(author));
    }
    // Each author needs a signature: checked before anything is allocated per author.
    let mut distinct = authors.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() > signatures.len() {
        return Err(AuthorshipError::TooManyAuthors {
            authors: distinct.len(),
            signatures: signatures.len(),
        });
    }
    let hashes: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
    let deps: Vec<&[ChangeHash]> = changes.iter().map(Change::deps).collect();
    let latest = latest_by_author(&hashes, &deps, &authors);
    let mut proven = Vec::with_capacity(changes.len());
    for (index, change) in changes.iter().enumerate() {
        let signature = if latest[index] {
            let signature = signatures
                .get(&hashes[index].0)
                .ok_or(AuthorshipError::Unsigned { index })?;
            verify_signature(document, change, signature).map_err(|error| match error {
                EnvelopeError::NotANodeKey => AuthorshipError::NotANodeKey { index },
                _ => AuthorshipError::BadSignature { index },
            })?;
            Some(*signature)
        } else {
            None
        };
        proven.push(Authored {
            hash: hashes[index],
            author: authors[index],
            signature,
        });
    }
    Ok(proven)
}

/// The changes whose signatures prove a set: its authors' latest, as `latest_by_author`
/// finds them, by hash.
pub fn cover(changes: &[Change]) -> Vec<(ChangeHash, Bytes32)> {
    let hashes: Vec<ChangeHash> = changes.iter().map(Change::hash).collect();
    let deps: Vec<&[ChangeHash]> = changes.iter().map(Change::deps).collect();
    latest_entries(
        hashes,
        &deps,
        changes.iter().map(|c| c.actor_id().to_bytes()),
    )
}

/// `cover` from changes' metadata, which a document lists without rebuilding each change
/// (`get_changes_meta`): what a node computes for its own documents.
pub fn cover_of_metadata(
    changes: &[crate::model::automerge::ChangeMetadata<'_>],
) -> Vec<(ChangeHash, Bytes32)> {
    let hashes: Vec<ChangeHash> = changes.iter().map(|c| c.hash).collect();
    let deps: Vec<&[ChangeHash]> = changes.iter().map(|c| c.deps.as_slice()).collect();
    latest_entries(hashes, &deps, changes.iter().map(|c| c.actor.to_bytes()))
}

/// Each author's latest change, with its author, from the parts `latest_by_author` reads.
fn latest_entries<'a>(
    hashes: Vec<ChangeHash>,
    deps: &[&[ChangeHash]],
    actors: impl Iterator<Item = &'a [u8]>,
) -> Vec<(ChangeHash, Bytes32)> {
    let authors: Vec<Bytes32> = actors
        .map(|actor| Bytes32(author_of(actor).unwrap_or([0; 32])))
        .collect();
    latest_by_author(&hashes, deps, &authors)
        .into_iter()
        .zip(hashes.into_iter().zip(authors))
        .filter_map(|(latest, entry)| latest.then_some(entry))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn only_the_changes_no_change_of_their_author_descends_from_are_latest() {
        // a1 ← b1 ← a2 ← b2, and c1 concurrent with a2 on b1.
        let hashes = [h(1), h(2), h(3), h(4), h(5)];
        let deps: [&[ChangeHash]; 5] = [&[], &[h(1)], &[h(2)], &[h(3)], &[h(2)]];
        let (a, b, c) = (Bytes32([1; 32]), Bytes32([2; 32]), Bytes32([3; 32]));
        let authors = [a, b, a, b, c];
        assert_eq!(
            latest_by_author(&hashes, &deps, &authors),
            vec![false, false, true, true, true]
        );
        // An author with two concurrent latest changes needs both signed.
        let deps: [&[ChangeHash]; 3] = [&[], &[h(1)], &[h(1)]];
        assert_eq!(
            latest_by_author(&hashes[..3], &deps, &[a, a, a]),
            vec![false, true, true]
        );
    }

    #[test]
    fn more_than_sixty_four_authors_are_told_apart() {
        // A chain of 70 changes by 70 authors, then the first author again at the end.
        let count = 71;
        let hashes: Vec<ChangeHash> = (0..count).map(|i| ChangeHash([i as u8; 32])).collect();
        let deps: Vec<Vec<ChangeHash>> = (0..count)
            .map(|i| if i == 0 { vec![] } else { vec![hashes[i - 1]] })
            .collect();
        let deps: Vec<&[ChangeHash]> = deps.iter().map(Vec::as_slice).collect();
        let authors: Vec<Bytes32> = (0..count)
            .map(|i| Bytes32([(i % 70) as u8 + 1; 32]))
            .collect();
        let latest = latest_by_author(&hashes, &deps, &authors);
        assert!(
            !latest[0],
            "the first author's later change vouches for its first"
        );
        assert!(latest[1..].iter().all(|l| *l));
    }

    #[test]
    fn a_change_listed_before_its_dependency_asks_for_more_signatures_not_fewer() {
        let hashes = [h(2), h(1)];
        let deps: [&[ChangeHash]; 2] = [&[h(1)], &[]];
        let a = Bytes32([1; 32]);
        assert_eq!(latest_by_author(&hashes, &deps, &[a, a]), vec![true, true]);
    }
}

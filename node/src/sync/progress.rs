//! Documents in progress: queued or in flight for sync or fetch, each with the one peer it is
//! worked on with, until its changes are ingested. The whole is bounded, and so is each
//! peer's share of it, so that a peer announcing documents it never serves holds at most its
//! share and every other peer's documents still find room.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;

use super::{DOCUMENTS_IN_PROGRESS_MAX, DOCUMENTS_IN_PROGRESS_PER_PEER_MAX};
use crate::model::DocumentId;

/// Documents in progress, by the peer each is worked on with.
#[derive(Debug, Default)]
pub(super) struct InProgress {
    /// Every document in progress, with any peer.
    documents: HashSet<DocumentId>,
    /// The documents in progress with each peer (only peers with some).
    by_peer: HashMap<PeerId, HashSet<DocumentId>>,
    /// Documents released one by one so far (done, or given up on): how work moves.
    finished: u64,
}

impl InProgress {
    /// Takes `document` to work on with `peer`. Refused if it is in progress already (with
    /// any peer: a document is worked on with one peer at a time), if `peer` holds its share,
    /// or if the whole budget is used.
    pub(super) fn take(&mut self, peer: PeerId, document: DocumentId) -> bool {
        if !self.has_room(&peer) || !self.documents.insert(document) {
            return false;
        }
        self.by_peer.entry(peer).or_default().insert(document);
        true
    }

    /// Whether `peer` may take another document (its share and the whole budget have room).
    pub(super) fn has_room(&self, peer: &PeerId) -> bool {
        self.documents.len() < DOCUMENTS_IN_PROGRESS_MAX
            && self.of_peer(peer) < DOCUMENTS_IN_PROGRESS_PER_PEER_MAX
    }

    /// Releases `document` if it is in progress with `peer`. A peer's answer cannot release
    /// a document another peer works on.
    pub(super) fn release(&mut self, peer: &PeerId, document: &DocumentId) {
        let Some(held) = self.by_peer.get_mut(peer) else {
            return;
        };
        if held.remove(document) {
            self.documents.remove(document);
            self.finished += 1;
        }
        if held.is_empty() {
            self.by_peer.remove(peer);
        }
    }

    /// Releases every document in progress with `peer`.
    pub(super) fn release_peer(&mut self, peer: &PeerId) {
        for document in self.by_peer.remove(peer).unwrap_or_default() {
            self.documents.remove(&document);
        }
    }

    /// Whether `document` is in progress with `peer`.
    #[cfg(test)]
    fn holds(&self, peer: &PeerId, document: &DocumentId) -> bool {
        self.by_peer
            .get(peer)
            .is_some_and(|held| held.contains(document))
    }

    /// Documents in progress with `peer`.
    pub(super) fn of_peer(&self, peer: &PeerId) -> usize {
        self.by_peer.get(peer).map_or(0, HashSet::len)
    }

    /// Documents released one by one so far (not counting a peer's released at once).
    pub(super) fn finished(&self) -> u64 {
        self.finished
    }

    /// Documents in progress with any peer.
    pub(super) fn len(&self) -> usize {
        self.documents.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(n: usize) -> DocumentId {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(n as u64).to_be_bytes());
        DocumentId::from_bytes(id)
    }

    #[test]
    fn one_peer_holds_at_most_its_share_and_the_others_still_find_room() {
        let (rogue, honest) = (PeerId::random(), PeerId::random());
        let mut in_progress = InProgress::default();
        let taken = (0..DOCUMENTS_IN_PROGRESS_MAX)
            .filter(|n| in_progress.take(rogue, document(*n)))
            .count();
        assert_eq!(taken, DOCUMENTS_IN_PROGRESS_PER_PEER_MAX);
        let other = document(DOCUMENTS_IN_PROGRESS_MAX);
        assert!(in_progress.take(honest, other));
        // One peer at a time per document; a peer's release frees only its own.
        assert!(!in_progress.take(rogue, other));
        in_progress.release(&rogue, &other);
        assert!(in_progress.holds(&honest, &other));
        in_progress.release_peer(&rogue);
        assert_eq!(in_progress.len(), 1);
        assert_eq!(in_progress.of_peer(&rogue), 0);
        in_progress.release(&honest, &other);
        assert_eq!(in_progress.len(), 0);
        assert!(in_progress.by_peer.is_empty());
    }

    #[test]
    fn the_whole_budget_is_bounded_whatever_the_number_of_peers() {
        let mut in_progress = InProgress::default();
        let mut n = 0;
        while in_progress.len() < DOCUMENTS_IN_PROGRESS_MAX {
            let peer = PeerId::random();
            while in_progress.take(peer, document(n)) {
                n += 1;
            }
        }
        assert!(!in_progress.take(PeerId::random(), document(n)));
        assert_eq!(in_progress.len(), DOCUMENTS_IN_PROGRESS_MAX);
    }
}

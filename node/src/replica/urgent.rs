//! What a peer should take before anything else: priority referrals still in motion, and
//! health files whose allergies just changed. A node names them (`Node::urgent_documents`)
//! when a peer asks for its roster (`Request::Roster { urgent: true }`, at every connection and
//! reconciliation), and that peer fetches the ones it lacks ahead of whatever its
//! reconciliations find; its own local changes to them are gossiped ahead of the others.
//!
//! The set lives in memory, noted as changes are accepted: it is bounded
//! (`URGENT_DOCUMENTS_MAX`, the oldest noted leaves first) and ages out
//! (`URGENT_WINDOW_MS`). After a restart a node names only what it accepted since; what it
//! accepted before still reaches its peers by reconciliation, in its turn.

use super::*;
use crate::model::{ReferralStatus, Urgency};

/// Most documents a node names as urgent (48 bytes each on the wire: 48 KiB at most).
pub const URGENT_DOCUMENTS_MAX: usize = 1_024;
/// How long a document stays urgent after the change that made it so, in milliseconds (a
/// day): long enough for a partition to heal or a node to come back, short enough that a
/// node's list stays the things in motion now.
pub const URGENT_WINDOW_MS: u64 = 24 * 3_600_000;

/// The documents noted urgent, with when (milliseconds since the epoch).
#[derive(Default)]
pub(super) struct Urgent {
    noted: HashMap<DocumentId, u64>,
}

impl Urgent {
    fn note(&mut self, id: DocumentId, at_ms: u64) {
        self.noted.insert(id, at_ms);
        if self.noted.len() > URGENT_DOCUMENTS_MAX
            && let Some(oldest) = self
                .noted
                .iter()
                .min_by_key(|(id, at)| (**at, **id))
                .map(|(id, _)| *id)
        {
            self.noted.remove(&oldest);
        }
    }
}

/// Whether a referral is urgent: priority (or priority among concurrent settings), and not
/// at an end.
fn urgent_referral(referral: &ReferralView) -> bool {
    let priority = referral.urgency.value == Urgency::Priority
        || referral.urgency.conflicts.contains(&Urgency::Priority);
    let ended = matches!(
        referral.status,
        ReferralStatus::Completed
            | ReferralStatus::Cancelled
            | ReferralStatus::Declined
            | ReferralStatus::Redirected
    );
    priority && !ended
}

impl Node {
    pub(super) fn lock_urgent(&self) -> MutexGuard<'_, Urgent> {
        self.urgent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes whether document `id`, whose view is now `view`, is urgent after a change: a
    /// priority referral not at an end, or a health file whose allergies the change moved
    /// (`allergies`). A referral that stops being urgent leaves the set.
    pub(super) fn note_urgency(&self, id: DocumentId, view: &View, allergies: bool) {
        let urgent = match view {
            View::Referral(referral) => urgent_referral(referral),
            View::HealthFile(_) => allergies,
            View::Roster(_) => false,
        };
        let mut noted = self.lock_urgent();
        if urgent {
            noted.note(id, crate::audit::now_unix_ms());
        } else if matches!(view, View::Referral(_)) {
            noted.noted.remove(&id);
        }
    }

    /// Whether a document is noted urgent now.
    pub fn is_urgent(&self, id: &DocumentId) -> bool {
        self.lock_urgent().noted.contains_key(id)
    }

    /// The documents this node names as urgent, newest first, each with the digest of its
    /// heads (as the catalogue holds it), at most `URGENT_DOCUMENTS_MAX`: those noted within
    /// `URGENT_WINDOW_MS` that it still holds.
    pub fn urgent_documents(&self) -> Vec<([u8; 16], [u8; 32])> {
        let now = crate::audit::now_unix_ms();
        let mut noted: Vec<(DocumentId, u64)> = {
            let mut urgent = self.lock_urgent();
            urgent
                .noted
                .retain(|_, at| now.saturating_sub(*at) <= URGENT_WINDOW_MS);
            urgent.noted.iter().map(|(id, at)| (*id, *at)).collect()
        };
        noted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let catalogue = self.catalogue();
        noted
            .into_iter()
            .filter_map(|(id, _)| {
                catalogue
                    .get(id.as_bytes())
                    .map(|digest| (*id.as_bytes(), digest))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_keeps_the_newest_within_its_bound() {
        let mut urgent = Urgent::default();
        for n in 0..(URGENT_DOCUMENTS_MAX as u64 + 10) {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            urgent.note(DocumentId::from_bytes(id), 1_000 + n);
        }
        assert_eq!(urgent.noted.len(), URGENT_DOCUMENTS_MAX);
        assert!(urgent.noted.values().all(|at| *at >= 1_010));
    }
}

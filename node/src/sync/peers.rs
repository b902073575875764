//! Each peer's standing and slots: strikes and bans, the requests it may have in flight, and
//! the release of a slot when its request ends.

use super::*;

/// A token bucket refilled once a second.
#[derive(Default)]
pub(super) struct Bucket {
    pub(super) tokens: u32,
    pub(super) refilled: Option<Instant>,
}

impl Bucket {
    pub(super) fn take(&mut self, per_second: u32) -> bool {
        let now = Instant::now();
        if self
            .refilled
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            self.tokens = per_second;
            self.refilled = Some(now);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// What the driver keeps per connected peer.
#[derive(Default)]
pub(super) struct PeerState {
    pub(super) reconciling: bool,
    pub(super) to_sync: VecDeque<DocumentId>,
    pub(super) to_fetch: VecDeque<ByteArray<16>>,
    pub(super) sessions: usize,
    pub(super) fetches: usize,
    pub(super) inbound: usize,
    pub(super) requests: Bucket,
    pub(super) reconcile_queries: Bucket,
    /// Faulty answers so far.
    pub(super) strikes: u32,
    /// Not asked to reconcile before then (it let a request time out).
    pub(super) quiet_until: Option<Instant>,
}

/// Sync states of sessions peers run with this node, bounded in total and per peer; the
/// least recently used goes first.
#[derive(Default)]
pub(super) struct ResponderStates {
    pub(super) states: HashMap<(PeerId, DocumentId), (Box<State>, u64)>,
    pub(super) clock: u64,
}

impl ResponderStates {
    pub(super) fn take(&mut self, key: &(PeerId, DocumentId)) -> Option<Box<State>> {
        self.states.remove(key).map(|(state, _)| state)
    }

    pub(super) fn put(&mut self, key: (PeerId, DocumentId), state: Box<State>) {
        let of_peer = self.states.keys().filter(|(p, _)| *p == key.0).count();
        let evict = if of_peer >= RESPONDER_SYNC_STATES_PER_PEER_MAX {
            self.oldest(|(p, _)| *p == key.0)
        } else if self.states.len() >= RESPONDER_SYNC_STATES_MAX {
            self.oldest(|_| true)
        } else {
            None
        };
        if let Some(old) = evict {
            self.states.remove(&old);
        }
        self.clock += 1;
        self.states.insert(key, (state, self.clock));
    }

    pub(super) fn oldest(
        &self,
        which: impl Fn(&(PeerId, DocumentId)) -> bool,
    ) -> Option<(PeerId, DocumentId)> {
        self.states
            .iter()
            .filter(|(key, _)| which(key))
            .min_by_key(|(_, (_, used))| *used)
            .map(|(key, _)| *key)
    }

    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.states.retain(|(p, _), _| p != peer);
    }
}

impl Driver {
    /// Disconnects a misbehaving peer and refuses it for `BAN`.
    pub(super) fn ban(&mut self, peer: PeerId) {
        self.bans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, Instant::now() + BAN);
        let _ = self.swarm.disconnect_peer_id(peer);
        self.stats_mut().disconnected += 1;
    }

    /// Counts a faulty answer from `peer`; at `SYNC_STRIKES_MAX` it is banned.
    pub(super) fn strike(&mut self, peer: PeerId, what: &'static str) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.strikes += 1;
        let strikes = state.strikes;
        tracing::info!(%peer, strikes, what, "a faulty answer to a sync request");
        self.with_peer_stats(&peer, |s| s.strikes = strikes);
        if strikes == SYNC_STRIKES_MAX {
            tracing::warn!(%peer, strikes, "disconnecting a peer for its faulty answers");
            self.ban(peer);
        }
    }

    /// Frees what an outbound exchange held.
    pub(super) fn finished(&mut self, peer: PeerId, outbound: &Outbound) {
        match outbound {
            Outbound::Sync { document, .. } => self.release(peer, Release::Session(*document)),
            Outbound::Fetch(documents) => {
                for document in documents {
                    self.in_progress
                        .release(&peer, &DocumentId::from_bytes(**document));
                }
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.fetches = state.fetches.saturating_sub(1);
                }
                self.pump(peer);
            }
            Outbound::Reconcile { .. } => self.release(peer, Release::Reconciliation),
            Outbound::Roster => {}
        }
    }

    /// Releases what a job or an exchange held.
    pub(super) fn release(&mut self, peer: PeerId, release: Release) {
        let state = self.peers.get_mut(&peer);
        match release {
            Release::Inbound => {
                if let Some(state) = state {
                    state.inbound = state.inbound.saturating_sub(1);
                }
            }
            Release::Session(document) => {
                self.in_progress.release(&peer, &document);
                if let Some(state) = state {
                    state.sessions = state.sessions.saturating_sub(1);
                }
            }
            Release::Reconciliation => {
                if let Some(state) = state {
                    state.reconciling = false;
                }
            }
            Release::Fetched(documents) => {
                for document in documents {
                    self.in_progress
                        .release(&peer, &DocumentId::from_bytes(*document));
                }
            }
            Release::Validation(publisher) => self.validated(publisher),
            Release::Lookup => self.validations = self.validations.saturating_sub(1),
            Release::Nothing => {}
        }
        self.pump(peer);
    }

    pub(super) fn send(&mut self, peer: PeerId, request: Request, outbound: Outbound) -> u64 {
        let bytes = cbor_len(&request);
        self.with_peer_stats(&peer, |s| {
            s.bytes_out += bytes;
            s.messages_out += 1;
        });
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.outbound.insert(id, (peer, outbound));
        bytes
    }
}

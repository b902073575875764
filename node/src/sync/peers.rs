//! Each peer's standing and slots: strikes and bans, the requests it may have in flight, and
//! the slots that count them, each released exactly once.

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
    /// Which of the peer's connections this state belongs to (see `Slot`).
    pub(super) connection: u64,
    pub(super) reconciling: bool,
    pub(super) to_sync: VecDeque<DocumentId>,
    pub(super) to_fetch: VecDeque<ByteArray<16>>,
    /// Differences found with it and not yet taken into progress, in the order found
    /// (`DIFFERENCES_KEPT_MAX`).
    pub(super) kept: VecDeque<(ByteArray<16>, Difference)>,
    pub(super) sessions: usize,
    pub(super) fetches: usize,
    pub(super) inbound: usize,
    pub(super) requests: Bucket,
    pub(super) reconcile_queries: Bucket,
    /// Faulty answers so far.
    pub(super) strikes: u32,
    /// Not asked to reconcile before then (it let a request time out).
    pub(super) quiet_until: Option<Instant>,
    /// Reconciliations in a row that found only documents the peer lacks: it pulls those
    /// itself, so it is asked again less often (`LOPSIDED_BACKOFF_MAX`).
    pub(super) lopsided: u32,
    /// Not asked to reconcile before then (its last reconciliations were lopsided).
    pub(super) reconcile_after: Option<Instant>,
    /// It answered a reconciliation without coded symbols (it predates them): it is asked
    /// by ranges alone while this connection lasts, rather than a wasted round each time.
    pub(super) predates_symbols: bool,
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

/// What a slot holds, and so what its release gives back.
#[derive(Debug)]
pub(super) enum Held {
    /// A request of the peer's being served (`INBOUND_REQUESTS_PER_PEER_MAX`).
    Inbound,
    /// A sync session with the peer (`SYNC_SESSIONS_PER_PEER_MAX`), and its document's place
    /// in progress unless kept for a fetch (`Slot::keep_document`).
    Session(Option<DocumentId>),
    /// The reconciliation this node runs with the peer (one at a time).
    Reconciliation,
    /// A fetch exchange with the peer (`FETCHES_PER_PEER_MAX`).
    Fetch,
    /// Fetched documents' places in progress, from the request until they are ingested.
    Documents(Vec<ByteArray<16>>),
    /// A gossip validation of this publisher's (`GOSSIP_VALIDATIONS_MAX`,
    /// `GOSSIP_VALIDATIONS_PER_PUBLISHER_MAX`).
    Validation(PeerId),
    /// An announcement's lookup (within `GOSSIP_VALIDATIONS_MAX`).
    Lookup,
}

/// A slot given back: what `Driver::give_back` returns to the counts.
#[derive(Debug)]
pub(super) struct Released {
    peer: PeerId,
    connection: u64,
    held: Held,
}

/// A slot taken (`Driver::take`): the request, session, exchange or job it counts owns it,
/// and it is given back exactly once — by the driver when the work ends (`Driver::release`),
/// or, if the work is lost on the way (a job that panics or is never run, an exchange
/// dropped), by its drop, which sends it to the driver as `Job::Released`. No count is kept
/// by hand elsewhere.
#[must_use = "a slot is given back when it is dropped"]
pub(super) struct Slot {
    /// Always `Some` until given back.
    released: Option<Released>,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Slot {
    /// The documents a `Held::Documents` slot holds (none for another kind).
    pub(super) fn documents(&self) -> &[ByteArray<16>] {
        match self.released.as_ref().map(|r| &r.held) {
            Some(Held::Documents(documents)) => documents,
            _ => &[],
        }
    }

    /// Keeps `documents` in progress past this slot: they move to the peer's queue instead of
    /// being released with it.
    pub(super) fn keep(&mut self, documents: &HashSet<DocumentId>) {
        if let Some(Released {
            held: Held::Documents(held),
            ..
        }) = self.released.as_mut()
        {
            held.retain(|id| !documents.contains(&DocumentId::from_bytes(**id)));
        }
    }

    /// Keeps a session's document in progress past this slot: it moves to the peer's fetch
    /// queue instead of being released with it. Returns the document.
    pub(super) fn keep_document(&mut self) -> Option<DocumentId> {
        match self.released.as_mut() {
            Some(Released {
                held: Held::Session(document),
                ..
            }) => document.take(),
            _ => None,
        }
    }

    fn give_back(mut self) -> Option<Released> {
        self.released.take()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(released) = self.released.take() {
            // A closed channel means the driver is gone, and its counts with it.
            let _ = self.jobs.send(Job::Released(released));
        }
    }
}

impl Driver {
    /// The state of a peer that has just connected (or that has one already).
    pub(super) fn peer_state(&mut self, peer: PeerId) -> &mut PeerState {
        let connections = &mut self.connections;
        self.peers.entry(peer).or_insert_with(|| {
            *connections += 1;
            PeerState {
                connection: *connections,
                ..PeerState::default()
            }
        })
    }

    /// Counts a slot of `held`'s kind for `peer` (the caller has checked its bound) and
    /// returns it, to be given back exactly once. A peer no longer connected has no counts:
    /// its slot counts nothing and gives nothing back.
    pub(super) fn take(&mut self, peer: PeerId, held: Held) -> Slot {
        let connection = match &held {
            // The node's own budget, whoever the peer is.
            Held::Validation(_) | Held::Lookup => {
                self.validations += 1;
                0
            }
            peer_held => {
                let Some(state) = self.peers.get_mut(&peer) else {
                    // Connections are numbered from 1.
                    return Slot {
                        released: Some(Released {
                            peer,
                            connection: 0,
                            held,
                        }),
                        jobs: self.jobs.clone(),
                    };
                };
                match peer_held {
                    Held::Inbound => state.inbound += 1,
                    Held::Session(_) => state.sessions += 1,
                    Held::Reconciliation => state.reconciling = true,
                    Held::Fetch => state.fetches += 1,
                    // Taken into progress when they were queued.
                    _ => {}
                }
                state.connection
            }
        };
        Slot {
            released: Some(Released {
                peer,
                connection,
                held,
            }),
            jobs: self.jobs.clone(),
        }
    }

    /// Whether `slot` was taken on its peer's connection of now.
    pub(super) fn is_current(&self, slot: &Slot) -> bool {
        slot.released.as_ref().is_some_and(|released| {
            self.peers
                .get(&released.peer)
                .is_some_and(|state| state.connection == released.connection)
        })
    }

    /// Gives `slot` back now, and starts what it made room for.
    pub(super) fn release(&mut self, slot: Slot) {
        if let Some(released) = slot.give_back() {
            self.give_back(released);
        }
    }

    /// Returns a slot to the counts. A peer's own counts are kept per connection: after a
    /// disconnect (which released its documents) a slot of the old connection gives nothing
    /// back to a new one.
    pub(super) fn give_back(&mut self, released: Released) {
        let Released {
            peer,
            connection,
            held,
        } = released;
        let current = self
            .peers
            .get(&peer)
            .is_some_and(|state| state.connection == connection);
        match held {
            Held::Validation(publisher) => self.validated(publisher),
            Held::Lookup => self.validations = self.validations.saturating_sub(1),
            _ if !current => {}
            Held::Inbound => self.peer_state(peer).inbound -= 1,
            Held::Session(document) => {
                if let Some(document) = document {
                    self.in_progress.release(&peer, &document);
                }
                self.peer_state(peer).sessions -= 1;
            }
            Held::Reconciliation => self.peer_state(peer).reconciling = false,
            Held::Fetch => self.peer_state(peer).fetches -= 1,
            Held::Documents(documents) => {
                for document in documents {
                    self.in_progress
                        .release(&peer, &DocumentId::from_bytes(*document));
                }
            }
        }
        self.pump(peer);
    }

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

    /// Gives back what an outbound exchange held.
    pub(super) fn finished(&mut self, outbound: Outbound) {
        match outbound {
            Outbound::Sync { slot, .. } | Outbound::Reconcile { slot, .. } => self.release(slot),
            Outbound::Fetch {
                exchange,
                documents,
            } => {
                self.release(exchange);
                self.release(documents);
            }
            Outbound::Roster => {}
        }
    }

    pub(super) fn send(&mut self, peer: PeerId, request: Request, outbound: Outbound) -> u64 {
        let bytes = cbor_len(&request);
        self.with_peer_stats(&peer, |s| {
            s.bytes_out += bytes;
            s.messages_out += 1;
        });
        self.stats_mut().sent.request(&request, bytes);
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.outbound.insert(id, (peer, outbound));
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(jobs: &mpsc::UnboundedSender<Job>, held: Held) -> Slot {
        Slot {
            released: Some(Released {
                peer: PeerId::random(),
                connection: 7,
                held,
            }),
            jobs: jobs.clone(),
        }
    }

    fn released(jobs: &mut mpsc::UnboundedReceiver<Job>) -> Vec<Released> {
        std::iter::from_fn(|| jobs.try_recv().ok())
            .map(|job| match job {
                Job::Released(released) => released,
                _ => panic!("only slots given back were sent"),
            })
            .collect()
    }

    #[test]
    fn a_slot_is_given_back_once_whichever_way_its_work_ends() {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let document = DocumentId::from_bytes([3; 16]);

        // Given back by the driver: nothing more comes of it.
        let taken = slot(&sender, Held::Session(Some(document)));
        let given = taken.give_back().expect("a slot holds what it counts");
        assert!(matches!(given.held, Held::Session(Some(d)) if d == document));
        assert_eq!(given.connection, 7);
        assert!(released(&mut receiver).is_empty());

        // Dropped on the way (an exchange or a job lost): sent to the driver, once.
        drop(slot(&sender, Held::Fetch));
        let sent = released(&mut receiver);
        assert_eq!(sent.len(), 1);
        assert!(matches!(sent[0].held, Held::Fetch));

        // Held by a job that panics: given back as it unwinds, once.
        let held = slot(&sender, Held::Inbound);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = held;
            panic!("a job failing");
        }));
        assert!(outcome.is_err());
        let sent = released(&mut receiver);
        assert_eq!(sent.len(), 1);
        assert!(matches!(sent[0].held, Held::Inbound));

        // With the driver gone, a dropped slot is simply gone.
        let orphan = slot(&sender, Held::Lookup);
        drop((sender, receiver));
        drop(orphan);
    }

    #[test]
    fn documents_kept_for_the_queue_are_not_released_with_their_slot() {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let ids: Vec<ByteArray<16>> = (1..=4u8).map(|n| ByteArray::new([n; 16])).collect();
        let mut documents = slot(&sender, Held::Documents(ids.clone()));
        assert_eq!(documents.documents(), &ids[..]);
        let deferred: HashSet<DocumentId> = [DocumentId::from_bytes([2; 16])].into();
        documents.keep(&deferred);
        drop(documents);
        let sent = released(&mut receiver);
        assert_eq!(sent.len(), 1);
        let Held::Documents(left) = &sent[0].held else {
            panic!("the slot's kind is kept");
        };
        assert_eq!(left, &vec![ids[0], ids[2], ids[3]]);
    }
}

//! What this node asks of peers: reconciliation of catalogues, then per-document sync and
//! fetches of what differs, within each peer's share of documents in progress.

use super::*;

impl Driver {
    pub(super) fn reconcile_with_someone(&mut self) {
        // With plenty still to fetch or sync, and that work moving, a reconciliation would
        // only find the same differences again.
        let now = Instant::now();
        let finished = self.in_progress.finished();
        if finished > self.backlog_finished {
            self.backlog_finished = finished;
            self.backlog_moved = now;
        }
        // One in flight holds the next back too: it may find the same.
        let in_flight = self.peers.values().any(|s| s.reconciling);
        if self.catch_up_backlog() > CATCH_UP_BACKLOG_RECONCILE_MAX
            && (in_flight
                || (now.duration_since(self.backlog_moved) < BACKLOG_STALLED_AFTER
                    && now.duration_since(self.reconciled_at) < RECONCILE_HELD_MAX))
        {
            return;
        }
        let candidates: Vec<PeerId> = self
            .peers
            .iter()
            // A peer still working through the last differences is left alone until done:
            // until every document found with it is ingested (queued, in flight or being
            // ingested, a document is in progress), and none are kept for later. Asked
            // sooner, it would send the same differences again. So, for a while, is a peer
            // whose last reconciliations found only documents it lacks: it is catching up
            // from this node, and pulls them itself.
            .filter(|(p, s)| {
                !s.reconciling
                    && s.quiet_until.is_none_or(|until| until <= now)
                    && s.reconcile_after.is_none_or(|after| after <= now)
                    && s.kept.is_empty()
                    && self.in_progress.of_peer(p) == 0
            })
            .map(|(p, _)| *p)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let mut pick = [0u8; 8];
        let _ = getrandom::fill(&mut pick);
        let peer = candidates[(u64::from_le_bytes(pick) as usize) % candidates.len()];
        self.reconcile_with(peer);
    }

    /// Documents still to fetch or sync: in progress with some peer, or kept to take.
    pub(super) fn catch_up_backlog(&self) -> usize {
        self.in_progress.len() + self.peers.values().map(|s| s.kept.len()).sum::<usize>()
    }

    pub(super) fn reconcile_with(&mut self, peer: PeerId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.reconciling {
            return;
        }
        let by_ranges = state.predates_symbols;
        let slot = self.take(peer, Held::Reconciliation);
        // A reconciliation starts the backlog it finds moving.
        self.backlog_moved = Instant::now();
        self.stats_mut().reconciliations += 1;
        self.ask_roster(peer);
        let node = self.node.clone();
        self.spawn_job(peer, move || {
            let catalogue = node.catalogue();
            let run = Box::new(match by_ranges {
                true => Hybrid::by_ranges(&catalogue),
                false => Hybrid::new(&catalogue),
            });
            Job::ReconcileStep {
                slot,
                peer,
                run,
                round_trips: 0,
                bytes: 0,
                result: Ok(true),
            }
        });
    }

    pub(super) fn on_response(
        &mut self,
        peer: PeerId,
        outbound: Outbound,
        response: Response,
        bytes: u64,
    ) {
        match (outbound, response) {
            (
                Outbound::Reconcile {
                    slot,
                    run,
                    round_trips,
                    bytes: so_far,
                },
                Response::Reconcile(reply),
            ) => {
                let node = self.node.clone();
                self.spawn_job(peer, move || {
                    let mut run = run;
                    let result = run.receive(&node.catalogue(), &reply);
                    Job::ReconcileStep {
                        slot,
                        peer,
                        run,
                        round_trips: round_trips + 1,
                        bytes: so_far + bytes,
                        result,
                    }
                });
            }
            (
                Outbound::Sync {
                    slot,
                    document,
                    state,
                    rounds,
                    sent,
                },
                Response::Sync(reply),
            ) => {
                let node = self.node.clone();
                let bytes_max = self.config.sync_message_bytes_max;
                self.spawn_job(peer, move || {
                    let _span =
                        tracing::debug_span!("document_sync", %peer, %document, rounds).entered();
                    let mut state = state;
                    let mut carried = Carried::default();
                    let result = reply
                        .as_ref()
                        .map(|m| document::incoming(&node, m, &mut state))
                        .transpose()
                        .and_then(|c| {
                            carried = c.unwrap_or_default();
                            document::outgoing(&node, document, &mut state, bytes_max)
                        })
                        .map(|next| (carried, next));
                    let (result, sent) = unless_repeated(result, sent);
                    Job::SyncStep {
                        slot,
                        peer,
                        document,
                        state,
                        rounds: rounds + 1,
                        result,
                        sent,
                    }
                });
            }
            (
                Outbound::Fetch {
                    exchange,
                    documents,
                },
                Response::Fetch {
                    documents: fetched,
                    deferred,
                },
            ) => self.fetch_answered(
                peer,
                exchange,
                documents,
                Fetched::Plain(fetched),
                deferred,
                bytes,
            ),
            (
                Outbound::Fetch {
                    exchange,
                    documents,
                },
                Response::FetchDeflated {
                    documents: fetched,
                    deferred,
                },
            ) => self.fetch_answered(
                peer,
                exchange,
                documents,
                Fetched::Deflated(fetched.into_vec()),
                deferred,
                bytes,
            ),
            (
                Outbound::Fetch {
                    exchange,
                    documents,
                },
                Response::FetchCovered {
                    documents: fetched,
                    deferred,
                },
            ) => self.fetch_answered(
                peer,
                exchange,
                documents,
                Fetched::Covered(fetched.into_vec()),
                deferred,
                bytes,
            ),
            (Outbound::Roster, Response::Roster(Some(signed))) => {
                self.adopt_roster(signed.into_vec(), None, Some(peer), None);
            }
            (Outbound::Roster, Response::Roster(None)) => {}
            (Outbound::Roster, Response::RosterAndUrgent { roster, urgent }) => {
                if let Some(signed) = roster {
                    self.adopt_roster(signed.into_vec(), None, Some(peer), None);
                }
                if urgent.len() > URGENT_DOCUMENTS_MAX {
                    self.strike(peer, "more urgent documents than any node names");
                } else {
                    self.take_urgent(peer, urgent);
                    self.pump(peer);
                }
            }
            (Outbound::Sync { slot, .. }, Response::Refused(Refusal::TooLarge)) => {
                self.fetch_instead(peer, slot);
            }
            (outbound, Response::Refused(refusal)) => {
                tracing::debug!(%peer, %refusal, "sync request refused");
                self.finished(outbound);
            }
            (outbound, _) => {
                self.strike(peer, "an answer of the wrong kind");
                self.finished(outbound);
            }
        }
    }

    /// A document too large to sync by messages is fetched instead: it stays in progress,
    /// moved from the session to the peer's fetch queue.
    pub(super) fn fetch_instead(&mut self, peer: PeerId, mut slot: Slot) {
        if self.is_current(&slot)
            && let Some(document) = slot.keep_document()
            && let Some(state) = self.peers.get_mut(&peer)
        {
            state
                .to_fetch
                .push_back(ByteArray::new(*document.as_bytes()));
        }
        self.release(slot);
    }

    /// A reconciliation finished: queue what differs.
    pub(super) fn reconciled(
        &mut self,
        slot: Slot,
        peer: PeerId,
        run: &Hybrid,
        round_trips: u64,
        bytes: u64,
    ) {
        self.reconciled_at = Instant::now();
        let differing = run.differing();
        let lag = differing.len() as u64;
        let _span = tracing::debug_span!("reconciled", %peer, round_trips, bytes, lag).entered();
        tracing::debug!("catalogues reconciled");
        self.with_peer_stats(&peer, |s| {
            s.last_reconciled_ms = Some(now_ms());
            s.lag = Some(lag);
            s.last_round_trips = Some(round_trips);
            s.last_reconciliation_bytes = Some(bytes);
        });
        // Documents only this node holds are the peer's to fetch when it reconciles.
        let kept_elsewhere: usize = self
            .peers
            .iter()
            .filter(|(p, _)| **p != peer)
            .map(|(_, s)| s.kept.len())
            .sum();
        let room = DIFFERENCES_KEPT_MAX.saturating_sub(kept_elsewhere);
        let every = self.config.reconcile_every;
        if let Some(state) = self.peers.get_mut(&peer) {
            state.predates_symbols = run.older_responder();
            let only_ours = differing
                .iter()
                .all(|(_, difference)| *difference == Difference::OnlyOurs);
            state.lopsided = if !differing.is_empty() && only_ours {
                (state.lopsided + 1).min(LOPSIDED_BACKOFF_MAX)
            } else {
                0
            };
            state.reconcile_after =
                (state.lopsided > 0).then(|| Instant::now() + every * (1 << state.lopsided));
            // What this node or its peers hold urgent first, then in the order found. This
            // peer found the difference, so this peer syncs it (both sides of a pair order
            // alike: each side's sessions carry changes both ways).
            let mut found: Vec<(ByteArray<16>, Difference)> = differing
                .iter()
                .filter(|(_, difference)| *difference != Difference::OnlyOurs)
                .map(|(id, difference)| (ByteArray::new(*id), *difference))
                .collect();
            let node = &self.node;
            let named = &self.urgent_named;
            found.sort_by_cached_key(|(id, _)| {
                !(named.contains(&**id) || node.is_urgent(&DocumentId::from_bytes(**id)))
            });
            state.kept = found.into_iter().take(room).collect();
        }
        // Given back, the slot starts what was found (`pump`).
        self.release(slot);
    }

    /// A peer named the documents it holds urgent: those this node lacks go to the front of
    /// the peer's fetches, ahead of what reconciliations found (in the order named, newest
    /// first). A document in progress with another peer is left to it.
    ///
    /// One this node holds at other heads is left to reconciliation, which takes it first
    /// (`reconciled`). Taken into progress with whichever peer named it (every peer names it
    /// while the island catches up, and a document is worked on with one peer at a time), it
    /// kept the peer whose reconciliation found the changes this node lacked from syncing it:
    /// 21-process demo runs ended with the core hospital three changes short of one referral.
    pub(super) fn take_urgent(&mut self, peer: PeerId, urgent: Vec<UrgentDocument>) {
        if self.urgent_named.len() + urgent.len() > URGENT_NAMED_MAX {
            self.urgent_named.clear();
        }
        self.urgent_named.extend(urgent.iter().map(|u| *u.document));
        let missing: Vec<ByteArray<16>> = {
            let catalogue = self.node.catalogue();
            urgent
                .into_iter()
                .filter(|u| catalogue.get(&u.document).is_none())
                .map(|u| u.document)
                .collect()
        };
        let mut new_missing = 0;
        // Pushed to the front in reverse, so the queue keeps the order named.
        for id in missing.into_iter().rev() {
            let document = DocumentId::from_bytes(*id);
            if !self.peers.contains_key(&peer)
                || matches!(self.node.is_erased(&document), Ok(true))
                || !self.in_progress.take(peer, document)
            {
                continue;
            }
            if let Some(state) = self.peers.get_mut(&peer) {
                state.to_fetch.push_front(id);
                new_missing += 1;
            }
        }
        if new_missing > 0 {
            self.stats_mut().catch_up.documents_total += new_missing;
        }
    }

    /// Takes the differences kept for `peer` into progress, in the order found, while its
    /// share has room: missing documents to fetch, differing ones to sync. A document in
    /// progress with another peer is left to it, and one missing when found but held now
    /// (fetched from another peer) to the next reconciliation.
    pub(super) fn take_kept(&mut self, peer: PeerId) {
        let mut new_missing = 0;
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        while self.in_progress.has_room(&peer)
            && let Some((id, difference)) = state.kept.pop_front()
        {
            let document = DocumentId::from_bytes(*id);
            // Held now, or erased here: nothing to fetch.
            if difference == Difference::OnlyTheirs
                && (self.node.catalogue().get(&id).is_some()
                    || matches!(self.node.is_erased(&document), Ok(true)))
                || !self.in_progress.take(peer, document)
            {
                continue;
            }
            match difference {
                Difference::OnlyTheirs => {
                    state.to_fetch.push_back(id);
                    new_missing += 1;
                }
                _ => state.to_sync.push_back(document),
            }
        }
        if new_missing > 0 {
            let mut stats = self.stats_mut();
            // A new catch-up starts when the last one is done.
            if stats.catch_up.documents_done >= stats.catch_up.documents_total {
                stats.catch_up = CatchUp::default();
                drop(stats);
                self.catch_up_started = Some(Instant::now());
                stats = self.stats_mut();
            }
            stats.catch_up.documents_total += new_missing;
        }
    }

    /// Starts as many queued syncs and fetches with `peer` as its bounds allow.
    pub(super) fn pump(&mut self, peer: PeerId) {
        self.take_kept(peer);
        loop {
            let Some(state) = self.peers.get_mut(&peer) else {
                return;
            };
            if state.fetches < FETCHES_PER_PEER_MAX && !state.to_fetch.is_empty() {
                let take = state.to_fetch.len().min(FETCH_DOCUMENTS_MAX);
                let ids: Vec<ByteArray<16>> = state.to_fetch.drain(..take).collect();
                let request = Request::Fetch {
                    documents: ids.clone(),
                    deflated: true,
                    covered: true,
                };
                let exchange = self.take(peer, Held::Fetch);
                let documents = self.take(peer, Held::Documents(ids));
                self.send(
                    peer,
                    request,
                    Outbound::Fetch {
                        exchange,
                        documents,
                    },
                );
                continue;
            }
            if state.sessions < SYNC_SESSIONS_PER_PEER_MAX
                && let Some(document) = state.to_sync.pop_front()
            {
                self.start_session(peer, document);
                continue;
            }
            return;
        }
    }

    pub(super) fn start_session(&mut self, peer: PeerId, document: DocumentId) {
        let slot = self.take(peer, Held::Session(Some(document)));
        let node = self.node.clone();
        let bytes_max = self.config.sync_message_bytes_max;
        self.spawn_job(peer, move || {
            let mut state = Box::<State>::default();
            let result = document::outgoing(&node, document, &mut state, bytes_max).map(|next| {
                let next = next.map(|message| SyncMessage {
                    first: true,
                    ..message
                });
                (Carried::default(), next)
            });
            // Nothing was sent before the first message (0).
            let (result, sent) = unless_repeated(result, 0);
            Job::SyncStep {
                slot,
                peer,
                document,
                state,
                rounds: 0,
                result,
                sent,
            }
        });
    }

    /// A peer answered a fetch: its documents are inflated (if sent so) and ingested on the
    /// catch-up threads, where they stay in progress until done.
    fn fetch_answered(
        &mut self,
        peer: PeerId,
        exchange: Slot,
        documents: Slot,
        fetched: Fetched,
        deferred: Vec<ByteArray<16>>,
        bytes: u64,
    ) {
        // A responder defers only documents it was asked for, and only once it has sent one
        // of them (for lack of room): any other id would be work this node never chose, and
        // deferring everything would keep the documents from every other peer for as long as
        // it liked. The second is checked once the documents are read.
        let asked: HashSet<[u8; 16]> = documents.documents().iter().map(|id| **id).collect();
        let (deferred, unasked): (Vec<ByteArray<16>>, Vec<ByteArray<16>>) =
            deferred.into_iter().partition(|id| asked.contains(&**id));
        let struck = !unasked.is_empty();
        if struck {
            self.strike(peer, "a fetch answer deferring documents not asked for");
        }
        let node = self.node.clone();
        // The exchange is over; reading and ingesting are the catch-up threads' work.
        self.release(exchange);
        let deferring = !deferred.is_empty();
        let work = move || {
            // An answer carries only documents asked for, each once at most: anything else is
            // work this node never chose (a deflated answer could make it out of a few bytes:
            // it is refused before any is loaded). One strike per fault of the answer.
            let check = |sent: Vec<[u8; 16]>| {
                if sent.len() > asked.len() || sent.iter().any(|d| !asked.contains(d)) {
                    return Err(DocumentSyncError::Malformed(
                        "a fetch answer with documents not asked for",
                    ));
                }
                match deferring && sent.is_empty() && !struck {
                    true => Err(DocumentSyncError::Malformed(
                        "a fetch answer deferring documents without sending one",
                    )),
                    false => Ok(()),
                }
            };
            let _span = tracing::debug_span!("fetch", %peer).entered();
            match fetched {
                Fetched::Plain(fetched) => check(ids(fetched.iter().map(|d| d.document)))
                    .and_then(|()| document::ingest_fetched(&node, &fetched)),
                Fetched::Deflated(deflated) => protocol::inflate_fetched(&deflated)
                    .map_err(|error| DocumentSyncError::Malformed(error.reason()))
                    .and_then(|fetched| {
                        check(ids(fetched.iter().map(|d| d.document)))?;
                        document::ingest_compact(&node, &fetched)
                    }),
                Fetched::Covered(deflated) => protocol::inflate_covered(&deflated)
                    .map_err(|error| DocumentSyncError::Malformed(error.reason()))
                    .and_then(|fetched| {
                        check(ids(fetched.iter().map(|d| d.document)))?;
                        document::ingest_covered(&node, &fetched)
                    }),
            }
        };
        // Reported once durable: until then the documents stay in progress.
        let then = move |carried| Job::Fetched {
            peer,
            documents,
            bytes,
            carried,
            deferred,
        };
        self.spawn_catch_up_job_durable(peer, work, then);
    }

    pub(super) fn fetched(
        &mut self,
        peer: PeerId,
        mut documents: Slot,
        bytes: u64,
        carried: Result<Carried, DocumentSyncError>,
        deferred: Vec<ByteArray<16>>,
    ) {
        match carried {
            Ok(carried) => self.count_carried(&peer, &carried),
            Err(DocumentSyncError::Malformed(reason)) => {
                tracing::warn!(%peer, reason, "a fetch answer refused");
                self.strike(peer, reason);
            }
            Err(error) => tracing::warn!(%peer, %error, "fetched envelopes not ingested"),
        }
        // Only documents asked for (checked when the answer came).
        let deferred: HashSet<DocumentId> = deferred
            .iter()
            .map(|id| DocumentId::from_bytes(**id))
            .collect();
        let asked = documents.documents().to_vec();
        let fetched = asked.len().saturating_sub(deferred.len()) as u64;
        self.with_peer_stats(&peer, |s| s.documents_reconciled += fetched);
        {
            let started = self.catch_up_started;
            let mut stats = self.stats_mut();
            let catch_up = &mut stats.catch_up;
            catch_up.documents_done += fetched;
            catch_up.bytes += bytes;
            let left = catch_up
                .documents_total
                .saturating_sub(catch_up.documents_done);
            catch_up.eta_s = started.and_then(|at| {
                let rate = catch_up.documents_done as f64 / at.elapsed().as_secs_f64();
                (rate > 0.0).then(|| left as f64 / rate)
            });
        }
        // Deferred documents are asked again, in the order first asked, unless the peer's
        // connection they were asked on is gone; the rest are released with the slot.
        if self.is_current(&documents) {
            let mut kept = HashSet::new();
            for id in asked {
                let document = DocumentId::from_bytes(*id);
                if !deferred.contains(&document) {
                    continue;
                }
                // Partly fetched documents finish by sync; others are asked again.
                let partly = self.node.catalogue().get(&id).is_some();
                let Some(state) = self.peers.get_mut(&peer) else {
                    break;
                };
                if partly {
                    state.to_sync.push_back(document);
                } else {
                    state.to_fetch.push_back(id);
                }
                kept.insert(document);
            }
            documents.keep(&kept);
        }
        self.release(documents);
    }

    pub(super) fn count_carried(&mut self, peer: &PeerId, carried: &Carried) {
        if carried.accepted + carried.rejected > 0 {
            self.with_peer_stats(peer, |s| {
                s.changes_received += carried.accepted as u64;
                s.changes_rejected += carried.rejected as u64;
            });
        }
        // One strike per message, however many bad changes it carried: forged, malformed or
        // invalid changes come only from a faulty or hostile node, and each is a record this
        // node must keep.
        if carried.blamed > 0 {
            self.strike(*peer, "changes an honest member never sends");
        }
    }
}

/// A session's next step, ended instead when it would repeat the last: the peer's answer
/// brought no change this node accepted and the message to send is the one sent before
/// (`previous`, its digest). The peer, answering the same message from the same state, would
/// answer the same again, round after round up to `SYNC_ROUNDS_MAX`, unless a document
/// changed meanwhile; the next reconciliation that finds the document differing starts
/// afresh. Returns the step and the digest of the message to send.
#[allow(clippy::type_complexity)]
fn unless_repeated(
    step: Result<(Carried, Option<SyncMessage>), DocumentSyncError>,
    previous: u64,
) -> (
    Result<(Carried, Option<SyncMessage>), DocumentSyncError>,
    u64,
) {
    match step {
        Ok((carried, Some(message))) => {
            let digest = document::message_digest(&message);
            if carried.accepted == 0 && digest == previous {
                tracing::debug!("document sync ends: it would repeat its last round");
                (Ok((carried, None)), 0)
            } else {
                (Ok((carried, Some(message))), digest)
            }
        }
        other => (other, 0),
    }
}

fn ids(documents: impl Iterator<Item = ByteArray<16>>) -> Vec<[u8; 16]> {
    documents.map(|id| *id).collect()
}

/// The documents of a fetch answer, as the responder sent them.
enum Fetched {
    Plain(Vec<FetchedDocument>),
    /// `Response::FetchDeflated`'s stream.
    Deflated(Vec<u8>),
    /// `Response::FetchCovered`'s stream.
    Covered(Vec<u8>),
}

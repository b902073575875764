//! The one task that drives the swarm: it owns every peer's state, takes commands from the
//! handle, hands the node's blocking work to the blocking pool and catch-up threads, and acts
//! on what they report.

use super::*;

/// What an outbound request was for, with the slots it holds.
pub(super) enum Outbound {
    Reconcile {
        slot: Slot,
        run: Box<Hybrid>,
        round_trips: u64,
        bytes: u64,
    },
    Sync {
        slot: Slot,
        document: DocumentId,
        state: Box<State>,
        rounds: usize,
        /// The digest of the message sent (`document::message_digest`).
        sent: u64,
    },
    Fetch {
        exchange: Slot,
        /// The documents asked for (`Held::Documents`).
        documents: Slot,
    },
    Roster,
}

/// Work done on the blocking pool, reported to the driver.
pub(super) enum Job {
    Validated {
        slot: Slot,
        message_id: MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
        accepted: bool,
    },
    RosterAdopted {
        result: Result<RosterUpdate, NodeError>,
        /// The gossip message it came in, to report on.
        gossip: Option<(MessageId, PeerId)>,
        /// The peer whose answer to `Request::Roster` it came in.
        answered_by: Option<PeerId>,
        /// The operator's call waiting for the result (then the roster is also published).
        reply: Option<oneshot::Sender<Result<RosterUpdate, NodeError>>>,
    },
    Respond {
        slot: Slot,
        peer: PeerId,
        channel: ResponseChannel<Response>,
        response: Response,
        carried: Carried,
        /// The session's state to keep, when the step succeeded.
        state: Option<(DocumentId, Box<State>)>,
    },
    ReconcileStep {
        slot: Slot,
        peer: PeerId,
        run: Box<Hybrid>,
        round_trips: u64,
        bytes: u64,
        result: Result<bool, crate::reconcile::ReconcileError>,
    },
    SyncStep {
        slot: Slot,
        peer: PeerId,
        document: DocumentId,
        state: Box<State>,
        rounds: usize,
        result: Result<(Carried, Option<SyncMessage>), DocumentSyncError>,
        /// The digest of the message to send, if any (`document::message_digest`).
        sent: u64,
    },
    Fetched {
        /// The documents fetched (`Held::Documents`).
        documents: Slot,
        peer: PeerId,
        bytes: u64,
        carried: Result<Carried, DocumentSyncError>,
        deferred: Vec<ByteArray<16>>,
    },
    /// An announced change this node lacks: sync the document with the announcer.
    Announced {
        slot: Slot,
        peer: PeerId,
        document: Option<DocumentId>,
    },
    /// A slot dropped away from the driver (its job panicked or never ran, its exchange was
    /// dropped): given back now.
    Released(Released),
}

pub(super) struct Driver {
    pub(super) node: Arc<Node>,
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) config: SyncConfig,
    pub(super) topics: Topics,
    pub(super) bans: gate::Bans,
    pub(super) stats: Arc<Mutex<SyncStats>>,
    pub(super) jobs: mpsc::UnboundedSender<Job>,
    /// Where fetched documents are ingested, below the priority of the node's other work.
    pub(super) background: background::Background,
    pub(super) outbound: HashMap<OutboundRequestId, (PeerId, Outbound)>,
    pub(super) peers: HashMap<PeerId, PeerState>,
    pub(super) responder: ResponderStates,
    pub(super) validations: usize,
    /// Gossip changes in validation and waiting, by publisher (only publishers with work).
    pub(super) publishers: HashMap<PeerId, PublisherQueue>,
    /// Gossip changes waiting, over all publishers, and their bytes.
    pub(super) queued: usize,
    pub(super) queued_bytes: usize,
    pub(super) catch_up_started: Option<Instant>,
    /// The peer each bootstrap address led to, once dialled.
    pub(super) bootstrap_peers: HashMap<Multiaddr, PeerId>,
    /// Documents queued or in flight for sync or fetch with some peer: a document is worked
    /// on with one peer at a time, until its changes are ingested.
    pub(super) in_progress: InProgress,
    /// Connections to peers so far, numbering each peer's state (`PeerState::connection`).
    pub(super) connections: u64,
    /// Documents in progress finished as of the last reconciliation interval, when that
    /// count last rose (or a reconciliation started), and when a reconciliation last ended
    /// well (one refused or cut short does not hold the next back): what decides whether a
    /// backlog holds the next one back (`CATCH_UP_BACKLOG_RECONCILE_MAX`).
    pub(super) backlog_finished: u64,
    pub(super) backlog_moved: Instant,
    pub(super) reconciled_at: Instant,
    /// The documents peers named urgent lately (at most `URGENT_NAMED_MAX`): a
    /// reconciliation's differences among them are taken first.
    pub(super) urgent_named: HashSet<[u8; 16]>,
}

/// Most documents kept as named urgent by peers; past it the set starts again.
pub(super) const URGENT_NAMED_MAX: usize = 4 * URGENT_DOCUMENTS_MAX;

/// The size of a value as CBOR, for the byte counters.
pub(super) fn cbor_len(value: &impl Serialize) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = ciborium::into_writer(value, &mut count);
    count.0
}

/// `work`, reporting its job to the driver through `jobs`.
fn report(
    jobs: mpsc::UnboundedSender<Job>,
    peer: PeerId,
    work: impl FnOnce() -> Job + Send + 'static,
) -> impl FnOnce() + Send + 'static {
    move || {
        if let Some(job) = caught(peer, work) {
            let _ = jobs.send(job);
        }
    }
}

/// `work`'s result, or `None` (logged) if it panicked.
fn caught<T>(peer: PeerId, work: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(result) => Some(result),
        Err(_) => {
            tracing::error!(%peer, "a sync job failed unexpectedly; its work is released");
            None
        }
    }
}

pub(super) fn now_ms() -> u64 {
    crate::audit::now_unix_ms()
}

impl Driver {
    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut jobs: mpsc::UnboundedReceiver<Job>,
        mut local: tokio::sync::broadcast::Receiver<crate::replica::LocalChange>,
    ) {
        let mut tick = tokio::time::interval(self.config.reconcile_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(job) = jobs.recv() => self.on_job(job),
                change = local.recv() => match change {
                    Ok(change) => self.publish_local(change, &mut local),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "local changes not gossiped; anti-entropy will carry them");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
                _ = tick.tick() => self.on_tick(),
                command = commands.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        self.close();
                        let _ = done.send(());
                        return;
                    }
                    None => return self.close(),
                    Some(command) => self.on_command(command),
                },
            }
        }
    }

    /// Runs `work` on the blocking pool; the job it returns goes back to the driver. The
    /// slots it holds travel in that job; if it panics, they are given back as it unwinds.
    pub(super) fn spawn_job(&self, peer: PeerId, work: impl FnOnce() -> Job + Send + 'static) {
        tokio::task::spawn_blocking(self.job(peer, work));
    }

    /// `spawn_job` for fetched documents taken (`work`), on the catch-up threads of lower
    /// priority (`background`), whose job (`then`) is made of what they carried once durable:
    /// the wait for durability runs on the thread that waits for flushes
    /// (`background::Waiter`), and the catch-up thread takes its next work. The slots `then`
    /// holds travel with it; if either part panics, they are given back as it unwinds.
    pub(super) fn spawn_catch_up_job_durable(
        &self,
        peer: PeerId,
        work: impl FnOnce() -> Result<document::Taken, DocumentSyncError> + Send + 'static,
        then: impl FnOnce(Result<document::Carried, DocumentSyncError>) -> Job + Send + 'static,
    ) {
        let node = self.node.clone();
        let jobs = self.jobs.clone();
        let waiter = self.background.waiter();
        let taken = move || {
            let Some(taken) = caught(peer, work) else {
                return;
            };
            let durable = move || then(taken.and_then(|taken| taken.durable(&node)));
            if !waiter.run(report(jobs, peer, durable)) {
                tracing::error!(%peer, "the thread waiting for flushes is gone; the work is released");
            }
        };
        if !self.background.run(taken) {
            tracing::error!(%peer, "the catch-up threads are gone; the work is released");
        }
    }

    /// `work`, reporting its job to the driver.
    pub(super) fn job(
        &self,
        peer: PeerId,
        work: impl FnOnce() -> Job + Send + 'static,
    ) -> impl FnOnce() + Send + 'static {
        report(self.jobs.clone(), peer, work)
    }

    pub(super) fn close(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Connected(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Dial(address) => {
                if let Err(error) = self.swarm.dial(address.clone()) {
                    tracing::warn!(%address, %error, "dial failed");
                }
            }
            Command::ReconcileNow => self.reconcile_with_someone(),
            Command::UpdateRoster(signed, reply) => {
                self.adopt_roster(signed, None, None, Some(reply))
            }
            Command::Shutdown(_) => {}
        }
    }

    /// Adopts a signed roster on the blocking pool (it may withdraw a revoked key's changes).
    pub(super) fn adopt_roster(
        &self,
        signed: Vec<u8>,
        gossip: Option<(MessageId, PeerId)>,
        answered_by: Option<PeerId>,
        reply: Option<oneshot::Sender<Result<RosterUpdate, NodeError>>>,
    ) {
        let node = self.node.clone();
        let peer = gossip
            .as_ref()
            .map(|(_, p)| *p)
            .or(answered_by)
            .unwrap_or(*self.swarm.local_peer_id());
        self.spawn_job(peer, move || Job::RosterAdopted {
            result: node.update_roster(&signed),
            gossip,
            answered_by,
            reply,
        });
    }

    pub(super) fn stats_mut(&self) -> std::sync::MutexGuard<'_, SyncStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn with_peer_stats(&self, peer: &PeerId, f: impl FnOnce(&mut PeerStats)) {
        let mut stats = self.stats_mut();
        f(stats.peers.entry(peer.to_string()).or_default());
    }

    pub(super) fn on_tick(&mut self) {
        // Redial bootstrap peers that are not connected.
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for address in self.config.bootstrap.clone() {
            let reached = self
                .bootstrap_peers
                .get(&address)
                .is_some_and(|peer| self.swarm.is_connected(peer));
            if !reached {
                let _ = self.swarm.dial(address);
            }
        }
        // Disconnect and ban peers whose gossip score says they misbehave.
        for peer in &connected {
            let score = self.swarm.behaviour().gossipsub.peer_score(peer);
            self.with_peer_stats(peer, |s| s.score = score);
            if score.is_some_and(|s| s < DISCONNECT_SCORE) {
                tracing::warn!(%peer, ?score, "disconnecting a peer for its gossip score");
                self.ban(*peer);
            }
        }
        // Room freed by other peers' documents goes to peers with differences kept.
        let waiting: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, state)| !state.kept.is_empty())
            .map(|(peer, _)| *peer)
            .collect();
        for peer in waiting {
            self.pump(peer);
        }
        self.reconcile_with_someone();
    }

    pub(super) fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = &endpoint
                    && self.config.bootstrap.contains(address)
                {
                    self.bootstrap_peers.insert(address.clone(), peer_id);
                }
                if num_established.get() > 1 {
                    return;
                }
                let institution = self.node.peer_institution(&peer_id);
                tracing::info!(peer = %peer_id, ?institution, "connected");
                self.peer_state(peer_id);
                let address = endpoint.get_remote_address().to_string();
                self.with_peer_stats(&peer_id, |s| {
                    s.connected = true;
                    s.disconnected_ms = None;
                    s.audit_sequence_at_disconnect = None;
                    s.institution = institution.map(|i| i.to_string());
                    s.address = Some(address);
                });
                self.ask_roster(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::info!(peer = %peer_id, "disconnected");
                // Its documents are released, queued or in flight: requests in flight fail, and
                // their release (or a late answer's) then finds nothing of it.
                self.peers.remove(&peer_id);
                self.in_progress.release_peer(&peer_id);
                self.responder.forget(&peer_id);
                let sequence = self.node.audit_sequence();
                self.with_peer_stats(&peer_id, |s| {
                    s.connected = false;
                    s.disconnected_ms = Some(now_ms());
                    s.audit_sequence_at_disconnect = Some(sequence);
                });
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.stats_mut().denied += 1;
                }
                tracing::debug!(%error, "incoming connection failed or denied");
            }
            SwarmEvent::OutgoingConnectionError {
                error: libp2p::swarm::DialError::Denied { .. },
                ..
            } => {
                self.stats_mut().denied += 1;
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(event)) => self.on_gossip(event),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(event)) => self.on_sync_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.with_peer_stats(&peer, |s| s.rtt_ms = Some(rtt.as_secs_f64() * 1e3));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, address) in found {
                    if self.node.peer_institution(&peer).is_some()
                        && !self.swarm.is_connected(&peer)
                    {
                        let _ = self.swarm.dial(address);
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_job(&mut self, job: Job) {
        match job {
            Job::Validated {
                slot,
                message_id,
                source,
                acceptance,
                accepted,
            } => {
                self.release(slot);
                let rejected = matches!(acceptance, MessageAcceptance::Reject);
                self.with_peer_stats(&source, |s| {
                    s.changes_received += u64::from(accepted);
                    s.changes_rejected += u64::from(rejected);
                });
                self.report(&message_id, &source, acceptance);
            }
            Job::RosterAdopted {
                result,
                gossip,
                answered_by,
                reply,
            } => {
                let acceptance = roster_acceptance(&result);
                if let Some(peer) = answered_by
                    && matches!(acceptance, MessageAcceptance::Reject)
                {
                    self.strike(peer, "a roster that does not verify");
                }
                if let Some((message_id, source)) = gossip {
                    self.report(&message_id, &source, acceptance);
                }
                if let Ok(RosterUpdate::Adopted { .. }) = result {
                    if reply.is_some() {
                        self.publish_roster();
                    }
                    self.enforce_roster();
                }
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Job::Respond {
                slot,
                peer,
                channel,
                response,
                carried,
                state,
            } => {
                self.count_carried(&peer, &carried);
                if let Some((document, state)) = state
                    && self.swarm.is_connected(&peer)
                {
                    self.responder.put((peer, document), state);
                }
                self.respond(peer, channel, response);
                self.release(slot);
            }
            // Its connection closed meanwhile: the reconciliation ends with it.
            Job::ReconcileStep { slot, .. } if !self.is_current(&slot) => self.release(slot),
            Job::ReconcileStep {
                slot,
                peer,
                run,
                round_trips,
                bytes,
                result,
            } => match result {
                Ok(true) => {
                    let query = run.query();
                    let sent = cbor_len(&query);
                    self.send(
                        peer,
                        Request::Reconcile(query),
                        Outbound::Reconcile {
                            slot,
                            run,
                            round_trips,
                            bytes: bytes + sent,
                        },
                    );
                }
                Ok(false) => self.reconciled(slot, peer, &run, round_trips, bytes),
                Err(error) => {
                    tracing::info!(%peer, %error, "reconciliation abandoned");
                    if error.is_peers_fault() {
                        self.strike(peer, "a reconciliation reply that breaks the protocol");
                    }
                    self.release(slot);
                }
            },
            // Its connection closed meanwhile: the session ends with it.
            Job::SyncStep { slot, .. } if !self.is_current(&slot) => self.release(slot),
            Job::SyncStep {
                slot,
                peer,
                document,
                state,
                rounds,
                result,
                sent,
            } => match result {
                Ok((carried, Some(message))) if rounds < SYNC_ROUNDS_MAX => {
                    self.count_carried(&peer, &carried);
                    self.send(
                        peer,
                        Request::Sync(message),
                        Outbound::Sync {
                            slot,
                            document,
                            state,
                            rounds,
                            sent,
                        },
                    );
                }
                Ok((carried, _)) => {
                    self.count_carried(&peer, &carried);
                    self.with_peer_stats(&peer, |s| s.documents_reconciled += 1);
                    self.release(slot);
                }
                Err(error) => {
                    tracing::info!(%peer, %document, %error, "document sync abandoned");
                    if error.is_peers_fault() && !matches!(error, DocumentSyncError::TooLarge(_)) {
                        self.strike(peer, "a malformed sync message");
                    }
                    if matches!(
                        error,
                        DocumentSyncError::TooLarge(_) | DocumentSyncError::WholeOnly
                    ) {
                        self.fetch_instead(peer, slot);
                    } else {
                        self.release(slot);
                    }
                }
            },
            Job::Fetched {
                documents,
                peer,
                bytes,
                carried,
                deferred,
            } => self.fetched(peer, documents, bytes, carried, deferred),
            Job::Announced {
                slot,
                peer,
                document,
            } => {
                self.release(slot);
                // A peer that let a request time out is given no announced documents while it
                // is left out of reconciliation.
                if let Some(document) = document
                    && let Some(state) = self.peers.get_mut(&peer)
                    && state
                        .quiet_until
                        .is_none_or(|until| until <= Instant::now())
                    && self.in_progress.take(peer, document)
                {
                    state.to_sync.push_back(document);
                }
                self.pump(peer);
            }
            Job::Released(released) => self.give_back(released),
        }
    }
}

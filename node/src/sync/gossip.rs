//! Gossip: local changes pushed at once; peers' changes queued per publisher (bounded in
//! count, bytes and age) and validated through the node's pipeline, a bounded number at a
//! time; the roster pushed and enforced.

use super::*;

/// How a roster offered by a peer (gossip) is judged.
pub(super) fn roster_acceptance(result: &Result<RosterUpdate, NodeError>) -> MessageAcceptance {
    match result {
        Ok(RosterUpdate::Adopted { .. }) => MessageAcceptance::Accept,
        // The roster held: a duplicate, not passed on as new, its sender not penalised.
        Ok(RosterUpdate::AlreadyHeld { .. }) => MessageAcceptance::Ignore,
        // Older or the same: nothing new, nobody's fault; a newer format is a newer
        // release's, during a rolling upgrade. A roster that changes or drops a revocation is
        // signed by the authority, and a peer may hold it honestly (it never held the
        // revocation, or runs an older release).
        Err(NodeError::Roster(
            crate::membership::RosterError::Stale { .. }
            | crate::membership::RosterError::Diverged { .. }
            | crate::membership::RosterError::UnsupportedVersion { .. }
            | crate::membership::RosterError::RevocationChanged { .. }
            | crate::membership::RosterError::History(_),
        )) => MessageAcceptance::Ignore,
        Err(NodeError::Roster(_)) => MessageAcceptance::Reject,
        Err(_) => MessageAcceptance::Ignore,
    }
}

/// A gossiped change waiting for validation.
pub(super) struct QueuedChange {
    pub(super) message_id: MessageId,
    pub(super) source: PeerId,
    pub(super) envelope: serde_bytes::ByteBuf,
    pub(super) queued_at: Instant,
}

/// One publisher's gossip changes in validation and waiting.
#[derive(Default)]
pub(super) struct PublisherQueue {
    pub(super) in_flight: usize,
    pub(super) waiting: VecDeque<QueuedChange>,
}

/// Most local changes published in one go (the one received and those already queued behind
/// it), urgent ones first.
const LOCAL_BURST_MAX: usize = 256;

impl Driver {
    /// Publishes a local change with those already queued behind it, at most
    /// `LOCAL_BURST_MAX`: changes to urgent documents first, each group in the order written.
    pub(super) fn publish_local(
        &mut self,
        first: crate::replica::LocalChange,
        local: &mut tokio::sync::broadcast::Receiver<crate::replica::LocalChange>,
    ) {
        let mut burst = vec![first];
        while burst.len() < LOCAL_BURST_MAX {
            match local.try_recv() {
                Ok(change) => burst.push(change),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "local changes not gossiped; anti-entropy will carry them"
                    );
                }
                Err(_) => break,
            }
        }
        burst.sort_by_key(|change| !change.urgent);
        for change in burst {
            self.publish(change);
        }
    }

    pub(super) fn publish(&mut self, change: crate::replica::LocalChange) {
        let gossip = if change.envelope.len() <= self.config.gossip_envelope_bytes_max {
            Gossip::Change(change.envelope.into())
        } else {
            Gossip::Announce {
                document: ByteArray::new(*change.document.as_bytes()),
                heads: vec![ByteArray::new(change.hash.0)],
            }
        };
        let data = gossip.encode();
        let bytes = data.len() as u64;
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topics.changes.clone(), data)
        {
            Ok(_) => {
                let mesh: Vec<PeerId> = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .mesh_peers(&self.topics.changes.hash())
                    .copied()
                    .collect();
                let mesh_len = mesh.len() as u64;
                for peer in mesh {
                    self.with_peer_stats(&peer, |s| {
                        s.bytes_out += bytes;
                        s.messages_out += 1;
                    });
                }
                self.stats_mut().sent.gossip += bytes * mesh_len;
            }
            // No peer to send to (alone, or still connecting): anti-entropy carries it.
            Err(error) => tracing::debug!(%error, "change not gossiped"),
        }
    }

    pub(super) fn publish_roster(&mut self) {
        let data = Gossip::Roster(self.node.signed_roster().into()).encode();
        if let Err(error) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topics.roster.clone(), data)
        {
            tracing::debug!(%error, "roster not gossiped; peers will ask for it");
        }
    }

    /// Disconnects peers the current roster no longer admits.
    pub(super) fn enforce_roster(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            if self.node.peer_institution(&peer).is_none() {
                tracing::warn!(%peer, "disconnecting a peer the roster no longer admits");
                let _ = self.swarm.disconnect_peer_id(peer);
                self.stats_mut().disconnected += 1;
            }
        }
    }

    /// Asks a peer for its roster if newer than ours.
    pub(super) fn ask_roster(&mut self, peer: PeerId) {
        let have = self.node.roster_version();
        self.send(
            peer,
            Request::Roster { have, urgent: true },
            Outbound::Roster,
        );
    }

    pub(super) fn report(
        &mut self,
        message_id: &MessageId,
        source: &PeerId,
        acceptance: MessageAcceptance,
    ) {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(message_id, source, acceptance);
    }

    pub(super) fn on_gossip(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source: source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        let bytes = message.data.len() as u64;
        self.with_peer_stats(&source, |s| {
            s.bytes_in += bytes;
            s.messages_in += 1;
        });
        let gossip = match Gossip::decode(&message.data) {
            Ok(gossip) => gossip,
            Err(error) => {
                tracing::info!(peer = %source, %error, "gossip refused");
                self.with_peer_stats(&source, |s| s.changes_rejected += 1);
                return self.report(&message_id, &source, MessageAcceptance::Reject);
            }
        };
        let roster_topic = message.topic == self.topics.roster.hash();
        match gossip {
            Gossip::Roster(signed) if roster_topic => {
                self.adopt_roster(signed.into_vec(), Some((message_id, source)), None, None);
            }
            Gossip::Change(envelope) if !roster_topic => {
                // Members carry larger changes as announcements.
                if envelope.len() > GOSSIP_ENVELOPE_BYTES_MAX {
                    self.with_peer_stats(&source, |s| s.changes_rejected += 1);
                    return self.report(&message_id, &source, MessageAcceptance::Reject);
                }
                if self.validations >= GOSSIP_VALIDATIONS_MAX {
                    return self.report(&message_id, &source, MessageAcceptance::Ignore);
                }
                // Each publisher's changes take turns: a few at once, the rest in its queue.
                // A publisher that is not a member (anyone can sign a gossip message) is
                // queued under the peer that passed it on, so invented publishers share one
                // queue.
                let publisher = message
                    .source
                    .filter(|p| self.node.peer_institution(p).is_some())
                    .unwrap_or(source);
                let queue = self.publishers.entry(publisher).or_default();
                let change = QueuedChange {
                    message_id,
                    source,
                    envelope,
                    queued_at: Instant::now(),
                };
                if queue.in_flight < GOSSIP_VALIDATIONS_PER_PUBLISHER_MAX {
                    queue.in_flight += 1;
                    return self.validate(publisher, change);
                }
                let bytes = change.envelope.len();
                if queue.waiting.len() >= GOSSIP_QUEUED_PER_PUBLISHER_MAX
                    || self.queued >= GOSSIP_QUEUED_MAX
                    || self.queued_bytes + bytes > GOSSIP_QUEUED_BYTES_MAX
                {
                    return self.report(&change.message_id, &source, MessageAcceptance::Ignore);
                }
                queue.waiting.push_back(change);
                self.queued += 1;
                self.queued_bytes += bytes;
            }
            Gossip::Announce { document, heads } if !roster_topic => {
                // Not passed on: the announcer's neighbours pull from it, others reconcile.
                self.report(&message_id, &source, MessageAcceptance::Ignore);
                if self.validations >= GOSSIP_VALIDATIONS_MAX {
                    return;
                }
                let slot = self.take(source, Held::Lookup);
                let document = DocumentId::from_bytes(*document);
                let node = self.node.clone();
                self.spawn_job(source, move || {
                    let missing = heads.iter().take(ANNOUNCED_HEADS_MAX).any(|head| {
                        !node
                            .has_change(document, &crate::model::automerge::ChangeHash(**head))
                            .unwrap_or(false)
                    });
                    Job::Announced {
                        slot,
                        peer: source,
                        document: missing.then_some(document),
                    }
                });
            }
            // A message on the wrong topic.
            _ => self.report(&message_id, &source, MessageAcceptance::Reject),
        }
    }

    /// Validates a gossiped change on the blocking pool: the pipeline's decision is the
    /// gossip verdict.
    pub(super) fn validate(&mut self, publisher: PeerId, change: QueuedChange) {
        let QueuedChange {
            message_id,
            source,
            envelope,
            ..
        } = change;
        let slot = self.take(source, Held::Validation(publisher));
        let node = self.node.clone();
        self.spawn_job(source, move || {
            let _span = tracing::debug_span!("gossip_validation", peer = %source).entered();
            let (acceptance, accepted) = match node.ingest(&envelope) {
                Ok(Ingested::Accepted(_)) => (MessageAcceptance::Accept, true),
                // Known already, or not decidable yet: not passed on, not punished.
                Ok(Ingested::Duplicate(_) | Ingested::Pending(_)) => {
                    (MessageAcceptance::Ignore, false)
                }
                // Refused, and the sender is at fault: an honest member never sends it.
                Ok(decision @ Ingested::Quarantined(..)) if decision.blames_sender() => {
                    (MessageAcceptance::Reject, false)
                }
                // Refused here because of a revocation the relay may not have adopted yet:
                // not passed on, not punished.
                Ok(Ingested::Quarantined(..)) => (MessageAcceptance::Ignore, false),
                // This node's own trouble (its store, a full quarantine).
                Err(
                    crate::replica::IngestError::Store(_)
                    | crate::replica::IngestError::QuarantineFull
                    | crate::replica::IngestError::RevokedBacklogFull,
                ) => (MessageAcceptance::Ignore, false),
                // Erased here: a relay that has not adopted the order yet is not at fault.
                Err(crate::replica::IngestError::Erased { .. }) => {
                    (MessageAcceptance::Ignore, false)
                }
                Err(_) => (MessageAcceptance::Reject, false),
            };
            Job::Validated {
                slot,
                message_id,
                source,
                acceptance,
                accepted,
            }
        });
    }

    /// A validation of `publisher`'s ended: the next of its queue takes the slot (changes
    /// queued too long are ignored on the way).
    pub(super) fn validated(&mut self, publisher: PeerId) {
        self.validations = self.validations.saturating_sub(1);
        loop {
            let Some(queue) = self.publishers.get_mut(&publisher) else {
                return;
            };
            let Some(next) = queue.waiting.pop_front() else {
                queue.in_flight = queue.in_flight.saturating_sub(1);
                if queue.in_flight == 0 {
                    self.publishers.remove(&publisher);
                }
                return;
            };
            self.queued = self.queued.saturating_sub(1);
            self.queued_bytes = self.queued_bytes.saturating_sub(next.envelope.len());
            if next.queued_at.elapsed() > GOSSIP_QUEUED_AGE_MAX {
                self.report(&next.message_id, &next.source, MessageAcceptance::Ignore);
                continue;
            }
            return self.validate(publisher, next);
        }
    }
}

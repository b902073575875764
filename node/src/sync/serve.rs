//! Answers to peers' requests: reconciliation queries, per-document sync, fetches of whole
//! documents, each within the peer's share and rate.

use super::*;

impl Driver {
    pub(super) fn on_sync_event(&mut self, event: request_response::Event<Request, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    let bytes = cbor_len(&response);
                    self.with_peer_stats(&peer, |s| {
                        s.bytes_in += bytes;
                        s.messages_in += 1;
                    });
                    if let Some((peer, outbound)) = self.outbound.remove(&request_id) {
                        self.on_response(peer, outbound, response, bytes);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "sync request failed");
                // Only a timeout says something of the peer; an I/O failure may be a cut link,
                // a full stream budget here, or an honest responder whose work failed.
                if let request_response::OutboundFailure::Timeout = error {
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.quiet_until = Some(Instant::now() + UNANSWERED_BACKOFF);
                        // Its queue would take one timeout per batch to drain: released now,
                        // those documents are found again with a peer that answers.
                        for document in state.to_sync.drain(..) {
                            self.in_progress.release(&peer, &document);
                        }
                        for id in state.to_fetch.drain(..) {
                            self.in_progress
                                .release(&peer, &DocumentId::from_bytes(*id));
                        }
                        state.kept.clear();
                    }
                    self.with_peer_stats(&peer, |s| s.unanswered += 1);
                }
                if let Some((_, outbound)) = self.outbound.remove(&request_id) {
                    self.finished(outbound);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "serving a sync request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn respond(
        &mut self,
        peer: PeerId,
        channel: ResponseChannel<Response>,
        response: Response,
    ) {
        let bytes = cbor_len(&response);
        self.with_peer_stats(&peer, |s| {
            s.bytes_out += bytes;
            s.messages_out += 1;
        });
        self.stats_mut().sent.response(&response, bytes);
        let _ = self
            .swarm
            .behaviour_mut()
            .sync
            .send_response(channel, response);
    }

    pub(super) fn on_request(
        &mut self,
        peer: PeerId,
        request: Request,
        channel: ResponseChannel<Response>,
    ) {
        let bytes = cbor_len(&request);
        self.with_peer_stats(&peer, |s| {
            s.bytes_in += bytes;
            s.messages_in += 1;
        });
        // A request that arrives after its connection closed is not served.
        if !self.peers.contains_key(&peer) {
            return self.respond(peer, channel, Response::Refused(Refusal::Busy));
        }
        let slot = self.take(peer, Held::Inbound);
        let state = self.peer_state(peer);
        let allowed = state.inbound <= INBOUND_REQUESTS_PER_PEER_MAX
            && state.requests.take(INBOUND_REQUESTS_PER_PEER_PER_S)
            && (!matches!(request, Request::Reconcile(_))
                || state
                    .reconcile_queries
                    .take(RECONCILE_QUERIES_PER_PEER_PER_S));
        if !allowed {
            self.respond(peer, channel, Response::Refused(Refusal::Busy));
            return self.release(slot);
        }
        let node = self.node.clone();
        match request {
            Request::Roster { have, urgent } => {
                let newer = (node.roster_version() > have).then(|| node.signed_roster().into());
                let response = match urgent {
                    true => Response::RosterAndUrgent {
                        roster: newer,
                        urgent: node
                            .urgent_documents()
                            .into_iter()
                            .map(|(document, digest)| UrgentDocument {
                                document: ByteArray::new(document),
                                digest: ByteArray::new(digest),
                            })
                            .collect(),
                    },
                    false => Response::Roster(newer),
                };
                self.respond(peer, channel, response);
                self.release(slot);
            }
            Request::Reconcile(query) => {
                self.spawn_job(peer, move || {
                    let response = match node.catalogue().answer(&query) {
                        Ok(reply) => Response::Reconcile(reply),
                        Err(error) => Response::Refused(Refusal::Malformed(error.to_string())),
                    };
                    Job::Respond {
                        slot,
                        peer,
                        channel,
                        response,
                        carried: Carried::default(),
                        state: None,
                    }
                });
            }
            Request::Sync(message) => {
                let document = DocumentId::from_bytes(*message.document);
                let kept = self.responder.take(&(peer, document));
                let bytes_max = self.config.sync_message_bytes_max;
                let state = if message.first {
                    Box::default()
                } else {
                    kept.unwrap_or_default()
                };
                self.spawn_job(peer, move || {
                    let _span =
                        tracing::debug_span!("serve_document_sync", %peer, %document).entered();
                    let mut state = state;
                    let mut carried = Carried::default();
                    let step = document::incoming(&node, &message, &mut state).and_then(|c| {
                        carried = c;
                        document::outgoing(&node, document, &mut state, bytes_max)
                    });
                    let (response, keep) = match step {
                        Ok(reply) => (
                            Response::Sync(reply),
                            message.message.len() <= RESPONDER_STATE_MESSAGE_BYTES_MAX,
                        ),
                        // Its own answer, not the asker's message, is too large.
                        Err(DocumentSyncError::TooLarge(_) | DocumentSyncError::WholeOnly)
                            if message.message.len() <= protocol::SYNC_MESSAGE_BYTES_MAX
                                && message.signatures.len() <= protocol::SYNC_SIGNATURES_MAX =>
                        {
                            (Response::Refused(Refusal::TooLarge), false)
                        }
                        Err(error) if error.is_peers_fault() => (
                            Response::Refused(Refusal::Malformed(error.to_string())),
                            false,
                        ),
                        Err(error) => {
                            tracing::warn!(%error, "serving a sync request failed");
                            (Response::Refused(Refusal::Failed), false)
                        }
                    };
                    Job::Respond {
                        slot,
                        peer,
                        channel,
                        response,
                        carried,
                        state: keep.then_some((document, state)),
                    }
                });
            }
            Request::Fetch {
                documents,
                deflated,
                covered,
            } => {
                self.spawn_job(peer, move || {
                    let response = match document::fetch(&node, &documents, covered) {
                        Ok((documents, deferred)) if covered => Response::FetchCovered {
                            documents: serde_bytes::ByteBuf::from(protocol::deflate_covered(
                                &documents,
                            )),
                            deferred,
                        },
                        Ok((documents, deferred)) if deflated => Response::FetchDeflated {
                            documents: serde_bytes::ByteBuf::from(protocol::deflate_fetched(
                                &documents,
                            )),
                            deferred,
                        },
                        Ok((documents, deferred)) => Response::Fetch {
                            documents,
                            deferred,
                        },
                        Err(error) if error.is_peers_fault() => {
                            Response::Refused(Refusal::Malformed(error.to_string()))
                        }
                        Err(_) => Response::Refused(Refusal::Failed),
                    };
                    Job::Respond {
                        slot,
                        peer,
                        channel,
                        response,
                        carried: Carried::default(),
                        state: None,
                    }
                });
            }
        }
    }
}

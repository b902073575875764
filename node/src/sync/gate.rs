//! The connection gate: a connection from a peer whose key is not a current member of the
//! roster (or that was banned for misbehaving) is denied as soon as its PeerId is known —
//! right after the Noise handshake, before any other protocol runs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use crate::replica::Node;

/// Why a connection was denied.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// The peer's key is not a current member's.
    #[error("the peer's key is not a current member of the consortium roster")]
    NotAMember,
    /// The peer was disconnected for misbehaving and is banned for a while.
    #[error("the peer is banned for misbehaving")]
    Banned,
}

/// Peers banned until a moment, shared with the sync driver.
pub type Bans = Arc<Mutex<HashMap<PeerId, Instant>>>;

/// The gate behaviour.
pub struct Gate {
    node: Arc<Node>,
    bans: Bans,
}

impl Gate {
    /// A gate asking `node`'s roster, and refusing `bans`.
    pub fn new(node: Arc<Node>, bans: Bans) -> Self {
        Self { node, bans }
    }

    fn check(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        {
            let mut bans = self.bans.lock().unwrap_or_else(|p| p.into_inner());
            match bans.get(peer) {
                Some(until) if *until > Instant::now() => {
                    return Err(ConnectionDenied::new(Denied::Banned));
                }
                Some(_) => {
                    bans.remove(peer);
                }
                None => {}
            }
        }
        if self.node.peer_institution(peer).is_none() {
            tracing::info!(%peer, "connection denied: not a member");
            return Err(ConnectionDenied::new(Denied::NotAMember));
        }
        Ok(())
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _local_addr: &Multiaddr,
        _remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection_id: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role_override: Endpoint,
        _port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _peer_id: PeerId,
        _connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

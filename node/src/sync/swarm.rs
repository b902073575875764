//! The libp2p swarm: its behaviours, gossipsub topics and scoring, and the transports.

use super::*;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) gate: gate::Gate,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) sync: request_response::Behaviour<protocol::Codec>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) relay_server: Toggle<relay::Behaviour>,
}

pub(super) struct Topics {
    pub(super) changes: IdentTopic,
    pub(super) roster: IdentTopic,
}

impl Topics {
    pub(super) fn new(node: &Node) -> Self {
        let (changes, roster) = topic_names(&node.authority());
        Self {
            changes: IdentTopic::new(changes),
            roster: IdentTopic::new(roster),
        }
    }
}

/// The consortium's gossip topics, named after its authority key: changes, and the roster.
pub fn topic_names(authority: &crate::model::Bytes32) -> (String, String) {
    (
        format!("estuary/{authority}/changes/1"),
        format!("estuary/{authority}/roster/1"),
    )
}

pub(super) fn gossipsub_config(roster_topic: TopicHash) -> Result<gossipsub::Config, SyncError> {
    gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(GOSSIP_MESSAGE_BYTES_MAX + 4 * 1024)
        // A message is its content: the same envelope from two publishers is one message.
        // A roster is its content, however it was encoded on the way.
        .message_id_fn(move |message| {
            let roster = message.topic == roster_topic;
            MessageId::from(protocol::gossip_message_id(roster, &message.data))
        })
        .heartbeat_interval(Duration::from_secs(1))
        .build()
        .map_err(|e| SyncError::Setup(e.to_string()))
}

/// Gossip scoring: a member earns a little for first deliveries and loses much for each
/// invalid message (a change the pipeline refuses), which decays slowly. Delivery-rate
/// penalties are off: a consortium's traffic is bursty, and a quiet centre is not at fault.
pub(super) fn peer_score(
    topics: &Topics,
) -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.99,
        ..gossipsub::TopicScoreParams::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        // Institutions may share an address (NAT, the testnet's loopback).
        ip_colocation_factor_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    };
    params.topics.insert(topics.changes.hash(), topic.clone());
    params.topics.insert(topics.roster.hash(), topic);
    let thresholds = gossipsub::PeerScoreThresholds {
        gossip_threshold: -100.0,
        publish_threshold: -200.0,
        graylist_threshold: -400.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    (params, thresholds)
}

pub(super) fn build_swarm(
    node: &Arc<Node>,
    config: &SyncConfig,
    bans: gate::Bans,
) -> Result<Swarm<Behaviour>, SyncError> {
    let setup = |e: &dyn std::fmt::Display| SyncError::Setup(e.to_string());
    let keypair = node.identity().libp2p_keypair();
    let topics = Topics::new(node);
    let make_behaviour = |key: &libp2p::identity::Keypair,
                          relay_client: relay::client::Behaviour|
     -> Result<Behaviour, SyncError> {
        let mut gossipsub = gossipsub::Behaviour::new(
            MessageAuthenticity::Signed(key.clone()),
            gossipsub_config(topics.roster.hash())?,
        )
        .map_err(|e| setup(&e))?;
        let (params, thresholds) = peer_score(&topics);
        gossipsub
            .with_peer_score(params, thresholds)
            .map_err(|e| setup(&e))?;
        let sync = request_response::Behaviour::with_codec(
            protocol::Codec,
            [(PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(
                    INBOUND_REQUESTS_PER_PEER_MAX
                        + SYNC_SESSIONS_PER_PEER_MAX
                        + FETCHES_PER_PEER_MAX
                        + 1,
                ),
        );
        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id())
                    .map_err(|e| setup(&e))?,
            )
        } else {
            None
        };
        Ok(Behaviour {
            gate: gate::Gate::new(node.clone(), bans.clone()),
            identify: identify::Behaviour::new(identify::Config::new(
                "/estuary/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
            gossipsub,
            sync,
            mdns: mdns.into(),
            relay_client,
            relay_server: config
                .relay_server
                .then(|| relay::Behaviour::new(key.public().to_peer_id(), relay::Config::default()))
                .into(),
        })
    };
    let behaviour = |key: &libp2p::identity::Keypair, relay_client| {
        make_behaviour(key, relay_client)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    };
    let swarm_config = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(IDLE_CONNECTION);
    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair).with_tokio();
    let swarm = match config.transport {
        TransportKind::Network => builder
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| setup(&e))?
            .with_quic()
            .with_dns()
            .map_err(|e| setup(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| setup(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| setup(&e))?
            .with_swarm_config(swarm_config)
            .build(),
        TransportKind::Memory | TransportKind::Faulty { .. } => {
            // Plain memory is the faulty transport with no fault in force.
            let (faults, node) = match &config.transport {
                TransportKind::Faulty { faults, node } => (faults.clone(), *node),
                _ => (faults::Faults::new(0), 0),
            };
            builder
                .with_other_transport(
                    move |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                        Ok(MemoryTransport::default()
                            .map(move |channel, point| faults.wrap(channel, node, &point))
                            .upgrade(Version::V1)
                            .authenticate(noise::Config::new(key)?)
                            .multiplex(yamux::Config::default()))
                    },
                )
                .map_err(|e| setup(&e))?
                .with_relay_client(noise::Config::new, yamux::Config::default)
                .map_err(|e| setup(&e))?
                .with_behaviour(behaviour)
                .map_err(|e| setup(&e))?
                .with_swarm_config(swarm_config)
                .build()
        }
    };
    Ok(swarm)
}

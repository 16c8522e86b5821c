//! The libp2p behaviours a node runs.

use std::time::Duration;

use libp2p::kad;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{autonat, dcutr, identify, identity, mdns, ping, relay, StreamProtocol};

use super::transport::relay_config;
use crate::KAD_PROTOCOL;

/// Everything a node speaks: Kademlia (the DHT), identify, ping, mDNS (on
/// a LAN), relay client and (on a tracker) relay server, DCUtR hole
/// punching, AutoNAT, and plain streams for Sherpa's own protocols.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) relay: Toggle<relay::Behaviour>,
    pub(super) dcutr: dcutr::Behaviour,
    pub(super) autonat: autonat::Behaviour,
    pub(super) streams: libp2p_stream::Behaviour,
}

/// What the behaviours are set up with.
pub(super) struct BehaviourSettings {
    /// How long a DHT query may run.
    pub(super) query_timeout: Duration,
    /// Lifetime of stored records (provider entries live twice as long).
    pub(super) record_ttl: Duration,
    /// Whether to find peers by mDNS.
    pub(super) mdns: bool,
    /// Whether to be a circuit relay for others (trackers are).
    pub(super) relay_server: bool,
}

impl Behaviour {
    pub(super) fn new(
        key: &identity::Keypair,
        relay_client: relay::client::Behaviour,
        streams: libp2p_stream::Behaviour,
        settings: BehaviourSettings,
    ) -> Result<Self, std::io::Error> {
        let local = key.public().to_peer_id();
        let ttl = settings.record_ttl;
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config
            .set_query_timeout(settings.query_timeout)
            .set_record_ttl(Some(ttl))
            .set_provider_record_ttl(Some(ttl * 2))
            .set_publication_interval(None)
            .set_provider_publication_interval(None)
            .set_max_packet_size(swarm_core::codec::MAX_CONTROL_MESSAGE * 2)
            // Every record and provider entry others ask this node to keep
            // goes through `admission` first.
            .set_record_filtering(kad::StoreInserts::FilterBoth);
        let store = MemoryStore::with_config(
            local,
            MemoryStoreConfig {
                max_records: 65_536,
                max_value_bytes: swarm_core::codec::MAX_CONTROL_MESSAGE,
                max_providers_per_key: 4096,
                max_provided_keys: 1024,
            },
        );
        let mut kad = kad::Behaviour::with_config(local, store, kad_config);
        // Every Sherpa node serves the DHT: loopback and LAN nodes never
        // get the external-address confirmation that would switch kad to
        // server mode by itself.
        kad.set_mode(Some(kad::Mode::Server));
        let mdns = if settings.mdns {
            let config = mdns::Config {
                query_interval: Duration::from_secs(10),
                ..mdns::Config::default()
            };
            Some(mdns::tokio::Behaviour::new(config, local)?)
        } else {
            None
        };
        let relay = settings
            .relay_server
            .then(|| relay::Behaviour::new(local, relay_config()));
        Ok(Self {
            kad,
            identify: identify::Behaviour::new(
                identify::Config::new(
                    format!("/sherpa/{}", swarm_core::codec::WIRE_VERSION),
                    key.public(),
                )
                // Tell peers at once about new addresses, such as a relay
                // circuit.
                .with_push_listen_addr_updates(true),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
            mdns: Toggle::from(mdns),
            relay_client,
            relay: Toggle::from(relay),
            dcutr: dcutr::Behaviour::new(local),
            autonat: autonat::Behaviour::new(local, autonat_config()),
            streams,
        })
    }
}

/// AutoNAT as Sherpa's swarms need it.
fn autonat_config() -> autonat::Config {
    autonat::Config {
        // Labs and homes run trackers on private addresses. A dial-back
        // only ever goes to the asking peer's own observed address, so
        // probing private ones is safe, and without it a server behind a
        // lab's NAT would never learn it needs a relay.
        only_global_ips: false,
        // A server behind NAT becomes reachable through its relay within
        // seconds of joining rather than after libp2p's 15 s ...
        boot_delay: Duration::from_secs(3),
        // ... and a probe that found no server to ask is tried again
        // soon rather than after 90 s.
        retry_interval: Duration::from_secs(20),
        ..autonat::Config::default()
    }
}

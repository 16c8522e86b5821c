//! What a node is started with.

use std::time::Duration;

use libp2p::{multiaddr::Protocol, Multiaddr};
use swarm_core::NodeKey;

use crate::identity::SwarmKey;

/// Settings of a node.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The node's identity.
    pub key: NodeKey,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through (a tracker), each with its `/p2p/<id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// How long to wait for any network operation.
    pub request_timeout: Duration,
    /// How long records and provider entries live in the DHT.
    pub record_ttl: Duration,
    /// Find and pair with Sherpa nodes on the local network by mDNS. It
    /// multicasts on every interface the node can see, so turn it on only
    /// on a LAN you mean to share.
    pub mdns: bool,
    /// Join only the private swarm holding this key (TCP only; see
    /// [`SwarmKey`]).
    pub swarm_key: Option<SwarmKey>,
    /// Relay circuits for other nodes (trackers do).
    pub relay_server: bool,
    /// When to make this node reachable through its bootstrap peers' relays.
    pub relay: RelayMode,
}

/// When a node listens through a relay (circuit relay v2) on its bootstrap
/// peers, for peers that cannot dial it directly. Once two nodes talk
/// through a relay they try to upgrade to a direct connection (DCUtR hole
/// punching).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Never.
    Never,
    /// When AutoNAT finds the node is not reachable from outside.
    #[default]
    Auto,
    /// Always, whatever AutoNAT says.
    Always,
}

impl NodeConfig {
    /// Listens on a random loopback TCP port, no bootstrap peers, 10 s
    /// requests, 2-minute records.
    pub fn new(key: NodeKey) -> Self {
        Self {
            key,
            listen: vec![loopback()],
            bootstrap: Vec::new(),
            request_timeout: Duration::from_secs(10),
            record_ttl: Duration::from_secs(120),
            mdns: false,
            swarm_key: None,
            relay_server: false,
            relay: RelayMode::Auto,
        }
    }

    /// Joins only the private swarm of `key`.
    pub fn with_swarm_key(mut self, key: Option<SwarmKey>) -> Self {
        self.swarm_key = key;
        self
    }

    /// Relays circuits for other nodes.
    pub fn with_relay_server(mut self, on: bool) -> Self {
        self.relay_server = on;
        self
    }

    /// Sets when to listen through relays.
    pub fn with_relay(mut self, mode: RelayMode) -> Self {
        self.relay = mode;
        self
    }

    /// Turns LAN discovery by mDNS on or off.
    pub fn with_mdns(mut self, mdns: bool) -> Self {
        self.mdns = mdns;
        self
    }

    /// Sets the listen addresses.
    pub fn with_listen(mut self, listen: Vec<Multiaddr>) -> Self {
        self.listen = listen;
        self
    }

    /// Sets the bootstrap peers.
    pub fn with_bootstrap(mut self, bootstrap: Vec<Multiaddr>) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    /// Sets the DHT record lifetime.
    pub fn with_record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = ttl;
        self
    }

    /// Sets the request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// `/ip4/127.0.0.1/tcp/0`.
pub fn loopback() -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
        .with(Protocol::Tcp(0))
}

/// `/ip4/127.0.0.1/udp/0/quic-v1`.
pub fn loopback_quic() -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
        .with(Protocol::Udp(0))
        .with(Protocol::QuicV1)
}

/// The address a server's direct listener binds to for a node listening
/// on `listen`: the first TCP listen address's IP (so all interfaces stay
/// all interfaces), else any IP there; `None` when every address is
/// relayed.
pub fn direct_bind_ip(listen: &[Multiaddr]) -> Option<std::net::IpAddr> {
    use super::transport::{direct_ip_of, is_quic};
    listen
        .iter()
        .find(|a| !is_quic(a))
        .and_then(direct_ip_of)
        .or_else(|| listen.iter().find_map(direct_ip_of))
}

//! The tracker: the node servers and clients meet through.

use std::sync::Arc;
use std::time::Duration;

use swarm_core::NodeKey;
use swarm_dht::{Multiaddr, Node, NodeIdentity, RelayMode, SwarmKey};

use crate::SherpaError;

use super::{listening, SwarmSettings, DEFAULT_RECORD_TTL};

/// Builds a [`Tracker`].
#[derive(Debug, Default)]
pub struct TrackerBuilder {
    swarm: SwarmSettings,
    record_ttl: Option<Duration>,
}

impl TrackerBuilder {
    swarm_setters!();

    /// Longest lifetime of a record it stores [default: 120 s].
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = Some(ttl);
        self
    }

    /// Starts the tracker.
    pub async fn start(self) -> Result<Tracker, SherpaError> {
        let node = Node::start(
            self.swarm
                .config()
                .with_relay_server(true)
                .with_relay(RelayMode::Never)
                .with_record_ttl(self.record_ttl.unwrap_or(DEFAULT_RECORD_TTL)),
        )
        .await?;
        let addrs = listening(&node).await?;
        Ok(Tracker {
            node,
            addrs,
            _identity: self.swarm.identity,
        })
    }
}

/// A tracker: the bootstrap node servers and clients meet through, a
/// circuit relay and an AutoNAT server.
#[derive(Debug)]
pub struct Tracker {
    node: Node,
    addrs: Vec<Multiaddr>,
    _identity: Option<Arc<NodeIdentity>>,
}

impl Tracker {
    /// Settings for a new tracker.
    pub fn builder() -> TrackerBuilder {
        TrackerBuilder::default()
    }

    /// Its first listen address, with `/p2p/<peer id>`: what others join by.
    pub fn addr(&self) -> &Multiaddr {
        &self.addrs[0]
    }

    /// Every listen address.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// Its node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops it.
    pub async fn shutdown(self) {
        self.node.shutdown().await;
    }
}

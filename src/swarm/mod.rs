//! The embeddable swarm: [`Tracker`], [`Server`] and [`Client`] builders.
//!
//! ```no_run
//! use sherpa_swarm::{Client, GenerateOptions, Server, Tracker};
//! # async fn run() -> Result<(), sherpa_swarm::SherpaError> {
//! let tracker = Tracker::builder().start().await?;
//! let mut servers = Vec::new();
//! for blocks in ["0..15", "15..30"] {
//!     servers.push(
//!         Server::builder("smollm2-135m", blocks.parse()?)
//!             .tracker(tracker.addr().clone())
//!             .start()
//!             .await?,
//!     );
//! }
//! let client = Client::builder("smollm2-135m").tracker(tracker.addr().clone()).start().await?;
//! let out = client
//!     .generate_text("Why is the sky blue?", &GenerateOptions::default(), &mut |piece| {
//!         print!("{piece}");
//!         true
//!     })
//!     .await?;
//! eprintln!("route: {:?}", out.route);
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use swarm_core::NodeKey;
use swarm_dht::{Multiaddr, Node, NodeConfig, NodeIdentity, SwarmKey};

use crate::SherpaError;

/// How often a server re-signs its record by default, and how long each lives.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
/// How long a server's record lives by default.
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(120);

/// Where a node finds its swarm.
#[derive(Debug, Clone, Default)]
struct SwarmSettings {
    bootstrap: Vec<Multiaddr>,
    lan: bool,
    swarm_key: Option<SwarmKey>,
    listen: Vec<Multiaddr>,
    key: Option<NodeKey>,
    /// The claimed identity the key came from, held (locked) while the
    /// node runs.
    identity: Option<Arc<NodeIdentity>>,
}

impl SwarmSettings {
    fn config(&self) -> NodeConfig {
        NodeConfig::new(
            self.key
                .clone()
                .unwrap_or_else(swarm_dht::identity::ephemeral_node_key),
        )
        .with_listen(if self.listen.is_empty() {
            vec![swarm_dht::node::loopback()]
        } else {
            self.listen.clone()
        })
        .with_bootstrap(self.bootstrap.clone())
        .with_mdns(self.lan)
        .with_swarm_key(self.swarm_key)
    }

    fn check(&self) -> Result<(), SherpaError> {
        if self.bootstrap.is_empty() && !self.lan {
            return Err(SherpaError::Network(
                "say where the swarm is: a tracker address, or LAN discovery".into(),
            ));
        }
        Ok(())
    }
}

macro_rules! swarm_setters {
    () => {
        /// Joins the swarm through this tracker (or any node's) multiaddr,
        /// ending in `/p2p/<peer id>`.
        pub fn tracker(mut self, addr: Multiaddr) -> Self {
            self.swarm.bootstrap.push(addr);
            self
        }

        /// Finds peers on the local network by mDNS (multicasts on every
        /// interface this process sees).
        pub fn lan(mut self, on: bool) -> Self {
            self.swarm.lan = on;
            self
        }

        /// Joins a private swarm: only nodes holding `key` can connect.
        pub fn swarm_key(mut self, key: Option<SwarmKey>) -> Self {
            self.swarm.swarm_key = key;
            self
        }

        /// Listens on `addr` (repeatable) [default: TCP on a random
        /// loopback port].
        pub fn listen(mut self, addr: Multiaddr) -> Self {
            self.swarm.listen.push(addr);
            self
        }

        /// The node's identity [default: a fresh one].
        pub fn key(mut self, key: NodeKey) -> Self {
            self.swarm.key = Some(key);
            self
        }

        /// The node's identity from a claimed key file, kept claimed (so
        /// no other node takes it) for as long as the node runs.
        pub fn identity(mut self, identity: NodeIdentity) -> Self {
            self.swarm.key = Some(identity.key().clone());
            self.swarm.identity = Some(Arc::new(identity));
            self
        }
    };
}

/// Loads a model file on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SherpaError> + Send + 'static,
) -> Result<T, SherpaError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SherpaError::Network(format!("a loading task failed: {e}")))?
}

/// The addresses a tracker or server listens on; an error (and the node
/// stopped) when it has none, since nobody could reach it.
async fn listening(node: &Node) -> Result<Vec<Multiaddr>, SherpaError> {
    let addrs = node.listen_addrs().await?;
    if addrs.is_empty() {
        node.shutdown().await;
        return Err(SherpaError::Network(
            "the node listens on no address; give it one to listen on".into(),
        ));
    }
    Ok(addrs)
}

mod client;
mod local;
mod server;
mod tracker;

pub use client::{
    Client, ClientBuilder, ClientEvent, Generation, NodeChoice, Plan, DEFAULT_WAIT_FOR_HOSTS,
};
pub use local::LocalSwarm;
pub use server::{peer_of, Server, ServerBuilder, RUNTIME_MEMORY};
pub use tracker::{Tracker, TrackerBuilder};

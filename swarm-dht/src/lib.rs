//! Sherpa Swarm's network layer.
//!
//! Servers announce the blocks they host in a Kademlia DHT, LAN nodes find
//! each other over mDNS, and clients run inference sessions over
//! Noise-encrypted libp2p streams. Built so far: the node's persistent
//! identity, and a [`Node`] (TCP + Noise + yamux and QUIC; optionally a
//! private swarm under a [`SwarmKey`]; circuit relay v2, AutoNAT and DCUtR
//! for nodes behind NAT) that joins through bootstrap peers, announces
//! signed server records in Kademlia and lists a model's servers with their
//! records verified, measures bandwidth ([`probe`]), and serves and opens
//! inference sessions ([`session`], on the [`wire`] framing). A client
//! [`survey()`]s a model's servers and generates through an
//! [`InferenceSession`] that survives server failures ([`client`]).

pub mod admission;
pub mod announce;
pub mod backend;
pub mod catalog;
pub mod client;
pub mod direct;
mod error;
pub mod identity;
pub mod keys;
pub mod node;
pub mod probe;
pub mod session;
pub mod survey;
pub mod wire;

pub use announce::{announce_once, announce_periodically, now_ms, refresh_periodically, withdraw};
pub use backend::{BackendError, SpanBackend, SpanState};
pub use catalog::{served_models, ServedModel};
pub use client::{Failover, InferenceSession, RouteStep, ServerChoice, SessionOptions};
pub use error::DhtError;
pub use identity::{NodeIdentity, SwarmKey};
pub use libp2p::{multiaddr, Multiaddr, PeerId, Stream, StreamProtocol};
pub use node::{
    ExpectedBlocks, ListedServer, Mismatch, Node, NodeConfig, NodeStats, RelayMode, ServerListing,
};
pub use probe::Bandwidth;
pub use session::{InferenceService, Link, RemoteSession};
pub use survey::{
    survey, survey_hosted, unhosted, wait_for_hosts, HostWait, Reach, Survey, SurveyOptions,
};

/// Protocol id of Sherpa's Kademlia DHT.
pub const KAD_PROTOCOL: &str = "/sherpa/kad/1.0.0";
/// Protocol id of inference sessions.
pub const INFER_PROTOCOL: &str = "/sherpa/infer/3.0.0";

#[cfg(test)]
mod tests {
    /// Each protocol has one version: the one in its id is the one its
    /// messages carry.
    #[test]
    fn protocol_ids_carry_their_message_versions() {
        let (probe, catalog) = (
            super::probe::PROBE_PROTOCOL,
            super::catalog::CATALOG_PROTOCOL,
        );
        let versions = [
            (super::INFER_PROTOCOL, swarm_core::infer::INFER_VERSION),
            (probe.as_ref(), super::probe::PROBE_VERSION),
            (catalog.as_ref(), swarm_core::catalog::CATALOG_VERSION),
        ];
        for (id, version) in versions {
            assert!(
                id.ends_with(&format!("/{version}.0.0")),
                "{id} vs {version}"
            );
        }
    }
}

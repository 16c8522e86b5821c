//! Sherpa Swarm's network layer.
//!
//! Servers announce the blocks they host in a Kademlia DHT, LAN nodes find
//! each other over mDNS, and clients run inference sessions over
//! Noise-encrypted libp2p streams. This crate is being built: today it holds
//! the node's persistent identity and the protocol names the network speaks.

mod error;
pub mod identity;

pub use error::DhtError;
pub use identity::load_or_create_node_key;

/// Protocol id of Sherpa's Kademlia DHT.
pub const KAD_PROTOCOL: &str = "/sherpa/kad/1.0.0";
/// Protocol id of inference sessions.
pub const INFER_PROTOCOL: &str = "/sherpa/infer/1.0.0";

//! Sherpa Swarm's network layer.
//!
//! Servers announce the blocks they host in a Kademlia DHT, LAN nodes find
//! each other over mDNS, and clients run inference sessions over
//! Noise-encrypted libp2p streams. This crate is being built; it currently
//! names the protocols the network will speak so every crate agrees on them.

/// Protocol id of Sherpa's Kademlia DHT.
pub const KAD_PROTOCOL: &str = "/sherpa/kad/1.0.0";
/// Protocol id of inference sessions.
pub const INFER_PROTOCOL: &str = "/sherpa/infer/1.0.0";

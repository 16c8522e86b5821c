//! Sherpa Swarm: peer-to-peer LLM inference.
//!
//! People pool idle machines; a model too big for one of them is split into
//! spans of transformer blocks hosted by different peers, and a client
//! generates text by sending activations through a chain of those peers.
//!
//! This crate is the embeddable facade. Today it offers local generation on
//! the engine ([`shard`]) and the model cache ([`model_store`]); the network
//! layer grows in [`dht`].

pub mod bench;
mod error;
pub mod hardware;
pub mod model_store;

pub use error::SherpaError;
pub use swarm_core as core;
pub use swarm_dht as dht;
pub use swarm_score as score;
pub use swarm_shard as shard;

//! Sherpa Swarm: peer-to-peer LLM inference.
//!
//! People pool idle machines; a model too big for one of them is split into
//! spans of transformer blocks hosted by different peers, and a client
//! generates text by sending activations through a chain of those peers.
//!
//! This crate is the embeddable facade: [`Tracker`], [`Server`] and
//! [`Client`] builders run a swarm in a few lines (see [`swarm`]); local
//! generation is on the engine ([`shard`]), the model cache in
//! [`model_store`], and the layers underneath are re-exported ([`dht`],
//! [`score`], [`core`]).

pub mod backend;
pub mod bench;
mod error;
pub mod generate;
pub mod hardware;
pub mod model_store;
pub mod swarm;

pub use error::SherpaError;
pub use swarm::{Client, ClientEvent, Generation, LocalSwarm, Plan, Server, Tracker};
pub use swarm_core as core;
pub use swarm_dht as dht;
pub use swarm_score as score;
pub use swarm_shard as shard;

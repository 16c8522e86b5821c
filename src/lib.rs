//! Sherpa Swarm: peer-to-peer LLM inference.
//!
//! People pool idle machines; a model too big for one of them is split into
//! spans of transformer blocks hosted by different peers, and a client
//! generates text by sending activations through a chain of those peers.
//!
//! This crate is the embeddable facade. What an application needs is at
//! the top level: the [`Tracker`], [`Server`] and [`Client`] builders (a
//! swarm in a few lines, see [`swarm`]), the [`InferenceSession`] a client
//! generates through, [`GenerateOptions`], block ranges and model ids,
//! the node-selection types, and one error type, [`SherpaError`].
//!
//! The layers underneath stay reachable for advanced use, each under its
//! own module: [`core`] (the wire vocabulary: records, messages, tensor
//! frames), [`shard`] (the model engine: load and run a span of blocks),
//! [`score`] (Performance Score, selection, route planning) and [`dht`]
//! (the libp2p node, discovery, the inference protocol, failover).
//! [`backend`] wires the engine into the inference protocol, [`generate`]
//! is the client's generation loop, [`model_store`] the model cache.

pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "dashboard")]
pub mod dashboard;
pub mod device;
mod error;
pub mod generate;
pub mod hardware;
pub mod model_store;
pub mod nodes;
pub mod swarm;

pub use device::DeviceSpec;
pub use error::SherpaError;
pub use swarm::{
    Client, ClientBuilder, ClientEvent, Generation, LocalSwarm, NodeChoice, Plan, Server,
    ServerBuilder, Tracker, TrackerBuilder,
};
pub use swarm_core::{BlockRange, ModelId};
pub use swarm_dht::{
    Failover, HostWait, InferenceSession, Multiaddr, RouteStep, ServedModel, SessionOptions,
    SurveyOptions,
};
pub use swarm_score::{
    Candidate, Overrides, PerformanceScore, RankedCandidate, ScoreWeights, Selection,
    SelectionPolicy, Status,
};
pub use swarm_shard::{ChatMessage, GenerateOptions, GenerationOutput, SamplingConfig};

pub use swarm_core as core;
pub use swarm_dht as dht;
pub use swarm_score as score;
pub use swarm_shard as shard;

/// A TCP address on a free loopback port, for swarms inside one machine
/// (what the builders listen on when given nothing).
pub fn loopback() -> Multiaddr {
    swarm_dht::node::loopback()
}

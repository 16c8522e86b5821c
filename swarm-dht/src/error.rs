use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the network layer.
#[derive(Debug, Error)]
pub enum DhtError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The node key file exists but is not a key.
    #[error("node key file {path} is unusable ({reason}); restore it from a backup, or delete it to give this node a new identity")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The libp2p identity could not be derived from the node key.
    #[error("identity: {0}")]
    Identity(String),
    /// Listening, dialing or a DHT operation failed.
    #[error("network: {0}")]
    Transport(String),
    /// A network operation did not finish in time.
    #[error("timed out waiting for {0}; check that peers are reachable")]
    Timeout(&'static str),
    /// The node's event loop has stopped.
    #[error("the node has stopped")]
    Stopped,
    /// A server would not open a session or run a step.
    #[error("refused: {0}")]
    Refused(swarm_core::infer::Refusal),
    /// No chain of usable servers covers the blocks a session needs.
    #[error("{0}")]
    NoRoute(String),
    /// No listed server has this name or peer id.
    #[error("no listed server is called {0:?} (use a name or peer id from `sherpa nodes`)")]
    UnknownServer(String),
    /// The client's own part of the model failed.
    #[error(transparent)]
    Shard(#[from] swarm_shard::ShardError),
    /// Invalid shared values (records, messages).
    #[error(transparent)]
    Core(#[from] swarm_core::CoreError),
}

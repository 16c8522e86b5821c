use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the network layer.
#[derive(Debug, Error)]
#[non_exhaustive]
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
    /// A stream or connection broke, or ended before the answer: the peer
    /// went away, reset it, or was too busy to take it. Worth trying again.
    #[error("stream lost: {0}")]
    StreamLost(String),
    /// The peer answered something the protocol does not allow there.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server said its computation failed.
    #[error("the server failed: {0}")]
    ServerFailed(String),
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
    /// Blocks the client needs have no server in the swarm, after waiting
    /// for them.
    #[error("{}", no_hosts(.model, .missing, *.servers, .waited, .serving))]
    NoHosts {
        /// The model asked for.
        model: swarm_core::ModelId,
        /// Blocks without a host (empty when the model has no server at
        /// all).
        missing: Vec<swarm_core::BlockRange>,
        /// Servers of the model that were listed.
        servers: usize,
        /// How long the client waited for hosts.
        waited: std::time::Duration,
        /// What the swarm serves instead, when the model has no server.
        serving: Vec<crate::catalog::ServedModel>,
    },
    /// No listed server has this name or peer id.
    #[error("no listed server is called {0:?} (use a name or peer id from `sherpa nodes`)")]
    UnknownServer(String),
    /// Invalid shared values (records, messages).
    #[error(transparent)]
    Core(#[from] swarm_core::CoreError),
}

fn no_hosts(
    model: &swarm_core::ModelId,
    missing: &[swarm_core::BlockRange],
    servers: usize,
    waited: &std::time::Duration,
    serving: &[crate::catalog::ServedModel],
) -> String {
    let waited = waited.as_secs_f64();
    if servers == 0 {
        let others = if serving.is_empty() {
            "no model at all yet".to_owned()
        } else {
            crate::survey::list(serving)
        };
        format!("no route: the swarm has no server of {model} (waited {waited:.0} s); it serves {others}")
    } else {
        format!(
            "no route: no server hosts blocks {} of {model} ({servers} server{} listed; waited {waited:.0} s)",
            crate::survey::list(missing),
            if servers == 1 { "" } else { "s" }
        )
    }
}

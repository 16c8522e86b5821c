use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the `sherpa-swarm` facade.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SherpaError {
    /// The model engine failed.
    #[error(transparent)]
    Shard(#[from] swarm_shard::ShardError),
    /// Invalid shared values (ranges, ids).
    #[error(transparent)]
    Core(#[from] swarm_core::CoreError),
    /// The network layer failed.
    #[error("network: {0}")]
    Network(String),
    /// The swarm failed (discovery, sessions, routes).
    #[error(transparent)]
    Dht(#[from] swarm_dht::DhtError),
    /// A selection or route could not be made.
    #[error(transparent)]
    Score(#[from] swarm_score::ScoreError),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A compute device cannot be used.
    #[error("{0}")]
    Device(String),
    /// Fetching a model failed.
    #[error("model fetch failed: {0}")]
    Fetch(String),
    /// A downloaded file does not have the expected checksum.
    #[error("checksum mismatch for {what}: expected sha256 {expected}, got {actual}; the download is corrupt or not the expected release, delete it and fetch again")]
    Checksum {
        /// What was checked.
        what: String,
        /// Expected sha256.
        expected: String,
        /// Actual sha256.
        actual: String,
    },
    /// The settings cannot work (a span too big for the memory limit, ...).
    #[error("{0}")]
    Config(String),
    /// A benchmark's outside tool (llama-bench, network namespaces) failed.
    #[error("bench: {0}")]
    Bench(String),
    /// A model argument is neither a known name nor an existing path.
    #[error(
        "{arg:?} is neither a known model ({known}) nor an existing .gguf file or HF directory"
    )]
    UnknownModel {
        /// What was given.
        arg: String,
        /// The known names.
        known: String,
    },
}

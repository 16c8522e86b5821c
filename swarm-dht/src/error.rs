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
    /// Invalid shared values (records, messages).
    #[error(transparent)]
    Core(#[from] swarm_core::CoreError),
}

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the model engine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ShardError {
    /// A model file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a model we can load (wrong format, truncated, corrupt).
    #[error("{path} is not a usable model file: {reason}")]
    BadModelFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The model's architecture is not one this engine computes.
    #[error("unsupported model architecture {architecture:?} in {path}: Sherpa Swarm runs the llama, mistral, qwen2, qwen3, phi3, gemma2 and mixtral families; pick a model of one of them")]
    UnsupportedArchitecture {
        /// The file that declared it.
        path: PathBuf,
        /// The architecture it declared.
        architecture: String,
    },
    /// A required metadata/config field is absent or has the wrong type.
    #[error("model config field {field:?} is missing or invalid in {path}: {reason}")]
    BadConfig {
        /// The model file or config.json.
        path: PathBuf,
        /// The field name.
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// A tensor the requested span needs is not in the model files.
    #[error("tensor {name:?} is missing from {path}: the file is incomplete or not a Llama model")]
    MissingTensor {
        /// Where it was looked for.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor has a shape that does not match the model config.
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}: the weights do not match the config")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        actual: Vec<usize>,
    },
    /// The requested block range does not fit the model.
    #[error(transparent)]
    Range(#[from] swarm_core::CoreError),
    /// A session's KV cache would exceed the memory budget.
    #[error("KV cache budget exhausted: this needs {requested} bytes but only {available} of {budget} are free; close other sessions, ask for fewer tokens, or raise the cache budget")]
    CacheBudgetExceeded {
        /// Bytes the reservation asked for.
        requested: u64,
        /// Bytes still free in the budget.
        available: u64,
        /// The whole budget.
        budget: u64,
    },
    /// A session tried to go past the length it reserved.
    #[error("session is full: it holds {used} of {capacity} tokens and {adding} more were sent; open the session with a larger max length")]
    SessionFull {
        /// Tokens already cached.
        used: usize,
        /// Tokens reserved at open.
        capacity: usize,
        /// Tokens in the rejected step.
        adding: usize,
    },
    /// Hidden states handed to a shard have the wrong shape.
    #[error("hidden states have shape {actual:?}, expected (1, positions, {hidden})")]
    BadHiddenStates {
        /// The model's hidden size.
        hidden: usize,
        /// The shape that arrived.
        actual: Vec<usize>,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadTokenId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Invalid sampling or generation parameters.
    #[error("invalid generation settings: {0}")]
    BadSettings(String),
    /// This CPU lacks instructions the build was compiled for.
    #[error("{0}")]
    UnsupportedCpu(String),
    /// A tensor operation failed inside candle.
    #[error("tensor computation failed: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// Result alias for the engine.
pub type Result<T, E = ShardError> = std::result::Result<T, E>;

/// candle's error text without the backtrace it attaches when
/// `RUST_BACKTRACE` is set: users need the message, not candle's stack.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

use thiserror::Error;

/// Everything that can go wrong in `swarm-core`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreError {
    /// A block range could not be parsed from text.
    #[error("invalid block range {text:?}: {reason} (expected START..END, e.g. 0..10)")]
    InvalidBlockRange {
        /// The text that was given.
        text: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A block range does not fit inside a model.
    #[error(
        "block range {range} is outside the model's {block_count} blocks (valid: 0..{block_count})"
    )]
    RangeOutsideModel {
        /// The requested range.
        range: BlockRangeText,
        /// How many blocks the model has.
        block_count: u32,
    },
    /// A model id was empty or contained characters that are not allowed.
    #[error("invalid model id {0:?}: use letters, digits and -_.:/ (at most 128 characters)")]
    InvalidModelId(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// A message is larger than its type allows.
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    MessageTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Bytes that do not decode to the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message or record from a version this node does not speak.
    #[error("unsupported {what} version {got} (this node speaks {supported}); upgrade one side")]
    UnsupportedVersion {
        /// What carried the version.
        what: &'static str,
        /// The version received.
        got: u16,
        /// The version supported here.
        supported: u16,
    },
    /// A record's signature does not match its contents and key.
    #[error("record signature does not verify: forged or corrupted")]
    BadSignature,
    /// A record was signed by a key other than its publisher's.
    #[error("record was signed by another peer than the one that published it")]
    WrongPublisher,
    /// A record is past its expiry.
    #[error("record expired at {expired_at_ms} ms (now {now_ms} ms)")]
    ExpiredRecord {
        /// Its expiry.
        expired_at_ms: u64,
        /// The time it was checked.
        now_ms: u64,
    },
    /// A record with fields out of range.
    #[error("invalid record: {0}")]
    BadRecord(String),
    /// A tensor frame that cannot be right.
    #[error("invalid tensor frame: {0}")]
    BadTensorFrame(String),
    /// A session step the caller got wrong (not whole positions, past
    /// the session's length, one step over another).
    #[error("invalid session step: {0}")]
    Session(String),
    /// The server refused to open a session or run a step.
    #[error("refused: {0}")]
    Refused(crate::infer::Refusal),
    /// The server said its computation failed; the session is over.
    #[error("the server failed: {0}")]
    ServerFailed(String),
    /// The server's stream ended before its answer.
    #[error("the server closed the session")]
    SessionClosed,
    /// The server answered something the protocol does not allow there.
    #[error("protocol violation: {0}")]
    SessionProtocol(String),
}

/// A block range rendered as text, kept in errors so they stay `Clone + Eq`.
pub type BlockRangeText = String;

use thiserror::Error;

/// Everything that can go wrong in `swarm-core`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
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
}

/// A block range rendered as text, kept in errors so they stay `Clone + Eq`.
pub type BlockRangeText = String;

use swarm_core::BlockRange;
use thiserror::Error;

/// Everything that can go wrong in a decision.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ScoreError {
    /// Score weights must be finite, non-negative, and not all zero.
    #[error("score weights must be finite, non-negative and not all zero: {0}")]
    BadWeights(String),
    /// A model has at least one block.
    #[error("a model has at least one block")]
    NoBlocks,
    /// No chain of usable servers covers the span.
    #[error("no route: no usable server hosts blocks {}", list(.uncovered))]
    NoRoute {
        /// The blocks nobody usable hosts.
        uncovered: Vec<BlockRange>,
    },
}

fn list(ranges: &[BlockRange]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

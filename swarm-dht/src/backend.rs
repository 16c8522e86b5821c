//! What a server computes, as the network layer sees it: a span of a
//! model's blocks that turns hidden states into hidden states, one session
//! (one KV cache) at a time. The inference protocol ([`crate::session`])
//! runs on any [`SpanBackend`]: the facade wires in the real blocks from
//! `swarm-shard`; benches use an echo, tests use hostile ones, and an
//! embedder can bring its own. So this crate never links a tensor library.

use swarm_core::BlockRange;

/// Why a backend would not open a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// Not enough cache memory is free for the session's length.
    #[error("not enough cache memory: {needed} positions asked, {free} free")]
    Busy {
        /// Positions the session asked for.
        needed: u32,
        /// Positions free now.
        free: u64,
    },
    /// The computation failed (the message says how).
    #[error("{0}")]
    Failed(String),
}

/// A span of a model's blocks that a server computes.
pub trait SpanBackend: Send + Sync + std::fmt::Debug + 'static {
    /// The blocks it hosts; sessions may use any contiguous part of them.
    fn blocks(&self) -> BlockRange;

    /// Values per position of the hidden states it takes and gives.
    fn hidden_size(&self) -> usize;

    /// Most positions a session may hold (the model's context).
    fn context_length(&self) -> usize;

    /// Positions a new session over `blocks` could still reserve.
    fn free_positions(&self, blocks: BlockRange) -> u64;

    /// Opens a session's state over `blocks` (within [`Self::blocks`]) with
    /// room for `max_length` positions, reserving its memory.
    fn open(
        &self,
        blocks: BlockRange,
        max_length: usize,
    ) -> Result<Box<dyn SpanState>, BackendError>;

    /// Most positions, of all sessions together, that
    /// [`SpanBackend::forward_batch`] runs in one pass with each session's
    /// output what it would get alone; 1 (the default) when it does not
    /// batch.
    fn batch_rows(&self) -> usize {
        1
    }

    /// Runs several sessions' steps (`(state, values, positions)`, each as
    /// [`SpanState::forward`] takes them) together, one result per step in
    /// order. The default runs them one after another; a backend that can
    /// run them in one pass (reading its weights once for all) does so for
    /// up to [`SpanBackend::batch_rows`] positions.
    fn forward_batch(
        &self,
        steps: &mut [(&mut dyn SpanState, Vec<f32>, usize)],
    ) -> Vec<Result<Vec<f32>, BackendError>> {
        steps
            .iter_mut()
            .map(|(state, values, positions)| state.forward(std::mem::take(values), *positions))
            .collect()
    }
}

/// One session's state on a backend: its KV cache. Dropping it frees the
/// memory it reserved.
pub trait SpanState: Send + 'static {
    /// Positions computed so far.
    fn len(&self) -> usize;

    /// Whether no position has been computed yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position from `keep` on.
    fn truncate(&mut self, keep: usize);

    /// Runs the session's blocks on `positions` new positions (`values`,
    /// `positions` x hidden, row-major), appending them to the cache, and
    /// returns the output hidden states, same shape. May take long: the
    /// service calls it off the network's threads when it expects that.
    fn forward(&mut self, values: Vec<f32>, positions: usize) -> Result<Vec<f32>, BackendError>;

    /// The state as `Any`, for a backend's [`SpanBackend::forward_batch`]
    /// to find its own sessions' states; `None` (the default) keeps this
    /// state out of batches.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

//! Shared vocabulary of Sherpa Swarm.
//!
//! This crate does no I/O and reads no clock: it names the things every other
//! crate talks about (models, spans of blocks) so that the engine, the network
//! and the scorer agree on them.

mod block_range;
mod error;
mod model_id;

pub use block_range::BlockRange;
pub use error::CoreError;
pub use model_id::ModelId;

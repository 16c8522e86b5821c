//! The model engine of Sherpa Swarm, on candle.
//!
//! A server loads only the span of transformer blocks it hosts
//! ([`BlockShard`]); a client loads only the embeddings, final norm and LM
//! head ([`ClientHead`]) plus the tokenizer ([`TextTokenizer`]). Each session
//! keeps its keys and values in a [`SessionCache`] that is charged against a
//! server-wide [`CacheBudget`].
//!
//! ```no_run
//! use swarm_shard::{GenerateOptions, LocalModel, ModelFiles, TextTokenizer, ChatMessage, WeightPrecision};
//! # fn main() -> Result<(), swarm_shard::ShardError> {
//! let files = ModelFiles::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let tokenizer = TextTokenizer::from_model(&files)?;
//! let model = LocalModel::load(&files, &[], &candle_core::Device::Cpu, WeightPrecision::Native)?;
//! let prompt = tokenizer.encode_chat(&[ChatMessage::user("What is the capital of France?")])?;
//! let out = model.generate(&prompt, &GenerateOptions::default(), &mut |_| Ok(true))?;
//! println!("{}", tokenizer.decode(&out.tokens)?);
//! # Ok(()) }
//! ```

mod attention;
mod block;
mod config;
pub mod cpu;
mod digest;
mod error;
mod generate;
mod head;
mod kv_cache;
mod linear;
mod pool;
mod rope;
mod sampler;
mod shard;
pub mod split;
pub mod synth;
#[cfg(any(test, feature = "test-util"))]
pub mod tiny;
mod tokenizer;
mod weights;

pub use block::Block;
pub use config::{Activation, Experts, Family, ModelConfig, RopeLayout};
pub use digest::{BlockDigest, Manifest};
pub use error::{Result, ShardError};
pub use generate::{
    generate, Advance, BlockPipeline, GenerateOptions, GenerationOutput, Generator, LocalModel,
    LocalPipeline, MAX_DRAFTS,
};
pub use head::ClientHead;
pub use kv_cache::{CacheBudget, CacheReservation, SessionCache};
pub use linear::Linear;
pub use rope::RotaryEmbedding;
pub use sampler::{argmax, Sampler, SamplingConfig};
pub use shard::BlockShard;
pub use tokenizer::{ChatMessage, StreamDecoder, TextTokenizer};
pub use weights::{
    BlockWeight, ExpertWeights, LoadedWeight, ModelFiles, WeightName, WeightPrecision, WeightReader,
};

/// Re-exported so users name devices and tensors without a direct candle dependency.
pub use candle_core::{DType, Device, Tensor};

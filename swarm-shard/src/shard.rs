//! A span of consecutive blocks loaded together: what a server hosts.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use swarm_core::BlockRange;

use crate::block::{Block, Part, StepContext};
use crate::config::ModelConfig;
use crate::error::{Result, ShardError};
use crate::kv_cache::{causal_mask, CacheBudget, SessionCache};
use crate::rope::RotaryEmbedding;
use crate::weights::{ModelFiles, WeightPrecision};

/// Blocks `range` of a model, ready to compute. Immutable and shareable:
/// every session brings its own [`SessionCache`].
#[derive(Debug, Clone)]
pub struct BlockShard {
    config: Arc<ModelConfig>,
    range: BlockRange,
    blocks: Vec<Block>,
    rope: RotaryEmbedding,
    device: Device,
}

impl BlockShard {
    /// Loads only the tensors of blocks `range` from `files`.
    pub fn load(
        files: &ModelFiles,
        range: BlockRange,
        device: &Device,
        precision: WeightPrecision,
    ) -> Result<Self> {
        let config = files.config().clone();
        range.check_within(config.num_hidden_layers as u32)?;
        files.check_holds(range)?;
        let mut reader = files.reader(device, precision)?;
        let blocks = range
            .iter()
            .map(|i| Block::load(&config, &mut reader, i as usize))
            .collect::<Result<Vec<_>>>()?;
        tracing::debug!(%range, path = %files.path().display(), "loaded block span");
        Ok(Self {
            rope: RotaryEmbedding::new(&config, device)?,
            config: Arc::new(config),
            range,
            blocks,
            device: device.clone(),
        })
    }

    /// The span of blocks this shard computes.
    pub fn range(&self) -> BlockRange {
        self.range
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        self.blocks.iter().map(Block::weight_bytes).sum()
    }

    /// Opens a session cache for `span` (all or part of this shard's
    /// blocks), reserving room for `max_tokens` positions from `budget`.
    pub fn new_session_for(
        &self,
        span: BlockRange,
        max_tokens: usize,
        budget: &Arc<CacheBudget>,
    ) -> Result<SessionCache> {
        if span.start() < self.range.start() || span.end() > self.range.end() {
            return Err(ShardError::BadSettings(format!(
                "blocks {span} are not all in this shard's {}",
                self.range
            )));
        }
        SessionCache::new(&self.config, span, max_tokens, budget)
    }

    /// Opens a session cache for this span, reserving room for `max_tokens`
    /// positions from `budget`.
    pub fn new_session(
        &self,
        max_tokens: usize,
        budget: &Arc<CacheBudget>,
    ) -> Result<SessionCache> {
        SessionCache::new(&self.config, self.range, max_tokens, budget)
    }

    /// Runs the session's blocks (the cache's span, all or part of this
    /// shard's) on the hidden states of its next positions.
    ///
    /// `hidden` is (1, new_positions, hidden_size); the result has the same
    /// shape. Positions continue from what `cache` already holds.
    pub fn forward(&self, hidden: &Tensor, cache: &mut SessionCache) -> Result<Tensor> {
        let mut out = self.forward_batch(&mut [(hidden, cache)])?;
        out.pop()
            .ok_or_else(|| ShardError::BadSettings("a step gave no output".into()))
    }

    /// Most positions (of all sessions together) that
    /// [`BlockShard::forward_batch`] runs such that each session's output
    /// is bit for bit what it gets alone; 1 when batching promises nothing
    /// (then run sessions one by one).
    pub fn batch_rows(&self) -> usize {
        self.blocks.iter().map(Block::exact_rows).min().unwrap_or(1)
    }

    /// Runs several sessions' next positions in one pass: each is a
    /// [`BlockShard::forward`] (hidden states (1, positions, hidden_size)
    /// and the session's cache), and every cache must cover the same
    /// blocks. All the positions go through each matrix product together,
    /// so the weights are read once per pass instead of once per session;
    /// attention runs per session. Each output is what `forward` gives
    /// for that session alone. On error no cache has advanced, though
    /// some may hold the failed step's keys past their length.
    pub fn forward_batch(&self, steps: &mut [(&Tensor, &mut SessionCache)]) -> Result<Vec<Tensor>> {
        let Some(span) = steps.first().map(|(_, cache)| cache.range()) else {
            return Ok(Vec::new());
        };
        if span.start() < self.range.start() || span.end() > self.range.end() {
            return Err(ShardError::BadSettings(format!(
                "session cache is for blocks {span} but this shard computes {}",
                self.range
            )));
        }
        let mut seqs = Vec::with_capacity(steps.len());
        for (hidden, cache) in steps.iter() {
            let dims = hidden.dims();
            let well_formed = dims.len() == 3
                && dims[0] == 1
                && dims[1] > 0
                && dims[2] == self.config.hidden_size;
            if !well_formed {
                return Err(ShardError::BadHiddenStates {
                    hidden: self.config.hidden_size,
                    actual: dims.to_vec(),
                });
            }
            if cache.range() != span {
                return Err(ShardError::BadSettings(format!(
                    "sessions of blocks {span} and {} cannot run in one pass",
                    cache.range()
                )));
            }
            cache.check_room(dims[1])?;
            seqs.push(dims[1]);
        }
        let first = (span.start() - self.range.start()) as usize;
        let blocks = || self.blocks.iter().skip(first).take(span.len() as usize);
        let windowed = blocks().any(Block::windowed);
        // Rows are (query-head group, position); every group gets the same mask.
        let group = self.config.gqa_group();
        let mut masks = Vec::with_capacity(steps.len());
        for ((_, cache), &seq) in steps.iter().zip(&seqs) {
            let start = cache.len();
            let mask = if seq > 1 {
                Some(causal_mask(seq, start, None, &self.device)?.repeat((group, 1))?)
            } else {
                None
            };
            let window_mask = match self.config.sliding_window {
                Some(window) if seq > 1 && windowed => {
                    Some(causal_mask(seq, start, Some(window), &self.device)?.repeat((group, 1))?)
                }
                _ => None,
            };
            masks.push((start, cache.max_tokens(), mask, window_mask));
        }
        let contexts: Vec<StepContext<'_>> = masks
            .iter()
            .map(|(start, max_tokens, mask, window_mask)| StepContext {
                rope: &self.rope,
                start: *start,
                mask: mask.as_ref(),
                window_mask: window_mask.as_ref(),
                max_tokens: *max_tokens,
            })
            .collect();
        let inputs: Vec<Tensor> = steps
            .iter()
            .map(|(hidden, _)| hidden.to_dtype(candle_core::DType::F32))
            .collect::<std::result::Result<_, _>>()?;
        let mut xs = match inputs.as_slice() {
            [one] => one.clone(),
            many => Tensor::cat(many, 1)?,
        };
        for (offset, block) in blocks().enumerate() {
            let mut parts = Vec::with_capacity(steps.len());
            for (((_, cache), ctx), &seq) in steps.iter_mut().zip(&contexts).zip(&seqs) {
                let kv = cache.layer(offset).ok_or_else(|| {
                    ShardError::BadSettings("session cache has fewer layers than the shard".into())
                })?;
                parts.push(Part { seq, kv, ctx });
            }
            xs = block.forward(&xs, &mut parts)?;
        }
        let mut outputs = Vec::with_capacity(steps.len());
        let mut at = 0;
        for ((_, cache), &seq) in steps.iter_mut().zip(&seqs) {
            cache.advance(seq);
            outputs.push(if seqs.len() == 1 {
                xs.clone()
            } else {
                xs.narrow(1, at, seq)?.contiguous()?
            });
            at += seq;
        }
        Ok(outputs)
    }
}

impl BlockShard {
    /// Measures compute throughput in blocks x tokens per second: `steps`
    /// single-token decode steps after a 16-token prefill, in a throwaway
    /// session. Servers announce this figure.
    pub fn measure_throughput(&self, steps: usize) -> Result<f32> {
        let budget = CacheBudget::unlimited();
        let mut cache = self.new_session(16 + steps.max(1), &budget)?;
        let hidden = self.config.hidden_size;
        let prefill = Tensor::zeros((1, 16, hidden), candle_core::DType::F32, &self.device)?;
        self.forward(&(prefill + 0.01)?, &mut cache)?;
        let one = (Tensor::ones((1, 1, hidden), candle_core::DType::F32, &self.device)? * 0.01)?;
        let started = std::time::Instant::now();
        for _ in 0..steps.max(1) {
            self.forward(&one, &mut cache)?;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        Ok((self.range.len() as f64 * steps.max(1) as f64 / secs) as f32)
    }
}

//! The generation loop: embed, run the blocks, pick a token, repeat.
//!
//! The loop does not care where blocks run: anything implementing
//! [`BlockPipeline`] (local shards here; remote servers in `swarm-dht`) can
//! carry the hidden states from the embeddings to the LM head.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use swarm_core::BlockRange;

use crate::error::{Result, ShardError};
use crate::head::ClientHead;
use crate::kv_cache::{CacheBudget, SessionCache};
use crate::sampler::{Sampler, SamplingConfig};
use crate::shard::BlockShard;
use crate::weights::{ModelFiles, WeightPrecision};

/// Carries hidden states through every block of the model for one session.
pub trait BlockPipeline {
    /// Runs all blocks on the next positions, (1, seq, hidden) in and out.
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor>;
}

/// Local shards run one after another in this process.
#[derive(Debug)]
pub struct LocalPipeline {
    stages: Vec<(Arc<BlockShard>, SessionCache)>,
}

impl LocalPipeline {
    /// A session over `shards`, which must cover the model's blocks in order.
    pub fn new(
        shards: &[Arc<BlockShard>],
        max_tokens: usize,
        budget: &Arc<CacheBudget>,
    ) -> Result<Self> {
        let mut next = 0;
        let mut stages = Vec::with_capacity(shards.len());
        for shard in shards {
            if shard.range().start() != next {
                return Err(ShardError::BadSettings(format!(
                    "shards must cover the blocks in order: expected a span starting at {next}, got {}",
                    shard.range()
                )));
            }
            next = shard.range().end();
            stages.push((Arc::clone(shard), shard.new_session(max_tokens, budget)?));
        }
        match shards.first() {
            Some(first) if next as usize == first.config().num_hidden_layers => Ok(Self { stages }),
            Some(first) => Err(ShardError::BadSettings(format!(
                "shards end at block {next} but the model has {}",
                first.config().num_hidden_layers
            ))),
            None => Err(ShardError::BadSettings("no shards given".into())),
        }
    }
}

impl BlockPipeline for LocalPipeline {
    fn forward(&mut self, hidden: &Tensor) -> Result<Tensor> {
        let mut xs = hidden.clone();
        for (shard, cache) in &mut self.stages {
            xs = shard.forward(&xs, cache)?;
        }
        Ok(xs)
    }
}

/// Settings of one generation.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// How tokens are chosen.
    pub sampling: SamplingConfig,
    /// Stop at the model's end-of-sequence tokens.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    /// 64 greedy tokens, stopping at end-of-sequence.
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingConfig::greedy(),
            stop_at_eos: true,
        }
    }
}

/// What a generation produced, with timings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// Generated token ids (the prompt not included).
    pub tokens: Vec<u32>,
    /// Logits of the first generated position (after the prompt).
    pub first_logits: Vec<f32>,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Time to run the prompt and pick the first token.
    pub prefill: Duration,
    /// Time for the remaining tokens.
    pub decode: Duration,
    /// Whether generation ended on an end-of-sequence token.
    pub hit_eos: bool,
}

impl GenerationOutput {
    /// Prompt tokens processed per second.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first one.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let steps = self.tokens.len().saturating_sub(1);
        steps as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// The generation loop as a state machine, for callers that move hidden
/// states themselves (a remote pipeline awaits its hops between the steps):
/// [`Generator::pending`] gives the embeddings of the positions to run next,
/// [`Generator::advance`] takes the blocks' output for them and picks the next
/// token, until [`Generator::pending`] gives `None`.
#[derive(Debug)]
pub struct Generator<'h> {
    head: &'h ClientHead,
    sampler: Sampler,
    max_new_tokens: usize,
    stop_at_eos: bool,
    history: Vec<u32>,
    tokens: Vec<u32>,
    input: Vec<u32>,
    first_logits: Vec<f32>,
    prompt_tokens: usize,
    started: Instant,
    prefill: Duration,
    hit_eos: bool,
    done: bool,
}

impl<'h> Generator<'h> {
    /// Starts a generation from `prompt` ids.
    pub fn new(head: &'h ClientHead, prompt: &[u32], options: &GenerateOptions) -> Result<Self> {
        if prompt.is_empty() {
            return Err(ShardError::BadSettings("the prompt has no tokens".into()));
        }
        Ok(Self {
            head,
            sampler: Sampler::new(options.sampling.clone())?,
            max_new_tokens: options.max_new_tokens,
            stop_at_eos: options.stop_at_eos,
            history: prompt.to_vec(),
            tokens: Vec::with_capacity(options.max_new_tokens),
            input: prompt.to_vec(),
            first_logits: Vec::new(),
            prompt_tokens: prompt.len(),
            started: Instant::now(),
            prefill: Duration::ZERO,
            hit_eos: false,
            done: options.max_new_tokens == 0,
        })
    }

    /// Embeddings (1, positions, hidden) of the positions to run next: the
    /// whole prompt first, then the last chosen token; `None` when done.
    pub fn pending(&self) -> Result<Option<Tensor>> {
        if self.done {
            return Ok(None);
        }
        self.head.embed(&self.input).map(Some)
    }

    /// Takes the blocks' output for the pending positions and returns the
    /// token chosen next.
    pub fn advance(&mut self, hidden: &Tensor) -> Result<u32> {
        if self.done {
            return Err(ShardError::BadSettings(
                "the generation has ended; nothing is pending".into(),
            ));
        }
        let logits = self.head.logits(hidden)?;
        let next = self.sampler.sample(&logits, &self.history)?;
        if self.tokens.is_empty() {
            self.first_logits = logits;
            self.prefill = self.started.elapsed();
        }
        self.tokens.push(next);
        self.history.push(next);
        self.input = vec![next];
        if self.stop_at_eos && self.head.config().eos_token_ids.contains(&next) {
            self.hit_eos = true;
            self.done = true;
        }
        if self.tokens.len() >= self.max_new_tokens {
            self.done = true;
        }
        Ok(next)
    }

    /// Ends the generation early.
    pub fn stop(&mut self) {
        self.done = true;
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// What was generated, with timings.
    pub fn finish(self) -> GenerationOutput {
        GenerationOutput {
            decode: self.started.elapsed().saturating_sub(self.prefill),
            tokens: self.tokens,
            first_logits: self.first_logits,
            prompt_tokens: self.prompt_tokens,
            prefill: self.prefill,
            hit_eos: self.hit_eos,
        }
    }
}

/// Generates from `prompt` ids. `on_token` sees each new id as it is chosen
/// and may return `false` to stop.
pub fn generate(
    head: &ClientHead,
    pipeline: &mut dyn BlockPipeline,
    prompt: &[u32],
    options: &GenerateOptions,
    on_token: &mut dyn FnMut(u32) -> Result<bool>,
) -> Result<GenerationOutput> {
    let mut generator = Generator::new(head, prompt, options)?;
    while let Some(hidden) = generator.pending()? {
        let next = {
            // The whole step (every block and the head) is one computation:
            // the kernels' workers spin through it.
            let _busy = crate::pool::busy();
            let hidden = pipeline.forward(&hidden)?;
            generator.advance(&hidden)?
        };
        if !on_token(next)? {
            generator.stop();
        }
    }
    Ok(generator.finish())
}

/// A whole model in this process: the client head plus shards covering
/// every block. The simplest way to generate locally.
#[derive(Debug, Clone)]
pub struct LocalModel {
    head: Arc<ClientHead>,
    shards: Vec<Arc<BlockShard>>,
}

impl LocalModel {
    /// Loads the head and the blocks of `files`, split into `spans` (or one
    /// span of everything when empty).
    pub fn load(
        files: &ModelFiles,
        spans: &[BlockRange],
        device: &Device,
        precision: WeightPrecision,
    ) -> Result<Self> {
        let head = Arc::new(ClientHead::load(files, device, precision)?);
        let all = [BlockRange::full(files.config().num_hidden_layers as u32)?];
        let spans = if spans.is_empty() { &all[..] } else { spans };
        let shards = spans
            .iter()
            .map(|range| BlockShard::load(files, *range, device, precision).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { head, shards })
    }

    /// The client head.
    pub fn head(&self) -> &ClientHead {
        &self.head
    }

    /// The loaded shards, in block order.
    pub fn shards(&self) -> &[Arc<BlockShard>] {
        &self.shards
    }

    /// A fresh session over all shards with room for `max_tokens` positions.
    pub fn session(&self, max_tokens: usize) -> Result<LocalPipeline> {
        LocalPipeline::new(&self.shards, max_tokens, &CacheBudget::unlimited())
    }

    /// Generates from prompt ids in a fresh session.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<GenerationOutput> {
        let max_tokens =
            (prompt.len() + options.max_new_tokens).min(self.head.config().max_position_embeddings);
        let mut pipeline = self.session(max_tokens)?;
        generate(&self.head, &mut pipeline, prompt, options, on_token)
    }
}

swarm_core::with_setters!(GenerateOptions {
    max_new_tokens: usize => with_max_new_tokens,
    sampling: SamplingConfig => with_sampling,
    stop_at_eos: bool => with_stop_at_eos,
});

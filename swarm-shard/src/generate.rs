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

    /// Forgets every position from `keep` on, so the next positions run
    /// from `keep` (the drafts of a speculative step that its check
    /// rejected).
    fn truncate(&mut self, keep: usize) -> Result<()>;
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

    fn truncate(&mut self, keep: usize) -> Result<()> {
        for (_, cache) in &mut self.stages {
            cache.truncate(keep);
        }
        Ok(())
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
    /// Speculative decoding: up to this many tokens drafted per step (0:
    /// off). Drafts come from the text so far (the continuation of the
    /// last place its latest words appeared, as when a reply quotes its
    /// prompt); one step runs them all, and the longest run the model
    /// agrees with is kept, so the output is what decoding one token at a
    /// time gives. Only for deterministic choice (temperature 0); with
    /// random sampling no drafts are made.
    pub draft_tokens: usize,
}

impl Default for GenerateOptions {
    /// 64 greedy tokens, stopping at end-of-sequence, no drafts.
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: SamplingConfig::greedy(),
            stop_at_eos: true,
            draft_tokens: 0,
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
    /// Steps run after the prompt's (each chose one token, plus the
    /// drafts it accepted).
    pub decode_steps: usize,
    /// Drafted tokens sent, and those the model agreed with.
    pub drafts_sent: usize,
    /// See `drafts_sent`.
    pub drafts_accepted: usize,
}

impl GenerationOutput {
    /// Tokens chosen per decode step (1 without speculative decoding).
    pub fn tokens_per_step(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_steps.max(1) as f64
    }

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
    /// Most drafts per step (0 when off or sampling is random).
    draft_tokens: usize,
    /// Drafts riding on the pending step, after `input`.
    drafts: Vec<u32>,
    /// Positions the blocks' caches hold before the pending step.
    cached: usize,
    /// Positions the caller may hold at most (prompt + new tokens, within
    /// the model's context).
    capacity: usize,
    decode_steps: usize,
    drafts_sent: usize,
    drafts_accepted: usize,
}

/// Most drafts per step: a step of up to 8 positions goes through the
/// fused kernels, which give each position exactly what it gets alone, so
/// speculative output is bit for bit one-at-a-time output.
pub const MAX_DRAFTS: usize = 7;

/// What a step chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// The tokens chosen: one, plus the drafts the model agreed with.
    pub tokens: Vec<u32>,
    /// Positions the blocks' caches must keep ([`BlockPipeline::truncate`]);
    /// more were run when drafts were rejected.
    pub keep: usize,
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
            draft_tokens: if options.sampling.temperature == 0.0 {
                options.draft_tokens.min(MAX_DRAFTS)
            } else {
                0
            },
            drafts: Vec::new(),
            cached: 0,
            capacity: (prompt.len() + options.max_new_tokens)
                .min(head.config().max_position_embeddings),
            decode_steps: 0,
            drafts_sent: 0,
            drafts_accepted: 0,
        })
    }

    /// Embeddings (1, positions, hidden) of the positions to run next: the
    /// whole prompt first, then the last chosen token and any drafts;
    /// `None` when done.
    pub fn pending(&self) -> Result<Option<Tensor>> {
        if self.done {
            return Ok(None);
        }
        if self.drafts.is_empty() {
            return self.head.embed(&self.input).map(Some);
        }
        let mut ids = self.input.clone();
        ids.extend(&self.drafts);
        self.head.embed(&ids).map(Some)
    }

    /// Takes the blocks' output for the pending positions and returns the
    /// token chosen next. Without drafts only (see [`Generator::advance_step`]).
    pub fn advance(&mut self, hidden: &Tensor) -> Result<u32> {
        if !self.drafts.is_empty() {
            return Err(ShardError::BadSettings(
                "the pending step carries drafts: use advance_step".into(),
            ));
        }
        let step = self.advance_step(hidden)?;
        step.tokens
            .last()
            .copied()
            .ok_or_else(|| ShardError::BadSettings("a step chose no token".into()))
    }

    /// Takes the blocks' output for the pending positions (the last token
    /// and its drafts): the tokens chosen, one per position for as long as
    /// each matches the draft after it, and how many positions the caches
    /// keep. The tokens are those one-at-a-time decoding chooses.
    pub fn advance_step(&mut self, hidden: &Tensor) -> Result<Advance> {
        if self.done {
            return Err(ShardError::BadSettings(
                "the generation has ended; nothing is pending".into(),
            ));
        }
        let run = self.input.len() + self.drafts.len();
        let (_, seq, _) = hidden.dims3()?;
        if seq != run {
            return Err(ShardError::BadSettings(format!(
                "{seq} positions came back for {run} sent"
            )));
        }
        let first = self.tokens.is_empty();
        if !first {
            self.decode_steps += 1;
        }
        // Logits for the last token's position and each draft's: position
        // j predicts what follows it.
        let logits = if self.drafts.is_empty() {
            vec![self.head.logits(hidden)?]
        } else {
            let from = seq - 1 - self.drafts.len();
            self.head.logits_from(hidden, from)?
        };
        let drafts = std::mem::take(&mut self.drafts);
        self.drafts_sent += drafts.len();
        let mut chosen = Vec::new();
        for (j, logits) in logits.into_iter().enumerate() {
            let next = self.sampler.sample(&logits, &self.history)?;
            if first {
                self.first_logits = logits;
                self.prefill = self.started.elapsed();
            }
            chosen.push(next);
            self.tokens.push(next);
            self.history.push(next);
            if self.stop_at_eos && self.head.config().eos_token_ids.contains(&next) {
                self.hit_eos = true;
                self.done = true;
            }
            if self.tokens.len() >= self.max_new_tokens {
                self.done = true;
            }
            if self.done || drafts.get(j) != Some(&next) {
                break;
            }
            self.drafts_accepted += 1;
        }
        // The inputs kept: the positions before, the last token, and each
        // accepted draft (the last chosen token is the next input).
        let keep = self.cached + self.input.len() + chosen.len() - 1;
        self.cached = keep;
        self.input = vec![*chosen.last().unwrap_or(&0)];
        if !self.done {
            self.drafts = self.draft();
        }
        Ok(Advance {
            tokens: chosen,
            keep,
        })
    }

    /// Drafts for the next step: what followed the latest earlier place
    /// where the text's last 3 (else 2, else 1) tokens appeared, capped so
    /// the step never runs past the tokens still wanted or the context.
    fn draft(&self) -> Vec<u32> {
        let wanted = self.max_new_tokens.saturating_sub(self.tokens.len());
        // After the step the caches hold history + drafts positions.
        let room = self.capacity.saturating_sub(self.history.len());
        let most = self.draft_tokens.min(wanted.saturating_sub(1)).min(room);
        if most == 0 {
            return Vec::new();
        }
        let h = &self.history;
        for n in (1..=3usize).rev() {
            if h.len() <= n {
                continue;
            }
            let tail = &h[h.len() - n..];
            if let Some(start) = (0..h.len() - n).rev().find(|&s| &h[s..s + n] == tail) {
                let follow = &h[start + n..];
                return follow[..most.min(follow.len())].to_vec();
            }
        }
        Vec::new()
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
            decode_steps: self.decode_steps,
            drafts_sent: self.drafts_sent,
            drafts_accepted: self.drafts_accepted,
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
        let step = {
            // The whole step (every block and the head) is one computation:
            // the kernels' workers spin through it.
            let _busy = crate::pool::busy();
            let hidden = pipeline.forward(&hidden)?;
            let step = generator.advance_step(&hidden)?;
            pipeline.truncate(step.keep)?;
            step
        };
        for next in step.tokens {
            if !on_token(next)? {
                generator.stop();
                break;
            }
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
    draft_tokens: usize => with_draft_tokens,
});

//! One Llama transformer block: RMSNorm, grouped-query attention with RoPE,
//! RMSNorm, SwiGLU MLP, each around a residual connection.

use candle_core::Tensor;

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::kv_cache::LayerKv;
use crate::linear::Linear;
use crate::rope::RotaryEmbedding;
use crate::weights::{BlockWeight, WeightName, WeightReader};

/// The weights of one block and the sizes needed to run it.
#[derive(Debug, Clone)]
pub struct LlamaBlock {
    index: usize,
    attn_norm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    ffn_norm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    weight_bytes: usize,
}

/// What a block needs besides its input for one step.
#[derive(Debug)]
pub(crate) struct StepContext<'a> {
    pub rope: &'a RotaryEmbedding,
    /// Absolute position of the first new token.
    pub start: usize,
    /// (gqa_group * seq, start + seq) additive mask, None for a single token.
    pub mask: Option<&'a Tensor>,
    pub max_tokens: usize,
}

impl LlamaBlock {
    /// Loads block `index` from `reader`.
    pub fn load(cfg: &LlamaConfig, reader: &mut WeightReader<'_>, index: usize) -> Result<Self> {
        let name = |w| WeightName::Block(index, w);
        let mut weight_bytes = 0;
        let mut matmul = |reader: &mut WeightReader<'_>, w| -> Result<Linear> {
            let loaded = reader.load(name(w))?;
            weight_bytes += loaded.size_in_bytes();
            loaded.into_linear()
        };
        let q_proj = matmul(reader, BlockWeight::Q)?;
        let k_proj = matmul(reader, BlockWeight::K)?;
        let v_proj = matmul(reader, BlockWeight::V)?;
        let o_proj = matmul(reader, BlockWeight::O)?;
        let gate_proj = matmul(reader, BlockWeight::Gate)?;
        let up_proj = matmul(reader, BlockWeight::Up)?;
        let down_proj = matmul(reader, BlockWeight::Down)?;
        let attn_norm = reader.load_vector(name(BlockWeight::AttnNorm))?;
        let ffn_norm = reader.load_vector(name(BlockWeight::FfnNorm))?;
        weight_bytes += 2 * cfg.hidden_size * 4;
        Ok(Self {
            index,
            attn_norm,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            ffn_norm,
            gate_proj,
            up_proj,
            down_proj,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
            weight_bytes,
        })
    }

    /// The block's index in the model.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Runs the block on `xs` (1, seq, hidden), appending this step's keys and
    /// values to `kv`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        kv: &mut LayerKv,
        ctx: &StepContext<'_>,
    ) -> Result<Tensor> {
        let (batch, seq, hidden) = xs.dims3()?;
        let residual = xs;
        let x = candle_nn::ops::rms_norm(&xs.contiguous()?, &self.attn_norm, self.eps)?;

        let q = self.q_proj.forward(&x)?; // (batch, seq, heads * head_dim)
        let k = self.k_proj.forward(&x)?; // (batch, seq, kv_heads * head_dim)
        let v = self.v_proj.forward(&x)?;
        let q = q
            .reshape((batch, seq, self.heads, self.head_dim))?
            .transpose(1, 2)?;
        let k = k
            .reshape((batch, seq, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?;
        let v = v
            .reshape((batch, seq, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = ctx.rope.apply(&q, ctx.start)?; // (batch, heads, seq, head_dim), contiguous
        let k = ctx.rope.apply(&k, ctx.start)?;
        let (k, v) = kv.append(&k, &v, ctx.start, ctx.max_tokens)?; // (batch, kv_heads, total, head_dim)

        // Grouped-query attention without copying keys: the query heads that
        // share a key/value head are adjacent, so fold them into the rows.
        let group = self.heads / self.kv_heads;
        let q = q.reshape((batch, self.kv_heads, group * seq, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?; // (batch, kv_heads, group * seq, total)
        let att = match ctx.mask {
            Some(mask) => att.broadcast_add(mask)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // (batch, kv_heads, group * seq, head_dim)
        let y = y
            .reshape((batch, self.heads, seq, self.head_dim))?
            .transpose(1, 2)?
            .reshape((batch, seq, self.heads * self.head_dim))?;
        let xs = (residual + self.o_proj.forward(&y)?)?;

        let x = candle_nn::ops::rms_norm(&xs, &self.ffn_norm, self.eps)?;
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(&x)?)?;
        let up = self.up_proj.forward(&x)?;
        let mlp = self.down_proj.forward(&(gate * up)?)?;
        debug_assert_eq!(mlp.dims3()?, (batch, seq, hidden));
        Ok((xs + mlp)?)
    }
}

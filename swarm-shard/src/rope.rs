//! Rotary position embeddings.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Result, ShardError};

/// Precomputed cos/sin tables for every position up to the model's context
/// length, shared by all blocks of a shard.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// (positions, head_dim / 2)
    cos: Tensor,
    /// (positions, head_dim / 2)
    sin: Tensor,
    layout: RopeLayout,
}

impl RotaryEmbedding {
    /// Builds the tables for `cfg` on `device`.
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let positions = cfg.max_position_embeddings;
        // Angles in f64 then rounded once: positions in the thousands times
        // small frequencies lose digits in f32.
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), device)?,
            sin: Tensor::from_vec(sin, (positions, half), device)?,
            layout: cfg.rope_layout,
        })
    }

    /// Longest position + 1 the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `xs` (batch, heads, seq, head_dim) for positions
    /// `start..start + seq`.
    pub fn apply(&self, xs: &Tensor, start: usize) -> Result<Tensor> {
        let (_b, _h, seq, _d) = xs.dims4()?;
        if start + seq > self.max_positions() {
            return Err(ShardError::SessionFull {
                used: start,
                capacity: self.max_positions(),
                adding: seq,
            });
        }
        let cos = self.cos.narrow(0, start, seq)?;
        let sin = self.sin.narrow(0, start, seq)?;
        let xs = xs.contiguous()?;
        let (cos, sin) = if xs.dtype() == DType::F32 {
            (cos, sin)
        } else {
            (cos.to_dtype(xs.dtype())?, sin.to_dtype(xs.dtype())?)
        };
        Ok(match self.layout {
            RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&xs, &cos, &sin)?,
            RopeLayout::Halves => candle_nn::rotary_emb::rope(&xs, &cos, &sin)?,
        })
    }
}

//! Synthetic models of real sizes: a Llama of any shape with random Q4_0
//! weights from a seed, written straight to a GGUF file a tensor at a time
//! (a 7B-shaped one is 3.8 GB and takes seconds, with little memory). For
//! showing and measuring what only big models show: spans that do not fit
//! one server, memory limits, bandwidth-bound decoding.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::error::{Result, ShardError};
use crate::split::{write_gguf, TensorEntry};

/// Bytes of one Q4_0 block: an f16 scale and 32 four-bit weights.
const Q4_0_BLOCK: usize = 18;
/// Weights per Q4_0 block.
const QK: usize = 32;

/// The shape of a synthetic Llama.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthLlama {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of the MLP.
    pub ffn: usize,
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Context length.
    pub context: usize,
    /// Seed of every weight.
    pub seed: u64,
}

impl SynthLlama {
    /// The dimensions of Llama 2 7B: hidden 4096, 32 blocks of 32 heads,
    /// FFN 11008, vocabulary 32000.
    pub fn llama_7b(seed: u64) -> Self {
        Self {
            hidden: 4096,
            blocks: 32,
            heads: 32,
            kv_heads: 32,
            ffn: 11008,
            vocab: 32000,
            context: 4096,
            seed,
        }
    }

    /// The tensors, in file order: (name, shape as (rows, cols) or
    /// (len,), standard deviation of the weights; 0 for norms of ones).
    fn tensors(&self) -> Vec<(String, Vec<usize>, f32)> {
        let (h, f) = (self.hidden, self.ffn);
        let kv = self.kv_heads * (h / self.heads);
        // Each matrix's weights have a spread of 1/sqrt(inputs), so the
        // states keep their scale through the blocks.
        let sd = |inputs: usize| 1.0 / (inputs as f32).sqrt();
        let mut out = vec![
            ("token_embd.weight".into(), vec![self.vocab, h], 1.0),
            ("output_norm.weight".into(), vec![h], 0.0),
            ("output.weight".into(), vec![self.vocab, h], sd(h)),
        ];
        for b in 0..self.blocks {
            let name = |t: &str| format!("blk.{b}.{t}.weight");
            out.extend([
                (name("attn_norm"), vec![h], 0.0),
                (name("attn_q"), vec![h, h], sd(h)),
                (name("attn_k"), vec![kv, h], sd(h)),
                (name("attn_v"), vec![kv, h], sd(h)),
                (name("attn_output"), vec![h, h], sd(h)),
                (name("ffn_norm"), vec![h], 0.0),
                (name("ffn_gate"), vec![f, h], sd(h)),
                (name("ffn_up"), vec![f, h], sd(h)),
                (name("ffn_down"), vec![h, f], sd(f)),
            ]);
        }
        out
    }

    /// Bytes the file's tensors take.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, shape, _)| tensor_len(shape))
            .sum()
    }

    /// Writes the model to `path` as a GGUF file of Q4_0 matrices and f32
    /// norms; returns its size in bytes. The same shape and seed always give
    /// the same file.
    pub fn write_q4_0(&self, path: &Path) -> Result<u64> {
        self.write(path, false)
    }

    /// Writes the model with every tensor in f32 (weights uniform with the
    /// same spread as [`SynthLlama::write_q4_0`]'s).
    pub fn write_f32(&self, path: &Path) -> Result<u64> {
        self.write(path, true)
    }

    fn write(&self, path: &Path, f32_weights: bool) -> Result<u64> {
        if self.heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || !(f32_weights || (self.hidden.is_multiple_of(QK) && self.ffn.is_multiple_of(QK)))
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            return Err(ShardError::BadSettings(format!(
                "a synthetic Llama needs heads divisible by key/value heads, and for Q4_0 widths divisible by {QK}: {self:?}"
            )));
        }
        let tensors = self.tensors();
        let entries: Vec<TensorEntry> = tensors
            .iter()
            .map(|(name, shape, _)| {
                let dense = f32_weights || shape.len() == 1;
                TensorEntry {
                    name: name.clone(),
                    dtype: if dense { "F32" } else { "Q4_0" }.into(),
                    shape: shape.clone(),
                    len: if dense {
                        shape.iter().product::<usize>() as u64 * 4
                    } else {
                        tensor_len(shape)
                    },
                }
            })
            .collect();
        let u32v = |v: usize| Value::U32(v as u32);
        let metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String("llama".into())),
            (
                "general.name".into(),
                Value::String(format!("synthetic-llama-{}x{}", self.blocks, self.hidden)),
            ),
            // llama.cpp's file types ALL_F32 and MOSTLY_Q4_0.
            (
                "general.file_type".into(),
                Value::U32(if f32_weights { 0 } else { 2 }),
            ),
            ("llama.block_count".into(), u32v(self.blocks)),
            ("llama.context_length".into(), u32v(self.context)),
            ("llama.embedding_length".into(), u32v(self.hidden)),
            ("llama.feed_forward_length".into(), u32v(self.ffn)),
            ("llama.attention.head_count".into(), u32v(self.heads)),
            ("llama.attention.head_count_kv".into(), u32v(self.kv_heads)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
            (
                "llama.rope.dimension_count".into(),
                u32v(self.hidden / self.heads),
            ),
            ("llama.vocab_size".into(), u32v(self.vocab)),
        ];
        let mut buf = vec![0u8; (1 << 20) / Q4_0_BLOCK * Q4_0_BLOCK];
        write_gguf(path, &metadata, &entries, 32, &mut |i, w| {
            let (_, shape, sd) = &tensors[i];
            let io = |source| ShardError::Io {
                path: path.to_owned(),
                source,
            };
            if shape.len() == 1 {
                let ones: Vec<u8> = (0..shape[0]).flat_map(|_| 1f32.to_le_bytes()).collect();
                return w.write_all(&ones).map_err(io);
            }
            let mut rng =
                StdRng::seed_from_u64(self.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if f32_weights {
                // Uniform on [-a, a] has a spread of a / sqrt(3).
                let a = sd * 3f32.sqrt();
                let n: usize = shape.iter().product();
                let values: Vec<u8> = (0..n)
                    .flat_map(|_| {
                        let u = rng.next_u32() as f32 / u32::MAX as f32;
                        ((u * 2.0 - 1.0) * a).to_le_bytes()
                    })
                    .collect();
                return w.write_all(&values).map_err(io);
            }
            // Uniform 4-bit weights (q - 8) * d have a spread of 4.61 d.
            let scale = half::f16::from_f32(sd / 4.61).to_le_bytes();
            let mut left = entries[i].len as usize;
            while left > 0 {
                let n = left.min(buf.len());
                let chunk = &mut buf[..n];
                rng.fill_bytes(chunk);
                for block in chunk.chunks_exact_mut(Q4_0_BLOCK) {
                    block[..2].copy_from_slice(&scale);
                }
                w.write_all(chunk).map_err(io)?;
                left -= n;
            }
            Ok(())
        })
    }
}

/// Bytes of a tensor: f32 for vectors, Q4_0 for matrices.
fn tensor_len(shape: &[usize]) -> u64 {
    match shape {
        [n] => (*n * 4) as u64,
        _ => (shape.iter().product::<usize>() / QK * Q4_0_BLOCK) as u64,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Device, LocalModel, ModelFiles, WeightPrecision};

    #[test]
    fn a_synthetic_model_loads_runs_and_is_the_same_for_the_same_seed() {
        let dir = std::env::temp_dir().join(format!("sherpa-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let shape = SynthLlama {
            hidden: 128,
            blocks: 3,
            heads: 4,
            kv_heads: 2,
            ffn: 256,
            vocab: 300,
            context: 64,
            seed: 5,
        };
        let dense = dir.join("f32.gguf");
        shape.write_f32(&dense).unwrap();
        let files = ModelFiles::open(&dense).unwrap();
        let model = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
        let options = crate::GenerateOptions::default().with_max_new_tokens(2);
        let out = model
            .generate(&[1, 2], &options, &mut |_| Ok(true))
            .unwrap();
        assert!(out.first_logits.iter().all(|x| x.is_finite()));
        let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
        let bytes = shape.write_q4_0(&a).unwrap();
        shape.write_q4_0(&b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(bytes >= shape.weight_bytes());
        let files = ModelFiles::open(&a).unwrap();
        assert_eq!(files.config().num_hidden_layers, 3);
        assert_eq!(files.config().num_key_value_heads, 2);
        let model = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
        let options = crate::GenerateOptions::default()
            .with_max_new_tokens(4)
            .with_stop_at_eos(false);
        let out = model
            .generate(&[1, 2, 3], &options, &mut |_| Ok(true))
            .unwrap();
        assert_eq!(out.tokens.len(), 4);
        assert!(out.first_logits.iter().all(|x| x.is_finite()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_7b_shape_is_about_3_8_gb() {
        let gb = SynthLlama::llama_7b(0).weight_bytes() as f64 / 1e9;
        assert!((3.7..3.9).contains(&gb), "{gb} GB");
    }
}

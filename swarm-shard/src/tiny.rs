//! Tiny random Llama models, written as real model files, for fast tests.
//!
//! The same random weights can be written as a GGUF file (in any supported
//! tensor type, Q/K rows permuted the way llama.cpp's converter does) and as
//! an HF safetensors directory, so tests exercise the real loaders.

use std::collections::HashMap;
use std::path::Path;

pub use candle_core::quantized::GgmlDType;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, ShardError};

/// Shape and seed of a tiny random model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyModelSpec {
    /// Residual width (a multiple of 32 so every GGUF block type fits).
    pub hidden_size: usize,
    /// MLP width (a multiple of 32).
    pub intermediate_size: usize,
    /// Number of blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub max_positions: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// Whether the LM head is the embedding table.
    pub tie_embeddings: bool,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for TinyModelSpec {
    /// 64 wide, 4 blocks of 4 query / 2 key-value heads, 256 tokens.
    fn default() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            vocab_size: 256,
            max_positions: 512,
            rope_theta: 10_000.0,
            tie_embeddings: true,
            seed: 0,
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_owned(),
        source,
    }
}

impl TinyModelSpec {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.heads
    }

    /// The random weights in HF layout and names, deterministic in `seed`.
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let dev = Device::Cpu;
        let mut matrix = |rows: usize, cols: usize| -> Result<Tensor> {
            let scale = 1.0 / (cols as f32).sqrt();
            let data: Vec<f32> = (0..rows * cols)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale * 1.7)
                .collect();
            Ok(Tensor::from_vec(data, (rows, cols), &dev)?)
        };
        let h = self.hidden_size;
        let hd = self.head_dim();
        let mut tensors = vec![(
            "model.embed_tokens.weight".to_string(),
            matrix(self.vocab_size, h)?,
        )];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            tensors.push((
                format!("{p}.self_attn.q_proj.weight"),
                matrix(self.heads * hd, h)?,
            ));
            tensors.push((
                format!("{p}.self_attn.k_proj.weight"),
                matrix(self.kv_heads * hd, h)?,
            ));
            tensors.push((
                format!("{p}.self_attn.v_proj.weight"),
                matrix(self.kv_heads * hd, h)?,
            ));
            tensors.push((
                format!("{p}.self_attn.o_proj.weight"),
                matrix(h, self.heads * hd)?,
            ));
            tensors.push((
                format!("{p}.mlp.gate_proj.weight"),
                matrix(self.intermediate_size, h)?,
            ));
            tensors.push((
                format!("{p}.mlp.up_proj.weight"),
                matrix(self.intermediate_size, h)?,
            ));
            tensors.push((
                format!("{p}.mlp.down_proj.weight"),
                matrix(h, self.intermediate_size)?,
            ));
        }
        if !self.tie_embeddings {
            tensors.push(("lm_head.weight".to_string(), matrix(self.vocab_size, h)?));
        }
        // Norm weights near 1, different per layer so a mix-up shows.
        let mut norm = |_: usize| -> Result<Tensor> {
            let data: Vec<f32> = (0..h).map(|_| 0.8 + 0.4 * rng.random::<f32>()).collect();
            Ok(Tensor::from_vec(data, h, &dev)?)
        };
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            tensors.push((format!("{p}.input_layernorm.weight"), norm(i)?));
            tensors.push((format!("{p}.post_attention_layernorm.weight"), norm(i)?));
        }
        tensors.push(("model.norm.weight".to_string(), norm(0)?));
        Ok(tensors)
    }

    /// Writes an HF directory: `config.json` and `model.safetensors`.
    pub fn write_hf_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
        });
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config.to_string()).map_err(io_err(&config_path))?;
        let tensors: HashMap<String, Tensor> = self.hf_tensors()?.into_iter().collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        Ok(())
    }

    /// Writes a GGUF file with matrices stored as `dtype` (norms stay f32).
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> Result<()> {
        let mut qtensors = Vec::new();
        for (hf_name, tensor) in self.hf_tensors()? {
            let Some(name) = gguf_name(&hf_name) else {
                continue;
            };
            // llama.cpp's converter permutes Q and K rows so that its
            // interleaved RoPE equals HF's rotate-half RoPE.
            let tensor = if hf_name.ends_with("q_proj.weight") {
                permute_for_interleaved_rope(&tensor, self.heads)?
            } else if hf_name.ends_with("k_proj.weight") {
                permute_for_interleaved_rope(&tensor, self.kv_heads)?
            } else {
                tensor
            };
            let qtensor = if tensor.rank() == 1 {
                QTensor::quantize(&tensor, GgmlDType::F32)?
            } else {
                QTensor::quantize(&tensor, dtype)?
            };
            qtensors.push((name, qtensor));
        }
        use gguf_file::Value;
        let u32v = |v: usize| Value::U32(v as u32);
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("tiny-random-llama".into())),
            ("llama.block_count", u32v(self.layers)),
            ("llama.context_length", u32v(self.max_positions)),
            ("llama.embedding_length", u32v(self.hidden_size)),
            ("llama.feed_forward_length", u32v(self.intermediate_size)),
            ("llama.attention.head_count", u32v(self.heads)),
            ("llama.attention.head_count_kv", u32v(self.kv_heads)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(self.rope_theta)),
            ("llama.rope.dimension_count", u32v(self.head_dim())),
            ("llama.vocab_size", u32v(self.vocab_size)),
        ];
        let metadata_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path).map_err(io_err(path))?;
        gguf_file::write(&mut file, &metadata_refs, &tensor_refs)?;
        Ok(())
    }
}

/// llama.cpp's `permute`: (out, in) rows regrouped per head from halves to
/// interleaved pairs.
pub fn permute_for_interleaved_rope(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, cols))?
        .transpose(1, 2)?
        .reshape((out, cols))?)
}

fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (index, suffix) = rest.split_once('.')?;
    let part = match suffix {
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        "input_layernorm.weight" => "attn_norm",
        "post_attention_layernorm.weight" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{index}.{part}.weight"))
}

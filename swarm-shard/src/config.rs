//! The hyper-parameters of a Llama-architecture model.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ShardError};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)`. GGUF files store Llama's Q/K rows permuted for this
    /// layout (llama.cpp's converter does it), so GGUF weights use it.
    Interleaved,
    /// Pairs `(i, i + d/2)`, the "rotate half" of HF transformers; safetensors
    /// checkpoints use it.
    Halves,
}

/// Hyper-parameters of a Llama-architecture model, read from GGUF metadata or
/// an HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads per block.
    pub num_attention_heads: usize,
    /// Key/value heads per block (grouped-query attention when fewer than
    /// query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Whether the LM head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// How rotary embeddings pair dimensions for these weights.
    pub rope_layout: RopeLayout,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens; generation stops at any of them.
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Query heads that share one key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Bytes of KV cache one token needs in one block, at `dtype_size` bytes
    /// per element.
    pub fn kv_bytes_per_token_per_block(&self, dtype_size: usize) -> u64 {
        (2 * self.num_key_value_heads * self.head_dim * dtype_size) as u64
    }

    /// Checks that the numbers are consistent, so later shape errors cannot
    /// happen deep inside a forward pass.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, reason: String| ShardError::BadConfig {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{} query heads cannot be grouped over {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(bad("rms_norm_eps/rope_theta", "must be positive".into()));
        }
        if u32::try_from(self.num_hidden_layers).is_err() || u32::try_from(self.vocab_size).is_err()
        {
            return Err(bad("num_hidden_layers/vocab_size", "too large".into()));
        }
        Ok(())
    }

    /// Reads the config from a GGUF file's metadata (`general.architecture`
    /// must be `llama`).
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let bad = |field: &str, reason: String| ShardError::BadConfig {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let arch = match md.get("general.architecture") {
            Some(v) => v
                .to_string()
                .map_err(|e| bad("general.architecture", e.to_string()))?
                .clone(),
            None => return Err(bad("general.architecture", "missing".into())),
        };
        if arch != "llama" {
            return Err(ShardError::UnsupportedArchitecture {
                path: path.to_owned(),
                architecture: arch,
            });
        }
        let get_u32 = |key: &str| -> Result<Option<usize>> {
            let full = format!("llama.{key}");
            match md.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .to_u32()
                    .or_else(|_| v.to_u64().map(|x| x as u32))
                    .map(|x| Some(x as usize))
                    .map_err(|e| bad(&full, e.to_string())),
            }
        };
        let get_f32 = |key: &str| -> Result<Option<f64>> {
            let full = format!("llama.{key}");
            match md.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .map(|x| Some(x as f64))
                    .map_err(|e| bad(&full, e.to_string())),
            }
        };
        let required = |key: &str| -> Result<usize> {
            get_u32(key)?.ok_or_else(|| bad(&format!("llama.{key}"), "missing".into()))
        };
        let hidden_size = required("embedding_length")?;
        let num_attention_heads = required("attention.head_count")?;
        let num_key_value_heads =
            get_u32("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 {
            return Err(bad("llama.attention.head_count", "must be positive".into()));
        }
        let head_dim = hidden_size / num_attention_heads;
        if let Some(rope_dim) = get_u32("rope.dimension_count")? {
            if rope_dim != head_dim {
                return Err(bad(
                    "llama.rope.dimension_count",
                    format!("partial rotary ({rope_dim} of {head_dim} dims) is not supported"),
                ));
            }
        }
        let token_count = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec().map(|v| v.len()).ok(),
            None => None,
        };
        let vocab_size = match get_u32("vocab_size")?.or(token_count) {
            Some(v) => v,
            None => content
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| bad("llama.vocab_size", "missing".into()))?,
        };
        let token_id = |key: &str| -> Option<u32> {
            md.get(&format!("tokenizer.ggml.{key}"))
                .and_then(|v| v.to_u32().ok())
        };
        let config = Self {
            hidden_size,
            intermediate_size: required("feed_forward_length")?,
            num_hidden_layers: required("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: get_f32("rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: get_u32("context_length")?.unwrap_or(4096),
            vocab_size,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            rope_layout: RopeLayout::Interleaved,
            bos_token_id: token_id("bos_token_id"),
            eos_token_ids: token_id("eos_token_id").into_iter().collect(),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads an HF `config.json` (LlamaForCausalLM and compatible).
    pub fn from_hf_json(json: &str, path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct HfConfig {
            #[serde(default)]
            architectures: Vec<String>,
            #[serde(default)]
            model_type: Option<String>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rms_norm_eps: f64,
            rope_theta: Option<f64>,
            max_position_embeddings: Option<usize>,
            vocab_size: usize,
            #[serde(default)]
            tie_word_embeddings: bool,
            bos_token_id: Option<u32>,
            eos_token_id: Option<EosIds>,
            rope_scaling: Option<serde_json::Value>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum EosIds {
            One(u32),
            Many(Vec<u32>),
        }
        let hf: HfConfig = serde_json::from_str(json).map_err(|e| ShardError::BadModelFile {
            path: path.to_owned(),
            reason: format!("config.json does not describe a Llama model: {e}"),
        })?;
        let arch = hf
            .architectures
            .first()
            .cloned()
            .or(hf.model_type.clone())
            .unwrap_or_default();
        let is_llama = hf.model_type.as_deref() == Some("llama")
            || hf.architectures.iter().any(|a| a == "LlamaForCausalLM");
        if !is_llama {
            return Err(ShardError::UnsupportedArchitecture {
                path: path.to_owned(),
                architecture: arch,
            });
        }
        if let Some(scaling) = hf.rope_scaling.filter(|v| !v.is_null()) {
            return Err(ShardError::BadConfig {
                path: path.to_owned(),
                field: "rope_scaling".into(),
                reason: format!("RoPE scaling {scaling} is not supported yet"),
            });
        }
        let num_key_value_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let config = Self {
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            vocab_size: hf.vocab_size,
            tie_word_embeddings: hf.tie_word_embeddings,
            rope_layout: RopeLayout::Halves,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: match hf.eos_token_id {
                None => vec![],
                Some(EosIds::One(id)) => vec![id],
                Some(EosIds::Many(ids)) => ids,
            },
        };
        config.validate(path)?;
        Ok(config)
    }
}

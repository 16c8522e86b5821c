//! The hyper-parameters of a model: which family it belongs to and the
//! numbers that decide its math, read from GGUF metadata or an HF
//! `config.json`.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ShardError};

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i+1)`. llama.cpp's converter stores the Q/K rows of
    /// `llama`-architecture GGUF files (Llama, Mistral, Mixtral) permuted
    /// for this layout, so those files use it.
    Interleaved,
    /// Pairs `(i, i + d/2)`, the "rotate half" of HF transformers
    /// (llama.cpp's NEOX mode): every safetensors checkpoint, and GGUF files
    /// of the other families.
    Halves,
}

/// The model families the engine computes. All are decoder-only
/// transformers with RMS norms, rotary positions and gated MLPs; they differ
/// in the details each field of [`ModelConfig`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Family {
    /// Llama 1-3 and compatible (SmolLM, TinyLlama, ...).
    Llama,
    /// Mistral: Llama with a sliding attention window.
    Mistral,
    /// Qwen2 and Qwen2.5: biases on the query, key and value projections.
    Qwen2,
    /// Qwen3: an RMS norm on each query and key head.
    Qwen3,
    /// Phi-3: fused QKV and gate/up projections.
    Phi3,
    /// Gemma 2: norms after attention and MLP too, GELU, soft-capped
    /// logits, scaled embeddings, alternating sliding windows.
    Gemma2,
    /// Mixtral: a mixture of experts in place of each MLP.
    Mixtral,
}

impl Family {
    /// The family's name as HF's `model_type` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
            Self::Gemma2 => "gemma2",
            Self::Mixtral => "mixtral",
        }
    }

    /// Every family, for messages and tests.
    pub const ALL: [Family; 7] = [
        Self::Llama,
        Self::Mistral,
        Self::Qwen2,
        Self::Qwen3,
        Self::Phi3,
        Self::Gemma2,
        Self::Mixtral,
    ];

    fn from_hf(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == model_type)
    }

    fn from_hf_architecture(architecture: &str) -> Option<Self> {
        let family = match architecture {
            "LlamaForCausalLM" => Self::Llama,
            "MistralForCausalLM" => Self::Mistral,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            "Phi3ForCausalLM" => Self::Phi3,
            "Gemma2ForCausalLM" => Self::Gemma2,
            "MixtralForCausalLM" => Self::Mixtral,
            _ => return None,
        };
        Some(family)
    }

    /// Whether each block holds fused QKV and gate/up matrices.
    pub fn fused_projections(self) -> bool {
        self == Self::Phi3
    }

    /// Whether the query, key and value projections have biases (Qwen2's
    /// always do).
    pub fn qkv_bias(self) -> bool {
        self == Self::Qwen2
    }

    /// Whether each query and key head has its own RMS norm.
    pub fn qk_norm(self) -> bool {
        self == Self::Qwen3
    }

    /// The MLP's activation.
    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma2 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    /// Whether blocks have norms after attention and after the MLP too.
    pub fn sandwich_norms(self) -> bool {
        self == Self::Gemma2
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU with the tanh approximation (GeGLU; Gemma's
    /// `gelu_pytorch_tanh`).
    GeluTanh,
}

/// A mixture of experts in place of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Experts {
    /// Experts in each block.
    pub count: usize,
    /// Experts each token is routed to.
    pub per_token: usize,
}

/// Hyper-parameters of a model, read from GGUF metadata or an HF
/// `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The model family.
    pub family: Family,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer (of each expert's, in a mixture).
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
    /// Added to every RMS norm weight at load: HF Gemma stores `w` and
    /// multiplies by `1 + w`; llama.cpp's converter stores `w + 1`.
    pub norm_weight_offset: f64,
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
    /// Whether the query, key and value projections have biases.
    pub qkv_bias: bool,
    /// Whether each query and key head goes through its own RMS norm
    /// before the rotary embedding.
    pub qk_norm: bool,
    /// Keys a query may see in a windowed block: those less than this many
    /// positions back, itself included.
    pub sliding_window: Option<usize>,
    /// For each block, whether it attends through `sliding_window` (the
    /// others see the whole context).
    pub sliding_layers: Vec<bool>,
    /// The MLP's activation.
    pub activation: Activation,
    /// Factor on query-key dot products (1/sqrt(head_dim) unless the
    /// family says otherwise).
    pub attention_scale: f64,
    /// Attention scores become `cap * tanh(score / cap)`.
    pub attn_logit_softcap: Option<f64>,
    /// Final logits become `cap * tanh(logit / cap)`.
    pub final_logit_softcap: Option<f64>,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden_size)).
    pub embedding_scale: Option<f64>,
    /// A mixture of experts in place of each MLP.
    pub experts: Option<Experts>,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens; generation stops at any of them.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Query heads that share one key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The sliding window block `index` attends through, if any.
    pub fn window_of(&self, index: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(index).copied().unwrap_or(false))
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
        if self.sliding_window == Some(0) {
            return Err(bad("sliding_window", "must be positive".into()));
        }
        if self.sliding_layers.len() != self.num_hidden_layers {
            return Err(bad(
                "layer_types",
                format!(
                    "names {} blocks but the model has {}",
                    self.sliding_layers.len(),
                    self.num_hidden_layers
                ),
            ));
        }
        for (field, cap) in [
            ("attn_logit_softcapping", self.attn_logit_softcap),
            ("final_logit_softcapping", self.final_logit_softcap),
        ] {
            if cap.is_some_and(|c| c.is_nan() || c <= 0.0) {
                return Err(bad(field, "must be positive".into()));
            }
        }
        if let Some(e) = self.experts {
            if e.count == 0 || e.per_token == 0 || e.per_token > e.count {
                return Err(bad(
                    "num_experts_per_tok",
                    format!("{} of {} experts per token", e.per_token, e.count),
                ));
            }
        }
        Ok(())
    }

    /// Reads the config from a GGUF file's metadata. The architectures are
    /// those of llama.cpp's converter: `llama` (Llama, Mistral, and Mixtral
    /// when it has experts), `qwen2`, `qwen3`, `phi3` and `gemma2`.
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
        let key = |k: &str| format!("{arch}.{k}");
        let get_u32 = |k: &str| -> Result<Option<usize>> {
            let full = key(k);
            match md.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .to_u32()
                    .or_else(|_| v.to_u64().map(|x| x as u32))
                    .map(|x| Some(x as usize))
                    .map_err(|e| bad(&full, e.to_string())),
            }
        };
        let get_f32 = |k: &str| -> Result<Option<f64>> {
            let full = key(k);
            match md.get(&full) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .map(|x| Some(x as f64))
                    .map_err(|e| bad(&full, e.to_string())),
            }
        };
        let required = |k: &str| -> Result<usize> {
            get_u32(k)?.ok_or_else(|| bad(&key(k), "missing".into()))
        };
        let experts = match (get_u32("expert_count")?, get_u32("expert_used_count")?) {
            (None | Some(0), _) => None,
            (Some(count), per_token) => Some(Experts {
                count,
                per_token: per_token
                    .ok_or_else(|| bad(&key("expert_used_count"), "missing".into()))?,
            }),
        };
        let family = match (arch.as_str(), experts) {
            ("llama", None) => Family::Llama,
            ("llama", Some(_)) => Family::Mixtral,
            ("qwen2", None) => Family::Qwen2,
            ("qwen3", None) => Family::Qwen3,
            ("phi3", None) => Family::Phi3,
            ("gemma2", None) => Family::Gemma2,
            _ => {
                return Err(ShardError::UnsupportedArchitecture {
                    path: path.to_owned(),
                    architecture: if experts.is_some() {
                        format!("{arch} with experts")
                    } else {
                        arch
                    },
                })
            }
        };
        let hidden_size = required("embedding_length")?;
        let num_attention_heads = required("attention.head_count")?;
        if num_attention_heads == 0 {
            return Err(bad(&key("attention.head_count"), "must be positive".into()));
        }
        let num_key_value_heads =
            get_u32("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        // llama.cpp: the key length defaults to n_embd / n_head.
        let head_dim =
            get_u32("attention.key_length")?.unwrap_or(hidden_size / num_attention_heads);
        if let Some(value_dim) = get_u32("attention.value_length")? {
            if value_dim != head_dim {
                return Err(bad(
                    &key("attention.value_length"),
                    format!("value heads of {value_dim} dims with key heads of {head_dim} are not implemented"),
                ));
            }
        }
        if let Some(rope_dim) = get_u32("rope.dimension_count")? {
            if rope_dim != head_dim {
                return Err(bad(
                    &key("rope.dimension_count"),
                    format!("partial rotary ({rope_dim} of {head_dim} dims) is not implemented"),
                ));
            }
        }
        // RoPE scaling (linear, yarn, ...) is not implemented: refuse it
        // rather than run with the wrong positions.
        if let Some(kind) = md.get(&key("rope.scaling.type")) {
            let kind = kind
                .to_string()
                .map_err(|e| bad(&key("rope.scaling.type"), e.to_string()))?;
            if kind != "none" {
                return Err(bad(
                    &key("rope.scaling.type"),
                    format!("RoPE scaling {kind:?} is not implemented (only unscaled RoPE)"),
                ));
            }
        }
        if let Some(factor) = get_f32("rope.scale_linear")? {
            if factor != 1.0 {
                return Err(bad(
                    &key("rope.scale_linear"),
                    format!("linear RoPE scaling ({factor}) is not implemented"),
                ));
            }
        }
        let token_count = match md.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec().map(|v| v.len()).ok(),
            None => None,
        };
        let vocab_size = match get_u32("vocab_size")?.or(token_count) {
            Some(v) => v,
            None => content
                .tensor_infos
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or_else(|| bad(&key("vocab_size"), "missing".into()))?,
        };
        let token_id = |k: &str| -> Option<u32> {
            md.get(&format!("tokenizer.ggml.{k}"))
                .and_then(|v| v.to_u32().ok())
        };
        let num_hidden_layers = required("block_count")?;
        let sliding_window = get_u32("attention.sliding_window")?.filter(|&w| w > 0);
        // llama.cpp's Gemma 2 alternates windowed and global blocks, the
        // even ones windowed (its swa pattern of 2), as transformers does.
        let sliding_layers = (0..num_hidden_layers)
            .map(|i| sliding_window.is_some() && (family != Family::Gemma2 || i % 2 == 0))
            .collect();
        let gemma = family == Family::Gemma2;
        let config = Self {
            family,
            hidden_size,
            intermediate_size: required("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            // llama.cpp requires the epsilon and the context length; so
            // does this engine.
            rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| bad(&key("attention.layer_norm_rms_epsilon"), "missing".into()))?,
            // The converter already stored Gemma's norms as w + 1.
            norm_weight_offset: 0.0,
            // llama.cpp's default base when a file gives none.
            rope_theta: get_f32("rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: required("context_length")?,
            vocab_size,
            // A split piece says; a whole file ties when it has no LM head.
            tie_word_embeddings: match md.get(crate::split::keys::TIED) {
                Some(v) => v
                    .to_bool()
                    .map_err(|e| bad(crate::split::keys::TIED, e.to_string()))?,
                None => !content.tensor_infos.contains_key("output.weight"),
            },
            rope_layout: if arch == "llama" {
                RopeLayout::Interleaved
            } else {
                RopeLayout::Halves
            },
            qkv_bias: family.qkv_bias(),
            qk_norm: family.qk_norm(),
            sliding_window,
            sliding_layers,
            activation: family.activation(),
            // llama.cpp scales Gemma 2's queries by 1/sqrt(n_embd / n_head)
            // for the 27B model (46 blocks) and by 1/sqrt(head_dim) for the
            // others: GGUF does not carry query_pre_attn_scalar.
            attention_scale: if gemma && num_hidden_layers == 46 {
                1.0 / ((hidden_size / num_attention_heads) as f64).sqrt()
            } else {
                1.0 / (head_dim as f64).sqrt()
            },
            attn_logit_softcap: get_f32("attn_logit_softcapping")?.filter(|_| gemma),
            final_logit_softcap: get_f32("final_logit_softcapping")?.filter(|_| gemma),
            embedding_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            experts,
            bos_token_id: token_id("bos_token_id"),
            eos_token_ids: token_id("eos_token_id").into_iter().collect(),
        };
        if gemma {
            // transformers' Gemma2Config defaults both caps and llama.cpp's
            // converter writes them: a file without them was not made that
            // way, and guessing would change the math.
            for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if get_f32(k)?.is_none() {
                    return Err(bad(&key(k), "missing".into()));
                }
            }
            // Every Gemma 2 has a window; llama.cpp requires the key.
            if sliding_window.is_none() {
                return Err(bad(&key("attention.sliding_window"), "missing".into()));
            }
        }
        config.validate(path)?;
        config.log(path, "GGUF");
        Ok(config)
    }

    /// Reads an HF `config.json`, in the layout of transformers 4
    /// (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`). A field that
    /// changes the math must be present (or have a default that the
    /// family's transformers config class defines, noted below) and have a
    /// value this engine implements; otherwise loading fails naming the
    /// field and the file.
    pub fn from_hf_json(json: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| ShardError::BadModelFile {
                path: path.to_owned(),
                reason: format!("config.json is not valid JSON: {e}"),
            })?;
        let hf = HfFields::new(&value, path)?;
        let architectures: Vec<&str> = match hf.get("architectures") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        let model_type = hf.string("model_type")?;
        let family = model_type
            .as_deref()
            .and_then(Family::from_hf)
            .or_else(|| {
                architectures
                    .iter()
                    .find_map(|a| Family::from_hf_architecture(a))
            })
            .ok_or_else(|| ShardError::UnsupportedArchitecture {
                path: path.to_owned(),
                architecture: model_type
                    .clone()
                    .or_else(|| architectures.first().map(|a| a.to_string()))
                    .unwrap_or_default(),
            })?;
        hf.check_rope_type()?;
        let rope_theta = hf.rope_theta()?;
        hf.check_unimplemented(family)?;
        let hidden_size = hf.required_usize("hidden_size")?;
        let num_attention_heads = hf.required_usize("num_attention_heads")?;
        let num_hidden_layers = hf.required_usize("num_hidden_layers")?;
        // Every family's config: head_dim defaults to hidden_size //
        // num_attention_heads (Gemma 2's and Qwen3's classes default to a
        // fixed number, but save it).
        let head_dim = match family {
            Family::Gemma2 | Family::Qwen3 => hf.required_usize("head_dim")?,
            _ => hf
                .usize("head_dim")?
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
        };
        let (sliding_window, sliding_layers) = hf.sliding(family, num_hidden_layers)?;
        let gemma = family == Family::Gemma2;
        let experts = if family == Family::Mixtral {
            // MixtralConfig's defaults: 8 experts, 2 per token.
            Some(Experts {
                count: hf.usize("num_local_experts")?.unwrap_or(8),
                per_token: hf.usize("num_experts_per_tok")?.unwrap_or(2),
            })
        } else {
            None
        };
        let config = Self {
            family,
            hidden_size,
            intermediate_size: hf.required_usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            // Every family's config: "If it is not specified, will default
            // to `num_attention_heads`".
            num_key_value_heads: hf
                .usize("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: hf
                .f64("rms_norm_eps")?
                .ok_or_else(|| hf.bad("rms_norm_eps", "missing"))?,
            // Gemma's RMSNorm multiplies by (1 + weight).
            norm_weight_offset: if gemma { 1.0 } else { 0.0 },
            rope_theta,
            // The config classes' default; it limits the context, not the math.
            max_position_embeddings: hf.usize("max_position_embeddings")?.unwrap_or(2048),
            vocab_size: hf.required_usize("vocab_size")?,
            // The config classes' default (Gemma 2's is true).
            tie_word_embeddings: hf.bool("tie_word_embeddings")?.unwrap_or(gemma),
            rope_layout: RopeLayout::Halves,
            qkv_bias: family.qkv_bias(),
            qk_norm: family.qk_norm(),
            sliding_window,
            sliding_layers,
            activation: family.activation(),
            attention_scale: if gemma {
                1.0 / hf.required_f64("query_pre_attn_scalar")?.sqrt()
            } else {
                1.0 / (head_dim as f64).sqrt()
            },
            // Gemma2Config's defaults: 50 and 30; null turns them off.
            attn_logit_softcap: if gemma {
                hf.f64_or_default("attn_logit_softcapping", 50.0)?
            } else {
                None
            },
            final_logit_softcap: if gemma {
                hf.f64_or_default("final_logit_softcapping", 30.0)?
            } else {
                None
            },
            embedding_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            experts,
            bos_token_id: hf.ids("bos_token_id")?.first().copied(),
            eos_token_ids: hf.ids("eos_token_id")?,
        };
        config.validate(path)?;
        config.log(path, "HF config.json");
        Ok(config)
    }

    /// Says at info level what decides the math, so a user can see what
    /// the engine understood.
    fn log(&self, path: &Path, format: &str) {
        let windowed = self.sliding_layers.iter().filter(|w| **w).count();
        tracing::info!(
            file = %path.display(),
            format,
            family = %self.family,
            rope = "default (no scaling)",
            rope_theta = self.rope_theta,
            rope_layout = ?self.rope_layout,
            rms_norm_eps = self.rms_norm_eps,
            norm_weight_offset = self.norm_weight_offset,
            sandwich_norms = self.family.sandwich_norms(),
            qkv_bias = self.qkv_bias,
            qk_norm = self.qk_norm,
            heads = self.num_attention_heads,
            kv_heads = self.num_key_value_heads,
            head_dim = self.head_dim,
            attention_scale = self.attention_scale,
            sliding_window = ?self.sliding_window,
            windowed_blocks = windowed,
            attn_logit_softcap = ?self.attn_logit_softcap,
            final_logit_softcap = ?self.final_logit_softcap,
            embedding_scale = ?self.embedding_scale,
            activation = ?self.activation,
            experts = ?self.experts,
            layers = self.num_hidden_layers,
            context = self.max_position_embeddings,
            tied_embeddings = self.tie_word_embeddings,
            "model config"
        );
    }
}

/// Reads the fields of an HF `config.json`, naming the field and the file
/// in every error.
struct HfFields<'a> {
    fields: &'a serde_json::Map<String, serde_json::Value>,
    path: &'a Path,
}

impl<'a> HfFields<'a> {
    fn new(value: &'a serde_json::Value, path: &'a Path) -> Result<Self> {
        let fields = value.as_object().ok_or_else(|| ShardError::BadModelFile {
            path: path.to_owned(),
            reason: "config.json is not a JSON object".into(),
        })?;
        Ok(Self { fields, path })
    }

    fn bad(&self, field: &str, reason: impl Into<String>) -> ShardError {
        ShardError::BadConfig {
            path: self.path.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// A field, `None` when absent or null.
    fn get(&self, field: &str) -> Option<&'a serde_json::Value> {
        self.fields.get(field).filter(|v| !v.is_null())
    }

    /// A field inside an object field (`rope_parameters.rope_theta`).
    fn nested(&self, outer: &str, inner: &str) -> Option<&'a serde_json::Value> {
        self.get(outer)
            .and_then(|o| o.get(inner))
            .filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.bad(field, format!("must be a whole number, not {v}")))
            })
            .transpose()
    }

    fn required_usize(&self, field: &str) -> Result<usize> {
        self.usize(field)?.ok_or_else(|| self.bad(field, "missing"))
    }

    fn f64(&self, field: &str) -> Result<Option<f64>> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.bad(field, format!("must be a number, not {v}")))
            })
            .transpose()
    }

    fn bool(&self, field: &str) -> Result<Option<bool>> {
        self.get(field)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.bad(field, format!("must be true or false, not {v}")))
            })
            .transpose()
    }

    fn string(&self, field: &str) -> Result<Option<String>> {
        self.get(field)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.bad(field, format!("must be a string, not {v}")))
            })
            .transpose()
    }

    /// A token id or a list of them.
    fn ids(&self, field: &str) -> Result<Vec<u32>> {
        let one = |v: &serde_json::Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.bad(field, format!("must be token ids, not {v}")))
        };
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(serde_json::Value::Array(ids)) => ids.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// `rope_theta` at the top level (transformers 4) or in
    /// `rope_parameters` (transformers 5); both must agree when both are
    /// there.
    fn rope_theta(&self) -> Result<f64> {
        let number = |field: &str, v: &serde_json::Value| {
            v.as_f64()
                .ok_or_else(|| self.bad(field, format!("must be a number, not {v}")))
        };
        let top = self
            .get("rope_theta")
            .map(|v| number("rope_theta", v))
            .transpose()?;
        let nested = self
            .nested("rope_parameters", "rope_theta")
            .map(|v| number("rope_parameters.rope_theta", v))
            .transpose()?;
        match (top, nested) {
            (Some(a), Some(b)) if a != b => Err(self.bad(
                "rope_theta",
                format!("{a} at the top level but {b} in rope_parameters"),
            )),
            (Some(theta), _) | (None, Some(theta)) => Ok(theta),
            (None, None) => Err(self.bad(
                "rope_theta",
                "missing (neither `rope_theta` nor `rope_parameters.rope_theta`)",
            )),
        }
    }

    /// The RoPE variant, from `rope_parameters` (transformers 5) or
    /// `rope_scaling` (transformers 4, `rope_type` or the older `type`):
    /// only the default is implemented.
    fn check_rope_type(&self) -> Result<()> {
        for outer in ["rope_parameters", "rope_scaling"] {
            let Some(params) = self.get(outer) else {
                continue;
            };
            if !params.is_object() {
                return Err(self.bad(outer, format!("must be an object, not {params}")));
            }
            for key in ["rope_type", "type"] {
                if let Some(kind) = self.nested(outer, key) {
                    if kind.as_str() != Some("default") {
                        return Err(self.bad(
                            &format!("{outer}.{key}"),
                            format!(
                                "RoPE {kind} is not implemented (only \"default\", unscaled RoPE)"
                            ),
                        ));
                    }
                }
            }
            if let Some(factor) = self.nested(outer, "partial_rotary_factor") {
                if factor.as_f64() != Some(1.0) {
                    return Err(self.bad(
                        &format!("{outer}.partial_rotary_factor"),
                        format!("partial rotary embeddings ({factor}) are not implemented"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn required_f64(&self, field: &str) -> Result<f64> {
        self.f64(field)?.ok_or_else(|| self.bad(field, "missing"))
    }

    /// A number whose absence means the config class's `default` and whose
    /// null means "off".
    fn f64_or_default(&self, field: &str, default: f64) -> Result<Option<f64>> {
        match self.fields.get(field) {
            None => Ok(Some(default)),
            Some(serde_json::Value::Null) => Ok(None),
            Some(_) => self.f64(field),
        }
    }

    /// The sliding window and which blocks use it, as each family's
    /// transformers classes decide.
    fn sliding(&self, family: Family, layers: usize) -> Result<(Option<usize>, Vec<bool>)> {
        // The config classes' defaults when the key is absent: Mistral,
        // Gemma 2 and Qwen2/3 4096 (Qwen only with use_sliding_window),
        // Phi-3 and Mixtral none; null means none.
        let class_default = match family {
            Family::Mistral | Family::Gemma2 | Family::Qwen2 | Family::Qwen3 => Some(4096),
            Family::Llama | Family::Phi3 | Family::Mixtral => None,
        };
        let mut window = match self.fields.get("sliding_window") {
            None => class_default,
            Some(serde_json::Value::Null) => None,
            Some(_) => self.usize("sliding_window")?,
        };
        if family == Family::Llama && window.is_some() {
            return Err(self.bad(
                "sliding_window",
                "Llama has no sliding window (is this a Mistral model?)",
            ));
        }
        if matches!(family, Family::Qwen2 | Family::Qwen3)
            && !self.bool("use_sliding_window")?.unwrap_or(false)
        {
            window = None;
        }
        let Some(window) = window else {
            return Ok((None, vec![false; layers]));
        };
        let from_types = match (family, self.get("layer_types")) {
            (Family::Gemma2 | Family::Qwen2 | Family::Qwen3, Some(types)) => {
                let types = types
                    .as_array()
                    .filter(|t| t.len() == layers)
                    .ok_or_else(|| {
                        self.bad(
                            "layer_types",
                            format!("must list the {layers} blocks' attention"),
                        )
                    })?;
                let windowed = types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(self.bad(
                            "layer_types",
                            format!("attention {t} is not implemented (only sliding_attention and full_attention)"),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(windowed)
            }
            _ => None,
        };
        let layers = match from_types {
            Some(layers) => layers,
            None => match family {
                // Gemma2Config: the even blocks are windowed.
                Family::Gemma2 => (0..layers).map(|i| i % 2 == 0).collect(),
                // Qwen2Config/Qwen3Config: blocks from max_window_layers on
                // (default 28).
                Family::Qwen2 | Family::Qwen3 => {
                    let from = self.usize("max_window_layers")?.unwrap_or(28);
                    (0..layers).map(|i| i >= from).collect()
                }
                _ => vec![true; layers],
            },
        };
        Ok((Some(window), layers))
    }

    /// Fields that change the math in ways this engine does not
    /// implement: refused unless absent or at their neutral value.
    fn check_unimplemented(&self, family: Family) -> Result<()> {
        // The config classes' defaults: silu (Gemma 2: gelu_pytorch_tanh,
        // under another key), no biases beyond Qwen2's.
        let (act_field, act_wanted) = match family {
            Family::Gemma2 => ("hidden_activation", "gelu_pytorch_tanh"),
            _ => ("hidden_act", "silu"),
        };
        if let Some(act) = self.string(act_field)? {
            if act != act_wanted {
                return Err(self.bad(
                    act_field,
                    format!(
                        "activation {act:?} is not implemented for {family} (only {act_wanted:?})"
                    ),
                ));
            }
        }
        if family != Family::Qwen2 && self.bool("attention_bias")? == Some(true) {
            return Err(self.bad(
                "attention_bias",
                format!("attention biases are not implemented for {family}"),
            ));
        }
        if self.bool("mlp_bias")? == Some(true) {
            return Err(self.bad("mlp_bias", "MLP biases are not implemented"));
        }
        if family != Family::Gemma2 {
            for field in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if let Some(v) = self.get(field) {
                    return Err(
                        self.bad(field, format!("{v}: soft-capping is not part of {family}"))
                    );
                }
            }
        }
        if self.bool("use_bidirectional_attention")? == Some(true) {
            return Err(self.bad(
                "use_bidirectional_attention",
                "bidirectional attention is not implemented",
            ));
        }
        if let Some(factor) = self.get("partial_rotary_factor") {
            if factor.as_f64() != Some(1.0) {
                return Err(self.bad(
                    "partial_rotary_factor",
                    format!("partial rotary embeddings ({factor}) are not implemented"),
                ));
            }
        }
        if let Some(tp) = self.usize("pretraining_tp")? {
            // Only a way of splitting the same matrices; the math is equal.
            tracing::debug!(pretraining_tp = tp, "ignored: it does not change the math");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
    use serde_json::json;

    use super::*;

    /// A small Llama config.json as transformers 5 writes it: RoPE only in
    /// `rope_parameters`.
    fn v5() -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "max_position_embeddings": 256,
            "vocab_size": 100,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "dtype": "float32",
            "eos_token_id": [2, 3],
        })
    }

    fn read(config: &serde_json::Value) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&config.to_string(), Path::new("/models/x/config.json"))
    }

    /// The field a refusal names, checking it also names the file.
    fn refused_field(config: &serde_json::Value) -> String {
        match read(config) {
            Err(e @ ShardError::BadConfig { .. }) => {
                assert!(e.to_string().contains("/models/x/config.json"), "{e}");
                let ShardError::BadConfig { field, .. } = e else {
                    unreachable!()
                };
                field
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn both_transformers_layouts_give_the_same_config() {
        let new = read(&v5()).unwrap();
        assert_eq!(new.rope_theta, 500000.0);
        assert_eq!(new.eos_token_ids, [2, 3]);
        let mut old = v5();
        let o = old.as_object_mut().unwrap();
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), json!(500000.0));
        o.insert("rope_scaling".into(), serde_json::Value::Null);
        o.insert("torch_dtype".into(), json!("float32"));
        assert_eq!(read(&old).unwrap(), new);
        // Both places, agreeing.
        let mut both = v5();
        both["rope_theta"] = json!(500000.0);
        assert_eq!(read(&both).unwrap(), new);
    }

    #[test]
    fn a_missing_math_field_is_named() {
        for field in [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
            "rms_norm_eps",
        ] {
            let mut config = v5();
            config.as_object_mut().unwrap().remove(field);
            assert_eq!(refused_field(&config), field);
        }
        let mut no_theta = v5();
        no_theta["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .remove("rope_theta");
        assert_eq!(refused_field(&no_theta), "rope_theta");
    }

    #[test]
    fn a_math_field_with_a_value_the_engine_does_not_implement_is_named() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                "rope_parameters",
                json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
                "rope_parameters.rope_type",
            ),
            (
                "rope_parameters",
                json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
                "rope_parameters.partial_rotary_factor",
            ),
            ("rope_parameters", json!("default"), "rope_parameters"),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": 2.0}),
                "rope_scaling.type",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0}),
                "rope_scaling.rope_type",
            ),
            ("rope_theta", json!(10000.0), "rope_theta"),
            ("rope_theta", json!("big"), "rope_theta"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("attention_bias", json!(true), "attention_bias"),
            ("mlp_bias", json!(true), "mlp_bias"),
            ("sliding_window", json!(4096), "sliding_window"),
            (
                "attn_logit_softcapping",
                json!(50.0),
                "attn_logit_softcapping",
            ),
            (
                "final_logit_softcapping",
                json!(30.0),
                "final_logit_softcapping",
            ),
            ("partial_rotary_factor", json!(0.5), "partial_rotary_factor"),
            ("rms_norm_eps", json!("tiny"), "rms_norm_eps"),
            ("num_key_value_heads", json!(3), "num_key_value_heads"),
            ("head_dim", json!(15), "head_dim"),
        ];
        for (field, value, named) in cases {
            let mut config = v5();
            config[field] = value.clone();
            assert_eq!(refused_field(&config), named, "{field} = {value}");
        }
        // Neutral values are accepted.
        let mut neutral = v5();
        neutral["sliding_window"] = serde_json::Value::Null;
        neutral["partial_rotary_factor"] = json!(1.0);
        neutral["rope_scaling"] = json!({"rope_type": "default"});
        assert!(read(&neutral).is_ok());
    }

    fn gguf(extra: &[(&str, Value)], without: &[&str]) -> Content {
        let mut metadata: HashMap<String, Value> = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(2)),
            ("llama.context_length", Value::U32(256)),
            ("llama.embedding_length", Value::U32(64)),
            ("llama.feed_forward_length", Value::U32(128)),
            ("llama.attention.head_count", Value::U32(4)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("llama.vocab_size", Value::U32(100)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for key in without {
            metadata.remove(*key);
        }
        for (k, v) in extra {
            metadata.insert((*k).to_owned(), v.clone());
        }
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    fn gguf_refused(content: &Content) -> String {
        match ModelConfig::from_gguf(content, Path::new("/models/x.gguf")) {
            Err(ShardError::BadConfig { field, path, .. }) => {
                assert_eq!(path, Path::new("/models/x.gguf"));
                field
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn gguf_math_fields_missing_or_unimplemented_are_named() {
        assert!(ModelConfig::from_gguf(&gguf(&[], &[]), Path::new("x.gguf")).is_ok());
        for key in [
            "llama.attention.layer_norm_rms_epsilon",
            "llama.context_length",
            "llama.embedding_length",
            "llama.attention.head_count",
            "llama.block_count",
            "llama.feed_forward_length",
        ] {
            assert_eq!(gguf_refused(&gguf(&[], &[key])), key);
        }
        let yarn = [("llama.rope.scaling.type", Value::String("yarn".into()))];
        assert_eq!(gguf_refused(&gguf(&yarn, &[])), "llama.rope.scaling.type");
        let linear = [("llama.rope.scale_linear", Value::F32(2.0))];
        assert_eq!(gguf_refused(&gguf(&linear, &[])), "llama.rope.scale_linear");
        let partial = [("llama.rope.dimension_count", Value::U32(8))];
        assert_eq!(
            gguf_refused(&gguf(&partial, &[])),
            "llama.rope.dimension_count"
        );
        let none = [("llama.rope.scaling.type", Value::String("none".into()))];
        assert!(ModelConfig::from_gguf(&gguf(&none, &[]), Path::new("x.gguf")).is_ok());
    }

    /// `v5()` as another family's config.json.
    fn family(model_type: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut config = v5();
        config["model_type"] = json!(model_type);
        config.as_object_mut().unwrap().remove("architectures");
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        config
    }

    fn gemma2() -> serde_json::Value {
        let mut config = family(
            "gemma2",
            json!({
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "hidden_activation": "gelu_pytorch_tanh",
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"],
                "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
            }),
        );
        config.as_object_mut().unwrap().remove("hidden_act");
        config
    }

    #[test]
    fn each_family_reads_what_decides_its_math() {
        let qwen2 = read(&family(
            "qwen2",
            json!({"use_sliding_window": false, "sliding_window": 4096}),
        ))
        .unwrap();
        assert_eq!(qwen2.family, Family::Qwen2);
        assert!(qwen2.qkv_bias && !qwen2.qk_norm);
        assert_eq!(qwen2.sliding_window, None);
        let windowed = read(&family(
            "qwen2",
            json!({"use_sliding_window": true, "sliding_window": 8, "max_window_layers": 1}),
        ))
        .unwrap();
        assert_eq!(windowed.sliding_window, Some(8));
        assert_eq!(windowed.sliding_layers, [false, true]);
        assert_eq!(windowed.window_of(0), None);
        assert_eq!(windowed.window_of(1), Some(8));

        let qwen3 = read(&family("qwen3", json!({"head_dim": 32}))).unwrap();
        assert!(qwen3.qk_norm && !qwen3.qkv_bias);
        assert_eq!(qwen3.head_dim, 32);
        assert!((qwen3.attention_scale - 1.0 / 32f64.sqrt()).abs() < 1e-12);

        let mistral = read(&family("mistral", json!({"sliding_window": 6}))).unwrap();
        assert_eq!(mistral.sliding_window, Some(6));
        assert_eq!(mistral.sliding_layers, [true, true]);
        // MistralConfig's default window when the key is absent; none when null.
        let mut absent = family("mistral", json!({}));
        absent.as_object_mut().unwrap().remove("sliding_window");
        assert_eq!(read(&absent).unwrap().sliding_window, Some(4096));
        let null = family("mistral", json!({"sliding_window": null}));
        assert_eq!(read(&null).unwrap().sliding_window, None);

        assert!(read(&family("phi3", json!({})))
            .unwrap()
            .family
            .fused_projections());

        let gemma = read(&gemma2()).unwrap();
        assert_eq!(gemma.activation, Activation::GeluTanh);
        assert_eq!(gemma.norm_weight_offset, 1.0);
        assert_eq!(gemma.embedding_scale, Some(8.0));
        assert_eq!(
            (gemma.attn_logit_softcap, gemma.final_logit_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(gemma.sliding_layers, [true, false]);
        assert!(gemma.tie_word_embeddings, "Gemma2Config ties by default");
        // Gemma2Config's defaults when absent; off when null.
        let mut defaults = gemma2();
        let o = defaults.as_object_mut().unwrap();
        o.remove("attn_logit_softcapping");
        o.remove("layer_types");
        o.insert("final_logit_softcapping".into(), serde_json::Value::Null);
        let defaults = read(&defaults).unwrap();
        assert_eq!(defaults.attn_logit_softcap, Some(50.0));
        assert_eq!(defaults.final_logit_softcap, None);
        assert_eq!(
            defaults.sliding_layers,
            [true, false],
            "even blocks windowed"
        );

        let mixtral = read(&family(
            "mixtral",
            json!({"num_local_experts": 4, "num_experts_per_tok": 2}),
        ))
        .unwrap();
        assert_eq!(
            mixtral.experts,
            Some(Experts {
                count: 4,
                per_token: 2
            })
        );
    }

    #[test]
    fn family_fields_missing_or_unimplemented_are_named() {
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (family("qwen3", json!({})), "head_dim"),
            (
                {
                    let mut c = gemma2();
                    c.as_object_mut().unwrap().remove("query_pre_attn_scalar");
                    c
                },
                "query_pre_attn_scalar",
            ),
            (
                {
                    let mut c = gemma2();
                    c["hidden_activation"] = json!("gelu");
                    c
                },
                "hidden_activation",
            ),
            (
                {
                    let mut c = gemma2();
                    c["layer_types"] = json!(["sliding_attention", "chunked_attention"]);
                    c
                },
                "layer_types",
            ),
            (
                {
                    let mut c = gemma2();
                    c["layer_types"] = json!(["full_attention"]);
                    c
                },
                "layer_types",
            ),
            (
                {
                    let mut c = gemma2();
                    c["use_bidirectional_attention"] = json!(true);
                    c
                },
                "use_bidirectional_attention",
            ),
            (
                family("qwen2", json!({"attn_logit_softcapping": 30.0})),
                "attn_logit_softcapping",
            ),
            (
                family("qwen3", json!({"head_dim": 32, "attention_bias": true})),
                "attention_bias",
            ),
            (
                family("mistral", json!({"sliding_window": 0})),
                "sliding_window",
            ),
            (
                family(
                    "mixtral",
                    json!({"num_local_experts": 8, "num_experts_per_tok": 9}),
                ),
                "num_experts_per_tok",
            ),
            (
                family("phi3", json!({"hidden_act": "gelu_new"})),
                "hidden_act",
            ),
        ];
        for (config, named) in cases {
            assert_eq!(refused_field(&config), named, "{config}");
        }
        match read(&family("falcon", json!({}))) {
            Err(ShardError::UnsupportedArchitecture { architecture, .. }) => {
                assert_eq!(architecture, "falcon")
            }
            other => panic!("falcon is not a family here: {other:?}"),
        }
    }

    /// A GGUF of another architecture: the llama keys renamed.
    fn gguf_arch(arch: &str, extra: &[(&str, Value)], without: &[&str]) -> Content {
        let mut content = gguf(&[], &[]);
        let metadata = std::mem::take(&mut content.metadata);
        content.metadata = metadata
            .into_iter()
            .map(|(k, v)| match k.strip_prefix("llama.") {
                Some(rest) => (format!("{arch}.{rest}"), v),
                None if k == "general.architecture" => (k, Value::String(arch.into())),
                None => (k, v),
            })
            .collect();
        for (k, v) in extra {
            content.metadata.insert((*k).to_owned(), v.clone());
        }
        for key in without {
            content.metadata.remove(*key);
        }
        content
    }

    #[test]
    fn gguf_families_read_what_decides_their_math() {
        let path = Path::new("x.gguf");
        let qwen2 = ModelConfig::from_gguf(&gguf_arch("qwen2", &[], &[]), path).unwrap();
        assert_eq!(
            (qwen2.family, qwen2.rope_layout, qwen2.qkv_bias),
            (Family::Qwen2, RopeLayout::Halves, true)
        );
        let qwen3 = ModelConfig::from_gguf(
            &gguf_arch(
                "qwen3",
                &[("qwen3.attention.key_length", Value::U32(32))],
                &[],
            ),
            path,
        )
        .unwrap();
        assert_eq!((qwen3.head_dim, qwen3.qk_norm), (32, true));
        let caps = [
            ("gemma2.attn_logit_softcapping", Value::F32(50.0)),
            ("gemma2.final_logit_softcapping", Value::F32(30.0)),
            ("gemma2.attention.sliding_window", Value::U32(4)),
        ];
        let gemma = ModelConfig::from_gguf(&gguf_arch("gemma2", &caps, &[]), path).unwrap();
        assert_eq!(gemma.norm_weight_offset, 0.0, "the converter stored w + 1");
        assert_eq!(gemma.sliding_layers, [true, false]);
        assert_eq!(gemma.attn_logit_softcap, Some(50.0));
        let experts = [
            ("llama.expert_count", Value::U32(8)),
            ("llama.expert_used_count", Value::U32(2)),
        ];
        let mixtral = ModelConfig::from_gguf(&gguf(&experts, &[]), path).unwrap();
        assert_eq!(
            (mixtral.family, mixtral.rope_layout),
            (Family::Mixtral, RopeLayout::Interleaved)
        );

        for missing in [
            "gemma2.attn_logit_softcapping",
            "gemma2.final_logit_softcapping",
            "gemma2.attention.sliding_window",
        ] {
            assert_eq!(
                gguf_refused(&gguf_arch("gemma2", &caps, &[missing])),
                missing
            );
        }
        assert_eq!(
            gguf_refused(&gguf(&[("llama.expert_count", Value::U32(8))], &[])),
            "llama.expert_used_count"
        );
        let uneven = [("qwen2.attention.value_length", Value::U32(8))];
        assert_eq!(
            gguf_refused(&gguf_arch("qwen2", &uneven, &[])),
            "qwen2.attention.value_length"
        );
        assert!(matches!(
            ModelConfig::from_gguf(&gguf_arch("falcon", &[], &[]), path),
            Err(ShardError::UnsupportedArchitecture { .. })
        ));
    }
}

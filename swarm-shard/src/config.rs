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
        // RoPE scaling (linear, yarn, ...) is not implemented: refuse it
        // rather than run with the wrong positions.
        if let Some(kind) = md.get("llama.rope.scaling.type") {
            let kind = kind
                .to_string()
                .map_err(|e| bad("llama.rope.scaling.type", e.to_string()))?;
            if kind != "none" {
                return Err(bad(
                    "llama.rope.scaling.type",
                    format!("RoPE scaling {kind:?} is not implemented (only unscaled RoPE)"),
                ));
            }
        }
        if let Some(factor) = get_f32("rope.scale_linear")? {
            if factor != 1.0 {
                return Err(bad(
                    "llama.rope.scale_linear",
                    format!("linear RoPE scaling ({factor}) is not implemented"),
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
            // llama.cpp requires the epsilon and the context length of a
            // llama model; so does this engine.
            rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| bad("llama.attention.layer_norm_rms_epsilon", "missing".into()))?,
            // llama.cpp's default base when a file gives none.
            rope_theta: get_f32("rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: required("context_length")?,
            vocab_size,
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            rope_layout: RopeLayout::Interleaved,
            bos_token_id: token_id("bos_token_id"),
            eos_token_ids: token_id("eos_token_id").into_iter().collect(),
        };
        config.validate(path)?;
        config.log(path, "GGUF");
        Ok(config)
    }

    /// Reads an HF `config.json` (LlamaForCausalLM and compatible), in the
    /// layout of transformers 4 (`rope_theta`, `rope_scaling`) or 5
    /// (`rope_parameters`). A field that changes the math must be present
    /// (or have a default that transformers' `LlamaConfig` documents,
    /// noted below) and have a value this engine implements; otherwise
    /// loading fails naming the field and the file.
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
        let is_llama =
            model_type.as_deref() == Some("llama") || architectures.contains(&"LlamaForCausalLM");
        if !is_llama {
            return Err(ShardError::UnsupportedArchitecture {
                path: path.to_owned(),
                architecture: architectures
                    .first()
                    .map(|a| a.to_string())
                    .or(model_type)
                    .unwrap_or_default(),
            });
        }
        hf.check_rope_type()?;
        let rope_theta = hf.rope_theta()?;
        hf.check_unimplemented()?;
        let hidden_size = hf.required_usize("hidden_size")?;
        let num_attention_heads = hf.required_usize("num_attention_heads")?;
        let config = Self {
            hidden_size,
            intermediate_size: hf.required_usize("intermediate_size")?,
            num_hidden_layers: hf.required_usize("num_hidden_layers")?,
            num_attention_heads,
            // LlamaConfig: "If it is not specified, will default to
            // `num_attention_heads`".
            num_key_value_heads: hf
                .usize("num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            // LlamaConfig: head_dim defaults to hidden_size // num_attention_heads.
            head_dim: hf
                .usize("head_dim")?
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
            rms_norm_eps: hf
                .f64("rms_norm_eps")?
                .ok_or_else(|| hf.bad("rms_norm_eps", "missing"))?,
            rope_theta,
            // LlamaConfig's default; it limits the context, not the math.
            max_position_embeddings: hf.usize("max_position_embeddings")?.unwrap_or(2048),
            vocab_size: hf.required_usize("vocab_size")?,
            // LlamaConfig's default.
            tie_word_embeddings: hf.bool("tie_word_embeddings")?.unwrap_or(false),
            rope_layout: RopeLayout::Halves,
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
        tracing::info!(
            file = %path.display(),
            format,
            family = "llama",
            rope = "default (no scaling)",
            rope_theta = self.rope_theta,
            rope_layout = ?self.rope_layout,
            rms_norm_eps = self.rms_norm_eps,
            norms = "RMSNorm before attention and MLP",
            heads = self.num_attention_heads,
            kv_heads = self.num_key_value_heads,
            head_dim = self.head_dim,
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

    /// Fields that change a Llama-like model's math in ways this engine
    /// does not implement: refused unless absent or at their neutral value.
    fn check_unimplemented(&self) -> Result<()> {
        // LlamaConfig's defaults: silu, no biases.
        if let Some(act) = self.string("hidden_act")? {
            if act != "silu" {
                return Err(self.bad(
                    "hidden_act",
                    format!("activation {act:?} is not implemented (only \"silu\")"),
                ));
            }
        }
        for field in ["attention_bias", "mlp_bias"] {
            if self.bool(field)? == Some(true) {
                return Err(self.bad(field, "biases are not implemented for Llama blocks"));
            }
        }
        for field in [
            "sliding_window",
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "partial_rotary_factor",
        ] {
            let neutral = match self.get(field) {
                None => true,
                Some(v) => field == "partial_rotary_factor" && v.as_f64() == Some(1.0),
            };
            if !neutral {
                return Err(self.bad(field, format!("{} is not implemented", self.fields[field])));
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

    fn read(config: &serde_json::Value) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_json(&config.to_string(), Path::new("/models/x/config.json"))
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
        match LlamaConfig::from_gguf(content, Path::new("/models/x.gguf")) {
            Err(ShardError::BadConfig { field, path, .. }) => {
                assert_eq!(path, Path::new("/models/x.gguf"));
                field
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn gguf_math_fields_missing_or_unimplemented_are_named() {
        assert!(LlamaConfig::from_gguf(&gguf(&[], &[]), Path::new("x.gguf")).is_ok());
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
        assert!(LlamaConfig::from_gguf(&gguf(&none, &[]), Path::new("x.gguf")).is_ok());
    }
}

//! Text to token ids and back, and chat templates.
//!
//! HF directories bring `tokenizer.json`. GGUF files carry their vocabulary,
//! merges and chat template as metadata; for GPT-2 style byte-level BPE
//! vocabularies (SmolLM2, GPT-2, StarCoder, ...) we rebuild the same
//! tokenizer from it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::error::{Result, ShardError};
use crate::weights::ModelFiles;

/// A tokenizer plus the model's chat template and special tokens.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    chat_template: Option<String>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    add_bos: bool,
}

/// One chat message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

fn tok_err(e: impl std::fmt::Display) -> ShardError {
    ShardError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// The tokenizer of a model: `tokenizer.json` for HF directories, rebuilt
    /// from metadata for GGUF files.
    pub fn from_model(files: &ModelFiles) -> Result<Self> {
        if let Some(metadata) = files.gguf_metadata() {
            return Self::from_gguf_metadata(metadata, files.path());
        }
        let Some(json_path) = files.tokenizer_json() else {
            return Err(tok_err("the model has no tokenizer"));
        };
        let inner = Tokenizer::from_file(&json_path)
            .map_err(|e| tok_err(format!("{}: {e}", json_path.display())))?;
        let config_path = files.path().join("tokenizer_config.json");
        let config: serde_json::Value = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null);
        let token_text = |key: &str| -> Option<String> {
            match config.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                other => other.get("content")?.as_str().map(str::to_owned),
            }
        };
        let special =
            |text: Option<String>| text.and_then(|t| inner.token_to_id(&t).map(|id| (id, t)));
        let bos = special(token_text("bos_token"));
        let eos = special(token_text("eos_token"));
        let add_bos = config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let chat_template = config
            .get("chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Ok(Self {
            inner,
            chat_template,
            bos,
            eos,
            add_bos,
        })
    }

    /// Rebuilds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let get = |key: &str| metadata.get(&format!("tokenizer.ggml.{key}"));
        let model = get("model")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| tok_err(format!("{} has no tokenizer.ggml.model", path.display())))?;
        if model != "gpt2" {
            return Err(tok_err(format!(
                "{}: GGUF tokenizer type {model:?} is not supported yet (byte-level BPE 'gpt2' is); use an HF directory with tokenizer.json",
                path.display()
            )));
        }
        let pre = get("pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre.as_str() {
            // SmolLM's tokenizer splits digits one by one before GPT-2's regex.
            "smollm" | "starcoder" | "refact" => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
            }),
            "" | "default" | "gpt2" | "gpt-2" => byte_level,
            other => {
                return Err(tok_err(format!(
                    "{}: GGUF pre-tokenizer {other:?} is not supported yet; use an HF directory with tokenizer.json",
                    path.display()
                )))
            }
        };
        let strings = |key: &str| -> Result<Vec<String>> {
            let values = get(key)
                .ok_or_else(|| tok_err(format!("{} has no tokenizer.ggml.{key}", path.display())))?
                .to_vec()
                .map_err(tok_err)?;
            values
                .iter()
                .map(|v| v.to_string().cloned().map_err(tok_err))
                .collect()
        };
        let tokens = strings("tokens")?;
        let merges = strings("merges")?;
        let types: Vec<i32> = match get("token_type") {
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|t| t.to_i32().map_err(tok_err))
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        // GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined,
        // 5 unused, 6 byte. Control and user-defined tokens are matched whole.
        let added_tokens: Vec<_> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types.get(i) == Some(&3)})
            })
            .collect();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let inner: Tokenizer = spec.to_string().parse().map_err(tok_err)?;
        let special = |key: &str| {
            get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())))
        };
        Ok(Self {
            inner,
            chat_template: get("chat_template")
                .or_else(|| metadata.get("tokenizer.chat_template"))
                .and_then(|v| v.to_string().ok())
                .cloned(),
            bos: special("bos_token_id"),
            eos: special("eos_token_id"),
            add_bos: get("add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The end-of-sequence token, if known.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(id, _)| *id)
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Tokenizes `text` exactly as given: no template, no BOS.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Renders `messages` with the model's chat template (ending with the
    /// assistant's turn) and tokenizes the result, adding BOS if the model
    /// asks for it. Models without a template get the text of the messages.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render_chat(messages)?;
        let mut ids = self.encode_raw(&text)?;
        if let (true, Some((bos, _))) = (self.add_bos, &self.bos) {
            if ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    /// The prompt text the chat template produces for `messages`.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Ok(messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"));
        };
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| ShardError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ShardError::ChatTemplate(e.to_string()))?;
        let token =
            |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => token(&self.bos),
            eos_token => token(&self.eos),
        })
        .map_err(|e| ShardError::ChatTemplate(e.to_string()))
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// A decoder that turns a stream of ids into text pieces as soon as they
    /// form whole characters.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Incremental detokenizer: see [`TextTokenizer::stream_decoder`].
///
/// Decodes only a short window of recent ids each step (as transformers'
/// streamer does), so a long generation costs O(n), not O(n^2).
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Start of the window that gives context to the next piece.
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        // A multi-byte character split over tokens decodes to U+FFFD until
        // its last byte arrives: hold it back until then.
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(piece) = now.get(before.len()..).map(str::to_owned) else {
            return Ok(None);
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(piece))
    }
}

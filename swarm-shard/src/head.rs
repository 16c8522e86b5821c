//! The client's part of the model: token embeddings, the final norm and the
//! LM head. A client holds these and the tokenizer; servers never do.

use candle_core::{Device, IndexOp, Tensor};

use crate::config::ModelConfig;
use crate::error::{Result, ShardError};
use crate::linear::Linear;
use crate::weights::{LoadedWeight, ModelFiles, WeightName, WeightPrecision};

/// Embedding table, final RMS norm and LM head (tied or separate), with
/// the family's embedding scale and final soft-cap.
#[derive(Debug, Clone)]
pub struct ClientHead {
    config: ModelConfig,
    embedding: Embedding,
    final_norm: Tensor,
    lm_head: Linear,
    device: Device,
    weight_bytes: usize,
    lm_head_bytes: usize,
}

#[derive(Debug, Clone)]
enum Embedding {
    /// Rows are dequantized on lookup, so the table stays small.
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

impl ClientHead {
    /// Loads the embeddings, final norm and LM head from `files`.
    pub fn load(files: &ModelFiles, device: &Device, precision: WeightPrecision) -> Result<Self> {
        let config = files.config().clone();
        if files.split_part().as_deref() == Some("blocks") {
            return Err(ShardError::BadSettings(format!(
                "{} is a span file of a split model, with no embeddings or LM head: a client runs from the head file",
                files.path().display()
            )));
        }
        let mut reader = files.reader(device, precision)?;
        let embedding_weight = reader.load(WeightName::Embedding)?;
        let final_norm = reader.load_vector(WeightName::FinalNorm)?;
        let final_norm = if config.norm_weight_offset == 0.0 {
            final_norm
        } else {
            (final_norm + config.norm_weight_offset)?
        };
        let mut weight_bytes = embedding_weight.size_in_bytes() + config.hidden_size * 4;
        let (lm_head, lm_head_bytes) = if files.has(WeightName::LmHead) {
            let head = reader.load(WeightName::LmHead)?;
            let bytes = head.size_in_bytes();
            weight_bytes += bytes;
            (head.into_linear()?, bytes)
        } else {
            let bytes = embedding_weight.size_in_bytes();
            (embedding_weight.clone().into_linear()?, bytes)
        };
        let embedding = match embedding_weight {
            LoadedWeight::Quantized(q) => Embedding::Quantized(q),
            LoadedWeight::Dense(t) => Embedding::Dense(t),
        };
        Ok(Self {
            config,
            embedding,
            final_norm,
            lm_head,
            device: device.clone(),
            weight_bytes,
            lm_head_bytes,
        })
    }

    /// Bytes of weights held (embedding table, final norm, separate LM head).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of the LM head, read in full for every generated token.
    pub fn lm_head_bytes(&self) -> usize {
        self.lm_head_bytes
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the head lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds token ids into hidden states, (1, ids.len(), hidden).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.config.vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ShardError::BadTokenId { id, vocab });
        }
        if ids.is_empty() {
            return Err(ShardError::BadSettings(
                "cannot embed an empty token list".into(),
            ));
        }
        let ids_tensor = Tensor::new(ids, &self.device)?;
        let rows = match &self.embedding {
            Embedding::Quantized(q) => q.embedding(&ids_tensor)?,
            Embedding::Dense(t) => t.embedding(&ids_tensor)?,
        };
        let rows = match self.config.embedding_scale {
            Some(scale) => (rows * scale)?,
            None => rows,
        };
        Ok(rows.unsqueeze(0)?)
    }

    /// Logits for the last position of `hidden` (1, seq, hidden): final norm,
    /// then the LM head. Returns a vocabulary-sized vector.
    pub fn logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let (_b, seq, _h) = hidden.dims3()?;
        let mut all = self.logits_from(hidden, seq.saturating_sub(1))?;
        all.pop()
            .ok_or_else(|| ShardError::BadSettings("no position to take logits of".into()))
    }

    /// Logits for each position of `hidden` (1, seq, hidden) from `from`
    /// on, in one pass of the LM head (a speculative step's check). Each
    /// row is what [`ClientHead::logits`] gives for that position alone.
    pub fn logits_from(&self, hidden: &Tensor, from: usize) -> Result<Vec<Vec<f32>>> {
        let (_b, seq, _h) = hidden.dims3()?;
        if from >= seq {
            return Err(ShardError::BadSettings(format!(
                "logits from position {from} of {seq}"
            )));
        }
        let rows = hidden.i((.., from.., ..))?.contiguous()?;
        let normed =
            candle_nn::ops::rms_norm(&rows, &self.final_norm, self.config.rms_norm_eps as f32)?;
        let logits = self.lm_head.forward(&normed)?; // (1, rows, vocab)
        let logits = match self.config.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        };
        Ok(logits.squeeze(0)?.to_vec2::<f32>()?)
    }
}

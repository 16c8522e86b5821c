//! Finding and reading model weights: GGUF files and HF safetensors
//! directories. Only the tensors that are asked for are read, so a server
//! hosting a few blocks never touches the rest of the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};

use swarm_core::BlockRange;

use crate::config::{Family, ModelConfig};
use crate::error::{candle_message, Result, ShardError};
use crate::linear::Linear;

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightPrecision {
    /// Keep the file's format: quantized GGUF tensors stay quantized (Q4_1
    /// takes 0.625 bytes a weight, about a sixth of f32), f16/bf16/f32
    /// tensors become f32 on CPU.
    #[default]
    Native,
    /// Dequantize everything to f32 at load. Uses much more memory; useful to
    /// check the quantized kernels against plain f32 math.
    F32,
}

/// The weights of one transformer block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockWeight {
    /// RMS norm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Query, key and value projections in one matrix (Phi-3).
    Qkv,
    /// Query bias (Qwen2).
    QBias,
    /// Key bias (Qwen2).
    KBias,
    /// Value bias (Qwen2).
    VBias,
    /// RMS norm of each query head (Qwen3).
    QNorm,
    /// RMS norm of each key head (Qwen3).
    KNorm,
    /// Attention output projection.
    O,
    /// RMS norm after attention, before the residual add (Gemma 2).
    PostAttnNorm,
    /// RMS norm before the MLP.
    FfnNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP gate and up projections in one matrix, gate first (Phi-3).
    GateUp,
    /// MLP down projection.
    Down,
    /// RMS norm after the MLP, before the residual add (Gemma 2).
    PostFfnNorm,
}

impl BlockWeight {
    /// The tensor's name in a block of a GGUF file written by llama.cpp's
    /// converter, after `blk.N.`.
    fn gguf_suffix(self) -> &'static str {
        match self {
            Self::AttnNorm => "attn_norm.weight",
            Self::Q => "attn_q.weight",
            Self::K => "attn_k.weight",
            Self::V => "attn_v.weight",
            Self::Qkv => "attn_qkv.weight",
            Self::QBias => "attn_q.bias",
            Self::KBias => "attn_k.bias",
            Self::VBias => "attn_v.bias",
            Self::QNorm => "attn_q_norm.weight",
            Self::KNorm => "attn_k_norm.weight",
            Self::O => "attn_output.weight",
            Self::PostAttnNorm => "post_attention_norm.weight",
            Self::FfnNorm => "ffn_norm.weight",
            Self::Gate => "ffn_gate.weight",
            // Phi-3's fused gate/up matrix keeps the up name.
            Self::Up | Self::GateUp => "ffn_up.weight",
            Self::Down => "ffn_down.weight",
            Self::PostFfnNorm => "post_ffw_norm.weight",
        }
    }

    /// The tensor's name in an HF checkpoint, after `model.layers.N.`.
    fn hf_suffix(self, family: Family) -> &'static str {
        match self {
            Self::AttnNorm => "input_layernorm.weight",
            Self::Q => "self_attn.q_proj.weight",
            Self::K => "self_attn.k_proj.weight",
            Self::V => "self_attn.v_proj.weight",
            Self::Qkv => "self_attn.qkv_proj.weight",
            Self::QBias => "self_attn.q_proj.bias",
            Self::KBias => "self_attn.k_proj.bias",
            Self::VBias => "self_attn.v_proj.bias",
            Self::QNorm => "self_attn.q_norm.weight",
            Self::KNorm => "self_attn.k_norm.weight",
            Self::O => "self_attn.o_proj.weight",
            // Gemma 2 names its norm after attention the way Llama names
            // its norm before the MLP.
            Self::PostAttnNorm => "post_attention_layernorm.weight",
            Self::FfnNorm if family == Family::Gemma2 => "pre_feedforward_layernorm.weight",
            Self::FfnNorm => "post_attention_layernorm.weight",
            Self::Gate => "mlp.gate_proj.weight",
            Self::Up => "mlp.up_proj.weight",
            Self::GateUp => "mlp.gate_up_proj.weight",
            Self::Down => "mlp.down_proj.weight",
            Self::PostFfnNorm => "post_feedforward_layernorm.weight",
        }
    }

    /// The (rows, columns) shape the config implies; norms and biases are
    /// vectors.
    fn expected_shape(self, cfg: &ModelConfig) -> Vec<usize> {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        match self {
            Self::AttnNorm | Self::FfnNorm | Self::PostAttnNorm | Self::PostFfnNorm => vec![h],
            Self::QNorm | Self::KNorm => vec![cfg.head_dim],
            Self::QBias => vec![q],
            Self::KBias | Self::VBias => vec![kv],
            Self::Q => vec![q, h],
            Self::K | Self::V => vec![kv, h],
            Self::Qkv => vec![q + 2 * kv, h],
            Self::O => vec![h, q],
            Self::Gate | Self::Up => vec![i, h],
            Self::GateUp => vec![2 * i, h],
            Self::Down => vec![h, i],
        }
    }
}

/// A tensor of the model, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightName {
    /// Token embedding table, (vocab, hidden).
    Embedding,
    /// Final RMS norm before the LM head.
    FinalNorm,
    /// LM head, (vocab, hidden); absent when tied to the embeddings.
    LmHead,
    /// A weight of block `0`.
    Block(usize, BlockWeight),
}

impl WeightName {
    fn expected_shape(self, cfg: &ModelConfig) -> Vec<usize> {
        match self {
            Self::Embedding | Self::LmHead => vec![cfg.vocab_size, cfg.hidden_size],
            Self::FinalNorm => vec![cfg.hidden_size],
            Self::Block(_, w) => w.expected_shape(cfg),
        }
    }

    fn file_name(self, format: FileFormat, family: Family) -> String {
        match (format, self) {
            (FileFormat::Gguf, Self::Embedding) => "token_embd.weight".into(),
            (FileFormat::Gguf, Self::FinalNorm) => "output_norm.weight".into(),
            (FileFormat::Gguf, Self::LmHead) => "output.weight".into(),
            (FileFormat::Gguf, Self::Block(i, w)) => format!("blk.{i}.{}", w.gguf_suffix()),
            (FileFormat::Safetensors, Self::Embedding) => "model.embed_tokens.weight".into(),
            (FileFormat::Safetensors, Self::FinalNorm) => "model.norm.weight".into(),
            (FileFormat::Safetensors, Self::LmHead) => "lm_head.weight".into(),
            (FileFormat::Safetensors, Self::Block(i, w)) => {
                format!("model.layers.{i}.{}", w.hf_suffix(family))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileFormat {
    Gguf,
    Safetensors,
}

/// A model on disk: a `.gguf` file or an HF directory (`config.json`,
/// `*.safetensors`, `tokenizer.json`). Opening reads only headers and
/// metadata.
#[derive(Debug)]
pub struct ModelFiles {
    path: PathBuf,
    config: ModelConfig,
    kind: FilesKind,
}

#[derive(Debug)]
enum FilesKind {
    Gguf(Box<gguf_file::Content>),
    Hf {
        safetensors: Vec<PathBuf>,
        /// Tensor name -> where it is.
        index: HashMap<String, SafetensorsEntry>,
    },
}

impl ModelFiles {
    /// Opens a `.gguf` file or an HF model directory and reads its config.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| ShardError::Io {
            path: path.to_owned(),
            source,
        })?;
        if meta.is_dir() {
            Self::open_hf_dir(path)
        } else {
            Self::open_gguf(path, meta.len())
        }
    }

    /// The file or directory this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// GGUF metadata, when the model is a GGUF file.
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &self.kind {
            FilesKind::Gguf(content) => Some(&content.metadata),
            FilesKind::Hf { .. } => None,
        }
    }

    /// `tokenizer.json` beside the weights, when the model is an HF directory.
    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        match &self.kind {
            FilesKind::Gguf(_) => None,
            FilesKind::Hf { .. } => Some(self.path.join("tokenizer.json")),
        }
    }

    fn open_gguf(path: &Path, file_len: u64) -> Result<Self> {
        let bad = |reason: String| ShardError::BadModelFile {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(|source| ShardError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(format!("not a readable GGUF file ({})", candle_message(&e))))?;
        // A truncated download is the most common broken file: find it now,
        // with a message that says so, instead of failing on some later read.
        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            let elems = info.shape.elem_count();
            if elems % dtype.block_size() != 0 {
                return Err(bad(format!(
                    "tensor {name:?} has {elems} elements, not a multiple of its {dtype:?} block size"
                )));
            }
            let bytes = (elems / dtype.block_size()) as u64 * dtype.type_size() as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_len {
                return Err(bad(format!(
                    "truncated: tensor {name:?} ends at byte {end} but the file has {file_len} bytes; download it again"
                )));
            }
        }
        let config = ModelConfig::from_gguf(&content, path)?;
        let files = Self {
            path: path.to_owned(),
            config,
            kind: FilesKind::Gguf(Box::new(content)),
        };
        Ok(files)
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let json = std::fs::read_to_string(&config_path).map_err(|source| ShardError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = ModelConfig::from_hf_json(&json, &config_path)?;
        let mut safetensors: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ShardError::Io {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "safetensors"))
            .collect();
        safetensors.sort();
        if safetensors.is_empty() {
            return Err(ShardError::BadModelFile {
                path: dir.to_owned(),
                reason: "no *.safetensors files in the directory".into(),
            });
        }
        let mut index = HashMap::new();
        for (file_index, file) in safetensors.iter().enumerate() {
            for (name, mut entry) in read_safetensors_header(file)? {
                entry.file = file_index;
                index.insert(name, entry);
            }
        }
        Ok(Self {
            path: dir.to_owned(),
            config,
            kind: FilesKind::Hf { safetensors, index },
        })
    }

    fn format(&self) -> FileFormat {
        match self.kind {
            FilesKind::Gguf(_) => FileFormat::Gguf,
            FilesKind::Hf { .. } => FileFormat::Safetensors,
        }
    }

    /// The tensor's name in this file.
    fn file_name(&self, name: WeightName) -> String {
        name.file_name(self.format(), self.config.family)
    }

    /// The GGUF header, when the model is a GGUF file.
    pub(crate) fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match &self.kind {
            FilesKind::Gguf(content) => Some(content),
            FilesKind::Hf { .. } => None,
        }
    }

    /// A metadata string of a GGUF file.
    pub(crate) fn gguf_string(&self, key: &str) -> Option<String> {
        self.gguf_metadata()?.get(key)?.to_string().ok().cloned()
    }

    /// `Some("head")` or `Some("blocks")` for a piece written by
    /// `split-model`; `None` for a whole model.
    pub fn split_part(&self) -> Option<String> {
        self.gguf_string(crate::split::keys::PART)
    }

    /// The original file a split piece was cut from: its name and SHA-256.
    pub fn split_source(&self) -> Option<(String, String)> {
        Some((
            self.gguf_string(crate::split::keys::SOURCE)?,
            self.gguf_string(crate::split::keys::SOURCE_SHA256)?,
        ))
    }

    /// The blocks whose weights this file holds: all of them, but for a
    /// span file only its span and for a head file none.
    pub fn held_blocks(&self) -> Result<Option<BlockRange>> {
        let all = self.config.num_hidden_layers as u32;
        let bad = |reason: String| ShardError::BadModelFile {
            path: self.path.clone(),
            reason,
        };
        match self.split_part().as_deref() {
            None => Ok(Some(BlockRange::full(all)?)),
            Some("head") => Ok(None),
            Some("blocks") => {
                let md = self
                    .gguf_metadata()
                    .ok_or_else(|| bad("no metadata".into()))?;
                let span = md
                    .get(crate::split::keys::BLOCKS)
                    .and_then(|v| v.to_vec().ok())
                    .and_then(|v| match v.as_slice() {
                        [a, b] => Some((a.to_u32().ok()?, b.to_u32().ok()?)),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        bad(format!(
                            "{} is not [start, end]",
                            crate::split::keys::BLOCKS
                        ))
                    })?;
                let range = BlockRange::new(span.0, span.1)
                    .map_err(|e| bad(format!("its span is not valid: {e}")))?;
                range
                    .check_within(all)
                    .map_err(|e| bad(format!("its span is not valid: {e}")))?;
                Ok(Some(range))
            }
            Some(other) => Err(bad(format!("unknown split part {other:?}"))),
        }
    }

    /// Checks that this file holds the weights of blocks `range`, saying
    /// which it holds when not.
    pub fn check_holds(&self, range: BlockRange) -> Result<()> {
        let held = self.held_blocks()?;
        let holds = held.is_some_and(|h| h.start() <= range.start() && range.end() <= h.end());
        if holds {
            return Ok(());
        }
        let what = match held {
            Some(h) => format!("a span file holding blocks {h} only"),
            None => "a head file, with no blocks".into(),
        };
        Err(ShardError::BadSettings(format!(
            "{} is {what}, not blocks {range}: use the span file that holds them, or the whole model",
            self.path.display()
        )))
    }

    /// Where the head's tensors (embeddings, final norm, LM head) lie,
    /// sorted by name.
    pub(crate) fn head_tensors(&self) -> Vec<RawTensor> {
        let Some(content) = self.gguf_content() else {
            return Vec::new();
        };
        let mut out: Vec<RawTensor> = content
            .tensor_infos
            .iter()
            .filter(|(name, _)| !name.starts_with("blk."))
            .map(|(name, info)| raw_gguf_tensor(&self.path, content, name, info))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Where each tensor of block `index` lies in the files, sorted by
    /// name: every tensor named `blk.N.*` (GGUF) or `model.layers.N.*`
    /// (HF), whatever the family.
    pub(crate) fn block_tensors(&self, index: usize) -> Vec<RawTensor> {
        let mut out: Vec<RawTensor> = match &self.kind {
            FilesKind::Gguf(content) => {
                let prefix = format!("blk.{index}.");
                content
                    .tensor_infos
                    .iter()
                    .filter(|(name, _)| name.starts_with(&prefix))
                    .map(|(name, info)| raw_gguf_tensor(&self.path, content, name, info))
                    .collect()
            }
            FilesKind::Hf {
                safetensors,
                index: entries,
            } => {
                let prefix = format!("model.layers.{index}.");
                entries
                    .iter()
                    .filter(|(name, _)| name.starts_with(&prefix))
                    .map(|(name, e)| RawTensor {
                        name: name.clone(),
                        dtype: e.dtype.clone(),
                        shape: e.shape.clone(),
                        path: safetensors[e.file].clone(),
                        start: e.start,
                        len: e.end - e.start,
                    })
                    .collect()
            }
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Bytes of memory the weights of blocks `range` take once loaded:
    /// quantized GGUF tensors as stored, everything else as f32 (f16 and
    /// bf16 are widened on load).
    pub fn span_memory(&self, range: BlockRange) -> u64 {
        range
            .iter()
            .flat_map(|b| self.block_tensors(b as usize))
            .map(|t| {
                let elems: usize = t.shape.iter().product();
                let dense = matches!(t.dtype.as_str(), "F32" | "F16" | "BF16")
                    || t.shape.len() == 1
                    || matches!(self.kind, FilesKind::Hf { .. });
                if dense {
                    elems as u64 * 4
                } else {
                    t.len
                }
            })
            .sum()
    }

    /// Whether the file has a tensor for this role.
    pub fn has(&self, name: WeightName) -> bool {
        let file_name = self.file_name(name);
        match &self.kind {
            FilesKind::Gguf(content) => content.tensor_infos.contains_key(&file_name),
            FilesKind::Hf { index, .. } => index.contains_key(&file_name),
        }
    }

    /// Starts reading tensors onto `device`.
    pub fn reader(&self, device: &Device, precision: WeightPrecision) -> Result<WeightReader<'_>> {
        let source = match &self.kind {
            FilesKind::Gguf(content) => {
                let file = File::open(&self.path).map_err(|source| ShardError::Io {
                    path: self.path.clone(),
                    source,
                })?;
                ReaderSource::Gguf {
                    content,
                    reader: BufReader::new(file),
                }
            }
            FilesKind::Hf { safetensors, index } => ReaderSource::Hf {
                files: safetensors,
                index,
            },
        };
        Ok(WeightReader {
            files: self,
            source,
            device: device.clone(),
            precision,
        })
    }
}

fn raw_gguf_tensor(
    path: &Path,
    content: &gguf_file::Content,
    name: &str,
    info: &gguf_file::TensorInfo,
) -> RawTensor {
    let dtype = info.ggml_dtype;
    let len = (info.shape.elem_count() / dtype.block_size()) as u64 * dtype.type_size() as u64;
    RawTensor {
        name: name.to_owned(),
        dtype: format!("{dtype:?}"),
        shape: info.shape.dims().to_vec(),
        path: path.to_owned(),
        start: content.tensor_data_offset + info.offset,
        len,
    }
}

/// A tensor's bytes as stored, and where.
#[derive(Debug, Clone)]
pub(crate) struct RawTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
}

impl RawTensor {
    /// Reads the tensor's bytes from its file a buffer at a time, handing
    /// each piece to `sink`.
    pub(crate) fn read_chunks(
        &self,
        buf: &mut [u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |source| ShardError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(self.start)).map_err(io)?;
        let mut left = self.len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n]).map_err(io)?;
            sink(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// Where a tensor of a safetensors checkpoint is.
#[derive(Debug, Clone)]
pub(crate) struct SafetensorsEntry {
    /// Index into the checkpoint's files.
    pub file: usize,
    pub shape: Vec<usize>,
    /// As the header spells it (`F16`, `BF16`, `F32`, ...).
    pub dtype: String,
    /// Byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// Reads the tensor entries of a safetensors file without mapping its data.
fn read_safetensors_header(path: &Path) -> Result<Vec<(String, SafetensorsEntry)>> {
    use std::io::Read;
    let io = |source| ShardError::Io {
        path: path.to_owned(),
        source,
    };
    let bad = |reason: String| ShardError::BadModelFile {
        path: path.to_owned(),
        reason,
    };
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad("shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    const MAX_HEADER: u64 = 100 * 1024 * 1024;
    if header_len > MAX_HEADER || header_len + 8 > file_len {
        return Err(bad(format!(
            "safetensors header claims {header_len} bytes in a {file_len}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let json: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut out = Vec::new();
    for (name, entry) in json {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {name:?} has no shape")))?;
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad(format!("tensor {name:?} has no dtype")))?
            .to_owned();
        let offsets: Vec<u64> = entry
            .get("data_offsets")
            .and_then(|o| serde_json::from_value(o.clone()).ok())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad(format!("tensor {name:?} has no valid data_offsets")))?;
        if offsets[1] > data_len {
            return Err(bad(format!(
                "truncated: tensor {name:?} ends at data byte {} but the file holds {data_len}; download it again",
                offsets[1]
            )));
        }
        out.push((
            name,
            SafetensorsEntry {
                file: 0,
                shape,
                dtype,
                start: data_start + offsets[0],
                end: data_start + offsets[1],
            },
        ));
    }
    Ok(out)
}

#[derive(Debug)]
enum ReaderSource<'a> {
    Gguf {
        content: &'a gguf_file::Content,
        reader: BufReader<File>,
    },
    Hf {
        files: &'a [PathBuf],
        index: &'a HashMap<String, SafetensorsEntry>,
    },
}

/// Reads individual tensors of a model; nothing else of the file is loaded.
#[derive(Debug)]
pub struct WeightReader<'a> {
    files: &'a ModelFiles,
    source: ReaderSource<'a>,
    device: Device,
    precision: WeightPrecision,
}

/// A weight as loaded: quantized, or a plain tensor.
#[derive(Debug, Clone)]
pub enum LoadedWeight {
    /// A GGUF tensor kept in its block-quantized format.
    Quantized(Arc<QTensor>),
    /// A dense tensor (f32 on CPU).
    Dense(Tensor),
}

impl LoadedWeight {
    /// Turns the weight into a matmul operand.
    pub fn into_linear(self) -> Result<Linear> {
        Ok(match self {
            LoadedWeight::Quantized(q) => Linear::from_qtensor(q)?,
            LoadedWeight::Dense(t) => Linear::dense(t),
        })
    }

    /// Bytes this weight occupies in memory.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            LoadedWeight::Quantized(q) => q.storage_size_in_bytes(),
            LoadedWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}

impl WeightReader<'_> {
    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Loads one tensor, checking its shape against the config.
    pub fn load(&mut self, name: WeightName) -> Result<LoadedWeight> {
        let expected = name.expected_shape(&self.files.config);
        let file_name = self.files.file_name(name);
        self.load_named(&file_name, &expected)
    }

    /// Loads the tensor `file_name`, which must have shape `expected`.
    fn load_named(&mut self, file_name: &str, expected: &[usize]) -> Result<LoadedWeight> {
        let path = self.files.path.clone();
        let weight = match &mut self.source {
            ReaderSource::Gguf { content, reader } => {
                if !content.tensor_infos.contains_key(file_name) {
                    return Err(ShardError::MissingTensor {
                        path,
                        name: file_name.to_owned(),
                    });
                }
                let qtensor = content
                    .tensor(reader, file_name, &self.device)
                    .map_err(|e| ShardError::BadModelFile {
                        path: path.clone(),
                        reason: format!("reading tensor {file_name:?}: {}", candle_message(&e)),
                    })?;
                let dense = self.precision == WeightPrecision::F32
                    || qtensor.shape().rank() == 1
                    || matches!(
                        qtensor.dtype(),
                        candle_core::quantized::GgmlDType::F32
                            | candle_core::quantized::GgmlDType::F16
                            | candle_core::quantized::GgmlDType::BF16
                    );
                if dense {
                    LoadedWeight::Dense(qtensor.dequantize(&self.device)?)
                } else {
                    LoadedWeight::Quantized(Arc::new(qtensor))
                }
            }
            ReaderSource::Hf { files, index } => {
                let Some(SafetensorsEntry {
                    file: file_index, ..
                }) = index.get(file_name)
                else {
                    return Err(ShardError::MissingTensor {
                        path,
                        name: file_name.to_owned(),
                    });
                };
                let file = &files[*file_index];
                let tensor = load_safetensors_tensor(file, file_name, &self.device)?;
                LoadedWeight::Dense(tensor.to_dtype(DType::F32)?)
            }
        };
        let actual = match &weight {
            LoadedWeight::Quantized(q) => q.shape().dims().to_vec(),
            LoadedWeight::Dense(t) => t.dims().to_vec(),
        };
        if actual != expected {
            return Err(ShardError::TensorShape {
                name: file_name.to_owned(),
                expected: expected.to_vec(),
                actual,
            });
        }
        Ok(weight)
    }

    /// Loads the experts of block `index`'s mixture: the router, then
    /// each expert's (gate, up, down) matrices. GGUF files stack the
    /// experts in 3-D tensors (`ffn_gate_exps`, ...); HF checkpoints hold
    /// one matrix per expert (`block_sparse_moe.experts.E.w1`, as Mixtral
    /// is published and as transformers 5 saves it).
    pub fn load_experts(&mut self, index: usize) -> Result<(LoadedWeight, Vec<ExpertWeights>)> {
        let cfg = &self.files.config;
        let Some(experts) = cfg.experts else {
            return Err(ShardError::BadSettings(format!(
                "block {index} of a {} model has no experts",
                cfg.family
            )));
        };
        let (n, h, i) = (experts.count, cfg.hidden_size, cfg.intermediate_size);
        let router_shape = [n, h];
        match self.files.format() {
            FileFormat::Gguf => {
                let router =
                    self.load_named(&format!("blk.{index}.ffn_gate_inp.weight"), &router_shape)?;
                let mut stacked =
                    |part: &str, rows: usize, cols: usize| -> Result<Vec<LoadedWeight>> {
                        let name = format!("blk.{index}.ffn_{part}_exps.weight");
                        let all = self.load_named(&name, &[n, rows, cols])?;
                        split_experts(all, n, (rows, cols), &self.device)
                    };
                let gates = stacked("gate", i, h)?;
                let ups = stacked("up", i, h)?;
                let downs = stacked("down", h, i)?;
                let experts = gates
                    .into_iter()
                    .zip(ups)
                    .zip(downs)
                    .map(|((gate, up), down)| ExpertWeights { gate, up, down })
                    .collect();
                Ok((router, experts))
            }
            FileFormat::Safetensors => {
                // transformers 5 stacks the experts in memory but saves
                // them as published, one matrix per expert.
                let router = self.load_named(
                    &format!("model.layers.{index}.block_sparse_moe.gate.weight"),
                    &router_shape,
                )?;
                let mut experts = Vec::with_capacity(n);
                for e in 0..n {
                    let name = |w: &str| {
                        format!("model.layers.{index}.block_sparse_moe.experts.{e}.{w}.weight")
                    };
                    experts.push(ExpertWeights {
                        gate: self.load_named(&name("w1"), &[i, h])?,
                        up: self.load_named(&name("w3"), &[i, h])?,
                        down: self.load_named(&name("w2"), &[h, i])?,
                    });
                }
                Ok((router, experts))
            }
        }
    }

    /// Loads a vector (norm weights) as an f32 tensor.
    pub fn load_vector(&mut self, name: WeightName) -> Result<Tensor> {
        match self.load(name)? {
            LoadedWeight::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            LoadedWeight::Quantized(q) => Ok(q.dequantize(&self.device)?),
        }
    }
}

/// One expert's matrices.
#[derive(Debug, Clone)]
pub struct ExpertWeights {
    /// (intermediate, hidden)
    pub gate: LoadedWeight,
    /// (intermediate, hidden)
    pub up: LoadedWeight,
    /// (hidden, intermediate)
    pub down: LoadedWeight,
}

/// Splits a (experts, rows, cols) tensor into one (rows, cols) weight per
/// expert. Quantized experts are whole rows of blocks, so their bytes split
/// evenly.
fn split_experts(
    all: LoadedWeight,
    experts: usize,
    (rows, cols): (usize, usize),
    device: &Device,
) -> Result<Vec<LoadedWeight>> {
    match all {
        LoadedWeight::Dense(t) => (0..experts)
            .map(|e| Ok(LoadedWeight::Dense(t.get(e)?.contiguous()?)))
            .collect(),
        LoadedWeight::Quantized(q) => {
            let dtype = q.dtype();
            let data = q.data()?;
            let per_expert = data.len() / experts;
            if per_expert * experts != data.len() {
                return Err(candle_core::Error::Msg(format!(
                    "{} bytes of experts do not split into {experts}",
                    data.len()
                ))
                .into());
            }
            (0..experts)
                .map(|e| {
                    let bytes = &data[e * per_expert..(e + 1) * per_expert];
                    let storage = candle_core::quantized::QStorage::from_data(
                        std::borrow::Cow::Borrowed(bytes),
                        device,
                        dtype,
                    )?;
                    Ok(LoadedWeight::Quantized(Arc::new(QTensor::new(
                        storage,
                        (rows, cols),
                    )?)))
                })
                .collect()
        }
    }
}

/// Maps one safetensors file and copies out a single tensor. The mapping is
/// dropped before returning, so untouched tensors never become resident.
fn load_safetensors_tensor(path: &Path, name: &str, device: &Device) -> Result<Tensor> {
    let bad = |reason: String| ShardError::BadModelFile {
        path: path.to_owned(),
        reason,
    };
    // SAFETY: the mapping lives only inside this function and the tensor is
    // copied out of it. A file modified while being read can give wrong
    // values, never unsound memory access beyond the map, as with any mmap
    // reader of model files.
    let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| bad(format!("cannot map safetensors: {}", candle_message(&e))))?;
    tensors
        .load(name, device)
        .map_err(|e| bad(format!("reading tensor {name:?}: {}", candle_message(&e))))
}

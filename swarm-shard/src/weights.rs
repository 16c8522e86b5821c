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

use crate::config::LlamaConfig;
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
pub enum BlockWeight {
    /// RMS norm before attention.
    AttnNorm,
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// RMS norm before the MLP.
    FfnNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl BlockWeight {
    /// All weights of a block.
    pub const ALL: [BlockWeight; 9] = [
        Self::AttnNorm,
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::FfnNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    fn gguf_suffix(self) -> &'static str {
        match self {
            Self::AttnNorm => "attn_norm",
            Self::Q => "attn_q",
            Self::K => "attn_k",
            Self::V => "attn_v",
            Self::O => "attn_output",
            Self::FfnNorm => "ffn_norm",
            Self::Gate => "ffn_gate",
            Self::Up => "ffn_up",
            Self::Down => "ffn_down",
        }
    }

    fn hf_suffix(self) -> &'static str {
        match self {
            Self::AttnNorm => "input_layernorm",
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::FfnNorm => "post_attention_layernorm",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// The (rows, columns) shape the config implies; norms are vectors.
    fn expected_shape(self, cfg: &LlamaConfig) -> Vec<usize> {
        let h = cfg.hidden_size;
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let i = cfg.intermediate_size;
        match self {
            Self::AttnNorm | Self::FfnNorm => vec![h],
            Self::Q => vec![q, h],
            Self::K | Self::V => vec![kv, h],
            Self::O => vec![h, q],
            Self::Gate | Self::Up => vec![i, h],
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
    fn expected_shape(self, cfg: &LlamaConfig) -> Vec<usize> {
        match self {
            Self::Embedding | Self::LmHead => vec![cfg.vocab_size, cfg.hidden_size],
            Self::FinalNorm => vec![cfg.hidden_size],
            Self::Block(_, w) => w.expected_shape(cfg),
        }
    }

    fn file_name(self, format: FileFormat) -> String {
        match (format, self) {
            (FileFormat::Gguf, Self::Embedding) => "token_embd.weight".into(),
            (FileFormat::Gguf, Self::FinalNorm) => "output_norm.weight".into(),
            (FileFormat::Gguf, Self::LmHead) => "output.weight".into(),
            (FileFormat::Gguf, Self::Block(i, w)) => format!("blk.{i}.{}.weight", w.gguf_suffix()),
            (FileFormat::Safetensors, Self::Embedding) => "model.embed_tokens.weight".into(),
            (FileFormat::Safetensors, Self::FinalNorm) => "model.norm.weight".into(),
            (FileFormat::Safetensors, Self::LmHead) => "lm_head.weight".into(),
            (FileFormat::Safetensors, Self::Block(i, w)) => {
                format!("model.layers.{i}.{}.weight", w.hf_suffix())
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
    config: LlamaConfig,
    kind: FilesKind,
}

#[derive(Debug)]
enum FilesKind {
    Gguf(Box<gguf_file::Content>),
    Hf {
        safetensors: Vec<PathBuf>,
        /// Tensor name -> (file index, shape).
        index: HashMap<String, (usize, Vec<usize>)>,
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
    pub fn config(&self) -> &LlamaConfig {
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
        let config = LlamaConfig::from_gguf(&content, path)?;
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
        let config = LlamaConfig::from_hf_json(&json, &config_path)?;
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
            for (name, shape) in read_safetensors_header(file)? {
                index.insert(name, (file_index, shape));
            }
        }
        Ok(Self {
            path: dir.to_owned(),
            config,
            kind: FilesKind::Hf { safetensors, index },
        })
    }

    /// Whether the file has a tensor for this role.
    pub fn has(&self, name: WeightName) -> bool {
        match &self.kind {
            FilesKind::Gguf(content) => content
                .tensor_infos
                .contains_key(&name.file_name(FileFormat::Gguf)),
            FilesKind::Hf { index, .. } => {
                index.contains_key(&name.file_name(FileFormat::Safetensors))
            }
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

/// Reads the tensor names and shapes of a safetensors file without mapping its data.
fn read_safetensors_header(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
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
    let data_len = file_len - 8 - header_len;
    let mut out = Vec::new();
    for (name, entry) in json {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad(format!("tensor {name:?} has no shape")))?;
        let end = entry
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|o| o.as_u64())
            .ok_or_else(|| bad(format!("tensor {name:?} has no data_offsets")))?;
        if end > data_len {
            return Err(bad(format!(
                "truncated: tensor {name:?} ends at data byte {end} but the file holds {data_len}; download it again"
            )));
        }
        out.push((name, shape));
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
        index: &'a HashMap<String, (usize, Vec<usize>)>,
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
        let path = self.files.path.clone();
        let (file_name, weight) = match &mut self.source {
            ReaderSource::Gguf { content, reader } => {
                let file_name = name.file_name(FileFormat::Gguf);
                if !content.tensor_infos.contains_key(&file_name) {
                    return Err(ShardError::MissingTensor {
                        path,
                        name: file_name,
                    });
                }
                let qtensor = content
                    .tensor(reader, &file_name, &self.device)
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
                let weight = if dense {
                    LoadedWeight::Dense(qtensor.dequantize(&self.device)?)
                } else {
                    LoadedWeight::Quantized(Arc::new(qtensor))
                };
                (file_name, weight)
            }
            ReaderSource::Hf { files, index } => {
                let file_name = name.file_name(FileFormat::Safetensors);
                let Some((file_index, _)) = index.get(&file_name) else {
                    return Err(ShardError::MissingTensor {
                        path,
                        name: file_name,
                    });
                };
                let file = &files[*file_index];
                let tensor = load_safetensors_tensor(file, &file_name, &self.device)?;
                (file_name, LoadedWeight::Dense(tensor.to_dtype(DType::F32)?))
            }
        };
        let actual = match &weight {
            LoadedWeight::Quantized(q) => q.shape().dims().to_vec(),
            LoadedWeight::Dense(t) => t.dims().to_vec(),
        };
        if actual != expected {
            return Err(ShardError::TensorShape {
                name: file_name,
                expected,
                actual,
            });
        }
        Ok(weight)
    }

    /// Loads a vector (norm weights) as an f32 tensor.
    pub fn load_vector(&mut self, name: WeightName) -> Result<Tensor> {
        match self.load(name)? {
            LoadedWeight::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            LoadedWeight::Quantized(q) => Ok(q.dequantize(&self.device)?),
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

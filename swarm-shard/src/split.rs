//! Cutting a GGUF model into a head file and span files, so nobody needs
//! the whole file: a client runs from the head (embeddings, final norm, LM
//! head, tokenizer, chat template and the manifest of block digests), a
//! server from the span file of the blocks it hosts.
//!
//! Every piece is an ordinary GGUF file holding the original metadata and
//! its tensors byte for byte, so block digests are the original's, plus:
//! - `sherpa.split.part`: `"head"` or `"blocks"`;
//! - `sherpa.split.blocks`: `[start, end)` of a span file;
//! - `sherpa.split.source`: the original file's name;
//! - `sherpa.split.source_sha256`: the original file's SHA-256;
//! - `sherpa.manifest.blocks`: the digest of every block of the model;
//! - `sherpa.manifest.head`: the digest of the head's tensors;
//! - `sherpa.tie_word_embeddings`: whether the LM head is the embeddings
//!   (a span file has neither, so it cannot tell from its tensors).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use sha2::{Digest, Sha256};
use swarm_core::BlockRange;

use crate::digest::{BlockDigest, Manifest};
use crate::error::{Result, ShardError};
use crate::weights::{ModelFiles, RawTensor};

/// Metadata keys the pieces carry.
pub mod keys {
    /// `"head"` or `"blocks"`.
    pub const PART: &str = "sherpa.split.part";
    /// `[start, end)` of a span file's blocks.
    pub const BLOCKS: &str = "sherpa.split.blocks";
    /// The original file's name.
    pub const SOURCE: &str = "sherpa.split.source";
    /// The original file's SHA-256, hex.
    pub const SOURCE_SHA256: &str = "sherpa.split.source_sha256";
    /// Every block's digest, hex, in order.
    pub const MANIFEST: &str = "sherpa.manifest.blocks";
    /// The digest of the head's tensors (embeddings, final norm, LM head).
    pub const HEAD_DIGEST: &str = "sherpa.manifest.head";
    /// Whether the LM head is the embedding table.
    pub const TIED: &str = "sherpa.tie_word_embeddings";
}

/// What [`split_model`] wrote.
#[derive(Debug, Clone)]
pub struct SplitOutput {
    /// The head file and its size in bytes.
    pub head: (PathBuf, u64),
    /// Each span file, its blocks and its size in bytes.
    pub spans: Vec<(BlockRange, PathBuf, u64)>,
    /// The digests of every block.
    pub manifest: Manifest,
    /// The original file's SHA-256, hex.
    pub source_sha256: String,
}

/// Splits the GGUF model `files` into `out_dir`: `NAME.head.gguf` and one
/// `NAME.blocks-A-B.gguf` per span in `spans` (which must cover the model's
/// blocks in order, without overlap). Tensors are copied byte for byte,
/// one at a time, so memory stays small whatever the model's size.
/// `progress` hears each file as it is written.
pub fn split_model(
    files: &ModelFiles,
    out_dir: &Path,
    spans: &[BlockRange],
    progress: &mut dyn FnMut(&Path),
) -> Result<SplitOutput> {
    let Some(content) = files.gguf_content() else {
        return Err(ShardError::BadSettings(format!(
            "{} is not a GGUF file: split-model cuts GGUF files (convert an HF checkpoint with llama.cpp's convert_hf_to_gguf.py first)",
            files.path().display()
        )));
    };
    if files.split_part().is_some() {
        return Err(ShardError::BadSettings(format!(
            "{} is already a piece of a split model",
            files.path().display()
        )));
    }
    let blocks = files.config().num_hidden_layers as u32;
    let mut next = 0;
    for span in spans {
        if span.start() != next {
            return Err(ShardError::BadSettings(format!(
                "spans must cover blocks 0..{blocks} in order: expected one starting at {next}, got {span}"
            )));
        }
        next = span.end();
    }
    if next != blocks || spans.is_empty() {
        return Err(ShardError::BadSettings(format!(
            "spans must cover blocks 0..{blocks}; they end at {next}"
        )));
    }
    std::fs::create_dir_all(out_dir).map_err(|source| ShardError::Io {
        path: out_dir.to_owned(),
        source,
    })?;
    let source_sha256 = sha256_hex(files.path())?;
    let manifest = files.manifest()?;
    let name = files
        .path()
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let source_name = files
        .path()
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut common: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("sherpa."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    common.sort_by(|a, b| a.0.cmp(&b.0));
    common.push((keys::SOURCE.into(), Value::String(source_name)));
    common.push((
        keys::SOURCE_SHA256.into(),
        Value::String(source_sha256.clone()),
    ));
    common.push((
        keys::MANIFEST.into(),
        Value::Array(
            manifest
                .blocks
                .iter()
                .map(|d| Value::String(d.to_string()))
                .collect(),
        ),
    ));
    common.push((
        keys::HEAD_DIGEST.into(),
        Value::String(crate::digest::digest_tensors(&files.head_tensors())?.to_string()),
    ));
    common.push((
        keys::TIED.into(),
        Value::Bool(files.config().tie_word_embeddings),
    ));
    let alignment = match content.metadata.get("general.alignment") {
        Some(v) => v.to_u32().unwrap_or(32) as u64,
        None => 32,
    };

    let head_path = out_dir.join(format!("{name}.head.gguf"));
    let mut head_meta = common.clone();
    head_meta.push((keys::PART.into(), Value::String("head".into())));
    let head_tensors = files.head_tensors();
    let head_bytes = write_piece(&head_path, &head_meta, &head_tensors, alignment)?;
    progress(&head_path);

    let mut written = Vec::with_capacity(spans.len());
    for span in spans {
        let path = out_dir.join(format!(
            "{name}.blocks-{}-{}.gguf",
            span.start(),
            span.end()
        ));
        // Servers never tokenize: a span file keeps only the token ids
        // (the vocabulary can be megabytes) and says the vocabulary's size.
        let mut meta: Vec<(String, Value)> = common
            .iter()
            .filter(|(k, _)| !k.starts_with("tokenizer.") || k.ends_with("_token_id"))
            .cloned()
            .collect();
        let arch = files
            .gguf_string("general.architecture")
            .unwrap_or_default();
        let vocab_key = format!("{arch}.vocab_size");
        meta.retain(|(k, _)| *k != vocab_key);
        meta.push((vocab_key, Value::U32(files.config().vocab_size as u32)));
        meta.push((keys::PART.into(), Value::String("blocks".into())));
        meta.push((
            keys::BLOCKS.into(),
            Value::Array(vec![Value::U32(span.start()), Value::U32(span.end())]),
        ));
        let tensors: Vec<RawTensor> = span
            .iter()
            .flat_map(|b| files.block_tensors(b as usize))
            .collect();
        let bytes = write_piece(&path, &meta, &tensors, alignment)?;
        progress(&path);
        written.push((*span, path, bytes));
    }
    Ok(SplitOutput {
        head: (head_path, head_bytes),
        spans: written,
        manifest,
        source_sha256,
    })
}

/// Writes a GGUF v3 file with `metadata` and the raw bytes of `tensors`,
/// to a temporary name renamed into place when complete.
fn write_piece(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[RawTensor],
    alignment: u64,
) -> Result<u64> {
    let entries: Vec<TensorEntry> = tensors
        .iter()
        .map(|t| TensorEntry {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            len: t.len,
        })
        .collect();
    let mut buf = vec![0u8; 1 << 20];
    write_gguf(path, metadata, &entries, alignment, &mut |i, w| {
        tensors[i].read_chunks(&mut buf, &mut |bytes| {
            w.write_all(bytes).map_err(|source| ShardError::Io {
                path: path.to_owned(),
                source,
            })
        })
    })
}

/// A tensor to write: its name, type (as [`GgmlDType`]'s `Debug` spells
/// it), shape (rows last, as candle has it) and byte length.
#[derive(Debug, Clone)]
pub(crate) struct TensorEntry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub len: u64,
}

/// Writes a GGUF v3 file: `metadata`, then `tensors` whose bytes `data`
/// writes one at a time (exactly `len` bytes each), to a temporary name
/// renamed into place when complete. Returns the file's size.
pub(crate) fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
    alignment: u64,
    data: &mut dyn FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<u64> {
    let tmp = path.with_extension("gguf.partial");
    let io = |source| ShardError::Io {
        path: tmp.clone(),
        source,
    };
    let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(io)?);
    let mut header = Vec::new();
    header.extend_from_slice(&0x4655_4747u32.to_le_bytes()); // "GGUF"
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_str(&mut header, key);
        write_value(&mut header, value)?;
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        write_str(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            header.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        header.extend_from_slice(&ggml_type_id(&t.dtype)?.to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.len).div_ceil(alignment) * alignment;
    }
    let data_start = (header.len() as u64).div_ceil(alignment) * alignment;
    header.resize(data_start as usize, 0);
    w.write_all(&header).map_err(io)?;
    let mut position = 0u64;
    for (i, (t, at)) in tensors.iter().zip(offsets).enumerate() {
        if at > position {
            w.write_all(&vec![0u8; (at - position) as usize])
                .map_err(io)?;
            position = at;
        }
        let mut counted = CountingWriter {
            inner: &mut w,
            written: 0,
        };
        data(i, &mut counted)?;
        if counted.written != t.len {
            return Err(ShardError::BadSettings(format!(
                "tensor {} got {} bytes, not {}",
                t.name, counted.written, t.len
            )));
        }
        position += t.len;
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    let bytes = file.metadata().map_err(io)?.len();
    drop(file);
    std::fs::rename(&tmp, path).map_err(|source| ShardError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(bytes)
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The GGUF type id of a value (the format's specification).
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    out.extend_from_slice(&value_type_id(v).to_le_bytes());
    write_payload(out, v)
}

fn write_payload(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            // An empty array's element type does not matter.
            let elem = items.first().map_or(4, value_type_id);
            if items.iter().any(|i| value_type_id(i) != elem) {
                return Err(ShardError::BadSettings(
                    "a GGUF array mixes value types".into(),
                ));
            }
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_payload(out, item)?;
            }
        }
    }
    Ok(())
}

/// The ggml type id of a tensor type as [`RawTensor`] names it (the GGUF
/// specification's numbering).
fn ggml_type_id(dtype: &str) -> Result<u32> {
    let all = [
        (GgmlDType::F32, 0),
        (GgmlDType::F16, 1),
        (GgmlDType::Q4_0, 2),
        (GgmlDType::Q4_1, 3),
        (GgmlDType::Q5_0, 6),
        (GgmlDType::Q5_1, 7),
        (GgmlDType::Q8_0, 8),
        (GgmlDType::Q8_1, 9),
        (GgmlDType::Q2K, 10),
        (GgmlDType::Q3K, 11),
        (GgmlDType::Q4K, 12),
        (GgmlDType::Q5K, 13),
        (GgmlDType::Q6K, 14),
        (GgmlDType::Q8K, 15),
        (GgmlDType::BF16, 30),
    ];
    all.iter()
        .find(|(t, _)| format!("{t:?}") == dtype)
        .map(|(_, id)| *id)
        .ok_or_else(|| ShardError::BadSettings(format!("tensor type {dtype} cannot be written")))
}

fn sha256_hex(path: &Path) -> Result<String> {
    let io = |source| ShardError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(BlockDigest(h.finalize().into()).to_string())
}

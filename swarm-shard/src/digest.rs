//! Weight identity: a digest of each block's tensors, and a manifest of
//! them all that names a model by its content.
//!
//! A block's digest covers every tensor of the block as the file stores
//! it: names, types, shapes and bytes. Another quantization, another
//! fine-tune or a corrupted file gives other digests; the same file, or a
//! span cut out of it with the same tensors, gives the same ones.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, ShardError};
use crate::weights::{ModelFiles, RawTensor};

/// The SHA-256 digest of one block's tensors.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockDigest(pub [u8; 32]);

impl BlockDigest {
    /// The first `n` hex digits, for messages.
    pub fn short(&self) -> String {
        let mut hex = self.to_string();
        hex.truncate(12);
        hex
    }
}

impl fmt::Display for BlockDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlockDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockDigest({})", self.short())
    }
}

impl std::str::FromStr for BlockDigest {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.len() != 64 || !s.is_ascii() {
            return Err(format!("a block digest is 64 hex digits, not {s:?}"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("{s:?} is not hex"))?;
        }
        Ok(Self(out))
    }
}

/// The digests of every block of a model, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// One digest per block.
    pub blocks: Vec<BlockDigest>,
}

impl Manifest {
    /// The digest of the whole manifest: what names the model's blocks.
    pub fn digest(&self) -> BlockDigest {
        let mut h = Sha256::new();
        h.update(b"sherpa-manifest-v1\0");
        h.update((self.blocks.len() as u64).to_le_bytes());
        for b in &self.blocks {
            h.update(b.0);
        }
        BlockDigest(h.finalize().into())
    }

    /// The blocks from `start` on whose `actual` digests differ from this
    /// manifest's, as (block, expected, actual); the expected digest is
    /// `None` past the manifest's end.
    pub fn differences<'a>(
        &'a self,
        start: usize,
        actual: &'a [BlockDigest],
    ) -> impl Iterator<Item = (usize, Option<BlockDigest>, BlockDigest)> + 'a {
        actual.iter().enumerate().filter_map(move |(offset, got)| {
            let block = start + offset;
            match self.blocks.get(block) {
                Some(want) if want == got => None,
                want => Some((block, want.copied(), *got)),
            }
        })
    }
}

impl ModelFiles {
    /// The digest of block `index`'s tensors, reading their bytes from the
    /// file (a server hosting the block reads them anyway).
    pub fn block_digest(&self, index: usize) -> Result<BlockDigest> {
        let blocks = self.config().num_hidden_layers;
        if index >= blocks {
            return Err(ShardError::BadSettings(format!(
                "block {index} is past the model's {blocks} blocks"
            )));
        }
        let tensors = self.block_tensors(index);
        if tensors.is_empty() {
            return Err(ShardError::BadModelFile {
                path: self.path().to_owned(),
                reason: format!("no tensors for block {index}"),
            });
        }
        digest_tensors(&tensors)
    }

    /// The digests of blocks `start..end`.
    pub fn block_digests(&self, start: usize, end: usize) -> Result<Vec<BlockDigest>> {
        (start..end).map(|i| self.block_digest(i)).collect()
    }

    /// The manifest of every block. A piece written by `split-model`
    /// carries it (and the blocks a span file holds are checked against
    /// it, so a corrupted piece is found here); for a whole model it is
    /// computed, reading every block once.
    pub fn manifest(&self) -> Result<Manifest> {
        let blocks = self.config().num_hidden_layers;
        let Some(stored) = self.stored_manifest()? else {
            return Ok(Manifest {
                blocks: self.block_digests(0, blocks)?,
            });
        };
        if self.split_part().as_deref() == Some("head") {
            self.check_head()?;
        }
        if let Some(held) = self.held_blocks()? {
            let (start, end) = (held.start() as usize, held.end() as usize);
            let actual = self.block_digests(start, end)?;
            let first = stored.differences(start, &actual).next();
            if let Some((block, want, got)) = first {
                return Err(ShardError::BadModelFile {
                    path: self.path().to_owned(),
                    reason: format!(
                        "block {block}'s weights (digest {}) are not the ones its manifest names ({}): the file is corrupted or was altered; split the model again",
                        got.short(),
                        want.map_or_else(|| "none".into(), |w| w.short())
                    ),
                });
            }
        }
        Ok(stored)
    }

    /// Checks a head file's tensors against the digest it carries.
    fn check_head(&self) -> Result<()> {
        let key = crate::split::keys::HEAD_DIGEST;
        let bad = |reason: String| ShardError::BadModelFile {
            path: self.path().to_owned(),
            reason,
        };
        let stored: BlockDigest = self
            .gguf_string(key)
            .ok_or_else(|| bad(format!("{key} is missing")))?
            .parse()
            .map_err(|e| bad(format!("{key}: {e}")))?;
        let actual = digest_tensors(&self.head_tensors())?;
        if actual != stored {
            return Err(bad(format!(
                "its embeddings or LM head (digest {}) are not the ones it was split with ({}): the file is corrupted or was altered; split the model again",
                actual.short(),
                stored.short()
            )));
        }
        Ok(())
    }

    /// The manifest a split piece carries.
    fn stored_manifest(&self) -> Result<Option<Manifest>> {
        let Some(value) = self
            .gguf_metadata()
            .and_then(|md| md.get(crate::split::keys::MANIFEST))
        else {
            return Ok(None);
        };
        let bad = |reason: String| ShardError::BadModelFile {
            path: self.path().to_owned(),
            reason: format!("{}: {reason}", crate::split::keys::MANIFEST),
        };
        let items = value.to_vec().map_err(|e| bad(e.to_string()))?;
        let blocks = items
            .iter()
            .map(|v| {
                v.to_string()
                    .map_err(|e| bad(e.to_string()))
                    .and_then(|s| s.parse::<BlockDigest>().map_err(bad))
            })
            .collect::<Result<Vec<_>>>()?;
        if blocks.len() != self.config().num_hidden_layers {
            return Err(bad(format!(
                "{} digests for {} blocks",
                blocks.len(),
                self.config().num_hidden_layers
            )));
        }
        Ok(Some(Manifest { blocks }))
    }
}

pub(crate) fn digest_tensors(tensors: &[RawTensor]) -> Result<BlockDigest> {
    let mut h = Sha256::new();
    h.update(b"sherpa-block-v1\0");
    let mut buf = vec![0u8; 1 << 20];
    for t in tensors {
        let framed = |h: &mut Sha256, bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        framed(&mut h, t.name.as_bytes());
        framed(&mut h, t.dtype.as_bytes());
        h.update((t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update(t.len.to_le_bytes());
        t.read_chunks(&mut buf, &mut |bytes| {
            h.update(bytes);
            Ok(())
        })?;
    }
    Ok(BlockDigest(h.finalize().into()))
}

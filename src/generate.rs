//! Distributed generation on the client: the embeddings, any blocks the
//! client runs itself and the LM head here, every other block through an
//! [`InferenceSession`] (which survives server failures).

use std::sync::Arc;

use swarm_core::BlockRange;
use swarm_dht::InferenceSession;
use swarm_shard::{
    BlockShard, CacheBudget, ClientHead, DType, GenerateOptions, GenerationOutput, Generator,
    SessionCache, ShardError, Tensor,
};

use crate::SherpaError;

/// Blocks the client runs itself before the remote ones (`local_blocks`).
#[derive(Debug)]
pub struct LocalBlocks {
    shard: Arc<BlockShard>,
    cache: SessionCache,
}

impl LocalBlocks {
    /// A session over `shard` with room for `max_length` positions.
    pub fn new(shard: Arc<BlockShard>, max_length: usize) -> Result<Self, SherpaError> {
        let cache = shard.new_session(max_length, &CacheBudget::unlimited())?;
        Ok(Self { shard, cache })
    }

    /// The blocks run locally.
    pub fn range(&self) -> BlockRange {
        self.shard.range()
    }
}

/// [`InferenceSession::step`] on a tensor of shape (1, positions, hidden),
/// on the device of `x`.
pub async fn forward(session: &mut InferenceSession, x: &Tensor) -> Result<Tensor, SherpaError> {
    let (_, n, hidden) = x.dims3().map_err(ShardError::from)?;
    let values = x
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(ShardError::from)?;
    let out = session.step(&values).await?;
    Ok(Tensor::from_vec(out, (1, n, hidden), x.device()).map_err(ShardError::from)?)
}

/// Generates from `prompt` ids: embeddings, `local` blocks and the LM head
/// here, the remaining blocks through `session`. `on_token` sees each new
/// id as it is chosen and may return `false` to stop.
pub async fn generate(
    head: &ClientHead,
    mut local: Option<&mut LocalBlocks>,
    session: &mut InferenceSession,
    prompt: &[u32],
    options: &GenerateOptions,
    on_token: &mut (dyn FnMut(u32) -> Result<bool, ShardError> + Send),
) -> Result<GenerationOutput, SherpaError> {
    let mut generator = Generator::new(head, prompt, options)?;
    while let Some(x) = generator.pending()? {
        let x = match local.as_deref_mut() {
            Some(l) => l.shard.forward(&x, &mut l.cache)?,
            None => x,
        };
        let out = forward(session, &x).await?;
        let step = generator.advance_step(&out)?;
        // Rejected drafts leave every cache, here and on the servers.
        if let Some(l) = local.as_deref_mut() {
            l.cache.truncate(step.keep);
        }
        session.truncate(step.keep)?;
        for next in step.tokens {
            if !on_token(next)? {
                generator.stop();
                break;
            }
        }
    }
    Ok(generator.finish())
}

//! The real blocks behind a server: [`ShardBackend`] lets the network
//! layer's inference protocol run a `swarm-shard` span, its sessions' KV
//! caches drawn from one memory budget.

use std::sync::Arc;

use swarm_core::BlockRange;
use swarm_dht::{BackendError, SpanBackend, SpanState};
use swarm_shard::{BlockShard, CacheBudget, DType, Device, SessionCache, ShardError, Tensor};

/// A [`BlockShard`] served to the swarm, with sessions' caches reserved
/// against `budget` (a session that does not fit is refused as busy). The
/// shard can be replaced (a server moving to other blocks); sessions
/// already open keep the one they started on.
#[derive(Debug)]
pub struct ShardBackend {
    shard: std::sync::RwLock<Arc<BlockShard>>,
    budget: Arc<CacheBudget>,
}

impl ShardBackend {
    /// Serves `shard` with caches from `budget`.
    pub fn new(shard: Arc<BlockShard>, budget: Arc<CacheBudget>) -> Self {
        Self {
            shard: std::sync::RwLock::new(shard),
            budget,
        }
    }

    /// The span served now.
    pub fn shard(&self) -> Arc<BlockShard> {
        self.shard
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Serves `shard` from now on.
    pub fn replace(&self, shard: Arc<BlockShard>) {
        *self
            .shard
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = shard;
    }

    /// The cache budget.
    pub fn budget(&self) -> &Arc<CacheBudget> {
        &self.budget
    }

    /// Cache bytes one position of a session over `blocks` takes.
    fn bytes_per_position(&self, blocks: BlockRange) -> u64 {
        SessionCache::bytes_needed(self.shard().config(), blocks, 1, DType::F32).max(1)
    }
}

impl SpanBackend for ShardBackend {
    fn blocks(&self) -> BlockRange {
        self.shard().range()
    }

    fn hidden_size(&self) -> usize {
        self.shard().config().hidden_size
    }

    fn context_length(&self) -> usize {
        self.shard().config().max_position_embeddings
    }

    fn free_positions(&self, blocks: BlockRange) -> u64 {
        self.budget.available() / self.bytes_per_position(blocks)
    }

    fn open(
        &self,
        blocks: BlockRange,
        max_length: usize,
    ) -> Result<Box<dyn SpanState>, BackendError> {
        let shard = self.shard();
        match shard.new_session_for(blocks, max_length, &self.budget) {
            Ok(cache) => Ok(Box::new(ShardSession { shard, cache })),
            Err(ShardError::CacheBudgetExceeded { .. }) => Err(BackendError::Busy {
                needed: u32::try_from(max_length).unwrap_or(u32::MAX),
                free: self.free_positions(blocks),
            }),
            Err(e) => Err(BackendError::Failed(e.to_string())),
        }
    }
}

/// One session on a [`ShardBackend`]: its KV cache.
#[derive(Debug)]
struct ShardSession {
    shard: Arc<BlockShard>,
    cache: SessionCache,
}

impl SpanState for ShardSession {
    fn len(&self) -> usize {
        self.cache.len()
    }

    fn truncate(&mut self, keep: usize) {
        self.cache.truncate(keep);
    }

    fn forward(&mut self, values: Vec<f32>, positions: usize) -> Result<Vec<f32>, BackendError> {
        let hidden = self.shard.config().hidden_size;
        let input = Tensor::from_vec(values, (1, positions, hidden), &Device::Cpu)
            .and_then(|t| t.to_device(self.shard.device()))
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        let output = self
            .shard
            .forward(&input, &mut self.cache)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        output
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| BackendError::Failed(e.to_string()))
    }
}

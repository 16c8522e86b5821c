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

    fn batch_rows(&self) -> usize {
        self.shard().batch_rows()
    }

    /// Steps of sessions on the same shard and blocks run in one pass
    /// ([`BlockShard::forward_batch`]); any other step runs alone.
    fn forward_batch(
        &self,
        steps: &mut [(&mut dyn SpanState, Vec<f32>, usize)],
    ) -> Vec<Result<Vec<f32>, BackendError>> {
        let mut results: Vec<Option<Result<Vec<f32>, BackendError>>> =
            (0..steps.len()).map(|_| None).collect();
        // Groups of steps that can share a pass: same shard, same blocks.
        let mut groups: Vec<(Arc<BlockShard>, BlockRange, Vec<usize>)> = Vec::new();
        for (i, (state, _, _)) in steps.iter_mut().enumerate() {
            let Some(session) = state
                .as_any_mut()
                .and_then(|any| any.downcast_mut::<ShardSession>())
            else {
                continue;
            };
            let range = session.cache.range();
            match groups
                .iter_mut()
                .find(|(shard, r, _)| Arc::ptr_eq(shard, &session.shard) && *r == range)
            {
                Some((_, _, members)) => members.push(i),
                None => groups.push((session.shard.clone(), range, vec![i])),
            }
        }
        for (shard, _, members) in groups.into_iter().filter(|g| g.2.len() > 1) {
            let hidden = shard.config().hidden_size;
            let mut inputs = Vec::with_capacity(members.len());
            for &i in &members {
                let (_, values, positions) = &mut steps[i];
                let input = Tensor::from_vec(
                    std::mem::take(values),
                    (1, *positions, hidden),
                    &Device::Cpu,
                )
                .and_then(|t| t.to_device(shard.device()));
                inputs.push(input);
            }
            let inputs: Result<Vec<Tensor>, _> = inputs.into_iter().collect();
            let outcome = inputs.map_err(|e| e.to_string()).and_then(|inputs| {
                let mut caches: Vec<(&Tensor, &mut SessionCache)> = Vec::new();
                let mut states: Vec<&mut (&mut dyn SpanState, Vec<f32>, usize)> = steps
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| members.contains(i))
                    .map(|(_, step)| step)
                    .collect();
                for (step, input) in states.iter_mut().zip(&inputs) {
                    let session = step
                        .0
                        .as_any_mut()
                        .and_then(|any| any.downcast_mut::<ShardSession>())
                        .ok_or_else(|| "a batched session changed kind".to_string())?;
                    caches.push((input, &mut session.cache));
                }
                shard
                    .forward_batch(&mut caches)
                    .map_err(|e| e.to_string())
                    .and_then(|outs| {
                        outs.iter()
                            .map(|o| to_values(o).map_err(|e| e.to_string()))
                            .collect::<Result<Vec<_>, _>>()
                    })
            });
            match outcome {
                Ok(outs) => {
                    for (&i, out) in members.iter().zip(outs) {
                        results[i] = Some(Ok(out));
                    }
                }
                // Every session of the failed pass fails with it.
                Err(message) => {
                    for &i in &members {
                        results[i] = Some(Err(BackendError::Failed(message.clone())));
                    }
                }
            }
        }
        steps
            .iter_mut()
            .zip(results)
            .map(|((state, values, positions), done)| match done {
                Some(result) => result,
                None => state.forward(std::mem::take(values), *positions),
            })
            .collect()
    }
}

/// A step's output tensor as the values the protocol sends.
fn to_values(output: &Tensor) -> Result<Vec<f32>, BackendError> {
    output
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| BackendError::Failed(e.to_string()))
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
        to_values(&output)
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

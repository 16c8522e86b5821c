//! Per-session key/value caches inside a fixed memory budget.
//!
//! A server sets one [`CacheBudget`] for all its sessions. A session reserves
//! the bytes for its whole declared length when it opens, so it is refused up
//! front with a clear error instead of running out of memory halfway through a
//! generation. Memory is then allocated as the session grows, never past the
//! reservation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use swarm_core::BlockRange;

use crate::config::ModelConfig;
use crate::error::{Result, ShardError};

/// A byte budget shared by every session cache of a server.
#[derive(Debug)]
pub struct CacheBudget {
    limit: u64,
    used: AtomicU64,
}

impl CacheBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// A budget that never refuses (for local, single-user generation).
    pub fn unlimited() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    /// The whole budget in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Bytes still free.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Reserves `bytes`, or refuses if that would exceed the budget.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Result<CacheReservation> {
        let mut current = self.used.load(Ordering::Acquire);
        loop {
            let next = current.checked_add(bytes).filter(|n| *n <= self.limit);
            let Some(next) = next else {
                return Err(ShardError::CacheBudgetExceeded {
                    requested: bytes,
                    available: self.limit.saturating_sub(current),
                    budget: self.limit,
                });
            };
            match self.used.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Ok(CacheReservation {
                        budget: Arc::clone(self),
                        bytes,
                    })
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// Bytes held from a [`CacheBudget`]; given back when dropped.
#[derive(Debug)]
pub struct CacheReservation {
    budget: Arc<CacheBudget>,
    bytes: u64,
}

impl CacheReservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for CacheReservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Keys and values of one block for one session.
#[derive(Debug, Default)]
pub(crate) struct LayerKv {
    /// (1, kv_heads, capacity, head_dim), filled up to the session length.
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerKv {
    /// Appends `k`, `v` (1, kv_heads, seq, head_dim) at position `len` and
    /// returns views of everything cached so far.
    pub(crate) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        len: usize,
        max_tokens: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, heads, seq, dim) = k.dims4()?;
        let needed = len + seq;
        let capacity = self.k.as_ref().map_or(0, |t| t.dims()[2]);
        if needed > capacity {
            // Grow geometrically so a long generation copies O(n) in total.
            let new_capacity = needed
                .next_power_of_two()
                .max(64)
                .min(max_tokens)
                .max(needed);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let fresh = Tensor::zeros((b, heads, new_capacity, dim), k.dtype(), k.device())?;
                if let Some(old) = old {
                    if len > 0 {
                        fresh.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    }
                }
                Ok(fresh)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (Some(k_all), Some(v_all)) = (&self.k, &self.v) else {
            return Err(candle_core::Error::Msg("kv cache not allocated".into()).into());
        };
        k_all.slice_set(&k.contiguous()?, 2, len)?;
        v_all.slice_set(&v.contiguous()?, 2, len)?;
        Ok((k_all.narrow(2, 0, needed)?, v_all.narrow(2, 0, needed)?))
    }
}

/// The KV cache of one session over a span of blocks.
#[derive(Debug)]
pub struct SessionCache {
    range: BlockRange,
    layers: Vec<LayerKv>,
    len: usize,
    max_tokens: usize,
    _reservation: CacheReservation,
}

impl SessionCache {
    /// Bytes a session of `max_tokens` over `range` needs in `dtype`.
    pub fn bytes_needed(
        cfg: &ModelConfig,
        range: BlockRange,
        max_tokens: usize,
        dtype: DType,
    ) -> u64 {
        cfg.kv_bytes_per_token_per_block(dtype.size_in_bytes())
            .saturating_mul(range.len() as u64)
            .saturating_mul(max_tokens as u64)
    }

    /// Reserves room for `max_tokens` positions over `range` from `budget`.
    pub fn new(
        cfg: &ModelConfig,
        range: BlockRange,
        max_tokens: usize,
        budget: &Arc<CacheBudget>,
    ) -> Result<Self> {
        if max_tokens == 0 || max_tokens > cfg.max_position_embeddings {
            return Err(ShardError::BadSettings(format!(
                "session length {max_tokens} must be between 1 and the model's context of {}",
                cfg.max_position_embeddings
            )));
        }
        let reservation = budget.reserve(Self::bytes_needed(cfg, range, max_tokens, DType::F32))?;
        Ok(Self {
            range,
            layers: (0..range.len()).map(|_| LayerKv::default()).collect(),
            len: 0,
            max_tokens,
            _reservation: reservation,
        })
    }

    /// The blocks this cache belongs to.
    pub fn range(&self) -> BlockRange {
        self.range
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions reserved at open.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Bytes reserved from the budget.
    pub fn reserved_bytes(&self) -> u64 {
        self._reservation.bytes()
    }

    /// Forgets every position from `len` on, so a step can be replayed.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub(crate) fn check_room(&self, adding: usize) -> Result<()> {
        if self.len + adding > self.max_tokens {
            return Err(ShardError::SessionFull {
                used: self.len,
                capacity: self.max_tokens,
                adding,
            });
        }
        Ok(())
    }

    pub(crate) fn layer(&mut self, offset: usize) -> Option<&mut LayerKv> {
        self.layers.get_mut(offset)
    }

    pub(crate) fn advance(&mut self, positions: usize) {
        self.len += positions;
    }
}

/// The additive causal mask for `seq` new positions after `start` cached
/// ones, (seq, start + seq): 0 where a query may attend, -inf where not.
/// With a sliding `window`, a query sees only keys less than `window`
/// positions back (itself included), as transformers' sliding-window
/// masks do.
pub(crate) fn causal_mask(
    seq: usize,
    start: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    // Query i (absolute position start + i) may see keys 0..=start + i.
    let total = start + seq;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            let pos = start + i;
            (0..total).map(move |j| {
                let visible = j <= pos && window.is_none_or(|w| pos - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (seq, total), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refuses_past_its_limit_and_frees_on_drop() {
        let budget = CacheBudget::new(1000);
        let a = budget.reserve(600).unwrap();
        let err = budget.reserve(500).unwrap_err();
        assert!(matches!(
            err,
            ShardError::CacheBudgetExceeded {
                requested: 500,
                available: 400,
                budget: 1000
            }
        ));
        assert_eq!(budget.used(), 600);
        drop(a);
        assert_eq!(budget.used(), 0);
        let _b = budget.reserve(1000).unwrap();
        assert_eq!(budget.available(), 0);
    }

    #[test]
    fn budget_is_exact_under_concurrent_reservations() {
        let budget = CacheBudget::new(100 * 64);
        let held: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let budget = &budget;
                    s.spawn(move || {
                        (0..40)
                            .filter_map(|_| budget.reserve(64).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(held.len(), 100);
        assert_eq!(budget.used(), 100 * 64);
    }

    #[test]
    fn causal_mask_lets_each_position_see_its_past() {
        let mask = causal_mask(2, 3, None, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(mask[0][..4], [0.0; 4]);
        assert_eq!(mask[0][4], f32::NEG_INFINITY);
        assert_eq!(mask[1], vec![0.0; 5]);
        // A window of 2: position 3 sees 2 and 3, position 4 sees 3 and 4.
        let inf = f32::NEG_INFINITY;
        let windowed = causal_mask(2, 3, Some(2), &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(windowed[0], [inf, inf, 0.0, 0.0, inf]);
        assert_eq!(windowed[1], [inf, inf, inf, 0.0, 0.0]);
    }
}

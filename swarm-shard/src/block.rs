//! One transformer block: a norm, grouped-query attention with RoPE, a norm
//! and a gated MLP, each around a residual connection, with the variations
//! of each [`Family`](crate::Family): biases, per-head norms, fused
//! projections, sliding windows, soft-capped scores, norms after attention
//! and MLP.

use candle_core::{Module, Tensor};

use crate::attention;
use crate::config::{Activation, ModelConfig};
use crate::error::Result;
use crate::kv_cache::LayerKv;
use crate::linear::Linear;
use crate::rope::RotaryEmbedding;
use crate::weights::{BlockWeight, LoadedWeight, WeightName, WeightReader};

/// The weights of one block and the sizes needed to run it.
#[derive(Debug, Clone)]
pub struct Block {
    index: usize,
    attn_norm: Tensor,
    qkv: Qkv,
    qkv_bias: Option<[Tensor; 3]>,
    qk_norm: Option<[Tensor; 2]>,
    o_proj: Linear,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    ffn: Ffn,
    post_ffn_norm: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    attention_scale: f64,
    attn_softcap: Option<f64>,
    window: Option<usize>,
    activation: Activation,
    weight_bytes: usize,
}

#[derive(Debug, Clone)]
enum Qkv {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// One matrix whose output rows are queries, then keys, then values.
    Fused(Linear),
}

/// A gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_up: GateUp,
    down: Linear,
}

#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    /// Each token goes through its `per_token` most likely experts, their
    /// outputs weighted by the router's renormalised probabilities.
    Experts {
        router: Linear,
        experts: Vec<Mlp>,
        per_token: usize,
    },
}

#[derive(Debug, Clone)]
enum GateUp {
    Separate {
        gate: Linear,
        up: Linear,
    },
    /// One matrix whose output rows are the gate, then the up projection.
    Fused(Linear),
}

/// One session's share of a block's rows: how many, its cache's layer,
/// and where its positions stand.
pub(crate) struct Part<'k, 'c> {
    pub seq: usize,
    pub kv: &'k mut LayerKv,
    pub ctx: &'c StepContext<'c>,
}

/// What a block needs besides its input for one step.
#[derive(Debug)]
pub(crate) struct StepContext<'a> {
    pub rope: &'a RotaryEmbedding,
    /// Absolute position of the first new token.
    pub start: usize,
    /// (gqa_group * seq, start + seq) additive causal mask, None for a
    /// single token.
    pub mask: Option<&'a Tensor>,
    /// The same with the sliding window applied, for windowed blocks.
    pub window_mask: Option<&'a Tensor>,
    pub max_tokens: usize,
}

impl Block {
    /// Loads block `index` from `reader`.
    pub fn load(cfg: &ModelConfig, reader: &mut WeightReader<'_>, index: usize) -> Result<Self> {
        let name = |w| WeightName::Block(index, w);
        let mut weight_bytes = 0;
        let mut matmul = |reader: &mut WeightReader<'_>, w| -> Result<Linear> {
            let loaded = reader.load(name(w))?;
            weight_bytes += loaded.size_in_bytes();
            loaded.into_linear()
        };
        let fused = cfg.family.fused_projections();
        let qkv = if fused {
            Qkv::Fused(matmul(reader, BlockWeight::Qkv)?)
        } else {
            Qkv::Separate {
                q: matmul(reader, BlockWeight::Q)?,
                k: matmul(reader, BlockWeight::K)?,
                v: matmul(reader, BlockWeight::V)?,
            }
        };
        let o_proj = matmul(reader, BlockWeight::O)?;
        let ffn = match cfg.experts {
            Some(experts) => {
                let (router, weights) = reader.load_experts(index)?;
                weight_bytes += router.size_in_bytes();
                let mut mlps = Vec::with_capacity(weights.len());
                for expert in weights {
                    let mut linear = |w: LoadedWeight| {
                        weight_bytes += w.size_in_bytes();
                        w.into_linear()
                    };
                    mlps.push(Mlp {
                        gate_up: GateUp::Separate {
                            gate: linear(expert.gate)?,
                            up: linear(expert.up)?,
                        },
                        down: linear(expert.down)?,
                    });
                }
                Ffn::Experts {
                    router: router.into_linear()?,
                    experts: mlps,
                    per_token: experts.per_token,
                }
            }
            None => Ffn::Dense(Mlp {
                gate_up: if fused {
                    GateUp::Fused(matmul(reader, BlockWeight::GateUp)?)
                } else {
                    GateUp::Separate {
                        gate: matmul(reader, BlockWeight::Gate)?,
                        up: matmul(reader, BlockWeight::Up)?,
                    }
                },
                down: matmul(reader, BlockWeight::Down)?,
            }),
        };
        let mut vector = |reader: &mut WeightReader<'_>, w, offset: f64| -> Result<Tensor> {
            let t = reader.load_vector(name(w))?;
            weight_bytes += t.elem_count() * 4;
            Ok(if offset == 0.0 { t } else { (t + offset)? })
        };
        let offset = cfg.norm_weight_offset;
        let attn_norm = vector(reader, BlockWeight::AttnNorm, offset)?;
        let ffn_norm = vector(reader, BlockWeight::FfnNorm, offset)?;
        let (post_attn_norm, post_ffn_norm) = if cfg.family.sandwich_norms() {
            (
                Some(vector(reader, BlockWeight::PostAttnNorm, offset)?),
                Some(vector(reader, BlockWeight::PostFfnNorm, offset)?),
            )
        } else {
            (None, None)
        };
        let qkv_bias = if cfg.qkv_bias {
            Some([
                vector(reader, BlockWeight::QBias, 0.0)?,
                vector(reader, BlockWeight::KBias, 0.0)?,
                vector(reader, BlockWeight::VBias, 0.0)?,
            ])
        } else {
            None
        };
        let qk_norm = if cfg.qk_norm {
            Some([
                vector(reader, BlockWeight::QNorm, 0.0)?,
                vector(reader, BlockWeight::KNorm, 0.0)?,
            ])
        } else {
            None
        };
        Ok(Self {
            index,
            attn_norm,
            qkv,
            qkv_bias,
            qk_norm,
            o_proj,
            post_attn_norm,
            ffn_norm,
            ffn,
            post_ffn_norm,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps as f32,
            attention_scale: cfg.attention_scale,
            attn_softcap: cfg.attn_logit_softcap,
            window: cfg.window_of(index),
            activation: cfg.activation,
            weight_bytes,
        })
    }

    /// The block's index in the model.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Most rows of sessions' steps that run together and each come out as
    /// alone ([`Linear::exact_rows`] of every matrix).
    pub(crate) fn exact_rows(&self) -> usize {
        let mlp_rows = |m: &Mlp| {
            let gate_up = match &m.gate_up {
                GateUp::Separate { gate, up } => gate.exact_rows().min(up.exact_rows()),
                GateUp::Fused(both) => both.exact_rows(),
            };
            gate_up.min(m.down.exact_rows())
        };
        let qkv = match &self.qkv {
            Qkv::Separate { q, k, v } => q.exact_rows().min(k.exact_rows()).min(v.exact_rows()),
            Qkv::Fused(all) => all.exact_rows(),
        };
        let ffn = match &self.ffn {
            Ffn::Dense(mlp) => mlp_rows(mlp),
            // Rows are routed to experts: the number each takes varies.
            Ffn::Experts { .. } => 1,
        };
        qkv.min(self.o_proj.exact_rows()).min(ffn)
    }

    /// Whether this block attends through a sliding window.
    pub(crate) fn windowed(&self) -> bool {
        self.window.is_some()
    }

    fn norm(&self, xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &xs.contiguous()?,
            weight,
            self.eps,
        )?)
    }

    /// Queries, keys and values of `x` (batch, seq, hidden), each
    /// (batch, seq, heads * head_dim), biases added.
    fn project_qkv(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(qkv) => {
                let all = qkv.forward(x)?;
                let q_width = self.heads * self.head_dim;
                let kv_width = self.kv_heads * self.head_dim;
                (
                    all.narrow(2, 0, q_width)?,
                    all.narrow(2, q_width, kv_width)?,
                    all.narrow(2, q_width + kv_width, kv_width)?,
                )
            }
        };
        match &self.qkv_bias {
            Some([qb, kb, vb]) => Ok((
                q.broadcast_add(qb)?,
                k.broadcast_add(kb)?,
                v.broadcast_add(vb)?,
            )),
            None => Ok((q, k, v)),
        }
    }

    /// Runs the block on the rows of several sessions at once: `xs` is
    /// (1, rows, hidden), the rows of each part one after another (`seq`
    /// of them), each part appending its keys and values to its own
    /// `kv`. Every matrix product takes all rows together (the weights
    /// are read once for them); attention runs per part. A part's rows
    /// come out as they do when it runs alone.
    pub(crate) fn forward(&self, xs: &Tensor, parts: &mut [Part<'_, '_>]) -> Result<Tensor> {
        let _busy = crate::pool::busy();
        let (batch, rows, hidden) = xs.dims3()?;
        let residual = xs;
        let x = self.norm(xs, &self.attn_norm)?;

        let (q_all, k_all, v_all) = self.project_qkv(&x)?; // (batch, rows, heads * head_dim)
        let y = if let [part] = parts {
            self.attend(q_all, k_all, v_all, part)?
        } else {
            let mut ys = Vec::with_capacity(parts.len());
            let mut at = 0;
            for part in parts.iter_mut() {
                let take = |t: &Tensor| t.narrow(1, at, part.seq);
                ys.push(self.attend(take(&q_all)?, take(&k_all)?, take(&v_all)?, part)?);
                at += part.seq;
            }
            Tensor::cat(&ys, 1)?
        };
        let attn = self.o_proj.forward(&y)?;
        let attn = match &self.post_attn_norm {
            Some(norm) => self.norm(&attn, norm)?,
            None => attn,
        };
        let xs = (residual + attn)?;

        let x = self.norm(&xs, &self.ffn_norm)?;
        let mlp = match &self.ffn {
            Ffn::Dense(mlp) => mlp.forward(&x, self.activation)?,
            Ffn::Experts {
                router,
                experts,
                per_token,
            } => self.experts(&x, router, experts, *per_token)?,
        };
        let mlp = match &self.post_ffn_norm {
            Some(norm) => self.norm(&mlp, norm)?,
            None => mlp,
        };
        debug_assert_eq!(mlp.dims3()?, (batch, rows, hidden));
        Ok((xs + mlp)?)
    }

    /// Attention of one part's rows: its queries, keys and values, each
    /// (1, seq, heads * head_dim), against its cache; the result has the
    /// queries' shape.
    fn attend(&self, q: Tensor, k: Tensor, v: Tensor, part: &mut Part<'_, '_>) -> Result<Tensor> {
        let (kv, ctx) = (&mut *part.kv, part.ctx);
        let (batch, seq, _) = q.dims3()?;
        let q = q.reshape((batch, seq, self.heads, self.head_dim))?;
        let k = k.reshape((batch, seq, self.kv_heads, self.head_dim))?;
        let (q, k) = match &self.qk_norm {
            Some([qn, kn]) => (self.norm(&q, qn)?, self.norm(&k, kn)?),
            None => (q, k),
        };
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        let v = v
            .reshape((batch, seq, self.kv_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = ctx.rope.apply(&q, ctx.start)?; // (batch, heads, seq, head_dim), contiguous
        let k = ctx.rope.apply(&k, ctx.start)?;
        let (k, v) = kv.append(&k, &v, ctx.start, ctx.max_tokens)?; // (batch, kv_heads, total, head_dim)
        let (k, v, mask) = match (self.window, ctx.mask) {
            // One query sees only the last `window` keys.
            (Some(window), None) if k.dims()[2] > window => {
                let total = k.dims()[2];
                (
                    k.narrow(2, total - window, window)?,
                    v.narrow(2, total - window, window)?,
                    None,
                )
            }
            (Some(_), Some(_)) => (k, v, ctx.window_mask),
            _ => (k, v, ctx.mask),
        };

        // Grouped-query attention without copying keys: the query heads that
        // share a key/value head are adjacent, so fold them into the rows.
        let group = self.heads / self.kv_heads;
        let q = q.reshape((batch, self.kv_heads, group * seq, self.head_dim))?;
        let att = match attention::scores(&q, &k)? {
            Some(att) => att,
            None => q.matmul(&k.t()?)?,
        };
        let att = (att * self.attention_scale)?; // (batch, kv_heads, group * seq, total)
        let att = match self.attn_softcap {
            Some(cap) => ((att / cap)?.tanh()? * cap)?,
            None => att,
        };
        let att = match mask {
            Some(mask) => att.broadcast_add(mask)?,
            None => att,
        };
        let att = attention::softmax_last_dim(&att)?;
        let y = match attention::mix(&att, &v)? {
            Some(y) => y,
            None => att.matmul(&v.contiguous()?)?,
        }; // (batch, kv_heads, group * seq, head_dim)
        Ok(y.reshape((batch, self.heads, seq, self.head_dim))?
            .transpose(1, 2)?
            .reshape((batch, seq, self.heads * self.head_dim))?)
    }
}

impl Block {
    /// The mixture of experts on `x` (batch, seq, hidden): softmax over the
    /// router's logits, the `per_token` largest kept and renormalised, each
    /// expert run once on the rows routed to it, in expert order (as
    /// transformers' Mixtral sums them).
    fn experts(
        &self,
        x: &Tensor,
        router: &Linear,
        experts: &[Mlp],
        per_token: usize,
    ) -> Result<Tensor> {
        let (batch, seq, hidden) = x.dims3()?;
        let rows = x.reshape((batch * seq, hidden))?;
        let probs = attention::softmax_last_dim(&router.forward(&rows)?)?.to_vec2::<f32>()?;
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); experts.len()];
        for (row, p) in probs.iter().enumerate() {
            let mut order: Vec<usize> = (0..p.len()).collect();
            // Largest first; equal probabilities keep the lower expert first.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let chosen = &order[..per_token.min(order.len())];
            let total: f32 = chosen.iter().map(|&e| p[e]).sum();
            for &e in chosen {
                routed[e].0.push(row as u32);
                routed[e].1.push(p[e] / total);
            }
        }
        let mut out = rows.zeros_like()?;
        for (expert, (ids, weights)) in experts.iter().zip(routed) {
            if ids.is_empty() {
                continue;
            }
            let n = ids.len();
            let ids = Tensor::from_vec(ids, n, x.device())?;
            let weights = Tensor::from_vec(weights, (n, 1), x.device())?;
            let y = expert.forward(&rows.index_select(&ids, 0)?, self.activation)?;
            out = out.index_add(&ids, &y.broadcast_mul(&weights)?, 0)?;
        }
        Ok(out.reshape((batch, seq, hidden))?)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, activation: Activation) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate, up } => (gate.forward(x)?, up.forward(x)?),
            GateUp::Fused(gate_up) => {
                let both = gate_up.forward(x)?;
                let last = both.rank() - 1;
                let width = both.dims()[last] / 2;
                (
                    both.narrow(last, 0, width)?,
                    both.narrow(last, width, width)?,
                )
            }
        };
        let gate = match activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => candle_nn::Activation::GeluPytorchTanh.forward(&gate)?,
        };
        self.down.forward(&(gate * up)?)
    }
}

//! The two attention products of a decode step (`q kᵀ` and `p v`) on CPU,
//! for few query rows.
//!
//! candle's CPU matmul looks up its thread count on every call, which
//! (unless `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS` is set) reads and
//! parses `/proc/cpuinfo`: about 50 µs, twice per block per token, a third
//! of a decode step of a small model. These products read the keys and
//! values where the cache holds them (rows contiguous, any other strides)
//! and run on candle's barrier pool only when there is enough work to
//! share. Prefill (many query rows) still uses candle's matmul, whose cost
//! per call is small there.

use candle_core::{DType, Layout, Storage, Tensor};

use crate::error::Result;
use crate::linear::{par_chunks, simd};

/// Most query rows (per key/value head) computed here.
pub(crate) const MAX_QUERY_ROWS: usize = 64;

/// Multiply-adds below which one thread does it all.
const PARALLEL_WORK: usize = 1 << 16;

/// A 4-D f32 CPU tensor's storage and layout, if its last dimension is
/// contiguous.
fn rows_of(t: &Tensor) -> Option<(impl std::ops::Deref<Target = Storage> + '_, Layout)> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 || t.rank() != 4 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    if layout.stride()[3] != 1 && layout.dims()[3] > 1 {
        return None;
    }
    let layout = layout.clone();
    matches!(&*storage, Storage::Cpu(_)).then_some((storage, layout))
}

/// Offset of row (`a`, `h`, `r`) of a 4-D layout.
fn row_at(layout: &Layout, a: usize, h: usize, r: usize) -> usize {
    let s = layout.stride();
    layout.start_offset() + a * s[0] + h * s[1] + r * s[2]
}

fn slice(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(cpu) => Ok(cpu.as_slice::<f32>()?),
        _ => Err(candle_core::Error::Msg("attention operand left the CPU".into()).into()),
    }
}

/// `q kᵀ` for `q` (batch, heads, rows, dim) and `k` (batch, heads, keys,
/// dim): (batch, heads, rows, keys). `None` when the operands are not f32
/// on CPU or have more than [`MAX_QUERY_ROWS`] rows (use candle's matmul).
pub(crate) fn scores(q: &Tensor, k: &Tensor) -> Result<Option<Tensor>> {
    let (b, h, m, d) = q.dims4()?;
    let (kb, kh, keys, kd) = k.dims4()?;
    if m > MAX_QUERY_ROWS || (kb, kh, kd) != (b, h, d) {
        return Ok(None);
    }
    let (Some((qs, ql)), Some((ks, kl))) = (rows_of(q), rows_of(k)) else {
        return Ok(None);
    };
    let (qv, kv) = (slice(&qs)?, slice(&ks)?);
    let mut out = vec![0f32; b * h * m * keys];
    let fill = |row: usize, dst: &mut [f32]| {
        let (a, rest) = (row / (h * m), row % (h * m));
        let (hh, r) = (rest / m, rest % m);
        let qo = row_at(&ql, a, hh, r);
        let q_row = &qv[qo..qo + d];
        for (t, score) in dst.iter_mut().enumerate() {
            let ko = row_at(&kl, a, hh, t);
            *score = simd::dot_f32(&kv[ko..ko + d], q_row);
        }
    };
    run_rows(&mut out, keys, b * h * m * keys * d, fill);
    drop((qs, ks));
    Ok(Some(Tensor::from_vec(out, (b, h, m, keys), q.device())?))
}

/// `p v` for `p` (batch, heads, rows, keys) and `v` (batch, heads, keys,
/// dim): (batch, heads, rows, dim). `None` as for [`scores`].
pub(crate) fn mix(p: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    let (b, h, m, keys) = p.dims4()?;
    let (vb, vh, vkeys, d) = v.dims4()?;
    if m > MAX_QUERY_ROWS || (vb, vh, vkeys) != (b, h, keys) {
        return Ok(None);
    }
    let (Some((ps, pl)), Some((vs, vl))) = (rows_of(p), rows_of(v)) else {
        return Ok(None);
    };
    let (pv, vv) = (slice(&ps)?, slice(&vs)?);
    let mut out = vec![0f32; b * h * m * d];
    let fill = |row: usize, dst: &mut [f32]| {
        let (a, rest) = (row / (h * m), row % (h * m));
        let (hh, r) = (rest / m, rest % m);
        let po = row_at(&pl, a, hh, r);
        for (t, &weight) in pv[po..po + keys].iter().enumerate() {
            let vo = row_at(&vl, a, hh, t);
            for (o, x) in dst.iter_mut().zip(&vv[vo..vo + d]) {
                *o += weight * x;
            }
        }
    };
    run_rows(&mut out, d, b * h * m * keys * d, fill);
    drop((ps, vs));
    Ok(Some(Tensor::from_vec(out, (b, h, m, d), p.device())?))
}

/// Elements up to which [`softmax_last_dim`] runs on the calling thread.
const SERIAL_SOFTMAX: usize = 1 << 16;

/// Softmax over the last dimension. candle's runs on rayon's pool even for
/// a few hundred values: from a thread outside that pool (a server's
/// network worker) every call waits for a pool thread to wake, which took
/// milliseconds per block when the machine's cores slept between steps.
/// Small inputs run here, in the same order of operations.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.elem_count() > SERIAL_SOFTMAX {
        return Ok(candle_nn::ops::softmax_last_dim(x)?);
    }
    let x = x.contiguous()?;
    let Some(&n) = x.dims().last() else {
        return Ok(x);
    };
    let mut values: Vec<f32> = x.flatten_all()?.to_vec1()?;
    if n > 0 {
        for row in values.chunks_exact_mut(n) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
    }
    Ok(Tensor::from_vec(values, x.dims(), x.device())?)
}

/// Calls `fill(row, out_row)` for every `row_len`-long row of `out`, in
/// parallel when `work` (multiply-adds) is worth sharing.
fn run_rows(out: &mut [f32], row_len: usize, work: usize, fill: impl Fn(usize, &mut [f32]) + Sync) {
    if row_len == 0 {
        return;
    }
    if work < PARALLEL_WORK {
        for (row, dst) in out.chunks_exact_mut(row_len).enumerate() {
            fill(row, dst);
        }
    } else {
        par_chunks(out, row_len, fill);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::Device;

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn attention_products_equal_candles_matmul() {
        let dev = Device::Cpu;
        // Keys and values as the cache hands them out: a narrowed view of
        // a bigger buffer (rows contiguous, heads strided).
        for (m, keys) in [(1, 1), (3, 17), (16, 300), (4, 2000)] {
            let q = Tensor::randn(0f32, 1.0, (1, 3, m, 64), &dev).unwrap();
            let cache = Tensor::randn(0f32, 1.0, (1, 3, keys + 40, 64), &dev).unwrap();
            let k = cache.narrow(2, 0, keys).unwrap();
            let v = cache.narrow(2, 7, keys).unwrap();
            let got = scores(&q, &k).unwrap().unwrap();
            let want = q.matmul(&k.t().unwrap()).unwrap();
            assert!(max_diff(&got, &want) < 1e-3, "scores m={m} keys={keys}");
            let p = candle_nn::ops::softmax_last_dim(&want).unwrap();
            let got = mix(&p, &v).unwrap().unwrap();
            let want = p.matmul(&v.contiguous().unwrap()).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "mix m={m} keys={keys}");
        }
    }

    #[test]
    fn softmax_equals_candles() {
        let dev = Device::Cpu;
        for shape in [(1, 3, 1, 1), (1, 3, 3, 17), (2, 4, 16, 300)] {
            let x = Tensor::randn(0f32, 4.0, shape, &dev).unwrap();
            let got = softmax_last_dim(&x).unwrap();
            let want = candle_nn::ops::softmax_last_dim(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-5, "{shape:?}");
        }
        // A masked row (-inf) stays zero where masked.
        let x = Tensor::new(&[[0f32, f32::NEG_INFINITY, 1.0]], &dev).unwrap();
        let got = softmax_last_dim(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got[0][1], 0.0);
    }

    #[test]
    fn many_rows_or_other_types_are_left_to_candle() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, MAX_QUERY_ROWS + 1, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev).unwrap();
        assert!(scores(&q, &k).unwrap().is_none());
        let q = Tensor::zeros((1, 2, 1, 8), DType::F16, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), DType::F16, &dev).unwrap();
        assert!(scores(&q, &k).unwrap().is_none());
        // A transposed view has no contiguous rows.
        let k = Tensor::zeros((1, 2, 8, 5), DType::F32, &dev).unwrap();
        let kt = k.transpose(2, 3).unwrap();
        let q = Tensor::zeros((1, 2, 1, 8), DType::F32, &dev).unwrap();
        assert!(scores(&q, &kt).unwrap().is_none());
    }
}

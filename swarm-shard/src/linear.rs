//! Matrix products with block-quantized weights and full-precision
//! activations.
//!
//! ggml-style kernels (candle's `QMatMul` on CPU) also round the activation
//! row to 8 bits per 32 values before the dot product. That rounding is noisy
//! in a way that compounds: on SmolLM2 it moves first-step logits by ~0.4 and
//! flips greedy choices whose margin is below that, so a chain of shards would
//! not reproduce the model's own function. Here the weights stay quantized in
//! memory but every product is `sum((d*q + m) * x)` in f32, the exact value of
//! the dequantized matmul up to f32 rounding.
//!
//! Q4_0, Q4_1 and Q8_0 run through this path; other GGUF types use candle's
//! kernels.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Tensor};
use half::f16;

use crate::error::Result;

/// Values per quantization block for the formats handled here.
const QK: usize = 32;

/// Block formats computed exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockFormat {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A weight matrix (out, in) used as `x @ W^T`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Quantized blocks, f32 activations (exact).
    Exact(Arc<ExactQuantized>),
    /// Anything candle computes (dense tensors, other quantized types).
    Candle(QMatMul),
}

/// Raw quantized rows of a matrix.
#[derive(Debug)]
pub struct ExactQuantized {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// The blocks live in the candle tensor; on CPU reading them borrows.
    qtensor: Arc<QTensor>,
}

/// The output buffer of a gemv, written by several threads at disjoint rows.
struct SharedOut(*mut f32);
// SAFETY: only used by `gemv`, whose threads write disjoint elements.
unsafe impl Sync for SharedOut {}

/// Up to this many rows go through the fused kernel; larger batches
/// dequantize the matrix (a slice at a time) and use a dense matmul.
const FUSED_MAX_ROWS: usize = 4;

/// Most f32 bytes of a weight dequantized at once for a dense matmul.
const DEQUANT_CHUNK_BYTES: usize = 16 << 20;

impl Linear {
    /// Wraps a quantized tensor, choosing the exact path when the format allows.
    pub fn from_qtensor(qtensor: Arc<QTensor>) -> Result<Self> {
        let (rows, cols) = qtensor.shape().dims2()?;
        match BlockFormat::of(qtensor.dtype()) {
            Some(format) if cols % QK == 0 && qtensor.device().is_cpu() => {
                let bytes = qtensor.data()?.len();
                if bytes != rows * cols / QK * format.block_bytes() {
                    return Err(candle_core::Error::Msg(format!(
                        "quantized tensor holds {bytes} bytes, not the {rows}x{cols} {format:?} matrix it claims"
                    ))
                    .into());
                }
                Ok(Self::Exact(Arc::new(ExactQuantized {
                    format,
                    rows,
                    cols,
                    qtensor,
                })))
            }
            _ => Ok(Self::Candle(QMatMul::from_arc(qtensor)?)),
        }
    }

    /// A dense weight.
    pub fn dense(tensor: Tensor) -> Self {
        Self::Candle(QMatMul::Tensor(tensor))
    }

    /// `xs @ W^T` for `xs` of shape (..., in).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(xs)?),
            Self::Exact(q) => q.forward(xs),
        }
    }
}

impl ExactQuantized {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            return Err(candle_core::Error::Msg("matmul input has no dimensions".into()).into());
        };
        if k != self.cols {
            return Err(candle_core::Error::Msg(format!(
                "matmul input width {k} does not match weight width {}",
                self.cols
            ))
            .into());
        }
        let m: usize = lead.iter().product();
        let mut out_dims = lead.to_vec();
        out_dims.push(self.rows);
        if m > FUSED_MAX_ROWS {
            return self.dequantized_matmul(xs, m, &out_dims);
        }
        let x: Vec<f32> = xs
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let mut out = vec![0f32; m * self.rows];
        let data = self.qtensor.data()?;
        for (x_row, out_row) in x.chunks_exact(k).zip(out.chunks_exact_mut(self.rows)) {
            self.gemv(&data, x_row, out_row);
        }
        Ok(Tensor::from_vec(out, out_dims, xs.device())?)
    }

    /// `xs @ W^T` for many rows: the weight is dequantized a slice of rows
    /// at a time (at most [`DEQUANT_CHUNK_BYTES`] of f32), so a big matrix
    /// (180 MB in f32 for a 7B model's MLP) never exists whole beside its
    /// quantized self.
    fn dequantized_matmul(&self, xs: &Tensor, m: usize, out_dims: &[usize]) -> Result<Tensor> {
        let data = self.qtensor.data()?;
        let row_bytes = self.cols / QK * self.format.block_bytes();
        let chunk_rows = (DEQUANT_CHUNK_BYTES / (self.cols * 4)).clamp(1, self.rows);
        let x = xs
            .reshape((m, self.cols))?
            .to_dtype(candle_core::DType::F32)?;
        let mut parts = Vec::with_capacity(self.rows.div_ceil(chunk_rows));
        let mut row = 0;
        while row < self.rows {
            let n = chunk_rows.min(self.rows - row);
            let bytes = &data[row * row_bytes..(row + n) * row_bytes];
            let w = Tensor::from_vec(self.dequantize(bytes), (n, self.cols), xs.device())?;
            parts.push(x.matmul(&w.t()?)?);
            row += n;
        }
        let out = if parts.len() == 1 {
            parts.remove(0)
        } else {
            Tensor::cat(&parts, 1)?
        };
        Ok(out.reshape(out_dims)?)
    }

    /// The f32 values of whole rows of blocks.
    fn dequantize(&self, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(bytes.len() / self.format.block_bytes() * QK);
        for block in bytes.chunks_exact(self.format.block_bytes()) {
            match self.format {
                BlockFormat::Q4_0 => {
                    let d = half_at(block, 0);
                    let qs = &block[2..18];
                    out.extend(qs.iter().map(|q| ((q & 0x0F) as i32 - 8) as f32 * d));
                    out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * d));
                }
                BlockFormat::Q4_1 => {
                    let (d, min) = (half_at(block, 0), half_at(block, 2));
                    let qs = &block[4..20];
                    out.extend(qs.iter().map(|q| (q & 0x0F) as f32 * d + min));
                    out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + min));
                }
                BlockFormat::Q8_0 => {
                    let d = half_at(block, 0);
                    out.extend(block[2..34].iter().map(|q| *q as i8 as f32 * d));
                }
            }
        }
        out
    }

    /// One activation row against every weight row, in parallel over rows.
    fn gemv(&self, data: &[u8], x: &[f32], out: &mut [f32]) {
        let blocks = self.cols / QK;
        let row_bytes = blocks * self.format.block_bytes();
        // Block sums of x, for the Q4_1 offset and Q4_0's implicit -8.
        let x_sums: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
        let dot = |row: usize| {
            let bytes = &data[row * row_bytes..(row + 1) * row_bytes];
            match self.format {
                BlockFormat::Q4_1 => simd::dot_q4_1(bytes, x, &x_sums),
                BlockFormat::Q4_0 => dot_q4_0(bytes, x, &x_sums),
                BlockFormat::Q8_0 => simd::dot_q8_0(bytes, x),
            }
        };
        // candle's barrier pool: the calling thread works too and idle
        // workers spin briefly then park. A second pool (rayon's) beside it
        // oversubscribed the cores and spent a third of decode time in the
        // scheduler.
        let out_ptr = SharedOut(out.as_mut_ptr());
        let rows = out.len();
        candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
            let out_ptr = &out_ptr;
            for row in range {
                // SAFETY: execute_chunked hands out disjoint row ranges within
                // 0..rows, so each element of `out` is written by one thread,
                // and `out` outlives the call, which blocks until all are done.
                unsafe { *out_ptr.0.add(row) = dot(row) };
            }
        });
    }
}

#[inline(always)]
fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// sum over nibbles: lo nibble j pairs with x[j], hi nibble with x[j + 16].
#[inline(always)]
fn nibble_dot(qs: &[u8], x: &[f32]) -> f32 {
    let mut lo = [0f32; 16];
    let mut hi = [0f32; 16];
    for j in 0..16 {
        lo[j] = (qs[j] & 0x0F) as f32 * x[j];
        hi[j] = (qs[j] >> 4) as f32 * x[j + 16];
    }
    let mut acc = [0f32; 16];
    for j in 0..16 {
        acc[j] = lo[j] + hi[j];
    }
    acc.iter().sum()
}

fn dot_q4_1(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, block) in row.chunks_exact(20).enumerate() {
        let d = half_at(block, 0);
        let m = half_at(block, 2);
        let xb = &x[b * QK..(b + 1) * QK];
        total += d * nibble_dot(&block[4..20], xb) + m * x_sums[b];
    }
    total
}

fn dot_q4_0(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, block) in row.chunks_exact(18).enumerate() {
        let d = half_at(block, 0);
        let xb = &x[b * QK..(b + 1) * QK];
        total += d * (nibble_dot(&block[2..18], xb) - 8.0 * x_sums[b]);
    }
    total
}

fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, block) in row.chunks_exact(34).enumerate() {
        let d = half_at(block, 0);
        let xb = &x[b * QK..(b + 1) * QK];
        let mut acc = [0f32; QK];
        for j in 0..QK {
            acc[j] = (block[2 + j] as i8) as f32 * xb[j];
        }
        total += d * acc.iter().sum::<f32>();
    }
    total
}

/// Vectorized versions of the dot products, chosen at run time; they sum in
/// a different order than the portable ones, nothing else.
mod simd {
    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }

    pub(super) fn dot_q4_1(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && row.len() / 20 * super::QK <= x.len() && row.len() / 20 <= x_sums.len() {
            // SAFETY: AVX2 and FMA are present (checked above) and the
            // lengths cover every block read.
            return unsafe { avx2::dot_q4_1(row, x, x_sums) };
        }
        super::dot_q4_1(row, x, x_sums)
    }

    pub(super) fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && row.len() / 34 * super::QK <= x.len() {
            // SAFETY: as above.
            return unsafe { avx2::dot_q8_0(row, x) };
        }
        super::dot_q8_0(row, x)
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        use super::super::{half_at, QK};

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn hsum(v: __m256) -> f32 {
            {
                let lo = _mm256_castps256_ps128(v);
                let hi = _mm256_extractf128_ps(v, 1);
                let s = _mm_add_ps(lo, hi);
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }
        }

        /// Eight bytes (as u8 or i8) widened to eight f32 lanes.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn u8x8(v: __m128i) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn i8x8(v: __m128i) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
        }

        /// Lane-wise products of a block's 32 weights (four groups of eight)
        /// with the 32 floats at `xp`.
        ///
        /// # Safety
        /// `xp` must point at 32 readable floats.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn dot32(w: [__m256; 4], xp: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 32 floats at xp.
            unsafe {
                let mut blk = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
                blk = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), blk);
                blk = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), blk);
                _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), blk)
            }
        }

        /// # Safety
        /// Needs AVX2 + FMA; `x` and `x_sums` must cover every block of `row`.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn dot_q4_1(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
            // SAFETY: loads read 16 bytes at offset 4 of a 20-byte block and 32
            // floats at b * 32 of `x`, which the caller sized.
            unsafe {
                let mask = _mm_set1_epi8(0x0F);
                let mut acc = _mm256_setzero_ps();
                let mut offsets = 0f32;
                for (b, block) in row.chunks_exact(20).enumerate() {
                    let d = _mm256_set1_ps(half_at(block, 0));
                    offsets += half_at(block, 2) * x_sums[b];
                    let qs = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
                    let lo = _mm_and_si128(qs, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                    let xp = x.as_ptr().add(b * QK);
                    let blk = dot32(
                        [
                            u8x8(lo),
                            u8x8(_mm_srli_si128(lo, 8)),
                            u8x8(hi),
                            u8x8(_mm_srli_si128(hi, 8)),
                        ],
                        xp,
                    );
                    acc = _mm256_fmadd_ps(d, blk, acc);
                }
                hsum(acc) + offsets
            }
        }

        /// # Safety
        /// Needs AVX2 + FMA; `x` must cover every block of `row`.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
            // SAFETY: loads read 32 bytes at offset 2 of a 34-byte block and 32
            // floats at b * 32 of `x`, which the caller sized.
            unsafe {
                let mut acc = _mm256_setzero_ps();
                for (b, block) in row.chunks_exact(34).enumerate() {
                    let d = _mm256_set1_ps(half_at(block, 0));
                    let q0 = _mm_loadu_si128(block.as_ptr().add(2) as *const __m128i);
                    let q1 = _mm_loadu_si128(block.as_ptr().add(18) as *const __m128i);
                    let xp = x.as_ptr().add(b * QK);
                    let blk = dot32(
                        [
                            i8x8(q0),
                            i8x8(_mm_srli_si128(q0, 8)),
                            i8x8(q1),
                            i8x8(_mm_srli_si128(q1, 8)),
                        ],
                        xp,
                    );
                    acc = _mm256_fmadd_ps(d, blk, acc);
                }
                hsum(acc)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exact_kernels_equal_the_dequantized_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (70, 96), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let linear = Linear::from_qtensor(q.clone()).unwrap();
            assert!(matches!(linear, Linear::Exact(_)), "{dtype:?}");
            let dense = q.dequantize(&dev).unwrap();
            for m in [1, 3, 9] {
                let x = Tensor::randn(0f32, 1.0, (1, m, 96), &dev).unwrap();
                let got = linear.forward(&x).unwrap();
                let want = x.broadcast_matmul(&dense.t().unwrap()).unwrap();
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "{dtype:?} m={m}: {diff}");
            }
        }
    }

    #[test]
    fn a_matrix_bigger_than_a_chunk_is_dequantized_in_slices_exactly() {
        let dev = Device::Cpu;
        // 1100 x 4096 in f32 is 18 MB: two slices.
        let w = Tensor::randn(0f32, 0.5, (1100, 4096), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 6, 4096), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let Linear::Exact(exact) = Linear::from_qtensor(q.clone()).unwrap() else {
                panic!("{dtype:?} is computed exactly")
            };
            let dense = q.dequantize(&dev).unwrap();
            let ours = exact.dequantize(&q.data().unwrap());
            assert_eq!(
                ours,
                dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{dtype:?}"
            );
            let got = exact.forward(&x).unwrap();
            let want = x.broadcast_matmul(&dense.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-3, "{dtype:?}");
        }
    }

    #[test]
    fn vector_and_portable_dot_products_agree() {
        let w = Tensor::randn(0f32, 0.5, (3, 128), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) / 7.0)
            .collect();
        let sums: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let data = q.data().unwrap();
            let row_bytes = data.len() / 3;
            for row in data.chunks_exact(row_bytes) {
                let (fast, portable) = match dtype {
                    GgmlDType::Q4_1 => (simd::dot_q4_1(row, &x, &sums), dot_q4_1(row, &x, &sums)),
                    _ => (simd::dot_q8_0(row, &x), dot_q8_0(row, &x)),
                };
                assert!(
                    (fast - portable).abs() <= 1e-4 * portable.abs().max(1.0),
                    "{dtype:?}: {fast} vs {portable}"
                );
            }
        }
    }

    #[test]
    fn other_formats_fall_back_to_candle() {
        let w = Tensor::randn(0f32, 0.5, (8, 256), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap());
        assert!(matches!(
            Linear::from_qtensor(q).unwrap(),
            Linear::Candle(_)
        ));
    }
}

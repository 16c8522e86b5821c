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
//! kernels. Dense f32 weights take a gemv of their own for a few rows (one
//! decode step): candle's general matmul reads a one-row product at about a
//! quarter of the machine's memory bandwidth.

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
    /// Dense f32 weights on CPU: our gemv for a few rows, candle's matmul
    /// for more.
    Dense(Arc<DenseF32>),
    /// Anything candle computes (other devices, other quantized types).
    Candle(QMatMul),
}

/// A dense f32 matrix on CPU, rows contiguous.
#[derive(Debug)]
pub struct DenseF32 {
    rows: usize,
    cols: usize,
    weight: Tensor,
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

/// Up to this many rows go through the fused kernels (weights read once for
/// all rows: a decode step, a speculative step's few positions, a short
/// prompt); larger batches dequantize the matrix (a slice at a time) and
/// use a dense matmul.
const FUSED_MAX_ROWS: usize = 8;

/// Quantized products of up to this many rows (several sessions' decode
/// steps run together) go through the fused kernels in groups of
/// [`FUSED_MAX_ROWS`], each weight row read from memory once for all the
/// groups; every row comes out as it does alone.
const FUSED_GROUPED_ROWS: usize = 2 * FUSED_MAX_ROWS;

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
        let f32_on_cpu = tensor.device().is_cpu() && tensor.dtype() == candle_core::DType::F32;
        match tensor.dims2() {
            Ok((rows, cols)) if f32_on_cpu => match tensor.contiguous() {
                Ok(weight) => Self::Dense(Arc::new(DenseF32 { rows, cols, weight })),
                Err(_) => Self::Candle(QMatMul::Tensor(tensor)),
            },
            _ => Self::Candle(QMatMul::Tensor(tensor)),
        }
    }

    /// Most rows a product takes such that each row comes out bit for bit
    /// as it does alone (the kernels' per-row paths), for batching several
    /// sessions' steps; 1 where nothing is promised (candle's kernels).
    pub fn exact_rows(&self) -> usize {
        match self {
            Self::Exact(_) => FUSED_GROUPED_ROWS,
            Self::Dense(_) => FUSED_MAX_ROWS,
            Self::Candle(_) => 1,
        }
    }

    /// `xs @ W^T` for `xs` of shape (..., in).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(xs)?),
            Self::Exact(q) => q.forward(xs),
            Self::Dense(d) => d.forward(xs),
        }
    }
}

/// Checks `xs` against a weight width and returns (rows of `xs`, output dims).
fn product_shape(xs: &Tensor, cols: usize, rows: usize) -> Result<(usize, Vec<usize>)> {
    let dims = xs.dims();
    let Some((&k, lead)) = dims.split_last() else {
        return Err(candle_core::Error::Msg("matmul input has no dimensions".into()).into());
    };
    if k != cols {
        return Err(candle_core::Error::Msg(format!(
            "matmul input width {k} does not match weight width {cols}"
        ))
        .into());
    }
    let mut out_dims = lead.to_vec();
    out_dims.push(rows);
    Ok((lead.iter().product(), out_dims))
}

/// Each activation row of `x` (rows of `k` values) against every weight row,
/// computing `out[i][row] = dot(row, x_i)`.
fn gemv_rows(
    x: &[f32],
    k: usize,
    rows: usize,
    dot: impl Fn(usize, &[f32]) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = vec![0f32; x.len() / k * rows];
    for (x_row, out_row) in x.chunks_exact(k).zip(out.chunks_exact_mut(rows)) {
        par_rows(out_row, |row| dot(row, x_row));
    }
    out
}

/// Calls `fill(row, chunk)` for every `row_len`-long chunk of `out`, in
/// parallel over chunks on the engine's pool.
pub(crate) fn par_chunks(out: &mut [f32], row_len: usize, fill: impl Fn(usize, &mut [f32]) + Sync) {
    let out_ptr = SharedOut(out.as_mut_ptr());
    let rows = out.len() / row_len.max(1);
    crate::pool::execute_chunked(rows, |range| {
        let out_ptr = &out_ptr;
        for row in range {
            // SAFETY: execute_chunked hands out disjoint row ranges within
            // 0..rows, so each chunk is borrowed by one thread only, inside
            // `out`, which outlives the call (it blocks until all are done).
            let chunk =
                unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(row * row_len), row_len) };
            fill(row, chunk);
        }
    });
}

/// Fills `out[row] = f(row)` in parallel over rows on the engine's pool
/// ([`crate::pool`]): the calling thread works too. A second pool (rayon's)
/// beside candle's oversubscribed the cores and spent a third of decode
/// time in the scheduler.
fn par_rows(out: &mut [f32], f: impl Fn(usize) -> f32 + Sync) {
    let out_ptr = SharedOut(out.as_mut_ptr());
    let rows = out.len();
    crate::pool::execute_chunked(rows, |range| {
        let out_ptr = &out_ptr;
        for row in range {
            // SAFETY: execute_chunked hands out disjoint row ranges within
            // 0..rows, so each element of `out` is written by one thread,
            // and `out` outlives the call, which blocks until all are done.
            unsafe { *out_ptr.0.add(row) = f(row) };
        }
    });
}

impl DenseF32 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (m, out_dims) = product_shape(xs, self.cols, self.rows)?;
        if m > FUSED_MAX_ROWS {
            let x = xs.reshape((m, self.cols))?;
            return Ok(x.matmul(&self.weight.t()?)?.reshape(out_dims)?);
        }
        let x: Vec<f32> = xs
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let (storage, layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(candle_core::Error::Msg("dense weight left the CPU".into()).into());
        };
        let all = cpu.as_slice::<f32>()?;
        let start = layout.start_offset();
        let Some(w) = all.get(start..start + self.rows * self.cols) else {
            return Err(
                candle_core::Error::Msg("dense weight shorter than its shape".into()).into(),
            );
        };
        let cols = self.cols;
        let out = gemv_rows(&x, cols, self.rows, |row, x_row| {
            simd::dot_f32(&w[row * cols..(row + 1) * cols], x_row)
        });
        drop(storage);
        Ok(Tensor::from_vec(out, out_dims, xs.device())?)
    }
}

impl ExactQuantized {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (m, out_dims) = product_shape(xs, self.cols, self.rows)?;
        if m > FUSED_GROUPED_ROWS {
            return self.dequantized_matmul(xs, m, &out_dims);
        }
        let x: Vec<f32> = xs
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let data = self.qtensor.data()?;
        let row_bytes = self.cols / QK * self.format.block_bytes();
        // Block sums of each row of x, for the Q4_1 offset and Q4_0's
        // implicit -8.
        let x_sums: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
        let mut out = vec![0f32; m * self.rows];
        if m == 1 {
            par_rows(&mut out, |row| {
                let bytes = &data[row * row_bytes..(row + 1) * row_bytes];
                match self.format {
                    BlockFormat::Q4_1 => simd::dot_q4_1(bytes, &x, &x_sums),
                    BlockFormat::Q4_0 => simd::dot_q4_0(bytes, &x, &x_sums),
                    BlockFormat::Q8_0 => simd::dot_q8_0(bytes, &x),
                }
            });
        } else {
            // Each weight row against every activation row at once (in
            // groups of FUSED_MAX_ROWS): the weights are read (and widened)
            // once for all of them.
            let (rows, cols, format) = (self.rows, self.cols, self.format);
            let per_row = cols / QK;
            let out_ptr = SharedOut(out.as_mut_ptr());
            crate::pool::execute_chunked(rows, |range| {
                let out_ptr = &out_ptr;
                let mut dots = [0f32; FUSED_MAX_ROWS];
                for row in range {
                    let bytes = &data[row * row_bytes..(row + 1) * row_bytes];
                    for first in (0..m).step_by(FUSED_MAX_ROWS) {
                        let n = (m - first).min(FUSED_MAX_ROWS);
                        simd::dots(
                            format,
                            bytes,
                            &x[first * cols..],
                            cols,
                            &x_sums[first * per_row..],
                            &mut dots[..n],
                        );
                        for (i, v) in dots[..n].iter().enumerate() {
                            // SAFETY: row < rows and first + i < m, so the
                            // index is inside `out` (m * rows); each row is
                            // handed to one thread, so no element is
                            // written twice, and `out` outlives the call,
                            // which blocks until done.
                            unsafe { *out_ptr.0.add((first + i) * rows + row) = *v };
                        }
                    }
                }
            });
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

fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(w, x)| w * x).sum()
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
pub(crate) mod simd {
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
            return unsafe { avx2::dot::<{ avx2::Q4_1 }>(row, x, x_sums) };
        }
        super::dot_q4_1(row, x, x_sums)
    }

    pub(super) fn dot_q4_0(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && row.len() / 18 * super::QK <= x.len() && row.len() / 18 <= x_sums.len() {
            // SAFETY: as above.
            return unsafe { avx2::dot::<{ avx2::Q4_0 }>(row, x, x_sums) };
        }
        super::dot_q4_0(row, x, x_sums)
    }

    /// One weight row against `out.len()` activation rows of `k` values
    /// each (`x` holds them one after another, `x_sums` their block sums).
    pub(super) fn dots(
        format: super::BlockFormat,
        row: &[u8],
        x: &[f32],
        k: usize,
        x_sums: &[f32],
        out: &mut [f32],
    ) {
        let m = out.len();
        let blocks = row.len() / format.block_bytes();
        #[cfg(target_arch = "x86_64")]
        if has_avx2()
            && m <= super::FUSED_MAX_ROWS
            && blocks * super::QK <= k
            && m * k <= x.len()
            && m * (k / super::QK) <= x_sums.len()
        {
            // SAFETY: AVX2 and FMA are present and the lengths cover
            // every block read for every row.
            unsafe {
                match format {
                    super::BlockFormat::Q4_1 => {
                        avx2::dots::<{ avx2::Q4_1 }>(row, x, k, x_sums, out)
                    }
                    super::BlockFormat::Q4_0 => {
                        avx2::dots::<{ avx2::Q4_0 }>(row, x, k, x_sums, out)
                    }
                    super::BlockFormat::Q8_0 => {
                        avx2::dots::<{ avx2::Q8_0 }>(row, x, k, x_sums, out)
                    }
                }
            };
            return;
        }
        let per_row = k / super::QK;
        for (i, o) in out.iter_mut().enumerate() {
            let (xr, sr) = (
                &x[i * k..(i + 1) * k],
                &x_sums[i * per_row..(i + 1) * per_row],
            );
            *o = match format {
                super::BlockFormat::Q4_1 => super::dot_q4_1(row, xr, sr),
                super::BlockFormat::Q4_0 => super::dot_q4_0(row, xr, sr),
                super::BlockFormat::Q8_0 => super::dot_q8_0(row, xr),
            };
        }
    }

    pub(crate) fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && w.len() <= x.len() {
            // SAFETY: as above; x covers every weight.
            return unsafe { avx2::dot_f32(w, x) };
        }
        super::dot_f32(w, x)
    }

    pub(super) fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() && row.len() / 34 * super::QK <= x.len() {
            // SAFETY: as above.
            return unsafe { avx2::dot::<{ avx2::Q8_0 }>(row, x, &[]) };
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

        /// The formats, as const parameters: each kernel is compiled for
        /// one, with no branch on the format in its loop.
        pub(super) const Q4_1: u8 = 0;
        pub(super) const Q4_0: u8 = 1;
        pub(super) const Q8_0: u8 = 2;

        const fn block_bytes(format: u8) -> usize {
            match format {
                Q4_1 => 20,
                Q4_0 => 18,
                _ => 34,
            }
        }

        /// One weight row against one activation row.
        ///
        /// # Safety
        /// Needs AVX2 + FMA; `x` must cover every block of `row`, and
        /// `x_sums` too unless the format is Q8_0.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn dot<const F: u8>(row: &[u8], x: &[f32], x_sums: &[f32]) -> f32 {
            // SAFETY: `widen` reads inside each block; the loads read 32
            // floats at b * 32 of `x`, which the caller sized.
            unsafe {
                let mut acc = _mm256_setzero_ps();
                let mut offsets = 0f32;
                for (b, block) in row.chunks_exact(block_bytes(F)).enumerate() {
                    let (w, d, offset) = widen::<F>(block);
                    let blk = dot32(w, x.as_ptr().add(b * QK));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), blk, acc);
                    if F != Q8_0 {
                        offsets += offset * x_sums[b];
                    }
                }
                hsum(acc) + offsets
            }
        }

        /// The 32 weights of a block as four vectors of eight, with the
        /// block's scale and the factor of its x block sum.
        ///
        /// # Safety
        /// `block` must hold a whole block of `format`.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn widen<const F: u8>(block: &[u8]) -> ([__m256; 4], f32, f32) {
            // SAFETY: each arm reads inside its format's block.
            unsafe {
                match F {
                    Q4_1 | Q4_0 => {
                        let at = if F == Q4_1 { 4 } else { 2 };
                        let mask = _mm_set1_epi8(0x0F);
                        let qs = _mm_loadu_si128(block.as_ptr().add(at) as *const __m128i);
                        let lo = _mm_and_si128(qs, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
                        let d = half_at(block, 0);
                        // Q4_1: + min * sum(x); Q4_0: the stored nibble is q + 8.
                        let offset = if F == Q4_1 {
                            half_at(block, 2)
                        } else {
                            -8.0 * d
                        };
                        (
                            [
                                u8x8(lo),
                                u8x8(_mm_srli_si128(lo, 8)),
                                u8x8(hi),
                                u8x8(_mm_srli_si128(hi, 8)),
                            ],
                            d,
                            offset,
                        )
                    }
                    _ => {
                        let q0 = _mm_loadu_si128(block.as_ptr().add(2) as *const __m128i);
                        let q1 = _mm_loadu_si128(block.as_ptr().add(18) as *const __m128i);
                        (
                            [
                                i8x8(q0),
                                i8x8(_mm_srli_si128(q0, 8)),
                                i8x8(q1),
                                i8x8(_mm_srli_si128(q1, 8)),
                            ],
                            half_at(block, 0),
                            0.0,
                        )
                    }
                }
            }
        }

        /// # Safety
        /// Needs AVX2 + FMA; `out.len()` at most `FUSED_MAX_ROWS`; `x`
        /// and `x_sums` must cover every block of `row` for every row.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn dots<const F: u8>(
            row: &[u8],
            x: &[f32],
            k: usize,
            x_sums: &[f32],
            out: &mut [f32],
        ) {
            let m = out.len();
            let per_row = k / QK;
            let mut acc = [_mm256_setzero_ps(); super::super::FUSED_MAX_ROWS];
            let mut offsets = [0f32; super::super::FUSED_MAX_ROWS];
            // SAFETY: the caller sized x and x_sums for m rows of k values.
            unsafe {
                for (b, block) in row.chunks_exact(block_bytes(F)).enumerate() {
                    let (w, d, offset) = widen::<F>(block);
                    let dv = _mm256_set1_ps(d);
                    for r in 0..m {
                        let blk = dot32(w, x.as_ptr().add(r * k + b * QK));
                        acc[r] = _mm256_fmadd_ps(dv, blk, acc[r]);
                        offsets[r] += offset * x_sums[r * per_row + b];
                    }
                }
                for r in 0..m {
                    out[r] = hsum(acc[r]) + offsets[r];
                }
            }
        }

        /// # Safety
        /// Needs AVX2 + FMA; `x` must be at least as long as `w`.
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
            // SAFETY: every load reads 8 floats below w.len() <= x.len().
            unsafe {
                let n = w.len();
                let (wp, xp) = (w.as_ptr(), x.as_ptr());
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i + 32 <= n {
                    for (j, a) in acc.iter_mut().enumerate() {
                        let at = i + 8 * j;
                        *a = _mm256_fmadd_ps(
                            _mm256_loadu_ps(wp.add(at)),
                            _mm256_loadu_ps(xp.add(at)),
                            *a,
                        );
                    }
                    i += 32;
                }
                while i + 8 <= n {
                    acc[0] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(wp.add(i)),
                        _mm256_loadu_ps(xp.add(i)),
                        acc[0],
                    );
                    i += 8;
                }
                let sum =
                    _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let mut total = hsum(sum);
                while i < n {
                    total += *wp.add(i) * *xp.add(i);
                    i += 1;
                }
                total
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn exact_kernels_equal_the_dequantized_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (70, 96), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let linear = Linear::from_qtensor(q.clone()).unwrap();
            assert!(matches!(linear, Linear::Exact(_)), "{dtype:?}");
            let dense = q.dequantize(&dev).unwrap();
            for m in [1, 2, 3, 5, 8, 9] {
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
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let data = q.data().unwrap();
            let row_bytes = data.len() / 3;
            for row in data.chunks_exact(row_bytes) {
                let (fast, portable) = match dtype {
                    GgmlDType::Q4_1 => (simd::dot_q4_1(row, &x, &sums), dot_q4_1(row, &x, &sums)),
                    GgmlDType::Q4_0 => (simd::dot_q4_0(row, &x, &sums), dot_q4_0(row, &x, &sums)),
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
    fn rows_computed_together_equal_rows_computed_alone() {
        // A step of several positions (a speculative step) must give each
        // position exactly what a step of that position alone gives.
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (37, 256), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 8, 256), &dev).unwrap();
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let linear =
                Linear::from_qtensor(Arc::new(QTensor::quantize(&w, dtype).unwrap())).unwrap();
            let together = linear.forward(&x).unwrap().to_vec3::<f32>().unwrap();
            for (i, row) in together[0].iter().enumerate() {
                let alone = linear
                    .forward(&x.narrow(1, i, 1).unwrap())
                    .unwrap()
                    .to_vec3::<f32>()
                    .unwrap();
                assert_eq!(row, &alone[0][0], "{dtype:?} row {i}");
            }
        }
    }

    #[test]
    fn dense_gemv_equals_candles_matmul() {
        let dev = Device::Cpu;
        // Widths that are and are not multiples of the vector's 8 and 32 lanes;
        // a weight that is a view at an offset (narrowed) and one transposed.
        let big = Tensor::randn(0f32, 0.5, (300, 581), &dev).unwrap();
        let weights = [
            big.narrow(0, 7, 70).unwrap().narrow(1, 0, 96).unwrap(),
            big.narrow(0, 3, 40).unwrap(),
            big.narrow(1, 5, 37)
                .unwrap()
                .narrow(0, 0, 64)
                .unwrap()
                .t()
                .unwrap(),
        ];
        for w in weights {
            let (rows, cols) = w.dims2().unwrap();
            let linear = Linear::dense(w.clone());
            assert!(matches!(linear, Linear::Dense(_)));
            for m in [1, 2, 4, 5, 9] {
                let x = Tensor::randn(0f32, 1.0, (1, m, cols), &dev).unwrap();
                let got = linear.forward(&x).unwrap();
                assert_eq!(got.dims(), &[1, m, rows]);
                let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "{rows}x{cols} m={m}: {diff}");
            }
            let wrong = Tensor::zeros((1, cols + 1), DType::F32, &dev).unwrap();
            assert!(linear.forward(&wrong).is_err());
        }
        let x: Vec<f32> = (0..77).map(|i| (i as f32 - 30.0) / 11.0).collect();
        let w: Vec<f32> = (0..77).map(|i| ((i * 13 % 7) as f32 - 3.0) / 5.0).collect();
        let (fast, portable) = (simd::dot_f32(&w, &x), dot_f32(&w, &x));
        assert!((fast - portable).abs() <= 1e-5 * portable.abs().max(1.0));
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

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
use rayon::prelude::*;

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

/// Up to this many rows go through the fused kernel; larger batches
/// dequantize the matrix once and use a dense matmul.
const FUSED_MAX_ROWS: usize = 4;

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
            let w = self.qtensor.dequantize(xs.device())?;
            return Ok(xs.broadcast_matmul(&w.t()?)?);
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

    /// One activation row against every weight row, in parallel over rows.
    fn gemv(&self, data: &[u8], x: &[f32], out: &mut [f32]) {
        let blocks = self.cols / QK;
        let row_bytes = blocks * self.format.block_bytes();
        // Block sums of x, for the Q4_1 offset and Q4_0's implicit -8.
        let x_sums: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
        const CHUNK: usize = 64;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(chunk, out_rows)| {
                for (i, o) in out_rows.iter_mut().enumerate() {
                    let row = chunk * CHUNK + i;
                    let bytes = &data[row * row_bytes..(row + 1) * row_bytes];
                    *o = match self.format {
                        BlockFormat::Q4_1 => dot_q4_1(bytes, x, &x_sums),
                        BlockFormat::Q4_0 => dot_q4_0(bytes, x, &x_sums),
                        BlockFormat::Q8_0 => dot_q8_0(bytes, x),
                    };
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
    fn other_formats_fall_back_to_candle() {
        let w = Tensor::randn(0f32, 0.5, (8, 256), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4K).unwrap());
        assert!(matches!(
            Linear::from_qtensor(q).unwrap(),
            Linear::Candle(_)
        ));
    }
}

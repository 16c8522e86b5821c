//! `sherpa bench`: speed figures measured side by side in one run.
//!
//! Every comparison is a ratio of two measurements taken in the same process,
//! interleaved, so a noisy machine skews both sides alike. With the
//! `bench-baseline` feature the local decode is compared against
//! candle-transformers' `quantized_llama` on the same file. [`swarm`] adds
//! the network: a hop's round trip against raw TCP, and decode through three
//! servers against local decode.

pub mod swarm;

use std::path::Path;
use std::time::{Duration, Instant};

use swarm_shard::{Device, GenerateOptions, LocalModel, ModelFiles, WeightPrecision};

use crate::error::SherpaError;

/// One measured figure.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRecord {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// For comparisons: this figure over the one it is compared with.
    pub ratio: Option<f64>,
    /// For comparisons: the ratio the project aims for.
    pub target: Option<f64>,
}

impl BenchRecord {
    fn plain(name: &str, value: f64, unit: &'static str) -> Self {
        Self {
            name: name.to_owned(),
            value,
            unit,
            ratio: None,
            target: None,
        }
    }

    /// One JSON object on one line: `name`, `value`, `unit`, and `ratio`,
    /// `target` when present.
    pub fn to_json(&self) -> String {
        let mut out = format!(
            "{{\"name\":{:?},\"value\":{},\"unit\":{:?}",
            self.name,
            json_number(self.value),
            self.unit
        );
        if let Some(r) = self.ratio {
            out.push_str(&format!(",\"ratio\":{}", json_number(r)));
        }
        if let Some(t) = self.target {
            out.push_str(&format!(",\"target\":{}", json_number(t)));
        }
        out.push('}');
        out
    }

    /// A line for people.
    pub fn to_text(&self) -> String {
        let mut out = format!("{:<40} {:>10.2} {}", self.name, self.value, self.unit);
        if let (Some(r), Some(t)) = (self.ratio, self.target) {
            let verdict = if r >= t { "meets" } else { "below" };
            out.push_str(&format!("   ratio {r:.3} ({verdict} target {t})"));
        }
        out
    }
}

fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.6}")
    } else {
        "null".to_owned()
    }
}

/// Settings of a benchmark run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BenchSettings {
    /// Tokens generated per decode measurement.
    pub new_tokens: usize,
    /// Measurements per figure; the median is reported.
    pub repeats: usize,
}

impl Default for BenchSettings {
    /// 64 tokens, 5 repeats.
    fn default() -> Self {
        Self {
            new_tokens: 64,
            repeats: 5,
        }
    }
}

const PROMPT: [u32; 16] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
];

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Measures the local engine on the model at `path`, calling `report` with
/// each figure as soon as it is known.
pub fn run_local(
    path: &Path,
    settings: &BenchSettings,
    report: &mut dyn FnMut(BenchRecord),
) -> Result<(), SherpaError> {
    let files = ModelFiles::open(path)?;
    let model = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native)?;
    let block_bytes: usize = model.shards().iter().map(|s| s.weight_bytes()).sum();
    report(BenchRecord::plain(
        "model_weight_bytes",
        (block_bytes + model.head().weight_bytes()) as f64,
        "bytes",
    ));
    // Every generated token reads all block weights and the whole LM head.
    let bytes_per_token = (block_bytes + model.head().lm_head_bytes()) as f64;
    report(BenchRecord::plain(
        "weight_bytes_read_per_token",
        bytes_per_token,
        "bytes",
    ));

    let options = GenerateOptions::default()
        .with_max_new_tokens(settings.new_tokens)
        .with_stop_at_eos(false);
    let ours = || -> Result<(f64, f64), SherpaError> {
        let out = model.generate(&PROMPT, &options, &mut |_| Ok(true))?;
        Ok((
            out.decode_tokens_per_second(),
            out.prefill_tokens_per_second(),
        ))
    };
    #[cfg(feature = "bench-baseline")]
    let mut baseline = baseline::CandleTransformers::load(path)?;

    // Warm up caches and thread pools once on each side.
    ours()?;
    #[cfg(feature = "bench-baseline")]
    baseline.decode(&PROMPT, settings.new_tokens)?;

    let mut our_decode = Vec::new();
    let mut our_prefill = Vec::new();
    #[cfg(feature = "bench-baseline")]
    let mut their_decode = Vec::new();
    for _ in 0..settings.repeats.max(1) {
        let (d, p) = ours()?;
        our_decode.push(d);
        our_prefill.push(p);
        #[cfg(feature = "bench-baseline")]
        their_decode.push(baseline.decode(&PROMPT, settings.new_tokens)?);
    }
    let decode = median(our_decode);
    report(BenchRecord::plain(
        "local_prefill_16",
        median(our_prefill),
        "tokens/s",
    ));
    report(BenchRecord::plain("local_decode", decode, "tokens/s"));
    #[cfg(feature = "bench-baseline")]
    {
        let theirs = median(their_decode);
        report(BenchRecord::plain(
            "candle_transformers_decode",
            theirs,
            "tokens/s",
        ));
        report(BenchRecord {
            name: "local_decode_vs_candle_transformers".into(),
            value: decode,
            unit: "tokens/s",
            ratio: Some(decode / theirs),
            target: Some(1.0),
        });
    }

    let bandwidth = copy_bandwidth();
    report(BenchRecord::plain(
        "memory_copy_bandwidth",
        bandwidth,
        "bytes/s",
    ));
    let ceiling = bandwidth / bytes_per_token;
    report(BenchRecord::plain(
        "decode_bandwidth_ceiling",
        ceiling,
        "tokens/s",
    ));
    report(BenchRecord {
        name: "local_decode_vs_bandwidth_ceiling".into(),
        value: decode,
        unit: "tokens/s",
        ratio: Some(decode / ceiling),
        target: None,
    });
    Ok(())
}

/// Best-of-three copy of 256 MiB, in bytes per second.
fn copy_bandwidth() -> f64 {
    const BYTES: usize = 256 << 20;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        best = best.min(started.elapsed());
    }
    BYTES as f64 / best.as_secs_f64().max(1e-9)
}

#[cfg(feature = "bench-baseline")]
mod baseline {
    use std::path::Path;
    use std::time::Instant;

    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;

    use crate::error::SherpaError;

    fn err(e: candle_core::Error) -> SherpaError {
        SherpaError::Shard(e.into())
    }

    /// candle-transformers' quantized Llama on the same GGUF.
    pub struct CandleTransformers {
        model: ModelWeights,
    }

    impl CandleTransformers {
        pub fn load(path: &Path) -> Result<Self, SherpaError> {
            let mut file = std::fs::File::open(path).map_err(|source| SherpaError::Io {
                path: path.to_owned(),
                source,
            })?;
            let content =
                candle_core::quantized::gguf_file::Content::read(&mut file).map_err(err)?;
            let model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).map_err(err)?;
            Ok(Self { model })
        }

        /// Greedy decode; returns tokens/s after the first token, like ours.
        pub fn decode(&mut self, prompt: &[u32], new_tokens: usize) -> Result<f64, SherpaError> {
            let input = Tensor::new(prompt, &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .map_err(err)?;
            let mut logits = self.model.forward(&input, 0).map_err(err)?;
            let started = Instant::now();
            for i in 1..new_tokens {
                let next = logits
                    .squeeze(0)
                    .and_then(|l| l.argmax(0))
                    .and_then(|t| t.to_scalar::<u32>())
                    .map_err(err)?;
                let input = Tensor::new(&[next], &Device::Cpu)
                    .and_then(|t| t.unsqueeze(0))
                    .map_err(err)?;
                logits = self
                    .model
                    .forward(&input, prompt.len() + i - 1)
                    .map_err(err)?;
            }
            Ok((new_tokens - 1) as f64 / started.elapsed().as_secs_f64().max(1e-9))
        }
    }
}

swarm_core::with_setters!(BenchSettings {
    new_tokens: usize => with_new_tokens,
    repeats: usize => with_repeats,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_print_as_one_json_object_per_line() {
        let r = BenchRecord {
            name: "x".into(),
            value: 2.5,
            unit: "tokens/s",
            ratio: Some(0.5),
            target: Some(1.0),
        };
        let json = r.to_json();
        assert!(!json.contains('\n'));
        assert_eq!(
            json,
            r#"{"name":"x","value":2.500000,"unit":"tokens/s","ratio":0.500000,"target":1.000000}"#
        );
        assert!(r.to_text().contains("below target 1"));
        let plain = BenchRecord::plain("y", f64::NAN, "bytes").to_json();
        assert_eq!(plain, r#"{"name":"y","value":null,"unit":"bytes"}"#);
    }
}

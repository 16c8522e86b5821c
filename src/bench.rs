//! `sherpa bench`: speed figures measured side by side in one run.
//!
//! Every comparison is a ratio of two measurements taken in the same process,
//! interleaved, so a noisy machine skews both sides alike. With the
//! `bench-baseline` feature the local decode is compared against
//! candle-transformers' `quantized_llama` on the same file. [`swarm`] adds
//! the network: a hop's round trip against raw TCP, and decode through three
//! servers against local decode.

pub mod swarm;
pub mod wan;

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
    /// Sections to run (see [`SECTIONS`]); empty runs them all.
    pub only: Vec<String>,
    /// A llama.cpp `llama-bench` binary to measure side by side with local
    /// decode and prefill (`scripts/build-llama-bench.sh` builds one).
    pub llama_bench: Option<std::path::PathBuf>,
}

/// The sections of a run, in order: `local` (decode, prefill, bandwidth),
/// `hop` (one hop against raw TCP), `swarm` (three servers against local),
/// `petals` (the shape Petals was measured on), `sessions` (one server's
/// 16 concurrent sessions against one), `wan` (three servers across an
/// emulated WAN; needs root, skipped with a warning otherwise).
pub const SECTIONS: [&str; 6] = ["local", "hop", "swarm", "petals", "sessions", "wan"];

impl BenchSettings {
    /// Whether `section` is to run.
    pub fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

impl Default for BenchSettings {
    /// 64 tokens, 5 repeats, every section, no llama.cpp.
    fn default() -> Self {
        Self {
            new_tokens: 64,
            repeats: 5,
            only: Vec::new(),
            llama_bench: None,
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

/// A request whose reply quotes it: what speculative decoding is measured
/// on (drafts come from the text so far).
pub const QUOTE: &str = "Copy this text exactly, word for word: \"The mountain guide led the \
    travellers over the pass at dawn, and by noon they could see the valley below, green \
    and quiet under the snow.\"";

/// Length of the long prompt whose prefill is measured.
pub const LONG_PROMPT: usize = 512;

/// A prompt of [`LONG_PROMPT`] tokens: the short prompt repeated, which is
/// text-like enough for timing (prefill cost does not depend on the ids).
pub fn long_prompt() -> Vec<u32> {
    PROMPT.iter().copied().cycle().take(LONG_PROMPT).collect()
}

/// Measures the local engine on the model at `path`, calling `report` with
/// each figure as soon as it is known. With `settings.llama_bench`,
/// llama.cpp's decode and 512-token prefill on the same file are measured
/// in turn with ours.
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
    let prefill_only = GenerateOptions::default()
        .with_max_new_tokens(1)
        .with_stop_at_eos(false);
    let long = long_prompt();
    let ours = || -> Result<(f64, f64, f64), SherpaError> {
        let out = model.generate(&PROMPT, &options, &mut |_| Ok(true))?;
        let long = model.generate(&long, &prefill_only, &mut |_| Ok(true))?;
        Ok((
            out.decode_tokens_per_second(),
            out.prefill_tokens_per_second(),
            long.prefill_tokens_per_second(),
        ))
    };
    #[cfg(feature = "bench-baseline")]
    let mut baseline = baseline::CandleTransformers::load(path)?;
    let llama = settings
        .llama_bench
        .as_deref()
        .map(|bin| llama_cpp::LlamaBench::new(bin, path, settings.new_tokens));

    // Warm up caches and thread pools once on each side.
    ours()?;
    #[cfg(feature = "bench-baseline")]
    baseline.decode(&PROMPT, settings.new_tokens)?;

    let (mut our_decode, mut our_prefill, mut our_long) = (Vec::new(), Vec::new(), Vec::new());
    let (mut llama_decode, mut llama_long) = (Vec::new(), Vec::new());
    #[cfg(feature = "bench-baseline")]
    let mut their_decode = Vec::new();
    for _ in 0..settings.repeats.max(1) {
        let (d, p, l) = ours()?;
        our_decode.push(d);
        our_prefill.push(p);
        our_long.push(l);
        #[cfg(feature = "bench-baseline")]
        their_decode.push(baseline.decode(&PROMPT, settings.new_tokens)?);
        if let Some(llama) = &llama {
            let (d, l) = llama.run()?;
            llama_decode.push(d);
            llama_long.push(l);
        }
    }
    let decode = median(our_decode);
    let long = median(our_long);
    report(BenchRecord::plain(
        "local_prefill_16",
        median(our_prefill),
        "tokens/s",
    ));
    report(BenchRecord::plain(
        "local_decode_tokens_per_s",
        decode,
        "tokens/s",
    ));
    report(BenchRecord::plain(
        "local_prefill512_tokens_per_s",
        long,
        "tokens/s",
    ));
    if llama.is_some() {
        let (theirs, their_long) = (median(llama_decode), median(llama_long));
        report(BenchRecord::plain(
            "llama_cpp_decode_tokens_per_s",
            theirs,
            "tokens/s",
        ));
        report(BenchRecord {
            name: "local_decode_vs_llama_cpp".into(),
            value: decode,
            unit: "tokens/s",
            ratio: Some(decode / theirs),
            target: Some(1.0),
        });
        report(BenchRecord::plain(
            "llama_cpp_prefill512_tokens_per_s",
            their_long,
            "tokens/s",
        ));
        report(BenchRecord {
            name: "local_prefill512_vs_llama_cpp".into(),
            value: long,
            unit: "tokens/s",
            ratio: Some(long / their_long),
            target: Some(1.0),
        });
    }
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
    let read = swarm_shard::cpu::memory_read_bandwidth();
    report(BenchRecord::plain("memory_read_bandwidth", read, "bytes/s"));
    // Decode reads every weight once per token: the read bandwidth bounds it.
    let ceiling = read / bytes_per_token;
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

mod llama_cpp {
    //! llama.cpp's own benchmark, run as a child process on the same file.
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use crate::error::SherpaError;

    pub(super) struct LlamaBench {
        bin: PathBuf,
        model: PathBuf,
        tokens: usize,
        threads: usize,
    }

    fn failed(msg: String) -> SherpaError {
        SherpaError::Bench(format!("llama-bench: {msg}"))
    }

    impl LlamaBench {
        pub(super) fn new(bin: &Path, model: &Path, tokens: usize) -> Self {
            Self {
                bin: bin.to_owned(),
                model: model.to_owned(),
                tokens,
                threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            }
        }

        /// One measurement: (decode tokens/s, 512-token prefill tokens/s),
        /// on as many threads as ours.
        pub(super) fn run(&self) -> Result<(f64, f64), SherpaError> {
            let out = Command::new(&self.bin)
                .arg("-m")
                .arg(&self.model)
                .args(["-t", &self.threads.to_string()])
                .args(["-p", &super::LONG_PROMPT.to_string()])
                .args(["-n", &self.tokens.to_string()])
                .args(["-r", "1", "-o", "json"])
                .output()
                .map_err(|e| failed(format!("cannot run {}: {e}", self.bin.display())))?;
            if !out.status.success() {
                return Err(failed(format!(
                    "exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            parse(&out.stdout, super::LONG_PROMPT, self.tokens)
        }
    }

    /// Reads llama-bench's JSON: one entry per test, with `n_prompt`,
    /// `n_gen` and `avg_ts` (tokens per second).
    pub(super) fn parse(
        json: &[u8],
        prompt: usize,
        tokens: usize,
    ) -> Result<(f64, f64), SherpaError> {
        let tests: Vec<serde_json::Value> =
            serde_json::from_slice(json).map_err(|e| failed(format!("unreadable output: {e}")))?;
        let rate = |n_prompt: usize, n_gen: usize| {
            tests
                .iter()
                .find(|t| {
                    t["n_prompt"].as_u64() == Some(n_prompt as u64)
                        && t["n_gen"].as_u64() == Some(n_gen as u64)
                })
                .and_then(|t| t["avg_ts"].as_f64())
                .ok_or_else(|| {
                    failed(format!(
                        "no result for {n_prompt} prompt and {n_gen} generated tokens"
                    ))
                })
        };
        Ok((rate(0, tokens)?, rate(prompt, 0)?))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn llama_bench_json_gives_decode_and_prefill() {
            let json = br#"[{"n_prompt": 512, "n_gen": 0, "avg_ts": 201.5},
                            {"n_prompt": 0, "n_gen": 64, "avg_ts": 104.9}]"#;
            assert_eq!(super::parse(json, 512, 64).unwrap(), (104.9, 201.5));
            assert!(super::parse(json, 512, 128).is_err());
            assert!(super::parse(b"not json", 512, 64).is_err());
        }
    }
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
    only: Vec<String> => with_only,
    llama_bench: Option<std::path::PathBuf> => with_llama_bench,
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

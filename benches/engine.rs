//! Engine benchmarks on the real model (SmolLM2-135M-Instruct Q4_1, fetched
//! on first use): one decode step and a 128-token prefill, for one block and
//! for the whole model, with quantized and f32 weights; a side-by-side of our
//! local decode against candle-transformers' `quantized_llama` on the same
//! file; and a memory copy to put decode speed against the bandwidth ceiling.
//!
//! Run: `cargo bench --bench engine`. Compare numbers within one run only.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sherpa_swarm::core::BlockRange;
use sherpa_swarm::model_store::{fetch_model, known_model, DEFAULT_MODEL};
use sherpa_swarm::shard::{
    BlockShard, CacheBudget, ClientHead, Device, GenerateOptions, LocalModel, ModelFiles, Tensor,
    WeightPrecision,
};

fn model_path() -> std::path::PathBuf {
    fetch_model(
        known_model(DEFAULT_MODEL).unwrap(),
        &Default::default(),
        &mut |_| {},
    )
    .expect("benchmarks need the real model; see README")
}

const CONTEXT: usize = 64;

fn steps(c: &mut Criterion) {
    let path = model_path();
    let files = ModelFiles::open(&path).unwrap();
    let dev = Device::Cpu;
    let budget = CacheBudget::unlimited();
    let mut group = c.benchmark_group("engine");
    group.sample_size(20);
    for (label, precision) in [
        ("q4_1", WeightPrecision::Native),
        ("f32", WeightPrecision::F32),
    ] {
        let head = ClientHead::load(&files, &dev, precision).unwrap();
        for (span_label, range) in [
            ("block", BlockRange::new(0, 1).unwrap()),
            ("model", BlockRange::full(30).unwrap()),
        ] {
            let shard = Arc::new(BlockShard::load(&files, range, &dev, precision).unwrap());
            let context: Vec<u32> = (0..CONTEXT as u32).map(|i| 100 + i).collect();
            let one = head.embed(&[42]).unwrap();
            // Decode: one new position after CONTEXT cached ones.
            let mut cache = shard.new_session(CONTEXT + 1, &budget).unwrap();
            shard
                .forward(&head.embed(&context).unwrap(), &mut cache)
                .unwrap();
            group.throughput(Throughput::Elements(1));
            group.bench_function(
                BenchmarkId::new(format!("decode_step/{span_label}"), label),
                |b| {
                    b.iter(|| {
                        cache.truncate(CONTEXT);
                        black_box(shard.forward(&one, &mut cache).unwrap());
                    })
                },
            );
            // Prefill: 128 positions at once into an empty session.
            let prompt: Vec<u32> = (0..128u32).map(|i| 200 + i * 7).collect();
            let hidden = head.embed(&prompt).unwrap();
            let mut cache = shard.new_session(128, &budget).unwrap();
            group.throughput(Throughput::Elements(128));
            group.bench_function(
                BenchmarkId::new(format!("prefill_128/{span_label}"), label),
                |b| {
                    b.iter(|| {
                        cache.truncate(0);
                        black_box(shard.forward(&hidden, &mut cache).unwrap());
                    })
                },
            );
        }
    }
    group.finish();
}

/// 16-token prompt, then 32 greedy tokens: ours vs candle-transformers.
fn side_by_side(c: &mut Criterion) {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let path = model_path();
    let files = ModelFiles::open(&path).unwrap();
    let ours = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
    let mut reader = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    let mut theirs =
        ModelWeights::from_gguf(content, &mut reader, &candle_core::Device::Cpu).unwrap();
    let prompt: Vec<u32> = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
    ];
    const NEW: usize = 32;
    let mut group = c.benchmark_group("decode_32_tokens");
    group.sample_size(10);
    group.throughput(Throughput::Elements(NEW as u64));
    let options = GenerateOptions::default()
        .with_max_new_tokens(NEW)
        .with_stop_at_eos(false);
    group.bench_function("sherpa", |b| {
        b.iter(|| black_box(ours.generate(&prompt, &options, &mut |_| Ok(true)).unwrap()))
    });
    group.bench_function("candle_transformers", |b| {
        b.iter(|| {
            let input = Tensor::new(prompt.as_slice(), &candle_core::Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let mut logits = theirs.forward(&input, 0).unwrap();
            let mut out = Vec::with_capacity(NEW);
            for i in 0..NEW {
                let next = logits
                    .squeeze(0)
                    .unwrap()
                    .argmax(0)
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap();
                out.push(next);
                if i + 1 < NEW {
                    let input = Tensor::new(&[next], &candle_core::Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    logits = theirs.forward(&input, prompt.len() + i).unwrap();
                }
            }
            black_box(out)
        })
    });
    group.finish();
}

/// Copy bandwidth: the decode ceiling is model bytes per token over this.
fn copy_bandwidth(c: &mut Criterion) {
    const BYTES: usize = 256 << 20;
    let src = vec![1u8; BYTES];
    let mut dst = vec![0u8; BYTES];
    let mut group = c.benchmark_group("memory");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(BYTES as u64));
    group.bench_function("copy_256MiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    group.finish();
}

criterion_group!(benches, steps, side_by_side, copy_bandwidth);
criterion_main!(benches);

//! Wire benchmarks: server record encode, decode + verify; tensor frames.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sherpa_swarm::core::record::RECORD_VERSION;
use sherpa_swarm::core::tensor_frame::{self, WireDType};
use sherpa_swarm::core::{BlockRange, HardwareInfo, ModelId, NodeKey, ServerInfo, SignedRecord};

const NOW: u64 = 1_800_000_000_000;

fn records(c: &mut Criterion) {
    let key = NodeKey::from_seed([5; 32]);
    let info = ServerInfo {
        record_version: RECORD_VERSION,
        public_key: key.public_key(),
        model: ModelId::new("smollm2-135m").unwrap(),
        blocks: BlockRange::new(0, 10).unwrap(),
        model_blocks: 30,
        block_digests: vec![[7; 32]; 10],
        places_itself: false,
        throughput: 900.0,
        cache_tokens_free: 8192,
        sessions: 0,
        upload_bps: 10_000_000,
        download_bps: 100_000_000,
        hardware: HardwareInfo {
            cpu_cores: 8,
            ram_free: 16 << 30,
            gpu: None,
        },
        public_name: "bench".into(),
        software_version: "sherpa-swarm 0.1.0".into(),
        protocol_version: 1,
        issued_at_ms: NOW,
        expires_at_ms: NOW + 60_000,
    };
    let bytes = key.sign(&info).unwrap().to_bytes().unwrap();
    let mut group = c.benchmark_group("record");
    group.bench_function("sign_and_encode", |b| {
        b.iter(|| key.sign(black_box(&info)).unwrap().to_bytes().unwrap())
    });
    group.bench_function("decode_and_verify", |b| {
        b.iter(|| {
            SignedRecord::from_bytes(black_box(&bytes))
                .unwrap()
                .verify(Some(&key.public_key()), NOW)
                .unwrap()
        })
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    // One position of SmolLM2's hidden state and a 128-token prefill.
    let mut group = c.benchmark_group("tensor_frame");
    for positions in [1usize, 128] {
        let values: Vec<f32> = (0..positions * 576).map(|i| i as f32 * 1e-3).collect();
        let dims = [1, positions, 576];
        for dtype in [WireDType::F32, WireDType::F16] {
            let bytes = tensor_frame::encode(&values, &dims, dtype).unwrap();
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_function(format!("encode_decode/{positions}/{dtype:?}"), |b| {
                b.iter(|| {
                    let bytes = tensor_frame::encode(black_box(&values), &dims, dtype).unwrap();
                    tensor_frame::decode(&bytes, 1 << 20).unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, records, frames);
criterion_main!(benches);

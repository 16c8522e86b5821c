//! Swarm benchmarks, each beside its baseline in the same run:
//! - a hop's round trip for an 8 KiB activation over the inference protocol
//!   (a server that computes nothing; on its direct connection, and on the
//!   libp2p stream it falls back to) beside a raw TCP ping-pong of the same
//!   bytes on loopback (target: at most 2x);
//! - one decode step through a tracker and three servers in this process
//!   beside one local decode step (target: at least 0.9x the speed).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sherpa_swarm::bench::swarm::{
    echo_server, echo_session, tcp_echo, tcp_round_trip, ACTIVATION_VALUES,
};
use sherpa_swarm::core::ModelId;
use sherpa_swarm::model_store::{fetch_model, known_model, DEFAULT_MODEL};
use sherpa_swarm::shard::{Device, GenerateOptions, LocalModel, ModelFiles, WeightPrecision};
use sherpa_swarm::LocalSwarm;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn hop(c: &mut Criterion) {
    let rt = runtime();
    let server = rt.block_on(echo_server()).unwrap();
    let (_client, mut session) = rt.block_on(echo_session(&server, true)).unwrap();
    assert!(session.is_direct(), "the echo session did not go direct");
    let (_client2, mut stream_session) = rt.block_on(echo_session(&server, false)).unwrap();
    let (mut tcp, _task) = rt.block_on(tcp_echo(ACTIVATION_VALUES * 4)).unwrap();
    let activation = vec![0.5f32; ACTIVATION_VALUES];
    let mut bytes = vec![7u8; ACTIVATION_VALUES * 4];
    let mut group = c.benchmark_group("hop_round_trip_8KiB");
    group.throughput(Throughput::Bytes((ACTIVATION_VALUES * 4) as u64));
    // Each batch of round trips runs inside the runtime, as an application
    // drives a session: entering the runtime per round trip would add the
    // same cross-thread hand-off to both sides and hide the difference.
    group.bench_function("inference_protocol", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    session.step(&activation).await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("inference_protocol_libp2p_stream", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    stream_session.step(&activation).await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    group.bench_function("raw_tcp", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    tcp_round_trip(&mut tcp, &mut bytes).await.unwrap();
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

const PROMPT: [u32; 8] = [1, 9690, 198, 2683, 359, 253, 5356, 5646];
/// Tokens per generation; longer runs are split into several.
const CHUNK: u64 = 128;

/// Time of `iters` decode steps, prefill excluded, over generations of at
/// most [`CHUNK`] tokens.
fn decode_steps(iters: u64, mut generate: impl FnMut(usize) -> Duration) -> Duration {
    let mut left = iters;
    let mut total = Duration::ZERO;
    while left > 0 {
        let n = left.min(CHUNK);
        // n + 1 tokens: the first comes from the prefill.
        total += generate(n as usize + 1);
        left -= n;
    }
    total
}

fn options(tokens: usize) -> GenerateOptions {
    GenerateOptions::default()
        .with_max_new_tokens(tokens)
        .with_stop_at_eos(false)
}

fn decode(c: &mut Criterion) {
    let path = fetch_model(
        known_model(DEFAULT_MODEL).unwrap(),
        &Default::default(),
        &mut |_| {},
    )
    .unwrap();
    let files = ModelFiles::open(&path).unwrap();
    let local = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
    let rt = runtime();
    let swarm = rt
        .block_on(LocalSwarm::start(
            &path.to_string_lossy(),
            ModelId::new("bench-model").unwrap(),
            3,
        ))
        .unwrap();
    let client = &swarm.client;
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(10);
    group.bench_function("local", |b| {
        b.iter_custom(|iters| {
            decode_steps(iters, |n| {
                local
                    .generate(&PROMPT, &options(n), &mut |_| Ok(true))
                    .unwrap()
                    .decode
            })
        })
    });
    group.bench_function("swarm_3_servers", |b| {
        b.iter_custom(|iters| {
            decode_steps(iters, |n| {
                rt.block_on(client.generate(&PROMPT, &options(n), &mut |_| true))
                    .unwrap()
                    .output
                    .decode
            })
        })
    });
    group.finish();
    rt.block_on(swarm.shutdown());
}

criterion_group!(benches, hop, decode);
criterion_main!(benches);

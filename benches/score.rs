//! Decisions at swarm scale: scoring and selecting among 10,000 candidates
//! (target under 5 ms) and planning a route over 10,000 servers hosting
//! spans of an 80-block model (target under 10 ms).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use sherpa_swarm::core::{BlockRange, GpuInfo, HardwareInfo};
use sherpa_swarm::score::{plan, select, Candidate, Overrides, RouteOptions, SelectionPolicy};

const BLOCKS: u32 = 80;
const SERVERS: usize = 10_000;

/// A reproducible swarm from a small linear congruential generator.
fn swarm() -> Vec<Candidate> {
    let mut state = 0x5EED_u64;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    (0..SERVERS)
        .map(|i| {
            let len = 1 + next(16) as u32;
            let start = next(u64::from(BLOCKS - len + 1)) as u32;
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let gpu = (next(3) == 0).then(|| GpuInfo {
                name: "GPU".into(),
                compute_capability: (6 + next(4) as u8, 0),
                vram_total: 24 << 30,
                vram_free: (4 + next(20)) << 30,
            });
            Candidate {
                id,
                name: format!("node{i}"),
                blocks: BlockRange::new(start, start + len).unwrap(),
                hardware: HardwareInfo {
                    cpu_cores: 8,
                    ram_free: (2 + next(62)) << 30,
                    gpu,
                },
                throughput: 100.0 + next(50_000) as f64,
                cache_tokens_free: 8192,
                sessions: 0,
                upload_bps: 100_000 + next(100_000_000),
                download_bps: 100_000 + next(100_000_000),
                rtt: Some(Duration::from_millis(5 + next(200))),
            }
        })
        .collect()
}

fn decisions(c: &mut Criterion) {
    let swarm = swarm();
    let mut group = c.benchmark_group("score");
    group.bench_function("score_and_select_10k", |b| {
        b.iter(|| {
            let selection = select(
                black_box(&swarm),
                BLOCKS,
                &SelectionPolicy::default(),
                &Overrides::default(),
            )
            .unwrap();
            assert!(selection.uncovered.is_empty());
            selection
        })
    });
    let span = BlockRange::new(0, BLOCKS).unwrap();
    let options = RouteOptions::default();
    let avoid = HashSet::new();
    group.bench_function("plan_10k_servers_80_blocks", |b| {
        b.iter(|| plan(black_box(&swarm), span, &options, &avoid).unwrap())
    });
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);

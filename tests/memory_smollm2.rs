//! A shard holds only its blocks: resident memory of a 5-block shard versus
//! the whole model, measured in this process (one test per binary, so no
//! other test shares the process).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use swarm_core::BlockRange;
use swarm_shard::{BlockShard, ClientHead, Device, ModelFiles, WeightPrecision};

/// Resident set size of this process in bytes (Linux /proc).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_five_block_shard_uses_a_fraction_of_the_model_memory() {
    let path = common::smollm2();
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    let files = ModelFiles::open(&path).unwrap();
    let dev = Device::Cpu;

    let before = rss();
    let shard = BlockShard::load(
        &files,
        BlockRange::new(0, 5).unwrap(),
        &dev,
        WeightPrecision::Native,
    )
    .unwrap();
    let shard_rss = rss().saturating_sub(before);
    let shard_weights = shard.weight_bytes() as u64;
    drop(shard);

    let before = rss();
    let whole = BlockShard::load(
        &files,
        BlockRange::full(30).unwrap(),
        &dev,
        WeightPrecision::Native,
    )
    .unwrap();
    let head = ClientHead::load(&files, &dev, WeightPrecision::Native).unwrap();
    let whole_rss = rss().saturating_sub(before);
    let whole_weights = whole.weight_bytes() as u64;

    eprintln!(
        "file {:.1} MiB; shard 0..5: +{:.1} MiB RSS ({:.1} MiB weights); whole model + head: +{:.1} MiB RSS ({:.1} MiB block weights)",
        file_bytes as f64 / 1048576.0,
        shard_rss as f64 / 1048576.0,
        shard_weights as f64 / 1048576.0,
        whole_rss as f64 / 1048576.0,
        whole_weights as f64 / 1048576.0,
    );
    // Quantized weights stay quantized: 30 blocks of Q4_1 weigh well under
    // the f32 size (4.4M params a block * 4 bytes * 30 = 530 MB).
    assert!(
        whole_weights < 80 << 20,
        "whole model holds {whole_weights} bytes of block weights"
    );
    assert_eq!(shard_weights * 6, whole_weights, "5 of 30 identical blocks");
    // Resident memory follows: a 5-block shard is a small part of the whole.
    assert!(
        shard_rss * 3 < whole_rss,
        "shard {shard_rss} vs whole {whole_rss}"
    );
    drop((whole, head));
}

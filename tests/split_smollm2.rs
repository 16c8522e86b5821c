//! Splitting the real model into shards computes the same hidden states as
//! running it whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use swarm_core::BlockRange;
use swarm_shard::{
    BlockShard, CacheBudget, ClientHead, Device, ModelFiles, Tensor, WeightPrecision,
};

fn run(
    files: &ModelFiles,
    spans: &[BlockRange],
    hidden: &Tensor,
    steps: &[Tensor],
) -> Vec<Vec<f32>> {
    let budget = CacheBudget::unlimited();
    let shards: Vec<_> = spans
        .iter()
        .map(|r| BlockShard::load(files, *r, &Device::Cpu, WeightPrecision::F32).unwrap())
        .collect();
    let mut caches: Vec<_> = shards
        .iter()
        .map(|s| s.new_session(64, &budget).unwrap())
        .collect();
    let mut outputs = Vec::new();
    for input in std::iter::once(hidden).chain(steps) {
        let mut xs = input.clone();
        for (shard, cache) in shards.iter().zip(caches.iter_mut()) {
            xs = shard.forward(&xs, cache).unwrap();
        }
        outputs.push(xs.flatten_all().unwrap().to_vec1().unwrap());
    }
    outputs
}

#[test]
fn three_shards_equal_one_shard_on_smollm2() {
    let files = ModelFiles::open(common::smollm2()).unwrap();
    let head = ClientHead::load(&files, &Device::Cpu, WeightPrecision::F32).unwrap();
    let prompt = head
        .embed(&[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365])
        .unwrap();
    let steps: Vec<Tensor> = [28, 905, 17]
        .iter()
        .map(|&id| head.embed(&[id]).unwrap())
        .collect();
    let r = |a, b| BlockRange::new(a, b).unwrap();
    let whole = run(&files, &[r(0, 30)], &prompt, &steps);
    let split = run(&files, &[r(0, 10), r(10, 20), r(20, 30)], &prompt, &steps);
    for (step, (a, b)) in whole.iter().zip(&split).enumerate() {
        let diff = common::max_rel_diff(a, b);
        assert!(
            diff < 1e-4,
            "step {step}: hidden states differ by {diff} (relative)"
        );
    }
}

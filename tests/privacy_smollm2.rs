//! An honest-but-curious server: it follows the protocol but tries to
//! recover the prompt from the hidden states it receives. With the real
//! model's public weights it tries three attacks on the states a client
//! sends when it runs `local_blocks` = 0, 1, 2 blocks itself (the exact f32
//! values the first server's hop receives):
//! - nearest neighbour of each state against the public embedding table;
//! - a linear inverse of the client's blocks, fitted on states the attacker
//!   computes itself from random tokens, then nearest neighbour;
//! - inverting the blocks: for each position, the linear inverse's 64 best
//!   guesses (2048 when none of those matches) are run through the same
//!   blocks after the tokens recovered so far, and the guess whose output
//!   matches is kept.
//!
//! The recovery rates are printed and the README's threat model states
//! them; the assertions pin what that statement relies on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use candle_core::{DType, Device, Tensor, D};
use sherpa_swarm::core::BlockRange;
use sherpa_swarm::shard::{
    BlockShard, CacheBudget, ClientHead, ModelFiles, TextTokenizer, WeightPrecision,
};

const PROMPTS: [&str; 4] = [
    "My bank password is hunter2 and my account number is 4417 1234 5678 9113.",
    "Patient reports chest pain since Tuesday; prescribed aspirin, follow up in two weeks.",
    "Please summarise the attached contract between Acme Corp and Globex for the board.",
    "The meeting with the lawyers moved to Friday at noon, room 4B, bring the signed NDA.",
];

/// Guesses per position the inversion attack checks first, and how many
/// when none of those matches.
const SHORTLIST: usize = 64;
const WIDER: usize = 2048;

struct Model {
    head: ClientHead,
    blocks: BlockShard,
    /// The embedding table, (vocab, hidden), rows normalised.
    table: Tensor,
    vocab: usize,
}

fn load() -> (Model, TextTokenizer) {
    let files = ModelFiles::open(common::smollm2()).unwrap();
    let tokenizer = TextTokenizer::from_model(&files).unwrap();
    let head = ClientHead::load(&files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let blocks = BlockShard::load(
        &files,
        BlockRange::new(0, 2).unwrap(),
        &Device::Cpu,
        WeightPrecision::Native,
    )
    .unwrap();
    let vocab = files.config().vocab_size;
    let ids: Vec<u32> = (0..vocab as u32).collect();
    let rows: Vec<Tensor> = ids
        .chunks(4096)
        .map(|c| head.embed(c).unwrap().squeeze(0).unwrap())
        .collect();
    let table = normalise(&Tensor::cat(&rows, 0).unwrap());
    (
        Model {
            head,
            blocks,
            table,
            vocab,
        },
        tokenizer,
    )
}

fn normalise(x: &Tensor) -> Tensor {
    let norm = x
        .sqr()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap();
    x.broadcast_div(&(norm + 1e-6).unwrap()).unwrap()
}

/// The states a client running the first `k` blocks sends for `ids`,
/// (positions, hidden).
fn sent(model: &Model, ids: &[u32], k: u32) -> Tensor {
    let x = model.head.embed(ids).unwrap();
    if k == 0 {
        return x.squeeze(0).unwrap();
    }
    let shard = &model.blocks;
    let mut cache = shard
        .new_session_for(
            BlockRange::new(0, k).unwrap(),
            ids.len(),
            &CacheBudget::unlimited(),
        )
        .unwrap();
    shard.forward(&x, &mut cache).unwrap().squeeze(0).unwrap()
}

/// The `n` rows of the table most similar to each row of `x`, best first.
fn nearest(model: &Model, x: &Tensor, n: usize) -> Vec<Vec<u32>> {
    let sims = normalise(x).matmul(&model.table.t().unwrap()).unwrap();
    let sims: Vec<Vec<f32>> = sims.to_vec2().unwrap();
    sims.iter()
        .map(|row| {
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            let n = n.min(order.len());
            order.select_nth_unstable_by(n - 1, |a, b| {
                row[*b as usize].total_cmp(&row[*a as usize])
            });
            order.truncate(n);
            order.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]));
            order
        })
        .collect()
}

/// Least-squares W with states · W ≈ embeddings, fitted on random tokens
/// run through the first `k` blocks (ridge-regularised normal equations,
/// solved in f64).
fn linear_inverse(model: &Model, k: u32, seed: u64) -> Tensor {
    let mut rng = seed;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) % model.vocab as u64) as u32
    };
    let (mut hs, mut xs) = (Vec::new(), Vec::new());
    for _ in 0..48 {
        let ids: Vec<u32> = (0..48).map(|_| next()).collect();
        hs.push(sent(model, &ids, k));
        xs.push(model.head.embed(&ids).unwrap().squeeze(0).unwrap());
    }
    let h = Tensor::cat(&hs, 0).unwrap().to_dtype(DType::F64).unwrap();
    let x = Tensor::cat(&xs, 0).unwrap().to_dtype(DType::F64).unwrap();
    let hth: Vec<Vec<f64>> = h.t().unwrap().matmul(&h).unwrap().to_vec2().unwrap();
    let htx: Vec<Vec<f64>> = h.t().unwrap().matmul(&x).unwrap().to_vec2().unwrap();
    let n = hth.len();
    let ridge = 1e-3 * (0..n).map(|i| hth[i][i]).sum::<f64>() / n as f64;
    // Gauss-Jordan on [HᵀH + λI | HᵀX].
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row = hth[i].clone();
            row[i] += ridge;
            row.extend(&htx[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap();
        a.swap(col, pivot);
        let p = a[col][col];
        for v in &mut a[col] {
            *v /= p;
        }
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col && row[col] != 0.0 {
                let f = row[col];
                for (v, pv) in row.iter_mut().zip(&pivot_row) {
                    *v -= f * pv;
                }
            }
        }
    }
    let w: Vec<f32> = a
        .iter()
        .flat_map(|row| row[n..].iter().map(|&v| v as f32))
        .collect();
    Tensor::from_vec(w, (n, n), &Device::Cpu).unwrap()
}

/// Recovers `ids` from their states `h` (first `k` blocks) by checking the
/// shortlist of each position through the blocks, prefix by prefix.
fn invert(model: &Model, h: &Tensor, k: u32, shortlist: &[Vec<u32>]) -> Vec<u32> {
    let shard = &model.blocks;
    let positions = h.dim(0).unwrap();
    let mut cache = shard
        .new_session_for(
            BlockRange::new(0, k).unwrap(),
            positions + 1,
            &CacheBudget::unlimited(),
        )
        .unwrap();
    let mut recovered = Vec::with_capacity(positions);
    for (i, guesses) in shortlist.iter().enumerate() {
        let want = h.get(i).unwrap();
        let scale: f32 = want.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let mut best = (f32::INFINITY, guesses[0]);
        for (n, &guess) in guesses.iter().enumerate() {
            // An exact match is found; stop looking.
            if n == SHORTLIST && best.0 < 1e-6 * scale {
                break;
            }
            let x = model.head.embed(&[guess]).unwrap();
            let out = shard
                .forward(&x, &mut cache)
                .unwrap()
                .flatten_all()
                .unwrap();
            let err: f32 = (out - &want)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            if err < best.0 {
                best = (err, guess);
            }
            cache.truncate(i);
        }
        let x = model.head.embed(&[best.1]).unwrap();
        shard.forward(&x, &mut cache).unwrap();
        recovered.push(best.1);
    }
    recovered
}

fn rate(got: &[u32], want: &[u32]) -> f64 {
    let hits = got.iter().zip(want).filter(|(a, b)| a == b).count();
    hits as f64 / want.len() as f64
}

#[test]
fn a_curious_first_server_recovers_the_prompt() {
    let (model, tokenizer) = load();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tokenizer.encode_raw(p).unwrap())
        .collect();
    let total: usize = prompts.iter().map(Vec::len).sum();
    let mut table = Vec::new();
    for k in 0..=2u32 {
        let inverse = (k > 0).then(|| linear_inverse(&model, k, 7 + u64::from(k)));
        let (mut nn, mut lin, mut inv) = (0.0, 0.0, 0.0);
        for ids in &prompts {
            let h = sent(&model, ids, k);
            let weight = ids.len() as f64 / total as f64;
            let direct: Vec<u32> = nearest(&model, &h, 1).into_iter().map(|c| c[0]).collect();
            nn += weight * rate(&direct, ids);
            let mapped = match &inverse {
                Some(w) => h.matmul(w).unwrap(),
                None => h.clone(),
            };
            let shortlist = nearest(&model, &mapped, WIDER);
            let first: Vec<u32> = shortlist.iter().map(|c| c[0]).collect();
            lin += weight * rate(&first, ids);
            inv += weight
                * if k == 0 {
                    rate(&first, ids)
                } else {
                    rate(&invert(&model, &h, k, &shortlist), ids)
                };
        }
        eprintln!(
            "local_blocks = {k}: tokens recovered by nearest neighbour {:.1}%, by linear inverse {:.1}%, by inverting the blocks {:.1}% ({total} prompt tokens)",
            nn * 100.0,
            lin * 100.0,
            inv * 100.0
        );
        table.push((nn, lin, inv));
    }
    // The README's table, each figure within 10 points of what it says
    // (the attacks are deterministic; the margin covers float differences
    // between CPUs, about one token in ten).
    let readme = [(1.00, 1.00, 1.00), (0.00, 0.49, 0.74), (0.00, 0.62, 1.00)];
    for (k, (got, want)) in table.iter().zip(readme).enumerate() {
        let close = |a: f64, b: f64| (a - b).abs() <= 0.10;
        assert!(
            close(got.0, want.0) && close(got.1, want.1) && close(got.2, want.2),
            "local_blocks = {k}: measured {got:?}, the README says {want:?}"
        );
    }
    // Running blocks locally does not make hidden states a cipher: with the
    // public weights, inversion recovers at least what the others do.
    for (k, (nn, lin, inv)) in table.iter().enumerate().skip(1) {
        assert!(inv >= lin && inv >= nn, "local_blocks = {k}: {table:?}");
    }
}

//! A server batching its sessions' steps, on the real model: sixteen
//! sessions stepping at once share passes (the weights read once per pass)
//! and each gets, bit for bit, what it gets stepping alone; a long prompt
//! arriving meanwhile is cut into chunks and gives what it gives alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

use futures::future::join_all;
use sherpa_swarm::{LocalSwarm, ModelId};
use swarm_core::infer::{Dtype, OpenSession, INFER_VERSION};
use swarm_core::BlockRange;
use swarm_dht::RemoteSession;
use swarm_shard::{ClientHead, Device, ModelFiles, WeightPrecision};

const SESSIONS: usize = 16;
const STEPS: usize = 6;

fn ids(session: usize, at: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((session * 977 + at * 131 + i * 17) % 40_000 + 100) as u32)
        .collect()
}

#[test]
fn sixteen_sessions_share_passes_and_each_gets_what_it_gets_alone() {
    let path = common::smollm2();
    let files = ModelFiles::open(&path).unwrap();
    let head = ClientHead::load(&files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let blocks = files.config().num_hidden_layers as u32;
    let embed = |ids: &[u32]| -> Vec<f32> {
        head.embed(ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let swarm = LocalSwarm::start(&path.to_string_lossy(), ModelId::new("batch").unwrap(), 1)
            .await
            .unwrap();
        let server = &swarm.servers[0];
        let node = swarm.client.node().clone();
        let peer = server.node().peer_id();
        let open = || {
            RemoteSession::connect(
                &node,
                peer,
                OpenSession {
                    version: INFER_VERSION,
                    model: ModelId::new("batch").unwrap(),
                    blocks: BlockRange::full(blocks).unwrap(),
                    max_length: 600,
                    dtype: Dtype::F32,
                    direct: true,
                    push: false,
                },
            )
        };
        // Each session alone: a prompt of 3 + s tokens, then one-token steps.
        let mut alone = Vec::new();
        let started = Instant::now();
        for s in 0..SESSIONS {
            let mut session = open().await.unwrap();
            let mut outs = vec![session.step(&embed(&ids(s, 0, 3 + s))).await.unwrap()];
            for step in 1..=STEPS {
                outs.push(session.step(&embed(&ids(s, step, 1))).await.unwrap());
            }
            session.close().await.unwrap();
            alone.push(outs);
        }
        let one_by_one = started.elapsed();
        let before = server.steps();

        // All at once: the prompts, then every round's steps together.
        let mut sessions = join_all((0..SESSIONS).map(|_| open()))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); SESSIONS];
        let prompts: Vec<Vec<f32>> = (0..SESSIONS).map(|s| embed(&ids(s, 0, 3 + s))).collect();
        let outs = join_all(
            sessions
                .iter_mut()
                .zip(&prompts)
                .map(|(session, x)| session.step(x)),
        )
        .await;
        for (s, out) in outs.into_iter().enumerate() {
            together[s].push(out.unwrap());
        }
        let started = Instant::now();
        for step in 1..=STEPS {
            let inputs: Vec<Vec<f32>> = (0..SESSIONS).map(|s| embed(&ids(s, step, 1))).collect();
            let outs = join_all(
                sessions
                    .iter_mut()
                    .zip(&inputs)
                    .map(|(session, x)| session.step(x)),
            )
            .await;
            for (s, out) in outs.into_iter().enumerate() {
                together[s].push(out.unwrap());
            }
        }
        let rounds = started.elapsed();
        let after = server.steps();
        for (s, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(got, want, "session {s}: together as alone");
        }
        let batched = after.batched - before.batched;
        let passes = after.passes - before.passes;
        eprintln!(
            "{SESSIONS} sessions: {batched} of {} steps shared {passes} passes; \
             {STEPS} rounds together in {rounds:.2?} against {one_by_one:.2?} for every session alone \
             (prompts included)",
            after.steps - before.steps
        );
        assert!(
            passes > 0 && batched > passes,
            "steps arriving together share passes: {before:?} -> {after:?}"
        );

        // A long prompt arriving while the others step is chunked, and
        // gives what it gives alone.
        let long = embed(&ids(99, 0, 300));
        let mut reference = open().await.unwrap();
        let want = reference.step(&long).await.unwrap();
        reference.close().await.unwrap();
        let mut newcomer = open().await.unwrap();
        let before = server.steps();
        let inputs: Vec<Vec<f32>> = (0..SESSIONS)
            .map(|s| embed(&ids(s, STEPS + 1, 1)))
            .collect();
        let (got, _) = tokio::join!(
            newcomer.step(&long),
            join_all(
                sessions
                    .iter_mut()
                    .zip(&inputs)
                    .map(|(session, x)| session.step(x))
            )
        );
        assert_eq!(got.unwrap(), want, "a chunked prompt gives what it gives whole");
        let after = server.steps();
        assert!(
            after.steps - before.steps >= SESSIONS as u64 + 3,
            "300 positions in chunks of 128: {before:?} -> {after:?}"
        );
        newcomer.close().await.unwrap();
        for session in sessions {
            session.close().await.unwrap();
        }
        swarm.shutdown().await;
    });
}

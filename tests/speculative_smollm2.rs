//! Speculative decoding on the real model: with drafts, greedy output is
//! token for token what one-at-a-time decoding gives, locally and through
//! three servers, and a reply that quotes its prompt takes fewer steps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use sherpa_swarm::bench::QUOTE;
use sherpa_swarm::{GenerateOptions, LocalSwarm, ModelId};
use swarm_shard::{ChatMessage, Device, LocalModel, ModelFiles, TextTokenizer, WeightPrecision};

fn prompt(files: &ModelFiles, text: &str) -> Vec<u32> {
    TextTokenizer::from_model(files)
        .unwrap()
        .encode_chat(&[ChatMessage::user(text)])
        .unwrap()
}

#[test]
fn drafts_change_the_steps_never_the_tokens() {
    let path = common::smollm2();
    let files = ModelFiles::open(&path).unwrap();
    let model = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
    let options = GenerateOptions::default()
        .with_max_new_tokens(48)
        .with_stop_at_eos(false);
    for text in [QUOTE, "Write a short poem about rivers."] {
        let ids = prompt(&files, text);
        let plain = model.generate(&ids, &options, &mut |_| Ok(true)).unwrap();
        assert_eq!(plain.decode_steps, 47);
        for drafts in [1, 4, swarm_shard::MAX_DRAFTS] {
            let fast = model
                .generate(
                    &ids,
                    &options.clone().with_draft_tokens(drafts),
                    &mut |_| Ok(true),
                )
                .unwrap();
            assert_eq!(fast.tokens, plain.tokens, "{drafts} drafts on {text:?}");
            assert!(fast.drafts_accepted <= fast.drafts_sent);
            assert_eq!(
                fast.decode_steps + fast.drafts_accepted,
                47,
                "each step chooses one token plus the drafts it accepts"
            );
            eprintln!(
                "{drafts} drafts, {:?}: {} steps for 47 tokens ({:.2} per step), {} of {} drafts accepted",
                &text[..20],
                fast.decode_steps,
                fast.tokens_per_step(),
                fast.drafts_accepted,
                fast.drafts_sent
            );
            if text == QUOTE && drafts >= 4 {
                assert!(
                    fast.tokens_per_step() > 1.5,
                    "a quoting reply accepts drafts: {:.2} tokens per step",
                    fast.tokens_per_step()
                );
            }
        }
    }
}

#[test]
fn drafts_through_three_servers_give_the_local_tokens() {
    let path = common::smollm2();
    let files = ModelFiles::open(&path).unwrap();
    let ids = prompt(&files, QUOTE);
    let options = GenerateOptions::default()
        .with_max_new_tokens(40)
        .with_stop_at_eos(false);
    let local = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native)
        .unwrap()
        .generate(&ids, &options, &mut |_| Ok(true))
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let swarm = LocalSwarm::start(&path.to_string_lossy(), ModelId::new("spec").unwrap(), 3)
            .await
            .unwrap();
        let fast = options.clone().with_draft_tokens(swarm_shard::MAX_DRAFTS);
        let got = swarm
            .client
            .generate(&ids, &fast, &mut |_| true)
            .await
            .unwrap();
        assert_eq!(got.output.tokens, local.tokens);
        assert_eq!(got.route.len(), 3);
        assert!(got.output.tokens_per_step() > 1.5, "{:?}", got.output);
        swarm.shutdown().await;
    });
}

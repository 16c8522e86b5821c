//! Engine tests on tiny random models written as real GGUF / safetensors files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use proptest::prelude::*;
use swarm_core::BlockRange;
use swarm_shard::tiny::TinyModelSpec;
use swarm_shard::{
    BlockShard, CacheBudget, ClientHead, Device, GenerateOptions, LocalModel, ModelFiles,
    ShardError, Tensor, WeightPrecision,
};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sherpa-tiny-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny_gguf(spec: &TinyModelSpec, dtype: GgmlDType, name: &str) -> PathBuf {
    let path = scratch(name).join("model.gguf");
    spec.write_gguf(&path, dtype).unwrap();
    path
}

/// Runs `ids` through `spans` in sequence and returns the final hidden states.
fn hidden_through(files: &ModelFiles, spans: &[BlockRange], ids: &[u32]) -> Vec<f32> {
    let dev = Device::Cpu;
    let head = ClientHead::load(files, &dev, WeightPrecision::Native).unwrap();
    let budget = CacheBudget::unlimited();
    let mut xs = head.embed(ids).unwrap();
    for span in spans {
        let shard = BlockShard::load(files, *span, &dev, WeightPrecision::Native).unwrap();
        let mut cache = shard.new_session(ids.len(), &budget).unwrap();
        xs = shard.forward(&xs, &mut cache).unwrap();
    }
    xs.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn gguf_and_safetensors_of_the_same_weights_agree() {
    // The GGUF copy has llama.cpp-permuted Q/K rows and uses interleaved RoPE;
    // the safetensors copy is in HF layout with rotate-half RoPE. Equal
    // outputs show the permutation is handled.
    let spec = TinyModelSpec {
        tie_embeddings: false,
        ..TinyModelSpec::default()
    };
    let gguf = ModelFiles::open(tiny_gguf(&spec, GgmlDType::F32, "agree")).unwrap();
    let dir = scratch("agree-hf").join("model");
    spec.write_hf_dir(&dir).unwrap();
    let hf = ModelFiles::open(&dir).unwrap();
    assert_eq!(gguf.config().num_hidden_layers, 4);
    assert_eq!(hf.config().num_key_value_heads, 2);
    let ids = [3, 17, 42, 99, 5, 200, 7];
    let full = [BlockRange::full(4).unwrap()];
    let a = hidden_through(&gguf, &full, &ids);
    let b = hidden_through(&hf, &full, &ids);
    let diff = max_rel_diff(&a, &b);
    assert!(diff < 1e-5, "GGUF vs safetensors differ by {diff}");

    // And the whole generation agrees.
    let opts = GenerateOptions::default()
        .with_max_new_tokens(12)
        .with_stop_at_eos(false);
    let gen = |files: &ModelFiles| {
        LocalModel::load(files, &[], &Device::Cpu, WeightPrecision::Native)
            .unwrap()
            .generate(&ids, &opts, &mut |_| Ok(true))
            .unwrap()
            .tokens
    };
    assert_eq!(gen(&gguf), gen(&hf));
}

#[test]
fn incremental_decoding_matches_full_recompute() {
    // Feeding tokens one by one through the KV cache must give the same last
    // hidden state as running the whole sequence at once.
    let spec = TinyModelSpec::default();
    let files = ModelFiles::open(tiny_gguf(&spec, GgmlDType::F32, "incremental")).unwrap();
    let dev = Device::Cpu;
    let head = ClientHead::load(&files, &dev, WeightPrecision::Native).unwrap();
    let shard = BlockShard::load(
        &files,
        BlockRange::full(4).unwrap(),
        &dev,
        WeightPrecision::Native,
    )
    .unwrap();
    let budget = CacheBudget::unlimited();
    let ids: Vec<u32> = (0..70).map(|i| (i * 37 % 256) as u32).collect();

    let mut cache = shard.new_session(ids.len(), &budget).unwrap();
    let all = shard
        .forward(&head.embed(&ids).unwrap(), &mut cache)
        .unwrap();
    let last_all: Vec<f32> = all
        .get(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();

    // Prefill 5, then one at a time (crosses the 64-token cache growth).
    let mut cache = shard.new_session(ids.len(), &budget).unwrap();
    shard
        .forward(&head.embed(&ids[..5]).unwrap(), &mut cache)
        .unwrap();
    let mut last = None;
    for id in &ids[5..] {
        last = Some(
            shard
                .forward(&head.embed(&[*id]).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), ids.len());
    let last: Vec<f32> = last.unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let diff = max_rel_diff(&last_all, &last);
    assert!(diff < 1e-5, "incremental differs by {diff}");
}

#[test]
fn quantized_types_load_and_stay_quantized() {
    // K-quants pack 256 values a block: make every row a multiple of that.
    let spec = TinyModelSpec {
        hidden_size: 256,
        intermediate_size: 512,
        layers: 2,
        ..TinyModelSpec::default()
    };
    let f32_files = ModelFiles::open(tiny_gguf(&spec, GgmlDType::F32, "qt-f32")).unwrap();
    let range = BlockRange::full(2).unwrap();
    let f32_shard =
        BlockShard::load(&f32_files, range, &Device::Cpu, WeightPrecision::Native).unwrap();
    let ids = [1u32, 2, 3, 4, 5, 6, 7, 8];
    let reference = hidden_through(&f32_files, &[range], &ids);
    for (dtype, max_ratio, tolerance) in [
        (GgmlDType::F16, 0.55, 2e-3),
        (GgmlDType::Q8_0, 0.30, 0.05),
        (GgmlDType::Q4_0, 0.20, 0.3),
        (GgmlDType::Q4_1, 0.22, 0.3),
        (GgmlDType::Q4K, 0.20, 0.3),
        (GgmlDType::Q6K, 0.25, 0.1),
    ] {
        let files = ModelFiles::open(tiny_gguf(&spec, dtype, &format!("qt-{dtype:?}"))).unwrap();
        let shard = BlockShard::load(&files, range, &Device::Cpu, WeightPrecision::Native).unwrap();
        let ratio = shard.weight_bytes() as f64 / f32_shard.weight_bytes() as f64;
        // f16 weights are widened to f32 for CPU matmuls; quantized ones are not.
        if dtype != GgmlDType::F16 {
            assert!(
                ratio < max_ratio,
                "{dtype:?} holds {ratio:.2} of the f32 bytes"
            );
        }
        let out = hidden_through(&files, &[range], &ids);
        let diff = max_rel_diff(&reference, &out);
        assert!(diff < tolerance, "{dtype:?} output off by {diff}");
        // Dequantized to f32 the same file must still load and compute.
        let dense = BlockShard::load(&files, range, &Device::Cpu, WeightPrecision::F32).unwrap();
        assert!(dense.weight_bytes() >= f32_shard.weight_bytes());
    }
}

#[test]
fn kv_budget_refuses_sessions_instead_of_growing() {
    let spec = TinyModelSpec::default();
    let files = ModelFiles::open(tiny_gguf(&spec, GgmlDType::Q8_0, "budget")).unwrap();
    let shard = BlockShard::load(
        &files,
        BlockRange::new(0, 2).unwrap(),
        &Device::Cpu,
        WeightPrecision::Native,
    )
    .unwrap();
    // 2 blocks * 2 (k,v) * 2 kv heads * 16 dims * 4 bytes = 512 bytes a token.
    let per_token = 512;
    let budget = CacheBudget::new(per_token * 100);
    let first = shard.new_session(60, &budget).unwrap();
    assert_eq!(first.reserved_bytes(), per_token * 60);
    let err = shard.new_session(60, &budget).unwrap_err();
    assert!(
        matches!(err, ShardError::CacheBudgetExceeded { available, .. } if available == per_token * 40),
        "{err}"
    );
    let mut second = shard.new_session(40, &budget).unwrap();
    drop(first);
    assert_eq!(budget.used(), per_token * 40);

    // A session cannot outgrow what it reserved.
    let head = ClientHead::load(&files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let ids: Vec<u32> = (0..41).collect();
    let err = shard
        .forward(&head.embed(&ids).unwrap(), &mut second)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ShardError::SessionFull {
                capacity: 40,
                adding: 41,
                ..
            }
        ),
        "{err}"
    );
    // ...and the refused step left it usable.
    shard
        .forward(&head.embed(&ids[..40]).unwrap(), &mut second)
        .unwrap();
    assert_eq!(second.len(), 40);
}

#[test]
fn bad_inputs_get_clear_errors() {
    let spec = TinyModelSpec::default();
    let path = tiny_gguf(&spec, GgmlDType::Q8_0, "bad");
    let files = ModelFiles::open(&path).unwrap();
    let dev = Device::Cpu;

    // Range outside the model.
    let err = BlockShard::load(
        &files,
        BlockRange::new(2, 9).unwrap(),
        &dev,
        WeightPrecision::Native,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("outside the model's 4 blocks"),
        "{err}"
    );

    // Hidden states of the wrong width.
    let shard = BlockShard::load(
        &files,
        BlockRange::new(0, 1).unwrap(),
        &dev,
        WeightPrecision::Native,
    )
    .unwrap();
    let mut cache = shard.new_session(8, &CacheBudget::unlimited()).unwrap();
    let wrong = Tensor::zeros((1, 3, 63), candle_core::DType::F32, &dev).unwrap();
    let err = shard.forward(&wrong, &mut cache).unwrap_err();
    assert!(
        matches!(err, ShardError::BadHiddenStates { hidden: 64, .. }),
        "{err}"
    );

    // Token ids past the vocabulary.
    let head = ClientHead::load(&files, &dev, WeightPrecision::Native).unwrap();
    assert!(matches!(
        head.embed(&[256]),
        Err(ShardError::BadTokenId {
            id: 256,
            vocab: 256
        })
    ));

    // A truncated file.
    let bytes = std::fs::read(&path).unwrap();
    let truncated = path.with_file_name("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).unwrap();
    let err = ModelFiles::open(&truncated).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    // Not a GGUF file at all.
    let garbage = path.with_file_name("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model").unwrap();
    let err = ModelFiles::open(&garbage).unwrap_err();
    assert!(matches!(err, ShardError::BadModelFile { .. }), "{err}");
    // One line a person can read, even with RUST_BACKTRACE set.
    assert!(!err.to_string().contains('\n'), "{err}");

    // Missing file.
    let err = ModelFiles::open(path.with_file_name("nope.gguf")).unwrap_err();
    assert!(matches!(err, ShardError::Io { .. }), "{err}");
}

#[test]
fn wrong_architecture_and_missing_tensors_are_named() {
    use candle_core::quantized::{gguf_file, QTensor};
    let dir = scratch("arch");
    let write = |path: &PathBuf, arch: &str, with_tensor: bool| {
        let md = [
            (
                "general.architecture",
                gguf_file::Value::String(arch.into()),
            ),
            ("llama.block_count", gguf_file::Value::U32(1)),
            ("llama.embedding_length", gguf_file::Value::U32(64)),
            ("llama.feed_forward_length", gguf_file::Value::U32(128)),
            ("llama.attention.head_count", gguf_file::Value::U32(4)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                gguf_file::Value::F32(1e-5),
            ),
            ("llama.context_length", gguf_file::Value::U32(128)),
            ("llama.vocab_size", gguf_file::Value::U32(32)),
        ];
        let md: Vec<_> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t = QTensor::quantize(
            &Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let tensors: Vec<(&str, &QTensor)> = if with_tensor {
            vec![("blk.0.attn_norm.weight", &t)]
        } else {
            vec![]
        };
        gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md, &tensors).unwrap();
    };
    let falcon = dir.join("falcon.gguf");
    write(&falcon, "falcon", false);
    let err = ModelFiles::open(&falcon).unwrap_err();
    assert!(
        matches!(&err, ShardError::UnsupportedArchitecture { architecture, .. } if architecture == "falcon"),
        "{err}"
    );

    let partial = dir.join("partial.gguf");
    write(&partial, "llama", true);
    let files = ModelFiles::open(&partial).unwrap();
    let err = BlockShard::load(
        &files,
        BlockRange::new(0, 1).unwrap(),
        &Device::Cpu,
        WeightPrecision::Native,
    )
    .unwrap_err();
    assert!(
        matches!(&err, ShardError::MissingTensor { name, .. } if name == "blk.0.attn_q.weight"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Any split of the blocks into consecutive shards computes the same
    /// hidden states as one shard holding them all.
    #[test]
    fn any_split_matches_the_whole(
        layers in 2usize..7,
        cuts in proptest::collection::vec(1u32..7, 0..4),
        seed in 0u64..1000,
        seq in 1usize..9,
    ) {
        let spec = TinyModelSpec { layers, seed, hidden_size: 32, intermediate_size: 64, heads: 4, kv_heads: 1, ..TinyModelSpec::default() };
        let files = ModelFiles::open(tiny_gguf(&spec, GgmlDType::F32, &format!("split-{layers}-{seed}"))).unwrap();
        let mut bounds: Vec<u32> = cuts.into_iter().filter(|c| (*c as usize) < layers).collect();
        bounds.push(0);
        bounds.push(layers as u32);
        bounds.sort_unstable();
        bounds.dedup();
        let spans: Vec<BlockRange> = bounds.windows(2).map(|w| BlockRange::new(w[0], w[1]).unwrap()).collect();
        let ids: Vec<u32> = (0..seq as u32).map(|i| (i * 31 + seed as u32) % 256).collect();
        let whole = hidden_through(&files, &[BlockRange::full(layers as u32).unwrap()], &ids);
        let split = hidden_through(&files, &spans, &ids);
        let diff = max_rel_diff(&whole, &split);
        prop_assert!(diff < 1e-5, "spans {:?} differ by {}", spans, diff);
    }
}

#[test]
fn shards_are_shareable_across_threads() {
    let spec = TinyModelSpec::default();
    let files = ModelFiles::open(tiny_gguf(&spec, GgmlDType::Q8_0, "threads")).unwrap();
    let model = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
    let model = Arc::new(model);
    let opts = GenerateOptions::default()
        .with_max_new_tokens(8)
        .with_stop_at_eos(false);
    let expected = model
        .generate(&[1, 2, 3], &opts, &mut |_| Ok(true))
        .unwrap()
        .tokens;
    let outputs: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let model = Arc::clone(&model);
                let opts = opts.clone();
                s.spawn(move || {
                    model
                        .generate(&[1, 2, 3], &opts, &mut |_| Ok(true))
                        .unwrap()
                        .tokens
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(expected.len(), 8);
    for out in outputs {
        assert_eq!(out, expected);
    }
}

#[test]
fn hf_directories_bring_their_tokenizer_and_chat_template() {
    // Make an HF-style tokenizer.json from a byte-level BPE built in memory.
    use candle_core::quantized::gguf_file::Value;
    use swarm_shard::{ChatMessage, TextTokenizer};
    let mut tokens: Vec<String> = ["<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    let byte_chars: Vec<String> = (b'!'..=b'~').map(|b| (b as char).to_string()).collect();
    tokens.extend(byte_chars);
    tokens.extend(["Ġ".to_string(), "he".to_string(), "ll".to_string()]);
    let merges = ["h e", "l l"];
    let mut md = std::collections::HashMap::new();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    md.insert(
        "tokenizer.ggml.model".to_string(),
        Value::String("gpt2".into()),
    );
    md.insert("tokenizer.ggml.tokens".to_string(), strings(tokens.clone()));
    md.insert(
        "tokenizer.ggml.merges".to_string(),
        strings(merges.iter().map(|m| m.to_string()).collect()),
    );
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < 2 { 3 } else { 1 }))
        .collect();
    md.insert("tokenizer.ggml.token_type".to_string(), Value::Array(types));
    md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(1));
    let built = TextTokenizer::from_gguf_metadata(&md, std::path::Path::new("mem")).unwrap();

    let spec = TinyModelSpec {
        vocab_size: tokens.len(),
        ..TinyModelSpec::default()
    };
    let dir = scratch("hf-tok").join("model");
    spec.write_hf_dir(&dir).unwrap();
    built
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let config = serde_json::json!({"chat_template": template, "eos_token": "<|im_end|>"});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();

    let files = ModelFiles::open(&dir).unwrap();
    let tokenizer = TextTokenizer::from_model(&files).unwrap();
    assert_eq!(
        tokenizer.encode_raw("hello").unwrap(),
        built.encode_raw("hello").unwrap()
    );
    assert_eq!(tokenizer.eos_token_id(), Some(1));
    let text = tokenizer.render_chat(&[ChatMessage::user("hi")]).unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tokenizer.encode_chat(&[ChatMessage::user("hi")]).unwrap();
    assert_eq!(ids[0], 0, "special tokens are matched whole");
    assert_eq!(
        tokenizer
            .decode(&tokenizer.encode_raw("hell hello").unwrap())
            .unwrap(),
        "hell hello"
    );
}

/// Sessions at different places, stepping together in one pass
/// (`forward_batch`), get bit for bit what each gets stepping alone: for
/// dense and quantized weights, decode steps and speculative ones, up to
/// the shard's batch_rows positions per pass; sessions over other blocks
/// are refused.
#[test]
fn sessions_batched_together_get_what_they_get_alone() {
    let spec = TinyModelSpec {
        hidden_size: 64,
        intermediate_size: 128,
        layers: 3,
        ..TinyModelSpec::default()
    };
    for (dtype, rows) in [
        (GgmlDType::F32, 8),
        (GgmlDType::Q4_1, 16),
        (GgmlDType::Q8_0, 16),
        (GgmlDType::Q4_0, 16),
    ] {
        let files = ModelFiles::open(tiny_gguf(&spec, dtype, &format!("batch-{dtype:?}"))).unwrap();
        let range = BlockRange::full(3).unwrap();
        let shard = BlockShard::load(&files, range, &Device::Cpu, WeightPrecision::Native).unwrap();
        assert_eq!(shard.batch_rows(), rows, "{dtype:?}");
        let head = ClientHead::load(&files, &Device::Cpu, WeightPrecision::Native).unwrap();
        let budget = CacheBudget::unlimited();
        // 1 to 3 positions each: 2 of each size in 6 sessions (12 rows),
        // 1 of each in 3 (6 rows).
        let sessions = if rows >= 12 { 6 } else { 3 };
        let mut alone: Vec<_> = (0..sessions)
            .map(|_| shard.new_session(64, &budget).unwrap())
            .collect();
        let mut together: Vec<_> = (0..sessions)
            .map(|_| shard.new_session(64, &budget).unwrap())
            .collect();
        // Prompts of different lengths (run alone), then rounds of steps
        // of 1 to 3 positions, together.
        let ids = |s: usize, round: usize, n: usize| -> Vec<u32> {
            (0..n)
                .map(|i| ((s * 31 + round * 7 + i * 3) % 250 + 1) as u32)
                .collect()
        };
        for round in 0..5 {
            let inputs: Vec<Tensor> = (0..sessions)
                .map(|s| {
                    let n = if round == 0 {
                        2 + s
                    } else {
                        1 + (s + round) % 3
                    };
                    head.embed(&ids(s, round, n)).unwrap()
                })
                .collect();
            let total: usize = inputs.iter().map(|x| x.dims()[1]).sum();
            assert!(round == 0 || total <= shard.batch_rows());
            let want: Vec<Vec<f32>> = inputs
                .iter()
                .zip(alone.iter_mut())
                .map(|(x, cache)| {
                    shard
                        .forward(x, cache)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            let got = if round == 0 {
                inputs
                    .iter()
                    .zip(together.iter_mut())
                    .map(|(x, cache)| shard.forward(x, cache).unwrap())
                    .collect()
            } else {
                let mut steps: Vec<(&Tensor, &mut swarm_shard::SessionCache)> =
                    inputs.iter().zip(together.iter_mut()).collect();
                shard.forward_batch(&mut steps).unwrap()
            };
            for (s, (got, want)) in got.iter().zip(&want).enumerate() {
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(&got, want, "{dtype:?}, round {round}, session {s}");
            }
        }
        for (a, b) in alone.iter().zip(&together) {
            assert_eq!(a.len(), b.len());
        }
        // A session over other blocks cannot share the pass.
        let mut other = shard
            .new_session_for(BlockRange::new(0, 2).unwrap(), 8, &budget)
            .unwrap();
        let x = head.embed(&[5]).unwrap();
        let mut steps = vec![(&x, &mut together[0]), (&x, &mut other)];
        assert!(matches!(
            shard.forward_batch(&mut steps),
            Err(ShardError::BadSettings(_))
        ));
    }
}

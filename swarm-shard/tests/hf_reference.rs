//! The engine against transformers itself, one test per model family.
//!
//! `reference/hf_reference.py` builds a tiny random model of each family
//! with the `transformers` and `torch` packages, saves it as an HF
//! checkpoint and (through llama.cpp's own converter) as GGUF, and records
//! what transformers computes: every block's output on a prompt, the logits
//! at its last position, and 16 greedy tokens. The files are committed in
//! `reference/tiny/`, so this test needs no Python.
//!
//! Tolerance: weights are exact in f16 and both sides compute in f32, so
//! the only differences are the order of float operations. Hidden states
//! and logits must agree within 1e-4 of the largest magnitude in the
//! reference tensor (observed differences are around 1e-6); greedy tokens
//! must be identical, token for token. The reference records the smallest
//! top-1/top-2 logit gap of its greedy run, so a pass is not luck.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use swarm_core::BlockRange;
use swarm_shard::{
    BlockShard, CacheBudget, ClientHead, Device, Family, GenerateOptions, LocalModel, ModelFiles,
    ShardError, Tensor, WeightPrecision,
};

const TOLERANCE: f32 = 1e-4;

fn family_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../reference/tiny")
        .join(name)
}

struct Expected {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    hidden: Vec<Vec<f32>>,
    last_logits: Vec<f32>,
    min_margin: f64,
}

fn expected(dir: &Path) -> Expected {
    expected_in(dir, None)
}

/// The reference in `dir`, or its variant `variant` (same prompt).
fn expected_in(dir: &Path, variant: Option<&str>) -> Expected {
    let path = dir.join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; the reference data is committed with the repo (regenerate it with python3 reference/hf_reference.py)",
            path.display()
        )
    });
    let top: Value = serde_json::from_str(&text).unwrap();
    let json = match variant {
        Some(v) => &top[v],
        None => &top,
    };
    let field = |key: &str| -> Value {
        assert!(!json[key].is_null(), "{}: no {key}", path.display());
        json[key].clone()
    };
    Expected {
        prompt: serde_json::from_value(top["prompt"].clone()).unwrap(),
        greedy: serde_json::from_value(field("greedy")).unwrap(),
        hidden: serde_json::from_value(field("hidden")).unwrap(),
        last_logits: serde_json::from_value(field("last_logits")).unwrap(),
        min_margin: field("min_margin").as_f64().unwrap(),
    }
}

/// Largest |a - b| relative to the reference's largest magnitude.
fn relative_error(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "lengths differ");
    let scale = reference.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Checks one model file against the reference: each block's output,
/// the last logits, greedy tokens, and that any split into spans computes
/// exactly what the whole does.
fn check_against_reference(files: &ModelFiles, want: &Expected, family: Family, what: &str) {
    let dev = Device::Cpu;
    let cfg = files.config().clone();
    assert_eq!(cfg.family, family, "{what}: family");
    let blocks = cfg.num_hidden_layers as u32;
    assert_eq!(
        want.hidden.len(),
        blocks as usize,
        "{what}: one output per block"
    );
    let head = ClientHead::load(files, &dev, WeightPrecision::Native).unwrap();
    let budget = CacheBudget::unlimited();

    // Block by block, each its own one-block shard.
    let mut xs = head.embed(&want.prompt).unwrap();
    for (i, reference) in want.hidden.iter().enumerate() {
        let span = BlockRange::new(i as u32, i as u32 + 1).unwrap();
        let shard = BlockShard::load(files, span, &dev, WeightPrecision::Native).unwrap();
        let mut cache = shard.new_session(64, &budget).unwrap();
        xs = shard.forward(&xs, &mut cache).unwrap();
        let err = relative_error(&flat(&xs), reference);
        eprintln!("{what}: block {i} relative error {err:e}");
        assert!(err <= TOLERANCE, "{what}: block {i} output off by {err:e}");
    }
    let split_output = flat(&xs);
    let logits = head.logits(&xs).unwrap();
    let err = relative_error(&logits, &want.last_logits);
    eprintln!("{what}: last logits relative error {err:e}");
    assert!(err <= TOLERANCE, "{what}: last logits off by {err:e}");

    // The whole model in one span computes exactly what the split did.
    let whole = BlockShard::load(
        files,
        BlockRange::new(0, blocks).unwrap(),
        &dev,
        WeightPrecision::Native,
    )
    .unwrap();
    let mut cache = whole.new_session(64, &budget).unwrap();
    let whole_output = flat(
        &whole
            .forward(&head.embed(&want.prompt).unwrap(), &mut cache)
            .unwrap(),
    );
    assert_eq!(
        whole_output, split_output,
        "{what}: split differs from whole"
    );

    // Greedy decoding through the KV cache, as a whole and split.
    let options = GenerateOptions::default()
        .with_max_new_tokens(want.greedy.len())
        .with_stop_at_eos(false);
    let spans: Vec<Vec<BlockRange>> = vec![
        vec![],
        (0..blocks)
            .map(|i| BlockRange::new(i, i + 1).unwrap())
            .collect(),
    ];
    for spans in spans {
        let model = LocalModel::load(files, &spans, &dev, WeightPrecision::Native).unwrap();
        let out = model
            .generate(&want.prompt, &options, &mut |_| Ok(true))
            .unwrap();
        assert_eq!(
            out.tokens, want.greedy,
            "{what}: greedy tokens differ from transformers (spans {spans:?}, reference min margin {})",
            want.min_margin
        );
    }
}

/// Checks the HF checkpoint of family `name` against transformers and
/// returns the reference, for the GGUF check.
fn check_hf(name: &str, family: Family) -> Expected {
    let dir = family_dir(name);
    let want = expected(&dir);
    assert!(
        want.min_margin > 1e-3,
        "{name}: reference margins too thin to test greedy"
    );
    let hf = ModelFiles::open(dir.join("hf")).unwrap();
    check_against_reference(&hf, &want, family, &format!("{name} safetensors"));
    want
}

/// Checks both the HF checkpoint and llama.cpp's GGUF conversion of it.
fn check_family(name: &str, family: Family) {
    let want = check_hf(name, family);
    let gguf = ModelFiles::open(family_dir(name).join("model.gguf")).unwrap();
    check_against_reference(&gguf, &want, family, &format!("{name} GGUF"));
}

#[test]
fn llama_saved_by_transformers_5_matches_transformers() {
    let dir = family_dir("llama");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf/config.json")).unwrap())
            .unwrap();
    assert!(
        config.get("rope_theta").is_none() && config["rope_parameters"]["rope_theta"].is_number(),
        "the reference Llama must carry rope_theta only in rope_parameters, as transformers 5 writes it"
    );
    check_family("llama", Family::Llama);
}

#[test]
fn llama_with_an_unsupported_rope_type_is_refused_never_run() {
    let src = family_dir("llama").join("hf");
    let dir = std::env::temp_dir().join(format!("sherpa-rope-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["rope_parameters"]["rope_type"] = "yarn".into();
    config["rope_parameters"]["factor"] = 4.0.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    match ModelFiles::open(&dir) {
        Err(e @ ShardError::BadConfig { .. }) => {
            let message = e.to_string();
            assert!(message.contains("rope_parameters.rope_type"), "{message}");
            assert!(message.contains("config.json"), "{message}");
        }
        other => panic!("a yarn-scaled model must be refused, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2", Family::Qwen2);
}

#[test]
fn qwen3_matches_transformers() {
    check_family("qwen3", Family::Qwen3);
}

/// Mistral's sliding window (6 positions here, shorter than the test's
/// sequence) is checked on the HF checkpoint. llama.cpp's converter writes
/// Mistral as a `llama` GGUF with no window, so llama.cpp and this engine
/// both run that file with full attention: it must then match what
/// transformers computes for the same weights without the window.
#[test]
fn mistral_matches_transformers() {
    check_hf("mistral", Family::Mistral);
    let dir = family_dir("mistral");
    let hf = ModelFiles::open(dir.join("hf")).unwrap();
    assert_eq!(hf.config().sliding_window, Some(6));
    let gguf = ModelFiles::open(dir.join("model.gguf")).unwrap();
    assert_eq!(gguf.config().sliding_window, None);
    let full = expected_in(&dir, Some("full_attention"));
    check_against_reference(&gguf, &full, Family::Llama, "mistral GGUF (no window)");
    assert_ne!(
        full.greedy,
        expected(&dir).greedy,
        "the window matters here"
    );
}

#[test]
fn phi3_matches_transformers() {
    check_family("phi3", Family::Phi3);
}

#[test]
fn gemma2_matches_transformers() {
    check_family("gemma2", Family::Gemma2);
}

#[test]
fn mixtral_matches_transformers() {
    check_family("mixtral", Family::Mixtral);
}

/// Quantized experts are split out of their stacked 3-D tensor by bytes:
/// a Q8_0 copy of the Mixtral GGUF computes, with its experts kept
/// quantized, what the same file computes dequantized to f32.
#[test]
fn mixtral_quantized_experts_split_by_bytes_compute_as_dequantized() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let src = family_dir("mixtral").join("model.gguf");
    let mut file = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let dense = t.dequantize(&Device::Cpu).unwrap();
        let q = if name.contains("_exps") {
            QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap()
        } else {
            t
        };
        tensors.push((name.clone(), q));
    }
    let dst = std::env::temp_dir().join(format!("sherpa-mixtral-q8-{}.gguf", std::process::id()));
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut std::fs::File::create(&dst).unwrap(), &metadata, &refs).unwrap();

    let files = ModelFiles::open(&dst).unwrap();
    let want = expected(&family_dir("mixtral"));
    let run = |precision| {
        let head = ClientHead::load(&files, &Device::Cpu, precision).unwrap();
        let shard = BlockShard::load(
            &files,
            BlockRange::new(0, 2).unwrap(),
            &Device::Cpu,
            precision,
        )
        .unwrap();
        let mut cache = shard.new_session(64, &CacheBudget::unlimited()).unwrap();
        let out = shard
            .forward(&head.embed(&want.prompt).unwrap(), &mut cache)
            .unwrap();
        flat(&out)
    };
    let quantized = run(WeightPrecision::Native);
    let dequantized = run(WeightPrecision::F32);
    let err = relative_error(&quantized, &dequantized);
    assert!(err <= TOLERANCE, "quantized experts off by {err:e}");
    std::fs::remove_file(&dst).unwrap();
}

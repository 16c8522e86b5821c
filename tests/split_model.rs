//! `sherpa split-model`: a client runs from the head file alone and each
//! server from its span file alone, and the swarm generates what the whole
//! model does locally. Broken pieces are refused with a clear error.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sherpa_swarm::model_store;
use sherpa_swarm::{ChatMessage, Client, GenerateOptions, Server, Tracker};
use swarm_shard::{Device, LocalModel, ModelFiles, TextTokenizer, WeightPrecision};

fn split(model: &Path, out: &Path) -> (PathBuf, Vec<PathBuf>) {
    let output = common::output_ok(
        Command::new(env!("CARGO_BIN_EXE_sherpa"))
            .arg("split-model")
            .arg(model)
            .arg("--out")
            .arg(out)
            .args(["--spans", "0..12,12..21,21..30"]),
    );
    let listing = String::from_utf8(output).unwrap();
    let paths: Vec<PathBuf> = listing
        .lines()
        .map(|l| PathBuf::from(l.split('\t').next().unwrap()))
        .collect();
    assert_eq!(paths.len(), 4, "{listing}");
    (paths[0].clone(), paths[1..].to_vec())
}

/// A copy of `src` at `dst` with one byte of `tensor` changed.
fn altered(src: &Path, dst: &Path, tensor: &str) -> PathBuf {
    use candle_core::quantized::gguf_file::Content;
    std::fs::copy(src, dst).unwrap();
    let content = Content::read(&mut std::fs::File::open(dst).unwrap()).unwrap();
    let info = &content.tensor_infos[tensor];
    let at = (content.tensor_data_offset + info.offset + 9) as usize;
    let mut bytes = std::fs::read(dst).unwrap();
    bytes[at] ^= 0x5a;
    std::fs::write(dst, bytes).unwrap();
    dst.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_of_pieces_generates_what_the_whole_model_does() {
    let model = common::smollm2();
    let out = std::env::temp_dir().join(format!("sherpa-split-{}", std::process::id()));
    let (head, spans) = split(&model, &out);

    // Each piece is a fraction of the file and is named as the model.
    let whole = std::fs::metadata(&model).unwrap().len();
    let head_bytes = std::fs::metadata(&head).unwrap().len();
    assert!(head_bytes < whole / 2, "head {head_bytes} of {whole} bytes");
    for piece in std::iter::once(&head).chain(&spans) {
        let id = model_store::model_id(&piece.to_string_lossy()).unwrap();
        assert_eq!(
            id.as_str(),
            model_store::DEFAULT_MODEL,
            "{}",
            piece.display()
        );
    }
    let original = ModelFiles::open(&model).unwrap();
    assert_eq!(
        ModelFiles::open(&head).unwrap().manifest().unwrap(),
        original.manifest().unwrap(),
        "the head carries the original's block digests"
    );

    let tokenizer = TextTokenizer::from_model(&original).unwrap();
    let prompt = tokenizer
        .encode_chat(&[ChatMessage::user("Name three colours of the rainbow.")])
        .unwrap();
    let options = GenerateOptions::default()
        .with_max_new_tokens(16)
        .with_stop_at_eos(false);
    let local = LocalModel::load(&original, &[], &Device::Cpu, WeightPrecision::Native)
        .unwrap()
        .generate(&prompt, &options, &mut |_| Ok(true))
        .unwrap()
        .tokens;

    let tracker = Tracker::builder().start().await.unwrap();
    let mut servers = Vec::new();
    for (i, (piece, span)) in spans.iter().zip(["0..12", "12..21", "21..30"]).enumerate() {
        let server = Server::builder(piece.to_string_lossy(), span.parse().unwrap())
            .name(format!("piece-{i}"))
            .tracker(tracker.addr().clone())
            .probe_tracker(false)
            .start()
            .await
            .unwrap();
        servers.push(server);
    }
    let client = Client::builder(head.to_string_lossy())
        .tracker(tracker.addr().clone())
        .start()
        .await
        .unwrap();
    let generation = client
        .generate(&prompt, &options, &mut |_| true)
        .await
        .unwrap();
    assert_eq!(generation.output.tokens, local, "pieces = whole");
    assert_eq!(generation.route.len(), 3);
    client.shutdown().await;

    // A span file serves only its blocks; a client cannot run from it.
    let wrong = Server::builder(spans[0].to_string_lossy(), "10..20".parse().unwrap())
        .tracker(tracker.addr().clone())
        .probe_tracker(false)
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(wrong.contains("holding blocks 0..12 only"), "{wrong}");
    let no_head = Client::builder(spans[1].to_string_lossy())
        .tracker(tracker.addr().clone())
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        no_head.contains("a client runs from the head file"),
        "{no_head}"
    );

    // A span file altered after the split is refused by its own manifest,
    // and so is an altered head.
    let bad = altered(&spans[2], &out.join("altered.gguf"), "blk.25.ffn_up.weight");
    let bad_head = altered(&head, &out.join("altered.head.gguf"), "output_norm.weight");
    let refused_head = Client::builder(bad_head.to_string_lossy())
        .tracker(tracker.addr().clone())
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(refused_head.contains("corrupted"), "{refused_head}");
    let refused = Server::builder(bad.to_string_lossy(), "21..30".parse().unwrap())
        .tracker(tracker.addr().clone())
        .probe_tracker(false)
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("block 25") && refused.contains("corrupted"),
        "{refused}"
    );

    for server in servers {
        server.shutdown().await.unwrap();
    }
    tracker.shutdown().await;
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn split_model_refuses_spans_that_do_not_cover_the_model() {
    let model = common::smollm2();
    let out = std::env::temp_dir().join(format!("sherpa-split-bad-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_sherpa"))
        .arg("split-model")
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .args(["--spans", "0..10,12..30"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("expected one starting at 10, got 12..30"),
        "{err}"
    );
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().count() == 0);
}

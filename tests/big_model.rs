//! A model no single server may hold: a synthetic Llama with the
//! dimensions of a 7B model (hidden 4096, 32 heads, FFN 11008, vocabulary
//! 32000, random Q4_0 weights), split with `sherpa split-model` into a head
//! file and four span files, served by four `sherpa serve` processes each
//! under a `--max-memory` limit well below the model's size; a client
//! running from the head file alone generates exactly what a local run of
//! the whole model does.
//!
//! CI runs it with 8 blocks (a 1.1 GB file); `SHERPA_BIG_BLOCKS=32` runs
//! the full 7B shape (3.8 GB): see the README's performance section.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sherpa_swarm::core::infer::Dtype;
use sherpa_swarm::dht::SessionOptions;
use sherpa_swarm::{BlockRange, Client, GenerateOptions, Tracker};
use swarm_shard::synth::SynthLlama;
use swarm_shard::{Device, LocalModel, ModelFiles, WeightPrecision};

const SERVERS: u32 = 4;
const CACHE_MIB: u64 = 64;
const PROMPT: [u32; 4] = [1, 450, 4996, 17354];
const NEW_TOKENS: usize = 8;

fn sherpa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sherpa"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Writes the model once per shape (it is deterministic).
fn model(blocks: usize) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("big-model");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("synthetic-7b-shape-{blocks}.gguf"));
    let shape = SynthLlama {
        blocks,
        ..SynthLlama::llama_7b(7)
    };
    let fresh = std::fs::metadata(&path).is_ok_and(|m| m.len() > shape.weight_bytes());
    if !fresh {
        let started = Instant::now();
        let bytes = shape.write_q4_0(&path).unwrap();
        eprintln!(
            "wrote {} ({:.0} MiB) in {:.1} s",
            path.display(),
            mib(bytes),
            started.elapsed().as_secs_f64()
        );
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_memory_limited_servers_host_a_7b_shaped_model_that_none_could_hold() {
    let blocks: u32 = std::env::var("SHERPA_BIG_BLOCKS")
        .ok()
        .map(|b| b.parse().expect("SHERPA_BIG_BLOCKS is a number of blocks"))
        .unwrap_or(8);
    let path = model(blocks as usize);
    let model_bytes = std::fs::metadata(&path).unwrap().len();
    let home = std::env::temp_dir().join(format!("sherpa-big-{}", std::process::id()));
    let pieces = home.join("pieces");
    let spans = BlockRange::split_evenly(blocks, SERVERS).unwrap();
    let span_list: Vec<String> = spans.iter().map(|s| s.to_string()).collect();
    let listing = common::output_ok(
        sherpa()
            .env("SHERPA_HOME", &home)
            .arg("split-model")
            .arg(&path)
            .arg("--out")
            .arg(&pieces)
            .args(["--spans", &span_list.join(",")]),
    );
    let files: Vec<PathBuf> = String::from_utf8(listing)
        .unwrap()
        .lines()
        .map(|l| PathBuf::from(l.split('\t').next().unwrap()))
        .collect();
    let (head, span_files) = (&files[0], &files[1..]);
    let head_bytes = std::fs::metadata(head).unwrap().len();

    // Each server may use its span's weights, the cache and the runtime,
    // with 15% to spare: well under the model's size.
    let original = ModelFiles::open(&path).unwrap();
    let runtime = sherpa_swarm::swarm::RUNTIME_MEMORY;
    let limit = |span: BlockRange| {
        ((original.span_memory(span) + (CACHE_MIB << 20) + runtime) as f64 * 1.15) as u64
    };
    let limits: Vec<u64> = spans.iter().map(|s| limit(*s)).collect();
    for l in &limits {
        assert!(
            *l < model_bytes / 2,
            "a limit of {} MiB is not well under the model's {} MiB",
            mib(*l),
            mib(model_bytes)
        );
    }

    // A server asked for the whole model under that limit refuses.
    let whole = BlockRange::new(0, blocks).unwrap();
    let refused = sherpa()
        .env("SHERPA_HOME", &home)
        .args([
            "serve",
            "--blocks",
            &whole.to_string(),
            "--lan",
            "--max-memory",
        ])
        .arg(format!("{}K", limits[0] / 1024))
        .arg("--model")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("more than the memory limit"), "{err}");

    let tracker = Tracker::builder().start().await.unwrap();
    let mut servers = Vec::new();
    for (i, (span, file)) in spans.iter().zip(span_files).enumerate() {
        let (guard, addr) = common::spawn_first_line(
            sherpa()
                .env("SHERPA_HOME", &home)
                .arg("serve")
                .arg("--model")
                .arg(file)
                .args(["--blocks", &span.to_string()])
                .args(["--tracker", &tracker.addr().to_string()])
                .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
                .args(["--cache-mib", &CACHE_MIB.to_string()])
                .arg("--max-memory")
                .arg(format!("{}K", limits[i] / 1024))
                .args(["--name", &format!("big-{i}")]),
        );
        assert!(addr.contains("/p2p/"), "server {i} printed {addr:?}");
        servers.push(guard);
    }

    let options = GenerateOptions::default()
        .with_max_new_tokens(NEW_TOKENS)
        .with_stop_at_eos(false);
    let client = Client::builder(head.to_string_lossy())
        .tracker(tracker.addr().clone())
        .session(
            SessionOptions::default()
                .with_dtype(Dtype::F32)
                .with_step_timeout(Duration::from_secs(60)),
        )
        .start()
        .await
        .unwrap();
    let distributed = client
        .generate(&PROMPT, &options, &mut |_| true)
        .await
        .unwrap();
    client.shutdown().await;
    let route: Vec<String> = distributed
        .route
        .iter()
        .map(|s| format!("{} {}", s.name, s.blocks))
        .collect();

    let peaks: Vec<u64> = servers
        .iter()
        .map(|s| {
            sherpa_swarm::hardware::resident_memory_of(&s.0.id().to_string())
                .expect("the server's /proc status")
                .1
        })
        .collect();
    for mut server in servers {
        common::interrupt(&mut server);
    }
    tracker.shutdown().await;

    let local_model =
        LocalModel::load(&original, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
    let local = local_model
        .generate(&PROMPT, &options, &mut |_| Ok(true))
        .unwrap();
    drop(local_model);

    eprintln!(
        "model: {blocks} blocks of the 7B shape, {:.0} MiB; head file {:.1} MiB",
        mib(model_bytes),
        mib(head_bytes)
    );
    for (i, span) in spans.iter().enumerate() {
        eprintln!(
            "server {i}: blocks {span}, span file {:.0} MiB, limit {:.0} MiB, peak RSS {:.0} MiB",
            mib(std::fs::metadata(&span_files[i]).unwrap().len()),
            mib(limits[i]),
            mib(peaks[i])
        );
    }
    eprintln!("route: {}", route.join(" -> "));
    eprintln!(
        "decode: distributed {:.2} tokens/s, local {:.2} tokens/s ({:.2}x)",
        distributed.output.decode_tokens_per_second(),
        local.decode_tokens_per_second(),
        distributed.output.decode_tokens_per_second() / local.decode_tokens_per_second()
    );

    assert_eq!(
        distributed.output.tokens, local.tokens,
        "distributed greedy = local"
    );
    assert_eq!(distributed.route.len(), SERVERS as usize);
    for (i, peak) in peaks.iter().enumerate() {
        assert!(
            *peak <= limits[i],
            "server {i} peaked at {:.0} MiB over its {:.0} MiB limit",
            mib(*peak),
            mib(limits[i])
        );
    }
    assert!(
        head_bytes < model_bytes / 4,
        "the client needs only the head"
    );
    std::fs::remove_dir_all(&home).unwrap();
}

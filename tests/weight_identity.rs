//! Weight identity: every server announces a digest of each block it
//! hosts, and a client routes only through blocks whose digests are those
//! of its own copy of the model. Two quantizations of one model share a
//! swarm without mixing, and a file altered after the fact is refused.
//! In one process on loopback, with tiny random models.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sherpa_swarm::{Client, GenerateOptions, Server, Tracker};
use swarm_shard::tiny::{GgmlDType, TinyModelSpec};
use swarm_shard::{Device, LocalModel, ModelFiles, WeightPrecision};

const PROMPT: [u32; 5] = [3, 14, 15, 92, 65];

fn write(dir: &Path, dtype: GgmlDType) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    // One file name for all: the swarm names the model "tiny" either way.
    let path = dir.join("tiny.gguf");
    let spec = TinyModelSpec {
        seed: 11,
        ..TinyModelSpec::default()
    };
    spec.write_gguf(&path, dtype).unwrap();
    path
}

/// A copy of `src` with one byte of block 1's query matrix changed.
fn altered_copy(src: &Path, dir: &Path) -> PathBuf {
    use candle_core::quantized::gguf_file::Content;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("tiny.gguf");
    std::fs::copy(src, &path).unwrap();
    let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let info = &content.tensor_infos["blk.1.attn_q.weight"];
    // Past the first block's f16 scale: a quantized weight.
    let at = (content.tensor_data_offset + info.offset + 5) as usize;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at] = bytes[at].wrapping_add(7);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn local_greedy(path: &Path, options: &GenerateOptions) -> Vec<u32> {
    let files = ModelFiles::open(path).unwrap();
    let model = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native).unwrap();
    model
        .generate(&PROMPT, options, &mut |_| Ok(true))
        .unwrap()
        .tokens
}

fn names<'a>(
    servers: impl Iterator<Item = &'a sherpa_swarm::dht::ListedServer>,
) -> BTreeSet<String> {
    servers.map(|s| s.info.public_name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_quantizations_share_a_swarm_and_altered_weights_are_refused() {
    let root = std::env::temp_dir().join(format!("sherpa-identity-{}", std::process::id()));
    let q8 = write(&root.join("q8"), GgmlDType::Q8_0);
    let q4 = write(&root.join("q4"), GgmlDType::Q4_0);
    let altered = altered_copy(&q8, &root.join("altered"));

    let tracker = Tracker::builder().start().await.unwrap();
    let mut servers = Vec::new();
    for (name, path, span) in [
        ("q8-a", &q8, "0..2"),
        ("q8-b", &q8, "2..4"),
        ("q4-a", &q4, "0..2"),
        ("q4-b", &q4, "2..4"),
        ("altered", &altered, "0..2"),
    ] {
        let server = Server::builder(path.to_string_lossy(), span.parse().unwrap())
            .name(name)
            .tracker(tracker.addr().clone())
            .probe_tracker(false)
            .start()
            .await
            .unwrap();
        assert_eq!(server.info().model.as_str(), "tiny");
        assert_eq!(
            server.info().block_digests.len(),
            2,
            "{name} announces its digests"
        );
        servers.push(server);
    }

    let options = GenerateOptions::default()
        .with_max_new_tokens(12)
        .with_stop_at_eos(false);
    let cases = [
        (&q8, ["q8-a", "q8-b"], ["altered", "q4-a", "q4-b"]),
        (&q4, ["q4-a", "q4-b"], ["altered", "q8-a", "q8-b"]),
    ];
    let mut outputs = Vec::new();
    for (path, own, skipped) in cases {
        let client = Client::builder(path.to_string_lossy())
            .tracker(tracker.addr().clone())
            .start()
            .await
            .unwrap();
        let plan = client.plan().await.unwrap();
        let listing = &plan.survey.listing;
        assert_eq!(names(listing.servers.iter()), own.map(String::from).into());
        assert_eq!(
            names(listing.mismatched.iter().map(|m| &m.server)),
            skipped.map(String::from).into()
        );
        for m in &listing.mismatched {
            assert!(m.reason.contains("other weights"), "{}", m.reason);
        }
        // The node selector's report (sherpa nodes --json, the dashboard)
        // says whom it skipped and why.
        let report = client.report(true).await.unwrap().json();
        let reported: BTreeSet<String> = report["skipped_servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                assert!(
                    k["reason"].as_str().unwrap().contains("other weights"),
                    "{k}"
                );
                k["name"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(reported, skipped.map(String::from).into());
        let generation = client
            .generate(&PROMPT, &options, &mut |_| true)
            .await
            .unwrap();
        for step in &generation.route {
            assert!(
                own.contains(&step.name.as_str()),
                "routed through {}",
                step.name
            );
        }
        let local = local_greedy(path, &options);
        assert_eq!(
            generation.output.tokens,
            local,
            "{} distributed = local",
            path.display()
        );
        outputs.push(local);
        client.shutdown().await;
    }
    assert_ne!(
        outputs[0], outputs[1],
        "the two quantizations compute differently"
    );

    // The altered file differs from the original in block 1 only.
    let q8_client_view = ModelFiles::open(&q8).unwrap().manifest().unwrap();
    let altered_view = ModelFiles::open(&altered).unwrap().manifest().unwrap();
    let differing: Vec<usize> = q8_client_view
        .differences(0, &altered_view.blocks)
        .map(|(block, _, _)| block)
        .collect();
    assert_eq!(differing, [1]);
    let client = Client::builder(q8.to_string_lossy())
        .tracker(tracker.addr().clone())
        .start()
        .await
        .unwrap();
    let plan = client.plan().await.unwrap();
    let refused = plan
        .survey
        .listing
        .mismatched
        .iter()
        .find(|m| m.server.info.public_name == "altered")
        .expect("the altered server is refused");
    assert!(refused.reason.contains("block 1 "), "{}", refused.reason);
    client.shutdown().await;

    for server in servers {
        server.shutdown().await.unwrap();
    }
    tracker.shutdown().await;
    std::fs::remove_dir_all(&root).unwrap();
}

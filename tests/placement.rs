//! Servers that choose their own blocks: ten servers of five blocks each,
//! started together without spans against the 30-block model, cover it;
//! then three that hosted blocks nobody else did leave, and the rest move
//! to cover the model again. In one process on loopback, with the real
//! model; prints the moves and the times to coverage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sherpa_swarm::{BlockRange, Client, GenerateOptions, Server, Tracker};
use swarm_shard::{Device, LocalModel, ModelFiles, WeightPrecision};

const SERVERS: usize = 10;
const SPAN: u32 = 5;
const BLOCKS: u32 = 30;

/// Blocks of the model no listed server hosts, as `observer` sees them.
async fn holes(observer: &Server) -> Vec<BlockRange> {
    let listing = observer
        .node()
        .list_servers(&observer.info().model, sherpa_swarm::dht::now_ms())
        .await
        .unwrap();
    let spans: Vec<BlockRange> = listing.servers.iter().map(|s| s.info.blocks).collect();
    sherpa_swarm::score::uncovered_blocks(BLOCKS, &spans)
}

async fn wait_covered(observer: &Server, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let missing = holes(observer).await;
        if missing.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "blocks {missing:?} still have no host after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_without_spans_cover_the_model_and_recover_when_some_leave() {
    let model = common::smollm2().to_string_lossy().into_owned();
    let tracker = Tracker::builder().start().await.unwrap();
    let started = Instant::now();
    let starts: Vec<_> = (0..SERVERS)
        .map(|i| {
            let builder = Server::placing_itself(model.clone())
                .span_length(SPAN)
                .rebalance_every(Duration::from_secs(1))
                .name(format!("auto-{i}"))
                .tracker(tracker.addr().clone())
                .probe_tracker(false)
                .cache_bytes(64 << 20);
            tokio::spawn(builder.start())
        })
        .collect();
    let mut servers = Vec::new();
    for start in starts {
        servers.push(start.await.unwrap().unwrap());
    }
    for s in &servers {
        assert_eq!(s.info().blocks.len(), SPAN);
    }
    let initial: Vec<String> = servers
        .iter()
        .map(|s| s.info().blocks.to_string())
        .collect();
    let first_cover = wait_covered(&servers[0], Duration::from_secs(90)).await;
    let moves_to_cover: u32 = servers.iter().map(Server::moves).sum();
    eprintln!(
        "{SERVERS} servers joined in {:.1} s at {initial:?}; covered {:.1} s later after {moves_to_cover} moves",
        (started.elapsed() - first_cover).as_secs_f64(),
        first_cover.as_secs_f64()
    );

    // The three that leave are the ones hosting blocks nobody else does.
    let mut hosts: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, s) in servers.iter().enumerate() {
        for b in s.current_info().blocks.iter() {
            hosts.entry(b).or_default().push(i);
        }
    }
    let mut leaving: Vec<usize> = Vec::new();
    for owners in hosts.values().filter(|o| o.len() == 1) {
        if !leaving.contains(&owners[0]) && leaving.len() < 3 {
            leaving.push(owners[0]);
        }
    }
    for i in 0..SERVERS {
        if leaving.len() < 3 && !leaving.contains(&i) {
            leaving.push(i);
        }
    }
    leaving.sort_unstable_by(|a, b| b.cmp(a));
    let mut gone = Vec::new();
    for i in leaving {
        gone.push(servers.remove(i));
    }
    let before: u32 = servers.iter().map(Server::moves).sum();
    for server in gone {
        server.shutdown().await.unwrap();
    }
    let left_holes: Vec<String> = holes(&servers[0])
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        !left_holes.is_empty(),
        "the three that left hosted blocks only they had"
    );
    let recovery = wait_covered(&servers[0], Duration::from_secs(90)).await;
    let moves: u32 = servers.iter().map(Server::moves).sum::<u32>() - before;
    let now: Vec<String> = servers
        .iter()
        .map(|s| s.current_info().blocks.to_string())
        .collect();
    eprintln!(
        "3 left, opening {left_holes:?}; covered again {:.1} s later after {moves} moves: {now:?}",
        recovery.as_secs_f64()
    );
    assert!(moves >= 1);
    assert!(moves <= 7, "{moves} moves to recover from three departures");

    // The moved servers compute what the model does.
    let client = Client::builder(model.clone())
        .tracker(tracker.addr().clone())
        .start()
        .await
        .unwrap();
    let options = GenerateOptions::default()
        .with_max_new_tokens(8)
        .with_stop_at_eos(false);
    let prompt = [1u32, 504, 3458, 314, 260];
    let out = client
        .generate(&prompt, &options, &mut |_| true)
        .await
        .unwrap();
    let files = ModelFiles::open(&model).unwrap();
    let local = LocalModel::load(&files, &[], &Device::Cpu, WeightPrecision::Native)
        .unwrap()
        .generate(&prompt, &options, &mut |_| Ok(true))
        .unwrap();
    assert_eq!(out.output.tokens, local.tokens);
    client.shutdown().await;

    for server in servers {
        server.shutdown().await.unwrap();
    }
    tracker.shutdown().await;
}

/// A server that must move waits until its open sessions have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_moves_only_after_its_sessions_end() {
    let model = common::smollm2().to_string_lossy().into_owned();
    let tracker = Tracker::builder().start().await.unwrap();
    let fixed = |name: &str, span: &str| {
        Server::builder(model.clone(), span.parse().unwrap())
            .name(name)
            .tracker(tracker.addr().clone())
            .probe_tracker(false)
            .cache_bytes(64 << 20)
            .start()
    };
    let front = fixed("front", "0..15").await.unwrap();
    // The only window nobody serves is 15..30.
    let mover = Server::placing_itself(model.clone())
        .span_length(15)
        .rebalance_every(Duration::from_millis(500))
        .name("mover")
        .tracker(tracker.addr().clone())
        .probe_tracker(false)
        .cache_bytes(64 << 20)
        .start()
        .await
        .unwrap();
    assert_eq!(mover.info().blocks.to_string(), "15..30");
    let back = fixed("back", "15..30").await.unwrap();

    let client = Client::builder(model.clone())
        .tracker(tracker.addr().clone())
        .exclude("back")
        .start()
        .await
        .unwrap();
    let session = client.session(64).await.unwrap();
    assert!(session.route().iter().any(|s| s.name == "mover"));
    assert_eq!(mover.current_info().sessions, 1);

    // Blocks 0..15 lose their host; "mover" is the spare that must go there,
    // but not while its session is open.
    front.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(mover.moves(), 0, "moved under an open session");
    assert_eq!(mover.current_info().blocks.to_string(), "15..30");

    session.close().await;
    let waited = wait_covered(&back, Duration::from_secs(30)).await;
    assert_eq!(mover.moves(), 1);
    assert_eq!(mover.current_info().blocks.to_string(), "0..15");
    eprintln!(
        "moved {:.1} s after its session closed",
        waited.as_secs_f64()
    );

    client.shutdown().await;
    for server in [mover, back] {
        server.shutdown().await.unwrap();
    }
    tracker.shutdown().await;
}

//! Lookup latency of a 50-server loopback swarm: a tracker, 50 servers
//! spread over a 40-block model, and a client listing every server with its
//! verified record (target: all 50 found in under 1 s).
//!
//! All nodes share this process and its cores, so the figure includes their
//! work answering the queries; on separate machines it is lower.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use sherpa_swarm::core::{BlockRange, ModelId, NodeKey, ServerInfo};
use sherpa_swarm::dht::{announce_periodically, now_ms, Node, NodeConfig};

const SERVERS: u8 = 50;

fn seed(i: u8) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[0] = i;
    s[1] = 0xB7;
    s
}

fn lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let model = ModelId::new("bench-model").unwrap();
    let ttl = Duration::from_secs(120);
    let (client, _nodes) = rt.block_on(async {
        let tracker =
            Node::start(NodeConfig::new(NodeKey::from_seed(seed(0))).with_record_ttl(ttl))
                .await
                .unwrap();
        let tracker_addr = tracker.listen_addrs().await.unwrap()[0].clone();
        let mut nodes = vec![tracker];
        for i in 0..SERVERS {
            let key = NodeKey::from_seed(seed(i + 1));
            let node = Node::start(
                NodeConfig::new(key.clone())
                    .with_bootstrap(vec![tracker_addr.clone()])
                    .with_record_ttl(ttl),
            )
            .await
            .unwrap();
            let start = u32::from(i % 10) * 4;
            let info = ServerInfo::new(
                key.public_key(),
                model.clone(),
                BlockRange::new(start, start + 4).unwrap(),
                40,
            );
            // Refreshes land every 30 s, as `sherpa serve` does, so some
            // fall inside the measurement.
            announce_periodically(node.clone(), key, info, Duration::from_secs(30), ttl);
            nodes.push(node);
        }
        let client = Node::start(
            NodeConfig::new(NodeKey::from_seed(seed(200))).with_bootstrap(vec![tracker_addr]),
        )
        .await
        .unwrap();
        // Let the first announcements finish.
        for _ in 0..100 {
            let listing = client.list_servers(&model, now_ms()).await.unwrap();
            if listing.servers.len() == usize::from(SERVERS) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (client, nodes)
    });
    let mut group = c.benchmark_group("dht");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("list_50_servers", |b| {
        b.iter(|| {
            let listing = rt.block_on(client.list_servers(&model, now_ms())).unwrap();
            assert_eq!(listing.servers.len(), usize::from(SERVERS), "{listing:?}");
            listing
        })
    });
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);

//! QUIC and private swarms (pre-shared key under TCP), in process on
//! loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use swarm_core::{BlockRange, ModelId, NodeKey, ServerInfo};
use swarm_dht::node::{loopback, loopback_quic};
use swarm_dht::{announce_periodically, now_ms, Node, NodeConfig, SwarmKey};

fn key(i: u8) -> NodeKey {
    let mut seed = [0u8; 32];
    seed[0] = i;
    seed[1] = 0x3C;
    NodeKey::from_seed(seed)
}

/// Starts a tracker, a server of blocks 0..4 and a client, all listening on
/// `listen` and joining through the tracker's first address; returns the
/// client's count of listed servers once the server shows up (or after
/// 10 s); 0 when the client cannot join at all.
async fn server_seen_by_client(
    listen: fn() -> swarm_dht::Multiaddr,
    swarm_keys: [Option<SwarmKey>; 3],
) -> usize {
    let model = ModelId::new("transport-test").unwrap();
    let config = |i: u8, swarm_key: Option<SwarmKey>| {
        NodeConfig::new(key(i))
            .with_listen(vec![listen()])
            .with_swarm_key(swarm_key)
    };
    let [tracker_key, server_key, client_key] = swarm_keys;
    let tracker = Node::start(config(0, tracker_key)).await.unwrap();
    let at = tracker.listen_addrs().await.unwrap()[0].clone();
    let server = Node::start(config(1, server_key).with_bootstrap(vec![at.clone()]))
        .await
        .unwrap();
    let info = ServerInfo::new(
        key(1).public_key(),
        model.clone(),
        BlockRange::new(0, 4).unwrap(),
        4,
    );
    let _task = announce_periodically(
        server.clone(),
        key(1),
        info,
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    let client = match Node::start(config(2, client_key).with_bootstrap(vec![at])).await {
        Ok(client) => client,
        Err(e) => {
            assert!(e.to_string().contains("bootstrap peer"), "{e}");
            return 0;
        }
    };
    let started = Instant::now();
    loop {
        let found = client
            .list_servers(&model, now_ms())
            .await
            .map(|l| l.servers.len())
            .unwrap_or(0);
        if found > 0 || started.elapsed() > Duration::from_secs(10) {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_over_quic() {
    assert!(loopback_quic().to_string().contains("quic-v1"));
    assert_eq!(
        server_seen_by_client(loopback_quic, [None, None, None]).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_swarm_admits_only_its_key_holders() {
    let key = SwarmKey::generate();
    let same = [Some(key), Some(key), Some(key)];
    assert_eq!(server_seen_by_client(loopback, same).await, 1);
    let outsider = [Some(key), Some(key), Some(SwarmKey::generate())];
    assert_eq!(server_seen_by_client(loopback, outsider).await, 0);
    let keyless = [Some(key), Some(key), None];
    assert_eq!(server_seen_by_client(loopback, keyless).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_swarms_refuse_quic() {
    let config = NodeConfig::new(key(9))
        .with_listen(vec![loopback_quic()])
        .with_swarm_key(Some(SwarmKey::generate()));
    let err = Node::start(config).await.unwrap_err();
    assert!(err.to_string().contains("QUIC"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_probe_measures_both_ways_and_refuses_abuse() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let server = Node::start(NodeConfig::new(key(20))).await.unwrap();
    let at = server.listen_addrs().await.unwrap()[0].clone();
    let client = Node::start(NodeConfig::new(key(21)).with_bootstrap(vec![at.clone()]))
        .await
        .unwrap();
    let measured = client.probe(server.peer_id(), 1 << 20).await.unwrap();
    assert!(measured.upload_bps > 1_000_000, "{measured:?}");
    assert!(measured.download_bps > 1_000_000, "{measured:?}");

    // A raw peer asks for more than the cap, and sends a garbage request:
    // both streams end without an answer, and probes still work after.
    let (mut control, driver) = common::raw_peer(at);
    let huge = swarm_core::codec::encode(&swarm_dht::probe::ProbeRequest {
        version: swarm_dht::probe::PROBE_VERSION,
        upload: 1,
        download: u32::MAX,
    })
    .unwrap();
    let mut framed = (huge.len() as u32).to_le_bytes().to_vec();
    framed.extend(&huge);
    for request in [framed, vec![0xFF; 300]] {
        let mut stream = control
            .open_stream(server.peer_id(), swarm_dht::probe::PROBE_PROTOCOL)
            .await
            .unwrap();
        let _ = stream.write_all(&request).await;
        let _ = stream.write_all(&[0]).await;
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the server ends the stream");
        assert!(answer.is_empty(), "no answer to a refused probe");
    }
    driver.abort();
    assert!(client.probe(server.peer_id(), 64 << 10).await.is_ok());
}

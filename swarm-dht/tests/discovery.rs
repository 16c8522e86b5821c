//! A tracker, 20 servers and a client on loopback: the client lists every
//! server with its block range; killed servers drop out within the record
//! lifetime; withdrawn ones at once; forged records are not listed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use swarm_core::{BlockRange, ModelId, NodeKey, ServerInfo};
use swarm_dht::{announce_periodically, now_ms, withdraw, Node, NodeConfig, ServerListing};

// Short lifetimes keep the test quick; the waits below are generous bounds
// so that a loaded machine slows the test down instead of failing it.
const TTL: Duration = Duration::from_secs(8);
const REFRESH: Duration = Duration::from_millis(1000);

fn info(key: &NodeKey, model: &ModelId, blocks: BlockRange) -> ServerInfo {
    let mut info = ServerInfo::new(key.public_key(), model.clone(), blocks, 40);
    info.throughput = 100.0;
    info.public_name = format!("server-{}", blocks.start());
    info
}

fn seed(i: u8) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[0] = i;
    s[1] = 0xA5;
    s
}

/// Polls the listing until `done` holds or `within` passes.
async fn wait_for(
    client: &Node,
    model: &ModelId,
    within: Duration,
    done: impl Fn(&ServerListing) -> bool,
) -> (ServerListing, Duration) {
    let started = Instant::now();
    loop {
        let listing = client.list_servers(model, now_ms()).await.unwrap();
        if done(&listing) || started.elapsed() > within {
            return (listing, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_servers_are_listed_and_dead_ones_vanish() {
    let model = ModelId::new("tiny-test-model").unwrap();
    let tracker = Node::start(NodeConfig::new(NodeKey::from_seed(seed(0))).with_record_ttl(TTL))
        .await
        .unwrap();
    let tracker_addr = tracker.listen_addrs().await.unwrap()[0].clone();

    let mut servers = Vec::new();
    for i in 0..20u8 {
        let key = NodeKey::from_seed(seed(i + 1));
        let config = NodeConfig::new(key.clone())
            .with_bootstrap(vec![tracker_addr.clone()])
            .with_record_ttl(TTL);
        let node = Node::start(config).await.unwrap();
        // 20 servers over a 40-block model, two spans of 2 blocks each per...
        let start = (i as u32 % 10) * 4;
        let blocks = BlockRange::new(start, start + 4).unwrap();
        let info = info(&key, &model, blocks);
        let task = announce_periodically(node.clone(), key.clone(), info.clone(), REFRESH, TTL);
        servers.push((node, key, info, task));
    }

    let client_key = NodeKey::from_seed(seed(200));
    let client =
        Node::start(NodeConfig::new(client_key).with_bootstrap(vec![tracker_addr.clone()]))
            .await
            .unwrap();
    let (listing, took) = wait_for(&client, &model, Duration::from_secs(60), |l| {
        l.servers.len() == 20
    })
    .await;
    eprintln!(
        "all 20 listed after {took:?}: {listing:?}",
        listing = (
            listing.servers.len(),
            listing.rejected,
            listing.expired,
            listing.missing
        )
    );
    assert_eq!(listing.servers.len(), 20, "{listing:?}");
    assert_eq!(listing.rejected, 0);
    for (node, _, info, _) in &servers {
        let listed = listing
            .servers
            .iter()
            .find(|s| s.peer_id == node.peer_id())
            .expect("every server listed");
        assert_eq!(listed.info.blocks, info.blocks);
        assert_eq!(listed.info.public_name, info.public_name);
    }

    // Kill 5 servers abruptly: no withdrawal, they just stop refreshing.
    // Their last records expire within TTL. (The wait below is a generous bound for loaded machines,
    // not a speed goal.)
    for (node, _, _, task) in servers.drain(..5) {
        task.abort();
        node.shutdown().await;
    }
    let (listing, took) = wait_for(&client, &model, TTL + Duration::from_secs(60), |l| {
        l.servers.len() == 15
    })
    .await;
    eprintln!("killed servers gone after {took:?} (record lifetime {TTL:?})");
    assert_eq!(listing.servers.len(), 15, "{listing:?}");
    // Exactly the survivors are listed. The dead ones' provider entries may
    // linger a little longer; their records are expired or already dropped.
    let listed: std::collections::HashSet<_> = listing.servers.iter().map(|s| s.peer_id).collect();
    let alive: std::collections::HashSet<_> =
        servers.iter().map(|(node, ..)| node.peer_id()).collect();
    assert_eq!(listed, alive);
    assert!(listing.expired + listing.missing <= 5, "{listing:?}");
    for (node, ..) in &servers {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_server_disappears_before_its_record_expires() {
    // Records live a minute here: the server must vanish long before.
    let ttl = Duration::from_secs(60);
    let model = ModelId::new("withdraw-test").unwrap();
    let tracker = Node::start(NodeConfig::new(NodeKey::from_seed(seed(120))))
        .await
        .unwrap();
    let tracker_addr = tracker.listen_addrs().await.unwrap()[0].clone();
    let key = NodeKey::from_seed(seed(121));
    let node = Node::start(NodeConfig::new(key.clone()).with_bootstrap(vec![tracker_addr.clone()]))
        .await
        .unwrap();
    let info = info(&key, &model, BlockRange::new(0, 4).unwrap());
    let task = announce_periodically(
        node.clone(),
        key.clone(),
        info.clone(),
        Duration::from_secs(30),
        ttl,
    );
    let client = Node::start(
        NodeConfig::new(NodeKey::from_seed(seed(122))).with_bootstrap(vec![tracker_addr]),
    )
    .await
    .unwrap();
    let (listing, _) = wait_for(&client, &model, Duration::from_secs(30), |l| {
        l.servers.len() == 1
    })
    .await;
    assert_eq!(listing.servers.len(), 1);
    let expires_at = listing.servers[0].info.expires_at_ms;

    task.abort();
    withdraw(&node, &key, &info).await.unwrap();
    let (listing, _) = wait_for(&client, &model, Duration::from_secs(30), |l| {
        l.servers.is_empty()
    })
    .await;
    assert!(
        listing.servers.is_empty(),
        "withdrawn server still listed: {listing:?}"
    );
    assert!(now_ms() < expires_at, "gone by withdrawal, not by expiry");
    assert_eq!(
        listing.expired, 1,
        "the tombstone reads as expired: {listing:?}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_records_are_not_listed() {
    let model = ModelId::new("forgery-test").unwrap();
    let tracker = Node::start(NodeConfig::new(NodeKey::from_seed(seed(100))))
        .await
        .unwrap();
    let tracker_addr = tracker.listen_addrs().await.unwrap()[0].clone();
    let honest_key = NodeKey::from_seed(seed(101));
    let honest =
        Node::start(NodeConfig::new(honest_key.clone()).with_bootstrap(vec![tracker_addr.clone()]))
            .await
            .unwrap();
    let honest_info = info(&honest_key, &model, BlockRange::new(0, 4).unwrap());
    let _honest_task = announce_periodically(
        honest.clone(),
        honest_key.clone(),
        honest_info,
        REFRESH,
        TTL,
    );

    // A forger tries to announce a record signed by the honest key under its
    // own peer id: it cannot sign for its own key naming another, and a
    // record of another key under its peer id is rejected by lookups.
    let forger_key = NodeKey::from_seed(seed(102));
    let forger =
        Node::start(NodeConfig::new(forger_key.clone()).with_bootstrap(vec![tracker_addr.clone()]))
            .await
            .unwrap();
    let mut stolen = info(&honest_key, &model, BlockRange::new(4, 8).unwrap());
    stolen.issued_at_ms = now_ms();
    stolen.expires_at_ms = stolen.issued_at_ms + 60_000;
    let record = honest_key.sign(&stolen).unwrap();
    assert!(
        forger.announce(&record, &stolen).await.is_err(),
        "a node only announces its own records"
    );

    let client = Node::start(
        NodeConfig::new(NodeKey::from_seed(seed(103))).with_bootstrap(vec![tracker_addr]),
    )
    .await
    .unwrap();
    let (listing, _) = wait_for(&client, &model, Duration::from_secs(60), |l| {
        l.servers.len() == 1
    })
    .await;
    assert_eq!(listing.servers.len(), 1);
    assert_eq!(listing.servers[0].peer_id, honest.peer_id());
    assert_eq!(
        listing.servers[0].info.blocks,
        BlockRange::new(0, 4).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_and_garbage_bytes_do_not_disturb_lookups() {
    use tokio::io::AsyncWriteExt;
    let model = ModelId::new("hostile-test").unwrap();
    let tracker = Node::start(NodeConfig::new(NodeKey::from_seed(seed(110))))
        .await
        .unwrap();
    let tracker_addr = tracker.listen_addrs().await.unwrap()[0].clone();
    let start = |s: u8| {
        let key = NodeKey::from_seed(seed(s));
        let config = NodeConfig::new(key.clone()).with_bootstrap(vec![tracker_addr.clone()]);
        async move { (Node::start(config).await.unwrap(), key) }
    };
    let (honest, honest_key) = start(111).await;
    let honest_info = info(&honest_key, &model, BlockRange::new(0, 4).unwrap());
    let _task = announce_periodically(
        honest.clone(),
        honest_key.clone(),
        honest_info,
        REFRESH,
        TTL,
    );

    // Hostile node 1 republishes the honest node's genuine signed record as
    // its own (replay under another peer id).
    let (replayer, _) = start(112).await;
    let mut genuine = info(&honest_key, &model, BlockRange::new(4, 8).unwrap());
    genuine.issued_at_ms = now_ms();
    genuine.expires_at_ms = genuine.issued_at_ms + 60_000;
    let replayed = honest_key.sign(&genuine).unwrap().to_bytes().unwrap();
    replayer
        .publish_unverified_record(&model, replayed)
        .await
        .unwrap();

    // Hostile node 2 publishes its own record, altered after signing.
    let (tamperer, tamper_key) = start(113).await;
    let mut own = info(&tamper_key, &model, BlockRange::new(8, 12).unwrap());
    own.issued_at_ms = now_ms();
    own.expires_at_ms = own.issued_at_ms + 60_000;
    let mut record = tamper_key.sign(&own).unwrap();
    let last = record.body.len() - 1;
    record.body[last] ^= 1;
    tamperer
        .publish_unverified_record(&model, record.to_bytes().unwrap())
        .await
        .unwrap();

    // Hostile node 3 publishes garbage.
    let (garbler, _) = start(114).await;
    garbler
        .publish_unverified_record(&model, vec![0xFF; 300])
        .await
        .unwrap();

    // And somebody throws raw garbage at the tracker's TCP port.
    let port = tracker_addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    for _ in 0..5 {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let _ = socket.write_all(&[0xAB; 70_000]).await;
    }

    let client = Node::start(
        NodeConfig::new(NodeKey::from_seed(seed(115))).with_bootstrap(vec![tracker_addr]),
    )
    .await
    .unwrap();
    let (listing, _) = wait_for(&client, &model, Duration::from_secs(60), |l| {
        l.servers.len() == 1 && l.rejected == 3
    })
    .await;
    assert_eq!(listing.servers.len(), 1, "{listing:?}");
    assert_eq!(listing.servers[0].peer_id, honest.peer_id());
    assert_eq!(
        listing.rejected, 3,
        "replayed, tampered and garbage records are counted: {listing:?}"
    );
    // The tracker still serves after the garbage.
    assert!(!tracker.listen_addrs().await.unwrap().is_empty());
    // And the hostile records never got into its store: it refused each.
    let stats = tracker.stats().await.unwrap();
    assert!(stats.refused_records >= 3, "{stats:?}");
}

/// An authenticated peer opens streams on every protocol a node speaks and
/// sends garbage and absurd length prefixes; the node drops those streams
/// and keeps answering lookups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_inside_protocol_streams_is_dropped() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let model = ModelId::new("stream-garbage-test").unwrap();
    let tracker = Node::start(NodeConfig::new(NodeKey::from_seed(seed(120))))
        .await
        .unwrap();
    let tracker_addr = tracker.listen_addrs().await.unwrap()[0].clone();
    let server_key = NodeKey::from_seed(seed(121));
    let server =
        Node::start(NodeConfig::new(server_key.clone()).with_bootstrap(vec![tracker_addr.clone()]))
            .await
            .unwrap();
    let info = info(&server_key, &model, BlockRange::new(0, 4).unwrap());
    let _task = announce_periodically(server, server_key, info, REFRESH, TTL);

    let (mut control, driver) = common::raw_peer(tracker_addr.clone());
    let tracker_id = tracker.peer_id();
    let protocols = [
        swarm_dht::KAD_PROTOCOL,
        "/ipfs/id/1.0.0",
        "/ipfs/id/push/1.0.0",
        "/ipfs/ping/1.0.0",
        "/libp2p/circuit/relay/0.2.0/hop",
        "/libp2p/autonat/1.0.0",
        "/sherpa/probe/1.0.0",
    ];
    // A varint length prefix of 2^63, then 1 MiB of garbage.
    let mut absurd = vec![0xFFu8; 9];
    absurd.push(0x01);
    let garbage = vec![0xA7u8; 1 << 20];
    let mut opened = 0;
    for _round in 0..3 {
        for protocol in protocols {
            let protocol = libp2p::StreamProtocol::new(protocol);
            let Ok(mut stream) = control.open_stream(tracker_id, protocol).await else {
                continue;
            };
            opened += 1;
            // A protocol that only writes (identify) never reads what we
            // send, so bound every step: the attacker's problem, not the
            // node's.
            let abuse = async {
                stream.write_all(&absurd).await?;
                stream.write_all(&garbage).await?;
                stream.close().await?;
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), abuse).await;
        }
    }
    assert!(
        opened >= 3,
        "the node speaks these protocols; only {opened} streams opened"
    );
    driver.abort();

    let client = Node::start(
        NodeConfig::new(NodeKey::from_seed(seed(122))).with_bootstrap(vec![tracker_addr]),
    )
    .await
    .unwrap();
    let (listing, _) = wait_for(&client, &model, Duration::from_secs(60), |l| {
        l.servers.len() == 1
    })
    .await;
    assert_eq!(listing.servers.len(), 1, "{listing:?}");
}

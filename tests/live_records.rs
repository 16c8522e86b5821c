//! Servers re-announce what they are doing now, and clients route by it;
//! dropped nodes stop and withdraw. In one process on loopback, with the
//! real model (its per-token compute, ~10 ms for 30 blocks, is what makes
//! a busy server's queue matter).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use sherpa_swarm::{Client, Server, Tracker};

/// Sessions held open on the busy server: its compute counts 1 + HELD
/// times for a new session.
const HELD: u32 = 6;

/// Two replicas of the whole model: one carrying sessions held open by
/// another client, one idle. Once the busy one's record says so, a new
/// client's route goes through the idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_is_routed_around_in_favour_of_an_idle_replica() {
    let model = common::smollm2().to_string_lossy().into_owned();
    let tracker = Tracker::builder().start().await.unwrap();
    let server = |name: &'static str| {
        Server::builder(model.clone(), "0..30".parse().unwrap())
            .name(name)
            .tracker(tracker.addr().clone())
            .probe_tracker(false)
            .announce_every(Duration::from_millis(500), Duration::from_secs(60))
            .start()
    };
    let busy = server("busy").await.unwrap();
    let idle = server("idle").await.unwrap();
    assert_eq!(busy.current_info().sessions, 0);

    // Another user's client, kept off the idle server, holds its sessions.
    let other = Client::builder(model.clone())
        .tracker(tracker.addr().clone())
        .exclude("idle")
        .start()
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..HELD {
        let session = other.session(64).await.unwrap();
        assert_eq!(session.route()[0].name, "busy");
        held.push(session);
    }
    assert_eq!(busy.current_info().sessions, HELD);
    assert_eq!(idle.current_info().sessions, 0);
    let free_busy = busy.current_info().cache_tokens_free;
    assert!(
        free_busy < idle.current_info().cache_tokens_free,
        "the busy server's free cache shrank: {free_busy}"
    );

    // A new client sees the busy server's live record and goes around it.
    let client = Client::builder(model)
        .tracker(tracker.addr().clone())
        .start()
        .await
        .unwrap();
    let started = Instant::now();
    let plan = loop {
        client.forget_survey().await;
        let plan = client.plan().await.unwrap();
        let listed = plan
            .survey
            .listing
            .servers
            .iter()
            .find(|s| s.info.public_name == "busy")
            .map(|s| s.info.sessions);
        if listed == Some(HELD) {
            break plan;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the busy server's record never said {HELD} sessions: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The route counts the sessions (the score's compute part does too,
    // see swarm-score's tests; its absolute figures follow the throughput
    // each server measured at start-up, which a busy machine makes noisy).
    let listed_busy = plan
        .survey
        .candidates
        .iter()
        .find(|c| c.name == "busy")
        .unwrap();
    assert_eq!(listed_busy.sessions, HELD);
    let session = client.session(64).await.unwrap();
    assert_eq!(session.route().len(), 1);
    assert_eq!(session.route()[0].name, "idle");
    session.close().await;
    for session in held {
        session.close().await;
    }
    other.shutdown().await;
    client.shutdown().await;
    busy.shutdown().await.unwrap();
    idle.shutdown().await.unwrap();
    tracker.shutdown().await;
}

/// A server dropped without a shutdown withdraws its record (long before
/// it would expire); a dropped tracker stops listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_nodes_stop_and_withdraw() {
    let model = common::smollm2().to_string_lossy().into_owned();
    let tracker = Tracker::builder().start().await.unwrap();
    let server = Server::builder(model.clone(), "0..30".parse().unwrap())
        .name("dropped")
        .tracker(tracker.addr().clone())
        .probe_tracker(false)
        .announce_every(Duration::from_secs(30), Duration::from_secs(120))
        .start()
        .await
        .unwrap();
    let client = Client::builder(model)
        .tracker(tracker.addr().clone())
        .wait_for_hosts(Duration::ZERO)
        .start()
        .await
        .unwrap();
    assert_eq!(client.plan().await.unwrap().survey.listing.servers.len(), 1);
    drop(server);
    let started = Instant::now();
    loop {
        client.forget_survey().await;
        match client.plan().await {
            Err(e) => {
                assert!(e.to_string().contains("no server of"), "{e}");
                break;
            }
            Ok(plan) => assert!(
                started.elapsed() < Duration::from_secs(20),
                "a dropped server is still listed: {:?}",
                plan.survey.listing.servers
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client.shutdown().await;

    let port = tracker
        .addr()
        .iter()
        .find_map(|p| match p {
            sherpa_swarm::dht::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok());
    drop(tracker);
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a dropped tracker still listens"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

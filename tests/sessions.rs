//! Inference sessions over real nodes on loopback, with a tiny random model:
//! two hops over parts of one server's span give what the span computes
//! locally; the memory budget refuses what it cannot hold; closed, broken
//! and idle sessions give their cache back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sherpa_swarm::backend::ShardBackend;
use swarm_core::infer::{Dtype, OpenSession, Refusal, INFER_VERSION};
use swarm_core::{BlockRange, ModelId, NodeKey};
use swarm_dht::{DhtError, InferenceService, Node, NodeConfig, RemoteSession};
use swarm_shard::tiny::TinyModelSpec;
use swarm_shard::{
    BlockShard, CacheBudget, ClientHead, DType, Device, ModelFiles, SessionCache, WeightPrecision,
};

struct Setup {
    files: ModelFiles,
    shard: Arc<BlockShard>,
    budget: Arc<CacheBudget>,
    server: Node,
    client: Node,
}

fn key(i: u8) -> NodeKey {
    let mut seed = [0u8; 32];
    seed[0] = i;
    seed[1] = 0x77;
    NodeKey::from_seed(seed)
}

fn model() -> ModelId {
    ModelId::new("tiny").unwrap()
}

/// A server of all 4 blocks of a tiny model with `budget_sessions` sessions'
/// worth of cache (2 blocks, 16 positions each), and a client.
async fn setup(name: &str, budget_sessions: u64, idle: Duration) -> Setup {
    let dir = std::env::temp_dir().join(format!("sherpa-sessions-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    TinyModelSpec::default()
        .write_gguf(&path, swarm_shard::tiny::GgmlDType::F32)
        .unwrap();
    let files = ModelFiles::open(&path).unwrap();
    let shard = Arc::new(
        BlockShard::load(
            &files,
            BlockRange::new(0, 4).unwrap(),
            &Device::Cpu,
            WeightPrecision::Native,
        )
        .unwrap(),
    );
    let per_session = SessionCache::bytes_needed(
        files.config(),
        BlockRange::new(0, 2).unwrap(),
        16,
        DType::F32,
    );
    let budget = CacheBudget::new(per_session * budget_sessions);
    let service = InferenceService::new(
        model(),
        Arc::new(ShardBackend::new(shard.clone(), budget.clone())),
    )
    .with_idle_timeout(idle);
    let server = Node::start(NodeConfig::new(key(1))).await.unwrap();
    Arc::new(service)
        .serve_on(&server, Some([127, 0, 0, 1].into()))
        .await
        .unwrap();
    let at = server.listen_addrs().await.unwrap()[0].clone();
    let client = Node::start(NodeConfig::new(key(2)).with_bootstrap(vec![at]))
        .await
        .unwrap();
    Setup {
        files,
        shard,
        budget,
        server,
        client,
    }
}

fn open(blocks: (u32, u32), dtype: Dtype) -> OpenSession {
    OpenSession {
        version: INFER_VERSION,
        model: model(),
        blocks: BlockRange::new(blocks.0, blocks.1).unwrap(),
        max_length: 16,
        dtype,
        direct: true,
        push: true,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Waits (bounded) until the server's whole budget is free again.
async fn budget_returns(budget: &CacheBudget) -> bool {
    let started = Instant::now();
    while budget.available() != budget.limit() {
        if started.elapsed() > Duration::from_secs(20) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hops_equal_the_local_span() {
    let s = setup("hops", 4, Duration::from_secs(60)).await;
    let head = ClientHead::load(&s.files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let budget = CacheBudget::unlimited();
    let mut local = s.shard.new_session(16, &budget).unwrap();
    // Each element type, on a direct connection and on the libp2p stream.
    for (dtype, direct) in [(Dtype::F32, true), (Dtype::F16, true), (Dtype::F32, false)] {
        let mut first = RemoteSession::connect(
            &s.client,
            s.server.peer_id(),
            OpenSession {
                direct,
                ..open((0, 2), dtype)
            },
        )
        .await
        .unwrap();
        let mut second = RemoteSession::connect(
            &s.client,
            s.server.peer_id(),
            OpenSession {
                direct,
                ..open((2, 4), dtype)
            },
        )
        .await
        .unwrap();
        assert_eq!(first.is_direct(), direct);
        assert_eq!(second.is_direct(), direct);
        let mut local_dtype = s.shard.new_session(16, &budget).unwrap();
        std::mem::swap(&mut local, &mut local_dtype);
        // A prefill of 5 positions, then 3 single steps.
        for ids in [&[3u32, 17, 42, 99, 5][..], &[7], &[200], &[11]] {
            let x = head.embed(ids).unwrap();
            let want: Vec<f32> = s
                .shard
                .forward(&x, &mut local)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mid = first.step(&x).await.unwrap();
            let got = second.step(&mid).await.unwrap();
            let tolerance = if dtype == Dtype::F32 { 1e-5 } else { 5e-2 };
            let diff = max_diff(&got, &want);
            assert!(
                diff < tolerance,
                "{dtype:?} (direct {direct}): differs by {diff}"
            );
        }
        assert_eq!(first.len(), 8);
        first.close().await.unwrap();
        second.close().await.unwrap();
    }
    assert!(
        budget_returns(&s.budget).await,
        "closed sessions free their cache"
    );
}

/// Two hops chained by push: the first sends its output straight to the
/// second and back to the client; the second takes its input from the
/// first. Outputs equal the relayed ones, bit for bit; a pushed step the
/// previous hop never sends fails the session with why, and every cache
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_hops_give_what_relayed_hops_give() {
    let s = setup("push", 6, Duration::from_secs(2)).await;
    let peer = s.server.peer_id();
    let head = ClientHead::load(&s.files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let connect = |blocks| RemoteSession::connect(&s.client, peer, open(blocks, Dtype::F32));
    let (mut a, mut b) = (
        connect((0, 2)).await.unwrap(),
        connect((2, 4)).await.unwrap(),
    );
    let (mut ra, mut rb) = (
        connect((0, 2)).await.unwrap(),
        connect((2, 4)).await.unwrap(),
    );
    let target = b.push_target().expect("a push offer on a direct session");
    a.forward_to(target).await.unwrap();
    let t = Duration::from_secs(5);
    for ids in [&[3u32, 17, 42, 99, 5][..], &[7], &[200]] {
        let x: Vec<f32> = head
            .embed(ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = ids.len();
        a.send_chain(Some(&x), n, true, t).await.unwrap();
        b.send_chain(None, n, false, t).await.unwrap();
        let mid = a.receive_within(t).await.unwrap();
        let got = b.receive_within(t).await.unwrap();
        let want_mid = ra.step(&x).await.unwrap();
        let want = rb.step(&want_mid).await.unwrap();
        assert_eq!(mid, want_mid, "the first hop's output comes back too");
        assert_eq!(got, want, "pushed equals relayed");
    }
    // A truncation travels with the next pushed step on every hop.
    a.truncate(6).unwrap();
    b.truncate(6).unwrap();
    ra.truncate(6).unwrap();
    rb.truncate(6).unwrap();
    let x: Vec<f32> = head
        .embed(&[9])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    a.send_chain(Some(&x), 1, true, t).await.unwrap();
    b.send_chain(None, 1, false, t).await.unwrap();
    a.receive_within(t).await.unwrap();
    let got = b.receive_within(t).await.unwrap();
    let want = rb.step(&ra.step(&x).await.unwrap()).await.unwrap();
    assert_eq!(got, want, "after a truncation");
    assert_eq!((a.len(), b.len()), (7, 7));

    // A forward to a port that takes nothing is refused; the session goes on.
    let mut bogus = b.push_target().unwrap();
    bogus.offer.token = [0; 16];
    match ra.forward_to(bogus).await {
        Err(DhtError::Refused(Refusal::CannotForward { .. })) => {}
        other => panic!("expected a refused forward, got {other:?}"),
    }
    // Forwarding unasked is refused too, after the frame is read.
    match rb.send_chain(Some(&vec![0.5; x.len()]), 1, true, t).await {
        Ok(()) => assert!(matches!(
            rb.receive_within(t).await,
            Err(DhtError::Refused(Refusal::CannotForward { .. }))
        )),
        Err(e) => panic!("sending failed: {e}"),
    }
    assert_eq!(rb.step(&x).await.unwrap().len(), x.len(), "still usable");
    for session in [a, b, ra, rb] {
        session.close().await.unwrap();
    }
    // A hop told its input is pushed, when nobody pushes it, fails with why.
    let mut lonely = connect((2, 4)).await.unwrap();
    lonely.send_chain(None, 1, false, t).await.unwrap();
    match lonely.receive_within(t).await {
        Err(DhtError::ServerFailed(why)) => assert!(why.contains("previous hop"), "{why}"),
        other => panic!("expected the server's failure, got {other:?}"),
    }
    assert!(budget_returns(&s.budget).await, "every cache comes back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_refuses_clearly_and_bad_requests_are_refused() {
    let s = setup("budget", 1, Duration::from_secs(60)).await;
    let peer = s.server.peer_id();
    let held = RemoteSession::connect(&s.client, peer, open((0, 2), Dtype::F16))
        .await
        .unwrap();
    match RemoteSession::connect(&s.client, peer, open((2, 4), Dtype::F16)).await {
        Err(DhtError::Refused(Refusal::Busy { needed: 16, free })) => assert!(free < 16),
        other => panic!("expected a Busy refusal, got {other:?}"),
    }
    // Not hosted, wrong model, wrong version, bad length.
    let mut beyond = open((2, 6), Dtype::F16);
    beyond.blocks = BlockRange::new(2, 6).unwrap();
    assert!(matches!(
        RemoteSession::connect(&s.client, peer, beyond).await,
        Err(DhtError::Refused(Refusal::NotHosted { .. }))
    ));
    let mut other_model = open((0, 2), Dtype::F16);
    other_model.model = ModelId::new("other").unwrap();
    assert!(matches!(
        RemoteSession::connect(&s.client, peer, other_model).await,
        Err(DhtError::Refused(Refusal::WrongModel { .. }))
    ));
    let mut future = open((0, 2), Dtype::F16);
    future.version = INFER_VERSION + 1;
    assert!(matches!(
        RemoteSession::connect(&s.client, peer, future).await,
        Err(DhtError::Refused(Refusal::Version { .. }))
    ));
    // Lengths of 0 or past the model's context.
    let context = s.files.config().max_position_embeddings as u32;
    for asked in [0, context + 1] {
        let mut length = open((0, 2), Dtype::F16);
        length.max_length = asked;
        match RemoteSession::connect(&s.client, peer, length).await {
            Err(DhtError::Refused(Refusal::Length {
                asked: a,
                context: c,
            })) => {
                assert_eq!((a, c), (asked, context));
            }
            other => panic!("expected a Length refusal for {asked}, got {other:?}"),
        }
    }
    // A session dropped without closing (stream reset) frees its cache.
    drop(held);
    assert!(
        budget_returns(&s.budget).await,
        "a broken session frees its cache"
    );
    let again = RemoteSession::connect(&s.client, peer, open((2, 4), Dtype::F16))
        .await
        .unwrap();
    again.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_time_out_and_garbage_ends_only_its_stream() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let s = setup("idle", 2, Duration::from_millis(500)).await;
    let peer = s.server.peer_id();
    let idle = RemoteSession::connect(&s.client, peer, open((0, 2), Dtype::F16))
        .await
        .unwrap();
    assert!(s.budget.available() < s.budget.limit());
    assert!(
        budget_returns(&s.budget).await,
        "an idle session is closed and freed"
    );
    drop(idle);

    let at = s.server.listen_addrs().await.unwrap()[0].clone();
    let (mut control, driver) = common::raw_peer(at);
    for garbage in [
        vec![0xFFu8; 64],
        u32::MAX.to_le_bytes().to_vec(),
        vec![3, 0, 0, 0, 9, 9, 9],
    ] {
        let mut stream = control
            .open_stream(peer, swarm_dht::session::INFER_STREAM)
            .await
            .unwrap();
        let _ = stream.write_all(&garbage).await;
        let mut answer = Vec::new();
        let ended =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        assert!(ended.is_ok(), "the server ends a garbage stream");
    }
    driver.abort();
    let mut session = RemoteSession::connect(&s.client, peer, open((0, 2), Dtype::F32))
        .await
        .unwrap();
    let out = session.step(&vec![0.1; 64]).await.unwrap();
    assert_eq!(out.len(), 64);
}

/// A client moving to the direct connection drops its libp2p stream; the
/// stream's end may reach the server before the connection does, and the
/// session must wait for it rather than end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_before_the_direct_connection_arrives_keeps_the_session() {
    use futures::AsyncWriteExt;
    use swarm_core::infer::{Request, Response};
    use swarm_core::tensor_frame::WireDType;
    use swarm_dht::direct::DirectLink;
    use swarm_dht::wire::{frame, read_frame, read_message, write_message};

    let s = setup("stream-ends-first", 2, Duration::from_secs(60)).await;
    let peer = s.server.peer_id();
    let at = s.server.listen_addrs().await.unwrap()[0].clone();
    let (mut control, driver) = common::raw_peer(at);
    let mut stream = control
        .open_stream(peer, swarm_dht::session::INFER_STREAM)
        .await
        .unwrap();
    let request = Request::Open(open((0, 2), Dtype::F32));
    write_message(&mut stream, &request, None).await.unwrap();
    let answer = read_message::<_, Response>(&mut stream).await.unwrap();
    let Some(Response::Opened {
        hidden,
        direct: Some(offer),
        ..
    }) = answer
    else {
        panic!("no direct offer: {answer:?}");
    };
    stream.close().await.unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut link = DirectLink::connect([127, 0, 0, 1].into(), &offer)
        .await
        .unwrap();
    let hidden = hidden as usize;
    let f = frame(&vec![0.1; hidden], &[1, 1, hidden], WireDType::F32).unwrap();
    let step = Request::Step {
        start: 0,
        positions: 1,
    };
    write_message(&mut link, &step, Some(&f)).await.unwrap();
    let answer = read_message::<_, Response>(&mut link).await.unwrap();
    assert_eq!(answer, Some(Response::Stepped { positions: 1 }));
    let (dims, _) = read_frame(&mut link, hidden).await.unwrap();
    assert_eq!(dims, [1, 1, hidden]);
    driver.abort();
}

/// A server offers a direct connection, but its port cannot be reached
/// from where the client is (here: the client tries an address nothing
/// listens on, as behind a firewall or on another interface). The session
/// stays on its libp2p stream and computes the same as a direct one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_direct_port_leaves_the_session_on_its_stream() {
    let s = setup("unreachable-direct", 4, Duration::from_secs(60)).await;
    let peer = s.server.peer_id();
    let direct = RemoteSession::connect(&s.client, peer, open((0, 4), Dtype::F32))
        .await
        .unwrap();
    assert!(direct.is_direct(), "the control session goes direct");
    let at = s.server.listen_addrs().await.unwrap()[0].clone();
    let (mut control, driver) = common::raw_peer(at);
    let stream = control
        .open_stream(peer, swarm_dht::session::INFER_STREAM)
        .await
        .unwrap();
    // 127.0.0.9: loopback, but the server's direct listener is bound to
    // 127.0.0.1 only, so the connection is refused.
    let mut fallback = swarm_dht::RemoteSession::open(
        stream,
        open((0, 4), Dtype::F32),
        Some([127, 0, 0, 9].into()),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(!fallback.is_direct(), "the session stays on its stream");
    let mut direct = direct;
    for step in 0..3 {
        let x: Vec<f32> = (0..64).map(|i| ((i + step) as f32 * 0.37).sin()).collect();
        let a = direct.step(&x).await.unwrap();
        let b = fallback.step(&x).await.unwrap();
        assert_eq!(
            a, b,
            "step {step}: the stream computes what the direct link does"
        );
    }
    fallback.close().await.unwrap();
    direct.close().await.unwrap();
    driver.abort();
}

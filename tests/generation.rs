//! Distributed generation over real nodes on loopback, with a tiny random
//! model: a chain of servers gives what the whole model gives locally,
//! token for token; a server lost in the middle of a generation (shut
//! down, answering garbage, stalled) is replaced and the output does not
//! change; a server's memory budget holds against 100 concurrent sessions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sherpa_swarm::backend::ShardBackend;
use sherpa_swarm::generate::{generate, LocalBlocks};
use sherpa_swarm::SherpaError;
use swarm_core::infer::{Dtype, Request, Response};
use swarm_core::tensor_frame::WireDType;
use swarm_core::{BlockRange, ModelId, NodeKey, ServerInfo};
use swarm_dht::session::INFER_STREAM;
use swarm_dht::wire::{frame, read_frame, read_message, write_message};
use swarm_dht::{
    announce_periodically, survey, DhtError, InferenceService, InferenceSession, Multiaddr, Node,
    NodeConfig, ServerChoice, SessionOptions, SurveyOptions,
};
use swarm_shard::tiny::{GgmlDType, TinyModelSpec};
use swarm_shard::{
    BlockShard, CacheBudget, ClientHead, DType, Device, GenerateOptions, LocalModel, ModelFiles,
    SessionCache, WeightPrecision,
};

const TTL: Duration = Duration::from_secs(30);
const REFRESH: Duration = Duration::from_secs(1);

fn model() -> ModelId {
    ModelId::new("tiny").unwrap()
}

fn range(a: u32, b: u32) -> BlockRange {
    BlockRange::new(a, b).unwrap()
}

fn key(i: u8) -> NodeKey {
    let mut seed = [0u8; 32];
    seed[0] = i;
    seed[1] = 0x5e;
    NodeKey::from_seed(seed)
}

/// The tiny model's files, written once per test.
fn tiny(name: &str) -> ModelFiles {
    let dir = std::env::temp_dir().join(format!("sherpa-gen-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    TinyModelSpec {
        layers: 6,
        ..TinyModelSpec::default()
    }
    .write_gguf(&path, GgmlDType::F32)
    .unwrap();
    ModelFiles::open(&path).unwrap()
}

struct Swarm {
    files: ModelFiles,
    _tracker: Node,
    addr: Multiaddr,
    servers: Vec<(String, Node, Arc<CacheBudget>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Swarm {
    /// A swarm of honest servers (name, blocks), each with room for 4
    /// sessions, and their nodes.
    async fn with_servers(
        name: &str,
        servers: &[(&'static str, BlockRange)],
    ) -> (Self, Vec<(&'static str, Node)>) {
        let mut swarm = Self::new(name).await;
        let mut nodes = Vec::new();
        for (i, &(server, blocks)) in servers.iter().enumerate() {
            nodes.push((server, swarm.server(i as u8 + 1, server, blocks, 4).await));
        }
        (swarm, nodes)
    }

    async fn new(name: &str) -> Self {
        let files = tiny(name);
        let tracker = Node::start(NodeConfig::new(key(0)).with_record_ttl(TTL))
            .await
            .unwrap();
        let addr = tracker.listen_addrs().await.unwrap()[0].clone();
        Self {
            files,
            _tracker: tracker,
            addr,
            servers: Vec::new(),
            tasks: Vec::new(),
        }
    }

    fn info(&self, k: &NodeKey, name: &str, blocks: BlockRange, throughput: f32) -> ServerInfo {
        let mut info = ServerInfo::new(k.public_key(), model(), blocks, 6);
        info.throughput = throughput;
        info.public_name = name.to_owned();
        info
    }

    /// An honest server of `blocks` with room for `sessions` sessions of
    /// 64 positions.
    async fn server(&mut self, i: u8, name: &str, blocks: BlockRange, sessions: u64) -> Node {
        self.server_announcing(i, name, blocks, sessions, 1000.0)
            .await
    }

    /// An honest server that announces `throughput` blocks·tokens/s.
    async fn server_announcing(
        &mut self,
        i: u8,
        name: &str,
        blocks: BlockRange,
        sessions: u64,
        throughput: f32,
    ) -> Node {
        let shard = Arc::new(
            BlockShard::load(&self.files, blocks, &Device::Cpu, WeightPrecision::Native).unwrap(),
        );
        let per_session = SessionCache::bytes_needed(self.files.config(), blocks, 64, DType::F32);
        let budget = CacheBudget::new(per_session * sessions);
        let backend = ShardBackend::new(shard, budget.clone());
        let service = InferenceService::new(model(), Arc::new(backend));
        let k = key(i);
        let node = self.node(&k).await;
        Arc::new(service)
            .serve_on(&node, Some([127, 0, 0, 1].into()))
            .await
            .unwrap();
        let info = self.info(&k, name, blocks, throughput);
        self.tasks
            .push(announce_periodically(node.clone(), k, info, REFRESH, TTL));
        self.servers.push((name.to_owned(), node.clone(), budget));
        node
    }

    /// A node of identity `k` joined to the swarm.
    async fn node(&self, k: &NodeKey) -> Node {
        Node::start(
            NodeConfig::new(k.clone())
                .with_bootstrap(vec![self.addr.clone()])
                .with_record_ttl(TTL),
        )
        .await
        .unwrap()
    }

    /// A server announcing `blocks` at `throughput`, that answers sessions
    /// the way `bad` says.
    async fn hostile(
        &mut self,
        i: u8,
        name: &str,
        blocks: BlockRange,
        throughput: f32,
        bad: Bad,
    ) -> Node {
        let k = key(i);
        let node = self.node(&k).await;
        let mut incoming = node.accept(INFER_STREAM).unwrap();
        let hidden = self.files.config().hidden_size;
        self.tasks.push(tokio::spawn(async move {
            while let Some((_, stream)) = incoming.next().await {
                tokio::spawn(misbehave(stream, hidden, bad));
            }
        }));
        let info = self.info(&k, name, blocks, throughput);
        self.tasks
            .push(announce_periodically(node.clone(), k, info, REFRESH, TTL));
        node
    }

    async fn client(&self, i: u8) -> Node {
        Node::start(NodeConfig::new(key(i)).with_bootstrap(vec![self.addr.clone()]))
            .await
            .unwrap()
    }

    async fn session(
        &self,
        client: &Node,
        servers: usize,
        span: BlockRange,
        options: SessionOptions,
    ) -> InferenceSession {
        self.try_session(client, servers, span, options)
            .await
            .unwrap()
    }

    /// Surveys until `servers` are listed, then opens a session.
    async fn try_session(
        &self,
        client: &Node,
        servers: usize,
        span: BlockRange,
        options: SessionOptions,
    ) -> Result<InferenceSession, DhtError> {
        let mut found = None;
        for attempt in 0..50 {
            // Every server pinged (dead ones never will), so routes follow the announced speeds.
            let options = SurveyOptions::quick().with_ping_wait(Duration::from_secs(5));
            let s = survey(client, &model(), &options).await.unwrap();
            let pinged = s.candidates.iter().all(|c| c.rtt.is_some());
            if s.listing.servers.len() >= servers && (pinged || attempt >= 3) {
                found = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let found = found.expect("every server is listed");
        InferenceSession::open(
            client,
            model(),
            found,
            ServerChoice::default(),
            span,
            self.files.config().hidden_size,
            options,
        )
        .await
    }
}

#[derive(Debug, Clone, Copy)]
enum Bad {
    /// Answers a step with bytes that are no message.
    Garbage,
    /// Answers a step with a well-formed frame of NaNs.
    NotANumber,
    /// Never answers a step.
    Stall,
}

async fn misbehave(mut stream: swarm_dht::Stream, hidden: usize, bad: Bad) {
    let Ok(Some(Request::Open(_))) = read_message::<_, Request>(&mut stream).await else {
        return;
    };
    let opened = Response::Opened {
        hidden: hidden as u32,
        cache_tokens_free: 1 << 20,
        direct: None,
        push: None,
    };
    write_message(&mut stream, &opened, None).await.unwrap();
    while let Ok(Some(Request::Step { positions, .. })) = read_message(&mut stream).await {
        let n = positions as usize;
        if read_frame(&mut stream, n * hidden).await.is_err() {
            return;
        }
        match bad {
            Bad::Garbage => {
                use futures::AsyncWriteExt;
                let _ = stream.write_all(&[0xAB; 4096]).await;
                let _ = stream.flush().await;
            }
            Bad::NotANumber => {
                let values = vec![f32::NAN; n * hidden];
                let f = frame(&values, &[1, n, hidden], WireDType::F32).unwrap();
                let _ =
                    write_message(&mut stream, &Response::Stepped { positions }, Some(&f)).await;
            }
            Bad::Stall => {
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
        }
    }
}

/// Sessions of 64 positions (the tiny model has 512).
/// Stops `node` and waits until it has: shutdown() only asks, and a step
/// sent meanwhile (a pushed one gets there soonest) could still be served.
async fn stop(node: &Node) {
    node.shutdown().await;
    while node.listen_addrs().await.is_ok() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its sessions' tasks end at their next wake-up.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Generates 32 tokens in `session`, stopping the server named `victim`
/// (one of `nodes`) after the `at`-th.
async fn generate_stopping(
    head: &ClientHead,
    session: &mut InferenceSession,
    nodes: &[(&str, Node)],
    victim: &str,
    at: usize,
) -> swarm_shard::GenerationOutput {
    let victim = nodes
        .iter()
        .find(|(name, _)| *name == victim)
        .map(|(_, node)| node.clone())
        .unwrap();
    let handle = tokio::runtime::Handle::current();
    let mut count = 0;
    generate(head, None, session, &PROMPT, &options(32), &mut |_| {
        count += 1;
        if count == at {
            tokio::task::block_in_place(|| handle.block_on(stop(&victim)));
        }
        Ok(true)
    })
    .await
    .unwrap()
}

fn short() -> SessionOptions {
    SessionOptions::default().with_max_length(64)
}

fn options(tokens: usize) -> GenerateOptions {
    GenerateOptions::default()
        .with_max_new_tokens(tokens)
        .with_stop_at_eos(false)
}

const PROMPT: [u32; 7] = [3, 17, 42, 99, 5, 120, 64];

/// Greedy tokens of the whole model in this process.
fn local_tokens(files: &ModelFiles, tokens: usize) -> Vec<u32> {
    LocalModel::load(files, &[], &Device::Cpu, WeightPrecision::Native)
        .unwrap()
        .generate(&PROMPT, &options(tokens), &mut |_| Ok(true))
        .unwrap()
        .tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_servers_generates_what_the_local_model_does() {
    let mut swarm = Swarm::new("chain").await;
    swarm.server(1, "a", range(0, 2), 4).await;
    swarm.server(2, "b", range(2, 4), 4).await;
    swarm.server(3, "c", range(4, 6), 4).await;
    let client = swarm.client(100).await;
    let head = ClientHead::load(&swarm.files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let want = local_tokens(&swarm.files, 24);

    for (dtype, push) in [(Dtype::F32, true), (Dtype::F16, true), (Dtype::F32, false)] {
        let opts = short()
            .with_max_length(64)
            .with_dtype(dtype)
            .with_push(push);
        let mut session = swarm.session(&client, 3, range(0, 6), opts).await;
        assert_eq!(session.is_pushing(), push, "servers on loopback push");
        let route: Vec<_> = session.route().iter().map(|s| s.name.clone()).collect();
        assert_eq!(route, ["a", "b", "c"]);
        let mut streamed = Vec::new();
        let got = generate(
            &head,
            None,
            &mut session,
            &PROMPT,
            &options(24),
            &mut |id| {
                streamed.push(id);
                Ok(true)
            },
        )
        .await
        .unwrap();
        assert_eq!(got.tokens, want, "{dtype:?} through 3 servers, push {push}");
        assert_eq!(streamed, want);
        assert!(session.failovers().is_empty());
        assert_eq!(session.len(), PROMPT.len() + 23);
        session.close().await;
    }

    // The first two blocks on the client, the rest through the servers:
    // the route starts inside server a's span.
    let shard = Arc::new(
        BlockShard::load(
            &swarm.files,
            range(0, 1),
            &Device::Cpu,
            WeightPrecision::Native,
        )
        .unwrap(),
    );
    let mut local = LocalBlocks::new(shard, 64).unwrap();
    let mut session = swarm.session(&client, 3, range(1, 6), short()).await;
    assert_eq!(session.route()[0].blocks, range(1, 2));
    let got = generate(
        &head,
        Some(&mut local),
        &mut session,
        &PROMPT,
        &options(24),
        &mut |_| Ok(true),
    )
    .await
    .unwrap();
    assert_eq!(got.tokens, want, "with local_blocks = 1");
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_mid_generation_is_replaced_and_nothing_changes() {
    let (swarm, nodes) = Swarm::with_servers(
        "failover",
        &[
            ("a1", range(0, 3)),
            ("a2", range(0, 3)),
            ("b1", range(3, 6)),
            ("b2", range(3, 6)),
        ],
    )
    .await;
    let client = swarm.client(100).await;
    let head = ClientHead::load(&swarm.files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let want = local_tokens(&swarm.files, 32);
    let mut session = swarm.session(&client, 4, range(0, 6), short()).await;
    assert!(session.is_pushing());
    let route = session.route();
    assert_eq!(route.len(), 2);
    // Shut down the server of the second hop after 10 tokens.
    let got = generate_stopping(&head, &mut session, &nodes, &route[1].name, 10).await;
    assert_eq!(got.tokens, want, "identical to the uninterrupted run");
    let failovers = session.failovers();
    assert_eq!(failovers.len(), 1, "{failovers:?}");
    assert_eq!(failovers[0].lost.name, route[1].name);
    assert_eq!(failovers[0].replayed_positions, PROMPT.len() + 9);
    let now: Vec<_> = session.route().iter().map(|s| s.name.clone()).collect();
    assert_eq!(now[0], route[0].name, "the working hop is kept");
    assert_ne!(now[1], route[1].name);
    session.close().await;

    // With every server of a span gone, the error says which blocks, and
    // a session that lost its route refuses to go on.
    let mut session = swarm.session(&client, 4, range(0, 6), short()).await;
    for (name, node) in &nodes {
        if name.starts_with('b') {
            node.shutdown().await;
        }
    }
    let x = head.embed(&PROMPT).unwrap();
    let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    match session.step(&x).await {
        Err(DhtError::NoRoute(why)) => assert!(why.contains("blocks 3..6"), "{why}"),
        other => panic!("expected no route, got {other:?}"),
    }
    match session.step(&x).await {
        Err(DhtError::NoRoute(why)) => assert!(why.contains("lost earlier"), "{why}"),
        other => panic!("expected a lost session, got {other:?}"),
    }
    match swarm.try_session(&client, 4, range(0, 6), short()).await {
        Err(DhtError::NoRoute(why)) => assert!(why.contains("blocks 3..6"), "{why}"),
        other => panic!("expected no route, got {other:?}"),
    }
}

/// A pushed chain whose middle server dies: the hop after it, which waited
/// for its input, is opened again (on the same server: it is not to blame),
/// the lost hop fails over, and the session relays from then on; the
/// tokens are those of the uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_chain_broken_in_the_middle_loses_nothing() {
    let (swarm, nodes) = Swarm::with_servers(
        "push-failover",
        &[
            ("a", range(0, 2)),
            ("b1", range(2, 4)),
            ("b2", range(2, 4)),
            ("c", range(4, 6)),
        ],
    )
    .await;
    let client = swarm.client(100).await;
    let head = ClientHead::load(&swarm.files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let want = local_tokens(&swarm.files, 32);
    let mut session = swarm.session(&client, 4, range(0, 6), short()).await;
    assert!(session.is_pushing());
    let route = session.route();
    assert_eq!(route.len(), 3);
    let got = generate_stopping(&head, &mut session, &nodes, &route[1].name, 10).await;
    assert_eq!(got.tokens, want, "identical to the uninterrupted run");
    let failovers = session.failovers();
    assert_eq!(
        failovers.len(),
        1,
        "only the lost server counts: {failovers:?}"
    );
    assert_eq!(failovers[0].lost.name, route[1].name);
    assert!(!session.is_pushing(), "relaying after the chain broke");
    let now: Vec<_> = session.route().iter().map(|s| s.name.clone()).collect();
    assert_eq!(now.len(), 3);
    assert_eq!(
        (&*now[0], &*now[2]),
        ("a", "c"),
        "the working servers are kept"
    );
    assert_ne!(now[1], route[1].name);
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_stalled_servers_are_replaced() {
    let mut swarm = Swarm::new("hostile").await;
    // Announced speeds far apart, so the order in which routes try the
    // servers does not hang on ping noise: the stalling server claims
    // everything at the highest speed (one hop of ~0 s), the garbage pair
    // next (2 × 30 ms), the honest pair last (2 × 3 s).
    swarm
        .server_announcing(1, "honest-a", range(0, 3), 4, 1.0)
        .await;
    swarm
        .server_announcing(2, "honest-b", range(3, 6), 4, 1.0)
        .await;
    swarm
        .hostile(3, "garbage", range(0, 3), 100.0, Bad::Garbage)
        .await;
    swarm
        .hostile(4, "nan", range(3, 6), 100.0, Bad::NotANumber)
        .await;
    swarm
        .hostile(5, "stall", range(0, 6), 1e9, Bad::Stall)
        .await;
    let client = swarm.client(100).await;
    let head = ClientHead::load(&swarm.files, &Device::Cpu, WeightPrecision::Native).unwrap();
    let want = local_tokens(&swarm.files, 16);
    // Long enough that honest servers are not taken for stalled ones on a
    // loaded machine.
    let opts = short().with_step_timeout(Duration::from_secs(2));
    let mut session = swarm.session(&client, 5, range(0, 6), opts).await;
    assert_eq!(session.route()[0].name, "stall");
    let got = generate(
        &head,
        None,
        &mut session,
        &PROMPT,
        &options(16),
        &mut |_| Ok(true),
    )
    .await
    .unwrap();
    assert_eq!(got.tokens, want);
    let lost: HashSet<String> = session
        .failovers()
        .iter()
        .map(|f| f.lost.name.clone())
        .collect();
    let expected: HashSet<String> = ["stall", "garbage", "nan"].map(String::from).into();
    assert_eq!(lost, expected, "{:?}", session.failovers());
    let route: Vec<_> = session.route().iter().map(|s| s.name.clone()).collect();
    assert_eq!(route, ["honest-a", "honest-b"]);
    session.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_sessions_stay_within_one_servers_budget() {
    let mut swarm = Swarm::new("crowd").await;
    let server = swarm.server(1, "only", range(0, 6), 10).await;
    let budget = swarm.servers[0].2.clone();
    let head =
        Arc::new(ClientHead::load(&swarm.files, &Device::Cpu, WeightPrecision::Native).unwrap());
    let want = local_tokens(&swarm.files, 8);
    let client = swarm.client(100).await;
    // One survey, shared: the sessions differ, the servers do not.
    let mut listed = None;
    for _ in 0..50 {
        let s = survey(&client, &model(), &SurveyOptions::quick())
            .await
            .unwrap();
        if !s.listing.servers.is_empty() {
            listed = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let listed = listed.expect("the server is listed");
    let watching = Arc::new(AtomicBool::new(true));
    let peak = {
        let (budget, watching) = (budget.clone(), watching.clone());
        tokio::spawn(async move {
            let mut peak = 0;
            while watching.load(Ordering::Relaxed) {
                peak = peak.max(budget.used());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            peak
        })
    };
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (client, listed, head) = (client.clone(), listed.clone(), head.clone());
        let hidden = swarm.files.config().hidden_size;
        runs.spawn(async move {
            let opts = short().with_max_length(64).with_max_failovers(0);
            let mut session = InferenceSession::open(
                &client,
                model(),
                listed,
                ServerChoice::default(),
                range(0, 6),
                hidden,
                opts,
            )
            .await?;
            let out = generate(&head, None, &mut session, &PROMPT, &options(8), &mut |_| {
                Ok(true)
            })
            .await;
            session.close().await;
            out.map(|o| o.tokens)
        });
    }
    let (mut finished, mut refused) = (0, 0);
    while let Some(run) = runs.join_next().await {
        match run.unwrap() {
            Ok(tokens) => {
                assert_eq!(tokens, want, "an accepted session finishes correctly");
                finished += 1;
            }
            Err(SherpaError::Dht(DhtError::NoRoute(why))) => {
                // The only server refused: the reason says it is full.
                assert!(why.contains("only: refused: the server is full"), "{why}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    watching.store(false, Ordering::Relaxed);
    let peak = peak.await.unwrap();
    assert_eq!(finished + refused, 100);
    assert!(
        finished >= 10,
        "at least a budget's worth finished: {finished}"
    );
    assert!(refused > 0, "some were over budget");
    assert!(
        peak <= budget.limit(),
        "peak {peak} over {}",
        budget.limit()
    );
    eprintln!(
        "100 sessions: {finished} finished, {refused} refused, peak cache {peak} of {} bytes",
        budget.limit()
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_dropped_by_a_truncation_are_gone_from_every_hop_and_its_replacement() {
    let (swarm, nodes) = Swarm::with_servers(
        "truncate",
        &[
            ("a1", range(0, 3)),
            ("a2", range(0, 3)),
            ("b1", range(3, 6)),
            ("b2", range(3, 6)),
        ],
    )
    .await;
    let client = swarm.client(100).await;
    let hidden = swarm.files.config().hidden_size;
    let x = |seed: usize, n: usize| -> Vec<f32> {
        (0..n * hidden)
            .map(|i| (((seed * 7919 + i * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    };
    // The reference: 4 prompt positions, one more, then the next one.
    let mut plain = swarm.session(&client, 4, range(0, 6), short()).await;
    plain.step(&x(1, 4)).await.unwrap();
    plain.step(&x(2, 1)).await.unwrap();
    let want = plain.step(&x(3, 1)).await.unwrap();
    plain.close().await;

    // The same, with three positions (drafts) after the fifth dropped.
    let mut session = swarm.session(&client, 4, range(0, 6), short()).await;
    session.step(&x(1, 4)).await.unwrap();
    let mut drafts = x(2, 1);
    drafts.extend(x(9, 3));
    session.step(&drafts).await.unwrap();
    assert_eq!(session.len(), 8);
    session.truncate(5).unwrap();
    assert_eq!(session.len(), 5);
    let got = session.step(&x(3, 1)).await.unwrap();
    assert_eq!(got, want, "as if the dropped positions never ran");

    // Again, and then the second hop's server goes away: its replacement
    // replays only what was kept, and the next step still matches.
    let mut drafts = x(3, 1);
    drafts.extend(x(11, 2));
    session.truncate(5).unwrap();
    session.step(&drafts).await.unwrap();
    session.truncate(6).unwrap();
    let victim = session.route()[1].name.clone();
    let node = nodes
        .iter()
        .find(|(name, _)| *name == victim)
        .map(|(_, n)| n.clone())
        .unwrap();
    stop(&node).await;
    let next = x(4, 1);
    let got = session.step(&next).await.unwrap();
    assert_eq!(session.failovers().len(), 1);
    assert_eq!(session.failovers()[0].replayed_positions, 6);
    let mut plain = swarm.session(&client, 4, range(0, 6), short()).await;
    plain.step(&x(1, 4)).await.unwrap();
    plain.step(&x(2, 1)).await.unwrap();
    plain.step(&x(3, 1)).await.unwrap();
    let want = plain.step(&next).await.unwrap();
    assert_eq!(
        got, want,
        "the replacement holds exactly the kept positions"
    );
    plain.close().await;
    session.close().await;
}

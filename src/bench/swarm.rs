//! Swarm figures, each next to what it is compared with in the same run:
//! - a hop's round trip for an 8 KiB activation over the inference
//!   protocol (a server that computes nothing) on its direct connection
//!   (Noise-sealed TCP), and on the libp2p stream it falls back to (Noise +
//!   yamux), against a raw TCP ping-pong of the same bytes on loopback;
//! - decode speed through a tracker and three servers in this process
//!   against the same model run locally;
//! - the shape Petals was measured on, through two servers and locally;
//! - one server's aggregate decode steps with 16 sessions stepping at once
//!   against one session alone;
//! - decode through three servers across an emulated WAN ([`super::wan`]),
//!   against the bound a client relaying every hop cannot pass.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use swarm_core::infer::{Dtype, OpenSession, INFER_VERSION};
use swarm_core::{BlockRange, ModelId};
use swarm_dht::{
    BackendError, InferenceService, Node, NodeConfig, RemoteSession, SpanBackend, SpanState,
};
use swarm_shard::{
    BlockPipeline, Device, GenerateOptions, Generator, LocalModel, ModelFiles, WeightPrecision,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{median, BenchRecord, BenchSettings, PROMPT};
use crate::{LocalSwarm, SherpaError};

/// Values in the 8 KiB activation: 2048 f32.
pub const ACTIVATION_VALUES: usize = 2048;

fn net(e: impl std::fmt::Display) -> SherpaError {
    SherpaError::Network(e.to_string())
}

/// A node answering inference sessions by sending every step's input
/// straight back: a hop whose round trip is the protocol's cost alone. It
/// runs the servers' own session loop on an [`EchoBackend`], and offers
/// direct connections as servers do.
pub async fn echo_server() -> Result<Node, SherpaError> {
    let backend = EchoBackend {
        blocks: BlockRange::new(0, 1)?,
    };
    let service = InferenceService::new(ModelId::new("echo")?, Arc::new(backend));
    let config = NodeConfig::new(swarm_dht::identity::ephemeral_node_key());
    let bind = swarm_dht::node::direct_bind_ip(&config.listen);
    let node = Node::start(config).await?;
    Arc::new(service).serve_on(&node, bind).await?;
    Ok(node)
}

/// A span that computes nothing: its output is its input.
#[derive(Debug)]
pub struct EchoBackend {
    blocks: BlockRange,
}

impl SpanBackend for EchoBackend {
    fn blocks(&self) -> BlockRange {
        self.blocks
    }

    fn hidden_size(&self) -> usize {
        ACTIVATION_VALUES
    }

    fn context_length(&self) -> usize {
        u32::MAX as usize
    }

    fn free_positions(&self, _blocks: BlockRange) -> u64 {
        u64::MAX
    }

    fn open(
        &self,
        _blocks: BlockRange,
        _max_length: usize,
    ) -> Result<Box<dyn SpanState>, BackendError> {
        Ok(Box::new(Echo(0)))
    }
}

/// An echo session: how many positions went through.
struct Echo(usize);

impl SpanState for Echo {
    fn len(&self) -> usize {
        self.0
    }

    fn truncate(&mut self, keep: usize) {
        self.0 = self.0.min(keep);
    }

    fn forward(&mut self, values: Vec<f32>, positions: usize) -> Result<Vec<f32>, BackendError> {
        self.0 += positions;
        Ok(values)
    }
}

/// A client session to an [`echo_server`], f32 on the wire, direct when
/// `direct`.
pub async fn echo_session(
    server: &Node,
    direct: bool,
) -> Result<(Node, RemoteSession), SherpaError> {
    let addr = server
        .listen_addrs()
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| net("the echo server has no address"))?;
    let client = Node::start(
        NodeConfig::new(swarm_dht::identity::ephemeral_node_key()).with_bootstrap(vec![addr]),
    )
    .await?;
    let open = OpenSession {
        version: INFER_VERSION,
        model: ModelId::new("echo")?,
        blocks: BlockRange::new(0, 1)?,
        max_length: u32::MAX,
        dtype: Dtype::F32,
        direct,
        push: false,
    };
    let session = RemoteSession::connect(&client, server.peer_id(), open).await?;
    Ok((client, session))
}

/// A loopback TCP server sending back every `bytes` it receives, and a
/// connection to it.
pub async fn tcp_echo(
    bytes: usize,
) -> Result<(tokio::net::TcpStream, tokio::task::JoinHandle<()>), SherpaError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(net)?;
    let addr = listener.local_addr().map_err(net)?;
    let task = tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let _ = socket.set_nodelay(true);
        let mut buf = vec![0u8; bytes];
        while socket.read_exact(&mut buf).await.is_ok() {
            if socket.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(net)?;
    stream.set_nodelay(true).map_err(net)?;
    Ok((stream, task))
}

/// One raw TCP round trip of `buf`.
pub async fn tcp_round_trip(
    stream: &mut tokio::net::TcpStream,
    buf: &mut [u8],
) -> Result<(), SherpaError> {
    stream.write_all(buf).await.map_err(net)?;
    stream.read_exact(buf).await.map_err(net)?;
    Ok(())
}

/// Measures the swarm on the model at `path`, calling `report` with each
/// figure as soon as it is known.
pub async fn run_swarm(
    path: &Path,
    settings: &BenchSettings,
    report: &mut (dyn FnMut(BenchRecord) + Send),
) -> Result<(), SherpaError> {
    if settings.runs("hop") {
        hop_overhead(settings, report).await?;
    }
    if settings.runs("swarm") {
        distributed_decode(path, settings, report).await?;
    }
    if settings.runs("petals") {
        petals_shape(settings, report).await?;
    }
    if settings.runs("sessions") {
        concurrent_sessions(path, settings, report).await?;
    }
    if settings.runs("wan") {
        match super::wan::Wan::available() {
            Ok(()) => {
                for rtt_ms in [10, 25] {
                    wan_decode(path, settings, rtt_ms, report).await?;
                }
            }
            Err(why) => tracing::warn!("WAN figures skipped: {why}"),
        }
    }
    Ok(())
}

/// Decode through three servers, each on its own host of an emulated WAN
/// whose every link has a round trip of `rtt_ms`, the client and tracker on
/// a fourth. A client relaying every hop waits one round trip per server
/// per token, so it cannot pass 1 / (3 rtt) tokens/s: the figure's ratio is
/// to that bound.
async fn wan_decode(
    path: &Path,
    settings: &BenchSettings,
    rtt_ms: u64,
    report: &mut (dyn FnMut(BenchRecord) + Send),
) -> Result<(), SherpaError> {
    use super::wan::{Link, Wan, WanSwarm};
    let rtt = Duration::from_millis(rtt_ms);
    let blocks = {
        let path = path.to_owned();
        crate::swarm::blocking(move || Ok(ModelFiles::open(&path)?.config().num_hidden_layers))
            .await? as u32
    };
    let spans = BlockRange::split_evenly(blocks, 3)?;
    let wan = Wan::start(spans.len() + 1, Link::rtt(rtt))?;
    let swarm = WanSwarm::start(
        &wan,
        &path.to_string_lossy(),
        ModelId::new("bench-model")?,
        &spans,
    )
    .await?;
    let options = GenerateOptions::default()
        .with_max_new_tokens(settings.new_tokens)
        .with_stop_at_eos(false);
    // Speculative decoding is measured on a reply that quotes its prompt,
    // where drafts from the text so far are right most often.
    let quote = {
        let path = path.to_owned();
        crate::swarm::blocking(move || {
            let files = ModelFiles::open(&path)?;
            Ok(swarm_shard::TextTokenizer::from_model(&files)?
                .encode_chat(&[swarm_shard::ChatMessage::user(super::QUOTE)])?)
        })
        .await?
    };
    let drafting = options.clone().with_draft_tokens(swarm_shard::MAX_DRAFTS);
    // In turn, each round: relayed, pushed, pushed with drafts on the
    // quoting prompt and on the free one.
    let runs = [
        (false, PROMPT.to_vec(), options.clone()),
        (true, PROMPT.to_vec(), options.clone()),
        (true, quote, drafting.clone()),
        (true, PROMPT.to_vec(), drafting),
    ];
    let mut rates = vec![Vec::new(); runs.len()];
    let mut per_step = Vec::new();
    for round in 0..=settings.repeats.max(1) {
        for (i, (push, ids, options)) in runs.iter().enumerate() {
            let (push, ids, options) = (*push, ids.clone(), options.clone());
            let out = swarm
                .with_client(move |client| async move {
                    let max_length = client.max_length(ids.len(), &options) as u32;
                    let session_options = client
                        .session_options()
                        .clone()
                        .with_push(push)
                        .with_max_length(max_length);
                    let mut session = client.session_with(session_options).await?;
                    if session.is_pushing() != push {
                        return Err(SherpaError::Network(format!(
                            "the session does not push as asked ({push})"
                        )));
                    }
                    let out = client
                        .generate_in(&mut session, &ids, &options, &mut |_| true)
                        .await;
                    session.close().await;
                    out
                })
                .await?;
            if round > 0 {
                rates[i].push(out.output.decode_tokens_per_second());
                if i == 2 {
                    per_step.push(out.output.tokens_per_step());
                }
            }
        }
    }
    swarm.shutdown().await;
    drop(wan);
    let bound = 1.0 / (spans.len() as f64 * rtt.as_secs_f64());
    let mut rates = rates.into_iter().map(median);
    let rate = rates.next().unwrap_or(f64::NAN);
    let pushed = rates.next().unwrap_or(f64::NAN);
    let fast = rates.next().unwrap_or(f64::NAN);
    let free = rates.next().unwrap_or(f64::NAN);
    report(BenchRecord::plain(
        &format!("wan{rtt_ms}ms_3servers_relay_bound"),
        bound,
        "tokens/s",
    ));
    report(BenchRecord {
        name: format!("wan{rtt_ms}ms_3servers_relay_vs_relay_bound"),
        value: rate,
        unit: "tokens/s",
        ratio: Some(rate / bound),
        target: None,
    });
    report(BenchRecord {
        name: format!("wan{rtt_ms}ms_3servers_push_vs_relay_bound"),
        value: pushed,
        unit: "tokens/s",
        ratio: Some(pushed / bound),
        target: None,
    });
    report(BenchRecord {
        name: format!("wan{rtt_ms}ms_3servers_speculative_vs_relay_bound"),
        value: fast,
        unit: "tokens/s",
        ratio: Some(fast / bound),
        target: Some(2.0),
    });
    report(BenchRecord {
        name: format!("wan{rtt_ms}ms_3servers_speculative_free_text_vs_push"),
        value: free,
        unit: "tokens/s",
        ratio: Some(free / pushed),
        target: Some(1.0),
    });
    report(BenchRecord::plain(
        &format!("wan{rtt_ms}ms_3servers_speculative_tokens_per_step"),
        median(per_step),
        "tokens/step",
    ));
    Ok(())
}

/// Sessions stepping at once on one server.
const CONCURRENT_SESSIONS: usize = 16;

/// One-token steps each session takes per round.
const CONCURRENT_STEPS: usize = 16;

/// One server hosting every block, and one-token steps sent to it straight
/// (no client-side head, so the server's work is all that is timed): one
/// session's steps per second alone, then the aggregate of 16 sessions
/// stepping at once, in turn each round; `sessions16_aggregate_ratio` is
/// their ratio, with each session's time per step beside it.
async fn concurrent_sessions(
    path: &Path,
    settings: &BenchSettings,
    report: &mut (dyn FnMut(BenchRecord) + Send),
) -> Result<(), SherpaError> {
    let file = path.to_string_lossy().into_owned();
    let id = ModelId::new("bench-sessions")?;
    let swarm = LocalSwarm::start(&file, id.clone(), 1).await?;
    let server = swarm
        .servers
        .first()
        .ok_or_else(|| net("the swarm has no server"))?;
    let (node, peer) = (swarm.client.node().clone(), server.node().peer_id());
    let blocks = server.shard().range();
    let hidden = server.shard().config().hidden_size;
    // Few steps a round, so 16 sessions' caches fit a default server's
    // budget; the first session also runs the lone steps.
    let steps = CONCURRENT_STEPS;
    let rounds = settings.repeats.max(1) + 1;
    let open = |length: usize| OpenSession {
        version: INFER_VERSION,
        model: id.clone(),
        blocks,
        max_length: (8 + length) as u32,
        dtype: Dtype::F16,
        direct: true,
        push: false,
    };
    let mut sessions = Vec::with_capacity(CONCURRENT_SESSIONS);
    for i in 0..CONCURRENT_SESSIONS {
        let length = steps * rounds * if i == 0 { 2 } else { 1 };
        let mut session = RemoteSession::connect(&node, peer, open(length)).await?;
        session.step(&vec![0.01; 8 * hidden]).await?;
        sessions.push(session);
    }
    let x: Vec<f32> = (0..hidden)
        .map(|i| ((i % 17) as f32 - 8.0) / 80.0)
        .collect();
    let (mut ratios, mut one, mut all, mut latency) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..=settings.repeats.max(1) {
        let started = Instant::now();
        for _ in 0..steps {
            sessions[0].step(&x).await?;
        }
        let alone = steps as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..steps {
            let outs = futures::future::join_all(sessions.iter_mut().map(|s| s.step(&x))).await;
            for out in outs {
                out?;
            }
        }
        let took = started.elapsed().as_secs_f64();
        let together = (CONCURRENT_SESSIONS * steps) as f64 / took;
        if round > 0 {
            ratios.push(together / alone);
            one.push(alone);
            all.push(together);
            latency.push(took / steps as f64 * 1e3);
        }
    }
    for session in sessions {
        let _ = session.close().await;
    }
    let counts = server.steps();
    swarm.shutdown().await;
    report(BenchRecord::plain(
        "sessions1_steps_per_s",
        median(one),
        "steps/s",
    ));
    report(BenchRecord {
        name: "sessions16_aggregate_ratio".into(),
        value: median(all),
        unit: "steps/s",
        ratio: Some(median(ratios)),
        target: Some(4.0),
    });
    report(BenchRecord::plain(
        "sessions16_step_ms",
        median(latency),
        "ms",
    ));
    report(BenchRecord::plain(
        "sessions16_batched_share",
        counts.batched as f64 / counts.steps.max(1) as f64,
        "of steps",
    ));
    Ok(())
}

/// The shape Petals was measured on (28-31 ms per step, 32-36 steps/s): a
/// Llama of hidden 256, 8 blocks (8 heads, FFN 688), vocabulary 1000, f32,
/// split over 2 servers on loopback, one client generating greedily.
/// Steps per second of decode.
async fn petals_shape(
    settings: &BenchSettings,
    report: &mut (dyn FnMut(BenchRecord) + Send),
) -> Result<(), SherpaError> {
    let dir = std::env::temp_dir().join(format!("sherpa-bench-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| SherpaError::Io {
        path: dir.clone(),
        source,
    })?;
    let file = dir.join("tiny-h256-l8.gguf");
    let shape = swarm_shard::synth::SynthLlama {
        hidden: 256,
        blocks: 8,
        heads: 8,
        kv_heads: 8,
        ffn: 688,
        vocab: 1000,
        context: 2048,
        seed: 1,
    };
    shape.write_f32(&file)?;
    let spans = BlockRange::split_evenly(8, 2)?;
    let swarm = LocalSwarm::start_spans(
        &file.to_string_lossy(),
        ModelId::new("tiny-h256-l8")?,
        &spans,
    )
    .await?;
    let options = GenerateOptions::default()
        .with_max_new_tokens(settings.new_tokens.max(16))
        .with_stop_at_eos(false);
    let prompt = [1u32, 17, 400, 23];
    let local = load_local(&file).await?;
    // A whole generation through the servers, then one locally, in turn.
    let (mut through, mut here, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=settings.repeats.max(1) {
        let out = swarm
            .client
            .generate(&prompt, &options, &mut |_| true)
            .await?;
        let l = local_decode_rate(&local, &prompt, &options).await?;
        if round > 0 {
            let s = out.output.decode_tokens_per_second();
            through.push(s);
            here.push(l);
            ratios.push(s / l);
        }
    }
    swarm.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    report(BenchRecord::plain(
        "tiny_h256_l8_local_steps_per_s",
        median(here),
        "steps/s",
    ));
    report(BenchRecord {
        name: "tiny_h256_l8_2servers_steps_per_s".into(),
        value: median(through),
        unit: "steps/s",
        ratio: Some(median(ratios)),
        target: None,
    });
    Ok(())
}

async fn hop_overhead(
    settings: &BenchSettings,
    report: &mut (dyn FnMut(BenchRecord) + Send),
) -> Result<(), SherpaError> {
    const ROUNDS: usize = 200;
    let server = echo_server().await?;
    let (client, mut direct) = echo_session(&server, true).await?;
    if !direct.is_direct() {
        return Err(net(
            "the echo session did not move to its direct connection",
        ));
    }
    let (client2, mut stream) = echo_session(&server, false).await?;
    let (mut tcp, tcp_task) = tcp_echo(ACTIVATION_VALUES * 4).await?;
    let activation = vec![0.5f32; ACTIVATION_VALUES];
    let mut bytes = vec![7u8; ACTIVATION_VALUES * 4];
    // One warm-up round, then round trips taken in turn, one of each kind
    // after another, so a slow spell of the machine hits all three alike;
    // the figures are the medians of single round trips.
    let mut ours = Vec::<f64>::with_capacity(ROUNDS * settings.repeats.max(1));
    let (mut libp2p, mut raw) = (ours.clone(), ours.clone());
    for round in 0..=settings.repeats.max(1) {
        for _ in 0..ROUNDS {
            let started = Instant::now();
            direct.step(&activation).await?;
            let d = started.elapsed().as_secs_f64();
            let started = Instant::now();
            stream.step(&activation).await?;
            let s = started.elapsed().as_secs_f64();
            let started = Instant::now();
            tcp_round_trip(&mut tcp, &mut bytes).await?;
            let r = started.elapsed().as_secs_f64();
            if round > 0 {
                ours.push(d);
                libp2p.push(s);
                raw.push(r);
            }
        }
    }
    let (ours, libp2p, raw) = (median(ours), median(libp2p), median(raw));
    report(BenchRecord::plain("raw_tcp_round_trip_8k", raw * 1e6, "us"));
    report(BenchRecord {
        name: "hop_round_trip_8k".into(),
        value: ours * 1e6,
        unit: "us",
        // Raw TCP's time over ours: 0.5 means twice the raw round trip.
        ratio: Some(raw / ours),
        target: Some(0.5),
    });
    report(BenchRecord {
        name: "hop_round_trip_8k_libp2p_stream".into(),
        value: libp2p * 1e6,
        unit: "us",
        ratio: Some(raw / libp2p),
        target: None,
    });
    drop((direct, stream));
    client.shutdown().await;
    client2.shutdown().await;
    server.shutdown().await;
    tcp_task.abort();
    Ok(())
}

/// The whole model at `path`, loaded off the runtime's threads.
async fn load_local(path: &Path) -> Result<Arc<LocalModel>, SherpaError> {
    let path = path.to_owned();
    let model = tokio::task::spawn_blocking(move || -> Result<LocalModel, SherpaError> {
        let files = ModelFiles::open(&path)?;
        Ok(LocalModel::load(
            &files,
            &[],
            &Device::Cpu,
            WeightPrecision::Native,
        )?)
    })
    .await
    .map_err(net)??;
    Ok(Arc::new(model))
}

/// Decode tokens/s of one whole local generation, off the runtime's threads.
async fn local_decode_rate(
    model: &Arc<LocalModel>,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Result<f64, SherpaError> {
    Ok(local_rates(model, prompt, options).await?.0)
}

/// (decode, prefill) tokens/s of one whole local generation, off the
/// runtime's threads.
async fn local_rates(
    model: &Arc<LocalModel>,
    prompt: &[u32],
    options: &GenerateOptions,
) -> Result<(f64, f64), SherpaError> {
    let (model, prompt, options) = (model.clone(), prompt.to_vec(), options.clone());
    tokio::task::spawn_blocking(move || {
        model
            .generate(&prompt, &options, &mut |_| Ok(true))
            .map(|o| (o.decode_tokens_per_second(), o.prefill_tokens_per_second()))
    })
    .await
    .map_err(net)?
    .map_err(Into::into)
}

async fn distributed_decode(
    path: &Path,
    settings: &BenchSettings,
    report: &mut (dyn FnMut(BenchRecord) + Send),
) -> Result<(), SherpaError> {
    let file = path.to_string_lossy().into_owned();
    let local = load_local(path).await?;
    let swarm = LocalSwarm::start(&file, ModelId::new("bench-model")?, 3).await?;
    let client = &swarm.client;
    let options = GenerateOptions::default()
        .with_max_new_tokens(settings.new_tokens)
        .with_stop_at_eos(false);
    // Each round generates through the swarm and locally at once, a token
    // of one then a token of the other, so a slow spell of the machine
    // hits both alike; then it runs one whole generation of each, back to
    // back (what a user sees, but a slow spell may fall on one side only).
    // Ratios are the medians of the rounds' own ratios.
    let max_length = client.max_length(PROMPT.len(), &options);
    let (mut through, mut here, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut whole_through, mut whole_here, mut whole_ratios) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut long_through, mut long_here, mut long_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let long = super::long_prompt();
    let prefill_only = GenerateOptions::default()
        .with_max_new_tokens(1)
        .with_stop_at_eos(false);
    for round in 0..=settings.repeats.max(1) {
        let mut session = client.session(max_length).await?;
        let mut pipeline = local.session(max_length)?;
        let mut remote = Generator::new(client.head(), &PROMPT, &options)?;
        let mut near = Generator::new(local.head(), &PROMPT, &options)?;
        let (mut remote_time, mut near_time) = (Duration::ZERO, Duration::ZERO);
        let mut steps = 0usize;
        loop {
            let started = Instant::now();
            let Some(x) = remote.pending()? else { break };
            let out = crate::generate::forward(&mut session, &x).await?;
            remote.advance(&out)?;
            let r = started.elapsed();
            let started = Instant::now();
            let Some(x) = near.pending()? else { break };
            let y = pipeline.forward(&x)?;
            near.advance(&y)?;
            let l = started.elapsed();
            // The first step is the prompt's prefill.
            if steps > 0 {
                remote_time += r;
                near_time += l;
            }
            steps += 1;
        }
        session.close().await;
        let tokens = steps.saturating_sub(1) as f64;
        if round > 0 && tokens > 0.0 {
            through.push(tokens / remote_time.as_secs_f64());
            here.push(tokens / near_time.as_secs_f64());
            ratios.push(near_time.as_secs_f64() / remote_time.as_secs_f64());
        }
        let out = client.generate(&PROMPT, &options, &mut |_| true).await?;
        let s = out.output.decode_tokens_per_second();
        let l = local_decode_rate(&local, &PROMPT, &options).await?;
        // A long prompt's prefill, through the swarm then locally.
        let out = client.generate(&long, &prefill_only, &mut |_| true).await?;
        let ps = out.output.prefill_tokens_per_second();
        let pl = local_rates(&local, &long, &prefill_only).await?.1;
        if round > 0 {
            whole_through.push(s);
            whole_here.push(l);
            whole_ratios.push(s / l);
            long_through.push(ps);
            long_here.push(pl);
            long_ratios.push(ps / pl);
        }
    }
    report(BenchRecord::plain(
        "local_decode_same_run",
        median(here),
        "tokens/s",
    ));
    report(BenchRecord {
        name: "swarm_vs_local_decode_ratio".into(),
        value: median(through),
        unit: "tokens/s",
        ratio: Some(median(ratios)),
        target: Some(0.95),
    });
    report(BenchRecord::plain(
        "local_decode_whole_runs",
        median(whole_here),
        "tokens/s",
    ));
    report(BenchRecord {
        name: "swarm_vs_local_decode_ratio_whole_runs".into(),
        value: median(whole_through),
        unit: "tokens/s",
        ratio: Some(median(whole_ratios)),
        target: Some(0.95),
    });
    report(BenchRecord::plain(
        "local_prefill512_same_run",
        median(long_here),
        "tokens/s",
    ));
    report(BenchRecord {
        name: "swarm_vs_local_prefill512_ratio".into(),
        value: median(long_through),
        unit: "tokens/s",
        ratio: Some(median(long_ratios)),
        target: Some(0.95),
    });
    swarm.shutdown().await;
    // Give the nodes' tasks a moment to wind down before the runtime ends.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(())
}

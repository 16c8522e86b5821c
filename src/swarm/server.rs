//! A server: loads a span, announces it, answers inference sessions.

use std::sync::Arc;
use std::time::Duration;

use swarm_core::{BlockRange, ModelId, NodeKey, ServerInfo};
use swarm_dht::{InferenceService, Multiaddr, Node, NodeIdentity, PeerId, RelayMode, SwarmKey};
use swarm_shard::{BlockShard, CacheBudget, ModelFiles, WeightPrecision};

use crate::backend::ShardBackend;
use crate::model_store;
use crate::DeviceSpec;
use crate::SherpaError;

use super::{blocking, listening, SwarmSettings, DEFAULT_RECORD_TTL, DEFAULT_REFRESH};

/// Builds a [`Server`].
#[derive(Debug)]
pub struct ServerBuilder {
    model: String,
    model_id: Option<ModelId>,
    /// `None`: the server places itself.
    blocks: Option<BlockRange>,
    span_length: Option<u32>,
    rebalance_every: Duration,
    swarm: SwarmSettings,
    relay: RelayMode,
    name: Option<String>,
    cache_bytes: u64,
    refresh: Duration,
    record_ttl: Duration,
    idle_timeout: Option<Duration>,
    probe_tracker: bool,
    direct_port: Option<u16>,
    device: DeviceSpec,
    max_memory: Option<u64>,
}

/// Memory a server needs besides its weights and KV caches (the runtime,
/// the network, buffers of a step), counted against `max_memory`.
pub const RUNTIME_MEMORY: u64 = 96 << 20;

impl ServerBuilder {
    swarm_setters!();

    /// How many blocks a server that places itself hosts [default: as many
    /// as fit its memory limit, else all].
    pub fn span_length(mut self, blocks: u32) -> Self {
        self.span_length = Some(blocks);
        self
    }

    /// How often a server that places itself checks the model's coverage
    /// [default: 30 s, each wait varied by a quarter either way].
    pub fn rebalance_every(mut self, every: Duration) -> Self {
        self.rebalance_every = every;
        self
    }

    /// Most memory this server may use, in bytes: its blocks' weights,
    /// the KV cache budget and [`RUNTIME_MEMORY`] must fit, or it refuses
    /// to start, saying how many blocks would.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.max_memory = Some(bytes);
        self
    }

    /// The id the swarm knows the model by [default: the known name or
    /// the file stem].
    pub fn model_id(mut self, id: ModelId) -> Self {
        self.model_id = Some(id);
        self
    }

    /// The device the blocks compute on [default: cpu].
    pub fn device(mut self, device: DeviceSpec) -> Self {
        self.device = device;
        self
    }

    /// When to listen through the tracker's relay [default: auto].
    pub fn relay(mut self, mode: RelayMode) -> Self {
        self.relay = mode;
        self
    }

    /// The name shown to people choosing nodes [default: from the peer id].
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Memory for session KV caches [default: 512 MiB].
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// How often the record is re-signed and how long each lives
    /// [default: 30 s and 120 s].
    pub fn announce_every(mut self, refresh: Duration, ttl: Duration) -> Self {
        self.refresh = refresh;
        self.record_ttl = ttl;
        self
    }

    /// Closes sessions idle this long [default: 60 s].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Measures bandwidth against the tracker at start-up and announces it
    /// [default: on].
    pub fn probe_tracker(mut self, on: bool) -> Self {
        self.probe_tracker = on;
        self
    }

    /// The TCP port sessions' direct connections arrive at (0: any free
    /// port), or `None` to keep every session on its libp2p stream
    /// [default: any free port].
    pub fn direct_port(mut self, port: Option<u16>) -> Self {
        self.direct_port = port;
        self
    }

    /// Loads the blocks, measures their speed, joins the swarm and
    /// announces them. A server without a fixed span first looks at the
    /// swarm and takes the blocks that most need a host.
    pub async fn start(self) -> Result<Server, SherpaError> {
        self.swarm.check()?;
        let model_arg = self.model.clone();
        let files = Arc::new(
            blocking(move || {
                let path = model_store::resolve_model(&model_arg, &mut |_| {})?;
                Ok(ModelFiles::open(&path)?)
            })
            .await?,
        );
        let model_blocks = files.config().num_hidden_layers as u32;
        let model = match self.model_id.clone() {
            Some(id) => id,
            None => model_store::model_id(&self.model)?,
        };
        let key = self
            .swarm
            .key
            .clone()
            .unwrap_or_else(swarm_dht::identity::ephemeral_node_key);
        let config = SwarmSettings {
            key: Some(key.clone()),
            ..self.swarm.clone()
        }
        .config()
        .with_relay(self.relay)
        .with_record_ttl(self.record_ttl);
        let bind = swarm_dht::node::direct_bind_ip(&config.listen);
        // A span file can only serve its span; a whole model can move.
        let held = files.held_blocks()?;
        let placed = match (self.blocks, held) {
            (Some(_), _) => None,
            (None, Some(held)) if held.len() < model_blocks => None,
            (None, Some(_)) => Some(self.auto_length(&files)?),
            (None, None) => {
                return Err(SherpaError::Config(format!(
                    "{} is a head file, with no blocks to serve",
                    files.path().display()
                )))
            }
        };
        let node = Node::start(config).await?;
        let blocks = match (self.blocks, placed) {
            (Some(blocks), _) => blocks,
            (None, Some(len)) => match first_span(&node, &model, model_blocks, len).await {
                Ok(span) => span,
                Err(e) => {
                    node.shutdown().await;
                    return Err(e);
                }
            },
            (None, None) => held.unwrap_or(BlockRange::full(model_blocks)?),
        };
        let loaded = load_span(
            files.clone(),
            blocks,
            self.device,
            self.max_memory,
            self.cache_bytes,
        )
        .await;
        let (shard, throughput, digests) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                node.shutdown().await;
                return Err(e);
            }
        };
        let backend = Arc::new(ShardBackend::new(
            shard.clone(),
            CacheBudget::new(self.cache_bytes),
        ));
        let mut service = InferenceService::new(model.clone(), backend.clone());
        if let Some(idle) = self.idle_timeout {
            service = service.with_idle_timeout(idle);
        }
        let service = Arc::new(service.with_direct(self.direct_port));
        if let Err(e) = service.clone().serve_on(&node, bind).await {
            node.shutdown().await;
            return Err(e.into());
        }
        let mut info = ServerInfo::new(key.public_key(), model, blocks, model_blocks);
        info.places_itself = placed.is_some();
        info.throughput = throughput;
        info.block_digests = digests.iter().map(|d| d.0).collect();
        info.cache_tokens_free = service.free_positions();
        info.hardware = crate::hardware::detect_on(&self.device);
        info.public_name = self.name.clone().unwrap_or_else(|| {
            // Peer ids share a long prefix; their end tells them apart.
            let id = node.peer_id().to_string();
            format!("sherpa-{}", &id[id.len().saturating_sub(6)..])
        });
        let tracker = self.swarm.bootstrap.first().and_then(peer_of);
        let mut bandwidth = None;
        if let (Some(tracker), true) = (tracker, self.probe_tracker) {
            match node.probe(tracker, SELF_PROBE_BYTES).await {
                Ok(b) => {
                    // The tracker's upload is our download, and back.
                    info.upload_bps = b.download_bps;
                    info.download_bps = b.upload_bps;
                    bandwidth = Some(b);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not measure bandwidth to the tracker; announcing it as unknown")
                }
            }
        }
        let addrs = listening(&node).await?;
        // Announced before `start` returns, so a client started as soon as
        // the caller prints this server's address finds it.
        if let Err(e) = swarm_dht::announce_once(&node, &key, &info, self.record_ttl).await {
            tracing::warn!(error = %e, "the first announcement failed; retrying at the next refresh");
        }
        let live = LiveInfo {
            service: service.clone(),
            device: self.device,
            first: Arc::new(std::sync::Mutex::new(info.clone())),
        };
        let announcer = swarm_dht::refresh_periodically(
            node.clone(),
            key.clone(),
            self.refresh,
            self.record_ttl,
            {
                let live = live.clone();
                move || live.now()
            },
        );
        let moves = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let rebalancer = placed.map(|_| {
            tokio::spawn(
                Rebalancer {
                    node: node.clone(),
                    key: key.clone(),
                    files,
                    backend: backend.clone(),
                    live: live.clone(),
                    device: self.device,
                    every: self.rebalance_every,
                    record_ttl: self.record_ttl,
                    moves: moves.clone(),
                }
                .run(),
            )
        });
        Ok(Server {
            node,
            key,
            info,
            addrs,
            backend,
            announcer,
            rebalancer,
            moves,
            bandwidth,
            record_ttl: self.record_ttl,
            service,
            live,
            stopped: false,
            _identity: self.swarm.identity,
        })
    }

    /// How many blocks a server that places itself hosts: the builder's
    /// length, else as many as fit the memory limit, else all; at most
    /// the model's.
    fn auto_length(&self, files: &ModelFiles) -> Result<u32, SherpaError> {
        let blocks = files.config().num_hidden_layers as u32;
        if let Some(len) = self.span_length {
            return Ok(len.clamp(1, blocks));
        }
        let Some(limit) = self.max_memory else {
            return Ok(blocks);
        };
        let per_block = files.span_memory(BlockRange::new(0, 1)?).max(1);
        let room = limit.saturating_sub(self.cache_bytes + RUNTIME_MEMORY);
        let fit = (room / per_block).min(u64::from(blocks)) as u32;
        if fit == 0 {
            check_fits(files, BlockRange::new(0, 1)?, self.cache_bytes, limit)?;
        }
        Ok(fit.max(1))
    }
}

/// The span a server of `len` blocks joining now should take: Petals'
/// rule on the swarm's per-block throughput, ties broken at random so
/// servers joining together spread out.
async fn first_span(
    node: &Node,
    model: &ModelId,
    model_blocks: u32,
    len: u32,
) -> Result<BlockRange, SherpaError> {
    // A moment for the node to reach its peers and their records.
    let listing = swarm_dht::survey::settled_listing(node, model, Duration::from_secs(2)).await?;
    let spans: Vec<(BlockRange, f32)> = listing
        .servers
        .iter()
        .filter(|s| s.info.model_blocks == model_blocks)
        .map(|s| (s.info.blocks, s.info.throughput))
        .collect();
    let throughputs = swarm_score::placement::block_throughputs(model_blocks, &spans);
    let span = swarm_score::placement::choose_span(&throughputs, len, rand::random())
        .ok_or_else(|| SherpaError::Config("the model has no blocks".into()))?;
    tracing::info!(%span, servers = spans.len(), "chose the blocks that most need a host");
    Ok(span)
}

/// Loads `blocks` of `files` (checking the memory limit), measures them
/// and takes their digests.
async fn load_span(
    files: Arc<ModelFiles>,
    blocks: BlockRange,
    device: DeviceSpec,
    max_memory: Option<u64>,
    cache_bytes: u64,
) -> Result<(Arc<BlockShard>, f32, Vec<swarm_shard::BlockDigest>), SherpaError> {
    blocking(move || {
        if let Some(limit) = max_memory {
            check_fits(&files, blocks, cache_bytes, limit)?;
        }
        let shard = BlockShard::load(&files, blocks, &device.open()?, WeightPrecision::Native)?;
        let (start, end) = (blocks.start() as usize, blocks.end() as usize);
        let digests = if files.split_part().is_some() {
            // A span file's blocks are checked against the manifest it
            // carries (a corrupted piece is refused here).
            files.manifest()?.blocks[start..end].to_vec()
        } else {
            files.block_digests(start, end)?
        };
        let throughput = shard.measure_throughput(8)?;
        Ok((Arc::new(shard), throughput, digests))
    })
    .await
}

/// Keeps a self-placed server where the swarm needs it: when blocks have
/// lost their last host (seen twice in a row, so a restarting server does
/// not set the swarm moving), every such server computes the same
/// [`swarm_score::placement::coverage_plan`] and the ones it names move,
/// once their open sessions have finished.
struct Rebalancer {
    node: Node,
    key: NodeKey,
    files: Arc<ModelFiles>,
    backend: Arc<ShardBackend>,
    live: LiveInfo,
    device: DeviceSpec,
    every: Duration,
    record_ttl: Duration,
    moves: Arc<std::sync::atomic::AtomicU32>,
}

/// Longest a server that must move waits for its sessions to end.
const MOVE_DRAIN_LIMIT: Duration = Duration::from_secs(600);

impl Rebalancer {
    async fn run(self) {
        let mut seen_hole = false;
        loop {
            // Varied by a quarter either way, so servers do not act in step.
            let jitter = 0.75 + rand::random::<f64>() * 0.5;
            tokio::time::sleep(self.every.mul_f64(jitter)).await;
            match self.plan().await {
                Ok(None) => seen_hole = false,
                Ok(Some(target)) if seen_hole => {
                    if let Err(e) = self.move_to(target).await {
                        tracing::warn!(error = %e, %target, "could not move to the blocks the swarm lacks");
                    }
                    seen_hole = false;
                }
                Ok(Some(_)) => seen_hole = true,
                Err(SherpaError::Dht(swarm_dht::DhtError::Stopped)) => break,
                Err(e) => tracing::debug!(error = %e, "could not check the model's coverage"),
            }
        }
    }

    /// Where the coverage plan wants this server, if blocks lack a host
    /// (`Some` of its current span when it is not one that moves).
    async fn plan(&self) -> Result<Option<BlockRange>, SherpaError> {
        let mine = self.live.snapshot();
        let listing = self
            .node
            .list_servers(&mine.model, swarm_dht::now_ms())
            .await?;
        let me = self.node.peer_id().to_string();
        let mut servers: Vec<swarm_score::placement::PlacedServer<String>> = listing
            .servers
            .iter()
            .filter(|s| s.info.model_blocks == mine.model_blocks)
            .map(|s| (s.peer_id.to_string(), s.info.blocks, s.info.places_itself))
            .filter(|(id, _, _)| *id != me)
            .collect();
        servers.push((me.clone(), mine.blocks, true));
        let Some(plan) = swarm_score::placement::coverage_plan(mine.model_blocks, &servers) else {
            return Ok(None);
        };
        let target = plan
            .into_iter()
            .find(|(id, _)| *id == me)
            .map_or(mine.blocks, |(_, span)| span);
        Ok(Some(target))
    }

    /// Waits for open sessions to end, loads `target`, serves it and
    /// announces it.
    async fn move_to(&self, target: BlockRange) -> Result<(), SherpaError> {
        let mine = self.live.snapshot();
        if target == mine.blocks {
            return Ok(());
        }
        let drain_from = tokio::time::Instant::now();
        while self.live.service.sessions() > 0 && drain_from.elapsed() < MOVE_DRAIN_LIMIT {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (shard, throughput, digests) =
            load_span(self.files.clone(), target, self.device, None, 0).await?;
        self.backend.replace(shard);
        let info = self.live.moved(target, throughput, &digests);
        swarm_dht::announce_once(&self.node, &self.key, &info, self.record_ttl).await?;
        self.moves
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(from = %mine.blocks, to = %target, "moved to blocks that had lost their host");
        Ok(())
    }
}

/// A server's figures of the moment, for its re-announcements.
#[derive(Debug, Clone)]
struct LiveInfo {
    service: Arc<InferenceService>,
    device: DeviceSpec,
    /// What it announced at start-up, or when it last moved.
    first: Arc<std::sync::Mutex<ServerInfo>>,
}

impl LiveInfo {
    /// The last full record (start-up or move).
    fn snapshot(&self) -> ServerInfo {
        self.first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records a move to `blocks`; returns the record to announce.
    fn moved(
        &self,
        blocks: BlockRange,
        throughput: f32,
        digests: &[swarm_shard::BlockDigest],
    ) -> ServerInfo {
        {
            let mut first = self
                .first
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            first.blocks = blocks;
            first.throughput = throughput;
            first.block_digests = digests.iter().map(|d| d.0).collect();
        }
        self.now()
    }

    /// The last full record with today's free memory, free cache, open
    /// sessions, and the decode speed measured on real steps (the start-up
    /// measurement until there is one).
    fn now(&self) -> ServerInfo {
        let mut info = self.snapshot();
        info.cache_tokens_free = self.service.free_positions();
        info.sessions = u32::try_from(self.service.sessions()).unwrap_or(u32::MAX);
        info.hardware = crate::hardware::detect_on(&self.device);
        if let Some(measured) = self.service.measured_throughput() {
            info.throughput = measured as f32;
        }
        info
    }
}

/// Bytes each way of the probe a server runs to its tracker at start-up.
const SELF_PROBE_BYTES: u32 = 1 << 20;

/// Refuses a span whose weights, cache budget and runtime exceed `limit`.
fn check_fits(
    files: &ModelFiles,
    blocks: BlockRange,
    cache_bytes: u64,
    limit: u64,
) -> Result<(), SherpaError> {
    blocks.check_within(files.config().num_hidden_layers as u32)?;
    let weights = files.span_memory(blocks);
    let needed = weights + cache_bytes + RUNTIME_MEMORY;
    if needed <= limit {
        return Ok(());
    }
    let per_block = (weights / blocks.len().max(1) as u64).max(1);
    let fit = limit.saturating_sub(cache_bytes + RUNTIME_MEMORY) / per_block;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(SherpaError::Config(format!(
        "blocks {blocks} need {:.2} GiB of weights + {:.2} GiB of KV cache + {:.2} GiB for the runtime = {:.2} GiB, more than the memory limit of {:.2} GiB; host {fit} blocks or fewer (or lower --cache-mib)",
        gib(weights),
        gib(cache_bytes),
        gib(RUNTIME_MEMORY),
        gib(needed),
        gib(limit)
    )))
}

/// The peer id at the end of a `/p2p/<id>` multiaddr.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(swarm_dht::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// A server: hosts a span of a model's blocks, announces it, and answers
/// inference sessions within its cache budget.
#[derive(Debug)]
pub struct Server {
    node: Node,
    key: NodeKey,
    info: ServerInfo,
    addrs: Vec<Multiaddr>,
    backend: Arc<ShardBackend>,
    announcer: tokio::task::JoinHandle<()>,
    rebalancer: Option<tokio::task::JoinHandle<()>>,
    moves: Arc<std::sync::atomic::AtomicU32>,
    bandwidth: Option<swarm_dht::Bandwidth>,
    record_ttl: Duration,
    service: Arc<InferenceService>,
    live: LiveInfo,
    /// Set once it has been shut down or aborted, so dropping it does
    /// nothing more.
    stopped: bool,
    _identity: Option<Arc<NodeIdentity>>,
}

impl Server {
    /// Settings for a server of `blocks` of `model` (a known name such as
    /// `smollm2-135m`, a `.gguf` file or an HF directory).
    pub fn builder(model: impl Into<String>, blocks: BlockRange) -> ServerBuilder {
        let mut builder = Self::placing_itself(model);
        builder.blocks = Some(blocks);
        builder
    }

    /// Settings for a server of `model` that chooses its own blocks: on
    /// joining, those that most need a host; later, when blocks lose their
    /// last host, it may move to them (see
    /// [`swarm_score::placement`]).
    pub fn placing_itself(model: impl Into<String>) -> ServerBuilder {
        ServerBuilder {
            model: model.into(),
            model_id: None,
            blocks: None,
            span_length: None,
            rebalance_every: Duration::from_secs(30),
            swarm: SwarmSettings::default(),
            relay: RelayMode::Auto,
            name: None,
            cache_bytes: 512 << 20,
            refresh: DEFAULT_REFRESH,
            record_ttl: DEFAULT_RECORD_TTL,
            idle_timeout: None,
            probe_tracker: true,
            direct_port: Some(0),
            device: DeviceSpec::Cpu,
            max_memory: None,
        }
    }

    /// Its first listen address, with `/p2p/<peer id>`.
    pub fn addr(&self) -> &Multiaddr {
        &self.addrs[0]
    }

    /// Every listen address.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// What it announced at start-up (see [`Server::current_info`] for
    /// where it is now).
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// How many times it has moved to other blocks.
    pub fn moves(&self) -> u32 {
        self.moves.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What its next re-announcement will say: today's free memory and
    /// cache, open sessions and measured speed.
    pub fn current_info(&self) -> ServerInfo {
        self.live.now()
    }

    /// Its node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The blocks it computes now.
    pub fn shard(&self) -> Arc<BlockShard> {
        self.backend.shard()
    }

    /// The TCP port its sessions' direct connections arrive at, if it
    /// offers them.
    pub fn direct_port(&self) -> Option<u16> {
        self.service.direct_listen_port()
    }

    /// Steps computed so far, and how many shared a pass with other
    /// sessions' steps.
    pub fn steps(&self) -> swarm_dht::session::StepCounts {
        self.service.steps()
    }

    /// Bandwidth measured against the tracker at start-up.
    pub fn bandwidth(&self) -> Option<swarm_dht::Bandwidth> {
        self.bandwidth
    }

    /// Withdraws its records and stops. If the withdrawal fails, the
    /// records expire on their own; the error says when.
    pub async fn shutdown(mut self) -> Result<(), SherpaError> {
        self.stopped = true;
        self.stop_tasks();
        let withdrawn = swarm_dht::withdraw(&self.node, &self.key, &self.live.snapshot()).await;
        self.node.shutdown().await;
        withdrawn.map_err(|e| {
            SherpaError::Network(format!(
                "could not withdraw ({e}); the record expires within {}s",
                self.record_ttl.as_secs()
            ))
        })
    }

    /// Stops at once without withdrawing, as a crash would: the records
    /// stay until they expire.
    pub async fn abort(mut self) {
        self.stopped = true;
        self.stop_tasks();
        self.node.shutdown().await;
    }

    fn stop_tasks(&self) {
        self.announcer.abort();
        if let Some(rebalancer) = &self.rebalancer {
            rebalancer.abort();
        }
    }
}

impl Drop for Server {
    /// A server dropped without [`Server::shutdown`] stops announcing at
    /// once and, on a tokio runtime, withdraws its record and stops its
    /// node in the background (elsewhere the node stops when its last
    /// handle goes, and the record expires).
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        self.stop_tasks();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (node, key, info) = (self.node.clone(), self.key.clone(), self.live.snapshot());
        runtime.spawn(async move {
            if let Err(e) = swarm_dht::withdraw(&node, &key, &info).await {
                tracing::debug!(error = %e, "a dropped server could not withdraw");
            }
            node.shutdown().await;
        });
    }
}

//! The embeddable swarm: [`Tracker`], [`Server`] and [`Client`] builders.
//!
//! ```no_run
//! use sherpa_swarm::{Client, Server, Tracker};
//! use sherpa_swarm::shard::GenerateOptions;
//! # async fn run() -> Result<(), sherpa_swarm::SherpaError> {
//! let tracker = Tracker::builder().listen(sherpa_swarm::dht::node::loopback()).start().await?;
//! let mut servers = Vec::new();
//! for blocks in ["0..15", "15..30"] {
//!     servers.push(
//!         Server::builder("smollm2-135m", blocks.parse()?)
//!             .tracker(tracker.addr().clone())
//!             .start()
//!             .await?,
//!     );
//! }
//! let client = Client::builder("smollm2-135m").tracker(tracker.addr().clone()).start().await?;
//! let out = client
//!     .generate_text("Why is the sky blue?", &GenerateOptions::default(), &mut |piece| {
//!         print!("{piece}");
//!         true
//!     })
//!     .await?;
//! eprintln!("route: {:?}", out.route);
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use swarm_core::{BlockRange, ModelId, NodeKey, ServerInfo};
use swarm_dht::{
    HostWait, InferenceService, InferenceSession, LocalBlocks, Multiaddr, Node, NodeConfig,
    NodeIdentity, PeerId, RelayMode, RouteStep, ServerChoice, SessionOptions, Survey,
    SurveyOptions, SwarmKey,
};
use swarm_score::{select, Overrides, Selection, SelectionPolicy, ServerId};
use swarm_shard::{
    BlockShard, CacheBudget, ChatMessage, ClientHead, DType, Device, GenerateOptions,
    GenerationOutput, ModelFiles, SessionCache, ShardError, TextTokenizer, WeightPrecision,
};

use crate::model_store;
use crate::SherpaError;

/// How often a server re-signs its record by default, and how long each lives.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(30);
/// How long a server's record lives by default.
pub const DEFAULT_RECORD_TTL: Duration = Duration::from_secs(120);

/// Where a node finds its swarm.
#[derive(Debug, Clone, Default)]
struct SwarmSettings {
    bootstrap: Vec<Multiaddr>,
    lan: bool,
    swarm_key: Option<SwarmKey>,
    listen: Vec<Multiaddr>,
    key: Option<NodeKey>,
    /// The claimed identity the key came from, held (locked) while the
    /// node runs.
    identity: Option<Arc<NodeIdentity>>,
}

impl SwarmSettings {
    fn config(&self) -> NodeConfig {
        NodeConfig::new(
            self.key
                .clone()
                .unwrap_or_else(swarm_dht::identity::ephemeral_node_key),
        )
        .with_listen(if self.listen.is_empty() {
            vec![swarm_dht::node::loopback()]
        } else {
            self.listen.clone()
        })
        .with_bootstrap(self.bootstrap.clone())
        .with_mdns(self.lan)
        .with_swarm_key(self.swarm_key)
    }

    fn check(&self) -> Result<(), SherpaError> {
        if self.bootstrap.is_empty() && !self.lan {
            return Err(SherpaError::Network(
                "say where the swarm is: a tracker address, or LAN discovery".into(),
            ));
        }
        Ok(())
    }
}

macro_rules! swarm_setters {
    () => {
        /// Joins the swarm through this tracker (or any node's) multiaddr,
        /// ending in `/p2p/<peer id>`.
        pub fn tracker(mut self, addr: Multiaddr) -> Self {
            self.swarm.bootstrap.push(addr);
            self
        }

        /// Finds peers on the local network by mDNS (multicasts on every
        /// interface this process sees).
        pub fn lan(mut self, on: bool) -> Self {
            self.swarm.lan = on;
            self
        }

        /// Joins a private swarm: only nodes holding `key` can connect.
        pub fn swarm_key(mut self, key: Option<SwarmKey>) -> Self {
            self.swarm.swarm_key = key;
            self
        }

        /// Listens on `addr` (repeatable) [default: TCP on a random
        /// loopback port].
        pub fn listen(mut self, addr: Multiaddr) -> Self {
            self.swarm.listen.push(addr);
            self
        }

        /// The node's identity [default: a fresh one].
        pub fn key(mut self, key: NodeKey) -> Self {
            self.swarm.key = Some(key);
            self
        }

        /// The node's identity from a claimed key file, kept claimed (so
        /// no other node takes it) for as long as the node runs.
        pub fn identity(mut self, identity: NodeIdentity) -> Self {
            self.swarm.key = Some(identity.key().clone());
            self.swarm.identity = Some(Arc::new(identity));
            self
        }
    };
}

/// Loads a model file on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, SherpaError> + Send + 'static,
) -> Result<T, SherpaError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SherpaError::Network(format!("a loading task failed: {e}")))?
}

/// Builds a [`Tracker`].
#[derive(Debug, Default)]
pub struct TrackerBuilder {
    swarm: SwarmSettings,
    record_ttl: Option<Duration>,
}

impl TrackerBuilder {
    swarm_setters!();

    /// Longest lifetime of a record it stores [default: 120 s].
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = Some(ttl);
        self
    }

    /// Starts the tracker.
    pub async fn start(self) -> Result<Tracker, SherpaError> {
        let node = Node::start(
            self.swarm
                .config()
                .with_relay_server(true)
                .with_relay(RelayMode::Never)
                .with_record_ttl(self.record_ttl.unwrap_or(DEFAULT_RECORD_TTL)),
        )
        .await?;
        let addrs = listening(&node).await?;
        Ok(Tracker {
            node,
            addrs,
            _identity: self.swarm.identity,
        })
    }
}

/// The addresses a tracker or server listens on; an error (and the node
/// stopped) when it has none, since nobody could reach it.
async fn listening(node: &Node) -> Result<Vec<Multiaddr>, SherpaError> {
    let addrs = node.listen_addrs().await?;
    if addrs.is_empty() {
        node.shutdown().await;
        return Err(SherpaError::Network(
            "the node listens on no address; give it one to listen on".into(),
        ));
    }
    Ok(addrs)
}

/// A tracker: the bootstrap node servers and clients meet through, a
/// circuit relay and an AutoNAT server.
#[derive(Debug)]
pub struct Tracker {
    node: Node,
    addrs: Vec<Multiaddr>,
    _identity: Option<Arc<NodeIdentity>>,
}

impl Tracker {
    /// Settings for a new tracker.
    pub fn builder() -> TrackerBuilder {
        TrackerBuilder::default()
    }

    /// Its first listen address, with `/p2p/<peer id>`: what others join by.
    pub fn addr(&self) -> &Multiaddr {
        &self.addrs[0]
    }

    /// Every listen address.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// Its node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops it.
    pub async fn shutdown(self) {
        self.node.shutdown().await;
    }
}

/// Builds a [`Server`].
#[derive(Debug)]
pub struct ServerBuilder {
    model: String,
    model_id: Option<ModelId>,
    blocks: BlockRange,
    swarm: SwarmSettings,
    relay: RelayMode,
    name: Option<String>,
    cache_bytes: u64,
    refresh: Duration,
    record_ttl: Duration,
    idle_timeout: Option<Duration>,
    probe_tracker: bool,
    direct_port: Option<u16>,
}

impl ServerBuilder {
    swarm_setters!();

    /// The id the swarm knows the model by [default: the known name or
    /// the file stem].
    pub fn model_id(mut self, id: ModelId) -> Self {
        self.model_id = Some(id);
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
    /// announces them.
    pub async fn start(self) -> Result<Server, SherpaError> {
        self.swarm.check()?;
        let (model_arg, blocks) = (self.model.clone(), self.blocks);
        let shard = blocking(move || {
            let path = model_store::resolve_model(&model_arg, &mut |_| {})?;
            let files = ModelFiles::open(&path)?;
            let shard = BlockShard::load(&files, blocks, &Device::Cpu, WeightPrecision::Native)?;
            let throughput = shard.measure_throughput(8)?;
            Ok((Arc::new(shard), throughput))
        })
        .await?;
        let (shard, throughput) = shard;
        let model = match self.model_id.clone() {
            Some(id) => id,
            None => model_store::model_id(&self.model)?,
        };
        let key = self
            .swarm
            .key
            .clone()
            .unwrap_or_else(swarm_dht::identity::ephemeral_node_key);
        let mut service = InferenceService::new(
            model.clone(),
            shard.clone(),
            CacheBudget::new(self.cache_bytes),
        );
        if let Some(idle) = self.idle_timeout {
            service = service.with_idle_timeout(idle);
        }
        let service = Arc::new(service.with_direct(self.direct_port));
        let node = Node::start(
            SwarmSettings {
                key: Some(key.clone()),
                ..self.swarm.clone()
            }
            .config()
            .with_relay(self.relay)
            .with_record_ttl(self.record_ttl)
            .with_inference(service.clone()),
        )
        .await?;
        let per_token = SessionCache::bytes_needed(shard.config(), blocks, 1, DType::F32).max(1);
        let mut info = ServerInfo::new(
            key.public_key(),
            model,
            blocks,
            shard.config().num_hidden_layers as u32,
        );
        info.throughput = throughput;
        info.cache_tokens_free = self.cache_bytes / per_token;
        info.hardware = crate::hardware::detect();
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
        let announcer = swarm_dht::refresh_periodically(
            node.clone(),
            key.clone(),
            info.clone(),
            self.refresh,
            self.record_ttl,
        );
        Ok(Server {
            node,
            key,
            info,
            addrs,
            shard,
            announcer,
            bandwidth,
            record_ttl: self.record_ttl,
            service,
            _identity: self.swarm.identity,
        })
    }
}

/// Bytes each way of the probe a server runs to its tracker at start-up.
const SELF_PROBE_BYTES: u32 = 1 << 20;

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
    shard: Arc<BlockShard>,
    announcer: tokio::task::JoinHandle<()>,
    bandwidth: Option<swarm_dht::Bandwidth>,
    record_ttl: Duration,
    service: Arc<InferenceService>,
    _identity: Option<Arc<NodeIdentity>>,
}

impl Server {
    /// Settings for a server of `blocks` of `model` (a known name such as
    /// `smollm2-135m`, a `.gguf` file or an HF directory).
    pub fn builder(model: impl Into<String>, blocks: BlockRange) -> ServerBuilder {
        ServerBuilder {
            model: model.into(),
            model_id: None,
            blocks,
            swarm: SwarmSettings::default(),
            relay: RelayMode::Auto,
            name: None,
            cache_bytes: 512 << 20,
            refresh: DEFAULT_REFRESH,
            record_ttl: DEFAULT_RECORD_TTL,
            idle_timeout: None,
            probe_tracker: true,
            direct_port: Some(0),
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

    /// What it announces.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// Its node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The blocks it computes.
    pub fn shard(&self) -> &Arc<BlockShard> {
        &self.shard
    }

    /// The TCP port its sessions' direct connections arrive at, if it
    /// offers them.
    pub fn direct_port(&self) -> Option<u16> {
        self.service.direct_listen_port()
    }

    /// Bandwidth measured against the tracker at start-up.
    pub fn bandwidth(&self) -> Option<swarm_dht::Bandwidth> {
        self.bandwidth
    }

    /// Withdraws its records and stops. If the withdrawal fails, the
    /// records expire on their own; the error says when.
    pub async fn shutdown(self) -> Result<(), SherpaError> {
        self.announcer.abort();
        let withdrawn = swarm_dht::withdraw(&self.node, &self.key, &self.info).await;
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
    pub async fn abort(self) {
        self.announcer.abort();
        self.node.shutdown().await;
    }
}

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    model: String,
    model_id: Option<ModelId>,
    swarm: SwarmSettings,
    local_blocks: u32,
    max_nodes: usize,
    pinned: Vec<String>,
    excluded: Vec<String>,
    survey: SurveyOptions,
    session: SessionOptions,
    wait_for_hosts: Duration,
    on_event: EventSink,
}

/// Something a [`Client`] reports while it works, for a user to see.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// Blocks the client needs have no server yet; it waits for them.
    WaitingForHosts(HostWait),
}

impl std::fmt::Display for ClientEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::WaitingForHosts(wait) => wait.fmt(f),
        }
    }
}

/// A callback for a client's events.
type EventFn = dyn Fn(&ClientEvent) + Send + Sync;

/// Where a client's events go.
#[derive(Clone, Default)]
struct EventSink(Option<Arc<EventFn>>);

impl EventSink {
    fn emit(&self, event: ClientEvent) {
        match &self.0 {
            Some(f) => f(&event),
            None => tracing::info!("{event}"),
        }
    }
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "EventSink(..)"
        } else {
            "EventSink(log)"
        })
    }
}

/// How long a client waits by default for blocks that have no server yet.
pub const DEFAULT_WAIT_FOR_HOSTS: Duration = Duration::from_secs(20);

impl ClientBuilder {
    swarm_setters!();

    /// The id the swarm knows the model by [default: the known name or
    /// the file stem].
    pub fn model_id(mut self, id: ModelId) -> Self {
        self.model_id = Some(id);
        self
    }

    /// Runs the first `k` blocks on the client too, so no server sees the
    /// embeddings of the prompt [default: 0].
    pub fn local_blocks(mut self, k: u32) -> Self {
        self.local_blocks = k;
        self
    }

    /// How many servers to auto-select [default: 10].
    pub fn max_nodes(mut self, n: usize) -> Self {
        self.max_nodes = n;
        self
    }

    /// Always selects this server (public name or peer id; repeatable).
    pub fn pin(mut self, name: impl Into<String>) -> Self {
        self.pinned.push(name.into());
        self
    }

    /// Never uses this server (public name or peer id; repeatable).
    pub fn exclude(mut self, name: impl Into<String>) -> Self {
        self.excluded.push(name.into());
        self
    }

    /// How the client surveys servers before choosing.
    pub fn survey(mut self, options: SurveyOptions) -> Self {
        self.survey = options;
        self
    }

    /// How long to wait for blocks that have no server yet (servers
    /// started a moment ago may not have announced) before failing
    /// [default: 20 s].
    pub fn wait_for_hosts(mut self, wait: Duration) -> Self {
        self.wait_for_hosts = wait;
        self
    }

    /// Calls `f` with what the client reports while it works (e.g. which
    /// blocks it waits for) [default: logged at info level].
    pub fn on_event(mut self, f: impl Fn(&ClientEvent) + Send + Sync + 'static) -> Self {
        self.on_event = EventSink(Some(Arc::new(f)));
        self
    }

    /// Wire dtype, step timeout and failover limit of its sessions
    /// (`max_length` is set per generation).
    pub fn session(mut self, options: SessionOptions) -> Self {
        self.session = options;
        self
    }

    /// Loads the client's part of the model and joins the swarm.
    pub async fn start(self) -> Result<Client, SherpaError> {
        self.swarm.check()?;
        let (model_arg, local) = (self.model.clone(), self.local_blocks);
        let (head, tokenizer, shard) = blocking(move || {
            let path = model_store::resolve_model(&model_arg, &mut |_| {})?;
            let files = ModelFiles::open(&path)?;
            let blocks = files.config().num_hidden_layers as u32;
            if local >= blocks {
                return Err(SherpaError::Shard(ShardError::BadSettings(format!(
                    "local_blocks must be less than the model's {blocks} blocks, so servers run the rest"
                ))));
            }
            let head = ClientHead::load(&files, &Device::Cpu, WeightPrecision::Native)?;
            let tokenizer = TextTokenizer::from_model(&files).ok();
            let shard = match local {
                0 => None,
                k => Some(Arc::new(BlockShard::load(
                    &files,
                    BlockRange::new(0, k)?,
                    &Device::Cpu,
                    WeightPrecision::Native,
                )?)),
            };
            Ok((Arc::new(head), tokenizer, shard))
        })
        .await?;
        let model = match self.model_id.clone() {
            Some(id) => id,
            None => model_store::model_id(&self.model)?,
        };
        let node = Node::start(self.swarm.config().with_relay(RelayMode::Never)).await?;
        Ok(Client {
            node,
            model,
            head,
            tokenizer,
            local: shard,
            policy: SelectionPolicy {
                max_nodes: self.max_nodes,
                ..SelectionPolicy::default()
            },
            pinned: self.pinned,
            excluded: self.excluded,
            survey_options: self.survey,
            session: self.session,
            wait_for_hosts: self.wait_for_hosts,
            on_event: self.on_event,
            survey: tokio::sync::Mutex::new(None),
        })
    }
}

/// A client: holds the embeddings, LM head and tokenizer (plus any local
/// blocks), chooses servers and generates through them.
#[derive(Debug)]
pub struct Client {
    node: Node,
    model: ModelId,
    head: Arc<ClientHead>,
    tokenizer: Option<TextTokenizer>,
    local: Option<Arc<BlockShard>>,
    policy: SelectionPolicy,
    pinned: Vec<String>,
    excluded: Vec<String>,
    survey_options: SurveyOptions,
    session: SessionOptions,
    wait_for_hosts: Duration,
    on_event: EventSink,
    survey: tokio::sync::Mutex<Option<(Instant, Survey)>>,
}

/// What [`Client::plan`] decided.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The servers found and measured.
    pub survey: Survey,
    /// The auto-selection (scores, the chosen set, what is missing).
    pub selection: Selection,
    /// Servers the user excluded.
    pub excluded: HashSet<ServerId>,
}

/// A finished distributed generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The tokens and timings.
    pub output: GenerationOutput,
    /// The blocks the client ran itself.
    pub local_blocks: Option<BlockRange>,
    /// The route at the start.
    pub route: Vec<RouteStep>,
    /// Servers lost on the way, and what replaced them.
    pub failovers: Vec<swarm_dht::Failover>,
}

/// A survey is reused for this long.
const SURVEY_MAX_AGE: Duration = Duration::from_secs(30);

impl Client {
    /// Settings for a client of `model` (a known name such as
    /// `smollm2-135m`, a `.gguf` file or an HF directory): it loads only
    /// the embeddings, final norm, LM head and tokenizer.
    pub fn builder(model: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            model: model.into(),
            model_id: None,
            swarm: SwarmSettings::default(),
            local_blocks: 0,
            max_nodes: 10,
            pinned: Vec::new(),
            excluded: Vec::new(),
            survey: SurveyOptions::default(),
            session: SessionOptions::default(),
            wait_for_hosts: DEFAULT_WAIT_FOR_HOSTS,
            on_event: EventSink::default(),
        }
    }

    /// Its node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The model's id in the swarm.
    pub fn model(&self) -> &ModelId {
        &self.model
    }

    /// The model's tokenizer, if the model file has one.
    pub fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tokenizer.as_ref()
    }

    /// The blocks the client runs itself (`local_blocks`), if any.
    pub fn local_blocks(&self) -> Option<BlockRange> {
        self.local.as_ref().map(|s| s.range())
    }

    /// The client's part of the model.
    pub fn head(&self) -> &ClientHead {
        &self.head
    }

    /// The blocks servers must run: all but the client's own.
    fn remote_span(&self) -> Result<BlockRange, SherpaError> {
        let first = self.local.as_ref().map_or(0, |s| s.range().end());
        Ok(BlockRange::new(
            first,
            self.head.config().num_hidden_layers as u32,
        )?)
    }

    /// Surveys the model's servers (reusing a recent survey), waiting up to
    /// [`ClientBuilder::wait_for_hosts`] for blocks without a server, and
    /// auto-selects a covering set, honouring pins and exclusions. Fails
    /// with [`swarm_dht::DhtError::NoHosts`] (saying what the swarm
    /// serves, if not this model) when blocks still have no server.
    pub async fn plan(&self) -> Result<Plan, SherpaError> {
        let span = self.remote_span()?;
        let mut cached = self.survey.lock().await;
        let survey = match cached.as_ref() {
            Some((at, survey))
                if at.elapsed() < SURVEY_MAX_AGE
                    && swarm_dht::unhosted(&survey.listing, Some(span)).is_none() =>
            {
                survey.clone()
            }
            _ => {
                let events = self.on_event.clone();
                let survey = swarm_dht::survey_hosted(
                    &self.node,
                    &self.model,
                    &self.survey_options,
                    Some(span),
                    self.wait_for_hosts,
                    &mut |wait| events.emit(ClientEvent::WaitingForHosts(wait.clone())),
                )
                .await?;
                if let Some(missing) = swarm_dht::unhosted(&survey.listing, Some(span)) {
                    let servers = survey.listing.servers.len();
                    let serving = if servers == 0 {
                        swarm_dht::served_models(&self.node)
                            .await
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    return Err(swarm_dht::DhtError::NoHosts {
                        model: self.model.clone(),
                        missing,
                        servers,
                        waited: self.wait_for_hosts,
                        serving,
                    }
                    .into());
                }
                *cached = Some((Instant::now(), survey.clone()));
                survey
            }
        };
        drop(cached);
        let blocks = self.head.config().num_hidden_layers as u32;
        let overrides = Overrides {
            pinned: survey.ids_named(&self.pinned)?,
            excluded: survey.ids_named(&self.excluded)?,
        };
        let selection = select(&survey.candidates, blocks, &self.policy, &overrides)?;
        Ok(Plan {
            survey,
            selection,
            excluded: overrides.excluded,
        })
    }

    /// Forgets the last survey, so the next generation looks again.
    pub async fn forget_survey(&self) {
        *self.survey.lock().await = None;
    }

    /// Opens a session for up to `max_length` positions over the planned
    /// route through the blocks the client does not run itself.
    pub async fn session(&self, max_length: usize) -> Result<InferenceSession, SherpaError> {
        let plan = self.plan().await?;
        let config = self.head.config();
        let span = self.remote_span()?;
        let choice = ServerChoice {
            preferred: plan
                .selection
                .selected
                .iter()
                .map(|&i| plan.survey.candidates[i].id)
                .collect(),
            excluded: plan.excluded,
        };
        let options = SessionOptions {
            max_length: max_length as u32,
            ..self.session.clone()
        };
        Ok(InferenceSession::open(
            &self.node,
            self.model.clone(),
            plan.survey,
            choice,
            span,
            config.hidden_size,
            options,
        )
        .await?)
    }

    /// Positions a session needs for `prompt_tokens` plus what `options`
    /// may generate (capped at the model's context).
    pub fn max_length(&self, prompt_tokens: usize, options: &GenerateOptions) -> usize {
        (prompt_tokens + options.max_new_tokens).min(self.head.config().max_position_embeddings)
    }

    /// Generates from `prompt` ids through the swarm in a session of its
    /// own. `on_token` sees each new id as it is chosen and may return
    /// `false` to stop.
    pub async fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: &mut (dyn FnMut(u32) -> bool + Send),
    ) -> Result<Generation, SherpaError> {
        let mut session = self.session(self.max_length(prompt.len(), options)).await?;
        let out = self
            .generate_in(&mut session, prompt, options, on_token)
            .await;
        session.close().await;
        out
    }

    /// Generates in an open `session` (from [`Client::session`], with room
    /// for [`Client::max_length`] positions), e.g. after showing its route.
    pub async fn generate_in(
        &self,
        session: &mut InferenceSession,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: &mut (dyn FnMut(u32) -> bool + Send),
    ) -> Result<Generation, SherpaError> {
        let route = session.route();
        let already = session.failovers().len();
        let mut local = match &self.local {
            Some(shard) => Some(LocalBlocks::new(
                shard.clone(),
                self.max_length(prompt.len(), options),
            )?),
            None => None,
        };
        let output = swarm_dht::generate(
            &self.head,
            local.as_mut(),
            session,
            prompt,
            options,
            &mut |id| Ok(on_token(id)),
        )
        .await?;
        Ok(Generation {
            output,
            local_blocks: local.map(|l| l.range()),
            route,
            failovers: session.failovers()[already..].to_vec(),
        })
    }

    /// Generates a chat reply to `prompt` (the model's chat template
    /// applied), passing each new piece of text to `on_text`, which may
    /// return `false` to stop.
    pub async fn generate_text(
        &self,
        prompt: &str,
        options: &GenerateOptions,
        on_text: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Generation, SherpaError> {
        let tokenizer = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| ShardError::BadSettings("the model file carries no tokenizer".into()))?;
        let ids = tokenizer.encode_chat(&[ChatMessage::user(prompt)])?;
        let mut decoder = tokenizer.stream_decoder();
        let mut failed = None;
        let out = self
            .generate(&ids, options, &mut |id| match decoder.push(id) {
                Ok(Some(piece)) => on_text(&piece),
                Ok(None) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            })
            .await?;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }

    /// Leaves the swarm.
    pub async fn shutdown(self) {
        self.node.shutdown().await;
    }
}

/// A whole swarm in this process on loopback: a tracker, servers splitting
/// a model's blocks evenly, and a client. For demos, benchmarks and tests.
#[derive(Debug)]
pub struct LocalSwarm {
    /// The tracker.
    pub tracker: Tracker,
    /// The servers, first blocks first, named `server-0`, `server-1`, ...
    pub servers: Vec<Server>,
    /// The client.
    pub client: Client,
}

impl LocalSwarm {
    /// Starts a tracker, `servers` servers splitting `model` (a known name,
    /// a `.gguf` file or an HF directory) evenly, and a client; the swarm
    /// knows the model as `model_id`.
    pub async fn start(model: &str, model_id: ModelId, servers: u32) -> Result<Self, SherpaError> {
        let arg = model.to_owned();
        let blocks = blocking(move || {
            let path = model_store::resolve_model(&arg, &mut |_| {})?;
            Ok(ModelFiles::open(&path)?.config().num_hidden_layers as u32)
        })
        .await?;
        let tracker = Tracker::builder().start().await?;
        let mut running = Vec::new();
        for (i, span) in BlockRange::split_evenly(blocks, servers)?
            .into_iter()
            .enumerate()
        {
            running.push(
                Server::builder(model, span)
                    .model_id(model_id.clone())
                    .name(format!("server-{i}"))
                    .tracker(tracker.addr().clone())
                    .probe_tracker(false)
                    .start()
                    .await?,
            );
        }
        let client = Client::builder(model)
            .model_id(model_id)
            .tracker(tracker.addr().clone())
            .start()
            .await?;
        Ok(Self {
            tracker,
            servers: running,
            client,
        })
    }

    /// Stops every node.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
        for server in self.servers {
            server.abort().await;
        }
        self.tracker.shutdown().await;
    }
}

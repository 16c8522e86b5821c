//! A client: the model's head, server selection, and generation through
//! the swarm.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use swarm_core::{BlockRange, ModelId, NodeKey};
use swarm_dht::{
    HostWait, InferenceSession, Multiaddr, Node, NodeIdentity, RelayMode, RouteStep, ServerChoice,
    SessionOptions, Survey, SurveyOptions, SwarmKey,
};
use swarm_score::{select, Overrides, Selection, SelectionPolicy, ServerId};
use swarm_shard::{
    BlockShard, ChatMessage, ClientHead, GenerateOptions, GenerationOutput, Manifest, ModelFiles,
    ShardError, TextTokenizer, WeightPrecision,
};

use crate::generate::LocalBlocks;
use crate::model_store;
use crate::DeviceSpec;
use crate::SherpaError;

use super::{blocking, SwarmSettings};

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    model: String,
    model_id: Option<ModelId>,
    swarm: SwarmSettings,
    local_blocks: u32,
    max_nodes: usize,
    choice: NodeChoice,
    survey: SurveyOptions,
    session: SessionOptions,
    wait_for_hosts: Duration,
    on_event: EventSink,
    device: DeviceSpec,
}

/// Servers a client must use and must not use, each by public name or
/// peer id. The auto-selection fills the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeChoice {
    /// Always selected.
    pub pinned: Vec<String>,
    /// Never used.
    pub excluded: Vec<String>,
}

crate::core::with_setters!(NodeChoice {
    pinned: Vec<String> => with_pinned,
    excluded: Vec<String> => with_excluded,
});

impl NodeChoice {
    /// The pinned and excluded servers among `survey`'s. With `strict`, a
    /// name that matches no listed server is an error (a user's typo);
    /// otherwise it is passed over (a saved choice naming a server that
    /// has left).
    pub fn overrides(&self, survey: &Survey, strict: bool) -> Result<Overrides, SherpaError> {
        Ok(if strict {
            Overrides::default()
                .with_pinned(survey.ids_named(&self.pinned)?)
                .with_excluded(survey.ids_named(&self.excluded)?)
        } else {
            Overrides::default()
                .with_pinned(survey.ids_listed(&self.pinned))
                .with_excluded(survey.ids_listed(&self.excluded))
        })
    }
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
        self.choice.pinned.push(name.into());
        self
    }

    /// Never uses this server (public name or peer id; repeatable).
    pub fn exclude(mut self, name: impl Into<String>) -> Self {
        self.choice.excluded.push(name.into());
        self
    }

    /// How the client surveys servers before choosing.
    pub fn survey(mut self, options: SurveyOptions) -> Self {
        self.survey = options;
        self
    }

    /// The device the client's part of the model computes on [default:
    /// cpu].
    pub fn device(mut self, device: DeviceSpec) -> Self {
        self.device = device;
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
        let (model_arg, local, device) = (self.model.clone(), self.local_blocks, self.device);
        let (head, tokenizer, shard, manifest) = blocking(move || {
            let path = model_store::resolve_model(&model_arg, &mut |_| {})?;
            let files = ModelFiles::open(&path)?;
            let blocks = files.config().num_hidden_layers as u32;
            if local >= blocks {
                return Err(SherpaError::Shard(ShardError::BadSettings(format!(
                    "local_blocks must be less than the model's {blocks} blocks, so servers run the rest"
                ))));
            }
            let device = device.open()?;
            let head = ClientHead::load(&files, &device, WeightPrecision::Native)?;
            let tokenizer = TextTokenizer::from_model(&files).ok();
            let manifest = model_store::manifest(&files)?;
            let shard = match local {
                0 => None,
                k => Some(Arc::new(BlockShard::load(
                    &files,
                    BlockRange::new(0, k)?,
                    &device,
                    WeightPrecision::Native,
                )?)),
            };
            Ok((Arc::new(head), tokenizer, shard, manifest))
        })
        .await?;
        let model = match self.model_id.clone() {
            Some(id) => id,
            None => model_store::model_id(&self.model)?,
        };
        let node = Node::start(self.swarm.config().with_relay(RelayMode::Never)).await?;
        // Only servers whose blocks are this copy's are routed through.
        node.expect_blocks(model.clone(), manifest.blocks.iter().map(|d| d.0).collect());
        Ok(Client {
            node,
            manifest,
            model,
            head,
            tokenizer,
            local: shard,
            policy: SelectionPolicy::default().with_max_nodes(self.max_nodes),
            choice: std::sync::Mutex::new((self.choice, true)),
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
    manifest: Manifest,
    model: ModelId,
    head: Arc<ClientHead>,
    tokenizer: Option<TextTokenizer>,
    local: Option<Arc<BlockShard>>,
    policy: SelectionPolicy,
    /// The user's pins and exclusions, and whether a name that matches no
    /// listed server is an error (the builder's, typed by a user) or
    /// ignored (set later, e.g. a saved choice).
    choice: std::sync::Mutex<(NodeChoice, bool)>,
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
    /// The route at the end (the same as `route` unless servers were lost).
    pub final_route: Vec<RouteStep>,
    /// Each hop of `final_route`'s mean time for a one-token step, round
    /// trip and compute included.
    pub hop_latencies: Vec<Option<Duration>>,
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
            choice: NodeChoice::default(),
            survey: SurveyOptions::default(),
            session: SessionOptions::default(),
            wait_for_hosts: DEFAULT_WAIT_FOR_HOSTS,
            on_event: EventSink::default(),
            device: DeviceSpec::Cpu,
        }
    }

    /// Its node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The digests of the model's blocks as this client's copy has them;
    /// servers whose blocks differ are not used.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
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
        // The lock guards the cached survey only, never a network wait:
        // two plans at once may both survey, and the later one is kept.
        let cached = self.survey.lock().await.clone().filter(|(at, survey)| {
            at.elapsed() < SURVEY_MAX_AGE
                && swarm_dht::unhosted(&survey.listing, Some(span)).is_none()
        });
        let survey = match cached {
            Some((_, survey)) => survey,
            None => {
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
                *self.survey.lock().await = Some((Instant::now(), survey.clone()));
                survey
            }
        };
        let blocks = self.head.config().num_hidden_layers as u32;
        let overrides = self.overrides(&survey)?;
        let selection = select(&survey.candidates, blocks, &self.policy, &overrides)?;
        Ok(Plan {
            survey,
            selection,
            excluded: overrides.excluded,
        })
    }

    /// The servers the user pinned and excluded.
    pub fn node_choice(&self) -> NodeChoice {
        self.node_choice_and_strictness().0
    }

    /// Replaces the pinned and excluded servers; later plans and sessions
    /// use them. Names that match no listed server are ignored (a saved
    /// choice may name servers that have left), unlike the builder's.
    pub fn set_node_choice(&self, choice: NodeChoice) {
        *self.choice.lock().unwrap_or_else(|e| e.into_inner()) = (choice, false);
    }

    fn node_choice_and_strictness(&self) -> (NodeChoice, bool) {
        self.choice
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The auto-selection's limits (how many servers at most).
    pub fn policy(&self) -> &SelectionPolicy {
        &self.policy
    }

    /// The model's servers as a node selector shows them: surveyed now
    /// (a survey under 30 s old is reused unless `fresh` or the servers
    /// listed have changed since), without waiting for blocks that have
    /// no server, and selected over as the next generation would select.
    pub async fn report(&self, fresh: bool) -> Result<crate::nodes::ModelReport, SherpaError> {
        let mut cached = match fresh {
            true => None,
            false => self
                .survey
                .lock()
                .await
                .clone()
                .filter(|(at, _)| at.elapsed() < SURVEY_MAX_AGE),
        };
        if let Some((_, survey)) = &cached {
            // A listing is cheap; measuring every server is not.
            let listing = self
                .node
                .list_servers(&self.model, swarm_dht::now_ms())
                .await?;
            let peers = |l: &swarm_dht::ServerListing| {
                l.servers.iter().map(|s| s.peer_id).collect::<HashSet<_>>()
            };
            if peers(&listing) != peers(&survey.listing) {
                cached = None;
            }
        }
        let survey = match cached {
            Some((_, survey)) => survey,
            None => {
                let survey =
                    swarm_dht::survey(&self.node, &self.model, &self.survey_options).await?;
                *self.survey.lock().await = Some((Instant::now(), survey.clone()));
                survey
            }
        };
        let overrides = self.overrides(&survey)?;
        crate::nodes::ModelReport::new(self.model.clone(), survey, &self.policy, overrides)
    }

    /// The user's pins and exclusions among `survey`'s servers.
    fn overrides(&self, survey: &Survey) -> Result<Overrides, SherpaError> {
        let (choice, strict) = self.node_choice_and_strictness();
        choice.overrides(survey, strict)
    }

    /// Forgets the last survey, so the next generation looks again.
    pub async fn forget_survey(&self) {
        *self.survey.lock().await = None;
    }

    /// Opens a session for up to `max_length` positions over the planned
    /// route through the blocks the client does not run itself.
    pub async fn session(&self, max_length: usize) -> Result<InferenceSession, SherpaError> {
        self.session_with(self.session.clone().with_max_length(max_length as u32))
            .await
    }

    /// The settings its sessions open with ([`ClientBuilder::session`]).
    pub fn session_options(&self) -> &SessionOptions {
        &self.session
    }

    /// [`Client::session`] with other settings for this session alone
    /// (e.g. relaying instead of push), `max_length` included.
    pub async fn session_with(
        &self,
        options: SessionOptions,
    ) -> Result<InferenceSession, SherpaError> {
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
        let output = crate::generate::generate(
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
            final_route: session.route(),
            hop_latencies: session.hop_latencies(),
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

//! What a client learns about a model's servers before choosing among
//! them: the verified listing, its own ping to each server, and (when
//! asked) the bandwidth it measures to each.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use swarm_core::{BlockRange, ModelId};
use swarm_score::{Candidate, ServerId};

use crate::catalog::{served_models, ServedModel};
use crate::error::DhtError;
use crate::node::{ListedServer, Node, ServerListing};
use crate::probe::Bandwidth;
use crate::{now_ms, PeerId};

/// How thoroughly to survey.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SurveyOptions {
    /// Longest time to wait for the listing to settle (lookups also find
    /// and connect peers; mDNS answers take a second or two).
    pub settle: Duration,
    /// Bytes each way of a bandwidth probe per server; `None` uses the
    /// servers' own figures.
    pub probe_bytes: Option<u32>,
    /// Longest time to wait for a ping from every server.
    pub ping_wait: Duration,
}

impl Default for SurveyOptions {
    /// Settles within 4 s, probes 256 KiB each way, waits up to 3 s for pings.
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(4),
            probe_bytes: Some(256 << 10),
            ping_wait: Duration::from_secs(3),
        }
    }
}

impl SurveyOptions {
    /// One listing, no probes, a short wait for pings: for re-planning
    /// in the middle of a generation.
    pub fn quick() -> Self {
        Self {
            settle: Duration::ZERO,
            probe_bytes: None,
            ping_wait: Duration::from_millis(300),
        }
    }
}

/// A model's servers as one client sees them.
#[derive(Debug, Clone, Default)]
pub struct Survey {
    /// The verified listing.
    pub listing: ServerListing,
    /// One candidate per listed server, in the listing's order.
    pub candidates: Vec<Candidate>,
    /// How this node reached each listed server.
    pub reach: HashMap<PeerId, Reach>,
}

/// How a node reached a server when it surveyed it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reach {
    /// On a direct connection.
    Direct,
    /// Only through a relay.
    Relayed,
    /// Not at all: why.
    Unreachable(String),
}

impl Reach {
    /// `direct`, `relayed` or `unreachable`.
    pub fn path(&self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
            Self::Unreachable(_) => "unreachable",
        }
    }

    /// What a user can do about it, when there is something.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Direct => None,
            Self::Relayed => Some(
                "reached through the tracker's relay: hole punching did not (yet) give a direct \
                 connection; a forwarded port or `--listen` on a public address makes it direct",
            ),
            Self::Unreachable(_) => Some(
                "its record is valid but no connection came up: the server may be behind a NAT \
                 without a relay (`serve --relay always`), firewalled, or just gone",
            ),
        }
    }
}

impl Survey {
    /// The listed server with identity `id`.
    pub fn server(&self, id: &ServerId) -> Option<&ListedServer> {
        self.listing
            .servers
            .iter()
            .find(|s| &s.info.public_key == id)
    }

    /// The peer id of the server with identity `id`.
    pub fn peer_of(&self, id: &ServerId) -> Option<PeerId> {
        self.server(id).map(|s| s.peer_id)
    }

    /// The identities of listed servers named (by public name or peer id)
    /// in `names`; a name matching nothing is an error.
    pub fn ids_named(&self, names: &[String]) -> Result<HashSet<ServerId>, DhtError> {
        let mut ids = HashSet::new();
        for name in names {
            let before = ids.len();
            ids.extend(self.named(name));
            if ids.len() == before {
                return Err(DhtError::UnknownServer(name.clone()));
            }
        }
        Ok(ids)
    }

    /// The identities of listed servers named in `names`, ignoring names
    /// that match no listed server (e.g. a saved choice naming servers
    /// that have left).
    pub fn ids_listed(&self, names: &[String]) -> HashSet<ServerId> {
        names.iter().flat_map(|name| self.named(name)).collect()
    }

    /// Listed servers whose public name or peer id is `name`.
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = ServerId> + 'a {
        self.listing
            .servers
            .iter()
            .filter(move |s| s.info.public_name == name || s.peer_id.to_string() == name)
            .map(|s| s.info.public_key)
    }

    /// The model's block count, as most servers report it (0 when none).
    pub fn model_blocks(&self) -> u32 {
        self.listing.model_blocks()
    }
}

/// Lists `model`'s servers, pings each, probes their bandwidth if asked,
/// and turns them into candidates for selection and routing.
pub async fn survey(
    node: &Node,
    model: &ModelId,
    options: &SurveyOptions,
) -> Result<Survey, DhtError> {
    let listing = settled_listing(node, model, options.settle).await?;
    let (pings, unreached) = connect_and_ping(node, &listing, options.ping_wait).await?;
    let probes = match options.probe_bytes {
        Some(bytes) => measure_bandwidth(node, &listing, bytes).await,
        None => HashMap::new(),
    };
    let candidates = listing
        .servers
        .iter()
        .map(|s| {
            let c = Candidate::from_info(&s.info, pings.get(&s.peer_id).copied());
            match probes.get(&s.peer_id) {
                Some(b) => c.with_probe(b.upload_bps, b.download_bps),
                None => c,
            }
        })
        .collect();
    let mut reach = HashMap::new();
    for server in &listing.servers {
        let peer = server.peer_id;
        let how = match unreached.get(&peer) {
            Some(error) => Reach::Unreachable(error.clone()),
            None if node.direct_ip(peer).await?.is_some() => Reach::Direct,
            None => Reach::Relayed,
        };
        reach.insert(peer, how);
    }
    Ok(Survey {
        listing,
        candidates,
        reach,
    })
}

/// Looks until two lookups a moment apart agree, or `settle` has passed.
pub async fn settled_listing(
    node: &Node,
    model: &ModelId,
    settle: Duration,
) -> Result<ServerListing, DhtError> {
    let deadline = Instant::now() + settle;
    let mut listing = node.list_servers(model, now_ms()).await?;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let again = node.list_servers(model, now_ms()).await?;
        let settled = again.servers.len() == listing.servers.len() && !again.servers.is_empty();
        if again.servers.len() >= listing.servers.len() {
            listing = again;
        }
        if settled {
            break;
        }
    }
    Ok(listing)
}

/// Probes every listed server's bandwidth at once; failures are left out.
pub async fn measure_bandwidth(
    node: &Node,
    listing: &ServerListing,
    bytes: u32,
) -> HashMap<PeerId, Bandwidth> {
    let mut probes = tokio::task::JoinSet::new();
    for server in &listing.servers {
        let (node, peer) = (node.clone(), server.peer_id);
        probes.spawn(async move { (peer, node.probe(peer, bytes).await) });
    }
    let mut found = HashMap::new();
    while let Some(done) = probes.join_next().await {
        match done {
            Ok((peer, Ok(bandwidth))) => {
                found.insert(peer, bandwidth);
            }
            Ok((peer, Err(e))) => tracing::debug!(%peer, error = %e, "bandwidth probe failed"),
            Err(e) => tracing::debug!(error = %e, "bandwidth probe task failed"),
        }
    }
    found
}

/// Connects to every listed server (directly or through a relay) and
/// waits up to `wait` for a ping to each one reached.
pub async fn measure_pings(
    node: &Node,
    listing: &ServerListing,
    wait: Duration,
) -> Result<HashMap<PeerId, Duration>, DhtError> {
    Ok(connect_and_ping(node, listing, wait).await?.0)
}

/// [`measure_pings`], also returning why each server that could not be
/// connected was not.
async fn connect_and_ping(
    node: &Node,
    listing: &ServerListing,
    wait: Duration,
) -> Result<(HashMap<PeerId, Duration>, HashMap<PeerId, String>), DhtError> {
    let mut connects = tokio::task::JoinSet::new();
    for server in &listing.servers {
        let (node, peer, name) = (
            node.clone(),
            server.peer_id,
            server.info.public_name.clone(),
        );
        connects.spawn(async move {
            let result = node.connect(peer, Vec::new()).await;
            if let Err(e) = &result {
                tracing::warn!(%peer, error = %e, "cannot reach server {name}");
            }
            (peer, result.map_err(|e| e.to_string()))
        });
    }
    let mut reached = HashSet::new();
    let mut unreached = HashMap::new();
    while let Some(done) = connects.join_next().await {
        match done {
            Ok((peer, Ok(()))) => {
                reached.insert(peer);
            }
            Ok((peer, Err(e))) => {
                unreached.insert(peer, e);
            }
            Err(e) => tracing::debug!(error = %e, "a connect task failed"),
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        let pings = node.pings().await?;
        if reached.iter().all(|p| pings.contains_key(p)) || Instant::now() > deadline {
            return Ok((pings, unreached));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A model's blocks that have no host yet, while a survey waits for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostWait {
    /// The model.
    pub model: ModelId,
    /// Blocks no listed server hosts; empty when no server of the model is
    /// listed at all (its block count is then unknown).
    pub missing: Vec<BlockRange>,
    /// Servers of the model listed so far.
    pub servers: usize,
    /// How long the survey waits at most.
    pub limit: Duration,
    /// When no server of the model is listed: the models the swarm does
    /// serve.
    pub serving: Vec<ServedModel>,
}

impl std::fmt::Display for HostWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let limit = self.limit.as_secs_f64();
        if self.servers == 0 {
            write!(f, "no servers of {} yet", self.model)?;
            if !self.serving.is_empty() {
                write!(f, " (the swarm serves {})", list(&self.serving))?;
            }
            write!(f, "; waiting up to {limit:.0} s for some")
        } else {
            write!(
                f,
                "blocks {} of {} have no host yet ({} server{} listed); waiting up to {limit:.0} s for them",
                list(&self.missing),
                self.model,
                self.servers,
                if self.servers == 1 { "" } else { "s" }
            )
        }
    }
}

/// `items` joined by ", ".
pub(crate) fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Blocks of `span` (of the model's whole block count when `None`) that no
/// listed server hosts. `None` when every block has a host; `Some` of an
/// empty list when no server is listed and `span` is `None` (nothing
/// tells how many blocks the model has).
pub fn unhosted(listing: &ServerListing, span: Option<BlockRange>) -> Option<Vec<BlockRange>> {
    let end = match span {
        Some(span) => span.end(),
        None => match listing.model_blocks() {
            0 => return Some(Vec::new()),
            blocks => blocks,
        },
    };
    let start = span.map_or(0, |s| s.start());
    let hosted: Vec<BlockRange> = listing.servers.iter().map(|s| s.info.blocks).collect();
    let missing: Vec<BlockRange> = swarm_score::uncovered_blocks(end, &hosted)
        .into_iter()
        .filter_map(|gap| BlockRange::new(gap.start().max(start), gap.end()).ok())
        .collect();
    (!missing.is_empty()).then_some(missing)
}

/// [`survey`], waiting up to `wait` for servers of every block of `span`
/// (the model's whole block count when `None`) to be listed: servers
/// started a moment before the client may not have announced yet.
/// `on_wait` hears what is missing when the wait starts and whenever that
/// changes. After `wait` it returns what it found; the caller decides
/// what missing blocks mean.
pub async fn survey_hosted(
    node: &Node,
    model: &ModelId,
    options: &SurveyOptions,
    span: Option<BlockRange>,
    wait: Duration,
    on_wait: &mut (dyn FnMut(&HostWait) + Send),
) -> Result<Survey, DhtError> {
    let deadline = Instant::now() + wait;
    let found = survey(node, model, options).await?;
    wait_for_hosts(node, model, options, found, span, deadline, wait, on_wait).await
}

/// The waiting half of [`survey_hosted`], going on from a survey the
/// caller already has (`found`) until `deadline`; `limit` is the whole
/// wait, as told to `on_wait`.
#[allow(clippy::too_many_arguments)]
pub async fn wait_for_hosts(
    node: &Node,
    model: &ModelId,
    options: &SurveyOptions,
    mut found: Survey,
    span: Option<BlockRange>,
    deadline: Instant,
    limit: Duration,
    on_wait: &mut (dyn FnMut(&HostWait) + Send),
) -> Result<Survey, DhtError> {
    let mut told: Option<(Vec<BlockRange>, usize)> = None;
    while let Some(missing) = unhosted(&found.listing, span) {
        if Instant::now() >= deadline {
            break;
        }
        let servers = found.listing.servers.len();
        if told.as_ref() != Some(&(missing.clone(), servers)) {
            let serving = if servers == 0 {
                served_models(node).await.unwrap_or_default()
            } else {
                Vec::new()
            };
            on_wait(&HostWait {
                model: model.clone(),
                missing: missing.clone(),
                servers,
                limit,
                serving,
            });
            told = Some((missing, servers));
        }
        // Listings are cheap; a full survey (pings, probes) only once the
        // listing has changed.
        tokio::time::sleep(WAIT_POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        let listing = node.list_servers(model, now_ms()).await?;
        if listing.servers.len() != found.listing.servers.len()
            || unhosted(&listing, span).is_none()
        {
            let quick = SurveyOptions {
                settle: Duration::ZERO,
                ..options.clone()
            };
            found = survey(node, model, &quick).await?;
        }
    }
    Ok(found)
}

/// How often a survey waiting for hosts lists the servers again.
const WAIT_POLL: Duration = Duration::from_millis(700);

swarm_core::with_setters!(SurveyOptions {
    settle: Duration => with_settle,
    probe_bytes: Option<u32> => with_probe_bytes,
    ping_wait: Duration => with_ping_wait,
});

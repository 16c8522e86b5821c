//! A Sherpa node: one task owns the libp2p `Swarm` (`EventLoop`); the rest
//! of the program talks to it through a cloneable [`Node`] handle over a
//! bounded channel, with replies on oneshot channels and a timeout on every
//! wait (rust-libp2p's file-sharing example, with limits).

mod behaviour;
mod config;
mod event_loop;
mod listing;
mod transport;

pub use config::{direct_bind_ip, loopback, loopback_quic, NodeConfig, RelayMode};
pub use listing::{ListedServer, Mismatch, ServerListing};

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::RecordKey;
use libp2p::swarm::SwarmEvent;
use libp2p::{multiaddr::Protocol, noise, yamux, Multiaddr, PeerId, StreamProtocol};
use swarm_core::{ModelId, ServerInfo, SignedRecord};
use tokio::sync::{mpsc, oneshot};

use crate::catalog;
use crate::error::DhtError;
use crate::keys::{block_key, keypair, model_key, peer_id_of, server_record_key};
use crate::probe;

use self::behaviour::{Behaviour, BehaviourSettings};
use self::event_loop::{Command, EventLoop};
use self::transport::{is_quic, transport};

/// What a node refused to store for others, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Records refused: not the swarm's, forged, malformed or stale.
    pub refused_records: u64,
    /// Provider entries refused: not under the swarm's keys.
    pub refused_providers: u64,
}

/// Handle to a running node. Cheap to clone; the node stops when every
/// handle is dropped or [`Node::shutdown`] is called.
#[derive(Clone)]
pub struct Node {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    timeout: Duration,
    stop: mpsc::Sender<()>,
    /// Block digests this node expects of each model's servers.
    expected: std::sync::Arc<std::sync::RwLock<HashMap<ModelId, ExpectedBlocks>>>,
}

/// The digest of every block of a model, as a client's copy of it has them.
pub type ExpectedBlocks = std::sync::Arc<Vec<[u8; 32]>>;

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a node on the current tokio runtime and dials its bootstrap
    /// peers. Returns once it is listening.
    pub async fn start(config: NodeConfig) -> Result<Self, DhtError> {
        let identity = keypair(&config.key)?;
        let peer_id = identity.public().to_peer_id();
        let ttl = config.record_ttl;
        let timeout = config.request_timeout;
        let use_mdns = config.mdns;
        let swarm_key = config.swarm_key;
        if swarm_key.is_some() {
            if let Some(addr) = config.listen.iter().find(|a| is_quic(a)) {
                return Err(DhtError::Transport(format!(
                    "cannot listen on {addr}: QUIC cannot carry a private swarm's key; listen on TCP"
                )));
            }
        }
        let relay_server = config.relay_server;
        let streams = libp2p_stream::Behaviour::new();
        let mut control = streams.new_control();
        let probes = control
            .accept(probe::PROBE_PROTOCOL)
            .map_err(|e| DhtError::Transport(e.to_string()))?;
        let catalogs = control
            .accept(catalog::CATALOG_PROTOCOL)
            .map_err(|e| DhtError::Transport(e.to_string()))?;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_other_transport(|key| {
                transport(key, swarm_key)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            })
            .map_err(|e| DhtError::Transport(e.to_string()))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| DhtError::Transport(e.to_string()))?
            .with_behaviour(
                |key, relay_client| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                    Ok(Behaviour::new(
                        key,
                        relay_client,
                        streams,
                        BehaviourSettings {
                            query_timeout: timeout,
                            record_ttl: ttl,
                            mdns: use_mdns,
                            relay_server,
                        },
                    )?)
                },
            )
            .map_err(|e| DhtError::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| DhtError::Transport(format!("cannot listen on {addr}: {e}")))?;
        }
        // Wait until every listener reports an address so callers can print
        // them; one on all interfaces reports one per interface at once.
        let mut listening = Vec::new();
        let mut early = Vec::new();
        let mut wait = timeout;
        loop {
            let Ok(event) = tokio::time::timeout(wait, swarm.select_next_some()).await else {
                if listening.len() < config.listen.len() {
                    return Err(DhtError::Timeout("listening"));
                }
                break;
            };
            match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    swarm.add_external_address(address.clone());
                    listening.push(address);
                    if listening.len() >= config.listen.len() {
                        wait = Duration::from_millis(100);
                    }
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(DhtError::Transport(format!("listening failed: {error}")));
                }
                // mDNS may find peers already; the event loop handles them.
                other => early.push(other),
            }
        }
        for addr in &config.bootstrap {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                return Err(DhtError::Transport(format!(
                    "bootstrap address {addr} must end with /p2p/<peer id>"
                )));
            };
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            swarm
                .dial(addr.clone())
                .map_err(|e| DhtError::Transport(format!("cannot dial {addr}: {e}")))?;
        }
        // Join: a Kademlia bootstrap fills the routing table before anything
        // is published, so the first records land on the nodes closest to
        // their keys rather than on whichever few peers were known.
        let (joined_tx, joined) = oneshot::channel();
        let joining = if config.bootstrap.is_empty() {
            let _ = joined_tx.send(Ok(()));
            None
        } else {
            let id = swarm
                .behaviour_mut()
                .kad
                .bootstrap()
                .map_err(|e| DhtError::Transport(format!("cannot join: {e}")))?;
            Some((id, joined_tx))
        };
        let (commands, rx) = mpsc::channel(256);
        let (stop, stop_rx) = mpsc::channel(1);
        let event_loop = EventLoop {
            swarm,
            commands: rx,
            stop: stop_rx,
            listening,
            joining,
            relay_mode: config.relay,
            relays: config.bootstrap.clone(),
            relayed: false,
            dials: HashMap::new(),
            finding: HashMap::new(),
            stats: NodeStats::default(),
            record_ttl: ttl,
            provided_at: HashMap::new(),
            puts: HashMap::new(),
            providers: HashMap::new(),
            records: HashMap::new(),
            pings: HashMap::new(),
            direct_ips: HashMap::new(),
            tasks: Vec::new(),
        };
        tokio::spawn(event_loop.run(early));
        tokio::spawn(probe::serve_probes(probes));
        let node = Self {
            peer_id,
            control,
            commands,
            timeout,
            stop,
            expected: Default::default(),
        };
        // The catalog task's handle is weak: dropping every `Node` still
        // stops the node.
        tokio::spawn(catalog::serve_catalogs(catalogs, node.downgrade()));
        let joined = tokio::time::timeout(timeout, joined)
            .await
            .map_err(|_| DhtError::Timeout("joining through the bootstrap peers"))
            .and_then(|r| r.map_err(|_| DhtError::Stopped))
            .and_then(|r| r);
        if let Err(e) = joined {
            node.shutdown().await;
            return Err(e);
        }
        Ok(node)
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        what: &'static str,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, DhtError> {
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout(self.timeout, self.commands.send(make(tx)))
            .await
            .map_err(|_| DhtError::Timeout(what))?
            .map_err(|_| DhtError::Stopped)?;
        // Kademlia queries end on their own after `timeout` with what they
        // found; the reply gets a little longer, so they always can.
        tokio::time::timeout(self.timeout + REPLY_GRACE, rx)
            .await
            .map_err(|_| DhtError::Timeout(what))?
            .map_err(|_| DhtError::Stopped)
    }

    /// Addresses the node listens on, each ending in `/p2p/<peer id>`.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, DhtError> {
        self.ask("listen addresses", Command::ListenAddrs).await
    }

    /// Publishes `record` (signed by this node) under its model, and
    /// provides the model key and the key of every block it hosts so
    /// lookups find this node.
    pub async fn announce(&self, record: &SignedRecord, info: &ServerInfo) -> Result<(), DhtError> {
        if peer_id_of(&info.public_key)? != self.peer_id {
            return Err(DhtError::Transport("record is not this node's".into()));
        }
        self.put(&info.model, record.to_bytes()?, provided_keys(info))
            .await
    }

    /// Replaces this node's record for `model` with `tombstone` (an already
    /// expired record) and stops providing the model, so lookups drop it now
    /// rather than at expiry.
    pub async fn withdraw(
        &self,
        model: &ModelId,
        tombstone: &SignedRecord,
    ) -> Result<(), DhtError> {
        let info: ServerInfo = swarm_core::codec::decode(&tombstone.body)?;
        if peer_id_of(&info.public_key)? != self.peer_id || &info.model != model {
            return Err(DhtError::Transport(
                "tombstone is not this node's record for the model".into(),
            ));
        }
        let _ = self
            .commands
            .try_send(Command::StopProviding(provided_keys(&info)));
        self.put(model, tombstone.to_bytes()?, Vec::new()).await
    }

    /// Publishes arbitrary bytes as this node's record for `model` and
    /// provides the model, with no check at all. Exists to test that other
    /// nodes' lookups reject what a hostile node can publish; lookups verify
    /// every record, so it cannot mislead them.
    pub async fn publish_unverified_record(
        &self,
        model: &ModelId,
        value: Vec<u8>,
    ) -> Result<(), DhtError> {
        self.put(model, value, vec![model_key(model)]).await
    }

    async fn put(
        &self,
        model: &ModelId,
        value: Vec<u8>,
        provide: Vec<RecordKey>,
    ) -> Result<(), DhtError> {
        let key = server_record_key(model, &self.peer_id);
        self.ask("publish", |reply| Command::PutRecord {
            key,
            value,
            provide,
            reply,
        })
        .await?
    }

    /// Lists the servers of `model` with verified records. `now_ms` is the
    /// current time in ms since the Unix epoch.
    ///
    /// Asks the model's provider key first, learns the model's block count
    /// from the records found (the count most of them agree on), then asks
    /// every block's provider key and fetches the records of servers not
    /// seen yet, so no server hides behind Kademlia's per-answer limit.
    pub async fn list_servers(
        &self,
        model: &ModelId,
        now_ms: u64,
    ) -> Result<ServerListing, DhtError> {
        let mut listing = ServerListing::default();
        let mut seen = HashSet::new();
        let first = self.providers(model_key(model)).await?;
        self.fetch_records(model, first, now_ms, &mut seen, &mut listing)
            .await?;
        let blocks = listing.model_blocks();
        let per_block = futures::stream::iter(0..blocks)
            .map(|block| self.providers(block_key(model, block)))
            .buffer_unordered(LOOKUP_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut more = HashSet::new();
        for found in per_block {
            more.extend(found?);
        }
        self.fetch_records(model, more, now_ms, &mut seen, &mut listing)
            .await?;
        listing.servers.sort_by(|a, b| {
            (a.info.blocks.start(), a.peer_id).cmp(&(b.info.blocks.start(), b.peer_id))
        });
        if let Some(expected) = self.expected_blocks(model) {
            listing.keep_matching(&expected);
        }
        Ok(listing)
    }

    /// From now on, lists only servers of `model` whose blocks have these
    /// digests (one per block of the model); the others are set apart in
    /// [`ServerListing::mismatched`] with the reason.
    pub fn expect_blocks(&self, model: ModelId, digests: Vec<[u8; 32]>) {
        let mut expected = self
            .expected
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        expected.insert(model, std::sync::Arc::new(digests));
    }

    /// The digests set with [`Node::expect_blocks`].
    pub fn expected_blocks(&self, model: &ModelId) -> Option<ExpectedBlocks> {
        self.expected
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .cloned()
    }

    async fn providers(&self, key: RecordKey) -> Result<HashSet<PeerId>, DhtError> {
        self.ask("provider lookup", |reply| Command::GetProviders(key, reply))
            .await
    }

    /// Fetches and verifies the records of `peers` not in `seen` yet.
    async fn fetch_records(
        &self,
        model: &ModelId,
        peers: HashSet<PeerId>,
        now_ms: u64,
        seen: &mut HashSet<PeerId>,
        listing: &mut ServerListing,
    ) -> Result<(), DhtError> {
        let fresh: Vec<PeerId> = peers.into_iter().filter(|p| seen.insert(*p)).collect();
        let found = futures::stream::iter(fresh)
            .map(|peer| async move {
                let key = server_record_key(model, &peer);
                let bytes = self
                    .ask("record lookup", |reply| Command::GetRecord(key, reply))
                    .await;
                (peer, bytes)
            })
            .buffer_unordered(LOOKUP_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (peer, found) in found {
            match found {
                Ok(Some(bytes)) => listing.add(model, peer, &bytes, now_ms),
                Ok(None) | Err(DhtError::Timeout(_)) => listing.missing += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Connects to `peer` at `addrs` or at the addresses the DHT knows
    /// (directly or through a relay); returns once connected.
    pub async fn connect(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), DhtError> {
        self.ask("connecting", |reply| Command::Connect(peer, addrs, reply))
            .await?
    }

    /// Measures the bandwidth to `peer` by moving `bytes` each way (capped
    /// at [`probe::MAX_PROBE_BYTES`]).
    pub async fn probe(&self, peer: PeerId, bytes: u32) -> Result<probe::Bandwidth, DhtError> {
        let stream = self.open_stream(peer, probe::PROBE_PROTOCOL).await?;
        probe::run_probe(stream, bytes, self.timeout).await
    }

    /// The address of this node's direct (not relayed) connection to
    /// `peer`, if it has one.
    pub(crate) async fn direct_ip(&self, peer: PeerId) -> Result<Option<IpAddr>, DhtError> {
        self.ask("a peer's address", |reply| Command::DirectIp(peer, reply))
            .await
    }

    /// Ties `task` to the node: it is aborted when the node stops (at once,
    /// if it has stopped already).
    pub async fn tie(&self, task: tokio::task::JoinHandle<()>) -> Result<(), DhtError> {
        let abort = task.abort_handle();
        let sent = tokio::time::timeout(self.timeout, self.commands.send(Command::Tie(task))).await;
        if !matches!(sent, Ok(Ok(()))) {
            abort.abort();
            return Err(DhtError::Stopped);
        }
        Ok(())
    }

    /// Accepts inbound streams of `protocol`, for an application's own
    /// protocols on the swarm's encrypted connections; fails when something
    /// already accepts it.
    pub fn accept(
        &self,
        protocol: StreamProtocol,
    ) -> Result<libp2p_stream::IncomingStreams, DhtError> {
        self.control
            .clone()
            .accept(protocol.clone())
            .map_err(|e| DhtError::Transport(format!("cannot accept {protocol}: {e}")))
    }

    /// A handle that does not keep the node running.
    pub(crate) fn downgrade(&self) -> WeakNode {
        WeakNode {
            commands: self.commands.downgrade(),
            timeout: self.timeout,
        }
    }

    /// The models this node holds live server records of.
    pub async fn local_catalog(&self) -> Result<swarm_core::catalog::Catalog, DhtError> {
        self.ask("the local catalog", Command::Catalog).await
    }

    /// The peers this node is connected to now.
    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, DhtError> {
        self.ask("connected peers", Command::ConnectedPeers).await
    }

    /// How long a request to another node may take.
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// Connects to `peer` and opens a stream of `protocol` to it.
    pub(crate) async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, DhtError> {
        self.connect(peer, Vec::new()).await?;
        let mut control = self.control.clone();
        tokio::time::timeout(self.timeout, control.open_stream(peer, protocol.clone()))
            .await
            .map_err(|_| DhtError::Timeout("opening a stream"))?
            .map_err(|e| DhtError::Transport(format!("cannot open {protocol} to {peer}: {e}")))
    }

    /// What this node refused to store for others.
    pub async fn stats(&self) -> Result<NodeStats, DhtError> {
        self.ask("stats", Command::Stats).await
    }

    /// Round-trip times measured to connected peers.
    pub async fn pings(&self) -> Result<HashMap<PeerId, Duration>, DhtError> {
        self.ask("pings", Command::Pings).await
    }

    /// Stops the node now; its connections close.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(()).await;
    }
}

/// A [`Node`] handle for the node's own tasks: it does not keep the node
/// running, so dropping every [`Node`] still stops it.
#[derive(Clone)]
pub(crate) struct WeakNode {
    commands: mpsc::WeakSender<Command>,
    timeout: Duration,
}

impl WeakNode {
    /// [`Node::local_catalog`], while the node runs.
    pub(crate) async fn local_catalog(&self) -> Result<swarm_core::catalog::Catalog, DhtError> {
        let (tx, rx) = oneshot::channel();
        let commands = self.commands.upgrade().ok_or(DhtError::Stopped)?;
        tokio::time::timeout(self.timeout, commands.send(Command::Catalog(tx)))
            .await
            .map_err(|_| DhtError::Timeout("the local catalog"))?
            .map_err(|_| DhtError::Stopped)?;
        drop(commands);
        tokio::time::timeout(self.timeout, rx)
            .await
            .map_err(|_| DhtError::Timeout("the local catalog"))?
            .map_err(|_| DhtError::Stopped)
    }
}

/// How much longer than a Kademlia query a caller waits for its answer.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Lookups a listing runs at once.
const LOOKUP_CONCURRENCY: usize = 64;

/// The provider keys a server of `info` announces itself under.
fn provided_keys(info: &ServerInfo) -> Vec<RecordKey> {
    std::iter::once(model_key(&info.model))
        .chain(info.blocks.iter().map(|b| block_key(&info.model, b)))
        .collect()
}

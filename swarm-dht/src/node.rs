//! A Sherpa node: one task owns the libp2p `Swarm` ([`EventLoop`]); the rest
//! of the program talks to it through a cloneable [`Node`] handle over a
//! bounded channel, with replies on oneshot channels and a timeout on every
//! wait (rust-libp2p's file-sharing example, with limits).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{
    self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum, Record, RecordKey,
};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    identify, mdns, multiaddr::Protocol, noise, ping, tcp, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm,
};
use swarm_core::{ModelId, NodeKey, ServerInfo, SignedRecord};
use tokio::sync::{mpsc, oneshot};

use crate::error::DhtError;
use crate::keys::{block_key, keypair, model_key, peer_id_of, server_record_key};
use crate::KAD_PROTOCOL;

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's identity.
    pub key: NodeKey,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through (a tracker), each with its `/p2p/<id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// How long to wait for any network operation.
    pub request_timeout: Duration,
    /// How long records and provider entries live in the DHT.
    pub record_ttl: Duration,
    /// Find and pair with Sherpa nodes on the local network by mDNS. It
    /// multicasts on every interface the node can see, so turn it on only
    /// on a LAN you mean to share.
    pub mdns: bool,
}

impl NodeConfig {
    /// Listens on a random loopback TCP port, no bootstrap peers, 10 s
    /// requests, 2-minute records.
    pub fn new(key: NodeKey) -> Self {
        Self {
            key,
            listen: vec![loopback()],
            bootstrap: Vec::new(),
            request_timeout: Duration::from_secs(10),
            record_ttl: Duration::from_secs(120),
            mdns: false,
        }
    }

    /// Turns LAN discovery by mDNS on or off.
    pub fn with_mdns(mut self, mdns: bool) -> Self {
        self.mdns = mdns;
        self
    }

    /// Sets the listen addresses.
    pub fn with_listen(mut self, listen: Vec<Multiaddr>) -> Self {
        self.listen = listen;
        self
    }

    /// Sets the bootstrap peers.
    pub fn with_bootstrap(mut self, bootstrap: Vec<Multiaddr>) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    /// Sets the DHT record lifetime.
    pub fn with_record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = ttl;
        self
    }

    /// Sets the request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// `/ip4/127.0.0.1/tcp/0`.
pub fn loopback() -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
        .with(Protocol::Tcp(0))
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    PutRecord {
        key: RecordKey,
        value: Vec<u8>,
        provide: Vec<RecordKey>,
        reply: oneshot::Sender<Result<(), DhtError>>,
    },
    StopProviding(Vec<RecordKey>),
    GetProviders(RecordKey, oneshot::Sender<HashSet<PeerId>>),
    GetRecord(RecordKey, oneshot::Sender<Option<Vec<u8>>>),
    Pings(oneshot::Sender<HashMap<PeerId, Duration>>),
}

/// A server found in the DHT, with its verified record.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedServer {
    /// Its peer id.
    pub peer_id: PeerId,
    /// What it announced (signature, publisher and expiry checked).
    pub info: ServerInfo,
}

/// What a lookup found, including what it had to throw away.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerListing {
    /// Servers with valid records, sorted by first block then peer id.
    pub servers: Vec<ListedServer>,
    /// Records that failed verification (bad signature, malformed, wrong
    /// model or peer).
    pub rejected: usize,
    /// Records past their expiry (servers that died or left).
    pub expired: usize,
    /// Providers whose record could not be fetched.
    pub missing: usize,
}

/// Handle to a running node. Cheap to clone; the node stops when every
/// handle is dropped or [`Node::shutdown`] is called.
#[derive(Debug, Clone)]
pub struct Node {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    timeout: Duration,
    stop: mpsc::Sender<()>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
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
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| DhtError::Transport(e.to_string()))?
            .with_behaviour(|key| {
                let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                kad_config
                    .set_query_timeout(timeout)
                    .set_record_ttl(Some(ttl))
                    .set_provider_record_ttl(Some(ttl * 2))
                    .set_publication_interval(None)
                    .set_provider_publication_interval(None)
                    .set_max_packet_size(swarm_core::codec::MAX_CONTROL_MESSAGE * 2);
                let store = MemoryStore::with_config(
                    key.public().to_peer_id(),
                    MemoryStoreConfig {
                        max_records: 65_536,
                        max_value_bytes: swarm_core::codec::MAX_CONTROL_MESSAGE,
                        max_providers_per_key: 4096,
                        max_provided_keys: 1024,
                    },
                );
                let mut kad =
                    kad::Behaviour::with_config(key.public().to_peer_id(), store, kad_config);
                // Every Sherpa node serves the DHT: loopback and LAN nodes
                // never get the external-address confirmation that would
                // switch kad to server mode by itself.
                kad.set_mode(Some(kad::Mode::Server));
                let mdns = if use_mdns {
                    let config = mdns::Config {
                        query_interval: Duration::from_secs(10),
                        ..mdns::Config::default()
                    };
                    Some(mdns::tokio::Behaviour::new(
                        config,
                        key.public().to_peer_id(),
                    )?)
                } else {
                    None
                };
                Ok(Behaviour {
                    kad,
                    identify: identify::Behaviour::new(identify::Config::new(
                        format!("/sherpa/{}", swarm_core::codec::WIRE_VERSION),
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(
                        ping::Config::new().with_interval(Duration::from_secs(5)),
                    ),
                    mdns: Toggle::from(mdns),
                })
            })
            .map_err(|e| DhtError::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
            .build();
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| DhtError::Transport(format!("cannot listen on {addr}: {e}")))?;
        }
        // Wait for the first listen address so callers can print it.
        let mut listening = Vec::new();
        while listening.len() < config.listen.len() {
            let event = tokio::time::timeout(timeout, swarm.select_next_some())
                .await
                .map_err(|_| DhtError::Timeout("listening"))?;
            if let SwarmEvent::NewListenAddr { address, .. } = event {
                swarm.add_external_address(address.clone());
                listening.push(address);
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
            let _ = joined_tx.send(());
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
            puts: HashMap::new(),
            providers: HashMap::new(),
            records: HashMap::new(),
            pings: HashMap::new(),
        };
        tokio::spawn(event_loop.run());
        tokio::time::timeout(timeout, joined)
            .await
            .map_err(|_| DhtError::Timeout("joining through the bootstrap peers"))?
            .map_err(|_| DhtError::Stopped)?;
        Ok(Self {
            peer_id,
            commands,
            timeout,
            stop,
        })
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
        tokio::time::timeout(self.timeout, rx)
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
        let blocks = most_common_model_blocks(&listing.servers);
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
        Ok(listing)
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

    /// Round-trip times measured to connected peers.
    pub async fn pings(&self) -> Result<HashMap<PeerId, Duration>, DhtError> {
        self.ask("pings", Command::Pings).await
    }

    /// Stops the node now; its connections close.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(()).await;
    }
}

/// Lookups a listing runs at once.
const LOOKUP_CONCURRENCY: usize = 64;

/// The provider keys a server of `info` announces itself under.
fn provided_keys(info: &ServerInfo) -> Vec<RecordKey> {
    std::iter::once(model_key(&info.model))
        .chain(info.blocks.iter().map(|b| block_key(&info.model, b)))
        .collect()
}

/// The model size most listed servers agree on (a lone liar cannot make a
/// client query thousands of keys), 0 when nothing is listed.
fn most_common_model_blocks(servers: &[ListedServer]) -> u32 {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for server in servers {
        *counts.entry(server.info.model_blocks).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(blocks, count)| (count, std::cmp::Reverse(blocks)))
        .map_or(0, |(blocks, _)| blocks)
}

impl ServerListing {
    /// Verifies `bytes` as `peer`'s record for `model` and files it.
    fn add(&mut self, model: &ModelId, peer: PeerId, bytes: &[u8], now_ms: u64) {
        let verified = SignedRecord::from_bytes(bytes).and_then(|r| r.verify(None, now_ms));
        match verified {
            Ok(record) => {
                let info = record.into_info();
                let genuine = peer_id_of(&info.public_key)
                    .map(|id| id == peer)
                    .unwrap_or(false);
                if genuine && &info.model == model {
                    self.servers.push(ListedServer {
                        peer_id: peer,
                        info,
                    });
                } else {
                    self.rejected += 1;
                }
            }
            Err(swarm_core::CoreError::ExpiredRecord { .. }) => self.expired += 1,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "dropped a server record");
                self.rejected += 1;
            }
        }
    }
}

type Reply<T> = oneshot::Sender<T>;

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    stop: mpsc::Receiver<()>,
    listening: Vec<Multiaddr>,
    /// The bootstrap query [`Node::start`] waits for.
    joining: Option<(QueryId, Reply<()>)>,
    puts: HashMap<QueryId, Reply<Result<(), DhtError>>>,
    providers: HashMap<QueryId, (HashSet<PeerId>, Reply<HashSet<PeerId>>)>,
    records: HashMap<QueryId, Reply<Option<Vec<u8>>>>,
    pings: HashMap<PeerId, Duration>,
}

impl EventLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = self.stop.recv() => break,
                event = self.swarm.select_next_some() => self.on_event(event),
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        let local = *self.swarm.local_peer_id();
        let kad = &mut self.swarm.behaviour_mut().kad;
        match command {
            Command::ListenAddrs(reply) => {
                let addrs = self
                    .listening
                    .iter()
                    .map(|a| a.clone().with(Protocol::P2p(local)))
                    .collect();
                let _ = reply.send(addrs);
            }
            Command::PutRecord {
                key,
                value,
                provide,
                reply,
            } => {
                for key in provide {
                    if let Err(e) = kad.start_providing(key) {
                        let _ =
                            reply.send(Err(DhtError::Transport(format!("cannot provide: {e}"))));
                        return;
                    }
                }
                let mut record = Record::new(key, value);
                record.publisher = Some(local);
                match kad.put_record(record, Quorum::One) {
                    Ok(id) => {
                        self.puts.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(DhtError::Transport(format!(
                            "cannot store record: {e}"
                        ))));
                    }
                }
            }
            Command::StopProviding(keys) => {
                for key in keys {
                    kad.stop_providing(&key);
                }
            }
            Command::GetProviders(key, reply) => {
                // Our own provider entries count too.
                let mut found = HashSet::new();
                if kad.store_mut().provided().any(|p| p.key == key) {
                    found.insert(local);
                }
                let id = kad.get_providers(key);
                self.providers.insert(id, (found, reply));
            }
            Command::GetRecord(key, reply) => {
                let id = kad.get_record(key);
                self.records.insert(id, reply);
            }
            Command::Pings(reply) => {
                let _ = reply.send(self.pings.clone());
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                self.swarm.add_external_address(address.clone());
                self.listening.push(address)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            }))
                // Tell kad where DHT peers can be reached.
                if info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL) => {
                    for addr in info.listen_addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.pings.insert(peer, rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                // Pair with every Sherpa node on the link: make it a DHT
                // neighbour and connect.
                let local = *self.swarm.local_peer_id();
                for (peer, addr) in found {
                    if peer == local {
                        continue;
                    }
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        if let Err(e) = self.swarm.dial(addr) {
                            tracing::debug!(%peer, error = %e, "dialing an mDNS peer failed");
                        }
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.pings.remove(&peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => self.on_query(id, result, step.last),
            _ => {}
        }
    }

    fn on_query(&mut self, id: QueryId, result: QueryResult, last: bool) {
        match result {
            QueryResult::Bootstrap(outcome) => {
                if let Err(e) = outcome {
                    tracing::debug!(error = %e, "a bootstrap step failed");
                }
                if last && self.joining.as_ref().is_some_and(|(q, _)| *q == id) {
                    if let Some((_, reply)) = self.joining.take() {
                        let _ = reply.send(());
                    }
                }
            }
            QueryResult::PutRecord(outcome) => {
                if let Some(reply) = self.puts.remove(&id) {
                    // With no other DHT node yet the record is still stored
                    // locally, which is what a first node of a swarm has.
                    let result = match outcome {
                        Ok(_) | Err(kad::PutRecordError::QuorumFailed { .. }) => Ok(()),
                        Err(e) => Err(DhtError::Transport(format!(
                            "storing the record failed: {e}"
                        ))),
                    };
                    let _ = reply.send(result);
                }
            }
            QueryResult::GetProviders(outcome) => {
                if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = outcome {
                    if let Some((found, _)) = self.providers.get_mut(&id) {
                        found.extend(providers);
                    }
                }
                if last {
                    if let Some((found, reply)) = self.providers.remove(&id) {
                        let _ = reply.send(found);
                    }
                }
            }
            QueryResult::GetRecord(outcome) => {
                if let Ok(GetRecordOk::FoundRecord(peer_record)) = outcome {
                    if let Some(reply) = self.records.remove(&id) {
                        let _ = reply.send(Some(peer_record.record.value));
                    }
                    if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        query.finish();
                    }
                } else if last {
                    if let Some(reply) = self.records.remove(&id) {
                        let _ = reply.send(None);
                    }
                }
            }
            _ => {}
        }
    }
}

//! A Sherpa node: one task owns the libp2p `Swarm` (`EventLoop`); the rest
//! of the program talks to it through a cloneable [`Node`] handle over a
//! bounded channel, with replies on oneshot channels and a timeout on every
//! wait (rust-libp2p's file-sharing example, with limits).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::Either;
use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::{transport, upgrade, Transport};
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{
    self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum, Record, RecordKey,
};
use libp2p::pnet::PnetConfig;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, dcutr, identify, identity, mdns, multiaddr::Protocol, noise, ping, quic, relay, tcp,
    yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
};
use swarm_core::{ModelId, NodeKey, ServerInfo, SignedRecord};
use tokio::sync::{mpsc, oneshot};

use crate::admission;
use crate::announce::now_ms;
use crate::catalog;
use crate::direct::DirectHub;
use crate::error::DhtError;
use crate::identity::SwarmKey;
use crate::keys::{block_key, keypair, model_key, peer_id_of, server_record_key};
use crate::probe;
use crate::session::{self, InferenceService, RemoteSession};
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
    /// Join only the private swarm holding this key (TCP only; see
    /// [`SwarmKey`]).
    pub swarm_key: Option<SwarmKey>,
    /// Relay circuits for other nodes (trackers do).
    pub relay_server: bool,
    /// When to make this node reachable through its bootstrap peers' relays.
    pub relay: RelayMode,
    /// The inference sessions this node serves, if it is a server.
    pub inference: Option<Arc<InferenceService>>,
}

/// When a node listens through a relay (circuit relay v2) on its bootstrap
/// peers, for peers that cannot dial it directly. Once two nodes talk
/// through a relay they try to upgrade to a direct connection (DCUtR hole
/// punching).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Never.
    Never,
    /// When AutoNAT finds the node is not reachable from outside.
    #[default]
    Auto,
    /// Always, whatever AutoNAT says.
    Always,
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
            swarm_key: None,
            relay_server: false,
            relay: RelayMode::Auto,
            inference: None,
        }
    }

    /// Serves inference sessions with `service`.
    pub fn with_inference(mut self, service: Arc<InferenceService>) -> Self {
        self.inference = Some(service);
        self
    }

    /// Joins only the private swarm of `key`.
    pub fn with_swarm_key(mut self, key: Option<SwarmKey>) -> Self {
        self.swarm_key = key;
        self
    }

    /// Relays circuits for other nodes.
    pub fn with_relay_server(mut self, on: bool) -> Self {
        self.relay_server = on;
        self
    }

    /// Sets when to listen through relays.
    pub fn with_relay(mut self, mode: RelayMode) -> Self {
        self.relay = mode;
        self
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

/// `/ip4/127.0.0.1/udp/0/quic-v1`.
pub fn loopback_quic() -> Multiaddr {
    Multiaddr::empty()
        .with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
        .with(Protocol::Udp(0))
        .with(Protocol::QuicV1)
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

/// The IP address of `addr`, unless it goes through a relay.
fn direct_ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
    streams: libp2p_stream::Behaviour,
}

type BoxedTransport = transport::Boxed<(PeerId, StreamMuxerBox)>;

/// TCP (under the swarm key when there is one) + Noise + yamux, and QUIC
/// for open swarms.
fn transport(
    key: &identity::Keypair,
    swarm_key: Option<SwarmKey>,
) -> Result<BoxedTransport, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let noise = noise::Config::new(key)?;
    let Some(swarm_key) = swarm_key else {
        let tcp = tcp
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default());
        let quic = quic::tokio::Transport::new(quic::Config::new(key));
        return Ok(tcp
            .or_transport(quic)
            .map(|either, _| match either {
                Either::Left((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
                Either::Right((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
            })
            .boxed());
    };
    let psk = swarm_key.psk();
    Ok(tcp
        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
        .upgrade(upgrade::Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

type Reply<T> = oneshot::Sender<T>;
/// A caller waiting to hear whether a connection came up.
type ConnectReply = Reply<Result<(), DhtError>>;

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
    Connect(PeerId, Vec<Multiaddr>, Reply<Result<(), DhtError>>),
    Stats(Reply<NodeStats>),
    DirectIp(PeerId, Reply<Option<IpAddr>>),
    Catalog(Reply<swarm_core::catalog::Catalog>),
    ConnectedPeers(Reply<Vec<PeerId>>),
}

/// What a node refused to store for others, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Records refused: not the swarm's, forged, malformed or stale.
    pub refused_records: u64,
    /// Provider entries refused: not under the swarm's keys.
    pub refused_providers: u64,
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
#[derive(Clone)]
pub struct Node {
    peer_id: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    timeout: Duration,
    stop: mpsc::Sender<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
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
        let sessions = match &config.inference {
            Some(service) => Some((
                service.clone(),
                control
                    .accept(session::INFER_STREAM)
                    .map_err(|e| DhtError::Transport(e.to_string()))?,
            )),
            None => None,
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
            .with_tokio()
            .with_other_transport(|key| {
                transport(key, swarm_key)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            })
            .map_err(|e| DhtError::Transport(e.to_string()))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| DhtError::Transport(e.to_string()))?
            .with_behaviour(|key, relay_client| {
                let local = key.public().to_peer_id();
                let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                kad_config
                    .set_query_timeout(timeout)
                    .set_record_ttl(Some(ttl))
                    .set_provider_record_ttl(Some(ttl * 2))
                    .set_publication_interval(None)
                    .set_provider_publication_interval(None)
                    .set_max_packet_size(swarm_core::codec::MAX_CONTROL_MESSAGE * 2)
                    // Every record and provider entry others ask this node
                    // to keep goes through `admission` first.
                    .set_record_filtering(kad::StoreInserts::FilterBoth);
                let store = MemoryStore::with_config(
                    local,
                    MemoryStoreConfig {
                        max_records: 65_536,
                        max_value_bytes: swarm_core::codec::MAX_CONTROL_MESSAGE,
                        max_providers_per_key: 4096,
                        max_provided_keys: 1024,
                    },
                );
                let mut kad = kad::Behaviour::with_config(local, store, kad_config);
                // Every Sherpa node serves the DHT: loopback and LAN nodes
                // never get the external-address confirmation that would
                // switch kad to server mode by itself.
                kad.set_mode(Some(kad::Mode::Server));
                let mdns = if use_mdns {
                    let config = mdns::Config {
                        query_interval: Duration::from_secs(10),
                        ..mdns::Config::default()
                    };
                    Some(mdns::tokio::Behaviour::new(config, local)?)
                } else {
                    None
                };
                let relay = relay_server.then(|| relay::Behaviour::new(local, relay_config()));
                Ok(Behaviour {
                    kad,
                    identify: identify::Behaviour::new(
                        identify::Config::new(
                            format!("/sherpa/{}", swarm_core::codec::WIRE_VERSION),
                            key.public(),
                        )
                        // Tell peers at once about new addresses, such as
                        // a relay circuit.
                        .with_push_listen_addr_updates(true),
                    ),
                    ping: ping::Behaviour::new(
                        ping::Config::new().with_interval(Duration::from_secs(5)),
                    ),
                    mdns: Toggle::from(mdns),
                    relay_client,
                    relay: Toggle::from(relay),
                    dcutr: dcutr::Behaviour::new(local),
                    autonat: autonat::Behaviour::new(local, autonat::Config::default()),
                    streams,
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
        // A server's direct listener for its sessions' data, on the address
        // its first TCP listener was asked for (all interfaces stay all
        // interfaces).
        let mut direct_task = None;
        if let Some((service, port)) = config
            .inference
            .as_ref()
            .and_then(|s| Some((s, s.direct_port()?)))
        {
            let ip = config
                .listen
                .iter()
                .find(|a| !is_quic(a))
                .and_then(direct_ip_of)
                .or_else(|| config.listen.iter().find_map(direct_ip_of));
            if let Some(ip) = ip {
                let (hub, task) = DirectHub::listen(ip, port).await?;
                service.set_direct(hub);
                direct_task = Some(task);
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
        let mut event_loop = EventLoop {
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
            tasks: direct_task.into_iter().collect(),
        };
        if let Some((service, incoming)) = sessions {
            event_loop.tasks.push(tokio::spawn(service.serve(incoming)));
        }
        tokio::spawn(event_loop.run(early));
        tokio::spawn(probe::serve_probes(probes));
        let node = Self {
            peer_id,
            control,
            commands,
            timeout,
            stop,
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

    /// Opens an inference session with `peer` for one hop.
    pub async fn open_session(
        &self,
        peer: PeerId,
        open: swarm_core::infer::OpenSession,
    ) -> Result<RemoteSession, DhtError> {
        // libp2p-stream hands a server one inbound stream at a time and
        // resets the ones arriving while it is busy, so a burst of opens
        // loses some before the server reads them: those are tried again.
        let mut attempt = 0;
        loop {
            let stream = self.open_stream(peer, session::INFER_STREAM).await?;
            let ip = if open.direct {
                self.ask("a peer's address", |reply| Command::DirectIp(peer, reply))
                    .await?
            } else {
                None
            };
            let mut open = open.clone();
            open.direct = ip.is_some();
            match RemoteSession::open(stream, open, ip, self.timeout).await {
                Err(DhtError::StreamLost(why)) if attempt < OPEN_RETRIES => {
                    tracing::debug!(%peer, %why, attempt, "session stream lost before an answer; retrying");
                    let jitter = rand::random_range(0..10);
                    tokio::time::sleep(Duration::from_millis((10 << attempt) + jitter)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
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

/// Limits of a tracker's relay: enough circuits for a swarm's NATed
/// servers while their peers try to hole-punch, each long and large enough
/// to carry inference traffic when the punch fails.
fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: 1024,
        max_reservations_per_peer: 4,
        max_circuits: 256,
        max_circuits_per_peer: 16,
        max_circuit_duration: Duration::from_secs(60 * 60),
        max_circuit_bytes: 1 << 30,
        ..relay::Config::default()
    }
}

/// How often opening a session is tried again when its stream is lost
/// before the server answers.
const OPEN_RETRIES: u32 = 5;

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

impl ServerListing {
    /// The model's block count most listed servers agree on (a lone liar
    /// cannot make a client query thousands of keys); 0 when none are
    /// listed.
    pub fn model_blocks(&self) -> u32 {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for server in &self.servers {
            *counts.entry(server.info.model_blocks).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|&(blocks, count)| (count, std::cmp::Reverse(blocks)))
            .map_or(0, |(blocks, _)| blocks)
    }

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

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    stop: mpsc::Receiver<()>,
    listening: Vec<Multiaddr>,
    /// The bootstrap query [`Node::start`] waits for.
    joining: Option<(QueryId, Reply<Result<(), DhtError>>)>,
    relay_mode: RelayMode,
    /// Bootstrap peers, whose relays this node may listen through.
    relays: Vec<Multiaddr>,
    /// Whether it listens through them already.
    relayed: bool,
    record_ttl: Duration,
    /// When each key this node provides was last sent to the DHT.
    provided_at: HashMap<RecordKey, Instant>,
    stats: NodeStats,
    /// [`Node::connect`] calls looking up where their peer is.
    finding: HashMap<QueryId, (PeerId, Vec<Multiaddr>, ConnectReply)>,
    /// Callers of [`Node::connect`] waiting for a connection.
    dials: HashMap<PeerId, Vec<ConnectReply>>,
    puts: HashMap<QueryId, Reply<Result<(), DhtError>>>,
    providers: HashMap<QueryId, (HashSet<PeerId>, Reply<HashSet<PeerId>>)>,
    records: HashMap<QueryId, Reply<Option<Vec<u8>>>>,
    pings: HashMap<PeerId, Duration>,
    /// The address of a direct (not relayed) connection to each peer.
    direct_ips: HashMap<PeerId, IpAddr>,
    /// Tasks that live as long as the node (a direct listener).
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EventLoop {
    async fn run(mut self, early: Vec<SwarmEvent<BehaviourEvent>>) {
        for event in early {
            self.on_event(event);
        }
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
        for task in &self.tasks {
            task.abort();
        }
    }

    fn on_command(&mut self, command: Command) {
        let local = *self.swarm.local_peer_id();
        let already_connected = match &command {
            Command::Connect(peer, ..) => self.swarm.is_connected(peer),
            _ => false,
        };
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
                let withdrawing = provide.is_empty();
                // Provider entries live twice as long as records; sending
                // them again every half record lifetime is plenty, and
                // keeps a refresh to one DHT write when nothing changed.
                let now = Instant::now();
                let fresh_for = self.record_ttl / 2;
                for key in provide {
                    if self
                        .provided_at
                        .get(&key)
                        .is_some_and(|at| now.duration_since(*at) < fresh_for)
                    {
                        continue;
                    }
                    self.provided_at.insert(key.clone(), now);
                    if let Err(e) = kad.start_providing(key) {
                        let _ =
                            reply.send(Err(DhtError::Transport(format!("cannot provide: {e}"))));
                        return;
                    }
                }
                let mut record = Record::new(key, value);
                record.publisher = Some(local);
                // A withdrawal (nothing provided) waits for every closest
                // peer, so no peer keeps serving the live record after the
                // server has gone.
                let quorum = if withdrawing {
                    Quorum::All
                } else {
                    Quorum::One
                };
                match kad.put_record(record, quorum) {
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
                    self.provided_at.remove(&key);
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
            Command::Stats(reply) => {
                let _ = reply.send(self.stats);
            }
            Command::DirectIp(peer, reply) => {
                let _ = reply.send(self.direct_ips.get(&peer).copied());
            }
            Command::Catalog(reply) => {
                let _ = reply.send(catalog::catalog_of(kad.store_mut(), now_ms()));
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Connect(peer, addrs, reply) => {
                if already_connected {
                    let _ = reply.send(Ok(()));
                    return;
                }
                // Find where it is first: a lookup of its own id ends at
                // the peer itself, and returns the addresses (direct or
                // through a relay) its neighbours know.
                let id = kad.get_closest_peers(peer);
                self.finding.insert(id, (peer, addrs, reply));
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
                self.direct_ips.remove(&peer_id);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if let Some(ip) = direct_ip_of(endpoint.get_remote_address()) {
                    self.direct_ips.insert(peer_id, ip);
                }
                for reply in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer_id),
                error,
                ..
            } if !self.swarm.is_connected(&peer_id) => {
                for reply in self.dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Err(DhtError::Transport(format!(
                        "cannot connect to {peer_id}: {error}"
                    ))));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                tracing::info!(status = ?new, "reachability from outside");
                if new == autonat::NatStatus::Private && self.relay_mode == RelayMode::Auto {
                    self.listen_through_relays();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => {
                tracing::debug!(?event, "relay client");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => tracing::info!(peer = %remote_peer_id, "direct connection by hole punching"),
                Err(e) => tracing::debug!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest { request })) => {
                self.on_store_request(request)
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

    /// Stores what others ask this node to keep, if `admission` agrees.
    fn on_store_request(&mut self, request: kad::InboundRequest) {
        let store = self.swarm.behaviour_mut().kad.store_mut();
        match request {
            kad::InboundRequest::PutRecord {
                source,
                record: Some(record),
                ..
            } => {
                let stored = store.get(&record.key).map(|r| r.value.clone());
                match admission::admit_record(
                    &record.key,
                    &record.value,
                    stored.as_deref(),
                    now_ms(),
                ) {
                    Ok(()) => {
                        if let Err(e) = store.put(record) {
                            tracing::debug!(error = %e, "record not stored");
                        }
                    }
                    Err(why) => {
                        self.stats.refused_records += 1;
                        tracing::debug!(%source, ?why, "refused to store a record");
                    }
                }
            }
            kad::InboundRequest::AddProvider {
                record: Some(provider),
            } => match admission::admit_provider(&provider.key) {
                Ok(()) => {
                    if let Err(e) = store.add_provider(provider) {
                        tracing::debug!(error = %e, "provider entry not stored");
                    }
                }
                Err(why) => {
                    self.stats.refused_providers += 1;
                    tracing::debug!(provider = %provider.provider, ?why, "refused a provider entry");
                }
            },
            _ => {}
        }
    }

    /// Dials `peer` at `addrs` plus what the behaviours know, unless it is
    /// connected already; `reply` hears when it connects or fails.
    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, reply: Reply<Result<(), DhtError>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => self.dials.entry(peer).or_default().push(reply),
            Err(e) => {
                let _ = reply.send(Err(DhtError::Transport(format!("cannot dial {peer}: {e}"))));
            }
        }
    }

    /// Listens on `<relay>/p2p-circuit` for every bootstrap peer, once.
    fn listen_through_relays(&mut self) {
        if std::mem::replace(&mut self.relayed, true) {
            return;
        }
        for relay in &self.relays {
            let circuit = relay.clone().with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(_) => tracing::info!(%circuit, "listening through a relay"),
                Err(e) => tracing::warn!(%circuit, error = %e, "cannot listen through a relay"),
            }
        }
    }

    fn on_query(&mut self, id: QueryId, result: QueryResult, last: bool) {
        match result {
            QueryResult::Bootstrap(outcome) => {
                if let Err(e) = outcome {
                    tracing::debug!(error = %e, "a bootstrap step failed");
                }
                if last && self.joining.as_ref().is_some_and(|(q, _)| *q == id) {
                    if self.relay_mode == RelayMode::Always {
                        self.listen_through_relays();
                    }
                    if let Some((_, reply)) = self.joining.take() {
                        let joined = if self.swarm.connected_peers().next().is_some() {
                            Ok(())
                        } else {
                            Err(DhtError::Transport(
                                "cannot reach any bootstrap peer: check the address, that the \
                                 tracker runs, and that both use the same swarm key (or none)"
                                    .into(),
                            ))
                        };
                        let _ = reply.send(joined);
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
            QueryResult::GetClosestPeers(outcome) => {
                let Some((peer, mut addrs, reply)) = self.finding.remove(&id) else {
                    return;
                };
                let found = match outcome {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                if let Some(info) = found.into_iter().find(|p| p.peer_id == peer) {
                    addrs.extend(info.addrs);
                }
                // Peers behind NAT are reachable through a bootstrap peer's
                // relay; direct addresses are tried at the same time.
                addrs.extend(self.relays.iter().map(|relay| {
                    relay
                        .clone()
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::P2p(peer))
                }));
                self.dial(peer, addrs, reply);
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

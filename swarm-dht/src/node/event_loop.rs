//! The task that owns the libp2p `Swarm`: it runs the commands the
//! [`Node`](super::Node) handles send and reacts to the swarm's events.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{
    self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum, Record, RecordKey,
};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{autonat, dcutr, identify, mdns, multiaddr::Protocol, ping, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

use crate::admission;
use crate::announce::now_ms;
use crate::catalog;
use crate::error::DhtError;
use crate::KAD_PROTOCOL;

use super::behaviour::{Behaviour, BehaviourEvent};
use super::config::RelayMode;
use super::transport::direct_ip_of;
use super::NodeStats;

pub(super) type Reply<T> = oneshot::Sender<T>;
/// A caller waiting to hear whether a connection came up.
pub(super) type ConnectReply = Reply<Result<(), DhtError>>;

pub(super) enum Command {
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
    Tie(tokio::task::JoinHandle<()>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) stop: mpsc::Receiver<()>,
    pub(super) listening: Vec<Multiaddr>,
    /// The bootstrap query [`Node::start`] waits for.
    pub(super) joining: Option<(QueryId, Reply<Result<(), DhtError>>)>,
    pub(super) relay_mode: RelayMode,
    /// Bootstrap peers, whose relays this node may listen through.
    pub(super) relays: Vec<Multiaddr>,
    /// Whether it listens through them already.
    pub(super) relayed: bool,
    pub(super) record_ttl: Duration,
    /// When each key this node provides was last sent to the DHT.
    pub(super) provided_at: HashMap<RecordKey, Instant>,
    pub(super) stats: NodeStats,
    /// [`Node::connect`] calls looking up where their peer is.
    pub(super) finding: HashMap<QueryId, (PeerId, Vec<Multiaddr>, ConnectReply)>,
    /// Callers of [`Node::connect`] waiting for a connection.
    pub(super) dials: HashMap<PeerId, Vec<ConnectReply>>,
    pub(super) puts: HashMap<QueryId, Reply<Result<(), DhtError>>>,
    pub(super) providers: HashMap<QueryId, (HashSet<PeerId>, Reply<HashSet<PeerId>>)>,
    pub(super) records: HashMap<QueryId, Reply<Option<Vec<u8>>>>,
    pub(super) pings: HashMap<PeerId, Duration>,
    /// The address of a direct (not relayed) connection to each peer.
    pub(super) direct_ips: HashMap<PeerId, IpAddr>,
    /// Tasks that live as long as the node (a direct listener).
    pub(super) tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EventLoop {
    pub(super) async fn run(mut self, early: Vec<SwarmEvent<BehaviourEvent>>) {
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
            Command::Tie(task) => self.tasks.push(task),
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

//! `sherpa tracker`, `sherpa serve` and `sherpa nodes`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sherpa_swarm::core::{BlockRange, ModelId, ServerInfo};
use sherpa_swarm::dht::{
    self, Bandwidth, Node, NodeConfig, PeerId, RelayMode, ServerListing, SwarmKey,
};
use sherpa_swarm::model_store::{self, sherpa_home};
use sherpa_swarm::score::{
    plan, select, Candidate, Overrides, RouteOptions, SelectionPolicy, ServerId,
};
use sherpa_swarm::shard::{
    BlockShard, CacheBudget, Device, ModelFiles, SessionCache, WeightPrecision,
};
use sherpa_swarm::SherpaError;

use crate::selector::NodesView;
use crate::{NodesArgs, RelayArg, ServeArgs};

/// How often a server re-signs its record, and how long each lives.
const REFRESH: Duration = Duration::from_secs(30);
const RECORD_TTL: Duration = Duration::from_secs(120);

fn net(e: impl std::fmt::Display) -> SherpaError {
    SherpaError::Network(e.to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime, SherpaError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(net)
}

fn multiaddr(text: &str) -> Result<dht::Multiaddr, SherpaError> {
    text.parse().map_err(|e| {
        SherpaError::Network(format!(
            "{text:?} is not a multiaddr ({e}), e.g. /ip4/127.0.0.1/tcp/4343/p2p/12D3..."
        ))
    })
}

/// Prints the first listen address (the line scripts read), then waits for Ctrl-C.
async fn announce_address(node: &Node) -> Result<(), SherpaError> {
    let addrs = node.listen_addrs().await.map_err(net)?;
    let mut stdout = std::io::stdout().lock();
    for addr in &addrs {
        let _ = writeln!(stdout, "{addr}");
    }
    let _ = stdout.flush();
    Ok(())
}

/// The private swarm key at `path`, if one was given.
fn swarm_key(path: Option<&Path>) -> Result<Option<SwarmKey>, SherpaError> {
    let Some(path) = path else { return Ok(None) };
    let key = SwarmKey::load(path).map_err(net)?;
    eprintln!("private swarm, key fingerprint {}", key.fingerprint());
    Ok(Some(key))
}

/// `listen`, or TCP and QUIC on `port` of every interface (TCP only in a
/// private swarm: QUIC cannot carry the swarm key).
fn listen_addrs(
    listen: &[String],
    port: u16,
    private: bool,
) -> Result<Vec<dht::Multiaddr>, SherpaError> {
    if !listen.is_empty() {
        return listen.iter().map(|a| multiaddr(a)).collect();
    }
    let mut addrs = vec![multiaddr(&format!("/ip4/0.0.0.0/tcp/{port}"))?];
    if !private {
        addrs.push(multiaddr(&format!("/ip4/0.0.0.0/udp/{port}/quic-v1"))?);
    }
    Ok(addrs)
}

pub(crate) fn swarm_key_file(out: &Path) -> Result<(), SherpaError> {
    let key = SwarmKey::create(out).map_err(net)?;
    println!("{}", out.display());
    eprintln!(
        "created a swarm key (fingerprint {}); pass --swarm-key {} to the tracker and every node of the swarm, and share the file only with them",
        key.fingerprint(),
        out.display()
    );
    Ok(())
}

pub(crate) fn tracker(
    listen: Vec<String>,
    data_dir: Option<PathBuf>,
    swarm_key_path: Option<PathBuf>,
) -> Result<(), SherpaError> {
    let key =
        dht::load_or_create_node_key(&data_dir.unwrap_or_else(|| sherpa_home().join("tracker")))
            .map_err(net)?;
    let swarm_key = swarm_key(swarm_key_path.as_deref())?;
    let listen = listen_addrs(&listen, 4343, swarm_key.is_some())?;
    runtime()?.block_on(async move {
        let node = Node::start(
            NodeConfig::new(key)
                .with_listen(listen)
                .with_swarm_key(swarm_key)
                .with_relay_server(true)
                .with_relay(RelayMode::Never)
                .with_record_ttl(RECORD_TTL),
        )
        .await
        .map_err(net)?;
        announce_address(&node).await?;
        eprintln!("tracker running (DHT bootstrap, relay, AutoNAT); Ctrl-C stops it");
        tokio::signal::ctrl_c().await.map_err(net)?;
        node.shutdown().await;
        Ok(())
    })
}

fn model_id_for(arg: &str, explicit: Option<&str>) -> Result<ModelId, SherpaError> {
    if let Some(id) = explicit {
        return Ok(ModelId::new(id)?);
    }
    if model_store::known_model(arg).is_some() {
        return Ok(ModelId::new(arg)?);
    }
    let stem = std::path::Path::new(arg)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    Ok(ModelId::new(clean)?)
}

pub(crate) fn serve(args: ServeArgs) -> Result<(), SherpaError> {
    let blocks: BlockRange = args.blocks.parse()?;
    let model = model_id_for(&args.model, args.model_id.as_deref())?;
    let path = model_store::resolve_model(&args.model, &mut crate::fetch_progress())?;
    let files = ModelFiles::open(&path)?;
    let shard = Arc::new(BlockShard::load(
        &files,
        blocks,
        &Device::Cpu,
        WeightPrecision::Native,
    )?);
    let throughput = shard.measure_throughput(8)?;
    let per_token =
        SessionCache::bytes_needed(shard.config(), blocks, 1, sherpa_swarm::shard::DType::F32)
            .max(1);
    let cache_bytes = args.cache_mib.saturating_mul(1 << 20);
    let key = dht::load_or_create_node_key(
        &args
            .data_dir
            .unwrap_or_else(|| sherpa_home().join("server")),
    )
    .map_err(net)?;
    let swarm_key = swarm_key(args.swarm.swarm_key.as_deref())?;
    let listen = listen_addrs(&args.listen, 0, swarm_key.is_some())?;
    let relay = match args.relay {
        RelayArg::Auto => RelayMode::Auto,
        RelayArg::Always => RelayMode::Always,
        RelayArg::Never => RelayMode::Never,
    };
    let bootstrap: Vec<dht::Multiaddr> = args
        .swarm
        .tracker
        .as_deref()
        .map(multiaddr)
        .transpose()?
        .into_iter()
        .collect();
    let tracker_peer = bootstrap.first().and_then(peer_of);
    eprintln!(
        "serving {model} blocks {blocks} ({:.1} MiB of weights, {throughput:.0} blocks x tokens/s)",
        shard.weight_bytes() as f64 / 1048576.0
    );
    let service = Arc::new(dht::InferenceService::new(
        model.clone(),
        shard.clone(),
        CacheBudget::new(cache_bytes),
    ));
    runtime()?.block_on(async move {
        let node = Node::start(
            NodeConfig::new(key.clone())
                .with_listen(listen)
                .with_bootstrap(bootstrap)
                .with_mdns(args.swarm.lan)
                .with_swarm_key(swarm_key)
                .with_relay(relay)
                .with_record_ttl(RECORD_TTL)
                .with_inference(service),
        )
        .await
        .map_err(net)?;
        let mut info = ServerInfo::new(
            key.public_key(),
            model,
            blocks,
            shard.config().num_hidden_layers as u32,
        );
        info.throughput = throughput;
        info.cache_tokens_free = cache_bytes / per_token;
        info.hardware = sherpa_swarm::hardware::detect();
        info.public_name = args.name.unwrap_or_else(|| {
            // Peer ids share a long prefix; their end tells them apart.
            let id = node.peer_id().to_string();
            format!("sherpa-{}", &id[id.len().saturating_sub(6)..])
        });
        announce_address(&node).await?;
        // Self-reported bandwidth: a probe to the tracker. Clients measure
        // their own link to us and prefer that.
        if let Some(tracker) = tracker_peer {
            match node.probe(tracker, SELF_PROBE_BYTES).await {
                Ok(b) => {
                    // The tracker's upload is our download, and back.
                    info.upload_bps = b.download_bps;
                    info.download_bps = b.upload_bps;
                    eprintln!(
                        "bandwidth to the tracker: {:.0} Mbit/s up, {:.0} Mbit/s down",
                        b.download_bps as f64 * 8e-6,
                        b.upload_bps as f64 * 8e-6
                    );
                }
                Err(e) => eprintln!(
                    "could not measure bandwidth to the tracker ({e}); announcing it as unknown"
                ),
            }
        }
        let task = dht::announce_periodically(
            node.clone(),
            key.clone(),
            info.clone(),
            REFRESH,
            RECORD_TTL,
        );
        eprintln!("announced; serving inference sessions. Ctrl-C withdraws and stops.");
        tokio::signal::ctrl_c().await.map_err(net)?;
        task.abort();
        match dht::withdraw(&node, &key, &info).await {
            Ok(()) => eprintln!("withdrawn"),
            Err(e) => eprintln!(
                "could not withdraw ({e}); the record expires in {}s",
                RECORD_TTL.as_secs()
            ),
        }
        node.shutdown().await;
        drop(shard);
        Ok(())
    })
}

/// Bytes each way of the probe a server runs to its tracker at start-up.
const SELF_PROBE_BYTES: u32 = 1 << 20;

/// The peer id at the end of a `/p2p/<id>` multiaddr.
fn peer_of(addr: &dht::Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(dht::multiaddr::Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Bytes each way of the bandwidth probe `sherpa nodes` runs per server.
const PROBE_BYTES: u32 = 256 << 10;

pub(crate) fn nodes(args: NodesArgs) -> Result<(), SherpaError> {
    let lan = args.swarm.lan;
    let bootstrap = match (&args.swarm.tracker, lan) {
        (Some(tracker), _) => vec![multiaddr(tracker)?],
        (None, true) => Vec::new(),
        (None, false) => {
            return Err(SherpaError::Network(
                "say where to look: --tracker MULTIADDR or --lan".into(),
            ))
        }
    };
    let model = ModelId::new(&args.model)?;
    let key = dht::identity::ephemeral_node_key();
    let swarm_key = swarm_key(args.swarm.swarm_key.as_deref())?;
    runtime()?.block_on(async move {
        let listen = if lan {
            "/ip4/0.0.0.0/tcp/0"
        } else {
            "/ip4/127.0.0.1/tcp/0"
        };
        let config = NodeConfig::new(key)
            .with_listen(vec![multiaddr(listen)?])
            .with_bootstrap(bootstrap)
            .with_mdns(lan)
            .with_swarm_key(swarm_key)
            .with_relay(RelayMode::Never);
        let node = Node::start(config).await.map_err(net)?;
        let listing = settled_listing(&node, &model, lan).await?;
        let pings = measure_pings(&node, &listing).await?;
        let probes = if !args.no_probe {
            measure_bandwidth(&node, &listing).await
        } else {
            HashMap::new()
        };
        node.shutdown().await;
        let candidates: Vec<Candidate> = listing
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
        let overrides = Overrides {
            pinned: matching(&listing, &args.pin)?,
            excluded: matching(&listing, &args.exclude)?,
        };
        let policy = SelectionPolicy {
            max_nodes: args.max_nodes,
            ..SelectionPolicy::default()
        };
        let blocks = listing.model_blocks();
        let selection = if blocks > 0 {
            Some(select(&candidates, blocks, &policy, &overrides).map_err(net)?)
        } else {
            None
        };
        let route = selection.as_ref().and_then(|sel| {
            let chosen: Vec<Candidate> = sel
                .selected
                .iter()
                .map(|&i| candidates[i].clone())
                .collect();
            let span = BlockRange::new(0, blocks).ok()?;
            plan(&chosen, span, &RouteOptions::default(), &Default::default())
                .ok()
                .map(|route| (chosen, route))
        });
        let view = NodesView {
            model: &model,
            blocks,
            listing: &listing,
            candidates: &candidates,
            selection: selection.as_ref(),
            route: route.as_ref().map(|(c, r)| (c.as_slice(), r)),
        };
        if args.json {
            println!("{}", view.json());
        } else {
            view.print();
        }
        Ok(())
    })
}

/// Looks until two lookups a moment apart agree: the first ones also find
/// and connect peers, and mDNS answers take a second or two.
async fn settled_listing(
    node: &Node,
    model: &ModelId,
    lan: bool,
) -> Result<ServerListing, SherpaError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(if lan { 8 } else { 4 });
    let mut listing = node.list_servers(model, dht::now_ms()).await.map_err(net)?;
    loop {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let again = node.list_servers(model, dht::now_ms()).await.map_err(net)?;
        let settled = again.servers.len() == listing.servers.len() && !again.servers.is_empty();
        if again.servers.len() >= listing.servers.len() {
            listing = again;
        }
        if settled || std::time::Instant::now() > deadline {
            return Ok(listing);
        }
    }
}

/// The public keys of listed servers named (by public name or peer id) in
/// `names`; a name matching nothing is an error.
fn matching(listing: &ServerListing, names: &[String]) -> Result<HashSet<ServerId>, SherpaError> {
    let mut ids = HashSet::new();
    for name in names {
        let found: Vec<ServerId> = listing
            .servers
            .iter()
            .filter(|s| &s.info.public_name == name || &s.peer_id.to_string() == name)
            .map(|s| s.info.public_key)
            .collect();
        if found.is_empty() {
            return Err(SherpaError::Network(format!(
                "no listed server is called {name:?} (use a name or peer id from `sherpa nodes`)"
            )));
        }
        ids.extend(found);
    }
    Ok(ids)
}

/// Probes every listed server's bandwidth at once; failures are left out.
async fn measure_bandwidth(node: &Node, listing: &ServerListing) -> HashMap<PeerId, Bandwidth> {
    let mut probes = tokio::task::JoinSet::new();
    for server in &listing.servers {
        let (node, peer) = (node.clone(), server.peer_id);
        probes.spawn(async move { (peer, node.probe(peer, PROBE_BYTES).await) });
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
/// waits, briefly, for a ping to each.
async fn measure_pings(
    node: &Node,
    listing: &ServerListing,
) -> Result<HashMap<PeerId, Duration>, SherpaError> {
    let mut connects = tokio::task::JoinSet::new();
    for server in &listing.servers {
        let (node, peer, name) = (
            node.clone(),
            server.peer_id,
            server.info.public_name.clone(),
        );
        connects.spawn(async move {
            if let Err(e) = node.connect(peer, Vec::new()).await {
                eprintln!("cannot reach {name} ({peer}): {e}");
            }
        });
    }
    while connects.join_next().await.is_some() {}
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let pings = node.pings().await.map_err(net)?;
        let all = listing
            .servers
            .iter()
            .all(|s| pings.contains_key(&s.peer_id));
        if all || std::time::Instant::now() > deadline {
            return Ok(pings);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

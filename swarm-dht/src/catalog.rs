//! Which models a swarm serves (`/sherpa/catalog/1.0.0`).
//!
//! Kademlia cannot list its keys, so a client asking for a model nobody
//! serves would learn nothing but "no servers". Every node therefore
//! answers a catalog request with the models it holds live server records
//! of ([`swarm_core::catalog::Catalog`]); the client asks the peers it is
//! connected to (its tracker, the servers it found) and then looks each
//! model up itself, so the figures it shows come from verified records.
//!
//! On the wire: the asker opens the stream and sends nothing; the node
//! answers one length-prefixed control message and closes. Answers are
//! capped in size, every step has a timeout, and a node serves a few
//! requests at a time and refuses (closes) the rest.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::kad::store::{MemoryStore, RecordStore};
use libp2p::{PeerId, StreamProtocol};
use swarm_core::catalog::{Catalog, CatalogModel};
use swarm_core::{codec, ModelId, ServerInfo, SignedRecord};
use tokio::sync::Semaphore;

use crate::admission::parse_server_record_key;
use crate::error::DhtError;
use crate::node::{Node, WeakNode};
use crate::wire;

/// Protocol id of catalog requests.
pub const CATALOG_PROTOCOL: StreamProtocol = StreamProtocol::new("/sherpa/catalog/1.0.0");
/// Catalog requests a node answers at once.
const MAX_CONCURRENT: usize = 8;
/// Longest a node spends answering one request.
const SERVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Peers a client asks at once, and models it then looks up.
const MAX_ASKED: usize = 16;
/// Records a node reads from its store for one answer.
const MAX_SCANNED: usize = 16_384;

/// A model the swarm serves, as this client's own lookup found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    /// The model's id.
    pub model: ModelId,
    /// Its block count, as most of its servers report it.
    pub blocks: u32,
    /// Servers with valid records.
    pub servers: usize,
}

impl std::fmt::Display for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} blocks, {} server{})",
            self.model,
            self.blocks,
            self.servers,
            if self.servers == 1 { "" } else { "s" }
        )
    }
}

/// The catalog of the live server records in `store` at `now_ms`.
/// Records in a store were verified when they were admitted; here only
/// their expiry is read again (withdrawals are expired records).
pub(crate) fn catalog_of(store: &mut MemoryStore, now_ms: u64) -> Catalog {
    let mut counts: HashMap<ModelId, u32> = HashMap::new();
    for record in store.records().take(MAX_SCANNED) {
        let Some((model, _peer)) = parse_server_record_key(&record.key) else {
            continue;
        };
        let live = SignedRecord::from_bytes(&record.value)
            .and_then(|r| codec::decode::<ServerInfo>(&r.body))
            .is_ok_and(|info| info.expires_at_ms > now_ms && info.model == model);
        if live {
            *counts.entry(model).or_default() += 1;
        }
    }
    Catalog::new(
        counts
            .into_iter()
            .map(|(model, servers)| CatalogModel { model, servers })
            .collect(),
    )
}

/// Answers catalog requests arriving on `incoming` until the node stops.
pub(crate) async fn serve_catalogs(mut incoming: libp2p_stream::IncomingStreams, node: WeakNode) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    while let Some((peer, mut stream)) = incoming.next().await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "refused a catalog request: too many at once");
            continue;
        };
        let node = node.clone();
        tokio::spawn(async move {
            let answer = async {
                let catalog = node.local_catalog().await?;
                wire::write_message(&mut stream, &catalog, None).await?;
                stream
                    .close()
                    .await
                    .map_err(|e| DhtError::Transport(format!("closing a catalog answer: {e}")))
            };
            match tokio::time::timeout(SERVE_TIMEOUT, answer).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "a catalog answer failed"),
                Err(_) => tracing::debug!(%peer, "a catalog answer timed out"),
            }
            drop(permit);
        });
    }
}

/// Asks `peer` for its catalog.
pub async fn ask_catalog(node: &Node, peer: PeerId) -> Result<Catalog, DhtError> {
    let mut stream = node.open_stream(peer, CATALOG_PROTOCOL).await?;
    let read = async {
        let catalog: Catalog = wire::read_message(&mut stream).await?.ok_or_else(|| {
            DhtError::Transport(format!(
                "{peer} closed the catalog stream without answering"
            ))
        })?;
        catalog.check()?;
        Ok(catalog)
    };
    tokio::time::timeout(node.request_timeout(), read)
        .await
        .map_err(|_| DhtError::Timeout("a catalog"))?
}

/// The models the swarm serves, as far as this node can see: the model
/// ids in its own store and in the catalogs of up to 16 connected peers,
/// each then looked up (signatures and expiry checked), most servers
/// first. Models whose lookup finds no valid server are left out.
pub async fn served_models(node: &Node) -> Result<Vec<ServedModel>, DhtError> {
    let mut ids: BTreeSet<ModelId> = node
        .local_catalog()
        .await?
        .models
        .into_iter()
        .map(|m| m.model)
        .collect();
    let mut peers = node.connected_peers().await?;
    peers.truncate(MAX_ASKED);
    let answers = futures::stream::iter(peers)
        .map(|peer| async move { (peer, ask_catalog(node, peer).await) })
        .buffer_unordered(MAX_ASKED)
        .collect::<Vec<_>>()
        .await;
    for (peer, answer) in answers {
        match answer {
            Ok(catalog) => ids.extend(catalog.models.into_iter().map(|m| m.model)),
            Err(DhtError::Stopped) => return Err(DhtError::Stopped),
            Err(e) => tracing::debug!(%peer, error = %e, "no catalog from a peer"),
        }
    }
    let now = crate::now_ms();
    let lookups = futures::stream::iter(ids.into_iter().take(MAX_ASKED))
        .map(|model| async move {
            let listing = node.list_servers(&model, now).await;
            (model, listing)
        })
        .buffer_unordered(MAX_ASKED)
        .collect::<Vec<_>>()
        .await;
    let mut served = Vec::new();
    for (model, listing) in lookups {
        match listing {
            Ok(listing) if !listing.servers.is_empty() => served.push(ServedModel {
                blocks: listing.model_blocks(),
                servers: listing.servers.len(),
                model,
            }),
            Ok(_) => {}
            Err(DhtError::Stopped) => return Err(DhtError::Stopped),
            Err(e) => tracing::debug!(%model, error = %e, "looking up a catalogued model failed"),
        }
    }
    served.sort_by(|a, b| b.servers.cmp(&a.servers).then(a.model.cmp(&b.model)));
    Ok(served)
}

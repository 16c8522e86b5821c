//! What a lookup of a model's servers found.

use std::collections::HashMap;

use libp2p::PeerId;
use swarm_core::{ModelId, ServerInfo, SignedRecord};

use crate::keys::peer_id_of;

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
    /// Servers left out because their blocks are not the ones this node
    /// expects (another quantization, another fine-tune, a corrupted file).
    pub mismatched: Vec<Mismatch>,
}

/// A server whose announced weights differ from the expected ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// The server.
    pub server: ListedServer,
    /// Why it was left out.
    pub reason: String,
}

/// The first 12 hex digits of a digest.
fn short(digest: &[u8; 32]) -> String {
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl ServerListing {
    /// Sets apart the servers whose blocks differ from `expected` (one
    /// digest per block of the model) into [`ServerListing::mismatched`].
    pub fn keep_matching(&mut self, expected: &[[u8; 32]]) {
        let servers = std::mem::take(&mut self.servers);
        for server in servers {
            match mismatch(&server.info, expected) {
                None => self.servers.push(server),
                Some(reason) => {
                    tracing::info!(
                        peer = %server.peer_id,
                        name = %server.info.public_name,
                        blocks = %server.info.blocks,
                        %reason,
                        "skipping a server whose weights differ"
                    );
                    self.mismatched.push(Mismatch { server, reason });
                }
            }
        }
    }
}

/// Why `info`'s blocks are not the expected ones, if they are not.
fn mismatch(info: &ServerInfo, expected: &[[u8; 32]]) -> Option<String> {
    if info.model_blocks as usize != expected.len() {
        return Some(format!(
            "it serves a model of {} blocks, this one has {}",
            info.model_blocks,
            expected.len()
        ));
    }
    if info.block_digests.is_empty() {
        return Some("it does not announce digests of its blocks".into());
    }
    let start = info.blocks.start() as usize;
    info.block_digests
        .iter()
        .enumerate()
        .find_map(|(offset, got)| {
            let block = start + offset;
            let want = expected.get(block)?;
            (want != got).then(|| {
                format!(
                    "its block {block} has other weights (digest {} where this model has {}): \
                     another quantization or fine-tune, or a corrupted file",
                    short(got),
                    short(want)
                )
            })
        })
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
    pub(super) fn add(&mut self, model: &ModelId, peer: PeerId, bytes: &[u8], now_ms: u64) {
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

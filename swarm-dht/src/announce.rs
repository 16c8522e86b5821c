//! Keeping a server's record fresh in the DHT, and taking it back.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use swarm_core::{NodeKey, ServerInfo};
use tokio::task::JoinHandle;

use crate::error::DhtError;
use crate::node::Node;

/// Milliseconds since the Unix epoch, for record times.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Re-signs and re-announces `info` every `refresh`, each record valid for
/// `ttl`, until the returned task is aborted. A killed server stops
/// refreshing, so it drops out of lookups within `ttl`.
pub fn announce_periodically(
    node: Node,
    key: NodeKey,
    info: ServerInfo,
    refresh: Duration,
    ttl: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(refresh);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let mut fresh = info.clone();
            fresh.issued_at_ms = now_ms();
            fresh.expires_at_ms = fresh.issued_at_ms + ttl.as_millis() as u64;
            let result = match key.sign(&fresh) {
                Ok(record) => node.announce(&record, &fresh).await,
                Err(e) => Err(DhtError::Core(e)),
            };
            match result {
                Ok(()) => {
                    tracing::debug!(model = %fresh.model, blocks = %fresh.blocks, "announced")
                }
                Err(DhtError::Stopped) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "announcing failed; retrying at the next refresh")
                }
            }
        }
    })
}

/// Withdraws `info`'s announcement: an already-expired record replaces the
/// live one, so lookups drop this server at once.
pub async fn withdraw(node: &Node, key: &NodeKey, info: &ServerInfo) -> Result<(), DhtError> {
    let mut tombstone = info.clone();
    let now = now_ms();
    tombstone.issued_at_ms = now.saturating_sub(1);
    tombstone.expires_at_ms = now;
    let record = key.sign(&tombstone)?;
    node.withdraw(&info.model, &record).await
}

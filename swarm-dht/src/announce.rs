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

/// Signs `info` afresh (issued now, valid for `ttl`) and announces it once,
/// returning when the DHT has taken it.
pub async fn announce_once(
    node: &Node,
    key: &NodeKey,
    info: &ServerInfo,
    ttl: Duration,
) -> Result<(), DhtError> {
    let mut fresh = info.clone();
    fresh.issued_at_ms = now_ms();
    fresh.expires_at_ms = fresh.issued_at_ms + ttl.as_millis() as u64;
    let record = key.sign(&fresh)?;
    node.announce(&record, &fresh).await
}

/// Re-signs and re-announces `info` every `refresh`, each record valid for
/// `ttl`, until the returned task is aborted; the first announcement goes
/// out at once. A killed server stops refreshing, so it drops out of
/// lookups within `ttl`.
pub fn announce_periodically(
    node: Node,
    key: NodeKey,
    info: ServerInfo,
    refresh: Duration,
    ttl: Duration,
) -> JoinHandle<()> {
    let now = tokio::time::Instant::now();
    announce_from(now, node, key, refresh, ttl, move || info.clone())
}

/// Keeps a server's record fresh with its figures of the moment: every
/// `refresh` (the first one `refresh` from now, after the caller's own
/// [`announce_once`]) `current` says what the server is now (free memory
/// and cache, sessions, measured speed), and that is signed for `ttl` and
/// announced, until the returned task is aborted.
pub fn refresh_periodically(
    node: Node,
    key: NodeKey,
    refresh: Duration,
    ttl: Duration,
    current: impl FnMut() -> ServerInfo + Send + 'static,
) -> JoinHandle<()> {
    let start = tokio::time::Instant::now() + refresh;
    announce_from(start, node, key, refresh, ttl, current)
}

fn announce_from(
    start: tokio::time::Instant,
    node: Node,
    key: NodeKey,
    refresh: Duration,
    ttl: Duration,
    mut current: impl FnMut() -> ServerInfo + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval_at(start, refresh);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let info = current();
            match announce_once(&node, &key, &info, ttl).await {
                Ok(()) => {
                    tracing::debug!(model = %info.model, blocks = %info.blocks, "announced")
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

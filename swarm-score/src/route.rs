//! The route planner: the fastest chain of servers through a span of
//! blocks.
//!
//! A hop sends the current positions' hidden states to a server, which runs
//! a contiguous part of the blocks it hosts and sends the result back. A
//! hop's cost is the server's round trip, plus moving the activations
//! through its bandwidth, plus its compute time for the blocks it runs
//! (scaled up by its load, to spread sessions over replicas). The planner
//! finds the chain of least total cost exactly — a shortest path over block
//! boundaries, like Petals' min-latency routing — in time linear in the
//! total length of the servers' spans: the blocks form a line, and for each
//! server the best place to enter it is a running minimum.

use std::collections::{HashMap, HashSet};

use swarm_core::BlockRange;

use crate::candidate::{Candidate, ServerId};
use crate::error::ScoreError;
use crate::score::UNMEASURED_PING_MS;
use crate::uncovered_blocks;

/// What a route is planned for.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RouteOptions {
    /// Positions sent per step (1 when decoding, the prompt's length for
    /// prefill).
    pub tokens: u32,
    /// Bytes of one position's hidden state on the wire (hidden size x 2
    /// for f16).
    pub bytes_per_token: u64,
    /// Load per server known beyond what its record says (0 = none, 1 =
    /// one session's worth): compute time is multiplied by `1 + sessions +
    /// load`, which spreads sessions over replicas.
    pub load: HashMap<ServerId, f64>,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            tokens: 1,
            bytes_per_token: 2 * 4096,
            load: HashMap::new(),
        }
    }
}

/// One server running one contiguous part of the span.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    /// Index into the candidates given to the planner.
    pub index: usize,
    /// Its identity.
    pub server: ServerId,
    /// The blocks it runs (within those it hosts).
    pub blocks: BlockRange,
    /// Estimated seconds this hop takes per step.
    pub cost_secs: f64,
}

/// A chain of hops covering a span in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The hops, first block first.
    pub hops: Vec<Hop>,
    /// Estimated seconds per step: the sum of the hops' costs.
    pub cost_secs: f64,
}

/// A hop's cost: fixed part (round trip + transfer) and per-block part.
fn costs(candidate: &Candidate, options: &RouteOptions) -> Option<(f64, f64)> {
    let per_block = candidate.secs_per_block()?;
    let rtt = candidate
        .rtt
        .map_or(UNMEASURED_PING_MS / 1000.0, |d| d.as_secs_f64());
    let bytes = options.bytes_per_token as f64 * f64::from(options.tokens);
    // Unknown bandwidth counts as a slow home uplink (1 MB/s).
    let bandwidth = |bps: u64| if bps == 0 { 1e6 } else { bps as f64 };
    let transfer =
        bytes / bandwidth(candidate.download_bps) + bytes / bandwidth(candidate.upload_bps);
    // The sessions it announced running share its compute, plus any load
    // the caller knows of.
    let load = f64::from(candidate.sessions)
        + options
            .load
            .get(&candidate.id)
            .copied()
            .filter(|l| l.is_finite() && *l > 0.0)
            .unwrap_or(0.0);
    Some((
        rtt + transfer,
        per_block * f64::from(options.tokens) * (1.0 + load),
    ))
}

/// The fastest route through `span` over `candidates`, skipping any in
/// `avoid`.
pub fn plan(
    candidates: &[Candidate],
    span: BlockRange,
    options: &RouteOptions,
    avoid: &HashSet<ServerId>,
) -> Result<Route, ScoreError> {
    let (first, n) = (span.start(), span.len() as usize);
    if n == 0 {
        return Err(ScoreError::NoBlocks);
    }
    // Servers usable here, with their part of the span (relative) and costs.
    struct Usable {
        index: usize,
        from: usize,
        to: usize,
        fixed: f64,
        per_block: f64,
    }
    let usable: Vec<Usable> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| !avoid.contains(&c.id))
        .filter_map(|(index, c)| {
            let from = c.blocks.start().max(first);
            let to = c.blocks.end().min(span.end());
            let (fixed, per_block) = costs(c, options)?;
            (from < to).then(|| Usable {
                index,
                from: (from - first) as usize,
                to: (to - first) as usize,
                fixed,
                per_block,
            })
        })
        .collect();
    let mut by_block: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (u, s) in usable.iter().enumerate() {
        for list in &mut by_block[s.from..s.to] {
            list.push(u);
        }
    }
    // dist[y]: least cost to have run blocks 0..y; via[y]: (server, x).
    let mut dist = vec![f64::INFINITY; n + 1];
    let mut via = vec![(usize::MAX, 0usize); n + 1];
    dist[0] = 0.0;
    // Per server, the best entry so far: min over x of dist[x] - x * per_block.
    let mut entry: Vec<(f64, usize)> = vec![(f64::INFINITY, 0); usable.len()];
    for y in 1..=n {
        for &u in &by_block[y - 1] {
            let s = &usable[u];
            let x = y - 1;
            let here = dist[x] - x as f64 * s.per_block;
            if here < entry[u].0 {
                entry[u] = (here, x);
            }
            let cost = entry[u].0 + y as f64 * s.per_block + s.fixed;
            if cost < dist[y] {
                dist[y] = cost;
                via[y] = (u, entry[u].1);
            }
        }
    }
    if !dist[n].is_finite() {
        let hosted: Vec<BlockRange> = usable
            .iter()
            .filter_map(|s| BlockRange::new(s.from as u32 + first, s.to as u32 + first).ok())
            .collect();
        let mut uncovered = uncovered_blocks(span.end(), &hosted);
        uncovered.retain(|g| g.end() > first);
        let uncovered = uncovered
            .into_iter()
            .filter_map(|g| BlockRange::new(g.start().max(first), g.end()).ok())
            .collect();
        return Err(ScoreError::NoRoute { uncovered });
    }
    let mut hops = Vec::new();
    let mut y = n;
    while y > 0 {
        let (u, x) = via[y];
        let s = &usable[u];
        hops.push(Hop {
            index: s.index,
            server: candidates[s.index].id,
            blocks: BlockRange::new(first + x as u32, first + y as u32)
                .map_err(|_| ScoreError::NoBlocks)?,
            cost_secs: s.fixed + (y - x) as f64 * s.per_block,
        });
        y = x;
    }
    hops.reverse();
    Ok(Route {
        cost_secs: dist[n],
        hops,
    })
}

/// [`plan`] over the `preferred` servers (a selection) when they cover
/// `span`, else over every candidate: the selection is used first, and the
/// rest of the swarm only where it has a hole (e.g. after failures). Hop
/// indexes refer to `candidates` either way.
///
/// This is also the re-plan after a failure: a client that loses a hop
/// plans that hop's blocks again with the failed servers in `avoid`, and
/// keeps its other hops (their sessions and caches live on).
pub fn plan_preferring(
    candidates: &[Candidate],
    preferred: &HashSet<ServerId>,
    span: BlockRange,
    options: &RouteOptions,
    avoid: &HashSet<ServerId>,
) -> Result<Route, ScoreError> {
    let chosen: Vec<usize> = (0..candidates.len())
        .filter(|&i| preferred.contains(&candidates[i].id))
        .collect();
    if !chosen.is_empty() {
        let subset: Vec<Candidate> = chosen.iter().map(|&i| candidates[i].clone()).collect();
        if let Ok(mut route) = plan(&subset, span, options, avoid) {
            for hop in &mut route.hops {
                hop.index = chosen[hop.index];
            }
            return Ok(route);
        }
    }
    plan(candidates, span, options, avoid)
}

/// Longest a step of `positions` positions through `blocks` blocks may
/// take on a server that spends `secs_per_block` per position and block,
/// before it counts as stalled: `base` (for the network and a slow spell)
/// plus four times its expected compute, capped at ten minutes of compute.
pub fn step_timeout(
    base: std::time::Duration,
    secs_per_block: f64,
    blocks: u32,
    positions: usize,
) -> std::time::Duration {
    let compute = secs_per_block.max(0.0) * f64::from(blocks) * positions as f64;
    let extra = if compute.is_finite() {
        (4.0 * compute).min(600.0)
    } else {
        600.0
    };
    base + std::time::Duration::from_secs_f64(extra)
}

swarm_core::with_setters!(RouteOptions {
    tokens: u32 => with_tokens,
    bytes_per_token: u64 => with_bytes_per_token,
    load: HashMap<ServerId, f64> => with_load,
});

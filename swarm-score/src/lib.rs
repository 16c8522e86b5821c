//! Sherpa Swarm's pure decisions: which peers to use and in which order.
//!
//! This crate reads no clock, draws no random numbers and does no I/O:
//! callers pass in what they measured. It holds
//! - the [`PerformanceScore`] and its components ([`score()`]),
//! - "10 PCs near me" auto-selection with coverage, redundancy and manual
//!   overrides ([`select()`]),
//! - the route planner: the fastest chain over block boundaries, and
//!   re-planning a lost hop around failed servers ([`plan`],
//!   [`plan_preferring`]), and how long a step may take ([`step_timeout`]),
//! - where a server without a fixed span places itself ([`placement`]).

mod candidate;
mod error;
pub mod placement;
pub mod route;
pub mod score;
pub mod select;

pub use candidate::{Candidate, ServerId};
pub use error::ScoreError;
pub use route::{plan, plan_preferring, step_timeout, Hop, Route, RouteOptions};
pub use score::{score, PerformanceScore, ScoreComponents, ScoreWeights};
pub use select::{select, Overrides, RankedCandidate, Selection, SelectionPolicy, Status};

use swarm_core::BlockRange;

/// Blocks of `0..block_count` that none of `spans` covers, as maximal ranges.
pub fn uncovered_blocks(block_count: u32, spans: &[BlockRange]) -> Vec<BlockRange> {
    let mut covered = vec![false; block_count as usize];
    for span in spans {
        for b in span.iter().filter(|b| *b < block_count) {
            covered[b as usize] = true;
        }
    }
    let mut gaps = Vec::new();
    let mut start = None;
    for (i, c) in covered.iter().enumerate() {
        match (c, start) {
            (false, None) => start = Some(i as u32),
            (true, Some(s)) => {
                gaps.extend(BlockRange::new(s, i as u32).ok());
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        gaps.extend(BlockRange::new(s, block_count).ok());
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_gaps_between_spans() {
        let r = |a, b| BlockRange::new(a, b).unwrap();
        assert_eq!(
            uncovered_blocks(10, &[r(0, 3), r(5, 7)]),
            vec![r(3, 5), r(7, 10)]
        );
        assert!(uncovered_blocks(10, &[r(0, 6), r(4, 10)]).is_empty());
        assert_eq!(uncovered_blocks(4, &[]), vec![r(0, 4)]);
    }
}

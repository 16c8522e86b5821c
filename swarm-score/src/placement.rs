//! Where a server without a fixed span places itself.
//!
//! - Joining ([`choose_span`]): like Petals, the window of the server's
//!   length whose blocks, sorted by the throughput already serving them,
//!   are the weakest (lexicographically smallest): the first uncovered
//!   blocks if there are any, else the least served ones. Ties are broken
//!   by a caller's seed, so servers that join at once spread out.
//! - Repairing ([`coverage_plan`]): when blocks lose their last server,
//!   every server computes the same plan from the same listing and only the
//!   servers it names move. It first moves servers whose blocks all have
//!   other hosts into the holes; when that cannot cover the model, it lays
//!   all servers out around the model in order of their ids (which covers
//!   it whenever their lengths add up to the model's).
//!
//! A plan is only made when coverage is broken, so a covered swarm never
//! churns; callers also wait for a hole to persist before acting on it.

use swarm_core::BlockRange;

/// Blocks x tokens per second serving each block: the sum of the
/// throughputs of the spans that cover it.
pub fn block_throughputs(block_count: u32, spans: &[(BlockRange, f32)]) -> Vec<f64> {
    let mut out = vec![0.0; block_count as usize];
    for (span, throughput) in spans {
        for b in span.iter().filter(|b| *b < block_count) {
            out[b as usize] += f64::from(throughput.max(0.0));
        }
    }
    out
}

/// The span of `len` blocks (at most the model's) that most helps a swarm
/// whose blocks are served at `throughputs`: the one whose sorted
/// throughputs are lexicographically smallest. Among equal windows, `seed`
/// picks one.
pub fn choose_span(throughputs: &[f64], len: u32, seed: u64) -> Option<BlockRange> {
    let blocks = throughputs.len() as u32;
    let len = len.min(blocks);
    if len == 0 {
        return None;
    }
    let key = |start: u32| {
        let mut window: Vec<f64> = throughputs[start as usize..(start + len) as usize].to_vec();
        window.sort_by(f64::total_cmp);
        window
    };
    let starts: Vec<u32> = (0..=blocks - len).collect();
    let best = starts
        .iter()
        .map(|&s| key(s))
        .min_by(|a, b| cmp_windows(a, b))?;
    let ties: Vec<u32> = starts
        .into_iter()
        .filter(|&s| cmp_windows(&key(s), &best).is_eq())
        .collect();
    let start = ties[(seed % ties.len() as u64) as usize];
    BlockRange::new(start, start + len).ok()
}

fn cmp_windows(a: &[f64], b: &[f64]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        match x.total_cmp(y) {
            std::cmp::Ordering::Equal => continue,
            other => return other,
        }
    }
    std::cmp::Ordering::Equal
}

/// The spans servers should host so that every block of `0..block_count`
/// has one, given where they are now (`servers`: id and span, ids unique).
/// Returns `None` when every block is covered already (nobody moves), else
/// each server's span under the plan, in `servers`' order. Deterministic:
/// every server computing it from the same listing gets the same plan.
pub fn coverage_plan<I: Ord + Clone>(
    block_count: u32,
    servers: &[(I, BlockRange)],
) -> Option<Vec<(I, BlockRange)>> {
    let spans: Vec<BlockRange> = servers.iter().map(|(_, s)| *s).collect();
    if crate::uncovered_blocks(block_count, &spans).is_empty() {
        return None;
    }
    if let Some(repaired) = repair(block_count, servers) {
        return Some(repaired);
    }
    Some(ring(block_count, servers))
}

/// Moves servers none of whose blocks only they host into the holes, the
/// lowest id first; `None` when that leaves holes.
fn repair<I: Ord + Clone>(
    block_count: u32,
    servers: &[(I, BlockRange)],
) -> Option<Vec<(I, BlockRange)>> {
    let mut plan: Vec<(I, BlockRange)> = servers.to_vec();
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by(|&a, &b| plan[a].0.cmp(&plan[b].0));
    loop {
        let spans: Vec<BlockRange> = plan.iter().map(|(_, s)| *s).collect();
        let holes = crate::uncovered_blocks(block_count, &spans);
        let Some(hole) = holes.first() else {
            return Some(plan);
        };
        let counts = cover_counts(block_count, &spans);
        // A server that can leave without opening a hole.
        let spare = order.iter().copied().find(|&i| {
            let span = plan[i].1;
            span.iter().all(|b| counts[b as usize] >= 2)
        })?;
        let len = plan[spare].1.len().min(block_count);
        // Its window starts at the hole, pulled back to fit the model.
        let start = hole.start().min(block_count - len);
        plan[spare].1 = BlockRange::new(start, start + len).ok()?;
    }
}

/// Lays the servers out in id order around the model: each starts where
/// the previous ended, wrapping to block 0 (a span that would run past the
/// end is pulled back to end there).
fn ring<I: Ord + Clone>(block_count: u32, servers: &[(I, BlockRange)]) -> Vec<(I, BlockRange)> {
    let mut order: Vec<usize> = (0..servers.len()).collect();
    order.sort_by(|&a, &b| servers[a].0.cmp(&servers[b].0));
    let mut plan: Vec<(I, BlockRange)> = servers.to_vec();
    let mut next = 0;
    for i in order {
        let len = servers[i].1.len().min(block_count);
        if len == 0 {
            continue;
        }
        if next >= block_count {
            next = 0;
        }
        let start = next.min(block_count - len);
        if let Ok(span) = BlockRange::new(start, start + len) {
            plan[i].1 = span;
        }
        next = start + len;
    }
    plan
}

fn cover_counts(block_count: u32, spans: &[BlockRange]) -> Vec<u32> {
    let mut counts = vec![0; block_count as usize];
    for span in spans {
        for b in span.iter().filter(|b| *b < block_count) {
            counts[b as usize] += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn r(a: u32, b: u32) -> BlockRange {
        BlockRange::new(a, b).unwrap()
    }

    #[test]
    fn a_joining_server_takes_the_weakest_blocks() {
        let t = block_throughputs(10, &[(r(0, 4), 100.0), (r(4, 8), 50.0)]);
        assert_eq!(choose_span(&t, 2, 0), Some(r(8, 10)), "the uncovered end");
        let t = block_throughputs(10, &[(r(0, 5), 100.0), (r(5, 10), 50.0)]);
        assert_eq!(choose_span(&t, 5, 0), Some(r(5, 10)), "the slower half");
        // An empty swarm: any window, chosen by the seed.
        let empty = vec![0.0; 10];
        let picks: std::collections::BTreeSet<_> = (0..50)
            .map(|seed| choose_span(&empty, 4, seed).unwrap())
            .collect();
        assert!(picks.len() > 3, "{picks:?}");
        assert_eq!(
            choose_span(&empty, 40, 3),
            Some(r(0, 10)),
            "at most the model"
        );
    }

    #[test]
    fn a_covered_swarm_is_left_alone() {
        assert_eq!(coverage_plan(10, &[(1, r(0, 6)), (2, r(4, 10))]), None);
    }

    #[test]
    fn spare_servers_fill_holes_before_anyone_else_moves() {
        // Server 3 duplicates blocks 0..5 of server 1; 8..10 are lost.
        let servers = [(1, r(0, 5)), (2, r(5, 8)), (3, r(0, 3))];
        let plan = coverage_plan(10, &servers).unwrap();
        assert_eq!(plan, vec![(1, r(0, 5)), (2, r(5, 8)), (3, r(7, 10))]);
    }

    #[test]
    fn without_spares_the_servers_are_laid_out_in_id_order() {
        let servers = [(2, r(0, 4)), (1, r(2, 6)), (3, r(3, 7))];
        let plan = coverage_plan(12, &servers).unwrap();
        assert_eq!(plan, vec![(2, r(4, 8)), (1, r(0, 4)), (3, r(8, 12))]);
    }

    proptest! {
        /// Whenever the servers' lengths add up to the model, the plan
        /// covers it, keeps every server's length, and is stable.
        #[test]
        fn plans_cover_the_model_when_the_servers_can(
            blocks in 1u32..40,
            spans in proptest::collection::vec((0u32..40, 1u32..12), 1..12),
        ) {
            let servers: Vec<(usize, BlockRange)> = spans
                .iter()
                .enumerate()
                .map(|(i, &(start, len))| {
                    let len = len.min(blocks);
                    let start = start.min(blocks - len);
                    (i, r(start, start + len))
                })
                .collect();
            let total: u32 = servers.iter().map(|(_, s)| s.len()).sum();
            let Some(plan) = coverage_plan(blocks, &servers) else {
                let spans: Vec<_> = servers.iter().map(|(_, s)| *s).collect();
                prop_assert!(crate::uncovered_blocks(blocks, &spans).is_empty());
                return Ok(());
            };
            for ((id, before), (pid, after)) in servers.iter().zip(&plan) {
                prop_assert_eq!(id, pid);
                prop_assert_eq!(before.len(), after.len());
                prop_assert!(after.end() <= blocks);
            }
            let spans: Vec<_> = plan.iter().map(|(_, s)| *s).collect();
            if total >= blocks {
                prop_assert!(crate::uncovered_blocks(blocks, &spans).is_empty(), "{:?}", plan);
                prop_assert_eq!(coverage_plan(blocks, &plan), None);
            }
        }
    }
}

//! Where a server without a fixed span places itself.
//!
//! - Joining ([`choose_span`]): like Petals, the window of the server's
//!   length whose blocks, sorted by the throughput already serving them,
//!   are the weakest (lexicographically smallest): the first uncovered
//!   blocks if there are any, else the least served ones. Ties are broken
//!   by a caller's seed, so servers that join at once spread out.
//! - Repairing ([`coverage_plan`]): when blocks lose their last server,
//!   every server computes the same plan from the same listing and only the
//!   servers it names move. Servers given a fixed span never move. It first
//!   moves servers whose blocks all have other hosts into the holes; when
//!   that cannot cover the model, it lays the movable servers out, in order
//!   of their ids, over what the fixed ones leave uncovered (which covers
//!   the model whenever all may move and their lengths add up to it), but
//!   only if that leaves fewer blocks without a host.
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

/// A server as the plan sees it: its id, its span now, and whether it
/// may move (servers given a fixed span never do).
pub type PlacedServer<I> = (I, BlockRange, bool);

/// The spans servers should host so that every block of `0..block_count`
/// has one, given where they are now (ids unique). Returns `None` when
/// every block is covered already (nobody moves), else each server's span
/// under the plan, in `servers`' order; only movable servers change.
/// Deterministic: every server computing it from the same listing gets the
/// same plan.
pub fn coverage_plan<I: Ord + Clone>(
    block_count: u32,
    servers: &[PlacedServer<I>],
) -> Option<Vec<(I, BlockRange)>> {
    let spans: Vec<BlockRange> = servers.iter().map(|(_, s, _)| *s).collect();
    if crate::uncovered_blocks(block_count, &spans).is_empty() {
        return None;
    }
    if let Some(repaired) = repair(block_count, servers) {
        return Some(repaired);
    }
    // Laid out afresh only when that leaves fewer blocks without a host;
    // otherwise nobody moves.
    let laid = lay_out(block_count, servers);
    let laid_spans: Vec<BlockRange> = laid.iter().map(|(_, s)| *s).collect();
    if uncovered_count(block_count, &laid_spans) < uncovered_count(block_count, &spans) {
        Some(laid)
    } else {
        Some(servers.iter().map(|(i, s, _)| (i.clone(), *s)).collect())
    }
}

fn uncovered_count(block_count: u32, spans: &[BlockRange]) -> u32 {
    crate::uncovered_blocks(block_count, spans)
        .iter()
        .map(BlockRange::len)
        .sum()
}

/// Movable servers in id order.
fn movable_order<I: Ord>(servers: &[PlacedServer<I>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..servers.len()).filter(|&i| servers[i].2).collect();
    order.sort_by(|&a, &b| servers[a].0.cmp(&servers[b].0));
    order
}

/// A window of `len` blocks starting at `hole`, pulled back to fit.
fn window_at(block_count: u32, len: u32, hole: u32) -> Option<BlockRange> {
    let len = len.min(block_count);
    let start = hole.min(block_count - len);
    BlockRange::new(start, start + len).ok()
}

/// Moves movable servers none of whose blocks only they host into the
/// holes, the lowest id first; `None` when that leaves holes.
fn repair<I: Ord + Clone>(
    block_count: u32,
    servers: &[PlacedServer<I>],
) -> Option<Vec<(I, BlockRange)>> {
    let mut plan: Vec<(I, BlockRange)> = servers.iter().map(|(i, s, _)| (i.clone(), *s)).collect();
    let order = movable_order(servers);
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
        plan[spare].1 = window_at(block_count, plan[spare].1.len(), hole.start())?;
    }
}

/// Keeps the fixed servers where they are and lays the movable ones, in
/// id order, over what the fixed ones leave uncovered: each takes the
/// first block still without a host. Movable servers left over once the
/// model is covered stay where they are. With no fixed servers, servers
/// whose lengths add up to the model cover it.
fn lay_out<I: Ord + Clone>(block_count: u32, servers: &[PlacedServer<I>]) -> Vec<(I, BlockRange)> {
    let mut plan: Vec<(I, BlockRange)> = servers.iter().map(|(i, s, _)| (i.clone(), *s)).collect();
    let order = movable_order(servers);
    let mut placed: Vec<BlockRange> = servers
        .iter()
        .filter(|(_, _, movable)| !movable)
        .map(|(_, s, _)| *s)
        .collect();
    for i in order {
        let Some(hole) = crate::uncovered_blocks(block_count, &placed)
            .first()
            .copied()
        else {
            break;
        };
        if let Some(span) = window_at(block_count, plan[i].1.len(), hole.start()) {
            plan[i].1 = span;
            placed.push(span);
        }
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
        assert_eq!(
            coverage_plan(10, &[(1, r(0, 6), true), (2, r(4, 10), true)]),
            None
        );
    }

    #[test]
    fn spare_servers_fill_holes_before_anyone_else_moves() {
        // Server 3 duplicates blocks 0..5 of server 1; 8..10 are lost.
        let servers = [(1, r(0, 5), true), (2, r(5, 8), true), (3, r(0, 3), true)];
        let plan = coverage_plan(10, &servers).unwrap();
        assert_eq!(plan, vec![(1, r(0, 5)), (2, r(5, 8)), (3, r(7, 10))]);
        // A spare with a fixed span is not moved; the movable one is.
        let servers = [
            (1, r(0, 5), true),
            (2, r(5, 10), false),
            (3, r(5, 10), true),
        ];
        let plan = coverage_plan(15, &servers).unwrap();
        assert_eq!(plan, vec![(1, r(0, 5)), (2, r(5, 10)), (3, r(10, 15))]);
    }

    #[test]
    fn without_spares_the_servers_are_laid_out_in_id_order() {
        let servers = [(2, r(0, 4), true), (1, r(2, 6), true), (3, r(3, 7), true)];
        let plan = coverage_plan(12, &servers).unwrap();
        assert_eq!(plan, vec![(2, r(4, 8)), (1, r(0, 4)), (3, r(8, 12))]);
        // Around a fixed server, covering what can be covered.
        let servers = [(1, r(0, 4), true), (2, r(4, 8), false), (3, r(6, 10), true)];
        let plan = coverage_plan(16, &servers).unwrap();
        assert_eq!(plan, vec![(1, r(0, 4)), (2, r(4, 8)), (3, r(8, 12))]);
        // Nothing better to do: nobody moves.
        let servers = [(1, r(0, 4), true), (2, r(8, 12), false)];
        let plan = coverage_plan(16, &servers).unwrap();
        assert_eq!(plan, vec![(1, r(0, 4)), (2, r(8, 12))]);
    }

    proptest! {
        /// A plan keeps every server's length, moves no fixed server, never
        /// opens more holes than there were, and when all servers may move
        /// and their lengths add up to the model, covers it for good.
        #[test]
        fn plans_cover_the_model_when_the_servers_can(
            blocks in 1u32..40,
            spans in proptest::collection::vec((0u32..40, 1u32..12, proptest::bool::weighted(0.8)), 1..12),
        ) {
            let servers: Vec<(usize, BlockRange, bool)> = spans
                .iter()
                .enumerate()
                .map(|(i, &(start, len, movable))| {
                    let len = len.min(blocks);
                    let start = start.min(blocks - len);
                    (i, r(start, start + len), movable)
                })
                .collect();
            let spans_now: Vec<_> = servers.iter().map(|(_, s, _)| *s).collect();
            let holes_now = crate::uncovered_blocks(blocks, &spans_now);
            let Some(plan) = coverage_plan(blocks, &servers) else {
                prop_assert!(holes_now.is_empty());
                return Ok(());
            };
            for ((id, before, movable), (pid, after)) in servers.iter().zip(&plan) {
                prop_assert_eq!(id, pid);
                prop_assert_eq!(before.len(), after.len());
                prop_assert!(after.end() <= blocks);
                prop_assert!(*movable || before == after, "a fixed server moved");
            }
            let spans: Vec<_> = plan.iter().map(|(_, s)| *s).collect();
            let holes: u32 = crate::uncovered_blocks(blocks, &spans).iter().map(|h| h.len()).sum();
            let before: u32 = holes_now.iter().map(|h| h.len()).sum();
            prop_assert!(holes <= before, "the plan opened holes: {:?}", plan);
            let total: u32 = servers.iter().map(|(_, s, _)| s.len()).sum();
            if total >= blocks && servers.iter().all(|(_, _, m)| *m) {
                prop_assert_eq!(holes, 0, "{:?}", plan);
                let again: Vec<_> = plan.iter().map(|(i, s)| (*i, *s, true)).collect();
                prop_assert_eq!(coverage_plan(blocks, &again), None);
            }
        }
    }
}

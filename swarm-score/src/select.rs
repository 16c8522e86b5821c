//! "10 PCs near me": choosing which servers a client uses.
//!
//! Ranking alone is wrong when the best servers all host the same span, so
//! selection works in three steps:
//! 1. pinned servers are always in; excluded ones never are;
//! 2. the fewest further servers that cover every block still uncovered
//!    (best total score among such covers) — exact, because spans are
//!    intervals: a dynamic programme over the first uncovered block;
//! 3. remaining places go to failover replicas, each time to a server
//!    hosting one of the least-replicated blocks (best score first).
//!
//! Blocks no selectable server hosts are reported, with the excluded
//! servers that would have hosted them, and everything else is still
//! covered. Covering takes precedence over the node limit: when a full
//! cover needs more servers than the limit, the selection says so.

use std::collections::HashSet;

use swarm_core::BlockRange;

use crate::candidate::{Candidate, ServerId};
use crate::error::ScoreError;
use crate::score::{score, PerformanceScore, ScoreWeights};
use crate::uncovered_blocks;

/// How many servers to pick and how to score them.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct SelectionPolicy {
    /// How many servers to select (default 10).
    pub max_nodes: usize,
    /// Score weights.
    pub weights: ScoreWeights,
}

impl Default for SelectionPolicy {
    fn default() -> Self {
        Self {
            max_nodes: 10,
            weights: ScoreWeights::default(),
        }
    }
}

/// A person's choices in the node selector.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Overrides {
    /// Always use these (checked).
    pub pinned: HashSet<ServerId>,
    /// Never use these (unchecked).
    pub excluded: HashSet<ServerId>,
}

/// Why a candidate is or is not in the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Pinned by the user.
    Pinned,
    /// Chosen to cover blocks nobody else selected covers.
    Coverage,
    /// Chosen as a failover replica.
    Redundancy,
    /// Excluded by the user.
    Excluded,
    /// Not needed within the node limit.
    NotSelected,
    /// Hosts nothing of this model's blocks, or reports no throughput.
    Unusable,
}

impl Status {
    /// Whether the candidate is used.
    pub fn is_selected(self) -> bool {
        matches!(self, Status::Pinned | Status::Coverage | Status::Redundancy)
    }
}

/// One line of the node selector.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedCandidate {
    /// Index into the candidates given to [`select`].
    pub index: usize,
    /// Its score and components.
    pub score: PerformanceScore,
    /// Whether and why it is selected.
    pub status: Status,
}

/// The outcome of [`select`].
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// Every candidate, best score first.
    pub ranked: Vec<RankedCandidate>,
    /// Indices of the selected candidates, best score first.
    pub selected: Vec<usize>,
    /// Blocks no selectable candidate hosts.
    pub uncovered: Vec<BlockRange>,
    /// The fewest selected hosts of any coverable block (0 when a block
    /// lacks one): 2 means every block survives one failure.
    pub min_replicas: u32,
    /// A full cover needed more servers than `max_nodes`.
    pub over_limit: bool,
    /// Sentences for people: what is missing and why.
    pub notes: Vec<String>,
}

impl Selection {
    /// The selected candidates.
    pub fn selected<'a>(&self, candidates: &'a [Candidate]) -> Vec<&'a Candidate> {
        self.selected.iter().map(|&i| &candidates[i]).collect()
    }
}

/// `span` clipped to `0..block_count`, if anything is left.
fn clip(span: BlockRange, block_count: u32) -> Option<(u32, u32)> {
    let end = span.end().min(block_count);
    (span.start() < end).then_some((span.start(), end))
}

/// Chooses servers for a model of `block_count` blocks.
pub fn select(
    candidates: &[Candidate],
    block_count: u32,
    policy: &SelectionPolicy,
    overrides: &Overrides,
) -> Result<Selection, ScoreError> {
    if block_count == 0 {
        return Err(ScoreError::NoBlocks);
    }
    policy.weights.validate()?;
    let n = block_count as usize;
    let scores: Vec<PerformanceScore> = candidates
        .iter()
        .map(|c| score(c, &policy.weights))
        .collect();
    let mut status: Vec<Status> = candidates
        .iter()
        .map(|c| {
            if overrides.excluded.contains(&c.id) {
                Status::Excluded
            } else if clip(c.blocks, block_count).is_none() || c.secs_per_block().is_none() {
                Status::Unusable
            } else if overrides.pinned.contains(&c.id) {
                Status::Pinned
            } else {
                Status::NotSelected
            }
        })
        .collect();
    let spans: Vec<(u32, u32)> = candidates
        .iter()
        .map(|c| clip(c.blocks, block_count).unwrap_or((0, 0)))
        .collect();
    let usable =
        |i: usize, status: &[Status]| matches!(status[i], Status::NotSelected | Status::Pinned);

    // Blocks nobody selectable hosts.
    let hostable: Vec<BlockRange> = (0..candidates.len())
        .filter(|&i| usable(i, &status))
        .filter_map(|i| BlockRange::new(spans[i].0, spans[i].1).ok())
        .collect();
    let uncovered = uncovered_blocks(block_count, &hostable);
    let mut notes = Vec::new();
    for gap in &uncovered {
        let excluded: Vec<&str> = candidates
            .iter()
            .zip(&status)
            .filter(|(c, s)| {
                **s == Status::Excluded
                    && clip(c.blocks, block_count)
                        .is_some_and(|(a, b)| a < gap.end() && gap.start() < b)
            })
            .map(|(c, _)| c.name.as_str())
            .collect();
        notes.push(if excluded.is_empty() {
            format!("blocks {gap} have no host")
        } else {
            format!(
                "blocks {gap} have no host except excluded {}",
                excluded.join(", ")
            )
        });
    }

    // 1. Pinned, plus the hostless blocks, count as covered.
    let mut covered = vec![false; n];
    for gap in &uncovered {
        for b in gap.iter() {
            covered[b as usize] = true;
        }
    }
    for (i, s) in status.iter().enumerate() {
        if *s == Status::Pinned {
            for b in spans[i].0..spans[i].1 {
                covered[b as usize] = true;
            }
        }
    }

    // 2. Fewest servers covering the rest, best total score among those.
    // `next[p]`: the first uncovered block at or after p.
    let mut next = vec![block_count; n + 1];
    for p in (0..n).rev() {
        next[p] = if covered[p] { next[p + 1] } else { p as u32 };
    }
    let mut by_block: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in (0..candidates.len()).filter(|&i| status[i] == Status::NotSelected) {
        for b in spans[i].0..spans[i].1 {
            by_block[b as usize].push(i);
        }
    }
    // best[e]: (servers, -score, predecessor frontier, server) to reach a
    // frontier e where every block before e is covered.
    type Step = (usize, f64, usize, usize);
    let mut best: Vec<Option<Step>> = vec![None; n + 1];
    let start = next[0] as usize;
    best[start] = Some((0, 0.0, usize::MAX, usize::MAX));
    for e in start..n {
        let Some((count, neg, _, _)) = best[e] else {
            continue;
        };
        if covered[e] {
            continue;
        }
        for &i in &by_block[e] {
            let to = next[spans[i].1 as usize] as usize;
            let candidate = (count + 1, neg - scores[i].total, e, i);
            let better = match best[to] {
                None => true,
                Some((c, s, _, _)) => (candidate.0, candidate.1) < (c, s),
            };
            if better {
                best[to] = Some(candidate);
            }
        }
    }
    let mut cover = Vec::new();
    let mut at = n;
    while let Some((_, _, from, i)) = best[at] {
        if i == usize::MAX {
            break;
        }
        cover.push(i);
        at = from;
    }
    for &i in &cover {
        status[i] = Status::Coverage;
    }
    let chosen = status.iter().filter(|s| s.is_selected()).count();
    let over_limit = chosen > policy.max_nodes;
    if over_limit {
        notes.push(format!(
            "covering every block takes {chosen} servers, more than the limit of {}",
            policy.max_nodes
        ));
    }

    // 3. Failover replicas for the least-replicated blocks.
    let mut hosts = vec![0u32; n];
    for (i, s) in status.iter().enumerate() {
        if s.is_selected() {
            for b in spans[i].0..spans[i].1 {
                hosts[b as usize] += 1;
            }
        }
    }
    let mut spare: Vec<usize> = (0..candidates.len())
        .filter(|&i| status[i] == Status::NotSelected)
        .collect();
    spare.sort_by(|&a, &b| scores[b].total.total_cmp(&scores[a].total));
    let mut chosen = status.iter().filter(|s| s.is_selected()).count();
    while chosen < policy.max_nodes && !spare.is_empty() {
        // The weakest block a spare server would reinforce; best score
        // breaks ties (spare is sorted by score, and min_by_key keeps the
        // first of equals).
        let Some((pos, _)) = spare
            .iter()
            .enumerate()
            .map(|(pos, &i)| {
                (
                    pos,
                    (spans[i].0..spans[i].1)
                        .map(|b| hosts[b as usize])
                        .min()
                        .unwrap_or(u32::MAX),
                )
            })
            .min_by_key(|&(_, weakest)| weakest)
        else {
            break;
        };
        let i = spare.remove(pos);
        status[i] = Status::Redundancy;
        for b in spans[i].0..spans[i].1 {
            hosts[b as usize] += 1;
        }
        chosen += 1;
    }

    let min_replicas = (0..n)
        .filter(|&b| !uncovered.iter().any(|g| g.contains(b as u32)))
        .map(|b| hosts[b])
        .min()
        .unwrap_or(0);
    let mut ranked: Vec<RankedCandidate> = (0..candidates.len())
        .map(|index| RankedCandidate {
            index,
            score: scores[index],
            status: status[index],
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.score
            .total
            .total_cmp(&a.score.total)
            .then(a.index.cmp(&b.index))
    });
    let selected = ranked
        .iter()
        .filter(|r| r.status.is_selected())
        .map(|r| r.index)
        .collect();
    Ok(Selection {
        ranked,
        selected,
        uncovered,
        min_replicas,
        over_limit,
        notes,
    })
}

swarm_core::with_setters!(SelectionPolicy {
    max_nodes: usize => with_max_nodes,
    weights: ScoreWeights => with_weights,
});

swarm_core::with_setters!(Overrides {
    pinned: HashSet<ServerId> => with_pinned,
    excluded: HashSet<ServerId> => with_excluded,
});
